"""Normalizing weights (survey §6): re-parameterizations W = ψ(V) with analytic backwards to the proxy V,
soft-orthogonality penalties, and cosine normalization.

A weight is a matrix (d_out, d_in) or a convolution kernel (d_out, d_in, k...) flattened per output
neuron: row i is neuron i's input weight W_i ∈ R^{d_in·k...} (survey §6, Eqn 28). Every method here is a
registered :class:`~normref.registry.Method`; the gradient it returns for V is the re-parameterization's
backward (survey §6.2, "Re-Parameterization"): ∂L/∂V = (∂W/∂V)ᵀ·∂L/∂W.

Notation for one row v (n = fan-in elements), ĉ the normalized row, dŵ the cotangent:

- unit rows (WN, survey Eqn 29): ŵ = v/‖v‖;     dv = (dŵ − ŵ·⟨ŵ, dŵ⟩)/‖v‖.
- centred unit rows (CWN, Eqn 30): c = v − mean(v), ŵ = c/‖c‖; dc as above, dv = dc − mean(dc).
- standardized rows (WS): the standardization operation of :mod:`normref.operation` on each row.
- orthogonal rows (OWN, ONI, Eqn 31): W = Σ^-1/2·Vc, Σ = Vc·Vcᵀ, through :mod:`normref.matfun`.
- spectral norm: W/σ with σ = uᵀ·W·v, u and v power-iteration constants.

The scale invariance of the proxy (survey Eqns 32-33), ψ(a·V) = ψ(V) for a > 0, so that ∂L/∂V at a·V
is (1/a)·∂L/∂V at V and ⟨∂L/∂V, V⟩ = 0, holds exactly for WN, CWN, spectral norm, OWN and ONI (eps = 0),
row by row for cosine normalization, up to the ε term for weight standardization and cosine
normalization (relative effect ε/σ²), and not for the penalty.

Zero rows (and an all-zero proxy) have no direction: methods without an eps raise ``ValueError``
naming the row when the values are concrete (under ``jax.jit`` or ``torch.func`` tracing there is no
Python boolean to test, the check is skipped and the result is inf/NaN as in torch); methods with an
eps say in their docstring what a zero row gives.

Return annotations state what calling a method returns (its public signature: an array, or
:class:`SpectralNormResult`); the decorated function itself returns that together with its
:class:`~normref.registry.Residuals`, the registry's forward convention.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as _np

from . import matfun as _mf
from . import operation as _op
from ._validate import check_bool, check_choice, check_int, check_nonnegative, check_positive, concrete_any
from ._results import result_tuple
from ._xp import compute_dtype, device_of, is_lazy, namespace, to_compute, to_numpy
from .registry import Example, Invariant, Residuals, method

__all__ = [
    "SpectralNormResult",
    "weight_norm",
    "centered_weight_norm",
    "weight_standardization",
    "spectral_norm",
    "orthogonal_weight_norm",
    "oni",
    "orthogonal_penalty",
    "cosine_norm",
]


# --------------------------------------------------------------------------------------------------
# shared helpers


def _out(xp, y, dtype):
    return y if y.dtype == dtype else xp.astype(y, dtype)


def _required(fn: str, **arrays) -> None:
    """A required array argument given as ``None``: TypeError naming it (before anything reads it)."""
    for name, a in arrays.items():
        if a is None:
            raise TypeError(f"{fn}: {name} must be an array; got None")


def _check_weight(fn: str, name: str, v) -> None:
    """A weight has at least 2 dimensions: (d_out, d_in, k...)."""
    if v.ndim < 2:
        raise ValueError(
            f"{fn}: {name} must have at least 2 dimensions (d_out, d_in, *kernel); got {v.ndim} "
            f"dimensions, shape {tuple(v.shape)}"
        )
    if any(s == 0 for s in v.shape):
        raise ValueError(f"{fn}: {name} must not be empty; got shape {tuple(v.shape)}")


def _check_dim(fn: str, dim, ndim: int, allow_none: bool = False) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        what = "an integer or None" if allow_none else "an integer"
        raise TypeError(f"{fn}: dim must be {what}; got {type(dim).__name__} {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{fn}: dim must lie in [{-ndim}, {ndim - 1}] for a {ndim}-dimensional weight; got {dim}")
    return dim % ndim


# value checks on concrete arrays only (skipped under tracing and on lazy arrays): one helper for
# the whole package
_concrete_any = concrete_any


def _first_zero(xp, norms) -> int:
    """Index (in flattened order) of the first zero entry of ``norms`` (called only after a hit)."""
    return int(_np.flatnonzero(to_numpy(norms).reshape(-1) == 0)[0])


def _rows(xp, v):
    """The weight as a (d_out, fan_in) matrix (row i = neuron i's input weight)."""
    return xp.reshape(v, (v.shape[0], -1))


def _norms(xp, v, axes):
    """‖v‖ over ``axes`` (keepdims)."""
    return xp.sqrt(xp.sum(v * v, axis=axes, keepdims=True))


def _safe_norms(xp, v, axes):
    """‖v‖ over ``axes`` (keepdims), right where Σv² under- or overflows: when a concrete norm comes out 0
    or inf for a slice that is nonzero and finite (|v| ≲ 1e-23 or ≳ 1e19 in float32), the norms are
    recomputed as a·‖v/a‖ with a = max|v| per slice. Elsewhere (and under tracing) it is ``_norms``; on a
    lazy (dask) array both are formed and selected per slice."""
    n = _norms(xp, v, axes)
    fi = xp.finfo(v.dtype)
    # Σv² below tiny/ε has lost digits to subnormal squares (or is 0); inf: it overflowed
    bad = xp.logical_or(n < math.sqrt(float(fi.smallest_normal) / float(fi.eps)), xp.isinf(n))
    # a lazy (dask) array cannot be inspected: the rescued norms are always built into its graph (the
    # ``where`` keeps n wherever it is fine, so the values are NumPy's)
    if not is_lazy(v) and not _concrete_any(xp, bad, refusal=False):
        return n
    a = xp.max(xp.abs(v), axis=axes, keepdims=True)
    ok = xp.logical_and(bad, xp.logical_and(a > 0, xp.isfinite(a)))
    a = xp.where(ok, a, xp.ones_like(a))
    return xp.where(ok, a * _norms(xp, v / a, axes), n)


def _unit_backward(xp, what, n, axes, g):
    """Backward of ŵ = v/‖v‖: dv = (g − ŵ·⟨ŵ, g⟩)/‖v‖ (the projection onto ŵ's orthogonal complement)."""
    return (g - what * xp.sum(g * what, axis=axes, keepdims=True)) / n


def _np_rows(a):
    a = _np.asarray(to_numpy(a), dtype=_np.float64)
    return a.reshape(a.shape[0], -1)


def _rel(a, b) -> float:
    a, b = _np.asarray(to_numpy(a), _np.float64), _np.asarray(to_numpy(b), _np.float64)
    return float(_np.max(_np.abs(a - b)) / max(1.0, float(_np.max(_np.abs(b)))))


def scale_invariant(a: float = 3.5, index: int = 0, applies: "Callable[[dict], bool] | None" = None) -> Invariant:
    """Invariant (survey Eqn 32): ψ(a·V) = ψ(V) for a > 0 (argument ``index`` scaled); ``applies(kwargs)``
    says whether a call is exactly scale invariant (an eps added to a Gram matrix breaks it)."""

    def check(m, xp, out, args, kwargs):
        if applies is not None and not applies(kwargs):
            return None
        args2 = list(args)
        args2[index] = args[index] * a
        return _rel(m.primary(m(*args2, **kwargs)), m.primary(out))

    return Invariant("scale invariance ψ(a·V) = ψ(V)", check, scale=64.0)


# --------------------------------------------------------------------------------------------------
# weight normalization (Salimans & Kingma 2016), torch's weight-norm parametrization


def _g_shape(shape, dim):
    """torch's shape of g: the size along ``dim``, 1 elsewhere (dim None: a scalar per tensor)."""
    return tuple(s if i == dim else 1 for i, s in enumerate(shape)) if dim is not None else ()


def _ex_weight_norm(rng):
    for shape, dim in [((4, 3), 0), ((5, 3, 2, 2), 0), ((3, 4, 3), 1), ((3, 5), -1), ((4, 2, 3), None)]:
        v = rng.standard_normal(shape)
        d = None if dim is None else dim % len(shape)
        g = rng.standard_normal(_g_shape(shape, d) if d is not None else (1,) * len(shape))
        yield Example((v, g), dict(dim=dim), label=f"{shape} dim={dim}")
    v = rng.standard_normal((6, 4))
    yield Example((v, rng.uniform(0.5, 2.0, 6)), dict(dim=0), label="(6, 4) g as a vector (d_out,)")
    yield Example((v * 1e3, rng.standard_normal((6, 1))), dict(dim=0), label="large proxy", cond=1.0)


def _wn_row_norms(m, xp, out, args, kwargs):
    g = args[1]
    dim = kwargs.get("dim", 0)
    w = _np.asarray(to_numpy(m.primary(out)), _np.float64)
    gg = _np.abs(_np.asarray(to_numpy(g), _np.float64))
    if dim is None:
        return abs(float(_np.linalg.norm(w)) - float(gg.reshape(()))) / max(1.0, float(gg.reshape(())))
    d = dim % w.ndim
    wm = _np.moveaxis(w, d, 0).reshape(w.shape[d], -1)
    return float(_np.max(_np.abs(_np.linalg.norm(wm, axis=1) - gg.reshape(-1))) / max(1.0, float(gg.max())))


@method(
    array_params=("v", "g"),
    category="weight",
    survey="§6.1 Eqn 29 (constraint), §6.2 re-parameterization",
    paper="Salimans & Kingma, Weight Normalization, NeurIPS 2016",
    examples=_ex_weight_norm,
    invariants=(
        Invariant("row norms equal |g|", _wn_row_norms, scale=64.0),
        scale_invariant(),
    ),
)
def weight_norm(v: Any, g: Any, dim: int | None = 0) -> Any:
    """Weight normalization: w = g·v/‖v‖, the norm over every axis but ``dim`` (survey Eqn 29).

    The same result as ``torch._weight_norm(v, g, dim)``, i.e. torch's
    ``torch.nn.utils.parametrizations.weight_norm`` with ``original0 = g``, ``original1 = v``.
    A negative ``dim`` counts from the end, as everywhere in Python (torch's own ``dim=-1`` means
    "whole tensor"; here that is ``dim=None``).

    Backward: dg = ⟨dw, v̂⟩ (summed over the normalized axes), dv = g·(dw − v̂·⟨dw, v̂⟩)/‖v‖.
    A tiny or huge slice (Σv² under/overflowing, e.g. ``|v| ≲ 1e-19`` or ``≳ 1e19`` in float32) has its
    norm computed as a·‖v/a‖, a = max|v|.

    Parameters
    ----------
    v : array
        The direction.
    g : array
        The magnitude: torch's shape (the size of ``dim``, 1 elsewhere: ``(d_out, 1, ...)`` for
        ``dim=0``) or the vector ``(v.shape[dim],)``; its gradient comes back in its own shape. With
        ``dim=None`` a scalar (0-d or all-ones shape).
    dim : int or None, default 0
        The axis kept; ``None``: the norm of the whole tensor.

    Returns
    -------
    w : array
        The weight, v's shape.

    Raises
    ------
    ValueError
        For a zero slice of v (no direction; torch returns NaN).

    Notes
    -----
    Survey §6.1, Eqn 29.

    References
    ----------
    .. [1] T. Salimans and D. P. Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate
       Training of Deep Neural Networks", NeurIPS 2016.
    """
    fn = "weight_norm"
    _required(fn, v=v, g=g)
    xp = namespace(fn, v=v, g=g)
    _check_weight(fn, "v", v)
    shape = tuple(v.shape)
    if dim is None:
        axes = tuple(range(v.ndim))
        if g.ndim > v.ndim or any(s != 1 for s in g.shape):
            raise ValueError(f"{fn}: with dim=None, g must hold one value (shape () or all ones); got shape {tuple(g.shape)}")
    else:
        dim = _check_dim(fn, dim, v.ndim, allow_none=True)
        axes = tuple(i for i in range(v.ndim) if i != dim)
        keep = _g_shape(shape, dim)
        if tuple(g.shape) not in (keep, (shape[dim],)):
            raise ValueError(
                f"{fn}: g must have shape {keep} (torch's) or {(shape[dim],)} (one value per slice along "
                f"dim={dim} of v with shape {shape}); got shape {tuple(g.shape)}"
            )
    cd = compute_dtype(xp, v.dtype)
    vc = to_compute(xp, v, cd)
    gb = xp.reshape(to_compute(xp, g, cd), _g_shape(shape, dim) if dim is not None else (1,) * v.ndim)
    n = _safe_norms(xp, vc, axes)  # right for tiny (≤ 1e-23 float32) and huge slices too
    if _concrete_any(xp, n == 0):
        raise ValueError(f"{fn}: v has a zero slice (index {_first_zero(xp, n)} along dim={dim}); its direction is undefined")
    vhat = vc / n
    w = gb * vhat
    return _out(xp, w, v.dtype), Residuals((vhat, n, gb), (axes, tuple(g.shape)))


@weight_norm.defbackward
def _weight_norm_backward(res, dw):
    vhat, n, gb = res.arrays
    axes, gshape = res.static
    xp = namespace("weight_norm.backward", cotangent=dw)
    dw = to_compute(xp, dw, vhat.dtype)
    dg = xp.sum(dw * vhat, axis=axes, keepdims=True)
    dv = _unit_backward(xp, vhat, n, axes, gb * dw)
    return dv, xp.reshape(dg, gshape)


# --------------------------------------------------------------------------------------------------
# centered weight normalization (Huang et al., ICCV 2017)


def _ex_cwn(rng):
    for shape in [(4, 5), (3, 2, 3, 3), (6, 4, 2)]:
        v = rng.standard_normal(shape) + 0.5
        yield Example((v,), {}, label=f"{shape} no scale")
        yield Example((v, rng.standard_normal(shape[0])), {}, label=f"{shape} with g")
    # ε: the authors' PyTorch module (‖c‖ + 1e-5) and their Torch7 one (√(‖c‖² + 1e-4)); rows of norm
    # ~0.1 so that ε changes the result measurably (ε/‖c‖ ~ 1e-4 … 1e-2)
    for placement, eps in (("outside", 1e-5), ("inside", 1e-4), ("outside", 1e-2)):
        v = rng.standard_normal((4, 3, 2)) * 0.05
        yield Example((v, rng.standard_normal(4)), dict(eps=eps, eps_placement=placement),
                      label=f"(4, 3, 2) eps={eps} {placement}")
    v = rng.standard_normal((3, 4))
    v[1] = 0.7  # a constant row: with ε > 0 it gives a zero row of W (no error)
    yield Example((v,), dict(eps=1e-3, eps_placement="inside"), label="(3, 4) constant row, eps inside")


def _cwn_rows(m, xp, out, args, kwargs):
    """Rows have mean 0 and norm |g|·‖c‖/d, d = ‖c‖ (eps = 0), ‖c‖ + ε or √(‖c‖² + ε)."""
    w = _np_rows(m.primary(out))
    g = args[1] if len(args) > 1 else kwargs.get("g")
    gg = _np.ones(w.shape[0]) if g is None else _np.abs(_np.asarray(to_numpy(g), _np.float64).reshape(-1))
    eps = kwargs.get("eps", 0.0)
    if eps:
        c = _np_rows(args[0])
        n = _np.linalg.norm(c - c.mean(axis=1, keepdims=True), axis=1)
        d = n + eps if kwargs.get("eps_placement", "outside") == "outside" else _np.sqrt(n * n + eps)
        gg = gg * n / d
    err = float(_np.max(_np.abs(w.mean(axis=1))))
    return max(err, float(_np.max(_np.abs(_np.linalg.norm(w, axis=1) - gg)) / max(1.0, float(gg.max()))))


EPS_PLACEMENTS = ("outside", "inside")


def _check_row_gain(fn, g, d_out, ndim):
    if g is None:
        return
    ok = (d_out,) + (1,) * (ndim - 1)
    if tuple(g.shape) not in ((d_out,), ok):
        raise ValueError(
            f"{fn}: g must have shape ({d_out},) or {ok} (one scale per output neuron); got shape {tuple(g.shape)}"
        )


@method(
    array_params=("v", "g"),
    category="weight",
    survey="§6.1 Eqn 30 (zero-mean, unit-norm rows), §6.2 re-parameterization",
    paper="Huang, Liu, Lang & Tao, Centered Weight Normalization in Accelerating Training of Deep Neural Networks, ICCV 2017",
    examples=_ex_cwn,
    invariants=(
        Invariant("rows have mean 0 and norm |g|", _cwn_rows, scale=64.0),
        scale_invariant(applies=lambda kw: not kw.get("eps")),
    ),
)
def centered_weight_norm(v: Any, g: Any = None, eps: float = 0.0, eps_placement: str = "outside") -> Any:
    """Centered weight normalization: w_i = g_i·(v_i − mean(v_i))/‖v_i − mean(v_i)‖ for each output row.

    Survey Eqn 30: W_iᵀ·1 = 0 and ‖W_i‖ = 1; the optional per-neuron scale g recovers capacity (§6.1).
    Rows are the fan-in of each output neuron (all axes but 0).

    Backward: with ŵ = c/‖c‖, dc = (g·dw − ŵ·⟨ŵ, g·dw⟩)/‖c‖ and dv = dc − mean(dc) (the centering's
    backward). With ε > 0 (w = c/d below), dc = (g·dw − w·⟨c, g·dw⟩/r)/d, r = ‖c‖ (outside) or d
    (inside).

    Parameters
    ----------
    v : array, shape ``(d_out, ...)``
        The unnormalized weight.
    g : array or None, default None
        ``None`` (unit rows) or one value per row, shape ``(d_out,)`` or ``(d_out, 1, ...)``.
    eps : float, default 0.0
        ε ≥ 0 in the denominator d of w = c/d. The default 0 is the paper's Eqn 30 (d = ‖c‖, exactly
        unit rows, exactly scale invariant).
    eps_placement : str, default "outside"
        Where ε enters when ``eps > 0``: ``"outside"``, d = ‖c‖ + ε (the authors' PyTorch module,
        ``module_pytorch/CWN.py`` of huangleiBuaa/CenteredWN, with ε = 1e-5); ``"inside"``,
        d = √(‖c‖² + ε) (their Torch7 ``WeightNorm_Center``, ε = 1e-4). Either way rows have norm
        ``|g|·‖c‖/d < |g|`` and a constant row gives a zero row of W instead of an error.

    Returns
    -------
    w : array
        The weight, v's shape.

    Raises
    ------
    ValueError
        For a constant row (zero after centering) when ``eps = 0``.

    Notes
    -----
    Survey §6.1, Eqn 30. Conventions: the paper has no ε; the authors' released modules add one (see
    ``eps``). torch has no centered weight normalization.

    References
    ----------
    .. [1] L. Huang, X. Liu, Y. Liu, B. Lang and D. Tao, "Centered Weight Normalization in Accelerating
       Training of Deep Neural Networks", ICCV 2017.
    """
    fn = "centered_weight_norm"
    _required(fn, v=v)
    eps = check_nonnegative(fn, "eps", eps)
    eps_placement = check_choice(fn, "eps_placement", eps_placement, EPS_PLACEMENTS)
    xp = namespace(fn, v=v, g=g)
    _check_weight(fn, "v", v)
    _check_row_gain(fn, g, v.shape[0], v.ndim)
    cd = compute_dtype(xp, v.dtype)
    x = _rows(xp, to_compute(xp, v, cd))
    c, _, _ = _op.Centering().forward(xp, x, (1,))
    if eps > 0 and eps_placement == "inside":
        # d = √(‖c‖² + ε), ∂d/∂c = c/d: formed from Σc² directly (smooth at a constant row, c = 0, also
        # for autograd); where Σc² overflows, as a·√(Σ(c/a)² + ε/a²) with a = max|c|
        s2 = xp.sum(c * c, axis=1, keepdims=True)
        d = xp.sqrt(s2 + eps)
        if _concrete_any(xp, xp.isinf(s2), refusal=False):
            a = xp.max(xp.abs(c), axis=1, keepdims=True)
            a = xp.where(a > 0, a, xp.ones_like(a))
            d = a * xp.sqrt(xp.sum((c / a) ** 2, axis=1, keepdims=True) + eps / (a * a))
        r = None  # r = d (one saved tensor, not the same one twice: torch.compile cannot wire a repeat)
    else:
        n = _safe_norms(xp, c, (1,))  # right for tiny (≤ 1e-23 float32) and huge rows too
        if eps == 0:
            if _concrete_any(xp, n == 0):
                raise ValueError(f"{fn}: row {_first_zero(xp, n)} of v is constant; after centering it has no "
                                 f"direction (eps > 0 maps it to a zero row)")
            d, r = n, None  # r = d (saved once)
        else:
            d, r = n + eps, n  # d = ‖c‖ + ε, ∂d/∂c = c/‖c‖
    what = c / d
    gb = None if g is None else xp.reshape(to_compute(xp, g, cd), (v.shape[0], 1))
    w = what if gb is None else gb * what
    w = xp.reshape(w, tuple(v.shape))
    return _out(xp, w, v.dtype), Residuals((what, c, d, r, gb),
                                           (tuple(v.shape), None if g is None else tuple(g.shape), eps))


@centered_weight_norm.defbackward
def _cwn_backward(res, dw):
    what, c, d, r, gb = res.arrays
    shape, gshape, eps = res.static
    xp = namespace("centered_weight_norm.backward", cotangent=dw)
    dw = xp.reshape(to_compute(xp, dw, what.dtype), what.shape)
    dg = None if gb is None else xp.reshape(xp.sum(dw * what, axis=1), gshape)
    gw = dw if gb is None else gb * dw
    if eps == 0:
        dc = _unit_backward(xp, what, d, (1,), gw)
    else:
        # ŵ = c/d(c): dc = gw/d − c·⟨c, gw⟩/d²·∂d/∂c-factor; ∂d/∂c = c/r (r = ‖c‖ outside, d inside), so
        # dc = (gw − ŵ·⟨c, gw⟩/r)/d. A zero row (c = 0, outside: r = 0) has ⟨c, gw⟩ = 0: the second term
        # is dropped there (a subgradient of ‖c‖ at 0), leaving dc = gw/ε.
        r = d if r is None else r
        safe = xp.where(r > 0, r, xp.ones_like(r))
        dc = (gw - what * xp.sum(c * gw, axis=1, keepdims=True) / safe) / d
    dv = _op.Centering().backward(xp, (), (1,), dc)
    return xp.reshape(dv, shape), dg


# --------------------------------------------------------------------------------------------------
# weight standardization (Qiao et al., 2019)


def _ex_ws(rng):
    for shape in [(4, 6), (3, 2, 3, 3), (5, 3, 4)]:
        yield Example((rng.standard_normal(shape) * 0.1 + 0.02,), dict(eps=1e-5), label=f"{shape} eps=1e-5")
        yield Example((rng.standard_normal(shape),), dict(eps=1e-3), label=f"{shape} eps=1e-3")
    # σ² ≈ 1e-3 ≪ ε = 1e-2: ε dominates (rows shrink towards 0). The function varies on the scale
    # √(σ²+ε) ≈ 0.1, kept ≫ the finite-difference step (6e-6): the truncation error of first and second
    # differences grows like (h/√(σ²+ε))² and beyond.
    yield Example((rng.standard_normal((3, 5)) * 3e-2,), dict(eps=1e-2), label="small rows (eps dominates)")
    # rows ≈ μ with deviations ~0.1 (|μ|/σ ≈ 20): x − μ carries an absolute error ~ε₆₄·|μ| which
    # 1/√(σ²+ε) ≈ 10 amplifies, so the output's error is ~10·|μ|·ε₆₄ rather than ε₆₄: cond = 32 (|μ| ≤ 2).
    yield Example((_np.ones((3, 4)) * _np.array([[1.0], [2.0], [-1.0]]) + rng.standard_normal((3, 4)) * 0.1,),
                  dict(eps=1e-5), label="large mean, small spread", cond=32.0)


def _ws_rows(m, xp, out, args, kwargs):
    """Rows have mean 0 and (biased) variance σ²/(σ² + ε) exactly."""
    v = _np_rows(args[0])
    w = _np_rows(m.primary(out))
    eps = kwargs.get("eps", 1e-5)
    var = v.var(axis=1)
    return max(float(_np.max(_np.abs(w.mean(axis=1)))), float(_np.max(_np.abs(w.var(axis=1) - var / (var + eps)))))


@method(
    array_params=("v",),
    category="weight",
    survey="§6.1 (WS: W_iᵀ·1 = 0, ‖W_i‖ = √fan_in), §6.2 re-parameterization",
    paper="Qiao, Wang, Liu, Shen & Yuille, Micro-Batch Training with Batch-Channel Normalization and Weight Standardization, arXiv 2019",
    examples=_ex_ws,
    invariants=(Invariant("rows have mean 0 and variance σ²/(σ²+ε)", _ws_rows, scale=64.0),),
)
def weight_standardization(v: Any, eps: float = 1e-5) -> Any:
    """Weight standardization: w_i = (v_i − μ_i)/√(σ_i² + ε) for each output row (fan-in of a neuron).

    μ_i and σ_i² are the mean and the *biased* variance over the row (all axes but 0), ε *inside* the
    square root: the convention of timm's ``StdConv2d`` and BiT (which call ``F.batch_norm`` on the
    rows). Qiao et al.'s reference code differs: unbiased standard deviation with ε added outside,
    ``(v − μ)/(std_unbiased + 1e-5)``; rows then have variance ≈ (n−1)/n instead of ≈ 1.
    Rows come out with mean 0 and variance σ²/(σ²+ε) (≈ 1, and ‖w_i‖ ≈ √fan_in). A constant row gives
    a zero row (ε > 0 is required; no NaN). The forward and the backward are the standardizing
    operation of :mod:`normref.operation` on each row (survey Eqn 17):
    dv = s·(dw − mean(dw) − ŵ·mean(dw·ŵ)), s = (σ²+ε)^-1/2.

    Parameters
    ----------
    v : array, shape ``(d_out, ...)``
        The unnormalized weight.
    eps : float, default 1e-5
        ε > 0, inside the square root.

    Returns
    -------
    w : array
        The weight, v's shape.

    Notes
    -----
    Survey §6.1 (weight normalization methods) and Eqn 17.

    References
    ----------
    .. [1] S. Qiao, H. Wang, C. Liu, W. Shen and A. Yuille, "Micro-Batch Training with Batch-Channel
       Normalization and Weight Standardization", arXiv:1903.10520, 2019.
    """
    fn = "weight_standardization"
    _required(fn, v=v)
    xp = namespace(fn, v=v)
    _check_weight(fn, "v", v)
    eps = check_positive(fn, "eps", eps)
    cd = compute_dtype(xp, v.dtype)
    op = _op.Standardizing(eps)
    w, op_res, _ = op.forward(xp, _rows(xp, to_compute(xp, v, cd)), (1,))
    return _out(xp, xp.reshape(w, tuple(v.shape)), v.dtype), Residuals(op_res, (tuple(v.shape), eps))


@weight_standardization.defbackward
def _ws_backward(res, dw):
    shape, eps = res.static
    xp = namespace("weight_standardization.backward", cotangent=dw)
    what = res.arrays[0]
    dw = xp.reshape(to_compute(xp, dw, what.dtype), what.shape)
    return (xp.reshape(_op.Standardizing(eps).backward(xp, res.arrays, (1,), dw), shape),)


# --------------------------------------------------------------------------------------------------
# spectral normalization (Miyato et al., ICLR 2018)


@result_tuple
class SpectralNormResult(NamedTuple):
    """The spectrally normalized weight and the power-iteration state after the call (no gradient).

    A ``NamedTuple`` ``(weight, u, v)``, not an array: ``result.weight`` is the normalized weight
    (the differentiable output); arithmetic on the tuple or an array attribute (``result.shape``)
    raises an error that says so.

    Attributes
    ----------
    weight : Array
        W_SN = W/σ, w's shape: the differentiable output.
    u : Array
        The updated left vector, shape ``(w.shape[dim],)``, of σ = uᵀ·W·v.
    v : Array
        The updated right vector, shape ``(fan,)`` (the other axes flattened).
    """

    weight: Any
    u: Any
    v: Any


def _to_matrix(xp, w, dim):
    """torch's ``_reshape_weight_to_matrix``: ``dim`` to the front, then flatten the rest."""
    if dim != 0:
        w = xp.permute_dims(w, (dim,) + tuple(d for d in range(w.ndim) if d != dim))
    return xp.reshape(w, (w.shape[0], -1))


def _l2_normalize(xp, x, eps):
    """``F.normalize(x, dim=0, eps)``: x / max(‖x‖, eps)."""
    n = xp.sqrt(xp.sum(x * x))
    return x / xp.maximum(n, xp.asarray(eps, dtype=x.dtype, device=device_of(x)))


def _power_iteration(xp, wm, u, v, n_iter, eps):
    """(u, v) after ``n_iter`` power-iteration steps on W (wm, the matrix layout), for σ = uᵀ·W·v.

    - v is None (the state is u; ``torch.nn.utils.spectral_norm``'s hook): each step is v = N(Wᵀ·u),
      u = N(W·v); with no step, v = N(Wᵀ·u).
    - v given (the state is (u, v); ``torch.nn.utils.parametrizations.spectral_norm``'s
      ``_power_method``): each step is u = N(W·v), v = N(Wᵀ·u); with no step, (u, v) as given.
    N(x) = x/max(‖x‖, eps). Both are the power method on WᵀW for v (on W·Wᵀ for u), started from
    a different end of the alternation.
    """
    wt = xp.matrix_transpose(wm)
    if v is None:
        v = _l2_normalize(xp, xp.matmul(wt, u), eps)
        for k in range(n_iter):
            if k:
                v = _l2_normalize(xp, xp.matmul(wt, u), eps)
            u = _l2_normalize(xp, xp.matmul(wm, v), eps)
        return u, v
    for _ in range(n_iter):
        u = _l2_normalize(xp, xp.matmul(wm, v), eps)
        v = _l2_normalize(xp, xp.matmul(wt, u), eps)
    return u, v


def _unit(rng, n):
    x = rng.standard_normal(n)
    return x / _np.linalg.norm(x)


def _ex_spectral(rng):
    for shape, dim, it in [((5, 4), 0, 1), ((4, 3, 2, 2), 0, 3), ((3, 4, 2), 1, 2), ((6, 3), -1, 1), ((4, 5), 0, 0)]:
        w = rng.standard_normal(shape)
        u = _unit(rng, shape[dim % len(shape)])
        yield Example((w, u), dict(n_power_iterations=it, dim=dim), label=f"{shape} dim={dim} iterations={it} (state u)")
    # the parametrization's state (u, v); ConvTranspose2d weights (d_in, d_out, k, k) use dim=1
    for shape, dim, it in [((5, 4), 0, 1), ((3, 4, 2, 2), 1, 2), ((4, 3, 2), 0, 3), ((4, 5), 0, 0)]:
        w = rng.standard_normal(shape)
        h = shape[dim]
        yield Example((w, _unit(rng, h)), dict(n_power_iterations=it, dim=dim, v=_unit(rng, w.size // h)),
                      label=f"{shape} dim={dim} iterations={it} (state u, v)")


def _spectral_top(m, xp, out, args, kwargs):
    """After enough power iterations the largest singular value is 1. The error decays like
    (σ₂/σ₁)^(2k): k is chosen from W's singular values (NumPy's SVD, an independent oracle) so that
    this truncation is below 1e-17, at least 200 and at most 20000 iterations."""
    import math

    w, u = args[0], args[1]
    dim = kwargs.get("dim", 0)
    wm = _np.asarray(to_numpy(w), _np.float64)
    wm = _np.moveaxis(wm, dim % wm.ndim, 0).reshape(wm.shape[dim % wm.ndim], -1)
    sv = _np.linalg.svd(wm, compute_uv=False)
    ratio = float(sv[1] / sv[0]) if sv.size > 1 and sv[0] > 0 else 0.0
    if ratio <= 0.0:
        k = 200
    elif ratio >= 1.0 - 1e-9:  # a repeated top singular value: any vector of its subspace gives σ₁
        k = 20000
    else:
        k = int(min(20000, max(200, math.ceil(math.log(1e-17) / (2.0 * math.log(ratio))))))
    ws = m.primary(m(w, u, n_power_iterations=k, dim=dim, v=kwargs.get("v")))
    a = _np.asarray(to_numpy(ws), _np.float64)
    a = _np.moveaxis(a, dim % a.ndim, 0).reshape(a.shape[dim % a.ndim], -1)
    return abs(float(_np.linalg.svd(a, compute_uv=False)[0]) - 1.0)


def _spectral_fd_target(args, kwargs):
    """The function the backward differentiates: W/σ with σ = uᵀ·W·v, u and v frozen at the call's values
    (computed here from the given arrays, in their own library, before any autodiff leaf is made)."""
    bound = spectral_norm.bind(*args, **kwargs)
    a = bound.arguments
    w, u, v = a["w"], a["u"], a["v"]
    xp = namespace("spectral_norm", w=w, u=u, v=v)
    dim = _check_dim("spectral_norm", a["dim"], w.ndim)
    uu, vv = _power_iteration(xp, _to_matrix(xp, w, dim), u, v, a["n_power_iterations"], a["eps"])

    def frozen(w2, *rest, **kw):
        sigma = xp.sum(uu * xp.matmul(_to_matrix(xp, w2, dim), vv))
        return w2 / sigma

    return frozen


@method(
    array_params=("w", "u", "v"),
    nondiff=("u", "v"),
    category="weight",
    survey="§6.1 (spectral normalization bounds the largest singular value by 1)",
    paper="Miyato, Kataoka, Koyama & Yoshida, Spectral Normalization for Generative Adversarial Networks, ICLR 2018",
    examples=_ex_spectral,
    invariants=(
        Invariant("largest singular value 1 after enough power iterations", _spectral_top, scale=64.0),
        scale_invariant(),
    ),
    fd_target=_spectral_fd_target,
)
def spectral_norm(w: Any, u: Any, n_power_iterations: int = 1, eps: float = 1e-12, dim: int = 0, *,
                  v: Any = None) -> SpectralNormResult:
    """Spectral normalization: W_SN = W/σ(W), σ = uᵀ·W·v estimated by power iteration.

    W is reshaped to a matrix with ``dim`` first (torch's ``_reshape_weight_to_matrix``: d_out rows for
    ``dim=0``; ``dim=1`` for transposed convolutions, whose weight is (d_in, d_out, k...)). N(x) =
    x/max(‖x‖, eps), ``F.normalize``'s eps convention (eps outside the root, a floor on the norm).
    The state, and so the order of the alternation, follows torch's two APIs:

    - ``v`` not given — the state is u, as ``torch.nn.utils.spectral_norm`` (the forward pre-hook):
      each of the ``n_power_iterations`` steps is v = N(Wᵀ·u), u = N(W·v); then σ = uᵀ·W·v.
      ``n_power_iterations=0`` takes v = N(Wᵀ·u) from the given u.
    - ``v`` given (keyword) — the state is (u, v), as ``torch.nn.utils.parametrizations.spectral_norm``
      (buffers ``_u``, ``_v``): each step is u = N(W·v), v = N(Wᵀ·u); then σ = uᵀ·W·v.
      ``n_power_iterations=0`` uses (u, v) as given: the evaluation mode of both torch APIs (the hook's
      eval mode also uses its stored ``weight_v``).

    Given torch's state before a call, the result equals torch's weight, its updated u and v (the
    hook's ``weight_u``/``weight_v`` buffers, or the parametrization's ``_u``/``_v``) and its
    gradient. Torch's parametrization initialises (u, v) from normalised Gaussians and 15 steps of the
    second form (``normref.backends.torch.parametrize.SpectralNorm`` does the same).

    u and v are constants of the backward, as in torch (their dependence on W is not differentiated):
    dW = dW_SN/σ − (⟨dW_SN, W⟩/σ²)·u·vᵀ. W is divided by a power of two first (with eps by the same:
    exact, the same u, v and W/σ), so tiny or huge weights (float32 ``|W| ≲ 1e-19`` or ``≳ 1e19``) are
    not lost to under/overflow of the norms.

    Parameters
    ----------
    w : array
        The weight W.
    u : array, shape ``(w.shape[dim],)``
        The left power-iteration vector (the state).
    n_power_iterations : int, default 1
        Power-iteration steps, at most ``normref.matfun.MAX_ITERATIONS`` (1000).
    eps : float, default 1e-12
        The floor on the norms N divides by.
    dim : int, default 0
        The axis of W that becomes the matrix's rows.
    v : array or None, shape ``(fan,)``, default None
        The right vector (keyword), fan = w.size/w.shape[dim]; given: the parametrization's state.

    Returns
    -------
    out : SpectralNormResult
        ``SpectralNormResult(weight, u, v)`` with the updated state (pure: the given arrays are
        untouched; carry u, or u and v, to the next call).

    Raises
    ------
    ValueError
        For σ = 0, saying why: a zero weight, a state orthogonal to W's range, or an eps above the
        norms N divides by (u and v then shrink by ‖·‖/eps each step until σ underflows).

    Notes
    -----
    Survey §6.1 (Miyato et al.'s Algorithm 1).

    References
    ----------
    .. [1] T. Miyato, T. Kataoka, M. Koyama and Y. Yoshida, "Spectral Normalization for Generative
       Adversarial Networks", ICLR 2018 (Algorithm 1).
    """
    fn = "spectral_norm"
    _required(fn, w=w, u=u)
    xp = namespace(fn, w=w, u=u, v=v)
    _check_weight(fn, "w", w)
    dim = _check_dim(fn, dim, w.ndim)
    if tuple(u.shape) != (w.shape[dim],):
        raise ValueError(
            f"{fn}: u must have shape ({w.shape[dim]},) (w.shape[dim] for dim={dim}, w of shape "
            f"{tuple(w.shape)}); got shape {tuple(u.shape)}"
        )
    fan = math.prod(w.shape) // w.shape[dim]
    if v is not None and tuple(v.shape) != (fan,):
        raise ValueError(
            f"{fn}: v must have shape ({fan},) (the product of w's axes other than dim={dim}, w of shape "
            f"{tuple(w.shape)}); got shape {tuple(v.shape)}"
        )
    n_power_iterations = _mf.check_iterations(fn, "n_power_iterations", n_power_iterations, minimum=0)
    eps = check_positive(fn, "eps", eps)
    cd = compute_dtype(xp, w.dtype)
    wc = to_compute(xp, w, cd)
    # W/σ and (u, v) are unchanged when W is divided by a > 0 and eps by a (N_eps(a·x) = N_{eps/a}(x), so
    # the same u, v, and σ scales by a): W is divided by the power of two a = 2^⌈log2 max|W|⌉ (exact, the
    # same bits wherever nothing under/overflows) so that tiny (≤ 1e-23 float32) or huge weights give
    # their σ instead of an underflowed 0 / overflowed inf. Traced values: a = 1.
    a = _pow2_scale(xp, wc)
    if a is not None:
        wc = wc / xp.asarray(a, dtype=cd, device=device_of(wc))
    eps_a = eps if a is None else eps / a
    wm = _to_matrix(xp, wc, dim)
    v0 = None if v is None else to_compute(xp, v, cd)
    uu, vv = _power_iteration(xp, wm, to_compute(xp, u, cd), v0, n_power_iterations, eps_a)
    sigma = xp.sum(uu * xp.matmul(wm, vv))
    if _concrete_any(xp, sigma == 0):
        raise ValueError(_sigma_zero_message(fn, xp, wm, to_compute(xp, u, cd), v0, eps, 1.0 if a is None else a))
    y = wc / sigma
    sa = None if a is None else xp.asarray(a, dtype=cd, device=device_of(wc))
    res = Residuals((wc, uu, vv, sigma, sa), (dim, tuple(w.shape)))
    v_dtype = u.dtype if v is None else v.dtype
    # a registered forward returns (out, residuals); its annotation is what a call returns (registry.method)
    return SpectralNormResult(_out(xp, y, w.dtype), _out(xp, uu, u.dtype), _out(xp, vv, v_dtype)), res  # type: ignore[return-value]


def _pow2_scale(xp, w):
    """2^e with max|w| = f·2^e, f ∈ [0.5, 1) (a Python float; 1.0 for a zero or non-finite w), or
    ``None`` for a traced value or a lazy (dask) array (never computed here: no scaling, no check)."""
    if is_lazy(w):
        return None
    try:
        top = float(_np.max(_np.abs(_np.asarray(to_numpy(w), _np.float64))))
    except Exception:  # jax tracers and friends
        return None
    if not (top > 0 and math.isfinite(top)):
        return 1.0
    return math.ldexp(1.0, math.frexp(top)[1])


def _sigma_zero_message(fn, xp, wm, u, v, eps, a):
    """What made σ = uᵀ·W·v exactly 0 (wm: W/a; concrete values)."""
    w64 = _np.asarray(to_numpy(wm), _np.float64)
    if not _np.any(w64):
        return f"{fn}: the estimated spectral norm σ = uᵀ·W·v is 0 because w is zero; a zero weight has no direction"
    if v is None:
        t = float(_np.linalg.norm(w64.T @ _np.asarray(to_numpy(u), _np.float64))) * a
        first, what = "Wᵀ·u", "u is orthogonal to the range of W"
    else:
        t = float(_np.linalg.norm(w64 @ _np.asarray(to_numpy(v), _np.float64))) * a
        first, what = "W·v", "v is in the null space of W"
    if t == 0:
        return (f"{fn}: the estimated spectral norm σ = uᵀ·W·v is 0: {first} = 0 ({what}); pass another "
                f"power-iteration state")
    if eps > t:
        return (f"{fn}: the estimated spectral norm σ = uᵀ·W·v underflowed to 0: eps={eps!r} exceeds the norm "
                f"‖{first}‖ = {t:.3g} that N(x) = x/max(‖x‖, eps) divides by, so every step shrinks u and v by "
                f"‖·‖/eps; pass an eps well below the norms of W's products (torch's default is 1e-12)")
    return (f"{fn}: the estimated spectral norm σ = uᵀ·W·v is 0 (‖{first}‖ = {t:.3g}): the power-iteration "
            f"state (u{'' if v is None else ', v'}) is orthogonal to W's leading singular vectors; pass another state")


@spectral_norm.defbackward
def _spectral_norm_backward(res, dy):
    wc, uu, vv, sigma, a = res.arrays
    dim, shape = res.static
    xp = namespace("spectral_norm.backward", cotangent=dy)
    dy = to_compute(xp, dy, wc.dtype)
    # y = W/σ, σ = uᵀ·W·v with u, v constant: ∂σ/∂W = u·vᵀ (in the matrix layout of W).
    c = xp.sum(dy * wc) / (sigma * sigma)
    outer = xp.reshape(uu, (-1, 1)) * xp.reshape(vv, (1, -1))
    if dim != 0:
        perm_shape = (shape[dim],) + tuple(s for d, s in enumerate(shape) if d != dim)
        outer = xp.reshape(outer, perm_shape)
        inv = [0] * len(shape)
        order = (dim,) + tuple(d for d in range(len(shape)) if d != dim)
        for i, d in enumerate(order):
            inv[d] = i
        outer = xp.permute_dims(outer, tuple(inv))
    else:
        outer = xp.reshape(outer, shape)
    dw = dy / sigma - c * outer
    # the forward ran on W/a (σ/a): this is a·∂L/∂W
    return (dw if a is None else dw / a), None, None


# --------------------------------------------------------------------------------------------------
# orthogonalization: OWN (eigendecomposition) and ONI (Newton's iteration), sharing normref.matfun


ITERATIONS = ("newton_schulz", "newton")
ONI_SCALINGS = ("trace", "frobenius")
ONI_SIDES = ("rows", "columns", "auto")
_MATFUN = {"newton_schulz": "newton_schulz", "newton": "iternorm"}


def _own_default_group_size(d_out: int, fan_in: int, centering: bool = True) -> int:
    """OWN's default ``group_size``: the largest divisor of d_out that is at most max(1, fan_in − 1).

    Centred rows span at most fan_in − 1 dimensions, so at most fan_in − 1 of them can be orthonormal:
    d_out ≤ fan_in − 1 gives one group of all rows (the paper's W·Wᵀ = I); a wider layer is split into
    the fewest equal groups of consecutive rows that can each be orthonormal (Huang et al. AAAI 2018
    orthogonalize "group-wise when d_out > d_in"). A prime d_out larger than fan_in − 1 gets groups of
    one row (each row centred and normalized: centered weight normalization).
    """
    limit = max(1, fan_in - 1) if centering else fan_in  # uncentred rows span fan_in dimensions
    return max(c for c in range(1, min(d_out, limit) + 1) if d_out % c == 0)


def _orth_forward(fn, xp, v, group_size, eps, iterations, iteration="newton_schulz", centering=True,
                  side="rows", scaling="trace"):
    """W = f(S)·Zc per group, Zc the centred rows, S = Zc·Zcᵀ + ε·I; f = S^-1/2 (eigh, matfun's "zca")
    when ``iterations`` is None, else T trace-normalized Newton steps (matfun's "newton_schulz" or
    "iternorm"), or with ``scaling="frobenius"`` T Newton steps on S/‖S‖_F (``_frob_forward``).
    ``side="columns"`` (ONI only): S = Zcᵀ·Zc + ε·I (fan_in × fan_in) and W = Zc·f(S)."""
    _check_weight(fn, "v", v)
    d_out = v.shape[0]
    n = math.prod(v.shape[1:])
    if group_size is None:
        group_size = _own_default_group_size(d_out, n, centering) if iterations is None else d_out
    c = check_int(fn, "group_size", group_size, minimum=1)
    if d_out % c:
        raise ValueError(f"{fn}: group_size must divide d_out = v.shape[0] = {d_out} (rows are orthogonalized in "
                         f"groups of group_size consecutive rows); got group_size={c}")
    eps = check_nonnegative(fn, "eps", eps)
    if iterations is None and eps == 0 and centering and c > n - 1:
        raise ValueError(
            f"{fn}: group_size must be at most fan_in − 1 = {n - 1} (v of shape {tuple(v.shape)}): centred rows "
            f"span at most fan_in − 1 dimensions, so a group of {c} rows cannot be orthonormal and Vc·Vcᵀ is "
            f"singular; use a smaller group_size (a divisor of {d_out}) or eps > 0"
        )
    cd = compute_dtype(xp, v.dtype)
    z = xp.reshape(to_compute(xp, v, cd), (d_out // c, c, n))
    # W is scale-invariant group by group: with a > 0, W(a·V_g; ε) = W(V_g; ε/a²) (for OWN and ONI
    # alike, Σ = Zc·Zcᵀ + ε·I scales by a²). Each group is divided by a power of two a_g (exact, so the
    # result is unchanged wherever nothing over/underflows) that brings max|V_g| into [0.5, 1): the
    # Gram matrix Zc·Zcᵀ of weights ~1e20 (float32) or ~1e160 (float64) no longer overflows, nor does
    # that of weights ~1e-22 (float32) underflow to a "singular" zero. With eps > 0 only large groups are
    # scaled (a_g ≥ 1, ε/a_g² ≤ ε): for tiny weights ε dominates Σ anyway and W ≈ Zc/√ε is representable.
    a = _group_scale(fn, xp, z, eps)
    if a is not None:
        z = z / a
    # Huang et al.: centre each row (W_iᵀ·1 = 0); centering=False keeps the rows (a square V then
    # reaches a fully orthogonal W, rank d, instead of rank d − 1)
    zc = z - xp.mean(z, axis=-1, keepdims=True) if centering else z
    s = xp.matmul(zc, _mf.mT(xp, zc)) if side == "rows" else xp.matmul(_mf.mT(xp, zc), zc)
    if eps:
        s = s + (eps if a is None else eps / (a * a)) * _mf.eye_like(xp, s)
    if iterations is None:
        kind = "zca"
        # eigenvalues first, the inverse square root only once they are known to be positive: a
        # singular group's λ_min is rounding noise of either sign (√ of a negative number is NaN)
        eig = _mf.eigh(xp, s)
        if _mf.min_eigenvalue_ok(xp, eig[0]) is False:
            lam = _np.asarray(to_numpy(eig[0]), _np.float64)
            k = int(_np.argmin(lam[:, 0] / _np.maximum(_np.abs(lam).max(axis=1), 1e-300)))  # the worst group
            rows = f"rows {k * c}..{k * c + c - 1}"
            raise ValueError(
                f"{fn}: Vc·Vcᵀ (+ eps·I) is numerically singular for the group of {rows} (rows linearly dependent "
                f"after centring: a zero, constant or repeated row); its inverse square root does not exist. "
                f"Use eps > 0 or a smaller group_size"
            )
        m, mres = _mf.whitening_matrix_forward(xp, s, kind, eig=eig)
    else:
        if _concrete_any(xp, _mf.trace(xp, s) == 0):
            raise ValueError(f"{fn}: a group of rows of v is zero after centring (tr(Vc·Vcᵀ) = 0); it has no direction")
        if scaling == "frobenius":
            kind = "frobenius:" + iteration
            m, mres = _frob_forward(xp, s, iterations, iteration == "newton_schulz")
        else:
            kind = _MATFUN[iteration]
            m, mres = _mf.whitening_matrix_forward(xp, s, kind, iterations)
    w = xp.matmul(m, zc) if side == "rows" else xp.matmul(zc, m)
    w = xp.reshape(w, tuple(v.shape))
    return _out(xp, w, v.dtype), Residuals((zc, m, a) + tuple(mres), (tuple(v.shape), kind, centering, side))


def _frob_forward(xp, s, iterations, coupled):
    """M = B_T(S_N)/√φ with φ = ‖S‖_F and S_N = S/φ (the authors' ONI code; eigenvalues of S_N in
    (0, 1] since ‖S‖_F ≥ λ_max): T Newton steps B ← 1.5·B − 0.5·B³·S_N from B_0 = I (``coupled=False``),
    or the coupled Newton–Schulz form Y_0 = S_N, Z_0 = I, N = ½(3I − Z·Y), Y ← Y·N, Z ← N·Z, B_T = Z_T
    (the same polynomial in S_N). ``res = (S, φ, *iterates)``."""
    s = _mf.sym(xp, s)
    phi = xp.sqrt(xp.sum(s * s, axis=(-2, -1)))
    s_n = s / phi[..., None, None]
    # the same iterations as IterNorm's and the coupled whitening's (normref.matfun), on S/‖S‖_F
    seq = _mf.newton_schulz_iterates(xp, s_n, iterations) if coupled else _mf.newton_iterates(xp, s_n, iterations)
    return seq[-1] / xp.sqrt(phi)[..., None, None], (s, phi, *seq)


def _frob_backward(xp, res, dm, coupled):
    """dS (symmetric) of ``_frob_forward``'s M for the cotangent dM.

    M = B_T/√φ: dB_T = dM/√φ and dφ gets −½·φ^-3/2·⟨dM, B_T⟩. The iterations reversed give dS_N
    (literal: with P = B_{k−1}, dP = 1.5·dB_k − 0.5·(dB_k·(P²·S_N)ᵀ + Pᵀ·dB_k·(P·S_N)ᵀ + (P²)ᵀ·dB_k·S_Nᵀ)
    and dS_N += −0.5·(P³)ᵀ·dB_k; coupled: dN = Yᵀ·dY' + dZ'·Zᵀ, dY = dY'·Nᵀ − ½·Zᵀ·dN,
    dZ = Nᵀ·dZ' − ½·dN·Yᵀ, dS_N = dY_0). S_N = S/φ: dS = dS_N/φ and dφ gets −⟨dS_N, S⟩/φ²; finally
    φ = ‖S‖_F, ∂φ/∂S = S/φ: dS = sym(dS_N/φ + dφ·S/φ)."""
    s, phi, *seq = res
    p2 = phi[..., None, None]
    s_n = s / p2
    sq = xp.sqrt(phi)[..., None, None]
    b_t = seq[-1]
    if coupled:
        ds_n = _mf.newton_schulz_iterates_backward(xp, seq, dm / sq)
    else:
        ds_n = _mf.newton_iterates_backward(xp, s_n, seq, dm / sq)
    dphi = -0.5 * phi ** -1.5 * xp.sum(dm * b_t, axis=(-2, -1)) - xp.sum(ds_n * s, axis=(-2, -1)) / phi**2
    return _mf.sym(xp, ds_n / p2 + (dphi / phi)[..., None, None] * s)


def _group_scale(fn, xp, z, eps):
    """(G, 1, 1) powers of two a_g with max|V_g|/a_g ∈ [0.5, 1) (a_g ≥ 1 when eps > 0; 1 for a zero
    group), after refusing non-finite weights; ``None`` for traced values and lazy (dask) arrays, which
    are never computed here (no scaling, no check)."""
    if is_lazy(z):
        return None
    try:
        zn = _np.asarray(to_numpy(z), dtype=_np.float64)
    except Exception:  # jax tracers and friends: nothing to inspect
        return None
    if not _np.all(_np.isfinite(zn)):
        bad = _np.flatnonzero(~_np.isfinite(zn.reshape(-1)))
        raise ValueError(f"{fn}: v must be finite; got {zn.reshape(-1)[bad[0]]} at flat index {int(bad[0])} "
                         f"({bad.size} non-finite entries)")
    top = _np.max(_np.abs(zn), axis=(-2, -1), keepdims=True)
    _, e = _np.frexp(top)
    a = _np.where(top > 0, _np.ldexp(1.0, e), 1.0)
    if eps:
        a = _np.maximum(a, 1.0)
    return xp.asarray(a, dtype=z.dtype, device=device_of(z))


def _orth_backward(res, dw):
    """W = M·Zc, M = f(S), S = Zc·Zcᵀ (+ εI): dZc = Mᵀ·dW + 2·dS·Zc with dS = f's backward of dM = dW·Zcᵀ
    (symmetric, from normref.matfun), then dV = dZc − mean(dZc) along each row (the centring). Zc here
    is the group scaled by 1/a_g (see ``_orth_forward``): dV = (dZc − mean(dZc))/a_g."""
    zc, m, a, *mres = res.arrays
    shape, kind, centering, side = res.static
    xp = namespace("orthogonalization.backward", cotangent=dw)
    dw = xp.reshape(to_compute(xp, dw, zc.dtype), zc.shape)
    # rows: W = M·Zc, S = Zc·Zcᵀ: dM = dW·Zcᵀ, dZc = Mᵀ·dW + 2·dS·Zc (dS symmetric);
    # columns: W = Zc·M, S = Zcᵀ·Zc: dM = Zcᵀ·dW, dZc = dW·Mᵀ + 2·Zc·dS
    dm = xp.matmul(dw, _mf.mT(xp, zc)) if side == "rows" else xp.matmul(_mf.mT(xp, zc), dw)
    if kind.startswith("frobenius:"):
        ds = _frob_backward(xp, tuple(mres), dm, kind == "frobenius:newton_schulz")
    else:
        ds = _mf.whitening_matrix_backward(xp, tuple(mres), dm, kind)
    if side == "rows":
        dzc = xp.matmul(_mf.mT(xp, m), dw) + 2.0 * xp.matmul(ds, zc)
    else:
        dzc = xp.matmul(dw, _mf.mT(xp, m)) + 2.0 * xp.matmul(zc, ds)
    dv = dzc - xp.mean(dzc, axis=-1, keepdims=True) if centering else dzc
    if a is not None:
        dv = dv / a
    return (xp.reshape(dv, shape),)


def _gram_cond(v, c):
    """κ(Vc·Vcᵀ) of the worst group: the eigendecomposition's error grows like κ·ε."""
    z = _np_rows(v)
    z = z.reshape(z.shape[0] // c, c, -1)
    z = z - z.mean(axis=-1, keepdims=True)
    lam = _np.linalg.eigvalsh(z @ _np.swapaxes(z, -1, -2))
    return float(_np.max(lam[..., -1] / lam[..., 0]))


def _ex_own(rng):
    # (8, 3) and (6, 5) with group_size=None: d_out > fan_in − 1, the default groups (2 and 3 rows)
    for shape, c in [((4, 6), None), ((6, 3, 2, 2), 3), ((8, 3), 2), ((4, 2, 3), 4), ((6, 5), 2), ((8, 3), None),
                     ((6, 5), None)]:
        v = rng.standard_normal(shape) + 0.5
        k = c or _own_default_group_size(shape[0], math.prod(shape[1:]))
        yield Example((v,), dict(group_size=c), label=f"{shape} group_size={c}", cond=_gram_cond(v, k))
    v = rng.standard_normal((3, 5))
    yield Example((v,), dict(eps=1e-3), label="(3, 5) eps=1e-3", cond=_gram_cond(v, 3))
    v = rng.standard_normal((4, 4))  # square, uncentred: fully orthogonal (W·Wᵀ = I, rank 4)
    yield Example((v,), dict(centering=False), label="(4, 4) centering=False",
                  cond=float(_np.linalg.cond(v @ v.T)))


def _orthonormal_groups(m, xp, out, args, kwargs):
    """Each group's rows are orthonormal (W_g·W_gᵀ = I; with eps > 0, = S·(S + εI)^-1) and have mean 0."""
    v = _np_rows(args[0])
    w = _np_rows(m.primary(out))
    centering = kwargs.get("centering", True)
    c = kwargs.get("group_size") or _own_default_group_size(w.shape[0], w.shape[1], centering)
    eps = kwargs.get("eps", 0.0)
    wg = w.reshape(w.shape[0] // c, c, -1)
    gram = wg @ _np.swapaxes(wg, -1, -2)
    z = v.reshape(wg.shape)
    if centering:
        z = z - z.mean(axis=-1, keepdims=True)
    s = z @ _np.swapaxes(z, -1, -2)
    target = s @ _np.linalg.inv(s + eps * _np.eye(c)) if eps else _np.broadcast_to(_np.eye(c), gram.shape)
    mean = float(_np.max(_np.abs(w.mean(axis=1)))) if centering else 0.0
    return max(float(_np.max(_np.abs(gram - target))), mean)


_exact_scale = lambda kw: not kw.get("eps")  # noqa: E731 (ε·I in the Gram matrix breaks f(a·V) = f(V))


@method(
    array_params=("v",),
    category="weight",
    survey="§6.1 Eqn 31 (W·Wᵀ = I), §6.2 re-parameterization",
    paper="Huang, Liu, Lang, Yu, Wang & Li, Orthogonal Weight Normalization: Solution to Optimization over Multiple "
          "Dependent Stiefel Manifolds in Deep Neural Networks, AAAI 2018",
    examples=_ex_own,
    invariants=(
        Invariant("groups of rows are orthonormal with mean 0", _orthonormal_groups, scale=64.0),
        scale_invariant(applies=_exact_scale),
    ),
)
def orthogonal_weight_norm(v: Any, group_size: int | None = None, eps: float = 0.0, centering: bool = True) -> Any:
    """Orthogonal weight normalization (OWN): W = (Vc·Vcᵀ)^-1/2·Vc per group of rows (survey Eqn 31).

    Vc is V (rows = output neurons, fan-in flattened) with each row centred; rows are taken in groups
    of ``group_size`` consecutive rows, each group orthogonalized on its own, so W_g·W_gᵀ = I: the
    rows of a group are orthonormal and have zero mean. Centred rows span at most fan_in − 1
    dimensions, so with eps = 0 a group must have at most fan_in − 1 rows (the reason for groups when
    d_out ≥ d_in). The inverse square root is the ZCA one of :mod:`normref.matfun`
    (one batched ``eigh``; eigenvalues Λ, eigenvectors D), with its Loewner backward:
    dM = dW·Vcᵀ, dS = D·(K ∘ (Dᵀ·sym(dM)·D))·Dᵀ, dVc = M·dW + 2·dS·Vc, dV = dVc − mean(dVc).
    W(a·V; ε) = W(V; ε/a²), so each group is first divided by a power of two (exact) bringing
    max|V_g| into [0.5, 1): weights whose Gram matrix would overflow (``|V| ≳ 1e19`` float32, 1e154
    float64) or underflow (``≲ 1e-19`` float32) give their W.

    Parameters
    ----------
    v : array, shape ``(d_out, ...)``
        V, the unnormalized weight.
    group_size : int or None, default None
        Rows per group; ``None`` takes the largest divisor of d_out that is at most
        max(1, fan_in − 1): all rows in one group when d_out ≤ fan_in − 1 (the paper's W·Wᵀ = I), else
        the fewest groups that can each be orthonormal (groups of one row, i.e. centered weight
        normalization, when no larger divisor fits).
    eps : float, default 0.0
        ε > 0 adds ε·I to Vc·Vcᵀ (rows then only approximately orthonormal); the default 0 is the
        paper's.
    centering : bool, default True
        Centre each row first (the paper's Vc). ``False`` orthogonalizes V itself, W = (V·Vᵀ)^-1/2·V
        (the polar factor): a square V then gives a fully orthogonal W (W·Wᵀ = WᵀW = I, rank d), which
        centred rows, spanning at most fan_in − 1 dimensions, cannot reach; a group may then have up
        to fan_in rows.

    Returns
    -------
    w : array
        W, v's shape.

    Raises
    ------
    ValueError
        For a numerically singular group (a zero, constant or repeated row, with eps = 0), naming the
        group, after the eigendecomposition and before Λ^-1/2 is taken; for NaN or inf entries before
        it.

    Notes
    -----
    Survey §6.1, Eqn 31.

    References
    ----------
    .. [1] L. Huang, X. Liu, B. Lang, A. W. Yu, Y. Wang and B. Li, "Orthogonal Weight Normalization:
       Solution to Optimization over Multiple Dependent Stiefel Manifolds in Deep Neural Networks",
       AAAI 2018.
    """
    fn = "orthogonal_weight_norm"
    _required(fn, v=v)
    xp = namespace(fn, v=v)
    centering = check_bool(fn, "centering", centering)
    return _orth_forward(fn, xp, v, group_size, eps, None, centering=centering)


orthogonal_weight_norm.defbackward(_orth_backward)


def _newton_amplification(v, c, iterations, eps=0.0, scaling="trace") -> float:
    """How much the literal Newton recurrence P ← 1.5·P − 0.5·P³·S_N amplifies its rounding errors.

    Linearized around the exact (commuting) iterates P_k = diag(p_k) in S_N's eigenbasis (eigenvalues λ),
    an error E_ij is multiplied at step k by f_ij = 1.5 − 0.5·λ_j·(p_i² + p_i·p_j + p_j²); at convergence
    (p = λ^-1/2) f_ij = 1 − ½·r·(1 + r), r = √(λ_j/λ_i), which exceeds 1 in modulus once λ_j/λ_i > 2.44:
    the recurrence is then unstable (Higham, Functions of Matrices, 2008, §6.4). Returns
    1 + max_ij Σ_k Π_{l≥k} |f_ij(l)|: the factor on ε of the computed W's error (Example.cond).
    """
    z = _np_rows(v)
    z = z.reshape(z.shape[0] // c, c, -1)
    z = z - z.mean(axis=-1, keepdims=True)
    s = z @ _np.swapaxes(z, -1, -2) + eps * _np.eye(c)
    scale = _np.trace(s, axis1=-2, axis2=-1) if scaling == "trace" else _np.linalg.norm(s, axis=(-2, -1))
    lam = _np.linalg.eigvalsh(s) / scale[:, None]
    worst = 1.0
    for lg in lam:
        p = _np.ones_like(lg)
        factors = []
        for _ in range(iterations):
            pi, pj = p[:, None], p[None, :]
            factors.append(_np.abs(1.5 - 0.5 * lg[None, :] * (pi * pi + pi * pj + pj * pj)))
            p = 1.5 * p - 0.5 * p**3 * lg
        total, prod = _np.zeros_like(factors[0]), _np.ones_like(factors[0])
        for f in reversed(factors):
            prod = prod * f
            total = total + prod
        worst = max(worst, 1.0 + float(total.max()))
    return worst


def _ex_oni(rng):
    for shape, c, t in [((4, 6), None, 5), ((6, 3, 2, 2), 3, 2), ((8, 3), 2, 7), ((4, 2, 3), 2, 1), ((3, 5), None, 30)]:
        v = rng.standard_normal(shape) + 0.3
        yield Example((v,), dict(iterations=t, group_size=c), label=f"{shape} group_size={c} T={t}",
                      cond=_gram_cond(v, c or shape[0]))
    v = rng.standard_normal((4, 5))
    yield Example((v,), dict(iterations=4, eps=1e-2), label="(4, 5) T=4 eps=1e-2", cond=_gram_cond(v, 4))
    v = rng.standard_normal((4, 4))  # square, uncentred
    yield Example((v,), dict(iterations=5, centering=False), label="(4, 4) T=5 centering=False",
                  cond=float(_np.linalg.cond(v @ v.T)))
    # the paper's literal recurrence, where it is stable enough to test (see _newton_amplification)
    for shape, c, t in [((4, 6), None, 5), ((6, 3, 2, 2), 3, 2), ((8, 3), 2, 3)]:
        v = rng.standard_normal(shape) + 0.3
        k = c or shape[0]
        cond = max(_gram_cond(v, k), _newton_amplification(v, k, t))
        yield Example((v,), dict(iterations=t, group_size=c, iteration="newton"),
                      label=f"{shape} group_size={c} T={t} literal Newton", cond=cond)
    # the authors' code: S/‖S‖_F (and their ε = 1e-5), both iteration forms
    frob: list[tuple[tuple[int, ...], int | None, int, dict[str, Any]]] = [
        ((4, 6), None, 5, {}), ((6, 3, 2, 2), 3, 3, dict(eps=1e-5)), ((4, 6), 2, 3, dict(iteration="newton"))]
    for shape, c, t, kw in frob:
        v = rng.standard_normal(shape) + 0.3
        k = c or shape[0]
        cond = _gram_cond(v, k)
        if kw.get("iteration") == "newton":
            cond = max(cond, _newton_amplification(v, k, t, scaling="frobenius"))
        yield Example((v,), dict(iterations=t, group_size=c, scaling="frobenius", **kw),
                      label=f"{shape} group_size={c} T={t} Frobenius {kw}", cond=cond)
    # the column form (d_out > fan_in: S = Zcᵀ·Zc, W = Zc·B_T), and "auto" choosing it
    cols: list[tuple[tuple[int, ...], int | None, int, dict[str, Any]]] = [
        ((8, 3), None, 5, dict(side="columns")), ((6, 2, 1, 1), 3, 4, dict(side="columns")),
        ((8, 3), None, 3, dict(side="auto", scaling="frobenius")), ((8, 4), 4, 4, dict(side="columns", centering=False))]
    for shape, c, t, kw in cols:
        v = rng.standard_normal(shape) + 0.3
        yield Example((v,), dict(iterations=t, group_size=c, **kw), label=f"{shape} group_size={c} T={t} {kw}",
                      cond=_col_gram_cond(v, c or shape[0], kw.get("centering", True)))


def _col_gram_cond(v, c, centering=True):
    """κ of Zcᵀ·Zc restricted to its range (centred rows: the constant direction is a null vector, an
    eigenvalue the column form never inverts), worst group."""
    z = _np_rows(v)
    z = z.reshape(z.shape[0] // c, c, -1)
    if centering:
        z = z - z.mean(axis=-1, keepdims=True)
    sv = _np.linalg.svd(z, compute_uv=False)
    worst = 1.0
    for g in sv:
        g = g[g > 1e-10 * g[0]]
        worst = max(worst, float(g[0] / g[-1]) ** 2)
    return worst


def _oni_singular_values(m, xp, out, args, kwargs):
    """Singular values of each group's W lie in [σ_i(V̂), 1], V̂ = Vc/‖Vc‖_F (Huang et al. 2020, §3.2):
    the excess over 1 and the shortfall below σ_i(V̂) (both 0 exactly)."""
    v = _np_rows(args[0])
    w = _np_rows(m.primary(out))
    c = kwargs.get("group_size") or w.shape[0]
    eps = kwargs.get("eps", 0.0)
    z = v.reshape(v.shape[0] // c, c, -1)
    if kwargs.get("centering", True):
        z = z - z.mean(axis=-1, keepdims=True)
    t = _np.einsum("gij,gij->g", z, z) + eps * c
    # σ(V̂) from an SVD of Zc (not √ of eigh's eigenvalues, which turns a rounding-level zero into √ε)
    lo = _np.linalg.svd(z, compute_uv=False) / _np.sqrt(t)[:, None]
    sv = _np.linalg.svd(w.reshape(z.shape), compute_uv=False)
    # the column form has min(c, fan_in) singular values (the same nonzero ones); S/‖S‖_F only raises
    # the eigenvalues the iteration sees (‖S‖_F ≤ tr S), so σ(V̂) stays a lower bound
    k = min(lo.shape[1], sv.shape[1])
    lo, sv = lo[:, :k], sv[:, :k]
    if eps:  # with ε·I the lower bound is σ_i(V̂)·(1 + …) only approximately: check the upper bound
        return float(max(0.0, _np.max(sv) - 1.0))
    return float(max(0.0, _np.max(sv) - 1.0, _np.max(lo - sv)))


@method(
    array_params=("v",),
    category="weight",
    survey="§6.1 (ONI bounds singular values in (σ_min, 1]; interpolates spectral normalization and Eqn 31)",
    paper="Huang, Liu, Zhu, Liu & Shao, Controllable Orthogonalization in Training DNNs, CVPR 2020",
    examples=_ex_oni,
    invariants=(
        Invariant("singular values in [σ(V̂), 1]", _oni_singular_values, scale=64.0),
        scale_invariant(applies=_exact_scale),
    ),
)
def oni(v: Any, iterations: int = 5, group_size: int | None = None, eps: float = 0.0,
        iteration: str = "newton_schulz", centering: bool = True, scaling: str = "trace", side: str = "rows") -> Any:
    """Orthogonalization by Newton's iteration (ONI): W = B_T·V̂ per group of rows.

    Algorithm 1 of Huang et al. (CVPR 2020) on the centred rows Zc (as their code; groups of
    ``group_size`` consecutive rows, default all rows): V̂ = Zc/‖Zc‖_F, S = V̂·V̂ᵀ, B_0 = I,
    B_t = 3/2·B_{t−1} − 1/2·B_{t−1}³·S, W = B_T·V̂. Since ‖Zc‖_F² = tr(Zc·Zcᵀ), W = P_T·Zc with
    P_T IterNorm's trace-normalized Newton iteration (:func:`normref.matfun.newton_inv_sqrt_forward`),
    and the backward runs through the unrolled iterations there (T = ``iterations`` ≥ 1).

    The eigenvalues λ of S lie in (0, 1]; each singular value of W is p_T(λ)·√λ, increasing in T from
    √λ = σ(V̂) to 1: small T bounds the singular values in [σ_min(V̂), 1] (T = 0 would be Frobenius
    normalization, close to spectral normalization when one singular value dominates), large T gives
    W·Wᵀ = I for a group of at most fan_in − 1 rows. A group of more than fan_in − 1 rows can never
    reach W·Wᵀ = I: S then has rank ≤ fan_in − 1, its zero eigenvalues stay zero singular values of W
    for every T (W·Wᵀ converges to the orthogonal projector onto the range of Zc·Zcᵀ); choose
    group_size ≤ fan_in − 1 when orthogonality is the aim. Likewise a single zero (or constant) row
    in a group gives a zero row of W, finite for every T, never NaN. The authors' code divides S by
    ‖S‖_F instead of tr S (``scaling="frobenius"``) and switches to the column form when
    d_out > fan_in (``side="auto"``). Groups are rescaled by powers of two as in
    :func:`orthogonal_weight_norm`.

    Parameters
    ----------
    v : array, shape ``(d_out, ...)``
        The unnormalized weight.
    iterations : int, default 5
        T ≥ 1, at most ``normref.matfun.MAX_ITERATIONS`` (1000).
    group_size : int or None, default None
        Rows per group; ``None`` (default) is one group of all d_out rows, whatever fan_in (unlike
        :func:`orthogonal_weight_norm`, ONI is well defined for any group: the Newton iteration needs no
        inverse).
    eps : float, default 0.0
        Adds ε·I to Zc·Zcᵀ (the authors' code uses 1e-5; the default 0 is Algorithm 1).
    iteration : str, default "newton_schulz"
        How B_T is computed; both give the same polynomial in S, so the same W in exact arithmetic:

        - ``"newton_schulz"`` (default): the coupled form Y_0 = S, Z_0 = I, M = ½(3I − Z·Y), Y ← Y·M,
          Z ← M·Z, B_T = Z_T (matfun's coupled Newton–Schulz). Numerically stable for any T.
        - ``"newton"``: the paper's recurrence B ← 1.5·B − 0.5·B³·S literally (matfun's IterNorm). It
          is unstable once converged: rounding errors grow by ``|1 − ½·r·(1 + r)|``, r = √(λ_j/λ_i),
          per iteration, which exceeds 1 when an eigenvalue ratio of S exceeds 2.44 (Higham 2008,
          §6.4). With κ(S) = 27 and T = 20 we measured ‖W·Wᵀ − I‖ = 1e6 in float64 (NaN at T = 40);
          with the paper's T ≤ 7 the loss is a few digits.
    centering : bool, default True
        Centre each row first (Algorithm 1 and the authors' code). ``False`` runs the iteration on V
        itself: a square V then converges to a fully orthogonal W (rank d, the polar factor of V),
        which centred rows (rank ≤ fan_in − 1) cannot reach.
    scaling : str, default "trace"
        How S is brought to eigenvalues in (0, 1] before the iteration:

        - ``"trace"`` (default): S/tr S, i.e. V̂ = Zc/‖Zc‖_F as Algorithm 1 of the paper writes it.
        - ``"frobenius"``: S/‖S‖_F and W = B_T·Zc/√‖S‖_F, as the authors' released ``ONINorm``
          (huangleiBuaa/ONI, ``NormedConv.py``, which adds ε = 1e-5: pass ``eps=1e-5``).
          ‖S‖_F = √Σλ² ≤ tr S = Σλ, so the iteration sees larger eigenvalues and converges in fewer
          steps; both give W·Wᵀ → I as T grows, but at finite T they differ. The backward runs
          through the same unrolled iterations plus dφ·S/φ for φ = ‖S‖_F.
    side : str, default "rows"
        Which Gram matrix is orthogonalized, per group Z_g (c × fan_in):

        - ``"rows"`` (default, Algorithm 1): S = Zc·Zcᵀ (c × c), W = B_T·Zc: orthonormal rows.
        - ``"columns"``: S = Zcᵀ·Zc (fan_in × fan_in), W = Zc·B_T: orthonormal columns, the only
          orthogonality a group of more than fan_in rows can have (the authors' ``ONINorm_colum``;
          backward dM = Zcᵀ·dW, dZc = dW·Mᵀ + 2·Zc·dS). The nonzero singular values are those of the
          row form. With centred rows the constant vector is in the null space of Zcᵀ·Zc, so at most
          fan_in − 1 columns become orthonormal (WᵀW → the projector onto 1^⊥); ``centering=False``
          reaches WᵀW = I. Along that null direction B_T grows like 1.5^T and multiplies the
          rounding-level Zc·1 ≈ ε: harmless for the paper's T ≤ 7 (1.5^7 ≈ 17), but T = 60 loses
          about ten digits (the same holds for any group with a singular S, rows or columns). The authors' column module leaves S unscaled (its S/‖S‖_F line is
          commented out) while still dividing W by √‖S‖_F: its iteration converges only while
          λ_max(S) < 3 (at λ ≥ 3 the scalar map p ↦ 1.5p − 0.5p³λ from p = 1 lands on 0 or a negative
          fixed point), and then to Zc·S^-1/2/√‖S‖_F, whose columns are not unit. normref scales S
          as ``scaling`` says, as their row module does.
        - ``"auto"``: rows when d_out ≤ fan_in, else columns (the authors' ``ONI_Linear`` and
          ``ONI_Conv2d`` choice).

    Returns
    -------
    w : array
        W, v's shape.

    Raises
    ------
    ValueError
        For a group that is zero after centring, or NaN/inf entries.

    Notes
    -----
    Survey §6.1 (ONI). Conventions: the paper's Algorithm 1 (trace scaling, rows, ε = 0) is the
    default; the authors' code is ``scaling="frobenius", side="auto", eps=1e-5``. torch has no ONI.

    References
    ----------
    .. [1] L. Huang, L. Liu, F. Zhu, D. Wan, Z. Yuan, B. Li and L. Shao, "Controllable Orthogonalization
       in Training DNNs", CVPR 2020 (Algorithm 1).
    .. [2] N. J. Higham, "Functions of Matrices: Theory and Computation", SIAM 2008, §6.4.
    """
    fn = "oni"
    _required(fn, v=v)
    xp = namespace(fn, v=v)
    iterations = _mf.check_iterations(fn, "iterations", iterations, minimum=1)
    iteration = check_choice(fn, "iteration", iteration, ITERATIONS)
    centering = check_bool(fn, "centering", centering)
    scaling = check_choice(fn, "scaling", scaling, ONI_SCALINGS)
    side = check_choice(fn, "side", side, ONI_SIDES)
    if side == "auto" and v.ndim >= 2:
        side = "rows" if v.shape[0] <= math.prod(v.shape[1:]) else "columns"
    return _orth_forward(fn, xp, v, group_size, eps, iterations, iteration, centering=centering,
                         side=side, scaling=scaling)


oni.defbackward(_orth_backward)


# --------------------------------------------------------------------------------------------------
# soft orthogonality penalties (survey §6.2, "Regularization with an Extra Penalty")

PENALTIES = ("frobenius", "double", "off_diagonal", "mc", "srip")
GRAMS = ("rows", "columns", "auto")


def _gram_side(gram: str, r: int, c: int) -> str:
    """"rows" (W·Wᵀ, d_out × d_out) or "columns" (Wᵀ·W, fan_in × fan_in); "auto" takes the smaller
    Gram matrix, the only side that can equal I (rows when d_out ≤ fan_in)."""
    if gram == "auto":
        return "rows" if r <= c else "columns"
    return gram


def _ex_penalty(rng):
    for shape in [(3, 5), (5, 3), (2, 3, 2, 2)]:
        for kind in PENALTIES:
            yield Example((rng.standard_normal(shape) * 0.5,), dict(kind=kind), label=f"{shape} {kind}")
    # tall weights and a 1×1 convolution with more filters than inputs: the columns' Gram matrix
    for shape, gram in [((5, 3), "columns"), ((6, 2, 1, 1), "auto")]:
        for kind in ("frobenius", "off_diagonal", "mc", "srip"):
            yield Example((rng.standard_normal(shape) * 0.5,), dict(kind=kind, gram=gram), label=f"{shape} {kind} gram={gram}")
    # SRIP as the authors' code computes it: σ², the smaller Gram matrix
    for shape, gram in [((3, 5), "rows"), ((6, 2, 1, 1), "auto"), ((2, 3, 2, 2), "auto")]:
        yield Example((rng.standard_normal(shape) * 0.5,), dict(kind="srip", gram=gram, squared=True),
                      label=f"{shape} srip squared gram={gram}")


def _penalty_zero_when_orthogonal(m, xp, out, args, kwargs):
    """ψ(Q) = 0 for Q with orthonormal rows (Gram side "rows", d_out ≤ fan_in) or orthonormal columns
    (side "columns", fan_in ≤ d_out); "double" needs a square Q."""
    w = _np_rows(args[0])
    r, c = w.shape
    kind = kwargs.get("kind", "frobenius")
    side = _gram_side(kwargs.get("gram", "rows"), r, c)
    if kind == "double":
        if r != c:
            return None
        q = _np.linalg.qr(w)[0]
    elif side == "rows":
        if r > c:
            return None
        q = _np.linalg.qr(w.T)[0].T  # orthonormal rows
    else:
        if c > r:
            return None
        q = _np.linalg.qr(w)[0]  # orthonormal columns
    val = float(_np.asarray(to_numpy(m(xp.asarray(q), **kwargs)), _np.float64))
    return abs(val)


@method(
    array_params=("w",),
    category="weight",
    survey="§6.2 (Regularization with an Extra Penalty), constraint Eqn 31",
    paper="Xie, Xiong & Pu, All You Need is Beyond a Good Init, CVPR 2017; Bansal, Chen & Wang, Can We Gain More "
          "from Orthogonality Regularizations in Training Deep CNNs?, NeurIPS 2018; Brock, Donahue & Simonyan, "
          "Large Scale GAN Training (BigGAN), ICLR 2019",
    examples=_ex_penalty,
    invariants=(Invariant("zero at orthonormal rows (or columns)", _penalty_zero_when_orthogonal, scale=64.0),),
)
def orthogonal_penalty(w: Any, kind: str = "frobenius", gram: str = "rows", squared: bool = False) -> Any:
    """A soft-orthogonality penalty on W (d_out × fan_in, a kernel flattened per output row), a 0-d array.

    With G the Gram matrix of the side ``gram`` chooses and M = G − I:

    - ``"frobenius"``: ‖M‖²_F (soft orthogonality, Xie et al. 2017; "SO" of Bansal et al. 2018).
    - ``"double"``: ‖W·Wᵀ − I‖²_F + ‖Wᵀ·W − I‖²_F ("DSO", Bansal et al.; both sides, ``gram`` is
      ignored).
    - ``"off_diagonal"``: ‖G ∘ (11ᵀ − I)‖²_F, orthogonality without unit norms (BigGAN's orthogonal
      regularization, Brock et al. 2019).
    - ``"mc"``: ‖M‖_∞ = max_ij ``|M_ij|``, the mutual-coherence form of Bansal et al. (their "MC"; for unit
      rows it is the largest ``|cosine|`` between two rows, the diagonal counts too).
    - ``"srip"``: σ_max(M) = max_k ``|λ_k(M)|``, the spectral norm of the symmetric M (Bansal et al.'s
      "SRIP", the spectral restricted isometry property), computed exactly with one ``eigh`` where the
      paper uses two power-iteration steps.

    Multiply by the regularization strength yourself.

    Gradients (G = W·Wᵀ: ∂/∂W = (Ω + Ωᵀ)·W; G = Wᵀ·W: W·(Ω + Ωᵀ); Ω = ∂ψ/∂G, symmetric here):
    Ω = 2·M for the squared forms (∂ = 4·M·W on the rows); for "mc", Ω = sign(M_ij) on the entries
    attaining the maximum; for "srip", Ω = sign(λ_k)·q_k·q_kᵀ for the eigenpair (λ_k, q_k) with the
    largest ``|λ|`` (dσ = q_kᵀ·dM·q_k). "mc" and "srip" are maxima, not differentiable where the maximum
    is attained twice (other than by M_ij and its mirror M_ji, which are one function): two entries
    of equal modulus, or a repeated top ``|λ|`` (a repeated eigenvalue, or λ_max = −λ_min). There the
    backward returns the average of the tied terms' gradients, an element of the (Clarke)
    subdifferential (for a repeated eigenvalue, sign·P/m with P the projector onto its eigenspace:
    independent of the eigenvectors eigh picks); ties are detected by exact floating-point equality,
    so a near-tie gets the gradient of whichever term rounds larger. At the minimum M = 0 it is 0.

    Parameters
    ----------
    w : array, shape ``(d_out, ...)``
        W, flattened per output row to d_out × fan_in.
    kind : str, default "frobenius"
        ``"frobenius"``, ``"double"``, ``"off_diagonal"``, ``"mc"`` or ``"srip"`` (see above).
    gram : str, default "rows"
        ``"rows"`` (default) takes G = W·Wᵀ (d_out × d_out: orthonormal rows), ``"columns"``
        G = Wᵀ·W (fan_in × fan_in: orthonormal columns, Bansal et al.'s layout for a convolution's
        (k·k·C_in) × C_out matrix), ``"auto"`` the smaller of the two, the only one that can equal I
        (rows when d_out ≤ fan_in, so a tall weight or a 1×1 convolution with more filters than inputs
        gets its columns).
    squared : bool, default False
        Only with ``kind="srip"``: return σ² instead of σ (gradient 2σ·∂σ). The paper writes the SRIP
        term as σ(WᵀW − I) (Bansal et al. 2018, the SRIP regularizer λ·σ(WᵀW − I)); the authors' released code
        (VITA-Group/Orthogonality-in-CNNs, ``l2_reg_ortho``) squares the power-iteration estimate and
        takes the smaller Gram matrix (``gram="auto"`` here). ``True`` with another kind raises
        ``ValueError`` (the other kinds are already squared, or are a maximum of entries).

    Returns
    -------
    penalty : array, shape ``()``
        The penalty, a 0-d array.

    Notes
    -----
    Survey §6.2 (training with constraints: soft orthogonality penalties). Conventions: "srip" is the
    paper's σ by default; its code's σ² and side are ``squared=True, gram="auto"``; the code's two
    power-iteration steps (a random start) are not reproduced, σ here is exact. torch has no
    orthogonality penalty.

    References
    ----------
    .. [1] N. Bansal, X. Chen and Z. Wang, "Can We Gain More from Orthogonality Regularizations in
       Training Deep CNNs?", NeurIPS 2018.
    .. [2] D. Xie, J. Xiong and S. Pu, "All You Need is Beyond a Good Init: Exploring Better Solution for
       Training Extremely Deep Convolutional Neural Networks with Orthonormality and Modulation",
       CVPR 2017.
    .. [3] A. Brock, J. Donahue and K. Simonyan, "Large Scale GAN Training for High Fidelity Natural
       Image Synthesis", ICLR 2019.
    """
    fn = "orthogonal_penalty"
    _required(fn, w=w)
    xp = namespace(fn, w=w)
    _check_weight(fn, "w", w)
    kind = check_choice(fn, "kind", kind, PENALTIES)
    gram = check_choice(fn, "gram", gram, GRAMS)
    squared = check_bool(fn, "squared", squared)
    if squared and kind != "srip":
        raise ValueError(f"{fn}: squared=True applies to kind='srip' only (σ² of the spectral term); got kind={kind!r}")
    cd = compute_dtype(xp, w.dtype)
    a = _rows(xp, to_compute(xp, w, cd))
    r, c = a.shape
    sides = ("rows", "columns") if kind == "double" else (_gram_side(gram, r, c),)
    val = None
    omegas = {"rows": None, "columns": None}
    for side in sides:
        g = xp.matmul(a, xp.matrix_transpose(a)) if side == "rows" else xp.matmul(xp.matrix_transpose(a), a)
        g = _mf.sym(xp, g)  # exactly symmetric: the mirror entries M_ij, M_ji tie exactly in "mc"
        eye = _mf.eye_like(xp, g)
        m1 = g * (1.0 - eye) if kind == "off_diagonal" else g - eye
        if kind in ("frobenius", "double", "off_diagonal"):
            v, om = xp.sum(m1 * m1), 2.0 * m1
        elif kind == "mc":
            am = xp.abs(m1)
            v = xp.max(am)
            top = xp.astype(am == v, cd)  # the entries attaining the maximum (ties: averaged)
            om = xp.sign(m1) * top / xp.sum(top)
        else:  # srip
            lam, q = _mf.eigh(xp, m1)
            al = xp.abs(lam)
            v = xp.max(al)
            top = xp.astype(al == v, cd)
            wts = xp.sign(lam) * top / xp.sum(top)
            om = xp.matmul(q * wts[None, :], xp.matrix_transpose(q))
            if squared:  # ψ = σ²: ∂ψ/∂M = 2σ·∂σ/∂M
                om = (2.0 * v) * om
                v = v * v
        val = v if val is None else val + v
        omegas[side] = om
    if not isinstance(val, type(a)):  # NumPy's reductions give scalars: return a 0-d array like every library
        val = xp.asarray(val)
    return _out(xp, val, w.dtype), Residuals((a, omegas["rows"], omegas["columns"]), (tuple(w.shape),))


@orthogonal_penalty.defbackward
def _penalty_backward(res, g):
    a, om_r, om_c = res.arrays
    (shape,) = res.static
    xp = namespace("orthogonal_penalty.backward", cotangent=g)
    g = to_compute(xp, g, a.dtype)
    # dψ = ⟨Ω, dG⟩ with dG = dW·Wᵀ + W·dWᵀ (rows) or dWᵀ·W + Wᵀ·dW (columns), Ω symmetric:
    # ∂ψ/∂W = 2·Ω·W (rows), 2·W·Ω (columns).
    da = None
    if om_r is not None:
        da = 2.0 * xp.matmul(om_r, a)
    if om_c is not None:
        dc = 2.0 * xp.matmul(a, om_c)
        da = dc if da is None else da + dc
    return (xp.reshape(g * da, shape),)


# --------------------------------------------------------------------------------------------------
# cosine normalization (Luo et al., 2018)


def _ex_cosine(rng):
    for xs, ws in [((5, 4), (3, 4)), ((2, 3, 6), (4, 3, 2)), ((7,), (2, 7)), ((3, 12), (5, 3, 2, 2))]:
        yield Example((rng.standard_normal(xs), rng.standard_normal(ws)), {}, label=f"x{xs} w{ws}")
    yield Example((rng.standard_normal((3, 4)), rng.standard_normal((2, 4))), dict(eps=1e-2), label="eps=1e-2")


def _cos_bounded(m, xp, out, args, kwargs):
    """Outputs are cosines (|y| ≤ 1) and equal the exact cosine up to the eps's effect."""
    x = _np.asarray(to_numpy(args[0]), _np.float64)
    w = _np_rows(args[1])
    eps = kwargs.get("eps", 1e-12)
    y = _np.asarray(to_numpy(m.primary(out)), _np.float64)
    xn = _np.sqrt((x * x).sum(-1, keepdims=True) + eps)
    wn = _np.sqrt((w * w).sum(-1) + eps)
    ref = (x @ w.T) / xn / wn
    return max(_rel(y, ref), float(max(0.0, _np.max(_np.abs(y)) - 1.0)))


@method(
    array_params=("x", "w"),
    category="weight",
    survey="§6.3 (cosine normalization merges layer and weight normalization)",
    paper="Luo, Zhan, Xue, Wang, Ren & Yang, Cosine Normalization: Using Cosine Similarity Instead of Dot Product "
          "in Neural Networks, ICANN 2018",
    examples=_ex_cosine,
    invariants=(Invariant("cosines of x with each row of w", _cos_bounded, scale=64.0),),
)
def cosine_norm(x: Any, w: Any, eps: float = 1e-12) -> Any:
    """Cosine normalization of a linear layer: y_{…j} = ⟨x, w_j⟩/(‖x‖·‖w_j‖), in [−1, 1].

    A convolution applies this to each unfolded patch. Both norms are regularized as √(‖·‖² + ε)
    (ε inside the root, ε > 0): a zero input or a zero row gives a zero output, never NaN; the
    relative effect of ε is ε/‖·‖² (1e-12 by default: below float32 round-off for norms above 1e-2).
    The paper's bias variant folds b into w and a constant 1 into x.

    Backward, with x̂ = x/‖x‖, ŵ = w/‖w‖ and y = x̂·ŵᵀ: dx̂ = g·ŵ, dŵ = gᵀ·x̂ (summed over samples),
    dx = (dx̂ − x̂·⟨x̂, dx̂⟩)/‖x‖, dw = (dŵ − ŵ·⟨ŵ, dŵ⟩)/‖w‖.

    Parameters
    ----------
    x : array, shape ``(..., fan_in)``
        The input.
    w : array, shape ``(d_out, d_in, *kernel)``
        The weight, fan_in = d_in·Πkernel.
    eps : float, default 1e-12
        ε > 0, inside the root of both norms.

    Returns
    -------
    y : array, shape ``(..., d_out)``
        The cosines.

    Notes
    -----
    Survey §6.3 (combining activation normalization: cosine normalization).

    References
    ----------
    .. [1] C. Luo, J. Zhan, L. Wang and Q. Yang, "Cosine Normalization: Using Cosine Similarity Instead
       of Dot Product in Neural Networks", ICANN 2018.
    """
    fn = "cosine_norm"
    _required(fn, x=x, w=w)
    xp = namespace(fn, x=x, w=w)
    _check_weight(fn, "w", w)
    if x.ndim < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension (..., fan_in); got shape {tuple(x.shape)}")
    fan_in = math.prod(w.shape[1:])
    if x.shape[-1] != fan_in:
        raise ValueError(
            f"{fn}: x's last dimension must be w's fan-in {fan_in} (w of shape {tuple(w.shape)}); "
            f"got x of shape {tuple(x.shape)}"
        )
    eps = check_positive(fn, "eps", eps)
    cd = compute_dtype(xp, x.dtype)
    xc = to_compute(xp, x, cd)
    wm = _rows(xp, to_compute(xp, w, cd))
    nx = xp.sqrt(xp.sum(xc * xc, axis=-1, keepdims=True) + eps)
    nw = xp.sqrt(xp.sum(wm * wm, axis=-1, keepdims=True) + eps)
    xh, wh = xc / nx, wm / nw
    y = xp.matmul(xh, xp.matrix_transpose(wh)) if xh.ndim > 1 else xp.matmul(wh, xh)
    return _out(xp, y, x.dtype), Residuals((xh, nx, wh, nw), (tuple(w.shape),))


@cosine_norm.defbackward
def _cosine_backward(res, g):
    xh, nx, wh, nw = res.arrays
    (wshape,) = res.static
    xp = namespace("cosine_norm.backward", cotangent=g)
    g = to_compute(xp, g, xh.dtype)
    dxh = xp.matmul(g, wh)  # (..., fan_in)
    g2 = xp.reshape(g, (-1, g.shape[-1]))
    x2 = xp.reshape(xh, (-1, xh.shape[-1]))
    dwh = xp.matmul(xp.matrix_transpose(g2), x2)  # (d_out, fan_in)
    # the regularized norm √(‖x‖²+ε) has the same derivative form: d(x/ν) = (dx − x̂·⟨x̂, dx⟩)/ν,
    # since ∂ν/∂x = x/ν = x̂ whatever ε is.
    dx = _unit_backward(xp, xh, nx, (-1,), dxh)
    dw = _unit_backward(xp, wh, nw, (-1,), dwh)
    return dx, xp.reshape(dw, wshape)
