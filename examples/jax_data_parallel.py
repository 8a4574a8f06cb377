"""Data-parallel training in JAX with normref's synchronized batch norm (``axis_name=``), on one machine.

    python examples/jax_data_parallel.py

An MLP 8 → 32 → batch norm → ReLU → 1, trained by SGD on a synthetic regression, twice:

- on one device, on the whole batch of 64 samples per step;
- data-parallel under ``jax.shard_map`` (``check_vma=True``) over 4 simulated host devices, 16 samples
  per device, with ``nj.batch_norm(..., axis_name="batch")``: the batch statistics (and the backward's
  Σg, Σg·x̂) are synchronized over the devices, so every device normalizes with the statistics of the
  global batch, exactly as the single-device run does.

The printed loss curves are equal (float64: to ~1e-15; the devices only group the sums differently).
Under shard_map with ``check_vma=True`` the gradient of a replicated parameter comes out already
summed over the devices (JAX's rule, which normref's custom_vjp follows), so there is no explicit
``psum`` of gradients; under ``pmap`` you would ``lax.psum`` them yourself. The synchronized running
statistics are the same on every device and typed so (invariant): they stay replicated (``P()``)
between steps. A third column shows, for contrast, the same data-parallel run without ``axis_name``
(each device normalizes with its own 16 samples' statistics, so each keeps its own running
statistics, as a device-stacked ``P("batch")`` array): a different curve.
"""

from __future__ import annotations

import os
import sys

NDEV = 4
if "jax" not in sys.modules:  # the simulated devices must be requested before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NDEV}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64: the two runs agree to rounding

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from normref.backends import jax as nj  # noqa: E402

BATCH, STEPS, LR, MOMENTUM = 64, 12, 0.1, 0.1


def init(key):
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (8, 32)) / jnp.sqrt(8.0), "b1": jnp.zeros(32),
        "gamma": jnp.ones(32), "beta": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 1)) / jnp.sqrt(32.0), "b2": jnp.zeros(1),
    }
    state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
    return params, state


def sum_sq_error(params, state, x, y, axis_name=None):
    """Σ (pred − y)² over the samples given, and the updated running statistics."""
    h = x @ params["w1"] + params["b1"]
    o = nj.batch_norm(h, state["mean"], state["var"], params["gamma"], params["beta"], True, MOMENTUM,
                      axis_name=axis_name)  # axis_name=None: this device's batch only
    pred = jax.nn.relu(o.output) @ params["w2"] + params["b2"]
    return jnp.sum((pred - y) ** 2), {"mean": o.running_mean, "var": o.running_var}


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


@jax.jit
def step_single(params, state, x, y):
    (sse, state), grads = jax.value_and_grad(sum_sq_error, has_aux=True)(params, state, x, y)
    grads = jax.tree.map(lambda g: g / BATCH, grads)  # gradient of the mean squared error
    return sgd(params, grads), state, sse / BATCH


def make_step_parallel(mesh, axis_name="batch"):
    def local(params, state, x, y):  # runs on each device, on its 16 samples
        (sse, state), grads = jax.value_and_grad(sum_sq_error, has_aux=True)(params, state, x, y, axis_name)
        # grads: already Σ over the devices (replicated parameters, check_vma=True); the loss: psum it
        grads = jax.tree.map(lambda g: g / BATCH, grads)
        return sgd(params, grads), state, jax.lax.psum(sse, "batch") / BATCH

    # synchronized running statistics are replicated values (P()); local ones differ per device
    st = P() if axis_name is not None else P("batch")
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), st, P("batch"), P("batch")),
                                 out_specs=(P(), st, P()), check_vma=True))


def data(key):
    """A fresh batch each step: y = sin(x·a) + 0.1·noise."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (BATCH, 8))
    a = jnp.linspace(-1.0, 1.0, 8)[:, None]
    return x, jnp.sin(x @ a) + 0.1 * jax.random.normal(k2, (BATCH, 1))


def main() -> int:
    assert len(jax.devices()) >= NDEV, f"expected {NDEV} devices, got {jax.devices()}"
    axis_types = {"axis_types": (jax.sharding.AxisType.Explicit,)} if hasattr(jax.sharding, "AxisType") else {}
    mesh = jax.make_mesh((NDEV,), ("batch",), **axis_types)
    step_parallel = make_step_parallel(mesh)
    step_local = make_step_parallel(mesh, axis_name=None)  # for contrast: each device's own statistics
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))  # noqa: E731
    replicate = lambda a: jax.device_put(a, NamedSharding(mesh, P()))  # noqa: E731

    params, state = init(jax.random.key(0))
    p1, s1 = params, state  # single device
    pN = jax.tree.map(replicate, params)  # 4 devices: replicated parameters,
    sN = jax.tree.map(replicate, state)  # synchronized running statistics: replicated
    pL = pN
    sL = jax.tree.map(lambda a: shard(jnp.tile(a, NDEV)), state)  # local ones: one copy per device
    key = jax.random.key(1)
    print(f"step  1 device, batch {BATCH}   {NDEV} devices x {BATCH // NDEV}, axis_name   "
          f"{NDEV} devices, local statistics")
    worst = 0.0
    for t in range(STEPS):
        key, k = jax.random.split(key)
        x, y = data(k)
        p1, s1, l1 = step_single(p1, s1, x, y)
        pN, sN, lN = step_parallel(pN, sN, shard(x), shard(y))
        pL, sL, lL = step_local(pL, sL, shard(x), shard(y))
        l1, lN = float(l1), float(lN)
        worst = max(worst, abs(l1 - lN) / abs(l1))
        print(f"{t:4d}  {l1:.15f}   {lN:.15f}         {float(lL):.15f}")
    # the trained parameters and every device's running statistics agree as well
    worst_p = max(float(jnp.max(jnp.abs(jnp.asarray(a) - b)) / max(1.0, float(jnp.max(jnp.abs(b)))))
                  for a, b in zip(jax.tree.leaves(pN), jax.tree.leaves(p1)))
    worst_s = max(float(jnp.max(jnp.abs(jnp.asarray(a) - b)) / max(1.0, float(jnp.max(jnp.abs(b)))))
                  for a, b in zip(jax.tree.leaves(sN), jax.tree.leaves(s1)))
    print(f"max relative difference: loss {worst:.1e}, parameters {worst_p:.1e}, running statistics {worst_s:.1e}")
    return 0 if max(worst, worst_p, worst_s) <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
