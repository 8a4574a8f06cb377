"""The numba kernels, on the canonical 5-D layout (K1, R1, K2, R2, R3) of :mod:`._layout`.

Statistics are indexed (k1, k2) and reduced over (r1, r2, r3). Two loop orders:

- *rows* (R2·R3 > 1, the innermost axis is reduced): one task per statistic (``prange`` over
  K1·K2); a statistic's elements are read with the innermost axis contiguous.
- *columns* (R2 = R3 = 1, the innermost axis is kept: channels-last batch/instance, position over
  NCHW): one task per chunk of R1 (per k1), vectorized over k2, partial sums per chunk combined at
  the end.

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


def dot_rows(u, v, w, has_w, s1, s2):
    """Per statistic: S1 = Σ w·u, S2 = Σ w·u·v (w = 1 when not ``has_w``)."""
    K1, R1, K2, R2, R3 = u.shape
    for t in prange(K1 * K2):
        k1 = t // K2
        k2 = t % K2
        a1 = 0.0
        a2 = 0.0
        for r1 in range(R1):
            for r2 in range(R2):
                if has_w:
                    for r3 in range(R3):
                        g = np.float64(u[k1, r1, k2, r2, r3]) * np.float64(w[k1, r1, k2, r2, r3])
                        a1 += g
                        a2 += g * np.float64(v[k1, r1, k2, r2, r3])
                else:
                    for r3 in range(R3):
                        g = np.float64(u[k1, r1, k2, r2, r3])
                        a1 += g
                        a2 += g * np.float64(v[k1, r1, k2, r2, r3])
        s1[k1, k2] = a1
        s2[k1, k2] = a2


def dot_cols(u, v, w, has_w, nchunk, s1, s2):
    K1, R1, K2, R2, R3 = u.shape
    p1 = np.zeros((K1, nchunk, K2))
    p2 = np.zeros((K1, nchunk, K2))
    step = (R1 + nchunk - 1) // nchunk
    for t in prange(K1 * nchunk):
        k1 = t // nchunk
        c = t % nchunk
        a1 = np.zeros(K2)
        a2 = np.zeros(K2)
        for r1 in range(c * step, min(R1, (c + 1) * step)):
            # 1-D rows: the k2 loop then runs over plain strided vectors (vectorizes at unit stride)
            ur = u[k1, r1, :, 0, 0]
            vr = v[k1, r1, :, 0, 0]
            if has_w:
                wr = w[k1, r1, :, 0, 0]
                for k2 in range(K2):
                    g = np.float64(ur[k2]) * np.float64(wr[k2])
                    a1[k2] += g
                    a2[k2] += g * np.float64(vr[k2])
            else:
                for k2 in range(K2):
                    g = np.float64(ur[k2])
                    a1[k2] += g
                    a2[k2] += g * np.float64(vr[k2])
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


# --------------------------------------------------------------------------------------------------
# elementwise passes


def normalize_affine(x, shift, scale, g, has_g, b, has_b, xhat, y, write_y):
    """x̂ = (x − shift)·scale (shift, scale per statistic, in x's dtype; shift = 0 for scaling),
    y = γ·x̂ + β (written when ``write_y``)."""
    K1, R1, K2, R2, R3 = x.shape
    if R2 * R3 == 1:
        for t in prange(K1 * R1):
            k1 = t // R1
            r1 = t % R1
            for k2 in range(K2):
                m = shift[k1, k2]
                h = (x[k1, r1, k2, 0, 0] - m) * scale[k1, k2]
                xhat[k1, r1, k2, 0, 0] = h
                if write_y:
                    if has_g:
                        h = h * g[k1, r1, k2, 0, 0]
                    if has_b:
                        h = h + b[k1, r1, k2, 0, 0]
                    y[k1, r1, k2, 0, 0] = h
    else:
        for t in prange(K1 * R1 * K2):
            k2 = t % K2
            k1 = t // (R1 * K2)
            r1 = (t // K2) % R1
            m = shift[k1, k2]
            s = scale[k1, k2]
            for r2 in range(R2):
                if write_y and has_g and has_b:
                    for r3 in range(R3):
                        h = (x[k1, r1, k2, r2, r3] - m) * s
                        xhat[k1, r1, k2, r2, r3] = h
                        y[k1, r1, k2, r2, r3] = h * g[k1, r1, k2, r2, r3] + b[k1, r1, k2, r2, r3]
                elif write_y:
                    for r3 in range(R3):
                        h = (x[k1, r1, k2, r2, r3] - m) * s
                        xhat[k1, r1, k2, r2, r3] = h
                        if has_g:
                            h = h * g[k1, r1, k2, r2, r3]
                        if has_b:
                            h = h + b[k1, r1, k2, r2, r3]
                        y[k1, r1, k2, r2, r3] = h
                else:
                    for r3 in range(R3):
                        xhat[k1, r1, k2, r2, r3] = (x[k1, r1, k2, r2, r3] - m) * s


def backward_apply(xhat, dy, g, has_g, scale, m1, m2, dx):
    """dx = scale·(γ·dy − m1 − x̂·m2) (standardizing; m1 = mean(γ·dy), m2 = mean(γ·dy·x̂));
    m1 = 0 for scaling (RMS)."""
    K1, R1, K2, R2, R3 = xhat.shape
    if R2 * R3 == 1:
        for t in prange(K1 * R1):
            k1 = t // R1
            r1 = t % R1
            for k2 in range(K2):
                d = dy[k1, r1, k2, 0, 0]
                if has_g:
                    d = d * g[k1, r1, k2, 0, 0]
                d = d - m1[k1, k2]
                dx[k1, r1, k2, 0, 0] = scale[k1, k2] * (d - xhat[k1, r1, k2, 0, 0] * m2[k1, k2])
    else:
        for t in prange(K1 * R1 * K2):
            k2 = t % K2
            k1 = t // (R1 * K2)
            r1 = (t // K2) % R1
            s = scale[k1, k2]
            a = m1[k1, k2]
            c = m2[k1, k2]
            for r2 in range(R2):
                if has_g:
                    for r3 in range(R3):
                        dx[k1, r1, k2, r2, r3] = s * (dy[k1, r1, k2, r2, r3] * g[k1, r1, k2, r2, r3] - a
                                                      - xhat[k1, r1, k2, r2, r3] * c)
                else:
                    for r3 in range(R3):
                        dx[k1, r1, k2, r2, r3] = s * (dy[k1, r1, k2, r2, r3] - a - xhat[k1, r1, k2, r2, r3] * c)


# --------------------------------------------------------------------------------------------------
# fused per-statistic passes (rows order): a statistic's elements are read twice in one task, the
# second time from cache, so memory sees one read of each input


def standardize_rows(x, mode, eps, shift_in, scale_in, g, has_g, b, has_b, xhat, y, write_y, st1, st2):
    """Per statistic: the statistics, then x̂ and y, in one task.

    mode 0 (standardizing): shifted float64 sums → st1 = μ, st2 = σ², scale = (σ² + ε)^-½;
    mode 1 (scaling): st2 = mean(x²), scale = (mean(x²) + ε)^-½, shift 0;
    mode 2 (given statistics): shift = shift_in, scale = scale_in (population statistics).
    Then x̂ = (x − shift)·scale, y = γ·x̂ + β (written when ``write_y``). scale_in receives the scale
    used (the residual of the backward) in modes 0 and 1.
    """
    K1, R1, K2, R2, R3 = x.shape
    n = R1 * R2 * R3
    for t in prange(K1 * K2):
        k1 = t // K2
        k2 = t % K2
        if mode == 2:
            m = shift_in[k1, k2]
            s = scale_in[k1, k2]
        else:
            sh = np.float64(x[k1, 0, k2, 0, 0]) if mode == 0 else 0.0
            a1 = 0.0
            a2 = 0.0
            for r1 in range(R1):
                for r2 in range(R2):
                    xr = x[k1, r1, k2, r2, :]
                    for r3 in range(R3):
                        d = np.float64(xr[r3]) - sh
                        a1 += d
                        a2 += d * d
            d1 = a1 / n
            v = max(a2 / n - d1 * d1, 0.0) if mode == 0 else a2 / n
            # st1, st2, scale_in have x's dtype: the stores round, and m, s are read back rounded
            st1[k1, k2] = sh + d1 if mode == 0 else 0.0
            st2[k1, k2] = v
            scale_in[k1, k2] = 1.0 / np.sqrt(np.float64(st2[k1, k2]) + eps)
            m = st1[k1, k2]
            s = scale_in[k1, k2]
        for r1 in range(R1):
            for r2 in range(R2):
                if write_y and has_g and has_b:
                    # 1-D rows: plain strided vectors, which LLVM versions for unit stride and vectorizes
                    xr = x[k1, r1, k2, r2, :]
                    hr = xhat[k1, r1, k2, r2, :]
                    yr = y[k1, r1, k2, r2, :]
                    gr = g[k1, r1, k2, r2, :]
                    br = b[k1, r1, k2, r2, :]
                    for r3 in range(R3):
                        h = (xr[r3] - m) * s
                        hr[r3] = h
                        yr[r3] = h * gr[r3] + br[r3]
                elif write_y:
                    for r3 in range(R3):
                        h = (x[k1, r1, k2, r2, r3] - m) * s
                        xhat[k1, r1, k2, r2, r3] = h
                        if has_g:
                            h = h * g[k1, r1, k2, r2, r3]
                        if has_b:
                            h = h + b[k1, r1, k2, r2, r3]
                        y[k1, r1, k2, r2, r3] = h
                else:
                    for r3 in range(R3):
                        xhat[k1, r1, k2, r2, r3] = (x[k1, r1, k2, r2, r3] - m) * s


def backward_rows(xhat, dy, g, has_g, scale, n, centered, dx, raw1, raw2, mm1, mm2):
    """Per statistic: S1 = Σγ·dy, S2 = Σγ·dy·x̂ (and the raw Σdy, Σdy·x̂ into raw1, raw2), then
    dx = scale·(γ·dy − S1/n − x̂·S2/n) (no S1 term unless ``centered``), in one task."""
    K1, R1, K2, R2, R3 = xhat.shape
    for t in prange(K1 * K2):
        k1 = t // K2
        k2 = t % K2
        a1 = 0.0
        a2 = 0.0
        c1 = 0.0
        c2 = 0.0
        for r1 in range(R1):
            for r2 in range(R2):
                dr = dy[k1, r1, k2, r2, :]
                hr = xhat[k1, r1, k2, r2, :]
                if has_g:
                    gr = g[k1, r1, k2, r2, :]
                    for r3 in range(R3):
                        u = np.float64(dr[r3])
                        v = np.float64(hr[r3])
                        c1 += u
                        c2 += u * v
                        u = u * np.float64(gr[r3])
                        a1 += u
                        a2 += u * v
                else:
                    for r3 in range(R3):
                        u = np.float64(dr[r3])
                        v = np.float64(hr[r3])
                        c1 += u
                        c2 += u * v
        if not has_g:
            a1 = c1
            a2 = c2
        raw1[k1, k2] = c1
        raw2[k1, k2] = c2
        s = scale[k1, k2]
        mm1[k1, k2] = a1 / n if centered else 0.0  # mm1, mm2 have x's dtype: m1, m2 are rounded to it
        mm2[k1, k2] = a2 / n
        m1 = mm1[k1, k2]
        m2 = mm2[k1, k2]
        for r1 in range(R1):
            for r2 in range(R2):
                dr = dy[k1, r1, k2, r2, :]
                hr = xhat[k1, r1, k2, r2, :]
                orow = dx[k1, r1, k2, r2, :]
                if has_g:
                    gr = g[k1, r1, k2, r2, :]
                    for r3 in range(R3):
                        orow[r3] = s * (dr[r3] * gr[r3] - m1 - hr[r3] * m2)
                else:
                    for r3 in range(R3):
                        orow[r3] = s * (dr[r3] - m1 - hr[r3] * m2)


# (parallel, serial) builds of each kernel
KERNELS = {f.__name__: pair(f) for f in (moments_rows, moments_cols, dot_rows, dot_cols, normalize_affine, backward_apply,
                                         standardize_rows, backward_rows)}
