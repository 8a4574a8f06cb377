"""numba options for every normref kernel, in one place (no ``fastmath=`` scattered across kernels).

- ``parallel=True``: the kernels split their work over channels, rows or chunks of the batch with
  ``prange`` (numba's thread pool; ``NUMBA_NUM_THREADS`` sets its size).
- ``fastmath={"reassoc", "contract"}``: lets LLVM reorder the float64 accumulations into vector lanes
  and fuse multiply-adds. It keeps NaN and inf semantics (no ``nnan``/``ninf``), so a NaN in the
  input still comes out as NaN, as on the array-API path. Reassociation changes only the rounding
  of the float64 sums (relative 1e-16 per term), far below float32's and float64's output rounding.
- ``cache=True``: compiled machine code is written beside the package (``__pycache__``) or, when
  that folder is read-only, in numba's user-wide cache; if no cache location is usable, the kernels
  are compiled per process instead (:func:`jit` falls back to ``cache=False``).
"""

from __future__ import annotations

import os
import warnings

# numba itself is imported in jit(), the first time a kernel module is built: reading MIN_SIZE
# (``accepts``) or registering the kernels never imports it (a tiny input stays cheap).

__all__ = ["FASTMATH", "PARALLEL", "CACHE", "SERIAL_BELOW", "MIN_SIZE", "BACKGROUND", "jit", "pair"]

# Inputs with fewer elements than this run the single-threaded build of a kernel: waking the thread
# pool costs more than the work (an 8 × 16 layer norm must stay in the tens of microseconds).
SERIAL_BELOW = int(os.environ.get("NORMREF_NUMBA_SERIAL_BELOW", 1 << 16))
# Inputs with fewer elements than this are declined (the array-API formula runs): below it the
# Python-side set-up of a kernel call (layout analysis, strided views, dispatch) costs more than the
# few NumPy passes of the formula.
MIN_SIZE = int(os.environ.get("NORMREF_NUMBA_MIN_SIZE", 4096))

# Cold start (issue 18): compiling a parallel build takes 2–3 times as long as its serial build (a
# (64, 1024) layer norm's first forward on an empty cache: 5.2 s against 2.1 s). With BACKGROUND on,
# the first call of a parallel build for a type signature runs the serial build, and a child process
# compiles the parallel one into numba's cache (its own process: numba's compiler lock and the GIL
# would otherwise hold back the caller's own compilations); calls after it finished load it from the
# cache and run it. Both builds take the same chunk arguments and compute the same formula (the tests
# check each against it). Only where the kernels are cached (CACHE, a writable cache location);
# NORMREF_NUMBA_BACKGROUND=0 compiles the parallel build in the caller (the first call waits).
BACKGROUND = os.environ.get("NORMREF_NUMBA_BACKGROUND", "1") not in ("0", "false", "False", "off")

FASTMATH = frozenset({"reassoc", "contract"})
PARALLEL = True
CACHE = os.environ.get("NORMREF_NUMBA_CACHE", "1") not in ("0", "false", "off")


def jit(fn=None, *, parallel: bool = PARALLEL):
    """``numba.njit`` with normref's options; caching is dropped (not fatal) where it cannot work."""

    import numba

    def wrap(f):
        opts = dict(parallel=parallel, fastmath=set(FASTMATH), nogil=True, error_model="numpy")
        if CACHE:
            try:
                return numba.njit(cache=True, **opts)(f)
            except Exception as e:  # no writable cache location (read-only install, no home)
                warnings.warn(f"normref numba kernels: caching disabled ({e}); compiling per process",
                              RuntimeWarning, stacklevel=2)
        return numba.njit(**opts)(f)

    return wrap(fn) if fn is not None else wrap


def pair(f):
    """(parallel build, single-threaded build) of one kernel; the serial one is a renamed copy so that
    the two have their own cache files."""
    import types

    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + "_serial"
    g.__module__ = f.__module__
    return jit(f), jit(g, parallel=False)


def thresholds(min_size: int | None = None, serial_below: int | None = None):
    """Context manager: run with other size thresholds, ``MIN_SIZE`` (below it the kernels decline)
    and ``SERIAL_BELOW`` (below it the single-threaded builds run); ``None`` keeps a value.

    While the context lasts the parallel builds are compiled in the calling process (no background
    compilation: a test that asks for a build gets that build from its first call).

    For tests and the conformance suite, whose inputs are small: ``thresholds(min_size=1)`` sends
    every float32/float64 input through the kernels, ``serial_below=1`` through the parallel builds,
    ``serial_below=2**62`` through the serial ones. The values are module globals read at each call:
    the change is process-wide (every thread) while the context lasts, so do not use it while other
    threads call the kernels.
    """
    import contextlib

    for name, v in (("min_size", min_size), ("serial_below", serial_below)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"thresholds: {name} must be an int ≥ 0 or None; got {v!r}")

    @contextlib.contextmanager
    def ctx():
        global MIN_SIZE, SERIAL_BELOW, BACKGROUND
        saved = MIN_SIZE, SERIAL_BELOW, BACKGROUND
        BACKGROUND = False
        if min_size is not None:
            MIN_SIZE = min_size
        if serial_below is not None:
            SERIAL_BELOW = serial_below
        try:
            yield
        finally:
            MIN_SIZE, SERIAL_BELOW, BACKGROUND = saved

    return ctx()
