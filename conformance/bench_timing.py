"""The timing machinery of ``normref bench``: interleaved repetitions, spreads, allocator policies, ``--compare``.

How a benchmark here times, so that its numbers can be trusted and compared:

- **Interleaved repetitions.** :func:`interleaved` takes the callables of one comparison (normref's
  and PyTorch's, forward and backward) and runs repetition *i* of every one of them before
  repetition *i + 1* of any, in an order rotated by *i* (no library always first, always after the
  same one, or all its repeats back to back): a burst of load from another process, a frequency
  change or a cache state then lands on every library alike, and per-repetition *paired* ratios
  (:func:`paired_ratio`) cancel most of it.
- **Warm-up policy.** Before the timed repetitions every callable runs ``warmup`` times (default 1),
  interleaved too; those calls are not timed: they compile (numba), fill the caches and let the
  allocator reach its steady state. Cold-start costs are measured separately and explicitly (the
  first-call rows of :mod:`normref.conformance.bench_latency`, in fresh processes).
- **Median and spread.** Each timing is summarized by :func:`spread`: min, quartiles, median, max,
  IQR and the relative spread ``rel_iqr = IQR / median``; rows whose relative spread exceeds
  :data:`NOISY` (10%) on any of their timings are flagged ``noisy`` (their ratios are not to be
  believed at the 10% level).
- **Allocator policies.** :func:`set_allocator` switches glibc between its defaults (large outputs
  are ``mmap``-ed and page-faulted at every call: what a program gets out of the box) and heap
  reuse (``mallopt``: freed blocks are reused, no page faults), the same policy for both libraries
  (both allocate through ``malloc``). The defaults are measured first: a ``mallopt`` cannot be undone.
- **Comparing runs.** :func:`flatten` turns a ``bench.json`` into ``{id: median seconds}``;
  :func:`compare` pairs two reports' ids and gives new/old ratios (``normref bench --compare
  old.json``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["NOISY", "spread", "interleaved", "paired_ratio", "paired_difference", "paired_quartiles", "decide",
           "is_noisy", "environment", "set_allocator", "flatten",
           "compare", "compare_lines", "load_report"]

#: relative spread (IQR / median) above which a timing, and the row that holds it, is flagged noisy
NOISY = 0.10


def spread(ts: Sequence[float]) -> dict:
    """Summary of repeated timings (seconds): ``n``, ``min``, quartiles ``q1``/``median``/``q3``
    (linear interpolation), ``max``, ``iqr`` = q3 − q1, ``rel_iqr`` = IQR / median, and the
    ``samples`` themselves in the order they were taken (for paired ratios and re-analysis)."""
    raw = [float(t) for t in ts]
    v = np.sort(np.asarray(raw, dtype=np.float64))
    q1, med, q3 = (float(q) for q in np.quantile(v, [0.25, 0.5, 0.75]))
    return {"n": int(v.size), "min": float(v[0]), "q1": q1, "median": med, "q3": q3, "max": float(v[-1]),
            "iqr": q3 - q1, "rel_iqr": (q3 - q1) / med if med > 0 else float("inf"), "samples": raw}


def interleaved(fns: Mapping[str, Callable[[], object]], repeat: int, warmup: int = 1,
                repeats: Mapping[str, int] | None = None, inner: Mapping[str, int] | None = None) -> dict:
    """Time every callable of ``fns`` with the repetitions interleaved; ``{name: spread(...)}``.

    Repetition *i* calls each function once (``inner[name]`` times in a row when given, the sample
    being the mean per call: for calls of microseconds), in the order of ``fns`` rotated by *i*.
    ``repeats[name]`` (≤ ``repeat``) lets a slow function take part in the first repetitions only.
    Each function is first called ``warmup`` times, interleaved, untimed.
    """
    keys = list(fns)
    repeats = dict(repeats or {})
    inner = dict(inner or {})
    for _ in range(max(0, warmup)):
        for k in keys:
            fns[k]()
    samples: dict = {k: [] for k in keys}
    n = max(1, int(repeat))
    for i in range(n):
        s = i % len(keys)
        for k in keys[s:] + keys[:s]:
            if len(samples[k]) >= max(1, repeats.get(k, n)):
                continue
            m = max(1, int(inner.get(k, 1)))
            f = fns[k]
            t = time.perf_counter()
            for _ in range(m):
                f()
            samples[k].append((time.perf_counter() - t) / m)
    return {k: spread(v) for k, v in samples.items()}


def paired_ratio(a: dict, b: dict) -> float | None:
    """Median over the repetitions of ``a_i / b_i`` (two :func:`spread` results of one
    :func:`interleaved` call): the ratio with the load both saw in repetition *i* cancelled."""
    sa, sb = a.get("samples") or [], b.get("samples") or []
    k = min(len(sa), len(sb))
    if not k:
        return None
    return float(np.median([x / y for x, y in zip(sa[:k], sb[:k])]))


def paired_difference(a: dict, b: dict) -> float | None:
    """Median over the repetitions of ``a_i − b_i`` (an overhead: the same work plus a wrapper, minus
    the work alone, with the load of repetition *i* cancelled)."""
    sa, sb = a.get("samples") or [], b.get("samples") or []
    k = min(len(sa), len(sb))
    if not k:
        return None
    return float(np.median([x - y for x, y in zip(sa[:k], sb[:k])]))


def paired_quartiles(a: dict, b: dict, op: str = "ratio") -> tuple | None:
    """(q1, median, q3) over the repetitions of ``a_i / b_i`` (``op="ratio"``) or ``a_i − b_i``
    (``op="difference"``); for ``b`` None, of ``a``'s own samples."""
    sa = a.get("samples") or []
    if b is None:
        v = sa
    else:
        sb = b.get("samples") or []
        k = min(len(sa), len(sb))
        v = [x / y if op == "ratio" else x - y for x, y in zip(sa[:k], sb[:k])]
    if not v:
        return None
    q1, med, q3 = (float(q) for q in np.quantile(np.asarray(v, dtype=np.float64), [0.25, 0.5, 0.75]))
    return q1, med, q3


def decide(q: tuple | None, target: float) -> bool | None:
    """A target verdict that the noise cannot flip: True when the whole interquartile range of the
    (paired) figure is at or below ``target``, False when it is all above, None (undecided: the
    target lies within the spread) otherwise."""
    if q is None:
        return None
    if q[2] <= target:
        return True
    if q[0] > target:
        return False
    return None


def is_noisy(*spreads: dict | None) -> bool:
    """Whether any of the timings' relative spread (IQR / median) exceeds :data:`NOISY`."""
    return any(s is not None and s["rel_iqr"] > NOISY for s in spreads)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("normref", "numpy", "numba", "torch", "array-api-compat", "rich", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment(threads_torch: int | None) -> dict:
    """What the timings depend on: CPU model, cores, thread counts (numba, torch, and the thread
    variables of the environment), library versions, load average and when (UTC)."""
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
            "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                          "NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR")},
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "versions": _versions()}


def set_allocator(policy: str) -> str:
    """Put glibc's malloc in ``policy`` and describe it: ``"default"`` leaves it as it is (glibc's
    defaults: blocks above the dynamic mmap threshold, at most 32 MiB, are mapped and page-faulted
    at every allocation), ``"reuse"`` raises the mmap and trim thresholds (``mallopt``) so that
    freed blocks are reused by every library in the process (no page faults per call). Returns the
    description; ``"reuse"`` where mallopt is unavailable (not glibc) says so and changes nothing."""
    if policy == "default":
        return "glibc malloc defaults (large outputs mmap-ed and page-faulted per call)"
    if policy != "reuse":
        raise ValueError(f"normref bench: allocator must be 'default' or 'reuse'; got {policy!r}")
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    except Exception as e:  # not glibc
        return f"unavailable: {e}"
    if not ok:
        return "unavailable: mallopt refused"
    return "glibc mallopt: mmap threshold 1 GiB, trim threshold 2 GiB (freed blocks reused)"


# --------------------------------------------------------------------------------------------------
# comparing two reports


def load_report(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "bench.json"
    return json.loads(p.read_text())


def _spread_of(obj) -> dict | None:
    return obj if isinstance(obj, dict) and "median" in obj else None


def flatten(report: Mapping) -> dict:
    """``{id: spread}`` of every timing in a ``bench.json``: the kernel rows (``kernels[allocator]
    method shape layout pass library``) and every row of the other sections (``section[allocator]
    row-id library``); ids are stable across runs of the same options."""
    out: dict = {}
    for key, alloc in (("rows", report.get("allocator_rows", "reuse")), ("rows_default_allocator", "default")):
        for r in report.get(key) or ():
            base = (f"kernels[{alloc}] {r['method']} {'x'.join(map(str, r['shape']))} {r['layout']} "
                    f"{r['pass']}")
            for lib in ("numba", "numba_1t", "array_api", "torch"):
                s = _spread_of(r.get(lib + "_spread"))
                if s is not None:
                    out[f"{base} {lib}"] = s
    for section in ("adapter", "network", "scaling", "under_load", "overhead"):
        for r in report.get(section) or ():
            alloc = r.get("allocator")
            head = f"{section}[{alloc}]" if alloc else section
            for lib, s in (r.get("timings") or {}).items():
                if _spread_of(s) is not None:
                    out[f"{head} {r['id']} {lib}"] = s
    fc = report.get("first_call") or {}
    for cache in ("cold", "warm"):
        for k, v in (fc.get(cache) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith("_s"):
                out[f"first_call[{cache}] {k}"] = {"median": float(v), "rel_iqr": 0.0, "n": 1}
    return out


def compare(old: Mapping, new: Mapping) -> dict:
    """new/old ratios of the medians for every id present in both reports.

    Returns ``{"rows": [{"id", "old", "new", "ratio", "noisy"}...], "only_old": [...], "only_new":
    [...]}``; ``ratio`` > 1 means the new run is slower; ``noisy`` when either timing's relative
    spread exceeds :data:`NOISY` (a change smaller than the spread is not a change)."""
    a, b = flatten(old), flatten(new)
    rows = []
    for k in b:
        if k in a and a[k]["median"] > 0:
            rows.append({"id": k, "old": a[k]["median"], "new": b[k]["median"],
                         "ratio": b[k]["median"] / a[k]["median"],
                         "noisy": bool(a[k].get("rel_iqr", 0) > NOISY or b[k].get("rel_iqr", 0) > NOISY)})
    return {"rows": rows, "only_old": sorted(set(a) - set(b)), "only_new": sorted(set(b) - set(a))}


def compare_lines(cmp: Mapping, old_name: str = "old", new_name: str = "new") -> list:
    """The text of :func:`compare`'s result: one line per id, ratio new/old and a verdict."""
    rows = cmp["rows"]
    if not rows:
        return [f"compare: no timing in common between {old_name} and {new_name}"]
    w = max(len(r["id"]) for r in rows)
    out = [f"compare: new/old medians ({new_name} / {old_name}); > 1: slower now; ~ noisy (spread > "
           f"{NOISY:.0%}: within the noise)",
           f"{'timing':<{w}}  {'old ms':>10}  {'new ms':>10}  {'new/old':>8}"]
    for r in rows:
        verdict = ("~" if r["noisy"] else "") + ("slower" if r["ratio"] > 1 + NOISY else
                                                  "faster" if r["ratio"] < 1 - NOISY else "same")
        out.append(f"{r['id']:<{w}}  {r['old'] * 1e3:>10.3f}  {r['new'] * 1e3:>10.3f}  {r['ratio']:>7.2f}×  {verdict}")
    ratios = [r["ratio"] for r in rows]
    out.append(f"compare: {len(rows)} timings in common, geometric mean new/old "
               f"{float(np.exp(np.mean(np.log(ratios)))):.3f}; only in {old_name}: {len(cmp['only_old'])}, "
               f"only in {new_name}: {len(cmp['only_new'])}")
    return out
