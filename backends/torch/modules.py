"""``torch.nn.Module`` layers running normref's forward and analytic backward.

Drop-ins for torch's own layers: each class subclasses torch's (so the constructor arguments,
parameters, buffers, ``state_dict`` keys — ``num_batches_tracked`` included — ``extra_repr`` and
``load_state_dict`` behaviour are torch's, verbatim) and replaces only ``forward``, which calls the
registry-generated autograd function of the matching normref method. Running statistics are not
mutated by normref (its functions are pure): the layer copies the updated statistics returned in the
``NormResult`` into its buffers, which is what torch's layers do in place.

    BatchNorm1d/2d/3d   -> normref.batch_norm      InstanceNorm1d/2d/3d -> normref.instance_norm
    LayerNorm           -> normref.layer_norm      GroupNorm            -> normref.group_norm
    RMSNorm             -> normref.rms_norm

``Norm(method, **static)`` wraps any other activation method as a stateless layer (its array arguments
other than the input are passed to ``forward``).

``StatefulNorm(method, num_features, **static)`` builds a layer for any activation method from its
registered signature: the learnable array arguments become ``nn.Parameter``s, the running statistics
(the non-differentiable ``running_*`` arguments, which the method returns updated in its
``NamedTuple`` result) become buffers, with ``num_batches_tracked`` where the method takes it; every
other argument is a constructor keyword with the method's default. After a training-mode forward the
returned statistics are written into the buffers under ``torch.no_grad`` (as torch's layers do in
place). Initial values, by argument name:

==================  ==============================  ==================================================
argument            shape                           initial value
==================  ==============================  ==================================================
``running_mean``    (C,)                            0
``running_var``     (C,)                            1
``running_scale``   (C,)                            1 (Lp deviation, :func:`normref.lp_batch_norm`)
``running_cov``     (C/group_size, gs, gs)          I per group (:mod:`normref.whitening`)
``weight``          (C,); coloring: (G, gs, gs)     1; the identity (:func:`normref.whitening_coloring`)
``bias``            (C,)                            0
``rho``             (C,)                            1 (the BIN gate; Nam & Kim's code starts at pure BN)
``mean_weight``,    (3,)                            1 (equal IN/LN/BN importances, Luo et al. 2019)
``var_weight``
``tau``             (C,)                            0 (FRN's TLU threshold, Singh & Krishnan 2020)
==================  ==============================  ==================================================

``running_mean_square`` (C,) starts at 1 (the running E[x²] of scaling-only BN, :func:`normref.batch_normalize`).

Named layers (each also as ``...1d``/``...2d``/``...3d``, which check the input rank as torch's
``BatchNorm1d/2d/3d`` do): ``BatchWhitening``, ``DecorrelatedBatchNorm``, ``IterNorm``,
``WhiteningColoring``, ``BatchRenorm``, ``GhostBatchNorm``, ``SwitchableNorm``, ``LpBatchNorm``,
``MeanOnlyBatchNorm``, ``BatchGroupNorm``, ``BatchInstanceNorm``, ``FilterResponseNorm``.
``LocalResponseNorm`` is a drop-in for ``torch.nn.LocalResponseNorm``.

Synchronized statistics: the layers with batch statistics (``BatchNorm1d/2d/3d`` and the
``StatefulNorm`` layers whose method has a ``sync=`` reducer argument) take ``process_group=``
(keyword; ``None`` = local, the default, as before; :data:`WORLD` = the default process group; or a
``torch.distributed.ProcessGroup``) and, in training mode, compute the whole group's batch statistics
through ``normref.backends.distributed.torch.TorchReducer`` (CPU/gloo included; every rank gets the
same output statistics and running statistics). :class:`SyncBatchNorm` is a drop-in for
``torch.nn.SyncBatchNorm`` (there ``None`` is the world group, as in torch); :func:`convert_sync`
synchronizes a built model. normref's ``BatchNorm*d`` subclass torch's ``_BatchNorm``, so torch's
``SyncBatchNorm.convert_sync_batchnorm`` replaces them by torch's ``SyncBatchNorm`` (sharing their
parameters and buffers; CUDA only), and ``convert_sync`` afterwards turns those into normref's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from normref.registry import NAMED_LAYERS, get

from ._base import NormrefModule, exporting
from ._function import function

# registry method of each named stateful layer (suffix-less: any input rank the method accepts)
_NAMED = dict(NAMED_LAYERS)
_NAMED_LAYERS = [n + suffix for n in _NAMED for suffix in ("", "1d", "2d", "3d")]

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "LocalResponseNorm",
    "Norm",
    "StatefulNorm",
    *_NAMED_LAYERS,
    "SyncBatchNorm",
    "WORLD",
    "convert_sync",
]


def _copy_state(buffer: torch.Tensor | None, new: torch.Tensor | None) -> None:
    if buffer is not None and new is not None:
        with torch.no_grad():
            buffer.copy_(new)


# --------------------------------------------------------------------------------------------------
# synchronized batch statistics (issue 12): the process_group argument of the layers
# --------------------------------------------------------------------------------------------------
#: ``process_group=WORLD`` synchronizes over the default (world) process group. normref's layers
#: keep ``process_group=None`` = local statistics (backward compatible); torch's ``SyncBatchNorm``
#: spells the world group ``None``, which normref's :class:`SyncBatchNorm` drop-in keeps.
WORLD = "world"


def _takes_sync(method: str) -> bool:
    """Whether the registered method has synchronized statistics (a ``sync=`` reducer argument)."""
    return "sync" in get(method).signature.parameters


def _is_reducer(obj: Any) -> bool:
    return callable(getattr(obj, "all_reduce_sum", None)) and callable(getattr(obj, "all_gather", None))


def _check_group(where: str, method: str, process_group: Any) -> Any:
    """``process_group`` is None (local), :data:`WORLD`, a ``torch.distributed.ProcessGroup`` or a
    normref reducer (``normref.distributed.Reducer``, used as is); anything else is a TypeError."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != WORLD:
            raise ValueError(
                f"{where}: process_group must be None (local statistics), {WORLD!r} (the default process "
                f"group), a torch.distributed.ProcessGroup or a normref reducer; got {process_group!r}"
            )
    else:
        pg_type = getattr(torch.distributed, "ProcessGroup", None) if torch.distributed.is_available() else None
        if not ((pg_type is not None and isinstance(process_group, pg_type)) or _is_reducer(process_group)):
            raise TypeError(
                f"{where}: process_group must be None (local statistics), {WORLD!r} (the default process "
                f"group), a torch.distributed.ProcessGroup or a normref reducer; got {type(process_group).__name__}"
            )
    if not _takes_sync(method):
        raise TypeError(
            f"{where}: normref.{method} has no synchronized statistics (no sync= argument); "
            f"use process_group=None"
        )
    return process_group


class _Synchronized:
    """The cross-rank part of a layer with batch statistics: ``process_group`` -> the reducer.

    The reducer (``normref.backends.distributed.torch.TorchReducer``) is built at the first
    synchronized forward, after ``torch.distributed.init_process_group``, and kept (``layer.reducer``;
    its ``values_sent`` counts the values this layer has sent). Statistics are synchronized in
    training mode only, as torch's ``SyncBatchNorm`` does (``model.eval()`` runs per rank, so a
    rank-0-only validation pass cannot hang); with :data:`WORLD` and no initialized process group
    there is one process and the statistics are local (= a world of one), as in torch.
    """

    process_group: Any = None
    _world_if_none = False  # SyncBatchNorm: None is the world group, as in torch

    def _group(self) -> Any:
        pg = self.process_group
        return WORLD if (pg is None and self._world_if_none) else pg

    @property
    def reducer(self) -> Any:
        """The reducer of the synchronized statistics, or ``None`` (local statistics)."""
        pg = self._group()
        if pg is None:
            return None
        if _is_reducer(pg):
            return pg
        if pg == WORLD and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        cached = self.__dict__.get("_normref_reducer")
        if cached is None or cached[0] is not pg:
            from normref.backends.distributed.torch import TorchReducer

            cached = (pg, TorchReducer(None if pg == WORLD else pg))
            self.__dict__["_normref_reducer"] = cached
        return cached[1]

    def _sync_kwargs(self) -> dict:
        """``{"sync": reducer}`` for a training-mode forward with a reducer, else ``{}``."""
        if not self.training:
            return {}
        r = self.reducer
        return {} if r is None else {"sync": r}

    def _sync_repr(self) -> str:
        pg = self.process_group
        if pg is None:
            return ""
        return f", process_group={pg!r}" if isinstance(pg, str) else f", process_group={type(pg).__name__}"


class _NormrefBatchNorm(NormrefModule, _Synchronized):
    """forward of torch's ``_BatchNorm`` (same momentum / num_batches_tracked logic), on normref.

    Parameters
    ----------
    *args : Any
        Torch's positional constructor arguments (``num_features``, ``eps``, ``momentum``, ``affine``,
        ``track_running_stats``, ``device``, ``dtype``).
    process_group : str, ProcessGroup or None, default None
        Keyword; ``None`` = local statistics. :data:`WORLD` or a ``torch.distributed.ProcessGroup``
        synchronizes the batch statistics across the group's ranks in training mode
        (``normref.batch_norm(..., sync=TorchReducer(group))``: one all-gather of 2C + 1 values in the
        forward, one all-reduce of 2C in the backward), on CPU too.
    **kwargs : Any
        Torch's keyword constructor arguments.
    """

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = _check_group(type(self).__name__, "batch_norm", process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sync_repr()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if exporting():  # torch.export / ONNX / jit.trace: torch's own forward (native op), same state
            if self._sync_kwargs():
                raise TypeError(f"{type(self).__name__}: synchronized statistics (process_group) cannot be "
                                "exported; export the model in eval mode or with process_group=None")
            return super().forward(input)
        self._check_input_dim(input)
        # torch's exponential_average_factor, computed exactly as torch.nn.modules.batchnorm does
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        rm = self.running_mean if use_running else None
        rv = self.running_var if use_running else None
        out = function("batch_norm")(
            input, rm, rv, self.weight, self.bias, bn_training, factor, self.eps, **self._sync_kwargs()
        )
        if isinstance(out, tuple):  # NormResult: the updated running statistics come back
            _copy_state(self.running_mean, out.running_mean)
            _copy_state(self.running_var, out.running_var)
            return out.output
        return out


class BatchNorm1d(_NormrefBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by :func:`normref.batch_norm`.

    Parameters
    ----------
    *args : Any
        ``torch.nn.BatchNorm1d``'s constructor arguments (``num_features``, ``eps=1e-5``,
        ``momentum=0.1``, ``affine=True``, ``track_running_stats=True``, ``device``, ``dtype``; the
        keyword ``bias=True``).
    process_group : str, ProcessGroup or None, default None
        Keyword: synchronized statistics (see :class:`_NormrefBatchNorm`); ``None``: local.
    **kwargs : Any
        The same arguments by keyword.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """


class BatchNorm2d(_NormrefBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by :func:`normref.batch_norm`.

    Parameters
    ----------
    *args : Any
        ``torch.nn.BatchNorm2d``'s constructor arguments (``num_features``, ``eps=1e-5``,
        ``momentum=0.1``, ``affine=True``, ``track_running_stats=True``, ``device``, ``dtype``; the
        keyword ``bias=True``).
    process_group : str, ProcessGroup or None, default None
        Keyword: synchronized statistics (see :class:`_NormrefBatchNorm`); ``None``: local.
    **kwargs : Any
        The same arguments by keyword.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """


class BatchNorm3d(_NormrefBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by :func:`normref.batch_norm`.

    Parameters
    ----------
    *args : Any
        ``torch.nn.BatchNorm3d``'s constructor arguments (``num_features``, ``eps=1e-5``,
        ``momentum=0.1``, ``affine=True``, ``track_running_stats=True``, ``device``, ``dtype``; the
        keyword ``bias=True``).
    process_group : str, ProcessGroup or None, default None
        Keyword: synchronized statistics (see :class:`_NormrefBatchNorm`); ``None``: local.
    **kwargs : Any
        The same arguments by keyword.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """


class SyncBatchNorm(_NormrefBatchNorm, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by :func:`normref.batch_norm` with ``sync=`` (on CPU too).

    Torch's constructor, verbatim: ``process_group=None`` is the default (world) process group here,
    as in torch (unlike normref's other layers, where ``None`` is local); input ``(N, C, *)`` of any
    rank ≥ 2. Statistics are synchronized in training mode when a process group is initialized (else
    local: one process). ``SyncBatchNorm.convert_sync_batchnorm(model, process_group)`` is
    :func:`convert_sync` (normref's layers keep their class; torch's BatchNorm*d and SyncBatchNorm
    become normref's).

    Parameters
    ----------
    *args : Any
        ``torch.nn.SyncBatchNorm``'s constructor arguments (``num_features``, ``eps=1e-5``,
        ``momentum=0.1``, ``affine=True``, ``track_running_stats=True``, ``process_group=None``,
        ``device``, ``dtype``; the keyword ``bias=True``).
    **kwargs : Any
        The same arguments by keyword.

    Notes
    -----
    Survey §5.1.1 (batch statistics over the whole mini-batch, synchronized across ranks).

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """

    _world_if_none = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.SyncBatchNorm.__init__(self, *args, **kwargs)
        if self.process_group is not None:
            self.process_group = _check_group(type(self).__name__, "batch_norm", self.process_group)
        elif not _takes_sync("batch_norm"):
            raise TypeError(f"{type(self).__name__}: normref.batch_norm has no synchronized statistics (no sync= argument)")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """:func:`convert_sync` with torch's default (``None`` = the world group)."""
        return convert_sync(module, WORLD if process_group is None else process_group)


class _NormrefInstanceNorm(NormrefModule):
    """``_apply_instance_norm`` of torch's ``_InstanceNorm`` on normref (torch keeps the shape checks
    and the unbatched-input handling in its own ``forward``, which calls this)."""

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        if exporting():  # export tracing: torch's native instance norm on the same state
            return super()._apply_instance_norm(input)
        out = function("instance_norm")(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        if isinstance(out, tuple):
            _copy_state(self.running_mean, out.running_mean)
            _copy_state(self.running_var, out.running_var)
            return out.output
        return out


class InstanceNorm1d(_NormrefInstanceNorm, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` computed by :func:`normref.instance_norm`.

    Torch's constructor (``num_features``, ``eps=1e-5``, ``momentum=0.1``, ``affine=False``,
    ``track_running_stats=False``, ``device``, ``dtype``, the keyword ``bias=True``), shape checks and
    unbatched-input handling.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance Normalization: The Missing Ingredient for
       Fast Stylization", arXiv:1607.08022, 2016.
    """


class InstanceNorm2d(_NormrefInstanceNorm, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` computed by :func:`normref.instance_norm`.

    Torch's constructor (``num_features``, ``eps=1e-5``, ``momentum=0.1``, ``affine=False``,
    ``track_running_stats=False``, ``device``, ``dtype``, the keyword ``bias=True``), shape checks and
    unbatched-input handling.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance Normalization: The Missing Ingredient for
       Fast Stylization", arXiv:1607.08022, 2016.
    """


class InstanceNorm3d(_NormrefInstanceNorm, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` computed by :func:`normref.instance_norm`.

    Torch's constructor (``num_features``, ``eps=1e-5``, ``momentum=0.1``, ``affine=False``,
    ``track_running_stats=False``, ``device``, ``dtype``, the keyword ``bias=True``), shape checks and
    unbatched-input handling.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance Normalization: The Missing Ingredient for
       Fast Stylization", arXiv:1607.08022, 2016.
    """


class LayerNorm(NormrefModule, nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`normref.layer_norm`.

    Torch's constructor (``normalized_shape``, ``eps=1e-5``, ``elementwise_affine=True``,
    ``bias=True``, ``device``, ``dtype``).

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if exporting():  # export tracing: torch's native op on the same parameters
            return super().forward(input)
        return function("layer_norm")(input, tuple(self.normalized_shape), self.weight, self.bias, self.eps)


class GroupNorm(NormrefModule, nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by :func:`normref.group_norm`.

    Torch's constructor (``num_groups``, ``num_channels``, ``eps=1e-5``, ``affine=True``, ``device``,
    ``dtype``, the keyword ``bias=True``).

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if exporting():  # export tracing: torch's native op on the same parameters
            return super().forward(input)
        return function("group_norm")(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(NormrefModule, nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by :func:`normref.rms_norm`.

    Torch's constructor (``normalized_shape``, ``eps=None``, ``elementwise_affine=True``, ``device``,
    ``dtype``).

    Notes
    -----
    Survey §5.1.2.

    References
    ----------
    .. [1] B. Zhang and R. Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():  # export tracing: torch's native op on the same parameters
            return super().forward(x)
        return function("rms_norm")(x, tuple(self.normalized_shape), self.weight, self.eps)


class Norm(NormrefModule, nn.Module):
    """Any registered method as a stateless layer: ``Norm("pixel_norm", eps=1e-8)(x)``.

    The non-array arguments are fixed at construction; ``forward(input, **arrays)`` passes the input
    and any further arrays by name (weights, generated γ/β, running statistics) to the method. If the
    method returns a NamedTuple (updated state), the whole NamedTuple is returned: the caller keeps
    the state (see the drop-in classes for layers that keep it in buffers).

    Parameters
    ----------
    method : str
        The registered method's name.
    **static : Any
        Its non-array arguments (an array argument here is a ``TypeError``: pass it to ``forward``).

    Notes
    -----
    The method's own docstring gives its formula, survey section and paper.
    """

    def __init__(self, method: str, **static: Any):
        super().__init__()
        m = get(method)
        bad = [k for k in static if k in m.array_params]
        if bad:
            raise TypeError(f"Norm({m.name!r}): {bad[0]} is an array argument; pass it to forward, not to the constructor")
        self.method = m.name
        self.static = dict(static)

    def forward(self, input: torch.Tensor, **arrays: Any):
        return function(self.method)(input, **{**self.static, **arrays})

    def extra_repr(self) -> str:
        return ", ".join([repr(self.method)] + [f"{k}={v!r}" for k, v in self.static.items()])


class LocalResponseNorm(NormrefModule, nn.LocalResponseNorm):
    """``torch.nn.LocalResponseNorm`` computed by :func:`normref.local_response_norm`.

    Torch's constructor (``size``, ``alpha=1e-4``, ``beta=0.75``, ``k=1.0``).

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] A. Krizhevsky, I. Sutskever and G. E. Hinton, "ImageNet Classification with Deep
       Convolutional Neural Networks", NeurIPS 2012.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if exporting():  # export tracing: torch's native op
            return super().forward(input)
        return function("local_response_norm")(input, self.size, self.alpha, self.beta, self.k)


# --------------------------------------------------------------------------------------------------
# layers generated from a method's signature
# --------------------------------------------------------------------------------------------------
_FLAGS = ("training", "use_input_stats")  # the argument that selects batch vs population statistics
_NOT_STATIC = frozenset(_FLAGS) | {"num_batches_tracked", "out", "sync"}
_AFFINE = frozenset({"weight", "bias"})


def _eye_stack(g: int, gs: int, **factory) -> torch.Tensor:
    return torch.eye(gs, **factory).expand(g, gs, gs).clone()


def _initial(method: str, name: str, c: int, gs: int, factory: dict) -> torch.Tensor | None:
    """The initial value of array argument ``name`` of ``method`` (see the module docstring)."""
    g = c // gs
    if name == "running_cov":
        return _eye_stack(g, gs, **factory)
    if name == "weight" and method == "whitening_coloring":  # the coloring matrices Γ
        return _eye_stack(g, gs, **factory)
    if name in ("running_var", "running_scale", "running_mean_square", "weight", "rho"):
        return torch.ones(c, **factory)
    if name in ("running_mean", "bias", "tau"):
        return torch.zeros(c, **factory)
    if name in ("mean_weight", "var_weight"):
        return torch.ones(3, **factory)
    return None


class StatefulNorm(NormrefModule, _Synchronized, nn.Module):
    """Any activation method as a layer owning its parameters and running statistics.

    ``StatefulNorm("iter_norm", 64, group_size=16, iterations=5)``; the named layers
    (``nt.IterNorm(64, group_size=16)``, ``nt.BatchRenorm2d(64)``, ...) are this class with the
    method fixed.

    In training mode the method runs with batch statistics and its returned running statistics
    replace the buffers (no gradient), ``num_batches_tracked`` is incremented; in eval mode the buffers
    are the population statistics, which the method's backward treats as constants.

    Parameters
    ----------
    method : str
        The registered activation method (its first array argument is ``input``).
    num_features : int
        C, the channel count (input ``(N, C, *spatial)``).
    affine : bool, default True
        Learnable ``weight``/``bias`` (``False``: both ``None``, as in torch).
    track_running_stats : bool, default True
        Keep the running statistics as buffers (``False``: batch statistics in eval mode too, as in
        torch); methods without running statistics have no buffers.
    process_group : str, ProcessGroup or None, default None
        ``None`` (local batch statistics), :data:`WORLD` (the default process group) or a
        ``torch.distributed.ProcessGroup``: in training mode the batch statistics are the group's (the
        method's ``sync=`` argument with a ``TorchReducer``; every rank gets the same output statistics
        and running statistics), for the methods that have synchronized statistics (batch norm
        variants, batch whitening); ``convert_sync`` sets it on a built model.
    device : torch.device or None, default None
        The device of the parameters and buffers.
    dtype : torch.dtype or None, default None
        Their dtype.
    **static : Any
        Every other non-array argument of the method (``momentum``, ``eps``, ``group_size``,
        ``iterations``, ``virtual_batch_size``, ``rmax``...), with the method's defaults;
        ``momentum=None`` is the cumulative average over ``num_batches_tracked`` batches, as in torch.

    Notes
    -----
    The method's own docstring gives its formula, survey section and paper; running statistics follow
    survey Eqn 18 (training) and Eqn 16 (inference).
    """

    _input_ndim: "tuple[int, ...] | None" = None  # the 1d/2d/3d variants check the input rank

    def __init__(
        self,
        method: str,
        num_features: int,
        /,
        *,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        **static: Any,
    ):
        super().__init__()
        m = get(method)
        where = f"{type(self).__name__}({m.name!r})" if type(self) is StatefulNorm else type(self).__name__
        if m.category != "activation" or not m.array_params or m.array_params[0] != "input":
            raise TypeError(f"{where}: a layer needs an activation method whose first array argument is input; got {m!r}")
        self.process_group = _check_group(where, m.name, process_group)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{where}: num_features must be a positive int; got {num_features!r}")
        params = m.signature.parameters
        allowed = [p for p in params if p not in m.array_params and p not in _NOT_STATIC]
        unknown = [k for k in static if k not in allowed]
        if unknown:
            raise TypeError(f"{where}: unexpected argument {unknown[0]!r}; the method's options are {allowed}")
        missing = [p for p in allowed if p not in static and params[p].default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{where}: missing required argument {missing[0]!r}")
        gs = static.get("group_size") or num_features
        if "group_size" in static and static["group_size"] is not None and (
            not isinstance(gs, int) or isinstance(gs, bool) or gs < 1 or num_features % gs
        ):
            raise ValueError(f"{where}: group_size must be a positive divisor of num_features = {num_features}; got {gs!r}")
        factory = {"device": device, "dtype": dtype}
        self.normref_method = m.name
        self.num_features = num_features
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._flag = next((f for f in _FLAGS if f in params), None)
        self._static_names = tuple(allowed)
        for p in allowed:  # attributes, as torch layers keep eps / momentum
            setattr(self, p, static.get(p, params[p].default))
        self._param_names, self._state_names = [], []
        for p in m.array_params[1:]:
            if p in m.nondiff:
                value = _initial(m.name, p, num_features, gs, factory) if track_running_stats else None
                if track_running_stats and value is None:
                    raise TypeError(f"{where}: no initial value is known for the state argument {p!r}")
                self.register_buffer(p, value)
                self._state_names.append(p)
            else:
                value = None if (p in _AFFINE and not affine) else _initial(m.name, p, num_features, gs, factory)
                if value is None and not (p in _AFFINE and not affine):
                    raise TypeError(
                        f"{where}: no initial value is known for the array argument {p!r}; use nt.Norm and pass it to forward"
                    )
                self.register_parameter(p, None if value is None else nn.Parameter(value))
                self._param_names.append(p)
        self._counts = "num_batches_tracked" in params and bool(self._state_names)
        if self._counts:
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device) if track_running_stats else None,
            )

    def reset_running_stats(self) -> None:
        """Running statistics back to their initial values, ``num_batches_tracked`` to 0."""
        if not self.track_running_stats:
            return
        gs = getattr(self, "group_size", None) or self.num_features
        with torch.no_grad():
            for p in self._state_names:
                buf = getattr(self, p)
                buf.copy_(_initial(self.normref_method, p, self.num_features, gs, {"device": buf.device, "dtype": buf.dtype}))
            if self._counts:
                self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics and learnable parameters back to their initial values."""
        self.reset_running_stats()
        gs = getattr(self, "group_size", None) or self.num_features
        with torch.no_grad():
            for p in self._param_names:
                w = getattr(self, p)
                if w is not None:
                    w.copy_(_initial(self.normref_method, p, self.num_features, gs, {"device": w.device, "dtype": w.dtype}))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self._input_ndim is not None and input.dim() not in self._input_ndim:
            want = " or ".join(f"{d}D" for d in self._input_ndim)
            raise ValueError(f"{type(self).__name__}: expected {want} input; got {input.dim()}D input")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if exporting():  # no native op computes these methods: say which path exports them
            raise TypeError(
                f"{type(self).__name__}: export the model through normref.backends.torch.exportable(model) "
                "(in eval mode this layer becomes its affine map y = A·x + c, a MatMul); tracing normref's "
                "autograd Function for export is not supported"
            )
        self._check_input_dim(input)
        kwargs = {p: getattr(self, p) for p in self._static_names}
        use_batch = self.training or not self.track_running_stats
        if self._flag is not None:
            kwargs[self._flag] = use_batch
        for p in self._param_names + self._state_names:
            kwargs[p] = getattr(self, p)
        update = self.training and self.track_running_stats and bool(self._state_names)
        if update and self._counts and (kwargs.get("momentum", 0.0) is None or kwargs.get("update_every", 1) != 1
                                        or kwargs.get("preset") == "diminishing"):
            # the cumulative average, a schedule in the step (population_norm / prong_whitening's
            # update_every, blended_batch_norm's diminishing α_k) need k, the number of batches seen
            # before this one (a host read)
            kwargs["num_batches_tracked"] = int(self.num_batches_tracked)
        kwargs.update(self._sync_kwargs())
        out = function(self.normref_method)(input, **kwargs)
        if not isinstance(out, tuple):
            return out
        if update:
            with torch.no_grad():
                for p in self._state_names:
                    getattr(self, p).copy_(getattr(out, p))
                if self._counts:
                    self.num_batches_tracked.add_(1)
        return out[0]

    def extra_repr(self) -> str:
        parts = [repr(self.normref_method)] if type(self) is StatefulNorm else []
        parts += [str(self.num_features), f"affine={self.affine}"]
        if self._state_names:
            parts.append(f"track_running_stats={self.track_running_stats}")
        parts += [f"{p}={getattr(self, p)!r}" for p in self._static_names]
        return ", ".join(parts) + self._sync_repr()


def _named_layer(cls_name: str, method: str, input_ndim: "tuple[int, ...] | None") -> type:
    def __init__(self, num_features: int, **kwargs: Any) -> None:
        StatefulNorm.__init__(self, method, num_features, **kwargs)

    m = get(method)
    rank = "" if input_ndim is None else f" Expects {' or '.join(f'{d}D' for d in input_ndim)} input."
    doc = (
        f"A layer computing :func:`normref.{method}`, its running statistics as buffers.\n\n"
        f"``{cls_name}(num_features, **options)``: :class:`StatefulNorm` with the method fixed.{rank}\n\n"
        "Parameters\n----------\n"
        "num_features : int\n    C, the channel count (input ``(N, C, *spatial)``).\n"
        "**kwargs : Any\n    The options of :class:`StatefulNorm` (``affine``, ``track_running_stats``, "
        "``process_group``, ``device``, ``dtype``) and the method's non-array arguments.\n"
        + (f"\nNotes\n-----\nSurvey {m.survey}.\n" if m.survey else "")
        + (f"\nReferences\n----------\n{m.paper}.\n" if m.paper else "")
    )
    return type(cls_name, (StatefulNorm,), {"__init__": __init__, "__doc__": doc, "_input_ndim": input_ndim,
                                           "__module__": __name__})


def _input_ranks(method: str, suffix: str) -> "tuple[int, ...] | None":
    if not suffix:
        return None
    d = int(suffix[0])
    # 1d: (N, C) or (N, C, L), as torch's BatchNorm1d; methods that need spatial axes take (N, C, L) only
    spatial = method in ("switchable_norm", "batch_instance_norm", "filter_response_norm")
    return ((3,) if spatial else (2, 3)) if d == 1 else (d + 2,)


for _cls, _method in _NAMED.items():
    for _suffix in ("", "1d", "2d", "3d"):
        globals()[_cls + _suffix] = _named_layer(_cls + _suffix, _method, _input_ranks(_method, _suffix))
del _cls, _method, _suffix


# --------------------------------------------------------------------------------------------------
# convert_sync: a built model's batch statistics synchronized
# --------------------------------------------------------------------------------------------------
def _layer_method(m: nn.Module) -> str:
    return "batch_norm" if isinstance(m, _NormrefBatchNorm) else m.normref_method


def convert_sync(module: nn.Module, process_group: Any = WORLD) -> nn.Module:
    """``module`` with every batch-statistics layer synchronized over ``process_group``.

    The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for normref (and on CPU):

    - normref's layers with batch statistics (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and the
      :class:`StatefulNorm` layers whose method has ``sync=``: ``IterNorm``, ``BatchWhitening``,
      ``DecorrelatedBatchNorm``, ``BatchRenorm``, ...) keep their class, parameters and buffers; their
      ``process_group`` is set (in place);
    - torch's own ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` (e.g. left by torch's
      ``convert_sync_batchnorm``, which replaces normref's ``BatchNorm*d`` by torch's
      ``SyncBatchNorm`` since they subclass torch's ``_BatchNorm``, and refuses CPU tensors) become
      normref's ``BatchNorm1d/2d/3d`` / :class:`SyncBatchNorm`, sharing the old layer's parameters and
      buffers (so ``state_dict`` is unchanged), as torch's converter does;
    - layers without batch statistics (LayerNorm, GroupNorm, instance norm, FRN, ...) are untouched.

    Parameters
    ----------
    module : torch.nn.Module
        The model.
    process_group : str, ProcessGroup or reducer, default WORLD
        :data:`WORLD` (default: the default process group; torch's ``None``) or a
        ``torch.distributed.ProcessGroup`` (or a normref reducer). ``None`` is refused (it means *local*
        for normref's layers, but *world* in torch's converter; say which).

    Returns
    -------
    module : torch.nn.Module
        The model (a new object only when ``module`` itself is a torch batch-norm layer, as in torch).

    Notes
    -----
    Survey §5.1.1 (batch statistics over the whole mini-batch, synchronized across ranks).
    """
    if process_group is None:
        raise ValueError(
            "convert_sync: process_group=None would mean local statistics for normref's layers (torch's "
            f"convert_sync_batchnorm reads None as the world group); pass {WORLD!r} or a ProcessGroup"
        )
    _check_group("convert_sync", "batch_norm", process_group)
    drop_in = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
               nn.SyncBatchNorm: SyncBatchNorm}

    def convert(m: nn.Module) -> nn.Module:
        out = m
        if isinstance(m, _Synchronized):
            method = _layer_method(m)
            if _takes_sync(method):
                m.process_group = process_group
            elif "training" in get(method).signature.parameters:  # batch statistics, not synchronized
                raise TypeError(f"convert_sync: {type(m).__name__} (normref.{method}) has no synchronized statistics yet")
        elif type(m) in drop_in:
            out = drop_in[type(m)](
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                bias=m.bias is not None, process_group=process_group,
            )
            if m.affine:
                with torch.no_grad():
                    out.weight = m.weight
                    out.bias = m.bias
            out.running_mean = m.running_mean
            out.running_var = m.running_var
            out.num_batches_tracked = m.num_batches_tracked
            out.training = m.training
            if hasattr(m, "qconfig"):
                out.qconfig = m.qconfig
        for name, child in m.named_children():
            out.add_module(name, convert(child))
        return out

    return convert(module)
