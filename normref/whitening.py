"""Whitening (survey §5.1.2, Eqn 23): decorrelate groups of features, with exact analytic gradients.

For one group of c features with m samples X ∈ R^{c×m} (a column per sample):

    μ = mean_cols(X),  Xc = X − μ·1ᵀ,  Σ = Xc·Xcᵀ/m + ε·I,  X̂ = W(Σ)·Xc,

with the whitening matrix W(Σ) of the operation (NOP, :mod:`normref.matfun`):

==================  ==================================================  ===================================
``"zca"``           W = D·Λ^-1/2·Dᵀ = Σ^-1/2 (symmetric)                 Huang et al., DBN, CVPR 2018
``"pca"``           W = Λ^-1/2·Dᵀ (unstable: stochastic axis swapping)   Huang et al., CVPR 2018 §3.1
``"cholesky"``      W = L^-1, Σ = L·Lᵀ (applied by a triangular solve)   Siarohin et al., ICLR 2019
``"iternorm"``      W = P_T/√tr Σ, Newton on Σ/tr Σ, T = ``iterations``  Huang et al., IterNorm, CVPR 2019
``"newton_schulz"`` coupled Newton–Schulz Z_T/√tr Σ                      Higham 2008 Ch. 6; Lin & Maji, BMVC 2017
==================  ==================================================  ===================================

``"iternorm"`` and ``"newton_schulz"`` compute the same polynomial in Σ/tr Σ. IterNorm's uncoupled
form amplifies rounding errors once an eigen-direction has converged (by ≈ 30–50× per step, measured
on κ(Σ) = 1e2…1e6: float64 relative error 1e-10 at T = 8 and overflow by T ≈ 16; float32 error 4e-4 at
T = 7); the coupled form does not. T > :data:`ITERNORM_STABLE_T` with ``method="iternorm"`` warns
(``RuntimeWarning``); :func:`iter_norm` computes the coupled form there unless told otherwise.

Whitening is an operation of the survey's framework (Algorithm 1): any partition (NAP) of
:mod:`normref.partition` gives the matrix Π(X) whose rows it decorrelates (Eqn 20), and any recovery
(NRR) follows. :class:`Whitening` is that operation; ``normref.normalize(x, partition=...,
operation="zca", group_size=c)`` composes it with every partition and recovery, and the named
methods below are presets over the same code. The rows (``Partition.feature_axes``) and the samples
(the partition's reduce axes) are:

=============  =============================================  =========================================
partition      features (rows, in groups of ``group_size``)   samples per Σ (one Σ per …)
=============  =============================================  =========================================
batch          channels C                                     N·H·W (per group; decorrelated BN)
instance       channels C                                     H·W (per sample and group; WCT)
group          the num_groups channel blocks                  (C/G)·H·W (per sample; group whitening)
position       the H·W positions                              C (per sample)
layer          the last axis before the normalized ones       the normalized elements
batch_group    the num_groups channel blocks                  (N/Gb)·(C/G)·H·W (per batch group)
=============  =============================================  =========================================

No physical transpose is made: the partition's view is reshaped to (I, R1, G, c, R2) (independent
statistics, samples before the features, groups, group members, samples after them) and
Σ = Σ_{R1} Xc·Xcᵀ/m is a batched matrix product over R2 (the two sample axes swap roles, as a
strided view, when R1 is the longer one: a position partition or a 2-d (N, C) input).

Features are split into consecutive groups of ``group_size`` (``None``: one group of all features).
``group_size`` must divide the number of features: a smaller last group is **refused** (with the
divisors listed), because a padded group changes the trace normalization of IterNorm and the
eigenvalue order of PCA, and all groups go through ONE batched ``eigh``/``cholesky`` call on an
array of shape (I, G, c, c). Group size 1 is exactly standardization on the same partition.

Backward (../shared/math/BACKWARD.md), for one group with G = ∂L/∂X̂:
dW = G·Xcᵀ (summed over the samples sharing Σ), dXc = Wᵀ·G + (2/m)·dΣ·Xc with the symmetric
dΣ = matfun backward(dW), and dX = dXc − mean_cols(dXc). For Cholesky, W·Xc and Wᵀ·G are
triangular solves with L (:func:`normref.matfun.solve_triangular`); W is never formed. PCA is not
differentiable where two eigenvalues of Σ coincide: at a relative gap ≤ √ε_dtype its backward drops
that pair's rotation term 1/(λj − λi) and warns (``RuntimeWarning``;
:func:`normref.matfun.pca_eigh_backward` gives the rule and why √ε); ZCA's backward is exact at any gap.

Synchronized batch whitening (``sync=`` a :class:`normref.distributed.Reducer`; data-parallel training
with the batch split across ranks): the batch and batch-group partitions, in training, whiten with
the global batch's μ and Σ. Per call and per group of d features the forward gathers once
[μ_i (d), upper triangle of M2_i = Σ(x − μ_i)(x − μ_i)ᵀ (d(d+1)/2)] plus one count n_i per rank and
pools them by Chan's formula (:func:`normref.distributed.combine_moments`), so every rank computes
the same Σ = M2/N + εI, the same W (the same eigendecomposition, or the same T Newton iterations)
and the same running statistics. The backward needs two batch sums per group, dW = Σ G·Xcᵀ and
Σ G (the mean of dXc is Wᵀ·mean(G): Xc is centred by the global mean); as the matfun backward is
linear in dW, each rank maps its own dW_i to the symmetric dΣ_i, and ONE all-reduce of
[upper triangle of dΣ_i, Σ G_i] (d(d+1)/2 + d values per group) gives the global dΣ and Σ G.
The gradients of γ, β (coloring Γ) stay per rank, as data-parallel training sums them. A rank may
hold any number of samples, none included (it still takes part in both collectives). The other
partitions take each sample's own statistics and refuse ``sync`` (``ValueError``).

Population statistics (survey §4 Eqn 16, §5.3.2), batch partition: the *running covariance* is kept
by default (:func:`decorrelated_batch_norm` and :func:`iter_norm` offer the running whitening matrix
of their authors' code with ``running="whitening_matrix"``). A training call given
``running_mean``/``running_cov`` returns ``WhiteningResult(output, running_mean, running_cov)`` with
running ← (1 − momentum)·running + momentum·batch statistic, the covariance unbiased
(× m/(m − 1), as torch does for the variance) and without ε; an inference call computes W from
``running_cov + ε·I`` with the same operation and treats μ̂, W as constants: dX = Wᵀ·G.
Nothing is mutated. Every other partition uses each call's own statistics (there is no population).

Conventions (where the papers, the authors' code and the frameworks differ; the default first, the
argument for the others; each function's docstring gives the sources):

========================  ================================  ===========================================
method                    default                           others
========================  ================================  ===========================================
decorrelated_batch_norm   running covariance (unbiased)     ``running="whitening_matrix"``: EMA of the
                                                            batch W, applied at inference (authors' code)
iter_norm                 running covariance (unbiased)     ``running="whitening_matrix"`` (the same)
whitening_coloring        Σ = Xc·Xcᵀ/m + εI (Eqn 23)        ``shrinkage=True``: (1 − ε)·Xc·Xcᵀ/(m − 1)
                                                            + εI, (1 − ε)·Σ̂ + εI at inference (authors')
adain                     biased σ² + ε, content and style  ``unbiased=True`` (PyTorch port);
                          (paper Eqns 6, 8)                 ``style_eps=False`` (authors' Torch7 code)
wct                       biased Σ + εI, every eigenvalue   ``unbiased=True``, ``eig_cutoff=1e-5``,
                                                            ``style_eps=False`` (the PyTorch port)
========================  ================================  ===========================================

Bad covariances raise ``ValueError`` (never a NaN), checked on the small c×c matrices before any
factorization: non-finite values (NaN/inf in the input: the message names the argument; a finite
input whose covariance overflows, |x − μ|² above the dtype's max — |x| ≳ 1e19 in float32 — is
reported as that overflow); for zca,
pca and cholesky a smallest eigenvalue (squared Cholesky pivot) that is not above the rounding
noise ν = 2√c·ε_dtype·λ_max (2√c·ε_dtype·max diag Σ) of the computed covariance's eigenvalues
(measured ≤ 5.8·ε·λ_max at c = 64 in float32): such a matrix is numerically singular, and λ^-1/2
would be rounding noise. So a rank-deficient batch with eps > 0 whitens whenever eps is above ν
(float32, eps = 1e-5, c = 5: λ_max up to ≈ 19), and is refused otherwise. The message says which case it is: eps = 0
on a singular batch covariance (fewer samples than features, collinear or constant features), an eps
that does not dominate ν (a rank-deficient float32 batch with a small eps: pass a larger eps or
float64), or a given matrix (``running_cov``, ``cov``) that is not positive (semi)definite. The
Newton methods are polynomials in Σ/tr Σ and stay finite on a singular Σ (they only partly whiten
it); they refuse a zero trace and, for given matrices, an indefinite one (a Cholesky attempt on
Σ + c·ε·tr Σ·I). The checks need concrete values and are skipped under ``jax.jit`` tracing.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as _np

from . import matfun as _mf
from . import partition as _part
from ._validate import check_bool, check_choice, check_int, check_momentum, check_ndim, check_nonnegative, check_positive
from ._results import result_tuple
from ._xp import Array, compute_dtype, is_lazy, namespace, to_compute, to_numpy
from .framework import channel_param, check_param_shape, pack, run_backward, run_forward, unpack_backward
from .operation import Operation
from .recovery import affine_backward, affine_forward
from .registry import Example, Invariant, Residuals, method

__all__ = [
    "WhiteningResult",
    "WHITENING_METHODS",
    "ITERNORM_STABLE_T",
    "Whitening",
    "whitening_operation",
    "whitening_matrix",
    "batch_whitening",
    "decorrelated_batch_norm",
    "iter_norm",
    "whitening_coloring",
    "adain",
    "wct",
]

WHITENING_METHODS = _mf.METHODS
PARTITIONS = _part.KINDS
# Largest T for which IterNorm's uncoupled iteration stays within ~1e2·ε of the coupled one for
# κ(Σ) ≤ 1e6 (measured, float32 and float64; module docstring). Above it "iternorm" warns.
ITERNORM_STABLE_T = 6
#: what ``running_cov`` holds in :func:`decorrelated_batch_norm` and :func:`iter_norm` (``running=``)
RUNNING_STATES = ("covariance", "whitening_matrix")


@result_tuple
class WhiteningResult(NamedTuple):
    """Output and updated population statistics of a training-mode call given running statistics.

    A ``NamedTuple`` ``(output, running_mean, running_cov)``, not an array: ``result.output`` is the
    whitened array (the differentiable output); ``running_mean`` (C,) and ``running_cov`` (the
    per-group covariances; with ``running="whitening_matrix"`` of :func:`decorrelated_batch_norm` and
    :func:`iter_norm`, the per-group running whitening matrices Ŵ instead) are the updated statistics
    (no gradient). Arithmetic on the tuple or an array attribute (``result.sum()``) raises an error
    that says so."""

    output: Any
    running_mean: Any
    running_cov: Any


# --------------------------------------------------------------------------------------------------
# validation


def _check_method(fn, name):
    if name not in WHITENING_METHODS:
        raise ValueError(f"{fn}: method must be one of {', '.join(map(repr, WHITENING_METHODS))}; got {name!r}")
    return name


def _required(fn, **arrays):
    """A required array argument given as ``None``: TypeError naming it (before anything reads it)."""
    for name, a in arrays.items():
        if a is None:
            raise TypeError(f"{fn}: {name} must be an array; got None")


def _check_group_size(fn, group_size, features: int, what: str) -> int:
    if features < 1:  # an empty channel (or position) axis: nothing to whiten, no covariance
        raise ValueError(f"{fn}: expected at least 1 feature to whiten; got {what} = {features} (an empty input)")
    if group_size is None:
        return features
    if isinstance(group_size, bool) or not isinstance(group_size, (int, _np.integer)):
        raise TypeError(f"{fn}: group_size must be a positive integer or None; got {type(group_size).__name__} {group_size!r}")
    c = int(group_size)
    if c < 1:
        raise ValueError(f"{fn}: group_size must be a positive integer; got {c}")
    if c > features:
        raise ValueError(f"{fn}: group_size must not exceed the number of features ({what} = {features}); got {c}")
    if features % c:
        divs = [k for k in range(1, features + 1) if features % k == 0]
        raise ValueError(
            f"{fn}: group_size must divide the number of features ({what} = {features}; a smaller last group is "
            f"not supported, valid sizes: {divs}); got {c}"
        )
    return c


def _warn_unstable(fn, method, iterations):
    if method == "iternorm" and iterations > ITERNORM_STABLE_T:
        warnings.warn(
            f"{fn}: method='iternorm' with iterations={iterations} > {ITERNORM_STABLE_T}: IterNorm's uncoupled Newton "
            f"iteration amplifies rounding errors once converged (it diverges by T ≈ 11-16 on κ(Σ) ≥ 1e2); "
            f"method='newton_schulz' computes the same polynomial stably",
            RuntimeWarning,
            stacklevel=4,
        )


def _factor(fn, momentum, num_batches_tracked):
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(
            f"{fn}: momentum=None (cumulative average) needs num_batches_tracked, the number of batches seen "
            f"before this one; got num_batches_tracked=None"
        )
    return 1.0 / (check_int(fn, "num_batches_tracked", num_batches_tracked, minimum=0) + 1)


# --------------------------------------------------------------------------------------------------
# the checks of a covariance before it is factorized (concrete values only)


def _concrete(a):
    """A NumPy float64 copy of a small array, or ``None`` for a traced (jax.jit) value or a lazy (dask)
    array, which normref never computes: the checks below are then skipped, as under tracing."""
    if is_lazy(a):
        return None
    try:
        return _np.asarray(to_numpy(a), dtype=_np.float64)
    except Exception:  # jax tracers and friends: nothing to inspect
        return None


# what each source of a covariance is called in a message, and whether it is a Gram matrix
# Xc·Xcᵀ/m (positive semidefinite by construction) or a matrix the caller gave
_SOURCES = {
    "input": ("the covariance of a whitening group of input", True),
    "content": ("the covariance of a group of content", True),
    "style": ("the covariance of a group of style", True),
    "running_cov": ("running_cov + eps·I", False),
    "running_wm": ("running_cov (the running whitening matrix of running='whitening_matrix')", False),
    "cov": ("cov", False),
}


def _check_finite(fn, sigma, source, data=None):
    """Σ finite. ``data``: the samples Σ came from; when they are finite, Σ overflowed (|x|² above the
    dtype's max, e.g. |x| ≳ 1e19 in float32), and the message says so instead of "non-finite"."""
    s = _concrete(sigma)
    if s is not None and not _np.all(_np.isfinite(s)):
        arg = "running_cov" if source == "running_wm" else source  # the argument that holds the matrix
        dn = None if data is None else _concrete(data)
        if dn is not None and _np.all(_np.isfinite(dn)):
            dt = _dtype_name(sigma.dtype)
            top = float(_np.finfo(dt).max) if dt in ("float16", "float32", "float64") else float("nan")
            raise ValueError(
                f"{fn}: {arg} is finite (max |{arg}| = {float(_np.max(_np.abs(dn))):.3g}) but {_SOURCES[source][0]} "
                f"overflows {dt} (Σ = Xc·Xcᵀ/m needs |x − μ|² well below {top:.3g}); "
                + ("" if dt == "float64" else "pass float64 input or ") + f"rescale {arg}"
            )
        raise ValueError(
            f"{fn}: {arg} has non-finite values (NaN or inf): {_SOURCES[source][0]} is not finite; expected finite "
            f"{'values' if source in ('input', 'content', 'style') else 'entries'}"
        )


def _refuse(fn, source, eps, dtype_name, quantity, lo, hi, nu, d, m):
    """The ValueError for a numerically singular or indefinite Σ; ``quantity`` names what was found
    (``lo`` its value, ``None``: ``quantity`` is the whole finding), ν the noise level for the scale ``hi``."""
    noun, gram = _SOURCES[source]
    found = quantity if lo is None else f"its {quantity} is {lo:.3g}, not above"
    head = (f"{fn}: {noun} (eps={eps}) is not numerically positive definite: {found} "
            f"the {dtype_name} rounding noise {nu:.3g} (= 2·√d·ε·{hi:.3g}, d = {d})")
    if not gram:
        need = "positive definite" if eps == 0 else "positive semidefinite"
        return ValueError(f"{head}; {source} must be symmetric {need}")
    samples = f"m = {m} samples per covariance for groups of {d} features" if m else f"groups of {d} features"
    if eps == 0:
        return ValueError(f"{head}: the covariance is singular ({samples}, or collinear or constant features); "
                          f"pass eps > 0, well above {nu:.2g}")
    if eps <= nu:
        return ValueError(f"{head}: the covariance is singular ({samples}, or collinear features) and eps={eps} does "
                          f"not dominate the {dtype_name} rounding noise; pass eps well above {nu:.2g}, or float64 input")
    return ValueError(f"{head}: eps={eps} exceeds the noise estimate, but the covariance's own rounding (e.g. a large "
                      f"|mean|/std) pushed the eigenvalue below it; pass a larger eps or float64 input")


def _noise(d, e, scale):
    """ν = 2·√d·ε·scale: the rounding noise of the computed eigenvalues (pivots) of a d×d covariance
    whose largest eigenvalue (diagonal entry) is ``scale``. The eigensolver's backward error is
    p(d)·ε·‖Σ‖ with a modest p(d); measured in float32 on rank-deficient batch covariances (their
    computation included): ≤ 2.3·ε·λ_max at d = 5, ≤ 5.8·ε·λ_max at d = 64, so 2√d covers it."""
    return 2.0 * math.sqrt(d) * e * scale


def _check_spectrum(fn, xp, lam, eps, source, m):
    """zca/pca: every eigenvalue of Σ (+ εI) above ν = 2√d·ε_dtype·λ_max, per matrix."""
    lam_np = _concrete(lam)
    if lam_np is None:
        return
    d = lam_np.shape[-1]
    e = float(xp.finfo(lam.dtype).eps)
    lo = lam_np.min(axis=-1)
    hi = _np.abs(lam_np).max(axis=-1)
    bad = lo <= _noise(d, e, hi)
    if _np.any(bad):
        k = int(_np.argmin(_np.where(bad, lo / _np.where(hi > 0, hi, 1.0), _np.inf).ravel()))
        lo_k, hi_k = float(lo.ravel()[k]), float(hi.ravel()[k])
        raise _refuse(fn, source, eps, _dtype_name(lam.dtype), "smallest eigenvalue", lo_k, hi_k, _noise(d, e, hi_k), d, m)


def _check_pivots(fn, xp, chol, sigma, eps, source, m):
    """cholesky: every squared pivot L_ii² (a Schur complement of Σ) above ν = 2√d·ε_dtype·max diag Σ."""
    piv = _concrete(_mf._diag(xp, chol))
    dg = _concrete(_mf._diag(xp, sigma))
    if piv is None or dg is None:
        return
    d = piv.shape[-1]
    e = float(xp.finfo(chol.dtype).eps)
    hi = dg.max(axis=-1)
    p2 = _np.where(_np.isfinite(piv), piv * piv, -_np.inf).min(axis=-1)  # a NaN pivot (JAX): failed factorization
    bad = p2 <= _noise(d, e, hi)
    if _np.any(bad):
        k = int(_np.argmax(bad.ravel()))
        lo_k, hi_k = float(p2.ravel()[k]), float(hi.ravel()[k])
        raise _refuse(fn, source, eps, _dtype_name(chol.dtype), "smallest squared Cholesky pivot", lo_k, hi_k,
                      _noise(d, e, hi_k), d, m)


def _check_newton(fn, xp, sigma, eps, source, method):
    """Newton methods: tr Σ > 0; a given matrix must also be positive semidefinite (to rounding)."""
    t = _concrete(_mf.trace(xp, sigma))
    if t is None:
        return
    noun, gram = _SOURCES[source]
    if _np.any(t <= 0):
        tk = float(t.ravel()[int(_np.argmin(t.ravel()))])
        if gram or tk == 0:
            what = "every feature of a group is constant" if gram else "a zero matrix"
            raise ValueError(f"{fn}: {noun} has zero trace ({what}) and eps={eps}; the trace normalization of "
                             f"{method!r} needs tr Σ > 0 (pass eps > 0)")
        raise ValueError(f"{fn}: {noun} is not positive semidefinite: its trace is {tk:.3g} < 0; the Newton "
                         f"iterations of {method!r} need a positive semidefinite matrix")
    if gram:
        return
    # a given matrix: indefinite beyond rounding makes the iteration diverge or converge to a wrong
    # matrix. Cholesky of Σ + d·ε·tr Σ·I (d³/3 flops, less than one Newton step) succeeds for every
    # positive semidefinite Σ and fails for one with an eigenvalue below −d·ε·tr Σ.
    d = sigma.shape[-1]
    e = float(xp.finfo(sigma.dtype).eps)
    shift = (d * e) * _mf.trace(xp, sigma)[..., None, None] * _mf.eye_like(xp, sigma)
    try:
        ok = bool(_np.all(_np.isfinite(_concrete(xp.linalg.cholesky(_mf.sym(xp, sigma) + shift)))))
    except Exception as exc:  # numpy's / torch's LinAlgError
        if not ("LinAlg" in type(exc).__name__ or "positive" in str(exc).lower()):
            raise
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {noun} is not positive semidefinite (it has an eigenvalue below −d·ε·tr Σ: a "
                         f"Cholesky factorization of Σ + d·ε·tr Σ·I failed); the Newton iterations of {method!r} "
                         f"need a positive semidefinite matrix")


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _check_kept(fn, xp, lam, cutoff, eps, source, m):
    """zca with an eigenvalue cut-off: the eigenvalues that are kept (λ ≥ ``cutoff``) must be above the
    rounding noise ν = 2√d·ε_dtype·max|λ| (a kept noise eigenvalue would be amplified by λ^-1/2); the
    dropped ones may be anything, zero or slightly negative included. No kept eigenvalue at all is
    allowed (W = 0)."""
    lam_np = _concrete(lam)
    if lam_np is None:
        return
    d = lam_np.shape[-1]
    e = float(xp.finfo(lam.dtype).eps)
    hi = _np.abs(lam_np).max(axis=-1)
    kept = _np.where(lam_np >= cutoff, lam_np, _np.inf).min(axis=-1)
    bad = _np.isfinite(kept) & (kept <= _noise(d, e, hi))
    if _np.any(bad):
        k = int(_np.argmax(bad.ravel()))
        lo_k, hi_k = float(kept.ravel()[k]), float(hi.ravel()[k])
        raise ValueError(
            f"{fn}: {_SOURCES[source][0]} (eps={eps}) keeps an eigenvalue {lo_k:.3g} ≥ eig_cutoff={cutoff} that is "
            f"not above the {_dtype_name(lam.dtype)} rounding noise {_noise(d, e, hi_k):.3g} (= 2·√d·ε·{hi_k:.3g}, "
            f"d = {d}); pass an eig_cutoff well above it"
        )


# --------------------------------------------------------------------------------------------------
# a spectral function with an eigenvalue cut-off (Li et al.'s WCT): F(Σ) = Σ_{λ_k ≥ τ} λ_k^p·d_k·d_kᵀ
#
# Derivation. F(Σ) = D·f̃(Λ)·Dᵀ with the truncated scalar function f̃(λ) = λ^p for λ ≥ τ and 0 below
# τ. Away from λ = τ (where f̃ jumps), f̃ is smooth and the Daleckii–Krein formula applies as for any
# spectral function: dΣ = D·(K ∘ (Dᵀ·sym(dF)·D))·Dᵀ with the divided differences of f̃,
#   both kept (λi, λj ≥ τ):   K_ij = (λi^p − λj^p)/(λi − λj), in closed form without a division by
#                             λi − λj (p = −½: −1/(√λi·√λj·(√λi + √λj)); p = ½: 1/(√λi + √λj)),
#                             so exact at ties, as the untruncated backward;
#   both dropped:             K_ij = 0 (f̃ ≡ 0 there: the dropped components contribute nothing);
#   one kept (i), one dropped: K_ij = f(λi)/(λi − λj): NOT zero. Rotating Σ mixes the kept eigenspace
#                             with the dropped one, and the projection onto the kept space moves with
#                             it (at first order in Σ's off-diagonal entries); λi − λj > 0 here since
#                             λj < τ ≤ λi, but it is small when both lie close to τ: the gradient is
#                             that of the locally constant kept set and is large there, which is
#                             exact (F is that steep; at λ = τ itself it jumps and has no gradient).
# Ties across the cut-off cannot occur (one is ≥ τ, the other < τ); ties inside either set are exact.


def truncated_spectral_forward(xp, lam, d, p: float, cutoff: float):
    """F = D·diag(f̃(λ))·Dᵀ, f̃(λ) = λ^p for λ ≥ ``cutoff`` and 0 below (dropped eigenvalues may be ≤ 0)."""
    keep = lam >= cutoff
    safe = xp.where(keep, lam, xp.ones_like(lam))
    f = xp.where(keep, safe ** p, xp.zeros_like(lam))
    return xp.matmul(d * f[..., None, :], _mf.mT(xp, d))


def truncated_spectral_backward(xp, res, dw, p: float, cutoff: float):
    """dΣ (symmetric) of :func:`truncated_spectral_forward` for the cotangent dW (derivation above)."""
    lam, d = res[0], res[1]
    keep = lam >= cutoff
    safe = xp.where(keep, lam, xp.ones_like(lam))
    r = xp.sqrt(safe)
    ri, rj = r[..., :, None], r[..., None, :]
    both = keep[..., :, None] & keep[..., None, :]
    closed = -1.0 / (ri * rj * (ri + rj)) if p == -0.5 else 1.0 / (ri + rj)
    f = xp.where(keep, safe ** p, xp.zeros_like(lam))
    fi, fj = f[..., :, None], f[..., None, :]
    mixed = keep[..., :, None] != keep[..., None, :]
    gap = lam[..., :, None] - lam[..., None, :]
    gap = xp.where(mixed, gap, xp.ones_like(gap))
    k = xp.where(both, closed, xp.where(mixed, (fi - fj) / gap, xp.zeros_like(gap)))
    inner = xp.matmul(_mf.mT(xp, d), xp.matmul(_mf.sym(xp, dw), d))
    return xp.matmul(d, xp.matmul(k * inner, _mf.mT(xp, d)))


def _operator(fn, xp, sigma, method, iterations, eps, source, m=None, data=None, cutoff=None):
    """``(M, res)`` of :func:`normref.matfun.operator_forward` for Σ (+ εI already added), after the checks
    (``data``: the samples of a batch Σ, for the message of an overflowing one; ``cutoff``: zca with
    the eigenvalues below it dropped, ``res = (λ, D)``)."""
    _check_finite(fn, sigma, source, data)
    if cutoff is not None:
        eig = _mf.eigh(xp, sigma)
        _check_kept(fn, xp, eig[0], cutoff, eps, source, m)
        return truncated_spectral_forward(xp, eig[0], eig[1], -0.5, cutoff), eig
    if method in ("zca", "pca"):
        eig = _mf.eigh(xp, sigma)
        _check_spectrum(fn, xp, eig[0], eps, source, m)
        return _mf.operator_forward(xp, sigma, method, iterations, eig=eig)
    if method in _mf.ITERATIVE:
        _check_newton(fn, xp, sigma, eps, source, method)
        return _mf.operator_forward(xp, sigma, method, iterations)
    try:
        chol, res = _mf.operator_forward(xp, sigma, method, iterations)
    except Exception as exc:  # numpy/torch LinAlgError of a failed Cholesky
        if not ("LinAlg" in type(exc).__name__ or "positive" in str(exc).lower()):
            raise
        s = _concrete(sigma)
        d = sigma.shape[-1]
        e = float(xp.finfo(sigma.dtype).eps)
        hi = float(_np.max(_np.abs(_np.diagonal(s, axis1=-2, axis2=-1)))) if s is not None else float("nan")
        raise _refuse(fn, source, eps, _dtype_name(sigma.dtype), f"its Cholesky factorization failed "
                      f"({type(exc).__name__}: a pivot is not positive), i.e. a Schur complement is not above",
                      None, hi, _noise(d, e, hi), d, m) from None
    _check_pivots(fn, xp, chol, sigma, eps, source, m)
    return chol, res


# --------------------------------------------------------------------------------------------------
# the layout: the partition's view as (I, R1, G, c, R2), no physical transpose


class Layout(NamedTuple):
    """Where a partition's view keeps its independent statistics (I), samples (R1 before the features,
    R2 after them) and features (G groups of c). ``swap``: R1 is the longer sample axis, so it is moved
    last (a strided view) to be the contraction axis of the matrix products."""

    view: tuple
    i: int
    r1: int
    g: int
    c: int
    r2: int
    swap: bool

    @property
    def m(self) -> int:
        return self.r1 * self.r2

    def orient(self, xp, a):
        """(I, R1, G, c, R2) of a view-shaped array; with ``swap`` (I, R2, G, c, R1)."""
        a5 = xp.reshape(a, (self.i, self.r1, self.g, self.c, self.r2))
        return xp.permute_dims(a5, (0, 4, 2, 3, 1)) if self.swap else a5

    def unorient(self, xp, a5):
        if self.swap:
            a5 = xp.permute_dims(a5, (0, 4, 2, 3, 1))
        return xp.reshape(a5, self.view)


def layout(view_shape, reduce_axes, feature_axes, group_size: int) -> Layout:
    """The :class:`Layout` of a partition's view (shape, reduce axes) with the given feature axes.

    The partitions of :mod:`normref.partition` lay their axes out as [independent] [reduced] [features]
    [reduced]: I gathers the leading non-reduced axes, R1 the reduced axes before the features, R2 the
    reduced axes after them (no features: a single feature at the end)."""
    view_shape = tuple(int(s) for s in view_shape)
    nd = len(view_shape)
    red = set(reduce_axes)
    fa = tuple(sorted(feature_axes))
    f0, f1 = (fa[0], fa[-1] + 1) if fa else (nd, nd)
    if fa != tuple(range(f0, f1)) or red & set(fa):
        raise AssertionError(f"whitening layout: feature axes {fa} must be contiguous and not reduced")
    before = list(range(f0))
    n_ind = 0
    while n_ind < len(before) and before[n_ind] not in red:
        n_ind += 1
    if any(a not in red for a in before[n_ind:]) or any(a not in red for a in range(f1, nd)):
        raise AssertionError(f"whitening layout: view {view_shape}, reduce axes {tuple(reduce_axes)}, features {fa}")
    size = lambda axes: math.prod([view_shape[a] for a in axes])  # noqa: E731  (a list: torch.compile traces it)
    i, r1, f, r2 = size(before[:n_ind]), size(before[n_ind:]), size(fa), size(range(f1, nd))
    return Layout(view_shape, i, r1, f // group_size, group_size, r2, r1 > r2)


def _sample_mean(xp, t):
    """The mean over both sample axes (1 and 4) of an oriented array (equal counts: the mean of means)."""
    return xp.mean(xp.mean(t, axis=4, keepdims=True), axis=1, keepdims=True)


def _covariance(xp, xc, m):
    """Σ_{R1} Xc·Xcᵀ/m per group, (I, G, c, c): one batched matrix product, summed over axis 1."""
    return xp.sum(xp.matmul(xc, _mf.mT(xp, xc)), axis=1) / m


# --------------------------------------------------------------------------------------------------
# synchronized batch whitening: the cross-rank parts (normref.distributed)


def _sample_sum(xp, t):
    """Σ over both sample axes (1 and 4) of an oriented array, kept as (I, 1, G, c, 1)."""
    return xp.sum(xp.sum(t, axis=4, keepdims=True), axis=1, keepdims=True)


def _sync_moments(fn, xp, x5, lay: Layout, sync):
    """Global (N, μ, Σ without ε) of the samples of every rank: ONE ``all_gather`` per call.

    Each rank packs [n_i, μ_i (I·G·c), upper triangle of M2_i = Σ (x − μ_i)(x − μ_i)ᵀ (I·G·c(c+1)/2)]
    (a rank with no samples sends n_i = 0, μ_i = 0, M2_i = 0); Chan's pooled form
    (:func:`normref.distributed.combine_moments`) gives N = Σ n_i, μ = Σ n_i·μ_i/N and
    M2 = Σ M2_i + Σ n_i·(μ_i − μ)(μ_i − μ)ᵀ, the same numbers in the same order on every rank, so
    every rank gets the same Σ = M2/N and then the same whitening matrix.

    A float32 input on a library with float64 sends and combines the moments in float64 (as
    :func:`normref.operation.synced_moments` does), after the corrected two-pass step
    μ_i = μ̂_i + r, M2_i = Σ(x − μ̂_i)(x − μ̂_i)ᵀ − n_i·r·rᵀ with r = mean(x − μ̂_i), so that the
    between-rank term does not inherit the float32 rounding of μ̂_i."""
    from .distributed import combine_moments
    from .operation import _wide_dtype

    i, g, c = lay.i, lay.g, lay.c
    m = lay.m
    dt = x5.dtype
    wide = _wide_dtype(xp, dt)
    mu_i = _sample_sum(xp, x5) / max(m, 1)  # (I, 1, G, c, 1); zeros on an empty rank
    xc = x5 - mu_i
    m2_i = xp.sum(xp.matmul(xc, _mf.mT(xp, xc)), axis=1)  # (I, G, c, c)
    if wide != dt:
        r = xp.astype(_sample_sum(xp, xc) / max(m, 1), wide)  # the rounding of μ̂_i
        mu_i = xp.astype(mu_i, wide) + r
        r = xp.reshape(r, (i, g, c, 1))
        m2_i = xp.astype(m2_i, wide) - float(m) * xp.matmul(r, _mf.mT(xp, r))
    n_i = xp.full((1,), float(m), dtype=wide, device=_device(x5))
    k = i * g * c
    packed = xp.concat([n_i, xp.reshape(mu_i, (k,)), xp.reshape(_mf.triu_pack(xp, m2_i), (-1,))])
    allv = sync.all_gather(packed)  # (W, 1 + k + I·G·c(c+1)/2)
    w = allv.shape[0]
    n_all = allv[:, 0]
    mu_all = xp.reshape(allv[:, 1 : 1 + k], (w, i, g, c))
    m2_all = _mf.triu_unpack(xp, xp.reshape(allv[:, 1 + k :], (w, i, g, c * (c + 1) // 2)), c)
    n, mu, m2 = combine_moments(xp, n_all, mu_all, m2_all)
    nc = _concrete(n)
    if nc is not None and float(nc) < 2:
        raise ValueError(
            f"{fn}: expected more than 1 sample per covariance when training; the synchronized batch of every "
            f"rank together gives {int(float(nc))} (this rank has {m})"
        )
    cov = m2 / n
    if wide != dt:
        n, mu, cov = xp.astype(n, dt), xp.astype(mu, dt), xp.astype(cov, dt)
    return n, xp.reshape(mu, (i, 1, g, c, 1)), cov


def _device(a):
    from ._xp import device_of

    try:
        return device_of(a)
    except Exception:  # a traced value without a device
        return None


# --------------------------------------------------------------------------------------------------
# the whitening NOP


@dataclasses.dataclass(frozen=True)
class Whitening(Operation):
    """The whitening operation (NOP) on a partition's view, for :func:`normref.framework.run_forward`.

    ``forward(xp, x, axes, mean=None, cov=None)``: batch statistics, or (``population``) the given μ̂
    (1, 1, G, c, 1) and Σ̂ (1, G, c, c) as constants. Residuals ``(x, μ, M, *res)``: the input view
    (referenced, not copied), the mean, W (Cholesky: L) and the matrix function's residuals; x̂ is
    recomputed by :meth:`xhat` where a recovery's backward needs it. Build it with
    :func:`whitening_operation`, which validates the group size against the partition.

    ``sync`` (a :class:`normref.distributed.Reducer`, batch statistics only): the samples are split
    across ranks. The forward gathers each rank's [n, μ, triu(M2)] once and pools them (Chan), so
    μ, Σ and W are the global batch's on every rank; the residuals then hold the global count N
    after W: ``(x, μ, M, N, *res)``. The backward all-reduces, once, the upper triangles of the
    per-rank dΣ_i = matfun backward(Σ_local G·Xcᵀ) (the matfun backward is linear in dW, so
    Σ_i dΣ_i is the global dΣ) with the per-rank Σ G: d(d+1)/2 + d values per group.
    """

    method: str = "zca"
    group_size: int = 1
    iterations: int = 5
    eps: float = 1e-5
    reduce_axes: tuple = ()
    feature_axes: tuple = ()
    population: bool = False
    fn: str = "whitening"
    sync: Any = None
    source: str = "input"  # the argument the samples come from, for messages ("content" in wct)
    # conventions (see the presets): Σ = a·Xc·Xcᵀ/m + ε·I with a = m/(m − ddof)·(1 − ε if shrink else 1)
    # (ddof = 1: the unbiased covariance; shrink: Siarohin et al.'s (1 − ε)·Σ + ε·I, also applied to a
    # population covariance); cutoff (zca only): eigenvalues of Σ below it are dropped (Li et al.'s WCT);
    # given_matrix (population only): the ``cov`` given to forward is the whitening matrix W itself
    # (a running W, the DBN/IterNorm authors' rule), applied as X̂ = W·Xc with no factorization.
    ddof: int = 0
    shrink: bool = False
    cutoff: float | None = None
    given_matrix: bool = False
    name = "whitening"

    def cov_factor(self, m):
        """a of Σ = a·Xc·Xcᵀ/m + ε·I for ``m`` samples (an int, or the synchronized count array)."""
        a = 1.0 if self.ddof == 0 else m / (m - self.ddof)
        return a * (1.0 - self.eps) if self.shrink else a

    def layout(self, view_shape) -> Layout:
        return layout(view_shape, self.reduce_axes, self.feature_axes, self.group_size)

    def forward(self, xp, x, axes, mean=None, cov=None):
        lay = self.layout(x.shape)
        x5 = lay.orient(xp, x)
        n = None  # the global sample count of a synchronized call (an array: it comes from the ranks)
        m: int | None = lay.m
        if self.population:
            mu = mean
            source = "running_cov"
        elif self.sync is not None:
            n, mu, cov = _sync_moments(self.fn, xp, x5, lay, self.sync)
            nc = _concrete(n)
            m = None if nc is None else int(float(nc))
            source = self.source
        else:
            mu = _sample_mean(xp, x5)
            cov = _covariance(xp, x5 - mu, lay.m)
            source = self.source
        xc = x5 - mu
        if self.population and self.given_matrix:  # a running W: applied as it is (a constant)
            _check_finite(self.fn, cov, "running_wm")
            y5 = xp.matmul(cov[:, None, ...], xc)
            return lay.unorient(xp, y5), (x, mu, cov), {"mean": mu, "cov": cov}
        if self.population:
            a = (1.0 - self.eps) if self.shrink else 1.0  # a population covariance is already unbiased
        else:
            a = self.cov_factor(m if n is None else n) if (self.ddof or self.shrink) else 1.0
        sigma = (cov if isinstance(a, float) and a == 1.0 else a * cov) + self.eps * _mf.eye_like(xp, cov)
        op, wres = _operator(self.fn, xp, sigma, self.method, self.iterations, self.eps, source, m,
                             data=None if self.population else x5, cutoff=self.cutoff)
        y5 = _mf.apply_whitening(xp, self.method, op[:, None, ...], xc)
        stats = {"mean": mu, "cov": cov, "matrix": op}
        if self.population:
            return lay.unorient(xp, y5), (x, mu, op), stats
        if n is None:
            return lay.unorient(xp, y5), (x, mu, op) + tuple(wres), stats
        return lay.unorient(xp, y5), (x, mu, op, n) + tuple(wres), dict(stats, count=n)

    def xhat(self, xp, res):
        x, mu, op = res[:3]
        lay = self.layout(x.shape)
        return lay.unorient(xp, _mf.apply_whitening(xp, self.method, op[:, None, ...], lay.orient(xp, x) - mu))

    def backward(self, xp, res, axes, g):
        """dX = dXc − mean(dXc), dXc = Wᵀ·G + (2/m)·dΣ·Xc, dΣ = matfun backward of dW = Σ G·Xcᵀ."""
        x, mu, op = res[:3]
        synced = self.sync is not None and not self.population
        wres = res[4:] if synced else res[3:]
        lay = self.layout(x.shape)
        g5 = lay.orient(xp, g)
        dxc = _mf.apply_whitening_transpose(xp, self.method, op[:, None, ...], g5)
        if self.population:  # μ̂ and W are constants (survey Eqn 16)
            return lay.unorient(xp, dxc)
        xc = lay.orient(xp, x) - mu
        dw = xp.sum(xp.matmul(g5, _mf.mT(xp, xc)), axis=1)
        if self.cutoff is None:
            ds = _mf.whitening_matrix_backward(xp, wres, dw, self.method)  # symmetric
        else:  # the truncated ZCA matrix (Li et al.): divided differences of the truncated f
            ds = truncated_spectral_backward(xp, wres, dw, -0.5, self.cutoff)
        # Σ = a·Xc·Xcᵀ/m + ε·I: ∂L/∂Xc gains 2·(a/m)·dΣ·Xc (a = 1 for the biased Σ of Eqn 23)
        if not synced:
            a = self.cov_factor(lay.m)
            dxc = dxc + (2.0 * a / lay.m) * xp.matmul(ds[:, None, ...], xc)
            return lay.unorient(xp, dxc - _sample_mean(xp, dxc))
        # synchronized: dΣ (linear in dW) and Σ G are sums over the global batch — ONE all-reduce of
        # [triu(dΣ_i), Σ_i G] per rank. mean(dXc) = Wᵀ·mean(G) + (2/N)·dΣ·mean(Xc), and the global
        # mean(Xc) is 0 (Xc is centred by the global μ), so only Σ G is needed for it.
        n = res[3]
        i, gg, c = lay.i, lay.g, lay.c
        kt = i * gg * c * (c + 1) // 2
        tot = self.sync.all_reduce_sum(xp.concat([xp.reshape(_mf.triu_pack(xp, ds), (kt,)),
                                                  xp.reshape(_sample_sum(xp, g5), (i * gg * c,))]))
        ds = _mf.triu_unpack(xp, xp.reshape(tot[:kt], (i, gg, c * (c + 1) // 2)), c)
        gbar = xp.reshape(tot[kt:], (i, 1, gg, c, 1)) / n
        dxc = dxc + (2.0 * self.cov_factor(n) / n) * xp.matmul(ds[:, None, ...], xc)
        return lay.unorient(xp, dxc - _mf.apply_whitening_transpose(xp, self.method, op[:, None, ...], gbar))


def _features(part: _part.Partition, shape) -> tuple[int, str]:
    """(number of features, how the error messages call it) for a partition of ``shape``."""
    vs = part.view_shape(shape)
    fa = part.feature_axes(shape)
    f = math.prod([vs[a] for a in fa])  # a list: torch.compile traces it (not a generator)
    if part.kind in ("group", "batch_group"):
        return f, "num_groups"
    if part.kind == "position":
        return f, "the number of positions, prod(input.shape[2:])"
    if part.kind == "layer":
        return f, (f"input.shape[{fa[0]}]" if fa else "a single row (every axis is normalized)")
    return f, "input.shape[1]"


def whitening_operation(fn: str, part: _part.Partition, shape: Sequence[int], method: str = "zca", group_size: int | None = None,
                        iterations: int = 5, eps: float = 1e-5, population: bool = False,
                        sync: Any = None) -> Whitening:
    """The :class:`Whitening` operation of ``method`` for ``part`` on inputs of ``shape``.

    It validates ``method``, ``group_size`` (a divisor of the partition's number of features) and
    ``iterations``; ``fn`` names the public function in error messages.

    Parameters
    ----------
    fn : str
        The public function's name, for error messages.
    part : Partition
        The partition (NAP) whose features are decorrelated.
    shape : sequence of int
        The input's shape.
    method : str, default "zca"
        ``"zca"``, ``"pca"``, ``"cholesky"``, ``"iternorm"`` or ``"newton_schulz"``.
    group_size : int or None, default None
        Features per whitening group (a divisor of the partition's number of features); ``None``: all.
    iterations : int, default 5
        T, the Newton steps of ``"iternorm"``/``"newton_schulz"``.
    eps : float, default 1e-5
        ε, added to the covariance (Σ + εI).
    population : bool, default False
        Whiten with given (population) statistics, constants of the backward.
    sync : reducer or None, default None
        A reducer (see :class:`Whitening`), accepted for the partitions whose samples include the batch
        axis (``"batch"``, ``"batch_group"``) and refused (``ValueError``) for every other, whose
        statistics never span ranks.

    Returns
    -------
    op : Whitening
        The operation (NOP), with its forward and analytic backward.

    Notes
    -----
    Survey §5.1.2 (the whitening operation, Eqn 23).

    References
    ----------
    .. [1] L. Huang, D. Yang, B. Lang and J. Deng, "Decorrelated Batch Normalization", CVPR 2018.
    """
    sync = _check_sync(fn, sync, part.kind)
    method = _check_method(fn, method)
    iterations = _mf.check_iterations(fn, "iterations", iterations, minimum=1)
    eps = check_nonnegative(fn, "eps", eps)
    feats, what = _features(part, shape)
    c = _check_group_size(fn, group_size, feats, what)
    _warn_unstable(fn, method, iterations)
    return Whitening(method, c, iterations, eps, tuple(part.axes(shape)), tuple(part.feature_axes(shape)),
                     population, fn, sync)


#: the partitions whose statistics run over the batch axis: the only ones a reducer can synchronize
SYNC_PARTITIONS = ("batch", "batch_group")


def _check_sync(fn, sync, kind):
    """``sync`` is ``None`` or a reducer, and only for a partition whose samples include the batch axis."""
    from .distributed import check_reducer

    sync = check_reducer(fn, sync)
    if sync is not None and kind not in SYNC_PARTITIONS:
        raise ValueError(
            f"{fn}: sync applies to the partitions whose statistics run over the batch axis "
            f"({', '.join(map(repr, SYNC_PARTITIONS))}); partition={kind!r} takes each sample's own statistics, "
            f"which never span ranks: pass sync=None"
        )
    return sync


# --------------------------------------------------------------------------------------------------
# the coloring recovery (NRR): X̃ = Γ_g·X̂_g per group, on the whitening layout


def _coloring_forward(xp, lay: Layout, xhat_v, gam):
    return lay.unorient(xp, xp.matmul(gam[None, None, ...], lay.orient(xp, xhat_v)))


def _coloring_backward(xp, lay: Layout, xhat_v, gam, g_v):
    """dΓ_g = Σ G_g·X̂_gᵀ (over the independent and sample axes), dX̂_g = Γ_gᵀ·G_g."""
    g5 = lay.orient(xp, g_v)
    dgam = xp.sum(xp.matmul(g5, _mf.mT(xp, lay.orient(xp, xhat_v))), axis=(0, 1))
    return lay.unorient(xp, xp.matmul(_mf.mT(xp, gam)[None, None, ...], g5)), dgam


# --------------------------------------------------------------------------------------------------
# the presets' shared body


def _out(xp, y, dtype):
    return y if y.dtype == dtype else xp.astype(y, dtype)


def _ema(xp, running, stat, f):
    new = (1.0 - f) * to_compute(xp, running, stat.dtype) + f * stat
    return _out(xp, new, running.dtype)


def _partition(fn, kind, num_groups, batch_groups, normalized_ndim) -> _part.Partition:
    check_choice(fn, "partition", kind, PARTITIONS)
    # every argument is checked, also where this partition does not use it (a typo is not ignored)
    if num_groups is not None:
        num_groups = check_int(fn, "num_groups", num_groups)
    batch_groups = check_int(fn, "batch_groups", batch_groups)
    normalized_ndim = check_int(fn, "normalized_ndim", normalized_ndim)
    if kind in ("group", "batch_group"):
        if num_groups is None:
            raise ValueError(f"{fn}: partition={kind!r} needs num_groups (the number of channel blocks); got None")
    if kind == "group":
        return _part.Partition("group", num_groups=num_groups)
    if kind == "batch_group":
        return _part.Partition("batch_group", num_groups=num_groups,
                               batch_groups=check_int(fn, "batch_groups", batch_groups))
    if kind == "layer":
        return _part.Partition("layer", normalized_ndim=check_int(fn, "normalized_ndim", normalized_ndim))
    return _part.Partition(kind)


@dataclasses.dataclass(frozen=True)
class _ColorPlan:
    """Static half of a whitening-coloring call: partition, operation, shapes (hashable)."""

    part: Any
    op: Any
    shape: tuple
    n_op: int
    wshape: Any
    bshape: Any


def _whitening(
    fn, input, running_mean, running_cov, weight, bias, training, momentum, eps, method, group_size,
    iterations, partition, num_groups, num_batches_tracked, recovery, batch_groups=1, normalized_ndim=1, sync=None,
    running="covariance", shrinkage=False,
):
    """The shared body of every whitening preset: validation, then NAP → NOP → NRR by the framework.

    ``running``: the population state kept in ``running_cov`` (``"covariance"``, or ``"whitening_matrix"``:
    the running W of the DBN/IterNorm authors); ``shrinkage``: Siarohin et al.'s unbiased, shrunk
    Σ = (1 − ε)·Xc·Xcᵀ/(m − 1) + ε·I (training) and (1 − ε)·running_cov + ε·I (inference)."""
    _required(fn, input=input)
    xp = namespace(fn, input=input, running_mean=running_mean, running_cov=running_cov, weight=weight, bias=bias)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    momentum = check_momentum(fn, momentum)
    if num_batches_tracked is not None:  # checked even where the momentum makes it unused
        check_int(fn, "num_batches_tracked", num_batches_tracked, minimum=0)
    part = _partition(fn, partition, num_groups, batch_groups, normalized_ndim)
    shape = tuple(input.shape)
    part.validate(fn, shape)
    op = whitening_operation(fn, part, shape, method, group_size, iterations, eps, sync=sync)
    if shrinkage:
        if op.eps > 1.0:
            raise ValueError(f"{fn}: with shrinkage=True, eps is the shrinkage weight of (1 − eps)·Σ + eps·I and must "
                             f"lie in [0, 1]; got eps={op.eps!r}")
        op = dataclasses.replace(op, ddof=1, shrink=True)
    lay = op.layout(part.view_shape(shape))
    c = shape[1]
    g, gs, batch = lay.g, lay.c, partition == "batch"
    if (running_mean is None) != (running_cov is None):
        given = "running_mean" if running_cov is None else "running_cov"
        missing = "running_cov" if running_cov is None else "running_mean"
        raise ValueError(f"{fn}: {given} and {missing} go together; got {given} but {missing}=None")
    if running_mean is not None and not batch:
        raise ValueError(f"{fn}: running statistics are kept for partition='batch' only; got partition={partition!r}")
    check_param_shape(fn, "running_mean", running_mean, (c,), f"one value per channel, input.shape[1] = {c}")
    check_param_shape(fn, "running_cov", running_cov, (g, gs, gs), f"(groups, group_size, group_size) = ({g}, {gs}, {gs})")
    if recovery == "coloring":
        check_param_shape(fn, "weight", weight, (g, gs, gs), f"the coloring matrices, (groups, group_size, group_size) = ({g}, {gs}, {gs})")
    else:
        check_param_shape(fn, "weight", weight, (c,), f"one value per channel, input.shape[1] = {c}")
    check_param_shape(fn, "bias", bias, (c,), f"one value per channel, input.shape[1] = {c}")
    m = lay.m
    # only the batch partition has a population to estimate; every other partition always whitens
    # with each call's own statistics (as instance_norm does by default)
    training = check_bool(fn, "training", training) or not batch
    if training:
        # synchronized: this rank may hold 0 or 1 samples; the global count is checked after the gather
        if m < 2 and sync is None:
            raise ValueError(
                f"{fn}: expected more than 1 sample per covariance when training ({partition} partition of input shape "
                f"{shape} gives {m})"
            )
        f = _factor(fn, momentum, num_batches_tracked) if running_mean is not None else None
    elif running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_cov are required when training=False; got None")

    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    nd = len(shape)
    op_arrays = {}
    if not training:
        op = dataclasses.replace(op, population=True, given_matrix=running == "whitening_matrix")
        op_arrays = dict(mean=xp.reshape(to_compute(xp, running_mean, cd), (1, 1, g, gs, 1)),
                         cov=xp.reshape(to_compute(xp, running_cov, cd), (1, g, gs, gs)))
    beta_b = channel_param(xp, to_compute(xp, bias, cd), nd)
    if recovery == "coloring":
        gam = None if weight is None else to_compute(xp, weight, cd)
        xhat, op_res, stats = run_forward(xp, x, part, op, **op_arrays)
        y = xhat if gam is None else part.unview(xp, _coloring_forward(xp, lay, part.view(xp, xhat), gam), shape)
        y = affine_forward(xp, y, None, beta_b)
        plan = _ColorPlan(part, op, shape, len(op_res), None if weight is None else tuple(weight.shape),
                          None if bias is None else tuple(bias.shape))
        res = Residuals(tuple(op_res) + (gam,), plan)
    else:
        gamma_b = channel_param(xp, to_compute(xp, weight, cd), nd)
        y, op_res, stats = run_forward(xp, x, part, op, gamma_b, beta_b, **op_arrays)
        res = pack(part, op, x, op_res, gamma_b, beta_b, extra=(
            None if weight is None else tuple(weight.shape), None if bias is None else tuple(bias.shape)))
    y = _out(xp, y, input.dtype)
    if training and running_mean is not None:
        rm = _ema(xp, running_mean, xp.reshape(stats["mean"], (c,)), f)
        m = stats.get("count", m)  # synchronized: the global batch's count
        if running == "whitening_matrix":  # the authors' rule: an EMA of the batch's W (Σ biased + εI)
            rc = _ema(xp, running_cov, xp.reshape(stats["matrix"], (g, gs, gs)), f)
        else:
            rc = _ema(xp, running_cov, xp.reshape(stats["cov"], (g, gs, gs)) * (m / (m - 1)), f)
        return WhiteningResult(y, rm, rc), res
    return y, res


def _whitening_backward(res: Residuals, g):
    """(dinput, None, None, dweight, dbias): the recovery's backward, then the whitening's."""
    xp = namespace("whitening.backward", cotangent=g)
    plan = res.static
    if not isinstance(plan, _ColorPlan):  # affine recovery: the framework's composed backward
        dx, dweight, dbias, _ = unpack_backward(xp, res, g)
        wshape, bshape = plan.extra
        return (dx, None, None, None if dweight is None else xp.reshape(dweight, wshape),
                None if dbias is None else xp.reshape(dbias, bshape))
    op_res = res.arrays[: plan.n_op]
    gam = res.arrays[plan.n_op]
    g = to_compute(xp, g, op_res[0].dtype)
    shape, part, op = plan.shape, plan.part, plan.op
    bshape_b = None if plan.bshape is None else (1, plan.bshape[0]) + (1,) * (len(shape) - 2)
    g, _, dbias = affine_backward(xp, None, None, bshape_b, g)  # β: dβ = Σ g over all but the channel axis
    dweight = None
    if gam is not None:
        lay = op.layout(part.view_shape(shape))
        dxhat_v, dweight = _coloring_backward(xp, lay, op.xhat(xp, op_res), gam, part.view(xp, g))
        g = part.unview(xp, dxhat_v, shape)
    dx, _, _ = run_backward(xp, part, op, shape, op_res, None, None, g)
    return dx, None, None, dweight, None if dbias is None else xp.reshape(dbias, plan.bshape)


# --------------------------------------------------------------------------------------------------
# examples and invariants (NumPy float64 references; the conformance suite converts the examples)


def _np_matrix(method, sigma, iterations=5):
    """The whitening matrix in NumPy float64 (the reference the invariants compare against)."""
    import array_api_compat.numpy as xnp

    return _np.asarray(_mf.whitening_matrix_forward(xnp, _np.asarray(sigma, _np.float64), method, iterations)[0])


def _args(m, args, kwargs):
    return m.bind(*args, **kwargs).arguments


def _survey_groups(x, partition="batch", num_groups=None, batch_groups=1, normalized_ndim=1, group_size=None):
    """The groups of rows of the survey's matrix Π(X) (Eqn 20) of a NumPy array, (K, c, columns), built
    with explicit transposes (an evaluation independent of :class:`Layout`), and its inverse map."""
    x = _np.asarray(x, _np.float64)
    shape = x.shape
    n, ch = shape[0], shape[1]
    p = int(_np.prod(shape[2:], dtype=int))
    if partition == "batch":
        mat = _np.moveaxis(x, 1, 0).reshape(ch, -1)
        back = lambda r: _np.moveaxis(r.reshape((ch, n) + shape[2:]), 0, 1)  # noqa: E731
        feats = ch
    elif partition in ("instance", "group"):
        rows = n * (ch if partition == "instance" else num_groups)
        mat = x.reshape(rows, -1)
        back = lambda r: r.reshape(shape)  # noqa: E731
        feats = ch if partition == "instance" else num_groups
    elif partition == "position":
        mat = x.reshape(n, ch, p).transpose(0, 2, 1).reshape(n * p, ch)
        back = lambda r: r.reshape(n, p, ch).transpose(0, 2, 1).reshape(shape)  # noqa: E731
        feats = p
    elif partition == "layer":
        lead = shape[: len(shape) - normalized_ndim]
        mat = x.reshape(int(_np.prod(lead, dtype=int)), -1)
        back = lambda r: r.reshape(shape)  # noqa: E731
        feats = lead[-1] if lead else 1
    elif partition == "batch_group":
        gb, gg = batch_groups, num_groups
        v = x.reshape(gb, n // gb, gg, -1).transpose(0, 2, 1, 3)
        mat = v.reshape(gb * gg, -1)
        back = lambda r: r.reshape(v.shape).transpose(0, 2, 1, 3).reshape(shape)  # noqa: E731
        feats = gg
    else:
        raise ValueError(partition)
    c = group_size or feats
    groups = mat.reshape(-1, c, mat.shape[1])
    return groups, (lambda gr: back(gr.reshape(mat.shape)))


def _group_cov(groups, eps=0.0):
    xc = groups - groups.mean(axis=-1, keepdims=True)
    return xc @ _np.swapaxes(xc, -1, -2) / groups.shape[-1] + eps * _np.eye(groups.shape[1])


def _kappa(sig) -> float:
    """The largest κ = λ_max/λ_min of a stack of symmetric positive definite matrices (≥ 1)."""
    lam = _np.linalg.eigvalsh(_np.asarray(sig, _np.float64))
    return float(max(1.0, _np.max(lam[..., -1] / lam[..., 0])))


def _call_cond(x, eps=1e-5, **part):
    """κ(Σ + εI) of the worst group of an example: the conditioning factor of its tolerances."""
    return _kappa(_group_cov(_survey_groups(x, **part)[0], eps))


_PART_KEYS = ("partition", "num_groups", "batch_groups", "normalized_ndim", "group_size")


def _whiteness_invariant() -> Invariant:
    """Invariant: for zca, pca and cholesky, W·Σ·Wᵀ = I, i.e. the output covariance is I − ε·W·Wᵀ
    (Σ includes ε·I), on every partition, with Σ and W recomputed in float64 from the input through
    the survey's matrix Π(X) (no recovery; batch statistics)."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        meth = a.get("method", "zca")
        part = {k: a[k] for k in _PART_KEYS if k in a}
        if meth not in ("zca", "pca", "cholesky") or a.get("weight") is not None or a.get("bias") is not None:
            return None
        if part.get("partition", "batch") == "batch" and not a["training"]:
            return None
        xg, _ = _survey_groups(to_numpy(a["input"]), **part)
        yg, _ = _survey_groups(to_numpy(m.primary(out)), **part)
        sig = _group_cov(xg, a["eps"])
        wm = _np_matrix(meth, sig)
        cy = yg @ _np.swapaxes(yg, -1, -2) / yg.shape[-1]
        return float(_np.max(_np.abs(cy + a["eps"] * wm @ _np.swapaxes(wm, -1, -2) - _np.eye(sig.shape[-1]))))

    return Invariant("whiteness: cov(X̂) = I − ε·W·Wᵀ (W·Σ·Wᵀ = I)", check, scale=256.0)


def _ex_batch_whitening(rng):
    x = rng.standard_normal((8, 4, 3, 2)) + 0.5
    x[:, 1] += 0.7 * x[:, 0]  # correlated channels
    c = 4
    k = _call_cond(x)
    for meth in WHITENING_METHODS:
        yield Example((x,), dict(training=True, method=meth), label=f"{meth}, one group of 4", cond=k)
        yield Example((x,), dict(training=True, method=meth, group_size=2), label=f"{meth}, groups of 2",
                      cond=_call_cond(x, group_size=2))
    rm = rng.standard_normal(c) * 0.2
    a = rng.standard_normal((2, 2, 2))
    rc = a @ _np.swapaxes(a, -1, -2) + _np.eye(2)
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    yield Example((x, rm, rc, w, b), dict(training=True, method="zca", group_size=2, momentum=0.3),
                  label="zca training, running update, affine", cond=_call_cond(x, group_size=2))
    yield Example((x, rm, rc, w, b), dict(training=False, method="cholesky", group_size=2),
                  label="cholesky inference (population statistics)", cond=_kappa(rc + 1e-5 * _np.eye(2)))
    x2 = rng.standard_normal((3, 4, 12))
    for meth, part in (("zca", dict(partition="instance")),
                       ("iternorm", dict(partition="group", num_groups=2)),
                       ("cholesky", dict(partition="position")),
                       ("pca", dict(partition="layer", normalized_ndim=1, group_size=2)),
                       ("newton_schulz", dict(partition="batch_group", num_groups=4, batch_groups=1))):
        kw = dict(training=True, method=meth, **part)
        if meth == "iternorm":
            kw["iterations"] = 3
        xin = x2 if part["partition"] != "position" else x2.reshape(3, 4, 3, 4)[:, :, :, :2]
        kpart = {k: v for k, v in part.items()}
        yield Example((xin,), kw, label=f"{meth}, {part['partition']} partition", cond=_call_cond(xin, **kpart))


@method(
    channels=_part.layout_params,
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.1.2 Eqn 23 (whitening); population statistics §4 Eqn 16, §5.3.2",
    paper="Huang et al., Decorrelated Batch Normalization, CVPR 2018; Huang et al., Iterative Normalization, CVPR 2019; "
          "Siarohin et al., Whitening and Coloring Batch Transform for GANs, ICLR 2019",
    examples=_ex_batch_whitening,
    invariants=(_whiteness_invariant(),),
)
def batch_whitening(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    method: str = "zca",
    group_size: int | None = None,
    iterations: int = 5,
    *,
    partition: str = "batch",
    num_groups: int | None = None,
    batch_groups: int = 1,
    normalized_ndim: int = 1,
    num_batches_tracked: int | None = None,
    sync: Any = None,
) -> Array | WhiteningResult:
    """Batch whitening: X̂ = W(Σ)·(X − μ) per group of ``group_size`` features, y = γ·X̂ + β per channel.

    Σ = Xc·Xcᵀ/m + ε·I (survey Eqn 23); W by ``method`` (``"zca"``, ``"pca"``, ``"cholesky"``,
    ``"iternorm"``, ``"newton_schulz"``; the last two with ``iterations`` = T); ``partition`` any of
    the framework's (``"batch"`` by default, ``"instance"``, ``"group"`` and ``"batch_group"`` with
    ``num_groups`` (and ``batch_groups``), ``"position"``, ``"layer"`` with ``normalized_ndim``; the
    module docstring says what the features and samples of each are; the same operation as
    ``normalize(input, weight, bias, partition=..., operation=method, group_size=...)``). Running
    statistics (batch partition): ``running_mean`` (C,) and ``running_cov`` (C/group_size,
    group_size, group_size), unbiased, returned updated in a :class:`WhiteningResult` by a training
    call; required by an inference call (``training=False``), which whitens with
    W(running_cov + εI) and treats it as a constant.

    ``sync`` (keyword, default ``None``: this process's statistics): a reducer
    (:class:`normref.distributed.Reducer`, e.g. ``normref.backends.distributed.torch.TorchReducer``)
    when the batch is split across ranks. A training call then whitens with the statistics of the
    global batch (every rank's samples; uneven counts, a rank with none included): each rank
    gathers, once, its [n, μ, upper triangle of its centred cross-products M2] — per group of d
    features d + d(d+1)/2 values, plus one count — pools them by Chan's formula
    (:func:`normref.distributed.combine_moments`: M2 = Σ M2_i + Σ n_i(μ_i − μ)(μ_i − μ)ᵀ), and
    computes the same Σ = M2/N + εI and W on every rank; running statistics are updated from the
    global batch (unbiased by the global N), identically everywhere. The backward all-reduces, once,
    the packed [upper triangle of dΣ, Σ g] (d(d+1)/2 + d values per group); the gradients of γ, β
    stay per rank (sum them across ranks as data-parallel training does). ``training=False`` uses
    no statistics of the batch and ignores ``sync``.
    Partitions: ``"batch"`` and ``"batch_group"`` (each rank's k-th batch group is pooled with the
    other ranks' k-th: the global batch group k is their union); every other partition is per
    sample and refuses ``sync`` (``ValueError``).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``, default None
        The running mean (batch partition).
    running_cov : array or None, shape ``(C/group_size, group_size, group_size)``, default None
        The running (unbiased) covariance of each group.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Whiten with the batch statistics (and update the running ones, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average over ``num_batches_tracked``.
    eps : float, default 1e-5
        ε, added to the covariance (Σ + εI, ε ≥ 0).
    method : str, default "zca"
        ``"zca"``, ``"pca"``, ``"cholesky"``, ``"iternorm"`` or ``"newton_schulz"``.
    group_size : int or None, default None
        Features per whitening group; ``None``: all of them.
    iterations : int, default 5
        T, the Newton steps of ``"iternorm"``/``"newton_schulz"``.
    partition : str, default "batch"
        ``"batch"``, ``"instance"``, ``"group"``, ``"batch_group"``, ``"position"`` or ``"layer"``.
    num_groups : int or None, default None
        The channel groups of ``"group"``/``"batch_group"``.
    batch_groups : int, default 1
        The batch groups of ``"batch_group"``.
    normalized_ndim : int, default 1
        The trailing axes of ``"layer"``.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer: whitening with the global batch's statistics (see above).

    Returns
    -------
    out : array or WhiteningResult
        The output, or ``WhiteningResult(output, running_mean, running_cov)`` in training with running
        statistics.

    Notes
    -----
    Survey §5.1.2 (whitening, Eqn 23).

    References
    ----------
    .. [1] L. Huang, D. Yang, B. Lang and J. Deng, "Decorrelated Batch Normalization", CVPR 2018.
    """
    return _whitening("batch_whitening", input, running_mean, running_cov, weight, bias, training, momentum, eps,
                      method, group_size, iterations, partition, num_groups, num_batches_tracked, "affine",
                      batch_groups, normalized_ndim, sync)


batch_whitening.defbackward(_whitening_backward)


def _ex_preset(meth):
    def ex(rng):
        x = rng.standard_normal((6, 4, 2, 3)) - 0.3
        x[:, 2] += 0.5 * x[:, 3]
        c = 4
        yield Example((x,), dict(training=True, group_size=2), label="groups of 2, batch statistics",
                      cond=_call_cond(x, group_size=2))
        yield Example((x, None, None, rng.uniform(0.5, 1.5, c), rng.standard_normal(c)), dict(training=True),
                      label="one group, affine", cond=_call_cond(x))
        rm = rng.standard_normal(c) * 0.1
        a = rng.standard_normal((1, 4, 4))
        rc = a @ _np.swapaxes(a, -1, -2) / 4 + _np.eye(4)
        yield Example((x, rm, rc), dict(training=False), label="inference (population statistics)",
                      cond=_kappa(rc + 1e-5 * _np.eye(4)))
        # the authors' running state: a running whitening matrix, EMA of the batch W, applied as it is
        yield Example((x, rm, rc), dict(training=True, momentum=0.2, running="whitening_matrix"),
                      label="running whitening matrix, training update", cond=_call_cond(x))
        rw = _np.linalg.inv(_np.linalg.cholesky(rc[0])).T @ _np.linalg.inv(_np.linalg.cholesky(rc[0]))
        rw = 0.5 * (rw + rw.T)[None]
        yield Example((x, rm, rw), dict(training=False, running="whitening_matrix"),
                      label="running whitening matrix, inference", cond=_kappa(rw))

    return ex


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.1.2 Eqn 23 (ZCA whitening, decorrelated BN)",
    paper="Huang, Yang, Lang & Deng, Decorrelated Batch Normalization, CVPR 2018",
    examples=_ex_preset("zca"),
    invariants=(_whiteness_invariant(),),
)
def decorrelated_batch_norm(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    group_size: int | None = None,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
    running: str = "covariance",
) -> Array | WhiteningResult:
    """Decorrelated batch normalization: ZCA batch whitening, then a per-channel affine.

    X̂ = Σ^-1/2·(X − μ) per channel group, then y = γ·X̂ + β (:func:`batch_whitening` with
    ``method="zca"``).

    ``running`` (keyword) selects the population state held in ``running_cov`` (conventions differ):

    - ``"covariance"`` (default, as :func:`batch_whitening` and torch's running variance): the running
      unbiased covariance, Σ̂ ← (1 − f)·Σ̂ + f·Xc·Xcᵀ/(m − 1); inference whitens with W(Σ̂ + εI).
    - ``"whitening_matrix"`` (the authors' released code, github:princeton-vl/DecorrelatedBN,
      ``module/spatial/Spatial_DBN_opt.lua``: ``running_projections``): the running whitening matrix,
      Ŵ ← (1 − f)·Ŵ + f·W_batch with W_batch = (Xc·Xcᵀ/m + εI)^-1/2 the matrix this batch was
      whitened with; inference applies X̂ = Ŵ·(X − μ̂) directly (no factorization; ``running_cov``
      then holds Ŵ, initialised to I like the authors', and :class:`WhiteningResult`'s third field
      returns the updated Ŵ). The two differ at inference because W is not linear in Σ
      (an average of W's is not the W of the average Σ; survey §5.3.2 reports Huang et al.'s finding
      that the running covariance is the more stable estimate). Either way Ŵ or Σ̂ carries no gradient.

    ``sync`` (keyword, default ``None``): a reducer for a batch split across ranks; a training call
    then whitens with the global batch's statistics, exactly as :func:`batch_whitening` says
    (one all_gather of d + d(d+1)/2 values per group plus one count forward, one all_reduce_sum
    of d(d+1)/2 + d per group backward; ``training=False`` ignores ``sync``).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``, default None
        The running mean.
    running_cov : array or None, shape ``(C/group_size, group_size, group_size)``, default None
        The running (unbiased) covariance of each group.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Whiten with the batch statistics (and update the running ones, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    eps : float, default 1e-5
        ε, added to the covariance.
    group_size : int or None, default None
        Channels per group (the authors' default is 16); ``None``: all.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (see above).
    running : str, default "covariance"
        ``"covariance"`` or ``"whitening_matrix"``: what ``running_cov`` holds (see above).

    Returns
    -------
    out : array or WhiteningResult
        The output, or ``WhiteningResult`` in training with running statistics.

    Notes
    -----
    Survey §5.1.2 (Table 1: Π_BN with ZCA whitening); population statistics §5.3.2.

    References
    ----------
    .. [1] L. Huang, D. Yang, B. Lang and J. Deng, "Decorrelated Batch Normalization", CVPR 2018
       (Algorithm 1; their default group size is 16).
    """
    running = check_choice("decorrelated_batch_norm", "running", running, RUNNING_STATES)
    return _whitening("decorrelated_batch_norm", input, running_mean, running_cov, weight, bias, training, momentum,
                      eps, "zca", group_size, 5, "batch", None, num_batches_tracked, "affine", sync=sync,
                      running=running)


decorrelated_batch_norm.defbackward(_whitening_backward)


def _monotone_invariant() -> Invariant:
    """Invariant (survey §5.1.2, IterNorm "stretches the dimensions along the eigenvectors
    progressively"): the eigenvalues of W_T·Σ·W_Tᵀ = cov(X̂) + ε·W_T·W_Tᵀ, taken from the output,
    lie between those of W_{T−1}·Σ·W_{T−1}ᵀ (float64 reference) and 1."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        if not a["training"] or a.get("weight") is not None or a.get("bias") is not None:
            return None
        xg, _ = _survey_groups(to_numpy(a["input"]), group_size=a.get("group_size"))
        yg, _ = _survey_groups(to_numpy(m.primary(out)), group_size=a.get("group_size"))
        sig = _group_cov(xg, a["eps"])
        t = a["iterations"]
        # the reference is the coupled form: the same polynomial, stable for every T
        w_t = _np_matrix("newton_schulz", sig, t)
        ev = _np.linalg.eigvalsh(yg @ _np.swapaxes(yg, -1, -2) / yg.shape[-1] + a["eps"] * w_t @ w_t)
        worst = float(_np.max(ev - 1.0))
        if t > 1:
            w_p = _np_matrix("newton_schulz", sig, t - 1)
            worst = max(worst, float(_np.max(_np.linalg.eigvalsh(w_p @ sig @ w_p) - ev)))
        return max(worst, 0.0)

    return Invariant("IterNorm: eigenvalues of W_T·Σ·W_Tᵀ increase with T toward 1", check, scale=64.0)


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.1.2 (IterNorm: Newton's iterations for Σ^-1/2)",
    paper="Huang, Zhou, Zhu, Liu & Shao, Iterative Normalization, CVPR 2019",
    examples=_ex_preset("iternorm"),
    invariants=(_monotone_invariant(),),
)
def iter_norm(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    group_size: int | None = None,
    iterations: int = 5,
    *,
    num_batches_tracked: int | None = None,
    coupled: bool | None = None,
    sync: Any = None,
    running: str = "covariance",
) -> Array | WhiteningResult:
    """Iterative normalization: Newton-iteration batch whitening, then a per-channel affine.

    X̂ = (P_T/√tr Σ)·(X − μ), P_0 = I, P_k = ½(3·P_{k−1} − P_{k−1}³·Σ/tr Σ),
    then y = γ·X̂ + β (:func:`batch_whitening` with ``method="iternorm"``).

    ``running`` (keyword) selects the population state held in ``running_cov``:
    ``"covariance"`` (default): the running unbiased covariance Σ̂, and inference recomputes
    W = P_T(Σ̂ + εI)/√tr(Σ̂ + εI) with the same T iterations (survey §5.3.2: Huang et al. found this
    more stable than a running W); ``"whitening_matrix"`` (the authors' released code,
    github:huangleiBuaa/IterNorm,
    ``module/spatial/Spatial_DBN_PowerIter.lua``: ``running_projections``): the running whitening
    matrix Ŵ ← (1 − f)·Ŵ + f·W_batch (W_batch = P_T/√tr Σ of this batch, Σ biased + εI), applied at
    inference as X̂ = Ŵ·(X − μ̂) (``running_cov`` holds Ŵ, initialised to I; survey §5.3.2).

    The uncoupled iteration amplifies rounding errors once converged (module docstring: ≈ 30–50× per
    step). ``coupled=None`` (default) computes P_T as written for T ≤ :data:`ITERNORM_STABLE_T` (6)
    and by the coupled Newton–Schulz form (``method="newton_schulz"``, the same polynomial, stable)
    for larger T; ``coupled=False`` forces the uncoupled form (with a ``RuntimeWarning`` above 6),
    ``coupled=True`` the coupled one.

    ``sync`` (keyword, default ``None``): a reducer for a batch split across ranks; a training call
    then whitens with the global batch's statistics, exactly as :func:`batch_whitening` says
    (one all_gather of d + d(d+1)/2 values per group plus one count forward, one all_reduce_sum
    of d(d+1)/2 + d per group backward; ``training=False`` ignores ``sync``).
    Every rank runs the same T iterations on the same global Σ.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``, default None
        The running mean.
    running_cov : array or None, shape ``(C/group_size, group_size, group_size)``, default None
        The running (unbiased) covariance of each group.
    weight : array or None, shape ``(C,)``, default None
        γ (``None``: 1).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Whiten with the batch statistics (and update the running ones, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    eps : float, default 1e-5
        ε, added to the covariance.
    group_size : int or None, default None
        Channels per group; ``None``: all.
    iterations : int, default 5
        T (the paper's default is 5), at most ``normref.matfun.MAX_ITERATIONS`` (1000).
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    coupled : bool or None, default None
        ``None``: uncoupled for T ≤ 6, coupled above; ``True``/``False`` force one form (a bool or
        ``np.bool_``).
    sync : reducer or None, default None
        A reducer (see above).
    running : str, default "covariance"
        ``"covariance"`` or ``"whitening_matrix"``: what ``running_cov`` holds (see above).

    Returns
    -------
    out : array or WhiteningResult
        The output, or ``WhiteningResult`` in training with running statistics.

    Notes
    -----
    Survey §5.1.2 (IterNorm) and §5.3.2 (inference with running statistics).

    References
    ----------
    .. [1] L. Huang, Y. Zhou, F. Zhu, L. Liu and L. Shao, "Iterative Normalization: Beyond
       Standardization towards Efficient Whitening", CVPR 2019 (Algorithm 1; T = 5 is their default).
    """
    if coupled is not None:
        try:
            coupled = check_bool("iter_norm", "coupled", coupled)
        except TypeError:
            raise TypeError(f"iter_norm: coupled must be True, False or None; got {type(coupled).__name__} {coupled!r}") from None
    t = _mf.check_iterations("iter_norm", "iterations", iterations, minimum=1)
    running = check_choice("iter_norm", "running", running, RUNNING_STATES)
    stable = coupled if coupled is not None else t > ITERNORM_STABLE_T
    return _whitening("iter_norm", input, running_mean, running_cov, weight, bias, training, momentum, eps,
                      "newton_schulz" if stable else "iternorm", group_size, t, "batch", None, num_batches_tracked,
                      "affine", sync=sync, running=running)


iter_norm.defbackward(_whitening_backward)


def _coloring_invariant() -> Invariant:
    """Invariant (Siarohin et al.): X̃ = Γ·X̂ + β with a white X̂, so mean(X̃) = β and
    cov(X̃) = Γ·(I − ε·W·Wᵀ)·Γᵀ (zca, pca, cholesky; training), relative to max|Γ·Γᵀ|."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        if not a["training"] or a["method"] not in ("zca", "pca", "cholesky"):
            return None
        gs = a.get("group_size")
        xg, _ = _survey_groups(to_numpy(a["input"]), group_size=gs)
        yg, _ = _survey_groups(to_numpy(m.primary(out)), group_size=gs)
        c = xg.shape[1]
        gam = _np.eye(c)[None] if a["weight"] is None else _np.asarray(to_numpy(a["weight"]), _np.float64)
        beta = _np.zeros(xg.shape[:2]) if a["bias"] is None else \
            _np.asarray(to_numpy(a["bias"]), _np.float64).reshape(xg.shape[:2])
        eps, mm = a["eps"], xg.shape[-1]
        if a.get("shrinkage"):  # Σ = (1 − ε)·Σ_b·m/(m − 1) + εI whitened, so W·Σ_b·Wᵀ = (I − εWWᵀ)·(m − 1)/(m(1 − ε))
            sig = (1.0 - eps) * _group_cov(xg) * (mm / (mm - 1)) + eps * _np.eye(c)
            f = (mm - 1) / (mm * (1.0 - eps))
        else:
            sig, f = _group_cov(xg, eps), 1.0
        wm = _np_matrix(a["method"], sig)
        want = f * gam @ (_np.eye(c) - eps * wm @ _np.swapaxes(wm, -1, -2)) @ _np.swapaxes(gam, -1, -2)
        yc = yg - beta[..., None]
        scale = float(_np.max(_np.abs(gam @ _np.swapaxes(gam, -1, -2))))
        got = yc @ _np.swapaxes(yc, -1, -2) / yg.shape[-1]
        return max(float(_np.max(_np.abs(got - want))) / scale,
                   float(_np.max(_np.abs(yc.mean(axis=-1)))) / math.sqrt(scale))

    return Invariant("coloring: mean(X̃) = β, cov(X̃) = Γ·(I − ε·W·Wᵀ)·Γᵀ", check, scale=256.0)


def _ex_coloring(rng):
    x = rng.standard_normal((6, 4, 3)) + 1.0
    x[:, 0] -= 0.6 * x[:, 3]
    gam = rng.standard_normal((2, 2, 2))
    yield Example((x, None, None, gam, rng.standard_normal(4)), dict(training=True, group_size=2),
                  label="zca + coloring, groups of 2", cond=_call_cond(x, group_size=2))
    gam4 = rng.standard_normal((1, 4, 4))
    yield Example((x, None, None, gam4), dict(training=True, method="cholesky"),
                  label="cholesky + coloring (Siarohin et al.)", cond=_call_cond(x))
    rm = rng.standard_normal(4) * 0.1
    rc = _np.eye(4)[None] * 1.5
    yield Example((x, rm, rc, gam4, rng.standard_normal(4)), dict(training=False),
                  label="inference", cond=_kappa(rc + 1e-5 * _np.eye(4)))
    # the authors' convention: unbiased Σ shrunk toward I, (1 − ε)·Σ + ε·I (ε = 1e-3 as theirs)
    xs = (1.0 - 1e-3) * _group_cov(_survey_groups(x, group_size=2)[0]) * (18 / 17) + 1e-3 * _np.eye(2)
    yield Example((x, None, None, gam, rng.standard_normal(4)), dict(training=True, group_size=2, eps=1e-3,
                  shrinkage=True), label="shrinkage (Siarohin et al.'s code), groups of 2", cond=_kappa(xs))
    yield Example((x, rm, rc, gam4), dict(training=False, eps=1e-3, shrinkage=True),
                  label="shrinkage, inference", cond=_kappa((1 - 1e-3) * rc + 1e-3 * _np.eye(4)))


@method(
    channels=("input",),
    array_params=("input", "running_mean", "running_cov", "weight", "bias"),
    nondiff=("running_mean", "running_cov"),
    survey="§5.1.3 Eqn 24 (coloring recovery: a learnable d×d matrix, NRR) over §5.1.2 Eqn 23 (whitening)",
    paper="Siarohin, Sangineto & Sebe, Whitening and Coloring Batch Transform for GANs, ICLR 2019",
    examples=_ex_coloring,
    invariants=(_coloring_invariant(),),
)
def whitening_coloring(
    input: Any,
    running_mean: Any = None,
    running_cov: Any = None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    method: str = "cholesky",
    group_size: int | None = None,
    iterations: int = 5,
    *,
    num_batches_tracked: int | None = None,
    sync: Any = None,
    shrinkage: bool = False,
) -> Array | WhiteningResult:
    """Whitening and coloring: X̃ = Γ_g·X̂_g + β, X̂ the batch whitening of :func:`batch_whitening`.

    ``weight`` holds the coloring matrices Γ, one per group (Siarohin et al.'s learnable d×d matrix;
    ``None`` skips it), ``bias`` is β per channel. Default ``method="cholesky"`` as in the paper.
    Backward: dΓ_g = Σ_n G_g·X̂_gᵀ, dX̂_g = Γ_gᵀ·G_g.

    ``shrinkage`` (keyword) selects the covariance that is whitened:

    - ``False`` (default; the survey's Eqn 23, as :func:`batch_whitening`): Σ = Xc·Xcᵀ/m + ε·I in
      training and running_cov + ε·I at inference.
    - ``True`` (the authors' released code, github:AliaksandrSiarohin/gan, ``conditional_layers.py``,
      ``DecorelationNormalization``): the unbiased covariance shrunk toward I,
      Σ = (1 − ε)·Xc·Xcᵀ/(m − 1) + ε·I in training and Σ̂ = (1 − ε)·running_cov + ε·I at inference,
      ε ∈ [0, 1] (their default ε = 1e-3). The running covariance is updated as in both cases
      (unbiased, without ε; their Keras ``momentum=0.99`` is ``momentum=0.01`` here).
      Backward: Σ = a·Xc·Xcᵀ/m + ε·I with a = (1 − ε)·m/(m − 1), so ∂L/∂Xc gains (2a/m)·dΣ·Xc
      in place of (2/m)·dΣ·Xc; at inference Σ̂ is a constant (dX = Wᵀ·G).

    ``sync``: the whitening synchronized across ranks exactly as in :func:`batch_whitening`
    (forward: one gather of d + d(d+1)/2 values per group plus a count; backward: one all-reduce of
    d(d+1)/2 + d values per group); dΓ and dβ stay per rank.

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    running_mean : array or None, shape ``(C,)``, default None
        The running mean.
    running_cov : array or None, shape ``(C/group_size, group_size, group_size)``, default None
        The running (unbiased) covariance of each group.
    weight : array or None, shape ``(C/group_size, group_size, group_size)``, default None
        The coloring matrices Γ (``None``: none).
    bias : array or None, shape ``(C,)``, default None
        β (``None``: 0).
    training : bool, default False
        Whiten with the batch statistics (and update the running ones, if given).
    momentum : float or None, default 0.1
        The running-statistic factor; ``None``: the cumulative average.
    eps : float, default 1e-5
        ε, added to the covariance.
    method : str, default "cholesky"
        The whitening, as in :func:`batch_whitening`.
    group_size : int or None, default None
        Channels per group; ``None``: all.
    iterations : int, default 5
        T, for the Newton whitenings.
    num_batches_tracked : int or None, default None
        Batches seen before this one (needed with ``momentum=None``).
    sync : reducer or None, default None
        A reducer (see above).
    shrinkage : bool, default False
        Whiten (1 − ε)·Σ_unbiased + ε·I (the authors' code) instead of Σ_biased + ε·I (see above).

    Returns
    -------
    out : array or WhiteningResult
        The output, or ``WhiteningResult`` in training with running statistics.

    Notes
    -----
    Survey §5.1.3, Eqn 24 (the coloring transformation; Table 1: CD whitening with the color
    transformation), on the whitening of §5.1.2, Eqn 23.

    References
    ----------
    .. [1] A. Siarohin, E. Sangineto and N. Sebe, "Whitening and Coloring Batch Transform for GANs",
       ICLR 2019.
    """
    shrinkage = check_bool("whitening_coloring", "shrinkage", shrinkage)
    return _whitening("whitening_coloring", input, running_mean, running_cov, weight, bias, training, momentum, eps,
                      method, group_size, iterations, "batch", None, num_batches_tracked, "coloring", sync=sync,
                      shrinkage=shrinkage)


whitening_coloring.defbackward(_whitening_backward)


# --------------------------------------------------------------------------------------------------
# the whitening matrix itself (the NOP's core, exposed so its backward is checked on its own)


def _matrix_invariant() -> Invariant:
    """Invariant: W·Σ·Wᵀ = I for zca, pca and cholesky, and W = Wᵀ for zca (relative to max|W|),
    from the output and the input in float64."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        if a["method"] not in ("zca", "pca", "cholesky"):
            return None
        s = _np.asarray(to_numpy(a["cov"]), _np.float64)
        s = 0.5 * (s + _np.swapaxes(s, -1, -2))
        w = _np.asarray(to_numpy(m.primary(out)), _np.float64)
        r = float(_np.max(_np.abs(w @ s @ _np.swapaxes(w, -1, -2) - _np.eye(s.shape[-1]))))
        if a["method"] == "zca":
            r = max(r, float(_np.max(_np.abs(w - _np.swapaxes(w, -1, -2)))) / float(_np.max(_np.abs(w))))
        return r

    return Invariant("whiteness: W·Σ·Wᵀ = I (zca: W = Wᵀ)", check, scale=64.0)


def _ex_matrix(rng):
    def spd(d, lam):
        q, _ = _np.linalg.qr(rng.standard_normal((d, d)))
        return (q * _np.asarray(lam, _np.float64)) @ q.T

    a = _np.stack([spd(3, [0.5, 1.3, 2.9]), spd(3, [0.2, 1.0, 4.0])])
    for meth in WHITENING_METHODS:
        yield Example((a,), dict(method=meth), label=f"{meth}, separated spectra", cond=_kappa(a))
    # a wider spectrum (κ = 40); much wider ones (κ = 1e6) need a finite-difference step scaled to
    # λ_min, which the generic suite does not take: tests/test_whitening.py checks them with one.
    b = spd(4, [0.05, 0.3, 1.0, 2.0])[None]
    yield Example((b,), dict(method="zca"), label="zca, κ = 40", cond=_kappa(b))
    yield Example((b,), dict(method="cholesky"), label="cholesky, κ = 40", cond=_kappa(b))
    yield Example((a,), dict(method="iternorm", iterations=1), label="iternorm T=1", cond=_kappa(a))


@method(
    array_params=("cov",),
    survey="§5.1.2 Eqn 23 (the whitening matrix Σ^-1/2 of Φ_W)",
    paper="Huang et al., CVPR 2018 (ZCA, PCA); Siarohin et al., ICLR 2019 (Cholesky); Huang et al., CVPR 2019 (IterNorm)",
    examples=_ex_matrix,
    invariants=(_matrix_invariant(),),
)
def whitening_matrix(cov: Any, method: str = "zca", iterations: int = 5) -> Array:
    """The whitening matrix W of sym(Σ) for each matrix of ``cov`` (..., d, d), one batched call.

    zca: Σ^-1/2 = D·Λ^-1/2·Dᵀ; pca: Λ^-1/2·Dᵀ; cholesky: L^-1 (one triangular solve); iternorm /
    newton_schulz: T = ``iterations`` Newton steps on Σ/tr Σ, divided by √tr Σ (:mod:`normref.matfun`).
    The gradient is symmetric: W reads sym(Σ) = (Σ + Σᵀ)/2.

    Parameters
    ----------
    cov : array, shape ``(..., d, d)``
        The covariance matrices Σ.
    method : str, default "zca"
        ``"zca"``, ``"pca"``, ``"cholesky"``, ``"iternorm"`` or ``"newton_schulz"``.
    iterations : int, default 5
        T, the Newton steps of ``"iternorm"``/``"newton_schulz"``.

    Returns
    -------
    W : array, shape ``(..., d, d)``
        The whitening matrix of each Σ.

    Raises
    ------
    ValueError
        For non-finite entries, for a Σ that is not numerically positive definite (zca, pca, cholesky:
        eigenvalues or squared pivots not above 2√d·ε_dtype·max), and for a Σ with zero trace or that
        is indefinite (Newton: a Cholesky test of Σ + d·ε·tr Σ·I).

    Notes
    -----
    Survey §5.1.2, Eqn 23.

    References
    ----------
    .. [1] L. Huang, D. Yang, B. Lang and J. Deng, "Decorrelated Batch Normalization", CVPR 2018.
    """
    fn = "whitening_matrix"
    _required(fn, cov=cov)
    xp = namespace(fn, cov=cov)
    check_ndim(fn, "cov", cov, min_ndim=2, what="(..., d, d)")
    if cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{fn}: cov must be square in its last two axes (..., d, d); got shape {tuple(cov.shape)}")
    if cov.shape[-1] == 0:
        raise ValueError(f"{fn}: cov must be at least 1×1 in its last two axes (..., d, d), d ≥ 1; got shape {tuple(cov.shape)}")
    method = _check_method(fn, method)
    iterations = _mf.check_iterations(fn, "iterations", iterations, minimum=1)
    _warn_unstable(fn, method, iterations)
    cd = compute_dtype(xp, cov.dtype)
    s = to_compute(xp, cov, cd)
    w, wres = _operator(fn, xp, s, method, iterations, 0.0, "cov")
    if method == "cholesky":  # the operator is the factor L; W = L^-1 by one triangular solve
        w = _mf.triangular_inverse(xp, w)
    return _out(xp, w, cov.dtype), Residuals(tuple(wres), method)


@whitening_matrix.defbackward
def _whitening_matrix_backward(res: Residuals, g):
    xp = namespace("whitening_matrix.backward", cotangent=g)
    g = to_compute(xp, g, res.arrays[0].dtype)
    return (_mf.whitening_matrix_backward(xp, res.arrays, g, res.static),)


# --------------------------------------------------------------------------------------------------
# style transfer: AdaIN and WCT (instance partition)


def _channel_cond(*arrays) -> float:
    """1 + max |μ|/σ over the channels of (N, C, ...) arrays: the cancellation of centering."""
    worst = 0.0
    for a in arrays:
        a = _np.asarray(a, _np.float64).reshape(a.shape[0], a.shape[1], -1)
        worst = max(worst, float(_np.max(_np.abs(a.mean(axis=2)) / a.std(axis=2))))
    return 1.0 + worst


def _adain_invariant() -> Invariant:
    """Invariant (Huang & Belongie): each channel of the output has the style's mean, and the
    variance var_y = (var_s + ε)·var_c/(var_c + ε) (= the style's variance when ε = 0); both relative
    to the style's scale σ_s + |μ_s| and variance."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        c = _np.asarray(to_numpy(a["content"]), _np.float64)
        s = _np.asarray(to_numpy(a["style"]), _np.float64)
        y = _np.asarray(to_numpy(m.primary(out)), _np.float64)
        c, s, y = (t.reshape(t.shape[0], t.shape[1], -1) for t in (c, s, y))
        eps = a["eps"]
        se = a.get("style_eps", True)
        eps_s = (eps if se else 0.0) if isinstance(se, (bool, _np.bool_)) else float(se)
        dd = 1 if a.get("unbiased") else 0  # var_y = (var_s + ε_s)·var_c/(var_c + ε) with either estimator
        mu_s, var_s, var_c = s.mean(axis=2), s.var(axis=2, ddof=dd), c.var(axis=2, ddof=dd)
        want = (var_s + eps_s) * var_c / (var_c + eps)
        r_mean = _np.abs(y.mean(axis=2) - mu_s) / (_np.sqrt(var_s) + _np.abs(mu_s))
        r_var = _np.abs(y.var(axis=2, ddof=dd) - want) / want
        return float(max(_np.max(r_mean), _np.max(r_var)))

    return Invariant("AdaIN: per-channel mean = style mean, var = (var_s + ε)·var_c/(var_c + ε)", check, scale=64.0)


def _ex_adain(rng):
    c, s = rng.standard_normal((2, 3, 4, 3)) + 1.0, rng.standard_normal((2, 3, 5, 2)) * 2.0 - 0.5
    yield Example((c, s), {}, label="different spatial sizes", cond=_channel_cond(c, s))
    c, s = rng.standard_normal((1, 2, 6)), rng.standard_normal((1, 2, 6))
    yield Example((c, s), dict(eps=1e-3), label="1-d, eps 1e-3", cond=_channel_cond(c, s))
    c, s = rng.standard_normal((2, 3, 4, 3)) - 0.5, rng.standard_normal((2, 3, 3, 3)) * 1.5 + 0.5
    yield Example((c, s), dict(unbiased=True), label="unbiased variance (the PyTorch port)", cond=_channel_cond(c, s))
    yield Example((c, s), dict(style_eps=False), label="no ε on the style (the authors' Torch7 code)",
                  cond=_channel_cond(c, s))
    yield Example((c, s), dict(eps=1e-3, unbiased=True, style_eps=0.01), label="unbiased, style ε = 0.01",
                  cond=_channel_cond(c, s))


def _check_style(fn, content, style):
    check_ndim(fn, "content", content, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    check_ndim(fn, "style", style, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    if tuple(style.shape[:2]) != tuple(content.shape[:2]):
        raise ValueError(
            f"{fn}: style must have content's (N, C) = {tuple(content.shape[:2])}; got style of shape {tuple(style.shape)}"
        )


@method(
    channels=("content", "style"),
    array_params=("content", "style"),
    survey="§9.2 (style transfer); §5.1.3 Eqn 25 (affine parameters generated from another input)",
    paper="Huang & Belongie, Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization, ICCV 2017",
    examples=_ex_adain,
    invariants=(_adain_invariant(),),
)
def adain(content: Any, style: Any, eps: float = 1e-5, *, unbiased: bool = False,
          style_eps: bool | float = True) -> Array:
    """Adaptive instance normalization: y = σ_s·(x − μ_c)/σ_c + μ_s.

    μ, σ per sample and channel over the spatial axes (M positions). By default (the paper's Eqn 8,
    with σ as its Eqn 6) σ = √(mean((x − μ)²) + ε) for content and style alike: the biased variance,
    ε inside the root. content and style share (N, C); their spatial sizes may differ.

    Conventions (keywords; the paper's by default):

    - ``unbiased`` (default ``False``): ``True`` takes the unbiased variance Σ(x − μ)²/(M − 1) for both
      content and style, as the popular PyTorch port does (github:naoto0804/pytorch-AdaIN,
      ``function.py``, ``calc_mean_std``: ``torch.var`` (unbiased) + ε, then the square root, on both).
    - ``style_eps`` (default ``True``: ε added to the style's variance too): ``False`` adds none,
      σ_s = √var(s), as the authors' Torch7 code (github:xunhuang1995/AdaIN-style,
      ``lib/AdaptiveInstanceNormalization.lua``): there the style σ is ``std(3, true)`` — Torch7's
      flag ``true`` normalizes by M, i.e. the biased σ — with no ε, and the content goes through
      ``nn.SpatialBatchNormalization`` in training mode, i.e. biased variance + ε inside the root.
      A number ≥ 0 is used as the style's own ε. So the authors' code is
      ``adain(c, s, unbiased=False, style_eps=False)`` and the PyTorch port ``adain(c, s, unbiased=True)``.

    Backward: with n_c = M_c (biased) or M_c − 1 (unbiased) and likewise n_s, x̂ = (x − μ_c)/σ_c,
    ŝ = (s − μ_s)/σ_s and G' = σ_s·G: ∂σ_c/∂x_i = x̂_i/n_c (the mean's part vanishes, Σ(x − μ) = 0), so
    dx = (G' − mean(G') − x̂·Σ(G'·x̂)/n_c)/σ_c; y depends on s through σ_s (dσ_s = Σ G·x̂,
    ∂σ_s/∂s_i = ŝ_i/n_s) and μ_s (dμ_s = Σ G, ∂μ_s/∂s_i = 1/M_s), so ds = Σ(G·x̂)·ŝ/n_s + Σ G/M_s.
    With ``style_eps=0`` a constant style channel has σ_s = 0, where σ_s is not differentiable: its
    ŝ is taken as 0 (the subgradient 0; the output is then μ_s).

    Parameters
    ----------
    content : array, shape ``(N, C, *spatial)``
        x, the content features.
    style : array, shape ``(N, C, *spatial_s)``
        s, the style features (spatial sizes may differ from content's).
    eps : float, default 1e-5
        ε, added to the variances (> 0).
    unbiased : bool, default False
        Divide by M − 1 instead of M (both content and style).
    style_eps : bool or float, default True
        ε of the style's variance: ``True`` the same ``eps``, ``False`` none, a number ≥ 0 that value.

    Returns
    -------
    out : array
        The output, content's shape.

    Notes
    -----
    Survey §9.2 (style transfer); the affine parameters generated from another input are the
    survey's §5.1.3, Eqn 25.

    References
    ----------
    .. [1] X. Huang and S. Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance
       Normalization", ICCV 2017.
    """
    fn = "adain"
    _required(fn, content=content, style=style)
    xp = namespace(fn, content=content, style=style)
    _check_style(fn, content, style)
    eps = check_positive(fn, "eps", eps)
    unbiased = check_bool(fn, "unbiased", unbiased)
    eps_s = _check_style_eps(fn, style_eps, eps)
    cd = compute_dtype(xp, content.dtype)
    # explicit sizes (not -1): an empty batch (N = 0 or C = 0) gives an empty output
    x = xp.reshape(to_compute(xp, content, cd), (content.shape[0], content.shape[1], math.prod(content.shape[2:])))
    s = xp.reshape(to_compute(xp, style, cd), (style.shape[0], style.shape[1], math.prod(style.shape[2:])))
    if x.shape[2] < 2 or s.shape[2] < 2:
        raise ValueError(f"{fn}: expected more than 1 spatial position in content and style; got {tuple(content.shape)}, {tuple(style.shape)}")

    def std(t, e):
        # (σ² + ε)^-½ through operation._rsqrt: right where σ² overflows the dtype (issue 11), and
        # σ = 1/that stays finite wherever the true σ is representable. Unbiased: σ² = mean(d²) of
        # d = (t − μ)·√(M/(M − 1)), so the overflow path stays exact too.
        from .operation import _rsqrt

        mu = xp.mean(t, axis=2, keepdims=True)
        tc = t - mu
        m = t.shape[2]
        k = math.sqrt(m / (m - 1)) if unbiased else 1.0
        d = tc * k if unbiased else tc
        ms = xp.mean(d * d, axis=2, keepdims=True)
        if e == 0.0:  # no ε: a constant channel has σ = 0; there σ = 0 and t̂ = 0 (no division by 0)
            pos = ms > 0
            one = xp.ones_like(ms)
            r = _rsqrt(xp, xp.where(pos, ms, one), 0.0, lambda: d, (2,))
            return mu, tc * xp.where(pos, r, xp.zeros_like(r)), xp.where(pos, 1.0 / r, xp.zeros_like(r))
        r = _rsqrt(xp, ms, e, lambda: d, (2,))
        return mu, tc * r, 1.0 / r

    _, xhat, sd_c = std(x, eps)
    mu_s, shat, sd_s = std(s, eps_s)
    y = xp.reshape(sd_s * xhat + mu_s, tuple(content.shape))
    res = Residuals((xhat, sd_c, shat, sd_s), (tuple(content.shape), tuple(style.shape), unbiased))
    return _out(xp, y, content.dtype), res


def _check_style_eps(fn, style_eps, eps) -> float:
    """``style_eps``: True → ``eps``, False → 0, a finite number ≥ 0 → itself; anything else refused."""
    if isinstance(style_eps, (bool, _np.bool_)):
        return eps if bool(style_eps) else 0.0
    try:
        return check_nonnegative(fn, "style_eps", style_eps)
    except TypeError:
        raise TypeError(f"{fn}: style_eps must be True, False or a number >= 0; got "
                        f"{type(style_eps).__name__} {style_eps!r}") from None


@adain.defbackward
def _adain_backward(res: Residuals, g):
    xp = namespace("adain.backward", cotangent=g)
    xhat, sd_c, shat, sd_s = res.arrays
    cshape, sshape, unbiased = res.static
    n_c = xhat.shape[2] - 1 if unbiased else xhat.shape[2]
    n_s = shat.shape[2] - 1 if unbiased else shat.shape[2]
    g = xp.reshape(to_compute(xp, g, xhat.dtype), xhat.shape)
    gx = g * sd_s
    dx = (gx - xp.mean(gx, axis=2, keepdims=True) - xhat * (xp.sum(gx * xhat, axis=2, keepdims=True) / n_c)) / sd_c
    dsd = xp.sum(g * xhat, axis=2, keepdims=True)
    dmu = xp.sum(g, axis=2, keepdims=True)
    ds = dsd * shat / n_s + dmu / shat.shape[2]
    return xp.reshape(dx, cshape), xp.reshape(ds, sshape)


def _np_sqrtm(s, p):
    lam, d = _np.linalg.eigh(s)
    return (d * lam[..., None, :] ** p) @ _np.swapaxes(d, -1, -2)


def _wct_invariant() -> Invariant:
    """Invariant (Li et al.): with α = 1 the output of each sample and group has the style's mean and
    the covariance A·(I − ε·Σ_cε^-1)·A, A = (Σ_s + εI)^1/2, Σ_cε = Σ_c + εI (= Σ_s when ε = 0);
    relative to max|Σ_s + εI|, computed in float64 with NumPy's eigh."""

    def check(m, xp, out, args, kwargs):
        a = _args(m, args, kwargs)
        if a["alpha"] != 1.0 or a.get("eig_cutoff") is not None:  # a cut-off: tests/test_conventions_whitening.py
            return None
        gs = a.get("group_size")
        cg, _ = _survey_groups(to_numpy(a["content"]), "instance", group_size=gs)
        sg, _ = _survey_groups(to_numpy(a["style"]), "instance", group_size=gs)
        yg, _ = _survey_groups(to_numpy(m.primary(out)), "instance", group_size=gs)
        eps = a["eps"]
        se = a.get("style_eps", True)
        eps_s = (eps if se else 0.0) if isinstance(se, (bool, _np.bool_)) else float(se)
        # unbiased: every covariance (the output's too) with M − 1, and the same identity holds
        u = (lambda t: t.shape[-1] / (t.shape[-1] - 1)) if a.get("unbiased") else (lambda t: 1.0)
        eye = _np.eye(cg.shape[1])
        sc = _group_cov(cg) * u(cg) + eps * eye
        ss = _group_cov(sg) * u(sg) + eps_s * eye
        sy = _group_cov(yg) * u(yg)
        amat = _np_sqrtm(ss, 0.5)
        want = amat @ (_np.eye(cg.shape[1]) - eps * _np.linalg.inv(sc)) @ amat
        scale = float(_np.max(_np.abs(ss)))
        r_cov = float(_np.max(_np.abs(sy - want))) / scale
        r_mean = float(_np.max(_np.abs(yg.mean(axis=-1) - sg.mean(axis=-1)))) / math.sqrt(scale)
        return max(r_cov, r_mean)

    return Invariant("WCT: output mean = style mean, cov = A·(I − ε·Σ_cε⁻¹)·A (= Σ_s at ε = 0)", check, scale=256.0)


def _wct_cond(c, s, eps, group_size=None) -> float:
    """max κ over the content and style covariances (+ εI) of an example: W_c's error grows with
    κ(Σ_c), A = Σ_s^1/2's with √κ(Σ_s) (both bounded by the larger κ)."""
    return max(_call_cond(c, eps, partition="instance", group_size=group_size),
               _call_cond(s, eps, partition="instance", group_size=group_size))


def _ex_wct(rng):
    c = rng.standard_normal((2, 3, 4, 4))
    c[:, 1] += 0.5 * c[:, 0]
    s = rng.standard_normal((2, 3, 5, 3)) * 1.5 + 0.5
    s[:, 2] -= 0.8 * s[:, 1]
    yield Example((c, s), {}, label="full channel whitening", cond=_wct_cond(c, s, 1e-5))
    yield Example((c[:, :2], s[:, :2]), dict(alpha=0.6, eps=1e-3), label="alpha = 0.6",
                  cond=_wct_cond(c[:, :2], s[:, :2], 1e-3))
    c4 = rng.standard_normal((1, 4, 9))
    s4 = rng.standard_normal((1, 4, 7))
    yield Example((c4, s4), dict(group_size=2), label="groups of 2", cond=_wct_cond(c4, s4, 1e-5, 2))
    yield Example((c, s), dict(unbiased=True, style_eps=False), label="M − 1 factors, no style ε (the port's)",
                  cond=_wct_cond(c, s, 1e-5))
    # a rank-deficient style (3 channels, 3 positions: centred, one eigenvalue 0, a simple one, so
    # that second-order checks through eigh see no tie) and a cut-off that drops it; the content's
    # smallest eigenvalue stays far from the cut-off 1e-3, so every kept–dropped gap is large and the
    # finite-difference step does not cross the cut-off
    s2 = rng.standard_normal((1, 3, 3)) * 1.5
    c2 = rng.standard_normal((1, 3, 12))
    kc = _call_cond(c2, 1e-5, partition="instance")
    yield Example((c2, s2), dict(unbiased=True, eig_cutoff=1e-3, style_eps=False),
                  label="eigenvalue cut-off, rank-deficient style", cond=kc)


@method(
    channels=("content", "style"),
    array_params=("content", "style"),
    survey="§9.2 (style transfer: whitening and coloring of instance statistics)",
    paper="Li, Fang, Yang, Wang, Lu & Yang, Universal Style Transfer via Feature Transforms, NeurIPS 2017",
    examples=_ex_wct,
    invariants=(_wct_invariant(),),
)
def wct(content: Any, style: Any, alpha: float = 1.0, eps: float = 1e-5, group_size: int | None = None, *,
        unbiased: bool = False, eig_cutoff: float | None = None, style_eps: bool | float = True) -> Array:
    """Whitening and coloring transform: y = α·(Σ_s^1/2·Σ_c^-1/2·(x − μ_c) + μ_s) + (1 − α)·x.

    Per sample (the instance partition) and group of ``group_size`` channels (``None``: all):
    by default Σ = Xc·Xcᵀ/M + ε·I (biased, ε added to both; the paper, Li et al. Eqns 1–2, writes
    f_c·f_cᵀ = E_c·D_c·E_cᵀ without a normalizing factor or ε), Σ_c^-1/2 by the ZCA :class:`Whitening`
    operation and Σ_s^1/2 by the symmetric square root, both through ``eigh`` with the Loewner
    backward, so gradients reach content and style exactly even at equal eigenvalues.

    Conventions of the released code (keywords; the default is the formula above). The PyTorch port
    github:sunshineatnoon/PytorchWCT (``util.py``, ``whiten_and_color``; the authors' Torch7
    repository, github:Yijunmhuang/universal-style-transfer, could not be inspected here) divides
    both covariances by M − 1 (each by its own M: content and style sizes differ), adds I (ε = 1) to
    the content's covariance and nothing to the style's, and keeps only the eigenvalues ≥ 1e-5 of each
    (a cut-off; the content's never triggers after + I):

    - ``unbiased`` (default ``False``): ``True`` divides the content's covariance by M_c − 1 and the
      style's by M_s − 1.
    - ``eig_cutoff`` (default ``None``: every eigenvalue kept): a threshold τ > 0; the eigenvalues of
      Σ_c and Σ_s (+ ε·I) below τ are dropped, W_c = Σ_{λ≥τ} λ^-1/2·d·dᵀ and A = Σ_{λ≥τ} λ^1/2·d·dᵀ
      (the port's 1e-5). Dropped eigenvalues may be 0 or slightly negative, so a rank-deficient Σ
      is allowed; a kept one must be above the rounding noise 2√d·ε_dtype·λ_max (``ValueError``).
      Backward: the divided differences of the truncated function (derived in the comments above
      :func:`truncated_spectral_forward`): the closed form between kept eigenvalues, 0 between dropped
      ones, and f(λ_kept)/(λ_kept − λ_dropped) between a kept and a dropped one (the kept subspace
      rotates); exact for a fixed kept set, large when a kept and a dropped eigenvalue straddle τ
      closely, undefined at λ = τ exactly (an eigenvalue equal to τ is kept).
    - ``style_eps`` (default ``True``: ε added to the style's covariance too): ``False`` adds none, a
      number ≥ 0 is the style's own ε. The port is ``wct(c, s, eps=1.0, unbiased=True,
      eig_cutoff=1e-5, style_eps=False)``.

    Parameters
    ----------
    content : array, shape ``(N, C, *spatial)``
        x, the content features.
    style : array, shape ``(N, C, *spatial_s)``
        The style features (spatial sizes may differ).
    alpha : float, default 1.0
        α, the blend with the content.
    eps : float, default 1e-5
        ε, added to the content's covariance (and the style's, see ``style_eps``).
    group_size : int or None, default None
        Channels per group; ``None``: all.
    unbiased : bool, default False
        Divide the covariances by M − 1 instead of M.
    eig_cutoff : float or None, default None
        Drop the eigenvalues below it (``None``: none dropped).
    style_eps : bool or float, default True
        ε of the style's covariance: ``True`` the same ``eps``, ``False`` none, a number ≥ 0 that value.

    Returns
    -------
    out : array
        The output, content's shape.

    Notes
    -----
    Survey §9.2 (style transfer: WCT matches the covariance), with the whitening of §5.1.2, Eqn 23
    on the instance partition.

    References
    ----------
    .. [1] Y. Li, C. Fang, J. Yang, Z. Wang, X. Lu and M.-H. Yang, "Universal Style Transfer via Feature
       Transforms", NeurIPS 2017.
    """
    fn = "wct"
    _required(fn, content=content, style=style)
    xp = namespace(fn, content=content, style=style)
    _check_style(fn, content, style)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{fn}: alpha must be a number in [0, 1]; got {alpha!r}")
    alpha = float(alpha)
    unbiased = check_bool(fn, "unbiased", unbiased)
    cutoff = None if eig_cutoff is None else check_positive(fn, "eig_cutoff", eig_cutoff)
    eps_s = _check_style_eps(fn, style_eps, check_nonnegative(fn, "eps", eps))
    if content.shape[1] == 0:
        raise ValueError(f"{fn}: content must have at least 1 channel to whiten; got shape {tuple(content.shape)}")
    part = _part.Partition("instance")
    cshape, sshape = tuple(content.shape), tuple(style.shape)
    op = dataclasses.replace(whitening_operation(fn, part, cshape, "zca", group_size, 1, eps), source="content",
                             ddof=1 if unbiased else 0, cutoff=cutoff)
    if math.prod(cshape[2:]) < 2 or math.prod(sshape[2:]) < 2:
        raise ValueError(f"{fn}: expected more than 1 spatial position in content and style; got {cshape}, {sshape}")
    cd = compute_dtype(xp, content.dtype)
    x = to_compute(xp, content, cd)
    # the content: the whitening NOP on the instance partition (x̂ = Σ_c^-1/2·(x − μ_c))
    xhat, op_res, _ = op.forward(xp, x, part.axes(cshape))
    lay_c = op.layout(cshape)
    # the style: Σ_s = a_s·Sc·Scᵀ/M_s + ε_s·I on the same layout (a_s = M_s/(M_s − 1) if unbiased),
    # then its symmetric square root A (truncated with a cut-off)
    lay_s = layout(sshape, part.axes(sshape), part.feature_axes(sshape), op.group_size)
    a_s = lay_s.m / (lay_s.m - 1) if unbiased else 1.0
    s5 = lay_s.orient(xp, to_compute(xp, style, cd))
    mu_s = _sample_mean(xp, s5)
    sig_s = a_s * _covariance(xp, s5 - mu_s, lay_s.m) + eps_s * _mf.eye_like(xp, op_res[2])
    _check_finite(fn, sig_s, "style", s5)
    eig_s = _mf.eigh(xp, sig_s)
    if cutoff is None:
        _check_spectrum(fn, xp, eig_s[0], eps_s, "style", lay_s.m)
        a, ares = _mf.sqrt_eigh_forward(xp, sig_s, eig_s)
    else:
        _check_kept(fn, xp, eig_s[0], cutoff, eps_s, "style", lay_s.m)
        a, ares = truncated_spectral_forward(xp, eig_s[0], eig_s[1], 0.5, cutoff), eig_s
    y = lay_c.unorient(xp, xp.matmul(a[:, None, ...], lay_c.orient(xp, xhat)) + mu_s)
    if alpha != 1.0:
        y = alpha * y + (1.0 - alpha) * x
    res = Residuals(tuple(op_res) + (s5, mu_s, a) + tuple(ares), (op, lay_s, alpha, len(op_res), a_s, cutoff))
    return _out(xp, y, content.dtype), res


@wct.defbackward
def _wct_backward(res: Residuals, g):
    xp = namespace("wct.backward", cotangent=g)
    op, lay_s, alpha, n_op, a_s, cutoff = res.static
    op_res = res.arrays[:n_op]
    s5, mu_s, a = res.arrays[n_op:n_op + 3]
    ares = res.arrays[n_op + 3:]
    g = to_compute(xp, g, a.dtype)
    cshape = tuple(op_res[0].shape)
    lay_c = op.layout(cshape)
    g5 = lay_c.orient(xp, alpha * g)
    # y = A·X̂ + μ_s: dA = Σ G·X̂ᵀ, dX̂ = Aᵀ·G, dμ_s = Σ G (over the content's samples)
    da = xp.sum(xp.matmul(g5, _mf.mT(xp, lay_c.orient(xp, op.xhat(xp, op_res)))), axis=1)
    dxhat = lay_c.unorient(xp, xp.matmul(_mf.mT(xp, a)[:, None, ...], g5))
    dx = op.backward(xp, op_res, op.reduce_axes, dxhat)
    # the style: Σ_s = a_s·Sc·Scᵀ/M_s + ε_s·I, dSc = (2a_s/M_s)·dΣ_s·Sc, centred; each style sample gets
    # dμ_s/M_s. dΣ_s: the Loewner backward of Σ^1/2, or of its truncation (eig_cutoff)
    sc = s5 - mu_s
    if cutoff is None:
        dsig = _mf.sqrt_eigh_backward(xp, ares, da)  # symmetric
    else:
        dsig = truncated_spectral_backward(xp, ares, da, 0.5, cutoff)
    dsc = (2.0 * a_s / lay_s.m) * xp.matmul(dsig[:, None, ...], sc)
    dmu = xp.sum(xp.sum(g5, axis=4, keepdims=True), axis=1, keepdims=True)
    ds = dsc - _sample_mean(xp, dsc) + dmu / lay_s.m
    if alpha != 1.0:
        dx = dx + (1.0 - alpha) * g
    return dx, lay_s.unorient(xp, ds)
