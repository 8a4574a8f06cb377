"""Normalization propagation (survey §6, Arpit, Zhou, Kota & Govindaraju, ICML 2016).

NormProp normalizes without batch statistics. If a layer's input x has zero mean and identity
covariance, the pre-activation z_i = W_iᵀx has mean 0 and variance ‖W_i‖²; dividing by ‖W_i‖ makes it
N(0, 1)-like whatever the data, and after a ReLU the known moments of the rectified standard normal,

    E[max(0, u)] = 1/√(2π),   Var[max(0, u)] = ½(1 − 1/π)      for u ~ N(0, 1),

standardize the activation for the next layer: the normalization is *propagated* through the network by
data-independent constants, computed once (the paper's "parametric estimate of mean and standard
deviation in every layer"). :func:`norm_prop` is one such layer after its linear map;
:func:`propagate_moments` is the data-independent estimate itself: the mean and variance of each unit
carried analytically through a linear map (independent inputs) and a ReLU of a Gaussian.
"""

from __future__ import annotations

import math
import numpy as _np

from ._validate import check_choice, check_ndim, concrete_any
from ._xp import Array, compute_dtype, namespace, to_compute, to_numpy
from .registry import Example, Invariant, Residuals, method

__all__ = ["norm_prop", "propagate_moments"]

#: E[max(0, u)] for u ~ N(0, 1): ∫₀^∞ u φ(u) du = φ(0) = 1/√(2π)
RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)
#: √Var[max(0, u)] for u ~ N(0, 1): E[max(0, u)²] = ½, so Var = ½ − 1/(2π) = ½(1 − 1/π)
RELU_STD = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))

ACTIVATIONS = ("relu", "identity")


def _channel(xp, a, ndim):
    return xp.reshape(a, (1, -1) + (1,) * (ndim - 2))


def _row_norms(xp, w):
    rows = xp.reshape(w, (int(w.shape[0]), -1))
    return xp.sqrt(xp.sum(rows * rows, axis=1))


def _ex_norm_prop(rng):
    for zs, ws in [((5, 3), (3, 4)), ((2, 4, 3, 3), (4, 2, 3, 3)), ((3, 2, 5), (2, 3, 2))]:
        c = ws[0]
        w = rng.standard_normal(ws)
        z = rng.standard_normal(zs) * 1.5
        g, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c) * 0.3
        yield Example((z, w, g, b), {}, label=f"z{zs} w{ws} relu")
        yield Example((z, w), {}, label=f"z{zs} w{ws} relu, no affine")
        yield Example((z, w, g, b), dict(activation="identity"), label=f"z{zs} w{ws} identity (last layer)")


def _scale_invariant(m, xp, out, args, kwargs):
    """z = W·x scales with W: norm_prop(c·z, c·W) = norm_prop(z, W) (largest deviation)."""
    z, w = args[0], args[1]
    y2 = m(z * 3.0, w * 3.0, *args[2:], **kwargs)
    a = _np.asarray(to_numpy(out), _np.float64)
    b = _np.asarray(to_numpy(y2), _np.float64)
    return float(_np.max(_np.abs(a - b)) / max(1.0, float(_np.max(_np.abs(a)))))


@method(
    array_params=("input", "w", "weight", "bias"),
    category="weight",
    survey="§6 (normalizing weights: normalization propagation, the data-independent route)",
    paper="Arpit, Zhou, Kota & Govindaraju, Normalization Propagation: A Parametric Technique for Removing "
          "Internal Covariate Shift in Deep Networks, ICML 2016",
    examples=_ex_norm_prop,
    invariants=(Invariant("norm_prop(c·z, c·W) = norm_prop(z, W)", _scale_invariant, scale=64.0),),
)
def norm_prop(
    input: Array, w: Array, weight: Array | None = None, bias: Array | None = None, activation: str = "relu"
) -> Array:
    r"""Normalization propagation after a linear map: z/‖W_i‖, affine, then a re-standardized ReLU.

    .. math::

        u_i = \gamma_i \frac{z_i}{\lVert W_i \rVert_2} + \beta_i, \qquad
        h_i = \frac{\max(0, u_i) - \sqrt{1/(2\pi)}}{\sqrt{\tfrac12 (1 - 1/\pi)}}

    with z = W·x the layer's output without bias (a linear layer's ``x @ W.T`` or a convolution's
    ``conv(x, W)``), W_i the i-th output row (filter) and channel i of z. The paper's assumption: if x
    has zero mean and identity covariance, u_i ~ N(β_i, γ_i²) and h_i has mean 0 and variance 1 for
    γ = 1, β = 0 (the paper standardizes the data per feature and relies on nearly incoherent
    weights for the rest; it does not whiten).

    Backward: with r = 1[u > 0] for ReLU, 1 for identity, and ĝ = g·r/√(½(1 − 1/π)) for ReLU, g otherwise,
    ∂z = ĝ·γ/‖W_i‖, ∂γ_i = Σ ĝ·z/‖W_i‖, ∂β_i = Σ ĝ, ∂W_i = −(Σ ĝ·γ_i·z_i/‖W_i‖²)·W_i/‖W_i‖ (the
    gradient through the norm, as in the paper; the sums run over every axis but the channel axis).

    Parameters
    ----------
    input : Array
        z = W·x, ``(N, C)`` or ``(N, C, *spatial)``, C = ``w.shape[0]``.
    w : Array
        The layer's weight W, ``(C, *fan_in)`` (linear ``(C, in)``, convolution ``(C, in/groups, *k)``).
    weight, bias : Array or None, default None
        γ and β, ``(C,)`` (``None``: 1 and 0). Published NormProp implementations start γ at 1/1.21
        in convolution layers (a correction for overlapping patches; not checked against the paper's
        text here): pass ``weight`` = 1/1.21 to reproduce them.
    activation : str, default "relu"
        ``"relu"`` (the paper's hidden layers) or ``"identity"`` (the last layer: u itself).

    Returns
    -------
    Array
        h, ``input``'s shape and dtype.

    Notes
    -----
    Survey §6 (the weight-normalization family's data-independent member). The normalization by
    ‖W_i‖ is weight normalization (:func:`normref.weight_norm`) applied to the output rather than to
    W; the ReLU constants are exact for a standard normal pre-activation and are what the paper
    propagates. The paper's first layer divides by the data's per-feature standard deviation too; do
    that once in the input pipeline. The gradient at u = 0 is taken as 0 (torch's ReLU convention).
    The constants are exact only for a Gaussian pre-activation: the first layer's, for Gaussian
    data. Deeper pre-activations are sums of rectified terms, Gaussian only in the limit of many
    inputs, so there the standardization is the paper's approximation: how far it is off depends on
    the width and the weights (measured on Gaussian data through a second layer: the worst channel's
    variance off by about 0.1 with 64 channels and 0.3–0.5 with 8, depending on the draw). The moments
    of the ReLU of a non-standard Gaussian (γ ≠ 1 or β ≠ 0), and their propagation through further
    layers, are :func:`propagate_moments`.

    References
    ----------
    .. [1] D. Arpit, Y. Zhou, B. U. Kota and V. Govindaraju, "Normalization Propagation: A Parametric
       Technique for Removing Internal Covariate Shift in Deep Networks", ICML 2016.
    """
    fn = "norm_prop"
    for name, a in (("input", input), ("w", w)):
        if a is None:
            raise TypeError(f"{fn}: {name} must be an array; got None")
    xp = namespace(fn, input=input, w=w, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    check_ndim(fn, "w", w, min_ndim=2, what="(C, *fan_in)")
    activation = check_choice(fn, "activation", activation, ACTIVATIONS)
    c = int(w.shape[0])
    if int(input.shape[1]) != c:
        raise ValueError(
            f"{fn}: input.shape[1] must equal the number of output rows w.shape[0] = {c} (input is the "
            f"layer's output z = W·x); got input shape {tuple(input.shape)}"
        )
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None and tuple(a.shape) != (c,):
            raise ValueError(f"{fn}: {name} must have shape ({c},) (one per output channel); got {tuple(a.shape)}")
    cd = compute_dtype(xp, input.dtype)
    z = to_compute(xp, input, cd)
    wc = to_compute(xp, w, cd)
    norms = _row_norms(xp, wc)
    if concrete_any(xp, norms == 0.0):  # checked where the values are known (not under a jit trace)
        raise ValueError(f"{fn}: w has a zero row (‖W_i‖ = 0: the normalization is undefined)")
    zn = z / _channel(xp, norms, z.ndim)
    gam = None if weight is None else _channel(xp, to_compute(xp, weight, cd), z.ndim)
    u = zn if gam is None else zn * gam
    if bias is not None:
        u = u + _channel(xp, to_compute(xp, bias, cd), z.ndim)
    if activation == "relu":
        y = (xp.where(u > 0.0, u, xp.zeros_like(u)) - RELU_MEAN) / RELU_STD
    else:
        y = u
    out = y if y.dtype == input.dtype else xp.astype(y, input.dtype)
    return out, Residuals((zn, u, wc, norms, gam), (activation, weight is not None, bias is not None))


@norm_prop.defbackward
def _norm_prop_backward(res: Residuals, g):
    zn, u, wc, norms, gam = res.arrays
    activation, has_w, has_b = res.static
    xp = namespace("norm_prop.backward", cotangent=g)
    g = to_compute(xp, g, u.dtype)
    if activation == "relu":
        g = xp.where(u > 0.0, g, xp.zeros_like(g)) / RELU_STD  # ∂h/∂u
    axes = (0,) + tuple(range(2, u.ndim))
    gz = g if gam is None else g * gam  # ∂/∂(z/‖W_i‖)
    nb = _channel(xp, norms, u.ndim)
    dz = gz / nb
    # z/‖W_i‖: ∂‖W_i‖ = −Σ gz·z/‖W_i‖² = −Σ gz·zn/‖W_i‖, and ∂W_i = ∂‖W_i‖·W_i/‖W_i‖
    dnorm = -xp.sum(gz * zn, axis=axes) / norms
    dw = xp.reshape(dnorm / norms, (-1,) + (1,) * (wc.ndim - 1)) * wc
    dgamma = xp.sum(g * zn, axis=axes) if has_w else None
    dbeta = xp.sum(g, axis=axes) if has_b else None
    return dz, dw, dgamma, dbeta


# --------------------------------------------------------------------------------------------------
# variance propagation: the data-independent moment estimates NormProp relies on

_SQRT2 = math.sqrt(2.0)
_SQRT_PI = math.sqrt(math.pi)
_SERIES_TERMS = 60  # erf's series, x < 1.5: terms (2x²)^n·x/(2n+1)!! fall below 1e-17 of the sum by then
_CF_TERMS = 100  # erfc's continued fraction, x ≥ 1.5: converged to ≤ 3e-16 relative (checked to x = 26)


def _erfc(xp, x):
    """erfc(x) for x ≥ 0 with array-API elementary functions only (the standard has no erf).

    x < 1.5: erf(x) = (2/√π)·e^{−x²}·Σ_n (2x²)^n·x/(1·3···(2n+1)) (positive terms, no cancellation),
    erfc = 1 − erf (erfc ≥ 0.034 there: ≤ 1e-14 relative). x ≥ 1.5: the continued fraction
    erfc(x) = e^{−x²}/√π · 1/(x + ½/(x + 1/(x + (3/2)/(x + …)))) evaluated bottom-up with 100 terms.
    Each branch is evaluated on inputs clipped to its range and the two are selected per element."""
    x0 = 1.5
    xs = xp.where(x < x0, x, xp.zeros_like(x))
    t = xs
    acc = xs
    for n in range(1, _SERIES_TERMS):
        t = t * (2.0 * xs * xs) / (2.0 * n + 1.0)
        acc = acc + t
    small = 1.0 - (2.0 / _SQRT_PI) * xp.exp(-xs * xs) * acc
    xc = xp.where(x < x0, xp.full_like(x, x0), x)
    f = xc
    for k in range(_CF_TERMS, 0, -1):
        f = xc + (0.5 * k) / f
    large = xp.exp(-xc * xc) / (_SQRT_PI * f)
    return xp.where(x < x0, small, large)


def _norm_cdf(xp, a):
    """Φ(a) = ½·erfc(−a/√2): the small tail computed directly for either sign. |a| is formed by a
    ``where`` rather than ``abs`` so that autograd (the tests' oracle) differentiates the a ≥ 0 branch
    at a = 0, giving Φ'(0) = φ(0) (abs'(0) = 0 would give 0)."""
    tail = 0.5 * _erfc(xp, xp.where(a < 0.0, -a, a) / _SQRT2)
    return xp.where(a < 0.0, tail, 1.0 - tail)


def _norm_pdf(xp, a):
    return xp.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


MOMENT_ACTIVATIONS = ("relu", "identity")


def _ex_moments(rng):
    mom = _np.stack([rng.standard_normal(4) * 0.5, rng.uniform(0.5, 2.0, 4)])
    yield Example((mom, rng.standard_normal((3, 4)) * 0.5), {}, label="linear 4 → 3, relu")
    yield Example((mom, rng.standard_normal((3, 4)) * 0.5, rng.standard_normal(3) * 0.3), dict(activation="identity"),
                  label="linear with bias, identity")
    yield Example((mom[:, :2], rng.standard_normal((3, 2, 2, 2)) * 0.4, rng.standard_normal(3) * 0.3), {},
                  label="convolution (3, 2, 2, 2) with bias, relu")
    yield Example((_np.stack([_np.array([-3.0, -0.4, 0.0, 0.7, 4.0]), _np.array([0.8, 1.0, 1.0, 0.3, 2.0])]),), {},
                  label="relu only, tails and the standard normal")


def _moment_bounds(m, xp, out, args, kwargs):
    """After a ReLU: V ≥ 0, E ≥ max(μ, 0) (Jensen) and V ≤ v (ReLU is 1-Lipschitz): the largest violation,
    relative to the pre-activation's scale (μ, v recomputed in NumPy from the arguments)."""
    if kwargs.get("activation", "relu") != "relu":
        return None
    mom = _np.asarray(to_numpy(args[0]), _np.float64)
    mu, v = mom[0], mom[1]
    if len(args) > 1 and args[1] is not None:
        w = _np.asarray(to_numpy(args[1]), _np.float64)
        k = w.reshape(w.shape[0], w.shape[1], -1)
        mu, v = k.sum(axis=2) @ mu, (k * k).sum(axis=2) @ v
        if len(args) > 2 and args[2] is not None:
            mu = mu + _np.asarray(to_numpy(args[2]), _np.float64)
    y = _np.asarray(to_numpy(out), _np.float64)
    scale = max(1.0, float(_np.max(_np.abs(mu))), float(_np.max(v)))
    worst = max(float(_np.max(-y[1])), float(_np.max(_np.maximum(mu, 0.0) - y[0])), float(_np.max(y[1] - v)))
    return max(worst, 0.0) / scale


@method(
    array_params=("moments", "w", "bias"),
    category="weight",
    survey="§6 (normalization propagation and variance propagation: data-independent estimates of each layer's "
           "mean and variance)",
    paper="Arpit, Zhou, Kota & Govindaraju, Normalization Propagation: A Parametric Technique for Removing "
          "Internal Covariate Shift in Deep Networks, ICML 2016",
    examples=_ex_moments,
    invariants=(Invariant("after a ReLU: 0 ≤ V ≤ v, E ≥ max(μ, 0)", _moment_bounds, scale=256.0),),
)
def propagate_moments(moments: Array, w: Array | None = None, bias: Array | None = None,
                      activation: str = "relu") -> Array:
    r"""Variance propagation: each unit's mean and variance through a linear map and an activation.

    ``moments`` holds (μ, σ²) of the layer's inputs, row 0 the means and row 1 the variances. The
    linear map z = W·x + b (a convolution's W summed over its kernel positions) gives, for
    independent inputs,

    .. math::

        m_i = \sum_{j,k} W_{ijk}\,\mu_j + b_i, \qquad v_i = \sum_{j,k} W_{ijk}^2\,\sigma_j^2,

    and a ReLU of a Gaussian u ~ N(m, v), s = √v, α = m/s, Φ and φ the standard normal CDF and
    density, has

    .. math::

        E = m\,\Phi(\alpha) + s\,\varphi(\alpha), \qquad
        E[\max(0,u)^2] = (m^2 + v)\,\Phi(\alpha) + m\,s\,\varphi(\alpha), \qquad V = E[\cdot^2] - E^2.

    For m = 0, v = 1 these are NormProp's constants 1/√(2π) and ½(1 − 1/π) (:data:`RELU_MEAN` and
    the square of :data:`RELU_STD`). Composing calls layer by layer propagates the estimates through a network
    without data (Arpit et al.'s "parametric estimate", here for any mean and variance rather than
    only the standardized case).

    Backward (derived from the formulas: ∂E/∂m = Φ, ∂E/∂s = φ, ∂E[·²]/∂m = 2E, ∂E[·²]/∂s = 2sΦ, and
    ∂/∂v = ∂/∂s/(2s)): with cotangents (ḡ_E, ḡ_V),
    dm = ḡ_E·Φ + ḡ_V·2E·(1 − Φ), dv = ḡ_E·φ/(2s) + ḡ_V·(Φ − E·φ/s); through the linear map
    dμ = W̄ᵀ·dm, dσ² = (W²)̄ᵀ·dv, dW_{ijk} = dm_i·μ_j + 2·W_{ijk}·dv_i·σ_j², db = dm. A zero variance
    (a deterministic unit) takes the limits E = max(m, 0), V = 0, ∂E/∂m = ∂V/∂v = 1[m > 0], and 0
    for the rest.

    Parameters
    ----------
    moments : Array, shape ``(2, d_in)``
        Row 0: the means μ; row 1: the variances σ² ≥ 0 (the units are taken as independent).
    w : Array or None, default None
        The weight, ``(d_out, d_in)`` or a convolution's ``(d_out, d_in, *kernel)``; ``None``: the
        activation only (d_out = d_in).
    bias : Array or None, default None
        b, ``(d_out,)``.
    activation : str, default "relu"
        ``"relu"`` or ``"identity"`` (the linear map only).

    Returns
    -------
    Array, shape ``(2, d_out)``
        The output's means (row 0) and variances (row 1).

    Raises
    ------
    ValueError
        For a negative variance (concrete values), or shapes that do not fit together.

    Notes
    -----
    Survey §6 (normalization propagation). Exact for Gaussian pre-activations with independent
    inputs; deeper layers are Gaussian only approximately (see :func:`norm_prop`'s notes), and a
    convolution's padding and the correlations between overlapping patches are ignored, as in
    NormProp. Φ is evaluated with a series and a continued fraction (the array API has no erf), to
    about 1e-14 relative; where α ≲ −8, E = s·(α·Φ(α) + φ(α)) loses digits to cancellation.

    References
    ----------
    .. [1] D. Arpit, Y. Zhou, B. U. Kota and V. Govindaraju, "Normalization Propagation: A Parametric
       Technique for Removing Internal Covariate Shift in Deep Networks", ICML 2016.
    .. [2] A. Shekhovtsov and B. Flach, "Normalization of Neural Networks using Analytic Variance
       Propagation", CVWW 2018 (the "variance propagation" the survey lists beside NormProp in §6;
       they also propagate through the activation analytically).
    """
    fn = "propagate_moments"
    if moments is None:
        raise TypeError(f"{fn}: moments must be an array; got None")
    activation = check_choice(fn, "activation", activation, MOMENT_ACTIVATIONS)
    xp = namespace(fn, moments=moments, w=w, bias=bias)
    check_ndim(fn, "moments", moments, min_ndim=2, max_ndim=2, what="(2, d_in): the means and the variances")
    if int(moments.shape[0]) != 2:
        raise ValueError(f"{fn}: moments must have shape (2, d_in) (row 0 the means, row 1 the variances); "
                         f"got shape {tuple(moments.shape)}")
    d_in = int(moments.shape[1])
    if w is not None:
        check_ndim(fn, "w", w, min_ndim=2, what="(d_out, d_in, *kernel)")
        if int(w.shape[1]) != d_in:
            raise ValueError(f"{fn}: w.shape[1] must equal the number of input units moments.shape[1] = {d_in}; "
                             f"got w shape {tuple(w.shape)}")
    d_out = int(w.shape[0]) if w is not None else d_in
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"{fn}: bias must have shape ({d_out},) (one per output unit); got {tuple(bias.shape)}")
    cd = compute_dtype(xp, moments.dtype)
    mom = to_compute(xp, moments, cd)
    mu, var = mom[0, :], mom[1, :]
    if concrete_any(xp, var < 0.0):
        raise ValueError(f"{fn}: the variances (moments[1]) must be >= 0; got a negative one")
    wk = None
    if w is not None:
        wk = xp.reshape(to_compute(xp, w, cd), (d_out, d_in, -1))
        m = xp.matmul(xp.sum(wk, axis=2), mu[:, None])[:, 0]
        v = xp.matmul(xp.sum(wk * wk, axis=2), var[:, None])[:, 0]
    else:
        m, v = mu, var
    if bias is not None:
        m = m + to_compute(xp, bias, cd)
    if activation == "identity":
        out = xp.stack([m, v])
        phi_ = cdf = e = s = live = None
    else:
        live = v > 0.0
        s = xp.sqrt(xp.where(live, v, xp.ones_like(v)))
        a = m / s
        cdf, phi_ = _norm_cdf(xp, a), _norm_pdf(xp, a)
        e_live = m * cdf + s * phi_
        e2_live = (m * m + v) * cdf + m * s * phi_
        pos = xp.where(m > 0.0, m, xp.zeros_like(m))
        e = xp.where(live, e_live, pos)
        var_out = xp.where(live, e2_live - e_live * e_live, xp.zeros_like(v))
        # the same zero-variance limits for Φ (a step) and φ/s (0), used by the backward
        cdf = xp.where(live, cdf, xp.astype(m > 0.0, cd))
        phi_ = xp.where(live, phi_, xp.zeros_like(phi_))
        out = xp.stack([e, var_out])
    y = out if out.dtype == moments.dtype else xp.astype(out, moments.dtype)
    return y, Residuals((mu, var, wk, cdf, phi_, e, s),
                        (activation, None if w is None else tuple(w.shape), bias is not None))


@propagate_moments.defbackward
def _propagate_moments_backward(res: Residuals, g):
    mu, var, wk, cdf, phi_, e, s = res.arrays
    activation, wshape, has_b = res.static
    xp = namespace("propagate_moments.backward", cotangent=g)
    g = to_compute(xp, g, mu.dtype)
    ge, gv = g[0, :], g[1, :]
    if activation == "identity":
        dm, dv = ge, gv
    else:
        # dm = ḡ_E·Φ + ḡ_V·2E(1 − Φ); dv = ḡ_E·φ/(2s) + ḡ_V·(Φ − E·φ/s) (φ = 0 where v = 0: the limits)
        dm = ge * cdf + gv * 2.0 * e * (1.0 - cdf)
        dv = ge * phi_ / (2.0 * s) + gv * (cdf - e * phi_ / s)
    db = dm if has_b else None
    if wk is None:
        return xp.stack([dm, dv]), None, db
    wsum, w2sum = xp.sum(wk, axis=2), xp.sum(wk * wk, axis=2)
    dmu = xp.matmul(xp.matrix_transpose(wsum), dm[:, None])[:, 0]
    dvar = xp.matmul(xp.matrix_transpose(w2sum), dv[:, None])[:, 0]
    # m_i = Σ_jk W_ijk μ_j: ∂/∂W_ijk = dm_i·μ_j; v_i = Σ_jk W²_ijk σ²_j: 2·W_ijk·dv_i·σ²_j
    dw = (dm[:, None] * mu[None, :])[:, :, None] + 2.0 * wk * (dv[:, None] * var[None, :])[:, :, None]
    return xp.stack([dmu, dvar]), xp.reshape(dw, wshape), db
