"""The cost prober: a curve of real timings per probed size, stored per model, machine and batch size, read back
instead of probed again, probed again when damaged, and fitted to models with short position tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config, tiny_model
from retrieval_spec import costs
from retrieval_spec.costs import CostProbe, cached_cost_curve, measure_cost_curve, store_cost_curve
from retrieval_spec.sizing import CostCurve
from retrieval_spec.verify import ModelVerifier

QUICK = CostProbe(sizes=(1, 2, 4, 8), context_len=16, repeats=1)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRIEVAL_SPEC_CACHE", str(tmp_path))
    return tmp_path


def test_a_probe_times_every_size_and_leaves_the_verifier_ready(cache):
    verifier = ModelVerifier(tiny_model("llama"))
    curve = measure_cost_curve(verifier, QUICK)
    assert curve.sizes.tolist() == [1, 2, 4, 8] and np.all(curve.ms > 0)
    assert verifier.cache.lengths.tolist() == [QUICK.context_len]  # rolled back after every timed forward


def test_a_burst_of_load_costs_no_size_all_its_runs(cache, monkeypatch):
    """Another process takes the machine for as many forwards in a row as each size is timed: the sizes take turns,
    so every size keeps a quick run and the curve is the machine's (timed back to back, the third size's runs, the
    10th to 12th forwards, would all carry the burst)."""
    verifier = ModelVerifier(tiny_model("llama"))
    probe = CostProbe(sizes=(1, 2, 3, 4, 5), context_len=16, repeats=3)
    now, calls = [0.0], [0]
    verify = verifier.verify

    def slow_verify(rows, run, timer):
        calls[0] += 1
        now[0] += 100.0 if 10 <= calls[0] < 10 + probe.repeats else 1.0  # seconds of a fake clock
        return verify(rows, run, timer)

    monkeypatch.setattr(verifier, "verify", slow_verify)
    monkeypatch.setattr(costs, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    curve = measure_cost_curve(verifier, probe)
    assert calls[0] == len(probe.sizes) * (probe.repeats + 1)
    assert curve.ms.tolist() == [1000.0] * len(probe.sizes)


def test_curves_are_stored_per_batch_size_and_read_back_until_damaged(cache):
    verifier = ModelVerifier(tiny_model("llama"))
    first = cached_cost_curve(verifier, QUICK)
    stored = list((cache / "costs").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["ms"] == first.ms.tolist()
    learned = CostCurve(sizes=first.sizes, ms=first.ms * 2)
    store_cost_curve(verifier, QUICK, learned)
    np.testing.assert_array_equal(cached_cost_curve(verifier, QUICK).ms, learned.ms)  # read, not probed
    two_rows = CostProbe(sizes=QUICK.sizes, context_len=16, repeats=1, batch=2)
    cached_cost_curve(verifier, two_rows)
    assert len(list((cache / "costs").glob("*.json"))) == 2
    stored[0].write_text("{damaged")
    again = cached_cost_curve(verifier, QUICK)
    assert not np.array_equal(again.ms, learned.ms) and json.loads(stored[0].read_text())["ms"] == again.ms.tolist()


@pytest.mark.parametrize("positions", [40, 80, 400])
def test_the_probe_fits_a_model_with_a_short_position_table(cache, positions):
    """A GPT-2 whose table holds fewer positions than the default probe's 256-token context plus 64 nodes."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config("gpt2")
    config.n_positions = positions
    torch.manual_seed(0)
    verifier = ModelVerifier(AutoModelForCausalLM.from_config(config).eval())
    probe = costs.CostProbe.fitting(verifier.layout.max_positions)
    assert probe.context_len + max(probe.sizes) < positions and probe.sizes[0] == 1
    assert probe == CostProbe() if positions > 256 + 64 else probe.context_len < 256
    assert verifier.cost_prior(1).sizes.tolist() == list(probe.sizes)
