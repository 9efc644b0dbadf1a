"""Token Recycling without a model: table updates, tree shape, warm start, save/load."""

from __future__ import annotations

from itertools import zip_longest

import numpy as np
import pytest

from retrieval_spec.drafters.recycling import RecyclingConfig, RecyclingDrafter, _root_row
from retrieval_spec.errors import DatastoreFormatError, TokenizerMismatchError
from retrieval_spec.tree import DraftTree, Source, StepFeedback, depths


def feedback(tokens, parents, top):
    tree = DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32),
                     np.linspace(1, 0.5, len(tokens)).astype(np.float32), np.zeros(len(tokens), np.uint8))
    return StepFeedback(tree=tree, accepted_nodes=np.array([0], np.int32), new_tokens=np.array([1], np.int32),
                        top_nodes=np.arange(len(tokens)), top_tokens=np.array(top, np.int32))


def test_observe_overwrites_the_rows_of_every_verified_token():
    drafter = RecyclingDrafter(10, RecyclingConfig(k=2, shape=(2, 1)))
    drafter.observe(0, feedback([3, 4], [-1, 0], [[5, 6], [7, 8]]))
    assert drafter.table[3].tolist() == [5, 6] and drafter.table[4].tolist() == [7, 8]
    assert drafter.known.tolist() == [i in (3, 4) for i in range(10)]
    drafter.observe(0, feedback([3], [-1], [[1, 2]]))
    assert drafter.table[3].tolist() == [1, 2]  # the newest prediction wins
    assert drafter.table.nbytes == 10 * 2 * 4


def test_observe_learns_only_the_nodes_whose_top_tokens_are_known():
    """A replay knows the target's top tokens on the recorded path alone: the other nodes' rows stay as they were."""
    drafter = RecyclingDrafter(10, RecyclingConfig(k=2, shape=(2, 1)))
    tree = DraftTree(np.array([3, 4, 5], np.int32), np.array([-1, 0, 0], np.int32),
                     np.array([1, .8, .5], np.float32), np.zeros(3, np.uint8))
    drafter.observe(0, StepFeedback(tree=tree, accepted_nodes=np.array([0, 2], np.int32),
                                    new_tokens=np.array([5, 1], np.int32), top_nodes=np.array([0, 2]),
                                    top_tokens=np.array([[5, 6], [1, 2]], np.int32)))
    assert drafter.table[3].tolist() == [5, 6] and drafter.table[5].tolist() == [1, 2]
    assert not drafter.known[4] and drafter.successors(3, 5).tolist() == [1, 2]


def test_an_unknown_token_drafts_nothing():
    drafter = RecyclingDrafter(10)
    assert len(drafter.propose(0, np.array([1, 2, 3], np.int32), 16)) == 1


def test_tree_follows_the_shape_most_likely_node_first():
    drafter = RecyclingDrafter(50, RecyclingConfig(k=3, shape=(3, 2, 1)))
    rng = np.random.default_rng(0)
    for token in range(50):
        drafter.table[token] = rng.choice(50, 3, replace=False)
    drafter.known[:] = True
    tree = drafter.propose(0, np.array([7], np.int32), 64)
    d = depths(tree.parents)
    assert [int((d == i).sum()) for i in range(4)] == [1, 3, 6, 6]  # the whole shape fits the budget
    assert tree.tokens[d == 1].tolist() == drafter.table[7].tolist()  # rank order
    assert np.all(np.diff(tree.scores[1:]) <= 0)  # most likely first
    for i in range(1, len(tree)):  # every child is one of its parent's recorded successors
        assert tree.tokens[i] in drafter.table[tree.tokens[tree.parents[i]]]
    small = drafter.propose(0, np.array([7], np.int32), 5)
    assert len(small) == 6  # budget caps the nodes ...
    np.testing.assert_array_equal(small.scores, tree.scores[:6])  # ... keeping the most likely ones


def test_warm_start_fills_only_unknown_rows_and_skips_padding():
    drafter = RecyclingDrafter(4, RecyclingConfig(k=3, shape=(3,), next_next=False))
    drafter.observe(0, feedback([1], [-1], [[2, 3, 0]]))
    successors = np.array([[-1, -1], [3, 2], [0, -1], [1, 2]], np.int32)
    drafter.warm_start(successors)
    assert drafter.table[1].tolist() == [2, 3, 0]  # learned rows win
    assert drafter.known.tolist() == [False, True, True, True]
    assert drafter.table[2].tolist() == [0, 0, 0]
    assert drafter.propose(0, np.array([2], np.int32), 8).tokens[1:].tolist() == [0]
    assert drafter.propose(0, np.array([3], np.int32), 8).tokens[1:].tolist() == [1, 2]


def test_save_load_round_trip_and_refusals(tmp_path):
    drafter = RecyclingDrafter(10, RecyclingConfig(k=2, shape=(2,)))
    drafter.observe(0, feedback([3], [-1], [[5, 6]]))
    drafter.save(tmp_path, "tok-a")
    other = RecyclingDrafter(10, RecyclingConfig(k=2, shape=(2,)))
    other.load(tmp_path, "tok-a", 10)
    np.testing.assert_array_equal(other.table, drafter.table)
    with pytest.raises(TokenizerMismatchError, match="tok-a"):
        other.load(tmp_path, "tok-b", 10)
    (tmp_path / "recycling.npz").write_bytes(b"garbage")
    with pytest.raises(DatastoreFormatError, match="recycling.npz"):
        other.load(tmp_path, "tok-a", 10)


def test_a_known_pair_of_tokens_predicts_before_the_token_alone():
    drafter = RecyclingDrafter(10, RecyclingConfig(k=2, shape=(2, 2), next_next=False))
    drafter.propose("r", np.array([5, 3], np.int32), 4)  # the token before the root is 5
    drafter.observe("r", feedback([3, 4], [-1, 0], [[6, 7], [8, 9]]))
    assert drafter.successors(5, 3).tolist() == [6, 7] and drafter.successors(3, 4).tolist() == [8, 9]
    drafter.observe("r", feedback([3], [-1], [[1, 2]]))  # after 5 3 again: the pair's row and the token's row
    after_pair = drafter.propose("r", np.array([5, 3], np.int32), 2)
    assert after_pair.tokens[1:].tolist() == [1, 2]
    drafter.table[3] = [0, 9]  # another context taught the token alone something else
    assert drafter.propose("r", np.array([5, 3], np.int32), 2).tokens[1:].tolist() == [1, 2]
    assert drafter.propose("r", np.array([7, 3], np.int32), 2).tokens[1:].tolist() == [0, 9]


def test_the_pairs_table_is_bounded_and_a_pair_that_loses_its_slot_falls_back_to_its_token():
    drafter = RecyclingDrafter(10, RecyclingConfig(k=2, shape=(2, 2), pair_slots=1, next_next=False))
    drafter.propose("r", np.array([5, 3], np.int32), 4)
    drafter.observe("r", feedback([3, 4], [-1, 0], [[6, 7], [8, 9]]))  # (5, 3), then (3, 4) in the one slot
    assert drafter.successors(3, 4).tolist() == [8, 9]
    drafter.table[3] = [1, 2]
    assert drafter.successors(5, 3).tolist() == [1, 2]  # forgotten: the token's own row
    assert drafter.pair_keys.shape == (1,) and drafter.pair_rows.shape == (1, 2)
    with pytest.raises(ValueError, match="power of two"):
        RecyclingConfig(pair_slots=3)


def test_a_node_without_successors_or_repeating_a_sibling_is_left_out_and_the_budget_goes_to_the_next_likeliest():
    """Shape (2, 2): the root's children 1 (0.6) and 2 (0.3); 1 has no recorded successors, so its subtree (0.36,
    0.18) is left out; 2's row repeats its first token (warm-start padding), so only one child of 2 is placed."""
    config = RecyclingConfig(k=2, shape=(2, 2), rank_probs=(0.6, 0.3), next_next=False)
    drafter = RecyclingDrafter(10, config)
    for token, row in ((0, [1, 2]), (2, [3, 3])):
        drafter.table[token] = row
        drafter.known[token] = True
    tree = drafter.propose(0, np.array([0], np.int32), 64)
    assert tree.tokens.tolist() == [0, 1, 2, 3] and tree.parents.tolist() == [-1, 0, 0, 2]
    np.testing.assert_allclose(tree.scores, [1.0, 0.6, 0.3, 0.18])
    assert drafter.propose(0, np.array([0], np.int32), 2).tokens.tolist() == [0, 1, 2]
    assert drafter.propose(0, np.array([0], np.int32), 1).tokens.tolist() == [0, 1]


def test_a_table_that_knows_only_the_root_drafts_its_row_whatever_the_budget():
    """Nothing below the first level can be filled: the walk stops there (the full shape has thousands of slots)."""
    drafter = RecyclingDrafter(50)
    drafter.table[7] = np.arange(10, 18)
    drafter.known[7] = True
    tree = drafter.propose(0, np.array([7], np.int32), 64)
    assert tree.tokens.tolist() == [7, *range(10, 18)] and tree.parents.tolist() == [-1] + [0] * 8


def test_the_roots_children_take_turns_with_the_other_top_tokens_where_the_root_was_chosen():
    """LogitSpec's next-next tokens: where the step chose its last token, the target's other top tokens are
    candidates for the token after it, beside the root's remembered successors."""
    drafter = RecyclingDrafter(10, RecyclingConfig(k=3, shape=(3,)))
    drafter.table[1] = [7, 8, 9]
    drafter.known[1] = True
    # The step accepted nothing and chose 1 at the root (3), where the target's top tokens were 1, 4, 7.
    drafter.observe("r", feedback([3], [-1], [[1, 4, 7]]))
    assert drafter.propose("r", np.array([3, 1], np.int32), 8).tokens[1:].tolist() == [7, 8, 4]
    assert drafter.propose("other", np.array([3, 1], np.int32), 8).tokens[1:].tolist() == [7, 8, 9]
    off = RecyclingDrafter(10, RecyclingConfig(k=3, shape=(3,), next_next=False))
    off.table[1], off.known[1] = [7, 8, 9], True
    off.observe("r", feedback([3], [-1], [[1, 4, 7]]))
    assert off.propose("r", np.array([3, 1], np.int32), 8).tokens[1:].tolist() == [7, 8, 9]


@pytest.mark.parametrize("seed", range(4))
def test_the_roots_row_takes_turns_as_defined(seed):
    """The compiled root row against its definition, on random tables and top tokens: the remembered first, then the
    other remembered successors and the step's other top tokens taking turns, each once, padded with the first; the
    root's children that only the top tokens offered are nodes of their own source."""
    rng = np.random.default_rng(seed)
    vocab = 10
    drafter = RecyclingDrafter(vocab, RecyclingConfig(k=4, shape=(4,)))
    drafter.table[:] = rng.integers(0, vocab, drafter.table.shape)
    drafter.known[:] = rng.random(vocab) < 0.6
    for _ in range(30):
        root, before = int(rng.integers(0, vocab)), int(rng.integers(-1, vocab))
        top = rng.integers(0, vocab, int(rng.integers(0, 6))).astype(np.int32)
        chosen = int(rng.choice(top)) if len(top) and rng.random() < 0.8 else -1
        extra = top[top != chosen]
        found = drafter.successors(before, root)
        remembered = [] if found is None else found.tolist()
        turns = remembered[:1] + [t for pair in zip_longest(remembered[1:], extra.tolist()) for t in pair
                                  if t is not None]
        merged = list(dict.fromkeys(turns))[:4] if len(extra) else remembered
        row, offered = _root_row(before, root, drafter.table, drafter.known, drafter.pair_keys, drafter.pair_rows,
                                 top, chosen)
        assert row.tolist() == (merged + merged[:1] * (4 - len(merged)) if merged else [])
        assert offered.tolist() == (sorted(set(merged) - set(remembered)) if len(extra) else [])
        drafter._next_next["r"] = (top, chosen)
        tree = drafter.propose("r", np.array([root] if before < 0 else [before, root], np.int32), 8)
        children = tree.parents == 0
        assert tree.tokens[children].tolist() == list(dict.fromkeys(row.tolist()))
        np.testing.assert_array_equal(tree.sources[children] == Source.NEXT_NEXT,
                                      np.isin(tree.tokens[children], offered))


def frontier_walk(drafter, before, root, first, budget):
    """The walk as a frontier of the shape's nodes under placed ones, most likely first (a heap, in Python): the
    compiled walk's oracle. Returns the tokens and parents of the tree."""
    import heapq

    from retrieval_spec.drafters.recycling import shape_order

    ranks, _, slot_parents, _ = shape_order(drafter.config.shape, drafter.config.rank_probs)
    children = {}
    for slot, parent in enumerate(slot_parents.tolist()[1:], 1):
        children.setdefault(parent, []).append(slot)
    frontier = list(children.get(0, []))
    heapq.heapify(frontier)
    node_of, rows = {0: 0}, {0: first.tolist()}
    tokens, parents = [root], [-1]
    while frontier and len(tokens) <= budget:
        slot = heapq.heappop(frontier)
        parent = node_of[int(slot_parents[slot])]
        if parent not in rows:
            found = drafter.successors(tokens[parents[parent]] if parent else before, tokens[parent])
            rows[parent] = None if found is None else found.tolist()
        row, rank = rows[parent], int(ranks[slot])
        if row is None or row[rank] in row[:rank]:
            continue
        node_of[slot] = len(tokens)
        tokens.append(row[rank])
        parents.append(parent)
        for below in children.get(slot, []):
            heapq.heappush(frontier, below)
    return tokens, parents


@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_walk_places_what_a_frontier_walk_does(seed):
    """Random partial tables (unknown rows, repeated tokens, remembered pairs), shapes and budgets."""
    rng = np.random.default_rng(seed)
    vocab = 12
    shape = tuple(int(w) for w in rng.integers(1, 4, size=rng.integers(1, 5)))
    drafter = RecyclingDrafter(vocab, RecyclingConfig(k=3, shape=shape, pair_slots=1 << int(rng.integers(0, 6)),
                                                      next_next=False))
    drafter.table[:] = rng.integers(0, vocab, drafter.table.shape)  # rows with repeats: skipped ranks
    drafter.known[:] = rng.random(vocab) < 0.7
    for _ in range(8):  # pairs, some evicting each other in small tables
        before, token = rng.integers(-1, vocab, size=2)
        drafter.propose("r", np.array([before, token] if before >= 0 else [token], np.int32), 4)
        drafter.observe("r", feedback([token], [-1], [rng.integers(0, vocab, 3).tolist()]))
    for root in range(vocab):
        for before in (-1, int(rng.integers(0, vocab))):
            first = drafter.successors(before, root)
            if first is None:
                continue
            context = np.array([root] if before < 0 else [before, root], np.int32)
            for budget in (1, 3, 10, 64):
                tree = drafter.propose("q", context, budget)
                tokens, parents = frontier_walk(drafter, before, root, first, budget)
                assert tree.tokens.tolist() == tokens and tree.parents.tolist() == parents
