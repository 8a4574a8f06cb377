"""Re-estimating a torch model's population statistics after training (survey §5.3.2).

``recalibrate(model, batches)`` is the counterpart of ``torch.optim.swa_utils.update_bn`` that covers
every normref layer — ``StatefulNorm`` and the layers generated from it (``IterNorm``,
``BatchWhitening2d``, ``BatchRenorm2d``, ``BatchGroupNorm``, ...), normref's ``BatchNorm*d`` and
``InstanceNorm*d`` with running statistics — and torch's own batch-norm layers. torch's ``update_bn``
only resets and re-runs ``torch.nn.modules.batchnorm._BatchNorm`` layers, so a ``StatefulNorm``
layer silently keeps its old statistics there.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from normref.inference import PooledMoments, check_pooled, recalibrate as _recalibrate_pure

from .modules import StatefulNorm, _NormrefBatchNorm, _NormrefInstanceNorm

__all__ = ["recalibrate"]


def _spec(m: nn.Module):
    """(method, state names, other arguments) of a layer with running statistics, or None."""
    if isinstance(m, StatefulNorm):
        if not m.track_running_stats:
            return None
        state = [p for p in m._state_names if p.startswith("running_")]
        if not state:
            return None
        args = {p: getattr(m, p) for p in m._static_names if p != "momentum"}
        args.update({p: getattr(m, p) for p in m._param_names})
        return m.normref_method, state, args
    is_bn = isinstance(m, (_NormrefBatchNorm, nn.modules.batchnorm._BatchNorm))
    is_in = isinstance(m, (_NormrefInstanceNorm, nn.modules.instancenorm._InstanceNorm))
    if (is_bn or is_in) and m.track_running_stats and m.running_mean is not None:
        return ("batch_norm" if is_bn else "instance_norm"), ["running_mean", "running_var"], {"eps": m.eps}
    return None


def recalibrate(model: nn.Module, batches: Iterable[Any], *, estimator: str = "average",
                device: Any = None) -> nn.Module:
    """Re-estimate the population statistics of every normref (and torch) normalization layer of
    ``model`` from ``batches``, with the weights frozen: Ioffe & Szegedy's Algorithm 2
    (``estimator="average"``, the default, as torch's ``update_bn``), "precise BN"
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
        ``BatchNorm*d``/``SyncBatchNorm`` and ``InstanceNorm*d(track_running_stats=True)``, and torch's
        own batch and instance norm layers.
    batches : iterable
        Model inputs, one per batch (a tensor, or a tuple/list whose first element is the input,
        as a ``DataLoader`` yields ``(input, target)``), moved to ``device`` when given.
    estimator : {"average", "pooled"}
        As :func:`normref.recalibrate`.
    device : torch.device or None
        Where to move each batch.

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
    local statistics (run the same batches on every rank for identical estimates). Survey §5.3.2.

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
    layers = [(m, s) for m in model.modules() if (s := _spec(m)) is not None]
    if estimator == "pooled":  # every layer must take it, before any work
        names = {id(m): n for n, m in model.named_modules()}
        for m, (method, state, others) in layers:
            try:
                check_pooled(fn, method, state, others)
            except ValueError as e:
                raise ValueError(f"{e} (layer {names[id(m)]!r}, {type(m).__name__})") from None
    acc: dict = {}
    hooks = []
    counts = {id(m): 0 for m, _ in layers}

    def pre_hook(m, args, spec):
        method, names, others = spec
        x = args[0].detach()
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
        acc[id(m)] = new if old is None else {p: old[p] + (new[p] - old[p]) / k for p in names}

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
        hooks.append(m.register_forward_pre_hook(lambda mod, args, s=s: pre_hook(mod, args, s)))
        hooks.append(m.register_forward_hook(post_hook))
    was_training = model.training
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
        model.train(was_training)
        for m, _ in layers:  # the pass changes no buffer unless it completes
            restore(m)
    if n_batches == 0:
        raise ValueError(f"{fn}: batches is empty; expected at least one batch")
    with torch.no_grad():
        for m, (method, names, _) in layers:
            if id(m) not in acc:
                continue  # the layer saw no (non-empty) input in this pass: left as it was
            est = acc[id(m)].estimates(names) if estimator == "pooled" else acc[id(m)]
            for p in names:
                buf = getattr(m, p)
                buf.copy_(est[p].to(buf.dtype))
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(counts[id(m)])
    return model
