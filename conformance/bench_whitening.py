"""Benchmark of batch whitening: where the time goes, against the machine's matmul speed.

    normref bench whitening [--shape 32 64 56 56] [--group-size 64] [--method zca] [--repeat 5]
    python -m normref.conformance.bench_whitening ...          (the same)

For an input (N, C, H, W) in float32 on torch (CPU, or CUDA with ``--device cuda``) and groups of
d = ``group_size`` channels, m = N·H·W samples per covariance:

- the covariance Σ = Xc·Xcᵀ/m and the application X̂ = W·Xc (for Cholesky the triangular solve
  L·X̂ = Xc) are matrix products of 2·C·d·m flops each (the solve: C·d·m); their speed is compared
  with the machine's matmul throughput, the best of several products: a large square one, and the
  exact batched products normref runs (same shapes, same strides) for the covariance and the
  application. A timing of normref's own step is at most its best matmul, so its share cannot
  exceed 100% beyond timer noise;
- the O(d³) part (one batched eigh / cholesky / the Newton iterations on the (C/d, d, d) matrices,
  with normref's definiteness checks) is timed on its own and reported as a share of the whole
  forward;
- the whole normref forward (``normref.batch_whitening``, training mode) and forward+backward
  (``normref.vjp``) are compared with a straightforward torch ZCA (permute to (C, m), centre,
  covariance, ``torch.linalg.eigh``, W = D·Λ^-1/2·Dᵀ, W·Xc, permute back; torch autograd for the
  backward) in the same run.

Every timing is the best (minimum) of ``--repeat`` runs after one warm-up: the least disturbed
estimate on a shared machine; its spread over the runs (quartiles, median, IQR / median: see
:func:`normref.conformance.bench_timing.spread`) is kept too. The verdict lines compare with the
targets: covariance and application ≥ 60% of the measured matmul throughput, the O(d³) part < 10%
of the forward. Everything printed is also written to ``--out``/``bench_whitening.json`` (default
``bench-out/``) with the environment (CPU model, thread counts, library versions, UTC timestamp) and
every timing's spread, so that ``normref bench --compare`` style comparisons and re-analysis work
from the file. ``--quick`` is a seconds-long smoke run (a tiny input, a 256² matmul reference). This
is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .bench_timing import environment, spread

TARGET_MATMUL_SHARE = 0.60
TARGET_SMALL_SHARE = 0.10


def _timer(torch, device, spreads: dict | None = None):
    """``timeit(fn, repeat, name=None)``: the best of ``repeat`` timed calls after one warm-up; with
    ``name``, the calls' :func:`spread` goes into ``spreads[name]``."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timeit(fn, repeat, name=None):
        fn()
        sync()
        ts = []
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        if name is not None and spreads is not None:
            spreads[name] = spread(ts)
        return min(ts)

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


def _parser():
    ap = argparse.ArgumentParser(prog="normref bench whitening", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56], help="input shape (N, C, H, W)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--method", default="zca", help="zca, pca, cholesky, iternorm, newton_schulz")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--out", default="bench-out", help="folder for bench_whitening.json (default: bench-out)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: input (4, 16, 8, 8), group size 8, 2 repeats, a 256² matmul reference")
    return ap


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)

    import array_api_compat
    import torch

    import normref
    from normref import matfun
    from normref import whitening as W

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    spreads: dict = {}
    timeit = _timer(torch, dev, spreads)
    if args.quick:
        args.shape, args.group_size, args.repeat = [4, 16, 8, 8], min(args.group_size, 8), min(args.repeat, 2)
    shape = tuple(args.shape)
    n, c = shape[:2]
    d = args.group_size
    hw = 1
    for s in shape[2:]:
        hw *= s
    m = n * hw
    eps = 1e-5
    rep = args.repeat
    meth = args.method
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float32, device=dev)
    xp = array_api_compat.array_namespace(x)

    # normref's pieces on its (I, R1, G, d, R2) layout of the batch partition (no physical transpose)
    from normref.partition import Partition

    part = Partition("batch")
    op = W.whitening_operation("bench", part, shape, meth, d, 5, eps)
    lay = op.layout(shape)
    x5 = lay.orient(xp, x)
    xc = x5 - W._sample_mean(xp, x5)
    t_center = timeit(lambda: x5 - W._sample_mean(xp, x5), rep, "center")
    t_cov = timeit(lambda: W._covariance(xp, xc, lay.m), rep, "covariance")
    sigma = W._covariance(xp, xc, lay.m) + eps * torch.eye(d, device=dev)
    t_small = timeit(lambda: W._operator("bench", xp, sigma, meth, 5, eps, "input", lay.m), rep, "small")
    opm, _ = W._operator("bench", xp, sigma, meth, 5, eps, "input", lay.m)
    t_apply = timeit(lambda: matfun.apply_whitening(xp, meth, opm[:, None, ...], xc), rep, "apply")
    flops_cov = 2 * c * d * m
    flops_apply = flops_cov if meth != "cholesky" else c * d * m  # a triangular solve: half the products

    # the machine's matmul throughput: the best of a large square product and the exact products above
    k = 256 if args.quick else 2048 if dev == "cpu" else 8192
    a = torch.randn(k, k, device=dev)
    xct = xc.mT
    wb = torch.randn(lay.i, 1, lay.g, d, d, device=dev)
    xa, xb = xc.reshape(-1, d, lay.r2), xct.reshape(-1, lay.r2, d)  # contiguous copies, outside the timing
    candidates = {
        f"square {k}": (lambda: a @ a, 2 * k**3),
        "covariance's batched product": (lambda: torch.matmul(xc, xct), flops_cov),
        "application's batched product": (lambda: torch.matmul(wb, xc), 2 * c * d * m),
        "covariance, contiguous operands": (lambda: torch.matmul(xa, xb), flops_cov),
    }
    rates = {name: fl / timeit(fn, rep, f"matmul[{name}]") for name, (fn, fl) in candidates.items()}
    best_name = max(rates, key=rates.get)
    peak = rates[best_name]

    t_fwd = timeit(lambda: normref.batch_whitening(x, training=True, method=meth, group_size=d), rep, "forward")

    def nr_fb():
        y, pb = normref.vjp(normref.batch_whitening, x, training=True, method=meth, group_size=d)
        pb(torch.ones_like(y))

    t_fb = timeit(nr_fb, rep, "forward_backward")
    t_tfwd = timeit(lambda: torch_zca(torch, x, d, eps), rep, "torch_zca_forward")
    xg = x.clone().requires_grad_(True)

    def t_fb_fn():
        y = torch_zca(torch, xg, d, eps)
        (gx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
        return gx

    t_tfb = timeit(t_fb_fn, rep, "torch_zca_forward_backward")

    out = {
        "device": dev if dev != "cpu" else f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)",
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "shape": shape, "group_size": d, "method": meth, "m": m,
        "matmul_peak_gflops": peak / 1e9, "matmul_peak_from": best_name,
        **{f"matmul_gflops[{name}]": r / 1e9 for name, r in rates.items()},
        "cov_ms": t_cov * 1e3, "cov_gflops": flops_cov / t_cov / 1e9,
        "apply_ms": t_apply * 1e3, "apply_gflops": flops_apply / t_apply / 1e9,
        "center_ms": t_center * 1e3,
        "small_ms": t_small * 1e3,
        "forward_ms": t_fwd * 1e3,
        "forward_backward_ms": t_fb * 1e3,
        "torch_zca_forward_ms": t_tfwd * 1e3,
        "torch_zca_forward_backward_ms": t_tfb * 1e3,
    }
    out["cov_share_of_peak"] = out["cov_gflops"] / out["matmul_peak_gflops"]
    out["apply_share_of_peak"] = out["apply_gflops"] / out["matmul_peak_gflops"]
    out["small_share_of_forward"] = t_small / t_fwd
    out["ratio_forward_normref_over_torch"] = t_fwd / t_tfwd
    out["ratio_fb_normref_over_torch"] = t_fb / t_tfb
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    out["verdict"] = {
        "covariance >= 60% of matmul": ok(out["cov_share_of_peak"] >= TARGET_MATMUL_SHARE),
        "application >= 60% of matmul": ok(out["apply_share_of_peak"] >= TARGET_MATMUL_SHARE),
        "O(d^3) part < 10% of forward": ok(out["small_share_of_forward"] < TARGET_SMALL_SHARE),
        "forward vs torch ZCA": f"normref takes {out['ratio_forward_normref_over_torch']:.2f}x torch's time",
        "forward+backward vs torch ZCA": f"normref takes {out['ratio_fb_normref_over_torch']:.2f}x torch's time",
    }
    for key, val in out.items():
        if key == "verdict":
            continue
        print(f"{key:44s} {val:.4g}" if isinstance(val, float) else f"{key:44s} {val}")
    print("verdict (the targets: covariance and application >= 60% of matmul, O(d^3) < 10% of forward):")
    for key, val in out["verdict"].items():
        print(f"  {key:42s} {val}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "bench_whitening.json"
    doc = {"environment": environment(torch.get_num_threads()), "repeat": rep, "warmup": 1, "quick": args.quick,
           "timing": "each '*_ms' is the best (minimum) of 'repeat' calls after one warm-up; 'spreads' has every "
                     "timing's samples, quartiles, median, IQR and IQR/median (seconds)",
           "results": {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}, "spreads": spreads}
    js.write_text(json.dumps(doc, indent=1, default=float))
    print(f"wrote {js}")
    return out


if __name__ == "__main__":
    main()
