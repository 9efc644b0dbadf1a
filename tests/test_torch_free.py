"""Datastore, builders, drafters, tree and calibration are pure numpy: importing them never imports torch."""

import subprocess
import sys

import pytest

PURE = [
    "retrieval_spec.errors",
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
    "retrieval_spec.calibration",
    "retrieval_spec.fusion",
]


@pytest.mark.parametrize("module", PURE)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'; " \
           f"assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
