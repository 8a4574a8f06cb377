"""Decorrelation penalties on activations (survey §5.1.2, decorrelating as a soft constraint).

Whitening (:mod:`normref.whitening`) decorrelates the activations exactly, in the forward pass. The
other route the survey names is a penalty in the loss that pushes the off-diagonal covariances of a
layer's activations towards 0: DeCov (Cogswell, Ahmed, Girshick, Zitnick & Batra, ICLR 2016).

With H the (M, d) matrix of a layer's activations (M samples, d features) and Ĥ = H − 1·μᵀ centred,
the covariance C = ĤᵀĤ/M is the Gram matrix of the columns of Ĥ/√M. DeCov's loss

    L = ½ (‖C‖²_F − ‖diag(C)‖²₂) = ½ ‖C ∘ (11ᵀ − I)‖²_F

is therefore half of :func:`normref.orthogonal_penalty`'s ``"off_diagonal"`` form (BigGAN's
orthogonality without unit norms) on the columns of Ĥ/√M. :func:`decov_penalty` is that composition:
its forward and its analytic backward are orthogonal_penalty's (one formula), with the centring and
the 1/√M scale around them.
"""

from __future__ import annotations

import math

import numpy as _np

from ._validate import check_ndim
from ._xp import Array, compute_dtype, namespace, to_compute, to_numpy
from .registry import Example, Invariant, Residuals, method
from .weight import orthogonal_penalty

__all__ = ["decov_penalty"]


def _samples_by_features(xp, x):
    """(M, d): the samples as rows, the features as columns. (N, d) stays; (N, C, *S) puts the
    channels last and takes every position of every sample as a sample (M = N·∏S), the covariance of
    the channels that decorrelated batch normalization whitens (survey Eqn 20, Π_BN)."""
    if x.ndim == 2:
        return x
    perm = (0,) + tuple(range(2, x.ndim)) + (1,)
    return xp.reshape(xp.permute_dims(x, perm), (-1, int(x.shape[1])))


def _from_samples_by_features(xp, rows, shape):
    """The inverse of :func:`_samples_by_features` for an input of ``shape``."""
    if len(shape) == 2:
        return rows
    n, c, spatial = shape[0], shape[1], tuple(shape[2:])
    back = xp.reshape(rows, (n,) + spatial + (c,))
    nd = len(shape)
    return xp.permute_dims(back, (0, nd - 1) + tuple(range(1, nd - 1)))


def _ex_decov(rng):
    for shape in [(6, 4), (5, 3), (3, 4, 2, 2), (2, 3, 5)]:
        x = rng.standard_normal(shape)
        # correlated features, so that the penalty and its gradient are far from 0
        x = x + 0.7 * _np.roll(x, 1, axis=1)
        yield Example((x,), {}, label=f"{shape}")


def _np_decov(x) -> float:
    """Cogswell et al.'s definition, term by term: C_ij = 1/M Σ_n (h_i^n − μ_i)(h_j^n − μ_j),
    L = ½(‖C‖²_F − ‖diag C‖²₂), in float64 NumPy."""
    h = _np.asarray(x, _np.float64)
    if h.ndim > 2:
        h = _np.moveaxis(h, 1, -1).reshape(-1, h.shape[1])
    hc = h - h.mean(axis=0)
    c = hc.T @ hc / h.shape[0]
    return 0.5 * (float(_np.sum(c * c)) - float(_np.sum(_np.diag(c) ** 2)))


def _decov_matches_definition(m, xp, out, args, kwargs):
    """The penalty equals the paper's definition evaluated independently (relative error)."""
    ref = _np_decov(to_numpy(args[0]))
    val = float(_np.asarray(to_numpy(out), _np.float64))
    return abs(val - ref) / max(abs(ref), 1e-300)


def _decov_shift_invariant(m, xp, out, args, kwargs):
    """A covariance penalty does not see a constant added to a feature (relative change)."""
    x = args[0]
    shift = 3.0 * xp.ones_like(x)
    if x.ndim > 2:  # one shift per channel, the same at every position
        shift = shift * xp.reshape(xp.arange(1, int(x.shape[1]) + 1, dtype=x.dtype),
                                   (1, -1) + (1,) * (x.ndim - 2))
    moved = float(_np.asarray(to_numpy(m(x + shift)), _np.float64))
    val = float(_np.asarray(to_numpy(out), _np.float64))
    return abs(moved - val) / max(abs(val), 1e-300)


@method(
    array_params=("input",),
    # a loss term, not a layer: the frameworks' layer generators (which take the "activation"
    # methods) leave it alone; the conformance suite checks it like every method
    category="penalty",
    survey="§5.1.2 (decorrelating: a soft decorrelation penalty, the counterpart of whitening)",
    paper="Cogswell, Ahmed, Girshick, Zitnick & Batra, Reducing Overfitting in Deep Networks by Decorrelating "
          "Representations, ICLR 2016 (DeCov)",
    examples=_ex_decov,
    invariants=(
        Invariant("equals Cogswell et al.'s definition", _decov_matches_definition, scale=64.0),
        Invariant("invariant to a constant shift of each feature", _decov_shift_invariant, scale=256.0),
    ),
)
def decov_penalty(input: Array) -> Array:
    r"""DeCov: half the squared Frobenius norm of the off-diagonal covariances of the activations.

    .. math::

        C = \tfrac{1}{M} \hat H^\top \hat H, \quad \hat H = H - \mathbf 1 \mu^\top, \qquad
        L = \tfrac12 \left(\lVert C \rVert_F^2 - \lVert \operatorname{diag}(C) \rVert_2^2\right)
          = \tfrac12 \lVert C \circ (\mathbf 1\mathbf 1^\top - I) \rVert_F^2

    with H the (M, d) activations. Computed as ``0.5 * orthogonal_penalty(Ĥ/√M, kind="off_diagonal",
    gram="columns")`` (C is the Gram matrix of the columns of Ĥ/√M), so the forward and the analytic
    backward are :func:`normref.orthogonal_penalty`'s.

    Backward: with Ω = ∂L/∂C = C∘(11ᵀ − I) and dC = (dĤᵀĤ + ĤᵀdĤ)/M, ∂L/∂H = (2/M)·Ĥ·Ω·g, then the
    centring's projection (a no-op in exact arithmetic: the columns of Ĥ, hence of Ĥ·Ω, sum to 0). Multiply by the regularization strength
    yourself.

    Parameters
    ----------
    input : Array
        H, ``(N, d)`` (samples × features: a fully connected layer, as in the paper), or ``(N, C, *S)``
        (the features are the C channels and every position of every sample is a sample, M = N·∏S:
        the channel covariance decorrelated batch normalization whitens; an extension of the paper,
        which penalizes fully connected layers).

    Returns
    -------
    Array
        The penalty L, a 0-d array of ``input``'s dtype.

    Notes
    -----
    Survey §5.1.2 (decorrelating the activations; the penalty form of what whitening does exactly).
    The covariance is the biased one (1/M), as in the paper; its gradient at uncorrelated
    activations is 0. The gradient flows through the batch mean (the centring), as in the paper.

    References
    ----------
    .. [1] M. Cogswell, F. Ahmed, R. Girshick, L. Zitnick and D. Batra, "Reducing Overfitting in Deep
       Networks by Decorrelating Representations", ICLR 2016.
    """
    fn = "decov_penalty"
    if input is None:
        raise TypeError(f"{fn}: input must be an array; got None")
    xp = namespace(fn, input=input)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, d) or (N, C, *spatial)")
    shape = tuple(int(d) for d in input.shape)
    if shape[1] < 1:
        raise ValueError(f"{fn}: input must have at least 1 feature (input.shape[1] >= 1); got shape {shape}")
    m_samples = math.prod(shape) // shape[1]
    if m_samples < 2:
        raise ValueError(
            f"{fn}: input must hold at least 2 samples per feature (a covariance of 1 sample is 0); got "
            f"shape {shape}, {m_samples} sample(s)"
        )
    cd = compute_dtype(xp, input.dtype)
    h = _samples_by_features(xp, to_compute(xp, input, cd))
    scaled = (h - xp.mean(h, axis=0, keepdims=True)) / math.sqrt(m_samples)
    inner, inner_res = orthogonal_penalty.forward(scaled, kind="off_diagonal", gram="columns")
    out = xp.asarray(0.5 * inner)  # NumPy turns a 0-d array times a float into a scalar
    if out.dtype != input.dtype:
        out = xp.astype(out, input.dtype)
    # the inner residuals' arrays are this method's arrays (pytree leaves for the JAX adapter)
    return out, Residuals(inner_res.arrays, (inner_res.static, inner_res.meta, shape, m_samples))


@decov_penalty.defbackward
def _decov_backward(res: Residuals, g):
    inner_static, inner_meta, shape, m_samples = res.static
    inner_res = Residuals(res.arrays, inner_static, inner_meta)
    xp = namespace("decov_penalty.backward", cotangent=g)
    (ds,) = orthogonal_penalty.backward(inner_res, 0.5 * to_compute(xp, g, inner_res.meta.dtype))
    # scaled = (h − mean_rows(h))/√M: the transpose is the same centring and scale
    dh = (ds - xp.mean(ds, axis=0, keepdims=True)) / math.sqrt(m_samples)
    return (_from_samples_by_features(xp, dh, shape),)
