"""Conventions of the standardization family (issue 15 §1): where the paper, the authors' code and the
frameworks differ, each convention is an argument. For each: the authors' (or the framework's) formula
written here independently in NumPy, normref with the argument set against it, normref's analytic
backward against central finite differences and against torch autograd of the same independent
formula, and bad values of the new argument.

Tolerances
- forward vs the NumPy formula (float64): the same quantity in a different order of operations; an
  output element passes through O(10) roundings and one reduction over n ≤ 64 elements, so the error
  is ≤ c·n·ε₆₄·cond with c·n ≤ 1e3: ``TOL = 1e3·ε₆₄·cond``. cond is the conditioning of the divisor
  (the ratio of the largest |x| to the normalizing scale): the inputs here are O(1) with scales O(1)
  and ε ≥ 1e-5 keeping every divisor ≥ 0.05, so cond = 1 (stated per test where it is not).
- backward vs the torch-autograd oracle (float64): both are exact derivatives of the same function,
  rounded differently; the gradient passes through two reductions: ``2·TOL`` on the gradient scaled
  by max(1, max|grad|) (``rel_err``).
- backward vs finite differences: ``fd_check``'s 1e-6 relative bound (normref/conformance/fd.py
  explains why it is a bound with room).
"""

from __future__ import annotations

import numpy as np
import pytest

import normref
from normref._kernels import count_kernels
from normref.conformance.fd import fd_check
from tests.conftest import EPS64, rel_err

TOL = 1e3 * EPS64  # cond = 1 (see the module docstring)
FD = 1e-6

torch = pytest.importorskip("torch")


def _ch(a, nd):
    """A per-channel (C,) array broadcast against (N, C, *spatial)."""
    return np.reshape(a, (1, -1) + (1,) * (nd - 2))


def _fd(m, args, kwargs, seed=0):
    r = fd_check(m, args, kwargs, seed=seed, directions=3)
    assert r.max_error <= FD, r.errors
    print(f"  {m.name} {kwargs}: finite-difference error {r.max_error:.2e}")
    return r.max_error


def _oracle_grads(m, args, kwargs, torch_fn, diff):
    """normref's analytic pullback vs torch autograd of ``torch_fn`` (the independent formula) for the
    positional arguments ``diff``; returns the largest relative error."""
    out, pb = normref.vjp(m, *args, **kwargs)
    y = np.asarray(m.primary(out))
    g = np.random.default_rng(11).standard_normal(y.shape)
    ours = pb(g)
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=i in diff) if isinstance(a, np.ndarray) else a
          for i, a in enumerate(args)]
    yt = torch_fn(*ts)
    assert rel_err(yt.detach().numpy(), y) <= TOL
    (yt * torch.tensor(g)).sum().backward()
    worst = 0.0
    names = list(m.signature.parameters)
    for i in diff:  # the pullback gives one gradient per array parameter, in array_params order
        e = rel_err(ours[m.array_params.index(names[i])], ts[i].grad.numpy())
        assert e <= 2 * TOL, (m.name, i, e)
        worst = max(worst, e)
    print(f"  {m.name} {kwargs}: torch-autograd oracle error {worst:.2e}")
    return worst


# --------------------------------------------------------------------------------------------------
# 1. rms_norm: ε inside the root (torch) or outside (Zhang & Sennrich's code)


def test_rms_norm_eps_outside_matches_the_authors_formula(rng):
    x = rng.standard_normal((4, 3, 6)) + 0.5
    w = rng.standard_normal(6)
    for eps in (1e-8, 1e-3, 0.5):
        ref = w * x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps)  # γ·x/(RMS(x) + ε)
        y = normref.rms_norm(x, (6,), w, eps=eps, eps_placement="outside")
        assert rel_err(y, ref) <= TOL
    # the default is torch's placement, and the two differ at a visible ε
    inside = w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 0.5)
    assert rel_err(normref.rms_norm(x, (6,), w, eps=0.5), inside) <= TOL
    assert rel_err(normref.rms_norm(x, (6,), w, eps=0.5, eps_placement="outside"), inside) > 1e-2
    # an all-zero row: output 0, gradient r·g (finite)
    z = np.zeros((2, 5))
    out, pb = normref.vjp(normref.rms_norm, z, (5,), eps=1e-3, eps_placement="outside")
    assert np.all(out == 0) and np.allclose(pb(np.ones((2, 5)))[0], 1e3)


def test_rms_norm_eps_outside_backward(rng):
    x = rng.standard_normal((3, 2, 5)) + 0.5
    w = rng.standard_normal((2, 5))
    kw = dict(eps=1e-3, eps_placement="outside")
    worst = _fd(normref.rms_norm, (x, (2, 5), w), kw)

    def authors(xt, ns, wt):
        return wt * xt / (xt.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt() + 1e-3)

    worst = max(worst, _oracle_grads(normref.rms_norm, (x, (2, 5), w), kw, authors, (0, 2)))
    print(f"rms_norm eps_placement='outside': largest FD/oracle error {worst:.2e}")


def test_rms_norm_eps_outside_never_takes_a_kernel(rng):
    """Above the numba kernels' size threshold (4096 elements) the default placement runs the fused
    kernel; the outside placement must run its own formula (a kernel would compute the inside form)."""
    pytest.importorskip("numba")
    from backends.numba import config

    x = rng.standard_normal((8, 1024)) + 0.25
    assert x.size >= config.MIN_SIZE
    with count_kernels() as default:
        normref.rms_norm(x, (1024,), eps=0.25)
    assert default.taken.get("numpy.normalize_forward", 0) >= 1  # the control: the kernel path exists
    with count_kernels() as calls:
        out, pb = normref.vjp(normref.rms_norm, x, (1024,), eps=0.25, eps_placement="outside")
        pb(np.ones_like(x))
    assert calls.total_taken == 0, calls
    ref = x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + 0.25)
    assert rel_err(out, ref) <= TOL  # n = 1024: c·n·ε within TOL's 1e3 factor for a pairwise sum


def test_rms_norm_eps_placement_bad_input(rng):
    x = rng.standard_normal((2, 4))
    with pytest.raises(ValueError, match=r"rms_norm: eps_placement must be one of 'inside', 'outside'; got 'both'"):
        normref.rms_norm(x, (4,), eps_placement="both")
    with pytest.raises(TypeError, match=r"rms_norm: eps_placement must be a str, one of 'inside', 'outside'; got NoneType None"):
        normref.rms_norm(x, (4,), eps_placement=None)


# --------------------------------------------------------------------------------------------------
# 2. lp_batch_norm: ε inside the p-th moment; a running reciprocal scale (Hoffer et al.'s code)


def _np_lp_inside(x, p, eps, c=1.0):
    axes = (0,) + tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    s = (c**p * np.mean(np.abs(x - mu) ** p, axis=axes, keepdims=True) + eps) ** (1.0 / p)
    return mu, s


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 1.5])
def test_lp_batch_norm_eps_inside_and_reciprocal_running_scale(p, rng):
    x = rng.standard_normal((6, 3, 2, 2)) * 1.5 + 0.5
    rm, rs, w, b = rng.standard_normal(3), rng.uniform(0.5, 2, 3), rng.standard_normal(3), rng.standard_normal(3)
    eps, f = 0.05, 0.3
    c = np.sqrt(np.pi / 2) if p == 1.0 else 1.0  # the L1 factor (l1_factor=True, the default)
    mu, s = _np_lp_inside(x, p, eps, c)
    out = normref.lp_batch_norm(x, rm, rs, w, b, True, f, eps, p, eps_placement="inside",
                                running_scale_kind="reciprocal")
    assert rel_err(out.output, (x - mu) / s * _ch(w, 4) + _ch(b, 4)) <= TOL
    assert rel_err(out.running_mean, (1 - f) * rm + f * mu.ravel()) <= TOL
    assert rel_err(out.running_scale, (1 - f) * rs + f / s.ravel()) <= TOL  # the running 1/scale
    # inference by the running 1/scale: (x − μ̂)·r̂, nothing added
    y = normref.lp_batch_norm(x, rm, rs, w, b, False, p=p, running_scale_kind="reciprocal")
    assert rel_err(y, (x - _ch(rm, 4)) * _ch(rs, 4) * _ch(w, 4) + _ch(b, 4)) <= TOL
    # the deviation kind keeps σ_p and, inside, divides by ((c·σ̂)^p + ε)^{1/p} at inference
    y = normref.lp_batch_norm(x, rm, rs, None, None, False, eps=eps, p=p, eps_placement="inside")
    assert rel_err(y, (x - _ch(rm, 4)) / _ch(((c * rs) ** p + eps) ** (1 / p), 4)) <= TOL
    if p == 1.0:  # both placements coincide at p = 1
        assert rel_err(out.output, normref.lp_batch_norm(x, None, None, w, b, True, eps=eps, p=p)) <= TOL


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_lp_batch_norm_eps_inside_backward(p, rng):
    x = rng.standard_normal((6, 3, 2)) * 1.5 + 0.5
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    kw = dict(training=True, eps=0.05, p=p, eps_placement="inside")
    worst = _fd(normref.lp_batch_norm, (x, None, None, w, b), kw)

    def authors(xt, rm, rs, wt, bt):  # (mean|x − μ|^p + ε)^{−1/p}, the authors' LpBatchNorm2d
        mu = xt.mean(dim=(0, 2), keepdim=True)
        scale = ((xt - mu).abs().pow(p).mean(dim=(0, 2), keepdim=True) + 0.05) ** (-1.0 / p)
        return (xt - mu) * scale * wt[None, :, None] + bt[None, :, None]

    worst = max(worst, _oracle_grads(normref.lp_batch_norm, (x, None, None, w, b), kw, authors, (0, 3, 4)))
    print(f"lp_batch_norm eps_placement='inside' p={p}: largest FD/oracle error {worst:.2e}")


def test_lp_batch_norm_convention_bad_input(rng):
    x = rng.standard_normal((4, 3, 2))
    with pytest.raises(ValueError, match=r"lp_batch_norm: eps_placement must be one of 'outside', 'inside'; got 'root'"):
        normref.lp_batch_norm(x, training=True, eps_placement="root")
    with pytest.raises(TypeError, match=r"lp_batch_norm: running_scale_kind must be a str"):
        normref.lp_batch_norm(x, training=True, running_scale_kind=1)
    with pytest.raises(ValueError, match=r"lp_batch_norm: running_scale_kind must be one of 'deviation', 'reciprocal'; got 'inverse'"):
        normref.lp_batch_norm(x, training=True, running_scale_kind="inverse")
    with pytest.raises(ValueError, match=r"lp_batch_norm: eps_placement='inside' needs a finite p"):
        normref.lp_batch_norm(x, training=True, p=float("inf"), eps_placement="inside")
    with pytest.raises(ValueError, match=r"lp_batch_norm: running_scale must be >= 0 everywhere \(it is a reciprocal scale\)"):
        normref.lp_batch_norm(x, np.zeros(3), -np.ones(3), running_scale_kind="reciprocal")


# --------------------------------------------------------------------------------------------------
# 3. batch_renorm: a running σ (Ioffe 2017, Algorithm 1)


def test_batch_renorm_running_std_is_algorithm_1(rng):
    x = rng.standard_normal((6, 3, 2, 2)) * 1.5 + 0.5
    rm, sd = rng.standard_normal(3) * 0.3, rng.uniform(0.8, 1.5, 3)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    eps, alpha = 1e-5, 0.2
    for rmax, dmax, scale in ((3.0, 5.0, 1.0), (1.5, 0.5, 0.1)):  # inside and outside the clip range
        s = sd * scale
        axes = (0, 2, 3)
        mu_b, sig_b = x.mean(axis=axes), np.sqrt(x.var(axis=axes) + eps)  # σ_B = √(σ_B² + ε), biased
        r = np.clip(sig_b / s, 1 / rmax, rmax)
        d = np.clip((mu_b - rm) / s, -dmax, dmax)
        ref = ((x - _ch(mu_b, 4)) / _ch(sig_b, 4) * _ch(r, 4) + _ch(d, 4)) * _ch(w, 4) + _ch(b, 4)
        out = normref.batch_renorm(x, rm, s, w, b, True, alpha, eps, rmax, dmax, running_stat="std")
        assert rel_err(out.output, ref) <= TOL
        assert rel_err(out.running_mean, rm + alpha * (mu_b - rm)) <= TOL
        assert rel_err(out.running_var, s + alpha * (sig_b - s)) <= TOL  # σ ← σ + α(σ_B − σ)
    y = normref.batch_renorm(x, rm, sd, w, b, False, running_stat="std")  # y = γ(x − μ)/σ + β
    assert rel_err(y, (x - _ch(rm, 4)) / _ch(sd, 4) * _ch(w, 4) + _ch(b, 4)) <= TOL
    # the default keeps an unbiased running variance, σ = √(running_var + ε)
    out = normref.batch_renorm(x, rm, sd**2, w, b, True, alpha)
    n = x.size // 3
    assert rel_err(out.running_var, (1 - alpha) * sd**2 + alpha * x.var(axis=(0, 2, 3)) * n / (n - 1)) <= TOL


def test_batch_renorm_running_std_backward(rng):
    x = rng.standard_normal((6, 3, 2)) * 1.5 + 0.5
    rm, sd = rng.standard_normal(3) * 0.3, rng.uniform(0.8, 1.5, 3)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    worst = 0.0
    for rmax, dmax, scale in ((3.0, 5.0, 1.0), (1.5, 0.5, 0.1)):
        kw = dict(training=True, rmax=rmax, dmax=dmax, running_stat="std")
        args = (x, rm * 10 * (scale < 1) + rm, sd * scale, w, b)
        worst = max(worst, _fd(normref.batch_renorm, args, kw))  # fd_target freezes r, d

        def authors(xt, rmt, st, wt, bt):  # Algorithm 1 with r, d stop-gradient
            mu = xt.mean(dim=(0, 2), keepdim=True)
            sb = (xt.var(dim=(0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
            r = (sb.detach() / st[None, :, None]).clamp(1 / rmax, rmax)
            d = ((mu.detach() - rmt[None, :, None]) / st[None, :, None]).clamp(-dmax, dmax)
            return ((xt - mu) / sb * r + d) * wt[None, :, None] + bt[None, :, None]

        worst = max(worst, _oracle_grads(normref.batch_renorm, args, kw, authors, (0, 3, 4)))
    print(f"batch_renorm running_stat='std': largest FD/oracle error {worst:.2e}")


def test_batch_renorm_running_stat_bad_input(rng):
    x = rng.standard_normal((4, 3, 2))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"batch_renorm: running_stat must be one of 'var', 'std'; got 'sigma'"):
        normref.batch_renorm(x, rm, rv, training=True, running_stat="sigma")
    with pytest.raises(TypeError, match=r"batch_renorm: running_stat must be a str"):
        normref.batch_renorm(x, rm, rv, training=True, running_stat=True)
    with pytest.raises(ValueError, match=r"batch_renorm: with running_stat='std' running_var holds the running σ "
                                         r"and must be > 0 everywhere; got 0.0 at index 1"):
        normref.batch_renorm(x, rm, np.array([1.0, 0.0, 1.0]), training=True, running_stat="std")


# --------------------------------------------------------------------------------------------------
# 4. position_norm: the unbiased variance of the authors' PyTorch code (x.var(dim=1))


def test_position_norm_unbiased(rng):
    x = rng.standard_normal((2, 5, 3, 2)) * 2.0
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    mu = x.mean(axis=1, keepdims=True)
    std = np.sqrt(np.sum((x - mu) ** 2, axis=1, keepdims=True) / (5 - 1) + 1e-5)
    y = normref.position_norm(x, w, b, unbiased=True)
    assert rel_err(y, (x - mu) / std * _ch(w, 4) + _ch(b, 4)) <= TOL
    assert rel_err(normref.position_norm(x), (x - mu) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-5)) <= TOL
    worst = _fd(normref.position_norm, (x, w, b), dict(unbiased=True))

    def authors(xt, wt, bt):
        m = xt.mean(dim=1, keepdim=True)
        return (xt - m) / xt.var(dim=1, keepdim=True).add(1e-5).sqrt() * wt[None, :, None, None] + bt[None, :, None, None]

    worst = max(worst, _oracle_grads(normref.position_norm, (x, w, b), dict(unbiased=True), authors, (0, 1, 2)))
    print(f"position_norm unbiased=True: largest FD/oracle error {worst:.2e}")


def test_position_norm_unbiased_bad_input(rng):
    with pytest.raises(TypeError, match=r"position_norm: unbiased must be a bool \(True or False\); got str 'yes'"):
        normref.position_norm(rng.standard_normal((2, 3, 2)), unbiased="yes")
    with pytest.raises(ValueError, match=r"position_norm: unbiased=True divides by C - 1 and needs at least 2 channels"):
        normref.position_norm(rng.standard_normal((2, 1, 2)), unbiased=True)


# --------------------------------------------------------------------------------------------------
# 5. switchable_norm: the authors' unbiased instance variance; SwitchNorm1d (LN + BN, 2 logits)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _np_switch2d(x, lm, lv, w, b, eps, rm=None, rv=None):
    """The authors' SwitchNorm2d forward (training when rm is None), written from its equations."""
    n, c = x.shape[:2]
    t = x.reshape(n, c, -1)
    mean_in = t.mean(-1, keepdims=True)
    var_in = t.var(-1, ddof=1, keepdims=True)
    mean_ln = mean_in.mean(1, keepdims=True)
    temp = var_in + mean_in**2
    var_ln = temp.mean(1, keepdims=True) - mean_ln**2
    if rm is None:
        mean_bn = mean_in.mean(0, keepdims=True)
        var_bn = temp.mean(0, keepdims=True) - mean_bn**2
    else:
        mean_bn, var_bn = rm.reshape(1, c, 1), rv.reshape(1, c, 1)
    mw, vw = _softmax(lm), _softmax(lv)
    mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
    var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
    return ((t - mean) / np.sqrt(var + eps)).reshape(x.shape) * _ch(w, x.ndim) + _ch(b, x.ndim)


def _np_switch1d(x, lm, lv, w, b, eps, rm=None, rv=None):
    """The authors' SwitchNorm1d forward: LN over C, BN over N, both unbiased (x.var)."""
    mean_ln, var_ln = x.mean(1, keepdims=True), x.var(1, ddof=1, keepdims=True)
    if rm is None:
        mean_bn, var_bn = x.mean(0, keepdims=True), x.var(0, ddof=1, keepdims=True)
    else:
        mean_bn, var_bn = rm[None], rv[None]
    mw, vw = _softmax(lm), _softmax(lv)
    mean = mw[0] * mean_ln + mw[1] * mean_bn
    var = vw[0] * var_ln + vw[1] * var_bn
    return (x - mean) / np.sqrt(var + eps) * w + b


def test_switchable_norm_unbiased_matches_the_authors_code(rng):
    x = rng.standard_normal((4, 3, 3, 2)) * 1.5 + 0.5
    lm, lv = rng.standard_normal(3), rng.standard_normal(3)
    w, b, rm, rv = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    # cond: σ²_LN, σ²_BN formed as mean(σ² + μ²) − μ² cancel ≈ max(μ²)/σ² ≈ 4 here
    tol = 4 * TOL
    out = normref.switchable_norm(x, lm, lv, w, b, rm, rv, True, 0.2, unbiased=True)
    assert rel_err(out.output, _np_switch2d(x, lm, lv, w, b, 1e-5)) <= tol
    # the running variance stays torch's: the unbiased BN batch variance
    nb = x.size // 3
    assert rel_err(out.running_var, 0.8 * rv + 0.2 * x.var(axis=(0, 2, 3)) * nb / (nb - 1)) <= TOL
    y = normref.switchable_norm(x, lm, lv, w, b, rm, rv, False, unbiased=True)
    assert rel_err(y, _np_switch2d(x, lm, lv, w, b, 1e-5, rm, rv)) <= tol


def test_switchable_norm_1d_is_switchnorm1d(rng):
    x = rng.standard_normal((5, 4)) * 1.5 + 0.5
    lm, lv = rng.standard_normal(2), rng.standard_normal(2)
    w, b, rm, rv = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    out = normref.switchable_norm(x, lm, lv, w, b, rm, rv, True, 0.2, unbiased=True)
    assert rel_err(out.output, _np_switch1d(x, lm, lv, w, b, 1e-5)) <= TOL
    assert rel_err(out.running_var, 0.8 * rv + 0.2 * x.var(axis=0, ddof=1)) <= TOL
    y = normref.switchable_norm(x, lm, lv, w, b, rm, rv, False, unbiased=True)
    assert rel_err(y, _np_switch1d(x, lm, lv, w, b, 1e-5, rm, rv)) <= TOL
    # biased (the paper's equations): LN and BN with the biased variances
    mw, vw = _softmax(lm), _softmax(lv)
    mean = mw[0] * x.mean(1, keepdims=True) + mw[1] * x.mean(0, keepdims=True)
    var = vw[0] * x.var(1, keepdims=True) + vw[1] * x.var(0, keepdims=True)
    y = normref.switchable_norm(x, lm, lv, w, b, training=True)
    assert rel_err(y, (x - mean) / np.sqrt(var + 1e-5) * w + b) <= TOL


def _t_switch2d(xt, lm, lv, wt, bt, *rest):
    n, c = xt.shape[:2]
    t = xt.reshape(n, c, -1)
    mean_in, var_in = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
    mean_ln = mean_in.mean(1, keepdim=True)
    temp = var_in + mean_in**2
    var_ln = temp.mean(1, keepdim=True) - mean_ln**2
    mean_bn = mean_in.mean(0, keepdim=True)
    var_bn = temp.mean(0, keepdim=True) - mean_bn**2
    mw, vw = torch.softmax(lm, 0), torch.softmax(lv, 0)
    mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
    var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
    y = ((t - mean) / (var + 1e-5).sqrt()).reshape(xt.shape)
    return y * wt[None, :, None, None] + bt[None, :, None, None]


def _t_switch1d(xt, lm, lv, wt, bt, *rest):
    mean_ln, var_ln = xt.mean(1, keepdim=True), xt.var(1, keepdim=True)
    mean_bn, var_bn = xt.mean(0, keepdim=True), xt.var(0, keepdim=True)
    mw, vw = torch.softmax(lm, 0), torch.softmax(lv, 0)
    mean = mw[0] * mean_ln + mw[1] * mean_bn
    var = vw[0] * var_ln + vw[1] * var_bn
    return (xt - mean) / (var + 1e-5).sqrt() * wt + bt


def test_switchable_norm_convention_backward(rng):
    worst = 0.0
    x2 = rng.standard_normal((4, 3, 3, 2)) * 1.5 + 0.5
    x1 = rng.standard_normal((5, 4)) * 1.5 + 0.5
    for x, k, oracle in ((x2, 3, _t_switch2d), (x1, 2, _t_switch1d)):
        c = x.shape[1]
        args = (x, rng.standard_normal(k), rng.standard_normal(k), rng.standard_normal(c), rng.standard_normal(c))
        for unbiased in (False, True):
            kw = dict(training=True, unbiased=unbiased)
            worst = max(worst, _fd(normref.switchable_norm, args, kw))
        kw = dict(training=True, unbiased=True)
        # the oracle's LN/BN variances cancel as mean(σ² + μ²) − μ² (cond ≈ 4, as above)
        out, pb = normref.vjp(normref.switchable_norm, *args, **kw)
        g = np.random.default_rng(3).standard_normal(x.shape)
        ours = pb(g)
        ts = [torch.tensor(a, requires_grad=True) for a in args]
        yt = oracle(*ts)
        assert rel_err(yt.detach().numpy(), out) <= 4 * TOL
        (yt * torch.tensor(g)).sum().backward()
        for i in range(5):
            e = rel_err(ours[i], ts[i].grad.numpy())
            assert e <= 8 * TOL, (x.shape, i, e)
            worst = max(worst, e)
            print(f"  switchable_norm {x.shape} argument {i}: torch-autograd oracle error {e:.2e}")
    print(f"switchable_norm unbiased / (N, C): largest FD/oracle error {worst:.2e}")


def test_switchable_norm_convention_bad_input(rng):
    x = rng.standard_normal((4, 3, 2))
    lm = np.zeros(3)
    with pytest.raises(TypeError, match=r"switchable_norm: unbiased must be a bool \(True or False\); got int 1"):
        normref.switchable_norm(x, lm, lm, training=True, unbiased=1)
    with pytest.raises(ValueError, match=r"switchable_norm: mean_weight must have shape \(2,\)"):
        normref.switchable_norm(rng.standard_normal((4, 3)), lm, lm, training=True)
    with pytest.raises(ValueError, match=r"switchable_norm: mean_weight must have shape \(3,\)"):
        normref.switchable_norm(x, np.zeros(2), np.zeros(2), training=True)
    with pytest.raises(ValueError, match=r"switchable_norm: unbiased=True divides by the channels \(C - 1\)"):
        normref.switchable_norm(rng.standard_normal((4, 1)), np.zeros(2), np.zeros(2), training=True, unbiased=True)


# --------------------------------------------------------------------------------------------------
# 6. adaptive_layer_instance_norm: torch.var (unbiased) in both branches (U-GAT-IT's adaILN)


def test_adalin_unbiased(rng):
    x = rng.standard_normal((3, 4, 3, 2)) * 1.5 - 0.5
    rho = rng.uniform(0, 1, 4)
    gam, bet = rng.standard_normal((3, 4, 1, 1)), rng.standard_normal((3, 4, 1, 1))
    i_ax, l_ax = (2, 3), (1, 2, 3)

    def st(axes, ddof):
        m = x.mean(axis=axes, keepdims=True)
        n = int(np.prod([x.shape[a] for a in axes]))
        return (x - m) / np.sqrt(np.sum((x - m) ** 2, axis=axes, keepdims=True) / (n - ddof) + 1e-5)

    r = _ch(rho, 4)
    ref = (r * st(i_ax, 1) + (1 - r) * st(l_ax, 1)) * gam + bet
    assert rel_err(normref.adaptive_layer_instance_norm(x, rho, gam, bet, unbiased=True), ref) <= TOL
    ref0 = (r * st(i_ax, 0) + (1 - r) * st(l_ax, 0)) * gam + bet
    assert rel_err(normref.adaptive_layer_instance_norm(x, rho, gam, bet), ref0) <= TOL
    worst = _fd(normref.adaptive_layer_instance_norm, (x, rho, gam, bet), dict(unbiased=True))

    def authors(xt, rt, gt, bt):
        im, iv = xt.mean(dim=[2, 3], keepdim=True), xt.var(dim=[2, 3], keepdim=True)
        lm, lv = xt.mean(dim=[1, 2, 3], keepdim=True), xt.var(dim=[1, 2, 3], keepdim=True)
        rr = rt[None, :, None, None]
        return (rr * (xt - im) / (iv + 1e-5).sqrt() + (1 - rr) * (xt - lm) / (lv + 1e-5).sqrt()) * gt + bt

    worst = max(worst, _oracle_grads(normref.adaptive_layer_instance_norm, (x, rho, gam, bet), dict(unbiased=True),
                                     authors, (0, 1, 2, 3)))
    print(f"adaptive_layer_instance_norm unbiased=True: largest FD/oracle error {worst:.2e}")
    with pytest.raises(TypeError, match=r"adaptive_layer_instance_norm: unbiased must be a bool"):
        normref.adaptive_layer_instance_norm(x, rho, unbiased=None)


# --------------------------------------------------------------------------------------------------
# 7. batch_norm: Flax's / Keras's running state (momentum = weight of the old value, biased variance)


@pytest.mark.parametrize("shape", [(4, 3, 5), (16, 8, 40)])  # the second above the kernels' threshold
def test_batch_norm_biased_running_variance_is_flax_keras(shape, rng):
    x = rng.standard_normal(shape) * 2.0 + 1.0
    c = shape[1]
    rm, rv, w, b = rng.standard_normal(c), rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c)
    m = 0.99  # Flax/Keras momentum: the weight of the old value
    axes = (0, 2)
    mu, var = x.mean(axis=axes), x.var(axis=axes)  # var biased, what Flax/Keras keep
    out = normref.batch_norm(x, rm, rv, w, b, True, 1 - m, running_var_unbiased=False)
    assert rel_err(out.running_mean, m * rm + (1 - m) * mu) <= TOL
    assert rel_err(out.running_var, m * rv + (1 - m) * var) <= TOL
    default = normref.batch_norm(x, rm, rv, w, b, True, 1 - m)  # torch's: unbiased
    n = x.size // c
    assert rel_err(default.running_var, m * rv + (1 - m) * var * n / (n - 1)) <= TOL
    assert np.array_equal(out.output, default.output)  # the output does not depend on the convention
    worst = _fd(normref.batch_norm, (rng.standard_normal((4, 3, 5)), rm[:3], rv[:3], w[:3], b[:3]),
                dict(training=True, momentum=0.01, running_var_unbiased=False))
    print(f"batch_norm running_var_unbiased=False: largest FD error {worst:.2e}")


def test_batch_norm_running_var_unbiased_bad_input(rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises(TypeError, match=r"batch_norm: running_var_unbiased must be a bool \(True or False\); got str 'False'"):
        normref.batch_norm(x, np.zeros(3), np.ones(3), training=True, running_var_unbiased="False")


# --------------------------------------------------------------------------------------------------
# the torch adapter passes every new keyword through


def test_torch_adapter_passes_the_convention_keywords(rng):
    from normref.backends import torch as nt

    x4 = rng.standard_normal((4, 3, 3, 2)) + 0.5
    x2 = rng.standard_normal((5, 4)) + 0.5
    cases = [
        ("rms_norm", (x4, (2,)), dict(eps=1e-3, eps_placement="outside")),
        ("lp_batch_norm", (x4, None, None, rng.standard_normal(3)), dict(training=True, p=3.0, eps=0.05, eps_placement="inside")),
        ("batch_renorm", (x4, rng.standard_normal(3), rng.uniform(0.5, 1.5, 3)), dict(training=True, running_stat="std")),
        ("position_norm", (x4,), dict(unbiased=True)),
        ("switchable_norm", (x2, rng.standard_normal(2), rng.standard_normal(2)), dict(training=True, unbiased=True)),
        ("adaptive_layer_instance_norm", (x4, rng.uniform(0, 1, 3)), dict(unbiased=True)),
        ("batch_norm", (x4, rng.standard_normal(3), rng.uniform(0.5, 1.5, 3)), dict(training=True, running_var_unbiased=False)),
    ]
    for name, args, kw in cases:
        m = normref.get(name)
        ref_out, pb = normref.vjp(m, *args, **kw)
        ref = m.primary(ref_out)
        g = np.random.default_rng(5).standard_normal(ref.shape)
        ts = [torch.tensor(a, requires_grad=(i == 0)) if isinstance(a, np.ndarray) else a for i, a in enumerate(args)]
        out = getattr(nt, name)(*ts, **kw)
        y = out if isinstance(out, torch.Tensor) else out[0]
        assert rel_err(y.detach().numpy(), ref) <= TOL, name
        if not isinstance(out, torch.Tensor):  # the running statistics too
            for a, r in zip(out[1:], ref_out[1:]):
                assert rel_err(a.numpy(), r) <= TOL, name
        (y * torch.tensor(g)).sum().backward()
        assert rel_err(ts[0].grad.numpy(), pb(g)[0]) <= TOL, name
    # a stateful layer keeps the convention: its running_var buffer is the running σ (initial 1)
    layer = nt.StatefulNorm("batch_renorm", 3, running_stat="std").double()
    layer(torch.tensor(x4))
    sig_b = np.sqrt(x4.var(axis=(0, 2, 3)) + 1e-5)
    assert rel_err(layer.running_var.numpy(), 0.9 * 1.0 + 0.1 * sig_b) <= TOL


# --------------------------------------------------------------------------------------------------
# with a reducer (one rank: the synchronized statistics are the local ones)


class _OneRank(normref.distributed.Reducer):
    """The exact collectives of a world of one rank (no processes)."""

    world_size = 1

    def _all_reduce_sum(self, a):
        return a + 0

    def _all_gather(self, a):
        return a[None]


def test_conventions_with_a_reducer(rng):
    x = rng.standard_normal((6, 3, 2)) + 0.5
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    for name, args, kw in [
        ("batch_norm", (x, rm, rv), dict(training=True, running_var_unbiased=False)),
        ("batch_renorm", (x, rm, rv), dict(training=True, running_stat="std")),
        ("lp_batch_norm", (x, rm, rv), dict(training=True, p=3.0, running_scale_kind="reciprocal")),
    ]:
        m = normref.get(name)
        local, synced = m(*args, **kw), m(*args, **kw, sync=_OneRank())
        for a, b in zip(local, synced):  # one rank: the pooled moments of one part, cond 1
            assert rel_err(a, b) <= TOL, name
    with pytest.raises(ValueError, match=r"lp_batch_norm: eps_placement='inside' has no synchronized form"):
        normref.lp_batch_norm(x, training=True, eps_placement="inside", sync=_OneRank())
    with pytest.raises(ValueError, match=r"switchable_norm: unbiased=True has no synchronized form"):
        normref.switchable_norm(x, np.zeros(3), np.zeros(3), training=True, unbiased=True, sync=_OneRank())
