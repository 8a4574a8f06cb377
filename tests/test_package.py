"""The package's shape: a light import, the registry, the installed layout."""

from __future__ import annotations

import subprocess
import sys

import normref


def test_import_loads_no_framework():
    code = (
        "import sys, normref; "
        "bad = [m for m in ('torch', 'jax', 'numba', 'cupy', 'scipy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_numpy_call_loads_no_framework_but_the_kernel_backend():
    """A NumPy call may load the numba kernels (the numpy entry point), never torch or jax."""
    code = (
        "import sys, numpy as np, normref; normref.group_norm(np.ones((2, 4, 3)), 2); "
        "bad = [m for m in ('torch', 'jax', 'cupy') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_subpackages_install_under_normref():
    import normref.backends
    import normref.conformance

    assert normref.backends.__name__ == "normref.backends"
    assert normref.conformance.__name__ == "normref.conformance"


def test_every_registered_method_is_public_and_documented():
    for m in normref.methods():
        assert getattr(normref, m.name) is m, m.name
        assert m.__doc__ and m.survey and m.paper, m.name
        assert m.examples is not None, f"{m.name} has no examples for the tests and the suite"
        assert m._backward is not None, f"{m.name} has no backward"


def test_vjp_returns_one_gradient_per_array_parameter():
    import numpy as np

    x = np.random.default_rng(0).standard_normal((4, 3, 2))
    out, pb = normref.vjp(normref.batch_norm, x, np.zeros(3), np.ones(3), np.ones(3), None, True)
    grads = pb(np.ones_like(out.output))
    assert len(grads) == 5
    dx, drm, drv, dw, db = grads
    assert dx.shape == x.shape and dw.shape == (3,)
    assert drm is None and drv is None and db is None  # running statistics carry no gradient; bias was None


def test_readme_use_snippet_runs():
    """The README's "Use" block runs exactly as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    use = text[text.index("## Use"):]
    code = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    assert "normref.batch_norm" in code and "normref.vjp" in code
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["y"].shape == ns["x"].shape and ns["dx"].shape == ns["x"].shape
    assert ns["rm"].shape == (32,)


def test_public_functions_have_type_hints():
    """Every argument and the return value of the standardization family's functions are annotated."""
    import inspect

    owned = ("normref.standardization", "normref.local", "normref.combination")
    for m in normref.methods():
        if m.__module__ not in owned:
            continue
        sig = inspect.signature(m)
        assert sig.return_annotation is not inspect.Signature.empty, f"{m.name}: no return annotation"
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"{m.name}: {p.name} has no annotation"
