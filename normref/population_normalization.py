"""Population statistics inside training (survey §4 Eqns 15-16, §5.3.1): normalizing by statistics that
are estimated across mini-batches while training, instead of by the mini-batch's own.

Three families, all pure (the state goes in as arguments and comes back in the result tuple):

- :func:`population_norm` — normalization by the running (population) statistics *while updating them*
  (Gregoire et al. and Wiesler et al., survey Eqn 15: x̂ = x − μ̂; with ``operation="standardizing"``
  x̂ = (x − μ̂)/√(σ̂² + ε)). μ̂, σ̂² are running averages of the mini-batch statistics (Eqn 18), optionally
  re-estimated only every ``update_every`` = T steps, and are **constants of the backward** (the survey:
  "considered as constant during backpropagation").
- :func:`prong_whitening` and :func:`prong_reparameterize` — Desjardins et al.'s natural neural networks
  (PRONG, survey Eqn 16): whitening by the population mean and covariance, x̂ = U(x − μ̂) with
  U = W(Σ̂ + εI) (PCA by default: U = (Λ + ε)^-½·Eᵀ), re-estimated every T steps, constants of the
  backward; after each re-estimation the next layer is re-parameterized so that the network computes the
  same function (V' = V·U_old·U_new⁻¹, d' = d + V·U_old·(μ̂_new − μ̂_old)).
- :func:`blended_batch_norm` — blended statistics with the backward through the batch share only (Dinh
  et al.'s Real NVP batch normalization; diminishing BN of Ma & Klabjan; momentum BN of Yong et al.):
  μ = (1 − α)·μ_run + α·μ_B, σ² = (1 − α)·σ²_run + α·σ²_B (unbiased), x̂ = (x − μ)/√(σ² + ε), and the
  backward is the *exact* derivative of this function with the incoming state (μ_run, σ²_run) held
  constant — the gradient flows through the α-share of the current batch only. One operation; the
  ``preset`` picks the schedule of α (constant for Dinh et al. and momentum BN, α_k = (k + 1)^-η for
  diminishing BN).

Not implemented, and why:

- Kalman normalization (Wang et al., NeurIPS 2018) estimates a layer's statistics from the *previous
  layer's* estimated statistics through a learned transition matrix, and back-propagates through that
  chain across layers. A per-layer pure function would have to return its statistics as a
  *differentiable* output (the next layer's input), while normref's methods have one differentiable
  output and treat every other result field as state without gradient (registry convention); the
  method is a whole-network recursion, not a normalization of one layer's activations.
- Full normalization (Lian & Liu, AISTATS 2019): per the survey (§5.3.1) it combines running and
  mini-batch statistics and back-propagates through the current mini-batch only, which is
  :func:`blended_batch_norm`'s operation; its compositional-optimization estimator (the step-size
  sequences of its algorithm) could not be checked against the paper here, so it is not registered
  under its name.

Notation: statistics per channel over ``(N, *spatial)`` (the batch partition Π_BN, survey Eqn 20);
m = N·∏spatial values per channel; running variances and covariances are unbiased (torch's convention
for ``running_var``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as _np

from . import operation as _op
from ._results import result_tuple
from ._validate import check_bool, check_choice, check_int, check_momentum, check_ndim, check_nonnegative_values
from ._xp import Array, compute_dtype, namespace, to_compute
from .framework import channel_param, pack, run_forward
from .partition import Partition
from .population import population_statistics
from .registry import Example, Residuals, method
from .standardization import (MeanOnlyResult, NormResult, _backward_for, _check_channels, _check_nbt,
                              _check_training_count, _ema, _empty_call, _eps, _is_empty, _out,
                              _shapes, _to_channels)
from .whitening import WHITENING_METHODS, WhiteningResult, _whitening_backward, batch_whitening, whitening_matrix

__all__ = [
    "population_norm",
    "prong_whitening",
    "prong_reparameterize",
    "blended_batch_norm",
    "momentum_bn_momentum",
    "ProngReparameterization",
    "BLENDED_PRESETS",
]

BLENDED_PRESETS = ("dinh", "diminishing", "momentum")


# --------------------------------------------------------------------------------------------------
# the update rule shared by population_norm and prong_whitening: Eqn 18 every T-th step


def _update_factor(fn: str, momentum, update_every: int, num_batches_tracked) -> float | None:
    """The factor f of this step's update running ← (1 − f)·running + f·batch, or ``None`` (no update).

    Step k = ``num_batches_tracked`` (batches seen before this one) updates when k ≡ 0 (mod T). A fixed
    momentum gives f = momentum (momentum = 1: re-estimation from this batch, PRONG); momentum=None the
    cumulative average over the updates: the j-th update (j = ⌈k/T⌉ updates before it) gets f = 1/(j + 1).
    """
    if update_every > 1 or momentum is None:
        if num_batches_tracked is None:
            why = "momentum=None (cumulative average)" if momentum is None else f"update_every={update_every}"
            raise ValueError(f"{fn}: {why} needs num_batches_tracked, the number of batches seen before this one; "
                             f"got num_batches_tracked=None")
        k = int(num_batches_tracked)
        if k % update_every:
            return None
        if momentum is None:
            return 1.0 / (-(-k // update_every) + 1)
    return momentum


# --------------------------------------------------------------------------------------------------
# population_norm: centering / standardizing by running statistics (Gregoire et al.; Wiesler et al.)


@dataclasses.dataclass(frozen=True)
class PopulationCentering(_op.Operation):
    """x̂ = x − μ̂ with μ̂ a constant (survey Eqn 15): dx = g. Residuals (x, μ̂)."""

    name = "population_centering"

    def forward(self, xp, x, axes, mean):
        return x - mean, (x, mean), {}

    def xhat(self, xp, res):
        return res[0] - res[1]

    def backward(self, xp, res, axes, g):
        return g


def _ex_population_norm(rng):
    for shape in [(8, 3), (4, 3, 2, 3)]:
        x = rng.standard_normal(shape) * 1.5 + 0.5
        c = shape[1]
        rm, rv = rng.standard_normal(c) * 0.3, rng.uniform(0.5, 2.0, c)
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        yield Example((x, rm), dict(training=True), label=f"{shape} centering (Wiesler), updated mean")
        yield Example((x, rm, rv, w, b), dict(training=True, operation="standardizing", momentum=0.2),
                      label=f"{shape} standardizing, updated statistics, affine")
        yield Example((x, rm, rv, w, b), dict(training=True, operation="standardizing", use_updated=False),
                      label=f"{shape} standardizing by the incoming statistics")
        yield Example((x, rm, rv), dict(training=True, operation="standardizing", momentum=1.0, update_every=3,
                                        num_batches_tracked=6), label=f"{shape} re-estimated every 3 steps (update)")
        yield Example((x, rm, rv), dict(training=True, operation="standardizing", update_every=3,
                                        num_batches_tracked=7), label=f"{shape} re-estimated every 3 steps (hold)")
        yield Example((x, rm, None, w, b), dict(training=False), label=f"{shape} inference, centering")


def _population_frozen(args, kwargs):
    """population_norm with the statistics it normalized by frozen at the base call's values: what its
    backward differentiates (the statistics are constants of the backward, survey Eqn 15)."""
    b = population_norm.bind(*args, **kwargs)
    a = b.arguments
    if not a["training"]:  # at inference the statistics are given: the backward is the method's own derivative
        return population_norm
    out = population_norm(*b.args, **b.kwargs)
    op = a["operation"]
    if a["use_updated"]:
        rm, rv = out.running_mean, getattr(out, "running_var", None)
    else:
        rm, rv = a["running_mean"], a["running_var"]
    eps = a["eps"]

    def frozen(input, running_mean, running_var=None, weight=None, bias=None, *rest, **kw):
        return population_norm(input, rm, rv if op == "standardizing" else None, weight, bias, False,
                               eps=eps, operation=op)

    return frozen


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_var", "weight", "bias"),
    nondiff=("running_mean", "running_var"),
    nullable=("running_var",),
    survey="§4 Eqn 15 (normalizing by population statistics estimated by running averages; Eqn 18)",
    paper="Wiesler, Richard, Schlüter & Ney, Mean-normalized stochastic gradient for large-scale deep learning, "
          "ICASSP 2014; Montavon & Müller (Gregoire), Deep Boltzmann machines and the centering trick, 2012",
    examples=_ex_population_norm,
    fd_target=_population_frozen,
)
def population_norm(
    input: Array,
    running_mean: Array,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    operation: str = "centering",
    update_every: int = 1,
    num_batches_tracked: int | None = None,
    use_updated: bool = True,
) -> Array | NormResult | MeanOnlyResult:
    """Normalization by running (population) statistics while updating them.

    .. math::

        \\hat\\mu \\leftarrow (1-f)\\,\\hat\\mu + f\\,\\mu_B,\\quad
        \\hat\\sigma^2 \\leftarrow (1-f)\\,\\hat\\sigma^2 + f\\,\\tfrac{m}{m-1}\\sigma_B^2,\\qquad
        \\hat x = x - \\hat\\mu \\;\\text{(centering)}\\;\\text{ or }\\;
        \\hat x = (x - \\hat\\mu)/\\sqrt{\\hat\\sigma^2 + \\epsilon},\\quad y = \\gamma\\hat x + \\beta,

    with μ̂, σ̂² constants of the backward: dx = g·γ (centering) or dx = g·γ/√(σ̂² + ε).

    Parameters
    ----------
    input : Array
        Activations ``(N, C, *spatial)``.
    running_mean : Array
        μ̂ (C,), the running estimate of the population mean.
    running_var : Array or None, default None
        σ̂² (C,), unbiased; required by ``operation="standardizing"``. With centering it is optional and,
        when given, updated (and returned) alongside the mean but not used.
    weight, bias : Array or None, default None
        γ, β (C,).
    training : bool, default False
        ``True``: update the statistics from this batch (on the steps that update, see ``update_every``)
        and normalize by them; ``False``: normalize by the given statistics, no update.
    momentum : float or None, default 0.1
        f in Eqn 18, torch's convention (the weight of the batch); ``None``: the cumulative average over
        the updates (needs ``num_batches_tracked``); ``1.0`` with ``update_every=T``: re-estimation from
        the batch every T steps (Desjardins et al.'s schedule, per channel).
    eps : float, default 1e-5
        ε added to the variance, inside the square root (standardizing).
    operation : {"centering", "standardizing"}, default "centering"
        Wiesler et al. and Gregoire et al. center only (the default; Wiesler et al. found the scaling
        brought no gain with running-average estimates); ``"standardizing"`` also divides by σ̂.
    update_every : int, default 1
        T: the statistics are updated at steps k = ``num_batches_tracked`` with k ≡ 0 (mod T) and held
        fixed in between (T > 1 needs ``num_batches_tracked``).
    num_batches_tracked : int or None, default None
        k, the number of training batches seen before this one (the caller adds 1 per call).
    use_updated : bool, default True
        ``True``: normalize by the statistics *after* this step's update (the running estimate
        that includes the current batch, as Algorithm 1 of Desjardins et al. re-estimates before the
        step's gradient update); ``False``: by the incoming statistics (those of the previous steps).

    Returns
    -------
    out : Array or NormResult or MeanOnlyResult
        The output y; in training ``NormResult(output, running_mean, running_var)`` (or
        ``MeanOnlyResult(output, running_mean)`` when centering without ``running_var``) with the
        updated statistics (unchanged on a step that does not update).

    Notes
    -----
    Survey §4, Eqn 15 (centering by population statistics estimated by running averages, treated as
    constants in back-propagation) and Eqn 18 (the running average). The backward is exact for
    ``use_updated=False`` and at inference; with ``use_updated=True`` the statistics depend on the
    current batch through f·μ_B, and treating them as constants is the method's definition (a
    stop-gradient, like batch renormalization's r and d): the finite-difference target
    (``fd_target``) differentiates the function with the statistics frozen at their values. The running
    variance is updated with the unbiased batch variance (torch's ``running_var`` convention).

    References
    ----------
    S. Wiesler, A. Richard, R. Schlüter, H. Ney, "Mean-normalized stochastic gradient for large-scale
    deep learning", ICASSP 2014. G. Montavon, K.-R. Müller, "Deep Boltzmann machines and the centering
    trick", 2012 (survey [48]).
    """
    fn = "population_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    if running_mean is None:
        raise ValueError(f"{fn}: running_mean is required (the population statistics it normalizes by); got None")
    operation = check_choice(fn, "operation", operation, ("centering", "standardizing"))
    if operation == "standardizing" and running_var is None:
        raise ValueError(f"{fn}: operation='standardizing' needs running_var; got None")
    _check_channels(fn, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    use_updated = check_bool(fn, "use_updated", use_updated)
    update_every = check_int(fn, "update_every", update_every)
    _check_nbt(fn, num_batches_tracked)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    shape, part = tuple(input.shape), Partition("batch")
    f = None
    if training:
        _check_training_count(fn, part, shape)
        f = _update_factor(fn, momentum, update_every, num_batches_tracked)
    result = (NormResult if running_var is not None else MeanOnlyResult) if training else None
    running = (running_mean,) if running_var is None else (running_mean, running_var)
    if _is_empty(shape):
        return _empty_call(xp, input, (input, running_mean, running_var, weight, bias), None, result, running)
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd, c = len(shape), shape[1]
    new_rm, new_rv = running_mean, running_var
    if f is not None:
        n = part.count(shape)
        mu_b, var_b = _op.moments(xp, part.view(xp, x), part.axes(shape))
        new_rm = _ema(xp, running_mean, _to_channels(xp, mu_b, c), f)
        if running_var is not None:
            new_rv = _ema(xp, running_var, _to_channels(xp, var_b, c) * (n / (n - 1)), f)
    elif training:  # a step that does not update: the state comes back unchanged (as copies)
        new_rm = xp.asarray(running_mean, copy=True)
        new_rv = None if running_var is None else xp.asarray(running_var, copy=True)
    rm, rv = (new_rm, new_rv) if (training and use_updated) else (running_mean, running_var)
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    mean = channel_param(xp, to_compute(xp, rm, cd), nd)
    op: _op.Operation
    if operation == "centering":
        op = PopulationCentering()
        y, op_res, _ = run_forward(xp, x, part, op, gamma, beta, mean=mean)
    else:
        op = _op.PopulationStandardizing(eps)
        y, op_res, _ = run_forward(xp, x, part, op, gamma, beta, mean=mean,
                                   var=channel_param(xp, to_compute(xp, rv, cd), nd))
    res = pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))
    y = _out(xp, y, input.dtype)
    if not training:
        return y, res
    if running_var is None:
        return MeanOnlyResult(y, new_rm), res
    return NormResult(y, new_rm, new_rv), res


population_norm.defbackward(_backward_for("x", None, None, "w", "b"))


# --------------------------------------------------------------------------------------------------
# PRONG: whitening by population statistics re-estimated every T steps (Desjardins et al.)


def _cov_shape(c: int, gs: int) -> tuple:
    return (c // gs, gs, gs)


def _ex_prong(rng):
    x = rng.standard_normal((10, 4, 2, 2)) + 0.3
    x[:, 1] += 0.6 * x[:, 0]
    c = 4
    rm = rng.standard_normal(c) * 0.2
    a = rng.standard_normal((2, 2, 2))
    rc = a @ a.transpose(0, 2, 1) / 2 + _np.eye(2)
    a4 = rng.standard_normal((1, 4, 4))
    rc4 = a4 @ a4.transpose(0, 2, 1) / 4 + _np.eye(4)
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    yield Example((x, rm, rc), dict(training=False, group_size=2), label="inference (population whitening)")
    yield Example((x, rm, rc4, w, b), dict(training=True, num_batches_tracked=0, update_every=5),
                  label="re-estimation step (PCA, one group, affine)", cond=10.0)
    yield Example((x, rm, rc), dict(training=True, group_size=2, num_batches_tracked=3, update_every=5),
                  label="hold step (statistics unchanged)")
    yield Example((x, rm, rc), dict(training=True, group_size=2, momentum=0.3, method="zca"),
                  label="ZCA, running average every step", cond=10.0)


def _prong_frozen(args, kwargs):
    """prong_whitening with the statistics it whitened by frozen (constants of its backward)."""
    b = prong_whitening.bind(*args, **kwargs)
    a = b.arguments
    if not a["training"]:  # at inference the statistics are given: the backward is the method's own derivative
        return prong_whitening
    out = prong_whitening(*b.args, **b.kwargs)
    rm, rc = (out.running_mean, out.running_cov) if a["use_updated"] else (a["running_mean"], a["running_cov"])
    eps, meth, gs = a["eps"], a["method"], a["group_size"]

    def frozen(input, running_mean, running_cov, weight=None, bias=None, *rest, **kw):
        return batch_whitening(input, rm, rc, weight, bias, False, eps=eps, method=meth, group_size=gs)

    return frozen


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§4 Eqn 16 (whitening by population statistics)",
    paper="Desjardins, Simonyan, Pascanu & Kavukcuoglu, Natural Neural Networks, NeurIPS 2015 (PRONG)",
    examples=_ex_prong,
    fd_target=_prong_frozen,
)
def prong_whitening(
    input: Array,
    running_mean: Array,
    running_cov: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 1.0,
    eps: float = 1e-5,
    group_size: int | None = None,
    *,
    method: str = "pca",
    update_every: int = 1,
    num_batches_tracked: int | None = None,
    use_updated: bool = True,
) -> Array | WhiteningResult:
    """Whitening by population statistics re-estimated every T steps (PRONG).

    .. math::

        \\hat\\mu \\leftarrow (1-f)\\hat\\mu + f\\mu_B,\\quad \\hat\\Sigma \\leftarrow (1-f)\\hat\\Sigma + f\\Sigma_B
        \\;\\text{(at steps } k \\equiv 0 \\bmod T),\\qquad
        \\hat x = U(x - \\hat\\mu),\\; U = W(\\hat\\Sigma + \\epsilon I),\\qquad y = \\gamma\\hat x + \\beta,

    per group of ``group_size`` channels; W is PCA whitening (Λ + ε)^-½·Eᵀ by default (Desjardins et al.),
    any of :data:`normref.WHITENING_METHODS` by ``method``. μ̂, Σ̂ and U are constants of the backward:
    dx = Uᵀ·(γ·g) per group, the inference backward of :func:`normref.batch_whitening`.

    Parameters
    ----------
    input : Array
        Activations ``(N, C, *spatial)``.
    running_mean : Array
        μ̂ (C,).
    running_cov : Array
        Σ̂ (C/group_size, group_size, group_size), unbiased.
    weight, bias : Array or None, default None
        γ, β (C,).
    training : bool, default False
        Update the statistics on the steps that update, then whiten; ``False``: whiten by the given ones.
    momentum : float or None, default 1.0
        f; ``1.0``: re-estimate from this batch (the paper estimates Σ̂ afresh from N_s
        samples every T updates: pass those samples at that step); < 1: a running average; ``None``:
        the cumulative average over the updates.
    eps : float, default 1e-5
        ε added to the covariance (Σ̂ + εI; the paper's damping of the eigenvalues).
    group_size : int or None, default None
        Channels per whitened group (``None``: all C channels in one group).
    method : str, default "pca"
        The whitening matrix W: ``"pca"`` (the paper's), ``"zca"``, ``"cholesky"``, ``"iternorm"``,
        ``"newton_schulz"``.
    update_every : int, default 1
        T: statistics re-estimated at steps k = ``num_batches_tracked`` ≡ 0 (mod T), held in between.
    num_batches_tracked : int or None, default None
        k, the training steps before this one (needed for T > 1 or momentum=None).
    use_updated : bool, default True
        Whiten with the statistics after this step's update (default; Algorithm 1 of the paper
        re-estimates, then takes the gradient step) or with the incoming ones.

    Returns
    -------
    out : Array or WhiteningResult
        y; in training ``WhiteningResult(output, running_mean, running_cov)``.

    Notes
    -----
    Survey §4 Eqn 16 (whitening by population statistics, Σ̂^-½). The re-parameterization that keeps
    the network's function unchanged when U changes is :func:`prong_reparameterize` (apply it to the
    next layer's weight and bias after each re-estimation step). The backward is exact with the
    statistics as constants, which is the method's definition; with ``use_updated=True`` on an update
    step they depend on the batch (a stop-gradient): ``fd_target`` freezes them. The paper's PCA basis
    has a sign and order ambiguity (eigenvectors); it cancels in the re-parameterized network
    (V·U_old·U_new⁻¹) but not in x̂ itself.

    References
    ----------
    G. Desjardins, K. Simonyan, R. Pascanu, K. Kavukcuoglu, "Natural Neural Networks", NeurIPS 2015
    (Algorithm 1, PRONG).
    """
    fn = "prong_whitening"
    xp = namespace(fn, input=input, running_mean=running_mean, running_cov=running_cov, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    if running_mean is None or running_cov is None:
        raise ValueError(f"{fn}: running_mean and running_cov are required (the population statistics it whitens "
                         f"by); got None")
    c = int(input.shape[1])
    gs = c if group_size is None else check_int(fn, "group_size", group_size)
    if c % gs:
        raise ValueError(f"{fn}: group_size must divide the {c} channels; got group_size={gs}")
    _check_channels(fn, input, running_mean=running_mean, weight=weight, bias=bias)
    if tuple(running_cov.shape) != _cov_shape(c, gs):
        raise ValueError(f"{fn}: running_cov must have shape {_cov_shape(c, gs)} (C/group_size, group_size, "
                         f"group_size); got shape {tuple(running_cov.shape)}")
    method = check_choice(fn, "method", method, tuple(WHITENING_METHODS))
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    use_updated = check_bool(fn, "use_updated", use_updated)
    update_every = check_int(fn, "update_every", update_every)
    _check_nbt(fn, num_batches_tracked)
    shape = tuple(input.shape)
    f = None
    if training:
        _check_training_count(fn, Partition("batch"), shape)
        f = _update_factor(fn, momentum, update_every, num_batches_tracked)
    new_rm, new_rc = running_mean, running_cov
    if training and f is not None and not _is_empty(shape):
        st = population_statistics(input, group_size=gs)  # the batch's μ_B and unbiased Σ_B
        new_rm = _ema(xp, running_mean, st.mean, f)
        new_rc = _ema(xp, running_cov, st.cov, f)
    elif training:
        new_rm, new_rc = xp.asarray(running_mean, copy=True), xp.asarray(running_cov, copy=True)
    rm, rc = (new_rm, new_rc) if (training and use_updated) else (running_mean, running_cov)
    y, res = batch_whitening.forward(input, rm, rc, weight, bias, False, eps=eps, method=method, group_size=gs)
    if training:
        return WhiteningResult(y, new_rm, new_rc), res
    return y, res


@prong_whitening.defbackward
def _prong_backward(res: Residuals, g):
    # the residuals are batch_whitening's inference residuals: its backward (U constant) applies
    return _whitening_backward(res, g)


@result_tuple
class ProngReparameterization(NamedTuple):
    """The next layer's parameters after a PRONG re-estimation (:func:`prong_reparameterize`).

    Attributes
    ----------
    weight : Array
        V' = V·U_old·U_new⁻¹, of the given weight's shape and dtype.
    bias : Array
        d' = d + V·U_old·(μ̂_new − μ̂_old), (C_out,).
    """

    weight: Array
    bias: Array


def prong_reparameterize(
    weight: Array,
    bias: Array | None,
    old_mean: Array,
    old_cov: Array,
    new_mean: Array,
    new_cov: Array,
    *,
    eps: float = 1e-5,
    method: str = "pca",
) -> ProngReparameterization:
    """The next layer's parameters that keep the network's function when PRONG's statistics change.

    .. math::

        V\\,U_{old}(h - \\hat\\mu_{old}) + d \\;=\\; V'\\,U_{new}(h - \\hat\\mu_{new}) + d'
        \\quad\\text{for all } h \\iff
        V' = V\\,U_{old}\\,U_{new}^{-1},\\quad d' = d + V\\,U_{old}(\\hat\\mu_{new} - \\hat\\mu_{old}),

    with U = W(Σ̂ + εI) block-diagonal over the channel groups (as :func:`prong_whitening`).

    Parameters
    ----------
    weight : Array
        V, the next layer's weight: linear (C_out, C) or convolution ``(C_out, C, *kernel)`` with groups=1,
        C the whitened channels.
    bias : Array or None
        d (C_out,); ``None`` is a zero bias (a bias is returned: the mean shift needs one).
    old_mean, old_cov, new_mean, new_cov : Array
        μ̂ (C,) and Σ̂ (G, c, c) before and after the re-estimation (:func:`prong_whitening`'s
        ``running_mean``/``running_cov`` in and out).
    eps : float, default 1e-5
        ε of the whitening (the same as the normalization's).
    method : str, default "pca"
        The whitening matrix, as in :func:`prong_whitening`.

    Returns
    -------
    new : ProngReparameterization
        ``(weight, bias)``: V' of ``weight``'s shape, d' (C_out,).

    Notes
    -----
    Survey §4 Eqn 16; Algorithm 1 of Desjardins et al. (the canonical parameters W = V·U, b = d − V·U·μ̂
    are kept fixed across the re-estimation). For a convolution the bias term sums V over the kernel
    positions: exact for an unpadded (valid) convolution; with zero padding the border outputs see the
    padded zeros of U(h − μ̂) and change by V·U_old·(μ̂_new − μ̂_old) restricted to the padded taps. A pure
    procedure (no gradient is taken through it).

    References
    ----------
    G. Desjardins, K. Simonyan, R. Pascanu, K. Kavukcuoglu, "Natural Neural Networks", NeurIPS 2015.
    """
    fn = "prong_reparameterize"
    xp = namespace(fn, weight=weight, bias=bias, old_mean=old_mean, old_cov=old_cov, new_mean=new_mean,
                   new_cov=new_cov)
    for name, a in (("weight", weight), ("old_mean", old_mean), ("old_cov", old_cov), ("new_mean", new_mean),
                    ("new_cov", new_cov)):
        if a is None:
            raise TypeError(f"{fn}: {name} must be an array; got None")
    check_ndim(fn, "weight", weight, min_ndim=2, what="(C_out, C, *kernel)")
    cout, c = int(weight.shape[0]), int(weight.shape[1])
    check_ndim(fn, "old_cov", old_cov, min_ndim=3, max_ndim=3, what="(G, c, c)")
    g, gs = int(old_cov.shape[0]), int(old_cov.shape[1])
    if g * gs != c or tuple(old_cov.shape) != (g, gs, gs):
        raise ValueError(f"{fn}: old_cov must have shape (G, c, c) with G·c = weight.shape[1] = {c}; "
                         f"got shape {tuple(old_cov.shape)}")
    if tuple(new_cov.shape) != tuple(old_cov.shape):
        raise ValueError(f"{fn}: new_cov must have old_cov's shape {tuple(old_cov.shape)}; got shape "
                         f"{tuple(new_cov.shape)}")
    for name, a in (("old_mean", old_mean), ("new_mean", new_mean)):
        if tuple(a.shape) != (c,):
            raise ValueError(f"{fn}: {name} must have shape ({c},) (one value per input channel of weight); "
                             f"got shape {tuple(a.shape)}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"{fn}: bias must have shape ({cout},) (weight.shape[0]); got shape {tuple(bias.shape)}")
    method = check_choice(fn, "method", method, tuple(WHITENING_METHODS))
    eps = _eps(fn, xp, weight, eps)
    cd = compute_dtype(xp, weight.dtype)
    eye = xp.eye(gs, dtype=cd)
    u_old = whitening_matrix(to_compute(xp, old_cov, cd) + eps * eye, method)
    u_new = whitening_matrix(to_compute(xp, new_cov, cd) + eps * eye, method)
    m = xp.matmul(u_old, xp.linalg.inv(u_new))  # (G, c, c): U_old·U_new⁻¹ per group
    k = math.prod(int(d) for d in weight.shape[2:])
    v = xp.reshape(to_compute(xp, weight, cd), (cout, g, gs, k))
    # V'[o, g, :, k] = V[o, g, :, k]·M_g: a batched product over the groups, (G, C_out·K, c) @ (G, c, c)
    vt = xp.reshape(xp.permute_dims(v, (1, 0, 3, 2)), (g, cout * k, gs))
    vn = xp.permute_dims(xp.reshape(xp.matmul(vt, m), (g, cout, k, gs)), (1, 0, 3, 2))
    new_w = xp.reshape(vn, tuple(weight.shape))
    # d' = d + Σ_{c, k} V[o, c, k]·(U_old·δ)[c],  δ = μ̂_new − μ̂_old
    delta = xp.reshape(to_compute(xp, new_mean, cd) - to_compute(xp, old_mean, cd), (g, gs, 1))
    ud = xp.reshape(xp.matmul(u_old, delta), (1, g, gs, 1))
    shift = xp.sum(v * ud, axis=(1, 2, 3))
    new_b = shift if bias is None else to_compute(xp, bias, cd) + shift
    return ProngReparameterization(_out(xp, new_w, weight.dtype), _out(xp, new_b, weight.dtype))


# --------------------------------------------------------------------------------------------------
# blended statistics, backward through the batch share (Dinh et al.; Ma & Klabjan; Yong et al.)


@dataclasses.dataclass(frozen=True)
class BlendedStandardizing(_op.Operation):
    """x̂ = (x − μ)·s with μ = (1 − α)·μ_run + α·μ_B, σ² = (1 − α)·σ²_run + κ·σ²_B, s = (σ² + ε)^-½.

    σ²_B is the biased batch variance and κ = α·m/(m − 1) (so that the blend is of the unbiased one), or
    κ = α (``unbiased=False``: the blend of the biased one).
    Backward, exact with μ_run, σ²_run constant (∂μ/∂x_i = α/m, ∂σ²/∂x_i = 2κ(x_i − μ_B)/m):

        dx = s·(g − α·mean(g) − κ·(x̂ − s·(μ_B − μ))·mean(g·x̂)),

    which is the standardizing backward (:class:`normref.operation.Standardizing`; the survey gives
    no backward equation) at α = κ = 1, μ = μ_B. Residuals (x, μ, s, μ_B).
    """

    eps: float = 1e-5
    alpha: float = 0.1
    kappa: float = 0.1
    name = "blended_standardizing"

    def forward(self, xp, x, axes, running_mean, running_var):
        mu_b, var_b = _op.moments(xp, x, axes)
        mu = (1.0 - self.alpha) * running_mean + self.alpha * mu_b
        var = (1.0 - self.alpha) * running_var + self.kappa * var_b
        s = 1.0 / xp.sqrt(var + self.eps)
        return (x - mu) * s, (x, mu, s, mu_b), {"mean": mu, "var": var}

    def xhat(self, xp, res):
        x, mu, s = res[:3]
        return (x - mu) * s

    def backward(self, xp, res, axes, g):
        x, mu, s, mu_b = res
        xhat = (x - mu) * s
        m1 = _op._mean(xp, g, axes)
        m2 = _op._mean(xp, g * xhat, axes)
        return s * (g - self.alpha * m1 - self.kappa * (xhat - s * (mu_b - mu)) * m2)


def momentum_bn_momentum(epoch: int, total_epochs: int, batch_size: int, ideal_batch_size: int = 32) -> float:
    """Momentum BN's dynamic momentum λ^(t) (Yong et al., ECCV 2020, Sec. 4.2): the weight of the history.

    .. math::

        \\lambda^{(t)} = \\rho^{\\frac{T}{T-1}\\max(T-t,\\,0)} - \\rho^{T},\\qquad
        \\rho = \\min\\!\\left(\\tfrac{m}{m_0},\\,1\\right)^{1/T},

    t = ``epoch`` (1-based, constant within an epoch), T = ``total_epochs``, m = ``batch_size``,
    m₀ = ``ideal_batch_size`` (32 in the paper). λ^(1) = 0 (plain BN at the start) and λ^(t) = 1 − m/m₀ for
    t ≥ T (the noise of the ideal batch size at the end); m ≥ m₀ gives λ = 0 throughout. The batch share
    of :func:`blended_batch_norm` is α = 1 − λ. T = 1 gives the end value 1 − ρ^T.

    Parameters
    ----------
    epoch, total_epochs : int
        t ≥ 1 and T ≥ 1.
    batch_size : int
        m ≥ 1.
    ideal_batch_size : int, default 32
        m₀ ≥ 1.

    Returns
    -------
    lam : float
        λ^(t) in [0, 1).

    Notes
    -----
    Survey §5.3.1 (momentum batch normalization [128], population statistics blended with the mini-batch's).
    The paper's other schedule, the inference statistics' momentum τ = τ₀^(m/m₀) (τ₀ = 0.9), applies to
    the separate running average used at inference (see :func:`blended_batch_norm`'s Notes).

    References
    ----------
    H. Yong, J. Huang, D. Meng, X. Hua, L. Zhang, "Momentum Batch Normalization for Deep Learning with
    Small Batch Size", ECCV 2020 (Sec. 4.2, the dynamic momentum parameter).
    """
    fn = "momentum_bn_momentum"
    t = check_int(fn, "epoch", epoch)
    big_t = check_int(fn, "total_epochs", total_epochs)
    m = check_int(fn, "batch_size", batch_size)
    m0 = check_int(fn, "ideal_batch_size", ideal_batch_size)
    rho = min(m / m0, 1.0) ** (1.0 / big_t)
    if big_t == 1 or t >= big_t:  # the exponent T/(T−1)·max(T − t, 0) is 0
        return 1.0 - rho ** big_t
    # max(0, ·): at t = 1 the exponent is T in exact arithmetic; its rounding must not make λ < 0 (α > 1)
    return max(0.0, rho ** (big_t / (big_t - 1) * (big_t - t)) - rho ** big_t)


def _blend_factor(fn: str, preset: str, momentum, decay: float, num_batches_tracked, mbn=None) -> float:
    """α of this step: the preset's schedule (see :func:`blended_batch_norm`)."""
    if mbn is not None:  # momentum BN's dynamic momentum: α = 1 − λ^(t)
        return 1.0 - momentum_bn_momentum(*mbn)
    if preset == "diminishing":
        if num_batches_tracked is None:
            raise ValueError(f"{fn}: preset='diminishing' needs num_batches_tracked (α_k = (k + 1)^-decay); "
                             f"got num_batches_tracked=None")
        return float((int(num_batches_tracked) + 1) ** (-decay))
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(f"{fn}: momentum=None (cumulative average) needs num_batches_tracked; got None")
        return 1.0 / (int(num_batches_tracked) + 1)
    return momentum


def _ex_blended(rng):
    for shape in [(6, 3), (4, 3, 2, 2)]:
        x = rng.standard_normal(shape) * 1.3 + 0.4
        c = shape[1]
        rm, rv = rng.standard_normal(c) * 0.3, rng.uniform(0.6, 1.8, c)
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        yield Example((x, rm, rv, w, b), dict(training=True, momentum=0.3), label=f"{shape} Dinh et al., α = 0.3")
        yield Example((x, rm, rv), dict(training=True, preset="diminishing", num_batches_tracked=3, decay=0.7),
                      label=f"{shape} diminishing BN, k = 3")
        yield Example((x, rm, rv, w, b), dict(training=True, preset="momentum", momentum=0.6),
                      label=f"{shape} momentum BN, λ = 0.4")
        yield Example((x, rm, rv, w, b), dict(training=False), label=f"{shape} inference")


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_var", "weight", "bias"),
    nondiff=("running_mean", "running_var"),
    survey="§5.3.1 (combining population and mini-batch statistics, back-propagating through the current "
           "mini-batch only; Eqn 18)",
    paper="Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP, ICLR 2017 (batch normalization, "
          "appendix); Ma & Klabjan, Diminishing Batch Normalization, IEEE TNNLS 2024 (arXiv 1705.08011); "
          "Yong, Huang, Meng, Hua & Zhang, Momentum Batch Normalization, ECCV 2020",
    examples=_ex_blended,
)
def blended_batch_norm(
    input: Array,
    running_mean: Array,
    running_var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    preset: str = "dinh",
    decay: float = 1.0,
    num_batches_tracked: int | None = None,
    epoch: int | None = None,
    total_epochs: int | None = None,
    ideal_batch_size: int = 32,
    unbiased: bool = True,
) -> Array | NormResult:
    """Batch normalization by blended population and mini-batch statistics, backward through the batch share.

    .. math::

        \\mu = (1-\\alpha)\\,\\mu_{run} + \\alpha\\,\\mu_B,\\quad
        \\sigma^2 = (1-\\alpha)\\,\\sigma^2_{run} + \\alpha\\,\\tfrac{m}{m-1}\\sigma_B^2,\\quad
        \\hat x = \\frac{x-\\mu}{\\sqrt{\\sigma^2+\\epsilon}},\\quad y = \\gamma\\hat x + \\beta,

    and (μ, σ²) are returned as the new running statistics. The backward is the exact derivative with
    (μ_run, σ²_run) constant: dx = s·(g' − α·mean(g') − κ·(x̂ − s·(μ_B − μ))·mean(g'·x̂)), g' = γ·g,
    s = (σ² + ε)^-½, κ = α·m/(m − 1).

    Parameters
    ----------
    input : Array
        Activations ``(N, C, *spatial)``.
    running_mean, running_var : Array
        The incoming population estimates (C,) (variance unbiased); required.
    weight, bias : Array or None, default None
        γ, β (C,).
    training : bool, default False
        ``True``: blend, normalize by the blend, return it; ``False``: normalize by the running
        statistics (constants, as :func:`normref.batch_norm` at inference).
    momentum : float or None, default 0.1
        α, the batch share (torch's convention, Eqn 18) for the presets ``"dinh"`` and ``"momentum"``;
        ``None``: the cumulative average α = 1/(k + 1) (needs ``num_batches_tracked``). Unused by
        ``"diminishing"``.
    eps : float, default 1e-5
        ε added to the blended variance, inside the square root.
    preset : {"dinh", "diminishing", "momentum"}, default "dinh"
        The schedule of α: ``"dinh"`` (Real NVP: α = ``momentum``, Dinh et al. used ρ = 1 − α);
        ``"momentum"`` (momentum BN: the paper's momentum λ weights the history, α = 1 − λ; with
        ``total_epochs`` given, λ is the paper's dynamic momentum λ^(t) of :func:`momentum_bn_momentum`
        at t = ``epoch``, m = N = ``input.shape[0]``, m₀ = ``ideal_batch_size``; without it, α =
        ``momentum``, a fixed or caller-scheduled share); ``"diminishing"`` (diminishing BN, Ma & Klabjan's
        Algorithm 1: α^(m) = 1/m^h with m = k + 1 = ``num_batches_tracked`` + 1 and h = ``decay``;
        α^(1) = 1 starts from the batch statistics; h = 1 is the running mean of every batch's statistics;
        the paper's Algorithm 1 forms λ^(m+1) with α^(m+1) from an initialized λ^(1), so its first update
        has α = 2^-h: pass ``num_batches_tracked`` = m, one more, to follow that indexing).
    decay : float, default 1.0
        h of the diminishing schedule, a finite number > 0. The paper's experiments use h = 1 and h = 2
        (α = 1/m, 1/m²); its convergence analysis needs Σα^(m) < ∞, i.e. h > 1 for the statistics to
        converge (Theorem 7) and h > 2 for the stationarity result (Lemma 8, Theorem 11; e.g. h = 2.001).
    num_batches_tracked : int or None, default None
        k, the training steps before this one.
    epoch, total_epochs : int or None, default None
        Momentum BN's t (1-based epoch) and T; both or neither; only with ``preset="momentum"`` (then
        ``momentum`` is not used).
    ideal_batch_size : int, default 32
        m₀ of momentum BN's dynamic momentum (the paper's value).
    unbiased : bool, default True
        Blend the unbiased batch variance m/(m − 1)·σ²_B (so the state is torch's ``running_var``);
        ``False``: the biased σ²_B, as Dinh et al. and Yong et al. write it.

    Returns
    -------
    out : Array or NormResult
        y at inference; ``NormResult(output, running_mean, running_var)`` in training, the statistics
        being the blend (μ, σ²) the batch was normalized by.

    Notes
    -----
    Survey §5.3.1: population statistics as weighted averages of the old population statistics and the
    current mini-batch statistics (Eqn 18), back-propagating through the current mini-batch only
    ([125], [126]; also the survey's reading of full normalization [127]). The three presets are one
    operation (:class:`BlendedStandardizing`); per call, ``"dinh"`` and ``"momentum"`` coincide, they
    differ in the schedule the caller feeds. Convention chosen where the papers differ or are silent:
    the variances blended are unbiased (so the returned state is torch's ``running_var``); at α = 1
    the normalization uses the unbiased batch variance (batch_norm the biased one). The backward is
    exact (no stop-gradient), so no ``fd_target``.

    What the papers define and normref does not: diminishing BN (Ma & Klabjan, Algorithm 1) blends the
    mini-batch *standard deviation* σ_B = (mean((x − μ_B)²))^½, not the variance, and normalizes by
    (x − μ)/(σ + ε) (ε outside the root); normref blends variances with ε inside the root. The two blends agree
    to first order in σ_B − σ_run: their squares differ by exactly α(1 − α)(σ_B − σ_run)² (ε aside), so
    the scale differs by ≈ α(1 − α)(σ_B − σ_run)²/(2σ). Momentum BN normalizes at
    inference by separate statistics μ_inf, σ²_inf, a running average of the batch statistics with
    τ = τ₀^(m/m₀) (τ₀ = 0.9), not by the blend; to follow it, keep that average with
    :func:`normref.batch_norm`'s update and pass it at inference. Diminishing BN's analysis takes the
    gradient with respect to the weights with its statistics λ held fixed (its Eqn 2; Algorithm 1 is the
    full-batch form, λ^(m) computed before the step); the backward here is the survey's reading (§5.3.1:
    back-propagation through the current batch's share), the same for all three presets.

    References
    ----------
    L. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    Y. Ma, D. Klabjan, "Diminishing Batch Normalization", IEEE TNNLS 2024 (arXiv:1705.08011).
    H. Yong, J. Huang, D. Meng, X. Hua, L. Zhang, "Momentum Batch Normalization for Deep Learning with
    Small Batch Size", ECCV 2020.
    """
    fn = "blended_batch_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    if running_mean is None or running_var is None:
        raise ValueError(f"{fn}: running_mean and running_var are required (the population statistics blended "
                         f"with the batch's); got None")
    _check_channels(fn, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    preset = check_choice(fn, "preset", preset, BLENDED_PRESETS)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < math.inf:
        raise ValueError(f"{fn}: decay must be a finite number > 0; got {decay!r}")
    decay = float(decay)
    _check_nbt(fn, num_batches_tracked)
    unbiased = check_bool(fn, "unbiased", unbiased)
    ideal_batch_size = check_int(fn, "ideal_batch_size", ideal_batch_size)
    mbn = None
    if (epoch is None) != (total_epochs is None):
        raise ValueError(f"{fn}: epoch and total_epochs go together (momentum BN's dynamic momentum); got "
                         f"epoch={epoch!r}, total_epochs={total_epochs!r}")
    if epoch is not None:
        if preset != "momentum":
            raise ValueError(f"{fn}: epoch/total_epochs (the dynamic momentum) need preset='momentum'; got "
                             f"preset={preset!r}")
        mbn = (check_int(fn, "epoch", epoch), check_int(fn, "total_epochs", total_epochs), int(input.shape[0]),
               ideal_batch_size)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    shape, part = tuple(input.shape), Partition("batch")
    if training:
        _check_training_count(fn, part, shape)
        alpha = _blend_factor(fn, preset, momentum, decay, num_batches_tracked, mbn)
    if _is_empty(shape):
        return _empty_call(xp, input, (input, running_mean, running_var, weight, bias), None,
                           NormResult if training else None, (running_mean, running_var))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd, c = len(shape), shape[1]
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    rm = channel_param(xp, to_compute(xp, running_mean, cd), nd)
    rv = channel_param(xp, to_compute(xp, running_var, cd), nd)
    op: _op.Operation
    if training:
        n = part.count(shape)
        op = BlendedStandardizing(eps=eps, alpha=float(alpha),
                                  kappa=float(alpha) * (n / (n - 1) if unbiased else 1.0))
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, running_mean=rm, running_var=rv)
    else:
        op = _op.PopulationStandardizing(eps)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=rm, var=rv)
    res = pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))
    y = _out(xp, y, input.dtype)
    if training:
        new_rm = _out(xp, _to_channels(xp, st["mean"], c), running_mean.dtype)
        new_rv = _out(xp, _to_channels(xp, st["var"], c), running_var.dtype)
        return NormResult(y, new_rm, new_rv), res
    return y, res


blended_batch_norm.defbackward(_backward_for("x", None, None, "w", "b"))
