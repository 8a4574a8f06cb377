"""TorchScript, ONNX and torch.fx for models with normref layers (issue 16).

What works, and why:

- ``torch.onnx.export`` / ``torch.export`` / ``torch.jit.trace`` of a model with normref's drop-ins
  (``BatchNorm*d``, ``SyncBatchNorm``, ``InstanceNorm*d``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``,
  ``LocalResponseNorm``) work directly: while tracing for export (:func:`exporting`) the drop-ins run
  torch's own forward on the same parameters and buffers, so the ONNX graph holds the native operator
  (``BatchNormalization``, ``LayerNormalization``, ...) — the same function of the input, since the
  drop-ins compute torch's layers' function.
- The :class:`~normref.backends.torch.StatefulNorm` layers (whitening, batch renorm, ...) export in
  eval mode through :func:`exportable`: each becomes an :class:`InferenceAffine` — its inference map
  y_g = A_g·x_g + c_g (:func:`normref.folding.inference_affine`, computed once in float64 from the
  running statistics: for whitening A_g = diag(γ_g)·W(Σ̂_g + ε·I)), i.e. an ONNX ``MatMul`` + ``Add``
  with no eigendecomposition or Newton iteration in the graph.
- ``torch.jit.script`` cannot compile normref's layers: their forward calls normref's
  ``torch.autograd.Function`` (the analytic backward), a Python class that TorchScript does not support.
  Scripting such a model raises a ``TypeError`` saying so (:class:`~normref.backends.torch.NormrefModule`);
  ``torch.jit.script(exportable(model))`` works — torch's own layers (their autograd, not normref's
  backward) and, in eval mode, the whitening layers' affine maps.
- ``torch.fx.symbolic_trace`` cannot trace into an autograd Function's Python checks; :class:`Tracer`
  (and :func:`symbolic_trace`) keep normref's layers as leaf modules, as torch's tracer keeps
  ``torch.nn``'s, so the graph calls them (normref's forward and backward stay). Graph passes that match
  exact classes (``torch.fx.experimental.optimization.fuse``, ``torch.ao.quantization.fuse_modules``)
  fuse torch's ``nn.BatchNorm2d`` only: use ``normref.backends.torch.fold`` (batch norm and whitening)
  or :func:`normref.backends.torch.unconvert` first.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from normref._xp import Array

from ._base import NormrefModule, exporting

__all__ = ["exportable", "InferenceAffine", "Tracer", "symbolic_trace", "exporting", "NormrefModule"]


class InferenceAffine(nn.Module):
    """A normalization layer at inference: y_g = A_g·x_g + c_g on groups of d consecutive channels.

    The eval-mode map of a normalization with population statistics (survey §5.3.2): per channel
    (d = 1) A = γ/√(σ̂² + ε), c = β − A·μ̂; whitening A_g = diag(γ_g)·W(Σ̂_g + ε·I),
    c_g = β_g − A_g·μ̂_g. Written in plain tensor operations (a reshape, ``torch.matmul`` or an
    elementwise product, an add), so it scripts, traces and exports to ONNX (``MatMul``/``Mul``, ``Add``).

    Parameters
    ----------
    matrix : Array
        A, shape (G, d, d) (``NormAffine.matrix``); stored as the buffer ``matrix``.
    shift : Array
        c, shape (C,), C = G·d; the buffer ``shift``.
    dtype : torch.dtype or None, default None
        The buffers' dtype (``None``: ``matrix``'s).

    Notes
    -----
    Input ``(N, C, *spatial)`` or ``(N, C)``; the channel axis is 1. Built by :func:`exportable` from
    :func:`normref.backends.torch.layer_affine`.

    References
    ----------
    Ioffe & Szegedy, ICML 2015 (§3.1); Huang et al., Decorrelated Batch Normalization, CVPR 2018.
    """

    def __init__(self, matrix: Array, shift: Array, dtype: "torch.dtype | None" = None) -> None:
        super().__init__()
        matrix = torch.as_tensor(matrix)
        shift = torch.as_tensor(shift)
        if matrix.dim() != 3 or matrix.shape[1] != matrix.shape[2] or shift.dim() != 1 or (
                matrix.shape[0] * matrix.shape[1] != shift.shape[0]):
            raise ValueError(f"InferenceAffine: matrix must be (G, d, d) and shift (G·d,); got "
                             f"{tuple(matrix.shape)} and {tuple(shift.shape)}")
        dtype = dtype or matrix.dtype
        self.groups, self.group_size = int(matrix.shape[0]), int(matrix.shape[1])
        self.register_buffer("matrix", matrix.detach().to(dtype).clone())
        self.register_buffer("shift", shift.detach().to(dtype).clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        c = self.groups * self.group_size
        if input.dim() < 2 or input.shape[1] != c:
            raise ValueError("InferenceAffine: expected input (N, C, *spatial) with C = " + str(c)
                             + "; got shape " + str(list(input.shape)))  # TorchScript-compatible
        view = [1, c] + [1] * (input.dim() - 2)
        if self.group_size == 1:  # per channel: y = a·x + c
            return input * self.matrix.reshape(view) + self.shift.reshape(view)
        xs = input.reshape(input.shape[0], self.groups, self.group_size, -1)  # (N, G, d, S)
        y = torch.matmul(self.matrix, xs)  # A_g·x_g for every example and position
        return y.reshape(input.shape) + self.shift.reshape(view)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, group_size={self.group_size}"


def _is_normref_layer(m: nn.Module) -> bool:
    return isinstance(m, NormrefModule) or type(m).__module__.startswith("normref.")


def exportable(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every normref layer replaced by torch code that scripts and exports.

    - normref's drop-ins (``BatchNorm*d``, ``SyncBatchNorm``, ``InstanceNorm*d``, ``LayerNorm``,
      ``GroupNorm``, ``RMSNorm``, ``LocalResponseNorm``) become torch's own classes sharing their
      parameters and buffers (:func:`~normref.backends.torch.unconvert`), in either mode; the
      function is the same, y = γ·(x − μ)/√(σ² + ε) + β (and the RMS / LRN formulas);
    - every other normref layer in eval mode with population statistics (the methods of
      :data:`normref.folding.FOLDABLE`: whitening — ``DecorrelatedBatchNorm``, ``IterNorm``,
      ``BatchWhitening`` (batch partition), ``WhiteningColoring`` —, ``BatchRenorm``,
      ``GhostBatchNorm``, ``LpBatchNorm``, ``MeanOnlyBatchNorm``, ``OnlineNorm``, ``PowerNorm``, ...)
      becomes an :class:`InferenceAffine`, y_g = A_g·x_g + c_g with (A, c) from its running statistics.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    inplace : bool, default False
        ``False``: convert a deep copy (the model is unchanged); ``True``: convert ``model`` itself.

    Returns
    -------
    torch.nn.Module
        A model without normref layers: ``torch.jit.script``, ``torch.jit.trace`` and
        ``torch.onnx.export`` (dynamo or TorchScript exporter) take it.

    Raises
    ------
    TypeError
        For a normref layer that has no torch equivalent in its current mode (a whitening layer in
        training mode, a layer without population statistics — ``track_running_stats=False`` —, a
        method whose inference call is not affine, ``nt.Norm``), naming the layer.

    Notes
    -----
    Survey §5.3.2: at inference every standardization and whitening of the batch partition is an
    affine map. The affine maps are snapshots of the running statistics taken now. torch's layers
    train with torch's autograd, not normref's analytic backward.

    References
    ----------
    Ioffe & Szegedy, ICML 2015 (§3.1); Huang et al., Decorrelated Batch Normalization, CVPR 2018.
    """
    from . import conversion as _convert
    from .folding import layer_affine

    if not isinstance(model, nn.Module):
        raise TypeError(f"exportable: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"exportable: inplace must be a bool; got {type(inplace).__name__}")
    out = model if inplace else copy.deepcopy(model)
    drop_ins = {nt for _, nt in _convert._pairs()}
    for name, m in out.named_modules():
        if type(m) in drop_ins and getattr(m, "process_group", None) is not None:
            if m.training:
                raise TypeError(f"exportable: {name or 'model'} ({type(m).__name__}) synchronizes its "
                                "statistics in training mode (process_group); torch's layer would not")
            m.process_group = None  # eval mode: running statistics, no synchronization
            m.__dict__.pop("_normref_reducer", None)
    out = _convert.convert(out, back=True)
    done: dict[int, tuple[nn.Module, nn.Module]] = {}

    def visit(m: nn.Module, path: str) -> nn.Module:
        if id(m) in done:
            return done[id(m)][1]
        new = m
        if _is_normref_layer(m) and not isinstance(m, InferenceAffine):
            affine = layer_affine(m)
            if affine is None:
                why = ("it is in training mode (export the model in eval mode)" if m.training else
                       "its inference call is not an affine map of population statistics (no running "
                       "statistics, track_running_stats=False, or a method outside normref.folding.FOLDABLE)")
                raise TypeError(f"exportable: {path or 'model'} ({type(m).__name__}) has no scriptable "
                                f"equivalent: {why}")
            ref = next(iter(list(m.parameters()) + list(m.buffers())), None)
            dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
            new = InferenceAffine(affine.matrix, affine.shift, dtype=dtype)
            if ref is not None:
                new = new.to(ref.device)
            new.train(m.training)
        done[id(m)] = (m, new)
        for k, child in list(new._modules.items()):
            if child is not None:
                new._modules[k] = visit(child, f"{path}.{k}" if path else k)
        return new

    return visit(out, "")


class Tracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that keeps normref's layers as leaf modules (``call_module`` nodes).

    torch's tracer treats ``torch.nn``'s layers as leaves and traces into any other module; tracing into
    a normref layer fails (its forward's input checks branch on values, and it calls a Python
    ``torch.autograd.Function``). With this tracer the graph calls the normref layer itself, so the
    traced ``GraphModule`` keeps normref's forward and analytic backward. Constructed as
    ``torch.fx.Tracer``.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_normref_layer(m) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module, concrete_args: "dict[str, Any] | None" = None) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with normref's layers as leaf modules (:class:`Tracer`).

    Parameters
    ----------
    model : torch.nn.Module
        The model to trace.
    concrete_args : dict or None, default None
        Inputs fixed during tracing (as in ``torch.fx.symbolic_trace``).

    Returns
    -------
    torch.fx.GraphModule
        The traced model; each normref layer is one ``call_module`` node.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"symbolic_trace: model must be a torch.nn.Module; got {type(model).__name__}")
    graph = Tracer().trace(model, concrete_args)
    return torch.fx.GraphModule(model, graph, type(model).__name__)
