"""Few-row linear products: the fastest form per shape and row bucket (torch's, transposed, MKL's packed), chosen
before any forward, applied to one model's forward in one thread, packed copies made once per layer within a
memory budget, and torch left exactly as installed."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import retrieval_spec.linear_forms as forms
from retrieval_spec.linear_forms import FewRowLinear

TORCH_LINEAR = F.linear


@pytest.fixture
def timings(monkeypatch, tmp_path):
    """A fresh process (no choice known, no packed copy) with an empty cache directory, and a fake timing:
    ``faster`` names the form it reports fastest (the others slower, torch's slowest but for a ``torch`` choice),
    ``timed`` counts the (shape, bucket) pairs timed."""
    choice = {"faster": "transposed", "timed": 0}

    def fake(layer, buckets):
        choice["timed"] += len(buckets)
        times = {"torch": 3.0, "transposed": 2.0, "packed": 1.0} if forms.can_pack(layer.weight) else {
            "torch": 3.0, "transposed": 2.0}
        if choice["faster"] in times:
            times[choice["faster"]] = 0.5
        return [dict(times) for _ in buckets]

    monkeypatch.setenv("RETRIEVAL_SPEC_CACHE", str(tmp_path))
    monkeypatch.delenv(forms.SWITCH, raising=False)
    new_process(monkeypatch)
    monkeypatch.setattr(forms, "_time_forms", fake)
    return choice


def new_process(monkeypatch) -> None:
    """Forget every choice and packed copy this process knows (as a new process starts), leaving the stored
    choices on disk."""
    monkeypatch.setattr(forms, "_CHOICES", {})
    monkeypatch.setattr(forms, "_LOADED", set())
    monkeypatch.setattr(forms, "_PACKED", weakref.WeakKeyDictionary())


def spy(monkeypatch, form: str = "transposed") -> list[int]:
    """Rows of every product run in ``form`` (``transposed`` or ``packed``)."""
    calls = []
    name = f"{form}_linear"
    original = getattr(forms, name)

    def counted(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return original(x, *args)

    monkeypatch.setattr(forms, name, counted)
    return calls


needs_mkl = pytest.mark.skipif(not forms.can_pack(torch.zeros(1, 1)), reason="this torch has no MKL packed product")


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


@pytest.mark.parametrize("damage", ["{not json", '{"choices": [[[200, 48], "four"]]}', "",
                                    '{"choices": [[[200, 48], 2, "torch.float32", {"torch": 1, "fused": 0.1}]]}'])
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


def test_the_real_timing_times_every_form_that_can_run():
    """The clock itself, not faked: milliseconds per form and bucket for a real product, whichever wins."""
    times = forms._time_forms(torch.nn.Linear(48, 200), [3, 8])
    expected = {"torch", "transposed"} | ({"packed"} if forms.can_pack(torch.zeros(1, 1)) else set())
    assert [set(t) for t in times] == [expected] * 2
    assert all(ms > 0 for t in times for ms in t.values())


@needs_mkl
def test_a_packed_product_that_does_not_compute_torchs_is_never_timed(monkeypatch):
    """MKL's packed layout could differ on another build: the timing compares its product with torch's first."""
    monkeypatch.setattr(forms, "packed_linear", lambda x, packed, weight, bias: torch.zeros(len(x), len(weight)))
    assert [set(t) for t in forms._time_forms(torch.nn.Linear(48, 200), [4])] == [{"torch", "transposed"}]


@needs_mkl
@pytest.mark.parametrize("rows", [2, 4, 7, 64])
def test_the_packed_form_computes_torchs_linear_with_one_copy_per_layer(timings, monkeypatch, rows):
    timings["faster"] = "packed"
    layer = torch.nn.Linear(48, 200)
    model = torch.nn.Sequential(layer)
    packs = []
    pack = forms.pack
    monkeypatch.setattr(forms, "pack", lambda weight: packs.append(weight.shape) or pack(weight))
    first, second = FewRowLinear(model), FewRowLinear(model)  # two generators on one model: one copy
    assert packs == [(200, 48)] and set(forms._PACKED) == {layer}
    calls = spy(monkeypatch, "packed")
    x = torch.randn(1, rows, 48)
    with torch.inference_mode(), second.applied(rows):
        ours = layer(x)
    assert calls == [rows] and ours.shape == (1, rows, 200)
    torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the user changes the weight: the copy is made again before it is used
        layer.weight.mul_(2)
    with torch.inference_mode(), first.applied(rows):
        ours = layer(x)
    assert len(packs) == 2
    torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    with first.applied(rows):  # gradients recorded: MKL's product has no backward, torch's form runs
        layer(x).sum().backward()
    assert calls == [rows, rows] and layer.weight.grad is not None


@needs_mkl
def test_packed_copies_stop_at_their_memory_budget_and_those_layers_run_their_next_fastest_form(timings,
                                                                                                monkeypatch):
    timings["faster"] = "packed"
    monkeypatch.setattr(forms, "available_memory", lambda: 4 * 200 * 48 * 4)  # room for one copy of 2x the weight
    model = torch.nn.Sequential(torch.nn.Linear(48, 200), torch.nn.Linear(200, 48), torch.nn.Linear(48, 200))
    linear = FewRowLinear(model)
    assert len(forms._PACKED) == 1
    assert linear.forms(4) == {"torch": 0, "packed": 1, "transposed": 2}
    packed, transposed = spy(monkeypatch, "packed"), spy(monkeypatch, "transposed")
    with torch.inference_mode(), linear.applied(4):
        model(torch.randn(4, 48))
    assert packed == [4] and transposed == [4, 4]


@needs_mkl
def test_the_switch_can_keep_every_weight_unpacked(timings, monkeypatch):
    timings["faster"] = "packed"
    monkeypatch.setenv(forms.SWITCH, "unpacked")
    model = torch.nn.Sequential(torch.nn.Linear(48, 200), torch.nn.Linear(200, 48))
    assert FewRowLinear(model).forms(8) == {"torch": 0, "transposed": 2} and not forms._PACKED


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
