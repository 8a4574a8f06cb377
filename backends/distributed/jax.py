"""``JaxReducer``: normref's cross-rank collectives as JAX collectives over a named axis.

``all_reduce_sum`` is ``lax.psum`` and ``all_gather`` is ``lax.all_gather`` (stacked along a new
axis 0) over ``axis_name``, so a synchronized normref call works inside ``shard_map``, ``pmap`` and
``vmap(..., axis_name=...)`` alike.

Under ``shard_map(check_vma=True)`` JAX types ``lax.all_gather``'s result as *varying* over the axis
(every device may hold something different), so statistics computed from it — and the running
statistics returned — could not leave with ``out_specs=P()`` although every device holds the same
numbers. There the gather is written as a ``psum`` of the device's values placed in its own slot of
a zero (world, ...) array: the same stacked result, exactly (each slot is x + 0 + … + 0), typed
*invariant*, so the synchronized statistics and running statistics are replicated values as they
are in fact. ``values_sent`` counts at trace time (once per trace, not per
executed step).
"""

from __future__ import annotations

from typing import Any, Hashable

from normref.distributed import Reducer

__all__ = ["JaxReducer"]


class JaxReducer(Reducer):
    """Reducer over the mapped axis ``axis_name`` (a name or a tuple of names); hashes by it.

    Parameters
    ----------
    axis_name : hashable
        The mapped axis (``jax.pmap``/``shard_map``/``vmap`` axis name), or a tuple of names.

    Notes
    -----
    Survey §5.1.1 (batch statistics over the whole mini-batch, here spread over devices).
    """

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

        if _varies_over(a, self.axis_name):
            # shard_map(check_vma=True): an invariant-typed gather (see the module docstring)
            import jax.numpy as jnp

            w = lax.psum(1, self.axis_name)
            slot = jnp.zeros((w,) + tuple(a.shape), a.dtype).at[lax.axis_index(self.axis_name)].set(a)
            return lax.psum(slot, self.axis_name)
        return lax.all_gather(a, self.axis_name, axis=0)


def _varies_over(a: Any, axis_name: Hashable) -> bool:
    """Whether ``a`` is typed as varying over (any of) ``axis_name`` (shard_map with check_vma)."""
    import jax

    try:
        aval = jax.typeof(a)
    except Exception:
        return False
    mat = getattr(aval, "mat", None)
    vary = frozenset(mat.varying) if mat is not None and hasattr(mat, "varying") else frozenset(getattr(aval, "vma", ()))
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return any(n in vary for n in names)
