"""``normref.backends.torch.StiefelAdam``: Cayley ADAM (Li et al. ICLR 2020, Algorithm 2) over
normref's pure ``cayley_adam_step``, torch's Adam on the other groups."""

from __future__ import annotations

import numpy as np
import pytest

from normref.stiefel import cayley_adam_step

from .test_stiefel import C_ORTH, EPS64, K, N, _orth_err, _problem

torch = pytest.importorskip("torch")
from normref.backends import torch as nt  # noqa: E402


def test_plain_groups_equal_torch_adam():
    """A group without stiefel=True runs torch.optim.Adam's update: the same iterates, step by step."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 5, dtype=torch.float64)
    target = torch.randn(4, 5, dtype=torch.float64)
    p1, p2 = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    ours = nt.StiefelAdam([p1], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    theirs = torch.optim.Adam([p2], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(20):
        for p, opt in ((p1, ours), (p2, theirs)):
            opt.zero_grad()
            ((p - target) ** 4).sum().backward()
            opt.step()
    # the same float64 operations in the same order up to torch's fused lerp/addcdiv: a few ε per step
    assert float((p1 - p2).abs().max()) <= 20 * 16 * EPS64 * float(p2.abs().max())


def test_stiefel_group_is_the_pure_step_and_converges():
    a, target, w0 = _problem()
    at = torch.tensor(a)
    # a (3, 10) weight with orthonormal rows: the optimizer steps its transpose, a point of St(10, 3)
    wp = torch.nn.Parameter(torch.tensor(w0.T.copy()))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    # lr 0.2, as tests/test_stiefel.py's pure ADAM run (1e-9 relative by step 427 there)
    opt = nt.StiefelAdam([{"params": [wp], "stiefel": True}, {"params": [b]}], lr=0.2)
    # step 1 equals the pure function on the transpose (the gradient of −tr(WAWᵀ) is −2WA)
    (-torch.trace(wp @ at @ wp.T) + (b ** 2).sum()).backward()
    opt.step()
    ref, state = cayley_adam_step(w0, -2.0 * a @ w0, 0.2, None, (0.9, 0.99))
    assert np.max(np.abs(wp.detach().numpy().T - ref)) <= 100 * EPS64
    for i in range(600):
        opt.zero_grad()
        (-torch.trace(wp @ at @ wp.T) + (b ** 2).sum()).backward()
        opt.step()
        if i == 99:  # the exact Cayley step stays on the manifold to rounding
            assert _orth_err(wp.detach().numpy().T) <= C_ORTH * N * EPS64
    w = wp.detach().numpy()
    # Ky Fan: the maximum of tr(WAWᵀ) over orthonormal rows is the sum of the top-K eigenvalues
    assert abs(np.trace(w @ a @ w.T) - target) <= 1e-8 * abs(target)
    assert _orth_err(w.T) <= C_ORTH * N * EPS64
    assert K == w.shape[0]
    assert opt.state[wp]["step"] == 601


@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_state_dict_round_trip(which):
    """state_dict → a new optimizer → load_state_dict: the next step is the same iterate."""
    a, _, w0 = _problem()
    at = torch.tensor(a)

    def make(p):
        if which == "sgd":
            return nt.StiefelSGD([p], lr=0.05, stiefel=True)
        return nt.StiefelAdam([p], lr=0.2, stiefel=True)

    def step(p, opt):
        opt.zero_grad()
        (-torch.trace(p @ at @ p.T)).backward()
        opt.step()

    p1 = torch.nn.Parameter(torch.tensor(w0.T.copy()))
    o1 = make(p1)
    for _ in range(3):
        step(p1, o1)
    p2 = torch.nn.Parameter(p1.detach().clone())
    o2 = make(p2)
    o2.load_state_dict(o1.state_dict())
    step(p1, o1)
    step(p2, o2)
    assert torch.equal(p1, p2)


def test_bad_arguments_are_named():
    p = torch.nn.Parameter(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cayley_adam_step: betas"):
        nt.StiefelAdam([p], lr=0.1, betas=(0.9, 1.0), stiefel=True)
    with pytest.raises(ValueError, match="cayley_adam_step: lr"):
        nt.StiefelAdam([p], lr=0.0, stiefel=True)
    with pytest.raises(TypeError, match="StiefelAdam: stiefel must be a bool"):
        nt.StiefelAdam([p], lr=0.1, stiefel=1)
    with pytest.raises(ValueError, match="StiefelAdam: a Stiefel parameter"):
        nt.StiefelAdam([torch.nn.Parameter(torch.zeros(3))], lr=0.1, stiefel=True)
