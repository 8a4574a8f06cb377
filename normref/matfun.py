"""Functions of batched symmetric positive-definite matrices, each with an analytic backward.

The shared machinery of whitening (survey §5.1.2, Eqn 23) and orthogonalization of weights (OWN, ONI,
survey §6.1, Eqn 31). Every function takes a namespace ``xp`` and batched matrices of shape
(..., d, d) (typically (G, d, d): one matrix per group, all groups in ONE batched ``eigh`` /
``cholesky`` call), is written in array-API operations only (so the backward is itself
differentiable by a framework's autodiff), and never mutates its inputs.

API (``S`` symmetric positive definite; ``res`` is a plain tuple of arrays, opaque to the caller,
that fits in :class:`normref.registry.Residuals`; every ``*_backward(xp, res, dW) -> dS`` returns
the gradient of ⟨dW, W(S)⟩ with respect to S, a *symmetric* matrix: the forward reads only
sym(S) = (S + Sᵀ)/2, so dS is the gradient of W(sym(S)) for any direction, symmetric or not)

====================================  =========================================================
``inv_sqrt_eigh_forward(xp, S)``      W = S^-1/2 = D·Λ^-1/2·Dᵀ (ZCA). Backward: Loewner
``inv_sqrt_eigh_backward(xp, res, dW)``  divided differences, exact at equal eigenvalues.
``sqrt_eigh_forward(xp, S)``          W = S^1/2 = D·Λ^1/2·Dᵀ (coloring, WCT). Same backward form.
``sqrt_eigh_backward(xp, res, dW)``
``pca_eigh_forward(xp, S)``           W = Λ^-1/2·Dᵀ (PCA whitening; rows in ascending eigenvalue
``pca_eigh_backward(xp, res, dW)``      order, each eigenvector's sign fixed so that its largest-
                                        magnitude entry is positive). Backward has 1/(λj − λi).
``cholesky_inv_forward(xp, S)``       W = L^-1 with S = L·Lᵀ (Cholesky whitening).
``cholesky_inv_backward(xp, res, dW)``
``newton_inv_sqrt_forward(xp, S, T)`` IterNorm: t = tr S, S_N = S/t, P_0 = I,
``newton_inv_sqrt_backward(xp, res, dW)``  P_k = ½(3·P_{k−1} − P_{k−1}³·S_N), W = P_T/√t.
``newton_schulz_forward(xp, S, T)``   coupled Newton–Schulz on S_N = S/tr S: Y_0 = S_N, Z_0 = I,
``newton_schulz_backward(xp, res, dW)``   M_k = ½(3I − Z·Y), Y ← Y·M_k, Z ← M_k·Z; W = Z_T/√t.
====================================  =========================================================

Helpers: ``sym(xp, A)``, ``mT(xp, A)``, ``eye_like(xp, S)``, ``trace(xp, S)``, ``eigh(xp, S)`` (pass
its result as ``eig=`` to the eigh-based forwards to inspect λ first), ``min_eigenvalue_ok``,
``solve_triangular(xp, L, B, lower, transpose)`` (the library's own triangular solve where it has
one: torch, JAX, SciPy for NumPy; the array API's ``linalg.solve`` otherwise), ``cholesky``;
``operator_forward`` / ``apply_whitening`` / ``apply_whitening_transpose`` apply W (or, for
Cholesky, L⁻¹ by a triangular solve) to samples,
``FORWARD``/``BACKWARD`` (dicts: method name → function, for ``"zca"``, ``"pca"``,
``"cholesky"``, ``"iternorm"``, ``"newton_schulz"``; the iterative ones take ``T`` as a third
argument) and :func:`whitening_matrix_forward` / :func:`whitening_matrix_backward`, which dispatch
on the method name.

Example (OWN: W = (Vc·Vcᵀ)^-1/2·Vc)::

    from normref import matfun
    S = Vc @ Vc.mT                           # (G, d, d)
    B, res = matfun.inv_sqrt_eigh_forward(xp, S)
    ...
    dS = matfun.inv_sqrt_eigh_backward(xp, res, dB)     # symmetric (G, d, d)

The mathematics (../shared/math/BACKWARD.md):

- Loewner form. For W = f(S) = D·f(Λ)·Dᵀ, the Fréchet derivative is
  Df(S)[E] = D·(K ∘ (Dᵀ·E·D))·Dᵀ with K_ij = (f(λi) − f(λj))/(λi − λj), K_ii = f′(λi). K is symmetric,
  so the adjoint is the same map: dS = D·(K ∘ (Dᵀ·sym(dW)·D))·Dᵀ. For f = λ^-1/2,
  K_ij = −1/(√λi·√λj·(√λi + √λj)); for f = λ^1/2, K_ij = 1/(√λi + √λj). Both closed forms hold on the
  diagonal too (they equal f′) and contain no 1/(λi − λj): exact when eigenvalues coincide, where
  autograd through ``eigh`` divides by λi − λj.
- PCA. W = f(Λ)·Dᵀ depends on the eigenvectors themselves: dD = dWᵀ·diag(f(λ)),
  dλ_k = f′(λ_k)·(dW·D)_kk, dS = sym(D·(diag(dλ) + F ∘ (Dᵀ·dD))·Dᵀ), F_ij = 1/(λj − λi) (i ≠ j).
  At equal eigenvalues PCA whitening is not differentiable (its rows are not even continuous
  functions of S); at numerically repeated ones, |λj − λi| ≤ √ε_dtype·max|λ|, F_ij is set to 0,
  the derivative along perturbations that keep the computed eigenbasis, with a ``RuntimeWarning``
  (documented, not a claim of correctness; the survey's point is that PCA whitening is unstable
  there; :func:`pca_gap_tolerance` says why √ε).
- Cholesky (Murray 2016). dL = tril(−L⁻ᵀ·dW·L⁻ᵀ) (from d(L⁻¹) = −L⁻¹·dL·L⁻¹),
  P = Φ(Lᵀ·dL) (lower triangle with the diagonal halved), dS = sym(L⁻ᵀ·P·L⁻¹); every product with
  L⁻¹ or L⁻ᵀ is a triangular solve (:func:`solve_triangular`), no inverse is formed.
- Newton iterations: the backward runs the unrolled iterations in reverse (reverse-mode through the
  matrix products, A·dP·B ↦ Aᵀ·G·Bᵀ), then through S_N = S/t and W = P_T/√t:
  dt = −½·t^-3/2·⟨dW, P_T⟩ − ⟨dS_N, S⟩/t², dS = dS_N/t + dt·I.
"""

from __future__ import annotations

import math
import warnings

from . import _kernels

from typing import Any, Callable

from ._xp import device_of, is_compiling, is_lazy

__all__ = [
    "sym",
    "mT",
    "eye_like",
    "trace",
    "min_eigenvalue_ok",
    "eigh",
    "inv_sqrt_eigh_forward",
    "inv_sqrt_eigh_backward",
    "sqrt_eigh_forward",
    "sqrt_eigh_backward",
    "pca_eigh_forward",
    "pca_eigh_backward",
    "pca_gap_tolerance",
    "solve_triangular",
    "native_triangular_solve",
    "cholesky",
    "triangular_inverse",
    "cholesky_inv_forward",
    "cholesky_inv_backward",
    "newton_inv_sqrt_forward",
    "newton_inv_sqrt_backward",
    "newton_schulz_forward",
    "newton_schulz_backward",
    "METHODS",
    "ITERATIVE",
    "MAX_ITERATIONS",
    "check_iterations",
    "FORWARD",
    "BACKWARD",
    "whitening_matrix_forward",
    "whitening_matrix_backward",
    "operator_forward",
    "apply_whitening",
    "apply_whitening_transpose",
    "triu_pack",
    "triu_unpack",
]

METHODS = ("zca", "pca", "cholesky", "iternorm", "newton_schulz")
ITERATIVE = ("iternorm", "newton_schulz")
# The most iterations a Newton method (IterNorm, Newton–Schulz, ONI) or a power iteration (spectral
# norm) may be asked for. Coupled Newton–Schulz converges quadratically once ‖I − S_N‖ < 1 (tens of
# steps even at κ = 1e6), the papers use T ≤ 7 and torch 1–15 power steps; each step is stored for the
# backward (a d×d matrix), so a larger count is a typo, and 10**12 would never return.
MAX_ITERATIONS = 1000


def check_iterations(fn: str, name: str, v: Any, *, minimum: int = 1) -> int:
    """An iteration count: an integer >= ``minimum`` (``check_int``'s TypeError / ValueError) and at
    most :data:`MAX_ITERATIONS` (ValueError naming ``fn`` and ``name``)."""
    from ._validate import check_int

    v = check_int(fn, name, v, minimum=minimum)
    if v > MAX_ITERATIONS:
        raise ValueError(f"{fn}: {name} must be an integer in [{minimum}, {MAX_ITERATIONS}] (normref.matfun.MAX_ITERATIONS: "
                         f"more steps change nothing once converged, and each is stored for the backward); got {v}")
    return v


# --------------------------------------------------------------------------------------------------
# small helpers


def mT(xp, a):
    """The transpose of the last two axes."""
    return xp.matrix_transpose(a)


def sym(xp, a):
    """sym(A) = (A + Aᵀ)/2."""
    return 0.5 * (a + xp.matrix_transpose(a))


def eye_like(xp, s):
    """The d × d identity in ``s``'s dtype and device (broadcasts against (..., d, d))."""
    d = s.shape[-1]
    try:
        dev = device_of(s)
    except Exception:  # a traced value without a device
        dev = None
    if dev is None:
        return xp.eye(d, dtype=s.dtype)
    return xp.eye(d, dtype=s.dtype, device=dev)


def trace(xp, s):
    """tr S over the last two axes, shape (...)."""
    return xp.sum(s * eye_like(xp, s), axis=(-2, -1))


def _index_device(like):
    try:
        return device_of(like)
    except Exception:  # a traced value without a device
        return None


def _index(xp, idx, like):
    """A host index vector as an integer array on ``like``'s device (none under tracing)."""
    dev = _index_device(like)
    idx = [int(k) for k in idx]  # the library's default integer dtype (int32 for JAX without x64)
    return xp.asarray(idx) if dev is None else xp.asarray(idx, device=dev)


def triu_pack(xp, a):
    """The upper triangles of symmetric (..., d, d) matrices as (..., d(d+1)/2) vectors (row-major:
    (0,0), (0,1), …, (0,d−1), (1,1), …): what a cross-rank collective sends for a symmetric matrix
    (the covariance's centred cross-products, the whitening backward's dΣ) instead of its d² entries."""
    import numpy as _np

    d = a.shape[-1]
    r, c = _np.triu_indices(d)
    flat = xp.reshape(a, tuple(a.shape[:-2]) + (d * d,))
    return xp.take(flat, _index(xp, r * d + c, a), axis=flat.ndim - 1)


def triu_unpack(xp, v, d: int):
    """The symmetric (..., d, d) matrices whose upper triangles :func:`triu_pack` gave as ``v``
    (..., d(d+1)/2): entry (i, j) and (j, i) both read packed position of (min(i,j), max(i,j))."""
    import numpy as _np

    r, c = _np.triu_indices(d)
    pos = _np.empty((d, d), dtype=_np.int64)
    pos[r, c] = _np.arange(r.size)
    pos[c, r] = _np.arange(r.size)
    full = xp.take(v, _index(xp, pos.reshape(-1), v), axis=v.ndim - 1)
    return xp.reshape(full, tuple(v.shape[:-1]) + (d, d))


def _diag_embed(xp, v, like):
    """diag(v) for v of shape (..., d): (..., d, d)."""
    return v[..., None] * eye_like(xp, like)


def _diag(xp, a):
    return xp.linalg.diagonal(a)


def _eigh(xp, s):
    """(λ ascending, D) of sym(S): one batched call for every matrix of the batch."""
    if is_lazy(s):
        return _dask_linalg("eigh", sym(xp, s))
    lam, d = xp.linalg.eigh(sym(xp, s))
    return lam, d


def _dask_linalg(name: str, *arrays):
    """``numpy.linalg.<name>`` (eigh, cholesky, solve) applied lazily to dask arrays of matrices.

    ``dask.array.linalg`` has no ``eigh`` and factorizes or solves one 2-D matrix only; the matrices
    normref factorizes are small (a d × d covariance per group), so each stack of them is one task of
    the graph running NumPy's batched routine (nothing is computed here). A solve's right-hand side
    (..., d, k) — the samples of a whitening group — keeps its chunks along k: each block of samples
    is solved with the whole (small) L. Values: NumPy's own routines, so results equal NumPy's; a
    Cholesky factorization that fails (a matrix not positive definite) raises NumPy's ``LinAlgError``
    when the graph is computed (the definiteness checks need concrete values and are skipped here).
    """
    import dask.array as da
    import numpy as np

    if name == "eigh":
        s = arrays[0]
        return tuple(da.apply_gufunc(np.linalg.eigh, "(i,j)->(i),(i,j)", s, output_dtypes=(s.dtype, s.dtype),
                                     allow_rechunk=True))
    if name == "cholesky":
        s = arrays[0]
        return da.apply_gufunc(np.linalg.cholesky, "(i,j)->(i,j)", s, output_dtypes=s.dtype, allow_rechunk=True)
    # solve: a (..., d, d), b (..., d, k) with broadcast batch axes; the contracted axis in one chunk
    a, b = (da.asarray(t) for t in arrays)
    batch = tuple(np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])))
    a = da.broadcast_to(a, batch + tuple(a.shape[-2:])).rechunk({len(batch): -1, len(batch) + 1: -1})
    b = da.broadcast_to(b, batch + tuple(b.shape[-2:])).rechunk({len(batch): -1})
    ix = "".join(chr(ord("a") + i) for i in range(len(batch)))
    return da.blockwise(np.linalg.solve, ix + "ik", a, ix + "ij", b, ix + "jk", dtype=b.dtype, concatenate=True)


def min_eigenvalue_ok(xp, lam, rtol: float | None = None):
    """Whether every matrix's smallest eigenvalue exceeds ``rtol``·max(λ) (concrete arrays only).

    Returns ``None`` when the values cannot be inspected (a traced JAX value). ``rtol`` defaults to
    d·ε of the dtype: below it the matrix is numerically singular and λ^-1/2 is rounding noise.
    """
    d = lam.shape[-1]
    if rtol is None:
        rtol = d * float(xp.finfo(lam.dtype).eps)
    if is_lazy(lam) or is_compiling(lam):  # dask, torch.compile: never computed here (like a traced value)
        return None
    try:
        lo = xp.min(lam, axis=-1)
        hi = xp.max(xp.abs(lam), axis=-1)
        ok = xp.all(lo > rtol * hi)
        return bool(ok)
    except Exception:  # jax.core.ConcretizationTypeError and friends under tracing
        return None


# --------------------------------------------------------------------------------------------------
# spectral functions through eigh (Loewner / divided-difference backward)


def _loewner_backward(xp, lam, d, dw, kernel):
    """dS = D·(K ∘ (Dᵀ·sym(dW)·D))·Dᵀ for the divided-difference matrix K = kernel(√λi, √λj)."""
    r = xp.sqrt(lam)
    ri, rj = r[..., :, None], r[..., None, :]
    k = kernel(ri, rj)
    inner = xp.matmul(mT(xp, d), xp.matmul(sym(xp, dw), d))
    return xp.matmul(d, xp.matmul(k * inner, mT(xp, d)))


def eigh(xp, s):
    """(λ ascending, D) of sym(S), one batched call: pass it as ``eig=`` to the eigh-based forwards
    to inspect λ (e.g. for definiteness) before λ^-1/2 is taken."""
    return _eigh(xp, s)


def inv_sqrt_eigh_forward(xp, s, eig=None):
    """W = S^-1/2 = D·Λ^-1/2·Dᵀ (ZCA whitening matrix) through one batched ``eigh``.

    Returns ``(W, res)`` with ``res = (λ, D)``; W is symmetric. ``eig``: a precomputed
    ``eigh(xp, S)``. Survey Eqn 23; Huang et al., Decorrelated Batch Normalization, CVPR 2018.
    """
    lam, d = _eigh(xp, s) if eig is None else eig
    w = xp.matmul(d * (1.0 / xp.sqrt(lam))[..., None, :], mT(xp, d))
    return w, (lam, d)


def inv_sqrt_eigh_backward(xp, res, dw):
    """dS of W = S^-1/2: D·(K ∘ (Dᵀ·sym(dW)·D))·Dᵀ, K_ij = −1/(√λi·√λj·(√λi + √λj)) (exact at λi = λj)."""
    lam, d = res
    return _loewner_backward(xp, lam, d, dw, lambda a, b: -1.0 / (a * b * (a + b)))


def sqrt_eigh_forward(xp, s, eig=None):
    """W = S^1/2 = D·Λ^1/2·Dᵀ (the coloring matrix of WCT, Li et al. NeurIPS 2017). ``res = (λ, D)``."""
    lam, d = _eigh(xp, s) if eig is None else eig
    w = xp.matmul(d * xp.sqrt(lam)[..., None, :], mT(xp, d))
    return w, (lam, d)


def sqrt_eigh_backward(xp, res, dw):
    """dS of W = S^1/2: D·(K ∘ (Dᵀ·sym(dW)·D))·Dᵀ, K_ij = 1/(√λi + √λj) (exact at λi = λj)."""
    lam, d = res
    return _loewner_backward(xp, lam, d, dw, lambda a, b: 1.0 / (a + b))


# --------------------------------------------------------------------------------------------------
# PCA whitening (eigenvector backward)


def _fix_signs(xp, d):
    """Each eigenvector (column) with its largest-magnitude entry made positive: a canonical sign, so
    that every library returns the same PCA rows (eigh's sign is otherwise arbitrary)."""
    a = xp.abs(d)
    top = a >= xp.max(a, axis=-2, keepdims=True)
    s = xp.sum(xp.where(top, d, xp.zeros_like(d)), axis=-2, keepdims=True)
    sign = xp.where(s >= 0, xp.ones_like(s), -xp.ones_like(s))
    return d * sign


def pca_eigh_forward(xp, s, eig=None):
    """W = Λ^-1/2·Dᵀ (PCA whitening matrix): row k is the k-th eigenvector (ascending λ) over √λ_k.

    Unstable in training (stochastic axis swapping, Huang et al. CVPR 2018 §3.1): W jumps when two
    eigenvalues cross. ``res = (λ, D)`` with the canonical eigenvector signs.
    """
    lam, d = _eigh(xp, s) if eig is None else eig
    d = _fix_signs(xp, d)
    w = (1.0 / xp.sqrt(lam))[..., :, None] * mT(xp, d)
    return w, (lam, d)


def pca_gap_tolerance(xp, dtype) -> float:
    """τ = √ε of ``dtype``: the relative eigenvalue gap |λi − λj| ≤ τ·max|λ| below which
    :func:`pca_eigh_backward` treats the pair as repeated (1.5e-8 in float64, 3.5e-4 in float32).

    Why √ε: the eigenvector derivative of the pair is ∝ 1/(λj − λi), and its first-order (linear)
    description is valid only for perturbations E of Σ with ‖E‖ ≪ |λj − λi| (the second-order term is
    ∝ ‖E‖²/gap²). A finite difference, or an optimizer step, resolves the derivative only if it can take
    a step h with ε/h ≪ 1 (rounding) and h ≪ gap (linearity): both hold only when gap ≫ √ε (relative).
    Below τ the rotation term 1/gap (≥ 1/√ε, i.e. ≥ 7e7 relative in float64, up to 1e14 at a gap of one
    ulp) is not a usable derivative of the computed PCA rows but an amplifier of rounding noise."""
    return math.sqrt(float(xp.finfo(dtype).eps))


def pca_eigh_backward(xp, res, dw):
    """dS of W = Λ^-1/2·Dᵀ: sym(D·(diag(dλ) + F ∘ (Dᵀ·dD))·Dᵀ), F_ij = 1/(λj − λi).

    The degenerate-pair rule (documented, not a claim of differentiability): where two eigenvalues of
    one matrix are numerically repeated, |λj − λi| ≤ τ·max|λ| with τ = √ε_dtype
    (:func:`pca_gap_tolerance`), F_ij is set to 0 — the derivative along perturbations that keep the
    computed eigenbasis of that eigenspace, the same rule as at exactly equal eigenvalues. PCA
    whitening is genuinely not differentiable at a repeated eigenvalue (its rows, the eigenvectors
    themselves, are not continuous functions of Σ there), so this is a choice, and a
    ``RuntimeWarning`` naming the smallest relative gap says when it was made (concrete values only;
    under ``jax.jit`` tracing the rule applies silently). Without it the backward returned
    |dS| ≈ 1/gap (≈ 1e14 at a gap of one ulp). Use ZCA (whose Loewner backward is exact at any gap)
    when eigenvalues may coincide.
    """
    lam, d = res
    f = 1.0 / xp.sqrt(lam)                      # f(λ) = λ^-1/2
    fp = -0.5 * f / lam                          # f′(λ) = −½·λ^-3/2
    dd = mT(xp, dw) * f[..., None, :]            # dD = dWᵀ·diag(f(λ))
    dlam = fp * _diag(xp, xp.matmul(dw, d))      # dλ_k = f′(λ_k)·(dW·D)_kk
    diff = lam[..., None, :] - lam[..., :, None]  # λj − λi
    tau = pca_gap_tolerance(xp, lam.dtype)
    scale = xp.max(xp.abs(lam), axis=-1)[..., None, None]
    same = xp.abs(diff) <= tau * scale           # numerically repeated (the diagonal included)
    _warn_degenerate(xp, diff, scale, same, tau)
    f_mat = xp.where(same, xp.zeros_like(diff), 1.0 / xp.where(same, xp.ones_like(diff), diff))
    inner = _diag_embed(xp, dlam, d) + f_mat * xp.matmul(mT(xp, d), dd)
    return sym(xp, xp.matmul(d, xp.matmul(inner, mT(xp, d))))


def _warn_degenerate(xp, diff, scale, same, tau):
    """The RuntimeWarning of :func:`pca_eigh_backward`'s degenerate-pair rule (concrete values only)."""
    d = diff.shape[-1]
    if is_lazy(diff) or is_compiling(diff):  # dask, torch.compile: never computed here (like a traced value)
        return
    try:
        off = xp.logical_and(same, xp.logical_not(xp.astype(eye_like(xp, diff), xp.bool)))
        if not bool(xp.any(off)):
            return
        rel = xp.where(off, xp.abs(diff) / xp.where(scale > 0, scale, xp.ones_like(scale)), xp.full_like(diff, xp.inf))
        gap = float(xp.min(rel))
    except Exception:  # traced (jax.jit): no Python value to test
        return
    warnings.warn(
        f"pca whitening backward: two eigenvalues of a {d}×{d} covariance are numerically repeated (relative gap "
        f"{gap:.3g} ≤ τ = √ε = {tau:.3g}); PCA whitening is not differentiable there, so the eigenvector-rotation "
        f"term 1/(λj − λi) of that pair is dropped (the derivative along perturbations that keep the computed "
        f"eigenbasis). Use method='zca' (exact at any gap) if eigenvalues may coincide",
        RuntimeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------
# Cholesky whitening


def native_triangular_solve(xp):
    """The library's own batched triangular solve ``f(L, B, lower, transpose)`` (a kernel registered
    by :mod:`normref.backends.linalg`: torch, JAX, SciPy for NumPy), or ``None``."""
    return _kernels.lookup(xp, "solve_triangular")


def solve_triangular(xp, chol, b, lower: bool = True, transpose: bool = False, native: bool = True):
    """X = L^-1·B (``transpose``: X = L^-ᵀ·B) for triangular L (..., d, d) and B (..., d, k),
    batch axes broadcast.

    The namespace's own triangular solve (forward or back substitution, d²·k flops) where it has
    one (:func:`native_triangular_solve`; ``native=False`` or ``use_kernels(False)`` skips it), else the
    array API's general
    ``xp.linalg.solve`` (an LU factorization of L: the same X, ~d³ more work).
    """
    if any(int(k) == 0 for k in b.shape):  # no samples (a rank with an empty batch): nothing to solve
        import numpy as _np

        shape = tuple(_np.broadcast_shapes(tuple(chol.shape[:-2]), tuple(b.shape[:-2]))) + tuple(b.shape[-2:])
        return xp.zeros(shape, dtype=b.dtype, device=_index_device(b))
    f = native_triangular_solve(xp) if native else None
    if f is not None:
        x = f(chol, b, lower, transpose)
        if x is not None:
            return x
    if is_lazy(chol) or is_lazy(b):
        return _dask_linalg("solve", mT(xp, chol) if transpose else chol, b)
    return xp.linalg.solve(mT(xp, chol) if transpose else chol, b)


def cholesky(xp, s):
    """The lower Cholesky factor L of sym(S) = L·Lᵀ, one batched call for every matrix."""
    if is_lazy(s):
        return _dask_linalg("cholesky", sym(xp, s))
    return xp.linalg.cholesky(sym(xp, s))


def cholesky_inv_forward(xp, s):
    """W = L^-1 with sym(S) = L·Lᵀ (Cholesky whitening; Siarohin et al., ICLR 2019).

    W is lower triangular, formed by one triangular solve L·W = I. Batch whitening never forms it:
    it applies W to the samples by solving L·X̂ = Xc (:func:`apply_whitening`). ``res = (L,)``.
    """
    chol = cholesky(xp, s)
    return triangular_inverse(xp, chol), (chol,)


def triangular_inverse(xp, chol):
    """L^-1 of a lower triangular L by one triangular solve L·W = I (exact zeros above the diagonal)."""
    return xp.tril(solve_triangular(xp, chol, eye_like(xp, chol) + xp.zeros_like(chol)))


def cholesky_inv_backward(xp, res, dw):
    """dS of W = L^-1, S = L·Lᵀ (Murray 2016), by triangular solves only:

    dL = tril(−L^-ᵀ·dW·L^-ᵀ) (from d(L^-1) = −L^-1·dL·L^-1), P = Φ(Lᵀ·dL) (lower triangle,
    diagonal halved), dS = sym(L^-ᵀ·P·L^-1); each product with L^-1 or L^-ᵀ is a solve
    (A·L^-ᵀ = (L^-1·Aᵀ)ᵀ, A·L^-1 = (L^-ᵀ·Aᵀ)ᵀ).
    """
    (chol,) = res
    a = solve_triangular(xp, chol, dw, transpose=True)                 # L^-ᵀ·dW
    dl = xp.tril(-mT(xp, solve_triangular(xp, chol, mT(xp, a))))       # −(L^-ᵀ·dW)·L^-ᵀ, lower part
    p = xp.tril(xp.matmul(mT(xp, chol), dl))
    p = p - 0.5 * _diag_embed(xp, _diag(xp, p), p)                  # Φ: lower triangle, diagonal halved
    b = solve_triangular(xp, chol, p, transpose=True)                  # L^-ᵀ·P
    return sym(xp, mT(xp, solve_triangular(xp, chol, mT(xp, b), transpose=True)))  # (L^-ᵀ·P)·L^-1


# --------------------------------------------------------------------------------------------------
# Newton iterations (IterNorm) and coupled Newton–Schulz


def _normalize_trace(xp, s):
    t = trace(xp, s)
    return sym(xp, s) / t[..., None, None], t


def _trace_tail(xp, s, t, w_unscaled, dw, ds_n):
    """dS from dS_N and dW through S_N = S/t, W = W̃/√t (t = tr S): dS = dS_N/t + dt·I."""
    t2 = t[..., None, None]
    dt = -0.5 * t ** -1.5 * xp.sum(dw * w_unscaled, axis=(-2, -1)) - xp.sum(ds_n * sym(xp, s), axis=(-2, -1)) / t**2
    return sym(xp, ds_n / t2 + dt[..., None, None] * eye_like(xp, s))


def newton_inv_sqrt_forward(xp, s, iterations: int):
    """IterNorm's W ≈ S^-1/2 by ``iterations`` (T) Newton steps on the trace-normalized matrix.

    t = tr S, S_N = S/t, P_0 = I, P_k = ½(3·P_{k−1} − P_{k−1}³·S_N), W = P_T/√t (Huang et al.,
    Iterative Normalization, CVPR 2019, Algorithm 1: Newton's iteration for the inverse square root,
    uncoupled, not the coupled Newton–Schulz form). The eigenvalues of S_N lie in (0, 1], where the
    scalar iteration p ↦ ½(3p − p³λ) increases monotonically to λ^-1/2: with finite T, small
    eigenvalues are only partly whitened ("stretched progressively", survey §5.1.2).
    ``res = (S, t, P_0, …, P_T)``.

    Numerical stability: this uncoupled iteration is unstable once an eigen-direction has converged
    (Higham, Functions of Matrices, 2008, §6.4/§7.3): a rounding error E_ij (in S's eigenbasis) is
    multiplied each step by 1.5 − 0.5·(1 + r + r²), r = √(λj/λi), i.e. by up to ≈ κ(S)/2. Measured
    against the coupled form (d = 8, κ = 1e2…1e6): ≈ 30–50× error growth per step after T ≈ 5; float64
    relative error ≤ 2e-14 for T ≤ 6, 1e-10 at T = 8, 4e-3 at T = 11 and overflow by T ≈ 16 (κ ≥ 1e4);
    float32 ≤ 2e-5 for T ≤ 6, 4e-4 at T = 7. The paper's T = 5 is harmless; normref warns above
    T = 6 (``normref.whitening.ITERNORM_STABLE_T``). Use :func:`newton_schulz_forward` (coupled,
    stable) for many iterations.
    """
    s_n, t = _normalize_trace(xp, s)
    ps = newton_iterates(xp, s_n, iterations)
    w = ps[-1] / xp.sqrt(t)[..., None, None]
    return w, (s, t, *ps)


def newton_iterates(xp, s_n, iterations: int) -> list:
    """[P_0 = I, P_1, …, P_T], P_k = 1.5·P_{k−1} − 0.5·P_{k−1}³·S_N, on an already normalized S_N
    (IterNorm divides S by its trace, ONI's authors by its Frobenius norm)."""
    p = eye_like(xp, s_n) + xp.zeros_like(s_n)
    ps = [p]
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * xp.matmul(xp.matmul(xp.matmul(p, p), p), s_n)
        ps.append(p)
    return ps


def newton_iterates_backward(xp, s_n, ps, dp):
    """dS_N of :func:`newton_iterates` for the cotangent ``dp`` of P_T, reverse through
    P_k = 1.5·P − 0.5·P³·S_N (P = P_{k−1}), k = T…1:
    dP += 1.5·dP_k − 0.5·(dP_k·(P²·S_N)ᵀ + Pᵀ·dP_k·(P·S_N)ᵀ + (P²)ᵀ·dP_k·S_Nᵀ), dS_N += −0.5·(P³)ᵀ·dP_k."""
    ds_n = xp.zeros_like(s_n)
    for k in range(len(ps) - 1, 0, -1):
        p = ps[k - 1]
        p2 = xp.matmul(p, p)
        ps_ = xp.matmul(p, s_n)
        new = 1.5 * dp - 0.5 * (
            xp.matmul(dp, mT(xp, xp.matmul(p2, s_n)))
            + xp.matmul(mT(xp, p), xp.matmul(dp, mT(xp, ps_)))
            + xp.matmul(mT(xp, p2), xp.matmul(dp, mT(xp, s_n)))
        )
        ds_n = ds_n - 0.5 * xp.matmul(mT(xp, xp.matmul(p2, p)), dp)
        dp = new
    return ds_n


def newton_inv_sqrt_backward(xp, res, dw):
    """dS of IterNorm's W: reverse through P_k = 1.5·P − 0.5·P³·S_N (P = P_{k−1}), k = T…1:

    dP += 1.5·dP_k − 0.5·(dP_k·(P²·S_N)ᵀ + Pᵀ·dP_k·(P·S_N)ᵀ + (P²)ᵀ·dP_k·S_Nᵀ),
    dS_N += −0.5·(P³)ᵀ·dP_k; then the trace normalization (module docstring).
    """
    s, t, *ps = res
    s_n = sym(xp, s) / t[..., None, None]
    sq = xp.sqrt(t)[..., None, None]
    ds_n = newton_iterates_backward(xp, s_n, ps, dw / sq)
    return _trace_tail(xp, s, t, ps[-1], dw, ds_n)


def newton_schulz_forward(xp, s, iterations: int):
    """Coupled Newton–Schulz iteration for S^-1/2:

    t = tr S, Y_0 = S_N = S/t, Z_0 = I, M_k = ½(3I − Z_{k−1}·Y_{k−1}), Y_k = Y_{k−1}·M_k,
    Z_k = M_k·Z_{k−1}; Y_T → S_N^1/2, Z_T → S_N^-1/2, W = Z_T/√t. In exact arithmetic Z_k equals
    IterNorm's P_k (both are the same polynomial in S_N); the coupled form is the one the survey
    (§5.1.2) names for group whitening (matrix products only), and unlike IterNorm's uncoupled form
    it is numerically stable for any T. ``res = (S, t, Y_0, Z_0, …, Y_T, Z_T)``.

    Attribution. It is the Newton–Schulz iteration for the matrix sign function, X ↦ ½X(3I − X²)
    (Higham, *Functions of Matrices*, SIAM 2008, Ch. 5), applied to the block matrix [[0, S], [I, 0]],
    whose sign is [[0, S^1/2], [S^-1/2, 0]]: written in its two blocks it is the coupled iteration
    above, one of the square-root iterations derived from the sign function in Higham's Ch. 6
    (convergent for ‖I − S_N‖ < 1, hence the trace normalization). Lin & Maji (Improved Bilinear
    Pooling with CNNs, BMVC 2017) used it for the matrix square root in bilinear pooling; the survey
    (§5.1.2) cites its use for group whitening as its refs. [80] (the method) and [82] (the
    iteration). IterNorm (Huang et al., CVPR 2019) does *not* use it: it runs the uncoupled Newton
    iteration of :func:`newton_inv_sqrt_forward`.
    """
    s_n, t = _normalize_trace(xp, s)
    seq = newton_schulz_iterates(xp, s_n, iterations)
    w = seq[-1] / xp.sqrt(t)[..., None, None]
    return w, (s, t, *seq)


def newton_schulz_iterates(xp, s_n, iterations: int) -> list:
    """[Y_0 = S_N, Z_0 = I, …, Y_T, Z_T] of the coupled iteration M_k = ½(3I − Z_{k−1}·Y_{k−1}),
    Y_k = Y_{k−1}·M_k, Z_k = M_k·Z_{k−1}, on an already normalized S_N (Z_T → S_N^-1/2)."""
    eye = eye_like(xp, s_n)
    y, z = s_n, eye + xp.zeros_like(s_n)
    seq = [y, z]
    for _ in range(iterations):
        m = 0.5 * (3.0 * eye - xp.matmul(z, y))
        y, z = xp.matmul(y, m), xp.matmul(m, z)
        seq += [y, z]
    return seq


def newton_schulz_iterates_backward(xp, seq, dz):
    """dS_N (= dY_0) of :func:`newton_schulz_iterates` for the cotangent ``dz`` of Z_T, reverse
    through Y' = Y·M, Z' = M·Z, M = ½(3I − Z·Y): dM = Yᵀ·dY' + dZ'·Zᵀ, dY = dY'·Mᵀ − ½·Zᵀ·dM,
    dZ = Mᵀ·dZ' − ½·dM·Yᵀ."""
    eye = eye_like(xp, seq[0])
    ys, zs = seq[0::2], seq[1::2]
    dy = xp.zeros_like(dz)
    for k in range(len(ys) - 1, 0, -1):
        y, z = ys[k - 1], zs[k - 1]
        m = 0.5 * (3.0 * eye - xp.matmul(z, y))
        dm = xp.matmul(mT(xp, y), dy) + xp.matmul(dz, mT(xp, z))
        dy, dz = (
            xp.matmul(dy, mT(xp, m)) - 0.5 * xp.matmul(mT(xp, z), dm),
            xp.matmul(mT(xp, m), dz) - 0.5 * xp.matmul(dm, mT(xp, y)),
        )
    return dy


def newton_schulz_backward(xp, res, dw):
    """dS of the coupled Newton–Schulz W, reverse through Y' = Y·M, Z' = M·Z, M = ½(3I − Z·Y):

    dY = dY'·Mᵀ − ½·Zᵀ·dM, dZ = Mᵀ·dZ' − ½·dM·Yᵀ with dM = Yᵀ·dY' + dZ'·Zᵀ; dS_N = dY_0.
    """
    s, t, *seq = res
    dy = newton_schulz_iterates_backward(xp, seq, dw / xp.sqrt(t)[..., None, None])
    return _trace_tail(xp, s, t, seq[-1], dw, dy)


# --------------------------------------------------------------------------------------------------
# dispatch by name

FORWARD: dict[str, Callable[..., Any]] = {
    "zca": inv_sqrt_eigh_forward,
    "pca": pca_eigh_forward,
    "cholesky": cholesky_inv_forward,
    "iternorm": newton_inv_sqrt_forward,
    "newton_schulz": newton_schulz_forward,
}
BACKWARD: dict[str, Callable[..., Any]] = {
    "zca": inv_sqrt_eigh_backward,
    "pca": pca_eigh_backward,
    "cholesky": cholesky_inv_backward,
    "iternorm": newton_inv_sqrt_backward,
    "newton_schulz": newton_schulz_backward,
}


def whitening_matrix_forward(xp, s, method: str = "zca", iterations: int = 5, eig=None) -> tuple[Any, tuple]:
    """``(W, res)`` for the whitening matrix of ``method`` (one of :data:`METHODS`) of sym(S);
    ``eig`` (zca, pca): a precomputed :func:`eigh` of S."""
    if method in ITERATIVE:
        return FORWARD[method](xp, s, iterations)
    if eig is not None and method in ("zca", "pca"):
        return FORWARD[method](xp, s, eig)
    return FORWARD[method](xp, s)


def whitening_matrix_backward(xp, res, dw, method: str = "zca"):
    """dS (symmetric) of :func:`whitening_matrix_forward`'s W for the cotangent dW."""
    return BACKWARD[method](xp, res, dw)


# --------------------------------------------------------------------------------------------------
# applying the whitening to samples (what batch whitening does with W)


def operator_forward(xp, s, method: str = "zca", iterations: int = 5, eig=None) -> tuple[Any, tuple]:
    """``(M, res)``: what :func:`apply_whitening` needs to apply the whitening of ``method`` to
    samples. M = W for every method but ``"cholesky"``, where M = L (S = L·Lᵀ) and W = L^-1 is
    applied by a triangular solve instead of being formed; ``res`` is the method's residual tuple,
    the one :func:`whitening_matrix_backward` takes (for cholesky ``(L,)``)."""
    if method == "cholesky":
        chol = cholesky(xp, s)
        return chol, (chol,)
    return whitening_matrix_forward(xp, s, method, iterations, eig=eig)


def apply_whitening(xp, method: str, m, x):
    """W·X for the operator M of :func:`operator_forward` (M and X batch-broadcast): a matrix product,
    or for Cholesky the triangular solve L·Y = X (d²·k flops, no inverse formed)."""
    if method == "cholesky":
        return solve_triangular(xp, m, x)
    return xp.matmul(m, x)


def apply_whitening_transpose(xp, method: str, m, g):
    """Wᵀ·G for the operator M of :func:`operator_forward`: Lᵀ·Y = G solved for Cholesky."""
    if method == "cholesky":
        return solve_triangular(xp, m, g, transpose=True)
    return xp.matmul(mT(xp, m), g)
