"""Linear layers over a few rows in the fastest of three forms, chosen once per machine, applied to one forward.

A tree verification runs every linear layer of the model on T = 2..64 rows. On some CPU builds torch's
``linear`` (x · Wᵀ) costs about twice as much at 2 rows as at 1 (the vocabulary head of Qwen2.5-0.5B, 151,936 x
896: 39 ms for one row, 87 ms for two), while the same product taken as W · xᵀ streams the weight once (16 ms for
two rows); on others (this project's Xeon, MKL) torch's linear keeps the one-row cost up to 3 rows and doubles at
4 (the MLP's 4,864 x 896: 0.32 ms at 1-3 rows, 0.62 at 4, 0.94 at 8), because the BLAS packs the weight again on
every call; there MKL's own packed product, the weight packed once (``torch.ops.mkl._mkl_linear``, what torch's
compiler uses for frozen CPU models), costs 0.33 ms at 4 rows and 0.34 at 8, and the whole forward of
Qwen2.5-0.5B over 8 nodes 144 ms instead of 216. Which form wins depends on the machine, the BLAS library and the
shape, so it is measured, never assumed.

Scope: :class:`FewRowLinear` lists one model's ``nn.Linear`` layers. ``with forms.applied(rows):`` around one
forward gives the layers whose shape runs faster in another form at that row count an instance ``forward`` that
computes it, for this thread only (another thread calling the model at that moment runs torch's own), and
removes it on the way out. Nothing of torch is replaced: outside the scope, for other models and other threads,
every layer and ``torch.nn.functional.linear`` are torch's own.

Choices: one per (weight shape, dtype, row bucket, thread count), timed when a model is first wrapped, never
inside a forward, and stored per machine and torch version beside the cost curves (``files.disk_cache_dir``), so that
every process on a machine rounds alike. Rows are bucketed (every count up to 8, then 12, 16, 24, 32, 48, 64): a
row count shares the choice of the next bucket. One row (a plain step) and more than ``MAX_ROWS`` rows (prefills)
always run torch's form, so plain decoding's arithmetic is untouched; the forms round differently in the last
bits, as T-row and one-row kernels already do. ``RETRIEVAL_SPEC_LINEAR_FORMS=torch`` (or ``enabled=False``) keeps
torch's form everywhere; ``RETRIEVAL_SPEC_LINEAR_FORMS=unpacked`` makes no packed copy (the next fastest form runs).

Packed weights cost memory: MKL's packed copy of a float32 weight is 1.3-1.75 times its size, made when a model
whose choices name the packed form is wrapped (0.4 s for SmolLM2-135M, 4.5-5 s for Qwen2.5-0.5B here), kept
once per layer for as long as the layer lives (whatever number of generators wrap it) and made again if the
weight changes. Copies are made only while all of them together fit in half the memory the machine has
available; a layer beyond that runs its fastest other form.
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
import weakref
from pathlib import Path
from typing import Callable, Iterator

import torch

from .files import disk_cache_dir, replace_atomically

MAX_ROWS = 64
ROW_BUCKETS = (2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, MAX_ROWS)
FORMS = "torch's linear, W·xT or MKL's packed product, timed per shape"  # in a cached cost curve's key
SWITCH = "RETRIEVAL_SPEC_LINEAR_FORMS"  # "torch": torch's form everywhere; "unpacked": no packed copies
PACKED_SHARE = 0.5  # of the memory available when a copy is made: the most all packed copies may take
_APPLIED: contextvars.ContextVar[bool] = contextvars.ContextVar("retrieval_spec_linear_forms", default=False)
# (weight shape, row bucket, dtype, threads) -> {form: ms}: what this process knows, from disk or timed
_CHOICES: dict[tuple, dict[str, float]] = {}
_LOADED: set[int] = set()  # thread counts whose stored choices are in _CHOICES
# layer -> (its weight's data pointer and version when packed, the packed copy): one per layer in the process
_PACKED: weakref.WeakKeyDictionary[torch.nn.Linear, tuple[int, int, torch.Tensor]] = weakref.WeakKeyDictionary()


class FewRowLinear:
    """The fastest form of every plain ``nn.Linear`` of one model, per row bucket, ready to apply to a forward.

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
                self._swapped_layers(bucket)

    @contextlib.contextmanager
    def applied(self, rows: int) -> Iterator[None]:
        """Inside, in this thread, the layers run in the fastest form for ``rows`` rows (tokens in the forward)."""
        swaps = self._swapped_layers(bucket_of(rows)) if self.enabled and 2 <= rows <= MAX_ROWS else []
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

    def forms(self, rows: int) -> dict[str, int]:
        """How many of the model's linear layers run each form at ``rows`` rows (for reports)."""
        counts = {"torch": len(self.layers)}
        if self.enabled and 2 <= rows <= MAX_ROWS:
            for _, forward in self._swapped_layers(bucket_of(rows)):
                counts["torch"] -= 1
                counts[forward.form] = counts.get(forward.form, 0) + 1
        return counts

    def _swapped_layers(self, bucket: int) -> list[tuple[torch.nn.Linear, Callable]]:
        """The layers that run another form than torch's at ``bucket`` rows with this thread count, each with its
        forward (timings this machine has not stored are taken now, for every bucket, and stored; packed copies
        are made now)."""
        threads = torch.get_num_threads()
        if (bucket, threads) not in self._swaps:
            if not any(timed == threads for _, timed in self._swaps):  # this thread count's first bucket
                self._time_missing(threads)
            swaps = []
            for layer in self.layers:
                times = _CHOICES[_key(layer, bucket, threads)]
                ranked = sorted(times, key=times.__getitem__)
                form = next(f for f in ranked if f != "packed" or _packed_weight(layer) is not None)
                if form != "torch":
                    swaps.append((layer, _form_forward(layer, form)))
            self._swaps[(bucket, threads)] = swaps
        return self._swaps[(bucket, threads)]

    def _time_missing(self, threads: int) -> None:
        """Time every (weight shape, dtype, bucket) of the model this machine has no timing of, a shape's buckets
        together (one packed copy for all of them), and store them."""
        known = _known_choices(threads)
        missing: dict[tuple, tuple[torch.nn.Linear, list[int]]] = {}
        for layer in self.layers:
            buckets = [b for b in ROW_BUCKETS if _key(layer, b, threads) not in known]
            if buckets:
                missing.setdefault((tuple(layer.weight.shape), layer.weight.dtype), (layer, buckets))
        for layer, buckets in missing.values():
            for bucket, times in zip(buckets, _time_forms(layer, buckets)):
                _CHOICES[_key(layer, bucket, threads)] = times
        if missing:
            _store_choices(threads)


def _key(layer: torch.nn.Linear, bucket: int, threads: int) -> tuple:
    return tuple(layer.weight.shape), bucket, str(layer.weight.dtype), threads


def bucket_of(rows: int) -> int:
    """The row bucket whose choice ``rows`` rows share (2 <= rows <= MAX_ROWS)."""
    return ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)]


def _form_forward(layer: torch.nn.Linear, form: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``layer``'s forward in ``form`` (``transposed`` or ``packed``) while applied in this thread, torch's own
    otherwise (and for the packed form while gradients are recorded: MKL's product has no backward)."""
    own = torch.nn.Linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _APPLIED.get():
            return own(layer, x)
        if form == "transposed":
            return transposed_linear(x, layer.weight, layer.bias)
        packed = _packed_weight(layer)
        if packed is None or torch.is_grad_enabled():
            return own(layer, x)
        return packed_linear(x, packed, layer.weight, layer.bias)

    forward.form = form
    return forward


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x · Wᵀ (+ b) computed as (W · xᵀ)ᵀ, contiguous, in x's shape but the last dimension."""
    out = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x · Wᵀ (+ b) by MKL's product with ``packed`` (:func:`pack`'s copy of ``weight``), in x's shape but the
    last dimension. MKL computes with the packed copy only when told the true row count, as here."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkl._mkl_linear(flat, packed, weight, bias, flat.shape[0])
    return out.reshape(*x.shape[:-1], weight.shape[0])


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this torch build has MKL's packed product and ``weight`` suits it (float32, on the CPU)."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """MKL's packed copy of a float32 (out, in) weight (an opaque tensor, for :func:`packed_linear`)."""
    with torch.no_grad():
        return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), MAX_ROWS)


def _packed_weight(layer: torch.nn.Linear) -> torch.Tensor | None:
    """The layer's packed weight, made now if it has none or its weight changed since (None: it cannot be packed,
    packing is switched off, or another copy would take more than :data:`PACKED_SHARE` of the memory available)."""
    weight = layer.weight
    held = _PACKED.get(layer)
    if held is not None and held[:2] == (weight.data_ptr(), weight._version):
        return held[2]
    _PACKED.pop(layer, None)  # a copy of what the weight was
    if not can_pack(weight) or os.environ.get(SWITCH, "") == "unpacked":
        return None
    size = 2 * weight.numel() * weight.element_size()  # MKL's copies measured 1.3-1.75 times the weight
    taken = sum(copy.numel() * copy.element_size() for _, _, copy in _PACKED.values())
    available = available_memory()
    if available is not None and taken + size > PACKED_SHARE * (available + taken):
        return None
    _PACKED[layer] = (weight.data_ptr(), weight._version, pack(weight))
    return _PACKED[layer][2]


def available_memory() -> int | None:
    """Bytes of memory the machine has available now (Linux: ``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _time_forms(layer: torch.nn.Linear, buckets: list[int]) -> list[dict[str, float]]:
    """Per row count of ``buckets``, milliseconds of each form on that many random rows for this layer's weight:
    the fastest run of each after a warm-up (another process only ever adds time), the forms taken in turn so
    that a burst of load hits all alike; three runs of each, or more, up to 20, until each form's add up to 2 ms.
    The packed form is timed only where it can run (:func:`can_pack`) and kept only if it computes torch's
    product (to float32 rounding)."""
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    packed = pack(weight) if can_pack(weight) else None
    timings = []
    with torch.inference_mode():
        for rows in buckets:
            x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
            forms: dict[str, Callable[[], torch.Tensor]] = {
                "torch": lambda: torch.nn.functional.linear(x, weight, bias),
                "transposed": lambda: transposed_linear(x, weight, bias)}
            if packed is not None:
                forms["packed"] = lambda: packed_linear(x, packed, weight, bias)
                if not _same_product(forms["packed"](), forms["torch"]()):
                    del forms["packed"]
            for form in forms.values():
                form()
            best, total = dict.fromkeys(forms, float("inf")), dict.fromkeys(forms, 0.0)
            runs = 0
            while runs < 3 or (min(total.values()) < 2e-3 and runs < 20):
                for name, form in forms.items():
                    start = time.perf_counter()
                    form()
                    took = time.perf_counter() - start
                    best[name], total[name] = min(best[name], took), total[name] + took
                runs += 1
            timings.append({name: round(seconds * 1e3, 4) for name, seconds in best.items()})
    return timings


def _same_product(ours: torch.Tensor, torchs: torch.Tensor) -> bool:
    """Whether two float32 products agree to their rounding (relative to the output's scale)."""
    scale = float(torchs.abs().max()) + 1e-6
    return bool(torch.allclose(ours, torchs, rtol=1e-4, atol=1e-4 * scale))


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


def _known_choices(threads: int) -> dict[tuple, dict[str, float]]:
    """Every choice known at ``threads`` threads: this process's, merged with this machine's stored ones."""
    if threads not in _LOADED:
        _CHOICES.update({k: v for k, v in _stored_choices(threads).items() if k not in _CHOICES})
        _LOADED.add(threads)
    return _CHOICES


def _stored_choices(threads: int) -> dict[tuple, dict[str, float]]:
    """The timings stored for this machine at ``threads`` threads; none when there are none or the file is
    damaged (they are timed again)."""
    try:
        rows = json.loads(_choices_path(threads).read_text())["choices"]
        stored = {}
        for shape, bucket, dtype, times in rows:
            times = {str(form): float(ms) for form, ms in times.items()}
            if "torch" not in times or not set(times) <= {"torch", "transposed", "packed"}:
                raise ValueError(f"unknown forms {sorted(times)}")
            stored[(tuple(int(d) for d in shape), int(bucket), str(dtype), threads)] = times
        return stored
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _store_choices(threads: int) -> None:
    """Store every timing known at ``threads`` threads with those already on disk, atomically. Never raises: a
    cache that cannot be written keeps the timings for this process only."""
    mine = {k: v for k, v in list(_CHOICES.items()) if k[3] == threads}  # a snapshot: other threads may add
    known = _stored_choices(threads) | mine
    rows = [[list(shape), bucket, dtype, times] for (shape, bucket, dtype, _), times in sorted(known.items())]
    try:
        replace_atomically(_choices_path(threads), json.dumps({"cpu": cpu_name(), "torch": torch.__version__,
                                                               "threads": threads, "choices": rows}))
    except OSError:
        pass  # the choices hold for this process only
