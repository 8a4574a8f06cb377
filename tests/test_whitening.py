"""Whitening (issue 3): ZCA, PCA, Cholesky, IterNorm, Newton–Schulz, their presets, AdaIN and WCT.

Tolerances (how each is derived)
- backward vs central finite differences (float64): ≤ 1e-6 relative, the issue's bound. With
  h = ε₆₄^{1/3}·scale the difference quotient's own error is ~1e-10 on a unit-scaled problem
  (conformance/fd.py); where the spectrum is wide (λ_min = 1e-6·λ_max) the step is scaled to λ_min
  instead (h = ε₆₄^{1/3}·λ_min), since the function changes on that scale.
- float64 backends vs the NumPy float64 evaluation: the same formulas in another order; an eigh of a
  d ≤ 4 matrix with eigenvalue gaps ≥ g is backward stable, so eigenvectors move by ~ε·‖Σ‖/g and W
  by ~ε·κ(Σ)·‖W‖: TOL64 = 1e3·ε₆₄·cond, cond = the example's κ(Σ) (Example.cond).
- properties (whiteness, W = Wᵀ, W·Σ·W = I): the residual of a backward-stable eigh/cholesky is
  ~d·ε·κ(Σ); we allow 64·d·ε₆₄·κ(Σ).
- group size 1 vs batch_norm: two formulas for the same number; 1e3·ε₆₄ (as for the standardization
  family).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normref
from normref import matfun
from normref.conformance.fd import H, directional_fd, fd_check
from tests.conftest import assert_same_kind

EPS64 = float(np.finfo(np.float64).eps)
TOL64 = 1e3 * EPS64
FD_TOL = 1e-6
METHODS = normref.WHITENING_METHODS

FAMILY = [normref.get(n) for n in
          ("whitening_matrix", "batch_whitening", "decorrelated_batch_norm", "iter_norm", "whitening_coloring", "adain", "wct")]
IDS = [m.name for m in FAMILY]


def _cases(m, seed=0):
    return list(m.examples(np.random.default_rng(seed)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if a.size else 0.0


def _xnp():
    import array_api_compat.numpy as xnp

    return xnp


def _spd(rng, lam):
    d = len(lam)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.asarray(lam, np.float64)) @ q.T


def _whitened_data(rng, n, d):
    """(n, d) data whose biased covariance is exactly I up to rounding: centred orthonormal columns · √n."""
    a = rng.standard_normal((n, d))
    a -= a.mean(axis=0)
    q, _ = np.linalg.qr(a)
    return q * math.sqrt(n)


# ---------------------------------------------------------------------------------------------------
# registration and finite differences of every registered example


def test_registered_and_exported():
    for m in FAMILY:
        assert m.category == "activation" and m.survey and m.paper and m.examples is not None
        assert getattr(normref, m.name) is m
    for name in ("WhiteningResult", "WHITENING_METHODS"):
        assert name in normref.__all__
    assert set(METHODS) == {"zca", "pca", "cholesky", "iternorm", "newton_schulz"}


@pytest.mark.parametrize("m", FAMILY, ids=IDS)
def test_finite_differences_examples(m):
    worst = 0.0
    for i, ex in enumerate(_cases(m)):
        r = fd_check(m, ex.args, ex.kwargs, seed=i)
        assert r.max_error <= FD_TOL, f"{m.name} [{ex.label}]: {r.errors}"
        worst = max(worst, r.max_error)
    print(f"{m.name}: largest finite-difference error {worst:.2e}")


@pytest.mark.parametrize("name", METHODS)
def test_matfun_pairs_finite_differences(name):
    """Each matfun forward/backward on its own, along symmetric and non-symmetric directions."""
    xp = _xnp()
    rng = np.random.default_rng(5)
    s = np.stack([_spd(rng, [0.3, 1.0, 2.5, 6.0]), _spd(rng, [0.8, 0.9, 1.7, 3.0])])
    f = lambda a: matfun.whitening_matrix_forward(xp, a, name, 6)[0]  # noqa: E731
    w, res = matfun.whitening_matrix_forward(xp, s, name, 6)
    g = rng.standard_normal(w.shape)
    ds = matfun.whitening_matrix_backward(xp, res, g, name)
    assert np.allclose(ds, np.swapaxes(ds, -1, -2), atol=1e-13 * np.abs(ds).max())  # symmetric
    for k in range(3):
        v = rng.standard_normal(s.shape)
        if k == 0:
            v = v + np.swapaxes(v, -1, -2)
        v /= np.linalg.norm(v)
        h = H * np.abs(s).max()
        num = (np.sum(g * f(s + h * v)) - np.sum(g * f(s - h * v))) / (2 * h)
        assert abs(np.sum(ds * v) - num) <= FD_TOL * abs(num), (name, np.sum(ds * v), num)


def test_sqrt_matches_and_finite_differences():
    xp = _xnp()
    rng = np.random.default_rng(6)
    s = _spd(rng, [0.5, 1.0, 1.0 + 1e-9, 4.0])[None]
    a, res = matfun.sqrt_eigh_forward(xp, s)
    assert _rel(a @ a, s) < 64 * 4 * EPS64 * 8
    g = rng.standard_normal(a.shape)
    ds = matfun.sqrt_eigh_backward(xp, res, g)
    v = rng.standard_normal(s.shape)
    v /= np.linalg.norm(v)
    h = H
    num = (np.sum(g * matfun.sqrt_eigh_forward(xp, s + h * v)[0]) - np.sum(g * matfun.sqrt_eigh_forward(xp, s - h * v)[0])) / (2 * h)
    assert abs(np.sum(ds * v) - num) <= FD_TOL * abs(num)


# ---------------------------------------------------------------------------------------------------
# the hard cases of the issue: equal eigenvalues, a 1e6 spread, rank deficiency, groups of 1


@pytest.mark.parametrize("method", ["zca", "cholesky", "iternorm", "newton_schulz"])
def test_equal_eigenvalues_exactly(method):
    """Σ = 2·I exactly (every eigenvalue equal), and data whose Σ is 4·I up to rounding: the Loewner
    form (zca) has no 1/(λi − λj), so it stays exact where eigenvalues coincide."""
    s = 2.0 * np.eye(4)[None]
    r = fd_check(normref.whitening_matrix, (s,), dict(method=method), directions=4)
    assert r.max_error <= FD_TOL, r.details
    x = _whitened_data(np.random.default_rng(1), 8, 3) * 2.0
    r2 = fd_check(normref.batch_whitening, (x,), dict(training=True, method=method, eps=0.0), directions=4)
    assert r2.max_error <= FD_TOL, r2.details
    print(f"\n{method}: Σ = 2I exactly: largest finite-difference error {r.max_error:.2e}; "
          f"data with Σ = 4I: {r2.max_error:.2e}")


def test_nearly_equal_eigenvalues_and_pca_at_equal():
    """Eigenvalues 1e-9 apart: the Loewner form needs no division by the gap (zca within 1e-6 of
    finite differences). PCA is not differentiable at equal eigenvalues (documented): its backward
    drops the rotation term there and stays finite instead of returning inf/NaN."""
    rng = np.random.default_rng(8)
    s = _spd(rng, [0.7, 1.0, 1.0 + 1e-9, 2.0])[None]
    r = fd_check(normref.whitening_matrix, (s,), dict(method="zca"), directions=4)
    assert r.max_error <= FD_TOL, r.details
    _, pb = normref.vjp(normref.whitening_matrix, 2.0 * np.eye(3)[None], method="pca")
    (ds,) = pb(rng.standard_normal((1, 3, 3)))
    assert np.all(np.isfinite(ds))


def test_jax_jit():
    """Forward and analytic backward trace under jax.jit (the definiteness checks are skipped there)."""
    jax = pytest.importorskip("jax")
    from normref.conformance.backends import get_backend

    get_backend("jax")  # enables x64
    x = np.random.default_rng(10).standard_normal((6, 4, 3))
    xj = jax.numpy.asarray(x)
    for method in ("zca", "cholesky"):
        def fb(a):
            y, pb = normref.vjp(normref.batch_whitening, a, training=True, method=method, group_size=2)
            return y, pb(jax.numpy.ones_like(y))[0]

        y, dx = jax.jit(fb)(xj)
        y0, pb0 = normref.vjp(normref.batch_whitening, x, training=True, method=method, group_size=2)
        assert _rel(np.asarray(y), y0) <= TOL64 * 10
        assert _rel(np.asarray(dx), pb0(np.ones_like(y0))[0]) <= TOL64 * 10


def test_equal_eigenvalues_torch_autograd_is_wrong_normref_is_right():
    """Data whose covariance is I up to rounding: torch autograd through torch.linalg.eigh divides
    by λi − λj ≈ 1e-16 and returns a finite but wrong directional derivative (or NaN); normref's
    Loewner backward agrees with finite differences. The torch number depends on LAPACK's rounding,
    so the test asserts only that it is off by more than 1e-3 (or not finite); the case below gave
    torch 1.1671 against 0.9309 (finite differences and normref) when this test was written."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    d, m = 3, 8
    x = _whitened_data(rng, m, d)
    eps = 1e-5
    g = rng.standard_normal(x.shape)
    v = rng.standard_normal(x.shape)
    v /= np.linalg.norm(v)
    kw = dict(training=True, eps=eps)
    _, pb = normref.vjp(normref.batch_whitening, x, **kw)
    ours = float(np.sum(pb(g)[0] * v))
    fd = directional_fd(normref.batch_whitening, (x,), kw, 0, v, g)
    xt = torch.tensor(x, requires_grad=True)
    xc = xt - xt.mean(0)
    s = xc.T @ xc / m + eps * torch.eye(d, dtype=torch.float64)
    lam, q = torch.linalg.eigh(s)
    y = xc @ (q @ torch.diag(lam.rsqrt()) @ q.T).T
    (gt,) = torch.autograd.grad(y, xt, torch.tensor(g))
    theirs = float((gt * torch.tensor(v)).sum())
    print(f"\nΣ = I (to rounding): finite differences {fd:.6f}, normref {ours:.6f}, torch autograd {theirs:.6f}")
    assert abs(ours - fd) <= FD_TOL * abs(fd)
    assert not math.isfinite(theirs) or abs(theirs - fd) > 1e-3 * abs(fd)


@pytest.mark.parametrize("method", ["zca", "cholesky", "iternorm", "newton_schulz"])
def test_eigenvalues_1e6_apart(method):
    """λ ∈ {1e-6, 1e-3, 0.3, 1}. For zca/cholesky the function varies on the scale λ_min, and the
    float64 forward (eigh, cholesky) is accurate only to ε·λ_max in absolute terms, so the generic
    step (h ≈ 6e-6 > λ_min) is useless and a step ≪ λ_min drowns in that error. We take
    h = 0.1·λ_min (inside the Taylor series' radius λ_min) and Romberg-extrapolate D(h), D(h/2),
    D(h/4): the h² and h⁴ terms cancel, the h⁶ term is ≈ (h/λ_min)⁶ = 1e-6 times a Taylor coefficient
    well below 1 (measured: ≤ 1e-7 over several seeds), and the round-off stays ≈ 1e-8. The Newton
    methods are polynomials in Σ/tr Σ, smooth on the scale of ‖Σ‖: the generic step is right there."""
    rng = np.random.default_rng(2)
    s = _spd(rng, [1e-6, 1e-3, 0.3, 1.0])[None]
    m = normref.whitening_matrix
    kw = dict(method=method)
    y, pb = normref.vjp(m, s, **kw)
    worst = 0.0
    for _ in range(3):
        g = rng.standard_normal(y.shape)
        (ds,) = pb(g)
        v = rng.standard_normal(s.shape)
        v /= np.linalg.norm(v)
        if method in ("zca", "cholesky"):
            d1, d2, d4 = (directional_fd(m, (s,), kw, 0, v, g, h=1e-7 / k) for k in (1, 2, 4))
            r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
            num = (16 * r2 - r1) / 15
        else:
            num = directional_fd(m, (s,), kw, 0, v, g)
        err = abs(np.sum(ds * v) - num) / abs(num)
        worst = max(worst, err)
        assert err <= FD_TOL, (np.sum(ds * v), num)
    print(f"\n{method}, eigenvalues 1e6 apart: largest finite-difference error {worst:.2e}")


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_batch(method):
    """m = 3 samples for d = 5 features: rank(Xc) = 2, only ε keeps Σ invertible."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5))
    r = fd_check(normref.batch_whitening, (x,), dict(training=True, method=method, eps=0.5), directions=3)
    assert r.max_error <= FD_TOL, r.details


@pytest.mark.parametrize("method", METHODS)
def test_group_size_one_is_batch_norm(method):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 2, 2)) * 2 + 1
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    g = rng.standard_normal(x.shape)
    ours, pb = normref.vjp(normref.batch_whitening, x, None, None, w, b, True, method=method, group_size=1)
    with normref.use_kernels(False):  # batch_norm's array-API formula (its kernels are tested by their owner)
        ref, pbr = normref.vjp(normref.batch_norm, x, None, None, w, b, True)
        ref_grads = pbr(g)
    assert _rel(ours, ref) <= TOL64
    for a, c in zip(pb(g), ref_grads):
        assert (a is None) == (c is None)
        if a is not None:
            assert _rel(a, c) <= TOL64
    # inference: running_cov (C, 1, 1) is running_var
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    y1 = normref.batch_whitening(x, rm, rv.reshape(3, 1, 1), w, b, False, method=method, group_size=1)
    with normref.use_kernels(False):
        y2 = normref.batch_norm(x, rm, rv, w, b, False)
    assert _rel(y1, y2) <= TOL64
    r = fd_check(normref.batch_whitening, (x,), dict(training=True, method=method, group_size=1))
    assert r.max_error <= FD_TOL


# ---------------------------------------------------------------------------------------------------
# every backend


@pytest.mark.parametrize("m", FAMILY, ids=IDS)
def test_every_backend_float64(m, backend):
    cases = _cases(m, seed=11)
    if backend.name == "jax":  # eager JAX compiles every op: two cases per method keep this fast
        cases = [cases[0], cases[-1]]
    for ex in cases:
        out, pb = normref.vjp(m, *ex.args, **ex.kwargs)
        y = np.asarray(m.primary(out))
        g = np.random.default_rng(9).standard_normal(y.shape)
        grads = pb(g)
        args, kwargs = backend.convert(ex.args, ex.kwargs)
        outb, pbb = normref.vjp(m, *args, **kwargs)
        yb = m.primary(outb)
        assert_same_kind(yb, args[0])
        tol = TOL64 * ex.cond
        assert _rel(backend.to_numpy(yb), y) <= tol, (m.name, ex.label)
        if isinstance(out, tuple):
            for a, c in zip(out[1:], outb[1:]):
                assert _rel(backend.to_numpy(c), a) <= tol
        gradsb = pbb(backend.asarray(g))
        for a, c in zip(grads, gradsb):
            assert (a is None) == (c is None)
            if a is not None:
                assert_same_kind(c, args[0])
                assert _rel(backend.to_numpy(c), a) <= tol, (m.name, ex.label)


def test_float32_and_float16_torch():
    """float32 in, float32 out (float16 in: computed in float32, float16 out), against the float64
    result of the same (rounded) input. A backward-stable eigh/cholesky in float32 perturbs W by
    ~d·ε₃₂·κ(Σ) relative: tolerance 64·d·ε₃₂·κ(Σ); float16 adds its final rounding, ε₁₆·max|y|."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((16, 4, 3, 3))
    x[:, 1] += 0.5 * x[:, 0]
    xc = x.transpose(1, 0, 2, 3).reshape(4, -1)
    xc = xc - xc.mean(1, keepdims=True)
    kappa = float(np.linalg.cond(xc @ xc.T / xc.shape[1] + 1e-3 * np.eye(4)))
    for method in METHODS:
        x32 = torch.asarray(x, dtype=torch.float32)
        y = normref.batch_whitening(x32, training=True, method=method, eps=1e-3)
        assert y.dtype == torch.float32
        ref = normref.batch_whitening(x32.double().numpy(), training=True, method=method, eps=1e-3)
        assert _rel(y.numpy(), ref) <= 64 * 4 * float(np.finfo(np.float32).eps) * kappa, method
        x16 = torch.asarray(x, dtype=torch.float16)
        y16 = normref.batch_whitening(x16, training=True, method=method, eps=1e-3)
        assert y16.dtype == torch.float16
        ref16 = normref.batch_whitening(x16.double().numpy(), training=True, method=method, eps=1e-3)
        tol16 = 64 * 4 * float(np.finfo(np.float32).eps) * kappa + float(np.finfo(np.float16).eps)
        assert _rel(y16.double().numpy(), ref16) <= tol16, method


def test_one_batched_eigh_and_cholesky_call(monkeypatch):
    """Every group (and, for the instance partition, every sample) goes through ONE eigh/cholesky call."""
    xp = _xnp()
    calls = {"eigh": [], "cholesky": []}
    orig_eigh, orig_chol = xp.linalg.eigh, xp.linalg.cholesky

    def eigh(a):
        calls["eigh"].append(a.shape)
        return orig_eigh(a)

    def chol(a, **kw):
        calls["cholesky"].append(a.shape)
        return orig_chol(a, **kw)

    monkeypatch.setattr(xp.linalg, "eigh", eigh)
    monkeypatch.setattr(xp.linalg, "cholesky", chol)
    x = np.random.default_rng(0).standard_normal((4, 8, 5))
    normref.batch_whitening(x, training=True, group_size=2)
    normref.batch_whitening(x, training=True, group_size=4, partition="instance")
    normref.batch_whitening(x, training=True, group_size=2, method="cholesky")
    assert calls["eigh"] == [(1, 4, 2, 2), (4, 2, 4, 4)]
    assert calls["cholesky"] == [(1, 4, 2, 2)]


# ---------------------------------------------------------------------------------------------------
# properties (hypothesis)


@st.composite
def _whitening_case(draw):
    n = draw(st.integers(2, 5))
    g = draw(st.integers(1, 3))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    spatial = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    method = draw(st.sampled_from(["zca", "pca", "cholesky"]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    seed = draw(st.integers(0, 2**31))
    return (n, g * c) + tuple(spatial), c, method, eps, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_whitening_case())
def test_hypothesis_whiteness(case):
    """cov(X̂) = W·(Σ − εI)·Wᵀ = I − ε·W·Wᵀ, and for ZCA W = Wᵀ, W·Σ·W = I."""
    shape, c, method, eps, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + rng.uniform(-2, 2)
    n, ch = shape[:2]
    m = n * int(np.prod(shape[2:], dtype=int))
    y = normref.batch_whitening(x, training=True, method=method, group_size=c, eps=eps)
    xv = x.reshape(n, ch // c, c, -1)
    xc = xv - xv.mean(axis=(0, 3), keepdims=True)
    sig = np.einsum("ngim,ngjm->gij", xc, xc) / m + eps * np.eye(c)
    w = normref.whitening_matrix(sig, method=method)
    kappa = float(np.max(np.linalg.cond(sig)))
    tol = 64 * c * EPS64 * kappa
    yv = y.reshape(xv.shape)
    cy = np.einsum("ngim,ngjm->gij", yv, yv) / m
    assert np.max(np.abs(cy + eps * w @ np.swapaxes(w, -1, -2) - np.eye(c))) <= tol
    assert np.max(np.abs(w @ sig @ np.swapaxes(w, -1, -2) - np.eye(c))) <= tol
    assert np.max(np.abs(yv.mean(axis=(0, 3)))) <= tol * max(1.0, float(np.abs(yv).max()))
    if method == "zca":
        assert np.array_equal(w, np.swapaxes(w, -1, -2)) or np.max(np.abs(w - np.swapaxes(w, -1, -2))) <= tol * np.abs(w).max()
        assert np.max(np.abs(w @ sig @ w - np.eye(c))) <= tol
    if method == "cholesky":
        assert np.all(np.triu(w, 1) == 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 5), st.integers(1, 12), st.floats(0.5, 6.0), st.integers(0, 2**31))
def test_hypothesis_iternorm_monotone(d, t, decades, seed):
    """IterNorm stretches the spectrum progressively: the eigenvalues of W_T·Σ·W_Tᵀ increase with T
    (each step maps x = λ·p² to x·(1.5 − 0.5·x)² ≥ x for x ∈ (0, 1]) and never pass 1.

    In floating point each step rounds W·Σ·Wᵀ at the level ε·‖P‖²·‖Σ_N‖ ≤ ε·κ(Σ): tolerance
    64·d·ε·κ·k. That holds for the coupled Newton–Schulz form for every T drawn (≤ 13). IterNorm's
    uncoupled iteration is unstable once an eigen-direction has converged (a rounding error E_ij
    is multiplied by ≈ 1.5 − 0.5·(1 + r + r²), r = √(λj/λi), per step: up to κ/2), so it is checked
    with the same tolerance for T ≤ 6 only, the regime it is used in (the paper's T = 5);
    test_iternorm_unstable_for_large_t documents the rest."""
    rng = np.random.default_rng(seed)
    lam = np.sort(10.0 ** rng.uniform(-decades, 0, d))
    s = _spd(rng, lam)[None]
    kappa = float(lam[-1] / lam[0])
    for method, tmax in (("newton_schulz", t + 1), ("iternorm", min(t + 1, 6))):
        prev = None
        for k in range(1, tmax + 1):
            w = normref.whitening_matrix(s, method=method, iterations=k)
            ev = np.linalg.eigvalsh(w @ s @ np.swapaxes(w, -1, -2))
            tol = 64 * d * EPS64 * k * kappa
            assert np.all(ev <= 1.0 + tol), (method, k, ev)
            if prev is not None:
                assert np.all(ev >= prev - tol), (method, k, ev, prev)
            prev = ev
    # in exact arithmetic the Newton–Schulz coupling computes IterNorm's polynomial
    k = min(t, 6)
    w1 = normref.whitening_matrix(s, method="iternorm", iterations=k)
    w2 = normref.whitening_matrix(s, method="newton_schulz", iterations=k)
    assert _rel(w2, w1) <= 64 * d * k * EPS64 * kappa


def test_iternorm_unstable_for_large_t():
    """What the docstrings say: with T = 25 on κ(Σ) = 100, IterNorm's uncoupled iteration has
    amplified its rounding errors far past 1 (here to overflow or O(1) errors) while the coupled
    Newton–Schulz iteration stays white to 64·d·ε·κ."""
    rng = np.random.default_rng(3)
    s = _spd(rng, [0.01, 0.2, 0.5, 1.0])[None]
    with np.errstate(all="ignore"):
        w_it = normref.whitening_matrix(s, method="iternorm", iterations=25)
    w_ns = normref.whitening_matrix(s, method="newton_schulz", iterations=25)
    ev_ns = np.linalg.eigvalsh(w_ns @ s @ np.swapaxes(w_ns, -1, -2))
    assert np.max(np.abs(ev_ns - 1)) <= 64 * 4 * EPS64 * 100
    with np.errstate(all="ignore"):
        m_it = w_it @ s @ np.swapaxes(w_it, -1, -2)
    assert not np.all(np.isfinite(m_it)) or np.max(np.abs(np.linalg.eigvalsh(m_it) - 1)) > 1e-3


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(METHODS), st.integers(1, 3), st.integers(1, 3), st.sampled_from([1e-4, 1e-2]),
       st.integers(1, 4), st.integers(0, 2**31))
def test_hypothesis_finite_differences(method, groups, c, eps, iterations, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, groups * c, 3)) + rng.uniform(-1, 1)
    w, b = rng.standard_normal(groups * c), rng.standard_normal(groups * c)
    r = fd_check(normref.batch_whitening, (x, None, None, w, b),
                 dict(training=True, method=method, group_size=c, eps=eps, iterations=iterations), seed=seed % 1000)
    # PCA has 1/(λj − λi): random spectra may put two eigenvalues close, which amplifies the
    # finite-difference error by (λ spread / gap); that example is then outside the 1e-6 contract
    if method == "pca" and c > 1:
        xv = x.reshape(4, groups, c, 3)
        xc = xv - xv.mean(axis=(0, 3), keepdims=True)
        lam = np.linalg.eigvalsh(np.einsum("ngim,ngjm->gij", xc, xc) / 12 + eps * np.eye(c))
        gap = float(np.min(np.diff(lam, axis=-1)) / np.max(lam))
        if gap < 1e-2:
            return
    assert r.max_error <= FD_TOL, r.details


# ---------------------------------------------------------------------------------------------------
# against torch autograd (well-separated spectra, where autograd through eigh is right)


def _torch_reference(torch, x, method, c, eps, t):
    """A straightforward torch whitening with autograd: the oracle of the backward."""
    n, ch = x.shape[:2]
    xv = x.reshape(n, ch // c, c, -1).permute(1, 2, 0, 3).reshape(ch // c, c, -1)
    xc = xv - xv.mean(-1, keepdim=True)
    m = xc.shape[-1]
    s = xc @ xc.mT / m + eps * torch.eye(c, dtype=x.dtype)
    if method == "zca":
        lam, q = torch.linalg.eigh(s)
        w = q @ torch.diag_embed(lam.rsqrt()) @ q.mT
    elif method == "pca":
        lam, q = torch.linalg.eigh(s)
        big = q.abs().argmax(dim=-2, keepdim=True)
        sign = torch.sign(torch.gather(q, -2, big))
        w = torch.diag_embed(lam.rsqrt()) @ (q * sign).mT
    elif method == "cholesky":
        ell = torch.linalg.cholesky(s)
        y = torch.linalg.solve_triangular(ell, xc, upper=False)
        return y.reshape(ch // c, c, n, -1).permute(2, 0, 1, 3).reshape(x.shape)
    else:
        tr = s.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
        sn = s / tr
        p = torch.eye(c, dtype=x.dtype).expand_as(s)
        for _ in range(t):
            p = 1.5 * p - 0.5 * p @ p @ p @ sn
        w = p / tr.sqrt()
    y = w @ xc
    return y.reshape(ch // c, c, n, -1).permute(2, 0, 1, 3).reshape(x.shape)


@pytest.mark.parametrize("method", METHODS)
def test_against_torch_autograd(method):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    x = rng.standard_normal((6, 4, 3, 2))
    x[:, 1] += 0.9 * x[:, 0]  # well-separated spectrum
    x[:, 3] *= 3.0
    g = rng.standard_normal(x.shape)
    kw = dict(training=True, method=method, group_size=4, eps=1e-3, iterations=4)
    y, pb = normref.vjp(normref.batch_whitening, x, **kw)
    (dx,) = pb(g)[:1]
    xt = torch.tensor(x, requires_grad=True)
    yt = _torch_reference(torch, xt, "iternorm" if method == "newton_schulz" else method, 4, 1e-3, 4)
    (gt,) = torch.autograd.grad(yt, xt, torch.tensor(g))
    # κ(Σ) ≲ 50 here: both are backward-stable evaluations, so 1e3·ε₆₄·κ
    assert _rel(y, yt.detach().numpy()) <= TOL64 * 50
    assert _rel(dx, gt.numpy()) <= TOL64 * 50


def test_second_order_torch():
    """The analytic backward is itself differentiable: torch autograd through normref's backward
    (a Hessian-vector product) against central differences of the NumPy backward."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    x = rng.standard_normal((5, 3, 4))
    x[:, 2] -= 0.5 * x[:, 0]
    g = rng.standard_normal(x.shape)
    u = rng.standard_normal(x.shape)
    v = rng.standard_normal(x.shape)
    v /= np.linalg.norm(v)
    for method in ("zca", "cholesky", "iternorm"):
        kw = dict(training=True, method=method)

        def s_np(a):
            return float(np.sum(normref.vjp(normref.batch_whitening, a, **kw)[1](g)[0] * u))

        num = (s_np(x + H * v) - s_np(x - H * v)) / (2 * H)
        xt = torch.tensor(x, requires_grad=True)
        _, pb = normref.vjp(normref.batch_whitening, xt, **kw)
        sval = (pb(torch.tensor(g))[0] * torch.tensor(u)).sum()
        (hv,) = torch.autograd.grad(sval, xt)
        ana = float((hv * torch.tensor(v)).sum())
        assert abs(ana - num) <= FD_TOL * max(abs(num), 1e-3 * float(hv.norm())), (method, ana, num)


# ---------------------------------------------------------------------------------------------------
# running statistics (pure) and population statistics


def test_running_statistics_pure_and_used_at_inference():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((8, 4, 3)) + 0.3
    rm = rng.standard_normal(4)
    a = rng.standard_normal((2, 2, 2))
    rc = a @ np.swapaxes(a, -1, -2) + np.eye(2)
    rm0, rc0 = rm.copy(), rc.copy()
    out = normref.batch_whitening(x, rm, rc, training=True, group_size=2, momentum=0.25)
    assert isinstance(out, normref.WhiteningResult)
    assert np.array_equal(rm, rm0) and np.array_equal(rc, rc0)  # nothing mutated
    xv = x.reshape(8, 2, 2, 3)
    mu = xv.mean(axis=(0, 3))
    xc = xv - mu[None, :, :, None]
    m = 24
    cov_unbiased = np.einsum("ngim,ngjm->gij", xc, xc) / (m - 1)
    assert _rel(out.running_mean, 0.75 * rm + 0.25 * mu.reshape(4)) <= TOL64
    assert _rel(out.running_cov, 0.75 * rc + 0.25 * cov_unbiased) <= TOL64
    # momentum=None: cumulative average with num_batches_tracked
    out2 = normref.batch_whitening(x, rm, rc, training=True, group_size=2, momentum=None, num_batches_tracked=3)
    assert _rel(out2.running_mean, 0.75 * rm + 0.25 * mu.reshape(4)) <= TOL64
    # inference: W from running_cov + εI, constants in the backward (dX = Wᵀ·G)
    eps = 1e-3
    y = normref.batch_whitening(x, rm, rc, training=False, group_size=2, eps=eps)
    w = normref.whitening_matrix(rc + eps * np.eye(2))
    ref = np.einsum("gij,ngjm->ngim", w, xv - rm.reshape(1, 2, 2, 1)).reshape(x.shape)
    assert _rel(y, ref) <= TOL64
    _, pb = normref.vjp(normref.batch_whitening, x, rm, rc, training=False, group_size=2, eps=eps)
    g = rng.standard_normal(x.shape)
    dx, drm, drc, _, _ = pb(g)
    assert drm is None and drc is None
    assert _rel(dx, np.einsum("gji,ngjm->ngim", w, g.reshape(xv.shape)).reshape(x.shape)) <= TOL64


def test_partitions_instance_and_group():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 4, 5))
    y = normref.batch_whitening(x, training=True, partition="instance")
    for i in range(3):  # instance partition = batch whitening of each sample alone
        yi = normref.batch_whitening(x[i].T[:, :, None], training=True)  # (5 samples, 4 channels, 1)
        assert _rel(y[i], yi[:, :, 0].T) <= TOL64
    # per-sample statistics whatever `training` says (no population for the instance partition)
    assert _rel(normref.batch_whitening(x, partition="instance"), y) == 0.0
    x2 = rng.standard_normal((2, 6, 4))
    y2 = normref.batch_whitening(x2, training=True, partition="group", num_groups=3, method="cholesky")
    for i in range(2):  # group whitening: per sample, the 3 channel blocks are the features
        feats = x2[i].reshape(3, 8)
        yi = normref.batch_whitening(feats.T, training=True, method="cholesky")
        assert _rel(y2[i].reshape(3, 8), yi.T) <= TOL64


def test_coloring_and_style_transfer_properties():
    rng = np.random.default_rng(17)
    # whitening_coloring with Γ = I and β = 0 is batch whitening
    x = rng.standard_normal((6, 4, 3))
    y = normref.whitening_coloring(x, None, None, np.eye(2)[None].repeat(2, 0), None, True, group_size=2, method="zca")
    assert _rel(y, normref.batch_whitening(x, training=True, group_size=2)) <= TOL64
    # WCT with eps = 0: the output has exactly the style's mean and covariance (per sample)
    c = rng.standard_normal((2, 3, 20))
    s = rng.standard_normal((2, 3, 15)) * 2 + 1
    s[:, 1] += s[:, 0]
    out = normref.wct(c, s, eps=0.0)
    for i in range(2):
        oc = out[i] - out[i].mean(1, keepdims=True)
        sc = s[i] - s[i].mean(1, keepdims=True)
        assert _rel(out[i].mean(1), s[i].mean(1)) <= TOL64
        assert _rel(oc @ oc.T / 20, sc @ sc.T / 15) <= TOL64 * 100  # κ(Σ_c)·κ(Σ_s) ≲ 100
    # AdaIN: per-channel mean and std of the style
    a = normref.adain(c, s, eps=0.0 + 1e-12)
    assert _rel(a.mean(2), s.mean(2)) <= TOL64
    assert _rel(a.std(2), s.std(2)) <= 1e-9


# ---------------------------------------------------------------------------------------------------
# bad input


X = np.random.default_rng(0).standard_normal((6, 4, 2))


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: normref.batch_whitening(X, training=True, group_size=0), ValueError, r"batch_whitening: group_size must be a positive integer; got 0"),
        (lambda: normref.batch_whitening(X, training=True, group_size=2.5), TypeError, r"group_size must be a positive integer or None; got float 2.5"),
        (lambda: normref.batch_whitening(X, training=True, group_size=8), ValueError, r"must not exceed the number of features \(input.shape\[1\] = 4\); got 8"),
        (lambda: normref.batch_whitening(X, training=True, group_size=3), ValueError, r"must divide .* valid sizes: \[1, 2, 4\]\); got 3"),
        (lambda: normref.batch_whitening(X, training=True, iterations=0), ValueError, r"iterations must be an integer >= 1; got 0"),
        (lambda: normref.iter_norm(X, training=True, iterations=0), ValueError, r"iter_norm: iterations"),
        (lambda: normref.batch_whitening(X, training=True, method="svd"), ValueError,
         r"method must be one of 'zca', 'pca', 'cholesky', 'iternorm', 'newton_schulz'; got 'svd'"),
        (lambda: normref.whitening_matrix(np.eye(3), method="svd"), ValueError, r"whitening_matrix: method must be one of"),
        (lambda: normref.batch_whitening(X, training=False), ValueError, r"running_mean and running_cov are required"),
        (lambda: normref.batch_whitening(X, np.zeros(4), None, training=True), ValueError, r"running_mean and running_cov go together"),
        (lambda: normref.batch_whitening(X, np.zeros(4), np.zeros((4, 4, 4)), training=True, group_size=2), ValueError,
         r"running_cov must have shape \(2, 2, 2\)"),
        (lambda: normref.batch_whitening(X, training=True, eps=-1.0), ValueError, r"eps must be a finite number >= 0"),
        (lambda: normref.batch_whitening(X, training=True, partition="layer"), ValueError, r"partition must be one of"),
        (lambda: normref.batch_whitening(X, training=True, partition="group"), ValueError, r"needs num_groups"),
        (lambda: normref.batch_whitening(X[:1, :, :1], training=True), ValueError, r"more than 1 sample per covariance"),
        (lambda: normref.whitening_coloring(X, None, None, np.zeros((4, 4)), None, True), ValueError, r"weight must have shape \(1, 4, 4\)"),
        (lambda: normref.wct(X, X[:, :3]), ValueError, r"wct: style must have content's \(N, C\)"),
        (lambda: normref.wct(X, X, alpha=2.0), ValueError, r"alpha must be a number in \[0, 1\]"),
        (lambda: normref.adain(X, [1.0]), TypeError, r"adain: style must be an array"),
        (lambda: normref.whitening_matrix(np.ones((2, 3))), ValueError, r"cov must be square"),
    ],
)
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_not_positive_definite_with_eps_zero_raises(method, backend):
    """m = 2 samples for 4 features and eps = 0: Σ is singular. A clear ValueError, never NaN."""
    x = backend.asarray(np.random.default_rng(1).standard_normal((2, 4)))
    with pytest.raises(ValueError, match=r"batch_whitening: the covariance of a whitening group .* not positive definite"):
        normref.batch_whitening(x, training=True, method=method, eps=0.0)
    with pytest.raises(ValueError, match=r"whitening_matrix: .*not positive definite"):
        normref.whitening_matrix(backend.asarray(np.diag([1.0, 0.0, 2.0])), method=method)


@pytest.mark.parametrize("method", ["iternorm", "newton_schulz"])
def test_newton_zero_trace_raises_and_singular_is_finite(method):
    with pytest.raises(ValueError, match=r"zero trace"):
        normref.batch_whitening(np.ones((4, 3)), training=True, method=method, eps=0.0)
    y = normref.batch_whitening(np.random.default_rng(2).standard_normal((2, 4)), training=True, method=method, eps=0.0)
    assert np.all(np.isfinite(y))  # a polynomial in Σ/tr Σ: finite on a singular Σ (documented)
