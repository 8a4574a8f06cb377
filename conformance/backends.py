"""The array libraries the suite runs on, each with a converter from and to NumPy.

A :class:`Backend` is available when its library imports; otherwise ``reason`` says why it is
skipped. Conversions go through NumPy (the float64 reference lives there).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np

from normref._xp import to_numpy

__all__ = ["Backend", "all_backends", "available_backends", "get_backend", "DTYPES"]

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
    return b


def _torch() -> Backend:
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        return Backend("torch", False, f"torch is not installed ({e.msg})")

    def conv(a, dt):
        return torch.asarray(a).to(getattr(torch, dt))

    return Backend("torch", True, xp=torch, _asarray=conv, dtypes=DTYPES, has_autograd=True)


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


_FACTORIES = {
    "numpy": lambda: _numpy(True),
    "numpy-reference": lambda: _numpy(False),
    "torch": _torch,
    "jax": _jax,
    "array_api_strict": _strict,
    "cupy": _cupy,
    "torch-cuda": _torch_cuda,
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
