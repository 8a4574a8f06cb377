"""``normref bench``'s latency rows: first calls in fresh processes (cold and warm numba cache), and per-call overhead.

- ``first_call`` (:func:`first_call`): a fresh Python process imports normref and calls it; the
  times a user waits before the first result. ``cold``: the process gets an empty
  ``NUMBA_CACHE_DIR`` (a new temporary folder), so every kernel it needs is compiled; ``warm``: a
  second fresh process on the same folder, now filled by the first (the cache as a user has it
  from the second run on). Each records the import of normref, a tiny 8×16 ``layer_norm`` (no
  kernel serves it: whether numba was imported for it is recorded too), the first forward of a
  kernel-sized (64, 1024) ``layer_norm``, its first backward (``normref.vjp``'s pullback), and
  with ``what="all"`` the first forward + backward of each of the five standardization methods.
  Each figure is one measurement (a first call happens once per process).
- ``overhead`` (:func:`overhead`): the cost per call of an 8×16 float32 layer norm, where the
  arithmetic is negligible and what is measured is the wrapper: ``normref.layer_norm`` on NumPy
  against the same formula written as four plain NumPy expressions (the floor of an array-API
  implementation); on torch, ``torch.nn.functional.layer_norm`` with autograd recording against
  normref's torch adapter (``normref.backends.torch.layer_norm``, an ``autograd.Function``) and a
  plain ``normref.layer_norm`` call on a torch tensor, forward and forward + backward. Each sample
  is the mean over ``inner`` calls; samples are interleaved (:mod:`.bench_timing`); an overhead
  (normref's call minus the bare formula, the adapter minus torch's function) is the median of the
  per-repetition differences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Callable

from .bench_timing import interleaved, is_noisy, paired_difference

__all__ = ["first_call", "overhead"]

# runs in the fresh process: prints one JSON line of timings (seconds)
_CHILD = r"""
import json, sys, time
what = sys.argv[1]
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import normref
t2 = time.perf_counter()
out = {"import_numpy_s": t1 - t0, "import_normref_s": t2 - t1,
       "numba_imported_by_import": "numba" in sys.modules}
tiny = np.ones((8, 16), np.float32)
t = time.perf_counter(); normref.layer_norm(tiny, 16); out["tiny_layer_norm_first_call_s"] = time.perf_counter() - t
out["numba_imported_by_tiny_call"] = "numba" in sys.modules
if what in ("one", "all"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    w = np.ones(1024, np.float32); b = np.zeros(1024, np.float32)
    t = time.perf_counter(); normref.layer_norm(x, 1024, w, b); out["layer_norm_first_forward_s"] = time.perf_counter() - t
    t = time.perf_counter(); y, pb = normref.vjp(normref.layer_norm, x, 1024, w, b)
    out["layer_norm_second_forward_s"] = time.perf_counter() - t
    t = time.perf_counter(); pb(np.ones_like(y)); out["layer_norm_first_backward_s"] = time.perf_counter() - t
    out["layer_norm_first_fwd_bwd_s"] = out["layer_norm_first_forward_s"] + out["layer_norm_first_backward_s"]
    out["kernels_used"] = "numba" in sys.modules
if what == "all":
    xi = rng.standard_normal((8, 32, 16, 16)).astype(np.float32)
    c = np.ones(32, np.float32); z = np.zeros(32, np.float32)
    calls = {"batch_norm": (xi, None, None, c, z, True), "instance_norm": (xi, None, None, c, z),
             "group_norm": (xi, 8, c, z), "rms_norm": (x, 1024, w)}
    total = out["layer_norm_first_fwd_bwd_s"]
    for name, args in calls.items():
        t = time.perf_counter(); y, pb = normref.vjp(getattr(normref, name), *args)
        y = y[0] if isinstance(y, tuple) else y
        pb(np.ones_like(y)); dt = time.perf_counter() - t
        out[name + "_first_fwd_bwd_s"] = dt; total += dt
    out["all_five_first_fwd_bwd_s"] = total
out["total_s"] = time.perf_counter() - t0
if "numba" in sys.modules:
    # the parallel builds a child process compiles in the background (the first calls ran the serial
    # ones): waited for here, so that the warm process finds them in the cache
    from normref.backends import numba as nb
    t = time.perf_counter(); nb.wait_compiled(); out["background_compile_wait_s"] = time.perf_counter() - t
print("NORMREF-BENCH " + json.dumps(out))
"""


def _child(what: str, cache_dir: str, timeout: float) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    r = subprocess.run([sys.executable, "-c", _CHILD, what], capture_output=True, text=True, timeout=timeout,
                       env=env)
    for line in r.stdout.splitlines():
        if line.startswith("NORMREF-BENCH "):
            return json.loads(line[len("NORMREF-BENCH "):])
    return {"error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-2000:]}"}


def first_call(what: str = "one", timeout: float = 600.0) -> dict:
    """First-call latencies of two fresh processes, ``{"cold": {...}, "warm": {...}}`` (seconds).

    ``what``: ``"tiny"`` (import and the 8×16 call only: no kernel is compiled), ``"one"`` (and
    layer_norm's first forward and backward on a kernel-sized input), ``"all"`` (and the first
    forward + backward of batch, instance, group and RMS norm too)."""
    if what not in ("tiny", "one", "all"):
        raise ValueError(f"normref bench: first-call must be off, tiny, one or all; got {what!r}")
    with tempfile.TemporaryDirectory(prefix="normref-bench-numba-cache-") as d:
        cold = _child(what, d, timeout)
        warm = _child(what, d, timeout)
    return {"what": what, "python": sys.executable, "cold": cold, "warm": warm,
            "note": "one fresh process each; cold: empty NUMBA_CACHE_DIR, warm: the same folder after the cold run"}


def overhead(repeat: int, warmup: int, inner: int, use_torch: bool, say: Callable[..., None] = print) -> list:
    """The ``overhead`` rows: 8×16 float32 layer norm per call (seconds), interleaved samples of
    ``inner`` calls each."""
    import numpy as np

    import normref

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    w = np.ones(16, np.float32)
    b = np.zeros(16, np.float32)
    eps = np.float32(1e-5)

    def formula():  # the same layer norm as plain NumPy: mean, variance, scale, affine
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)
        return xc / np.sqrt(var + eps) * w + b

    fns = {"normref_numpy": lambda: normref.layer_norm(x, 16, w, b), "numpy_formula": formula}
    rows = []
    say("  overhead 8x16 layer_norm numpy ...", end="")
    t = interleaved(fns, repeat, warmup, inner={k: inner for k in fns})
    rows.append({"id": "layer_norm 8x16 numpy", "timings": t,
                 "overhead_s": paired_difference(t["normref_numpy"], t["numpy_formula"]),
                 "noisy": is_noisy(*t.values())})
    say(" done")
    if not use_torch:
        return rows
    import torch
    import torch.nn.functional as F

    from normref.backends import torch as nt

    say("  overhead 8x16 layer_norm torch ...", end="")
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    bt = torch.from_numpy(b.copy()).requires_grad_(True)
    xn = torch.from_numpy(x.copy())  # no autograd: the plain call's cost
    g = torch.ones(8, 16)
    ins = (xt, wt, bt)

    def fb(f):
        def step():
            return torch.autograd.grad(f(xt, (16,), wt, bt), ins, g)

        return step

    fns = {"torch_forward": lambda: F.layer_norm(xt, (16,), wt, bt),
           "adapter_forward": lambda: nt.layer_norm(xt, (16,), wt, bt),
           "plain_normref_on_torch": lambda: normref.layer_norm(xn, 16),
           "torch_fwd_bwd": fb(F.layer_norm), "adapter_fwd_bwd": fb(nt.layer_norm)}
    t = interleaved(fns, repeat, warmup, inner={k: inner for k in fns})
    rows.append({"id": "layer_norm 8x16 torch", "timings": t,
                 "adapter_overhead_forward_s": paired_difference(t["adapter_forward"], t["torch_forward"]),
                 "adapter_overhead_fwd_bwd_s": paired_difference(t["adapter_fwd_bwd"], t["torch_fwd_bwd"]),
                 "noisy": is_noisy(*t.values())})
    say(" done")
    return rows
