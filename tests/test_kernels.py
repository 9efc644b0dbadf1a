"""Few-row linear products: the faster form per shape, the same numbers, and nothing changed outside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrieval_spec.kernels as kernels
from retrieval_spec.kernels import few_row_products


@pytest.fixture
def timings(monkeypatch, tmp_path):
    """Make the timed choice deterministic (``faster`` names the form the fake clock says is faster), in a fresh
    process (no choice known) with an empty cache directory; ``timed`` counts the timings."""
    choice = {"faster": "transposed", "timed": 0}

    def fake(*args):
        choice["timed"] += 1
        return choice["faster"] == "transposed"

    monkeypatch.setenv("RETRIEVAL_SPEC_CACHE", str(tmp_path))
    new_process(monkeypatch)
    monkeypatch.setattr(kernels, "_transposed_faster", fake)
    return choice


def new_process(monkeypatch) -> None:
    """Forget every choice this process knows (as a new process starts), leaving the stored ones on disk."""
    monkeypatch.setattr(kernels, "_TRANSPOSED_FASTER", {})
    monkeypatch.setattr(kernels, "_LOADED", set())


def spy(monkeypatch) -> list[int]:
    calls = []
    transposed = kernels._transposed

    def counted(x, weight, bias):
        calls.append(x.numel() // x.shape[-1])
        return transposed(x, weight, bias)

    monkeypatch.setattr(kernels, "_transposed", counted)
    return calls


@pytest.mark.parametrize("rows", [2, 3, 8, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_transposed_form_computes_torchs_linear(timings, monkeypatch, rows, with_bias):
    layer = torch.nn.Linear(48, 200, bias=with_bias)
    x = torch.randn(1, rows, 48)
    calls = spy(monkeypatch)
    with torch.inference_mode(), few_row_products(torch.device("cpu")):
        ours = layer(x)
    assert calls == [rows]  # the chosen form ran
    assert ours.shape == (1, rows, 200) and ours.is_contiguous()
    torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_the_form_timed_faster_is_kept_for_its_shape_and_rows(timings, monkeypatch):
    layer = torch.nn.Linear(48, 200)
    calls = spy(monkeypatch)
    timings["faster"] = "torch"
    with torch.inference_mode(), few_row_products(torch.device("cpu")):
        layer(torch.randn(4, 48))
        timings["faster"] = "transposed"  # timed once per (shape, row bucket): 4 rows stay with torch's form
        layer(torch.randn(4, 48))
        layer(torch.randn(5, 48))
    assert calls == [5]


def test_row_counts_in_one_bucket_share_one_timing(timings, monkeypatch):
    """A timing runs both forms of every weight (over a second on a 0.5B model): 33 to 48 rows are timed once."""
    layer = torch.nn.Linear(48, 200)
    calls = spy(monkeypatch)
    with torch.inference_mode(), few_row_products(torch.device("cpu")):
        for rows in (33, 40, 48, 49):
            layer(torch.randn(rows, 48))
    assert timings["timed"] == 2  # at 33 rows, and again at 49 (the next bucket)
    assert calls == [33, 40, 48, 49]


def test_choices_timed_by_one_process_serve_the_next_without_timing(timings, monkeypatch):
    """A timing costs seconds on a 0.5B model; a process that times a bucket stores the choice, and the next
    process on the machine (same thread count) takes it from disk."""
    layer = torch.nn.Linear(48, 200)
    timings["faster"] = "torch"
    with torch.inference_mode(), few_row_products(torch.device("cpu")):
        layer(torch.randn(4, 48))
    assert timings["timed"] == 1
    new_process(monkeypatch)
    timings["faster"] = "transposed"  # were it timed again, the choice would change
    calls = spy(monkeypatch)
    with torch.inference_mode(), few_row_products(torch.device("cpu")):
        layer(torch.randn(4, 48))
    assert timings["timed"] == 1 and calls == []  # torch's form, as stored
    torch.set_num_threads(torch.get_num_threads() + 1)  # another thread count is another machine
    try:
        with torch.inference_mode(), few_row_products(torch.device("cpu")):
            layer(torch.randn(4, 48))
    finally:
        torch.set_num_threads(torch.get_num_threads() - 1)
    assert timings["timed"] == 2 and calls == [4]


@pytest.mark.parametrize("damage", ["{not json", '{"choices": [[[200, 48], "four"]]}', ""])
def test_a_damaged_store_of_choices_is_timed_again_and_rewritten(timings, monkeypatch, damage):
    layer = torch.nn.Linear(48, 200)
    path = kernels._choices_path(torch.get_num_threads())
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    with torch.inference_mode(), few_row_products(torch.device("cpu")):
        layer(torch.randn(4, 48))
    assert timings["timed"] == 1
    new_process(monkeypatch)
    with torch.inference_mode(), few_row_products(torch.device("cpu")):
        layer(torch.randn(4, 48))
    assert timings["timed"] == 1  # the rewritten store served it


def test_the_real_timing_runs_both_forms_and_picks_one():
    """The clock itself, not faked: a bool for a real product, whichever it is."""
    x, weight = torch.randn(3, 48), torch.randn(200, 48)
    assert isinstance(kernels._transposed_faster(x, weight, None), bool)


def test_one_row_long_inputs_and_outside_calls_run_torchs_own(timings, monkeypatch):
    layer = torch.nn.Linear(48, 200)
    calls = spy(monkeypatch)
    with torch.inference_mode():
        with few_row_products(torch.device("cpu")):
            layer(torch.randn(1, 48))  # a plain step
            layer(torch.randn(kernels.MAX_ROWS + 1, 48))  # a prefill
        layer(torch.randn(4, 48))  # outside
    assert calls == []
