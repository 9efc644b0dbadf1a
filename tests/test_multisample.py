"""Multi-sample decoding: batched rows are exact per row, sampled rows keep the target distribution, and
cross-path drafting copies from sibling paths (numpy alone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import StubTokenizer, plain_greedy, tiny_model
from test_lossless_tiny import FREE, prompts
from test_sampling import PROMPT, SEED_BASE, VOCAB, RandomTreeDrafter, chi_square_p, exact_joint
from test_sampling import model as sampling_model  # noqa: F401  (fixture)
from retrieval_spec.api import make_drafters
from retrieval_spec.drafters.base import Source, StepFeedback, trie_from_continuations
from retrieval_spec.drafters.cross_path import SiblingPaths
from retrieval_spec.generate import GenerationConfig, SpeculativeGenerator
from retrieval_spec.multisample import MultiSampleGenerator
from retrieval_spec.tree import children_lists
from retrieval_spec.verify import BatchTreeVerifier


def feed(drafter, tokens):
    tokens = np.asarray(tokens, dtype=np.int32)
    drafter.observe(StepFeedback(tree=None, accepted_nodes=np.arange(len(tokens)), new_tokens=tokens,
                                 top_tokens=np.zeros((0, 0), dtype=np.int32)))


def test_cross_path_copies_what_followed_in_other_paths_only():
    a, b, c = SiblingPaths(3).drafters()
    for d in (a, b, c):
        d.start(np.array([1, 2], dtype=np.int32))
    feed(a, [10, 11, 12, 13, 14])
    feed(b, [20, 11, 30, 31])
    feed(c, [11, 40])
    tree = c.propose(np.array([1, 2, 11, 40, 9, 11], dtype=np.int32), budget=16)
    paths = {int(t) for t in tree.tokens[1:][tree.parents[1:] == 0]}
    assert paths == {12, 30}  # after "11" in a and b; c's own "11 40" is not its sibling's
    assert set(tree.sources[1:]) == {Source.SIBLING}
    longer = c.propose(np.array([7, 10, 11], dtype=np.int32), budget=16)
    assert longer.tokens[1] == 12 and longer.scores[1] > 0  # the 2-gram match in path a ranks first
    assert len(a.propose(np.array([99], dtype=np.int32), budget=16)) == 1  # no match: root only


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("budget", [1, 8, 64])
def test_batched_greedy_rows_equal_plain_greedy(model, budget):
    batch = prompts(7 + budget, 5)  # distinct prompts of distinct lengths
    generator = MultiSampleGenerator(model, StubTokenizer(), lambda: make_drafters("auto", 96), cost_curve=FREE)
    for _ in range(2):  # the second batch runs with learned acceptance rates and warm recycling tables
        result = generator.generate(batch, GenerationConfig(max_new_tokens=30, tree_budget=budget))
        for i, (prompt, row) in enumerate(zip(batch, result.rows)):
            np.testing.assert_array_equal(row.tokens, plain_greedy(model, prompt, 30), err_msg=f"row {i}")
    assert result.mean_accepted > 1.0 and result.forwards < 30


def test_rows_finishing_early_leave_the_others_exact(model):
    """Rows stop at different steps (EOS after a few tokens in some rows); the rest are unaffected."""
    batch = prompts(3, 4)
    eos = int(plain_greedy(model, batch[1], 5)[4])
    model.generation_config.eos_token_id = eos
    try:
        result = MultiSampleGenerator(model, StubTokenizer(), lambda: make_drafters("pld"), cost_curve=FREE).generate(
            batch, GenerationConfig(max_new_tokens=25))
    finally:
        model.generation_config.eos_token_id = None
    for prompt, row in zip(batch, result.rows):
        expected = plain_greedy(model, prompt, 25)
        stop = np.flatnonzero(expected == eos)
        np.testing.assert_array_equal(row.tokens, expected[: stop[0] + 1] if len(stop) else expected)
    assert len(result.rows[1].tokens) <= 5


def test_batched_compaction_keeps_exactly_each_rows_path(model):
    """Random trees, random accepted paths, rows of different lengths (one with an empty cache): after each
    commit every row's cache equals the cache of a plain forward over that row's tokens."""
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 96, n).astype(np.int32) for n in (6, 13, 1)]
    verifier = BatchTreeVerifier(model)
    verifier.reset(contexts)
    for _ in range(5):
        trees = [trie_from_continuations(int(c[-1]), [rng.integers(0, 96, int(rng.integers(1, 6))) for _ in range(3)],
                                         np.array([3.0, 2.0, 1.0]), np.full(6, 0.9), Source.PROMPT, 12)
                 for c in contexts]
        verifier.logits(trees, pad_to=int(rng.integers(0, 16)))
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
            assert verifier.lengths[b] == len(context) - 1
            with torch.no_grad():
                plain = model(torch.as_tensor(context[None, :-1], dtype=torch.long), use_cache=True).past_key_values
            for ours, theirs in zip(verifier.cache.layers, plain.layers):
                n = len(context) - 1
                torch.testing.assert_close(ours.keys[b : b + 1, :, :n], theirs.keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(ours.values[b : b + 1, :, :n], theirs.values, atol=1e-5, rtol=1e-4)


def test_sampled_rows_are_functions_of_their_seeds(model):
    """Row b of a sampled batch equals single-sequence sampling with seed + b, whatever the siblings draft."""
    prompt = prompts(5, 1)[0]
    config = GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=40)
    result = MultiSampleGenerator(model, StubTokenizer(), lambda: make_drafters("pld"), cost_curve=FREE).generate(
        [prompt] * 4, config)
    alone = SpeculativeGenerator(model, StubTokenizer(), [])
    for b, row in enumerate(result.rows):
        expected = alone.generate(prompt, GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=40 + b))
        np.testing.assert_array_equal(row.tokens, expected.tokens, err_msg=f"row {b}")
    assert len({tuple(r.tokens) for r in result.rows}) > 1


@pytest.mark.slow
def test_multi_sample_rows_match_the_target_distribution(sampling_model):  # noqa: F811
    """10^4 samples drawn 16 rows at a time, drafting from each other and from random trees: chi-square."""
    config = GenerationConfig(temperature=1.0, max_new_tokens=3, tree_budget=16)
    generator = MultiSampleGenerator(sampling_model, StubTokenizer(), lambda: [RandomTreeDrafter(True, seed=4)],
                                     cost_curve=FREE)
    counts = np.zeros(VOCAB ** 3)
    rows = 16
    drafted = 0
    for i in range(10_000 // rows):
        result = generator.generate([PROMPT] * rows, GenerationConfig(
            temperature=1.0, max_new_tokens=3, tree_budget=16, seed=SEED_BASE + rows * i))
        for row in result.rows:
            a, b, c = row.tokens
            counts[(a * VOCAB + b) * VOCAB + c] += 1
            drafted += row.stats.accepted_by_source.get("sibling", 0)
    assert chi_square_p(counts, exact_joint(sampling_model, config)) > 0.01
    assert drafted > 0  # sibling drafts were accepted along the way
