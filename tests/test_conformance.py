"""Tests of the conformance suite itself (normref.conformance): it must catch planted bugs, check
third-party implementations, round-trip its JSON report and replay a failing case from its seed, and
its quick mode over everything registered must pass (this is the CI run of ``normref conformance``).

Tolerances are the suite's own (normref.conformance.tolerance: a multiple of the dtype's ε times the
case's conditioning); these tests never loosen them. Planted bugs are checked in float64 on a few
libraries to keep the file fast; each bug is orders of magnitude above its tolerance there.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def _make(name: str, bug: str | None, cond: float = 1.0):
    def examples(rng):
        yield Example((rng.standard_normal((3, 5)) * 2.0 + 1.0,), {}, label="(3, 5)", cond=cond)
        yield Example((rng.standard_normal((2, 4)),), dict(eps=1e-2), label="(2, 4) eps=1e-2", cond=cond)

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
        if bug == "detached":
            # planted: the residuals cut from torch's graph; the values (first order) are unchanged,
            # but autograd differentiating this backward misses ∂x̂/∂x and ∂s/∂x (second order)
            xh, s = (a.detach() if hasattr(a, "detach") else a for a in (xh, s))
        mg = xp.mean(g, axis=-1, keepdims=True)
        if bug == "missing_mean":
            mg = 0.0 * mg  # planted: the −mean(g) term dropped
        dx = s * (g - mg - xh * xp.mean(g * xh, axis=-1, keepdims=True))
        if bug == "wrong_sign":
            dx = -dx  # planted: the sign of the backward flipped
        if bug == "scaled":
            dx = dx * (1.0 + 1e-4)  # planted: a gradient 1e-4 too large (a slightly wrong constant)
        return (dx,)

    return fake


@pytest.fixture
def planted():
    made = []

    def make(bug, cond=1.0):
        name = f"_planted_{bug or 'none'}"
        registry.REGISTRY.pop(name, None)
        made.append(name)
        return _make(name, bug, cond)

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


def test_second_order_bug_fails_only_the_second_order_row(planted):
    # residuals detached from torch's graph: the backward is right to first order, so the values, the
    # finite differences and autograd through the forward all pass; only autograd differentiating the
    # backward (the Hessian-vector check, against central differences of the NumPy backward) sees it
    pytest.importorskip("torch")
    m = planted("detached")
    rep = run([m.name], ["numpy", "torch"], ["float64"])
    assert {(r.backend, r.check) for r in rep.failures} == {("torch", "second-order")}, rep.summary()
    assert {r.example for r in rep.failures} == {0, 1}
    # a missing second-order term is an O(1) relative error, far above the 2^12·κ·ε^(2/3) bound
    assert all(r.ratio > 1e3 for r in rep.failures), [r.line() for r in rep.failures]
    cells = rep.cells()
    assert cells[(m.name, FD_COLUMN)][0] and cells[(m.name, "numpy")][0] and not cells[(m.name, "torch")][0]


def test_registry_cond_cannot_loosen_the_derivative_checks(planted):
    # a gradient 1e-4 too large in examples whose registry entry claims cond = 1e6: with that constant
    # the finite-difference bound 2^12·cond·ε^(2/3) would be 0.15 and pass it; the bound uses the
    # measured κ instead (≈ 1–10 for standardizing well-spread values) and fails it
    m = planted("scaled", cond=1e6)
    rep = run([m.name], ["numpy"], ["float64"])
    fd = [r for r in rep.records if r.check == "finite-differences"]
    assert len(fd) == 2 and all(r.status == "fail" for r in fd), [r.line() for r in fd]
    assert all(r.cond < 100 and "measured" in r.formula and "registry" not in r.formula for r in fd)
    assert all(r.error > 10 * r.tol for r in fd)


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


# --------------------------------------------------------------------------------------------------
# the numpy column runs the numba kernels (issue 11, §4): every registry example is below the kernels'
# default size threshold, so the suite lowers it for that column and counts the calls that took a kernel

numba_missing = pytest.mark.skipif(get_backend("numpy").kernel_thresholds is None,
                                   reason=f"the numpy column has no kernels here: {get_backend('numpy').path}")


@numba_missing
def test_numpy_column_takes_the_kernel_path_and_the_report_says_so(tmp_path):
    rep = run(["batch_norm", "layer_norm", "rms_norm"], ["numpy", "numpy-reference"], ["float64", "float32"],
              quick=True)
    assert rep.ok, rep.summary()
    p, ref = rep.paths["numpy"], rep.paths["numpy-reference"]
    assert "numba kernels" in p["path"] and "threshold 1" in p["path"] and p["thresholds"]["min_size"] == 1
    assert "array-API formulas" in ref["path"] and ref["kernels"] is False
    assert {"numpy.normalize_forward", "numpy.normalize_backward"} <= set(p["claims"])
    # the kernels did the work in the numpy column (each of the three methods, both dtypes), none in
    # the reference column
    for dt in ("float64", "float32"):
        assert sum(p["by_dtype"][dt]["taken"].values()) > 0
    assert all(p["by_method"][m] > 0 for m in ("batch_norm", "layer_norm", "rms_norm")), p["by_method"]
    assert p["taken"]["numpy.normalize_forward"] > 0 and p["taken"]["numpy.normalize_backward"] > 0
    assert sum(ref["taken"].values()) == 0 and sum(ref["asked"].values()) == 0
    # printed: text (rich and plain) and JSON (the CLI's --json)
    text = str(rep)
    assert "paths:" in text and "numpy: numba kernels (size threshold 1" in text
    assert "numpy-reference: array-API formulas" in text and "kernel lookups took a kernel" in text
    assert "paths:" in rep.plain_text()
    path = tmp_path / "r.json"
    assert main(["conformance", "--quick", "-m", "layer_norm", "-b", "numpy,numpy-reference", "-d", "float64",
                 "--json", str(path), "--no-progress"]) == 0
    raw = json.loads(path.read_text())
    assert raw["meta"]["paths"]["numpy"]["taken"]["numpy.normalize_forward"] > 0
    assert Report.from_json(path).path_lines() == Report.from_dict(raw).path_lines()


def _perturbed(fn, which):
    """The registered kernel ``fn`` with a planted bug: its mean off by 1e-9·(|μ| + σ)."""
    import functools

    @functools.wraps(fn)
    def bad(*args, **kwargs):
        r = fn(*args, **kwargs)
        if r is None:
            return r
        if which == "moments":
            mu, var = r
            return mu + 1e-9 * (np.abs(mu) + np.sqrt(var)), var
        # normalize_forward: (y, μ, scale, σ²); y = (x − μ)·scale·γ + β with μ off by δ is y − δ·scale·γ;
        # perturbing y by 1e-9 of its scale is the same size of bug
        y, mu, scale, var = r
        return (y + 1e-9 * float(np.max(np.abs(y))),) + tuple(r[1:])

    return bad


@numba_missing
@pytest.mark.parametrize("primitive, method_name", [("moments", "batch_renorm"), ("normalize_forward", "layer_norm")])
def test_planted_kernel_bug_fails_the_numpy_column_and_not_the_reference(monkeypatch, primitive, method_name):
    from normref import _kernels

    _kernels.lookup(np, primitive)  # the numpy kernels registered
    key = ("numpy", primitive)
    monkeypatch.setitem(_kernels._KERNELS, key, _perturbed(_kernels._KERNELS[key], primitive))
    rep = run([method_name], ["numpy", "numpy-reference"], ["float64"], quick=True)
    assert rep.paths["numpy"]["taken"].get(f"numpy.{primitive}", 0) > 0
    bad = {(r.column, r.check) for r in rep.failures}
    # the numpy column's own comparison with the float64 formulas fails...
    assert ("numpy", "forward") in bad, rep.summary()
    # ...while the reference column (the formulas) and the finite differences pass; the cross-library
    # check between the two columns fails for both (it compares them)
    assert all(col != "numpy-reference" or chk == "cross-library" for col, chk in bad), bad
    assert not any(col == FD_COLUMN for col, _ in bad)
    assert any(r.column == "numpy-reference" and r.check == "forward" and r.passed for r in rep.records)
    monkeypatch.undo()
    assert run([method_name], ["numpy", "numpy-reference"], ["float64"], quick=True).ok


@numba_missing
def test_a_column_claiming_kernels_that_took_none_fails(monkeypatch):
    # the numpy column with the default threshold again: every registry example is below it, so no
    # kernel runs and "numpy" would silently be "numpy-reference" a second time; the suite says so
    b = get_backend("numpy")
    monkeypatch.setattr(b, "kernel_thresholds", {"min_size": 4096, "serial_below": 1 << 16})
    rep = run(["layer_norm"], ["numpy"], ["float64"], quick=True)
    assert not rep.failures and not rep.ok
    assert rep.path_problems and "numpy float64: claims kernels" in rep.path_problems[0]
    assert "off their path" in rep.summary() and "path:" in str(rep)
    with pytest.raises(ConformanceError, match="none of its .* kernel lookups took one"):
        rep.raise_for_failures()
    # float16 is not a kernel dtype: no kernel there is no problem
    assert run(["layer_norm"], ["numpy"], ["float16"], quick=True).ok


@numba_missing
def test_a_reference_column_in_which_a_kernel_ran_fails(monkeypatch):
    from normref import _kernels

    monkeypatch.setattr(_kernels, "_enabled", lambda: True)  # planted: use_kernels(False) ignored
    b = get_backend("numpy-reference")
    monkeypatch.setattr(b, "kernel_thresholds", None)
    from normref.backends.numba import config

    monkeypatch.setattr(config, "MIN_SIZE", 1)
    rep = run(["layer_norm"], ["numpy-reference"], ["float64"], quick=True)
    assert any(p.startswith("numpy-reference: claims the array-API formulas, but") for p in rep.path_problems)
    assert not rep.ok


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
    # outputs and autograd gradients alike are one computation in the dtype against normref's float64
    # evaluation of the same rounded inputs (the suite's forward/backward rows): 32·cond·ε, not 2·32·cond·ε
    for r in rep.records:
        assert r.tol == pytest.approx(32 * r.cond * np.finfo(r.dtype).eps) and r.formula.startswith("32·cond")


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
    assert len({r.example for r in rep2.records}) == 1  # quick: the example passing the most arrays


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
    # every library by default: the missing ones are listed (with the reason), the run passes
    assert main(["conformance", "--method", "pixel_norm", "--dtype", "float64", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for b in ("cupy", "torch-cuda"):
        if not get_backend(b).available:
            assert b in out and get_backend(b).reason.split(" (")[0] in out
    assert "checks:" in out and "passed" in out
    # a library asked for by name that is not available: a usage error with the reason, no silent empty run
    for b in ("cupy", "torch-cuda"):
        if not get_backend(b).available:
            assert main(["conformance", "--method", "pixel_norm", "--backend", f"numpy,{b}", "--quick",
                         "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert f"--backend {b} is not available here" in err and get_backend(b).reason.split(" (")[0] in err
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


SUMMARY = re.compile(r"normref conformance: (\d+) methods × (\d+) libraries \(([^)]*)\), (\d+) checks: "
                     r"(\d+) passed, (\d+) failed")


def _console_runs(tmp_path):
    """The installed console script and ``python -m normref.conformance``, as argv prefixes."""
    script = shutil.which("normref")
    runs = [("python -m", [sys.executable, "-m", "normref.conformance", "conformance"])]
    if script is not None:
        runs.append(("console script", [script, "conformance"]))
    return runs, script


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_command_quick_mode_in_a_subprocess(how, tmp_path):
    # what CI runs: the installed command, its exit status, its summary line and its JSON report
    runs, script = _console_runs(tmp_path)
    if how == "console script" and script is None:
        pytest.skip("the normref console script is not on PATH (pip install -e . installs it)")
    argv = dict(runs)[how]
    path = tmp_path / "report.json"
    r = subprocess.run(argv + ["--quick", "--method", "group_norm,pixel_norm", "--json", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = SUMMARY.search(r.stdout)
    assert m, r.stdout[-3000:]
    n_methods, n_libs, libs, n, passed, failed = m.groups()
    assert (n_methods, failed) == ("2", "0") and n == passed
    raw = json.loads(path.read_text())
    assert raw["ok"] is True and raw["meta"]["quick"] is True and raw["methods"] == ["group_norm", "pixel_norm"]
    assert len(raw["records"]) == int(n) and raw["summary"].startswith(m.group(0))
    assert [lib.strip() for lib in libs.split(",")] == [c for c in raw["columns"] if c != FD_COLUMN]
    assert re.search(r"^method +diff +numpy ", r.stdout, re.M) and "─" * 20 in r.stdout  # rich's compact table
    flat = " ".join(r.stdout.split())
    for b, why in raw["skipped"]:  # a library not installed: named with its reason
        assert f"{b}: {' '.join(why.split())}" in flat


PLANTED_CLI = """
import sys
from normref.conformance.cli import main
from tests.test_conformance import _make
_make("_planted_cli", "wrong_sign")
sys.exit(main(sys.argv[1:]))
"""


def test_command_exits_nonzero_on_a_planted_bug_in_a_subprocess(tmp_path):
    path = tmp_path / "bad.json"
    r = subprocess.run([sys.executable, "-c", PLANTED_CLI, "conformance", "--quick", "--method", "_planted_cli",
                        "--backend", "numpy", "--json", str(path)],
                       capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).parent.parent))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    m = SUMMARY.search(r.stdout)
    assert m and int(m.group(6)) > 0, r.stdout[-3000:]
    raw = json.loads(path.read_text())
    assert raw["ok"] is False and any(not x["passed"] and x["check"] == "finite-differences" for x in raw["records"])


def test_filters_and_seed(tmp_path):
    path = tmp_path / "f.json"
    libs = _available(["numpy", "array_api_strict"])
    assert main(["conformance", "--quick", "--method", "pixel_norm", "-m", "rms_norm", "--backend", ",".join(libs),
                 "--dtype", "float32", "--seed", "3", "--json", str(path), "--no-progress"]) == 0
    rep = Report.from_json(path)
    assert rep.methods == ["pixel_norm", "rms_norm"] and {r.method for r in rep.records} == set(rep.methods)
    assert {r.backend for r in rep.records} == set(libs) and rep.columns == libs  # no float64: no FD column
    assert {r.dtype for r in rep.records} == {"float32"} and {r.seed for r in rep.records} == {3}
    # the seed draws other inputs, and a record replays from it exactly
    a3, _, _ = nc.case_inputs("pixel_norm", 3, 0)
    a0, _, _ = nc.case_inputs("pixel_norm", 0, 0)
    assert a3[0].shape == a0[0].shape and not np.array_equal(a3[0], a0[0])
    r = next(r for r in rep.records if r.check == "backward")
    assert replay(r).error == pytest.approx(r.error, rel=1e-12, abs=1e-300)


def test_a_library_not_installed_is_listed_as_skipped(monkeypatch, capsys):
    from normref.conformance import backends

    why = "jax is not installed (No module named 'jax')"
    monkeypatch.setitem(backends._CACHE, "jax", backends.Backend("jax", False, why))
    rep = run(["pixel_norm"], dtypes=["float64"], quick=True)
    assert ("jax", why) in rep.skipped and "jax" not in rep.columns
    assert not any(r.backend == "jax" for r in rep.records)
    text = str(rep)
    table = text.split("tolerances")[0]
    # listed right below the table, and no column of "skipped" in it
    assert f"skipped: jax: {why}" in table and "skipped" not in table.split("skipped: jax")[0]
    assert "jax (" + why in rep.summary()
    assert main(["conformance", "--method", "pixel_norm", "--dtype", "float64", "--quick", "--no-progress"]) == 0
    assert why in capsys.readouterr().out


def test_progress_display_and_plain_fallback(monkeypatch, capsys):
    # with rich: the progress bar (on stderr) and the table; without rich: lines, and a hint
    assert main(["conformance", "--method", "pixel_norm", "--backend", "numpy", "--quick"]) == 0
    out, err = capsys.readouterr()
    assert "pixel_norm" in out and SUMMARY.search(out)
    rep = run(["pixel_norm"], ["numpy"], ["float64"], quick=True)
    from rich.table import Table

    assert any(isinstance(r, Table) for r in rep._rich_renderables())
    for mod in ("rich", "rich.console", "rich.table", "rich.text", "rich.progress"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if rich were not installed
    text = str(rep)
    assert "install rich" in text and SUMMARY.search(text) and "pixel_norm: finite-diff ✓" in text
    assert main(["conformance", "--method", "pixel_norm", "--backend", "numpy", "--quick"]) == 0
    assert "install rich" in capsys.readouterr().out


def test_quick_run_of_everything_registered():
    # CI's run of `normref conformance --quick`: every registered method on every installed library
    rep = run(quick=True)
    assert set(rep.methods) == {m.name for m in normref.methods()}
    assert rep.ok, rep.summary() + "\n" + "\n".join(r.line() for r in rep.failures[:30])
    # quick mode checks every invariant that applies to any of the method's examples (it adds examples
    # to the one passing the most arrays until they are covered), and names the methods left without
    from normref.conformance.suite import all_examples, applicable_invariants

    for m in normref.methods():
        want = set().union(*[applicable_invariants(m, e) for e in all_examples(m, 0)])
        got = {r.check.split(": ", 1)[1] for r in rep.records if r.method == m.name and r.check.startswith("invariant: ")}
        assert got == want, m.name
        assert (m.name in rep.without_invariants) == (not want), m.name
    assert "no invariant checked" in str(rep) or not rep.without_invariants


def test_quick_examples_cover_the_invariants():
    from normref.conformance.suite import _select, all_examples, applicable_invariants

    m = normref.registry.get("group_norm")
    exs = all_examples(m, 0)
    first = _select(m, exs, True, invariants=False)
    both = _select(m, exs, True)
    assert len(first) == 1 and set(first) < set(both)
    # the example passing the most arrays (weight and bias) has an affine recovery, so the moments of
    # the standardized output do not apply to it; the added example is one they apply to
    moments = "standardizing moments over the partition"
    assert moments not in applicable_invariants(m, exs[first[0]])
    assert any(moments in applicable_invariants(m, exs[i]) for i in both)
    assert len(_select(m, exs, False)) == len(exs)


def _readme_section(title: str) -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_readme_check_example_runs_and_prints_what_it_shows(capsys):
    # the README's "Checking your own implementation": its code runs, and every output line it shows
    # (numbers aside: errors and timings vary with the machine) is a line the code prints
    pytest.importorskip("torch")
    sec = _readme_section("Checking your own implementation")
    blocks = re.findall(r"```(\w*)\n(.*?)```", sec, flags=re.S)
    code = next(b for lang, b in blocks if lang == "python")
    shown = next(b for lang, b in blocks if lang == "")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out

    def mask(line):  # numbers to #, and the table's padding (it widens with the numbers) collapsed
        line = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", line)
        return " ".join(re.sub(r"([━─])[━─]*", r"\1", line).split())

    lines = {mask(x) for x in printed.splitlines()}
    for line in shown.splitlines():
        if line.strip() and line.strip() != "...":
            assert mask(line) in lines, line
    assert "--json" in sec and "replay" in sec
