"""Multi-process harness for the synchronized-statistics tests (issue 12): real torch.distributed.

``run_ranks(fn, world_size, *args, timeout=...)`` spawns ``world_size`` fresh Python processes, each
joins one gloo process group on 127.0.0.1 (a free port, ``init_method="tcp://127.0.0.1:PORT"``) and
calls ``fn(rank, world_size, *args)``; ``fn`` must be a picklable top-level function (defined at
module level in an importable module, e.g. ``tests.test_sync``) and return a dict of NumPy arrays
(or anything picklable). The test process gets the list of the ranks' dicts, in rank order.

Bounded and self-stopping: every child gets a hard deadline (``timeout`` seconds for the whole run,
also the process group's own collective timeout); on a timeout, an exception in any rank, or a
child that dies, the remaining children are terminated (then killed) and the call raises
``AssertionError`` with the rank's traceback. Starting a process costs a torch import (a few
seconds), so one spawn should run many checks: let ``fn`` loop over cases and return them all.

The children run single-threaded (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``, numba's
``NUMBA_NUM_THREADS=1``) so that W ranks on a small CI machine do not oversubscribe the cores.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

__all__ = ["run_ranks", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable, rank: int, world_size: int, port: int, timeout: float, args: tuple, q: Any) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=max(5.0, timeout)),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover - teardown of a broken group
                pass
        q.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - everything goes back to the test process
        q.put((rank, "err", traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; the ranks' results, in order."""
    if not (1 <= int(world_size) <= 8):
        raise ValueError(f"run_ranks: world_size must be in 1..8 (bounded), got {world_size}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    env_saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    # the children inherit the environment at spawn: single-threaded ranks
    for k in env_saved:
        os.environ[k] = "1"
    os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")
    procs = []
    try:
        for r in range(world_size):
            p = ctx.Process(target=_child, args=(fn, r, world_size, port, timeout, args, q), daemon=True)
            p.start()
            procs.append(p)
    finally:
        for k, v in env_saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    error = None
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                error = f"run_ranks: timed out after {timeout:.0f} s; ranks done: {sorted(results)}"
                break
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in results and p.exitcode != 0]
                if dead:
                    # a child died without reporting (segfault, os._exit): drain once more, then fail
                    try:
                        rank, status, payload = q.get(timeout=2.0)
                    except queue.Empty:
                        error = f"run_ranks: rank(s) {dead} died (exit codes {[procs[i].exitcode for i in dead]})"
                        break
                else:
                    continue
            if status != "ok":
                error = f"run_ranks: rank {rank} raised:\n{payload}"
                break
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5.0 if error is None else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=3.0)
            if p.is_alive():  # pragma: no cover - a child ignoring SIGTERM
                p.kill()
                p.join(timeout=3.0)
        q.close()
    if error is not None:
        raise AssertionError(error)
    return [results[r] for r in range(world_size)]
