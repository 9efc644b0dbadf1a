"""The measured cost of verification on this machine, probed once per model, device, dtype and batch size.

On the 2-core CPU here, with the few-row products of :mod:`retrieval_spec.kernels`, a forward over 2-4 tokens
costs 0.65-1.0x one decoding step and one over 8 1.2-1.5x (torch's own linear: 1.5-2.8x); on a GPU nearly the
same as one. Tree sizes are chosen from this curve (``sizing.best_size``), so it is measured, never assumed.
CUDA timings are synchronised.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from .files import replace_atomically
from .kernels import FORMS, cpu_name
from .models import disk_cache_dir
from .sizing import CostCurve
from .tree import DraftTree
from .verify import RowDraft, Sampler, Verifier


@dataclass(frozen=True)
class CostProbe:
    """How the curve is measured: forwards of chains of ``sizes`` nodes over a ``context_len`` prefix, in each
    of ``batch`` rows (multi-sample decoding verifies one tree per row in one forward)."""

    sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
    context_len: int = 256  # typical prompt + output length on the Spec-Bench dev split
    repeats: int = 4
    batch: int = 1


def measure_cost_curve(model: PreTrainedModel, probe: CostProbe = CostProbe()) -> CostCurve:
    """Time one verification forward at every probed tree size.

    The fastest of ``probe.repeats`` runs counts: other processes only ever add time.
    """
    rng = np.random.default_rng(0)
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    prompt = rng.integers(0, vocab, probe.context_len + 1).astype(np.int32)
    verifier = Verifier(model)
    verifier.reset([prompt] * probe.batch)
    greedy = Sampler()
    ms = []
    for size in probe.sizes:
        tree = DraftTree.chain(rng.integers(0, vocab, size).astype(np.int32))
        rows = [RowDraft(tree, None, prompt)] * probe.batch
        times = []
        for _ in range(probe.repeats + 1):  # the first run warms this shape up
            _synchronize(model.device)
            start = time.perf_counter()
            verifier.verify(rows, greedy)
            _synchronize(model.device)
            times.append((time.perf_counter() - start) * 1e3)
            verifier.rollback()
        ms.append(min(times[1:]))
    return CostCurve(sizes=np.array(probe.sizes), ms=np.array(ms))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_cost_curve(model: PreTrainedModel, probe: CostProbe = CostProbe()) -> CostCurve:
    """The cost curve of ``model`` on this machine, device, dtype and thread count: the last one stored (the
    decoder stores what it learned from real steps, ``store_cost_curve``), else probed now and stored."""
    path = _curve_path(model, probe)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return CostCurve(sizes=np.array(data["sizes"]), ms=np.array(data["ms"], dtype=np.float64))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file is measured again
    curve = measure_cost_curve(model, probe)
    store_cost_curve(model, probe, curve)
    return curve


def store_cost_curve(model: PreTrainedModel, probe: CostProbe, curve: CostCurve) -> None:
    """Cache ``curve`` as this model's, device's, dtype's and thread count's (atomically; the last writer wins)."""
    replace_atomically(_curve_path(model, probe), json.dumps({"sizes": curve.sizes.tolist(), "ms": curve.ms.tolist(),
                                                             "device": _device_name(model)}))


def _device_name(model: PreTrainedModel) -> str:
    name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else cpu_name()
    return f"{model.device.type}:{name}"


def _curve_path(model: PreTrainedModel, probe: CostProbe) -> Path:
    key = json.dumps(
        [
            model.config.to_json_string(use_diff=False),
            str(model.dtype),
            _device_name(model),
            torch.get_num_threads(),
            torch.__version__,
            FORMS,
            probe.sizes,
            probe.context_len,
            *([probe.batch] if probe.batch > 1 else []),
        ]
    )
    return disk_cache_dir() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
