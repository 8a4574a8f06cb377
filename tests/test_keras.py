"""normref.backends.keras: Keras 3 layers on the JAX and torch backends (issue 16, §3).

Keras reads ``KERAS_BACKEND`` once, at its first import, so each backend runs in its own process:
``tests/keras_worker.py`` (the comparisons; one JSON object) and ``examples/keras_fit.py`` (``model.fit``).
All of these tests start a framework in a subprocess: they are listed in conftest's SLOW table.

Tolerances. Errors are max|a − b| / max(1, max|b|) (outputs and gradients of standardized values are
O(1)). Against Keras's own layers the comparison is in float32 (Keras's layers compute float64 inputs
in float32: ``keras.backend.result_type("float64", "float32")`` is ``"float32"`` in Keras 3.15, so a
float64 comparison with them would measure Keras's rounding): both sides compute the same statistics
over ≤ 96 elements in a different order, a rsqrt and, for gradients, three such terms; a few float32
ulps are expected (measured ≤ 5.1e-7 ≈ 4.3 ε₃₂), 50 ε₃₂ is allowed. In float64 the reference is the
textbook formula in the backend's own operations, differentiated by the backend's autodiff (an
independent oracle), and the allowance is 50 ε₆₄ (measured ≤ 5.7e-16 ≈ 2.6 ε₆₄).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "keras_worker.py"
EXAMPLE = ROOT / "examples" / "keras_fit.py"
BACKENDS = ("jax", "torch")
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


def _env(backend: "str | None", tmp: Path) -> dict:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    env["KERAS_HOME"] = str(tmp)  # no ~/.keras/keras.json choosing a backend behind the test's back
    env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(args: list, backend: "str | None", tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(backend, tmp), cwd=ROOT)


def _json(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, f"rc {p.returncode}:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=BACKENDS)
def worker(request, tmp_path_factory) -> dict:
    """The worker's measurements on one backend (run once per backend for all the tests below)."""
    out = _json(_run([str(WORKER)], request.param, tmp_path_factory.mktemp("keras")))
    assert out["backend"] == request.param
    return out


def test_layers_equal_keras_and_the_formula(worker):
    comparisons = {k: v for k, v in worker.items() if k.count("/") == 2}
    assert len(comparisons) == 12  # 6 layer cases x (float32 vs Keras, float64 vs the formula)
    for name, r in comparisons.items():
        tol = 50 * (EPS32 if "/float32/" in name else EPS64)
        for field in ("forward", "grad", "state", "inference"):
            assert r[field] <= tol, f"{worker['backend']} {name}: {field} error {r[field]:.3g} > {tol:.3g}"
        assert r["normref_backward"], f"{worker['backend']} {name}: the backend did not differentiate normref's backward"
        assert r["dtype_out"] == name.split("/")[1], f"{name}: output dtype {r['dtype_out']}"
        if name.startswith("batch_norm"):  # the state comparison is not vacuous: the statistics moved
            assert r["state_moved"] > 1e-2, f"{name}: moving statistics did not change ({r['state_moved']})"


def test_generic_layer_and_channel_paths_equal_numpy(worker):
    # StatefulNorm and GroupNormalization on NHWC (H = C) against normref's NumPy function on the NCHW
    # transpose, float64, both through the adapters' channel_axis= and through the layer's own
    # fallback (channels moved to axis 1 and back; keras.ops code, run on torch only, the faster
    # backend); the same formula either way: 50 ε₆₄
    paths = ("generic/channel_axis", "generic/move_axis") if worker["backend"] == "torch" else ("generic/channel_axis",)
    for path in paths:
        assert set(worker[path]) == {"batch_norm", "iter_norm", "group_norm"}
        for method, e in worker[path].items():
            assert e <= 50 * EPS64, f"{worker['backend']} {path} {method}: error {e:.3g}"


def test_named_layers_equal_numpy(worker):
    # the 13 named StatefulNorm layers (whitening, renorm, ghost, switchable, FRN, ...), float64, one
    # training and one inference call against normref's NumPy function: the same formula, 50 ε₆₄
    assert len(worker["named"]) == 13
    for cls, e in worker["named"].items():
        assert e <= 50 * EPS64, f"{worker['backend']} {cls}: error {e:.3g}"


def test_axis_name_statistics_of_the_whole_batch(worker):
    if worker["backend"] != "jax":
        pytest.skip("axis_name is JAX's (a mapped axis)")
    # vmap over 2 shards with axis_name vs the whole batch, float64: a sum regrouped, 50 ε₆₄
    assert worker["axis_name"]["output"] <= 50 * EPS64
    assert worker["axis_name"]["state"] <= 50 * EPS64


def test_keras_distribution_data_parallel(worker):
    if worker["backend"] != "jax":
        pytest.skip("keras.distribution is JAX's here")
    d = worker["distribution"]
    assert d["devices"] == 2
    # two float32 SGD steps from the same weights: a few ulps (measured ≤ 1.2e-7); local per-device
    # statistics (the failure this guards against) would differ by ~1e-2
    assert d["normref_vs_keras"] <= 50 * EPS32, d
    assert d["distributed_vs_single"] <= 50 * EPS32, d


def test_bad_arguments_are_refused(worker):
    e = worker["errors"]
    want = {
        "synchronized_not_bool": ("TypeError", "synchronized"),
        "renorm": ("ValueError", "renorm"),
        "rms_scaling": ("ValueError", "rms_scaling"),
        "batch_axis": ("ValueError", "batch axis"),
        "unknown_option": ("ValueError", "group_sizes"),
        "not_activation": ("TypeError", "weight_norm"),
        "bad_group_size": ("ValueError", "group_size"),
        "bad_momentum": ("ValueError", "momentum"),
        "mask": ("NotImplementedError", "mask"),
    }
    if worker["backend"] != "jax":
        want["axis_name_off_jax"] = ("ValueError", "axis_name")
    for case, (kind, word) in want.items():
        assert e[case] is not None, f"{case}: accepted"
        assert e[case][0] == kind and word in e[case][1], f"{case}: {e[case]}"


def test_serialization_round_trip(worker):
    assert worker["serialization"] is True


def _synchronized_rank(rank: int, world_size: int, keras_home: str) -> dict:
    """One gloo rank: BatchNormalization(synchronized=True) on its shard of a fixed batch, float64."""
    os.environ["KERAS_BACKEND"] = "torch"  # a fresh (spawned) process: before keras is imported
    os.environ["KERAS_HOME"] = keras_home
    import torch

    from normref.backends import keras as nk

    x, g = _synchronized_batch(world_size)
    part = slice(rank * 6, (rank + 1) * 6)
    layer = nk.BatchNormalization(synchronized=True, dtype="float64")
    xt = torch.tensor(x[part], requires_grad=True)
    y = layer(xt, training=True)
    (y * torch.tensor(g[part])).sum().backward()
    return {"y": y.detach().numpy(), "dx": xt.grad.numpy(), "dgamma": layer.gamma.value.grad.numpy(),
            "dbeta": layer.beta.value.grad.numpy(), "moving_mean": layer.moving_mean.numpy(),
            "moving_variance": layer.moving_variance.numpy()}


def _synchronized_batch(world_size: int):
    rng = np.random.default_rng(7)
    return rng.standard_normal((6 * world_size, 5)) * 2.0 + 1.0, rng.standard_normal((6 * world_size, 5))


def test_synchronized_on_torch_equals_the_whole_batch(tmp_path):
    """synchronized=True over 2 gloo ranks: every rank's output and input gradient equal torch's
    batch norm on the whole batch, the per-rank γ/β gradients sum to the whole batch's (DDP sums
    them), the moving statistics are Keras's update with the whole batch's (biased) variance on every
    rank. float64; the pooled moments regroup sums of 12 terms: 50 ε₆₄ relative."""
    import torch

    from ._dist import run_ranks

    ranks = run_ranks(_synchronized_rank, 2, str(tmp_path), timeout=240.0)
    x, g = _synchronized_batch(2)
    xt = torch.tensor(x, requires_grad=True)
    w = torch.ones(5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, w, b, training=True, eps=1e-3)  # Keras's ε
    (y * torch.tensor(g)).sum().backward()
    tol = 50 * EPS64

    def close(a, b):
        return np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))

    for r, out in enumerate(ranks):
        part = slice(r * 6, (r + 1) * 6)
        assert close(out["y"], y.detach().numpy()[part]), r
        assert close(out["dx"], xt.grad.numpy()[part]), r
        assert close(out["moving_mean"], 0.01 * x.mean(0)), r  # 0.99·0 + 0.01·μ_B
        assert close(out["moving_variance"], 0.99 + 0.01 * x.var(0)), r  # biased σ_B², Keras's
    assert close(sum(o["dgamma"] for o in ranks), w.grad.numpy())
    assert close(sum(o["dbeta"] for o in ranks), b.grad.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_example(backend, tmp_path):
    """examples/keras_fit.py: model.fit trains (the loss falls) and equals Keras's own layers."""
    out = _json(_run([str(EXAMPLE)], backend, tmp_path))
    assert out["backend"] == backend
    ours, theirs = out["loss_normref"], out["loss_keras"]
    assert ours[-1] < 0.8 * ours[0], f"loss did not decrease: {ours}"
    # 24 SGD-with-momentum steps in float32 from the same weights: per-step differences of a few ulps
    # (the layer comparisons above) carried through the updates; measured ≤ 6e-7 on the weights
    assert np.allclose(ours, theirs, rtol=1e-5, atol=0), (ours, theirs)
    assert out["max_weight_diff"] <= 1e-5


def test_import_without_a_backend_says_what_to_do(tmp_path):
    p = _run(["-c", "import normref.backends.keras"], None, tmp_path, timeout=300)
    assert p.returncode != 0
    assert "KERAS_BACKEND=jax" in p.stderr, p.stderr[-2000:]


def test_readme_section_runs(tmp_path):
    """The README's Keras example, run as written (torch: the backend its first line picks)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Keras 3 layers (`normref.backends.keras`)", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    p = _run(["-c", code], None, tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "moving_mean" in p.stdout and "moving_variance" in p.stdout, p.stdout
