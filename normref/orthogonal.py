"""Orthogonal re-parameterizations (survey §6.1): Cayley, matrix exponential and Householder
products, as torch's ``torch.nn.utils.parametrizations.orthogonal`` computes them.

Each maps an unconstrained proxy X (or a batch ``(..., n, k)``) to a Q with orthonormal columns (tall,
n ≥ k) or rows (wide), with the same conventions as torch's ``_Orthogonal.forward``
(``orthogonal_map=`` "cayley",
"matrix_exp", "householder"; torch's ``use_trivialization=True`` then multiplies by a constant
orthogonal ``base`` on the left, which is no part of the map):

- Cayley and matrix exponential read the lower triangle: A = tril(X) − tril(X)ᵀ (skew-symmetric, the
  diagonal cancels), Q = (I − A/2)⁻¹(I + A/2) or Q = exp(A); det Q = +1.
- Householder reads the strictly-lower triangle as the reflectors' tails: v_j = e_j + tril(X, −1)[:, j],
  H_j = I − τ_j·v_j·v_jᵀ with τ_j = 2/‖v_j‖² = 2/(1 + ‖tril(X, −1)[:, j]‖²), Q = H_1⋯H_n·D, D the
  diagonal of signs taken from diag(X) (torch: ``Q * X.diagonal().int()``).
- Rectangular X, as torch: a wide X (n < k) is mapped as its transpose and the result transposed
  back; a tall X (n > k) gives the first k columns of an n × n orthogonal matrix — for Cayley and
  exp, of the map of tril(X) padded with n − k zero columns; for Householder, of H_1⋯H_k (k
  reflectors). A square X lands in SO(n) (Cayley: every rotation without the eigenvalue −1; exp: all
  of SO(n)) or O(n) (Householder); a tall one gives orthonormal k-frames (the Stiefel manifold).

The backwards are analytic: the Cayley map's by one linear solve, the exponential's by the adjoint of
its Fréchet derivative (itself the exponential of a 2n×2n block-triangular matrix), the Householder
product's by a sweep over the reflectors. Only the array API is used (matmul, solve).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as _np

from . import matfun as _mf
from ._validate import check_choice
from ._xp import compute_dtype, device_of, is_lazy, namespace, to_compute, to_numpy
from .registry import Example, Invariant, Residuals, method

__all__ = ["cayley", "matrix_exp_orthogonal", "householder_orthogonal", "expm"]

_TORCH_DOC = ("torch.nn.utils.parametrizations.orthogonal; M. Lezcano-Casado & D. Martínez-Rubio, Cheap "
              "Orthogonal Constraints in Neural Networks, ICML 2019")


# --------------------------------------------------------------------------------------------------
# shared helpers


def _check_square(fn: str, a) -> Any:
    if a is None:
        raise TypeError(f"{fn}: a must be an array; got None")
    xp = namespace(fn, a=a)
    if a.ndim < 2:
        raise ValueError(f"{fn}: a must have at least 2 dimensions (..., n, n); got {a.ndim} dimensions, "
                         f"shape {tuple(a.shape)}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{fn}: a must be square in its last two dimensions (..., n, n); got shape {tuple(a.shape)}")
    if any(s == 0 for s in a.shape):
        raise ValueError(f"{fn}: a must not be empty; got shape {tuple(a.shape)}")
    return xp


def _check_matrix(fn: str, a) -> Any:
    """A matrix or batch ``(..., n, k)``, square or not (the orthogonal maps: torch's rectangular case)."""
    if a is None:
        raise TypeError(f"{fn}: a must be an array; got None")
    xp = namespace(fn, a=a)
    if a.ndim < 2:
        raise ValueError(f"{fn}: a must have at least 2 dimensions (..., n, k); got {a.ndim} dimensions, "
                         f"shape {tuple(a.shape)}")
    if any(s == 0 for s in a.shape):
        raise ValueError(f"{fn}: a must not be empty; got shape {tuple(a.shape)}")
    return xp


def _mask(xp, n: int, k: int, like, cols: int | None = None):
    """tril(ones(n, cols), k) (cols = n: square) in ``like``'s dtype and device (the array API has
    no tril)."""
    m = _np.tril(_np.ones((n, n if cols is None else cols)), k)
    return _const(xp, m, like)


def _const(xp, m, like):
    """A NumPy constant as an array of ``like``'s library, dtype and device."""
    try:
        dev = device_of(like)
    except Exception:  # a traced value without a device
        dev = None
    return xp.asarray(m, dtype=like.dtype) if dev is None else xp.asarray(m, dtype=like.dtype, device=dev)


def _tall(xp, x):
    """torch's rectangular convention: a wide (n < k) X is handled as its transpose, so that the map
    always sees a tall (..., n, k), n ≥ k; returns (X or Xᵀ, transposed)."""
    if x.shape[-2] < x.shape[-1]:
        return _mf.mT(xp, x), True
    return x, False


def _pad_columns(xp, x, n: int):
    """(..., n, k) → (..., n, n): zero columns appended (the adjoint of keeping the first k columns)."""
    k = x.shape[-1]
    if k == n:
        return x
    zeros = _const(xp, _np.zeros((n, n - k)), x)
    zeros = xp.broadcast_to(zeros, tuple(x.shape[:-1]) + (n - k,))
    return xp.concat([x, zeros], axis=-1)


def _untall(xp, q, transposed: bool):
    return _mf.mT(xp, q) if transposed else q


def _out(xp, y, dtype):
    return y if y.dtype == dtype else xp.astype(y, dtype)


def _skew(xp, a):
    """A = tril(X) − tril(X)ᵀ (torch's convention)."""
    low = a * _mask(xp, a.shape[-1], 0, a)
    return low - _mf.mT(xp, low)


def _skew_backward(xp, ga):
    """The adjoint of X ↦ tril(X) − tril(X)ᵀ: dX = tril(dA − dAᵀ) (zero on the diagonal)."""
    return (ga - _mf.mT(xp, ga)) * _mask(xp, ga.shape[-1], -1, ga)


def _norm1(xp, a):
    """‖A‖₁ (the largest column sum of |A|), one per matrix of the batch."""
    return xp.max(xp.sum(xp.abs(a), axis=-2), axis=-1)


# --------------------------------------------------------------------------------------------------
# the matrix exponential (scaling and squaring, Padé 13; Higham, SIAM J. Matrix Anal. Appl. 2005)

_PADE13 = (64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0,
           129060195264000.0, 10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0,
           40840800.0, 960960.0, 16380.0, 182.0, 1.0)
_THETA13 = 5.371920351148152  # ‖A‖₁ ≤ θ13: the [13/13] Padé approximant is exact to float64 rounding
# traced inputs (no concrete norm): squarings masked up to this count, ‖A‖₁ ≤ θ13·2^32 ≈ 2.3e10 (a
# skew-symmetric A that large has lost every digit of exp(A) in float64 anyway); beyond it: NaN
_MAX_SQUARINGS = 32


def _pade13(xp, a):
    b = _PADE13
    eye = _mf.eye_like(xp, a)
    a2 = xp.matmul(a, a)
    a4 = xp.matmul(a2, a2)
    a6 = xp.matmul(a4, a2)
    u = xp.matmul(a, xp.matmul(a6, b[13] * a6 + b[11] * a4 + b[9] * a2) + b[7] * a6 + b[5] * a4 + b[3] * a2
                  + b[1] * eye)
    v = xp.matmul(a6, b[12] * a6 + b[10] * a4 + b[8] * a2) + b[6] * a6 + b[4] * a4 + b[2] * a2 + b[0] * eye
    return _solve(xp, v - u, v + u)


def _solve(xp, a, b):
    """A⁻¹·B, batched (dask: NumPy's batched solve per block, as :mod:`normref.matfun`)."""
    if is_lazy(a) or is_lazy(b):
        return _mf._dask_linalg("solve", a, b)
    return xp.linalg.solve(a, b)


def _squarings(xp, a):
    """s with ‖A‖₁/2^s ≤ θ13: a Python int for concrete values (the batch's largest), else an array
    per matrix (traced JAX values, lazy dask arrays)."""
    nrm = _norm1(xp, a)
    if not is_lazy(a):
        try:
            top = float(_np.max(to_numpy(nrm)))
        except Exception:  # a jax tracer (or another traced value) has no concrete value
            top = None
        if top is not None:
            if not math.isfinite(top):
                return 0  # the NaN/inf propagate (checked by the callers for concrete values)
            return max(0, math.ceil(math.log2(top / _THETA13))) if top > _THETA13 else 0
    s = xp.ceil(xp.log2(xp.maximum(nrm, 1e-300 if nrm.dtype == xp.float64 else 1e-30) / _THETA13))
    return xp.clip(s, 0, _MAX_SQUARINGS + 1)


def expm(a: Any) -> Any:
    """The matrix exponential exp(A) = Σ_k A^k/k! of a square matrix or batch ``(..., n, n)``.

    Scaling and squaring with the [13/13] Padé approximant: exp(A) = r₁₃(A/2^s)^(2^s), s the least
    integer with ‖A‖₁/2^s ≤ θ₁₃ = 5.37 (Higham 2005, without the lower-degree shortcuts): backward
    error at most the unit roundoff of float64. Written with the array API's ``matmul`` and
    ``linalg.solve`` only. Under ``jax.jit`` and for dask arrays (no concrete norm) each matrix's s is
    an array and the squarings are masked, up to 32 of them (‖A‖₁ ≤ 2.3e10; a larger traced A gives
    NaN).

    Parameters
    ----------
    a : array, shape ``(..., n, n)``
        A, real floating point.

    Returns
    -------
    e : array
        exp(A), a's shape and dtype.

    Notes
    -----
    Used by :func:`matrix_exp_orthogonal` for its forward and for the Fréchet derivative of its
    backward (survey §6.1).

    References
    ----------
    .. [1] N. J. Higham, "The Scaling and Squaring Method for the Matrix Exponential Revisited",
       SIAM J. Matrix Anal. Appl. 26(4), 2005.
    """
    fn = "expm"
    xp = _check_square(fn, a)
    cd = compute_dtype(xp, a.dtype)
    return _out(xp, _expm(xp, to_compute(xp, a, cd)), a.dtype)


def _expm(xp, a):
    s = _squarings(xp, a)
    if isinstance(s, int):
        e = _pade13(xp, a / (2.0 ** s) if s else a)
        for _ in range(s):
            e = xp.matmul(e, e)
        return e
    scale = xp.pow(xp.asarray(2.0, dtype=a.dtype, device=device_of(a)), s)[..., None, None]
    e = _pade13(xp, a / scale)
    for k in range(_MAX_SQUARINGS):
        e = xp.where((s > k)[..., None, None], xp.matmul(e, e), e)
    # more squarings needed than were unrolled: NaN, never a silently wrong exp(A)
    return xp.where((s > _MAX_SQUARINGS)[..., None, None], xp.full_like(e, float("nan")), e)


def _expm_frechet_adjoint(xp, a, g):
    """L_exp(Aᵀ, G), the adjoint of E ↦ L_exp(A, E) applied to G: the upper-right block of
    exp([[Aᵀ, G], [0, Aᵀ]]) (Mathias 1996). G is first scaled to ‖A‖'s size (L is linear in G), so
    that the block's norm, hence the number of squarings, is that of A."""
    at = _mf.mT(xp, a)
    n = a.shape[-1]
    gn = _norm1(xp, g)
    c = xp.where(gn > 0, gn / xp.maximum(_norm1(xp, a), xp.ones_like(gn)), xp.ones_like(gn))[..., None, None]
    z = xp.zeros_like(at)
    block = xp.concat([xp.concat([at, g / c], axis=-1), xp.concat([z, at], axis=-1)], axis=-2)
    e = _expm(xp, block)
    return e[..., :n, n:] * c


# --------------------------------------------------------------------------------------------------
# examples and invariants


def _ex_square(rng):
    yield Example((rng.standard_normal((4, 4)),), {}, label="(4, 4)")
    yield Example((rng.standard_normal((5, 3)),), {}, label="tall (5, 3)")
    yield Example((rng.standard_normal((2, 3, 6)),), {}, label="wide batch (2, 3, 6)")
    yield Example((0.5 * rng.standard_normal((2, 3, 5, 5)),), {}, label="batch (2, 3, 5, 5)")
    yield Example((rng.standard_normal((1, 1)),), {}, label="(1, 1)")
    yield Example((3.0 * rng.standard_normal((6, 6)),), {}, label="(6, 6) large entries", cond=10.0)


def _ex_householder(rng):
    for shape in [(4, 4), (2, 5, 5), (1, 1), (6, 6), (5, 3), (2, 3, 6)]:
        a = 0.7 * rng.standard_normal(shape)
        n = min(shape[-2:])
        # the diagonal is the sign matrix D: ±1 as torch keeps it (right_inverse gives −1)
        d = _np.where(rng.standard_normal(shape[:-2] + (n,)) < 0, -1.0, 1.0)
        idx = _np.arange(n)
        a[..., idx, idx] = d
        yield Example((a,), {}, label=f"{shape}")


def _orthogonality(m, xp, out, args, kwargs):
    """‖QᵀQ − I‖_max (orthonormal columns; for a wide Q, its rows: ‖QQᵀ − I‖_max)."""
    q = _np.asarray(to_numpy(m.primary(out)), _np.float64)
    if q.shape[-2] < q.shape[-1]:
        q = _np.swapaxes(q, -1, -2)
    n = q.shape[-1]
    return float(_np.max(_np.abs(_np.swapaxes(q, -1, -2) @ q - _np.eye(n))))


def _det_one(m, xp, out, args, kwargs):
    """det Q = +1 (exp and Cayley of a skew-symmetric matrix lie in SO(n)); square Q only."""
    q = _np.asarray(to_numpy(m.primary(out)), _np.float64)
    if q.shape[-1] != q.shape[-2]:
        return None
    return float(_np.max(_np.abs(_np.linalg.det(q) - 1.0)))


# --------------------------------------------------------------------------------------------------
# Cayley


@method(
    array_params=("a",),
    category="weight",
    survey="§6.1 (orthogonal weights; RNN literature)",
    paper=_TORCH_DOC + "; Helfrich, Willmott & Ye, Orthogonal Recurrent Neural Networks with Scaled Cayley "
          "Transform, ICML 2018",
    examples=_ex_square,
    invariants=(Invariant("QᵀQ = I", _orthogonality, scale=64.0), Invariant("det Q = 1", _det_one, scale=64.0)),
)
def cayley(a: Any) -> Any:
    """The Cayley map: Q = (I − A/2)⁻¹(I + A/2), A = tril(X) − tril(X)ᵀ (torch's ``"cayley"``).

    A is skew-symmetric, so I − A/2 is always invertible (its eigenvalues are 1 − iλ/2) and Q is
    orthogonal with det Q = +1 (−1 is never an eigenvalue); for a rectangular X, Q is the first k
    columns of that square Q (orthonormal columns, or rows for a wide X). The same as torch's
    ``parametrizations.orthogonal(..., orthogonal_map="cayley")`` for a weight of any shape (the map
    itself; torch's ``use_trivialization=True`` multiplies it by a constant ``base`` on the left).

    Backward: with M = I − A/2 and N = I + A/2, dQ = M⁻¹(dA/2 + dA/2·Q) = ½·M⁻¹·dA·(I + Q), so
    dL/dA = ½·M⁻ᵀ·G·(I + Q)ᵀ = ½·N⁻¹·G·(I + Qᵀ) (Mᵀ = N), then dL/dX = tril(dA − dAᵀ, −1).

    Parameters
    ----------
    a : array, shape ``(..., n, k)``
        X, the unconstrained proxy (only its strictly-lower triangle matters; of its transpose when
        n < k). Rectangular X as torch (module docstring): Q has orthonormal columns (n ≥ k) or rows.

    Returns
    -------
    q : array
        Q, a's shape and dtype.

    Notes
    -----
    Survey §6.1 (orthogonal weights in RNNs). The Cayley transform with the halved A is torch's
    ("the Cayley retraction"); the literature's (I + S)⁻¹(I − S) is this map at A = −2S.

    References
    ----------
    .. [1] M. Lezcano-Casado and D. Martínez-Rubio, "Cheap Orthogonal Constraints in Neural Networks",
       ICML 2019; torch.nn.utils.parametrizations.orthogonal.
    .. [2] K. Helfrich, D. Willmott and Q. Ye, "Orthogonal Recurrent Neural Networks with Scaled Cayley
       Transform", ICML 2018.
    """
    fn = "cayley"
    xp = _check_matrix(fn, a)
    cd = compute_dtype(xp, a.dtype)
    x, transposed = _tall(xp, to_compute(xp, a, cd))
    n, k = x.shape[-2], x.shape[-1]
    s = _skew(xp, _pad_columns(xp, x, n))  # a tall X embedded in n × n by zero columns (torch)
    eye = _mf.eye_like(xp, s)
    n_ = eye + 0.5 * s
    q = _solve(xp, eye - 0.5 * s, n_)
    return _out(xp, _untall(xp, q[..., :k], transposed), a.dtype), Residuals((n_, q), (a.dtype, transposed, k))


@cayley.defbackward
def _cayley_backward(res, g):
    n_, q = res.arrays
    dtype, transposed, k = res.static
    xp = namespace("cayley.backward", cotangent=g)
    # the first k columns of the square Q: their cotangent, padded with zero columns
    g = _pad_columns(xp, _untall(xp, to_compute(xp, g, q.dtype), transposed), q.shape[-1])
    ga = 0.5 * xp.matmul(_solve(xp, n_, g), _mf.eye_like(xp, q) + _mf.mT(xp, q))
    return (_out(xp, _untall(xp, _skew_backward(xp, ga)[..., :k], transposed), dtype),)


# --------------------------------------------------------------------------------------------------
# matrix exponential


@method(
    array_params=("a",),
    category="weight",
    survey="§6.1 (orthogonal weights; RNN literature)",
    paper=_TORCH_DOC,
    examples=_ex_square,
    invariants=(Invariant("QᵀQ = I", _orthogonality, scale=64.0), Invariant("det Q = 1", _det_one, scale=64.0)),
)
def matrix_exp_orthogonal(a: Any) -> Any:
    """The exponential map: Q = exp(A), A = tril(X) − tril(X)ᵀ (torch's ``"matrix_exp"``).

    A is skew-symmetric, so Q is orthogonal with det Q = +1; every rotation is reached (exp is onto
    SO(n)). The same as torch's ``parametrizations.orthogonal(..., orthogonal_map="matrix_exp")`` for
    a weight of any shape (the map itself, without torch's trivialization ``base``). exp is
    :func:`expm` (scaling and squaring, Padé 13).

    Backward through the Fréchet derivative: dQ = L(A, dA), whose adjoint is dL/dA = L(Aᵀ, G), read
    from exp([[Aᵀ, G], [0, Aᵀ]]) = [[exp(Aᵀ), L(Aᵀ, G)], [0, exp(Aᵀ)]]; then dL/dX = tril(dA − dAᵀ, −1).

    Parameters
    ----------
    a : array, shape ``(..., n, k)``
        X, the unconstrained proxy (only its strictly-lower triangle matters; of its transpose when
        n < k). Rectangular X as torch (module docstring): Q has orthonormal columns (n ≥ k) or rows.

    Returns
    -------
    q : array
        Q, a's shape and dtype.

    Notes
    -----
    Survey §6.1 (orthogonal weights in RNNs; expRNN).

    References
    ----------
    .. [1] M. Lezcano-Casado and D. Martínez-Rubio, "Cheap Orthogonal Constraints in Neural Networks",
       ICML 2019; torch.nn.utils.parametrizations.orthogonal.
    .. [2] R. Mathias, "A Chain Rule for Matrix Functions and Applications", SIAM J. Matrix Anal. Appl.
       17(3), 1996 (the block-triangular Fréchet derivative).
    """
    fn = "matrix_exp_orthogonal"
    xp = _check_matrix(fn, a)
    cd = compute_dtype(xp, a.dtype)
    x, transposed = _tall(xp, to_compute(xp, a, cd))
    n, k = x.shape[-2], x.shape[-1]
    s = _skew(xp, _pad_columns(xp, x, n))  # a tall X embedded in n × n by zero columns (torch)
    q = _expm(xp, s)
    return _out(xp, _untall(xp, q[..., :k], transposed), a.dtype), Residuals((s,), (a.dtype, transposed, k))


@matrix_exp_orthogonal.defbackward
def _matrix_exp_backward(res, g):
    (s,) = res.arrays
    dtype, transposed, k = res.static
    xp = namespace("matrix_exp_orthogonal.backward", cotangent=g)
    g = _pad_columns(xp, _untall(xp, to_compute(xp, g, s.dtype), transposed), s.shape[-1])
    ga = _expm_frechet_adjoint(xp, s, g)
    return (_out(xp, _untall(xp, _skew_backward(xp, ga)[..., :k], transposed), dtype),)


# --------------------------------------------------------------------------------------------------
# Householder products


def _reflectors(xp, x):
    """For a tall X (..., n, k): V = tril(X, −1) + I_{n×k} (column j is v_j, unit j-th entry) and
    τ_j = 2/‖v_j‖², shape (..., k)."""
    n, k = x.shape[-2], x.shape[-1]
    v = x * _mask(xp, n, -1, x, cols=k) + _const(xp, _np.eye(n, k), x)
    tau = 2.0 / xp.sum(v * v, axis=-2)
    return v, tau


def _apply_right(xp, m, vj, tj):
    """M·H_j = M − τ_j·(M·v_j)·v_jᵀ."""
    mv = xp.sum(m * vj[..., None, :], axis=-1)
    return m - tj[..., None, None] * (mv[..., :, None] * vj[..., None, :])


def _apply_left(xp, m, vj, tj):
    """H_j·M = M − τ_j·v_j·(v_jᵀ·M)."""
    vm = xp.sum(vj[..., :, None] * m, axis=-2)
    return m - tj[..., None, None] * (vj[..., :, None] * vm[..., None, :])


def _householder_product(xp, v, tau):
    """H_1⋯H_k, the full (..., n, n) product of the k reflectors (columns of V)."""
    p = _const(xp, _np.eye(v.shape[-2]), v)
    for j in range(v.shape[-1]):
        p = _apply_right(xp, p, v[..., :, j], tau[..., j])
    return p


@method(
    array_params=("a",),
    category="weight",
    survey="§6.1 (orthogonal weights; RNN literature)",
    paper=_TORCH_DOC + "; Mhammedi, Hellicar, Rahman & Bailey, Efficient Orthogonal Parametrisation of Recurrent "
          "Neural Networks Using Householder Reflections, ICML 2017",
    examples=_ex_householder,
    invariants=(Invariant("QᵀQ = I", _orthogonality, scale=64.0),),
)
def householder_orthogonal(a: Any, diagonal: str = "sign") -> Any:
    """A product of Householder reflections: Q = H_1⋯H_n·D (torch's ``"householder"``).

    v_j = e_j + tril(X, −1)[:, j] (the strictly-lower triangle holds the reflectors' tails),
    H_j = I − τ_j·v_j·v_jᵀ with τ_j = 2/‖v_j‖² = 2/(1 + ‖tril(X, −1)[:, j]‖²) (each H_j an exact
    reflection), D = diag(d) a sign matrix from X's diagonal, as torch's
    ``linalg.householder_product(tril(X, −1), τ) * X.diagonal().int()``. det Q = (−1)^n·∏d_j for a
    square X.

    For a tall X (n > k) there are k reflectors and Q is the first k columns of H_1⋯H_k·D (the sums
    below then run to k, and G_P is G·D padded with n − k zero columns); a wide X is transposed.

    Backward: G_P = G·D; with Y_j = (H_1⋯H_{j−1})ᵀ·G_P·(H_{j+1}⋯H_n)ᵀ (swept from j = n down, Y_{j−1} =
    H_{j−1}·Y_j·H_j), the reflector's gradient is g_{v_j} = τ_j²·(v_jᵀY_jv_j)·v_j − τ_j·(Y_j + Y_jᵀ)·v_j
    (dτ = −τ²·vᵀdv), and dL/dX is its strictly-lower part; the diagonal is piecewise constant (zero
    gradient, as torch's integer cast).

    Parameters
    ----------
    a : array, shape ``(..., n, k)``
        X: strictly-lower triangle the reflectors, diagonal the signs (of Xᵀ when n < k: k reflectors
        for a tall X, Q the first k columns of H_1⋯H_k; module docstring).
    diagonal : {"sign", "trunc"}, default "sign"
        How D is read from diag(X). ``"sign"``: d_j = +1 where X_jj ≥ 0, else −1 (Q orthogonal — or,
        for a rectangular X, with orthonormal columns or rows — for every X). ``"trunc"``: d_j = X_jj truncated toward zero, torch's ``.int()`` cast, exactly
        torch's result for every X (Q orthogonal only where the diagonal is ±1, which is what torch's
        parametrization keeps: its ``right_inverse`` sets −1 and no gradient reaches it). The two
        agree on a ±1 diagonal.

    Returns
    -------
    q : array
        Q, a's shape and dtype.

    Notes
    -----
    Survey §6.1 (orthogonal weights in RNNs). The default differs from torch only off its domain (a
    diagonal not ±1, which torch's integer cast turns into zero or scaled columns); ``"trunc"``
    reproduces torch there too.

    References
    ----------
    .. [1] Z. Mhammedi, A. Hellicar, A. Rahman and J. Bailey, "Efficient Orthogonal Parametrisation of
       Recurrent Neural Networks Using Householder Reflections", ICML 2017.
    .. [2] torch.nn.utils.parametrizations.orthogonal (orthogonal_map="householder").
    """
    fn = "householder_orthogonal"
    xp = _check_matrix(fn, a)
    check_choice(fn, "diagonal", diagonal, ("sign", "trunc"))
    cd = compute_dtype(xp, a.dtype)
    x, transposed = _tall(xp, to_compute(xp, a, cd))
    k = x.shape[-1]
    v, tau = _reflectors(xp, x)
    p = _householder_product(xp, v, tau)
    dg = _mf._diag(xp, x)
    d = xp.where(dg >= 0, xp.ones_like(dg), -xp.ones_like(dg)) if diagonal == "sign" else xp.trunc(dg)
    q = p[..., :k] * d[..., None, :]  # the first k columns (torch's householder_product of a tall A)
    return _out(xp, _untall(xp, q, transposed), a.dtype), Residuals((v, tau, p, d), (a.dtype, transposed))


@householder_orthogonal.defbackward
def _householder_backward(res, g):
    v, tau, p, d = res.arrays
    dtype, transposed = res.static
    xp = namespace("householder_orthogonal.backward", cotangent=g)
    g = _untall(xp, to_compute(xp, g, p.dtype), transposed) * d[..., None, :]
    g = _pad_columns(xp, g, p.shape[-1])  # Q = the first k columns of P·D: zero cotangent on the rest
    n = v.shape[-1]  # k reflectors
    # Y_n = (H_1⋯H_{n−1})ᵀ·G_P = (P·H_n)ᵀ·G_P
    y = xp.matmul(_mf.mT(xp, _apply_right(xp, p, v[..., :, n - 1], tau[..., n - 1])), g)
    cols = [None] * n
    for j in range(n - 1, -1, -1):
        vj, tj = v[..., :, j], tau[..., j]
        yv = xp.sum(y * vj[..., None, :], axis=-1)  # Y·v
        ytv = xp.sum(y * vj[..., :, None], axis=-2)  # Yᵀ·v
        vyv = xp.sum(vj * yv, axis=-1)
        cols[j] = (tj * tj * vyv)[..., None] * vj - tj[..., None] * (yv + ytv)
        if j > 0:
            vp, tp = v[..., :, j - 1], tau[..., j - 1]
            y = _apply_right(xp, _apply_left(xp, y, vp, tp), vj, tj)
    gx = xp.stack(cols, axis=-1) * _mask(xp, v.shape[-2], -1, g, cols=n)
    return (_out(xp, _untall(xp, gx, transposed), dtype),)
