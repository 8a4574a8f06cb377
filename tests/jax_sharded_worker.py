"""Worker for tests/test_jax_sharded.py: every registered method under ``jax.shard_map(check_vma=True)``
over 4 simulated host devices. Run as a script (a fresh process: the device count must be set before
jax is imported, and the pytest session has imported jax already)::

    python tests/jax_sharded_worker.py [method ...]      # prints one JSON object on the last line

For each method (on its registered examples, so methods registered later are covered):

* ``replicated``: every argument replicated, the loss made device-varying by a per-device weight
  sᵢ (L = Σᵢ sᵢ·Σ sin(y)). JAX's rule under check_vma=True: the gradient of an invariant primal is
  Σᵢ ∂Lᵢ/∂w (the forward's implicit pvary of y transposes into a psum of its cotangent, before
  normref's backward), so the reference is (Σᵢ sᵢ)·∇Σ sin(y) computed on one device.
* ``mixed`` (methods with two or more differentiable arguments and no data input, e.g. weight_norm's
  (v, g), lars' (weight, grad)): the first argument device-varying (a different perturbation on
  each device), the others replicated. The cotangent reaching normref's backward varies, and so does
  the gradient it computes for the replicated arguments: the reported defect ("Custom VJP bwd rule
  must produce an output with the same type ... manual axis types do not match") unless the
  adapter psums it. Reference: each device's arguments on one device, replicated gradients summed.
* ``sharded`` (methods with a data input ``input``/``x``/``content``/``style``): the data input (and
  any array with the input's rank and batch size, e.g. generated affine parameters) sharded along
  the batch axis over 4 devices, the other parameters replicated, L = Σᵢ Σ sin(yᵢ). Two references:
  ``loop``: the method applied on each device's slice separately (one device), outputs and data
  gradients concatenated, parameter gradients summed — what the sharded run must equal for every
  method, because without ``sync`` batch statistics are the local slice's; ``full``: the method on
  the whole batch on one device — equal to the sharded run only where statistics are per sample
  (layer, instance, group, ... norms), which is reported as ``per_sample``.

Errors are max|a − b| / max(1, max|b|) over the forward output and every gradient, float64.
"""

from __future__ import annotations

import os
import sys

if "jax" in sys.modules:  # pragma: no cover - the device count below would be ignored
    raise RuntimeError("tests/jax_sharded_worker.py must run in a fresh process (jax already imported)")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import inspect  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import normref  # noqa: E402
from normref.backends import jax as nj  # noqa: E402

NDEV = 4
AXIS = "batch"
DATA = ("input", "x", "content", "style")  # names of data (batch-axis-first) arguments
# Methods whose statistics run over the batch (without sync they are each device's local statistics)
BATCH_STATS = {
    "batch_norm", "mean_only_batch_norm", "lp_batch_norm", "batch_renorm", "ghost_batch_norm",
    "batch_group_norm", "switchable_norm", "batch_instance_norm", "batch_whitening",
    "decorrelated_batch_norm", "iter_norm", "whitening_coloring",
    # population statistics blended with or updated from the batch's (no sync= argument: per device)
    "population_norm", "blended_batch_norm", "prong_whitening", "batch_normalize",
    "moving_average_batch_norm", "memorized_batch_norm", "cross_iteration_batch_norm",
    # a per-sample stream through the batch: a shard is a different stream
    "online_norm",
}
PER_SAMPLE_PARTITIONS = {"instance", "group", "layer", "position"}  # normalize(partition=...)
# axis_name under vmap(axis_name=...): one BN-like and one whitening method here (each engine costs a
# compilation per method; batch_norm under vmap is also tested in the main session, test_jax_adapter)
VMAP_SYNC = {"batch_norm", "batch_whitening", "iter_norm"}


def _mesh():
    kw = {}
    if hasattr(jax.sharding, "AxisType"):
        kw["axis_types"] = (jax.sharding.AxisType.Explicit,)
    return jax.make_mesh((NDEV,), (AXIS,), **kw)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


def _per_sample(m, arguments) -> bool:
    if m.name in BATCH_STATS:
        # in evaluation mode the running statistics are used: per sample
        return arguments.get("training", True) is False
    if m.name == "normalize":
        return arguments.get("partition") in PER_SAMPLE_PARTITIONS
    return True


def _cost(m, ex):
    b = m.bind(*ex.args, **ex.kwargs)
    n = sum(int(np.size(b.arguments[p])) for p in m.diff_params if b.arguments.get(p) is not None)
    it = b.arguments.get("iterations")
    return n * (it if isinstance(it, int) else 1)


def _jnp_args(m, ex):
    bound = m.bind(*ex.args, **ex.kwargs)
    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in bound.arguments.items()}


def _call(m, args, diff, xs):
    a = dict(args)
    a.update(zip(diff, xs))
    b = inspect.BoundArguments(m.signature, a)
    return m.primary(nj.function(m)(*b.args, **b.kwargs))


_VG = {}


def _local_value_and_grads(m, ex):
    """(args, diff, jit(xs ↦ (y, ∇Σ sin y))) for one example, one device; cached (one compilation
    serves the replicated case's reference and the sharded case's per-slice loop)."""
    key = (m.name, id(ex))
    if key not in _VG:
        args = _jnp_args(m, ex)
        diff = [p for p in m.diff_params if args.get(p) is not None]
        _VG[key] = (args, diff, jax.jit(_value_and_grads(m, args, diff)))
    return _VG[key]


def _value_and_grads(m, a, diff):
    idx = tuple(range(len(diff)))
    fn = lambda *xs: _call(m, a, diff, xs)  # noqa: E731
    return lambda *xs: (fn(*xs), jax.grad(lambda *xs: jnp.sum(jnp.sin(fn(*xs))), argnums=idx)(*xs))


def case_replicated(m, ex, mesh, eager=False):
    """All arguments replicated, the cotangent device-varying (the reported defect). ``eager``: the
    shard_map is not jitted (JAX evaluates it operation by operation)."""
    args, diff, ref = _local_value_and_grads(m, ex)
    primals = tuple(args[p] for p in diff)
    s = jnp.asarray([0.7, -1.3, 0.4, 2.1])

    def local(si, *xs):
        loss = lambda *xs: si[0] * jnp.sum(jnp.sin(_call(m, args, diff, xs)))  # noqa: E731
        return _call(m, args, diff, xs), jax.grad(loss, argnums=tuple(range(len(xs))))(*xs)

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) + (P(),) * len(primals),
                      out_specs=(P(), (P(),) * len(primals)), check_vma=True)
    f = f if eager else jax.jit(f)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    y, g = f(put(s, P(AXIS)), *(put(p, P()) for p in primals))
    y0, g0 = ref(*primals)
    err = _rel_err(y, y0)
    for a, b in zip(g, g0):
        err = max(err, _rel_err(a, float(jnp.sum(s)) * b))
    return {"err": err, "cond": ex.cond, "grads": len(primals)}


def case_mixed(m, ex, mesh):
    """First differentiable argument device-varying, the others replicated (see the module docstring)."""
    args, diff, ref = _local_value_and_grads(m, ex)
    primals = [args[p] for p in diff]
    rng = np.random.default_rng(9)
    first = jnp.stack([primals[0] * (1.0 + 0.05 * jnp.asarray(rng.uniform(-1, 1, primals[0].shape)))
                       for _ in range(NDEV)])  # device i holds first[i]

    w = jnp.asarray([0.7, -1.3, 0.4, 2.1])  # Lᵢ = wᵢ·Σ sin(y): varying even where y is not

    def local(wi, f0, *rest):
        xs = (f0[0],) + rest
        loss = lambda *xs: wi[0] * jnp.sum(jnp.sin(_call(m, args, diff, xs)))  # noqa: E731
        g = jax.grad(loss, argnums=tuple(range(len(xs))))(*xs)
        return _call(m, args, diff, xs)[None], (g[0][None],) + tuple(g[1:])

    specs = (P(AXIS),) + (P(),) * (len(diff) - 1)
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) + specs, out_specs=(P(AXIS), specs),
                              check_vma=True))
    y, g = jax.tree.map(np.asarray, f(*(jax.device_put(a, NamedSharding(mesh, s))
                                        for a, s in zip([w, first] + primals[1:], (P(AXIS),) + specs))))
    # the reference: device i's arguments on one device; L = Σᵢ Lᵢ, so replicated gradients add up
    outs = [ref(first[i], *primals[1:]) for i in range(NDEV)]
    wn = np.asarray(w)
    err = _rel_err(y, np.stack([o[0] for o in outs]))
    err = max(err, _rel_err(g[0], np.stack([wn[i] * np.asarray(o[1][0]) for i, o in enumerate(outs)])))
    for j in range(1, len(diff)):
        err = max(err, _rel_err(g[j], sum(wn[i] * np.asarray(o[1][j]) for i, o in enumerate(outs))))
    return {"err": err, "cond": ex.cond, "grads": len(diff), "varying": diff[0]}


def _pick_sharded(m, exs):
    """The examples to shard: one per kind (per-sample / batch statistics), training mode preferred,
    most non-None differentiable arguments, then the cheapest."""
    best = {}
    if m.category == "penalty":  # a loss over the batch (a 0-d output): nothing per device to shard
        return []
    for ex in exs:
        b = m.bind(*ex.args, **ex.kwargs).arguments
        data = [p for p in m.array_params if p in DATA and b.get(p) is not None]
        if not data or any(np.ndim(b[p]) < 2 for p in data):
            continue
        n0 = np.shape(b[data[0]])[0]
        if any(np.shape(b[p])[0] != n0 for p in data):
            continue
        kind = _per_sample(m, b)
        if kind and m.name in BATCH_STATS:  # evaluation mode: nothing specific to sharding; skipped
            continue
        key = (b.get("training", True) is False, b.get("use_input_stats", True) is False,
               b.get("batch_groups", 1) != 1,  # batch groups span the ranks under sync: see case_sync
               -sum(b.get(p) is not None for p in m.diff_params),
               -sum(b.get(p) is not None for p in m.array_params),  # running statistics given: tested too
               _cost(m, ex))
        if kind not in best or key < best[kind][0]:
            best[kind] = (key, ex)
    return [(kind, ex) for kind, (_, ex) in sorted(best.items())]


def case_sharded(m, ex, mesh, per_sample):
    args, diff, local = _local_value_and_grads(m, ex)
    full, sharded, n = _global_batch(m, args)
    not_diff_sharded = [p for p in sharded if p not in diff]
    assert not not_diff_sharded, not_diff_sharded
    primals = tuple(full[p] for p in diff)
    specs = tuple(P(AXIS) if p in sharded else P() for p in diff)
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(AXIS), specs), check_vma=True))
    y, g = f(*(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(primals, specs)))

    # reference "loop": each device's slice on its own, one device
    outs = [local(*(a[k * n:(k + 1) * n] if p in sharded else a for p, a in zip(diff, primals)))
            for k in range(NDEV)]
    y_loop = jnp.concatenate([o[0] for o in outs])
    g_loop = [jnp.concatenate([o[1][i] for o in outs]) if p in sharded else sum(o[1][i] for o in outs)
              for i, p in enumerate(diff)]
    err_loop = max([_rel_err(y, y_loop)] + [_rel_err(a, b) for a, b in zip(g, g_loop)])
    res = {"err_loop": err_loop, "cond": ex.cond, "grads": len(diff), "sharded": sharded,
           "per_sample": per_sample}
    if per_sample:  # reference "full": the whole batch at once, one device
        y_full, g_full = jax.jit(_value_and_grads(m, full, diff))(*primals)
        res["err_full"] = max([_rel_err(y, y_full)] + [_rel_err(a, b) for a, b in zip(g, g_full)])
    return res


def _global_batch(m, args, ex_rng_seed=5):
    """(full args, sharded names, local batch n): the global batch is NDEV perturbed copies of the
    example (each one valid). Sharded along the batch: the data inputs and any array with the
    input's rank and batch size (e.g. normalize's generated affine parameters)."""
    x0 = next(args[p] for p in m.array_params if p in DATA and args.get(p) is not None)
    n, nd = x0.shape[0], x0.ndim
    sharded = [p for p in m.array_params if args.get(p) is not None and hasattr(args[p], "ndim")
               and (p in DATA or (args[p].ndim == nd and args[p].shape[0] == n))]
    rng = np.random.default_rng(ex_rng_seed)
    full = dict(args)
    for p in sharded:
        full[p] = jnp.concatenate(
            [args[p] * (1.0 + 0.05 * jnp.asarray(rng.uniform(-1, 1, args[p].shape))) for _ in range(NDEV)])
    return full, sharded, n


def _split_out(m, out):
    """(primary output, tuple of the auxiliary state fields) of a method's result."""
    if isinstance(out, tuple):
        return out[0], tuple(out[1:])
    return out, ()


def _borrow_running_statistics(m, ex, exs):
    """Running statistics for a training example that has none, from an evaluation example of the
    same configuration (every non-array argument but ``training`` equal), so their update is tested."""
    b = m.bind(*ex.args, **ex.kwargs).arguments
    state = [p for p in m.array_params if p not in m.diff_params and b.get(p) is None]
    for other in exs:
        o = m.bind(*other.args, **other.kwargs).arguments
        same = all(o.get(k) == v for k, v in b.items()
                   if k != "training" and not isinstance(v, np.ndarray) and k not in m.array_params)
        if same and any(o.get(p) is not None for p in state):
            return {p: jnp.asarray(o[p]) for p in state if o.get(p) is not None}
    return {}


def case_sync(m, ex, mesh, vmap=True, state=None):
    """``axis_name="batch"`` (synchronized statistics) under shard_map, pmap and vmap(axis_name=...):
    forward output, updated running statistics and every gradient of L = Σ over the global batch of
    sin(y) equal the unsynchronized method on the whole batch on one device. Under shard_map with
    check_vma the parameter gradients come out already summed over the devices (JAX's rule for
    replicated primals); under pmap and vmap they are each device's part and are psum'd, as users do."""
    args, _, _ = _local_value_and_grads(m, ex)
    args = {**args, **(state or {})}
    full, sharded, n = _global_batch(m, args)
    diff = [p for p in m.diff_params if full.get(p) is not None]
    primals = tuple(full[p] for p in diff)
    idx = tuple(range(len(diff)))
    f = nj.function(m)

    def call(a, xs, **kw):
        a = dict(a)
        a.update(zip(diff, xs))
        b = inspect.BoundArguments(m.signature, a)
        return _split_out(m, f(*b.args, **b.kwargs, **kw))

    def vg(a, **kw):
        def loss(*xs):  # the running statistics leave through has_aux (state, not differentiated)
            o = call(a, xs, **kw)
            return jnp.sum(jnp.sin(o[0])), o

        def g(*xs):
            (_, (y, aux)), grads = jax.value_and_grad(loss, argnums=idx, has_aux=True)(*xs)
            return y, aux, grads
        return g

    y0, aux0, g0 = jax.jit(vg(full))(*primals)  # reference: the whole batch, one device, no sync
    res = {"cond": ex.cond, "grads": len(diff), "aux": len([a for a in aux0 if a is not None])}

    def errs(y, aux, g):
        e = {"forward": _rel_err(y, y0)}
        e["state"] = max([0.0] + [_rel_err(a, b) for a, b in zip(aux, aux0) if b is not None])
        e["grads"] = max([0.0] + [_rel_err(a, b) for a, b in zip(g, g0)])
        return e

    specs = tuple(P(AXIS) if p in sharded else P() for p in diff)

    # shard_map: the parameter gradients and the updated running statistics are invariant (out_specs
    # P(): check_vma proves them equal on every device — JaxReducer's gather is typed invariant there)
    def sharded_step(*xs):
        return vg(args, axis_name=AXIS)(*xs)

    sm = jax.jit(jax.shard_map(sharded_step, mesh=mesh, in_specs=specs,
                               out_specs=(P(AXIS), tuple(None if a is None else P() for a in aux0), specs),
                               check_vma=True))
    y, aux, g = jax.tree.map(np.asarray, sm(*(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(primals, specs))))
    res["shard_map"] = errs(y, aux, g)
    res["shard_map"]["replicas_equal"] = True  # out_specs P() under check_vma: replicated by type

    # pmap / vmap: the batch as a leading device axis; parameter gradients psum'd by the caller
    def mapped(*xs):
        y, aux, g = vg(args, axis_name=AXIS)(*xs)
        g = tuple(gi if p in sharded else jax.lax.psum(gi, AXIS) for gi, p in zip(g, diff))
        return y, aux, g

    dev = tuple(a.reshape((NDEV, n) + a.shape[1:]) if p in sharded else a for p, a in zip(diff, primals))
    axes = tuple(0 if p in sharded else None for p in diff)

    def unmap(y, aux, g):  # device axis back into the batch; replicated results: device 0's (all equal)
        y = y.reshape((NDEV * n,) + y.shape[2:])
        aux = tuple(None if a is None else a[0] for a in aux)
        g = tuple(gi.reshape((NDEV * n,) + gi.shape[2:]) if p in sharded else gi[0] for gi, p in zip(g, diff))
        return y, aux, g

    engines = [("pmap", lambda fn: jax.pmap(fn, axis_name=AXIS, in_axes=axes))]
    if vmap:
        engines.append(("vmap", lambda fn: jax.jit(jax.vmap(fn, axis_name=AXIS, in_axes=axes))))
    for engine, tr in engines:
        y, aux, g = jax.tree.map(np.asarray, tr(mapped)(*dev))
        # every device holds the same running statistics and parameter gradients (bitwise)
        same = all(bool(np.all(a == a[:1])) for a in aux if a is not None)
        same = same and all(bool(np.all(gi == gi[:1])) for gi, p in zip(g, diff) if p not in sharded)
        res[engine] = errs(*unmap(y, aux, g))
        res[engine]["replicas_equal"] = same
    return res


def _timed(r, key, fn, *args, **kw):
    t0 = time.perf_counter()
    try:
        r[key] = fn(*args, **kw)
    except Exception:  # reported, and failed on, by the test
        r[key] = {"error": traceback.format_exc(limit=6)}
    r[key]["seconds"] = round(time.perf_counter() - t0, 2)


def run(names):
    mesh = _mesh()
    out = {}
    for name in names:
        m = normref.get(name)
        exs = list(m.examples(np.random.default_rng(7)))
        r = {}
        picks = _pick_sharded(m, exs)
        # the replicated case on a sharded case's example where there is one (shares its reference)
        ex_rep = picks[0][1] if picks else min(exs, key=lambda e: _cost(m, e))
        _timed(r, "replicated", case_replicated, m, ex_rep, mesh)
        if name == "layer_norm":  # once: un-jitted shard_map (the adapter's eager fallback)
            _timed(r, "replicated_eager", case_replicated, m, ex_rep, mesh, eager=True)
        n_diff = lambda e: sum(m.bind(*e.args, **e.kwargs).arguments.get(p) is not None  # noqa: E731
                               for p in m.diff_params)
        if not picks and max(n_diff(e) for e in exs) >= 2:  # every differentiable argument given
            ex_mix = min(exs, key=lambda e: (-n_diff(e), _cost(m, e)))
            _timed(r, "mixed", case_mixed, m, ex_mix, mesh)
        for kind, ex in picks:
            _timed(r, "sharded_per_sample" if kind else "sharded_batch_stats", case_sharded, m, ex, mesh, kind)
        if "sync" in m.signature.parameters:
            ex_sync = next((ex for kind, ex in picks if not kind), None)

            def with_state(e):  # a training example whose running statistics are given or borrowed
                b = m.bind(*e.args, **e.kwargs).arguments
                own = any(b.get(p) is not None for p in m.array_params if p not in m.diff_params)
                return b.get("training", True) is True and (own or _borrow_running_statistics(m, e, exs))

            # batch groups are each rank's own under sync, so only batch_groups = 1 compares with the
            # whole batch on one device (see case_sync)
            stateful = [e for e in exs if e is not ex_sync and with_state(e)
                        and m.bind(*e.args, **e.kwargs).arguments.get("batch_groups", 1) == 1]
            if ex_sync is not None and not with_state(ex_sync) and stateful:
                ex_sync = min(stateful, key=lambda e: _cost(m, e))
            if ex_sync is None:
                r["sync"] = {"error": "no training-mode example with a batch axis"}
            else:
                _timed(r, "sync", case_sync, m, ex_sync, mesh, vmap=name in VMAP_SYNC,
                       state=_borrow_running_statistics(m, ex_sync, exs))
        out[name] = r
    return out


if __name__ == "__main__":
    assert len(jax.devices()) == NDEV, jax.devices()
    names = sys.argv[1:] or [m.name for m in normref.methods()]
    print(json.dumps(run(names)))
