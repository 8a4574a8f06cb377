"""Reducers for synchronized batch statistics, one per distributed engine.

- :class:`normref.backends.distributed.torch.TorchReducer` (``torch.distributed``, any backend);
- :class:`normref.backends.distributed.jax.JaxReducer` (``lax.psum`` / ``lax.all_gather`` under
  ``shard_map``, ``pmap`` or ``vmap(axis_name=...)``);
- :class:`normref.backends.distributed.mpi.MPIReducer` (mpi4py, optional).

Each implements :class:`normref.distributed.Reducer` (``all_reduce_sum``, ``all_gather``, counting
``values_sent``) and is hashable, so it can sit in a residual's static part (JAX static arguments).
Pass one as ``sync=`` to a method whose statistics run over the batch, e.g.
``normref.batch_norm(x, rm, rv, w, b, training=True, sync=TorchReducer())``. The engines are
imported lazily: importing this package imports none of them.
"""

from __future__ import annotations

__all__ = ["TorchReducer", "JaxReducer", "MPIReducer"]


def __getattr__(name):
    if name == "TorchReducer":
        from .torch import TorchReducer

        return TorchReducer
    if name == "JaxReducer":
        from .jax import JaxReducer

        return JaxReducer
    if name == "MPIReducer":
        from .mpi import MPIReducer

        return MPIReducer
    raise AttributeError(name)
