"""DeCov (Cogswell et al., ICLR 2016): normref.decov_penalty against the paper's definition, written
here term by term, and against torch autograd of that definition (an independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest

import normref

EPS64 = np.finfo(np.float64).eps


def _paper_decov(h: np.ndarray) -> float:
    """Cogswell et al., Eqn 1-2 with explicit loops: C_ij = 1/N Σ_n (h_i^n − μ_i)(h_j^n − μ_j),
    L = ½ Σ_{i≠j} C_ij² (the ‖C‖²_F − ‖diag C‖² form)."""
    n, d = h.shape
    mu = [sum(h[k, i] for k in range(n)) / n for i in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                cij = sum((h[k, i] - mu[i]) * (h[k, j] - mu[j]) for k in range(n)) / n
                total += cij * cij
    return 0.5 * total


@pytest.mark.parametrize("shape", [(7, 3), (4, 5), (3, 3, 2, 2)])
def test_forward_equals_the_paper(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    x = x + 0.5 * np.roll(x, 1, axis=1)
    val = float(normref.decov_penalty(x))
    rows = np.moveaxis(x, 1, -1).reshape(-1, shape[1]) if x.ndim > 2 else x
    ref = _paper_decov(rows)
    # a sum of d² products of centred sums of M terms: rounding ~ M·d²·ε relative (here ≤ 16·25)
    assert abs(val - ref) <= 512 * EPS64 * abs(ref)


@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 5)])
def test_gradient_against_torch_autograd_of_the_definition(shape):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    x = x + 0.6 * np.roll(x, 1, axis=1)
    out, pullback = normref.vjp(normref.decov_penalty, x)
    (dx,) = pullback(np.asarray(2.5))

    t = torch.tensor(x, requires_grad=True)
    h = torch.movedim(t, 1, -1).reshape(-1, shape[1]) if t.ndim > 2 else t
    hc = h - h.mean(dim=0)
    c = hc.T @ hc / h.shape[0]
    loss = 0.5 * ((c * c).sum() - (torch.diagonal(c) ** 2).sum())
    (g,) = torch.autograd.grad(2.5 * loss, t)
    g = g.numpy()
    loss = float(loss.detach())
    assert abs(float(out) - loss) <= 64 * EPS64 * abs(loss)
    # both sides are sums of O(M·d) products of O(1) terms: 64·M·d ε of the gradient's scale
    m, d = np.prod(shape) // shape[1], shape[1]
    assert np.max(np.abs(dx - g)) <= 64 * m * d * EPS64 * np.max(np.abs(g))


def test_finite_differences_random_directions():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 4))
    x = x + 0.8 * np.roll(x, 1, axis=1)
    _, pullback = normref.vjp(normref.decov_penalty, x)
    (dx,) = pullback(np.asarray(1.0))
    h = 1e-5
    for _ in range(5):
        v = rng.standard_normal(x.shape)
        fd = (float(normref.decov_penalty(x + h * v)) - float(normref.decov_penalty(x - h * v))) / (2 * h)
        # central differences: O(h²·|f'''|) truncation plus O(ε/h) rounding, both ≪ 1e-6 here
        assert abs(fd - float(np.sum(dx * v))) <= 1e-6 * max(1.0, abs(fd))


def test_zero_and_zero_gradient_at_uncorrelated_features():
    # columns of an orthogonal matrix with zero mean: uncorrelated by construction
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 3))
    a -= a.mean(axis=0)
    q, _ = np.linalg.qr(a)
    q -= q.mean(axis=0)  # QR of centred columns keeps them centred up to rounding
    out, pullback = normref.vjp(normref.decov_penalty, q)
    (dx,) = pullback(np.asarray(1.0))
    assert abs(float(out)) <= 64 * EPS64
    assert np.max(np.abs(dx)) <= 64 * EPS64


def test_gradient_descent_decorrelates():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 4))
    x[:, 1] += 0.9 * x[:, 0]
    start = float(normref.decov_penalty(x))
    for _ in range(200):
        _, pullback = normref.vjp(normref.decov_penalty, x)
        (dx,) = pullback(np.asarray(1.0))
        x = x - 5.0 * dx
    assert float(normref.decov_penalty(x)) < 1e-6 * start


def test_bad_input():
    with pytest.raises(TypeError, match="decov_penalty: input"):
        normref.decov_penalty(None)
    with pytest.raises(ValueError, match="decov_penalty: input"):
        normref.decov_penalty(np.ones(4))
    with pytest.raises(ValueError, match="decov_penalty: input must have at least 1 feature"):
        normref.decov_penalty(np.ones((5, 0)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        normref.decov_penalty(np.ones((1, 4)))


def test_adapters_are_generated():
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = nt.decov_penalty(x)
    y.backward()
    _, pullback = normref.vjp(normref.decov_penalty, x.detach().numpy())
    (dx,) = pullback(np.asarray(1.0))
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=0, atol=64 * 18 * EPS64 * np.max(np.abs(dx)))
