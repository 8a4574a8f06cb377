"""normref for Equinox: per-example layers whose statistics come from the named ``vmap`` axis.

    import equinox as eqx, jax
    from normref.backends import equinox as ne

    model, state = eqx.nn.make_with_state(ne.BatchNorm)(64, "batch")     # eqx.nn.BatchNorm's signature
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, state = batched(x, state)                                          # x: (N, 64, H, W)

Equinox's conventions, kept here:

- A layer is called **per example**: its input is ``(C, *spatial)`` (no batch axis; channels first),
  and the batch is a ``jax.vmap(..., axis_name="batch")`` (or ``pmap``) around the call. normref's
  functions take ``(N, C, *spatial)``; each layer adds a batch axis of one (``x[None]``) and calls the
  method of :mod:`normref.backends.jax`. Batch statistics (training mode of a method with a ``sync=``
  argument: batch norm and its variants, batch whitening) are the whole vmapped batch's, through the
  method's own reducer: ``axis_name=`` of :mod:`normref.backends.jax` (``lax.psum``/``all_gather``
  over the named axis), exactly as ``eqx.nn.BatchNorm`` uses ``lax.pmean`` over its ``axis_name``.
- Running statistics live in an ``eqx.nn.State`` (``eqx.nn.StateIndex`` fields; build the pair with
  ``eqx.nn.make_with_state``); a stateful layer is called ``layer(x, state) -> (y, state)``; the
  stateless ones (``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ...) return ``y``, or ``(y, state)`` when a
  state is passed, as Equinox's do. The ``inference`` field (toggled by ``eqx.nn.inference_mode``, or
  the call's ``inference=``) selects the running statistics.
- ``momentum`` is Equinox's: the weight of the **old** value (default 0.99); normref's (torch's)
  momentum, the weight of the batch, is ``1 - momentum``.

Gradients come from normref's analytic backward (the ``jax.custom_vjp`` of
:mod:`normref.backends.jax`); JAX's autodiff never differentiates a normalization formula here
(the only differentiated operations outside normref are the batch-axis indexing ``x[None]``/``y[0]``
and :class:`RMSNorm`'s optional ``+ bias``, which normref's ``rms_norm`` does not have).

Layers:

==========================  ======================================================================
``BatchNorm``               ``eqx.nn.BatchNorm`` (``mode="batch"``), on :func:`normref.batch_norm`
``LayerNorm``               ``eqx.nn.LayerNorm``, on :func:`normref.layer_norm`
``GroupNorm``               ``eqx.nn.GroupNorm``, on :func:`normref.group_norm`
``RMSNorm``                 ``eqx.nn.RMSNorm``, on :func:`normref.rms_norm`
``Norm(method, C, ...)``    any activation method of the registry (learnable arrays in the dict
                            field ``params``, running statistics in the State); the named ones
                            below fix the method; :func:`supported_methods` lists which qualify
==========================  ======================================================================

Not offered (a ``TypeError``/``ValueError`` saying why): methods with batch statistics but no
``sync=`` reducer (under vmap each call would see a batch of one: ``blended_batch_norm`` — so
``eqx.nn.BatchNorm``'s ``mode="ema"`` —, ``population_norm``, the cross-iteration, online and
moving-average methods), ghost batches and ``batch_groups > 1`` (they split the batch axis itself),
and ``momentum=None`` (a cumulative average needs the step count as a Python int).
:class:`BatchNorm`'s hidden averages are Equinox's state convention, updated in this adapter from
normref's batch statistics (``m·h + (1 − m)·statistic``; see its Notes); :class:`Norm` keeps the
running statistics exactly as the method returns them.

Named generic layers: ``InstanceNorm``, ``BatchWhitening``, ``DecorrelatedBatchNorm``, ``IterNorm``,
``WhiteningColoring``, ``BatchRenorm``, ``SwitchableNorm``, ``LpBatchNorm``,
``MeanOnlyBatchNorm``, ``BatchGroupNorm``, ``BatchInstanceNorm``, ``FilterResponseNorm``,
``PositionNorm``, ``PixelNorm``, ``LocalResponseNorm``, ``AdaptiveLayerInstanceNorm``.
"""

from __future__ import annotations

import inspect
import math
import types
from typing import Any, Hashable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import field

from normref._xp import Array
from normref.backends import jax as nj
from normref.registry import NAMED_LAYERS, get

__all__ = [
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "Norm",
    "supported_methods",
    "InstanceNorm",
    "BatchWhitening",
    "DecorrelatedBatchNorm",
    "IterNorm",
    "WhiteningColoring",
    "BatchRenorm",
    "SwitchableNorm",
    "LpBatchNorm",
    "MeanOnlyBatchNorm",
    "BatchGroupNorm",
    "BatchInstanceNorm",
    "FilterResponseNorm",
    "PositionNorm",
    "PixelNorm",
    "LocalResponseNorm",
    "AdaptiveLayerInstanceNorm",
]


class _NoState:
    """The default of ``state``: no State was passed (the layer returns the output alone)."""

    def __repr__(self) -> str:
        return "<no state>"


_NO_STATE: Any = _NoState()


def _default_float() -> Any:
    # Equinox's default_floating_dtype: float64 when JAX runs in 64-bit mode, else float32
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _per_example(where: str, x: Any, channels: "int | None" = None, shape: "tuple | None" = None) -> None:
    """Refuse a non-array, a 0-d array, or an input of the wrong (per-example) shape, before any work."""
    if not isinstance(x, jax.Array):
        raise TypeError(f"{where}: x must be a JAX array of one example, (C, *spatial); got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(
            f"{where}: x must have the layer's shape {shape} (one example; batch with jax.vmap); got shape "
            f"{tuple(x.shape)}"
        )
    if x.ndim < 1:
        raise ValueError(f"{where}: x must be one example (C, *spatial) with at least 1 dimension; got a 0-d array")
    if channels is not None and x.shape[0] != channels:
        raise ValueError(
            f"{where}: x must be one example (C, *spatial) with C = {channels} channels first (batch with "
            f"jax.vmap(..., axis_name=...)); got shape {tuple(x.shape)}"
        )


def _check_momentum(where: str, momentum: Any) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"{where}: momentum must be a number in [0, 1] (Equinox's convention: the weight of the old running "
            f"value); got {momentum!r}"
        )
    return float(momentum)


def _check_flag(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool; got {type(value).__name__}")
    return value


def _freeze(where: str, name: str, v: Any) -> Any:
    """A hashable version of an option (lists become tuples; a static field must be hashable)."""
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(where, name, e) for e in v)
    try:
        hash(v)
    except TypeError:
        raise TypeError(f"{where}: {name} must be a hashable (non-array) option; got {type(v).__name__}") from None
    return v


def _check_axis_name(where: str, axis_name: Any) -> Any:
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    try:
        hash(axis_name)
    except TypeError:
        raise TypeError(f"{where}: axis_name must be a hashable axis name (a str, or a tuple of them); got "
                        f"{type(axis_name).__name__}") from None
    return axis_name


# --------------------------------------------------------------------------------------------------
# drop-ins for eqx.nn's layers
# --------------------------------------------------------------------------------------------------
class BatchNorm(eqx.nn.StatefulLayer):
    """``eqx.nn.BatchNorm`` computed by :func:`normref.batch_norm` (per example, statistics over ``axis_name``).

    In training, y = γ·(x − μ_B)/√(σ²_B + ε) + β with μ_B, σ²_B (biased) per channel over the vmapped
    batch axis and the spatial axes; Equinox's ``mode="batch"`` state is kept: a step counter k and
    hidden averages h_μ ← m·h_μ + (1 − m)·μ_B, h_σ² ← m·h_σ² + (1 − m)·σ²_B (m = ``momentum``, the weight
    of the old value; starting at 0 and 1), and inference normalizes by the zero-debiased
    h/(1 − m^k) (h itself at k = 0), as ``eqx.nn.BatchNorm`` does.

    Parameters
    ----------
    input_size : int
        C, the number of channels; the input of a call is one example ``(C, *spatial)``.
    axis_name : Hashable or Sequence[Hashable]
        The name of the batch axis of the surrounding ``jax.vmap``/``jax.pmap`` (a tuple for several).
    eps : float, default 1e-5
        ε, inside the square root.
    channelwise_affine : bool, default True
        Learnable ``weight`` γ (ones) and ``bias`` β (zeros) of shape (C,).
    momentum : float, default 0.99
        The weight of the old hidden average (Equinox's convention; normref's is ``1 - momentum``).
    inference : bool, default False
        Normalize by the running statistics (toggled by ``eqx.nn.inference_mode``).
    dtype : Any, default None
        The dtype of the parameters and running statistics (float64 in JAX's 64-bit mode, else float32).
    mode : {"batch"}, default "batch"
        Equinox's state convention. Only ``"batch"`` (the mode Equinox recommends) is available:
        ``"ema"`` (and Equinox's default ``"legacy"``, an alias of it) normalizes training batches by a
        blend of the running and the batch statistics; normref's formula for that,
        :func:`normref.blended_batch_norm`, has no cross-example (``sync=``) statistics, so it cannot run
        per example; asking for it raises ``ValueError``.

    Notes
    -----
    Survey §5.1.1 (batch normalization); running statistics: Eqn 18 in training, Eqn 16 at inference.
    Same fields as ``eqx.nn.BatchNorm`` (``weight``, ``bias``, ``batch_counter``, ``batch_state_index``,
    ``ema_first_time_index = ema_state_index = None``, ``axis_name``, ``inference``, ...). The batch
    variance comes from normref's unbiased batch estimate (``momentum=1`` in :func:`normref.batch_norm`)
    times (n − 1)/n, n = batch size × spatial size (the batch size is ``lax.psum(1, axis_name)``).

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """

    weight: Array | None
    bias: Array | None
    ema_first_time_index: None
    ema_state_index: None
    batch_counter: eqx.nn.StateIndex
    batch_state_index: eqx.nn.StateIndex
    axis_name: Any
    inference: bool
    input_size: int = field(static=True)
    eps: float = field(static=True)
    channelwise_affine: bool = field(static=True)
    momentum: float = field(static=True)
    mode: str = field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: "Hashable | Sequence[Hashable]",
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "batch",
    ) -> None:
        where = "normref.backends.equinox.BatchNorm"
        if mode != "batch":
            raise ValueError(
                f"{where}: mode must be 'batch'; got {mode!r} ('ema' and Equinox's 'legacy' normalize training "
                f"batches by blended running and batch statistics, normref.blended_batch_norm, which has no "
                f"cross-example statistics for per-example calls)"
            )
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"{where}: input_size must be a positive int; got {input_size!r}")
        dtype = _default_float() if dtype is None else dtype
        affine = _check_flag(where, "channelwise_affine", channelwise_affine)
        self.weight = jnp.ones((input_size,), dtype=dtype) if affine else None
        self.bias = jnp.zeros((input_size,), dtype=dtype) if affine else None
        self.ema_first_time_index = None
        self.ema_state_index = None
        self.batch_counter = eqx.nn.StateIndex(jnp.array(0))
        self.batch_state_index = eqx.nn.StateIndex(
            (jnp.zeros((input_size,), dtype=dtype), jnp.ones((input_size,), dtype=dtype))
        )
        self.axis_name = _check_axis_name(where, axis_name)
        self.inference = _check_flag(where, "inference", inference)
        self.input_size = input_size
        self.eps = float(eps)
        self.channelwise_affine = affine
        self.momentum = _check_momentum(where, momentum)
        self.mode = mode

    def __call__(
        self, x: Array, state: eqx.nn.State, *, key: Any = None, inference: "bool | None" = None
    ) -> "tuple[Array, eqx.nn.State]":
        """Normalize one example ``(C, *spatial)``; returns ``(y, state)``.

        Parameters
        ----------
        x : Array
            One example ``(input_size, *spatial)``, under ``jax.vmap(..., axis_name=axis_name)``.
        state : eqx.nn.State
            The running statistics.
        key : Any, default None
            Ignored (Equinox's layer API).
        inference : bool or None, default None
            Overrides the ``inference`` field.

        Returns
        -------
        y, state : tuple of Array and eqx.nn.State
            The output, the shape of ``x``, and the updated state (unchanged at inference).
        """
        del key
        where = "normref.backends.equinox.BatchNorm"
        _per_example(where, x, channels=self.input_size)
        inference = self.inference if inference is None else _check_flag(where, "inference", inference)
        counter = state.get(self.batch_counter)
        hidden_mean, hidden_var = state.get(self.batch_state_index)
        if inference:
            # Equinox's zero-debiasing: h / (1 − m^k), h itself before the first step
            scale = jnp.where(counter == 0, 1, 1 - self.momentum**counter)
            mean = (hidden_mean / scale).astype(hidden_mean.dtype)
            var = (hidden_var / scale).astype(hidden_var.dtype)
            y = nj.batch_norm(x[None], mean, var, self.weight, self.bias, False, 0.0, self.eps)
            return y[0], state
        # momentum=1: the returned running statistics are the batch's (mean, unbiased variance)
        out = nj.batch_norm(x[None], hidden_mean, hidden_var, self.weight, self.bias, True, 1.0, self.eps,
                            axis_name=self.axis_name)
        n = jax.lax.psum(1, self.axis_name) * math.prod(x.shape[1:])
        batch_var = out.running_var * ((n - 1) / n)  # Equinox keeps the biased variance
        m = self.momentum
        new_mean = (m * hidden_mean + (1 - m) * out.running_mean).astype(hidden_mean.dtype)
        new_var = (m * hidden_var + (1 - m) * batch_var).astype(hidden_var.dtype)
        state = state.set(self.batch_counter, counter + 1)
        state = state.set(self.batch_state_index, (new_mean, new_var))
        return out.output[0], state


def _stateless_result(y: Array, state: Any) -> Any:
    return y if state is _NO_STATE else (y, state)


class LayerNorm(eqx.Module):
    """``eqx.nn.LayerNorm`` computed by :func:`normref.layer_norm` over the whole example.

    y = γ ⊙ (x − μ)/√(σ² + ε) + β, μ and σ² (biased) over every element of the example ``x`` (whose shape
    is ``shape``), γ and β of shape ``shape``.

    Parameters
    ----------
    shape : int or Sequence[int]
        The shape of one example.
    eps : float, default 1e-5
        ε, inside the square root.
    use_weight : bool, default True
        Learnable ``weight`` γ (ones, shape ``shape``).
    use_bias : bool, default True
        Learnable ``bias`` β (zeros, shape ``shape``).
    dtype : Any, default None
        The dtype of γ and β (float64 in JAX's 64-bit mode, else float32).
    elementwise_affine : bool or None, default None
        Equinox's deprecated alias setting both ``use_weight`` and ``use_bias``.

    Notes
    -----
    Survey §5.1.1 (layer normalization): ``normref.layer_norm(x[None], shape, weight, bias, eps)[0]``.

    References
    ----------
    .. [1] J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    shape: tuple = field(static=True)
    eps: float = field(static=True)
    use_weight: bool = field(static=True)
    use_bias: bool = field(static=True)
    weight: Array | None
    bias: Array | None

    def __init__(
        self,
        shape: "int | Sequence[int] | None",
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
        *,
        elementwise_affine: "bool | None" = None,
    ) -> None:
        where = "normref.backends.equinox.LayerNorm"
        shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
        if elementwise_affine is not None:
            use_weight = use_bias = elementwise_affine
        dtype = _default_float() if dtype is None else dtype
        self.shape = shape
        self.eps = float(eps)
        self.use_weight = _check_flag(where, "use_weight", use_weight)
        self.use_bias = _check_flag(where, "use_bias", use_bias)
        self.weight = jnp.ones(shape, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(shape, dtype=dtype) if use_bias else None

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None) -> Any:
        """Normalize one example of shape ``shape``; returns ``y`` (or ``(y, state)`` if a state is given).

        Parameters
        ----------
        x : Array
            One example, of shape ``shape``.
        state : eqx.nn.State, optional
            Passed through unchanged (Equinox's interchangeability with ``BatchNorm``).
        key : Any, default None
            Ignored.

        Returns
        -------
        y : Array or tuple
            The output (the shape of ``x``), with ``state`` when one was given.
        """
        del key
        _per_example("normref.backends.equinox.LayerNorm", x, shape=self.shape)
        y = nj.layer_norm(x[None], self.shape, self.weight, self.bias, self.eps)[0]
        return _stateless_result(y, state)


class GroupNorm(eqx.Module):
    """``eqx.nn.GroupNorm`` computed by :func:`normref.group_norm` on one example ``(C, *spatial)``.

    The C channels split into ``groups`` groups; y = γ_c·(x − μ_g)/√(σ²_g + ε) + β_c with μ_g, σ²_g
    (biased) over each group's channels and the spatial axes.

    Parameters
    ----------
    groups : int
        G, which divides C.
    channels : int or None, default None
        C (needed with ``channelwise_affine``).
    eps : float, default 1e-5
        ε, inside the square root.
    channelwise_affine : bool, default True
        Learnable ``weight`` γ (ones) and ``bias`` β (zeros) of shape (C,).
    dtype : Any, default None
        The dtype of γ and β (float64 in JAX's 64-bit mode, else float32).

    Notes
    -----
    Survey §5.1.1 (group normalization): ``normref.group_norm(x[None], groups, weight, bias, eps)[0]``.

    References
    ----------
    .. [1] Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """

    groups: int = field(static=True)
    channels: "int | None" = field(static=True)
    eps: float = field(static=True)
    channelwise_affine: bool = field(static=True)
    weight: Array | None
    bias: Array | None

    def __init__(
        self,
        groups: int,
        channels: "int | None" = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        dtype: Any = None,
    ) -> None:
        where = "normref.backends.equinox.GroupNorm"
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{where}: groups must be a positive int; got {groups!r}")
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1
                                     or channels % groups):
            raise ValueError(f"{where}: channels must be a positive multiple of groups = {groups}; got {channels!r}")
        affine = _check_flag(where, "channelwise_affine", channelwise_affine)
        if channels is None and affine:
            raise ValueError(f"{where}: channels must be given when channelwise_affine=True; got None")
        dtype = _default_float() if dtype is None else dtype
        self.groups = groups
        self.channels = channels
        self.eps = float(eps)
        self.channelwise_affine = affine
        self.weight = jnp.ones(channels, dtype=dtype) if affine else None
        self.bias = jnp.zeros(channels, dtype=dtype) if affine else None

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None) -> Any:
        """Normalize one example ``(C, *spatial)``; returns ``y`` (or ``(y, state)`` if a state is given).

        Parameters
        ----------
        x : Array
            One example ``(C, *spatial)``.
        state : eqx.nn.State, optional
            Passed through unchanged.
        key : Any, default None
            Ignored.

        Returns
        -------
        y : Array or tuple
            The output (the shape of ``x``), with ``state`` when one was given.
        """
        del key
        _per_example("normref.backends.equinox.GroupNorm", x, channels=self.channels)
        y = nj.group_norm(x[None], self.groups, self.weight, self.bias, self.eps)[0]
        return _stateless_result(y, state)


class RMSNorm(eqx.Module):
    """``eqx.nn.RMSNorm`` computed by :func:`normref.rms_norm` over the whole example.

    y = γ ⊙ x/√(mean(x²) + ε) + β over every element of the example (shape ``shape``).

    Parameters
    ----------
    shape : int or Sequence[int]
        The shape of one example.
    eps : float, default 1e-5
        ε, inside the square root.
    use_weight : bool, default True
        Learnable ``weight`` γ (ones, shape ``shape``).
    use_bias : bool, default True
        Learnable ``bias`` β (zeros, shape ``shape``; Equinox's default), added after normref's
        ``rms_norm`` (which has no bias; this addition is the one operation JAX differentiates itself).
    dtype : Any, default None
        The dtype of γ and β (float64 in JAX's 64-bit mode, else float32).

    Notes
    -----
    Survey §5.1.2 (root-mean-square normalization): ``normref.rms_norm(x[None], shape, weight, eps)[0]``.

    References
    ----------
    .. [1] B. Zhang and R. Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    shape: tuple = field(static=True)
    eps: float = field(static=True)
    use_weight: bool = field(static=True)
    use_bias: bool = field(static=True)
    weight: Array | None
    bias: Array | None

    def __init__(
        self,
        shape: "int | Sequence[int]",
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
    ) -> None:
        where = "normref.backends.equinox.RMSNorm"
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = _default_float() if dtype is None else dtype
        self.shape = shape
        self.eps = float(eps)
        self.use_weight = _check_flag(where, "use_weight", use_weight)
        self.use_bias = _check_flag(where, "use_bias", use_bias)
        self.weight = jnp.ones(shape, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(shape, dtype=dtype) if use_bias else None

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None) -> Any:
        """Normalize one example of shape ``shape``; returns ``y`` (or ``(y, state)`` if a state is given).

        Parameters
        ----------
        x : Array
            One example, of shape ``shape``.
        state : eqx.nn.State, optional
            Passed through unchanged.
        key : Any, default None
            Ignored.

        Returns
        -------
        y : Array or tuple
            The output (the shape of ``x``), with ``state`` when one was given.
        """
        del key
        _per_example("normref.backends.equinox.RMSNorm", x, shape=self.shape)
        y = nj.rms_norm(x[None], self.shape, self.weight, self.eps)[0]
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return _stateless_result(y, state)


# --------------------------------------------------------------------------------------------------
# any activation method of the registry
# --------------------------------------------------------------------------------------------------
_FLAGS = ("training", "use_input_stats")  # the argument that selects batch vs population statistics
# not options of a layer: the flag (from `inference`), the batch count (a host int), buffers, the
# reducer (from axis_name), momentum (Equinox's convention, converted) and the channel axis (channels
# first, always, in Equinox)
_NOT_OPTIONS = frozenset(_FLAGS) | {"num_batches_tracked", "out", "sync", "momentum", "channel_axis"}
_AFFINE = frozenset({"weight", "bias"})
# Methods whose statistics are per example (no sync=) but whose running statistics average a
# per-example quantity over the batch: their update, linear in that quantity, is the mean over the
# vmapped axis of the per-example updates (lax.pmean), which is the batch update exactly.
_BATCH_MEAN_STATE = frozenset({"instance_norm"})
# Methods that make no per-example layer, and why. Ghost batches split the batch axis itself, which a
# per-example call cannot see (batch groups too: ``batch_groups`` must stay 1, checked per layer).
_NOT_LAYERS = {
    "ghost_batch_norm": "its partition splits the batch axis into ghost batches, which a per-example call cannot see",
    "decov_penalty": "it returns a penalty (a scalar), not a normalized activation",
}


def _initial(method: str, name: str, c: int, gs: int, dtype: Any) -> "Array | None":
    """The initial value of array argument ``name`` (torch adapter's table: see normref.backends.torch)."""
    g = c // gs
    if name == "running_cov" or (name == "weight" and method == "whitening_coloring"):
        return jnp.broadcast_to(jnp.eye(gs, dtype=dtype), (g, gs, gs))
    if name in ("running_var", "running_scale", "running_mean_square", "weight", "rho"):
        return jnp.ones((c,), dtype=dtype)
    if name in ("running_mean", "bias", "tau"):
        return jnp.zeros((c,), dtype=dtype)
    if name in ("mean_weight", "var_weight"):
        return jnp.ones((3,), dtype=dtype)
    return None


def _why_not(method: str) -> "str | None":
    """Why the registered ``method`` has no per-example layer, or None if it has one."""
    try:
        m = get(method)
    except (KeyError, ValueError, TypeError):
        return "it is not a registered method"
    if m.category != "activation" or not m.array_params or m.array_params[0] != "input":
        return "a layer needs an activation method whose first array argument is input"
    params = m.signature.parameters
    if method in _NOT_LAYERS:
        return _NOT_LAYERS[method]
    has_state = any(p in m.nondiff for p in m.array_params[1:])
    if has_state and "sync" not in params and method not in _BATCH_MEAN_STATE:
        return ("its batch statistics have no sync= reducer, so a per-example call under vmap would see a batch "
                "of one")
    for p in m.array_params[1:]:
        if _initial(method, p, 2, 1, jnp.float32) is None and p not in ("weight", "bias"):
            return f"no initial value is known for its array argument {p!r}"
    return None


def supported_methods() -> "tuple[str, ...]":
    """The registered methods that :class:`Norm` builds a per-example layer for.

    Returns
    -------
    names : tuple of str
        The method names, sorted (the others raise ``TypeError`` in :class:`Norm` saying why).

    Notes
    -----
    A method qualifies when its first array argument is ``input`` ``(N, C, *spatial)``, its batch
    statistics (if any) are reduced through a ``sync=`` reducer (or are per example with a batch-mean
    running update: instance norm), its partition does not split the batch axis, and each of its
    array arguments has a known initial value.
    """
    from normref.registry import REGISTRY

    return tuple(sorted(n for n in REGISTRY if _why_not(n) is None))


class Norm(eqx.nn.StatefulLayer):
    """Any activation method of the registry as an Equinox layer, called per example under ``vmap``.

    ``Norm("iter_norm", 64, axis_name="batch", group_size=16)``; the call ``layer(x, state)`` runs
    ``normref.<method>(x[None], ...)`` through :mod:`normref.backends.jax` and returns ``(y[0], state)``
    (``y`` alone for a method without running statistics when no state is passed). The learnable arrays
    (``weight``, ``bias``, ``rho``, ``tau``, ...) are the dict field ``params`` (their initial values are
    the torch adapter's: see :mod:`normref.backends.torch.modules`); the running statistics are one
    ``eqx.nn.StateIndex`` (``state_index``) holding a dict of them.

    Parameters
    ----------
    method : str
        The registered activation method (see :func:`supported_methods`).
    num_features : int
        C, the channel count (one example is ``(C, *spatial)``).
    axis_name : Hashable or None, default None
        The batch axis of the surrounding ``jax.vmap``/``pmap``; required for methods with batch
        statistics (passed as ``axis_name=`` to :mod:`normref.backends.jax` in training mode; for
        instance norm the running statistics' update is averaged over it).
    momentum : float or None, default None
        Equinox's convention, the weight of the old running value (``None``: 0.99, as
        ``eqx.nn.BatchNorm``); normref's momentum is ``1 - momentum``. Only for methods that have one.
    affine : bool, default True
        Learnable ``weight``/``bias`` (``False``: both ``None``).
    track_running_stats : bool, default True
        Keep running statistics in the State (``False``: batch statistics at inference too, no state).
    inference : bool, default False
        Normalize by the running statistics (``eqx.nn.inference_mode`` toggles it).
    dtype : Any, default None
        The dtype of the arrays (float64 in JAX's 64-bit mode, else float32).
    **options : Any
        The method's other non-array arguments (``eps``, ``group_size``, ``iterations``, ``rmax``, ...),
        with the method's defaults.

    Notes
    -----
    The method's own docstring gives its formula, survey section and paper; running statistics follow
    survey Eqn 18 (training) and Eqn 16 (inference). ``momentum=None`` in normref's sense (the
    cumulative average over the batches seen) needs the step count as a Python int and is not offered.

    References
    ----------
    .. [1] P. Kidger and C. Garcia, "Equinox: neural networks in JAX via callable PyTrees and filtered
       transformations", Differentiable Programming workshop at NeurIPS 2021 (the layer conventions).
    """

    method: str = field(static=True)
    num_features: int = field(static=True)
    params: dict
    state_index: "eqx.nn.StateIndex | None"
    axis_name: Any = field(static=True)
    inference: bool
    momentum: "float | None" = field(static=True)
    track_running_stats: bool = field(static=True)
    options: tuple = field(static=True)

    def __init__(
        self,
        method: str,
        num_features: int,
        /,
        *,
        axis_name: "Hashable | None" = None,
        momentum: "float | None" = None,
        affine: bool = True,
        track_running_stats: bool = True,
        inference: bool = False,
        dtype: Any = None,
        **options: Any,
    ) -> None:
        m = get(method)
        where = f"normref.backends.equinox.Norm({m.name!r})"
        why = _why_not(m.name)
        if why is not None:
            raise TypeError(f"{where}: no per-example layer for {m.name}: {why}")
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{where}: num_features must be a positive int; got {num_features!r}")
        params = m.signature.parameters
        allowed = [p for p in params if p not in m.array_params and p not in _NOT_OPTIONS]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise TypeError(f"{where}: unexpected argument {unknown[0]!r}; the method's options are {allowed}")
        missing = [p for p in allowed if p not in options and params[p].default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{where}: missing required argument {missing[0]!r}")
        affine = _check_flag(where, "affine", affine)
        track = _check_flag(where, "track_running_stats", track_running_stats)
        gs = options.get("group_size") or num_features
        if "group_size" in options and options["group_size"] is not None and (
            not isinstance(gs, int) or isinstance(gs, bool) or gs < 1 or num_features % gs
        ):
            raise ValueError(f"{where}: group_size must be a positive divisor of num_features = {num_features}; "
                             f"got {gs!r}")
        state_names = [p for p in m.array_params[1:] if p in m.nondiff]
        if "momentum" in params and state_names:
            self.momentum = _check_momentum(where, 0.99 if momentum is None else momentum)
        elif momentum is not None:
            raise TypeError(f"{where}: normref.{m.name} has no running statistics to take a momentum")
        else:
            self.momentum = None
        if options.get("batch_groups", 1) != 1:
            raise ValueError(f"{where}: batch_groups must be 1 in a per-example layer (groups of the batch axis "
                             f"cannot be formed from per-example calls); got {options['batch_groups']!r}")
        batch_stats = "sync" in params or m.name in _BATCH_MEAN_STATE
        if ("sync" in params or (batch_stats and state_names and track)) and axis_name is None:
            raise ValueError(f"{where}: axis_name is required (the batch axis of the surrounding jax.vmap, over "
                             f"which normref.{m.name}'s batch statistics are taken); got None")
        if axis_name is not None and not batch_stats:
            raise TypeError(f"{where}: normref.{m.name} has no batch statistics to take an axis_name")
        dtype = _default_float() if dtype is None else dtype
        self.method = m.name
        self.num_features = num_features
        self.axis_name = None if axis_name is None else _check_axis_name(where, axis_name)
        self.inference = _check_flag(where, "inference", inference)
        self.track_running_stats = track
        self.options = tuple((p, _freeze(where, p, options[p])) for p in allowed if p in options)
        self.params = {
            p: (None if (p in _AFFINE and not affine) else _initial(m.name, p, num_features, gs, dtype))
            for p in m.array_params[1:] if p not in m.nondiff
        }
        if "normalized_shape" in options:  # layer / RMS norm: the affine arrays have the normalized shape
            ns = options["normalized_shape"]
            ns = (ns,) if isinstance(ns, int) else tuple(ns)
            self.params = {p: (None if v is None else jnp.broadcast_to(v[:1].reshape((1,) * len(ns)), ns))
                           for p, v in self.params.items()}
        stats = {p: _initial(m.name, p, num_features, gs, dtype) for p in state_names}
        self.state_index = eqx.nn.StateIndex(stats) if (track and stats) else None

    def is_stateful(self) -> bool:
        """Whether the layer keeps running statistics (``eqx.nn.Sequential`` then passes the state).

        Returns
        -------
        stateful : bool
            ``True`` when the layer has a ``state_index``.
        """
        return self.state_index is not None

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None, inference: "bool | None" = None) -> Any:
        """Normalize one example ``(C, *spatial)`` by ``normref.<method>``.

        Parameters
        ----------
        x : Array
            One example ``(num_features, *spatial)``, under ``jax.vmap(..., axis_name=axis_name)`` for
            methods with batch statistics.
        state : eqx.nn.State, optional
            The running statistics (required when the layer has them).
        key : Any, default None
            Ignored.
        inference : bool or None, default None
            Overrides the ``inference`` field.

        Returns
        -------
        y : Array or tuple
            ``(y, state)`` (the state updated in training), or ``y`` for a layer without running
            statistics called without a state.
        """
        del key
        m = get(self.method)
        where = f"normref.backends.equinox.Norm({self.method!r})"
        _per_example(where, x, channels=self.num_features)
        inference = self.inference if inference is None else _check_flag(where, "inference", inference)
        kwargs: dict[str, Any] = dict(self.options)
        kwargs.update(self.params)
        stats: dict = {}
        if self.state_index is not None:
            if state is _NO_STATE:
                raise TypeError(f"{where}: the layer has running statistics; call it as layer(x, state)")
            stats = state.get(self.state_index)
            kwargs.update(stats)
        use_batch = not inference or self.state_index is None
        flag = next((f for f in _FLAGS if f in m.signature.parameters), None)
        if flag is not None:
            kwargs[flag] = use_batch
        if self.momentum is not None:
            kwargs["momentum"] = 1.0 - self.momentum  # normref's (torch's) momentum: the batch's weight
        synced = "sync" in m.signature.parameters and use_batch
        out = nj.function(m.name)(x[None], **kwargs, **({"axis_name": self.axis_name} if synced else {}))
        if not isinstance(out, tuple):
            return _stateless_result(out[0], state)
        y = out[0][0]
        if self.state_index is not None and use_batch:
            new = {p: getattr(out, p) for p in stats}
            if self.method in _BATCH_MEAN_STATE:  # per-example updates, averaged over the batch
                new = {p: jax.lax.pmean(v, self.axis_name) for p, v in new.items()}
            state = state.set(self.state_index, {p: new[p].astype(stats[p].dtype) for p in stats})
        return _stateless_result(y, state)


# registry method of each named layer
# (normref's table without GhostBatchNorm, whose virtual batches split the vmapped batch axis itself,
# and with the per-sample methods a per-example call serves)
_NAMED = {
    "InstanceNorm": "instance_norm",
    **{k: v for k, v in NAMED_LAYERS.items() if k != "GhostBatchNorm"},
    "PositionNorm": "position_norm",
    "PixelNorm": "pixel_norm",
    "LocalResponseNorm": "local_response_norm",
    "AdaptiveLayerInstanceNorm": "adaptive_layer_instance_norm",
}


def _named_layer(cls_name: str, method: str) -> type:
    def __init__(self, num_features: int, **kwargs: Any) -> None:
        Norm.__init__(self, method, num_features, **kwargs)

    m = get(method)
    doc = (
        f"An Equinox layer computing :func:`normref.{method}` per example, running statistics in the State.\n\n"
        f"``{cls_name}(num_features, **options)``: :class:`Norm` with the method fixed.\n\n"
        "Parameters\n----------\n"
        "num_features : int\n    C, the channel count (one example is ``(C, *spatial)``).\n"
        "**kwargs : Any\n    The options of :class:`Norm` (``axis_name``, ``momentum``, ``affine``, "
        "``track_running_stats``, ``inference``, ``dtype``) and the method's non-array arguments.\n"
        + (f"\nNotes\n-----\nSurvey {m.survey}.\n" if m.survey else "")
        + (f"\nReferences\n----------\n{m.paper}.\n" if m.paper else "")
    )

    def body(ns: dict) -> None:
        ns.update({"__init__": __init__, "__doc__": doc, "__module__": __name__})

    return types.new_class(cls_name, (Norm,), exec_body=body)


for _cls, _method in _NAMED.items():
    globals()[_cls] = _named_layer(_cls, _method)
del _cls, _method
