"""Damaged and hostile indexes: refused naming the file, on open or on first read, before any token id outside
the vocabulary or any position outside a stream leaves the datastore; ``check_integrity`` names every damaged file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore import manifest as manifest_module
from retrieval_spec.datastore.manifest import (
    DOCUMENTS,
    MANIFEST,
    NGRAMS,
    SUFFIX_ARRAY,
    TOKENS,
    FileEntry,
    TokenizerFingerprint,
)
from retrieval_spec.datastore.reader import Datastore, check_integrity, describe
from retrieval_spec.errors import DatastoreFormatError, TokenizerMismatchError

VOCAB = 50
FINGERPRINT = TokenizerFingerprint(name="fake/tokenizer", vocab_size=VOCAB, sha256="a" * 64)


@pytest.fixture(autouse=True)
def small_samples(monkeypatch: pytest.MonkeyPatch):
    """Open checks the first and last 64 bytes only, so that an edit in the middle of a small file is not seen
    on open, as an edit in the middle of a large one is not; and no fsync (durability is not under test)."""
    monkeypatch.setattr(manifest_module, "SAMPLE_BYTES", 64)
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)


@pytest.fixture
def index(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, VOCAB, size=300) for _ in range(20)]
    build_index_from_tokens(documents, tmp_path / "index", FINGERPRINT, progress=False)
    return tmp_path / "index"


def shard_file(index: Path, name: str) -> Path:
    return next(index.glob(f"gen-*/shard-00000/{name}"))


def edit_manifest(index: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((index / MANIFEST).read_text())
    edit(manifest)
    (index / MANIFEST).write_text(json.dumps(manifest))


def reseal(index: Path, name: str) -> None:
    """Record a file's new size and checksums in the manifest, as a hostile edit would."""
    def edit(manifest: dict[str, Any]) -> None:
        manifest["shards"][0]["files"][name] = asdict(FileEntry.of(shard_file(index, name)))

    edit_manifest(index, edit)


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def every_continuation(datastore: Datastore) -> np.ndarray:
    return datastore.continuations(np.arange(datastore.stream_length), 4)


DELETE = object()


def set_field(*keys: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets ``manifest[keys[0]][keys[1]]...`` to ``value``, or deletes it when ``value`` is DELETE."""
    def edit(manifest: dict[str, Any]) -> None:
        node: Any = manifest
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return edit


@pytest.mark.parametrize("edit, message", [
    (set_field("tokenizer", "vocab_size", value="abc"), r"tokenizer\.vocab_size is 'abc', expected an integer 1 to"),
    (set_field("tokenizer", "vocab_size", value=10**12), r"tokenizer\.vocab_size is 1000000000000, expected"),
    (set_field("tokenizer", "vocab_size", value=100_000), r"token_dtype is '>u2', a vocabulary of 100000 is stored"),
    (set_field("ngram_top_k", value=DELETE), r"field 'ngram_top_k' is missing"),
    (set_field("ngram_top_k", value=10**9), r"ngram_top_k is 1000000000, expected an integer 1 to 1024"),
    (set_field("shards", value=[]), r"field 'shards' must be a non-empty list"),
    (set_field("num_tokens", value="6000"), r"num_tokens is '6000', expected an integer"),
    (set_field("num_documents", value=7), r"num_documents is 7, its shards hold 20"),
    (set_field("shards", 0, "num_documents", value=-1), r"shard 0\.num_documents is -1"),
    (set_field("shards", 0, "num_tokens", value=True), r"shard 0\.num_tokens is True"),
    (set_field("shards", 0, "stream_length", value=6000), r"shard 0: stream_length 6000 is not num_tokens \+"),
    (set_field("shards", 0, "path", value="../../etc"), r"shard 0: path '\.\./\.\./etc' is not a relative path"),
    (set_field("shards", 0, "path", value="/etc"), r"shard 0: path '/etc' is not a relative path inside"),
    (set_field("shards", 0, "suffix_array_dtype", value="<i8"), r"shard 0: suffix_array_dtype is '<i8', expected '<i4'"),
    (set_field("shards", 0, "files", TOKENS, value=None), r"shard 0: files\.tokens\.bin must be an object"),
    (set_field("tokenizer", value="smollm2"), r"field 'tokenizer' must be an object"),
])
def test_a_malformed_manifest_is_refused_naming_the_field(index: Path, edit, message: str):
    edit_manifest(index, edit)
    with pytest.raises(DatastoreFormatError, match=rf"manifest\.json: {message}"):
        Datastore.open(index)
    with pytest.raises(DatastoreFormatError, match=message):  # index-info without --verify
        describe(index)


def test_a_vocabulary_size_edited_below_the_ids_is_refused_when_those_ids_are_read(index: Path):
    edit_manifest(index, set_field("tokenizer", "vocab_size", value=10))
    datastore = Datastore.open(index)
    with pytest.raises(DatastoreFormatError, match=r"tokens\.bin: holds token id \d+, outside the vocabulary \[0, 10"):
        every_continuation(datastore)


def test_an_expected_tokenizer_must_match_in_vocabulary_size_too(index: Path):
    edit_manifest(index, set_field("tokenizer", "vocab_size", value=49))
    with pytest.raises(TokenizerMismatchError, match="vocab 49"):
        Datastore.open(index, expected_fingerprint=FINGERPRINT)


def test_token_ids_outside_the_vocabulary_are_refused_when_read(index: Path):
    path = shard_file(index, TOKENS)
    tokens = np.fromfile(path, dtype=">u2")
    tokens[len(tokens) // 2] = 60_000  # an id no model of this vocabulary has; not the separator
    tokens.tofile(path)
    datastore = Datastore.open(index)  # unsealed: the middle is not sampled on open
    with pytest.raises(DatastoreFormatError, match=r"tokens\.bin: holds token id 60000, outside the vocabulary"):
        every_continuation(datastore)
    reseal(index, TOKENS)  # hostile: the manifest agrees with the file
    with pytest.raises(DatastoreFormatError, match=r"tokens\.bin: holds token id 60000"):
        every_continuation(Datastore.open(index))


def test_reads_that_do_not_reach_the_damage_still_work_and_ids_stay_in_the_vocabulary(index: Path):
    path = shard_file(index, TOKENS)
    tokens = np.fromfile(path, dtype=">u2")
    tokens[-3] = 60_000  # in the last document
    tokens.tofile(path)
    reseal(index, TOKENS)
    datastore = Datastore.open(index)
    window = datastore.continuations(np.arange(1, 100), 4)
    assert window.max() < VOCAB and window.min() >= -1


def test_suffix_array_entries_outside_the_stream_are_refused_when_used(index: Path):
    lo, hi = Datastore.open(index).match(np.array([1])).intervals[0]
    path = shard_file(index, SUFFIX_ARRAY)
    suffixes = np.fromfile(path, dtype="<i4")
    suffixes[(lo + hi) // 2] = 10**9  # inside the interval the neighbours still bound
    suffixes.tofile(path)
    reseal(index, SUFFIX_ARRAY)
    datastore = Datastore.open(index)
    with pytest.raises(DatastoreFormatError, match=r"suffix_array\.bin: entry 1000000000 is no occurrence"):
        datastore.find(np.array([1]), hi - lo)


def test_an_ngram_table_with_ids_outside_the_vocabulary_is_refused_when_first_read(index: Path):
    path = shard_file(index, NGRAMS)
    table = pq.read_table(path)
    next_tokens = table["next"].to_numpy().copy()
    next_tokens[0] = 520_128_418
    pq.write_table(table.set_column(2, "next", pa.array(next_tokens)), path)
    reseal(index, NGRAMS)
    datastore = Datastore.open(index)
    with pytest.raises(DatastoreFormatError, match=r"ngrams\.parquet: next token id 520128418, outside the vocab"):
        datastore.top_next_tokens(8)


def test_an_ngram_table_of_another_schema_is_refused(index: Path):
    path = shard_file(index, NGRAMS)
    pq.write_table(pa.table({"order": pa.array([1], pa.int8())}), path)
    reseal(index, NGRAMS)
    with pytest.raises(DatastoreFormatError, match=r"ngrams\.parquet: columns \['order'\]"):
        Datastore.open(index).ngram_table()


@pytest.mark.parametrize("name", [NGRAMS, DOCUMENTS])
def test_a_flip_inside_a_parquet_table_fails_its_page_checksum_on_first_read(index: Path, name: str):
    flip_middle(shard_file(index, name))
    datastore = Datastore.open(index)
    with pytest.raises(DatastoreFormatError, match=rf"{name}: not readable as Parquet .*damaged"):
        datastore.top_next_tokens(8) if name == NGRAMS else datastore.documents()


def test_a_document_table_pointing_outside_the_stream_is_refused(index: Path):
    path = shard_file(index, DOCUMENTS)
    table = pq.read_table(path)
    starts = table["start"].to_numpy().copy()
    starts[-1] = 10**9
    pq.write_table(table.set_column(0, "start", pa.array(starts)), path)
    reseal(index, DOCUMENTS)
    with pytest.raises(DatastoreFormatError, match=r"documents\.parquet: a document lies outside"):
        Datastore.open(index).locate(np.array([5]))


def test_check_integrity_names_every_damaged_file(index: Path):
    flip_middle(shard_file(index, TOKENS))
    flip_middle(shard_file(index, NGRAMS))
    with pytest.raises(DatastoreFormatError, match=r"2 damaged file\(s\)") as raised:
        check_integrity(index)
    message = str(raised.value)
    assert "\n" not in message
    assert f"{TOKENS}: sha256 differs" in message and f"{NGRAMS}: sha256 differs" in message
    assert SUFFIX_ARRAY not in message and DOCUMENTS not in message


def test_check_integrity_checks_contents_a_resealed_manifest_vouches_for(index: Path):
    path = shard_file(index, TOKENS)
    tokens = np.fromfile(path, dtype=">u2")
    tokens[len(tokens) // 2] = 60_000
    tokens.tofile(path)
    reseal(index, TOKENS)
    with pytest.raises(DatastoreFormatError, match=r"1 damaged file\(s\): .*tokens\.bin: holds token id 60000"):
        check_integrity(index)
