"""Folding a torch model's eval-mode normalization layers into its convolutions and linear layers.

:func:`fold` is :func:`normref.folding.fold` applied to a model: in every ``nn.Sequential`` of the
model, an eval-mode normalization layer with population statistics (normref's ``BatchNorm*d``,
``InstanceNorm*d`` with ``track_running_stats``, the :class:`~normref.backends.torch.StatefulNorm`
layers of the methods in :data:`normref.folding.FOLDABLE` — ``BatchRenorm``, ``GhostBatchNorm``,
``LpBatchNorm``, ``MeanOnlyBatchNorm``, ``BatchWhitening`` (batch partition),
``DecorrelatedBatchNorm``, ``IterNorm``, ``WhiteningColoring``, ``BatchGroupNorm`` and any other
``StatefulNorm("<method>", ...)`` of that list, ``OnlineNorm``, ``PowerNorm`` — and torch's own ``BatchNorm*d`` / ``InstanceNorm*d``) is an affine map y_g = A_g·x_g + c_g (:func:`normref.folding.inference_affine`)
and is folded into

1. the ``nn.Conv1d/2d/3d`` or ``nn.Linear`` right before it (W' = A·W, b' = A·b + c), or else
2. the one right after it (``nn.Flatten()`` in between allowed for a linear layer):
   W'[o, i, k] = Σ_j W[o, j, k]·A[j, i], b' = b + Σ_{j,k} W[o, j, k]·c[j] — only when that
   convolution does not pad with zeros (a zero border of y is not a zero border of x), so
   ``padding=0`` or a replicate/reflect/circular ``padding_mode``;

and replaced by ``nn.Identity()``. torch's ``fuse_conv_bn_eval`` stops at batch norm; this folds
whitening too. Layers in training mode, layers without population statistics, convolution groups
that a whitening group would straddle, zero-padded convolutions after a norm, and a ``nn.Linear``
right before/after a norm unless ``fold(..., example_input=x)`` showed that norm's input is (N, C)
(a Linear mixes the last axis, the channel axis only then; ``norm → nn.Flatten() → Linear`` needs
no example) are left as they are. Modules that call their children from a custom ``forward`` are not rewritten (their data flow
is not known); their ``nn.Sequential`` children are.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from normref.folding import FOLDABLE, NormAffine, inference_affine
from normref.folding import fold as _pure_fold

__all__ = ["fold", "layer_affine"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached float64 copy (the folding is computed in float64, then cast to the layer's dtype)."""
    return None if t is None else t.detach().to(torch.float64)


def layer_affine(module: nn.Module) -> NormAffine | None:
    """(A, c) of a normalization layer at inference, or ``None`` when it is not an affine map now.

    Parameters
    ----------
    module : nn.Module
        A normalization layer: normref's or torch's ``BatchNorm*d`` / ``InstanceNorm*d``, a
        :class:`~normref.backends.torch.StatefulNorm` layer, or ``OnlineNorm`` / ``PowerNorm``
        (their eval-mode call: by the running statistics, as batch norm / scaling only).

    Returns
    -------
    NormAffine or None
        ``matrix`` A (G, d, d) and ``shift`` c (C,) in float64 (:func:`normref.folding.inference_affine`
        of the layer's inference call); ``None`` for a layer in training mode, one without population
        statistics (``track_running_stats=False``), a method outside :data:`normref.folding.FOLDABLE`,
        or any other module.

    Notes
    -----
    Survey §5.3.2. The map is y_g = A_g·x_g + c_g, A = γ/√(σ̂² + ε), c = β − A·μ̂ for batch/instance
    norm, A_g = diag(γ_g)·W(Σ̂_g + ε·I) for whitening (see :mod:`normref.folding`).

    References
    ----------
    Jacob et al., CVPR 2018 (§3.2, folding); Huang et al., Decorrelated Batch Normalization, CVPR 2018.
    """
    from .modules import StatefulNorm
    from .online import _BackwardStateNorm

    if module.training:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # normref's drop-ins subclass torch's
        if module.running_mean is None or module.running_var is None:
            return None
        return inference_affine("batch_norm", _wide(module.running_mean), _wide(module.running_var),
                                _wide(module.weight), _wide(module.bias), eps=module.eps)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if not module.track_running_stats or module.running_mean is None:
            return None
        return inference_affine("instance_norm", _wide(module.running_mean), _wide(module.running_var),
                                _wide(module.weight), _wide(module.bias), use_input_stats=False, eps=module.eps)
    if isinstance(module, StatefulNorm):
        if module.normref_method not in FOLDABLE or not module.track_running_stats:
            return None
        if getattr(module, "partition", "batch") != "batch":
            return None
        kwargs: dict[str, Any] = {p: getattr(module, p) for p in module._static_names}
        kwargs[module._flag] = False
        for p in module._param_names + module._state_names:
            kwargs[p] = _wide(getattr(module, p))
        return inference_affine(module.normref_method, **kwargs)
    if isinstance(module, _BackwardStateNorm):  # OnlineNorm, PowerNorm: their buffers are the call's state
        if module.normref_method not in FOLDABLE:
            return None
        kwargs = dict(module._static(), training=False)  # eval: the forward's running statistics
        for p in module._forward_state_names + module._backward_state_names + ("weight", "bias"):
            kwargs[p] = _wide(getattr(module, p))
        return inference_affine(module.normref_method, **kwargs)
    return None


def _zero_padded(conv: nn.Module) -> bool:
    if isinstance(conv, nn.Linear) or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):  # "valid" pads nothing; "same" pads unless every kernel size is 1
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _folded(layer: nn.Module, affine: NormAffine, side: str) -> nn.Module | None:
    """A copy of ``layer`` with the norm folded in, or ``None`` where it cannot be folded exactly."""
    groups = getattr(layer, "groups", 1)
    try:
        w, b = _pure_fold(affine, _wide(layer.weight), _wide(layer.bias), layer=side, groups=groups)
    except ValueError:  # channel counts that do not match, or a whitening group straddling conv groups
        return None
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(w.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    new.bias = nn.Parameter(b.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    return new


def _norm_axis(norm: nn.Module, shapes: list | None) -> int | None:
    """The channel axis of ``norm``'s input: 1 (batched), 0 (an unbatched instance norm input), or
    ``None`` when it is not known (no recorded shapes and an instance norm, which takes both)."""
    inst = isinstance(norm, nn.modules.instancenorm._InstanceNorm)
    if not shapes:
        return None if inst else 1  # batch-type norms normalize over N: a batch axis is always there
    axes = {0 if inst and len(sh) == norm._get_no_batch_dim() else 1 for sh in shapes}
    return axes.pop() if len(axes) == 1 else None


def _acts_on_channels(layer: nn.Module, norm: nn.Module, shapes: list | None, flattened: bool) -> bool:
    """Whether ``layer`` next to ``norm`` mixes exactly the norm's channel axis (so the fold is exact).

    A ``ConvNd`` mixes axis 1 (axis 0 of an unbatched (C, *spatial) input); a ``Linear`` mixes the
    LAST axis, which is the norm's channel axis only for a 2-D (N, C) input, or after ``nn.Flatten()``
    of a batched (N, C, *spatial) input (channel-major features). ``shapes``: the norm's input shapes
    seen by ``fold``'s ``example_input`` call, or ``None`` (not known: a convolution is assumed batched
    as the norm's input, a Linear right next to a norm is refused — nothing shows it sees (N, C)).
    """
    if shapes is None and not isinstance(layer, nn.Linear):
        return True  # a convolution and the norm take the same batched (or both unbatched) input
    axis = _norm_axis(norm, shapes)
    if axis is None:
        return False
    if isinstance(layer, nn.Linear):
        if flattened:  # Flatten(1, -1) of (N, C, *spatial): features channel-major, c·K + k
            return axis == 1
        return shapes is not None and axis == 1 and all(len(sh) == 2 for sh in shapes)
    nd = len(layer.kernel_size)  # ConvNd: batched (N, C, *nd) or unbatched (C, *nd)
    return all(len(sh) in (nd + 1, nd + 2) and axis == (0 if len(sh) == nd + 1 else 1) for sh in shapes)


def _fold_sequential(seq: nn.Sequential, shapes: dict[int, list] | None) -> int:
    names = list(seq._modules)
    done = 0
    for i, name in enumerate(names):
        norm = seq._modules[name]
        affine = layer_affine(norm)
        if affine is None:
            continue
        seen = None if shapes is None else (shapes.get(id(norm)) or None)  # not reached by the call: unknown
        prev = seq._modules[names[i - 1]] if i > 0 else None
        if isinstance(prev, _LAYERS) and _acts_on_channels(prev, norm, seen, False):
            new = _folded(prev, affine, "before")
            if new is not None:
                seq._modules[names[i - 1]] = new
                seq._modules[name] = nn.Identity()
                done += 1
                continue
        j = i + 1
        nxt = seq._modules[names[j]] if j < len(names) else None
        flattened = False
        if isinstance(nxt, nn.Flatten) and nxt.start_dim == 1 and nxt.end_dim == -1 and j + 1 < len(names):
            j += 1
            nxt = seq._modules[names[j]]
            flattened = True
            if not isinstance(nxt, nn.Linear):
                continue
        if isinstance(nxt, _LAYERS) and not _zero_padded(nxt) and _acts_on_channels(nxt, norm, seen, flattened):
            if isinstance(nxt, nn.Linear) and not flattened and nxt.in_features != affine.shift.shape[0]:
                continue  # (N, C) → Linear: in_features is C itself, not a multiple of it
            new = _folded(nxt, affine, "after")
            if new is not None:
                seq._modules[names[j]] = new
                seq._modules[name] = nn.Identity()
                done += 1
    return done


def _input_shapes(model: nn.Module, example_input: Any) -> dict[int, list]:
    """{id(norm module of ``model``): [its input shapes]} from one forward of a throwaway copy of ``model``
    on ``example_input`` (a tensor, or a tuple of the forward's positional arguments), without gradients."""
    probe = copy.deepcopy(model)  # a training-mode layer would update its buffers: never the model's own
    seen: dict[int, list] = {}
    hooks = []

    def record(mod: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.setdefault(id(mod), []).append(tuple(args[0].shape))

    for m in probe.modules():  # every module (cheap): the norms among them are looked up by name
        hooks.append(m.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            probe(*example_input) if isinstance(example_input, tuple) else probe(example_input)
    finally:
        for h in hooks:
            h.remove()
    theirs = dict(probe.named_modules(remove_duplicate=False))
    return {id(m): seen.get(id(theirs[n]), []) for n, m in model.named_modules(remove_duplicate=False) if n in theirs}


def fold(model: nn.Module, *, inplace: bool = False, example_input: Any = None) -> nn.Module:
    """The model with its eval-mode normalization layers folded into adjacent convolution/linear layers.

    For each normalization layer of an ``nn.Sequential`` that is affine now (:func:`layer_affine`),
    y_g = A_g·x_g + c_g, the layer before it (``nn.Conv1d/2d/3d``, ``nn.Linear``) becomes
    W' = A·W, b' = A·b + c; failing that, the layer after it becomes W'[o, i, k] = Σ_j W[o, j, k]·A[j, i],
    b' = b + Σ_{j,k} W[o, j, k]·c[j] (not zero-padded; a ``nn.Flatten()`` may sit before a linear
    layer); the norm becomes ``nn.Identity()``. The neighbour must mix the norm's channel axis: a
    convolution does (axis 1); a ``Linear`` mixes the *last* axis, which is the channel axis only for
    an (N, C) input, so a Linear right before/after a norm is folded only when ``example_input``
    shows that norm's input is 2-D (N, C); ``norm → nn.Flatten() → Linear`` always folds (the
    features are channel-major).

    Parameters
    ----------
    model : nn.Module
        The model; its normalization layers are folded where they are in eval mode (``model.eval()``).
    inplace : bool
        ``False`` (default): fold a deep copy and leave ``model`` as it is; ``True``: rewrite ``model``.
    example_input : torch.Tensor, tuple or None
        An input of the model (a tuple: the forward's positional arguments). ``fold`` runs a throwaway
        copy of the model on it once (no gradients; ``model`` itself is not run, so no buffer of it
        changes) and records each norm layer's input shape: a ``Linear`` next to a norm folds only when
        that norm saw (N, C) inputs, and a convolution only when it and the norm share the channel
        axis. ``None`` (default): no shapes are known; a ``Linear`` right next to a norm is left as it
        is (a norm on (N, C, L) or (N, C, H, W) with a Linear on the last axis is a valid model, and
        folding it would change the output), convolutions are folded assuming batched inputs.

    Returns
    -------
    nn.Module
        The folded model (its ``normref_folded`` attribute: the number of layers folded). Its output
        equals the unfolded model's to rounding (computed in float64, cast to each layer's dtype).

    Notes
    -----
    Survey §5.3.2: at inference every standardization and whitening of the batch partition is an
    affine map, so it folds into the neighbouring linear map; see :func:`normref.folding.fold` for the
    formulas and :mod:`normref.backends.torch.folding` for what is left unfolded.

    References
    ----------
    Jacob et al., Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference, CVPR 2018 (§3.2); Ioffe & Szegedy, ICML 2015 (§3.1); Huang et al., CVPR 2018.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"fold: inplace must be a bool; got {type(inplace).__name__}")
    if example_input is not None and not (isinstance(example_input, torch.Tensor) or (
            isinstance(example_input, tuple) and example_input)):
        raise TypeError(f"fold: example_input must be a torch.Tensor, a non-empty tuple of the forward's "
                        f"arguments, or None; got {type(example_input).__name__}")
    out = model if inplace else copy.deepcopy(model)
    shapes = None if example_input is None else _input_shapes(out, example_input)
    done = 0
    for m in list(out.modules()):
        if isinstance(m, nn.Sequential):
            done += _fold_sequential(m, shapes)
    out.normref_folded = done
    return out
