"""Riemannian optimization on the Stiefel manifold (survey §6.2): the Riemannian gradient, the QR,
Cayley and polar retractions, and Cayley SGD / Cayley ADAM (Li, Fuxin & Todorovic, ICLR 2020).

St(n, p) = {W ∈ R^{n×p} : WᵀW = I_p}, p ≤ n: the columns of W are orthonormal (a batch
``(..., n, p)`` is a batch of points). A weight whose *rows* are orthonormal (d_out ≤ fan_in, the
survey's convention WWᵀ = I) is the transpose of a point: pass ``w.T`` (the torch optimizer
:class:`normref.backends.torch.StiefelSGD` does so).

Everything is a pure function of arrays (the array API only: matmul, linalg.solve, linalg.qr,
linalg.eigh): no input is mutated, the optimizer state goes in as an argument and comes back as a
result, ``(w, grad, lr, state) -> (w, state)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import matfun as _mf
from ._validate import _real, check_choice, check_int, check_positive
from ._results import result_tuple
from ._xp import Array, namespace

__all__ = [
    "stiefel_project",
    "stiefel_retract",
    "cayley_sgd_step",
    "cayley_adam_step",
    "CayleySGDState",
    "CayleyAdamState",
]

_PAPER = ("J. Li, L. Fuxin & S. Todorovic, Efficient Riemannian optimization on the Stiefel manifold "
          "via the Cayley transform, ICLR 2020")


@result_tuple
class CayleySGDState(NamedTuple):
    """State of :func:`cayley_sgd_step`: the momentum M (n × p, a tangent vector at the current W)."""

    momentum: Array


@result_tuple
class CayleyAdamState(NamedTuple):
    """State of :func:`cayley_adam_step`: the first moment, the second moment and the step count.

    M (n × p, a tangent vector), v (one scalar per matrix, shape (...)) the running mean of ‖G‖²_F,
    and the number of steps taken."""

    m: Array
    v: Array
    step: int


# --------------------------------------------------------------------------------------------------
# validation


def _check_point(fn: str, w: Any, **others: Any) -> Any:
    if w is None:
        raise TypeError(f"{fn}: w must be an array; got None")
    for name, a in others.items():
        if a is None:
            raise TypeError(f"{fn}: {name} must be an array; got None")
    xp = namespace(fn, w=w, **others)
    if w.ndim < 2:
        raise ValueError(f"{fn}: w must have at least 2 dimensions (..., n, p); got {w.ndim} dimensions, "
                         f"shape {tuple(w.shape)}")
    n, p = w.shape[-2], w.shape[-1]
    if p < 1 or n < p:
        raise ValueError(f"{fn}: w must be (..., n, p) with 1 <= p <= n (orthonormal columns; pass the "
                         f"transpose of a weight with orthonormal rows); got shape {tuple(w.shape)}")
    for name, a in others.items():
        if tuple(a.shape) != tuple(w.shape):
            raise ValueError(f"{fn}: {name} must have w's shape {tuple(w.shape)}; got shape {tuple(a.shape)}")
    return xp


def _check_lr(fn: str, lr: Any) -> float:
    return check_positive(fn, "lr", lr)


def _check_unit_open(fn: str, name: str, v: Any, upper_closed: bool = False) -> float:
    v = _real(fn, name, v)
    ok = (0.0 <= v <= 1.0) if upper_closed else (0.0 <= v < 1.0)
    if not ok:
        rng = "[0, 1]" if upper_closed else "[0, 1)"
        raise ValueError(f"{fn}: {name} must lie in {rng}; got {v!r}")
    return v


def _check_iterations(fn: str, iterations: Any) -> int | None:
    if iterations is None:
        return None
    return check_int(fn, "iterations", iterations, minimum=1)


def _check_q(fn: str, q: Any) -> float:
    v = _real(fn, "q", q)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{fn}: q must lie in (0, 1) (the contraction factor of the Cayley iteration); got {v!r}")
    return v


# --------------------------------------------------------------------------------------------------
# the Riemannian gradient


def stiefel_project(w: Array, g: Array, metric: str = "euclidean") -> Array:
    """The Riemannian gradient on the Stiefel manifold: the Euclidean gradient projected to T_W St.

    Euclidean (embedded) metric ⟨ξ, η⟩ = tr(ξᵀη), the orthogonal projection to
    T_W St = {ξ : sym(Wᵀξ) = 0}:

        grad f(W) = G − W·sym(WᵀG),    sym(A) = (A + Aᵀ)/2.

    Canonical metric ⟨ξ, η⟩ = tr(ξᵀ(I − ½WWᵀ)η) (Edelman, Arias & Smith 1998): grad f(W) = G − W·GᵀW.

    Parameters
    ----------
    w : Array
        A point of St(n, p), shape ``(..., n, p)`` with p ≤ n and WᵀW = I (not checked: the value is
        the projection only for such W).
    g : Array
        The Euclidean gradient ∂f/∂W, same shape.
    metric : {"euclidean", "canonical"}, default "euclidean"
        The metric the gradient is taken in (both give tangent vectors).

    Returns
    -------
    Array
        The tangent vector grad f(W), shape and dtype of ``w``.

    Notes
    -----
    Survey §6.2 (optimization over the Stiefel manifold, Riemannian gradient then retraction). For
    p = n the two metrics differ by a factor: G − W·GᵀW = 2·(G − W·sym(WᵀG)).

    References
    ----------
    P.-A. Absil, R. Mahony & R. Sepulchre, Optimization Algorithms on Matrix Manifolds, 2008 (Eqn 3.35);
    A. Edelman, T. Arias & S. Smith, The geometry of algorithms with orthogonality constraints, SIMAX 1998.
    """
    fn = "stiefel_project"
    xp = _check_point(fn, w, g=g)
    metric = check_choice(fn, "metric", metric, ("euclidean", "canonical"))
    wt = _mf.mT(xp, w)
    if metric == "euclidean":
        return g - xp.matmul(w, _mf.sym(xp, xp.matmul(wt, g)))
    return g - xp.matmul(w, xp.matmul(_mf.mT(xp, g), w))


# --------------------------------------------------------------------------------------------------
# retractions


def _skew_generator(xp, w, xi):
    """A = Ŵ − Ŵᵀ with Ŵ = ξWᵀ − ½W(WᵀξWᵀ) (n × n, skew): A·W = ξ for every tangent ξ
    (AW = ξ − ½W(Wᵀξ + ξᵀW)), so the Cayley curve has velocity ξ at 0 (Li et al., Eqn 6)."""
    wt = _mf.mT(xp, w)
    xwt = xp.matmul(xi, wt)
    w_hat = xwt - 0.5 * xp.matmul(w, xp.matmul(wt, xwt))
    return w_hat - _mf.mT(xp, w_hat)


def _cayley_exact(xp, w, a, tau):
    """(I − τA/2)⁻¹(I + τA/2)W: orthonormal to rounding for skew A (an orthogonal map applied to W)."""
    eye = _mf.eye_like(xp, a)
    half = (0.5 * tau) * a if not hasattr(tau, "shape") else (0.5 * tau)[..., None, None] * a
    return xp.linalg.solve(eye - half, xp.matmul(eye + half, w))


def _qr_signed(xp, a):
    q, r = xp.linalg.qr(a)
    d = xp.linalg.diagonal(r)
    # sign fix: diag(R) > 0 makes qf unique (and continuous at a full-rank a); a zero pivot keeps +1
    s = xp.where(d < 0, xp.asarray(-1.0, dtype=a.dtype), xp.asarray(1.0, dtype=a.dtype))
    return q * s[..., None, :]


def stiefel_retract(w: Array, xi: Array, method: str = "qr") -> Array:
    """A retraction R_W(ξ) of the Stiefel manifold (QR, Cayley or polar).

    R_W(ξ) is a point of St(n, p) with R_W(0) = W and d/dt R_W(tξ)|₀ = ξ:

    - ``"qr"``: R_W(ξ) = qf(W + ξ), the Q factor of the reduced QR, signs fixed so that diag(R) > 0.
    - ``"cayley"`` (Wen & Yin 2013): R_W(ξ) = (I − A/2)⁻¹(I + A/2)W with the skew n × n generator
      A = Ŵ − Ŵᵀ, Ŵ = ξWᵀ − ½W(WᵀξWᵀ) (Li et al. 2020, Eqn 6). The plain form A = ξWᵀ − Wξᵀ has
      AW = ξ + WWᵀξ ≠ ξ for a tangent ξ (WᵀW = I, Wᵀξ skew): it moves along a different tangent
      vector, so the corrected Ŵ is used (AW = ξ exactly for tangent ξ).
    - ``"polar"``: R_W(ξ) = (W + ξ)(I + ξᵀξ)^-1/2, the orthonormal polar factor of W + ξ; computed as
      (W + ξ)·((W + ξ)ᵀ(W + ξ))^-1/2 (one ``eigh``), which is the same for tangent ξ and the polar
      factor for any ξ.

    Parameters
    ----------
    w : Array
        A point of St(n, p), shape ``(..., n, p)``, p ≤ n.
    xi : Array
        A tangent vector at W (e.g. −lr·:func:`stiefel_project`), same shape.
    method : {"qr", "cayley", "polar"}, default "qr"
        The retraction (formulas above).

    Returns
    -------
    Array
        The retracted point, orthonormal columns to rounding (each is an orthogonal factor computed
        by a backward-stable factorization or solve).

    Notes
    -----
    Survey §6.2. QR and polar are second order only when ξ is tangent; all three are first order.
    The Cayley form costs an n × n solve (the Woodbury form of Wen & Yin with 2p × 2p is not used).

    References
    ----------
    Z. Wen & W. Yin, A feasible method for optimization with orthogonality constraints, Math. Program.
    2013; P.-A. Absil, R. Mahony & R. Sepulchre, Optimization Algorithms on Matrix Manifolds, 2008
    (Example 4.1.3); J. Li, L. Fuxin & S. Todorovic, ICLR 2020.
    """
    fn = "stiefel_retract"
    xp = _check_point(fn, w, xi=xi)
    method = check_choice(fn, "method", method, ("qr", "cayley", "polar"))
    if method == "qr":
        return _qr_signed(xp, w + xi)
    if method == "cayley":
        return _cayley_exact(xp, w, _skew_generator(xp, w, xi), 1.0)
    y = w + xi
    s, _ = _mf.inv_sqrt_eigh_forward(xp, xp.matmul(_mf.mT(xp, y), y))
    return xp.matmul(y, s)


# --------------------------------------------------------------------------------------------------
# Cayley SGD and Cayley ADAM (Li et al. 2020, Algorithms 1 and 2)


def _fro(xp, a):
    """‖A‖_F per matrix, shape (...)."""
    return xp.sqrt(xp.sum(a * a, axis=(-2, -1)))


def _norm_one(xp, a):
    """‖A‖₁ = max column sum of |A| per matrix, shape (...) (the authors' code's ``matrix_norm_one``)."""
    return xp.max(xp.sum(xp.abs(a), axis=-2), axis=-1)


def _cayley_curve(xp, w, a, direction, alpha, iterations):
    """The Cayley curve Y(α) = (I − αA/2)⁻¹(I + αA/2)W, by the paper's fixed-point iteration
    Y ← W + (α/2)·A(W + Y) from Y⁰ = W + α·direction (``iterations`` times; a contraction when
    α‖A‖₂/2 < 1, error O((α‖A‖/2)^(s+1)) from the exact curve), or exactly by one solve (None)."""
    al = alpha[..., None, None]
    if iterations is None:
        return _cayley_exact(xp, w, a, alpha)
    y = w + al * direction
    aw = xp.matmul(a, w)
    for _ in range(iterations):
        y = w + (0.5 * al) * (aw + xp.matmul(a, y))
    return y


def _step_size(xp, a, lr, q, eps, norm):
    """α = min(lr, 2q/(‖A‖ + ε)): the iteration's contraction factor α‖A‖/2 ≤ q (Li et al., Alg. 1)."""
    nrm = _fro(xp, a) if norm == "fro" else _norm_one(xp, a)
    return xp.minimum(xp.asarray(lr, dtype=a.dtype), (2.0 * q) / (nrm + eps))


def cayley_sgd_step(w: Array, grad: Array, lr: float, state: CayleySGDState | None = None,
                    momentum: float = 0.9, *, iterations: int | None = None, q: float = 0.5,
                    eps: float = 1e-8, norm: str = "fro") -> tuple[Array, CayleySGDState]:
    """One step of Cayley SGD with momentum (Li et al. 2020, Algorithm 1), minimizing f over St(n, p).

    With G = ∂f/∂W (Euclidean) and β = ``momentum``:

        M ← βM − G
        Ŵ = MWᵀ − ½W(WᵀMWᵀ),  A = Ŵ − Ŵᵀ           (skew n × n)
        M ← AW                                      (= M − W·sym(WᵀM): the momentum made tangent)
        α = min(lr, 2q/(‖A‖ + ε))
        Y⁰ = W + αM;  Yⁱ = W + (α/2)·A(W + Yⁱ⁻¹), i = 1..s;  W ← Yˢ

    Yˢ approximates the Cayley transform (I − αA/2)⁻¹(I + αA/2)W, the fixed point of the iteration
    (a contraction since α‖A‖₂/2 ≤ q < 1).

    Parameters
    ----------
    w : Array
        The current point, ``(..., n, p)``, p ≤ n, WᵀW = I.
    grad : Array
        The Euclidean gradient ∂f/∂W at ``w``, same shape.
    lr : float
        The learning rate l > 0 (an upper bound on α).
    state : CayleySGDState or None, default None
        The momentum from the previous step; ``None`` starts at M = 0.
    momentum : float, default 0.9
        β in [0, 1).
    iterations : int or None, default None
        s, the number of fixed-point iterations of the paper's Cayley estimate (the paper: 2; the
        authors' code: 5). ``None`` (normref's default): the exact Cayley transform by one n × n solve,
        which stays on the manifold to rounding; with s iterations each step leaves it by
        O((α‖A‖/2)^(s+1)) — measured ‖WᵀW − I‖ = 3.7e-2 after 100 SGD steps with s = 2 — (the authors re-orthonormalize by QR
        about once in 100 steps; :func:`stiefel_retract` with ``"qr"`` does that).
    q : float, default 0.5
        The contraction factor in (0, 1) bounding α (the paper: 0.5).
    eps : float, default 1e-8
        ε in the step-size bound (the paper: 1e-8).
    norm : {"fro", "one"}, default "fro"
        ‖A‖ in the step-size bound: the Frobenius norm (the paper's ‖·‖) or the matrix 1-norm (the
        authors' code, ``matrix_norm_one``). Both bound the spectral norm, so both keep α‖A‖₂/2 ≤ q.

    Returns
    -------
    (Array, CayleySGDState)
        The new point and the new (tangent) momentum.

    Notes
    -----
    Survey §6.2. The authors' code starts the iteration from the unprojected momentum
    (Y⁰ = W + α·(βM − G)); the fixed point is the same, the s-step approximation differs at
    O(α^(s+1)); the paper's Y⁰ = W + α·AW is used here.

    References
    ----------
    J. Li, L. Fuxin & S. Todorovic, Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform, ICLR 2020 (Algorithm 1); Z. Wen & W. Yin, Math. Program. 2013.
    """
    fn = "cayley_sgd_step"
    xp = _check_point(fn, w, grad=grad)
    lr = _check_lr(fn, lr)
    beta = _check_unit_open(fn, "momentum", momentum)
    iterations = _check_iterations(fn, iterations)
    q = _check_q(fn, q)
    eps = check_positive(fn, "eps", eps)
    norm = check_choice(fn, "norm", norm, ("fro", "one"))
    if state is not None and not isinstance(state, CayleySGDState):
        raise TypeError(f"{fn}: state must be a CayleySGDState or None; got {type(state).__name__}")
    m = -grad if state is None else beta * _check_state_array(fn, xp, "state.momentum", state.momentum, w) - grad
    a = _skew_generator(xp, w, m)
    m = xp.matmul(a, w)
    alpha = _step_size(xp, a, lr, q, eps, norm)
    w_new = _cayley_curve(xp, w, a, m, alpha, iterations)
    return w_new, CayleySGDState(m)


def _check_state_array(fn, xp, name, a, w, shape=None):
    shape = tuple(w.shape) if shape is None else shape
    if a is None or not hasattr(a, "shape"):
        raise TypeError(f"{fn}: {name} must be an array; got {type(a).__name__}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}; got shape {tuple(a.shape)}")
    namespace(fn, w=w, **{name.replace(".", "_"): a})
    return a


def cayley_adam_step(w: Array, grad: Array, lr: float, state: CayleyAdamState | None = None,
                     betas: tuple[float, float] = (0.9, 0.99), *, iterations: int | None = None,
                     q: float = 0.5, eps: float = 1e-8, norm: str = "fro") -> tuple[Array, CayleyAdamState]:
    """One step of Cayley ADAM (Li et al. 2020, Algorithm 2), minimizing f over St(n, p).

    With G = ∂f/∂W, (β₁, β₂) = ``betas`` and k the step number (1, 2, ...):

        M ← β₁M + (1 − β₁)G;   v ← β₂v + (1 − β₂)‖G‖²_F;   v̂ = v/(1 − β₂^k)
        r = (1 − β₁^k)·√(v̂ + ε)
        Ŵ = MWᵀ − ½W(WᵀMWᵀ),  A = (Ŵ − Ŵᵀ)/r
        M ← r·AW                                    (the first moment made tangent)
        α = min(lr, 2q/(‖A‖ + ε))
        Y⁰ = W − α·AW;  Yⁱ = W − (α/2)·A(W + Yⁱ⁻¹);  W ← Yˢ

    (the second moment is one scalar per matrix, as in the paper: the Stiefel constraint couples the
    entries, so no per-entry scaling is applied).

    Parameters
    ----------
    w, grad : Array
        The point ``(..., n, p)`` and the Euclidean gradient at it.
    lr : float
        The learning rate l > 0 (an upper bound on α).
    state : CayleyAdamState or None, default None
        ``None`` starts at M = 0, v = 0, k = 0 (the authors' code's initial values).
    betas : (float, float), default (0.9, 0.99)
        (β₁, β₂), each in [0, 1) (the paper: 0.9, 0.99).
    iterations, q, eps, norm : int or None, float, float, str, default None, 0.5, 1e-8, "fro"
        As in :func:`cayley_sgd_step`.

    Returns
    -------
    (Array, CayleyAdamState)
        The new point and the new state (tangent first moment, second moment, step count).

    Notes
    -----
    Survey §6.2. The iteration starts from the tangent direction −AW (= −M/r) of the Cayley curve;
    the authors' code starts from the unprojected −M (same fixed point).

    References
    ----------
    J. Li, L. Fuxin & S. Todorovic, Efficient Riemannian optimization on the Stiefel manifold via the
    Cayley transform, ICLR 2020 (Algorithm 2); D. Kingma & J. Ba, Adam, ICLR 2015.
    """
    fn = "cayley_adam_step"
    xp = _check_point(fn, w, grad=grad)
    lr = _check_lr(fn, lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{fn}: betas must be a pair (beta1, beta2); got {betas!r}")
    b1 = _check_unit_open(fn, "betas[0]", betas[0])
    b2 = _check_unit_open(fn, "betas[1]", betas[1])
    iterations = _check_iterations(fn, iterations)
    q = _check_q(fn, q)
    eps = check_positive(fn, "eps", eps)
    norm = check_choice(fn, "norm", norm, ("fro", "one"))
    g2 = xp.sum(grad * grad, axis=(-2, -1))
    if state is None:
        m, v, k = (1.0 - b1) * grad, (1.0 - b2) * g2, 1
    elif not isinstance(state, CayleyAdamState):
        raise TypeError(f"{fn}: state must be a CayleyAdamState or None; got {type(state).__name__}")
    else:
        k = check_int(fn, "state.step", state.step, minimum=0) + 1
        m0 = _check_state_array(fn, xp, "state.m", state.m, w)
        v0 = _check_state_array(fn, xp, "state.v", state.v, w, shape=tuple(w.shape[:-2]))
        m = b1 * m0 + (1.0 - b1) * grad
        v = b2 * v0 + (1.0 - b2) * g2
    v_hat = v / (1.0 - b2 ** k)
    r = (1.0 - b1 ** k) * xp.sqrt(v_hat + eps)
    a = _skew_generator(xp, w, m) / r[..., None, None]
    aw = xp.matmul(a, w)
    alpha = _step_size(xp, a, lr, q, eps, norm)
    # descent: the curve Y(−α) of the Cayley transform, i.e. the same iteration with −α
    w_new = _cayley_curve(xp, w, a, aw, -alpha, iterations)
    return w_new, CayleyAdamState(r[..., None, None] * aw, v, k)
