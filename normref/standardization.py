"""The standardization family (survey §5.1.1–§5.1.2, Table 1): named presets over NAP × NOP × NRR.

Every function here is a registered :class:`~normref.registry.Method`: calling it computes the
forward; ``.forward``/``.backward`` and :func:`normref.vjp` give the analytic backward, which is the
composition of the recovery's, the operation's and the partition's backwards
(:mod:`normref.framework`).

Running statistics (survey Eqn 18) are pure: when a function is called with ``training=True`` (or
``use_input_stats=True``) *and* running statistics, it returns a ``NamedTuple``
``(output, running_mean, running_var)`` holding the updated statistics instead of mutating them:

    y, running_mean, running_var = normref.batch_norm(x, running_mean, running_var, training=True)

so a port of ``F.batch_norm(x, rm, rv, training=True)`` cannot lose the update silently (using the
tuple as an array fails at once). Otherwise the output array itself is returned. The running
variance is updated with the unbiased batch variance, as torch does; ``momentum=None`` gives the
cumulative average 1/(k+1) with ``k = num_batches_tracked`` batches seen before this one.

Bad state and empty batches. A running variance (or running scale) with a negative entry is refused
(``ValueError`` naming it) wherever the values are concrete; under ``jax.jit`` / ``torch.func.vmap``
tracing there is nothing to inspect and the check is skipped. Flags (``training``,
``use_input_stats``, ``l1_factor``) must be bools (``np.bool_`` included): ``training="False"`` is a
``TypeError``, not training. An ``eps`` that rounds to 0 in the float32 compute dtype is refused.
An *empty* input (N = 0, C = 0 or a spatial size 0) gives an empty output, the running statistics
back unchanged, and a backward with an empty input gradient and zero parameter gradients (torch
2.13's result for batch_norm, group_norm and layer_norm; its instance_norm's NaN running statistics
at N = 0 are not followed).

Return annotations give what a *call* returns (``Array``, or the result tuple); the decorated body
returns that paired with its :class:`~normref.registry.Residuals`, which :meth:`Method.forward`
exposes and a plain call drops.
"""

from __future__ import annotations

import dataclasses
import numbers

import math
from typing import Any, NamedTuple, Sequence

import numpy as _np

from . import operation as _op
from ._validate import (check_bool, check_choice, check_eps_representable, check_int, check_momentum, check_ndim,
                        check_nonnegative_values, check_p, check_positive, concrete_any, first_true)
from ._xp import Array, compute_dtype, finfo_eps, namespace, to_compute, to_numpy
from ._results import result_tuple
from .distributed import check_reducer
from .framework import channel_param, check_param_shape, pack, run_forward, unpack_backward
from .partition import Partition
from .partition import cached as _cached_partition
from .recovery import affine_forward, tlu_backward, tlu_forward
from .registry import Empty, Example, Invariant, Residuals, method

__all__ = [
    "NormResult",
    "MeanOnlyResult",
    "LpNormResult",
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "mean_only_batch_norm",
    "position_norm",
    "pixel_norm",
    "batch_group_norm",
    "filter_response_norm",
    "lp_batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
]


_RESULT_NOTE = """
    Notes
    -----
    A ``NamedTuple``, not an array: unpack it or read ``result.output``. Arithmetic on the tuple
    (``result * 2``), NumPy conversion and array attributes (``result.sum()``, ``result.shape``)
    raise a ``TypeError``/``AttributeError`` that says so (:func:`normref._results.result_tuple`).
    The running statistics carry no gradient (state, not outputs of the math).
    """


@result_tuple
class NormResult(NamedTuple):
    """Output and updated running statistics of a training-mode call given running statistics.

    Returned by ``batch_norm``, ``instance_norm``, ``batch_renorm``, ``ghost_batch_norm``, ...

    Attributes
    ----------
    output : Array
        The normalized array (same shape and dtype as the input): the differentiable output.
    running_mean : Array
        The updated running mean, (C,), in the dtype of the given ``running_mean``.
    running_var : Array
        The updated running (unbiased) variance, (C,), in the dtype of the given ``running_var``.
    """

    output: Array
    running_mean: Array
    running_var: Array


@result_tuple
class MeanOnlyResult(NamedTuple):
    """Output and updated running mean of a training-mode ``mean_only_batch_norm`` given ``running_mean``.

    Attributes
    ----------
    output : Array
        The centred array (same shape and dtype as the input): the differentiable output.
    running_mean : Array
        The updated running mean, (C,).
    """

    output: Array
    running_mean: Array


@result_tuple
class LpNormResult(NamedTuple):
    """Output and updated running statistics of a training-mode ``lp_batch_norm`` given running statistics.

    Attributes
    ----------
    output : Array
        The normalized array (same shape and dtype as the input): the differentiable output.
    running_mean : Array
        The updated running mean, (C,).
    running_scale : Array
        The updated running Lp deviation (the scale divided by), (C,).
    """

    output: Array
    running_mean: Array
    running_scale: Array


for _cls in (NormResult, MeanOnlyResult, LpNormResult):
    _cls.__doc__ = (_cls.__doc__ or "") + _RESULT_NOTE


# --------------------------------------------------------------------------------------------------
# shared helpers (validation, running statistics, the composed backward)


def _out(xp, y, dtype):
    return y if y.dtype == dtype else xp.astype(y, dtype)


def _check_out(fn, xp, input, out, **others):
    """Validate an ``out=`` buffer: same library, shape and dtype as ``input``, writable, sharing no
    memory with ``input`` or with any of ``others`` (weight, bias, running statistics: the output is
    written while they are still being read, and normref never modifies its inputs)."""
    if out is None:
        return
    from ._xp import is_array, library_name

    lib = library_name(input)
    if not is_array(out) or library_name(out) != lib:
        raise TypeError(f"{fn}: out must be a {lib} array like input; got {type(out).__name__}")
    if lib not in ("numpy", "cupy"):
        raise TypeError(
            f"{fn}: out= needs a library whose arrays are written in place (NumPy, CuPy); got a {lib} out "
            f"(return values of {lib} cannot be written into a given buffer: call without out=)"
        )
    if tuple(out.shape) != tuple(input.shape):
        raise ValueError(f"{fn}: out must have input's shape {tuple(input.shape)}; got shape {tuple(out.shape)}")
    if out.dtype != input.dtype:
        raise TypeError(f"{fn}: out must have input's dtype {input.dtype}; got dtype {out.dtype}")
    flags = getattr(out, "flags", None)
    if flags is not None and not flags.writeable:
        raise ValueError(f"{fn}: out must be writeable; got a read-only array")
    if lib == "numpy":
        for name, a in (("input", input),) + tuple(others.items()):
            if a is not None and _np.may_share_memory(out, a):
                raise ValueError(
                    f"{fn}: out must not share memory with {name} (normref never modifies its inputs); "
                    f"got out overlapping {name}"
                )


def _into(y, out):
    """Honour ``out=`` on the formula path (the kernel path has already written y into it)."""
    if out is None or y is out:
        return y
    out[...] = y
    return out


def _kernel_out(out, input, cd):
    """``out`` for the kernel to write into directly (only when y needs no cast afterwards)."""
    return out if out is not None and input.dtype == cd else None


def _check_channels(fn, input, **params):
    c = input.shape[1]
    for name, a in params.items():
        check_param_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")


def _check_training_count(fn, part: Partition, shape, what: str = "channel when training"):
    """Batch statistics of a single value are degenerate (σ² = 0, x̂ = 0 whatever x): torch's batch
    and instance norm raise in training, and so does every batch-type preset here. An empty input
    (a dimension of size 0) is not refused: its result is empty (:func:`_empty_call`), as in torch."""
    if part.count(shape) < 2 and not _is_empty(shape):
        raise ValueError(
            f"{fn}: expected more than 1 value per {what}; got input of shape {tuple(shape)}"
        )


def _is_empty(shape) -> bool:
    return any(int(d) == 0 for d in shape)


def _empty_call(xp, input, arrays, out=None, result=None, running=()):
    """``(output, residuals)`` of a call on an empty input (N = 0, C = 0 or a spatial size 0).

    The definition (torch 2.13's for batch_norm, group_norm, layer_norm, instance_norm's C = 0, and
    for every activation method here): the output is empty, of input's shape and dtype; the running
    statistics come back unchanged (as copies; torch's instance_norm turns them into NaN with N = 0,
    not followed: no batch is no evidence); the backward (registry :class:`~normref.registry.Empty`)
    gives an empty input gradient and zero parameter gradients, the sums over no elements.
    ``arrays``: the call's array arguments in signature order; ``result``: the result tuple's type
    when the call returns running statistics (``running``)."""
    y = xp.zeros_like(input) if out is None else out
    res = Residuals((), Empty(tuple(None if a is None else tuple(int(d) for d in a.shape) for a in arrays)))
    if result is not None:
        return result(y, *(xp.asarray(r, copy=True) for r in running)), res
    return y, res


def _eps(fn, xp, input, eps):
    """ε > 0, finite, and not rounding to 0 in the compute dtype (a constant group would give 0/0)."""
    eps = check_positive(fn, "eps", eps)
    check_eps_representable(fn, eps, xp, compute_dtype(xp, input.dtype))
    return eps


def _check_nbt(fn, num_batches_tracked):
    """num_batches_tracked, when given, is a count (checked even when momentum makes it unused)."""
    if num_batches_tracked is not None:
        check_int(fn, "num_batches_tracked", num_batches_tracked, minimum=0)


def _running_pair(fn, rm, rv, names=("running_mean", "running_var")):
    if (rm is None) != (rv is None):
        given, missing = (names[0], names[1]) if rv is None else (names[1], names[0])
        raise ValueError(f"{fn}: {given} and {missing} go together; got {given} but {missing}=None")


def _factor(fn, momentum, num_batches_tracked):
    return _factors(fn, momentum, num_batches_tracked, 1)[0]


def _factors(fn, momentum, num_batches_tracked, updates: int) -> list[float]:
    """The factors f of ``updates`` successive running-statistic updates (survey Eqn 18).

    A fixed momentum gives f = momentum each time; momentum=None the cumulative average: after k
    batches the i-th further batch gets f = 1/(k + i + 1), so that the running value stays the
    plain mean of every batch statistic seen (torch's ``_BatchNorm`` with ``momentum=None``).
    """
    if momentum is not None:
        return [momentum] * updates
    if num_batches_tracked is None:
        raise ValueError(
            f"{fn}: momentum=None (cumulative average) needs num_batches_tracked, the number of batches "
            f"seen before this one; got num_batches_tracked=None"
        )
    k = check_int(fn, "num_batches_tracked", num_batches_tracked, minimum=0)
    return [1.0 / (k + i + 1) for i in range(updates)]


def _ema(xp, running, stat, f):
    """(1 − f)·running + f·stat (survey Eqn 18), in the running statistic's own dtype."""
    new = (1.0 - f) * to_compute(xp, running, stat.dtype) + f * stat
    return _out(xp, new, running.dtype)


def _to_channels(xp, stat, c):
    return xp.reshape(stat, (c,))


def _backward_for(*layout: str | None):
    """A backward for a preset whose array parameters map to ``layout`` ('x', 'w', 'b' or None)."""

    def backward(res: Residuals, g, needs=None):
        xp = namespace("backward", cotangent=g)
        # which of (dx, dγ, dβ) are wanted: the composed backward skips the others' passes
        want = dict(zip(layout, needs)) if needs is not None else {}
        need = tuple(bool(want.get(k, True)) for k in ("x", "w", "b"))
        dx, dg, db, _ = unpack_backward(xp, res, g, need)
        wshape, bshape = res.static.extra[:2]
        grads = {
            "x": dx,
            "w": None if dg is None else xp.reshape(dg, wshape),
            "b": None if db is None else xp.reshape(db, bshape),
        }
        return tuple(None if k is None else grads[k] for k in layout)

    return backward


def _shapes(weight, bias):
    return (None if weight is None else tuple(weight.shape), None if bias is None else tuple(bias.shape))


def _check_convention(fn, name, v, choices):
    """A convention argument: one of the strings ``choices`` (``TypeError`` for a non-string)."""
    if not isinstance(v, str):
        raise TypeError(f"{fn}: {name} must be a str, one of {', '.join(map(repr, choices))}; "
                        f"got {type(v).__name__} {v!r}")
    return check_choice(fn, name, v, choices)


# --------------------------------------------------------------------------------------------------
# examples and invariants the registry hands to the tests and the conformance suite


def _np_moments_err(x, y, axes, eps, kind):
    """Largest deviation of y's moments over ``axes`` from their exact values for input x (float64).

    standardizing: mean 0, variance σ²/(σ²+ε); scaling: mean square m/(m+ε); centering: mean 0.
    """
    x = _np.asarray(x, _np.float64)
    y = _np.asarray(y, _np.float64)
    if kind == "scaling":
        ms = (x * x).mean(axis=axes)
        return float(_np.max(_np.abs((y * y).mean(axis=axes) - ms / (ms + eps))))
    err = float(_np.max(_np.abs(y.mean(axis=axes))))
    if kind == "standardizing":
        v = x.var(axis=axes)
        err = max(err, float(_np.max(_np.abs(y.var(axis=axes) - v / (v + eps)))))
    return err


def moment_invariant(kind: str, partition_of) -> Invariant:
    """Invariant: the output (before recovery) has the moments its operation promises over its partition.

    ``partition_of(args, kwargs)`` returns ``(Partition, eps)`` or ``None`` when the call has a
    recovery or uses population statistics (then the invariant does not apply to it).
    """

    def check(m, xp, out, args, kwargs):
        spec = partition_of(args, kwargs)
        if spec is None:
            return None
        part, eps = spec
        x = to_numpy(args[0])
        y = to_numpy(m.primary(out))
        vs = part.view_shape(x.shape)
        axes = part.axes(x.shape)
        return _np_moments_err(x.reshape(vs), y.reshape(vs), axes, eps, kind)

    return Invariant(f"{kind} moments over the partition", check, scale=64.0)


def scale_invariant(a: float = 3.5) -> Invariant:
    """Invariant (survey Eqn 32): scale invariance. With ε the identity is exact in the form
    f_ε(a·x) = f_{ε/a²}(x), since (a·x − a·μ)/√(a²σ² + ε) = (x − μ)/√(σ² + ε/a²)."""

    def check(m, xp, out, args, kwargs):
        b = m.bind(*args, **kwargs)
        eps = b.arguments["eps"]
        b.arguments[next(iter(b.arguments))] = args[0] * a
        y_scaled = m.primary(m(*b.args, **b.kwargs))
        b.arguments[next(iter(b.arguments))] = args[0]
        b.arguments["eps"] = eps / (a * a)
        y_ref = m.primary(m(*b.args, **b.kwargs))
        y1, y2 = to_numpy(y_ref), to_numpy(y_scaled)
        return float(_np.max(_np.abs(y1 - y2)) / max(1.0, float(_np.max(_np.abs(y1)))))

    return Invariant("scale invariance f_ε(a·x) = f_{ε/a²}(x)", check, scale=64.0)


def _plain(args, kwargs, names=("weight", "bias"), positions=(3, 4)):
    """True when no recovery parameter is given (positionally or by keyword)."""
    for n, i in zip(names, positions):
        if kwargs.get(n) is not None or (len(args) > i and args[i] is not None):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# batch normalization


def _ex_batch_norm(rng):
    for shape in [(8, 3), (4, 3, 5), (4, 3, 2, 3), (2, 2, 2, 3, 2)]:
        x = rng.standard_normal(shape) * 2.0 + 1.0
        c = shape[1]
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
        yield Example((x, None, None), dict(training=True), label=f"{shape} batch statistics, no affine")
        yield Example((x, rm, rv, w, b), dict(training=True, momentum=0.2), label=f"{shape} training, running update")
        yield Example((x, rm, rv, w, b), dict(training=False), label=f"{shape} inference (population statistics)")
    x = rng.standard_normal((4, 3, 5)) * 2.0 + 1.0
    yield Example((x, rng.standard_normal(3), rng.uniform(0.5, 2.0, 3), rng.standard_normal(3), rng.standard_normal(3)),
                  dict(training=True, momentum=0.01, running_var_unbiased=False),
                  label="(4, 3, 5) training, biased running variance (Flax/Keras)")


def _bn_partition(args, kwargs):
    if not kwargs.get("training") or not _plain(args, kwargs):
        return None
    return Partition("batch"), kwargs.get("eps", 1e-5)


@method(
    channels=("input", "out"),
    array_params=("input", "running_mean", "running_var", "weight", "bias"),
    nondiff=("running_mean", "running_var"),
    nullable=("running_mean", "running_var"),
    survey="§5.1.1 Eqns 17-19 (running statistics Eqn 18; population statistics §4 Eqn 16)",
    paper="Ioffe & Szegedy, Batch Normalization, ICML 2015",
    examples=_ex_batch_norm,
    invariants=(moment_invariant("standardizing", _bn_partition),),
)
def batch_norm(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: int | None = None,
    out: Any = None,
    sync: Any = None,
    running_var_unbiased: bool = True,
) -> Array | NormResult:
    """Batch normalization, with ``torch.nn.functional.batch_norm``'s arguments and results.

    y = γ·(x − μ_B)/√(σ_B² + ε) + β, statistics per channel over ``(N, *spatial)`` (Π_BN, survey Eqn 20),
    σ_B² biased. With ``training=False`` the running statistics are the population statistics
    (constants in the backward, survey Eqn 16). With ``training=True`` and running statistics the
    result is ``NormResult(output, running_mean, running_var)`` with
    running ← (1 − momentum)·running + momentum·batch statistic (Eqn 18; variance unbiased).

    ``sync``: a reducer (:mod:`normref.distributed`; e.g.
    ``normref.backends.distributed.torch.TorchReducer()``) makes the batch the union of every rank's
    ``input`` (synchronized BN, as torch's ``SyncBatchNorm``): in training μ_B, σ_B² are those of the
    global batch (Chan's pooled moments), every rank gets the same running statistics (the variance
    unbiased by the global count N), and the backward's mean(g), mean(g·x̂) are global. Per step:
    forward one all_gather of 2C + 1 values per rank ([n, μ, M2]), backward one all_reduce_sum of
    2C values ([Σg, Σg·x̂]). Per-rank batches may differ in size, a rank may hold 0 samples (its
    output is empty); dγ, dβ are this rank's part (sum them across ranks, as DDP does). Unused with
    ``training=False``.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``
        The running mean: the population mean used when ``training=False``; updated (in the result,
        not in place) when ``training=True``. ``None``: batch statistics only.
    running_var : array or None, shape ``(C,)``
        The running (unbiased) variance, as ``running_mean``.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Use the batch statistics (and update the running statistics, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average 1/(k + 1) with
        ``k = num_batches_tracked``.
    eps : float, default 1e-5
        ε, added to the variance.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    out : array or None, default None
        An optional NumPy/CuPy array of input's shape and dtype that receives the output.
    sync : reducer or None, default None
        A reducer (:mod:`normref.distributed`): synchronized batch normalization (see above).
    running_var_unbiased : bool, default True
        Update the running variance with the unbiased batch variance σ_B²·n/(n − 1) (torch's, the
        default) or, ``False``, with the biased σ_B² itself (Flax's ``nn.BatchNorm`` and Keras's
        ``BatchNormalization``). The output and the backward do not depend on it.

    Returns
    -------
    out : array or NormResult
        The output (input's shape and dtype), or ``NormResult(output, running_mean, running_var)``
        when ``training=True`` and running statistics are given.

    Notes
    -----
    Survey §5.1.1 (batch statistics over the whole mini-batch), Eqns 16, 18 and 20.

    Conventions: torch's running state is the default: ``momentum`` is the weight of the *new*
    batch statistic and the running variance is unbiased. Flax and Keras weight the *old* value by
    their ``momentum`` (default 0.99) and keep the biased variance: their
    ``BatchNorm(momentum=m)`` is ``batch_norm(..., momentum=1 - m, running_var_unbiased=False)``
    (the adapters ``normref.backends.flax.BatchNorm`` and ``normref.backends.keras.BatchNormalization``
    convert both). The paper (Ioffe & Szegedy 2015, Algorithm 2) uses the unbiased variance of the
    population estimate, as torch does.

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """
    fn = "batch_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    _check_out(fn, xp, input, out, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    _check_channels(fn, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    _check_nbt(fn, num_batches_tracked)
    if running_var_unbiased is not True:  # the default costs one identity test
        running_var_unbiased = check_bool(fn, "running_var_unbiased", running_var_unbiased)
    _running_pair(fn, running_mean, running_var)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    sync = check_reducer(fn, sync) if training else check_reducer(fn, sync) and None  # unused in inference
    shape = tuple(input.shape)
    part = Partition("batch")
    if training:
        if sync is None:  # synchronized: the global count is checked once gathered
            _check_training_count(fn, part, shape)
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when training=False; got None")
    if _is_empty(shape) and sync is None:
        return _empty_call(xp, input, (input, running_mean, running_var, weight, bias), out,
                           NormResult if training and running_mean is not None else None, (running_mean, running_var))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd, c = len(shape), shape[1]
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    if training:
        op: _op.Operation = _op.Standardizing(eps, sync)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, out=_kernel_out(out, input, cd))
    else:
        op = _op.PopulationStandardizing(eps)
        y, op_res, st = run_forward(
            xp, x, part, op, gamma, beta, out=_kernel_out(out, input, cd),
            mean=channel_param(xp, to_compute(xp, running_mean, cd), nd),
            var=channel_param(xp, to_compute(xp, running_var, cd), nd),
        )
    res = pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))
    y = _into(_out(xp, y, input.dtype), out)
    if training and running_mean is not None:
        n = st.get("count", part.count(shape))  # the global count when synchronized
        rm = _ema(xp, running_mean, _to_channels(xp, st["mean"], c), f)
        var_b = _to_channels(xp, st["var"], c)
        rv = _ema(xp, running_var, var_b * (n / (n - 1)) if running_var_unbiased else var_b, f)
        return NormResult(y, rm, rv), res
    return y, res


batch_norm.defbackward(_backward_for("x", None, None, "w", "b"))


# --------------------------------------------------------------------------------------------------
# instance normalization


def _ex_instance_norm(rng):
    for shape in [(2, 3, 5), (2, 3, 3, 4), (1, 2, 2, 2, 3)]:
        x = rng.standard_normal(shape) * 1.5 - 0.5
        c = shape[1]
        w, b = rng.standard_normal(c), rng.standard_normal(c)
        rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
        yield Example((x,), {}, label=f"{shape} no affine")
        yield Example((x, rm, rv, w, b), dict(use_input_stats=True, momentum=0.3), label=f"{shape} running update")
        yield Example((x, rm, rv, w, b), dict(use_input_stats=False), label=f"{shape} running statistics")


def _in_partition(args, kwargs):
    if not kwargs.get("use_input_stats", True) or not _plain(args, kwargs):
        return None
    return Partition("instance"), kwargs.get("eps", 1e-5)


@method(
    channels=("input", "out"),
    array_params=("input", "running_mean", "running_var", "weight", "bias"),
    nondiff=("running_mean", "running_var"),
    survey="§5.1.1 (Table 1: Π_IN ∈ R^{md×hw}, standardizing)",
    paper="Ulyanov, Vedaldi & Lempitsky, Instance Normalization, arXiv 2016",
    examples=_ex_instance_norm,
    invariants=(moment_invariant("standardizing", _in_partition),),
)
def instance_norm(
    input: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: int | None = None,
    out: Any = None,
) -> Array | NormResult:
    """Instance normalization, with ``torch.nn.functional.instance_norm``'s arguments and results.

    y = γ·(x − μ_nc)/√(σ_nc² + ε) + β, statistics per sample and channel over the spatial axes.
    With ``use_input_stats`` and running statistics, returns ``NormResult`` whose running statistics
    move toward the batch average of the instance statistics (variance unbiased over the spatial
    count), as torch does.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``, default None
        The running mean (used when ``use_input_stats=False``; updated when it is true).
    running_var : array or None, shape ``(C,)``, default None
        The running (unbiased) variance, as ``running_mean``.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    use_input_stats : bool, default True
        Use each instance's statistics (torch's argument); ``False``: the running statistics.
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average (see Notes).
    eps : float, default 1e-5
        ε, added to the variance.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    out : array or None, default None
        As in :func:`batch_norm`.

    Returns
    -------
    out : array or NormResult
        The output, or ``NormResult(output, running_mean, running_var)`` with ``use_input_stats`` and
        running statistics.

    Notes
    -----
    Survey §5.1.1 (Table 1: Π_IN with the standardizing operation).

    ``momentum=None`` diverges from torch on purpose: ``F.instance_norm`` refuses it (``TypeError``:
    momentum must be float) and ``nn.InstanceNorm*d(momentum=None, track_running_stats=True)``
    passes momentum 0.0, so its running statistics never move and ``num_batches_tracked`` stays 0
    (checked with torch 2.13). Here, as in :func:`batch_norm`, ``momentum=None`` is the cumulative
    average and needs ``num_batches_tracked``; pass ``momentum=0.0`` to reproduce torch's module.

    References
    ----------
    .. [1] D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance Normalization: The Missing Ingredient for
       Fast Stylization", arXiv:1607.08022, 2016.
    """
    fn = "instance_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    _check_out(fn, xp, input, out, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    _check_channels(fn, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    use_input_stats = check_bool(fn, "use_input_stats", use_input_stats)
    _check_nbt(fn, num_batches_tracked)
    _running_pair(fn, running_mean, running_var)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    shape = tuple(input.shape)
    part = Partition("instance")
    if use_input_stats:
        _check_training_count(fn, part, shape)
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are required when use_input_stats=False; got None")
    if _is_empty(shape):
        return _empty_call(xp, input, (input, running_mean, running_var, weight, bias), out,
                           NormResult if use_input_stats and running_mean is not None else None, (running_mean, running_var))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd, c = len(shape), shape[1]
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    if use_input_stats:
        op: _op.Operation = _op.Standardizing(eps)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, out=_kernel_out(out, input, cd))
    else:
        op = _op.PopulationStandardizing(eps)
        y, op_res, st = run_forward(
            xp, x, part, op, gamma, beta, out=_kernel_out(out, input, cd),
            mean=channel_param(xp, to_compute(xp, running_mean, cd), nd),
            var=channel_param(xp, to_compute(xp, running_var, cd), nd),
        )
    res = pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))
    y = _into(_out(xp, y, input.dtype), out)
    if use_input_stats and running_mean is not None:
        n = part.count(shape)
        mean_c = xp.mean(xp.reshape(st["mean"], (shape[0], c)), axis=0)
        var_c = xp.mean(xp.reshape(st["var"], (shape[0], c)), axis=0) * (n / (n - 1))
        return NormResult(y, _ema(xp, running_mean, mean_c, f), _ema(xp, running_var, var_c, f)), res
    return y, res


instance_norm.defbackward(_backward_for("x", None, None, "w", "b"))


# --------------------------------------------------------------------------------------------------
# layer normalization and RMS normalization (the layer partition over normalized_shape)


def _normalized_shape(fn, input, normalized_shape) -> tuple[int, ...]:
    # the common cases first (an int, a tuple of ints matching the trailing dimensions), no ABC checks
    t = type(normalized_shape)
    if t is int or (t is tuple and len(normalized_shape) == 1 and type(normalized_shape[0]) is int):
        d = normalized_shape if t is int else normalized_shape[0]
        shape = input.shape
        if shape and shape[-1] == d:
            return (d,)

    def _is_int(d):
        return isinstance(d, numbers.Integral) and not isinstance(d, bool)

    if _is_int(normalized_shape):
        ns: tuple[int, ...] = (int(normalized_shape),)
    elif isinstance(normalized_shape, (tuple, list)) and all(_is_int(d) for d in normalized_shape):
        ns = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(
            f"{fn}: normalized_shape must be an int or a tuple/list of ints; got {type(normalized_shape).__name__} "
            f"{normalized_shape!r}"
        )
    shape = tuple(input.shape)
    if len(ns) == 0 or len(ns) > len(shape) or shape[len(shape) - len(ns):] != ns:
        raise ValueError(
            f"{fn}: normalized_shape must equal the trailing dimensions of input; input has shape {shape}, "
            f"got normalized_shape={ns}"
        )
    return ns


def _ex_layer_norm(rng):
    for shape, k in [((7,), 1), ((3, 5), 1), ((2, 3, 4), 2), ((2, 2, 3, 2), 3), ((2, 1, 2, 2, 3), 2)]:
        x = rng.standard_normal(shape) * 3.0 + 2.0
        ns = shape[len(shape) - k:]
        w, b = rng.standard_normal(ns), rng.standard_normal(ns)
        yield Example((x, ns), {}, label=f"{shape} normalized {ns}")
        yield Example((x, ns, w, b), {}, label=f"{shape} normalized {ns}, affine")


def _ln_partition(args, kwargs):
    if not _plain(args, kwargs, positions=(2, 3)):
        return None
    ns = args[1]
    k = 1 if isinstance(ns, int) else len(ns)
    return Partition("layer", normalized_ndim=k), kwargs.get("eps", 1e-5)


@method(
    array_params=("input", "weight", "bias"),
    survey="§5.1.1 (Table 1: Π_LN ∈ R^{m×dhw}, standardizing)",
    paper="Ba, Kiros & Hinton, Layer Normalization, arXiv 2016",
    examples=_ex_layer_norm,
    invariants=(moment_invariant("standardizing", _ln_partition), scale_invariant()),
)
def layer_norm(
    input: Any, normalized_shape: int | Sequence[int], weight: Any = None, bias: Any = None, eps: float = 1e-5,
    *, out: Any = None,
) -> Array:
    """Layer normalization, with ``torch.nn.functional.layer_norm``'s arguments and results.

    y = γ ⊙ (x − μ)/√(σ² + ε) + β, statistics per sample over the trailing ``normalized_shape``
    dimensions; γ, β have ``normalized_shape``.

    Parameters
    ----------
    input : array, shape ``(N, *, *normalized_shape)``
        The input.
    normalized_shape : int or sequence of int
        The trailing dimensions the statistics run over.
    weight : array or None, shape ``normalized_shape``, default None
        γ (``None``: 1).
    bias : array or None, shape ``normalized_shape``, default None
        β (``None``: 0).
    eps : float, default 1e-5
        ε, added to the variance.
    out : array or None, default None
        As in :func:`batch_norm`.

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.1 (Table 1: Π_LN with the standardizing operation).

    References
    ----------
    .. [1] J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """
    fn = "layer_norm"
    xp = namespace(fn, input=input, weight=weight, bias=bias)
    _check_out(fn, xp, input, out, weight=weight, bias=bias)
    ns = _normalized_shape(fn, input, normalized_shape)
    check_param_shape(fn, "weight", weight, ns, "normalized_shape")
    check_param_shape(fn, "bias", bias, ns, "normalized_shape")
    eps = _eps(fn, xp, input, eps)
    if _is_empty(input.shape):
        return _empty_call(xp, input, (input, weight, bias), out)
    part = _cached_partition("layer", normalized_ndim=len(ns))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    gamma, beta = to_compute(xp, weight, cd), to_compute(xp, bias, cd)
    op = _op.cached(_op.Standardizing, eps)
    y, op_res, _ = run_forward(xp, x, part, op, gamma, beta, out=_kernel_out(out, input, cd))
    return _into(_out(xp, y, input.dtype), out), pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))


layer_norm.defbackward(_backward_for("x", "w", "b"))


# --------------------------------------------------------------------------------------------------
# convention variants (issue 15 §1): operations of the authors' code that differ from the framework
# defaults. Each is its own type, so normref.operation.fused_forward/fused_backward (which take the
# numba kernels for exactly Standardizing, Scaling and PopulationStandardizing) never see them: the
# formula below runs, whatever the input size.


@dataclasses.dataclass(frozen=True)
class _BesselStandardizing(_op._ShiftScale):
    """x̂ = (x − μ)/√(s² + ε), s² = n/(n − 1)·σ² the unbiased variance over the n elements of a
    statistic (``torch.var``'s default, used by the PONO, U-GAT-IT and SN authors' code).

    Forward: s² + ε = (n/(n − 1))·(σ² + ε·(n − 1)/n), so r = (s² + ε)^-½ is the overflow-safe
    ``_rsqrt`` of the biased form with ε·(n − 1)/n, times √((n − 1)/n).

    Backward (g = ∂L/∂x̂, means over the n elements): ∂μ/∂x_j = 1/n, ∂s²/∂x_j = 2(x_j − μ)/(n − 1), so
        ∂L/∂x_j = r·(g_j − mean g) − r³·(x_j − μ)/(n − 1)·Σ_i g_i(x_i − μ)
                = r·(g_j − mean(g) − x̂_j·mean(g·x̂)·n/(n − 1)),
    the biased standardizing backward with its last term scaled by n/(n − 1).
    Residuals (x, μ, r) as :class:`normref.operation.Standardizing`'s."""

    eps: float = 1e-5
    name = "standardizing_unbiased"

    def forward(self, xp, x, axes):
        n = _op._count(x, axes)
        k = (n - 1) / n
        mu, var = _op.moments(xp, x, axes)
        rstd = _op._rsqrt(xp, var, self.eps * k, lambda: x - mu, axes) * math.sqrt(k)
        return (x - mu) * rstd, (x, mu, rstd), {"mean": mu, "var": var}

    def backward(self, xp, res, axes, g):
        n = _op._count(res[0], axes)
        rstd = res[2]
        xhat = self.xhat(xp, res)
        return rstd * (g - _op._mean(xp, g, axes) - xhat * (_op._mean(xp, g * xhat, axes) * (n / (n - 1))))


@dataclasses.dataclass(frozen=True)
class _ScalingOutside(_op._ShiftScale):
    """RMSNorm as its authors wrote it (Zhang & Sennrich 2019, their code): x̂ = x/(ρ + ε),
    ρ = √mean(x²), ε *outside* the root.

    Forward: ρ from the formula (no kernel), rescaled by an exact power of two q = 2^⌊log2 max|x|⌋
    where mean(x²) overflows but x is finite (ρ(x) = q·ρ(x/q)).

    Backward (g = ∂L/∂x̂, r = 1/(ρ + ε)): ∂ρ/∂x_j = x_j/(n·ρ), ∂r/∂x_j = −r²·x_j/(n·ρ), so
        ∂L/∂x_j = r·g_j − r²·x_j·mean(g·x)/ρ = r·g_j − x̂_j·mean(g·x̂)/ρ      (x = x̂/r);
    at ρ = 0 (an all-zero row) x̂ = 0 and the second term is 0 (the one-sided limit is not used).
    Residuals (x, None, r, ρ)."""

    eps: float = 1e-8
    name = "scaling_eps_outside"

    def forward(self, xp, x, axes):
        ms = _op._mean(xp, x * x, axes)
        rho = xp.sqrt(ms)
        over = xp.isinf(ms)
        if _op._any_or_traced(xp, over):
            m = xp.max(xp.abs(x), axis=axes, keepdims=True)
            ok = over & xp.isfinite(m) & (m > 0)
            q = 2.0 ** xp.floor(xp.log2(xp.where(ok, m, xp.ones_like(m))))
            rho = xp.where(ok, q * xp.sqrt(_op._mean(xp, (x / q) * (x / q), axes)), rho)
        r = 1.0 / (rho + self.eps)
        return x * r, (x, None, r, rho), {"mean_square": ms}

    def backward(self, xp, res, axes, g):
        r, rho = res[2], res[3]
        xhat = self.xhat(xp, res)
        safe = xp.where(rho > 0, rho, xp.ones_like(rho))
        return r * g - xhat * (_op._mean(xp, g * xhat, axes) / safe)


@dataclasses.dataclass(frozen=True)
class _PopulationReciprocal(_op._ShiftScale):
    """x̂ = (x − μ̂)·r̂ with a given reciprocal scale r̂ (constants): dx = g·r̂. The inference of
    ``lp_batch_norm(running_scale_kind="reciprocal")`` (the Norm-matters authors keep 1/scale) and of
    ``batch_renorm(running_stat="std")`` (r̂ = 1/σ)."""

    name = "population_reciprocal"

    def forward(self, xp, x, axes, mean, inv):
        return (x - mean) * inv, (x, mean, inv), {}

    def backward(self, xp, res, axes, g):
        return g * res[2]


def _ex_rms_norm(rng):
    for shape, k in [((6,), 1), ((3, 5), 1), ((2, 3, 4), 2), ((2, 2, 2, 3, 2), 1)]:
        x = rng.standard_normal(shape) + 0.5
        ns = shape[len(shape) - k:]
        yield Example((x, ns), dict(eps=1e-6), label=f"{shape} normalized {ns}")
        yield Example((x, ns, rng.standard_normal(ns)), {}, label=f"{shape} normalized {ns}, weight, eps=None")
    # after the loop: the draws above (the other examples' data) stay as they were
    for shape, k in [((3, 5), 1), ((2, 3, 4), 2)]:
        x = rng.standard_normal(shape) + 0.5
        ns = shape[len(shape) - k:]
        yield Example((x, ns, rng.standard_normal(ns)), dict(eps=1e-3, eps_placement="outside"),
                      label=f"{shape} normalized {ns}, weight, eps outside the root (the authors' code)")


def _rms_partition(args, kwargs):
    if kwargs.get("weight") is not None or (len(args) > 2 and args[2] is not None):
        return None
    if kwargs.get("eps_placement", "inside") != "inside":
        return None  # mean(x̂²) = ρ²/(ρ + ε)², not the invariant's ms/(ms + ε)
    ns = args[1]
    eps = kwargs.get("eps")
    if eps is None:  # the compute dtype's epsilon: float32's for half inputs
        dt = to_numpy(args[0]).dtype
        eps = float(_np.finfo(_np.float64 if dt == _np.float64 else _np.float32).eps)
    return Partition("layer", normalized_ndim=1 if isinstance(ns, int) else len(ns)), eps


@method(
    array_params=("input", "weight"),
    survey="§5.1.2 (scaling only over Π_LN: root mean square LN; Table 1)",
    paper="Zhang & Sennrich, Root Mean Square Layer Normalization, NeurIPS 2019",
    examples=_ex_rms_norm,
    invariants=(moment_invariant("scaling", _rms_partition),),
)
def rms_norm(
    input: Any, normalized_shape: int | Sequence[int], weight: Any = None, eps: float | None = None,
    *, out: Any = None, eps_placement: str = "inside",
) -> Array:
    """RMS normalization, with ``torch.nn.functional.rms_norm``'s arguments and results.

    y = γ ⊙ x/√(mean(x²) + ε) over the trailing ``normalized_shape`` dimensions (survey Table 1:
    Π_LN with the scaling operation); with ``eps_placement="outside"``,
    y = γ ⊙ x/(√mean(x²) + ε) (the RMSNorm authors' code).

    Parameters
    ----------
    input : array, shape ``(N, *, *normalized_shape)``
        The input.
    normalized_shape : int or sequence of int
        The trailing dimensions the mean of squares runs over.
    weight : array or None, shape ``normalized_shape``, default None
        γ (``None``: 1).
    eps : float or None, default None
        ε; ``None`` means the machine epsilon of the dtype the statistics are computed in, as in torch:
        ``finfo(float32).eps`` for float16/bfloat16 inputs (they accumulate in float32),
        ``finfo(dtype).eps`` for float32 and float64 (torch 2.13:
        ``F.rms_norm(x16, s) == F.rms_norm(x16.float(), s, eps=finfo(float32).eps).half()``).
    out : array or None, default None
        As in :func:`batch_norm`.
    eps_placement : {"inside", "outside"}, default "inside"
        Where ε goes: ``"inside"`` the root, x/√(mean(x²) + ε) (torch's ``F.rms_norm``, the default);
        ``"outside"``, x/(RMS(x) + ε) (Zhang & Sennrich's released code, with ε = 1e-8 there: pass
        ``eps=1e-8`` to reproduce it). The outside form always runs the array-API formula (never a
        kernel); its backward is dx = r·g − x̂·mean(g·x̂)/RMS(x), r = 1/(RMS(x) + ε).

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.2 (Table 1: Π_LN with the scaling operation).

    Conventions: ε inside the root (torch) is the default; the authors' ε outside the root is
    ``eps_placement="outside"``. The paper's equation has no ε at all; both forms tend to it as ε → 0.

    References
    ----------
    .. [1] B. Zhang and R. Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """
    fn = "rms_norm"
    outside = eps_placement != "inside" and _check_convention(fn, "eps_placement", eps_placement,
                                                              ("inside", "outside")) == "outside"
    xp = namespace(fn, input=input, weight=weight)
    _check_out(fn, xp, input, out, weight=weight)
    ns = _normalized_shape(fn, input, normalized_shape)
    check_param_shape(fn, "weight", weight, ns, "normalized_shape")
    cd = compute_dtype(xp, input.dtype)
    eps = finfo_eps(xp, cd) if eps is None else _eps(fn, xp, input, eps)
    if _is_empty(input.shape):
        return _empty_call(xp, input, (input, weight), out)
    part = Partition("layer", normalized_ndim=len(ns))
    x = to_compute(xp, input, cd)
    gamma = to_compute(xp, weight, cd)
    op = _ScalingOutside(eps) if outside else _op.Scaling(eps)
    y, op_res, _ = run_forward(xp, x, part, op, gamma, None, out=_kernel_out(out, input, cd))
    return _into(_out(xp, y, input.dtype), out), pack(part, op, x, op_res, gamma, None, extra=_shapes(weight, None))


rms_norm.defbackward(_backward_for("x", "w"))


# --------------------------------------------------------------------------------------------------
# group normalization and batch-group normalization


def _ex_group_norm(rng):
    for shape, g in [((2, 6), 3), ((2, 6, 4), 2), ((3, 4, 2, 3), 4), ((2, 6, 2, 2, 2), 1)]:
        x = rng.standard_normal(shape) - 1.0
        c = shape[1]
        yield Example((x, g), {}, label=f"{shape} G={g}")
        yield Example((x, g, rng.standard_normal(c), rng.standard_normal(c)), dict(eps=1e-3), label=f"{shape} G={g}, affine")


def _gn_partition(args, kwargs):
    if not _plain(args, kwargs, positions=(2, 3)):
        return None
    return Partition("group", num_groups=args[1]), kwargs.get("eps", 1e-5)


def _group_like(fn, input, weight, bias, eps, part, out=None, count_what=None, sync=None, unbiased=False):
    xp = namespace(fn, input=input, weight=weight, bias=bias)
    _check_out(fn, xp, input, out, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    part.validate(fn, tuple(input.shape))
    if count_what is not None and sync is None:  # statistics over the batch: one value per statistic is an error
        _check_training_count(fn, part, tuple(input.shape), count_what)
    _check_channels(fn, input, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    if _is_empty(input.shape) and sync is None:
        return _empty_call(xp, input, (input, weight, bias), out)
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = input.ndim
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    op = _BesselStandardizing(eps) if unbiased else _op.Standardizing(eps, sync)
    y, op_res, _ = run_forward(xp, x, part, op, gamma, beta, out=_kernel_out(out, input, cd))
    return _into(_out(xp, y, input.dtype), out), pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))


@method(
    channels=("input", "out"),
    array_params=("input", "weight", "bias"),
    survey="§5.1.1 (Table 1: Π_GN ∈ R^{mg×shw}, standardizing)",
    paper="Wu & He, Group Normalization, ECCV 2018",
    examples=_ex_group_norm,
    invariants=(moment_invariant("standardizing", _gn_partition), scale_invariant()),
)
def group_norm(
    input: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5, *, out: Any = None
) -> Array:
    """Group normalization, with ``torch.nn.functional.group_norm``'s arguments and results.

    The C channels are split into ``num_groups`` groups; y = γ·(x − μ_ng)/√(σ_ng² + ε) + β with
    statistics per sample and group over ``(C/G, *spatial)``.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    num_groups : int
        G, which must divide C.
    weight : array or None, shape ``(C,)``, default None
        γ per channel (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β per channel (``None``: 0).
    eps : float, default 1e-5
        ε, added to the variance.
    out : array or None, default None
        As in :func:`batch_norm`.

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.1 (Table 1: Π_GN with the standardizing operation).

    References
    ----------
    .. [1] Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """
    fn = "group_norm"
    num_groups = check_int(fn, "num_groups", num_groups)
    return _group_like(fn, input, weight, bias, eps, Partition("group", num_groups=num_groups), out)


group_norm.defbackward(_backward_for("x", "w", "b"))


def _ex_batch_group_norm(rng):
    x = rng.standard_normal((4, 6, 3, 2))
    yield Example((x, 3), dict(batch_groups=2), label="G=3, 2 batch groups")
    yield Example((x, 2, rng.standard_normal(6), rng.standard_normal(6)), dict(batch_groups=1), label="G=2, whole batch, affine")
    yield Example((rng.standard_normal((6, 4)), 2), dict(batch_groups=3), label="2-D")
    w, b, rm, rv = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(6), rng.uniform(0.5, 2.0, 6)
    yield Example((x, 3, w, b), dict(batch_groups=2, running_mean=rm, running_var=rv, momentum=0.3),
                  label="G=3, 2 batch groups, running update")
    yield Example((x, 3, w, b), dict(batch_groups=2, running_mean=rm, running_var=rv, training=False),
                  label="inference (population statistics)")
    yield Example((x, 2, w, b), dict(batch_groups=1, running_mean=rm, running_var=rv, momentum=0.3),
                  label="G=2, whole batch, running update")


def _batch_stats_only(inv: Invariant) -> Invariant:
    """``inv`` for the calls with batch statistics only (population statistics are not scale invariant)."""

    def check(m, xp, out, args, kwargs):
        return None if kwargs.get("training", True) is False else inv.check(m, xp, out, args, kwargs)

    return Invariant(inv.name, check, inv.scale)


def _bgn_partition(args, kwargs):
    if not _plain(args, kwargs, positions=(2, 3)):
        return None
    return Partition("batch_group", num_groups=args[1], batch_groups=kwargs.get("batch_groups", 1)), kwargs.get("eps", 1e-5)


@method(
    channels=("input",),
    array_params=("input", "weight", "bias", "running_mean", "running_var"),
    nondiff=("running_mean", "running_var"),
    survey="§5.1.1 (Table 1: Π_BGN ∈ R^{g_m g×s_m s hw}, standardizing; running statistics Eqn 18)",
    paper="Zhou et al., Towards Stabilizing Batch Statistics in Backward Propagation of BN (BGN), ICLR 2020",
    examples=_ex_batch_group_norm,
    invariants=(moment_invariant("standardizing", _bgn_partition), _batch_stats_only(scale_invariant())),
)
def batch_group_norm(
    input: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5, *, batch_groups: int = 1,
    sync: Any = None, running_mean: Any = None, running_var: Any = None, training: bool = True,
    momentum: float | None = 0.1, num_batches_tracked: int | None = None,
) -> Array | NormResult:
    """Batch group normalization: statistics per group of C/G channels *and* group of N/Gb samples.

    The view ``(Gb, N/Gb, G, C/G, *spatial)`` is standardized over ``(N/Gb, C/G, *spatial)``; γ, β per
    channel. ``batch_groups=1`` pools the whole batch (the paper's setting). In training (the default)
    the statistics come from the batch, so, like :func:`batch_norm` in training, a partition that
    leaves one value per statistic raises ``ValueError``.

    Running statistics (keywords; the paper evaluates with them, as BN): with ``running_mean`` and
    ``running_var`` (C,) a training call returns ``NormResult(output, running_mean, running_var)`` with
    s ← (1 − momentum)·s + momentum·s_B (Eqn 18; ``momentum=None``: the cumulative
    average over ``num_batches_tracked`` batches), s_B the batch statistic of each channel's group
    averaged over the batch groups, the variance unbiased by n/(n − 1), n = N/Gb·C/G·∏spatial;
    ``training=False`` standardizes each channel by them (population statistics, constants in the
    backward). This is :func:`normref.batch_normalize` with ``partition="batch_group"``.

    ``sync`` (a reducer, :mod:`normref.distributed`): each batch group spans the ranks — batch group
    j is the union of every rank's j-th chunk of N_r/Gb consecutive samples (each rank's batch split
    as without sync), and its statistics are pooled over the ranks (Chan). With ``batch_groups=1``
    this is the whole global batch, as the paper's BGN. Per step: forward one all_gather of
    2·Gb·G + 1 values, backward one all_reduce_sum of 2·Gb·G values. Ranks may hold different
    batch sizes (each divisible by ``batch_groups``), also 0.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    num_groups : int
        G, the channel groups (divides C).
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    eps : float, default 1e-5
        ε, added to the variance.
    batch_groups : int, default 1
        Gb, the batch groups (divides N).
    sync : reducer or None, default None
        A reducer (:mod:`normref.distributed`): batch groups across ranks (see above).
    running_mean : array or None, shape ``(C,)``, default None
        The running mean (see above).
    running_var : array or None, shape ``(C,)``, default None
        The running (unbiased) variance.
    training : bool, default True
        Batch statistics (``True``) or the running statistics (``False``).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).

    Returns
    -------
    out : array or NormResult
        The output, or ``NormResult(output, running_mean, running_var)`` in training with running
        statistics.

    Notes
    -----
    Survey §5.1.1 (batch group partition), Eqn 18.

    References
    ----------
    .. [1] X.-Y. Zhou, J. Sun, N. Ye, X. Lan, Q. Luo, B.-L. Lai, P. Esperanca, G.-Z. Yang and Z. Li,
       "Batch Group Normalization", ICLR 2020 (submission; arXiv:2012.02782).
    """
    fn = "batch_group_norm"
    num_groups = check_int(fn, "num_groups", num_groups)
    batch_groups = check_int(fn, "batch_groups", batch_groups)
    sync = check_reducer(fn, sync)
    part = Partition("batch_group", num_groups=num_groups, batch_groups=batch_groups)
    training = check_bool(fn, "training", training)
    momentum = check_momentum(fn, momentum)
    _check_nbt(fn, num_batches_tracked)
    if running_mean is not None or running_var is not None or not training:
        return _bgn_running(fn, input, part, weight, bias, eps, sync, running_mean, running_var, training,
                            momentum, num_batches_tracked)
    return _group_like(fn, input, weight, bias, eps, part,
                       count_what="statistic (N/batch_groups samples × C/num_groups channels × spatial "
                                  "positions; statistics always come from the batch)", sync=sync)


batch_group_norm.defbackward(_backward_for("x", "w", "b", None, None))


def _bgn_running(fn, input, part, weight, bias, eps, sync, running_mean, running_var, training, momentum, nbt):
    """batch_group_norm with running statistics (training update or inference): the framework's
    :func:`normref.framework.running_call` on the batch-group partition, standardizing, affine."""
    from .framework import RunningResult, running_call

    xp = namespace(fn, input=input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    # at inference each sample is normalized alone by per-channel statistics: N need not split into
    # batch groups (one sample is fine); the channels must split into the groups
    (part if training else Partition("batch_group", num_groups=part.num_groups)).validate(fn, tuple(input.shape))
    _check_channels(fn, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _running_pair(fn, running_mean, running_var)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    eps = _eps(fn, xp, input, eps)
    if not training:
        if running_mean is None:
            raise ValueError(f"{fn}: running_mean and running_var are required when training=False; got None")
        sync = None  # population statistics: nothing to synchronize
    elif sync is None:
        _check_training_count(fn, part, tuple(input.shape), "statistic (N/batch_groups samples × C/num_groups "
                                                            "channels × spatial positions) when training")
    f = _factor(fn, momentum, nbt) if training else None
    if _is_empty(input.shape) and sync is None:  # empty output, state unchanged, zero parameter gradients
        return _empty_call(xp, input, (input, weight, bias, running_mean, running_var), None,
                           NormResult if training else None, (running_mean, running_var))
    out, res = running_call(fn, xp, input, part, "standardizing", "affine", weight, bias, training, f, eps,
                            running_mean, running_var, None, sync=sync)
    # as batch_norm: NormResult(output, running_mean, running_var) (no mean square field)
    return (NormResult(out.output, out.running_mean, out.running_var) if isinstance(out, RunningResult) else out), res


# --------------------------------------------------------------------------------------------------
# position normalization and pixel normalization (the position partition)


def _ex_position(rng):
    for shape in [(2, 5), (2, 4, 3), (2, 3, 2, 3)]:
        x = rng.standard_normal(shape) * 2.0
        yield Example((x,), {}, label=f"{shape}")
        yield Example((x, rng.standard_normal(shape[1]), rng.standard_normal(shape[1])), {}, label=f"{shape} affine")
    for shape in [(2, 5), (2, 3, 2, 3)]:  # after the loop: the examples above keep their data
        x = rng.standard_normal(shape) * 2.0
        yield Example((x, rng.standard_normal(shape[1]), rng.standard_normal(shape[1])), dict(unbiased=True),
                      label=f"{shape} affine, unbiased variance (the authors' PyTorch code)")


def _pn_partition(args, kwargs):
    if not _plain(args, kwargs, positions=(1, 2)) or kwargs.get("unbiased"):
        return None
    return Partition("position"), kwargs.get("eps", 1e-5)


@method(
    channels=("input",),
    array_params=("input", "weight", "bias"),
    survey="§5.1.1 (Table 1: Π_PN ∈ R^{mhw×d}, standardizing)",
    paper="Li et al., Positional Normalization, NeurIPS 2019",
    examples=_ex_position,
    invariants=(moment_invariant("standardizing", _pn_partition), scale_invariant()),
)
def position_norm(input: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5, *,
                  unbiased: bool = False) -> Array:
    """Positional normalization (PONO): standardize each sample's channel vector at every position.

    y = γ·(x − μ_nhw)/√(σ_nhw² + ε) + β with μ, σ² over the C channels; σ² biased, as in the paper's
    equation (Li et al. 2019, Eqn 1) and its TensorFlow code (``tf.nn.moments``); ``unbiased=True``
    gives σ² = Σ_c(x − μ)²/(C − 1) as in the authors' PyTorch code (``x.var(dim=1)``, ε inside the
    root, github.com/Boyiliee/PONO ``pono_ms_torch.py``).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    eps : float, default 1e-5
        ε, added to the variance.
    unbiased : bool, default False
        Divide the sum of squares by C − 1 instead of C (needs C ≥ 2). Backward:
        dx = r·(g − mean(g) − x̂·mean(g·x̂)·C/(C − 1)) over the channels, r = (σ²_u + ε)^-½.

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.1 (Table 1: Π_PN, the position partition, with the standardizing operation).

    Conventions: the biased variance (the paper's equation, the authors' TensorFlow code) is the
    default; ``unbiased=True`` gives the authors' PyTorch code's ``torch.var`` (unbiased) variance.

    References
    ----------
    .. [1] B. Li, F. Wu, K. Q. Weinberger and S. Belongie, "Positional Normalization", NeurIPS 2019.
    """
    fn = "position_norm"
    unbiased = check_bool(fn, "unbiased", unbiased)
    if unbiased and len(getattr(input, "shape", ())) >= 2 and int(input.shape[1]) == 1:
        raise ValueError(f"{fn}: unbiased=True divides by C - 1 and needs at least 2 channels; "
                         f"got input of shape {tuple(input.shape)}")
    return _group_like(fn, input, weight, bias, eps, Partition("position"), unbiased=unbiased)


position_norm.defbackward(_backward_for("x", "w", "b"))


def _ex_pixel(rng):
    for shape in [(2, 5), (2, 4, 3), (2, 3, 2, 3)]:
        yield Example((rng.standard_normal(shape),), {}, label=f"{shape}")
    yield Example((rng.standard_normal((2, 3, 2)),), dict(eps=1e-3), label="eps=1e-3")


def _pixel_partition(args, kwargs):
    return Partition("position"), kwargs.get("eps", 1e-8)


@method(
    channels=("input",),
    array_params=("input",),
    survey="§5.1.2 (scaling only over Π_PN ∈ R^{mhw×d}; Table 1)",
    paper="Karras et al., Progressive Growing of GANs, ICLR 2018",
    examples=_ex_pixel,
    invariants=(moment_invariant("scaling", _pixel_partition),),
)
def pixel_norm(input: Any, eps: float = 1e-8) -> Array:
    """Pixelwise feature vector normalization: y = x/√(mean_C(x²) + ε), ε = 1e-8 as in the paper.

    The mean of squares runs over the C channels at each sample and position (the position partition
    with the scaling operation).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    eps : float, default 1e-8
        ε, added to the mean of squares.

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.2 (Table 1: the position partition with the scaling operation); the paper's equation is
    in its §4.2.

    References
    ----------
    .. [1] T. Karras, T. Aila, S. Laine and J. Lehtinen, "Progressive Growing of GANs for Improved
       Quality, Stability, and Variation", ICLR 2018 (ProGAN), Eqn of §4.2.
    """
    fn = "pixel_norm"
    xp = namespace(fn, input=input)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    eps = _eps(fn, xp, input, eps)
    if _is_empty(input.shape):
        return _empty_call(xp, input, (input,))
    part = Partition("position")
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    op = _op.Scaling(eps)
    y, op_res, _ = run_forward(xp, x, part, op)
    return _out(xp, y, input.dtype), pack(part, op, x, op_res, None, None, extra=(None, None))


pixel_norm.defbackward(_backward_for("x"))


# --------------------------------------------------------------------------------------------------
# mean-only batch normalization


def _ex_mean_only(rng):
    x = rng.standard_normal((4, 3, 2, 2)) + 3.0
    yield Example((x,), dict(training=True), label="batch statistics")
    yield Example((x, rng.standard_normal(3), rng.standard_normal(3)), dict(training=True, momentum=0.5), label="running update, bias")
    yield Example((x, rng.standard_normal(3), rng.standard_normal(3)), dict(training=False), label="inference")


def _mo_partition(args, kwargs):
    if not kwargs.get("training") or not _plain(args, kwargs, names=("bias",), positions=(2,)):
        return None
    return Partition("batch"), 0.0


@method(
    channels=("input",),
    array_params=("input", "running_mean", "bias"),
    nondiff=("running_mean",),
    survey="§5.1.1 (Table 1: Π_BN, centering)",
    paper="Salimans & Kingma, Weight Normalization, NeurIPS 2016 (mean-only BN)",
    examples=_ex_mean_only,
    invariants=(moment_invariant("centering", _mo_partition),),
)
def mean_only_batch_norm(
    input: Any,
    running_mean: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
) -> Array | MeanOnlyResult:
    """Mean-only batch normalization: y = x − μ_B + β (centering over Π_BN, no scaling).

    Used with weight normalization, which fixes the scale (Salimans & Kingma, NeurIPS 2016). At
    inference the running mean replaces μ_B; with ``training=True`` and a running mean, returns
    ``MeanOnlyResult(output, running_mean)``.

    ``sync`` (a reducer, :mod:`normref.distributed`): μ_B over every rank's batch (and the same running
    mean on every rank); per step forward one all_gather of C + 1 values ([n, μ]), backward one
    all_reduce_sum of C values (Σg). Ranks may hold different batch sizes, also 0; unused in
    inference.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``, default None
        The running mean (used at inference; updated in training).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Use the batch mean (and update the running mean, if given).
    momentum : float or None, default 0.1
        The running-mean factor; ``None``: the cumulative average over ``num_batches_tracked``.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (:mod:`normref.distributed`): the batch mean over every rank (see above).

    Returns
    -------
    out : array or MeanOnlyResult
        The output, or ``MeanOnlyResult(output, running_mean)`` with ``training=True`` and a running mean.

    Notes
    -----
    Survey §5.1.1 (Table 1: Π_BN with the centering operation).

    References
    ----------
    .. [1] T. Salimans and D. P. Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate
       Training of Deep Neural Networks", NeurIPS 2016.
    """
    fn = "mean_only_batch_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    _check_channels(fn, input, running_mean=running_mean, bias=bias)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    _check_nbt(fn, num_batches_tracked)
    sync = check_reducer(fn, sync) if training else check_reducer(fn, sync) and None  # unused in inference
    shape, part = tuple(input.shape), Partition("batch")
    if training:
        if sync is None:
            _check_training_count(fn, part, shape)
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean is required when training=False; got None")
    if _is_empty(shape) and sync is None:
        return _empty_call(xp, input, (input, running_mean, bias), None,
                           MeanOnlyResult if training and running_mean is not None else None, (running_mean,))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = len(shape)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    if training:
        op: _op.Operation = _op.Centering(sync=sync)
        y, op_res, st = run_forward(xp, x, part, op, None, beta)
    else:
        # x − μ̂ is standardizing by population statistics with σ̂² + ε = 1
        op = _op.PopulationStandardizing(eps=1.0)
        rm = channel_param(xp, to_compute(xp, running_mean, cd), nd)
        y, op_res, st = run_forward(xp, x, part, op, None, beta, mean=rm, var=xp.zeros_like(rm))
    res = pack(part, op, x, op_res, None, beta, extra=(None, None if bias is None else tuple(bias.shape)))
    y = _out(xp, y, input.dtype)
    if training and running_mean is not None:
        return MeanOnlyResult(y, _ema(xp, running_mean, _to_channels(xp, st["mean"], shape[1]), f)), res
    return y, res


mean_only_batch_norm.defbackward(_backward_for("x", None, "b"))


# --------------------------------------------------------------------------------------------------
# filter response normalization (+ TLU)


def _ex_frn(rng):
    for shape in [(2, 3, 4), (2, 3, 3, 2)]:
        x = rng.standard_normal(shape)
        c = shape[1]
        yield Example((x,), {}, label=f"{shape} plain")
        yield Example((x, rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c) * 0.3), {}, label=f"{shape} affine + TLU")


def _frn_partition(args, kwargs):
    if len(args) > 1 or any(kwargs.get(k) is not None for k in ("weight", "bias", "tau")):
        return None
    return Partition("instance"), kwargs.get("eps", 1e-6)


@method(
    channels=("input",),
    array_params=("input", "weight", "bias", "tau"),
    survey="§5.1.2 (scaling only over Π_IN; NRR affine + thresholded linear unit)",
    paper="Singh & Krishnan, Filter Response Normalization Layer, CVPR 2020",
    examples=_ex_frn,
    invariants=(moment_invariant("scaling", _frn_partition),),
)
def filter_response_norm(input: Any, weight: Any = None, bias: Any = None, tau: Any = None, eps: float = 1e-6) -> Array:
    """Filter response normalization with optional TLU.

    ν² = mean_{H,W}(x²), x̂ = x/√(ν² + ε), y = γ·x̂ + β, and with ``tau`` (per channel) the thresholded
    linear unit z = max(y, τ). ε = 1e-6 as in the paper (fixed here, not learned).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    tau : array or None, shape ``(C,)``, default None
        τ of the TLU (``None``: no TLU).
    eps : float, default 1e-6
        ε, added to ν².

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.2 (Table 1: Π_IN with the scaling operation).

    References
    ----------
    .. [1] S. Singh and S. Krishnan, "Filter Response Normalization Layer: Eliminating Batch Dependence
       in the Training of Deep Neural Networks", CVPR 2020.
    """
    fn = "filter_response_norm"
    xp = namespace(fn, input=input, weight=weight, bias=bias, tau=tau)
    check_ndim(fn, "input", input, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    _check_channels(fn, input, weight=weight, bias=bias, tau=tau)
    eps = _eps(fn, xp, input, eps)
    if _is_empty(input.shape):
        return _empty_call(xp, input, (input, weight, bias, tau))
    part = Partition("instance")
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = input.ndim
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    t = channel_param(xp, to_compute(xp, tau, cd), nd)
    op = _op.Scaling(eps)
    y, op_res, _ = run_forward(xp, x, part, op, gamma, beta)
    extra_arrays: tuple[Any, ...] = ()
    if t is not None:
        # Residuals stay minimal: the backward's mask [γ·x̂ + β ≥ τ] is recomputed from x̂ and the
        # per-channel β, τ (no full-size pre-TLU copy). The forward's TLU applies the same
        # elementwise formula to the same x̂, so at a tie y = τ both sides pick the same branch.
        extra_arrays = (beta, t)
        y = tlu_forward(xp, affine_forward(xp, part.unview(xp, op.xhat(xp, op_res), tuple(input.shape)), gamma, beta), t)
    res = pack(part, op, x, op_res, gamma, beta, extra_arrays=extra_arrays,
               extra=_shapes(weight, bias) + (None if tau is None else tuple(tau.shape),))
    return _out(xp, y, input.dtype), res


@filter_response_norm.defbackward
def _frn_backward(res: Residuals, g):
    xp = namespace("filter_response_norm.backward", cotangent=g)
    plan = res.static
    extra_arrays = res.arrays[plan.n_op + 1:]
    dtau = None
    if extra_arrays:
        beta, t = extra_arrays
        xhat = plan.op.xhat(xp, res.arrays[: plan.n_op])
        y = affine_forward(xp, plan.part.unview(xp, xhat, plan.shape), res.arrays[plan.n_op], beta)
        g, dtau = tlu_backward(xp, y, t, to_compute(xp, g, y.dtype))
        dtau = xp.reshape(dtau, plan.extra[2])
    dx, dw, db = _backward_for("x", "w", "b")(res, g)
    return dx, dw, db, dtau


# --------------------------------------------------------------------------------------------------
# Lp-norm batch normalization


def _ex_lp(rng):
    x = rng.standard_normal((6, 3, 2, 2))
    c = 3
    for p in (1.0, 2.0, 3.0, float("inf")):
        yield Example((x,), dict(training=True, p=p), label=f"p={p}")
    yield Example((x, rng.standard_normal(c), rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c)),
                  dict(training=True, p=1.0, momentum=0.3), label="p=1 (√(π/2) factor), running update, affine")
    yield Example((x, rng.standard_normal(c), rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c)),
                  dict(training=False, p=1.5), label="inference")
    for p in (2.0, 3.0):
        yield Example((x, rng.standard_normal(c), rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c)),
                      dict(training=True, p=p, eps=0.05, momentum=0.3, eps_placement="inside", running_scale_kind="reciprocal"),
                      label=f"p={p}, ε inside the p-th moment, running 1/scale (the authors' code)")
    yield Example((x, rng.standard_normal(c), rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c)),
                  dict(training=False, p=2.0, running_scale_kind="reciprocal"), label="inference by a running 1/scale")


def _lp_dev_invariant() -> Invariant:
    """Invariant: the Lp deviation of x̂ over Π_BN is σ_p/(c·σ_p + ε), and its mean is 0."""

    def check(m, xp, out, args, kwargs):
        if not kwargs.get("training") or not _plain(args, kwargs) or kwargs.get("eps_placement", "outside") != "outside":
            return None
        p, eps = kwargs.get("p", 2.0), kwargs.get("eps", 1e-5)
        c = math.sqrt(math.pi / 2) if (p == 1.0 and kwargs.get("l1_factor", True)) else 1.0
        x, y = to_numpy(args[0]).astype(_np.float64), to_numpy(m.primary(out)).astype(_np.float64)
        axes = (0,) + tuple(range(2, x.ndim))

        def dev(t):
            u = _np.abs(t - t.mean(axis=axes, keepdims=True))
            return u.max(axis=axes) if math.isinf(p) else (u**p).mean(axis=axes) ** (1 / p)

        sx = dev(x)
        return max(float(_np.max(_np.abs(dev(y) - sx / (c * sx + eps)))), float(_np.max(_np.abs(y.mean(axis=axes)))))

    return Invariant("unit Lp deviation", check)


def _lp_divisor(xp, sig, p, c, eps, inside):
    """The divisor s of x − μ from the Lp deviation σ_p: c·σ_p + ε (ε outside, the default) or
    ((c·σ_p)^p + ε)^{1/p} (ε inside the p-th moment, Hoffer et al.'s code); where (c·σ_p)^p overflows
    (σ_p finite) ε is negligible and s = c·σ_p."""
    if not inside:
        return c * sig + eps
    cs = c * sig
    m = cs * cs if p == 2.0 else cs**p
    s = (m + eps) ** (1.0 / p)
    return xp.where(xp.isinf(m) & xp.isfinite(cs), cs, s)


@dataclasses.dataclass(frozen=True)
class _LpInside(_op.LpStandardizing):
    """Lp standardizing with ε inside the p-th moment (finite p; Hoffer et al. 2018, their code):
    s = ((c·σ_p)^p + ε)^{1/p} = (c^p·mean|u|^p + ε)^{1/p}, x̂ = u/s, u = x − μ.

    Backward: ∂s/∂σ_p = s^{1−p}·c^p·σ_p^{p−1} = c·(c·σ_p/s)^{p−1} =: c′ (per statistic) where the
    ε-outside form has ∂s/∂σ_p = c; with ∂σ_p/∂u_j = w_j/n (w as in
    :class:`normref.operation.LpStandardizing`), ∂L/∂u_j = (g_j − c′·mean(g·x̂)·w_j)/s, then
    dx = du − mean(du) (μ's share). p = 1 gives c′ = c: both placements coincide there.
    Residuals (x̂, s, σ_p) as the parent's (no synchronized variant)."""

    name = "lp_eps_inside"

    def forward(self, xp, x, axes):
        mu = _op._mean(xp, x, axes)
        u = x - mu
        a = xp.abs(u)
        if self.p == 1.0:
            sig = _op._mean(xp, a, axes)
        elif self.p == 2.0:
            sig = _op._power_mean(xp, a, axes, 2.0, lambda t: t * t)
        else:
            sig = _op._power_mean(xp, a, axes, self.p, lambda t: t**self.p)
        s = _lp_divisor(xp, sig, self.p, self.c, self.eps, True)
        xhat = u / s
        return xhat, (xhat, s, sig), {"mean": mu, "scale": sig}

    def backward(self, xp, res, axes, g):
        xhat, s, sig = res
        w = self._weights(xp, xhat, s, sig, axes)
        c1 = self.c * (self.c * sig / s) ** (self.p - 1.0)
        du = (g - c1 * _op._mean(xp, g * xhat, axes) * w) / s
        return du - _op._mean(xp, du, axes)


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_scale", "weight", "bias"),
    nondiff=("running_mean", "running_scale"),
    survey="§5.1.1 (Table 1: Lp-norm BN and L1-norm BN; standardizing by the Lp deviation)",
    paper="Liao, Kawaguchi & Poggio, Streaming Normalization, 2016; Hoffer et al., Norm matters, NeurIPS 2018",
    examples=_ex_lp,
    invariants=(_lp_dev_invariant(),),
)
def lp_batch_norm(
    input: Any,
    running_mean: Any = None,
    running_scale: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    p: float = 2.0,
    l1_factor: bool = True,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
    eps_placement: str = "outside",
    running_scale_kind: str = "deviation",
) -> Array | LpNormResult:
    """Lp-norm batch normalization: y = γ·(x − μ_B)/(c·σ_p + ε) + β, σ_p = (mean_B|x − μ_B|^p)^{1/p}.

    Over Π_BN; p = ∞ gives σ = max|x − μ|; p = 1 with ``l1_factor`` uses c = √(π/2), which makes σ₁ an
    estimate of the standard deviation for Gaussian data (Hoffer et al. 2018; Wu et al. 2018),
    otherwise c = 1. ε is added *outside* the deviation. The running scale tracks σ_p (no bias
    correction); at inference x̂ = (x − μ̂)/(c·σ̂_p + ε) with constants.

    Conventions. Default: ε outside (s = c·σ_p + ε, as in Hoffer et al.'s L1 layer and Liao et al.'s
    equation) and a running σ_p. ``eps_placement="inside"`` gives s = ((c·σ_p)^p + ε)^{1/p}, ε inside
    the p-th moment, as the Norm-matters authors' ``LpBatchNorm2d`` computes
    (mean|x − μ|^p + ε)^{−1/p} (github.com/eladhoffer/norm_matters ``models/lp_norm.py``); finite p
    only, identical to the default at p = 1. ``running_scale_kind="reciprocal"`` keeps, as that code
    does, a running *reciprocal* scale 1/s (ε and c included) in ``running_scale``, and at inference
    x̂ = (x − μ̂)·running_scale. That code weights the *new* batch by 1 − momentum (its default 0.1
    gives new statistics weight 0.9); normref's ``momentum`` is always torch's weight of the new
    value, so pass ``momentum=0.9`` to reproduce it.

    ``sync`` (a reducer, :mod:`normref.distributed`): μ_B and σ_p over every rank's batch, the same
    running statistics on every rank. σ_p needs the global μ first, so the forward takes two rounds
    for p ≠ 2: an all_gather of C + 1 values ([n, μ]), then an all_reduce_sum of Σ|x − μ|^p (C
    values), or for p = ∞ an all_gather of each rank's max|x − μ| (C values) and a max over ranks;
    p = 2 takes σ₂ from Chan's pooled M2 in one all_gather of 2C + 1 values. Backward: one
    all_reduce_sum of [Σg, Σg·x̂, Σw] (3C values; 2C for p = 2, where Σw = Σu/σ₂ = 0; for p = ∞
    [Σg, Σg·x̂, Σ sign·[tie], Σ[tie]], 4C, the ties counted over all ranks). Ranks may hold 0 samples;
    unused in inference.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``, default None
        The running mean (used at inference; updated in training).
    running_scale : array or None, shape ``(C,)``, default None
        The running Lp deviation σ_p (no bias correction).
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Use the batch statistics (and update the running ones, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    eps : float, default 1e-5
        ε, added outside the deviation.
    p : float, default 2.0
        p ≥ 1, or ``inf``.
    l1_factor : bool, default True
        For p = 1, multiply σ₁ by c = √(π/2).
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (:mod:`normref.distributed`): statistics over every rank's batch (see above).
    eps_placement : {"outside", "inside"}, default "outside"
        ε added to c·σ_p (``"outside"``) or to the p-th moment (``"inside"``, finite p, not with
        ``sync``; backward in :class:`_LpInside`).
    running_scale_kind : {"deviation", "reciprocal"}, default "deviation"
        What ``running_scale`` holds: the running σ_p, or the running reciprocal scale 1/s.

    Returns
    -------
    out : array or LpNormResult
        The output, or ``LpNormResult(output, running_mean, running_scale)`` in training with running
        statistics.

    Notes
    -----
    Survey §5.1.1 (batch statistics) and §5.1.2 (the L1 and Lp operations).

    References
    ----------
    .. [1] Q. Liao, K. Kawaguchi and T. Poggio, "Streaming Normalization: Towards Simpler and More
       Biologically-plausible Normalizations for Online and Recurrent Learning", arXiv:1610.06160, 2016.
    .. [2] E. Hoffer, R. Banner, I. Golan and D. Soudry, "Norm matters: efficient and accurate
       normalization schemes in deep networks", NeurIPS 2018.
    """
    fn = "lp_batch_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_scale=running_scale, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    _check_channels(fn, input, running_mean=running_mean, running_scale=running_scale, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    p = check_p(fn, p)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    l1_factor = check_bool(fn, "l1_factor", l1_factor)
    _check_nbt(fn, num_batches_tracked)
    _running_pair(fn, running_mean, running_scale, ("running_mean", "running_scale"))
    inside = _check_convention(fn, "eps_placement", eps_placement, ("outside", "inside")) == "inside"
    reciprocal = _check_convention(fn, "running_scale_kind", running_scale_kind, ("deviation", "reciprocal")) == "reciprocal"
    if inside and math.isinf(p):
        raise ValueError(f"{fn}: eps_placement='inside' needs a finite p (ε inside the p-th moment); got p=inf")
    if inside and training and sync is not None:
        raise ValueError(f"{fn}: eps_placement='inside' has no synchronized form; got sync={sync!r} "
                         f"(use eps_placement='outside' with sync)")
    check_nonnegative_values(fn, "running_scale", xp, running_scale,
                             "a reciprocal scale" if reciprocal else "an Lp deviation")
    sync = check_reducer(fn, sync) if training else check_reducer(fn, sync) and None  # unused in inference
    shape, part = tuple(input.shape), Partition("batch")
    if training:
        if sync is None:
            _check_training_count(fn, part, shape)
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_scale are required when training=False; got None")
    if _is_empty(shape) and sync is None:
        return _empty_call(xp, input, (input, running_mean, running_scale, weight, bias), None,
                           LpNormResult if training and running_mean is not None else None,
                           (running_mean, running_scale))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd, c = len(shape), shape[1]
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    cfac = _op.LpStandardizing(p=p, l1_factor=l1_factor).c
    if training:
        if inside:
            op: _op.Operation = _LpInside(p=p, eps=eps, l1_factor=l1_factor)
        else:
            op = _op.LpStandardizing(p=p, eps=eps, l1_factor=l1_factor, sync=sync)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta)
    else:
        rmean = channel_param(xp, to_compute(xp, running_mean, cd), nd)
        rscale = channel_param(xp, to_compute(xp, running_scale, cd), nd)
        if reciprocal:  # the running 1/s already holds c and ε
            op = _PopulationReciprocal()
            y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=rmean, inv=rscale)
        elif inside:  # s = ((c·σ̂_p)^p + ε)^{1/p} from the running σ̂_p, a constant
            op = _PopulationReciprocal()
            inv = 1.0 / _lp_divisor(xp, rscale, p, cfac, eps, True)
            y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=rmean, inv=inv)
        else:
            op = _op.PopulationLp(eps=eps, c=cfac)
            y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=rmean, scale=rscale)
    res = pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))
    y = _out(xp, y, input.dtype)
    if training and running_mean is not None:
        rm = _ema(xp, running_mean, _to_channels(xp, st["mean"], c), f)
        sig = _to_channels(xp, st["scale"], c)
        rs = _ema(xp, running_scale, 1.0 / _lp_divisor(xp, sig, p, cfac, eps, inside) if reciprocal else sig, f)
        return LpNormResult(y, rm, rs), res
    return y, res


lp_batch_norm.defbackward(_backward_for("x", None, None, "w", "b"))


# --------------------------------------------------------------------------------------------------
# batch renormalization


def _ex_renorm(rng):
    x = rng.standard_normal((6, 3, 2, 2)) * 1.5 + 0.5
    c = 3
    rm, rv = rng.standard_normal(c) * 0.3, rng.uniform(0.8, 1.5, c)
    yield Example((x, rm, rv), dict(training=True), label="r, d inside the clip range")
    yield Example((x, rm * 10, rv * 0.01, rng.standard_normal(c), rng.standard_normal(c)),
                  dict(training=True, rmax=1.5, dmax=0.5), label="r, d clipped, affine")
    yield Example((x, rm, rv), dict(training=False), label="inference")
    sd = _np.sqrt(rv + 1e-5)  # the running σ that matches rv
    yield Example((x, rm, sd, rng.standard_normal(c), rng.standard_normal(c)), dict(training=True, momentum=0.2, running_stat="std"),
                  label="running σ (Algorithm 1), affine")
    yield Example((x, rm * 10, sd * 0.1), dict(training=True, rmax=1.5, dmax=0.5, running_stat="std"),
                  label="running σ, r, d clipped")
    yield Example((x, rm, sd), dict(training=False, running_stat="std"), label="inference by a running σ")


@dataclasses.dataclass(frozen=True)
class _BatchRenormStd(_op.BatchRenormalizing):
    """Batch renormalization against a running σ (Ioffe 2017, Algorithm 1) instead of a running
    variance: σ is given directly (ε already in it), r = clip(σ_B/σ), d = clip((μ_B − μ)/σ).
    The backward is the parent's (r, d constants: dx = r·(standardizing backward)); ``running_var``
    carries σ here (the operation's keyword names are shared with the parent)."""

    name = "batch_renorm_std"

    def forward(self, xp, x, axes, running_mean, running_var):
        if self.sync is not None:
            mu, var, count = _op.synced_moments(xp, x, axes, self.sync)
            rstd = 1.0 / xp.sqrt(var + self.eps)
        else:
            mu, var = _op.moments(xp, x, axes)
            rstd = _op._rsqrt(xp, var, self.eps, lambda: x - mu, axes)
        x0 = (x - mu) * rstd
        rrun = 1.0 / running_var  # 1/σ
        r = xp.clip(rrun / rstd, 1.0 / self.rmax, self.rmax)
        d = xp.clip((mu - running_mean) * rrun, -self.dmax, self.dmax)
        if self.sync is not None:
            return x0 * r + d, (x, mu, rstd, r, d, count), {"mean": mu, "var": var, "count": count}
        return x0 * r + d, (x, mu, rstd, r, d), {"mean": mu, "var": var}


def _renorm_frozen(args, kwargs):
    """batch_renorm with r and d frozen at the base call's values (what its backward differentiates)."""
    m = batch_renorm
    b = m.bind(*args, **kwargs)
    a = b.arguments
    if not a["training"]:
        return None
    xp = namespace("batch_renorm", input=a["input"])
    x, eps = a["input"], a["eps"]
    axes = (0,) + tuple(range(2, x.ndim))
    mu, var = _op.moments(xp, x, axes)
    nd = x.ndim
    rm = channel_param(xp, a["running_mean"], nd)
    rv = channel_param(xp, a["running_var"], nd)
    srun = rv if a["running_stat"] == "std" else xp.sqrt(rv + eps)  # σ
    r = xp.clip(xp.sqrt(var + eps) / srun, 1.0 / a["rmax"], a["rmax"])
    d = xp.clip((mu - rm) / srun, -a["dmax"], a["dmax"])

    def frozen(input, running_mean, running_var, weight=None, bias=None, *rest, **kw):
        y = batch_norm(input, None, None, None, None, True, eps=eps) * r + d
        if weight is not None:
            y = y * channel_param(xp, weight, nd)
        if bias is not None:
            y = y + channel_param(xp, bias, nd)
        return y

    return frozen


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_var", "weight", "bias"),
    nondiff=("running_mean", "running_var"),
    nullable=("running_mean", "running_var"),
    survey="§5.3.1 (functions combining population and batch statistics: batch renormalization)",
    paper="Ioffe, Batch Renormalization, NeurIPS 2017",
    examples=_ex_renorm,
    fd_target=_renorm_frozen,
)
def batch_renorm(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    rmax: float = 3.0,
    dmax: float = 5.0,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
    running_stat: str = "var",
) -> Array | NormResult:
    """Batch renormalization: x̂ = ((x − μ_B)/σ_B)·r + d, y = γ·x̂ + β.

    σ_B = √(σ_B² + ε), σ = √(running_var + ε), r = clip(σ_B/σ, 1/r_max, r_max),
    d = clip((μ_B − μ)/σ, −d_max, d_max); r and d are constants of the backward (stop-gradient), so
    dx = r·(the standardization backward). The running statistics are required in training, are
    updated as in :func:`batch_norm` (unbiased variance) and returned in a ``NormResult``; at inference
    this is :func:`batch_norm` with running statistics.

    Conventions. Default (``running_stat="var"``): the running state is :func:`batch_norm`'s (and
    torch's ``BatchNorm`` buffers'), a running *unbiased variance* with σ = √(running_var + ε), so a
    batch-renorm layer's state is interchangeable with a batch-norm layer's (torch has no batch
    renormalization to follow). ``running_stat="std"``: the paper's Algorithm 1, a running σ with ε
    in it: the ``running_var`` slot (argument and result) holds σ (> 0), r = clip(σ_B/σ),
    d = clip((μ_B − μ)/σ), σ ← σ + α·(σ_B − σ) with σ_B = √(σ_B² + ε) (σ_B² biased) and α = momentum,
    and at inference y = γ·(x − μ)/σ + β. The backward is the same in both (r, d constants).

    ``sync`` (a reducer, :mod:`normref.distributed`): μ_B, σ_B over every rank's batch, so r and d
    come from the global statistics and every rank gets the same running statistics (variance
    unbiased by the global count). Per step as :func:`batch_norm`: forward one all_gather of 2C + 1
    values, backward one all_reduce_sum of 2C. Ranks may hold 0 samples; unused in inference.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array, shape ``(C,)``
        The running mean μ (required in training).
    running_var : array, shape ``(C,)``
        The running (unbiased) variance.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Renormalize with the batch statistics (and update the running ones).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    eps : float, default 1e-5
        ε, added to the variances.
    rmax : float, default 3.0
        r_max, the clip of r.
    dmax : float, default 5.0
        d_max, the clip of d.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (:mod:`normref.distributed`): global statistics (see above).
    running_stat : {"var", "std"}, default "var"
        What ``running_var`` holds: the running unbiased variance, or the running σ (Algorithm 1).

    Returns
    -------
    out : array or NormResult
        The output, or ``NormResult(output, running_mean, running_var)`` in training (with
        ``running_stat="std"`` the third field is the updated running σ).

    Notes
    -----
    Survey §5.3.1.

    References
    ----------
    .. [1] S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
       Models", NeurIPS 2017 (Algorithm 1).
    """
    fn = "batch_renorm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    if running_mean is None or running_var is None:
        raise ValueError(f"{fn}: running_mean and running_var are required (r and d are measured against them); got None")
    _check_channels(fn, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    _check_nbt(fn, num_batches_tracked)
    std = _check_convention(fn, "running_stat", running_stat, ("var", "std")) == "std"
    if std:
        bad = running_var <= 0
        if concrete_any(xp, bad):
            i = first_true(bad)
            raise ValueError(f"{fn}: with running_stat='std' running_var holds the running σ and must be > 0 "
                             f"everywhere; got {float(to_numpy(running_var).reshape(-1)[i])!r} at index {i}")
    else:
        check_nonnegative_values(fn, "running_var", xp, running_var)
    rmax, dmax = check_positive(fn, "rmax", rmax), check_positive(fn, "dmax", dmax)
    if rmax < 1.0:
        raise ValueError(f"{fn}: rmax must be >= 1 (r is clipped to [1/rmax, rmax]); got {rmax}")
    sync = check_reducer(fn, sync) if training else check_reducer(fn, sync) and None  # unused in inference
    shape, part = tuple(input.shape), Partition("batch")
    if training:
        if sync is None:
            _check_training_count(fn, part, shape)
        f = _factor(fn, momentum, num_batches_tracked)
    if _is_empty(shape) and sync is None:
        return _empty_call(xp, input, (input, running_mean, running_var, weight, bias), None,
                           NormResult if training else None, (running_mean, running_var))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd, c = len(shape), shape[1]
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    rm = channel_param(xp, to_compute(xp, running_mean, cd), nd)
    rv = channel_param(xp, to_compute(xp, running_var, cd), nd)
    if training:
        kind = _BatchRenormStd if std else _op.BatchRenormalizing
        op: _op.Operation = kind(eps=eps, rmax=rmax, dmax=dmax, sync=sync)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, running_mean=rm, running_var=rv)
    elif std:  # y = γ·(x − μ)/σ + β with the running σ
        op = _PopulationReciprocal()
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=rm, inv=1.0 / rv)
    else:
        op = _op.PopulationStandardizing(eps)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=rm, var=rv)
    res = pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))
    y = _out(xp, y, input.dtype)
    if training:
        n = st.get("count", part.count(shape))  # the global count when synchronized
        new_rm = _ema(xp, running_mean, _to_channels(xp, st["mean"], c), f)
        var_b = _to_channels(xp, st["var"], c)
        # Algorithm 1: σ ← σ + α(σ_B − σ), σ_B = √(σ_B² + ε) (biased); else the unbiased variance
        new_rv = _ema(xp, running_var, xp.sqrt(var_b + eps) if std else var_b * (n / (n - 1)), f)
        return NormResult(y, new_rm, new_rv), res
    return y, res


batch_renorm.defbackward(_backward_for("x", None, None, "w", "b"))


# --------------------------------------------------------------------------------------------------
# ghost batch normalization


def _ex_ghost(rng):
    x = rng.standard_normal((8, 3, 2, 2)) + 0.5
    c = 3
    yield Example((x, None, None), dict(training=True, virtual_batch_size=4), label="2 virtual batches")
    yield Example((x, rng.standard_normal(c), rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c)),
                  dict(training=True, virtual_batch_size=2, momentum=0.2), label="4 virtual batches, running update")
    yield Example((x, rng.standard_normal(c), rng.uniform(0.5, 2, c)), dict(training=False, virtual_batch_size=2), label="inference")


def _ghost_partition(args, kwargs):
    if not kwargs.get("training") or not _plain(args, kwargs):
        return None
    x = args[0]
    v = kwargs.get("virtual_batch_size") or x.shape[0]
    return Partition("batch_group", num_groups=x.shape[1], batch_groups=x.shape[0] // v), kwargs.get("eps", 1e-5)


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_var", "weight", "bias"),
    nondiff=("running_mean", "running_var"),
    nullable=("running_mean", "running_var"),
    survey="§8.3 (stochasticity for generalization: statistics over ghost batches)",
    paper="Hoffer, Hubara & Soudry, Train longer, generalize better, NeurIPS 2017 (ghost BN)",
    examples=_ex_ghost,
    invariants=(moment_invariant("standardizing", _ghost_partition),),
)
def ghost_batch_norm(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int | None = None,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
) -> Array | NormResult:
    """Ghost batch normalization: batch normalization on each virtual batch of ``virtual_batch_size``.

    The batch is split into k = N / virtual_batch_size consecutive virtual batches B_1 … B_k, each
    standardized with its own statistics, y = γ·(x − μ_{B_i})/√(σ²_{B_i} + ε) + β (σ² biased; the
    batch-group partition with one channel per group). The running statistics are updated once per
    virtual batch, in order — exactly what calling :func:`batch_norm` on each chunk in turn gives:
    with a fixed momentum each update uses it; with ``momentum=None`` (cumulative average) and
    ``num_batches_tracked=t`` the i-th virtual batch uses f = 1/(t + i), i = 1 … k. A call therefore
    counts as k batches: pass ``num_batches_tracked = t + N // virtual_batch_size`` next time (torch's
    ``BatchNorm`` adds 1 per call; a ghost layer must add k). ``virtual_batch_size=None`` uses the
    whole batch.

    ``sync`` (a reducer, :mod:`normref.distributed`): the virtual batches stay per rank — they are
    the method's regularizer, and pooling them across ranks would enlarge them — so the output and
    the gradients need no communication; ``sync`` makes the *running statistics* those of the
    global sequence of virtual batches: every rank applies all ranks' K = Σ k_r updates in rank
    order (rank 0's virtual batches first), exactly as a single process on the concatenated batch
    (with the same ``virtual_batch_size``; with ``momentum=None`` pass ``num_batches_tracked = t + K``
    next time). Per step: an all_gather of 1 value (k_r), then one of 2·C·max k_r values (each rank's
    means and unbiased variances, padded); nothing in the backward. A rank may hold 0 samples. Under
    JAX (equal shapes on every rank) k_r is the local k.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``
        The running mean (used at inference; updated once per virtual batch in training).
    running_var : array or None, shape ``(C,)``
        The running (unbiased) variance.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Virtual-batch statistics (``True``) or the running statistics (``False``).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average (see above).
    eps : float, default 1e-5
        ε, added to the variance.
    virtual_batch_size : int or None, default None
        The virtual batch size (divides N); ``None``: the whole batch.
    num_batches_tracked : int or None, default None
        Batches seen before this call (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (:mod:`normref.distributed`): global running statistics (see above).

    Returns
    -------
    out : array or NormResult
        The output, or ``NormResult(output, running_mean, running_var)`` in training with running
        statistics.

    Notes
    -----
    Survey §8.3.

    References
    ----------
    .. [1] E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize better: closing the
       generalization gap in large batch training of neural networks", NeurIPS 2017 (Algorithm 1).
    """
    fn = "ghost_batch_norm"
    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    _check_channels(fn, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    eps = _eps(fn, xp, input, eps)
    momentum = check_momentum(fn, momentum)
    training = check_bool(fn, "training", training)
    _check_nbt(fn, num_batches_tracked)
    _running_pair(fn, running_mean, running_var)
    check_nonnegative_values(fn, "running_var", xp, running_var)
    shape = tuple(input.shape)
    vbs = shape[0] if virtual_batch_size is None else check_int(fn, "virtual_batch_size", virtual_batch_size)
    if vbs and shape[0] % vbs:  # vbs = 0: an empty batch without virtual_batch_size
        raise ValueError(f"{fn}: virtual_batch_size must divide the batch size input.shape[0] = {shape[0]}; got {vbs}")
    sync = check_reducer(fn, sync)  # unused in inference
    if not training:
        if running_mean is None:
            raise ValueError(f"{fn}: running_mean and running_var are required when training=False; got None")
        return batch_norm.forward(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if _is_empty(shape) and sync is None:
        if running_mean is not None:
            _factors(fn, momentum, num_batches_tracked, 1)  # momentum=None still needs the count
        return _empty_call(xp, input, (input, running_mean, running_var, weight, bias), None,
                           NormResult if running_mean is not None else None, (running_mean, running_var))
    k, c = (shape[0] // vbs if vbs else 0), shape[1]
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = len(shape)
    gamma = channel_param(xp, to_compute(xp, weight, cd), nd)
    beta = channel_param(xp, to_compute(xp, bias, cd), nd)
    op: _op.Operation
    if k == 0:  # a rank without samples (synchronized): an empty output, zero parameter gradients
        if sync is None:
            raise ValueError(f"{fn}: expected a non-empty batch when training without sync; got input of shape {shape}")
        part, op = Partition("batch"), _op.PopulationStandardizing(eps)
        z = xp.zeros_like(channel_param(xp, to_compute(xp, running_mean, cd), nd) if running_mean is not None
                          else xp.sum(x, axis=(0,) + tuple(range(2, nd)), keepdims=True))
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=z, var=z + 1.0)
    else:
        part = Partition("batch_group", num_groups=c, batch_groups=k)
        _check_training_count(fn, part, shape)
        op = _op.Standardizing(eps)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta)
    res = pack(part, op, x, op_res, gamma, beta, extra=_shapes(weight, bias))
    y = _out(xp, y, input.dtype)
    if running_mean is None:
        return y, res
    if k:
        n = part.count(shape)
        means = xp.reshape(st["mean"], (k, c))
        vars_ = xp.reshape(st["var"], (k, c)) * (n / (n - 1))
    if sync is None:
        batches = [(means[i, :], vars_[i, :]) for i in range(k)]
    else:
        batches = _ghost_gather(xp, sync, k, c, means if k else None, vars_ if k else None, cd, running_mean)
    fs = _factors(fn, momentum, num_batches_tracked, len(batches))
    rm, rv = running_mean, running_var
    for (m_i, v_i), f_i in zip(batches, fs):  # Eqn 18 once per virtual batch, in order
        rm = _ema(xp, rm, m_i, f_i)
        rv = _ema(xp, rv, v_i, f_i)
    return NormResult(y, rm, rv), res


def _ghost_gather(xp, sync, k, c, means, vars_, cd, like):
    """Every rank's virtual-batch (mean, unbiased variance) pairs, in rank order: an all_gather of k_r,
    then one of the padded (max k_r, 2C) statistics (see :func:`ghost_batch_norm`)."""
    one = xp.ones_like(to_compute(xp, like, cd)[:1])
    ks = sync.all_gather(one * k)
    try:
        ks = [int(v) for v in _np.asarray(to_numpy(ks)).reshape(-1)]
    except Exception:  # traced (JAX): SPMD shapes, every rank holds k virtual batches
        ks = None
    kmax = k if ks is None else max(ks)
    if kmax == 0:
        return []
    if k:
        loc = xp.concat([means, vars_], axis=1)  # (k, 2C)
    if k < kmax:
        pad = xp.zeros_like(xp.reshape(xp.concat([one] * (2 * c * (kmax - k))), (kmax - k, 2 * c)))
        loc = pad if not k else xp.concat([loc, pad], axis=0)
    allst = sync.all_gather(loc)  # (W, kmax, 2C)
    w = allst.shape[0]
    ks = [k] * w if ks is None else ks
    return [(allst[r, i, :c], allst[r, i, c:]) for r in range(w) for i in range(ks[r])]


ghost_batch_norm.defbackward(_backward_for("x", None, None, "w", "b"))
