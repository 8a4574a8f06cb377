"""normref for PyTorch: every registered method as a ``torch.autograd.Function``, plus ``nn.Module`` layers.

Generated from the registry, so a method registered later is covered without new code::

    from normref.backends import torch as nt
    y = nt.group_norm(x, 4, w, b)            # any registered method name works as an attribute
    f = nt.function("iter_norm")             # the same, looked up by name (or by Method)

Gradients (first and second order) are normref's analytic backward; see ``_function`` for the
design. Layers (``modules``): ``nt.BatchNorm2d``, ``nt.LayerNorm``, ``nt.LocalResponseNorm`` etc.
(drop-ins for torch's, same constructor and state_dict); ``nt.StatefulNorm(method, C, ...)`` for any
activation method, with its running statistics as buffers, and named ones generated from it
(``nt.IterNorm``, ``nt.BatchWhitening2d``, ``nt.BatchRenorm2d``, ``nt.SwitchableNorm``, ...);
``nt.Norm`` for a stateless wrapper whose arrays are passed to ``forward``. ``nt.fold(model)``
folds a model's eval-mode norm layers (whitening included) into its convolutions (``folding``).
Parametrizations for the weight methods are in ``normref.backends.torch.parametrize``.

Data-parallel training (synchronized batch statistics, on CPU/gloo too): every layer with batch
statistics takes ``process_group=`` (``None``: local, the default; ``nt.WORLD`` or a
``torch.distributed.ProcessGroup``: the whole batch's statistics across the group in training mode);
``nt.convert_sync(model, nt.WORLD)`` synchronizes a built model (normref's layers in place, torch's
BatchNorm*d / SyncBatchNorm replaced by normref's); ``nt.SyncBatchNorm`` is a drop-in for torch's.

Existing models and deployment (issue 16): ``nt.convert(model)`` swaps torch's norm layers for
normref's drop-ins keeping parameters, buffers, flags and hooks (``nt.unconvert`` goes back);
``nt.exportable(model)`` gives a TorchScript/ONNX-ready copy (torch's layers, eval-mode whitening
as ``nt.InferenceAffine``); the drop-ins emit torch's native ops while traced for export
(``nt.exporting()``); ``nt.symbolic_trace`` keeps normref's layers as torch.fx leaves;
``nt.NormrefModule`` is the base of every normref layer (``conversion``, ``export``).

After training, ``nt.recalibrate(model, batches)`` re-estimates the population statistics of every
normref layer (and torch's batch norms) — Algorithm 2, precise BN or AdaBN — where torch's
``update_bn`` skips normref's ``StatefulNorm`` layers (``normref.backends.torch.inference``).
"""

from __future__ import annotations

from ._function import apply, autograd_function, function, node_name

__all__ = ["function", "apply", "autograd_function", "node_name"]


def __getattr__(name: str):
    # normref.backends.torch.<method> for every registered method (lazy: registered at any time)
    from normref.registry import REGISTRY

    if name in REGISTRY:
        return function(name)
    if not name.startswith("_") and name != "modules":
        import importlib

        modules = importlib.import_module(".modules", __name__)
        if name in modules.__all__:
            return getattr(modules, name)
    if name in ("fold", "layer_affine"):  # folding eval-mode norm layers into convolutions (issue 14)
        from . import folding

        return getattr(folding, name)
    if name == "recalibrate":  # population statistics re-estimated after training (issue 14)
        from .inference import recalibrate

        return recalibrate
    if name in ("OnlineNorm", "PowerNorm"):  # layers whose backward updates state (issue 14)
        from . import online

        return getattr(online, name)
    if not name.startswith("_") and name != "cross_iteration":  # MABN, memorized BN, CBN layers (issue 14)
        import importlib

        cross_iteration = importlib.import_module(".cross_iteration", __name__)
        if name in cross_iteration.__all__:
            return getattr(cross_iteration, name)
    if name in ("convert", "unconvert"):  # torch's norm layers swapped for normref's and back (issue 16)
        from . import conversion

        return getattr(conversion, name)
    if name in ("exportable", "InferenceAffine", "Tracer", "symbolic_trace", "exporting", "NormrefModule"):
        from . import export  # TorchScript / ONNX / torch.fx (issue 16)

        return getattr(export, name)
    if name in ("StiefelSGD", "StiefelAdam"):  # Cayley SGD / ADAM on the Stiefel manifold (issue 15, §6.2)
        from . import stiefel

        return getattr(stiefel, name)
    if name == "parametrize":
        import importlib

        return importlib.import_module(".parametrize", __name__)
    raise AttributeError(f"module 'normref.backends.torch' has no attribute {name!r}")
