"""Reliability of the numba kernel path (issue 11): every case here returned a wrong answer, crashed
or silently skipped the kernels before the fix it tests.

1. few statistics (fewer than 2 × threads) on a reduced innermost axis: the moments kernel read one
   element per run; every partition, 1 … 2·threads + 1 statistics, NCHW and channels-last,
   forward and backward, against ``use_kernels(False)``;
2. byte strides that are not a multiple of the itemsize (a field of a packed structured array);
3. overflow of Σx² (|x| ≳ 1e19 in float32, ≳ 1e154 in float64): the normalized output and its
   gradients are scale-free and must come out right;
4. big-endian and long-double inputs keep (at least) float64 precision;
5. races: the ``workqueue`` threading layer from several Python threads, and concurrent first calls.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normref
from normref import _kernels
from normref import partition as _part
from normref import operation as _op

numba = pytest.importorskip("numba", reason="numba is not installed: the kernels cannot run")
from normref.backends import numba as nb  # noqa: E402
from normref.backends.numba import config  # noqa: E402

KERNELS = ("moments", "mean_square", "normalize_forward", "normalize_backward")


@pytest.fixture
def counted(monkeypatch):
    """Every registered numpy kernel wrapped: the list receives (name, ran) per call."""
    _kernels.lookup(np, "moments")  # load the backend
    log: list[tuple[str, bool]] = []
    for name in KERNELS:
        fn = _kernels._KERNELS[("numpy", name)]

        def wrapped(*a, _fn=fn, _name=name, **k):
            r = _fn(*a, **k)
            log.append((_name, r is not None))
            return r

        wrapped.accepts = fn.accepts
        monkeypatch.setitem(_kernels._KERNELS, ("numpy", name), wrapped)
    return log


@pytest.fixture
def kernels_everywhere(monkeypatch):
    """Every input takes the kernels (no size threshold) and their multi-threaded builds."""
    monkeypatch.setattr(config, "MIN_SIZE", 0)
    monkeypatch.setattr(config, "SERIAL_BELOW", 0)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    numba.set_num_threads(saved)


def _err(a, ref):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(ref, np.float64)), initial=0.0))


def _tol(ref, dtype, k=64):
    # kernel and formula evaluate one O(1)-conditioned formula and differ only in the rounding of the
    # accumulations (float64 or blocked float32 in the kernels, pairwise in NumPy) and the order of a
    # few elementwise operations: k·eps·(1 + max|ref|) leaves room for ~10 roundings of the largest
    # values plus the accumulated error of the sums. The bugs tested here are off by O(1) or more.
    return k * float(np.finfo(dtype).eps) * (1.0 + float(np.max(np.abs(np.asarray(ref, np.float64)), initial=0.0)))


def _channels_last(x):
    perm = (0,) + tuple(range(2, x.ndim)) + (1,)
    return np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))


# --------------------------------------------------------------------------------------------------
# 1. few statistics


def _case(kind, k):
    """(shape, normalize kwargs) with exactly ``k`` statistics for the partition ``kind``."""
    if kind == "batch":
        return (3, k, 5, 6), {}
    if kind == "instance":
        return (1, k, 6, 7), {}
    if kind == "group":
        return (1, 2 * k, 5, 6), {"num_groups": k}
    if kind == "layer":
        return (k, 3, 5, 6), {"normalized_ndim": 3}
    if kind == "position":
        return (1, 24, k, 1), {}
    if kind == "batch_group":
        return (2 * k, 3, 4, 5), {"num_groups": 1, "batch_groups": k}
    raise AssertionError(kind)


def _pshape(kind, shape, kw):
    return shape[-kw["normalized_ndim"]:] if kind == "layer" else (shape[1],)


# the thread counts the dispatch is tested for: the machine's (2 here) and a larger one, faked in the
# dispatch (the chunking and the loop-order choice depend only on the number the backend reads)
THREADS = (2, 7)


def _counts(t):
    # around the thresholds of the dispatch: one statistic, t, and 2·t (the rows/split boundary) ± 1
    return sorted({1, 2, t, 2 * t - 1, 2 * t, 2 * t + 1})


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", _part.KINDS)
def test_few_statistics_moments_match_formula(kind, layout, threads, kernels_everywhere, counted, monkeypatch):
    """moments and mean_square (the kernels every non-fused caller uses) on 1 … 2·threads + 1
    statistics, float32 and float64."""
    monkeypatch.setattr(nb, "_threads", lambda: threads)
    rng = np.random.default_rng(1)
    for k in _counts(threads):
        shape, kw = _case(kind, k)
        part = {"batch": _part.batch, "instance": _part.instance, "position": _part.position}.get(kind)
        part = part() if part else (_part.layer(kw["normalized_ndim"]) if kind == "layer" else
                                    _part.group(kw["num_groups"]) if kind == "group" else
                                    _part.batch_group(kw["num_groups"], kw["batch_groups"]))
        for dt in (np.float32, np.float64):
            x = (rng.standard_normal(shape) * 2 + 3).astype(dt)
            x = _channels_last(x) if layout == "channels_last" else x
            xv, axes = part.view(np, x), part.axes(shape)
            counted.clear()
            mu, var = _op.moments(np, xv, axes)
            ms = _op.mean_square(np, xv, axes)
            assert counted == [("moments", True), ("mean_square", True)], (kind, k, counted)
            with normref.use_kernels(False):
                mu_r, var_r = _op.moments(np, xv, axes)
                ms_r = _op.mean_square(np, xv, axes)
            for a, r, what in ((mu, mu_r, "mean"), (var, var_r, "var"), (ms, ms_r, "mean_square")):
                assert a.shape == r.shape and a.dtype == r.dtype
                assert _err(a, r) <= _tol(r, dt), f"{kind} k={k} {dt.__name__} {what}: {_err(a, r):.3g}"


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", _part.KINDS)
def test_few_statistics_normalize_match_formula(kind, layout, threads, kernels_everywhere, counted, monkeypatch):
    """normalize forward and backward (fused kernels; a reversed weight makes them decline, so that
    the moments kernel and the formula's backward run) on 1 … 2·threads + 1 statistics."""
    monkeypatch.setattr(nb, "_threads", lambda: threads)
    rng = np.random.default_rng(2)
    dt = np.float32
    for k in _counts(threads):
        shape, kw = _case(kind, k)
        x = (rng.standard_normal(shape) * 2 + 3).astype(dt)
        x = _channels_last(x) if layout == "channels_last" else x
        ps = _pshape(kind, shape, kw)
        w = rng.standard_normal(ps).astype(dt)
        b = rng.standard_normal(ps).astype(dt)
        g = rng.standard_normal(shape).astype(dt)
        for op in ("standardizing", "scaling"):
            for wt in (w, np.ascontiguousarray(w[..., ::-1])[..., ::-1]):  # the second: negative strides
                counted.clear()
                y, pull = normref.vjp("normalize", x, wt, b, partition=kind, operation=op, **kw)
                grads = pull(g)
                assert any(ran for _, ran in counted), f"no kernel ran: {counted}"
                with normref.use_kernels(False):
                    y_r, pull_r = normref.vjp("normalize", x, wt, b, partition=kind, operation=op, **kw)
                    grads_r = pull_r(g)
                what = f"{kind} k={k} {op} w.strides={wt.strides}"
                assert _err(y, y_r) <= _tol(y_r, dt), f"{what} forward: {_err(y, y_r):.3g}"
                for a, r in zip(grads, grads_r):
                    if r is not None:
                        assert _err(a, r) <= _tol(r, dt, 256), f"{what} backward: {_err(a, r):.3g}"


def test_few_statistics_issue_repros(monkeypatch):
    """The three calls of the issue, at their own sizes and the machine's default thread count."""
    saved = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        rng = np.random.default_rng(3)
        x = rng.standard_normal((8, 1, 32, 32)) * 3 + 2
        calls = [
            lambda: normref.batch_renorm(x, np.zeros(1), np.ones(1), training=True).output,
            lambda: normref.batch_norm(xb, None, None, weight=np.ones(3, np.float32)[::-1], training=True),
            lambda: normref.layer_norm(xl, 4096, weight=wl[::-1]),
        ]
        xb = rng.standard_normal((16, 3, 64, 64)).astype(np.float32) * 2 + 1
        xl = rng.standard_normal((1, 4096)) * 2 + 1
        wl = rng.standard_normal(4096)
        for i, f in enumerate(calls):
            y = f()
            with normref.use_kernels(False):
                y_r = f()
            assert _err(y, y_r) <= _tol(y_r, y_r.dtype), f"call {i}: {_err(y, y_r):.3g}"
    finally:
        numba.set_num_threads(saved)


def test_nan_in_nan_out_on_the_kernel_path(kernels_everywhere, counted):
    """A NaN in a statistic's elements gives NaN for that statistic's outputs (and nowhere else)."""
    rng = np.random.default_rng(4)
    for layout in ("nchw", "channels_last"):
        for kind, shape, kw in (("batch", (4, 3, 6, 7), {}), ("layer", (3, 4, 5, 6), {"normalized_ndim": 3}),
                                ("instance", (1, 2, 8, 9), {})):
            x = rng.standard_normal(shape).astype(np.float32)
            x[0, 0, 1, 2] = np.nan
            x = _channels_last(x) if layout == "channels_last" else x
            for op in ("standardizing", "scaling"):
                y = normref.normalize(x, partition=kind, operation=op, **kw)
                with normref.use_kernels(False):
                    y_r = normref.normalize(x, partition=kind, operation=op, **kw)
                np.testing.assert_array_equal(np.isnan(y), np.isnan(y_r))
                assert np.isnan(y).any()
    assert ("normalize_forward", True) in counted


# --------------------------------------------------------------------------------------------------
# 2. byte strides that are not a multiple of the itemsize


def _packed(shape, dtype, fill):
    """A field of a packed structured array: the values at byte offset 1 of each 1 + itemsize bytes."""
    n = int(np.prod(shape))
    rec = np.zeros(n, dtype=[("a", "i1"), ("x", dtype)])
    rec["a"] = 7
    rec["x"] = fill.reshape(-1)
    return rec, rec["x"].reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_strides_give_the_formula_answer(dtype, kernels_everywhere):
    rng = np.random.default_rng(5)
    shape = (4, 3, 6, 5)
    x0 = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    _, x = _packed(shape, dtype, x0)
    assert x.strides[-1] % x.itemsize != 0
    g0 = rng.standard_normal(shape).astype(dtype)
    _, g = _packed(shape, dtype, g0)
    for kind, kw in (("batch", {}), ("layer", {"normalized_ndim": 3}), ("instance", {})):
        for op in ("standardizing", "scaling"):
            y, pull = normref.vjp("normalize", x, partition=kind, operation=op, **kw)
            dx = pull(g)[0]
            with normref.use_kernels(False):
                y_r, pull_r = normref.vjp("normalize", x0, partition=kind, operation=op, **kw)
                dx_r = pull_r(g0)[0]
            assert _err(y, y_r) <= _tol(y_r, dtype), f"{kind} {op} forward: {_err(y, y_r):.3g}"
            assert _err(dx, dx_r) <= _tol(dx_r, dtype, 256), f"{kind} {op} backward: {_err(dx, dx_r):.3g}"
    # the moments kernels directly
    xv = _part.batch().view(np, x)
    mu, var = _op.moments(np, xv, (0, 2, 3))
    with normref.use_kernels(False):
        mu_r, var_r = _op.moments(np, x0, (0, 2, 3))
    assert _err(mu, mu_r) <= _tol(mu_r, dtype) and _err(var, var_r) <= _tol(var_r, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_in_a_packed_buffer_writes_only_its_own_elements(dtype, kernels_everywhere):
    rng = np.random.default_rng(6)
    shape = (4, 3, 6, 5)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    w, b = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    with normref.use_kernels(False):
        ref = normref.group_norm(x, 3, w, b)
    for xin in (x, _packed(shape, dtype, x)[1]):
        rec, out = _packed(shape, dtype, np.zeros(shape, dtype))
        y = normref.group_norm(xin, 3, w, b, out=out)
        assert y is out
        assert (rec["a"] == 7).all(), "out= wrote into the neighbouring field"
        assert _err(out, ref) <= _tol(ref, dtype)


# --------------------------------------------------------------------------------------------------
# 3. overflow of Σx²


OVERFLOW = [(np.float32, 1e30), (np.float64, 1e200)]
# NumPy warns where the plain pass overflows before the rescaled pass replaces it: expected here
_overflow_warns = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                            "ignore:invalid value encountered:RuntimeWarning")


def _scaled_reference(f, x, scale, *rest):
    """f(x/scale, ...) computed without overflow: the normalized output is scale-free
    (x̂(c·x) = x̂(x) up to ε, whose effect is below the dtype's resolution at these magnitudes), and so
    is ∂L/∂x up to the factor 1/c."""
    return f(x / scale, *rest)


@_overflow_warns
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("dtype,big", OVERFLOW)
@pytest.mark.parametrize("kind,kw,op", [("batch", {}, "standardizing"), ("layer", {"normalized_ndim": 3}, "standardizing"),
                                         ("layer", {"normalized_ndim": 1}, "scaling"), ("instance", {}, "standardizing")])
def test_huge_inputs_are_normalized_right(kind, kw, op, dtype, big, kernels, monkeypatch):
    monkeypatch.setattr(config, "MIN_SIZE", 0)
    rng = np.random.default_rng(7)
    shape = (4, 3, 6, 5)
    x1 = (rng.standard_normal(shape) + 0.5).astype(dtype)  # the same values at scale 1
    x = (x1 * dtype(big)).astype(dtype)
    assert np.isfinite(x).all()
    g = rng.standard_normal(shape).astype(dtype)
    pshape = shape[-kw["normalized_ndim"]:] if kind == "layer" else (shape[1],)
    w = rng.standard_normal(pshape).astype(dtype)
    b = rng.standard_normal(pshape).astype(dtype)
    with normref.use_kernels(kernels):
        # default ε = 1e-5: next to σ² ≈ c² its effect is nil, as is that of ε = 1e-30 at scale 1
        y, pull = normref.vjp("normalize", x, w, b, partition=kind, operation=op, **kw)
        dx, dw, db = pull(g)
    with normref.use_kernels(False):
        y_r, pull_r = normref.vjp("normalize", x1, w, b, partition=kind, operation=op, eps=1e-30, **kw)
        dx_r, dw_r, db_r = pull_r(g)
    # x = c·x1 exactly up to one rounding per element (relative ε): the outputs agree to a few ε·κ
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert _err(y, y_r) <= _tol(y_r, dtype, 256), f"forward: {_err(y, y_r):.3g}"
    assert _err(dw, dw_r) <= _tol(dw_r, dtype, 256) and _err(db, db_r) <= _tol(db_r, dtype, 256)
    # dx(c·x1) = dx(x1)/c: compare c·dx with the reference (c is a power of ten, c·dx rounded once)
    dxs = np.asarray(dx, np.float64) * big
    assert _err(dxs, dx_r) <= _tol(dx_r, dtype, 256), f"backward: {_err(dxs, dx_r):.3g}"


@_overflow_warns
def test_huge_inputs_under_jax_jit():
    """The rescaled pass is a ``where``, so it also runs under tracing (no concrete any())."""
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(10)
    x1 = (rng.standard_normal((4, 3, 6, 5)) + 0.5).astype(np.float32)
    f = jax.jit(lambda a: normref.layer_norm(a, (3, 6, 5)))
    with normref.use_kernels(False):
        ref_big = normref.layer_norm(x1, (3, 6, 5), eps=1e-30)  # ε's effect at scale 1e30 is nil
        ref = normref.layer_norm(x1, (3, 6, 5))
    assert _err(np.asarray(f(x1 * np.float32(1e30))), ref_big) <= _tol(ref_big, np.float32, 256)
    assert _err(np.asarray(f(x1)), ref) <= _tol(ref, np.float32, 256)  # the ordinary scale is unchanged


@_overflow_warns
@pytest.mark.parametrize("dtype,big", OVERFLOW)
def test_huge_inputs_running_variance_is_inf_and_documented(dtype, big):
    """The batch variance c²·σ² is not representable: batch_norm returns the right output and an
    infinite running variance (documented in operation.Standardizing), never β everywhere."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((8, 2, 16, 16)) * big).astype(dtype)
    r = normref.batch_norm(x, np.zeros(2, dtype), np.ones(2, dtype), training=True)
    with normref.use_kernels(False):
        ref = normref.batch_norm((x / dtype(big)).astype(dtype), np.zeros(2, dtype), np.ones(2, dtype), training=True,
                                 eps=1e-30)
    assert _err(r.output, ref.output) <= _tol(ref.output, dtype, 256)
    assert np.isinf(r.running_var).all()
    assert "overflow" in (_op.Standardizing.__doc__ or "").lower()


@_overflow_warns
@pytest.mark.parametrize("dtype,big", OVERFLOW)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, float("inf")])
def test_huge_inputs_lp_batch_norm(p, dtype, big):
    """Lp standardizing: |u|ᵖ overflows long before σ_p does (p = 3 in float32 from |u| ≈ 5e12); σ_p is
    homogeneous, so x̂(c·x; ε) = x̂(x; ε/c) (ε outside the deviation) and dx(c·x; ε) = dx(x; ε/c)/c."""
    rng = np.random.default_rng(12)
    x1 = (rng.standard_normal((6, 3, 4, 4)) + 0.5).astype(dtype)
    x = (x1 * dtype(big)).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    y, pull = normref.vjp("lp_batch_norm", x, None, None, None, None, True, p=p)
    dx = pull(g)[0]
    y_r, pull_r = normref.vjp("lp_batch_norm", x1, None, None, None, None, True, eps=1e-5 / big, p=p)
    dx_r = pull_r(g)[0]
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert _err(y, y_r) <= _tol(y_r, dtype, 256), f"forward: {_err(y, y_r):.3g}"
    dxs = np.asarray(dx, np.float64) * big
    assert _err(dxs, dx_r) <= _tol(dx_r, dtype, 256), f"backward: {_err(dxs, dx_r):.3g}"


@_overflow_warns
@pytest.mark.parametrize("dtype,big", OVERFLOW)
def test_huge_inputs_adain(dtype, big):
    """AdaIN: a huge content is standardized right (x̂ scale-free), and a huge style's σ_s, finite in
    the dtype, is used as it is (y = σ_s·x̂ + μ_s ≈ c·(σ·x̂ + μ)), instead of β-like or inf outputs."""
    rng = np.random.default_rng(13)
    x1 = rng.standard_normal((2, 3, 5, 5)).astype(dtype)
    s1 = (rng.standard_normal((2, 3, 6, 6)) + 0.3).astype(dtype)
    ref = normref.adain(x1, s1, eps=1e-30)
    y_c = normref.adain((x1 * dtype(big)).astype(dtype), s1, eps=1e-30)
    y_s = normref.adain(x1, (s1 * dtype(big)).astype(dtype), eps=1e-30)
    assert np.isfinite(y_c).all() and np.isfinite(y_s).all()
    # ε = 1e-30 throughout: next to σ² (scale 1) and c²σ² its effect is below the dtype's resolution
    assert _err(y_c, ref) <= _tol(ref, dtype, 256), f"content: {_err(y_c, ref):.3g}"
    ys = np.asarray(y_s, np.float64) / big
    assert _err(ys, ref) <= _tol(ref, dtype, 256), f"style: {_err(ys, ref):.3g}"


def test_huge_inputs_switchable_norm_refused():
    """switchable_norm mixes IN/LN/BN variances: where one overflows the dtype it refuses (clear
    ValueError naming input) instead of returning β everywhere."""
    x = (np.random.default_rng(14).standard_normal((4, 3, 5, 5)) * 1e20).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(ValueError, match=r"switchable_norm: the variance of input overflows float32"):
            normref.switchable_norm(x, np.zeros(3), np.zeros(3), training=True)


# --------------------------------------------------------------------------------------------------
# 4. big-endian and long double


@pytest.mark.parametrize("dtype", [">f8", ">f4", np.longdouble])
def test_non_native_float_dtypes_keep_their_precision(dtype):
    rng = np.random.default_rng(9)
    x64 = rng.standard_normal((8, 3, 16, 16)) * 1e-2 + 1e3  # |μ|/σ = 1e5: float32 loses ~7 digits
    x = x64.astype(dtype)
    ref_dtype = np.float32 if np.dtype(dtype).itemsize == 4 else np.float64
    y = normref.batch_norm(x, None, None, training=True)
    with normref.use_kernels(False):
        ref = normref.batch_norm(x.astype(ref_dtype), None, None, training=True)
    assert y.dtype == np.dtype(dtype)  # the caller's dtype comes back (documented in _xp.compute_dtype)
    # the same computation as in the native dtype: a few roundings of difference amplified by the
    # conditioning |μ|/σ = 1e5 of the centering, far below the ~1e-2 error of a float32 computation
    # for the float64 cases
    if ref_dtype is np.float32:
        # '>f4': exactly the native float32 computation (same path, kernels on), so a bound of a few
        # roundings and no conditioning factor (which at 1e5 would leave a bound that cannot fail)
        ref32 = normref.batch_norm(x.astype(np.float32), None, None, training=True)
        assert _err(y, ref32) <= _tol(ref32, np.float32, 4)
    else:
        assert _err(y, ref) <= _tol(ref, ref_dtype, 64) * 1e5


# --------------------------------------------------------------------------------------------------
# 5. races


def _run(code, env_extra, timeout=240):
    env = dict(os.environ, **env_extra)
    env.setdefault("NUMBA_CACHE_DIR", os.environ.get("NUMBA_CACHE_DIR", "/tmp/numba-cache"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_workqueue_layer_from_several_threads():
    """numba's workqueue layer aborts the process when two threads launch parallel kernels at once;
    the backend serializes its parallel kernels there."""
    code = """
    import threading, numpy as np, normref
    from normref.backends.numba import config
    config.SERIAL_BELOW = 0
    rng = np.random.default_rng(0)
    # inputs large enough that the launches of 4 threads overlap (before the fix: SIGABRT, rc -6)
    xs = [rng.standard_normal((16, 8, 64, 64)).astype(np.float32) for _ in range(4)]
    with normref.use_kernels(False):
        refs = [normref.group_norm(x, 2) for x in xs]
        grads = [normref.vjp(normref.layer_norm, x, (8, 64, 64))[1](x)[0] for x in xs]
    bad = []
    barrier = threading.Barrier(4)
    def work(i):
        barrier.wait()
        for _ in range(12):
            y = normref.group_norm(xs[i], 2)
            _, pull = normref.vjp(normref.layer_norm, xs[i], (8, 64, 64))
            dx = pull(xs[i])[0]
            # float32 results of O(1)-conditioned formulas, kernel vs formula: ~1e-6; 1e-4 is generous
            if np.max(np.abs(y - refs[i])) > 1e-4 or np.max(np.abs(dx - grads[i])) > 1e-4:
                bad.append(i)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    import numba
    assert numba.threading_layer() == "workqueue", numba.threading_layer()
    assert not bad, bad
    print("ok")
    """
    p = _run(code, {"NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"})
    assert p.returncode == 0 and "ok" in p.stdout, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])


def test_concurrent_first_calls_all_get_the_kernels():
    """In a fresh process, threads racing to the first NumPy call must all see the registered
    kernels (the backend was marked loaded before its kernels were registered)."""
    code = """
    import threading, numpy as np
    from normref import _kernels
    found = []
    barrier = threading.Barrier(6)
    def work():
        barrier.wait()
        found.append(_kernels.lookup(np, "normalize_forward") is not None)
    ts = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(found)
    assert all(found) and len(found) == 6, found
    """
    p = _run(code, {})
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
