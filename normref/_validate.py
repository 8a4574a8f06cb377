"""Argument validation at the boundary: every message names the function, the argument, what was
expected and what came, and every check runs before any arithmetic."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Sequence, overload

__all__ = [
    "check_ndim",
    "check_shape",
    "check_positive",
    "check_nonnegative",
    "check_momentum",
    "check_int",
    "check_p",
    "check_choice",
    "check_bool",
    "concrete_any",
    "first_true",
    "check_nonnegative_values",
    "check_eps_representable",
]


def check_ndim(fn: str, name: str, x: Any, *, min_ndim: int = 1, max_ndim: int | None = None, what: str = "") -> None:
    nd = x.ndim
    if nd < min_ndim or (max_ndim is not None and nd > max_ndim):
        rng = f"at least {min_ndim}" if max_ndim is None else (
            f"exactly {min_ndim}" if min_ndim == max_ndim else f"{min_ndim} to {max_ndim}")
        hint = f" ({what})" if what else ""
        raise ValueError(f"{fn}: {name} must have {rng} dimensions{hint}; got {nd} dimensions, shape {tuple(x.shape)}")


def check_shape(fn: str, name: str, a: Any, expected: Sequence[int], why: str = "") -> None:
    if a is None:
        return
    if tuple(a.shape) != tuple(expected):
        hint = f" ({why})" if why else ""
        raise ValueError(f"{fn}: {name} must have shape {tuple(expected)}{hint}; got shape {tuple(a.shape)}")


def _real(fn: str, name: str, v: Any) -> float:
    if type(v) is float:  # the common case, without the ABC check below (per-call cost, issue 18)
        if v != v:
            raise ValueError(f"{fn}: {name} must be a number, got nan")
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number; got {type(v).__name__} {v!r}")
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"{fn}: {name} must be a number, got nan")
    return v


def check_positive(fn: str, name: str, v: Any) -> float:
    v = _real(fn, name, v)
    if not v > 0 or math.isinf(v):
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {v!r}")
    return v


def check_nonnegative(fn: str, name: str, v: Any) -> float:
    v = _real(fn, name, v)
    if not v >= 0 or math.isinf(v):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {v!r}")
    return v


@overload
def check_momentum(fn: str, momentum: Any, allow_none: Literal[False]) -> float: ...
@overload
def check_momentum(fn: str, momentum: Any, allow_none: bool = True) -> float | None: ...
def check_momentum(fn: str, momentum: Any, allow_none: bool = True) -> float | None:
    if momentum is None and allow_none:
        return None
    v = _real(fn, "momentum", momentum)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{fn}: momentum must lie in [0, 1] (or be None for a cumulative average); got {v!r}")
    return v


def check_int(fn: str, name: str, v: Any, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an integer >= {minimum}; got {type(v).__name__} {v!r}")
    v = int(v)
    if v < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}; got {v}")
    return v


def check_p(fn: str, p: Any) -> float:
    v = _real(fn, "p", p)
    if not v >= 1.0:
        raise ValueError(f"{fn}: p must be >= 1 (p = inf allowed); got {v!r}")
    return v


def check_choice(fn: str, name: str, v: Any, choices: Sequence[str]) -> str:
    if v not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {v!r}")
    return v


def check_bool(fn: str, name: str, v: Any) -> bool:
    """A flag: ``True``/``False`` or a NumPy bool (``np.bool_``, a 0-d bool array); anything else —
    the string ``"False"``, 0/1, None — is refused, since taking it by truthiness would silently turn
    ``training="False"`` into training."""
    if isinstance(v, bool):
        return v
    t = type(v)
    if t.__module__ == "numpy" and t.__name__ in ("bool_", "bool"):
        return bool(v)
    if t.__module__ == "numpy" and t.__name__ == "ndarray" and v.shape == () and v.dtype.kind == "b":
        return bool(v)
    raise TypeError(f"{fn}: {name} must be a bool (True or False); got {t.__name__} {v!r}")


def concrete_any(xp, cond: Any, refusal: bool = True) -> bool:
    """``bool(any(cond))`` for concrete arrays. A traced value (``jax.jit``, ``torch.func.vmap``) has no
    Python boolean: the check is then skipped (``False``) — value checks need concrete values, and a
    function under tracing is checked when it is called with concrete ones. A lazy (dask) array is
    treated the same way: normref never computes it (``_xp.is_lazy``). A torch tensor while
    ``torch.compile`` traces (``_xp.is_compiling``: reading it would break the graph) gets an in-graph
    assertion instead when ``refusal`` (the caller raises on ``True``: a value check), so a compiled
    call refuses bad values too (a ``RuntimeError`` naming normref, at run time); ``refusal=False``
    (a branch between two correct paths) is ``False`` there, as under tracing."""
    from ._xp import is_compiling, is_lazy

    if is_lazy(cond):
        return False
    if is_compiling(cond):
        if refusal:
            import torch

            torch._assert_async(torch.logical_not(torch.any(cond)),
                                "normref: an input failed a value check inside torch.compile (e.g. a negative "
                                "variance, a zero-norm row): call the function eagerly for the check's message")
        return False
    try:
        return bool(xp.any(cond))
    except (TypeError, RuntimeError):  # jax's ConcretizationTypeError is a TypeError
        return False


def first_true(cond: Any) -> int:
    """Index (flattened order) of the first true entry of ``cond`` (called only after a hit)."""
    from ._xp import to_numpy

    import numpy as np

    return int(np.flatnonzero(np.asarray(to_numpy(cond)).reshape(-1))[0])


def check_nonnegative_values(fn: str, name: str, xp, a: Any, what: str = "a variance") -> None:
    """Refuse an array with a negative entry (a running variance or scale: ``what``), naming the
    first one; ``None`` passes. Skipped under tracing (:func:`concrete_any`). NaN entries pass:
    NaN in, NaN out."""
    if a is None:
        return
    neg = a < 0
    if concrete_any(xp, neg):
        i = first_true(neg)
        from ._xp import to_numpy

        v = float(to_numpy(a).reshape(-1)[i])
        raise ValueError(f"{fn}: {name} must be >= 0 everywhere (it is {what}); got {v!r} at index {i}")


# smallest normal number per compute dtype (finfo costs a microsecond a call)
_TINY: dict = {}


def check_eps_representable(fn: str, eps: float, xp, dtype: Any, name: str = "eps") -> None:
    """A positive ``eps`` below the compute dtype's smallest *normal* number (float32: 2⁻¹²⁶ ≈ 1.2e-38;
    float64: ≈ 2.2e-308) is refused: it rounds to 0 (below half of float32's smallest subnormal,
    ≈ 7e-46) or is a subnormal that XLA (JAX on CPU) and GPU fast-math flush to 0, so ε would be 0
    and a constant group 0/0 = NaN. torch is not consistent here (torch 2.13, float32, eps=1e-50 on
    a constant input: ``F.group_norm``/``F.batch_norm`` return 0, ``F.layer_norm`` returns NaN), so
    normref raises, naming the dtype."""
    if eps > 0:
        tiny = _TINY.get(dtype)
        if tiny is None:
            tiny = _TINY[dtype] = float(xp.finfo(dtype).smallest_normal)
        if eps < tiny:
            bits = xp.finfo(dtype).bits
            raise ValueError(
                f"{fn}: {name} = {eps!r} rounds to 0 in float{bits} (the dtype the statistics are computed in; "
                f"subnormals are flushed to zero by some backends); expected {name} >= {tiny!r}, float{bits}'s "
                f"smallest normal number"
            )
