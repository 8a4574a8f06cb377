"""JUnit XML for CI: one ``<testcase>`` per conformance check, a skipped library as a skipped case.

    normref conformance --quick --junit-xml conformance.xml

CI systems (GitLab, Jenkins, GitHub's test reporters) read this format: each method is a test
suite, each check (example × library × dtype × check) a test case named so that it can be found in
the JSON report, and a failed check carries its error, its tolerance and the tolerance's derivation.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from typing import Any

__all__ = ["junit_xml", "write_junit_xml"]


def _case_name(r: Any) -> str:
    return f"{r.column}.{r.dtype}.{r.check}[{r.example}: {r.label}]"


def junit_xml(report: Any) -> str:
    """The report as a JUnit XML document (a string)."""
    seconds = float(report.meta.get("seconds", 0.0))
    root = ET.Element("testsuites", name=report.title)
    by_method: dict = {}
    for r in report.records:
        by_method.setdefault(r.method, []).append(r)
    total = failures = errors = skipped = 0
    for m in report.methods:
        recs = by_method.get(m, [])
        suite = ET.SubElement(root, "testsuite", name=f"normref.conformance.{m}")
        n_fail = n_err = n_skip = 0
        for r in recs:
            case = ET.SubElement(suite, "testcase", classname=f"normref.conformance.{m}", name=_case_name(r),
                                 time="0")
            if r.status == "error":
                n_err += 1
                el = ET.SubElement(case, "error", message=r.message or "the check raised", type="error")
                el.text = r.line()
            elif not r.passed:
                n_fail += 1
                ratio = r.ratio
                msg = (f"error {r.error:.3g} > tolerance {r.tol:.3g} ({r.formula}); "
                       f"error/tolerance {'inf' if math.isinf(ratio) else f'{ratio:.3g}'}; seed {r.seed}")
                el = ET.SubElement(case, "failure", message=msg, type="tolerance")
                el.text = r.line()
        n_untested = int(m in getattr(report, "untested", []))
        if n_untested:
            n_fail += 1
            case = ET.SubElement(suite, "testcase", classname=f"normref.conformance.{m}", name="examples")
            ET.SubElement(case, "failure", message="no example to check (registered without examples?)",
                          type="untested")
        for b, why in report.skipped:  # a library that is not installed: one skipped case per method
            n_skip += 1
            case = ET.SubElement(suite, "testcase", classname=f"normref.conformance.{m}", name=f"{b}")
            ET.SubElement(case, "skipped", message=f"{b}: {why}")
        n = len(recs) + n_untested + len(report.skipped)
        suite.set("tests", str(n))
        suite.set("failures", str(n_fail))
        suite.set("errors", str(n_err))
        suite.set("skipped", str(n_skip))
        total, failures, errors, skipped = total + n, failures + n_fail, errors + n_err, skipped + n_skip
    for problem in getattr(report, "path_problems", []):  # a column that ran off its computation path
        suite = ET.SubElement(root, "testsuite", name="normref.conformance.paths", tests="1", failures="1",
                              errors="0", skipped="0")
        case = ET.SubElement(suite, "testcase", classname="normref.conformance.paths", name=problem.split(":")[0])
        ET.SubElement(case, "failure", message=problem, type="path")
        total, failures = total + 1, failures + 1
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    root.set("skipped", str(skipped))
    root.set("time", f"{seconds:.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit_xml(report: Any, path: str | os.PathLike) -> None:
    """Write :func:`junit_xml` of ``report`` to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(junit_xml(report))
