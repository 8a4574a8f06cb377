"""Results of the conformance suite: one :class:`Record` per check, a :class:`Report` that renders
the methods × libraries table (with rich when it is installed) and round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any, Iterable

from .tolerance import legend

__all__ = ["Record", "Report", "ConformanceError", "FD_COLUMN"]

FD_COLUMN = "finite-diff"  # method-level float64 checks that belong to no library

FORMAT_VERSION = 1


class ConformanceError(AssertionError):
    """Raised by :func:`normref.conformance.check` (and ``Report.raise_for_failures``) on disagreement.

    An ``AssertionError``, so a pytest test that calls ``check`` fails with the report as message.
    ``.report`` holds the :class:`Report`.
    """

    def __init__(self, message: str, report: "Report | None" = None):
        super().__init__(message)
        self.report = report


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else repr(x)  # "inf"/"nan": JSON has no literal for them


def _unnum(x):
    if x is None:
        return None
    return float(x)


def _short(x: float, digits: int) -> str:
    """``x`` to ``digits`` significant digits, the exponent without its leading zero (5.8e-6)."""
    t = f"{x:.{digits}g}"
    return t.replace("e-0", "e-").replace("e+0", "e+")


def _two_lines(name: str, width: int = 9) -> str:
    """A column header of more than ``width`` characters broken after its last ``-`` or ``_`` that
    leaves a first line of at most ``width`` (numpy-reference → numpy- / reference)."""
    if len(name) <= width:
        return name
    cuts = [i + 1 for i, ch in enumerate(name[:width]) if ch in "-_"]
    return name if not cuts else name[:cuts[-1]] + "\n" + _two_lines(name[cuts[-1]:], width)


@dataclasses.dataclass
class Record:
    """One check: ``error`` against ``tol`` (``formula`` says how ``tol`` was derived).

    ``status`` is ``pass``, ``fail`` (error above tolerance) or ``error`` (the check raised).
    ``seed`` is the suite seed and ``example`` the index of the case in ``method``'s
    ``examples(rng)`` stream for that seed: enough to rebuild the inputs (see :func:`replay`).
    ``detail`` maps an output field, an argument or another library to its own error.
    """

    method: str
    example: int
    label: str
    backend: str
    dtype: str
    check: str
    error: float
    tol: float
    formula: str
    status: str
    seed: int
    cond: float = 1.0
    message: str = ""
    detail: dict = dataclasses.field(default_factory=dict)
    column: str = ""

    def __post_init__(self):
        if not self.column:
            self.column = self.backend

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def ratio(self) -> float:
        if self.status == "error":
            return math.inf
        if self.tol <= 0:
            return 0.0 if self.error == 0 else math.inf
        return self.error / self.tol

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["error"] = _num(self.error)
        d["tol"] = _num(self.tol)
        d["detail"] = {k: _num(v) if isinstance(v, (int, float)) else v for k, v in self.detail.items()}
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["error"] = _unnum(kw["error"])
        kw["tol"] = _unnum(kw["tol"])
        kw["detail"] = {
            k: (float(v) if isinstance(v, str) and v in ("inf", "nan", "-inf") else v)
            for k, v in (kw.get("detail") or {}).items()
        }
        return cls(**kw)

    def line(self) -> str:
        where = f"{self.method}[{self.example}] {self.label!r} {self.backend} {self.dtype} {self.check}"
        if self.status == "error":
            return f"{where}: ERROR {self.message}"
        return f"{where}: error {self.error:.3g} vs tol {self.tol:.3g} ({self.formula}) {self.status}"


@dataclasses.dataclass
class Report:
    """All records of a run plus what was run and what was skipped (with reasons)."""

    records: list
    methods: list
    columns: list
    skipped: list  # [(backend, reason)]
    meta: dict = dataclasses.field(default_factory=dict)
    title: str = "normref conformance"

    # -- verdict ----------------------------------------------------------------------------------
    @property
    def failures(self) -> list:
        return [r for r in self.records if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.untested and not self.path_problems

    @property
    def paths(self) -> dict:
        """``meta["paths"]``: per column, the computation it ran and its kernel calls (asked, offered,
        taken per primitive; :func:`normref.conformance.suite.kernel_paths`)."""
        return dict(self.meta.get("paths") or {})

    @property
    def path_problems(self) -> list:
        """Columns that did not run the computation they claim, one sentence each: a column claiming
        kernels in which, in a dtype the kernels take, kernel lookups were made but none took a kernel
        (its comparison with the formulas would be vacuous: the same computation twice), or claiming
        kernels none of which is registered; a column claiming the formulas in which a kernel ran."""
        out = []
        for col, p in self.paths.items():
            claims = list(p.get("claims") or [])
            if p.get("thresholds") is not None and not claims:
                out.append(f"{col}: claims kernels ({p.get('path')}), but none is registered")
            for dt, d in (p.get("by_dtype") or {}).items():
                if not claims or dt not in (p.get("kernel_dtypes") or ()):
                    continue
                asked = sum(d.get("asked", {}).get(k, 0) for k in claims)
                taken = sum(d.get("taken", {}).get(k, 0) for k in claims)
                if asked and not taken:
                    out.append(f"{col} {dt}: claims kernels ({p.get('path')}), but none of its {asked} "
                               f"kernel lookups took one")
            n = sum((p.get("taken") or {}).values())
            if p.get("kernels") is False and n:
                out.append(f"{col}: claims the array-API formulas, but {n} calls took a kernel")
        return out

    def path_lines(self) -> list:
        """One line per column: its computation and how many kernel lookups took a kernel."""
        lines = []
        for col in self.columns:
            p = self.paths.get(col)
            if p is None:
                continue
            asked, taken = p.get("asked") or {}, p.get("taken") or {}
            if not asked:
                calls = "no kernel asked" if p.get("kernels", True) is not False else "kernels off, 0 kernel calls"
            else:
                per = ", ".join(f"{k} {taken.get(k, 0)}/{n}" for k, n in sorted(asked.items()))
                calls = f"{sum(taken.values())} of {sum(asked.values())} kernel lookups took a kernel ({per})"
            lines.append(f"{col}: {p.get('path')}; {calls}")
        return lines

    @property
    def untested(self) -> list:
        """Methods asked for that produced no record (e.g. registered without examples)."""
        seen = {r.method for r in self.records}
        return [m for m in self.methods if m not in seen]

    def __bool__(self) -> bool:  # pragma: no cover - convenience
        return self.ok

    def worst(self) -> "Record | None":
        return max(self.records, key=lambda r: r.ratio, default=None)

    def summary(self) -> str:
        n, f = len(self.records), len(self.failures)
        w = self.worst()
        libs = [c for c in self.columns if c != FD_COLUMN]
        s = (
            f"{self.title}: {len(self.methods)} methods × {len(libs)} libraries "
            f"({', '.join(libs)}), {n} checks: {n - f} passed, {f} failed"
        )
        if self.untested:
            s += f", {len(self.untested)} methods untested ({', '.join(self.untested)})"
        if self.path_problems:
            s += f", {len(self.path_problems)} columns off their path ({'; '.join(self.path_problems)})"
        if w is not None:
            s += f"; worst error/tolerance {w.ratio:.3g}"
        if "seconds" in self.meta:
            s += f"; {self.meta['seconds']:.1f} s"
        if self.skipped:
            s += "; skipped: " + ", ".join(f"{b} ({why})" for b, why in self.skipped)
        return s

    def raise_for_failures(self) -> "Report":
        if not self.ok:
            lines = [self.summary()] + [r.line() for r in self.failures[:20]]
            if len(self.failures) > 20:
                lines.append(f"... and {len(self.failures) - 20} more")
            for m in self.untested:
                lines.append(f"{m}: no example to check (registered without examples?)")
            lines += self.path_problems
            raise ConformanceError("\n".join(lines), self)
        return self

    # -- the table --------------------------------------------------------------------------------
    def cells(self) -> dict:
        """{(method, column): (passed, worst ratio, n checks, worst record)}."""
        out: dict = {}
        for r in self.records:
            key = (r.method, r.column)
            ok, worst, n, wr = out.get(key, (True, -1.0, 0, None))
            if r.ratio > worst:
                worst, wr = r.ratio, r
            out[key] = (ok and r.passed, worst, n + 1, wr)
        return out

    def _rich_renderables(self, verbose: bool = False, max_failures: int = 25):
        from rich.table import Table
        from rich.text import Text

        from rich import box

        # compact, to fit 100 columns: no outer border, one space between columns, a long library
        # name over two lines; a library that is not installed gets no column (listed below the table)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0), collapse_padding=True)
        table.add_column("method", style="bold", no_wrap=True)
        for c in self.columns:
            table.add_column(_two_lines(c), justify="right", no_wrap=True)
        for m, row in zip(self.methods, self._cell_texts()):
            table.add_row(m, *[Text(t, style=self._STYLE[t.split(" ")[0]]) for t in row])
        out = [Text(self.title + "  (cell: largest error / tolerance over its checks; ✓ below 1)", style="bold"), table]
        if self.skipped:  # right below the table, one line: the libraries that have no column
            out.append(Text("skipped: " + "; ".join(f"{b}: {why}" for b, why in self.skipped), style="yellow"))
        dts = self.meta.get("dtypes") or ["float64", "float32", "float16", "bfloat16"]
        out.append(Text("\n".join("  " + s for s in ["tolerances:"] + legend(dts)), style="dim"))
        if self.paths:
            out.append(Text("\n".join("  " + s for s in ["paths:"] + self.path_lines()), style="dim"))
        for s in self.path_problems:
            out.append(Text("path: " + s, style="bold red"))
        if self.without_invariants:
            out.append(Text(self._invariant_note(), style="yellow"))
        if verbose:
            t = Table(title="every check", show_lines=False)
            for h in ("method", "example", "library", "dtype", "check", "error", "tolerance", "derivation", ""):
                t.add_column(h)
            for r in self.records:
                t.add_row(r.method, f"{r.example} {r.label}", r.backend, r.dtype, r.check,
                          "error" if r.status == "error" else f"{r.error:.3g}", f"{r.tol:.3g}", r.formula,
                          Text("✓", style="green") if r.passed else Text("✗", style="red"))
            out.append(t)
        fails = self.failures
        if fails:
            t = Table(title=f"failures ({len(fails)}; replay with normref.conformance.replay(record) or the seed)")
            for h in ("method", "example", "library", "dtype", "check", "error", "tolerance (derivation)", "message"):
                t.add_column(h, overflow="fold")
            for r in fails[:max_failures]:
                t.add_row(r.method, f"#{r.example} {r.label} (seed {r.seed})", r.backend, r.dtype, r.check,
                          "—" if r.status == "error" else f"{r.error:.3g}", f"{r.tol:.3g} ({r.formula})",
                          r.message or ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                                 for k, v in r.detail.items()))
            out.append(t)
            if len(fails) > max_failures:
                out.append(Text(f"... {len(fails) - max_failures} more failures (see --json)", style="red"))
        out.append(Text(self.summary(), style="bold green" if self.ok else "bold red"))
        return out

    def render(self, console=None, verbose: bool = False) -> None:
        """Print the table, the tolerance legend, the failures and the summary line."""
        try:
            from rich.console import Console
        except ImportError:  # rich is the optional 'cli' extra: fall back to plain text
            print(self.plain_text(verbose))
            return
        from rich.text import Text

        console = console or Console()
        for r in self._rich_renderables(verbose):
            # lines of text unwrapped (the summary line stays one line in a log); tables fit the width
            console.print(r, soft_wrap=isinstance(r, Text))

    _STYLE = {"✓": "green", "✗": "bold red", "—": "dim", "untested": "red"}

    def _cell_texts(self) -> list:
        """Per method, per column: ``✓ ratio``, ``✗ ratio``, ``✗ error``, ``—`` (no check) or ``untested``."""
        cells = self.cells()
        rows = []
        for m in self.methods:
            row = []
            for c in self.columns:
                cell = cells.get((m, c))
                if cell is None:
                    row.append("untested" if m in self.untested else "—")
                    continue
                ok, worst, _, wr = cell
                if ok:
                    row.append(f"✓ {_short(worst, 2)}")
                else:
                    row.append("✗ error" if wr is not None and wr.status == "error" else f"✗ {_short(worst, 3)}")
            rows.append(row)
        return rows

    @property
    def without_invariants(self) -> dict:
        """{method: why} for the methods whose run checked no invariant (``meta['no_invariants']``,
        filled by :func:`normref.conformance.run`: none registered, or none applies to the examples run)."""
        return dict(self.meta.get("no_invariants") or {})

    def _invariant_note(self) -> str:
        by: dict = {}
        for m, why in self.without_invariants.items():
            by.setdefault(why, []).append(m)
        return "no invariant checked: " + "; ".join(f"{why}: {', '.join(ms)}" for why, ms in by.items())

    def plain_text(self, verbose: bool = False) -> str:
        """The report without rich (the optional ``cli`` extra): one line per method, no table."""
        lines = [self.title + "  (install rich, normref[cli], for the table)"]
        for m, row in zip(self.methods, self._cell_texts()):
            lines.append(f"  {m}: " + ", ".join(f"{c} {t}" for c, t in zip(self.columns, row)))
        lines += ["tolerances:"] + ["  " + s for s in legend(self.meta.get("dtypes") or ["float64", "float32"])]
        if self.paths:
            lines += ["paths:"] + ["  " + s for s in self.path_lines()]
        lines += ["  FAIL path: " + s for s in self.path_problems]
        if self.skipped:
            lines.append("skipped: " + "; ".join(f"{b}: {why}" for b, why in self.skipped))
        if self.without_invariants:
            lines.append(self._invariant_note())
        for r in self.records if verbose else self.failures[:25]:
            lines.append(("  " if r.passed else "  FAIL ") + r.line())
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        try:
            from rich.console import Console
        except ImportError:
            return self.plain_text()
        buf = io.StringIO()
        self.render(Console(file=buf, width=160, force_terminal=False, color_system=None))
        return buf.getvalue()

    def __repr__(self) -> str:
        return f"<Report {self.summary()}>"

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "normref-conformance",
            "version": FORMAT_VERSION,
            "title": self.title,
            "ok": self.ok,
            "summary": self.summary(),
            "methods": list(self.methods),
            "columns": list(self.columns),
            "skipped": [list(s) for s in self.skipped],
            "meta": self.meta,
            "records": [r.to_dict() for r in self.records],
        }

    def to_json(self, path=None) -> str:
        s = json.dumps(self.to_dict(), indent=1, ensure_ascii=False, default=str)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(s)
        return s

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        if d.get("format") != "normref-conformance":
            raise ValueError("Report.from_dict: not a normref conformance report (missing format tag)")
        return cls(
            records=[Record.from_dict(r) for r in d["records"]],
            methods=list(d["methods"]),
            columns=list(d["columns"]),
            skipped=[tuple(s) for s in d["skipped"]],
            meta=dict(d.get("meta") or {}),
            title=d.get("title", "normref conformance"),
        )

    @classmethod
    def from_json(cls, path_or_text: Any) -> "Report":
        """Load a report written by ``to_json`` / ``--json`` (a path or the JSON text)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    @classmethod
    def merge(cls, reports: Iterable["Report"], title: str = "normref conformance") -> "Report":
        reports = list(reports)
        cols: list = []
        for r in reports:
            cols += [c for c in r.columns if c not in cols]
        meta = dict(reports[0].meta) if reports else {}
        if any(r.without_invariants for r in reports):
            meta["no_invariants"] = {k: v for r in reports for k, v in r.without_invariants.items()}
        if any(r.paths for r in reports):
            meta["paths"] = _merge_paths([r.paths for r in reports])
        return cls(
            records=[x for r in reports for x in r.records],
            methods=[m for r in reports for m in r.methods],
            columns=cols,
            skipped=list(dict.fromkeys(s for r in reports for s in r.skipped)),
            meta=meta,
            title=title,
        )


def _merge_paths(all_paths: list) -> dict:
    """The ``meta["paths"]`` of several reports in one: the counts of a column summed."""

    def add(into: dict, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                add(into.setdefault(k, {}), v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                into[k] = into.get(k, 0) + v

    out: dict = {}
    for paths in all_paths:
        for col, p in paths.items():
            if col not in out:
                out[col] = json.loads(json.dumps(p))  # a deep copy
                continue
            for key in ("asked", "offered", "taken", "by_dtype", "by_method"):
                add(out[col].setdefault(key, {}), p.get(key) or {})
    return out
