"""Normalizing gradients (survey §7): layer-wise transforms of a gradient before the optimizer step.

Each function takes one layer's ``(weight, grad)`` and returns the new gradient, or takes two equally
long sequences ``(weights, grads)`` (one entry per layer) and returns a tuple of new gradients, one
per layer, each computed from its own layer only. Nothing is mutated.

They are registered :class:`~normref.registry.Method` objects (category ``"gradient"``) with analytic
backwards for the one-layer call, so they can sit inside a differentiated computation (a learned
optimizer, a meta-gradient) like any other method:

- block-wise normalization (Yu et al. 2017): g̃ = s·g/max(‖g‖, ε), s = 1 or ‖w‖ (``ratio=True``);
  for ‖g‖ > ε, dg = s·(c − ĝ·⟨ĝ, c⟩)/‖g‖ and, with the ratio, dw = ⟨c, ĝ⟩·w/‖w‖.
- LARS (You et al. 2017): λ = η·‖w‖/(‖g‖ + β·‖w‖ + ε), g̃ = λ·(g + β·w);
  ∂λ/∂w = η·(‖g‖ + ε)·ŵ/D², ∂λ/∂g = −η·‖w‖·ĝ/D² with D the denominator.
- gradient centralization (Yong et al. 2020): g̃_i = g_i − mean(g_i) over each output neuron's fan-in;
  linear, so dg = c − mean(c) (the centering operation of :mod:`normref.operation`).

Return annotations state what calling a method returns (the new gradient, or a tuple of them for
sequences); the forward functions themselves return it together with their
:class:`~normref.registry.Residuals`, the registry's convention.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as _np

from . import operation as _op
from ._validate import check_bool, check_nonnegative, check_positive
from ._xp import compute_dtype, device_of, namespace, to_compute, to_numpy
from .registry import REGISTRY, Example, Invariant, Method, Residuals

__all__ = ["block_gradient_norm", "lars", "gradient_centralization"]


class LayerwiseMethod(Method):
    """A :class:`Method` on one layer's ``(weight, grad)`` that, called with two sequences, maps over
    the layers and returns a tuple. ``forward``/``backward``/``normref.vjp`` take one layer."""

    def __call__(self, weight: Any, grad: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(grad, (list, tuple)):
            n = len(grad)
            if weight is None:
                weight = [None] * n
            if not isinstance(weight, (list, tuple)) or len(weight) != n:
                got = f"a {type(weight).__name__}" if not isinstance(weight, (list, tuple)) else f"{len(weight)} weights"
                raise ValueError(f"{self.name}: with a sequence of {n} gradients, weight must be a sequence of {n} "
                                 f"weights (one per layer); got {got}")
            return tuple(self.forward(w, g, *args, **kwargs)[0] for w, g in zip(weight, grad))
        return self.forward(weight, grad, *args, **kwargs)[0]


def _register(forward, *, name, examples, invariants=(), paper, survey, nondiff=()):
    forward.__name__ = forward.__qualname__ = name
    m = LayerwiseMethod(forward, name=name, array_params=("weight", "grad"), nondiff=nondiff, category="gradient",
                        survey=survey, paper=paper, examples=examples, invariants=tuple(invariants),
                        nullable=("weight",))  # an optional weight (the methods say when they need one)
    if name in REGISTRY:
        raise ValueError(f"a method named {name!r} is registered already")
    REGISTRY[name] = m
    return m


def _out(xp, y, dtype):
    return y if y.dtype == dtype else xp.astype(y, dtype)


def _check_pair(fn, weight, grad, need_weight: bool):
    if grad is None:
        raise TypeError(f"{fn}: grad must be an array; got None")
    if need_weight and weight is None:
        raise ValueError(f"{fn}: weight is required here (its norm enters the formula); got None")
    xp = namespace(fn, weight=weight, grad=grad)
    if weight is not None and tuple(weight.shape) != tuple(grad.shape):
        raise ValueError(f"{fn}: weight and grad must have the same shape; got weight {tuple(weight.shape)} "
                         f"and grad {tuple(grad.shape)}")
    return xp


def _norm(xp, a):
    return xp.sqrt(xp.sum(a * a))


def _f64(a):
    return _np.asarray(to_numpy(a), _np.float64)


# --------------------------------------------------------------------------------------------------
# block-wise (layer-wise) gradient normalization


def _ex_block(rng):
    for shape in [(4, 3), (3, 2, 2, 2), (5,)]:
        w, g = rng.standard_normal(shape), rng.standard_normal(shape) * 0.1
        yield Example((w, g), {}, label=f"{shape} unit norm")
        yield Example((w, g), dict(ratio=True), label=f"{shape} ratio ‖w‖")


def _block_norm_inv(m, xp, out, args, kwargs):
    """‖g̃‖ = 1 (or ‖w‖ with the ratio) and g̃ ∥ g."""
    w, g, y = _f64(args[0]), _f64(args[1]), _f64(out)
    target = float(_np.linalg.norm(w)) if kwargs.get("ratio") else 1.0
    return max(abs(float(_np.linalg.norm(y)) - target) / target,
               float(_np.max(_np.abs(y - target * g / _np.linalg.norm(g)))) / target)


def _block_forward(weight: Any, grad: Any, ratio: bool = False, eps: float = 1e-12) -> Any:
    """Block-wise gradient normalization: g̃ = g/max(‖g‖, ε), or ‖w‖·g/max(‖g‖, ε) with ``ratio=True``.

    One block is one layer's parameter tensor (the norm is over all of it). The unit-norm step removes
    the gradient's scale, so the learning rate alone sets each layer's step length; the ratio makes
    the step proportional to the weight's norm (Yu et al.'s adaptive variant, LARS's trust ratio
    without η). A gradient with ‖g‖ ≤ ε (zero, say) gives g/ε (zero), never NaN.

    Parameters
    ----------
    weight : array or None
        The layer's weight w; may be ``None`` unless ``ratio=True``.
    grad : array
        Its gradient g (one block).
    ratio : bool, default False
        Multiply by ‖w‖ (the adaptive variant).
    eps : float, default 1e-12
        ε, the floor on ‖g‖.

    Returns
    -------
    out : array or tuple of array
        The normalized gradient g̃, grad's shape.

    Notes
    -----
    Survey §7 (normalizing gradients). Called with two sequences (one weight and one gradient per
    layer; ``weight=None`` for all) the method maps over the layers and returns a tuple;
    ``forward``/``backward``/:func:`normref.vjp` take one layer.

    References
    ----------
    .. [1] A. W. Yu, L. Huang, Q. Lin, R. Salakhutdinov and J. Carbonell, "Block-Normalized Gradient
       Method: An Empirical Study for Training Deep Neural Network", arXiv:1707.04822, 2017.
    """
    fn = "block_gradient_norm"
    ratio = check_bool(fn, "ratio", ratio)
    xp = _check_pair(fn, weight, grad, need_weight=ratio)
    eps = check_positive(fn, "eps", eps)
    cd = compute_dtype(xp, grad.dtype)
    g = to_compute(xp, grad, cd)
    ng = _norm(xp, g)
    d = xp.maximum(ng, xp.asarray(eps, dtype=cd, device=device_of(g)))
    ghat = g / d
    w = nw = None
    if ratio:
        w = to_compute(xp, weight, cd)
        nw = _norm(xp, w)
        y = nw * ghat
    else:
        y = ghat
    return _out(xp, y, grad.dtype), Residuals((ghat, d, ng > eps, w, nw), (ratio, weight is not None))


def _block_backward(res, c):
    ghat, d, active, w, nw = res.arrays
    ratio, has_w = res.static
    xp = namespace("block_gradient_norm.backward", cotangent=c)
    c = to_compute(xp, c, ghat.dtype)
    s = nw if ratio else 1.0
    # ‖g‖ > ε: the unit-vector backward (projection off ĝ); ‖g‖ ≤ ε: g/ε is linear.
    proj = xp.where(active, xp.sum(c * ghat), xp.zeros_like(d))
    dg = s * (c - ghat * proj) / d
    dw = None
    if has_w:
        if ratio:
            safe = xp.where(nw > 0, nw, xp.ones_like(nw))
            dw = xp.sum(c * ghat) * w / safe  # ∂‖w‖/∂w = ŵ (0 at w = 0: a subgradient)
        else:
            dw = xp.zeros_like(ghat)
    return dw, dg


block_gradient_norm = _register(
    _block_forward, name="block_gradient_norm", examples=_ex_block,
    invariants=(Invariant("‖g̃‖ = 1 (or ‖w‖) along g", _block_norm_inv, scale=64.0),),
    survey="§7 (block-wise gradient normalization)",
    paper="Yu, Lin, Li, Salakhutdinov & Carbonell, Block-Normalized Gradient Method: An Empirical Study for "
          "Training Deep Neural Network, arXiv 2017",
)
block_gradient_norm.defbackward(_block_backward)


# --------------------------------------------------------------------------------------------------
# LARS


def _ex_lars(rng):
    for shape in [(4, 3), (3, 2, 2, 2), (6,)]:
        w, g = rng.standard_normal(shape), rng.standard_normal(shape) * 0.05
        yield Example((w, g), {}, label=f"{shape} defaults")
        yield Example((w, g), dict(eta=0.02, weight_decay=5e-4, eps=1e-6), label=f"{shape} weight decay")


def _lars_formula(m, xp, out, args, kwargs):
    """g̃ = λ·(g + β·w), λ = η·‖w‖/(‖g‖ + β·‖w‖ + ε) when both norms are positive, else 1."""
    w, g, y = _f64(args[0]), _f64(args[1]), _f64(out)
    eta, wd, eps = kwargs.get("eta", 1e-3), kwargs.get("weight_decay", 0.0), kwargs.get("eps", 1e-8)
    nw, ng = _np.linalg.norm(w), _np.linalg.norm(g)
    lam = eta * nw / (ng + wd * nw + eps) if nw > 0 and ng > 0 else 1.0
    ref = lam * (g + wd * w)
    return float(_np.max(_np.abs(y - ref))) / max(1e-300, float(_np.max(_np.abs(ref))) or 1.0)


def _lars_forward(weight: Any, grad: Any, eta: float = 1e-3, weight_decay: float = 0.0, eps: float = 1e-8) -> Any:
    """LARS: the layer-wise trust ratio λ = η·‖w‖/(‖g‖ + β·‖w‖ + ε) applied to g + β·w (β = weight decay).

    The result λ·(g + β·w) is the update direction before the global learning rate and momentum
    (You et al. 2017, Algorithm 1). Where ‖w‖ = 0 or ‖g‖ = 0 the ratio is 1 (the convention of NVIDIA's
    LARC and timm's ``Lars``: the paper's formula would freeze a zero-initialized layer forever).

    Parameters
    ----------
    weight : array
        The layer's weight w.
    grad : array
        Its gradient g.
    eta : float, default 0.001
        η, the trust coefficient.
    weight_decay : float, default 0.0
        β.
    eps : float, default 1e-8
        ε, added to the denominator.

    Returns
    -------
    out : array or tuple of array
        λ·(g + β·w), grad's shape.

    Notes
    -----
    Survey §7 (normalizing gradients). Called with two sequences (one weight and one gradient per
    layer; ``weight=None`` for all) the method maps over the layers and returns a tuple;
    ``forward``/``backward``/:func:`normref.vjp` take one layer.

    References
    ----------
    .. [1] Y. You, I. Gitman and B. Ginsburg, "Large Batch Training of Convolutional Networks",
       arXiv:1708.03888, 2017 (Algorithm 1).
    """
    fn = "lars"
    xp = _check_pair(fn, weight, grad, need_weight=True)
    eta = check_positive(fn, "eta", eta)
    wd = check_nonnegative(fn, "weight_decay", weight_decay)
    eps = check_nonnegative(fn, "eps", eps)
    cd = compute_dtype(xp, grad.dtype)
    w, g = to_compute(xp, weight, cd), to_compute(xp, grad, cd)
    nw, ng = _norm(xp, w), _norm(xp, g)
    active = xp.logical_and(nw > 0, ng > 0)
    den = ng + wd * nw + eps
    den = xp.where(active, den, xp.ones_like(den))  # never divide by 0 (λ = 1 there anyway)
    lam = xp.where(active, eta * nw / den, xp.ones_like(den))
    u = g + wd * w
    return _out(xp, lam * u, grad.dtype), Residuals((w, g, nw, ng, den, lam, u, active), (eta, wd, eps))


def _lars_backward(res, c):
    w, g, nw, ng, den, lam, u, active = res.arrays
    eta, wd, eps = res.static
    xp = namespace("lars.backward", cotangent=c)
    c = to_compute(xp, c, w.dtype)
    cu = xp.sum(c * u)  # ⟨c, ∂(λ·u)/∂λ⟩
    one = xp.ones_like(nw)
    what = w / xp.where(nw > 0, nw, one)
    ghat = g / xp.where(ng > 0, ng, one)
    # λ = η·‖w‖/D, D = ‖g‖ + β‖w‖ + ε: ∂λ/∂w = η·ŵ·(D − β‖w‖)/D² = η·ŵ·(‖g‖ + ε)/D², ∂λ/∂g = −η‖w‖·ĝ/D².
    zero = xp.zeros_like(nw)
    dlam_w = xp.where(active, eta * (ng + eps) / (den * den), zero)
    dlam_g = xp.where(active, -eta * nw / (den * den), zero)
    dw = lam * wd * c + cu * dlam_w * what
    dg = lam * c + cu * dlam_g * ghat
    return dw, dg


lars = _register(
    _lars_forward, name="lars", examples=_ex_lars,
    invariants=(Invariant("equals λ·(g + β·w)", _lars_formula, scale=64.0),),
    survey="§7 (layer-wise adaptive rate scaling)",
    paper="You, Gitman & Ginsburg, Large Batch Training of Convolutional Networks (LARS), arXiv 2017",
)
lars.defbackward(_lars_backward)


# --------------------------------------------------------------------------------------------------
# gradient centralization


def _ex_gc(rng):
    for shape in [(4, 3), (3, 2, 3, 3), (5, 4, 2)]:
        yield Example((rng.standard_normal(shape), rng.standard_normal(shape) + 0.3), {}, label=f"{shape}")
        yield Example((None, rng.standard_normal(shape)), {}, label=f"{shape} without the weight")


def _gc_rows(m, xp, out, args, kwargs):
    """Rows of g̃ have mean 0 and g − g̃ is constant along each row."""
    g, y = _f64(args[1]), _f64(out)
    g2, y2 = g.reshape(g.shape[0], -1), y.reshape(y.shape[0], -1)
    d = g2 - y2
    return max(float(_np.max(_np.abs(y2.mean(axis=1)))), float(_np.max(_np.abs(d - d.mean(axis=1, keepdims=True)))))


def _gc_forward(weight: Any, grad: Any) -> Any:
    """Gradient centralization: g̃_i = g_i − mean(g_i) for each output neuron i (row over all axes but 0).

    For a linear weight (d_out, d_in) the mean is over d_in; for a convolution kernel
    (d_out, d_in, k...) over (d_in, k...) (Yong et al., Eqn 3). An empty gradient (d_out = 0 or a
    zero-size fan-in) is returned as it is (a new empty array): there is nothing to centre.

    Parameters
    ----------
    weight : array or None
        Not used (it may be ``None``); accepted so that every gradient method takes ``(weight, grad)``.
    grad : array, shape ``(d_out, ...)``
        The gradient, with at least 2 dimensions. Tensors with fewer than 2 dimensions (biases,
        normalization scales) have no fan-in: pass only weights (the reference optimizer leaves 1-D
        tensors untouched).

    Returns
    -------
    out : array or tuple of array
        The centralized gradient, grad's shape.

    Notes
    -----
    Survey §7 (normalizing gradients). Called with two sequences (one weight and one gradient per
    layer; ``weight=None`` for all) the method maps over the layers and returns a tuple;
    ``forward``/``backward``/:func:`normref.vjp` take one layer.

    References
    ----------
    .. [1] H. Yong, J. Huang, X. Hua and L. Zhang, "Gradient Centralization: A New Optimization
       Technique for Deep Neural Networks", ECCV 2020 (Eqn 3).
    """
    fn = "gradient_centralization"
    xp = _check_pair(fn, weight, grad, need_weight=False)
    if grad.ndim < 2:
        raise ValueError(f"{fn}: grad must have at least 2 dimensions (d_out, fan_in...); got shape "
                         f"{tuple(grad.shape)} (leave 1-D parameters such as biases uncentralized)")
    cd = compute_dtype(xp, grad.dtype)
    fan = math.prod(grad.shape[1:])
    if grad.shape[0] == 0 or fan == 0:
        # no neuron, or neurons with no fan-in: nothing to centre; the result is the (empty) gradient
        y = xp.zeros(tuple(grad.shape), dtype=grad.dtype, device=device_of(grad))
        return y, Residuals((), (tuple(grad.shape), weight is not None))
    g = xp.reshape(to_compute(xp, grad, cd), (grad.shape[0], fan))
    y, _, _ = _op.Centering().forward(xp, g, (1,))
    return _out(xp, xp.reshape(y, tuple(grad.shape)), grad.dtype), Residuals((), (tuple(grad.shape), weight is not None))


def _gc_backward(res, c):
    shape, has_w = res.static
    xp = namespace("gradient_centralization.backward", cotangent=c)
    if math.prod(shape) == 0:  # the empty case: the map is the identity on an empty array
        dg = xp.zeros(shape, dtype=c.dtype, device=device_of(c))
        return (xp.zeros_like(dg) if has_w else None), dg
    c2 = xp.reshape(c, (shape[0], -1))
    dg = xp.reshape(_op.Centering().backward(xp, (), (1,), c2), shape)
    return (xp.zeros_like(dg) if has_w else None), dg


gradient_centralization = _register(
    _gc_forward, name="gradient_centralization", examples=_ex_gc,
    invariants=(Invariant("rows of g̃ have mean 0", _gc_rows, scale=64.0),),
    survey="§7 (gradient centralization)",
    paper="Yong, Huang, Hua & Zhang, Gradient Centralization: A New Optimization Technique for Deep Neural "
          "Networks, ECCV 2020",
)
gradient_centralization.defbackward(_gc_backward)
