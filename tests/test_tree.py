"""Tree algebra without a model: drafts, merging, best-first pruning, masks, positions, cost sizing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_spec.sizing import CostCurve, best_batch_size, best_size
from retrieval_spec.tree import (
    DraftTree,
    Forest,
    Source,
    ancestor_mask,
    best_first,
    depths,
    merge,
    trie_from_continuations,
    within_vocabulary,
)


@st.composite
def trees(draw, max_nodes: int = 30) -> DraftTree:
    """Random valid trees: each node picks an earlier parent and a token unused among its siblings."""
    n = draw(st.integers(1, max_nodes))
    parents, tokens, scores = [-1], [draw(st.integers(0, 50))], [1.0]
    used: dict[int, set] = {}
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        free = [t for t in range(40) if t not in used.get(p, set())]
        token = draw(st.sampled_from(free))
        used.setdefault(p, set()).add(token)
        parents.append(p)
        tokens.append(token)
        scores.append(scores[p] * draw(st.floats(0.0, 1.0)))
    return DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32), np.array(scores, np.float32),
                     np.array([0] + [1] * (n - 1), np.uint8))


def ancestors(parents: np.ndarray, i: int) -> set[int]:
    out = {i}
    while parents[i] >= 0:
        i = int(parents[i])
        out.add(i)
    return out


@given(trees())
def test_mask_is_exactly_the_ancestor_set(tree):
    mask = ancestor_mask(tree.parents)
    for i in range(len(tree)):
        assert set(np.flatnonzero(mask[i]).tolist()) == ancestors(tree.parents, i)
        assert depths(tree.parents)[i] == len(ancestors(tree.parents, i)) - 1


def test_validation_rejects_malformed_trees():
    ok = dict(tokens=np.array([1, 2], np.int32), parents=np.array([-1, 0], np.int32),
              scores=np.array([1, 0.5], np.float32), sources=np.array([0, 1], np.uint8))
    DraftTree(**ok)
    with pytest.raises(ValueError, match="parents"):
        DraftTree(**{**ok, "parents": np.array([-1, 1], np.int32)})
    with pytest.raises(ValueError, match="never rise"):
        DraftTree(np.array([1, 2, 3], np.int32), np.array([-1, 0, 1], np.int32),
                  np.array([1, .5, .6], np.float32), np.array([0, 1, 1], np.uint8))
    with pytest.raises(ValueError, match="int32"):
        DraftTree(**{**ok, "tokens": np.array([1, 2], np.int64)})
    with pytest.raises(ValueError, match="distinct"):
        DraftTree(np.array([1, 2, 2], np.int32), np.array([-1, 0, 0], np.int32),
                  np.array([1, .5, .5], np.float32), np.array([0, 1, 1], np.uint8))


def best_first_of(tree: DraftTree, budget: int, max_depth: int = 1 << 30) -> tuple[DraftTree, np.ndarray]:
    [kept], keep, _ = best_first(Forest.of([tree]), np.array([budget]), np.array([max_depth]))
    return kept, keep


@settings(max_examples=60)
@given(trees(), st.integers(0, 30))
def test_best_first_keeps_an_ancestor_closed_top_set(tree, budget):
    kept, keep = best_first_of(tree, budget)
    assert len(kept) == min(budget, len(tree) - 1) + 1
    assert set(keep.tolist()) == set().union(*(ancestors(tree.parents, int(k)) for k in keep))
    assert np.all(np.diff(kept.scores[1:]) <= 1e-7)  # best first
    np.testing.assert_array_equal(kept.tokens, tree.tokens[keep])
    # Every dropped node scores no better than the worst kept one (ties aside).
    dropped = np.setdiff1d(np.arange(len(tree)), keep)
    if len(dropped) and len(kept) > 1:
        assert tree.scores[dropped].max() <= kept.scores[1:].min() + 1e-7


def heap_best_first(tree: DraftTree, max_nodes: int, max_depth: int | None) -> list[int]:
    """The definition best_first implements: expand a frontier from the root, best score first (ties: shallower,
    then lower index), skipping nodes deeper than ``max_depth``."""
    import heapq

    kids = {i: [c for c in range(len(tree)) if tree.parents[c] == i] for i in range(len(tree))}
    depth = depths(tree.parents)
    order, frontier = [0], [(-float(tree.scores[c]), int(depth[c]), c) for c in kids[0]]
    heapq.heapify(frontier)
    while frontier and len(order) <= max_nodes:
        _, d, node = heapq.heappop(frontier)
        if max_depth is not None and d > max_depth:
            continue
        order.append(node)
        for c in kids[node]:
            heapq.heappush(frontier, (-float(tree.scores[c]), int(depth[c]), c))
    return order


@settings(max_examples=80)
@given(st.lists(st.tuples(trees(), st.integers(0, 30), st.integers(0, 6)), min_size=1, max_size=4))
def test_best_first_is_the_frontier_expansion_in_every_tree_of_a_forest(rows):
    forest = Forest.of([tree for tree, _, _ in rows])
    kept, keep, kept_forest = best_first(forest, np.array([b for _, b, _ in rows]), np.array([d for _, _, d in rows]))
    rebuilt = Forest.of(kept)
    for name in ("tokens", "parents", "scores", "sources", "matches", "depths", "rows", "starts"):
        np.testing.assert_array_equal(getattr(kept_forest, name), getattr(rebuilt, name))
    for (tree, budget, max_depth), start, tree_kept in zip(rows, forest.starts.tolist(), kept):
        expected = heap_best_first(tree, budget, max_depth)
        assert (keep[: len(expected)] - start).tolist() == expected
        np.testing.assert_array_equal(tree_kept.tokens, tree.tokens[expected])
        keep = keep[len(expected):]
    assert not len(keep)


@settings(max_examples=60)
@given(st.lists(trees(), min_size=1, max_size=4))
def test_a_forest_knows_each_nodes_depth_and_parent(parts):
    forest = Forest.of(parts)
    for tree, start in zip(parts, forest.starts.tolist()):
        at = slice(start, start + len(tree))
        np.testing.assert_array_equal(forest.depths[at], depths(tree.parents))
        np.testing.assert_array_equal(forest.parents[at], np.where(tree.parents >= 0, tree.parents + start, -1))


@settings(max_examples=60)
@given(st.lists(trees(12), min_size=1, max_size=3))
def test_merge_holds_every_path_of_every_tree(parts):
    root = int(parts[0].tokens[0])
    parts = [DraftTree(np.concatenate([[root], t.tokens[1:]]).astype(np.int32), t.parents, t.scores, t.sources)
             for t in parts]
    merged = merge(parts)

    def paths(t):
        out = {}
        for i in range(len(t)):
            nodes = sorted(ancestors(t.parents, i))
            out[tuple(t.tokens[nodes].tolist())] = float(t.scores[i])
        return out

    merged_paths = paths(merged)
    for part in parts:
        for path, score in paths(part).items():
            assert merged_paths[path] >= score - 1e-6
    assert len(merged_paths) == len(merged)


def test_trie_from_continuations_scores_by_weight_share_and_depth():
    tree = trie_from_continuations(7, [np.array([1, 2]), np.array([1, 3]), np.array([4])],
                                   np.array([2.0, 1.0, 1.0]), np.array([0.5, 0.5]), Source.PROMPT, 10)
    by_path = {tuple(tree.tokens[sorted(ancestors(tree.parents, i))].tolist()): float(tree.scores[i])
               for i in range(len(tree))}
    assert by_path[(7, 1)] == pytest.approx(0.75 * 0.5)
    assert by_path[(7, 1, 2)] == pytest.approx(0.5 * 0.25)
    assert by_path[(7, 4)] == pytest.approx(0.25 * 0.5)
    assert len(trie_from_continuations(7, [np.array([1, 2, 3])], np.array([1.0]), np.ones(3), Source.PROMPT, 2)) == 3


def test_best_size_follows_the_cost_curve():
    cpu = CostCurve(sizes=np.array([1, 2, 4, 8, 16]), ms=np.array([45.0, 63, 90, 95, 104]))
    free = CostCurve(sizes=np.array([1, 64]), ms=np.array([1.0, 1.0]))
    hopeless = np.full(10, 0.05, dtype=np.float32)
    assert best_size(hopeless, cpu) == 0  # draft nothing where nothing will be accepted
    assert best_size(hopeless, free) == 10
    likely = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.05], dtype=np.float32)
    k = best_size(likely, cpu)
    assert 1 <= k <= 7
    expected = (1 + np.cumsum(np.r_[0, likely])) / cpu.relative(np.arange(1, 9))
    assert k == int(np.argmax(expected))


def test_a_batch_sizes_its_common_tree_by_all_rows_gains_against_one_cost():
    steep = CostCurve(sizes=np.array([1, 2, 4, 8]), ms=np.array([85.0, 120, 159, 207]))  # 16 rows, 2 CPU cores
    sure = np.array([0.95, 0.9, 0.85], dtype=np.float32)
    hopeless = np.array([0.1, 0.05], dtype=np.float32)
    assert best_size(sure, steep) == 3  # one row alone would verify its three nodes ...
    assert best_batch_size([sure] + [hopeless] * 15, steep) == 0  # ... but not if 15 rows pay for them too
    assert best_batch_size([sure] * 16, steep) == 3


def test_padding_to_a_cheaper_larger_size():
    # Measured on 2 CPU cores: 2 and 3 rows cost more than 4 (small-M matrix kernels).
    curve = CostCurve(sizes=np.array([1, 2, 3, 4, 8, 16]), ms=np.array([45.0, 63, 70, 60, 95, 104]))
    assert [curve.padded_size(n) for n in (1, 2, 3, 4, 5, 8, 16, 40)] == [1, 4, 4, 4, 5, 8, 16, 40]
    np.testing.assert_allclose(curve.relative(np.array([1, 2, 3, 4])), np.array([45, 60, 60, 60]) / 45)
    assert curve.relative(np.array([5]))[0] == pytest.approx((60 + (95 - 60) / 4) / 45)


@given(trees(), st.integers(0, 45))
def test_only_tokens_of_the_vocabulary_survive_with_whole_paths(tree, vocab_size):
    kept = within_vocabulary(tree, vocab_size)
    assert kept.tokens[0] == tree.tokens[0]
    assert np.all((kept.tokens[1:] >= 0) & (kept.tokens[1:] < vocab_size))
    # Every root path of the original that stays inside the vocabulary is still there, and nothing else.
    def paths(t):
        out = [()]
        for i in range(1, len(t)):
            out.append(out[t.parents[i]] + (int(t.tokens[i]),))
        return set(out[1:])
    inside = {p for p in paths(tree) if all(0 <= x < vocab_size for x in p)}
    assert paths(kept) == inside


def test_merge_keeps_the_longest_match_behind_a_node_proposed_twice():
    """A recycled token that a copy also proposes carries the copy's matched length (what calibration keys on)."""
    copy = DraftTree(np.array([5, 1], np.int32), np.array([-1, 0], np.int32), np.array([1, .3], np.float32),
                     np.array([0, int(Source.PROMPT)], np.uint8), np.array([0, 12], np.int32))
    recycled = DraftTree(np.array([5, 1], np.int32), np.array([-1, 0], np.int32), np.array([1, .8], np.float32),
                         np.array([0, int(Source.RECYCLE)], np.uint8), np.array([0, 0], np.int32))
    merged = merge([copy, recycled])
    assert merged.sources[1] == Source.RECYCLE and merged.matches[1] == 12


def chain(tokens: list[int], scores: list[float], source: Source) -> DraftTree:
    """A one-path trie from the root ``tokens[0]``, its nodes proposed by ``source`` with these path scores."""
    n = len(tokens)
    return DraftTree(np.array(tokens, np.int32), np.arange(-1, n - 1, dtype=np.int32), np.array(scores, np.float32),
                     np.array([0] + [int(source)] * (n - 1), np.uint8))


def test_merge_keeps_each_nodes_own_estimate_whichever_drafter_won_its_parent():
    """A copy's node under a token that recycling also proposed (and scored higher) keeps the copy's conditional
    estimate: its score is the merged parent's times the copy's 0.9, not the copy's path score under a parent
    worth more (which read as an estimate of 0.3 / 0.8 and put a sure copy in a doubtful calibration cell)."""
    merged = merge([chain([5, 1, 2], [1, .3, .27], Source.PROMPT), chain([5, 1, 9], [1, .8, .08], Source.RECYCLE)])
    assert merged.tokens.tolist() == [5, 1, 2, 9] and merged.sources[1] == Source.RECYCLE
    np.testing.assert_allclose(merged.scores, [1, .8, .8 * .9, .8 * .1], rtol=1e-6)


def test_merge_picks_the_higher_estimate_not_the_higher_path_score():
    """The copy reaches token 2 through a likelier parent (path 0.45, estimate 0.5); recycling through a less likely
    one (path 0.27, estimate 0.9): the merged node is recycling's, priced at the merged parent times 0.9."""
    merged = merge([chain([5, 1, 2], [1, .9, .45], Source.PROMPT), chain([5, 1, 2], [1, .3, .27], Source.RECYCLE)])
    assert merged.sources.tolist() == [0, int(Source.PROMPT), int(Source.RECYCLE)]
    np.testing.assert_allclose(merged.scores, [1, .9, .9 * .9], rtol=1e-6)


@settings(max_examples=60)
@given(st.lists(trees(), min_size=1, max_size=4), st.integers(0, 2**32 - 1))
def test_rescore_prices_each_sibling_where_every_better_one_failed(parts, seed):
    """The forest's one-pass rescore against its definition, node by node: a node's path probability is its
    parent's times its rate times (1 - rate) of each sibling ranked above it (higher rate; ties: lower index)."""
    from retrieval_spec.calibration import AcceptanceModel

    forest = Forest.of(parts)
    rates = np.random.default_rng(seed).uniform(0.0, 0.99, len(forest.tokens))
    model = AcceptanceModel()
    model.rates = lambda features: rates  # the rates under test, whatever the cells learned
    scores = model.rescore(forest, np.zeros((len(forest.tokens), 7), np.int64))
    expected = np.ones(len(forest.tokens))
    for i in range(len(forest.tokens)):  # parents come first
        parent = forest.parents[i]
        if parent < 0:
            continue
        better = [j for j in np.flatnonzero(forest.parents == parent)
                  if rates[j] > rates[i] or (rates[j] == rates[i] and j < i)]
        expected[i] = expected[parent] * rates[i] * np.prod([1 - rates[j] for j in better])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-12)


def test_merge_keeps_negative_tokens_apart_as_a_damaged_file_may_hold_them():
    """Hostile drafts reach the merge before the vocabulary check: -1 and -2 are tokens like any other there."""
    a = chain([5, -1, 7], [1, .9, .8], Source.CORPUS)
    b = chain([5, -1, -2], [1, .8, .5], Source.PROMPT)
    c = chain([5, 3, -1], [1, .7, .6], Source.PROMPT)
    merged = merge([a, b, c])
    paths = {tuple(merged.tokens[[i for i in sorted(ancestors(merged.parents, n))]].tolist()) for n in range(len(merged))}
    assert paths == {(5,), (5, -1), (5, -1, 7), (5, -1, -2), (5, 3), (5, 3, -1)} and len(merged) == 6
