"""An append-only token text with an index from every short n-gram to the positions that follow it.

Shared by the drafters that copy from text seen at decode time (the prompt, reference documents, the output
so far, sibling samples): a lookup costs a few dictionary probes however long the text is.

Two parts, so that a long prompt costs little to index and a decoding step little to extend: text appended in
large pieces (a prompt, a reference, a reloaded history) is indexed by sorted arrays, built with a few numpy
sorts the first time the text is searched (a 50,000-token prompt in about 30 ms on a 2-core CPU, where a
dictionary took a quarter of a second); the few tokens each step appends go into a dictionary, ``O(t *
max_ngram)`` for ``t`` tokens.
"""

from __future__ import annotations

import bisect
from itertools import chain

import numpy as np

SEPARATOR = -1  # never a token id: ends a copied span at a document boundary
BULK = 64  # an append at least this long, and at least as long as the text in the arrays, rebuilds the arrays
_MULTIPLIER = 0x9E3779B97F4A7C15  # odd: the n-gram hash's polynomial base
_MASK = (1 << 64) - 1  # hashes are 64-bit (numpy's uint64 wraps; Python's ints are masked)


class NgramIndex:
    """Token text plus ``n-gram -> [end positions]`` for ``min_ngram <= n <= max_ngram``.

    Positions are where the text continues after the n-gram. No n-gram across a :data:`SEPARATOR` is found. The
    ends of n-grams in text appended in large pieces are found through, per length, the n-grams' 64-bit hashes,
    sorted; those of the few tokens a step appends through the dictionary. Two different n-grams of one length
    with the same hash (odds about ``2**-64`` a pair) would only yield a draft that verification rejects.
    """

    def __init__(self, min_ngram: int, max_ngram: int, capacity: int = 1024) -> None:
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.text = np.zeros(max(capacity, 1), dtype=np.int32)
        self.length = 0
        self._index: dict[tuple[int, ...], list[int]] = {}  # n-grams ending after _sorted_end
        self._sorted_end = 0  # ends up to here are in the sorted arrays (once _unsorted is False)
        self._unsorted = False  # text was appended for the arrays and they are not rebuilt yet
        # Per n: each hash's group g; the groups' bounds (group g is [bounds[g], bounds[g + 1]) of the positions); the
        # end positions of the n-grams in the arrays, grouped by hash (increasing within a group). A dictionary of
        # ints and arrays, which the garbage collector never walks (lists of a prompt's length made its full
        # collections take 100 ms in a serving step).
        self._sorted: dict[int, tuple[dict[int, int], np.ndarray, np.ndarray]] = {}
        self._separators: list[int] = []  # positions of the separators, increasing

    def append(self, tokens: np.ndarray) -> None:
        """Extend the text and index every n-gram that now ends inside it (a long piece: at the next search)."""
        old, new = self.length, self.length + len(tokens)
        if new > len(self.text):
            grown = np.zeros(2 * new, dtype=np.int32)
            grown[:old] = self.text[:old]
            self.text = grown
        self.text[old:new] = tokens
        self.length = new
        if self._unsorted or (len(tokens) >= BULK and len(tokens) >= self._sorted_end):
            self._unsorted = True  # geometric: the arrays are rebuilt O(log length) times, whatever the pieces
            self._separators += (old + np.flatnonzero(self.text[old:new] == SEPARATOR)).tolist()
            return
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

    def _sort(self) -> None:
        """Index every n-gram of the text in the sorted arrays, and empty the dictionary. N-grams holding a separator
        are indexed too: no context holds one, so none is ever found."""
        length = self.length
        values = self.text[:length].astype(np.uint64) + np.uint64(2)  # as the hash of a context's n-gram counts them
        hashes = np.zeros(length + 1, dtype=np.uint64)  # per end position, the hash of the n-gram before it
        with np.errstate(over="ignore"):
            for n in range(1, self.max_ngram + 1):
                hashes[n:] = hashes[n:] * np.uint64(_MULTIPLIER) + values[: length + 1 - n]
                if n >= self.min_ngram:
                    order = np.argsort(hashes[n:], kind="stable")  # ties keep increasing positions
                    keys = hashes[n:][order]
                    new_group = np.ones(len(keys), dtype=bool)
                    new_group[1:] = keys[1:] != keys[:-1]
                    first = np.flatnonzero(new_group)
                    self._sorted[n] = (dict(zip(keys[first].tolist(), range(len(first)))), np.append(first, len(keys)),
                                       order + n)
        self._index = {}
        self._sorted_end, self._unsorted = length, False

    def matches(self, context: np.ndarray, max_matches: int, longest: int = 0) -> tuple[list[int], list[int]]:
        """Where the text continued after the context's suffixes, longest match first, most recent first.

        Candidates are found through the index (suffixes of ``min_ngram`` to ``max_ngram`` tokens); with
        ``longest`` > ``max_ngram`` each match is then measured backwards up to ``longest`` tokens, so a copy that
        has run for 40 tokens says so instead of stopping at ``max_ngram``.

        Returns:
            starts: distinct positions (each < ``length``) following an occurrence, at most ``max_matches``.
            lengths: the matched suffix length for each start, non-increasing.
        """
        if self._unsorted:
            self._sort()
        seen: set[int] = set()
        starts: list[int] = []
        lengths: list[int] = []
        tail = context[-self.max_ngram :].tolist()
        hashes = [0]  # hashes[n]: the hash of the context's last n tokens, as :meth:`_sort` computes them
        if self._sorted:  # a text indexed by the dictionary alone needs none
            for token in reversed(tail):
                hashes.append((hashes[-1] * _MULTIPLIER + token + 2) & _MASK)
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            recent = self._index.get(tuple(tail[len(tail) - n :]), ())
            candidates = reversed(recent)  # most recent first
            wanted = max_matches + len(seen) + 1 - len(recent)  # enough, however many were seen already
            if wanted > 0 and n in self._sorted:
                groups, bounds, ends = self._sorted[n]
                group = groups.get(hashes[n])
                if group is not None:
                    low, high = bounds[group : group + 2].tolist()
                    candidates = chain(candidates, ends[max(low, high - wanted) : high][::-1].tolist())
            for start in candidates:
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
