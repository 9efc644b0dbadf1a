"""The loop's edges: stop strings of any length, the end of a learned-position context, and seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from conftest import OracleDrafter, StubTokenizer, plain_greedy, tiny_config, tiny_model
from retrieval_spec.cli import main
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.sizing import CostCurve

FLAT = CostCurve.flat(64)


@pytest.mark.parametrize("stop_tokens", [1, 4, 20, 30])
def test_a_stop_string_of_any_length_stops_where_plain_decoding_stops(stop_tokens):
    """An always-right drafter gains many tokens a step; the stop is found exactly where one-token steps find it."""
    model = tiny_model("llama")
    prompt = np.arange(10, 30, dtype=np.int32)
    free_run = plain_greedy(model, prompt, 60)
    stop = StubTokenizer().decode(free_run[10 : 10 + stop_tokens])
    config = GenerationConfig(max_new_tokens=60, stop_strings=(stop,), tree_budget=32)
    plain = SpeculativeGenerator(model, StubTokenizer()).generate(prompt, config)
    drafted = SpeculativeGenerator(model, StubTokenizer(), [OracleDrafter(free_run, len(prompt), 96, right=True)],
                                   cost_curve=FLAT).generate(prompt, config)
    np.testing.assert_array_equal(drafted.tokens, plain.tokens)
    assert len(plain.tokens) <= 10 + stop_tokens and stop in StubTokenizer().decode(plain.tokens)
    assert max(drafted.stats.tokens_per_step) > 2  # a step gained several tokens: the case that used to differ


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
@pytest.mark.parametrize("method", ["lookahead", "auto"])
def test_nothing_is_placed_past_a_learned_position_table(kind, method):
    """Prompt plus output fill a 64-position table exactly; the Lookahead window (forced on) must not overflow."""
    config = tiny_config(kind)
    config.n_positions = config.max_position_embeddings = 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompt = np.tile(np.arange(5, 15, dtype=np.int32), 3)
    generator = SpeculativeGenerator(model, StubTokenizer(), make_drafters(method, 96), cost_curve=FLAT)
    result = generator.generate(prompt, GenerationConfig(max_new_tokens=64 - len(prompt)))
    np.testing.assert_array_equal(result.tokens, plain_greedy(model, prompt, 64 - len(prompt)))


def test_without_a_seed_each_run_draws_fresh_entropy_and_reports_it():
    model = tiny_model("llama")
    generator = SpeculativeGenerator(model, StubTokenizer(), make_drafters("pld"), cost_curve=FLAT)
    config = GenerationConfig(max_new_tokens=20, temperature=1.0)
    prompt = np.arange(3, 20, dtype=np.int32)
    first, second = generator.generate(prompt, config), generator.generate(prompt, config)
    assert not np.array_equal(first.tokens, second.tokens)
    assert first.stats.seed != second.stats.seed
    again = generator.generate(prompt, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=first.stats.seed))
    np.testing.assert_array_equal(again.tokens, first.tokens)
    batch = generator.generate_batch([prompt] * 3, config)
    assert len({tuple(row.tokens) for row in batch.rows}) == 3


@pytest.mark.real_model
def test_cli_seeds_give_identical_prompts_independent_samples_that_reruns_reproduce(smollm2, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "Write a word."}) + "\n" for _ in range(2)))
    args = ["generate", "--input", str(prompts), "--temperature", "1", "--max-new-tokens", "8", "--method", "pld"]

    def run(*extra):
        result = CliRunner().invoke(main, args + list(extra))
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    seeded = run("--seed", "7")
    assert seeded[0]["tokens"] != seeded[1]["tokens"]  # same prompt, derived seeds (7, 0) and (7, 1)
    assert [row["stats"]["seed"] for row in seeded] == [[7, 0], [7, 1]]
    assert [row["tokens"] for row in run("--seed", "7")] == [row["tokens"] for row in seeded]
    fresh = run()
    assert fresh[0]["stats"]["seed"] != run()[0]["stats"]["seed"]
