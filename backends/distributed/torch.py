"""``TorchReducer``: normref's cross-rank collectives over ``torch.distributed`` (any backend).

Works on torch tensors and on NumPy arrays (wrapped with ``torch.from_numpy`` for the collective and
returned as NumPy), so a data-parallel NumPy program can synchronize through gloo too. The
collectives are the plain (non-differentiable) ``torch.distributed`` ones: normref's backward is
analytic and calls ``all_reduce_sum`` itself, so ``torch.distributed.nn`` is not needed. Inputs are
never modified (an all-reduce works on a copy).
"""

from __future__ import annotations

from typing import Any

from normref.distributed import Reducer

__all__ = ["TorchReducer"]


class TorchReducer(Reducer):
    """Reducer over ``process_group`` (``None``: the default group) of ``torch.distributed``.

    Hashes and compares by the group (two reducers on one group are interchangeable); ``values_sent``
    counts the elements this rank contributed. ``torch.distributed`` must be initialised before the
    first collective (construction does not need it).

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup or None, default None
        The group; ``None``: the default (world) group.

    Notes
    -----
    Survey §5.1.1 (batch statistics over the whole mini-batch, here spread over ranks, as torch's
    ``SyncBatchNorm``).
    """

    def __init__(self, process_group: Any = None) -> None:
        super().__init__()
        self.process_group = process_group

    # hashable by the group: the reducer sits in a residual's static part
    def _key(self):
        return ("torch", id(self.process_group) if self.process_group is not None else None)

    def __eq__(self, other):
        return isinstance(other, TorchReducer) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"TorchReducer(process_group={self.process_group!r})"

    @property
    def world_size(self) -> int:  # type: ignore[override]
        import torch.distributed as dist

        return dist.get_world_size(self.process_group)

    @staticmethod
    def _to_torch(a):
        import torch

        if isinstance(a, torch.Tensor):
            return a, False
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(a)), True

    def _all_reduce_sum(self, a):
        import torch.distributed as dist

        t, was_np = self._to_torch(a)
        t = t.detach().clone().contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t.numpy() if was_np else t

    def _all_gather(self, a):
        import torch
        import torch.distributed as dist

        t, was_np = self._to_torch(a)
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.process_group))]
        dist.all_gather(parts, t, group=self.process_group)
        out = torch.stack(parts, 0)
        return out.numpy() if was_np else out
