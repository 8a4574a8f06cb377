"""Combinational normalization (survey §5.2, "Combination"): statistics mixed across partitions.

Switchable normalization (Luo et al., ICLR 2019) standardizes with a learned convex combination of
the instance (IN), layer (LN) and batch (BN) statistics of the same input. For x viewed (N, C, M):

    μ_IN, σ²_IN  per (n, c) over M;   μ_LN = mean_c μ_IN,  σ²_LN = mean_c(σ²_IN + μ_IN²) − μ_LN²;
    μ_BN = mean_n μ_IN,  σ²_BN = mean_n(σ²_IN + μ_IN²) − μ_BN²          (σ² biased; computed in the
                                                                       stable form mean σ² + var μ)
    μ = Σ_k w_k μ_k,  σ² = Σ_k v_k σ²_k,  w = softmax(λ_μ),  v = softmax(λ_σ)
    x̂ = (x − μ)/√(σ² + ε),  y = γ·x̂ + β.

Backward (one pass of reductions per partition, nothing derived per combination):
with ĝ = ∂L/∂x̂ and s = (σ² + ε)^{−½},

    a = −Σ_M ĝ·s                 (∂L/∂μ, per (n, c)),     b = −½·Σ_M ĝ·x̂·s²   (∂L/∂σ²)
    dx = ĝ·s + Σ_k [ w_k·R_k(a)/n_k + v_k·R_k(b)·2(x − μ_k)/n_k ]

where R_k sums a per-(n, c) quantity over partition k's group (IN: itself, LN: over c, BN: over n) and
broadcasts it back, n_k the partition's element count (∂μ_k/∂x = 1/n_k, ∂σ²_k/∂x = 2(x − μ_k)/n_k).
The logits get dλ_μ = w ∘ (p − ⟨w, p⟩) with p_k = Σ a·μ_k, and likewise dλ_σ with q_k = Σ b·σ²_k.
At inference the BN statistics are the running ones (constants).
"""

from __future__ import annotations

from typing import Any

from ._validate import (check_bool, check_momentum, check_ndim, check_nonnegative_values, check_shape,
                        concrete_any)
from ._xp import Array, compute_dtype, namespace, to_compute
from .distributed import check_reducer
from .framework import channel_param
from .registry import Example, Residuals, method
from .standardization import (NormResult, _BesselStandardizing, _check_nbt, _check_training_count, _empty_call,
                              _eps, _factor, _is_empty, _running_pair)
from .partition import Partition

__all__ = ["switchable_norm", "batch_instance_norm", "adaptive_layer_instance_norm"]


def _softmax(xp, z):
    e = xp.exp(z - xp.max(z))
    return e / xp.sum(e)


def _ex_switchable(rng):
    x = rng.standard_normal((4, 3, 3, 2)) * 1.5 + 0.5
    lm, lv = rng.standard_normal(3), rng.standard_normal(3)
    c = 3
    yield Example((x, lm, lv), dict(training=True), label="training, no affine")
    yield Example((x, lm, lv, rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)),
                  dict(training=True, momentum=0.2), label="training, affine, running update")
    yield Example((x, lm, lv, rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)),
                  dict(training=False), label="inference (BN statistics from the running ones)")
    yield Example((rng.standard_normal((3, 4, 5)), lm, lv), dict(training=True), label="1-D spatial")
    yield Example((x, lm, lv, rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)),
                  dict(training=True, momentum=0.2, unbiased=True), label="training, unbiased instance variance (the authors' code)")
    yield Example((x, lm, lv, rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)),
                  dict(training=False, unbiased=True), label="inference, unbiased instance variance")
    x1 = rng.standard_normal((5, 4)) * 1.5 + 0.5
    l2m, l2v = rng.standard_normal(2), rng.standard_normal(2)
    for unb in (False, True):
        yield Example((x1, l2m, l2v, rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)),
                      dict(training=True, momentum=0.2, unbiased=unb), label=f"(N, C): LN + BN, 2 logits (SwitchNorm1d), unbiased={unb}")
    yield Example((x1, l2m, l2v, rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)),
                  dict(training=False, unbiased=True), label="(N, C): LN + BN inference")


@method(
    channels=("input",),
    array_params=("input", "mean_weight", "var_weight", "weight", "bias", "running_mean", "running_var"),
    nondiff=("running_mean", "running_var"),
    survey="§5.2 (combination: switchable normalization over IN, LN and BN statistics)",
    paper="Luo, Ren, Peng & Zhang, Differentiable Learning-to-Normalize via Switchable Normalization, ICLR 2019",
    examples=_ex_switchable,
)
def switchable_norm(
    input: Any,
    mean_weight: Any,
    var_weight: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
    unbiased: bool = False,
) -> Array | NormResult:
    """Switchable normalization: x̂ = (x − Σ_k w_k μ_k)/√(Σ_k v_k σ²_k + ε), k ∈ (IN, LN, BN).

    ``mean_weight`` and ``var_weight`` are the 3 logits λ (order IN, LN, BN) whose softmax gives w and
    v; they receive gradients. σ² biased (the paper's equations; its public code uses the unbiased
    instance variance, ``unbiased=True``). The running BN statistics follow :func:`normref.batch_norm`
    (unbiased variance; ``NormResult`` when training with running statistics); at inference they
    replace the batch statistics.

    A 2-D input ``(N, C)`` is the authors' ``SwitchNorm1d``: LN (over C) and BN (over N) only, with
    2 logits each (order LN, BN). It is the general form with IN's weights fixed at 0 (each "instance"
    is one value): w = (0, softmax(λ_μ)), v = (0, softmax(λ_σ)), and the logits' gradient is the
    2-way softmax backward.

    Conventions. Default: biased variances throughout (the paper's Eqns 1–4) and torch's running
    state. ``unbiased=True`` follows the authors' code (github.com/switchablenorms/Switchable-Normalization,
    ``devkit/ops/switchable_norm.py``): with a spatial axis (``SwitchNorm2d/3d``) the instance
    variance is Σ_M(x − μ_IN)²/(M − 1) and LN, BN are formed from it as that code does,
    σ²_LN = mean_c(σ²_IN + μ²_IN) − μ²_LN (likewise BN over n), i.e.
    σ²_k = σ²_k,biased + (M/(M − 1) − 1)·mean_k(σ²_IN,biased); for ``(N, C)`` (``SwitchNorm1d``) the LN
    and BN variances are each unbiased (C/(C − 1), N/(N − 1)). The running variance is torch's
    unbiased BN batch variance in both (the authors' code instead averages its σ²_BN, with momentum as
    the weight of the *old* value: pass ``momentum = 1 − theirs``). Not offered with ``sync``.

    Backward with the conventions: ∂σ²_k/∂x = (2/n_k)·(λ_k·(x − μ_k) + (κ − 1)·(x − μ_IN)), λ_k the
    whole-variance factor (1, or the 1-D C/(C − 1), N/(N − 1)) and κ = M/(M − 1) with a spatial axis
    and ``unbiased`` (else 1); dx gains (κ − 1)·2(x − μ_IN)·(v_IN·b/M + v_LN·R_LN(b)/(C·M) +
    v_BN·R_BN(b)/(N·M)) and the λ_k scale the v_k·R_k(b) terms (b as in the module docstring).

    ``sync`` (a reducer, :mod:`normref.distributed`): the BN statistics μ_BN, σ²_BN over every rank's
    batch (IN and LN are per sample, local); the same running statistics on every rank. Per step:
    forward one all_gather of 2C + 1 values, backward one all_reduce_sum of 2C values (the BN
    terms Σ_n a, Σ_n b). The logits' and γ, β's gradients are this rank's part (summed across ranks
    by the caller, as DDP does). Ranks may hold 0 samples; unused in inference.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    mean_weight : array, shape ``(3,)`` (``(2,)`` for an ``(N, C)`` input)
        The logits of the means (IN, LN, BN), or (LN, BN) for ``(N, C)``.
    var_weight : array, shape ``(3,)`` (``(2,)`` for an ``(N, C)`` input)
        The logits of the variances, as ``mean_weight``.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    running_mean : array or None, shape ``(C,)``, default None
        The running BN mean.
    running_var : array or None, shape ``(C,)``, default None
        The running BN (unbiased) variance.
    training : bool, default False
        Use the batch statistics (and update the running ones, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    eps : float, default 1e-5
        ε, added to the variance.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (see above).
    unbiased : bool, default False
        The authors' code's unbiased variances (see Conventions above).

    Returns
    -------
    out : array or NormResult
        The output, or ``NormResult(output, running_mean, running_var)`` in training with running
        statistics.

    Notes
    -----
    Survey §5.2 (multi-mode and combinational normalization).

    References
    ----------
    .. [1] P. Luo, J. Ren, Z. Peng, R. Zhang and J. Li, "Differentiable Learning-to-Normalize via
       Switchable Normalization", ICLR 2019, Eqns 1–4.
    """
    fn = "switchable_norm"
    xp = namespace(fn, input=input, mean_weight=mean_weight, var_weight=var_weight, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial), or (N, C) for LN + BN")
    one_d = input.ndim == 2  # SwitchNorm1d: LN + BN, two logits
    k, why = (2, "logits for LN, BN (an (N, C) input)") if one_d else (3, "logits for IN, LN, BN")
    check_shape(fn, "mean_weight", mean_weight, (k,), why)
    check_shape(fn, "var_weight", var_weight, (k,), why)
    c = input.shape[1]
    for name, a in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    _check_nbt(fn, num_batches_tracked)
    _running_pair(fn, running_mean, running_var)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    sync = check_reducer(fn, sync) if training else check_reducer(fn, sync) and None  # unused in inference
    unbiased = check_bool(fn, "unbiased", unbiased)
    shape = tuple(input.shape)
    if unbiased and sync is not None:
        raise ValueError(f"{fn}: unbiased=True has no synchronized form (its BN variance needs the global mean "
                         f"of the instance variances, or the global count as a constant); got sync={sync!r}")
    if unbiased and not _is_empty(shape):
        cnt, what = (c, "channels (C - 1)") if one_d else (Partition("instance").count(shape), "values per instance (M - 1)")
        if cnt < 2:
            raise ValueError(f"{fn}: unbiased=True divides by the {what} and needs at least 2; got input of shape {shape}")
    if training:
        if not one_d:
            _check_training_count(fn, Partition("instance"), shape)
        elif sync is None:
            _check_training_count(fn, Partition("batch"), shape)
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when training=False; got None")
    if _is_empty(shape) and sync is None:
        return _empty_call(xp, input, (input, mean_weight, var_weight, weight, bias, running_mean, running_var), None,
                           NormResult if training and running_mean is not None else None, (running_mean, running_var))
    cd = compute_dtype(xp, input.dtype)
    n, m = shape[0], 1
    for d in shape[2:]:
        m *= d
    x = xp.reshape(to_compute(xp, input, cd), (n, c, m))
    w = _softmax(xp, to_compute(xp, mean_weight, cd))
    v = _softmax(xp, to_compute(xp, var_weight, cd))
    if one_d:  # IN's weights 0 (m = 1: μ_IN = x, σ²_IN = 0), the general form below does LN + BN
        w, v = xp.concat([xp.zeros_like(w[:1]), w]), xp.concat([xp.zeros_like(v[:1]), v])
    mu_in = xp.mean(x, axis=2, keepdims=True)
    var_in = xp.mean((x - mu_in) ** 2, axis=2, keepdims=True)
    mu_ln = xp.mean(mu_in, axis=1, keepdims=True)
    var_ln = xp.mean(var_in, axis=1, keepdims=True) + xp.mean((mu_in - mu_ln) ** 2, axis=1, keepdims=True)
    count = None
    if training and sync is not None:
        from .operation import synced_moments

        # the BN statistics of the global batch: one all_gather of [n·m, μ (C), M2 (C)]
        mu_bn, var_bn, count = synced_moments(xp, x, (0, 2), sync)
    elif training:
        mu_bn = xp.mean(mu_in, axis=0, keepdims=True)
        var_bn = xp.mean(var_in, axis=0, keepdims=True) + xp.mean((mu_in - mu_bn) ** 2, axis=0, keepdims=True)
    else:
        mu_bn = xp.reshape(to_compute(xp, running_mean, cd), (1, c, 1))
        var_bn = xp.reshape(to_compute(xp, running_var, cd), (1, c, 1))
    var_bn_biased = var_bn  # the running variance's source (torch's unbiased update below)
    # the authors' conventions (unbiased): σ²_k ← λ_k·σ²_k + (κ − 1)·mean_k(σ²_IN); lam = (λ_LN, λ_BN)
    lam, kap1 = (1.0, 1.0), 0.0
    if unbiased and one_d:
        lam = (c / (c - 1), n / (n - 1) if training else 1.0)  # python floats (static); no sync here
        var_ln = var_ln * lam[0]
        var_bn = var_bn * lam[1] if training else var_bn
    elif unbiased:
        kap1 = 1.0 / (m - 1)  # M/(M − 1) − 1
        if training:
            var_bn = var_bn + kap1 * xp.mean(var_in, axis=0, keepdims=True)
        var_ln = var_ln + kap1 * xp.mean(var_in, axis=1, keepdims=True)
        var_in = var_in * (1.0 + kap1)
    mu = w[0] * mu_in + w[1] * mu_ln + w[2] * mu_bn
    var = v[0] * var_in + v[1] * var_ln + v[2] * var_bn
    if concrete_any(xp, xp.isinf(var)):
        # a finite input whose variance overflows the dtype (issue 11): the mixture's statistics and
        # their gradients are not representable, so refuse instead of returning β everywhere
        raise ValueError(
            f"{fn}: the variance of input overflows {input.dtype} (max |input| = "
            f"{float(xp.max(xp.abs(x))):.3g}); scale the input down (the output is scale-invariant)"
        )
    s = 1.0 / xp.sqrt(var + eps)
    xhat = xp.reshape((x - mu) * s, shape)
    gamma = channel_param(xp, to_compute(xp, weight, cd), len(shape))
    beta = channel_param(xp, to_compute(xp, bias, cd), len(shape))
    y = xhat if gamma is None else xhat * gamma
    if beta is not None:
        y = y + beta
    if y.dtype != input.dtype:
        y = xp.astype(y, input.dtype)
    res = Residuals(
        (x, xhat, s, w, v, mu_in, mu_ln, mu_bn, var_in, var_ln, var_bn, gamma) + (() if count is None else (count,)),
        (shape, bool(training), beta is not None, sync, lam, kap1),
    )
    if training and running_mean is not None:
        assert f is not None  # the factor is set whenever running_mean is given (for the type checker)
        nb = n * m if count is None else count  # the global count when synchronized
        rm = (1.0 - f) * to_compute(xp, running_mean, cd) + f * xp.reshape(mu_bn, (c,))
        rv = (1.0 - f) * to_compute(xp, running_var, cd) + f * xp.reshape(var_bn_biased, (c,)) * (nb / (nb - 1))
        return NormResult(y, xp.astype(rm, running_mean.dtype), xp.astype(rv, running_var.dtype)), res
    return y, res


@switchable_norm.defbackward
def _switchable_backward(res: Residuals, g):
    x, xhat, s, w, v, mu_in, mu_ln, mu_bn, var_in, var_ln, var_bn, gamma = res.arrays[:12]
    shape, training, has_beta, sync, lam, kap1 = res.static
    xp = namespace("switchable_norm.backward", cotangent=g)
    g = to_compute(xp, g, x.dtype)
    n, c, m = x.shape
    nd = len(shape)
    red = (0,) + tuple(range(2, nd))
    dgamma = None if gamma is None else xp.reshape(xp.sum(g * xhat, axis=red), (c,))
    dbeta = xp.sum(g, axis=red) if has_beta else None
    gh = g if gamma is None else g * gamma
    gh = xp.reshape(gh, (n, c, m))
    xh = xp.reshape(xhat, (n, c, m))
    a = -xp.sum(gh, axis=2, keepdims=True) * s  # ∂L/∂μ per (n, c)
    b = -0.5 * xp.sum(gh * xh, axis=2, keepdims=True) * s * s  # ∂L/∂σ² per (n, c)
    # R_k: sum over partition k's group, broadcast back; n_k its element count
    a_ln, b_ln = xp.sum(a, axis=1, keepdims=True), xp.sum(b, axis=1, keepdims=True)
    # conventions (forward): σ²_LN, σ²_BN scaled by λ = lam, and with κ − 1 = kap1 ≠ 0 each σ²_k gains
    # (κ − 1)·mean_k(σ²_IN,biased): ∂σ²_k/∂x = (2/n_k)·(λ_k·(x − μ_k) + (κ − 1)·(x − μ_IN)); λ_IN = κ
    # is written as 1 + (κ − 1), so the (κ − 1) parts of all three collect into one term below
    dx = gh * s + w[0] * a / m + v[0] * b * 2.0 * (x - mu_in) / m
    dx = dx + w[1] * a_ln / (c * m) + v[1] * b_ln * (2.0 * lam[0]) * (x - mu_ln) / (c * m)
    bsum = v[0] * b / m + v[1] * b_ln / (c * m) if kap1 else None
    if training and sync is not None:
        from .operation import synced_sums

        # R_BN spans the ranks: one all_reduce_sum of [Σ_n a, Σ_n b] (2C values), n_BN the global count
        a_bn, b_bn = synced_sums(xp, (a, b), (0,), sync)
        nb = res.arrays[12]
        dx = dx + w[2] * a_bn / nb + v[2] * b_bn * (2.0 * lam[1]) * (x - mu_bn) / nb
    elif training:  # at inference the BN statistics are constants
        a_bn, b_bn = xp.sum(a, axis=0, keepdims=True), xp.sum(b, axis=0, keepdims=True)
        dx = dx + w[2] * a_bn / (n * m) + v[2] * b_bn * (2.0 * lam[1]) * (x - mu_bn) / (n * m)
        if kap1:
            bsum = bsum + v[2] * b_bn / (n * m)
    if kap1:
        dx = dx + (2.0 * kap1) * (x - mu_in) * bsum
    # softmax backward: dλ = w ∘ (p − ⟨w, p⟩); for (N, C) w = (0, w_LN, w_BN): the 2-way softmax's
    p = xp.stack([xp.sum(a * mu_in), xp.sum(a * mu_ln), xp.sum(a * mu_bn)])
    q = xp.stack([xp.sum(b * var_in), xp.sum(b * var_ln), xp.sum(b * var_bn)])
    dlm = w * (p - xp.sum(w * p))
    dlv = v * (q - xp.sum(v * q))
    if len(shape) == 2:
        dlm, dlv = dlm[1:], dlv[1:]
    return xp.reshape(dx, shape), dlm, dlv, dgamma, dbeta, None, None


# --------------------------------------------------------------------------------------------------
# gated mixtures of two standardizations: batch-instance normalization and AdaLIN
#
#     x̂ = ρ·x̂_A + (1 − ρ)·x̂_B,   y = γ·x̂ + β      (ρ per channel, broadcast; A, B two partitions)
#
# Backward, composed from the parts (nothing new is derived): with ĝ = γ·g,
#     dρ = Σ_broadcast ĝ·(x̂_A − x̂_B),   dx = Φ_A'(ρ·ĝ) + Φ_B'((1 − ρ)·ĝ)
# where Φ_k' is partition k's standardizing backward (normref.operation.Standardizing).


def _mixture_forward(xp, x, parts, ops, rho_b, gamma_b, beta_b, op_arrays=({}, {})):
    from .framework import run_forward
    from .recovery import affine_forward

    (ya, ra, sa), (yb, rb, sb) = (run_forward(xp, x, p, o, **kw) for p, o, kw in zip(parts, ops, op_arrays))
    mix = rho_b * ya + (1.0 - rho_b) * yb
    return affine_forward(xp, mix, gamma_b, beta_b), (ra, rb), (sa, sb), mix


def _mixture_backward(xp, parts, ops, shape, op_res, rho_b, gamma_b, beta_shape, g):
    from .recovery import affine_backward
    from ._xp import sum_to_shape

    (ra, rb) = op_res
    xa = parts[0].unview(xp, ops[0].xhat(xp, ra), shape)
    xb = parts[1].unview(xp, ops[1].xhat(xp, rb), shape)
    mix = rho_b * xa + (1.0 - rho_b) * xb
    gh, dgamma, dbeta = affine_backward(xp, mix, gamma_b, beta_shape, g)
    drho = sum_to_shape(xp, gh * (xa - xb), rho_b.shape)
    dx = 0
    for part, op, res, c in ((parts[0], ops[0], ra, rho_b), (parts[1], ops[1], rb, 1.0 - rho_b)):
        axes = part.axes(shape)
        dx = dx + part.unview(xp, op.backward(xp, res, axes, part.view(xp, gh * c)), shape)
    return dx, drho, dgamma, dbeta


def _ex_bin(rng):
    x = rng.standard_normal((4, 3, 3, 2)) * 1.5 + 0.5
    c = 3
    rho = rng.uniform(0, 1, c)
    yield Example((x, rho), dict(training=True), label="training, no affine")
    yield Example((x, rho, rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)),
                  dict(training=True, momentum=0.2), label="training, affine, running update")
    yield Example((x, rho, rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)),
                  dict(training=False), label="inference")


@method(
    channels=("input",),
    array_params=("input", "rho", "weight", "bias", "running_mean", "running_var"),
    nondiff=("running_mean", "running_var"),
    survey="§5.2 (combination: batch-instance normalization, a learned gate between BN and IN)",
    paper="Nam & Kim, Batch-Instance Normalization for Adaptively Style-Invariant Neural Networks, NeurIPS 2018",
    examples=_ex_bin,
)
def batch_instance_norm(
    input: Any,
    rho: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
) -> Array | NormResult:
    """Batch-instance normalization: y = γ·(ρ·x̂_BN + (1 − ρ)·x̂_IN) + β, ρ ∈ [0, 1] per channel.

    ρ receives a gradient (the paper clips it to [0, 1] after each update: the optimizer's step, not
    this function's). The BN part follows :func:`normref.batch_norm` (running statistics returned in a
    ``NormResult`` when training with them; at inference they replace the batch statistics).

    ``sync`` (a reducer, :mod:`normref.distributed`): the BN branch's statistics over every rank's
    batch (the IN branch is per sample, local), the same running statistics on every rank; per step
    as :func:`normref.batch_norm`: forward one all_gather of 2C + 1 values, backward one
    all_reduce_sum of 2C. dρ, dγ, dβ are this rank's part (summed across ranks by the caller).
    Ranks may hold 0 samples; unused in inference.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    rho : array, shape ``(C,)``
        ρ ∈ [0, 1], the BN share per channel.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    running_mean : array or None, shape ``(C,)``, default None
        The running BN mean.
    running_var : array or None, shape ``(C,)``, default None
        The running BN (unbiased) variance.
    training : bool, default False
        Use the batch statistics (and update the running ones, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    eps : float, default 1e-5
        ε, added to the variances.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (see above).

    Returns
    -------
    out : array or NormResult
        The output, or ``NormResult(output, running_mean, running_var)`` in training with running
        statistics.

    Notes
    -----
    Survey §5.2 (multi-mode and combinational normalization).

    References
    ----------
    .. [1] H. Nam and H.-E. Kim, "Batch-Instance Normalization for Adaptively Style-Invariant Neural
       Networks", NeurIPS 2018, Eqn 3.
    """
    from . import operation as _op

    fn = "batch_instance_norm"
    xp = namespace(fn, input=input, rho=rho, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    check_ndim(fn, "input", input, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    c = input.shape[1]
    for name, a in (("rho", rho), ("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    _check_nbt(fn, num_batches_tracked)
    _running_pair(fn, running_mean, running_var)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    sync = check_reducer(fn, sync) if training else check_reducer(fn, sync) and None  # unused in inference
    shape = tuple(input.shape)
    if training:
        if sync is None:
            _check_training_count(fn, Partition("batch"), shape)
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when training=False; got None")
    _check_training_count(fn, Partition("instance"), shape)
    if _is_empty(shape) and sync is None:
        return _empty_call(xp, input, (input, rho, weight, bias, running_mean, running_var), None,
                           NormResult if training and running_mean is not None else None, (running_mean, running_var))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = len(shape)
    rho_b = channel_param(xp, to_compute(xp, rho, cd), nd)
    gamma_b = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta_b = channel_param(xp, to_compute(xp, bias, cd), nd)
    parts = (Partition("batch"), Partition("instance"))
    if training:
        ops: tuple[_op.Operation, _op.Operation] = (_op.Standardizing(eps, sync), _op.Standardizing(eps))
        kw: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    else:
        ops = (_op.PopulationStandardizing(eps), _op.Standardizing(eps))
        kw = ({"mean": channel_param(xp, to_compute(xp, running_mean, cd), nd),
               "var": channel_param(xp, to_compute(xp, running_var, cd), nd)}, {})
    y, (ra, rb), (sa, _), _ = _mixture_forward(xp, x, parts, ops, rho_b, gamma_b, beta_b, kw)
    res = Residuals(tuple(ra) + tuple(rb) + (rho_b, gamma_b),
                    (parts, ops, shape, len(ra), None if bias is None else tuple(bias.shape)))
    if y.dtype != input.dtype:
        y = xp.astype(y, input.dtype)
    if training and running_mean is not None:
        assert f is not None  # the factor is set whenever running_mean is given (for the type checker)
        n = sa.get("count", parts[0].count(shape))  # the global count when synchronized
        rm = (1.0 - f) * to_compute(xp, running_mean, cd) + f * xp.reshape(sa["mean"], (c,))
        rv = (1.0 - f) * to_compute(xp, running_var, cd) + f * xp.reshape(sa["var"], (c,)) * (n / (n - 1))
        return NormResult(y, xp.astype(rm, running_mean.dtype), xp.astype(rv, running_var.dtype)), res
    return y, res


@batch_instance_norm.defbackward
def _bin_backward(res: Residuals, g):
    parts, ops, shape, na, bshape = res.static
    arrays = res.arrays
    ra, rb = arrays[:na], arrays[na:-2]
    rho_b, gamma_b = arrays[-2:]
    xp = namespace("batch_instance_norm.backward", cotangent=g)
    g = to_compute(xp, g, rho_b.dtype)
    c = shape[1]
    dx, drho, dgamma, dbeta = _mixture_backward(xp, parts, ops, shape, (ra, rb), rho_b, gamma_b, bshape and (1, c) + (1,) * (len(shape) - 2), g)
    rs = lambda t: None if t is None else xp.reshape(t, (c,))  # noqa: E731
    return dx, rs(drho), rs(dgamma), rs(dbeta), None, None


def _ex_adalin(rng):
    x = rng.standard_normal((3, 4, 3, 2)) * 1.5 - 0.5
    c = 4
    rho = rng.uniform(0, 1, c)
    yield Example((x, rho), {}, label="no affine")
    yield Example((x, rho, rng.standard_normal(c), rng.standard_normal(c)), {}, label="per-channel γ, β")
    yield Example((x, rho, rng.standard_normal((3, c, 1, 1)), rng.standard_normal((3, c, 1, 1))), {},
                  label="generated γ, β per sample (U-GAT-IT)")
    yield Example((x, rho, rng.standard_normal((3, c, 1, 1)), rng.standard_normal((3, c, 1, 1))), dict(unbiased=True),
                  label="generated γ, β, unbiased variances (the authors' torch.var)")


@method(
    channels=("input",),
    array_params=("input", "rho", "weight", "bias"),
    survey="§5.2 (combination: adaptive layer-instance normalization, a learned gate between IN and LN)",
    paper="Kim et al., U-GAT-IT, ICLR 2020",
    examples=_ex_adalin,
)
def adaptive_layer_instance_norm(input: Any, rho: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5,
                                 *, unbiased: bool = False) -> Array:
    """AdaLIN: y = γ·(ρ·x̂_IN + (1 − ρ)·x̂_LN) + β, ρ ∈ [0, 1] per channel.

    Both γ, β receive gradients, as does ρ. Variances biased (the paper's equation); with
    ``unbiased=True`` both the instance and the layer variance are Σ(x − μ)²/(n − 1) over their n
    elements, ε inside the root, as in the authors' PyTorch code (``torch.var`` in ``adaILN``/``ILN``,
    github.com/znxlwm/UGATIT-pytorch ``networks.py``).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    rho : array, shape ``(C,)``
        ρ ∈ [0, 1], the IN share per channel.
    weight : array or None, default None
        γ, per channel (C,) or generated: broadcastable to the input, e.g. (N, C, 1, 1) computed per
        sample as in U-GAT-IT.
    bias : array or None, default None
        β, as ``weight``.
    eps : float, default 1e-5
        ε, added to the variances.
    unbiased : bool, default False
        Bessel-corrected variances in both branches. The backward composes each branch's
        unbiased-standardizing backward, r·(g − mean(g) − x̂·mean(g·x̂)·n/(n − 1)).

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.3 and §5.2 (AdaLIN, for image-to-image translation).

    Conventions: biased variances (the paper's Eqn 1) are the default; ``unbiased=True`` gives the
    authors' code's ``torch.var`` (unbiased) in both the IN and the LN branch.

    References
    ----------
    .. [1] J. Kim, M. Kim, H. Kang and K. Lee, "U-GAT-IT: Unsupervised Generative Attentional Networks
       with Adaptive Layer-Instance Normalization for Image-to-Image Translation", ICLR 2020, Eqn 1.
    """
    from . import operation as _op
    from .framework import check_broadcastable

    fn = "adaptive_layer_instance_norm"
    xp = namespace(fn, input=input, rho=rho, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    c = input.shape[1]
    check_shape(fn, "rho", rho, (c,), f"one value per channel, input.shape[1] = {c}")
    shape = tuple(input.shape)
    nd = len(shape)
    per_channel = {}
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None and a.ndim == 1:
            check_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")
            per_channel[name] = True
        else:
            check_broadcastable(fn, name, a, shape)
    eps = _eps(fn, xp, input, eps)
    unbiased = check_bool(fn, "unbiased", unbiased)
    _check_training_count(fn, Partition("instance"), shape)
    if _is_empty(shape):
        return _empty_call(xp, input, (input, rho, weight, bias))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    rho_b = channel_param(xp, to_compute(xp, rho, cd), nd)
    gamma_b, beta_b = to_compute(xp, weight, cd), to_compute(xp, bias, cd)
    if per_channel.get("weight"):
        gamma_b = channel_param(xp, gamma_b, nd)
    if per_channel.get("bias"):
        beta_b = channel_param(xp, beta_b, nd)
    parts = (Partition("instance"), Partition("layer", normalized_ndim=nd - 1))
    # unbiased: both branches Bessel-corrected (standardization._BesselStandardizing; the instance count
    # is ≥ 2, checked above, so the layer count C·M is too)
    std = _BesselStandardizing if unbiased else _op.Standardizing
    ops = (std(eps), std(eps))
    y, (ra, rb), _, _ = _mixture_forward(xp, x, parts, ops, rho_b, gamma_b, beta_b)
    res = Residuals(tuple(ra) + tuple(rb) + (rho_b, gamma_b),
                    (parts, ops, shape, len(ra),
                     None if weight is None else tuple(weight.shape),
                     None if bias is None else tuple(bias.shape),
                     None if beta_b is None else tuple(beta_b.shape)))
    if y.dtype != input.dtype:
        y = xp.astype(y, input.dtype)
    return y, res


@adaptive_layer_instance_norm.defbackward
def _adalin_backward(res: Residuals, g):
    parts, ops, shape, na, wshape, bshape, beta_b_shape = res.static
    arrays = res.arrays
    ra, rb = arrays[:na], arrays[na:-2]
    rho_b, gamma_b = arrays[-2:]
    xp = namespace("adaptive_layer_instance_norm.backward", cotangent=g)
    g = to_compute(xp, g, rho_b.dtype)
    dx, drho, dgamma, dbeta = _mixture_backward(xp, parts, ops, shape, (ra, rb), rho_b, gamma_b, beta_b_shape, g)
    return (
        dx,
        xp.reshape(drho, (shape[1],)),
        None if dgamma is None else xp.reshape(dgamma, wshape),
        None if dbeta is None else xp.reshape(dbeta, bshape),
    )
