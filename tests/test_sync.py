"""Synchronized batch statistics across ranks (issue 12), on real engines.

Every synchronized method runs on 2 and 4 torch.distributed gloo ranks (spawned on 127.0.0.1 by
:mod:`tests._dist`) with uneven per-rank batches, including a rank with 0 samples where the method
allows it, and must equal a single process on the concatenated batch: the forward output (each
rank's slice), every gradient through ``normref.vjp`` (dx per rank; the parameters' gradients summed
over ranks by the test, as DDP's all-reduce does) and the updated running statistics (on every
rank). Tolerance: float64, ≤ 1e-12 relative — the synchronized and the single-process paths sum the
same numbers in different orders (per-rank partial sums, Chan's pooled M2), so they differ by a few
hundred roundings of O(1)-conditioned sums (TOL64 = 1e3·ε₆₄ ≈ 2.2e-13, well inside 1e-12).

One spawn per world size runs every case (a torch import costs seconds per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normref

from normref.distributed import Reducer

from ._dist import run_ranks

TOL = 1e-12  # float64 relative, see the module docstring
C = 3  # channels


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1e-300, float(np.max(np.abs(b)))))


# --------------------------------------------------------------------------------------------------
# the cases: each builds its arguments from a seeded generator (the same on every rank and in the
# test process) and calls normref.vjp; ``sync`` is None for the single-process reference.


def _params(seed, c=C):
    r = np.random.default_rng(seed)
    return dict(w=r.standard_normal(c), b=r.standard_normal(c), rm=r.standard_normal(c), rv=r.uniform(0.5, 2.0, c),
                rho=r.uniform(0.1, 0.9, c), lw=r.standard_normal(3), lv=r.standard_normal(3))


def case_batch_norm(x, p, sync):
    return normref.vjp(normref.batch_norm, x, p["rm"], p["rv"], p["w"], p["b"], True, 0.3, sync=sync)


def case_batch_norm_plain(x, p, sync):
    return normref.vjp(normref.batch_norm, x, None, None, None, None, True, sync=sync)


def case_batch_norm_cumulative(x, p, sync):
    return normref.vjp(normref.batch_norm, x, p["rm"], p["rv"], p["w"], None, True, None, 1e-3,
                       num_batches_tracked=4, sync=sync)


def case_mean_only(x, p, sync):
    return normref.vjp(normref.mean_only_batch_norm, x, p["rm"], p["b"], True, 0.3, sync=sync)


def _lp(pp, l1=True):
    def case(x, p, sync):
        return normref.vjp(normref.lp_batch_norm, x, p["rm"], p["rv"], p["w"], p["b"], True, 0.3, 1e-5, pp, l1, sync=sync)

    return case


def case_renorm(x, p, sync):
    return normref.vjp(normref.batch_renorm, x, p["rm"] * 0.3, p["rv"], p["w"], p["b"], True, 0.3, sync=sync)


def case_renorm_clipped(x, p, sync):
    return normref.vjp(normref.batch_renorm, x, p["rm"] * 10, p["rv"] * 0.01, p["w"], p["b"], True, 0.3,
                       rmax=1.5, dmax=0.5, sync=sync)


def case_ghost(x, p, sync):
    return normref.vjp(normref.ghost_batch_norm, x, p["rm"], p["rv"], p["w"], p["b"], True, 0.3,
                       virtual_batch_size=2, sync=sync)


def case_ghost_cumulative(x, p, sync):
    return normref.vjp(normref.ghost_batch_norm, x, p["rm"], p["rv"], p["w"], p["b"], True, None,
                       virtual_batch_size=2, num_batches_tracked=3, sync=sync)


def case_batch_group(x, p, sync):
    return normref.vjp(normref.batch_group_norm, x, 1, p["w"], p["b"], batch_groups=2, sync=sync)


def case_switchable(x, p, sync):
    return normref.vjp(normref.switchable_norm, x, p["lw"], p["lv"], p["w"], p["b"], p["rm"], p["rv"], True, 0.3,
                       sync=sync)


def case_bin(x, p, sync):
    return normref.vjp(normref.batch_instance_norm, x, p["rho"], p["w"], p["b"], p["rm"], p["rv"], True, 0.3,
                       sync=sync)


def _normalize(**kw):
    def case(x, p, sync):
        return normref.vjp(normref.normalize, x, p["w"], p["b"], sync=sync, **kw)

    return case


# name: (call, counts kind ("any": uneven with a 0; "even": every count even), batch groups of the
# reference ordering (None: the plain concatenation))
CASES = {
    "batch_norm": (case_batch_norm, "any", None),
    "batch_norm_plain": (case_batch_norm_plain, "any", None),
    "batch_norm_cumulative": (case_batch_norm_cumulative, "any", None),
    "mean_only_batch_norm": (case_mean_only, "any", None),
    "lp_batch_norm p=1": (_lp(1.0), "any", None),
    "lp_batch_norm p=2": (_lp(2.0), "any", None),
    "lp_batch_norm p=3": (_lp(3.0, False), "any", None),
    "lp_batch_norm p=inf": (_lp(float("inf")), "any", None),
    "batch_renorm": (case_renorm, "any", None),
    "batch_renorm clipped": (case_renorm_clipped, "any", None),
    "ghost_batch_norm": (case_ghost, "even", None),
    "ghost_batch_norm cumulative": (case_ghost_cumulative, "even", None),
    "batch_group_norm": (case_batch_group, "even", 2),
    "switchable_norm": (case_switchable, "any", None),
    "batch_instance_norm": (case_bin, "any", None),
    "normalize batch/standardizing": (_normalize(), "any", None),
    "normalize batch/centering": (_normalize(operation="centering"), "any", None),
    "normalize batch/lp p=3": (_normalize(operation="lp", p=3.0), "any", None),
    "normalize batch_group": (_normalize(partition="batch_group", num_groups=3, batch_groups=2), "even", 2),
}


def _global_batch(seed, counts, spatial=(2, 3)):
    r = np.random.default_rng(seed)
    n = sum(counts)
    # distinct per-rank means make the between-rank term of the pooled variance matter
    x = r.standard_normal((n, C) + spatial) * 1.5
    offs = np.cumsum([0] + list(counts))
    for i in range(len(counts)):
        x[offs[i] : offs[i + 1]] += 0.7 * i - 0.5
    g = r.standard_normal(x.shape)
    return x, g, offs


def _split(out):
    """(primary output, running statistics tuple) of a method's result."""
    if isinstance(out, tuple):
        return out[0], tuple(out[1:])
    return out, ()


def _np(a):
    if a is None:
        return None
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _order(offs, gb):
    """Sample order of the single-process reference when batch groups span the ranks: batch group j
    of the reference = the ranks' j-th chunks, in rank order (see batch_group_norm's sync)."""
    if gb is None:
        return np.arange(offs[-1])
    idx = []
    for j in range(gb):
        for r in range(len(offs) - 1):
            m = (offs[r + 1] - offs[r]) // gb
            idx.extend(range(offs[r] + j * m, offs[r] + (j + 1) * m))
    return np.array(idx, dtype=np.intp)


def _run_case(name, x, g, p, sync, as_torch=False):
    call = CASES[name][0]
    if as_torch:
        import torch

        x, g = torch.from_numpy(x), torch.from_numpy(g)
        p = {k: torch.from_numpy(v) for k, v in p.items()}
    out, pullback = call(x, p, sync)
    y, running = _split(out)
    grads = pullback(g)
    return {"y": _np(y), "running": [_np(a) for a in running], "grads": [_np(a) for a in grads]}


def worker(rank, world, plan, f32_seed=None):
    """Every case of ``plan`` on this rank: [(name, seed, counts, as_torch)] -> results, in order
    (and the float32 check's results last when ``f32_seed`` is given: one spawn for both)."""
    from normref.backends.distributed.torch import TorchReducer

    out = []
    for name, seed, counts, as_torch in plan:
        x, g, offs = _global_batch(seed, counts)
        sl = slice(offs[rank], offs[rank + 1])
        red = TorchReducer()
        r = _run_case(name, np.ascontiguousarray(x[sl]), np.ascontiguousarray(g[sl]), _params(seed), red, as_torch)
        r["values_sent"] = red.values_sent
        r["calls"] = red.calls
        out.append(r)
    if f32_seed is not None:
        out.append(worker_f32(rank, world, f32_seed))
    return out


COUNTS = {  # per-rank batch sizes: uneven, with a rank holding 0 samples
    "any": {2: [(5, 3), (0, 6)], 4: [(3, 0, 4, 2), (2, 5, 1, 3)]},
    "even": {2: [(4, 2), (0, 6)], 4: [(2, 0, 4, 6), (4, 2, 2, 2)]},
}


def _plan(world):
    plan = []
    for name, (_, kind, _) in CASES.items():
        for k, cs in enumerate(COUNTS[kind][world]):
            plan.append((name, 100 + 7 * k + len(plan), cs, False))
    counts = COUNTS["any"][world]
    plan.append(("batch_norm", 999, counts[0], True))  # torch tensors through the same reducer
    return plan


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranked(request):
    world = request.param
    plan = _plan(world)
    return world, plan, run_ranks(worker, world, plan, F32_SEED if world == 4 else None, timeout=180)


F32_SEED = 7


def _case_error(name, seed, counts, per_rank) -> float:
    """Largest relative error of the ranks' results against one process on the concatenated batch."""
    x, g, offs = _global_batch(seed, counts)
    idx = _order(offs, CASES[name][2])
    ref = _run_case(name, x[idx], g[idx], _params(seed), None)
    errs = [_rel(np.concatenate([pr["y"] for pr in per_rank])[idx], ref["y"])]
    for j, rg in enumerate(ref["grads"]):
        if rg is None:
            assert all(pr["grads"][j] is None for pr in per_rank), (name, j)
            continue
        if j == 0:  # the input's gradient: each rank's slice
            got = np.concatenate([pr["grads"][j] for pr in per_rank])[idx]
        else:  # a parameter's: this rank's part, summed across ranks as DDP does
            got = sum(pr["grads"][j] for pr in per_rank)
        errs.append(_rel(got, rg))
    for j, rs in enumerate(ref["running"]):
        for pr in per_rank:  # every rank the same running statistics
            errs.append(_rel(pr["running"][j], rs))
    return max(errs)


def test_sync_equals_single_process(ranked):
    world, plan, results = ranked
    worst = {}
    for i, (name, seed, counts, as_torch) in enumerate(plan):
        worst[(name, counts, as_torch)] = _case_error(name, seed, counts, [results[r][i] for r in range(world)])
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, bad


def _expected_traffic(name, counts):
    """(values sent per rank per step, collectives) of each case: the minimum each method's docstring
    states, with C statistics (K = batch groups × channel groups for batch_group)."""
    c = C
    k_bg = lambda groups: 2 * groups  # noqa: E731  (batch groups 2 × channel groups)
    table = {
        "batch_norm": ((2 * c + 1) + 2 * c, 2),  # gather [n, μ, M2]; all-reduce [Σg, Σg·x̂]
        "batch_norm_plain": ((2 * c + 1) + 2 * c, 2),
        "batch_norm_cumulative": ((2 * c + 1) + 2 * c, 2),
        "mean_only_batch_norm": ((c + 1) + c, 2),  # gather [n, μ]; all-reduce Σg
        "lp_batch_norm p=1": ((c + 1) + c + 3 * c, 3),  # gather [n, μ]; Σ|u|; [Σg, Σg·x̂, Σw]
        "lp_batch_norm p=2": ((2 * c + 1) + 2 * c, 2),  # σ₂ from M2; Σw = 0
        "lp_batch_norm p=3": ((c + 1) + c + 3 * c, 3),
        "lp_batch_norm p=inf": ((c + 1) + c + 4 * c, 3),  # max by gather; ties counted globally
        "batch_renorm": ((2 * c + 1) + 2 * c, 2),
        "batch_renorm clipped": ((2 * c + 1) + 2 * c, 2),
        # running statistics only: [count], then every virtual batch's [μ, σ²] (max over ranks of k)
        "ghost_batch_norm": (1 + 2 * c * (max(counts) // 2), 2),
        "ghost_batch_norm cumulative": (1 + 2 * c * (max(counts) // 2), 2),
        "batch_group_norm": ((2 * k_bg(1) + 1) + 2 * k_bg(1), 2),
        "switchable_norm": ((2 * c + 1) + 2 * c, 2),  # the BN branch
        "batch_instance_norm": ((2 * c + 1) + 2 * c, 2),
        "normalize batch/standardizing": ((2 * c + 1) + 2 * c, 2),
        "normalize batch/centering": ((c + 1) + c, 2),
        "normalize batch/lp p=3": ((c + 1) + c + 3 * c, 3),
        "normalize batch_group": ((2 * k_bg(3) + 1) + 2 * k_bg(3), 2),
    }
    return table[name]


def test_values_sent_minimum(ranked):
    """Per step and rank, every synchronized case sends exactly the values its docstring states (the
    minimum: e.g. batch norm one all_gather of 2C + 1 values and one all_reduce of 2C), in that many
    collectives; counted by the reducer itself."""
    world, plan, results = ranked
    for i, (name, seed, counts, as_torch) in enumerate(plan):
        values, calls = _expected_traffic(name, counts)
        for r in range(world):
            assert results[r][i]["values_sent"] == values, (name, counts, r, results[r][i]["values_sent"], values)
            assert results[r][i]["calls"] == calls, (name, r, results[r][i]["calls"])


# --------------------------------------------------------------------------------------------------
# float32: Chan's pooled moments, not raw Σx²


def worker_f32(rank, world, seed):
    """float32 ranks with |μ|/σ = 1e4 and different means per rank: the synced mean and variance."""
    import torch

    from normref.backends.distributed.torch import TorchReducer

    x = _f32_batch(seed, world)[rank]
    out = {}
    for lib in ("numpy", "torch"):  # NumPy: the numba moments kernel; torch: the formula's two passes
        xl = x if lib == "numpy" else torch.from_numpy(x)
        c = x.shape[1]
        rm = np.zeros(c, np.float32) if lib == "numpy" else torch.zeros(c)
        rv = np.ones(c, np.float32) if lib == "numpy" else torch.ones(c)
        # momentum 1: the running statistics are the global batch's mean and unbiased variance
        _, m, v = normref.batch_norm(xl, rm, rv, None, None, True, 1.0, sync=TorchReducer())
        out[lib] = (_np(m), _np(v))
    return out


def _f32_batch(seed, world):
    r = np.random.default_rng(seed)
    sizes = [7, 12, 5, 9][:world]
    # mean 1e4 (σ = 1), each rank's mean shifted by about σ: the between-rank term is O(σ²)
    return [(1e4 + 1.3 * i + r.standard_normal((sizes[i], 2, 4, 4))).astype(np.float32) for i in range(world)]


def test_float32_stability_across_ranks(ranked):
    world, plan, results = ranked
    if world != 4:
        pytest.skip("the float32 check runs in the 4-rank spawn")
    seed = F32_SEED
    res = [results[r][len(plan)] for r in range(world)]
    xs = _f32_batch(seed, world)
    full = np.concatenate(xs).astype(np.float64)  # the float32 data, exactly, in float64
    axes = (0, 2, 3)
    mean, var = full.mean(axis=axes), full.var(axis=axes, ddof=1)
    # float32 budget: the per-rank moments are accurate to a few ε₃₂ (corrected two-pass, combined in
    # float64) and the stored mean and variance round once more (ε₃₂/2): 8·ε₃₂ ≈ 1e-6 (measured
    # 4.6e-8). Without the correction the rounding of each rank's float32 mean, ε₃₂·|μ| ≈ 6e-4·σ,
    # enters the between-rank term linearly: a relative error of order 1e-4 in the variance.
    tol = 8 * float(np.finfo(np.float32).eps)
    for r in range(world):
        for lib, (m, v) in res[r].items():
            assert np.max(np.abs(m - mean) / np.abs(mean)) <= tol, (r, lib)
            assert np.max(np.abs(v - var) / var) <= tol, (r, lib, np.max(np.abs(v - var) / var))
    # the naive float32 E[x²] − μ² loses every digit here (μ²/σ² = 1e8 > 1/ε₃₂): the test can fail
    f = np.concatenate(xs)
    n = f.shape[0] * 16
    naive = (np.sum(f * f, axis=axes, dtype=np.float32) / np.float32(n) - np.float32(mean) ** 2) * (n / (n - 1))
    assert np.max(np.abs(naive - var) / var) > 1e-2


# --------------------------------------------------------------------------------------------------
# JAX collectives: shard_map over 4 host devices, vmap(axis_name=), pmap


_JAX_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import normref
    from normref.backends.distributed.jax import JaxReducer

    assert jax.device_count() == 4, jax.devices()
    r = np.random.default_rng(3)
    W, n, C = 4, 3, 5
    x = r.standard_normal((W * n, C, 2, 3)) + np.arange(W * n)[:, None, None, None] * 0.2
    g = r.standard_normal(x.shape)
    w, b, rm, rv = r.standard_normal(C), r.standard_normal(C), r.standard_normal(C), r.uniform(0.5, 2, C)
    out, pull = normref.vjp(normref.batch_norm, x, rm, rv, w, b, True, 0.3)
    ref = {"y": out[0], "rm": out[1], "rv": out[2]}
    ref["dx"], _, _, ref["dw"], ref["db"] = pull(g)

    red = JaxReducer("b")

    def body(xl, gl):
        (y, m, v), pb = normref.vjp(normref.batch_norm, xl, jnp.asarray(rm), jnp.asarray(rv), jnp.asarray(w),
                                    jnp.asarray(b), True, 0.3, sync=red)
        dx, _, _, dw, db = pb(gl)
        return y, m[None], v[None], dx, jax.lax.psum(dw, "b"), jax.lax.psum(db, "b")

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(b))))

    errs = {}
    mesh = Mesh(np.array(jax.devices()), ("b",))
    sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("b"), P("b")),
                               out_specs=(P("b"), P("b"), P("b"), P("b"), P(), P()), check_vma=False))
    y, m, v, dx, dw, db = sm(jnp.asarray(x), jnp.asarray(g))
    errs["shard_map"] = max(rel(y, ref["y"]), rel(dx, ref["dx"]), rel(dw, ref["dw"]), rel(db, ref["db"]),
                            max(rel(m[i], ref["rm"]) for i in range(W)), max(rel(v[i], ref["rv"]) for i in range(W)))
    xs, gs = x.reshape((W, n) + x.shape[1:]), g.reshape((W, n) + x.shape[1:])
    for name, mapped in (("vmap", jax.vmap(body, axis_name="b")), ("pmap", jax.pmap(body, axis_name="b"))):
        y, m, v, dx, dw, db = mapped(jnp.asarray(xs), jnp.asarray(gs))
        errs[name] = max(rel(np.asarray(y).reshape(x.shape), ref["y"]), rel(np.asarray(dx).reshape(x.shape), ref["dx"]),
                         rel(dw[0], ref["dw"]), rel(db[0], ref["db"]),
                         max(rel(m[i, 0], ref["rm"]) for i in range(W)), max(rel(v[i, 0], ref["rv"]) for i in range(W)))
    errs["values_sent_per_trace"] = red.values_sent
    print("RESULT " + json.dumps(errs))
    """
)


def test_jax_collectives_shard_map_vmap_pmap():
    """batch_norm(..., sync=JaxReducer("b")) on jax arrays inside shard_map / vmap / pmap equals the
    single-process batch (float64, ≤ 1e-12), gradients through normref.vjp included."""
    pytest.importorskip("jax")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _JAX_SCRIPT], capture_output=True, text=True, timeout=240, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    import json

    errs = json.loads(lines[-1][len("RESULT "):])
    for k in ("shard_map", "vmap", "pmap"):
        assert errs[k] <= TOL, errs


# --------------------------------------------------------------------------------------------------
# mpi4py (optional): the same cases through MPIReducer under mpiexec


_MPI_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from mpi4py import MPI
    sys.path.insert(0, ".")
    import tests.test_sync as T
    from normref.backends.distributed.mpi import MPIReducer

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    plan = [p for p in T._plan(world) if not p[3]]  # NumPy arrays (mpi4py sends NumPy buffers)
    mine = []
    for name, seed, counts, _ in plan:
        x, g, offs = T._global_batch(seed, counts)
        sl = slice(offs[rank], offs[rank + 1])
        red = MPIReducer()
        r = T._run_case(name, np.ascontiguousarray(x[sl]), np.ascontiguousarray(g[sl]), T._params(seed), red)
        r["values_sent"] = red.values_sent
        mine.append(r)
    allr = comm.gather(mine, root=0)
    if rank == 0:
        worst = {}
        for i, (name, seed, counts, _) in enumerate(plan):
            worst[f"{name} {counts}"] = T._case_error(name, seed, counts, [allr[r][i] for r in range(world)])
        print("RESULT " + json.dumps(worst))
    """
)


@pytest.mark.parametrize("world", [2, 4])
def test_mpi4py(world):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (optional: pip install mpi4py mpich)")
    import shutil
    import signal

    # the mpich wheel installs its launcher beside the interpreter (a venv need not be activated)
    here = os.path.dirname(sys.executable)
    exe = next((e for e in (shutil.which(n, path=here) or shutil.which(n) for n in ("mpiexec", "mpirun")) if e), None)
    if exe is None:
        pytest.fail("mpi4py imports but no mpiexec/mpirun was found beside the interpreter or on PATH")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    # one host, loopback only; its own session so that a timeout kills the launcher, its proxy and the
    # ranks together (none is left waiting in a collective)
    proc = subprocess.Popen([exe, "-hosts", "127.0.0.1", "-iface", "lo", "-n", str(world), sys.executable, "-c",
                             _MPI_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=root, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {world} timed out after 240 s:\n{out[-2000:]}{err[-2000:]}")
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    import json

    worst = json.loads(lines[-1][len("RESULT "):])
    assert len(worst) == sum(len(COUNTS[k][world]) for _, k, _ in CASES.values())
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, bad


# --------------------------------------------------------------------------------------------------
# validation and the reducers' static properties (no processes)


class _Solo(Reducer):
    """The exact collectives of a world of one rank (for argument checks without processes)."""

    world_size = 1

    def _all_reduce_sum(self, a):
        return a + 0

    def _all_gather(self, a):
        return a[None]


def test_sync_argument_checked():
    x = np.random.default_rng(0).standard_normal((4, 3, 2))
    with pytest.raises(TypeError, match="batch_norm: sync must be None or a reducer"):
        normref.batch_norm(x, None, None, training=True, sync="gloo")
    with pytest.raises(TypeError, match="lp_batch_norm: sync"):
        normref.lp_batch_norm(x, training=True, sync=object())
    with pytest.raises(ValueError, match="normalize: sync= applies to the partitions over the batch"):
        normref.normalize(x, partition="instance", sync=_Solo())
    with pytest.raises(ValueError, match="normalize: sync= applies to operation"):
        normref.normalize(x, operation="scaling", sync=_Solo())
    # over all ranks together one value per statistic: the same error as without sync, after the gather
    with pytest.raises(ValueError, match="more than 1 value per statistic over all ranks"):
        normref.batch_norm(x[:1, :, :1], None, None, training=True, sync=_Solo())


def test_sync_world_of_one_and_inference():
    """A world of one rank is the local computation; with training=False sync is unused."""
    r = np.random.default_rng(1)
    x, rm, rv = r.standard_normal((5, 3, 4)), r.standard_normal(3), r.uniform(0.5, 2, 3)
    y0, m0, v0 = normref.batch_norm(x, rm, rv, training=True)
    y1, m1, v1 = normref.batch_norm(x, rm, rv, training=True, sync=_Solo())
    for a, b in ((y1, y0), (m1, m0), (v1, v0)):
        assert _rel(a, b) <= TOL
    red = _Solo()
    np.testing.assert_array_equal(normref.batch_norm(x, rm, rv, training=False, sync=red),
                                  normref.batch_norm(x, rm, rv, training=False))
    assert red.values_sent == 0


def test_reducers_hashable():
    from normref.backends.distributed.jax import JaxReducer
    from normref.backends.distributed.mpi import MPIReducer
    from normref.backends.distributed.torch import TorchReducer

    assert TorchReducer() == TorchReducer() and hash(TorchReducer()) == hash(TorchReducer())
    assert JaxReducer("b") == JaxReducer("b") and JaxReducer("b") != JaxReducer("c")
    assert hash(JaxReducer(("x", "y"))) == hash(JaxReducer(("x", "y")))
    assert MPIReducer() == MPIReducer()
    # the reducer is part of the operation, hence of the residuals' static part
    assert normref.operation.Standardizing(1e-5, JaxReducer("b")) == normref.operation.Standardizing(1e-5, JaxReducer("b"))
