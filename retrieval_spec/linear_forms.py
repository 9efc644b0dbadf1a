"""Linear layers over a few rows in the faster of two forms, chosen once per machine, applied to one forward.

A tree verification runs every linear layer of the model on T = 2..64 rows. On some CPU builds torch's
``linear`` (x · Wᵀ) costs about twice as much at 2 rows as at 1 (the vocabulary head of Qwen2.5-0.5B, 151,936 x
896: 39 ms for one row, 87 ms for two), while the same product taken as W · xᵀ streams the weight once (16 ms for
two rows); on others the two forms cost the same. Which wins depends on the machine, the BLAS library and the
shape, so it is measured, never assumed.

Scope: :class:`FewRowLinear` lists one model's ``nn.Linear`` layers. ``with forms.applied(rows):`` around one
forward gives the layers whose shape runs faster transposed at that row count an instance ``forward`` that
computes (W · xᵀ)ᵀ, for this thread only (another thread calling the model at that moment runs torch's own), and
removes it on the way out. Nothing of torch is replaced: outside the scope, for other models and other threads,
every layer and ``torch.nn.functional.linear`` are torch's own.

Choices: one per (weight shape, dtype, row bucket, thread count), timed when a model is first wrapped, never
inside a forward, and stored per machine and torch version beside the cost curves (``files.disk_cache_dir``), so that
every process on a machine rounds alike. Rows are bucketed (every count up to 8, then 12, 16, 24, 32, 48, 64): a
row count shares the choice of the next bucket. One row (a plain step) and more than ``MAX_ROWS`` rows (prefills)
always run torch's form, so plain decoding's arithmetic is untouched; the two forms round differently in the last
bits, as T-row and one-row kernels already do. ``RETRIEVAL_SPEC_LINEAR_FORMS=torch`` (or ``enabled=False``) keeps
torch's form everywhere.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from .files import disk_cache_dir, replace_atomically

MAX_ROWS = 64
ROW_BUCKETS = (2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, MAX_ROWS)
FORMS = "torch's linear or W·xT, timed per shape"  # in a cached cost curve's key: a curve timed before is stale
SWITCH = "RETRIEVAL_SPEC_LINEAR_FORMS"  # "torch": torch's form everywhere
_APPLIED: contextvars.ContextVar[bool] = contextvars.ContextVar("retrieval_spec_linear_forms", default=False)
# (weight shape, row bucket, dtype, threads) -> whether W · xᵀ is faster: what this process knows, from disk or timed
_CHOICES: dict[tuple, bool] = {}
_LOADED: set[int] = set()  # thread counts whose stored choices are in _CHOICES


class FewRowLinear:
    """The faster form of every plain ``nn.Linear`` of one model, per row bucket, ready to apply to a forward.

    Args:
        model: the module whose linear layers are considered (exactly ``torch.nn.Linear``, on the CPU, with no
            instance ``forward`` of their own: a layer another library wrapped keeps its wrapper).
        enabled: False keeps torch's form everywhere (as does ``RETRIEVAL_SPEC_LINEAR_FORMS=torch``).
    """

    def __init__(self, model: torch.nn.Module, enabled: bool = True) -> None:
        self.enabled = enabled and os.environ.get(SWITCH, "") != "torch"
        self.layers = [layer for layer in model.modules() if type(layer) is torch.nn.Linear
                       and "forward" not in layer.__dict__ and layer.weight.device.type == "cpu"]
        self._swaps: dict[tuple[int, int], list[tuple[torch.nn.Linear, Callable]]] = {}  # (bucket, threads)
        if self.enabled:
            for bucket in ROW_BUCKETS:
                self._transposed_layers(bucket)

    @contextlib.contextmanager
    def applied(self, rows: int) -> Iterator[None]:
        """Inside, in this thread, the layers run in the faster form for ``rows`` rows (tokens in the forward)."""
        swaps = self._transposed_layers(bucket_of(rows)) if self.enabled and 2 <= rows <= MAX_ROWS else []
        if not swaps:
            yield
            return
        token = _APPLIED.set(True)
        for layer, forward in swaps:
            layer.__dict__["forward"] = forward
        try:
            yield
        finally:
            for layer, _ in swaps:
                layer.__dict__.pop("forward", None)
            _APPLIED.reset(token)

    def _transposed_layers(self, bucket: int) -> list[tuple[torch.nn.Linear, Callable]]:
        """The layers that run transposed at ``bucket`` rows with this thread count, each with its forward
        (choices this machine has not stored are timed now and stored)."""
        threads = torch.get_num_threads()
        if (bucket, threads) not in self._swaps:
            keys = {layer: (tuple(layer.weight.shape), bucket, str(layer.weight.dtype), threads)
                    for layer in self.layers}
            missing = {key: layer for layer, key in keys.items() if key not in _known_choices(threads)}
            if missing:
                for key, layer in missing.items():
                    _CHOICES[key] = _transposed_faster(layer, bucket)
                _store_choices(threads)
            self._swaps[(bucket, threads)] = [(layer, _transposed_forward(layer)) for layer, key in keys.items()
                                              if _CHOICES[key]]
        return self._swaps[(bucket, threads)]


def bucket_of(rows: int) -> int:
    """The row bucket whose choice ``rows`` rows share (2 <= rows <= MAX_ROWS)."""
    return ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)]


def _transposed_forward(layer: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``layer``'s forward in the transposed form while applied in this thread, torch's own otherwise."""
    own = torch.nn.Linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _APPLIED.get():
            return transposed_linear(x, layer.weight, layer.bias)
        return own(layer, x)

    return forward


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x · Wᵀ (+ b) computed as (W · xᵀ)ᵀ, contiguous, in x's shape but the last dimension."""
    out = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _transposed_faster(layer: torch.nn.Linear, rows: int) -> bool:
    """Whether W · xᵀ beats torch's linear on ``rows`` random rows for this layer's weight: the fastest run of
    each after a warm-up (another process only ever adds time), the two taken in turn so that a burst of load
    hits both alike; three runs of each, or more, up to 20, until each form's add up to 2 ms."""
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    forms = (transposed_linear, torch.nn.functional.linear)
    best, total = [float("inf")] * 2, [0.0] * 2
    with torch.inference_mode():
        for form in forms:
            form(x, weight, bias)
        runs = 0
        while runs < 3 or (min(total) < 2e-3 and runs < 20):
            for i, form in enumerate(forms):
                start = time.perf_counter()
                form(x, weight, bias)
                took = time.perf_counter() - start
                best[i], total[i] = min(best[i], took), total[i] + took
            runs += 1
    return best[0] < best[1]


@functools.cache
def cpu_name() -> str:
    """This machine's processor as the OS names it, for cache keys (Linux: /proc/cpuinfo's model name, or on ARM
    its hardware and part number; elsewhere ``platform.processor()``)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
                      if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        name = fields.get("model name") or " ".join(fields.get(k, "") for k in ("Hardware", "CPU implementer",
                                                                              "CPU part")).strip()
        if name:
            return name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _choices_path(threads: int) -> Path:
    key = json.dumps([cpu_name(), platform.machine(), torch.__version__, threads, FORMS])
    return disk_cache_dir() / "linear_forms" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _known_choices(threads: int) -> dict[tuple, bool]:
    """Every choice known at ``threads`` threads: this process's, merged with this machine's stored ones."""
    if threads not in _LOADED:
        _CHOICES.update({k: v for k, v in _stored_choices(threads).items() if k not in _CHOICES})
        _LOADED.add(threads)
    return _CHOICES


def _stored_choices(threads: int) -> dict[tuple, bool]:
    """The choices stored for this machine at ``threads`` threads; none when there are none or the file is
    damaged (they are timed again)."""
    try:
        rows = json.loads(_choices_path(threads).read_text())["choices"]
        return {(tuple(int(d) for d in shape), int(bucket), str(dtype), threads): bool(faster)
                for shape, bucket, dtype, faster in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _store_choices(threads: int) -> None:
    """Store every choice known at ``threads`` threads with those already on disk, atomically. Never raises: a
    cache that cannot be written keeps the choices for this process only."""
    mine = {k: v for k, v in list(_CHOICES.items()) if k[3] == threads}  # a snapshot: other threads may add
    known = _stored_choices(threads) | mine
    rows = [[list(shape), bucket, dtype, faster] for (shape, bucket, dtype, _), faster in sorted(known.items())]
    try:
        replace_atomically(_choices_path(threads), json.dumps({"cpu": cpu_name(), "torch": torch.__version__,
                                                               "threads": threads, "choices": rows}))
    except OSError:
        pass  # the choices hold for this process only
