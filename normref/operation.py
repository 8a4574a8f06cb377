"""Normalization operations (NOP), survey §5.1 Algorithm 1 line 4, and their analytic backward.

Each operation acts on a partitioned view ``x`` and its reduce axes R (n elements per statistic).
Notation: mean(·) is the mean over R with the reduced axes kept, g = ∂L/∂x̂.

- Centering (mean-only BN, Salimans & Kingma 2016):   x̂ = x − μ;             dx = g − mean(g).
- Scaling (RMS; RMSNorm, pixel norm, FRN):            r = (mean(x²)+ε)^-½, x̂ = x·r;
                                                       dx = r·(g − x̂·mean(g·x̂)).
- Standardizing (survey Eqns 17, 21 as Φ_SD):          s = (σ²+ε)^-½, x̂ = (x−μ)·s;
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
import functools
import math
from typing import Any

import numpy as _np

from . import _kernels
from .distributed import combine_moments

__all__ = ["moments", "mean_square", "fused_forward", "fused_backward", "Operation", "Centering", "Scaling", "Standardizing", "LpStandardizing", "PopulationStandardizing", "KINDS", "make"]

KINDS = ("centering", "scaling", "standardizing", "lp")


@functools.lru_cache(maxsize=1024)
def cached(cls: type, *args: Any) -> "Operation":
    """``cls(*args)`` built once per arguments (frozen dataclasses: hashable, immutable, so one
    instance serves every call; constructing one costs a microsecond on the per-call path)."""
    return cls(*args)


def _mean(xp, t, axes):
    # Σ/n: the same rounding as xp.mean (which divides the sum by the count), one call less
    n = 1
    for a in axes:
        n *= t.shape[a]
    return xp.sum(t, axis=axes, keepdims=True) / n


def _kernel(xp, name, x):
    k = _kernels.lookup(xp, name)
    if k is None:
        return None
    accepts = getattr(k, "accepts", None)
    return k if accepts is None or accepts(x) else None


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


def _any_or_traced(xp, mask) -> bool:
    """``any(mask)`` for a concrete array; True under tracing (jax.jit), where both branches of a
    ``where`` are formed anyway; True for a lazy (dask) array too, which is never computed here, and for
    a torch tensor while ``torch.compile`` traces (no values yet: both branches go into the graph)."""
    if type(mask) is _np.ndarray:  # concrete (the per-call fast path: no library probing)
        return bool(_np.logical_or.reduce(mask, axis=None))
    if _kernels.namespace_key(xp) == "torch":
        import torch

        if torch.compiler.is_compiling():
            return True
        try:
            return bool(mask.any())
        except Exception:  # a functorch-traced tensor (vmap) has no concrete truth value
            return True
    from ._xp import is_compiling, is_lazy

    if is_lazy(mask) or is_compiling(mask):
        return True
    try:
        return bool(xp.any(mask))
    except Exception:  # a tracer has no concrete truth value
        return True


def _rsqrt(xp, ms, eps, centered, axes):
    """(ms + ε)^-½ per statistic, ms = mean(d²) with d = ``centered()`` (x − μ, or x for scaling).

    Overflow: at |d| ≳ 1.8e19 (float32) or 1.3e154 (float64) d² and ms overflow to inf and
    the plain formula gives 0, so every output would be β. x̂ = d·(ms + ε)^-½ is scale-free and
    representable: where ms is inf but d is finite, d is rescaled by an exact power of two
    p = 2^-⌊log2 max|d|⌋ (|d·p| < 2, no rounding), ms_p = mean((d·p)²) is formed without overflow, and
    (ms + ε)^-½ = p·(ms_p + ε·p²)^-½ (ε·p² underflows harmlessly next to ms_p ≥ 1/n). ``xp.where``
    keeps it traceable; on concrete arrays the rescaled pass runs only when something overflowed.
    The statistic itself (σ², mean(x²)) is c²-large and stays inf where the dtype cannot hold it:
    that is what the running variance receives (documented on :class:`Standardizing`)."""
    r = 1.0 / xp.sqrt(ms + eps)
    if type(ms) is _np.ndarray:
        # concrete NumPy: one reduction decides (ms ≥ 0, so max(ms) is inf iff some ms is; a NaN
        # max means NaN statistics, which propagate through r as they are)
        if not ms.size or not math.isinf(_np.maximum.reduce(ms, axis=None)):
            return r
        over = _np.isinf(ms)
    else:
        over = xp.isinf(ms)
        if not _any_or_traced(xp, over):
            return r
    d = centered()
    m = xp.max(xp.abs(d), axis=axes, keepdims=True)
    ok = over & xp.isfinite(m) & (m > 0)
    m = xp.where(ok, m, xp.ones_like(m))
    p = 2.0 ** (-xp.floor(xp.log2(m)))  # an exact power of two of d's dtype
    ms_p = _mean(xp, (d * p) * (d * p), axes)
    return xp.where(ok, p / xp.sqrt(ms_p + eps * (p * p)), r)


def _power_mean(xp, a, axes, p, power):
    """σ_p = (mean aᵖ)^{1/p} over ``axes`` for a = |x − μ| ≥ 0 (``power(t)`` = tᵖ).

    Overflow: aᵖ overflows long before σ_p does (p = 3 in float32 at a ≈ 5e12). σ_p is
    homogeneous, σ_p(a) = q·σ_p(a/q): where the plain result is inf but a is finite, a is divided
    by an exact power of two q = 2^⌊log2 max a⌋ (no rounding) and σ_p recomputed. ``xp.where`` keeps
    it traceable; on concrete arrays the second pass runs only when something overflowed."""
    sig = _mean(xp, power(a), axes) ** (1.0 / p)
    over = xp.isinf(sig)
    if not _any_or_traced(xp, over):
        return sig
    m = xp.max(a, axis=axes, keepdims=True)
    ok = over & xp.isfinite(m) & (m > 0)
    q = 2.0 ** xp.floor(xp.log2(xp.where(ok, m, xp.ones_like(m))))
    return xp.where(ok, q * _mean(xp, power(a / q), axes) ** (1.0 / p), sig)


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
    if kind not in (Standardizing, Scaling, PopulationStandardizing) or getattr(op, "sync", None) is not None:
        return None  # synchronized statistics: the formula's backward (its sums span the ranks)
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

    def forward(self, xp, x, axes, *arrays: Any, **named: Any) -> Any:  # pragma: no cover - interface
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
    sync: Any = None  # a normref.distributed.Reducer: statistics over every rank's batch
    name = "centering"

    def forward(self, xp, x, axes):
        if self.sync is not None:
            # one all_gather of [n, μ_i] (K + 1 values), μ the pooled mean; residuals gain N
            mu, _, count = synced_moments(xp, x, axes, self.sync, second=False)
            return x - mu, (x, mu, count), {"mean": mu, "count": count}
        mu = _mean(xp, x, axes)
        return x - mu, (x, mu), {"mean": mu}

    def xhat(self, xp, res):
        return res[0] - res[1]

    def backward(self, xp, res, axes, g):
        if self.sync is not None:
            (sg,) = synced_sums(xp, (g,), axes, self.sync)  # Σg over all ranks (K values)
            return g - sg / res[2]
        return g - _mean(xp, g, axes)


@dataclasses.dataclass(frozen=True)
class Scaling(_ShiftScale):
    eps: float = 1e-5
    name = "scaling"

    def forward(self, xp, x, axes):
        ms = mean_square(xp, x, axes)
        r = _rsqrt(xp, ms, self.eps, lambda: x, axes)  # right where mean(x²) overflows (issue 11)
        return x * r, (x, None, r), {"mean_square": ms}

    def backward(self, xp, res, axes, g):
        r = res[2]
        xhat = self.xhat(xp, res)
        return r * (g - xhat * _mean(xp, g * xhat, axes))


@dataclasses.dataclass(frozen=True)
class Standardizing(_ShiftScale):
    """x̂ = (x − μ)·(σ² + ε)^-½ over the reduce axes (survey Eqn 17; Eqn 21 in matrix form); the
    backward (derived here: the survey states no backward equation) is dx = s·(g − mean(g) − x̂·mean(g·x̂)).

    Huge inputs: where σ² overflows the dtype (|x − μ| ≳ 1.8e19 in float32, ≳ 1.3e154 in float64)
    x̂ and the gradients are still computed right (:func:`_rsqrt` rescales by a power of two); the
    returned statistic ``var`` — and so a running variance updated from it — is ``inf`` there, the
    dtype's rounding of the true value."""

    eps: float = 1e-5
    sync: Any = None  # a normref.distributed.Reducer: statistics over every rank's batch
    name = "standardizing"

    def forward(self, xp, x, axes):
        if self.sync is not None:
            # one all_gather of [n, μ_i, M2_i] (2K + 1 values), Chan's pooled μ, σ²; residuals gain N
            mu, var, count = synced_moments(xp, x, axes, self.sync)
            rstd = 1.0 / xp.sqrt(var + self.eps)
            return (x - mu) * rstd, (x, mu, rstd, count), {"mean": mu, "var": var, "count": count}
        mu, var, xc = _moments(xp, x, axes)
        # right where σ² overflows (issue 11); σ² itself then stays inf (see the class docstring)
        rstd = _rsqrt(xp, var, self.eps, lambda: x - mu if xc is None else xc, axes)
        return (x - mu if xc is None else xc) * rstd, (x, mu, rstd), {"mean": mu, "var": var}

    def backward(self, xp, res, axes, g):
        rstd = res[2]
        xhat = self.xhat(xp, res)
        if self.sync is not None:
            # one all_reduce_sum of the packed [Σg, Σg·x̂] (2K values); means over the global N
            sg, sgx = synced_sums(xp, (g, g * xhat), axes, self.sync)
            count = res[3]
            return rstd * (g - sg / count - xhat * (sgx / count))
        return rstd * (g - _mean(xp, g, axes) - xhat * _mean(xp, g * xhat, axes))


@dataclasses.dataclass(frozen=True)
class LpStandardizing(Operation):
    p: float = 2.0
    eps: float = 1e-5
    l1_factor: bool = False
    sync: Any = None  # a normref.distributed.Reducer: statistics over every rank's batch
    name = "lp"

    @property
    def c(self) -> float:
        return math.sqrt(math.pi / 2.0) if (self.l1_factor and self.p == 1.0) else 1.0

    def forward(self, xp, x, axes):
        if self.sync is not None:
            return self._synced_forward(xp, x, axes)
        mu = _mean(xp, x, axes)
        u = x - mu
        a = xp.abs(u)
        if math.isinf(self.p):
            sig = xp.max(a, axis=axes, keepdims=True)
        elif self.p == 1.0:
            sig = _mean(xp, a, axes)
        elif self.p == 2.0:
            sig = _power_mean(xp, a, axes, 2.0, lambda t: t * t)
        else:
            sig = _power_mean(xp, a, axes, self.p, lambda t: t**self.p)
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
        if self.sync is not None:
            return self._synced_backward(xp, res, axes, g)
        xhat, s, sig = res
        w = self._weights(xp, xhat, s, sig, axes)
        du = (g - self.c * _mean(xp, g * xhat, axes) * w) / s
        return du - _mean(xp, du, axes)

    def _synced_forward(self, xp, x, axes):
        # Two rounds (σ_p needs the global μ first): p = 2 takes σ₂ from Chan's pooled M2 (one
        # all_gather of 2K + 1 values); otherwise round 1 gathers [n, μ_i] (K + 1 values) and
        # round 2 all-reduces Σ|x − μ|^p (K values), or for p = ∞ all-gathers each rank's max|x − μ|
        # (K values per rank) and takes the max over ranks.
        sync = self.sync
        if self.p == 2.0:
            mu, var, count = synced_moments(xp, x, axes, sync)
            sig = xp.sqrt(var)
        else:
            mu, _, count = synced_moments(xp, x, axes, sync, second=False)
            a = xp.abs(x - mu)
            if math.isinf(self.p):
                loc = _stat_max(xp, a, axes, mu)
                sig = xp.reshape(xp.max(sync.all_gather(loc), axis=0), mu.shape)
            else:
                (sp,) = synced_sums(xp, (a if self.p == 1.0 else a**self.p,), axes, sync)
                m = sp / count
                sig = m if self.p == 1.0 else m ** (1.0 / self.p)
        s = self.c * sig + self.eps
        # residuals keep x and μ (not x̂): the backward recomputes |x − μ| bitwise as here, so the
        # p = ∞ ties |x − μ| = σ_∞ (σ_∞ the max over ranks of these very values) are found exactly
        return (x - mu) / s, (x, mu, s, sig, count), {"mean": mu, "scale": sig, "count": count}

    def xhat(self, xp, res):
        if self.sync is not None:
            return (res[0] - res[1]) / res[2]
        return res[0]

    def _synced_backward(self, xp, res, axes, g):
        # du = (g − c·mean(g·x̂)·w)/s, dx = du − mean(du) with mean(du) = (Σg − c·mean(g·x̂)·Σw)/(N·s):
        # one all_reduce_sum of [Σg, Σg·x̂, Σw] (3K values; 2K for p = 2, where Σw = 0); for p = ∞ w = N·sign(u)·[|u| = σ_∞]/#ties
        # with the ties counted over all ranks: [Σg, Σg·x̂, Σ sign(u)·hit, Σ hit] (4K values).
        x, mu, s, sig, count = res
        u = x - mu
        xhat = u / s
        sync = self.sync
        if math.isinf(self.p):
            hit = xp.astype(xp.abs(u) >= sig, u.dtype)
            hs = hit * xp.sign(u)
            sg, sgx, shs, sh = synced_sums(xp, (g, g * xhat, hs, hit), axes, sync)
            ties = xp.where(sh > 0, sh, xp.ones_like(sh))
            w, sw = count * hs / ties, count * shs / ties
        elif self.p == 2.0:
            # w = u/σ₂ and Σw = Σu/σ₂ = 0 exactly (u is centred by the global μ): [Σg, Σg·x̂], 2K values
            safe = xp.where(sig > 0, sig, xp.ones_like(sig))
            w = u / safe
            sg, sgx = synced_sums(xp, (g, g * xhat), axes, sync)
            sw = xp.zeros_like(sg)
        else:
            safe = xp.where(sig > 0, sig, xp.ones_like(sig))
            w = xp.sign(u) if self.p == 1.0 else (xp.abs(u) / safe) ** (self.p - 1.0) * xp.sign(u)
            sg, sgx, sw = synced_sums(xp, (g, g * xhat, w), axes, sync)
        pos = sig > 0
        w = xp.where(pos, w, xp.zeros_like(w))
        sw = xp.where(pos, sw, xp.zeros_like(sw))
        m = self.c * (sgx / count)
        du = (g - m * w) / s
        return du - (sg - m * sw) / (count * s)


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
    sync: Any = None  # a normref.distributed.Reducer: μ_B, σ_B (hence r, d) over every rank's batch
    name = "batch_renorm"

    def forward(self, xp, x, axes, running_mean, running_var):
        if self.sync is not None:
            mu, var, count = synced_moments(xp, x, axes, self.sync)
            # no local overflow rescale here: its factor would differ between ranks
            rstd = 1.0 / xp.sqrt(var + self.eps)
        else:
            mu, var = moments(xp, x, axes)
            rstd = _rsqrt(xp, var, self.eps, lambda: x - mu, axes)  # right where σ² overflows (issue 11)
        x0 = (x - mu) * rstd
        rrun = 1.0 / xp.sqrt(running_var + self.eps)
        r = xp.clip(rrun / rstd, 1.0 / self.rmax, self.rmax)
        d = xp.clip((mu - running_mean) * rrun, -self.dmax, self.dmax)
        # residuals: the input and per-statistic (μ_B, 1/σ_B, r, d); x̂ is recomputed (no full-size copy)
        if self.sync is not None:
            return x0 * r + d, (x, mu, rstd, r, d, count), {"mean": mu, "var": var, "count": count}
        return x0 * r + d, (x, mu, rstd, r, d), {"mean": mu, "var": var}

    def xhat(self, xp, res):
        x, mu, rstd, r, d = res[:5]
        return (x - mu) * rstd * r + d

    def backward(self, xp, res, axes, g):
        x, mu, rstd, r = res[:4]
        if self.sync is not None:
            return Standardizing(self.eps, self.sync).backward(xp, (x, mu, rstd, res[5]), axes, g * r)
        return Standardizing(self.eps).backward(xp, (x, mu, rstd), axes, g * r)


# --------------------------------------------------------------------------------------------------
# Statistics across ranks (issue 12): the collectives of a synchronized operation, written once.
# A reducer (normref.distributed.Reducer) is carried in the operation (a static, hashable field), so
# the backward uses the forward's reducer.


def _wide_dtype(xp, dtype):
    """float64 where the library computes in it (NumPy, torch, CuPy; JAX with x64 on), else ``dtype``:
    the per-rank moments travel and are combined in it (see :func:`synced_moments`)."""
    f64 = getattr(xp, "float64", None)
    if f64 is None or dtype == f64:
        return dtype
    import array_api_compat

    if array_api_compat.is_jax_namespace(xp):
        import sys

        jax = sys.modules["jax"]  # loaded already: the input is a JAX array (normref never imports it)
        if not jax.config.read("jax_enable_x64"):
            return dtype
    return f64


def _flat(xp, t):
    return xp.reshape(t, (-1,))


def _count(x, axes) -> int:
    n = 1
    for a in axes:
        n *= int(x.shape[a])
    return n


def _check_global_count(count) -> None:
    try:
        n = float(count)
    except Exception:  # a traced value (JAX): the count is not known at trace time
        return
    if n < 2:
        raise ValueError(
            f"synchronized batch statistics: expected more than 1 value per statistic over all ranks "
            f"together; got {int(n)}"
        )


def synced_moments(xp, x, axes, sync, second: bool = True):
    """(μ, σ², N) over ``axes`` of every rank's ``x`` (keepdims; σ² biased; N a 0-d array), from ONE
    ``sync.all_gather`` of the packed per-rank [n_i, μ_i (K), M2_i (K)] (2K + 1 values; K the
    number of statistics), combined by :func:`normref.distributed.combine_moments` (Chan et al.).
    With ``second=False`` only [n_i, μ_i] (K + 1 values) are gathered and σ² is ``None``.

    Local moments use the registered ``moments`` kernel where there is one. A rank with n_i = 0
    sends n_i = 0, μ_i = M2_i = 0 and counts for nothing. For a float32 input on a library with
    float64 the per-rank moments are sent and combined in float64 after the corrected two-pass
    step of Chan, Golub & LeVeque (1983): μ_i = μ̂_i + mean(x − μ̂_i), M2_i = n_i·(σ̂_i² − mean(x − μ̂_i)²),
    so the between-rank term Σ n_i (μ_i − μ)² does not inherit the float32 rounding of μ̂_i
    (ε₃₂·|μ|, which would cost a relative ε₃₂·|μ|/σ of the variance); without float64 (JAX without
    x64) they travel in the input's dtype, with that limitation.
    """
    n = _count(x, axes)
    wide = _wide_dtype(xp, x.dtype)
    if n == 0:
        z = xp.sum(x, axis=axes, keepdims=True)  # zeros of the statistics' shape, on x's device
        keep = z.shape
        mu_w = m2_w = xp.astype(_flat(xp, z), wide)
    else:
        if second:
            mu, var, xc = _moments(xp, x, axes)
        else:
            mu, var, xc = _mean(xp, x, axes), None, None
        keep = mu.shape
        if wide != x.dtype:
            xc = x - mu if xc is None else xc
            r = _mean(xp, xc, axes)  # the rounding of μ̂ (corrected two-pass)
            mu_w = xp.astype(_flat(xp, mu), wide) + xp.astype(_flat(xp, r), wide)
            if second:
                r_w = xp.astype(_flat(xp, r), wide)
                m2_w = n * (xp.astype(_flat(xp, var), wide) - r_w * r_w)
        else:
            mu_w = _flat(xp, mu)
            if second:
                m2_w = n * _flat(xp, var)
    k = mu_w.shape[0]
    from ._xp import device_of

    # the count slot (built by full: K may be 0, e.g. C = 0 channels)
    parts = [xp.full((1,), float(n), dtype=wide, device=device_of(x)), mu_w] + ([m2_w] if second else [])
    gathered = sync.all_gather(xp.concat(parts))  # (W, 2K + 1) or (W, K + 1)
    cnt = gathered[:, 0]
    if second:
        N, mu_g, m2_g = combine_moments(xp, cnt, gathered[:, 1 : k + 1], gathered[:, k + 1 :])
    else:
        N = xp.sum(cnt)
        mu_g = xp.sum(cnt[:, None] * gathered[:, 1:], axis=0) / xp.where(N > 0, N, xp.ones_like(N))
        m2_g = None
    _check_global_count(N)
    safe = xp.where(N > 0, N, xp.ones_like(N))
    mu_out = xp.reshape(xp.astype(mu_g, x.dtype), keep)
    var_out = None if m2_g is None else xp.reshape(xp.astype(m2_g / safe, x.dtype), keep)
    return mu_out, var_out, xp.astype(N, x.dtype)


def synced_sums(xp, arrays, axes, sync):
    """Σ over ``axes`` and over every rank of each array in ``arrays`` (keepdims), from ONE
    ``sync.all_reduce_sum`` of the packed local sums (K values per array)."""
    loc = [xp.sum(a, axis=axes, keepdims=True) for a in arrays]
    keep = loc[0].shape
    k = _flat(xp, loc[0]).shape[0]
    tot = sync.all_reduce_sum(xp.concat([_flat(xp, t) for t in loc]))
    return tuple(xp.reshape(tot[i * k : (i + 1) * k], keep) for i in range(len(arrays)))


def _stat_max(xp, a, axes, like):
    """max over ``axes`` of a ≥ 0 (keepdims), 0 on a rank with no values, flattened for a gather."""
    if _count(a, axes) == 0:
        return _flat(xp, xp.zeros_like(like))
    return _flat(xp, xp.max(a, axis=axes, keepdims=True))


def make(kind: str, *, eps: float = 1e-5, p: float = 2.0, l1_factor: bool = False, sync: Any = None) -> Operation:
    """The operation named ``kind`` (one of :data:`KINDS`); ``sync`` (a reducer) synchronizes the
    statistics of centering, standardizing and lp across ranks (scaling's mean(x²) is not a batch
    statistic in any preset here: ``ValueError``)."""
    if kind == "centering":
        return Centering(sync=sync)
    if kind == "scaling":
        if sync is not None:
            raise ValueError("normalize: sync= applies to operation 'standardizing', 'centering', 'lp' "
                             "or a whitening operation; got operation='scaling'")
        return Scaling(eps=eps)
    if kind == "standardizing":
        return Standardizing(eps=eps, sync=sync)
    if kind == "lp":
        return LpStandardizing(p=p, eps=eps, l1_factor=l1_factor, sync=sync)
    raise ValueError(f"operation must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")

