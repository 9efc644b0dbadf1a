"""Build a datastore from a corpus or from token arrays: a map over shards and a small reduce, in bounded memory.

Plain functions, whatever runs them (:mod:`retrieval_spec.builders.parallel_map`: this process, local worker
processes or Ray tasks):

1. Plan (:func:`plan_slices`, in the driver): the corpus in reading order, cut into slices of about
   ``slice_bytes``: whole files, and JSONL files cut into byte ranges at line ends.
2. Map (:func:`tokenize_slice`): tokenize a slice into a chunk of token ids and document rows in the build's
   scratch directory. Token arrays given by the caller are written into chunks by the driver instead.
3. As chunks complete, in corpus order, the driver cuts the documents into shards: a shard closes at the first
   document boundary past ``shard_tokens``. The cut depends on the documents alone, so the same corpus and
   ``shard_tokens`` give the same shard files, byte for byte, whatever the number of workers or the backend
   (only the manifest's ``build`` record, with times and workers, differs).
4. Map (:func:`build_shard`): read a shard's documents from the chunks and write its token stream, suffix array,
   n-gram table and document table. A worker holds one shard at a time: about 20 bytes per token while its
   suffix array is sorted.
5. Reduce (in the driver): write the extras (``build-index --dense``'s passages) beside the shards, list
   them all in one manifest and publish atomically (:mod:`retrieval_spec.builders.publish`). The n-gram
   tables stay per shard and are merged by the reader, once per process (``Datastore.top_next_tokens``:
   0.1-0.25 s at 1M tokens in 1 to 64 shards, ``benchmarks/README.md``). A merged table written here would
   save only that, would tie the shards together (``merge_indexes`` reuses them as they are), and would be
   as lossy: each shard keeps its own top-k.

Every task writes only under the staging directory inside the index directory, which every worker must reach
at the same path; publishing is the only step that touches the published index. A task whose worker dies is
run again, up to :data:`MAX_ATTEMPTS` times in all; a build that fails or is interrupted leaves the previous
index as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from retrieval_spec.builders.corpus import JSONL_SUFFIXES, Corpus, Record
from retrieval_spec.builders.parallel_map import Backend, WorkerDied, make_backend
from retrieval_spec.builders.publish import Staging
from retrieval_spec.builders.shard import ShardBuffer
from retrieval_spec.datastore.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARD_FILES,
    Tokenizer,
    TokenizerFingerprint,
    as_token_ids,
    check_token_ids,
    token_dtype,
    tokenizer_fingerprint,
)
from retrieval_spec.datastore.ngram_table import MAX_VOCAB_SIZE
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.errors import BuildError, InputError, TokenizerMismatchError

# Sorting a shard's suffixes peaks near 20 bytes per token: 2**27 tokens stay under ~3 GiB.
DEFAULT_SHARD_TOKENS = 1 << 27
# A tokenization task: long enough (tens of seconds) that unpickling the tokenizer is lost in it, short enough
# that the workers share a corpus evenly. It does not change the index.
DEFAULT_SLICE_BYTES = 1 << 26
NGRAM_TOP_K = 8
NGRAM_MIN_COUNT = 2
# A fast tokenizer holds about 140 bytes per character of a batch: 1 Mi characters keep a call near 150 MB.
BATCH_CHARS = 1 << 20
# A task whose worker process died is run this many times in all before the build gives up.
MAX_ATTEMPTS = 3
# For tests: "K" or "K:N" makes the first N (default 1) attempts to build shard K exit their worker process.
# Read by the driver and carried by the task, so it reaches Ray workers on other nodes; in-process builds
# ignore it (there is no worker to lose).
FAIL_SHARD_ENV = "RETRIEVAL_SPEC_FAIL_SHARD"
SCRATCH = ".work"  # chunks of tokenized documents, inside the staging directory; removed before publishing


class CorpusTokenizer(Tokenizer, Protocol):
    """A tokenizer that can also tokenize batches and render chats (a transformers tokenizer)."""

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]: ...

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> str: ...


@dataclass(frozen=True)
class BuildSummary:
    """What a build or merge produced.

    Attributes:
        path: the index directory.
        tokens: document tokens indexed (separators not counted).
        documents: documents indexed (empty ones are dropped).
        shards: shards in the index.
        seconds: wall-clock time of the build.
        skipped_lines: malformed JSONL lines skipped (``skip_bad_lines``).
        skipped_files: files in input directories skipped because they are not UTF-8 text.
        workers: tasks that ran at once.
        backend: what ran them: ``in-process``, ``local`` (worker processes) or ``ray``.
        extras: the manifest records of the extras published with the shards (``build_index(extras=...)``).
    """

    path: Path
    tokens: int
    documents: int
    shards: int
    seconds: float
    skipped_lines: int = 0
    skipped_files: int = 0
    workers: int = 1
    backend: str = "in-process"
    extras: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


# Writes an extra index into the folder it is given (inside the build's staging generation) and returns its
# manifest record; see build_index(extras=...).
ExtraWriter = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class _Document:
    tokens: np.ndarray  # (m,) token ids
    source: str
    meta: str


@dataclass(frozen=True)
class Piece:
    """A file of the corpus, or the lines of a JSONL file in bytes ``[start, end)`` (``end`` at a line end).

    ``path`` is as the user gave it (documents are named after it); a relative one is read from the driver's
    working directory.
    """

    path: str
    in_directory: bool
    start: int = 0
    end: int | None = None
    first_line: int = 1


@dataclass(frozen=True)
class TokenizeOptions:
    """What every tokenization task needs besides its slice and the tokenizer."""

    text_field: str
    skip_bad_lines: bool
    batch_size: int
    vocab_size: int
    token_dtype: str
    working_directory: str


@dataclass(frozen=True)
class Chunk:
    """Documents written to the scratch directory as ``chunk-NNNNN.tokens`` (ids) and ``chunk-NNNNN.parquet``
    (``length``, ``source``, ``meta``), in corpus order.

    Attributes:
        number: its place in the corpus.
        lengths: (d,) int64 tokens of each document (empty documents are dropped).
        skipped_lines, skipped_files: what reading its slice skipped.
    """

    number: int
    lengths: np.ndarray
    skipped_lines: int = 0
    skipped_files: int = 0


@dataclass(frozen=True)
class ShardTask:
    """One shard to build: its documents are ``parts``, ``(chunk, first document, end document)`` in order.

    ``fail_attempts`` is the test hook of :data:`FAIL_SHARD_ENV` (0 otherwise).
    """

    number: int
    parts: tuple[tuple[int, int, int], ...]
    num_tokens: int
    fail_attempts: int = 0


def build_index(
    inputs: Sequence[str | Path],
    out: str | Path,
    tokenizer: CorpusTokenizer,
    *,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_size: int = 64,
    force: bool = False,
    skip_bad_lines: bool = False,
    progress: bool = True,
    workers: int | None = 1,
    ray_address: str | None = None,
    slice_bytes: int = DEFAULT_SLICE_BYTES,
    extras: Mapping[str, ExtraWriter] | None = None,
) -> BuildSummary:
    """Tokenize a corpus and write it as a datastore at ``out``.

    Args:
        inputs: JSONL files, text files and directories (see :mod:`retrieval_spec.builders.corpus`).
        out: the index directory; created, or replaced when ``force``.
        tokenizer: tokenizes with ``tokenizer(texts, add_special_tokens=False)["input_ids"]``; its fingerprint
            is recorded so that the index is refused for another tokenizer. Pickled to every worker.
        text_field: the JSONL field holding the text.
        shard_tokens: tokens per shard (a shard closes at the first document boundary past it).
        batch_size: texts per tokenizer call.
        force: replace an existing index at ``out``.
        skip_bad_lines: skip and count malformed JSONL lines instead of failing.
        progress: show a tqdm bar with tokens/s.
        workers: tasks at once: 1 runs in this process, more in as many local processes; ``None``: one per
            core (or per CPU of the Ray cluster).
        ray_address: run the tasks on Ray: ``"local"`` starts it here (or joins ``RAY_ADDRESS``), else an
            address for ``ray.init``. ``out`` must then be reachable at the same path from every node.
        slice_bytes: input bytes per tokenization task (does not change the index).
        extras: indexes built beside the shards and published with them in one commit (readers see the old
            index and its extras or the new ones, never a mix): ``{name: write}``, where ``write(folder)`` fills
            ``folder`` (``gen-<id>/<name>`` once published) and returns its manifest record, kept in the
            manifest under ``name`` with ``"path"`` added. A write that fails fails the build.

    Raises:
        InputError: a missing input, a malformed line (naming ``file:line``), an existing index without
            ``force``, or a corpus without any token.
        BuildError: a task whose worker died :data:`MAX_ATTEMPTS` times, or Ray missing or out of reach.
    """
    corpus = Corpus(
        inputs,
        lambda messages: tokenizer.apply_chat_template(messages, tokenize=False),
        text_field=text_field,
        skip_bad_lines=skip_bad_lines,
        exclude=[out],
    )
    fingerprint = tokenizer_fingerprint(tokenizer)
    options = TokenizeOptions(
        text_field=text_field,
        skip_bad_lines=skip_bad_lines,
        batch_size=batch_size,
        vocab_size=fingerprint.vocab_size,
        token_dtype=token_dtype(fingerprint.vocab_size).str,
        working_directory=os.getcwd(),
    )
    slices = plan_slices(corpus, slice_bytes)
    return _build(
        Path(out),
        fingerprint,
        slices=slices,
        skipped_files=corpus.skipped_files,
        tokenizer=tokenizer,
        options=options,
        inputs=[str(path) for path in inputs],
        shard_tokens=shard_tokens,
        force=force,
        progress=progress,
        workers=workers,
        ray_address=ray_address,
        extras=extras,
    )


def build_index_from_tokens(
    documents: Iterable[np.ndarray],
    out: str | Path,
    fingerprint: TokenizerFingerprint,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    progress: bool = True,
    workers: int | None = 1,
    ray_address: str | None = None,
    extras: Mapping[str, ExtraWriter] | None = None,
) -> BuildSummary:
    """Write already tokenized documents ((m,) integer arrays, ids below ``fingerprint.vocab_size``) as a datastore.

    Same contract as :func:`build_index`; documents have no source or metadata. This process reads them and
    writes them into chunks; the shards are built by the workers.
    """
    return _build(
        Path(out),
        fingerprint,
        documents=documents,
        inputs=[],
        shard_tokens=shard_tokens,
        force=force,
        progress=progress,
        workers=workers,
        ray_address=ray_address,
        extras=extras,
    )


def merge_indexes(indexes: Sequence[str | Path], out: str | Path, *, force: bool = False) -> BuildSummary:
    """Make one index at ``out`` whose shards are those of ``indexes``, in order (hard links where possible).

    Raises:
        TokenizerMismatchError: the indexes were built with different tokenizers.
        DatastoreFormatError: an input index fails its checks.
    """
    started = time.perf_counter()
    if not indexes:
        raise InputError("merge_indexes needs at least one index")
    datastores = [Datastore.open(path) for path in indexes]
    first = datastores[0]
    for other in datastores[1:]:
        if other.fingerprint.sha256 != first.fingerprint.sha256:
            raise TokenizerMismatchError(
                f"cannot merge {first.path} (tokenizer {first.fingerprint.name!r}) with {other.path} "
                f"(tokenizer {other.fingerprint.name!r}): their vocabularies differ"
            )
    out = Path(out)
    with Staging(out, force=force) as staging:
        entries = _link_shards(datastores, staging.directory)
        build = {
            "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "merged_from": [str(d.path) for d in datastores],
        }
        top_k = max(int(d.manifest["ngram_top_k"]) for d in datastores)
        manifest = _manifest(first.fingerprint, first.token_dtype, entries, build, top_k, staging.generation)
        staging.commit(manifest)
    return _summary(out, manifest, started)


def add_extra(index: str | Path, name: str, write: ExtraWriter) -> dict[str, Any]:
    """Publish ``index`` again with an extra index ``name`` written by ``write`` (as ``build_index(extras=...)``
    takes it), replacing one of that name, in one commit; its shards are hard-linked into the new generation
    (copied across file systems). Returns the extra's manifest record.

    Raises:
        DatastoreFormatError: ``index`` is not a datastore, or fails its checks.
    """
    index = Path(index)
    with Staging(index, force=True) as staging:  # the lock first: no build replaces the shards being linked
        datastore = Datastore.open(index)
        record = _write_extra(staging, name, write)
        entries = _link_shards([datastore], staging.directory)
        manifest = {**datastore.manifest, name: record,
                    "shards": [{**entry, "path": f"{staging.generation}/{entry['path']}"} for entry in entries]}
        staging.commit(manifest)
    return record


def plan_slices(corpus: Corpus, slice_bytes: int) -> list[tuple[Piece, ...]]:
    """Cut a corpus, in reading order, into slices of at least ``slice_bytes`` (but the last).

    Deterministic: it depends on the files' bytes alone. JSONL files are read once here to cut them at line
    ends and to number their lines; other files are one document each and are never cut.
    """
    if slice_bytes < 1:
        raise InputError(f"slice_bytes must be positive, got {slice_bytes}")
    slices: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    size = 0
    for path, in_directory in corpus.files():
        try:
            if path.suffix.lower() in JSONL_SUFFIXES:
                pieces = _jsonl_ranges(path, in_directory, slice_bytes)
            else:
                pieces = [(Piece(str(path), in_directory), path.stat().st_size)]
        except OSError as error:  # gone or unreadable since the listing
            corpus.unreadable(path, in_directory, f"cannot be read ({error.strerror})")
            continue
        for piece, piece_bytes in pieces:
            current.append(piece)
            size += piece_bytes
            if size >= slice_bytes:
                slices.append(tuple(current))
                current, size = [], 0
    if current:
        slices.append(tuple(current))
    return slices


def _jsonl_ranges(path: Path, in_directory: bool, slice_bytes: int) -> list[tuple[Piece, int]]:
    """Byte ranges of about ``slice_bytes`` that end at line ends, with their first line numbers."""
    ranges = []
    start, line = 0, 1
    with open(path, "rb") as f:
        while block := f.read(slice_bytes):
            if not block.endswith(b"\n"):
                block += f.readline()  # finish the line
            ranges.append((Piece(str(path), in_directory, start, start + len(block), line), len(block)))
            start += len(block)
            line += block.count(b"\n")
    return ranges


def tokenize_slice(
    number: int, pieces: tuple[Piece, ...], tokenizer: CorpusTokenizer, options: TokenizeOptions, scratch: str
) -> Chunk:
    """Map: tokenize the documents of one slice into chunk ``number`` of the directory ``scratch``.

    Raises:
        InputError: a malformed line (unless ``options.skip_bad_lines``), a named file that is not text, or a
            token id outside the vocabulary.
    """
    dtype = np.dtype(options.token_dtype)
    corpus = Corpus(
        [],
        lambda messages: tokenizer.apply_chat_template(messages, tokenize=False),
        text_field=options.text_field,
        skip_bad_lines=options.skip_bad_lines,
    )
    lengths, sources, metas = [], [], []
    tokens_path, table_path = _chunk_paths(Path(scratch), number)
    relative = any(not Path(piece.path).is_absolute() for piece in pieces)
    with _working_directory(options.working_directory if relative else None), open(tokens_path, "wb") as out:
        records = itertools.chain.from_iterable(
            corpus.read(Path(piece.path), in_directory=piece.in_directory, start=piece.start, end=piece.end,
                        first_line=piece.first_line)
            for piece in pieces
        )
        for document in _tokenize(records, tokenizer, options.batch_size):
            if len(document.tokens) == 0:
                continue
            check_token_ids(document.tokens, options.vocab_size, document.source or "a document")
            document.tokens.astype(dtype).tofile(out)
            lengths.append(len(document.tokens))
            sources.append(document.source)
            metas.append(document.meta)
    pq.write_table(pa.table({"length": pa.array(lengths, pa.int64()), "source": sources, "meta": metas},
                            schema=_CHUNK_SCHEMA), table_path)
    return Chunk(number, np.array(lengths, dtype=np.int64), corpus.skipped_lines, corpus.skipped_files)


def build_shard(task: ShardTask, scratch: str, out: str, dtype_name: str, vocab_size: int) -> dict[str, Any]:
    """Map: write shard ``task.number`` into ``out`` from its documents in the chunks under ``scratch``.

    Returns:
        its manifest entry (``path`` is the shard directory's name).
    """
    directory = Path(out) / f"shard-{task.number:05d}"
    if task.fail_attempts:
        _fail_if_asked(task, Path(scratch))
    if directory.exists():
        shutil.rmtree(directory)  # written in part by an attempt whose worker died
    dtype = np.dtype(dtype_name)
    buffer = ShardBuffer(dtype, vocab_size)
    for chunk, first, end in task.parts:
        tokens_path, table_path = _chunk_paths(Path(scratch), chunk)
        table = pq.read_table(table_path)
        offsets = np.concatenate(([0], np.cumsum(table["length"].to_numpy())))
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r")  # the buffer keeps views, read once when written
        sources, metas = table["source"].to_pylist(), table["meta"].to_pylist()
        for document in range(first, end):
            buffer.add(tokens[offsets[document] : offsets[document + 1]], sources[document], metas[document])
    return buffer.write(directory, ngram_top_k=NGRAM_TOP_K, ngram_min_count=NGRAM_MIN_COUNT)


_CHUNK_SCHEMA = pa.schema([("length", pa.int64()), ("source", pa.string()), ("meta", pa.string())])


def _chunk_paths(scratch: Path, number: int) -> tuple[Path, Path]:
    return scratch / f"chunk-{number:05d}.tokens", scratch / f"chunk-{number:05d}.parquet"


def _write_chunks(
    documents: Iterable[np.ndarray], scratch: Path, dtype: np.dtype, vocab_size: int, chunk_tokens: int
) -> Iterator[Chunk]:
    """The driver's side of a build from token arrays: write them into chunks of about ``chunk_tokens``."""
    numbers = itertools.count()
    records = (_Document(as_token_ids(tokens, vocab_size, f"document {number}"), "", "")
               for number, tokens in enumerate(documents))
    records = (record for record in records if len(record.tokens))
    while (first := next(records, None)) is not None:
        number = next(numbers)
        tokens_path, table_path = _chunk_paths(scratch, number)
        lengths, total = [], 0
        with open(tokens_path, "wb") as out:
            for record in itertools.chain([first], records):
                record.tokens.astype(dtype).tofile(out)
                lengths.append(len(record.tokens))
                total += len(record.tokens)
                if total >= chunk_tokens:
                    break
        empty = [""] * len(lengths)
        pq.write_table(pa.table({"length": pa.array(lengths, pa.int64()), "source": empty, "meta": empty},
                                schema=_CHUNK_SCHEMA), table_path)
        yield Chunk(number, np.array(lengths, dtype=np.int64))


class _ShardCutter:
    """Cuts the documents of chunks fed in corpus order into shards that close at the first document boundary
    at or past ``shard_tokens``: the rule of a serial build, so the shards do not depend on the chunks."""

    def __init__(self, shard_tokens: int) -> None:
        self.shard_tokens = shard_tokens
        self.total_tokens = 0
        self.num_shards = 0
        self.open_chunks: set[int] = set()  # chunks that the shard being filled reads
        self._parts: list[tuple[int, int, int]] = []
        self._tokens = 0

    def add(self, chunk: Chunk) -> list[ShardTask]:
        """The shards that ``chunk``'s documents close."""
        closed = []
        cumulative = np.cumsum(chunk.lengths)
        self.total_tokens += int(cumulative[-1]) if len(cumulative) else 0
        first, base = 0, 0
        while first < len(cumulative):
            # The first document at which the open shard reaches shard_tokens, or the chunk's end.
            last = first + int(np.searchsorted(cumulative[first:], self.shard_tokens - self._tokens + base))
            end = min(last + 1, len(cumulative))
            self._parts.append((chunk.number, first, end))
            self.open_chunks.add(chunk.number)
            self._tokens += int(cumulative[end - 1]) - base
            first, base = end, int(cumulative[end - 1])
            if self._tokens >= self.shard_tokens:
                closed.append(self._close())
        return closed

    def finish(self) -> list[ShardTask]:
        """The last shard, once every chunk has been added."""
        return [self._close()] if self._parts else []

    def _close(self) -> ShardTask:
        task = ShardTask(self.num_shards, tuple(self._parts), self._tokens)
        self.num_shards += 1
        self._parts, self._tokens, self.open_chunks = [], 0, set()
        return task


def _build(
    out: Path,
    fingerprint: TokenizerFingerprint,
    *,
    slices: list[tuple[Piece, ...]] | None = None,
    tokenizer: CorpusTokenizer | None = None,
    options: TokenizeOptions | None = None,
    documents: Iterable[np.ndarray] | None = None,
    skipped_files: int = 0,
    inputs: list[str],
    shard_tokens: int,
    force: bool,
    progress: bool,
    workers: int | None,
    ray_address: str | None,
    extras: Mapping[str, ExtraWriter] | None = None,
) -> BuildSummary:
    """Run the maps and the reduce: tokenize ``slices`` on the workers, or write ``documents`` into chunks here.

    ``skipped_files`` counts the files that planning the slices skipped (unlistable folders, unreadable files).
    """
    started = time.perf_counter()
    if shard_tokens < 1:
        raise InputError(f"shard_tokens must be positive, got {shard_tokens}")
    if fingerprint.vocab_size > MAX_VOCAB_SIZE:
        raise InputError(f"vocabulary of {fingerprint.vocab_size} tokens; datastores hold at most {MAX_VOCAB_SIZE}")
    dtype = token_dtype(fingerprint.vocab_size)
    with (
        Staging(out, force=force) as staging,
        _started(workers, ray_address) as backend,
        tqdm(unit="tok", unit_scale=True, disable=not progress) as bar,
    ):
        bar.set_description(f"indexing into {out}")
        driver = _Driver(out, backend, staging.directory.absolute(), dtype, fingerprint.vocab_size, shard_tokens, bar)
        driver.skipped_files = skipped_files
        if documents is not None:
            driver.chunks = _write_chunks(documents, driver.scratch, dtype, fingerprint.vocab_size, shard_tokens)
        else:
            driver.tokenize(slices or [], backend.share(tokenizer), options)
        entries = driver.run()
        if not entries:
            skipped = f" ({driver.skipped_lines} malformed lines skipped)" if driver.skipped_lines else ""
            where = ", ".join(inputs) or "the documents given"
            raise InputError(f"empty corpus: no document with at least one token in {where}{skipped}")
        shutil.rmtree(driver.scratch)
        build = {
            "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": inputs,
            "shard_tokens": shard_tokens,
            "ngram_min_count": NGRAM_MIN_COUNT,
            "workers": backend.workers,
            "backend": backend.name,
        }
        manifest = _manifest(fingerprint, dtype, entries, build, NGRAM_TOP_K, staging.generation)
        for name, write in (extras or {}).items():
            manifest[name] = _write_extra(staging, name, write)
        staging.commit(manifest)
    return _summary(out, manifest, started, driver.skipped_lines, driver.skipped_files, backend, extras)


class _Driver:
    """The driver's side of the maps: keeps the workers busy (shards before slices: each built shard finishes
    work and frees scratch space), cuts chunks into shards in corpus order as they arrive, runs a task again
    when its worker died, and collects the shards' manifest entries.

    Chunks come from tokenization tasks (:meth:`tokenize`) or from :attr:`chunks`, an iterator that writes
    one chunk in this process each time it is advanced (the documents of a build from token arrays).

    Attributes:
        scratch: where chunks are written, inside the staging directory.
        skipped_lines, skipped_files: what reading the corpus skipped.
    """

    def __init__(
        self, out: Path, backend: Backend, target: Path, dtype: np.dtype, vocab_size: int, shard_tokens: int, bar: tqdm
    ) -> None:
        self.out, self.backend, self.target, self.bar = out, backend, target, bar
        self.scratch = target / SCRATCH
        self.scratch.mkdir()
        self.chunks: Iterator[Chunk] | None = None
        self.skipped_lines = self.skipped_files = 0
        self._shard_arguments = (str(self.scratch), str(target), dtype.str, vocab_size)
        self._tokenize_arguments: tuple[Any, ...] = ()
        self._cutter = _ShardCutter(shard_tokens)
        self._to_tokenize: deque[tuple[int, tuple[Piece, ...]]] = deque()
        self._num_slices = 0
        self._arrived: dict[int, Chunk] = {}  # chunks tokenized out of order, waiting for those before them
        self._next_chunk = 0
        self._to_build: deque[ShardTask] = deque()
        self._readers: Counter[int] = Counter()  # shards not yet built that read each chunk
        self._running: dict[Future, ShardTask | tuple[int, tuple[Piece, ...]]] = {}
        self._attempts: Counter[str] = Counter()
        self._entries: dict[int, dict[str, Any]] = {}
        self._fail_shard = _injected_failure() if backend.name != "in-process" else (-1, 0)

    def tokenize(self, slices: list[tuple[Piece, ...]], tokenizer: Any, options: TokenizeOptions | None) -> None:
        """Take the chunks from tasks that tokenize ``slices`` (``tokenizer`` as shared by the backend)."""
        self._to_tokenize.extend(enumerate(slices))
        self._num_slices = len(slices)
        self._tokenize_arguments = (tokenizer, options, str(self.scratch))
        if not slices:
            self._take_last()

    def run(self) -> list[dict[str, Any]]:
        """Run every task; the shards' manifest entries in shard order."""
        while self._fill():
            self._settle()
        return [self._entries[number] for number in sorted(self._entries)]

    def _fill(self) -> bool:
        """Start tasks until every worker is busy; False once nothing runs and nothing is left to start."""
        while len(self._running) < self.backend.workers:
            if self._to_build:
                task = self._to_build.popleft()
                self._running[self.backend.submit(build_shard, task, *self._shard_arguments)] = task
            elif self._to_tokenize:
                job = self._to_tokenize.popleft()
                self._running[self.backend.submit(tokenize_slice, *job, *self._tokenize_arguments)] = job
            elif self.chunks is not None:
                chunk = next(self.chunks, None)
                if chunk is None:
                    self.chunks = None
                    self._take_last()
                else:
                    self._take(chunk)
            else:
                break
        return bool(self._running)

    def _settle(self) -> None:
        """Wait for tasks to end: record built shards, take tokenized chunks in corpus order, queue again what a
        dead worker was running (:data:`MAX_ATTEMPTS` times in all)."""
        done, _ = wait(self._running, return_when=FIRST_COMPLETED)
        for future in done:
            job = self._running.pop(future)
            name = f"shard {job.number}" if isinstance(job, ShardTask) else f"corpus slice {job[0]}"
            try:
                result = future.result()
            except WorkerDied as error:
                self._attempts[name] += 1
                if self._attempts[name] >= MAX_ATTEMPTS:
                    raise BuildError(
                        f"building {self.out}: the worker running {name} died {self._attempts[name]} times "
                        f"({error}); the previous index, if any, is unchanged"
                    ) from None
                (self._to_build if isinstance(job, ShardTask) else self._to_tokenize).appendleft(job)
                continue
            if isinstance(job, ShardTask):
                self._entries[job.number] = result
                self.bar.update(job.num_tokens)
                self._release(job)
                continue
            self._arrived[result.number] = result
            while self._next_chunk in self._arrived:
                self._take(self._arrived.pop(self._next_chunk))
                self._next_chunk += 1
            if self._next_chunk == self._num_slices:
                self._take_last()

    def _take(self, chunk: Chunk) -> None:
        """The next chunk in corpus order: count what it skipped, queue the shards it closes."""
        self.skipped_lines += chunk.skipped_lines
        self.skipped_files += chunk.skipped_files
        self._queue(self._cutter.add(chunk))
        if not len(chunk.lengths):
            _remove_chunk(self.scratch, chunk.number)
        self.bar.set_postfix_str(f"tokenized {self._cutter.total_tokens:,}", refresh=False)

    def _take_last(self) -> None:
        """Every chunk has been taken: queue the last shard."""
        self._queue(self._cutter.finish())
        self.bar.total = self._cutter.total_tokens
        self.bar.refresh()

    def _queue(self, tasks: list[ShardTask]) -> None:
        for task in tasks:
            self._readers.update(part[0] for part in task.parts)
            if task.number == self._fail_shard[0]:
                task = dataclasses.replace(task, fail_attempts=self._fail_shard[1])
            self._to_build.append(task)

    def _release(self, built: ShardTask) -> None:
        """Remove the chunks that no shard will read any more."""
        for chunk_number, _, _ in built.parts:
            self._readers[chunk_number] -= 1
            if not self._readers[chunk_number] and chunk_number not in self._cutter.open_chunks:
                _remove_chunk(self.scratch, chunk_number)


@contextlib.contextmanager
def _started(workers: int | None, ray_address: str | None) -> Iterator[Backend]:
    """A backend for the build; on any exception its running tasks are stopped before the staging directory
    they write into is removed."""
    backend = make_backend(workers, ray_address)
    try:
        yield backend
    except BaseException:
        backend.close(abort=True)
        raise
    backend.close(abort=False)


def _injected_failure() -> tuple[int, int]:
    """(shard, attempts) from :data:`FAIL_SHARD_ENV`, or (-1, 0)."""
    spec = os.environ.get(FAIL_SHARD_ENV, "")
    if not spec:
        return -1, 0
    shard, _, times = spec.partition(":")
    return int(shard), int(times or 1)


def _fail_if_asked(task: ShardTask, scratch: Path) -> None:
    """The test hook: exit this worker process unless ``task.fail_attempts`` attempts already did."""
    marker = scratch / f"failed-shard-{task.number:05d}"
    failed = int(marker.read_text()) if marker.exists() else 0
    if failed < task.fail_attempts:
        marker.write_text(str(failed + 1))
        os._exit(1)


def _remove_chunk(scratch: Path, number: int) -> None:
    for path in _chunk_paths(scratch, number):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _working_directory(path: str | None) -> Iterator[None]:
    """Read relative input paths from the driver's working directory (a Ray worker has its own)."""
    previous = os.getcwd()
    if path is None or previous == path:
        yield
        return
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _summary(
    out: Path,
    manifest: dict[str, Any],
    started: float,
    skipped_lines: int = 0,
    skipped_files: int = 0,
    backend: Backend | None = None,
    extras: Mapping[str, ExtraWriter] | None = None,
) -> BuildSummary:
    return BuildSummary(
        path=out,
        tokens=manifest["num_tokens"],
        documents=manifest["num_documents"],
        shards=len(manifest["shards"]),
        seconds=time.perf_counter() - started,
        skipped_lines=skipped_lines,
        skipped_files=skipped_files,
        workers=backend.workers if backend else 1,
        backend=backend.name if backend else "in-process",
        extras={name: manifest[name] for name in extras or {}},
    )


def _tokenize(records: Iterable[Record], tokenizer: CorpusTokenizer, batch_size: int) -> Iterator[_Document]:
    records = iter(records)
    while batch := _next_batch(records, batch_size):
        ids = tokenizer([record.text for record in batch], add_special_tokens=False)["input_ids"]
        lengths = [len(row) for row in ids]
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(lengths))
        for record, tokens in zip(batch, np.split(flat, np.cumsum(lengths)[:-1])):
            yield _Document(tokens, record.source, record.meta)


def _next_batch(records: Iterator[Record], batch_size: int) -> list[Record]:
    """Up to ``batch_size`` records, fewer once they hold :data:`BATCH_CHARS` characters (tokenizer memory)."""
    batch, chars = [], 0
    for record in records:
        batch.append(record)
        chars += len(record.text)
        if len(batch) == batch_size or chars >= BATCH_CHARS:
            break
    return batch


def _manifest(
    fingerprint: TokenizerFingerprint,
    dtype: np.dtype,
    entries: list[dict[str, Any]],
    build: dict[str, Any],
    ngram_top_k: int,
    generation: str,
) -> dict[str, Any]:
    """The manifest of shards written under a staging directory published as ``generation``."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": fingerprint.to_json(),
        "token_dtype": dtype.str,
        "num_tokens": sum(entry["num_tokens"] for entry in entries),
        "num_documents": sum(entry["num_documents"] for entry in entries),
        "ngram_top_k": ngram_top_k,
        "build": build,
        "shards": [{**entry, "path": f"{generation}/{entry['path']}"} for entry in entries],
    }


def _write_extra(staging: Staging, name: str, write: ExtraWriter) -> dict[str, Any]:
    """Run an extra's writer into ``staging``'s folder ``name``; its manifest record, with its published path."""
    folder = staging.directory / name
    folder.mkdir()
    return {**write(folder), "path": f"{staging.generation}/{name}"}


def _link_shards(datastores: Sequence[Datastore], directory: Path) -> list[dict[str, Any]]:
    """Link (or copy) the shards of ``datastores``, in order, into ``directory`` as ``shard-00000``, ...; their
    manifest entries with ``path`` the new shard folder's name."""
    entries = []
    for datastore in datastores:
        for shard, entry in zip(datastore.shards, datastore.manifest["shards"]):
            target = directory / f"shard-{len(entries):05d}"
            target.mkdir()
            for name in SHARD_FILES:
                _link_or_copy(shard.path / name, target / name)
            entries.append({**entry, "path": target.name})
    return entries


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link an immutable shard file (same file system), else copy it and fsync the copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())
