"""``MPIReducer``: normref's cross-rank collectives over an mpi4py communicator (NumPy arrays).

``all_reduce_sum`` is ``comm.Allreduce(MPI.SUM)`` and ``all_gather`` is ``comm.Allgather`` into a
(world_size, *a.shape) buffer, on contiguous NumPy arrays (inputs are not modified). mpi4py is
optional: importing this module does not import it; the first collective does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from normref.distributed import Reducer

__all__ = ["MPIReducer"]


class MPIReducer(Reducer):
    """Reducer over ``comm`` (``None``: ``MPI.COMM_WORLD``); hashes by the communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None, default None
        The communicator; ``None``: ``MPI.COMM_WORLD`` (mpi4py is imported at the first collective).

    Notes
    -----
    Survey §5.1.1 (batch statistics over the whole mini-batch, here spread over processes).
    """

    def __init__(self, comm: Any = None) -> None:
        super().__init__()
        self.comm = comm

    def _comm(self):
        if self.comm is not None:
            return self.comm
        from mpi4py import MPI

        return MPI.COMM_WORLD

    def __eq__(self, other):
        return isinstance(other, MPIReducer) and (self.comm is other.comm)

    def __hash__(self):
        return hash(("mpi", id(self.comm) if self.comm is not None else None))

    def __repr__(self):
        return f"MPIReducer(comm={self.comm!r})"

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return self._comm().Get_size()

    def _all_reduce_sum(self, a):
        from mpi4py import MPI

        src = np.ascontiguousarray(a)
        out = np.empty_like(src)
        self._comm().Allreduce(src, out, op=MPI.SUM)
        return out

    def _all_gather(self, a):
        comm = self._comm()
        src = np.ascontiguousarray(a)
        out = np.empty((comm.Get_size(),) + src.shape, src.dtype)
        comm.Allgather(src, out)
        return out
