"""The workload examples run from the checkout on the embedded model and print what their headers promise (short
runs: a dozen tokens per reply)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
SHORT = {**os.environ, "MAX_NEW_TOKENS": "12"}


def run(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=SHORT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_a_code_edit_prints_the_reply_and_its_step_statistics():
    done = run("bash", "examples/code_edit.sh")
    assert done.stdout.strip()
    assert '"mean_accepted"' in done.stderr  # --json-stats


def test_repeated_traffic_gains_more_tokens_a_step_after_a_restart_from_its_state():
    done = run("bash", "examples/repeated_traffic.sh")
    per_step = {run: float(rate) for run, rate in
                re.findall(r"^(first|second) run: 3 requests, \d+ tokens in \d+ model steps \(([\d.]+) tokens per step",
                           done.stdout, re.M)}
    assert set(per_step) == {"first", "second"} and per_step["second"] > per_step["first"], done.stdout


def test_a_second_turn_is_decoded_with_the_first_in_the_chat():
    done = run(sys.executable, "examples/second_turn.py")
    assert done.stdout.count("--- user: ") == 2 and "tokens per step" in done.stdout
