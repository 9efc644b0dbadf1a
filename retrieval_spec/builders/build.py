"""Build a datastore from a corpus or from token arrays, or merge datastores built apart, in bounded memory.

Documents stream in; once ``shard_tokens`` have been collected the shard is written (token stream, suffix
array, n-gram table, document table) and freed before more input is read, so memory stays near the cost of
one shard (about 20 bytes per token while its suffix array is sorted). The index appears atomically at the
end (:mod:`retrieval_spec.builders.publish`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from retrieval_spec.builders.corpus import Corpus, Record
from retrieval_spec.builders.publish import Staging
from retrieval_spec.builders.shard import ShardBuffer
from retrieval_spec.datastore.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARD_FILES,
    Tokenizer,
    TokenizerFingerprint,
    token_dtype,
    tokenizer_fingerprint,
)
from retrieval_spec.datastore.ngram_table import MAX_VOCAB_SIZE
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.errors import InputError, TokenizerMismatchError

# Sorting a shard's suffixes peaks near 20 bytes per token: 2**27 tokens stay under ~3 GiB.
DEFAULT_SHARD_TOKENS = 1 << 27
NGRAM_TOP_K = 8
NGRAM_MIN_COUNT = 2
# A fast tokenizer holds about 140 bytes per character of a batch: 1 Mi characters keep a call near 150 MB.
BATCH_CHARS = 1 << 20


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
    """

    path: Path
    tokens: int
    documents: int
    shards: int
    seconds: float
    skipped_lines: int = 0
    skipped_files: int = 0


@dataclass(frozen=True)
class _Document:
    tokens: np.ndarray  # (m,) token ids
    source: str
    meta: str


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
) -> BuildSummary:
    """Tokenize a corpus and write it as a datastore at ``out``.

    Args:
        inputs: JSONL files, text files and directories (see :mod:`retrieval_spec.builders.corpus`).
        out: the index directory; created, or replaced when ``force``.
        tokenizer: tokenizes with ``tokenizer(texts, add_special_tokens=False)["input_ids"]``; its fingerprint
            is recorded so that the index is refused for another tokenizer.
        text_field: the JSONL field holding the text.
        shard_tokens: tokens per shard (a shard closes at the first document boundary past it).
        batch_size: texts per tokenizer call.
        force: replace an existing index at ``out``.
        skip_bad_lines: skip and count malformed JSONL lines instead of failing.
        progress: show a tqdm bar with tokens/s.

    Raises:
        InputError: a missing input, a malformed line (naming ``file:line``), an existing index without
            ``force``, or a corpus without any token.
    """
    corpus = Corpus(
        inputs,
        lambda messages: tokenizer.apply_chat_template(messages, tokenize=False),
        text_field=text_field,
        skip_bad_lines=skip_bad_lines,
        exclude=[out],
    )
    return _build(
        _tokenize(corpus, tokenizer, batch_size),
        Path(out),
        tokenizer_fingerprint(tokenizer),
        inputs=[str(path) for path in inputs],
        shard_tokens=shard_tokens,
        force=force,
        progress=progress,
        corpus=corpus,
    )


def build_index_from_tokens(
    documents: Iterable[np.ndarray],
    out: str | Path,
    fingerprint: TokenizerFingerprint,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    progress: bool = True,
) -> BuildSummary:
    """Write already tokenized documents ((m,) integer arrays, ids below ``fingerprint.vocab_size``) as a datastore.

    Same contract as :func:`build_index`; documents have no source or metadata.
    """
    records = (_Document(np.asarray(tokens), "", "") for tokens in documents)
    return _build(
        records, Path(out), fingerprint, inputs=[], shard_tokens=shard_tokens, force=force, progress=progress
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
        entries = []
        for datastore in datastores:
            for shard, entry in zip(datastore.shards, datastore.manifest["shards"]):
                target = staging.directory / f"shard-{len(entries):05d}"
                target.mkdir()
                for name in SHARD_FILES:
                    _link_or_copy(shard.path / name, target / name)
                entries.append({**entry, "path": target.name})
        build = {
            "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "merged_from": [str(d.path) for d in datastores],
        }
        top_k = max(int(d.manifest["ngram_top_k"]) for d in datastores)
        manifest = _manifest(first.fingerprint, first.token_dtype, entries, build, top_k)
        staging.commit(manifest)
    return _summary(out, manifest, started)


def _build(
    documents: Iterator[_Document],
    out: Path,
    fingerprint: TokenizerFingerprint,
    *,
    inputs: list[str],
    shard_tokens: int,
    force: bool,
    progress: bool,
    corpus: Corpus | None = None,
) -> BuildSummary:
    started = time.perf_counter()
    if shard_tokens < 1:
        raise InputError(f"shard_tokens must be positive, got {shard_tokens}")
    if fingerprint.vocab_size > MAX_VOCAB_SIZE:
        raise InputError(f"vocabulary of {fingerprint.vocab_size} tokens; datastores hold at most {MAX_VOCAB_SIZE}")
    dtype = token_dtype(fingerprint.vocab_size)
    with Staging(out, force=force) as staging, tqdm(unit="tok", unit_scale=True, disable=not progress) as bar:
        bar.set_description(f"indexing into {out}")
        entries: list[dict[str, Any]] = []
        buffer = ShardBuffer(dtype, fingerprint.vocab_size)
        for document in documents:
            if len(document.tokens) == 0:
                continue
            buffer.add(document.tokens, document.source, document.meta)
            bar.update(len(document.tokens))
            if buffer.num_tokens >= shard_tokens:
                entries.append(_write(buffer, staging, len(entries)))
                buffer = ShardBuffer(dtype, fingerprint.vocab_size)
        if len(buffer):
            entries.append(_write(buffer, staging, len(entries)))
        if not entries:
            skipped = f" ({corpus.skipped_lines} malformed lines skipped)" if corpus and corpus.skipped_lines else ""
            where = ", ".join(inputs) or "the documents given"
            raise InputError(f"empty corpus: no document with at least one token in {where}{skipped}")
        build = {
            "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": inputs,
            "shard_tokens": shard_tokens,
            "ngram_min_count": NGRAM_MIN_COUNT,
        }
        manifest = _manifest(fingerprint, dtype, entries, build, NGRAM_TOP_K)
        staging.commit(manifest)
    return _summary(out, manifest, started, corpus)


def _summary(out: Path, manifest: dict[str, Any], started: float, corpus: Corpus | None = None) -> BuildSummary:
    return BuildSummary(
        path=out,
        tokens=manifest["num_tokens"],
        documents=manifest["num_documents"],
        shards=len(manifest["shards"]),
        seconds=time.perf_counter() - started,
        skipped_lines=corpus.skipped_lines if corpus else 0,
        skipped_files=corpus.skipped_files if corpus else 0,
    )


def _write(buffer: ShardBuffer, staging: Staging, number: int) -> dict[str, Any]:
    return buffer.write(
        staging.directory / f"shard-{number:05d}", ngram_top_k=NGRAM_TOP_K, ngram_min_count=NGRAM_MIN_COUNT
    )


def _tokenize(corpus: Corpus, tokenizer: CorpusTokenizer, batch_size: int) -> Iterator[_Document]:
    records = iter(corpus)
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
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": fingerprint.to_json(),
        "token_dtype": dtype.str,
        "num_tokens": sum(entry["num_tokens"] for entry in entries),
        "num_documents": sum(entry["num_documents"] for entry in entries),
        "ngram_top_k": ngram_top_k,
        "build": build,
        "shards": entries,
    }


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link an immutable shard file (same file system), else copy it and fsync the copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())
