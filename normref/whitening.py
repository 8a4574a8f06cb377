"""Whitening (survey §5.1.2, Eqn 23): decorrelate groups of channels, with exact analytic gradients.

For one group of c features with m samples X ∈ R^{c×m} (a column per sample):

    μ = mean_cols(X),  Xc = X − μ·1ᵀ,  Σ = Xc·Xcᵀ/m + ε·I,  X̂ = W(Σ)·Xc,

with the whitening matrix W(Σ) of the operation (NOP, :mod:`normref.matfun`):

==================  ==================================================  ===================================
``"zca"``           W = D·Λ^-1/2·Dᵀ = Σ^-1/2 (symmetric)                 Huang et al., DBN, CVPR 2018
``"pca"``           W = Λ^-1/2·Dᵀ (unstable: stochastic axis swapping)   Huang et al., CVPR 2018 §3.1
``"cholesky"``      W = L^-1, Σ = L·Lᵀ                                   Siarohin et al., ICLR 2019
``"iternorm"``      W = P_T/√tr Σ, Newton on Σ/tr Σ, T = ``iterations``  Huang et al., IterNorm, CVPR 2019
``"newton_schulz"`` coupled Newton–Schulz Z_T/√tr Σ                      Lin & Maji, BMVC 2017 (survey [80])
==================  ==================================================  ===================================

``"iternorm"`` and ``"newton_schulz"`` compute the same polynomial in Σ/tr Σ; IterNorm's uncoupled
form is numerically unstable for large T (see :func:`iter_norm`), the coupled form is not.

The partition (NAP) decides what a "sample" is:

- ``"batch"`` (default; Π_BN with coupled channels): X gathers every sample and position,
  m = N·H·W, one Σ per channel group shared by the batch (decorrelated BN, IterNorm);
- ``"instance"``: one Σ per sample and channel group, m = H·W (the whitening of style transfer, WCT);
  the sample's own statistics are used whatever ``training`` says (there is no population);
- ``"group"`` (group whitening, Huang et al., CVPR 2021): per sample, the C channels are cut into
  ``num_groups`` contiguous blocks, each block (with its positions) is one *feature*, so Σ is
  num_groups × num_groups over m = (C/num_groups)·H·W values (per-sample statistics, like "instance").

Features are split into consecutive groups of ``group_size`` (``None``: one group of all features).
``group_size`` must divide the number of features: a smaller last group is **refused** (with the
divisors listed), because a padded group changes the trace normalization of IterNorm and the
eigenvalue order of PCA, and all groups go through ONE batched ``eigh``/``cholesky`` call on an
array of shape (B, G, c, c). Group size 1 is exactly standardization (:func:`normref.batch_norm`).

Backward (../shared/math/BACKWARD.md), for one group with G = ∂L/∂X̂:
dW = G·Xcᵀ (summed over the samples sharing Σ), dXc = Wᵀ·G + (2/m)·dΣ·Xc with the symmetric
dΣ = matfun backward(dW), and dX = dXc − mean_cols(dXc).

Population statistics (survey §5.3.2, §4 Eqn 16): the *running covariance* is kept (not the running
whitening matrix). A training call given ``running_mean``/``running_cov`` returns
``WhiteningResult(output, running_mean, running_cov)`` with
running ← (1 − momentum)·running + momentum·batch statistic, the covariance unbiased
(× m/(m − 1), as torch does for the variance) and without ε; an inference call computes W from
``running_cov + ε·I`` with the same operation and treats μ̂, W as constants: dX = Wᵀ·G.
Nothing is mutated.

A covariance that is not positive definite raises ``ValueError`` (never a NaN): with ``eps = 0``
``zca``/``pca`` need every eigenvalue above d·ε_dtype·λ_max and ``cholesky`` every pivot above
d·ε_dtype·max diag Σ; with ``eps > 0`` they need positive eigenvalues/pivots. The Newton methods
are polynomials in Σ/tr Σ and stay finite on a singular Σ (they only partly whiten it); they refuse
tr Σ = 0. The checks need concrete values and are skipped under ``jax.jit`` tracing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as _np

from . import matfun as _mf
from ._validate import check_choice, check_int, check_momentum, check_ndim, check_nonnegative, check_positive
from ._xp import compute_dtype, namespace, to_compute, to_numpy
from .framework import channel_param, check_param_shape
from .registry import Example, Invariant, Residuals, method

__all__ = [
    "WhiteningResult",
    "WHITENING_METHODS",
    "whitening_matrix",
    "batch_whitening",
    "decorrelated_batch_norm",
    "iter_norm",
    "whitening_coloring",
    "adain",
    "wct",
]

WHITENING_METHODS = _mf.METHODS
PARTITIONS = ("batch", "instance", "group")


class WhiteningResult(NamedTuple):
    """Output and updated population statistics of a training-mode call given running statistics."""

    output: Any
    running_mean: Any
    running_cov: Any


# --------------------------------------------------------------------------------------------------
# validation


def _check_method(fn, name):
    if name not in WHITENING_METHODS:
        raise ValueError(f"{fn}: method must be one of {', '.join(map(repr, WHITENING_METHODS))}; got {name!r}")
    return name


def _check_group_size(fn, group_size, features: int, what: str) -> int:
    if group_size is None:
        return features
    if isinstance(group_size, bool) or not isinstance(group_size, (int, _np.integer)):
        raise TypeError(f"{fn}: group_size must be a positive integer or None; got {type(group_size).__name__} {group_size!r}")
    c = int(group_size)
    if c < 1:
        raise ValueError(f"{fn}: group_size must be a positive integer; got {c}")
    if c > features:
        raise ValueError(f"{fn}: group_size must not exceed the number of features ({what} = {features}); got {c}")
    if features % c:
        divs = [k for k in range(1, features + 1) if features % k == 0]
        raise ValueError(
            f"{fn}: group_size must divide the number of features ({what} = {features}; a smaller last group is "
            f"not supported, valid sizes: {divs}); got {c}"
        )
    return c


def _eps(fn, eps):
    return check_nonnegative(fn, "eps", eps)


def _factor(fn, momentum, num_batches_tracked):
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(
            f"{fn}: momentum=None (cumulative average) needs num_batches_tracked, the number of batches seen "
            f"before this one; got num_batches_tracked=None"
        )
    return 1.0 / (check_int(fn, "num_batches_tracked", num_batches_tracked, minimum=0) + 1)


def _scalar(x) -> float:
    return float(to_numpy(x))


def _check_definite(fn, xp, method, wres, sigma, eps):
    """ValueError (not NaN) when Σ + εI is not positive definite; skipped on traced values.

    ``wres``: (λ, D) for zca/pca (checked before λ^-1/2 is taken), the matfun residuals otherwise."""
    try:
        if method in ("zca", "pca"):
            lam = wres[0]
            rtol = 0.0 if eps > 0 else lam.shape[-1] * float(xp.finfo(lam.dtype).eps)
            ok = _mf.min_eigenvalue_ok(xp, lam, rtol)
            if ok is False:
                lo, hi = _scalar(xp.min(lam)), _scalar(xp.max(lam))
                raise ValueError(
                    f"{fn}: the covariance of a whitening group (+ eps·I, eps={eps}) is not positive definite: smallest "
                    f"eigenvalue {lo:.3g}, largest {hi:.3g} (need > {rtol:.3g}·largest); pass eps > 0 or more samples"
                )
        elif method == "cholesky":
            l = wres[0]
            piv = _mf._diag(xp, l)
            d = l.shape[-1]
            diag_s = _mf._diag(xp, sigma)
            rtol = 0.0 if eps > 0 else d * float(xp.finfo(l.dtype).eps)
            ok = bool(xp.all(xp.isfinite(piv)) and xp.all(piv * piv > rtol * xp.max(diag_s, axis=-1)[..., None]))
            if not ok:
                raise ValueError(
                    f"{fn}: the covariance of a whitening group (+ eps·I, eps={eps}) is not positive definite (a "
                    f"Cholesky pivot is not above {rtol:.3g}·max diag); pass eps > 0 or more samples"
                )
        else:
            t = wres[1]
            if not bool(xp.all(t > 0)):
                raise ValueError(
                    f"{fn}: the covariance of a whitening group has zero trace (constant features) and eps={eps}; "
                    f"the trace normalization of {method!r} needs eps > 0"
                )
    except ValueError:
        raise
    except Exception:  # a traced value (jax.jit): no Python boolean to test
        return


def _matrix_forward(fn, xp, sigma, method, iterations, eps):
    if method in ("zca", "pca"):
        eig = _mf.eigh(xp, sigma)
        _check_definite(fn, xp, method, eig, sigma, eps)
        return _mf.whitening_matrix_forward(xp, sigma, method, iterations, eig=eig)
    if method in _mf.ITERATIVE:  # the trace normalization divides by tr Σ: check it first
        _check_definite(fn, xp, method, (None, _mf.trace(xp, sigma)), sigma, eps)
        return _mf.whitening_matrix_forward(xp, sigma, method, iterations)
    try:
        w, wres = _mf.whitening_matrix_forward(xp, sigma, method, iterations)
    except Exception as e:  # numpy/torch LinAlgError of a failed Cholesky (numpy's is a ValueError)
        if "LinAlg" in type(e).__name__ or "cholesky" in str(e).lower():
            raise ValueError(
                f"{fn}: the covariance of a whitening group (+ eps·I, eps={eps}) is not positive definite "
                f"({type(e).__name__}: {e}); pass eps > 0 or more samples"
            ) from None
        raise
    _check_definite(fn, xp, method, wres, sigma, eps)
    return w, wres


# --------------------------------------------------------------------------------------------------
# the whitening NOP on the view (B·, G, c, M) and its backward


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static half of a whitening call (hashable): shapes, partition, operation, recovery."""

    shape: tuple          # the input's shape (N, C, *S)
    view: tuple           # (N, G, c, M)
    batch: bool           # Σ shared by the batch (Π_BN) rather than per sample
    method: str
    population: bool      # normalized by given (constant) statistics
    n_w: int              # number of matfun residual arrays
    recovery: str         # "none", "affine", "coloring"
    wshape: Any = None
    bshape: Any = None


def _view_shape(partition, shape, num_groups, group_size):
    n, c = shape[0], shape[1]
    p = math.prod(shape[2:])
    f = c if partition != "group" else num_groups
    return (n, f // group_size, group_size, (c * p) // f)


def _sample_mean(xp, t, batch: bool):
    """The mean over the samples of each covariance: the positions (axis 3), then the batch (axis 0)
    for Π_BN (two contiguous reductions; the counts are equal, so the mean of means is the mean)."""
    t = xp.mean(t, axis=3, keepdims=True)
    return xp.mean(t, axis=0, keepdims=True) if batch else t


def _covariance(xp, xc, batch: bool):
    """Xc·Xcᵀ/m per group: a batched matrix product (summed over the batch for Π_BN)."""
    cov = xp.matmul(xc, _mf.mT(xp, xc))
    m = xc.shape[3]
    if batch:
        cov = xp.sum(cov, axis=0, keepdims=True)
        m *= xc.shape[0]
    return cov / m


def _whiten_forward(fn, xp, xv, batch, eps, method, iterations, mean=None, cov=None):
    """(X̂, Xc, W, wres, μ, cov) on the view; batch statistics unless ``mean``/``cov`` are given."""
    if mean is None:
        mu = _sample_mean(xp, xv, batch)
        xc = xv - mu
        cov = _covariance(xp, xc, batch)
    else:
        mu = mean
        xc = xv - mu
    sigma = cov + eps * _mf.eye_like(xp, cov)
    w, wres = _matrix_forward(fn, xp, sigma, method, iterations, eps)
    return xp.matmul(w, xc), xc, w, wres, mu, cov


def _whiten_backward(xp, plan_method, batch, population, xc, w, wres, dy):
    """dX on the view from dX̂ (module docstring); population statistics are constants: dX = Wᵀ·dX̂."""
    dxc = xp.matmul(_mf.mT(xp, w), dy)
    if population:
        return dxc
    dw = xp.matmul(dy, _mf.mT(xp, xc))
    m = xc.shape[3]
    if batch:
        dw = xp.sum(dw, axis=0, keepdims=True)
        m *= xc.shape[0]
    ds = _mf.whitening_matrix_backward(xp, wres, dw, plan_method)  # symmetric
    dxc = dxc + (2.0 / m) * xp.matmul(ds, xc)
    return dxc - _sample_mean(xp, dxc, batch)


def _out(xp, y, dtype):
    return y if y.dtype == dtype else xp.astype(y, dtype)


def _ema(xp, running, stat, f):
    new = (1.0 - f) * to_compute(xp, running, stat.dtype) + f * stat
    return _out(xp, new, running.dtype)


def _whitening(
    fn, input, running_mean, running_cov, weight, bias, training, momentum, eps, method, group_size,
    iterations, partition, num_groups, num_batches_tracked, recovery,
):
    """The shared body of every batch-whitening preset: validation, NAP → NOP → NRR, residuals."""
    xp = namespace(fn, input=input, running_mean=running_mean, running_cov=running_cov, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    method = _check_method(fn, method)
    check_choice(fn, "partition", partition, PARTITIONS)
    iterations = check_int(fn, "iterations", iterations, minimum=1)
    eps = _eps(fn, eps)
    momentum = check_momentum(fn, momentum)
    shape = tuple(input.shape)
    n, c = shape[0], shape[1]
    if partition == "group":
        if num_groups is None:
            raise ValueError(f"{fn}: partition='group' needs num_groups (the number of channel blocks); got None")
        num_groups = check_int(fn, "num_groups", num_groups)
        if c % num_groups:
            raise ValueError(f"{fn}: num_groups must divide the number of channels input.shape[1] = {c}; got {num_groups}")
        feats, what = num_groups, "num_groups"
    else:
        feats, what = c, "input.shape[1]"
        if partition == "instance" and len(shape) < 3:
            raise ValueError(f"{fn}: the instance partition needs spatial axes, input (N, C, *spatial); got shape {shape}")
    gs = _check_group_size(fn, group_size, feats, what)
    view = _view_shape(partition, shape, num_groups, gs)
    batch = partition == "batch"
    g = view[1]
    if (running_mean is None) != (running_cov is None):
        given = "running_mean" if running_cov is None else "running_cov"
        missing = "running_cov" if running_cov is None else "running_mean"
        raise ValueError(f"{fn}: {given} and {missing} go together; got {given} but {missing}=None")
    if running_mean is not None and not batch:
        raise ValueError(f"{fn}: running statistics are kept for partition='batch' only; got partition={partition!r}")
    check_param_shape(fn, "running_mean", running_mean, (c,), f"one value per channel, input.shape[1] = {c}")
    check_param_shape(fn, "running_cov", running_cov, (g, gs, gs), f"(groups, group_size, group_size) = ({g}, {gs}, {gs})")
    if recovery == "coloring":
        check_param_shape(fn, "weight", weight, (g, gs, gs), f"the coloring matrices, (groups, group_size, group_size) = ({g}, {gs}, {gs})")
    else:
        check_param_shape(fn, "weight", weight, (c,), f"one value per channel, input.shape[1] = {c}")
    check_param_shape(fn, "bias", bias, (c,), f"one value per channel, input.shape[1] = {c}")
    m = view[3] * (view[0] if batch else 1)
    # the instance and group partitions always whiten with the sample's own statistics (as
    # instance_norm does by default): there is no population to estimate for them
    training = bool(training) or not batch
    if training:
        if m < 2:
            raise ValueError(
                f"{fn}: expected more than 1 sample per covariance when training ({partition} partition of input shape "
                f"{shape} gives {m})"
            )
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_cov are required when training=False; got None")

    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    xv = xp.reshape(x, view)
    if training:
        yv, xc, w, wres, mu, cov = _whiten_forward(fn, xp, xv, batch, eps, method, iterations)
    else:
        mean = xp.reshape(to_compute(xp, running_mean, cd), (1, g, gs, 1))
        covp = xp.reshape(to_compute(xp, running_cov, cd), (1, g, gs, gs))
        yv, xc, w, wres, mu, cov = _whiten_forward(fn, xp, xv, batch, eps, method, iterations, mean, covp)
        wres = ()
    nd = len(shape)
    if recovery == "coloring":
        gam = None if weight is None else xp.reshape(to_compute(xp, weight, cd), (1, g, gs, gs))
        if gam is not None:
            yv = xp.matmul(gam, yv)
        y = xp.reshape(yv, shape)
    else:
        gam = channel_param(xp, to_compute(xp, weight, cd), nd)
        y = xp.reshape(yv, shape)
        if gam is not None:
            y = y * gam
    if bias is not None:
        y = y + channel_param(xp, to_compute(xp, bias, cd), nd)
    plan = _Plan(shape, view, batch, method, not training, len(wres), recovery,
                 None if weight is None else tuple(weight.shape), None if bias is None else tuple(bias.shape))
    res = Residuals((xc, w, gam) + tuple(wres), plan)
    y = _out(xp, y, input.dtype)
    if training and running_mean is not None:
        rm = _ema(xp, running_mean, xp.reshape(mu, (c,)), f)
        rc = _ema(xp, running_cov, xp.reshape(cov, (g, gs, gs)) * (m / (m - 1)), f)
        return WhiteningResult(y, rm, rc), res
    return y, res


def _whitening_backward(res: Residuals, g):
    """(dinput, None, None, dweight, dbias): the recovery's backward, then the whitening's."""
    xp = namespace("whitening.backward", cotangent=g)
    plan: _Plan = res.static
    xc, w, gam = res.arrays[:3]
    wres = res.arrays[3:]
    g = to_compute(xp, g, xc.dtype)
    shape, view = plan.shape, plan.view
    nd = len(shape)
    dweight = dbias = None
    if plan.bshape is not None:
        axes = (0,) + tuple(range(2, nd))
        dbias = xp.sum(g, axis=axes)
    gv = xp.reshape(g, view)
    if plan.recovery == "coloring":
        if gam is not None:
            yv = xp.matmul(w, xc)
            dweight = xp.reshape(xp.sum(xp.matmul(gv, _mf.mT(xp, yv)), axis=0), plan.wshape)
            gv = xp.matmul(_mf.mT(xp, gam), gv)
    elif gam is not None:
        yhat = xp.reshape(xp.matmul(w, xc), shape)
        dweight = xp.sum(g * yhat, axis=(0,) + tuple(range(2, nd)))
        gv = xp.reshape(g * gam, view)
    dxv = _whiten_backward(xp, plan.method, plan.batch, plan.population, xc, w, wres, gv)
    return xp.reshape(dxv, shape), None, None, dweight, dbias


# --------------------------------------------------------------------------------------------------
# examples and invariants (NumPy float64; the conformance suite converts them)


def _np_matrix(method, sigma, iterations=5):
    """The whitening matrix in NumPy float64 (the reference the invariants compare against)."""
    import array_api_compat.numpy as xnp

    return _np.asarray(_mf.whitening_matrix_forward(xnp, _np.asarray(sigma, _np.float64), method, iterations)[0])


def _args(m, args, kwargs):
    return m.bind(*args, **kwargs).arguments


def _whiteness_invariant() -> Invariant:
    """Invariant: for zca, pca and cholesky, W·Σ·Wᵀ = I, i.e. the output covariance is I − ε·W·Wᵀ
    (Σ includes ε·I), checked with W recomputed in float64 from the input (training, no recovery)."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        meth = a.get("method", "zca")
        if meth not in ("zca", "pca", "cholesky") or not a["training"] or a.get("weight") is not None or a.get("bias") is not None:
            return None
        if a.get("partition", "batch") != "batch":
            return None
        x = _np.asarray(to_numpy(a["input"]), _np.float64)
        y = _np.asarray(to_numpy(m.primary(out)), _np.float64)
        c = x.shape[1]
        gs = a.get("group_size") or c
        view = (x.shape[0], c // gs, gs, int(_np.prod(x.shape[2:], dtype=int)))
        xv = x.reshape(view)
        yv = y.reshape(view)
        mm = view[0] * view[3]
        xc = xv - xv.mean(axis=(0, 3), keepdims=True)
        sig = _np.einsum("ngim,ngjm->gij", xc, xc) / mm + a["eps"] * _np.eye(gs)
        wm = _np_matrix(meth, sig)
        cy = _np.einsum("ngim,ngjm->gij", yv, yv) / mm
        return float(_np.max(_np.abs(cy + a["eps"] * wm @ _np.swapaxes(wm, -1, -2) - _np.eye(gs))))

    return Invariant("whiteness: cov(X̂) = I − ε·W·Wᵀ (W·Σ·Wᵀ = I)", check, scale=256.0)


def _cov_cond(x, gs):
    """κ(Σ) of the worst group of a (N, C, ...) example (the tolerances' conditioning factor)."""
    c = x.shape[1]
    xv = x.reshape(x.shape[0], c // gs, gs, -1)
    xc = xv - xv.mean(axis=(0, 3), keepdims=True)
    s = _np.einsum("ngim,ngjm->gij", xc, xc) / (xv.shape[0] * xv.shape[3])
    lam = _np.linalg.eigvalsh(s)
    return float(max(1.0, _np.max(lam[:, -1] / lam[:, 0])))


def _ex_batch_whitening(rng):
    x = rng.standard_normal((8, 4, 3, 2)) + 0.5
    x[:, 1] += 0.7 * x[:, 0]  # correlated channels
    c = 4
    k = _cov_cond(x, 4)
    for meth in WHITENING_METHODS:
        yield Example((x,), dict(training=True, method=meth), label=f"{meth}, one group of 4", cond=k)
        yield Example((x,), dict(training=True, method=meth, group_size=2), label=f"{meth}, groups of 2", cond=k)
    rm = rng.standard_normal(c) * 0.2
    a = rng.standard_normal((2, 2, 2))
    rc = a @ _np.swapaxes(a, -1, -2) + _np.eye(2)
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    yield Example((x, rm, rc, w, b), dict(training=True, method="zca", group_size=2, momentum=0.3),
                  label="zca training, running update, affine", cond=k)
    yield Example((x, rm, rc, w, b), dict(training=False, method="cholesky", group_size=2),
                  label="cholesky inference (population statistics)", cond=k)
    x2 = rng.standard_normal((3, 4, 12))
    xc2 = x2 - x2.mean(axis=2, keepdims=True)
    lam2 = _np.linalg.eigvalsh(_np.einsum("nim,njm->nij", xc2, xc2) / 12 + 1e-5 * _np.eye(4))
    yield Example((x2,), dict(training=True, method="zca", partition="instance"), label="zca, instance partition",
                  cond=float(_np.max(lam2[:, -1] / lam2[:, 0])))
    yield Example((x2,), dict(training=True, method="iternorm", partition="group", num_groups=2, iterations=3),
                  label="iternorm T=3, group partition", cond=10.0)


@method(
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.1.2 Eqn 23 (whitening); population statistics §5.3.2, Eqn 16",
    paper="Huang et al., Decorrelated Batch Normalization, CVPR 2018; Huang et al., Iterative Normalization, CVPR 2019; "
          "Siarohin et al., Whitening and Coloring Batch Transform for GANs, ICLR 2019",
    examples=_ex_batch_whitening,
    invariants=(_whiteness_invariant(),),
)
def batch_whitening(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    method: str = "zca",
    group_size: int | None = None,
    iterations: int = 5,
    *,
    partition: str = "batch",
    num_groups: int | None = None,
    num_batches_tracked: int | None = None,
):
    """Batch whitening: X̂ = W(Σ)·(X − μ) per group of ``group_size`` features, y = γ·X̂ + β per channel.

    Σ = Xc·Xcᵀ/m + ε·I (survey Eqn 23); W by ``method`` (``"zca"``, ``"pca"``, ``"cholesky"``,
    ``"iternorm"``, ``"newton_schulz"``; the last two with ``iterations`` = T); ``partition``
    ``"batch"`` (default), ``"instance"`` or ``"group"`` (with ``num_groups``); see the module
    docstring for what each means, and for the running statistics: ``running_mean`` (C,) and
    ``running_cov`` (C/group_size, group_size, group_size), unbiased, returned updated in a
    :class:`WhiteningResult` by a training call; required by an inference call (``training=False``),
    which whitens with W(running_cov + εI) and treats it as a constant. Huang et al., CVPR 2018.
    """
    return _whitening("batch_whitening", input, running_mean, running_cov, weight, bias, training, momentum, eps,
                      method, group_size, iterations, partition, num_groups, num_batches_tracked, "affine")


batch_whitening.defbackward(_whitening_backward)


def _ex_preset(meth):
    def ex(rng):
        x = rng.standard_normal((6, 4, 2, 3)) - 0.3
        x[:, 2] += 0.5 * x[:, 3]
        k = _cov_cond(x, 2)
        c = 4
        yield Example((x,), dict(training=True, group_size=2), label="groups of 2, batch statistics", cond=k)
        yield Example((x, None, None, rng.uniform(0.5, 1.5, c), rng.standard_normal(c)), dict(training=True),
                      label="one group, affine", cond=_cov_cond(x, 4))
        rm = rng.standard_normal(c) * 0.1
        a = rng.standard_normal((1, 4, 4))
        rc = a @ _np.swapaxes(a, -1, -2) / 4 + _np.eye(4)
        yield Example((x, rm, rc), dict(training=False), label="inference (population statistics)", cond=k)

    return ex


@method(
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.1.2 Eqn 23 (ZCA whitening, decorrelated BN)",
    paper="Huang, Yang, Lang & Deng, Decorrelated Batch Normalization, CVPR 2018",
    examples=_ex_preset("zca"),
    invariants=(_whiteness_invariant(),),
)
def decorrelated_batch_norm(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    group_size: int | None = None,
    *,
    num_batches_tracked: int | None = None,
):
    """Decorrelated batch normalization: ZCA batch whitening X̂ = Σ^-1/2·(X − μ) per channel group,
    then a per-channel affine y = γ·X̂ + β (:func:`batch_whitening` with ``method="zca"``).
    Huang et al., CVPR 2018 (Algorithm 1; their default group size is 16)."""
    return _whitening("decorrelated_batch_norm", input, running_mean, running_cov, weight, bias, training, momentum,
                      eps, "zca", group_size, 5, "batch", None, num_batches_tracked, "affine")


decorrelated_batch_norm.defbackward(_whitening_backward)


def _monotone_invariant() -> Invariant:
    """Invariant (survey §5.1.2, IterNorm "stretches the dimensions along the eigenvectors
    progressively"): the eigenvalues of W_T·Σ·W_Tᵀ increase monotonically with T and stay ≤ 1."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        if not a["training"]:
            return None
        x = _np.asarray(to_numpy(a["input"]), _np.float64)
        c = x.shape[1]
        gs = a.get("group_size") or c
        xv = x.reshape(x.shape[0], c // gs, gs, -1)
        xc = xv - xv.mean(axis=(0, 3), keepdims=True)
        sig = _np.einsum("ngim,ngjm->gij", xc, xc) / (xv.shape[0] * xv.shape[3]) + a["eps"] * _np.eye(gs)
        prev, worst = None, 0.0
        for t in range(1, a["iterations"] + 3):
            wm = _np_matrix("iternorm", sig, t)
            ev = _np.linalg.eigvalsh(wm @ sig @ _np.swapaxes(wm, -1, -2))
            worst = max(worst, float(_np.max(ev - 1.0)))
            if prev is not None:
                worst = max(worst, float(_np.max(prev - ev)))  # a decrease is a violation
            prev = ev
        return max(worst, 0.0)

    return Invariant("IterNorm: eigenvalues of W_T·Σ·W_Tᵀ increase with T toward 1", check, scale=64.0)


@method(
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.1.2 (IterNorm: Newton's iterations for Σ^-1/2)",
    paper="Huang, Zhou, Zhu, Liu & Shao, Iterative Normalization, CVPR 2019",
    examples=_ex_preset("iternorm"),
    invariants=(_monotone_invariant(),),
)
def iter_norm(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    group_size: int | None = None,
    iterations: int = 5,
    *,
    num_batches_tracked: int | None = None,
):
    """Iterative normalization: X̂ = (P_T/√tr Σ)·(X − μ), P_0 = I, P_k = ½(3·P_{k−1} − P_{k−1}³·Σ/tr Σ),
    then y = γ·X̂ + β (:func:`batch_whitening` with ``method="iternorm"``). The running covariance is
    kept and W recomputed from it at inference (the paper keeps a running W instead; survey §5.3.2).
    The uncoupled iteration is numerically unstable once converged (errors grow by up to κ(Σ)/2 per
    step): keep T small, as the paper does, or use ``batch_whitening(method="newton_schulz")``, the
    same polynomial computed stably (:func:`normref.matfun.newton_inv_sqrt_forward`).
    Huang et al., CVPR 2019 (Algorithm 1; T = 5 is their default)."""
    return _whitening("iter_norm", input, running_mean, running_cov, weight, bias, training, momentum, eps,
                      "iternorm", group_size, iterations, "batch", None, num_batches_tracked, "affine")


iter_norm.defbackward(_whitening_backward)


def _ex_coloring(rng):
    x = rng.standard_normal((6, 4, 3)) + 1.0
    x[:, 0] -= 0.6 * x[:, 3]
    gam = rng.standard_normal((2, 2, 2))
    yield Example((x, None, None, gam, rng.standard_normal(4)), dict(training=True, group_size=2),
                  label="zca + coloring, groups of 2", cond=_cov_cond(x, 2))
    gam4 = rng.standard_normal((1, 4, 4))
    yield Example((x, None, None, gam4), dict(training=True, method="cholesky"),
                  label="cholesky + coloring (Siarohin et al.)", cond=_cov_cond(x, 4))
    rm = rng.standard_normal(4) * 0.1
    yield Example((x, rm, _np.eye(4)[None] * 1.5, gam4, rng.standard_normal(4)), dict(training=False),
                  label="inference", cond=4.0)


@method(
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.2 (coloring recovery: a learnable d×d matrix, NRR)",
    paper="Siarohin, Sangineto & Sebe, Whitening and Coloring Batch Transform for GANs, ICLR 2019",
    examples=_ex_coloring,
)
def whitening_coloring(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    method: str = "cholesky",
    group_size: int | None = None,
    iterations: int = 5,
    *,
    num_batches_tracked: int | None = None,
):
    """Whitening and coloring: X̃ = Γ_g·X̂_g + β, X̂ the batch whitening of :func:`batch_whitening`.

    ``weight`` holds the coloring matrices Γ, one per group, shape (C/group_size, group_size,
    group_size) (Siarohin et al.'s learnable d×d matrix; ``None`` skips it), ``bias`` is β per
    channel. Default ``method="cholesky"`` as in the paper. dΓ_g = Σ_n G_g·X̂_gᵀ, dX̂_g = Γ_gᵀ·G_g.
    Siarohin et al., ICLR 2019.
    """
    return _whitening("whitening_coloring", input, running_mean, running_cov, weight, bias, training, momentum, eps,
                      method, group_size, iterations, "batch", None, num_batches_tracked, "coloring")


whitening_coloring.defbackward(_whitening_backward)


# --------------------------------------------------------------------------------------------------
# the whitening matrix itself (the NOP's core, exposed so its backward is checked on its own)


def _ex_matrix(rng):
    def spd(d, lam):
        q, _ = _np.linalg.qr(rng.standard_normal((d, d)))
        return (q * _np.asarray(lam, _np.float64)) @ q.T

    a = _np.stack([spd(3, [0.5, 1.3, 2.9]), spd(3, [0.2, 1.0, 4.0])])
    for meth in WHITENING_METHODS:
        yield Example((a,), dict(method=meth), label=f"{meth}, separated spectra", cond=20.0)
    # a wider spectrum (κ = 40); much wider ones (κ = 1e6) need a finite-difference step scaled to
    # λ_min, which the generic suite does not take: tests/test_whitening.py checks them with one.
    b = spd(4, [0.05, 0.3, 1.0, 2.0])[None]
    yield Example((b,), dict(method="zca"), label="zca, κ = 40", cond=40.0)
    yield Example((b,), dict(method="cholesky"), label="cholesky, κ = 40", cond=40.0)
    yield Example((a,), dict(method="iternorm", iterations=1), label="iternorm T=1", cond=20.0)


@method(
    array_params=("cov",),
    survey="§5.1.2 Eqn 23 (the whitening matrix Φ(Σ))",
    paper="Huang et al., CVPR 2018 (ZCA, PCA); Siarohin et al., ICLR 2019 (Cholesky); Huang et al., CVPR 2019 (IterNorm)",
    examples=_ex_matrix,
)
def whitening_matrix(cov: Any, method: str = "zca", iterations: int = 5):
    """The whitening matrix W of sym(Σ) for each matrix of ``cov`` (..., d, d), one batched call.

    zca: Σ^-1/2 = D·Λ^-1/2·Dᵀ; pca: Λ^-1/2·Dᵀ; cholesky: L^-1; iternorm / newton_schulz: T =
    ``iterations`` Newton steps on Σ/tr Σ, divided by √tr Σ (:mod:`normref.matfun`). The gradient
    is symmetric: W reads sym(Σ) = (Σ + Σᵀ)/2. Raises ``ValueError`` if Σ is not positive definite
    (zca, pca, cholesky: eigenvalues or pivots above d·ε_dtype·max) or has zero trace (Newton).
    """
    fn = "whitening_matrix"
    xp = namespace(fn, cov=cov)
    check_ndim(fn, "cov", cov, min_ndim=2, what="(..., d, d)")
    if cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{fn}: cov must be square in its last two axes (..., d, d); got shape {tuple(cov.shape)}")
    method = _check_method(fn, method)
    iterations = check_int(fn, "iterations", iterations, minimum=1)
    cd = compute_dtype(xp, cov.dtype)
    s = to_compute(xp, cov, cd)
    w, wres = _matrix_forward(fn, xp, s, method, iterations, 0.0)
    return _out(xp, w, cov.dtype), Residuals(tuple(wres), method)


@whitening_matrix.defbackward
def _whitening_matrix_backward(res: Residuals, g):
    xp = namespace("whitening_matrix.backward", cotangent=g)
    g = to_compute(xp, g, res.arrays[0].dtype)
    return (_mf.whitening_matrix_backward(xp, res.arrays, g, res.static),)


# --------------------------------------------------------------------------------------------------
# style transfer: AdaIN and WCT (instance partition)


def _ex_adain(rng):
    yield Example((rng.standard_normal((2, 3, 4, 3)) + 1.0, rng.standard_normal((2, 3, 5, 2)) * 2.0 - 0.5), {},
                  label="different spatial sizes")
    yield Example((rng.standard_normal((1, 2, 6)), rng.standard_normal((1, 2, 6))), dict(eps=1e-3), label="1-d, eps 1e-3")


def _check_style(fn, content, style):
    check_ndim(fn, "content", content, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    check_ndim(fn, "style", style, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    if tuple(style.shape[:2]) != tuple(content.shape[:2]):
        raise ValueError(
            f"{fn}: style must have content's (N, C) = {tuple(content.shape[:2])}; got style of shape {tuple(style.shape)}"
        )


@method(
    array_params=("content", "style"),
    survey="§5.2 (generated affine recovery: γ, β from another input) and §8.4 (style transfer)",
    paper="Huang & Belongie, Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization, ICCV 2017",
    examples=_ex_adain,
)
def adain(content: Any, style: Any, eps: float = 1e-5):
    """Adaptive instance normalization: y = σ_s·(x − μ_c)/σ_c + μ_s.

    μ, σ per sample and channel over the spatial axes, σ = √(mean((x − μ)²) + ε) (biased variance, ε
    inside the root, as in the paper's Eqn 8; the authors' code uses the unbiased variance). content
    and style share (N, C); their spatial sizes may differ. Backward: with x̂ = (x − μ_c)/σ_c,
    ŝ = (s − μ_s)/σ_s and G' = σ_s·G, dx = (G' − mean(G') − x̂·mean(G'·x̂))/σ_c,
    ds = (Σ G·x̂ · ŝ + Σ G)/M_s. Huang & Belongie, ICCV 2017.
    """
    fn = "adain"
    xp = namespace(fn, content=content, style=style)
    _check_style(fn, content, style)
    eps = check_positive(fn, "eps", eps)
    cd = compute_dtype(xp, content.dtype)
    x = xp.reshape(to_compute(xp, content, cd), (content.shape[0], content.shape[1], -1))
    s = xp.reshape(to_compute(xp, style, cd), (style.shape[0], style.shape[1], -1))
    if x.shape[2] < 2 or s.shape[2] < 2:
        raise ValueError(f"{fn}: expected more than 1 spatial position in content and style; got {tuple(content.shape)}, {tuple(style.shape)}")

    def std(t):
        mu = xp.mean(t, axis=2, keepdims=True)
        tc = t - mu
        sd = xp.sqrt(xp.mean(tc * tc, axis=2, keepdims=True) + eps)
        return mu, tc / sd, sd

    _, xhat, sd_c = std(x)
    mu_s, shat, sd_s = std(s)
    y = xp.reshape(sd_s * xhat + mu_s, tuple(content.shape))
    res = Residuals((xhat, sd_c, shat, sd_s), (tuple(content.shape), tuple(style.shape)))
    return _out(xp, y, content.dtype), res


@adain.defbackward
def _adain_backward(res: Residuals, g):
    xp = namespace("adain.backward", cotangent=g)
    xhat, sd_c, shat, sd_s = res.arrays
    cshape, sshape = res.static
    g = xp.reshape(to_compute(xp, g, xhat.dtype), xhat.shape)
    gx = g * sd_s
    dx = (gx - xp.mean(gx, axis=2, keepdims=True) - xhat * xp.mean(gx * xhat, axis=2, keepdims=True)) / sd_c
    dsd = xp.sum(g * xhat, axis=2, keepdims=True)
    dmu = xp.sum(g, axis=2, keepdims=True)
    ds = (dsd * shat + dmu) / shat.shape[2]
    return xp.reshape(dx, cshape), xp.reshape(ds, sshape)


def _ex_wct(rng):
    c = rng.standard_normal((2, 3, 4, 4))
    c[:, 1] += 0.5 * c[:, 0]
    s = rng.standard_normal((2, 3, 5, 3)) * 1.5 + 0.5
    s[:, 2] -= 0.8 * s[:, 1]
    yield Example((c, s), {}, label="full channel whitening", cond=100.0)
    yield Example((c[:, :2], s[:, :2]), dict(alpha=0.6, eps=1e-3), label="alpha = 0.6", cond=100.0)
    c4 = rng.standard_normal((1, 4, 9))
    s4 = rng.standard_normal((1, 4, 7))
    yield Example((c4, s4), dict(group_size=2), label="groups of 2", cond=100.0)


@method(
    array_params=("content", "style"),
    survey="§8.4 (style transfer: whitening and coloring of instance statistics)",
    paper="Li, Fang, Yang, Wang, Lu & Yang, Universal Style Transfer via Feature Transforms, NeurIPS 2017",
    examples=_ex_wct,
)
def wct(content: Any, style: Any, alpha: float = 1.0, eps: float = 1e-5, group_size: int | None = None):
    """Whitening and coloring transform: y = α·(Σ_s^1/2·Σ_c^-1/2·(x − μ_c) + μ_s) + (1 − α)·x.

    Per sample (the instance partition) and group of ``group_size`` channels (``None``: all):
    Σ = Xc·Xcᵀ/M + ε·I (biased, ε added; Li et al. use M − 1 and drop small eigenvalues instead),
    Σ_c^-1/2 by ZCA and Σ_s^1/2 by the symmetric square root, both through ``eigh`` with the Loewner
    backward, so gradients reach content and style exactly even at equal eigenvalues.
    Li et al., NeurIPS 2017.
    """
    fn = "wct"
    xp = namespace(fn, content=content, style=style)
    _check_style(fn, content, style)
    eps = _eps(fn, eps)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{fn}: alpha must be a number in [0, 1]; got {alpha!r}")
    alpha = float(alpha)
    n, c = content.shape[:2]
    gs = _check_group_size(fn, group_size, c, "content.shape[1]")
    mc = math.prod(content.shape[2:])
    ms = math.prod(style.shape[2:])
    if mc < 2 or ms < 2:
        raise ValueError(f"{fn}: expected more than 1 spatial position in content and style; got {tuple(content.shape)}, {tuple(style.shape)}")
    cd = compute_dtype(xp, content.dtype)
    x = to_compute(xp, content, cd)
    sv = xp.reshape(to_compute(xp, style, cd), (n, c // gs, gs, ms))
    xv = xp.reshape(x, (n, c // gs, gs, mc))
    yhat, xc, w, wres, _, _ = _whiten_forward(fn, xp, xv, False, eps, "zca", 1)
    mu_s = xp.mean(sv, axis=3, keepdims=True)
    sc = sv - mu_s
    sig_s = _covariance(xp, sc, False) + eps * _mf.eye_like(xp, w)
    eig_s = _mf.eigh(xp, sig_s)
    if _mf.min_eigenvalue_ok(xp, eig_s[0], 0.0 if eps > 0 else gs * float(xp.finfo(cd).eps)) is False:
        raise ValueError(f"{fn}: the style covariance (+ eps·I, eps={eps}) of a group is not positive definite; pass eps > 0")
    a, ares = _mf.sqrt_eigh_forward(xp, sig_s, eig_s)
    y = xp.reshape(xp.matmul(a, yhat) + mu_s, tuple(content.shape))
    if alpha != 1.0:
        y = alpha * y + (1.0 - alpha) * x
    res = Residuals((xc, w, sc, a, yhat) + tuple(wres) + tuple(ares),
                    (tuple(content.shape), tuple(style.shape), alpha, len(wres)))
    return _out(xp, y, content.dtype), res


@wct.defbackward
def _wct_backward(res: Residuals, g):
    xp = namespace("wct.backward", cotangent=g)
    xc, w, sc, a, yhat = res.arrays[:5]
    cshape, sshape, alpha, nw = res.static
    wres = res.arrays[5:5 + nw]
    ares = res.arrays[5 + nw:]
    g = to_compute(xp, g, xc.dtype)
    gv = alpha * xp.reshape(g, xc.shape)
    # y = A·Ŷ + μ_s: dA = G·Ŷᵀ, dŶ = Aᵀ·G, dμ_s = Σ_M G
    da = xp.matmul(gv, _mf.mT(xp, yhat))
    dyhat = xp.matmul(_mf.mT(xp, a), gv)
    dxv = _whiten_backward(xp, "zca", False, False, xc, w, wres, dyhat)
    ms = sc.shape[3]
    dsig = _mf.sqrt_eigh_backward(xp, ares, da)  # symmetric
    dsc = (2.0 / ms) * xp.matmul(dsig, sc)
    ds = dsc - xp.mean(dsc, axis=3, keepdims=True) + xp.sum(gv, axis=3, keepdims=True) / ms
    dx = xp.reshape(dxv, cshape)
    if alpha != 1.0:
        dx = dx + (1.0 - alpha) * g
    return dx, xp.reshape(ds, sshape)
