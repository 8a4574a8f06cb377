"""Accelerations and framework adapters for normref, one sub-package per foreign world.

- ``normref.backends.numba``: numba CPU kernels for NumPy inputs (registered through the
  ``normref.kernels`` entry point, loaded lazily on the first NumPy call).
- ``normref.backends.torch``: ``torch.autograd.Function`` and ``nn.Module`` wrappers generated from
  the registry.
- ``normref.backends.jax``: ``jax.custom_vjp`` wrappers generated from the registry.

Nothing here is imported by ``import normref``.
"""
