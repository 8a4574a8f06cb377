"""normref on dask arrays (issue 12, §3 "Dask"): every registered method runs lazily on a dask array
chunked along the batch axis — the call builds a graph and computes nothing (checked with a scheduler
that raises) — forward and backward equal NumPy's; the same under a ``dask.distributed.LocalCluster``;
and the population statistics of a whole dataset (survey §5.3.2) with :func:`normref.population_statistics`.
"""

from __future__ import annotations

import numpy as np
import pytest

import normref
from normref import get, methods
from normref._kernels import use_kernels

from .conftest import registry_cases

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

# float64: every case's forward and backward on dask equals NumPy's to 1e-12 relative (to max|ref|).
# The graph runs the same formulas in the same dtype; only the reduction order differs (dask sums
# chunk by chunk, then the partial sums): a few ulps times the conditioning of the registry's
# examples (≤ ~1e3 for the whitening and orthogonalization cases), i.e. ≤ 1e-12 ≈ 4500·ε.
TOL = 1e-12
MAX_EXAMPLES = 3  # per method: keeps the sweep ~20 s on 2 cores (every method, its first examples)


class Computed(AssertionError):
    pass


def _raising(dsk, keys, **kwargs):
    """A dask scheduler that refuses to run: any compute inside normref's call is a test failure."""
    raise Computed(f"normref computed a dask graph ({len(keys) if hasattr(keys, '__len__') else 1} keys)")


def _to_dask(a):
    """A NumPy array as a dask array with at least 2 chunks along axis 0 (when it has 2 rows)."""
    if not isinstance(a, np.ndarray):
        return a
    if a.ndim == 0:
        return da.from_array(a)
    n = a.shape[0]
    return da.from_array(a, chunks=(max(1, (n + 1) // 2),) + a.shape[1:])


def _fields(out):
    if isinstance(out, tuple):
        return list(out)
    return [out]


def _rel(a, ref) -> float:
    """max|a − ref| / max(1, max|ref|). The examples' inputs and cotangents are O(1), so the terms each
    result sums are O(1): a result far below 1 is a cancellation (batch_instance_norm's dx is ~1e-5
    where its BN and IN terms nearly cancel), whose rounding is ε·O(1), not ε·|result|."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(a - ref))) / max(1.0, float(np.max(np.abs(ref))))


_CASES = [(m.name, i) for m in methods() for i in range(min(MAX_EXAMPLES, len(registry_cases(m))))]


@pytest.mark.parametrize("name,index", _CASES, ids=[f"{n}-{i}" for n, i in _CASES])
def test_registry_lazy_and_equal_to_numpy(name, index):
    m = get(name)
    ex = registry_cases(m)[index]
    with use_kernels(False):  # the reference: the array-API formulas on NumPy
        out, res = m.forward(*ex.args, **ex.kwargs)
        g = np.asarray(np.random.default_rng(index).standard_normal(np.shape(m.primary(out))))
        grads = m.backward(res, g)
    args = tuple(_to_dask(a) for a in ex.args)
    kwargs = {k: _to_dask(v) for k, v in ex.kwargs.items()}
    with dask.config.set(scheduler=_raising):  # building the graph (forward and backward) computes nothing
        out_d, res_d = m.forward(*args, **kwargs)
        grads_d = m.backward(res_d, _to_dask(g))
    f_d = [v for v in _fields(out_d) if v is not None]
    assert all(isinstance(v, da.Array) for v in f_d), [type(v).__name__ for v in f_d]
    assert all(v is None or isinstance(v, da.Array) for v in grads_d)
    got_f, got_g = dask.compute(f_d, list(grads_d), scheduler="sync")
    errs = [_rel(a, r) for a, r in zip(got_f, [v for v in _fields(out) if v is not None])]
    errs += [_rel(a, r) for a, r in zip(got_g, grads) if r is not None]
    assert max(errs, default=0.0) <= TOL, (name, index, errs)


def test_one_compute_for_forward_and_backward():
    """A counting scheduler: nothing runs while the graph is built; one ``dask.compute`` runs it once."""
    calls = []

    def counting(dsk, keys, **kw):
        calls.append(keys)
        return dask.get(dsk, keys, **kw)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 3, 5))
    xd = da.from_array(x, chunks=(4, 3, 5))
    w, b = da.from_array(rng.uniform(0.5, 1.5, 3)), da.from_array(rng.standard_normal(3))
    rm, rv = da.zeros(3), da.ones(3)
    with dask.config.set(scheduler=counting):
        out, pull = normref.vjp(normref.batch_norm, xd, rm, rv, w, b, True, 0.1, 1e-5)
        grads = pull(da.from_array(np.ones((12, 3, 5)), chunks=(4, 3, 5)))
        assert calls == []
        y, nrm, nrv, dx, dw, db = dask.compute(*out, grads[0], grads[3], grads[4])
    assert len(calls) == 1
    ref, rpull = normref.vjp(normref.batch_norm, x, np.zeros(3), np.ones(3), w.compute(), b.compute(), True, 0.1, 1e-5)
    rg = rpull(np.ones((12, 3, 5)))
    for a, r in zip((y, nrm, nrv, dx, dw, db), (*ref, rg[0], rg[3], rg[4])):
        assert _rel(a, r) <= TOL


def test_mixed_libraries_refused():
    x = da.from_array(np.ones((4, 3)), chunks=(2, 3))
    with pytest.raises(TypeError, match="batch_norm: all arrays must come from one library.*dask"):
        normref.batch_norm(x, np.zeros(3), np.ones(3), training=False)


def test_value_checks_are_deferred_not_computed():
    """A negative running variance: NumPy refuses it (ValueError); on dask the check is skipped (no
    compute), as under jax.jit, and the graph yields what the formula gives (NaN where σ̂² + ε < 0)."""
    x = np.ones((4, 2))
    rv = np.array([1.0, -2.0])
    with pytest.raises(ValueError, match="running_var"):
        normref.batch_norm(x, np.zeros(2), rv, training=False)
    with dask.config.set(scheduler=_raising):
        y = normref.batch_norm(da.from_array(x, chunks=(2, 2)), da.zeros(2), da.from_array(rv), training=False)
    with np.errstate(invalid="ignore"):
        y = y.compute(scheduler="sync")
    assert np.all(np.isfinite(y[:, 0])) and np.all(np.isnan(y[:, 1]))


def test_weight_norm_underflow_rescue_on_dask():
    """weight_norm's rescue of norms whose Σv² underflows (|v| ~ 1e-24 in float32): NumPy takes it after
    inspecting the norms; on dask it is always in the graph (selected per row), so the values agree."""
    v = (np.random.default_rng(9).standard_normal((4, 3)) * 1e-24).astype(np.float32)
    g = np.ones(4, np.float32)
    y = normref.weight_norm(v, g)
    assert np.all(np.isfinite(y))
    with dask.config.set(scheduler=_raising):
        yd = normref.weight_norm(da.from_array(v, chunks=(2, 3)), da.from_array(g))
    # float32: the same formulas in the same order per row; 4 ulps of float32 for the rounding of sums
    assert np.max(np.abs(yd.compute(scheduler="sync") - y)) <= 4 * np.finfo(np.float32).eps


# -- dask.distributed ------------------------------------------------------------------------------


def test_local_cluster_batch_norm_and_whitening():
    """batch_norm and batch_whitening, forward and backward, computed on a LocalCluster (2 workers in
    this process, talking TCP on 127.0.0.1: tasks and results are serialized as between machines)
    equal NumPy's."""
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 4, 3)) + 0.5
    x[:, 1] += 0.7 * x[:, 0]  # correlated channels: whitening has something to do
    g = rng.standard_normal(x.shape)
    w, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    ref_bn, pb = normref.vjp(normref.batch_norm, x, np.zeros(4), np.ones(4), w, b, True, 0.1, 1e-5)
    ref_bn_g = pb(g)
    ref_bw, pw = normref.vjp(normref.batch_whitening, x, np.zeros(4), np.eye(4)[None], w, b, True,
                             group_size=4)
    ref_bw_g = pw(g)
    xd, gd = da.from_array(x, chunks=(4, 4, 3)), da.from_array(g, chunks=(4, 4, 3))
    wd, bd = da.from_array(w), da.from_array(b)
    with dask.config.set(scheduler=_raising):
        bn, pbd = normref.vjp(normref.batch_norm, xd, da.zeros(4), da.ones(4), wd, bd, True, 0.1, 1e-5)
        bn_g = pbd(gd)
        bw, pwd = normref.vjp(normref.batch_whitening, xd, da.zeros(4), da.from_array(np.eye(4)[None]), wd, bd,
                              True, group_size=4)
        bw_g = pwd(gd)
    lazy = [*bn, bn_g[0], bn_g[3], bn_g[4], *bw, bw_g[0], bw_g[3], bw_g[4]]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                                  host="127.0.0.1", dashboard_address=None) as cluster, distributed.Client(cluster, timeout=60) as client:
        futures = client.compute(lazy)
        distributed.wait(futures, timeout=120)  # bounded: the test stops by itself
        got = client.gather(futures)
    ref = [*ref_bn, ref_bn_g[0], ref_bn_g[3], ref_bn_g[4], *ref_bw, ref_bw_g[0], ref_bw_g[3], ref_bw_g[4]]
    errs = [_rel(a, r) for a, r in zip(got, ref)]
    assert max(errs) <= TOL, errs


# -- population statistics (survey §5.3.2) ---------------------------------------------------------


def _dataset(rng, n=48):
    x = rng.standard_normal((n, 4, 3)) * 2.0 + 1.0
    x[:, 3] += 0.8 * x[:, 2]
    return x


def test_population_statistics_numpy_definition():
    """Against NumPy's own np.var(ddof=1) / np.cov of each channel's N·∏spatial values."""
    x = _dataset(np.random.default_rng(4))
    st = normref.population_statistics(x, group_size=2)
    flat = np.moveaxis(x, 1, 0).reshape(4, -1)
    assert st.count == flat.shape[1]
    assert _rel(st.mean, flat.mean(axis=1)) <= TOL
    assert _rel(st.var, flat.var(axis=1, ddof=1)) <= TOL
    assert _rel(st.cov, np.stack([np.cov(flat[:2]), np.cov(flat[2:])])) <= TOL
    assert normref.population_statistics(x).cov is None


def test_population_statistics_batches_is_cumulative_running_average():
    """batch_size=m (BN paper, Algorithm 2) equals the running statistics that batch_norm's cumulative
    average (momentum=None) holds after one pass over the same mini-batches — an independent path."""
    x = _dataset(np.random.default_rng(5))
    st = normref.population_statistics(x, batch_size=8)
    rm, rv = np.zeros(4), np.ones(4)
    for t, i in enumerate(range(0, 48, 8)):
        _, rm, rv = normref.batch_norm(x[i:i + 8], rm, rv, training=True, momentum=None, num_batches_tracked=t)
    assert _rel(st.mean, rm) <= TOL and _rel(st.var, rv) <= TOL


def test_population_statistics_dask_lazy_and_inference():
    """Over a dask dataset: lazy, equal to NumPy; then batch_norm / batch_whitening at inference with them."""
    rng = np.random.default_rng(6)
    x = _dataset(rng)
    xd = da.from_array(x, chunks=(12, 4, 3))
    ref = normref.population_statistics(x, group_size=4)
    with dask.config.set(scheduler=_raising):
        st = normref.population_statistics(xd, group_size=4)
        y_bn = normref.batch_norm(xd, st.mean, st.var, training=False)
        y_bw = normref.batch_whitening(xd, st.mean, st.cov, training=False, group_size=4)
    # the outputs keep the input's chunks along the batch axis (each is computed chunk by chunk)
    assert y_bn.numblocks[0] == y_bw.numblocks[0] == xd.numblocks[0] == 4
    mean, var, cov, y_bn, y_bw = dask.compute(st.mean, st.var, st.cov, y_bn, y_bw, scheduler="sync")
    for a, r in zip((mean, var, cov), ref[:3]):
        assert _rel(a, r) <= TOL
    assert _rel(y_bn, normref.batch_norm(x, ref.mean, ref.var, training=False)) <= TOL
    yw_ref = normref.batch_whitening(x, ref.mean, ref.cov, training=False, group_size=4)
    assert _rel(y_bw, yw_ref) <= TOL
    # whitened by the population covariance: the dataset's own covariance becomes I (up to ε = 1e-5)
    w_cov = np.cov(np.moveaxis(y_bw, 1, 0).reshape(4, -1))
    assert np.max(np.abs(w_cov - np.eye(4))) < 1e-4


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_population_statistics_other_libraries(lib):
    x = _dataset(np.random.default_rng(7))
    ref = normref.population_statistics(x, group_size=2, batch_size=12)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        xa = torch.asarray(x)
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        xa = jax.numpy.asarray(x)
    st = normref.population_statistics(xa, group_size=2, batch_size=12)
    for a, r in zip(st[:3], ref[:3]):
        assert _rel(np.asarray(a), r) <= TOL


def test_population_statistics_stream_of_batches():
    """An iterable of uneven batches (one of a single value per channel, one empty) gives the statistics
    of their concatenation: NumPy, dask (lazy) and torch batches."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((37, 4)) * 3.0 - 2.0
    x[:, 1] += 0.9 * x[:, 0]
    ref = normref.population_statistics(x, group_size=2)
    parts = [x[:1], x[1:9], x[9:9], x[9:]]
    st = normref.population_statistics(iter(parts), group_size=2)
    assert st.count == 37
    for a, r in zip(st[:3], ref[:3]):
        assert _rel(a, r) <= TOL
    with dask.config.set(scheduler=_raising):
        std = normref.population_statistics([da.from_array(p) for p in parts], group_size=2)
    for a, r in zip(dask.compute(*std[:3], scheduler="sync"), ref[:3]):
        assert _rel(a, r) <= TOL
    torch = pytest.importorskip("torch")
    stt = normref.population_statistics(torch.asarray(p) for p in parts)
    assert stt.cov is None
    for a, r in zip(stt[:2], ref[:2]):
        assert _rel(a.numpy(), r) <= TOL


def test_population_statistics_stream_bad_input():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="population_statistics: input is an empty iterable"):
        normref.population_statistics([])
    with pytest.raises(ValueError, match=r"population_statistics: every batch must have the shape .* input\[1\]"):
        normref.population_statistics([x, np.ones((4, 2))])
    with pytest.raises(TypeError, match=r"population_statistics: all batches must come from one library"):
        normref.population_statistics([x, da.from_array(x)])
    with pytest.raises(TypeError, match=r"population_statistics: input\[1\] must be an array"):
        normref.population_statistics([x, [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="population_statistics: batch_size applies to one array"):
        normref.population_statistics([x], batch_size=2)
    with pytest.raises(ValueError, match="population_statistics: an unbiased variance needs at least 2"):
        normref.population_statistics([x[:1]])


def test_population_statistics_bad_input():
    x = np.ones((6, 4))
    with pytest.raises(ValueError, match="population_statistics: group_size must divide the 4 channels"):
        normref.population_statistics(x, group_size=3)
    with pytest.raises(ValueError, match="population_statistics: batch_size must divide the 6 samples"):
        normref.population_statistics(x, batch_size=4)
    with pytest.raises(ValueError, match="population_statistics: an unbiased variance needs at least 2"):
        normref.population_statistics(x, batch_size=1)
    with pytest.raises(ValueError, match="population_statistics: input must have at least 2 dimensions"):
        normref.population_statistics(np.ones(5))
    with pytest.raises(TypeError, match="population_statistics: group_size must be an integer"):
        normref.population_statistics(x, group_size=2.0)
