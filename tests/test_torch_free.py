"""The core — datastore, builders, drafters, tree, sizing, acceptance, calibration, fusion, the verifier seam, the
replay and the loop itself — is numpy (and numba's compiled loops): importing it never imports torch, and the model-free replay
(benchmarks/simulate.py, the engine on a replay verifier) runs without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    "retrieval_spec.errors",
    "retrieval_spec.config",
    "retrieval_spec.files",
    "retrieval_spec.cli",  # so that options and paths are refused in a fraction of a second
    "retrieval_spec.datastore",
    "retrieval_spec.builders",
    "retrieval_spec.drafters.base",
    "retrieval_spec.drafters.prompt_lookup",
    "retrieval_spec.drafters.recycling",
    "retrieval_spec.drafters.rest",
    "retrieval_spec.drafters.ngram_index",
    "retrieval_spec.drafters.cross_path",
    "retrieval_spec.drafters.lookahead",
    "retrieval_spec.drafters.state",
    "retrieval_spec.drafters.history",
    "retrieval_spec.datastore.reader",
    "retrieval_spec.builders.build",
    "retrieval_spec.builders.publish",
    "retrieval_spec.tree",
    "retrieval_spec.sizing",
    "retrieval_spec.acceptance",
    "retrieval_spec.calibration",
    "retrieval_spec.fusion",
    "retrieval_spec.verifier",
    "retrieval_spec.replay",
    "retrieval_spec.generate",  # the loop: only the model verifier imports torch
    "retrieval_spec.families",
    "retrieval_spec.chat",
    "retrieval_spec.drafters.registry",
    "retrieval_spec.integrations.vllm",
]


@pytest.mark.parametrize("module", PURE)
def test_importing_a_core_module_loads_neither_torch_nor_numba(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'; " \
           f"assert 'transformers' not in sys.modules, 'transformers imported'; " \
           f"assert 'llvmlite' not in sys.modules, 'numba imported at import'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_model_free_replay_runs_with_torch_unimportable(tmp_path):
    rng = np.random.default_rng(0)
    records = tmp_path / "plain.jsonl"
    with open(records, "w") as f:
        for qid in range(3):
            prompt = rng.integers(0, 500, 60)
            output = np.concatenate([prompt[10:30], rng.integers(0, 500, 20)])
            f.write(json.dumps({"question_id": qid, "category": "copy", "prompt": prompt.tolist(),
                                "output": output.tolist(), "top": np.tile(output[:, None], (1, 8)).tolist()}) + "\n")
    out = tmp_path / "simulate.json"
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            f"sys.argv = ['simulate.py', '--records', {str(records)!r}, '--methods', 'pld,auto', "
            f"'--vocab-size', '500', '--out', {str(out)!r}]; "
            "runpy.run_path('benchmarks/simulate.py', run_name='__main__')")
    path = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    report = json.loads(out.read_text())["methods"]
    assert report["pld"]["copy"]["tokens_per_step"] > 1.0 and set(report) == {"pld", "auto"}
