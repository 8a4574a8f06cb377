"""The standardization family (issue: the foundation) on every array library.

Tolerances
- float64 backends vs the NumPy float64 evaluation: the same formula in a different order of
  operations; each output element passes through O(10) roundings and one reduction over n ≤ 100
  elements, so the error is bounded by c·n·ε₆₄·cond with c·n ≤ 1e3 here: ``TOL64 = 1e3·ε₆₄``.
- float32/float16 vs float64 of the *rounded* inputs: the computation in float32 (float16 accumulates
  in float32 and rounds the result once): ``64·ε(dtype)·cond`` for float32, ``4·ε₁₆`` plus the float32
  part for float16 (the final rounding is ε₁₆/2 relative to |y|, and |y| ≲ 4 for these examples).
- backward vs central finite differences: ≤ 1e-6 relative (see conformance/fd.py for why that is a
  bound with room, and how it is measured).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normref
from normref.conformance.fd import fd_check
from tests.conftest import assert_same_kind

EPS64 = float(np.finfo(np.float64).eps)
TOL64 = 1e3 * EPS64

FAMILY = [m for m in normref.methods()
          if m.__module__ in ("normref.standardization", "normref.framework", "normref.local", "normref.combination")]
FAMILY_IDS = [m.name for m in FAMILY]


def _cases(m, seed=0):
    return list(m.examples(np.random.default_rng(seed)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if a.size else 0.0


def _np_eval(m, ex):
    out, pb = normref.vjp(m, *ex.args, **ex.kwargs)
    y = m.primary(out)
    g = np.random.default_rng(7).standard_normal(y.shape)
    return out, y, g, pb(g)


# ---------------------------------------------------------------------------------------------------
# every method: finite differences, every backend, invariants


def test_family_is_complete():
    names = {m.name for m in FAMILY}
    assert {
        "normalize", "batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm",
        "mean_only_batch_norm", "position_norm", "pixel_norm", "batch_group_norm",
        "filter_response_norm", "lp_batch_norm", "batch_renorm", "ghost_batch_norm",
    } <= names
    for m in FAMILY:
        assert m.survey and m.paper and m.__doc__, m.name
        assert len(_cases(m)) >= 3, f"{m.name} needs examples"


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_backward_matches_finite_differences(m):
    worst = 0.0
    for i, ex in enumerate(_cases(m)):
        r = fd_check(m, ex.args, ex.kwargs, seed=i, directions=3)
        assert r.max_error <= 1e-6, f"{m.name} [{ex.label}]: {r.errors}"
        worst = max(worst, r.max_error)
    print(f"{m.name}: largest finite-difference relative error {worst:.2e}")


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_every_backend_matches_numpy_float64(m, backend):
    for ex in _cases(m, seed=1):
        out, y, g, grads = _np_eval(m, ex)
        args, kwargs = backend.convert(ex.args, ex.kwargs, "float64")
        bout, pb = normref.vjp(m, *args, **kwargs)
        by = m.primary(bout)
        assert_same_kind(by, args[0])
        assert _rel(backend.to_numpy(by), y) <= TOL64, f"{m.name} [{ex.label}] forward on {backend.name}"
        if isinstance(out, tuple):  # running statistics come back, same kind, same values
            for a, b in zip(bout[1:], out[1:]):
                assert_same_kind(a, args[1])
                assert _rel(backend.to_numpy(a), b) <= TOL64
        bgrads = pb(backend.asarray(g, "float64"))
        for name, ga, gb, a in zip(m.array_params, grads, bgrads, m.bind(*args, **kwargs).arguments.values()):
            assert (ga is None) == (gb is None), f"{m.name}: gradient presence of {name}"
            if ga is not None:
                arg = m.bind(*args, **kwargs).arguments[name]
                assert_same_kind(gb, arg)
                assert _rel(backend.to_numpy(gb), ga) <= TOL64, f"{m.name} [{ex.label}] d{name} on {backend.name}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_low_precision_against_float64_of_rounded_inputs(m, backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    eps = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    for ex in _cases(m, seed=2):
        args, kwargs = backend.convert(ex.args, ex.kwargs, dtype)
        # the reference sees exactly the rounded numbers the backend sees
        r_args = tuple(backend.to_numpy(a).astype(np.float64) if hasattr(a, "shape") else a for a in args)
        r_kwargs = {k: (backend.to_numpy(v).astype(np.float64) if hasattr(v, "shape") else v) for k, v in kwargs.items()}
        if m.name == "rms_norm" and r_kwargs.get("eps") is None and len(r_args) < 4:
            r_kwargs["eps"] = float(backend.xp.finfo(args[0].dtype).eps)  # eps=None follows the input dtype
        ref = m.primary(m(*r_args, **r_kwargs))
        y = m.primary(m(*args, **kwargs))
        assert y.dtype == args[0].dtype
        # statistics in float32 (64·ε₃₂·cond), then one rounding to the dtype, |y| ≲ 8 here
        tol = 64 * 2.0**-23 * ex.cond + (0 if dtype == "float32" else 8 * eps)
        err = _rel(backend.to_numpy(y), ref)
        assert err <= tol, f"{m.name} [{ex.label}] {dtype} on {backend.name}: {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("m", [m for m in FAMILY if m.invariants], ids=[m.name for m in FAMILY if m.invariants])
def test_invariants(m, backend):
    for inv in m.invariants:
        applied = 0
        for ex in _cases(m, seed=3):
            args, kwargs = backend.convert(ex.args, ex.kwargs, "float64")
            err = inv.check(m, backend.xp, m(*args, **kwargs), args, kwargs)
            if err is None:
                continue
            applied += 1
            assert err <= inv.scale * EPS64 * ex.cond, f"{m.name}: {inv.name} [{ex.label}] error {err:.2e}"
        assert applied, f"{m.name}: invariant {inv.name!r} applied to no example (it could not fail)"


# ---------------------------------------------------------------------------------------------------
# torch.nn.functional as the external oracle (outputs, running statistics, autograd gradients)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(a, grad=False):
    return None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _compare_with_torch(fn_ref, m, args, kwargs, diff_idx, rng):
    targs = [(_t(a, i in diff_idx) if isinstance(a, np.ndarray) else a) for i, a in enumerate(args)]
    y_t = fn_ref(*targs, **kwargs)
    g = rng.standard_normal(tuple(y_t.shape))
    y_t.backward(torch.tensor(g))
    out, pb = normref.vjp(m, *args, **kwargs)
    grads = pb(g)
    assert _rel(m.primary(out), y_t.detach().numpy()) <= TOL64
    names = list(m.signature.parameters)
    for i in diff_idx:
        j = m.array_params.index(names[i])
        assert _rel(grads[j], targs[i].grad.numpy()) <= TOL64, f"{m.name}: d{names[i]}"
    return out, targs


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 4, 3, 2), (2, 3, 2, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch(shape, training, rng):
    c = shape[1]
    x = rng.standard_normal(shape) * 3 + 1
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    rm0, rv0 = rm.copy(), rv.copy()
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    out, _ = _compare_with_torch(
        lambda x_, rm_, rv_, w_, b_, **k: F.batch_norm(x_, trm, trv, w_, b_, **k),
        normref.batch_norm, (x, rm, rv, w, b), dict(training=training, momentum=0.3, eps=1e-4), (0, 3, 4), rng)
    np.testing.assert_array_equal(rm, rm0)  # pure: the caller's arrays are untouched
    np.testing.assert_array_equal(rv, rv0)
    if training:
        y, nrm, nrv = out
        assert _rel(nrm, trm.numpy()) <= TOL64 and _rel(nrv, trv.numpy()) <= TOL64
    else:
        assert isinstance(out, np.ndarray)


def test_batch_norm_cumulative_average_matches_torch_module(rng):
    bn = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for k in range(3):
        x = rng.standard_normal((4, 3, 2, 2)) * (k + 1)
        bn(torch.tensor(x))
        _, rm, rv = normref.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=k)
    assert _rel(rm, bn.running_mean.numpy()) <= TOL64
    assert _rel(rv, bn.running_var.numpy()) <= TOL64


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_matches_torch(use_input_stats, rng):
    x = rng.standard_normal((3, 4, 5, 2))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    out, _ = _compare_with_torch(
        lambda x_, rm_, rv_, w_, b_, **k: F.instance_norm(x_, trm, trv, w_, b_, **k),
        normref.instance_norm, (x, rm, rv, w, b), dict(use_input_stats=use_input_stats, momentum=0.2), (0, 3, 4), rng)
    if use_input_stats:
        assert _rel(out.running_mean, trm.numpy()) <= TOL64 and _rel(out.running_var, trv.numpy()) <= TOL64
    # without running statistics: plain instance normalization
    _compare_with_torch(F.instance_norm, normref.instance_norm, (x,), {}, (0,), rng)


@pytest.mark.parametrize("shape,k", [((7,), 1), ((3, 5), 1), ((2, 3, 4), 2), ((2, 2, 3, 2), 3)])
def test_layer_and_rms_norm_match_torch(shape, k, rng):
    x = rng.standard_normal(shape) * 2 + 3
    ns = shape[len(shape) - k:]
    w, b = rng.standard_normal(ns), rng.standard_normal(ns)
    _compare_with_torch(F.layer_norm, normref.layer_norm, (x, ns, w, b), dict(eps=1e-3), (0, 2, 3), rng)
    _compare_with_torch(F.layer_norm, normref.layer_norm, (x, list(ns)), {}, (0,), rng)
    _compare_with_torch(F.rms_norm, normref.rms_norm, (x, ns, w), {}, (0, 2), rng)
    _compare_with_torch(F.rms_norm, normref.rms_norm, (x, ns, w), dict(eps=1e-2), (0, 2), rng)


@pytest.mark.parametrize("shape,g", [((2, 6), 3), ((3, 6, 4), 2), ((2, 4, 3, 3), 4), ((2, 6, 2, 2, 2), 1)])
def test_group_norm_matches_torch(shape, g, rng):
    x = rng.standard_normal(shape) - 2
    c = shape[1]
    _compare_with_torch(F.group_norm, normref.group_norm, (x, g, rng.standard_normal(c), rng.standard_normal(c)), {}, (0, 2, 3), rng)


def test_torch_inputs_stay_torch_and_channels_last(rng):
    x = torch.tensor(rng.standard_normal((4, 6, 5, 3)), dtype=torch.float32).to(memory_format=torch.channels_last)
    w, b = torch.randn(6), torch.randn(6)
    for ref, ours in [
        (F.group_norm(x, 3, w, b), normref.group_norm(x, 3, w, b)),
        (F.batch_norm(x, None, None, w, b, training=True), normref.batch_norm(x, None, None, w, b, training=True)),
        (F.instance_norm(x, weight=w, bias=b), normref.instance_norm(x, weight=w, bias=b)),
    ]:
        assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32
        # float32 both sides, different summation orders: 64·ε₃₂ on values of size ≲ 5
        assert float((ours - ref).abs().max()) <= 64 * 2.0**-23 * 5


# ---------------------------------------------------------------------------------------------------
# the survey's properties: scale invariance (Eqns 32-33), shift invariance, purity, compositions


@pytest.mark.parametrize("name,args", [
    ("batch_norm", lambda x: (x, None, None, None, None, True)),
    ("layer_norm", lambda x: (x, x.shape[1:])),
    ("group_norm", lambda x: (x, 2)),
    ("instance_norm", lambda x: (x,)),
    ("rms_norm", lambda x: (x, x.shape[-1:])),
    ("position_norm", lambda x: (x,)),
])
def test_scale_invariance_and_gradient_scaling(name, args, rng):
    """f(a·x) = f(x) and ∂f/∂x at a·x = (1/a)·∂f/∂x at x (survey Eqns 32–33). With ε the identities
    are exact in the form f_ε(a·x) = f_{ε/a²}(x) (the ε term scales with σ²), so the only error left is
    round-off: TOL64."""
    m = normref.get(name)
    x = rng.standard_normal((4, 4, 3))
    a, eps = 7.5, 1e-3
    y1, pb1 = normref.vjp(m, *args(x), eps=eps / a**2)
    y2, pb2 = normref.vjp(m, *args(a * x), eps=eps)
    g = rng.standard_normal(y1.shape)
    assert _rel(y2, y1) <= TOL64
    assert _rel(a * pb2(g)[0], pb1(g)[0]) <= TOL64
    # the gradient of a scale-invariant function is orthogonal to its input: ⟨∂L/∂x, x⟩ = 0 (Eqn 33),
    # up to the ε term, which contributes ⟨∂L/∂x, x⟩ = O(ε/σ²)·‖g‖‖x‖; with ε = 1e-14 that is round-off
    _, pb0 = normref.vjp(m, *args(x), eps=1e-14)
    d0 = pb0(g)[0]
    assert abs(float(np.sum(d0 * x))) <= TOL64 * np.linalg.norm(d0) * np.linalg.norm(x)


@pytest.mark.parametrize("name,args", [
    ("batch_norm", lambda x: (x, None, None, None, None, True)),
    ("layer_norm", lambda x: (x, x.shape[1:])),
    ("group_norm", lambda x: (x, 2)),
])
def test_shift_invariance(name, args, rng):
    """Standardizing removes the mean of each partition: f(x + c) = f(x) for a constant c."""
    m = normref.get(name)
    x = rng.standard_normal((4, 4, 3))
    assert _rel(m(*args(x + 5.0)), m(*args(x))) <= 1e-12


def test_inputs_never_mutated(rng):
    for m in FAMILY:
        for ex in _cases(m, seed=4):
            before = [a.copy() if isinstance(a, np.ndarray) else a for a in ex.args]
            out, pb = normref.vjp(m, *ex.args, **ex.kwargs)
            g = np.ones(m.primary(out).shape)
            g0 = g.copy()
            pb(g)
            for a, b in zip(ex.args, before):
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, b, err_msg=m.name)
            np.testing.assert_array_equal(g, g0)


def test_compositions_equal_presets(rng):
    x = rng.standard_normal((4, 6, 3, 2))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    assert _rel(normref.normalize(x, w, b, partition="group", num_groups=3), normref.group_norm(x, 3, w, b)) <= TOL64
    assert _rel(normref.normalize(x, w, b, partition="instance"), normref.instance_norm(x, weight=w, bias=b)) <= TOL64
    assert _rel(normref.normalize(x, partition="position", operation="scaling", eps=1e-8), normref.pixel_norm(x)) <= TOL64
    assert _rel(normref.normalize(x, w, b, partition="batch"), normref.batch_norm(x, None, None, w, b, True)) <= TOL64
    # ghost BN == batch norm on each virtual batch in turn, running statistics included
    rm, rv = rng.standard_normal(6), rng.uniform(0.5, 2, 6)
    y, grm, grv = normref.ghost_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, 2)
    pieces, crm, crv = [], rm, rv
    for i in range(2):
        yi, crm, crv = normref.batch_norm(x[2 * i: 2 * i + 2], crm, crv, w, b, True, 0.1)
        pieces.append(yi)
    assert _rel(y, np.concatenate(pieces)) <= TOL64 and _rel(grm, crm) <= TOL64 and _rel(grv, crv) <= TOL64
    # batch renorm with running statistics equal to the batch's gives r = 1, d = 0: batch norm
    mu = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    yr = normref.batch_renorm(x, mu, var, w, b, True).output
    assert _rel(yr, normref.batch_norm(x, None, None, w, b, True)) <= 1e-12
    # Lp with p = 2: standardizing with ε outside the root
    xc = x - x.mean(axis=(0, 2, 3), keepdims=True)
    sd = np.sqrt((xc**2).mean(axis=(0, 2, 3), keepdims=True))
    assert _rel(normref.lp_batch_norm(x, training=True, p=2.0, eps=1e-3), xc / (sd + 1e-3)) <= TOL64
    # L1 with the √(π/2) factor, and p = ∞
    s1 = np.abs(xc).mean(axis=(0, 2, 3), keepdims=True) * math.sqrt(math.pi / 2)
    assert _rel(normref.lp_batch_norm(x, training=True, p=1.0), xc / (s1 + 1e-5)) <= TOL64
    sinf = np.abs(xc).max(axis=(0, 2, 3), keepdims=True)
    assert _rel(normref.lp_batch_norm(x, training=True, p=math.inf), xc / (sinf + 1e-5)) <= TOL64


def test_filter_response_norm_formula(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    w, b, tau = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3)
    nu2 = (x**2).mean(axis=(2, 3), keepdims=True)
    y = w[None, :, None, None] * x / np.sqrt(nu2 + 1e-6) + b[None, :, None, None]
    ref = np.maximum(y, tau[None, :, None, None])
    assert _rel(normref.filter_response_norm(x, w, b, tau), ref) <= TOL64


def test_lp_infinity_ties_split_equally():
    """p = ∞ with two samples tied at the maximum deviation: the subgradient is shared equally."""
    x = np.array([[-1.0], [1.0], [0.0], [0.0]])  # one channel, |u| = 1 at two places
    _, pb = normref.vjp(normref.lp_batch_norm, x, training=True, p=math.inf, eps=1e-5)
    g = np.array([[1.0], [0.0], [0.0], [0.0]])
    dx = pb(g)[0]
    s = 1.0 + 1e-5
    # x̂_0 = −1/s; ∂x̂_0/∂x_j = (δ_0j − 1/4)/s + (1/s²)·∂σ/∂x_j with σ's subgradient ½·sign at the ties
    expected = np.array([3 / 4, -1 / 4, -1 / 4, -1 / 4]) / s + (1 / s**2) * np.array([-0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(dx[:, 0], expected, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# hypothesis: shapes from 1-D to 5-D, group counts, eps


@st.composite
def _layer_case(draw):
    nd = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    k = draw(st.integers(1, nd))
    if math.prod(shape[nd - k:]) < 2:
        shape = shape[: nd - 1] + (3,)
    return shape, k, draw(st.sampled_from([1e-5, 1e-3, 0.1])), draw(st.integers(0, 2**31))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layer_case())
def test_hypothesis_layer_and_rms(case):
    shape, k, eps, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2 + 1
    ns = shape[len(shape) - k:]
    w, b = rng.standard_normal(ns), rng.standard_normal(ns)
    for m, args in [(normref.layer_norm, (x, ns, w, b)), (normref.rms_norm, (x, ns, w))]:
        r = fd_check(m, args, dict(eps=eps), seed=seed % 1000)
        assert r.max_error <= 1e-6, (m.name, shape, k, eps, r.errors)
        y = m(*args, eps=eps)
        t = torch.tensor(x)
        ref = (F.layer_norm(t, ns, torch.tensor(w), torch.tensor(b), eps) if m is normref.layer_norm
               else F.rms_norm(t, ns, torch.tensor(w), eps))
        assert _rel(y, ref.numpy()) <= TOL64


@st.composite
def _channel_case(draw):
    nd = draw(st.integers(2, 5))
    g = draw(st.integers(1, 3))
    c = g * draw(st.integers(1, 3))
    n = draw(st.integers(2, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=nd - 2, max_size=nd - 2)))
    return (n, c) + spatial, g, draw(st.integers(0, 2**31))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_channel_case())
def test_hypothesis_channel_partitions(case):
    shape, g, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 1.5 - 0.5
    c = shape[1]
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    calls = [(normref.group_norm, (x, g, w, b), {}), (normref.batch_norm, (x, None, None, w, b, True), {})]
    if math.prod(shape[2:]) > 1:
        calls.append((normref.instance_norm, (x, None, None, w, b), {}))
    for m, args, kw in calls:
        r = fd_check(m, args, kw, seed=seed % 1000)
        assert r.max_error <= 1e-6, (m.name, shape, g, r.errors)
    t = [torch.tensor(a) for a in (x, w, b)]
    assert _rel(normref.group_norm(x, g, w, b), F.group_norm(t[0], g, t[1], t[2]).numpy()) <= TOL64
    assert _rel(normref.batch_norm(x, None, None, w, b, True), F.batch_norm(t[0], None, None, t[1], t[2], True).numpy()) <= TOL64


def test_non_contiguous_numpy_inputs(rng):
    base = rng.standard_normal((6, 5, 8, 4))
    x = base[::2, :, 1::2, :].transpose(0, 1, 3, 2)  # strided and transposed view
    assert not x.flags.c_contiguous
    xc = np.ascontiguousarray(x)
    for m, args in [(normref.group_norm, (5,)), (normref.layer_norm, (x.shape[1:],)), (normref.instance_norm, ())]:
        # same values, possibly another summation order (kernels walk memory as it lies): TOL64
        assert _rel(m(x, *args), m(xc, *args)) <= TOL64


def test_torch_parameters_mix_with_tensors(rng):
    """nn.Parameter is a Tensor subclass: it must be accepted beside plain tensors (one library)."""
    x = torch.tensor(rng.standard_normal((4, 6, 3)))
    w = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    assert _rel(normref.group_norm(x, 3, w, b).detach().numpy(), F.group_norm(x, 3).numpy()) <= TOL64


def test_jax_traced_inputs_mix_with_concrete_arrays(rng):
    """Under jit a traced input has no concrete device and another type than a captured constant."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    from normref.conformance.backends import get_backend

    get_backend("jax")  # enables float64
    x = rng.standard_normal((4, 6, 3))
    w = jnp.asarray(rng.standard_normal(6))
    eager = normref.group_norm(jnp.asarray(x), 3, w)
    jitted = jax.jit(lambda t: normref.group_norm(t, 3, w))(jnp.asarray(x))
    assert _rel(np.asarray(jitted), np.asarray(eager)) <= TOL64
