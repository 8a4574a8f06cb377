"""Data-parallel training with normref's synchronized batch statistics: torch DDP on 2 gloo processes.

    python examples/torch_ddp.py [--steps 8] [--world-size 2]

A small conv net with normref's synchronized ``BatchNorm2d`` and ``IterNorm2d`` (batch whitening by
Newton's iterations, Huang et al., CVPR 2019), float64, trained for a few SGD steps with
``torch.nn.parallel.DistributedDataParallel`` on ``world_size`` CPU processes (gloo on 127.0.0.1).
The batch of 24 images is split unevenly across the ranks (13 + 11 on 2 ranks): each layer's
statistics are the whole batch's (``process_group=nt.WORLD``: one all-gather of the per-rank counts,
means and centred sums of squares, combined as in Chan et al., and one all-reduce in the backward),
so the DDP run is the same computation as one process on the full batch. The script runs both and
prints the two loss curves and their largest difference (rounding only: ~1e-16 relative).

Each rank's loss is scaled by world_size · n_rank / N, so that DDP's gradient average over ranks is the
gradient of the full batch's mean loss.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn

from normref.backends import torch as nt

DT = torch.float64
N, C_IN, H = 24, 3, 6


def model(process_group=None) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in the single-process run
    return nn.Sequential(
        nn.Conv2d(C_IN, 8, 3, padding=1), nt.BatchNorm2d(8, process_group=process_group), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nt.IterNorm2d(8, group_size=4, process_group=process_group), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).to(DT)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C_IN, H, H, generator=g, dtype=DT)
    y = torch.randint(0, 3, (N,), generator=g)
    return x, y


def split(world_size: int) -> list[int]:
    """Uneven per-rank batch sizes summing to N (rank r gets one more than rank r+1, roughly)."""
    base = [N // world_size + (1 if r < N % world_size else 0) for r in range(world_size)]
    if world_size > 1:  # make it uneven even when N divides: move one sample from the last rank to the first
        base[0] += 1
        base[-1] -= 1
    return base


def train_single(steps: int) -> tuple[list[float], nn.Module]:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, net


def _worker(rank: int, world_size: int, port: int, steps: int, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's data connections on loopback too
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        net = nn.parallel.DistributedDataParallel(model(nt.WORLD))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        x, y = data()
        sizes = split(world_size)
        lo = sum(sizes[:rank])
        xr, yr = x[lo : lo + sizes[rank]], y[lo : lo + sizes[rank]]
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            total = nn.functional.cross_entropy(net(xr), yr, reduction="sum")  # Σ over this rank's samples
            (total * (world_size / N)).backward()  # DDP averages over ranks: the full batch's mean loss
            opt.step()
            loss = total.detach().clone()
            dist.all_reduce(loss)  # the full batch's Σ, for printing
            losses.append(loss.item() / N)
        if rank == 0:
            # as NumPy: a tensor would travel as a shared-memory handle that dies with this process
            bufs = {k: v.detach().numpy().copy() for k, v in net.module.state_dict().items()}
            queue.put((losses, bufs))
        # every rank done with its collectives before any tears gloo down: a rank that destroys the
        # group while a peer's connection is still live can abort at exit ("terminate called ...")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_ddp(steps: int, world_size: int, timeout: float = 120.0) -> tuple[list[float], dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(world_size, _free_port(), steps, queue), nprocs=world_size,
                               join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    result = None
    try:
        while True:
            if result is None and not queue.empty():  # read as it comes (a full pipe would block rank 0)
                result = queue.get()
            if procs.join(timeout=0.5):
                break
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"torch_ddp: the {world_size} processes did not finish in {timeout:.0f} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    return result if result is not None else queue.get()


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--world-size", type=int, default=2)
    a = ap.parse_args(argv)
    ddp, ddp_state = train_ddp(a.steps, a.world_size)
    single, net = train_single(a.steps)
    print(f"DDP on {a.world_size} gloo processes (per-rank batches {split(a.world_size)}) vs one process "
          f"on the full batch of {N}, float64")
    print(f"{'step':>4}  {'loss (DDP)':>22}  {'loss (one process)':>22}  {'|difference|':>12}")
    worst = 0.0
    for i, (l1, l2) in enumerate(zip(ddp, single)):
        worst = max(worst, abs(l1 - l2))
        print(f"{i:>4}  {l1:>22.17f}  {l2:>22.17f}  {abs(l1 - l2):>12.1e}")
    state = net.state_dict()
    # parameters and running statistics (BatchNorm2d's mean/var, IterNorm's mean/covariance) after training
    rel = max(
        float((torch.from_numpy(ddp_state[k]) - v).abs().max() / v.abs().max().clamp_min(1e-300))
        for k, v in state.items() if v.is_floating_point()
    )
    print(f"max |loss difference|: {worst:.1e}")
    print(f"max relative difference of the final parameters and running statistics: {rel:.1e}")
    return max(worst, rel)


if __name__ == "__main__":
    main()
    sys.exit(0)
