"""Layers for the methods whose *backward* updates state: online normalization and power normalization.

``normref.online_norm`` and ``normref.power_norm`` (:mod:`normref.online`) carry two kinds of state:
the forward's streaming statistics, returned by the forward, and the backward's (online norm's
control accumulators u, v; power norm's gradient statistic ν), which only the backward can update
(it needs the cotangent). The generated ``normref.backends.torch.online_norm`` Function computes the
paper's gradient *from* the given backward state but cannot return the new one; these layers keep
both in buffers: in training mode the forward writes the new statistics (as torch's BatchNorm does
in place) and the backward, through ``normref.online_norm_backward`` / ``normref.power_norm_backward``
(pure), writes the new backward state. In eval mode the running statistics are the population
statistics and the backward is exact (the generated Function).

    layer = OnlineNorm(64)                       # buffers running_mean, running_var, error_mean, error_proj
    layer = PowerNorm(512, variant="pn")         # buffers running_mean_square, grad_correlation

One training-mode forward is paired with one backward: a second ``backward`` through the same graph
(``retain_graph=True``) is a ``RuntimeError`` (it would run the control process twice). Second
derivatives are not supported through the training-mode path (the papers define first-order
gradients only); eval mode has them (the generated Function).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import normref
from normref._validate import check_choice, check_positive
from normref.online import _alpha

from ._function import function

__all__ = ["OnlineNorm", "PowerNorm"]


def _check_static(where: str, alpha_fwd: Any, alpha_bkw: Any, eps: Any) -> tuple:
    """The constructor's options, refused as the functions refuse them (before any forward)."""
    return (_alpha(where, "alpha_fwd", alpha_fwd, upper_open=True), _alpha(where, "alpha_bkw", alpha_bkw),
            check_positive(where, "eps", eps))


class _StatefulStep(torch.autograd.Function):
    """One training step of a method with backward state: normref's forward, and normref's
    ``<method>_backward`` writing the layer's new backward state."""

    @staticmethod
    def forward(ctx, input, weight, bias, layer):  # type: ignore[override]
        out, res = layer._forward_state(input, weight, bias)
        ctx.res, ctx.layer = res, layer
        y = out[0]
        if any(y is a for a in res.arrays if a is not None):  # no affine: y is the saved ŷ itself
            y = y.clone()
        with torch.no_grad():
            for name in layer._forward_state_names:
                getattr(layer, name).copy_(getattr(out, name))
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.res is None:
            raise RuntimeError(f"{type(ctx.layer).__name__}: the training-mode backward ran already for this "
                               f"forward (its control state is updated once per step); do not retain the graph")
        grads = ctx.layer._backward_state(ctx.res, grad_output.contiguous())
        with torch.no_grad():
            for name in ctx.layer._backward_state_names:
                getattr(ctx.layer, name).copy_(getattr(grads, name))
        ctx.res = None
        return grads.grad_input, grads.grad_weight, grads.grad_bias, None


class _BackwardStateNorm(nn.Module):
    _method = ""
    _forward_state_names: tuple = ()
    _backward_state_names: tuple = ()
    _static_names: tuple = ()

    def _init_affine(self, num_features: int, affine: bool, factory: dict) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int; got {num_features!r}")
        if not isinstance(affine, bool):
            raise TypeError(f"{type(self).__name__}: affine must be a bool; got {type(affine).__name__} {affine!r}")
        self.num_features, self.affine = num_features, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @property
    def normref_method(self) -> str:
        """The registered method this layer computes (as :class:`StatefulNorm`'s attribute)."""
        return self._method

    def _static(self) -> dict:
        return {k: getattr(self, k) for k in self._static_names}

    def _states(self) -> list:
        return [getattr(self, n) for n in self._forward_state_names + self._backward_state_names]

    def _forward_state(self, input, weight, bias):
        m = normref.get(self._method)
        return m.forward(input, *self._states(), weight, bias, training=True, **self._static())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training:
            if torch.is_grad_enabled() and (input.requires_grad or any(
                    p is not None and p.requires_grad for p in (self.weight, self.bias))):
                return _StatefulStep.apply(input, self.weight, self.bias, self)
            out = normref.get(self._method)(input, *self._states(), self.weight, self.bias, training=True,
                                            **self._static())
            with torch.no_grad():
                for name in self._forward_state_names:
                    getattr(self, name).copy_(getattr(out, name))
            return out[0]
        return function(self._method)(input, *self._states(), self.weight, self.bias, training=False, **self._static())

    def extra_repr(self) -> str:
        return ", ".join([str(self.num_features), f"affine={self.affine}"]
                         + [f"{k}={getattr(self, k)!r}" for k in self._static_names])


class OnlineNorm(_BackwardStateNorm):
    """Online normalization (Chiley et al., NeurIPS 2019) as a layer: :func:`normref.online_norm`.

    ``OnlineNorm(num_features, alpha_fwd=0.999, alpha_bkw=0.99, eps=1e-5, affine=True)``; input
    ``(N, C, *spatial)``. Buffers: ``running_mean`` (0), ``running_var`` (1) — the forward's streaming
    statistics — and ``error_mean``, ``error_proj`` (0) — the backward's control accumulators u, v,
    updated by each training-mode backward (:func:`normref.online_norm_backward`).
    """

    _method = "online_norm"
    _forward_state_names = ("running_mean", "running_var")
    _backward_state_names = ("error_mean", "error_proj")
    _static_names = ("alpha_fwd", "alpha_bkw", "eps")

    def __init__(self, num_features: int, alpha_fwd: float = 0.999, alpha_bkw: float = 0.99, eps: float = 1e-5,
                 affine: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_affine(num_features, affine, factory)
        self.alpha_fwd, self.alpha_bkw, self.eps = _check_static(type(self).__name__, alpha_fwd, alpha_bkw, eps)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("error_mean", torch.zeros(num_features, **factory))
        self.register_buffer("error_proj", torch.zeros(num_features, **factory))


class PowerNorm(_BackwardStateNorm):
    """Power normalization (Shen et al., ICML 2020) as a layer: :func:`normref.power_norm`.

    ``PowerNorm(num_features, alpha_fwd=0.9, alpha_bkw=0.9, eps=1e-5, affine=True, variant="pn",
    grad_scale="running")``; input ``(N, C, *spatial)`` (tokens: ``(T·B, C)``). Buffers:
    ``running_mean_square`` (1), the forward's running quadratic mean ψ², and ``grad_correlation``
    (0), the backward's ν, updated by each training-mode backward (:func:`normref.power_norm_backward`).
    """

    _method = "power_norm"
    _forward_state_names = ("running_mean_square",)
    _backward_state_names = ("grad_correlation",)
    _static_names = ("alpha_fwd", "alpha_bkw", "eps", "variant", "grad_scale")

    def __init__(self, num_features: int, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9, eps: float = 1e-5,
                 affine: bool = True, variant: str = "pn", grad_scale: str = "running", device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_affine(num_features, affine, factory)
        self.alpha_fwd, self.alpha_bkw, self.eps = _check_static(type(self).__name__, alpha_fwd, alpha_bkw, eps)
        self.variant = check_choice(type(self).__name__, "variant", variant, ("pn", "pn-v"))
        self.grad_scale = check_choice(type(self).__name__, "grad_scale", grad_scale, ("running", "batch"))
        self.register_buffer("running_mean_square", torch.ones(num_features, **factory))
        self.register_buffer("grad_correlation", torch.zeros(num_features, **factory))


OnlineNorm._backward_state = staticmethod(normref.online_norm_backward)  # type: ignore[attr-defined]
PowerNorm._backward_state = staticmethod(normref.power_norm_backward)  # type: ignore[attr-defined]
