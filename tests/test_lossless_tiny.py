"""Greedy speculative output equals Hugging Face greedy generate, on tiny random-weight models (fp32)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import OracleDrafter, StubTokenizer, plain_greedy, tiny_model
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore.manifest import TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.prompt_lookup import PromptLookupDrafter
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec import verify
from retrieval_spec.sizing import CostCurve

FREE = CostCurve.flat(64)  # verify everything drafted
CPU_LIKE = CostCurve(sizes=np.array([1, 2, 4, 8, 16, 64]), ms=np.array([45.0, 63, 90, 95, 104, 180]))


def forwards_of(model, call):
    """``call()``'s result and the number of forwards of ``model`` it ran."""
    forwards = []
    hook = model.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        return call(), len(forwards)
    finally:
        hook.remove()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model(request):
    return tiny_model(request.param)


def prompts(seed: int, count: int, vocab: int = 96):
    """Random prompts with repeats inside, so prompt lookup has something to copy."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, vocab, int(rng.integers(3, 30)))
        out.append(np.concatenate([base, base[: int(rng.integers(1, len(base) + 1))]]).astype(np.int32))
    return out


@pytest.fixture(scope="module")
def datastore(model, tmp_path_factory):
    """A corpus of the model's own greedy continuations of random prompts: REST finds real matches in it."""
    rng = np.random.default_rng(99)
    documents = [np.concatenate([p, plain_greedy(model, p, 40)]) for p in prompts(99, 12)]
    documents += [rng.integers(0, 96, 200) for _ in range(3)]
    path = tmp_path_factory.mktemp("index") / "tiny"
    build_index_from_tokens(documents, path, TokenizerFingerprint("tiny", 96, "0" * 64), progress=False)
    return Datastore.open(path)


@pytest.mark.parametrize("method", ["pld", "rest", "recycle", "lookahead", "auto"])
@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_methods_equal_plain_greedy(model, datastore, method, budget):
    drafters = make_drafters(method, 96, datastore)
    generator = SpeculativeGenerator(model, StubTokenizer(), drafters, cost_curve=FREE)  # one generator: learns
    accepted = []
    for i, prompt in enumerate(prompts(budget, 6)):
        expected = plain_greedy(model, prompt, 40)
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=40, tree_budget=budget))
        np.testing.assert_array_equal(result.tokens, expected, err_msg=f"{method}, prompt {i}, budget {budget}")
        accepted.append(result.stats.mean_accepted)
    if method != "lookahead":  # the Jacobi window finds nothing in some random models' text: test_lookahead.py
        assert max(accepted) > 1.0  # drafts were accepted, so the tree paths were exercised


@pytest.mark.parametrize("right", [True, False])
def test_always_right_and_always_wrong_drafters_change_nothing(model, right):
    for i, prompt in enumerate(prompts(7, 5)):
        expected = plain_greedy(model, prompt, 30)
        drafter = OracleDrafter(expected, len(prompt), 96, right=right, seed=i)
        generator = SpeculativeGenerator(model, StubTokenizer(), [drafter], cost_curve=FREE)
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=30, tree_budget=24))
        np.testing.assert_array_equal(result.tokens, expected)
        if right:
            assert result.stats.mean_accepted > 1.5  # the oracle is actually used
        else:
            assert result.stats.mean_accepted == 1.0


def test_combined_drafters_under_a_cpu_like_cost_curve(model):
    for i, prompt in enumerate(prompts(11, 5)):
        expected = plain_greedy(model, prompt, 40)
        drafters = [PromptLookupDrafter(), OracleDrafter(expected, len(prompt), 96, right=i % 2 == 0, seed=i)]
        generator = SpeculativeGenerator(model, StubTokenizer(), drafters, cost_curve=CPU_LIKE)
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=40, tree_budget=32))
        np.testing.assert_array_equal(result.tokens, expected)


def test_no_drafter_is_plain_decoding_forward_for_forward(model):
    """Twenty tokens take twenty forwards, as in ``generate()``: the prefill's gives the first token (a separate
    prefill would cost every reply one forward more: 8% of a 13-token answer)."""
    prompt = prompts(3, 1)[0]
    generator = SpeculativeGenerator(model, StubTokenizer(), [])
    generator.generate(prompt, GenerationConfig(max_new_tokens=2))  # the cost curve is probed (or read) first
    result, forwards = forwards_of(model, lambda: generator.generate(prompt, GenerationConfig(max_new_tokens=20)))
    np.testing.assert_array_equal(result.tokens, plain_greedy(model, prompt, 20))
    assert result.stats.steps == 20 and forwards == 20


def test_the_first_tree_rides_on_the_prefill(model):
    """A right oracle's first tree (several branches) is verified in the prompt's own forward: the first step
    gains several tokens and the reply takes fewer forwards than tokens, exactly as plain greedy; a wrong oracle
    changes nothing there either."""
    prompt = prompts(5, 1)[0]
    expected = plain_greedy(model, prompt, 20)
    for right in (True, False):
        generator = SpeculativeGenerator(model, StubTokenizer(), [OracleDrafter(expected, len(prompt), 96, right)],
                                         cost_curve=FREE)
        chunks = []
        batch, forwards = forwards_of(model, lambda: generator.generate_batch(
            [prompt], GenerationConfig(max_new_tokens=20), on_tokens=lambda row, tokens: chunks.append(len(tokens))))
        result = batch.rows[0]
        np.testing.assert_array_equal(result.tokens, expected)
        assert result.stats.drafted_nodes > 0 and forwards == result.stats.steps
        if right:
            assert chunks[0] > 1 and forwards < 20
        else:
            assert chunks[0] == 1


def test_a_long_prompt_s_branching_first_tree_runs_after_the_prompt(model, monkeypatch):
    """From ``SPLIT_PREFILL_AT`` tokens a branching first tree gets a forward of its own after the prompt's causal
    one (cheaper than a mask over the whole prompt): the same reply as plain greedy, one forward more."""
    monkeypatch.setattr(verify, "SPLIT_PREFILL_AT", 2)
    prompt = prompts(5, 1)[0]
    expected = plain_greedy(model, prompt, 20)
    generator = SpeculativeGenerator(model, StubTokenizer(), [OracleDrafter(expected, len(prompt), 96, True)],
                                     cost_curve=FREE)
    result, forwards = forwards_of(model, lambda: generator.generate(prompt, GenerationConfig(max_new_tokens=20)))
    np.testing.assert_array_equal(result.tokens, expected)
    assert forwards == result.stats.steps + 1 < 20


def test_eos_stops_like_generate():
    model = tiny_model("llama")
    prompt = prompts(5, 1)[0]
    free_run = plain_greedy(model, prompt, 30)
    eos = int(free_run[12])  # a token the model emits: generation must stop at its first occurrence
    model.generation_config.eos_token_id = eos
    try:
        expected = plain_greedy(model, prompt, 30)
        generator = SpeculativeGenerator(model, StubTokenizer(), [OracleDrafter(free_run, len(prompt), 96, True)],
                                         cost_curve=FREE)
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=30, tree_budget=16))
    finally:
        model.generation_config.eos_token_id = None
    np.testing.assert_array_equal(result.tokens, expected)
    assert result.tokens[-1] == eos and eos not in result.tokens[:-1].tolist()


def test_padded_verification_changes_nothing(model):
    # A curve on which 2..7 nodes are padded to 8 inert rows.
    padded = CostCurve(sizes=np.array([1, 2, 8, 64]), ms=np.array([1.0, 3.0, 1.5, 1.6]))
    assert padded.padded_size(3) == 8
    for i, prompt in enumerate(prompts(13, 4)):
        expected = plain_greedy(model, prompt, 30)
        drafters = [PromptLookupDrafter(), OracleDrafter(expected, len(prompt), 96, right=True, seed=i)]
        generator = SpeculativeGenerator(model, StubTokenizer(), drafters, cost_curve=padded)
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=30, tree_budget=5))
        np.testing.assert_array_equal(result.tokens, expected)
