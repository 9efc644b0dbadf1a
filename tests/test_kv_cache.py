"""The rows' key/value cache (``kv_cache.TreeCache``) through the model verifier: commit, rollback and keep rows,
each against the cache of plain forwards over the same tokens."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from conftest import children_lists, tiny_model
from test_lossless_tiny import prompts
from retrieval_spec.acceptance import accept
from retrieval_spec.kv_cache import TreeCache
from retrieval_spec.tree import DraftTree, Source, trie_from_continuations
from retrieval_spec.verifier import PhaseTimer, RowDraft
from retrieval_spec.verify import ModelVerifier


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def plain_cache(model, tokens: np.ndarray):
    """The cache of one plain forward over ``tokens``."""
    with torch.inference_mode():
        return model(torch.as_tensor(tokens[None], dtype=torch.long), use_cache=True).past_key_values


def assert_row_holds(verifier: ModelVerifier, row: int, reference) -> None:
    """Row ``row`` of the verifier's cache holds, in its first slots, exactly the reference cache's entries."""
    for ours, theirs in zip(verifier.cache.cache.layers, reference.layers):
        n = theirs.keys.shape[2]
        torch.testing.assert_close(ours.keys[row : row + 1, :, :n], theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.values[row : row + 1, :, :n], theirs.values, atol=1e-5, rtol=1e-4)


def test_commit_keeps_exactly_each_rows_path_in_a_batch(model):
    """Random trees, random accepted paths, rows of different lengths (one with an empty cache): after each
    commit every row's cache equals the cache of a plain forward over that row's tokens."""
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 96, n).astype(np.int32) for n in (6, 13, 1)]
    verifier = ModelVerifier(model)
    verifier.reset(contexts)
    for _ in range(5):
        trees = [trie_from_continuations(int(c[-1]), [rng.integers(0, 96, int(rng.integers(1, 6))) for _ in range(3)],
                                         np.array([3.0, 2.0, 1.0]), np.full(6, 0.9), Source.PROMPT, 12)
                 for c in contexts]
        verifier.verify([RowDraft(t, None, c) for t, c in zip(trees, contexts)], int(rng.integers(0, 16)),
                        PhaseTimer(time.perf_counter))
        accepted = []
        for tree in trees:
            kids, path = children_lists(tree.parents), [0]
            while kids[path[-1]] and rng.random() < 0.7:
                path.append(int(rng.choice(kids[path[-1]])))
            accepted.append(np.array(path, dtype=np.int32))
        verifier.commit(accepted)
        contexts = [np.concatenate([c, t.tokens[a[1:]], rng.integers(0, 96, 1)]).astype(np.int32)
                    for c, t, a in zip(contexts, trees, accepted)]
        for b, context in enumerate(contexts):
            assert verifier.cache.lengths[b] == len(context) - 1
            with torch.no_grad():
                plain = model(torch.as_tensor(context[None, :-1], dtype=torch.long), use_cache=True).past_key_values
            for ours, theirs in zip(verifier.cache.cache.layers, plain.layers):
                n = len(context) - 1
                torch.testing.assert_close(ours.keys[b : b + 1, :, :n], theirs.keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(ours.values[b : b + 1, :, :n], theirs.values, atol=1e-5, rtol=1e-4)


def test_commit_of_a_path_that_skips_a_branch_equals_plain_decodings_cache(model):
    prompt = prompts(9, 1)[0]
    verifier = ModelVerifier(model)
    verifier.reset([prompt])
    with torch.inference_mode():
        first = int(model(torch.as_tensor(prompt[None])).logits[0, -1].argmax())
    wrong = (first + 1) % 96
    # Root, then a wrong branch of two nodes, then the right token: the accepted path is not contiguous.
    tree = DraftTree(np.array([prompt[-1], wrong, 5, first], np.int32), np.array([-1, 0, 1, 0], np.int32),
                     np.array([1, .9, .8, .5], np.float32), np.array([0, 1, 1, 1], np.uint8))
    result = verifier.verify([RowDraft(tree, None, prompt)], 0, PhaseTimer(time.perf_counter))[0]
    accepted, new_tokens = accept(tree, result.node_tokens)
    assert accepted.tolist() == [0, 3]
    verifier.commit([accepted])
    full = np.concatenate([prompt, [first]])
    reference = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.as_tensor(full[None]), past_key_values=reference)
    assert verifier.cache.lengths.tolist() == [len(full)]
    for ours, theirs in zip(verifier.cache.cache.layers, reference.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)


def test_rollback_forgets_the_last_forward_and_keep_rows_keeps_each_rows_entries(model):
    rng = np.random.default_rng(1)
    contexts = [rng.integers(0, 96, n).astype(np.int32) for n in (9, 4, 15)]
    verifier = ModelVerifier(model)
    verifier.reset(contexts)
    tree = DraftTree.chain(np.array([0, 5, 6, 7], np.int32), Source.PROMPT)
    rows = [RowDraft(DraftTree.chain(np.append(c[-1:], [5, 6, 7]).astype(np.int32), Source.PROMPT), None, c)
            for c in contexts]
    assert len(tree) == 4
    verifier.verify(rows, 8, PhaseTimer(time.perf_counter))
    verifier.rollback()
    assert verifier.cache.lengths.tolist() == [len(c) - 1 for c in contexts]
    for b, context in enumerate(contexts):
        assert_row_holds(verifier, b, plain_cache(model, context[:-1]))
    verifier.keep_rows(np.array([2, 0]))
    assert verifier.cache.lengths.tolist() == [len(contexts[2]) - 1, len(contexts[0]) - 1]
    assert verifier.cache.width == len(contexts[2]) - 1
    for b, context in enumerate([contexts[2], contexts[0]]):
        assert_row_holds(verifier, b, plain_cache(model, context[:-1]))
    verifier.verify(rows[::2][::-1], 0, PhaseTimer(time.perf_counter))  # the kept rows verify on
    verifier.commit([np.array([0, 1]), np.array([0, 1, 2])])
    for b, (context, kept) in enumerate([(contexts[2], 2), (contexts[0], 3)]):
        assert_row_holds(verifier, b, plain_cache(model, np.concatenate([context, [5, 6, 7][: kept - 1]])))


def test_the_cache_never_copies_itself_between_doublings(model):
    """A verification writes its slots into the buffers in place and a commit moves only accepted slots: the
    buffers are the same memory from step to step until they fill, then twice as large."""
    rng = np.random.default_rng(2)
    context = rng.integers(0, 96, 30).astype(np.int32)
    verifier = ModelVerifier(model)
    verifier.reset([context])
    layer = verifier.cache.cache.layers[0]
    memory, capacity = layer.buffer_keys.data_ptr(), layer.buffer_keys.shape[2]
    grown = []
    for step in range(40):
        tree = random_chain(rng, context)
        verifier.verify([RowDraft(tree, None, context)], len(tree), PhaseTimer(time.perf_counter))
        verifier.commit([np.arange(len(tree))])
        context = np.concatenate([context, tree.tokens[1:], rng.integers(0, 96, 1)]).astype(np.int32)
        if layer.buffer_keys.data_ptr() != memory:
            grown.append((layer.buffer_keys.shape[2], capacity))
            memory, capacity = layer.buffer_keys.data_ptr(), layer.buffer_keys.shape[2]
    assert grown and all(new == 2 * old for new, old in grown)
    assert_row_holds(verifier, 0, plain_cache(model, context[:-1]))


def random_chain(rng, context: np.ndarray) -> DraftTree:
    return DraftTree.chain(np.append(context[-1:], rng.integers(0, 96, int(rng.integers(1, 6)))).astype(np.int32),
                           Source.PROMPT)


def test_layers_of_different_shapes_keep_a_store_each_and_commit_alike():
    """Layers that differ in heads or head size (keys unlike values included) share buffers only with their own
    kind; a commit and a row selection move every layer's entries as the per-layer definition would."""
    torch.manual_seed(0)
    shapes = [((2, 8), (2, 8)), ((4, 16), (4, 12)), ((2, 8), (2, 8))]  # (heads, dim) of keys, of values
    lengths = [5, 3]
    prefixes = []
    for n in lengths:
        prefix = DynamicCache()
        for index, ((kh, kd), (vh, vd)) in enumerate(shapes):
            prefix.update(torch.randn(1, kh, n, kd), torch.randn(1, vh, n, vd), index)
        prefixes.append(prefix)
    cache = TreeCache()
    cache.load_rows(prefixes, lengths, [0, 1])
    layers = cache.cache.layers
    assert layers[0].store is layers[2].store and layers[1].store is not layers[0].store
    appended = []  # a forward of 3 nodes per row, as the model's update calls write it
    for layer, ((kh, kd), (vh, vd)) in zip(layers, shapes):
        keys, values = torch.randn(2, kh, 3, kd), torch.randn(2, vh, 3, vd)
        layer.update(keys, values)
        appended.append((keys, values))
    expected = []
    for layer, (keys, values) in zip(layers, appended):
        expected.append([(torch.cat([layer.keys[b, :, : lengths[b]], keys[b, :, nodes]], dim=1),
                          torch.cat([layer.values[b, :, : lengths[b]], values[b, :, nodes]], dim=1))
                         for b, nodes in enumerate([[0, 2], [0, 1, 2]])])
    cache.commit([np.array([0, 2]), np.array([0, 1, 2])])
    assert cache.lengths.tolist() == [7, 6]
    for layer, rows in zip(layers, expected):
        for b, (keys, values) in enumerate(rows):
            torch.testing.assert_close(layer.keys[b, :, : cache.lengths[b]], keys)
            torch.testing.assert_close(layer.values[b, :, : cache.lengths[b]], values)
    cache.keep_rows(np.array([1]))
    for layer, rows in zip(layers, expected):
        torch.testing.assert_close(layer.keys[0, :, :6], rows[1][0])
        torch.testing.assert_close(layer.values[0, :, :6], rows[1][1])
