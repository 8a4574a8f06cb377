"""normref for Keras 3: backend-agnostic layers computed by normref's torch or JAX adapter.

Set the backend before Keras is first imported (TensorFlow is not needed)::

    import os; os.environ["KERAS_BACKEND"] = "jax"      # or "torch"
    import keras
    from normref.backends import keras as nk

    model = keras.Sequential([keras.layers.Dense(32), nk.BatchNormalization(), keras.layers.ReLU(),
                              keras.layers.Dense(1)])
    model.compile("adam", "mse"); model.fit(x, y)

Layers (``layers``): ``BatchNormalization``, ``LayerNormalization``, ``GroupNormalization`` and
``RMSNormalization`` are drop-ins for Keras's own: they subclass Keras's layers, so the constructor,
the weights and their names (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``, ``scale``),
``get_config`` and saved models are Keras's; only ``call`` changes. ``StatefulNorm(method, ...)``
turns any registered activation method into a layer (learnable arrays as trainable weights, running
statistics as non-trainable ones); named ones with the method fixed, as normref's torch layers:
``IterNorm``, ``BatchWhitening``, ``DecorrelatedBatchNorm``, ``WhiteningColoring``, ``BatchRenorm``,
``GhostBatchNorm``, ``SwitchableNorm``, ``LpBatchNorm``, ``MeanOnlyBatchNorm``, ``BatchGroupNorm``,
``BatchInstanceNorm``, ``FilterResponseNorm``, ``InstanceNorm``.

Design:

- ``call`` dispatches on ``keras.backend.backend()``: ``"torch"`` → ``normref.backends.torch``
  (a ``torch.autograd.Function``), ``"jax"`` → ``normref.backends.jax`` (a ``jax.custom_vjp``),
  ``"numpy"`` → normref itself (inference). Gradients are normref's analytic backward on both
  training backends; Keras's autodiff (``loss.backward()`` / ``jax.grad`` in ``fit``) only chains them.
- Keras's conventions: features last (``axis=-1``; channels are read in place where normref's
  adapter takes ``channel_axis=``, else moved to axis 1 and back inside the layer), ``momentum`` =
  the weight of the old moving value (0.99), Keras's ε defaults (1e-3 for BN/LN/GN, 1e-6 for RMS),
  ``center``/``scale``, ``training and trainable`` selects batch statistics as in Keras's BN.
- Moving statistics: ``BatchNormalization`` asks normref for the batch statistics (momentum 1 returns
  the batch mean and unbiased variance exactly), converts the variance to Keras's biased one and
  applies Keras's moving average with ``Variable.assign`` — the mechanism of Keras's own layer, which
  Keras's JAX trainer turns into state outputs of its stateless, jitted step.
- ``synchronized=True`` (Keras allows it on TensorFlow only): torch → normref's ``TorchReducer`` over
  torch.distributed's default group when initialized; jax → the arrays under ``keras.distribution``
  are global already; ``axis_name=`` reduces over a named mapped axis (``shard_map``/``pmap``).
"""

from __future__ import annotations

from . import layers as _layers

# the drop-ins, StatefulNorm, adapter, and the named StatefulNorm layers (IterNorm, BatchWhitening,
# DecorrelatedBatchNorm, WhiteningColoring, BatchRenorm, GhostBatchNorm, SwitchableNorm, LpBatchNorm,
# MeanOnlyBatchNorm, BatchGroupNorm, BatchInstanceNorm, FilterResponseNorm, InstanceNorm)
__all__ = list(_layers.__all__)
globals().update({_name: getattr(_layers, _name) for _name in __all__})
BatchNormalization = _layers.BatchNormalization
LayerNormalization = _layers.LayerNormalization
GroupNormalization = _layers.GroupNormalization
RMSNormalization = _layers.RMSNormalization
StatefulNorm = _layers.StatefulNorm
adapter = _layers.adapter
