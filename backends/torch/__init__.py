"""normref for PyTorch: every registered method as a ``torch.autograd.Function``, plus ``nn.Module`` layers.

Generated from the registry, so a method registered later is covered without new code::

    from normref.backends import torch as nt
    y = nt.group_norm(x, 4, w, b)            # any registered method name works as an attribute
    f = nt.function("iter_norm")             # the same, looked up by name (or by Method)

Gradients (first and second order) are normref's analytic backward; see ``_function`` for the
design. Layers: ``nt.BatchNorm2d`` etc. (drop-ins for torch's, same constructor and state_dict), and
``nt.Norm`` for any activation method; parametrizations for the weight methods in
``normref.backends.torch.parametrize``.
"""

from __future__ import annotations

from ._function import apply, autograd_function, function

__all__ = ["function", "apply", "autograd_function"]


def __getattr__(name: str):
    # normref.backends.torch.<method> for every registered method (lazy: registered at any time)
    from normref.registry import REGISTRY

    if name in REGISTRY:
        return function(name)
    if name in _MODULE_NAMES:
        from . import modules

        return getattr(modules, name)
    if name == "parametrize":
        import importlib

        return importlib.import_module(".parametrize", __name__)
    raise AttributeError(f"module 'normref.backends.torch' has no attribute {name!r}")


_MODULE_NAMES = frozenset(
    ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
     "LayerNorm", "GroupNorm", "RMSNorm", "Norm"]
)
