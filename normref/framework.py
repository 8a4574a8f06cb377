"""The survey's Algorithm 1 as code: NAP → NOP → NRR → reshape back, and its composed backward.

    X = Π(X)      (partition: a view plus reduce axes, :mod:`normref.partition`)
    X̂ = Φ(X)      (operation, :mod:`normref.operation`)
    X̃ = Ψ(X̂)      (recovery, :mod:`normref.recovery`)
    X̃ = Π⁻¹(X̃)    (reshape back)

The backward runs the three backwards in reverse: Ψ's gives dX̂ (and dγ, dβ), Φ's gives dX on the
view, Π⁻¹ reshapes it back. Nothing is derived twice: every named method in
:mod:`normref.standardization` is a preset over :func:`run_forward` / :func:`run_backward`, and
:func:`normalize` composes any partition with any operation and any recovery.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import operation as _op
from . import partition as _part
from ._validate import (check_bool, check_choice, check_eps_representable, check_int, check_nonnegative,
                        check_p, check_positive)
from ._results import result_tuple
from ._xp import Array, compute_dtype, namespace, to_compute
from .recovery import affine_backward, affine_forward
from .distributed import check_reducer
from .registry import Example, Residuals, method

__all__ = ["normalize", "batch_normalize", "RunningResult", "run_forward", "run_backward", "channel_param",
           "check_param_shape"]


def channel_param(xp, a, ndim: int, axis: int = 1):
    """A per-channel vector (C,) as an array broadcastable to an ndim input along ``axis``."""
    if a is None:
        return None
    shape = [1] * ndim
    shape[axis] = a.shape[0]
    return xp.reshape(a, tuple(shape))


def check_param_shape(fn: str, name: str, a, expected: tuple, what: str) -> None:
    if a is not None and tuple(a.shape) != tuple(expected):
        raise ValueError(f"{fn}: {name} must have shape {tuple(expected)} ({what}); got shape {tuple(a.shape)}")


def check_broadcastable(fn: str, name: str, a, shape: tuple) -> None:
    """γ/β of a generated affine must broadcast to the input without enlarging it."""
    if a is None:
        return
    s = tuple(a.shape)
    ok = len(s) <= len(shape) and all(d in (1, t) for d, t in zip(s[::-1], shape[::-1]))
    if not ok:
        raise ValueError(
            f"{fn}: {name} must be broadcastable to the input's shape {shape} (each dimension 1 or equal, "
            f"aligned from the right); got shape {s}"
        )


def run_forward(xp, x, part: _part.Partition, op, gamma_b=None, beta_b=None, out=None, **op_arrays):
    """Forward of the composition on compute-dtype arrays: ``(y, op_residuals, stats)``.

    ``gamma_b``/``beta_b`` are already broadcastable to ``x``; ``op_arrays`` go to the operation
    (population statistics, running statistics for batch renormalization). A registered
    ``normalize_forward`` kernel runs Φ and Ψ in one pass (writing y into ``out`` when given: an
    array of x's shape and dtype); otherwise the formulas run and ``out`` is ignored here.
    """
    shape = tuple(x.shape)
    axes = part.axes(shape)
    xv = part.view(xp, x)
    if type(op) is _op.Standardizing and op.sync is not None:
        # synchronized: the global (μ, σ²) from one all_gather, then y by population statistics
        # (the normalize_forward kernel where registered); residuals (x, μ, 1/σ, N)
        mu, var, count = _op.synced_moments(xp, xv, axes, op.sync)
        stats = {"mean": mu, "var": var, "count": count}
        pop = _op.PopulationStandardizing(op.eps)
        fused = _op.fused_forward(xp, pop, xv, axes, shape, gamma_b, beta_b, out, mean=mu, var=var)
        if fused is not None:
            return fused[0], tuple(fused[1]) + (count,), stats
        xhat_v, op_res, _ = pop.forward(xp, xv, axes, mean=mu, var=var)
        y = affine_forward(xp, part.unview(xp, xhat_v, shape), gamma_b, beta_b)
        return y, tuple(op_res) + (count,), stats
    fused = _op.fused_forward(xp, op, xv, axes, shape, gamma_b, beta_b, out, **op_arrays)
    if fused is not None:
        return fused
    xhat_v, op_res, stats = op.forward(xp, xv, axes, **op_arrays)
    xhat = part.unview(xp, xhat_v, shape)
    return affine_forward(xp, xhat, gamma_b, beta_b), op_res, stats


def run_backward(xp, part: _part.Partition, op, shape, op_res, gamma_b, beta_shape, g, need=(True, True, True)):
    """(dx, dγ_b, dβ_b): the recovery's backward, then the operation's on the view, then reshape.

    ``need`` says which of (dx, dγ, dβ) are wanted (the others come back ``None`` and cost nothing:
    without dx, only the two parameter sums are formed). A registered ``normalize_backward`` kernel
    runs the same composition in one pass where it applies (standardizing, scaling, population
    statistics); otherwise the formulas run.
    """
    need_dx, need_g, need_b = need
    need_g = need_g and gamma_b is not None
    need_b = need_b and beta_shape is not None
    axes = part.axes(shape)
    if gamma_b is not None and beta_shape is not None and tuple(beta_shape) != tuple(gamma_b.shape):
        fused = None  # γ and β broadcast differently: the kernel sums both over one set of axes
    else:
        pshape = tuple(gamma_b.shape) if gamma_b is not None else beta_shape
        fused = _op.fused_backward(xp, op, op_res, axes, shape, gamma_b, pshape,
                                   xp.reshape(g, tuple(op_res[0].shape)), (need_dx, need_g, need_b))
    if fused is not None:
        dxv, dgamma, dbeta = fused
        return None if dxv is None else part.unview(xp, dxv, shape), dgamma, dbeta
    xhat = part.unview(xp, op.xhat(xp, op_res), shape) if need_g else None
    dxhat, dgamma, dbeta = affine_backward(xp, xhat, gamma_b, beta_shape, g, (need_dx, need_g, need_b))
    if not need_dx:
        return None, dgamma, dbeta
    dxv = op.backward(xp, op_res, axes, part.view(xp, dxhat))
    return part.unview(xp, dxv, shape), dgamma, dbeta


class Plan:
    """The static half of a composed call (hashable): partition, operation, shapes, dtypes.

    Packs the arrays a backward needs into :class:`Residuals` and unpacks them again.
    """

    __slots__ = ("part", "op", "shape", "n_op", "gamma_shape", "beta_shape", "extra")

    def __init__(self, part, op, shape, n_op, gamma_shape, beta_shape, extra=()):
        self.part, self.op, self.shape, self.n_op = part, op, tuple(shape), n_op
        self.gamma_shape, self.beta_shape, self.extra = gamma_shape, beta_shape, extra

    def _key(self):
        return (self.part, self.op, self.shape, self.n_op, self.gamma_shape, self.beta_shape, self.extra)

    def __eq__(self, other):
        return isinstance(other, Plan) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"Plan{self._key()!r}"


def pack(part, op, x, op_res, gamma_b, beta_b, extra_arrays=(), extra=()) -> Residuals:
    plan = Plan(
        part,
        op,
        x.shape,
        len(op_res),
        None if gamma_b is None else tuple(gamma_b.shape),
        None if beta_b is None else tuple(beta_b.shape),
        extra,
    )
    return Residuals(tuple(op_res) + (gamma_b,) + tuple(extra_arrays), plan)


def unpack_backward(xp, res: Residuals, g, need=(True, True, True)):
    """Run the composed backward from packed residuals: ``(dx, dγ_b, dβ_b, extra_arrays)``;
    ``need`` as in :func:`run_backward`."""
    plan: Plan = res.static
    op_res = res.arrays[: plan.n_op]
    gamma_b = res.arrays[plan.n_op]
    extra_arrays = res.arrays[plan.n_op + 1 :]
    g = to_compute(xp, g, op_res[0].dtype)
    dx, dg, db = run_backward(xp, plan.part, plan.op, plan.shape, op_res, gamma_b, plan.beta_shape, g, need)
    return dx, dg, db, extra_arrays


# --------------------------------------------------------------------------------------------------
# The public composition


def _examples_normalize(rng):
    x = rng.standard_normal((4, 6, 3, 2))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    for part, kw in [("batch", {}), ("instance", {}), ("group", {"num_groups": 3}), ("position", {}),
                     ("layer", {"normalized_ndim": 3}), ("batch_group", {"num_groups": 2, "batch_groups": 2})]:
        for op in ("standardizing", "centering", "scaling"):
            wb = (None, None) if part == "layer" else (w, b)
            yield Example((x,) + wb, dict(partition=part, operation=op, **kw), label=f"{part}/{op}")
    for p in (1.0, 3.0, float("inf")):
        yield Example((x, w, b), dict(partition="batch", operation="lp", p=p, l1_factor=True), label=f"lp p={p}")
    gam = rng.standard_normal((4, 6, 1, 1))
    yield Example((x, gam, gam * 0.5), dict(partition="instance", recovery="generated"), label="generated affine (per sample)")
    spade = rng.standard_normal((4, 6, 3, 2))
    yield Example((x, spade, spade), dict(partition="batch", recovery="generated"), label="SPADE (per position)")
    # whitening (survey Eqn 23) on every partition; cond: κ(Σ + εI) of the worst group
    from .whitening import _call_cond

    for part, kw, op, c in [("batch", {}, "zca", 3), ("instance", {}, "cholesky", 2),
                            ("group", {"num_groups": 3}, "iternorm", 3), ("position", {}, "pca", 2),
                            ("layer", {"normalized_ndim": 2}, "newton_schulz", 2),
                            ("batch_group", {"num_groups": 3, "batch_groups": 2}, "zca", 3)]:
        wb = (None, None) if part == "layer" else (w, b)
        yield Example((x,) + wb, dict(partition=part, operation=op, group_size=c, **kw), label=f"{part}/{op}",
                      cond=_call_cond(x, partition=part, group_size=c, **kw))
    yield Example((x, gam, gam * 0.5), dict(partition="instance", operation="zca", group_size=3, recovery="generated"),
                  label="instance/zca, generated affine", cond=_call_cond(x, partition="instance", group_size=3))


@method(
    channels=_part.layout_params,
    array_params=("input", "weight", "bias"),
    survey="§5.1, Algorithm 1, Eqns 20-21",
    paper="Huang et al., Normalization Techniques in Training DNNs (TPAMI 2023)",
    examples=_examples_normalize,
)
def normalize(
    input: Any,
    weight: Any = None,
    bias: Any = None,
    *,
    partition: str = "batch",
    operation: str = "standardizing",
    recovery: str = "affine",
    num_groups: int = 1,
    batch_groups: int = 1,
    normalized_ndim: int = 1,
    eps: float = 1e-5,
    p: float = 2.0,
    l1_factor: bool = False,
    group_size: int | None = None,
    iterations: int = 5,
    sync: Any = None,
) -> Array:
    """Any partition × any operation × any recovery, from batch statistics (survey Algorithm 1).

    ``y = Ψ(Φ(Π(x)))`` reshaped back, with the partition Π (NAP), the operation Φ (NOP) and the
    recovery Ψ (NRR) chosen by ``partition``, ``operation`` and ``recovery``.

    Every argument is validated on every call, also one the call does not use (``p`` without
    ``"lp"``, ``iterations`` without an iterative whitening, ``num_groups``/``batch_groups``/
    ``normalized_ndim`` for a partition without them, ``l1_factor``): ``normalize(x, p=-1)`` is a
    ``ValueError`` even though standardizing ignores ``p``. An empty input gives an empty output and
    zero parameter gradients (as the presets, :mod:`normref.standardization`).

    ``sync`` (a reducer, :mod:`normref.distributed`): for the partitions whose statistics run over the
    batch (``"batch"``, ``"batch_group"``) the statistics pool every rank's input — as
    :func:`normref.batch_norm` (``"batch"``) and :func:`normref.batch_group_norm` (``"batch_group"``:
    batch group j is the union of the ranks' j-th chunks) with ``sync``; standardizing: forward one
    all_gather of 2K + 1 values (K statistics), backward one all_reduce_sum of 2K; centering K + 1
    and K; ``"lp"`` as :func:`normref.lp_batch_norm`. Other partitions are per sample (``sync`` must be
    ``None``: ``ValueError``).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input (layout ``(N, C, *spatial)``).
    weight : array or None, default None
        γ: shape (C,) for ``recovery="affine"`` (``normalized_shape`` for the layer partition);
        broadcastable to the input for ``"generated"`` (per sample, per position).
    bias : array or None, default None
        β, as ``weight``.
    partition : str, default "batch"
        NAP: ``"batch"``, ``"layer"`` (the last ``normalized_ndim`` axes), ``"instance"``,
        ``"group"`` (``num_groups``), ``"position"``, ``"batch_group"`` (``num_groups`` over channels,
        ``batch_groups`` over the batch).
    operation : str, default "standardizing"
        NOP: ``"centering"``, ``"scaling"`` (RMS), ``"standardizing"``, ``"lp"`` (Lp
        deviation, any ``p`` ≥ 1 or ``inf``), or whitening (survey Eqn 23,
        :class:`normref.whitening.Whitening`): ``"zca"``, ``"pca"``, ``"cholesky"``,
        ``"iternorm"``, ``"newton_schulz"`` (``iterations`` = T), decorrelating the partition's rows
        (``Partition.feature_axes``: channels for batch and instance, channel groups for group and
        batch_group, positions for position) in groups of ``group_size``.
    recovery : str, default "affine"
        NRR: ``"none"``, ``"affine"`` (γ, β of shape (C,), or ``normalized_shape`` for the
        layer partition), ``"generated"`` (γ, β broadcastable to the input: per sample, per position).
    num_groups : int, default 1
        The channel groups of ``"group"`` and ``"batch_group"``.
    batch_groups : int, default 1
        The batch groups of ``"batch_group"``.
    normalized_ndim : int, default 1
        The trailing axes of ``"layer"``.
    eps : float, default 1e-5
        ε, added to the variance (inside the square root) for standardizing and scaling, to the
        deviation (outside) for ``"lp"``, and to the covariance (Σ + εI, ε ≥ 0) for whitening.
    p : float, default 2.0
        p of ``"lp"`` (≥ 1 or ``inf``).
    l1_factor : bool, default False
        For ``"lp"`` with p = 1, multiply σ₁ by √(π/2).
    group_size : int or None, default None
        Features per whitening group (``None``: all of them).
    iterations : int, default 5
        T, the Newton steps of ``"iternorm"``/``"newton_schulz"``.
    sync : reducer or None, default None
        A reducer (see above).

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1 (Algorithm 1; Table 1), Eqn 23 (whitening).

    Examples: ``normalize(x, w, b, partition="group", num_groups=4)`` equals
    ``group_norm(x, 4, w, b)``, ``normalize(x, partition="position", operation="scaling")`` is pixel
    normalization, and ``normalize(x, partition="instance", operation="zca", group_size=16)`` is the
    per-sample ZCA whitening of style transfer (``batch_whitening(x, partition="instance",
    group_size=16)``).

    References
    ----------
    .. [1] L. Huang, J. Qin, Y. Zhou, F. Zhu, L. Liu and L. Shao, "Normalization Techniques in Training
       DNNs: Methodology, Analysis and Application", IEEE TPAMI 2023 (the survey; §5.1, Algorithm 1).
    """
    fn = "normalize"
    xp = namespace(fn, input=input, weight=weight, bias=bias)
    check_choice(fn, "partition", partition, _part.KINDS)
    from . import matfun as _mf

    whitening = operation in _mf.METHODS
    check_choice(fn, "operation", operation, tuple(_op.KINDS) + tuple(_mf.METHODS))
    check_choice(fn, "recovery", recovery, ("none", "affine", "generated"))
    if not whitening and group_size is not None:
        raise ValueError(f"{fn}: group_size applies to the whitening operations ({', '.join(_mf.METHODS)}); "
                         f"got group_size={group_size!r} with operation={operation!r}")
    # every argument is checked, also those this call does not use (p without "lp", iterations
    # without an iterative whitening, num_groups/batch_groups/normalized_ndim for a partition that
    # has none, l1_factor): a wrong value is a mistake even where this call ignores it
    p = check_p(fn, p)
    l1_factor = check_bool(fn, "l1_factor", l1_factor)
    iterations = check_int(fn, "iterations", iterations)
    sync = check_reducer(fn, sync)
    if sync is not None and partition not in ("batch", "batch_group"):
        raise ValueError(f"{fn}: sync= applies to the partitions over the batch ('batch', 'batch_group'); "
                         f"got partition={partition!r} (its statistics are per sample)")
    if sync is not None and operation == "scaling":
        raise ValueError(f"{fn}: sync= applies to operation 'standardizing', 'centering', 'lp' or a whitening "
                         f"operation; got operation='scaling'")
    eps = check_nonnegative(fn, "eps", eps) if operation == "centering" or whitening else check_positive(fn, "eps", eps)
    if not (operation == "centering" or whitening):
        check_eps_representable(fn, eps, xp, compute_dtype(xp, input.dtype))
    part = {
        "batch": _part.Partition("batch"),
        "layer": _part.Partition("layer", normalized_ndim=check_int(fn, "normalized_ndim", normalized_ndim)),
        "instance": _part.Partition("instance"),
        "group": _part.Partition("group", num_groups=check_int(fn, "num_groups", num_groups)),
        "position": _part.Partition("position"),
        "batch_group": _part.Partition(
            "batch_group",
            num_groups=check_int(fn, "num_groups", num_groups),
            batch_groups=check_int(fn, "batch_groups", batch_groups),
        ),
    }[partition]
    shape = tuple(input.shape)
    part.validate(fn, shape)
    empty = any(int(d) == 0 for d in shape)
    # One value per statistic makes x − μ ≡ 0. The presets differ on it, as torch does:
    # batch_norm / batch_group_norm / ghost_batch_norm / instance_norm raise in training (torch's
    # batch and instance norm do), group_norm / layer_norm / position_norm return the zeros
    # (torch's group and layer norm do). Scaling (RMS) uses no mean and is well defined.
    if (part.count(shape) < 2 and (operation in ("standardizing", "lp", "centering") or whitening)
            and partition in ("batch", "batch_group", "instance") and sync is None and not empty):
        raise ValueError(
            f"{fn}: the {partition} partition of input shape {shape} leaves 1 value per statistic; "
            f"expected more than 1 value per statistic for batch statistics (as batch_norm in training)"
        )
    if recovery == "none" and (weight is not None or bias is not None):
        raise ValueError(f"{fn}: recovery='none' takes no weight or bias; got weight={weight is not None}, bias={bias is not None}")
    if recovery == "affine":
        pshape = shape[-part.normalized_ndim:] if partition == "layer" else (shape[1],)
        check_param_shape(fn, "weight", weight, pshape, "per channel" if partition != "layer" else "the normalized shape")
        check_param_shape(fn, "bias", bias, pshape, "per channel" if partition != "layer" else "the normalized shape")
    elif recovery == "generated":
        check_broadcastable(fn, "weight", weight, shape)
        check_broadcastable(fn, "bias", bias, shape)

    if empty and sync is None:  # an empty input: empty output, zero parameter gradients (as torch)
        from .standardization import _empty_call

        return _empty_call(xp, input, (input, weight, bias))
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    gamma, beta = to_compute(xp, weight, cd), to_compute(xp, bias, cd)
    if recovery == "affine" and partition != "layer":
        gamma, beta = channel_param(xp, gamma, len(shape)), channel_param(xp, beta, len(shape))
    if whitening:
        from .whitening import whitening_operation

        # synchronized whitening (H5b): whitening_operation takes sync= (never dropped silently)
        op: _op.Operation = whitening_operation(fn, part, shape, operation, group_size, iterations, eps,
                                                **({} if sync is None else {"sync": sync}))
    else:
        op = _op.make(operation, eps=eps, p=p, l1_factor=l1_factor, sync=sync)
    y, op_res, _ = run_forward(xp, x, part, op, gamma, beta)
    res = pack(part, op, x, op_res, gamma, beta, extra=(
        None if weight is None else tuple(weight.shape), None if bias is None else tuple(bias.shape)))
    return xp.astype(y, input.dtype) if y.dtype != input.dtype else y, res


@normalize.defbackward
def _normalize_backward(res: Residuals, g):
    xp = namespace("normalize.backward", cotangent=g)
    dx, dg, db, _ = unpack_backward(xp, res, g)
    wshape, bshape = res.static.extra
    # per-channel γ, β were viewed as (1, C, 1, ...): their gradients go back in the caller's shape
    return dx, None if dg is None else xp.reshape(dg, wshape), None if db is None else xp.reshape(db, bshape)


# --------------------------------------------------------------------------------------------------
# Running statistics on the batch-type partitions (survey Eqn 18, §5.1.3 inference; issue 14 §2)


@result_tuple
class RunningResult(NamedTuple):
    """Output and running statistics of :func:`batch_normalize` after a training-mode call.

    Also of :func:`normref.batch_group_norm` with running statistics: each ``running_*`` field is the
    updated statistic, the given one unchanged where the operation keeps no such statistic, ``None``
    where none was given.

    Attributes
    ----------
    output : Array
        The output: the differentiable field.
    running_mean : Array or None
        The running mean.
    running_var : Array or None
        The running (unbiased) variance.
    running_mean_square : Array or None
        The running mean square (scaling operation).
    """

    output: Array
    running_mean: Array | None
    running_var: Array | None
    running_mean_square: Array | None


def per_channel(xp, stat, part: _part.Partition, c: int):
    """A statistic of the partition's view (keepdims) as one value per channel, shape (C,).

    The batch partition has one statistic per channel. The batch-group partition has one per (batch
    group, channel group): the batch groups are averaged (each is a sample of the same population
    statistic) and each channel group's value is given to its C/G channels, so that inference by
    population statistics is per channel, like batch normalization's."""
    if part.kind == "batch":
        return xp.reshape(stat, (c,))
    g = part.num_groups
    s = xp.mean(xp.reshape(stat, (part.batch_groups, g)), axis=0)
    return xp.reshape(xp.broadcast_to(xp.reshape(s, (g, 1)), (g, c // g)), (c,))


def running_call(fn, xp, input, part, operation, recovery, weight, bias, training, f, eps,
                 running_mean, running_var, running_mean_square, sync=None):
    """Forward of a batch-type partition with running statistics: ``(output, residuals)``.

    Training: batch statistics over ``part`` (the operation ``operation``), and the running statistics
    the operation estimates updated by factor ``f`` (Eqn 18; the variance unbiased by the values per
    statistic); the result is a :class:`RunningResult` when any running statistic is given.
    Inference: the population statistics per channel (constants in the backward, Eqn 16)."""
    from .standardization import _ema

    shape = tuple(input.shape)
    nd, c = len(shape), shape[1]
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    gamma, beta = to_compute(xp, weight, cd), to_compute(xp, bias, cd)
    if recovery == "affine":
        gamma, beta = channel_param(xp, gamma, nd), channel_param(xp, beta, nd)

    def chan(a):
        return channel_param(xp, to_compute(xp, a, cd), nd)

    if training:
        op = _op.make(operation, eps=eps, sync=sync)
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta)
    else:
        # x̂ = (x − μ̂)/√(σ̂² + ε) per channel, the partition's population statistics (constants):
        # centering is σ̂² + ε = 1, scaling (RMS) is μ̂ = 0 with σ̂² the mean square
        fwd_part = _part.Partition("batch")
        if operation == "standardizing":
            op, mean, var = _op.PopulationStandardizing(eps), chan(running_mean), chan(running_var)
        elif operation == "centering":
            mean = chan(running_mean)
            op, var = _op.PopulationStandardizing(1.0), xp.zeros_like(mean)
        else:
            var = chan(running_mean_square)
            op, mean = _op.PopulationStandardizing(eps), xp.zeros_like(var)
        part = fwd_part
        y, op_res, st = run_forward(xp, x, part, op, gamma, beta, mean=mean, var=var)
    res = pack(part, op, x, op_res, gamma, beta, extra=(
        None if weight is None else tuple(weight.shape), None if bias is None else tuple(bias.shape)))
    y = xp.astype(y, input.dtype) if y.dtype != input.dtype else y
    if not training or all(r is None for r in (running_mean, running_var, running_mean_square)):
        return y, res
    rm, rv, rms = running_mean, running_var, running_mean_square
    if operation in ("standardizing", "centering") and rm is not None:
        rm = _ema(xp, rm, per_channel(xp, st["mean"], part, c), f)
    if operation == "standardizing" and rv is not None:
        n = st.get("count", part.count(shape))  # values per statistic (the global count when synchronized)
        rv = _ema(xp, rv, per_channel(xp, st["var"], part, c) * (n / (n - 1)), f)
    if operation == "scaling" and rms is not None:
        rms = _ema(xp, rms, per_channel(xp, st["mean_square"], part, c), f)
    # state the operation keeps no estimate of comes back unchanged (a copy: results never alias inputs)
    rm, rv, rms = (r if r is None or r is not o else xp.asarray(r, copy=True)
                   for r, o in ((rm, running_mean), (rv, running_var), (rms, running_mean_square)))
    return RunningResult(y, rm, rv, rms), res


def _examples_batch_normalize(rng):
    x = rng.standard_normal((4, 6, 3, 2)) * 1.5 + 0.5
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    rm, rv, rms = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    gam = rng.standard_normal((4, 6, 1, 1))
    spade = rng.standard_normal((4, 6, 3, 2))
    for part, kw in [("batch", {}), ("batch_group", {"num_groups": 3, "batch_groups": 2})]:
        for op in ("standardizing", "centering", "scaling"):
            for training in (True, False):
                mode = "training" if training else "inference"
                yield Example((x, rm, rv, w, b), dict(partition=part, operation=op, training=training, momentum=0.3,
                                                      running_mean_square=rms, **kw), label=f"{part}/{op} {mode}")
        yield Example((x, rm, rv, gam, gam * 0.5), dict(partition=part, recovery="generated", training=True,
                                                        momentum=None, num_batches_tracked=2, **kw),
                      label=f"{part} conditional BN (per-sample γ, β), training, cumulative")
        yield Example((x, rm, rv, spade, spade), dict(partition=part, recovery="generated", training=False, **kw),
                      label=f"{part} SPADE (per-position γ, β), inference")


@method(
    channels=_part.layout_params,
    array_params=("input", "running_mean", "running_var", "weight", "bias", "running_mean_square"),
    nondiff=("running_mean", "running_var", "running_mean_square"),
    nullable=("running_mean", "running_var"),
    survey="§5.1, Algorithm 1 with running statistics (Eqn 18) and population statistics (§4 Eqn 16; §5.1.3)",
    paper="Ioffe & Szegedy, Batch Normalization, ICML 2015; de Vries et al. (conditional BN), NeurIPS 2017; "
          "Park et al. (SPADE), CVPR 2019",
    examples=_examples_batch_normalize,
)
def batch_normalize(
    input: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    partition: str = "batch",
    operation: str = "standardizing",
    recovery: str = "affine",
    num_groups: int = 1,
    batch_groups: int = 1,
    running_mean_square: Array | None = None,
    num_batches_tracked: int | None = None,
) -> Array | RunningResult:
    r"""Normalize over a batch-type partition with running statistics, with any recovery.

    Batch statistics in training, population statistics at inference, any recovery (affine or
    generated γ, β).

    .. math::

        \text{training: } \hat x = \Phi_{\mathcal B}(x), \quad
        s \leftarrow (1 - m)\, s + m\, s_{\mathcal B}; \qquad
        \text{inference: } \hat x = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}}; \qquad
        y = \gamma \odot \hat x + \beta

    :func:`normalize` with ``partition="batch"`` or ``"batch_group"`` computes from the batch only;
    this is its counterpart with state, as :func:`normref.batch_norm` is of batch statistics, so that
    the methods of survey §5.1.3 that generate γ, β — conditional BN (γ, β of shape (N, C, 1, ...)
    from a class embedding), SPADE (per position, (N, C, H, W)), instance-enhancement BN and
    attentive normalization (per-sample γ) — run end to end: trained with batch statistics, evaluated
    with population statistics.

    Parameters
    ----------
    input : Array
        (N, C, \*spatial).
    running_mean, running_var : Array or None, default None
        (C,) each: the running mean and the *unbiased* running variance (standardizing; centering
        uses ``running_mean`` only). Required at inference by the operations that use them.
    weight, bias : Array or None, default None
        γ, β: (C,) for ``recovery="affine"``; broadcastable to the input for ``"generated"`` (per
        sample, per position); ``None`` with ``recovery="none"``.
    training : bool, default False
        Batch statistics (and the running update) or population statistics.
    momentum : float or None, default 0.1
        m of the update s ← (1 − m)·s + m·s_B; ``None``: the cumulative average 1/(k + 1) over
        ``num_batches_tracked = k`` batches seen before, as torch.
    eps : float, default 1e-5
        ε, added to the variance (standardizing) or mean square (scaling); unused by centering.
    partition : {"batch", "batch_group"}, default "batch"
        Π_BN (statistics per channel over (N, \*spatial)) or Π_BGN (per group of ``num_groups``
        channel groups × ``batch_groups`` sample groups, Zhou et al. 2020).
    operation : {"standardizing", "centering", "scaling"}, default "standardizing"
        Φ: (x − μ)/√(σ² + ε), x − μ, or x/√(E[x²] + ε) (scaling-only BN, the running mean square
        ``running_mean_square``).
    recovery : {"affine", "generated", "none"}, default "affine"
        Ψ, as in :func:`normalize`.
    num_groups, batch_groups : int, default 1
        The batch-group partition's G and G_b.
    running_mean_square : Array or None, default None
        (C,): the running E[x²] of the scaling operation (initially 1).
    num_batches_tracked : int or None, default None
        k, for ``momentum=None``.

    Returns
    -------
    Array or RunningResult
        The output (input's shape and dtype); in training with any running statistic given,
        ``RunningResult(output, running_mean, running_var, running_mean_square)``.

    Notes
    -----
    Statistics are per channel, shape (C,), on both partitions. With ``"batch_group"`` the batch
    statistic of channel group g is averaged over the G_b batch groups and stored in each of the
    group's C/G channels; at inference every channel is standardized by its own entries (equal within
    a group when they come from this update), i.e. per-channel batch normalization by population
    statistics — the form :func:`normref.fold` and ``recalibrate`` handle. The variance is unbiased
    by n/(n − 1), n the values per statistic (N/G_b·C/G·∏spatial), as torch's BN does with its n.
    State the operation does not estimate (``running_var`` with centering, ``running_mean`` and
    ``running_var`` with scaling) is accepted, validated and returned unchanged, so that one layer's
    buffers serve every operation. In the backward the running statistics are constants (no
    gradient); training-mode gradients are those of :func:`normalize`. Survey §5.1 (Algorithm 1),
    Eqn 18 (running averages), §4 Eqn 16 (population statistics), §5.1.3 (generated recoveries).

    References
    ----------
    Ioffe & Szegedy, Batch Normalization, ICML 2015. de Vries et al., Modulating early visual
    processing by language (conditional BN), NeurIPS 2017. Park et al., Semantic Image Synthesis
    with Spatially-Adaptive Normalization (SPADE), CVPR 2019. Zhou et al., Towards Stabilizing Batch
    Statistics in Backward Propagation of Batch Normalization (BGN), ICLR 2020.
    """
    fn = "batch_normalize"
    from ._validate import check_momentum, check_ndim, check_nonnegative_values
    from .standardization import _check_nbt, _empty_call, _factor

    xp = namespace(fn, input=input, running_mean=running_mean, running_var=running_var, weight=weight,
                   bias=bias, running_mean_square=running_mean_square)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    check_choice(fn, "partition", partition, ("batch", "batch_group"))
    check_choice(fn, "operation", operation, ("standardizing", "centering", "scaling"))
    check_choice(fn, "recovery", recovery, ("none", "affine", "generated"))
    training = check_bool(fn, "training", training)
    momentum = check_momentum(fn, momentum)
    _check_nbt(fn, num_batches_tracked)
    num_groups = check_int(fn, "num_groups", num_groups)
    batch_groups = check_int(fn, "batch_groups", batch_groups)
    eps = check_nonnegative(fn, "eps", eps) if operation == "centering" else check_positive(fn, "eps", eps)
    if operation != "centering":
        check_eps_representable(fn, eps, xp, compute_dtype(xp, input.dtype))
    shape = tuple(input.shape)
    c = shape[1]
    for name, a in (("running_mean", running_mean), ("running_var", running_var),
                    ("running_mean_square", running_mean_square)):
        check_param_shape(fn, name, a, (c,), f"one value per channel, input.shape[1] = {c}")
    check_nonnegative_values(fn, "running_var", xp, running_var)
    check_nonnegative_values(fn, "running_mean_square", xp, running_mean_square, "a mean square")
    if operation == "standardizing" and (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        raise ValueError(f"{fn}: {given} and {missing} go together for standardizing; got {given} but {missing}=None")
    if not training:
        need = {"standardizing": ("running_mean", "running_var"), "centering": ("running_mean",),
                "scaling": ("running_mean_square",)}[operation]
        stats = {"running_mean": running_mean, "running_var": running_var, "running_mean_square": running_mean_square}
        absent = [k for k in need if stats[k] is None]
        if absent:
            raise ValueError(f"{fn}: operation={operation!r} at inference (training=False) needs "
                             f"{' and '.join(need)} (the population statistics); got {absent[0]}=None")
    part = (_part.Partition("batch") if partition == "batch"
            else _part.Partition("batch_group", num_groups=num_groups, batch_groups=batch_groups))
    # at inference the statistics are per channel and each sample is normalized alone: the batch
    # need not split into batch groups (a single sample is fine), the channels must split into groups
    (part if training or partition == "batch" else _part.Partition("batch_group", num_groups=num_groups)
     ).validate(fn, shape)
    empty = any(int(d) == 0 for d in shape)
    if training and operation != "scaling" and part.count(shape) < 2 and not empty:
        raise ValueError(f"{fn}: the {partition} partition of input shape {shape} leaves 1 value per statistic; "
                         f"expected more than 1 value per statistic for batch statistics in training")
    if recovery == "none" and (weight is not None or bias is not None):
        raise ValueError(f"{fn}: recovery='none' takes no weight or bias; got weight={weight is not None}, "
                         f"bias={bias is not None}")
    if recovery == "affine":
        check_param_shape(fn, "weight", weight, (c,), "per channel")
        check_param_shape(fn, "bias", bias, (c,), "per channel")
    elif recovery == "generated":
        check_broadcastable(fn, "weight", weight, shape)
        check_broadcastable(fn, "bias", bias, shape)
    has_state = any(r is not None for r in (running_mean, running_var, running_mean_square))
    f = _factor(fn, momentum, num_batches_tracked) if training and has_state else None
    if empty:  # an empty output, the state back unchanged (copies), zero parameter gradients
        y, res = _empty_call(xp, input, (input, running_mean, running_var, weight, bias, running_mean_square))
        if training and has_state:
            return RunningResult(y, *(None if r is None else xp.asarray(r, copy=True)
                                      for r in (running_mean, running_var, running_mean_square))), res
        return y, res
    return running_call(fn, xp, input, part, operation, recovery, weight, bias, training, f, eps,
                        running_mean, running_var, running_mean_square)


@batch_normalize.defbackward
def _batch_normalize_backward(res: Residuals, g):
    xp = namespace("batch_normalize.backward", cotangent=g)
    dx, dg, db, _ = unpack_backward(xp, res, g)
    wshape, bshape = res.static.extra
    return (dx, None, None, None if dg is None else xp.reshape(dg, wshape),
            None if db is None else xp.reshape(db, bshape), None)
