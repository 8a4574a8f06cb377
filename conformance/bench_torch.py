"""``normref bench``'s PyTorch rows: the torch adapter's layers against torch's own, and a small network's training step.

How torch users meet normref is not the NumPy kernels but ``normref.backends.torch`` (``nt``):
``nt.BatchNorm2d`` and the other drop-in layers, subclasses of torch's with the same constructor
and state, whose forward and backward are normref's (an ``autograd.Function``). Two sections:

- ``adapter``: per layer and shape, NCHW and channels-last (``torch.channels_last`` input and
  gradient), the training-mode forward (autograd recording) and a forward + backward step
  (``y = layer(x)``; ``torch.autograd.grad(y, (x, weight, bias), g)``) of ``nt.<Layer>`` and of
  ``torch.nn.<Layer>``, built alike, interleaved; the ratio is normref's time over torch's (the
  median of the per-repetition ratios: < 1 means normref is faster), and each library's effective
  bandwidth, counting the minimum traffic of forward + backward (20 bytes per float32 element: the
  forward reads x and writes y, the backward reads x and dy and writes dx), as a fraction of the
  copy bandwidth measured in the same run;
- ``network``: one SGD training step (forward, cross-entropy, backward, ``optimizer.step()``) of a
  small conv + BN network (three 3×3 convolutions, each followed by BatchNorm2d and ReLU, global
  average pooling, a linear classifier) built twice with the same initial weights, once with
  ``torch.nn.BatchNorm2d`` and once with ``nt.BatchNorm2d``, NCHW and channels-last.

Both sections use :func:`normref.conformance.bench_timing.interleaved` and record each timing's
spread; both libraries allocate their outputs under the same allocator policy.
"""

from __future__ import annotations

from typing import Callable

from .bench_timing import interleaved, is_noisy, paired_ratio

__all__ = ["adapter_cases", "measure_adapter", "measure_network"]


def adapter_cases(size: str) -> list:
    """(layer name, constructor args, constructor kwargs, input shape, layouts) for ``size`` in
    ``"full"``, ``"quick"``, ``"smoke"``: the issue's benchmark shapes, and small shapes."""
    both = ("NCHW", "channels-last")
    if size == "smoke":
        return [("BatchNorm2d", (8,), {}, (2, 8, 4, 4), both),
                ("LayerNorm", (32,), {}, (16, 32), ("rows",))]
    if size == "quick":
        return [("BatchNorm2d", (16,), {}, (8, 16, 28, 28), both),
                ("InstanceNorm2d", (16,), {"affine": True}, (8, 16, 28, 28), ("NCHW",)),
                ("GroupNorm", (8, 16), {}, (8, 16, 28, 28), ("NCHW",)),
                ("LayerNorm", (256,), {}, (1024, 256), ("rows",)),
                ("RMSNorm", (256,), {}, (1024, 256), ("rows",)),
                ("BatchNorm2d", (64,), {}, (32, 64, 8, 8), ("NCHW",)),
                ("LayerNorm", (64,), {}, (32, 64), ("rows",))]
    big = (32, 64, 56, 56)
    return [("BatchNorm2d", (64,), {}, big, both),
            ("InstanceNorm2d", (64,), {"affine": True}, big, both),
            ("GroupNorm", (32, 64), {}, big, both),
            ("LayerNorm", (1024,), {}, (8192, 1024), ("rows",)),
            ("LayerNorm", (4096,), {}, (4096, 4096), ("rows",)),
            ("RMSNorm", (1024,), {}, (8192, 1024), ("rows",)),
            # small shapes: where the per-call cost of the Function wrapper shows
            ("BatchNorm1d", (64,), {}, (32, 64), ("rows",)),
            ("LayerNorm", (64,), {}, (32, 64), ("rows",)),
            ("BatchNorm2d", (64,), {}, (32, 64, 8, 8), ("NCHW",)),
            ("GroupNorm", (32, 64), {}, (32, 64, 8, 8), ("NCHW",))]


def _case_id(name, args, kwargs, shape, layout) -> str:
    a = ", ".join([*map(str, args), *(f"{k}={v}" for k, v in kwargs.items())])
    return f"{name}({a}) {'x'.join(map(str, shape))} {layout}"


def _step(torch, layer, x, g) -> Callable[[], object]:
    inputs = (x, *[p for p in layer.parameters() if p.requires_grad])

    def step():
        y = layer(x)
        return torch.autograd.grad(y, inputs, g)

    return step


def measure_adapter(size: str, repeat: int, warmup: int, copy_bw: float | None, allocator: str,
                    say: Callable[..., None] = print, keep: Callable[[str], bool] | None = None) -> list:
    """The ``adapter`` rows: ``nt.<Layer>`` against ``torch.nn.<Layer>``, forward and fwd+bwd (only
    the cases whose id ``keep`` accepts, when given)."""
    import torch

    from normref.backends import torch as nt

    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, args, kwargs, shape, layouts in adapter_cases(size):
        for layout in layouts:
            cid = _case_id(name, args, kwargs, shape, layout)
            if keep is not None and not keep(cid):
                continue
            say(f"  adapter {cid} ...", end="")
            fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
            x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).requires_grad_(True)
            g = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
            ref = getattr(torch.nn, name)(*args, **kwargs).train()
            mine = getattr(nt, name)(*args, **kwargs).train()
            mine.load_state_dict(ref.state_dict())
            fns = {"normref_forward": lambda m=mine: m(x), "torch_forward": lambda m=ref: m(x),
                   "normref_step": _step(torch, mine, x, g), "torch_step": _step(torch, ref, x, g)}
            t = interleaved(fns, repeat, warmup)
            nel = x.numel()
            row = {"id": cid, "layer": name, "shape": list(shape), "layout": layout, "allocator": allocator,
                   "elements": nel, "bytes_fwd_bwd": 20 * nel, "timings": t,
                   "ratio_forward": paired_ratio(t["normref_forward"], t["torch_forward"]),
                   "ratio_step": paired_ratio(t["normref_step"], t["torch_step"]),
                   "noisy": is_noisy(*t.values())}
            if copy_bw:
                row["normref_fraction"] = 20 * nel / t["normref_step"]["median"] / copy_bw
                row["torch_fraction"] = 20 * nel / t["torch_step"]["median"] / copy_bw
            rows.append(row)
            say(" done")
    return rows


def _network(torch, norm: type, width: int = 32, classes: int = 10):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), norm(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), norm(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), norm(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))


def network_shape(size: str) -> tuple:
    return {"smoke": (2, 3, 8, 8), "quick": (16, 3, 16, 16)}.get(size, (32, 3, 32, 32))


def measure_network(size: str, repeat: int, warmup: int, allocator: str, say: Callable[..., None] = print,
                    keep: Callable[[str], bool] | None = None) -> list:
    """The ``network`` rows: one SGD step of the conv + BN network, torch's BatchNorm2d vs normref's."""
    import torch
    import torch.nn.functional as F

    from normref.backends import torch as nt

    shape = network_shape(size)
    rows = []
    for layout in ("NCHW", "channels-last"):
        cid = f"conv+BN net {'x'.join(map(str, shape))} {layout}"
        if keep is not None and not keep(cid):
            continue
        say(f"  network {cid} ...", end="")
        torch.manual_seed(0)
        ref = _network(torch, torch.nn.BatchNorm2d).train()
        mine = _network(torch, nt.BatchNorm2d).train()
        mine.load_state_dict(ref.state_dict())
        fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
        ref, mine = ref.to(memory_format=fmt), mine.to(memory_format=fmt)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        labels = torch.randint(0, 10, (shape[0],), generator=gen)

        def train_step(net):
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

            def step():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), labels)
                loss.backward()
                opt.step()

            return step

        t = interleaved({"normref_step": train_step(mine), "torch_step": train_step(ref)}, repeat, warmup)
        rows.append({"id": cid, "shape": list(shape), "layout": layout, "allocator": allocator, "timings": t,
                     "ratio_step": paired_ratio(t["normref_step"], t["torch_step"]), "noisy": is_noisy(*t.values())})
        say(" done")
    return rows
