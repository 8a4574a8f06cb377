"""Central finite differences along random directions: the independent check of every backward.

For a method f, a cotangent g and a direction v for one array argument a, the analytic pullback
gives ⟨∂⟨g, f⟩/∂a, v⟩ and central differences give

    D_h = (⟨g, f(a + h·v)⟩ − ⟨g, f(a − h·v)⟩) / (2h),

whose error is O(h²·|f'''|) + O(ε_64/h); h = ε_64^{1/3} ≈ 6e-6 (times the argument's scale) balances
the two, leaving ~1e-10 relative error on smooth problems, so 1e-6 is a bound with room for the
problem's conditioning but tight enough to catch any wrong term. The relative error is

    |analytic − D_h| / max(|D_h|, |analytic|, 1e-3·‖∇‖·‖v‖, 1e6·ν),

where ν = 4·ε₆₄·Σ|g·f|/h bounds the round-off of the difference quotient itself (the two losses
are sums of |g·f| terms each rounded to ε₆₄). Finite differences cannot certify anything below ν:
for a derivative smaller than 1e6·ν (a nearly constant output, e.g. layer norm over 2 elements) the
1e6·ν floor makes the 1e-6 bound read |analytic − D_h| ≤ ν; for every ordinary derivative the ratio
is the plain relative error. The 1e-3·‖∇‖ floor stops a directional derivative that cancels to ~0
from turning round-off into a large ratio.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from normref.registry import get, vjp

__all__ = ["FDResult", "fd_check", "directional_fd"]

H = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)


@dataclasses.dataclass
class FDResult:
    """Largest relative error over the directions and arguments checked, per argument."""

    errors: dict
    max_error: float
    details: list


def _loss(m, args, kwargs, g, f=None):
    out = m.primary((f or m)(*args, **kwargs))
    return float(np.sum(np.asarray(out, dtype=np.float64) * g))


def directional_fd(m, args: tuple, kwargs: dict, index: int, v: np.ndarray, g: np.ndarray, h: float | None = None) -> float:
    """Central difference of ⟨g, f⟩ along ``v`` for positional argument ``index`` (NumPy float64).

    For a method with stop-gradient constants, f is ``m.fd_target(args, kwargs)``: the function with
    those constants frozen at the base point, whose derivative the analytic backward is.
    """
    f = m.fd_target(args, kwargs) if m.fd_target is not None else None
    a = args[index]
    scale = max(1.0, float(np.max(np.abs(a)))) if a.size else 1.0
    h = H * scale if h is None else h
    plus = list(args)
    minus = list(args)
    plus[index] = a + h * v
    minus[index] = a - h * v
    return (_loss(m, tuple(plus), kwargs, g, f) - _loss(m, tuple(minus), kwargs, g, f)) / (2 * h)


def fd_check(fn, args: tuple, kwargs: dict, *, seed: int = 0, directions: int = 2) -> FDResult:
    """Compare the analytic backward of ``fn`` with central differences (NumPy float64 inputs).

    Every differentiable array parameter given positionally is checked along ``directions`` random
    unit directions, with a random cotangent.
    """
    m = get(fn)
    # a stream of its own: an example drawn from default_rng(seed) must not reappear as the cotangent
    rng = np.random.default_rng([seed, 0xFD])
    out, pullback = vjp(m, *args, **kwargs)
    y = np.asarray(m.primary(out), dtype=np.float64)
    g = rng.standard_normal(y.shape)
    grads = pullback(g)
    bound = m.bind(*args, **kwargs)
    names = list(m.signature.parameters)
    errors: dict[str, float] = {}
    details = []
    for pname, grad in zip(m.array_params, grads):
        idx = names.index(pname)
        if pname in m.nondiff or bound.arguments.get(pname) is None or idx >= len(args):
            continue
        a = args[idx]
        if grad is None:
            raise AssertionError(f"{m.name}: no gradient for differentiable argument {pname}")
        grad = np.asarray(grad, dtype=np.float64)
        if grad.shape != a.shape:
            raise AssertionError(f"{m.name}: gradient of {pname} has shape {grad.shape}, argument {a.shape}")
        worst = 0.0
        for _ in range(directions):
            v = rng.standard_normal(a.shape)
            v /= max(np.linalg.norm(v), 1e-300)
            analytic = float(np.sum(grad * v))
            numeric = directional_fd(m, args, kwargs, idx, v, g)
            scale = max(1.0, float(np.max(np.abs(a)))) if a.size else 1.0
            noise = 4 * float(np.finfo(np.float64).eps) * float(np.sum(np.abs(g * y))) / (H * scale)
            denom = max(abs(numeric), abs(analytic), 1e-3 * float(np.linalg.norm(grad)), 1e6 * noise, 1e-300)
            err = abs(analytic - numeric) / denom
            details.append((pname, analytic, numeric, err))
            worst = max(worst, err)
        errors[pname] = worst
    return FDResult(errors, max(errors.values(), default=0.0), details)
