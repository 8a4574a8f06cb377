"""``torch.nn.utils.parametrize`` parametrizations for normref's weight methods.

Each class is a parametrization module (``forward(original...) -> weight``) running the
registry-generated autograd function, so the weight's gradient is normref's analytic backward; each
helper registers it on a module, like ``torch.nn.utils.parametrizations.weight_norm``::

    from normref.backends.torch import parametrize as P
    layer = P.weight_norm(torch.nn.Linear(4, 3))           # original0 = g, original1 = v (torch's layout)
    layer = P.oni(torch.nn.Conv2d(3, 8, 3), iterations=5)
    layer = P.spectral_norm(torch.nn.Linear(4, 3))         # power-iteration state u is a buffer

Formulas, survey sections and papers are in the docstrings of the normref functions named.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize as _tp

from ._function import function

__all__ = [
    "WeightNorm",
    "CenteredWeightNorm",
    "OrthogonalWeightNorm",
    "ONI",
    "WeightStandardization",
    "SpectralNorm",
    "weight_norm",
    "centered_weight_norm",
    "orthogonal_weight_norm",
    "oni",
    "weight_standardization",
    "spectral_norm",
]


class WeightNorm(nn.Module):
    """W = g·v/‖v‖ (:func:`normref.weight_norm`; Salimans & Kingma, NeurIPS 2016). Two originals,
    ``original0 = g`` (norms over every axis but ``dim``, kept as size-1 axes) and ``original1 = v``,
    exactly torch's ``parametrizations.weight_norm`` layout. ``dim=None``: one norm for the tensor."""

    def __init__(self, dim: int | None = 0):
        super().__init__()
        self.dim = dim

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return function("weight_norm")(weight_v, weight_g, self.dim)

    def right_inverse(self, weight: torch.Tensor):
        if self.dim is None:
            axes = list(range(weight.ndim))
        else:
            d = self.dim % weight.ndim
            axes = [a for a in range(weight.ndim) if a != d]
        g = torch.linalg.vector_norm(weight, dim=axes, keepdim=True) if axes else weight.abs()
        return g, weight


class CenteredWeightNorm(nn.Module):
    """W_i = g_i·(v_i − mean v_i)/‖v_i − mean v_i‖ (:func:`normref.centered_weight_norm`; Huang et al.,
    ICCV 2017). ``scale=True`` adds the per-row scale g (``original0``, initialised to the centered
    rows' norms, so the initial weight is the given one centered); ``scale=False`` gives unit rows."""

    def __init__(self, scale: bool = True):
        super().__init__()
        self.scale = scale

    def forward(self, *originals: torch.Tensor) -> torch.Tensor:
        if self.scale:
            g, v = originals
            return function("centered_weight_norm")(v, g)
        (v,) = originals
        return function("centered_weight_norm")(v)

    def right_inverse(self, weight: torch.Tensor):
        if not self.scale:
            return weight
        c = weight.reshape(weight.shape[0], -1)
        g = torch.linalg.vector_norm(c - c.mean(dim=1, keepdim=True), dim=1)
        return g, weight


class OrthogonalWeightNorm(nn.Module):
    """Orthogonal weight normalization (:func:`normref.orthogonal_weight_norm`; Huang et al., AAAI 2018)."""

    def __init__(self, group_size: int | None = None, eps: float = 0.0):
        super().__init__()
        self.group_size, self.eps = group_size, eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return function("orthogonal_weight_norm")(v, self.group_size, self.eps)


class ONI(nn.Module):
    """Orthogonalization by Newton's iteration (:func:`normref.oni`; Huang et al., CVPR 2020)."""

    def __init__(self, iterations: int = 5, group_size: int | None = None, eps: float = 0.0,
                 iteration: str = "newton_schulz"):
        super().__init__()
        self.iterations, self.group_size, self.eps, self.iteration = iterations, group_size, eps, iteration

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return function("oni")(v, self.iterations, self.group_size, self.eps, self.iteration)


class WeightStandardization(nn.Module):
    """Weight standardization (:func:`normref.weight_standardization`; Qiao et al., 2019)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return function("weight_standardization")(v, self.eps)


class SpectralNorm(nn.Module):
    """W/σ(W) with σ by power iteration (:func:`normref.spectral_norm`; Miyato et al., ICLR 2018).

    The state ``u`` is a buffer (saved in the state_dict as ``parametrizations.<name>.0._u``). In
    training mode each forward runs ``n_power_iterations`` steps and stores the updated u (returned by
    normref, then copied into the buffer); in eval mode u is not updated (``n_power_iterations=0``).
    Like torch, u is initialised from a normalised Gaussian and 15 warm-up iterations.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12, dim: int = 0):
        super().__init__()
        if n_power_iterations <= 0:
            raise ValueError(
                f"SpectralNorm: n_power_iterations must be a positive int; got {n_power_iterations!r}"
            )
        self.n_power_iterations, self.eps = n_power_iterations, eps
        self.dim = dim % weight.ndim
        h = weight.shape[self.dim]
        u = torch.randn(h, dtype=weight.dtype, device=weight.device)
        u = u / torch.linalg.vector_norm(u).clamp_min(eps)
        with torch.no_grad():
            u = function("spectral_norm")(weight.detach(), u, 15, eps, self.dim).u
        self.register_buffer("_u", u)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        n = self.n_power_iterations if self.training else 0
        out = function("spectral_norm")(weight, self._u, n, self.eps, self.dim)
        if self.training:
            with torch.no_grad():
                self._u.copy_(out.u)
        return out.weight


def _register(module: nn.Module, name: str, p: nn.Module) -> nn.Module:
    if not isinstance(getattr(module, name, None), torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no parameter or buffer named {name!r}")
    _tp.register_parametrization(module, name, p, unsafe=True)
    return module


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Register :class:`WeightNorm` on ``module.<name>`` (torch's ``parametrizations.weight_norm``)."""
    return _register(module, name, WeightNorm(dim))


def centered_weight_norm(module: nn.Module, name: str = "weight", scale: bool = True) -> nn.Module:
    """Register :class:`CenteredWeightNorm` on ``module.<name>``."""
    return _register(module, name, CenteredWeightNorm(scale))


def orthogonal_weight_norm(module: nn.Module, name: str = "weight", group_size: int | None = None,
                           eps: float = 0.0) -> nn.Module:
    """Register :class:`OrthogonalWeightNorm` on ``module.<name>``."""
    return _register(module, name, OrthogonalWeightNorm(group_size, eps))


def oni(module: nn.Module, name: str = "weight", iterations: int = 5, group_size: int | None = None,
        eps: float = 0.0, iteration: str = "newton_schulz") -> nn.Module:
    """Register :class:`ONI` on ``module.<name>``."""
    return _register(module, name, ONI(iterations, group_size, eps, iteration))


def weight_standardization(module: nn.Module, name: str = "weight", eps: float = 1e-5) -> nn.Module:
    """Register :class:`WeightStandardization` on ``module.<name>``."""
    return _register(module, name, WeightStandardization(eps))


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.<name>``; ``dim`` defaults as in torch (1 for
    transposed convolutions, 0 otherwise)."""
    w = getattr(module, name, None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no parameter or buffer named {name!r}")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    return _register(module, name, SpectralNorm(w.detach(), n_power_iterations, eps, dim))
