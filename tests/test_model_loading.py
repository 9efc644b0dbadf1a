"""Model directories a user names: damaged or hostile checkpoints are one line naming the directory (and no code of
theirs runs); a model with a short position table decodes, its cost probe sized to fit it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import plain_greedy, tiny_config
from test_cli import refused, run
from test_hostile_files import checksums

WORDS = ["[UNK]", "hi", "there", "the", "a", "cat", "sat", "on", "mat"] + [f"w{n}" for n in range(87)]  # 96


def checkpoint(directory: Path, kind: str = "llama", **config_changes) -> Path:
    """A random-weight model of ``kind`` (conftest's tiny config, changed by ``config_changes``) saved with a
    96-word tokenizer, as a Hugging Face checkpoint directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config = tiny_config(kind)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
    model.save_pretrained(directory)
    words = Tokenizer(models.WordLevel({word: n for n, word in enumerate(WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(directory)
    return directory


class Payload:
    """Unpickling this runs code: what a hostile pickle checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the checkpoint ran"))


@pytest.mark.parametrize("damage, message", [
    ("safetensors", "cannot load the model (SafetensorError: "),
    ("pickle", "cannot load the model (UnpicklingError: Weights only load failed."),
    ("truncated pickle", "cannot load the model ("),
    ("tokenizer", "cannot load the tokenizer ("),
])
def test_a_damaged_or_hostile_checkpoint_is_one_line_naming_it(tmp_path: Path, damage: str, message: str):
    model = checkpoint(tmp_path / "m")
    if damage == "safetensors":
        (model / "model.safetensors").write_bytes(b"\x00" * 64)
    elif damage in ("pickle", "truncated pickle"):
        (model / "model.safetensors").unlink()
        torch.save({"weights": Payload(tmp_path / "ran")}, model / "pytorch_model.bin")
        if damage == "truncated pickle":
            data = (model / "pytorch_model.bin").read_bytes()
            (model / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    else:
        (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "nothing"}}))
    before = checksums(tmp_path)
    refused(run("generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"), str(model), message)
    assert checksums(tmp_path) == before and not (tmp_path / "ran").exists()


@pytest.fixture
def short_gpt2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GPT-2 that embeds 300 positions: fewer than the default cost probe's 256-token context plus its
    64-node trees. Its probe is measured into a cache of its own."""
    monkeypatch.setenv("RETRIEVAL_SPEC_CACHE", str(tmp_path / "cache"))
    return checkpoint(tmp_path / "gpt2", "gpt2", n_positions=300)


def test_a_model_with_a_short_position_table_decodes_from_the_command_line(short_gpt2: Path):
    result = run("generate", "--model", str(short_gpt2), "--prompt", "hi there", "--no-chat", "--max-new-tokens",
                 "8", "--json-stats")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stderr.strip().splitlines()[-1])["new_tokens"] == 8


def test_a_model_with_a_short_position_table_decodes_through_hf_enable(short_gpt2: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrieval_spec.integrations import hf

    model = AutoModelForCausalLM.from_pretrained(short_gpt2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(short_gpt2)
    prompt = np.array(tokenizer("hi there the cat", add_special_tokens=False)["input_ids"])
    expected = plain_greedy(model, prompt, 8)
    hf.enable(model, tokenizer, method="pld")
    try:
        ids = torch.as_tensor(prompt[None])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    finally:
        hf.disable(model)
    np.testing.assert_array_equal(out[0, len(prompt):].numpy(), expected)


def test_the_probe_of_a_new_batch_size_says_so_on_a_terminal_only(short_gpt2: Path, monkeypatch, capsys):
    """Probing takes minutes for many rows: a line on stderr says what the wait is for, on a terminal only."""
    import sys

    from transformers import AutoModelForCausalLM

    from retrieval_spec import costs
    from retrieval_spec.verify import ModelVerifier

    verifier = ModelVerifier(AutoModelForCausalLM.from_pretrained(short_gpt2, dtype=torch.float32).eval())
    quick = costs.CostProbe(sizes=(1, 2), context_len=8, repeats=1, batch=3)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    costs.cached_cost_curve(verifier, quick)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    costs.cached_cost_curve(verifier, costs.CostProbe(sizes=(1, 2), context_len=8, repeats=1, batch=4))
    assert "measuring the cost of verifying up to 2 tokens in each of 4 row(s)" in capsys.readouterr().err
    costs.cached_cost_curve(verifier, quick)  # cached: probed no more, nothing said
    assert capsys.readouterr().err == ""
