"""The numba kernels on CPU torch tensors, zero-copy (issue 18).

A CPU ``torch.Tensor`` and the NumPy array returned by ``tensor.numpy()`` share one buffer (same
data pointer, same strides), and ``torch.from_numpy`` wraps a NumPy result without a copy. So the
kernels that serve NumPy inputs (:mod:`normref.backends.numba`: ``moments``, ``mean_square``,
``normalize_forward``, ``normalize_backward``) serve CPU tensors too: each wrapper here takes the
tensors' NumPy views, runs the NumPy kernel, and hands back tensors over the kernel's results. The
math is the same kernel's, tested against the array-API formula in ``tests/test_torch_kernels.py``
on the layouts the NumPy kernels are tested on.

When a wrapper declines (returns ``None``, or ``accepts`` is False) the formula runs on the tensors,
as before. It declines whenever running outside torch could lose something:

- a tensor that autograd is recording (``requires_grad`` with grad mode on): the formula then runs
  under torch's autograd (``normref.use_adapters(False)``; the second-order recomputation of the torch
  Functions). Inside ``normref.backends.torch``'s Functions grad mode is off, so the kernels run there,
  with normref's own backward;
- a tensor subclass (FakeTensor, DTensor, ...), a functorch-wrapped tensor (``torch.func.vmap``,
  ``grad``, ``jvp``), a non-CPU or non-strided tensor, a tensor with a lazy conjugate or negative bit,
  a dtype other than float32/float64;
- while TorchDynamo traces (``torch.compile``): :func:`normref._kernels.lookup` skips kernels marked
  ``eager_only``, so a compiled graph holds the formula, never a call into numba.
"""

from __future__ import annotations

import importlib.util

__all__ = ["register", "usable"]

_PRIMITIVES = ("moments", "mean_square", "normalize_forward", "normalize_backward")


def _plain_types() -> tuple:
    import torch

    # a layer's weight is an nn.Parameter (a Tensor subclass with no behaviour of its own); buffers
    # are plain tensors. Every other subclass (FakeTensor, DTensor, a user's __torch_function__ type)
    # is declined: its semantics would be lost on the NumPy view
    return (torch.Tensor, torch.nn.Parameter)


_PLAIN: tuple = ()


def usable(t) -> bool:
    """Whether ``t`` (a tensor, or ``None``) can be handed to a NumPy kernel as ``t.numpy()``."""
    import torch

    if t is None:
        return True
    return (type(t) in _PLAIN and t.device.type == "cpu" and t.layout is torch.strided
            and t.dtype in (torch.float32, torch.float64) and not (t.requires_grad and torch.is_grad_enabled())
            and not t.is_conj() and not t.is_neg() and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _np(t):
    return None if t is None else t.detach().numpy()


def _tensor(a, originals):
    """A NumPy result as a tensor: the caller's own tensor where the kernel handed back its buffer
    (``out=``), else ``torch.from_numpy`` (no copy)."""
    import numpy as np
    import torch

    if a is None:
        return None
    for t, v in originals:
        if a is v:
            return t
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return a


def _wrap(np_kernel, np_accepts):
    import torch

    from . import config

    def accepts(x) -> bool:
        # the size first (the common small call pays one comparison), then the tensor's kind
        return x.numel() >= config.MIN_SIZE and usable(x) and np_accepts(x.detach().numpy())

    def kernel(*args):
        if not all(usable(a) for a in args if isinstance(a, torch.Tensor)):
            return None
        views = [(a, _np(a)) if isinstance(a, torch.Tensor) else (None, a) for a in args]
        r = np_kernel(*(v for _, v in views))
        if r is None:
            return None
        originals = [(t, v) for t, v in views if t is not None]
        if isinstance(r, tuple):
            return tuple(_tensor(a, originals) for a in r)
        return _tensor(r, originals)

    kernel.accepts = accepts
    kernel.eager_only = True  # never traced by TorchDynamo (normref._kernels.lookup)
    kernel.__name__ = f"torch_{np_kernel.__name__}"
    kernel.__doc__ = f"{np_kernel.__name__} of normref.backends.numba on CPU tensors (zero-copy)."
    return kernel


def register() -> None:
    """Register the wrappers for the ``torch`` namespace (the ``torch.numba`` entry point)."""
    if importlib.util.find_spec("numba") is None:
        raise ImportError("numba is not installed: CPU tensors run the array-API formulas")
    from normref._kernels import register_kernel

    global _PLAIN
    _PLAIN = _plain_types()

    from . import accepts as np_accepts
    from . import mean_square, moments, normalize_backward, normalize_forward

    for name, fn in zip(_PRIMITIVES, (moments, mean_square, normalize_forward, normalize_backward)):
        register_kernel("torch", name, _wrap(fn, np_accepts))
