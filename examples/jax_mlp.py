"""A small JAX MLP with a normref layer, trained with normref's analytic backward (no other framework).

    python examples/jax_mlp.py

Two hidden layers, each followed by ``normref.batch_norm`` (training mode, running statistics carried
as explicit state) or ``normref.layer_norm``; regression on synthetic data; 300 steps of SGD with
momentum under ``jax.jit``. jax.grad differentiates the model through normref's hand-derived
backward (``normref.backends.jax`` wraps every registered method in a ``jax.custom_vjp``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normref.backends import jax as nj


def init(key, sizes=(8, 32, 32, 1)):
    params, state = [], []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        layer = {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        if i < len(sizes) - 2:  # hidden layers: normalization with a learnable affine
            layer["gamma"], layer["beta"] = jnp.ones(n), jnp.zeros(n)
            state.append({"mean": jnp.zeros(n), "var": jnp.ones(n)})
        params.append(layer)
    return params, state


def forward(params, state, x, training=True):
    new_state = []
    h = x
    for i, layer in enumerate(params[:-1]):
        h = h @ layer["w"] + layer["b"]
        if i == 0:  # batch normalization: running statistics go in and come back (pure function)
            s = state[i]
            out = nj.batch_norm(h, s["mean"], s["var"], layer["gamma"], layer["beta"], training, 0.1)
            if training:
                h, mean, var = out
                s = {"mean": mean, "var": var}
            else:
                h = out
            new_state.append(s)
        else:  # layer normalization
            h = nj.layer_norm(h, (h.shape[-1],), layer["gamma"], layer["beta"])
            new_state.append(state[i])
        h = jax.nn.relu(h)
    last = params[-1]
    return h @ last["w"] + last["b"], new_state


def loss_fn(params, state, x, y):
    pred, new_state = forward(params, state, x)
    return jnp.mean((pred - y) ** 2), new_state


@jax.jit
def step(params, velocity, state, x, y, lr=0.05, beta=0.9):
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    velocity = jax.tree_util.tree_map(lambda v, g: beta * v + g, velocity, grads)
    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
    return params, velocity, new_state, loss


def main(steps: int = 300, batch: int = 64) -> list[float]:
    key = jax.random.PRNGKey(0)
    kx, kt, kp = jax.random.split(key, 3)
    X = jax.random.normal(kx, (1024, 8))
    true_w = 0.4 * jax.random.normal(kt, (8, 1))
    Y = jnp.sin(X @ true_w) + 0.1 * (X[:, :1] ** 2)  # a smooth nonlinear target
    params, state = init(kp)
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    losses = []
    for s in range(steps):
        i = (s * batch) % X.shape[0]
        params, velocity, state, loss = step(params, velocity, state, X[i : i + batch], Y[i : i + batch])
        losses.append(float(loss))
        if (s + 1) % 50 == 0:  # minibatch losses are noisy: print the mean over each 50 steps
            print(f"steps {s - 49:3d}-{s:3d}  mean loss {sum(losses[-50:]) / 50:.4f}")
    pred, _ = forward(params, state, X, training=False)  # inference with the running statistics
    print(f"eval loss (running statistics): {float(jnp.mean((pred - Y) ** 2)):.4f}")
    return losses


if __name__ == "__main__":
    main()
