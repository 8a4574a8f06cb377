"""Fused forward and backward kernels of the standardization family on flat buffers.

The operands come as 1-D views of their memory (``flat``) plus five element strides over the
canonical 5-D layout (K1, R1, K2, R2, R3) of :mod:`._layout`; a statistic is indexed (k1, k2) and
reduced over (r1, r2, r3). The innermost loops run over contiguous 1-D slices
(``x[o:o + n]``): numba indexes those without negative-index wraparound checks, which is what lets
LLVM vectorize them (indexing ``x[o + i]`` directly runs about 8× slower). Each loop tests for unit
stride once per row and takes the contiguous branch; other strides take a scalar branch.

Forward (Algorithm 1, lines 4-5, with Ψ∘Φ fused): per statistic the shifted sums
S1 = Σ(x − s), S2 = Σ(x − s)² in float64 (s = the statistic's first element, so cancellation costs
only log10(((μ − s)/σ)²) digits), μ = s + S1/n, σ² = S2/n − (S1/n)², scale = (σ² + ε)^-½ (mode 0);
scale = (mean(x²) + ε)^-½, shift 0 (mode 1, RMS); given shift and scale (mode 2, population
statistics). Then y = (x − μ)·(scale·γ) + β. Nothing else full-size is written: the backward
recomputes x̂ = (x − μ)·scale from x.

Backward (the composition of the affine and the operation's backward, survey Eqn 21): with
u = ∂L/∂y and x̂ recomputed, the raw sums Σu and Σu·x̂ per parameter position give dβ and dγ, their
γ-weighted sums per statistic give m1 = mean(γ·u), m2 = mean(γ·u·x̂), and
dx = scale·(γ·u − m1 − x̂·m2) (mode 0), scale·(γ·u − x̂·m2) (mode 1), scale·γ·u (mode 2).

Two loop orders:
- *rows* (the innermost axis is reduced, R3 contiguous): statistics are split into chunks, one task
  per chunk; a statistic's elements are read for the sums and read again for the output, the second
  time from cache. Parameter-gradient partial sums are kept per chunk and added at the end.
- *cols* (the innermost block K2·R3 is kept and contiguous, R2 = 1: channels-last batch, instance and
  group norm, position norm over NCHW): partial sums per chunk of R1, vectorized over the inner
  block, then a streaming pass. When each k1 has enough work (K1 ≥ 2·threads) one task per k1 does both,
  so the second read hits the cache.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import pair


# --------------------------------------------------------------------------------------------------
# contiguous runs: sums in blocks of BLOCK terms in x's dtype (vector-wide), blocks combined in float64.
# A float32 block sum of k ≤ BLOCK terms carries a relative error ≤ (k − 1)·ε32 on Σ|terms| (≤ 8e-6
# for 128 terms, far less in practice since the vectorizer splits a block over 16-64 lanes); the
# float64 combination adds nothing measurable. Twice the throughput of float64 accumulation.

BLOCK = 128


def _run_moments(xr, shx):
    """(Σ(x − s), Σ(x − s)²) over a contiguous run, s = ``shx`` (x's dtype)."""
    a1 = 0.0
    a2 = 0.0
    for b0 in range(0, xr.size, BLOCK):
        xb = xr[b0:b0 + BLOCK]
        c1 = shx * 0
        c2 = shx * 0
        for i in range(xb.size):
            d = xb[i] - shx
            c1 += d
            c2 += d * d
        a1 += c1
        a2 += c2
    return a1, a2


def _run_dot(xr, ur, wr, has_w, m, s):
    """(Σw·u, Σw·u·x̂) over a contiguous run, x̂ = (x − m)·s (m, s of x's dtype); w varies along the run
    when ``has_w``, else w = 1."""
    a1 = 0.0
    a2 = 0.0
    for b0 in range(0, xr.size, BLOCK):
        xb = xr[b0:b0 + BLOCK]
        ub = ur[b0:b0 + BLOCK]
        wb = wr[b0:b0 + BLOCK]
        c1 = m * 0
        c2 = m * 0
        for i in range(xb.size):
            v = ub[i] * wb[i] if has_w else ub[i]
            c1 += v
            c2 += v * ((xb[i] - m) * s)
        a1 += c1
        a2 += c2
    return a1, a2


def _run_dot_w_param(xr, ur, wr, has_w, m, s, pgr, pbr):
    """(Σw·u, Σw·u·x̂) as :func:`_run_dot`, and in the same sweep
    pgr += u·x̂, pbr += u elementwise (float64 accumulators across statistics)."""
    a1 = 0.0
    a2 = 0.0
    for b0 in range(0, xr.size, BLOCK):
        xb = xr[b0:b0 + BLOCK]
        ub = ur[b0:b0 + BLOCK]
        wb = wr[b0:b0 + BLOCK]
        gb = pgr[b0:b0 + BLOCK]
        bb = pbr[b0:b0 + BLOCK]
        c1 = m * 0
        c2 = m * 0
        for i in range(xb.size):
            v = ub[i]
            h = (xb[i] - m) * s
            gb[i] += v * h
            bb[i] += v
            if has_w:
                v = v * wb[i]
            c1 += v
            c2 += v * h
        a1 += c1
        a2 += c2
    return a1, a2


def _run_dx(xr, ur, wr, has_w, dr, m, p, q, r):
    """dx = p·w·u − q·(x − m) − r over a contiguous run (w = 1 unless ``has_w``)."""
    if has_w:
        for i in range(xr.size):
            dr[i] = p * wr[i] * ur[i] - q * (xr[i] - m) - r
    else:
        for i in range(xr.size):
            dr[i] = p * ur[i] - q * (xr[i] - m) - r


def _run_y(xr, yr, wr, br, has_w, has_b, m, a, c):
    """y = (x − m)·a·w + b over a contiguous run, w and b varying along it (else a, c constants)."""
    if has_w and has_b:
        for i in range(xr.size):
            yr[i] = (xr[i] - m) * a * wr[i] + br[i]
    elif has_w:
        for i in range(xr.size):
            yr[i] = (xr[i] - m) * a * wr[i] + c
    elif has_b:
        for i in range(xr.size):
            yr[i] = (xr[i] - m) * a + br[i]
    else:
        for i in range(xr.size):
            yr[i] = (xr[i] - m) * a + c


# --------------------------------------------------------------------------------------------------
# rows order


def fwd_rows(x, xs, y, ys, dims, mode, eps, g, gs, has_g, b, bs, has_b, nchunk, mean, scale, var):
    K1, R1, K2, R2, R3 = dims
    n = R1 * R2 * R3
    K = K1 * K2
    step = (K + nchunk - 1) // nchunk
    for ch in prange(nchunk):
        for t in range(ch * step, min(K, (ch + 1) * step)):
            k1 = t // K2
            k2 = t % K2
            base = k1 * xs[0] + k2 * xs[2]
            if mode != 2:
                shx = x[base] if mode == 0 else x[base] * 0
                sh = np.float64(shx)
                a1 = 0.0
                a2 = 0.0
                for r1 in range(R1):
                    for r2 in range(R2):
                        o = base + r1 * xs[1] + r2 * xs[3]
                        if xs[4] == 1:
                            b1, b2 = _run_moments(x[o:o + R3], shx)
                            a1 += b1
                            a2 += b2
                        else:
                            for r3 in range(R3):
                                d = np.float64(x[o + r3 * xs[4]]) - sh
                                a1 += d
                                a2 += d * d
                d1 = a1 / n
                # a2 = inf: Σ(x − s)² overflowed; keep σ² = inf (not inf − inf = NaN) so that the caller
                # sees the overflow and declines (issue 11); NaN stays NaN
                v = max(a2 / n - d1 * d1, 0.0) if (mode == 0 and a2 < np.inf) else a2 / n
                # the statistics have x's dtype: stored rounded, read back rounded, as the formula
                var[t] = v
                mean[t] = sh + d1 if mode == 0 else 0.0
                scale[t] = 1.0 / np.sqrt(np.float64(var[t]) + eps)
            m = mean[t]
            s = scale[t]
            ybase = k1 * ys[0] + k2 * ys[2]
            gbase = k1 * gs[0] + k2 * gs[2]
            bbase = k1 * bs[0] + k2 * bs[2]
            for r1 in range(R1):
                for r2 in range(R2):
                    o = base + r1 * xs[1] + r2 * xs[3]
                    oy = ybase + r1 * ys[1] + r2 * ys[3]
                    og = gbase + r1 * gs[1] + r2 * gs[3]
                    ob = bbase + r1 * bs[1] + r2 * bs[3]
                    if (not has_g or gs[4] == 0) and (not has_b or bs[4] == 0):
                        # γ, β constant along the row: y = (x − μ)·a + c
                        a = s * g[og] if has_g else s
                        c = b[ob] if has_b else m * 0
                        if xs[4] == 1 and ys[4] == 1:
                            _run_y(x[o:o + R3], y[oy:oy + R3], x[o:o + R3], x[o:o + R3], False, False, m, a, c)
                        else:
                            for r3 in range(R3):
                                y[oy + r3 * ys[4]] = (x[o + r3 * xs[4]] - m) * a + c
                    elif xs[4] == 1 and ys[4] == 1 and (not has_g or gs[4] == 1) and (not has_b or bs[4] == 1):
                        # γ, β along the row (layer / RMS norm): y = (x − μ)·s·γ_j + β_j
                        _run_y(x[o:o + R3], y[oy:oy + R3], g[og:og + R3], b[ob:ob + R3], has_g, has_b, m, s, m * 0)
                    else:
                        for r3 in range(R3):
                            h = (x[o + r3 * xs[4]] - m) * s
                            if has_g:
                                h = h * g[og + r3 * gs[4]]
                            if has_b:
                                h = h + b[ob + r3 * bs[4]]
                            y[oy + r3 * ys[4]] = h


def bwd_rows(x, xs, u, us, dx, dxs, dims, mode, mean, scale, g, gs, has_g, ps, need_dx, need_p, nchunk, pg, pb, coef):
    """``pg``, ``pb`` (nchunk, P): per-chunk partial Σu·x̂ and Σu at parameter offset
    k1·ps0 + r1·ps1 + k2·ps2 + r2·ps3 + r3·ps4 (the compact parameter array's own order);
    ``coef`` (K, 2) of x's dtype receives the rounded coefficients of the dx pass."""
    K1, R1, K2, R2, R3 = dims
    n = R1 * R2 * R3
    K = K1 * K2
    step = (K + nchunk - 1) // nchunk
    for ch in prange(nchunk):
        for t in range(ch * step, min(K, (ch + 1) * step)):
            k1 = t // K2
            k2 = t % K2
            m64 = np.float64(mean[t])
            s64 = np.float64(scale[t])
            base = k1 * xs[0] + k2 * xs[2]
            ubase = k1 * us[0] + k2 * us[2]
            gbase = k1 * gs[0] + k2 * gs[2]
            pbase = k1 * ps[0] + k2 * ps[2]
            a1 = 0.0  # Σ γ·u
            a2 = 0.0  # Σ γ·u·x̂
            for r1 in range(R1):
                for r2 in range(R2):
                    o = base + r1 * xs[1] + r2 * xs[3]
                    ou = ubase + r1 * us[1] + r2 * us[3]
                    og = gbase + r1 * gs[1] + r2 * gs[3]
                    op = pbase + r1 * ps[1] + r2 * ps[3]
                    if (not has_g or gs[4] == 0) and (not need_p or ps[4] == 0):
                        c1 = 0.0
                        c2 = 0.0
                        if xs[4] == 1 and us[4] == 1:
                            c1, c2 = _run_dot(x[o:o + R3], u[ou:ou + R3], x[o:o + R3], False, mean[t], scale[t])
                        else:
                            for r3 in range(R3):
                                v = np.float64(u[ou + r3 * us[4]])
                                c1 += v
                                c2 += v * ((np.float64(x[o + r3 * xs[4]]) - m64) * s64)
                        w = np.float64(g[og]) if has_g else 1.0
                        a1 += w * c1
                        a2 += w * c2
                        if need_p:
                            pg[ch, op] += c2
                            pb[ch, op] += c1
                    elif xs[4] == 1 and us[4] == 1 and (not has_g or gs[4] == 1) and (not need_p or ps[4] == 1):
                        # γ along the row (layer / RMS norm): per-element parameter sums
                        xr = x[o:o + R3]
                        ur = u[ou:ou + R3]
                        if need_p:
                            b1, b2 = _run_dot_w_param(xr, ur, g[og:og + R3] if has_g else ur, has_g, mean[t],
                                                      scale[t], pg[ch][op:op + R3], pb[ch][op:op + R3])
                        else:
                            b1, b2 = _run_dot(xr, ur, g[og:og + R3] if has_g else ur, has_g, mean[t], scale[t])
                        a1 += b1
                        a2 += b2
                    else:
                        for r3 in range(R3):
                            v = np.float64(u[ou + r3 * us[4]])
                            h = (np.float64(x[o + r3 * xs[4]]) - m64) * s64
                            if need_p:
                                pg[ch, op + r3 * ps[4]] += v * h
                                pb[ch, op + r3 * ps[4]] += v
                            if has_g:
                                v = v * np.float64(g[og + r3 * gs[4]])
                            a1 += v
                            a2 += v * h
            if not need_dx:
                continue
            # dx = P·(γ·u) − Q·(x − μ) − R with P = s, Q = s²·m2, R = s·m1 (rounded to x's dtype)
            m1 = a1 / n if mode == 0 else 0.0
            m2 = a2 / n if mode != 2 else 0.0
            m = mean[t]
            s = scale[t]
            coef[t, 0] = s64 * s64 * m2
            coef[t, 1] = s64 * m1
            q = coef[t, 0]
            rr = coef[t, 1]
            dbase = k1 * dxs[0] + k2 * dxs[2]
            for r1 in range(R1):
                for r2 in range(R2):
                    o = base + r1 * xs[1] + r2 * xs[3]
                    ou = ubase + r1 * us[1] + r2 * us[3]
                    od = dbase + r1 * dxs[1] + r2 * dxs[3]
                    og = gbase + r1 * gs[1] + r2 * gs[3]
                    if not has_g or gs[4] == 0:
                        p = s * g[og] if has_g else s
                        if xs[4] == 1 and us[4] == 1 and dxs[4] == 1:
                            _run_dx(x[o:o + R3], u[ou:ou + R3], x[o:o + R3], False, dx[od:od + R3], m, p, q, rr)
                        else:
                            for r3 in range(R3):
                                dx[od + r3 * dxs[4]] = p * u[ou + r3 * us[4]] - q * (x[o + r3 * xs[4]] - m) - rr
                    elif xs[4] == 1 and us[4] == 1 and dxs[4] == 1 and gs[4] == 1:
                        _run_dx(x[o:o + R3], u[ou:ou + R3], g[og:og + R3], True, dx[od:od + R3], m, s, q, rr)
                    else:
                        for r3 in range(R3):
                            dx[od + r3 * dxs[4]] = (s * g[og + r3 * gs[4]] * u[ou + r3 * us[4]]
                                                    - q * (x[o + r3 * xs[4]] - m) - rr)


# --------------------------------------------------------------------------------------------------
# cols order: R2 = 1 and the block (K2, R3) is contiguous in x, y/u/dx: element j = k2·R3 + r3


def _col_sums(x, xs, k1, lo, hi, J, sh, a1, a2):
    """a1[j] += Σ_{r1∈[lo,hi)} (x − sh_j), a2[j] += Σ (x − sh_j)² over rows of the contiguous block;
    ``sh`` has x's dtype; blocks of BLOCK rows are summed in x's dtype, then added in float64. Four
    rows per sweep: the accumulators are loaded and stored once per four rows."""
    t1 = np.empty(J, x.dtype)
    t2 = np.empty(J, x.dtype)
    for b0 in range(lo, hi, BLOCK):
        t1[:] = 0
        t2[:] = 0
        bend = min(hi, b0 + BLOCK)
        r1 = b0
        while r1 + 4 <= bend:
            o = k1 * xs[0] + r1 * xs[1]
            x0 = x[o:o + J]
            x1 = x[o + xs[1]:o + xs[1] + J]
            x2 = x[o + 2 * xs[1]:o + 2 * xs[1] + J]
            x3 = x[o + 3 * xs[1]:o + 3 * xs[1] + J]
            for j in range(J):
                d0 = x0[j] - sh[j]
                d1 = x1[j] - sh[j]
                d2 = x2[j] - sh[j]
                d3 = x3[j] - sh[j]
                t1[j] += (d0 + d1) + (d2 + d3)
                t2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r1 += 4
        for r in range(r1, bend):
            o = k1 * xs[0] + r * xs[1]
            xr = x[o:o + J]
            for j in range(J):
                d = xr[j] - sh[j]
                t1[j] += d
                t2[j] += d * d
        for j in range(J):
            a1[j] += t1[j]
            a2[j] += t2[j]


def _col_stats_fwd(k1, dims, mode, eps, x, xs, g, gs, has_g, b, bs, has_b, p1, p2, rows, shj, mean, scale, var, M, A, C):
    """Statistics of k1 from its partial sums ``p1[rows]``, ``p2[rows]``, then the per-column
    coefficients M (μ), A (scale·γ), C (β) of the apply pass."""
    K1, R1, K2, R2, R3 = dims
    n = R1 * R3
    for k2 in range(K2):
        k = k1 * K2 + k2
        if mode != 2:
            s1 = 0.0
            s2 = 0.0
            for row in rows:
                for r3 in range(R3):
                    s1 += p1[row, k2 * R3 + r3]
                    s2 += p2[row, k2 * R3 + r3]
            d1 = s1 / n
            # s2 = inf (overflow): σ² = inf, not NaN, so that the caller declines (issue 11)
            var[k] = max(s2 / n - d1 * d1, 0.0) if (mode == 0 and s2 < np.inf) else s2 / n
            mean[k] = shj[k1, k2 * R3] + d1 if mode == 0 else 0.0
            scale[k] = 1.0 / np.sqrt(np.float64(var[k]) + eps)
        for r3 in range(R3):
            j = k2 * R3 + r3
            M[k1, j] = mean[k]
            A[k1, j] = scale[k] * g[k1 * gs[0] + k2 * gs[2] + r3 * gs[4]] if has_g else scale[k]
            C[k1, j] = b[k1 * bs[0] + k2 * bs[2] + r3 * bs[4]] if has_b else mean[k] * 0


def _col_apply_y(x, xs, y, ys, k1, lo, hi, J, Mk, Ak, Ck):
    for r1 in range(lo, hi):
        o = k1 * xs[0] + r1 * xs[1]
        oy = k1 * ys[0] + r1 * ys[1]
        xr = x[o:o + J]
        yr = y[oy:oy + J]
        for j in range(J):
            yr[j] = (xr[j] - Mk[j]) * Ak[j] + Ck[j]


def fwd_cols(x, xs, y, ys, dims, mode, eps, g, gs, has_g, b, bs, has_b, nchunk, fused, mean, scale, var):
    K1, R1, K2, R2, R3 = dims
    J = K2 * R3
    step = (R1 + nchunk - 1) // nchunk
    ntask = K1 if fused else K1 * nchunk
    p1 = np.zeros((ntask, J))
    p2 = np.zeros((ntask, J))
    # shift per statistic, spread over its R3 columns
    shj = np.zeros((K1, J), x.dtype)
    if mode == 0:
        for k1 in range(K1):
            for k2 in range(K2):
                for r3 in range(R3):
                    shj[k1, k2 * R3 + r3] = x[k1 * xs[0] + k2 * R3]
    M = np.empty((K1, J), x.dtype)   # μ per column
    A = np.empty((K1, J), x.dtype)   # scale·γ per column
    C = np.empty((K1, J), x.dtype)   # β per column
    if fused:
        # one task per k1: its sums, statistics and output; the second read of the block hits the cache
        for k1 in prange(K1):
            if mode != 2:
                _col_sums(x, xs, k1, 0, R1, J, shj[k1], p1[k1], p2[k1])
            _col_stats_fwd(k1, dims, mode, eps, x, xs, g, gs, has_g, b, bs, has_b, p1, p2,
                           np.arange(k1, k1 + 1), shj, mean, scale, var, M, A, C)
            _col_apply_y(x, xs, y, ys, k1, 0, R1, J, M[k1], A[k1], C[k1])
    else:
        if mode != 2:
            for t in prange(ntask):
                _col_sums(x, xs, t // nchunk, (t % nchunk) * step, min(R1, (t % nchunk + 1) * step), J,
                          shj[t // nchunk], p1[t], p2[t])
        for k1 in range(K1):
            _col_stats_fwd(k1, dims, mode, eps, x, xs, g, gs, has_g, b, bs, has_b, p1, p2,
                           np.arange(k1 * nchunk, (k1 + 1) * nchunk), shj, mean, scale, var, M, A, C)
        for t2 in prange(K1 * nchunk):
            k1 = t2 // nchunk
            c = t2 % nchunk
            _col_apply_y(x, xs, y, ys, k1, c * step, min(R1, (c + 1) * step), J, M[k1], A[k1], C[k1])


def _col_dot(x, xs, u, us, k1, lo, hi, J, m, s, c1, c2):
    """c1[j] += Σ u, c2[j] += Σ u·x̂ with x̂ = (x − m_j)·s_j (m, s of x's dtype), in blocks of BLOCK rows
    summed in x's dtype and added in float64; two rows per sweep."""
    t1 = np.empty(J, x.dtype)
    t2 = np.empty(J, x.dtype)
    for b0 in range(lo, hi, BLOCK):
        t1[:] = 0
        t2[:] = 0
        bend = min(hi, b0 + BLOCK)
        r1 = b0
        while r1 + 2 <= bend:
            o = k1 * xs[0] + r1 * xs[1]
            ou = k1 * us[0] + r1 * us[1]
            x0 = x[o:o + J]
            x1 = x[o + xs[1]:o + xs[1] + J]
            u0 = u[ou:ou + J]
            u1 = u[ou + us[1]:ou + us[1] + J]
            for j in range(J):
                v0 = u0[j]
                v1 = u1[j]
                t1[j] += v0 + v1
                t2[j] += v0 * ((x0[j] - m[j]) * s[j]) + v1 * ((x1[j] - m[j]) * s[j])
            r1 += 2
        for r in range(r1, bend):
            o = k1 * xs[0] + r * xs[1]
            ou = k1 * us[0] + r * us[1]
            xr = x[o:o + J]
            ur = u[ou:ou + J]
            for j in range(J):
                v = ur[j]
                t1[j] += v
                t2[j] += v * ((xr[j] - m[j]) * s[j])
        for j in range(J):
            c1[j] += t1[j]
            c2[j] += t2[j]


def _col_apply(x, xs, u, us, dx, dxs, k1, lo, hi, J, M, P, Q, R):
    for r1 in range(lo, hi):
        o = k1 * xs[0] + r1 * xs[1]
        ou = k1 * us[0] + r1 * us[1]
        od = k1 * dxs[0] + r1 * dxs[1]
        xr = x[o:o + J]
        ur = u[ou:ou + J]
        dr = dx[od:od + J]
        for j in range(J):
            dr[j] = P[j] * ur[j] - Q[j] * (xr[j] - M[j]) - R[j]


def _col_stats_bwd(k1, dims, mode, g, gs, has_g, c1, c2, rows, m64, s64, mean, scale, M, P, Q, R):
    """m1 = mean(γ·u), m2 = mean(γ·u·x̂) of k1's statistics from the column sums ``c1[rows]``,
    ``c2[rows]``, then the per-column coefficients of dx = P·u − Q·(x − M) − R."""
    K1, R1, K2, R2, R3 = dims
    n = R1 * R3
    for k2 in range(K2):
        a1 = 0.0
        a2 = 0.0
        for r3 in range(R3):
            j = k2 * R3 + r3
            w = np.float64(g[k1 * gs[0] + k2 * gs[2] + r3 * gs[4]]) if has_g else 1.0
            for row in rows:
                a1 += w * c1[row, j]
                a2 += w * c2[row, j]
        m1 = a1 / n if mode == 0 else 0.0
        m2 = a2 / n if mode != 2 else 0.0
        k = k1 * K2 + k2
        for r3 in range(R3):
            j = k2 * R3 + r3
            sk = scale[k]
            M[k1, j] = mean[k]
            P[k1, j] = sk * g[k1 * gs[0] + k2 * gs[2] + r3 * gs[4]] if has_g else sk
            sj = np.float64(s64[k1, j])
            Q[k1, j] = sj * sj * m2
            R[k1, j] = sj * m1


def bwd_cols(x, xs, u, us, dx, dxs, dims, mode, mean, scale, g, gs, has_g, ps, need_dx, need_p, nchunk, fused, pg, pb):
    """``pg``, ``pb`` (1, P): Σu·x̂ and Σu at parameter offset k1·ps0 + k2·ps2 + r3·ps4."""
    K1, R1, K2, R2, R3 = dims
    J = K2 * R3
    step = (R1 + nchunk - 1) // nchunk
    ntask = K1 if fused else K1 * nchunk
    c1 = np.zeros((ntask, J))
    c2 = np.zeros((ntask, J))
    m64 = np.empty((K1, J), x.dtype)  # μ and scale per column, x's dtype
    s64 = np.empty((K1, J), x.dtype)
    for k1 in range(K1):
        for j in range(J):
            k = k1 * K2 + j // R3
            m64[k1, j] = mean[k]
            s64[k1, j] = scale[k]
    M = np.empty((K1, J), x.dtype)
    P = np.empty((K1, J), x.dtype)
    Q = np.empty((K1, J), x.dtype)
    R = np.empty((K1, J), x.dtype)
    if fused:
        for k1 in prange(K1):
            _col_dot(x, xs, u, us, k1, 0, R1, J, m64[k1], s64[k1], c1[k1], c2[k1])
            _col_stats_bwd(k1, dims, mode, g, gs, has_g, c1, c2, np.arange(k1, k1 + 1), m64, s64, mean, scale,
                           M, P, Q, R)
            if need_dx:
                _col_apply(x, xs, u, us, dx, dxs, k1, 0, R1, J, M[k1], P[k1], Q[k1], R[k1])
    else:
        for t in prange(ntask):
            _col_dot(x, xs, u, us, t // nchunk, (t % nchunk) * step, min(R1, (t % nchunk + 1) * step), J,
                     m64[t // nchunk], s64[t // nchunk], c1[t], c2[t])
        for k1 in range(K1):
            _col_stats_bwd(k1, dims, mode, g, gs, has_g, c1, c2, np.arange(k1 * nchunk, (k1 + 1) * nchunk), m64,
                           s64, mean, scale, M, P, Q, R)
        if need_dx:
            for t2 in prange(K1 * nchunk):
                k1 = t2 // nchunk
                c = t2 % nchunk
                _col_apply(x, xs, u, us, dx, dxs, k1, c * step, min(R1, (c + 1) * step), J, M[k1], P[k1], Q[k1],
                           R[k1])
    if need_p:
        # parameter sums: over chunks and over k1 (parameters are constant along R1 here)
        for row in range(ntask):
            k1 = row if fused else row // nchunk
            for j in range(J):
                op = k1 * ps[0] + (j // R3) * ps[2] + (j % R3) * ps[4]
                pg[0, op] += c2[row, j]
                pb[0, op] += c1[row, j]


# (parallel, serial) builds; the helpers are inlined by numba's call resolution into each build
from .config import jit as _jit  # noqa: E402

_run_moments = _jit(_run_moments, parallel=False)
_run_dot = _jit(_run_dot, parallel=False)
_run_dot_w_param = _jit(_run_dot_w_param, parallel=False)
_run_dx = _jit(_run_dx, parallel=False)
_run_y = _jit(_run_y, parallel=False)
_col_sums = _jit(_col_sums, parallel=False)
_col_dot = _jit(_col_dot, parallel=False)
_col_apply = _jit(_col_apply, parallel=False)
_col_apply_y = _jit(_col_apply_y, parallel=False)
_col_stats_fwd = _jit(_col_stats_fwd, parallel=False)
_col_stats_bwd = _jit(_col_stats_bwd, parallel=False)

KERNELS = {f.__name__: pair(f) for f in (fwd_rows, bwd_rows, fwd_cols, bwd_cols)}
