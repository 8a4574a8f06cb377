"""The kernel registry: faster implementations of primitives that already exist as array-API formulas.

``normref/`` never imports a backend by name. A backend announces itself through the
``normref.kernels`` entry point group (name = the array namespace it serves, e.g. ``numpy``; value =
a ``register()`` callable), and is loaded lazily the first time that namespace is seen. Each kernel
must compute exactly the formula of the primitive it replaces; the tests compare the two.

Switch: the environment variable ``NORMREF_KERNELS=0`` or ``with normref.use_kernels(False):``
forces the array-API path everywhere (the reference).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator

import array_api_compat

__all__ = ["register_kernel", "lookup", "use_kernels", "namespace_key"]

_KERNELS: dict[tuple[str, str], Callable] = {}
_LOADED: set[str] = set()
_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("normref_kernels", default=None)


def namespace_key(xp) -> str:
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_jax_namespace(xp):
        return "jax"
    return getattr(xp, "__name__", "other")


def register_kernel(namespace: str, primitive: str, fn: Callable) -> None:
    """Called by a backend's ``register()``: ``fn`` replaces ``primitive`` for arrays of ``namespace``."""
    _KERNELS[(namespace, primitive)] = fn


def _enabled() -> bool:
    v = _ENABLED.get()
    if v is not None:
        return v
    return _ENV_ENABLED


# read once: the environment variable is a process-wide switch (use_kernels() switches at run time)
_ENV_ENABLED = os.environ.get("NORMREF_KERNELS", "1") not in ("0", "false", "False", "off")


def _load(key: str) -> None:
    _LOADED.add(key)
    try:
        from importlib.metadata import entry_points

        eps = entry_points(group="normref.kernels")
    except Exception:  # metadata unavailable: run on the reference path
        return
    for ep in eps:
        # "numpy", or "numpy.<what>" for a second backend of the same library (entry point names are
        # unique keys)
        if ep.name == key or ep.name.startswith(key + "."):
            try:
                ep.load()()
            except ImportError:
                # the backend's optional dependency (numba, cupy) is not installed
                pass


def lookup(xp, primitive: str) -> Callable | None:
    """The registered kernel for ``primitive`` on ``xp``'s arrays, or ``None`` (use the formula)."""
    if not _enabled():
        return None
    key = namespace_key(xp)
    if key not in _LOADED:
        _load(key)
    return _KERNELS.get((key, primitive))


@contextlib.contextmanager
def use_kernels(enabled: bool = True) -> Iterator[None]:
    """Context manager: ``with normref.use_kernels(False):`` runs the pure array-API formulas."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)
