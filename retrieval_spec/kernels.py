"""Linear layers over a few rows at the machine's speed: the faster of two forms, timed once per shape.

A tree verification runs every linear layer of the model on T = 2..64 rows. On the CPU build here torch's
``linear`` (x · Wᵀ) costs about twice as much at 2 rows as at 1 (the vocabulary head of Qwen2.5-0.5B, 151,936 x
896: 39 ms for one row, 87 ms for two), while the same product taken as W · xᵀ streams the weight once (16 ms for
two rows). Which form wins depends on the machine, the BLAS library and the shape, so the first call of each
(weight shape, row bucket, dtype) times both and every later one takes the faster. Rows are bucketed (every count
up to 8, then 12, 16, 24, 32, 48, 64) because a timing is dear: both forms of every weight, the vocabulary head
included, about 1.3 s on Qwen2.5-0.5B here (a 38-node tree's first step took 1.75 s against 0.43 s), and a tree of
any size from 2 to 64 rows may come. A single row (a plain step) and inputs longer than ``MAX_ROWS`` (prefills)
always run torch's own ``linear``, so plain decoding's arithmetic is untouched; the two forms round differently in
the last bits, as the T-row and one-row kernels already do.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import time
from typing import Iterator

import torch
import torch.nn.functional as F

MAX_ROWS = 64
FORMS = "torch's linear or W·xT, timed per shape"  # in a cached cost curve's key: a curve timed before is stale
_TORCH_LINEAR = F.linear
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("retrieval_spec_few_rows", default=False)
ROW_BUCKETS = (2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, MAX_ROWS)  # a row count shares the timing of the next
_TRANSPOSED_FASTER: dict[tuple, bool] = {}  # (weight shape, row bucket, dtype, device) -> whether W · xᵀ is faster


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
    key = (tuple(weight.shape), ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)], weight.dtype, x.device)
    faster = _TRANSPOSED_FASTER.get(key)
    if faster is None:
        faster = _TRANSPOSED_FASTER[key] = _time(_transposed, x, weight, bias) < _time(_TORCH_LINEAR, x, weight, bias)
    return _transposed(x, weight, bias) if faster else _TORCH_LINEAR(x, weight, bias)


def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x · Wᵀ (+ b) computed as (W · xᵀ)ᵀ, contiguous, in x's shape but the last dimension."""
    out = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _time(form, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """The fastest run of ``form`` after a warm-up, in seconds (another process only ever adds time): three runs,
    or more, up to 20, until they add up to 2 ms (a small product's single time is mostly noise)."""
    form(x, weight, bias)
    best, total, runs = float("inf"), 0.0, 0
    while runs < 3 or (total < 2e-3 and runs < 20):
        start = time.perf_counter()
        form(x, weight, bias)
        took = time.perf_counter() - start
        best, total, runs = min(best, took), total + took, runs + 1
    return best
