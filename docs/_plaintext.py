"""Docstrings write their math as plain text (``|x − μ|``, ``(N, C, *spatial)``, ``‖v‖``), as ``help()``
shows it. In reStructuredText ``|x|`` is a substitution reference and a lone ``*`` starts an emphasis,
so autodoc would turn the math into errors. This ``autodoc-process-docstring`` handler (run before
napoleon) escapes ``|`` and the ``*`` that do not delimit a well-formed ``*emphasis*`` or
``**strong**``, and an author's initial that starts a line ("Y. Wu", which would start an enumerated
list and vanish), outside inline literals, roles, literal blocks (after ``::``) and doctest blocks;
the rendered text is then exactly the docstring's.
"""

from __future__ import annotations

import re

# spans kept as they are: ``literal``, :role:`target`, `interpreted`_ / `text`, backslash escapes
_KEEP = re.compile(r"``.+?``|:[\w:.-]+:`[^`]*`|`[^`]*`_{0,2}|\\.")
# well-formed emphasis / strong: opening * after start, space or opening punctuation, non-space after
# it, closing * after a non-space and before end, space or closing punctuation
_EMPH = re.compile(r"(?<![\w*\\])(\*\*?)(?=\S)(.+?)(?<=\S)\1(?![\w*])")


def _escape_text(s: str) -> str:
    out, pos = [], 0
    for m in _EMPH.finditer(s):
        out.append(s[pos:m.start()].replace("*", r"\*"))
        out.append(m.group(0).replace("|", r"\|"))
        pos = m.end()
    out.append(s[pos:].replace("*", r"\*"))
    return _pipes("".join(out))


def _pipes(s: str) -> str:
    return re.sub(r"(?<!\\)\|", r"\\|", s)


def escape_line(line: str) -> str:
    out, pos = [], 0
    for m in _KEEP.finditer(line):
        out.append(_escape_text(line[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_escape_text(line[pos:]))
    return "".join(out)


_FOOTNOTE = re.compile(r"^(\s*\.\. \[[^\]]+\]\s+)")
# an author's initial at the start of a line ("Y. Wu and K. He") would start an enumerated list
_INITIAL = re.compile(r"^(\s*)([A-Z])\. (?=[A-Z])")


def _initial(line: str) -> str:
    return _INITIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}\\. ", line)


def _indent(s: str) -> int:
    return len(s) - len(s.lstrip())


def escape_lines(lines: list) -> list:
    out = []
    literal_indent = None  # inside a literal block: the indentation of the line that opened it
    doctest = False
    for ln in lines:
        stripped = ln.strip()
        if literal_indent is not None:
            if stripped and _indent(ln) <= literal_indent:
                literal_indent = None
            else:
                out.append(ln)
                continue
        if doctest:
            if not stripped:
                doctest = False
            out.append(ln)
            continue
        if stripped.startswith(">>>"):
            doctest = True
            out.append(ln)
            continue
        m = _FOOTNOTE.match(ln)
        if m:  # a footnote or citation (numpydoc's References): its text is text
            out.append(m.group(1) + _initial(escape_line(ln[m.end(1):])))
            continue
        if stripped.startswith(".. "):  # a directive or comment: leave its line alone
            out.append(ln)
            if re.match(r"\.\. (code-block|code|math|doctest|testcode|testoutput|sourcecode|parsed-literal)::",
                        stripped) or not re.match(r"\.\. [\w-]+::", stripped):
                literal_indent = _indent(ln)  # literal content, or a comment's body
            continue
        out.append(_initial(escape_line(ln)))
        if stripped.endswith("::"):
            literal_indent = _indent(ln)
    return out


def process_docstring(app, what, name, obj, options, lines) -> None:
    lines[:] = escape_lines(lines)
