"""``torch.nn.utils.parametrize`` parametrizations for normref's weight methods.

Each class is a parametrization module (``forward(original...) -> weight``) running the
registry-generated autograd function, so the weight's gradient is normref's analytic backward; each
helper registers it on a module, like ``torch.nn.utils.parametrizations.weight_norm``::

    from normref.backends.torch import parametrize as P
    layer = P.weight_norm(torch.nn.Linear(4, 3))           # original0 = g, original1 = v (torch's layout)
    layer = P.oni(torch.nn.Conv2d(3, 8, 3), iterations=5)
    layer = P.spectral_norm(torch.nn.Linear(4, 3))         # state buffers _u, _v: torch's layout

Formulas, survey sections and papers are in the docstrings of the normref functions named.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    """W = g·v/‖v‖ (:func:`normref.weight_norm`), a drop-in for torch's ``parametrizations.weight_norm``.

    Two originals, ``original0 = g`` (norms over every axis but ``dim``, kept as size-1 axes) and
    ``original1 = v``, exactly torch's layout, initialised as torch does (``torch.norm_except_dim``).
    The gradients are normref's analytic backward.

    Parameters
    ----------
    dim : int or None, default 0
        The axis kept; ``None``: one norm for the whole tensor (torch's ``dim=None``). A negative
        ``dim`` counts from the end here, whereas torch reads ``dim=-1`` as "whole tensor": pass
        ``None`` for that.

    Notes
    -----
    Survey §6.1, Eqn 29.

    References
    ----------
    .. [1] T. Salimans and D. P. Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate
       Training of Deep Neural Networks", NeurIPS 2016.
    """

    def __init__(self, dim: int | None = 0):
        super().__init__()
        self.dim = dim

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return function("weight_norm")(weight_v, weight_g, self.dim)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch's own initialization, bit for bit (its dim=-1 is "whole tensor", our None)
        d = -1 if self.dim is None else self.dim % weight.ndim
        return torch.norm_except_dim(weight, 2, d), weight


class CenteredWeightNorm(nn.Module):
    """W_i = g_i·(v_i − mean v_i)/‖v_i − mean v_i‖ (:func:`normref.centered_weight_norm`).

    Parameters
    ----------
    scale : bool, default True
        ``True`` adds the per-row scale g (``original0``, initialised to the centered rows' norms, so
        the initial weight is the given one centered); ``False`` gives unit rows.

    Notes
    -----
    Survey §6.1, Eqn 30.

    References
    ----------
    .. [1] L. Huang, X. Liu, Y. Liu, B. Lang and D. Tao, "Centered Weight Normalization in Accelerating
       Training of Deep Neural Networks", ICCV 2017.
    """

    def __init__(self, scale: bool = True):
        super().__init__()
        self.scale = scale

    def forward(self, *originals: torch.Tensor) -> torch.Tensor:
        if self.scale:
            g, v = originals
            return function("centered_weight_norm")(v, g)
        (v,) = originals
        return function("centered_weight_norm")(v)

    def right_inverse(self, weight: torch.Tensor) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        if not self.scale:
            return weight
        c = weight.reshape(weight.shape[0], -1)
        g = torch.linalg.vector_norm(c - c.mean(dim=1, keepdim=True), dim=1)
        return g, weight


class OrthogonalWeightNorm(nn.Module):
    """Orthogonal weight normalization (:func:`normref.orthogonal_weight_norm`) as a parametrization.

    Parameters
    ----------
    group_size : int or None, default None
        Rows per group (see :func:`normref.orthogonal_weight_norm`).
    eps : float, default 0.0
        ε added to Vc·Vcᵀ.

    Notes
    -----
    Survey §6.1, Eqn 31.

    References
    ----------
    .. [1] L. Huang, X. Liu, B. Lang, A. W. Yu, Y. Wang and B. Li, "Orthogonal Weight Normalization:
       Solution to Optimization over Multiple Dependent Stiefel Manifolds in Deep Neural Networks",
       AAAI 2018.
    """

    def __init__(self, group_size: int | None = None, eps: float = 0.0):
        super().__init__()
        self.group_size, self.eps = group_size, eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return function("orthogonal_weight_norm")(v, self.group_size, self.eps)


class ONI(nn.Module):
    """Orthogonalization by Newton's iteration (:func:`normref.oni`) as a parametrization.

    Parameters
    ----------
    iterations : int, default 5
        T.
    group_size : int or None, default None
        Rows per group; ``None``: all rows.
    eps : float, default 0.0
        ε added to Zc·Zcᵀ.
    iteration : str, default "newton_schulz"
        ``"newton_schulz"`` (coupled, stable) or ``"newton"`` (the paper's recurrence).

    Notes
    -----
    Survey §6.1 (ONI).

    References
    ----------
    .. [1] L. Huang, L. Liu, F. Zhu, D. Wan, Z. Yuan, B. Li and L. Shao, "Controllable Orthogonalization
       in Training DNNs", CVPR 2020.
    """

    def __init__(self, iterations: int = 5, group_size: int | None = None, eps: float = 0.0,
                 iteration: str = "newton_schulz"):
        super().__init__()
        self.iterations, self.group_size, self.eps, self.iteration = iterations, group_size, eps, iteration

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return function("oni")(v, self.iterations, self.group_size, self.eps, self.iteration)


class WeightStandardization(nn.Module):
    """Weight standardization (:func:`normref.weight_standardization`) as a parametrization.

    Parameters
    ----------
    eps : float, default 1e-5
        ε, inside the square root.

    Notes
    -----
    Survey §6.1.

    References
    ----------
    .. [1] S. Qiao, H. Wang, C. Liu, W. Shen and A. Yuille, "Micro-Batch Training with Batch-Channel
       Normalization and Weight Standardization", arXiv:1903.10520, 2019.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return function("weight_standardization")(v, self.eps)


class SpectralNorm(nn.Module):
    """W/σ(W), σ = uᵀ·W·v by power iteration: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

    :func:`normref.spectral_norm` with its ``v=`` state. The same state as torch's: buffers ``_u``
    (``(w.shape[dim],)``) and ``_v`` (the other axes flattened), saved as
    ``parametrizations.<name>.0._u`` / ``._v``, so state_dicts load either way; the same
    initialization: ``_u`` then ``_v`` drawn by ``normal_(0, 1)`` from the global generator (the same
    draws as torch's under the same seed), normalised, then 15 power-iteration steps
    u = N(W·v), v = N(Wᵀ·u) (computed by normref; :func:`spectral_norm` then evaluates it once, as
    torch's registration does). In training mode each forward runs
    ``n_power_iterations`` steps and stores the updated (u, v) (returned by normref, copied into the
    buffers); in eval mode the buffers are used as they are (``n_power_iterations=0``). The weight's
    gradient is normref's analytic backward (u and v constants), never autograd through the forward.
    A 1-D weight is normalized to unit norm, as torch does (:func:`normref.weight_norm` with g = 1 and
    the norm over the whole tensor; torch floors the norm at eps, here a zero vector raises).

    Parameters
    ----------
    weight : torch.Tensor
        The weight the state is initialised from.
    n_power_iterations : int, default 1
        Power-iteration steps per training forward (positive).
    eps : float, default 1e-12
        The floor on the norms (``F.normalize``'s eps).
    dim : int, default 0
        The axis of W that becomes the matrix's rows.

    Notes
    -----
    Survey §6.1.

    References
    ----------
    .. [1] T. Miyato, T. Kataoka, M. Koyama and Y. Yoshida, "Spectral Normalization for Generative
       Adversarial Networks", ICLR 2018.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12, dim: int = 0):
        super().__init__()
        ndim = weight.ndim
        if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
            raise ValueError(f"SpectralNorm: dim must be an integer in [{-ndim}, {ndim - 1}] for a "
                             f"{ndim}-dimensional weight; got {dim!r}")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations <= 0:
            raise ValueError(
                f"SpectralNorm: n_power_iterations must be a positive int; got {n_power_iterations!r}"
            )
        self.n_power_iterations, self.eps = n_power_iterations, eps
        self.dim = dim % ndim
        if ndim < 2:
            return  # torch's 1-D path: no state
        w = weight.detach()
        perm = (self.dim,) + tuple(d for d in range(ndim) if d != self.dim)
        h = w.shape[self.dim]
        fan = w.numel() // h
        # torch's draws, in torch's order (u first), from the global generator
        mat = w.permute(perm).reshape(h, fan)
        u = F.normalize(mat.new_empty(h).normal_(0, 1), dim=0, eps=eps)
        v = F.normalize(mat.new_empty(fan).normal_(0, 1), dim=0, eps=eps)
        with torch.no_grad():
            out = function("spectral_norm")(w, u, 15, eps, self.dim, v=v)
        self.register_buffer("_u", out.u.clone())
        self.register_buffer("_v", out.v.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim < 2:  # w/‖w‖ as a one-row weight norm with g = 1 (normref's weights have 2 axes)
            one = torch.ones((), dtype=weight.dtype, device=weight.device)
            return function("weight_norm")(weight.reshape(1, -1), one, None).reshape(weight.shape)
        n = self.n_power_iterations if self.training else 0
        out = function("spectral_norm")(weight, self._u, n, self.eps, self.dim, v=self._v)
        if self.training:
            with torch.no_grad():
                self._u.copy_(out.u)
                self._v.copy_(out.v)
        return out.weight

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Assigning a weight stores it as the original (torch's behaviour: no projection)."""
        return value


def _register(module: nn.Module, name: str, p: nn.Module, unsafe: bool = True) -> nn.Module:
    if not isinstance(getattr(module, name, None), torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no parameter or buffer named {name!r}")
    _tp.register_parametrization(module, name, p, unsafe=unsafe)
    return module


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Register :class:`WeightNorm` on ``module.<name>`` (torch's ``parametrizations.weight_norm``).

    Parameters
    ----------
    module : torch.nn.Module
        The layer.
    name : str, default "weight"
        The parameter (or buffer) to parametrize.
    dim : int or None, default 0
        As in :class:`WeightNorm`.

    Returns
    -------
    module : torch.nn.Module
        ``module``, parametrized in place.

    Notes
    -----
    Survey §6.1, Eqn 29.

    References
    ----------
    .. [1] T. Salimans and D. P. Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate
       Training of Deep Neural Networks", NeurIPS 2016.
    """
    return _register(module, name, WeightNorm(dim))


def centered_weight_norm(module: nn.Module, name: str = "weight", scale: bool = True) -> nn.Module:
    """Register :class:`CenteredWeightNorm` on ``module.<name>``.

    Parameters
    ----------
    module : torch.nn.Module
        The layer.
    name : str, default "weight"
        The parameter (or buffer) to parametrize.
    scale : bool, default True
        As in :class:`CenteredWeightNorm`.

    Returns
    -------
    module : torch.nn.Module
        ``module``, parametrized in place.

    Notes
    -----
    Survey §6.1, Eqn 30.

    References
    ----------
    .. [1] L. Huang, X. Liu, Y. Liu, B. Lang and D. Tao, "Centered Weight Normalization in Accelerating
       Training of Deep Neural Networks", ICCV 2017.
    """
    return _register(module, name, CenteredWeightNorm(scale))


def orthogonal_weight_norm(module: nn.Module, name: str = "weight", group_size: int | None = None,
                           eps: float = 0.0) -> nn.Module:
    """Register :class:`OrthogonalWeightNorm` on ``module.<name>``.

    Parameters
    ----------
    module : torch.nn.Module
        The layer.
    name : str, default "weight"
        The parameter (or buffer) to parametrize.
    group_size : int or None, default None
        As in :class:`OrthogonalWeightNorm`.
    eps : float, default 0.0
        As in :class:`OrthogonalWeightNorm`.

    Returns
    -------
    module : torch.nn.Module
        ``module``, parametrized in place.

    Notes
    -----
    Survey §6.1, Eqn 31.

    References
    ----------
    .. [1] L. Huang, X. Liu, B. Lang, A. W. Yu, Y. Wang and B. Li, "Orthogonal Weight Normalization:
       Solution to Optimization over Multiple Dependent Stiefel Manifolds in Deep Neural Networks",
       AAAI 2018.
    """
    return _register(module, name, OrthogonalWeightNorm(group_size, eps))


def oni(module: nn.Module, name: str = "weight", iterations: int = 5, group_size: int | None = None,
        eps: float = 0.0, iteration: str = "newton_schulz") -> nn.Module:
    """Register :class:`ONI` on ``module.<name>``.

    Parameters
    ----------
    module : torch.nn.Module
        The layer.
    name : str, default "weight"
        The parameter (or buffer) to parametrize.
    iterations : int, default 5
        As in :class:`ONI`.
    group_size : int or None, default None
        As in :class:`ONI`.
    eps : float, default 0.0
        As in :class:`ONI`.
    iteration : str, default "newton_schulz"
        As in :class:`ONI`.

    Returns
    -------
    module : torch.nn.Module
        ``module``, parametrized in place.

    Notes
    -----
    Survey §6.1 (ONI).

    References
    ----------
    .. [1] L. Huang, L. Liu, F. Zhu, D. Wan, Z. Yuan, B. Li and L. Shao, "Controllable Orthogonalization
       in Training DNNs", CVPR 2020.
    """
    return _register(module, name, ONI(iterations, group_size, eps, iteration))


def weight_standardization(module: nn.Module, name: str = "weight", eps: float = 1e-5) -> nn.Module:
    """Register :class:`WeightStandardization` on ``module.<name>``.

    Parameters
    ----------
    module : torch.nn.Module
        The layer.
    name : str, default "weight"
        The parameter (or buffer) to parametrize.
    eps : float, default 1e-5
        As in :class:`WeightStandardization`.

    Returns
    -------
    module : torch.nn.Module
        ``module``, parametrized in place.

    Notes
    -----
    Survey §6.1.

    References
    ----------
    .. [1] S. Qiao, H. Wang, C. Liu, W. Shen and A. Yuille, "Micro-Batch Training with Batch-Channel
       Normalization and Weight Standardization", arXiv:1903.10520, 2019.
    """
    return _register(module, name, WeightStandardization(eps))


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.<name>``, as torch's ``parametrizations.spectral_norm``.

    Same arguments as ``torch.nn.utils.parametrizations.spectral_norm``. Like torch's, the
    registration's consistency check evaluates the parametrization once, so in training mode the
    state has had 15 + ``n_power_iterations`` steps when this returns: the same state as torch's under
    the same seed.

    Parameters
    ----------
    module : torch.nn.Module
        The layer.
    name : str, default "weight"
        The parameter (or buffer) to parametrize.
    n_power_iterations : int, default 1
        As in :class:`SpectralNorm`.
    eps : float, default 1e-12
        As in :class:`SpectralNorm`.
    dim : int or None, default None
        As in :class:`SpectralNorm`; ``None`` defaults as in torch: 1 for transposed convolutions, 0
        otherwise.

    Returns
    -------
    module : torch.nn.Module
        ``module``, parametrized in place.

    Raises
    ------
    ValueError
        When ``module`` has no parameter or buffer ``name``.

    Notes
    -----
    Survey §6.1.

    References
    ----------
    .. [1] T. Miyato, T. Kataoka, M. Koyama and Y. Yoshida, "Spectral Normalization for Generative
       Adversarial Networks", ICLR 2018.
    """
    w = getattr(module, name, None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no parameter or buffer named {name!r}")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    # registered with torch's consistency check (unsafe=False), exactly as torch registers its own: the
    # check runs one forward in the module's mode, i.e. n_power_iterations more steps in training mode
    return _register(module, name, SpectralNorm(w.detach(), n_power_iterations, eps, dim), unsafe=False)
