"""Re-estimating a torch model's population statistics after training (survey §5.3.2).

``recalibrate(model, batches)`` is the counterpart of ``torch.optim.swa_utils.update_bn`` that covers
every normref layer — ``StatefulNorm`` and the layers generated from it (``IterNorm``,
``BatchWhitening2d``, ``BatchRenorm2d``, ``BatchGroupNorm``, ...), normref's ``BatchNorm*d`` and
``InstanceNorm*d`` with running statistics, ``PowerNorm``, the windowed layers (MABN, memorized BN,
CBN), any later layer with a ``normref_method`` and ``running_*`` buffers — and torch's own
batch-norm layers; ``OnlineNorm`` is refused with the reason (a per-sample stream). torch's ``update_bn``
only resets and re-runs ``torch.nn.modules.batchnorm._BatchNorm`` layers, so a ``StatefulNorm``
layer silently keeps its old statistics there.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

import normref
from normref.inference import (_FLAGS, _NOT_RECALIBRATED, PooledMoments, _state_names, check_pooled, uses,
                               recalibrate as _recalibrate_pure)

from .modules import _NormrefBatchNorm, _NormrefInstanceNorm

__all__ = ["recalibrate"]


#: the arguments recalibrate sets itself (the update factor, the counter, the training flag)
_SET_HERE = frozenset(("momentum", "num_batches_tracked", "alpha_fwd") + _FLAGS)
#: options that shape a layer's window of past statistics, which recalibrate does not pass (each batch's
#: own statistics: with the weights frozen, the window's are those of the trained weights)
_WINDOW_ONLY = {"memorized_batch_norm": ("memory_weights",), "moving_average_batch_norm": ("rmax",)}


def _spec(m: nn.Module):
    """(method, state names, other arguments, counts batches) of a layer with population statistics,
    None for a layer without any, or a str: the reason its statistics cannot be recalibrated.

    torch's and normref's batch and instance norm layers by class; every other layer by its
    ``normref_method`` attribute (``StatefulNorm`` and its subclasses, ``PowerNorm``, the windowed
    layers of :mod:`normref.backends.torch.cross_iteration`, any later layer that follows the
    convention): its population statistics are its non-``None`` buffers named as the method's
    ``running_*`` arguments; its other arguments are its ``weight``/``bias`` and the keyword options it
    keeps as attributes (``_static_names``), less those recalibrate sets and those of its window."""
    is_bn = isinstance(m, (_NormrefBatchNorm, nn.modules.batchnorm._BatchNorm))
    is_in = isinstance(m, (_NormrefInstanceNorm, nn.modules.instancenorm._InstanceNorm))
    if is_bn or is_in:
        if m.track_running_stats and m.running_mean is not None:
            return ("batch_norm" if is_bn else "instance_norm"), ["running_mean", "running_var"], {"eps": m.eps}, True
        return None
    name = getattr(m, "normref_method", None)
    if not isinstance(name, str):
        return None
    meth = normref.get(name)
    buffers = dict(m.named_buffers(recurse=False))
    state = [p for p in _state_names(meth) if buffers.get(p) is not None]
    if not state or not any(f in meth.signature.parameters for f in _FLAGS):
        return None  # no population statistics (a stateless method, or track_running_stats=False)
    if name in _NOT_RECALIBRATED:
        return f"{name} cannot be recalibrated from batches: {_NOT_RECALIBRATED[name]}"
    params = meth.signature.parameters
    skip = _SET_HERE | set(meth.nondiff) | set(_WINDOW_ONLY.get(name, ())) | {meth.array_params[0]}
    names = list(getattr(m, "_static_names", ())) + list(getattr(m, "_param_names", ("weight", "bias")))
    args = {p: getattr(m, p) for p in dict.fromkeys(names) if p in params and p not in skip and hasattr(m, p)}
    # the iteration counter of a method without one (the windowed layers' schedules) is the layer's own
    return name, state, args, "num_batches_tracked" in params


def recalibrate(model: nn.Module, batches: Iterable[Any], *, estimator: str = "average",
                device: Any = None, pooled_unbiased: bool = True) -> nn.Module:
    """Re-estimate the population statistics of every normalization layer of ``model``, weights frozen.

    Every normref (and torch) normalization layer of ``model``, from ``batches``: Ioffe & Szegedy's
    Algorithm 2 (``estimator="average"``, the default, as torch's ``update_bn``), "precise BN"
    (``estimator="pooled"``: the exact moments of all the layer's inputs) or AdaBN (batches from a
    target domain).

    .. math::

        \\hat s_\\ell = \\frac1K \\sum_{k=1}^{K} s_\\ell(\\mathcal B_k) \\quad\\text{(average)}, \\qquad
        \\hat\\mu_\\ell, \\hat\\sigma^2_\\ell, \\hat\\Sigma_\\ell \\text{ of } \\bigcup_k \\mathcal B_k
        \\quad\\text{(pooled)}

    Parameters
    ----------
    model : torch.nn.Module
        Any model; its layers with running statistics are recalibrated: normref's ``StatefulNorm``
        layers (every ``running_*`` buffer: means, variances, covariances, mean squares, ...),
        ``BatchNorm*d``/``SyncBatchNorm`` and ``InstanceNorm*d(track_running_stats=True)``,
        ``PowerNorm`` (its ``running_mean_square``), the windowed layers ``MovingAverageBatchNorm*``
        (``running_mean_square``), ``MemorizedBatchNorm*`` and ``CrossIterationBatchNorm*``
        (``running_mean``, ``running_var``), and torch's own batch and instance norm layers. Any
        other layer with a ``normref_method`` attribute and buffers named as that method's
        ``running_*`` arguments is recalibrated the same way. A model holding an ``OnlineNorm``
        (its statistics are a per-sample stream) is refused (``TypeError``, before any work).
    batches : iterable
        Model inputs, one per batch (a tensor, or a tuple/list whose first element is the input,
        as a ``DataLoader`` yields ``(input, target)``), moved to ``device`` when given.
    estimator : {"average", "pooled"}
        As :func:`normref.recalibrate`.
    device : torch.device or None
        Where to move each batch.
    pooled_unbiased : bool, default True
        As :func:`normref.recalibrate`: ``False`` gives the biased pooled variance (÷ M) of fvcore's
        precise BN; only with ``estimator="pooled"``.

    Returns
    -------
    torch.nn.Module
        ``model``, its running statistics replaced by the estimates (in place, as ``update_bn``),
        ``num_batches_tracked`` set to the number of batches; its parameters and training mode are
        unchanged.

    Notes
    -----
    The model runs in training mode under ``torch.no_grad`` (as ``update_bn``: each layer sees the
    activations of the network normalizing by batch statistics). A forward pre-hook hands each
    layer's input to :func:`normref.recalibrate` with that layer's method and arguments (so every
    method's own statistics are estimated, with no second implementation), and a forward hook puts
    the layer's buffers back after each batch, so that the layers keep their trained state during the
    pass (batch renormalization measures r, d against it). Synchronized layers are recalibrated with
    local statistics (run the same batches on every rank for identical estimates). Each layer is called
    without its window of past statistics (memorized BN, CBN, MABN: each batch's own statistics enter
    the estimate, since the window holds statistics of the weights as they were in training) and keeps
    its window, its backward state (``PowerNorm``'s ``grad_correlation``) and, for the windowed layers,
    its iteration counter ``num_batches_tracked`` (it drives their schedules); the other layers'
    ``num_batches_tracked`` is set to the number of batches. Every module's own training flag is
    restored afterwards. Survey §5.3.2.

    References
    ----------
    Ioffe & Szegedy, Batch Normalization, ICML 2015 (Algorithm 2). Li et al., AdaBN, ICLR Workshop
    2017. Wu & Johnson, Rethinking "Batch" in BatchNorm, 2021 (precise BN).
    """
    fn = "normref.backends.torch.recalibrate"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module; got {type(model).__name__}")
    if estimator not in ("average", "pooled"):
        raise ValueError(f"{fn}: estimator must be 'average' or 'pooled'; got {estimator!r}")
    if isinstance(batches, torch.Tensor) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{fn}: batches must be an iterable of model inputs (one per batch); "
                        f"got {type(batches).__name__}")
    if not isinstance(pooled_unbiased, bool):
        raise TypeError(f"{fn}: pooled_unbiased must be a bool; got {type(pooled_unbiased).__name__} "
                        f"{pooled_unbiased!r}")
    if not pooled_unbiased and estimator != "pooled":
        raise ValueError(f"{fn}: pooled_unbiased=False (the biased pooled variance) applies to estimator='pooled'; "
                         f"got estimator={estimator!r}")
    layer_names = {id(m): n for n, m in model.named_modules()}
    layers = []
    for m in model.modules():
        s = _spec(m)
        if isinstance(s, str):  # refused, before any work
            raise TypeError(f"{fn}: layer {layer_names[id(m)]!r} ({type(m).__name__}): {s}")
        if s is not None:
            method, state, others, counted = s
            # the statistics the layer normalizes with (batch_normalize: its operation's only) are re-estimated
            layers.append((m, (method, state, others, counted, uses(method, others, state))))
    if estimator == "pooled":  # every layer must take it, before any work
        for m, (method, state, others, _, used) in layers:
            try:
                check_pooled(fn, method, used, others)
            except ValueError as e:
                raise ValueError(f"{e} (layer {layer_names[id(m)]!r}, {type(m).__name__})") from None
    acc: dict = {}
    hooks = []
    counts = {id(m): 0 for m, _ in layers}

    def first_param(m):  # the name of the input in the layer's forward (a layer may be called input=x)
        try:
            return next(iter(inspect.signature(m.forward).parameters), "input")
        except (TypeError, ValueError):
            return "input"

    inputs = {id(m): first_param(m) for m, _ in layers}

    def pre_hook(m, args, kwargs, spec):
        method, names, others, _, used = spec
        x = args[0] if args else kwargs.get(inputs[id(m)], kwargs.get("input"))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: layer {layer_names[id(m)]!r} ({type(m).__name__}) was called without a tensor "
                            f"input (positional, or by the name {inputs[id(m)]!r})")
        x = x.detach()
        if any(int(d) == 0 for d in x.shape):
            return
        state = {p: getattr(m, p) for p in names}
        k = counts[id(m)] = counts[id(m)] + 1
        if estimator == "pooled":
            if id(m) not in acc:
                cov = state.get("running_cov")
                acc[id(m)] = PooledMoments(None if cov is None else int(cov.shape[-1]))
            acc[id(m)].add(x)
            return
        new = _recalibrate_pure(method, [x], state, **others)
        old = acc.get(id(m))
        acc[id(m)] = new if old is None else {p: old[p] + (new[p] - old[p]) / k for p in used}

    # every buffer of each layer as trained (running statistics, num_batches_tracked, other state)
    snapshots = {id(m): {p: b.detach().clone() for p, b in m.named_buffers(recurse=False) if b is not None}
                 for m, _ in layers}

    def restore(m):
        with torch.no_grad():
            for p, v in snapshots[id(m)].items():
                getattr(m, p).copy_(v)

    def post_hook(m, args, output):
        restore(m)

    for m, s in layers:
        hooks.append(m.register_forward_pre_hook(lambda mod, args, kwargs, s=s: pre_hook(mod, args, kwargs, s),
                                                 with_kwargs=True))
        hooks.append(m.register_forward_hook(post_hook))
    modes = [(mod, mod.training) for mod in model.modules()]  # each module's own flag, restored after
    try:
        model.train()
        n_batches = 0
        with torch.no_grad():
            for b in batches:
                x = b[0] if isinstance(b, (tuple, list)) else b
                if device is not None:
                    x = x.to(device)
                model(x)
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
        for mod, flag in modes:
            mod.training = flag
        for m, _ in layers:  # the pass changes no buffer unless it completes
            restore(m)
    if n_batches == 0:
        raise ValueError(f"{fn}: batches is empty; expected at least one batch")
    with torch.no_grad():
        for m, (method, names, _, counted, used) in layers:
            if id(m) not in acc:
                continue  # the layer saw no (non-empty) input in this pass: left as it was
            est = acc[id(m)].estimates(used, unbiased=pooled_unbiased) if estimator == "pooled" else acc[id(m)]
            for p in used:
                buf = getattr(m, p)
                buf.copy_(est[p].to(buf.dtype))
            if counted and getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(counts[id(m)])
    return model
