"""Docstrings of the public API are numpydoc, and render cleanly with Sphinx napoleon (issue 17 §2).

For every public function of ``normref.__all__`` and every registered method of ``normref.REGISTRY``:

- a one-line summary, then a blank line;
- only numpydoc section headers (underlined with dashes of the header's length), none twice;
- ``Parameters``: every parameter of the signature documented once, under its exact name, with a type
  (and the word ``default`` for a parameter that has one), nothing extra; ``*args``/``**kwargs`` as
  ``*args``/``**kwargs``;
- ``Returns``: at least one entry with a description;
- a survey section (``§``) and a ``References`` section citing the paper (machinery with no paper of
  its own, such as :func:`normref.vjp`, is listed in ``MACHINERY`` and exempt from these two);
- napoleon's conversion of the docstring parses as reStructuredText with no warning (the docs site
  builds with warnings as errors), Sphinx's cross-reference roles accepted as such.

The parser below is deliberately small (the numpydoc package is not a dependency): it reads what the
site's napoleon reads, and the docutils check catches what it would reject.
"""

from __future__ import annotations

import inspect
import re

import pytest
from docutils.parsers.rst import Directive, directives

import normref
from normref.registry import Method

SECTIONS = {
    "Parameters", "Returns", "Yields", "Raises", "Warns", "Other Parameters", "See Also", "Notes",
    "References", "Examples", "Attributes", "Methods",
}
# public functions that are machinery (registry lookups, the vjp, a switch), not a method of the survey
MACHINERY = {"vjp", "get", "methods", "use_kernels"}
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_]\w*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*)\s*(?::\s*(.*))?$")


def _targets() -> dict:
    out = {}
    for name in normref.__all__:
        obj = getattr(normref, name)
        if isinstance(obj, Method) or inspect.isfunction(obj):
            out[name] = obj
    for name, m in normref.REGISTRY.items():
        out.setdefault(name, m)
    return dict(sorted(out.items()))


TARGETS = _targets()


def parse(doc: str) -> tuple[list[str], dict]:
    """(summary paragraph lines, {section: lines}) of a numpydoc docstring; raises AssertionError."""
    lines = inspect.cleandoc(doc).splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and re.fullmatch(r"-{3,}", lines[i + 1].strip())
             and not lines[i].startswith(" ")]
    for i in heads:
        title = lines[i].strip()
        assert title in SECTIONS, f"unknown section header {title!r}"
        assert len(lines[i + 1].strip()) == len(title), f"underline of {title!r} has the wrong length"
    end = heads[0] if heads else len(lines)
    summary = []
    for ln in lines[:end]:
        if not ln.strip():
            break
        summary.append(ln)
    sections: dict = {}
    for k, i in enumerate(heads):
        title = lines[i].strip()
        assert title not in sections, f"section {title!r} twice"
        stop = heads[k + 1] if k + 1 < len(heads) else len(lines)
        sections[title] = lines[i + 2:stop]
    return summary, sections


def entries(body: list[str], returns: bool = False) -> list[tuple[list[str], str, list[str]]]:
    """The ``name : type`` entries of a Parameters/Returns section: (names, type, description).

    A Returns entry may be a bare type (numpydoc allows ``Returns`` without names)."""
    out: list = []
    for ln in body:
        if not ln.strip():
            continue
        if not ln.startswith(" "):
            m = _ENTRY.match(ln.strip())
            if returns and (not m or m.group(2) is None):
                out.append(([], ln.strip(), []))
                continue
            assert m, f"not a 'name : type' line: {ln!r}"
            out.append(([n.strip() for n in m.group(1).split(",")], (m.group(2) or "").strip(), []))
        else:
            assert out, f"description before any entry: {ln!r}"
            out[-1][2].append(ln.strip())
    return out


def signature_names(fn) -> dict:
    names = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names[star + p.name] = p
    return names


class _SphinxObject(Directive):
    """Stand-in for Sphinx's ``.. attribute::`` directive: parses its content as Sphinx would."""

    has_content = True
    optional_arguments = 1
    final_argument_whitespace = True
    option_spec = {"type": directives.unchanged, "value": directives.unchanged, "no-index": directives.flag,
                   "noindex": directives.flag}

    def run(self):
        from docutils import nodes

        node = nodes.container()
        self.state.nested_parse(self.content, self.content_offset, node)
        return [node]


def _rst_warnings(doc: str) -> list[str]:
    """Warnings docutils reports on napoleon's rendering of ``doc`` (Sphinx roles stubbed)."""
    import docutils.core
    import docutils.utils
    from docutils.parsers.rst import roles
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import NumpyDocstring

    def _xref(name, rawtext, text, lineno, inliner, options=None, content=None):
        from docutils import nodes

        return [nodes.literal(rawtext, text)], []

    for r in ("func", "class", "mod", "meth", "attr", "data", "obj", "exc", "ref", "math", "doc"):
        roles.register_local_role(r, _xref)
    directives.register_directive("attribute", _SphinxObject)  # napoleon's Attributes (Sphinx's directive)
    rst = str(NumpyDocstring(inspect.cleandoc(doc), Config(napoleon_use_param=True, napoleon_use_rtype=False)))
    found: list = []

    class _Stream:
        def write(self, s):
            if s.strip():
                found.append(s.strip())

    docutils.core.publish_doctree(rst, settings_overrides={
        "report_level": docutils.utils.Reporter.WARNING_LEVEL, "warning_stream": _Stream(),
        "halt_level": docutils.utils.Reporter.SEVERE_LEVEL + 1})
    return found


def check(name: str, fn) -> None:
    doc = fn.__doc__
    assert doc and doc.strip(), "no docstring"
    summary, sections = parse(doc)
    assert len(summary) == 1, f"the summary is {len(summary)} lines, not one: {summary!r}"
    for needed in ("Parameters", "Returns"):
        assert needed in sections, f"no {needed} section"
    sig = signature_names(fn)
    documented: dict = {}
    for names, typ, desc in entries(sections["Parameters"]):
        for n in names:
            assert n not in documented, f"parameter {n!r} documented twice"
            documented[n] = (typ, desc)
    missing = [n for n in sig if n not in documented]
    extra = [n for n in documented if n not in sig]
    assert not missing, f"parameters not documented: {missing}"
    assert not extra, f"documented but not in the signature: {extra}"
    for n, p in sig.items():
        typ, desc = documented[n]
        assert typ or n.startswith("*"), f"parameter {n!r} has no type"  # numpydoc: ``**kwargs`` may go untyped
        assert desc, f"parameter {n!r} has no description"
        if p.default is not p.empty:
            assert "default" in typ, f"parameter {n!r} has a default ({p.default!r}) its type line omits: {typ!r}"
    rets = entries(sections["Returns"], returns=True)
    assert rets and all(d for _, _, d in rets), "Returns has an entry without a description"
    if name not in MACHINERY:
        assert "§" in doc, "no survey section (§)"
        refs = [ln for ln in sections.get("References", []) if ln.strip()]
        assert refs, "no References section (the paper)"
    warnings = _rst_warnings(doc)
    assert not warnings, "napoleon's rendering has reStructuredText warnings:\n" + "\n".join(warnings)


def test_targets_cover_the_registry():
    assert set(normref.REGISTRY) <= set(TARGETS)
    assert {"vjp", "get", "methods"} <= set(TARGETS)


def test_checker_rejects_an_undocumented_parameter():
    def f(x, eps=1e-5):
        """Summary.

        Parameters
        ----------
        x : array
            The input.

        Returns
        -------
        out : array
            The output.
        """

    with pytest.raises(AssertionError, match="eps"):
        check("f", f)


def test_checker_rejects_bad_rst():
    def f(x):
        """Summary over (N, *spatial).

        Parameters
        ----------
        x : array
            The input.

        Returns
        -------
        out : array
            The output.

        Notes
        -----
        Survey §1.

        References
        ----------
        .. [1] A paper.
        """

    with pytest.raises(AssertionError, match="reStructuredText"):
        check("f", f)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_numpydoc(name):
    try:
        check(name, TARGETS[name])
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


# --------------------------------------------------------------------------------------------------
# the backends' public API (torch layers and parametrizations, the JAX/torch adapters, the reducers):
# numpydoc structure and a clean rendering; functions document every parameter and their return;
# classes document (in their docstring, numpydoc's convention) only parameters their constructor has.


def _backend_targets() -> dict:
    import importlib

    out = {}
    for modname in ("normref.backends.torch.modules", "normref.backends.torch.parametrize",
                    "normref.backends.torch.cross_iteration", "normref.backends.torch.online",
                    "normref.backends.torch.folding", "normref.backends.torch.inference",
                    "normref.backends.torch.conversion", "normref.backends.torch.export",
                    "normref.backends.torch", "normref.backends.jax", "normref.backends.distributed.torch",
                    "normref.backends.distributed.jax", "normref.backends.distributed.mpi", "normref.distributed"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # torch / jax not installed: nothing of theirs to document
            continue
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                out[f"{modname}.{name}"] = obj
    return out


BACKEND_TARGETS = _backend_targets()


def check_backend(name: str, obj) -> None:
    doc = obj.__doc__
    assert doc and doc.strip(), "no docstring"
    summary, sections = parse(doc)
    assert len(summary) == 1, f"the summary is {len(summary)} lines, not one: {summary!r}"
    if inspect.isfunction(obj):
        sig = signature_names(obj)
        assert "Parameters" in sections or not sig, "no Parameters section"
        assert "Returns" in sections, "no Returns section"
    else:
        init = obj.__init__
        sig = {} if init is object.__init__ else signature_names(init)
    if "Parameters" in sections:
        documented = [n for names, _, _ in entries(sections["Parameters"]) for n in names]
        extra = [n for n in documented if n not in sig]
        assert not extra, f"documented but not in the signature: {extra}"
        if inspect.isfunction(obj):
            missing = [n for n in sig if n not in documented]
            assert not missing, f"parameters not documented: {missing}"
    warnings = _rst_warnings(doc)
    assert not warnings, "napoleon's rendering has reStructuredText warnings:\n" + "\n".join(warnings)


@pytest.mark.parametrize("name", sorted(BACKEND_TARGETS))
def test_backend_numpydoc(name):
    try:
        check_backend(name, BACKEND_TARGETS[name])
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


# the public classes of normref.__all__ (result tuples, Method, Whitening, ...): the same structural check
CLASSES = {name: getattr(normref, name) for name in normref.__all__ if inspect.isclass(getattr(normref, name))}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_class_numpydoc(name):
    try:
        check_backend(name, CLASSES[name])
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None
