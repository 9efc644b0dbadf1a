"""Linear layers over a few rows at the machine's speed: the faster of two forms, timed once per shape.

A tree verification runs every linear layer of the model on T = 2..64 rows. On the CPU build here torch's
``linear`` (x · Wᵀ) costs about twice as much at 2 rows as at 1 (the vocabulary head of Qwen2.5-0.5B, 151,936 x
896: 39 ms for one row, 87 ms for two), while the same product taken as W · xᵀ streams the weight once (16 ms for
two rows). Which form wins depends on the machine, the BLAS library and the shape, so the first call of each
(weight shape, row bucket, dtype) times both and every later one takes the faster. Rows are bucketed (every count
up to 8, then 12, 16, 24, 32, 48, 64) because a timing is dear: both forms of every weight, the vocabulary head
included, about 1.3 s on Qwen2.5-0.5B here (a 38-node tree's first step took 1.75 s against 0.43 s), and a tree of
any size from 2 to 64 rows may come. For the same reason the choices are stored on disk per machine, torch version
and thread count (beside cost curves, ``models.disk_cache_dir``): a process that had to time every bucket again would
pay up to 13 timings (about 10 s on Qwen2.5-0.5B) within its first replies, so each machine pays them once. A
single row (a plain step) and inputs longer than ``MAX_ROWS`` (prefills) always run torch's own ``linear``, so
plain decoding's arithmetic is untouched; the two forms round differently in the last bits, as the T-row and
one-row kernels already do.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import functools
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from .files import replace_atomically
from .models import disk_cache_dir

MAX_ROWS = 64
FORMS = "torch's linear or W·xT, timed per shape"  # in a cached cost curve's key: a curve timed before is stale
_TORCH_LINEAR = F.linear
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("retrieval_spec_few_rows", default=False)
ROW_BUCKETS = (2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, MAX_ROWS)  # a row count shares the timing of the next
# (weight shape, row bucket, dtype, threads) -> whether W · xᵀ is faster; filled from disk per thread count
_TRANSPOSED_FASTER: dict[tuple, bool] = {}
_LOADED: set[int] = set()  # thread counts whose stored choices are in _TRANSPOSED_FASTER


@contextlib.contextmanager
def few_row_products(device: torch.device) -> Iterator[None]:
    """Inside, on a CPU, every ``nn.Linear`` over 2..MAX_ROWS rows runs in the faster form (in this thread or
    task only; elsewhere and outside, torch's own). On other devices it changes nothing."""
    if device.type != "cpu":
        yield
        return
    if F.linear is not _linear:
        F.linear = _linear  # installed once; when not active it is torch's linear plus one flag read
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not _ACTIVE.get() or weight.dim() != 2 or x.device.type != "cpu":
        return _TORCH_LINEAR(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    if not 2 <= rows <= MAX_ROWS:
        return _TORCH_LINEAR(x, weight, bias)
    threads = torch.get_num_threads()
    key = (tuple(weight.shape), ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)], str(weight.dtype), threads)
    if key not in _TRANSPOSED_FASTER and threads not in _LOADED:
        _TRANSPOSED_FASTER.update(_stored_choices(threads))
        _LOADED.add(threads)
    if key not in _TRANSPOSED_FASTER:
        _TRANSPOSED_FASTER[key] = _transposed_faster(x, weight, bias)
        _store_choices(threads)
    return _transposed(x, weight, bias) if _TRANSPOSED_FASTER[key] else _TORCH_LINEAR(x, weight, bias)


def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x · Wᵀ (+ b) computed as (W · xᵀ)ᵀ, contiguous, in x's shape but the last dimension."""
    out = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _transposed_faster(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether W · xᵀ beat torch's linear: the fastest run of each after a warm-up (another process only ever adds
    time), the two taken in turn so that a burst of load hits both alike; three runs of each, or more, up to 20,
    until each form's add up to 2 ms (a small product's single time is mostly noise)."""
    forms = (_transposed, _TORCH_LINEAR)
    best, total = [float("inf")] * 2, [0.0] * 2
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
    return disk_cache_dir() / "kernels" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _stored_choices(threads: int) -> dict[tuple, bool]:
    """The choices stored for this machine at ``threads`` threads; none when there are none or the file is
    damaged (they are timed again)."""
    path = _choices_path(threads)
    try:
        rows = json.loads(path.read_text())["choices"]
        return {(tuple(int(d) for d in shape), int(bucket), str(dtype), threads): bool(faster)
                for shape, bucket, dtype, faster in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _store_choices(threads: int) -> None:
    """Store every choice known at ``threads`` threads with those already on disk, atomically (two processes
    storing at the same moment may lose one's new choices: they are timed again). Never raises: a cache that
    cannot be written keeps the choices for this process only."""
    path = _choices_path(threads)
    mine = [(k, v) for k, v in list(_TRANSPOSED_FASTER.items()) if k[3] == threads]  # a snapshot: other threads add
    known = _stored_choices(threads) | dict(mine)
    rows = [[list(shape), bucket, dtype, faster] for (shape, bucket, dtype, _), faster in sorted(known.items())]
    try:
        replace_atomically(path, json.dumps({"cpu": cpu_name(), "torch": torch.__version__, "threads": threads,
                                             "choices": rows}))
    except OSError:
        pass  # the choices hold for this process only
