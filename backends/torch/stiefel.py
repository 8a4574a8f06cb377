"""``StiefelSGD``: a torch optimizer that applies :func:`normref.stiefel.cayley_sgd_step` (Cayley SGD
with momentum, Li et al. ICLR 2020, Algorithm 1) to the parameters of the groups marked
``stiefel=True`` and plain SGD with momentum (torch's formula) to the others.

A Stiefel parameter of shape ``(d_out, *rest)`` is read as the matrix ``(d_out, fan_in)``; when
d_out ≤ fan_in its rows are kept orthonormal (WWᵀ = I, the survey's convention; the pure step is
applied to the transpose), otherwise its columns. The parameter must start on the manifold (e.g.
``torch.nn.init.orthogonal_``): the step keeps it there, it does not project onto it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from normref.stiefel import CayleySGDState, cayley_sgd_step

__all__ = ["StiefelSGD"]


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
    Survey §6.2. The state of a Stiefel parameter is the :class:`normref.stiefel.CayleySGDState`
    returned by the pure step (``optimizer.state[p]["stiefel"]``).

    References
    ----------
    J. Li, L. Fuxin & S. Todorovic, Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform, ICLR 2020.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, stiefel: bool = False,
                 iterations: int | None = None, q: float = 0.5, eps: float = 1e-8, norm: str = "fro") -> None:
        if not isinstance(stiefel, bool):
            raise TypeError(f"StiefelSGD: stiefel must be a bool; got {type(stiefel).__name__} {stiefel!r}")
        defaults = dict(lr=lr, momentum=momentum, stiefel=stiefel, iterations=iterations, q=q, eps=eps, norm=norm)
        super().__init__(params, defaults)
        for group in self.param_groups:
            # the arguments are checked once, here, by the pure step on a 1 × 1 point (it names them)
            if not isinstance(group["stiefel"], bool):
                raise TypeError(f"StiefelSGD: a group's stiefel must be a bool; got {group['stiefel']!r}")
            one = torch.ones(1, 1, dtype=torch.float64)
            cayley_sgd_step(one, one, group["lr"], None, group["momentum"], iterations=group["iterations"],
                            q=group["q"], eps=group["eps"], norm=group["norm"])
            if group["stiefel"]:
                for p in group["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"StiefelSGD: a Stiefel parameter must have at least 2 dimensions; "
                                         f"got shape {tuple(p.shape)}")

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
                mat = p.reshape(p.shape[0], -1)
                g = p.grad.reshape(p.shape[0], -1)
                rows = mat.shape[0] <= mat.shape[1]  # orthonormal rows: the point is the transpose
                w, gw = (mat.T, g.T) if rows else (mat, g)
                w_new, state = cayley_sgd_step(w, gw, lr, self.state[p].get("stiefel"), beta,
                                               iterations=group["iterations"], q=group["q"], eps=group["eps"],
                                               norm=group["norm"])
                self.state[p]["stiefel"] = CayleySGDState(state.momentum.clone())
                p.copy_((w_new.T if rows else w_new).reshape(p.shape))
        return loss
