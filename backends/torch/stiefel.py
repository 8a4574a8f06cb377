"""Torch optimizers on the Stiefel manifold over normref's pure steps (Li et al. ICLR 2020):
``StiefelSGD`` applies :func:`normref.stiefel.cayley_sgd_step` (Cayley SGD with momentum, Algorithm 1)
and ``StiefelAdam`` :func:`normref.stiefel.cayley_adam_step` (Cayley ADAM, Algorithm 2) to the
parameters of the groups marked ``stiefel=True``; the other groups get torch's SGD with momentum
and torch's Adam (``torch.optim.Adam``'s formula, no weight decay, no amsgrad) respectively.

A Stiefel parameter of shape ``(d_out, *rest)`` is read as the matrix ``(d_out, fan_in)``; when
d_out ≤ fan_in its rows are kept orthonormal (WWᵀ = I, the survey's convention; the pure step is
applied to the transpose), otherwise its columns. The parameter must start on the manifold (e.g.
``torch.nn.init.orthogonal_``): the step keeps it there, it does not project onto it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from normref._validate import check_bool
from normref.stiefel import CayleyAdamState, CayleySGDState, cayley_adam_step, cayley_sgd_step

__all__ = ["StiefelSGD", "StiefelAdam"]


def _check_stiefel_params(name: str, group: dict) -> None:
    group["stiefel"] = check_bool(name, "a group's stiefel", group["stiefel"])
    if group["stiefel"]:
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(f"{name}: a Stiefel parameter must have at least 2 dimensions; "
                                 f"got shape {tuple(p.shape)}")


def _point(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The parameter and its gradient as an n × p point with orthonormal columns: (d_out, fan_in)
    when d_out > fan_in, else its transpose (orthonormal rows, WWᵀ = I); and which it was."""
    mat = p.reshape(p.shape[0], -1)
    g = p.grad.reshape(p.shape[0], -1)
    rows = mat.shape[0] <= mat.shape[1]
    return (mat.T, g.T, rows) if rows else (mat, g, rows)


def _write(p: torch.Tensor, w_new: torch.Tensor, rows: bool) -> None:
    p.copy_((w_new.T if rows else w_new).reshape(p.shape))


class StiefelSGD(torch.optim.Optimizer):
    """Cayley SGD with momentum on the Stiefel manifold for the groups with ``stiefel=True``.

    Per Stiefel parameter W (as an n × p matrix with orthonormal columns) and its gradient G:
    M ← βM − G; A = Ŵ − Ŵᵀ, Ŵ = MWᵀ − ½W(WᵀMWᵀ); M ← AW; α = min(lr, 2q/(‖A‖ + ε));
    W ← the Cayley transform (I − αA/2)⁻¹(I + αA/2)W, exactly (``iterations=None``, the
    default) or by ``iterations`` fixed-point steps (the paper: 2; they drift off the manifold). Other groups: torch's SGD with momentum,
    b ← βb + G, W ← W − lr·b (no dampening, no weight decay).

    Parameters
    ----------
    params : iterable of tensors or of dicts (parameter groups)
        A group's ``stiefel`` (default: the constructor's) marks its parameters as Stiefel.
    lr : float
        The learning rate (the bound l on α for Stiefel groups).
    momentum : float, default 0.9
        β in [0, 1).
    stiefel : bool, default False
        The default for groups that do not say.
    iterations, q, eps, norm : int or None, float, float, str, default None, 0.5, 1e-8, "fro"
        As in :func:`normref.stiefel.cayley_sgd_step`.

    Notes
    -----
    Survey §6.2. The state of a Stiefel parameter is the momentum of the pure step's
    :class:`normref.stiefel.CayleySGDState`, kept as a plain tensor (``optimizer.state[p]
    ["stiefel_momentum"]``) so that ``state_dict``/``load_state_dict`` round-trip it.

    References
    ----------
    J. Li, L. Fuxin & S. Todorovic, Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform, ICLR 2020.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, stiefel: bool = False,
                 iterations: int | None = None, q: float = 0.5, eps: float = 1e-8, norm: str = "fro") -> None:
        stiefel = check_bool("StiefelSGD", "stiefel", stiefel)
        defaults = dict(lr=lr, momentum=momentum, stiefel=stiefel, iterations=iterations, q=q, eps=eps, norm=norm)
        super().__init__(params, defaults)
        for group in self.param_groups:
            # the arguments are checked once, here, by the pure step on a 1 × 1 point (it names them)
            _check_stiefel_params("StiefelSGD", group)
            one = torch.ones(1, 1, dtype=torch.float64)
            cayley_sgd_step(one, one, group["lr"], None, group["momentum"], iterations=group["iterations"],
                            q=group["q"], eps=group["eps"], norm=group["norm"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not group["stiefel"]:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    buf = p.grad.clone() if buf is None else buf.mul_(beta).add_(p.grad)
                    st["momentum_buffer"] = buf
                    p.add_(buf, alpha=-lr)
                    continue
                w, gw, rows = _point(p)
                st = self.state[p]
                prev = CayleySGDState(st["stiefel_momentum"]) if "stiefel_momentum" in st else None
                w_new, state = cayley_sgd_step(w, gw, lr, prev, beta, iterations=group["iterations"],
                                               q=group["q"], eps=group["eps"], norm=group["norm"])
                # plain tensors in the optimizer state: torch's load_state_dict rebuilds containers
                st["stiefel_momentum"] = state.momentum.clone()
                _write(p, w_new, rows)
        return loss


class StiefelAdam(torch.optim.Optimizer):
    """Cayley ADAM on the Stiefel manifold for the groups with ``stiefel=True``, torch's Adam elsewhere.

    Per Stiefel parameter W (an n × p matrix with orthonormal columns, read as :class:`StiefelSGD`
    reads it) and its gradient G, step k: M ← β₁M + (1 − β₁)G; v ← β₂v + (1 − β₂)‖G‖²_F;
    r = (1 − β₁^k)·√(v/(1 − β₂^k) + ε); A = (Ŵ − Ŵᵀ)/r with Ŵ = MWᵀ − ½W(WᵀMWᵀ); M ← r·AW;
    α = min(lr, 2q/(‖A‖ + ε)); W ← (I + αA/2)⁻¹(I − αA/2)W (the Cayley curve at −α: a descent step),
    exactly (``iterations=None``) or by fixed-point steps (the paper: 2). Other groups:
    ``torch.optim.Adam``'s update, m ← β₁m + (1 − β₁)g, v ← β₂v + (1 − β₂)g²,
    W ← W − lr/(1 − β₁^k) · m/(√v/√(1 − β₂^k) + ε).

    Parameters
    ----------
    params : iterable of tensors or of dicts (parameter groups)
        A group's ``stiefel`` (default: the constructor's) marks its parameters as Stiefel.
    lr : float
        The learning rate (for Stiefel groups, the bound l on α).
    betas : (float, float), default (0.9, 0.99)
        (β₁, β₂): the paper's values; torch's Adam default is (0.9, 0.999) — pass it for the other
        groups' torch-identical update.
    eps : float, default 1e-8
        ε (inside the square root of the Stiefel step, as in the paper; added to √v̂ in the others, as
        torch's Adam).
    stiefel : bool, default False
        The default for groups that do not say.
    iterations, q, norm : int or None, float, str, default None, 0.5, "fro"
        As in :func:`normref.stiefel.cayley_adam_step`.

    Notes
    -----
    Survey §6.2. The state of a Stiefel parameter is the pure step's
    :class:`normref.stiefel.CayleyAdamState`, kept as plain entries (``"stiefel_m"``, ``"stiefel_v"``,
    ``"step"``) so that ``state_dict``/``load_state_dict`` round-trip it; the second moment is one
    scalar per matrix, as in the paper.

    References
    ----------
    J. Li, L. Fuxin & S. Todorovic, Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform, ICLR 2020 (Algorithm 2); D. Kingma & J. Ba, Adam, ICLR 2015.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, stiefel: bool = False, iterations: int | None = None, q: float = 0.5,
                 norm: str = "fro") -> None:
        stiefel = check_bool("StiefelAdam", "stiefel", stiefel)
        defaults = dict(lr=lr, betas=betas, eps=eps, stiefel=stiefel, iterations=iterations, q=q, norm=norm)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_stiefel_params("StiefelAdam", group)
            one = torch.ones(1, 1, dtype=torch.float64)  # the pure step names any bad argument
            cayley_adam_step(one, one, group["lr"], None, group["betas"], iterations=group["iterations"],
                             q=group["q"], eps=group["eps"], norm=group["norm"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not group["stiefel"]:  # torch.optim.Adam (single-tensor formula)
                    if "step" not in st:
                        st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                    st["step"] += 1
                    k = st["step"]
                    st["exp_avg"].lerp_(p.grad, 1 - b1)
                    st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (st["exp_avg_sq"].sqrt() / (1 - b2 ** k) ** 0.5).add_(eps)
                    p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** k))
                    continue
                w, gw, rows = _point(p)
                prev = CayleyAdamState(st["stiefel_m"], st["stiefel_v"], int(st["step"])) if "step" in st else None
                w_new, state = cayley_adam_step(w, gw, lr, prev, (b1, b2), iterations=group["iterations"],
                                                q=group["q"], eps=eps, norm=group["norm"])
                # plain entries in the optimizer state: torch's load_state_dict rebuilds containers
                st["stiefel_m"], st["stiefel_v"], st["step"] = state.m.clone(), state.v.clone(), state.step
                _write(p, w_new, rows)
        return loss
