"""The command line: refusals before any model loads, and the multi-sample and --state-dir paths end to end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from retrieval_spec.cli import main


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hi", "--num-samples", "4"], "needs --temperature > 0"),
    (["--prompt", "hi", "--num-samples", "0"], "at least 1"),
    (["--rag", "--question", "q", "--num-samples", "2", "--temperature", "1"], "goes with plain prompts"),
])
def test_bad_combinations_are_refused_in_one_line(args, message):
    result = CliRunner().invoke(main, ["generate", *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.real_model
def test_num_samples_prints_every_sample_as_json(smollm2):
    result = CliRunner().invoke(main, ["generate", "--prompt", "Name a colour.", "--num-samples", "3",
                                       "--temperature", "1", "--seed", "5", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert len(row["texts"]) == 3 and row["stats"]["rows"] == 3 and len(row["stats"]["per_row"]) == 3


@pytest.mark.real_model
def test_state_dir_carries_what_drafters_learned_to_the_next_run(smollm2, tmp_path):
    args = ["generate", "--prompt", "List three uses of Python.", "--max-new-tokens", "24", "--json-stats",
            "--state-dir", str(tmp_path)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert {p.name for p in tmp_path.iterdir()} == {"recycling.npz", "lookahead_pool.npz", "output_history.npz"}
    second = CliRunner().invoke(main, args)
    stats = json.loads(second.output.strip().splitlines()[-1])
    assert stats["accepted_by_source"].get("history", 0) > 0  # the first run's output was copied
    (tmp_path / "recycling.npz").write_bytes(b"garbage")
    broken = CliRunner().invoke(main, args)
    assert broken.exit_code == 2 and "recycling.npz" in broken.output
