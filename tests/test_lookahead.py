"""Lookahead decoding: the Jacobi window's mask and positions (numpy), the pool's updates and bounds, its
persistence, and that the branch computes exactly what plain forwards over its sequences compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import StubTokenizer, plain_greedy, tiny_model
from test_lossless_tiny import CPU_LIKE, FREE, prompts
from retrieval_spec.drafters.lookahead import LookaheadConfig, LookaheadDrafter
from retrieval_spec.errors import TokenizerMismatchError
from retrieval_spec.config import GenerationConfig
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.tree import DraftTree, StepFeedback
from retrieval_spec.verifier import RowDraft
from retrieval_spec.verify import ModelVerifier


def feedback(branch_tokens):
    return StepFeedback(tree=DraftTree.empty(0), accepted_nodes=np.array([0], np.int32),
                        new_tokens=np.array([1], np.int32), branch_tokens=np.asarray(branch_tokens, np.int32))


@pytest.mark.parametrize("window,ngram", [(1, 2), (3, 2), (4, 4), (5, 3)])
def test_every_window_node_sees_one_consecutive_guessed_sequence(window, ngram):
    drafter = LookaheadDrafter(LookaheadConfig(window=window, ngram=ngram))
    drafter.start(0, np.arange(50, dtype=np.int32))
    branch = drafter.branch(0, np.array([1], np.int32))
    assert len(branch) == window * (ngram - 1)
    for node in range(len(branch)):
        seen = np.flatnonzero(branch.visible[node])
        assert sorted(branch.offsets[seen].tolist()) == list(range(1, branch.offsets[node] + 1))


def test_observe_pools_each_column_and_advances_the_window():
    drafter = LookaheadDrafter(LookaheadConfig(window=2, ngram=3, guesses=2))
    drafter.windows["a"] = np.array([[10, 11], [20, 21]], np.int32)  # level 0, level 1
    drafter.windows["b"] = np.array([[12, 13], [22, 23]], np.int32)
    drafter.observe("a", feedback([0, 0, 30, 31]))  # argmax at level 1 (the top) is [30, 31]
    assert drafter.pool == {10: [(20, 30)], 11: [(21, 31)]}
    np.testing.assert_array_equal(drafter.windows["a"], [[20, 21], [30, 31]])
    np.testing.assert_array_equal(drafter.windows["b"], [[12, 13], [22, 23]])  # each request has its own window
    tree = drafter.propose("b", np.array([5, 10], np.int32), budget=8)  # the pool is shared
    assert tree.tokens.tolist() == [10, 20, 30]
    drafter.finish("a")
    assert list(drafter.windows) == ["b"]


def test_pool_keeps_the_newest_guesses_and_a_bounded_number_of_keys():
    drafter = LookaheadDrafter(LookaheadConfig(window=1, ngram=2, guesses=2, max_keys=3))
    for token in (1, 2, 3):
        drafter.add(7, (token,))
    assert drafter.pool[7] == [(2,), (3,)]
    drafter.add(7, (2,))  # seen again: newest
    assert drafter.pool[7] == [(3,), (2,)]
    for key in (8, 9, 10):
        drafter.add(key, (1,))
    assert list(drafter.pool) == [8, 9, 10]  # 7 was refreshed least recently: evicted


def test_pool_saves_and_loads_pinned_to_the_tokenizer(tmp_path):
    drafter = LookaheadDrafter(LookaheadConfig(window=2, ngram=3, guesses=3))
    drafter.add(4, (5, 6))
    drafter.add(4, (7, 8))
    drafter.add(9, (1, 2))
    drafter.save(tmp_path, "tok-a")
    again = LookaheadDrafter(LookaheadConfig(window=2, ngram=3, guesses=3))
    again.load(tmp_path, "tok-a", 10_000)
    assert again.pool == drafter.pool
    with pytest.raises(TokenizerMismatchError, match="tok-a"):
        again.load(tmp_path, "tok-b", 10_000)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_branch_logits_equal_plain_forwards_over_each_nodes_sequence(kind):
    model = tiny_model(kind)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 96, 12).astype(np.int32)
    drafter = LookaheadDrafter(LookaheadConfig(window=3, ngram=3))
    drafter.start(0, prompt)
    branch = drafter.branch(0, prompt)
    tree = DraftTree.from_paths(int(prompt[-1]), [rng.integers(0, 96, 3)], [np.array([.9, .8, .7])], 1)
    verifier = ModelVerifier(model)
    verifier.reset([prompt])
    logits = verifier._logits(*verifier._step_inputs([RowDraft(tree, branch, prompt)], 16))[0]
    with torch.no_grad():
        tree_alone = ModelVerifier(model)
        tree_alone.reset([prompt])
        alone = tree_alone._logits(*tree_alone._step_inputs([RowDraft(tree, None, prompt)], 0))[0]
        torch.testing.assert_close(logits[: len(tree)], alone, atol=1e-4, rtol=1e-4)
        for node in range(len(branch)):
            seen = np.flatnonzero(branch.visible[node])
            sequence = branch.tokens[seen[np.argsort(branch.offsets[seen])]]
            ids = torch.as_tensor(np.concatenate([prompt, sequence])[None], dtype=torch.long)
            expected = model(ids).logits[0, -1]
            torch.testing.assert_close(logits[len(tree) + node], expected, atol=1e-4, rtol=1e-4)


def test_pool_drafts_are_accepted_and_lossless_on_a_tiny_model():
    model = tiny_model("llama")
    generator = SpeculativeGenerator(model, StubTokenizer(), [LookaheadDrafter()], cost_curve=FREE)
    for prompt in prompts(4, 4):
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=40, tree_budget=8))
        np.testing.assert_array_equal(result.tokens, plain_greedy(model, prompt, 40))
        assert result.stats.accepted_by_source.get("pool", 0) > 0


def test_the_window_stays_off_where_it_costs_more_than_a_step():
    """On a CPU-like cost curve 12 window rows cost about twice a step: the window never runs, nothing is drafted."""
    model = tiny_model("llama")
    drafter = LookaheadDrafter()
    generator = SpeculativeGenerator(model, StubTokenizer(), [drafter], cost_curve=CPU_LIKE)
    result = generator.generate(prompts(4, 1)[0], GenerationConfig(max_new_tokens=20))
    assert result.stats.steps == 20 and result.stats.drafted_nodes == 0 and not drafter.pool
