"""normref.backends.jax across devices: every registered method under ``jax.shard_map(check_vma=True)``
over 4 simulated host devices, and ``axis_name=`` (synchronized batch statistics) under shard_map,
pmap and vmap(axis_name=...).

The device count (``XLA_FLAGS=--xla_force_host_platform_device_count=4``) must be set before jax is
imported, and this session has imported jax already: the cases run in ``tests/jax_sharded_worker.py``
(see its docstring for what each case computes), in two subprocesses started at collection of the
first test (each half of the methods; they run side by side, bounded by a timeout), whose JSON
results the tests below check.

Tolerance: 1e-12·cond relative (max|a − b| / max(1, max|b|)), float64, ``cond`` the example's own
conditioning estimate. The sharded and single-device computations differ only in how XLA groups
the sums (per device, then psum / Chan combination): n·ε per reduction for n ≤ a few hundred terms
(≲ 1e-13), times the conditioning for the matrix functions (whitening). Measured: ≤ 1.6e-15.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")

import normref  # noqa: E402

WORKER = Path(__file__).with_name("jax_sharded_worker.py")
TOL = 1e-12
NAMES = [m.name for m in normref.methods()]
SYNCED = [m.name for m in normref.methods() if "sync" in m.signature.parameters]
# methods with a data input (``input``/``x``/``content``/``style``) get the batch-sharded case
DATA = ("input", "x", "content", "style")
# (a penalty's 0-d loss over the whole batch has nothing per device to shard: the worker skips it)
WITH_DATA = [m.name for m in normref.methods()
             if any(p in DATA for p in m.array_params) and m.category != "penalty"]
# methods with batch statistics in training but no sync= argument (statistics stay per device; the
# worker lists them in BATCH_STATS too): a batch-sharded case, compared slice by slice only
LOCAL_BATCH = {"population_norm", "blended_batch_norm", "prong_whitening", "batch_normalize",
               "moving_average_batch_norm", "memorized_batch_norm", "cross_iteration_batch_norm", "online_norm"}
TIMEOUT = 600


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets the device count itself
    env["JAX_PLATFORMS"] = "cpu"
    halves = [NAMES[0::2], NAMES[1::2]]
    procs = [subprocess.Popen([sys.executable, str(WORKER), *h], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=str(WORKER.parent.parent)) for h in halves]
    out = {}
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{stderr[-4000:]}"
            out.update(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:  # bounded: never leave a worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _ok(case: dict, name: str, what: str):
    assert "error" not in case, f"{name} ({what}) raised:\n{case['error']}"


@pytest.mark.parametrize("name", NAMES)
def test_replicated_arguments(results, name):
    """Every argument replicated, a device-varying loss weight: the gradient is JAX's Σᵢ ∂Lᵢ/∂w,
    equal to the one-device reference."""
    r = results[name]["replicated"]
    _ok(r, name, "replicated")
    assert r["grads"] >= 1
    assert r["err"] <= TOL * r["cond"], r
    if name == "layer_norm":  # un-jitted shard_map (JAX evaluates op by op: the eager fallback)
        e = results[name]["replicated_eager"]
        _ok(e, name, "replicated, eager")
        assert e["err"] <= TOL * e["cond"], e


MIXED = [m.name for m in normref.methods() if m.name not in WITH_DATA and len(m.diff_params) >= 2]


@pytest.mark.parametrize("name", MIXED)
def test_varying_and_replicated_arguments(results, name):
    """The reported defect for methods without a data input: the first differentiable argument
    device-varying, the others replicated. Before the fix this raised "Custom VJP bwd rule must
    produce an output with the same type ... manual axis types do not match" (the replicated
    arguments' gradients varied over the mesh axis); now they are Σᵢ over the devices, as JAX's
    autodiff gives, equal to the one-device reference."""
    r = results[name].get("mixed")
    assert r is not None, f"{name}: no example gives every differentiable argument"
    _ok(r, name, "mixed")
    assert r["grads"] >= 2
    assert r["err"] <= TOL * r["cond"], r


@pytest.mark.parametrize("name", WITH_DATA)
def test_batch_sharded_input(results, name):
    """The data input sharded over the batch, parameters replicated (the reported case: before the
    fix, "manual axis types do not match" for every method with a replicated parameter): forward and
    every gradient equal each device's slice computed alone (local statistics, so this holds for batch-statistics methods
    too), and, where statistics are per sample, the whole batch computed on one device."""
    r = results[name]
    cases = {k: v for k, v in r.items() if k.startswith("sharded_")}
    assert cases, f"{name}: no example with a batch axis was sharded"
    for k, c in cases.items():
        _ok(c, name, k)
        assert c["grads"] >= 1 and c["sharded"]
        assert c["err_loop"] <= TOL * c["cond"], (k, c)
        if c["per_sample"]:
            assert c["err_full"] <= TOL * c["cond"], (k, c)
    expected_batch = name in SYNCED or name in LOCAL_BATCH  # methods with batch statistics: a training case
    assert ("sharded_batch_stats" in cases) == expected_batch, sorted(cases)


def test_per_sample_methods_match_the_whole_batch(results):
    """Every method without batch statistics that has a data input was compared with the whole batch."""
    missing = [n for n in WITH_DATA if n not in SYNCED and n not in LOCAL_BATCH
               and "err_full" not in results[n].get("sharded_per_sample", {})]
    assert not missing, missing
    # normalize covers both kinds: a per-sample partition and a batch one
    assert "sharded_per_sample" in results["normalize"] and "sharded_batch_stats" in results["normalize"]


@pytest.mark.parametrize("name", SYNCED)
def test_axis_name_equals_the_whole_batch(results, name):
    """``axis_name="batch"`` under shard_map (check_vma=True), pmap and vmap(axis_name=...) over 4
    devices: forward output, updated running statistics (identical on every device) and every
    gradient of the loss over the global batch equal the unsynchronized method on the whole batch on
    one device (parameter gradients: summed by JAX's check_vma rule under shard_map, psum'd by the
    caller under pmap/vmap)."""
    r = results[name].get("sync")
    assert r is not None, f"{name}: no synchronized case ran"
    _ok(r, name, "sync")
    assert r["grads"] >= 1
    m = normref.get(name)
    if any(p not in m.diff_params for p in m.array_params):  # it keeps running statistics: compared
        assert r["aux"] >= 1, r
    engines = ("shard_map", "pmap", "vmap") if name in ("batch_norm", "batch_whitening", "iter_norm") else (
        "shard_map", "pmap")  # vmap on these (one compilation per engine and method; see the worker)
    for engine in engines:
        e = r[engine]
        assert e["replicas_equal"], (engine, e)
        for what in ("forward", "state", "grads"):
            assert e[what] <= TOL * r["cond"], (engine, what, e)


def test_readme_data_parallel_example():
    """examples/jax_data_parallel.py (shown in the README): the loss curve of data-parallel training
    over 4 devices with ``axis_name`` equals the single-device full-batch curve (1e-12 relative,
    float64: the same sums grouped per device), and differs without it (local statistics)."""
    script = WORKER.parent.parent / "examples" / "jax_data_parallel.py"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 10
    single, synced, local = (np.array([float(r[k]) for r in rows]) for k in (1, 2, 3))
    assert np.max(np.abs(synced - single) / np.abs(single)) <= 1e-12
    assert np.max(np.abs(local - single) / np.abs(single)) > 1e-3  # the comparison can fail
    assert single[-1] < 0.5 * single[0]  # it trains
