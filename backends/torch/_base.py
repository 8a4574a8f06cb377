"""The common base of normref's torch layers, and the export-mode switch (issue 16).

:class:`NormrefModule` is a mixin of every layer of :mod:`normref.backends.torch.modules`
(``isinstance(m, nt.NormrefModule)`` finds them in a model). It answers torch's tooling:

- ``torch.jit.script``: a normref layer's forward calls a Python ``torch.autograd.Function`` (normref's
  analytic backward), which TorchScript cannot compile; ``__prepare_scriptable__`` raises a
  ``TypeError`` saying so and naming the scriptable path, :func:`normref.backends.torch.exportable`
  (torch's own layers sharing the parameters and buffers; whitening layers as their eval-mode affine
  map), instead of TorchScript's unrelated "Unknown type annotation" error.
- export tracing (``torch.export`` / ``torch.onnx.export``, ``torch.jit.trace``): :func:`exporting`
  is ``True`` there, and the drop-ins of torch's layers (``BatchNorm*d``, ``InstanceNorm*d``,
  ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``LocalResponseNorm``, ``SyncBatchNorm``) then run
  torch's own forward on the same parameters and buffers — the same function of the input, so the
  graph holds the native operator (ONNX ``BatchNormalization``, ``LayerNormalization``, ...) rather
  than normref's formula decomposed into elementwise operations. Under ``torch.compile`` (not an
  export) :func:`exporting` is ``False``: the compiled model keeps normref's forward and backward.
"""

from __future__ import annotations

import torch

__all__ = ["NormrefModule", "exporting"]


def exporting() -> bool:
    """Whether the current call is being traced for export, where normref's drop-ins emit torch's native op.

    Export tracing is ``torch.export`` / ``torch.onnx.export`` and ``torch.jit.trace``.

    Returns
    -------
    bool
        ``True`` under ``torch.export`` (``torch.compiler.is_exporting()``, which the dynamo ONNX
        exporter uses), under ``torch.jit.trace`` and the TorchScript ONNX exporter
        (``torch.onnx.export(..., dynamo=False)``); ``False`` under ``torch.compile`` and in eager mode.
    """
    if torch.compiler.is_exporting():
        return True
    if torch.compiler.is_compiling():  # torch.compile: normref's Function stays in the graph
        return False
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


class NormrefModule:
    """Mixin base of every normref torch layer: the drop-ins, ``StatefulNorm`` and ``Norm``.

    The batch-norm drop-ins (``nt.BatchNorm1d/2d/3d``, ``nt.SyncBatchNorm``) also subclass torch's
    ``torch.nn.modules.batchnorm._BatchNorm``, so ``torch.optim.swa_utils.update_bn``,
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and ``torch.nn.utils.fusion.fuse_conv_bn_eval``
    treat them as the batch norms they are. The :class:`~normref.backends.torch.StatefulNorm` layers
    (batch renormalization, ghost batch norm, whitening, ...) deliberately do not: torch's
    ``convert_sync_batchnorm`` would replace any ``_BatchNorm`` by a plain ``SyncBatchNorm`` and so
    silently change their training-mode math; ``nt.recalibrate`` and ``nt.convert_sync`` are their
    ``update_bn`` and ``convert_sync_batchnorm``, ``nt.fold`` their ``fuse_conv_bn_eval``.
    """

    def __prepare_scriptable__(self):  # torch.jit.script calls this on every submodule first
        raise TypeError(
            f"torch.jit.script: {type(self).__name__} cannot be scripted: its forward calls normref's "
            "torch.autograd.Function (the analytic backward), a Python class TorchScript does not compile. "
            "Script normref.backends.torch.exportable(model) instead (torch's own layers sharing the "
            "parameters and buffers, the whitening layers as their eval-mode affine map), or use "
            "torch.compile / torch.export, which keep normref's layers"
        )
