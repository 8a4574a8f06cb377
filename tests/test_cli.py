"""The ``normref`` command line: --version, python -m normref, help texts, a closed pipe, a library
named but missing, the table's width, JUnit XML, and ``normref bench`` without its optional libraries.

The commands run in subprocesses (with timeouts) from the repository root, as a user would run them;
the benchmark runs in-process (``--smoke``: tiny shapes, a few repetitions) to stay fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import normref
from normref.conformance.backends import get_backend

ROOT = Path(__file__).resolve().parents[1]
ISSUE_REF = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    env["COLUMNS"] = "200"  # argparse and rich would wrap at the terminal's width otherwise
    return env


def _normref(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normref", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_env(), **kw)


def test_version_is_the_package_version():
    r = _normref("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"normref {normref.__version__}"
    from importlib import metadata

    # the one source of the version: the installed metadata is read from normref.__version__
    assert metadata.version("normref") == normref.__version__


def test_python_dash_m_normref_and_the_console_script_entry_point():
    r = _normref("--help")
    assert r.returncode == 0 and "conformance" in r.stdout and "bench" in r.stdout
    r = _normref()  # no command: the help, and a usage error
    assert r.returncode == 2 and "conformance" in r.stdout
    r = _normref("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    from importlib import metadata

    (ep,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "normref"]
    assert ep.value == "normref.conformance.cli:main"
    from normref.conformance import cli

    assert ep.load() is cli.main


def test_import_normref_does_not_import_the_command_line():
    code = "import sys, normref, normref.__main__; print('normref.conformance.cli' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=_env())
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("args", [
    ("--help",), ("conformance", "--help"), ("bench", "--help"), ("bench", "sync", "--help"),
    ("bench", "whitening", "--help"),
], ids=lambda a: " ".join(a))
def test_help_has_no_internal_references(args):
    r = _normref(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: normref")
    assert not ISSUE_REF.search(r.stdout), ISSUE_REF.search(r.stdout)


def test_closed_pipe_is_not_a_traceback():
    # `normref conformance | head`: the reader is gone before normref writes; it stops quietly
    p = subprocess.Popen([sys.executable, "-m", "normref", "conformance", "--quick", "--method", "pixel_norm",
                          "--backend", "numpy", "--dtype", "float64", "--no-progress", "-v"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=_env())
    p.stdout.close()
    try:
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    err = err.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert p.returncode == 141  # 128 + SIGPIPE, as a shell reports `yes | head`


def test_closed_pipe_through_a_shell_head():
    cmd = (f"'{sys.executable}' -m normref conformance --quick --method pixel_norm --backend numpy "
           "--dtype float64 --no-progress -v | head -n 2; echo \"status ${PIPESTATUS[0]}\"")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert re.search(r"status (0|141)$", r.stdout.strip()), r.stdout  # 0 if it finished before head left


@pytest.mark.parametrize("lib", ["cupy", "torch-cuda"])
def test_a_missing_library_named_with_backend_is_an_error(lib):
    b = get_backend(lib)
    if b.available:
        pytest.skip(f"{lib} is available here")
    r = _normref("conformance", "--quick", "--method", "pixel_norm", "--backend", lib, "--no-progress")
    assert r.returncode == 2
    assert f"--backend {lib} is not available here" in r.stderr and b.reason.split(" (")[0] in r.stderr
    assert "Traceback" not in r.stderr


def test_conformance_table_fits_100_columns_and_lists_skipped_libraries_below(tmp_path):
    xml_path, json_path = tmp_path / "c.xml", tmp_path / "c.json"
    r = _normref("conformance", "--quick", "--method", "adaptive_layer_instance_norm", "--dtype",
                 "float64", "--no-progress", "--junit-xml", str(xml_path), "--json", str(json_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    end = next(i for i, s in enumerate(lines) if s.lstrip().startswith(("skipped:", "tolerances:")))
    table = lines[1:end]  # between the title line and the first line under the table
    assert table and all(len(s) <= 100 for s in table), max(table, key=len)
    assert not any("skipped" in s for s in table)
    assert not ISSUE_REF.search(r.stdout)
    rep = json.loads(json_path.read_text())
    if rep["skipped"]:
        assert lines[end].startswith("skipped: ")
        for name, why in rep["skipped"]:
            assert f"{name}: {why}" in lines[end]
            assert not any(name in s.split() for s in table)  # no column for it
    # the JUnit XML: one test case per check, a skipped case per missing library and method
    root = ET.parse(xml_path).getroot()
    cases = root.findall(".//testcase")
    n_checks = len(rep["records"])
    n_skip = len(rep["skipped"]) * len(rep["methods"])
    assert len(cases) == n_checks + n_skip == int(root.get("tests"))
    assert len(root.findall(".//testcase/skipped")) == n_skip == int(root.get("skipped"))
    assert root.get("failures") == "0" and root.get("errors") == "0"
    assert {s.get("name") for s in root.findall("testsuite")} == {f"normref.conformance.{m}" for m in rep["methods"]}


def test_junit_xml_marks_failures_and_errors():
    from normref.conformance import Record, Report
    from normref.conformance.junit import junit_xml

    recs = [Record("m", 0, "ok", "numpy", "float64", "forward", 1e-16, 1e-15, "32·ε", "pass", 0),
            Record("m", 0, "bad", "torch", "float32", "backward", 1e-3, 1e-6, "32·ε", "fail", 7),
            Record("m", 1, "boom", "jax", "float64", "forward", float("nan"), 1e-15, "32·ε", "error", 7,
                   message="ValueError: x")]
    rep = Report(recs, ["m"], ["numpy", "torch", "jax"], [("cupy", "not installed")], meta={"seconds": 1.5})
    root = ET.fromstring(junit_xml(rep))
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("4", "1", "1", "1")
    (fail,) = root.findall(".//failure")
    assert "error 0.001 > tolerance 1e-06" in fail.get("message") and "seed 7" in fail.get("message")
    (err,) = root.findall(".//error")
    assert err.get("message") == "ValueError: x"
    assert root.find(".//skipped").get("message") == "cupy: not installed"


# --------------------------------------------------------------------------------------------------
# normref bench: its smoke run, with and without rich and matplotlib


def _bench(tmp_path, capsys, *extra):
    from normref.conformance.cli import main

    rc = main(["bench", "--smoke", "--repeat", "3", "--threads", "1", "--out", str(tmp_path), *extra])
    return rc, capsys.readouterr().out


def _check_bench_json(path: Path) -> dict:
    rep = json.loads(path.read_text())
    env = rep["environment"]
    assert env["cpu_model"] and env["cpu_count"] >= 1 and env["numba_threads"] >= 1
    assert env["timestamp_utc"].endswith("+00:00")
    assert env["versions"]["normref"] == normref.__version__ and env["versions"]["numpy"]
    rows = rep["rows"]
    assert {(r["method"], r["pass"]) for r in rows} == {
        (m, p) for m in ("batch", "instance", "group", "layer", "rms") for p in ("forward", "backward")}
    for r in rows:
        for key in ("numba", "numba_1t", "array_api"):
            s = r[key + "_spread"]
            assert s["n"] == 3 and 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
            assert s["median"] == r[key] and s["iqr"] == pytest.approx(s["q3"] - s["q1"])
    return rep


def test_bench_smoke_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("numba")
    pytest.importorskip("torch")
    rc, out = _bench(tmp_path, capsys)
    assert rc == 0
    rep = _check_bench_json(tmp_path / "bench.json")
    assert rep["environment"]["torch_threads"] == 1 and rep["environment"]["versions"]["torch"]
    for r in rep["rows"]:
        lo, hi = r["speedup_iqr"]
        assert lo <= r["speedup"] <= hi  # the ratio of medians lies inside the quartiles' ratio range
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped: matplotlib is not installed" in out
    else:
        assert (tmp_path / "bench.png").stat().st_size > 0 and "wrote" in out
    assert not ISSUE_REF.search(out)


def test_bench_without_rich_and_matplotlib(tmp_path, capsys, monkeypatch):
    # the README's setup installs neither: the table as plain text, the JSON, the plot skipped
    pytest.importorskip("numba")
    for mod in [m for m in list(sys.modules) if m.split(".")[0] in ("rich", "matplotlib")] + [
            "rich", "rich.console", "rich.table", "matplotlib", "matplotlib.pyplot"]:
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if not installed
    rc, out = _bench(tmp_path, capsys, "--no-torch")
    assert rc == 0
    _check_bench_json(tmp_path / "bench.json")
    assert not (tmp_path / "bench.png").exists()
    assert "plot skipped" in out and "numba ms" in out and "layer" in out
    pytest.importorskip("torch")
    rc, out = _bench(tmp_path, capsys)
    assert rc == 0 and "plot skipped: matplotlib is not installed" in out
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["torch"] > 0
