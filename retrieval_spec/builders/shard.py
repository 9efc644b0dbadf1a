"""Collect tokenized documents in memory and write them as one shard (layout: ``datastore/manifest.py``)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_spec.datastore.manifest import (
    DOCUMENT_SCHEMA,
    DOCUMENTS,
    NGRAMS,
    SHARD_FILES,
    SUFFIX_ARRAY,
    TOKENS,
    FileEntry,
    check_token_ids,
    separator,
)
from retrieval_spec.datastore.ngram_table import count_continuations
from retrieval_spec.datastore.suffix_array import build_suffix_array
from retrieval_spec.files import fsync_directory


class ShardBuffer:
    """The documents of the shard being built.

    Attributes:
        num_tokens: document tokens added so far.
    """

    def __init__(self, dtype: np.dtype, vocab_size: int) -> None:
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.num_tokens = 0
        self._documents: list[np.ndarray] = []
        self._sources: list[str] = []
        self._metas: list[str] = []

    def __len__(self) -> int:
        return len(self._documents)

    def add(self, tokens: np.ndarray, source: str, meta: str) -> None:
        """Append a document of (m,) token ids, m >= 1, each in ``[0, vocab_size)``."""
        check_token_ids(tokens, self.vocab_size, source or "a document")
        self._documents.append(tokens.astype(self.dtype, copy=False))  # 2 or 4 bytes a token while buffered
        self._sources.append(source)
        self._metas.append(meta)
        self.num_tokens += len(tokens)

    def write(self, directory: Path, *, ngram_top_k: int, ngram_min_count: int) -> dict[str, Any]:
        """Write the shard's files into a new ``directory``, fsynced, and return its manifest entry.

        The entry's ``path`` is the directory's name; the caller places it relative to the index.
        """
        directory.mkdir()
        sep = separator(self.dtype)
        separator_piece = np.array([sep], dtype=self.dtype)
        pieces = [separator_piece]
        for document in self._documents:
            pieces += [document, separator_piece]
        stream = np.concatenate(pieces, dtype=self.dtype)
        lengths = np.array([len(document) for document in self._documents], dtype=np.int64)
        self._documents.clear()
        del pieces
        _write_array(directory / TOKENS, stream)
        suffixes = build_suffix_array(stream)
        _write_array(directory / SUFFIX_ARRAY, suffixes)
        suffix_dtype = suffixes.dtype.str
        del suffixes
        _write_table(directory / NGRAMS, count_continuations(stream, sep, top_k=ngram_top_k, min_count=ngram_min_count))
        starts = 1 + np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
        documents = pa.table(
            {"start": starts, "length": lengths, "source": self._sources, "meta": self._metas}, schema=DOCUMENT_SCHEMA
        )
        _write_table(directory / DOCUMENTS, documents)
        fsync_directory(directory)
        return {
            "path": directory.name,
            "num_tokens": int(lengths.sum()),
            "num_documents": len(lengths),
            "stream_length": len(stream),
            "suffix_array_dtype": suffix_dtype,
            "files": {name: asdict(FileEntry.of(directory / name)) for name in SHARD_FILES},
        }


def _write_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        array.tofile(f)
        f.flush()
        os.fsync(f.fileno())


def _write_table(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path, compression="zstd", write_page_checksum=True)  # verified when read
    with open(path, "rb") as f:
        os.fsync(f.fileno())
