"""An append-only token text with an index from every short n-gram to the positions that follow it.

Shared by the drafters that copy from text seen at decode time (the prompt, reference documents, the output
so far, sibling samples): a lookup walks a few entries of one hash chain however long the text is.

The index is a hash-chained table per n-gram length, as compressors keep one: each slot holds the latest end
position of an n-gram hashed there, and each position the previous end hashed to the same slot. Appending a token
puts the n-grams ending at it at the heads of their chains (``O(max_ngram)``: a 50,000-token prompt in 2.3 ms on a
2-core AMD EPYC, where sorting its n-grams' hashes took 29 ms); a lookup walks its chain from the most recent end,
comparing tokens, so a hash collision costs a step of the walk and never a wrong match. Integer arrays only, in
compiled loops: nothing for the garbage collector to walk, no per-token Python.
"""

from __future__ import annotations

import secrets

import numpy as np

from ..compiled import array, i32, i64, kernel, returns, view, void
from ..tree import hash_slot

SEPARATOR = -1  # never a token id: ends a copied span at a document boundary
_MULTIPLIER = 0x9E3779B97F4A7C15  # odd: the n-gram hash's polynomial base
_MIN_SLOTS = 1024


class NgramIndex:
    """Token text plus ``n-gram -> end positions`` for ``min_ngram <= n <= max_ngram``.

    Positions are where the text continues after the n-gram. No n-gram across a :data:`SEPARATOR` is indexed. The
    table has at least twice as many slots as the text has tokens, so a chain holds little but its own n-gram's
    ends; it is rebuilt with twice the slots when the text outgrows it (geometric).
    """

    def __init__(self, min_ngram: int, max_ngram: int, capacity: int = 1024) -> None:
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.text = np.zeros(max(capacity, 1), dtype=np.int32)
        self.length = 0
        # _heads[n - min_ngram, slot]: the latest end of an n-gram in the slot; _previous[n - min_ngram, end]: the
        # end before ``end`` in its chain. 0 ends a chain (no n-gram ends at position 0).
        self._heads = np.zeros((max_ngram - min_ngram + 1, _slots_for(0)), dtype=np.int32)  # sized by the text
        self._previous = np.zeros((max_ngram - min_ngram + 1, len(self.text) + 1), dtype=np.int32)
        # The hash's seed, drawn per index: text made to crowd one slot (and lengthen its walks) cannot be made
        # ahead of time. Where the n-grams land never changes what a lookup finds, only how long it walks.
        self._seed = secrets.randbits(63)

    def append(self, tokens: np.ndarray) -> None:
        """Extend the text and index every n-gram that now ends inside it."""
        old, new = self.length, self.length + len(tokens)
        if new > len(self.text):
            grown = np.zeros(2 * new, dtype=np.int32)
            grown[:old] = self.text[:old]
            self.text = grown
            previous = np.zeros((len(self._previous), len(grown) + 1), dtype=np.int32)
            previous[:, : old + 1] = self._previous[:, : old + 1]
            self._previous = previous
        self.text[old:new] = tokens
        self.length = new
        if 2 * new > self._heads.shape[1]:  # rebuilt: every chain re-threaded over twice the slots (a first long
            # append sizes the table for itself, not for the capacity: a smaller table is fewer cache misses)
            self._heads = np.zeros((len(self._heads), _slots_for(new)), dtype=np.int32)
            old = 0
        _insert(self.text, *self.chains, self.min_ngram, old + 1, new)

    def copies(self, context: np.ndarray, max_matches: int, longest: int, depth: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Where the text continued after the context's suffixes, longest match first, most recent first, and the
        next ``depth`` tokens there (cut before a separator).

        Candidates are found through the index (suffixes of ``min_ngram`` to ``max_ngram`` tokens); with
        ``longest`` > ``max_ngram`` each match is then measured backwards up to ``longest`` tokens, so a copy that
        has run for 40 tokens says so instead of stopping at ``max_ngram`` (ties keep their order).

        Returns:
            starts: (m,) int64, distinct positions (each < ``length``) following an occurrence, ``m <=
                max_matches``.
            lengths: (m,) int64, the matched suffix length for each start, non-increasing.
            tokens: (sum(sizes),) int32, the spans after the starts laid end to end.
            sizes: (m,) int64, each span's length (0 where a separator follows at once).
        """
        return copy_arrays(self.text, self.length, *self.chains, self.min_ngram, np.asarray(context, dtype=np.int32),
                           max_matches, longest, depth)

    @property
    def chains(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The chains' heads and links and the hash's seed, for :func:`copy_arrays` called from other kernels."""
        return self._heads, self._previous, self._seed

    def span(self, start: int, depth: int) -> np.ndarray:
        """Up to ``depth`` tokens from ``start``, cut before the next separator."""
        return self.text[start : _span_end(self.text, self.length, start, depth)]


def _slots_for(tokens: int) -> int:
    """The table's size for a text of ``tokens``: a power of two, at least twice as many."""
    return max(_MIN_SLOTS, 1 << (2 * max(tokens, 1) - 1).bit_length())


@kernel(void, view(i32), array(i32, 2), array(i32, 2), i64, i64, i64, i64)
def _insert(text, heads, previous, seed, min_ngram, first, last):
    """Put every n-gram ending at ``first..last`` (inclusive, increasing: the latest ends up at its chain's head)
    into its chain; an n-gram holding a separator is left out."""
    max_ngram = min_ngram + len(heads) - 1
    slots = heads.shape[1]
    for end in range(first, last + 1):
        key = np.uint64(seed)
        for n in range(1, min(max_ngram, end) + 1):
            token = text[end - n]
            if token == SEPARATOR:  # growing to the left: every longer n-gram holds it too
                break
            key = key * np.uint64(_MULTIPLIER) + np.uint64(token + 2)
            if n >= min_ngram:
                slot = hash_slot(np.int64(key), slots)
                previous[n - min_ngram, end] = heads[n - min_ngram, slot]
                heads[n - min_ngram, slot] = end


@kernel(i64, view(i32), i64, i64, i64)
def _span_end(text, length, start, depth):
    """Where the span of up to ``depth`` tokens from ``start`` ends (exclusive): before the next separator, at the
    text's end at the latest."""
    end = start
    while end < min(start + depth, length) and text[end] != SEPARATOR:
        end += 1
    return end


@kernel(returns(array(i64), array(i64)), view(i32), i64, view(i32, 2), view(i32, 2), i64, i64, view(i32), i64, i64)
def _matches(text, length, heads, previous, seed, min_ngram, context, max_matches, longest):
    """:meth:`NgramIndex.copies`' starts and lengths: each suffix length's chain walked from its most recent end,
    longest first; then each match measured back up to ``longest`` tokens and the matches stably sorted by that
    length. A chain's entries of other n-grams (collisions) are skipped: on average under one a lookup, since the
    table has twice as many slots as the text has tokens, though text made to collide could lengthen a walk up to
    the text's length."""
    max_ngram = min_ngram + len(heads) - 1
    slots = heads.shape[1]
    starts = np.zeros(max(max_matches, 0), dtype=np.int64)
    lengths = np.zeros(max(max_matches, 0), dtype=np.int64)
    top = min(max_ngram, len(context))
    keys = np.full(top + 1, np.uint64(seed), dtype=np.uint64)  # keys[n]: the hash of the context's last n tokens
    for n in range(1, top + 1):
        keys[n] = keys[n - 1] * np.uint64(_MULTIPLIER) + np.uint64(context[len(context) - n] + 2)
    count = 0
    for n in range(top, min_ngram - 1, -1):
        end = heads[n - min_ngram, hash_slot(np.int64(keys[n]), slots)]
        while end > 0 and count < max_matches:
            if end < length:
                same = True
                for i in range(1, n + 1):
                    if text[end - i] != context[len(context) - i]:
                        same = False
                        break
                for j in range(count):
                    if starts[j] == end:  # found with a longer suffix already
                        same = False
                if same:
                    starts[count], lengths[count] = end, n
                    count += 1
            end = previous[n - min_ngram, end]
    if longest > max_ngram:
        for j in range(count):  # measure back: the separator (-1) never equals a context token
            start, n = starts[j], lengths[j]
            window = min(longest, start, len(context))
            while n < window and text[start - n - 1] == context[len(context) - n - 1]:
                n += 1
            lengths[j] = n
        for j in range(1, count):  # insertion sort, longest first, stable
            start, n = starts[j], lengths[j]
            i = j
            while i > 0 and lengths[i - 1] < n:
                starts[i], lengths[i] = starts[i - 1], lengths[i - 1]
                i -= 1
            starts[i], lengths[i] = start, n
    return starts[:count], lengths[:count]


@kernel(returns(array(i64), array(i64), array(i32), array(i64)), view(i32), i64, view(i32, 2), view(i32, 2), i64, i64,
        view(i32), i64, i64, i64)
def copy_arrays(text, length, heads, previous, seed, min_ngram, context, max_matches, longest, depth):
    """:meth:`NgramIndex.copies` (the compiled form, for kernels that go on from the copies)."""
    starts, lengths = _matches(text, length, heads, previous, seed, min_ngram, context, max_matches, longest)
    sizes = np.zeros(len(starts), dtype=np.int64)
    tokens = np.empty(len(starts) * max(min(depth, length), 0), dtype=np.int32)
    count = 0
    for j in range(len(starts)):
        sizes[j] = _span_end(text, length, starts[j], depth) - starts[j]
        tokens[count : count + sizes[j]] = text[starts[j] : starts[j] + sizes[j]]
        count += sizes[j]
    return starts, lengths, tokens[:count], sizes
