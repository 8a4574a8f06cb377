"""Population statistics of a whole dataset: the inference statistics of batch normalization and batch
whitening, estimated after training (survey §5.3.2, "Robust Inference Methods for BN").

Training keeps running averages of the mini-batch statistics (survey Eqn 18), which lag behind the
weights as they change. The original BN paper (Ioffe & Szegedy, ICML 2015, Algorithm 2) recommends
estimating the population statistics once training has finished, over the training set, with the
network frozen; for whitening, Huang et al. (CVPR 2018) estimate the population covariance the same
way. :func:`population_statistics` computes them for one layer's activations over a dataset held as one
array — a ``dask.array`` when it does not fit in memory: the call then only builds the graph, and
``dask.compute`` evaluates it chunk by chunk —, in the shapes the inference calls take::

    st = normref.population_statistics(acts, group_size=4)         # acts: (N, C, *spatial)
    y = normref.batch_norm(x, st.mean, st.var, training=False)
    y = normref.batch_whitening(x, st.mean, st.cov, training=False, group_size=4)

Written against the array API only: NumPy, PyTorch, JAX, CuPy, dask, array-api-strict.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._validate import check_int, check_ndim
from ._results import result_tuple
from ._xp import Array, compute_dtype, is_array, library_name, namespace, to_compute

__all__ = ["population_statistics", "PopulationStatistics"]


@result_tuple
class PopulationStatistics(NamedTuple):
    """The population statistics of :func:`population_statistics`: ``(mean, var, cov, count)``.

    A ``NamedTuple`` ``(mean, var, cov, count)``, not an array: read the fields (arithmetic on the
    tuple or an array attribute raises an error that says so).

    Attributes
    ----------
    mean : Array
        The mean, (C,).
    var : Array
        The unbiased variance, (C,).
    cov : Array or None
        The unbiased covariance, (C/group_size, group_size, group_size), or ``None`` without
        ``group_size``.
    count : int
        The samples per channel (N·∏spatial, a Python int).
    """

    mean: Array
    var: Array
    cov: Array | None
    count: int  # type: ignore[assignment]  # a field named like tuple.count (the method is shadowed)


def population_statistics(input: Array, *, group_size: int | None = None, batch_size: int | None = None
                          ) -> PopulationStatistics:
    """Per-channel population mean, unbiased variance and (optionally) covariance over a whole dataset.

    The batch partition's statistics over all N samples at once: the mean, the unbiased variance and
    (with ``group_size``) the unbiased covariance of each group of ``group_size`` consecutive channels.

    ``batch_size=None`` (default): the statistics of the whole set, M = N·∏spatial values per channel:
    μ = (1/M)·Σ x,  σ² = Σ (x − μ)²/(M − 1),  Σ_g = Σ (x_g − μ_g)(x_g − μ_g)ᵀ/(M − 1)
    (two passes: the mean, then the centred sums — no raw Σx², stable in float32 too).

    ``input`` may also be an iterable of batches ``(N_i, C, *spatial)`` of one library — e.g. a frozen
    network's activations batch by batch, for a dataset that never exists as one array: the same
    statistics, exact, in one pass. Each batch gives its (n_i, μ_i, M2_i) (two-pass within the batch)
    and they are pooled by Chan et al.'s update (n = n_a + n_b, δ = μ_b − μ_a, μ = μ_a + δ·n_b/n,
    M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n: :func:`normref.distributed.combine_moments`), so uneven batch
    sizes are fine and no raw Σx² is ever formed.

    ``batch_size=m``: Algorithm 2 of the BN paper — the set split into N/m consecutive mini-batches of m
    samples (m must divide N), E[x] = mean over batches of μ_B and Var[x] = m'/(m' − 1)·mean over
    batches of σ²_B (m' = m·∏spatial; the covariance likewise): the average of the statistics the
    network normalized with in training, which is what torch's cumulative running statistics
    (``momentum=None``) hold after one pass over the same batches. torch has no function for it;
    this follows the paper.

    Parameters
    ----------
    input : array or iterable of array
        The dataset, ``(N, C, *spatial)``, or an iterable of batches ``(N_i, C, *spatial)`` of one
        library.
    group_size : int or None, default None
        Channels per covariance group; ``None``: no covariance.
    batch_size : int or None, default None
        m, for Algorithm 2 of the BN paper (divides N); ``None``: the whole set.

    Returns
    -------
    stats : PopulationStatistics
        ``(mean, var, cov, count)`` in the compute dtype (float32 for float16/bfloat16 input, as
        running statistics are kept), ready for ``batch_norm(x, st.mean, st.var, training=False)`` and
        ``batch_whitening(x, st.mean, st.cov, training=False, group_size=...)`` (also
        ``decorrelated_batch_norm``, ``iter_norm``). On a dask array nothing is computed: the fields are
        dask arrays of the graph (``dask.compute(st.mean, st.var, st.cov)`` evaluates them together).

    Notes
    -----
    Survey §5.3.2 (estimating population statistics after training) and §4 Eqn 16 (whitening by
    population statistics).

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015 (Algorithm 2).
    .. [2] L. Huang, D. Yang, B. Lang and J. Deng, "Decorrelated Batch Normalization", CVPR 2018.
    .. [3] T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating Formulae and a Pairwise Algorithm for
       Computing Sample Variances", Stanford CS report STAN-CS-79-773, 1979.
    """
    fn = "population_statistics"
    if not is_array(input) and not isinstance(input, (str, bytes)) and hasattr(input, "__iter__"):
        return _stream(fn, input, group_size, batch_size)
    xp = namespace(fn, input=input)
    check_ndim(fn, "input", input, min_ndim=2, what="(N, C, *spatial)")
    n, c = int(input.shape[0]), int(input.shape[1])
    spatial = math.prod(int(s) for s in input.shape[2:])
    gs = None
    if group_size is not None:
        gs = check_int(fn, "group_size", group_size)
        if c % gs:
            raise ValueError(f"{fn}: group_size must divide the {c} channels; got group_size={gs}")
    if batch_size is None:
        k, m = 1, n
    else:
        m = check_int(fn, "batch_size", batch_size)
        if n % m:
            raise ValueError(f"{fn}: batch_size must divide the {n} samples of input (consecutive mini-batches "
                             f"of equal size); got batch_size={m}")
        k = n // m
    per = m * spatial  # values per channel in one (mini-)batch
    if per < 2:
        raise ValueError(f"{fn}: an unbiased variance needs at least 2 values per channel"
                         f"{' per mini-batch' if batch_size is not None else ''}; got {per} "
                         f"(input shape {tuple(input.shape)}{'' if batch_size is None else f', batch_size={m}'})")
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    # (k, C, m·∏spatial): batch b's values of channel j in row [b, j]
    x = xp.reshape(xp.permute_dims(xp.reshape(x, (k, m, c, spatial)), (0, 2, 1, 3)), (k, c, per))
    mu = xp.mean(x, axis=2, keepdims=True)          # μ_B per batch and channel
    xc = x - mu
    unbias = per / (per - 1)
    var = xp.mean(xp.mean(xc * xc, axis=2), axis=0) * unbias   # mean over batches of σ²_B, unbiased
    mean = xp.mean(mu[..., 0], axis=0)
    cov = None
    if gs is not None:
        xg = xp.reshape(xc, (k, c // gs, gs, per))
        cov = xp.mean(xp.matmul(xg, xp.permute_dims(xg, (0, 1, 3, 2))), axis=0) * (1.0 / (per - 1))
    return PopulationStatistics(mean, var, cov, n * spatial)


def _stream(fn: str, batches: Any, group_size: int | None, batch_size: int | None) -> PopulationStatistics:
    """The exact statistics of a stream of batches: each batch's (n, μ, M2) pooled by Chan's update."""
    from .distributed import combine_moments

    if batch_size is not None:
        raise ValueError(f"{fn}: batch_size applies to one array; the batches of an iterable are its own "
                         f"mini-batches (for Algorithm 2's average over them, run batch_norm(..., training=True, "
                         f"momentum=None) over the batches); got batch_size={batch_size!r}")
    acc = None  # (n, μ (C,), M2 (C,), M2 of the groups (G, gs, gs) or None), in the first batch's library
    first = None
    for i, xb in enumerate(batches):
        name = f"input[{i}]"
        if not is_array(xb):
            raise TypeError(f"{fn}: {name} must be an array (a batch (N_i, C, *spatial)); got {type(xb).__name__}")
        if first is not None and library_name(xb) != library_name(first):
            raise TypeError(f"{fn}: all batches must come from one library; input[0] is a {library_name(first)} "
                            f"array but {name} is a {library_name(xb)} array")
        xp = namespace(fn, **{name: xb})
        check_ndim(fn, name, xb, min_ndim=2, what="(N_i, C, *spatial)")
        if first is not None and tuple(xb.shape[1:]) != tuple(first.shape[1:]):
            raise ValueError(f"{fn}: every batch must have the shape (N_i, C, *spatial) of input[0], "
                             f"(N_0, {', '.join(str(int(d)) for d in first.shape[1:])}); {name} has shape "
                             f"{tuple(xb.shape)}")
        if first is None:
            first = xb
        n = int(xb.shape[0]) * math.prod(int(d) for d in xb.shape[2:])
        if n == 0:
            continue
        st = population_statistics(xb, group_size=group_size) if n >= 2 else None
        x = to_compute(xp, xb, compute_dtype(xp, xb.dtype))
        c = int(xb.shape[1])
        if st is None:  # one value per channel: μ = it, M2 = 0
            mu = xp.reshape(x, (c,))
            m2 = xp.zeros_like(mu)
            m2g = None if group_size is None else xp.zeros((c // group_size, group_size, group_size), dtype=mu.dtype)
        else:
            mu, m2 = st.mean, st.var * (n - 1)
            m2g = None if st.cov is None else st.cov * (n - 1)
        if acc is None:
            acc = (n, mu, m2, m2g)
            continue
        na, mua, m2a, m2ga = acc
        w = xp.asarray([float(na), float(n)], dtype=mu.dtype)
        N, mean, M2 = combine_moments(xp, w, xp.stack([mua, mu]), xp.stack([m2a, m2]))
        if m2g is not None:
            assert group_size is not None  # m2g exists only with a group_size (for the type checker)
            g = c // group_size
            mug = xp.stack([xp.reshape(mua, (g, group_size)), xp.reshape(mu, (g, group_size))])
            _, _, M2g = combine_moments(xp, w, mug, xp.stack([m2ga, m2g]))
        else:
            M2g = None
        acc = (na + n, mean, M2, M2g)
    if first is None:
        raise ValueError(f"{fn}: input is an empty iterable; expected at least one batch")
    if acc is None or acc[0] < 2:
        raise ValueError(f"{fn}: an unbiased variance needs at least 2 values per channel; the batches hold "
                         f"{0 if acc is None else acc[0]}")
    n, mean, m2, m2g = acc
    return PopulationStatistics(mean, m2 / (n - 1), None if m2g is None else m2g / (n - 1), n)
