"""``JaxReducer``: normref's cross-rank collectives as JAX collectives over a named axis.

``all_reduce_sum`` is ``lax.psum`` and ``all_gather`` is ``lax.all_gather`` (stacked along a new
axis 0) over ``axis_name``, so a synchronized normref call works inside ``shard_map``, ``pmap`` and
``vmap(..., axis_name=...)`` alike. ``values_sent`` counts at trace time (once per trace, not per
executed step).
"""

from __future__ import annotations

from typing import Any, Hashable

from normref.distributed import Reducer

__all__ = ["JaxReducer"]


class JaxReducer(Reducer):
    """Reducer over the mapped axis ``axis_name`` (a name or a tuple of names); hashes by it."""

    def __init__(self, axis_name: Hashable) -> None:
        super().__init__()
        hash(axis_name)  # a static argument: it must be hashable
        self.axis_name = axis_name

    def __eq__(self, other):
        return isinstance(other, JaxReducer) and self.axis_name == other.axis_name

    def __hash__(self):
        return hash(("jax", self.axis_name))

    def __repr__(self):
        return f"JaxReducer(axis_name={self.axis_name!r})"

    @property
    def world_size(self) -> Any:  # type: ignore[override]
        from jax import lax

        return lax.psum(1, self.axis_name)

    def _all_reduce_sum(self, a):
        from jax import lax

        return lax.psum(a, self.axis_name)

    def _all_gather(self, a):
        from jax import lax

        return lax.all_gather(a, self.axis_name, axis=0)
