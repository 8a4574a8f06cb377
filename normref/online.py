"""Normalization by streaming statistics with an estimated backward (survey §4, §5.3.1).

Two methods whose forward normalizes by statistics of the *past* (a stream, not the current batch)
and whose backward is not the derivative of that forward but the paper's estimate of the gradient
that batch normalization would propagate through its statistics:

- :func:`online_norm` (Chiley et al., NeurIPS 2019): per-sample streaming mean and variance in the
  forward (Algorithm 1) and the backward's error-compensation control process (Algorithm 2), whose
  two accumulators (``error_mean``, ``error_proj``) are state;
- :func:`power_norm` (Shen et al., ICML 2020): the running quadratic mean in the forward and the
  approximate backward with its running gradient statistic ν (``grad_correlation``, Algorithm 1);
  ``variant="pn-v"`` is the batch variant (the batch quadratic mean, exact backward).

State in, state out. The forward's statistics come back in the result ``NamedTuple``
(``OnlineNormResult`` / ``PowerNormResult``; first field the output). The backward's state is updated
by the *backward*, so it cannot come back from a forward: :func:`online_norm_backward` and
:func:`power_norm_backward` take the residuals of ``method.forward(...)`` and the cotangent and return
the gradients *and* the updated backward state (pure functions). The registered backward
(``method.backward``, :func:`normref.vjp`, the generated torch/JAX adapters) is the same computation
with the new state dropped; ``normref.backends.torch.OnlineNorm`` / ``PowerNorm`` are layers that keep
both kinds of state in buffers. One training step, by hand::

    out, res = normref.online_norm.forward(x, rm, rv, u, v, w, b, training=True)
    y, rm, rv = out
    dx, dw, db, u, v = normref.online_norm_backward(res, dy)

What is exact. With ``alpha_bkw = 1`` (online_norm) or ``grad_correlation = 0`` (power_norm) the
backward is the exact derivative of the forward with the streaming statistics held fixed (constants
of the backward, like batch renormalization's r and d: ``fd_target``); the registry's examples are
those cases, so the conformance suite checks them by finite differences. The compensation terms
(α_b < 1, ν ≠ 0) are the papers' approximations: a correction that does not depend on this step's
cotangent alone (it is affine in it), hence the derivative of no function; they are checked against
an independent re-implementation of each paper's algorithm in tests/test_online.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._results import result_tuple
from ._validate import _real, check_bool, check_choice, check_eps_representable, check_ndim, check_nonnegative_values
from ._xp import Array, compute_dtype, namespace, to_compute
from .framework import channel_param, check_param_shape
from .registry import Empty, Example, Residuals, method

__all__ = [
    "OnlineNormResult",
    "OnlineNormGrad",
    "PowerNormResult",
    "PowerNormGrad",
    "online_norm",
    "online_norm_backward",
    "power_norm",
    "power_norm_backward",
]


@result_tuple
class OnlineNormResult(NamedTuple):
    """A training-mode :func:`online_norm`: the output and the streaming statistics after the batch."""

    output: Any
    running_mean: Any
    running_var: Any


@result_tuple
class OnlineNormGrad(NamedTuple):
    """:func:`online_norm_backward`: the gradients and the control process's accumulators after it.

    ``(grad_input, grad_weight, grad_bias, error_mean, error_proj)``."""

    grad_input: Any
    grad_weight: Any
    grad_bias: Any
    error_mean: Any
    error_proj: Any


@result_tuple
class PowerNormResult(NamedTuple):
    """A training-mode :func:`power_norm`: the output and the running quadratic mean after the batch."""

    output: Any
    running_mean_square: Any


@result_tuple
class PowerNormGrad(NamedTuple):
    """:func:`power_norm_backward`: the gradients and the running gradient statistic ν after it.

    ``(grad_input, grad_weight, grad_bias, grad_correlation)``."""

    grad_input: Any
    grad_weight: Any
    grad_bias: Any
    grad_correlation: Any


# --------------------------------------------------------------------------------------------------
# shared plumbing


def _alpha(fn: str, name: str, v: Any, *, upper_open: bool = False) -> float:
    """A decay factor in [0, 1] ([0, 1) when ``upper_open``: a stream that never moves)."""
    a = _real(fn, name, v)
    if not (0.0 <= a <= 1.0) or (upper_open and a == 1.0):
        rng = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{fn}: {name} must lie in {rng}; got {a!r}")
    return a


def _eps(fn: str, xp, input, eps) -> float:
    e = _real(fn, "eps", eps)
    if not e > 0 or e == float("inf"):
        raise ValueError(f"{fn}: eps must be a finite number > 0; got {e!r}")
    check_eps_representable(fn, e, xp, compute_dtype(xp, input.dtype))
    return e


def _pair(fn: str, a, b, names: tuple[str, str]) -> None:
    if (a is None) != (b is None):
        given, missing = (names[0], names[1]) if b is None else (names[1], names[0])
        raise ValueError(f"{fn}: {given} and {missing} go together; got {given} but {missing}=None")


def _cast(xp, a, dtype):
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _shapes(weight, bias):
    return (None if weight is None else tuple(weight.shape), None if bias is None else tuple(bias.shape))


def _affine(xp, yhat, gamma, beta, nd):
    y = yhat if gamma is None else yhat * channel_param(xp, gamma, nd)
    return y if beta is None else y + channel_param(xp, beta, nd)


def _param_grads(xp, g, yhat, static_shapes):
    """dγ = Σ g·ŷ, dβ = Σ g over (N, *spatial): the affine's exact gradients."""
    wshape, bshape = static_shapes
    axes = (0,) + tuple(range(2, g.ndim))
    dw = None if wshape is None else xp.reshape(xp.sum(g * yhat, axis=axes), wshape)
    db = None if bshape is None else xp.reshape(xp.sum(g, axis=axes), bshape)
    return dw, db


def _empty(xp, input, arrays, result, running, keep=()):
    """An input with a zero-sized dimension: empty output, state back unchanged (copies), and the
    registry's empty backward (:class:`~normref.registry.Empty`); ``keep``: the backward's state,
    which :func:`_state_backward` hands back unchanged."""
    y = xp.zeros_like(input)
    res = Residuals(keep, Empty(tuple(None if a is None else tuple(int(d) for d in a.shape) for a in arrays)))
    if result is not None:
        return result(y, *(xp.asarray(r, copy=True) for r in running)), res
    return y, res


def _unfrozen(m):
    """An ``fd_target`` that freezes nothing: the method's own forward (its primary output)."""

    def same(*args, **kwargs):
        return m.primary(m(*args, **kwargs))

    return same


def _zeros(xp, c, like):
    from array_api_compat import device

    try:
        return xp.zeros((c,), dtype=like.dtype, device=device(like))
    except Exception:  # a traced value without a concrete device: the library's default
        return xp.zeros((c,), dtype=like.dtype)


# --------------------------------------------------------------------------------------------------
# online normalization (Chiley et al., NeurIPS 2019)


def _ex_online(rng):
    for shape in [(5, 3), (4, 3, 4), (3, 2, 2, 3)]:
        c = shape[1]
        x = rng.standard_normal(shape) * 1.5 + 0.7
        rm, rv = rng.standard_normal(c) * 0.5, rng.uniform(0.5, 2.0, c)
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        u, v = rng.standard_normal(c) * 0.1, rng.standard_normal(c) * 0.1
        # alpha_bkw = 1: the control process is off and the backward is the exact derivative of the
        # forward with the streaming statistics frozen (fd_target); the compensation (alpha_bkw < 1)
        # is the paper's approximation, checked in tests/test_online.py against Algorithm 2
        yield Example((x, rm, rv, u, v, w, b), dict(training=True, alpha_fwd=0.8, alpha_bkw=1.0),
                      label=f"{shape} streaming statistics, control process off")
        yield Example((x, rm, rv, None, None, w, None), dict(training=True, alpha_fwd=0.5, alpha_bkw=1.0),
                      label=f"{shape} fast stream, weight only")
        yield Example((x, rm, rv, u, v, w, b), dict(training=False), label=f"{shape} inference")


def _online_stream(xp, x, running_mean, running_var, alpha, eps):
    """Algorithm 1 over the batch as a stream of N samples: the per-sample (center, scale) and the
    statistics after the last sample.

    For sample n with spatial mean μ_n and (biased) spatial variance σ_n² (0 without spatial axes):
    y_n = (x_n − μ̂_{n−1})/√(σ̂²_{n−1} + ε);
    σ̂²_n = α σ̂²_{n−1} + (1 − α) σ_n² + α(1 − α)(μ_n − μ̂_{n−1})²;  μ̂_n = α μ̂_{n−1} + (1 − α) μ_n.
    (The σ̂² recursion is the exact α-weighted variance of the pooled stream: the within-sample part
    plus the between-sample part of Chan's update.)
    """
    nd = x.ndim
    sp = tuple(range(2, nd))
    if sp:
        mu = xp.mean(x, axis=sp)  # (N, C)
        var = xp.mean((x - xp.reshape(mu, tuple(mu.shape) + (1,) * len(sp))) ** 2, axis=sp)
    else:
        mu, var = x, None
    m, s2 = running_mean, running_var
    centers, scales = [], []
    for n in range(x.shape[0]):
        centers.append(m)
        scales.append(xp.sqrt(s2 + eps))
        d = mu[n, ...] - m
        within = 0.0 if var is None else (1.0 - alpha) * var[n, ...]
        s2 = alpha * s2 + within + alpha * (1.0 - alpha) * d * d
        m = m + (1.0 - alpha) * d
    tail = (1,) * len(sp)
    c = xp.reshape(xp.stack(centers, axis=0), (x.shape[0], x.shape[1]) + tail)
    s = xp.reshape(xp.stack(scales, axis=0), (x.shape[0], x.shape[1]) + tail)
    return c, s, m, s2


def _online_frozen(args, kwargs):
    """online_norm in training with the streaming statistics (μ̂_{n−1}, σ̂_{n−1} of every sample) frozen
    at the base call's values: the function whose derivative the backward is when alpha_bkw = 1."""
    b = online_norm.bind(*args, **kwargs)
    a = b.arguments
    if not a["training"]:
        return _unfrozen(online_norm)  # inference: the exact derivative of the function itself
    if a["alpha_bkw"] != 1.0:
        return None  # the compensation is the derivative of no function (module docstring)
    x = a["input"]
    xp = namespace("online_norm", input=x)
    c, s, _, _ = _online_stream(xp, x, a["running_mean"], a["running_var"], a["alpha_fwd"], a["eps"])

    def frozen(input, running_mean, running_var, error_mean=None, error_proj=None, weight=None, bias=None,
               *rest, **kw):
        return _affine(xp, (input - c) / s, weight, bias, input.ndim)

    return frozen


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_var", "error_mean", "error_proj", "weight", "bias"),
    nondiff=("running_mean", "running_var", "error_mean", "error_proj"),
    survey="§5.3.1 (combining population and batch statistics: online normalization); Table 1 (ΠLN-like scaling)",
    paper="Chiley et al., Online Normalization for Training Neural Networks, NeurIPS 2019",
    examples=_ex_online,
    fd_target=_online_frozen,
)
def online_norm(
    input: Array,
    running_mean: Array,
    running_var: Array,
    error_mean: Array | None = None,
    error_proj: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
) -> Array | OnlineNormResult:
    r"""Online normalization: each sample normalized by the streaming statistics of the samples before it.

    .. math::

        y_n = \gamma\,\frac{x_n - \hat\mu_{n-1}}{\sqrt{\hat\sigma^2_{n-1} + \epsilon}} + \beta,\qquad
        \hat\mu_n = \alpha_f\hat\mu_{n-1} + (1-\alpha_f)\,\mu(x_n),

        \hat\sigma^2_n = \alpha_f\hat\sigma^2_{n-1} + (1-\alpha_f)\,\sigma^2(x_n)
                         + \alpha_f(1-\alpha_f)\,(\mu(x_n) - \hat\mu_{n-1})^2

    per channel, with μ(x_n), σ²(x_n) the mean and (biased) variance of sample n over its spatial
    positions (σ² = 0 for an (N, C) input) and the N samples of the batch taken as a stream in order
    (Algorithm 1). The backward is the control process of Algorithm 2, per sample n, with
    u = ``error_mean`` (ε⁽¹⁾) and v = ``error_proj`` (ε⁽ʸ⁾) carried across samples and batches:

    .. math::

        g' = \gamma g_n - (1-\alpha_b)\,v\,\hat y_n,\quad v \mathrel{+}= \mathrm{mean}_{sp}(g'\hat y_n),\quad
        \nabla x_n = g'/\hat\sigma_{n-1} - (1-\alpha_b)\,u,\quad u \mathrel{+}= \mathrm{mean}_{sp}(\nabla x_n)

    (ŷ the normalized value before γ, β), which removes from the gradient, on average over the
    stream, its components along 1 and ŷ, as batch normalization's backward does exactly per batch.

    Parameters
    ----------
    input : Array
        ``(N, C, *spatial)``; the N samples are the stream, in order (N = 1 is the paper's setting).
    running_mean, running_var : Array
        ``(C,)``: μ̂ and σ̂² before this batch (the authors start at 0 and 1). In inference they are
        the population statistics. ``running_var`` is the stream's α-weighted variance (no Bessel
        correction: it pools thousands of samples).
    error_mean, error_proj : Array or None, default None
        ``(C,)``: the control process's accumulators u and v before this backward (``None``: 0, the
        authors' start). Used by the backward only; :func:`online_norm_backward` returns them updated.
    weight, bias : Array or None, default None
        ``(C,)`` γ and β (``None``: 1 and 0).
    training : bool, default False
        Stream statistics and Algorithm 2 (``True``), or the running statistics as population
        statistics with the exact backward (``False``).
    alpha_fwd : float, default 0.999
        α_f in [0, 1): the forward stream's decay (authors' default 0.999).
    alpha_bkw : float, default 0.99
        α_b in [0, 1]: the control process's decay (authors' default 0.99); 1 turns the compensation
        off, leaving the exact derivative of the forward with the streaming statistics frozen.
    eps : float, default 1e-5
        ε > 0 under the square root.

    Returns
    -------
    Array or OnlineNormResult
        ``OnlineNormResult(output, running_mean, running_var)`` in training (the statistics after the
        last sample), the output alone in inference.

    Notes
    -----
    Survey §5.3.1 (methods combining population and batch statistics; Chiley et al. "compute the
    gradients by maintaining the property of BN during backpropagation") and §5.1.2 (the scaling
    along channels the paper pairs it with).

    What is exact: the forward is Algorithm 1 exactly. The backward treats μ̂_{n−1}, σ̂_{n−1} as
    constants (they come from earlier samples) and, with α_b < 1, adds the paper's compensation, an
    approximation of BN's projection that is not the derivative of any function (it is affine in the
    cotangent through u, v). With α_b = 1 it is the exact derivative of the forward with the stream
    frozen (the conformance suite checks this case by finite differences).

    Conventions: follows the paper and the authors' reference code (Cerebras/online-normalization,
    ``numpy_on``); torch has no online normalization. Statistics per channel over each sample's
    spatial positions; the authors' 1-d variant (``(N, C)``, no within-sample variance) is the same
    recursion with σ² = 0. The authors' layer follows the normalization with an error-compensation
    guard (activation clamping or layer scaling): compose it (``clip``, :func:`normref.rms_norm`).
    The control process runs *within* a batch too, sample after sample, so a batch of N is exactly N
    steps of batch size 1.

    References
    ----------
    V. Chiley, I. Sharapov, A. Kosson, U. Koster, R. Reece, S. Samaniego de la Fuente, V.
    Subbiah, M. James. Online Normalization for Training Neural Networks. NeurIPS 2019.
    """
    fn = "online_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, error_mean=error_mean,
                   error_proj=error_proj, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    c = int(input.shape[1])
    for name, a in (("running_mean", running_mean), ("running_var", running_var), ("error_mean", error_mean),
                    ("error_proj", error_proj), ("weight", weight), ("bias", bias)):
        check_param_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")
    _pair(fn, error_mean, error_proj, ("error_mean", "error_proj"))
    training = check_bool(fn, "training", training)
    alpha_fwd = _alpha(fn, "alpha_fwd", alpha_fwd, upper_open=True)
    alpha_bkw = _alpha(fn, "alpha_bkw", alpha_bkw)
    eps = _eps(fn, xp, input, eps)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    shape = tuple(int(d) for d in input.shape)
    arrays = (input, running_mean, running_var, error_mean, error_proj, weight, bias)
    if any(d == 0 for d in shape):
        return _empty(xp, input, arrays, OnlineNormResult if training else None, (running_mean, running_var),
                      (error_mean, error_proj))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = x.ndim
    rm, rv = to_compute(xp, running_mean, cd), to_compute(xp, running_var, cd)
    if training:
        center, scale, m_new, v_new = _online_stream(xp, x, rm, rv, alpha_fwd, eps)
    else:
        center, scale = channel_param(xp, rm, nd), channel_param(xp, xp.sqrt(rv + eps), nd)
    yhat = (x - center) / scale
    gamma, beta = to_compute(xp, weight, cd), to_compute(xp, bias, cd)
    y = _cast(xp, _affine(xp, yhat, gamma, beta, nd), input.dtype)
    u0 = None if error_mean is None else to_compute(xp, error_mean, cd)
    v0 = None if error_proj is None else to_compute(xp, error_proj, cd)
    state_dtype = input.dtype if error_mean is None else error_mean.dtype
    res = Residuals((yhat, scale, gamma, u0, v0),
                    ("online_norm", training, 1.0 - alpha_bkw, _shapes(weight, bias), state_dtype))
    if training:
        return OnlineNormResult(y, _cast(xp, m_new, running_mean.dtype), _cast(xp, v_new, running_var.dtype)), res
    return y, res


def _online_core(res: Residuals, g: Array) -> tuple:
    """Algorithm 2 on one batch: (dx, dγ, dβ, u, v); the loop over samples is the control process."""
    xp = namespace("online_norm.backward", cotangent=g)
    yhat, scale, gamma, u, v = res.arrays
    _, training, beta_b, shapes, state_dtype = res.static
    g = to_compute(xp, g, yhat.dtype)
    nd, c = g.ndim, int(g.shape[1])
    dw, db = _param_grads(xp, g, yhat, shapes)
    gy = g if gamma is None else g * channel_param(xp, gamma, nd)
    u = _zeros(xp, c, yhat) if u is None else u
    v = _zeros(xp, c, yhat) if v is None else v
    if not training:  # population statistics: exact, and the control process does not run
        return gy / scale, dw, db, _cast(xp, u, state_dtype), _cast(xp, v, state_dtype)
    sp = tuple(range(1, nd - 1))  # the spatial axes of one sample (C, *spatial)
    tail = (c,) + (1,) * len(sp)

    def mean_sp(t):
        return xp.mean(t, axis=sp) if sp else t

    rows = []
    for n in range(g.shape[0]):
        yn = yhat[n, ...]
        gn = gy[n, ...] - beta_b * xp.reshape(v, tail) * yn  # remove the estimated component along ŷ
        v = v + mean_sp(gn * yn)
        dxn = gn / scale[n, ...] - beta_b * xp.reshape(u, tail)  # ... and along 1
        u = u + mean_sp(dxn)
        rows.append(dxn)
    dx = xp.stack(rows, axis=0)
    return dx, dw, db, _cast(xp, u, state_dtype), _cast(xp, v, state_dtype)


@online_norm.defbackward
def _online_backward(res: Residuals, g: Array) -> tuple:
    dx, dw, db, _, _ = _online_core(res, g)
    return dx, None, None, None, None, dw, db


def online_norm_backward(residuals: Residuals, grad_output: Array) -> OnlineNormGrad:
    r"""The backward of :func:`online_norm` with its control state: gradients and updated u, v.

    .. math::

        g' = \gamma g_n - (1-\alpha_b)\,v\,\hat y_n,\quad v \leftarrow v + \mathrm{mean}_{sp}(g'\hat y_n),\quad
        \nabla x_n = g'/\hat\sigma_{n-1} - (1-\alpha_b)\,u,\quad u \leftarrow u + \mathrm{mean}_{sp}(\nabla x_n)

    for the samples n = 1..N in order (Algorithm 2 of Chiley et al.), starting from the
    ``error_mean`` (u) and ``error_proj`` (v) given to the forward; ∇γ = Σ g·ŷ, ∇β = Σ g.

    Parameters
    ----------
    residuals : Residuals
        The second result of ``normref.online_norm.forward(...)``.
    grad_output : Array
        The cotangent of the output, of its shape and library.

    Returns
    -------
    OnlineNormGrad
        ``(grad_input, grad_weight, grad_bias, error_mean, error_proj)``: the same gradients as the
        registered backward (``None`` for an absent weight or bias) and the accumulators after this
        batch, for the next step. In inference mode u, v come back unchanged.

    Notes
    -----
    Survey §5.3.1. Pure: nothing is mutated; the accumulators keep the dtype of the ``error_mean``
    given (the input's when it was ``None``).

    References
    ----------
    Chiley et al., Online Normalization for Training Neural Networks, NeurIPS 2019 (Algorithm 2).
    """
    return OnlineNormGrad(*_state_backward("online_norm_backward", online_norm, residuals, grad_output, _online_core))


def _state_backward(fn, m, residuals, grad_output, core):
    """The registry's checks of the cotangent (shape, library, dtype), then ``core``."""
    if not isinstance(residuals, Residuals) or not isinstance(residuals.static, (tuple, Empty)):
        raise TypeError(f"{fn}: residuals must be the Residuals of normref.{m.name}.forward(...); got "
                        f"{type(residuals).__name__}")
    if isinstance(residuals.static, tuple) and (not residuals.static or residuals.static[0] != m.name):
        raise TypeError(f"{fn}: residuals must come from normref.{m.name}.forward(...)")
    m._check_cotangent(residuals, grad_output)
    if isinstance(residuals.static, Empty):
        grads = m._empty_backward(residuals, grad_output, None)
        xp = namespace(fn, grad_output=grad_output)
        state = [None if a is None else xp.asarray(a, copy=True) for a in residuals.arrays]  # unchanged
        if m is online_norm:
            return (grads[0], grads[5], grads[6], *state)
        return (grads[0], grads[3], grads[4], *state)
    out = list(core(residuals, grad_output))
    meta = residuals.meta
    if hasattr(meta, "dtypes"):  # gradients in each argument's dtype, as the registered backward
        xp = namespace(fn, grad_output=grad_output)
        idx = (0, 5, 6) if m is online_norm else (0, 3, 4)
        for k, i in zip(range(3), idx):
            if out[k] is not None and meta.dtypes[i] is not None:
                out[k] = _cast(xp, out[k], meta.dtypes[i])
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# power normalization (Shen et al., ICML 2020)


def _ex_power(rng):
    for shape in [(6, 3), (4, 3, 5), (3, 2, 2, 3)]:
        c = shape[1]
        x = rng.standard_normal(shape) * 1.3 + 0.4
        psi2 = rng.uniform(0.5, 2.0, c)
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        # grad_correlation = 0 (None): the approximate backward's ν-term vanishes and what is left is
        # exact (the running ψ is a constant of the forward); ν ≠ 0 is the paper's estimate, checked
        # against Algorithm 1 in tests/test_online.py
        yield Example((x, psi2, None, w, b), dict(training=True), label=f"{shape} PN, running quadratic mean")
        yield Example((x, psi2, None, w, b), dict(training=True, grad_scale="batch"),
                      label=f"{shape} PN, backward scaled by the batch quadratic mean (authors' code)")
        yield Example((x, psi2, rng.standard_normal(c) * 0.2, w, None), dict(training=True, variant="pn-v"),
                      label=f"{shape} PN-V, batch quadratic mean")
        yield Example((x, psi2, None, w, b), dict(training=False), label=f"{shape} inference")


def _power_frozen(args, kwargs):
    """power_norm with grad_scale="batch": ∂L/∂X is γ·g/ψ_B (the batch quadratic mean, frozen at the
    base call) while ∂L/∂γ = Σ g·x/ψ_{t−1}, ∂L/∂β = Σ g are the forward's own; the function with
    these derivatives at the base point is γ·x/ψ_{t−1} + β + γ₀·x·(1/ψ_B − 1/ψ_{t−1}) (γ₀, ψ_B frozen)."""
    b = power_norm.bind(*args, **kwargs)
    a = b.arguments
    if not a["training"] or a["variant"] != "pn" or a["grad_scale"] != "batch":
        # inference, PN-V and PN with the paper's divisor: with ν = 0 the derivative of the function
        # itself (ν ≠ 0 is the derivative of no function: the module docstring)
        return _unfrozen(power_norm)
    x = a["input"]
    xp = namespace("power_norm", input=x)
    nd = x.ndim
    s_b = xp.sqrt(xp.mean(x * x, axis=(0,) + tuple(range(2, nd)), keepdims=True) + a["eps"])
    s_run = channel_param(xp, xp.sqrt(a["running_mean_square"] + a["eps"]), nd)
    g0 = 1.0 if a["weight"] is None else channel_param(xp, a["weight"], nd)
    shift = g0 * (1.0 / s_b - 1.0 / s_run)

    def frozen(input, running_mean_square, grad_correlation=None, weight=None, bias=None, *rest, **kw):
        return _affine(xp, input / s_run, weight, bias, input.ndim) + input * shift

    return frozen


@method(
    channels=("input",),
    array_params=("input", "running_mean_square", "grad_correlation", "weight", "bias"),
    nondiff=("running_mean_square", "grad_correlation"),
    survey="§5.1.2 (scaling-only BN: Shen et al.); §5.3.1 (gradients of population statistics estimated by moving averages)",
    paper="Shen et al., PowerNorm: Rethinking Batch Normalization in Transformers, ICML 2020",
    examples=_ex_power,
    fd_target=_power_frozen,
)
def power_norm(
    input: Array,
    running_mean_square: Array,
    grad_correlation: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    eps: float = 1e-5,
    *,
    variant: str = "pn",
    grad_scale: str = "running",
) -> Array | PowerNormResult:
    r"""Power normalization: scaling by the running quadratic mean, with an approximate backward.

    .. math::

        \hat X = X/\psi_{t-1},\quad Y = \gamma\hat X + \beta,\quad
        \psi_B^2 = \mathrm{mean}_B(x^2),\quad \psi_t^2 = \alpha_f\psi_{t-1}^2 + (1-\alpha_f)\psi_B^2

    with ψ = √(ψ² + ε), per channel over ``(N, *spatial)`` (Algorithm 1, forward). The backward:

    .. math::

        \tilde X' = \gamma\,\partial L/\partial Y - \nu_{t-1}\hat X,\quad
        \partial L/\partial X = \tilde X'/\psi_{t-1},\quad
        \nu_t = \nu_{t-1}\bigl(1 - (1-\alpha_b)\Gamma_t\bigr) + (1-\alpha_b)\Lambda_t

    with Γ_t = mean_B(x̂²), Λ_t = mean_B(x̂·∂L/∂x̂) (Definition 2): ν estimates, from past batches,
    the mean(x̂·∂L/∂x̂) that a batch statistic's exact backward would subtract.

    Parameters
    ----------
    input : Array
        ``(N, C, *spatial)`` (a Transformer's (T·B, C) tokens: ``(N, C)``).
    running_mean_square : Array
        ``(C,)``: ψ²_{t−1} (authors start at 1); the population statistic at inference.
    grad_correlation : Array or None, default None
        ``(C,)``: ν_{t−1} (``None``: 0, the authors' start). Used by the backward only;
        :func:`power_norm_backward` returns ν_t. It is the paper's ν; the authors' buffer ``ema_gz``
        holds ν/(1 − α_b) (the same recursion, scaled).
    weight, bias : Array or None, default None
        ``(C,)`` γ and β.
    training : bool, default False
        Training (running ψ updated) or inference (ψ² as population statistic, exact backward).
    alpha_fwd, alpha_bkw : float, default 0.9
        α of the forward statistic (in [0, 1)) and of ν (in [0, 1]); the authors' defaults 0.9.
    eps : float, default 1e-5
        ε > 0 under the square root.
    variant : {"pn", "pn-v"}, default "pn"
        ``"pn"``: PN, the method above. ``"pn-v"``: PN-V, the batch variant: X̂ = X/ψ_B with the batch
        quadratic mean and its exact backward ∂L/∂X = (g' − X̂·mean_B(g'X̂))/ψ_B (g' = γ ∂L/∂Y);
        ψ² is still updated for inference and ν is unused.
    grad_scale : {"running", "batch"}, default "running"
        PN's divisor in the backward: ψ_{t−1} as in the paper's Algorithm 1 (``"running"``) or the
        batch's √(ψ_B² + ε) as in the authors' code (``"batch"``).

    Returns
    -------
    Array or PowerNormResult
        ``PowerNormResult(output, running_mean_square)`` in training, the output in inference.

    Notes
    -----
    Survey §5.1.2 (scaling-only BN for NLP, Shen et al.) and §5.3.1 ("view the backpropagation
    gradients as statistics to be estimated, and approximate these statistics by moving averages").

    What is exact: the forward is Algorithm 1's. PN's backward treats ψ_{t−1} as the constant it is;
    its −ν_{t−1}X̂ term is the paper's approximation (independent of this step's cotangent, so the
    derivative of no function): with ν = 0 the backward is exact, which the conformance suite checks
    by finite differences, and ν ≠ 0 is tested against an independent re-implementation of
    Algorithm 1. PN-V's backward is exact. ``grad_scale="batch"`` differentiates X/ψ_B with ψ_B held
    fixed (``fd_target``).

    Conventions: torch has no power normalization; this follows the paper and offers the authors'
    divisor by ``grad_scale``. Not included: the authors' warm-up (the first iterations normalize by
    the batch's ψ_B, with the approximate backward), their padding masks, and the group scaling
    they put before the layer (compose :func:`normref.rms_norm` / :func:`normref.group_norm`).

    References
    ----------
    S. Shen, Z. Yao, A. Gholami, M. W. Mahoney, K. Keutzer. PowerNorm: Rethinking Batch
    Normalization in Transformers. ICML 2020.
    """
    fn = "power_norm"
    xp = namespace(fn, input=input, running_mean_square=running_mean_square, grad_correlation=grad_correlation,
                   weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    c = int(input.shape[1])
    for name, a in (("running_mean_square", running_mean_square), ("grad_correlation", grad_correlation),
                    ("weight", weight), ("bias", bias)):
        check_param_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")
    training = check_bool(fn, "training", training)
    alpha_fwd = _alpha(fn, "alpha_fwd", alpha_fwd, upper_open=True)
    alpha_bkw = _alpha(fn, "alpha_bkw", alpha_bkw)
    eps = _eps(fn, xp, input, eps)
    variant = check_choice(fn, "variant", variant, ("pn", "pn-v"))
    grad_scale = check_choice(fn, "grad_scale", grad_scale, ("running", "batch"))
    check_nonnegative_values(fn, "running_mean_square", xp, running_mean_square, what="a mean square")
    shape = tuple(int(d) for d in input.shape)
    arrays = (input, running_mean_square, grad_correlation, weight, bias)
    if any(d == 0 for d in shape):
        return _empty(xp, input, arrays, PowerNormResult if training else None, (running_mean_square,),
                      (grad_correlation,))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = x.ndim
    axes = (0,) + tuple(range(2, nd))
    psi2 = to_compute(xp, running_mean_square, cd)
    s_run = channel_param(xp, xp.sqrt(psi2 + eps), nd)
    if training:
        ms = xp.mean(x * x, axis=axes, keepdims=True)  # ψ_B², (1, C, 1, ...)
        s_batch = xp.sqrt(ms + eps)
        new = alpha_fwd * psi2 + (1.0 - alpha_fwd) * xp.reshape(ms, (c,))
    if training and variant == "pn-v":
        scale = s_batch
    else:
        scale = s_run
    xhat = x / scale
    gamma, beta = to_compute(xp, weight, cd), to_compute(xp, bias, cd)
    y = _cast(xp, _affine(xp, xhat, gamma, beta, nd), input.dtype)
    # the backward's divisor and mode: exact (inference, PN-V) or PN's approximate backward
    mode = "exact" if not training else ("pn-v" if variant == "pn-v" else "pn")
    div = s_batch if (mode == "pn" and grad_scale == "batch") else scale
    nu = None if grad_correlation is None else to_compute(xp, grad_correlation, cd)
    state_dtype = input.dtype if grad_correlation is None else grad_correlation.dtype
    res = Residuals((xhat, div, gamma, nu), ("power_norm", mode, 1.0 - alpha_bkw, _shapes(weight, bias), state_dtype))
    if training:
        return PowerNormResult(y, _cast(xp, new, running_mean_square.dtype)), res
    return y, res


def _power_core(res: Residuals, g: Array) -> tuple:
    """(dx, dγ, dβ, ν_t) for one batch."""
    xp = namespace("power_norm.backward", cotangent=g)
    xhat, div, gamma, nu = res.arrays
    _, mode, beta_b, shapes, state_dtype = res.static
    g = to_compute(xp, g, xhat.dtype)
    nd, c = g.ndim, int(g.shape[1])
    axes = (0,) + tuple(range(2, nd))
    dw, db = _param_grads(xp, g, xhat, shapes)
    gh = g if gamma is None else g * channel_param(xp, gamma, nd)  # ∂L/∂X̂
    nu = _zeros(xp, c, xhat) if nu is None else nu
    if mode == "exact":  # a constant divisor
        return gh / div, dw, db, _cast(xp, nu, state_dtype)
    if mode == "pn-v":  # y = x/ψ_B(x): the projection of the batch statistic, exact
        proj = xp.mean(gh * xhat, axis=axes, keepdims=True)
        return (gh - xhat * proj) / div, dw, db, _cast(xp, nu, state_dtype)
    approx = gh - channel_param(xp, nu, nd) * xhat  # X̃' = ∂L/∂X̂ − ν_{t−1} X̂
    gamma_t = xp.reshape(xp.mean(xhat * xhat, axis=axes), (c,))  # Γ_t
    lam_t = xp.reshape(xp.mean(xhat * gh, axis=axes), (c,))  # Λ_t
    nu_new = nu * (1.0 - beta_b * gamma_t) + beta_b * lam_t
    return approx / div, dw, db, _cast(xp, nu_new, state_dtype)


@power_norm.defbackward
def _power_backward(res: Residuals, g: Array) -> tuple:
    dx, dw, db, _ = _power_core(res, g)
    return dx, None, None, dw, db


def power_norm_backward(residuals: Residuals, grad_output: Array) -> PowerNormGrad:
    r"""The backward of :func:`power_norm` with its gradient statistic: gradients and the updated ν.

    .. math::

        \partial L/\partial X = \bigl(\gamma\,\partial L/\partial Y - \nu_{t-1}\hat X\bigr)/\psi_{t-1},\qquad
        \nu_t = \nu_{t-1}\bigl(1 - (1-\alpha_b)\Gamma_t\bigr) + (1-\alpha_b)\Lambda_t

    (Algorithm 1 and Definition 2 of Shen et al.; Γ_t = mean_B(x̂²), Λ_t = mean_B(x̂·∂L/∂x̂)), starting
    from the ``grad_correlation`` given to the forward; ∇γ = Σ g·x̂, ∇β = Σ g.

    Parameters
    ----------
    residuals : Residuals
        The second result of ``normref.power_norm.forward(...)``.
    grad_output : Array
        The cotangent of the output.

    Returns
    -------
    PowerNormGrad
        ``(grad_input, grad_weight, grad_bias, grad_correlation)``: the registered backward's
        gradients and ν_t. In inference and with ``variant="pn-v"`` ν comes back unchanged.

    Notes
    -----
    Survey §5.3.1. Pure; ν keeps the dtype of the ``grad_correlation`` given (the input's when None).

    References
    ----------
    Shen et al., PowerNorm: Rethinking Batch Normalization in Transformers, ICML 2020 (Algorithm 1).
    """
    return PowerNormGrad(*_state_backward("power_norm_backward", power_norm, residuals, grad_output, _power_core))
