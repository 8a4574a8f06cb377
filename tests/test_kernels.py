"""The numba kernels (normref.backends.numba) against the array-API formulas they replace.

Every kernel must compute exactly the formula of its primitive; the formula (``use_kernels(False)``)
is the reference. The tests also check that the kernels actually ran (a kernel that silently declined
everything would make the comparison vacuous), the float32 stability promise, the switch that forces
the formula path, the ``out=`` buffers, and that ``import normref`` stays free of numba.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

import normref
from normref import _kernels

numba = pytest.importorskip("numba", reason="numba is not installed: the kernels cannot run")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _small_inputs_take_the_kernels():
    """The drawn inputs are small; by default the kernels leave inputs under config.MIN_SIZE elements
    to the formula (faster there). Lower the threshold so that these tests exercise the kernels."""
    from normref.backends.numba import config

    saved = config.MIN_SIZE
    config.MIN_SIZE = 0
    yield
    config.MIN_SIZE = saved


KERNELS = ("moments", "mean_square", "normalize_forward", "normalize_backward")


@contextlib.contextmanager
def kernel_log():
    """Record every registered kernel call as (name, ran): ran is False where the kernel declined."""
    _kernels.lookup(np, "moments")  # load the numpy backend
    log: list[tuple[str, bool]] = []
    saved = {}
    for name in KERNELS:
        key = ("numpy", name)
        fn = _kernels._KERNELS[key]
        saved[key] = fn

        def wrapped(*a, _fn=fn, _name=name, **k):
            r = _fn(*a, **k)
            log.append((_name, r is not None))
            return r

        _kernels._KERNELS[key] = wrapped
    try:
        yield log
    finally:
        _kernels._KERNELS.update(saved)


def _ran(log, name):
    return any(n == name and ok for n, ok in log)


def _forward_ran(log):
    """The fused forward kernel did the normalization."""
    return _ran(log, "normalize_forward")


def _backward_ran(log):
    return _ran(log, "normalize_backward")


# --------------------------------------------------------------------------------------------------
# layouts and calls drawn by hypothesis


def _layout(x: np.ndarray, kind: str) -> np.ndarray:
    """The same values as ``x`` (N, C, *S) in another memory layout (never a copy with x's strides)."""
    if kind == "contiguous":
        return np.ascontiguousarray(x)
    if kind == "channels_last":  # (N, *S, C) in memory, seen as (N, C, *S)
        perm = (0,) + tuple(range(2, x.ndim)) + (1,)
        inv = np.argsort(perm)
        return np.ascontiguousarray(x.transpose(perm)).transpose(inv)
    if kind == "strided":  # every other element of a twice-as-long last axis
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "reversed":  # negative strides: the kernels decline, the formula must run
        big = np.ascontiguousarray(x[..., ::-1])
        return big[..., ::-1]
    raise AssertionError(kind)


def _call(name, x, rng):
    """(method, args, kwargs) for ``name`` on x (N, C, *S), with affine parameters where it has them."""
    dt, c = x.dtype, x.shape[1]
    w = rng.standard_normal(c).astype(dt)
    b = rng.standard_normal(c).astype(dt)
    if name == "batch_norm":
        return normref.batch_norm, (x, None, None, w, b, True), {}
    if name == "batch_norm_eval":
        return normref.batch_norm, (x, rng.standard_normal(c).astype(dt), rng.uniform(0.5, 2, c).astype(dt), w, b, False), {}
    if name == "instance_norm":
        return normref.instance_norm, (x, None, None, w, b), {}
    if name == "group_norm":
        return normref.group_norm, (x, 2, w, b), {}
    if name == "group_norm_plain":
        return normref.group_norm, (x, 1), {}
    if name == "batch_group_norm":
        return normref.batch_group_norm, (x, 2, w, None), {"batch_groups": 2}
    if name == "position_norm":
        return normref.position_norm, (x, w, b), {}
    if name == "pixel_norm":
        return normref.pixel_norm, (x,), {}
    if name == "layer_norm":
        ns = x.shape[2:]
        return normref.layer_norm, (x, ns, rng.standard_normal(ns).astype(dt), rng.standard_normal(ns).astype(dt)), {}
    if name == "rms_norm":
        ns = x.shape[-1:]
        return normref.rms_norm, (x, ns, rng.standard_normal(ns).astype(dt)), {}
    if name == "spade":  # generated affine, one γ and β per element
        return normref.normalize, (x, x[:1] * 0.5, x[:1]), {"partition": "instance", "recovery": "generated"}
    raise AssertionError(name)


NAMES = ("batch_norm", "batch_norm_eval", "instance_norm", "group_norm", "group_norm_plain", "batch_group_norm",
         "position_norm", "pixel_norm", "layer_norm", "rms_norm", "spade")
TRAINING = {"batch_norm", "instance_norm", "group_norm", "group_norm_plain", "batch_group_norm",
            "position_norm", "pixel_norm", "layer_norm", "rms_norm", "spade"}


def _both_paths(m, args, kwargs, g):
    with kernel_log() as log:
        out, pull = normref.vjp(m, *args, **kwargs)
        grads = pull(g)
    with normref.use_kernels(False):
        out_r, pull_r = normref.vjp(m, *args, **kwargs)
        grads_r = pull_r(g)
    return (out, grads, log), (out_r, grads_r)


def _close(a, ref, dtype, what):
    # Both paths evaluate the same O(1)-conditioned formula (x̂ and its backward have condition number
    # of order 1 in the inputs for benign data), differing only in the rounding of the accumulations
    # (float64 in the kernels, pairwise float32/float64 in NumPy) and in the order of a few elementwise
    # operations: a few ulps of the output's scale each. 64·eps·(1 + max|ref|) leaves room for ~10
    # roundings on the largest values and the accumulated error of sums over ≤ 64 terms.
    eps = float(np.finfo(dtype).eps)
    ref = np.asarray(ref, np.float64)
    tol = 64 * eps * (1.0 + float(np.max(np.abs(ref), initial=0.0)))
    err = float(np.max(np.abs(np.asarray(a, np.float64) - ref), initial=0.0))
    assert err <= tol, f"{what}: max |kernel − formula| = {err:.3g} > {tol:.3g}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    dtype=st.sampled_from([np.float32, np.float64]),
    n=st.sampled_from([2, 4]),
    c=st.sampled_from([2, 4, 6]),
    spatial=st.lists(st.integers(2, 5), min_size=1, max_size=2),
    layout=st.sampled_from(["contiguous", "channels_last", "strided", "fortran", "reversed"]),
    offset=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_formula(name, dtype, n, c, spatial, layout, offset, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c) + tuple(spatial)
    # at least 4 values per statistic: with 2 or 3, the variance of random data is near 0 often enough
    # that rstd = (σ² + ε)^-½ amplifies rounding beyond the O(1)-conditioned bound the tolerance uses
    assume(int(np.prod(spatial)) >= 4 and (name not in ("position_norm", "pixel_norm") or c >= 4))
    x0 = (rng.standard_normal(shape) + offset).astype(dtype)
    x = _layout(x0, layout)
    np.testing.assert_array_equal(x, x0)
    m, args, kwargs = _call(name, x, rng)
    y_probe = m(*args, **kwargs)
    g = rng.standard_normal(np.shape(y_probe[0] if isinstance(y_probe, tuple) else y_probe)).astype(dtype)
    (out, grads, log), (out_r, grads_r) = _both_paths(m, args, kwargs, g)
    y, y_r = (out[0], out_r[0]) if isinstance(out, tuple) else (out, out_r)
    assert y.dtype == y_r.dtype == dtype and y.shape == y_r.shape
    _close(y, y_r, dtype, f"{name} forward")
    for i, (a, r) in enumerate(zip(grads, grads_r)):
        assert (a is None) == (r is None), f"{name}: gradient {i} present on one path only"
        if a is not None:
            assert a.shape == r.shape and a.dtype == r.dtype
            _close(a, r, dtype, f"{name} gradient {i}")
    if layout in ("contiguous", "channels_last"):
        # these layouts are what the kernels exist for: they must not have declined
        assert _forward_ran(log), f"{name}: the forward kernel did not run ({log})"
        if name in TRAINING:
            assert _backward_ran(log), f"{name}: the backward kernel did not run ({log})"
    if layout == "reversed":
        assert not _forward_ran(log), "negative strides must fall back to the formula"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "layer_norm", "rms_norm", "instance_norm"])
def test_parallel_builds_match_formula(name, layout, rng, monkeypatch):
    """The multi-threaded builds (used above SERIAL_BELOW elements) on an input above that threshold."""
    from normref.backends.numba import config

    monkeypatch.setattr(config, "SERIAL_BELOW", 1)
    x = _layout((rng.standard_normal((4, 8, 6, 5)) * 2 + 1).astype(np.float32), layout)
    m, args, kwargs = _call(name, x, rng)
    g = rng.standard_normal(x.shape).astype(np.float32)
    (out, grads, log), (out_r, grads_r) = _both_paths(m, args, kwargs, g)
    assert _forward_ran(log) and _backward_ran(log)
    _close(out, out_r, np.float32, f"{name} forward")
    for a, r in zip(grads, grads_r):
        if r is not None:
            _close(a, r, np.float32, f"{name} gradient")


def test_residuals_are_interchangeable_between_paths(rng):
    """The kernel forward saves what the formula's backward reads, and vice versa."""
    x = _layout(rng.standard_normal((3, 4, 5, 2)).astype(np.float32), "channels_last")
    w, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y_k, res_k = normref.group_norm.forward(x, 2, w, b)
    with normref.use_kernels(False):
        y_f, res_f = normref.group_norm.forward(x, 2, w, b)
        mixed_1 = normref.group_norm.backward(res_k, g)
    mixed_2 = normref.group_norm.backward(res_f, g)
    assert [None if a is None else a.shape for a in res_k.arrays] == [None if a is None else a.shape for a in res_f.arrays]
    for a, r in zip(mixed_1, mixed_2):
        if a is not None:
            _close(a, r, np.float32, "mixed-path gradient")


# --------------------------------------------------------------------------------------------------
# float32 stability: |mean|/σ = 1e4


@pytest.mark.parametrize("case", ["batch", "batch_channels_last", "instance", "group_channels_last", "layer"])
def test_float32_variance_stable_at_large_mean(case, rng):
    """Variance relative error ≤ 1e-5 in float32 when |μ|/σ = 1e4 (the issue's promise).

    Naive one-pass float32 sums lose everything here ((1e4)² = 1e8 > 1/eps32); the kernels use shifted
    sums combined in float64. The exact variance is that of the float32 data, computed in float64.
    """
    from normref import operation as op
    from normref.partition import Partition

    x0 = (1e4 + rng.standard_normal((8, 4, 16, 16))).astype(np.float32)
    part, layout = {
        "batch": (Partition("batch"), "contiguous"),
        "batch_channels_last": (Partition("batch"), "channels_last"),
        "instance": (Partition("instance"), "contiguous"),
        "group_channels_last": (Partition("group", num_groups=2), "channels_last"),
        "layer": (Partition("layer", normalized_ndim=3), "contiguous"),
    }[case]
    x = part.view(np, _layout(x0, layout))
    axes = part.axes(x0.shape)
    with kernel_log() as log:
        mu, var = op.moments(np, x, axes)
    assert _ran(log, "moments")
    exact = x.astype(np.float64).var(axis=axes, keepdims=True)
    rel = float(np.max(np.abs(var.astype(np.float64) - exact) / exact))
    assert rel <= 1e-5, f"{case}: variance relative error {rel:.3g} > 1e-5"
    # and the output really is standardized
    y = normref.batch_norm(x0, None, None, None, None, True) if case == "batch" else None
    if y is not None:
        assert abs(float(y.astype(np.float64).var()) - 1.0) < 1e-3


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_running_variance_stable_at_large_mean(layout, rng):
    """The same promise through the public function (the fused forward kernels): batch_norm's updated
    running variance with momentum 1 is the unbiased batch variance, relative error ≤ 1e-5."""
    x = _layout((1e4 + rng.standard_normal((8, 4, 16, 16))).astype(np.float32), layout)
    with kernel_log() as log:
        r = normref.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32), training=True, momentum=1.0)
    assert _forward_ran(log)
    exact = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    rel = float(np.max(np.abs(r.running_var.astype(np.float64) - exact) / exact))
    assert rel <= 1e-5, f"running variance relative error {rel:.3g} > 1e-5"


# --------------------------------------------------------------------------------------------------
# the switch, and the light import


def test_use_kernels_false_runs_no_kernel(rng):
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    with kernel_log() as log:
        with normref.use_kernels(False):
            out, pull = normref.vjp(normref.group_norm, x, 3)
            pull(np.ones_like(x))
        assert log == []
        normref.group_norm(x, 3)
        assert _forward_ran(log)


def test_tiny_inputs_are_left_to_the_formula(monkeypatch):
    from normref.backends.numba import config

    monkeypatch.setattr(config, "MIN_SIZE", 4096)
    x = np.ones((8, 16), np.float32)
    with kernel_log() as log:
        normref.layer_norm(x, 16)
        normref.layer_norm(np.ones((8, 512), np.float32), 512)
    assert [ok for n, ok in log if n == "normalize_forward"] == [False, True]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_import_normref_does_not_import_numba():
    r = _run("import sys, normref; sys.exit(1 if 'numba' in sys.modules else 0)")
    assert r.returncode == 0, r.stdout + r.stderr


def test_environment_switch_keeps_numba_unloaded():
    code = ("import sys, numpy as np, normref; normref.layer_norm(np.ones((2, 8), np.float32), 8); "
            "sys.exit(1 if 'numba' in sys.modules else 0)")
    r = _run(code, NORMREF_KERNELS="0")
    assert r.returncode == 0, r.stdout + r.stderr
    # without the switch the numba backend is registered on the first NumPy call, but numba itself is
    # imported only when a kernel runs (issue 18: a tiny input never imports it)
    r = _run(code.replace("'numba' in", "'normref.backends.numba' in"))
    assert r.returncode == 1, r.stdout + r.stderr
    r = _run(code)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------------------------------
# out= buffers


OUT_CALLS = {
    "batch_norm": lambda x, **k: normref.batch_norm(x, None, None, None, None, True, **k),
    "instance_norm": lambda x, **k: normref.instance_norm(x, **k),
    "group_norm": lambda x, **k: normref.group_norm(x, 2, **k),
    "layer_norm": lambda x, **k: normref.layer_norm(x, x.shape[-1:], **k),
    "rms_norm": lambda x, **k: normref.rms_norm(x, x.shape[-1:], **k),
}


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "formula"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("name", sorted(OUT_CALLS))
def test_out_buffer_receives_the_output(name, dtype, kernels, rng):
    x = _layout(rng.standard_normal((3, 4, 5)).astype(dtype), "channels_last")
    f = OUT_CALLS[name]
    with normref.use_kernels(kernels):
        ref = f(x)
        out = np.full(x.shape, np.nan, dtype)
        y = f(x, out=out)
    assert y is out
    np.testing.assert_array_equal(out, ref)  # same path, same arithmetic: bit-identical


def test_out_with_running_statistics_is_the_first_field(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    out = np.empty_like(x)
    r = normref.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=True, out=out)
    assert r.output is out


def test_out_does_not_alias_the_saved_residuals(rng):
    """Reusing an out= buffer must not change the gradient of an earlier call."""
    x = rng.standard_normal((4, 8)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    out = np.empty_like(x)
    _, res = normref.layer_norm.forward(x, 8, out=out)
    before = normref.layer_norm.backward(res, g)[0].copy()
    normref.layer_norm(x * 3 + 1, 8, out=out)
    np.testing.assert_array_equal(normref.layer_norm.backward(res, g)[0], before)


def test_out_validation(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"layer_norm: out must have input's shape \(3, 4, 5\)"):
        normref.layer_norm(x, 5, out=np.empty((3, 4), np.float32))
    with pytest.raises(TypeError, match="group_norm: out must have input's dtype float32; got dtype float64"):
        normref.group_norm(x, 2, out=np.empty(x.shape))
    with pytest.raises(TypeError, match="batch_norm: out must be a numpy array"):
        normref.batch_norm(x, None, None, training=True, out=[0.0])
    with pytest.raises(ValueError, match="rms_norm: out must not share memory with input"):
        normref.rms_norm(x, 5, out=x)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="instance_norm: out must be writeable"):
        normref.instance_norm(x, out=ro)


def test_out_refused_for_immutable_libraries():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.ones((2, 4, 3))
    with pytest.raises(TypeError, match="layer_norm: out= needs a library whose arrays are written in place"):
        normref.layer_norm(x, 3, out=jnp.zeros((2, 4, 3)))


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "formula"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_need_mask_skips_and_matches(kernels, layout, rng):
    """run_backward's ``need``: the gradients not asked for come back None, the others equal the full
    backward's exactly (same path, same arithmetic), on the kernel path and on the formula path."""
    from normref.framework import unpack_backward

    x = _layout(rng.standard_normal((4, 6, 9, 8)), layout)
    w, b, g = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(x.shape)
    with kernel_log() as log, normref.use_kernels(kernels):
        _, res = normref.group_norm.forward(x, 3, w, b)
        full = unpack_backward(np, res, g)
        for need in [(False, True, True), (True, False, False), (False, False, True), (True, True, False)]:
            part = unpack_backward(np, res, g, need)
            for a, f, n in zip(part[:3], full[:3], need):
                assert (a is None) == (not n)
                if n:
                    np.testing.assert_array_equal(a, f)
    assert _backward_ran(log) == kernels


@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "layer_norm", "rms_norm"])
def test_needs_mask_reaches_the_presets(name, rng):
    """Method.backward(needs=...) on the presets: unwanted gradients are None (not computed), the
    wanted ones equal the full backward's. Not bit for bit: without the parameter sums the kernel's
    loop body changes and the vectorizer may reassociate the float64 sums differently (a few ulps)."""
    x = rng.standard_normal((4, 6, 9, 8))
    m, args, kwargs = _call(name, x, rng)
    _, res = m.forward(*args, **kwargs)
    g = rng.standard_normal(x.shape)
    full = m.backward(res, g)
    n = len(m.array_params)
    for wanted in range(n):
        needs = tuple(i == wanted for i in range(n))
        part = m.backward(res, g, needs=needs)
        for i, (a, f) in enumerate(zip(part, full)):
            if i != wanted or f is None:
                assert a is None
            else:
                _close(a, f, np.float64, f"{name} gradient {i} with needs={needs}")


def test_bench_quick_smoke(tmp_path):
    """``normref bench --quick`` runs end to end and writes its table's data and the plot: every
    method × pass, with the bandwidth reference, the torch ratio and the latency figures."""
    import json

    pytest.importorskip("matplotlib")
    pytest.importorskip("rich")
    from normref.conformance import bench

    assert bench.main(["--quick", "--repeat", "1", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    rows = rep["rows"]
    assert {(r["method"], r["pass"]) for r in rows} == {
        (m, p) for m in ("batch", "instance", "group", "layer", "rms") for p in ("forward", "backward")}
    assert rep["stream"]["copy"] > 0 and all(r["numba"] > 0 and r["array_api"] > 0 for r in rows)
    assert rep["latency"]["tiny_layer_norm_per_call_s"] > 0
