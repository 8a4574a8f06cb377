"""Embedding normref's forward/backward pairs in a framework: the ``needs`` mask, the cotangent checks,
and the README's embedding examples (run here, so that they cannot rot).

``Method.backward(residuals, cotangent, needs=mask)`` computes only the wanted gradients: a registered
backward that declares ``needs`` receives the mask (torch passes ``ctx.needs_input_grad``, JAX the
``perturbed`` flags of its primals); the cotangent must have the primary output's shape and library,
checked before any work, on every library (JAX tracers included).
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import normref
from normref.registry import REGISTRY, Method, Residuals

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# a probe method: y = w·x (w per column), whose backward records which gradients it computed
# --------------------------------------------------------------------------------------------------
COMPUTED: list = []


def _probe_forward(x, w):
    return x * w, Residuals((x, w))


def _probe_backward(res, g, needs):
    x, w = res.arrays
    # ∂(w·x)/∂x = w, ∂/∂w = Σ_rows x·g: each computed only when asked for
    dx = g * w if needs[0] else None
    dw = (g * x).sum(0) if needs[1] else None
    COMPUTED.append(tuple(n for n, d in zip(("x", "w"), (dx, dw)) if d is not None))
    return dx, dw


PROBE = Method(_probe_forward, name="_embedding_probe", array_params=("x", "w"))
PROBE.defbackward(_probe_backward)


@pytest.fixture
def probe(monkeypatch):
    """The probe, registered for the duration of one test (the adapters look methods up by name)."""
    monkeypatch.setitem(REGISTRY, PROBE.name, PROBE)
    COMPUTED.clear()
    yield PROBE
    COMPUTED.clear()


def _xw(rng):
    return rng.standard_normal((5, 3)), rng.standard_normal(3)


def test_needs_reaches_a_backward_that_declares_it(probe, rng):
    x, w = _xw(rng)
    _, res = probe.forward(x, w)
    g = rng.standard_normal((5, 3))
    dx, dw = probe.backward(res, g, needs=(True, False))
    assert dw is None and COMPUTED == [("x",)]
    np.testing.assert_array_equal(dx, g * w)  # the same arithmetic, no tolerance needed
    assert probe.backward(res, g, needs=(False, False)) == (None, None)
    assert COMPUTED == [("x",)]  # nothing wanted: the backward is not even called
    probe.backward(res, g)  # no mask: everything
    assert COMPUTED == [("x",), ("x", "w")]
    with pytest.raises(ValueError, match=r"_embedding_probe.backward: needs must hold one bool per array parameter"):
        probe.backward(res, g, needs=(True,))


def test_needs_masks_a_backward_that_does_not_declare_it(rng):
    x, w, b = rng.standard_normal((3, 4, 5)), rng.standard_normal(4), rng.standard_normal(4)
    m = normref.get("group_norm")
    _, res = m.forward(x, 2, w, b)
    g = rng.standard_normal((3, 4, 5))
    full = m.backward(res, g)
    part = m.backward(res, g, needs=(False, True, False))
    assert part[0] is None and part[2] is None
    np.testing.assert_array_equal(part[1], full[1])


def test_torch_passes_needs_input_grad(probe, rng):
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x, w = (torch.tensor(a) for a in _xw(rng))
    f = nt.function(probe)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(f(xr, w).sum(), (xr,))
    assert COMPUTED == [("x",)]
    torch.testing.assert_close(gx, w.expand(5, 3), rtol=0, atol=0)
    wr = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(f(x, wr).sum(), (wr,))
    assert COMPUTED[-1] == ("w",)
    # a sum of 5 products: round-off ≤ 5·ε·Σ|x|
    torch.testing.assert_close(gw, x.sum(0), rtol=0, atol=5 * 2.3e-16 * x.abs().sum(0).max().item())
    # second order (create_graph: the residuals are recomputed with grad enabled) passes the mask too
    xr2 = x.clone().requires_grad_()
    torch.autograd.grad(f(xr2, w).pow(2).sum(), (xr2,), create_graph=True)
    assert COMPUTED[-1] == ("x",)


def test_jax_passes_the_perturbed_mask(probe, rng):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from normref.backends import jax as nj

    x, w = (jnp.asarray(a) for a in _xw(rng))
    f = nj.function(probe)
    gx = jax.grad(lambda x: jnp.sum(f(x, w)))(x)
    assert COMPUTED == [("x",)]
    np.testing.assert_array_equal(np.asarray(gx), np.broadcast_to(np.asarray(w), (5, 3)))
    gw = jax.jit(jax.grad(lambda w: jnp.sum(f(x, w))))(w)
    assert COMPUTED[-1] == ("w",)  # recorded while tracing: the mask is static
    # a sum of 5 products (XLA may reorder it): round-off ≤ 5·ε·Σ|x|
    xn = np.asarray(x)
    np.testing.assert_allclose(np.asarray(gw), xn.sum(0), rtol=0, atol=5 * np.finfo(float).eps * np.abs(xn).sum(0).max())


# --------------------------------------------------------------------------------------------------
# the cotangent is checked against the primary output recorded at forward time
# --------------------------------------------------------------------------------------------------
def _gn(xp_asarray, rng):
    x = xp_asarray(rng.standard_normal((3, 4, 5)))
    w = xp_asarray(rng.standard_normal(4))
    m = normref.get("group_norm")
    return m, m.forward(x, 2, w, None)


def _check_cotangent_errors(m, res, ones):
    # (1, 4, 5) broadcasts against (3, 4, 5): formerly accepted silently
    for bad in [(1, 4, 5), (3, 4), (3, 4, 5, 1)]:
        with pytest.raises(ValueError, match=re.escape(
            f"group_norm.backward: cotangent must have the primary output's shape (3, 4, 5); got shape {bad}"
        )):
            m.backward(res, ones(bad))
    with pytest.raises(TypeError, match=r"group_norm.backward: cotangent must be an array, got None"):
        m.backward(res, None)


def test_cotangent_is_checked_numpy(rng):
    m, (y, res) = _gn(np.asarray, rng)
    _check_cotangent_errors(m, res, np.ones)
    import torch

    with pytest.raises(TypeError, match=r"cotangent must be a numpy array, like the primary output; got a torch array"):
        m.backward(res, torch.ones(3, 4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"cotangent must be real floating point .* got dtype int64"):
        m.backward(res, np.ones((3, 4, 5), dtype=np.int64))
    # a NamedTuple result: the cotangent is the primary output's, (8, 3) here
    bn = normref.get("batch_norm")
    out, res = bn.forward(rng.standard_normal((8, 3)), np.zeros(3), np.ones(3), None, None, True)
    assert isinstance(out, tuple)
    with pytest.raises(ValueError, match=r"batch_norm.backward: cotangent .* shape \(8, 3\); got shape \(3,\)"):
        bn.backward(res, np.ones(3))


def test_cotangent_is_checked_torch(rng):
    torch = pytest.importorskip("torch")
    m, (y, res) = _gn(torch.tensor, rng)
    _check_cotangent_errors(m, res, lambda s: torch.ones(s, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"cotangent must be a torch array, like the primary output; got a numpy array"):
        m.backward(res, np.ones((3, 4, 5)))


def test_cotangent_is_checked_jax_eager_and_traced(rng):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    m, (y, res) = _gn(jnp.asarray, rng)
    _check_cotangent_errors(m, res, jnp.ones)
    x = jnp.asarray(rng.standard_normal((3, 4, 5)))

    def dx(x, g):  # the pair used by hand under jit: shapes are known while tracing
        _, r = m.forward(x, 2)
        return m.backward(r, g)[0]

    with pytest.raises(ValueError, match=r"cotangent must have the primary output's shape \(3, 4, 5\); got shape \(1, 4, 5\)"):
        jax.jit(dx)(x, jnp.ones((1, 4, 5)))
    g = jnp.asarray(rng.standard_normal((3, 4, 5)))
    ref = dx(x, g)
    assert float(jnp.max(jnp.abs(jax.jit(dx)(x, g) - ref))) <= 1e-12  # XLA may reassociate the sums
    # under vmap each call sees per-example shapes: (4, 5) here
    xs, gs = jnp.stack([x[0], x[1]]), jnp.stack([g[0], g[1]])
    dv = jax.vmap(lambda x, g: m.backward(m.forward(x[None], 2)[1], g[None])[0][0])(xs, gs)
    assert dv.shape == (2, 4, 5)
    # group norm's statistics are per sample: row i of the batch backward is the single-sample one
    assert float(jnp.max(jnp.abs(dv - ref[:2]))) <= 1e-12


# --------------------------------------------------------------------------------------------------
# the README's embedding sections run as written
# --------------------------------------------------------------------------------------------------
def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    """The fenced blocks of ``lang`` ("" for a plain block), scanning fences in pairs, in order."""
    return [body for tag, body in re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S) if tag == lang]


def _run_blocks(section: str, capsys) -> str:
    blocks = _blocks(section, "python")
    assert blocks, "the section has no python code block"
    namespace: dict = {"__name__": "readme"}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return capsys.readouterr().out


def test_readme_pytorch_section_runs(capsys):
    pytest.importorskip("torch")
    out = _run_blocks(_readme_section("Embedding in PyTorch"), capsys)
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]
    assert len(losses) == 4 and losses[-1] < 0.25 * losses[0]  # the model trains
    assert "'running_cov', 'num_batches_tracked'" in out


def test_readme_other_framework_section_runs(capsys):
    out = _run_blocks(_readme_section("Embedding normref in another framework"), capsys)
    losses = [float(v) for v in re.findall(r"loss ([0-9.e+-]+)", out)]
    # the targets are exactly representable by the model: the loss falls from O(100) to round-off
    # (|target|² summed over 480 values: 480·(few·ε)² ≈ 1e-28)
    assert losses[0] > 10 and losses[-1] < 1e-20


def test_readme_jax_example_prints_what_the_readme_shows():
    """examples/jax_mlp.py, run as the README says (a fresh process: float32, JAX's default), prints
    the loss table the README shows, and the loss falls. The printed means are compared to 0.01:
    XLA's CPU kernels may reorder float32 sums across machines, which 300 SGD steps amplify well
    beyond ε, while the README's claim is the curve, not the fourth digit."""
    pytest.importorskip("jax")
    import subprocess
    import sys

    section = _readme_section("Embedding in JAX")
    assert "python examples/jax_mlp.py" in _blocks(section, "bash")[0]
    shown = [b for b in _blocks(section, "") if "mean loss" in b]
    assert len(shown) == 1
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "jax_mlp.py")], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={**__import__("os").environ, "JAX_ENABLE_X64": "0"})
    assert run.returncode == 0, run.stderr
    pattern = r"(steps\s+\d+-\s*\d+|eval loss \(running statistics\)):?\s+(?:mean loss )?([0-9.]+)"
    got, want = re.findall(pattern, run.stdout), re.findall(pattern, shown[0])
    assert [g[0] for g in got] == [w[0] for w in want] and len(got) == 7
    for (label, a), (_, b) in zip(got, want):
        assert abs(float(a) - float(b)) <= 0.01, label
    means = [float(a) for _, a in got[:-1]]
    assert means[-1] < 0.4 * means[0]  # it trains
