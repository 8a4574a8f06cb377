"""Normalizing gradients (issue 4, survey §7) on every array library.

Tolerances
- float64 backends vs the NumPy float64 evaluation, and formulas evaluated in NumPy: one norm (a sum
  of ≤ 50 squares) and a few elementwise operations per element: ``TOL64 = 1e3·ε₆₄`` relative bounds
  that with room.
- backward vs central finite differences (float64): ≤ 1e-6 relative (conformance/fd.py).
- invariants: ``Invariant.scale·ε₆₄·cond`` as the registry says.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normref
from normref.conformance.fd import fd_check
from tests.conftest import assert_same_kind
from tests.conftest import rel_err as _rel, registry_cases as _cases, EPS64, TOL64


FAMILY = normref.methods(category="gradient")
FAMILY_IDS = [m.name for m in FAMILY]


def test_family_is_complete():
    assert {m.name for m in FAMILY} >= {"block_gradient_norm", "lars", "gradient_centralization"}
    for m in FAMILY:
        assert m.survey and m.paper and m.__doc__ and m.invariants, m.name
        assert m.array_params == ("weight", "grad")
        assert getattr(normref, m.name) is m
        assert len(_cases(m)) >= 3


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_backward_matches_finite_differences(m):
    worst = raw = 0.0
    for i, ex in enumerate(_cases(m)):
        r = fd_check(m, ex.args, ex.kwargs, seed=i, directions=3)
        assert r.errors, f"{m.name} [{ex.label}]: nothing checked"
        assert r.max_error <= 1e-6, f"{m.name} [{ex.label}]: {r.errors}"
        rr = max(abs(a - n) / max(abs(a), abs(n), 1e-300) for _, a, n, _ in r.details)
        assert rr <= 1e-6, f"{m.name} [{ex.label}]: {r.details}"
        worst, raw = max(worst, r.max_error), max(raw, rr)
    print(f"{m.name}: largest finite-difference relative error {raw:.2e} ({worst:.2e} beyond round-off)")


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_every_backend_matches_numpy_float64(m, backend):
    for ex in _cases(m, seed=1):
        y, pb = normref.vjp(m, *ex.args, **ex.kwargs)
        g = np.random.default_rng(7).standard_normal(y.shape)
        grads = pb(g)
        args, kwargs = backend.convert(ex.args, ex.kwargs, "float64")
        by, bpb = normref.vjp(m, *args, **kwargs)
        assert_same_kind(by, args[1])
        assert _rel(backend.to_numpy(by), y) <= TOL64, f"{m.name} [{ex.label}] on {backend.name}"
        bgrads = bpb(backend.asarray(g, "float64"))
        for name, a, ga, gb in zip(m.array_params, args, grads, bgrads):
            assert (ga is None) == (gb is None), f"{m.name}: gradient presence of {name}"
            if ga is not None:
                assert_same_kind(gb, a)
                assert _rel(backend.to_numpy(gb), ga) <= TOL64, f"{m.name} [{ex.label}] d{name} on {backend.name}"


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_invariants(m, backend):
    for inv in m.invariants:
        for ex in _cases(m, seed=3):
            args, kwargs = backend.convert(ex.args, ex.kwargs, "float64")
            err = inv.check(m, backend.xp, m(*args, **kwargs), args, kwargs)
            assert err is not None and err <= inv.scale * EPS64 * ex.cond, f"{m.name}: {inv.name} [{ex.label}] {err}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_low_precision_keeps_dtype(m, backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    eps = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    for ex in _cases(m, seed=2)[:2]:
        args, kwargs = backend.convert(ex.args, ex.kwargs, dtype)
        ref = m(*(None if a is None else backend.to_numpy(a).astype(np.float64) for a in args), **kwargs)
        y = m(*args, **kwargs)
        assert y.dtype == args[1].dtype
        # norms in float32 (≤ 64·ε₃₂ for ≤ 50 elements), then one rounding to the dtype (|y| ≤ 4: 8·ε)
        tol = 64 * 2.0**-23 + (0 if dtype == "float32" else 8 * eps)
        assert _rel(backend.to_numpy(y), ref) <= tol


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_torch_autograd_through_the_forward(m, rng):
    """torch autograd differentiating normref's own (array-API) forward is an oracle for the backward."""
    for ex in _cases(m, seed=5):
        targs = [None if a is None else torch.tensor(a, requires_grad=True) for a in ex.args]
        with normref.use_adapters(False):  # autograd through the formula (a plain call is routed to the adapter)
            y = m(*targs, **ex.kwargs)
        assert "Normref" not in type(y.grad_fn).__name__  # the oracle is torch's autograd, not normref's backward
        g = rng.standard_normal(tuple(y.shape))
        y.backward(torch.tensor(g))
        _, pb = normref.vjp(m, *ex.args, **ex.kwargs)
        for t, d in zip(targs, pb(g)):
            if t is None:
                assert d is None
                continue
            auto = np.zeros(t.shape) if t.grad is None else t.grad.numpy()  # unused weight: gradient 0
            assert _rel(d, auto) <= TOL64, f"{m.name} [{ex.label}]"


# ---------------------------------------------------------------------------------------------------
# the formulas, by hand


def test_lars_equals_its_formula(rng):
    w, g = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 2)) * 0.01
    eta, wd, eps = 0.02, 5e-4, 1e-9
    nw, ng = np.linalg.norm(w), np.linalg.norm(g)
    lam = eta * nw / (ng + wd * nw + eps)  # You et al. 2017, Algorithm 1
    assert _rel(normref.lars(w, g, eta=eta, weight_decay=wd, eps=eps), lam * (g + wd * w)) <= TOL64
    # defaults: η = 1e-3, no weight decay, ε = 1e-8
    assert _rel(normref.lars(w, g), 1e-3 * nw / (ng + 1e-8) * g) <= TOL64
    # a zero gradient or a zero weight: trust ratio 1 (LARC/timm), finite gradients
    y, pb = normref.vjp(normref.lars, w, np.zeros_like(g), weight_decay=wd)
    assert _rel(y, wd * w) <= TOL64
    y, pb = normref.vjp(normref.lars, np.zeros_like(w), g, weight_decay=wd)
    assert _rel(y, g) <= TOL64
    assert all(np.all(np.isfinite(d)) for d in pb(np.ones_like(g)))


def test_block_gradient_norm(rng):
    w, g = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)) * 1e-3
    y = normref.block_gradient_norm(w, g)
    assert abs(np.linalg.norm(y) - 1) <= 64 * EPS64 and _rel(y, g / np.linalg.norm(g)) <= TOL64
    y = normref.block_gradient_norm(w, g, ratio=True)
    assert _rel(y, np.linalg.norm(w) * g / np.linalg.norm(g)) <= TOL64
    assert _rel(normref.block_gradient_norm(None, g), g / np.linalg.norm(g)) <= TOL64
    # zero gradient: g/ε = 0, never NaN, and a finite backward
    y, pb = normref.vjp(normref.block_gradient_norm, w, np.zeros_like(g))
    assert np.all(y == 0) and all(np.all(np.isfinite(d)) for d in pb(np.ones_like(g)))
    # scale invariance in g: the normalized step does not depend on the gradient's magnitude
    assert _rel(normref.block_gradient_norm(w, 7.0 * g), normref.block_gradient_norm(w, g)) <= 1e-12


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3), (3, 2, 2, 2, 2)])
def test_gradient_centralization_rows_have_zero_mean(shape, rng):
    g = rng.standard_normal(shape) + 2.0
    y = normref.gradient_centralization(None, g)
    rows = y.reshape(shape[0], -1)
    np.testing.assert_allclose(rows.mean(axis=1), 0, atol=64 * EPS64 * 3)
    ref = g - g.reshape(shape[0], -1).mean(axis=1).reshape((shape[0],) + (1,) * (len(shape) - 1))
    assert _rel(y, ref) <= TOL64
    # idempotent: a centralized gradient is already centered
    assert _rel(normref.gradient_centralization(None, y), y) <= TOL64


def test_sequences_of_layers_map_each_layer_on_its_own(rng):
    ws = [rng.standard_normal((4, 3)), rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((5, 2))]
    gs = [rng.standard_normal(w.shape) for w in ws]
    before = [g.copy() for g in gs]
    for m, kw in [(normref.lars, dict(weight_decay=1e-4)), (normref.block_gradient_norm, dict(ratio=True)),
                  (normref.gradient_centralization, {})]:
        out = m(ws, gs, **kw)
        assert isinstance(out, tuple) and len(out) == 3
        for w, g, o in zip(ws, gs, out):
            assert _rel(o, m(w, g, **kw)) == 0.0
    for g, b in zip(gs, before):
        np.testing.assert_array_equal(g, b)  # pure
    # GC without weights
    assert len(normref.gradient_centralization(None, gs)) == 3
    # torch tensors stay torch tensors
    tout = normref.lars([torch.tensor(w) for w in ws], [torch.tensor(g) for g in gs])
    assert all(isinstance(t, torch.Tensor) for t in tout)


# ---------------------------------------------------------------------------------------------------
# bad input


def test_bad_input():
    w, g = np.ones((3, 4)), np.ones((3, 4))
    with pytest.raises(ValueError, match=r"lars: weight and grad must have the same shape; got weight \(3, 4\) and grad \(4, 3\)"):
        normref.lars(w, g.T)
    with pytest.raises(ValueError, match="lars: weight is required"):
        normref.lars(None, g)
    with pytest.raises(ValueError, match="block_gradient_norm: weight is required"):
        normref.block_gradient_norm(None, g, ratio=True)
    with pytest.raises(TypeError, match="block_gradient_norm: ratio must be a bool"):
        normref.block_gradient_norm(w, g, ratio=1)
    with pytest.raises(ValueError, match=r"gradient_centralization: grad must have at least 2 dimensions.*got shape \(4,\)"):
        normref.gradient_centralization(None, np.ones(4))
    with pytest.raises(ValueError, match="lars: eta must be a finite number > 0"):
        normref.lars(w, g, eta=0.0)
    with pytest.raises(ValueError, match="lars: weight_decay must be a finite number >= 0"):
        normref.lars(w, g, weight_decay=-1e-4)
    with pytest.raises(ValueError, match="lars: with a sequence of 2 gradients, weight must be a sequence of 2"):
        normref.lars([w], [g, g])
    with pytest.raises(TypeError, match="lars: grad must be an array"):
        normref.lars(w, 3.0)
    with pytest.raises(TypeError, match="gradient_centralization: all arrays must come from one library"):
        normref.gradient_centralization(torch.ones(3, 4, dtype=torch.float64), g)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(0, 2**31),
       st.sampled_from([0.0, 1e-4, 1e-2]))
def test_hypothesis_gradient_methods(shape, seed, wd):
    rng = np.random.default_rng(seed)
    w, g = rng.standard_normal(shape), rng.standard_normal(shape)
    for m, kw in [(normref.lars, dict(weight_decay=wd, eta=0.01)), (normref.block_gradient_norm, dict(ratio=True)),
                  (normref.gradient_centralization, {})]:
        r = fd_check(m, (w, g), kw, seed=seed % 1000)
        assert r.max_error <= 1e-6, (m.name, shape, r.errors)
