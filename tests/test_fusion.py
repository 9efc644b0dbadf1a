"""Fusion without a model: the cost-sized tree shrinks to nothing where nothing is accepted, and grows where
copying pays. Greedy acceptance is replayed against a known output (ANCHORS.md, "A fast way to tune")."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_spec.acceptance import accept
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.fusion import TreeFuser
from retrieval_spec.sizing import CostCurve
from retrieval_spec.tree import StepFeedback, depths

# Relative costs measured for SmolLM2-135M on 2 CPU cores (ANCHORS.md).
CPU = CostCurve(sizes=np.array([1, 2, 4, 8, 16, 32, 64]), ms=np.array([45.0, 63, 90, 94.5, 103.5, 121.5, 180]))
VOCAB = 500


def replay(fuser: TreeFuser, prompt: np.ndarray, output: np.ndarray) -> tuple[float, float, list[int]]:
    """Decode ``output`` greedily with ``fuser``; return tokens/step, relative cost per token, nodes per step."""
    fuser.start(0, prompt)
    context = np.concatenate([prompt, output])
    pos, steps, cost, sizes = 0, 0, 0.0, []
    while pos < len(output):
        tree = fuser.propose(0, context[: len(prompt) + pos], 64, max_depth=len(output) - pos - 1)
        targets = output[np.minimum(pos + depths(tree.parents), len(output) - 1)]  # greedy choice on the true path
        path, new_tokens = accept(tree, targets)
        top = np.tile(output[np.minimum(pos + np.arange(len(tree)), len(output) - 1)][:, None], (1, 8))
        fuser.observe(0, StepFeedback(tree=tree, accepted_nodes=path, new_tokens=new_tokens,
                                      top_tokens=top.astype(np.int32)))
        cost += float(CPU.relative(np.array([len(tree)]))[0])
        sizes.append(len(tree) - 1)
        pos += len(new_tokens)
        steps += 1
    return len(output) / steps, cost / len(output), sizes


def test_random_text_drafts_nothing_after_a_few_steps():
    rng = np.random.default_rng(0)
    fuser = TreeFuser(make_drafters("auto", VOCAB), CPU, VOCAB)
    prompt = rng.integers(0, VOCAB, 300).astype(np.int32)
    _, cost_per_token, sizes = replay(fuser, prompt, rng.integers(0, VOCAB, 400).astype(np.int32))
    assert cost_per_token <= 1.05  # overhead against plain decoding (1.0 per token) stays within 5%
    assert sum(sizes[-200:]) <= 10


def test_copyable_text_is_drafted_and_pays():
    rng = np.random.default_rng(1)
    fuser = TreeFuser(make_drafters("pld", VOCAB), CPU, VOCAB)
    document = rng.integers(0, VOCAB, 300).astype(np.int32)
    output = np.concatenate([document[50:150], rng.integers(0, VOCAB, 20), document[200:280]]).astype(np.int32)
    tokens_per_step, cost_per_token, sizes = replay(fuser, document, output)
    assert tokens_per_step > 3
    assert cost_per_token < 0.6  # predicted speedup above 1.6x


def test_a_long_verbatim_run_is_drafted_deeper_than_a_chance_match():
    """A 200-token verbatim copy of the prompt: once the run is long, whole copied spans are verified at once."""
    rng = np.random.default_rng(2)
    document = rng.integers(0, VOCAB, 400).astype(np.int32)
    fuser = TreeFuser(make_drafters("pld", VOCAB), CostCurve.flat(64), VOCAB)
    tokens_per_step, _, sizes = replay(fuser, document, document[100:300].copy())
    assert tokens_per_step > 12  # the old 8-deep copies capped a step at 9 tokens
    assert max(sizes) > 16


def test_acceptance_is_learned_per_matched_length_and_depth():
    from retrieval_spec.calibration import AcceptanceModel
    from retrieval_spec.tree import DraftTree

    model = AcceptanceModel()
    # Two copies side by side: one after a 20-token match (always right), one after a 1-token match (never).
    tree = DraftTree(tokens=np.arange(7, dtype=np.int32), parents=np.array([-1, 0, 1, 2, 0, 4, 5], np.int32),
                     scores=np.array([1, .5, .4, .3, .5, .4, .3], np.float32),
                     sources=np.array([0, 1, 1, 1, 1, 1, 1], np.uint8),
                     matches=np.array([0, 20, 20, 20, 1, 1, 1], np.int32))
    features = model.features(tree)
    tested = np.array([False, True, True, True, True, False, False])
    for _ in range(50):
        model.update(features, tested, hits=np.array([False, True, True, True, False, False, False]))
    rates = model.rates(features)
    assert rates[1] > 0.9 and rates[2] > 0.9 and rates[4] < 0.1
    rescored = model.rescore(tree, features)
    assert rescored.scores[3] > 0.8 > 0.1 > rescored.scores[4]
    summary = model.summary()["prompt"]
    assert summary["by_matched_length"]["16-31"] > 0.9 and summary["by_matched_length"]["1"] < 0.1


def fuser_of(tree) -> TreeFuser:
    """A fuser on a flat curve whose only drafter proposes ``tree`` at every step."""
    from retrieval_spec.drafters.base import Drafter

    class Fixed(Drafter):
        def propose(self, request, context, budget):
            return tree

    return TreeFuser([Fixed()], CostCurve.flat(64), VOCAB)


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
    ranked = fuser.rank(0, np.array([7], np.int32), 64)
    rates = fuser.acceptance.rates(fuser.acceptance.features(tree))
    by_token = dict(zip(ranked.tokens.tolist(), ranked.scores.tolist()))
    assert by_token[1] == pytest.approx(rates[1]) and by_token[2] == pytest.approx(rates[2] * (1 - rates[1]))

    fuser.observe(0, StepFeedback(tree=ranked, accepted_nodes=np.array([0, 1]), new_tokens=np.array([1, 9])))
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
        ranked = fuser.rank(0, context, 64)
        fuser.observe(0, StepFeedback(tree=ranked, accepted_nodes=np.array([0, 1]), new_tokens=np.array([1, 9])))
        ranked = fuser.rank(1, context, 64)
        fuser.observe(1, StepFeedback(tree=ranked, accepted_nodes=np.array([0]), new_tokens=np.array([5])))
    good, bad = fuser.rank(0, context, 64).scores[1], fuser.rank(1, context, 64).scores[1]
    assert good > 0.6 and bad < 0.3
