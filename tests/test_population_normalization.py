"""Population statistics inside training (normref.population_normalization; issue 14 §1).

population_norm (Wiesler et al.; Gregoire et al.), prong_whitening + prong_reparameterize (Desjardins
et al.), blended_batch_norm (Dinh et al.; diminishing BN; momentum BN). Each is checked against a
reference written here from the papers' equations (plain NumPy; torch autograd only as an independent
gradient oracle for the blended statistics), on every array library, through the torch and JAX
adapters, by float64 finite differences on random directions, and in a few-step training loop against
an independent re-implementation of the paper's algorithm.

Tolerances. Float64 comparisons of O(1)-conditioned quantities use TOL64 = 1e3·ε₆₄ (a few hundred
roundings); after a K-step training loop the errors of each step feed the next, through a learning
rate ≤ 0.1 and O(1) gradients, so the budget is K·TOL64·cond with cond ≤ 10 for the small, well
conditioned problems drawn here (the whitening ones have κ(Σ) ≤ 10 by construction). Finite
differences: the conformance module's central differences (step 1e-6·scale) have truncation ~1e-12
and round-off ~ε/h ≈ 2e-10 relative; 1e-6 is the issue's bound.
"""

from __future__ import annotations

import numpy as np
import pytest

import normref
from normref.conformance.fd import fd_check

from .conftest import TOL64, On, rel_err

PN, PW, PR, BB = normref.population_norm, normref.prong_whitening, normref.prong_reparameterize, normref.blended_batch_norm


# --------------------------------------------------------------------------------------------------
# references from the papers' equations (independent of normref's code)


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bc(v, x):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _batch_moments(x):
    """μ_B, biased σ²_B per channel over (N, *spatial), and m."""
    ax = _axes(x)
    m = x.size // x.shape[1]
    mu = x.mean(axis=ax)
    var = ((x - _bc(mu, x)) ** 2).mean(axis=ax)
    return mu, var, m


def ref_population_norm(x, rm, rv, w, b, f, eps, centering, use_updated=True):
    """Eqn 15/18: μ̂ ← (1−f)μ̂ + fμ_B, σ̂² ← (1−f)σ̂² + f·m/(m−1)·σ²_B; y = γ(x − μ̂)[/√(σ̂²+ε)] + β;
    dx/d(out) = γ[/√(σ̂²+ε)] (statistics constant). f=None: no update."""
    mu, var, m = _batch_moments(x)
    nrm, nrv = rm, rv
    if f is not None:
        nrm = (1 - f) * rm + f * mu
        nrv = None if rv is None else (1 - f) * rv + f * var * m / (m - 1)
    um, uv = (nrm, nrv) if use_updated else (rm, rv)
    xh = x - _bc(um, x)
    scale = np.ones_like(um) if centering else 1.0 / np.sqrt(uv + eps)
    xh = xh * _bc(scale, x)
    gw = np.ones_like(um) if w is None else w
    y = xh * _bc(gw, x) + (0.0 if b is None else _bc(b, x))
    return y, nrm, nrv, _bc(gw * scale, x)


def ref_blended(x, rm, rv, alpha, eps, unbiased=True):
    """Dinh et al. / diminishing BN / momentum BN forward: μ = (1−α)μ_run + αμ_B, σ² = (1−α)σ²_run +
    α·σ²_B (unbiased, or biased as Dinh et al. and Yong et al. write it); x̂ = (x − μ)/√(σ² + ε)."""
    mu_b, var_b, m = _batch_moments(x)
    mu = (1 - alpha) * rm + alpha * mu_b
    var = (1 - alpha) * rv + alpha * var_b * (m / (m - 1) if unbiased else 1.0)
    return (x - _bc(mu, x)) / np.sqrt(_bc(var, x) + eps), mu, var


def paper_mbn_lambda(t, T, m, m0=32):
    """Yong et al. (ECCV 2020) Sec. 4.2, the dynamic momentum: λ^(t) = ρ^(T/(T−1)·max(T−t, 0)) − ρ^T with
    ρ = min(m/m0, 1)^(1/T); t the epoch (1-based), T the epochs, m the batch size, m0 = 32."""
    rho = min(m / m0, 1.0) ** (1.0 / T)
    return rho ** (T / (T - 1) * max(T - t, 0)) - rho ** T


def torch_blended_grads(x, rm, rv, w, b, alpha, eps, g, unbiased=True):
    """Gradients of ⟨g, y⟩ by torch autograd on the paper's formula with the old state detached (the
    backward through the batch share only), float64: (dx, dw, db)."""
    torch = pytest.importorskip("torch")
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    xt, wt, bt = t(x).requires_grad_(), t(w).requires_grad_(), t(b).requires_grad_()
    dims = list(_axes(x))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = (1 - alpha) * t(rm) + alpha * xt.mean(dim=dims)
    var = (1 - alpha) * t(rv) + alpha * xt.var(dim=dims, unbiased=unbiased)
    y = (xt - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * wt.reshape(shape) + bt.reshape(shape)
    grads = torch.autograd.grad(y, (xt, wt, bt), grad_outputs=t(g))
    return tuple(gr.numpy() for gr in grads)


def np_zca(cov):
    lam, e = np.linalg.eigh(cov)
    return (e / np.sqrt(lam)) @ e.T


def np_pca(cov):
    lam, e = np.linalg.eigh(cov)
    return (e / np.sqrt(lam)).T


# --------------------------------------------------------------------------------------------------
# every array library: forward, state and gradients against the references


def _case(rng, shape=(6, 3, 2, 2)):
    x = rng.standard_normal(shape) * 1.4 + 0.6
    c = shape[1]
    return x, rng.standard_normal(c) * 0.3, rng.uniform(0.5, 2.0, c), rng.uniform(0.5, 1.5, c), rng.standard_normal(c)


@pytest.mark.parametrize("centering", [True, False])
def test_population_norm_every_library(backend, rng, centering):
    a = On(backend)
    x, rm, rv, w, b = _case(rng)
    g = rng.standard_normal(x.shape)
    op = "centering" if centering else "standardizing"
    for kw, f, upd in [(dict(momentum=0.25), 0.25, True), (dict(momentum=0.25, use_updated=False), 0.25, False),
                       (dict(momentum=None, update_every=2, num_batches_tracked=4), 1 / 3, True),
                       (dict(update_every=2, num_batches_tracked=5), None, True)]:
        out, pull = normref.vjp(PN, a(x), a(rm), a(rv), a(w), a(b), True, eps=1e-5, operation=op, **kw)
        y, nrm, nrv, dscale = ref_population_norm(x, rm, rv, w, b, f, 1e-5, centering, upd)
        assert rel_err(a.np(out.output), y) <= TOL64
        assert rel_err(a.np(out.running_mean), nrm) <= TOL64 and rel_err(a.np(out.running_var), nrv) <= TOL64
        dx, drm, drv, dw, db = pull(a(g))
        assert drm is None and drv is None
        assert rel_err(a.np(dx), g * dscale) <= TOL64
        xh = (y - _bc(b, x)) / _bc(w, x)
        assert rel_err(a.np(dw), (g * xh).sum(axis=_axes(x))) <= TOL64
        assert rel_err(a.np(db), g.sum(axis=_axes(x))) <= TOL64
    # inference: by the given statistics, no update
    y, *_ = ref_population_norm(x, rm, rv, w, b, None, 1e-5, centering)
    assert rel_err(a.np(PN(a(x), a(rm), a(rv), a(w), a(b), operation=op)), y) <= TOL64


@pytest.mark.parametrize("preset, kw, alpha", [
    ("dinh", dict(momentum=0.3), 0.3),
    ("momentum", dict(momentum=0.75), 0.75),
    ("diminishing", dict(num_batches_tracked=4, decay=0.6), 5 ** -0.6),
    ("dinh", dict(momentum=None, num_batches_tracked=2), 1 / 3),
    ("diminishing", dict(num_batches_tracked=3, decay=2.0), 1 / 16),  # Ma & Klabjan's α^(m) = 1/m², m = 4
    # Yong et al.'s dynamic momentum at epoch 3 of 10, batch size N = 6, and the paper's biased σ²_B
    ("momentum", dict(epoch=3, total_epochs=10, unbiased=False), 1 - paper_mbn_lambda(3, 10, 6)),
])
def test_blended_every_library(backend, rng, preset, kw, alpha):
    a = On(backend)
    x, rm, rv, w, b = _case(rng)
    g = rng.standard_normal(x.shape)
    out, pull = normref.vjp(BB, a(x), a(rm), a(rv), a(w), a(b), True, eps=1e-5, preset=preset, **kw)
    unb = kw.get("unbiased", True)
    xh, mu, var = ref_blended(x, rm, rv, alpha, 1e-5, unb)
    assert rel_err(a.np(out.output), xh * _bc(w, x) + _bc(b, x)) <= TOL64
    assert rel_err(a.np(out.running_mean), mu) <= TOL64 and rel_err(a.np(out.running_var), var) <= TOL64
    dx, drm, drv, dw, db = pull(a(g))
    assert drm is None and drv is None
    ex, ew, eb = torch_blended_grads(x, rm, rv, w, b, alpha, 1e-5, g, unb)
    for got, want in ((dx, ex), (dw, ew), (db, eb)):
        assert rel_err(a.np(got), want) <= TOL64


def test_prong_whitening_every_library(backend, rng):
    a = On(backend)
    x = rng.standard_normal((12, 4, 2)) + 0.4
    x[:, 1] += 0.7 * x[:, 0]
    rm = rng.standard_normal(4) * 0.2
    rc = np.stack([np.eye(2) * 1.5, np.eye(2) * 0.7])
    w, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    g = rng.standard_normal(x.shape)
    out, pull = normref.vjp(PW, a(x), a(rm), a(rc), a(w), a(b), True, momentum=0.4, group_size=2, method="zca")
    # reference: Eqn 18 on the mean and the unbiased covariance per group, then ZCA by them
    xs = np.moveaxis(x, 1, -1).reshape(-1, 4)  # samples × channels
    mu_b = xs.mean(0)
    xc = (xs - mu_b).reshape(-1, 2, 2)
    cov_b = np.einsum("ngi,ngj->gij", xc, xc) / (xs.shape[0] - 1)
    nrm, nrc = 0.6 * rm + 0.4 * mu_b, 0.6 * rc + 0.4 * cov_b
    u = np.stack([np_zca(nrc[k] + 1e-5 * np.eye(2)) for k in range(2)])
    z = np.einsum("gij,ngj->ngi", u, (xs - nrm).reshape(-1, 2, 2)).reshape(-1, 4) * w + b
    y = np.moveaxis(z.reshape(x.shape[0], x.shape[2], 4), -1, 1)
    assert rel_err(a.np(out.output), y) <= 10 * TOL64  # cond: κ(Σ) ≤ 10
    assert rel_err(a.np(out.running_mean), nrm) <= TOL64 and rel_err(a.np(out.running_cov), nrc) <= TOL64
    dx = pull(a(g))[0]
    gs = (np.moveaxis(g, 1, -1).reshape(-1, 4) * w).reshape(-1, 2, 2)
    dxs = np.einsum("gji,ngj->ngi", u, gs).reshape(-1, 4)  # dx = Uᵀ(γ·g) per group, U constant
    assert rel_err(a.np(dx), np.moveaxis(dxs.reshape(x.shape[0], x.shape[2], 4), -1, 1)) <= 10 * TOL64


# --------------------------------------------------------------------------------------------------
# finite differences (float64, random directions) on draws beyond the registry's examples


def _fd_cases(rng):
    for shape in [(2, 3), (5, 2, 3), (3, 4, 2, 2)]:
        x, rm, rv, w, b = _case(rng, shape)
        yield PN, (x, rm, rv, w, b, True), dict(operation="standardizing", momentum=0.5)
        yield PN, (x, rm, None, w, b, True), dict(momentum=None, num_batches_tracked=3)
        yield BB, (x, rm, rv, w, b, True), dict(momentum=1.0)  # α = 1: batch statistics (unbiased σ²)
        yield BB, (x, rm, rv, w, b, True), dict(momentum=0.05)
        yield BB, (x, rm, rv, None, None, True), dict(preset="diminishing", num_batches_tracked=0)
        yield BB, (x, rm, rv, w, b, True), dict(preset="diminishing", num_batches_tracked=9, decay=0.55)
        yield BB, (x, rm, rv, w, b, True), dict(preset="momentum", epoch=2, total_epochs=4, unbiased=False)
    x = rng.standard_normal((16, 4)) + 0.2
    x[:, 3] -= 0.5 * x[:, 2]
    a4 = rng.standard_normal((4, 4))
    yield PW, (x, rng.standard_normal(4) * 0.1, (a4 @ a4.T / 4 + np.eye(4))[None], None, None, True), dict(momentum=0.5)
    yield PW, (x, np.zeros(4), np.eye(4)[None].repeat(2, 0)[:, :2, :2], None, None, True), dict(group_size=2)


def test_finite_differences(rng):
    worst = {}
    for fn, args, kw in _fd_cases(rng):
        r = fd_check(fn, args, kw, seed=5, directions=3)
        worst[fn.name] = max(worst.get(fn.name, 0.0), r.max_error)
        assert r.max_error <= 1e-6, (fn.name, kw, r)
    assert set(worst) == {"population_norm", "blended_batch_norm", "prong_whitening"}


# --------------------------------------------------------------------------------------------------
# invariants


def test_blended_limits(rng):
    """α = 0 is normalization by the running statistics (batch_norm at inference, its backward too);
    α = 1 gives the batch statistics, the state torch's batch_norm keeps with momentum 1."""
    x, rm, rv, w, b = _case(rng)
    g = rng.standard_normal(x.shape)
    out, pull = normref.vjp(BB, x, rm, rv, w, b, True, 0.0)
    ref, rpull = normref.vjp(normref.batch_norm, x, rm, rv, w, b, False)
    assert rel_err(out.output, ref) <= TOL64 and rel_err(out.running_var, rv) <= TOL64
    for u, v in zip(pull(g), rpull(g)):
        assert (u is None and v is None) or rel_err(u, v) <= TOL64
    one = BB(x, rm, rv, w, b, True, 1.0)
    bn = normref.batch_norm(x, rm, rv, w, b, True, 1.0)
    assert rel_err(one.running_mean, bn.running_mean) <= TOL64 and rel_err(one.running_var, bn.running_var) <= TOL64
    # x̂ by the batch mean and the unbiased batch variance: mean 0 and unbiased variance σ²/(σ² + ε)
    xh = (one.output - _bc(b, x)) / _bc(w, x)
    mu, var, m = _batch_moments(xh)
    assert np.max(np.abs(mu)) <= TOL64
    s2 = bn.running_var
    assert rel_err(var * m / (m - 1), s2 / (s2 + 1e-5)) <= TOL64


def test_momentum_bn_dynamic_momentum():
    """λ^(t) against the paper's formula (paper_mbn_lambda, written here) and its stated end points: λ = 0 at
    the first epoch (plain BN), λ = 1 − m/m0 from the last epoch on (the ideal batch size's noise), λ = 0 for
    m ≥ m0, non-decreasing in between. Tolerance: a few roundings of pow near 1, TOL64 absolute."""
    T, m = 200, 8
    lams = [normref.momentum_bn_momentum(t, T, m) for t in range(1, T + 4)]
    assert all(abs(lam - paper_mbn_lambda(t, T, m)) <= TOL64 for t, lam in zip(range(1, T + 4), lams))
    assert 0.0 <= lams[0] <= TOL64 and all(abs(lam - (1 - m / 32)) <= TOL64 for lam in lams[T - 1:])
    assert all(u <= v + TOL64 for u, v in zip(lams, lams[1:]))
    assert all(normref.momentum_bn_momentum(t, 10, 32) == 0.0 for t in (1, 5, 12))
    assert abs(normref.momentum_bn_momentum(1, 1, 8, ideal_batch_size=16) - 0.5) <= TOL64  # T = 1: the end value


def test_population_norm_schedule_and_inference(rng):
    x, rm, rv, w, b = _case(rng)
    # hold steps (k mod T ≠ 0) return the state unchanged and normalize by it
    for k in range(7):
        out = PN(x, rm, rv, w, b, True, 0.5, operation="standardizing", update_every=3, num_batches_tracked=k)
        changed = rel_err(out.running_mean, rm) > 0
        assert changed == (k % 3 == 0)
    # inference equals batch_norm's (standardizing) and mean_only_batch_norm's idea (centering)
    assert rel_err(PN(x, rm, rv, w, b, operation="standardizing"), normref.batch_norm(x, rm, rv, w, b)) <= TOL64
    y = PN(x, rm, None, None, b)
    assert rel_err(y, x - _bc(rm, x) + _bc(b, x)) <= TOL64
    # pure: nothing given is modified
    keep = [a.copy() for a in (x, rm, rv, w, b)]
    PN(x, rm, rv, w, b, True, operation="standardizing")
    BB(x, rm, rv, w, b, True)
    assert all(np.array_equal(u, v) for u, v in zip(keep, (x, rm, rv, w, b)))


def test_prong_whitens_with_fresh_statistics(rng):
    """On a re-estimation step with momentum 1 the whitened batch has cov(x̂) = U·Σ·Uᵀ with the eigenvalues
    λ_i/(λ_i + ε) of Σ(Σ + εI)⁻¹ whatever the basis (PCA and ZCA), and the Mahalanobis norm of every
    sample is basis-free: Σ_i x̂_i² = (x − μ)ᵀ(Σ + εI)⁻¹(x − μ) (UᵀU = (Σ + εI)⁻¹)."""
    x = rng.standard_normal((40, 4)) @ np.diag([2.0, 1.0, 0.6, 0.3]) + 1.0
    for meth in ("pca", "zca"):
        out = PW(x, np.zeros(4), np.eye(4)[None], None, None, True, method=meth, num_batches_tracked=0, update_every=4)
        assert rel_err(out.running_cov[0], np.cov(x.T)) <= TOL64 and rel_err(out.running_mean, x.mean(0)) <= TOL64
        cov = out.running_cov[0] + 1e-5 * np.eye(4)
        lam = np.linalg.eigvalsh(out.running_cov[0])
        got = np.linalg.eigvalsh(np.cov(out.output.T))
        assert rel_err(got, lam / (lam + 1e-5)) <= 10 * TOL64  # cond: κ(Σ) ≈ (2/0.3)² ≈ 44 → eigenvalues
        maha = np.einsum("ni,ij,nj->n", x - out.running_mean, np.linalg.inv(cov), x - out.running_mean)
        assert rel_err((out.output ** 2).sum(1), maha) <= 10 * TOL64


def test_prong_reparameterize_keeps_the_function(rng):
    torch = pytest.importorskip("torch")
    c, cout = 4, 3
    h = rng.standard_normal((9, c)) + 0.5
    m0, m1 = rng.standard_normal(c) * 0.2, rng.standard_normal(c) * 0.3
    a0, a1 = rng.standard_normal((2, 2, 2)), rng.standard_normal((2, 2, 2))
    s0 = a0 @ a0.transpose(0, 2, 1) / 2 + np.eye(2)
    s1 = a1 @ a1.transpose(0, 2, 1) / 2 + np.eye(2)
    for meth in ("pca", "zca", "cholesky"):
        v, d = rng.standard_normal((cout, c)), rng.standard_normal(cout)
        new = PR(v, d, m0, s0, m1, s1, method=meth)
        z0 = PW(h, m0, s0, group_size=2, method=meth)
        z1 = PW(h, m1, s1, group_size=2, method=meth)
        assert rel_err(z1 @ new.weight.T + new.bias, z0 @ v.T + d) <= 10 * TOL64
        assert rel_err(PR(v, None, m0, s0, m1, s1, method=meth).bias, new.bias - d) <= TOL64
    # a convolution: exact without padding; with zero padding, exact away from the padded border
    hx = rng.standard_normal((2, c, 6, 5)) + 0.5
    v, d = rng.standard_normal((cout, c, 3, 3)), rng.standard_normal(cout)
    new = PR(v, d, m0, s0, m1, s1)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    z0, z1 = t(PW(hx, m0, s0, group_size=2)), t(PW(hx, m1, s1, group_size=2))
    conv = torch.nn.functional.conv2d
    for pad in (0, 1):
        y0 = conv(z0, t(v), t(d), padding=pad).numpy()
        y1 = conv(z1, t(new.weight), t(new.bias), padding=pad).numpy()
        inner = (slice(None), slice(None), slice(pad, y0.shape[2] - pad), slice(pad, y0.shape[3] - pad))
        assert rel_err(y1[inner], y0[inner]) <= 10 * TOL64
    assert rel_err(y1, y0) > 1e-3  # the padded border is not preserved (documented)


# --------------------------------------------------------------------------------------------------
# bad input: ValueError/TypeError naming the function and the argument, before any work

X, C3 = np.ones((4, 3)) + np.arange(12.0).reshape(4, 3), np.ones(3)
NEG = -np.ones(3)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: PN(X, C3, C3, operation="scaling"), ValueError, r"population_norm: operation must be one of"),
    (lambda: PN(X, C3, None, operation="standardizing"), ValueError, r"population_norm: operation='standardizing' needs running_var"),
    (lambda: PN(X, C3, C3, training="True"), TypeError, r"population_norm: training must be a bool"),
    (lambda: PN(X, C3, C3, training=True, use_updated=1), TypeError, r"population_norm: use_updated must be a bool"),
    (lambda: PN(X, C3, training=True, update_every=0), ValueError, r"population_norm: update_every must be an integer >= 1"),
    (lambda: PN(X, C3, training=True, update_every=2), ValueError, r"population_norm: update_every=2 needs num_batches_tracked"),
    (lambda: PN(X, C3, training=True, momentum=None), ValueError, r"population_norm: momentum=None .* needs num_batches_tracked"),
    (lambda: PN(X, C3, training=True, momentum=1.5), ValueError, r"population_norm: momentum must lie in \[0, 1\]"),
    (lambda: PN(X, np.ones(4)), ValueError, r"population_norm: running_mean must have shape \(3,\)"),
    (lambda: PN(X, C3, NEG, operation="standardizing"), ValueError, r"population_norm: running_var must be >= 0"),
    (lambda: PN(X[:1], C3, training=True), ValueError, r"population_norm: expected more than 1 value per channel"),
    (lambda: PN(X, None), TypeError, r"population_norm.*running_mean"),
    (lambda: BB(X, C3, C3, preset="ghost"), ValueError, r"blended_batch_norm: preset must be one of 'dinh', 'diminishing', 'momentum'"),
    (lambda: BB(X, C3, C3, decay=0.0), ValueError, r"blended_batch_norm: decay must be a finite number > 0"),
    (lambda: BB(X, C3, C3, decay=float("inf")), ValueError, r"blended_batch_norm: decay must be a finite number > 0"),
    (lambda: BB(X, C3, C3, training=True, preset="momentum", epoch=2), ValueError, r"blended_batch_norm: epoch and total_epochs go together"),
    (lambda: BB(X, C3, C3, training=True, epoch=2, total_epochs=5), ValueError, r"blended_batch_norm: epoch/total_epochs .* need preset='momentum'"),
    (lambda: BB(X, C3, C3, training=True, preset="momentum", epoch=0, total_epochs=5), ValueError, r"blended_batch_norm: epoch must be an integer >= 1"),
    (lambda: BB(X, C3, C3, training=True, preset="momentum", epoch=1, total_epochs=2.0), TypeError, r"blended_batch_norm: total_epochs must be an integer"),
    (lambda: BB(X, C3, C3, ideal_batch_size=0), ValueError, r"blended_batch_norm: ideal_batch_size must be an integer >= 1"),
    (lambda: BB(X, C3, C3, unbiased=1), TypeError, r"blended_batch_norm: unbiased must be a bool"),
    (lambda: normref.momentum_bn_momentum(1, 0, 8), ValueError, r"momentum_bn_momentum: total_epochs must be an integer >= 1"),
    (lambda: normref.momentum_bn_momentum(1, 10, 8, ideal_batch_size=None), TypeError, r"momentum_bn_momentum: ideal_batch_size"),
    (lambda: BB(X, C3, C3, decay=True), ValueError, r"blended_batch_norm: decay must be a finite number > 0; got True"),
    (lambda: BB(X, C3, C3, training=True, preset="diminishing"), ValueError, r"blended_batch_norm: preset='diminishing' needs num_batches_tracked"),
    (lambda: BB(X, C3, C3, training=True, momentum=None), ValueError, r"blended_batch_norm: momentum=None .* needs num_batches_tracked"),
    (lambda: BB(X, C3, NEG), ValueError, r"blended_batch_norm: running_var must be >= 0"),
    (lambda: BB(X, C3, C3, np.ones(2)), ValueError, r"blended_batch_norm: weight must have shape \(3,\)"),
    (lambda: BB(X, C3, C3, training=True, num_batches_tracked=-1), ValueError, r"blended_batch_norm: num_batches_tracked must be an integer >= 0"),
    (lambda: BB(X, C3, C3, eps=0.0), ValueError, r"blended_batch_norm: eps"),
    (lambda: PW(X, C3, np.eye(3)[None], method="svd"), ValueError, r"prong_whitening: method must be one of"),
    (lambda: PW(X, C3, np.eye(3)), ValueError, r"prong_whitening: running_cov must have shape \(1, 3, 3\)"),
    (lambda: PW(X, C3, np.eye(3)[None], group_size=2), ValueError, r"prong_whitening: group_size must divide the 3 channels"),
    (lambda: PW(X, C3, np.eye(3)[None], training=True, update_every=3), ValueError, r"prong_whitening: update_every=3 needs num_batches_tracked"),
    (lambda: PW(X, C3, np.eye(3)[None], training=1), TypeError, r"prong_whitening: training must be a bool"),
    (lambda: PR(np.ones((2, 3)), None, C3, np.eye(3)[None], C3, np.eye(2)[None]), ValueError, r"prong_reparameterize: new_cov must have old_cov's shape"),
    (lambda: PR(np.ones((2, 4)), None, C3, np.eye(3)[None], C3, np.eye(3)[None]), ValueError, r"prong_reparameterize: old_cov must have shape \(G, c, c\) with G·c = weight.shape\[1\] = 4"),
    (lambda: PR(np.ones((2, 3)), np.ones(3), C3, np.eye(3)[None], C3, np.eye(3)[None]), ValueError, r"prong_reparameterize: bias must have shape \(2,\)"),
    (lambda: PR(np.ones((2, 3)), None, np.ones(2), np.eye(3)[None], C3, np.eye(3)[None]), ValueError, r"prong_reparameterize: old_mean must have shape \(3,\)"),
    (lambda: PR(np.ones(3), None, C3, np.eye(3)[None], C3, np.eye(3)[None]), ValueError, r"prong_reparameterize: weight"),
    (lambda: PR(np.ones((2, 3)), None, C3, None, C3, np.eye(3)[None]), TypeError, r"prong_reparameterize: old_cov must be an array"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_before_any_work(monkeypatch):
    """A bad argument is refused before the batch statistics are computed."""
    from normref import operation as _op

    calls = []
    real = _op.moments
    monkeypatch.setattr(_op, "moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ValueError):
        PN(X, C3, training=True, update_every=2)
    with pytest.raises(ValueError):
        BB(X, C3, C3, training=True, preset="diminishing", decay=-1.0, num_batches_tracked=2)
    with pytest.raises(ValueError):
        BB(X, C3, C3, training=True, preset="momentum", epoch=3, total_epochs=None)
    assert not calls


# --------------------------------------------------------------------------------------------------
# training loops against independent re-implementations of the papers' algorithms

STEPS, LR = 6, 0.1


def _stream(rng, n=8, d=3, c=3):
    return [(rng.standard_normal((n, d)) + 0.5, rng.standard_normal((n, c))) for _ in range(STEPS)]


def test_training_loop_wiesler_centering(rng):
    """Wiesler et al.: z = x·A, μ̂ ← (1−f)μ̂ + f·mean(z), y = γ(z − μ̂) + β, μ̂ constant in back-propagation;
    SGD on A, γ, β for 6 steps — normref's vjp against the loop below (NumPy, from the equations)."""
    data = _stream(rng)
    A0, g0, b0 = rng.standard_normal((3, 3)), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    f = 0.3
    # reference
    A, gam, bet, mu = A0.copy(), g0.copy(), b0.copy(), np.zeros(3)
    ref_losses = []
    for x, t in data:
        z = x @ A
        mu = (1 - f) * mu + f * z.mean(0)
        zh = z - mu
        y = gam * zh + bet
        ref_losses.append(float(((y - t) ** 2).mean()))
        dy = 2 * (y - t) / y.size
        dA, dg, db = x.T @ (dy * gam), (dy * zh).sum(0), dy.sum(0)
        A, gam, bet = A - LR * dA, gam - LR * dg, bet - LR * db
    # normref
    nA, ng, nb, rm = A0.copy(), g0.copy(), b0.copy(), np.zeros(3)
    losses = []
    for x, t in data:
        out, pull = normref.vjp(PN, x @ nA, rm, None, ng, nb, True, f)
        rm, y = out.running_mean, out.output
        losses.append(float(((y - t) ** 2).mean()))
        dz, _, _, dg, db = pull(2 * (y - t) / y.size)
        nA, ng, nb = nA - LR * (x.T @ dz), ng - LR * dg, nb - LR * db
    assert rel_err(losses, ref_losses) <= STEPS * TOL64
    for u, v in ((nA, A), (ng, gam), (nb, bet), (rm, mu)):
        assert rel_err(u, v) <= STEPS * TOL64


def _blended_loop_reference(data, A0, g0, b0, alphas, eps, unbiased=True):
    """The blended-statistics training loop in torch (float64), the paper's equations, autograd as the
    gradient oracle with the old state detached (the backward through the current batch only)."""
    torch = pytest.importorskip("torch")
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    A, gam, bet = t(A0), t(g0), t(b0)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    losses = []
    for (x, tg), alpha in zip(data, alphas):
        A.requires_grad_(), gam.requires_grad_(), bet.requires_grad_()
        z = t(x) @ A
        mu = (1 - alpha) * rm + alpha * z.mean(0)
        var = (1 - alpha) * rv + alpha * z.var(0, unbiased=unbiased)
        y = gam * (z - mu) / torch.sqrt(var + eps) + bet
        loss = ((y - t(tg)) ** 2).mean()
        dA, dg, db = torch.autograd.grad(loss, (A, gam, bet))
        losses.append(float(loss))
        with torch.no_grad():
            A, gam, bet = A - LR * dA, gam - LR * dg, bet - LR * db
        rm, rv = mu.detach(), var.detach()
    return [v.detach().numpy() for v in (A, gam, bet, rm, rv)], losses


@pytest.mark.parametrize("preset", ["dinh", "diminishing", "diminishing_paper", "momentum", "momentum_paper"])
def test_training_loop_blended(rng, preset):
    data = _stream(rng)
    A0, g0, b0 = rng.standard_normal((3, 3)), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    unbiased = True
    if preset == "diminishing":  # α_k = (k + 1)^-0.8
        kws = [dict(preset=preset, num_batches_tracked=k, decay=0.8) for k in range(STEPS)]
        alphas = [(k + 1) ** -0.8 for k in range(STEPS)]
    elif preset == "diminishing_paper":  # Ma & Klabjan's experiments: α^(m) = 1/m², m = 1, 2, ...
        kws = [dict(preset="diminishing", num_batches_tracked=m - 1, decay=2) for m in range(1, STEPS + 1)]
        alphas = [1 / m ** 2 for m in range(1, STEPS + 1)]
    elif preset == "momentum_paper":  # Yong et al.: one step per epoch t = 1..T, λ^(t) of Sec. 4.2, biased σ²_B
        kws = [dict(preset="momentum", epoch=t, total_epochs=STEPS, unbiased=False) for t in range(1, STEPS + 1)]
        alphas = [1 - paper_mbn_lambda(t, STEPS, data[0][0].shape[0]) for t in range(1, STEPS + 1)]
        unbiased = False
    elif preset == "momentum":  # a dynamic momentum λ_t fed by the caller, α = 1 − λ_t
        lams = [0.1 + 0.15 * k for k in range(STEPS)]
        kws = [dict(preset=preset, momentum=1 - lam) for lam in lams]
        alphas = [1 - lam for lam in lams]
    else:
        kws, alphas = [dict(momentum=0.2)] * STEPS, [0.2] * STEPS
    want, ref_losses = _blended_loop_reference(data, A0, g0, b0, alphas, 1e-5, unbiased)
    A, gam, bet, rm, rv = A0.copy(), g0.copy(), b0.copy(), np.zeros(3), np.ones(3)
    losses = []
    for (x, t), kw in zip(data, kws):
        out, pull = normref.vjp(BB, x @ A, rm, rv, gam, bet, True, **kw)
        y, rm, rv = out
        losses.append(float(((y - t) ** 2).mean()))
        dz, _, _, dg, db = pull(2 * (y - t) / y.size)
        A, gam, bet = A - LR * (x.T @ dz), gam - LR * dg, bet - LR * db
    assert rel_err(losses, ref_losses) <= STEPS * TOL64
    for u, v in zip((A, gam, bet, rm, rv), want):
        assert rel_err(u, v) <= STEPS * TOL64


@pytest.mark.parametrize("meth", ["pca", "zca"])
def test_training_loop_prong(rng, meth):
    """Desjardins et al., Algorithm 1: h = x·A, z = U(h − c), out = V·z + d; every T = 3 steps c, Σ are
    re-estimated from the batch, U = (Λ + ε)^-½·Eᵀ (PCA) and V, d re-parameterized so that the function
    is kept; SGD on A, V, d. The reference is written with numpy.linalg.eigh; the eigenbasis (signs,
    order) may differ from normref's, so the basis-free canonical parameters W = V·U, b = d − V·U·c,
    the first layer A and the losses are compared."""
    T, eps, n, cin, c, cout = 3, 1e-5, 16, 6, 4, 2
    data = [(rng.standard_normal((n, cin)) + 0.3, rng.standard_normal((n, cout))) for _ in range(7)]
    A0 = rng.standard_normal((cin, c))
    V0, d0 = 0.5 * rng.standard_normal((cout, c)), rng.standard_normal(cout)
    lr = 0.02  # the whitened layer amplifies A's gradient by U ~ Σ^-½: a smaller step keeps SGD stable
    whiten = np_pca if meth == "pca" else np_zca
    # reference
    A, V, d, cm, U = A0.copy(), V0.copy(), d0.copy(), np.zeros(c), np.eye(c) / np.sqrt(1 + eps)
    ref_losses, ref_can, conds = [], [], []
    for k, (x, t) in enumerate(data):
        h = x @ A
        if k % T == 0:
            c_new = h.mean(0)
            S = (h - c_new).T @ (h - c_new) / (n - 1)
            kappa = float(np.linalg.cond(S + eps * np.eye(c)))
            U_new = whiten(S + eps * np.eye(c))
            V, d = V @ U @ np.linalg.inv(U_new), d + V @ U @ (c_new - cm)
            cm, U = c_new, U_new
        z = (h - cm) @ U.T
        out = z @ V.T + d
        ref_losses.append(float(((out - t) ** 2).mean()))
        do = 2 * (out - t) / out.size
        dV, dd, dh = do.T @ z, do.sum(0), (do @ V) @ U
        A, V, d = A - lr * (x.T @ dh), V - lr * dV, d - lr * dd
        ref_can.append((V @ U, d - V @ U @ cm, A))
        conds.append(kappa)
    # normref
    A, V, d, rm, rc = A0.copy(), V0.copy(), d0.copy(), np.zeros(c), np.eye(c)[None]
    losses = []
    for k, (x, t) in enumerate(data):
        h = x @ A
        res, pull = normref.vjp(PW, h, rm, rc, None, None, True, method=meth, update_every=T, num_batches_tracked=k)
        if k % T == 0:
            V, d = PR(V, d, rm, rc, res.running_mean, res.running_cov, method=meth)
        rm, rc = res.running_mean, res.running_cov
        z = res.output
        out = z @ V.T + d
        losses.append(float(((out - t) ** 2).mean()))
        do = 2 * (out - t) / out.size
        dh = pull(do @ V)[0]
        A, V, d = A - lr * (x.T @ dh), V - lr * (do.T @ z), d - lr * do.sum(0)
        U = normref.whitening_matrix(rc[0] + eps * np.eye(c), meth)
        can = (V @ U, d - V @ U @ rm, A)
        # cond: κ(Σ + εI) of the statistics in use (U_new⁻¹ and the eigendecomposition amplify by it),
        # accumulated over the k + 1 steps so far
        budget = (k + 1) * max(conds[: k + 1]) * TOL64
        for u, v in zip(can, ref_can[k]):
            assert rel_err(u, v) <= budget
    assert rel_err(losses, ref_losses) <= len(data) * max(conds) * TOL64
    assert max(conds) < 1e3  # a benign problem: the comparison is meaningful at these budgets


# --------------------------------------------------------------------------------------------------
# the torch and JAX adapters


def test_torch_adapter_training_loop(rng):
    """The blended loop through normref.backends.torch (autograd.Function generated from the registry)
    equals the independent reference; the returned state carries no gradient; StatefulNorm keeps the
    same state in its buffers."""
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    data = _stream(rng)
    A0, g0, b0 = rng.standard_normal((3, 3)), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    alphas = [(k + 1) ** -0.8 for k in range(STEPS)]
    want, ref_losses = _blended_loop_reference(data, A0, g0, b0, alphas, 1e-5)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    A, gam, bet = t(A0), t(g0), t(b0)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for k, (x, tg) in enumerate(data):
        A.requires_grad_(), gam.requires_grad_(), bet.requires_grad_()
        out = nt.blended_batch_norm(t(x) @ A, rm, rv, gam, bet, True, preset="diminishing", decay=0.8,
                                    num_batches_tracked=k)
        assert out.output.requires_grad and not out.running_mean.requires_grad and not out.running_var.requires_grad
        loss = ((out.output - t(tg)) ** 2).mean()
        assert abs(float(loss) - ref_losses[k]) <= (k + 1) * TOL64 * max(1.0, ref_losses[k])
        dA, dg, db = torch.autograd.grad(loss, (A, gam, bet))
        with torch.no_grad():
            A, gam, bet = A - LR * dA, gam - LR * dg, bet - LR * db
        rm, rv = out.running_mean, out.running_var
    for u, v in zip((A, gam, bet, rm, rv), want):
        assert rel_err(u.detach().numpy(), v) <= STEPS * TOL64

    layer = nt.StatefulNorm("blended_batch_norm", 3, preset="diminishing", decay=0.8, dtype=torch.float64)
    frm, frv = np.zeros(3), np.ones(3)
    for k, (x, _) in enumerate(data[:3]):
        layer(t(x))
        o = BB(x, frm, frv, None, None, True, preset="diminishing", decay=0.8, num_batches_tracked=k)
        frm, frv = o.running_mean, o.running_var
    assert rel_err(layer.running_mean.numpy(), frm) <= TOL64 and rel_err(layer.running_var.numpy(), frv) <= TOL64
    layer.eval()
    x = data[0][0]
    want = normref.batch_norm(x, frm, frv, layer.weight.detach().numpy(), layer.bias.detach().numpy())
    assert rel_err(layer(t(x)).detach().numpy(), want) <= TOL64

    pl = nt.StatefulNorm("prong_whitening", 3, update_every=2, dtype=torch.float64)
    for x, _ in data[:3]:
        pl(t(x))
    assert int(pl.num_batches_tracked) == 3  # re-estimated at steps 0 and 2: the last batch's statistics
    assert rel_err(pl.running_mean.numpy(), data[2][0].mean(0)) <= TOL64
    assert rel_err(pl.running_cov.numpy()[0], np.cov(data[2][0].T)) <= TOL64


def test_jax_adapter_scan(rng):
    """A lax.scan over steps through normref.backends.jax: state through the carry, gradients by
    jax.grad equal to NumPy's pullbacks step by step."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from normref.backends import jax as nj

    xs = np.stack([rng.standard_normal((6, 3)) + 0.2 for _ in range(3)])
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)

    def loss(xs, w, b):
        def body(carry, x):
            o = nj.blended_batch_norm(x, carry[0], carry[1], w, b, True, 0.3)
            p = nj.population_norm(x, carry[2], None, w, b, True, 0.3)
            return (o.running_mean, o.running_var, p.running_mean), jnp.sum(jnp.sin(o.output)) + jnp.sum(p.output ** 2)

        state, ls = jax.lax.scan(body, (jnp.zeros(3), jnp.ones(3), jnp.zeros(3)), xs)
        return jnp.sum(ls), state

    (val, state), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(jnp.asarray(xs), w, b)
    rm, rv, pm = np.zeros(3), np.ones(3), np.zeros(3)
    dxs, dw, db, total = [], np.zeros(3), np.zeros(3), 0.0
    for x in xs:
        o, pull = normref.vjp(BB, x, rm, rv, w, b, True, 0.3)
        p, ppull = normref.vjp(PN, x, pm, None, w, b, True, 0.3)
        total += np.sum(np.sin(o.output)) + np.sum(p.output ** 2)
        g1, g2 = pull(np.cos(o.output)), ppull(2 * p.output)
        dxs.append(g1[0] + g2[0])
        dw, db = dw + g1[3] + g2[3], db + g1[4] + g2[4]
        rm, rv, pm = o.running_mean, o.running_var, p.running_mean
    assert abs(float(val) - total) <= TOL64 * abs(total)
    for u, v in zip(state, (rm, rv, pm)):
        assert rel_err(np.asarray(u), v) <= TOL64
    for u, v in zip(grads, (np.stack(dxs), dw, db)):
        assert rel_err(np.asarray(u), v) <= TOL64
