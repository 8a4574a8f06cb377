"""The array libraries the suite runs on, each with a converter from and to NumPy.

A :class:`Backend` is available when its library imports; otherwise ``reason`` says why it is
skipped. Conversions go through NumPy (the float64 reference lives there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
from typing import Any, Callable, Iterator

import numpy as np

from normref._kernels import KernelCalls, count_kernels, use_kernels
from normref._xp import to_numpy

__all__ = ["Backend", "all_backends", "available_backends", "get_backend", "DTYPES", "kernel_path",
           "claimed_kernels", "SUITE_KERNEL_THRESHOLDS", "KERNEL_DTYPES"]

DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclasses.dataclass
class Backend:
    """One array library (and mode): ``asarray(np_array, dtype_name)`` and ``to_numpy(array)``."""

    name: str
    available: bool
    reason: str = ""
    xp: Any = None
    _asarray: Callable | None = None
    dtypes: tuple = ("float64", "float32")
    has_autograd: bool = False
    kernels: bool = True  # whether normref's registered kernels are used for this backend
    # the numba kernels' size thresholds (normref.backends.numba.config.thresholds) while this column
    # runs; None: the library defaults (or no numba kernels serve this library)
    kernel_thresholds: dict | None = None
    # which computation the column runs, for the report ("" for a library no registered kernel serves)
    path: str = ""

    def asarray(self, a, dtype: str = "float64"):
        if a is None:
            return None
        if not isinstance(a, np.ndarray):
            return a
        # np.asarray(order="C") keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
        return self._asarray(np.asarray(a, dtype=np.float64, order="C"), dtype)

    def convert(self, args: tuple, kwargs: dict, dtype: str = "float64"):
        """Convert every NumPy array in a call (args and kwargs) to this backend."""
        return (
            tuple(self.asarray(a, dtype) for a in args),
            {k: self.asarray(v, dtype) for k, v in kwargs.items()},
        )

    @staticmethod
    def to_numpy(a) -> np.ndarray:
        a = to_numpy(a)
        if a.dtype not in (np.float64, np.float32, np.float16):
            a = a.astype(np.float32)  # bfloat16 (ml_dtypes) and friends
        return a

    def __repr__(self) -> str:
        return f"Backend({self.name}, available={self.available}{'' if self.available else ', ' + self.reason})"


def _numpy(kernels: bool) -> Backend:
    def conv(a, dt):
        if dt == "bfloat16":
            raise TypeError("numpy has no bfloat16")
        return a.astype(dt)

    name = "numpy" if kernels else "numpy-reference"
    b = Backend(name, True, xp=np, _asarray=conv, dtypes=("float64", "float32", "float16"), kernels=kernels)
    if not kernels:
        b.path = "array-API formulas (use_kernels(False))"
        return b
    from normref import _kernels

    if not _kernels._ENV_ENABLED:
        b.path = "array-API formulas: the kernels are switched off (NORMREF_KERNELS=0)"
        return b
    if importlib.util.find_spec("numba") is None:  # (the backend imports numba only on a kernel's first run)
        b.path = "array-API formulas: the numba kernels are unavailable (numba is not installed)"
        return b
    # every registry example is far below the kernels' default size threshold (MIN_SIZE = 4096
    # elements): with the defaults this column would run the formulas, i.e. be numpy-reference again
    b.kernel_thresholds = dict(SUITE_KERNEL_THRESHOLDS)
    b.path = ("numba kernels (size threshold {min_size}, parallel builds from {serial_below} element)"
              .format(**SUITE_KERNEL_THRESHOLDS))
    return b


# the numpy column's kernel thresholds: every float32/float64 input through the kernels (min_size 1),
# through their multi-threaded builds (serial_below 1: the thread split of the reductions, the
# "few statistics" routing of K < 2·threads, is the code that differs from the serial builds; the
# serial builds are compiled from the same source and are checked by tests/test_kernel_layouts.py)
SUITE_KERNEL_THRESHOLDS = {"min_size": 1, "serial_below": 1}
# the dtypes the numba kernels take (float16 is left to the formulas): where the numpy column claims
# kernels, a float32/float64 run of it in which no lookup took one is a suite failure
KERNEL_DTYPES = ("float32", "float64")


def claimed_kernels(b: Backend) -> list:
    """The kernels column ``b`` claims to run, as ``"<namespace>.<primitive>"``: for a column with
    ``kernel_thresholds`` (the numpy column), every primitive the numba backend registered (an empty
    list there means: claimed, but nothing registered, which the report flags); else none."""
    if b.kernel_thresholds is None:
        return []
    from normref import _kernels

    key = _kernels.namespace_key(b.xp)
    if key not in _kernels._LOADED:
        _kernels._load(key)  # the library's kernel backends (the entry points)
    return sorted(f"{ns}.{p}" for (ns, p), fn in _kernels._KERNELS.items()
                  if ns == key and getattr(fn, "__module__", "").startswith("normref.backends.numba"))


@contextlib.contextmanager
def kernel_path(b: Backend) -> Iterator[KernelCalls]:
    """Run the block on ``b``'s computation path: kernels on or off as ``b.kernels`` says, the numba
    thresholds of ``b.kernel_thresholds``; yields the :class:`normref._kernels.KernelCalls` counted
    inside (offered and taken per primitive), which the report prints per column."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(use_kernels(b.kernels))
        if b.kernel_thresholds is not None:
            from normref.backends.numba import config

            stack.enter_context(config.thresholds(**b.kernel_thresholds))
        yield stack.enter_context(count_kernels())


def _torch() -> Backend:
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        return Backend("torch", False, f"torch is not installed ({e.msg})")

    def conv(a, dt):
        return torch.asarray(a).to(getattr(torch, dt))

    b = Backend("torch", True, xp=torch, _asarray=conv, dtypes=DTYPES, has_autograd=True)
    # CPU tensors take the numba kernels on their NumPy views (normref.backends.numba._torch): the
    # column runs them at the suite's thresholds, as the numpy column does, so that every registry
    # example reaches them (autograd through the forward, the suite's oracle, declines them: a tensor
    # autograd records runs the formula)
    if _numba_kernels_available():
        b.kernel_thresholds = dict(SUITE_KERNEL_THRESHOLDS)
        b.path = ("numba kernels on the tensors' NumPy views (size threshold {min_size}, parallel builds "
                  "from {serial_below} element)".format(**SUITE_KERNEL_THRESHOLDS))
    return b


def _numba_kernels_available() -> bool:
    from normref import _kernels

    if not _kernels._ENV_ENABLED:
        return False
    return importlib.util.find_spec("numba") is not None


def _jax() -> Backend:
    try:
        jax = importlib.import_module("jax")
        jnp = importlib.import_module("jax.numpy")
    except ImportError as e:
        return Backend("jax", False, f"jax is not installed ({e.msg})")
    jax.config.update("jax_enable_x64", True)

    def conv(a, dt):
        return jnp.asarray(a, dtype=getattr(jnp, dt))

    return Backend("jax", True, xp=jnp, _asarray=conv, dtypes=DTYPES, has_autograd=True)


def _strict() -> Backend:
    try:
        xs = importlib.import_module("array_api_strict")
    except ImportError as e:
        return Backend("array_api_strict", False, f"array-api-strict is not installed ({e.msg})")

    def conv(a, dt):
        if dt == "bfloat16":
            raise TypeError("array_api_strict has no bfloat16")
        return xs.asarray(a.astype(dt))

    return Backend("array_api_strict", True, xp=xs, _asarray=conv, dtypes=("float64", "float32"))


def _cupy() -> Backend:
    try:
        cp = importlib.import_module("cupy")
        if cp.cuda.runtime.getDeviceCount() < 1:
            return Backend("cupy", False, "no CUDA device")
    except Exception as e:  # ImportError, or a CUDA runtime error without a GPU
        return Backend("cupy", False, f"cupy unavailable ({type(e).__name__}: {e})")

    def conv(a, dt):
        return cp.asarray(a.astype(dt))

    return Backend("cupy", True, xp=cp, _asarray=conv, dtypes=("float64", "float32", "float16"))


def _torch_cuda() -> Backend:
    try:
        torch = importlib.import_module("torch")
        if not torch.cuda.is_available():
            return Backend("torch-cuda", False, "torch has no CUDA device here")
    except ImportError as e:
        return Backend("torch-cuda", False, f"torch is not installed ({e.msg})")

    def conv(a, dt):
        return torch.asarray(a).to(device="cuda", dtype=getattr(torch, dt))

    return Backend("torch-cuda", True, xp=torch, _asarray=conv, dtypes=DTYPES, has_autograd=True)


def _dask() -> Backend:
    try:
        importlib.import_module("dask")
        dask_array = importlib.import_module("dask.array")
    except ImportError as e:
        return Backend("dask", False, f"dask is not installed ({e.msg})")

    def conv(a, dt):
        # chunked along the batch axis (axis 0) in two chunks where it has two rows: the reductions
        # over the batch then combine per-chunk partial results, as on a dataset larger than memory
        a = a.astype(dt)
        if a.ndim == 0:
            return dask_array.from_array(a)
        return dask_array.from_array(a, chunks=(max(1, (a.shape[0] + 1) // 2),) + a.shape[1:])

    # lazy: normref builds the graph and computes nothing; the suite's conversion back to NumPy
    # (np.asarray) computes it with dask's default scheduler
    return Backend("dask", True, xp=dask_array, _asarray=conv, dtypes=("float64", "float32"),
                   path="array-API formulas, lazily (dask graph; no kernels serve dask)")


_FACTORIES = {
    "numpy": lambda: _numpy(True),
    "numpy-reference": lambda: _numpy(False),
    "torch": _torch,
    "jax": _jax,
    "array_api_strict": _strict,
    "cupy": _cupy,
    "torch-cuda": _torch_cuda,
    "dask": _dask,
}
_CACHE: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_FACTORIES)}")
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]


def all_backends() -> list[Backend]:
    """Every known backend, available or not (with the reason)."""
    return [get_backend(n) for n in _FACTORIES]


def available_backends() -> list[Backend]:
    return [b for b in all_backends() if b.available]
