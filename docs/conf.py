"""Sphinx configuration of the normref documentation.

Build (warnings are errors; every example is executed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest

The registry-driven pages (``methods/``) and the figures (``_generated/``) are written at build time
by ``_gen.py`` (see its docstring for the environment variables that reuse a conformance report or
a benchmark JSON).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")

import normref  # noqa: E402

project = "normref"
author = "the normref developers"
copyright = "the normref developers; Apache-2.0"
release = version = normref.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
exclude_patterns = ["_build", "_generated/bench", "README.md"]
templates_path: list = []
try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # the docs extra installs furo; Sphinx's default theme otherwise
    html_theme = "alabaster"
html_title = f"normref {release}"
html_static_path: list = []
doctest_global_setup = "import numpy as np\nimport normref"
# numpydoc's References section lists the papers as numbered footnotes (``.. [1] ...``) that the text
# need not cite: Sphinx's "footnote [1] is not referenced" (ref.footnote) is the only warning suppressed
suppress_warnings = ["ref.footnote"]


def _generate(app) -> None:
    from sphinx.util import logging

    import _gen

    log = logging.getLogger("normref.docs")
    for w in _gen.generate(log.info):
        log.warning(w)


def setup(app):
    import _plaintext

    app.connect("builder-inited", _generate)
    # before napoleon (priority 500): the docstrings' plain-text math (|x|, *spatial) stays text
    app.connect("autodoc-process-docstring", _plaintext.process_docstring, priority=400)
    return {"parallel_read_safe": True}
