"""Conventions of the whitening family (issue 15 §1): each paper / released-code / framework variant,
selected by an argument, against that variant's formula written here independently in NumPy.

Sources of the variants (read for this file; their code is not copied, the formulas are re-derived):
- AdaIN: the paper (Huang & Belongie, ICCV 2017, Eqns 6, 8): biased σ² + ε on content and style;
  the authors' Torch7 code (xunhuang1995/AdaIN-style, lib/AdaptiveInstanceNormalization.lua): style σ
  biased, no ε; content through SpatialBatchNormalization (biased + ε); the PyTorch port
  (naoto0804/pytorch-AdaIN, calc_mean_std): unbiased σ² + ε on both.
- WCT: the PyTorch port (sunshineatnoon/PytorchWCT, util.py): covariances / (M − 1), content + I,
  style without ε, eigenvalues < 1e-5 dropped.
- Whitening-coloring: the authors' code (AliaksandrSiarohin/gan, DecorelationNormalization):
  Σ = (1 − ε)·Xc·Xcᵀ/(m − 1) + ε·I in training, (1 − ε)·Σ̂ + ε·I at inference.
- DBN / IterNorm: the authors' code (princeton-vl/DecorrelatedBN, huangleiBuaa/IterNorm): a running
  whitening matrix Ŵ ← (1 − f)·Ŵ + f·W_batch, inference (x − μ̂)·Ŵ (rows are samples there).

Tolerances (how each is derived): float64 throughout, ε₆₄ = 2.2e-16.
- forward vs the NumPy formula: both are backward-stable evaluations of the same function; AdaIN's
  error is ~ε₆₄·(1 + |μ|/σ) (the centring's cancellation) → 64·ε₆₄·cond with cond = 1 + max|μ|/σ;
  an eigh / Cholesky / Newton whitening of a small (d ≤ 4) Σ is accurate to ~d·ε₆₄·κ(Σ) relative
  (eigenvector error ε‖Σ‖/gap, and gap ≥ λ_min) → 1e3·ε₆₄·κ with κ the largest κ(Σ) involved.
- backward vs torch autograd (an independent derivative of the NumPy formula, written in torch):
  the same derivative through a different evaluation order: 1e3·ε₆₄·κ (κ as above; for the
  eigenvalue cut-off, κ includes λ_max/gap of the kept–dropped pairs).
- backward vs central finite differences: normref.conformance.fd (h = ε₆₄^{1/3}·scale, error of
  the quotient ~h²·f''' ≈ 1e-10 on unit-scaled problems): 1e-6 relative, as tests/test_whitening.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import normref
from normref import whitening as wh
from normref.conformance.fd import fd_check

EPS64 = float(np.finfo(np.float64).eps)
FD_TOL = 1e-6


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _mu_cond(*arrays):
    """1 + max |μ|/σ over channels: the centring's cancellation factor."""
    w = 0.0
    for a in arrays:
        a = a.reshape(a.shape[0], a.shape[1], -1)
        w = max(w, float(np.max(np.abs(a.mean(2)) / a.std(2))))
    return 1.0 + w


def _kappa(s):
    lam = np.linalg.eigvalsh(s)
    return float(np.max(lam[..., -1] / lam[..., 0]))


# ---------------------------------------------------------------------------------------------------
# AdaIN: unbiased, style_eps


def _np_adain(c, s, eps, ddof, eps_s):
    """AdaIN written from the sources above: σ = √(Σ(x − μ)²/(M − ddof) + ε) per sample and channel."""
    def stats(t, e):
        t = t.reshape(t.shape[0], t.shape[1], -1)
        mu = t.mean(2, keepdims=True)
        var = ((t - mu) ** 2).sum(2, keepdims=True) / (t.shape[2] - ddof)
        return mu, np.sqrt(var + e)

    mc, sc = stats(c, eps)
    ms, ss = stats(s, eps_s)
    x = c.reshape(c.shape[0], c.shape[1], -1)
    return (ss * (x - mc) / sc + ms).reshape(c.shape)


# (kwargs, ddof, style ε as a function of eps): the paper, the authors' Torch7 code, the PyTorch port
ADAIN_CASES = [
    ("paper (Eqn 8)", {}, 0, lambda e: e),
    ("authors' Torch7 code", dict(style_eps=False), 0, lambda e: 0.0),
    ("PyTorch port", dict(unbiased=True), 1, lambda e: e),
    ("unbiased, own style eps", dict(unbiased=True, style_eps=0.03), 1, lambda e: 0.03),
]


def _adain_data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 3, 4, 3)) + 0.7, rng.standard_normal((2, 3, 3, 5)) * 1.3 - 0.4


@pytest.mark.parametrize("label,kw,ddof,eps_s", ADAIN_CASES, ids=[c[0] for c in ADAIN_CASES])
def test_adain_conventions_match_numpy(label, kw, ddof, eps_s):
    c, s = _adain_data()
    eps = 1e-2  # large enough that where ε goes is visible (the variants differ by ~1e-2 relative)
    got = normref.adain(c, s, eps, **kw)
    want = _np_adain(c, s, eps, ddof, eps_s(eps))
    assert _rel(got, want) <= 64 * EPS64 * _mu_cond(c, s), label
    if kw:  # and it is a different function from the default (the argument is not ignored)
        assert _rel(got, normref.adain(c, s, eps)) > 1e-4


def _torch_adain(torch, c, s, eps, ddof, eps_s):
    def stats(t, e):
        t = t.reshape(t.shape[0], t.shape[1], -1)
        mu = t.mean(2, keepdim=True)
        var = ((t - mu) ** 2).sum(2, keepdim=True) / (t.shape[2] - ddof)
        return mu, torch.sqrt(var + e)

    mc, sc = stats(c, eps)
    ms, ss = stats(s, eps_s)
    x = c.reshape(c.shape[0], c.shape[1], -1)
    return (ss * (x - mc) / sc + ms).reshape(c.shape)


@pytest.mark.parametrize("label,kw,ddof,eps_s", ADAIN_CASES, ids=[c[0] for c in ADAIN_CASES])
def test_adain_convention_backward(label, kw, ddof, eps_s):
    torch = pytest.importorskip("torch")
    c, s = _adain_data(1)
    eps = 1e-2
    r = fd_check(normref.adain, (c, s, eps), kw, directions=3)
    assert r.max_error <= FD_TOL, (label, r.errors)
    g = np.random.default_rng(5).standard_normal(c.shape)
    _, pull = normref.vjp(normref.adain, c, s, eps, **kw)
    dc, ds = pull(g)
    tc = torch.tensor(c, requires_grad=True)
    ts = torch.tensor(s, requires_grad=True)
    (_torch_adain(torch, tc, ts, eps, ddof, eps_s(eps)) * torch.tensor(g)).sum().backward()
    tol = 1e3 * EPS64 * _mu_cond(c, s)
    assert _rel(dc, tc.grad.numpy()) <= tol and _rel(ds, ts.grad.numpy()) <= tol, label
    print(f"adain [{label}]: FD {r.max_error:.1e}, torch {max(_rel(dc, tc.grad.numpy()), _rel(ds, ts.grad.numpy())):.1e}")


def test_adain_constant_style_channel_without_eps():
    """style_eps=False on a constant style channel: σ_s = 0, output μ_s, finite gradients (ŝ := 0)."""
    c, s = _adain_data(2)
    s = s.copy()
    s[0, 1] = 0.25
    with np.errstate(all="raise"):
        y = normref.adain(c, s, style_eps=False)
        _, pull = normref.vjp(normref.adain, c, s, style_eps=False)
        dc, ds = pull(np.ones_like(c))
    assert np.allclose(y[0, 1], 0.25, rtol=0, atol=4 * EPS64)
    assert np.all(np.isfinite(dc)) and np.all(np.isfinite(ds))
    assert np.allclose(dc[0, 1], 0.0)  # σ_s = 0: the content has no influence on that channel


@pytest.mark.parametrize("kw,exc,text", [
    (dict(unbiased="yes"), TypeError, "unbiased must be a bool"),
    (dict(unbiased=1), TypeError, "unbiased must be a bool"),
    (dict(style_eps="no"), TypeError, "style_eps must be True, False or a number"),
    (dict(style_eps=-1e-3), ValueError, "style_eps must be a finite number >= 0; got -0.001"),
    (dict(style_eps=float("nan")), ValueError, "style_eps must be a number"),
])
def test_adain_bad_convention_arguments(kw, exc, text):
    c, s = _adain_data()
    with pytest.raises(exc, match="^adain: " + text.replace("(", r"\(")):
        normref.adain(c, s, **kw)


# ---------------------------------------------------------------------------------------------------
# WCT: unbiased, eig_cutoff, style_eps


def _np_wct(c, s, eps, ddof, cutoff, eps_s):
    """WCT per sample (all channels one group) from the sources: Σ = Xc·Xcᵀ/(M − ddof) + ε·I, the
    eigenvalues below ``cutoff`` dropped (None: none), A = Σ_s^1/2, W = Σ_c^-1/2, y = A·W·Xc + μ_s."""
    out = np.empty_like(c)
    for n in range(c.shape[0]):
        x = c[n].reshape(c.shape[1], -1)
        t = s[n].reshape(s.shape[1], -1)
        xc = x - x.mean(1, keepdims=True)
        tc = t - t.mean(1, keepdims=True)
        sc = xc @ xc.T / (x.shape[1] - ddof) + eps * np.eye(len(x))
        ss = tc @ tc.T / (t.shape[1] - ddof) + eps_s * np.eye(len(x))

        def fun(m, p):
            lam, v = np.linalg.eigh(m)
            keep = lam >= (cutoff if cutoff is not None else -np.inf)
            return (v[:, keep] * lam[keep] ** p) @ v[:, keep].T

        out[n] = (fun(ss, 0.5) @ fun(sc, -0.5) @ xc + t.mean(1, keepdims=True)).reshape(c.shape[1:])
    return out


def _wct_data(seed=0, style_positions=3):
    """Content (2, 3, 4, 3); a rank-deficient style: 3 channels, ``style_positions`` positions (centred:
    rank ``style_positions − 1``, so 3 positions leave one zero eigenvalue, a simple one)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((2, 3, 4, 3))
    c[:, 1] += 0.6 * c[:, 0]
    s = rng.standard_normal((2, 3, 1, style_positions)) * 1.4 + 0.3
    return c, s


WCT_CASES = [
    ("default", {}, 0, None, 1e-5, 1e-5),
    ("M - 1 factors", dict(unbiased=True), 1, None, 1e-5, 1e-5),
    ("the port: M - 1, content + I, no style eps, cut-off 1e-5",
     dict(eps=1.0, unbiased=True, eig_cutoff=1e-5, style_eps=False), 1, 1e-5, 1.0, 0.0),
    ("cut-off 1e-3 on both", dict(unbiased=True, eig_cutoff=1e-3, style_eps=False), 1, 1e-3, 1e-5, 0.0),
]


def _wct_kappa(c, s, eps, ddof, cutoff, eps_s):
    """The conditioning of the case: κ of the content Σ (its smallest kept eigenvalue) and of the
    style's kept spectrum, and λ_max/gap of the kept–dropped pairs."""
    worst = 1.0
    for n in range(c.shape[0]):
        for t, e in ((c[n], eps), (s[n], eps_s)):
            t = t.reshape(t.shape[0], -1)
            tc = t - t.mean(1, keepdims=True)
            lam = np.linalg.eigvalsh(tc @ tc.T / (t.shape[1] - ddof) + e * np.eye(len(t)))
            kept = lam[lam >= (cutoff if cutoff is not None else -np.inf)]
            worst = max(worst, kept[-1] / kept[0])
            dropped = lam[lam < (cutoff if cutoff is not None else -np.inf)]
            if dropped.size:
                worst = max(worst, kept[-1] / (kept[0] - dropped[-1]))
    return worst


@pytest.mark.parametrize("label,kw,ddof,cutoff,eps,eps_s", WCT_CASES, ids=[c[0] for c in WCT_CASES])
def test_wct_conventions_match_numpy(label, kw, ddof, cutoff, eps, eps_s):
    c, s = _wct_data(style_positions=3 if cutoff is not None else 6)
    got = normref.wct(c, s, **kw)
    want = _np_wct(c, s, eps, ddof, cutoff, eps_s)
    assert _rel(got, want) <= 1e3 * EPS64 * _wct_kappa(c, s, eps, ddof, cutoff, eps_s), label


def _torch_wct(torch, c, s, eps, ddof, cutoff, eps_s):
    outs = []
    for n in range(c.shape[0]):
        x = c[n].reshape(c.shape[1], -1)
        t = s[n].reshape(s.shape[1], -1)
        xc = x - x.mean(1, keepdim=True)
        tc = t - t.mean(1, keepdim=True)
        eye = torch.eye(x.shape[0], dtype=x.dtype)
        sc = xc @ xc.T / (x.shape[1] - ddof) + eps * eye
        ss = tc @ tc.T / (t.shape[1] - ddof) + eps_s * eye

        def fun(m, p):
            lam, v = torch.linalg.eigh(m)  # autograd through eigh: exact for distinct eigenvalues
            keep = (lam >= (cutoff if cutoff is not None else -math.inf)).detach()
            vk, lk = v[:, keep], lam[keep]
            return (vk * lk ** p) @ vk.T

        outs.append((fun(ss, 0.5) @ fun(sc, -0.5) @ xc + t.mean(1, keepdim=True)).reshape(c.shape[1:]))
    return torch.stack(outs)


@pytest.mark.parametrize("label,kw,ddof,cutoff,eps,eps_s", WCT_CASES, ids=[c[0] for c in WCT_CASES])
def test_wct_convention_backward(label, kw, ddof, cutoff, eps, eps_s):
    """The new backward (M − 1 factors; the truncated spectral functions) against torch autograd through
    eigh (every eigenvalue here is simple, so that is exact) and against finite differences (the step
    ε^{1/3}·scale ≈ 6e-6 does not move a dropped eigenvalue, 0 or below 1e-5 by a wide margin, across
    the cut-off)."""
    torch = pytest.importorskip("torch")
    c, s = _wct_data(3, style_positions=3 if cutoff is not None else 6)
    r = fd_check(normref.wct, (c, s), kw, directions=3)
    assert r.max_error <= FD_TOL, (label, r.errors)
    g = np.random.default_rng(7).standard_normal(c.shape)
    _, pull = normref.vjp(normref.wct, c, s, **kw)
    dc, ds = pull(g)
    tc = torch.tensor(c, requires_grad=True)
    ts = torch.tensor(s, requires_grad=True)
    (_torch_wct(torch, tc, ts, eps, ddof, cutoff, eps_s) * torch.tensor(g)).sum().backward()
    tol = 1e3 * EPS64 * _wct_kappa(c, s, eps, ddof, cutoff, eps_s)
    err = max(_rel(dc, tc.grad.numpy()), _rel(ds, ts.grad.numpy()))
    assert err <= tol, (label, err, tol)
    print(f"wct [{label}]: FD {r.max_error:.1e}, torch {err:.1e}")


def _sym_with_spectrum(rng, lam):
    q, _ = np.linalg.qr(rng.standard_normal((len(lam), len(lam))))
    return (q * np.asarray(lam)) @ q.T


@pytest.mark.parametrize("p", [-0.5, 0.5])
def test_truncated_backward_needs_the_kept_dropped_term(p):
    """dΣ of F(Σ) = Σ_{λ≥τ} λ^p·d·dᵀ by central differences along symmetric directions: normref's
    divided differences match; restricting them to kept pairs only (dropping the kept–dropped term
    f(λ_i)/(λ_i − λ_j)) does not — the kept eigenspace rotates into the dropped one."""
    import array_api_compat.numpy as xnp

    rng = np.random.default_rng(11)
    tau = 1e-2
    sig = _sym_with_spectrum(rng, [1e-4, 0.3, 0.9, 2.0])  # one dropped, three kept, gaps ≥ 0.3
    dw = rng.standard_normal((4, 4))
    lam, d = np.linalg.eigh(sig)
    ds = wh.truncated_spectral_backward(xnp, (lam, d), dw, p, tau)

    def f(m):
        lm, dm = np.linalg.eigh(m)
        return float(np.sum(dw * np.asarray(wh.truncated_spectral_forward(xnp, lm, dm, p, tau))))

    h = EPS64 ** (1 / 3)
    worst = naive = 0.0
    keep = lam >= tau
    closed = (lambda a, b: -1.0 / (a * b * (a + b))) if p == -0.5 else (lambda a, b: 1.0 / (a + b))
    r = np.sqrt(np.where(keep, lam, 1.0))
    k_naive = np.where(keep[:, None] & keep[None, :], closed(r[:, None], r[None, :]), 0.0)
    ds_naive = d @ (k_naive * (d.T @ (0.5 * (dw + dw.T)) @ d)) @ d.T
    for _ in range(4):
        v = rng.standard_normal((4, 4))
        v = 0.5 * (v + v.T)
        fd = (f(sig + h * v) - f(sig - h * v)) / (2 * h)
        worst = max(worst, abs(np.sum(ds * v) - fd) / max(abs(fd), 1.0))
        naive = max(naive, abs(np.sum(ds_naive * v) - fd) / max(abs(fd), 1.0))
    assert worst <= FD_TOL, worst
    assert naive > 1e-2, naive  # the restricted form is measurably wrong: the term is needed


@pytest.mark.parametrize("kw,exc,text", [
    (dict(eig_cutoff=0.0), ValueError, "eig_cutoff must be a finite number > 0; got 0.0"),
    (dict(eig_cutoff=-1e-5), ValueError, "eig_cutoff must be a finite number > 0"),
    (dict(eig_cutoff="1e-5"), TypeError, "eig_cutoff must be a real number; got str"),
    (dict(unbiased=None), TypeError, "unbiased must be a bool"),
    (dict(style_eps=[0.1]), TypeError, "style_eps must be True, False or a number"),
])
def test_wct_bad_convention_arguments(kw, exc, text):
    c, s = _wct_data()
    with pytest.raises(exc, match="^wct: " + text):
        normref.wct(c, s, **kw)


def test_wct_cutoff_refuses_a_kept_noise_eigenvalue():
    """A cut-off below the rounding noise keeps a zero eigenvalue of a rank-deficient style: refused."""
    c, s = _wct_data(style_positions=3)
    with pytest.raises(ValueError, match="^wct: .*keeps an eigenvalue .* eig_cutoff=1e-30"):
        normref.wct(c, s, eig_cutoff=1e-30, style_eps=False)


# ---------------------------------------------------------------------------------------------------
# whitening_coloring: shrinkage


def _np_coloring_shrink(x, gam, beta, eps, method, mean=None, cov=None):
    """Siarohin et al.'s rule, one group of all channels: training Σ = (1 − ε)·Xc·Xcᵀ/(m − 1) + ε·I,
    inference (1 − ε)·Σ̂ + ε·I; W = L⁻¹ (cholesky) or Σ^-1/2 (zca); y = Γ·W·Xc + β."""
    c = x.shape[1]
    xm = np.moveaxis(x, 1, 0).reshape(c, -1)
    if mean is None:
        mu = xm.mean(1, keepdims=True)
        sig = (1 - eps) * (xm - mu) @ (xm - mu).T / (xm.shape[1] - 1) + eps * np.eye(c)
    else:
        mu = mean[:, None]
        sig = (1 - eps) * cov + eps * np.eye(c)
    if method == "cholesky":
        w = np.linalg.inv(np.linalg.cholesky(sig))
    else:
        lam, v = np.linalg.eigh(sig)
        w = (v / np.sqrt(lam)) @ v.T
    y = gam @ w @ (xm - mu) + beta[:, None]
    return np.moveaxis(y.reshape((c, x.shape[0]) + x.shape[2:]), 0, 1), sig


def _coloring_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 3, 2, 2)) + 0.4
    x[:, 2] -= 0.5 * x[:, 0]
    return x, rng.standard_normal((1, 3, 3)), rng.standard_normal(3)


@pytest.mark.parametrize("method", ["cholesky", "zca"])
def test_coloring_shrinkage_matches_numpy(method):
    x, gam, beta = _coloring_data()
    eps = 1e-2
    rm, rc = np.zeros(3), np.eye(3)[None]
    out = normref.whitening_coloring(x, rm, rc, gam, beta, training=True, eps=eps, method=method, shrinkage=True,
                                     momentum=0.3)
    want, sig = _np_coloring_shrink(x, gam[0], beta, eps, method)
    assert _rel(out.output, want) <= 1e3 * EPS64 * _kappa(sig)
    # the running update: unbiased, no ε, no shrinkage (their moving_cov)
    xm = np.moveaxis(x, 1, 0).reshape(3, -1)
    assert _rel(out.running_cov[0], 0.7 * np.eye(3) + 0.3 * np.cov(xm)) <= 64 * EPS64
    # inference from the running statistics: (1 − ε)·Σ̂ + ε·I
    y = normref.whitening_coloring(x, out.running_mean, out.running_cov, gam, beta, eps=eps, method=method,
                                   shrinkage=True)
    want, sig = _np_coloring_shrink(x, gam[0], beta, eps, method, np.asarray(out.running_mean),
                                    np.asarray(out.running_cov[0]))
    assert _rel(y, want) <= 1e3 * EPS64 * _kappa(sig)
    assert _rel(y, normref.whitening_coloring(x, out.running_mean, out.running_cov, gam, beta, eps=eps,
                                              method=method)) > 1e-4  # not the default


def _torch_coloring_shrink(torch, x, gam, beta, eps, method):
    c = x.shape[1]
    xm = torch.movedim(x, 1, 0).reshape(c, -1)
    xc = xm - xm.mean(1, keepdim=True)
    sig = (1 - eps) * xc @ xc.T / (xm.shape[1] - 1) + eps * torch.eye(c, dtype=x.dtype)
    if method == "cholesky":
        y = torch.linalg.solve_triangular(torch.linalg.cholesky(sig), xc, upper=False)
    else:
        lam, v = torch.linalg.eigh(sig)
        y = (v / torch.sqrt(lam)) @ v.T @ xc
    y = gam @ y + beta[:, None]
    return torch.movedim(y.reshape((c, x.shape[0]) + tuple(x.shape[2:])), 0, 1)


@pytest.mark.parametrize("method", ["cholesky", "zca"])
def test_coloring_shrinkage_backward(method):
    torch = pytest.importorskip("torch")
    x, gam, beta = _coloring_data(1)
    eps = 1e-2
    kw = dict(training=True, eps=eps, method=method, shrinkage=True)
    r = fd_check(normref.whitening_coloring, (x, None, None, gam, beta), kw, directions=3)
    assert r.max_error <= FD_TOL, r.errors
    g = np.random.default_rng(3).standard_normal(x.shape)
    _, pull = normref.vjp(normref.whitening_coloring, x, None, None, gam, beta, **kw)
    dx, _, _, dgam, dbeta = pull(g)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gam[0], beta))
    (_torch_coloring_shrink(torch, tx, tg, tb, eps, method) * torch.tensor(g)).sum().backward()
    _, sig = _np_coloring_shrink(x, gam[0], beta, eps, method)
    tol = 1e3 * EPS64 * _kappa(sig)
    err = max(_rel(dx, tx.grad.numpy()), _rel(dgam[0], tg.grad.numpy()), _rel(dbeta, tb.grad.numpy()))
    assert err <= tol, err
    print(f"whitening_coloring shrinkage [{method}]: FD {r.max_error:.1e}, torch {err:.1e}")


@pytest.mark.parametrize("kw,exc,text", [
    (dict(shrinkage="yes"), TypeError, "whitening_coloring: shrinkage must be a bool"),
    (dict(shrinkage=True, eps=1.5), ValueError,
     r"whitening_coloring: with shrinkage=True, eps .* must lie in \[0, 1\]; got eps=1.5"),
])
def test_coloring_bad_shrinkage(kw, exc, text):
    x, gam, beta = _coloring_data()
    with pytest.raises(exc, match="^" + text):
        normref.whitening_coloring(x, None, None, gam, beta, training=True, **kw)


# ---------------------------------------------------------------------------------------------------
# decorrelated_batch_norm / iter_norm: running="whitening_matrix"


def _np_batch_matrix(xm, eps, kind, t):
    """The batch's W of the authors' code: Σ = Xc·Xcᵀ/m + ε·I; ZCA by eigh, IterNorm by T Newton steps."""
    mu = xm.mean(1, keepdims=True)
    sig = (xm - mu) @ (xm - mu).T / xm.shape[1] + eps * np.eye(len(xm))
    if kind == "zca":
        lam, v = np.linalg.eigh(sig)
        return mu[:, 0], (v / np.sqrt(lam)) @ v.T, sig
    tr = np.trace(sig)
    p = np.eye(len(xm))
    for _ in range(t):
        p = (3 * p - p @ p @ p @ (sig / tr)) / 2
    return mu[:, 0], p / np.sqrt(tr), sig


@pytest.mark.parametrize("name,kind", [("decorrelated_batch_norm", "zca"), ("iter_norm", "iternorm")])
def test_running_whitening_matrix_follows_the_authors_rule(name, kind):
    """Three training steps and an inference, against the authors' rule in NumPy (groups of 2):
    μ̂ ← (1 − f)·μ̂ + f·μ, Ŵ ← (1 − f)·Ŵ + f·W_batch (initialised 0 and I), then (x − μ̂)·Ŵ."""
    fn = getattr(normref, name)
    rng = np.random.default_rng(4)
    c, gs, f, eps = 4, 2, 0.25, 1e-3
    rm, rw = np.zeros(c), np.stack([np.eye(gs)] * (c // gs))
    mu_ref, w_ref = rm.copy(), rw.copy()
    kappa = 1.0
    for step in range(3):
        x = rng.standard_normal((6, c, 3)) * (1 + step) + 0.3 * step
        x[:, 1] += 0.8 * x[:, 0]
        out = fn(x, rm, rw, training=True, momentum=f, eps=eps, group_size=gs, running="whitening_matrix")
        rm, rw = out.running_mean, out.running_cov
        xm = np.moveaxis(x, 1, 0).reshape(c, -1)
        for g in range(c // gs):
            mu, w, sig = _np_batch_matrix(xm[g * gs:(g + 1) * gs], eps, kind, 5)
            mu_ref[g * gs:(g + 1) * gs] = (1 - f) * mu_ref[g * gs:(g + 1) * gs] + f * mu
            w_ref[g] = (1 - f) * w_ref[g] + f * w
            kappa = max(kappa, _kappa(sig))
        tol = 1e3 * EPS64 * kappa
        assert _rel(rm, mu_ref) <= tol and _rel(rw, w_ref) <= tol, step
    x = rng.standard_normal((5, c, 3))
    y = fn(x, rm, rw, training=False, eps=eps, group_size=gs, running="whitening_matrix")
    rows = np.moveaxis(x, 1, -1).reshape(-1, c) - mu_ref  # the authors' layout: one sample a row
    want = np.concatenate([rows[:, g * gs:(g + 1) * gs] @ w_ref[g] for g in range(c // gs)], axis=1)
    want = np.moveaxis(want.reshape(5, 3, c), -1, 1)
    assert _rel(y, want) <= 1e3 * EPS64 * kappa
    # the default keeps a covariance instead, and gives a different inference
    assert _rel(fn(x, rm, np.stack([np.eye(gs)] * 2) * 2.0, eps=eps, group_size=gs), want) > 1e-3


@pytest.mark.parametrize("name", ["decorrelated_batch_norm", "iter_norm"])
def test_running_whitening_matrix_inference_backward(name):
    """Inference with a given Ŵ: X̂ = Ŵ·(X − μ̂), so dX = Ŵᵀ·G (a non-symmetric Ŵ shows the transpose);
    against finite differences and the explicit Ŵᵀ·G."""
    fn = getattr(normref, name)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3, 2))
    rm, rw = rng.standard_normal(3) * 0.1, (np.eye(3) + 0.3 * rng.standard_normal((3, 3)))[None]
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    kw = dict(training=False, running="whitening_matrix")
    r = fd_check(fn, (x, rm, rw, w, b), kw, directions=3)
    assert r.max_error <= FD_TOL, r.errors
    g = rng.standard_normal(x.shape)
    _, pull = normref.vjp(fn, x, rm, rw, w, b, **kw)
    dx = pull(g)[0]
    gm = np.moveaxis(g * w[None, :, None], 1, 0).reshape(3, -1)
    want = np.moveaxis((rw[0].T @ gm).reshape(3, 4, 2), 0, 1)
    assert _rel(dx, want) <= 64 * EPS64 * np.linalg.cond(rw[0])


@pytest.mark.parametrize("name", ["decorrelated_batch_norm", "iter_norm"])
def test_bad_running_argument(name):
    fn = getattr(normref, name)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    with pytest.raises(ValueError, match=f"^{name}: running must be one of 'covariance', 'whitening_matrix'; "
                                         f"got 'cov'"):
        fn(x, training=True, running="cov")
    with pytest.raises(ValueError, match=f"^{name}: running must be one of .*; got None"):
        fn(x, training=True, running=None)
    bad = np.eye(2)[None].copy()
    bad[0, 0, 1] = np.nan
    with pytest.raises(ValueError, match=f"^{name}: running_cov has non-finite values .*running whitening matrix"):
        fn(x, np.zeros(2), bad, running="whitening_matrix")


# ---------------------------------------------------------------------------------------------------
# the torch adapter passes the new keywords through


def test_torch_adapter_passes_convention_keywords():
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    c, s = _adain_data()
    y = nt.adain(torch.tensor(c), torch.tensor(s), unbiased=True, style_eps=False)
    assert _rel(y.numpy(), _np_adain(c, s, 1e-5, 1, 0.0)) <= 64 * EPS64 * _mu_cond(c, s)
    c2, s2 = _wct_data(style_positions=3)
    tc = torch.tensor(c2, requires_grad=True)
    y2 = nt.wct(tc, torch.tensor(s2), eps=1.0, unbiased=True, eig_cutoff=1e-5, style_eps=False)
    assert _rel(y2.detach().numpy(), _np_wct(c2, s2, 1.0, 1, 1e-5, 0.0)) <= 1e3 * EPS64 * \
        _wct_kappa(c2, s2, 1.0, 1, 1e-5, 0.0)
    y2.sum().backward()
    assert tc.grad is not None and torch.isfinite(tc.grad).all()
    x, gam, beta = _coloring_data()
    y3 = nt.whitening_coloring(torch.tensor(x), None, None, torch.tensor(gam), torch.tensor(beta), True,
                               eps=1e-2, shrinkage=True)
    assert _rel(y3.numpy(), _np_coloring_shrink(x, gam[0], beta, 1e-2, "cholesky")[0]) <= 1e3 * EPS64 * 10
    x4 = np.random.default_rng(1).standard_normal((6, 2, 3))
    out = nt.iter_norm(torch.tensor(x4), torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None],
                       training=True, momentum=1.0, running="whitening_matrix")
    _, w, _ = _np_batch_matrix(np.moveaxis(x4, 1, 0).reshape(2, -1), 1e-5, "iternorm", 5)
    assert _rel(out.running_cov[0].numpy(), w) <= 1e3 * EPS64 * 10


# ---------------------------------------------------------------------------------------------------
# the synchronized path with the new conventions (one rank: the global batch is the local one, so the
# result must equal the unsynchronized call; the multi-rank engines are tests/test_sync_whitening.py's)


class _OneRank(normref.distributed.Reducer):
    world_size = 1

    def _all_reduce_sum(self, a):
        return a

    def _all_gather(self, a):
        return a[None]


@pytest.mark.parametrize("name,kw", [
    ("whitening_coloring", dict(shrinkage=True, eps=1e-2)),
    ("decorrelated_batch_norm", dict(running="whitening_matrix")),
    ("iter_norm", dict(running="whitening_matrix")),
])
def test_synchronized_path_with_conventions(name, kw):
    """The synchronized code path (the count N an array: a = (1 − ε)·N/(N − 1) in the forward and the
    backward) equals the local one on a single rank: outputs, running state, gradients to ~ε₆₄·κ."""
    fn = getattr(normref, name)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((5, 3, 2)) + 0.2
    x[:, 1] += 0.5 * x[:, 0]
    rm, rc = np.zeros(3), np.eye(3)[None]
    g = rng.standard_normal(x.shape)
    outs = []
    for sync in (None, _OneRank()):
        out, pull = normref.vjp(fn, x, rm, rc, training=True, sync=sync, **kw)
        outs.append((out, pull(g)[0]))
    (a, da), (b, db) = outs
    tol = 1e3 * EPS64 * 10  # κ(Σ + εI) ≤ 10 for these data
    for u, v in zip(a, b):
        assert _rel(v, u) <= tol
    assert _rel(db, da) <= tol
