"""Tests of the torch layers of normref.backends.torch.cross_iteration (MABN, memorized BN, CBN).

Each layer's short training loop is checked against the same loop written by hand: MABN against a
plain NumPy port of the authors' ``MABN2d``/``BatchNormFunction`` (megvii-model/MABN: ring buffers,
warm-up, renormalization switched on after ``renorm_after`` iterations) and against the pure
function with hand-kept windows; memorized BN against the pure function with a hand-kept memory;
CBN after a convolution against the pure function with the statistics' weight gradients taken by
torch autograd of the convolution (the authors' ``torch.autograd.grad(cur_mu, weight, ones)``).

Tolerances: float64 throughout; each step is a few hundred operations on O(1) values (≈ 1e-13
relative), and the errors compound over < 10 steps of SGD with lr ≤ 0.1 on well-conditioned
statistics (variances ≥ 0.1), so 1e-10 relative leaves a wide margin while a wrong window entry,
schedule step or missing term changes results by ≥ 1e-3 here.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normref  # noqa: E402
import normref.backends.torch as nt  # noqa: E402
from normref import cross_iteration as ci  # noqa: E402

TOL = 1e-10  # see the module docstring
D = torch.float64
AX = (0, 2, 3)


def _rel(a, b):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _c(v):
    return np.asarray(v).reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------------
# MABN


class _AuthorsMABN2d:
    """NumPy port of megvii-model/MABN's MABN2d training step (written from the authors' algorithm):
    ring buffers of size m (current slot included), warm-up while it <= m or it < warmup_iters,
    r = 1 while it <= max(renorm_after, warmup_iters) and clipped to [1/5, 5] afterwards,
    running_var (a mean square) ← 0.98·running + 0.02·var after r is taken."""

    def __init__(self, c, m, warmup, renorm_after, eps=1e-5):
        self.m, self.warmup, self.renorm_after, self.eps = m, warmup, renorm_after, eps
        self.bx2, self.bgz = np.zeros((m, c)), np.zeros((m, c))
        self.running = np.ones(c)
        self.iters = 0

    def step(self, x, w, b, dy):
        self.iters += 1
        it, m, eps = self.iters, self.m, self.eps
        x2 = (x * x).mean(axis=AX)
        self.bx2[it % m] = x2
        warm = it <= m or it < self.warmup
        var = x2 if warm else self.bx2.mean(axis=0)
        z = x / np.sqrt(_c(var) + eps)
        r = self.r_raw = np.sqrt(var + eps) / np.sqrt(self.running + eps)
        r = np.ones_like(r) if it <= max(self.renorm_after, self.warmup) else np.clip(r, 1 / 5, 5)
        y = _c(w) * _c(r) * z + _c(b)
        self.running = 0.98 * self.running + 0.02 * var
        g = dy * _c(w) * _c(r)
        gz = (g * z).mean(axis=AX)
        self.bgz[it % m] = gz
        mgz = gz if warm else self.bgz.mean(axis=0)
        gx = (g - z * _c(mgz)) / np.sqrt(_c(var) + eps)
        return y, gx, (dy * _c(r) * z).sum(axis=AX), dy.sum(axis=AX)


def test_mabn_layer_matches_authors_algorithm():
    rng = np.random.default_rng(0)
    c, m, warmup, renorm_after, lr = 3, 3, 5, 6, 0.05
    ref = _AuthorsMABN2d(c, m, warmup, renorm_after)
    layer = nt.MovingAverageBatchNorm2d(c, buffer_size=m, warmup_iters=warmup, renorm_after=renorm_after, dtype=D)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, c)))
        layer.bias.copy_(torch.tensor(rng.standard_normal(c)))
    w, b = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    clipped = 0
    for step in range(10):
        # growing scales (3·1.8^step): E[x²] ≫ the slow running value, so r is clipped at 5 after the switch
        x = rng.standard_normal((2, c, 3, 2)) * (3 * 1.8 ** step) + 0.5
        dy = rng.standard_normal(x.shape)
        y_ref, gx_ref, gw_ref, gb_ref = ref.step(x, w, b, dy)
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt)
        y.backward(torch.tensor(dy))
        assert _rel(y, y_ref) < TOL, step
        assert _rel(xt.grad, gx_ref) < TOL, step
        assert _rel(layer.weight.grad, gw_ref) < TOL and _rel(layer.bias.grad, gb_ref) < TOL, step
        assert _rel(layer.running_mean_square, ref.running) < TOL, step
        if step + 1 > renorm_after:
            clipped += int(np.any(ref.r_raw > 5))
        with torch.no_grad():  # SGD on γ, β in both loops
            for p in (layer.weight, layer.bias):
                p -= lr * p.grad
                p.grad = None
        w, b = w - lr * gw_ref, b - lr * gb_ref
    assert int(layer.num_batches_tracked) == 10
    assert clipped > 0  # the clipped renormalization was exercised


def test_mabn_layer_matches_pure_function_loop():
    rng = np.random.default_rng(1)
    c, m, warmup = 2, 3, 0
    layer = nt.MovingAverageBatchNorm2d(c, buffer_size=m, warmup_iters=warmup, renorm_after=2, rmax=1.5,
                                        momentum=0.1, dtype=D)
    w, b, rms = np.ones(c), np.zeros(c), np.ones(c)
    sq, gz = [], []  # windows, newest first
    for t in range(1, 7):
        x = rng.standard_normal((3, c, 2, 2)) + 0.2 * t
        dy = rng.standard_normal(x.shape)
        use = t > m  # warm-up while t <= m (warmup_iters = 0)
        rmax = 1.5 if t > 2 else None
        ps = np.array(sq[: m - 1]) if use else None
        pg = np.array(gz[: m - 1]) if use else None
        out, pull = normref.vjp(ci.moving_average_batch_norm, x, ps, pg, w, b, rms, training=True, momentum=0.1,
                                rmax=rmax)
        grads = pull(dy)
        psi = ci.moving_average_gradient_statistic(x, dy, ps, w, rms, rmax=rmax)
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt)
        y.backward(torch.tensor(dy))
        assert _rel(y, out.output) < TOL and _rel(xt.grad, grads[0]) < TOL, t
        assert _rel(layer.weight.grad, grads[3]) < TOL and _rel(layer.bias.grad, grads[4]) < TOL, t
        sq.insert(0, out.sq_mean)
        gz.insert(0, psi)
        rms = out.running_mean_square
        n = min(t, m - 1)  # rows filled so far
        assert _rel(layer.past_sq_means[:n], np.array(sq[:n])) < TOL
        assert _rel(layer.past_grad_stats[:n], np.array(gz[:n])) < TOL
        assert _rel(layer.running_mean_square, rms) < TOL
        w, b = w - 0.1 * grads[3], b - 0.1 * grads[4]
        with torch.no_grad():
            for p in (layer.weight, layer.bias):
                p -= 0.1 * p.grad
                p.grad = None


def test_mabn_backward_state_rules():
    layer = nt.MovingAverageBatchNorm2d(2, buffer_size=3, warmup_iters=0, dtype=D)
    x = torch.randn(3, 2, 2, 2, dtype=D, requires_grad=True)
    y = layer(x)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran already"):
        y.sum().backward()
    with torch.no_grad():  # no backward will come: Ψ_t = 0 keeps the windows aligned
        layer(x)
    assert torch.all(layer.past_grad_stats[0] == 0) and torch.all(layer.past_grad_stats[1] != 0)
    assert torch.allclose(layer.past_sq_means[0], (x.detach() ** 2).mean(dim=AX))


def test_centralized_conv_against_autograd():
    rng = np.random.default_rng(2)
    conv = nt.CentralizedConv2d(2, 3, 3, bias=False, dtype=D)
    x = torch.tensor(rng.standard_normal((2, 2, 5, 5)))
    dy = torch.tensor(rng.standard_normal((2, 3, 3, 3)))
    conv(x).backward(dy)
    v = conv.weight.detach().clone().requires_grad_(True)
    wc = v - v.mean(dim=(1, 2, 3), keepdim=True)
    torch.nn.functional.conv2d(x, wc).backward(dy)
    assert _rel(conv.weight.grad, v.grad) < TOL
    assert _rel(conv(x), torch.nn.functional.conv2d(x, wc)) < TOL
    lin = torch.nn.Linear(4, 3, dtype=D)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", nt.Centralize())
    assert float(lin.weight.detach().mean(dim=1).abs().max()) < 1e-15


# --------------------------------------------------------------------------------------------------
# memorized BN


@pytest.mark.parametrize("weights", [None, (0.5, 0.3, 0.2)])
def test_memorized_layer_matches_pure_function_loop(weights):
    rng = np.random.default_rng(3)
    c, k, mom = 3, 3, 0.3
    layer = nt.MemorizedBatchNorm2d(c, memory=k, momentum=mom, memory_weights=weights, dtype=D)
    w, b, rm, rv = np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)
    means, vars_ = [], []
    for step in range(5):
        x = rng.standard_normal((2, c, 2, 3)) * (1 + 0.3 * step) + 0.5 * step
        dy = rng.standard_normal(x.shape)
        stored = min(step, k - 1)
        eta = None
        if weights is not None:  # the first stored + 1 weights, rescaled to sum to 1, while the memory fills
            head = np.array(weights[: stored + 1])
            eta = tuple(head / head.sum())
        pm = np.array(means[:stored]) if stored else None
        pv = np.array(vars_[:stored]) if stored else None
        out, pull = normref.vjp(ci.memorized_batch_norm, x, pm, pv, w, b, rm, rv, training=True, momentum=mom,
                                memory_weights=eta)
        grads = pull(dy)
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt)
        y.backward(torch.tensor(dy))
        assert _rel(y, out.output) < TOL and _rel(xt.grad, grads[0]) < TOL, step
        assert _rel(layer.weight.grad, grads[3]) < TOL and _rel(layer.bias.grad, grads[4]) < TOL, step
        means.insert(0, out.mean)
        vars_.insert(0, out.var)
        rm, rv = out.running_mean, out.running_var
        assert _rel(layer.running_mean, rm) < TOL and _rel(layer.running_var, rv) < TOL
        n = min(step + 1, k - 1)
        assert _rel(layer.past_means[:n], np.array(means[:n])) < TOL
        assert _rel(layer.past_vars[:n], np.array(vars_[:n])) < TOL
        w, b = w - 0.1 * grads[3], b - 0.1 * grads[4]
        with torch.no_grad():
            for p in (layer.weight, layer.bias):
                p -= 0.1 * p.grad
                p.grad = None


def test_memorized_double_forward():
    rng = np.random.default_rng(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, dtype=D), nt.MemorizedBatchNorm2d(3, memory=3, dtype=D))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        x = torch.tensor(rng.standard_normal((4, 2, 3, 3)))
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        bn = model[1]
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        with torch.no_grad(), nt.double_forward(model):
            model(x)
        z = model[0](x).detach()
        assert _rel(bn.past_means[0], z.mean(dim=AX)) < TOL  # statistics under the updated weights
        assert _rel(bn.past_vars[0], z.var(dim=AX, unbiased=False)) < TOL
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(bn.state_dict()[key], before[key])
        assert torch.equal(bn.past_means[1], before["past_means"][1])
    assert not model[1]._again


# --------------------------------------------------------------------------------------------------
# cross-iteration BN after a convolution


def test_cbn_conv_matches_pure_function_loop():
    rng = np.random.default_rng(5)
    cin, c, kk, buf, burnin, rho, lr = 2, 3, 3, 2, 2, 1.0, 0.1
    pair = nt.CBNConv2d(cin, c, kk, padding=1, buffer_num=buf, burnin=burnin, rho=rho, dtype=D)
    theta = pair.conv.weight.detach().numpy().copy()
    gamma, beta = np.ones(c), np.zeros(c)
    hist = []  # (μ, ν, ∂μ/∂θ, ∂ν/∂θ, θ), newest first
    for t in range(1, 7):
        x = rng.standard_normal((3, cin, 4, 4)) + 0.3
        dy = rng.standard_normal((3, c, 4, 4))
        # reference: the conv by torch (autograd only for the conv and the statistics' θ-gradients)
        th = torch.tensor(theta, requires_grad=True)
        xr = torch.tensor(x, requires_grad=True)
        z = torch.nn.functional.conv2d(xr, th, padding=1)
        ones = torch.ones(c, dtype=D)
        dmu = torch.autograd.grad(z.mean(dim=AX), th, ones, retain_graph=True)[0].numpy()
        dnu = torch.autograd.grad((z * z).mean(dim=AX), th, ones, retain_graph=True)[0].numpy()
        win = hist[: buf] if t > burnin else []  # nothing is stored during the burn-in (the authors' code)
        args = [None] * 6
        if win:
            st = [np.array([h[i] for h in win]) for i in range(5)]
            args = st[:4] + [theta, st[4]]
        out, pull = normref.vjp(ci.cross_iteration_batch_norm, z.detach().numpy(), None, None, gamma, beta, *args,
                                training=True, rho=rho)
        dz, _, _, dg, db = pull(dy)[:5]
        z.backward(torch.tensor(dz))
        # the layer
        xt = torch.tensor(x, requires_grad=True)
        y = pair(xt)
        y.backward(torch.tensor(dy))
        assert _rel(y, out.output) < TOL, t
        assert _rel(xt.grad, xr.grad) < TOL and _rel(pair.conv.weight.grad, th.grad) < TOL, t
        assert _rel(pair.norm.weight.grad, dg) < TOL and _rel(pair.norm.bias.grad, db) < TOL, t
        if t > burnin:
            hist.insert(0, (out.mean, out.sq_mean, dmu, dnu, theta.copy()))
        n = min(len(hist), buf)
        assert n == 0 or _rel(pair.norm.past_mean_grads[:n], np.array([h[2] for h in hist[:n]])) < TOL
        assert n == 0 or _rel(pair.norm.past_sq_mean_grads[:n], np.array([h[3] for h in hist[:n]])) < TOL
        theta = theta - lr * th.grad.numpy()
        gamma, beta = gamma - lr * dg, beta - lr * db
        with torch.no_grad():
            for p in pair.parameters():
                p -= lr * p.grad
                p.grad = None
    # without the compensation the output differs (the test would see a missing Taylor term)
    naive = normref.cross_iteration_batch_norm(z.detach().numpy(), None, None, gamma, beta,
                                               *[np.array([h[i] for h in hist[:buf]]) for i in range(2)],
                                               training=True).output
    full = normref.cross_iteration_batch_norm(z.detach().numpy(), None, None, gamma, beta,
                                              *[np.array([h[i] for h in hist[:buf]]) for i in range(4)], theta,
                                              np.array([h[4] for h in hist[:buf]]), training=True).output
    assert _rel(naive, full) > 1e-4


def test_cbn_linear_runs_and_compensates():
    rng = np.random.default_rng(6)
    pair = nt.CBNLinear(4, 3, buffer_num=2, dtype=D)
    for _ in range(3):
        x = torch.tensor(rng.standard_normal((5, 4)) + 0.2)
        pair(x).square().sum().backward()
        with torch.no_grad():
            for p in pair.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    dmu, dnu = ci.cross_iteration_statistic_grads(x.numpy(), (x @ pair.linear.weight.detach().T).numpy())
    # the newest stored gradients are those of the last batch under the weights before its update
    assert pair.norm.past_mean_grads.shape == (2, 3, 4)
    assert _rel(pair.norm.past_mean_grads[0], dmu) < TOL
    with pytest.raises(ValueError, match="2D"):
        pair(torch.zeros(2, 4, 3, dtype=D))


# --------------------------------------------------------------------------------------------------
# common behaviour: state_dict, eval, no mutation, fold, recalibrate, bad arguments


def _layers():
    return [
        ("mabn", lambda: nt.MovingAverageBatchNorm2d(3, buffer_size=3, warmup_iters=0, renorm_after=2, dtype=D)),
        ("mbn", lambda: nt.MemorizedBatchNorm2d(3, memory=3, dtype=D)),
        ("cbn", lambda: nt.CBNConv2d(2, 3, 1, buffer_num=2, dtype=D)),
    ]


def _train(layer, rng, steps, cin):
    for _ in range(steps):
        x = torch.tensor(rng.standard_normal((4, cin, 3, 3)) * 2 + 1, requires_grad=True)
        layer(x).square().sum().backward()
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.01 * p.grad
                p.grad = None


@pytest.mark.parametrize("name,make", _layers())
def test_state_dict_round_trip_and_eval(name, make):
    rng = np.random.default_rng(7)
    cin = 2 if name == "cbn" else 3
    a = make()
    _train(a, rng, 4, cin)
    b = make()
    b.load_state_dict(a.state_dict())
    sd = a.state_dict()
    windows = [k for k in sd if "past_" in k]
    assert windows and all(torch.equal(sd[k], b.state_dict()[k]) for k in sd)
    x = torch.tensor(rng.standard_normal((4, cin, 3, 3)) + 1)
    dy = torch.tensor(rng.standard_normal((4, 3, 3, 3)))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a(xa).backward(dy)
    b(xb).backward(dy)
    assert torch.equal(xa.grad, xb.grad)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # eval: the running statistics, no buffer changed, input not mutated
    a.eval()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    x0 = x.clone()
    y = a(x)
    assert torch.equal(x, x0)
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    norm = a.norm if name == "cbn" else a
    inp = (a.conv(x) if name == "cbn" else x).detach().numpy()
    g, bb = norm.weight.detach().numpy(), norm.bias.detach().numpy()
    if name == "mabn":
        ref = _c(g) * inp / np.sqrt(_c(norm.running_mean_square) + 1e-5) + _c(bb)
    else:
        ref = _c(g) * (inp - _c(norm.running_mean)) / np.sqrt(_c(norm.running_var) + 1e-5) + _c(bb)
    assert _rel(y, ref) < TOL


@pytest.mark.parametrize("name,make", _layers())
def test_training_does_not_mutate_input(name, make):
    rng = np.random.default_rng(8)
    layer = make()
    cin = 2 if name == "cbn" else 3
    for _ in range(4):
        x = torch.tensor(rng.standard_normal((4, cin, 3, 3)), requires_grad=True)
        x0 = x.detach().clone()
        dy = torch.tensor(rng.standard_normal((4, 3, 3, 3)))
        dy0 = dy.clone()
        layer(x).backward(dy)
        assert torch.equal(x.detach(), x0) and torch.equal(dy, dy0)


def test_fold_and_recalibrate():
    rng = np.random.default_rng(9)
    models = [
        torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, dtype=D),
                            nt.MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=0, dtype=D)),
        torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, dtype=D), nt.MemorizedBatchNorm2d(3, memory=3, dtype=D)),
        torch.nn.Sequential(nt.CBNConv2d(2, 3, 1, buffer_num=2, dtype=D)),
    ]
    data = [torch.tensor(rng.standard_normal((4, 2, 3, 3)) * 2 + 1) for _ in range(3)]
    for model in models:
        for x in data:
            model(x.clone().requires_grad_(True)).sum().backward()
        model.eval()
        folded = nt.fold(model)
        assert not any(isinstance(m, ci_layers()) for m in folded.modules()), folded
        assert _rel(folded(data[0]), model(data[0])) < 1e-12
        # recalibrate: the running statistics re-estimated from the batches (the inputs of the norm)
        norm = [m for m in model.modules() if isinstance(m, ci_layers())][0]
        windows = {k: v.clone() for k, v in norm.state_dict().items() if "past_" in k}
        nt.recalibrate(model, [data[0]])
        z = (model[0](data[0]) if not isinstance(model[0], nt.CBNConv2d) else model[0].conv(data[0])).detach()
        if isinstance(norm, nt.MovingAverageBatchNorm):
            assert _rel(norm.running_mean_square, (z * z).mean(dim=AX)) < TOL
        else:
            assert _rel(norm.running_mean, z.mean(dim=AX)) < TOL
            assert _rel(norm.running_var, z.var(dim=AX, unbiased=True)) < TOL
        assert all(torch.equal(v, norm.state_dict()[k]) for k, v in windows.items())


def ci_layers():
    return (nt.MovingAverageBatchNorm, nt.MemorizedBatchNorm, nt.CrossIterationBatchNorm)


BAD = [
    (lambda: nt.MovingAverageBatchNorm2d(0), ValueError, "num_features"),
    (lambda: nt.MovingAverageBatchNorm2d(3, buffer_size=0), ValueError, "buffer_size"),
    (lambda: nt.MovingAverageBatchNorm2d(3, buffer_size=2.0), TypeError, "buffer_size"),
    (lambda: nt.MovingAverageBatchNorm2d(3, rmax=0.5), ValueError, "rmax"),
    (lambda: nt.MovingAverageBatchNorm2d(3, track_running_stats=False), ValueError, "rmax"),
    (lambda: nt.MovingAverageBatchNorm2d(3, momentum=1.5), ValueError, "momentum"),
    (lambda: nt.MovingAverageBatchNorm2d(3, eps=0.0), ValueError, "eps"),
    (lambda: nt.MovingAverageBatchNorm2d(3, affine="yes"), TypeError, "affine"),
    (lambda: nt.MemorizedBatchNorm2d(3, memory=0), ValueError, "memory"),
    (lambda: nt.MemorizedBatchNorm2d(3, memory=2, memory_weights=(0.5, 0.3, 0.2)), ValueError, "memory_weights"),
    (lambda: nt.MemorizedBatchNorm2d(3, memory=2, memory_weights=(0.0, 1.0)), ValueError, "memory_weights"),
    (lambda: nt.MemorizedBatchNorm2d(3, memory=2, memory_weights=5), TypeError, "memory_weights"),
    (lambda: nt.MemorizedBatchNorm2d(3, variance="union"), ValueError, "variance"),
    (lambda: nt.CrossIterationBatchNorm2d(3, buffer_num=-1), ValueError, "buffer_num"),
    (lambda: nt.CrossIterationBatchNorm2d(3, weight_shape=(4, 2, 1, 1)), ValueError, "weight_shape"),
    (lambda: nt.CrossIterationBatchNorm2d(3, rho=-1.0), ValueError, "rho"),
    (lambda: nt.CrossIterationBatchNorm2d(3, invalid="skip"), ValueError, "invalid"),
    (lambda: nt.CBNConv2d(2, 3, 3, padding="same"), ValueError, "padding"),
]


@pytest.mark.parametrize("make,exc,word", BAD)
def test_bad_constructor_arguments_refused(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


def test_bad_forward_arguments_refused():
    norm = nt.CrossIterationBatchNorm2d(3, buffer_num=1, weight_shape=(3, 2, 1, 1), dtype=D)
    z = torch.zeros(2, 3, 2, 2, dtype=D)
    with pytest.raises(ValueError, match="go together"):
        norm(z, layer=torch.nn.Conv2d(2, 3, 1, dtype=D))
    with pytest.raises(ValueError, match="groups=1"):
        norm(z, layer=torch.nn.Conv2d(2, 3, 1, groups=1, padding="same", dtype=D), layer_input=z[:, :2])
    with pytest.raises(ValueError, match="weight_shape"):
        norm(z, layer=torch.nn.Conv2d(2, 3, 3, padding=1, dtype=D), layer_input=z[:, :2])
    with pytest.raises(ValueError, match="4D"):
        nt.MemorizedBatchNorm2d(3)(torch.zeros(2, 3))
