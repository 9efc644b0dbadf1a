"""The datastore reader: lookups equal brute force, shards act as one index, damaged files are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_spec.builders.build import build_index_from_tokens, merge_indexes
from retrieval_spec.datastore import ngram_table
from retrieval_spec.datastore.manifest import MANIFEST, SAMPLE_BYTES, TOKENS, TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore, check_integrity, describe
from retrieval_spec.datastore.suffix_array import SuffixArray, build_suffix_array
from retrieval_spec.errors import DatastoreFormatError, TokenizerMismatchError

FINGERPRINT = TokenizerFingerprint(name="fake/tokenizer", vocab_size=4, sha256="a" * 64)
pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest: durability is not under test here


documents_strategy = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=25), min_size=1, max_size=12)
query_strategy = st.lists(st.integers(0, 3), min_size=1, max_size=4)


def build(documents: list[list[int]], path: Path, shard_tokens: int = 1 << 20, **kwargs) -> Datastore:
    arrays = [np.array(document) for document in documents]
    build_index_from_tokens(arrays, path, kwargs.pop("fingerprint", FINGERPRINT), shard_tokens=shard_tokens,
                            progress=False, **kwargs)
    return Datastore.open(path)


def occurrences(documents: list[list[int]], query: list[int]) -> set[tuple[int, int]]:
    """Brute force: (document, offset) of every occurrence of ``query`` inside a document."""
    m = len(query)
    return {
        (d, i)
        for d, document in enumerate(documents)
        for i in range(len(document) - m + 1)
        if document[i : i + m] == query
    }


def located(datastore: Datastore, positions: np.ndarray) -> set[tuple[int, int]]:
    doc_ids, offsets = datastore.locate(positions)
    return set(zip(doc_ids.tolist(), offsets.tolist()))


@settings(max_examples=40, deadline=None)
@given(documents=documents_strategy, query=query_strategy, shard_tokens=st.integers(1, 60))
def test_find_equals_brute_force_and_stays_in_documents(documents, query, shard_tokens):
    with tempfile.TemporaryDirectory() as directory:
        datastore = build(documents, Path(directory) / "index", shard_tokens)
        positions = datastore.find(np.array(query), max_occurrences=10**6)
        assert located(datastore, positions) == occurrences(documents, query)
        continuations = datastore.continuations(positions + len(query), 5)
        doc_ids, offsets = datastore.locate(positions)
        for d, i, row in zip(doc_ids.tolist(), offsets.tolist(), continuations):
            expected = documents[d][i + len(query) : i + len(query) + 5]
            assert row.tolist() == expected + [-1] * (5 - len(expected))


@settings(max_examples=40, deadline=None)
@given(documents=documents_strategy, query=query_strategy, limit=st.integers(1, 5))
def test_find_with_a_limit_returns_distinct_true_occurrences(documents, query, limit):
    with tempfile.TemporaryDirectory() as directory:
        datastore = build(documents, Path(directory) / "index", shard_tokens=20)
        positions = datastore.find(np.array(query), max_occurrences=limit)
        found = located(datastore, positions)
        truth = occurrences(documents, query)
        assert len(positions) == len(found) == min(limit, len(truth))
        assert found <= truth


@settings(max_examples=40, deadline=None)
@given(documents=documents_strategy, context=st.lists(st.integers(0, 4), min_size=1, max_size=10),
       max_len=st.integers(1, 8), min_len=st.integers(1, 3))
def test_longest_match_equals_brute_force(documents, context, max_len, min_len):
    # Token 4 is outside the vocabulary of 4: no match may contain it.
    with tempfile.TemporaryDirectory() as directory:
        datastore = build(documents, Path(directory) / "index", shard_tokens=15)
        match = datastore.longest_match(np.array(context), max_len=max_len, min_len=min_len)
        expected = 0
        for length in range(min_len, min(max_len, len(context)) + 1):
            if occurrences(documents, context[len(context) - length :]):
                expected = length
        assert match.length == expected
        if expected:
            assert match.count == len(occurrences(documents, context[len(context) - expected :]))
            starts = datastore.positions(match, 10**6)
            assert located(datastore, starts) == occurrences(documents, context[len(context) - expected :])


@settings(max_examples=25, deadline=None)
@given(documents=documents_strategy, queries=st.lists(query_strategy, min_size=1, max_size=5), split=st.integers(1, 11))
def test_shards_together_equal_one_index(documents, queries, split):
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        whole = build(documents, root / "whole")
        sharded = build(documents, root / "sharded", shard_tokens=7)
        parts = [documents[:split], documents[split:]] if split < len(documents) else [documents]
        for number, part in enumerate(parts):
            build(part, root / f"part{number}")
        merged_path = root / "merged"
        merge_indexes([root / f"part{number}" for number in range(len(parts))], merged_path)
        merged = Datastore.open(merged_path)
        for query in queries:
            truth = located(whole, whole.find(np.array(query), 10**6))
            for other in (sharded, merged):
                assert located(other, other.find(np.array(query), 10**6)) == truth
                match, expected = other.longest_match(np.array(query), 4), whole.longest_match(np.array(query), 4)
                assert (match.length, match.count) == (expected.length, expected.count)
        # Order 1 keeps every continuation of a 4-token vocabulary (top_k = 8), so merged counts are exact.
        for other in (sharded, merged):
            assert _rows(other.ngram_table(), 1) == _rows(whole.ngram_table(), 1)
        assert merged.num_documents == whole.num_documents == len(documents)


@settings(max_examples=40, deadline=None)
@given(documents=documents_strategy, data=st.data(), shard_tokens=st.integers(1, 30))
def test_longest_match_over_many_shards_equals_one_shard(documents, data, shard_tokens):
    """A decoder's sequence of lookups (the shard of each match is where the next one starts) over one shard
    per few tokens gives the lengths, counts and occurrences of a single-shard index, and the exact interval
    in every shard that holds the match."""
    with tempfile.TemporaryDirectory() as directory:
        whole = build(documents, Path(directory) / "whole")
        sharded = build(documents, Path(directory) / "sharded", shard_tokens)
        for _ in range(data.draw(st.integers(1, 6))):
            document = data.draw(st.sampled_from(documents))
            start = data.draw(st.integers(0, len(document) - 1))
            copied = document[start : start + data.draw(st.integers(1, 12))]
            context = np.array(data.draw(st.lists(st.integers(0, 4), max_size=4)) + copied)
            max_len, min_len = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 3))
            match, expected = sharded.longest_match(context, max_len, min_len), whole.longest_match(context, max_len, min_len)
            assert (match.length, match.count) == (expected.length, expected.count)
            if match.length:
                assert located(sharded, sharded.positions(match, 10**6)) == located(whole, whole.positions(expected, 10**6))
                pattern = context[len(context) - match.length :].astype(sharded.token_dtype).tobytes()
                for shard, (lo, hi) in zip(sharded.shards, match.intervals):
                    if hi > lo:
                        assert (lo, hi) == shard.index.interval(pattern)
                    else:
                        assert shard.index.interval(pattern)[1] == shard.index.interval(pattern)[0]


@pytest.mark.parametrize(
    "documents, context, expected",
    [
        # A later shard that holds the whole context beats the short match of the shard searched first.
        ([[0, 1], [2, 3], [3, 0, 1, 2, 3, 3]], [0, 1, 2, 3, 3], (5, 1)),
        # Shards that cannot beat the best length still count its occurrences.
        ([[3, 1, 2], [1, 2], [0, 1, 2]], [2, 1, 2], (2, 3)),
        # The best length is found in the last shard; earlier shards hold only shorter suffixes.
        ([[1, 1], [2, 1], [3, 2, 1]], [3, 2, 1], (3, 1)),
    ],
)
def test_longest_match_across_shards_cases(tmp_path: Path, documents, context, expected):
    datastore = build(documents, tmp_path / "index", shard_tokens=2)
    assert len(datastore.shards) == 3
    match = datastore.longest_match(np.array(context), max_len=len(context))
    assert (match.length, match.count) == expected


def _rows(table, order):
    contexts, next_tokens, counts = ngram_table.decode(table, order)
    return sorted(zip(map(tuple, contexts.tolist()), next_tokens.tolist(), counts.tolist()))


@settings(max_examples=30, deadline=None)
@given(documents=documents_strategy)
def test_build_then_open_gives_back_every_document(documents):
    with tempfile.TemporaryDirectory() as directory:
        datastore = build(documents, Path(directory) / "index", shard_tokens=10)
        table = datastore.documents()
        assert table["doc_id"].to_pylist() == list(range(len(documents)))
        for start, length, document in zip(table["start"].to_pylist(), table["length"].to_pylist(), documents):
            assert datastore.continuations(np.array([start]), length)[0].tolist() == document
        assert datastore.num_tokens == sum(map(len, documents))


@settings(max_examples=30, deadline=None)
@given(documents=documents_strategy)
def test_ngram_table_counts_continuations_within_documents(documents):
    with tempfile.TemporaryDirectory() as directory:
        datastore = build(documents, Path(directory) / "index")
        pairs = Counter((d[i], d[i + 1]) for d in documents for i in range(len(d) - 1))
        triples = Counter(tuple(d[i : i + 3]) for d in documents for i in range(len(d) - 2))
        table = datastore.ngram_table()
        assert _rows(table, 1) == sorted(((a,), b, n) for (a, b), n in pairs.items())
        assert _rows(table, 2) == sorted(((a, b), c, n) for (a, b, c), n in triples.items() if n >= 2)
        top = datastore.top_next_tokens(2)
        for token in range(4):
            expected = sorted((-n, b) for (a, b), n in pairs.items() if a == token)[:2]
            assert top[token].tolist() == [b for _, b in expected] + [-1] * (2 - len(expected))


@settings(max_examples=50, deadline=None)
@given(stream=st.lists(st.integers(0, 6), min_size=1, max_size=60), wide=st.booleans())
def test_suffix_array_sorts_suffixes(stream, wide):
    dtype = np.dtype(">u4" if wide else ">u2")
    tokens = (np.array(stream) * (70_000 if wide else 1)).astype(dtype)
    suffixes = build_suffix_array(tokens)
    assert suffixes.tolist() == sorted(range(len(stream)), key=lambda i: stream[i:])
    index = SuffixArray(tokens.tobytes(), suffixes.tobytes(), dtype, suffixes.dtype)
    for query in ([stream[0]], stream[:2], [7]):
        lo, hi = index.interval((np.array(query) * (70_000 if wide else 1)).astype(dtype).tobytes())
        expected = [i for i in range(len(stream)) if stream[i : i + len(query)] == query]
        assert sorted(suffixes[lo:hi].tolist()) == expected


def test_suffix_array_over_more_than_65536_distinct_tokens():
    rng = np.random.default_rng(0)
    tokens = rng.permutation(80_000)
    tokens = np.concatenate([tokens, tokens[:100]]).astype(">u4")
    suffixes = build_suffix_array(tokens)
    assert np.array_equal(np.sort(suffixes), np.arange(len(tokens)))
    prefixes = [tokens[i : i + 4].tobytes() for i in suffixes.tolist()]
    assert all(a < b for a, b in zip(prefixes, prefixes[1:]) if a != b)


@pytest.fixture
def index(tmp_path: Path) -> Path:
    # Large enough that tokens.bin spans more than the sampled head and tail.
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 4, size=1000).tolist() for _ in range(2 * SAMPLE_BYTES // 1000 + 20)]
    build(documents, tmp_path / "index")
    return tmp_path / "index"


def shard_file(index: Path, name: str) -> Path:
    return next(index.glob(f"gen-*/shard-00000/{name}"))


def test_open_refuses_a_truncated_file(index: Path):
    path = shard_file(index, TOKENS)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DatastoreFormatError, match=r"tokens\.bin.*bytes.*truncated"):
        Datastore.open(index)


@pytest.mark.parametrize("name", ["tokens.bin", "suffix_array.bin", "documents.parquet", "ngrams.parquet"])
def test_open_refuses_an_altered_or_missing_file(index: Path, name: str):
    path = shard_file(index, name)
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatastoreFormatError, match=rf"{name}.*altered"):
        Datastore.open(index)
    path.unlink()
    with pytest.raises(DatastoreFormatError, match=rf"{name}: missing"):
        Datastore.open(index)


def test_check_integrity_finds_an_edit_that_open_does_not_sample(index: Path):
    path = shard_file(index, TOKENS)
    data = bytearray(path.read_bytes())
    assert len(data) > 2 * SAMPLE_BYTES
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    Datastore.open(index)
    with pytest.raises(DatastoreFormatError, match=r"tokens\.bin: sha256"):
        check_integrity(index)


def test_check_integrity_accepts_an_intact_index(index: Path):
    check_integrity(index)


def test_open_refuses_another_format_version(index: Path):
    manifest = json.loads((index / MANIFEST).read_text())
    manifest["format_version"] = 99
    (index / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatastoreFormatError, match=r"manifest\.json: format version 99.*version 1"):
        Datastore.open(index)


def test_open_refuses_a_directory_without_manifest(tmp_path: Path):
    with pytest.raises(DatastoreFormatError, match="manifest.json: missing"):
        Datastore.open(tmp_path)


def test_open_refuses_another_tokenizer_naming_both(index: Path):
    other = TokenizerFingerprint(name="other/tokenizer", vocab_size=4, sha256="b" * 64)
    with pytest.raises(TokenizerMismatchError, match=r"'fake/tokenizer'.*'other/tokenizer'"):
        Datastore.open(index, expected_fingerprint=other)
    Datastore.open(index, expected_fingerprint=FINGERPRINT)


def test_describe_is_json_and_counts(index: Path):
    info = describe(index)
    json.dumps(info)
    assert info["num_shards"] == 1 and info["tokenizer"]["name"] == "fake/tokenizer"
    assert info["num_tokens"] == Datastore.open(index).num_tokens
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in index.glob("gen-*/shard-*/*"))


def test_large_vocabularies_use_wide_tokens(tmp_path: Path):
    fingerprint = TokenizerFingerprint(name="big", vocab_size=150_000, sha256="c" * 64)
    datastore = build([[149_999, 5, 70_000, 5, 70_000, 3]], tmp_path / "index", fingerprint=fingerprint)
    assert datastore.token_dtype == np.dtype(">u4")
    assert datastore.find(np.array([5, 70_000]), 10).size == 2
    assert datastore.longest_match(np.array([1, 149_999, 5, 70_000]), 8).length == 3


def test_continuations_stop_at_document_ends_in_wide_streams(tmp_path: Path):
    fingerprint = TokenizerFingerprint(name="big", vocab_size=150_000, sha256="c" * 64)
    datastore = build([[149_999, 5], [70_000, 6]], tmp_path / "index", fingerprint=fingerprint)
    assert datastore.continuations(np.array([1, 4]), 4).tolist() == [[149_999, 5, -1, -1], [70_000, 6, -1, -1]]


def test_modules_do_not_import_torch():
    code = (
        "import retrieval_spec.datastore.manifest, retrieval_spec.datastore.reader, "
        "retrieval_spec.datastore.suffix_array, retrieval_spec.datastore.ngram_table, "
        "retrieval_spec.builders.build, retrieval_spec.builders.corpus, retrieval_spec.builders.publish, "
        "retrieval_spec.builders.shard, retrieval_spec.drafters.rest; import sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
