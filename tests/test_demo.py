"""`make demo` (``retrieval-spec demo``): what it prints and when it fails, from a stated report; and, with the
real model, that ``auto`` reproduces plain ``generate()`` on the bundled code edit."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from retrieval_spec import demo as demo_module
from retrieval_spec.cli import main

REPORT = {"model": "smollm2-135m", "edit": demo_module.EDIT, "text": "def _group(text, monetary=False): ...",
          "identical": True, "speedup": 2.5, "plain": {"new_tokens": 40, "tokens_per_second": 20.0},
          "auto": {"new_tokens": 40, "tokens_per_second": 50.0, "mean_accepted": 5.0,
                   "accepted_by_source": {"history": 0, "pld": 28, "recycle": 4}}}


@pytest.mark.parametrize("identical, exit_code", [(True, 0), (False, 1)])
def test_the_demo_prints_speed_tokens_per_step_and_sources_and_fails_on_a_differing_output(
        monkeypatch, identical: bool, exit_code: int):
    monkeypatch.setattr(demo_module, "run_demo", lambda *args: {**REPORT, "identical": identical})
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == exit_code
    assert "5.00 tokens/step" in result.output
    assert "accepted drafted tokens by source: pld 28, recycle 4; 8 tokens from the model itself" in result.output
    assert f"speedup of auto over plain: 2.50x; identical output: {identical}" in result.output


@pytest.mark.real_model
def test_auto_reproduces_plain_generate_on_the_bundled_code_edit_from_copies(monkeypatch, smollm2):
    monkeypatch.setattr(demo_module, "load_model", lambda name: smollm2)
    report = demo_module.run_demo(max_new_tokens=24)
    assert report["identical"] and report["auto"]["new_tokens"] == report["plain"]["new_tokens"] == 24
    assert sum(report["auto"]["accepted_by_source"].values()) > 0  # the function is copied, not decoded anew
