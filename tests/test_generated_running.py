"""Running statistics on the batch-type partitions with generated γ, β (issue 14 §2):
``normref.batch_normalize`` (batch / batch_group partition; standardizing, centering, scaling-only BN
with a running mean square) and ``normref.batch_group_norm`` with running statistics.

References are written here from the papers' equations in plain NumPy (Ioffe & Szegedy's
Algorithm 1 with the running update of survey Eqn 18; Zhou et al.'s batch-group statistics),
independently of normref's helpers. Tolerances: float64 forward/running values are a few dozen
roundings of O(1) sums, so TOL64 = 1e3·ε₆₄ (conftest); float64 central differences with h = 1e-6 on
O(1) functions have truncation O(h²·f''') ≈ 1e-12 and rounding O(ε/h) ≈ 1e-10, so 1e-6 relative
(the issue's bound) has a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest

import normref
from normref.framework import RunningResult

from .conftest import TOL64, On, rel_err

EPS = 1e-5


# -- independent NumPy references (the papers' equations) ----------------------------------------
def np_stats(x, partition, G=1, Gb=1):
    """Per-channel (C,) batch mean, *biased* variance, mean square, and the per-element μ, σ² of the
    partition, straight from the definitions (loops over groups, no normref code)."""
    n, c = x.shape[:2]
    mu_e, var_e, ms_e = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    mu_c, var_c, ms_c = np.zeros(c), np.zeros(c), np.zeros(c)
    if partition == "batch":
        for j in range(c):
            v = x[:, j].ravel()
            mu_e[:, j], var_e[:, j], ms_e[:, j] = v.mean(), v.var(), (v * v).mean()
            mu_c[j], var_c[j], ms_c[j] = v.mean(), v.var(), (v * v).mean()
        cnt = x.size // c
    else:
        ng, nb = c // G, n // Gb
        for bg in range(Gb):
            for g in range(G):
                sl = (slice(bg * nb, (bg + 1) * nb), slice(g * ng, (g + 1) * ng))
                v = x[sl].ravel()
                mu_e[sl], var_e[sl], ms_e[sl] = v.mean(), v.var(), (v * v).mean()
                mu_c[g * ng:(g + 1) * ng] += v.mean() / Gb
                var_c[g * ng:(g + 1) * ng] += v.var() / Gb
                ms_c[g * ng:(g + 1) * ng] += (v * v).mean() / Gb
        cnt = nb * ng * (x.size // (n * c))
    return mu_c, var_c, ms_c, mu_e, var_e, ms_e, cnt


def np_train_step(x, state, gamma, beta, m, op, partition, G=1, Gb=1):
    """One training step: y from batch statistics, running ← (1 − m)·running + m·batch statistic."""
    mu_c, var_c, ms_c, mu_e, var_e, ms_e, cnt = np_stats(x, partition, G, Gb)
    if op == "standardizing":
        xhat = (x - mu_e) / np.sqrt(var_e + EPS)
    elif op == "centering":
        xhat = x - mu_e
    else:
        xhat = x / np.sqrt(ms_e + EPS)
    rm, rv, rms = state
    if op in ("standardizing", "centering"):
        rm = (1 - m) * rm + m * mu_c
    if op == "standardizing":
        rv = (1 - m) * rv + m * var_c * cnt / (cnt - 1)
    if op == "scaling":
        rms = (1 - m) * rms + m * ms_c
    return gamma * xhat + beta, (rm, rv, rms)


def np_infer(x, state, gamma, beta, op):
    rm, rv, rms = (s.reshape((1, -1) + (1,) * (x.ndim - 2)) for s in state)
    xhat = {"standardizing": lambda: (x - rm) / np.sqrt(rv + EPS), "centering": lambda: x - rm,
            "scaling": lambda: x / np.sqrt(rms + EPS)}[op]()
    return gamma * xhat + beta


PARTS = [("batch", {}), ("batch_group", {"num_groups": 3, "batch_groups": 2})]
OPS = ("standardizing", "centering", "scaling")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("partition,kw", PARTS, ids=[p for p, _ in PARTS])
def test_training_loop_conditional_bn_against_numpy(rng, partition, kw, op):
    """Conditional BN end to end: a class embedding generates per-sample γ, β (N, C, 1, 1); five
    training steps update the running statistics; inference then uses them. Every step's output and
    state against the NumPy loop of the paper's equations."""
    c, classes = 6, 3
    emb_g, emb_b = rng.standard_normal((classes, c)), rng.standard_normal((classes, c))
    state = (rng.standard_normal(c) * 0.1, rng.uniform(0.5, 1.5, c), rng.uniform(0.5, 1.5, c))
    ref = state
    m = 0.2
    G, Gb = kw.get("num_groups", 1), kw.get("batch_groups", 1)
    for _ in range(5):
        x = rng.standard_normal((4, c, 3, 2)) * 2.0 + 0.7
        labels = rng.integers(0, classes, 4)
        gam, bet = emb_g[labels][:, :, None, None], emb_b[labels][:, :, None, None]
        out = normref.batch_normalize(x, state[0], state[1], gam, bet, True, m, EPS, partition=partition, operation=op,
                                      recovery="generated", running_mean_square=state[2], **kw)
        assert isinstance(out, RunningResult)
        y_ref, ref = np_train_step(x, ref, gam, bet, m, op, partition, G, Gb)
        assert rel_err(out.output, y_ref) < TOL64
        state = (out.running_mean, out.running_var, out.running_mean_square)
        for s, r in zip(state, ref):
            assert rel_err(s, r) < TOL64
    x = rng.standard_normal((2, c, 3, 2))
    labels = np.array([0, 2])
    gam, bet = emb_g[labels][:, :, None, None], emb_b[labels][:, :, None, None]
    y = normref.batch_normalize(x, state[0], state[1], gam, bet, False, m, EPS, partition=partition, operation=op,
                                recovery="generated", running_mean_square=state[2], **kw)
    assert rel_err(y, np_infer(x, ref, gam, bet, op)) < TOL64
    # one sample at inference works (no batch statistics needed), and each sample is independent
    y1 = normref.batch_normalize(x[:1], state[0], state[1], gam[:1], bet[:1], False, m, EPS, partition=partition,
                                 operation=op, recovery="generated", running_mean_square=state[2], **kw)
    assert rel_err(y1, y[:1]) < TOL64


def test_spade_per_position_and_presets(rng):
    """SPADE (γ, β per position) by population statistics; batch_normalize(partition="batch") is
    batch_norm (output and running statistics), and batch_group_norm with running statistics is
    batch_normalize(partition="batch_group")."""
    x = rng.standard_normal((4, 6, 3, 2))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    rm, rv = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6)
    spade = rng.standard_normal((4, 6, 3, 2))
    y = normref.batch_normalize(x, rm, rv, spade, -spade, False, recovery="generated")
    assert rel_err(y, np_infer(x, (rm, rv, rv), spade, -spade, "standardizing")) < TOL64
    a = normref.batch_normalize(x, rm, rv, w, b, True, 0.3)
    e = normref.batch_norm(x, rm, rv, w, b, True, 0.3)
    for u, v in zip(a[:3], e):
        assert rel_err(u, v) < TOL64
    assert a.running_mean_square is None
    bg = normref.batch_group_norm(x, 3, w, b, batch_groups=2, running_mean=rm, running_var=rv, momentum=None,
                                  num_batches_tracked=3)
    bn = normref.batch_normalize(x, rm, rv, w, b, True, None, partition="batch_group", num_groups=3, batch_groups=2,
                                 num_batches_tracked=3)
    for u, v in zip(bg[:3], bn[:3]):
        assert rel_err(u, v) < TOL64
    # without running statistics batch_group_norm is unchanged (batch statistics, a plain array)
    plain = normref.batch_group_norm(x, 3, w, b, batch_groups=2)
    assert rel_err(plain, bg.output) < TOL64
    yi = normref.batch_group_norm(x, 3, w, b, batch_groups=2, running_mean=bg.running_mean,
                                  running_var=bg.running_var, training=False)
    _, ref = np_train_step(x, (rm, rv, rv), 1.0, 0.0, 0.25, "standardizing", "batch_group", 3, 2)
    assert rel_err(bg.running_var, ref[1]) < TOL64
    assert rel_err(yi, np_infer(x, (bg.running_mean, bg.running_var, rv), w[:, None, None], b[:, None, None],
                                "standardizing")) < TOL64
    # state an operation does not estimate comes back unchanged (a copy, never the same array)
    out = normref.batch_normalize(x, rm, rv, w, b, True, 0.3, operation="scaling", running_mean_square=rv)
    assert np.array_equal(out.running_mean, rm) and out.running_mean is not rm
    assert np.array_equal(out.running_var, rv) and out.running_var is not rv


def _fd_check(f, args, grads, rng, idx, h=1e-6):
    """Largest relative error of the analytic directional derivative against central differences
    along random directions, for the arguments at positions ``idx``."""
    worst = 0.0
    for i in idx:
        d = rng.standard_normal(np.shape(args[i]))
        ap, am = list(args), list(args)
        ap[i], am[i] = args[i] + h * d, args[i] - h * d
        num = (f(*ap) - f(*am)) / (2 * h)
        an = float(np.sum(grads[i] * d))
        worst = max(worst, abs(num - an) / max(1.0, abs(an)))
    return worst


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("partition,kw", PARTS, ids=[p for p, _ in PARTS])
def test_finite_differences_stateful(rng, partition, kw, op, training):
    """float64 finite differences (random directions) of x, generated γ and β, on the stateful paths:
    training with a running update (the state carries no gradient) and inference (population
    statistics are constants)."""
    x = rng.standard_normal((4, 6, 3, 2)) + 0.5
    gam, bet = rng.standard_normal((4, 6, 1, 1)), rng.standard_normal((4, 6, 3, 2))
    rm, rv, rms = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    g = rng.standard_normal(x.shape)
    kwargs = dict(partition=partition, operation=op, recovery="generated", running_mean_square=rms, **kw)
    args = (x, rm, rv, gam, bet, training, 0.1, EPS)
    out, res = normref.batch_normalize.forward(*args, **kwargs)
    grads = normref.batch_normalize.backward(res, g if not training else g)
    assert grads[1] is None and grads[2] is None and grads[5] is None

    def f(*a):
        return float(np.sum(g * normref.batch_normalize.primary(normref.batch_normalize(*a, **kwargs))))

    err = _fd_check(f, args, grads, rng, (0, 3, 4))
    assert err < 1e-6, err


def test_backends(backend, rng):
    """Every array library gives the NumPy results (float64), training with a running update of each
    statistic and inference."""
    a = On(backend)
    x = rng.standard_normal((4, 6, 2, 2))
    gam = rng.standard_normal((4, 6, 1, 1))
    rm, rv, rms = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    for partition, kw in PARTS:
        for op in OPS:
            for training in (True, False):
                kwargs = dict(partition=partition, operation=op, recovery="generated", **kw)
                ref = normref.batch_normalize(x, rm, rv, gam, gam, training, 0.2, running_mean_square=rms, **kwargs)
                got = normref.batch_normalize(a(x), a(rm), a(rv), a(gam), a(gam), training, 0.2,
                                              running_mean_square=a(rms), **kwargs)
                if training:
                    for u, v in zip(got, ref):
                        assert rel_err(a.np(u), v) < TOL64
                else:
                    assert rel_err(a.np(got), ref) < TOL64
    got = normref.batch_group_norm(a(x), 3, batch_groups=2, running_mean=a(rm), running_var=a(rv), training=False)
    ref = normref.batch_group_norm(x, 3, batch_groups=2, running_mean=rm, running_var=rv, training=False)
    assert rel_err(a.np(got), ref) < TOL64


def test_torch_adapter_and_layers(rng):
    """normref.backends.torch.batch_normalize: gradients equal torch autograd of an independent torch
    implementation (the oracle); StatefulNorm("batch_normalize", operation="scaling") keeps a running
    mean square buffer; BatchGroupNorm2d evaluates with its running statistics."""
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x = torch.tensor(rng.standard_normal((4, 6, 3, 2)), requires_grad=True)
    gam = torch.tensor(rng.standard_normal((4, 6, 1, 1)), requires_grad=True)
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    out = nt.batch_normalize(x, rm, rv, gam, None, True, 0.1, partition="batch_group", num_groups=3, batch_groups=2,
                             recovery="generated")
    g = torch.tensor(rng.standard_normal(x.shape))
    dx, dg = torch.autograd.grad(out.output, (x, gam), g)
    xv = x.reshape(2, 2, 3, 2, 3, 2)  # (Gb, N/Gb, G, C/G, H, W)
    mu = xv.mean(dim=(1, 3, 4, 5), keepdim=True)
    var = xv.var(dim=(1, 3, 4, 5), keepdim=True, unbiased=False)
    ref = ((xv - mu) / torch.sqrt(var + EPS)).reshape(x.shape) * gam
    rdx, rdg = torch.autograd.grad(ref, (x, gam), g)
    assert rel_err(dx.detach(), rdx) < TOL64 and rel_err(dg.detach(), rdg) < TOL64

    layer = nt.StatefulNorm("batch_normalize", 6, operation="scaling").double()
    assert set(dict(layer.named_buffers())) >= {"running_mean", "running_var", "running_mean_square"}
    xb = torch.tensor(rng.standard_normal((4, 6, 3, 2)))
    layer(xb)
    ms = (xb ** 2).mean(dim=(0, 2, 3))
    assert rel_err(layer.running_mean_square, 0.9 + 0.1 * ms) < TOL64
    assert rel_err(layer.running_var, torch.ones(6)) == 0.0  # scaling keeps no variance
    layer.eval()
    y = layer(xb)
    assert rel_err(y.detach(), xb / torch.sqrt(layer.running_mean_square.reshape(1, 6, 1, 1) + EPS)) < TOL64

    bgn = nt.BatchGroupNorm2d(6, num_groups=3, batch_groups=2).double()
    bgn(xb)
    assert int(bgn.num_batches_tracked) == 1 and not torch.equal(bgn.running_var, torch.ones(6, dtype=torch.float64))
    bgn.eval()
    ye = bgn(xb[:1])  # one sample: population statistics, no batch needed
    ref = (xb[:1] - bgn.running_mean.reshape(1, 6, 1, 1)) / torch.sqrt(bgn.running_var.reshape(1, 6, 1, 1) + EPS)
    assert rel_err(ye.detach(), ref) < TOL64


def test_jax_adapter(rng):
    """normref.backends.jax.batch_normalize (custom_vjp): jax.grad equals normref's NumPy backward."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from normref.backends import jax as nj

    x = rng.standard_normal((4, 6, 3, 2))
    gam = rng.standard_normal((4, 6, 1, 1))
    rm, rv = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6)
    g = rng.standard_normal(x.shape)
    kw = dict(partition="batch", recovery="generated")

    def loss(xx, gg):
        out = nj.batch_normalize(xx, jnp.asarray(rm), jnp.asarray(rv), gg, None, True, 0.1, **kw)
        return jnp.sum(out[0] * g)

    dx, dg = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(gam))
    _, res = normref.batch_normalize.forward(x, rm, rv, gam, None, True, 0.1, **kw)
    ref = normref.batch_normalize.backward(res, g)
    assert rel_err(np.asarray(dx), ref[0]) < TOL64 and rel_err(np.asarray(dg), ref[3]) < TOL64


BAD = [
    (dict(partition="instance"), ValueError, r"batch_normalize: partition must be one of"),
    (dict(operation="lp"), ValueError, r"batch_normalize: operation must be one of"),
    (dict(training="yes"), TypeError, r"batch_normalize: training must be a bool"),
    (dict(running_var=None, training=False), ValueError, r"running_mean and running_var go together"),
    (dict(running_var=-np.ones(6), training=False), ValueError, r"batch_normalize: running_var"),
    (dict(operation="scaling", training=False), ValueError, r"needs running_mean_square .*got running_mean_square=None"),
    (dict(running_mean_square=np.ones(5)), ValueError, r"running_mean_square must have shape \(6,\)"),
    (dict(weight=np.ones((4, 5, 1, 1)), recovery="generated"), ValueError, r"weight must be broadcastable"),
    (dict(weight=np.ones((4, 6, 1, 1))), ValueError, r"weight must have shape \(6,\)"),
    (dict(momentum=1.5), ValueError, r"batch_normalize: momentum must lie in \[0, 1\]"),
    (dict(momentum=None), ValueError, r"num_batches_tracked"),
    (dict(partition="batch_group", num_groups=4), ValueError, r"batch_normalize: .*num_groups"),
    (dict(input=np.ones((1, 6)), training=True), ValueError, r"1 value per statistic"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(rng, kw, exc, msg):
    call = dict(input=rng.standard_normal((4, 6, 2)), running_mean=np.zeros(6), running_var=np.ones(6),
                training=True)
    call.update(kw)
    with pytest.raises(exc, match=msg):
        normref.batch_normalize(**call)


def test_bad_input_batch_group_norm(rng):
    x = rng.standard_normal((4, 6, 2))
    with pytest.raises(ValueError, match=r"batch_group_norm: running_mean and running_var are required"):
        normref.batch_group_norm(x, 3, training=False)
    with pytest.raises(ValueError, match=r"batch_group_norm: running_mean and running_var go together"):
        normref.batch_group_norm(x, 3, running_mean=np.zeros(6))
    with pytest.raises(ValueError, match=r"batch_group_norm: running_var must have shape \(6,\)"):
        normref.batch_group_norm(x, 3, running_mean=np.zeros(6), running_var=np.ones(3))
    with pytest.raises(TypeError, match=r"batch_group_norm: training must be a bool"):
        normref.batch_group_norm(x, 3, training=1)


def sync_worker(rank, world_size, xs, rm, rv, w, b):
    """One rank of the synchronized batch_group_norm-with-running-statistics check (gloo)."""
    from normref.backends.distributed.torch import TorchReducer

    out, pb = normref.vjp(normref.batch_group_norm, xs[rank], 3, w, b, batch_groups=2, sync=TorchReducer(),
                          running_mean=rm, running_var=rv, momentum=0.3)
    g = np.ones_like(out.output) * (rank + 1.0)
    dx = pb(g)[0]
    return {"y": out.output, "rm": out.running_mean, "rv": out.running_var, "dx": dx}


@pytest.mark.slow  # two gloo processes (each imports torch): with the suite's other multi-process tests
def test_synchronized_running_statistics(rng):
    """batch_group_norm with running statistics and sync= over 2 gloo ranks: batch group j is the
    union of the ranks' j-th chunks; every rank gets the running statistics of the global batch
    groups (the variance unbiased by the global count), equal to one process holding the union."""
    pytest.importorskip("torch")
    from ._dist import run_ranks

    xs = [rng.standard_normal((4, 6, 3)) + 0.3 * r for r in range(2)]
    rm, rv = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6)
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    res = run_ranks(sync_worker, 2, xs, rm, rv, w, b, timeout=120)
    # the union: batch group j = rank 0's j-th chunk then rank 1's (2 samples each)
    union = np.concatenate([xs[0][:2], xs[1][:2], xs[0][2:], xs[1][2:]])
    ref, pb = normref.vjp(normref.batch_group_norm, union, 3, w, b, batch_groups=2, running_mean=rm, running_var=rv,
                          momentum=0.3)
    g = np.concatenate([np.ones((2, 6, 3)), 2 * np.ones((2, 6, 3)), np.ones((2, 6, 3)), 2 * np.ones((2, 6, 3))])
    dx = pb(g)[0]
    for r in range(2):
        assert rel_err(res[r]["rm"], ref.running_mean) < TOL64 and rel_err(res[r]["rv"], ref.running_var) < TOL64
        assert rel_err(res[r]["y"], np.concatenate([ref.output[2 * r:2 * r + 2], ref.output[4 + 2 * r:6 + 2 * r]])) < TOL64
        assert rel_err(res[r]["dx"], np.concatenate([dx[2 * r:2 * r + 2], dx[4 + 2 * r:6 + 2 * r]])) < TOL64
