"""An append-only token text with an index from every short n-gram to the positions that follow it.

Shared by the drafters that copy from text seen at decode time (the prompt, reference documents, the output
so far, sibling samples): a lookup costs a few dictionary probes however long the text is, and appending
``t`` tokens costs ``O(t * max_ngram)``.
"""

from __future__ import annotations

import bisect

import numpy as np

SEPARATOR = -1  # never a token id: ends a copied span at a document boundary


class NgramIndex:
    """Token text plus ``n-gram -> [end positions]`` for ``min_ngram <= n <= max_ngram``.

    Positions are where the text continues after the n-gram, in the order they were appended (oldest first).
    N-grams never span a :data:`SEPARATOR`.
    """

    def __init__(self, min_ngram: int, max_ngram: int, capacity: int = 1024) -> None:
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.text = np.zeros(max(capacity, 1), dtype=np.int32)
        self.length = 0
        self._index: dict[tuple[int, ...], list[int]] = {}
        self._separators: list[int] = []  # positions of the separators, increasing

    def append(self, tokens: np.ndarray) -> None:
        """Extend the text and index every n-gram that now ends inside it."""
        old, new = self.length, self.length + len(tokens)
        if new > len(self.text):
            grown = np.zeros(2 * new, dtype=np.int32)
            grown[:old] = self.text[:old]
            self.text = grown
        self.text[old:new] = tokens
        self.length = new
        low = max(0, old - self.max_ngram + 1)  # the earliest token a new n-gram can start at
        window, index = self.text[low:new].tolist(), self._index
        if SEPARATOR in window[old - low :]:
            self._separators += (old + np.flatnonzero(self.text[old:new] == SEPARATOR)).tolist()
        for end in range(old + 1, new + 1):
            for n in range(1, min(self.max_ngram, end) + 1):
                gram = window[end - n - low : end - low]
                if gram[0] == SEPARATOR:  # growing to the left: every longer n-gram holds it too
                    break
                if n >= self.min_ngram:
                    index.setdefault(tuple(gram), []).append(end)

    def matches(self, context: np.ndarray, max_matches: int, longest: int = 0) -> tuple[list[int], list[int]]:
        """Where the text continued after the context's suffixes, longest match first, most recent first.

        Candidates are found through the index (suffixes of ``min_ngram`` to ``max_ngram`` tokens); with
        ``longest`` > ``max_ngram`` each match is then measured backwards up to ``longest`` tokens, so a copy that
        has run for 40 tokens says so instead of stopping at ``max_ngram``.

        Returns:
            starts: distinct positions (each < ``length``) following an occurrence, at most ``max_matches``.
            lengths: the matched suffix length for each start, non-increasing.
        """
        seen: set[int] = set()
        starts: list[int] = []
        lengths: list[int] = []
        tail = tuple(context[-self.max_ngram :].tolist())
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            for start in reversed(self._index.get(tail[len(tail) - n :], ())):
                if start < self.length and start not in seen:
                    seen.add(start)
                    starts.append(start)
                    lengths.append(n)
                    if len(starts) == max_matches:
                        break
            if len(starts) == max_matches:
                break
        if longest > self.max_ngram and starts:
            lengths = [self._match_length(start, n, context, longest) for start, n in zip(starts, lengths)]
            order = sorted(range(len(starts)), key=lambda i: -lengths[i])  # stable: recency within a length
            starts, lengths = [starts[i] for i in order], [lengths[i] for i in order]
        return starts, lengths

    def _match_length(self, start: int, known: int, context: np.ndarray, longest: int) -> int:
        """How many tokens before ``start`` equal the context's last ones (``known`` of them do), up to ``longest``."""
        window = min(longest, start, len(context))
        if window <= known or self.text[start - known - 1] != context[len(context) - known - 1]:
            return known  # most matches end where the index found them: no arrays for those
        before = self.text[start - window : start][::-1]
        equal = before == context[len(context) - window :][::-1]  # a separator never equals a token
        return window if equal.all() else int(np.argmin(equal))

    def span(self, start: int, depth: int) -> np.ndarray:
        """Up to ``depth`` tokens from ``start``, cut before the next separator."""
        after = bisect.bisect_left(self._separators, start)
        end = min(start + depth, self.length)
        if after < len(self._separators):
            end = min(end, self._separators[after])
        return self.text[start:end]
