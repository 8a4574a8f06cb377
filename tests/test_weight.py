"""Normalizing weights (issue 4, survey §6) on every array library.

Tolerances
- float64 backends vs the NumPy float64 evaluation: the same formula in another order of operations;
  each output passes through O(10) roundings and a reduction over ≤ 50 elements (or a matrix product
  of that size), so the error is ≤ c·n·ε₆₄ with c·n ≤ 1e3: ``TOL64 = 1e3·ε₆₄`` (relative to max|ref|).
- torch (its own functions, or torch autograd through normref's forward, float64): the same bound.
- backward vs central finite differences (float64): ≤ 1e-6 relative, as the issue asks; see
  conformance/fd.py for why that is a bound with room on smooth problems (≈1e-10 is typical).
- invariants: ``Invariant.scale·ε₆₄·cond`` (the registry's own scale, 64; cond from the example).
- properties evaluated twice in float64 (scale invariance): ``1e-12`` relative. Both evaluations are
  exact up to ~100·ε₆₄ ≈ 2e-14 in these sizes; eps terms that break scale invariance exactly are set
  to 1e-30 (their relative effect ε/‖v‖² ~ 1e-30 is far below round-off).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import normref
from normref.conformance.fd import fd_check
from tests.conftest import assert_same_kind
from tests.conftest import rel_err as _rel, registry_cases as _cases, EPS64, TOL64


FAMILY = [m for m in normref.methods(category="weight") if m.__module__ == "normref.weight"]
FAMILY_IDS = [m.name for m in FAMILY]


def _raw_fd_error(r):
    """Largest |analytic − numeric|/max(|analytic|, |numeric|, tiny) over the directions (no noise credit)."""
    return max((abs(a - n) / max(abs(a), abs(n), 1e-300) for _, a, n, _ in r.details), default=0.0)


# ---------------------------------------------------------------------------------------------------
# every method: registry, finite differences, backends, invariants, torch autograd through the forward


def test_family_is_complete():
    names = {m.name for m in FAMILY}
    assert {"weight_norm", "centered_weight_norm", "weight_standardization", "spectral_norm",
            "orthogonal_weight_norm", "oni", "orthogonal_penalty", "cosine_norm"} <= names
    for m in FAMILY:
        assert m.category == "weight"
        assert m.survey and m.paper and m.__doc__, m.name
        assert len(_cases(m)) >= 3, f"{m.name} needs examples"
        assert m.invariants, f"{m.name} needs invariants"
        assert getattr(normref, m.name) is m


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_backward_matches_finite_differences(m):
    worst = raw = 0.0
    for i, ex in enumerate(_cases(m)):
        r = fd_check(m, ex.args, ex.kwargs, seed=i, directions=3)
        assert r.errors, f"{m.name} [{ex.label}]: no argument was checked"
        assert r.max_error <= 1e-6, f"{m.name} [{ex.label}]: {r.errors}"
        assert _raw_fd_error(r) <= 1e-6, f"{m.name} [{ex.label}]: {r.details}"
        worst, raw = max(worst, r.max_error), max(raw, _raw_fd_error(r))
    print(f"{m.name}: largest finite-difference relative error {raw:.2e} ({worst:.2e} beyond round-off)")


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_every_backend_matches_numpy_float64(m, backend):
    for ex in _cases(m, seed=1):
        out, pb = normref.vjp(m, *ex.args, **ex.kwargs)
        y = m.primary(out)
        g = np.asarray(np.random.default_rng(7).standard_normal(np.shape(y)))
        grads = pb(g)
        args, kwargs = backend.convert(ex.args, ex.kwargs, "float64")
        bout, bpb = normref.vjp(m, *args, **kwargs)
        by = m.primary(bout)
        assert_same_kind(by, args[0])
        assert tuple(by.shape) == np.shape(y)
        assert _rel(backend.to_numpy(by), y) <= TOL64, f"{m.name} [{ex.label}] forward on {backend.name}"
        if isinstance(out, tuple):  # auxiliary state (spectral_norm's u): same kind, same values
            for a, b in zip(bout[1:], out[1:]):
                assert_same_kind(a, args[1])
                assert _rel(backend.to_numpy(a), b) <= TOL64
        bgrads = bpb(backend.asarray(g, "float64"))  # 0-d stays 0-d (orthogonal_penalty)
        bound = m.bind(*args, **kwargs).arguments
        for name, ga, gb in zip(m.array_params, grads, bgrads):
            assert (ga is None) == (gb is None), f"{m.name}: gradient presence of {name}"
            if ga is not None:
                assert_same_kind(gb, bound[name])
                assert _rel(backend.to_numpy(gb), ga) <= TOL64, f"{m.name} [{ex.label}] d{name} on {backend.name}"


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_invariants(m, backend):
    for inv in m.invariants:
        applied = 0
        for ex in _cases(m, seed=3):
            args, kwargs = backend.convert(ex.args, ex.kwargs, "float64")
            err = inv.check(m, backend.xp, m(*args, **kwargs), args, kwargs)
            if err is None:
                continue
            applied += 1
            assert err <= inv.scale * EPS64 * ex.cond, f"{m.name}: {inv.name} [{ex.label}] error {err:.2e}"
        assert applied, f"{m.name}: invariant {inv.name!r} applied to no example (it could not fail)"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_low_precision_keeps_dtype_and_accuracy(m, backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    eps = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    for ex in _cases(m, seed=2)[:3]:
        args, kwargs = backend.convert(ex.args, ex.kwargs, dtype)
        r_args = tuple(backend.to_numpy(a).astype(np.float64) if hasattr(a, "shape") else a for a in args)
        ref = m.primary(m(*r_args, **kwargs))
        y = m.primary(m(*args, **kwargs))
        assert y.dtype == args[0].dtype
        # computed in float32 (≤ 64·ε₃₂·cond for these sizes), then one rounding to the dtype (ε/2 of
        # |y| ≤ 4 here: 8·ε covers it with room)
        tol = 64 * 2.0**-23 * ex.cond + (0 if dtype == "float32" else 8 * eps)
        err = _rel(backend.to_numpy(y), ref)
        assert err <= tol, f"{m.name} [{ex.label}] {dtype} on {backend.name}: {err:.2e} > {tol:.2e}"


torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("m", FAMILY, ids=FAMILY_IDS)
def test_torch_autograd_through_the_forward_matches_the_analytic_backward(m, rng):
    """normref's forward is array-API code, so torch autograd can differentiate it: an oracle for the
    hand-derived backward (through ``fd_target`` where the backward freezes constants: spectral_norm)."""
    for ex in _cases(m, seed=5):
        args = [(_t(a, True) if isinstance(a, np.ndarray) else a) for a in ex.args]
        kwargs = {k: (_t(a) if isinstance(a, np.ndarray) else a) for k, a in ex.kwargs.items()}  # spectral_norm's v
        fn = m.fd_target(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs) \
            if m.fd_target else m
        with normref.use_adapters(False):  # autograd through the formula (a plain call is routed to the adapter)
            y = m.primary(fn(*args, **kwargs))
        assert "Normref" not in type(y.grad_fn).__name__  # the oracle is torch's autograd, not normref's backward
        g = rng.standard_normal(tuple(y.shape))
        y.backward(torch.tensor(g))
        _, pb = normref.vjp(m, *ex.args, **ex.kwargs)
        grads = pb(g)
        names = list(m.signature.parameters)
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or names[i] in m.nondiff:
                continue
            j = m.array_params.index(names[i])
            assert _rel(grads[j], a.grad.numpy()) <= TOL64, f"{m.name} [{ex.label}] d{names[i]}"


# ---------------------------------------------------------------------------------------------------
# torch's own implementations as external oracles


@pytest.mark.parametrize("shape,dim", [((5, 3), 0), ((4, 3, 2, 2), 0), ((3, 4, 5), 1), ((3, 4, 5), 2), ((4, 6), None)])
def test_weight_norm_matches_torch(shape, dim, rng):
    v = rng.standard_normal(shape)
    tv = _t(v, True)
    # torch's own g: norm_except_dim(v, 2, dim) (dim=None is torch's whole-tensor -1), rescaled
    tdim = -1 if dim is None else dim
    g0 = np.asarray(torch.norm_except_dim(torch.tensor(v), 2, tdim).numpy() * rng.uniform(0.5, 2.0))
    tg = _t(g0, True)
    ref = torch._weight_norm(tv, tg, tdim)
    gout = rng.standard_normal(shape)
    ref.backward(torch.tensor(gout))
    w, pb = normref.vjp(normref.weight_norm, v, g0, dim=dim)
    dv, dg = pb(gout)
    assert _rel(w, ref.detach().numpy()) <= TOL64
    assert _rel(dv, tv.grad.numpy()) <= TOL64 and _rel(dg, tg.grad.numpy()) <= TOL64
    assert dg.shape == g0.shape


def test_weight_norm_matches_torch_parametrization_module(rng):
    from torch.nn.utils.parametrizations import weight_norm as wn

    conv = wn(torch.nn.Conv2d(3, 4, 3, dtype=torch.float64), dim=0)
    p = conv.parametrizations.weight
    g, v = p.original0.detach().numpy(), p.original1.detach().numpy()
    w = conv.weight
    gout = rng.standard_normal(tuple(w.shape))
    w.backward(torch.tensor(gout))
    ours, pb = normref.vjp(normref.weight_norm, v, g)
    dv, dg = pb(gout)
    assert _rel(ours, w.detach().numpy()) <= TOL64
    assert _rel(dg, p.original0.grad.numpy()) <= TOL64 and _rel(dv, p.original1.grad.numpy()) <= TOL64


_SN_LAYERS = {
    "linear": lambda: torch.nn.Linear(5, 4, dtype=torch.float64),
    "conv2d": lambda: torch.nn.Conv2d(3, 4, 2, dtype=torch.float64),
    # weight (d_in, d_out, k, k) = (3, 4, 2, 2): torch normalizes along dim=1 for transposed convolutions
    "conv_transpose2d": lambda: torch.nn.ConvTranspose2d(3, 4, 2, dtype=torch.float64),
}
_SN_STEPS = 4


def _sgd_step(p, lr=0.3):
    """W changes between calls, as in training (the state (u, v) then lags behind W)."""
    with torch.no_grad():
        p -= lr * p.grad
    p.grad = None


# Tolerance for the spectral-norm comparisons with torch: both sides compute the same matrix-vector
# products and norms (≤ 16 terms each) in another order, ≤ 16·ε₆₄ per product; the power iteration
# contracts errors in u and v (it does not amplify them: the ratio σ₂/σ₁ < 1 here), and σ and W/σ add a
# few roundings more, so every entry agrees to ≤ 1e3·ε₆₄ = TOL64 (measured: ≤ 2e-15) over the steps.


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("layer", list(_SN_LAYERS))
def test_spectral_norm_matches_torch_parametrization(layer, iters, rng):
    """torch.nn.utils.parametrizations.spectral_norm keeps (u, v) and iterates u = N(W·v), v = N(Wᵀ·u),
    σ = uᵀ·W·v: given its (u, v) before each call (``v=`` keyword), normref returns its weight, its
    updated buffers ``_u`` and ``_v`` and its gradient, over several training steps with W changing,
    and its eval-mode weight (no iteration) too."""
    from torch.nn.utils.parametrizations import spectral_norm as sn

    torch.manual_seed(iters)
    mod = sn(_SN_LAYERS[layer](), n_power_iterations=iters)
    p = mod.parametrizations.weight
    dim = p[0].dim
    assert dim == (1 if layer == "conv_transpose2d" else 0)
    for step in range(_SN_STEPS):
        u0, v0 = p[0]._u.clone().numpy(), p[0]._v.clone().numpy()
        w0 = p.original.detach().clone().numpy()
        w = mod.weight  # training mode: `iters` power-iteration steps, then σ
        gout = rng.standard_normal(tuple(w.shape))
        w.backward(torch.tensor(gout))
        (ours, u1, v1), pb = normref.vjp(normref.spectral_norm, w0, u0, iters, dim=dim, v=v0)
        dw, du, dv = pb(gout)
        assert du is None and dv is None
        assert _rel(ours, w.detach().numpy()) <= TOL64, step
        assert _rel(u1, p[0]._u.numpy()) <= TOL64 and _rel(v1, p[0]._v.numpy()) <= TOL64, step
        assert _rel(dw, p.original.grad.numpy()) <= TOL64, step
        _sgd_step(p.original)
    mod.eval()
    w = mod.weight
    ours = normref.spectral_norm(p.original.detach().numpy(), p[0]._u.numpy(), 0, dim=dim, v=p[0]._v.numpy())
    assert _rel(ours.weight, w.detach().numpy()) <= TOL64
    np.testing.assert_array_equal(ours.u, p[0]._u.numpy())  # no iteration: the state comes back as given
    np.testing.assert_array_equal(ours.v, p[0]._v.numpy())


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("layer", list(_SN_LAYERS))
def test_spectral_norm_matches_torch_hook(layer, iters, rng):
    """torch.nn.utils.spectral_norm (the legacy forward pre-hook) keeps u and iterates v = N(Wᵀ·u),
    u = N(W·v): given its u before each call (no ``v``), normref returns its weight, its updated
    ``weight_u`` and ``weight_v`` and its gradient, over several steps with W changing; in eval mode the
    hook uses its stored (u, v): normref with ``v=`` and no iteration."""
    torch.manual_seed(10 + iters)
    mod = _SN_LAYERS[layer]()
    dim = 1 if layer == "conv_transpose2d" else 0
    torch.nn.utils.spectral_norm(mod, n_power_iterations=iters)  # torch's own dim default
    from torch.nn.utils.spectral_norm import SpectralNorm as Hook

    hook = next(h for h in mod._forward_pre_hooks.values() if isinstance(h, Hook))
    assert hook.dim == dim
    for step in range(_SN_STEPS):
        u0 = mod.weight_u.detach().clone().numpy()
        w0 = mod.weight_orig.detach().clone().numpy()
        w_sn = hook.compute_weight(mod, do_power_iteration=True)
        gout = rng.standard_normal(tuple(w_sn.shape))
        w_sn.backward(torch.tensor(gout))
        (ours, u1, v1), pb = normref.vjp(normref.spectral_norm, w0, u0, n_power_iterations=iters, dim=dim)
        dw, du, dv = pb(gout)
        assert du is None and dv is None
        assert _rel(ours, w_sn.detach().numpy()) <= TOL64, step
        assert _rel(u1, mod.weight_u.numpy()) <= TOL64 and _rel(v1, mod.weight_v.numpy()) <= TOL64, step
        assert _rel(dw, mod.weight_orig.grad.numpy()) <= TOL64, step
        _sgd_step(mod.weight_orig)
    w_eval = hook.compute_weight(mod, do_power_iteration=False)
    ours = normref.spectral_norm(mod.weight_orig.detach().numpy(), mod.weight_u.numpy(), 0, dim=dim,
                                 v=mod.weight_v.numpy())
    assert _rel(ours.weight, w_eval.detach().numpy()) <= TOL64


def test_spectral_norm_state_orders_differ():
    """The two orders are different maps of the state: with the same u (and v = N(Wᵀu), what the
    hook would compute first) one step of each gives different u (so the keyword matters)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 5))
    u = rng.standard_normal(4)
    u /= np.linalg.norm(u)
    v = rng.standard_normal(5)
    v /= np.linalg.norm(v)
    hook = normref.spectral_norm(w, u, 1)
    param = normref.spectral_norm(w, u, 1, v=v)
    ref_u = w @ v / np.linalg.norm(w @ v)  # the parametrization: u = N(W·v) first
    ref_v = w.T @ ref_u / np.linalg.norm(w.T @ ref_u)
    assert _rel(param.u, ref_u) <= 64 * EPS64 and _rel(param.v, ref_v) <= 64 * EPS64
    assert _rel(hook.u, ref_u) > 1e-3


def test_weight_standardization_matches_timm_style_batch_norm(rng):
    """timm's StdConv2d: F.batch_norm over the rows (biased variance, eps inside the root)."""
    v = rng.standard_normal((4, 3, 3, 3)) * 0.2 + 0.1
    tv = _t(v, True)
    ref = F.batch_norm(tv.reshape(1, 4, -1), None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(tv)
    gout = rng.standard_normal(v.shape)
    ref.backward(torch.tensor(gout))
    w, pb = normref.vjp(normref.weight_standardization, v, eps=1e-6)
    assert _rel(w, ref.detach().numpy()) <= TOL64
    assert _rel(pb(gout)[0], tv.grad.numpy()) <= TOL64


def test_centered_weight_norm_and_cosine_norm_match_torch_formulas(rng):
    v, g = rng.standard_normal((5, 2, 3)), rng.standard_normal(5)
    tv, tg = _t(v, True), _t(g, True)
    c = tv.reshape(5, -1) - tv.reshape(5, -1).mean(1, keepdim=True)
    ref = (tg[:, None] * c / c.norm(dim=1, keepdim=True)).reshape(5, 2, 3)
    gout = rng.standard_normal(v.shape)
    ref.backward(torch.tensor(gout))
    w, pb = normref.vjp(normref.centered_weight_norm, v, g)
    dv, dg = pb(gout)
    assert _rel(w, ref.detach().numpy()) <= TOL64
    assert _rel(dv, tv.grad.numpy()) <= TOL64 and _rel(dg, tg.grad.numpy()) <= TOL64
    # cosine normalization: F.normalize on both sides (eps tiny so both are the exact cosine)
    x, wt = rng.standard_normal((6, 12)), rng.standard_normal((3, 4, 3))
    tx, tw = _t(x, True), _t(wt, True)
    ref = F.normalize(tx, dim=-1, eps=1e-300) @ F.normalize(tw.reshape(3, -1), dim=-1, eps=1e-300).T
    gout = rng.standard_normal((6, 3))
    ref.backward(torch.tensor(gout))
    y, pb = normref.vjp(normref.cosine_norm, x, wt, eps=1e-300)
    dx, dw = pb(gout)
    assert _rel(y, ref.detach().numpy()) <= TOL64
    assert _rel(dx, tx.grad.numpy()) <= TOL64 and _rel(dw, tw.grad.numpy()) <= TOL64
    # and F.cosine_similarity for one row
    cs = F.cosine_similarity(torch.tensor(x), torch.tensor(wt.reshape(3, -1)[1:2]), dim=-1, eps=1e-300)
    assert _rel(y[:, 1], cs.numpy()) <= TOL64


def _torch_penalty(a, kind, side):
    """The penalties of Bansal et al. 2018 / Xie et al. 2017 / BigGAN, written directly in torch."""
    g = a @ a.T if side == "rows" else a.T @ a
    eye = torch.eye(g.shape[0], dtype=torch.float64)
    if kind == "off_diagonal":
        return ((g * (1 - eye)) ** 2).sum()
    m = g - eye
    if kind == "frobenius":
        return (m**2).sum()
    if kind == "double":
        return (m**2).sum() + ((a.T @ a - torch.eye(a.shape[1], dtype=torch.float64)) ** 2).sum()
    if kind == "mc":
        return m.abs().max()
    return torch.linalg.matrix_norm(m, ord=2)  # srip: the largest singular value of M (= max |λ|)


@pytest.mark.parametrize("gram", ["rows", "columns", "auto"])
@pytest.mark.parametrize("shape", [(4, 2, 3), (6, 2, 1, 1)], ids=["wide", "tall 1x1 conv"])
@pytest.mark.parametrize("kind", ["frobenius", "double", "off_diagonal", "mc", "srip"])
def test_orthogonal_penalty_matches_torch_formula(kind, shape, gram, rng):
    """Value and gradient equal torch autograd through the formula (for "srip" through torch's SVD,
    a valid oracle at distinct singular values; random draws have them)."""
    if kind == "double" and gram != "rows":
        pytest.skip("double uses both sides: gram is ignored")
    w = rng.standard_normal(shape) * 0.4
    tw = _t(w, True)
    a = tw.reshape(shape[0], -1)
    side = gram if gram != "auto" else ("rows" if a.shape[0] <= a.shape[1] else "columns")
    ref = _torch_penalty(a, kind, side)
    ref.backward()
    val, pb = normref.vjp(normref.orthogonal_penalty, w, kind=kind, gram=gram)
    assert val.shape == () and isinstance(val, np.ndarray)
    assert _rel(val, ref.item()) <= TOL64
    assert _rel(pb(np.asarray(1.0))[0], tw.grad.numpy()) <= TOL64


def test_orthogonal_penalty_gram_sides_are_transposes(rng):
    """gram="columns" on W is gram="rows" on Wᵀ, value and gradient (transposed)."""
    w = rng.standard_normal((5, 3))
    for kind in ("frobenius", "off_diagonal", "mc", "srip"):
        v1, pb1 = normref.vjp(normref.orthogonal_penalty, w, kind=kind, gram="columns")
        v2, pb2 = normref.vjp(normref.orthogonal_penalty, w.T.copy(), kind=kind, gram="rows")
        assert _rel(v1, v2) <= TOL64, kind
        assert _rel(pb1(np.asarray(1.0))[0], pb2(np.asarray(1.0))[0].T) <= TOL64, kind
        v3 = normref.orthogonal_penalty(w, kind=kind, gram="auto")  # 5 > 3: auto takes the columns
        assert _rel(v3, v1) <= TOL64, kind


def test_mc_and_srip_subgradient_at_a_tie():
    """Orthogonal rows with ‖w₁‖² = 1 + t, ‖w₂‖² = 1 − t (t = 1/4): M = W·Wᵀ − I = diag(t, −t) has two entries
    of modulus t (MC) and the eigenvalues ±t (SRIP): both maxima are attained twice. The documented
    subgradient is the average of the two gradients, Ω = ½·diag(1, −1), ∂ψ/∂W = 2·Ω·W = (w₁, −w₂)
    (derived by hand); at M = 0 the gradient is 0."""
    t = 0.25
    # exact in binary: ‖w₁‖² = 1.25 and ‖w₂‖² = 0.75, disjoint supports (so the tie is exact, not rounded)
    w = np.array([[1.0, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.5]])
    expected = np.stack([w[0], -w[1]])
    for kind in ("mc", "srip"):
        val, pb = normref.vjp(normref.orthogonal_penalty, w, kind=kind)
        assert abs(float(val) - t) <= 8 * EPS64, kind
        np.testing.assert_allclose(pb(np.asarray(1.0))[0], expected, rtol=0, atol=8 * EPS64, err_msg=kind)
        q = np.eye(2, 5)  # orthonormal rows: the minimum
        val, pb = normref.vjp(normref.orthogonal_penalty, q, kind=kind)
        assert float(val) == 0.0 and np.all(pb(np.asarray(1.0))[0] == 0), kind


# ---------------------------------------------------------------------------------------------------
# the survey's properties


def test_row_properties(rng):
    v = rng.standard_normal((6, 3, 2, 2)) + 0.7
    g = rng.standard_normal(6)
    w = normref.weight_norm(v, g).reshape(6, -1)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), np.abs(g), rtol=64 * EPS64)
    w = normref.centered_weight_norm(v).reshape(6, -1)
    np.testing.assert_allclose(w.mean(axis=1), 0, atol=64 * EPS64)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1, rtol=64 * EPS64)
    # WS with ε → 0: mean 0 and standard deviation 1 per row (ε = 1e-30 ≪ σ² ≈ 1)
    w = normref.weight_standardization(v, eps=1e-30).reshape(6, -1)
    np.testing.assert_allclose(w.mean(axis=1), 0, atol=64 * EPS64)
    np.testing.assert_allclose(w.std(axis=1), 1, rtol=64 * EPS64)


def test_spectral_norm_converges_to_unit_top_singular_value(rng):
    w = rng.standard_normal((5, 4, 3))
    u = rng.standard_normal(5)
    for _ in range(20):  # carry u from call to call, as a layer does
        ws, u, _ = normref.spectral_norm(w, u, n_power_iterations=5)
    s = np.linalg.svd(ws.reshape(5, -1), compute_uv=False)
    # the power iteration's error decays like (σ₂/σ₁)^(2k), k = 100 here: σ₁ = 1 to round-off
    assert abs(s[0] - 1.0) <= 64 * EPS64
    s_exact = np.linalg.svd(w.reshape(5, -1), compute_uv=False)
    np.testing.assert_allclose(s, s_exact / s_exact[0], rtol=1e3 * EPS64)
    # with one iteration from a random u, σ is underestimated: σ_max(W_SN) ≥ 1 (u·Wv ≤ σ₁)
    ws1 = normref.spectral_norm(w, rng.standard_normal(5)).weight
    assert np.linalg.svd(ws1.reshape(5, -1), compute_uv=False)[0] >= 1.0 - 64 * EPS64


def _scale_cases(rng):
    v = rng.standard_normal((5, 3, 2))
    u = rng.standard_normal(5)
    x = rng.standard_normal((4, 6))
    return [
        ("weight_norm", (v, rng.standard_normal((5, 1, 1))), {}, 0),
        ("centered_weight_norm", (v, rng.standard_normal(5)), {}, 0),
        ("weight_standardization", (v,), dict(eps=1e-30), 0),
        ("spectral_norm", (v, u), dict(n_power_iterations=2), 0),
        ("cosine_norm", (x, v), dict(eps=1e-30), 1),
        ("cosine_norm", (x, v), dict(eps=1e-30), 0),
        ("orthogonal_weight_norm", (v,), {}, 0),
        ("oni", (v,), dict(iterations=4), 0),
    ]


@pytest.mark.parametrize("case", range(8))
def test_scale_invariance_and_gradient_orthogonal_to_the_proxy(case, rng):
    """ψ(a·V) = ψ(V), ∂L/∂V at a·V = (1/a)·∂L/∂V at V (survey Eqns 32–33), and ⟨∂L/∂V, V⟩ = 0."""
    name, args, kw, i = _scale_cases(rng)[case]
    m = normref.get(name)
    a = 6.5
    args2 = list(args)
    args2[i] = a * args[i]
    y1, pb1 = normref.vjp(m, *args, **kw)
    y2, pb2 = normref.vjp(m, *args2, **kw)
    y1, y2 = m.primary(y1), m.primary(y2)
    g = rng.standard_normal(y1.shape)
    d1, d2 = pb1(g)[i], pb2(g)[i]
    assert _rel(y2, y1) <= 1e-12
    assert _rel(a * d2, d1) <= 1e-12
    if name != "cosine_norm":
        assert abs(float(np.sum(d1 * args[i]))) <= 1e-12 * np.linalg.norm(d1) * np.linalg.norm(args[i])
    else:  # cosine norm is invariant per row of x and per row of w: the gradient is orthogonal row by row
        rows = args[i].reshape(args[i].shape[0], -1)
        dr = d1.reshape(rows.shape)
        assert np.max(np.abs(np.sum(dr * rows, axis=1))) <= 1e-12 * np.linalg.norm(dr) * np.linalg.norm(rows)


def test_weight_standardization_is_the_standardization_operation():
    """WS reuses normref.operation.Standardizing on the rows: same numbers as layer_norm on each row."""
    v = np.random.default_rng(3).standard_normal((4, 2, 3, 3))
    ref = normref.layer_norm(v.reshape(4, -1), (18,), eps=1e-4).reshape(v.shape)
    assert _rel(normref.weight_standardization(v, eps=1e-4), ref) <= TOL64


def test_inputs_never_mutated():
    for m in FAMILY:
        for ex in _cases(m, seed=4):
            before = [a.copy() if isinstance(a, np.ndarray) else a for a in ex.args]
            out, pb = normref.vjp(m, *ex.args, **ex.kwargs)
            g = np.ones(np.shape(m.primary(out)))
            g0 = g.copy()
            pb(g)
            for a, b in zip(ex.args, before):
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, b, err_msg=m.name)
            np.testing.assert_array_equal(g, g0)


def _centred_groups(v, c):
    z = v.reshape(v.shape[0], -1)
    z = z.reshape(z.shape[0] // c, c, -1)
    return z - z.mean(axis=-1, keepdims=True)


@pytest.mark.parametrize("shape,c", [((4, 6), 4), ((8, 3), 2), ((6, 2, 2, 2), 3), ((12, 4), 3)])
def test_own_rows_are_orthonormal_and_match_torch(shape, c, rng):
    """OWN = (Vc·Vcᵀ)^-1/2·Vc per group (the formula of Huang et al.'s code, with torch.linalg.eigh);
    torch autograd through eigh is a valid oracle here (distinct eigenvalues)."""
    v = rng.standard_normal(shape) + 0.4
    w, pb = normref.vjp(normref.orthogonal_weight_norm, v, group_size=c)
    wg = w.reshape(shape[0] // c, c, -1)
    kappa = max(float(np.linalg.cond(z @ z.T)) for z in _centred_groups(v, c))
    # the eigendecomposition's error is ~κ·ε per entry of the Gram matrix (64 for the d-term sums)
    assert np.max(np.abs(wg @ np.swapaxes(wg, 1, 2) - np.eye(c))) <= 64 * kappa * EPS64
    assert np.max(np.abs(wg.mean(axis=-1))) <= 64 * EPS64
    tv = _t(v, True)
    z = tv.reshape(shape[0] // c, c, -1)
    zc = z - z.mean(-1, keepdim=True)
    lam, d = torch.linalg.eigh(zc @ zc.transpose(1, 2))
    ref = ((d * lam.rsqrt()[:, None, :]) @ d.transpose(1, 2) @ zc).reshape(shape)
    g = rng.standard_normal(shape)
    ref.backward(torch.tensor(g))
    assert _rel(w, ref.detach().numpy()) <= TOL64 * kappa
    assert _rel(pb(g)[0], tv.grad.numpy()) <= TOL64 * kappa


def _oni_torch(tv, c, T):
    """Algorithm 1 of Huang et al. 2020 on centred rows, written directly in torch (autograd oracle)."""
    z = tv.reshape(tv.shape[0] // c, c, -1)
    zc = z - z.mean(-1, keepdim=True)
    vh = zc / zc.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()  # V = Z/‖Z‖_F
    s = vh @ vh.transpose(1, 2)
    b = torch.eye(c, dtype=torch.float64).expand_as(s)
    for _ in range(T):
        b = 1.5 * b - 0.5 * b @ b @ b @ s
    return (b @ vh).reshape(tv.shape)


@pytest.mark.parametrize("iteration", ["newton", "newton_schulz"])
@pytest.mark.parametrize("shape,c,T", [((4, 6), 4, 3), ((6, 3, 2, 2), 3, 5), ((8, 3), 2, 2)])
def test_oni_matches_algorithm_1_in_torch(shape, c, T, iteration, rng):
    v = rng.standard_normal(shape) + 0.2
    tv = _t(v, True)
    ref = _oni_torch(tv, c, T)
    g = rng.standard_normal(shape)
    ref.backward(torch.tensor(g))
    w, pb = normref.vjp(normref.oni, v, iterations=T, group_size=c, iteration=iteration)
    # the two recurrences are the same polynomial in S: equal up to rounding, which the literal
    # recurrence amplifies by the factor the registry's _newton_amplification derives
    from normref.weight import _newton_amplification

    cond = _newton_amplification(v, c, T)
    assert _rel(w, ref.detach().numpy()) <= TOL64 * cond
    assert _rel(pb(g)[0], tv.grad.numpy()) <= TOL64 * cond


def test_oni_interpolates_between_frobenius_scaling_and_orthogonality(rng):
    """Singular values of W lie in [σ_i(V̂), 1] and grow with T to 1 (W·Wᵀ = I); V̂ = Vc/‖Vc‖_F."""
    v = rng.standard_normal((4, 2, 4)) + 0.3
    z = _centred_groups(v, 4)[0]
    base = np.linalg.svd(z / np.linalg.norm(z), compute_uv=False)
    prev = base
    for T in [1, 2, 3, 5, 8]:
        sv = np.linalg.svd(normref.oni(v, T).reshape(4, -1), compute_uv=False)
        assert np.all(sv <= 1 + 64 * EPS64) and np.all(sv >= prev - 64 * EPS64), T
        assert sv[-1] > base[-1]  # the smallest singular value is stretched, strictly
        prev = sv
    w = normref.oni(v, 40).reshape(4, -1)  # T large: orthonormal rows (κ(S) ≈ 1e1 here)
    assert np.max(np.abs(w @ w.T - np.eye(4))) <= 64 * EPS64
    # the limit is OWN
    assert _rel(w, normref.orthogonal_weight_norm(v).reshape(4, -1)) <= 1e3 * EPS64


def test_literal_newton_recurrence_is_unstable_for_large_T_as_documented():
    """The docstring's claim: the paper's recurrence loses W·Wᵀ = I at large T when κ(S) > 2.44, the
    coupled Newton–Schulz form (the default) does not."""
    rng = np.random.default_rng(0)
    for _ in range(50):  # a draw with κ(S) between 10 and 100
        v = rng.standard_normal((3, 5)) + 0.3
        z = _centred_groups(v, 3)[0]
        if 10 < np.linalg.cond(z @ z.T) < 100:
            break
    bad = normref.oni(v, 25, iteration="newton")
    good = normref.oni(v, 25)
    assert not np.all(np.isfinite(bad)) or np.max(np.abs(bad @ bad.T - np.eye(3))) > 1e-3
    assert np.max(np.abs(good @ good.T - np.eye(3))) <= 64 * EPS64


# ---------------------------------------------------------------------------------------------------
# bad input: a clear error, raised before any work, naming the function and the argument


def _raises(exc, match, fn, *a, **k):
    with pytest.raises(exc, match=match):
        fn(*a, **k)


def test_weight_with_fewer_than_two_dimensions():
    v1, g = np.ones(4), np.ones(4)
    _raises(ValueError, r"weight_norm: v must have at least 2 dimensions.*shape \(4,\)", normref.weight_norm, v1, g)
    _raises(ValueError, "centered_weight_norm: v must have at least 2", normref.centered_weight_norm, v1)
    _raises(ValueError, "weight_standardization: v must have at least 2", normref.weight_standardization, v1)
    _raises(ValueError, "spectral_norm: w must have at least 2", normref.spectral_norm, v1, np.ones(4))
    _raises(ValueError, "orthogonal_penalty: w must have at least 2", normref.orthogonal_penalty, v1)
    _raises(ValueError, "orthogonal_weight_norm: v must have at least 2", normref.orthogonal_weight_norm, v1)
    _raises(ValueError, "oni: v must have at least 2", normref.oni, v1)
    _raises(ValueError, "cosine_norm: w must have at least 2", normref.cosine_norm, np.ones((2, 4)), v1)
    _raises(ValueError, "must not be empty", normref.weight_standardization, np.ones((3, 0)))


def test_dim_out_of_range():
    v = np.ones((3, 4))
    _raises(ValueError, r"weight_norm: dim must lie in \[-2, 1\].*got 2", normref.weight_norm, v, np.ones(3), dim=2)
    _raises(ValueError, r"spectral_norm: dim must lie in \[-2, 1\].*got -3", normref.spectral_norm, v, np.ones(3), dim=-3)
    _raises(TypeError, "weight_norm: dim must be an integer or None; got float", normref.weight_norm, v, np.ones(3), dim=1.0)
    # spectral_norm has no whole-tensor mode: None is rejected, and the message does not offer it
    with pytest.raises(TypeError, match="spectral_norm: dim must be an integer; got NoneType") as e:
        normref.spectral_norm(v, np.ones(3), dim=None)
    assert "None)" not in str(e.value).split(";")[0]


def test_g_and_u_of_the_wrong_shape():
    v = np.random.default_rng(0).standard_normal((3, 4, 2))
    _raises(ValueError, r"weight_norm: g must have shape \(3, 1, 1\).*got shape \(4,\)", normref.weight_norm, v, np.ones(4))
    _raises(ValueError, r"weight_norm: g must have shape \(1, 4, 1\)", normref.weight_norm, v, np.ones((3, 1, 1)), dim=1)
    _raises(ValueError, "weight_norm: with dim=None, g must hold one value", normref.weight_norm, v, np.ones(3), dim=None)
    _raises(ValueError, r"centered_weight_norm: g must have shape \(3,\)", normref.centered_weight_norm, v, np.ones(8))
    _raises(ValueError, r"spectral_norm: u must have shape \(4,\).*dim=1.*got shape \(3,\)",
            normref.spectral_norm, v, np.ones(3), dim=1)
    _raises(ValueError, r"spectral_norm: v must have shape \(8,\).*dim=0.*got shape \(6,\)",
            normref.spectral_norm, v, np.ones(3), v=np.ones(6))
    _raises(ValueError, r"spectral_norm: v must have shape \(6,\).*dim=1.*got shape \(8,\)",
            normref.spectral_norm, v, np.ones(4), dim=1, v=np.ones(8))
    _raises(ValueError, "cosine_norm: x's last dimension must be w's fan-in 8", normref.cosine_norm, np.ones((2, 4)), v)


def test_zero_rows_raise_or_follow_the_documented_eps():
    v = np.random.default_rng(0).standard_normal((3, 4))
    v[1] = 0.0
    _raises(ValueError, r"weight_norm: v has a zero slice \(index 1 along dim=0\)", normref.weight_norm, v, np.ones(3))
    c = v.copy()
    c[2] = 5.0  # constant: zero after centering
    _raises(ValueError, "centered_weight_norm: row 1 of v is constant", normref.centered_weight_norm, c)
    _raises(ValueError, "spectral_norm: the estimated spectral norm", normref.spectral_norm, np.zeros((3, 4)), np.ones(3))
    # WS: eps inside the root, a constant row becomes a zero row, gradients finite
    w, pb = normref.vjp(normref.weight_standardization, c)
    assert np.all(np.isfinite(w)) and np.all(w[1] == 0) and np.all(w[2] == 0)
    assert np.all(np.isfinite(pb(np.ones_like(w))[0]))
    # cosine norm: a zero input or a zero weight row gives 0, never NaN (eps inside the roots)
    x = np.random.default_rng(1).standard_normal((2, 4))
    x[0] = 0.0
    y, pb = normref.vjp(normref.cosine_norm, x, v)
    assert np.all(np.isfinite(y)) and np.all(y[0] == 0) and np.all(y[:, 1] == 0)
    assert all(np.all(np.isfinite(d)) for d in pb(np.ones_like(y)))
    _raises(ValueError, "cosine_norm: eps must be a finite number > 0", normref.cosine_norm, x, v, eps=0.0)
    _raises(ValueError, "weight_standardization: eps must be a finite number > 0", normref.weight_standardization, v, eps=-1.0)


def test_group_size_and_iterations():
    v = np.random.default_rng(0).standard_normal((6, 4))
    _raises(ValueError, r"orthogonal_weight_norm: group_size must divide d_out = v.shape\[0\] = 6.*got group_size=4",
            normref.orthogonal_weight_norm, v, group_size=4)
    _raises(ValueError, r"oni: group_size must divide d_out", normref.oni, v, group_size=5)
    _raises(ValueError, r"orthogonal_weight_norm: group_size must be at most fan_in − 1 = 3",
            normref.orthogonal_weight_norm, v, group_size=6)
    _raises(ValueError, "orthogonal_weight_norm: group_size must be an integer >= 1", normref.orthogonal_weight_norm,
            v, group_size=0)
    _raises(ValueError, "oni: iterations must be an integer >= 1; got 0", normref.oni, v, 0)
    _raises(TypeError, "oni: iterations must be an integer", normref.oni, v, 2.5)
    _raises(ValueError, "oni: iteration must be one of", normref.oni, v, 3, iteration="cayley")
    _raises(ValueError, "oni: eps must be a finite number >= 0", normref.oni, v, eps=-1.0)
    # a singular group (two equal rows) or a group that vanishes after centring
    d = np.random.default_rng(1).standard_normal((3, 6))
    d[2] = d[0]
    _raises(ValueError, "orthogonal_weight_norm: Vc·Vcᵀ .* numerically singular", normref.orthogonal_weight_norm, d)
    _raises(ValueError, r"oni: a group of rows of v is zero after centring", normref.oni, np.ones((2, 5)), group_size=1)
    # with eps the singular group is fine (documented), and ONI handles rank deficiency without NaN
    assert np.all(np.isfinite(normref.orthogonal_weight_norm(d, eps=1e-3)))
    assert np.all(np.isfinite(normref.oni(d)))


def test_single_zero_row_own_and_oni_no_warning_no_nan():
    """One zero row in v, under warnings-as-errors: OWN (eps = 0) raises ValueError naming the group
    before any square root of a (rounding-noise, possibly negative) eigenvalue is taken; OWN with
    eps > 0 and ONI (any T, both iterations) are finite, and ONI's row stays exactly zero: W = B_T·Zc
    with B_T a polynomial in S, and S's zero row and column keep B_T's row block-diagonal there."""
    import warnings

    v = np.random.default_rng(5).standard_normal((4, 6))
    v[2] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            _raises(ValueError, r"orthogonal_weight_norm: Vc·Vcᵀ .* numerically singular for the group of rows 0..3",
                    normref.orthogonal_weight_norm, v)
            w, pb = normref.vjp(normref.orthogonal_weight_norm, v, eps=1e-3)
            assert np.all(np.isfinite(w)) and np.all(np.isfinite(pb(np.ones_like(w))[0]))
            for it in ("newton_schulz", "newton"):
                for T in (1, 5, 12):
                    w, pb = normref.vjp(normref.oni, v, T, iteration=it)
                    assert np.all(np.isfinite(w)) and np.all(w[2] == 0), (it, T)
                    assert np.all(np.isfinite(pb(np.ones_like(w))[0])), (it, T)
    # the same in torch (its own sqrt would give NaN silently, no warning to catch)
    tv = torch.tensor(v)
    _raises(ValueError, "orthogonal_weight_norm: Vc·Vcᵀ .* numerically singular", normref.orthogonal_weight_norm, tv)


def test_own_default_groups_when_d_out_exceeds_fan_in(rng):
    """group_size=None: one group when d_out ≤ fan_in − 1; else the largest divisor of d_out that is
    ≤ fan_in − 1, each group orthonormal; a prime d_out gets rows of one (centered WN)."""
    from normref.weight import _own_default_group_size as dflt

    assert [dflt(4, 6), dflt(8, 3), dflt(6, 5), dflt(12, 5), dflt(7, 4), dflt(3, 1)] == [4, 2, 3, 4, 1, 1]
    for shape, c in [((8, 3), 2), ((12, 5), 4), ((6, 2, 2, 2), 6), ((7, 4), 1)]:
        v = rng.standard_normal(shape) + 0.3
        w = normref.orthogonal_weight_norm(v)
        np.testing.assert_array_equal(w, normref.orthogonal_weight_norm(v, group_size=c))
        wg = w.reshape(shape[0] // c, c, -1)
        kappa = max(float(np.linalg.cond(z @ z.T)) for z in _centred_groups(v, c))
        assert np.max(np.abs(wg @ np.swapaxes(wg, 1, 2) - np.eye(c))) <= 64 * kappa * EPS64, shape
    np.testing.assert_allclose(normref.orthogonal_weight_norm(rng.standard_normal((7, 4))).shape, (7, 4))
    v = rng.standard_normal((7, 4))
    assert _rel(normref.orthogonal_weight_norm(v), normref.centered_weight_norm(v)) <= TOL64


def test_oni_group_larger_than_fan_in_cannot_be_orthogonal(rng):
    """The documented limit: a group of 5 centred rows of fan-in 3 spans ≤ 2 dimensions, so W·Wᵀ
    tends to the projector onto range(Zc·Zcᵀ) (rank 2), not I: two singular values → 1, the rest stay
    at round-off (‖W·Wᵀ − I‖₂ ≥ 1 for every T); the result is finite."""
    v = rng.standard_normal((5, 3))
    z = _centred_groups(v, 5)[0]
    lam, q = np.linalg.eigh(z @ z.T)
    proj = q[:, -2:] @ q[:, -2:].T  # the two nonzero eigenvalues' eigenvectors
    w = normref.oni(v, 40)
    assert np.all(np.isfinite(w))
    assert np.max(np.abs(w @ w.T - proj)) <= 1e-6  # the zero eigenvalues' rounding (~1e-17), × 1.5^40
    assert np.linalg.norm(w @ w.T - np.eye(5), 2) >= 1.0 - 1e-6  # I − P has eigenvalue 1


def test_other_bad_arguments():
    v = np.ones((3, 4))
    _raises(ValueError, "spectral_norm: n_power_iterations must be an integer >= 0", normref.spectral_norm,
            v, np.ones(3), n_power_iterations=-1)
    _raises(TypeError, "spectral_norm: n_power_iterations must be an integer", normref.spectral_norm,
            v, np.ones(3), n_power_iterations=1.5)
    _raises(ValueError, "orthogonal_penalty: kind must be one of", normref.orthogonal_penalty, v, kind="cayley")
    _raises(ValueError, "orthogonal_penalty: gram must be one of", normref.orthogonal_penalty, v, gram="both")
    _raises(TypeError, "weight_norm: all arrays must come from one library", normref.weight_norm, v,
            torch.ones(3, 1, dtype=torch.float64))
    _raises(TypeError, "weight_standardization: v must have a real floating-point dtype",
            normref.weight_standardization, np.ones((3, 4), dtype=np.int64))


# ---------------------------------------------------------------------------------------------------
# hypothesis: shapes (linear and convolution weights), dims


@st.composite
def _weight_case(draw):
    nd = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    if math.prod(shape[1:]) < 2:
        shape = (shape[0], 3) + shape[2:]
    dim = draw(st.sampled_from([None] + list(range(-nd, nd))))
    return shape, dim, draw(st.integers(0, 2**31))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_weight_case())
def test_hypothesis_weight_norm_family(case):
    shape, dim, seed = case
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape) + 0.3
    d = None if dim is None else dim % len(shape)
    gshape = (1,) * len(shape) if d is None else tuple(s if i == d else 1 for i, s in enumerate(shape))
    g = rng.standard_normal(gshape)
    r = fd_check(normref.weight_norm, (v, g), dict(dim=dim), seed=seed % 1000)
    assert r.max_error <= 1e-6, (shape, dim, r.errors)
    ref = torch._weight_norm(torch.tensor(v), torch.tensor(g), -1 if d is None else d)
    assert _rel(normref.weight_norm(v, g, dim=dim), ref.numpy()) <= TOL64
    for m, args, kw in [(normref.centered_weight_norm, (v, rng.standard_normal(shape[0])), {}),
                        (normref.weight_standardization, (v,), dict(eps=1e-3)),
                        (normref.spectral_norm, (v, rng.standard_normal(shape[d or 0])), dict(dim=d or 0))]:
        r = fd_check(m, args, kw, seed=seed % 1000)
        assert r.max_error <= 1e-6, (m.name, shape, r.errors)


def test_jax_jit_traces_every_method():
    """Under jax.jit the zero-row / singularity checks cannot read values: they are skipped (documented)
    and the forward traces; the result equals the eager NumPy one."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    for m in FAMILY:
        ex = _cases(m)[0]
        f = jax.jit(lambda *a, m=m, kw=ex.kwargs: m.primary(m(*a, **kw)))
        y = f(*[jax.numpy.asarray(a) for a in ex.args])
        assert _rel(np.asarray(y), m.primary(m(*ex.args, **ex.kwargs))) <= TOL64, m.name


@st.composite
def _orth_case(draw):
    fan_in = draw(st.integers(2, 6))
    c = draw(st.integers(1, fan_in - 1))
    groups = draw(st.integers(1, 3))
    return (c * groups, fan_in), c, draw(st.integers(1, 6)), draw(st.integers(0, 2**31))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(_orth_case())
@example(((2, 2), 1, 1, 124))  # a short centred row (norm 0.2): the h²/λ_min growth of the FD error
def test_hypothesis_orthogonalization(case):
    from hypothesis import assume

    shape, c, T, seed = case
    v = np.random.default_rng(seed).standard_normal(shape)
    kappa = max(float(np.linalg.cond(z @ z.T)) for z in _centred_groups(v, c))
    # finite differences of S^-1/2 lose accuracy like (h·κ)²: keep to groups that are not nearly singular
    assume(kappa < 100)
    # and like h²/λ_min in absolute terms: W = S^-1/2·Z has third derivatives ~ λ_min(S)^-3/2 against
    # a gradient ~ λ_min^-1/2 (a group of one row of length 2 with centred norm 0.2 — seed 124 —
    # measures 1.2e-6 at unit scale), so the bound grows by 1/λ_min below 1
    lam = min(float(np.linalg.eigvalsh(z @ z.T)[0]) for z in _centred_groups(v, c))
    tol = 1e-6 * max(1.0, 1.0 / lam)
    for m, kw in [(normref.orthogonal_weight_norm, dict(group_size=c)), (normref.oni, dict(iterations=T, group_size=c))]:
        r = fd_check(m, (v,), kw, seed=seed % 1000)
        assert r.max_error <= tol, (m.name, shape, c, T, r.errors, lam)
    w = normref.orthogonal_weight_norm(v, group_size=c).reshape(shape[0] // c, c, -1)
    assert np.max(np.abs(w @ np.swapaxes(w, 1, 2) - np.eye(c))) <= 64 * kappa * EPS64
    sv = np.linalg.svd(normref.oni(v, T, group_size=c).reshape(shape[0] // c, c, -1), compute_uv=False)
    assert np.max(sv) <= 1 + 64 * EPS64
