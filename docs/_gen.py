"""Generates the registry-driven part of the documentation at build time (called from ``conf.py``).

Into ``docs/methods/`` (ignored by git): one page per registered method (``normref.methods()``) and
their index; into ``docs/_generated/`` (ignored): the figures and the JSON they are drawn from.

- The conformance suite, quick mode, on the installed libraries among numpy, array_api_strict, torch
  and jax (``normref conformance --quick --json``, in a subprocess); ``NORMREF_DOCS_CONFORMANCE=PATH``
  uses a report written before instead.
- The benchmark: ``NORMREF_DOCS_BENCH=PATH`` plots a ``bench.json`` written by ``normref bench``;
  without it the build runs ``normref bench --quick`` (small shapes, few repeats) and the figure says so.
- Each page's example is executed here (its doctest block holds the printed output, and the
  ``doctest`` builder runs it again).

The pages and figures are written at every build; the conformance report and the bench JSON are
cached in ``_generated/`` and rerun when a source file of normref, its backends or its conformance
suite changes (a hash over them), when the registered methods change, or with ``NORMREF_DOCS_FORCE=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS_DIR = HERE / "methods"
GEN_DIR = HERE / "_generated"
DOC_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
CATEGORIES = (
    ("activation", "Activation normalization (survey §5)"),
    ("weight", "Weight normalization (survey §6)"),
    ("gradient", "Gradient normalization (survey §7)"),
    ("penalty", "Penalties on activations (survey §5.1.2)"),
)
FRAMEWORKS = ("PyTorch", "JAX (jax, optax)", "Flax", "Equinox")

sys.path.insert(0, str(HERE))
from _tables import EQUIVALENTS, FORMULAS  # noqa: E402

_warnings: list = []


def _warn(msg: str) -> None:
    _warnings.append(msg)


# --------------------------------------------------------------------------------------------------
# cache


def _stamp() -> str:
    """A hash of the code the conformance report and the bench measure (normref, its backends and its
    suite): the cached report and bench JSON are reused while it holds."""
    h = hashlib.sha256()
    for folder in ("normref", "backends", "conformance"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cached(kind: str, stamp: str):
    """The cached JSON of ``kind`` (``conformance`` or ``bench``) if made from the same code."""
    js, st = GEN_DIR / f"{kind}.cache.json", GEN_DIR / f"{kind}.stamp"
    if os.environ.get("NORMREF_DOCS_FORCE") == "1" or not (js.exists() and st.exists()) or st.read_text() != stamp:
        return None
    return json.loads(js.read_text())


def _store(kind: str, stamp: str, value) -> None:
    (GEN_DIR / f"{kind}.cache.json").write_text(json.dumps(value))
    (GEN_DIR / f"{kind}.stamp").write_text(stamp)


# --------------------------------------------------------------------------------------------------
# running the suite and the bench


def _cli(args: list, timeout: float) -> subprocess.CompletedProcess:
    code = "import sys; from normref.conformance.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def conformance_report(log) -> dict:
    given = os.environ.get("NORMREF_DOCS_CONFORMANCE")
    if given:
        log(f"conformance: the report {given}")
        return json.loads(Path(given).read_text())
    path = GEN_DIR / "conformance.json"
    from normref.conformance.backends import get_backend

    backends = [b for b in DOC_BACKENDS if get_backend(b).available]
    t0 = time.perf_counter()
    p = _cli(["conformance", "--quick", "--no-progress", "--backend", ",".join(backends), "--json", str(path)], 900)
    if not path.exists():
        raise RuntimeError(f"normref conformance wrote no report (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    log(f"conformance --quick on {', '.join(backends)}: exit {p.returncode}, {time.perf_counter() - t0:.0f} s")
    rep = json.loads(path.read_text())
    rep.setdefault("meta", {})["docs_command"] = "normref conformance --quick --backend " + ",".join(backends)
    (GEN_DIR / "conformance.txt").write_text(p.stdout)
    return rep


def bench_report(log) -> tuple[dict, str]:
    given = os.environ.get("NORMREF_DOCS_BENCH")
    if given:
        d = json.loads(Path(given).read_text())
        return d, f"from {Path(given).name} (normref bench{' --quick' if d.get('quick') else ''})"
    out = GEN_DIR / "bench"
    t0 = time.perf_counter()
    p = _cli(["bench", "--quick", "--out", str(out)], 600)
    js = out / "bench.json"
    if not js.exists():
        raise RuntimeError(f"normref bench --quick wrote no JSON (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    log(f"bench --quick: exit {p.returncode}, {time.perf_counter() - t0:.0f} s")
    return json.loads(js.read_text()), ("normref bench --quick run during this docs build (small shapes, few "
                                        "repeats: a smoke run, not the full benchmark)")


# --------------------------------------------------------------------------------------------------
# conformance aggregation


def _ratio(r: dict) -> float:
    if r["status"] == "error":
        return float("inf")
    err, tol = _f(r["error"]), _f(r["tol"])
    if tol <= 0:
        return 0.0 if err == 0 else float("inf")
    return err / tol


def _f(x) -> float:
    return float(x) if not isinstance(x, str) else float(x.replace("Infinity", "inf").replace("NaN", "nan"))


def cells(rep: dict) -> dict:
    """{method: {(column, dtype): [n, failed, worst ratio, worst record]}}."""
    out: dict = {}
    for r in rep["records"]:
        key = (r.get("column") or r["backend"], r["dtype"])
        c = out.setdefault(r["method"], {}).setdefault(key, [0, 0, -1.0, None])
        ratio = _ratio(r)
        c[0] += 1
        c[1] += not r["passed"]
        if ratio > c[2] or c[3] is None:
            c[2], c[3] = ratio, r
    return out


def column_keys(rep: dict) -> list:
    keys = []
    for col in rep["columns"]:
        if col in rep["meta"].get("backend_dtypes", {}):
            keys += [(col, d) for d in rep["meta"]["backend_dtypes"][col]]
        else:
            keys.append((col, "float64"))
    return keys


# --------------------------------------------------------------------------------------------------
# figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_partitions(path: Path) -> None:
    """Table 1's partitions on an (N, C, H·W) block, GN-paper style: the elements sharing one statistic
    in blue (the set of element (0, 0, 0)), computed from normref.partition."""
    from normref import partition as P

    plt = _plt()
    N, C, L = 4, 6, 5
    shape = (N, C, L)
    parts = [
        ("Batch norm", P.batch()), ("Layer norm", P.layer(2)), ("Instance norm", P.instance()),
        ("Group norm (G = 3)", P.group(3)), ("Position norm", P.position()),
        ("Batch-group norm (Gb = 2, G = 3)", P.batch_group(3, 2)),
    ]
    fig = plt.figure(figsize=(13, 7.2))
    for i, (title, part) in enumerate(parts):
        vs = part.view_shape(shape)
        ids = np.arange(N * C * L).reshape(vs)
        axes = part.axes(shape)
        sel = tuple(slice(None) if a in axes else 0 for a in range(len(vs)))
        mask = np.isin(np.arange(N * C * L), ids[sel]).reshape(shape)
        # voxels on (x: N, y: C, z: H·W)
        filled = np.ones(shape, bool)
        colors = np.zeros(shape + (4,))
        colors[:] = (0.85, 0.85, 0.85, 0.18)
        colors[mask] = (0.17, 0.42, 0.69, 0.95)
        ax = fig.add_subplot(2, 3, i + 1, projection="3d")
        ax.voxels(filled, facecolors=colors, edgecolor=(0.3, 0.3, 0.3, 0.35), linewidth=0.3)
        ax.view_init(elev=22, azim=-58)
        ax.set_xlabel("N (samples)", labelpad=-10)
        ax.set_ylabel("C (channels)", labelpad=-10)
        ax.set_zlabel("H, W", labelpad=-10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.set_box_aspect((N, C, L))
        n = int(mask.sum())
        ax.set_title(f"{title}\nview {vs}, reduce axes {axes}: {n} elements per statistic", fontsize=8.5)
    fig.suptitle("Normalization area partitioning (survey Table 1) on an (N, C, H, W) block: the elements of one "
                 "statistic in blue (from normref.partition)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fig_whitening(path: Path) -> None:
    """A correlated 2-D cloud, raw and whitened by PCA, ZCA and Cholesky (normref.whitening_matrix)."""
    import normref

    plt = _plt()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((600, 2))
    a = np.array([[2.0, 0.0], [1.2, 0.6]])
    x = z @ a.T + np.array([3.0, -1.0])
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x)
    angle = np.arctan2(xc[:, 1], xc[:, 0])
    panels = [("raw data", x)]
    for name in ("pca", "zca", "cholesky"):
        w = np.asarray(normref.whitening_matrix(cov, name))
        panels.append((f"{name.upper() if name != 'cholesky' else 'Cholesky'}: W·(x − μ)", xc @ w.T))
    fig, axs = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (title, pts) in zip(axs, panels):
        ax.scatter(pts[:, 0], pts[:, 1], c=angle, cmap="hsv", s=5)
        c = np.cov(pts.T, bias=True)
        ax.set_title(f"{title}\ncov = [[{c[0, 0]:.2f}, {c[0, 1]:.2f}], [{c[1, 0]:.2f}, {c[1, 1]:.2f}]]", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.axhline(0, color="k", lw=0.4)
        ax.axvline(0, color="k", lw=0.4)
    fig.suptitle("Whitening a 2-D cloud (colour: the angle of each raw centred point, to show the rotation "
                 "each method leaves)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _spread(row: dict, key: str):
    """(q1, q3) of a timing over its repetitions (``normref bench`` writes ``<key>_spread``), else None."""
    sp = row.get(f"{key}_spread")
    if isinstance(sp, dict) and "q1" in sp and "q3" in sp:
        return float(sp["q1"]), float(sp["q3"])
    return None


def fig_bench(bench: dict, label: str, path: Path) -> dict:
    """Speed-up of normref (numba kernels) over PyTorch CPU per case, log axis, one panel per method."""
    plt = _plt()
    rows = [r for r in bench.get("rows", []) if r.get("torch") and r.get("numba")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if not methods:
        raise RuntimeError("the bench JSON has no rows with both numba and torch timings")
    fig, axs = plt.subplots(1, len(methods), figsize=(3.1 * len(methods), 4.8), sharey=True, squeeze=False)
    for ax, m in zip(axs[0], methods):
        rs = [r for r in rows if r["method"] == m]
        xs = np.arange(len(rs))
        sp = np.array([r["torch"] / r["numba"] for r in rs])
        err = None
        lohi = [(_spread(r, "torch"), _spread(r, "numba")) for r in rs]
        if all(t is not None and n is not None for t, n in lohi):
            lo = np.array([t[0] / n[1] for t, n in lohi])  # torch q1 / normref q3: a conservative IQR
            hi = np.array([t[1] / n[0] for t, n in lohi])
            err = np.vstack([np.maximum(sp - lo, 0), np.maximum(hi - sp, 0)])
        colors = ["#2b6cb0" if r["pass"] == "forward" else "#dd6b20" for r in rs]
        ax.bar(xs, sp, color=colors, yerr=err, capsize=3)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{r['pass']}\n{'×'.join(map(str, r['shape']))}\n{r['layout']}" for r in rs],
                           fontsize=6.5, rotation=90)
        ax.set_title(f"{m} norm", fontsize=10)
    axs[0][0].set_ylabel("speed-up over torch.nn.functional (×, log)")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="#2b6cb0", label="forward"), Patch(color="#dd6b20", label="backward")],
               loc="upper right", fontsize=8)
    eb = ("error bars: torch q1/normref q3 to torch q3/normref q1 over the repetitions" if err is not None
          else "no spread in this JSON: medians only")
    env = bench.get("environment", {})
    where = (f"{env.get('cpu_model', '?')}, {env.get('cpus_usable', bench.get('cpu_count', '?'))} CPUs, load average "
             f"{env['load_average_1min']:.1f} when measured" if env.get("load_average_1min") is not None else "")
    fig.suptitle(f"normref (numba kernels, NumPy float32) vs PyTorch CPU: median time ratio; {eb}\n{label}"
                 + (f"\n{where}" if where else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"rows": len(rows), "methods": methods, "error_bars": err is not None}


def fig_heatmap(rep: dict, path: Path) -> None:
    """Method × (library, dtype): the largest error/tolerance of the cell's checks, log colours."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    cl = cells(rep)
    keys = [k for k in column_keys(rep) if any(k in c for c in cl.values())]
    names = sorted(cl)
    a = np.full((len(names), len(keys)), np.nan)
    for i, m in enumerate(names):
        for j, k in enumerate(keys):
            if k in cl[m]:
                a[i, j] = cl[m][k][2]
    finite = np.where(np.isfinite(a), np.clip(a, 1e-4, 1e2), np.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(keys), 1.2 + 0.26 * len(names)))
    im = ax.imshow(finite, cmap="viridis", norm=LogNorm(1e-4, 1e2), aspect="auto")
    for i in range(len(names)):
        for j in range(len(keys)):
            v = a[i, j]
            if np.isnan(v):
                continue
            if not np.isfinite(v):
                ax.text(j, i, "ERR", ha="center", va="center", fontsize=6, color="red")
            elif v >= 1:
                ax.text(j, i, "✗", ha="center", va="center", fontsize=8, color="red")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{c} {d}" for c, d in keys], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    cb = fig.colorbar(im, ax=ax, shrink=0.6)
    cb.set_label("largest error / tolerance (below 1 passes; clipped to [1e-4, 1e2])", fontsize=8)
    summary = rep.get("summary", "")
    ax.set_title(f"{rep['meta'].get('docs_command', 'normref conformance')}\n"
                 + "\n".join(textwrap.wrap(summary.split(": ", 1)[-1], 80)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# executed examples


def _short(v) -> str:
    if isinstance(v, np.ndarray):
        return f"array {v.shape} {v.dtype}"
    return repr(v)


def example_session(name: str) -> list:
    """The doctest lines of a method's example, executed here: [(source, printed output)]."""
    import normref

    m = normref.get(name)
    if m.examples is None:
        return []
    exs = list(m.examples(np.random.default_rng(0)))
    if not exs:
        return []
    def n_arrays(e):
        return sum(isinstance(a, np.ndarray) for a in list(e.args) + list(e.kwargs.values()))

    index = max(range(len(exs)), key=lambda i: (n_arrays(exs[i]), -i))  # the most array arguments, then the first
    ex = exs[index]
    bound = m.signature.bind(*ex.args, **ex.kwargs)
    params = list(m.signature.parameters)
    pos_names = params[: len(ex.args)]
    fn = f"normref.{name}" if getattr(normref, name, None) is m else f"normref.get({name!r})"
    lines = [
        "import numpy as np",
        "import normref",
        f"ex = list(normref.get({name!r}).examples(np.random.default_rng(0)))[{index}]",
        "ex.label",
    ]
    if pos_names:
        lines.append(f"{', '.join(pos_names)}{',' if len(pos_names) == 1 else ''} = ex.args")
    call_args = list(pos_names)
    for k, v in ex.kwargs.items():
        if isinstance(v, np.ndarray):
            lines.append(f"{k} = ex.kwargs[{k!r}]")
            call_args.append(f"{k}={k}")
        else:
            call_args.append(f"{k}={v!r}")
    arrays = [p for p in bound.arguments if isinstance(bound.arguments[p], np.ndarray)]
    if arrays:
        lines.append("[(a, v.shape) for a, v in (" + ", ".join(f"({p!r}, {p})" for p in arrays) + ",)]")
    call = f"{fn}({', '.join(call_args)})"
    lines += [
        f"out, pullback = normref.vjp({fn}, {', '.join(call_args)})",
        "type(out).__name__",
        f"y = normref.get({name!r}).primary(out)",
        "y.shape, y.dtype",
        "np.round(y.reshape(-1)[:4], 4)",
        "grads = pullback(np.ones_like(y))",
        f"dict(zip(normref.get({name!r}).array_params, (None if g is None else g.shape for g in grads)))",
        f"bool(np.array_equal(normref.get({name!r}).primary({call}), y))",
    ]
    ns: dict = {}
    session = []
    for src in lines:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), np.errstate(all="ignore"):
            exec(compile(src, f"<{name} example>", "single"), ns)
        session.append((src, buf.getvalue()))
    return session


def _doctest_block(session: list) -> str:
    out = [".. doctest::", ""]
    for src, printed in session:
        out.append("   >>> " + src)
        for ln in printed.rstrip("\n").splitlines():
            out.append("   " + (ln if ln.strip() else "<BLANKLINE>"))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# pages


def _rst_text(s: str) -> str:
    """Plain text safe inside RST (inline markup characters escaped)."""
    for ch in ("\\", "*", "`", "|", "_"):
        s = s.replace(ch, "\\" + ch)
    return s


def _docstring_backward(doc: str) -> str | None:
    paras = [" ".join(p.split()) for p in textwrap.dedent(doc or "").split("\n\n")]
    for p in paras:
        i = p.find("Backward")
        if i >= 0:
            return p[i:]
    return None


def formulas(m) -> tuple[str, str]:
    fwd, bwd = FORMULAS.get(m.name, (None, None))
    if fwd is None:
        fwd = " ".join((m.__doc__ or "").strip().split("\n\n")[0].split())
    if bwd is None:
        bwd = _docstring_backward(m.__doc__ or "")
    fwd = fwd.replace("``", "")
    bwd = bwd.replace("``", "") if bwd else bwd
    if not bwd:
        _warn(f"normref docs: no backward formula for method {m.name!r}: add it to docs/_tables.py FORMULAS "
              f"(or a 'Backward: ...' paragraph to its docstring)")
        bwd = "(not documented)"
    return fwd, bwd


def _torch_exists(dotted: str) -> bool:
    try:
        import importlib

        parts = dotted.split(" ")[0].split(".")
        obj = importlib.import_module(parts[0])
        for p in parts[1:]:
            obj = getattr(obj, p)
        return True
    except Exception:
        return False


def _table(header: list, rows: list) -> str:
    out = [".. list-table::", "   :header-rows: 1", ""]
    for r in [header] + rows:
        out.append("   * - " + r[0])
        out += ["     - " + c for c in r[1:]]
    return "\n".join(out) + "\n"


def method_page(m, cl: dict, keys: list, rep: dict, auto_target: str) -> str:
    name = m.name
    fwd, bwd = formulas(m)
    sig = str(m.signature)
    state = [p for p in m.array_params if p in m.nondiff]
    diff = [p for p in m.array_params if p not in m.nondiff]
    title = f"``{name}``"
    parts = [f".. _method-{name}:", "", title, "=" * len(title), ""]
    parts += [
        f":Category: {m.category}",
        f":Survey: {_rst_text(m.survey or '—')}",
        f":Paper: {_rst_text(m.paper or '—')}",
        f":Differentiable arrays: {', '.join(f'``{p}``' for p in diff) or '—'}",
        f":State (no gradient): {', '.join(f'``{p}``' for p in state) or '—'}",
        "",
        ".. code-block:: text",
        "",
        f"   {name}{sig}",
        "",
        "Forward",
        "-------",
        "",
        ".. code-block:: text",
        "",
        *("   " + ln for ln in textwrap.wrap(fwd, 100)),
        "",
        "Backward (analytic, what the code computes)",
        "-------------------------------------------",
        "",
        ".. code-block:: text",
        "",
        *("   " + ln for ln in textwrap.wrap(bwd, 100)),
        "",
        f"``normref.get({name!r}).backward(residuals, cotangent)`` returns one gradient per array parameter "
        f"({', '.join(f'``{p}``' for p in m.array_params)}), ``None`` for state and absent arguments.",
        "",
        "Conventions and their arguments",
        "-------------------------------",
        "",
    ]
    rows = []
    for p in m.signature.parameters.values():
        if p.name in m.array_params:
            continue
        d = "required" if p.default is inspect.Parameter.empty else f"``{p.default!r}``"
        kind = "keyword-only" if p.kind is p.KEYWORD_ONLY else "positional or keyword"
        rows.append([f"``{p.name}``", d, kind])
    if rows:
        parts.append(_table(["argument", "default", "kind"], rows))
        parts.append("What each argument means, and where normref follows torch, the paper or the authors' "
                     "code, is in the docstring below.\n")
    else:
        parts.append("No options: every argument is an array. The conventions are in the docstring below.\n")
    eq = EQUIVALENTS.get(name, (None,) * 4)
    cells_eq = []
    for fw, val in zip(FRAMEWORKS, eq):
        if val is None:
            cells_eq.append("none")
            continue
        if fw == "PyTorch" and not _torch_exists(val):
            _warn(f"normref docs: {name}: the torch equivalent {val!r} does not exist in the installed torch")
        cells_eq.append(f"``{val.split(' (')[0]}``" + (f" ({val.split(' (', 1)[1]}" if " (" in val else ""))
    parts += ["Equivalents in other frameworks", "-------------------------------", "",
              _table(list(FRAMEWORKS), [cells_eq]),
              "PyTorch names are checked against the installed torch when the site is built; the JAX-ecosystem "
              "names (jax, optax, flax.nnx, equinox.nn) are those libraries' public API, not imported here. "
              "\"none\": the framework has no such function or layer. normref's own "
              f"adapters: ``normref.backends.torch.{name}`` (a ``torch.autograd.Function``) and "
              f"``normref.backends.jax.{name}`` (a ``jax.custom_vjp``), both running this backward.", ""]
    parts += ["Executed example", "----------------", "",
              "Run when this page was built, on the registry's example with the most array arguments (the "
              "``doctest`` builder runs it again and compares the output):", ""]
    session = example_session(name)
    parts.append(_doctest_block(session) if session else "This method registers no examples.\n")
    parts += ["Conformance", "-----------", ""]
    mc = cl.get(name)
    if not mc:
        parts.append("Not in the conformance report of this build.\n")
    else:
        rows = []
        for k in keys:
            if k not in mc:
                continue
            n, failed, worst, rec = mc[k]
            verdict = "✓" if failed == 0 else f"✗ {failed} failed"
            wr = "error" if worst == float("inf") else f"{worst:.3g}"
            rows.append([k[0], k[1], str(n), verdict, wr, _rst_text(f"{rec['check']} [{rec['example']}] {rec['label']}")])
        parts.append(f"``{rep['meta'].get('docs_command', 'normref conformance --quick')}`` (seed "
                     f"{rep['meta'].get('seed', 0)}): per library and dtype, the number of checks, the verdict and "
                     "the largest error/tolerance (below 1 passes) with the check that reached it.\n")
        parts.append(_table(["library", "dtype", "checks", "verdict", "worst error/tol", "worst check"], rows))
    parts += ["API", "---", "", f".. autofunction:: {auto_target}", ""]
    return "\n".join(parts)


def methods_index(ms: list, cl: dict) -> str:
    parts = [".. _methods:", "", "Methods", "=======", "",
             f"One page per registered method ({len(ms)}, from ``normref.methods()``): forward and backward "
             "formulas, survey section and paper, arguments, the equivalents in PyTorch, JAX, Flax and "
             "Equinox, an executed example and the method's conformance result.", ""]
    for cat, title in CATEGORIES + (("other", "Other"),):
        sub = [m for m in ms if (m.category == cat) or (cat == "other" and m.category not in dict(CATEGORIES))]
        if not sub:
            continue
        parts += [title, "-" * len(title), ""]
        rows = []
        for m in sub:
            mc = cl.get(m.name, {})
            failed = sum(c[1] for c in mc.values())
            n = sum(c[0] for c in mc.values())
            verdict = "—" if not n else ("✓ " if not failed else f"✗ {failed} of ") + f"{n} checks"
            rows.append([f":ref:`{m.name} <method-{m.name}>`", _rst_text(m.survey or "—"), _rst_text(m.paper or "—"),
                         verdict])
        parts.append(_table(["method", "survey", "paper", "conformance"], rows))
    parts += [".. toctree::", "   :hidden:", ""] + [f"   {m.name}" for m in ms] + [""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------


def generate(log=print) -> list:
    """Write everything; returns the warnings (the caller turns them into Sphinx warnings)."""
    import normref

    _warnings.clear()
    GEN_DIR.mkdir(exist_ok=True)
    METHODS_DIR.mkdir(exist_ok=True)
    stamp = _stamp()
    ms = normref.methods()
    expected = {f"{m.name}.rst" for m in ms} | {"index.rst"}
    t0 = time.perf_counter()
    for p in METHODS_DIR.glob("*.rst"):
        if p.name not in expected:
            p.unlink()
    rep = None if os.environ.get("NORMREF_DOCS_CONFORMANCE") else _cached("conformance", stamp)
    if rep is None or set(rep.get("methods", ())) != {m.name for m in ms}:
        rep = conformance_report(log)
        if not os.environ.get("NORMREF_DOCS_CONFORMANCE"):
            _store("conformance", stamp, rep)
    else:
        log("normref docs: the conformance report of this code is cached")
    cached = None if os.environ.get("NORMREF_DOCS_BENCH") else _cached("bench", stamp)
    if cached is None:
        bench, label = bench_report(log)
        if not os.environ.get("NORMREF_DOCS_BENCH"):
            _store("bench", stamp, [bench, label])
    else:
        bench, label = cached
    fig_partitions(GEN_DIR / "partitions.png")
    fig_whitening(GEN_DIR / "whitening.png")
    info = fig_bench(bench, label, GEN_DIR / "bench.png")
    fig_heatmap(rep, GEN_DIR / "conformance.png")
    (GEN_DIR / "bench_info.json").write_text(json.dumps({"label": label, **info, "cpu_count": bench.get("cpu_count"),
                                                         "quick": bench.get("quick")}))
    (GEN_DIR / "conformance_summary.txt").write_text(rep.get("summary", "") + "\n")
    cl = cells(rep)
    keys = column_keys(rep)
    for m in ms:
        target = f"normref.{m.name}" if getattr(normref, m.name, None) is m else f"{m.__module__}.{m.__name__}"
        text = method_page(m, cl, keys, rep, target)
        p = METHODS_DIR / f"{m.name}.rst"
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
    (METHODS_DIR / "index.rst").write_text(methods_index(ms, cl))
    log(f"normref docs: {len(ms)} method pages and 4 figures in {time.perf_counter() - t0:.0f} s")
    return list(_warnings)


if __name__ == "__main__":
    for w in generate():
        print("WARNING:", w)
