"""normref.backends.torch: registry-generated autograd Functions, drop-in layers, second order.

Every registered method is checked with ``torch.autograd.gradcheck`` and ``gradgradcheck`` in float64
on examples drawn from its own ``examples(rng)`` (so methods registered later are covered without
editing this file). Tolerances are torch's gradcheck defaults for float64 (atol=1e-5, rtol=1e-3 on
central differences with step 1e-6: truncation ~1e-12·|f'''|, round-off ~ε/1e-6 ≈ 2e-10), never
loosened here.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normref  # noqa: E402
from normref.backends import torch as nt  # noqa: E402
from normref.backends.torch import _function as _fn  # noqa: E402

F = torch.nn.functional
_GradcheckError = __import__("sys").modules["torch.autograd.gradcheck"].GradcheckError
DT = torch.float64


# --------------------------------------------------------------------------------------------------
# the registry-driven gradcheck / gradgradcheck matrix
# --------------------------------------------------------------------------------------------------
MAX_PER_METHOD = 3  # keeps the file fast; every method is checked at least once


def _cases():
    out = []
    for m in normref.methods():
        if m.examples is None:
            out.append(pytest.param(m.name, None, id=f"{m.name}-no-examples"))
            continue
        exs = list(m.examples(np.random.default_rng(7)))
        picked = list(range(min(MAX_PER_METHOD, len(exs))))
        # also one call whose output is a NamedTuple (the auxiliary-state path), if the method has one
        for i, ex in enumerate(exs):
            if i not in picked and isinstance(m(*ex.args, **ex.kwargs), tuple):
                picked.append(i)
                break
        out += [pytest.param(m.name, i, id=f"{m.name}-{i}-{exs[i].label}") for i in picked]
    return out


def _to_torch(v):
    return torch.tensor(v, dtype=DT) if isinstance(v, np.ndarray) else v


def _checked_function(m, ex):
    """(fn, leaves): fn(*leaves) is the primary output of the wrapped method, leaves its differentiable
    arguments. For a method with stop-gradient constants (``fd_target``), the value fn returns is the
    frozen function's (so gradcheck's finite differences measure what the analytic backward computes)
    while its derivative is the wrapper's: y_f.detach() + (y − y.detach()) has the value of y_f (the
    bracket is exactly 0) and the gradient of y."""
    bound = m.bind(*ex.args, **ex.kwargs)
    args = {k: _to_torch(v) for k, v in bound.arguments.items()}
    diff = [p for p in m.diff_params if args.get(p) is not None]
    leaves = tuple(args[p].clone().requires_grad_(True) for p in diff)
    f = nt.function(m)
    frozen = None
    if m.fd_target is not None:
        b0 = inspect.BoundArguments(m.signature, dict(args))
        frozen = m.fd_target(b0.args, b0.kwargs)

    def fn(*xs):
        a = dict(args)
        a.update(zip(diff, xs))
        b = inspect.BoundArguments(m.signature, a)
        y = m.primary(f(*b.args, **b.kwargs))
        if frozen is not None:
            yf = m.primary(frozen(*b.args, **b.kwargs))
            return yf.detach() + (y - y.detach())
        return y

    return fn, leaves


def _fast_mode_ok(fn, leaves) -> bool:
    """gradgradcheck's fast mode (random projections) is used for the larger examples, except when a
    first derivative is a constant that does not require grad (d/dweight = 0 in gradient
    centralization): torch's fast mode then pairs the projections with the wrong outputs and reports a
    mismatch that slow mode (full Jacobians) does not — reproduced with a plain torch Function."""
    if sum(x.numel() for x in leaves) <= 40:
        return False
    y = fn(*leaves)
    go = torch.randn_like(y, requires_grad=True)
    gs = torch.autograd.grad(y, leaves, go, create_graph=True, allow_unused=True)
    return all(g is not None and g.requires_grad for g in gs)


@pytest.mark.parametrize("name,index", _cases())
def test_gradcheck_and_gradgradcheck(name, index):
    m = normref.get(name)
    if index is None:
        pytest.fail(f"{name} registers no examples: the adapters cannot be checked on it")
    ex = list(m.examples(np.random.default_rng(7)))[index]
    fn, leaves = _checked_function(m, ex)
    assert leaves, f"{name}: example {ex.label!r} has no differentiable argument"
    assert torch.autograd.gradcheck(fn, leaves, raise_exception=True)
    assert torch.autograd.gradgradcheck(fn, leaves, raise_exception=True, fast_mode=_fast_mode_ok(fn, leaves))


def test_every_registered_method_is_exposed():
    for m in normref.methods():
        f = getattr(nt, m.name)
        assert f is nt.function(m.name) and f.method is m
        assert inspect.signature(f) == m.signature


# --------------------------------------------------------------------------------------------------
# second order: right, or caught
# --------------------------------------------------------------------------------------------------
def _gn_case():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, dtype=DT, generator=g).requires_grad_()
    w = torch.randn(4, dtype=DT, generator=g).requires_grad_()
    b = torch.randn(4, dtype=DT, generator=g).requires_grad_()
    return x, w, b


def test_second_order_without_recompute_is_caught(monkeypatch):
    """The prototype's bug (residuals saved as non-differentiable outputs, so create_graph
    differentiates the backward through constants) gives wrong second derivatives without any error;
    gradgradcheck must catch it — this proves the matrix above can fail."""
    x, w, b = _gn_case()
    fn = lambda x, w, b: nt.group_norm(x, 2, w, b)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    monkeypatch.setattr(_fn, "_RECOMPUTE_FOR_SECOND_ORDER", False)
    with pytest.raises(_GradcheckError):
        torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda x, w, b: nt.group_norm(x, 2, w, b), lambda x, w, b: F.group_norm(x, 2, w, b)),
        (lambda x, w, b: nt.layer_norm(x, (5,)) * w[:, None] + b[:, None],
         lambda x, w, b: F.layer_norm(x, (5,)) * w[:, None] + b[:, None]),
        (lambda x, w, b: nt.batch_norm(x, None, None, w, b, True),
         lambda x, w, b: F.batch_norm(x, None, None, w, b, True)),
        (lambda x, w, b: nt.instance_norm(x, None, None, w, b), lambda x, w, b: F.instance_norm(x, None, None, w, b)),
    ],
    ids=["group_norm", "layer_norm", "batch_norm", "instance_norm"],
)
def test_second_derivatives_match_torch(ours, theirs):
    """Hessian-vector products (the double backward) against torch's own double-differentiable
    kernels: agreement to 1e-12 relative (both are exact up to round-off of O(n) sums)."""
    x, w, b = _gn_case()
    g = torch.Generator().manual_seed(5)
    cot = torch.randn(3, 4, 5, dtype=DT, generator=g)
    vs = [torch.randn(t.shape, dtype=DT, generator=g) for t in (x, w, b)]
    res = []
    for f in (ours, theirs):
        grads = torch.autograd.grad((f(x, w, b) * cot).sum(), (x, w, b), create_graph=True)
        s = sum((gi * vi).sum() for gi, vi in zip(grads, vs))
        hv = torch.autograd.grad(s, (x, w, b), allow_unused=True)  # b enters linearly: no Hessian
        res.append([torch.zeros_like(t) if h is None else h for h, t in zip(hv, (x, w, b))])
    assert res[1][0].abs().max().item() > 1e-3  # a real second derivative in x, not a silent zero
    for a, t in zip(*res):
        assert (a - t).abs().max().item() <= 1e-12 * max(t.abs().max().item(), 1.0)


# --------------------------------------------------------------------------------------------------
# needs_input_grad, auxiliary outputs, errors, torch.func
# --------------------------------------------------------------------------------------------------
def test_needs_input_grad_is_honoured(monkeypatch):
    m = normref.get("group_norm")
    calls = []
    inner = m._backward
    monkeypatch.setattr(m, "_backward", lambda res, c: calls.append(1) or inner(res, c))
    x, w, b = _gn_case()
    xd, wd = x.detach(), w.detach()
    # only the bias asks for a gradient: the others come back as None
    y = nt.group_norm(xd, 2, wd, b)
    (gb,) = torch.autograd.grad(y.sum(), (b,))
    assert torch.allclose(gb, torch.full_like(gb, 15.0), rtol=0, atol=1e-12)  # Σ over N·L = 3·5
    assert len(calls) == 1
    # nothing differentiable requires grad: no graph, no backward
    y = nt.group_norm(xd, 2, wd, b.detach())
    assert not y.requires_grad and len(calls) == 1


def test_auxiliary_outputs_are_state_not_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, dtype=DT, generator=g).requires_grad_()
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    out = nt.batch_norm(x, rm, rv, None, None, True, 0.2)
    assert type(out).__name__ == "NormResult"
    assert out.output.requires_grad and not out.running_mean.requires_grad and not out.running_var.requires_grad
    ref = normref.batch_norm(x.detach().numpy(), rm.numpy(), rv.numpy(), None, None, True, 0.2)
    for a, r in zip(out, ref):
        np.testing.assert_allclose(a.detach().numpy(), r, rtol=0, atol=1e-14)
    assert torch.equal(rm, torch.zeros(3, dtype=DT))  # pure: the given statistics are untouched
    out.output.pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    F.batch_norm(xr, torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT), None, None, True, 0.2).pow(2).sum().backward()
    assert (x.grad - xr.grad).abs().max().item() <= 1e-12


def test_non_tensor_array_argument_raises():
    with pytest.raises(TypeError, match=r"group_norm: weight must be a torch.Tensor or None; got ndarray"):
        nt.group_norm(torch.zeros(2, 4, dtype=DT), 2, np.ones(4))


def test_torch_func_grad_and_vmap():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 4, dtype=DT, generator=g)
    w, b = torch.randn(6, dtype=DT, generator=g), torch.randn(6, dtype=DT, generator=g)
    gx = torch.func.grad(lambda x: nt.group_norm(x, 2, w, b).pow(2).sum())(x)
    xr = x.clone().requires_grad_()
    F.group_norm(xr, 2, w, b).pow(2).sum().backward()
    assert (gx - xr.grad).abs().max().item() <= 1e-12
    yv = torch.func.vmap(lambda x: nt.layer_norm(x, (4,)))(x)
    assert (yv - F.layer_norm(x, (4,))).abs().max().item() <= 1e-14


# --------------------------------------------------------------------------------------------------
# drop-in layers
# --------------------------------------------------------------------------------------------------
LAYERS = [
    ("BatchNorm1d", (4,), {}, (6, 4)),
    ("BatchNorm1d", (4,), {"momentum": None}, (6, 4, 3)),
    ("BatchNorm2d", (3,), {"affine": False}, (4, 3, 2, 3)),
    ("BatchNorm3d", (2,), {"track_running_stats": False}, (3, 2, 2, 2, 2)),
    ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 5)),
    ("InstanceNorm2d", (3,), {}, (2, 3, 3, 2)),
    ("InstanceNorm3d", (2,), {"affine": True}, (2, 2, 2, 3, 2)),
    ("LayerNorm", ((3, 4),), {}, (2, 3, 4)),
    ("LayerNorm", (4,), {"bias": False, "eps": 1e-3}, (5, 4)),
    ("GroupNorm", (2, 4), {}, (3, 4, 5)),
    ("RMSNorm", ((2, 3),), {}, (4, 2, 3)),
    ("RMSNorm", (3,), {"eps": 1e-4, "elementwise_affine": False}, (4, 3)),
]


@pytest.mark.parametrize("cls,args,kwargs,shape", LAYERS, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(LAYERS)])
def test_layer_is_a_drop_in(cls, args, kwargs, shape):
    """Same state_dict keys, same outputs, gradients and buffer updates as torch's layer, in training
    (three steps, so running statistics accumulate) and in eval mode; float64, 1e-12 (round-off of
    O(n) sums)."""
    ours = getattr(nt, cls)(*args, **kwargs, dtype=DT)
    theirs = getattr(torch.nn, cls)(*args, **kwargs, dtype=DT)
    assert isinstance(ours, getattr(torch.nn, cls))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():  # non-trivial affine parameters
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.uniform_(0.5, 1.5)
            q.copy_(p)
    g = torch.Generator().manual_seed(11)
    for mode in ("train", "train", "train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = torch.randn(*shape, dtype=DT, generator=g) * 2 + 0.5
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert (ya - yb).abs().max().item() <= 1e-12
        cot = torch.randn(*ya.shape, dtype=DT, generator=g)
        ga = torch.autograd.grad(ya, [xa, *ours.parameters()], cot)
        gb = torch.autograd.grad(yb, [xb, *theirs.parameters()], cot)
        for a, b in zip(ga, gb):
            assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())
        for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert (a.double() - b.double()).abs().max().item() <= 1e-12, k
    theirs.load_state_dict(ours.state_dict())  # the keys and shapes interchange both ways
    ours.load_state_dict(theirs.state_dict())


def _small_net(lib):
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), lib.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), lib.GroupNorm(2, 4), nn.ReLU(),
        lib.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Flatten(),
        nn.Linear(64, 8), lib.LayerNorm(8), nn.Tanh(), lib.RMSNorm(8),
        lib.BatchNorm1d(8, momentum=None), nn.Linear(8, 2),
    ).double()


def _train(lib, steps=200):
    model = _small_net(lib)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 3, 4, 4, generator=g, dtype=DT)
    Y = torch.randn(64, 2, generator=g, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for s in range(steps):
        i = (s * 16) % 64
        loss = ((model(X[i : i + 16]) - Y[i : i + 16]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        ev = model(X)
    return np.array(losses), model.state_dict(), ev


def test_training_run_follows_torch_loss_curve():
    """200 SGD-momentum steps of a small conv net with every drop-in layer, float64, same seed: the
    loss curves agree to 1e-8 (the two implementations differ by round-off, ~1e-16 per step, which
    training amplifies; measured: ~1e-10). Parameters, buffers (num_batches_tracked included) and
    eval-mode outputs agree to 1e-8 too."""
    la, sa, ea = _train(torch.nn)
    lb, sb, eb = _train(nt)
    assert la[-1] < 0.5 * la[0]  # it trains
    assert np.max(np.abs(la - lb)) <= 1e-8
    assert list(sa) == list(sb)
    for k in sa:
        assert (sa[k].double() - sb[k].double()).abs().max().item() <= 1e-8, k
    assert (ea - eb).abs().max().item() <= 1e-8


def test_generic_norm_layer():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, dtype=DT, generator=g)
    layer = nt.Norm("pixel_norm", eps=1e-3)
    assert torch.allclose(layer(x), torch.as_tensor(normref.pixel_norm(x.numpy(), eps=1e-3)), rtol=0, atol=1e-14)
    with pytest.raises(TypeError, match="weight is an array argument"):
        nt.Norm("group_norm", weight=torch.ones(3))


def test_local_response_norm_is_a_drop_in():
    """Same constructor, same (empty) state_dict, outputs and gradients as torch.nn.LocalResponseNorm
    (float64, 1e-13: both are a window sum of ≤ size squares and one power)."""
    g = torch.Generator().manual_seed(12)
    for args in [(3,), (2, 1e-2, 0.5, 2.0), (4, 0.3, 0.75, 1.0)]:
        ours, theirs = nt.LocalResponseNorm(*args), torch.nn.LocalResponseNorm(*args)
        assert isinstance(ours, torch.nn.LocalResponseNorm) and repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict()) == []
        for shape in [(2, 5, 3), (2, 6, 3, 2)]:
            x = torch.randn(*shape, dtype=DT, generator=g) * 2
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            assert (ya - yb).abs().max().item() <= 1e-13
            cot = torch.randn(*shape, dtype=DT, generator=g)
            (ga,), (gb,) = torch.autograd.grad(ya, xa, cot), torch.autograd.grad(yb, xb, cot)
            assert (ga - gb).abs().max().item() <= 1e-13 * max(1.0, gb.abs().max().item())


# --------------------------------------------------------------------------------------------------
# layers generated from the registry: parameters and running statistics as buffers
# --------------------------------------------------------------------------------------------------
# (layer, num_features, options, input shape); small, so that every check stays well under a second
STATEFUL = [
    ("BatchWhitening2d", 4, {"group_size": 2}, (6, 4, 2, 2)),
    ("BatchWhitening", 4, {"method": "cholesky", "momentum": None}, (8, 4)),
    ("DecorrelatedBatchNorm", 4, {"group_size": 2}, (8, 4, 3)),
    ("IterNorm", 4, {"momentum": None, "iterations": 3}, (8, 4)),
    ("WhiteningColoring1d", 4, {"group_size": 2}, (8, 4, 2)),
    ("BatchRenorm2d", 3, {"momentum": 0.3}, (5, 3, 2, 2)),
    ("GhostBatchNorm1d", 3, {"virtual_batch_size": 4}, (8, 3)),
    ("SwitchableNorm2d", 3, {}, (4, 3, 2, 3)),
    ("LpBatchNorm", 3, {"p": 1.0, "momentum": None}, (8, 3, 2)),
    ("MeanOnlyBatchNorm1d", 3, {}, (6, 3, 2)),
    ("BatchGroupNorm", 4, {"num_groups": 2, "batch_groups": 2}, (8, 4, 3)),
    ("BatchInstanceNorm2d", 3, {}, (4, 3, 2, 3)),
    ("FilterResponseNorm2d", 3, {}, (2, 3, 3, 3)),
]
_IDS = [f"{c}-{i}" for i, (c, *_) in enumerate(STATEFUL)]


def _make(cls, c, kw, **more):
    layer = getattr(nt, cls)(c, dtype=DT, **kw, **more)
    with torch.no_grad():  # non-trivial parameters (kept valid: ρ in [0, 1], Γ near the identity)
        g = torch.Generator().manual_seed(21)
        for p in layer.parameters():
            p.add_(0.3 * torch.rand(p.shape, dtype=DT, generator=g))
        if getattr(layer, "rho", None) is not None:
            layer.rho.sub_(0.5)
    return layer


def _by_hand(layer, x, state, training, k):
    """The functional call the layer must make: its parameters, the given state, num_batches_tracked=k."""
    kw = {p: getattr(layer, p) for p in layer._static_names}
    if layer._flag is not None:
        kw[layer._flag] = training
    kw.update({p: getattr(layer, p) for p in layer._param_names})
    kw.update(state)
    if "num_batches_tracked" in normref.get(layer.normref_method).signature.parameters and state:
        kw["num_batches_tracked"] = k
    return nt.function(layer.normref_method)(x, **kw)


@pytest.mark.parametrize("cls,c,kw,shape", STATEFUL, ids=_IDS)
def test_stateful_layer_updates_its_buffers_exactly_as_the_functional_api(cls, c, kw, shape):
    """Three training steps then eval: outputs and buffers are bit-for-bit those of calling the
    functional API by hand with the state threaded through (the same arithmetic, so no tolerance);
    eval uses the buffers and leaves them alone; num_batches_tracked counts training steps."""
    layer = _make(cls, c, kw)
    state = {p: getattr(layer, p).clone() for p in layer._state_names}
    assert all(not getattr(layer, p).requires_grad for p in layer._state_names)
    g = torch.Generator().manual_seed(22)
    for k in range(3):
        x = torch.randn(*shape, dtype=DT, generator=g) * 1.5 + 0.5
        y = layer(x)
        ref = _by_hand(layer, x, state, True, k)
        if state:
            assert isinstance(ref, tuple)
            state = {p: getattr(ref, p) for p in layer._state_names}
            ref = ref[0]
        assert torch.equal(y, ref)
        for p, v in state.items():
            assert torch.equal(getattr(layer, p), v), p
        if layer._counts:
            assert int(layer.num_batches_tracked) == k + 1
    if state:  # something was learned: the buffers moved from their initial values
        fresh = getattr(nt, cls)(c, dtype=DT, **kw)
        assert any(not torch.equal(getattr(layer, p), getattr(fresh, p)) for p in state)
    layer.eval()
    x = torch.randn(*shape, dtype=DT, generator=g)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    assert torch.equal(y, _by_hand(layer, x, state, False, 3))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("cls,c,kw,shape", STATEFUL, ids=_IDS)
def test_stateful_layer_state_dict_round_trip(cls, c, kw, shape):
    """The keys are the method's array arguments (parameters, then running statistics, then
    num_batches_tracked); a trained layer's state_dict loaded into a fresh one reproduces its eval
    outputs exactly; affine=False / track_running_stats=False drop the matching entries, as in torch."""
    layer = _make(cls, c, kw)
    m = normref.get(layer.normref_method)
    expected = [p for p in m.array_params[1:] if p not in m.nondiff] + [p for p in m.array_params if p in m.nondiff]
    expected += ["num_batches_tracked"] if layer._counts else []
    assert list(layer.state_dict()) == expected
    g = torch.Generator().manual_seed(23)
    for _ in range(2):
        layer(torch.randn(*shape, dtype=DT, generator=g))
    fresh = getattr(nt, cls)(c, dtype=DT, **kw)
    fresh.load_state_dict(layer.state_dict())
    layer.eval(), fresh.eval()
    x = torch.randn(*shape, dtype=DT, generator=g)
    assert torch.equal(layer(x), fresh(x))
    bare = getattr(nt, cls)(c, dtype=DT, affine=False, track_running_stats=False, **kw)
    assert not any(k in ("weight", "bias") or k.startswith("running_") or k == "num_batches_tracked"
                   for k in bare.state_dict())
    if cls.startswith("BatchRenorm"):
        return  # r and d are measured against the running statistics: they are required
    bare.eval()  # without running statistics, eval uses batch statistics (torch's convention)
    y = bare(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("cls,c,kw,shape", STATEFUL, ids=_IDS)
def test_stateful_layer_gradcheck(cls, c, kw, shape):
    """gradcheck of the layer (input and every parameter) in training mode, float64 with torch's
    default tolerances. The buffers are fresh copies on each call (torch.func.functional_call), so the
    finite differences see one function, not one that moves its running statistics. Batch renorm's
    r, d are stop-gradient constants: with rmax = 1 and a tiny dmax against a far running mean both
    are saturated by their clip, so their true derivative is 0 and the check is exact."""
    extra = {"rmax": 1.0, "dmax": 1e-3} if cls.startswith("BatchRenorm") else {}
    layer = _make(cls, c, {**kw, **extra})
    if extra:
        with torch.no_grad():
            layer.running_mean.fill_(10.0)
    names = [n for n, _ in layer.named_parameters()]
    buffers = {n: b for n, b in layer.named_buffers()}
    g = torch.Generator().manual_seed(24)
    x = (torch.randn(*shape, dtype=DT, generator=g) + 0.5).requires_grad_()
    leaves = (x, *(p.detach().clone().requires_grad_() for p in layer.parameters()))

    def fn(x, *ps):
        fresh = {n: b.clone() for n, b in buffers.items()}
        return torch.func.functional_call(layer, ({**dict(zip(names, ps)), **fresh},), (x,))

    assert torch.autograd.gradcheck(fn, leaves)
    layer.eval()
    if layer._state_names:  # eval: the running statistics are constants of the backward
        assert torch.autograd.gradcheck(fn, leaves)


def test_stateful_layer_errors():
    with pytest.raises(TypeError, match=r"IterNorm: unexpected argument 'groupsize'; the method's options are"):
        nt.IterNorm(4, groupsize=2)
    with pytest.raises(ValueError, match=r"IterNorm: group_size must be a positive divisor of num_features = 4; got 3"):
        nt.IterNorm(4, group_size=3)
    with pytest.raises(TypeError, match=r"BatchGroupNorm: missing required argument 'num_groups'"):
        nt.BatchGroupNorm(4)
    with pytest.raises(TypeError, match=r"StatefulNorm\('adain'\): a layer needs an activation method whose first array argument is input"):
        nt.StatefulNorm("adain", 4)
    with pytest.raises(ValueError, match=r"BatchRenorm2d: expected 4D input; got 3D input"):
        nt.BatchRenorm2d(3)(torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match=r"SwitchableNorm1d: expected 3D input; got 2D input"):
        nt.SwitchableNorm1d(3)(torch.zeros(4, 3))
    # the generic class and a named one are the same layer
    a, b = nt.StatefulNorm("iter_norm", 4, group_size=2), nt.IterNorm(4, group_size=2)
    assert type(b).__mro__[1] is nt.StatefulNorm and list(a.state_dict()) == list(b.state_dict())


def test_stateful_layers_train():
    """A small conv net with registry-generated layers trains (its loss falls) and its eval mode uses
    the learned running statistics."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nt.IterNorm2d(4, group_size=2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nt.BatchRenorm2d(4), nn.ReLU(),
        nt.SwitchableNorm2d(4), nn.Flatten(), nn.Linear(64, 2),
    ).double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 3, 4, 4, generator=g, dtype=DT), torch.randn(64, 2, generator=g, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for s in range(60):
        i = (s * 16) % 64
        loss = ((model(X[i : i + 16]) - Y[i : i + 16]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:4])
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


# --------------------------------------------------------------------------------------------------
# parametrizations for the weight methods
# --------------------------------------------------------------------------------------------------
from normref.backends.torch import parametrize as P  # noqa: E402


def test_weight_norm_parametrization_matches_torch():
    """Same originals (g, v), same weight, same gradients as torch.nn.utils.parametrizations.weight_norm."""
    for dim, make in [(0, lambda: torch.nn.Linear(4, 3)), (1, lambda: torch.nn.Conv2d(2, 3, 2))]:
        torch.manual_seed(0)
        a = P.weight_norm(make().double(), dim=dim)
        torch.manual_seed(0)
        b = torch.nn.utils.parametrizations.weight_norm(make().double(), dim=dim)
        assert list(a.state_dict()) == list(b.state_dict())
        for k in a.state_dict():
            # g is a norm: the two libraries sum in different orders (round-off ≤ n·ε)
            assert (a.state_dict()[k] - b.state_dict()[k]).abs().max().item() <= 1e-14, k
        shape = (5, 4) if dim == 0 else (2, 2, 3, 3)
        x = torch.randn(*shape, dtype=DT)
        ya, yb = a(x), b(x)
        assert (ya - yb).abs().max().item() <= 1e-13
        ya.sin().sum().backward()
        yb.sin().sum().backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert (pa.grad - pb.grad).abs().max().item() <= 1e-12


@pytest.mark.parametrize(
    "register,name,kwargs",
    [
        (P.centered_weight_norm, "centered_weight_norm", {}),
        (P.orthogonal_weight_norm, "orthogonal_weight_norm", {}),
        (P.oni, "oni", {"iterations": 5}),
        (P.weight_standardization, "weight_standardization", {"eps": 1e-5}),
    ],
    ids=["centered_weight_norm", "orthogonal_weight_norm", "oni", "weight_standardization"],
)
def test_weight_parametrizations(register, name, kwargs):
    """The parametrized weight is the normref function of the original(s), and gradcheck passes
    through the parametrization (float64, torch's default gradcheck tolerances)."""
    torch.manual_seed(1)
    layer = register(torch.nn.Linear(6, 3).double(), **kwargs)
    orig = layer.parametrizations.weight.original if hasattr(layer.parametrizations.weight, "original") else None
    if orig is None:  # CenteredWeightNorm with its scale: (g, v)
        g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
        ref = getattr(normref, name)(v.detach().numpy(), g.detach().numpy())
    else:
        ref = getattr(normref, name)(orig.detach().numpy(), **kwargs)
    np.testing.assert_allclose(layer.weight.detach().numpy(), ref, rtol=0, atol=1e-13)
    params = tuple(layer.parametrizations.weight.parameters())
    fn = lambda *ps: _tp_weight(layer, ps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(p.detach().clone().requires_grad_() for p in params))


def _tp_weight(layer, ps):
    return layer.parametrizations.weight[0](*ps)


# the spectral-norm parametrization (state (u, v), torch's initialization, loss curves): tests/test_torch_parametrize.py


@pytest.mark.parametrize("affine", [False, True])
def test_inplace_op_after_a_layer(affine):
    """BatchNorm → ReLU(inplace=True), as in most CNNs: the output is neither a view nor saved, so the
    in-place op is legal and the gradient equals torch's (1e-13)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 2, 2, dtype=DT, generator=g)
    grads = []
    for lib in (nt, torch.nn):
        xi = x.clone().requires_grad_()
        net = torch.nn.Sequential(lib.BatchNorm2d(3, affine=affine, dtype=DT), torch.nn.ReLU(inplace=True))
        net(xi).sin().sum().backward()
        grads.append(xi.grad)
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-13
