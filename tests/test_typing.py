"""The typed, introspectable API (issue 17 §2): mypy is clean on normref/, the public functions'
types reach a user's checker, and ``inspect``/``help()`` show each function's own signature."""

from __future__ import annotations

import inspect
import os
import pydoc
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import normref

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mypy", reason="mypy is in the test extra")


def _mypy(tmp_path: Path, *args: str) -> tuple[int, str]:
    """mypy in a subprocess (its own process: no state shared with the test session), with its
    cache in a temporary directory, from the repository root (pyproject's [tool.mypy])."""
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"), *args]
    env = {**os.environ, "MYPY_FORCE_COLOR": "0", "TERM": "dumb"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory):
    """One mypy run over normref/ (pyproject's files) plus a user's snippet: the snippet imports
    normref, so the package is checked either way; one run keeps the test fast (~30 s cold)."""
    tmp = tmp_path_factory.mktemp("typing")
    snippet = tmp / "user_snippet.py"
    snippet.write_text(textwrap.dedent("""\
        import numpy as np
        import normref

        x = np.zeros((2, 4))
        reveal_type(normref.layer_norm)
        normref.layer_norm(x, (4,), eps="a")            # line 6: eps is a float
        normref.layer_norm(x, (4,), epsilon=1e-3)       # line 7: no such keyword
        out, res = normref.group_norm.forward(x, 2)
        reveal_type(res)
        reveal_type(normref.batch_norm(x, None, None))
        normref.vjp(normref.group_norm, x, "2")         # line 11: num_groups is an int
        y = normref.layer_norm(x, (4,))                 # fine
        """))
    code, text = _mypy(tmp, "normref", str(snippet))
    return code, text, snippet.name


def test_mypy_is_clean_on_normref(mypy_run):
    code, text, snippet = mypy_run
    errors = [ln for ln in text.splitlines() if ": error:" in ln and not ln.startswith(snippet)
              and snippet not in ln]
    assert not errors, "mypy errors in normref/:\n" + "\n".join(errors)


def test_types_reach_users(mypy_run):
    code, text, snippet = mypy_run
    lines = [ln for ln in text.splitlines() if snippet in ln]
    errs = {int(m.group(1)) for ln in lines if (m := re.search(r":(\d+): error:", ln))}
    # the three wrong calls are flagged, and nothing else in the snippet (the good calls pass)
    assert errs == {6, 7, 11}, "\n".join(lines)
    assert code != 0
    notes = "\n".join(ln for ln in lines if "Revealed type" in ln)
    # the public function is a Method carrying the function's parameters and return type
    assert re.search(r"Method\[\[input: Any, normalized_shape: int \| (typing\.)?Sequence\[int\], weight: Any =, "
                     r"bias: Any =, eps: float =, \*, out: Any =\], Any\]", notes), notes
    assert "normref.registry.Residuals" in notes  # forward returns (out, Residuals)
    assert "NormResult" in notes  # batch_norm's return annotation reaches the caller


@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "batch_norm", "spectral_norm", "batch_whitening"])
def test_signature_is_the_functions(name):
    m = normref.get(name)
    fn = m.__wrapped__
    sig, doc = inspect.signature(fn), fn.__doc__
    if m.channels:  # the registry adds the keyword-only channel_axis and its docstring entry (issue 16)
        from normref.registry import _document_channel_axis, _with_channel_axis

        sig, doc = _with_channel_axis(name, sig, m.channels), _document_channel_axis(doc, m.channels)
    assert inspect.signature(m) == sig
    assert (m.__name__, m.__qualname__, m.__module__, m.__doc__) == (
        fn.__name__, fn.__qualname__, fn.__module__, doc)
    assert inspect.isroutine(m)  # so that pydoc and documentation tools render it as a function


def test_help_starts_with_name_and_signature():
    text = pydoc.render_doc(normref.group_norm, renderer=pydoc.plaintext)
    lines = text.splitlines()
    sig = str(inspect.signature(normref.group_norm))  # the function's, with the registry's channel_axis
    assert lines[2] == "group_norm" + sig, lines[:4]
    assert sig.startswith("(input: 'Any', num_groups: 'int', weight: 'Any' = None, bias: 'Any' = None")
    # the docstring follows the signature (first line of the function's own docstring)
    first_doc = normref.group_norm.__wrapped__.__doc__.strip().splitlines()[0]
    assert lines[3].strip() == first_doc.strip()


def test_every_public_function_is_annotated():
    missing = []
    for name in normref.__all__:
        obj = getattr(normref, name)
        if inspect.ismodule(obj) or isinstance(obj, type) or not callable(obj):
            continue
        sig = inspect.signature(obj)
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
        missing += [f"{name}({p.name})" for p in sig.parameters.values()
                    if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not missing, missing


def test_py_typed_ships():
    assert (Path(normref.__file__).parent / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in cfg["tool"]["setuptools"]["package-data"]["normref"]
    assert cfg["tool"]["mypy"]["files"] == ["normref"]


def test_method_is_still_itself_on_a_class():
    class Holder:
        norm = normref.layer_norm

    assert Holder.norm is normref.layer_norm and Holder().norm is normref.layer_norm
