"""Issue 11's bad-input list for the whitening, weight and gradient methods: every row is a call that
used to give a wrong answer, a hang, a deep crash (``LinAlgError``, ``ZeroDivisionError``,
``AttributeError``) or a misleading message, and now gives the formula's answer or a clear
``ValueError``/``TypeError`` naming the function and the argument.

Every row runs on every installed array library (the ``backend`` fixture: numpy with and without
kernels, torch, jax, array_api_strict). The activation methods have the same table in
``tests/test_bad_input.py``.

Numerical rows compare with the same formula evaluated where nothing under/overflows (the unscaled
weight, or float64), with tolerances from the dtype's ε and the problem's conditioning (each says how).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import normref
from tests.conftest import On

RNG = np.random.default_rng(1111)
X = RNG.standard_normal((8, 4, 3))  # whitening input: 24 samples of 4 channels
V = RNG.standard_normal((3, 6))  # a weight: 3 rows, fan-in 6 (OWN: one group of 3 ≤ fan_in − 1)
U3 = np.ones(3) / np.sqrt(3.0)  # a spectral-norm state u
C3 = RNG.standard_normal((2, 3, 4, 4))  # wct content / style
S3 = RNG.standard_normal((2, 3, 5, 3))
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


@pytest.fixture
def backend(backend):
    """conftest's ``backend``, less dask: normref never computes a lazy array, so every value check
    (finiteness, σ = 0, the overflow message, the weights' power-of-two scaling, the PCA gap warning) is
    skipped for it, as under ``jax.jit`` (``normref._xp.is_lazy``); dask's rows are in its own tests."""
    if backend.name == "dask":
        pytest.skip("dask: lazy arrays skip normref's value checks by design (normref._xp.is_lazy)")
    return backend


_On = On  # tests/conftest.py


def _raises(exc, pattern, call, a):
    with pytest.raises(exc, match=pattern):
        call(a)


# each row: (id, call taking the converter `a`, exception, pattern of the message)
CASES = [
    # -- 2. OWN on NaN/Inf weights: a clear error before eigh (was LinAlgError from inside eigh) -------
    ("own-nan", lambda a: normref.orthogonal_weight_norm(a(np.where(np.arange(18).reshape(3, 6) == 4, np.nan, V))),
     ValueError, r"orthogonal_weight_norm: v must be finite; got nan at flat index 4"),
    ("own-inf", lambda a: normref.orthogonal_weight_norm(a(np.where(np.arange(18).reshape(3, 6) == 0, np.inf, V))),
     ValueError, r"orthogonal_weight_norm: v must be finite; got inf"),
    ("oni-nan", lambda a: normref.oni(a(np.where(np.arange(18).reshape(3, 6) == 7, np.nan, V))),
     ValueError, r"oni: v must be finite; got nan"),
    # -- 3. iteration counts are bounded (10**12 used to hang) ----------------------------------------
    ("iter-norm-iterations-1e12", lambda a: normref.iter_norm(a(X), training=True, iterations=10**12),
     ValueError, r"iter_norm: iterations must be an integer in \[1, 1000\].*got 1000000000000"),
    ("iter-norm-iterations-1001", lambda a: normref.iter_norm(a(X), training=True, iterations=1001),
     ValueError, r"iter_norm: iterations must be an integer in \[1, 1000\].*got 1001"),
    ("oni-iterations-1e12", lambda a: normref.oni(a(V), iterations=10**12),
     ValueError, r"oni: iterations must be an integer in \[1, 1000\]"),
    ("oni-iterations-1001", lambda a: normref.oni(a(V), iterations=1001), ValueError, r"oni: iterations must be .*got 1001"),
    ("bw-iternorm-iterations", lambda a: normref.batch_whitening(a(X), training=True, method="iternorm", iterations=1001),
     ValueError, r"batch_whitening: iterations must be an integer in \[1, 1000\]"),
    ("bw-newton-schulz-iterations", lambda a: normref.batch_whitening(a(X), training=True, method="newton_schulz", iterations=1001),
     ValueError, r"batch_whitening: iterations must be an integer in \[1, 1000\]"),
    ("wm-newton-schulz-iterations", lambda a: normref.whitening_matrix(a(np.eye(3)[None] * 2.0), method="newton_schulz", iterations=1001),
     ValueError, r"whitening_matrix: iterations must be an integer in \[1, 1000\]"),
    ("normalize-iternorm-iterations", lambda a: normref.normalize(a(X), operation="iternorm", iterations=1001),
     ValueError, r"normalize: iterations must be an integer in \[1, 1000\]"),
    ("sn-power-iterations", lambda a: normref.spectral_norm(a(V), a(U3), n_power_iterations=1001),
     ValueError, r"spectral_norm: n_power_iterations must be an integer in \[0, 1000\].*got 1001"),
    ("sn-power-iterations-1e12", lambda a: normref.spectral_norm(a(V), a(U3), n_power_iterations=10**12),
     ValueError, r"spectral_norm: n_power_iterations must be an integer in \[0, 1000\]"),
    # -- 4. messages that say what happened ----------------------------------------------------------
    # |x| = 1e20 is finite in float32, but Σ = Xc·Xcᵀ/m (≈ 1e40) is not: it used to say "non-finite"
    ("bw-f32-covariance-overflow", lambda a: normref.batch_whitening(a.f32(X * 1e20), training=True),
     ValueError, r"batch_whitening: input is finite \(max \|input\| = .*e\+20\) but the covariance .* overflows float32"),
    ("iter-norm-f32-covariance-overflow", lambda a: normref.iter_norm(a.f32(X * 1e20), training=True),
     ValueError, r"iter_norm: input is finite .* overflows float32"),
    ("bw-f64-covariance-overflow", lambda a: normref.batch_whitening(a(X * 1e160), training=True, method="cholesky"),
     ValueError, r"batch_whitening: input is finite .* overflows float64.*rescale input"),
    ("bw-nan-still-non-finite", lambda a: normref.batch_whitening(a(np.where(X > 2.0, np.nan, X)), training=True),
     ValueError, r"batch_whitening: input has non-finite values"),
    # wct whitens `content`: the message names content (it used to say "input")
    ("wct-nan-content", lambda a: normref.wct(a(np.where(C3 > 2.0, np.nan, C3)), a(S3)),
     ValueError, r"wct: content has non-finite values .*covariance of a group of content"),
    ("wct-singular-content", lambda a: normref.wct(a(np.repeat(C3[:, :1], 3, axis=1)), a(S3), eps=0.0),
     ValueError, r"wct: the covariance of a group of content \(eps=0.0\) is not numerically positive definite"),
    ("wct-content-overflow", lambda a: normref.wct(a.f32(C3 * 1e20), a.f32(S3)),
     ValueError, r"wct: content is finite .* overflows float32"),
    # eps = 1e300 makes u and v shrink by ‖·‖/eps each step: σ underflows; it used to blame w
    ("sn-eps-1e300", lambda a: normref.spectral_norm(a(V), a(U3), eps=1e300),
     ValueError, r"spectral_norm: the estimated spectral norm .* underflowed to 0: eps=1e\+300 exceeds the norm"),
    # |W| ≈ 1e-23 (float32) with torch's eps = 1e-12: the eps floor of N(x) = x/max(‖x‖, eps) is active,
    # so by the formula u and v shrink by ≈ ‖W‖/eps ≈ 1e-11 per half-step: after 3 steps σ ≈ 1e-100, and
    # W/σ is not representable. It used to say "σ = 0 (w is zero ...)"; now it names eps and the norm
    ("sn-tiny-f32-eps", lambda a: normref.spectral_norm(a.f32(V * 1e-23), a.f32(U3), n_power_iterations=3),
     ValueError, r"spectral_norm: the estimated spectral norm .* underflowed to 0: eps=1e-12 exceeds the norm ‖Wᵀ·u‖ = .*e-23"),
    ("sn-zero-w", lambda a: normref.spectral_norm(a(np.zeros((3, 6))), a(U3)),
     ValueError, r"spectral_norm: .* is 0 because w is zero"),
    ("sn-u-orthogonal", lambda a: normref.spectral_norm(a(np.outer([1.0, 0.0, 0.0], V[0])), a(np.array([0.0, 1.0, 0.0]))),
     ValueError, r"spectral_norm: .*Wᵀ·u = 0 \(u is orthogonal to the range of W\)"),
    # -- 5. empty batches and weights -----------------------------------------------------------------
    ("bw-no-channels", lambda a: normref.batch_whitening(a(np.zeros((4, 0, 3))), training=True),
     ValueError, r"batch_whitening: expected at least 1 feature to whiten; got input.shape\[1\] = 0"),
    ("dbn-no-channels", lambda a: normref.decorrelated_batch_norm(a(np.zeros((4, 0, 3))), training=True),
     ValueError, r"decorrelated_batch_norm: expected at least 1 feature to whiten"),
    ("iter-norm-no-channels", lambda a: normref.iter_norm(a(np.zeros((4, 0, 3))), training=True),
     ValueError, r"iter_norm: expected at least 1 feature to whiten"),
    ("bw-position-no-positions", lambda a: normref.batch_whitening(a(np.zeros((4, 3, 0))), partition="position"),
     ValueError, r"batch_whitening: expected at least 1 feature to whiten; got the number of positions"),
    ("wm-zero-size-matrix", lambda a: normref.whitening_matrix(a(np.zeros((1, 0, 0)))),
     ValueError, r"whitening_matrix: cov must be at least 1×1 .*got shape \(1, 0, 0\)"),
    ("wct-no-channels", lambda a: normref.wct(a(np.zeros((2, 0, 4, 4))), a(np.zeros((2, 0, 4, 4)))),
     ValueError, r"wct: content must have at least 1 channel"),
    ("bw-no-samples", lambda a: normref.batch_whitening(a(np.zeros((0, 3, 2))), training=True),
     ValueError, r"batch_whitening: expected more than 1 sample per covariance when training .* gives 0"),
    ("iter-norm-no-samples", lambda a: normref.iter_norm(a(np.zeros((0, 3, 2))), training=True),
     ValueError, r"iter_norm: expected more than 1 sample per covariance"),
    ("own-empty", lambda a: normref.orthogonal_weight_norm(a(np.zeros((0, 6)))), ValueError, r"orthogonal_weight_norm: v must not be empty"),
    ("oni-empty", lambda a: normref.oni(a(np.zeros((3, 0)))), ValueError, r"oni: v must not be empty"),
    ("wn-empty", lambda a: normref.weight_norm(a(np.zeros((0, 3))), a(np.zeros((0, 1)))), ValueError, r"weight_norm: v must not be empty"),
    ("sn-empty", lambda a: normref.spectral_norm(a(np.zeros((3, 0))), a(U3)), ValueError, r"spectral_norm: w must not be empty"),
    # -- 6. flags are bools (np.bool_ accepted), not truthiness ---------------------------------------
    ("bw-training-str", lambda a: normref.batch_whitening(a(X), training="False"), TypeError, r"batch_whitening: training must be a bool.*'False'"),
    ("bw-training-int", lambda a: normref.batch_whitening(a(X), training=1), TypeError, r"batch_whitening: training must be a bool"),
    ("dbn-training-str", lambda a: normref.decorrelated_batch_norm(a(X), training="False"), TypeError, r"decorrelated_batch_norm: training must be a bool"),
    ("iter-norm-training-str", lambda a: normref.iter_norm(a(X), training="no"), TypeError, r"iter_norm: training must be a bool"),
    ("wc-training-str", lambda a: normref.whitening_coloring(a(X), training="False"), TypeError, r"whitening_coloring: training must be a bool"),
    ("iter-norm-coupled-str", lambda a: normref.iter_norm(a(X), training=True, coupled="False"), TypeError, r"iter_norm: coupled must be True, False or None"),
    ("block-ratio-str", lambda a: normref.block_gradient_norm(a(V), a(V), ratio="False"), TypeError, r"block_gradient_norm: ratio must be a bool"),
    ("block-ratio-int", lambda a: normref.block_gradient_norm(a(V), a(V), ratio=1), TypeError, r"block_gradient_norm: ratio must be a bool"),
    # -- 7. arguments this call does not use are still checked ---------------------------------------
    ("bw-num-groups-unused", lambda a: normref.batch_whitening(a(X), training=True, partition="batch", num_groups=-1),
     ValueError, r"batch_whitening: num_groups must be an integer >= 1; got -1"),
    ("bw-batch-groups-unused", lambda a: normref.batch_whitening(a(X), training=True, batch_groups=0),
     ValueError, r"batch_whitening: batch_groups must be an integer >= 1; got 0"),
    ("bw-normalized-ndim-unused", lambda a: normref.batch_whitening(a(X), training=True, partition="instance", normalized_ndim=0),
     ValueError, r"batch_whitening: normalized_ndim must be an integer >= 1; got 0"),
    ("bw-num-groups-type-unused", lambda a: normref.batch_whitening(a(X), training=True, num_groups=2.5),
     TypeError, r"batch_whitening: num_groups must be an integer"),
    ("bw-num-batches-unused", lambda a: normref.batch_whitening(a(X), a(np.zeros(4)), a(np.eye(4)[None]), training=True,
                                                                num_batches_tracked=-2),
     ValueError, r"batch_whitening: num_batches_tracked must be an integer >= 0; got -2"),
    ("iter-norm-num-batches-unused", lambda a: normref.iter_norm(a(X), training=True, num_batches_tracked="3"),
     TypeError, r"iter_norm: num_batches_tracked must be an integer"),
    # -- 8. a required array given as None: TypeError naming it (was AttributeError) -----------------
    ("bw-none", lambda a: normref.batch_whitening(None, training=True), TypeError, r"batch_whitening: input must be an array.*got None"),
    ("dbn-none", lambda a: normref.decorrelated_batch_norm(None, a(np.zeros(4)), a(np.eye(4)[None])), TypeError, r"decorrelated_batch_norm: input must be an array.*got None"),
    ("iter-norm-none", lambda a: normref.iter_norm(None, training=True), TypeError, r"iter_norm: input must be an array.*got None"),
    ("wc-none", lambda a: normref.whitening_coloring(None, training=True), TypeError, r"whitening_coloring: input must be an array.*got None"),
    ("wm-none", lambda a: normref.whitening_matrix(None), TypeError, r"whitening_matrix: cov must be an array.*got None"),
    ("adain-none", lambda a: normref.adain(None, a(S3)), TypeError, r"adain: content must be an array.*got None"),
    ("adain-style-none", lambda a: normref.adain(a(C3), None), TypeError, r"adain: style must be an array.*got None"),
    ("wct-none", lambda a: normref.wct(None, a(S3)), TypeError, r"wct: content must be an array.*got None"),
    ("wct-style-none", lambda a: normref.wct(a(C3), None), TypeError, r"wct: style must be an array.*got None"),
    ("wn-none", lambda a: normref.weight_norm(None, a(np.ones((3, 1)))), TypeError, r"weight_norm: v must be an array.*got None"),
    ("wn-g-none", lambda a: normref.weight_norm(a(V), None), TypeError, r"weight_norm: g must be an array.*got None"),
    ("cwn-none", lambda a: normref.centered_weight_norm(None), TypeError, r"centered_weight_norm: v must be an array.*got None"),
    ("ws-none", lambda a: normref.weight_standardization(None), TypeError, r"weight_standardization: v must be an array.*got None"),
    ("sn-none", lambda a: normref.spectral_norm(None, a(U3)), TypeError, r"spectral_norm: w must be an array.*got None"),
    ("sn-u-none", lambda a: normref.spectral_norm(a(V), None), TypeError, r"spectral_norm: u must be an array.*got None"),
    ("own-none", lambda a: normref.orthogonal_weight_norm(None), TypeError, r"orthogonal_weight_norm: v must be an array.*got None"),
    ("oni-none", lambda a: normref.oni(None), TypeError, r"oni: v must be an array.*got None"),
    ("penalty-none", lambda a: normref.orthogonal_penalty(None), TypeError, r"orthogonal_penalty: w must be an array.*got None"),
    ("cosine-none", lambda a: normref.cosine_norm(None, a(V)), TypeError, r"cosine_norm: x must be an array.*got None"),
    ("cosine-w-none", lambda a: normref.cosine_norm(a(np.ones((2, 6))), None), TypeError, r"cosine_norm: w must be an array.*got None"),
    ("gc-none", lambda a: normref.gradient_centralization(a(V), None), TypeError, r"gradient_centralization: grad must be an array.*got None"),
    ("block-none", lambda a: normref.block_gradient_norm(a(V), None), TypeError, r"block_gradient_norm: grad must be an array.*got None"),
    # a weight the formula needs (its norm): refused by name (a ValueError, as it always was)
    ("lars-weight-none", lambda a: normref.lars(None, a(V)), ValueError, r"lars: weight is required here"),
    ("block-ratio-weight-none", lambda a: normref.block_gradient_norm(None, a(V), ratio=True), ValueError,
     r"block_gradient_norm: weight is required here"),
    ("lars-none", lambda a: normref.lars(a(V), None), TypeError, r"lars: grad must be an array.*got None"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(backend, case):
    _, call, exc, pattern = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # iternorm's instability warning, before the check
        _raises(exc, pattern, call, _On(backend))


# --------------------------------------------------------------------------------------------------
# rows whose answer is a value: the formula's, where the old code under/overflowed

# the weight rows: W(a·V) = W(V) for a > 0 (WN, CWN, OWN, ONI with eps = 0, spectral norm with eps
# scaled too). Scaling V by a = 1e±20 in float32 rounds each entry (ε₃₂/2 relative); WN/CWN rows are
# then accurate to a few ε₃₂ (a norm of 6 terms), OWN to κ(Vc·Vcᵀ)·ε₃₂ (eigh). κ of this V's Gram is
# below 10, so 64·κ·ε₃₂ ≈ 8e-5 bounds every row with a margin.
_KAPPA_V = float(np.linalg.cond((V - V.mean(1, keepdims=True)) @ (V - V.mean(1, keepdims=True)).T))
_TOL32 = 64.0 * max(_KAPPA_V, 1.0) * EPS32

VALUE_CASES = [
    # (id, f(a, weight) -> array, scale: tiny/huge float32 weights give f(1·V)) — used to raise "zero
    # slice" / "constant row" / LinAlgError, or return zeros (huge: ‖v‖ = inf)
    ("wn-tiny-f32", lambda a, w: normref.weight_norm(w, a.f32(np.full((3, 1), 2.0))), 1e-23),
    ("wn-huge-f32", lambda a, w: normref.weight_norm(w, a.f32(np.full((3, 1), 2.0))), 1e20),
    ("wn-dim-none-tiny-f32", lambda a, w: normref.weight_norm(w, a.f32(np.ones(())), dim=None), 1e-23),
    ("cwn-tiny-f32", lambda a, w: normref.centered_weight_norm(w), 1e-23),
    ("cwn-huge-f32", lambda a, w: normref.centered_weight_norm(w), 1e20),
    ("own-tiny-f32", lambda a, w: normref.orthogonal_weight_norm(w), 1e-22),
    ("own-huge-f32", lambda a, w: normref.orthogonal_weight_norm(w), 1e20),
    ("oni-tiny-f32", lambda a, w: normref.oni(w, iterations=5), 1e-22),
    ("oni-huge-f32", lambda a, w: normref.oni(w, iterations=5), 1e20),
    ("sn-huge-f32", lambda a, w: normref.spectral_norm(w, a.f32(U3), n_power_iterations=3).weight, 1e20),
    # eps = 1e-30 is below every norm the power iteration divides by, at both scales: W/σ is scale-free;
    # the old float32 code lost Σx² (≈ 1e-46) to subnormals and returned "σ = 0"
    ("sn-tiny-f32", lambda a, w: normref.spectral_norm(w, a.f32(U3), n_power_iterations=3, eps=1e-30).weight, 1e-23),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_scaled_weights_give_the_formula(backend, case):
    _, f, scale = case
    a = _On(backend)
    want = a.np(f(a, a.f32(V)))
    got = a.np(f(a, a.f32(V * scale)))
    assert np.all(np.isfinite(got))
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err <= _TOL32, (err, _TOL32)


def test_own_overflowing_float64_weights(backend):
    """|V| = 1e160: Vc·Vcᵀ ≈ 1e321 overflows float64 (used to raise LinAlgError from eigh). W is
    scale-invariant; the scaling by 1e160 rounds (ε₆₄/2), so the tolerance is 64·κ·ε₆₄."""
    a = _On(backend)
    want = a.np(normref.orthogonal_weight_norm(a(V)))
    got = a.np(normref.orthogonal_weight_norm(a(V * 1e160)))
    assert float(np.max(np.abs(got - want))) <= 64.0 * max(_KAPPA_V, 1.0) * EPS64


def test_spectral_norm_tiny_float32_weights(backend):
    """|W| ≈ 1e-23 in float32 with torch's eps = 1e-12 and one power step: the eps floor is active, so
    by the formula v = Wᵀ·u/eps and u = W·v/eps are not unit vectors and σ = uᵀ·W·v ≈ 1e-56 (below
    float32's range, but W/σ ≈ 1e33 and u, v ≈ 1e-22, 1e-11 are representable): the old code's Σx²
    underflowed and it raised "σ = 0 (w is zero ...)". Compared with the same formula in NumPy float64
    on the same (float32-rounded) numbers, where nothing underflows: a few roundings of 6-term dot
    products and divisions, 64·ε₃₂."""
    a = _On(backend)
    w32 = (V * 1e-23).astype(np.float32).astype(np.float64)
    got = normref.spectral_norm(a.f32(w32), a.f32(U3))
    ref = normref.spectral_norm(w32, U3.astype(np.float32).astype(np.float64))  # NumPy float64
    for g, r in zip(got, ref):
        g, r = a.np(g), np.asarray(r)
        assert np.all(np.isfinite(g))
        assert float(np.max(np.abs(g - r)) / np.max(np.abs(r))) <= 64.0 * EPS32


def test_scaled_weights_backward(backend):
    """The backward of OWN and spectral norm at |V| = 1e20 (float32): ∂W/∂V scales as 1/a, so
    a·dV(a·V) = dV(V), to the forward's tolerance 64·κ·ε₃₂."""
    a = _On(backend)
    g = RNG.standard_normal((3, 6))
    for f in (lambda w: normref.vjp(normref.orthogonal_weight_norm, w),
              lambda w: normref.vjp(normref.spectral_norm, w, a.f32(U3), 3)):
        _, pb1 = f(a.f32(V))
        _, pb2 = f(a.f32(V * 1e20))
        d1 = a.np(pb1(a.f32(g))[0])
        d2 = a.np(pb2(a.f32(g))[0]) * 1e20
        assert np.all(np.isfinite(d2))
        assert float(np.max(np.abs(d2 - d1)) / np.max(np.abs(d1))) <= _TOL32


def test_empty_gradient_centralization(backend):
    """An empty gradient (no neuron, or no fan-in) has nothing to centre: the result is an empty array
    of the same shape (it used to raise a reshape error), and so is its backward."""
    a = _On(backend)
    for shape in [(0, 3), (3, 0), (2, 0, 3)]:
        g = a(np.zeros(shape))
        y = normref.gradient_centralization(None, g)
        assert tuple(y.shape) == shape
        _, pb = normref.vjp(normref.gradient_centralization, None, g)
        assert tuple(pb(a(np.zeros(shape)))[1].shape) == shape


def test_empty_style_transfer_batches(backend):
    """adain and wct on an empty batch (N = 0; adain also C = 0): an empty output of content's shape
    (adain used to raise a reshape error); no statistic is computed."""
    a = _On(backend)
    for shape in [(0, 3, 4), (2, 0, 4)]:
        assert tuple(normref.adain(a(np.zeros(shape)), a(np.zeros(shape))).shape) == shape
    assert tuple(normref.wct(a(np.zeros((0, 3, 4, 4))), a(np.zeros((0, 3, 5, 3)))).shape) == (0, 3, 4, 4)


def test_numpy_bool_flags(backend):
    """``np.bool_`` is a bool (it used to be refused for ``ratio`` and ``coupled``)."""
    a = _On(backend)
    w, g = a(V), a(V * 0.1)
    want = a.np(normref.block_gradient_norm(w, g, ratio=True))
    assert np.array_equal(a.np(normref.block_gradient_norm(w, g, ratio=np.bool_(True))), want)
    want = a.np(normref.iter_norm(a(X), training=True, coupled=True))
    assert np.array_equal(a.np(normref.iter_norm(a(X), training=True, coupled=np.bool_(True))), want)
    assert np.array_equal(a.np(normref.batch_whitening(a(X), training=np.bool_(True))),
                          a.np(normref.batch_whitening(a(X), training=True)))


# --------------------------------------------------------------------------------------------------
# 1. PCA whitening backward at numerically repeated eigenvalues


def _spd(lam, seed=3):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(lam), len(lam))))
    return ((q * np.asarray(lam, np.float64)) @ q.T)[None]


def test_pca_backward_at_a_repeated_eigenvalue_is_bounded_and_warns(backend):
    """λ = {1, 1 + 1e-12, 2}: the rotation term 1/(λj − λi) of the close pair used to give |dS| ≈ 1e9
    here (≈ 1e14 at a gap of one ulp), silently. Now the pair is degenerate (gap ≤ √ε₆₄ = 1.5e-8,
    relative), its term is dropped, a RuntimeWarning names the gap, and dS is the size of the other
    terms: the remaining gaps are ≥ 1, so |dS| ≲ ‖dW‖·max f(λ)/gap ≈ 10 (bound 1e2)."""
    a = _On(backend)
    for gap in (1e-12, 2.2e-16, 0.0):
        s = _spd([1.0, 1.0 + gap, 2.0])
        with pytest.warns(RuntimeWarning, match=r"numerically repeated \(relative gap .* ≤ τ = √ε"):
            _, pb = normref.vjp(normref.whitening_matrix, a(s), method="pca")
            (ds,) = pb(a(np.ones((1, 3, 3))))
        ds = a.np(ds)
        assert np.all(np.isfinite(ds)) and float(np.max(np.abs(ds))) <= 1e2, (gap, float(np.max(np.abs(ds))))


def _fd(f, s, v, h):
    """Central difference of f along v at s (NumPy float64)."""
    return (f(s + h * v) - f(s - h * v)) / (2.0 * h)


def test_zca_at_a_near_repeated_eigenvalue_agrees_with_finite_differences(backend):
    """ZCA's Loewner backward has no 1/(λi − λj): at a relative gap of 1e-12 it is the derivative. The
    function is smooth on the scale λ_min = 1, so a central difference with h = 1e-5 has truncation
    error ≈ h² = 1e-10 and rounding ≈ ε₆₄/h = 2e-11: tolerance 1e-7 (relative)."""
    a = _On(backend)
    s = _spd([1.0, 1.0 + 1e-12, 2.0])
    g = np.random.default_rng(5).standard_normal((1, 3, 3))
    _, pb = normref.vjp(normref.whitening_matrix, a(s), method="zca")
    ds = a.np(pb(a(g))[0])
    worst = 0.0
    for k in range(3):
        v = np.random.default_rng(10 + k).standard_normal((1, 3, 3))
        v = 0.5 * (v + v.transpose(0, 2, 1))
        num = _fd(lambda t: float(np.sum(g * np.asarray(normref.whitening_matrix(t, method="zca")))), s, v, 1e-5)
        worst = max(worst, abs(float(np.sum(ds * v)) - num) / abs(num))
    assert worst <= 1e-7, worst


def test_pca_above_the_gap_tolerance_is_unchanged(backend):
    """λ = {1, 1 + 1e-3, 2}: a gap far above √ε, no warning, and the full eigenvector derivative. The
    rows vary on the scale of the gap, so the step is h = 1e-7 (h/gap = 1e-4: truncation ≈ 1e-8
    relative; rounding ≈ ε₆₄/(h·gap) = 2e-6 relative to a derivative of size 1/gap): tolerance 1e-4."""
    a = _On(backend)
    s = _spd([1.0, 1.0 + 1e-3, 2.0])
    g = np.random.default_rng(6).standard_normal((1, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, pb = normref.vjp(normref.whitening_matrix, a(s), method="pca")
        ds = a.np(pb(a(g))[0])
    v = np.random.default_rng(7).standard_normal((1, 3, 3))
    v = 0.5 * (v + v.transpose(0, 2, 1))
    num = _fd(lambda t: float(np.sum(g * np.asarray(normref.whitening_matrix(t, method="pca")))), s, v, 1e-7)
    assert abs(float(np.sum(ds * v)) - num) <= 1e-4 * abs(num), (float(np.sum(ds * v)), num)


def test_pca_gap_rule_through_batch_whitening(backend):
    """The same rule inside batch whitening: data whose batch covariance is exactly 4·I (Hadamard
    patterns; all eigenvalues equal) — a RuntimeWarning and a finite gradient of the size of the
    output's (|dx| ≤ 1e2 for a unit cotangent), not 1e14."""
    h = np.array([[1.0]])
    while h.shape[0] < 8:
        h = np.block([[h, h], [h, -h]])
    x = (h[1:4].T * 2.0).reshape(8, 3)  # (N = 8, C = 3), centred columns, Xcᵀ·Xc/8 = 4·I exactly
    a = _On(backend)
    with pytest.warns(RuntimeWarning, match="numerically repeated"):
        _, pb = normref.vjp(normref.batch_whitening, a(x), training=True, method="pca", eps=0.0)
        dx = a.np(pb(a(np.ones((8, 3))))[0])
    assert np.all(np.isfinite(dx)) and float(np.max(np.abs(dx))) <= 1e2
