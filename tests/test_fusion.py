"""Fusion without a model: acceptance is learned per context cell, siblings exclude each other, and a request's
own record of a source prices it. (Whole decodes on a replay, where the cost-sized tree shrinks to nothing or grows
with copying: ``test_loop.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_spec.fusion import TreeFuser
from retrieval_spec.tree import DraftTree, Forest, Source, StepFeedback

VOCAB = 500


def test_acceptance_is_learned_per_matched_length_and_depth():
    from retrieval_spec.calibration import AcceptanceModel
    from retrieval_spec.tree import DraftTree

    model = AcceptanceModel()
    # Two copies side by side: one after a 20-token match (always right), one after a 1-token match (never).
    tree = DraftTree(tokens=np.arange(7, dtype=np.int32), parents=np.array([-1, 0, 1, 2, 0, 4, 5], np.int32),
                     scores=np.array([1, .5, .4, .3, .5, .4, .3], np.float32),
                     sources=np.array([0, 1, 1, 1, 1, 1, 1], np.uint8),
                     matches=np.array([0, 20, 20, 20, 1, 1, 1], np.int32))
    forest = Forest.of([tree])
    features = model.features(forest, np.zeros(1, bool), np.zeros((1, len(Source)), np.int64))
    tested = np.array([False, True, True, True, True, False, False])
    for _ in range(50):
        model.update(features, tested, hits=np.array([False, True, True, True, False, False, False]))
    rates = model.rates(features)
    assert rates[1] > 0.9 and rates[2] > 0.9 and rates[4] < 0.1
    rescored = model.rescore(forest, features)
    assert rescored[3] > 0.8 > 0.1 > rescored[4]
    summary = model.summary()["prompt"]
    assert summary["by_matched_length"]["16-31"] > 0.9 and summary["by_matched_length"]["1"] < 0.1


def fuser_of(tree) -> TreeFuser:
    """A fuser on a flat curve whose only drafter proposes ``tree`` at every step."""
    from retrieval_spec.drafters.base import Drafter

    class Fixed(Drafter):
        def propose(self, request, context, budget):
            return tree

    return TreeFuser([Fixed()], VOCAB)


def test_siblings_exclude_each_other_in_scores_and_in_learning():
    """The target emits one token after a node: a second-best sibling is worth its rate only where the best one
    fails, and it is counted only where it had that chance (the best one did not win)."""
    from retrieval_spec.tree import DraftTree, Source

    # Root, a copied token (1) and a recycled alternative (2) after it, both estimated at 0.95.
    tree = DraftTree(tokens=np.array([7, 1, 2], np.int32), parents=np.array([-1, 0, 0], np.int32),
                     scores=np.array([1, .95, .95], np.float32),
                     sources=np.array([0, Source.PROMPT, Source.RECYCLE], np.uint8),
                     matches=np.array([0, 5, 0], np.int32))

    fuser = fuser_of(tree)
    fuser.start(0, np.array([7], np.int32))
    [ranked] = fuser.rank([0], [np.array([7], np.int32)], [64], [64])
    rates = fuser.acceptance.rates(fuser.acceptance.features(Forest.of([tree]), np.zeros(1, bool),
                                                            np.zeros((1, len(Source)), np.int64)))
    by_token = dict(zip(ranked.tokens.tolist(), ranked.scores.tolist()))
    assert by_token[1] == pytest.approx(rates[1]) and by_token[2] == pytest.approx(rates[2] * (1 - rates[1]))

    fuser.observe([0], [StepFeedback(tree=ranked, accepted_nodes=np.array([0, 1]), new_tokens=np.array([1, 9]))])
    trials = fuser.acceptance.trials[0]
    assert trials[Source.PROMPT] == pytest.approx(1.0) and trials[Source.RECYCLE] == 0  # ranked below the winner


def test_a_source_that_keeps_failing_in_one_request_is_priced_lower_there_than_where_it_succeeds():
    """The request's own record of a source is a feature: the same copied node, in the same global cell (source,
    estimate, matched length, depth, last step not whole), is worth less where that source keeps failing."""
    from retrieval_spec.tree import DraftTree, Source

    # Root, a copied token (1) after a 2-token match, and one more copied token (2) after it.
    tree = DraftTree(tokens=np.array([7, 1, 2], np.int32), parents=np.array([-1, 0, 1], np.int32),
                     scores=np.array([1, .5, .25], np.float32),
                     sources=np.array([0, Source.PROMPT, Source.PROMPT], np.uint8),
                     matches=np.array([0, 2, 3], np.int32))

    fuser = fuser_of(tree)
    context = np.array([7], np.int32)
    for request in (0, 1):
        fuser.start(request, context)
    for _ in range(30):
        # Request 0: the first copied token is right, the second wrong; request 1: the first is wrong. Neither
        # step accepts a whole path, so only the requests' records tell them apart.
        ranked = fuser.rank([0, 1], [context, context], [64, 64], [64, 64])
        fuser.observe([0, 1], [StepFeedback(tree=ranked[0], accepted_nodes=np.array([0, 1]), new_tokens=np.array([1, 9])),
                               StepFeedback(tree=ranked[1], accepted_nodes=np.array([0]), new_tokens=np.array([5]))])
    good, bad = (tree.scores[1] for tree in fuser.rank([0, 1], [context, context], [64, 64], [64, 64]))
    assert good > 0.6 and bad < 0.3


def test_a_batch_is_ranked_as_each_of_its_rows_alone():
    """One call ranks every row with one calibration pass: the trees equal those of ranking each row by itself."""
    from retrieval_spec.drafters.base import Drafter
    from retrieval_spec.tree import DraftTree, Source

    rng = np.random.default_rng(3)

    def random_tree(root: int) -> DraftTree:
        parents, tokens = [-1], [root]
        for i in range(1, int(rng.integers(1, 40))):
            parent = int(rng.integers(0, i))
            token = int(rng.integers(0, 30))
            if any(p == parent and t == token for p, t in zip(parents, tokens)):
                continue
            parents.append(parent)
            tokens.append(token)
        scores = np.ones(len(tokens))
        for i in range(1, len(tokens)):
            scores[i] = scores[parents[i]] * rng.uniform(0.2, 1.0)
        sources = rng.choice([Source.PROMPT, Source.RECYCLE, Source.HISTORY], len(tokens)).astype(np.uint8)
        sources[0] = Source.ROOT
        return DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32), scores.astype(np.float32), sources,
                         rng.integers(0, 40, len(tokens)).astype(np.int32))

    proposals = {request: random_tree(7) for request in range(6)}

    class Fixed(Drafter):
        def propose(self, request, context, budget):
            return proposals[request]

    model = fuser_of(proposals[0]).acceptance
    for _ in range(200):  # learned rates that differ from cell to cell
        model.update(rng.integers(0, 5, (12, 7)) * [1, 1, 1, 1, 0, 0, 0], np.ones(12, bool), rng.random(12) < 0.5)
    together, alone = TreeFuser([Fixed()], VOCAB, model), TreeFuser([Fixed()], VOCAB, model)
    context = np.array([7], np.int32)
    budgets, depths = [64, 5, 20, 0, 64, 3], [64, 64, 2, 64, 1, 64]
    ranked = together.rank(list(proposals), [context] * 6, budgets, depths)
    for request, tree in zip(proposals, ranked):
        [expected] = alone.rank([request], [context], [budgets[request]], [depths[request]])
        np.testing.assert_array_equal(tree.tokens, expected.tokens)
        np.testing.assert_array_equal(tree.parents, expected.parents)
        np.testing.assert_allclose(tree.scores, expected.scores, rtol=1e-6)


def test_learning_from_the_steps_own_forest_equals_learning_from_its_rows_in_another_order():
    """observe() told of exactly the rows rank() ranked, in order, learns from the forest the ranking kept; told of
    them in another order, it rebuilds the forest from each row's tree: the same counts and records either way."""
    from retrieval_spec.drafters.base import Drafter

    rng = np.random.default_rng(11)
    forest = random_forest(rng, rows=5)
    ends = [*forest.starts.tolist()[1:], len(forest.tokens)]
    proposals = {}
    for request, (a, b) in enumerate(zip(forest.starts.tolist(), ends)):
        tree = DraftTree(forest.tokens[a:b] + 1, np.where(forest.parents[a:b] >= 0, forest.parents[a:b] - a, -1),
                         forest.scores[a:b], forest.sources[a:b], forest.matches[a:b])
        if len(tree) > 1:
            proposals[request] = tree

    class Fixed(Drafter):
        def propose(self, request, context, budget):
            return proposals[request]

    requests = list(proposals)
    fusers = [TreeFuser([Fixed()], VOCAB), TreeFuser([Fixed()], VOCAB)]
    for fuser, order in zip(fusers, (requests, requests[::-1])):
        for request in requests:
            fuser.start(request, np.array([1], np.int32))
        for step in range(3):
            trees = dict(zip(requests, fuser.rank(requests, [np.array([1], np.int32)] * len(requests),
                                                  [64] * len(requests), [64] * len(requests))))
            feedbacks = []
            for request in order:
                tree = trees[request]
                child = int(np.flatnonzero(tree.parents == 0)[step % max(1, int(np.sum(tree.parents == 0)))])
                feedbacks.append(StepFeedback(tree=tree, accepted_nodes=np.array([0, child]),
                                              new_tokens=np.array([tree.tokens[child], 3])))
            fuser.observe(order, feedbacks)
    for ours, theirs in zip(fusers[0].acceptance.trials + fusers[0].acceptance.hits,
                            fusers[1].acceptance.trials + fusers[1].acceptance.hits):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert fusers[0].acceptance.trials[0].sum() > 0
    for request in requests:
        assert fusers[0]._recent[request].trials == pytest.approx(fusers[1]._recent[request].trials)
        assert fusers[0]._recent[request].hits == pytest.approx(fusers[1]._recent[request].hits)


def random_forest(rng, rows=3):
    from retrieval_spec.tree import DraftTree

    parts = []
    for _ in range(rows):
        n = int(rng.integers(1, 12))
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        tokens = [0] + list(range(1, n))  # distinct everywhere: siblings never repeat a token
        scores = np.ones(n)
        for i in range(1, n):
            scores[i] = scores[parents[i]] * rng.choice([0.0, 0.3, 0.5, 0.9, 1.0])
        sources = [0] + rng.integers(1, len(Source), n - 1).tolist()
        parts.append(DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32), scores.astype(np.float32),
                               np.array(sources, np.uint8), rng.integers(0, 40, n).astype(np.int32)))
    return Forest.of(parts)


@pytest.mark.parametrize("seed", range(5))
def test_the_compiled_features_and_rates_follow_their_definitions(seed):
    """Each node's seven cells, and the backoff's rate, from a plain loop over the model's per-level counts."""
    from retrieval_spec.calibration import DEPTH_EDGES, MATCH_EDGES, RECENT_EDGES, AcceptanceModel

    rng = np.random.default_rng(seed)
    model = AcceptanceModel()
    shape = model.config.shape
    for _ in range(50):  # counts that differ from cell to cell
        cells = np.stack([rng.integers(0, size, 20) for size in shape], axis=1)
        model.update(cells, np.ones(20, bool), rng.random(20) < 0.4)
    forest = random_forest(rng)
    whole = rng.random(len(forest.starts)) < 0.5
    recent = rng.integers(0, len(RECENT_EDGES) + 2, (len(forest.starts), len(Source)))
    features = model.features(forest, whole, recent)
    buckets = model.config.estimate_buckets
    for node in range(len(forest.tokens)):
        parent, row, source = int(forest.parents[node]), int(forest.rows[node]), int(forest.sources[node])
        estimate = 0.0 if parent < 0 or forest.scores[parent] == 0 else forest.scores[node] / forest.scores[parent]
        siblings = {int(s) for s in forest.sources[forest.parents == parent]} if parent >= 0 else set()
        assert features[node].tolist() == [
            source, int(min(estimate * buckets, buckets - 1)), int(np.digitize(forest.matches[node], MATCH_EDGES)),
            int(np.digitize(forest.depths[node], DEPTH_EDGES)), int(whole[row]), int(recent[row, source]),
            int(len(siblings) > 1)]
    rates = model.rates(features)
    for node, cells in enumerate(features.tolist()):
        rate = (cells[1] + 0.5) / buckets
        for level, (hits, trials) in enumerate(zip(model.hits, model.trials)):
            cell = np.ravel_multi_index(cells[: level + 1], shape[: level + 1])
            rate = (hits[cell] + model.config.prior_weight * rate) / (trials[cell] + model.config.prior_weight)
        assert rates[node] == pytest.approx(rate, rel=1e-9)
