"""Few-row linear products: the faster form per shape and row bucket, chosen before any forward, applied to one
model's forward in one thread, and torch left exactly as installed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import retrieval_spec.linear_forms as forms
from retrieval_spec.linear_forms import FewRowLinear

TORCH_LINEAR = F.linear


@pytest.fixture
def timings(monkeypatch, tmp_path):
    """A fresh process (no choice known) with an empty cache directory, and a fake timing: ``faster`` names the
    form it reports faster, ``timed`` counts the timings."""
    choice = {"faster": "transposed", "timed": 0}

    def fake(layer, rows):
        choice["timed"] += 1
        return choice["faster"] == "transposed"

    monkeypatch.setenv("RETRIEVAL_SPEC_CACHE", str(tmp_path))
    monkeypatch.delenv(forms.SWITCH, raising=False)
    new_process(monkeypatch)
    monkeypatch.setattr(forms, "_transposed_faster", fake)
    return choice


def new_process(monkeypatch) -> None:
    """Forget every choice this process knows (as a new process starts), leaving the stored ones on disk."""
    monkeypatch.setattr(forms, "_CHOICES", {})
    monkeypatch.setattr(forms, "_LOADED", set())


def spy(monkeypatch) -> list[int]:
    """Rows of every product run in the transposed form."""
    calls = []
    transposed = forms.transposed_linear

    def counted(x, weight, bias):
        calls.append(x.numel() // x.shape[-1])
        return transposed(x, weight, bias)

    monkeypatch.setattr(forms, "transposed_linear", counted)
    return calls


@pytest.mark.parametrize("rows", [2, 3, 8, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_transposed_form_computes_torchs_linear(timings, monkeypatch, rows, with_bias):
    layer = torch.nn.Linear(48, 200, bias=with_bias)
    x = torch.randn(1, rows, 48)
    linear = FewRowLinear(layer)
    calls = spy(monkeypatch)
    with torch.inference_mode(), linear.applied(rows):
        ours = layer(x)
    assert calls == [rows]  # the chosen form ran
    assert ours.shape == (1, rows, 200) and ours.is_contiguous()
    torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_every_choice_is_made_when_the_model_is_wrapped_never_inside_a_forward(timings, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(48, 200), torch.nn.Linear(200, 48), torch.nn.Linear(48, 200))
    FewRowLinear(model)
    assert timings["timed"] == 2 * len(forms.ROW_BUCKETS)  # two shapes, every bucket
    calls = spy(monkeypatch)
    with torch.inference_mode():
        for rows in (2, 5, 33, 64):
            with FewRowLinear(model).applied(rows):
                model(torch.randn(rows, 48))
    assert timings["timed"] == 2 * len(forms.ROW_BUCKETS)  # nothing timed again, in this process or a forward
    assert calls == [rows for rows in (2, 5, 33, 64) for _ in range(3)]


def test_choices_stored_by_one_process_serve_the_next_without_timing(timings, monkeypatch):
    """A timing costs seconds on a 0.5B model; a process stores its choices, and the next process on the machine
    (same thread count) reads them: both round alike."""
    layer = torch.nn.Linear(48, 200)
    timings["faster"] = "torch"
    FewRowLinear(layer)
    assert timings["timed"] == len(forms.ROW_BUCKETS)
    new_process(monkeypatch)
    timings["faster"] = "transposed"  # were it timed again, the choice would change
    calls = spy(monkeypatch)
    with torch.inference_mode(), FewRowLinear(layer).applied(4):
        layer(torch.randn(4, 48))
    assert timings["timed"] == len(forms.ROW_BUCKETS) and calls == []  # torch's form, as stored


@pytest.mark.parametrize("damage", ["{not json", '{"choices": [[[200, 48], "four"]]}', ""])
def test_a_damaged_store_of_choices_is_timed_again_and_rewritten(timings, monkeypatch, damage):
    layer = torch.nn.Linear(48, 200)
    path = forms._choices_path(torch.get_num_threads())
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    FewRowLinear(layer)
    assert timings["timed"] == len(forms.ROW_BUCKETS)
    new_process(monkeypatch)
    FewRowLinear(layer)
    assert timings["timed"] == len(forms.ROW_BUCKETS)  # the rewritten store served it


def test_the_real_timing_runs_both_forms_and_picks_one():
    """The clock itself, not faked: a bool for a real product, whichever it is."""
    assert isinstance(forms._transposed_faster(torch.nn.Linear(48, 200), 3), bool)


def test_one_row_long_inputs_other_threads_and_the_switch_run_torchs_own(timings, monkeypatch):
    layer = torch.nn.Linear(48, 200)
    linear = FewRowLinear(layer)
    calls = spy(monkeypatch)
    seen_in_thread = []
    with torch.inference_mode():
        with linear.applied(1):
            layer(torch.randn(1, 48))  # a plain step
        with linear.applied(forms.MAX_ROWS + 1):
            layer(torch.randn(forms.MAX_ROWS + 1, 48))  # a prefill
        with linear.applied(4):
            # another thread calling the same layer meanwhile (a server's second request) runs torch's own
            thread = threading.Thread(target=lambda: seen_in_thread.append(layer(torch.randn(4, 48)).shape))
            thread.start()
            thread.join()
        layer(torch.randn(4, 48))  # outside
    assert calls == [] and seen_in_thread == [(4, 200)]
    monkeypatch.setenv(forms.SWITCH, "torch")
    with torch.inference_mode(), FewRowLinear(layer).applied(4):
        layer(torch.randn(4, 48))
    with torch.inference_mode(), FewRowLinear(layer, enabled=False).applied(4):
        layer(torch.randn(4, 48))
    assert calls == []


def test_nothing_of_ours_outlives_the_forward_and_wrapped_layers_keep_their_wrapper(timings):
    plain, wrapped = torch.nn.Linear(48, 200), torch.nn.Linear(200, 48)
    wrapper = lambda x: TORCH_LINEAR(x, wrapped.weight, wrapped.bias)  # noqa: E731 - as accelerate's hooks do
    wrapped.forward = wrapper
    model = torch.nn.Sequential(plain, wrapped)
    before = {name: dict(module.__dict__) for name, module in model.named_modules()}
    with torch.inference_mode(), FewRowLinear(model).applied(4):
        assert "forward" in plain.__dict__ and wrapped.forward is wrapper
        model(torch.randn(4, 48))
    assert {name: dict(module.__dict__) for name, module in model.named_modules()} == before
    assert F.linear is TORCH_LINEAR and torch.nn.functional.linear is TORCH_LINEAR


def test_torch_is_its_own_after_a_drafted_generate_and_after_hf_enable_generate_disable():
    """The first CPU verification of a tree once replaced torch.nn.functional.linear for the whole process, and
    code calling it with keywords (LoRA, vision towers) then failed."""
    from conftest import StubTokenizer, tiny_model
    from retrieval_spec import hf
    from retrieval_spec.drafters.registry import make_drafters
    from retrieval_spec.config import GenerationConfig
    from retrieval_spec.generate import SpeculativeGenerator

    model = tiny_model("llama")
    prompt = np.tile(np.arange(10, 22, dtype=np.int32), 3)  # repeats: prompt lookup drafts trees
    result = SpeculativeGenerator(model, StubTokenizer(), make_drafters("pld")).generate(
        prompt, GenerationConfig(max_new_tokens=24))
    assert result.stats.drafted_nodes > 0
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert F.linear is TORCH_LINEAR
    torch.testing.assert_close(F.linear(input=x, weight=w), x @ w.T)
    modules_before = {name: set(module.__dict__) for name, module in model.named_modules()}
    hf.enable(model, None, "pld")
    ids = torch.as_tensor(prompt[None], dtype=torch.long)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    hf.disable(model)
    assert F.linear is TORCH_LINEAR
    torch.testing.assert_close(F.linear(input=x, weight=w), x @ w.T)
    assert {name: set(module.__dict__) for name, module in model.named_modules()} == modules_before
