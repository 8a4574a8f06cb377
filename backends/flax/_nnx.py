"""Flax NNX layers over normref's methods (see :mod:`normref.backends.flax`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from normref._xp import Array
from normref.backends import jax as nj
from normref.registry import NAMED_LAYERS, get

__all__ = ["BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm", "Norm", "NAMED"]

# methods whose partition has no channel axis: they normalize trailing dimensions (normalized_shape)
_NO_CHANNEL_AXIS = frozenset({"layer_norm", "rms_norm"})


# --------------------------------------------------------------------------------------------------
# features last: Flax's axis=-1 on normref's (N, C, *S) methods
# --------------------------------------------------------------------------------------------------
def _canonical_axis(where: str, name: str, axis: Any, ndim: int) -> int:
    """``axis`` as a non-negative int in [1, ndim): a feature axis that is not the batch axis 0."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{where}: {name} must be an int (the feature axis); got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{where}: {name}={axis} is out of range for a {ndim}-D input")
    a = axis % ndim
    if a == 0:
        raise ValueError(f"{where}: {name}={axis} is the batch axis 0 of the {ndim}-D input; the feature axis "
                         f"must be another one (Flax's default is -1, features last)")
    return a


def _channels_call(where: str, method: str, x: Array, axis: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``normref.backends.jax.<method>`` on an input whose channel axis is ``axis`` (any, not 0).

    If the method takes ``channel_axis=`` (normref's channel partitions, issue 16), the axis is passed
    through: no transpose. Otherwise the axis is moved to 1 (normref's (N, C, *S) layout) with
    ``jnp.moveaxis`` and the primary output moved back (JAX differentiates the two transposes; the
    normalization's gradient is still normref's backward)."""
    fn = nj.function(method)
    a = _canonical_axis(where, "axis", axis, x.ndim)
    if a == 1 or x.ndim < 2:
        return fn(x, *args, **kwargs)
    if "channel_axis" in get(method).signature.parameters:
        return fn(x, *args, channel_axis=a, **kwargs)
    out = fn(jnp.moveaxis(x, a, 1), *args, **kwargs)
    if isinstance(out, tuple):  # a NamedTuple: the output, then state (per channel, no layout)
        return type(out)(jnp.moveaxis(out[0], 1, a), *out[1:])
    return jnp.moveaxis(out, 1, a)


def _optional(v: Any) -> Any:
    return None if v is None else v[...]


def _flax_momentum_to_normref(where: str, momentum: Any) -> Any:
    """Flax's momentum (the weight of the old value) as normref's (torch's: the weight of the new)."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{where}: momentum must be a float in [0, 1] (Flax's convention: the weight of the old "
                         f"running value) or None; got {momentum!r}")
    return 1.0 - float(momentum)


def _check_mask(where: str, mask: Any) -> None:
    if mask is not None:
        raise NotImplementedError(f"{where}: mask= is not supported by normref's layers (statistics over every "
                                  f"position); use flax.nnx's layer for masked statistics")


def _check_no_axis_name(where: str, axis_name: Any, axis_index_groups: Any) -> None:
    if axis_name is not None or axis_index_groups is not None:
        raise NotImplementedError(
            f"{where}: axis_name/axis_index_groups (statistics across devices) are taken by the layers with batch "
            f"statistics (BatchNorm and the generic layers of methods with sync); this one computes per-sample "
            f"statistics"
        )


def _batch_count(x: Array, a: int, axis_name: Any) -> Any:
    """n, the number of values in each channel's batch statistic (global across ``axis_name``)."""
    n = 1
    for i, s in enumerate(x.shape):
        if i != a:
            n *= s
    if axis_name is not None:
        n = n * jax.lax.psum(1, axis_name)
    return n


# --------------------------------------------------------------------------------------------------
# drop-ins for flax.nnx's layers: same constructor, attribute names, shapes and variable types
# --------------------------------------------------------------------------------------------------
class _Affine(nnx.Module):
    """The learnable scale/bias of flax's norm layers, initialized as flax does (same RNG draws)."""

    scale: Any  # nnx.Param, or None (use_scale=False)
    bias: Any

    def _init_affine(self, feature_shape, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
                     scale_metadata, bias_metadata) -> None:
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)


class BatchNorm(_Affine):
    """``flax.nnx.BatchNorm`` computed by :func:`normref.batch_norm` (features last).

    y = scale·(x − μ_B)/√(σ_B² + ε) + bias, μ_B, σ_B² over every axis but ``axis`` (survey §5.1.1,
    Eqn 6); at inference the running ``mean``/``var``. Running statistics as Flax:
    ``mean ← momentum·mean + (1 − momentum)·μ_B``, ``var ← momentum·var + (1 − momentum)·σ_B²`` with
    σ_B² the **biased** batch variance (Flax's convention; normref's own batch_norm and torch keep the
    unbiased one, which this layer converts: σ_B² = n−1/n · the unbiased variance normref returns).

    Parameters
    ----------
    num_features : int
        C, the size of the feature axis.
    use_running_average : bool or None, default False
        Normalize with the running statistics (inference) instead of the batch's; the call argument
        takes precedence, as in Flax (``nnx.view``/``model.eval()`` set it).
    axis : int, default -1
        The feature axis (Flax: features last); not the batch axis 0.
    momentum : float, default 0.99
        The weight of the old running value (Flax's convention; normref's ``momentum`` is 1 − this).
    epsilon : float, default 1e-5
        ε, added to the variance.
    dtype : dtype or None, default None
        The computation dtype (None: promoted from the input and the variables, as Flax).
    param_dtype : dtype, default float32
        The dtype of ``scale`` and ``bias`` (the statistics are float32, as Flax's).
    use_bias, use_scale : bool, default True
        Learnable ``bias`` / ``scale`` (``nnx.Param``, shape (C,)).
    bias_init, scale_init : Initializer
        Their initializers (zeros, ones).
    axis_name : Hashable or None, default None
        Batch statistics across the named axis (``pmap``, ``shard_map``, ``vmap(axis_name=...)``):
        normref's ``sync=`` reducer (``normref.backends.jax``'s ``axis_name=``), in training only.
    axis_index_groups : None
        Not supported (``NotImplementedError`` if given).
    use_fast_variance : bool, default True
        Accepted for compatibility and ignored: normref always computes the variance stably (two
        passes), never as E[x²] − E[x]².
    promote_dtype : callable, default flax's ``promote_dtype``
        How the input and the variables are brought to one dtype before the call.
    rngs : nnx.Rngs
        Two ``params`` keys are drawn (scale, bias), as Flax does: a model draws the same keys.
    bias_metadata, scale_metadata : Mapping
        Metadata of the two Params.

    Notes
    -----
    Survey §5.1.1. Gradients are normref's analytic backward (the ``jax.custom_vjp`` of
    :mod:`normref.backends.jax`), never JAX's differentiation of the formula. Variables: ``scale``,
    ``bias`` (``nnx.Param``), ``mean``, ``var`` (``nnx.BatchStat``), as ``flax.nnx.BatchNorm``, so a
    state can be swapped with ``nnx.update``. ``mask=`` is not supported.

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = initializers.zeros_init(),
        scale_init: Callable = initializers.ones_init(),
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Any = MappingProxyType({}),
        scale_metadata: Any = MappingProxyType({}),
    ) -> None:
        if axis_index_groups is not None:
            raise NotImplementedError("BatchNorm: axis_index_groups is not supported by normref's layer")
        if momentum is None:  # flax.nnx.BatchNorm has no cumulative average either
            raise ValueError("BatchNorm: momentum must be a float in [0, 1] (Flax's convention: the weight of the "
                             "old running value); got None (use Norm('batch_norm', ..., momentum=None) for a "
                             "cumulative average, outside jit)")
        _flax_momentum_to_normref("BatchNorm", momentum)
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        self._init_affine(feature_shape, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
                          scale_metadata, bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: set ``use_running_average``.

        Parameters
        ----------
        use_running_average : bool or None, default None
            The new value (None: unchanged).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Any = None) -> Array:
        """Normalize ``x`` with the batch statistics (training) or the running ones.

        Parameters
        ----------
        x : Array
            The input, features on ``self.axis``.
        use_running_average : bool or None, default None
            Overrides the constructor's value.
        mask : None
            Not supported.

        Returns
        -------
        y : Array
            The normalized input, ``x``'s shape.
        """
        _check_mask("BatchNorm", mask)
        use_ra = use_running_average if use_running_average is not None else self.use_running_average
        if use_ra is None:
            raise ValueError("BatchNorm: no use_running_average was given (to the constructor or the call)")
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _optional(self.scale), _optional(self.bias)), dtype=self.dtype
        )
        if use_ra:
            return _channels_call("BatchNorm", "batch_norm", x, self.axis, mean, var, scale, bias, False, 0.0,
                                  self.epsilon)
        # training: normref returns the batch mean and the unbiased batch variance as its running
        # statistics when momentum = 1 ((1 − 1)·0 + 1·stat, exactly); Flax's update is applied to them
        kw = {} if self.axis_name is None else {"axis_name": self.axis_name}
        zeros = jnp.zeros_like(mean)
        y, mu, var_unbiased = _channels_call("BatchNorm", "batch_norm", x, self.axis, zeros, zeros, scale, bias,
                                             True, 1.0, self.epsilon, **kw)
        n = _batch_count(x, _canonical_axis("BatchNorm", "axis", self.axis, x.ndim), self.axis_name)
        var_biased = var_unbiased * ((n - 1) / n)  # Flax keeps the biased batch variance σ_B²
        m = self.momentum
        # in the variables' own dtype (float32; a float64 input under x64 must not scatter a float64 in)
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mu).astype(self.mean[...].dtype)
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var_biased).astype(self.var[...].dtype)
        return y


def _trailing(where: str, name: str, axes: Any, ndim: int) -> tuple[int, ...]:
    """``axes`` (int or sequence) canonicalized; they must be the trailing k axes of the input."""
    seq = (axes,) if isinstance(axes, int) and not isinstance(axes, bool) else tuple(axes)
    if not seq or any(isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim for a in seq):
        raise ValueError(f"{where}: {name} must be axes of the {ndim}-D input; got {axes!r}")
    can = tuple(sorted({a % ndim for a in seq}))
    if can != tuple(range(ndim - len(can), ndim)):
        raise ValueError(f"{where}: normref's layer normalizes trailing axes; {name}={axes!r} are not the last "
                         f"{len(can)} axes of the {ndim}-D input")
    return can


def _feature_weight(where: str, w: Any, x: Array, reduction: tuple[int, ...], feature_axes: Any) -> Any:
    """The (num_features,) ``w`` as an array of the normalized shape: reshaped onto the feature axes
    (which must lie among the normalized ones) and broadcast over the others."""
    if w is None:
        return None
    ndim = x.ndim
    seq = (feature_axes,) if isinstance(feature_axes, int) and not isinstance(feature_axes, bool) else tuple(feature_axes)
    feats = sorted({a % ndim for a in seq})
    if any(a not in reduction for a in feats):
        raise ValueError(f"{where}: feature_axes={feature_axes!r} must lie among the normalized axes {reduction} "
                         f"for normref's layer")
    shape = tuple(x.shape[a] if a in feats else 1 for a in reduction)
    normalized = tuple(x.shape[a] for a in reduction)
    return jnp.broadcast_to(jnp.reshape(w, shape), normalized)


class LayerNorm(_Affine):
    """``flax.nnx.LayerNorm`` computed by :func:`normref.layer_norm`.

    y = scale·(x − μ)/√(σ² + ε) + bias, μ and σ² (biased) over ``reduction_axes`` of each sample
    (survey §5.1.1).

    Parameters
    ----------
    num_features : int
        The size of the feature axes (the length of ``scale``/``bias``).
    epsilon : float, default 1e-6
        ε (Flax's default; torch's is 1e-5).
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, promote_dtype, rngs, bias_metadata, scale_metadata
        As ``flax.nnx.LayerNorm``.
    reduction_axes : int or sequence of int, default -1
        The normalized axes; they must be the trailing axes of the input (normref's ``normalized_shape``).
    feature_axes : int or sequence of int, default -1
        The axes of ``scale``/``bias``, among the reduction axes (broadcast over the others).
    axis_name, axis_index_groups : None
        Not supported (``NotImplementedError``).
    use_fast_variance : bool, default True
        Ignored: normref's variance is always the stable two-pass one.

    Notes
    -----
    Survey §5.1.1. Gradients from normref's analytic backward. Variables ``scale``, ``bias`` as Flax's.
    ``mask=`` is not supported.

    References
    ----------
    .. [1] J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = initializers.zeros_init(),
        scale_init: Callable = initializers.ones_init(),
        reduction_axes: int | Sequence[int] = -1,
        feature_axes: int | Sequence[int] = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Any = MappingProxyType({}),
        scale_metadata: Any = MappingProxyType({}),
    ) -> None:
        _check_no_axis_name("LayerNorm", axis_name, axis_index_groups)
        self._init_affine((num_features,), use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
                          scale_metadata, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: Array, *, mask: Any = None) -> Array:
        """Normalize each sample of ``x`` over the reduction axes.

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
        x, scale, bias = self.promote_dtype((x, _optional(self.scale), _optional(self.bias)), dtype=self.dtype)
        red = _trailing("LayerNorm", "reduction_axes", self.reduction_axes, x.ndim)
        w = _feature_weight("LayerNorm", scale, x, red, self.feature_axes)
        b = _feature_weight("LayerNorm", bias, x, red, self.feature_axes)
        return nj.layer_norm(x, tuple(x.shape[a] for a in red), w, b, self.epsilon)


class RMSNorm(_Affine):
    """``flax.nnx.RMSNorm`` computed by :func:`normref.rms_norm`.

    y = scale·x/√(mean(x²) + ε), the mean over ``reduction_axes`` of each sample (survey §5.1.2).

    Parameters
    ----------
    num_features : int
        The length of ``scale``.
    epsilon : float, default 1e-6
        ε.
    dtype, param_dtype, use_scale, scale_init, promote_dtype, rngs, scale_metadata
        As ``flax.nnx.RMSNorm``.
    reduction_axes : int or sequence of int, default -1
        The normalized (trailing) axes.
    feature_axes : int or sequence of int, default -1
        The axes of ``scale``, among the reduction axes.
    axis_name, axis_index_groups : None
        Not supported.
    use_fast_variance : bool, default True
        Ignored (there is no mean to subtract).

    Notes
    -----
    Survey §5.1.2. Gradients from normref's analytic backward. ``mask=`` is not supported.

    References
    ----------
    .. [1] B. Zhang and R. Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        scale_init: Callable = initializers.ones_init(),
        reduction_axes: int | Sequence[int] = -1,
        feature_axes: int | Sequence[int] = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Any = MappingProxyType({}),
    ) -> None:
        _check_no_axis_name("RMSNorm", axis_name, axis_index_groups)
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: Array, mask: Any = None) -> Array:
        """Divide each sample of ``x`` by its root mean square over the reduction axes.

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
        _check_mask("RMSNorm", mask)
        x, scale = self.promote_dtype((x, _optional(self.scale)), dtype=self.dtype)
        red = _trailing("RMSNorm", "reduction_axes", self.reduction_axes, x.ndim)
        w = _feature_weight("RMSNorm", scale, x, red, self.feature_axes)
        return nj.rms_norm(x, tuple(x.shape[a] for a in red), w, self.epsilon)


class GroupNorm(_Affine):
    """``flax.nnx.GroupNorm`` computed by :func:`normref.group_norm` (features last).

    The C features (last axis) in G groups of C/G; y = scale·(x − μ_g)/√(σ_g² + ε) + bias with μ_g, σ_g²
    over the group's features and every non-batch axis of each sample (survey §5.1.1).

    Parameters
    ----------
    num_features : int
        C, the size of the last axis.
    num_groups : int or None, default 32
        G (give ``num_groups=None`` with ``group_size``, as in Flax).
    group_size : int or None, default None
        C/G, instead of ``num_groups``.
    epsilon : float, default 1e-6
        ε.
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, promote_dtype, rngs, bias_metadata, scale_metadata
        As ``flax.nnx.GroupNorm``.
    reduction_axes : None
        Only the default (every axis but the batch axis 0) is supported.
    axis_name, axis_index_groups : None
        Not supported.
    use_fast_variance : bool, default True
        Ignored.

    Notes
    -----
    Survey §5.1.1. Gradients from normref's analytic backward. ``mask=`` is not supported.

    References
    ----------
    .. [1] Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = initializers.zeros_init(),
        scale_init: Callable = initializers.ones_init(),
        reduction_axes: Any = None,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Any = MappingProxyType({}),
        scale_metadata: Any = MappingProxyType({}),
    ) -> None:
        _check_no_axis_name("GroupNorm", axis_name, axis_index_groups)
        if reduction_axes is not None:
            raise NotImplementedError("GroupNorm: only reduction_axes=None (every axis but the batch axis) is "
                                      "supported by normref's layer")
        if (num_groups is None) == (group_size is None):
            raise ValueError("GroupNorm: give exactly one of num_groups and group_size (pass num_groups=None with "
                             "group_size, as in Flax)")
        if group_size is not None:
            if num_features % group_size:
                raise ValueError(f"GroupNorm: num_features={num_features} is not a multiple of group_size={group_size}")
            num_groups = num_features // group_size
        elif isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or num_features % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups!r} does not divide num_features={num_features}")
        self.feature_axis = -1
        self.num_groups = num_groups
        self.group_size = num_features // num_groups
        self._init_affine((num_features,), use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
                          scale_metadata, bias_metadata)
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

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
        x, scale, bias = self.promote_dtype((x, _optional(self.scale), _optional(self.bias)), dtype=self.dtype)
        return _channels_call("GroupNorm", "group_norm", x, -1, self.num_groups, scale, bias, self.epsilon)


class InstanceNorm(_Affine):
    """``flax.nnx.InstanceNorm`` computed by :func:`normref.instance_norm` (features last).

    y = scale·(x − μ_nc)/√(σ_nc² + ε) + bias, μ_nc, σ_nc² over the spatial axes of each sample and
    feature (survey §5.1.1).

    Parameters
    ----------
    num_features : int
        C.
    epsilon : float, default 1e-6
        ε.
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, promote_dtype, rngs, bias_metadata, scale_metadata
        As ``flax.nnx.InstanceNorm``.
    feature_axes : int, default -1
        The feature axis (one axis; not the batch axis 0).
    axis_name, axis_index_groups : None
        Not supported.
    use_fast_variance : bool, default True
        Ignored.

    Notes
    -----
    Survey §5.1.1. Gradients from normref's analytic backward. ``mask=`` is not supported.

    References
    ----------
    .. [1] D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance Normalization: The Missing Ingredient for
       Fast Stylization", arXiv:1607.08022, 2016.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = initializers.zeros_init(),
        scale_init: Callable = initializers.ones_init(),
        feature_axes: int | Sequence[int] = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Any = MappingProxyType({}),
        scale_metadata: Any = MappingProxyType({}),
    ) -> None:
        _check_no_axis_name("InstanceNorm", axis_name, axis_index_groups)
        if not isinstance(feature_axes, int):
            if len(tuple(feature_axes)) != 1:
                raise NotImplementedError(f"InstanceNorm: normref's layer takes one feature axis; got "
                                          f"feature_axes={feature_axes!r}")
            (feature_axes,) = tuple(feature_axes)
        self._init_affine((num_features,), use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
                          scale_metadata, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: Array, *, mask: Any = None) -> Array:
        """Normalize each sample and feature over the spatial axes.

        Parameters
        ----------
        x : Array
            The input (N, *spatial, C) (features on ``feature_axes``).
        mask : None
            Not supported.

        Returns
        -------
        y : Array
            ``x``'s shape.
        """
        _check_mask("InstanceNorm", mask)
        x, scale, bias = self.promote_dtype((x, _optional(self.scale), _optional(self.bias)), dtype=self.dtype)
        return _channels_call("InstanceNorm", "instance_norm", x, self.feature_axes, None, None, scale, bias, True,
                              0.1, self.epsilon)


# --------------------------------------------------------------------------------------------------
# every activation method as an nnx.Module, generated from its registered signature
# --------------------------------------------------------------------------------------------------
_FLAGS = ("training", "use_input_stats")  # the argument selecting batch (True) vs running statistics
_NOT_STATIC = frozenset(_FLAGS) | {"num_batches_tracked", "out", "sync", "channel_axis", "momentum"}


def _initial(method: str, name: str, c: int, gs: int, dtype: Any) -> Any:
    """The initial value of array argument ``name`` (as normref.backends.torch's StatefulNorm)."""
    g = c // gs
    if name == "running_cov" or (name == "weight" and method == "whitening_coloring"):
        return jnp.broadcast_to(jnp.eye(gs, dtype=dtype), (g, gs, gs))
    if name in ("running_var", "running_scale", "running_mean_square", "weight", "rho"):
        return jnp.ones((c,), dtype)
    if name in ("running_mean", "bias", "tau"):
        return jnp.zeros((c,), dtype)
    if name in ("mean_weight", "var_weight"):
        return jnp.ones((3,), dtype)
    return None


class Norm(nnx.Module):
    """Any activation method of normref as a Flax NNX layer, features last.

    ``Norm("iter_norm", 64, group_size=16, rngs=rngs)``. The method's learnable array arguments
    (``weight``, ``bias``, ``rho``, ``tau``, ...) are ``nnx.Param``, its running statistics (the
    non-differentiable ``running_*`` arguments it returns updated) are ``nnx.BatchStat``, named as the
    method's arguments; every other argument is a constructor keyword with the method's default. The
    method's own docstring gives the formula, survey section and paper.

    Parameters
    ----------
    method : str
        The registered activation method (first array argument ``input``, layout ``(N, C, *S)``).
    num_features : int
        C, the size of the feature axis.
    use_running_average : bool or None, default False
        Running statistics instead of the batch's (methods with state); the call argument takes
        precedence (``nnx.view``/``model.eval()`` set it).
    axis : int, default -1
        The feature axis (Flax: features last): passed as ``channel_axis=`` where the method takes it,
        otherwise moved to axis 1 and back. Ignored by ``layer_norm``/``rms_norm`` (trailing axes).
    momentum : float or None, default 0.99
        Flax's convention, the weight of the old running value: normref's ``momentum`` is ``1 − this``
        (None: the cumulative average, which needs eager execution). For a method whose own default
        is not torch's 0.1, the default is ``1 −`` that default.
    use_scale, use_bias : bool, default True
        Learnable ``weight`` / ``bias`` (False: None).
    param_dtype : dtype, default float32
        The dtype of the Params and the BatchStats.
    axis_name : Hashable or None, default None
        Batch statistics across the named axis (methods with a ``sync=`` argument), in training.
    rngs : nnx.Rngs or None, default None
        Accepted for uniformity; the initial values are deterministic (ones, zeros, identities).
    **static : Any
        The method's other non-array arguments (``eps``, ``group_size``, ``iterations``, ...).

    Notes
    -----
    Running statistics follow the method's own rule (survey Eqn 18; for batch-norm-like methods the
    running variance is normref's and torch's **unbiased** one — :class:`BatchNorm` is the drop-in that
    keeps Flax's biased one). Gradients are normref's analytic backward.
    """

    def __init__(
        self,
        method: str,
        num_features: int,
        /,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: Any = inspect.Parameter.empty,
        use_scale: bool = True,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        axis_name: Any = None,
        rngs: nnx.Rngs | None = None,
        **static: Any,
    ) -> None:
        m = get(method)
        where = f"{type(self).__name__}({m.name!r})" if type(self) is Norm else type(self).__name__
        if m.category != "activation" or not m.array_params or m.array_params[0] != "input":
            raise TypeError(f"{where}: a layer needs an activation method whose first array argument is input; "
                            f"got {m!r}")
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{where}: num_features must be a positive int; got {num_features!r}")
        params = m.signature.parameters
        if axis_name is not None and "sync" not in params:
            raise TypeError(f"{where}: axis_name is taken by methods with batch statistics (a sync argument); "
                            f"normref.{m.name} has none")
        allowed = [p for p in params if p not in m.array_params and p not in _NOT_STATIC]
        unknown = [k for k in static if k not in allowed]
        if unknown:
            raise TypeError(f"{where}: unexpected argument {unknown[0]!r}; the method's options are {allowed}")
        missing = [p for p in allowed if p not in static and params[p].default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{where}: missing required argument {missing[0]!r}")
        gs = static.get("group_size") or num_features
        if static.get("group_size") is not None and (
            isinstance(gs, bool) or not isinstance(gs, int) or gs < 1 or num_features % gs
        ):
            raise ValueError(f"{where}: group_size must be a positive divisor of num_features = {num_features}; "
                             f"got {gs!r}")
        self.normref_method = m.name
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.axis_name = axis_name
        self.use_scale = use_scale
        self.use_bias = use_bias
        if "momentum" in params:
            if momentum is inspect.Parameter.empty:
                d = params["momentum"].default
                momentum = 0.99 if d == 0.1 else (None if d is None else 1.0 - d)
            _flax_momentum_to_normref(where, momentum)
            self.momentum = momentum
        elif momentum is not inspect.Parameter.empty:
            raise TypeError(f"{where}: normref.{m.name} has no momentum argument")
        self._flag = next((f for f in _FLAGS if f in params), None)
        self._static = {p: static.get(p, params[p].default) for p in allowed}
        self._param_names: list[str] = []
        self._state_names: list[str] = []
        for p in m.array_params[1:]:
            off = (p == "weight" and not use_scale) or (p == "bias" and not use_bias)
            value = None if off else _initial(m.name, p, num_features, gs, param_dtype)
            if value is None and not off:
                raise TypeError(f"{where}: no initial value is known for the array argument {p!r}")
            if p in m.nondiff:
                setattr(self, p, nnx.BatchStat(value))
                self._state_names.append(p)
            else:
                setattr(self, p, nnx.data(None) if value is None else nnx.Param(value))
                self._param_names.append(p)
        self._counts = "num_batches_tracked" in params and bool(self._state_names)
        if self._counts:
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: set ``use_running_average``.

        Parameters
        ----------
        use_running_average : bool or None, default None
            The new value (None: unchanged).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """The method on ``x``; in training its returned running statistics replace the BatchStats.

        Parameters
        ----------
        x : Array
            The input, features on ``self.axis``.
        use_running_average : bool or None, default None
            Overrides the constructor's value.

        Returns
        -------
        y : Array
            The method's primary output.
        """
        where = f"Norm({self.normref_method!r})" if type(self) is Norm else type(self).__name__
        use_ra = use_running_average if use_running_average is not None else self.use_running_average
        if use_ra is None and self._flag is not None:
            raise ValueError(f"{where}: no use_running_average was given (to the constructor or the call)")
        kwargs = dict(self._static)
        batch = not use_ra
        if self._flag is not None:
            kwargs[self._flag] = batch
        if hasattr(self, "momentum"):
            kwargs["momentum"] = _flax_momentum_to_normref(where, self.momentum)
        for p in self._param_names + self._state_names:
            kwargs[p] = _optional(getattr(self, p))
        update = batch and bool(self._state_names)
        if update and self._counts and (kwargs.get("momentum", 0.0) is None or kwargs.get("update_every", 1) != 1
                                        or kwargs.get("preset") == "diminishing"):
            count = self.num_batches_tracked[...]
            if isinstance(count, jax.core.Tracer):
                raise ValueError(
                    f"{where}: momentum=None, update_every != 1 and preset='diminishing' schedule by the number "
                    f"of batches seen, a Python int normref reads on the host: call this layer outside "
                    f"jax.jit / nnx.jit (or use a float momentum)")
            kwargs["num_batches_tracked"] = int(count)  # a host read: eager only
        if batch and self.axis_name is not None:
            kwargs["axis_name"] = self.axis_name
        if self.normref_method in _NO_CHANNEL_AXIS:
            out = nj.function(self.normref_method)(x, **kwargs)
        else:
            out = _channels_call(where, self.normref_method, x, self.axis, **kwargs)
        if not isinstance(out, tuple):
            return out
        if update:
            for p in self._state_names:
                var = getattr(self, p)
                var[...] = jax.lax.stop_gradient(getattr(out, p)).astype(var[...].dtype)
            if self._counts:
                self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return out[0]


def _named_layer(cls_name: str, method: str) -> type:
    def __init__(self, num_features: int, **kwargs: Any) -> None:
        Norm.__init__(self, method, num_features, **kwargs)

    m = get(method)
    doc = (
        f"A Flax NNX layer computing :func:`normref.{method}` (features last).\n\n"
        f"``{cls_name}(num_features, **options)``: :class:`Norm` with the method fixed.\n\n"
        "Parameters\n----------\n"
        "num_features : int\n    C, the size of the feature axis.\n"
        "**kwargs : Any\n    The options of :class:`Norm` (``use_running_average``, ``axis``, ``momentum`` "
        "(Flax's: the weight of the old value), ``use_scale``, ``use_bias``, ``param_dtype``, ``axis_name``, "
        "``rngs``) and the method's non-array arguments.\n"
        + (f"\nNotes\n-----\nSurvey {m.survey}.\n" if m.survey else "")
        + (f"\nReferences\n----------\n{m.paper}.\n" if m.paper else "")
    )
    return type(cls_name, (Norm,), {"__init__": __init__, "__doc__": doc, "__module__": "normref.backends.flax"})


# the named layers of normref.backends.torch (suffix-less: features last, any rank the method takes)
NAMED = dict(NAMED_LAYERS)
for _cls, _method in NAMED.items():
    globals()[_cls] = _named_layer(_cls, _method)
    __all__.append(_cls)
del _cls, _method
