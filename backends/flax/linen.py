"""Flax linen layers over normref: ``BatchNorm``, ``LayerNorm``, ``GroupNorm`` and a generic ``Norm``.

    from normref.backends.flax import linen as ntl
    model = ntl.BatchNorm(use_running_average=False)
    variables = model.init(key, x)                     # {"params": {scale, bias}, "batch_stats": {mean, var}}
    y, updates = model.apply(variables, x, mutable=["batch_stats"])

The same fields, defaults and variable collections/names/shapes as ``flax.linen``'s layers (so the
variables of one apply to the other), computed by normref's methods with their analytic backward
(:mod:`normref.backends.jax`). ``BatchNorm`` keeps Flax's biased running variance and does not
update the statistics while initializing, as linen does. The nnx layers are in
:mod:`normref.backends.flax`; the limits listed there (no ``mask``, no ``axis_index_groups``,
``use_fast_variance`` ignored) hold here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from normref._xp import Array
from normref.backends import jax as nj

from ._nnx import (
    _batch_count,
    _canonical_axis,
    _channels_call,
    _check_mask,
    _feature_weight,
    _flax_momentum_to_normref,
    _trailing,
)
from ._nnx import Norm as _NnxNorm

__all__ = ["BatchNorm", "LayerNorm", "GroupNorm", "Norm"]


def _promote(dtype: Any, *arrays: Any) -> tuple:
    """The arrays in one dtype: ``dtype`` or their result type (None entries stay None), as linen."""
    present = [a for a in arrays if a is not None]
    dt = jnp.result_type(*present) if dtype is None else dtype
    return tuple(None if a is None else jnp.asarray(a, dt) for a in arrays)


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` computed by :func:`normref.batch_norm` (features last).

    y = scale·(x − μ_B)/√(σ_B² + ε) + bias over every axis but ``axis`` (survey §5.1.1, Eqn 6);
    ``batch_stats``: ``mean ← momentum·mean + (1 − momentum)·μ_B``, ``var`` likewise with the biased
    σ_B² (Flax's convention), not updated during ``init``.

    Parameters
    ----------
    use_running_average : bool or None, default None
        Running statistics instead of the batch's (also a call argument, merged as linen does).
    axis : int, default -1
        The feature axis (not the batch axis 0).
    momentum : float, default 0.99
        The weight of the old running value.
    epsilon : float, default 1e-5
        ε.
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init
        As ``flax.linen.BatchNorm``.
    axis_name : Hashable or None, default None
        Batch statistics across the named axis (normref's ``sync=``), in training.
    axis_index_groups : None
        Not supported.
    use_fast_variance, force_float32_reductions : bool, default True
        Accepted and ignored (normref: stable two-pass variance; statistics of float16/bfloat16 inputs
        are accumulated in float32 anyway; the running statistics are float32).

    Notes
    -----
    Survey §5.1.1. Gradients are normref's analytic backward.

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Any = None) -> Array:
        """Normalize ``x``; in training (and not initializing) update ``batch_stats``.

        Parameters
        ----------
        x : Array
            The input, features on ``self.axis``.
        use_running_average : bool or None, default None
            Merged with the field (one of them must be given).
        mask : None
            Not supported.

        Returns
        -------
        y : Array
            ``x``'s shape.
        """
        _check_mask("BatchNorm", mask)
        if self.axis_index_groups is not None:
            raise NotImplementedError("BatchNorm: axis_index_groups is not supported by normref's layer")
        _flax_momentum_to_normref("BatchNorm", self.momentum)
        use_ra = nn.module.merge_param("use_running_average", self.use_running_average, use_running_average)
        a = _canonical_axis("BatchNorm", "axis", self.axis, x.ndim)
        shape = (x.shape[a],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        x, scale, bias = _promote(self.dtype, x, scale, bias)
        if use_ra:
            mean, var = _promote(x.dtype, ra_mean.value, ra_var.value)
            return _channels_call("BatchNorm", "batch_norm", x, a, mean, var, scale, bias, False, 0.0, self.epsilon)
        # normref with momentum = 1 returns the batch mean and unbiased variance; Flax's EMA is applied
        syncing = self.axis_name is not None and not self.is_initializing()
        kw = {"axis_name": self.axis_name} if syncing else {}
        zeros = jnp.zeros(shape, x.dtype)
        y, mu, var_unbiased = _channels_call("BatchNorm", "batch_norm", x, a, zeros, zeros, scale, bias, True, 1.0,
                                             self.epsilon, **kw)
        if not self.is_initializing():
            n = _batch_count(x, a, self.axis_name if syncing else None)
            m = self.momentum
            ra_mean.value = jax.lax.stop_gradient(m * ra_mean.value + (1 - m) * mu)
            ra_var.value = jax.lax.stop_gradient(m * ra_var.value + (1 - m) * var_unbiased * ((n - 1) / n))
        return y


class LayerNorm(nn.Module):
    """``flax.linen.LayerNorm`` computed by :func:`normref.layer_norm`.

    y = scale·(x − μ)/√(σ² + ε) + bias over ``reduction_axes`` (the trailing axes) of each sample
    (survey §5.1.1).

    Parameters
    ----------
    epsilon : float, default 1e-6
        ε.
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init
        As ``flax.linen.LayerNorm``.
    reduction_axes : int or sequence of int, default -1
        The normalized axes: the trailing ones.
    feature_axes : int or sequence of int, default -1
        The axes of ``scale``/``bias`` (among the reduction axes).
    axis_name, axis_index_groups : None
        Not supported.
    use_fast_variance, force_float32_reductions : bool, default True
        Ignored.

    Notes
    -----
    Survey §5.1.1. Gradients are normref's analytic backward.

    References
    ----------
    .. [1] J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    reduction_axes: int | Sequence[int] = -1
    feature_axes: int | Sequence[int] = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Any = None) -> Array:
        """Normalize each sample of ``x``.

        Parameters
        ----------
        x : Array
            The input.
        mask : None
            Not supported.

        Returns
        -------
        y : Array
            ``x``'s shape.
        """
        _check_mask("LayerNorm", mask)
        if self.axis_name is not None or self.axis_index_groups is not None:
            raise NotImplementedError("LayerNorm: axis_name/axis_index_groups are not supported by normref's layer")
        red = _trailing("LayerNorm", "reduction_axes", self.reduction_axes, x.ndim)
        fa = (self.feature_axes,) if isinstance(self.feature_axes, int) else tuple(self.feature_axes)
        shape = tuple(x.shape[i % x.ndim] for i in sorted({i % x.ndim for i in fa}))
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        x, scale, bias = _promote(self.dtype, x, scale, bias)
        w = _feature_weight("LayerNorm", None if scale is None else scale.reshape(-1), x, red, self.feature_axes)
        b = _feature_weight("LayerNorm", None if bias is None else bias.reshape(-1), x, red, self.feature_axes)
        return nj.layer_norm(x, tuple(x.shape[i] for i in red), w, b, self.epsilon)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm`` computed by :func:`normref.group_norm` (features last).

    The last axis's C features in G groups; statistics over each group's features and every
    non-batch axis of each sample (survey §5.1.1).

    Parameters
    ----------
    num_groups : int or None, default 32
        G (``None`` with ``group_size``).
    group_size : int or None, default None
        C/G instead of ``num_groups``.
    epsilon : float, default 1e-6
        ε.
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init
        As ``flax.linen.GroupNorm``.
    reduction_axes : None
        Only the default.
    axis_name, axis_index_groups : None
        Not supported.
    use_fast_variance, force_float32_reductions : bool, default True
        Ignored.

    Notes
    -----
    Survey §5.1.1. Gradients are normref's analytic backward.

    References
    ----------
    .. [1] Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = initializers.zeros
    scale_init: Callable = initializers.ones
    reduction_axes: Any = None
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Any = None) -> Array:
        """Normalize each sample's groups of features.

        Parameters
        ----------
        x : Array
            The input, features last.
        mask : None
            Not supported.

        Returns
        -------
        y : Array
            ``x``'s shape.
        """
        _check_mask("GroupNorm", mask)
        if self.axis_name is not None or self.axis_index_groups is not None or self.reduction_axes is not None:
            raise NotImplementedError("GroupNorm: axis_name, axis_index_groups and reduction_axes are not supported by "
                                      "normref's layer")
        c = x.shape[-1]
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError("GroupNorm: give exactly one of num_groups and group_size")
        g = c // self.group_size if self.group_size is not None else self.num_groups
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or c % g or (
            self.group_size is not None and c % self.group_size
        ):
            raise ValueError(f"GroupNorm: num_groups={self.num_groups!r}, group_size={self.group_size!r} do not "
                             f"divide the {c} features")
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
        x, scale, bias = _promote(self.dtype, x, scale, bias)
        return _channels_call("GroupNorm", "group_norm", x, -1, g, scale, bias, self.epsilon)


class Norm(nn.Module):
    """Any activation method of normref as a linen layer (features last).

    Built like :class:`normref.backends.flax.Norm`: learnable arrays in ``params``, running statistics
    in ``batch_stats`` (not updated during ``init``), named as the method's arguments.

    Parameters
    ----------
    method : str
        The registered activation method.
    use_running_average : bool or None, default None
        Running statistics instead of the batch's (also a call argument).
    axis : int, default -1
        The feature axis.
    momentum : float, None or Ellipsis, default ...
        Flax's convention (weight of the old value); normref's momentum is ``1 −`` this. ``...``: the
        nnx layer's default (0.99 for torch-style methods), for methods that take a momentum.
    use_scale, use_bias : bool, default True
        Learnable ``weight`` / ``bias``.
    axis_name : Hashable or None, default None
        Batch statistics across the named axis (methods with ``sync=``).
    options : tuple of (str, value) pairs, default ()
        The method's other non-array arguments, e.g. ``(("group_size", 4),)`` (hashable: linen
        fields must be).

    Notes
    -----
    The initial values and the state rule are the nnx layer's (see its docstring); the method's own
    docstring gives its formula, survey section and paper.
    """

    method: str
    use_running_average: bool | None = None
    axis: int = -1
    momentum: Any = ...
    use_scale: bool = True
    use_bias: bool = True
    axis_name: Any = None
    options: tuple = ()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """The method on ``x``.

        Parameters
        ----------
        x : Array
            The input, features on ``self.axis``.
        use_running_average : bool or None, default None
            Merged with the field.

        Returns
        -------
        y : Array
            The method's primary output.
        """
        # merged as linen's merge_param, except that neither is needed by a method without state
        if self.use_running_average is not None and use_running_average is not None:
            raise ValueError(f"Norm({self.method!r}): use_running_average given both as a field and at call time")
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        a = _canonical_axis(f"Norm({self.method!r})", "axis", self.axis, x.ndim)
        # the nnx layer holds the construction logic (validation, initial values, the state rule):
        # build it, load this module's variables into it, run it, read the state back
        momentum = {} if self.momentum is ... else {"momentum": self.momentum}
        layer = _NnxNorm(self.method, x.shape[a], use_running_average=use_ra, axis=self.axis,
                         **momentum, use_scale=self.use_scale, use_bias=self.use_bias,
                         axis_name=None if self.is_initializing() else self.axis_name, **dict(self.options))
        for p in layer._param_names:
            v = getattr(layer, p)
            if v is not None:
                getattr(layer, p)[...] = self.param(p, lambda _k, init=v[...]: init)
        stats = {p: self.variable("batch_stats", p, lambda init=getattr(layer, p)[...]: init)
                 for p in layer._state_names + (["num_batches_tracked"] if layer._counts else [])}
        for p, var in stats.items():
            getattr(layer, p)[...] = var.value
        y = layer(x)
        if not use_ra and not self.is_initializing():  # training: the state moved (as linen's BatchNorm)
            for p, var in stats.items():
                var.value = getattr(layer, p)[...]
        return y
