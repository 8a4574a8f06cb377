"""Issue 18, first calls on an empty numba cache: the parallel builds are compiled by a child process
in the background (``normref.backends.numba.config.BACKGROUND``, the default) while the serial builds
serve the calls; once done, the calls run the parallel builds loaded from the cache; a second process
on the same cache loads them at once, with no child.

Every check is of results and of which build ran, never of time (the speed is measured by
``normref bench``'s first-call rows). Each test runs fresh Python processes on a temporary cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_SCRIPT = r"""
import json, sys
import numpy as np
import normref
from normref.backends import numba as nb
from normref.backends.numba import _fused as F
from normref.backends.numba import config

x = np.random.default_rng(0).standard_normal((128, 1024))  # one (1024,) row per statistic
assert x.size >= config.SERIAL_BELOW and config.BACKGROUND
g = np.random.default_rng(1).standard_normal(x.shape)
with normref.use_kernels(False):
    y_ref, pull = normref.vjp(normref.layer_norm, x, (1024,))
    dx_ref = pull(g)[0]

def run():
    y, pull = normref.vjp(normref.layer_norm, x, (1024,))
    return y, pull(g)[0]

par = F.KERNELS["fwd_rows"][0]
y1, dx1 = run()
first = {"states": sorted(set(nb._READY.values())), "parallel_compiled": len(par.overloads),
         "worker": bool(nb._WORKER)}
done = nb.wait_compiled(timeout=600)
y2, dx2 = run()
second = {"states": sorted(set(nb._READY.values())), "parallel_compiled": len(par.overloads)}
err = lambda a, b: float(np.max(np.abs(a - b)))
print(json.dumps({"first": first, "done": done, "second": second,
                  "errors": [err(y1, y_ref), err(dx1, dx_ref), err(y2, y_ref), err(dx2, dx_ref)]}))
"""


def _run(cache_dir) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), NORMREF_NUMBA_BACKGROUND="1")
    for k in ("NORMREF_KERNELS", "NORMREF_NUMBA_MIN_SIZE", "NORMREF_NUMBA_SERIAL_BELOW", "NORMREF_NUMBA_CACHE"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_background_compilation_on_a_cold_then_a_warm_cache(tmp_path):
    # float64 layer norm over rows of 1024: the formula's rounding is ~1e-15; the kernels reassociate
    # the float64 sums (fastmath reassoc), still ~1e-15 relative on standard-normal data
    tol = 64 * 2.2e-16 * 8
    cold = _run(tmp_path)
    # the first calls ran the serial builds: the parallel ones were queued to the child process, not
    # compiled here
    assert cold["first"]["states"] == ["pending"] and cold["first"]["parallel_compiled"] == 0
    assert cold["first"]["worker"]
    assert cold["done"]  # the child finished and wrote the cache
    # then the parallel builds were loaded from that cache and ran
    assert cold["second"]["states"] == ["ready"] and cold["second"]["parallel_compiled"] >= 1
    assert max(cold["errors"]) <= tol, cold["errors"]
    warm = _run(tmp_path)
    # a second process on the filled cache loads the parallel builds at once: no child, no serial detour
    assert warm["first"]["states"] == ["ready"] and warm["first"]["parallel_compiled"] >= 1
    assert not warm["first"]["worker"]
    assert max(warm["errors"]) <= tol, warm["errors"]


def test_switch_off_compiles_in_the_caller(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NORMREF_NUMBA_BACKGROUND="0")
    code = ("import numpy as np, normref\n"
            "from normref.backends import numba as nb\n"
            "from normref.backends.numba import _fused as F\n"
            "normref.layer_norm(np.ones((128, 1024)) + np.arange(1024.0), (1024,))\n"
            "assert not nb._READY and not nb._WORKER and len(F.KERNELS['fwd_rows'][0].overloads) == 1\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
