"""online_norm (Chiley et al., NeurIPS 2019) and power_norm (Shen et al., ICML 2020): normref.online.

The references below are the papers' algorithms written out again, independently of normref's code:
plain NumPy loops over samples and channels, straight from Algorithm 1/2 of Chiley et al. and
Algorithm 1/Definition 2 of Shen et al. They check the parts finite differences cannot (the
compensation terms are the derivative of no function), on every array library, through the torch
and JAX adapters, in a few-step training loop and through the torch layers.

Tolerances: every comparison is float64 on O(1) inputs with O(N·C·L) roundings per value, a few
hundred at most, so TOL64 = 1e3·ε₆₄ (conftest); a training loop compounds a few steps of SGD on
O(1) values with a learning rate 0.1, so ×10 is allowed there. Finite differences: 1e-6, the
suite's bound (normref.conformance.fd: ~1e-10 expected on these smooth problems).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import normref
from normref.conformance.fd import fd_check

from .conftest import TOL64, rel_err

EPS = 1e-5


# --------------------------------------------------------------------------------------------------
# the papers' algorithms, independently (plain loops)


def ref_online_forward(x, m, v, af, eps=EPS):
    """Chiley et al. Algorithm 1: per sample n, per channel c (statistics over the sample's positions)."""
    n_, c_ = x.shape[:2]
    xs = x.reshape(n_, c_, -1)
    m, v = np.array(m, float), np.array(v, float)
    yhat, scale = np.empty_like(xs), np.empty((n_, c_))
    for n in range(n_):
        for c in range(c_):
            s = math.sqrt(v[c] + eps)
            yhat[n, c] = (xs[n, c] - m[c]) / s
            scale[n, c] = s
            mu = xs[n, c].mean()
            var = ((xs[n, c] - mu) ** 2).mean()
            v[c] = af * v[c] + (1 - af) * var + af * (1 - af) * (mu - m[c]) ** 2
            m[c] = af * m[c] + (1 - af) * mu
    return yhat.reshape(x.shape), scale, m, v


def ref_online_backward(gy, yhat, scale, u, v, ab):
    """Chiley et al. Algorithm 2 (gy: the cotangent of the normalized value, i.e. after γ)."""
    n_, c_ = gy.shape[:2]
    g, y = gy.reshape(n_, c_, -1), yhat.reshape(n_, c_, -1)
    u, v = np.array(u, float), np.array(v, float)
    dx = np.empty_like(g)
    for n in range(n_):
        for c in range(c_):
            a = g[n, c] - (1 - ab) * v[c] * y[n, c]
            v[c] += (a * y[n, c]).mean()
            d = a / scale[n, c] - (1 - ab) * u[c]
            u[c] += d.mean()
            dx[n, c] = d
    return dx.reshape(gy.shape), u, v


def ref_power_step(x, psi2, nu, gamma, beta, g, af, ab, eps=EPS, grad_scale="running"):
    """Shen et al. Algorithm 1 (forward and backward), per channel over (N, *spatial)."""
    n_, c_ = x.shape[:2]
    xs, gs = np.moveaxis(x, 1, 0).reshape(c_, -1), np.moveaxis(g, 1, 0).reshape(c_, -1)
    y, dx = np.empty_like(xs), np.empty_like(xs)
    psi2_new, nu_new = np.empty(c_), np.empty(c_)
    dgamma, dbeta = np.empty(c_), np.empty(c_)
    for c in range(c_):
        s = math.sqrt(psi2[c] + eps)
        xhat = xs[c] / s
        y[c] = gamma[c] * xhat + beta[c]
        psib2 = (xs[c] ** 2).mean()
        psi2_new[c] = af * psi2[c] + (1 - af) * psib2
        gh = gamma[c] * gs[c]
        xt = gh - nu[c] * xhat
        dx[c] = xt / (s if grad_scale == "running" else math.sqrt(psib2 + eps))
        big_gamma, lam = (xhat * xhat).mean(), (xhat * gh).mean()
        nu_new[c] = nu[c] * (1 - (1 - ab) * big_gamma) + (1 - ab) * lam
        dgamma[c], dbeta[c] = (gs[c] * xhat).sum(), gs[c].sum()

    def back(t):
        return np.moveaxis(t.reshape((c_, n_) + x.shape[2:]), 0, 1)

    return back(y), psi2_new, back(dx), nu_new, dgamma, dbeta


def _data(rng, shape):
    c = shape[1]
    return dict(x=rng.standard_normal(shape) * 1.4 + 0.6, rm=rng.standard_normal(c) * 0.3,
                rv=rng.uniform(0.5, 2.0, c), u=rng.standard_normal(c) * 0.2, v=rng.standard_normal(c) * 0.2,
                w=rng.standard_normal(c), b=rng.standard_normal(c), g=rng.standard_normal(shape),
                psi2=rng.uniform(0.5, 2.0, c), nu=rng.standard_normal(c) * 0.3)


SHAPES = [(5, 3), (4, 3, 4), (3, 2, 2, 3)]


# --------------------------------------------------------------------------------------------------
# against the papers, on every array library


@pytest.mark.parametrize("shape", SHAPES)
def test_online_norm_matches_algorithms_1_and_2_on_every_library(backend, rng, shape):
    d = _data(rng, shape)
    af, ab = 0.9, 0.7
    yhat, scale, m_ref, v_ref = ref_online_forward(d["x"], d["rm"], d["rv"], af)
    dx_ref, u_ref, vv_ref = ref_online_backward(d["g"] * d["w"].reshape((1, -1) + (1,) * (len(shape) - 2)),
                                                yhat, scale, d["u"], d["v"], ab)
    axes = (0,) + tuple(range(2, len(shape)))
    a = {k: backend.asarray(val, "float64") for k, val in d.items()}
    out, res = normref.online_norm.forward(a["x"], a["rm"], a["rv"], a["u"], a["v"], a["w"], a["b"],
                                           training=True, alpha_fwd=af, alpha_bkw=ab)
    cs = (1, -1) + (1,) * (len(shape) - 2)
    assert rel_err(backend.to_numpy(out.output), yhat * d["w"].reshape(cs) + d["b"].reshape(cs)) < TOL64
    assert rel_err(backend.to_numpy(out.running_mean), m_ref) < TOL64
    assert rel_err(backend.to_numpy(out.running_var), v_ref) < TOL64
    gr = normref.online_norm_backward(res, a["g"])
    assert rel_err(backend.to_numpy(gr.grad_input), dx_ref) < TOL64
    assert rel_err(backend.to_numpy(gr.error_mean), u_ref) < TOL64
    assert rel_err(backend.to_numpy(gr.error_proj), vv_ref) < TOL64
    assert rel_err(backend.to_numpy(gr.grad_weight), (d["g"] * yhat).sum(axis=axes)) < TOL64
    assert rel_err(backend.to_numpy(gr.grad_bias), d["g"].sum(axis=axes)) < TOL64
    # the registered backward is the same computation with the new state dropped
    grads = normref.online_norm.backward(res, a["g"])
    assert grads[1:5] == (None,) * 4
    assert rel_err(backend.to_numpy(grads[0]), dx_ref) < TOL64
    # the inputs are not mutated (state in, state out)
    assert np.array_equal(backend.to_numpy(a["u"]), d["u"]) and np.array_equal(backend.to_numpy(a["rm"]), d["rm"])


@pytest.mark.parametrize("grad_scale", ["running", "batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_power_norm_matches_algorithm_1_on_every_library(backend, rng, shape, grad_scale):
    d = _data(rng, shape)
    af, ab = 0.8, 0.6
    y_ref, psi_ref, dx_ref, nu_ref, dw_ref, db_ref = ref_power_step(
        d["x"], d["psi2"], d["nu"], d["w"], d["b"], d["g"], af, ab, grad_scale=grad_scale)
    a = {k: backend.asarray(val, "float64") for k, val in d.items()}
    out, res = normref.power_norm.forward(a["x"], a["psi2"], a["nu"], a["w"], a["b"], training=True,
                                          alpha_fwd=af, alpha_bkw=ab, grad_scale=grad_scale)
    assert rel_err(backend.to_numpy(out.output), y_ref) < TOL64
    assert rel_err(backend.to_numpy(out.running_mean_square), psi_ref) < TOL64
    gr = normref.power_norm_backward(res, a["g"])
    for got, want in ((gr.grad_input, dx_ref), (gr.grad_correlation, nu_ref), (gr.grad_weight, dw_ref),
                      (gr.grad_bias, db_ref)):
        assert rel_err(backend.to_numpy(got), want) < TOL64


def test_power_norm_nu_is_the_authors_ema_gz_scaled(rng):
    """Ambiguity resolved: the authors' code keeps ema_gz and subtracts (1 − α_b)·ema_gz·z, updating
    ema_gz += mean((g − (1 − α_b)·ema_gz·z)·z); the paper's ν = (1 − α_b)·ema_gz follows Definition 2.
    Three steps of the code's recursion (transcribed from sIncerass/powernorm) against normref's ν."""
    c, ab = 3, 0.75
    ema = np.zeros(c)
    nu = None
    psi2 = np.ones(c)
    for _ in range(3):
        x, g = rng.standard_normal((6, c, 4)), rng.standard_normal((6, c, 4))
        out, res = normref.power_norm.forward(x, psi2, nu, None, None, training=True, alpha_bkw=ab)
        gr = normref.power_norm_backward(res, g)
        z = x / np.sqrt(psi2 + EPS).reshape(1, c, 1)
        approx = g - (1 - ab) * ema.reshape(1, c, 1) * z
        ema = ema + (approx * z).mean(axis=(0, 2))
        assert rel_err(gr.grad_input, approx / np.sqrt(psi2 + EPS).reshape(1, c, 1)) < TOL64
        nu, psi2 = gr.grad_correlation, out.running_mean_square
        assert rel_err(nu, (1 - ab) * ema) < TOL64


def test_power_norm_pn_v_is_exact_batch_scaling(rng):
    """PN-V: y = γ·x/√(mean_B x² + ε) + β with the exact backward: finite differences of the plain
    function (no frozen statistics), and ν comes back unchanged."""
    x, w, b = rng.standard_normal((4, 3, 5)) + 0.3, rng.standard_normal(3), rng.standard_normal(3)
    nu = rng.standard_normal(3)
    r = fd_check(normref.power_norm, (x, np.ones(3), nu, w, b), dict(training=True, variant="pn-v"))
    assert r.max_error < 1e-6, r.errors
    out, res = normref.power_norm.forward(x, np.ones(3), nu, w, b, training=True, variant="pn-v")
    s = np.sqrt((x ** 2).mean(axis=(0, 2), keepdims=True) + EPS)
    assert rel_err(out.output, w.reshape(1, 3, 1) * x / s + b.reshape(1, 3, 1)) < TOL64
    assert np.array_equal(normref.power_norm_backward(res, np.ones_like(x)).grad_correlation, nu)


# --------------------------------------------------------------------------------------------------
# finite differences on the stateful paths (float64, random directions)


FD_LARGEST: dict = {}


@pytest.mark.parametrize("name", ["online_norm", "power_norm"])
def test_finite_differences_where_the_backward_is_a_derivative(rng, name):
    """Every registry example (training with the stream frozen, inference, PN-V, the authors'
    divisor), and non-default α's and states, along random directions: ≤ 1e-6."""
    m = normref.get(name)
    cases = [(e.args, e.kwargs) for e in m.examples(rng)]
    d = _data(rng, (3, 2, 5))
    if name == "online_norm":
        cases.append(((d["x"], d["rm"], d["rv"], d["u"], d["v"], d["w"], d["b"]),
                      dict(training=True, alpha_fwd=0.3, alpha_bkw=1.0, eps=1e-3)))
    else:
        cases.append(((d["x"], d["psi2"], None, d["w"], d["b"]), dict(training=True, alpha_fwd=0.2, eps=1e-3)))
    worst = 0.0
    for seed, (args, kwargs) in enumerate(cases):
        r = fd_check(m, args, kwargs, seed=seed, directions=3)
        assert r.max_error < 1e-6, (kwargs, r.errors)
        worst = max(worst, r.max_error)
    FD_LARGEST[name] = worst
    print(f"{name}: largest finite-difference error {worst:.2e} over {len(cases)} calls")


def test_compensation_is_no_derivative():
    """The paper's compensation is affine in the cotangent: with a nonzero state the backward of a
    zero cotangent is not zero (so no function has it as its derivative; the docstring says so)."""
    x = np.linspace(-1, 2, 12).reshape(3, 2, 2)
    out, res = normref.online_norm.forward(x, np.zeros(2), np.ones(2), np.full(2, 0.5), np.full(2, -0.5),
                                           training=True, alpha_bkw=0.5)
    assert np.max(np.abs(normref.online_norm_backward(res, np.zeros_like(x)).grad_input)) > 0.1
    out, res = normref.power_norm.forward(x, np.ones(2), np.full(2, 0.5), training=True)
    assert np.max(np.abs(normref.power_norm_backward(res, np.zeros_like(x)).grad_input)) > 0.1


# --------------------------------------------------------------------------------------------------
# invariants


def test_online_norm_batch_is_a_stream_of_single_samples(rng):
    """Chiley et al. process one sample at a time: a batch of N in one call gives the outputs,
    gradients and both states of N calls with one sample each, threading the state by hand."""
    d = _data(rng, (4, 3, 5))
    kw = dict(training=True, alpha_fwd=0.7, alpha_bkw=0.6)
    out, res = normref.online_norm.forward(d["x"], d["rm"], d["rv"], d["u"], d["v"], d["w"], d["b"], **kw)
    whole = normref.online_norm_backward(res, d["g"])
    rm, rv, u, v = d["rm"], d["rv"], d["u"], d["v"]
    ys, dxs, dw = [], [], 0.0
    for n in range(4):
        o, r = normref.online_norm.forward(d["x"][n:n + 1], rm, rv, u, v, d["w"], d["b"], **kw)
        gr = normref.online_norm_backward(r, d["g"][n:n + 1])
        rm, rv, u, v = o.running_mean, o.running_var, gr.error_mean, gr.error_proj
        ys.append(o.output)
        dxs.append(gr.grad_input)
        dw = dw + gr.grad_weight
    assert rel_err(np.concatenate(ys), out.output) < TOL64
    assert rel_err(np.concatenate(dxs), whole.grad_input) < TOL64
    for a, b in ((rm, out.running_mean), (rv, out.running_var), (u, whole.error_mean), (v, whole.error_proj),
                 (dw, whole.grad_weight)):
        assert rel_err(a, b) < TOL64


def test_power_norm_training_output_is_the_inference_output(rng):
    """PN normalizes by ψ_{t−1}, a statistic of past batches: its training output equals the
    inference output with the same ψ² (only the returned ψ² differs)."""
    d = _data(rng, (5, 3, 2))
    y_train = normref.power_norm(d["x"], d["psi2"], None, d["w"], d["b"], training=True).output
    y_eval = normref.power_norm(d["x"], d["psi2"], None, d["w"], d["b"], training=False)
    assert np.array_equal(y_train, y_eval)


def test_online_stream_statistics_are_the_weighted_pooled_moments(rng):
    """Algorithm 1's σ̂² recursion is the exact α-weighted pooled variance: after N samples from
    μ̂_0, σ̂²_0 the state is the mean and variance of the mixture with weights α^N (the start) and
    (1 − α)α^(N−1−n) (sample n), each sample its spatial positions equally weighted."""
    x = rng.standard_normal((6, 2, 4)) * 2 + 1
    af = 0.6
    m0, v0 = np.array([0.5, -0.2]), np.array([1.5, 0.7])
    out = normref.online_norm(x, m0, v0, training=True, alpha_fwd=af)
    wts = np.array([(1 - af) * af ** (5 - n) for n in range(6)])
    w0 = af ** 6
    for c in range(2):
        mean = w0 * m0[c] + (wts[:, None] * x[:, c, :]).mean(axis=1).sum()
        second = w0 * (v0[c] + m0[c] ** 2) + (wts[:, None] * x[:, c, :] ** 2).mean(axis=1).sum()
        assert abs(out.running_mean[c] - mean) < 10 * TOL64
        assert abs(out.running_var[c] - (second - mean ** 2)) < 10 * TOL64


# --------------------------------------------------------------------------------------------------
# the torch and JAX adapters


def test_torch_adapter_gives_the_papers_gradients():
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    rng = np.random.default_rng(3)
    d = _data(rng, (4, 3, 3))
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}
    x, w = t["x"].clone().requires_grad_(True), t["w"].clone().requires_grad_(True)
    out = nt.online_norm(x, t["rm"], t["rv"], t["u"], t["v"], w, t["b"], training=True, alpha_fwd=0.9,
                         alpha_bkw=0.7)
    out.output.backward(t["g"])
    yhat, scale, _, _ = ref_online_forward(d["x"], d["rm"], d["rv"], 0.9)
    dx_ref, _, _ = ref_online_backward(d["g"] * d["w"].reshape(1, 3, 1), yhat, scale, d["u"], d["v"], 0.7)
    assert rel_err(x.grad.numpy(), dx_ref) < TOL64
    assert rel_err(w.grad.numpy(), (d["g"] * yhat).sum(axis=(0, 2))) < TOL64
    x = t["x"].clone().requires_grad_(True)
    out = nt.power_norm(x, t["psi2"], t["nu"], t["w"], t["b"], training=True, alpha_fwd=0.8, alpha_bkw=0.6)
    out.output.backward(t["g"])
    ref = ref_power_step(d["x"], d["psi2"], d["nu"], d["w"], d["b"], d["g"], 0.8, 0.6)
    assert rel_err(x.grad.numpy(), ref[2]) < TOL64


def test_jax_adapter_gives_the_papers_gradients():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from normref.backends import jax as nj

    rng = np.random.default_rng(4)
    d = _data(rng, (4, 3, 3))
    j = {k: jnp.asarray(v) for k, v in d.items()}

    def loss_on(x, w):
        out = nj.online_norm(x, j["rm"], j["rv"], j["u"], j["v"], w, j["b"], training=True, alpha_fwd=0.9,
                             alpha_bkw=0.7)
        return jnp.sum(out.output * j["g"])

    dx, dw = jax.jit(jax.grad(loss_on, argnums=(0, 1)))(j["x"], j["w"])
    yhat, scale, _, _ = ref_online_forward(d["x"], d["rm"], d["rv"], 0.9)
    dx_ref, _, _ = ref_online_backward(d["g"] * d["w"].reshape(1, 3, 1), yhat, scale, d["u"], d["v"], 0.7)
    assert rel_err(np.asarray(dx), dx_ref) < TOL64
    assert rel_err(np.asarray(dw), (d["g"] * yhat).sum(axis=(0, 2))) < TOL64

    def pn_loss(x):
        out = nj.power_norm(x, j["psi2"], j["nu"], j["w"], j["b"], training=True, alpha_fwd=0.8, alpha_bkw=0.6,
                            grad_scale="batch")
        return jnp.sum(out.output * j["g"])

    ref = ref_power_step(d["x"], d["psi2"], d["nu"], d["w"], d["b"], d["g"], 0.8, 0.6, grad_scale="batch")
    assert rel_err(np.asarray(jax.jit(jax.grad(pn_loss))(j["x"])), ref[2]) < TOL64


# --------------------------------------------------------------------------------------------------
# training loops: a few SGD steps against the papers' algorithms re-implemented in NumPy


def _batches(seed, steps, n, din):
    r = np.random.default_rng(seed)
    return [(r.standard_normal((n, din)) * 1.5 + 0.5, r.standard_normal((n, 3))) for _ in range(steps)]


def _ref_online_loop(w0, batches, af, ab, lr):
    """Linear (3×din, no bias) → online norm (γ, β) → ½‖y − target‖², SGD; state threaded by hand."""
    w, gamma, beta = w0.copy(), np.ones(3), np.zeros(3)
    m, v, u, e = np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3)
    for xb, tb in batches:
        z = xb @ w.T
        yhat, scale, m, v = ref_online_forward(z, m, v, af)
        y = gamma * yhat + beta
        g = y - tb
        dz, u, e = ref_online_backward(g * gamma, yhat, scale, u, e, ab)
        dgamma, dbeta = (g * yhat).sum(0), g.sum(0)
        w -= lr * dz.T @ xb
        gamma -= lr * dgamma
        beta -= lr * dbeta
    return w, gamma, beta, (m, v, u, e)


def test_online_norm_training_loop_follows_the_paper(rng):
    w0 = rng.standard_normal((3, 4)) * 0.5
    batches = _batches(11, 5, 6, 4)
    af, ab, lr = 0.8, 0.7, 0.05
    w_ref, g_ref, b_ref, st_ref = _ref_online_loop(w0, batches, af, ab, lr)
    w, gamma, beta = w0.copy(), np.ones(3), np.zeros(3)
    m, v, u, e = np.zeros(3), np.ones(3), None, None
    for xb, tb in batches:
        z = xb @ w.T
        out, res = normref.online_norm.forward(z, m, v, u, e, gamma, beta, training=True, alpha_fwd=af, alpha_bkw=ab)
        m, v = out.running_mean, out.running_var
        gr = normref.online_norm_backward(res, out.output - tb)
        u, e = gr.error_mean, gr.error_proj
        w = w - lr * gr.grad_input.T @ xb
        gamma, beta = gamma - lr * gr.grad_weight, beta - lr * gr.grad_bias
    for a, b in zip((w, gamma, beta, m, v, u, e), (w_ref, g_ref, b_ref) + st_ref):
        assert rel_err(a, b) < 10 * TOL64


def test_power_norm_training_loop_follows_the_paper(rng):
    """Linear → power norm (PN, paper's divisor) → ½‖y − target‖², SGD, 5 steps."""
    w0 = rng.standard_normal((3, 4)) * 0.5
    batches = _batches(12, 5, 8, 4)
    af, ab, lr = 0.9, 0.9, 0.05
    w_r, gam_r, bet_r, psi_r, nu_r = w0.copy(), np.ones(3), np.zeros(3), np.ones(3), np.zeros(3)
    w, gam, bet, psi, nu = w0.copy(), np.ones(3), np.zeros(3), np.ones(3), None
    for xb, tb in batches:
        z = xb @ w_r.T
        y, psi_new, _, _, _, _ = ref_power_step(z, psi_r, nu_r, gam_r, bet_r, np.zeros_like(z), af, ab)
        g = y - tb
        _, _, dz, nu_new, dgam, dbet = ref_power_step(z, psi_r, nu_r, gam_r, bet_r, g, af, ab)
        w_r, gam_r, bet_r = w_r - lr * dz.T @ xb, gam_r - lr * dgam, bet_r - lr * dbet
        psi_r, nu_r = psi_new, nu_new

        z = xb @ w.T
        out, res = normref.power_norm.forward(z, psi, nu, gam, bet, training=True, alpha_fwd=af, alpha_bkw=ab)
        gr = normref.power_norm_backward(res, out.output - tb)
        psi, nu = out.running_mean_square, gr.grad_correlation
        w, gam, bet = w - lr * gr.grad_input.T @ xb, gam - lr * gr.grad_weight, bet - lr * gr.grad_bias
    for a, b in ((w, w_r), (gam, gam_r), (bet, bet_r), (psi, psi_r), (nu, nu_r)):
        assert rel_err(a, b) < 10 * TOL64


def test_torch_layers_train_like_the_paper():
    """nt.OnlineNorm / nt.PowerNorm in a torch model with torch's SGD: weights and every buffer
    (forward statistics and backward state) follow the NumPy re-implementation step by step."""
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((3, 4)) * 0.5
    batches = _batches(13, 4, 6, 4)
    af, ab, lr = 0.8, 0.7, 0.05
    w_ref, g_ref, b_ref, (m, v, u, e) = _ref_online_loop(w0, batches, af, ab, lr)
    lin = torch.nn.Linear(4, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w0))
    norm = nt.OnlineNorm(3, alpha_fwd=af, alpha_bkw=ab, dtype=torch.float64)
    model = torch.nn.Sequential(lin, norm)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for xb, tb in batches:
        opt.zero_grad()
        loss = 0.5 * ((model(torch.tensor(xb)) - torch.tensor(tb)) ** 2).sum()
        loss.backward()
        opt.step()
    assert rel_err(lin.weight.detach().numpy(), w_ref) < 10 * TOL64
    assert rel_err(norm.weight.detach().numpy(), g_ref) < 10 * TOL64
    assert rel_err(norm.bias.detach().numpy(), b_ref) < 10 * TOL64
    for name, want in (("running_mean", m), ("running_var", v), ("error_mean", u), ("error_proj", e)):
        assert rel_err(getattr(norm, name).numpy(), want) < 10 * TOL64, name
    # eval mode: the buffers are the population statistics, the backward exact (no state change)
    norm.eval()
    x = torch.tensor(batches[0][0]) @ lin.weight.detach().T
    y = norm(x)
    want = (x.numpy() - m) / np.sqrt(v + EPS) * norm.weight.detach().numpy() + norm.bias.detach().numpy()
    assert rel_err(y.detach().numpy(), want) < TOL64

    pn = nt.PowerNorm(3, dtype=torch.float64)
    x = torch.tensor(rng.standard_normal((6, 3, 2)), requires_grad=True)
    g = rng.standard_normal((6, 3, 2))
    pn(x).backward(torch.tensor(g))
    ref = ref_power_step(x.detach().numpy(), np.ones(3), np.zeros(3), np.ones(3), np.zeros(3), g, 0.9, 0.9)
    assert rel_err(x.grad.numpy(), ref[2]) < TOL64
    assert rel_err(pn.running_mean_square.numpy(), ref[1]) < TOL64
    assert rel_err(pn.grad_correlation.numpy(), ref[3]) < TOL64


def test_readme_training_run_snippet_runs():
    """The README's "Training with streaming statistics" block runs as written and its loss falls."""
    pytest.importorskip("torch")
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    sec = text[text.index("## Training with streaming statistics"):]
    code = re.search(r"```python\n(.*?)```", sec, re.S).group(1)
    assert "OnlineNorm" in code
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["losses"][-1] < ns["losses"][0]


# --------------------------------------------------------------------------------------------------
# bad input and edge cases


X = np.ones((4, 3, 2))
C1, C0 = np.ones(3), np.zeros(3)
BAD = [
    (lambda: normref.online_norm(X, C0, C1, training=True, alpha_fwd=1.0), ValueError, r"online_norm: alpha_fwd must lie in \[0, 1\)"),
    (lambda: normref.online_norm(X, C0, C1, training=True, alpha_bkw=1.5), ValueError, r"online_norm: alpha_bkw must lie in \[0, 1\]"),
    (lambda: normref.online_norm(X, C0, C1, training="True"), TypeError, r"online_norm: training must be a bool"),
    (lambda: normref.online_norm(X, C0, -C1, training=True), ValueError, r"online_norm: running_var must be >= 0"),
    (lambda: normref.online_norm(X, C0, C1, np.zeros(2), C0), ValueError, r"online_norm: error_mean must have shape \(3,\)"),
    (lambda: normref.online_norm(X, C0, C1, C0, None), ValueError, r"online_norm: error_mean and error_proj go together"),
    (lambda: normref.online_norm(X, None, C1), TypeError, r"online_norm: running_mean must be an array"),
    (lambda: normref.online_norm(X, C0, C1, eps=0.0), ValueError, r"online_norm: eps must be a finite number > 0"),
    (lambda: normref.online_norm(np.ones(3), C0, C1), ValueError, r"online_norm: input"),
    (lambda: normref.power_norm(X, C1, variant="pn-x"), ValueError, r"power_norm: variant must be one of"),
    (lambda: normref.power_norm(X, C1, grad_scale="mean"), ValueError, r"power_norm: grad_scale must be one of"),
    (lambda: normref.power_norm(X, -C1), ValueError, r"power_norm: running_mean_square must be >= 0"),
    (lambda: normref.power_norm(X, C1, np.ones(4)), ValueError, r"power_norm: grad_correlation must have shape \(3,\)"),
    (lambda: normref.power_norm(X, C1, alpha_bkw=-0.1), ValueError, r"power_norm: alpha_bkw must lie in"),
    (lambda: normref.power_norm(X, C1, training=1), TypeError, r"power_norm: training must be a bool"),
    (lambda: normref.online_norm_backward(normref.power_norm.forward(X, C1)[1], X), TypeError,
     r"online_norm_backward: residuals must come from normref.online_norm.forward"),
    (lambda: normref.power_norm_backward((X,), X), TypeError, r"power_norm_backward: residuals must be the Residuals"),
    (lambda: normref.power_norm_backward(normref.power_norm.forward(X, C1)[1], np.ones((4, 3))), ValueError,
     r"power_norm.backward: cotangent must have the primary output's shape"),
]


@pytest.mark.parametrize("call,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_refused_by_name(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_torch_layer_options_are_checked_at_construction():
    pytest.importorskip("torch")
    from normref.backends import torch as nt

    with pytest.raises(ValueError, match=r"OnlineNorm: alpha_fwd must lie in \[0, 1\)"):
        nt.OnlineNorm(3, alpha_fwd=1.0)
    with pytest.raises(ValueError, match=r"PowerNorm: variant must be one of"):
        nt.PowerNorm(3, variant="bn")
    with pytest.raises(ValueError, match=r"OnlineNorm: num_features must be a positive int"):
        nt.OnlineNorm(0)
    # the generic layer cannot update backward state: it refuses rather than never updating it
    with pytest.raises(TypeError, match=r"no initial value is known for the state argument 'error_mean'"):
        nt.StatefulNorm("online_norm", 3)
    # one backward per training-mode forward (a second would run the control process twice)
    import torch

    layer = nt.OnlineNorm(3, dtype=torch.float64)
    y = layer(torch.ones(2, 3, dtype=torch.float64, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"OnlineNorm: the training-mode backward ran already"):
        y.sum().backward()


def test_empty_batch_keeps_every_state():
    x = np.ones((0, 3, 2))
    u, v = np.full(3, 0.25), np.full(3, -0.5)
    out, res = normref.online_norm.forward(x, C0, C1, u, v, C1, C0, training=True)
    assert out.output.shape == x.shape and np.array_equal(out.running_var, C1)
    gr = normref.online_norm_backward(res, np.ones_like(x))
    assert gr.grad_input.shape == x.shape and np.array_equal(gr.grad_weight, C0)
    assert np.array_equal(gr.error_mean, u) and np.array_equal(gr.error_proj, v)
    out, res = normref.power_norm.forward(x, C1, v, training=True)
    gr = normref.power_norm_backward(res, np.ones_like(x))
    assert np.array_equal(out.running_mean_square, C1) and np.array_equal(gr.grad_correlation, v)


def test_float32_state_and_output_keep_their_dtypes(rng):
    x = rng.standard_normal((4, 3, 2)).astype(np.float32)
    out, res = normref.online_norm.forward(x, C0.astype(np.float32), C1.astype(np.float32), training=True)
    gr = normref.online_norm_backward(res, np.ones_like(x))
    assert out.output.dtype == np.float32 and out.running_var.dtype == np.float32
    assert gr.grad_input.dtype == np.float32 and gr.error_mean.dtype == np.float32
