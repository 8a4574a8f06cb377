"""Tests of normref.cross_iteration: MABN (+ centralized weights), memorized BN, cross-iteration BN.

Reference values never come from normref's own helpers: the training-loop tests re-implement each
paper's algorithm in plain NumPy (ring buffers, the authors' forward and backward), and the
gradients with respect to the current batch are checked against torch autograd of the formula with
the past statistics detached (the methods' convention). Tolerances: float64 throughout; a few
hundred operations on O(1) values give errors of a few hundred ε₆₄ ≈ 1e-13, so 1e-10 (relative)
leaves a wide margin while any wrong term (O(1/k) or O(ρ·Δθ) ≥ 1e-3 here) is far above it.
Finite differences: central, step ~6e-6, truncation ~h² ≈ 4e-11 relative on these O(1) functions,
rounding ~ε/h ≈ 4e-11; the bound 1e-6 is the project's.
"""

from __future__ import annotations

import numpy as np
import pytest

import normref
from normref import cross_iteration as ci
from normref.conformance.fd import fd_check

TOL = 1e-10  # float64, see the module docstring
FD_TOL = 1e-6


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


AX = (0, 2, 3)


def _c(v):
    return v.reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------------
# MABN: the authors' BatchNormFunction (megvii-model/MABN), re-implemented in NumPy


class _AuthorsMABN:
    """Plain NumPy port of the authors' training step (forward and backward, buffers of size m,
    warm-up while iter <= m, renormalization r clipped to [1/5, 5] after ``renorm_after`` iterations,
    running ← 0.98·running + 0.02·var)."""

    def __init__(self, c, m, renorm_after, eps=1e-5):
        self.m, self.eps, self.renorm_after = m, eps, renorm_after
        self.buffer_x2 = np.zeros((m, c))
        self.buffer_gz = np.zeros((m, c))
        self.running = np.ones(c)
        self.iters = 0

    def step(self, x, w, b, dy):
        self.iters += 1
        it, m, eps = self.iters, self.m, self.eps
        x2 = (x * x).mean(axis=AX)
        self.buffer_x2[it % m] = x2
        var = x2 if it <= m else self.buffer_x2.mean(axis=0)
        z = x / np.sqrt(_c(var) + eps)
        r = np.sqrt(var + eps) / np.sqrt(self.running + eps)
        r = np.ones_like(r) if it <= self.renorm_after else np.clip(r, 1 / 5, 5)
        y = _c(w) * (_c(r) * z) + _c(b)
        self.running = 0.98 * self.running + 0.02 * var
        # backward
        g = dy * _c(w) * _c(r)
        gz = (g * z).mean(axis=AX)
        self.buffer_gz[it % m] = gz
        mean_gz = gz if it <= m else self.buffer_gz.mean(axis=0)
        gx = (g - z * _c(mean_gz)) / np.sqrt(_c(var) + eps)
        return y, gx, (dy * _c(r) * z).sum(axis=AX), dy.sum(axis=AX)


def test_mabn_training_loop_matches_authors_algorithm():
    rng = np.random.default_rng(1)
    c, m, steps, renorm_after = 3, 3, 8, 5
    ref = _AuthorsMABN(c, m, renorm_after)
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    rms = np.ones(c)
    sq_hist, gz_hist = [], []  # newest first
    for it in range(1, steps + 1):
        x = rng.standard_normal((2, c, 3, 3)) * 1.3 + 0.2
        dy = rng.standard_normal(x.shape)
        y_ref, dx_ref, dw_ref, db_ref = ref.step(x, w, b, dy)
        # normref: window = the last m − 1 iterations once warm-up (iter <= m) is over
        use = it > m
        past_sq = np.array(sq_hist[: m - 1]) if use else None
        past_gz = np.array(gz_hist[: m - 1]) if use else None
        rmax = 5.0 if it > renorm_after else None
        out, pullback = normref.vjp(ci.moving_average_batch_norm, x, past_sq, past_gz, w, b, rms,
                                    training=True, momentum=0.02, rmax=rmax)
        dx, _, _, dw, db, _ = pullback(dy)
        gz = ci.moving_average_gradient_statistic(x, dy, past_sq, w, rms, rmax=rmax)
        assert _rel(out.output, y_ref) < TOL, it
        assert _rel(dx, dx_ref) < TOL, it
        assert _rel(dw, dw_ref) < TOL and _rel(db, db_ref) < TOL, it
        assert _rel(out.running_mean_square, ref.running) < TOL, it
        # with affine, Ψ_t = γ·dγ/M (the docstring's identity; an independent expression)
        assert _rel(gz, w * dw / x[:, 0].size) < TOL
        sq_hist.insert(0, out.sq_mean)
        gz_hist.insert(0, gz)
        rms = out.running_mean_square
    # inference uses the running mean square, no centering
    y = ci.moving_average_batch_norm(x, None, None, w, b, rms, training=False)
    assert _rel(y, _c(w) * x / np.sqrt(_c(rms) + 1e-5) + _c(b)) < TOL


def test_mabn_backward_is_exact_without_past_gradient_statistics():
    """Without past gradient statistics the backward is the derivative of the forward (past χ² held
    fixed): compared with torch autograd of the formula."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 2, 2)) + 0.4
    past = rng.uniform(0.5, 2.0, (2, 2))
    w, b, dy = rng.standard_normal(2), rng.standard_normal(2), rng.standard_normal(x.shape)
    _, pullback = normref.vjp(ci.moving_average_batch_norm, x, past, None, w, b, training=True)
    dx = pullback(dy)[0]
    xt = torch.tensor(x, requires_grad=True)
    psi = ((xt * xt).mean(dim=AX) + torch.tensor(past).sum(0)) / 3
    y = torch.tensor(w).view(1, -1, 1, 1) * xt / torch.sqrt(psi.view(1, -1, 1, 1) + 1e-5)
    (y * torch.tensor(dy)).sum().backward()
    assert _rel(dx, xt.grad.numpy()) < TOL
    # and with past gradient statistics the paper's extra term −z·ΣΨ_past/(m·√(ψ̄+ε)) appears
    pg = rng.standard_normal((2, 2))
    _, pullback2 = normref.vjp(ci.moving_average_batch_norm, x, past, pg, w, b, training=True)
    psi_n = psi.detach().numpy()
    z = x / np.sqrt(_c(psi_n) + 1e-5)
    extra = -z * _c(pg.sum(0)) / 3 / np.sqrt(_c(psi_n) + 1e-5)
    assert _rel(pullback2(dy)[0], xt.grad.numpy() + extra) < TOL


def test_centralized_weight():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((4, 3, 2, 2)) + 1.0
    w = ci.centralized_weight(v)
    assert np.max(np.abs(w.reshape(4, -1).mean(1))) < 1e-14
    assert _rel(w, v - v.mean(axis=(1, 2, 3), keepdims=True)) < TOL
    # a layer input with the same mean in every channel: the centralized conv output has mean 0
    torch = pytest.importorskip("torch")
    out = torch.nn.functional.conv2d(torch.full((2, 3, 5, 5), 2.0, dtype=torch.float64), torch.tensor(w))
    assert float(out.abs().max()) < 1e-12


# --------------------------------------------------------------------------------------------------
# memorized BN: the memorized statistics are those of the union of the memorized batches


def test_memorized_training_loop_against_union_of_batches():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    c, k = 3, 3
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = np.zeros(c), np.ones(c)
    batches, means, vars_ = [], [], []
    for step in range(5):
        x = rng.standard_normal((2, c, 2, 3)) * (1 + step) + step
        dy = rng.standard_normal(x.shape)
        memory = batches[: k - 1]  # raw past batches, newest first (the reference keeps examples)
        pm = np.array(means[: k - 1]) if memory else None
        pv = np.array(vars_[: k - 1]) if memory else None
        out, pullback = normref.vjp(ci.memorized_batch_norm, x, pm, pv, w, b, rm, rv, training=True, momentum=0.5)
        dx = pullback(dy)[0]
        # reference: statistics of the concatenation (equal batch sizes, uniform weights), past detached
        xt = torch.tensor(x, requires_grad=True)
        union = torch.cat([xt] + [torch.tensor(p) for p in memory], dim=0)
        mu = union.mean(dim=AX, keepdim=True)
        var = union.var(dim=AX, unbiased=False, keepdim=True)
        y = (xt - mu) / torch.sqrt(var + 1e-5) * torch.tensor(w).view(1, -1, 1, 1) + torch.tensor(b).view(1, -1, 1, 1)
        (y * torch.tensor(dy)).sum().backward()
        assert _rel(out.output, y.detach().numpy()) < TOL
        assert _rel(dx, xt.grad.numpy()) < TOL
        n = union[:, 0].numel()
        rm = 0.5 * rm + 0.5 * mu.detach().numpy().ravel()
        rv = 0.5 * rv + 0.5 * var.detach().numpy().ravel() * n / (n - 1)
        assert _rel(out.running_mean, rm) < TOL and _rel(out.running_var, rv) < TOL
        assert _rel(out.mean, x.mean(axis=AX)) < TOL and _rel(out.var, x.var(axis=AX)) < TOL
        batches.insert(0, x)
        means.insert(0, out.mean)
        vars_.insert(0, out.var)


def test_memorized_average_variance_and_weights():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 2, 3)) + 1.0
    pm, pv = rng.standard_normal((2, 2)), rng.uniform(0.5, 2, (2, 2))
    eta = (0.5, 0.3, 0.2)
    out = ci.memorized_batch_norm(x, pm, pv, training=True, memory_weights=eta, variance="average")
    mu = eta[0] * x.mean(axis=(0, 2)) + eta[1] * pm[0] + eta[2] * pm[1]
    var = eta[0] * x.var(axis=(0, 2)) + eta[1] * pv[0] + eta[2] * pv[1]
    ref = (x - mu.reshape(1, -1, 1)) / np.sqrt(var.reshape(1, -1, 1) + 1e-5)
    assert _rel(out.output, ref) < TOL
    # empty memory: batch norm exactly
    y0 = ci.memorized_batch_norm(x, np.zeros((0, 2)), np.zeros((0, 2)), training=True).output
    assert _rel(y0, normref.batch_norm(x, None, None, training=True)) < 1e-14


# --------------------------------------------------------------------------------------------------
# cross-iteration BN: a linear layer followed by CBN, trained a few SGD steps


def _cbn_reference(x, w, b, hist, k, rho, eps=1e-5):
    """The paper's Eqns (6)-(9) in NumPy: compensate each stored (μ, ν, ∂μ/∂W, ∂ν/∂W, W) to the
    current W, clamp ν' to ≥ μ'², average over k, normalize."""
    mus, nus = [x.mean(0)], [(x * x).mean(0)]
    for (mu, nu, dmu, dnu, w_old) in hist[: k - 1]:
        d = w - w_old
        m2 = mu + rho * (dmu * d).sum(1)
        n2 = nu + rho * (dnu * d).sum(1)
        mus.append(m2)
        nus.append(np.maximum(n2, m2 * m2))
    mu, nu = np.mean(mus, 0), np.mean(nus, 0)
    return mu, nu - mu * mu


def test_cbn_training_loop_linear_layer():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    n, p, c, k, rho, lr = 4, 5, 3, 3, 1.0, 0.1
    W = rng.standard_normal((c, p)) * 0.5
    gamma, beta = np.ones(c), np.zeros(c)
    hist = []  # (μ, ν, ∂μ/∂W, ∂ν/∂W, W), newest first
    for step in range(6):
        a = rng.standard_normal((n, p)) + 0.3
        target = rng.standard_normal((n, c))
        # reference: the forward from the paper's equations, the gradient by torch autograd through
        # the current batch only (the compensated past terms built from W.detach(), as the authors do)
        Wt = torch.tensor(W, requires_grad=True)
        xt = torch.tensor(a) @ Wt.T
        x = xt.detach().numpy()
        mu_ref, var_ref = _cbn_reference(x, W, None, hist, k, rho)
        kk = 1 + len(hist[: k - 1])  # terms averaged (fewer during the first steps)
        mu_past = mu_ref * kk - x.mean(0)  # Σ of the past compensated terms (constants)
        nu_past = (var_ref + mu_ref ** 2) * kk - (x * x).mean(0)
        mu_t = (xt.mean(0) + torch.tensor(mu_past)) / kk
        nu_t = ((xt * xt).mean(0) + torch.tensor(nu_past)) / kk
        yt = (xt - mu_t) / torch.sqrt(nu_t - mu_t ** 2 + 1e-5)
        loss = ((yt - torch.tensor(target)) ** 2).sum() / 2
        loss.backward()
        # normref
        win = hist[: k - 1]
        args = [None] * 6
        if win:
            args = [np.array([h[i] for h in win]) for i in range(5)]
            args = args[:4] + [W, args[4]]
        out, pullback = normref.vjp(ci.cross_iteration_batch_norm, x, None, None, gamma, beta, *args,
                                    training=True, rho=rho)
        assert _rel(out.output, yt.detach().numpy()) < TOL, step
        dy = out.output - target
        dx = pullback(dy)[0]
        dW = dx.T @ a  # chain rule through the linear layer
        assert _rel(dW, Wt.grad.numpy()) < TOL, step
        # this step's statistic gradients: exact for the linear layer, and equal to torch autograd's
        dmu, dnu = ci.cross_iteration_statistic_grads(a, x)
        ref_dmu = np.stack([torch.autograd.functional.jacobian(
            lambda w_: (torch.tensor(a) @ w_.T).mean(0)[i], torch.tensor(W))[i].numpy() for i in range(c)])
        ref_dnu = np.stack([torch.autograd.functional.jacobian(
            lambda w_: ((torch.tensor(a) @ w_.T) ** 2).mean(0)[i], torch.tensor(W))[i].numpy() for i in range(c)])
        assert _rel(dmu, ref_dmu) < TOL and _rel(dnu, ref_dnu) < TOL
        hist.insert(0, (out.mean, out.sq_mean, dmu, dnu, W.copy()))
        W = W - lr * dW


def test_cbn_statistic_grads_conv_unfold():
    """For a convolution: patches by unfold; the gradients equal torch autograd's (the authors' way)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    a = torch.tensor(rng.standard_normal((2, 2, 4, 4)))
    W = torch.tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    z = torch.nn.functional.conv2d(a, W, padding=1)
    patches = torch.nn.functional.unfold(a, 3, padding=1)  # (N, P, L)
    dmu, dnu = ci.cross_iteration_statistic_grads(patches, z.detach().reshape(2, 3, -1))
    for i in range(3):
        gm, = torch.autograd.grad(z.mean(dim=AX)[i], W, retain_graph=True)
        gn, = torch.autograd.grad((z * z).mean(dim=AX)[i], W, retain_graph=True)
        assert _rel(dmu[i].reshape(2, 3, 3), gm[i]) < TOL and _rel(dnu[i].reshape(2, 3, 3), gn[i]) < TOL
        assert float(gm[[j for j in range(3) if j != i]].abs().max()) == 0.0  # per-channel dependence


def test_cbn_statistic_grads_need_the_biased_preactivation():
    """ν_c = mean z² of the layer's output with its bias: the derivative needs z WITH the bias."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    a = torch.tensor(rng.standard_normal((2, 2, 4, 4)))
    W = torch.tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    b = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    z = torch.nn.functional.conv2d(a, W, b)
    patches = torch.nn.functional.unfold(a, 3)
    _, dnu = ci.cross_iteration_statistic_grads(patches, z.detach().reshape(2, 3, -1))
    _, dnu_nobias = ci.cross_iteration_statistic_grads(patches, (z - _c(b)).detach().reshape(2, 3, -1))
    gn = torch.stack([torch.autograd.grad((z * z).mean(dim=AX)[i], W, retain_graph=True)[0][i] for i in range(3)])
    assert _rel(dnu.reshape(3, 2, 3, 3), gn) < TOL
    assert _rel(dnu_nobias.reshape(3, 2, 3, 3), gn) > 0.1  # off by 2·b·mean p


def test_moment_invariant_reads_the_window_by_name():
    """The 'no window / empty memory' invariant finds past_means by name, positional or keyword."""
    rng = np.random.default_rng(18)
    x = rng.standard_normal((6, 3)) * 1.5 + 0.5
    pm, pn = rng.standard_normal((2, 3)) * 0.3, rng.uniform(1.0, 2.0, (2, 3))
    rm, rv = np.zeros(3), np.ones(3)
    for name, args, kw, applies in [
        ("cross_iteration_batch_norm", (x,), dict(past_means=pm, past_sq_means=pn + pm ** 2, training=True), False),
        ("cross_iteration_batch_norm", (x, rm, rv), dict(training=True), True),  # args[1] is running_mean
        ("memorized_batch_norm", (x,), dict(past_means=pm, past_vars=pn, training=True), False),
        ("memorized_batch_norm", (x, None, None), dict(training=True), True),
    ]:
        m = normref.get(name)
        inv = next(i for i in m.invariants if "batch-norm moments" in i.name)
        r = inv.check(m, np, m(*args, **kw), args, kw)
        if applies:  # batch norm's moments: float64 rounding on 6 samples, far under the registry's 64·ε
            assert r is not None and r < 64 * np.finfo(np.float64).eps, (name, r)
        else:
            assert r is None, (name, r)


def test_cbn_drop_and_no_window():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 2)) + 0.5
    pm = np.array([[2.0, 0.1], [0.3, 0.2]])
    pn = np.array([[1.0, 1.0], [1.0, 1.0]])  # first channel, newest term: ν = 1 < μ² = 4
    y = ci.cross_iteration_batch_norm(x, None, None, None, None, pm, pn, training=True, invalid="drop").output
    # channel 0 averages the current batch and the second term; channel 1 all three
    mu0 = (x[:, 0].mean() + 0.3) / 2
    var0 = ((x[:, 0] ** 2).mean() + 1.0) / 2 - mu0 ** 2
    assert _rel(y[:, 0], (x[:, 0] - mu0) / np.sqrt(var0 + 1e-5)) < TOL
    mu1 = (x[:, 1].mean() + 0.1 + 0.2) / 3
    var1 = ((x[:, 1] ** 2).mean() + 2.0) / 3 - mu1 ** 2
    assert _rel(y[:, 1], (x[:, 1] - mu1) / np.sqrt(var1 + 1e-5)) < TOL
    # no window: batch norm, with the running statistics updated by the current batch
    out = ci.cross_iteration_batch_norm(x, np.zeros(2), np.ones(2), training=True)
    bn = normref.batch_norm(x, np.zeros(2), np.ones(2), training=True)
    assert _rel(out.output, bn.output) < 1e-14
    assert _rel(out.running_mean, bn.running_mean) < TOL and _rel(out.running_var, bn.running_var) < TOL


# --------------------------------------------------------------------------------------------------
# finite differences on the stateful paths (random directions), all libraries, adapters


def _stateful_calls(rng):
    c = 3
    x = rng.standard_normal((3, c, 2, 2)) + 0.3
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    pm = rng.standard_normal((2, c)) * 0.3
    pn = pm ** 2 + rng.uniform(0.5, 1.5, (2, c))
    g = rng.standard_normal((2, c, 4)) * 0.2
    return [
        (ci.moving_average_batch_norm, (x, pn, None, w, b, rng.uniform(0.5, 2, c)), dict(training=True, rmax=1.1)),
        (ci.memorized_batch_norm, (x, pm, pn, w, b), dict(training=True, memory_weights=(0.6, 0.3, 0.1))),
        (ci.cross_iteration_batch_norm, (x, None, None, w, b, pm, pn, g, g * 2, rng.standard_normal((c, 4)),
                                         rng.standard_normal((2, c, 4))), dict(training=True, rho=0.7)),
        (ci.cross_iteration_batch_norm, (x, None, None, w, b, pm, pn), dict(training=True, invalid="drop")),
        (ci.centralized_weight, (rng.standard_normal((3, 2, 2)),), {}),
    ]


def test_finite_differences_stateful_paths():
    rng = np.random.default_rng(9)
    worst = {}
    for m, args, kwargs in _stateful_calls(rng):
        r = fd_check(m, args, kwargs, seed=3, directions=4)
        worst[m.name] = max(worst.get(m.name, 0.0), r.max_error)
        assert r.max_error < FD_TOL, (m.name, r)


def test_every_library(backend):
    rng = np.random.default_rng(10)
    for m, args, kwargs in _stateful_calls(rng):
        out, pullback = normref.vjp(m, *args, **kwargs)
        y = m.primary(out)
        g = rng.standard_normal(np.shape(y))
        grads = pullback(g)
        bargs, bkw = backend.convert(args, kwargs, "float64")
        bout, bpull = normref.vjp(m, *bargs, **bkw)
        assert _rel(backend.to_numpy(m.primary(bout)), y) < TOL, (m.name, backend.name)
        if isinstance(out, tuple):
            for f, bf in zip(out[1:], bout[1:]):
                assert (f is None) == (bf is None)
                if f is not None:
                    assert _rel(backend.to_numpy(bf), f) < TOL
        for ga, gb in zip(grads, bpull(backend.asarray(g, "float64"))):
            assert (ga is None) == (gb is None)
            if ga is not None:
                assert _rel(backend.to_numpy(gb), ga) < TOL, (m.name, backend.name)


def test_torch_and_jax_adapters():
    torch = pytest.importorskip("torch")
    import normref.backends.torch as nt

    rng = np.random.default_rng(11)
    for m, args, kwargs in _stateful_calls(rng):
        out, pullback = normref.vjp(m, *args, **kwargs)
        y = m.primary(out)
        g = rng.standard_normal(np.shape(y))
        grads = pullback(g)
        targs = [None if a is None else torch.tensor(a, requires_grad=(i == 0 or p not in m.nondiff))
                 for i, (a, p) in enumerate(zip(args, m.array_params))]
        tout = getattr(nt, m.name)(*targs, **kwargs)
        ty = tout[0] if isinstance(tout, tuple) else tout
        assert _rel(ty.detach().numpy(), y) < TOL
        ty.backward(torch.tensor(g))
        for a, p, ga in zip(targs, m.array_params, grads):
            if a is not None and a.requires_grad:
                assert _rel(a.grad.numpy(), ga) < TOL, (m.name, p)
    # MABN with past gradient statistics (the paper's backward, not a VJP): the torch Function runs it
    x, pn = rng.standard_normal((3, 2, 2)) + 0.2, rng.uniform(0.5, 1.5, (2, 2))
    pg, w, g = rng.standard_normal((2, 2)), rng.standard_normal(2), rng.standard_normal((3, 2, 2))
    _, pullback = normref.vjp(ci.moving_average_batch_norm, x, pn, pg, w, None, training=True)
    xt = torch.tensor(x, requires_grad=True)
    nt.moving_average_batch_norm(xt, torch.tensor(pn), torch.tensor(pg), torch.tensor(w), None,
                                 training=True)[0].backward(torch.tensor(g))
    assert _rel(xt.grad.numpy(), pullback(g)[0]) < TOL
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import normref.backends.jax as nj

    for m, args, kwargs in _stateful_calls(np.random.default_rng(12)):
        out, pullback = normref.vjp(m, *args, **kwargs)
        y = m.primary(out)
        g = np.random.default_rng(13).standard_normal(np.shape(y))
        dx = pullback(g)[0]
        f = getattr(nj, m.name)
        jargs = [None if a is None else jnp.asarray(a) for a in args]

        def loss(x0):
            o = f(x0, *jargs[1:], **kwargs)
            o = o[0] if isinstance(o, tuple) else o
            return jnp.sum(o * jnp.asarray(g))

        assert _rel(np.asarray(jax.grad(loss)(jargs[0])), dx) < TOL, m.name


# --------------------------------------------------------------------------------------------------
# bad input: refused before any work, naming the function and the argument


def _bad_calls():
    x = np.ones((4, 3)) + np.arange(12.0).reshape(4, 3)
    z3 = np.zeros((2, 3))
    mabn, mbn, cbn = ci.moving_average_batch_norm, ci.memorized_batch_norm, ci.cross_iteration_batch_norm
    return [
        (mabn, (x, np.ones((2, 4))), dict(training=True), ValueError, "past_sq_means"),
        (mabn, (x, np.ones((2, 3)), np.ones((1, 3))), dict(training=True), ValueError, "past_grad_stats"),
        (mabn, (x,), dict(training=False), ValueError, "running_mean_square"),
        (mabn, (x,), dict(training=True, rmax=2.0), ValueError, "running_mean_square"),
        (mabn, (x, None, None, None, None, np.ones(3)), dict(training=True, rmax=0.5), ValueError, "rmax"),
        (mabn, (x, -np.ones((1, 3))), dict(training=True), ValueError, "past_sq_means"),
        (mabn, (x,), dict(training="yes"), TypeError, "training"),
        (mabn, (x,), dict(training=True, momentum=2.0), ValueError, "momentum"),
        (mabn, (np.ones((1, 3)),), dict(training=True), ValueError, "more than 1 value"),
        (mbn, (x, z3, None), dict(training=True), ValueError, "past_vars"),
        (mbn, (x, z3, -np.ones((2, 3))), dict(training=True), ValueError, "past_vars"),
        (mbn, (x, z3, z3), dict(training=True, memory_weights=(0.5, 0.5)), ValueError, "memory_weights"),
        (mbn, (x, z3, z3), dict(training=True, memory_weights=(0.5, 0.3, 0.3)), ValueError, "memory_weights"),
        (mbn, (x, z3, z3), dict(training=True, memory_weights=3), TypeError, "memory_weights"),
        (mbn, (x,), dict(training=True, variance="biased"), ValueError, "variance"),
        (mbn, (x,), dict(training=False), ValueError, "running_mean"),
        (cbn, (x, None, None, None, None, z3, z3, np.ones((2, 3, 2)), None, None, None), dict(training=True),
         ValueError, "go together"),
        (cbn, (x, None, None, None, None, z3, z3, np.ones((2, 3, 2)), np.ones((2, 3, 2)), np.ones((3, 2)),
               np.ones((1, 3, 2))), dict(training=True), ValueError, "past_layer_weights"),
        (cbn, (x, None, None, None, None, z3, z3, np.ones((2, 3, 2)), np.ones((2, 3, 2)), np.ones((4, 2)),
               np.ones((2, 3, 2))), dict(training=True), ValueError, "layer_weight"),
        (cbn, (x,), dict(training=True, rho=-1.0), ValueError, "rho"),
        (cbn, (x,), dict(training=True, invalid="nan"), ValueError, "invalid"),
        (cbn, (x, np.zeros(3), None), dict(training=True), ValueError, "running_var"),
        (cbn, (x, None, None, np.ones(2)), dict(training=True), ValueError, "weight"),
        (ci.centralized_weight, (np.ones(3),), {}, ValueError, "v"),
        (ci.cross_iteration_statistic_grads, (np.ones((2, 3)), np.ones((3, 2))), {}, ValueError, "share N"),
        (ci.moving_average_gradient_statistic, (x, np.ones((4, 2))), {}, ValueError, "cotangent"),
        # refused as moving_average_batch_norm refuses them (the call whose Ψ_t this is)
        (ci.moving_average_gradient_statistic, (x, x, None, None, np.ones(3)), dict(rmax=0.5), ValueError, "rmax"),
        (ci.moving_average_gradient_statistic, (x, x, -np.ones((1, 3))), {}, ValueError, "past_sq_means"),
        (ci.moving_average_gradient_statistic, (x, x, None, None, -np.ones(3)), {}, ValueError, "running_mean_square"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_refused(case):
    fn, args, kwargs, exc, word = _bad_calls()[case]
    name = getattr(fn, "name", getattr(fn, "__name__", ""))
    with pytest.raises(exc) as e:
        fn(*args, **kwargs)
    assert name in str(e.value) and word in str(e.value), str(e.value)


def test_registered_and_pure():
    for name in ("moving_average_batch_norm", "memorized_batch_norm", "cross_iteration_batch_norm",
                 "centralized_weight"):
        assert name in normref.REGISTRY and getattr(normref, name) is normref.REGISTRY[name]
    rng = np.random.default_rng(14)
    for m, args, kwargs in _stateful_calls(rng):
        copies = [None if a is None else a.copy() for a in args]
        m(*args, **kwargs)
        for a, a0 in zip(args, copies):
            assert a is None or np.array_equal(a, a0), m.name  # no input mutated
