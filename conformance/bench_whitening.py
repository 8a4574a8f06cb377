"""Benchmark of batch whitening (issue 3, §5): where the time goes, against the machine's matmul speed.

    python -m normref.conformance.bench_whitening [--shape 32 64 56 56] [--group-size 64] [--repeat 5]

For an input (N, C, H, W) in float32 on torch (CPU, or CUDA with ``--device cuda``) and groups of
d = ``group_size`` channels, m = N·H·W samples per covariance:

- the covariance Σ = Xc·Xcᵀ/m and the application X̂ = W·Xc are matrix products of 2·C·d·m flops
  each: their speed is compared with the machine's matmul throughput, measured on a large square
  product (peak) and on a product of the same shape (d × m)·(m × d);
- the O(d³) part (one batched eigh / cholesky / the Newton iterations on the (C/d, d, d) matrices)
  is timed on its own and reported as a share of the whole forward;
- the whole normref forward (``normref.batch_whitening``, training mode) and forward+backward
  (``normref.vjp``) are compared with a straightforward torch ZCA (permute to (C, m), centre,
  covariance, ``torch.linalg.eigh``, W = D·Λ^-1/2·Dᵀ, W·Xc, permute back; torch autograd for the
  backward) in the same run.

Timings are medians over ``--repeat`` runs after one warm-up. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _timer(torch, device):
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timeit(fn, repeat):
        fn()
        sync()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return timeit


def torch_zca(torch, x, group_size, eps):
    """A straightforward torch ZCA batch whitening (the comparison point)."""
    n, c = x.shape[:2]
    g = c // group_size
    xt = x.transpose(0, 1).reshape(g, group_size, -1)  # (G, d, m): a physical transpose
    mu = xt.mean(-1, keepdim=True)
    xc = xt - mu
    m = xc.shape[-1]
    s = xc @ xc.transpose(-1, -2) / m + eps * torch.eye(group_size, dtype=x.dtype, device=x.device)
    lam, d = torch.linalg.eigh(s)
    w = (d * lam.rsqrt().unsqueeze(-2)) @ d.transpose(-1, -2)
    y = w @ xc
    return y.reshape(c, n, *x.shape[2:]).transpose(0, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--method", default="zca")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args(argv)

    import array_api_compat
    import torch

    import normref
    from normref import matfun
    from normref import whitening as W

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    timeit = _timer(torch, dev)
    shape = tuple(args.shape)
    n, c = shape[:2]
    d = args.group_size
    g = c // d
    hw = 1
    for s in shape[2:]:
        hw *= s
    m = n * hw
    eps = 1e-5
    rep = args.repeat
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float32, device=dev)
    xp = array_api_compat.array_namespace(x)

    # the machine's matmul throughput: a large square product (peak) and the covariance's own shape
    k = 2048 if dev == "cpu" else 8192
    a = torch.randn(k, k, device=dev)
    t_sq = timeit(lambda: a @ a, rep)
    peak = 2 * k**3 / t_sq
    xm = torch.randn(g, d, m, device=dev)
    t_same = timeit(lambda: xm @ xm.transpose(-1, -2), rep)
    same = 2 * g * d * d * m / t_same

    # normref's pieces on its (N, G, d, HW) view (no physical transpose)
    xv = x.reshape(n, g, d, hw)
    mu = xv.mean(dim=(0, 3), keepdim=True)
    xc = xv - mu
    t_center = timeit(lambda: xv - xv.mean(dim=(0, 3), keepdim=True), rep)
    t_cov = timeit(lambda: W._covariance(xp, xc, True), rep)
    sigma = W._covariance(xp, xc, True) + eps * torch.eye(d, device=dev)
    t_small = timeit(lambda: matfun.whitening_matrix_forward(xp, sigma, args.method, 5), rep)
    wm, _ = matfun.whitening_matrix_forward(xp, sigma, args.method, 5)
    t_apply = timeit(lambda: xp.matmul(wm, xc), rep)
    flops_mm = 2 * c * d * m  # per product (covariance or application)

    t_fwd = timeit(lambda: normref.batch_whitening(x, training=True, method=args.method, group_size=d), rep)

    def nr_fb():
        y, pb = normref.vjp(normref.batch_whitening, x, training=True, method=args.method, group_size=d)
        pb(torch.ones_like(y))

    t_fb = timeit(nr_fb, rep)

    t_tfwd = timeit(lambda: torch_zca(torch, x, d, eps), rep)
    xg = x.clone().requires_grad_(True)

    def t_fb_fn():
        y = torch_zca(torch, xg, d, eps)
        (gx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
        return gx

    t_tfb = timeit(t_fb_fn, rep)

    import os

    out = {
        "device": dev if dev != "cpu" else f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)",
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "shape": shape, "group_size": d, "method": args.method, "m": m,
        "matmul_peak_gflops": peak / 1e9,
        "matmul_same_shape_gflops": same / 1e9,
        "cov_ms": t_cov * 1e3, "cov_gflops": flops_mm / t_cov / 1e9,
        "apply_ms": t_apply * 1e3, "apply_gflops": flops_mm / t_apply / 1e9,
        "center_ms": t_center * 1e3,
        "small_ms": t_small * 1e3,
        "forward_ms": t_fwd * 1e3,
        "forward_backward_ms": t_fb * 1e3,
        "torch_zca_forward_ms": t_tfwd * 1e3,
        "torch_zca_forward_backward_ms": t_tfb * 1e3,
    }
    out["cov_share_of_peak"] = out["cov_gflops"] / out["matmul_peak_gflops"]
    out["apply_share_of_peak"] = out["apply_gflops"] / out["matmul_peak_gflops"]
    out["cov_share_of_same_shape"] = out["cov_gflops"] / out["matmul_same_shape_gflops"]
    out["apply_share_of_same_shape"] = out["apply_gflops"] / out["matmul_same_shape_gflops"]
    out["small_share_of_forward"] = t_small / t_fwd
    out["ratio_forward_normref_over_torch"] = t_fwd / t_tfwd
    out["ratio_fb_normref_over_torch"] = t_fb / t_tfb
    for key, val in out.items():
        print(f"{key:34s} {val:.4g}" if isinstance(val, float) else f"{key:34s} {val}")
    return out


if __name__ == "__main__":
    main()
