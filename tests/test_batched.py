"""Batched decoding: rows are exact per row, sampled rows keep the target distribution, and cross-path
drafting copies from sibling paths (numpy alone)."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import StubTokenizer, plain_greedy, tiny_model
from test_lossless_tiny import FREE, prompts
from test_sampling import PROMPT, SEED_BASE, VOCAB, RandomTreeDrafter, chi_square_p, exact_joint
from test_sampling import model as sampling_model  # noqa: F401  (fixture)
from retrieval_spec.drafters.cross_path import CrossPathDrafter
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.tree import Source, StepFeedback


def feed(drafter, request, tokens):
    tokens = np.asarray(tokens, dtype=np.int32)
    drafter.observe(request, StepFeedback(tree=None, accepted_nodes=np.arange(len(tokens)), new_tokens=tokens))


def test_cross_path_copies_what_followed_in_sibling_paths_only():
    drafter = CrossPathDrafter()
    for request in "abc":
        drafter.start(request, np.array([1, 2], dtype=np.int32))
    drafter.start("stranger", np.array([5], dtype=np.int32))  # another prompt: no sibling of theirs
    feed(drafter, "a", [10, 11, 12, 13, 14])
    feed(drafter, "b", [20, 11, 30, 31])
    feed(drafter, "c", [11, 40])
    feed(drafter, "stranger", [11, 50])
    tree = drafter.propose("c", np.array([1, 2, 11, 40, 9, 11], dtype=np.int32), budget=16)
    paths = {int(t) for t in tree.tokens[1:][tree.parents[1:] == 0]}
    assert paths == {12, 30}  # after "11" in a and b; c's own "11 40" and the stranger's "11 50" are not siblings'
    assert set(tree.sources[1:]) == {Source.SIBLING}
    longer = drafter.propose("c", np.array([7, 10, 11], dtype=np.int32), budget=16)
    assert longer.tokens[1] == 12 and longer.scores[1] > 0  # the 2-gram match in path a ranks first
    assert len(drafter.propose("a", np.array([99], dtype=np.int32), budget=16)) == 1  # no match: root only
    drafter.finish("a")  # a finished: its output still serves its running siblings ...
    assert drafter.propose("c", np.array([7, 10, 11], dtype=np.int32), budget=16).tokens[1] == 12
    for request in ("b", "c", "stranger"):
        drafter.finish(request)
    assert not drafter._paths  # ... until the last of them finishes


def test_a_request_alone_with_its_prompt_serves_a_sibling_that_starts_later():
    """Its output is kept unindexed while it has no sibling (most requests never do), and found once one starts."""
    drafter = CrossPathDrafter()
    drafter.start("first", np.array([1, 2], dtype=np.int32))
    feed(drafter, "first", [10, 11, 12])
    feed(drafter, "first", [13, 14])
    drafter.start("later", np.array([1, 2], dtype=np.int32))
    feed(drafter, "first", [15])
    tree = drafter.propose("later", np.array([1, 2, 13], dtype=np.int32), budget=16)
    assert tree.tokens[1:].tolist() == [14, 15]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("budget", [1, 8, 64])
def test_batched_greedy_rows_equal_plain_greedy(model, budget):
    batch = prompts(7 + budget, 5)  # distinct prompts of distinct lengths
    generator = SpeculativeGenerator(model, StubTokenizer(), make_drafters("auto", 96), cost_curve=FREE)
    for _ in range(2):  # the second batch runs with learned acceptance rates and warm recycling tables
        result = generator.generate_batch(batch, GenerationConfig(max_new_tokens=30, tree_budget=budget))
        for i, (prompt, row) in enumerate(zip(batch, result.rows)):
            np.testing.assert_array_equal(row.tokens, plain_greedy(model, prompt, 30), err_msg=f"row {i}")
    assert result.mean_accepted > 1.0 and result.forwards < 30


def test_rows_finishing_early_leave_the_others_exact(model):
    """Rows stop at different steps (EOS after a few tokens in some rows); the rest are unaffected."""
    batch = prompts(3, 4)
    eos = int(plain_greedy(model, batch[1], 5)[4])
    model.generation_config.eos_token_id = eos
    try:
        result = SpeculativeGenerator(model, StubTokenizer(), make_drafters("pld"), cost_curve=FREE).generate_batch(
            batch, GenerationConfig(max_new_tokens=25))
    finally:
        model.generation_config.eos_token_id = None
    for prompt, row in zip(batch, result.rows):
        expected = plain_greedy(model, prompt, 25)
        stop = np.flatnonzero(expected == eos)
        np.testing.assert_array_equal(row.tokens, expected[: stop[0] + 1] if len(stop) else expected)
    assert len(result.rows[1].tokens) <= 5


def test_sampled_rows_are_functions_of_their_seeds(model):
    """Row b of a sampled batch equals single-sequence sampling with seed (seed, b), whatever the siblings draft."""
    prompt = prompts(5, 1)[0]
    config = GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=40)
    result = SpeculativeGenerator(model, StubTokenizer(), make_drafters("pld"), cost_curve=FREE).generate_batch(
        [prompt] * 4, config)
    alone = SpeculativeGenerator(model, StubTokenizer(), [])
    for b, row in enumerate(result.rows):
        assert row.stats.seed == (40, b)
        expected = alone.generate(prompt, GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.95,
                                                           seed=(40, b)))
        np.testing.assert_array_equal(row.tokens, expected.tokens, err_msg=f"row {b}")
    assert len({tuple(r.tokens) for r in result.rows}) > 1


@pytest.mark.slow
def test_multi_sample_rows_match_the_target_distribution(sampling_model):  # noqa: F811
    """10^4 samples drawn 16 rows at a time, drafting from each other and from random trees: chi-square on the
    first three tokens (of four: the first comes from the prefill, so siblings draft from the third on)."""
    config = GenerationConfig(temperature=1.0, max_new_tokens=3, tree_budget=16)
    generator = SpeculativeGenerator(sampling_model, StubTokenizer(), [RandomTreeDrafter(True, seed=4)],
                                     cost_curve=FREE)
    counts = np.zeros(VOCAB ** 3)
    rows = 16
    drafted = 0
    for i in range(10_000 // rows):
        result = generator.generate_batch([PROMPT] * rows, GenerationConfig(
            temperature=1.0, max_new_tokens=4, tree_budget=16, seed=SEED_BASE + rows * i))
        for row in result.rows:
            a, b, c = row.tokens[:3]
            counts[(a * VOCAB + b) * VOCAB + c] += 1
            drafted += row.stats.accepted_by_source.get("sibling", 0)
    assert chi_square_p(counts, exact_joint(sampling_model, config)) > 0.01
    assert drafted > 0  # sibling drafts were accepted along the way
