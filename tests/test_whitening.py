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
from tests.conftest import rel_err as _rel, registry_cases as _cases, EPS64, TOL64

FD_TOL = 1e-6
METHODS = normref.WHITENING_METHODS

FAMILY = [normref.get(n) for n in
          ("whitening_matrix", "batch_whitening", "decorrelated_batch_norm", "iter_norm", "whitening_coloring", "adain", "wct")]
IDS = [m.name for m in FAMILY]


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


def _hadamard(m):
    """The m × m Sylvester–Hadamard matrix (m a power of 2): ±1 entries, orthogonal rows."""
    h = np.ones((1, 1))
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    return h


def _exact_scaled_identity_data(d, m=8, scale=2.0):
    """(m, d) samples whose centred covariance is EXACTLY scale²·I in float64: the columns are rows
    1…d of a Hadamard matrix (±1, each summing to 0, mutually orthogonal) times a power of 2, so the
    mean, Xcᵀ·Xc and the division by m (a power of 2) are all exact."""
    x = _hadamard(m)[1:d + 1].T * scale
    xc = x - x.mean(axis=0)
    assert np.array_equal(xc.T @ xc / m, scale**2 * np.eye(d))
    return x


@pytest.mark.parametrize("method", ["zca", "cholesky", "iternorm", "newton_schulz"])
def test_equal_eigenvalues_exactly(method):
    """Σ = 2·I given exactly, and data whose batch covariance is exactly 4·I (Hadamard patterns):
    every eigenvalue equal. The Loewner form (zca) has no 1/(λi − λj), so it stays exact there; the
    Cholesky and Newton backwards have no eigenvalue gaps at all. PCA is not differentiable there
    (its rows are not continuous in Σ: test_nearly_equal_eigenvalues_and_pca_at_equal)."""
    s = 2.0 * np.eye(4)[None]
    r = fd_check(normref.whitening_matrix, (s,), dict(method=method), directions=4)
    assert r.max_error <= FD_TOL, r.details
    x = _exact_scaled_identity_data(3)
    r2 = fd_check(normref.batch_whitening, (x,), dict(training=True, method=method, eps=0.0), directions=4)
    assert r2.max_error <= FD_TOL, r2.details
    print(f"\n{method}: Σ = 2I exactly: largest finite-difference error {r.max_error:.2e}; "
          f"data with Σ = 4I exactly: {r2.max_error:.2e}")


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


def _torch_zca_batch(torch, x, eps):
    """A straightforward torch ZCA of (m, d) samples through torch.linalg.eigh (autograd's oracle)."""
    xt = torch.tensor(x, requires_grad=True)
    m, d = x.shape
    xc = xt - xt.mean(0)
    s = xc.T @ xc / m + eps * torch.eye(d, dtype=torch.float64)
    lam, q = torch.linalg.eigh(s)
    return xt, s, xc @ (q @ torch.diag(lam.rsqrt()) @ q.T).T


def test_exactly_equal_eigenvalues_torch_autograd_vs_normref():
    """Σ = c·I EXACTLY in floating point (Hadamard data, c = 4 and c = 1; and Σ = 2·I given to
    whitening_matrix): finite differences, normref's analytic value and torch autograd through
    torch.linalg.eigh of the same directional derivative. Autograd's eigh backward has
    F_ij = 1/(λj − λi) = 1/0: its derivative is NaN (measured: NaN in every case here). normref's
    Loewner form equals finite differences to ≤ 1e-6 (the FD contract, conformance/fd.py).

    ../shared/math/BACKWARD.md quotes 1.99662 (FD and normref) vs 4.72 (torch) "at Σ = I exactly";
    the input, cotangent and direction of that measurement were not recorded, so it cannot be replayed:
    a finite torch value needs eigenvalues that differ by rounding (Σ = I only to rounding; see
    test_equal_eigenvalues_torch_autograd_is_wrong_normref_is_right), at Σ = c·I exactly it is NaN."""
    torch = pytest.importorskip("torch")
    rows = []
    for d, scale in ((3, 2.0), (4, 1.0)):
        x = _exact_scaled_identity_data(d, 8, scale)
        rng = np.random.default_rng(d)
        g = rng.standard_normal(x.shape)
        v = rng.standard_normal(x.shape)
        v /= np.linalg.norm(v)
        kw = dict(training=True, eps=0.0)
        _, pb = normref.vjp(normref.batch_whitening, x, **kw)
        ours = float(np.sum(pb(g)[0] * v))
        fd = directional_fd(normref.batch_whitening, (x,), kw, 0, v, g)
        xt, st, y = _torch_zca_batch(torch, x, 0.0)
        assert torch.equal(st.detach(), torch.eye(d, dtype=torch.float64) * scale**2)  # the exact case in torch too
        (gt,) = torch.autograd.grad(y, xt, torch.tensor(g))
        rows.append((f"batch_whitening, Σ = {scale**2:g}·I (d = {d})", fd, ours, float((gt * torch.tensor(v)).sum())))
    s = 2.0 * np.eye(3)
    rng = np.random.default_rng(7)
    g = rng.standard_normal((1, 3, 3))
    v = rng.standard_normal((1, 3, 3))
    v = v + np.swapaxes(v, -1, -2)
    v /= np.linalg.norm(v)
    _, pb = normref.vjp(normref.whitening_matrix, s[None])
    ours = float(np.sum(pb(g)[0] * v))
    fd = directional_fd(normref.whitening_matrix, (s[None],), {}, 0, v, g)
    st = torch.tensor(s[None], requires_grad=True)
    lam, q = torch.linalg.eigh(st)
    w = q @ torch.diag_embed(lam.rsqrt()) @ q.mT
    (gt,) = torch.autograd.grad(w, st, torch.tensor(g))
    rows.append(("whitening_matrix, Σ = 2·I", fd, ours, float((gt * torch.tensor(v)).sum())))
    print()
    for label, fd, ours, theirs in rows:
        print(f"{label}: finite differences {fd:.6f}, normref {ours:.6f}, torch autograd (eigh) {theirs}")
        assert abs(ours - fd) <= FD_TOL * abs(fd), (label, ours, fd)
        assert not math.isfinite(theirs) or abs(theirs - fd) > 1e-3 * abs(fd), (label, theirs, fd)


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
    xt, _, y = _torch_zca_batch(torch, x, eps)
    (gt,) = torch.autograd.grad(y, xt, torch.tensor(g))
    theirs = float((gt * torch.tensor(v)).sum())
    print(f"\nΣ = I (to rounding): finite differences {fd:.6f}, normref {ours:.6f}, torch autograd {theirs:.6f}")
    assert abs(ours - fd) <= FD_TOL * abs(fd)
    assert not math.isfinite(theirs) or abs(theirs - fd) > 1e-3 * abs(fd)


def _romberg(m, args, kw, v, g, h):
    """D(h), D(h/2), D(h/4) central differences Romberg-extrapolated: the h² and h⁴ terms cancel."""
    d1, d2, d4 = (directional_fd(m, args, kw, 0, v, g, h=h / k) for k in (1, 2, 4))
    r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
    return (16 * r2 - r1) / 15


@pytest.mark.parametrize("method", METHODS)
def test_eigenvalues_1e6_apart(method):
    """λ ∈ {1e-6, 1e-3, 0.3, 1}. zca, pca and cholesky vary on the scale λ_min, and the float64
    forward (eigh, cholesky) is accurate only to ε·λ_max in absolute terms, so the generic step
    (h ≈ 6e-6 > λ_min) is useless and a step ≪ λ_min drowns in that error. We take h = 0.1·λ_min
    (inside the Taylor series' radius λ_min) and Romberg-extrapolate D(h), D(h/2), D(h/4): the h² and
    h⁴ terms cancel, the h⁶ term is ≈ (h/λ_min)⁶ = 1e-6 times a Taylor coefficient well below 1
    (measured: ≤ 1e-7 over several seeds), and the round-off stays ≈ 1e-8. The Newton methods are
    polynomials in Σ/tr Σ (smooth on the scale ‖Σ‖), but a step past λ_min makes Σ ± h·v indefinite,
    which whitening_matrix refuses: the same small step serves them. PCA's 1/(λj − λi) is benign
    here: the gaps are as large as the eigenvalues themselves."""
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
        num = _romberg(m, (s,), kw, v, g, 1e-7)
        err = abs(np.sum(ds * v) - num) / abs(num)
        worst = max(worst, err)
        assert err <= FD_TOL, (np.sum(ds * v), num)
    print(f"\n{method}, eigenvalues 1e6 apart: largest finite-difference error {worst:.2e}")


@pytest.mark.parametrize("method", METHODS)
def test_batch_whitening_on_data_with_1e6_spread(method):
    """Data X = Q·diag(√λ)·Z with exactly orthonormal Z (centred), so Σ = Q·Λ·Qᵀ with
    λ ∈ {1e-6, 1e-3, 0.3, 1} (to rounding), eps = 0. Along the weakest eigenvector the samples have
    magnitude √λ_min = 1e-3: that is the scale on which the output varies with X (the radius of its
    Taylor series in X), so the step is h = 0.1·√λ_min with Romberg extrapolation (h⁶ term ≈ 1e-6 of a
    coefficient below 1). A smaller step loses to the forward's own error: ŷ is accurate to
    ≈ ε·κ = 2e-10 relative, which divided by h = 1e-7 is a 1e-6 error (measured: 1e-6 at h = 1e-7,
    ≤ 1e-8 at h = 1e-5…1e-4). The Newton methods are smooth on the scale ‖Σ‖; the same step serves."""
    rng = np.random.default_rng(21)
    d, mm = 4, 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    z = _whitened_data(rng, mm, d).T  # (d, m): Z·Zᵀ/m = I
    lam = np.array([1e-6, 1e-3, 0.3, 1.0])
    x = ((q * np.sqrt(lam)) @ z).T  # (m samples, d features)
    kw = dict(training=True, method=method, eps=0.0)
    m = normref.batch_whitening
    y, pb = normref.vjp(m, x, **kw)
    worst = 0.0
    h = 0.1 * math.sqrt(lam[0])
    for _ in range(2):
        g = rng.standard_normal(y.shape)
        (dx,) = pb(g)[:1]
        v = rng.standard_normal(x.shape)
        v /= np.linalg.norm(v)
        num = _romberg(m, (x,), kw, v, g, h)
        err = abs(float(np.sum(dx * v)) - num) / abs(num)
        worst = max(worst, err)
        assert err <= FD_TOL, (method, float(np.sum(dx * v)), num)
    print(f"\n{method}, batch data with eigenvalues 1e6 apart: largest finite-difference error {worst:.2e}")


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
    if backend.name == "jax":
        # eager JAX compiles every op: measured ≈ 2 s per example (1.3 s under jit), ≈ 1.5 min for
        # all 40 on two cores, so the unit tests take the first and last of each method; every
        # example runs on JAX in the conformance suite (normref conformance -b jax -m <method>)
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
@given(st.integers(2, 5), st.integers(1, 13), st.integers(1, normref.ITERNORM_STABLE_T), st.floats(0.5, 6.0),
       st.integers(0, 2**31))
def test_hypothesis_iternorm_monotone(d, t_ns, t_it, decades, seed):
    """Both Newton methods stretch the spectrum progressively: the eigenvalues of W_T·Σ·W_Tᵀ increase
    with T (each step maps x = λ·p² to x·(1.5 − 0.5·x)² ≥ x for x ∈ (0, 1]) and never pass 1.

    In floating point each step rounds W·Σ·Wᵀ at the level ε·‖P‖²·‖Σ_N‖ ≤ ε·κ(Σ): tolerance
    64·d·ε·κ·k. The claim drawn here, κ(Σ) ≤ 1e6: for the coupled Newton–Schulz form every
    T ≤ 13 (t_ns), for IterNorm's uncoupled iteration T ≤ ITERNORM_STABLE_T = 6 (t_it), the range
    in which it runs without a warning; beyond it the uncoupled form amplifies rounding errors by
    ≈ 30–50× per step (test_iternorm_unstable_for_large_t)."""
    rng = np.random.default_rng(seed)
    lam = np.sort(10.0 ** rng.uniform(-decades, 0, d))
    s = _spd(rng, lam)[None]
    kappa = float(lam[-1] / lam[0])
    for method, tmax in (("newton_schulz", t_ns), ("iternorm", t_it)):
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
    w1 = normref.whitening_matrix(s, method="iternorm", iterations=t_it)
    w2 = normref.whitening_matrix(s, method="newton_schulz", iterations=t_it)
    assert _rel(w2, w1) <= 64 * d * t_it * EPS64 * kappa


def test_iternorm_unstable_for_large_t():
    """What the docstrings say: with T = 25 on κ(Σ) = 100, IterNorm's uncoupled iteration has
    amplified its rounding errors far past 1 (here to overflow or O(1) errors) while the coupled
    Newton–Schulz iteration stays white to 64·d·ε·κ; asking for it warns."""
    rng = np.random.default_rng(3)
    s = _spd(rng, [0.01, 0.2, 0.5, 1.0])[None]
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning, match=r"whitening_matrix: method='iternorm' with "
                                                                        r"iterations=25 > 6.*newton_schulz"):
        w_it = normref.whitening_matrix(s, method="iternorm", iterations=25)
    w_ns = normref.whitening_matrix(s, method="newton_schulz", iterations=25)
    ev_ns = np.linalg.eigvalsh(w_ns @ s @ np.swapaxes(w_ns, -1, -2))
    assert np.max(np.abs(ev_ns - 1)) <= 64 * 4 * EPS64 * 100
    with np.errstate(all="ignore"):
        m_it = w_it @ s @ np.swapaxes(w_it, -1, -2)
    assert not np.all(np.isfinite(m_it)) or np.max(np.abs(np.linalg.eigvalsh(m_it) - 1)) > 1e-3


def test_iter_norm_uses_the_coupled_form_beyond_the_stable_range():
    """iter_norm(coupled=None): the paper's uncoupled iteration for T ≤ 6, the coupled Newton–Schulz
    form (same polynomial) above, silently; coupled=False above 6 warns; method='iternorm' in
    batch_whitening above 6 warns."""
    import warnings

    x = np.random.default_rng(40).standard_normal((8, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y5 = normref.iter_norm(x, training=True, iterations=5)
        y12 = normref.iter_norm(x, training=True, iterations=12)
    assert _rel(y5, normref.batch_whitening(x, training=True, method="iternorm", iterations=5)) == 0.0
    assert _rel(y12, normref.batch_whitening(x, training=True, method="newton_schulz", iterations=12)) == 0.0
    with pytest.warns(RuntimeWarning, match=r"iter_norm: method='iternorm' with iterations=7"):
        normref.iter_norm(x, training=True, iterations=7, coupled=False)
    with pytest.warns(RuntimeWarning, match=r"batch_whitening: method='iternorm' with iterations=9"):
        normref.batch_whitening(x, training=True, method="iternorm", iterations=9)
    with pytest.raises(TypeError, match=r"iter_norm: coupled must be True, False or None; got str 'yes'"):
        normref.iter_norm(x, training=True, coupled="yes")


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


def _ref_w(method, sig, t=5):
    """The whitening matrix of one SPD matrix, straight from its definition in NumPy (independent of
    normref.matfun): eigh for zca/pca (PCA rows with their largest-magnitude entry positive, ascending
    λ), inv of the Cholesky factor, and T Newton steps on Σ/tr Σ for both Newton methods (the same
    polynomial; T = 5 is in IterNorm's stable range)."""
    if method in ("zca", "pca"):
        lam, dd = np.linalg.eigh(sig)
        if method == "zca":
            return (dd / np.sqrt(lam)) @ dd.T
        sign = np.sign(dd[np.argmax(np.abs(dd), axis=0), np.arange(len(lam))])
        return (dd * sign).T / np.sqrt(lam)[:, None]
    if method == "cholesky":
        return np.linalg.inv(np.linalg.cholesky(sig))
    tr = np.trace(sig)
    p = np.eye(len(sig))
    for _ in range(t):
        p = 1.5 * p - 0.5 * p @ p @ p @ (sig / tr)
    return p / np.sqrt(tr)


def _ref_whiten_rows(rows, method, c, eps):
    """Whiten consecutive groups of c rows of a (rows, samples) matrix, each over its columns."""
    out = np.empty_like(rows)
    for k in range(0, rows.shape[0], c):
        xc = rows[k:k + c] - rows[k:k + c].mean(axis=1, keepdims=True)
        sig = xc @ xc.T / xc.shape[1] + eps * np.eye(len(xc))
        out[k:k + c] = _ref_w(method, sig) @ xc
    return out


def _direct(x, partition, method, c, eps, num_groups=1, batch_groups=1, normalized_ndim=1):
    """Per-partition whitening by explicit loops over what each statistic covers (the survey's Π(X),
    Eqn 20, one sample or batch group at a time)."""
    y = np.empty_like(x)
    n, ch = x.shape[:2]
    if partition == "batch":  # rows: channels; samples: N·H·W
        rows = np.moveaxis(x, 1, 0).reshape(ch, -1)
        y = np.moveaxis(_ref_whiten_rows(rows, method, c, eps).reshape((ch, n) + x.shape[2:]), 0, 1)
    elif partition == "instance":  # per sample: rows channels, samples positions
        for i in range(n):
            y[i] = _ref_whiten_rows(x[i].reshape(ch, -1), method, c, eps).reshape(x.shape[1:])
    elif partition == "group":  # per sample: rows the channel blocks
        for i in range(n):
            y[i] = _ref_whiten_rows(x[i].reshape(num_groups, -1), method, c, eps).reshape(x.shape[1:])
    elif partition == "position":  # per sample: rows the positions, samples the channels
        for i in range(n):
            y[i] = _ref_whiten_rows(x[i].reshape(ch, -1).T, method, c, eps).T.reshape(x.shape[1:])
    elif partition == "layer":  # rows: the last axis before the normalized ones
        lead = x.shape[: x.ndim - normalized_ndim]
        x2 = x.reshape(lead + (-1,))
        y2 = np.empty_like(x2)
        for idx in np.ndindex(*lead[:-1]):
            y2[idx] = _ref_whiten_rows(x2[idx], method, c, eps)
        y = y2.reshape(x.shape)
    elif partition == "batch_group":  # per batch group: rows the channel blocks
        nb = n // batch_groups
        for k in range(batch_groups):
            xb = x[k * nb:(k + 1) * nb].reshape(nb, num_groups, -1)
            rows = xb.transpose(1, 0, 2).reshape(num_groups, -1)
            yb = _ref_whiten_rows(rows, method, c, eps).reshape(num_groups, nb, -1).transpose(1, 0, 2)
            y[k * nb:(k + 1) * nb] = yb.reshape((nb,) + x.shape[1:])
    return y


PARTITION_CASES = [
    ("batch", (6, 4, 2, 3), 2, {}),
    ("batch", (9, 4), 4, {}),  # 2-d input: the samples are the rows of the batch (swapped layout)
    ("instance", (3, 4, 3, 3), 2, {}),
    ("group", (2, 6, 3, 2), 3, dict(num_groups=3)),
    ("position", (2, 8, 2, 2), 2, {}),
    ("layer", (3, 4, 2, 5), 2, dict(normalized_ndim=2)),
    ("layer", (2, 3, 4, 6), 2, dict(normalized_ndim=1)),
    ("layer", (4, 3, 2, 2), 2, dict(normalized_ndim=3)),  # the rows are the samples of the batch
    ("batch_group", (4, 6, 2, 2), 3, dict(num_groups=3, batch_groups=2)),
]
PART_IDS = [f"{p}-{'x'.join(map(str, s))}" for p, s, _, _ in PARTITION_CASES]


@pytest.mark.parametrize("partition, shape, c, kw", PARTITION_CASES, ids=PART_IDS)
def test_every_partition_against_direct_computation(partition, shape, c, kw):
    """Every partition × every method: normref (normalize and batch_whitening, one operation) against
    the explicit per-partition loops, 1e3·ε₆₄·κ(Σ) (both backward-stable float64 evaluations of
    W·Xc, whose error is ≈ ε·κ); group size 1 equals standardization on the same partition; the
    backward agrees with central finite differences (≤ 1e-6)."""
    rng = np.random.default_rng(hash(partition) % 2**32)
    x = rng.standard_normal(shape) + rng.uniform(-1, 1)
    eps = 1e-3
    for method in METHODS:
        ref = _direct(x, partition, method, c, eps, **kw)
        groups, _ = normref.whitening._survey_groups(x, partition, group_size=c, **kw)
        kappa = normref.whitening._kappa(normref.whitening._group_cov(groups, eps))
        y1 = normref.normalize(x, partition=partition, operation=method, group_size=c, eps=eps, recovery="none", **kw)
        y2 = normref.batch_whitening(x, training=True, method=method, group_size=c, eps=eps, partition=partition, **kw)
        assert _rel(y1, ref) <= TOL64 * kappa, (partition, method)
        assert _rel(y2, y1) == 0.0, (partition, method)  # the same operation through the same framework
        w = rng.standard_normal(shape[1]) if partition != "layer" else None
        args = (x, w, w) if w is not None else (x,)
        r = fd_check(normref.normalize, args, dict(partition=partition, operation=method, group_size=c, eps=eps, **kw),
                     seed=3)
        assert r.max_error <= FD_TOL, (partition, method, r.details)
        r2 = fd_check(normref.batch_whitening, (x,), dict(training=True, method=method, group_size=c, eps=eps,
                                                          partition=partition, **kw), seed=4)
        assert r2.max_error <= FD_TOL, (partition, method, r2.details)
    # group size 1: each row alone is standardized (ε inside the root, as standardizing has it)
    y1 = normref.normalize(x, partition=partition, operation="zca", group_size=1, eps=eps, recovery="none", **kw)
    with normref.use_kernels(False):
        ys = normref.normalize(x, partition=partition, operation="standardizing", eps=eps, recovery="none", **kw)
    assert _rel(y1, ys) <= TOL64  # the whitening rows are the rows standardization treats one by one


def test_normalize_whitening_recoveries_and_errors():
    """normalize composes whitening with the affine and generated recoveries (the recovery module's
    forward/backward); group_size belongs to whitening only."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    xhat = normref.normalize(x, partition="instance", operation="zca", group_size=2, recovery="none")
    y = normref.normalize(x, w, b, partition="instance", operation="zca", group_size=2)
    assert _rel(y, xhat * w[:, None] + b[:, None]) <= TOL64
    gam = rng.standard_normal((3, 4, 1))
    y = normref.normalize(x, gam, gam, partition="instance", operation="zca", group_size=2, recovery="generated")
    assert _rel(y, xhat * gam + gam) <= TOL64
    r = fd_check(normref.normalize, (x, gam, gam), dict(partition="instance", operation="zca", group_size=2,
                                                         recovery="generated"))
    assert r.max_error <= FD_TOL, r.details
    with pytest.raises(ValueError, match=r"normalize: group_size applies to the whitening operations"):
        normref.normalize(x, partition="batch", group_size=2)
    with pytest.raises(ValueError, match=r"normalize: group_size must divide the number of features \(input.shape\[1\] = 4"):
        normref.normalize(x, partition="batch", operation="zca", group_size=3)
    with pytest.raises(ValueError, match=r"normalize: operation must be one of .*'zca'"):
        normref.normalize(x, operation="svd")


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
        (lambda: normref.batch_whitening(X, training=True, partition="bogus"), ValueError, r"partition must be one of"),
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
    with pytest.raises(ValueError, match=r"batch_whitening: the covariance of a whitening group of input \(eps=0.0\) is "
                                         r"not numerically positive definite: .* the covariance is singular \(m = 2 "
                                         r"samples per covariance for groups of 4 features.*pass eps > 0"):
        normref.batch_whitening(x, training=True, method=method, eps=0.0)
    with pytest.raises(ValueError, match=r"whitening_matrix: cov \(eps=0.0\) is not numerically positive definite.*"
                                         r"cov must be symmetric positive definite"):
        normref.whitening_matrix(backend.asarray(np.diag([1.0, 0.0, 2.0])), method=method)


@pytest.mark.parametrize("method", ["iternorm", "newton_schulz"])
def test_newton_zero_trace_raises_and_singular_is_finite(method):
    with pytest.raises(ValueError, match=r"zero trace"):
        normref.batch_whitening(np.ones((4, 3)), training=True, method=method, eps=0.0)
    y = normref.batch_whitening(np.random.default_rng(2).standard_normal((2, 4)), training=True, method=method, eps=0.0)
    assert np.all(np.isfinite(y))  # a polynomial in Σ/tr Σ: finite on a singular Σ (documented)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_input_names_the_argument(method, backend):
    """NaN/inf in the input: a ValueError naming ``input`` (found on the small covariance before any
    eigh/cholesky/iteration), never a NaN output or a LAPACK error."""
    x = np.random.default_rng(41).standard_normal((6, 4))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"batch_whitening: input has non-finite values \(NaN or inf\): the covariance"):
        normref.batch_whitening(backend.asarray(x), training=True, method=method)
    x[2, 1] = np.inf
    with np.errstate(invalid="ignore"), pytest.raises(ValueError, match=r"normalize: input has non-finite values"):
        normref.normalize(backend.asarray(x), operation=method)  # inf − inf in the centring: NaN, found
    s = np.eye(3)[None].copy()
    s[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"whitening_matrix: cov has non-finite values"):
        normref.whitening_matrix(backend.asarray(s), method=method)


def test_indefinite_and_negative_trace_messages():
    """A given matrix that is not positive semidefinite: the Newton methods refuse it (a Cholesky
    test), and the message says what is wrong (negative trace is not "constant features")."""
    for method in ("iternorm", "newton_schulz"):
        with pytest.raises(ValueError, match=r"whitening_matrix: cov is not positive semidefinite: its trace is -3 < 0"):
            normref.whitening_matrix(np.diag([-1.0, -2.0])[None], method=method)
        with pytest.raises(ValueError, match=r"whitening_matrix: cov is not positive semidefinite \(it has an eigenvalue "
                                             r"below −d·ε·tr Σ"):
            normref.whitening_matrix(np.diag([1.0, -0.5, 2.0])[None], method=method)
        # positive semidefinite but singular: allowed (a polynomial in Σ/tr Σ), finite
        assert np.all(np.isfinite(normref.whitening_matrix(np.diag([1.0, 0.0, 2.0])[None], method=method)))
    x = np.random.default_rng(42).standard_normal((6, 4, 3))
    bad = np.diag([1.0, -0.5])[None].repeat(2, 0)
    for method in METHODS:
        with pytest.raises(ValueError, match=r"batch_whitening: running_cov \+ eps·I .*(not numerically positive "
                                             r"definite|not positive semidefinite)"):
            normref.batch_whitening(x, np.zeros(4), bad, training=False, method=method, group_size=2)


def test_float32_rank_deficient_batch_small_eps():
    """m = 3 samples for 5 features in float32 with eps = 1e-5: only eps keeps Σ invertible, and the
    computed eigenvalues carry rounding noise ≈ ε₃₂·λ_max. Where eps dominates the noise bound
    ν = 2√d·ε₃₂·λ_max (λ_max ≲ 19 here) the call works; its error against the float64 result of the
    same input is ≈ ε₃₂·√κ with κ = λ_max/eps (a perturbation δ ≈ ε·λ_max of Σ moves W by
    δ·|K_ij| ≈ δ/(√eps·λ_max) between a null and a large direction, applied to a sample component
    ≈ √λ_max), allowed 64·d·ε₃₂·√κ. Where it does not (λ_max ≈ 250), the refusal says that eps does not
    dominate the float32 rounding noise (not "pass eps > 0": eps was passed)."""
    e32 = float(np.finfo(np.float32).eps)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 5))
    for scale in (0.3, 1.0):
        x = (base * scale).astype(np.float32)
        xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
        lmax = float(np.linalg.eigvalsh(xc.T @ xc / 3).max())
        for method in ("zca", "pca", "cholesky"):
            y = normref.batch_whitening(x, training=True, method=method, eps=1e-5)
            assert y.dtype == np.float32
            y64 = normref.batch_whitening(x.astype(np.float64), training=True, method=method, eps=1e-5)
            assert _rel(y, y64) <= 64 * 5 * e32 * math.sqrt(lmax / 1e-5), (scale, method)
    x = (base * 10.0).astype(np.float32)
    for method in ("zca", "pca", "cholesky"):
        with pytest.raises(ValueError, match=r"batch_whitening: .*\(eps=1e-05\) is not numerically positive definite:"
                                             r".*float32 rounding noise.*eps=1e-05 does not dominate the float32 rounding "
                                             r"noise; pass eps well above .*or float64 input"):
            normref.batch_whitening(x, training=True, method=method, eps=1e-5)


# ---------------------------------------------------------------------------------------------------
# triangular solves (Cholesky whitening): the library's own solve and the array-API fallback


def test_solve_triangular_native_and_fallback_agree(backend):
    """matfun.solve_triangular through the namespace's own triangular solve (torch, JAX, SciPy for
    NumPy) and through the array API's linalg.solve, against NumPy: forward and transposed solves,
    batch axes broadcast. Both are backward stable: error ≲ d·ε·κ(L), allowed 1e3·ε₆₄·κ(L)."""
    import array_api_compat

    rng = np.random.default_rng(43)
    ell = np.tril(rng.standard_normal((2, 1, 4, 4))) + 3.0 * np.eye(4)
    b = rng.standard_normal((2, 3, 4, 5))
    kappa = float(np.max(np.linalg.cond(ell)))
    lb, bb = backend.asarray(ell), backend.asarray(b)
    xp = array_api_compat.array_namespace(lb)
    native = matfun.native_triangular_solve(xp)
    # numpy-reference runs with use_kernels(False): the pure array-API formula, no native solve
    expect_native = backend.name in ("numpy", "torch", "jax", "torch-cuda")
    assert (native is not None) == expect_native, backend.name
    for transpose in (False, True):
        ref = np.linalg.solve(np.swapaxes(ell, -1, -2) if transpose else ell, b)
        for use_native in (True, False):
            got = matfun.solve_triangular(xp, lb, bb, transpose=transpose, native=use_native)
            assert_same_kind(got, bb)
            assert _rel(backend.to_numpy(got), ref) <= TOL64 * kappa, (transpose, use_native)


def test_cholesky_whitening_solves_not_inverts(monkeypatch):
    """Batch Cholesky whitening applies L⁻¹ by triangular solves, forward and backward (no inverse,
    no general solve when the library has a triangular one); the array-API fallback (general solve)
    gives the same output and gradient (1e3·ε₆₄·κ(Σ))."""
    import array_api_compat.numpy as xnp

    rng = np.random.default_rng(44)
    x = rng.standard_normal((6, 4, 5))
    x[:, 1] += 0.8 * x[:, 0]
    g = rng.standard_normal(x.shape)
    kw = dict(training=True, method="cholesky", group_size=2)
    kappa = normref.whitening._call_cond(x, group_size=2)
    native = matfun.native_triangular_solve(xnp)
    calls = []

    def counting(*a):
        calls.append(a[0].shape)
        return native(*a)

    def no_general_solve(*a, **k):
        raise AssertionError("xp.linalg.solve called although a triangular solve exists")

    from normref import _kernels

    monkeypatch.setitem(_kernels._KERNELS, ("numpy", "solve_triangular"), counting)
    monkeypatch.setattr(xnp.linalg, "solve", no_general_solve)
    monkeypatch.setattr(xnp.linalg, "inv", no_general_solve)
    y, pb = normref.vjp(normref.batch_whitening, x, **kw)
    dx = pb(g)[0]
    assert len(calls) >= 1 + 1 + 4  # apply, Wᵀ·G, four in the Cholesky backward
    monkeypatch.undo()
    monkeypatch.delitem(_kernels._KERNELS, ("numpy", "solve_triangular"))  # the array-API fallback
    y2, pb2 = normref.vjp(normref.batch_whitening, x, **kw)
    assert _rel(y2, y) <= TOL64 * kappa
    assert _rel(pb2(g)[0], dx) <= TOL64 * kappa


# ---------------------------------------------------------------------------------------------------
# the benchmark (a smoke test of its code path; the numbers are not checked here)


def test_bench_whitening_smoke(capsys):
    """`normref bench whitening` on a tiny shape runs, reports every number and a verdict per target."""
    pytest.importorskip("torch")
    from normref.conformance.cli import main

    rc = main(["bench", "whitening", "--shape", "2", "4", "3", "3", "--group-size", "2", "--repeat", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    for key in ("matmul_peak_gflops", "cov_share_of_peak", "apply_share_of_peak", "small_share_of_forward",
                "ratio_forward_normref_over_torch", "verdict"):
        assert key in out, key
