"""The REST drafter: drafts only what the corpus continues, most frequent first, never across documents."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore.manifest import TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.rest import RestDrafter, _most_frequent_trie, match_prior
from retrieval_spec.tree import DraftTree, Source

FINGERPRINT = TokenizerFingerprint(name="fake", vocab_size=6, sha256="f" * 64)
pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest: durability is not under test here


def open_datastore(documents: list[list[int]], path: Path, shard_tokens: int = 1 << 20) -> Datastore:
    build_index_from_tokens([np.array(d) for d in documents], path, FINGERPRINT, shard_tokens=shard_tokens,
                            progress=False)
    return Datastore.open(path)


def paths(tree: DraftTree) -> list[list[int]]:
    """Every root-to-node token path, root excluded."""
    out: list[list[int]] = [[]]
    for node in range(1, len(tree)):
        out.append(out[tree.parents[node]] + [int(tree.tokens[node])])
    return out[1:]


def occurs(documents: list[list[int]], sequence: list[int]) -> bool:
    m = len(sequence)
    return any(d[i : i + m] == sequence for d in documents for i in range(len(d) - m + 1))


@settings(max_examples=40, deadline=None)
@given(
    documents=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=8),
    context=st.lists(st.integers(0, 5), min_size=1, max_size=12),
    budget=st.integers(0, 20),
)
def test_every_drafted_path_continues_a_match_inside_one_document(documents, context, budget):
    with tempfile.TemporaryDirectory() as directory:
        datastore = open_datastore(documents, Path(directory) / "index", shard_tokens=25)
        drafter = RestDrafter(datastore, max_match=6, max_occurrences=1000, depth=4)
        tree = drafter.propose(0, np.array(context, dtype=np.int32), budget)
        assert tree.tokens[0] == context[-1] and len(tree) <= budget + 1
        assert set(tree.sources[1:].tolist()) <= {Source.CORPUS}
        match = datastore.longest_match(np.array(context), 6)
        for path in paths(tree):
            assert occurs(documents, context[len(context) - match.length :] + path)
        suffix = context[len(context) - match.length :]
        continued = match.length > 0 and any(occurs(documents, suffix + [token]) for token in range(4))
        assert (len(tree) > 1) == (continued and budget > 0)


@settings(max_examples=30, deadline=None)
@given(
    documents=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=30), min_size=1, max_size=6),
    prompt=st.lists(st.integers(0, 2), min_size=1, max_size=6),
    steps=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=6),
)
def test_remembering_the_last_match_changes_no_draft(documents, prompt, steps):
    with tempfile.TemporaryDirectory() as directory:
        datastore = open_datastore(documents, Path(directory) / "index")
        drafter = RestDrafter(datastore, max_match=5, min_match=2, depth=3)
        drafter.start(0, np.array(prompt))
        context = list(prompt)
        for new_tokens in steps:
            context += new_tokens
            fresh = RestDrafter(datastore, max_match=5, min_match=2, depth=3)
            fresh.start(0, np.array(prompt))
            expected, tree = fresh.propose(0, np.array(context), 10), drafter.propose(0, np.array(context), 10)
            assert paths(tree) == paths(expected)
            assert np.array_equal(tree.scores, expected.scores)


def test_the_most_frequent_continuation_comes_first(tmp_path: Path):
    documents = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 4], [5, 1, 4, 4]]
    drafter = RestDrafter(open_datastore(documents, tmp_path / "index"), depth=2)
    tree = drafter.propose(0, np.array([3, 0, 1], dtype=np.int32), budget=1)
    assert tree.tokens.tolist() == [1, 2]
    assert tree.scores[1] == pytest.approx(match_prior(2))  # all three occurrences of [0, 1] continue with 2
    tree = drafter.propose(0, np.array([3, 0, 1], dtype=np.int32), budget=3)
    assert paths(tree) == [[2], [2, 3], [2, 4]]
    assert tree.scores[2:].tolist() == pytest.approx([match_prior(2) * 2 / 3, match_prior(2) / 3])


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.integers(-1, 3), min_size=5, max_size=5), min_size=1, max_size=40),
       budget=st.integers(1, 30), matched=st.integers(1, 12))
def test_the_trie_keeps_the_most_frequent_prefixes_then_the_shallower_then_the_first_sorted(rows, budget, matched):
    """The compiled trie against its definition: every prefix of a row (cut at its first negative token) is a node
    counted by the rows through it; the ``budget`` best by (count descending, depth, prefix) are kept, scored by
    their share of the rows times the match's prior."""
    continuations = np.array(rows, dtype=np.int32)
    counts: dict[tuple[int, ...], int] = {}
    for row in rows:
        cut = row[: row.index(-1)] if -1 in row else row
        for end in range(1, len(cut) + 1):
            counts[tuple(cut[:end])] = counts.get(tuple(cut[:end]), 0) + 1
    best = sorted(counts, key=lambda prefix: (-counts[prefix], len(prefix), prefix))[:budget]
    tree = _most_frequent_trie(9, continuations, budget, matched)
    assert [tuple(path) for path in paths(tree)] == best
    np.testing.assert_allclose(tree.scores[1:], [counts[p] * match_prior(matched) / len(rows) for p in best],
                               rtol=1e-6)
    assert set(tree.sources[1:].tolist()) <= {int(Source.CORPUS)} and set(tree.matches[1:].tolist()) <= {matched}
    DraftTree(tree.tokens, tree.parents, tree.scores, tree.sources, tree.matches)  # every invariant holds
    assert tree.depths.tolist() == [0] + [len(p) for p in best]


def test_nothing_is_drafted_when_nothing_matches(tmp_path: Path):
    drafter = RestDrafter(open_datastore([[0, 1, 2]], tmp_path / "index"), min_match=2)
    for context in ([5], [2, 5], [1, 0]):  # 5 never occurs; [1, 0] only as single tokens, below min_match
        tree = drafter.propose(0, np.array(context, dtype=np.int32), budget=8)
        assert tree.tokens.tolist() == [context[-1]]


def test_continuations_stop_at_the_end_of_a_document(tmp_path: Path):
    drafter = RestDrafter(open_datastore([[3, 4], [1, 2, 0]], tmp_path / "index"))
    assert len(drafter.propose(0, np.array([3, 4], dtype=np.int32), budget=8)) == 1  # [3, 4] ends its document
    assert paths(drafter.propose(0, np.array([4, 1], dtype=np.int32), budget=8)) == [[2], [2, 0]]


def test_a_corpus_holding_the_text_drafts_it_exactly(tmp_path: Path):
    rng = np.random.default_rng(0)
    text = rng.integers(0, 6, size=400).tolist()
    drafter = RestDrafter(open_datastore([text], tmp_path / "index"), max_match=16, depth=6)
    drafter.start(0, np.array(text[:50]))
    for end in range(50, 390, 7):
        tree = drafter.propose(0, np.array(text[:end], dtype=np.int32), budget=6)
        assert paths(tree)[-1] == text[end : end + 6]
