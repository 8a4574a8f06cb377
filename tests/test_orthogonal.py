"""normref.orthogonal: Cayley, matrix-exponential and Householder orthogonal maps against torch's
``parametrizations.orthogonal`` (forward, and torch autograd through torch's own map as the gradient
oracle), orthogonality, determinants, finite differences, every array library, bad input.

Tolerances. Each map is a backward-stable O(n³) computation: a product of n reflections, one LU solve
of I − A/2 (κ = κ₂(I − A/2)), or a Padé solve followed by s squarings (relative error growing like
2^s·‖A‖ ≈ (1 + ‖A‖₂)). So two correct implementations (torch's LAPACK calls and normref's array-API
code) differ by at most c·ε·n·κ with κ the case's condition figure above; c = 64 covers the constants
of the O(n³) rounding bounds (measured: ≤ 3e-15 on these cases, i.e. c·n·κ·ε with c < 4).
"""

from __future__ import annotations

import numpy as np
import pytest

import normref

torch = pytest.importorskip("torch")
from torch.nn.utils.parametrizations import _Orthogonal, _OrthMaps, orthogonal  # noqa: E402

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

MAPS = {
    "cayley": (normref.cayley, _OrthMaps.cayley),
    "matrix_exp": (normref.matrix_exp_orthogonal, _OrthMaps.matrix_exp),
    "householder": (normref.householder_orthogonal, _OrthMaps.householder),
}
SHAPES = [(1, 1), (4, 4), (7, 7), (2, 3, 5, 5)]


def _proxy(rng, shape, name, scale=1.0):
    x = scale * rng.standard_normal(shape)
    if name == "householder":  # torch's domain: a ±1 diagonal (its right_inverse sets −1)
        n = min(shape[-2:])
        i = np.arange(n)
        x[..., i, i] = np.where(rng.standard_normal(shape[:-2] + (n,)) < 0, -1.0, 1.0)
    return x


def _kappa(x, name) -> float:
    """The condition figure of the tolerance (module docstring), worst matrix of the batch; for a
    rectangular proxy, that of the square n × n computation torch's convention reduces it to (a wide
    X transposed; a tall one's tril padded with zero columns, or its k reflectors)."""
    if x.shape[-2] < x.shape[-1]:
        x = np.swapaxes(x, -1, -2)
    n, k = x.shape[-2], x.shape[-1]
    if name == "householder":
        v = np.tril(x, -1) + np.eye(n, k)
        return float(np.max(np.sum(v * v, axis=-2)))
    if k < n:
        x = np.concatenate([np.tril(x), np.zeros(x.shape[:-1] + (n - k,))], axis=-1)
    low = np.tril(x)
    a = low - np.swapaxes(low, -1, -2)
    if name == "cayley":
        return float(np.max(np.linalg.cond(np.eye(n) - a / 2)))
    if name == "matrix_exp":
        return float(1.0 + np.max(np.linalg.norm(a, 2, axis=(-2, -1))))
    raise ValueError(name)


def _torch_map(x, mp):
    """torch's map itself (``use_trivialization=False``), with autograd on the proxy."""
    mod = _Orthogonal(torch.zeros(x.shape, dtype=torch.float64), mp, use_trivialization=False)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    return xt, mod(xt)


@pytest.fixture
def rng():
    return np.random.default_rng(20261202)


# --------------------------------------------------------------------------------------------------
# torch as the oracle


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_forward_and_gradient_equal_torch(name, shape, scale, rng):
    f, mp = MAPS[name]
    x = _proxy(rng, shape, name, scale)
    tol = 64 * EPS64 * shape[-1] * _kappa(x, name)
    xt, qt = _torch_map(x, mp)
    q, pullback = normref.vjp(f, x)
    assert np.max(np.abs(q - qt.detach().numpy())) <= tol
    g = rng.standard_normal(q.shape)
    (qt * torch.tensor(g)).sum().backward()
    (gx,) = pullback(g)
    # the gradient is as well conditioned as the map (same solves / products), scaled by ‖G‖
    assert np.max(np.abs(gx - xt.grad.numpy())) <= tol * max(1.0, float(np.max(np.abs(g)))) * shape[-1]


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("trivialization", [False, True])
def test_public_torch_parametrization_on_a_linear_layer(name, trivialization, rng):
    """``orthogonal(nn.Linear, orthogonal_map=name)``: its weight is normref's map of the stored proxy
    (times the constant ``base`` on the left with ``use_trivialization=True``)."""
    f, _ = MAPS[name]
    n = 6
    lin = torch.nn.Linear(n, n, bias=False, dtype=torch.float64)
    orthogonal(lin, orthogonal_map=name, use_trivialization=trivialization)
    x = _proxy(rng, (n, n), name)
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(torch.tensor(x))
    w = lin.weight.detach().numpy()
    q = f(x)
    if trivialization:
        q = lin.parametrizations.weight[0].base.numpy() @ q
    assert np.max(np.abs(w - q)) <= 64 * EPS64 * n * _kappa(x, name)


def test_householder_trunc_reproduces_torch_off_its_domain(rng):
    """A diagonal not ±1: torch multiplies by its integer cast; ``diagonal="trunc"`` does the same,
    the default ``"sign"`` keeps Q orthogonal."""
    x = 1.7 * rng.standard_normal((5, 5))
    xt, qt = _torch_map(x, _OrthMaps.householder)
    qtr = normref.householder_orthogonal(x, diagonal="trunc")
    assert np.max(np.abs(qtr - qt.detach().numpy())) <= 64 * EPS64 * 5 * _kappa(x, "householder")
    qs = normref.householder_orthogonal(x)
    assert np.max(np.abs(qs.T @ qs - np.eye(5))) <= 64 * EPS64 * 5


# --------------------------------------------------------------------------------------------------
# the group: QᵀQ = I, det Q


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dtype, eps", [(np.float64, EPS64), (np.float32, EPS32)], ids=["float64", "float32"])
def test_orthogonal_to_rounding_and_determinant(name, dtype, eps, rng):
    f, _ = MAPS[name]
    x = _proxy(rng, (3, 6, 6), name)
    q = f(x.astype(dtype))
    assert q.dtype == dtype
    q = q.astype(np.float64)
    # QᵀQ − I: n roundings per entry of the product on top of Q's own c·n·κ·ε (κ as above)
    assert np.max(np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(6))) <= 64 * eps * 6 * _kappa(x, name)
    det = np.linalg.det(q)
    if name == "householder":  # n reflections (det −1 each) times D
        want = (-1.0) ** 6 * np.prod(np.diagonal(x, axis1=-2, axis2=-1), axis=-1)
    else:  # exp and Cayley of a skew-symmetric matrix: SO(n)
        want = np.ones(3)
    assert np.max(np.abs(det - want)) <= 64 * eps * 6 * _kappa(x, name)


def test_identity_at_zero():
    """A = 0 gives Q = I for exp and Cayley; torch's householder(−I) = I (the −1 diagonal)."""
    z = np.zeros((4, 4))
    assert np.array_equal(normref.cayley(z), np.eye(4))
    assert np.max(np.abs(normref.matrix_exp_orthogonal(z) - np.eye(4))) <= EPS64
    assert np.max(np.abs(normref.householder_orthogonal(-np.eye(4)) - np.eye(4))) <= 4 * EPS64


# --------------------------------------------------------------------------------------------------
# finite differences (float64)


@pytest.mark.parametrize("name", list(MAPS))
def test_finite_differences(name, rng):
    """Central differences on random directions: truncation h²·|f'''| ≈ 1e-12 and round-off ε/h ≈
    1e-10 at h = 1e-6, so 1e-6 (relative to the directional derivative's size) leaves a wide margin
    and still catches any wrong term (an error of one term is O(1))."""
    f, _ = MAPS[name]
    for shape in [(5, 5), (2, 4, 4)]:
        x = _proxy(rng, shape, name)
        q, pullback = normref.vjp(f, x)
        g = rng.standard_normal(q.shape)
        (gx,) = pullback(g)
        for _ in range(3):
            d = rng.standard_normal(shape)
            h = 1e-6
            fd = np.sum((f(x + h * d) - f(x - h * d)) * g) / (2 * h)
            an = np.sum(gx * d)
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (name, shape, fd, an)


# --------------------------------------------------------------------------------------------------
# the matrix exponential itself


def test_expm_against_the_series_and_scipy(rng):
    """A general (non-skew) matrix: Taylor series for a small norm (exact to ~ε), scipy for large."""
    a = 0.1 * rng.standard_normal((5, 5))
    series, term = np.eye(5), np.eye(5)
    for k in range(1, 30):
        term = term @ a / k
        series = series + term
    assert np.max(np.abs(normref.expm(a) - series)) <= 16 * EPS64
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = 8.0 * rng.standard_normal((2, 6, 6))  # ‖B‖₁ ≈ 40: several squarings
    ref = np.stack([scipy_linalg.expm(m) for m in b])
    # relative error of scaling and squaring: ≈ n·ε·‖B‖·κ_exp; against max|exp(B)|
    assert np.max(np.abs(normref.expm(b) - ref)) / np.max(np.abs(ref)) <= 1e3 * EPS64 * 6


def test_expm_under_jax_jit_matches_eager(rng):
    """No concrete norm under ``jax.jit``: the masked squarings give the eager result."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    a = 4.0 * rng.standard_normal((2, 5, 5))
    eager = normref.matrix_exp_orthogonal(a)
    jitted = np.asarray(jax.jit(normref.matrix_exp_orthogonal)(jnp.asarray(a)))
    assert np.max(np.abs(jitted - eager)) <= 64 * EPS64 * 5 * _kappa(a, "matrix_exp")


# --------------------------------------------------------------------------------------------------
# every array library


@pytest.mark.parametrize("name", list(MAPS))
def test_every_backend_matches_numpy(name, backend, rng):
    f, _ = MAPS[name]
    x = _proxy(rng, (2, 5, 5), name)
    q, pullback = normref.vjp(f, x)
    g = rng.standard_normal(q.shape)
    (gx,) = pullback(g)
    xb = backend.asarray(x, "float64")
    qb, pullback_b = normref.vjp(f, xb)
    (gxb,) = pullback_b(backend.asarray(g, "float64"))
    tol = 64 * EPS64 * 5 * _kappa(x, name)  # another order of the same operations
    assert np.max(np.abs(np.asarray(backend.to_numpy(qb), np.float64) - q)) <= tol
    assert np.max(np.abs(np.asarray(backend.to_numpy(gxb), np.float64) - gx)) <= tol * 5 * np.max(np.abs(g))


def test_torch_adapter_gradcheck(rng):
    from normref.backends import torch as nt

    for name, fname in [("cayley", "cayley"), ("matrix_exp", "matrix_exp_orthogonal"),
                        ("householder", "householder_orthogonal")]:
        x = torch.tensor(_proxy(rng, (4, 4), name), requires_grad=True)
        assert torch.autograd.gradcheck(getattr(nt, fname), (x,))


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("fname", ["cayley", "matrix_exp_orthogonal", "householder_orthogonal", "expm"])
def test_bad_input_is_refused_naming_function_and_argument(fname):
    f = getattr(normref, fname)
    cases = [
        (np.ones(4), ValueError, "at least 2 dimensions"),
        (np.ones((2, 0, 0)), ValueError, "empty"),
        (np.ones((3, 3), dtype=np.int64), TypeError, ""),
        (None, TypeError, "None"),
    ]
    if fname == "expm":  # the three maps take rectangular proxies (torch's convention); exp does not
        cases.append((np.ones((3, 4)), ValueError, "square"))
    for bad, exc, words in cases:
        with pytest.raises(exc) as e:
            f(bad)
        msg = str(e.value)
        assert fname in msg and "a" in msg and words in msg, msg
    if fname == "householder_orthogonal":
        with pytest.raises(ValueError, match="householder_orthogonal: diagonal"):
            f(np.eye(3), diagonal="round")


# --------------------------------------------------------------------------------------------------
# a full-rank orthogonal square weight: OWN and ONI without the row centring


def _polar(v):
    u, _, vt = np.linalg.svd(v)
    return u @ vt


@pytest.mark.parametrize("which", ["own", "oni"])
def test_square_weight_fully_orthogonal_without_centring(which, rng):
    """centering=False: a square V gives W·Wᵀ = WᵀW = I, rank d (the polar factor U·Vᵀ of V); with the
    default centring the same V reaches rank d − 1 only (the rows are orthogonal to 1)."""
    d = 5
    v = rng.standard_normal((d, d)) + 0.3
    kappa = float(np.linalg.cond(v @ v.T))
    if which == "own":
        w = normref.orthogonal_weight_norm(v, group_size=d, centering=False)
    else:
        # trace-normalized Newton–Schulz: λ_min(S/tr S) ≥ 1/(d·κ); 60 steps converge far below ε
        w = normref.oni(v, iterations=60, centering=False)
    # centred, one group of all d rows (OWN refuses it: Vc·Vcᵀ is singular): rank d − 1
    w_c = normref.oni(v, iterations=8)
    # the eigh / Newton solution's error: c·d·κ(V·Vᵀ)·ε (module docstring's c = 64)
    tol = 64 * EPS64 * d * kappa
    assert np.max(np.abs(w @ w.T - np.eye(d))) <= tol
    assert np.max(np.abs(w.T @ w - np.eye(d))) <= tol
    assert np.linalg.matrix_rank(w) == d
    assert np.max(np.abs(w - _polar(v))) <= tol
    sv = np.linalg.svd(w_c, compute_uv=False)
    assert np.linalg.matrix_rank(w_c) == d - 1 and sv[-1] <= tol


@pytest.mark.parametrize("which", ["own", "oni"])
def test_uncentred_gradient_finite_differences_and_bad_flag(which, rng):
    f = {"own": lambda v: normref.orthogonal_weight_norm(v, group_size=4, centering=False),
         "oni": lambda v: normref.oni(v, iterations=6, centering=False)}[which]
    m = normref.orthogonal_weight_norm if which == "own" else normref.oni
    kw = dict(group_size=4) if which == "own" else dict(iterations=6)
    v = rng.standard_normal((4, 4)) + 0.3
    w, pullback = normref.vjp(m, v, centering=False, **kw)
    g = rng.standard_normal(w.shape)
    (gv,) = pullback(g)
    for _ in range(3):  # central differences, h = 1e-6 (see test_finite_differences)
        d = rng.standard_normal(v.shape)
        fd = np.sum((f(v + 1e-6 * d) - f(v - 1e-6 * d)) * g) / 2e-6
        an = np.sum(gv * d)
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an))
    with pytest.raises(TypeError, match=f"{m.__name__}: centering"):
        m(v, centering="no", **kw)


# --------------------------------------------------------------------------------------------------
# rectangular proxies (torch's convention: wide ones transposed, tall ones the first k columns)


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (6, 1), (2, 7, 4), (2, 4, 7)])
def test_rectangular_against_torch(name, shape, rng):
    fn, mp = MAPS[name]
    x = _proxy(rng, shape, name) if shape[-1] <= shape[-2] else np.swapaxes(
        _proxy(rng, shape[:-2] + (shape[-1], shape[-2]), name), -1, -2).copy()
    xt, qt = _torch_map(x, mp)
    q, pullback = normref.vjp(fn, x)
    g = rng.standard_normal(q.shape)
    (gq,) = torch.autograd.grad(qt, xt, torch.tensor(g))
    (dx,) = pullback(g)
    n = max(shape[-2:])
    # the module docstring's bound for the square n × n computation the proxy reduces to
    tol = 64 * n * _kappa(x, name) * EPS64
    assert np.max(np.abs(q - qt.detach().numpy())) <= tol
    assert np.max(np.abs(dx - gq.numpy())) <= tol * max(1.0, float(np.max(np.abs(g))))
    # orthonormal columns (tall) or rows (wide)
    qq = q if shape[-2] >= shape[-1] else np.swapaxes(q, -1, -2)
    k = qq.shape[-1]
    assert np.max(np.abs(np.swapaxes(qq, -1, -2) @ qq - np.eye(k))) <= 64 * n * EPS64


@pytest.mark.parametrize("name", list(MAPS))
def test_rectangular_parametrized_linear_equals_torch(name, rng):
    """torch's own ``parametrizations.orthogonal`` on a Linear(3 → 5) (a tall 5 × 3 weight):
    normref's map of the stored proxy is the layer's weight."""
    torch.manual_seed(0)
    lin = orthogonal(torch.nn.Linear(3, 5, bias=False).double(), orthogonal_map=name, use_trivialization=False)
    proxy = lin.parametrizations.weight.original.detach().numpy()
    fn, _ = MAPS[name]
    assert np.max(np.abs(fn(proxy) - lin.weight.detach().numpy())) <= 64 * 5 * EPS64
