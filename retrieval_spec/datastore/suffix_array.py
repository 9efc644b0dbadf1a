"""Suffix arrays over token streams: built with pydivsufsort, searched by binary search over mapped bytes.

Token streams are big-endian, so comparing the bytes of two token sequences compares the sequences. That
lets a search compare suffixes as ``bytes`` slices of the mapped file inside :func:`bisect.bisect_left`:
about 2 log2(n) slices of a few bytes each, no Python loop over the corpus and no copy of it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Callable

import numpy as np
from pydivsufsort import divsufsort

from retrieval_spec.datastore.manifest import suffix_array_dtype


def build_suffix_array(stream: np.ndarray) -> np.ndarray:
    """Sort the suffixes of a token stream.

    Args:
        stream: (n,) big-endian ``>u2`` or ``>u4`` token ids.

    Returns:
        (n,) ``<i4`` (``<i8`` from 2**31 tokens) start positions of the suffixes in increasing order.

    libdivsufsort sorts bytes, so the stream is sorted as its big-endian bytes and only suffixes that start on a
    token boundary are kept; this is what ``pydivsufsort.divsufsort`` does for integer arrays, without its
    copies. Peak memory is about 7 bytes per stream byte.
    """
    if stream.dtype not in (np.dtype(">u2"), np.dtype(">u4")):
        raise ValueError(f"token streams are big-endian uint16 or uint32, got {stream.dtype}")
    keys = stream
    if stream.dtype.itemsize == 4:
        # Ranks preserve order; when fewer than 2**16 distinct ids occur, sorting them as uint16 halves the bytes.
        values = np.unique(stream)
        if len(values) <= 1 << 16:
            keys = np.searchsorted(values, stream).astype(">u2")
    width = keys.dtype.itemsize
    byte_suffixes = divsufsort(keys.view(np.uint8))
    # The remainder is written as uint8 so the filter costs 2 bytes per stream byte, not 5.
    remainder = np.bitwise_and(byte_suffixes, width - 1, out=np.empty(len(byte_suffixes), np.uint8), casting="unsafe")
    suffixes = byte_suffixes[remainder == 0]
    del byte_suffixes, remainder
    suffixes //= width
    return suffixes.astype(suffix_array_dtype(len(stream)), copy=False)


class SuffixArray:
    """Read-only search over one token stream and its suffix array.

    Both buffers are bytes-like objects whose slices are ``bytes`` (an ``mmap.mmap`` of the files, or ``bytes``).

    Attributes:
        tokens: (n,) token ids, a view of the token buffer.
        suffixes: (n,) suffix start positions in sorted order, a view of the suffix buffer.
    """

    def __init__(self, token_buffer, suffix_buffer, token_dtype: np.dtype, suffix_dtype: np.dtype) -> None:
        self.tokens = np.frombuffer(token_buffer, dtype=token_dtype)
        self.suffixes = np.frombuffer(suffix_buffer, dtype=suffix_dtype)
        if len(self.tokens) != len(self.suffixes):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.suffixes)} suffixes")
        self._token_buffer = token_buffer
        self._token_width = token_dtype.itemsize
        # A native-order view that bisect indexes in C; suffix arrays are little-endian (checked on open).
        self._sorted_starts = memoryview(suffix_buffer).cast("i" if suffix_dtype.itemsize == 4 else "q")

    def __len__(self) -> int:
        return len(self.tokens)

    def _prefix(self, num_bytes: int) -> Callable[[int], bytes]:
        tokens, width = self._token_buffer, self._token_width
        return lambda start: tokens[start * width : start * width + num_bytes]

    def lower_bound(self, pattern: bytes) -> int:
        """Rank of the first sorted suffix not below ``pattern`` (encoded tokens); one binary search."""
        return bisect_left(self._sorted_starts, pattern, key=self._prefix(len(pattern)))

    def starts_with(self, rank: int, pattern: bytes) -> bool:
        """Whether the suffix of sorted rank ``rank`` starts with ``pattern``."""
        return rank < len(self._sorted_starts) and self._prefix(len(pattern))(self._sorted_starts[rank]) == pattern

    def upper_bound(self, pattern: bytes, lo: int = 0) -> int:
        """Rank of the first sorted suffix, from ``lo`` on, that is above every extension of ``pattern``."""
        return bisect_right(self._sorted_starts, pattern, lo, key=self._prefix(len(pattern)))

    def interval(self, pattern: bytes) -> tuple[int, int]:
        """``(lo, hi)`` such that ``suffixes[lo:hi]`` are exactly the starts of occurrences of ``pattern``."""
        lo = self.lower_bound(pattern)
        return lo, self.upper_bound(pattern, lo)
