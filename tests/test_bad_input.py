"""Issue 11's bad-input list for the activation methods (standardization, framework, combination,
local): every row is a call that used to give a silent NaN, a wrong answer or an unclear error, and
now gives the formula's answer or a clear ``ValueError``/``TypeError`` naming the function and the
argument.

The table runs per method on every installed library (the ``backend`` fixture: numpy with and
without kernels, torch, jax, array_api_strict); rows that only make sense for one library (``out=``
is NumPy/CuPy only, ``np.ma.MaskedArray``) are NumPy tests of their own. Whitening, weight and
gradient methods have the same table in ``tests/test_bad_input_weights.py``.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

import normref
from tests.conftest import On

X = np.random.default_rng(11).standard_normal((4, 6, 3, 2))
C = np.ones(6)
Z = np.zeros(6)
NEG = np.array([1.0, 0.5, -0.25, 1.0, 2.0, 1.0])  # a running variance with one negative entry
L3 = np.zeros(3)  # switchable_norm's logits


_On = On  # tests/conftest.py


def _raises(exc, pattern, call, *args):
    with pytest.raises(exc, match=pattern) as info:
        call(*args)
    msg = str(info.value)
    assert re.match(r"^[a-z_.]+: ", msg), f"message does not name the function: {msg}"
    return msg


# (id, call taking the converter `a`, exception, pattern of the message)
CASES = [
    # -- item 1: a negative running variance / running scale (concrete values) ---------------------
    ("bn-eval-negvar", lambda a: normref.batch_norm(a(X), a(Z), a(NEG)), ValueError, r"running_var must be >= 0.*-0.25"),
    ("bn-train-negvar", lambda a: normref.batch_norm(a(X), a(Z), a(NEG), training=True), ValueError, r"running_var must be >= 0"),
    ("in-stats-negvar", lambda a: normref.instance_norm(a(X), a(Z), a(NEG), use_input_stats=False), ValueError, r"running_var must be >= 0"),
    ("in-train-negvar", lambda a: normref.instance_norm(a(X), a(Z), a(NEG)), ValueError, r"running_var must be >= 0"),
    ("renorm-negvar", lambda a: normref.batch_renorm(a(X), a(Z), a(NEG), training=True), ValueError, r"running_var must be >= 0"),
    ("renorm-eval-negvar", lambda a: normref.batch_renorm(a(X), a(Z), a(NEG)), ValueError, r"running_var must be >= 0"),
    ("ghost-eval-negvar", lambda a: normref.ghost_batch_norm(a(X), a(Z), a(NEG), virtual_batch_size=2), ValueError, r"ghost_batch_norm: running_var must be >= 0"),
    ("ghost-train-negvar", lambda a: normref.ghost_batch_norm(a(X), a(Z), a(NEG), training=True, virtual_batch_size=2), ValueError, r"running_var must be >= 0"),
    ("sn-eval-negvar", lambda a: normref.switchable_norm(a(X), a(L3), a(L3), None, None, a(Z), a(NEG)), ValueError, r"running_var must be >= 0"),
    ("sn-train-negvar", lambda a: normref.switchable_norm(a(X), a(L3), a(L3), None, None, a(Z), a(NEG), training=True), ValueError, r"running_var must be >= 0"),
    ("bin-eval-negvar", lambda a: normref.batch_instance_norm(a(X), a(C * 0.5), None, None, a(Z), a(NEG)), ValueError, r"running_var must be >= 0"),
    ("lp-eval-negscale", lambda a: normref.lp_batch_norm(a(X), a(Z), a(NEG)), ValueError, r"running_scale must be >= 0"),
    ("lp-train-negscale", lambda a: normref.lp_batch_norm(a(X), a(Z), a(NEG), training=True), ValueError, r"running_scale must be >= 0"),
    # -- item 5: eps that rounds to 0 in the float32 compute dtype (a constant group gave NaN) -----
    ("gn-eps-underflow", lambda a: normref.group_norm(a.f32(np.ones((2, 6, 3))), 2, eps=1e-50), ValueError, r"group_norm: eps .*rounds to 0 in float32"),
    ("ln-eps-underflow", lambda a: normref.layer_norm(a.f32(np.ones((2, 6))), 6, eps=1e-50), ValueError, r"layer_norm: eps .*rounds to 0"),
    ("bn-eps-underflow", lambda a: normref.batch_norm(a.f32(X), None, None, training=True, eps=1e-46), ValueError, r"batch_norm: eps .*rounds to 0"),
    ("in-eps-underflow", lambda a: normref.instance_norm(a.f32(X), eps=1e-50), ValueError, r"instance_norm: eps .*rounds to 0"),
    ("rms-eps-underflow", lambda a: normref.rms_norm(a.f32(X), 2, eps=1e-50), ValueError, r"rms_norm: eps .*rounds to 0"),
    ("pix-eps-underflow", lambda a: normref.pixel_norm(a.f32(X), eps=1e-50), ValueError, r"pixel_norm: eps .*rounds to 0"),
    ("frn-eps-underflow", lambda a: normref.filter_response_norm(a.f32(X), eps=1e-50), ValueError, r"filter_response_norm: eps .*rounds to 0"),
    ("lp-eps-underflow", lambda a: normref.lp_batch_norm(a.f32(X), training=True, eps=1e-50), ValueError, r"lp_batch_norm: eps .*rounds to 0"),
    ("renorm-eps-underflow", lambda a: normref.batch_renorm(a.f32(X), a.f32(Z), a.f32(C), training=True, eps=1e-50), ValueError, r"batch_renorm: eps .*rounds to 0"),
    ("ghost-eps-underflow", lambda a: normref.ghost_batch_norm(a.f32(X), None, None, training=True, eps=1e-50), ValueError, r"ghost_batch_norm: eps .*rounds to 0"),
    ("sn-eps-underflow", lambda a: normref.switchable_norm(a.f32(X), a.f32(L3), a.f32(L3), training=True, eps=1e-50), ValueError, r"switchable_norm: eps .*rounds to 0"),
    ("bin-eps-underflow", lambda a: normref.batch_instance_norm(a.f32(X), a.f32(C * 0.5), training=True, eps=1e-50), ValueError, r"batch_instance_norm: eps .*rounds to 0"),
    ("adalin-eps-underflow", lambda a: normref.adaptive_layer_instance_norm(a.f32(X), a.f32(C * 0.5), eps=1e-50), ValueError, r"adaptive_layer_instance_norm: eps .*rounds to 0"),
    ("normalize-eps-underflow", lambda a: normref.normalize(a.f32(X), eps=1e-50), ValueError, r"normalize: eps .*rounds to 0"),
    # -- item 9: flags are bools, not truthiness -----------------------------------------------------
    ("bn-training-str", lambda a: normref.batch_norm(a(X), None, None, training="False"), TypeError, r"batch_norm: training must be a bool.*'False'"),
    ("bn-training-int", lambda a: normref.batch_norm(a(X), a(Z), a(C), training=1), TypeError, r"training must be a bool"),
    ("in-use-input-stats-str", lambda a: normref.instance_norm(a(X), a(Z), a(C), use_input_stats="False"), TypeError, r"instance_norm: use_input_stats must be a bool"),
    ("lp-training-str", lambda a: normref.lp_batch_norm(a(X), training="yes"), TypeError, r"lp_batch_norm: training must be a bool"),
    ("lp-l1-factor-str", lambda a: normref.lp_batch_norm(a(X), training=True, p=1.0, l1_factor="no"), TypeError, r"lp_batch_norm: l1_factor must be a bool"),
    ("renorm-training-str", lambda a: normref.batch_renorm(a(X), a(Z), a(C), training="False"), TypeError, r"batch_renorm: training must be a bool"),
    ("ghost-training-str", lambda a: normref.ghost_batch_norm(a(X), a(Z), a(C), training="False"), TypeError, r"ghost_batch_norm: training must be a bool"),
    ("mo-training-str", lambda a: normref.mean_only_batch_norm(a(X), a(Z), training="False"), TypeError, r"mean_only_batch_norm: training must be a bool"),
    ("sn-training-str", lambda a: normref.switchable_norm(a(X), a(L3), a(L3), None, None, a(Z), a(C), training="False"), TypeError, r"switchable_norm: training must be a bool"),
    ("bin-training-str", lambda a: normref.batch_instance_norm(a(X), a(C * 0.5), None, None, a(Z), a(C), training="False"), TypeError, r"batch_instance_norm: training must be a bool"),
    ("normalize-l1-factor-str", lambda a: normref.normalize(a(X), operation="lp", l1_factor="True"), TypeError, r"normalize: l1_factor must be a bool"),
    # -- item 10: arguments the call does not use are still checked ----------------------------------
    ("normalize-p-unused", lambda a: normref.normalize(a(X), p=-1), ValueError, r"normalize: p must be >= 1"),
    ("normalize-iterations-unused", lambda a: normref.normalize(a(X), iterations=-3), ValueError, r"normalize: iterations must be an integer >= 1; got -3"),
    ("normalize-num-groups-unused", lambda a: normref.normalize(a(X), partition="batch", num_groups=-1), ValueError, r"normalize: num_groups must be an integer >= 1"),
    ("normalize-batch-groups-unused", lambda a: normref.normalize(a(X), partition="group", num_groups=2, batch_groups=0), ValueError, r"normalize: batch_groups must be an integer >= 1"),
    ("normalize-normalized-ndim-unused", lambda a: normref.normalize(a(X), partition="instance", normalized_ndim=0), ValueError, r"normalize: normalized_ndim must be an integer >= 1"),
    ("normalize-l1-factor-unused", lambda a: normref.normalize(a(X), l1_factor=3), TypeError, r"normalize: l1_factor must be a bool"),
    ("bn-num-batches-unused", lambda a: normref.batch_norm(a(X), a(Z), a(C), training=True, num_batches_tracked=-2), ValueError, r"batch_norm: num_batches_tracked must be an integer >= 0"),
    ("lrn-size-float", lambda a: normref.local_response_norm(a(X), 2.0), TypeError, r"local_response_norm: size must be an integer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(backend, case):
    _, call, exc, pattern = case
    _raises(exc, pattern, call, _On(backend))


def test_flags_accept_numpy_bools(backend):
    """np.bool_ (and a 0-d bool array) is a bool: accepted wherever True/False is."""
    a = _On(backend)
    y1 = normref.batch_norm(a(X), None, None, training=np.bool_(True))
    y2 = normref.batch_norm(a(X), None, None, training=True)
    np.testing.assert_array_equal(backend.to_numpy(y1), backend.to_numpy(y2))
    normref.instance_norm(a(X), a(Z), a(C), use_input_stats=np.bool_(False))
    normref.lp_batch_norm(a(X), training=np.array(True), p=1.0, l1_factor=np.bool_(False))


def test_use_kernels_flag():
    with pytest.raises(TypeError, match=r"use_kernels: enabled must be a bool.*'False'"):
        with normref.use_kernels("False"):
            pass
    with normref.use_kernels(np.bool_(False)):
        pass


# -- item 1 under tracing: the check needs concrete values and is skipped, not an error ------------


def test_negative_running_var_skipped_under_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = jnp.asarray(X, dtype=jnp.float32)
    f = jax.jit(lambda rv: normref.batch_norm(x, jnp.zeros(6), rv))
    y = f(jnp.ones(6))  # traced running_var: nothing to inspect, the call runs
    assert y.shape == X.shape


def test_negative_running_var_skipped_under_torch_vmap():
    torch = pytest.importorskip("torch")
    x = torch.as_tensor(X)
    rvs = torch.ones(2, 6, dtype=torch.float64)
    y = torch.func.vmap(lambda rv: normref.batch_norm(x, torch.zeros(6, dtype=torch.float64), rv))(rvs)
    assert tuple(y.shape) == (2,) + X.shape


# -- item 2: out= overlapping any input (NumPy: out= is a NumPy/CuPy feature) ----------------------


def _out_cases():
    def bn(which):
        def call():
            buf = np.empty_like(X)
            view = buf[0, :, 0, 0]  # a (6,) view into out's memory
            args = dict(running_mean=Z.copy(), running_var=C.copy(), weight=C.copy(), bias=Z.copy())
            view[...] = args[which]
            args[which] = view
            return normref.batch_norm(X, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                                      training=False, out=buf)
        return call

    def gn(which):
        def call():
            buf = np.empty_like(X)
            view = buf[1, :, 1, 0]
            view[...] = 1.0
            kw = {"weight": C.copy(), "bias": Z.copy()}
            kw[which] = view
            return normref.group_norm(X, 2, kw["weight"], kw["bias"], out=buf)
        return call

    def ln():
        buf = np.empty_like(X)
        w = buf[0, 0]
        w[...] = 1.0
        return normref.layer_norm(X, (3, 2), w, None, out=buf)

    def rms():
        buf = np.empty_like(X)
        w = buf[2, 3]
        w[...] = 1.0
        return normref.rms_norm(X, (3, 2), w, out=buf)

    def inorm():
        buf = np.empty_like(X)
        rv = buf[0, :, 0, 1]
        rv[...] = 1.0
        return normref.instance_norm(X, Z.copy(), rv, use_input_stats=False, out=buf)

    return [("bn-weight", bn("weight"), "weight"), ("bn-bias", bn("bias"), "bias"),
            ("bn-running-mean", bn("running_mean"), "running_mean"), ("bn-running-var", bn("running_var"), "running_var"),
            ("gn-weight", gn("weight"), "weight"), ("gn-bias", gn("bias"), "bias"),
            ("ln-weight", ln, "weight"), ("rms-weight", rms, "weight"), ("in-running-var", inorm, "running_var")]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "formula"])
@pytest.mark.parametrize("case", _out_cases(), ids=[c[0] for c in _out_cases()])
def test_out_overlapping_an_input(case, kernels):
    _, call, name = case
    with normref.use_kernels(kernels):
        _raises(ValueError, rf"out must not share memory with {name}", call)


# -- item 3: filter response normalization with tau: NaN in, NaN out (forward and backward) ----------


def test_frn_tau_propagates_nan(backend):
    a = _On(backend)
    x = X.copy()
    x[1, 2, 0, 1] = np.nan  # instance (1, 2) is NaN; the others stay finite
    w, b, tau = np.full(6, 0.5), np.full(6, 0.1), np.full(6, 10.0)  # tau above every finite y
    y, pullback = normref.vjp(normref.filter_response_norm, a(x), a(w), a(b), a(tau))
    yn = backend.to_numpy(y)
    assert np.isnan(yn[1, 2]).all(), "the NaN instance must come out NaN, not tau"
    mask = np.ones(yn.shape, bool)
    mask[1, 2] = False
    np.testing.assert_array_equal(yn[mask], 10.0)  # the finite instances: max(y, tau) = tau exactly
    dx, dw, db, dtau = (backend.to_numpy(t) for t in pullback(a(np.ones_like(x))))
    assert np.isnan(dx[1, 2]).all()
    assert np.isfinite(dx[mask]).all()
    assert np.isnan(dtau[2]) and np.isfinite(np.delete(dtau, 2)).all()
    # where y < τ everywhere (the finite channels), dτ is the count of positions: 4 samples × 6
    np.testing.assert_array_equal(np.delete(dtau, 2), 24.0)
    assert np.isnan(dw[2]) and np.isnan(db[2])


def test_frn_nan_tau_propagates(backend):
    a = _On(backend)
    tau = np.zeros(6)
    tau[4] = np.nan
    y = backend.to_numpy(normref.filter_response_norm(a(X), None, None, a(tau)))
    assert np.isnan(y[:, 4]).all() and np.isfinite(np.delete(y, 4, axis=1)).all()


# -- item 4: ndarray subclasses whose semantics normref does not implement ---------------------------


@pytest.mark.parametrize("make,name", [
    (lambda: np.ma.masked_array(X, mask=X > 1.0), "MaskedArray"),
    (lambda: np.asmatrix(X[:, :, 0, 0]), "matrix"),
], ids=["masked", "matrix"])
def test_ndarray_subclasses_refused(make, name):
    with pytest.raises(TypeError, match=rf"batch_norm: input must be a plain numpy.ndarray.*got {name}"):
        normref.batch_norm(make(), None, None, training=True)
    with pytest.raises(TypeError, match=r"group_norm: weight must be a plain numpy.ndarray.*got MaskedArray"):
        normref.group_norm(X, 2, np.ma.masked_array(C))


def test_memmap_and_parameters_accepted(tmp_path):
    mm = np.memmap(tmp_path / "x.bin", dtype=np.float64, mode="w+", shape=X.shape)
    mm[...] = X
    np.testing.assert_array_equal(np.asarray(normref.group_norm(mm, 2)), normref.group_norm(X, 2))
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    y = normref.group_norm(torch.as_tensor(X), 2, p)
    np.testing.assert_allclose(y.detach().numpy(), normref.group_norm(X, 2), rtol=0, atol=1e-12)


# -- item 5: a representable tiny eps still works (float64 compute, subnormal float32) --------------


def test_tiny_eps_that_is_representable(backend):
    a = _On(backend)
    y64 = backend.to_numpy(normref.group_norm(a(np.ones((2, 6, 3))), 2, eps=1e-50))
    np.testing.assert_array_equal(y64, 0.0)  # (x − μ) = 0 exactly, √(0 + 1e-50) > 0 in float64
    y32 = backend.to_numpy(normref.group_norm(a.f32(np.ones((2, 6, 3))), 2, eps=2e-38))  # a float32 normal
    np.testing.assert_array_equal(y32, 0.0)
    # a float32 subnormal is refused too: XLA (JAX on CPU) flushes it to 0 and gave NaN here
    with pytest.raises(ValueError, match=r"group_norm: eps = 1e-44 rounds to 0 in float32"):
        normref.group_norm(a.f32(np.ones((2, 6, 3))), 2, eps=1e-44)


# -- item 6: empty batches (N = 0 or C = 0 or a zero spatial size) ----------------------------------


def _empty_calls(shape):
    c = shape[1]
    o, z = np.ones(c), np.zeros(c)
    g = 1 if c == 0 else 2
    nd = len(shape)
    # (id, method, args, kwargs, indices of the running statistics in the result tuple's inputs)
    return [
        ("batch_norm-train", normref.batch_norm, lambda x: (x, z, o, o, z), dict(training=True), (1, 2)),
        ("batch_norm-eval", normref.batch_norm, lambda x: (x, z, o, o, z), {}, None),
        ("instance_norm", normref.instance_norm, lambda x: (x, z, o, o, z), {}, (1, 2)),
        ("layer_norm", normref.layer_norm, lambda x: (x, shape[2:], np.ones(shape[2:]), np.zeros(shape[2:])), {}, None),
        ("rms_norm", normref.rms_norm, lambda x: (x, shape[2:], np.ones(shape[2:])), {}, None),
        ("group_norm", normref.group_norm, lambda x: (x, g, o, z), {}, None),
        ("batch_group_norm", normref.batch_group_norm, lambda x: (x, g, o, z), {}, None),
        ("position_norm", normref.position_norm, lambda x: (x, o, z), {}, None),
        ("pixel_norm", normref.pixel_norm, lambda x: (x,), {}, None),
        ("mean_only_batch_norm", normref.mean_only_batch_norm, lambda x: (x, z, z), dict(training=True), (1,)),
        ("filter_response_norm", normref.filter_response_norm, lambda x: (x, o, z, z), {}, None),
        ("lp_batch_norm", normref.lp_batch_norm, lambda x: (x, z, o, o, z), dict(training=True), (1, 2)),
        ("batch_renorm", normref.batch_renorm, lambda x: (x, z, o, o, z), dict(training=True), (1, 2)),
        ("ghost_batch_norm", normref.ghost_batch_norm, lambda x: (x, z, o, o, z), dict(training=True), (1, 2)),
        ("switchable_norm", normref.switchable_norm, lambda x: (x, L3, L3, o, z, z, o), dict(training=True), (5, 6)),
        ("batch_instance_norm", normref.batch_instance_norm, lambda x: (x, o * 0.5, o, z, z, o), dict(training=True), (4, 5)),
        ("adaptive_layer_instance_norm", normref.adaptive_layer_instance_norm, lambda x: (x, o * 0.5, o, z), {}, None),
        ("local_response_norm", normref.local_response_norm, lambda x: (x, 3), {}, None),
        ("normalize", normref.normalize, lambda x: (x, o, z), {}, None),
        ("normalize-group", normref.normalize, lambda x: (x, o, z), dict(partition="group", num_groups=g), None),
        ("normalize-layer", normref.normalize, lambda x: (x,), dict(partition="layer", normalized_ndim=nd - 1), None),
    ]


EMPTY_SHAPES = [(0, 4, 3, 2), (2, 0, 3, 2), (2, 4, 0, 2)]
EMPTY_CASES = [(shape, i) for shape in EMPTY_SHAPES for i in range(len(_empty_calls(shape)))]


@pytest.mark.filterwarnings("error")  # no "mean of empty slice" / "invalid value" either
@pytest.mark.parametrize("shape,i", EMPTY_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{_empty_calls(s)[i][0]}" for s, i in EMPTY_CASES])
def test_empty_batch(shape, i):
    """An empty input gives an empty output (input's shape and dtype), the running statistics back
    unchanged, and a backward with an empty dx and zero parameter gradients — what torch 2.13 does
    for batch_norm, group_norm and layer_norm (its instance_norm returns NaN running statistics with
    N = 0: not followed). Every method and empty shape on NumPy; every library below."""
    from normref.conformance.backends import get_backend

    _check_empty(get_backend("numpy"), shape, i)


@pytest.mark.parametrize("i", range(len(_empty_calls(EMPTY_SHAPES[0]))),
                         ids=[c[0] for c in _empty_calls(EMPTY_SHAPES[0])])
def test_empty_batch_every_library(backend, i):
    if backend.name.startswith("numpy"):
        pytest.skip("NumPy: every shape in test_empty_batch")
    _check_empty(backend, EMPTY_SHAPES[0], i)


def _check_empty(backend, shape, i):
    _, m, make, kw, running = _empty_calls(shape)[i]
    a = _On(backend)
    args = tuple(a(t) if isinstance(t, np.ndarray) else t for t in make(np.zeros(shape)))
    out, pullback = normref.vjp(m, *args, **kw)
    y = out[0] if isinstance(out, tuple) else out
    assert tuple(y.shape) == shape and y.dtype == args[0].dtype
    if running is not None:
        assert isinstance(out, tuple) and len(out) == len(running) + 1
        for r, j in zip(out[1:], running):
            np.testing.assert_array_equal(backend.to_numpy(r), backend.to_numpy(args[j]))
    grads = pullback(a(np.zeros(shape)))
    names = m.array_params
    bound = m.bind(*args, **kw).arguments
    for p, gr in zip(names, grads):
        given = bound.get(p)
        if p == names[0]:
            assert tuple(gr.shape) == shape
        elif given is None or p in m.nondiff:
            assert gr is None
        else:
            gn = backend.to_numpy(gr)
            assert gn.shape == tuple(given.shape)
            np.testing.assert_array_equal(gn, 0.0)


def test_empty_batch_torch_autograd():
    """Through the torch adapter: backward on an empty batch gives torch's own result (an empty
    dx and zero weight/bias gradients, as F.batch_norm gives)."""
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x = torch.zeros(0, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    y, rm, rv = nt.batch_norm(x, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), w, b, True)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(rv, torch.ones(4, dtype=torch.float64)) and torch.equal(rm, torch.zeros(4, dtype=torch.float64))


# -- item 7: local response normalization with a huge window -----------------------------------------


def _lrn_reference(x, size, alpha, beta, k):
    """The formula with the full (unclipped) window, one channel at a time (float64)."""
    c = x.shape[1]
    s = np.empty_like(x)
    for i in range(c):
        lo, hi = i - size // 2, i + (size - 1) // 2
        js = list(range(max(lo, 0), min(hi, c - 1) + 1))  # the window's channels that exist
        s[:, i] = k + alpha / size * (x[:, js] ** 2).sum(axis=1)
    return x * s ** (-beta)


@pytest.mark.parametrize("size", [6, 7, 8, 11, 12, 13, 50])
def test_lrn_window_wider_than_channels(backend, size):
    """size ≥ C: clipping the window to the channels gives the unclipped formula exactly (every
    channel past the edge is zero padding); α/n keeps the given n."""
    a = _On(backend)
    y = backend.to_numpy(normref.local_response_norm(a(X), size, alpha=2.0, beta=0.75, k=1.0))
    # float64 with O(C) additions: a few ε₆₄
    np.testing.assert_allclose(y, _lrn_reference(X, size, 2.0, 0.75, 1.0), rtol=1e-14, atol=1e-15)


def test_lrn_huge_size_is_bounded(monkeypatch):
    """The work is bounded by C, not by size: count the shifted adds (size = 10**4 took 10**4 of
    them before; 10**12 never returned)."""
    from normref import local as _local

    calls = []
    real = _local._shift
    monkeypatch.setattr(_local, "_shift", lambda xp, t, d: calls.append(d) or real(xp, t, d))
    y, pullback = normref.vjp(normref.local_response_norm, X, 10**4)
    pullback(np.ones_like(X))
    assert len(calls) <= 4 * X.shape[1], len(calls)
    y12 = normref.local_response_norm(X, 10**12)
    np.testing.assert_allclose(y12, _lrn_reference(X, 10**12, 1e-4, 0.75, 1.0), rtol=1e-14)


# -- item 8: None for a required array argument -------------------------------------------------------


# array parameters without a default for which None means something (no running statistics; the
# gradient methods' optional weight) or that have their own ValueError (batch_renorm needs them)
NULLABLE = {("batch_norm", "running_mean"), ("batch_norm", "running_var"),
            ("ghost_batch_norm", "running_mean"), ("ghost_batch_norm", "running_var"),
            ("batch_renorm", "running_mean"), ("batch_renorm", "running_var"),
            ("block_gradient_norm", "weight"), ("lars", "weight"), ("gradient_centralization", "weight")}


def _none_cases():
    return [(m.name, p) for m in normref.methods() for p in m.array_params
            if m.signature.parameters[p].default is inspect.Parameter.empty and (m.name, p) not in NULLABLE]


NONE_CASES = _none_cases()


def test_required_arrays_cover_the_issue():
    """The registry's ``required`` is exactly the array parameters without a default that are not
    nullable, and covers the issue's 26 methods."""
    assert len({m for m, p in NONE_CASES}) >= 26
    for m in normref.methods():
        want = {p for p in m.array_params
                if m.signature.parameters[p].default is inspect.Parameter.empty and (m.name, p) not in NULLABLE}
        assert set(m.required) == want, m.name


def _none_call(backend, name, param):
    m = normref.get(name)
    e = next(iter(m.examples(np.random.default_rng(0))))
    args, kwargs = backend.convert(e.args, e.kwargs)
    b = m.bind(*args, **kwargs)
    b.arguments[param] = None
    with pytest.raises(TypeError, match=rf"^{name}: {param} must be an array .*; got None"):
        m(*b.args, **b.kwargs)


@pytest.mark.parametrize("name,param", NONE_CASES, ids=[f"{m}-{p}" for m, p in NONE_CASES])
def test_none_for_a_required_array(name, param):
    """Every method, NumPy (the check is in the registry, before any array is touched)."""
    from normref.conformance.backends import get_backend

    _none_call(get_backend("numpy"), name, param)


@pytest.mark.parametrize("name,param", [("batch_norm", "input"), ("switchable_norm", "mean_weight"),
                                        ("weight_norm", "g"), ("lars", "grad")])
def test_none_for_a_required_array_every_library(backend, name, param):
    _none_call(backend, name, param)


# -- item 11: the pullback reads the caller's arrays; torch's version counter guards it -------------


def test_torch_inplace_after_forward_raises():
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x = torch.as_tensor(X).clone()  # not a leaf of the graph: the layer's input, modified after
    w = torch.ones(6, dtype=torch.float64, requires_grad=True)
    y = nt.group_norm(x, 2, w)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    x2 = torch.as_tensor(X).clone().requires_grad_(True)
    h = x2 * 1.0
    y2 = nt.layer_norm(h, (3, 2))
    h.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y2.sum().backward()


def test_vjp_contract_documents_aliasing():
    doc = normref.vjp.__doc__
    assert "in place" in doc and "pullback" in doc
