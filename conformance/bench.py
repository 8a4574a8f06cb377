"""``normref bench``: the standardization family against PyTorch CPU and this machine's memory bandwidth.

    normref bench                  # the full run (a few minutes on 2 cores)
    normref bench --quick          # small shapes, few repeats: a smoke run (under a minute, warm cache)
    normref bench --out DIR        # where bench.json and bench.png go (default: bench-out/)

One run measures, on this machine and in this process:

- memory bandwidth, STREAM style: a parallel copy (read a, write b) and a parallel sum (read a) over
  float32 arrays of 256 MiB, far above the last-level cache;
  the reference bandwidth is the better of a 2-thread numba copy and NumPy's 1-thread copy;
- for batch, instance and group normalization on (32, 64, 56, 56) and (64, 256, 28, 28), NCHW and
  channels-last (for NumPy: an (N, H, W, C) array seen as an (N, C, H, W) view), and for layer and
  RMS normalization on (8192, 1024) rows, float32, forward and backward:
  normref with its numba kernels (parallel builds; "numba 1T": the same kernels' single-threaded
  builds), normref on the array-API path (``use_kernels(False)``), and ``torch.nn.functional``
  with autograd's backward;
- the median time of each, its ratio to PyTorch's, and its effective bandwidth as a fraction of the
  measured copy bandwidth, counting the minimum traffic: forward reads x and writes y (8 bytes per
  float32 element), backward reads x (or x̂) and dy and writes dx (12 bytes per element).

``bench.json`` (written first) has every timing's spread over its repetitions (min, quartiles,
median, max, IQR), the library versions, the CPU model, the thread counts and a UTC timestamp.
``bench.png`` (when matplotlib is installed) shows the speed-up over PyTorch on a log axis, one
panel per method, forward and backward, with error bars from the quartiles of both timings. Without
rich the table is printed as plain text; without matplotlib the plot is skipped with a message.

Allocation (reported in the output): normref's forward writes into a reused ``out=`` buffer; its
backward and every PyTorch call allocate their results. Fresh allocations above glibc's mmap
threshold are page-faulted on first touch at every call, which on this machine can cost more than
the kernel; the benchmark therefore raises glibc's mmap and trim thresholds (``mallopt``) so that
freed blocks are reused by both libraries alike (``--fresh-pages`` keeps glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["main"]

TARGET_FRACTION = 0.60
# speed-up over PyTorch each (method, pass, layout) is meant to reach: ≥ 2× or ≥ 1×
SPEED_TARGETS = {
    ("batch", "forward", "NCHW"): 2.0,
    ("batch", "backward", "NCHW"): 1.0,
    ("batch", "backward", "channels-last"): 1.0,
    ("instance", "forward"): 2.0,
    ("instance", "backward"): 2.0,
    ("rms", "forward"): 2.0,
    ("rms", "backward"): 2.0,
    ("layer", "forward"): 1.0,
    ("layer", "backward"): 1.0,
    ("group", "forward"): 1.0,
    ("group", "backward"): 1.0,
}


def _speed_target(method: str, pas: str, layout: str) -> float | None:
    return SPEED_TARGETS.get((method, pas, layout), SPEED_TARGETS.get((method, pas)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normref bench", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="The other benchmarks: normref bench sync --help (synchronized batch statistics on gloo "
        "processes), normref bench whitening --help (batch whitening against the matmul speed).")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (under a minute)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 3 repeats, no fresh-process latency: checks that the benchmark runs "
                   "(seconds; its numbers mean nothing)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png (default: bench-out)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (default 15; 3 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: this machine's cores)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch (no ratios)")
    p.add_argument("--fresh-pages", action="store_true",
                   help="keep glibc's malloc defaults: large fresh outputs are page-faulted at every call")
    return p


# --------------------------------------------------------------------------------------------------
# timing and bandwidth


def _times(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def spread(ts: Sequence[float]) -> dict:
    """min, quartiles (linear interpolation), median, max and IQR of repeated timings (seconds)."""
    v = np.sort(np.asarray(ts, dtype=np.float64))
    q1, med, q3 = (float(q) for q in np.quantile(v, [0.25, 0.5, 0.75]))
    return {"n": int(v.size), "min": float(v[0]), "q1": q1, "median": med, "q3": q3, "max": float(v[-1]),
            "iqr": q3 - q1}


def _median_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    return statistics.median(_times(fn, repeat, warmup))


class _Timer:
    """Times into a row: ``row[key]`` the median (seconds), ``row[key + '_spread']`` its :func:`spread`."""

    def __init__(self, row: dict):
        self.row = row

    def __call__(self, key: str, fn: Callable[[], object], repeat: int) -> None:
        st = spread(_times(fn, repeat))
        self.row[key] = st["median"]
        self.row[key + "_spread"] = st


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _versions() -> dict:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("normref", "numpy", "numba", "torch", "array-api-compat", "rich", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment(threads_torch: int | None) -> dict:
    """What the timings depend on: CPU model, cores, thread counts, library versions, when (UTC)."""
    import datetime
    import platform

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        import numba

        numba_threads = numba.get_num_threads()
    except ImportError:
        numba_threads = None
    return {"timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": _cpu_model(), "machine": platform.machine(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cpus_usable": affinity, "numba_threads": numba_threads,
            "torch_threads": threads_torch,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "versions": _versions()}


def _mallopt_reuse() -> str:
    """Ask glibc to serve large allocations from the heap and keep freed memory (no page faults per call)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31 - 1)
        return "glibc mallopt: mmap threshold 1 GiB, trim threshold 2 GiB (freed blocks reused)" if ok else "mallopt refused"
    except Exception as e:  # not glibc
        return f"malloc defaults (mallopt unavailable: {e})"


def _stream(nbytes: int, repeat: int) -> dict:
    """STREAM-style copy and sum bandwidth (bytes/s) with numba's thread pool, float32."""
    import numba
    from numba import prange

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def copy(a, b):
        for i in prange(a.size):
            b[i] = a[i]

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def total(a):
        s = 0.0
        for i in prange(a.size):
            s += a[i]
        return s

    n = nbytes // 4
    a = np.ones(n, np.float32)
    b = np.zeros(n, np.float32)
    copy(a, b), total(a)
    t_copy = _median_time(lambda: copy(a, b), repeat)
    t_sum = _median_time(lambda: total(a), repeat)
    t_np = _median_time(lambda: np.copyto(b, a), repeat)  # one thread, NumPy's own copy loop
    copy_bw = max(2 * nbytes / t_copy, 2 * nbytes / t_np)
    return {"array_bytes": nbytes, "copy_parallel": 2 * nbytes / t_copy, "copy_numpy": 2 * nbytes / t_np,
            "copy": copy_bw, "sum": nbytes / t_sum, "threads": numba.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# the cases


def _cases(quick: bool, smoke: bool = False):
    if smoke:
        img = [(2, 8, 4, 4)]
        rows = [(16, 32)]
    elif quick:
        img = [(8, 16, 28, 28), (8, 32, 14, 14)]
        rows = [(1024, 256)]
    else:
        img = [(32, 64, 56, 56), (64, 256, 28, 28)]
        rows = [(8192, 1024)]
    out = []
    for shape in img:
        for layout in ("NCHW", "channels-last"):
            for method in ("batch", "instance", "group"):
                out.append((method, shape, layout))
    for shape in rows:
        for method in ("layer", "rms"):
            out.append((method, shape, "rows"))
    return out


def _make_input(shape, layout, rng):
    if layout == "channels-last":
        n, c, h, w = shape
        return rng.standard_normal((n, h, w, c), dtype=np.float32).transpose(0, 3, 1, 2)
    return rng.standard_normal(shape, dtype=np.float32)


def _groups(c: int) -> int:
    """32 groups (Wu & He's default) where the channels allow it."""
    return 32 if c % 32 == 0 else max(1, c // 2)


def _normref_call(method, x, w, b, out=None):
    import normref

    kw = {} if out is None else {"out": out}
    if method == "batch":
        return normref.batch_norm, (x, None, None, w, b, True), kw
    if method == "instance":
        return normref.instance_norm, (x, None, None, w, b), kw
    if method == "group":
        return normref.group_norm, (x, _groups(x.shape[1]), w, b), kw
    if method == "layer":
        return normref.layer_norm, (x, (x.shape[-1],), w, b), kw
    if method == "rms":
        return normref.rms_norm, (x, (x.shape[-1],), w), kw
    raise AssertionError(method)


def _torch_fn(method, shape):
    import torch.nn.functional as F

    if method == "batch":
        return lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True)
    if method == "instance":
        return lambda x, w, b: F.instance_norm(x, weight=w, bias=b)
    if method == "group":
        return lambda x, w, b: F.group_norm(x, _groups(shape[1]), w, b)
    if method == "layer":
        return lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b)
    if method == "rms":
        return lambda x, w, b: F.rms_norm(x, (shape[-1],), w)
    raise AssertionError(method)


def _measure_case(method, shape, layout, repeat, use_torch, rng) -> list[dict]:
    import normref

    x = _make_input(shape, layout, rng)
    pdim = shape[-1] if method in ("layer", "rms") else shape[1]
    w = rng.standard_normal(pdim, dtype=np.float32)
    b = None if method == "rms" else rng.standard_normal(pdim, dtype=np.float32)
    dy = np.empty_like(x)  # the cotangent in x's layout, as autograd would hand it
    dy[...] = rng.standard_normal(shape, dtype=np.float32)
    nel = x.size
    rec = {"method": method, "shape": list(shape), "layout": layout}
    fwd = dict(rec, **{"pass": "forward", "bytes": 8 * nel})
    bwd = dict(rec, **{"pass": "backward", "bytes": 12 * nel})

    tf, tb = _Timer(fwd), _Timer(bwd)
    buf = np.empty_like(x)
    m, args, kw = _normref_call(method, x, w, b, out=buf)
    tf("numba", lambda: m(*args, **kw), repeat)
    res = m.forward(*args)[1]
    tb("numba", lambda: m.backward(res, dy), repeat)
    # the same kernels' single-threaded builds (what a machine shared with other jobs may favour)
    from normref.backends.numba import config

    saved, config.SERIAL_BELOW = config.SERIAL_BELOW, 1 << 62
    try:
        tf("numba_1t", lambda: m(*args, **kw), repeat)
        tb("numba_1t", lambda: m.backward(res, dy), repeat)
    finally:
        config.SERIAL_BELOW = saved
    with normref.use_kernels(False):
        m, args, kw = _normref_call(method, x, w, b)
        tf("array_api", lambda: m(*args, **kw), max(3, repeat // 3))
        res_a = m.forward(*args)[1]
        tb("array_api", lambda: m.backward(res_a, dy), max(3, repeat // 3))
    res = res_a = None  # free the residuals before PyTorch's timings
    if use_torch:
        import torch

        f = _torch_fn(method, shape)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).permute(0, 3, 1, 2) \
            if layout == "channels-last" else torch.from_numpy(x)
        wt = torch.from_numpy(w)
        bt = None if b is None else torch.from_numpy(b)
        with torch.no_grad():
            tf("torch", lambda: f(xt, wt, bt), repeat)
        xr = xt.detach().clone(memory_format=torch.channels_last if layout == "channels-last" else torch.contiguous_format)
        xr.requires_grad_(True)
        wr = wt.clone().requires_grad_(True)
        br = None if bt is None else bt.clone().requires_grad_(True)
        y = f(xr, wr, br)
        gt = torch.from_numpy(dy.transpose(0, 2, 3, 1).copy()).permute(0, 3, 1, 2) if layout == "channels-last" \
            else torch.from_numpy(dy)
        inputs = tuple(t for t in (xr, wr, br) if t is not None)
        tb("torch", lambda: torch.autograd.grad(y, inputs, gt, retain_graph=True), repeat)
        del y
    return [fwd, bwd]


def _latency(fresh_process: bool = True) -> dict:
    """Tiny-input cost per call (8 × 16 layer norm) and the first call of a fresh process (warm cache)."""
    import normref

    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    normref.layer_norm(x, 16)
    n = 2000 if fresh_process else 200
    t = time.perf_counter()
    for _ in range(n):
        normref.layer_norm(x, 16)
    per_call = (time.perf_counter() - t) / n
    if not fresh_process:
        return {"tiny_layer_norm_per_call_s": per_call, "fresh_process_import_s": None,
                "fresh_process_first_call_s": None}
    code = ("import time, numpy as np; t0 = time.perf_counter(); import normref; t1 = time.perf_counter(); "
            "normref.layer_norm(np.ones((8, 16), np.float32), 16); t2 = time.perf_counter(); "
            "print(t1 - t0, t2 - t1)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    try:
        imp, first = (float(v) for v in r.stdout.split())
    except ValueError:
        imp = first = float("nan")
    return {"tiny_layer_norm_per_call_s": per_call, "fresh_process_import_s": imp, "fresh_process_first_call_s": first}


# --------------------------------------------------------------------------------------------------
# report


def _fmt_ms(t):
    return "—" if t is None else f"{t * 1e3:.2f}"


def _ratio_range(r: dict) -> tuple | None:
    """The speed-up torch/numba (medians) and a conservative interquartile range of it:
    (torch q1 / numba q3, torch q3 / numba q1)."""
    if not r.get("torch"):
        return None
    t, n = r["torch_spread"], r["numba_spread"]
    return r["torch"] / r["numba"], t["q1"] / n["q3"], t["q3"] / n["q1"]


def _evaluate(rows, bw, judge: bool = True) -> None:
    """Fill each row's bandwidth fractions, speed-up (with its IQR range) and target verdicts (none
    when not ``judge``: a smoke run's tiny shapes say nothing about the targets)."""
    for r in rows:
        fn = r["bytes"] / r["numba"] / bw
        ft = r["bytes"] / r["torch"] / bw if r.get("torch") else None
        rr = _ratio_range(r)
        speed = None if rr is None else rr[0]
        marks = []
        if r["large"]:
            marks.append(("BW≥60% " + ("✓" if fn >= TARGET_FRACTION else "✗")))
        st = _speed_target(r["method"], r["pass"], r["layout"]) if judge else None
        if st is not None and speed is not None:
            marks.append(f"≥{st:g}× " + ("✓" if speed >= st else "✗"))
        r.update(numba_fraction=fn, torch_fraction=ft, speedup=speed,
                 speedup_iqr=None if rr is None else [rr[1], rr[2]], speed_target=st,
                 targets_met=all(m.endswith("✓") for m in marks) if marks else None, marks=marks)


COLUMNS = ("method", "shape", "layout", "pass", "numba ms", "±IQR", "numba 1T ms", "array-API ms", "torch ms",
           "torch/numba", "numba BW", "torch BW", "targets")


def _cells(r) -> list:
    speed, ft = r.get("speedup"), r.get("torch_fraction")
    return [r["method"], "×".join(map(str, r["shape"])), r["layout"], r["pass"], _fmt_ms(r["numba"]),
            _fmt_ms(r["numba_spread"]["iqr"]), _fmt_ms(r.get("numba_1t")), _fmt_ms(r["array_api"]),
            _fmt_ms(r.get("torch")), "—" if speed is None else f"{speed:.2f}×", f"{r['numba_fraction']:.0%}",
            "—" if ft is None else f"{ft:.0%}", ", ".join(r["marks"])]


def _title(bw) -> str:
    return f"normref vs PyTorch CPU, float32, median of the repetitions (copy bandwidth {bw / 1e9:.1f} GB/s)"


def _table(rows, bw, console) -> None:
    from rich.table import Table

    tab = Table(title=_title(bw))
    for col in COLUMNS:
        tab.add_column(col, justify="right" if "ms" in col or "BW" in col or "/" in col or "±" in col else "left")
    for r in rows:
        tab.add_row(*_cells(r))
    console.print(tab)


def _plain_table(rows, bw, say) -> None:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    say(_title(bw))
    for k, c in enumerate(cells):
        say("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if k == 0:
            say("  ".join("-" * w for w in widths))


METHOD_NAMES = {"batch": "batch_norm", "instance": "instance_norm", "group": "group_norm", "layer": "layer_norm",
                "rms": "rms_norm"}


def _plot(rows, path: Path) -> None:
    """Speed-up over PyTorch (torch time / normref time, medians) on a log axis: one panel per method,
    per case a forward and a backward bar for the numba kernels and the array-API path; the error bars
    span (torch q1 / normref q3, torch q3 / normref q1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHOD_NAMES if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 4.6), sharey=True, squeeze=False)
    series = [("numba", "forward", "normref numba kernels, forward", "#1f77b4", None),
              ("numba", "backward", "normref numba kernels, backward", "#ff7f0e", None),
              ("array_api", "forward", "normref array-API path, forward", "#aec7e8", "//"),
              ("array_api", "backward", "normref array-API path, backward", "#ffbb78", "//")]
    width = 0.8 / len(series)
    for ax, m in zip(axes[0], methods):
        rs = [r for r in rows if r["method"] == m]
        cases = list(dict.fromkeys((tuple(r["shape"]), r["layout"]) for r in rs))
        for i, (key, pas, label, color, hatch) in enumerate(series):
            vals, lo, hi = [], [], []
            for shape, layout in cases:
                r = next(r for r in rs if tuple(r["shape"]) == shape and r["layout"] == layout and r["pass"] == pas)
                t, n = r["torch_spread"], r[key + "_spread"]
                v = r["torch"] / r[key]
                vals.append(v)
                lo.append(max(v - t["q1"] / n["q3"], 0.0))
                hi.append(max(t["q3"] / n["q1"] - v, 0.0))
            xs = np.arange(len(cases)) + (i - (len(series) - 1) / 2) * width
            # each bar grows from 1 (the same speed as PyTorch): up when faster, down when slower
            ax.bar(xs, np.asarray(vals) - 1.0, width, bottom=1.0, yerr=[lo, hi], capsize=2, color=color,
                   hatch=hatch, edgecolor="0.3", linewidth=0.5, label=label, error_kw={"elinewidth": 0.8})
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_title(METHOD_NAMES[m], fontsize=10)
        ax.set_xticks(np.arange(len(cases)))
        ax.set_xticklabels([f"{'×'.join(map(str, s))}\n{lay}" for s, lay in cases], fontsize=7, rotation=30,
                           ha="right")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("speed-up over PyTorch CPU (log; > 1: normref faster)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.suptitle("normref vs torch.nn.functional (float32; dashed: same speed; bars: medians, error bars: "
                 "interquartile range of the ratio)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _broken_pipe() -> None:
    raise BrokenPipeError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        from rich.console import Console
    except ImportError:  # rich is optional: plain lines and a plain table
        Console = None
    console = Console(width=max(Console().width, 160)) if Console is not None else None
    if console is not None:
        console.on_broken_pipe = _broken_pipe  # `normref bench | head`: the command line stops quietly

    def say(text: str, end: str = "\n") -> None:
        if console is not None:
            console.print(text, end=end, markup=False, highlight=False)
        else:
            print(text, end=end, flush=True)

    repeat = args.repeat or (3 if args.quick or args.smoke else 15)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    alloc = "glibc defaults (fresh pages)" if args.fresh_pages else _mallopt_reuse()
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            say("torch is not installed: no PyTorch columns and no speed-up plot (pip install 'normref[bench]')")
            use_torch = False
    import numba

    env = environment(args.threads if use_torch else None)
    say(f"{env['cpu_model']}, {env['cpu_count']} CPUs ({env['cpus_usable']} usable); threads: numba "
        f"{env['numba_threads']}, torch {args.threads if use_torch else '—'}; allocation: normref forward writes "
        f"into a reused out= buffer; normref backward and PyTorch allocate their outputs per call; {alloc}")
    t0 = time.perf_counter()
    stream = _stream((4 if args.smoke else 32 if args.quick else 256) << 20, repeat)
    bw = stream["copy"]
    say(f"STREAM ({stream['array_bytes'] >> 20} MiB float32 arrays): copy {stream['copy_parallel'] / 1e9:.1f} "
        f"GB/s ({stream['threads']} numba threads), {stream['copy_numpy'] / 1e9:.1f} GB/s (np.copyto, 1 "
        f"thread), sum {stream['sum'] / 1e9:.1f} GB/s; reference = the better copy, "
        f"{stream['copy'] / 1e9:.1f} GB/s (bytes read + written)")
    rng = np.random.default_rng(0)
    rows = []
    for method, shape, layout in _cases(args.quick, args.smoke):
        say(f"  {method} {shape} {layout} ...", end="")
        for r in _measure_case(method, shape, layout, repeat, use_torch, rng):
            r["large"] = not (args.quick or args.smoke)
            rows.append(r)
        say(" done")
    lat = _latency(fresh_process=not args.smoke)
    _evaluate(rows, bw, judge=not args.smoke)
    # the data first: a missing plotting library or a failing plot cannot lose the measurements
    report = {"environment": env, "stream": stream, "allocation": alloc, "repeat": repeat, "quick": args.quick,
              "smoke": args.smoke, "torch_threads": args.threads if use_torch else None, "latency": lat,
              "rows": rows, "numba_threads": numba.get_num_threads(), "cpu_count": os.cpu_count(),
              "timing": "seconds per call; each '<library>' value is the median over 'repeat' calls after one "
                        "warm-up, '<library>_spread' its min, quartiles, max and IQR"}
    js = out_dir / "bench.json"
    js.write_text(json.dumps(report, indent=1, default=float))
    say(f"wrote {js}")
    if console is not None:
        _table(rows, bw, console)
    else:
        _plain_table(rows, bw, say)
    first = lat["fresh_process_first_call_s"]
    say(f"tiny input (8×16 layer_norm): {lat['tiny_layer_norm_per_call_s'] * 1e6:.1f} µs per call "
        f"(target ≤ 20 µs)" + ("" if first is None else
                                f"; fresh process with a warm cache: import {lat['fresh_process_import_s']:.2f} s, "
                                f"first call {first:.2f} s (target ≤ 0.5 s)"))
    met = [r for r in rows if r.get("targets_met") is not None]
    say(f"targets met: {sum(r['targets_met'] for r in met)} of {len(met)} rows; "
        f"total time {time.perf_counter() - t0:.0f} s")
    png = out_dir / "bench.png"
    if not use_torch:
        say("plot skipped: the speed-up plot needs PyTorch's timings")
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say(f"plot skipped: matplotlib is not installed (pip install matplotlib, or 'normref[bench]'); "
            f"the numbers are in {js}")
        return 0
    _plot(rows, png)
    say(f"wrote {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
