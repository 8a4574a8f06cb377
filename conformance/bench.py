"""``normref bench``: the standardization family against PyTorch CPU and this machine's memory bandwidth.

    normref bench                  # the full run (several minutes on 2 cores)
    normref bench --quick          # small shapes, few repeats: a short run (a minute or two)
    normref bench --smoke          # tiny shapes: checks that it runs (seconds; its numbers mean nothing)
    normref bench --out DIR        # where bench.json and bench.png go (default: bench-out/)
    normref bench --compare old.json            # this run's medians over an earlier run's (new/old)
    normref bench --compare old.json --against new.json   # compare two runs without measuring
    normref bench --show bench-out/bench.json   # print a saved (or an interrupted run's) report
    normref bench --sections kernels,adapter --allocator reuse --max-bytes 64M --repeat 9
    normref bench --only 56x56,8192x1024,net   # only the rows whose name contains one of these

One run measures, on this machine and in this process (``--sections`` picks some):

- ``stream``: memory bandwidth, STREAM style: a parallel copy (read a, write b) and a parallel sum
  (read a) over float32 arrays of 256 MiB, far above the last-level cache; the reference
  bandwidth is the better of a 2-thread numba copy and NumPy's 1-thread copy (always measured:
  every row's bandwidth fraction is against it);
- ``kernels``: for batch, instance and group normalization on (32, 64, 56, 56) and
  (64, 256, 28, 28), NCHW and channels-last (for NumPy: an (N, H, W, C) array seen as an
  (N, C, H, W) view), and for layer and RMS normalization on (8192, 1024) rows, float32, forward
  and backward: normref with its numba kernels (parallel builds; "numba 1T": the same kernels'
  single-threaded builds), normref on the array-API path (``use_kernels(False)``), and
  ``torch.nn.functional`` with autograd's backward; the median time of each, its ratio to
  PyTorch's, and its effective bandwidth as a fraction of the measured copy bandwidth, counting
  the minimum traffic: forward reads x and writes y (8 bytes per float32 element), backward reads
  x (or x̂) and dy and writes dx (12 bytes per element);
- ``adapter`` and ``network`` (:mod:`.bench_torch`): the torch adapter's layers (``nt.BatchNorm2d``
  ...) against torch's own, forward and forward + backward, NCHW and channels-last, small shapes
  included; one training step of a small conv + BN network with either;
- ``scaling``: layer norm (rows of 1024) and batch norm ((N, 64, 64, 64)) forward + backward, normref's
  kernels on NumPy against torch, from 1 MiB to 512 MiB of input (doubling; ``--max-bytes`` caps
  it), each with its bandwidth fraction (20 bytes per element for forward + backward);
- ``under-load``: the kernels' parallel builds against their single-threaded builds, forward and
  backward, while ``--busy`` other processes (default 1) spin on the CPUs, as on a machine shared
  with another job (ratio 2-thread time / 1-thread time; the target: never above 1);
- ``overhead`` and ``first-call`` (:mod:`.bench_latency`): the per-call cost of an 8×16 layer norm
  (NumPy, and the torch adapter against torch), and the first calls of fresh processes with a cold
  (empty ``NUMBA_CACHE_DIR``) and a warm numba cache.

How it times (:mod:`.bench_timing`): the libraries of one comparison alternate within every
repetition (interleaved, the order rotated per repetition), after ``--warmup`` untimed calls of each
(default 1: compiles, fills caches, settles the allocator); each timing is summarized by its median
and spread (quartiles, IQR, IQR/median) and rows whose relative spread exceeds 10% are flagged
``noisy``; ratios between libraries are medians of the per-repetition (paired) ratios where both
were timed in the same repetitions. Both libraries allocate their outputs; ``--allocator both``
(the default; ``--quick``, ``--smoke``: reuse only) measures the kernels, adapter, network and
scaling sections twice: first with glibc's malloc defaults (large fresh outputs are page-faulted
at every call, which can cost more than the kernel), then with glibc's mmap and trim thresholds
raised (``mallopt``) so that freed blocks are reused, by both libraries alike (a ``mallopt``
cannot be undone, hence the order). ``rows`` in the JSON are the kernel rows of the reuse run (of
the only run with ``--allocator default``), and ``rows_default_allocator`` the default run's.

``bench.json`` (written first, and after every section with ``"complete": false`` so that an
interrupted run keeps what it measured) has every timing's spread over its repetitions (samples,
min, quartiles, median, max, IQR, IQR/median), the warm-up and repetition counts, the library
versions, the CPU model, the thread counts and a UTC timestamp; ``targets_summary`` counts the rows
meeting their targets per section, and ``noisy_rows`` names the rows too noisy to judge. ``bench.png`` (when matplotlib is installed)
shows the kernels' speed-up over PyTorch on a log axis, one panel per method, forward and backward,
with error bars from the quartiles of both timings. Without rich the table is printed as plain
text; without matplotlib the plot is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .bench_timing import (NOISY, compare, compare_lines, decide, environment, interleaved, is_noisy,
                           load_report, paired_quartiles, paired_ratio, set_allocator, spread)

__all__ = ["main", "spread", "environment", "SECTIONS"]

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
    # any other row: at least as fast as PyTorch ("every row ≤ 1.0× torch's time")
    return SPEED_TARGETS.get((method, pas, layout), SPEED_TARGETS.get((method, pas), 1.0))


# forward + backward time of the kernels over PyTorch's, per case: ≤ 0.6 for these, ≤ 1.0 otherwise
FWD_BWD_TARGETS = {("batch", "NCHW"): 0.6, ("instance", "NCHW"): 0.6, ("instance", "channels-last"): 0.6,
                   ("rms", "rows"): 0.6}


def kernel_fwd_bwd(rows: list, judge: bool) -> list:
    """Per kernel case, (numba forward + backward) / (torch forward + backward), medians, and the
    same from the paired repetitions (forward and backward samples of repetition *i* summed)."""
    out = []
    cases = list(dict.fromkeys((r["method"], tuple(r["shape"]), r["layout"]) for r in rows))
    for method, shape, layout in cases:
        f, b = (next(r for r in rows if (r["method"], tuple(r["shape"]), r["layout"], r["pass"]) ==
                     (method, shape, layout, p)) for p in ("forward", "backward"))
        if not f.get("torch"):
            continue
        ratio = (f["numba"] + b["numba"]) / (f["torch"] + b["torch"])
        sn = [x + y for x, y in zip(f["numba_spread"]["samples"], b["numba_spread"]["samples"])]
        st = [x + y for x, y in zip(f["torch_spread"]["samples"], b["torch_spread"]["samples"])]
        target = FWD_BWD_TARGETS.get((method, layout), 1.0)
        q = paired_quartiles(spread(sn), spread(st))
        out.append({"method": method, "shape": list(shape), "layout": layout, "ratio": ratio,
                    "noisy": bool(f["noisy"] or b["noisy"]), "ratio_paired": q[1], "ratio_paired_iqr": [q[0], q[2]],
                    "target": target, "target_met": decide(q, target) if judge else None})
    return out


SECTIONS = ("kernels", "adapter", "network", "scaling", "under-load", "overhead", "first-call")


def _bytes(text: str) -> int:
    """``512M``, ``1G``, ``64k`` or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        v = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M, 1G or 65536; got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size; got {text!r}")
    return v


def _sections(text: str) -> tuple:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"sections are a comma-separated subset of {', '.join(SECTIONS)}; "
                                         f"got {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normref bench", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="The other benchmarks: normref bench sync --help (synchronized batch statistics on gloo "
        "processes), normref bench whitening --help (batch whitening against the matmul speed).")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a minute or two)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 3 repeats, no fresh-process latency: checks that the benchmark runs "
                   "(seconds; its numbers mean nothing)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png (default: bench-out)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed repetitions per measurement (default 15; 3 with --quick or --smoke)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls of each function before its repetitions (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: this machine's cores)")
    p.add_argument("--numba-threads", type=int, default=None,
                   help="numba.set_num_threads for the kernels (default: numba's, NUMBA_NUM_THREADS or the cores)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch (no ratios, no adapter/network rows)")
    p.add_argument("--sections", type=_sections, default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; --smoke: all but "
                   "first-call)")
    p.add_argument("--allocator", choices=("both", "default", "reuse"), default=None,
                   help="glibc malloc policy of the kernels, adapter, network and scaling sections: its "
                   "defaults, heap reuse (mallopt), or both, defaults first (default: both; reuse with --quick "
                   "or --smoke)")
    p.add_argument("--fresh-pages", action="store_true", help="the same as --allocator default")
    p.add_argument("--max-bytes", type=_bytes, default=None, metavar="SIZE",
                   help="largest input of the scaling section, e.g. 64M (default 512M; 16M with --quick, "
                   "256k with --smoke)")
    p.add_argument("--first-call", choices=("off", "tiny", "one", "all"), default=None,
                   help="fresh-process first calls: none, the tiny call only, layer_norm (default), or all "
                   "five methods (--smoke: off)")
    p.add_argument("--only", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=None,
                   metavar="TEXT,...", help="measure only the rows whose name contains one of these (e.g. "
                   "'56x56,8192x1024,net': the (32, 64, 56, 56) and (8192, 1024) cases and the network)")
    p.add_argument("--busy", type=int, default=1,
                   help="competing busy processes of the under-load section (default 1)")
    p.add_argument("--inner", type=int, default=None,
                   help="calls per sample of the per-call overhead rows (default 200; 20 with --smoke)")
    p.add_argument("--no-plot", action="store_true", help="do not draw bench.png")
    p.add_argument("--show", metavar="REPORT", default=None,
                   help="print the tables of a saved bench.json (or its folder; a partial one too) without measuring")
    p.add_argument("--compare", metavar="OLD", default=None,
                   help="an earlier bench.json (or its folder): print this run's medians over its (new/old)")
    p.add_argument("--against", metavar="NEW", default=None,
                   help="with --compare: compare this bench.json with OLD instead of measuring")
    return p


# --------------------------------------------------------------------------------------------------
# timing and bandwidth (the machinery is in bench_timing; ``spread`` and ``environment`` kept here)

def _stream(nbytes: int, repeat: int) -> dict:
    """STREAM-style copy and sum bandwidth (bytes/s) with numba's thread pool, float32."""
    import numba

    from .bench_stream import copy, total

    n = nbytes // 4
    a = np.ones(n, np.float32)
    b = np.zeros(n, np.float32)
    # np.copyto: one thread, NumPy's own copy loop; the three interleaved like every comparison here
    t = interleaved({"copy": lambda: copy(a, b), "sum": lambda: total(a), "copy_numpy": lambda: np.copyto(b, a)},
                    repeat, warmup=1)
    t_copy, t_sum, t_np = (t[k]["median"] for k in ("copy", "sum", "copy_numpy"))
    copy_bw = max(2 * nbytes / t_copy, 2 * nbytes / t_np)
    return {"array_bytes": nbytes, "copy_parallel": 2 * nbytes / t_copy, "copy_numpy": 2 * nbytes / t_np,
            "copy": copy_bw, "sum": nbytes / t_sum, "threads": numba.get_num_threads(), "timings": t}


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


def case_id(method: str, shape, layout: str) -> str:
    """The name of a kernel case, as ``--only`` matches it: ``batch_norm 32x64x56x56 NCHW``."""
    return f"{METHOD_NAMES[method]} {'x'.join(map(str, shape))} {layout}"


def _keeper(only: Sequence[str] | None) -> Callable[[str], bool]:
    return (lambda name: True) if not only else (lambda name: any(o in name for o in only))


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


def _measure_case(method, shape, layout, repeat, use_torch, rng, warmup: int = 1,
                  array_api: bool = True) -> list[dict]:
    """The forward and the backward row of one kernel case: every library's forward and backward
    timed in one :func:`interleaved` call (each library allocating its outputs), the array-API path
    (several times slower) in the first third of the repetitions (at least 3; none without
    ``array_api``)."""
    import normref
    from normref.backends.numba import config

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

    m, args, kw = _normref_call(method, x, w, b)
    res = m.forward(*args)[1]
    if array_api:
        with normref.use_kernels(False):
            res_a = m.forward(*args)[1]

    def serial(f):
        # the same kernels' single-threaded builds (what a machine shared with other jobs may favour)
        def g():
            saved, config.SERIAL_BELOW = config.SERIAL_BELOW, 1 << 62
            try:
                return f()
            finally:
                config.SERIAL_BELOW = saved

        return g

    def formula(f):
        def g():
            with normref.use_kernels(False):
                return f()

        return g

    fns = {"numba_forward": lambda: m(*args, **kw), "numba_backward": lambda: m.backward(res, dy)}
    fns["numba_1t_forward"] = serial(fns["numba_forward"])
    fns["numba_1t_backward"] = serial(fns["numba_backward"])
    if array_api:
        fns["array_api_forward"] = formula(lambda: m(*args, **kw))
        fns["array_api_backward"] = formula(lambda: m.backward(res_a, dy))
    if use_torch:
        import torch

        f = _torch_fn(method, shape)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).permute(0, 3, 1, 2) \
            if layout == "channels-last" else torch.from_numpy(x)
        wt = torch.from_numpy(w)
        bt = None if b is None else torch.from_numpy(b)

        def torch_forward():
            with torch.no_grad():
                return f(xt, wt, bt)

        xr = xt.detach().clone(memory_format=torch.channels_last if layout == "channels-last" else torch.contiguous_format)
        xr.requires_grad_(True)
        wr = wt.clone().requires_grad_(True)
        br = None if bt is None else bt.clone().requires_grad_(True)
        y = f(xr, wr, br)
        gt = torch.from_numpy(dy.transpose(0, 2, 3, 1).copy()).permute(0, 3, 1, 2) if layout == "channels-last" \
            else torch.from_numpy(dy)
        inputs = tuple(t for t in (xr, wr, br) if t is not None)
        fns["torch_forward"] = torch_forward
        fns["torch_backward"] = lambda: torch.autograd.grad(y, inputs, gt, retain_graph=True)
    slow = max(3, repeat // 3)
    t = interleaved(fns, repeat, warmup, repeats={"array_api_forward": slow, "array_api_backward": slow})
    for row, pas in ((fwd, "forward"), (bwd, "backward")):
        for lib in ("numba", "numba_1t", "array_api", "torch"):
            st = t.get(f"{lib}_{pas}")
            if st is not None:
                row[lib] = st["median"]
                row[lib + "_spread"] = st
        row["ratio_paired"] = paired_ratio(row["numba_spread"], row["torch_spread"]) if use_torch else None
        row["rel_spread"] = max(row[k + "_spread"]["rel_iqr"] for k in ("numba", "numba_1t", "array_api", "torch")
                                if k + "_spread" in row)
        row["noisy"] = is_noisy(*(row.get(k + "_spread") for k in ("numba", "numba_1t", "array_api", "torch")))
    return [fwd, bwd]


# --------------------------------------------------------------------------------------------------
# scaling: layer norm and batch norm forward + backward from 1 MiB to 512 MiB


def scaling_sizes(max_bytes: int, min_bytes: int = 1 << 20) -> list:
    """Input sizes in bytes: 1 MiB, 2 MiB, ... doubling up to ``max_bytes`` (just ``max_bytes`` when
    it is below 1 MiB)."""
    if max_bytes < min_bytes:
        return [int(max_bytes)]
    out, n = [], min_bytes
    while n <= max_bytes:
        out.append(n)
        n *= 2
    return out


def _scaling_shape(method: str, nbytes: int) -> tuple:
    nel = max(nbytes // 4, 256)
    if method == "layer":  # rows of 1024 features (fewer when the input is tiny)
        d = min(1024, nel // 2)
        return (nel // d, d)
    per = 64 * 64 * 64  # batch norm: (N, 64, 64, 64), 1 MiB per sample; tiny inputs (2, 64, k, 1)
    return (nel // per, 64, 64, 64) if nel >= 2 * per else (2, 64, max(1, nel // 128), 1)


def measure_scaling(max_bytes: int, repeat: int, warmup: int, use_torch: bool, copy_bw: float, allocator: str,
                    say: Callable[..., None] = print, keep: Callable[[str], bool] | None = None) -> list:
    """The ``scaling`` rows: ``normref.vjp`` of layer norm and batch norm (NumPy, kernels) and
    ``torch.nn.functional`` + ``torch.autograd.grad``, forward + backward per repetition,
    interleaved; one input size at a time (the arrays of one size are freed before the next)."""
    import normref

    rows = []
    rng = np.random.default_rng(0)
    for nbytes in scaling_sizes(max_bytes):
        for method in ("layer", "batch"):
            shape = _scaling_shape(method, nbytes)
            cid = f"{METHOD_NAMES[method]} {'x'.join(map(str, shape))} ({nbytes / (1 << 20):g} MiB)"
            if keep is not None and not keep(cid):
                continue
            say(f"  scaling {cid} ...", end="")
            x = rng.standard_normal(shape, dtype=np.float32)
            dy = rng.standard_normal(shape, dtype=np.float32)
            pdim = shape[-1] if method == "layer" else shape[1]
            w = np.ones(pdim, np.float32)
            bias = np.zeros(pdim, np.float32)
            if method == "layer":
                margs = (normref.layer_norm, x, (shape[-1],), w, bias)
            else:
                margs = (normref.batch_norm, x, None, None, w, bias, True)

            def normref_step(margs=margs, dy=dy):
                _, pb = normref.vjp(*margs)
                return pb(dy)

            fns = {"normref": normref_step}
            if use_torch:
                import torch

                f = _torch_fn(method, shape)
                xt = torch.from_numpy(x).requires_grad_(True)
                wt = torch.from_numpy(w).requires_grad_(True)
                bt = torch.from_numpy(bias).requires_grad_(True)
                gt = torch.from_numpy(dy)

                def torch_step(f=f, xt=xt, wt=wt, bt=bt, gt=gt):
                    return torch.autograd.grad(f(xt, wt, bt), (xt, wt, bt), gt)

                fns["torch"] = torch_step
            # big inputs: fewer repetitions (each one is a pass over hundreds of MiB)
            reps = repeat if nbytes <= 64 << 20 else max(3, repeat // 3)
            t = interleaved(fns, reps, warmup)
            nel = x.size
            row = {"id": cid, "method": METHOD_NAMES[method], "shape": list(shape), "bytes": int(x.nbytes),
                   "allocator": allocator, "timings": t, "noisy": is_noisy(*t.values()),
                   "normref_fraction": 20 * nel / t["normref"]["median"] / copy_bw}
            if use_torch:
                row["torch_fraction"] = 20 * nel / t["torch"]["median"] / copy_bw
                row["ratio"] = paired_ratio(t["normref"], t["torch"])
            rows.append(row)
            del fns, x, dy
            say(" done")
    return rows


# --------------------------------------------------------------------------------------------------
# threads under load: the 2-thread kernels against their 1-thread builds with a competing process

BUSY_CAP_S = 1800.0  # the competing process stops by itself after this long, whatever happens here


def measure_under_load(size: str, repeat: int, warmup: int, busy: int = 1,
                       say: Callable[..., None] = print, keep: Callable[[str], bool] | None = None) -> list:
    """The ``under_load`` rows: per kernel case, the parallel kernels (numba's pool) and their
    single-threaded builds, forward and backward, interleaved, while ``busy`` other processes spin
    on the CPUs (a machine shared with another job); the ratio is 2-thread time / 1-thread time
    (paired; > 1: the threads lose to one thread: static partitioning waits for a preempted one)."""
    code = f"import time\nend = time.monotonic() + {BUSY_CAP_S}\nwhile time.monotonic() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(max(1, busy))]
    rows = []
    try:
        rng = np.random.default_rng(1)
        for method, shape, layout in _cases(size == "quick", size == "smoke"):
            cid = case_id(method, shape, layout)
            if keep is not None and not keep(cid):
                continue
            say(f"  under load ({len(procs)} busy process) {cid} ...", end="")
            fwd, bwd = _measure_case(method, shape, layout, repeat, False, rng, warmup, array_api=False)
            t = {"2t_forward": fwd["numba_spread"], "1t_forward": fwd["numba_1t_spread"],
                 "2t_backward": bwd["numba_spread"], "1t_backward": bwd["numba_1t_spread"]}
            rows.append({"id": cid, "method": method, "shape": list(shape), "layout": layout, "busy_processes": busy,
                         "timings": t, "ratio_forward": paired_ratio(t["2t_forward"], t["1t_forward"]),
                         "ratio_backward": paired_ratio(t["2t_backward"], t["1t_backward"]),
                         "noisy": is_noisy(*t.values())})
            say(" done")
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    return rows


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
           "torch/numba", "numba BW", "torch BW", "spread", "targets")


def _cells(r) -> list:
    speed, ft = r.get("speedup"), r.get("torch_fraction")
    return [r["method"], "×".join(map(str, r["shape"])), r["layout"], r["pass"], _fmt_ms(r["numba"]),
            _fmt_ms(r["numba_spread"]["iqr"]), _fmt_ms(r.get("numba_1t")), _fmt_ms(r["array_api"]),
            _fmt_ms(r.get("torch")), "—" if speed is None else f"{speed:.2f}×", f"{r['numba_fraction']:.0%}",
            "—" if ft is None else f"{ft:.0%}", _spread_cell(r.get("rel_spread")), ", ".join(r["marks"])]


def _spread_cell(rel: float | None) -> str:
    """The largest relative spread (IQR / median) of a row's timings, flagged above :data:`NOISY`."""
    if rel is None:
        return "—"
    return f"{rel:.0%}" + (" NOISY" if rel > NOISY else "")


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


# --------------------------------------------------------------------------------------------------
# the other sections' tables and targets (issue 18's targets; ratios are normref time / torch time)

ADAPTER_TARGET, ADAPTER_SMALL_TARGET, NETWORK_TARGET = 1.0, 1.5, 1.05
SMALL_ELEMENTS = 1 << 17  # "small shapes": below this many elements the ≤ 1.5× target applies
OVERHEAD_NUMPY_TARGET_S, OVERHEAD_ADAPTER_TARGET_S = 10e-6, 30e-6
FIRST_CALL_COLD_TARGET_S, FIRST_CALL_WARM_TARGET_S = 3.0, 0.3


def _verdict_mark(met: bool | None, target: float, judge: bool, unit: str = "×") -> str:
    """The mark of a :func:`~normref.conformance.bench_timing.decide` verdict: ✓, ✗, or ``?`` when
    the target lies within the interquartile range of the paired figure (the noise could flip it)."""
    if not judge:
        return ""
    return f"≤{target:g}{unit} " + {True: "✓", False: "✗", None: "? (within the spread)"}[met]


def _ms(s: dict | None) -> str:
    return "—" if s is None else f"{s['median'] * 1e3:.3f}"


def _us(v: float | None) -> str:
    return "—" if v is None else f"{v * 1e6:.1f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _text_table(say, title: str, header: Sequence[str], body: list) -> None:
    cells = [list(header)] + [[str(c) for c in row] for row in body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    say(title)
    for k, c in enumerate(cells):
        say("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if k == 0:
            say("  ".join("-" * w for w in widths))


def _judge_adapter(rows: list, judge: bool) -> None:
    for r in rows:
        target = ADAPTER_SMALL_TARGET if r["elements"] < SMALL_ELEMENTS else ADAPTER_TARGET
        r["target_ratio_step"] = target
        q = paired_quartiles(r["timings"]["normref_step"], r["timings"]["torch_step"])
        r["ratio_step_iqr"] = None if q is None else [q[0], q[2]]
        r["target_met"] = decide(q, target) if judge else None
        r["mark"] = _verdict_mark(r["target_met"], target, judge)


def _print_adapter(say, rows: list, allocator: str) -> None:
    body = [[r["id"], _ms(r["timings"]["normref_forward"]), _ms(r["timings"]["torch_forward"]),
             _ratio(r["ratio_forward"]), _ms(r["timings"]["normref_step"]), _ms(r["timings"]["torch_step"]),
             _ratio(r["ratio_step"]), f"{r.get('normref_fraction', 0):.0%}", f"{r.get('torch_fraction', 0):.0%}",
             _spread_cell(max(s["rel_iqr"] for s in r["timings"].values())), r["mark"]] for r in rows]
    _text_table(say, f"torch adapter's layers (nt.*) vs torch.nn, training mode, float32 [{allocator} allocator]; "
                f"ratio = normref time / torch time (paired medians)",
                ("layer, input, layout", "nt fwd ms", "torch fwd ms", "fwd ratio", "nt fwd+bwd ms", "torch fwd+bwd ms",
                 "fwd+bwd ratio", "nt BW", "torch BW", "spread", "target"), body)


def _print_network(say, rows: list, allocator: str, judge: bool) -> None:
    body = []
    for r in rows:
        q = paired_quartiles(r["timings"]["normref_step"], r["timings"]["torch_step"])
        r["ratio_step_iqr"] = None if q is None else [q[0], q[2]]
        r["target_met"] = decide(q, NETWORK_TARGET) if judge else None
        r["mark"] = _verdict_mark(r["target_met"], NETWORK_TARGET, judge)
        body.append([r["id"], _ms(r["timings"]["normref_step"]), _ms(r["timings"]["torch_step"]),
                     _ratio(r["ratio_step"]), _spread_cell(max(s["rel_iqr"] for s in r["timings"].values())),
                     r["mark"]])
    _text_table(say, f"training step (SGD) of a small conv+BN network, nt.BatchNorm2d vs torch.nn.BatchNorm2d "
                f"[{allocator} allocator]", ("network, input, layout", "nt ms", "torch ms", "ratio", "spread",
                                             "target"), body)


def _print_scaling(say, rows: list, allocator: str) -> None:
    body = [[r["id"], _ms(r["timings"]["normref"]), _ms(r["timings"].get("torch")), _ratio(r.get("ratio")),
             f"{r['normref_fraction']:.0%}", "—" if r.get("torch_fraction") is None else f"{r['torch_fraction']:.0%}",
             _spread_cell(max(s["rel_iqr"] for s in r["timings"].values()))] for r in rows]
    _text_table(say, f"scaling: forward + backward, normref kernels (NumPy, normref.vjp) vs torch "
                f"[{allocator} allocator]; BW: 20 bytes/element over the copy bandwidth",
                ("method, input", "normref ms", "torch ms", "ratio", "normref BW", "torch BW", "spread"), body)


def _print_under_load(say, rows: list, judge: bool) -> None:
    body = []
    for r in rows:
        t = r["timings"]
        v = [decide(paired_quartiles(t[f"2t_{p}"], t[f"1t_{p}"]), 1.0) for p in ("forward", "backward")]
        met = False if False in v else None if None in v else True
        r["target_met"] = met if judge else None
        body.append([r["id"], _ms(t["2t_forward"]), _ms(t["1t_forward"]), _ratio(r["ratio_forward"]),
                     _ms(t["2t_backward"]), _ms(t["1t_backward"]), _ratio(r["ratio_backward"]),
                     _spread_cell(max(s["rel_iqr"] for s in t.values())),
                     _verdict_mark(met, 1.0, judge)])
    _text_table(say, f"numba kernels under load ({rows[0]['busy_processes']} competing busy process): parallel "
                "builds vs single-threaded builds; ratio = 2-thread time / 1-thread time (paired)",
                ("case", "2T fwd ms", "1T fwd ms", "fwd ratio", "2T bwd ms", "1T bwd ms", "bwd ratio", "spread",
                 "target"), body)


def _print_overhead(say, rows: list, judge: bool) -> None:
    body = []
    for r in rows:
        t = r["timings"]
        if "normref_numpy" in t:
            v = t["normref_numpy"]["median"]
            r["target_met"] = decide(paired_quartiles(t["normref_numpy"], None), OVERHEAD_NUMPY_TARGET_S) \
                if judge else None
            body.append([r["id"], "normref.layer_norm", _us(v), _spread_cell(t["normref_numpy"]["rel_iqr"]),
                         _verdict_mark(r["target_met"], OVERHEAD_NUMPY_TARGET_S * 1e6, judge, " µs")])
            body.append([r["id"], "the same formula in plain NumPy", _us(t["numpy_formula"]["median"]),
                         _spread_cell(t["numpy_formula"]["rel_iqr"]), ""])
        else:
            ov = r["adapter_overhead_fwd_bwd_s"]
            q = paired_quartiles(t["adapter_fwd_bwd"], t["torch_fwd_bwd"], "difference")
            # a negative overhead means the reference call was disturbed (load): no verdict from it
            r["target_met"] = decide(q, OVERHEAD_ADAPTER_TARGET_S) if judge and q and q[0] >= 0 else None
            for key, label in (("torch_forward", "F.layer_norm (autograd recording)"),
                               ("adapter_forward", "nt.layer_norm (adapter)"),
                               ("plain_normref_on_torch", "normref.layer_norm(torch tensor)"),
                               ("torch_fwd_bwd", "F.layer_norm fwd+bwd"), ("adapter_fwd_bwd", "nt.layer_norm fwd+bwd")):
                body.append([r["id"], label, _us(t[key]["median"]), _spread_cell(t[key]["rel_iqr"]), ""])
            body.append([r["id"], "adapter overhead, forward (nt − F, paired)", _us(r["adapter_overhead_forward_s"]), "", ""])
            body.append([r["id"], "adapter overhead, fwd+bwd (nt − F, paired)", _us(ov), "",
                         _verdict_mark(r["target_met"], OVERHEAD_ADAPTER_TARGET_S * 1e6, judge, " µs")])
    _text_table(say, "per-call cost, 8×16 float32 layer norm (µs per call, median of interleaved samples)",
                ("case", "call", "µs", "spread", "target"), body)


def _print_first_call(say, fc: dict, judge: bool) -> None:
    keys = [k for k in (fc.get("warm") or {}) if k.endswith("_s")] or [k for k in (fc.get("cold") or {})
                                                                       if k.endswith("_s")]
    body = [[k.removesuffix("_s").replace("_", " "), f"{fc['cold'].get(k, float('nan')):.3f}",
             f"{fc['warm'].get(k, float('nan')):.3f}"] for k in keys]
    for cache in ("cold", "warm"):
        if "error" in fc[cache]:
            say(f"first call ({cache} cache) failed: {fc[cache]['error']}")
    _text_table(say, "first calls of a fresh process (seconds): cold = empty NUMBA_CACHE_DIR, warm = the same "
                "folder after the cold run", ("what", "cold s", "warm s"), body)
    verdicts = {}
    for cache, target in (("cold", FIRST_CALL_COLD_TARGET_S), ("warm", FIRST_CALL_WARM_TARGET_S)):
        v = fc[cache].get("layer_norm_first_fwd_bwd_s")
        if v is not None and judge:
            verdicts[f"{cache} layer_norm first fwd+bwd ≤ {target:g} s"] = v <= target
    for cache in ("cold", "warm"):
        if "numba_imported_by_tiny_call" in fc[cache]:
            verdicts[f"tiny input does not import numba ({cache})"] = not fc[cache]["numba_imported_by_tiny_call"]
    fc["targets"] = verdicts
    for k, ok in verdicts.items():
        say(f"  {k}: {'✓' if ok else '✗'}")


def _targets_summary(report: dict) -> dict:
    """``{section: [rows meeting their target, rows decided, rows undecided]}`` (undecided: the
    target lies within the spread of the figure; a smoke run judges nothing)."""
    out: dict = {}
    if report.get("smoke"):
        return out

    def count(name, flags):
        if flags:
            out[name] = [sum(f is True for f in flags), sum(f is not None for f in flags),
                         sum(f is None for f in flags)]

    count("kernels", [r.get("targets_met") for r in report.get("rows") or ()])
    count("kernels fwd+bwd", [r.get("target_met") for rs in (report.get("kernel_fwd_bwd") or {}).values() for r in rs])
    for section in ("adapter", "network", "under_load", "overhead"):
        count(section, [r.get("target_met") for r in report.get(section) or ()])
    count("first-call", list(((report.get("first_call") or {}).get("targets") or {}).values()))
    return out


def _noisy_ids(report: dict) -> list:
    out = []
    for key in ("rows", "rows_default_allocator"):
        for r in report.get(key) or ():
            if r.get("noisy"):
                out.append(f"{key} {r['method']} {'x'.join(map(str, r['shape']))} {r['layout']} {r['pass']}")
    for section in ("adapter", "network", "scaling", "under_load", "overhead"):
        for r in report.get(section) or ():
            if r.get("noisy"):
                out.append(f"{section}[{r.get('allocator', '-')}] {r['id']}")
    return out


def print_report(report: dict, say: Callable[..., None] = print, console=None) -> None:
    """Print the tables of a ``bench.json`` (complete or partial); fills the rows' target verdicts."""
    judge = not report.get("smoke")
    bw = report["stream"]["copy"]
    kernel_rows = {report.get("allocator_rows", "reuse"): report.get("rows") or []}
    if report.get("rows_default_allocator"):
        kernel_rows["default"] = report["rows_default_allocator"]
    fbs = report.setdefault("kernel_fwd_bwd", {})
    allocators = report.get("allocators") or {}
    for phase in allocators:
        if kernel_rows.get(phase):
            say(f"[{phase} allocator] {allocators[phase]}")
            if console is not None:
                _table(kernel_rows[phase], bw, console)
            else:
                _plain_table(kernel_rows[phase], bw, say)
            fb = fbs.setdefault(phase, kernel_fwd_bwd(kernel_rows[phase], judge))
            _text_table(say, f"kernels, forward + backward: numba time / torch time [{phase} allocator]",
                        ("method", "shape", "layout", "ratio (medians)", "ratio (paired)", "target"),
                        [[r["method"], "x".join(map(str, r["shape"])), r["layout"], _ratio(r["ratio"]),
                          _ratio(r["ratio_paired"]), _verdict_mark(r["target_met"], r["target"], judge)]
                         for r in fb])
    for phase in allocators:
        for key, show in (("adapter", lambda rs: _print_adapter(say, rs, phase)),
                          ("network", lambda rs: _print_network(say, rs, phase, judge)),
                          ("scaling", lambda rs: _print_scaling(say, rs, phase))):
            rs = [r for r in report.get(key) or () if r["allocator"] == phase]
            if rs:
                if key == "adapter":
                    _judge_adapter(rs, judge)
                show(rs)
    if report.get("under_load"):
        _print_under_load(say, report["under_load"], judge)
    if report.get("overhead"):
        _print_overhead(say, report["overhead"], judge)
    if report.get("first_call"):
        _print_first_call(say, report["first_call"], judge)
    ids = report.get("noisy_rows") or _noisy_ids(report)
    if ids:
        say(f"NOISY (relative spread > {NOISY:.0%}; their ratios are not reliable at that level): {len(ids)} rows: "
            + "; ".join(ids[:8]) + ("" if len(ids) <= 8 else f"; ... (all {len(ids)} in bench.json's noisy_rows)"))
    if not report.get("complete", True):
        say("(an incomplete report: the run stopped before its end; the sections above are those it finished)")


def main(argv: Sequence[str] | None = None) -> int:
    """``normref bench``: measure, print the tables, write ``bench.json`` (and ``bench.png``); or, with
    ``--compare OLD --against NEW``, only compare two reports. Returns the exit status (0)."""
    p = _parser()
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.against and not args.compare:
        p.error("--against NEW needs --compare OLD")
    if args.show:
        try:
            shown = load_report(args.show)
        except (OSError, ValueError) as e:
            p.error(f"--show: cannot read the report: {e}")
        print_report(shown, print)
        return 0
    try:
        old = load_report(args.compare) if args.compare else None
        if args.against:
            for line in compare_lines(compare(old, load_report(args.against)), args.compare, args.against):
                print(line)
            return 0
    except (OSError, ValueError) as e:  # a missing or unreadable report: a usage error, before measuring
        p.error(f"--compare/--against: cannot read the report: {e}")
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

    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeat = args.repeat or (3 if size != "full" else 15)
    warmup = max(0, args.warmup)
    judge = size != "smoke"  # a smoke run's tiny shapes say nothing about the targets
    sections = args.sections or tuple(s for s in SECTIONS if not (size == "smoke" and s == "first-call"))
    max_bytes = args.max_bytes or {"full": 512 << 20, "quick": 16 << 20, "smoke": 256 << 10}[size]
    first_mode = args.first_call or ("off" if size == "smoke" else "one")
    inner = args.inner or (20 if size == "smoke" else 200)
    # --quick and --smoke: reuse only (their small outputs stay under glibc's dynamic mmap threshold, so
    # the default allocator's figures would repeat the reuse ones at twice the run time)
    allocator = "default" if args.fresh_pages else args.allocator or ("both" if size == "full" else "reuse")
    phases = ["default", "reuse"] if allocator == "both" else [allocator]
    keep = _keeper(args.only)
    import numba

    if args.numba_threads:
        try:
            numba.set_num_threads(args.numba_threads)
        except ValueError as e:  # more than numba's pool (NUMBA_NUM_THREADS)
            p.error(f"--numba-threads: {e}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            say("torch is not installed: no PyTorch columns and no speed-up plot (pip install 'normref[bench]')")
            use_torch = False
    if not use_torch:
        sections = tuple(s for s in sections if s not in ("adapter", "network"))
    env = environment(args.threads if use_torch else None)
    say(f"{env['cpu_model']}, {env['cpu_count']} CPUs ({env['cpus_usable']} usable); threads: numba "
        f"{env['numba_threads']}, torch {args.threads if use_torch else '—'}; load average "
        f"{env['load_average_1min'] or 0:.2f}; {repeat} interleaved repetitions after {warmup} warm-up call(s); "
        f"sections: {', '.join(sections)}; allocator: {' then '.join(phases)}")
    t0 = time.perf_counter()
    stream = _stream((4 if size == "smoke" else 32 if size == "quick" else 256) << 20, repeat)
    bw = stream["copy"]
    say(f"STREAM ({stream['array_bytes'] >> 20} MiB float32 arrays): copy {stream['copy_parallel'] / 1e9:.1f} "
        f"GB/s ({stream['threads']} numba threads), {stream['copy_numpy'] / 1e9:.1f} GB/s (np.copyto, 1 "
        f"thread), sum {stream['sum'] / 1e9:.1f} GB/s; reference = the better copy, "
        f"{stream['copy'] / 1e9:.1f} GB/s (bytes read + written)")
    rng = np.random.default_rng(0)
    allocators, kernel_rows = {}, {}
    adapter, network, scaling, overhead_rows, under_load = [], [], [], [], []
    first = None
    js = out_dir / "bench.json"

    def snapshot(complete: bool) -> dict:
        """The report of what has been measured so far (``complete``: the run has ended)."""
        main_phase = list(allocators)[-1] if allocators else "default"
        tiny = next((r["timings"]["normref_numpy"]["median"] for r in overhead_rows
                     if "normref_numpy" in r["timings"]), None)
        warm = (first or {}).get("warm") or {}
        lat = {"tiny_layer_norm_per_call_s": tiny, "fresh_process_import_s": warm.get("import_normref_s"),
               "fresh_process_first_call_s": warm.get("tiny_layer_norm_first_call_s")}
        return {"complete": complete, "environment": env, "stream": stream, "allocation": allocators.get(main_phase),
                "allocators": dict(allocators), "allocator_rows": main_phase, "repeat": repeat, "warmup": warmup,
                "interleaved": True, "noisy_threshold": NOISY, "quick": args.quick, "smoke": args.smoke,
                "size": size, "sections": list(sections), "only": list(args.only or ()), "max_bytes": max_bytes,
                "torch_threads": args.threads if use_torch else None, "latency": lat,
                "rows": kernel_rows.get(main_phase, []),
                "rows_default_allocator": kernel_rows.get("default") if main_phase != "default" else None,
                "adapter": adapter, "network": network, "scaling": scaling, "overhead": overhead_rows,
                "under_load": under_load,
                "first_call": first, "numba_threads": numba.get_num_threads(), "cpu_count": os.cpu_count(),
                "timing": "seconds per call; every timing is the spread of 'repeat' interleaved repetitions after "
                          "'warmup' untimed calls (samples, min, quartiles, median, max, IQR, rel_iqr = "
                          "IQR/median); kernel rows: '<library>' is the median, '<library>_spread' its spread; "
                          "other sections: 'timings' {library: spread}; ratios are normref/torch medians of paired "
                          "repetitions except 'speedup' (torch/numba, ratio of medians)"}

    def save_partial() -> None:
        # after every section: an interrupted long run keeps what it measured ("complete": false)
        js.write_text(json.dumps(snapshot(False), indent=1, default=float))

    for phase in phases:
        desc = set_allocator(phase)
        if desc.startswith("unavailable"):
            say(f"allocator reuse {desc}: only the default allocator's figures")
            if "default" in allocators:
                continue
            phase, desc = "default", set_allocator("default")
        allocators[phase] = desc
        say(f"[{phase} allocator] {desc}")
        if "kernels" in sections:
            rows = []
            for method, shape, layout in _cases(size == "quick", size == "smoke"):
                if not keep(case_id(method, shape, layout)):
                    continue
                say(f"  {method} {shape} {layout} ...", end="")
                for r in _measure_case(method, shape, layout, repeat, use_torch, rng, warmup):
                    r["large"] = size == "full"
                    r["allocator"] = phase
                    rows.append(r)
                say(" done")
            _evaluate(rows, bw, judge=judge)
            kernel_rows[phase] = rows
            save_partial()
        if "adapter" in sections:
            from .bench_torch import measure_adapter

            rs = measure_adapter(size, repeat, warmup, bw, phase, say, keep)
            _judge_adapter(rs, judge)
            adapter += rs
            save_partial()
        if "network" in sections:
            from .bench_torch import measure_network

            network += measure_network(size, repeat, warmup, phase, say, keep)
            save_partial()
        if "scaling" in sections:
            scaling += measure_scaling(max_bytes, repeat, warmup, use_torch, bw, phase, say, keep)
            save_partial()
    if "under-load" in sections:
        under_load += measure_under_load(size, repeat, warmup, args.busy, say, keep)
        save_partial()
    if "overhead" in sections:
        from .bench_latency import overhead

        overhead_rows += overhead(repeat, warmup, inner, use_torch, say)
        save_partial()
    if "first-call" in sections and first_mode != "off":
        from .bench_latency import first_call

        say(f"  first calls in fresh processes ({first_mode}; the cold one compiles) ...", end="")
        first = first_call(first_mode)
        say(" done")
    # the data first: a missing plotting library, a failing plot or a closed pipe cannot lose the measurements
    report = snapshot(True)
    rows = report["rows"]
    report["kernel_fwd_bwd"] = {phase: kernel_fwd_bwd(kernel_rows[phase], judge) for phase in kernel_rows}
    report["noisy_rows"] = _noisy_ids(report)
    if old is not None:
        report["compare"] = dict(compare(old, report), old=str(args.compare))
    js.write_text(json.dumps(report, indent=1, default=float))
    print_report(report, say, console)
    report["targets_summary"] = _targets_summary(report)
    js.write_text(json.dumps(report, indent=1, default=float))  # again, with the verdicts the tables made
    say(f"wrote {js}")
    if old is not None:
        for line in compare_lines(report["compare"], str(args.compare), str(js)):
            say(line)
    say("targets met: " + "; ".join(f"{k} {v[0]} of {v[1]}" + (f" (+{v[2]} undecided)" if v[2] else "")
                                    for k, v in report["targets_summary"].items())
        + f"; total time {time.perf_counter() - t0:.0f} s")
    png = out_dir / "bench.png"
    if args.no_plot:
        return 0
    if not use_torch or not rows:
        say("plot skipped: the speed-up plot needs PyTorch's timings of the kernels section")
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
