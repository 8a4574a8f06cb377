"""``torch.nn.Module`` layers running normref's forward and analytic backward.

Drop-ins for torch's own layers: each class subclasses torch's (so the constructor arguments,
parameters, buffers, ``state_dict`` keys — ``num_batches_tracked`` included — ``extra_repr`` and
``load_state_dict`` behaviour are torch's, verbatim) and replaces only ``forward``, which calls the
registry-generated autograd function of the matching normref method. Running statistics are not
mutated by normref (its functions are pure): the layer copies the updated statistics returned in the
``NormResult`` into its buffers, which is what torch's layers do in place.

    BatchNorm1d/2d/3d   -> normref.batch_norm      InstanceNorm1d/2d/3d -> normref.instance_norm
    LayerNorm           -> normref.layer_norm      GroupNorm            -> normref.group_norm
    RMSNorm             -> normref.rms_norm

``Norm(method, **static)`` wraps any other activation method as a stateless layer (its array arguments
other than the input are passed to ``forward``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normref.registry import get

from ._function import function

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "Norm",
]


def _copy_state(buffer: torch.Tensor | None, new: torch.Tensor | None) -> None:
    if buffer is not None and new is not None:
        with torch.no_grad():
            buffer.copy_(new)


class _NormrefBatchNorm:
    """forward of torch's ``_BatchNorm`` (same momentum / num_batches_tracked logic), on normref."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # torch's exponential_average_factor, computed exactly as torch.nn.modules.batchnorm does
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        rm = self.running_mean if use_running else None
        rv = self.running_var if use_running else None
        out = function("batch_norm")(input, rm, rv, self.weight, self.bias, bn_training, factor, self.eps)
        if isinstance(out, tuple):  # NormResult: the updated running statistics come back
            _copy_state(self.running_mean, out.running_mean)
            _copy_state(self.running_var, out.running_var)
            return out.output
        return out


class BatchNorm1d(_NormrefBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by :func:`normref.batch_norm` (Ioffe & Szegedy, ICML 2015)."""


class BatchNorm2d(_NormrefBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by :func:`normref.batch_norm` (Ioffe & Szegedy, ICML 2015)."""


class BatchNorm3d(_NormrefBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by :func:`normref.batch_norm` (Ioffe & Szegedy, ICML 2015)."""


class _NormrefInstanceNorm:
    """``_apply_instance_norm`` of torch's ``_InstanceNorm`` on normref (torch keeps the shape checks
    and the unbatched-input handling in its own ``forward``, which calls this)."""

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        out = function("instance_norm")(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        if isinstance(out, tuple):
            _copy_state(self.running_mean, out.running_mean)
            _copy_state(self.running_var, out.running_var)
            return out.output
        return out


class InstanceNorm1d(_NormrefInstanceNorm, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` computed by :func:`normref.instance_norm` (Ulyanov et al., 2016)."""


class InstanceNorm2d(_NormrefInstanceNorm, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` computed by :func:`normref.instance_norm` (Ulyanov et al., 2016)."""


class InstanceNorm3d(_NormrefInstanceNorm, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` computed by :func:`normref.instance_norm` (Ulyanov et al., 2016)."""


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`normref.layer_norm` (Ba, Kiros & Hinton, 2016)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return function("layer_norm")(input, tuple(self.normalized_shape), self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by :func:`normref.group_norm` (Wu & He, ECCV 2018)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return function("group_norm")(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by :func:`normref.rms_norm` (Zhang & Sennrich, NeurIPS 2019)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return function("rms_norm")(x, tuple(self.normalized_shape), self.weight, self.eps)


class Norm(nn.Module):
    """Any registered method as a stateless layer: ``Norm("pixel_norm", eps=1e-8)(x)``.

    The non-array arguments are fixed at construction; ``forward(input, **arrays)`` passes the input
    and any further arrays by name (weights, generated γ/β, running statistics) to the method. If the
    method returns a NamedTuple (updated state), the whole NamedTuple is returned: the caller keeps
    the state (see the drop-in classes for layers that keep it in buffers).
    """

    def __init__(self, method: str, **static: Any):
        super().__init__()
        m = get(method)
        bad = [k for k in static if k in m.array_params]
        if bad:
            raise TypeError(f"Norm({m.name!r}): {bad[0]} is an array argument; pass it to forward, not to the constructor")
        self.method = m.name
        self.static = dict(static)

    def forward(self, input: torch.Tensor, **arrays: Any):
        return function(self.method)(input, **{**self.static, **arrays})

    def extra_repr(self) -> str:
        return ", ".join([repr(self.method)] + [f"{k}={v!r}" for k, v in self.static.items()])
