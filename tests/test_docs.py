"""The documentation site builds with warnings as errors, and its examples run (issue 17 §1).

Builds ``docs/`` with Sphinx's ``html`` and ``doctest`` builders in subprocesses (``-W --keep-going``,
into a temporary folder), then checks that every registered method has its page with the sections the
generator writes (formulas, equivalents, the executed example, the conformance result) and that the
figures were made. The html build runs the conformance suite (quick mode) and a quick bench unless
``docs/_generated/`` holds their results for the same code (see ``docs/_gen.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import normref

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TIMEOUT = 900  # seconds per builder: the html build runs the conformance suite and a bench smoke run


def _build(builder: str, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMREF_DOCS_")}
    env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, str(DOCS), str(out / builder),
         "-d", str(out / "doctrees")],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=str(ROOT),
    )


@pytest.mark.slow
def test_docs_build_html_and_doctest(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("matplotlib")
    html = _build("html", tmp_path)
    assert html.returncode == 0, f"sphinx html failed:\n{html.stdout[-4000:]}\n{html.stderr[-6000:]}"
    doctest = _build("doctest", tmp_path)
    assert doctest.returncode == 0, f"sphinx doctest failed:\n{doctest.stdout[-6000:]}\n{doctest.stderr[-4000:]}"
    # the doctest builder ran the examples (the method pages' and the hand-written pages'), none failed
    summary = (tmp_path / "doctest" / "output.txt").read_text().rsplit("Doctest summary", 1)[-1]
    counts = {what: int(n) for n, what in re.findall(r"^\s*(\d+) (tests?|failures? in \w+ code|failures? in tests)$",
                                                    summary, re.M)}
    tries = counts.get("tests", counts.get("test", 0))
    assert tries >= 10 * len(normref.methods()), summary  # each method page runs about a dozen statements
    assert sum(n for what, n in counts.items() if what.startswith("failure")) == 0, summary

    out = tmp_path / "html"
    for page in ("index", "framework", "embedding", "conformance", "benchmark", "distributed", "api",
                 "methods/index"):
        assert (out / f"{page}.html").exists(), page
    missing = [m.name for m in normref.methods() if not (out / "methods" / f"{m.name}.html").exists()]
    assert not missing, f"registered methods without a page: {missing}"
    for m in normref.methods():
        text = (out / "methods" / f"{m.name}.html").read_text()
        for section in ("Forward", "Backward (analytic, what the code computes)", "Equivalents in other frameworks",
                        "Executed example", "Conformance"):
            assert section in text, f"{m.name}: no {section!r} section"
        assert "(not documented)" not in text, f"{m.name}: no backward formula"
    images = {p.name for p in (out / "_images").iterdir()}
    assert {"partitions.png", "whitening.png", "bench.png", "conformance.png"} <= images, images
