"""Issue 18: a tiny NumPy input (below the kernels' MIN_SIZE) never imports numba; a large one does,
and runs a kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_SCRIPT = r"""
import sys
import numpy as np
import normref
from normref.backends.numba import config

normref.layer_norm(np.ones((8, 16)), (16,))
normref.batch_norm(np.arange(48.0).reshape(4, 3, 2, 2), None, None, training=True)
assert "numba" not in sys.modules, "a tiny input imported numba"
x = np.random.default_rng(0).standard_normal((256, 1024))
assert x.size >= config.MIN_SIZE
from normref._kernels import count_kernels
with count_kernels() as calls:
    normref.layer_norm(x, (1024,))
assert calls.taken, calls.taken
assert "numba" in sys.modules
print("ok")
"""


def test_tiny_input_does_not_import_numba():
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    env.pop("NORMREF_KERNELS", None)
    env.pop("NORMREF_NUMBA_MIN_SIZE", None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok")
