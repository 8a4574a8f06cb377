"""Benchmark of synchronized batch statistics: one step on gloo ranks against the local step.

    normref bench sync [--shape 32 64 16 16] [--group-size 16] [--world-size 2] [--repeat 10]
    python -m normref.conformance.bench_sync ...          (the same)

``world_size`` CPU processes (gloo on 127.0.0.1, spawned here and stopped after ``--timeout``
seconds at most) each hold a per-rank batch of ``--shape`` and time one training step, forward and
backward (``y = layer(x); y.backward(g)``), of

- ``nt.BatchNorm2d(C)``: local statistics against ``process_group=nt.WORLD`` (one all-gather of
  2C + 1 values in the forward, one all-reduce of 2C in the backward);
- ``nt.IterNorm2d(C, group_size=d)`` (batch whitening, Huang et al. 2019): local against
  synchronized (the forward gathers the count, the d means and the d(d+1)/2 upper triangle of the
  centred cross-products per group; the backward all-reduces its d×d sums).

The values sent per step are read from the layer's reducer (``values_sent``, each rank's own
contribution to the collectives) and reported in bytes (× the dtype's itemsize), with the number of
collectives per step. With ``--out DIR`` the table is also written to ``DIR/bench_sync.json`` with
the environment (CPU model, versions, UTC timestamp). Each timing is the best (minimum) of ``--repeat`` steps after a warm-up, all
ranks starting each step together (a barrier, not timed); rank 0's figures are printed (every rank
runs the same work). The synchronized time includes the collectives' latency, which on one machine
is the loopback TCP round trips of gloo. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import time
from typing import Any

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normref bench sync", description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs="+", default=[32, 64, 16, 16], metavar="N",
                   help="per-rank input shape (N, C, H, W) (default 32 64 16 16)")
    p.add_argument("--group-size", type=int, default=16, help="IterNorm's whitening group size d (default 16)")
    p.add_argument("--world-size", type=int, default=2, help="gloo processes (default 2)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeat", type=int, default=10, help="timed steps per layer (best of; default 10)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are stopped")
    p.add_argument("--quick", action="store_true", help="a small shape and 3 repeats (a smoke run)")
    p.add_argument("--out", default=None, help="a folder to write bench_sync.json to (default: none)")
    return p


def _layers(nt, c: int, d: int, dtype, pg) -> list:
    return [
        (f"BatchNorm2d({c})", nt.BatchNorm2d(c, dtype=dtype, process_group=pg)),
        (f"IterNorm2d({c}, group_size={d})", nt.IterNorm2d(c, group_size=d, dtype=dtype, process_group=pg)),
    ]


def _worker(rank: int, world_size: int, port: int, shape: tuple, d: int, dtype_name: str, repeat: int,
            timeout: float, queue: Any) -> None:
    try:
        import torch
        import torch.distributed as dist

        from normref.backends import torch as nt

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's data connections on loopback too
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(rank)
            x = torch.randn(shape, dtype=dtype).requires_grad_(True)
            g = torch.randn(shape, dtype=dtype)
            c = shape[1]
            rows = []
            for (name, local), (_, synced) in zip(_layers(nt, c, d, dtype, None), _layers(nt, c, d, dtype, nt.WORLD)):
                times = {}
                for kind, layer in (("local", local), ("sync", synced)):
                    layer.train()
                    best = float("inf")
                    for i in range(repeat + 1):  # step 0 is the warm-up
                        dist.barrier()
                        t0 = time.perf_counter()
                        layer(x).backward(g)
                        dt = time.perf_counter() - t0
                        x.grad = None
                        if i:
                            best = min(best, dt)
                    times[kind] = best
                r = synced.reducer
                steps = repeat + 1
                rows.append({
                    "layer": name,
                    "local_s": times["local"],
                    "sync_s": times["sync"],
                    "values_per_step": r.values_sent / steps,
                    "bytes_per_step": r.bytes_sent / steps,  # each value in the dtype it travels in
                    "collectives_per_step": r.calls / steps,
                })
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", rows))
    except BaseException:  # noqa: BLE001 - reported by the parent
        import traceback

        queue.put((rank, "err", traceback.format_exc()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(shape=(32, 64, 16, 16), group_size: int = 16, world_size: int = 2, dtype: str = "float32",
        repeat: int = 10, timeout: float = 300.0) -> list[dict]:
    """Rank 0's rows (one per layer): local and synchronized step times (s), values / bytes /
    collectives per step. Spawns ``world_size`` gloo processes, stopped after ``timeout`` seconds."""
    import multiprocessing as mp
    import queue as queue_mod

    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[1] % group_size:
        raise ValueError(f"normref bench sync: shape must be (N, C, H, W) with C divisible by group_size "
                         f"{group_size}; got {shape}")
    if not (2 <= world_size <= 8):
        raise ValueError(f"normref bench sync: world_size must be in 2..8; got {world_size}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})  # single-threaded ranks: no oversubscription
    try:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, shape, group_size, dtype, repeat, timeout, q),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"normref bench sync: the ranks did not finish in {timeout:.0f} s")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
                    raise RuntimeError("normref bench sync: a rank died") from None
                continue
            if status != "ok":
                raise RuntimeError(f"normref bench sync: rank {rank} raised:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=3.0)
    return results[0]


def main(argv=None) -> list[dict]:
    args = _parser().parse_args(argv)
    shape = [8, 16, 4, 4] if args.quick else args.shape
    d = min(args.group_size, shape[1]) if args.quick else args.group_size
    repeat = 3 if args.quick else args.repeat
    rows = run(shape, d, args.world_size, args.dtype, repeat, args.timeout)
    print(f"normref bench sync: {args.world_size} gloo processes on 127.0.0.1, per-rank input {tuple(shape)} "
          f"{args.dtype}, one training step (forward + backward), best of {repeat}")
    head = f"{'layer':<30} {'local ms':>9} {'sync ms':>9} {'ratio':>6} {'values/step':>12} {'bytes/step':>11} {'collectives':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['layer']:<30} {1e3 * r['local_s']:>9.3f} {1e3 * r['sync_s']:>9.3f} "
              f"{r['sync_s'] / r['local_s']:>6.2f} {r['values_per_step']:>12.0f} {r['bytes_per_step']:>11.0f} "
              f"{r['collectives_per_step']:>11.0f}")
    print("values/step: what each rank contributes to the collectives (forward all-gather + backward all-reduce)")
    if args.out is None:
        return rows
    import json
    from pathlib import Path

    from .bench_timing import environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment(1), "world_size": args.world_size, "shape": list(shape), "group_size": d,
           "dtype": args.dtype, "repeat": repeat, "timing": "rank 0's best (minimum) step of 'repeat' after a "
           "warm-up, seconds; each rank single-threaded", "rows": rows}
    (out / "bench_sync.json").write_text(json.dumps(doc, indent=1, default=float))
    print(f"wrote {out / 'bench_sync.json'}")
    return rows


if __name__ == "__main__":  # pragma: no cover
    main()
