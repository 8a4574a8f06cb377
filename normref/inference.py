"""Inference procedures (survey §5.3.2, "Robust Inference Methods for BN"): re-estimating population
statistics after training, and EvalNorm's per-example correction of them.

- :func:`recalibrate` — for *any* registered method with running statistics (batch norm and its
  variants, whitening, scaling-only BN, batch-group norm, ... and every method added later whose state
  follows the ``running_*`` naming convention): fresh population statistics from an iterable of the
  layer's input batches, with the network frozen. ``estimator="average"`` is Ioffe & Szegedy's
  Algorithm 2 (the average of the statistics the method computes on each batch — what torch's
  ``torch.optim.swa_utils.update_bn`` does with ``momentum=None``; AdaBN when the batches come from
  a target domain); ``estimator="pooled"`` is "precise BN" (Wu & Johnson, 2021): the exact moments of
  the union of the batches, for the methods whose statistics are per-channel batch moments.
- :func:`eval_norm` — EvalNorm (Singh & Shrivastava, ICCV 2019): at evaluation, each example's own
  statistics are blended with the population statistics, as the batch statistics it was trained with
  blend it with the other examples of its mini-batch.

Everything is pure: state goes in as arguments and comes back as results. Written against the array
API only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from ._validate import check_bool, check_choice, check_eps_representable, check_ndim, check_positive
from ._xp import Array, compute_dtype, device_of, is_array, library_name, namespace, to_compute
from .registry import Example, Method, Residuals, get, method

__all__ = ["recalibrate", "eval_norm", "PooledMoments"]

#: the argument that switches a method between batch statistics (True) and population statistics
_FLAGS = ("training", "use_input_stats")

# methods whose running statistics are per-channel moments of the batch partition: the "pooled"
# estimator (exact moments of the union of the batches) applies to them. Methods with other statistics
# (instance norm's average of per-sample moments, Lp deviations, batch-group statistics, the streaming
# states of online methods) take the "average" estimator, which is defined for every method.
_POOLED = {
    "batch_norm": (), "ghost_batch_norm": (), "mean_only_batch_norm": (),
    "switchable_norm": (), "batch_instance_norm": (), "whitening_coloring": (),
    # the state must hold batch moments: not Algorithm 1's running σ, not a running whitening matrix
    "batch_renorm": (("running_stat", "var"),),
    "decorrelated_batch_norm": (("running", "covariance"),), "iter_norm": (("running", "covariance"),),
    "batch_normalize": (("partition", "batch"),), "batch_whitening": (("partition", "batch"),),
    "blended_batch_norm": (), "population_norm": (), "prong_whitening": (), "memorized_batch_norm": (),
    "cross_iteration_batch_norm": (), "moving_average_batch_norm": (), "power_norm": (),
}
# methods whose running statistics are not an average of batch statistics, with the reason
_NOT_RECALIBRATED = {
    "online_norm": "its statistics are a per-sample stream (Chiley et al.'s Algorithm 1), not batch statistics; "
                   "stream the batches through online_norm(..., training=True) instead",
}
_POOLABLE_STATE = ("running_mean", "running_var", "running_cov", "running_mean_square")


def _state_names(m: Method) -> tuple[str, ...]:
    """The population estimates among a method's arguments: its non-differentiable ``running_*``."""
    return tuple(p for p in m.array_params if p in m.nondiff and p.startswith("running_"))


def recalibrate(
    method: "str | Method",
    batches: Iterable[Array],
    state: Mapping[str, Array],
    /,
    *,
    estimator: str = "average",
    pooled_unbiased: bool = True,
    **arguments: Any,
) -> dict[str, Array]:
    r"""Re-estimate a method's population statistics from batches of its input, the network frozen.

    .. math::

        \text{average (Algorithm 2):}\quad \hat s = \frac1K \sum_{k=1}^{K} s(\mathcal B_k); \qquad
        \text{pooled:}\quad \hat\mu = \frac1M \sum_{i} x_i,\;
        \hat\sigma^2 = \frac1{M-1}\sum_i (x_i - \hat\mu)^2,\;
        \hat\Sigma = \frac1{M-1}\sum_i (x_i - \hat\mu)(x_i - \hat\mu)^\top

    Parameters
    ----------
    method : str or Method
        A registered activation method with running statistics (its non-differentiable arguments named
        ``running_*``) and a ``training`` (or ``use_input_stats``) flag: ``"batch_norm"``,
        ``"batch_whitening"``, ``"batch_normalize"``, ``"batch_group_norm"``, ...
    batches : iterable of Array
        The layer's input, batch by batch (N_k, C, \*spatial), e.g. a frozen network's activations at
        that layer over the training set (Algorithm 2), or over a target domain (AdaBN).
    state : mapping of str to Array
        The layer's current state, by argument name (``running_mean``, ``running_var``, ``running_cov``,
        ``running_mean_square``, ...): it fixes the shapes and dtypes of the estimates, and is passed
        to the method in each call (batch renormalization measures r, d against it); its values do
        not enter the estimates.
    estimator : {"average", "pooled"}, default "average"
        ``"average"``: each batch's statistics as the method computes them in training (batch moments,
        the variance unbiased per batch; for ghost BN the average over its virtual batches), averaged
        over the K batches with equal weights — Ioffe & Szegedy's Algorithm 2, and what torch's
        cumulative running average (``momentum=None``) holds after one pass. Defined for every method
        with running statistics. ``"pooled"``: the exact moments of all M values per channel of the
        union of the batches (two-pass per batch, pooled by Chan et al.'s update; uneven batch sizes
        are fine), in the spirit of "precise BN". Only for the methods whose running statistics are
        per-channel moments of the batch partition (batch norm and its variants, batch whitening on
        the batch partition, ``batch_normalize(partition="batch")``); ``ValueError`` otherwise.
        Both estimators touch the same state: what the call normalizes with (for
        ``batch_normalize``, its operation's statistics: centering ``running_mean`` only, scaling
        ``running_mean_square`` only); the rest of ``state`` comes back as given.
    pooled_unbiased : bool, default True
        The pooled variance and covariance divided by M − 1 (``True``: unbiased, as the running
        variances of normref, torch and Algorithm 2) or by M (``False``: the biased pooled variance,
        which is what fvcore's precise BN — ``fvcore.nn.precise_bn``, Wu & Johnson's code — computes,
        as the mean of the batch variances and of the squared deviations of the batch means).
        Only with ``estimator="pooled"`` (``ValueError`` otherwise). (Not named ``unbiased``: several
        methods take an ``unbiased`` argument of their own, which passes through ``arguments``.)
    **arguments
        Every other argument of the method (``weight``, ``bias``, ``num_groups``, ``group_size``,
        ``eps``, ``partition``, ``method`` of batch whitening, ...), as the layer calls it (``method``,
        ``batches`` and ``state`` of recalibrate are positional-only, so a method's own ``method=``
        option passes through). ``momentum`` and ``num_batches_tracked`` are set here.

    Returns
    -------
    dict of str to Array
        One entry per ``running_*`` argument of the method found in ``state``, each of its state's
        shape and dtype: a fresh estimate (in the batches' library) for each statistic the call
        estimates, a copy of the given value for the others. ``state`` is not modified.

    Raises
    ------
    TypeError, ValueError
        Bad arguments, before any work. ``batches`` may be any iterable (a generator, a data
        loader), so it cannot be checked ahead: each batch is checked as it comes, before any work on
        it (an array of the first batch's library, (N_k, C, \*spatial) with the state's C channels:
        ``"recalibrate: batches[3] has 5 channels ...; the state has 4 ..."``), after the earlier
        batches were processed — nothing is returned and ``state`` is untouched.

    Notes
    -----
    Survey §5.3.2 (estimating population statistics after training; the running averages of Eqn 18
    lag behind the weights as they change). The average estimator calls the method itself on each
    batch with ``training=True`` and ``momentum=None, num_batches_tracked=0`` (``momentum=1`` where
    the method has no cumulative average), so it re-estimates exactly the statistics that method
    normalizes with — covariances for whitening, mean squares for RMS/scaling, per-group statistics
    for batch-group normalization — without a second implementation of any of them. Algorithm 2's
    unbiased variance m/(m − 1)·E_B[σ²_B] is the average of the per-batch unbiased variances,
    which is what the methods' running variance holds. The pooled estimator is
    :func:`normref.population_statistics` of the stream of batches; its mean square is
    σ̂²·(M − 1)/M + μ̂². Precise BN and normref differ in one convention: fvcore's estimator (Wu &
    Johnson's reference code) returns the *biased* pooled variance (÷ M, the mean of the batch
    variances plus the variance of the batch means), normref's the unbiased one (÷ (M − 1)), the
    convention of every normref and torch running variance; ``pooled_unbiased=False`` gives fvcore's. The
    difference is a factor (M − 1)/M, negligible for the M of a data set.

    References
    ----------
    Ioffe & Szegedy, Batch Normalization, ICML 2015 (Algorithm 2). Li et al., Revisiting Batch
    Normalization for Practical Domain Adaptation (AdaBN), ICLR Workshop 2017. Wu & Johnson,
    Rethinking "Batch" in BatchNorm, arXiv 2105.07576 (precise BN). Huang et al., Decorrelated Batch
    Normalization, CVPR 2018 (population covariance).
    """
    fn = "recalibrate"
    m = get(method)
    check_choice(fn, "estimator", estimator, ("average", "pooled"))
    names = _state_names(m)
    params = m.signature.parameters
    flag = next((f for f in _FLAGS if f in params), None)
    if not names or flag is None:
        raise TypeError(f"{fn}: {m.name} keeps no running statistics (no running_* argument with a training flag); "
                        f"got method={m.name!r}")
    if not isinstance(state, Mapping):
        raise TypeError(f"{fn}: state must be a mapping of argument name to array; got {type(state).__name__}")
    unknown = [k for k in state if k not in m.array_params or k not in m.nondiff]
    if unknown:
        raise TypeError(f"{fn}: state holds {unknown[0]!r}, which is not a state argument of {m.name} "
                        f"(its state arguments: {', '.join(p for p in m.array_params if p in m.nondiff)})")
    estimated = [p for p in names if state.get(p) is not None]
    if not estimated:
        raise ValueError(f"{fn}: state holds none of {m.name}'s running statistics ({', '.join(names)})")
    for key, v in state.items():
        if v is not None and not is_array(v):
            raise TypeError(f"{fn}: state[{key!r}] must be an array; got {type(v).__name__}")
    unbiased = check_bool(fn, "pooled_unbiased", pooled_unbiased)
    if not unbiased and estimator != "pooled":
        raise ValueError(f"{fn}: pooled_unbiased=False (the biased pooled variance, as fvcore's precise BN) applies to "
                         f"estimator='pooled'; got estimator={estimator!r}")
    # the statistics this call estimates: all of them, except where an operation keeps only some
    used = uses(m, arguments, estimated)
    fresh = [p for p in estimated if p in used]
    if not fresh:
        raise ValueError(f"{fn}: state holds none of the running statistics {m.name} estimates with these "
                         f"arguments ({', '.join(uses(m, arguments, names))}); got {', '.join(estimated)}")
    channels = _channels(state, estimated)
    fixed = {"momentum", "num_batches_tracked", "alpha_fwd", flag}
    bad = [k for k in arguments if k in fixed or k in state or k not in params or k == m.array_params[0]]
    if bad:
        arg = bad[0]
        why = ("is set by recalibrate" if arg in fixed else "belongs in state" if arg in state
               else "is the batches" if arg == m.array_params[0] else f"is not an argument of {m.name}")
        raise TypeError(f"{fn}: argument {arg!r} {why}")
    if is_array(batches) or isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{fn}: batches must be an iterable of arrays (N_k, C, *spatial), one per batch; "
                        f"got {type(batches).__name__}")
    if estimator == "pooled":
        return _pooled(fn, m, batches, state, estimated, fresh, arguments, channels, unbiased)
    if m.name in _NOT_RECALIBRATED:
        raise TypeError(f"{fn}: {m.name} cannot be recalibrated from batches: {_NOT_RECALIBRATED[m.name]}")
    call = dict(arguments)
    call.update({k: v for k, v in state.items() if v is not None})
    call[flag] = True
    # the update factor that makes a call return this batch's statistics alone
    if "momentum" in params and "num_batches_tracked" in params:
        call.update(momentum=None, num_batches_tracked=0)  # the cumulative average (ghost BN: of its virtual batches)
    elif "momentum" in params:
        call.update(momentum=1.0)  # running ← (1 − m)·running + m·batch statistic, m = 1
    elif "alpha_fwd" in params:
        call.update(alpha_fwd=0.0)  # running ← α·running + (1 − α)·batch statistic, α = 0 (PowerNorm)
    else:
        raise TypeError(f"{fn}: {m.name} has no momentum (or alpha_fwd) argument: its running statistics are "
                        f"not a running average, which the average estimator needs")
    acc: dict = {}
    first = None
    k = 0
    for i, xb in enumerate(batches):
        check_batch(fn, i, xb, first, channels)  # before any work on this batch (the earlier ones are done)
        first = xb if first is None else first
        if any(int(d) == 0 for d in xb.shape):
            continue  # an empty batch carries no statistics (the methods return the state unchanged)
        out = m(xb, **call)
        if not isinstance(out, tuple):
            raise TypeError(f"{fn}: {m.name} returned no running statistics for this call")
        k += 1
        xp = namespace(fn, **{f"batches[{i}]": xb})
        for p in fresh:
            new = getattr(out, p)
            # the cumulative average ŝ_k = ŝ_{k−1} + (s_k − ŝ_{k−1})/k (equal weights, Algorithm 2)
            acc[p] = new if k == 1 else acc[p] + (to_compute(xp, new, acc[p].dtype) - acc[p]) * (1.0 / k)
    if first is None:
        raise ValueError(f"{fn}: batches is empty; expected at least one batch")
    if k == 0:
        raise ValueError(f"{fn}: every batch is empty; expected at least one batch with values")
    xp = namespace(fn, batch=first)
    out = {p: xp.astype(acc[p], state[p].dtype) if acc[p].dtype != state[p].dtype else acc[p] for p in fresh}
    return _with_kept(fn, out, state, estimated)


#: methods whose running statistics depend on an option: (option, {value: the statistics it estimates})
_USES = {
    "batch_normalize": ("operation", {"standardizing": ("running_mean", "running_var"), "centering": ("running_mean",),
                                      "scaling": ("running_mean_square",)}),
}


def uses(m: "str | Method", arguments: Mapping[str, Any], names: Iterable[str]) -> tuple[str, ...]:
    """The running statistics among ``names`` that method ``m`` called with ``arguments`` estimates (and
    normalizes with): all of them, except for ``batch_normalize``, whose operation keeps only some
    (centering: ``running_mean``; scaling: ``running_mean_square``)."""
    m = get(m)
    if m.name not in _USES:
        return tuple(names)
    option, table = _USES[m.name]
    value = arguments.get(option, m.signature.parameters[option].default)
    keep = table.get(value, ())
    return tuple(p for p in names if p in keep)


def _with_kept(fn: str, out: dict, state: Mapping[str, Array], estimated: Iterable[str]) -> dict:
    """The estimates, and the state the call does not estimate back as given (a copy: no aliasing)."""
    for p in estimated:
        if p not in out:
            xp = namespace(fn, **{f"state[{p!r}]": state[p]})
            out[p] = xp.asarray(state[p], copy=True)
    return out


def _channels(state: Mapping[str, Array], names: Iterable[str]) -> "tuple[int, str] | None":
    """(C, the state that fixes it): the channels of the running statistics ((C,) vectors; a
    covariance (C/g, g, g)), or None when no state fixes them."""
    for p in names:
        v = state[p]
        if v.ndim == 1:
            return int(v.shape[0]), f"{p}.shape = {tuple(int(d) for d in v.shape)}"
        if p == "running_cov" and v.ndim == 3:
            return int(v.shape[0]) * int(v.shape[2]), f"{p}.shape = {tuple(int(d) for d in v.shape)}"
    return None


def check_batch(fn: str, i: int, xb: Any, first: Any, channels: "tuple[int, str] | None") -> None:
    """``TypeError``/``ValueError`` unless batch ``i`` is an array (N_k, C, \\*spatial) of the first
    batch's library with the state's C channels; raised before any work on that batch."""
    if not is_array(xb):
        raise TypeError(f"{fn}: batches[{i}] must be an array (N_k, C, *spatial); got {type(xb).__name__}")
    if first is not None and library_name(xb) != library_name(first):
        raise TypeError(f"{fn}: all batches must come from one library; batches[0] is a {library_name(first)} "
                        f"array but batches[{i}] is a {library_name(xb)} array")
    if xb.ndim < 2:
        raise ValueError(f"{fn}: batches[{i}] must have shape (N_k, C, *spatial); got shape {tuple(xb.shape)}")
    if channels is not None and int(xb.shape[1]) != channels[0]:
        raise ValueError(f"{fn}: batches[{i}] has {int(xb.shape[1])} channels (shape {tuple(xb.shape)}); the state "
                         f"has {channels[0]} ({channels[1]})")


def _pooled(fn: str, m: Method, batches: Iterable[Array], state: Mapping[str, Array], estimated: list,
            fresh: list, arguments: Mapping[str, Any], channels: "tuple[int, str] | None",
            unbiased: bool) -> dict[str, Array]:
    """The exact moments of the union of the batches (precise BN), in the state's shapes and dtypes:
    the statistics ``fresh`` the call estimates; the rest of ``estimated`` comes back as given."""
    check_pooled(fn, m, fresh, arguments)
    gs = None
    if state.get("running_cov") is not None:
        gs = int(state["running_cov"].shape[-1])
    acc = PooledMoments(gs)
    first = None
    for i, xb in enumerate(batches):
        check_batch(fn, i, xb, first, channels)  # before any work on this batch (the earlier ones are done)
        if first is not None and (library_name(xb) != library_name(first) or xb.shape[1:] != first.shape[1:]):
            raise ValueError(f"{fn}: every batch must be a {library_name(first)} array of shape (N_k, "
                             f"{', '.join(str(int(d)) for d in first.shape[1:])}); batches[{i}] is a "
                             f"{library_name(xb)} array of shape {tuple(xb.shape)}")
        check_ndim(fn, f"batches[{i}]", xb, min_ndim=2, what="(N_k, C, *spatial)")
        first = xb if first is None else first
        acc.add(xb)
    if first is None:
        raise ValueError(f"{fn}: batches is empty; expected at least one batch")
    values = acc.estimates(fresh, unbiased=unbiased)
    xp = namespace(fn, batch=first)
    out = {}
    for p in fresh:
        v, like = values[p], state[p]
        if tuple(v.shape) != tuple(like.shape):
            raise ValueError(f"{fn}: state[{p!r}] has shape {tuple(like.shape)}; the batches' statistics have "
                             f"shape {tuple(v.shape)}")
        out[p] = xp.astype(v, like.dtype) if v.dtype != like.dtype else v
    return _with_kept(fn, out, state, estimated)


def check_pooled(fn: str, m: "str | Method", estimated: Iterable[str], arguments: Mapping[str, Any]) -> None:
    """``ValueError`` unless the pooled estimator applies to method ``m`` called with ``arguments``
    and its state ``estimated`` (per-channel batch moments only)."""
    m = get(m)
    if m.name not in _POOLED:
        raise ValueError(f"{fn}: estimator='pooled' applies to methods whose running statistics are per-channel "
                         f"batch moments ({', '.join(sorted(_POOLED))}); {m.name}'s are not: use "
                         f"estimator='average'")
    for name, want in _POOLED[m.name]:
        value = arguments.get(name, m.signature.parameters[name].default)
        if value != want:
            raise ValueError(f"{fn}: estimator='pooled' applies to {m.name} with {name}={want!r} (per-channel "
                             f"batch moments); got {name}={value!r}: use estimator='average'")
    other = [p for p in estimated if p not in _POOLABLE_STATE]
    if other:
        raise ValueError(f"{fn}: estimator='pooled' estimates {', '.join(_POOLABLE_STATE)}; {m.name} also keeps "
                         f"{other[0]}: use estimator='average'")


# --------------------------------------------------------------------------------------------------
# EvalNorm (Singh & Shrivastava, ICCV 2019)


def _ex_eval_norm(rng):
    for shape in [(3, 4, 3, 2), (2, 3, 5), (4, 3)]:
        c = shape[1]
        x = rng.standard_normal(shape) * 1.5 + 0.3
        rm, rv = rng.standard_normal(c) * 0.5, rng.uniform(0.5, 2.0, c)
        a, b = rng.uniform(0.1, 0.9, c), rng.uniform(0.1, 0.9, c)
        yield Example((x, rm, rv, a, b), {}, label=f"{shape} per-channel α, β")
        yield Example((x, rm, rv, a, b, rng.standard_normal(c), rng.standard_normal(c)), dict(eps=1e-3),
                      label=f"{shape} affine")
    x = rng.standard_normal((2, 3, 4))
    yield Example((x, rng.standard_normal(3), rng.uniform(0.5, 2.0, 3), rng.uniform(0.1, 0.9, ()),
                   rng.uniform(0.1, 0.9, ())), dict(mixture_term=False), label="scalar α, β, no mixture term")


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_var", "alpha", "beta", "weight", "bias"),
    nondiff=("running_mean", "running_var"),
    survey="§5.3.2 (robust inference methods for BN: EvalNorm)",
    paper="Singh & Shrivastava, EvalNorm: Estimating Batch Normalization Statistics for Evaluation, ICCV 2019",
    examples=_ex_eval_norm,
)
def eval_norm(
    input: Array,
    running_mean: Array,
    running_var: Array,
    alpha: "Array | float",
    beta: "Array | float",
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    *,
    mixture_term: bool = True,
) -> Array:
    r"""EvalNorm: batch normalization at evaluation, each example's statistics blended with the population's.

    .. math::

        \hat\mu = \alpha\,\mu_x + (1-\alpha)\,\mu_p, \qquad
        \hat\sigma^2 = \beta\,\sigma_x^2 + (1-\beta)\,\sigma_p^2 + \beta(1-\beta)\,(\mu_x - \mu_p)^2, \qquad
        y = \gamma\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + b

    with μ_x, σ²_x (biased) the example's own statistics per channel over its spatial positions and
    μ_p, σ²_p the population (running) statistics.

    Parameters
    ----------
    input : Array
        (N, C, \*spatial); without spatial axes μ_x = x and σ²_x = 0.
    running_mean, running_var : Array
        (C,): μ_p, σ²_p (constants: no gradient).
    alpha, beta : Array or float
        The blending weights of the mean and of the variance, in [0, 1]: arrays of shape (C,) (per
        channel) or () (per layer), or Python floats (per layer, constants: e.g. α = β = 1/m for a
        network trained with mini-batches of m examples, the value the decomposition in the Notes
        gives; that the paper recommends it as a rule of thumb could not be verified here). Arrays
        are differentiable: the paper's abstract says α, β are estimated (online, during training);
        here they can be fitted by gradient descent through this function's exact backward.
        (``beta`` is the variance weight; the affine shift is ``bias``. The torch and JAX adapters
        take them as tensors: ``torch.tensor(1 / m)``.)
    weight, bias : Array or None, default None
        γ, b: (C,).
    eps : float, default 1e-5
        ε, added to σ̂².
    mixture_term : bool, default True
        Include β(1 − β)(μ_x − μ_p)² (default): σ̂² is then the variance of the mixture that puts weight
        β on the example's values and 1 − β on the population. ``False``: the plain blend
        βσ²_x + (1 − β)σ²_p.

    Returns
    -------
    Array
        y, of input's shape and dtype.

    Notes
    -----
    Why this estimator: in training, example x shares its batch statistics with the m − 1 other
    examples of its mini-batch. With equal spatial sizes, exactly μ_B = (1/m)·μ_x + (1 − 1/m)·μ_r and
    σ²_B = (1/m)·σ²_x + (1 − 1/m)·σ²_r + (1/m)(1 − 1/m)·(μ_x − μ_r)², μ_r, σ²_r (biased) the
    statistics of the others: the formula above with α = β = 1/m. Vanilla BN at evaluation sets
    α = β = 0 (x's own share vanishes), which for small m leaves the activations far from those seen
    in training; EvalNorm replaces only the others' statistics by the population's. The mixture term
    follows from this decomposition (with it, α = β = 1/m and the others' exact statistics reproduce
    the training output; tested): the cross term β(1 − β)(μ_x − μ_p)² is the exact decomposition of
    the batch variance into the example's and the others' shares, and is the default.
    ``mixture_term=False`` is the plain blend βσ²_x + (1 − β)σ²_p.

    What could not be verified: only the paper's abstract could be read here, not its body, so its
    equations — whether its variance blend has the cross term, whether its weights are per channel,
    and the rule of thumb α = β = 1/m — are not checked against it; the formula above is derived from
    the abstract's description (each example's statistics blended with the population's, as in a
    mini-batch) and the exact batch decomposition. The abstract says the blending weights are
    estimated online during training; this function takes them as inputs (arrays or floats) and
    gives their exact gradients, so that estimation can be done by the caller. The backward is exact
    (analytic, through μ_x and σ²_x, and to α, β, γ, b). Survey §5.3.2.

    References
    ----------
    Singh & Shrivastava, EvalNorm: Estimating Batch Normalization Statistics for Evaluation, ICCV 2019.
    """
    fn = "eval_norm"
    from ._validate import concrete_any
    from .framework import check_param_shape

    # α, β as Python numbers (the rule of thumb α = β = 1/m): 0-d constants of the input's library
    numbers = {}
    for name, a in (("alpha", alpha), ("beta", beta)):
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            if not (math.isfinite(a) and 0.0 <= a <= 1.0):
                raise ValueError(f"{fn}: {name} must lie in [0, 1] (a blending weight); got {a!r}")
            numbers[name] = float(a)
        elif isinstance(a, bool):
            raise TypeError(f"{fn}: {name} must be an array or a Python float in [0, 1]; got bool {a!r}")
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var,
                   alpha=None if "alpha" in numbers else alpha, beta=None if "beta" in numbers else beta,
                   weight=weight, bias=bias)
    if alpha is None or beta is None:
        raise TypeError(f"{fn}: alpha and beta must be arrays or Python floats in [0, 1]; got None")
    if numbers:
        check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
        like = {"dtype": compute_dtype(xp, input.dtype), "device": device_of(input)}
        alpha = xp.asarray(numbers["alpha"], **like) if "alpha" in numbers else alpha
        beta = xp.asarray(numbers["beta"], **like) if "beta" in numbers else beta
    # the Python numbers became 0-d arrays above: both are arrays from here on (for the type checker)
    assert not isinstance(alpha, (int, float)) and not isinstance(beta, (int, float))
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    shape = tuple(input.shape)
    c = shape[1]
    for name, a in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        check_param_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")
    for name, a in (("alpha", alpha), ("beta", beta)):
        if tuple(a.shape) not in ((), (c,)):
            raise ValueError(f"{fn}: {name} must have shape () (per layer) or ({c},) (per channel); "
                             f"got shape {tuple(a.shape)}")
    from ._validate import check_nonnegative_values

    check_nonnegative_values(fn, "running_var", xp, running_var)
    for name, a in (("alpha", alpha), ("beta", beta)):
        if concrete_any(xp, (a < 0) | (a > 1)):
            raise ValueError(f"{fn}: {name} must lie in [0, 1] (a blending weight); got values outside it")
    eps = check_positive(fn, "eps", eps)
    check_eps_representable(fn, eps, xp, compute_dtype(xp, input.dtype))
    mixture_term = check_bool(fn, "mixture_term", mixture_term)
    arrays = (input, running_mean, running_var, alpha, beta, weight, bias)
    if any(int(d) == 0 for d in shape):
        from .standardization import _empty_call

        return _empty_call(xp, input, arrays)
    cd = compute_dtype(xp, input.dtype)
    nd = len(shape)
    axes = tuple(range(2, nd))
    x = to_compute(xp, input, cd)

    def chan(a):  # (C,) or () as an array broadcastable to (N, C, 1, ...)
        a = to_compute(xp, a, cd)
        return a if a.ndim == 0 else xp.reshape(a, (1, c) + (1,) * (nd - 2))

    P, V, a, b = chan(running_mean), chan(running_var), chan(alpha), chan(beta)
    if axes:
        mu_x = xp.mean(x, axis=axes, keepdims=True)
        v_x = xp.mean((x - mu_x) ** 2, axis=axes, keepdims=True)  # biased, per example and channel
    else:
        mu_x, v_x = x, xp.zeros_like(x)
    d = mu_x - P
    t = 1.0 if mixture_term else 0.0
    mu_hat = a * mu_x + (1.0 - a) * P
    var_hat = b * v_x + (1.0 - b) * V + t * b * (1.0 - b) * d * d
    r = 1.0 / xp.sqrt(var_hat + eps)
    xhat = (x - mu_hat) * r
    gamma = None if weight is None else chan(weight)
    y = xhat if gamma is None else xhat * gamma
    if bias is not None:
        y = y + chan(bias)
    res = Residuals((x, xhat, mu_x, v_x, d, V, a, b, r, gamma),
                    (t, tuple(alpha.shape), tuple(beta.shape), weight is not None, bias is not None))
    return (xp.astype(y, input.dtype) if y.dtype != input.dtype else y), res


@eval_norm.defbackward
def _eval_norm_backward(res: Residuals, g):
    xp = namespace("eval_norm.backward", cotangent=g)
    x, xhat, mu_x, v_x, d, V, a, b, r, gamma = res.arrays
    t, ashape, bshape, has_w, has_b = res.static
    g = to_compute(xp, g, x.dtype)
    nd = x.ndim
    axes = tuple(range(2, nd))
    S = math.prod(int(s) for s in x.shape[2:])

    def to_param(v, pshape):  # a (N, C, 1, ...)-shaped (or full) per-element gradient, summed to pshape
        s = xp.sum(v, axis=tuple(i for i in range(nd) if i != 1 or pshape == ()))
        return xp.reshape(xp.asarray(s), pshape)  # asarray: NumPy's full reduction is a scalar, not an array

    dw = to_param(g * xhat, (x.shape[1],)) if has_w else None
    db_aff = to_param(g, (x.shape[1],)) if has_b else None
    h = g if gamma is None else g * gamma                                   # dL/dx̂
    # L depends on x directly and through μ̂ = aμ_x + (1−a)μ_p and σ̂² = bσ²_x + (1−b)σ²_p + t·b(1−b)d²
    sum_ = (lambda v: xp.sum(v, axis=axes, keepdims=True)) if axes else (lambda v: v)
    g_mu = -sum_(h) * r                                                     # dL/dμ̂
    g_var = -0.5 * r * r * sum_(h * xhat)                                   # dL/dσ̂²
    g_mux = g_mu * a + g_var * (2.0 * t * b * (1.0 - b)) * d                # dL/dμ_x (d = μ_x − μ_p)
    dx = h * r + g_mux * (1.0 / S)
    if axes:
        dx = dx + g_var * b * (2.0 / S) * (x - mu_x)                        # dσ²_x/dx = 2(x − μ_x)/S
    da = to_param(g_mu * d, ashape)                                         # dμ̂/dα = μ_x − μ_p
    dbeta = to_param(g_var * (v_x - V + t * (1.0 - 2.0 * b) * d * d), bshape)
    return dx, None, None, da, dbeta, dw, db_aff


class PooledMoments:
    """Streaming exact per-channel moments of batches (N_k, C, \\*spatial): ``add(batch)`` then
    ``estimates(state)`` — the "pooled" estimator of :func:`recalibrate` one batch at a time (for a
    caller that sees the batches one by one, as ``normref.backends.torch.recalibrate`` does).

    Each batch gives (n_k, μ_k, M2_k) (two-pass within the batch; with ``group_size`` also the
    groups' centred cross-products) and they are pooled by Chan et al.'s update
    (:func:`normref.distributed.combine_moments`)."""

    def __init__(self, group_size: int | None = None) -> None:
        self.group_size = group_size
        self._acc: tuple | None = None

    def add(self, batch: Array) -> None:
        from .distributed import combine_moments
        from .population import population_statistics

        xp = namespace("PooledMoments.add", batch=batch)
        n = int(batch.shape[0]) * math.prod(int(d) for d in batch.shape[2:])
        if n == 0:
            return
        c, gs = int(batch.shape[1]), self.group_size
        if n >= 2:
            st = population_statistics(batch, group_size=gs)
            mu, m2 = st.mean, st.var * (n - 1)
            m2g = None if st.cov is None else st.cov * (n - 1)
        else:  # one value per channel: μ = it, M2 = 0
            mu = xp.reshape(to_compute(xp, batch, compute_dtype(xp, batch.dtype)), (c,))
            m2 = xp.zeros_like(mu)
            m2g = None if gs is None else xp.zeros((c // gs, gs, gs), dtype=mu.dtype)
        if self._acc is None:
            self._acc = (n, mu, m2, m2g)
            return
        na, mua, m2a, m2ga = self._acc
        w = xp.asarray([float(na), float(n)], dtype=mu.dtype)
        _, mean, M2 = combine_moments(xp, w, xp.stack([mua, mu]), xp.stack([m2a, m2]))
        M2g = None
        if m2g is not None:
            assert gs is not None  # m2g exists only with a group_size (for the type checker)
            g = c // gs
            _, _, M2g = combine_moments(xp, w, xp.stack([xp.reshape(mua, (g, gs)), xp.reshape(mu, (g, gs))]),
                                        xp.stack([m2ga, m2g]))
        self._acc = (na + n, mean, M2, M2g)

    def estimates(self, names: Iterable[str], unbiased: bool = True) -> dict[str, Array]:
        """The pooled ``running_mean``/``running_var``/``running_cov``/``running_mean_square`` among
        ``names``: the variance and covariance divided by M − 1 (``unbiased=True``, as the running
        variances of normref and torch) or by M (``unbiased=False``, fvcore's precise BN)."""
        if self._acc is None or self._acc[0] < (2 if unbiased else 1):
            raise ValueError(f"recalibrate: an unbiased variance needs at least 2 values per channel; the batches "
                             f"hold {0 if self._acc is None else self._acc[0]}")
        n, mean, m2, m2g = self._acc
        d = n - 1 if unbiased else n
        var = m2 / d
        values = {"running_mean": mean, "running_var": var, "running_cov": None if m2g is None else m2g / d,
                  "running_mean_square": m2 / n + mean * mean}
        return {p: values[p] for p in names}
