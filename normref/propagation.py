"""Normalization propagation (survey §6, Arpit, Zhou, Kota & Govindaraju, ICML 2016).

NormProp normalizes without batch statistics. If a layer's input x has zero mean and identity
covariance, the pre-activation z_i = W_iᵀx has mean 0 and variance ‖W_i‖²; dividing by ‖W_i‖ makes it
N(0, 1)-like whatever the data, and after a ReLU the known moments of the rectified standard normal,

    E[max(0, u)] = 1/√(2π),   Var[max(0, u)] = ½(1 − 1/π)      for u ~ N(0, 1),

standardize the activation for the next layer: the normalization is *propagated* through the network by
data-independent constants, computed once (the paper's "parametric estimate of mean and standard
deviation in every layer"). :func:`norm_prop` is one such layer after its linear map.
"""

from __future__ import annotations

import math
import numpy as _np

from ._validate import check_choice, check_ndim, concrete_any
from ._xp import Array, compute_dtype, namespace, to_compute, to_numpy
from .registry import Example, Invariant, Residuals, method

__all__ = ["norm_prop"]

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
    variance off by about 0.1 with 64 channels and 0.3–0.5 with 8, depending on the draw).

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
