"""Batch normalization with the statistics of recent iterations (survey §5.3.1).

Three methods that widen a small mini-batch by the statistics of the batches seen in the last few
training iterations, each a pure function: the statistics of the past iterations go in as arrays
(state in) and the current batch's statistics come back in the result (state out), so that the
caller keeps the window (a ring buffer, newest first):

- :func:`moving_average_batch_norm` (MABN; Yan, Wan, Zhang, Zhang, Wei & Sun, ICLR 2020): no
  centering, the mean square χ² = E[x²] replaced by its simple moving average over the last m
  iterations in the forward, and the backward's gradient statistic E[g·z] by its moving average; it
  pairs with :func:`centralized_weight` (weight centralization of the layer before, which gives
  back the centering that MABN drops).
- :func:`memorized_batch_norm` (MBN; Guo, Wu, Deng, Chen & Tan, AAAI 2018): mean and variance of
  the union of the last k batches, weighted.
- :func:`cross_iteration_batch_norm` (CBN; Yao, Cao, Zheng, Huang & Lin, CVPR 2021): the last k
  iterations' means and mean squares, each compensated to the current weights of the layer before by
  a first-order Taylor term, ∂μ/∂θ·(θ_t − θ_{t−τ}), with the weight gradients of the past
  statistics passed in as state; :func:`cross_iteration_statistic_grads` computes them for a
  linear or convolution layer from its input patches.

The past statistics are constants of the backward (the survey's "view the population statistics as
constant and only back-propagate through current mini-batches"; there is no gradient through past
iterations, whose inputs are gone). With that convention the analytic backward of MBN and CBN is
the exact derivative of the function with the state held fixed; MABN's backward is, in addition,
the paper's approximation (the moving-average gradient statistic), exact only when no past gradient
statistic is given — see its docstring.

Array convention: ``input`` is (N, C, *spatial); statistics are per channel over (N, *spatial), as in
:func:`normref.batch_norm`; a window of w past iterations is an array with a leading axis of length
w (newest first; w = 0, an array of shape (0, C), is allowed: no memory yet, e.g. during burn-in).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._validate import check_bool, check_choice, check_momentum, check_ndim, check_nonnegative, check_nonnegative_values, check_positive
from ._results import result_tuple
from ._xp import Array, compute_dtype, namespace, to_compute, to_numpy
from . import operation as _op
from . import partition as _part
from .framework import run_backward, run_forward
from .registry import Example, Invariant, Residuals, method
from .standardization import _check_channels, _ema, _eps, _out, _shapes

__all__ = [
    "MABNResult",
    "MemorizedResult",
    "CBNResult",
    "moving_average_batch_norm",
    "moving_average_gradient_statistic",
    "centralized_weight",
    "memorized_batch_norm",
    "cross_iteration_batch_norm",
    "cross_iteration_statistic_grads",
]


@result_tuple
class MABNResult(NamedTuple):
    """Output of a training-mode :func:`moving_average_batch_norm` call and its state out.

    Attributes
    ----------
    output : Array
        The output: the differentiable field.
    sq_mean : Array
        (C,), this batch's mean square χ²_t (push it into the window of past mean squares).
    running_mean_square : Array or None
        (C,), the updated running mean square (``None`` when none was given).
    """

    output: Any
    sq_mean: Any
    running_mean_square: Any


@result_tuple
class MemorizedResult(NamedTuple):
    """Output of a training-mode :func:`memorized_batch_norm` call and its state out.

    Attributes
    ----------
    output : Array
        The output: the differentiable field.
    mean : Array
        (C,), this batch's mean (push it into the memory).
    var : Array
        (C,), this batch's biased variance (push it into the memory).
    running_mean : Array or None
        (C,), updated with the memorized statistics (``None`` when none was given).
    running_var : Array or None
        (C,), likewise, the variance unbiased.
    """

    output: Any
    mean: Any
    var: Any
    running_mean: Any
    running_var: Any


@result_tuple
class CBNResult(NamedTuple):
    """Output of a training-mode :func:`cross_iteration_batch_norm` call and its state out.

    Attributes
    ----------
    output : Array
        The output: the differentiable field.
    mean : Array
        (C,), this batch's μ_t (push it, with this step's weight gradients and layer weight, into the
        window).
    sq_mean : Array
        (C,), this batch's ν_t = E[x²] (likewise).
    running_mean : Array or None
        (C,), updated with this batch's mean, as the authors' code does (``None`` when none given).
    running_var : Array or None
        (C,), updated with this batch's unbiased variance (``None`` when none given).
    """

    output: Any
    mean: Any
    sq_mean: Any
    running_mean: Any
    running_var: Any


# --------------------------------------------------------------------------------------------------
# shared helpers


def _axes(x) -> tuple:
    return (0,) + tuple(range(2, x.ndim))


def _chan(xp, v, nd):
    """A (C,) vector as (1, C, 1, ...) to broadcast against (N, C, *spatial)."""
    return None if v is None else xp.reshape(v, (1, v.shape[0]) + (1,) * (nd - 2))


def _flat(xp, v, nd):
    return xp.reshape(v, (v.shape[1],))


def _check_window(fn: str, c: int, **arrays) -> int:
    """The past-statistics arrays have shape (w, C) with one common w; returns w (0 when none)."""
    w = None
    first = None
    for name, a in arrays.items():
        if a is None:
            continue
        if a.ndim != 2 or int(a.shape[1]) != c:
            raise ValueError(
                f"{fn}: {name} must have shape (w, C) = (w, {c}) (one row per past iteration, newest first); "
                f"got shape {tuple(a.shape)}"
            )
        if w is None:
            w, first = int(a.shape[0]), name
        elif int(a.shape[0]) != w:
            raise ValueError(
                f"{fn}: {name} must have as many rows (past iterations) as {first} ({w}); got {int(a.shape[0])}"
            )
    return 0 if w is None else w


def _together(fn: str, **arrays) -> None:
    given = [n for n, a in arrays.items() if a is not None]
    if given and len(given) != len(arrays):
        missing = [n for n in arrays if n not in given]
        raise ValueError(f"{fn}: {', '.join(arrays)} go together; got {given[0]} but {missing[0]}=None")


def _count_check(fn: str, x) -> int:
    m = int(x.shape[0])
    for d in x.shape[2:]:
        m *= int(d)
    if m < 2:
        raise ValueError(f"{fn}: expected more than 1 value per channel when training; got input of shape {tuple(x.shape)}")
    return m


# --------------------------------------------------------------------------------------------------
# the blended standardization shared by memorized and cross-iteration BN
#
# With this batch's per-channel mean μ_t and biased variance σ_t² (count M over (N, *spatial)), a
# weight a (C,) of the current batch and constants P from the past iterations:
#   μ̄  = a·μ_t + P_μ
#   σ̄² = a·σ_t² + a·μ_t² + P_ν − μ̄²        ("pooled": E[x²] − μ̄² of the union, P_ν = Σ a_τ·ν_τ)
#   σ̄² = a·σ_t² + P_σ                        ("average": the weighted mean of the batch variances)
#   y  = γ·(x − μ̄)/√(σ̄² + ε) + β
# σ_t² comes from the two-pass (centered) moments, so that with no past iteration (a = 1, P = 0)
# the function is batch_norm's exactly. Backward (P constant), with ĝ = γ·g, A = Σ ĝ, B = Σ ĝ·x̂,
# s = (σ̄² + ε)^-1/2 and δ = ∂L/∂σ̄² = −s²·B/2:
#   pooled:  ∂L/∂μ_t = a·(−s·A − 2μ̄·δ), ∂L/∂ν_t = a·δ       (ν_t = E[x²], σ̄² = a·ν_t + P_ν − μ̄²)
#   average: ∂L/∂μ_t = −a·s·A − 2a·μ_t·δ, ∂L/∂ν_t = a·δ     (σ̄² = a·(ν_t − μ_t²) + P_σ)
#   dx = s·ĝ + ∂L/∂μ_t/M + 2x·∂L/∂ν_t/M
#      = s·ĝ + a·(−s·A + 2(μ_t − μ̄)·δ·[pooled])/M + 2a·δ·(x − μ_t)/M   (the stable form used here)
# which is batch norm's s·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) at a = 1, P = 0.


def _blend_forward(xp, x, a, p_mu, p_second, pooled: bool, gamma, beta, eps):
    axes = _axes(x)
    mu_t = xp.mean(x, axis=axes, keepdims=True)
    xc = x - mu_t
    var_t = xp.mean(xc * xc, axis=axes, keepdims=True)
    mu_bar = a * mu_t + p_mu
    if pooled:
        var_bar = a * var_t + (a * (mu_t * mu_t) + p_second - mu_bar * mu_bar)
    else:
        var_bar = a * var_t + p_second
    s = 1.0 / xp.sqrt(var_bar + eps)
    xhat = (x - mu_bar) * s
    y = xhat if gamma is None else xhat * gamma
    if beta is not None:
        y = y + beta
    return y, (x, xhat, s, mu_t, mu_bar, a), mu_t, var_t, mu_bar, var_bar


def _blend_backward(xp, arrays, gamma, pooled: bool, g, need_x: bool):
    x, xhat, s, mu_t, mu_bar, a = arrays
    axes = _axes(x)
    dgamma = xp.sum(g * xhat, axis=axes, keepdims=True)
    dbeta = xp.sum(g, axis=axes, keepdims=True)
    if not need_x:
        return None, dgamma, dbeta
    m = 1
    for ax in axes:
        m *= int(x.shape[ax])
    gh = g if gamma is None else g * gamma
    big_a = xp.sum(gh, axis=axes, keepdims=True)
    big_b = xp.sum(gh * xhat, axis=axes, keepdims=True)
    delta = -0.5 * (s * s) * big_b
    shift = -s * big_a
    if pooled:
        shift = shift + 2.0 * (mu_t - mu_bar) * delta
    dx = s * gh + (a * shift) / m + (2.0 * a * delta) * (x - mu_t) / m
    return dx, dgamma, dbeta


def _population(xp, x, rm, rv, gamma, beta, eps):
    """Inference: the running statistics are the population statistics (constants, survey Eqn 16) —
    batch_norm's inference composition (Π_BN, population standardizing, affine), not a copy of it:
    ``(y, μ, 1/√(σ² + ε))`` with μ, σ² broadcast per channel."""
    part, op = _part.Partition("batch"), _op.PopulationStandardizing(eps)
    y, op_res, _ = run_forward(xp, x, part, op, gamma, beta, mean=rm, var=rv)
    return y, op_res[1], op_res[2]


def _population_backward(xp, x, mu, s, gamma, g, has_beta):
    """(dx, dγ, dβ) of :func:`_population` by the framework's composed backward."""
    part, op = _part.Partition("batch"), _op.PopulationStandardizing(0.0)
    beta_shape = tuple(s.shape) if has_beta else None
    return run_backward(xp, part, op, tuple(x.shape), (x, mu, s), gamma, beta_shape, g)


def _finish(xp, res: Residuals, grads, layout):
    """Gradients in signature order: ``layout`` maps each array parameter to 'x', 'w', 'b' or None."""
    dx, dg, db = grads
    wshape, bshape = res.static[-2:]
    out = {"x": dx,
           "w": None if (dg is None or wshape is None) else xp.reshape(dg, wshape),
           "b": None if (db is None or bshape is None) else xp.reshape(db, bshape)}
    return tuple(None if k is None else out[k] for k in layout)


def _unbiased_factor(n: float) -> float:
    return n / (n - 1.0) if n > 1 else 1.0


# --------------------------------------------------------------------------------------------------
# moving average batch normalization (Yan et al., ICLR 2020)


def _ex_mabn(rng):
    c = 3
    for shape in [(4, 3), (3, 3, 2, 2)]:
        x = rng.standard_normal(shape) * 1.5 + 0.3
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        past = rng.uniform(0.5, 2.5, (2, c))
        rms = rng.uniform(0.5, 2.0, c)
        yield Example((x, None, None, None, None), dict(training=True), label=f"{shape} no window (plain χ² scaling)")
        yield Example((x, past, None, w, b), dict(training=True), label=f"{shape} window of 2 past mean squares, affine")
        yield Example((x, past, _np_zeros((2, c)), w, b, rms), dict(training=True, momentum=0.1),
                      label=f"{shape} zero past gradient statistics, running update")
        yield Example((x, past, None, w, b, rms), dict(training=True, rmax=1.2), label=f"{shape} renormalization r clipped")
        yield Example((x, None, None, w, b, rms), dict(training=False), label=f"{shape} inference")


def _np_zeros(shape):
    import numpy as np

    return np.zeros(shape)


def _mabn_frozen(args, kwargs):
    """MABN with r frozen at the base call's value (r is a stop-gradient constant of the backward)."""
    m = moving_average_batch_norm
    b = m.bind(*args, **kwargs).arguments
    if not b["training"] or b["rmax"] is None:
        return m  # no stop-gradient constant: the function itself
    xp = namespace("moving_average_batch_norm", input=b["input"])
    r = _mabn_parts(xp, b["input"], b["past_sq_means"], b["running_mean_square"], b["eps"], b["rmax"])[2]

    def frozen(input, past_sq_means, past_grad_stats, weight=None, bias=None, running_mean_square=None, *rest, **kw):
        nd = input.ndim
        z = _mabn_parts(xp, input, past_sq_means, None, b["eps"], None)[0]
        y = z * r
        if weight is not None:
            y = y * _chan(xp, weight, nd)
        if bias is not None:
            y = y + _chan(xp, bias, nd)
        return y

    return frozen


def _mabn_parts(xp, x, past, rms, eps, rmax):
    """(z, s, r, χ²_t, ψ̄) of MABN's forward; x in the compute dtype."""
    nd = x.ndim
    chi = xp.mean(x * x, axis=_axes(x), keepdims=True)  # χ²_t = E[x²] over (N, *spatial)
    if past is not None and int(past.shape[0]) > 0:
        k = int(past.shape[0]) + 1
        psi = (chi + _chan(xp, xp.sum(to_compute(xp, past, x.dtype), axis=0), nd)) / k  # SMA of χ²
    else:
        psi = chi
    s = 1.0 / xp.sqrt(psi + eps)
    z = x * s
    if rmax is None or rms is None:
        r = None
    else:  # batch renormalization against the running mean square (a constant of the backward)
        r = xp.clip(xp.sqrt(psi + eps) / xp.sqrt(_chan(xp, to_compute(xp, rms, x.dtype), nd) + eps), 1.0 / rmax, rmax)
    return z, s, r, chi, psi


def _mabn_invariant(m, xp, out, args, kwargs):
    """Without a window, renormalization or affine, the output has mean square χ²/(χ² + ε) per channel."""
    import numpy as np

    b = m.bind(*args, **kwargs).arguments
    if not b["training"] or b["past_sq_means"] is not None or b["weight"] is not None or b["bias"] is not None:
        return None
    x = to_numpy(args[0]).astype(np.float64)
    y = to_numpy(m.primary(out)).astype(np.float64)
    axes = _axes(x)
    chi = (x * x).mean(axis=axes)
    return float(np.max(np.abs((y * y).mean(axis=axes) - chi / (chi + b["eps"]))))


@method(
    channels=("input",),
    array_params=("input", "past_sq_means", "past_grad_stats", "weight", "bias", "running_mean_square"),
    nondiff=("past_sq_means", "past_grad_stats", "running_mean_square"),
    nullable=("past_sq_means", "past_grad_stats", "running_mean_square"),
    survey="§5.3.1 (functions combining population and batch statistics: MABN), §6 (weight centralization)",
    paper="Yan, Wan, Zhang, Zhang, Wei & Sun, Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization, ICLR 2020",
    examples=_ex_mabn,
    invariants=(Invariant("mean square χ²/(χ²+ε) without window or affine", _mabn_invariant),),
    fd_target=_mabn_frozen,
)
def moving_average_batch_norm(
    input: Array,
    past_sq_means: Array | None = None,
    past_grad_stats: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    running_mean_square: Array | None = None,
    training: bool = False,
    momentum: float = 0.02,
    eps: float = 1e-5,
    rmax: float | None = None,
) -> Array | MABNResult:
    r"""Moving average batch normalization (MABN): scaling by a moving average of E[x²].

    .. math::

        \chi^2_t = \tfrac{1}{M}\textstyle\sum x^2, \quad
        \bar\psi_t = \tfrac{1}{m}\big(\chi^2_t + \sum_{\tau=1}^{m-1}\chi^2_{t-\tau}\big), \quad
        z = x/\sqrt{\bar\psi_t + \epsilon}, \quad y = \gamma\, r\, z + \beta

    per channel over ``(N, *spatial)`` (M values), with no centering; the backward is the paper's

    .. math::

        \hat g = \gamma r g, \quad \Psi_t = \tfrac{1}{M}\textstyle\sum \hat g z, \quad
        \bar\Psi_t = \tfrac{1}{m}\big(\Psi_t + \sum_{\tau=1}^{m-1}\Psi_{t-\tau}\big), \quad
        \partial L/\partial x = (\hat g - z\,\bar\Psi_t)/\sqrt{\bar\psi_t + \epsilon}.

    Backward: ĝ = γ·r·g, Ψ_t = mean(ĝ·z); dx = (ĝ − z·(Ψ_t + Σ_τ Ψ_{t−τ})/m)/√(ψ̄ + ε) (with no
    ``past_grad_stats``, Ψ_t/m: the exact derivative); dγ = Σ g·r·z, dβ = Σ g; the past χ² and r are
    constants. At inference dx = γ·g/√(running_mean_square + ε).

    Parameters
    ----------
    input : Array
        ``(N, C, *spatial)``.
    past_sq_means : Array or None, default None
        (m − 1, C): χ² of the last m − 1 iterations, newest first (the ``sq_mean`` of earlier calls);
        ``None`` or (0, C): no window (m = 1, e.g. during the authors' warm-up).
    past_grad_stats : Array or None, default None
        (m − 1, C): the gradient statistics Ψ of the same iterations
        (:func:`moving_average_gradient_statistic` of their cotangents); ``None``: none (the backward
        is then exactly the derivative of the forward, the past χ² held constant).
    weight, bias : Array or None, default None
        γ, β (C,).
    running_mean_square : Array or None, default None
        (C,), the population estimate of E[x²] used at inference (the authors' ``running_var``
        buffer, which holds the mean square); required when ``training=False`` or ``rmax`` is set.
    training : bool, default False
        Batch (moving-average) statistics and the state update, or the running mean square.
    momentum : float, default 0.02
        running ← (1 − momentum)·running + momentum·ψ̄_t (normref's/torch's convention; the
        authors' 0.98 on the old value is ``momentum=0.02``, the default).
    eps : float, default 1e-5
        ε > 0 inside the square root.
    rmax : float or None, default None
        Batch renormalization (the authors use 5 after 1000 iterations): r = clip(√(ψ̄+ε)/√(running+ε),
        1/rmax, rmax), a constant of the backward; ``None``: r = 1 (the authors' first iterations).

    Returns
    -------
    Array or MABNResult
        In training, ``MABNResult(output, sq_mean, running_mean_square)``: χ²_t (C,) to push into the
        window and the updated running mean square (``None`` when not given). At inference the output
        y = γ·x/√(running_mean_square + ε) + β.

    Notes
    -----
    Survey §5.3.1 ("view the backpropagation gradients as statistics to be estimated, and approximate
    these statistics by moving averages"). What is exact: without ``past_grad_stats`` the backward is
    the derivative of the forward with the past χ² (and r) held fixed; the current χ²_t then enters
    with weight 1/m. The paper's approximation: with ``past_grad_stats`` the backward adds
    −z·ΣΨ_{t−τ}/(m·√(ψ̄+ε)), which is not the derivative of any function of ``input`` (it does not
    depend on the current cotangent); it reproduces the authors' ``BatchNormFunction`` (buffers
    ``buffer_x2``, ``buffer_gz`` of size m = real_B/B, both including the current iteration). The
    current Ψ_t is known only once the cotangent is: compute it with
    :func:`moving_average_gradient_statistic` and push it into the window. The authors pair MABN
    with weight centralization of the convolution before (:func:`centralized_weight`), which
    restores the centering MABN leaves out. Warm-up and the iteration at which ``rmax`` is switched
    on are the caller's schedule (pass an empty window, ``rmax=None``).

    References
    ----------
    J. Yan, R. Wan, X. Zhang, W. Zhang, Y. Wei, J. Sun, "Towards Stabilizing Batch Statistics in
    Backward Propagation of Batch Normalization", ICLR 2020.
    """
    fn = "moving_average_batch_norm"
    xp = namespace(fn, input=input, past_sq_means=past_sq_means, past_grad_stats=past_grad_stats,
                   weight=weight, bias=bias, running_mean_square=running_mean_square)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    c = int(input.shape[1])
    _check_channels(fn, input, weight=weight, bias=bias, running_mean_square=running_mean_square)
    w = _check_window(fn, c, past_sq_means=past_sq_means, past_grad_stats=past_grad_stats)
    if past_grad_stats is not None and past_sq_means is None and w > 0:
        raise ValueError(f"{fn}: past_grad_stats needs past_sq_means of the same iterations; got past_sq_means=None")
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum, allow_none=False)
    training = check_bool(fn, "training", training)
    if rmax is not None:
        rmax = check_positive(fn, "rmax", rmax)
        if rmax < 1.0:
            raise ValueError(f"{fn}: rmax must be >= 1 (r is clipped to [1/rmax, rmax]) or None; got {rmax}")
        if running_mean_square is None:
            raise ValueError(f"{fn}: rmax (renormalization) is measured against running_mean_square; got None")
    check_nonnegative_values(fn, "running_mean_square", xp, running_mean_square, what="a mean square")
    check_nonnegative_values(fn, "past_sq_means", xp, past_sq_means, what="a window of mean squares")
    if not training and running_mean_square is None:
        raise ValueError(f"{fn}: running_mean_square is required when training=False; got None")
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = x.ndim
    gamma = _chan(xp, to_compute(xp, weight, cd), nd)
    beta = _chan(xp, to_compute(xp, bias, cd), nd)
    static_shapes = _shapes(weight, bias)
    if not training:
        ms = _chan(xp, to_compute(xp, running_mean_square, cd), nd)
        y, mu, s = _population(xp, x, xp.zeros_like(ms), ms, gamma, beta, eps)  # scaling: μ = 0
        return _out(xp, y, input.dtype), Residuals((x, mu, s, gamma), ("eval",) + static_shapes)
    _count_check(fn, x)
    z, s, r, chi, psi = _mabn_parts(xp, x, past_sq_means, running_mean_square, eps, rmax)
    zr = z if r is None else z * r
    y = zr if gamma is None else zr * gamma
    if beta is not None:
        y = y + beta
    pgz = None
    if past_grad_stats is not None and w > 0:
        pgz = _chan(xp, xp.sum(to_compute(xp, past_grad_stats, cd), axis=0), nd)
    res = Residuals((x, z, zr, s, r, gamma, pgz), ("train", w + 1) + static_shapes)
    new_rms = None
    if running_mean_square is not None:
        new_rms = _ema(xp, running_mean_square, _flat(xp, psi, nd), momentum)
    return MABNResult(_out(xp, y, input.dtype), _out(xp, _flat(xp, chi, nd), input.dtype), new_rms), res


@moving_average_batch_norm.defbackward
def _mabn_backward(res: Residuals, g):
    xp = namespace("moving_average_batch_norm.backward", cotangent=g)
    layout = ("x", None, None, "w", "b", None)
    if res.static[0] == "eval":
        x, mu, s, gamma = res.arrays
        g = to_compute(xp, g, x.dtype)
        return _finish(xp, res, _population_backward(xp, x, mu, s, gamma, g, res.static[-1] is not None), layout)
    x, z, zr, s, r, gamma, pgz = res.arrays
    k = res.static[1]
    g = to_compute(xp, g, x.dtype)
    axes = _axes(x)
    dgamma = xp.sum(g * zr, axis=axes, keepdims=True)
    dbeta = xp.sum(g, axis=axes, keepdims=True)
    gh = g if gamma is None else g * gamma
    if r is not None:
        gh = gh * r
    psi_g = xp.mean(gh * z, axis=axes, keepdims=True)  # Ψ_t, this iteration's gradient statistic
    if pgz is not None:
        psi_g = psi_g + pgz  # the paper's moving average of Ψ (past iterations' statistics)
    dx = s * (gh - z * (psi_g / k))
    return _finish(xp, res, (dx, dgamma, dbeta), layout)


def moving_average_gradient_statistic(
    input: Array,
    cotangent: Array,
    past_sq_means: Array | None = None,
    weight: Array | None = None,
    running_mean_square: Array | None = None,
    eps: float = 1e-5,
    rmax: float | None = None,
) -> Array:
    r"""The gradient statistic Ψ_t of a training-mode :func:`moving_average_batch_norm` call.

    .. math::

        \Psi_t = \tfrac{1}{M}\textstyle\sum_{(N,\,\ast\mathrm{spatial})} (\gamma\, r\, g)\, z,
        \qquad z = x/\sqrt{\bar\psi_t + \epsilon}

    per channel, for the cotangent g = ∂L/∂y of the call made with the same ``input``,
    ``past_sq_means``, ``weight``, ``running_mean_square``, ``eps`` and ``rmax``; push it into the
    window of ``past_grad_stats`` for the next iterations (the authors' ``buffer_gz``).

    Parameters
    ----------
    input, cotangent : Array
        ``(N, C, *spatial)``, the call's input and the cotangent of its output.
    past_sq_means, weight, running_mean_square : Array or None, default None
        As given to the call.
    eps : float, default 1e-5
        As given to the call.
    rmax : float or None, default None
        As given to the call.

    Returns
    -------
    Array
        Ψ_t, shape (C,), in input's dtype.

    Notes
    -----
    Survey §5.3.1. With affine γ ≠ 0 it equals γ·(∂L/∂γ)/M of that call (∂L/∂γ = Σ g·r·z).

    References
    ----------
    Yan et al., ICLR 2020 (the backward of MABN, Algorithm 1).
    """
    fn = "moving_average_gradient_statistic"
    xp = namespace(fn, input=input, cotangent=cotangent, past_sq_means=past_sq_means, weight=weight,
                   running_mean_square=running_mean_square)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    if tuple(cotangent.shape) != tuple(input.shape):
        raise ValueError(f"{fn}: cotangent must have input's shape {tuple(input.shape)}; got shape {tuple(cotangent.shape)}")
    c = int(input.shape[1])
    _check_channels(fn, input, weight=weight, running_mean_square=running_mean_square)
    _check_window(fn, c, past_sq_means=past_sq_means)
    eps = _eps(fn, xp, input, eps)
    if rmax is not None:  # refused as moving_average_batch_norm refuses them
        rmax = check_positive(fn, "rmax", rmax)
        if rmax < 1.0:
            raise ValueError(f"{fn}: rmax must be >= 1 (r is clipped to [1/rmax, rmax]) or None; got {rmax}")
        if running_mean_square is None:
            raise ValueError(f"{fn}: rmax (renormalization) is measured against running_mean_square; got None")
    check_nonnegative_values(fn, "running_mean_square", xp, running_mean_square, what="a mean square")
    check_nonnegative_values(fn, "past_sq_means", xp, past_sq_means, what="a window of mean squares")
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    z, _, r, _, _ = _mabn_parts(xp, x, past_sq_means, running_mean_square, eps, rmax)
    gh = to_compute(xp, cotangent, cd)
    if weight is not None:
        gh = gh * _chan(xp, to_compute(xp, weight, cd), x.ndim)
    if r is not None:
        gh = gh * r
    return _out(xp, _flat(xp, xp.mean(gh * z, axis=_axes(x), keepdims=True), x.ndim), input.dtype)


# --------------------------------------------------------------------------------------------------
# weight centralization (the weights MABN pairs with)


def _ex_cw(rng):
    for shape in [(4, 6), (3, 2, 3, 3)]:
        yield Example((rng.standard_normal(shape) + 0.5,), {}, label=f"{shape}")


def _cw_rows(m, xp, out, args, kwargs):
    import numpy as np

    w = to_numpy(m.primary(out)).astype(np.float64)
    return float(np.max(np.abs(w.reshape(w.shape[0], -1).mean(axis=1))))


@method(
    array_params=("v",),
    category="weight",
    survey="§6.1 (weight centering), §5.3.1 (MABN's centralized weights)",
    paper="Yan et al., Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization, ICLR 2020 (CenConv2d)",
    examples=_ex_cw,
    invariants=(Invariant("rows have mean 0", _cw_rows, scale=16.0),),
)
def centralized_weight(v: Array) -> Array:
    r"""Weight centralization: each output row minus its mean over the fan-in.

    .. math::

        W_i = V_i - \tfrac{1}{n}\textstyle\sum_j V_{ij}, \qquad
        \partial L/\partial V_i = \partial L/\partial W_i - \tfrac{1}{n}\textstyle\sum_j \partial L/\partial W_{ij}

    over all axes but 0 (n = fan-in: in-channels × kernel).

    Backward: dv_i = dw_i − mean(dw_i) over each row (the same projection).

    Parameters
    ----------
    v : Array
        The weight, ``(C_out, *fan_in)`` with at least 2 dimensions (linear (out, in), conv
        ``(out, in/groups, *k)``).

    Returns
    -------
    Array
        The centralized weight, v's shape and dtype.

    Notes
    -----
    Survey §6.1 (centering the weight, Huang et al. 2017's CWN without the scaling) and §5.3.1: MABN
    drops the centering of the activations and restores it through the weights of the layer before
    (the authors' ``CenConv2d``, with ``bias=False``): if the layer's input has a mean that does not
    depend on the output channel, x·W_i then has mean 0 for each i.

    References
    ----------
    Yan et al., ICLR 2020 (Section 4.3, "centralizing weights").
    """
    fn = "centralized_weight"
    if v is None:
        raise TypeError(f"{fn}: v must be an array; got None")
    xp = namespace(fn, v=v)
    check_ndim(fn, "v", v, min_ndim=2, what="(C_out, *fan_in): biases are not centralized")
    cd = compute_dtype(xp, v.dtype)
    rows = xp.reshape(to_compute(xp, v, cd), (int(v.shape[0]), -1))
    w = rows - xp.mean(rows, axis=1, keepdims=True)
    return _out(xp, xp.reshape(w, tuple(v.shape)), v.dtype), Residuals((), (tuple(v.shape),))


@centralized_weight.defbackward
def _cw_backward(res: Residuals, dw):
    xp = namespace("centralized_weight.backward", cotangent=dw)
    (shape,) = res.static
    rows = xp.reshape(dw, (shape[0], -1))
    return (xp.reshape(rows - xp.mean(rows, axis=1, keepdims=True), shape),)


# --------------------------------------------------------------------------------------------------
# memorized batch normalization (Guo et al., AAAI 2018)


def _ex_mbn(rng):
    c = 3
    for shape in [(4, 3), (3, 3, 2, 2)]:
        x = rng.standard_normal(shape) * 1.5 + 0.5
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        pm, pv = rng.standard_normal((2, c)) * 0.5, rng.uniform(0.5, 2.0, (2, c))
        rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
        yield Example((x, None, None), dict(training=True), label=f"{shape} empty memory (= batch norm)")
        yield Example((x, pm, pv, w, b), dict(training=True), label=f"{shape} memory of 2, pooled variance")
        yield Example((x, pm, pv, w, b, rm, rv), dict(training=True, variance="average", momentum=0.3),
                      label=f"{shape} memory of 2, averaged variances, running update")
        yield Example((x, pm, pv, w, b), dict(training=True, memory_weights=(0.5, 0.3, 0.2)),
                      label=f"{shape} weighted memory")
        yield Example((x, None, None, w, b, rm, rv), dict(training=False), label=f"{shape} inference")


def _moment_invariant(m, xp, out, args, kwargs):
    """With an empty memory and no affine, each channel has mean 0 and variance σ²/(σ²+ε) (batch norm)."""
    import numpy as np

    b = m.bind(*args, **kwargs).arguments
    past = b["past_means"]  # by name: positional or keyword (CBN's args[1] is running_mean)
    if not b["training"] or past is not None or b["weight"] is not None or b["bias"] is not None:
        return None
    x = to_numpy(args[0]).astype(np.float64)
    y = to_numpy(m.primary(out)).astype(np.float64)
    axes = _axes(x)
    var = x.var(axis=axes)
    return max(float(np.max(np.abs(y.mean(axis=axes)))),
               float(np.max(np.abs(y.var(axis=axes) - var / (var + b["eps"])))))


def _memory_weights(fn, memory_weights, k):
    if memory_weights is None:
        return [1.0 / k] * k
    try:
        ws = [float(check_nonnegative(fn, "memory_weights", v)) for v in memory_weights]
    except TypeError:
        raise TypeError(f"{fn}: memory_weights must be a sequence of k = {k} numbers >= 0 (current batch first); "
                        f"got {type(memory_weights).__name__}") from None
    if len(ws) != k:
        raise ValueError(f"{fn}: memory_weights must hold k = {k} weights (the current batch and {k - 1} memorized); "
                         f"got {len(ws)}")
    total = sum(ws)
    if abs(total - 1.0) > 1e-9 or ws[0] <= 0.0:
        raise ValueError(f"{fn}: memory_weights must sum to 1 with a positive weight for the current batch; got {tuple(ws)}")
    return ws


@method(
    channels=("input",),
    array_params=("input", "past_means", "past_vars", "weight", "bias", "running_mean", "running_var"),
    nondiff=("past_means", "past_vars", "running_mean", "running_var"),
    nullable=("past_means", "past_vars", "running_mean", "running_var"),
    survey="§5.3.1 (memorized BN: statistics of multiple recent batches)",
    paper="Guo, Wu, Deng, Chen & Tan, Double Forward Propagation for Memorized Batch Normalization, AAAI 2018",
    examples=_ex_mbn,
    invariants=(Invariant("empty memory: batch-norm moments", _moment_invariant),),
)
def memorized_batch_norm(
    input: Array,
    past_means: Array | None = None,
    past_vars: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    memory_weights: "tuple[float, ...] | None" = None,
    variance: str = "pooled",
) -> Array | MemorizedResult:
    r"""Memorized batch normalization: the statistics of the current and the last k − 1 batches.

    .. math::

        \bar\mu = \textstyle\sum_{i=0}^{k-1} \eta_i \mu_{t-i}, \qquad
        \bar\sigma^2 = \textstyle\sum_i \eta_i (\sigma^2_{t-i} + \mu^2_{t-i}) - \bar\mu^2
        \ \text{(pooled)} \quad\text{or}\quad \textstyle\sum_i \eta_i \sigma^2_{t-i}\ \text{(average)},

    .. math::

        y = \gamma\,(x - \bar\mu)/\sqrt{\bar\sigma^2 + \epsilon} + \beta,

    μ_{t−i}, σ²_{t−i} the per-channel mean and biased variance of batch t − i over ``(N, *spatial)``.

    Backward: ĝ = γ·g, x̂ = (x − μ̄)·s, s = (σ̄² + ε)^-1/2, A = Σ ĝ, B = Σ ĝ·x̂, δ = −s²·B/2, a = η_0,
    M values per channel: dx = s·ĝ + a·(−s·A + 2(μ_t − μ̄)·δ)/M + 2a·δ·(x − μ_t)/M ("pooled"; "average"
    drops the 2(μ_t − μ̄)·δ term); dγ = Σ g·x̂, dβ = Σ g; the memorized statistics are constants.

    Parameters
    ----------
    input : Array
        ``(N, C, *spatial)``.
    past_means, past_vars : Array or None, default None
        (k − 1, C): the means and biased variances of the last k − 1 batches, newest first (the
        ``mean``/``var`` of earlier calls, or of the Double-Forward pass); ``None`` or (0, C): empty
        memory (then this is :func:`normref.batch_norm` with batch statistics).
    weight, bias : Array or None, default None
        γ, β (C,).
    running_mean, running_var : Array or None, default None
        (C,) population statistics: used when ``training=False``; updated in training when given.
    training : bool, default False
        Memorized statistics and the state out, or the running statistics.
    momentum : float, default 0.1
        running ← (1 − momentum)·running + momentum·(μ̄, σ̄²·n/(n − 1)) with n = k·M values in
        memory; ``momentum=1`` keeps exactly the last memorized statistics (the abstract's "consistent
        behaviors in both training and inference" suggests this rule; see Notes).
    eps : float, default 1e-5
        ε > 0 inside the square root.
    memory_weights : tuple of float, optional, default None
        η_0 (current batch), η_1, ..., η_{k−1}: ≥ 0, summing to 1, η_0 > 0; default uniform 1/k.
    variance : {"pooled", "average"}, default "pooled"
        "pooled" (default): the variance of the union of the memorized batches; "average": the
        weighted mean of the per-batch variances (leaves out the spread of the batch means).

    Returns
    -------
    Array or MemorizedResult
        In training, ``MemorizedResult(output, mean, var, running_mean, running_var)`` with this
        batch's μ_t, σ_t² (C,) to memorize; at inference the output with the running statistics.

    Notes
    -----
    Survey §5.3.1. The memorized statistics are constants of the backward; the backward is the exact
    derivative with them held fixed (the current batch enters with weight η_0). The paper's
    equations could not be consulted (only its abstract, arXiv:2010.04947, was available, and no
    released code was found), so how the variances of different batches combine, the default weights
    and the inference rule are normref's reading of the abstract ("considers multiple recent batches
    to obtain more accurate and robust statistics"; "consistent behaviors in both training and
    inference"), not the paper's equations: "pooled" (the union's variance, what "more examples"
    means) is the default and "average" the alternative. The Double-Forward scheme is a
    training procedure: after the parameter update, run the same batch forward again with
    ``training=True`` and memorize the statistics of that second pass (they then match the updated
    weights); it needs no other support here.

    References
    ----------
    Y. Guo, Q. Wu, C. Deng, J. Chen, M. Tan, "Double Forward Propagation for Memorized Batch
    Normalization", AAAI 2018.
    """
    fn = "memorized_batch_norm"
    xp = namespace(fn, input=input, past_means=past_means, past_vars=past_vars, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    c = int(input.shape[1])
    _check_channels(fn, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _together(fn, past_means=past_means, past_vars=past_vars)
    _together(fn, running_mean=running_mean, running_var=running_var)
    w = _check_window(fn, c, past_means=past_means, past_vars=past_vars)
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum, allow_none=False)
    training = check_bool(fn, "training", training)
    variance = check_choice(fn, "variance", variance, ("pooled", "average"))
    ws = _memory_weights(fn, memory_weights, w + 1)
    check_nonnegative_values(fn, "past_vars", xp, past_vars)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when training=False; got None")
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = x.ndim
    gamma = _chan(xp, to_compute(xp, weight, cd), nd)
    beta = _chan(xp, to_compute(xp, bias, cd), nd)
    sh = _shapes(weight, bias)
    if not training:
        rm = _chan(xp, to_compute(xp, running_mean, cd), nd)
        rv = _chan(xp, to_compute(xp, running_var, cd), nd)
        y, mu, s = _population(xp, x, rm, rv, gamma, beta, eps)
        return _out(xp, y, input.dtype), Residuals((x, mu, s, gamma), ("eval", None) + sh)
    m = _count_check(fn, x)
    p_mu, p_second = 0.0, 0.0
    if w > 0:
        pm = to_compute(xp, past_means, cd)
        pv = to_compute(xp, past_vars, cd)
        eta = xp.reshape(xp.asarray(ws[1:], dtype=cd, device=_dev(x)), (w, 1))
        p_mu = _chan(xp, xp.sum(eta * pm, axis=0), nd)
        second = pv + pm * pm if variance == "pooled" else pv
        p_second = _chan(xp, xp.sum(eta * second, axis=0), nd)
    pooled = variance == "pooled"
    a = xp.full((1, c) + (1,) * (nd - 2), ws[0], dtype=cd, device=_dev(x))
    y, arrays, mu_t, var_t, mu_bar, var_bar = _blend_forward(xp, x, a, p_mu, p_second, pooled, gamma, beta, eps)
    res = Residuals(arrays + (gamma,), ("train", pooled) + sh)
    rm = rv = None
    if running_mean is not None:
        n = (w + 1) * m
        rm = _ema(xp, running_mean, _flat(xp, mu_bar, nd), momentum)
        rv = _ema(xp, running_var, _flat(xp, var_bar, nd) * _unbiased_factor(n), momentum)
    return MemorizedResult(_out(xp, y, input.dtype), _out(xp, _flat(xp, mu_t, nd), input.dtype),
                           _out(xp, _flat(xp, var_t, nd), input.dtype), rm, rv), res


def _dev(x):
    from array_api_compat import device

    return device(x)


def _blend_method_backward(name, layout):
    def backward(res: Residuals, g, needs=None):
        xp = namespace(f"{name}.backward", cotangent=g)
        want_x = True if needs is None else bool(needs[0])
        if res.static[0] == "eval":
            x, mu, s, gamma = res.arrays
            g = to_compute(xp, g, x.dtype)
            return _finish(xp, res, _population_backward(xp, x, mu, s, gamma, g, res.static[-1] is not None), layout)
        *arrays, gamma = res.arrays
        g = to_compute(xp, g, arrays[0].dtype)
        return _finish(xp, res, _blend_backward(xp, tuple(arrays), gamma, res.static[1], g, want_x), layout)

    return backward


memorized_batch_norm.defbackward(_blend_method_backward("memorized_batch_norm", ("x", None, None, "w", "b", None, None)))


# --------------------------------------------------------------------------------------------------
# cross-iteration batch normalization (Yao et al., CVPR 2021)


def _ex_cbn(rng):
    c, p = 3, 4
    for shape in [(4, 3), (3, 3, 2, 2)]:
        x = rng.standard_normal(shape) * 1.5 + 0.5
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        pm = rng.standard_normal((2, c)) * 0.5
        pn = pm * pm + rng.uniform(0.5, 2.0, (2, c))
        gm, gn = rng.standard_normal((2, c, p)) * 0.1, rng.standard_normal((2, c, p)) * 0.1
        lw, plw = rng.standard_normal((c, p)), rng.standard_normal((2, c, p))
        rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
        yield Example((x,), dict(training=True), label=f"{shape} no window (= batch norm)")
        yield Example((x, None, None, w, b, pm, pn), dict(training=True), label=f"{shape} window of 2, no compensation")
        yield Example((x, rm, rv, w, b, pm, pn, gm, gn, lw, plw), dict(training=True, momentum=0.2),
                      label=f"{shape} window of 2, Taylor compensation, running update")
        # a compensated past term with ν' < μ'²: clamped (the paper) or dropped (the authors' code)
        pm_bad, pn_bad = pm.copy(), pn.copy()
        pm_bad[0, 0], pn_bad[0, 0] = 2.0, 1.0  # ν' = 1 < μ'² = 4
        yield Example((x, None, None, w, b, pm_bad, pn_bad), dict(training=True), label=f"{shape} clamped term")
        yield Example((x, None, None, w, b, pm_bad, pn_bad), dict(training=True, invalid="drop"),
                      label=f"{shape} dropped term")
        yield Example((x, rm, rv, w, b), dict(training=False), label=f"{shape} inference")


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_var", "weight", "bias", "past_means", "past_sq_means",
                  "past_mean_grads", "past_sq_mean_grads", "layer_weight", "past_layer_weights"),
    nondiff=("running_mean", "running_var", "past_means", "past_sq_means", "past_mean_grads",
             "past_sq_mean_grads", "layer_weight", "past_layer_weights"),
    nullable=("running_mean", "running_var", "past_means", "past_sq_means", "past_mean_grads",
              "past_sq_mean_grads", "layer_weight", "past_layer_weights"),
    survey="§5.3.1 (cross-iteration batch normalization: recent iterations' statistics, Taylor-compensated)",
    paper="Yao, Cao, Zheng, Huang & Lin, Cross-Iteration Batch Normalization, CVPR 2021",
    examples=_ex_cbn,
    invariants=(Invariant("no window: batch-norm moments", _moment_invariant),),
)
def cross_iteration_batch_norm(
    input: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    past_means: Array | None = None,
    past_sq_means: Array | None = None,
    past_mean_grads: Array | None = None,
    past_sq_mean_grads: Array | None = None,
    layer_weight: Array | None = None,
    past_layer_weights: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    rho: float = 1.0,
    invalid: str = "clamp",
) -> Array | CBNResult:
    r"""Cross-iteration batch normalization (CBN): recent iterations' statistics, compensated.

    .. math::

        \mu_{t-\tau}(\theta_t) \approx \mu_{t-\tau} + \rho\,\frac{\partial \mu_{t-\tau}}{\partial \theta_{t-\tau}}
        (\theta_t - \theta_{t-\tau}), \qquad
        \nu_{t-\tau}(\theta_t) \approx \nu_{t-\tau} + \rho\,\frac{\partial \nu_{t-\tau}}{\partial \theta_{t-\tau}}
        (\theta_t - \theta_{t-\tau}),

    .. math::

        \bar\mu = \tfrac{1}{k}\textstyle\sum_{\tau=0}^{k-1}\mu_{t-\tau}(\theta_t), \quad
        \bar\sigma^2 = \tfrac{1}{k}\textstyle\sum_{\tau}\max\big(\nu_{t-\tau}(\theta_t), \mu_{t-\tau}(\theta_t)^2\big) - \bar\mu^2,
        \quad y = \gamma\,(x - \bar\mu)/\sqrt{\bar\sigma^2 + \epsilon} + \beta,

    with μ, ν = E[x²] per channel over ``(N, *spatial)`` and θ the weights of the layer before (the
    τ = 0 term is the current batch's, uncompensated).

    Backward: ĝ = γ·g, x̂ = (x − μ̄)·s, s = (σ̄² + ε)^-1/2, A = Σ ĝ, B = Σ ĝ·x̂, δ = −s²·B/2, a = 1/k
    (1/k_c with ``invalid="drop"``), M values per channel: dx = s·ĝ + a·(−s·A + 2(μ_t − μ̄)·δ)/M +
    2a·δ·(x − μ_t)/M; dγ = Σ g·x̂, dβ = Σ g; the compensated past statistics (and θ) are constants.

    Parameters
    ----------
    input : Array
        ``(N, C, *spatial)``, the output of the layer with weights θ.
    running_mean, running_var : Array or None, default None
        (C,) population statistics: used when ``training=False``; updated in training (when given)
        with this batch's mean and unbiased variance, as in the authors' code.
    weight, bias : Array or None, default None
        γ, β (C,).
    past_means, past_sq_means : Array or None, default None
        (k − 1, C): μ_{t−τ}(θ_{t−τ}) and ν_{t−τ}(θ_{t−τ}) for τ = 1..k−1, newest first (the ``mean``,
        ``sq_mean`` of earlier calls); ``None`` or (0, C): no window (batch norm).
    past_mean_grads, past_sq_mean_grads : Array or None, default None
        ``(k − 1, C, *θ_c)``: ∂μ_{t−τ,c}/∂θ_{t−τ,c} and ∂ν_{t−τ,c}/∂θ_{t−τ,c}, the gradients of each
        channel's statistics with respect to that output channel's weights θ_c (the paper's, and the
        authors', approximation that μ_c depends on θ_c only); from
        :func:`cross_iteration_statistic_grads` or a framework's autodiff. ``None`` (with the two
        layer weights): no compensation, the paper's "naive" ablation.
    layer_weight : Array or None, default None
        θ_t, ``(C, *θ_c)``: the current weights of the layer before (e.g. a conv's (C, C_in/groups, kh, kw)).
    past_layer_weights : Array or None, default None
        ``(k − 1, C, *θ_c)``: θ_{t−τ}, the weights when the past statistics were taken.
    training : bool, default False
        Cross-iteration statistics and the state out, or the running statistics.
    momentum : float, default 0.1
        Of the running statistics (normref's/torch's convention).
    eps : float, default 1e-5
        ε > 0 inside the square root (the authors' default adds it to σ outside the root).
    rho : float, default 1.0
        ρ ≥ 0, the factor on the compensation term (the authors' code; 1 in the paper).
    invalid : {"clamp", "drop"}, default "clamp"
        A compensated past term with ν' < μ'²: "clamp" uses max(ν', μ'²) (the paper, Eqn 9);
        "drop" leaves that iteration out of the channel's average, k_c = 1 + its valid terms (the
        authors' code).

    Returns
    -------
    Array or CBNResult
        In training, ``CBNResult(output, mean, sq_mean, running_mean, running_var)``; at inference
        the output with the running statistics.

    Notes
    -----
    Survey §5.3.1 ("the mean and variance of examples from recent iterations are approximated for
    the current network weights via a low-order Taylor polynomial"). What is exact: the backward is
    the derivative of y with respect to ``input``, γ and β with every past statistic and θ held fixed
    (the current μ_t, ν_t enter with weight 1/k; the compensated past terms are constants, as the
    authors use ``weight.data``). The paper's approximations: the first-order Taylor compensation
    itself, the per-channel dependence ∂μ_c/∂θ_c, and no gradient to θ through the compensation.
    Burn-in (plain BN for the first iterations) is the caller's schedule: pass no window. The
    variance E[x²] − μ̄² loses accuracy when ``|μ̄| ≫ σ̄`` (the paper's formula; the current batch's part
    is computed from centered moments).

    References
    ----------
    Z. Yao, Y. Cao, S. Zheng, G. Huang, S. Lin, "Cross-Iteration Batch Normalization", CVPR 2021.
    """
    fn = "cross_iteration_batch_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
                   past_means=past_means, past_sq_means=past_sq_means, past_mean_grads=past_mean_grads,
                   past_sq_mean_grads=past_sq_mean_grads, layer_weight=layer_weight,
                   past_layer_weights=past_layer_weights)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    c = int(input.shape[1])
    _check_channels(fn, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _together(fn, running_mean=running_mean, running_var=running_var)
    _together(fn, past_means=past_means, past_sq_means=past_sq_means)
    _together(fn, past_mean_grads=past_mean_grads, past_sq_mean_grads=past_sq_mean_grads,
              layer_weight=layer_weight, past_layer_weights=past_layer_weights)
    w = _check_window(fn, c, past_means=past_means, past_sq_means=past_sq_means)
    compensate = layer_weight is not None
    if layer_weight is not None:  # with the three others (_together)
        if past_means is None:
            raise ValueError(f"{fn}: past_mean_grads and the layer weights compensate past_means; got past_means=None")
        if layer_weight.ndim < 2 or int(layer_weight.shape[0]) != c:
            raise ValueError(f"{fn}: layer_weight must have shape (C, *θ_c) with C = {c} (one row per output channel); "
                             f"got shape {tuple(layer_weight.shape)}")
        want = (w,) + tuple(int(d) for d in layer_weight.shape)
        for name, a in (("past_mean_grads", past_mean_grads), ("past_sq_mean_grads", past_sq_mean_grads),
                        ("past_layer_weights", past_layer_weights)):
            if a is not None and tuple(int(d) for d in a.shape) != want:
                raise ValueError(f"{fn}: {name} must have shape (k − 1, *layer_weight.shape) = {want}; got shape {tuple(a.shape)}")
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum, allow_none=False)
    training = check_bool(fn, "training", training)
    rho = check_nonnegative(fn, "rho", rho)
    invalid = check_choice(fn, "invalid", invalid, ("clamp", "drop"))
    check_nonnegative_values(fn, "running_var", xp, running_var)
    check_nonnegative_values(fn, "past_sq_means", xp, past_sq_means, what="a window of mean squares")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when training=False; got None")
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = x.ndim
    gamma = _chan(xp, to_compute(xp, weight, cd), nd)
    beta = _chan(xp, to_compute(xp, bias, cd), nd)
    sh = _shapes(weight, bias)
    if not training:
        rm = _chan(xp, to_compute(xp, running_mean, cd), nd)
        rv = _chan(xp, to_compute(xp, running_var, cd), nd)
        y, mu, s = _population(xp, x, rm, rv, gamma, beta, eps)
        return _out(xp, y, input.dtype), Residuals((x, mu, s, gamma), ("eval", None) + sh)
    m = _count_check(fn, x)
    a, p_mu, p_nu = 1.0, 0.0, 0.0
    if w > 0:
        pm = to_compute(xp, past_means, cd)
        pn = to_compute(xp, past_sq_means, cd)
        if compensate and rho > 0:
            # Taylor terms: Σ over θ_c of ∂stat/∂θ_c · (θ_t − θ_{t−τ}), per past iteration and channel
            delta = xp.reshape(to_compute(xp, layer_weight, cd), (1, c, -1)) - xp.reshape(
                to_compute(xp, past_layer_weights, cd), (w, c, -1))
            pm = pm + rho * xp.sum(xp.reshape(to_compute(xp, past_mean_grads, cd), (w, c, -1)) * delta, axis=2)
            pn = pn + rho * xp.sum(xp.reshape(to_compute(xp, past_sq_mean_grads, cd), (w, c, -1)) * delta, axis=2)
        if invalid == "clamp":  # the paper's max(ν', μ'²): a past term's variance is never negative
            pn = xp.maximum(pn, pm * pm)
            k = float(w + 1)
            a = 1.0 / k
            p_mu = _chan(xp, xp.sum(pm, axis=0), nd) / k
            p_nu = _chan(xp, xp.sum(pn, axis=0), nd) / k
        else:  # the authors' code: such terms are left out of the channel's average
            valid = xp.astype(pn - pm * pm >= 0, cd)
            kc = 1.0 + xp.sum(valid, axis=0)
            a = _chan(xp, 1.0 / kc, nd)
            p_mu = _chan(xp, xp.sum(valid * pm, axis=0) / kc, nd)
            p_nu = _chan(xp, xp.sum(valid * pn, axis=0) / kc, nd)
    if not hasattr(a, "shape"):
        a = xp.full((1, c) + (1,) * (nd - 2), a, dtype=cd, device=_dev(x))
    y, arrays, mu_t, var_t, mu_bar, var_bar = _blend_forward(xp, x, a, p_mu, p_nu, True, gamma, beta, eps)
    res = Residuals(arrays + (gamma,), ("train", True) + sh)
    rm = rv = None
    if running_mean is not None:
        rm = _ema(xp, running_mean, _flat(xp, mu_t, nd), momentum)
        rv = _ema(xp, running_var, _flat(xp, var_t, nd) * _unbiased_factor(m), momentum)
    nu_t = var_t + mu_t * mu_t
    return CBNResult(_out(xp, y, input.dtype), _out(xp, _flat(xp, mu_t, nd), input.dtype),
                     _out(xp, _flat(xp, nu_t, nd), input.dtype), rm, rv), res


cross_iteration_batch_norm.defbackward(_blend_method_backward(
    "cross_iteration_batch_norm", ("x", None, None, "w", "b", None, None, None, None, None, None)))


def cross_iteration_statistic_grads(patches: Array, preactivation: Array) -> tuple[Array, Array]:
    r"""∂μ_c/∂θ_c and ∂ν_c/∂θ_c of a linear or convolution layer's output statistics (CBN's state).

    For z_{n,c,l} = θ_c · p_{n,l} + b_c (p the input patch of output position l; a linear layer has one
    position; b_c the layer's bias, 0 without one), μ_c = mean_{n,l} z, ν_c = mean_{n,l} z²:

    .. math::

        \frac{\partial \mu_c}{\partial \theta_c} = \tfrac{1}{NL}\textstyle\sum_{n,l} p_{n,l}, \qquad
        \frac{\partial \nu_c}{\partial \theta_c} = \tfrac{2}{NL}\textstyle\sum_{n,l} z_{n,c,l}\, p_{n,l}.

    Parameters
    ----------
    patches : Array
        (N, P) for a linear layer (its input), or (N, P, L) for a convolution (``torch.nn.functional
        .unfold`` of its input: P = C_in·kh·kw patch entries, L output positions; groups = 1).
    preactivation : Array
        z, (N, C) or (N, C, L) (a conv output (N, C, H, W) reshaped to (N, C, H·W)): the layer's
        output as it is, WITH its bias. The bias has no θ_c-derivative itself, but ν_c is the mean
        square of the biased z, so ∂ν_c/∂θ_c = 2·mean z·p needs z including b_c (without it the
        result is off by 2·b_c·mean p).

    Returns
    -------
    (Array, Array)
        ``(mean_grads, sq_mean_grads)``, each (C, P): reshape to the layer weight's shape (C, C_in,
        kh, kw) for :func:`cross_iteration_batch_norm`'s ``past_mean_grads``/``past_sq_mean_grads``.

    Notes
    -----
    Survey §5.3.1. The exact partial derivatives of the statistics with respect to the output
    channel's own weights (μ_c does not depend on θ_{c'}, c' ≠ c, for a linear or conv layer with
    groups = 1); the authors obtain the same with autograd.

    References
    ----------
    Yao et al., "Cross-Iteration Batch Normalization", CVPR 2021 (Eqns 6-7).
    """
    fn = "cross_iteration_statistic_grads"
    xp = namespace(fn, patches=patches, preactivation=preactivation)
    if patches.ndim not in (2, 3) or preactivation.ndim != patches.ndim:
        raise ValueError(f"{fn}: patches and preactivation must be (N, P) and (N, C), or (N, P, L) and (N, C, L); "
                         f"got shapes {tuple(patches.shape)} and {tuple(preactivation.shape)}")
    if int(patches.shape[0]) != int(preactivation.shape[0]) or (
            patches.ndim == 3 and int(patches.shape[2]) != int(preactivation.shape[2])):
        raise ValueError(f"{fn}: patches and preactivation must share N (and L); got shapes {tuple(patches.shape)} "
                         f"and {tuple(preactivation.shape)}")
    cd = compute_dtype(xp, patches.dtype)
    p = to_compute(xp, patches, cd)
    z = to_compute(xp, preactivation, cd)
    if p.ndim == 2:
        p, z = xp.expand_dims(p, axis=2), xp.expand_dims(z, axis=2)
    count = int(p.shape[0]) * int(p.shape[2])
    c = int(z.shape[1])
    mean_p = xp.sum(xp.sum(p, axis=2), axis=0) / count  # (P,)
    dmu = xp.broadcast_to(xp.reshape(mean_p, (1, int(p.shape[1]))), (c, int(p.shape[1])))
    # Σ_{n,l} z_{n,c,l} p_{n,P,l}: a batched product (N, C, L) × (N, L, P) → (N, C, P)
    dnu = 2.0 * xp.sum(xp.matmul(z, xp.permute_dims(p, (0, 2, 1))), axis=0) / count
    return _out(xp, xp.asarray(dmu, copy=True), patches.dtype), _out(xp, dnu, patches.dtype)
