"""Layers for the methods that use the statistics of recent iterations: MABN, memorized BN, CBN.

:mod:`normref.cross_iteration` is pure: the windows of past statistics go in as arrays and the
current batch's statistics come back. These layers keep the windows as buffers (newest first, so
``state_dict`` saves them) and run normref's registered forward and analytic backward (never torch's
autograd for the normalization itself):

    MovingAverageBatchNorm2d(64, buffer_size=4)   # MABN (Yan et al., ICLR 2020), 1d/2d/3d too
    CentralizedConv2d(32, 64, 3, bias=False)      # the weight-centralized conv MABN pairs with
    MemorizedBatchNorm2d(64, memory=3)            # memorized BN (Guo et al., AAAI 2018), 1d/2d/3d
    CBNConv2d(32, 64, 3, buffer_num=3, burnin=8)  # conv + cross-iteration BN (Yao et al., CVPR 2021)
    CBNLinear(128, 64, buffer_num=3)              # linear + cross-iteration BN

Each norm layer is a :class:`~normref.backends.torch.StatefulNorm` (``normref_method``,
``running_*`` buffers, ``weight``/``bias``), so ``normref.backends.torch.fold`` folds its eval-mode
affine map into the convolution before it and ``normref.backends.torch.recalibrate`` re-estimates its
running statistics; the windows and the iteration counter ``num_batches_tracked`` are extra buffers.
``CBNConv2d``/``CBNLinear`` are ``nn.Sequential(conv, norm)`` whose training forward hands the
layer and its input to the norm (the Taylor compensation needs them); at inference they are that
plain sequence, which is what ``fold`` rewrites.

State rules. A training-mode forward pushes this batch's statistics into the windows and counts the
iteration (one host read of the counter per forward: the authors' schedules depend on it). MABN's
gradient statistic Ψ_t is pushed by the backward of that forward (one backward per forward; a second
``backward`` through a retained graph is a ``RuntimeError``); a training-mode forward with no
gradient (``torch.no_grad()``, or nothing requiring a gradient) pushes Ψ_t = 0 so that the two windows
stay aligned. Eval mode reads the running statistics (``track_running_stats=True``) and changes
nothing. MABN's training step gives first derivatives only (the paper's backward is not the
derivative of a function); memorized BN, CBN and every eval-mode call go through the generated
Functions, which have second derivatives too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import normref
from normref._validate import check_bool, check_choice, check_int, check_momentum, check_nonnegative, check_positive

from ._function import function
from .modules import StatefulNorm, _initial

__all__ = [
    "MovingAverageBatchNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "CentralizedConv2d",
    "Centralize",
    "MemorizedBatchNorm",
    "MemorizedBatchNorm1d",
    "MemorizedBatchNorm2d",
    "MemorizedBatchNorm3d",
    "double_forward",
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "CBNConv2d",
    "CBNLinear",
]


def _push(buffer: torch.Tensor, row: torch.Tensor) -> None:
    """Newest-first window: shift the rows down by one and write ``row`` first (in place, no grad)."""
    if buffer.shape[0] == 0:
        return
    with torch.no_grad():
        new = torch.cat([row.detach().to(buffer.dtype).unsqueeze(0), buffer[:-1]], dim=0)
        buffer.copy_(new)


class _WindowNorm(StatefulNorm):
    """The common part: a StatefulNorm (so fold / recalibrate / reset_parameters see it) whose
    constructor is not generated from the signature (the windows' shapes are the layer's options)."""

    _method = ""
    _running: tuple = ("running_mean", "running_var")

    def _setup(self, num_features: Any, affine: Any, track_running_stats: Any, options: dict, factory: dict) -> str:
        nn.Module.__init__(self)
        where = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{where}: num_features must be a positive int; got {num_features!r}")
        self.normref_method = self._method
        self.num_features = num_features
        self.affine = check_bool(where, "affine", affine)
        self.track_running_stats = check_bool(where, "track_running_stats", track_running_stats)
        self.process_group = None
        self._flag = "training"
        self._static_names = tuple(options)  # keywords of the normref method (fold/recalibrate pass them)
        for k, v in options.items():
            setattr(self, k, v)
        self._param_names = ["weight", "bias"]
        for p in self._param_names:
            self.register_parameter(p, nn.Parameter(_initial(self._method, p, num_features, num_features, factory))
                                    if self.affine else None)
        self._state_names = list(self._running) if self.track_running_stats else []
        for p in self._running:
            self.register_buffer(p, _initial(self._method, p, num_features, num_features, factory)
                                 if self.track_running_stats else None)
        self._counts = True
        # the iteration counter drives the authors' schedules (warm-up, burn-in, memory fill): always kept
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=factory["device"]))
        return where

    def _window_buffers(self) -> tuple:
        return ()

    def reset_running_stats(self) -> None:
        """Running statistics to their initial values, windows to zero, ``num_batches_tracked`` to 0."""
        with torch.no_grad():
            for p in self._state_names:
                buf = getattr(self, p)
                buf.copy_(_initial(self._method, p, self.num_features, self.num_features,
                                   {"device": buf.device, "dtype": buf.dtype}))
            for p in self._window_buffers():
                getattr(self, p).zero_()
            self.num_batches_tracked.zero_()

    def _step(self) -> int:
        """This training iteration's number t = 1, 2, ... (the authors' ``iters``, a host read)."""
        return int(self.num_batches_tracked) + 1

    def _momentum(self) -> float:
        """momentum=None: the cumulative average over the batches seen (as torch's layers)."""
        return 1.0 / self._step() if self.momentum is None else self.momentum

    def _affine(self) -> tuple:
        return self.weight, self.bias

    def extra_repr(self) -> str:
        opts = [f"{k}={getattr(self, k)!r}" for k in self._layer_options()]
        return ", ".join([str(self.num_features), f"affine={self.affine}",
                          f"track_running_stats={self.track_running_stats}"] + opts)

    def _layer_options(self) -> tuple:
        return self._static_names


def _ranked(base: type, suffix: str, ranks: "tuple[int, ...]") -> type:
    doc = f"{base.__name__} for {' or '.join(f'{d}D' for d in ranks)} input; see :class:`{base.__name__}`."
    return type(base.__name__ + suffix, (base,), {"_input_ndim": ranks, "__doc__": doc, "__module__": __name__})


# --------------------------------------------------------------------------------------------------
# MABN


class _MABNStep(torch.autograd.Function):
    """One MABN training step: normref's forward; normref's backward (the paper's moving-average
    gradient statistic), which also pushes this iteration's Ψ_t into the layer's window."""

    @staticmethod
    def forward(ctx, input, weight, bias, layer, past_sq, past_gz, rms, rmax):  # type: ignore[override]
        m = normref.get("moving_average_batch_norm")
        out, res = m.forward(input, past_sq, past_gz, weight, bias, rms, training=True,
                             momentum=layer._momentum(), eps=layer.eps, rmax=rmax)
        ctx.res, ctx.layer = res, layer
        ctx.stat = (input, past_sq, weight, rms, rmax)  # what Ψ_t needs (rms: the value before the update)
        y = out.output
        if any(y is a for a in res.arrays if a is not None):  # no affine: y is a saved residual itself
            y = y.clone()
        layer._write_forward_state(out)
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.res is None:
            raise RuntimeError(f"{type(ctx.layer).__name__}: the training-mode backward ran already for this forward "
                               f"(it pushes the gradient statistic once per step); do not retain the graph")
        g = grad_output.contiguous()
        grads = normref.get("moving_average_batch_norm").backward(ctx.res, g)
        x, past_sq, weight, rms, rmax = ctx.stat
        psi = normref.moving_average_gradient_statistic(x, g, past_sq, weight, rms, eps=ctx.layer.eps, rmax=rmax)
        _push(ctx.layer.past_grad_stats, psi)
        ctx.res = ctx.stat = None
        return grads[0], grads[3], grads[4], None, None, None, None, None


class MovingAverageBatchNorm(_WindowNorm):
    """Moving average batch normalization (MABN; Yan et al., ICLR 2020) as a layer.

    :func:`normref.moving_average_batch_norm`, the authors' ``MABN2d`` schedule.

    ``MovingAverageBatchNorm2d(num_features, buffer_size=1, eps=1e-5, momentum=0.02, warmup_iters=100,
    renorm_after=1000, rmax=5.0, affine=True, track_running_stats=True)``; input ``(N, C, *spatial)``.

    - ``buffer_size`` m ≥ 1: iterations averaged, the current one included (the authors' ``real_B //
      B``: the batch size to simulate over the per-device batch size).
    - Training iteration t (``num_batches_tracked + 1``): while t ≤ m or t < ``warmup_iters`` the
      layer normalizes by this batch's E[x²] and the backward uses this batch's Ψ_t only (the
      authors' warm-up); afterwards by the simple moving averages of E[x²] (forward) and of Ψ
      (backward) over the last m iterations. While t ≤ max(``renorm_after``, ``warmup_iters``)
      r = 1; afterwards the output is renormalized by r = clip(√(ψ̄+ε)/√(running+ε), 1/rmax, rmax)
      (the authors: 5 after 1000 iterations; ``rmax=None``: never).
    - ``momentum``: running_mean_square ← (1 − momentum)·running + momentum·ψ̄ (the authors' 0.98 on
      the old value is ``momentum=0.02``; ``None``: cumulative average).

    Buffers: ``running_mean_square`` (C,) = 1 (the authors' ``running_var``, which holds E[x²]),
    ``past_sq_means`` and ``past_grad_stats`` (m − 1, C), the window of the last m − 1 iterations'
    χ² and Ψ (newest first; the authors' ring buffers ``buffer_x2``, ``buffer_gz`` less the current
    slot), ``num_batches_tracked``. Eval: y = γ·x/√(running_mean_square + ε) + β.
    ``track_running_stats=False``: no running mean square (so ``rmax`` must be ``None``) and eval
    mode uses the batch statistics with the window, changing no buffer. Pair with
    :class:`CentralizedConv2d` (``bias=False``) before it, as the authors do.
    """

    _method = "moving_average_batch_norm"
    _running = ("running_mean_square",)

    def __init__(self, num_features: int, buffer_size: int = 1, eps: float = 1e-5, momentum: "float | None" = 0.02,
                 warmup_iters: int = 100, renorm_after: int = 1000, rmax: "float | None" = 5.0, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None) -> None:
        where = type(self).__name__
        eps = check_positive(where, "eps", eps)
        momentum = check_momentum(where, momentum)
        buffer_size = check_int(where, "buffer_size", buffer_size, minimum=1)
        warmup_iters = check_int(where, "warmup_iters", warmup_iters, minimum=0)
        renorm_after = check_int(where, "renorm_after", renorm_after, minimum=0)
        if rmax is not None:
            rmax = check_positive(where, "rmax", rmax)
            if rmax < 1.0:
                raise ValueError(f"{where}: rmax must be >= 1 (r is clipped to [1/rmax, rmax]) or None; got {rmax}")
            if track_running_stats is False:
                raise ValueError(f"{where}: rmax renormalizes against the running mean square, which "
                                 f"track_running_stats=False does not keep; pass rmax=None")
        factory = {"device": device, "dtype": dtype}
        self._setup(num_features, affine, track_running_stats, {"momentum": momentum, "eps": eps}, factory)
        self.buffer_size, self.warmup_iters, self.renorm_after, self.rmax = buffer_size, warmup_iters, renorm_after, rmax
        self.register_buffer("past_sq_means", torch.zeros(buffer_size - 1, num_features, **factory))
        self.register_buffer("past_grad_stats", torch.zeros(buffer_size - 1, num_features, **factory))

    def _window_buffers(self) -> tuple:
        return ("past_sq_means", "past_grad_stats")

    def _layer_options(self) -> tuple:
        return ("buffer_size", "eps", "momentum", "warmup_iters", "renorm_after", "rmax")

    def _schedule(self, t: int) -> tuple:
        """(use the window, rmax) at iteration t, as the authors' BatchNormFunction decides."""
        window = not (t <= self.buffer_size or t < self.warmup_iters) and self.buffer_size > 1
        rmax = self.rmax if (self.rmax is not None and t > max(self.renorm_after, self.warmup_iters)) else None
        return window, rmax

    def _write_forward_state(self, out: Any) -> None:
        with torch.no_grad():
            if self.track_running_stats and out.running_mean_square is not None:
                self.running_mean_square.copy_(out.running_mean_square)
            _push(self.past_sq_means, out.sq_mean)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        weight, bias = self._affine()
        rms = self.running_mean_square if self.track_running_stats else None
        if not self.training and self.track_running_stats:
            return function(self._method)(input, None, None, weight, bias, rms, training=False, eps=self.eps)
        window, rmax = self._schedule(self._step() if self.training else int(self.num_batches_tracked))
        past_sq = self.past_sq_means.clone() if window else None  # the pushes below must not change them
        past_gz = self.past_grad_stats.clone() if window else None
        if not self.training:  # track_running_stats=False: batch statistics with the window, no state change
            out = function(self._method)(input, past_sq, past_gz, weight, bias, None, training=True, eps=self.eps)
            return out[0]
        wants = torch.is_grad_enabled() and (input.requires_grad or any(
            p is not None and p.requires_grad for p in (weight, bias)))
        if wants:
            y = _MABNStep.apply(input, weight, bias, self, past_sq, past_gz,
                                None if rms is None else rms.clone(), rmax)
        else:
            with torch.no_grad():
                out = normref.moving_average_batch_norm(input, past_sq, past_gz, weight, bias, rms, training=True,
                                                        momentum=self._momentum(), eps=self.eps, rmax=rmax)
            self._write_forward_state(out)
            _push(self.past_grad_stats, torch.zeros_like(out.sq_mean))  # no backward: Ψ_t = 0 keeps the windows aligned
            y = out.output
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
        return y


MovingAverageBatchNorm1d = _ranked(MovingAverageBatchNorm, "1d", (2, 3))
MovingAverageBatchNorm2d = _ranked(MovingAverageBatchNorm, "2d", (4,))
MovingAverageBatchNorm3d = _ranked(MovingAverageBatchNorm, "3d", (5,))


class CentralizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight centralization (the authors' ``CenConv2d``).

    The convolution uses W_i − mean(W_i) over each output channel's fan-in, through
    :func:`normref.centralized_weight` (normref's analytic backward: the gradient projected the same way). Same constructor as
    ``nn.Conv2d``; the authors suggest ``bias=False`` before MABN. (As a parametrization of any
    layer: ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", Centralize())``.)"""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, function("centralized_weight")(self.weight), self.bias)


class Centralize(nn.Module):
    """Parametrization W = V − mean(V) per output row (:func:`normref.centralized_weight`)."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return function("centralized_weight")(v)


# --------------------------------------------------------------------------------------------------
# memorized BN


class MemorizedBatchNorm(_WindowNorm):
    """Memorized batch normalization (Guo et al., AAAI 2018) as a layer: :func:`normref.memorized_batch_norm`.

    ``MemorizedBatchNorm2d(num_features, memory=2, eps=1e-5, momentum=0.1, memory_weights=None,
    variance=<the function's default>, affine=True, track_running_stats=True)``; input ``(N, C, *spatial)``.

    - ``memory`` k ≥ 1: batches whose statistics are combined, the current one included; the layer
      keeps the last k − 1 batches' means and biased variances (buffers ``past_means``, ``past_vars``,
      (k − 1, C), newest first). While fewer than k − 1 have been seen, those seen are used.
    - ``memory_weights``: η_0 (current), ..., η_{k−1}, as the function takes them; while the memory
      fills, the first ones are used, rescaled to sum to 1. ``variance``: as the function.
    - ``momentum``: of the running statistics, updated with the memorized statistics (the function's
      rule; ``None``: cumulative average).
    - Double-Forward (the paper's scheme, as its abstract describes it: the statistics of a batch
      are taken again after the update, against the distribution shift the update causes): after the
      optimizer step, run the same batch forward again inside :func:`double_forward`; the layer then
      replaces the newest memorized statistics by those of this second pass (computed with the
      updated weights) and changes nothing else (normref's reading: the paper's equations were not
      available, see :func:`normref.memorized_batch_norm`).

    Buffers also ``running_mean``, ``running_var`` (unbiased), ``num_batches_tracked``. Eval: batch
    norm with the running statistics; ``track_running_stats=False``: the memorized statistics in eval
    mode too, no buffer changed.
    """

    _method = "memorized_batch_norm"

    def __init__(self, num_features: int, memory: int = 2, eps: float = 1e-5, momentum: "float | None" = 0.1,
                 memory_weights: "tuple[float, ...] | None" = None, variance: "str | None" = None, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None) -> None:
        where = type(self).__name__
        eps = check_positive(where, "eps", eps)
        momentum = check_momentum(where, momentum)
        memory = check_int(where, "memory", memory, minimum=1)
        if variance is None:
            variance = normref.get(self._method).signature.parameters["variance"].default
        variance = check_choice(where, "variance", variance, ("pooled", "average"))
        if memory_weights is not None:
            try:
                memory_weights = tuple(float(check_nonnegative(where, "memory_weights", v)) for v in memory_weights)
            except TypeError:
                raise TypeError(f"{where}: memory_weights must be a sequence of memory = {memory} numbers >= 0; "
                                f"got {type(memory_weights).__name__}") from None
            if len(memory_weights) != memory or memory_weights[0] <= 0 or abs(sum(memory_weights) - 1.0) > 1e-9:
                raise ValueError(f"{where}: memory_weights must hold memory = {memory} weights >= 0 summing to 1, "
                                 f"the first (current batch) > 0; got {memory_weights}")
        factory = {"device": device, "dtype": dtype}
        options = {"momentum": momentum, "eps": eps, "memory_weights": memory_weights, "variance": variance}
        self._setup(num_features, affine, track_running_stats, options, factory)
        self.memory = memory
        self.register_buffer("past_means", torch.zeros(memory - 1, num_features, **factory))
        self.register_buffer("past_vars", torch.zeros(memory - 1, num_features, **factory))
        self._again = False

    def _window_buffers(self) -> tuple:
        return ("past_means", "past_vars")

    def _layer_options(self) -> tuple:
        return ("memory", "eps", "momentum", "memory_weights", "variance")

    def _weights(self, w: int) -> "tuple[float, ...] | None":
        if self.memory_weights is None:
            return None
        head = self.memory_weights[: w + 1]
        total = math.fsum(head)
        return tuple(v / total for v in head)

    def _call(self, input: torch.Tensor, skip: int, stored: int, with_running: bool) -> Any:
        w = max(0, stored - skip)
        pm = self.past_means[skip: skip + w].clone() if w else None
        pv = self.past_vars[skip: skip + w].clone() if w else None
        rm, rv = (self.running_mean, self.running_var) if with_running else (None, None)
        return function(self._method)(input, pm, pv, *self._affine(), rm, rv, training=True,
                                      momentum=self._momentum(), eps=self.eps, memory_weights=self._weights(w),
                                      variance=self.variance)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        seen = int(self.num_batches_tracked)
        stored = min(seen, self.memory - 1)
        if not self.training:
            if self.track_running_stats:
                return function(self._method)(input, None, None, *self._affine(), self.running_mean,
                                              self.running_var, training=False, eps=self.eps)
            return self._call(input, 0, stored, False)[0]
        if self._again:  # Double-Forward: this batch's statistics replace the newest memorized ones
            if stored == 0:
                raise RuntimeError(f"{type(self).__name__}: double_forward needs a preceding training-mode forward "
                                   f"of the batch (nothing is memorized yet)")
            out = self._call(input, 1, stored, False)
            with torch.no_grad():
                self.past_means[0].copy_(out.mean)
                self.past_vars[0].copy_(out.var)
            return out[0]
        out = self._call(input, 0, stored, self.track_running_stats)
        with torch.no_grad():
            if self.track_running_stats:
                self.running_mean.copy_(out.running_mean)
                self.running_var.copy_(out.running_var)
            _push(self.past_means, out.mean)
            _push(self.past_vars, out.var)
            self.num_batches_tracked.add_(1)
        return out[0]


MemorizedBatchNorm1d = _ranked(MemorizedBatchNorm, "1d", (2, 3))
MemorizedBatchNorm2d = _ranked(MemorizedBatchNorm, "2d", (4,))
MemorizedBatchNorm3d = _ranked(MemorizedBatchNorm, "3d", (5,))


@contextlib.contextmanager
def double_forward(model: nn.Module) -> Iterator[nn.Module]:
    """The Double-Forward pass of memorized BN (a context manager).

    Inside, every :class:`MemorizedBatchNorm` of ``model`` in training mode replaces its newest
    memorized statistics by those of the batch it sees (run the same batch as the step that just
    updated the weights) and updates nothing else.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose :class:`MemorizedBatchNorm` layers take part.

    Returns
    -------
    context : context manager
        Yields ``model``; the layers return to their normal training behaviour on exit.

    Examples
    --------
    Typically under ``torch.no_grad()``::

        loss(model(x)).backward(); opt.step()
        with torch.no_grad(), double_forward(model):
            model(x)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"double_forward: model must be a torch.nn.Module; got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, MemorizedBatchNorm)]
    for m in layers:
        m._again = True
    try:
        yield model
    finally:
        for m in layers:
            m._again = False


# --------------------------------------------------------------------------------------------------
# cross-iteration BN


def _statistic_grads(layer: nn.Module, layer_input: torch.Tensor, z: torch.Tensor) -> tuple:
    """∂μ_c/∂θ_c, ∂ν_c/∂θ_c of the layer's output statistics, shaped like its weight."""
    x = layer_input.detach()
    zz = z.detach()
    if isinstance(layer, nn.Linear):
        patches, pre = x, zz
    else:  # nn.Conv2d, groups = 1, zero padding (checked when the pair is built)
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        pre = zz.reshape(zz.shape[0], zz.shape[1], -1)
    # z is the layer's whole output (its bias, if any, included): ∂ν/∂θ = 2·mean(z·p) holds with the bias
    # inside z, and ∂μ/∂θ = mean(p) does not depend on it
    dmu, dnu = normref.cross_iteration_statistic_grads(patches, pre)
    shape = tuple(layer.weight.shape)
    return dmu.reshape(shape), dnu.reshape(shape)


class CrossIterationBatchNorm(_WindowNorm):
    """Cross-iteration batch normalization (CBN; Yao et al., CVPR 2021) as a layer.

    :func:`normref.cross_iteration_batch_norm`, the authors' ``CBatchNorm2d`` schedule.

    ``CrossIterationBatchNorm2d(num_features, buffer_num=0, weight_shape=None, rho=1.0, burnin=0,
    eps=1e-5, momentum=0.1, invalid="clamp", affine=True, track_running_stats=True)``; input
    ``(N, C, *spatial)``, the output of the layer with weights θ.
    ``forward(input, layer=None, layer_input=None)``:

    - ``buffer_num``: past iterations used (the authors' name; k = buffer_num + 1 with the current).
    - ``burnin``: while the iteration t ≤ burnin, plain batch norm and nothing stored (the authors'
      two-stage burn-in, ``two_stage=True``); afterwards each training iteration stores its
      statistics and uses those of the last min(stored, buffer_num) iterations, as the authors'
      ``CBatchNorm2d`` does (its lists fill from the first iteration after the burn-in).
    - Compensation: pass ``layer`` (the ``nn.Conv2d`` with groups = 1 and zero padding, or the
      ``nn.Linear``, whose output ``input`` is) and ``layer_input`` (its input); the layer then
      stores ∂μ/∂θ, ∂ν/∂θ (:func:`normref.cross_iteration_statistic_grads`) and θ with each iteration's
      statistics, and compensates the past ones to the current θ (``weight_shape`` = the layer's
      weight shape, fixed at construction for the buffers). Without them (or ``rho=0``), the naive
      average of the past statistics (the paper's ablation). :class:`CBNConv2d` / :class:`CBNLinear`
      pass them for you.

    Buffers: ``running_mean``, ``running_var`` (updated with this batch's mean and unbiased variance,
    as the authors do), ``past_means``, ``past_sq_means`` (buffer_num, C), and with ``weight_shape``
    ``past_mean_grads``, ``past_sq_mean_grads``, ``past_layer_weights`` ``(buffer_num, *weight_shape)``,
    ``num_batches_tracked``. Eval: batch norm with the running statistics (ε inside the root: the
    authors' default adds it to σ).
    """

    _method = "cross_iteration_batch_norm"

    def __init__(self, num_features: int, buffer_num: int = 0, weight_shape: "tuple[int, ...] | None" = None,
                 rho: float = 1.0, burnin: int = 0, eps: float = 1e-5, momentum: "float | None" = 0.1,
                 invalid: str = "clamp", affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        where = type(self).__name__
        eps = check_positive(where, "eps", eps)
        momentum = check_momentum(where, momentum)
        rho = check_nonnegative(where, "rho", rho)
        invalid = check_choice(where, "invalid", invalid, ("clamp", "drop"))
        buffer_num = check_int(where, "buffer_num", buffer_num, minimum=0)
        burnin = check_int(where, "burnin", burnin, minimum=0)
        if weight_shape is not None:
            try:
                weight_shape = tuple(check_int(where, "weight_shape", d) for d in weight_shape)
            except TypeError:
                raise TypeError(f"{where}: weight_shape must be a tuple of positive ints (the layer's weight shape); "
                                f"got {weight_shape!r}") from None
            if len(weight_shape) < 2 or weight_shape[0] != num_features:
                raise ValueError(f"{where}: weight_shape must be (C, *θ_c) with C = num_features = {num_features} "
                                 f"(the weight of the layer before); got {weight_shape}")
        factory = {"device": device, "dtype": dtype}
        options = {"momentum": momentum, "eps": eps, "rho": rho, "invalid": invalid}
        self._setup(num_features, affine, track_running_stats, options, factory)
        self.buffer_num, self.burnin, self.weight_shape = buffer_num, burnin, weight_shape
        self.register_buffer("past_means", torch.zeros(buffer_num, num_features, **factory))
        self.register_buffer("past_sq_means", torch.zeros(buffer_num, num_features, **factory))
        for p in ("past_mean_grads", "past_sq_mean_grads", "past_layer_weights"):
            self.register_buffer(p, None if weight_shape is None else torch.zeros((buffer_num,) + weight_shape, **factory))

    def _window_buffers(self) -> tuple:
        return tuple(p for p in ("past_means", "past_sq_means", "past_mean_grads", "past_sq_mean_grads",
                                 "past_layer_weights") if getattr(self, p) is not None)

    def _layer_options(self) -> tuple:
        return ("buffer_num", "weight_shape", "rho", "burnin", "eps", "momentum", "invalid")

    def _check_layer(self, input: torch.Tensor, layer: Any, layer_input: Any) -> bool:
        where = type(self).__name__
        if layer is None and layer_input is None:
            return False
        if layer is None or layer_input is None:
            raise ValueError(f"{where}: layer and layer_input go together (the layer before and its input); "
                             f"got {'layer' if layer is not None else 'layer_input'} only")
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{where}: layer must be the nn.Conv2d or nn.Linear whose output is the input; "
                            f"got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"
                                             or isinstance(layer.padding, str)):
            raise ValueError(f"{where}: the compensation supports convolutions with groups=1 and numeric zero "
                             f"padding; got groups={layer.groups}, padding={layer.padding!r}, "
                             f"padding_mode={layer.padding_mode!r}")
        if isinstance(layer, nn.Linear) and (layer_input.dim() != 2 or input.dim() != 2):
            raise ValueError(f"{where}: after an nn.Linear the compensation takes 2D (N, features) input and "
                             f"layer_input; got {input.dim()}D and {layer_input.dim()}D")
        if self.weight_shape is None or tuple(layer.weight.shape) != self.weight_shape:
            raise ValueError(f"{where}: the layer's weight has shape {tuple(layer.weight.shape)}; the layer was built "
                             f"with weight_shape={self.weight_shape} (the compensation buffers' shape)")
        return True

    def forward(self, input: torch.Tensor, layer: "nn.Module | None" = None,
                layer_input: "torch.Tensor | None" = None) -> torch.Tensor:
        self._check_input_dim(input)
        compensate = self._check_layer(input, layer, layer_input)
        weight, bias = self._affine()
        if not self.training and self.track_running_stats:
            return function(self._method)(input, self.running_mean, self.running_var, weight, bias, training=False,
                                          eps=self.eps)
        t = self._step() if self.training else int(self.num_batches_tracked)
        cbn = t > self.burnin  # after the burn-in (the authors' two-stage schedule)
        # the window fills from the first iteration after the burn-in on (pushes happen in CBN steps only)
        w = min(max(0, int(self.num_batches_tracked) - self.burnin), self.buffer_num) if cbn else 0
        args: dict = {}
        if w:
            args.update(past_means=self.past_means[:w].clone(), past_sq_means=self.past_sq_means[:w].clone())
            if compensate and self.rho > 0:
                args.update(past_mean_grads=self.past_mean_grads[:w].clone(),
                            past_sq_mean_grads=self.past_sq_mean_grads[:w].clone(),
                            layer_weight=layer.weight.detach().clone(),  # θ_t: a constant (the authors' weight.data)
                            past_layer_weights=self.past_layer_weights[:w].clone())
        update = self.training and self.track_running_stats
        rm, rv = (self.running_mean, self.running_var) if update else (None, None)
        out = function(self._method)(input, rm, rv, weight, bias, training=True, momentum=self._momentum(),
                                     eps=self.eps, rho=self.rho, invalid=self.invalid, **args)
        if self.training:
            with torch.no_grad():
                if update:
                    self.running_mean.copy_(out.running_mean)
                    self.running_var.copy_(out.running_var)
                if cbn:
                    _push(self.past_means, out.mean)
                    _push(self.past_sq_means, out.sq_mean)
                if cbn and self.weight_shape is not None and self.buffer_num:
                    if compensate:
                        dmu, dnu = _statistic_grads(layer, layer_input, input)
                        _push(self.past_mean_grads, dmu)
                        _push(self.past_sq_mean_grads, dnu)
                        _push(self.past_layer_weights, layer.weight.detach())
                    else:  # no layer given this step: no compensation can be stored for it
                        _push(self.past_mean_grads, torch.zeros(self.weight_shape, dtype=input.dtype, device=input.device))
                        _push(self.past_sq_mean_grads, torch.zeros(self.weight_shape, dtype=input.dtype,
                                                                   device=input.device))
                        _push(self.past_layer_weights, torch.zeros(self.weight_shape, dtype=input.dtype,
                                                                   device=input.device))
                self.num_batches_tracked.add_(1)
        return out[0]


CrossIterationBatchNorm1d = _ranked(CrossIterationBatchNorm, "1d", (2, 3))
CrossIterationBatchNorm2d = _ranked(CrossIterationBatchNorm, "2d", (4,))
CrossIterationBatchNorm3d = _ranked(CrossIterationBatchNorm, "3d", (5,))


class _CBNPair(nn.Sequential):
    """``nn.Sequential(layer, norm)`` whose forward hands the layer and its input to the CBN norm.
    At inference (or once ``fold`` has replaced ``norm`` by ``nn.Identity``) it is the plain sequence."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        layer, norm = self[0], self[1]
        z = layer(input)
        if isinstance(norm, CrossIterationBatchNorm):
            return norm(z, layer=layer, layer_input=input)
        return norm(z)


class CBNConv2d(_CBNPair):
    """A convolution followed by :class:`CrossIterationBatchNorm2d` with the Taylor compensation.

    The convolution is ``nn.Conv2d`` (groups = 1, zero padding, no bias: CBN's β takes its place),
    paired as the authors pair them (``ConvModule`` with ``CBatchNorm2d(..., buffer_num, burnin)``).

    ``CBNConv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, *,
    buffer_num=3, burnin=0, rho=1.0, eps=1e-5, momentum=0.1, invalid="clamp", affine=True)``;
    children ``conv`` (index 0) and ``norm`` (index 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, *, buffer_num: int = 3, burnin: int = 0, rho: float = 1.0, eps: float = 1e-5,
                 momentum: "float | None" = 0.1, invalid: str = "clamp", affine: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        if isinstance(padding, str):
            raise ValueError(f"CBNConv2d: padding must be numeric (the compensation unfolds the input); got {padding!r}")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False,
                         device=device, dtype=dtype)
        norm = CrossIterationBatchNorm2d(out_channels, buffer_num, tuple(conv.weight.shape), rho, burnin, eps, momentum,
                                         invalid, affine, True, device, dtype)
        super().__init__()
        self.add_module("conv", conv)
        self.add_module("norm", norm)


class CBNLinear(_CBNPair):
    """``nn.Linear`` (no bias) followed by :class:`CrossIterationBatchNorm1d` (Taylor compensation).

    Input ``(N, in_features)``. Options as :class:`CBNConv2d`; children ``linear``, ``norm``."""

    def __init__(self, in_features: int, out_features: int, *, buffer_num: int = 3, burnin: int = 0, rho: float = 1.0,
                 eps: float = 1e-5, momentum: "float | None" = 0.1, invalid: str = "clamp", affine: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        norm = CrossIterationBatchNorm1d(out_features, buffer_num, tuple(linear.weight.shape), rho, burnin, eps,
                                         momentum, invalid, affine, True, device, dtype)
        super().__init__()
        self.add_module("linear", linear)
        self.add_module("norm", norm)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if input.dim() != 2:
            raise ValueError(f"CBNLinear: expected 2D input (N, in_features); got {input.dim()}D input")
        return super().forward(input)
