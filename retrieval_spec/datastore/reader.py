"""Open a datastore and query all its shards as one: exact matches, longest context suffixes, continuations.

Positions are global: shard ``s`` occupies ``[offset_s, offset_s + stream_length_s)`` of one virtual stream,
its shards' token streams laid end to end in manifest order.
"""

from __future__ import annotations

import itertools
import mmap
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_spec.datastore import ngram_table
from retrieval_spec.datastore.manifest import (
    DOCUMENT_SCHEMA,
    DOCUMENTS,
    NGRAMS,
    SHARD_FILES,
    SUFFIX_ARRAY,
    SUFFIX_ARRAY_DTYPES,
    TOKENS,
    FileEntry,
    TokenizerFingerprint,
    check_file,
    inside,
    read_manifest,
    separator,
)
from retrieval_spec.datastore.suffix_array import SuffixArray
from retrieval_spec.errors import DatastoreFormatError, TokenizerMismatchError

# Columns of our tables hold at most 5 values a row (an n-gram row: order, two context ids, next, count).
MAX_VALUES_PER_ROW = 5


@dataclass(frozen=True)
class Match:
    """Where a token sequence occurs in a datastore.

    Attributes:
        length: tokens matched (for :meth:`Datastore.longest_match`, at the end of the context); 0 when none.
        count: occurrences over all shards.
        intervals: per shard, ``(lo, hi)``: its sorted suffixes ``lo .. hi - 1`` start with the match (an
            empty range, ``(0, 0)`` or ``(lo, lo)``, where it holds none).
    """

    length: int
    count: int
    intervals: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Shard:
    """One shard as mapped in memory.

    Attributes:
        path: the shard's directory.
        offset: global position of the first token of its stream.
        index: its token stream and suffix array.
        first_document: global id of its first document.
        num_documents: documents it holds.
    """

    path: Path
    offset: int
    index: SuffixArray
    first_document: int
    num_documents: int


class Datastore:
    """A read-only, memory-mapped datastore; build one with ``retrieval_spec.builders.build.build_index``.

    Attributes:
        path: the index directory.
        manifest: the parsed ``manifest.json``.
        fingerprint: the tokenizer the index was built with.
        vocab_size: token ids lie in ``[0, vocab_size)``; a stream holding another id is refused when read.
        separator: the token value between documents (never a token id).
        shards: the shards in manifest order.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Shard]) -> None:
        self.path = path
        self.manifest = manifest
        self.fingerprint = TokenizerFingerprint(**manifest["tokenizer"])
        self.vocab_size = self.fingerprint.vocab_size
        self.token_dtype = np.dtype(manifest["token_dtype"])
        self.separator = separator(self.token_dtype)
        self.shards = shards
        self._offsets = np.array([shard.offset for shard in shards], dtype=np.int64)
        self.stream_length = int(shards[-1].offset + len(shards[-1].index)) if shards else 0
        self._top_next: dict[int, np.ndarray] = {}  # k -> top_next_tokens(k): read once, the index is read-only
        # Where longest_match starts: the shard of the previous match (decoding tends to continue it).
        self._last_match_shard = 0

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: TokenizerFingerprint | None = None) -> Datastore:
        """Map an index after checking its manifest, tokenizer, file sizes and sampled checksums.

        What is checked when (the cost of a check on open grows with the shards, never with their size):

        - on open: every manifest field (:func:`~retrieval_spec.datastore.manifest.read_manifest`), the
          tokenizer, each file's size and the checksum of its first and last 64 KiB (truncation, a damaged
          Parquet footer, most edits);
        - on first read: the Parquet tables (page checksums, column types, token ids within the vocabulary,
          document bounds within the stream);
        - on every read: each token id read from a stream is within the vocabulary, each suffix array entry
          used is within its stream.

        So a damaged file is refused (:class:`DatastoreFormatError` naming it) before any id outside the
        vocabulary leaves the datastore; damage that stays within the vocabulary can only make drafts worse,
        never the output different. :func:`check_integrity` checks every byte.

        Raises:
            DatastoreFormatError: a missing, truncated or altered file, a malformed manifest, or another
                format version.
            TokenizerMismatchError: ``expected_fingerprint`` differs from the index's tokenizer.
        """
        path = Path(path)
        manifest = read_manifest(path)
        built_with = TokenizerFingerprint(**manifest["tokenizer"])
        dtype = np.dtype(manifest["token_dtype"])
        if expected_fingerprint is not None and (expected_fingerprint.sha256, expected_fingerprint.vocab_size) != (
            built_with.sha256,
            built_with.vocab_size,
        ):
            raise TokenizerMismatchError(
                f"{path} was built with tokenizer {built_with.name!r} (vocab {built_with.vocab_size}, "
                f"sha256 {built_with.sha256[:12]}) but tokenizer {expected_fingerprint.name!r} (vocab "
                f"{expected_fingerprint.vocab_size}, sha256 {expected_fingerprint.sha256[:12]}) was given; "
                "rebuild the index with the model's tokenizer"
            )
        if sys.byteorder != "little":
            raise DatastoreFormatError(f"{path}: suffix arrays are little-endian; this machine is big-endian")
        shards, offset, first_document = [], 0, 0
        for number, entry in enumerate(manifest["shards"]):
            shard = _open_shard(path, number, entry, dtype, offset, first_document)
            shards.append(shard)
            offset += len(shard.index)
            first_document += shard.num_documents
        return cls(path, manifest, shards)

    @property
    def num_tokens(self) -> int:
        """Document tokens, separators not counted."""
        return int(self.manifest["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    def find(self, query: np.ndarray, max_occurrences: int) -> np.ndarray:
        """Start positions of occurrences of ``query`` ((m,) token ids, m >= 1).

        Returns:
            (k,) int64 global positions, ``k = min(count, max_occurrences)``, spread evenly over the matches in
            suffix order (so their continuations are a fair sample). Empty if ``query`` holds a non-token.
        """
        return self.positions(self.match(query), max_occurrences)

    def match(self, query: np.ndarray) -> Match:
        """Every occurrence of ``query`` ((m,) token ids, m >= 1) as a :class:`Match` of length m."""
        query = np.asarray(query)
        if query.ndim != 1 or len(query) == 0:
            raise ValueError(f"a query is a non-empty 1-D array of token ids, got shape {query.shape}")
        if np.any((query < 0) | (query >= self.separator)):
            return Match(length=len(query), count=0, intervals=tuple((0, 0) for _ in self.shards))
        pattern = query.astype(self.token_dtype).tobytes()
        intervals = tuple(shard.index.interval(pattern) for shard in self.shards)
        return Match(length=len(query), count=sum(hi - lo for lo, hi in intervals), intervals=intervals)

    def longest_match(self, context: np.ndarray, max_len: int, min_len: int = 1) -> Match:
        """The longest suffix of ``context`` ((c,) token ids) of ``min_len..max_len`` tokens that occurs.

        Shards are searched one after another, starting with the one that held the previous call's match
        (decoding tends to continue it). The first tries ``max_len`` (callers that know a tight bound make the
        common case one search a shard), then binary-searches the length. Every other shard is asked only
        whether it beats the best length so far: a suffix of an occurring suffix occurs, so a shard that
        lacks one token more than the best cannot, and is asked for the best itself (its share of the
        occurrences); one that has it is asked for ``max_len``, then binary-searched. Last, one upper-bound
        search per shard that holds the match. About two lower-bound searches per shard, the least an exact
        count allows without an index over shards, where asking every shard at every length of a binary
        search took log2(max_len) + 1 (``benchmarks/README.md``: 1, 8 and 64 shards). Returns a
        :class:`Match` of length 0 when no suffix of ``min_len`` tokens occurs (or ``max_len < min_len``).
        """
        if min_len < 1:
            raise ValueError(f"min_len must be at least 1, got {min_len}")
        tail = np.asarray(context)[max(len(context) - max_len, 0) :]
        if len(tail) and (tail.min() < 0 or tail.max() >= self.separator):  # ids no document holds end the match
            tail = tail[np.flatnonzero((tail < 0) | (tail >= self.separator))[-1] + 1 :]
        encoded, width = tail.astype(self.token_dtype).tobytes(), self.token_dtype.itemsize
        longest = len(tail)
        if longest < min_len:
            return Match(length=0, count=0, intervals=())
        # Per shard, the length and lower-bound rank of the longest suffix it was found to hold.
        held = [(0, 0)] * len(self.shards)

        def holds(number: int, length: int) -> bool:
            index, pattern = self.shards[number].index, encoded[len(encoded) - length * width :]
            rank = index.lower_bound(pattern)
            if index.starts_with(rank, pattern):
                held[number] = (length, rank)
                return True
            return False

        best = min_len - 1  # the longest length known to occur; min_len - 1 while none is
        first = self._last_match_shard
        for number in itertools.chain(range(first, len(self.shards)), range(first)):
            if best == longest:
                holds(number, longest)  # no shard can beat it: only where else it occurs is left to find
                continue
            if best < min_len:  # nothing found yet: the caller's bound first, then a binary search below it
                if holds(number, longest):
                    best = longest
                    continue
                shortest, longer = min_len - 1, longest - 1  # invariant: shortest occurs (or is min_len - 1)
            elif not holds(number, best + 1):
                holds(number, best)  # it cannot beat best; does it hold best too?
                continue
            elif best + 1 == longest or holds(number, longest):
                best = longest
                continue
            else:
                shortest, longer = best + 1, longest - 1
            while shortest < longer:
                middle = (shortest + longer + 1) // 2
                if holds(number, middle):
                    shortest = middle
                else:
                    longer = middle - 1
            best = max(best, shortest)
        if best < min_len:
            return Match(length=0, count=0, intervals=())
        pattern = encoded[len(encoded) - best * width :]
        intervals = tuple(
            (rank, shard.index.upper_bound(pattern, rank)) if length == best else (0, 0)
            for (length, rank), shard in zip(held, self.shards)
        )
        self._last_match_shard = next(number for number, (length, _) in enumerate(held) if length == best)
        return Match(length=best, count=sum(hi - lo for lo, hi in intervals), intervals=intervals)

    def positions(self, match: Match, max_occurrences: int) -> np.ndarray:
        """(k,) int64 global start positions of a match, ``k = min(match.count, max_occurrences)``.

        When there are more, the k are taken at even strides over the match's sorted suffixes, so that
        continuation counts estimate the continuation distribution rather than its smallest tokens.
        """
        if match.count == 0 or max_occurrences <= 0:
            return np.zeros(0, dtype=np.int64)
        if match.count <= max_occurrences:
            picks = np.arange(match.count, dtype=np.int64)
        else:
            picks = np.arange(max_occurrences, dtype=np.int64) * match.count // max_occurrences
        sizes = np.array([hi - lo for lo, hi in match.intervals], dtype=np.int64)
        bounds = np.concatenate(([0], np.cumsum(sizes)))
        cuts = np.searchsorted(picks, bounds)  # picks[cuts[s] : cuts[s + 1]] fall in shard s
        found = []
        for number in np.flatnonzero(cuts[1:] > cuts[:-1]).tolist():  # only the shards holding picks
            shard, (lo, hi) = self.shards[number], match.intervals[number]
            chosen = picks[cuts[number] : cuts[number + 1]] - bounds[number]
            starts = shard.index.suffixes[lo:hi][chosen].astype(np.int64)
            # An occurrence ends before the stream's closing separator; anything else is a damaged file.
            if len(starts) and (starts.min() < 0 or starts.max() + match.length >= len(shard.index)):
                bad = starts[(starts < 0) | (starts + match.length >= len(shard.index))][0]
                raise damaged(shard.path / SUFFIX_ARRAY, f"entry {int(bad)} is no occurrence of a "
                               f"{match.length}-token match in a {len(shard.index)}-token stream")
            found.append(starts + shard.offset)
        return np.concatenate(found)

    def continuations(self, positions: np.ndarray, length: int) -> np.ndarray:
        """The ``length`` tokens starting at each position, cut at the end of its document.

        Args:
            positions: (k,) global positions, e.g. ``positions(match, n) + match.length``.

        Returns:
            (k, length) int32 token ids, -1 from the first document separator on.
        """
        positions = np.asarray(positions, dtype=np.int64)
        out = np.full((len(positions), length), -1, dtype=np.int32)
        if len(positions) == 0 or length == 0:
            return out
        if positions.min() < 0 or positions.max() >= self.stream_length:
            raise ValueError(f"positions must lie in [0, {self.stream_length})")
        steps = np.arange(length, dtype=np.int64)
        if len(self.shards) == 1:
            groups = [(self.shards[0], slice(None))]
        else:
            shard_of = np.searchsorted(self._offsets, positions, side="right") - 1
            groups = [(self.shards[number], shard_of == number) for number in np.unique(shard_of).tolist()]
        for shard, rows in groups:
            # The stream ends with a separator, so clamping at its last position reads a separator.
            where = np.minimum(positions[rows, None] - shard.offset + steps, len(shard.index) - 1)
            window = shard.index.tokens[where].astype(np.int64)  # native, and wide enough for a '>u4' separator
            if np.any((window >= self.vocab_size) & (window != self.separator)):
                raise _out_of_vocabulary(shard.path / TOKENS, window, self.vocab_size, self.separator)
            window[np.logical_or.accumulate(window == self.separator, axis=1)] = -1
            out[rows] = window
        return out

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which document each global position falls in, and where.

        Returns:
            (k,) int64 document ids (rows of :meth:`documents`) and (k,) int64 offsets within the documents.
        """
        positions = np.asarray(positions, dtype=np.int64)
        documents = np.searchsorted(self._document_starts, positions, side="right") - 1
        return documents, positions - self._document_starts[documents]

    def documents(self) -> pa.Table:
        """One row per document: ``doc_id``, ``shard``, global ``start``, ``length``, ``source``, ``meta`` (JSON)."""
        tables = []
        for number, shard in enumerate(self.shards):
            table = _read_documents(shard.path / DOCUMENTS, shard.num_documents, len(shard.index))
            ids = np.arange(shard.first_document, shard.first_document + table.num_rows, dtype=np.int64)
            tables.append(
                pa.table(
                    {
                        "doc_id": ids,
                        "shard": np.full(table.num_rows, number, dtype=np.int32),
                        "start": table["start"].to_numpy() + shard.offset,
                        "length": table["length"],
                        "source": table["source"],
                        "meta": table["meta"],
                    }
                )
            )
        return pa.concat_tables(tables)

    def ngram_table(self) -> pa.Table:
        """The n-gram continuation tables of all shards, read and merged on each call.

        See :mod:`retrieval_spec.datastore.ngram_table` for the columns.
        """
        tables = [_read_ngrams(shard.path / NGRAMS, self.vocab_size, len(shard.index)) for shard in self.shards]
        return ngram_table.merge_continuations(tables, self.manifest["ngram_top_k"])

    def top_next_tokens(self, k: int) -> np.ndarray:
        """(vocab_size, k) int32 most frequent next tokens of every token, -1 padded (warm-starts recycling).

        Computed from the n-gram tables once per ``k`` and shared (read-only): every recycling drafter built on
        this datastore (one per row of a batch, one per generator) gets the same array without re-reading.
        """
        if k not in self._top_next:
            table = ngram_table.top_next_tokens(self.ngram_table(), self.vocab_size, k)
            table.setflags(write=False)
            self._top_next[k] = table
        return self._top_next[k]

    @cached_property
    def _document_starts(self) -> np.ndarray:
        starts = [
            _read_documents(shard.path / DOCUMENTS, shard.num_documents, len(shard.index))["start"].to_numpy()
            + shard.offset
            for shard in self.shards
        ]
        return np.concatenate(starts).astype(np.int64)


def _open_shard(
    index: Path, number: int, entry: dict[str, Any], dtype: np.dtype, offset: int, first_document: int
) -> Shard:
    """Map one shard of a checked manifest (:func:`read_manifest`) after checking its files' sizes and samples."""
    directory = inside(index, entry["path"], SHARD_FILES)
    for name in SHARD_FILES:
        check_file(directory / name, FileEntry(**entry["files"][name]))
    suffix_dtype = SUFFIX_ARRAY_DTYPES[entry["suffix_array_dtype"]]
    suffix_array = SuffixArray(_map(directory / TOKENS), _map(directory / SUFFIX_ARRAY), dtype, suffix_dtype)
    return Shard(directory, offset, suffix_array, first_document, entry["num_documents"])


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def damaged(path: Path, what: str) -> DatastoreFormatError:
    return DatastoreFormatError(f"{path}: {what}; the file is damaged, rebuild the index "
                                "(`retrieval-spec index-info --verify` checks every file)")


def _out_of_vocabulary(path: Path, tokens: np.ndarray, vocab_size: int, separator: int) -> DatastoreFormatError:
    bad = tokens[(tokens >= vocab_size) & (tokens != separator)]
    return damaged(path, f"holds token id {int(bad.flat[0])}, outside the vocabulary [0, {vocab_size})")


def read_parquet(path: Path, max_rows: int) -> pa.Table:
    """A whole Parquet file, its page checksums verified where it has them (every build since they exist).

    Its footer is read first: a file declaring more than ``max_rows`` rows (what its shard can hold, from the
    manifest) is refused before any page is decompressed, as one whose columns hold more than
    :data:`MAX_VALUES_PER_ROW` values a row.
    """
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as file:  # opened, its footer parsed, once
            metadata = file.metadata
            if metadata.num_rows > max_rows:
                raise damaged(path, f"{metadata.num_rows} rows, more than the {max_rows} its shard can hold")
            values = sum(metadata.row_group(group).column(column).num_values
                         for group in range(metadata.num_row_groups) for column in range(metadata.num_columns))
            if values > MAX_VALUES_PER_ROW * max(metadata.num_rows, 1):
                raise damaged(path, f"{values} values in {metadata.num_rows} rows")
            return file.read()
    except (pa.ArrowException, OSError) as error:
        raise damaged(path, f"not readable as Parquet ({' '.join(str(error).split())})") from None


def _read_ngrams(path: Path, vocab_size: int, stream_length: int) -> pa.Table:
    """A shard's n-gram table: at most one row per window of each order of its ``stream_length``-token stream."""
    table = read_parquet(path, len(ngram_table.ORDERS) * stream_length)
    try:
        ngram_table.check(table, vocab_size)
    except ValueError as error:
        raise damaged(path, str(error)) from None
    return table


def _read_documents(path: Path, num_documents: int, stream_length: int) -> pa.Table:
    """A shard's document table: ``num_documents`` rows, each document inside the stream."""
    table = read_parquet(path, num_documents)
    if not table.schema.equals(DOCUMENT_SCHEMA):
        raise damaged(path, f"columns {table.schema.names} of types {table.schema.types}, expected "
                             f"{DOCUMENT_SCHEMA.names} of types {DOCUMENT_SCHEMA.types}")
    if table.num_rows != num_documents:
        raise damaged(path, f"{table.num_rows} documents, the manifest records {num_documents}")
    starts, lengths = table["start"].to_numpy(), table["length"].to_numpy()
    if starts.min() < 1 or lengths.min() < 1 or (starts + lengths).max() >= stream_length:
        raise damaged(path, f"a document lies outside the {stream_length}-token stream")
    return table


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-serialisable summary of an index from its manifest (no file is read beyond it).

    Keys: path, format_version, tokenizer {name, vocab_size, sha256}, token_dtype, num_tokens, num_documents,
    num_shards, bytes_on_disk, bytes_per_token, build (seconds, created, inputs, ...), shards [{path,
    num_tokens, num_documents, bytes}].
    """
    path = Path(path)
    manifest = read_manifest(path)
    shards = [
        {
            "path": entry["path"],
            "num_tokens": entry["num_tokens"],
            "num_documents": entry["num_documents"],
            "bytes": sum(file["size"] for file in entry["files"].values()),
        }
        for entry in manifest["shards"]
    ]
    total_bytes = sum(shard["bytes"] for shard in shards)
    return {
        "path": str(path),
        "format_version": manifest["format_version"],
        "tokenizer": manifest["tokenizer"],
        "token_dtype": manifest["token_dtype"],
        "num_tokens": manifest["num_tokens"],
        "num_documents": manifest["num_documents"],
        "num_shards": len(shards),
        "bytes_on_disk": total_bytes,
        "bytes_per_token": total_bytes / max(manifest["num_tokens"], 1),
        "build": manifest.get("build", {}),
        "shards": shards,
    }


def check_integrity(path: str | Path) -> None:
    """Check every byte of an index: each file's sha256 against the manifest, then its contents (token ids
    within the vocabulary, suffix array entries within the stream, the Parquet tables as on first read).

    Raises:
        DatastoreFormatError: naming every damaged file, on one line.
    """
    path = Path(path)
    manifest = read_manifest(path)
    vocab_size, dtype = manifest["tokenizer"]["vocab_size"], np.dtype(manifest["token_dtype"])
    problems = []
    for number, entry in enumerate(manifest["shards"]):
        directory = inside(path, entry["path"], SHARD_FILES)
        for name in SHARD_FILES:
            try:
                check_file(directory / name, FileEntry(**entry["files"][name]), full=True)
                if name == TOKENS:
                    _check_stream(directory / name, dtype, vocab_size)
                elif name == SUFFIX_ARRAY:
                    _check_suffixes(directory / name, SUFFIX_ARRAY_DTYPES[entry["suffix_array_dtype"]])
                elif name == NGRAMS:
                    _read_ngrams(directory / name, vocab_size, entry["stream_length"])
                else:
                    _read_documents(directory / name, entry["num_documents"], entry["stream_length"])
            except DatastoreFormatError as error:
                problems.append(str(error))
    if problems:
        raise DatastoreFormatError(f"{path}: {len(problems)} damaged file(s): " + " | ".join(problems))


def _check_stream(path: Path, dtype: np.dtype, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Every token of a stream is an id of the vocabulary or the separator (read in chunks)."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    sep = separator(dtype)
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        if np.any((part >= vocab_size) & (part != sep)):
            raise _out_of_vocabulary(path, part, vocab_size, sep)


def _check_suffixes(path: Path, dtype: np.dtype, chunk: int = 1 << 24) -> None:
    """Every suffix array entry is a position of its stream (one entry per stream token)."""
    suffixes = np.memmap(path, dtype=dtype, mode="r")
    for start in range(0, len(suffixes), chunk):
        part = suffixes[start : start + chunk]
        if part.min() < 0 or part.max() >= len(suffixes):
            raise damaged(path, f"holds entries outside [0, {len(suffixes)})")
