"""Folding normalizations at inference into linear/convolution layers (issue 14 §3): normref.fold,
normref.inference_affine and normref.backends.torch.fold.

Tolerances (how each is derived)
- (A, c) of inference_affine applied to x vs the method's own inference call, float64: the same
  numbers summed in another order (a d ≤ 3 matrix–vector product against the method's centring
  then scaling), so ~d·ε relative; for whitening W is the same matrix function of the same Σ̂ + εI
  (Cholesky: L⁻¹ formed vs a triangular solve, which differ by ~ε·κ(L)), so the budget is
  TOL64·cond = 1e3·ε₆₄·κ(Σ̂ + εI).
- folded layer vs the pair (layer, norm), float64: each output is a sum of n = C_in/groups·K products
  (≤ 36 here) plus the d-term map, re-associated: |Δ| ≤ (n + d)·ε·Σ|terms| ≈ 40·ε·(a few)·max|y|,
  inside TOL64·cond.
- float32 models: the folding is computed in float64 and cast, so the folded weights are within
  ε₃₂ of the exact ones and each output within ~(n + d)·ε₃₂·Σ|terms|: 2e3·ε₃₂·max|y| allowed.
"""

from __future__ import annotations

import numpy as np
import pytest

import normref
from normref.folding import FOLDABLE, NormAffine, fold, inference_affine
from tests.conftest import TOL64, On, assert_same_kind
from tests.conftest import rel_err as _rel

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _spd(rng, g, d, lo=0.5, hi=2.0):
    """g random symmetric positive definite d×d matrices with eigenvalues in [lo, hi] (κ ≤ hi/lo)."""
    out = []
    for _ in range(g):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        out.append((q * rng.uniform(lo, hi, d)) @ q.T)
    return np.stack(out)


def _kappa(rc, eps=1e-5):
    lam = np.linalg.eigvalsh(rc + eps * np.eye(rc.shape[-1]))
    return float(np.max(lam[..., -1] / lam[..., 0]))


def _cases(rng, c=6):
    """(label, method, args after input, kwargs, cond): every method of FOLDABLE, every whitening method."""
    rm, rv = rng.standard_normal(c), rng.uniform(0.3, 2.0, c)
    w, b = rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c), rng.standard_normal(c)
    rc2, rc3, rc6 = _spd(rng, 3, 2), _spd(rng, 2, 3), _spd(rng, 1, 6)
    out = [
        ("bn", "batch_norm", (rm, rv, w, b), {}, 1.0),
        ("bn, no affine, eps=1e-3", "batch_norm", (rm, rv), dict(eps=1e-3), 1.0),
        ("renorm", "batch_renorm", (rm, rv, w, b), dict(rmax=2.0), 1.0),
        ("ghost", "ghost_batch_norm", (rm, rv, w, b), dict(virtual_batch_size=2), 1.0),
        ("in, running stats", "instance_norm", (rm, rv, w, b), dict(use_input_stats=False), 1.0),
        ("lp p=1", "lp_batch_norm", (rm, rv, w, b), dict(p=1.0), 1.0),
        ("lp p=3 no l1 factor", "lp_batch_norm", (rm, rv, w, b), dict(p=3.0, l1_factor=False), 1.0),
        ("mean only", "mean_only_batch_norm", (rm, b), {}, 1.0),
        ("dbn gs 2", "decorrelated_batch_norm", (rm, rc2, w, b), dict(group_size=2), _kappa(rc2)),
        ("dbn one group", "decorrelated_batch_norm", (rm, rc6, w, b), {}, _kappa(rc6)),
        ("iter_norm T=5", "iter_norm", (rm, rc3, w, b), dict(group_size=3), _kappa(rc3)),
        ("iter_norm T=9 (coupled)", "iter_norm", (rm, rc3, w, b), dict(group_size=3, iterations=9), _kappa(rc3)),
        ("coloring cholesky", "whitening_coloring", (rm, rc3, rng.standard_normal((2, 3, 3)), b),
         dict(group_size=3), _kappa(rc3)),
        ("coloring zca, no bias", "whitening_coloring", (rm, rc2, rng.standard_normal((3, 2, 2))),
         dict(group_size=2, method="zca"), _kappa(rc2)),
    ]
    # the authors' conventions (issue 15): each state kept the other way folds by its own rule
    sd = np.sqrt(rv + 1e-5)
    wm2 = np.stack([np.linalg.inv(np.linalg.cholesky(r)).T @ np.linalg.inv(np.linalg.cholesky(r)) for r in rc2])
    out += [
        ("renorm, running σ (Algorithm 1)", "batch_renorm", (rm, sd, w, b), dict(running_stat="std"), 1.0),
        ("lp p=2, ε inside the moment", "lp_batch_norm", (rm, rv, w, b), dict(p=2.0, eps_placement="inside"), 1.0),
        ("lp p=3, running 1/scale", "lp_batch_norm", (rm, 1.0 / rv, w, b), dict(p=3.0, running_scale_kind="reciprocal"),
         1.0),
        ("dbn, running W (authors' code)", "decorrelated_batch_norm", (rm, wm2, w, b),
         dict(group_size=2, running="whitening_matrix"), _kappa(rc2)),
        ("iter_norm, running W", "iter_norm", (rm, wm2, w, b), dict(group_size=2, running="whitening_matrix"),
         _kappa(rc2)),
        ("coloring, shrinkage (Siarohin et al.)", "whitening_coloring", (rm, rc2, rng.standard_normal((3, 2, 2)), b),
         dict(group_size=2, eps=1e-2, shrinkage=True), _kappa(rc2)),
    ]
    for meth in normref.WHITENING_METHODS:
        out.append((f"bw {meth}", "batch_whitening", (rm, rc2, w, b), dict(group_size=2, method=meth), _kappa(rc2)))
    # issue 14's stateful methods: inference by the running statistics, as batch norm (or scaling only)
    std = dict(running_mean=rm, running_var=rv, weight=w, bias=b, training=False)
    for name, extra in (("batch_group_norm", dict(num_groups=2)), ("blended_batch_norm", {}),
                        ("memorized_batch_norm", {}), ("cross_iteration_batch_norm", {}), ("online_norm", {})):
        out.append((name, name, (), {**std, **extra}, 1.0))
    ms = rng.uniform(0.3, 2.0, c)
    for name in ("power_norm", "moving_average_batch_norm"):
        out.append((name, name, (), dict(running_mean_square=ms, weight=w, bias=b), 1.0))
    return out


def _apply(na, x):
    """y = A·x + c per group of d channels, NumPy float64 (einsum: independent of normref's layout)."""
    a, c = np.asarray(na[0], np.float64), np.asarray(na[1], np.float64)
    g, d, _ = a.shape
    xs = x.reshape(x.shape[0], g, d, -1)
    return np.einsum("gij,ngjk->ngik", a, xs).reshape(x.shape) + c.reshape((1, -1) + (1,) * (x.ndim - 2))


def test_exported():
    assert normref.fold is fold and normref.inference_affine is inference_affine
    assert set(FOLDABLE) <= set(normref.REGISTRY)
    from normref.backends import torch as nt

    assert callable(nt.fold) and callable(nt.layer_affine)


def test_affine_is_the_inference_call(backend):
    """(A, c) on every array library: y = A·x + c equals the method's inference output, and the
    results keep the statistics' library, device and dtype; fold runs there too."""
    on, rng = On(backend), np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 3, 2))
    seen = set()
    for label, name, args, kw, cond in _cases(rng):
        seen.add(name)
        want = normref.get(name)(x, *args, **kw)  # NumPy float64: the method itself
        want = np.asarray(want[0] if isinstance(want, tuple) else want)
        bargs = [on(a) for a in args]
        bkw = {k: on(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        na = inference_affine(name, *bargs, **bkw)
        assert isinstance(na, NormAffine)
        like = (bargs or [v for v in bkw.values() if isinstance(v, type(on(x)))])[0]
        assert_same_kind(na.matrix, like)
        assert_same_kind(na.shift, like)
        got = _apply((on.np(na.matrix), on.np(na.shift)), x)
        assert _rel(got, want) <= TOL64 * cond, label
        # the method on this backend as well (the same call, its own path)
        yb = normref.get(name)(on(x), *bargs, **bkw)
        assert _rel(on.np(yb[0] if isinstance(yb, tuple) else yb), got) <= TOL64 * cond, label
        w, b = rng.standard_normal((5, 6, 3, 3)), rng.standard_normal(5)
        for layer, wt in (("after", w), ("before", rng.standard_normal((6, 2, 3)))):
            ref = fold((np.asarray(on.np(na.matrix)), on.np(na.shift)), wt, b if layer == "after" else None, layer=layer)
            res = fold(na, on(wt), on(b) if layer == "after" else None, layer=layer)
            assert_same_kind(res.weight, on(wt))
            assert _rel(on.np(res.weight), ref.weight) <= TOL64 and _rel(on.np(res.bias), ref.bias) <= TOL64, label
    assert seen == set(FOLDABLE)


def test_jax_jit():
    """fold and inference_affine are traceable: under jax.jit (the value checks are skipped there, as
    for every normref function) they give the eager results."""
    from normref.conformance.backends import get_backend

    b = get_backend("jax")
    if not b.available:
        pytest.skip(f"jax: {b.reason}")
    import jax

    rng = np.random.default_rng(8)
    rm, rc, w = rng.standard_normal(4), _spd(rng, 2, 2), rng.standard_normal((3, 4, 3, 3))
    for name in ("iter_norm", "decorrelated_batch_norm"):
        eager = fold(inference_affine(name, rm, rc, group_size=2), w, layer="after")
        jitted = jax.jit(lambda m, c, v: fold(inference_affine(name, m, c, group_size=2), v, layer="after"))(  # noqa: B023
            b.asarray(rm), b.asarray(rc), b.asarray(w))
        assert _rel(b.to_numpy(jitted.weight), eager.weight) <= TOL64 and _rel(b.to_numpy(jitted.bias), eager.bias) <= TOL64


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


_NORMS = {
    "bn": lambda rng, c: ("batch_norm", (rng.standard_normal(c), rng.uniform(0.3, 2, c), rng.standard_normal(c),
                                         rng.standard_normal(c)), {}),
    "dbn": lambda rng, c: ("decorrelated_batch_norm", (rng.standard_normal(c), _spd(rng, c // 2, 2),
                                                       rng.standard_normal(c), rng.standard_normal(c)),
                           dict(group_size=2)),
    "iter_norm": lambda rng, c: ("iter_norm", (rng.standard_normal(c), _spd(rng, c // 2, 2), None,
                                               rng.standard_normal(c)), dict(group_size=2, iterations=4)),
    "coloring": lambda rng, c: ("whitening_coloring", (rng.standard_normal(c), _spd(rng, c // 2, 2),
                                                       rng.standard_normal((c // 2, 2, 2)), rng.standard_normal(c)),
                                dict(group_size=2)),
}


@pytest.mark.parametrize("norm", sorted(_NORMS))
@pytest.mark.parametrize("kind", ["conv2d", "conv2d groups=2", "conv1d", "conv3d", "linear", "linear flattened"])
@pytest.mark.parametrize("layer", ["before", "after"])
def test_folded_layer_equals_the_pair(norm, kind, layer):
    """The folded layer's output equals layer → norm (or norm → layer) to float64 rounding, with
    torch's own convolution/linear as the engine (conv with padding, stride and groups before the
    norm; no zero padding after it)."""
    rng = np.random.default_rng(hash((norm, kind, layer)) % 2**32)
    c = 4
    name, args, kw = _NORMS[norm](rng, c)
    kw = dict(kw)
    cond = _kappa(args[1]) if args[1].ndim == 3 else 1.0
    na = inference_affine(name, *args, **kw)
    groups = 2 if "groups" in kind else 1
    run = lambda v: normref.get(name)(v, *args, **kw)  # noqa: E731  the norm's own inference call
    if kind.startswith("conv"):
        nd = int(kind[4])
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        ks = (3,) * nd if nd < 3 else (2, 1, 2)
        opts = dict(stride=2, padding=1, groups=groups) if layer == "before" else dict(stride=1, groups=groups)
        cin, cout = (6, c) if layer == "before" else (c, 6)
        x = rng.standard_normal((3, cin) + (5,) * nd)
        w, b = rng.standard_normal((cout, cin // groups) + ks), rng.standard_normal(cout)
        f = fold(na, w, b, layer=layer, groups=groups)
        assert f.weight.shape == w.shape and f.bias.shape == (cout,)
        if layer == "before":
            want = run(conv(_t(x), _t(w), _t(b), **opts).numpy())
        else:
            want = conv(_t(run(x)), _t(w), _t(b), **opts).numpy()
        got = conv(_t(x), _t(f.weight), _t(f.bias), **opts).numpy()
    elif kind == "linear":
        if layer == "before":  # Linear(7 → C) then the norm on (N, C)
            x, w = rng.standard_normal((9, 7)), rng.standard_normal((c, 7))
            f = fold(na, w, None, layer=layer)
            want, got = run(F.linear(_t(x), _t(w)).numpy()), F.linear(_t(x), _t(f.weight), _t(f.bias)).numpy()
        else:
            x, w, b = rng.standard_normal((9, c)), rng.standard_normal((5, c)), rng.standard_normal(5)
            f = fold(na, w, b, layer=layer)
            want, got = F.linear(_t(run(x)), _t(w), _t(b)).numpy(), F.linear(_t(x), _t(f.weight), _t(f.bias)).numpy()
    else:  # the norm on (N, C, 3, 2), flattened channel-major, then Linear(C·6 → 5)
        if layer == "before":
            pytest.skip("a linear layer before a norm on (N, C, *spatial) has no spatial axes")
        x, w, b = rng.standard_normal((5, c, 3, 2)), rng.standard_normal((5, c * 6)), rng.standard_normal(5)
        f = fold(na, w, b, layer=layer)
        want = F.linear(_t(run(x)).flatten(1), _t(w), _t(b)).numpy()
        got = F.linear(_t(x).flatten(1), _t(f.weight), _t(f.bias)).numpy()
    assert _rel(got, want) <= TOL64 * cond


def test_zero_padding_after_is_not_foldable():
    """Why the torch helper refuses a zero-padded convolution after a norm: the border differs."""
    rng = np.random.default_rng(5)
    name, args, kw = _NORMS["bn"](rng, 4)
    na = inference_affine(name, *args, **kw)
    x, w = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((3, 4, 3, 3))
    f = fold(na, w, None, layer="after")
    want = F.conv2d(_t(normref.batch_norm(x, *args)), _t(w), padding=1).numpy()
    got = F.conv2d(_t(x), _t(f.weight), _t(f.bias), padding=1).numpy()
    assert np.abs(got - want)[..., 1:-1, 1:-1].max() <= 1e-12 * np.abs(want).max()  # interior: exact
    assert np.abs(got - want).max() > 1e-3  # the zero-padded border: not the same map


# --------------------------------------------------------------------------------------------------
# the torch helper


def _model(dtype):
    from torch import nn

    from normref.backends import torch as nt

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nt.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nt.IterNorm2d(4, group_size=2), nn.ReLU(),
        nt.DecorrelatedBatchNorm2d(4, group_size=2), nn.Conv2d(4, 6, 1),          # folds into the conv after it
        nt.WhiteningColoring2d(6, group_size=3), nn.ReLU(),
        nn.Sequential(nn.Conv1d(6, 6, 1), nt.BatchWhitening1d(6, group_size=2, method="cholesky"),
                      nn.Conv1d(6, 6, 1), nt.InstanceNorm1d(6, affine=True, track_running_stats=True)),
        nt.BatchRenorm1d(6), nn.Flatten(), nn.Linear(6 * 16, 5),                   # renorm → flatten → linear
        nt.BatchNorm1d(5), nn.Linear(5, 4), nn.BatchNorm1d(4),                    # torch's own BN too
    ).to(dtype)


class _Reshape(torch.nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


def _trained(dtype):
    """The model after three SGD steps (non-trivial running statistics and parameters), in eval mode."""
    from torch import nn

    m = _model(dtype)
    # (N, 6, 4, 4) → (N, 6, 16) for the 1-d layers
    layers = list(m)
    layers.insert(10, _Reshape(6, 16))
    layers.append(nn.Sequential())  # an empty container: nothing to fold, no error
    m = nn.Sequential(*layers)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4, generator=g, dtype=dtype) * 2 + 0.5
        loss = (m(x) - 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_torch_fold_model_float64():
    from torch import nn

    from normref.backends import torch as nt

    m = _trained(torch.float64)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
        before = [type(k) for k in m.modules()]
        f = nt.fold(m, example_input=x)  # the shapes show both Linear → BatchNorm1d pairs see (N, C)
        got = f(x)
        # without them those two pairs are left (a Linear mixes the last axis): 7 folded
        f0 = nt.fold(m)
        got0 = f0(x)
    assert f0.normref_folded == 7
    assert [type(k) for k in m.modules()] == before  # the original is left as it was
    assert f.normref_folded == 9
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nt.StatefulNorm)
    assert not any(isinstance(k, norm_types) for k in f.modules())  # every norm folded
    # κ of the whitening layers' Σ̂ + εI enters as in the pure test
    conds = [float(np.max(np.linalg.cond(k.running_cov.numpy()))) for k in m.modules() if hasattr(k, "running_cov")]
    assert _rel(got.numpy(), want.numpy()) <= TOL64 * max(conds)
    assert _rel(got0.numpy(), want.numpy()) <= TOL64 * max(conds)
    # the folded model is a model: its parameters train
    f.train()
    f(x).sum().backward()


def test_torch_fold_model_float32_and_matches_torch_fuse():
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from normref.backends import torch as nt

    m = _trained(torch.float32)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = m(x), nt.fold(m, example_input=x)(x)
    assert _rel(got.numpy(), want.numpy()) <= 2e3 * float(np.finfo(np.float32).eps)
    # an external oracle for batch norm: torch's fuse_conv_bn_eval on the same pair
    conv, bn = nn.Conv2d(3, 4, 3, padding=1).eval(), nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    theirs = fuse_conv_bn_eval(conv, bn)
    ours = nt.fold(nn.Sequential(conv, bn))
    assert ours.normref_folded == 1 and isinstance(ours[1], nn.Identity)
    # both are W·γ/√(σ̂² + ε) rounded once to float32 (torch computes in float32: a few ε₃₂)
    e32 = float(np.finfo(np.float32).eps)
    assert _rel(ours[0].weight.detach().numpy(), theirs.weight.detach().numpy()) <= 8 * e32
    assert _rel(ours[0].bias.detach().numpy(), theirs.bias.detach().numpy()) <= 8 * e32
    assert ours[0].weight.dtype == torch.float32


@pytest.mark.parametrize("method,kw", [("lp_batch_norm", dict(p=1.0)), ("mean_only_batch_norm", {}),
                                       ("ghost_batch_norm", dict(virtual_batch_size=4)),
                                       ("batch_group_norm", dict(num_groups=2)), ("blended_batch_norm", {})])
def test_torch_fold_stateful_layers(method, kw):
    """Every StatefulNorm layer of a foldable per-channel method folds into the convolution before it."""
    from torch import nn

    from normref.backends import torch as nt

    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nt.StatefulNorm(method, 4, **kw)).double()
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    for _ in range(2):  # training-mode steps update the running statistics
        m(x)
    m.eval()
    with torch.no_grad():
        f = nt.fold(m)
        assert f.normref_folded == 1 and isinstance(f[1], nn.Identity)
        assert _rel(f(x).numpy(), m(x).numpy()) <= TOL64


def test_torch_fold_leaves_what_does_not_fold():
    from torch import nn

    from normref.backends import torch as nt

    cases = {
        "zero-padded conv after the norm": nn.Sequential(nt.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1)),
        "training mode": nn.Sequential(nn.Conv2d(4, 4, 1), nt.BatchNorm2d(4).train()),
        "no running statistics": nn.Sequential(nn.Conv2d(4, 4, 1), nt.BatchNorm2d(4, track_running_stats=False)),
        "whitening group across conv groups": nn.Sequential(nn.Conv2d(4, 4, 1, groups=4),
                                                            nt.DecorrelatedBatchNorm2d(4, group_size=2)),
        "per-sample statistics (IN)": nn.Sequential(nn.Conv2d(4, 4, 1), nt.InstanceNorm2d(4)),
        "batch whitening, instance partition": nn.Sequential(
            nn.Conv2d(4, 4, 1), nt.BatchWhitening2d(4, group_size=2, partition="instance")),
        "group norm": nn.Sequential(nn.Conv2d(4, 4, 1), nt.GroupNorm(2, 4)),
    }
    for label, m in cases.items():
        m = m.double()
        if label != "training mode":
            m.eval()
        else:
            m[0].eval()
        f = nt.fold(m)
        assert f.normref_folded == 0, label
        assert [type(k) for k in f.modules()] == [type(k) for k in m.modules()], label
    # replicate padding after a norm commutes with the affine map: folded, and exact
    m = nn.Sequential(nt.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1, padding_mode="replicate")).double()
    with torch.no_grad():
        m[0].running_mean.uniform_(-1, 1)
        m[0].running_var.uniform_(0.5, 2)
    m.eval()
    f = nt.fold(m, inplace=True)
    assert f is m and f.normref_folded == 1 and isinstance(m[0], nn.Identity)


def _stats(norm):
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    return norm


def test_torch_fold_linear_only_on_the_channel_axis():
    """A Linear mixes the LAST axis; next to a norm it is folded only where that is the norm's
    channel axis: an (N, C) input shown by example_input, or norm → Flatten → Linear."""
    from torch import nn

    from normref.backends import torch as nt

    torch.manual_seed(6)
    bn1, bn2 = (lambda: _stats(nt.BatchNorm1d(4))), (lambda: _stats(nt.BatchNorm2d(4)))
    # valid torch models whose Linear acts on a spatial axis: folding them changed outputs by O(1)
    wrong = {
        "Linear(5→4) on (N,4,3,5) → BN2d": (nn.Sequential(nn.Linear(5, 4), bn2()), (2, 4, 3, 5)),
        "BN2d on (N,4,3,4) → Linear(4→3)": (nn.Sequential(bn2(), nn.Linear(4, 3)), (2, 4, 3, 4)),
        "BN1d on (N,4,8) → Linear(8→3)": (nn.Sequential(bn1(), nn.Linear(8, 3)), (2, 4, 8)),
        "Linear(8→4) on (N,4,8) → BN1d (out_features = C)": (nn.Sequential(nn.Linear(8, 4), bn1()), (2, 4, 8)),
        "BN1d on (N,4,4) → Linear(4→3) (in_features = C)": (nn.Sequential(bn1(), nn.Linear(4, 3)), (2, 4, 4)),
        "OnlineNorm on (N,4,4) → Linear(4→3)": (nn.Sequential(nt.OnlineNorm(4), nn.Linear(4, 3)), (2, 4, 4)),
    }
    for label, (m, shape) in wrong.items():
        m = m.double().eval()
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            for f in (nt.fold(m), nt.fold(m, example_input=x), nt.fold(m, example_input=(x,))):
                assert f.normref_folded == 0, label
                assert torch.equal(f(x), m(x)), label
    # (N, C): folded once example_input shows it, before and after; float64 rounding (TOL64)
    right = {
        "Linear(7→4) → BN1d": (nn.Sequential(nn.Linear(7, 4), bn1(), nn.ReLU()), (9, 7)),
        "BN1d → Linear(4→3)": (nn.Sequential(nn.ReLU(), bn1(), nn.Linear(4, 3)), (9, 4)),
        "Linear(7→4) → PowerNorm": (nn.Sequential(nn.Linear(7, 4), nt.PowerNorm(4)), (9, 7)),
    }
    with torch.no_grad():
        right["Linear(7→4) → PowerNorm"][0][1].running_mean_square.uniform_(0.5, 2)
    for label, (m, shape) in right.items():
        m = m.double().eval()
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            assert nt.fold(m).normref_folded == 0, label  # no shapes known: not provable, left
            f = nt.fold(m, example_input=x)
            assert f.normref_folded == 1, label
            assert _rel(f(x).numpy(), m(x).numpy()) <= TOL64, label
    # norm → Flatten → Linear: channel-major features; no example needed
    m = nn.Sequential(bn2(), nn.Flatten(), nn.Linear(4 * 6, 3)).double().eval()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        for f in (nt.fold(m), nt.fold(m, example_input=x)):
            assert f.normref_folded == 1 and _rel(f(x).numpy(), m(x).numpy()) <= TOL64
    # an instance norm also takes unbatched (C, L) inputs (channel axis 0), so even Flatten → Linear is
    # not provable without shapes; the example shows which
    def inorm_flat(features):
        m = nn.Sequential(nt.InstanceNorm1d(4, affine=True, track_running_stats=True), nn.Flatten(),
                          nn.Linear(features, 3)).double().eval()
        with torch.no_grad():
            m[0].running_mean.uniform_(-1, 1)
        return m

    m, x = inorm_flat(4 * 4), torch.randn(2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert nt.fold(m).normref_folded == 0
        f = nt.fold(m, example_input=x)  # batched (N, C, L)
        assert f.normref_folded == 1 and _rel(f(x).numpy(), m(x).numpy()) <= TOL64
        m = inorm_flat(4)  # unbatched (C, L) = (4, 4): Flatten(1) keeps it, the Linear mixes L
        assert nt.fold(m, example_input=x[0]).normref_folded == 0
    # the example call runs on a copy: a training-mode layer of the model keeps its buffers
    m = nn.Sequential(nn.Linear(7, 4), bn1(), nn.Linear(4, 4), nt.BatchNorm1d(4)).double().eval()
    m[3].train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f = nt.fold(m, inplace=True, example_input=torch.randn(9, 7, dtype=torch.float64))
    assert f is m and f.normref_folded == 1 and isinstance(m[1], nn.Identity)
    assert torch.equal(m[3].running_mean, before["3.running_mean"]) and int(m[3].num_batches_tracked) == 0
    with pytest.raises(TypeError, match="fold: example_input must be a torch.Tensor"):
        nt.fold(m, example_input=[x])


@pytest.mark.parametrize("layer", ["online", "power pn", "power pn-v"])
def test_torch_fold_online_and_power_norm(layer):
    """OnlineNorm / PowerNorm (backward-state layers) fold like the StatefulNorm ones: eval mode is
    by their running statistics (batch norm / scaling only); float64 rounding, TOL64."""
    from torch import nn

    from normref.backends import torch as nt

    torch.manual_seed(7)
    norm = nt.OnlineNorm(4) if layer == "online" else nt.PowerNorm(4, variant=layer.split()[1])
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for _ in range(2):  # training steps: the forward's statistics and the backward's state move
        m(x * 2 + 0.5).square().sum().backward()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    m.eval()
    with torch.no_grad():
        f = nt.fold(m)
        assert f.normref_folded == 1 and isinstance(f[1], nn.Identity)
        assert _rel(f(x).numpy(), m(x).numpy()) <= TOL64


def test_device_follows_the_statistics():
    """Every array fold / inference_affine makes is on the inputs' device (torch 'meta': shapes and
    devices only, no data), including power norm's shift and a bias-less layer's bias."""
    from torch import nn

    from normref.backends import torch as nt

    meta = dict(dtype=torch.float64, device="meta")
    rm, rv = torch.zeros(4, **meta), torch.ones(4, **meta)
    for na in (inference_affine("batch_norm", rm, rv), inference_affine("mean_only_batch_norm", rm, rm),
               inference_affine("power_norm", running_mean_square=rv)):
        assert na.matrix.device.type == "meta" and na.shift.device.type == "meta"
        for w, side in ((torch.ones(3, 4, 3, 3, **meta), "after"), (torch.ones(4, 2, 3, **meta), "before"),
                        (torch.ones(3, 4, **meta), "after")):
            res = fold(na, w, None, layer=side)
            assert res.weight.device.type == "meta" and res.bias.device.type == "meta"
    m = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False, **meta), nt.BatchNorm2d(4, **meta)).eval()
    f = nt.fold(m)
    assert f.normref_folded == 1 and f[0].bias.device.type == "meta"


# --------------------------------------------------------------------------------------------------
# bad input: a clear error naming the function and the argument, before any work


def test_bad_input():
    rng = np.random.default_rng(0)
    rm, rv, w = rng.standard_normal(4), rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    rc = _spd(rng, 2, 2)
    na = inference_affine("batch_norm", rm, rv, w)
    wt = rng.standard_normal((3, 4, 3, 3))
    cases = [
        (ValueError, "inference_affine: method", lambda: inference_affine("layer_norm", (4,))),
        (ValueError, "unknown method", lambda: inference_affine(3)),
        (ValueError, "training=True", lambda: inference_affine("batch_norm", rm, rv, training=True)),
        (ValueError, "use_input_stats=True", lambda: inference_affine("instance_norm", rm, rv)),
        (TypeError, "training", lambda: inference_affine("batch_norm", rm, rv, training=1)),
        (ValueError, "running_mean and running_var", lambda: inference_affine("batch_norm", None, rv)),
        (ValueError, "running_var must be nonnegative", lambda: inference_affine("batch_norm", rm, -rv)),
        # eps = 0 refused as the per-channel methods refuse it; a positive eps lost to float32 rounding
        # (σ̂² = 0, eps = 1e-60 → √(0 + eps) = 0 in float32) still gives the zero-spread error
        (ValueError, "inference_affine: eps must be a finite number > 0", lambda: inference_affine("batch_norm", rm, rv,
                                                                                                    eps=0.0)),
        (ValueError, "eps must be a finite number > 0", lambda: inference_affine("power_norm", rv, eps=0.0)),
        (ValueError, "running_var + eps must be positive", lambda: inference_affine(
            "batch_norm", rm.astype(np.float32), 0 * rv.astype(np.float32), eps=1e-60)),
        (ValueError, "weight must be shape (4,)", lambda: inference_affine("batch_norm", rm, rv, w[:3])),
        (ValueError, "eps", lambda: inference_affine("batch_norm", rm, rv, eps=-1.0)),
        (TypeError, "without input", lambda: inference_affine("batch_norm", rm, rv, input=rm)),
        (TypeError, "batch_norm:", lambda: inference_affine("batch_norm", rm, rv, bogus=1)),
        (TypeError, "running_mean must be an array", lambda: inference_affine("batch_norm", [0.0] * 4, rv)),
        (ValueError, "partition='instance'", lambda: inference_affine("batch_whitening", rm, rc, group_size=2,
                                                                       partition="instance")),
        (ValueError, "running_cov must have shape", lambda: inference_affine("decorrelated_batch_norm", rm, rc)),
        (ValueError, "running_mean and running_cov", lambda: inference_affine("iter_norm", rm, None, group_size=2)),
        (ValueError, "running_cov", lambda: inference_affine("decorrelated_batch_norm", rm, -rc, group_size=2)),
        (ValueError, "weight must have shape (2, 2, 2)", lambda: inference_affine("whitening_coloring", rm, rc, w,
                                                                                  group_size=2)),
        (ValueError, "fold: layer", lambda: fold(na, wt, layer="middle")),
        (ValueError, "fold: groups", lambda: fold(na, wt, groups=0)),
        (ValueError, "groups=2 must divide", lambda: fold(na, wt, groups=2, layer="before")),
        (ValueError, "output channels weight.shape[0] = the norm's channels 4", lambda: fold(na, wt, layer="before")),
        (ValueError, "groups·weight.shape[1]", lambda: fold(na, rng.standard_normal((3, 2, 1)), layer="after")),
        (ValueError, "bias must have shape (3,)", lambda: fold(na, wt, np.zeros(4), layer="after")),
        (ValueError, "a multiple of the norm's channels 4", lambda: fold(na, rng.standard_normal((3, 6)), layer="after")),
        (ValueError, "takes groups=1", lambda: fold(na, rng.standard_normal((4, 4)), groups=2)),
        (ValueError, "weight must be a linear", lambda: fold(na, np.zeros(4))),
        (ValueError, "mix convolution groups", lambda: fold(inference_affine("decorrelated_batch_norm", rm, rc,
                                                                             group_size=2),
                                                            rng.standard_normal((4, 1, 3)), layer="before", groups=4)),
        (ValueError, "mix convolution groups", lambda: fold(inference_affine("decorrelated_batch_norm", rm, rc,
                                                                             group_size=2),
                                                            rng.standard_normal((4, 1, 3)), layer="after", groups=4)),
        (ValueError, "matrix (G, d, d)", lambda: fold((np.zeros((4, 1, 2)), np.zeros(4)), wt)),
        (TypeError, "norm must be a NormAffine", lambda: fold(np.zeros(4), wt)),
        (TypeError, "'method' key", lambda: fold({"running_mean": rm}, wt)),
        (TypeError, "weight is a torch", lambda: fold(na, torch.zeros(3, 4, 3, 3, dtype=torch.float64), layer="after")),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc) as info:
            call()
        assert msg in str(info.value), (msg, str(info.value))
    # a mapping is the inference call's arguments
    f1 = fold({"method": "batch_norm", "running_mean": rm, "running_var": rv, "weight": w}, wt, layer="after")
    f2 = fold(na, wt, layer="after")
    assert np.array_equal(f1.weight, f2.weight) and np.array_equal(f1.bias, f2.bias)
    from normref.backends import torch as nt

    with pytest.raises(TypeError, match="fold: model must be a torch.nn.Module"):
        nt.fold(np.zeros(3))
    with pytest.raises(TypeError, match="fold: inplace must be a bool"):
        nt.fold(torch.nn.Sequential(), inplace=1)
