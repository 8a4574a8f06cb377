"""``model.fit`` with normref's Keras layers, on Keras's JAX or torch backend.

    KERAS_BACKEND=jax python examples/keras_fit.py       # or KERAS_BACKEND=torch (default: jax)

A small convolutional classifier on synthetic NHWC images (Keras's features-last layout), with
``nk.BatchNormalization`` after the convolution and ``nk.LayerNormalization`` before the head; the
same model built with Keras's own ``BatchNormalization`` / ``LayerNormalization`` from the same
initial weights, both trained by ``model.fit`` (SGD, 3 epochs, no shuffling). normref's layers run
normref's forward and analytic backward (torch: its autograd Function; jax: its custom_vjp); the
moving statistics are updated through Keras's own mechanism (``Variable.assign``, which Keras's JAX
trainer carries out of its jitted, stateless step). Prints the per-epoch losses of both models and,
on the last line, a JSON summary (loss decrease, the largest difference of the final weights).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported; tensorflow is not needed

import keras  # noqa: E402
import numpy as np  # noqa: E402

from normref.backends import keras as nk  # noqa: E402


def build(norm: str) -> keras.Model:
    L = nk if norm == "normref" else keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        L.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        L.LayerNormalization(),
        keras.layers.Dense(4),
    ])


def main() -> dict:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8, 8, 3)).astype("float32")
    # labels from a fixed random linear map of the channel means: learnable, not trivial
    y = np.argmax(x.mean(axis=(1, 2)) @ rng.standard_normal((3, 4)), axis=1)
    ours, theirs = build("normref"), build("keras")
    theirs.set_weights(ours.get_weights())
    history = {}
    for name, model in (("normref", ours), ("keras", theirs)):
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history[name] = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0).history["loss"]
        print(f"{name:8s} loss per epoch: " + " ".join(f"{v:.5f}" for v in history[name]))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours.get_weights(), theirs.get_weights()))
    summary = {"backend": keras.backend.backend(), "loss_normref": history["normref"],
               "loss_keras": history["keras"], "max_weight_diff": diff,
               "state_names": [w.path for w in ours.non_trainable_weights]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
