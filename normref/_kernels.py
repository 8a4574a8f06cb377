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
import threading
from typing import Callable, Iterator

import array_api_compat

__all__ = ["register_kernel", "lookup", "use_kernels", "namespace_key", "count_kernels", "KernelCalls"]

_KERNELS: dict[tuple[str, str], Callable] = {}
_LOADED: set[str] = set()
_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("normref_kernels", default=None)
# the active count_kernels() counters of this context (innermost last); empty: no counting, no wrapper
_COUNTERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("normref_kernel_counters", default=())


def namespace_key(xp) -> str:
    key = _KEYS.get(id(xp))
    if key is not None and key[0] is xp:
        return key[1]
    k = _namespace_key(xp)
    _KEYS[id(xp)] = (xp, k)  # namespaces are modules, alive for the process: id is stable
    return k


# namespace → key, by identity (array-api-compat's is_*_namespace probes cost a microsecond a call)
_KEYS: dict[int, tuple] = {}


def _namespace_key(xp) -> str:
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


# Serializes backend loading. Issue 11: ``key`` used to be marked loaded before the backend's
# ``register()`` had run, so a second thread's first call saw "loaded", found no kernel and ran the
# formula. Now the key is marked only after registration, under the lock (double-checked in lookup).
_LOAD_LOCK = threading.RLock()  # reentrant: a backend whose import looks a kernel up cannot deadlock


def _load(key: str) -> None:
    with _LOAD_LOCK:
        if key in _LOADED:  # another thread loaded it while this one waited
            return
        try:
            _load_entry_points(key)
        finally:
            _LOADED.add(key)


def _load_entry_points(key: str) -> None:
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
    """The registered kernel for ``primitive`` on ``xp``'s arrays, or ``None`` (use the formula).

    Under ``torch.compile`` (torch arrays while TorchDynamo traces) the switch and the backend loading
    are read once, at trace time, by :func:`_trace_time_enabled` (a context variable cannot be traced),
    and :func:`count_kernels` does not count: the kernel choice is part of the compiled graph
    (``torch._dynamo.reset()`` re-traces after changing :func:`use_kernels`).
    """
    key = namespace_key(xp)
    if key == "torch" and _torch_compiling():
        if not _trace_time_enabled(key):
            return None
        fn = _KERNELS.get((key, primitive))
        # a kernel that leaves torch (numba on the tensors' NumPy views) cannot be traced: the
        # compiled graph holds the formula
        return None if getattr(fn, "eager_only", False) else fn
    if not _enabled():
        return None
    if key not in _LOADED:
        _load(key)
    fn = _KERNELS.get((key, primitive))
    counters = _COUNTERS.get()
    if counters:
        fn = _counted(fn, f"{key}.{primitive}", counters)
    return fn


def _torch_compiling() -> bool:
    """Whether TorchDynamo is tracing (called for torch arrays only: torch is imported then)."""
    import torch

    return torch.compiler.is_compiling()


def _trace_time_enabled(key: str) -> bool:
    """Kernels on for ``key`` (its backend loaded). The torch adapter marks this function with
    ``torch.compiler.assume_constant_result``: TorchDynamo runs it eagerly at trace time and bakes the
    answer into the graph (no context-variable read in the compiled code)."""
    if not _enabled():
        return False
    if key not in _LOADED:
        _load(key)
    return True


# What ``torch.compiler.assume_constant_result(_trace_time_enabled)`` does (torch 2.13: it sets this
# attribute), without importing torch._dynamo (seconds) at import; tests/test_torch_compile.py checks
# that the compiled graphs have no break here.
_trace_time_enabled._dynamo_marked_constant = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def use_kernels(enabled: bool = True) -> Iterator[None]:
    """Context manager: ``with normref.use_kernels(False):`` runs the pure array-API formulas.

    Inside the block the registered kernels (e.g. the numba backend's) are used, or not, in this
    context (a ``contextvars`` setting: threads and tasks keep their own); the innermost block wins.
    Outside any block the environment decides: ``NORMREF_KERNELS=0`` (read once, at import) makes the
    array-API formulas (the reference) the default.

    Parameters
    ----------
    enabled : bool, default True
        Use the registered kernels (``True``) or the formulas only (``False``).

    Returns
    -------
    context : context manager
        Yields ``None``; the previous setting comes back on exit.
    """
    from ._validate import check_bool

    token = _ENABLED.set(check_bool("use_kernels", "enabled", enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


class KernelCalls:
    """What :func:`count_kernels` saw, per ``"<namespace>.<primitive>"`` (e.g. ``numpy.moments``):
    ``asked[p]``: lookups with kernels enabled (registered or not); ``offered[p]``: those that found a
    registered kernel; ``taken[p]``: calls of it that returned a result (not ``None``: the kernel did
    the work). Offered but not taken: the kernel declined (its ``accepts`` or the kernel itself: a size
    below its threshold, a dtype or layout it does not take). ``use_kernels(False)`` asks nothing."""

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}
        self.offered: dict[str, int] = {}
        self.taken: dict[str, int] = {}

    @property
    def total_taken(self) -> int:
        return sum(self.taken.values())

    @property
    def total_offered(self) -> int:
        return sum(self.offered.values())

    def as_dict(self) -> dict:
        return {"asked": dict(self.asked), "offered": dict(self.offered), "taken": dict(self.taken)}

    def __repr__(self) -> str:
        return f"KernelCalls(asked={self.asked}, offered={self.offered}, taken={self.taken})"


def _counted(fn: Callable | None, name: str, counters: tuple) -> Callable | None:
    """``fn`` counting into ``counters`` (its attributes, e.g. ``accepts``, carried over)."""
    import functools

    for c in counters:
        c.asked[name] = c.asked.get(name, 0) + 1
    if fn is None:
        return None
    for c in counters:
        c.offered[name] = c.offered.get(name, 0) + 1

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        r = fn(*args, **kwargs)
        if r is not None:
            for c in counters:
                c.taken[name] = c.taken.get(name, 0) + 1
        return r

    return counted


@contextlib.contextmanager
def count_kernels() -> Iterator[KernelCalls]:
    """Context manager counting the registered kernels offered and taken in this context (thread /
    task: a context variable), nested contexts each counting everything inside them::

        with count_kernels() as calls:
            normref.layer_norm(x, x.shape[-1:])
        calls.taken  # {"numpy.normalize_forward": 1} where the numba kernel ran

    For tests and the conformance suite: a check that the kernel path ran is only as good as this
    count (a kernel that declines everything would make a kernel-versus-formula comparison vacuous).
    """
    calls = KernelCalls()
    token = _COUNTERS.set(_COUNTERS.get() + (calls,))
    try:
        yield calls
    finally:
        _COUNTERS.reset(token)
