"""Tests of the conformance suite itself (normref.conformance): it must catch planted bugs, check
third-party implementations, round-trip its JSON report and replay a failing case from its seed, and
its quick mode over everything registered must pass (this is the CI run of ``normref conformance``).

Tolerances are the suite's own (normref.conformance.tolerance: a multiple of the dtype's ε times the
case's conditioning); these tests never loosen them. Planted bugs are checked in float64 on a few
libraries to keep the file fast; each bug is orders of magnitude above its tolerance there.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import normref
from normref import registry
from normref._xp import namespace
from normref.registry import Example, Invariant, Residuals, method

import normref.conformance as nc
from normref.conformance import ConformanceError, Report, check, replay, run
from normref.conformance.backends import get_backend
from normref.conformance.cli import main
from normref.conformance.report import FD_COLUMN

FAST = ["numpy", "torch", "array_api_strict"]


def _available(names):
    return [n for n in names if get_backend(n).available]


# --------------------------------------------------------------------------------------------------
# a small registered method (standardization over the last axis) with optional planted bugs


def _moments_invariant(m, xp, out, args, kwargs):
    """Mean 0 and variance σ²/(σ²+ε) over the last axis (float64, from the rounded input)."""
    x = np.asarray(nc.backends.Backend.to_numpy(args[0]), np.float64)
    y = np.asarray(nc.backends.Backend.to_numpy(m.primary(out)), np.float64)
    eps = kwargs.get("eps", 1e-5)
    v = x.var(axis=-1)
    return max(float(np.max(np.abs(y.mean(axis=-1)))), float(np.max(np.abs(y.var(axis=-1) - v / (v + eps)))))


def _make(name: str, bug: str | None):
    def examples(rng):
        yield Example((rng.standard_normal((3, 5)) * 2.0 + 1.0,), {}, label="(3, 5)")
        yield Example((rng.standard_normal((2, 4)),), dict(eps=1e-2), label="(2, 4) eps=1e-2")

    @method(array_params=("x",), name=name, examples=examples,
            invariants=(Invariant("standardized moments", _moments_invariant, scale=64.0),))
    def fake(x, eps: float = 1e-5):
        xp = namespace(name, x=x)
        mu = xp.mean(x, axis=-1, keepdims=True)
        var = xp.mean((x - mu) * (x - mu), axis=-1, keepdims=True)
        if bug == "eps_outside":
            s = 1.0 / (xp.sqrt(var) + eps)  # planted: ε outside the square root
        else:
            s = 1.0 / xp.sqrt(var + eps)
        xh = (x - mu) * s
        return xh, Residuals((xh, s))

    @fake.defbackward
    def _backward(res, g):
        xp = namespace(name + ".backward", g=g)
        xh, s = res.arrays
        mg = xp.mean(g, axis=-1, keepdims=True)
        if bug == "missing_mean":
            mg = 0.0 * mg  # planted: the −mean(g) term dropped
        dx = s * (g - mg - xh * xp.mean(g * xh, axis=-1, keepdims=True))
        if bug == "wrong_sign":
            dx = -dx  # planted: the sign of the backward flipped
        return (dx,)

    return fake


@pytest.fixture
def planted():
    made = []

    def make(bug):
        name = f"_planted_{bug or 'none'}"
        registry.REGISTRY.pop(name, None)
        made.append(name)
        return _make(name, bug)

    yield make
    for n in made:
        registry.REGISTRY.pop(n, None)


def _failing(report, column=None):
    return [r for r in report.failures if column is None or r.column == column]


def test_control_method_passes_everywhere(planted):
    # the honest twin of the planted bugs: same code, no bug, every check on these libraries passes
    m = planted(None)
    rep = run([m.name], _available(FAST), ["float64", "float32"])
    assert rep.ok, rep.summary() + "\n" + "\n".join(r.line() for r in rep.failures)
    checks = {r.check for r in rep.records}
    assert {"forward", "backward", "finite-differences", "cross-library", "invariant: standardized moments"} <= checks
    if get_backend("torch").available:
        assert {"autograd", "second-order"} <= checks


@pytest.mark.parametrize(
    "bug, expected",
    [
        # a flipped backward disagrees with finite differences and with autograd through the forward
        ("wrong_sign", {"finite-differences", "autograd"}),
        # a missing mean term: the gradient no longer sums to zero, FD and autograd see it
        ("missing_mean", {"finite-differences", "autograd"}),
        # ε outside the root: the backward (derived for ε inside) disagrees with FD of the forward,
        # and the variance is σ²/(σ+ε)², not σ²/(σ²+ε)
        ("eps_outside", {"finite-differences", "autograd", "invariant: standardized moments"}),
    ],
)
def test_planted_bug_fails_its_row(planted, bug, expected):
    m = planted(bug)
    backends = _available(["numpy", "torch"])
    rep = run([m.name], backends, ["float64"])
    assert not rep.ok
    failed = {r.check for r in rep.failures}
    if not get_backend("torch").available:
        expected = expected - {"autograd"}
    assert expected <= failed, (failed, rep.summary())
    # the row is marked failed in the table and the exit status says so
    cells = rep.cells()
    assert not cells[(m.name, FD_COLUMN)][0]
    text = str(rep)
    assert m.name in text and "✗" in text
    assert main(["conformance", "--method", m.name, "--backend", ",".join(backends), "--dtype", "float64",
                 "--no-progress"]) == 1


def test_planted_bug_in_a_real_operation_fails_group_norm(monkeypatch):
    from normref import operation

    good = operation.Standardizing.backward
    rep = run(["group_norm"], ["numpy"], ["float64"], quick=True)
    assert rep.ok, rep.summary()

    def wrong_sign(self, xp, res, axes, g):
        return -good(self, xp, res, axes, g)

    monkeypatch.setattr(operation.Standardizing, "backward", wrong_sign)
    rep = run(["group_norm"], ["numpy"], ["float64"], quick=True)
    assert "finite-differences" in {r.check for r in rep.failures}
    monkeypatch.undo()

    def eps_outside(self, xp, x, axes):
        mu, var = operation.moments(xp, x, axes)
        rstd = 1.0 / (xp.sqrt(var) + self.eps)
        xhat = (x - mu) * rstd
        return xhat, (xhat, rstd), {"mean": mu, "var": var}

    monkeypatch.setattr(operation.Standardizing, "forward", eps_outside)
    # on the pure array-API path the invariant and the finite differences catch it
    rep = run(["group_norm"], ["numpy-reference"], ["float64"])
    failed = {r.check for r in rep.failures}
    assert "finite-differences" in failed and any(c.startswith("invariant") for c in failed), failed
    # with the numba kernels on, whichever path group_norm takes, its row fails too: through the
    # invariant when the kernels run the patched forward, through the comparison with the reference
    # (the pure array-API path, patched) when they do not
    rep = run(["group_norm"], ["numpy"], ["float64"])
    assert any(r.backend == "numpy" for r in rep.failures)


def test_tolerances_are_derived_and_printed():
    rep = run(["layer_norm"], ["numpy"], ["float64", "float32"], quick=True)
    for r in rep.records:
        assert r.tol > 0 and r.formula
        if r.check in ("forward", "backward"):
            eps = np.finfo(r.dtype).eps
            # 32·cond·ε with cond ≥ 1: never below the dtype's own rounding floor
            assert r.tol == pytest.approx(32 * r.cond * eps) and r.cond >= 1.0
            assert f"ε({r.dtype})" in r.formula
    text = str(rep)
    assert "tolerances" in text and "32·cond·ε" in text


def test_a_method_without_examples_is_untested(planted):
    m = planted(None)
    m.examples = None
    rep = run([m.name], ["numpy"], ["float64"])
    assert not rep.ok and rep.untested == [m.name]
    with pytest.raises(ConformanceError):
        rep.raise_for_failures()


# --------------------------------------------------------------------------------------------------
# third-party implementations


def test_check_torch_group_norm_passes():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rep = check(F.group_norm, like="group_norm")
    assert rep.ok and rep.columns == ["torch"]
    checks = {r.check for r in rep.records}
    assert checks == {"forward", "backward (autograd)"}
    assert {r.dtype for r in rep.records} == {"float64", "float32"}
    assert "group_norm" in str(rep)


def test_check_catches_a_wrong_implementation():
    torch = pytest.importorskip("torch")

    def unbiased_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        # a classic bug: the unbiased (n − 1) variance instead of the biased one
        n, c = input.shape[:2]
        x = input.reshape(n, num_groups, -1)
        y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=True, keepdim=True) + eps)
        y = y.reshape(input.shape)
        shape = (1, c) + (1,) * (input.ndim - 2)
        if weight is not None:
            y = y * weight.reshape(shape)
        if bias is not None:
            y = y + bias.reshape(shape)
        return y

    with pytest.raises(ConformanceError) as info:
        check(unbiased_group_norm, like="group_norm", backend="torch", quick=True)
    assert isinstance(info.value, AssertionError)
    rep = info.value.report
    assert {r.check for r in rep.failures} >= {"forward"}
    rep2 = check(unbiased_group_norm, like="group_norm", backend="torch", quick=True, raise_on_failure=False)
    assert not rep2.ok


def test_check_with_an_explicit_backward_numpy():
    def my_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        k = len(normalized_shape) if isinstance(normalized_shape, tuple) else 1
        ax = tuple(range(x.ndim - k, x.ndim))
        y = (x - x.mean(axis=ax, keepdims=True)) / np.sqrt(x.var(axis=ax, keepdims=True) + eps)
        return y * (1 if weight is None else weight) + (0 if bias is None else bias)

    def backward(g, x, normalized_shape, weight=None, bias=None, eps=1e-5, sign=1.0):
        k = len(normalized_shape) if isinstance(normalized_shape, tuple) else 1
        ax = tuple(range(x.ndim - k, x.ndim))
        s = 1 / np.sqrt(x.var(axis=ax, keepdims=True) + eps)
        xh = (x - x.mean(axis=ax, keepdims=True)) * s
        gh = g * (1 if weight is None else weight)
        dx = s * (gh - gh.mean(axis=ax, keepdims=True) - xh * (gh * xh).mean(axis=ax, keepdims=True))
        lead = tuple(range(x.ndim - k))
        dw = None if weight is None else (g * xh).sum(axis=lead)
        db = None if bias is None else g.sum(axis=lead)
        return sign * dx, dw, db

    rep = check(my_norm, like="layer_norm", backward=backward)
    assert rep.ok and rep.columns == ["numpy"]
    assert "backward" in {r.check for r in rep.records}
    with pytest.raises(ConformanceError):
        check(my_norm, like="layer_norm", backward=lambda *a, **k: backward(*a, sign=-1.0, **k))


# --------------------------------------------------------------------------------------------------
# JSON and replay


def test_json_round_trip_and_replay_of_a_failing_case(planted, tmp_path):
    m = planted("wrong_sign")
    path = tmp_path / "report.json"
    backends = _available(["numpy", "torch"])
    rc = main(["conformance", "--method", m.name, "--backend", ",".join(backends), "--dtype", "float64",
               "--seed", "7", "--json", str(path), "--no-progress"])
    assert rc == 1
    raw = json.loads(path.read_text())
    assert raw["ok"] is False and raw["meta"]["seed"] == 7
    rep = Report.from_json(path)
    assert rep.to_dict()["records"] == raw["records"]
    assert Report.from_json(rep.to_json()).to_dict() == rep.to_dict()
    fails = rep.failures
    assert fails and all(r.seed == 7 for r in rep.records)
    fd = next(r for r in fails if r.check == "finite-differences")
    again = replay(raw["records"][rep.records.index(fd)])  # from the JSON dict itself
    assert again.status == "fail" and again.error == pytest.approx(fd.error, rel=1e-12)
    # the inputs of the case are rebuilt from the seed and example index alone
    args, kwargs, ex = nc.case_inputs(m.name, fd.seed, fd.example)
    assert ex.label == fd.label
    passing = next(r for r in rep.records if r.passed and r.check == "forward")
    assert replay(passing).passed


# --------------------------------------------------------------------------------------------------
# the command


def test_cli_lists_skipped_libraries_and_usage_errors(capsys):
    assert main(["conformance", "--method", "pixel_norm", "--backend", "numpy,cupy,torch-cuda",
                 "--dtype", "float64", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for b in ("cupy", "torch-cuda"):
        if not get_backend(b).available:
            assert b in out and get_backend(b).reason.split(" (")[0] in out
    assert "checks:" in out and "passed" in out
    assert main(["conformance", "--method", "no_such_method"]) == 2
    assert main(["conformance", "--backend", "no_such_library"]) == 2
    assert main(["conformance", "--dtype", "float8"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["conformance", "--help"]) == 0


def test_bench_dispatch(capsys):
    try:
        import normref.conformance.bench  # noqa: F401
    except ImportError:
        assert main(["bench"]) == 2
        assert "not installed" in capsys.readouterr().err
    else:
        assert main(["bench", "--help"]) == 0  # dispatched to normref.conformance.bench.main
        assert "normref bench" in capsys.readouterr().out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "normref.conformance", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout


def test_quick_run_of_everything_registered():
    # CI's run of `normref conformance --quick`: every registered method on every installed library
    rep = run(quick=True)
    assert set(rep.methods) == {m.name for m in normref.methods()}
    assert rep.ok, rep.summary() + "\n" + "\n".join(r.line() for r in rep.failures[:30])
