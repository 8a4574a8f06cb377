"""Normalization representation recovery (NRR), survey §5.1 Algorithm 1 line 5, Eqn 19.

- none:             x̃ = x̂.
- affine:           x̃ = γ·x̂ + β with γ, β ∈ R^d per channel (BN, Ioffe & Szegedy 2015), or per
                    normalized element (LN), or *generated*: γ, β broadcastable to x̂, given per sample
                    or per position (conditional BN/IN, de Vries et al. 2017, Dumoulin et al. 2017;
                    AdaIN, Huang & Belongie 2017; SPADE, Park et al. 2019).
                    dx̂ = γ·g, dγ = Σ_broadcast g·x̂, dβ = Σ_broadcast g (sums over the axes γ and β
                    were broadcast along: the adjoint of broadcasting).
- TLU (filter response normalization, Singh & Krishnan 2020): z = max(x̃, τ);
                    dx̃ = g·[x̃ ≥ τ], dτ = Σ_broadcast g·[x̃ < τ] (the tie x̃ = τ goes to x̃).
"""

from __future__ import annotations

from ._xp import sum_to_shape

__all__ = ["affine_forward", "affine_backward", "tlu_forward", "tlu_backward"]


def affine_forward(xp, xhat, gamma, beta):
    """x̃ = γ·x̂ + β (either may be ``None``); γ, β already broadcastable to x̂."""
    y = xhat if gamma is None else xhat * gamma
    if beta is not None:
        y = y + beta
    return y


def affine_backward(xp, xhat, gamma, beta_shape, g, need=(True, True, True)):
    """(dx̂, dγ, dβ) of the affine recovery; ``dγ``/``dβ`` have γ's shape and ``beta_shape`` (the
    broadcastable shapes given to the forward; ``beta_shape=None`` when there was no β). ``need``:
    which of the three to form (``None`` for the others; ``xhat`` is only read for dγ)."""
    dxhat = None if not need[0] else (g if gamma is None else g * gamma)
    dgamma = None if gamma is None or not need[1] else sum_to_shape(xp, g * xhat, gamma.shape)
    dbeta = None if beta_shape is None or not need[2] else sum_to_shape(xp, g, beta_shape)
    return dxhat, dgamma, dbeta


def tlu_forward(xp, y, tau):
    """The thresholded linear unit z = max(y, τ), NaN-propagating like torch.maximum: a NaN y or τ
    gives NaN (``y >= τ`` is false for NaN, so a plain select would return τ for a NaN y)."""
    return xp.where(y >= tau, y, xp.zeros_like(y) + tau) + _nan_of(xp, y, tau)


def _nan_of(xp, y, tau):
    """0 where y and τ are numbers, NaN where either is NaN (added to a result to propagate it)."""
    return xp.where(xp.isnan(y) | xp.isnan(tau), y + tau, xp.zeros_like(y))


def tlu_backward(xp, y, tau, g):
    """dy = g·[y ≥ τ], dτ = Σ g·[y < τ]; where y or τ is NaN both are NaN (the derivative of a NaN
    result is not a number: NaN in, NaN out, as in the forward)."""
    keep = y >= tau
    zero = xp.zeros_like(g)
    nan = _nan_of(xp, y, tau)
    dy = xp.where(keep, g, zero) + nan
    dtau = sum_to_shape(xp, xp.where(keep, zero, g) + nan, tau.shape)
    return dy, dtau
