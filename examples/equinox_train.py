"""A small Equinox conv net with normref's BatchNorm, trained with optax, against Equinox's own BatchNorm.

    python examples/equinox_train.py

The model is called per example (``(C, H, W)``, Equinox's convention) under
``jax.vmap(..., axis_name="batch")``: ``normref.backends.equinox.BatchNorm(8, "batch")`` takes its
batch statistics over that named axis, keeps its running statistics in an ``eqx.nn.State`` and is
differentiated through normref's analytic backward. The same network with ``eqx.nn.BatchNorm(8,
"batch", mode="batch")`` (identical initial weights) is trained side by side: the two loss curves
agree to rounding, and ``eqx.nn.inference_mode`` evaluates both with their running statistics.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from normref.backends import equinox as ne


class Net(eqx.Module):
    """conv 3×3 (1 → 8) → batch norm → ReLU → group norm → global mean → linear (8 → 1)."""

    conv: eqx.nn.Conv2d
    norm: Any
    group: Any
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array, normref: bool = True, dtype: Any = jnp.float32):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, 3, padding=1, key=k1, dtype=dtype)
        if normref:
            self.norm = ne.BatchNorm(8, "batch", dtype=dtype)
            self.group = ne.GroupNorm(2, 8, dtype=dtype)
        else:
            self.norm = eqx.nn.BatchNorm(8, "batch", mode="batch", dtype=dtype)
            self.group = eqx.nn.GroupNorm(2, 8, dtype=dtype)
        self.head = eqx.nn.Linear(8, 1, key=k2, dtype=dtype)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        h = self.conv(x)                      # one example: (1, H, W) -> (8, H, W)
        h, state = self.norm(h, state)        # statistics over the vmapped batch axis
        h = self.group(jax.nn.relu(h))
        return self.head(h.mean(axis=(1, 2)))[0], state


def data(key: jax.Array, n: int = 32, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Images (n, 1, 6, 6) whose target is a smooth function of their mean and spread."""
    x = (jax.random.normal(key, (n, 1, 6, 6)) * 2.0 + 0.5).astype(dtype)
    y = jnp.tanh(x.mean(axis=(1, 2, 3))) + 0.3 * x.std(axis=(1, 2, 3))
    return x, y.astype(dtype)


def loss_fn(model: Net, state: eqx.nn.State, x: jax.Array, y: jax.Array) -> tuple[jax.Array, eqx.nn.State]:
    pred, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    return jnp.mean((pred - y) ** 2), state


def train(normref: bool = True, steps: int = 40, dtype: Any = jnp.float32, seed: int = 0) -> dict:
    """Train the net for ``steps`` SGD-with-momentum steps; the losses, the model and its eval loss."""
    kmodel, kdata = jax.random.split(jax.random.PRNGKey(seed))
    model, state = eqx.nn.make_with_state(Net)(kmodel, normref, dtype)
    x, y = data(kdata, dtype=dtype)
    opt = optax.sgd(0.05, momentum=0.9)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, opt_state):
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state, x, y)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    losses = []
    for _ in range(steps):
        model, state, opt_state, loss = step(model, state, opt_state)
        losses.append(float(loss))
    eval_loss = float(eqx.filter_jit(loss_fn)(eqx.nn.inference_mode(model), state, x, y)[0])
    return {"losses": losses, "model": model, "state": state, "eval_loss": eval_loss}


def main() -> None:
    ours, theirs = train(normref=True), train(normref=False)
    for i in range(0, len(ours["losses"]), 10):
        print(f"step {i:2d}  loss normref {ours['losses'][i]:.5f}  equinox {theirs['losses'][i]:.5f}")
    print(f"final    loss normref {ours['losses'][-1]:.5f}  equinox {theirs['losses'][-1]:.5f}")
    print(f"eval (running statistics)  normref {ours['eval_loss']:.5f}  equinox {theirs['eval_loss']:.5f}")


if __name__ == "__main__":
    main()
