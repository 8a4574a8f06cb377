"""Release packaging: the metadata in pyproject.toml, and a wheel built from this tree (LICENSE,
py.typed, the SPDX licence, one version, ranges rather than exact pins for users)."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import normref

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_metadata_is_release_grade():
    proj = PYPROJECT["project"]
    assert proj["license"] == "Apache-2.0" and proj["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")
    assert proj["classifiers"] and proj["keywords"] and proj["urls"] and proj["authors"]
    # one version: pyproject reads normref.__version__
    assert "version" not in proj and proj["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "normref.__version__"}
    # setuptools bounded: SPDX strings need >= 77, and an upper bound keeps future removals out
    (req,) = PYPROJECT["build-system"]["requires"]
    assert req.startswith("setuptools>=77") and ",<" in req


def test_user_extras_have_ranges_not_pins():
    # the exact torch version is CI's (.ci/run, the README's test command), never a user's extra
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        for r in reqs:
            assert "==" not in r, f"extra {extra!r}: {r}"
        torch = [r for r in reqs if r.startswith("torch")]
        assert all(">=" in r and "<" in r for r in torch), (extra, torch)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert '"torch==2.13.0"' in ci and '".[test]"' in ci


@pytest.mark.slow
def test_wheel_has_license_py_typed_and_metadata(tmp_path):
    """A wheel built from a copy of the tree (no build isolation: setuptools as installed)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build",
                                                             "bench-out", "docs", ".hypothesis", "*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("normref-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        dist = f"normref-{normref.__version__}.dist-info"
        assert f"{dist}/licenses/LICENSE" in names
        assert "normref/py.typed" in names and "normref/__main__.py" in names
        assert "normref/conformance/cli.py" in names and "normref/backends/numba/__init__.py" in names
        meta = email.message_from_bytes(z.read(f"{dist}/METADATA"))
        entry_points = z.read(f"{dist}/entry_points.txt").decode()
    assert meta["Version"] == normref.__version__
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    assert "normref = normref.conformance.cli:main" in entry_points
    torch_reqs = [v for v in meta.get_all("Requires-Dist") if v.startswith("torch")]
    assert torch_reqs and all("==" not in v.split(";")[0] for v in torch_reqs)  # the marker has "extra =="
