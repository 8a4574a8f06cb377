"""The moments kernels (μ, σ² or mean(x²) alone, for callers that need only the statistics), on the
canonical 5-D layout (K1, R1, K2, R2, R3) of :mod:`._layout`; the fused normalization passes are in
:mod:`._fused`.

Statistics are indexed (k1, k2) and reduced over (r1, r2, r3). Two loop orders:

- *rows* (R2·R3 > 1, the innermost axis is reduced): one task per statistic (``prange`` over
  K1·K2); a statistic's elements are read with the innermost axis contiguous.
- *columns* (R2 = R3 = 1, the innermost axis is kept: channels-last batch/instance, position over
  NCHW): one task per chunk of R1 (per k1), vectorized over k2, partial sums per chunk combined at
  the end.
- *split* (R2·R3 > 1 and fewer than 2·threads statistics: layer norm of one sample, batch norm of
  one channel): one task per (statistic, range of its flattened reduce index), partial sums added.

Accumulation is in float64 whatever the input dtype. Moments use *shifted* sums: with s = the first
element of each statistic's group, S1 = Σ(x − s), S2 = Σ(x − s)², mean = s + S1/n,
var = S2/n − (S1/n)². Because s lies within a few σ of μ, the cancellation in the last subtraction
loses only about log10(((μ − s)/σ)²) digits of float64 — float32 inputs with |μ|/σ = 1e4 keep a
variance relative error near 1e-12, and one pass over x suffices.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import pair


def _chunks(r1: int, k1: int, threads: int) -> int:
    """How many chunks of R1 each k1 is split into for the column loop order."""
    if k1 >= 2 * threads:
        return 1
    return max(1, min(r1, (4 * threads) // max(k1, 1)))


# --------------------------------------------------------------------------------------------------
# reductions


def moments_rows(x, shifted, s1, s2):
    """Per statistic: S1 = Σ(x − s), S2 = Σ(x − s)² (s = first element when ``shifted``, else 0)."""
    K1, R1, K2, R2, R3 = x.shape
    for t in prange(K1 * K2):
        k1 = t // K2
        k2 = t % K2
        sh = np.float64(x[k1, 0, k2, 0, 0]) if shifted else 0.0
        a1 = 0.0
        a2 = 0.0
        for r1 in range(R1):
            for r2 in range(R2):
                for r3 in range(R3):
                    d = np.float64(x[k1, r1, k2, r2, r3]) - sh
                    a1 += d
                    a2 += d * d
        s1[k1, k2] = a1
        s2[k1, k2] = a2


def moments_cols(x, shifted, nchunk, s1, s2):
    """Column order (R2 = R3 = 1): partial sums per chunk of R1, vectorized over k2."""
    K1, R1, K2, R2, R3 = x.shape
    p1 = np.zeros((K1, nchunk, K2))
    p2 = np.zeros((K1, nchunk, K2))
    step = (R1 + nchunk - 1) // nchunk
    for t in prange(K1 * nchunk):
        k1 = t // nchunk
        c = t % nchunk
        sh = np.zeros(K2)
        if shifted:
            for k2 in range(K2):
                sh[k2] = x[k1, 0, k2, 0, 0]
        a1 = np.zeros(K2)
        a2 = np.zeros(K2)
        for r1 in range(c * step, min(R1, (c + 1) * step)):
            xr = x[k1, r1, :, 0, 0]
            for k2 in range(K2):
                d = np.float64(xr[k2]) - sh[k2]
                a1[k2] += d
                a2[k2] += d * d
        p1[k1, c, :] = a1
        p2[k1, c, :] = a2
    for k1 in range(K1):
        for k2 in range(K2):
            b1 = 0.0
            b2 = 0.0
            for c in range(nchunk):
                b1 += p1[k1, c, k2]
                b2 += p2[k1, c, k2]
            s1[k1, k2] = b1
            s2[k1, k2] = b2


def moments_split(x, shifted, nchunk, s1, s2):
    """Few statistics (K1·K2 < 2·threads) with a reduced innermost axis (R2·R3 > 1): each statistic's
    n = R1·R2·R3 elements are split into ``nchunk`` contiguous ranges of the flattened (r1, r2, r3)
    index, one task per (statistic, range), so that a single statistic (layer norm of one sample,
    batch norm of one channel) still runs on every thread.

    These layouts used to go to :func:`moments_cols`, which assumes R2 = R3 = 1 and read only
    the first element of each run (mean = first element, variance 0). Every range uses the same
    shift s (the statistic's first element), so its partial sums Σ(x − s), Σ(x − s)² are float64
    sums of the same shifted terms and add exactly like one long sum: the combination is as stable as
    :func:`moments_rows` (the shift bounds the cancellation, see the module docstring)."""
    K1, R1, K2, R2, R3 = x.shape
    K = K1 * K2
    n = R1 * R2 * R3
    p1 = np.zeros((K, nchunk))
    p2 = np.zeros((K, nchunk))
    step = (n + nchunk - 1) // nchunk
    for t in prange(K * nchunk):
        k = t // nchunk
        c = t % nchunk
        k1 = k // K2
        k2 = k % K2
        sh = np.float64(x[k1, 0, k2, 0, 0]) if shifted else 0.0
        a1 = 0.0
        a2 = 0.0
        i = c * step
        hi = min(n, (c + 1) * step)
        while i < hi:
            # the run of r3 from flat index i to the end of its row or of the range
            row = i // R3
            r3 = i - row * R3
            r1 = row // R2
            r2 = row - r1 * R2
            m = min(hi - i, R3 - r3)
            xr = x[k1, r1, k2, r2, r3:r3 + m]
            for j in range(m):
                d = np.float64(xr[j]) - sh
                a1 += d
                a2 += d * d
            i += m
        p1[k, c] = a1
        p2[k, c] = a2
    for k in range(K):
        b1 = 0.0
        b2 = 0.0
        for c in range(nchunk):
            b1 += p1[k, c]
            b2 += p2[k, c]
        s1[k // K2, k % K2] = b1
        s2[k // K2, k % K2] = b2


# (parallel, serial) builds of each kernel
KERNELS = {f.__name__: pair(f) for f in (moments_rows, moments_cols, moments_split)}
