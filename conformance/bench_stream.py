"""The STREAM-style kernels of ``normref bench``'s bandwidth reference (a module of their own so that
numba can cache them: the benchmark does not recompile them at every run)."""

from __future__ import annotations

import numba
from numba import prange

__all__ = ["copy", "total"]


@numba.njit(parallel=True, fastmath=True, cache=True)
def copy(a, b):
    """b[:] = a (read a, write b), over numba's thread pool."""
    for i in prange(a.size):
        b[i] = a[i]


@numba.njit(parallel=True, fastmath=True, cache=True)
def total(a):
    """The sum of a (read a), over numba's thread pool."""
    s = 0.0
    for i in prange(a.size):
        s += a[i]
    return s
