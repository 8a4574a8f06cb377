"""Inference procedures (issue 14 §3): ``normref.recalibrate`` (Algorithm 2 / precise BN / AdaBN) as a
pure function and as ``normref.backends.torch.recalibrate(model, batches)``, and ``normref.eval_norm``
(EvalNorm, Singh & Shrivastava 2019).

References are plain NumPy from the papers' definitions (Ioffe & Szegedy's Algorithm 2: the mean of
the batch means and of the unbiased batch variances; the pooled moments of the concatenated data),
torch's own ``update_bn`` for torch's BatchNorm layers, and for EvalNorm the exact identity that
α = β = 1/m with the other m − 1 examples' statistics reproduces the training-mode BN output.
Tolerances: float64, TOL64 = 1e3·ε₆₄ (a few hundred roundings of O(1) sums); finite differences
1e-6 relative (h = 1e-6: truncation ~1e-12, rounding ~1e-10).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import normref

from .conftest import TOL64, On, rel_err


def _batches(rng, k=4, shape=(5, 6, 3, 2), uneven=False):
    out = []
    for i in range(k):
        s = (shape[0] + (i if uneven else 0),) + shape[1:]
        out.append(rng.standard_normal(s) * (1.0 + 0.3 * i) + 0.5 * i)
    return out


def test_average_is_algorithm_2(rng):
    """batch_norm: the mean over batches of μ_B and of the unbiased σ²_B (Algorithm 2), in a plain loop."""
    bs = _batches(rng)
    state = {"running_mean": np.full(6, 7.0), "running_var": np.full(6, 9.0)}  # values must not matter
    est = normref.recalibrate("batch_norm", bs, state)
    mu = np.mean([b.mean(axis=(0, 2, 3)) for b in bs], axis=0)
    var = np.mean([b.transpose(1, 0, 2, 3).reshape(6, -1).var(axis=1, ddof=1) for b in bs], axis=0)
    assert rel_err(est["running_mean"], mu) < TOL64 and rel_err(est["running_var"], var) < TOL64
    assert state["running_mean"][0] == 7.0  # pure: the state is not modified
    # batch_group_norm: each channel group's statistic averaged over batch groups and batches
    est = normref.recalibrate("batch_group_norm", bs[:2], state, num_groups=3, batch_groups=1)
    ref = np.mean([[b[:, 2 * (j // 2):2 * (j // 2) + 2].var(ddof=1) for j in range(6)] for b in bs[:2]], axis=0)
    assert rel_err(est["running_var"], ref) < TOL64
    # scaling-only BN: the running mean square
    est = normref.recalibrate("batch_normalize", bs, {"running_mean_square": np.ones(6)}, operation="scaling")
    assert rel_err(est["running_mean_square"], np.mean([(b * b).mean(axis=(0, 2, 3)) for b in bs], axis=0)) < TOL64
    # ghost BN: each batch's estimate is the average over its virtual batches
    est = normref.recalibrate("ghost_batch_norm", bs[:1], state, virtual_batch_size=1)
    assert rel_err(est["running_mean"], bs[0].mean(axis=(0, 2, 3))) < TOL64


def test_pooled_is_precise_bn(rng):
    """The exact moments of the concatenated batches (uneven sizes), also the covariance of batch
    whitening and the mean square."""
    bs = _batches(rng, uneven=True)
    allx = np.concatenate(bs).transpose(1, 0, 2, 3).reshape(6, -1)
    state = {"running_mean": np.zeros(6), "running_var": np.ones(6)}
    est = normref.recalibrate("batch_norm", bs, state, estimator="pooled")
    assert rel_err(est["running_mean"], allx.mean(axis=1)) < TOL64
    assert rel_err(est["running_var"], allx.var(axis=1, ddof=1)) < TOL64
    cov0 = np.stack([np.eye(3)] * 2)
    est = normref.recalibrate("batch_whitening", iter(bs), {"running_mean": np.zeros(6), "running_cov": cov0},
                              estimator="pooled", group_size=3)
    ref = np.stack([np.cov(allx[:3]), np.cov(allx[3:])])
    assert rel_err(est["running_cov"], ref) < TOL64
    est = normref.recalibrate("batch_normalize", bs, {"running_mean_square": np.ones(6)}, estimator="pooled",
                              operation="scaling")
    assert rel_err(est["running_mean_square"], (allx * allx).mean(axis=1)) < TOL64
    # the average estimator of the whitening covariance: each batch's unbiased covariance, averaged
    est = normref.recalibrate("batch_whitening", bs, {"running_mean": np.zeros(6), "running_cov": cov0}, group_size=3)
    ref = np.mean([np.stack([np.cov(b.transpose(1, 0, 2, 3).reshape(6, -1)[g * 3:g * 3 + 3]) for g in (0, 1)])
                   for b in bs], axis=0)
    assert rel_err(est["running_cov"], ref) < TOL64


def test_backends(backend, rng):
    a = On(backend)
    bs = _batches(rng, k=2)
    ref = normref.recalibrate("batch_norm", bs, {"running_mean": np.zeros(6), "running_var": np.ones(6)})
    got = normref.recalibrate("batch_norm", [a(b) for b in bs], {"running_mean": a(np.zeros(6)),
                                                                  "running_var": a(np.ones(6))})
    for p in ref:
        assert rel_err(a.np(got[p]), ref[p]) < TOL64
    got = normref.recalibrate("batch_norm", [a(b) for b in bs], {"running_mean": a(np.zeros(6)),
                                                                  "running_var": a(np.ones(6))}, estimator="pooled")
    allx = np.concatenate(bs).transpose(1, 0, 2, 3).reshape(6, -1)
    assert rel_err(a.np(got["running_var"]), allx.var(axis=1, ddof=1)) < TOL64


@pytest.mark.parametrize("call,exc,msg", [
    (lambda bs, st: normref.recalibrate("group_norm", bs, st), TypeError, r"recalibrate: group_norm keeps no running"),
    (lambda bs, st: normref.recalibrate("instance_norm", bs, st, estimator="pooled"), ValueError,
     r"estimator='pooled' applies to methods whose running statistics are per-channel"),
    (lambda bs, st: normref.recalibrate("batch_norm", bs, st, momentum=0.1), TypeError, r"'momentum' is set by recalibrate"),
    (lambda bs, st: normref.recalibrate("batch_norm", [], st), ValueError, r"batches is empty"),
    (lambda bs, st: normref.recalibrate("batch_norm", bs[0], st), TypeError, r"batches must be an iterable of arrays"),
    (lambda bs, st: normref.recalibrate("batch_norm", bs, {"weight": np.ones(6)}), TypeError, r"not a state argument"),
    (lambda bs, st: normref.recalibrate("batch_norm", bs, st, estimator="exact"), ValueError, r"estimator must be one of"),
    (lambda bs, st: normref.recalibrate("batch_normalize", bs, st, estimator="pooled", partition="batch_group",
                                        num_groups=2), ValueError, r"partition='batch'"),
])
def test_recalibrate_bad_input(rng, call, exc, msg):
    bs = _batches(rng, k=2)
    with pytest.raises(exc, match=msg):
        call(bs, {"running_mean": np.zeros(6), "running_var": np.ones(6)})


def test_torch_recalibrate_model(rng):
    """A model of torch's BatchNorm2d, normref's BatchNorm2d, IterNorm and a scaling-only BN layer:
    torch's layers get what torch's update_bn gives; normref's get the numpy Algorithm 2 of their
    own inputs (update_bn skips the StatefulNorm layers: their covariance and mean square are
    re-estimated here only); parameters and the training mode are unchanged."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from normref.backends import torch as nt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nt.BatchNorm2d(4), nt.IterNorm2d(4, group_size=2),
                          nt.StatefulNorm("batch_normalize", 4, operation="scaling"),
                          nt.InstanceNorm2d(4, track_running_stats=True)).double()
    data = [torch.tensor(rng.standard_normal((6, 3, 4, 4))) for _ in range(3)]
    with torch.no_grad():  # a little training first, so every state is away from its initial value
        model.train()
        for x in data:
            model(x * 2.0 + 1.0)
    model.eval()
    ref = copy.deepcopy(model)
    params = {k: v.clone() for k, v in model.named_parameters()}
    torch.optim.swa_utils.update_bn(data, ref)
    out = nt.recalibrate(model, data)
    assert out is model and not model.training
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])
    for k in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        assert rel_err(model.state_dict()[k], ref.state_dict()[k]) < TOL64, k
    # the layers update_bn skips, against numpy Algorithm 2 of the inputs they see (train mode)
    feats = {}
    probe = copy.deepcopy(model).train()
    hooks = [probe[i].register_forward_pre_hook(lambda m, a, i=i: feats.setdefault(i, []).append(a[0].numpy().copy()))
             for i in (5, 6, 7)]
    with torch.no_grad():
        for x in data:
            probe(x)
    for h in hooks:
        h.remove()
    covs = [np.stack([np.cov(f.transpose(1, 0, 2, 3).reshape(4, -1)[g * 2:g * 2 + 2]) for g in (0, 1)]) for f in feats[5]]
    assert rel_err(model[5].running_cov, np.mean(covs, axis=0)) < TOL64
    ms = np.mean([(f * f).mean(axis=(0, 2, 3)) for f in feats[6]], axis=0)
    assert rel_err(model[6].running_mean_square, ms) < TOL64
    # instance norm: per batch the mean over samples of each instance's mean and unbiased variance
    im = np.mean([f.mean(axis=(2, 3)).mean(axis=0) for f in feats[7]], axis=0)
    iv = np.mean([f.reshape(6, 4, -1).var(axis=2, ddof=1).mean(axis=0) for f in feats[7]], axis=0)
    assert rel_err(model[7].running_mean, im) < TOL64 and rel_err(model[7].running_var, iv) < TOL64
    assert int(model[5].num_batches_tracked) == 3
    assert not torch.equal(ref[5].running_cov, model[5].running_cov)  # update_bn left it as trained
    # precise BN: refused before any work for a model with an instance norm (per-sample statistics)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"estimator='pooled' applies to .*instance_norm's are not.*layer '7'"):
        nt.recalibrate(model, data, estimator="pooled")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the pooled moments of the first norm layer's inputs
    model = model[:7]
    nt.recalibrate(model, data, estimator="pooled")
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in data]).numpy().transpose(1, 0, 2, 3).reshape(4, -1)
    assert rel_err(model[1].running_var, h.var(axis=1, ddof=1)) < TOL64


# --------------------------------------------------------------------------------------------------
# EvalNorm


def test_eval_norm_identities(rng):
    """α = β = 1/m with the other m − 1 examples' (biased) statistics reproduces the training-mode
    batch norm output of the example (the decomposition EvalNorm rests on); α = β = 0 is batch norm
    by population statistics."""
    m = 4
    x = rng.standard_normal((m, 3, 5, 2)) * 1.7 + 0.4
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    for i in range(m):
        rest = np.delete(x, i, axis=0)
        P, V = rest.mean(axis=(0, 2, 3)), rest.var(axis=(0, 2, 3))
        y = normref.eval_norm(x[i:i + 1], P, V, np.full(3, 1 / m), np.full(3, 1 / m), w, b)
        assert rel_err(y, normref.batch_norm(x, None, None, w, b, True)[i:i + 1]) < TOL64
    P, V = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    y = normref.eval_norm(x, P, V, np.zeros(()), np.zeros(()), w, b)
    assert rel_err(y, normref.batch_norm(x, P, V, w, b, False)) < TOL64


def test_eval_norm_finite_differences(rng):
    x = rng.standard_normal((3, 4, 3, 2)) + 0.3
    args = [x, rng.standard_normal(4), rng.uniform(0.5, 2, 4), rng.uniform(0.1, 0.9, 4), rng.uniform(0.1, 0.9, 4),
            rng.standard_normal(4), rng.standard_normal(4)]
    g = rng.standard_normal(x.shape)
    for mix in (True, False):
        _, res = normref.eval_norm.forward(*args, mixture_term=mix)
        grads = normref.eval_norm.backward(res, g)
        for i in (0, 3, 4, 5, 6):
            d = rng.standard_normal(np.shape(args[i]))
            ap, am = list(args), list(args)
            ap[i], am[i] = args[i] + 1e-6 * d, args[i] - 1e-6 * d
            num = (np.sum(g * normref.eval_norm(*ap, mixture_term=mix))
                   - np.sum(g * normref.eval_norm(*am, mixture_term=mix))) / 2e-6
            an = np.sum(grads[i] * d)
            assert abs(num - an) / max(1.0, abs(an)) < 1e-6, (i, num, an)


def test_eval_norm_adapters_and_backends(backend, rng):
    """Every library gives the NumPy output; the torch adapter's gradients equal torch autograd of an
    independent torch implementation of the formula."""
    a = On(backend)
    x = rng.standard_normal((2, 3, 4))
    P, V, al, be = rng.standard_normal(3), rng.uniform(0.5, 2, 3), rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    ref = normref.eval_norm(x, P, V, al, be)
    assert rel_err(a.np(normref.eval_norm(a(x), a(P), a(V), a(al), a(be))), ref) < TOL64
    if backend.name != "torch":
        return
    import torch
    from normref.backends import torch as nt

    t = [torch.tensor(v, requires_grad=True) for v in (x, al, be)]
    Pt, Vt = torch.tensor(P), torch.tensor(V)
    y = nt.eval_norm(t[0], Pt, Vt, t[1], t[2])
    g = torch.tensor(rng.standard_normal(x.shape))
    got = torch.autograd.grad(y, t, g)
    xx, aa, bb = t[0], t[1][:, None], t[2][:, None]
    mu, v = xx.mean(-1, keepdim=True), xx.var(-1, unbiased=False, keepdim=True)
    mh = aa * mu + (1 - aa) * Pt[:, None]
    vh = bb * v + (1 - bb) * Vt[:, None] + bb * (1 - bb) * (mu - Pt[:, None]) ** 2
    exp = torch.autograd.grad((xx - mh) / torch.sqrt(vh + 1e-5), t, g)
    for u, w in zip(got, exp):
        assert rel_err(u, w) < TOL64


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(alpha=np.full(3, 1.5)), ValueError, r"eval_norm: alpha must lie in \[0, 1\]"),
    (dict(beta=np.ones(2)), ValueError, r"eval_norm: beta must have shape \(\) \(per layer\) or \(3,\)"),
    (dict(running_var=-np.ones(3)), ValueError, r"eval_norm: running_var"),
    (dict(mixture_term=1), TypeError, r"eval_norm: mixture_term must be a bool"),
    (dict(input=np.ones(3)), ValueError, r"eval_norm: input"),
])
def test_eval_norm_bad_input(rng, kw, exc, msg):
    call = dict(input=rng.standard_normal((2, 3, 4)), running_mean=np.zeros(3), running_var=np.ones(3),
                alpha=np.full(3, 0.5), beta=np.full(3, 0.5))
    call.update(kw)
    with pytest.raises(exc, match=msg):
        normref.eval_norm(**call)


# --------------------------------------------------------------------------------------------------
# every registered method with running statistics


def _stateful():
    from normref.inference import _FLAGS, _state_names

    out = []
    for m in normref.methods("activation"):
        if _state_names(m) and any(f in m.signature.parameters for f in _FLAGS):
            out.append(m.name)
    return out


def _training_case(m):
    """The first registry example of ``m`` in training mode with its running statistics given:
    (input, state, other arguments)."""
    from normref.inference import _FLAGS, _state_names

    flag = next(f for f in _FLAGS if f in m.signature.parameters)
    for ex in m.examples(np.random.default_rng(0)):
        a = m.bind(*ex.args, **ex.kwargs).arguments
        if a[flag] is True and all(a.get(p) is not None for p in _state_names(m)):
            state = {p: a[p] for p in m.array_params if p in m.nondiff and a.get(p) is not None}
            skip = {m.array_params[0], flag, "momentum", "num_batches_tracked", "alpha_fwd"} | set(state)
            others = {k: v for k, v in a.items() if k not in skip and v is not m.signature.parameters[k].default}
            return a[m.array_params[0]], state, others
    for ex in m.examples(np.random.default_rng(0)):  # a training example without state: the initial state
        a = m.bind(*ex.args, **ex.kwargs).arguments
        if a[flag] is True:
            x = a[m.array_params[0]]
            c = x.shape[1]
            gs = a.get("group_size") or c
            init = {"running_mean": np.zeros(c), "running_var": np.ones(c), "running_mean_square": np.ones(c),
                    "running_cov": np.stack([np.eye(gs)] * (c // gs))}
            state = {p: init[p] for p in _state_names(m)}
            skip = {m.array_params[0], flag, "momentum", "num_batches_tracked", "alpha_fwd"} | set(state)
            others = {k: v for k, v in a.items() if k not in skip and v is not m.signature.parameters[k].default}
            return x, state, others
    return None


@pytest.mark.parametrize("name", _stateful())
def test_every_stateful_method(name):
    """Every method with running statistics: ``recalibrate`` either re-estimates each of them (the
    estimates change, keep their shapes and dtypes; for the methods with a cumulative average they equal
    the method's own momentum=None updates over the same batches, torch's update_bn procedure; pooled,
    where it applies, the moments of the concatenated batches) or refuses with a reason."""
    from normref.inference import _NOT_RECALIBRATED, _POOLED

    m = normref.get(name)
    case = _training_case(m)
    if case is None:
        pytest.skip(f"{name}: no registry example trains with running statistics")
    x, state, others = case
    bs = [x, x * 1.3 + 0.2, x - 0.5]
    if name in _NOT_RECALIBRATED:
        with pytest.raises(TypeError, match=rf"recalibrate: {name} cannot be recalibrated"):
            normref.recalibrate(name, bs, state, **others)
        return
    est = normref.recalibrate(name, bs, state, **others)
    assert est and all(p.startswith("running_") for p in est)
    # batch_normalize returns the state its operation keeps no estimate of unchanged (documented)
    kept = {"standardizing": ("running_mean_square",), "centering": ("running_var", "running_mean_square"),
            "scaling": ("running_mean", "running_var")}[others.get("operation", "standardizing")] \
        if name == "batch_normalize" else ()
    for p, v in est.items():
        assert v.shape == state[p].shape and v.dtype == state[p].dtype
        assert np.array_equal(v, state[p]) if p in kept else not np.allclose(v, state[p]), f"{name}: {p}"
    params = m.signature.parameters
    if "num_batches_tracked" in params and "momentum" in params and "update_every" not in params:
        flag = "use_input_stats" if "use_input_stats" in params else "training"
        run = dict(state)
        per_call = x.shape[0] // others["virtual_batch_size"] if name == "ghost_batch_norm" else 1
        for k, b in enumerate(bs):
            out = m(b, **{**others, **run, flag: True, "momentum": None, "num_batches_tracked": k * per_call})
            run.update({p: getattr(out, p) for p in est})
        for p in est:
            assert rel_err(est[p], run[p]) < TOL64, (name, p)
    if name in _POOLED and all(others.get(arg, m.signature.parameters[arg].default) == want
                               for arg, want in _POOLED[name]):
        try:
            pooled = normref.recalibrate(name, bs, state, estimator="pooled", **others)
        except ValueError as e:  # a state the pooled estimator does not cover: said so
            assert "use estimator='average'" in str(e)
            return
        allx = np.concatenate(bs)
        flat = np.moveaxis(allx, 1, 0).reshape(allx.shape[1], -1)
        ref = {"running_mean": flat.mean(axis=1), "running_var": flat.var(axis=1, ddof=1),
               "running_mean_square": (flat * flat).mean(axis=1)}
        if "running_cov" in pooled:
            gs = state["running_cov"].shape[-1]
            ref["running_cov"] = np.stack([np.cov(flat[i:i + gs]) for i in range(0, flat.shape[0], gs)])
        for p in pooled:  # the same state as the average estimator: batch_normalize's kept state as given
            assert np.array_equal(pooled[p], state[p]) if p in kept else rel_err(pooled[p], ref[p]) < TOL64, (name, p)


# --------------------------------------------------------------------------------------------------
# review fixes: keyword calls, per-module modes, every layer class, the same state for both
# estimators, batches checked as they come, the biased pooled variance, EvalNorm with floats


def _torch():
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    return torch, nt


def test_torch_recalibrate_keyword_call_and_modes(rng):
    """A layer called by keyword (``self.bn(input=x)``) is recalibrated (the pre-hook used to read
    args[0]: IndexError), and every module keeps its own training flag (``model.train(flag)`` used to
    reset a Dropout left in eval to train)."""
    torch, nt = _torch()
    from torch import nn

    class K(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.drop, self.sn = nn.BatchNorm2d(4).double(), nn.Dropout(0.5), nt.BatchRenorm2d(4).double()

        def forward(self, x):
            return self.sn(input=self.drop(self.bn(input=x)))

    model = K()
    model.train()
    model.drop.eval()  # a submodule in another mode than the root
    data = [torch.tensor(rng.standard_normal((5, 4, 3, 3)) * 2 + 1) for _ in range(3)]
    nt.recalibrate(model, data)
    flat = [x.numpy().transpose(1, 0, 2, 3).reshape(4, -1) for x in data]
    assert rel_err(model.bn.running_mean, np.mean([f.mean(axis=1) for f in flat], axis=0)) < TOL64
    assert rel_err(model.bn.running_var, np.mean([f.var(axis=1, ddof=1) for f in flat], axis=0)) < TOL64
    assert int(model.sn.num_batches_tracked) == 3  # the keyword-called StatefulNorm was recalibrated too
    assert model.training and model.bn.training and not model.drop.training and model.sn.training
    model.eval()
    model.bn.train()
    nt.recalibrate(model, data)
    assert not model.training and model.bn.training and not model.drop.training and not model.sn.training


def _layer_classes():
    from torch import nn

    from normref.backends.torch import cross_iteration, modules, online

    out = []
    for mod in (modules, online, cross_iteration):
        for n in mod.__all__:
            c = getattr(mod, n)
            if isinstance(c, type) and issubclass(c, nn.Module):
                out.append(n)
    return out


def _make_layer(nt, name):
    """(layer, input shape) for a layer class of normref.backends.torch, float64, 4 channels."""
    import torch

    d = {"dtype": torch.float64}
    rank = {"1d": (6, 4, 5), "3d": (6, 4, 2, 2, 2)}.get(name[-2:], (6, 4, 3, 3))
    special = {
        "StatefulNorm": lambda: nt.StatefulNorm("batch_norm", 4, **d),
        "Norm": lambda: nt.Norm("batch_norm"),  # stateless: the caller keeps any state
        "CentralizedConv2d": lambda: nt.CentralizedConv2d(4, 4, 1, **d),
        "Centralize": lambda: nt.Centralize(),
        "CBNConv2d": lambda: nt.CBNConv2d(4, 4, 1, buffer_num=2, **d),
        "CBNLinear": lambda: nt.CBNLinear(4, 4, buffer_num=2, **d),
        "LayerNorm": lambda: nt.LayerNorm(rank[-1], **d),
        "MemorizedBatchNorm": lambda: getattr(nt, name)(4, memory=3, memory_weights=(0.5, 0.3, 0.2), **d),
        "MovingAverageBatchNorm": lambda: getattr(nt, name)(4, buffer_size=2, warmup_iters=0, **d),
    }
    key = name if name in special else name.rstrip("123d") if name.rstrip("123d") in special else None
    if key is not None:
        return special[key](), rank if name != "CBNLinear" else (6, 4)
    kw = {"num_groups": 2} if name.startswith("BatchGroupNorm") else {}
    if name.startswith("GroupNorm"):
        return nt.GroupNorm(2, 4, **d), rank
    if name.startswith("LocalResponseNorm"):
        return nt.LocalResponseNorm(2), rank
    if name.startswith("InstanceNorm"):
        kw["track_running_stats"] = True
    return getattr(nt, name)(4, **kw, **d), rank


@pytest.mark.parametrize("name", _layer_classes())
def test_torch_recalibrate_every_layer_class(name):
    """Every layer class of normref.backends.torch with population statistics (non-None ``running_*``
    buffers) is recalibrated — each of those buffers replaced by ``normref.recalibrate`` of the layer's
    own inputs (the statistics its method normalizes with), its other buffers (windows, backward
    state) kept — or refused with a reason, before any work; never silently skipped."""
    torch, nt = _torch()
    from torch import nn

    from normref.backends.torch.inference import _spec

    try:
        layer, shape = _make_layer(nt, name)
    except TypeError as e:  # an unforeseen constructor: the test must be told how to build it
        pytest.fail(f"{name}: cannot build it here ({e}); add it to _make_layer")
    model = nn.Sequential(layer)
    subs = [(n, m) for n, m in model.named_modules()]
    specs = {n: _spec(m) for n, m in subs}
    running = {n: [p for p, b in m.named_buffers(recurse=False) if b is not None and p.startswith("running_")]
               for n, m in subs}
    refused = [n for n in specs if isinstance(specs[n], str)]
    if not refused and all(specs[n] is None for n, _ in subs):
        assert not any(running.values()), f"{name}: {running} but recalibrate skips it"
        return
    rng = np.random.default_rng(5)
    data = [torch.tensor(rng.standard_normal(shape) * (1.0 + 0.4 * i) + 0.3 * i) for i in range(3)]
    model.train()
    with torch.no_grad():  # a little training, so every state is away from where recalibration puts it
        for x in data:
            model(x * 2.0 - 1.0)
    specs = {n: _spec(m) for n, m in subs}  # the same, with the trained options
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if refused:
        with pytest.raises(TypeError, match=r"recalibrate: layer .* cannot be recalibrated from batches: .*stream"):
            nt.recalibrate(model, data)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        return
    for n, _ in subs:  # a layer without a spec keeps no population statistics
        if specs[n] is None:
            assert not running[n], f"{name}: {n} has {running[n]} but recalibrate skips it"
    targets = [(n, m) for n, m in subs if specs[n] is not None]
    inputs: dict = {}
    probe = copy.deepcopy(model).train()
    pmods = dict(probe.named_modules())
    hooks = [pmods[n].register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].detach().numpy()))
             for n, _ in targets]
    with torch.no_grad():
        for x in data:
            probe(x)
    for h in hooks:
        h.remove()
    nt.recalibrate(model, data)
    after = model.state_dict()
    for n, m in targets:
        method, state, others, _ = specs[n]
        from normref.inference import uses

        used = uses(method, others, state)
        st = {p: before[f"{n}.{p}" if n else p].numpy() for p in state}
        args = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in others.items()}
        ref = normref.recalibrate(method, inputs[n], st, **args)
        prefix = f"{n}." if n else ""
        for p, b in m.named_buffers(recurse=False):
            if b is None:
                continue
            if p in used:
                assert not torch.equal(b, before[prefix + p]), (name, p)
                assert rel_err(b, ref[p]) < TOL64, (name, p)
            elif p != "num_batches_tracked":
                assert torch.equal(after[prefix + p], before[prefix + p]), (name, p)  # windows, backward state


def test_torch_recalibrate_power_norm_and_windows(rng):
    """Independent references for the layers added by issue 14: PowerNorm's and MABN's running mean
    square is the mean over batches of E[x²]; memorized BN (with memory weights) gets the mean of the
    batch means and unbiased variances; their windows, backward state and (windowed layers) iteration
    counters are kept. Before the fix PowerNorm was silently skipped and memorized BN with memory
    weights raised inside the method."""
    torch, nt = _torch()
    from torch import nn

    data = [torch.tensor(rng.standard_normal((5, 4, 3, 3)) * (1 + 0.5 * i) + i) for i in range(3)]
    flat = [x.numpy().transpose(1, 0, 2, 3).reshape(4, -1) for x in data]
    ms = np.mean([(f * f).mean(axis=1) for f in flat], axis=0)
    for layer in (nt.PowerNorm(4, dtype=torch.float64),
                  nt.MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0, dtype=torch.float64)):
        model = nn.Sequential(layer).train()
        x = data[0].clone().requires_grad_(True)
        model(x).sum().backward()  # one training step: the backward state moves too
        keep = {k: v.clone() for k, v in layer.state_dict().items() if k != "running_mean_square"}
        nt.recalibrate(model, data)
        assert rel_err(layer.running_mean_square, ms) < TOL64, type(layer).__name__
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in keep.items()), type(layer).__name__
    layer = nt.MemorizedBatchNorm2d(4, memory=3, memory_weights=(0.5, 0.3, 0.2), dtype=torch.float64)
    model = nn.Sequential(layer).train()
    with torch.no_grad():
        for x in data:
            model(x * 3.0)
    nbt = int(layer.num_batches_tracked)
    nt.recalibrate(model, data)
    assert rel_err(layer.running_mean, np.mean([f.mean(axis=1) for f in flat], axis=0)) < TOL64
    assert rel_err(layer.running_var, np.mean([f.var(axis=1, ddof=1) for f in flat], axis=0)) < TOL64
    assert int(layer.num_batches_tracked) == nbt  # the window schedule's counter is the layer's own
    with pytest.raises(TypeError, match=r"layer '0' \(OnlineNorm\): online_norm cannot be recalibrated"):
        nt.recalibrate(nn.Sequential(nt.OnlineNorm(4)), [torch.randn(3, 4, 2)])


def test_both_estimators_touch_the_same_state(rng):
    """batch_normalize(operation="centering") keeps only running_mean, "scaling" only
    running_mean_square: "pooled" used to re-estimate the others, which "average" returns as given."""
    bs = _batches(rng, k=3)
    allx = np.concatenate(bs).transpose(1, 0, 2, 3).reshape(6, -1)
    state = {"running_mean": np.full(6, 5.0), "running_var": np.full(6, 3.0), "running_mean_square": np.full(6, 2.0)}
    for op, fresh in (("centering", "running_mean"), ("scaling", "running_mean_square")):
        for est in ("average", "pooled"):
            out = normref.recalibrate("batch_normalize", bs, state, operation=op, estimator=est)
            for p in state:
                if p != fresh:
                    assert np.array_equal(out[p], state[p]) and out[p] is not state[p], (op, est, p)
        ref = allx.mean(axis=1) if op == "centering" else (allx * allx).mean(axis=1)
        assert rel_err(out[fresh], ref) < TOL64  # pooled
    with pytest.raises(ValueError, match=r"recalibrate: state holds none of the running statistics batch_normalize "
                                         r"estimates with these arguments \(running_mean\)"):
        normref.recalibrate("batch_normalize", bs, {"running_var": np.ones(6)}, operation="centering")


def test_pooled_biased_variance_and_batch_checks(rng):
    """pooled_unbiased=False: the biased pooled variance (÷ M), fvcore's precise BN; a bad batch is named by
    recalibrate before any work on it, also after earlier batches were processed (a generator)."""
    bs = _batches(rng, k=3, uneven=True)
    allx = np.concatenate(bs).transpose(1, 0, 2, 3).reshape(6, -1)
    state = {"running_mean": np.zeros(6), "running_var": np.ones(6)}
    est = normref.recalibrate("batch_norm", bs, state, estimator="pooled", pooled_unbiased=False)
    assert rel_err(est["running_var"], allx.var(axis=1)) < TOL64
    assert rel_err(est["running_mean"], allx.mean(axis=1)) < TOL64
    with pytest.raises(ValueError, match=r"pooled_unbiased=False .* applies to estimator='pooled'"):
        normref.recalibrate("batch_norm", bs, state, pooled_unbiased=False)
    seen = []

    def stream(bad):
        for i, b in enumerate(bs + [bad]):
            seen.append(i)
            yield b

    for est in ("average", "pooled"):
        seen.clear()
        with pytest.raises(ValueError, match=r"^recalibrate: batches\[3\] has 5 channels .*; the state has 6"):
            normref.recalibrate("batch_norm", stream(rng.standard_normal((4, 5, 3, 2))), state, estimator=est)
        assert seen == [0, 1, 2, 3]
        with pytest.raises(TypeError, match=r"^recalibrate: batches\[3\] must be an array"):
            normref.recalibrate("batch_norm", stream([1.0]), state, estimator=est)
    with pytest.raises(ValueError, match=r"^recalibrate: batches\[0\] must have shape \(N_k, C, \*spatial\)"):
        normref.recalibrate("batch_norm", [np.ones(6)], state)


def test_eval_norm_python_floats(rng):
    """α, β as Python floats (the 1/m rule) equal the 0-d arrays; out of [0, 1] or bool refused."""
    x = rng.standard_normal((3, 4, 5))
    P, V = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    m = 4
    got = normref.eval_norm(x, P, V, 1.0 / m, 1.0 / m)
    ref = normref.eval_norm(x, P, V, np.asarray(1.0 / m), np.asarray(1.0 / m))
    assert np.array_equal(got, ref) and got.dtype == x.dtype
    # against the formula written out (mixture term included)
    mu, v = x.mean(axis=2, keepdims=True), x.var(axis=2, keepdims=True)
    a = 1.0 / m
    mh, vh = a * mu + (1 - a) * P[:, None], a * v + (1 - a) * V[:, None] + a * (1 - a) * (mu - P[:, None]) ** 2
    assert rel_err(got, (x - mh) / np.sqrt(vh + 1e-5)) < TOL64
    x32 = x.astype(np.float32)
    assert normref.eval_norm(x32, P.astype(np.float32), V.astype(np.float32), 0.25, np.asarray(0.5, np.float32)).dtype \
        == np.float32
    for bad, exc, msg in ((1.5, ValueError, r"alpha must lie in \[0, 1\]"), (float("nan"), ValueError, r"alpha must lie in \[0, 1\]"),
                          (True, TypeError, r"alpha must be an array or a Python float")):
        with pytest.raises(exc, match=rf"^eval_norm: {msg}"):
            normref.eval_norm(x, P, V, bad, 0.5)


def test_pooled_refuses_states_that_are_not_batch_moments(rng):
    """The authors' running-state conventions (issue 15) keep something else than batch moments —
    batch renormalization's running σ (Algorithm 1), DBN/IterNorm's running whitening matrix — so the
    pooled estimator, which writes moments, refuses them; the average estimator runs the method's
    own update rule and serves them. A method's own ``unbiased`` argument passes through ``arguments``
    (it is not recalibrate's ``pooled_unbiased``)."""
    bs = _batches(rng, k=2)
    state = {"running_mean": np.zeros(6), "running_var": np.ones(6)}
    with pytest.raises(ValueError, match=r"estimator='pooled' applies to batch_renorm with running_stat='var'"):
        normref.recalibrate("batch_renorm", bs, state, estimator="pooled", running_stat="std")
    cov = {"running_mean": np.zeros(6), "running_cov": np.eye(6)[None]}
    for name in ("decorrelated_batch_norm", "iter_norm"):
        with pytest.raises(ValueError, match=rf"applies to {name} with running='covariance'"):
            normref.recalibrate(name, bs, cov, estimator="pooled", running="whitening_matrix")
    est = normref.recalibrate("batch_renorm", bs, state, running_stat="std")
    # Algorithm 1's σ_B = √(σ²_B + ε) with the biased σ²_B, averaged over the batches (Algorithm 2)
    want = np.mean([np.sqrt(b.transpose(1, 0, 2, 3).reshape(6, -1).var(axis=1) + 1e-5) for b in bs], axis=0)
    assert rel_err(est["running_var"], want) < TOL64
    lw = np.zeros(3)  # equal IN, LN, BN weights
    sw = normref.recalibrate("switchable_norm", bs, state, mean_weight=lw, var_weight=lw, unbiased=True)
    assert sw["running_var"].shape == (6,)  # the method's own argument reached it (no collision)
