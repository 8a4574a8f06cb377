"""Local response normalization and switchable normalization: external oracles and reductions.

(Finite differences, every backend and every dtype run for these in test_standardization.py, whose
registry-driven tests cover normref.local and normref.combination too.)
"""

from __future__ import annotations

import numpy as np
import pytest

import normref
from tests.conftest import rel_err as _rel, TOL64

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("shape,size,kw", [
    ((2, 7, 3), 3, {}),
    ((2, 6, 3, 2), 4, dict(alpha=0.5, beta=0.75, k=1.0)),
    ((1, 5, 2, 2, 2), 5, dict(alpha=1.0, beta=0.5, k=2.0)),
    ((2, 3, 4), 9, dict(alpha=2.0)),
    ((2, 8, 4), 1, dict(alpha=0.3)),
])
def test_local_response_norm_matches_torch(shape, size, kw, rng):
    x = rng.standard_normal(shape)
    t = torch.tensor(x, requires_grad=True)
    y = F.local_response_norm(t, size, **kw)
    g = rng.standard_normal(shape)
    y.backward(torch.tensor(g))
    out, pb = normref.vjp(normref.local_response_norm, x, size, **kw)
    assert _rel(out, y.detach().numpy()) <= TOL64
    assert _rel(pb(g)[0], t.grad.numpy()) <= TOL64


def _torch_switchable(x, lm, lv, w, b, eps=1e-5):
    """An independent torch transcription of Luo et al.'s Eqns 1–4 (biased variances), for autograd."""
    n, c = x.shape[:2]
    xv = x.reshape(n, c, -1)
    mu_in, var_in = xv.mean(-1, keepdim=True), xv.var(-1, keepdim=True, unbiased=False)
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = (var_in + mu_in**2).mean(1, keepdim=True) - mu_ln**2
    mu_bn = mu_in.mean(0, keepdim=True)
    var_bn = (var_in + mu_in**2).mean(0, keepdim=True) - mu_bn**2
    wm, wv = torch.softmax(lm, 0), torch.softmax(lv, 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = ((xv - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    return y * w.reshape(1, c, *([1] * (x.ndim - 2))) + b.reshape(1, c, *([1] * (x.ndim - 2)))


def test_switchable_norm_against_torch_autograd(rng):
    x = rng.standard_normal((4, 3, 3, 2)) * 2 + 1
    lm, lv, w, b = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3)
    ts = [torch.tensor(a, requires_grad=True) for a in (x, lm, lv, w, b)]
    y = _torch_switchable(*ts)
    g = rng.standard_normal(x.shape)
    y.backward(torch.tensor(g))
    out, pb = normref.vjp(normref.switchable_norm, x, lm, lv, w, b, training=True)
    assert _rel(out, y.detach().numpy()) <= TOL64
    dx, dlm, dlv, dw, db, drm, drv = pb(g)
    for ours, t in zip((dx, dlm, dlv, dw, db), ts):
        assert _rel(ours, t.grad.numpy()) <= TOL64
    assert drm is None and drv is None


@pytest.mark.parametrize("k", [0, 1, 2])
def test_switchable_norm_reduces_to_in_ln_bn(k, rng):
    """Logits that put all weight on one partition give that normalization (softmax(50·e_k) = e_k to
    within e^-50 ≈ 2e-22, below float64 resolution)."""
    x = rng.standard_normal((4, 3, 3, 2))
    lam = np.roll(np.array([50.0, 0.0, 0.0]), k)
    ref = [normref.instance_norm(x), normref.layer_norm(x, x.shape[1:]), normref.batch_norm(x, None, None, training=True)][k]
    assert _rel(normref.switchable_norm(x, lam, lam, training=True), ref) <= TOL64


def test_switchable_norm_running_statistics_follow_batch_norm(rng):
    x = rng.standard_normal((4, 3, 5))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    lam = rng.standard_normal(3)
    _, srm, srv = normref.switchable_norm(x, lam, lam, None, None, rm, rv, True, 0.3)
    _, brm, brv = normref.batch_norm(x, rm, rv, None, None, True, 0.3)
    assert _rel(srm, brm) <= TOL64 and _rel(srv, brv) <= TOL64


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda x: normref.local_response_norm(x, 0), ValueError, r"size must be an integer >= 1; got 0"),
    (lambda x: normref.local_response_norm(x[:, :, 0, 0], 2), ValueError, r"input must have at least 3 dimensions"),
    (lambda x: normref.local_response_norm(x, 3, k=0.0), ValueError, r"k must be a finite number > 0"),
    (lambda x: normref.switchable_norm(x, np.zeros(2), np.zeros(3), training=True), ValueError, r"mean_weight must have shape \(3,\).*got shape \(2,\)"),
    (lambda x: normref.switchable_norm(x, np.zeros(3), np.zeros(3)), ValueError, r"running_mean and running_var are required"),
    (lambda x: normref.switchable_norm(x[:1, :, :1, :1], np.zeros(3), np.zeros(3), training=True), ValueError, r"more than 1 value"),
])
def test_bad_input(call, exc, pattern, rng):
    with pytest.raises(exc, match=pattern):
        call(rng.standard_normal((2, 4, 3, 2)))


def test_gated_mixtures_reduce_to_their_parts(rng):
    """ρ = 1 and ρ = 0 select one standardization exactly (the mixture is linear in ρ)."""
    x = rng.standard_normal((4, 3, 3, 2))
    one, zero = np.ones(3), np.zeros(3)
    bn = normref.batch_norm(x, None, None, training=True)
    inn = normref.instance_norm(x)
    ln = normref.layer_norm(x, x.shape[1:])
    assert _rel(normref.batch_instance_norm(x, one, training=True), bn) <= TOL64
    assert _rel(normref.batch_instance_norm(x, zero, training=True), inn) <= TOL64
    assert _rel(normref.adaptive_layer_instance_norm(x, one), inn) <= TOL64
    assert _rel(normref.adaptive_layer_instance_norm(x, zero), ln) <= TOL64
    # and halfway is the average, with the running statistics of batch norm
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    y, brm, brv = normref.batch_instance_norm(x, 0.5 * one, None, None, rm, rv, True, 0.2)
    _, rrm, rrv = normref.batch_norm(x, rm, rv, None, None, True, 0.2)
    assert _rel(y, 0.5 * (bn + inn)) <= TOL64 and _rel(brm, rrm) <= TOL64 and _rel(brv, rrv) <= TOL64


def test_adalin_generated_affine_against_torch_autograd(rng):
    x = rng.standard_normal((3, 4, 3, 2))
    rho, gam, bet = rng.uniform(0, 1, 4), rng.standard_normal((3, 4, 1, 1)), rng.standard_normal((3, 4, 1, 1))
    ts = [torch.tensor(a, requires_grad=True) for a in (x, rho, gam, bet)]
    t_in = F.instance_norm(ts[0])
    t_ln = F.layer_norm(ts[0], x.shape[1:])
    r = ts[1].reshape(1, 4, 1, 1)
    y = ts[2] * (r * t_in + (1 - r) * t_ln) + ts[3]
    g = rng.standard_normal(x.shape)
    y.backward(torch.tensor(g))
    out, pb = normref.vjp(normref.adaptive_layer_instance_norm, x, rho, gam, bet)
    assert _rel(out, y.detach().numpy()) <= TOL64
    for ours, t in zip(pb(g), ts):
        assert _rel(ours, t.grad.numpy()) <= TOL64
