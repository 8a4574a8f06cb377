"""Conventions of the weight, gradient, local and propagation methods (issue 15 §1, §2): where the paper,
the authors' released code and the frameworks differ, each convention is an argument. For each one: the
authors' (or the paper's) formula written here independently in NumPy, compared with normref; the new
backward against central finite differences (float64) and, where it is cheap, torch autograd; and bad
input for the new argument.

Tolerances
- forward vs the NumPy formula (float64): both evaluate the same function in a different order of
  operations. A few reductions over ≤ 50 terms give ≤ 64·ε₆₄ relative error per quantity; where a
  matrix iteration is involved (ONI), rounding errors are amplified by at most κ(S) per step of
  the T steps (the iteration's Fréchet derivative is bounded by the condition number of the Gram
  matrix on these well-conditioned examples), so the bound is 64·T·κ(S)·ε₆₄ with κ computed in the test.
- backward vs finite differences: ``conformance.fd.fd_check``'s relative error ≤ 1e-6 (its step
  h ~ 1e-5 leaves O(h²) ≈ 1e-10 truncation and ε/h ≈ 1e-11 rounding on these smooth problems, so
  1e-6 is a bound with room that a wrong term, an O(1) error, cannot meet).
- backward vs torch autograd through normref's forward (float64): two exact-arithmetic-equal
  formulas, 1e3·ε₆₄·(conditioning) relative, the bound tests/test_weight.py uses.
- Monte Carlo (variance propagation): 6 standard errors of the sample mean and sample variance
  estimated from the same samples (a false failure has probability ≈ 2e-9 per check).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import normref
from normref.conformance.fd import fd_check

EPS64 = float(np.finfo(np.float64).eps)
FD_TOL = 1e-6
TOL64 = 1e3 * EPS64

CWN = normref.get("centered_weight_norm")
ONI = normref.get("oni")
PENALTY = normref.get("orthogonal_penalty")
LARS = normref.get("lars")
LRN = normref.get("local_response_norm")
MOMENTS = normref.get("propagate_moments")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _fd(m, args, kwargs) -> float:
    r = fd_check(m, args, kwargs, directions=3)
    assert r.max_error <= FD_TOL, (m.name, kwargs, r.errors)
    return r.max_error


# --------------------------------------------------------------------------------------------------
# centered weight normalization: ε and where it goes


def _cwn_authors(v, g, eps, placement):
    """Rows of v centred, divided by ‖c‖ + ε (the authors' PyTorch CWNorm) or √(‖c‖² + ε) (their Torch7
    WeightNorm_Center), times g."""
    rows = v.reshape(v.shape[0], -1)
    c = rows - rows.mean(axis=1, keepdims=True)
    norm = np.sqrt((c**2).sum(axis=1, keepdims=True))
    den = norm + eps if placement == "outside" else np.sqrt(norm**2 + eps)
    return (g.reshape(-1, 1) * c / den).reshape(v.shape)


@pytest.mark.parametrize("placement,eps", [("outside", 1e-5), ("inside", 1e-4), ("outside", 1e-2), ("inside", 0.3)])
def test_cwn_eps_matches_the_authors_formula(placement, eps):
    rng = np.random.default_rng(1)
    v, g = rng.standard_normal((5, 3, 2)) * 0.1, rng.uniform(0.5, 2.0, 5)
    w = CWN(v, g, eps=eps, eps_placement=placement)
    # a row norm and a division: a few roundings per entry (64·ε)
    assert _rel(w, _cwn_authors(v, g, eps, placement)) <= 64 * EPS64
    # and it is not the ε-free one (the argument changes something)
    assert _rel(w, CWN(v, g)) > 1e3 * EPS64
    _fd(CWN, (v, g), dict(eps=eps, eps_placement=placement))


def test_cwn_eps_default_is_the_paper_and_constant_rows():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((4, 6))
    assert _rel(CWN(v), _cwn_authors(v, np.ones(4), 0.0, "outside")) <= 64 * EPS64
    v[2] = 1.25  # constant: no direction; the paper's CWN refuses it, ε > 0 maps it to a zero row
    with pytest.raises(ValueError, match="row 2 of v is constant"):
        CWN(v)
    for placement in ("outside", "inside"):
        w = CWN(v, eps=1e-3, eps_placement=placement)
        assert np.all(np.isfinite(w)) and np.max(np.abs(w[2])) <= 1e-12


def test_cwn_eps_backward_against_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    v, g = rng.standard_normal((4, 5)) * 0.2, rng.standard_normal(4)
    for placement in ("outside", "inside"):
        vt = torch.tensor(v, requires_grad=True)
        gt = torch.tensor(g, requires_grad=True)
        c = vt - vt.mean(dim=1, keepdim=True)
        n = c.norm(dim=1, keepdim=True)
        d = n + 1e-2 if placement == "outside" else torch.sqrt(n**2 + 1e-2)
        y = gt[:, None] * c / d
        cot = rng.standard_normal(v.shape)
        y.backward(torch.tensor(cot))
        _, pb = normref.vjp(CWN, v, g, eps=1e-2, eps_placement=placement)
        dv, dg = pb(cot)
        assert _rel(dv, vt.grad.numpy()) <= TOL64 and _rel(dg, gt.grad.numpy()) <= TOL64


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(eps=-1e-5), ValueError, r"centered_weight_norm: eps must be a finite number >= 0; got -1e-05"),
    (dict(eps="1e-5"), TypeError, r"centered_weight_norm: eps must be a real number; got str"),
    (dict(eps=1e-5, eps_placement="under"), ValueError,
     r"centered_weight_norm: eps_placement must be one of 'outside', 'inside'; got 'under'"),
])
def test_cwn_bad_eps(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        CWN(np.ones((2, 3)), **kw)


# --------------------------------------------------------------------------------------------------
# ONI: Frobenius scaling (the authors' code) and the column form


def _oni_authors_rows(v, groups, t, eps):
    """The authors' ONINorm: Zc = centred rows per group, S = Zc·Zcᵀ + εI, S ← S/‖S‖_F, B ← 1.5B − 0.5B³S
    from B = I, W = B·Zc/√‖S‖_F."""
    z = v.reshape(groups, v.shape[0] // groups, -1)
    zc = z - z.mean(axis=-1, keepdims=True)
    s = zc @ zc.transpose(0, 2, 1) + eps * np.eye(zc.shape[1])
    fro = np.sqrt((s**2).sum(axis=(1, 2), keepdims=True))
    sn = s / fro
    b = np.broadcast_to(np.eye(zc.shape[1]), s.shape).copy()
    for _ in range(t):
        b = 1.5 * b - 0.5 * b @ b @ b @ sn
    return (b @ zc / np.sqrt(fro)).reshape(v.shape), float(np.max(np.linalg.cond(s)))


def _oni_columns(v, groups, t, eps, scale, centering=True):
    """The column form: S = Zcᵀ·Zc + εI (fan_in × fan_in) per group, scaled by ``scale`` ("trace" or
    "frobenius") before the Newton iteration, W = Zc·B/√scale."""
    z = v.reshape(groups, v.shape[0] // groups, -1)
    zc = z - z.mean(axis=-1, keepdims=True) if centering else z
    s = zc.transpose(0, 2, 1) @ zc + eps * np.eye(zc.shape[2])
    k = np.trace(s, axis1=1, axis2=2)[:, None, None] if scale == "trace" else np.sqrt((s**2).sum(axis=(1, 2), keepdims=True))
    b = np.broadcast_to(np.eye(zc.shape[2]), s.shape).copy()
    for _ in range(t):
        b = 1.5 * b - 0.5 * b @ b @ b @ (s / k)
    sv = np.linalg.svd(zc, compute_uv=False)
    kappa = max(float(g[0] / g[g > 1e-10 * g[0]][-1]) ** 2 for g in sv)
    return (zc @ b / np.sqrt(k)).reshape(v.shape), kappa


@pytest.mark.parametrize("shape,groups,t,eps", [((4, 6), 1, 5, 0.0), ((6, 3, 2, 2), 2, 3, 1e-5), ((4, 9), 2, 2, 0.0)])
@pytest.mark.parametrize("iteration", ["newton", "newton_schulz"])
def test_oni_frobenius_scaling_matches_the_authors_code(shape, groups, t, eps, iteration):
    rng = np.random.default_rng(4)
    v = rng.standard_normal(shape) + 0.3
    ref, kappa = _oni_authors_rows(v, groups, t, eps)
    w = ONI(v, iterations=t, group_size=shape[0] // groups, eps=eps, iteration=iteration, scaling="frobenius")
    assert _rel(w, ref) <= 64 * t * kappa * EPS64
    # the paper's trace scaling is another function at finite T (before both have converged)
    w_tr = ONI(v, iterations=t, group_size=shape[0] // groups, eps=eps, iteration=iteration)
    assert _rel(w, w_tr) > 1e-6


def test_oni_frobenius_converges_to_the_same_orthogonal_w():
    """Both scalings converge to W = (Zc·Zcᵀ)^-1/2·Zc; Frobenius in fewer steps (‖S‖_F ≤ tr S)."""
    rng = np.random.default_rng(5)
    v = rng.standard_normal((4, 8))
    err = {}
    for scaling in ("trace", "frobenius"):
        w = ONI(v, iterations=4, scaling=scaling)
        err[scaling] = float(np.max(np.abs(w @ w.T - np.eye(4))))
        w40 = ONI(v, iterations=40, scaling=scaling)
        assert np.max(np.abs(w40 @ w40.T - np.eye(4))) <= 1e3 * EPS64
    assert err["frobenius"] < err["trace"]


@pytest.mark.parametrize("shape,groups,t,scale,centering", [
    ((8, 3), 1, 5, "trace", True), ((8, 3), 1, 4, "frobenius", True), ((6, 2, 1, 1), 2, 4, "trace", True),
    ((8, 4), 2, 6, "frobenius", False),
])
def test_oni_column_form(shape, groups, t, scale, centering):
    rng = np.random.default_rng(6)
    v = rng.standard_normal(shape) + 0.3
    ref, kappa = _oni_columns(v, groups, t, 0.0, scale, centering)
    w = ONI(v, iterations=t, group_size=shape[0] // groups, scaling=scale, side="columns", centering=centering)
    assert _rel(w, ref) <= 64 * t * kappa * EPS64
    # "auto" is the column form exactly when d_out > fan_in (the authors' ONI_Linear / ONI_Conv2d)
    auto = ONI(v, iterations=t, group_size=shape[0] // groups, scaling=scale, side="auto", centering=centering)
    assert np.array_equal(auto, w)
    _fd(ONI, (v,), dict(iterations=t, group_size=shape[0] // groups, scaling=scale, side="columns",
                        centering=centering))


def test_oni_columns_converge_to_orthonormal_columns():
    rng = np.random.default_rng(7)
    v = rng.standard_normal((9, 3))
    w = ONI(v, iterations=60, side="columns", centering=False)
    assert np.max(np.abs(w.T @ w - np.eye(3))) <= 1e3 * EPS64
    # centred rows: 1 is a null vector of Zcᵀ·Zc, WᵀW → the projector onto 1^⊥. Along 1 the iterate
    # grows like 1.5^T and multiplies Zc·1 (≈ ε, not 0, after rounding): T = 12 keeps that ≲ 130·ε
    w = ONI(v, iterations=12, side="columns")
    p = np.eye(3) - np.ones((3, 3)) / 3
    assert np.max(np.abs(w.T @ w - p)) <= 1e3 * EPS64
    w_rows = ONI(np.ascontiguousarray(v[:2]), iterations=5, side="auto")
    assert np.array_equal(w_rows, ONI(np.ascontiguousarray(v[:2]), iterations=5))  # d_out ≤ fan_in: rows


def test_oni_frobenius_backward():
    rng = np.random.default_rng(8)
    v = rng.standard_normal((4, 6)) + 0.3
    worst = 0.0
    for kw in (dict(scaling="frobenius"), dict(scaling="frobenius", iteration="newton", iterations=3),
               dict(scaling="frobenius", eps=1e-5, group_size=2), dict(scaling="frobenius", side="columns")):
        worst = max(worst, _fd(ONI, (v,), kw))
    torch = pytest.importorskip("torch")
    with normref.use_adapters(False):  # torch autograd through the forward, the oracle
        vt = torch.tensor(v, requires_grad=True)
        y = ONI(vt, iterations=5, scaling="frobenius", side="columns")
        cot = rng.standard_normal(v.shape)
        y.backward(torch.tensor(cot))
    _, pb = normref.vjp(ONI, v, iterations=5, scaling="frobenius", side="columns")
    assert _rel(pb(cot)[0], vt.grad.numpy()) <= TOL64


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(scaling="spectral"), ValueError, r"oni: scaling must be one of 'trace', 'frobenius'; got 'spectral'"),
    (dict(side="both"), ValueError, r"oni: side must be one of 'rows', 'columns', 'auto'; got 'both'"),
    (dict(side=None), ValueError, r"oni: side must be one of 'rows', 'columns', 'auto'; got None"),
])
def test_oni_bad_conventions(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        ONI(np.ones((2, 3)), **kw)  # refused before the (constant, zero after centring) rows are looked at


# --------------------------------------------------------------------------------------------------
# LARS: LARC (apex) clip and scale modes, the Barlow Twins / BYOL form, and the zero-norm rules


def _apex_larc(w, g, eta, wd, eps, lr, clip):
    """apex.parallel.LARC's gradient transform: only when both norms are positive, the trust ratio
    η‖w‖/(‖g‖ + wd·‖w‖ + ε), in clip mode min(ratio/lr, 1), multiplies g + wd·w; otherwise g passes
    unchanged (apex moves the weight decay out of the optimizer)."""
    pn, gn = np.sqrt((w * w).sum()), np.sqrt((g * g).sum())
    if pn == 0 or gn == 0:
        return g.copy()
    ratio = eta * pn / (gn + pn * wd + eps)
    if clip:
        ratio = min(ratio / lr, 1.0)
    return (g + wd * w) * ratio


def _barlow_lars(w, g, eta, wd):
    """The Barlow Twins / BYOL LARS step direction: u = g + wd·w, q = η‖w‖/‖u‖ where both norms are
    positive, else 1; q·u."""
    u = g + wd * w
    pn, un = np.linalg.norm(w), np.linalg.norm(u)
    q = eta * pn / un if pn > 0 and un > 0 else 1.0
    return q * u


@pytest.mark.parametrize("lr", [1.0, 0.5, 0.05])  # λ ≈ 0.3: not clipped at lr = 1 or 0.5, clipped at 0.05
def test_larc_matches_apex(lr):
    rng = np.random.default_rng(9)
    w, g = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)) * 0.05
    kw = dict(eta=0.02, weight_decay=5e-4, eps=1e-8)
    lam = 0.02 * np.linalg.norm(w) / (np.linalg.norm(g) + 5e-4 * np.linalg.norm(w) + 1e-8)
    assert (lam < lr) == (lr > 0.1)  # the cases are what their comment says
    clip = LARS(w, g, variant="larc_clip", lr=lr, **kw)
    # a norm, a division and a product per entry: 64·ε
    assert _rel(clip, _apex_larc(w, g, 0.02, 5e-4, 1e-8, lr, True)) <= 64 * EPS64
    scale = LARS(w, g, variant="larc_scale", **kw)
    assert _rel(scale, _apex_larc(w, g, 0.02, 5e-4, 1e-8, lr, False)) <= 64 * EPS64
    assert _rel(scale, LARS(w, g, **kw)) <= 64 * EPS64  # with positive norms, LARC's scale mode is LARS
    _fd(LARS, (w, g), dict(variant="larc_clip", lr=lr, **kw))
    _fd(LARS, (w, g), dict(variant="larc_scale", **kw))


def test_barlow_twins_lars():
    rng = np.random.default_rng(10)
    w, g = rng.standard_normal((3, 2, 2)), rng.standard_normal((3, 2, 2)) * 0.1
    y = LARS(w, g, variant="barlow_twins", weight_decay=1e-2, eps=0.0)
    assert _rel(y, _barlow_lars(w, g, 1e-3, 1e-2)) <= 64 * EPS64
    _fd(LARS, (w, g), dict(variant="barlow_twins", weight_decay=1e-2, eps=0.0))
    _fd(LARS, (w, g), dict(variant="barlow_twins", weight_decay=0.3, eta=0.05, eps=1e-3))
    # sequences map over the layers with the variant
    ys = LARS([w, 2 * w], [g, g], variant="barlow_twins", weight_decay=1e-2, eps=0.0)
    assert _rel(ys[1], _barlow_lars(2 * w, g, 1e-3, 1e-2)) <= 64 * EPS64


def test_lars_zero_norm_rules():
    """A zero weight or gradient norm: trust ratio 1. LARS passes g + β·w, apex's LARC passes g with no
    decay, Barlow Twins looks at ‖u‖ (u = g + β·w) instead of ‖g‖. The backward is the constant-ratio one."""
    rng = np.random.default_rng(11)
    w, g, z = rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), np.zeros((4, 3))
    wd = 0.1
    c = rng.standard_normal((4, 3))
    for variant, kw in (("larc_scale", {}), ("larc_clip", dict(lr=0.1))):
        for ww, gg in ((z, g), (w, z)):
            y = LARS(ww, gg, variant=variant, weight_decay=wd, **kw)
            assert np.array_equal(y, _apex_larc(ww, gg, 1e-3, wd, 1e-8, kw.get("lr"), variant == "larc_clip"))
            _, pb = normref.vjp(LARS, ww, gg, variant=variant, weight_decay=wd, **kw)
            dw, dg = pb(c)
            assert np.array_equal(dg, c) and np.array_equal(dw, np.zeros_like(c))
    assert np.array_equal(LARS(w, z, weight_decay=wd), wd * w)  # LARS: ratio 1 on g + β·w
    for ww, gg in ((z, g), (wd * w * 0 + w, -wd * w)):  # ‖w‖ = 0; u = g + β·w = 0
        y = LARS(ww, gg, variant="barlow_twins", weight_decay=wd)
        assert np.allclose(y, _barlow_lars(ww, gg, 1e-3, wd), rtol=0, atol=64 * EPS64)
        _, pb = normref.vjp(LARS, ww, gg, variant="barlow_twins", weight_decay=wd)
        dw, dg = pb(c)
        assert np.array_equal(dg, c) and np.allclose(dw, wd * c, rtol=0, atol=0)
    # Barlow Twins with ‖g‖ = 0 but ‖u‖ > 0 is active (unlike LARC): η·‖w‖·û
    y = LARS(w, z, variant="barlow_twins", weight_decay=wd, eps=0.0)
    assert _rel(y, 1e-3 * np.linalg.norm(w) * w / np.linalg.norm(w)) <= 64 * EPS64


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(variant="lamb"), ValueError,
     r"lars: variant must be one of 'lars', 'larc_scale', 'larc_clip', 'barlow_twins'; got 'lamb'"),
    (dict(variant="larc_clip"), TypeError, r"lars: variant='larc_clip' needs lr, the global learning rate"),
    (dict(variant="larc_clip", lr=0.0), ValueError, r"lars: lr must be a finite number > 0; got 0.0"),
    (dict(variant="larc_clip", lr="0.1"), TypeError, r"lars: lr must be a real number; got str"),
    (dict(lr=0.1), ValueError, r"lars: lr is used by variant='larc_clip' only; got lr=0.1 with variant='lars'"),
])
def test_lars_bad_variant(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LARS(np.ones(3), np.ones(3), **kw)


# --------------------------------------------------------------------------------------------------
# SRIP: σ (the paper) or σ² (the authors' code)


def _srip_authors(w):
    """The authors' l2_reg_ortho for one weight: M = WᵀW − I when d_out > fan_in, else W·Wᵀ − I; the
    squared spectral norm of M (their power-iteration estimate; here the exact one, by an SVD)."""
    w1 = w.reshape(w.shape[0], -1)
    rows, cols = w1.shape
    m = w1.T @ w1 - np.eye(cols) if rows > cols else w1 @ w1.T - np.eye(rows)
    return float(np.linalg.norm(m, 2)) ** 2


@pytest.mark.parametrize("shape", [(3, 5), (6, 2, 1, 1), (4, 3, 2, 2), (5, 5)])
def test_srip_squared_matches_the_authors_code(shape):
    rng = np.random.default_rng(12)
    w = rng.standard_normal(shape) * 0.5
    sq = PENALTY(w, kind="srip", gram="auto", squared=True)
    # σ from eigh vs an SVD: backward stable, |Δσ| ≤ c·n·ε·‖M‖; squared doubles the relative error
    ref = _srip_authors(w)
    assert abs(float(sq) - ref) <= 64 * EPS64 * max(1.0, ref)
    sigma = PENALTY(w, kind="srip", gram="auto")
    assert abs(float(sigma) ** 2 - float(sq)) <= 64 * EPS64 * max(1.0, ref)
    _fd(PENALTY, (w,), dict(kind="srip", gram="auto", squared=True))


def test_srip_squared_gradient_is_two_sigma_times_sigmas():
    rng = np.random.default_rng(13)
    w = rng.standard_normal((3, 6)) * 0.5
    c = 0.7
    _, pb1 = normref.vjp(PENALTY, w, kind="srip")
    _, pb2 = normref.vjp(PENALTY, w, kind="srip", squared=True)
    sigma = float(PENALTY(w, kind="srip"))
    assert _rel(pb2(np.asarray(c))[0], 2 * sigma * pb1(np.asarray(c))[0]) <= 64 * EPS64


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(kind="srip", squared="yes"), TypeError, r"orthogonal_penalty: squared must be a bool \(True or False\); got str"),
    (dict(kind="frobenius", squared=True), ValueError,
     r"orthogonal_penalty: squared=True applies to kind='srip' only .*; got kind='frobenius'"),
])
def test_srip_bad_squared(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        PENALTY(np.ones((2, 3)), **kw)


# --------------------------------------------------------------------------------------------------
# local response normalization: α/n (torch, Caffe) or α (AlexNet's paper)


def _alexnet_lrn(a, n, k, alpha, beta):
    """Krizhevsky et al. 2012, §3.3: b_i = a_i/(k + α·Σ_{j=max(0, i−n/2)}^{min(N−1, i+n/2)} a_j²)^β
    (odd n: n/2 rounds down), α not divided by n."""
    out = np.empty_like(a)
    ch = a.shape[1]
    for i in range(ch):
        lo, hi = max(0, i - n // 2), min(ch - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(axis=1)) ** beta
    return out


def test_lrn_alpha_scaling():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 7, 3, 2)) * 2
    kw = dict(alpha=1e-2, beta=0.75, k=2.0)
    # the default is torch's (α/n)
    ref = torch.nn.functional.local_response_norm(torch.tensor(x), 5, **kw).numpy()
    assert _rel(LRN(x, 5), torch.nn.functional.local_response_norm(torch.tensor(x), 5).numpy()) <= 64 * EPS64
    assert _rel(LRN(x, 5, **kw), ref) <= 64 * EPS64
    # AlexNet's α
    paper = LRN(x, 5, alpha_scaling="none", **kw)
    assert _rel(paper, _alexnet_lrn(x, 5, 2.0, 1e-2, 0.75)) <= 64 * EPS64
    assert _rel(paper, LRN(x, 5, alpha=5e-2, beta=0.75, k=2.0)) <= 64 * EPS64  # α_none = α_size/n
    assert _rel(paper, ref) > 1e-6
    _fd(LRN, (x, 5), dict(alpha_scaling="none", alpha=0.3, beta=0.75, k=1.0))


def test_lrn_bad_alpha_scaling():
    with pytest.raises(ValueError, match=r"local_response_norm: alpha_scaling must be one of 'size', 'none'; got 'n'"):
        LRN(np.ones((1, 3, 2)), 3, alpha_scaling="n")


# --------------------------------------------------------------------------------------------------
# variance propagation (NormProp's data-independent moment estimates)


def _relu_gaussian(m, v):
    """E and Var of max(0, u), u ~ N(m, v), from math.erfc (the rectified normal's moments)."""
    s = math.sqrt(v)
    a = m / s
    cdf = 0.5 * math.erfc(-a / math.sqrt(2.0))
    pdf = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    e = m * cdf + s * pdf
    e2 = (m * m + v) * cdf + m * s * pdf
    return e, e2 - e * e


def test_moments_standard_normal_gives_the_normprop_constants():
    y = MOMENTS(np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert abs(y[0, 0] - 1.0 / math.sqrt(2.0 * math.pi)) <= 4 * EPS64
    assert abs(y[1, 0] - 0.5 * (1.0 - 1.0 / math.pi)) <= 4 * EPS64
    assert abs(y[0, 1] - normref.propagation.RELU_MEAN) <= 4 * EPS64
    assert abs(math.sqrt(y[1, 1]) - normref.propagation.RELU_STD) <= 4 * EPS64


def test_moments_relu_against_math_erfc_and_quadrature():
    ms = np.array([-6.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.7, 4.0, 9.0])
    vs = np.array([1.0, 0.3, 2.0, 1.0, 0.5, 1.0, 0.2, 3.0, 1.0])
    y = MOMENTS(np.stack([ms, vs]))
    for i, (m, v) in enumerate(zip(ms, vs)):
        e, var = _relu_gaussian(m, v)
        # Φ to ≈ 1e-15 relative; E = s·(αΦ + φ) loses log10|1/(αΦ/φ + 1)| digits for α < 0: at α = −6,
        # E/(s·φ) ≈ 0.03, so the bound carries the factor s·φ/E (≤ 40 here)
        scale = max(1.0, math.sqrt(v) * math.exp(-0.5 * m * m / v) / max(e, 1e-300))
        assert abs(y[0, i] - e) <= 256 * EPS64 * scale * max(abs(e), 1e-300) + 64 * EPS64 * abs(m), (m, v)
        assert abs(y[1, i] - var) <= 256 * EPS64 * scale * max(var, 1e-300) + 64 * EPS64 * (m * m + v), (m, v)
    integrate = pytest.importorskip("scipy.integrate")
    for m, v in [(-1.0, 2.0), (0.3, 1.0), (1.7, 0.2)]:
        s = math.sqrt(v)
        dens = lambda u: math.exp(-0.5 * ((u - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))  # noqa: E731
        e = integrate.quad(lambda u: u * dens(u), 0, math.inf, epsabs=0, epsrel=1e-13)[0]
        e2 = integrate.quad(lambda u: u * u * dens(u), 0, math.inf, epsabs=0, epsrel=1e-13)[0]
        y = MOMENTS(np.array([[m], [v]]))
        assert abs(y[0, 0] - e) <= 1e-11 * e and abs(y[1, 0] - (e2 - e * e)) <= 1e-11 * e2


def test_moments_against_monte_carlo():
    rng = np.random.default_rng(15)
    mu, var = rng.standard_normal(4) * 0.5, rng.uniform(0.3, 2.0, 4)
    w, b = rng.standard_normal((3, 4, 2)) * 0.5, rng.standard_normal(3) * 0.3
    n = 400_000
    x = mu[None, :, None] + np.sqrt(var)[None, :, None] * rng.standard_normal((n, 4, 2))  # independent
    z = np.einsum("ijk,njk->ni", w, x) + b
    for act, h in (("relu", np.maximum(z, 0.0)), ("identity", z)):
        y = MOMENTS(np.stack([mu, var]), w, b, activation=act)
        mean, v = h.mean(axis=0), h.var(axis=0)
        m4 = ((h - mean) ** 4).mean(axis=0)
        assert np.all(np.abs(y[0] - mean) <= 6 * np.sqrt(v / n)), (act, y[0], mean)
        assert np.all(np.abs(y[1] - v) <= 6 * np.sqrt((m4 - v * v) / n)), (act, y[1], v)


def test_moments_backward():
    rng = np.random.default_rng(16)
    mom = np.stack([rng.standard_normal(3), rng.uniform(0.4, 2.0, 3)])
    w, b = rng.standard_normal((4, 3, 2)) * 0.5, rng.standard_normal(4) * 0.3
    for args in ((mom,), (mom, w), (mom, w, b)):
        for act in ("relu", "identity"):
            _fd(MOMENTS, args, dict(activation=act))
    torch = pytest.importorskip("torch")
    with normref.use_adapters(False):
        leaves = [torch.tensor(a, requires_grad=True) for a in (mom, w, b)]
        y = MOMENTS(*leaves)
        cot = rng.standard_normal((2, 4))
        y.backward(torch.tensor(cot))
    _, pb = normref.vjp(MOMENTS, mom, w, b)
    for ours, t in zip(pb(cot), leaves):
        assert _rel(ours, t.grad.numpy()) <= TOL64
    # a zero variance: the deterministic limits (E = max(m, 0), V = 0), finite gradients
    y = MOMENTS(np.array([[-1.0, 2.0], [0.0, 0.0]]))
    assert np.array_equal(y, np.array([[0.0, 2.0], [0.0, 0.0]]))
    _, pb = normref.vjp(MOMENTS, np.array([[-1.0, 2.0], [0.0, 0.0]]))
    (d,) = pb(np.ones((2, 2)))[:1]
    assert np.array_equal(d, np.array([[0.0, 1.0], [0.0, 1.0]]))


@pytest.mark.parametrize("args,kw,exc,msg", [
    ((np.ones((3, 2)),), {}, ValueError, r"propagate_moments: moments must have shape \(2, d_in\).*; got shape \(3, 2\)"),
    ((np.ones(2),), {}, ValueError, r"propagate_moments: moments must have exactly 2 dimensions"),
    ((np.array([[0.0], [-1.0]]),), {}, ValueError, r"propagate_moments: the variances \(moments\[1\]\) must be >= 0"),
    ((np.ones((2, 3)), np.ones((4, 2))), {}, ValueError, r"propagate_moments: w.shape\[1\] must equal .* = 3"),
    ((np.ones((2, 3)), np.ones((4, 3)), np.ones(3)), {}, ValueError, r"propagate_moments: bias must have shape \(4,\)"),
    ((np.ones((2, 3)),), dict(activation="tanh"), ValueError,
     r"propagate_moments: activation must be one of 'relu', 'identity'; got 'tanh'"),
    ((None,), {}, TypeError, r"propagate_moments: moments must be an array"),
])
def test_moments_bad_input(args, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        MOMENTS(*args, **kw)


# --------------------------------------------------------------------------------------------------
# the torch adapter passes the new keywords through


@pytest.mark.parametrize("name,args,kwargs", [
    ("centered_weight_norm", ((4, 5), (4,)), dict(eps=1e-2, eps_placement="inside")),
    ("oni", ((8, 3),), dict(iterations=4, scaling="frobenius", side="columns")),
    ("orthogonal_penalty", ((3, 5),), dict(kind="srip", squared=True)),
    ("lars", ((4, 3), (4, 3)), dict(variant="larc_clip", lr=0.05, eta=0.02)),
    ("lars", ((4, 3), (4, 3)), dict(variant="barlow_twins", weight_decay=0.1)),
    ("local_response_norm", ((2, 6, 3),), dict(size=3, alpha=0.2, alpha_scaling="none")),
    ("propagate_moments", ((2, 3), (4, 3)), dict(activation="relu")),
])
def test_torch_adapter_passes_the_new_keywords(name, args, kwargs):
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    rng = np.random.default_rng(17)
    arrays = [rng.standard_normal(s) for s in args]
    if name == "propagate_moments":
        arrays[0][1] = np.abs(arrays[0][1]) + 0.2
    if name == "lars":
        arrays[1] *= 0.05
    m = normref.get(name)
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    y = getattr(nt, name)(*ts, **kwargs)
    ref = m(*arrays, **kwargs)
    assert _rel(y.detach().numpy(), ref) <= 64 * EPS64
    cot = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(cot))
    _, pb = normref.vjp(m, *arrays, **kwargs)
    for g, t in zip(pb(cot), ts):
        assert _rel(t.grad.numpy(), g) <= 64 * EPS64
    # a keyword left at a wrong value is refused through the adapter too
    bad = {k: "nonsense" for k in kwargs if isinstance(kwargs[k], str)}
    if bad:
        with pytest.raises(ValueError, match=name):
            getattr(nt, name)(*ts, **{**kwargs, **bad})
