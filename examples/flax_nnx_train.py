"""A Flax NNX model with normref's BatchNorm, trained with optax; the same model with Flax's own.

    python examples/flax_nnx_train.py

A small conv net on synthetic NHWC images (features last, Flax's layout): conv → normref's
``BatchNorm`` → relu → conv → ``GroupNorm`` → relu → mean pool → linear, regressing a fixed random
target. 60 steps of Adam under ``nnx.jit``; ``nnx.value_and_grad`` differentiates the model through
normref's analytic backward (``normref.backends.flax`` layers call ``normref.backends.jax``'s
``custom_vjp`` functions). The same model built with ``flax.nnx.BatchNorm``/``GroupNorm`` from the
same seed (normref's layers draw the same RNG keys as Flax's, so the initial weights are identical)
is trained alongside: the losses and the running statistics agree to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from normref.backends import flax as ntf


class Net(nnx.Module):
    def __init__(self, norms, *, rngs: nnx.Rngs):
        # no bias before batch norm: BN cancels it, so its gradient is zero up to rounding, and Adam
        # (which divides by the gradient's magnitude) would turn that rounding noise into steps of size lr
        self.conv1 = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
        self.bn = norms.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 16, (3, 3), rngs=rngs)
        self.gn = norms.GroupNorm(16, num_groups=4, rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.conv1(x)))
        h = jax.nn.relu(self.gn(self.conv2(h)))
        return self.head(h.mean(axis=(1, 2)))


def data(key, n=32):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, 8, 8, 3))
    y = jnp.tanh(x.mean(axis=(1, 2)) @ jax.random.normal(kw, (3, 1)))  # a fixed smooth target
    return x, y


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(norms, steps: int = 60, seed: int = 0):
    """Train ``Net(norms)`` for ``steps`` steps; the losses, the eval loss and the model."""
    model = Net(norms, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = data(jax.random.key(seed + 1))
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
    model.eval()  # use_running_average=True: normalize with the running statistics
    eval_loss = float(jnp.mean((model(x) - y) ** 2))
    return losses, eval_loss, model


def main(steps: int = 60) -> dict:
    """Train with normref's layers and with Flax's; print and return the curves and differences."""
    ours, ours_eval, m1 = train(ntf, steps)
    theirs, theirs_eval, m2 = train(nnx, steps)
    for i in range(0, steps, max(steps // 6, 1)):
        print(f"step {i:3d}  loss normref {ours[i]:.5f}  flax {theirs[i]:.5f}")
    print(f"eval loss (running statistics): normref {ours_eval:.5f}  flax {theirs_eval:.5f}")
    loss_diff = max(abs(a - b) for a, b in zip(ours, theirs))
    stats_diff = max(float(jnp.max(jnp.abs(m1.bn.mean[...] - m2.bn.mean[...]))),
                     float(jnp.max(jnp.abs(m1.bn.var[...] - m2.bn.var[...]))))
    print(f"max |loss difference| {loss_diff:.2e}, max |running statistics difference| {stats_diff:.2e}")
    return {"normref": ours, "flax": theirs, "eval": (ours_eval, theirs_eval), "loss_diff": loss_diff,
            "stats_diff": stats_diff}


if __name__ == "__main__":
    main()
