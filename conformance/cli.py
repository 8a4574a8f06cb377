"""The ``normref`` command: ``normref conformance`` (the suite) and ``normref bench``.

    normref conformance                      # every method × every library × every dtype
    normref conformance --quick              # one or two examples per method (under a minute)
    normref conformance --method group_norm --backend torch --dtype float32 -v
    normref conformance --json report.json   # one record per check, with the seed to replay it

Exit status: 0 when every check passes, 1 on any failure, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

__all__ = ["main", "conformance_main"]


def _split(values) -> list | None:
    if not values:
        return None
    out: list = []
    for v in values:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normref conformance",
        description="Check every registered normref method on every installed array library and dtype: "
        "against a float64 NumPy evaluation, against each other, against finite differences, against "
        "the registry's invariants and (PyTorch, JAX) against autograd, to first and second order.",
    )
    p.add_argument("--method", "-m", action="append", metavar="NAME",
                   help="only these methods (repeat or comma-separate); default: every registered method")
    p.add_argument("--backend", "-b", action="append", metavar="NAME",
                   help="only these array libraries (numpy, numpy-reference, torch, jax, array_api_strict, "
                   "cupy, torch-cuda); default: all, the missing ones listed as skipped")
    p.add_argument("--dtype", "-d", action="append", metavar="NAME",
                   help="only these dtypes (float64, float32, float16, bfloat16); default: all a library has")
    p.add_argument("--quick", action="store_true",
                   help="per method the example passing the most arrays, plus the fewest more "
                   "that cover its invariants; autograd in float64 only, JAX in float64 only "
                   "(under a minute on two cores)")
    p.add_argument("--json", metavar="PATH", help="write the machine-readable report (one record per check)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random input (default 0)")
    p.add_argument("--verbose", "-v", action="store_true", help="print every check with its error and tolerance")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    return p


def conformance_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    import normref  # noqa: F401  (registers every method)

    from .suite import count_cases, resolve, run

    methods, backends, dtypes = _split(args.method), _split(args.backend), _split(args.dtype)
    try:
        resolve(methods, backends, dtypes)
    except (ValueError, TypeError) as e:
        print(f"normref conformance: {e}", file=sys.stderr)
        return 2
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # rich is the optional 'cli' extra
        Console = None
    t0 = time.perf_counter()
    if Console is not None and not args.no_progress:
        err = Console(stderr=True)
        total = count_cases(methods, args.quick, args.seed)
        with Progress(TextColumn("[bold]conformance"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=err, transient=True) as prog:
            task = prog.add_task("", total=total)
            state = {"started": False}

            def progress(desc: str) -> None:
                if state["started"]:
                    prog.advance(task)
                state["started"] = True
                prog.update(task, description=desc)

            report = run(methods, backends, dtypes, quick=args.quick, seed=args.seed, progress=progress)
            prog.advance(task)
    else:
        report = run(methods, backends, dtypes, quick=args.quick, seed=args.seed)
    report.meta["seconds"] = time.perf_counter() - t0
    report.meta["command"] = "normref conformance " + " ".join(argv if argv is not None else sys.argv[2:])
    if Console is not None:
        # a pipe or a CI log gets a wide page instead of rich's 80 columns
        report.render(Console(width=None if sys.stdout.isatty() else 180), verbose=args.verbose)
    else:
        print(report.plain_text(args.verbose))
    if args.json:
        report.to_json(args.json)
        print(f"report written to {args.json}")
    return 0 if report.ok else 1


def _bench_main(argv: Sequence[str]) -> int:
    if list(argv[:1]) == ["sync"]:  # normref bench sync: issue 12's synchronized-statistics benchmark
        from . import bench_sync

        try:
            bench_sync.main(list(argv[1:]))
        except SystemExit as e:  # argparse: --help or a usage error
            return int(e.code or 0)
        return 0
    if list(argv[:1]) == ["whitening"]:  # normref bench whitening: issue 3's benchmark
        from . import bench_whitening

        try:
            bench_whitening.main(list(argv[1:]))
        except SystemExit as e:  # argparse: --help or a usage error
            return int(e.code or 0)
        return 0
    try:
        from . import bench
    except ImportError as e:
        if "bench" not in str(e):
            raise
        print("normref bench: the benchmark suite (normref.conformance.bench) is not installed in this "
              "version of normref", file=sys.stderr)
        return 2
    try:
        rc = bench.main(list(argv))
    except SystemExit as e:  # argparse inside bench: --help or a usage error
        rc = e.code
    return int(rc or 0)


USAGE = """usage: normref {conformance,bench} [options]

  conformance   check every method on every array library and dtype (normref conformance --help)
  bench         benchmarks (normref bench --help; normref bench whitening --help;
                normref bench sync --help)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normref`` console script (and ``python -m normref.conformance``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "conformance":
        try:
            return conformance_main(rest)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            return int(e.code or 0)
    if cmd == "bench":
        return _bench_main(rest)
    print(f"normref: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
