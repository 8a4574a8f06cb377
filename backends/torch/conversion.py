"""Swapping a built model's torch normalization layers for normref's drop-ins, and back (issue 16).

:func:`convert` is to normref what ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` is to
``SyncBatchNorm``: every ``torch.nn`` normalization layer of the model becomes normref's drop-in of
the same class, computing the same function with normref's forward and analytic backward;
``convert(model, back=True)`` (or :func:`unconvert`) turns normref's drop-ins back into torch's.

=========================================  ===========================================
torch                                      normref (``normref.backends.torch``)
=========================================  ===========================================
``nn.BatchNorm1d/2d/3d``                   ``BatchNorm1d/2d/3d``
``nn.SyncBatchNorm``                       ``SyncBatchNorm``
``nn.InstanceNorm1d/2d/3d``                ``InstanceNorm1d/2d/3d``
``nn.LayerNorm``                           ``LayerNorm``
``nn.GroupNorm``                           ``GroupNorm``
``nn.RMSNorm``                             ``RMSNorm``
``nn.LocalResponseNorm``                   ``LocalResponseNorm``
=========================================  ===========================================

What is kept: the drop-ins subclass torch's classes and add no state of their own, so the new layer
takes the old one's attributes as they are — the *same* ``Parameter`` and buffer objects (an
optimizer built on ``model.parameters()`` keeps working; device, dtype and ``requires_grad`` are
theirs), the training flag, ``eps``/``momentum``/... and any attribute set on the layer (``qconfig``),
and its hooks (forward, forward-pre, backward, state-dict hooks: the same hook dictionaries, so a
handle returned by ``register_forward_hook`` before the conversion still removes the hook). Torch's
``convert_sync_batchnorm`` keeps the parameters and buffers but drops the hooks.

Only these exact classes are swapped: a user subclass of ``nn.BatchNorm2d`` (its own forward) and
normref's :class:`~normref.backends.torch.StatefulNorm` layers (no torch counterpart) are left as they
are, and a layer used at several places in the model is swapped once (every place gets the same new
layer). As torch's converter, the parent modules are updated in place and the converted model is
returned (a new object only when ``model`` itself is a swapped layer); ``copy.deepcopy`` the model
first to keep the original.
"""

from __future__ import annotations

from torch import nn

__all__ = ["convert", "unconvert"]


def _pairs() -> list[tuple[type, type]]:
    """(torch class, normref drop-in) for every swapped layer."""
    from . import modules as m

    return [
        (nn.BatchNorm1d, m.BatchNorm1d), (nn.BatchNorm2d, m.BatchNorm2d), (nn.BatchNorm3d, m.BatchNorm3d),
        (nn.SyncBatchNorm, m.SyncBatchNorm),
        (nn.InstanceNorm1d, m.InstanceNorm1d), (nn.InstanceNorm2d, m.InstanceNorm2d),
        (nn.InstanceNorm3d, m.InstanceNorm3d),
        (nn.LayerNorm, m.LayerNorm), (nn.GroupNorm, m.GroupNorm), (nn.RMSNorm, m.RMSNorm),
        (nn.LocalResponseNorm, m.LocalResponseNorm),
    ]


def _swap(old: nn.Module, cls: type, back: bool) -> nn.Module:
    """A ``cls`` instance taking ``old``'s attributes: parameters, buffers and hooks are shared."""
    from .modules import _check_group, _is_reducer, _NormrefBatchNorm

    new = cls.__new__(cls)
    state = {}
    for key, value in vars(old).items():
        if key == "_normref_reducer":  # a normref layer's cached reducer: rebuilt on demand
            continue
        if isinstance(value, dict) and "hooks" not in key:
            value = value.copy()  # _parameters, _buffers, _modules: the same tensors, own dictionaries
        state[key] = value  # hook dictionaries shared: the old handles remove the new layer's hooks
    if back:
        if issubclass(cls, nn.SyncBatchNorm):
            pg = state.get("process_group")
            if isinstance(pg, str):  # normref's WORLD is torch's None (the default group)
                state["process_group"] = None
            elif pg is not None and _is_reducer(pg):
                raise TypeError(f"convert(back=True): {type(old).__name__} synchronizes through a normref "
                                "reducer; torch's SyncBatchNorm needs a torch.distributed.ProcessGroup")
        elif not issubclass(cls, nn.SyncBatchNorm):
            if state.pop("process_group", None) is not None:
                raise TypeError(
                    f"convert(back=True): {type(old).__name__} has synchronized statistics (process_group="
                    f"{old.process_group!r}); torch's {cls.__name__} has none. Use process_group=None or "
                    "torch's SyncBatchNorm"
                )
    elif issubclass(cls, _NormrefBatchNorm):
        if issubclass(cls, nn.SyncBatchNorm):  # torch's process_group (None = world) is kept, checked
            if state.get("process_group") is not None:
                state["process_group"] = _check_group(cls.__name__, "batch_norm", state["process_group"])
        else:
            state["process_group"] = None  # local statistics, as torch's BatchNorm*d
    new.__dict__.update(state)
    return new


def convert(model: nn.Module, *, back: bool = False) -> nn.Module:
    """``model`` with torch's normalization layers swapped for normref's drop-ins (``back=True``: reverse).

    Each swapped layer computes the same function of its input and parameters before and after:
    y = γ·(x − μ)/√(σ² + ε) + β with the layer's statistics (batch/instance/layer/group norm; RMS norm
    y = γ·x/√(mean(x²) + ε); local response norm y = x/(k + α/n·Σ x²)^β), with normref's forward and
    analytic backward after :func:`convert`, torch's after ``back=True``. See the module docstring for
    the table of classes and what is kept (parameters, buffers, training flag, hooks).

    Parameters
    ----------
    model : torch.nn.Module
        The model (its parent modules are updated in place, as torch's ``convert_sync_batchnorm``).
    back : bool, default False
        ``False``: torch's ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``nn.InstanceNorm1d/2d/3d``,
        ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``, ``nn.LocalResponseNorm`` become normref's;
        ``True``: normref's drop-ins of those classes become torch's (a normref ``BatchNorm*d`` with a
        ``process_group`` is refused: torch's has no synchronized statistics).

    Returns
    -------
    torch.nn.Module
        The converted model; ``model`` itself, unless ``model`` is a swapped layer (then its
        replacement). ``normref_converted`` on it: the number of layers swapped.

    Notes
    -----
    Survey §5.1 (standardization: batch, instance, layer, group norm), §5.1.2 (RMS norm), §5.1.1
    (local response normalization). The swap changes which code computes the function (and its
    gradient), not the function: outputs and gradients agree to rounding.

    References
    ----------
    Ioffe & Szegedy, ICML 2015 (batch normalization); Ba, Kiros & Hinton, arXiv:1607.06450 (layer
    normalization); Wu & He, ECCV 2018 (group normalization); Ulyanov, Vedaldi & Lempitsky,
    arXiv:1607.08022 (instance normalization); Zhang & Sennrich, NeurIPS 2019 (RMS norm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(back, bool):
        raise TypeError(f"convert: back must be a bool; got {type(back).__name__}")
    table = {nt: th for th, nt in _pairs()} if back else dict(_pairs())
    done: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(old) -> (old, new): old kept alive, ids stay unique

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in done:  # a shared layer: converted once
            return done[id(m)][1]
        cls = table.get(type(m))  # exact classes only: a subclass has a forward of its own
        out = _swap(m, cls, back) if cls is not None else m
        done[id(m)] = (m, out)
        for name, child in list(out._modules.items()):
            if child is not None:
                out._modules[name] = visit(child)
        return out

    out = visit(model)
    swapped = sum(1 for old, new in done.values() if new is not old)
    try:
        object.__setattr__(out, "normref_converted", swapped)
    except AttributeError:  # pragma: no cover - a module class with __slots__
        pass
    return out


def unconvert(model: nn.Module) -> nn.Module:
    """``convert(model, back=True)``: normref's drop-ins become torch's own layers again.

    The inverse of :func:`convert`, y unchanged: y = γ·(x − μ)/√(σ² + ε) + β (and the RMS / LRN
    formulas) computed by torch's layers, sharing the parameters, buffers and hooks.

    Parameters
    ----------
    model : torch.nn.Module
        The model (parents updated in place).

    Returns
    -------
    torch.nn.Module
        The model with torch's layers (see :func:`convert`).

    Notes
    -----
    Survey §5.1; torch's tools that match exact classes (``torch.fx.experimental.optimization.fuse``,
    ``torch.ao.quantization.fuse_modules``) and ``torch.jit.script`` need torch's own layers.

    References
    ----------
    Ioffe & Szegedy, ICML 2015; Ba et al., 2016; Wu & He, ECCV 2018.
    """
    return convert(model, back=True)
