"""The ``normref`` command (also ``python -m normref``): ``normref conformance`` and ``normref bench``.

    normref --version
    normref conformance                      # every method × every library × every dtype
    normref conformance --quick              # one or two examples per method (under a minute)
    normref conformance --method group_norm --backend torch --dtype float32 -v
    normref conformance --json report.json   # one record per check, with the seed to replay it
    normref conformance --junit-xml conformance.xml   # for CI test reporters
    normref bench --quick                    # the standardization benchmark (bench, sync, whitening)
    normref bench --sections kernels,adapter,network,scaling,overhead,first-call --max-bytes 64M
    normref bench --compare old.json [--against new.json]   # new/old ratios of every timing
    normref bench whitening --quick          # writes bench-out/bench_whitening.json too

Exit status of ``normref conformance``: 0 when every check passes, 1 on any failure, 2 on a usage
error (an unknown method, library or dtype, or a library named with ``--backend`` that is not
available here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

__all__ = ["main", "conformance_main"]

EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process stopped by SIGPIPE (``| head``)


def _broken_pipe() -> None:
    raise BrokenPipeError


def _split(values) -> list | None:
    if not values:
        return None
    out: list = []
    for v in values:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def _version() -> str:
    import normref

    return normref.__version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normref conformance",
        description="Check every registered normref method on every installed array library and dtype: "
        "against a float64 NumPy evaluation, against each other, against finite differences, against "
        "the registry's invariants and (PyTorch, JAX) against autograd, to first and second order.",
        epilog="Exit status: 0 when every check passes, 1 on any failure, 2 on a usage error (an unknown "
        "method, library or dtype, or a library named with --backend that is not available here).",
    )
    p.add_argument("--method", "-m", action="append", metavar="NAME",
                   help="only these methods (repeat or comma-separate); default: every registered method")
    p.add_argument("--backend", "-b", action="append", metavar="NAME",
                   help="only these array libraries (numpy, numpy-reference, torch, jax, array_api_strict, "
                   "dask, cupy, torch-cuda); default: all, the missing ones listed as skipped below the table")
    p.add_argument("--dtype", "-d", action="append", metavar="NAME",
                   help="only these dtypes (float64, float32, float16, bfloat16); default: all a library has")
    p.add_argument("--quick", action="store_true",
                   help="per method the example passing the most arrays, plus the fewest more "
                   "that cover its invariants; autograd in float64 only, JAX in float64 only "
                   "(under a minute on two cores)")
    p.add_argument("--json", metavar="PATH", help="write the machine-readable report (one record per check)")
    p.add_argument("--junit-xml", metavar="PATH", dest="junit_xml",
                   help="write a JUnit XML report (one test case per check) for CI test reporters")
    p.add_argument("--seed", type=int, default=0, help="seed of every random input (default 0)")
    p.add_argument("--verbose", "-v", action="store_true", help="print every check with its error and tolerance")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--width", type=int, default=None, metavar="COLUMNS",
                   help="width of the table (default: the terminal's, 100 when the output is not a terminal)")
    return p


def conformance_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    import normref  # noqa: F401  (registers every method)

    from .suite import count_cases, resolve, run

    methods, backends, dtypes = _split(args.method), _split(args.backend), _split(args.dtype)
    try:
        _, _, missing, _ = resolve(methods, backends, dtypes)
    except (ValueError, TypeError) as e:
        print(f"normref conformance: {e}", file=sys.stderr)
        return 2
    if backends is not None and missing:
        # a library asked for by name and not there is an error, not a silently empty run
        for name, why in missing:
            print(f"normref conformance: --backend {name} is not available here: {why}", file=sys.stderr)
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
    # reports first (a CI job keeps them even when the terminal output is cut short)
    if args.json:
        report.to_json(args.json)
    if args.junit_xml:
        from .junit import write_junit_xml

        write_junit_xml(report, args.junit_xml)
    if Console is not None:
        width = args.width or (None if sys.stdout.isatty() else 100)
        con = Console(width=width)
        con.on_broken_pipe = _broken_pipe  # rich would exit 1 (a failed check's status); main() says 141
        report.render(con, verbose=args.verbose)
    else:
        print(report.plain_text(args.verbose))
    for what, path in (("report", args.json), ("JUnit XML report", args.junit_xml)):
        if path:
            print(f"{what} written to {path}")
    return 0 if report.ok else 1


# --------------------------------------------------------------------------------------------------
# normref bench: three benchmarks


BENCHES = {
    "": ("bench", "the standardization family (batch, instance, group, layer, RMS) against PyTorch CPU "
                  "and this machine's memory bandwidth: kernels, the torch adapter's layers, a network's "
                  "training step, scaling to 512 MiB, per-call overhead, first calls"),
    "sync": ("bench_sync", "synchronized batch statistics on gloo processes against the local step"),
    "whitening": ("bench_whitening", "batch whitening: where the time goes, against this machine's matmul speed"),
}


def _bench_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    which = argv[0] if argv and argv[0] in BENCHES else ""
    rest = argv[1:] if which else argv
    import importlib

    mod = importlib.import_module(f".{BENCHES[which][0]}", __package__)
    try:
        rc = mod.main(rest)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    except ImportError as e:  # an optional library the benchmark cannot do without (torch, numba)
        print(f"normref bench{' ' + which if which else ''}: needs {e.name or e}: "
              f"pip install 'normref[bench]'", file=sys.stderr)
        return 2
    return int(rc) if isinstance(rc, int) else 0


# --------------------------------------------------------------------------------------------------
# normref


COMMANDS = {
    "conformance": "check every method on every array library and dtype",
    "bench": "benchmarks: normref bench, normref bench sync, normref bench whitening",
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normref",
        description="normref: reference normalization math with analytic backward passes, on any Python "
        "array API library.",
        epilog="Each command has its own --help (normref conformance --help, normref bench whitening --help). "
        "python -m normref is the same command.",
    )
    p.add_argument("--version", action="version", version=f"normref {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # each command parses its own options
    return p


def _dispatch(argv: list) -> int:
    if argv and argv[0] == "conformance":
        try:
            return conformance_main(argv[1:])
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            return int(e.code or 0)
    if argv and argv[0] == "bench":
        return _bench_main(argv[1:])
    p = _top_parser()
    if not argv:
        p.print_help()
        return 2
    try:
        p.parse_args(argv)  # --help, --version, or an unknown command (a usage error)
    except SystemExit as e:
        return int(e.code or 0)
    p.print_help()
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normref`` console script, ``python -m normref`` and ``python -m normref.conformance``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = _dispatch(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (normref conformance | head): stop quietly; point stdout at /dev/null
        # so that the interpreter's final flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
