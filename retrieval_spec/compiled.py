"""How the engine's per-node loops are compiled, and the array types their signatures name.

Drafting, merging, calibrating and accepting walk a step's few hundred nodes one by one; in Python and numpy that
was most of the host time per step. Those loops are numba kernels with fixed signatures: compiled when their module
is first imported after an install (about 10 s on a 2-core CPU for all of them), cached beside the module, and
released from the GIL. A fixed signature refuses an array of another dtype with a TypeError instead of compiling a
second version in the middle of a step. Inputs a kernel only reads are typed :func:`view`: writable and read-only
arrays (the root alone's shared arrays, a cached table) and any layout are accepted.
"""

from __future__ import annotations

import numba
from numba import types

i32, i64, u8, f32, f64, boolean, void = (types.int32, types.int64, types.uint8, types.float32, types.float64,
                                        types.boolean, types.void)


def kernel(result, *arguments):
    """``numba.njit`` with the signature ``result(*arguments)``, cached, without the GIL."""
    return numba.njit(result(*arguments), cache=True, nogil=True)


def array(dtype, ndim: int = 1) -> types.Array:
    """A writable array: what a kernel returns or writes in place."""
    return types.Array(dtype, ndim, "A")


def view(dtype, ndim: int = 1) -> types.Array:
    """An array a kernel only reads, writable or not, of any layout."""
    return types.Array(dtype, ndim, "A", readonly=True)


def returns(*arrays) -> types.Tuple:
    """The type of a kernel's tuple of results."""
    return types.Tuple(arrays)
