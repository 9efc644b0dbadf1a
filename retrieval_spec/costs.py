"""The measured cost of verification on this machine, probed once per model, device, dtype and batch size.

On the 2-core CPU here a forward over 2-4 tokens costs 1.05-1.5x one decoding step and one over 8 about 1.8x (on
another machine, with the few-row forms of :mod:`retrieval_spec.linear_forms`, 0.65-1.0x and 1.2-1.5x); on a GPU
nearly the same as one. The sizer starts from this curve (:meth:`ModelVerifier.cost_prior`) and learns from every
real step, storing what it learned here for the next process. CUDA timings are synchronised.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .files import disk_cache_dir, replace_atomically
from .linear_forms import FORMS, cpu_name
from .sizing import CostCurve
from .tree import DraftTree
from .verifier import PhaseTimer, RowDraft

if TYPE_CHECKING:
    from .verify import ModelVerifier

SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class CostProbe:
    """How the curve is measured: forwards of chains of ``sizes`` nodes over a ``context_len`` prefix, in each
    of ``batch`` rows (multi-sample decoding verifies one tree per row in one forward)."""

    sizes: tuple[int, ...] = SIZES
    context_len: int = 256  # typical prompt + output length on the Spec-Bench dev split
    repeats: int = 4
    batch: int = 1

    @staticmethod
    def fitting(max_positions: int | None, batch: int = 1) -> CostProbe:
        """The default probe for ``batch`` rows, shortened to fit a model that embeds at most ``max_positions``
        positions (learned position tables; None: no limit): the context shrinks first, then the largest sizes."""
        if max_positions is None:
            return CostProbe(batch=batch)
        context = max(1, min(256, max_positions - max(SIZES) - 1))
        sizes = tuple(size for size in SIZES if context + size < max_positions) or (1,)
        return CostProbe(sizes=sizes, context_len=context, batch=batch)


def measure_cost_curve(verifier: ModelVerifier, probe: CostProbe = CostProbe()) -> CostCurve:
    """Time one verification forward at every probed tree size (the verifier's cache is replaced).

    The fastest of ``probe.repeats`` runs counts: other processes only ever add time. The sizes take turns, a
    round of every size per repeat (the first round warms each shape up), so that a burst of load lands on one run
    of several sizes, not on every run of a few: on this project's shared 2-core machines a probe that timed each
    size's runs back to back once put Qwen2.5-0.5B's 3 and 4 nodes at 209 and 197 ms against 2 nodes' 93, where
    the same process's steps then took 114 and 112 (and the sizer, until it learned so, drafted a single node).
    """
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, verifier.vocab_size, probe.context_len + 1).astype(np.int32)
    verifier.reset([prompt] * probe.batch)
    rows = [[RowDraft(DraftTree.chain(rng.integers(0, verifier.vocab_size, size).astype(np.int32)), None, prompt)]
            * probe.batch for size in probe.sizes]
    ms = np.full(len(probe.sizes), np.inf)
    for repeat in range(probe.repeats + 1):
        for i, size in enumerate(probe.sizes):
            synchronize(verifier.device)
            start = time.perf_counter()
            verifier.verify(rows[i], size, PhaseTimer(time.perf_counter))
            synchronize(verifier.device)
            if repeat:
                ms[i] = min(ms[i], (time.perf_counter() - start) * 1e3)
            verifier.rollback()
    return CostCurve(sizes=np.array(probe.sizes), ms=ms)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_cost_curve(verifier: ModelVerifier, probe: CostProbe = CostProbe()) -> CostCurve:
    """The cost curve of the verifier's model on this machine, device, dtype and thread count: the last one stored
    (the sizer stores what it learned from real steps, ``store_cost_curve``), else probed now and stored."""
    path = _curve_path(verifier, probe)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return CostCurve(sizes=np.array(data["sizes"]), ms=np.array(data["ms"], dtype=np.float64))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file is measured again
    if sys.stderr.isatty():  # many rows take minutes to probe: say what the wait is for (scripts read no chatter)
        print(f"retrieval-spec: measuring the cost of verifying up to {max(probe.sizes)} tokens in each of "
              f"{probe.batch} row(s) on this machine, once (cached in {path.parent})", file=sys.stderr, flush=True)
    curve = measure_cost_curve(verifier, probe)
    store_cost_curve(verifier, probe, curve)
    return curve


def store_cost_curve(verifier: ModelVerifier, probe: CostProbe, curve: CostCurve) -> None:
    """Cache ``curve`` as the verifier's model's, device's, dtype's and thread count's (atomically; the last writer
    wins)."""
    replace_atomically(_curve_path(verifier, probe), json.dumps({"sizes": curve.sizes.tolist(),
                                                                "ms": curve.ms.tolist(),
                                                                "device": _device_name(verifier.model)}))


def _device_name(model: torch.nn.Module) -> str:
    name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else cpu_name()
    return f"{model.device.type}:{name}"


def _curve_path(verifier: ModelVerifier, probe: CostProbe) -> Path:
    model = verifier.model
    key = json.dumps(
        [
            model.config.to_json_string(use_diff=False),
            str(model.dtype),
            _device_name(model),
            torch.get_num_threads(),
            torch.__version__,
            FORMS if verifier.forms.enabled else "torch's linear",
            probe.sizes,
            probe.context_len,
            *([probe.batch] if probe.batch > 1 else []),
        ]
    )
    return disk_cache_dir() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
