"""Normalization operations (NOP), survey §5.1 Algorithm 1 line 4, and their analytic backward.

Each operation acts on a partitioned view ``x`` and its reduce axes R (n elements per statistic).
Notation: mean(·) is the mean over R with the reduced axes kept, g = ∂L/∂x̂.

- Centering (mean-only BN, Salimans & Kingma 2016):   x̂ = x − μ;             dx = g − mean(g).
- Scaling (RMS; RMSNorm, pixel norm, FRN):            r = (mean(x²)+ε)^-½, x̂ = x·r;
                                                       dx = r·(g − x̂·mean(g·x̂)).
- Standardizing (survey Eqn 17, 21):                  s = (σ²+ε)^-½, x̂ = (x−μ)·s;
                                                       dx = s·(g − mean(g) − x̂·mean(g·x̂)).
- Lp deviation standardizing (Lp-norm BN, Liao et al. 2016; L1 BN, Hoffer et al. 2018, Wu et al. 2018):
  u = x − μ, σ_p = (mean|u|^p)^{1/p} (σ_∞ = max|u|), s = c·σ_p + ε (ε *outside* the root; c = √(π/2)
  for the optional L1 correction, else 1), x̂ = u/s;
  with w = ∂(n·σ_p)/∂u = (|u|/σ_p)^{p−1}·sign(u)  (p = ∞: n·sign(u)·[|u| = σ_∞]/#ties, ties split
  equally): du = (g − c·mean(g·x̂)·w)/s, dx = du − mean(du).
- Standardizing by population statistics (survey §4, Eqn 16; BN at inference): x̂ = (x − μ̂)·(σ̂²+ε)^-½
  with μ̂, σ̂² constants: dx = g·(σ̂²+ε)^-½.

Residuals hold at most one full-size array. Centering, scaling, standardizing and population
standardizing keep the *input* view x and the per-statistic (shift, scale) — the input is referenced,
not copied, so a forward writes nothing but y — and :meth:`Operation.xhat` recomputes x̂ = (x − shift)·scale
where a backward needs it (one fused multiply-add per element, cheaper than storing and re-reading x̂).
Lp and batch renormalization keep what their backward needs (documented there).
"""

from __future__ import annotations

import dataclasses
import math
from . import _kernels

__all__ = ["moments", "mean_square", "fused_forward", "fused_backward", "Operation", "Centering", "Scaling", "Standardizing", "LpStandardizing", "PopulationStandardizing", "KINDS", "make"]

KINDS = ("centering", "scaling", "standardizing", "lp")


def _mean(xp, t, axes):
    # Σ/n: the same rounding as xp.mean (which divides the sum by the count), one call less
    n = 1
    for a in axes:
        n *= t.shape[a]
    return xp.sum(t, axis=axes, keepdims=True) / n


def _kernel(xp, name, x):
    k = _kernels.lookup(xp, name)
    return k if k is not None and getattr(k, "accepts", lambda a: True)(x) else None


def _moments(xp, x, axes):
    """(μ, σ², x − μ or ``None``): the centered input comes along when the formula computed it."""
    k = _kernel(xp, "moments", x)
    if k is not None:
        r = k(x, axes)
        if r is not None:
            return r[0], r[1], None
    mu = _mean(xp, x, axes)
    xc = x - mu
    return mu, _mean(xp, xc * xc, axes), xc


def moments(xp, x, axes):
    """(μ, σ²) over ``axes`` (biased variance, two passes: stable when |μ| ≫ σ)."""
    mu, var, _ = _moments(xp, x, axes)
    return mu, var


def mean_square(xp, x, axes):
    """mean(x²) over ``axes`` (keepdims); a kernel when one is registered for ``xp``."""
    k = _kernel(xp, "mean_square", x)
    if k is not None:
        r = k(x, axes)
        if r is not None:
            return r
    return _mean(xp, x * x, axes)


def fused_forward(xp, op, xv, axes, shape, gamma_b=None, beta_b=None, out=None, **op_arrays):
    """The kernel path of Φ then Ψ (affine): ``(y, op_residuals, stats)``, or ``None`` (run the formula).

    For standardizing, scaling and population standardizing a registered ``normalize_forward``
    kernel computes the statistics and y = (x − shift)·(scale·γ) + β in one pass over x (writing y
    into ``out`` when given). The residuals are exactly those of the operation's own forward —
    (x, shift, scale) — so :func:`normref.framework.run_backward` runs either path on them. ``xv`` is
    the partition's view of the input of ``shape``; γ, β broadcast to ``shape``.
    """
    kind = type(op)
    if kind not in (Standardizing, Scaling, PopulationStandardizing):
        return None
    k = _kernel(xp, "normalize_forward", xv)
    if k is None:
        return None
    if kind is PopulationStandardizing:
        mode, shift, scale = "population", op_arrays["mean"], 1.0 / xp.sqrt(op_arrays["var"] + op.eps)
    else:
        mode, shift, scale = ("standardizing" if kind is Standardizing else "scaling"), None, None
    r = k(xv, axes, mode, op.eps, shift, scale, gamma_b, beta_b, shape, out)
    if r is None:
        return None
    y, mu, scale, var = r
    stats = {"standardizing": {"mean": mu, "var": var}, "scaling": {"mean_square": var}}.get(mode, {})
    return y, (xv, mu, scale), stats


def fused_backward(xp, op, res, axes, shape, gamma_b, pshape, g, need=(True, True, True)):
    """The kernel path of the backward of Ψ∘Φ on the view: ``(dx_view, dγ, dβ)`` or ``None``.

    Same formulas as ``op.backward`` after :func:`normref.recovery.affine_backward`, in one kernel:
    with u = ∂L/∂y, dβ = Σu, dγ = Σu·x̂ over the broadcast axes, m1 = mean(γ·u), m2 = mean(γ·u·x̂) per
    statistic, dx = scale·(γ·u − m1 − x̂·m2) (no m1 for scaling, neither for population statistics).
    ``g`` is the cotangent on the view, ``pshape`` the shape of γ and β (``None`` if neither exists),
    ``need`` which of (dx, dγ, dβ) to form.
    """
    kind = type(op)
    if kind not in (Standardizing, Scaling, PopulationStandardizing):
        return None
    k = _kernel(xp, "normalize_backward", res[0])
    if k is None:
        return None
    mode = {Standardizing: "standardizing", Scaling: "scaling", PopulationStandardizing: "population"}[kind]
    x, shift, scale = res
    return k(x, shift, scale, g, gamma_b, pshape, shape, axes, mode, need)


class Operation:
    """Base: ``forward(xp, x, axes) -> (x̂, residuals, stats)``, ``backward(xp, residuals, axes, g) -> dx``.

    ``stats`` is a dict of the statistics computed (``mean``, ``var``...) for running averages.
    """

    name = "operation"

    def forward(self, xp, x, axes):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, xp, res, axes, g):  # pragma: no cover - interface
        raise NotImplementedError

    def xhat(self, xp, res):
        """x̂ from the residuals (the recovery's backward needs it for dγ)."""
        return res[0]


class _ShiftScale(Operation):
    """Residuals (x, shift, scale): x̂ = (x − shift)·scale, shift ``None`` for scaling."""

    def xhat(self, xp, res):
        x, shift, scale = res[:3]
        return (x if shift is None else x - shift) * scale


@dataclasses.dataclass(frozen=True)
class Centering(Operation):
    name = "centering"

    def forward(self, xp, x, axes):
        mu = _mean(xp, x, axes)
        return x - mu, (x, mu), {"mean": mu}

    def xhat(self, xp, res):
        return res[0] - res[1]

    def backward(self, xp, res, axes, g):
        return g - _mean(xp, g, axes)


@dataclasses.dataclass(frozen=True)
class Scaling(_ShiftScale):
    eps: float = 1e-5
    name = "scaling"

    def forward(self, xp, x, axes):
        ms = mean_square(xp, x, axes)
        r = 1.0 / xp.sqrt(ms + self.eps)
        return x * r, (x, None, r), {"mean_square": ms}

    def backward(self, xp, res, axes, g):
        r = res[2]
        xhat = self.xhat(xp, res)
        return r * (g - xhat * _mean(xp, g * xhat, axes))


@dataclasses.dataclass(frozen=True)
class Standardizing(_ShiftScale):
    eps: float = 1e-5
    name = "standardizing"

    def forward(self, xp, x, axes):
        mu, var, xc = _moments(xp, x, axes)
        rstd = 1.0 / xp.sqrt(var + self.eps)
        return (x - mu if xc is None else xc) * rstd, (x, mu, rstd), {"mean": mu, "var": var}

    def backward(self, xp, res, axes, g):
        rstd = res[2]
        xhat = self.xhat(xp, res)
        return rstd * (g - _mean(xp, g, axes) - xhat * _mean(xp, g * xhat, axes))


@dataclasses.dataclass(frozen=True)
class LpStandardizing(Operation):
    p: float = 2.0
    eps: float = 1e-5
    l1_factor: bool = False
    name = "lp"

    @property
    def c(self) -> float:
        return math.sqrt(math.pi / 2.0) if (self.l1_factor and self.p == 1.0) else 1.0

    def forward(self, xp, x, axes):
        mu = _mean(xp, x, axes)
        u = x - mu
        a = xp.abs(u)
        if math.isinf(self.p):
            sig = xp.max(a, axis=axes, keepdims=True)
        elif self.p == 1.0:
            sig = _mean(xp, a, axes)
        elif self.p == 2.0:
            sig = xp.sqrt(_mean(xp, u * u, axes))
        else:
            sig = _mean(xp, a**self.p, axes) ** (1.0 / self.p)
        s = self.c * sig + self.eps
        xhat = u / s
        return xhat, (xhat, s, sig), {"mean": mu, "scale": sig}

    def _weights(self, xp, xhat, s, sig, axes):
        # w = (|u|/σ_p)^{p−1}·sign(u), with u = x̂·s; zero where σ_p = 0 (a constant group).
        u = xhat * s
        safe = xp.where(sig > 0, sig, xp.ones_like(sig))
        if math.isinf(self.p):
            a = xp.abs(u)
            hit = xp.astype(a >= xp.max(a, axis=axes, keepdims=True), u.dtype)
            n = 1
            for ax in axes:
                n *= u.shape[ax]
            w = n * hit * xp.sign(u) / xp.sum(hit, axis=axes, keepdims=True)
        elif self.p == 1.0:
            w = xp.sign(u)
        elif self.p == 2.0:
            w = u / safe
        else:
            w = (xp.abs(u) / safe) ** (self.p - 1.0) * xp.sign(u)
        return xp.where(sig > 0, w, xp.zeros_like(w))

    def backward(self, xp, res, axes, g):
        xhat, s, sig = res
        w = self._weights(xp, xhat, s, sig, axes)
        du = (g - self.c * _mean(xp, g * xhat, axes) * w) / s
        return du - _mean(xp, du, axes)


@dataclasses.dataclass(frozen=True)
class PopulationStandardizing(_ShiftScale):
    """Standardizing by given (population / running) statistics, treated as constants (Eqn 16)."""

    eps: float = 1e-5
    name = "population"

    def forward(self, xp, x, axes, mean, var):
        rstd = 1.0 / xp.sqrt(var + self.eps)
        return (x - mean) * rstd, (x, mean, rstd), {}

    def backward(self, xp, res, axes, g):
        return g * res[2]


@dataclasses.dataclass(frozen=True)
class PopulationLp(_ShiftScale):
    """Lp standardizing by given statistics (constants): x̂ = (x − μ̂)/(c·σ̂_p + ε), dx = g/(c·σ̂_p + ε)."""

    eps: float = 1e-5
    c: float = 1.0
    name = "population_lp"

    def forward(self, xp, x, axes, mean, scale):
        inv = 1.0 / (self.c * scale + self.eps)
        return (x - mean) * inv, (x, mean, inv), {}

    def backward(self, xp, res, axes, g):
        return g * res[2]


@dataclasses.dataclass(frozen=True)
class BatchRenormalizing(Operation):
    """Batch renormalization (Ioffe 2017): x̂ = ((x − μ_B)/σ_B)·r + d with σ_B = √(σ_B² + ε),
    r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), σ = √(running var + ε).
    r and d are constants of the backward (stop-gradient): dx = r·(standardizing backward of g)."""

    eps: float = 1e-5
    rmax: float = 3.0
    dmax: float = 5.0
    name = "batch_renorm"

    def forward(self, xp, x, axes, running_mean, running_var):
        mu, var = moments(xp, x, axes)
        rstd = 1.0 / xp.sqrt(var + self.eps)
        x0 = (x - mu) * rstd
        rrun = 1.0 / xp.sqrt(running_var + self.eps)
        r = xp.clip(rrun / rstd, 1.0 / self.rmax, self.rmax)
        d = xp.clip((mu - running_mean) * rrun, -self.dmax, self.dmax)
        # residuals: the input and per-statistic (μ_B, 1/σ_B, r, d); x̂ is recomputed (no full-size copy)
        return x0 * r + d, (x, mu, rstd, r, d), {"mean": mu, "var": var}

    def xhat(self, xp, res):
        x, mu, rstd, r, d = res
        return (x - mu) * rstd * r + d

    def backward(self, xp, res, axes, g):
        x, mu, rstd, r, _ = res
        return Standardizing(self.eps).backward(xp, (x, mu, rstd), axes, g * r)


def make(kind: str, *, eps: float = 1e-5, p: float = 2.0, l1_factor: bool = False) -> Operation:
    """The operation named ``kind`` (one of :data:`KINDS`)."""
    if kind == "centering":
        return Centering()
    if kind == "scaling":
        return Scaling(eps=eps)
    if kind == "standardizing":
        return Standardizing(eps=eps)
    if kind == "lp":
        return LpStandardizing(p=p, eps=eps, l1_factor=l1_factor)
    raise ValueError(f"operation must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")

