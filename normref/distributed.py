"""Statistics across ranks: the reducer protocol and the stable combination of per-rank moments.

A batch statistic is a sum over the partition's reduced axes (survey §5.1, Algorithm 1, line 4).
When the batch axis is split across ranks (data-parallel training), the sum gains a cross-rank part,
and synchronizing a method means one collective on the per-rank partial results. normref keeps the
math here, once, and an adapter only provides a *reducer* for its engine:

- ``normref.backends.distributed.torch.TorchReducer(process_group)`` (torch.distributed, any backend);
- ``normref.backends.distributed.jax.JaxReducer(axis_name)`` (``lax.psum`` / ``lax.all_gather``
  under ``shard_map``, ``pmap`` or ``vmap(axis_name=...)``);
- ``normref.backends.distributed.mpi.MPIReducer(comm)`` (mpi4py).

A reducer works on the caller's array library and has two collectives:

- ``all_reduce_sum(a)``: the elementwise sum of ``a`` over all ranks, on every rank (the backward's
  Σg and Σg·x̂, the whitening backward's d×d sums);
- ``all_gather(a)``: the ranks' ``a`` stacked along a new leading axis of length ``world_size``, in
  rank order, on every rank (the forward's per-rank (count, mean, M2), combined below).

Moments are combined as in Chan, Golub & LeVeque (1979): per rank i the count n_i, the mean μ_i and
the centred sum of squares M2_i = Σ(x − μ_i)²; then

    N = Σ n_i,    μ = Σ n_i·μ_i / N,    M2 = Σ M2_i + Σ n_i·(μ_i − μ)²,

the exact pooled form, so no rank ever forms a raw Σx² (which loses every digit in float32 when
|μ| ≫ σ). A rank with n_i = 0 contributes nothing (its μ_i, M2_i are taken as 0). The gather makes
every rank combine the same numbers in the same order, so every rank gets bitwise the same
statistics (and the same running statistics).

Counting: each reducer adds the number of array elements it contributes to ``values_sent`` and
their size in bytes (elements × itemsize of the dtype they travel in) to ``bytes_sent`` (per call,
the size of ``a``), so tests and benchmarks can check that a synchronized step costs the minimum: a
batch-norm layer's forward gathers 2C + 1 values per rank, its backward sums 2C. For a float32
input the forward's moments travel in float64 where the library has it (see
``operation.synced_moments``), so a float32 BN step sends (2C + 1)·8 + 2C·4 bytes.

The mechanism (written once, in :mod:`normref.operation`): an operation carries the reducer as a
field (``Standardizing(eps, sync)``, ``Centering(sync=...)``, ``LpStandardizing(..., sync=...)``,
``BatchRenormalizing(..., sync=...)``), hence in the residuals' static part, so the backward uses the
forward's reducer. ``operation.synced_moments`` computes each rank's (n_i, μ_i, M2_i) (the
``moments`` kernel where registered; a rank with no samples sends zeros), gathers them once and
combines them with :func:`combine_moments`; for float32 inputs the per-rank moments are corrected
(two-pass residual mean) and travel in float64 where the library has it. ``operation.synced_sums``
all-reduces the backward's packed per-statistic sums once. The synchronized operations keep the
global count N as their last residual. Communication per step (C statistics):

===========================================  ==========================  =======================
method (``sync=``)                           forward                     backward
===========================================  ==========================  =======================
batch_norm, batch_renorm, BN branch of        gather 2C + 1               all-reduce 2C
switchable_norm / batch_instance_norm,
normalize(standardizing), batch_group_norm
(C → Gb·G statistics)
mean_only_batch_norm, normalize(centering)    gather C + 1                all-reduce C
lp_batch_norm p = 2                           gather 2C + 1               all-reduce 2C
lp_batch_norm p ≠ 2, ∞                        gather C + 1, all-reduce C  all-reduce 3C
lp_batch_norm p = ∞                           gather C + 1, gather C      all-reduce 4C
ghost_batch_norm (running statistics only)    gather 1, gather 2C·max k   none
===========================================  ==========================  =======================
"""

from __future__ import annotations

from typing import Any

__all__ = ["Reducer", "combine_moments", "check_reducer"]


class Reducer:
    """Base class of the cross-rank collectives (subclass it in an adapter; see the module docstring).

    Subclasses implement :meth:`_all_reduce_sum` and :meth:`_all_gather`; the public methods count
    the values sent.

    Attributes
    ----------
    world_size : int or None
        The number of ranks taking part (may be a traced value under JAX).
    values_sent : int
        Values sent so far (the sum of the sizes given to the collectives).
    bytes_sent : int
        Bytes sent so far.
    calls : int
        Collective calls so far.

    Notes
    -----
    Survey §5.1.1 (batch statistics over the whole mini-batch, here spread over ranks).
    """

    #: number of ranks taking part (may be a traced value under JAX)
    world_size: Any = None

    def __init__(self) -> None:
        self.values_sent = 0
        self.bytes_sent = 0
        self.calls = 0

    def all_reduce_sum(self, a: Any) -> Any:
        """Σ over ranks of ``a`` (same shape), on every rank.

        Parameters
        ----------
        a : array
            This rank's values.

        Returns
        -------
        out : array
            The sum over ranks, a's shape.
        """
        self.values_sent += _size(a)
        self.bytes_sent += _size(a) * _itemsize(a)
        self.calls += 1
        return self._all_reduce_sum(a)

    def all_gather(self, a: Any) -> Any:
        """Every rank's ``a`` stacked along a new leading axis (rank order), on every rank.

        Parameters
        ----------
        a : array
            This rank's values.

        Returns
        -------
        out : array, shape ``(W, *a.shape)``
            Every rank's ``a``, in rank order.
        """
        self.values_sent += _size(a)
        self.bytes_sent += _size(a) * _itemsize(a)
        self.calls += 1
        return self._all_gather(a)

    def _all_reduce_sum(self, a: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _all_gather(self, a: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _size(a: Any) -> int:
    n = 1
    for d in a.shape:
        n *= int(d)
    return n


def _itemsize(a: Any) -> int:
    dt = a.dtype
    size = getattr(dt, "itemsize", None)  # NumPy, JAX, CuPy, dask
    if size is None:
        size = a.element_size()  # torch
    return int(size)


def check_reducer(fn: str, sync: Any) -> Any:
    """``sync`` is ``None`` (local statistics) or a :class:`Reducer`-like object; else ``TypeError``.

    Parameters
    ----------
    fn : str
        The public function's name, for the error message.
    sync : Reducer or None
        The argument to check.

    Returns
    -------
    sync : Reducer or None
        ``sync``, accepted.

    Raises
    ------
    TypeError
        When ``sync`` is neither ``None`` nor reducer-like.
    """
    if sync is None:
        return None
    if not (callable(getattr(sync, "all_reduce_sum", None)) and callable(getattr(sync, "all_gather", None))):
        raise TypeError(
            f"{fn}: sync must be None or a reducer with all_reduce_sum and all_gather methods "
            f"(normref.distributed.Reducer; e.g. normref.backends.distributed.torch.TorchReducer); "
            f"got {type(sync).__name__}"
        )
    return sync


def combine_moments(xp: Any, n: Any, mean: Any, m2: Any) -> tuple[Any, Any, Any]:
    """Chan's pooled (N, μ, M2) from gathered per-rank values.

    N = Σ n_i, μ = Σ n_i·μ_i/N, M2 = Σ M2_i + Σ n_i(μ_i − μ)(μ_i − μ)ᵀ; ranks with n_i = 0 count for
    nothing.

    Parameters
    ----------
    xp : module
        The array namespace.
    n : array, shape ``(W,)``
        The per-rank counts.
    mean : array, shape ``(W, *S)``
        The per-rank means (``(W, *S, d)`` for a covariance).
    m2 : array, shape ``(W, *S)``
        The per-rank centred sums of squares (or ``(W, *S, d, d)`` centred cross-products for a
        covariance).

    Returns
    -------
    N : array, shape ``()``
        The total count.
    mu : array, shape ``S``
        The pooled mean (``(*S, d)`` for a covariance).
    M2 : array, shape ``S``
        The pooled centred sums (or ``(*S, d, d)``).

    Notes
    -----
    Survey §5.1.1 (batch statistics; synchronized across ranks).

    References
    ----------
    .. [1] T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating Formulae and a Pairwise Algorithm for
       Computing Sample Variances", Stanford CS report STAN-CS-79-773, 1979.
    """
    N = xp.sum(n)
    safe = xp.where(N > 0, N, xp.ones_like(N))
    w = xp.reshape(n, (n.shape[0],) + (1,) * (mean.ndim - 1))
    mu = xp.sum(w * mean, axis=0) / safe
    dev = mean - mu  # (W, *S[, d])
    if m2.ndim == mean.ndim:  # variances
        return N, mu, xp.sum(m2, axis=0) + xp.sum(w * dev * dev, axis=0)
    # covariances: Σ M2_i + Σ n_i (μ_i − μ)(μ_i − μ)ᵀ
    wc = xp.reshape(n, (n.shape[0],) + (1,) * (m2.ndim - 1))
    outer = dev[..., :, None] * dev[..., None, :]
    return N, mu, xp.sum(m2, axis=0) + xp.sum(wc * outer, axis=0)
