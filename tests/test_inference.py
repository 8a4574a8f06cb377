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
    if name in _POOLED and (_POOLED[name] is None or others.get(_POOLED[name][0], "batch") == _POOLED[name][1]):
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
