"""The model verifier on its own: a tree's logits equal plain forwards over each node's sequence (after a cache, in
a prefill, padded, in a batch of rows of different lengths), the masks follow each layer type, and the results
carry the target's tokens and top tokens."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from conftest import tiny_model
from retrieval_spec.config import GenerationConfig
from retrieval_spec.tree import DraftTree, Source, trie_from_continuations
from retrieval_spec.verifier import PhaseTimer, RowDraft
from retrieval_spec import verify
from retrieval_spec.verify import ModelVerifier

FAMILIES = ["llama", "mistral", "gemma2", "gpt2", "qwen2-sliding"]


def plain_logits(model, tokens: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0, -1].float()


def node_sequence(context: np.ndarray, tree: DraftTree, node: int) -> np.ndarray:
    """The context, then the tokens of the path from the root's child to ``node``."""
    path = []
    while node > 0:
        path.append(int(tree.tokens[node]))
        node = int(tree.parents[node])
    return np.concatenate([context, path[::-1]]).astype(np.int64)


def assert_plain(model, logits: torch.Tensor, rows: list[RowDraft]) -> None:
    """Every node's logits (B, T, vocab) are those of a plain forward over its row's context and path."""
    for b, row in enumerate(rows):
        for node in range(len(row.tree)):
            expected = plain_logits(model, node_sequence(row.context, row.tree, node))
            torch.testing.assert_close(logits[b, node].float(), expected, atol=1e-4, rtol=1e-4)


def random_tree(rng, context: np.ndarray) -> DraftTree:
    paths = [rng.integers(0, 96, int(rng.integers(1, 6))) for _ in range(4)]
    return trie_from_continuations(int(context[-1]), paths, np.arange(4, 0, -1.0), np.full(6, 0.9), Source.PROMPT, 14)


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_batch_of_trees_gets_the_logits_of_plain_forwards(kind):
    """Rows of 12, 3 and 20 cached tokens (past the 8-token windows of the sliding families), padded to 24 nodes:
    every node's logits are those of a plain forward over its own sequence."""
    model = tiny_model(kind)
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 96, n).astype(np.int32) for n in (13, 4, 21)]
    verifier = ModelVerifier(model)
    verifier.reset(contexts)
    rows = [RowDraft(random_tree(rng, c), None, c) for c in contexts]
    with torch.inference_mode():
        assert_plain(model, verifier._logits(*verifier._step_inputs(rows, 24)), rows)


@pytest.mark.parametrize("split", [False, True], ids=["one forward", "after the context's"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_a_tree_in_the_prefill_gets_the_logits_of_plain_forwards(kind, split, monkeypatch):
    """Two rows' prompts (17 and 9 tokens, past the 8-token windows): each tree in its prompt's forward, or (a long
    prompt's, here the first row's alone) in a forward of its own after the prompt's causal one; then a step on the
    cache both leave."""
    if split:
        monkeypatch.setattr(verify, "SPLIT_PREFILL_AT", 12)  # the 16 tokens before the first root are a long prompt
    model = tiny_model(kind)
    rng = np.random.default_rng(1)
    contexts = [rng.integers(0, 96, n).astype(np.int32) for n in (17, 9)]
    rows = [RowDraft(random_tree(rng, context), None, context) for context in contexts]
    verifier = ModelVerifier(model)
    with torch.inference_mode():
        assert_plain(model, verifier._prefill(contexts, [row.tree for row in rows]), rows)
    assert verifier.cache.lengths.tolist() == [16, 8]  # the trees' slots await the commit
    verifier.commit([np.array([0]), np.array([0])])  # each root; the next step's roots follow the prompts
    nexts = [np.append(context, rng.integers(0, 96)).astype(np.int32) for context in contexts]
    rows = [RowDraft(random_tree(rng, context), None, context) for context in nexts]
    with torch.inference_mode():
        assert_plain(model, verifier._logits(*verifier._step_inputs(rows, 0)), rows)


def test_masks_follow_each_layer_type():
    """A model mixing full and sliding layers gets one mask per layer type: a node sees every cached slot under
    full attention, and only the last ``window`` positions (itself included) under sliding attention."""
    model = tiny_model("gemma2")  # sliding window 8
    verifier = ModelVerifier(model)
    lengths = np.array([20])
    offsets = np.array([[0, 1, 2]])
    visible = np.tril(np.ones((1, 3, 3), dtype=bool))
    positions, masks = verifier._attention(lengths, 20, offsets, visible)
    assert set(masks) == {"full_attention", "sliding_attention"} and positions.tolist() == [[20, 21, 22]]
    full, sliding = (masks[name][0, 0] == 0 for name in ("full_attention", "sliding_attention"))
    assert full[2, :20].all() and full[2, 20:].tolist() == [True, True, True]
    assert sliding[2].nonzero().flatten().tolist() == [15, 16, 17, 18, 19, 20, 21, 22]  # positions 15..22
    assert sliding[0].nonzero().flatten().tolist() == [13, 14, 15, 16, 17, 18, 19, 20]


def test_results_carry_the_node_tokens_and_the_top_tokens_of_every_node():
    model = tiny_model("llama")
    rng = np.random.default_rng(2)
    context = rng.integers(0, 96, 10).astype(np.int32)
    tree = random_tree(rng, context)
    verifier = ModelVerifier(model)
    timer = PhaseTimer(time.perf_counter)
    result = verifier.start([RowDraft(tree, None, context)], GenerationConfig(), 5, timer)[0]
    assert set(timer.ms) == {"forward"}
    assert result.top_nodes.tolist() == list(range(len(tree))) and result.top_tokens.shape == (len(tree), 5)
    for node in range(len(tree)):
        expected = plain_logits(model, node_sequence(context, tree, node))
        assert result.node_tokens[node] == int(expected.argmax())
        assert result.top_tokens[node].tolist() == expected.topk(5).indices.tolist()


def test_a_tree_forward_on_the_cpu_runs_grouped_attention_and_leaves_the_environment_as_it_was(monkeypatch):
    """A several-node forward on the CPU reaches SDPA with the key/value heads as they are (``enable_gqa``, no
    copy per query head), a one-token forward as transformers chooses (our switch unset); the switch is gone after
    the call, and a value the user set is neither used against their choice nor removed."""
    import os

    from retrieval_spec.verify import GQA_SWITCH

    model = tiny_model("llama")  # 4 query heads on 2 key/value heads
    calls, switched = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        calls.append((query.shape[2], key.shape[1], kwargs.get("enable_gqa", False)))
        switched.append(os.environ.get(GQA_SWITCH))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    rng = np.random.default_rng(1)
    context = rng.integers(0, 96, 30).astype(np.int32)
    verifier = ModelVerifier(model)
    verifier.reset([context])  # the prefill: 29 tokens
    assert calls and all(queries == 29 and heads == 2 and gqa for queries, heads, gqa in calls)
    calls.clear()
    row = RowDraft(random_tree(rng, context), None, context)
    with torch.inference_mode():
        logits = verifier._logits(*verifier._step_inputs([row], len(row.tree)))
    assert calls and all(queries == len(row.tree) and heads == 2 and gqa for queries, heads, gqa in calls)
    assert GQA_SWITCH not in os.environ
    for node in range(len(row.tree)):
        torch.testing.assert_close(logits[0, node].float(), plain_logits(model, node_sequence(context, row.tree, node)),
                                   atol=1e-4, rtol=1e-4)
    calls.clear()
    verifier.cache.rollback()
    plain = RowDraft(DraftTree.empty(int(context[-1])), None, context)
    with torch.inference_mode():
        verifier._logits(*verifier._step_inputs([plain], 1))
    assert calls and switched[-len(calls):] == [None] * len(calls)  # left to transformers, which copies nothing
    calls.clear()
    verifier.cache.rollback()
    monkeypatch.setenv(GQA_SWITCH, "0")
    with torch.inference_mode():
        verifier._logits(*verifier._step_inputs([row], len(row.tree)))
    assert calls and not any(gqa for _, _, gqa in calls) and os.environ[GQA_SWITCH] == "0"
