"""Keras 3 layers computed by normref: forward and analytic backward of the active backend's adapter.

See the package docstring (:mod:`normref.backends.keras`) for the conventions and the design.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import numpy as np

try:
    import keras
except ModuleNotFoundError as e:  # Keras 3 picks TensorFlow unless told otherwise
    if "tensorflow" in str(e):
        raise ImportError(
            "normref.backends.keras: Keras 3 selected its TensorFlow backend, which is not installed; set "
            "the environment variable KERAS_BACKEND=jax or KERAS_BACKEND=torch before keras is first imported"
        ) from e
    raise

from keras import ops

from normref.registry import NAMED_LAYERS, get

__all__ = [
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
    "StatefulNorm",
    "adapter",
]

_PACKAGE = "normref"  # keras.saving registration package: "normref>BatchNormalization", ...


# --------------------------------------------------------------------------------------------------
# the active backend's adapter
# --------------------------------------------------------------------------------------------------
def _check_mask(where: str, mask: Any) -> None:
    """Keras passes a mask (e.g. after ``Embedding(mask_zero=True)``) to a ``call`` that takes one:
    normref's statistics run over every position, so a mask is refused rather than ignored."""
    if mask is not None:
        raise NotImplementedError(f"{where}: mask= is not supported by normref's layers (their batch statistics "
                                  f"run over every position); use keras.layers' own layer for masked statistics")


def adapter(method: str) -> Callable:
    """normref's function for ``method`` on Keras's active backend (``keras.backend.backend()``).

    ``"torch"``: ``normref.backends.torch.function(method)`` (a ``torch.autograd.Function`` whose
    backward is normref's analytic one); ``"jax"``: ``normref.backends.jax.function(method)`` (a
    ``jax.custom_vjp`` with normref's backward); ``"numpy"``: the method itself (Keras's NumPy backend
    runs inference only). Any other backend is refused.

    Parameters
    ----------
    method : str
        A registered method's name.

    Returns
    -------
    fn : callable
        The method for the backend's arrays, with the method's signature.

    Raises
    ------
    ValueError
        For a Keras backend normref has no adapter for (tensorflow, openvino).
    """
    return _adapter(keras.backend.backend(), get(method).name)


@functools.lru_cache(maxsize=None)
def _adapter(backend: str, method: str) -> Callable:
    if backend == "torch":
        from normref.backends import torch as nt

        return nt.function(method)
    if backend == "jax":
        from normref.backends import jax as nj

        return nj.function(method)
    if backend == "numpy":
        return get(method)
    raise ValueError(
        f"normref.backends.keras: Keras backend {backend!r} has no normref adapter; use KERAS_BACKEND=jax or "
        f"torch (training) or numpy (inference)"
    )


@functools.lru_cache(maxsize=None)
def _takes_channel_axis(backend: str, method: str) -> bool:
    """Whether the adapter takes ``channel_axis=`` (normref's channel methods gain it: issue 16)."""
    try:
        return "channel_axis" in inspect.signature(_adapter(backend, method)).parameters
    except (TypeError, ValueError):  # pragma: no cover - a callable without a signature
        return False


def _positive_axis(where: str, axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"{where}: axis must be an int in [-{ndim}, {ndim}) for a {ndim}D input; got {axis!r}")
    a = int(axis) % ndim
    if a == 0:
        raise ValueError(f"{where}: axis {axis!r} is the batch axis of the {ndim}D input; give the feature axis")
    return a


def _channel_call(method: str, x: Any, axis: int, *args: Any, **kwargs: Any) -> Any:
    """``method(x, *args, **kwargs)`` for ``x`` whose channels lie on ``axis`` (positive, ≠ 0).

    normref's channel methods take the torch layout (N, C, *S). With ``channel_axis=`` (issue 16) the
    method reads the channels in place; until an adapter has it, the channel axis is moved to 1 here and
    the output moved back (a transpose the backend's autodiff carries; the normalization's own
    gradient is still normref's backward). Per-channel results (running statistics) need no move."""
    backend = keras.backend.backend()
    fn = _adapter(backend, method)
    if axis == 1:
        return fn(x, *args, **kwargs)
    if _takes_channel_axis(backend, method):
        return fn(x, *args, channel_axis=axis, **kwargs)
    out = fn(ops.moveaxis(x, axis, 1), *args, **kwargs)
    if isinstance(out, tuple):  # a NamedTuple: (output, updated state, ...)
        return type(out)(ops.moveaxis(out[0], 1, axis), *out[1:])
    return ops.moveaxis(out, 1, axis)


def _trailing_call(method: str, x: Any, axes: "list[int]", *args: Any, **kwargs: Any) -> Any:
    """``method(x, normalized_shape, *args)`` normalizing over ``axes`` (sorted, positive).

    layer_norm / rms_norm normalize the trailing dims (torch's ``normalized_shape``); other axes are
    moved to the end, in order (the weights' shape is the axes' sizes in that order, as Keras's), and
    back afterwards."""
    ndim = len(x.shape)
    k = len(axes)
    trailing = list(range(ndim - k, ndim))
    fn = adapter(method)
    if axes == trailing:
        return fn(x, tuple(x.shape[ndim - k:]), *args, **kwargs)
    moved = ops.moveaxis(x, axes, trailing)
    out = fn(moved, tuple(moved.shape[ndim - k:]), *args, **kwargs)
    return ops.moveaxis(out, trailing, axes)


def _compute_dtype(inputs: Any) -> str:
    # As Keras's normalization layers, float16/bfloat16 inputs are computed in float32. Unlike them,
    # float64 stays float64: Keras's layers take keras.backend.result_type(dtype, "float32"), which
    # is "float32" for float64 (Keras 3.15), so their float64 results are only float32-accurate
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    return "float64" if dtype == "float64" else "float32"


def _cast(v: Any, dtype: str) -> Any:
    return None if v is None else ops.cast(v, dtype)


def _sync_options(where: str, method: str, synchronized: bool, axis_name: Any) -> dict:
    """The ``sync=`` / ``axis_name=`` arguments of a training call with cross-device statistics.

    torch: ``synchronized=True`` reduces over torch.distributed's default group (normref's
    ``TorchReducer``) when a process group is initialized (a world of one otherwise, as torch's
    SyncBatchNorm). jax: under ``keras.distribution`` (GSPMD), a layer sees the global batch's arrays,
    so its statistics are the global batch's without a collective; ``axis_name=`` names a mapped axis
    (``shard_map``/``pmap``/``vmap``) to reduce over explicitly."""
    if not synchronized and axis_name is None:
        return {}
    if "sync" not in get(method).signature.parameters:
        raise TypeError(f"{where}: normref.{method} has no synchronized statistics (no sync= argument)")
    backend = keras.backend.backend()
    if axis_name is not None:
        if backend != "jax":
            raise ValueError(f"{where}: axis_name names a JAX mapped axis; the Keras backend is {backend!r}")
        return {"axis_name": axis_name}
    if backend == "torch":
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from normref.backends.distributed.torch import TorchReducer

            return {"sync": TorchReducer(None)}
    return {}


def _check_flag(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a bool; got {type(value).__name__}")
    return bool(value)


# --------------------------------------------------------------------------------------------------
# drop-ins for Keras's own layers (same constructor, weights, config; only ``call`` changes)
# --------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by :func:`normref.batch_norm`.

    y = γ·(x − μ_B)/√(σ_B² + ε) + β over every axis but ``axis`` in training (σ_B² biased), with the
    moving statistics in inference; after a training call
    moving ← momentum·moving + (1 − momentum)·batch statistic (Keras's convention: ``momentum`` is the
    weight of the old value, and the moving variance is the *biased* batch variance).

    Keras's constructor, weights (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``) and
    config, verbatim; ``call`` runs normref's forward and its analytic backward on the active backend
    (torch: the autograd Function; jax: the custom_vjp). The moving statistics are updated with
    ``Variable.assign`` as Keras's own layer does, so ``model.fit`` on JAX (stateless calls) carries them.

    Parameters
    ----------
    axis : int, default -1
        The feature axis (Keras's features-last default).
    momentum : float, default 0.99
        Weight of the old moving value (normref's / torch's momentum is ``1 - momentum``).
    epsilon : float, default 1e-3
        ε, Keras's default (torch's is 1e-5).
    center : bool, default True
        Learnable offset β.
    scale : bool, default True
        Learnable scale γ.
    synchronized : bool, default False
        Cross-device batch statistics. torch: over torch.distributed's default group when one is
        initialized (normref's ``TorchReducer``; Keras's own layer allows this on TensorFlow only);
        jax: under ``keras.distribution`` the batch is global already. The moving variance's
        unbiased-to-biased factor uses the global count.
    axis_name : str or None, default None
        jax only: a mapped axis (``shard_map``/``pmap``/``vmap``) to reduce the statistics over.
    **kwargs : Any
        Keras's other arguments (initializers, regularizers, constraints, ``name``, ``dtype``...).
        ``renorm=True`` is refused: use ``StatefulNorm("batch_renorm")``.

    Notes
    -----
    Survey §5.1.1. ``mask=`` is not supported (Keras's masked moments are not a normref method).
    A training batch with one value per channel is refused (``ValueError`` from normref, as in torch;
    Keras's own layer returns β there, from a zero variance).

    References
    ----------
    .. [1] S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
       Internal Covariate Shift", ICML 2015.
    """

    def __init__(self, axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, synchronized: bool = False, axis_name: Any = None, **kwargs: Any) -> None:
        if kwargs.get("renorm"):
            raise ValueError("normref.backends.keras.BatchNormalization: renorm=True is not supported; use "
                             "StatefulNorm('batch_renorm') (normref.batch_renorm)")
        synchronized = _check_flag(type(self).__name__, "synchronized", synchronized)
        # Keras refuses synchronized=True off TensorFlow: normref synchronizes itself (see above)
        super().__init__(axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale,
                         synchronized=False, **kwargs)
        self.synchronized = synchronized
        self.axis_name = axis_name

    def call(self, inputs: Any, training: "bool | None" = None, mask: Any = None) -> Any:
        where = type(self).__name__
        _check_mask(where, mask)
        dt = _compute_dtype(inputs)
        x = ops.cast(inputs, dt)
        axis = _positive_axis(where, self.axis, len(x.shape))
        moving_mean = ops.cast(self.moving_mean, dt)
        moving_variance = ops.cast(self.moving_variance, dt)
        gamma = _cast(self.gamma, dt) if self.scale else None
        beta = _cast(self.beta, dt) if self.center else None
        if training and self.trainable:
            sync = _sync_options(where, "batch_norm", self.synchronized, self.axis_name)
            # momentum 1: normref's running statistics come back as the batch's own (mean, unbiased
            # variance), exactly; Keras's moving average and biased variance are applied here
            out = _channel_call("batch_norm", x, axis, moving_mean, moving_variance, gamma, beta, True, 1.0,
                                self.epsilon, **sync)
            y, mean, unbiased = out[0], out[1], out[2]
            n = math.prod(x.shape) // x.shape[axis]  # samples per channel (static shapes)
            n = self._global_count(n, sync)
            variance = unbiased * ((n - 1) / n)
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            y = _channel_call("batch_norm", x, axis, moving_mean, moving_variance, gamma, beta, False, 0.0,
                              self.epsilon)
        return ops.cast(y, self.compute_dtype)

    @staticmethod
    def _global_count(n: int, sync: dict) -> int:
        reducer = sync.get("sync")
        if reducer is None:  # local statistics, or JAX's global arrays / named axis below
            if "axis_name" in sync:
                import jax

                return n * jax.lax.psum(1, sync["axis_name"])
            return n
        import torch

        return n * torch.distributed.get_world_size(reducer.process_group)

    def get_config(self) -> dict:
        """Keras's config, plus ``synchronized`` as given and ``axis_name``."""
        config = super().get_config()
        config.update(synchronized=self.synchronized, axis_name=self.axis_name)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LayerNormalization(keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` computed by :func:`normref.layer_norm`.

    y = γ·(x − μ)/√(σ² + ε) + β, μ and σ² (biased) over ``axis`` of each sample; γ, β of the axes'
    shape. Keras's constructor, weights (``gamma``, ``beta``) and config; ``call`` runs normref (axes
    that are not the trailing ones are moved there and back: normref normalizes trailing dims).

    Parameters
    ----------
    axis : int or list of int, default -1
        The normalized axes.
    epsilon : float, default 1e-3
        ε, Keras's default.
    center : bool, default True
        Learnable β.
    scale : bool, default True
        Learnable γ.
    **kwargs : Any
        Keras's other arguments. The deprecated ``rms_scaling=True`` is refused: use
        :class:`RMSNormalization`.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
    """

    def __init__(self, axis: "int | list[int]" = -1, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, **kwargs: Any) -> None:
        if kwargs.pop("rms_scaling", False):
            raise ValueError("normref.backends.keras.LayerNormalization: rms_scaling=True (deprecated in Keras) is "
                             "not supported; use RMSNormalization")
        super().__init__(axis=axis, epsilon=epsilon, center=center, scale=scale, **kwargs)

    def call(self, inputs: Any) -> Any:
        dt = _compute_dtype(inputs)
        x = ops.cast(inputs, dt)
        ndim = len(x.shape)
        axes = sorted(_positive_axis(type(self).__name__, a, ndim) for a in self.axis)
        y = _trailing_call("layer_norm", x, axes, _cast(self.gamma, dt), _cast(self.beta, dt), self.epsilon)
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GroupNormalization(keras.layers.GroupNormalization):
    """``keras.layers.GroupNormalization`` computed by :func:`normref.group_norm`.

    The C channels on ``axis`` split into ``groups`` consecutive groups; y = γ·(x − μ_g)/√(σ_g² + ε) + β
    with μ_g, σ_g² (biased) over a sample's group and spatial positions. Keras's constructor (``groups=32``,
    ``-1`` = one channel per group), weights and config; ``call`` runs normref with the channels on
    ``axis``.

    Parameters
    ----------
    groups : int, default 32
        G (a divisor of C; -1: C groups, instance normalization).
    axis : int, default -1
        The channel axis.
    epsilon : float, default 1e-3
        ε, Keras's default.
    center : bool, default True
        Learnable β.
    scale : bool, default True
        Learnable γ.
    **kwargs : Any
        Keras's other arguments.

    Notes
    -----
    Survey §5.1.1.

    References
    ----------
    .. [1] Y. Wu and K. He, "Group Normalization", ECCV 2018.
    """

    def __init__(self, groups: int = 32, axis: int = -1, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, **kwargs: Any) -> None:
        super().__init__(groups=groups, axis=axis, epsilon=epsilon, center=center, scale=scale, **kwargs)

    def call(self, inputs: Any) -> Any:
        dt = _compute_dtype(inputs)
        x = ops.cast(inputs, dt)
        axis = _positive_axis(type(self).__name__, self.axis, len(x.shape))
        y = _channel_call("group_norm", x, axis, self.groups, _cast(self.gamma, dt), _cast(self.beta, dt),
                          self.epsilon)
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RMSNormalization(keras.layers.RMSNormalization):
    """``keras.layers.RMSNormalization`` computed by :func:`normref.rms_norm`.

    y = x/√(mean(x²) + ε)·scale over ``axis``. Keras's constructor (``epsilon=1e-6``), weight
    (``scale``) and config; ``call`` runs normref.

    Parameters
    ----------
    axis : int or list of int, default -1
        The normalized axes.
    epsilon : float, default 1e-6
        ε, Keras's default.
    **kwargs : Any
        Keras's other arguments.

    Notes
    -----
    Survey §5.1.2.

    References
    ----------
    .. [1] B. Zhang and R. Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    """

    def __init__(self, axis: "int | list[int]" = -1, epsilon: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(axis=axis, epsilon=epsilon, **kwargs)

    def call(self, x: Any) -> Any:
        dt = _compute_dtype(x)
        h = ops.cast(x, dt)
        axes = sorted(_positive_axis(type(self).__name__, a, len(h.shape)) for a in self.axis)
        y = _trailing_call("rms_norm", h, axes, _cast(self.scale, dt), self.epsilon)
        return ops.cast(y, self.compute_dtype)


# --------------------------------------------------------------------------------------------------
# any activation method, from its registered signature
# --------------------------------------------------------------------------------------------------
_FLAGS = ("training", "use_input_stats")  # the argument selecting batch vs population statistics
_NOT_STATIC = frozenset(_FLAGS) | {"num_batches_tracked", "out", "sync", "momentum", "eps", "channel_axis"}


def _initial(method: str, name: str, c: int, gs: int) -> "np.ndarray | None":
    """The initial value of array argument ``name`` (the table of normref's torch ``StatefulNorm``)."""
    g = c // gs
    if name == "running_cov" or (name == "weight" and method == "whitening_coloring"):
        return np.broadcast_to(np.eye(gs), (g, gs, gs)).copy()  # identity per group
    if name in ("running_var", "running_scale", "running_mean_square", "weight", "rho"):
        return np.ones(c)
    if name in ("running_mean", "bias", "tau"):
        return np.zeros(c)
    if name in ("mean_weight", "var_weight"):
        return np.ones(3)
    return None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StatefulNorm(keras.layers.Layer):
    """Any normref activation method as a Keras layer owning its weights and running statistics.

    ``StatefulNorm("iter_norm", group_size=8, iterations=5)``: built on the first input, whose
    ``axis`` holds the C channels. The method's learnable arrays (``weight``, ``bias``, ``rho``,
    ``tau``...) become trainable weights (``weight``/``bias`` only with ``scale``/``center``), its
    running statistics (``running_mean``, ``running_cov``...) non-trainable weights, named as the
    method's arguments, with the initial values of normref's torch ``StatefulNorm``. A training call
    (``training=True`` and ``trainable``) uses batch statistics and assigns the method's updated
    running statistics (normref's Eqn 18, unbiased variance as in torch; the named
    :class:`BatchNormalization` follows Keras's biased convention instead); otherwise the running
    statistics are used.

    Parameters
    ----------
    method : str
        A registered activation method whose first array argument is ``input``, laid out (N, C, *S)
        with the channels on ``axis``.
    axis : int, default -1
        The channel axis (Keras's features-last default).
    momentum : float, default 0.99
        Keras's convention, the weight of the old running value; passed to normref as ``1 - momentum``.
    epsilon : float or None, default None
        ε; ``None``: the method's own default.
    center : bool, default True
        A learnable ``bias`` where the method has one.
    scale : bool, default True
        A learnable ``weight`` where the method has one.
    synchronized : bool, default False
        Cross-device statistics, as :class:`BatchNormalization` (methods with ``sync=`` only).
    axis_name : str or None, default None
        jax only: a mapped axis to reduce the statistics over.
    **kwargs : Any
        The method's other non-array arguments (``group_size``, ``iterations``, ``rmax``...) and
        Keras's layer arguments (``name``, ``dtype``, ``trainable``).

    Notes
    -----
    The method's own docstring gives its formula, survey section and paper. Schedules that need the
    number of batches seen (``momentum=None``, ``update_every``) are not offered here.
    """

    def __init__(self, method: str, axis: int = -1, momentum: float = 0.99, epsilon: "float | None" = None,
                 center: bool = True, scale: bool = True, synchronized: bool = False, axis_name: Any = None,
                 **kwargs: Any) -> None:
        m = get(method)
        where = f"StatefulNorm({m.name!r})"
        if m.category != "activation" or not m.array_params or m.array_params[0] != "input":
            raise TypeError(f"{where}: a layer needs an activation method whose first array argument is input")
        params = m.signature.parameters
        allowed = [p for p in params if p not in m.array_params and p not in _NOT_STATIC]
        static = {k: kwargs.pop(k) for k in list(kwargs) if k in allowed}
        bad = [k for k in kwargs if k in params]
        if bad:
            raise TypeError(f"{where}: {bad[0]!r} is not a constructor argument here; the method's options are "
                            f"{allowed}")
        missing = [p for p in allowed if p not in static and params[p].default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{where}: missing required argument {missing[0]!r}")
        if "momentum" in params and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0.0 <= momentum < 1.0):
            raise ValueError(f"{where}: momentum (Keras's: the weight of the old value) must be a float in "
                             f"[0, 1); got {momentum!r}")
        super().__init__(**kwargs)
        self.normref_method = m.name
        self.axis = axis
        self.momentum = float(momentum)
        self.epsilon = epsilon
        self.center = _check_flag(where, "center", center)
        self.scale = _check_flag(where, "scale", scale)
        self.synchronized = _check_flag(where, "synchronized", synchronized)
        self.axis_name = axis_name
        self.static = static
        self._flag = next((f for f in _FLAGS if f in params), None)
        self._param_names: list = []
        self._state_names: list = []

    def build(self, input_shape: tuple) -> None:
        m = get(self.normref_method)
        where = f"StatefulNorm({m.name!r})"
        axis = _positive_axis(where, self.axis, len(input_shape))
        c = input_shape[axis]
        if c is None:
            raise ValueError(f"{where}: the channel axis {self.axis} of input shape {input_shape} must be defined")
        gs = self.static.get("group_size") or c
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1 or c % gs:
            raise ValueError(f"{where}: group_size must be a positive divisor of the {c} channels; got {gs!r}")
        for p in m.array_params[1:]:
            trainable = p not in m.nondiff
            if trainable and ((p == "weight" and not self.scale) or (p == "bias" and not self.center)):
                setattr(self, p, None)
                self._param_names.append(p)
                continue
            value = _initial(m.name, p, c, gs)
            if value is None:
                raise TypeError(f"{where}: no initial value is known for the array argument {p!r}")
            w = self.add_weight(shape=value.shape, name=p, trainable=trainable, autocast=False,
                                initializer=lambda shape, dtype=None, v=value: ops.convert_to_tensor(v, dtype=dtype))
            setattr(self, p, w)
            (self._param_names if trainable else self._state_names).append(p)
        self._axis = axis

    def call(self, inputs: Any, training: "bool | None" = None, mask: Any = None) -> Any:
        _check_mask(type(self).__name__, mask)
        m = get(self.normref_method)
        dt = _compute_dtype(inputs)
        x = ops.cast(inputs, dt)
        use_batch = bool(training and self.trainable)
        kwargs = dict(self.static)
        params = m.signature.parameters
        if self._flag is not None:
            kwargs[self._flag] = use_batch
        if "momentum" in params:
            kwargs["momentum"] = 1.0 - self.momentum
        if "eps" in params and self.epsilon is not None:
            kwargs["eps"] = self.epsilon
        for p in self._param_names + self._state_names:
            kwargs[p] = _cast(getattr(self, p), dt)
        if use_batch:
            kwargs.update(_sync_options(f"StatefulNorm({m.name!r})", m.name, self.synchronized, self.axis_name))
        out = _channel_call(m.name, x, self._axis, **kwargs)
        if isinstance(out, tuple):
            if use_batch:
                for p in self._state_names:
                    getattr(self, p).assign(getattr(out, p))
            out = out[0]
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """The input's shape."""
        return input_shape

    def get_config(self) -> dict:
        """The constructor's arguments (Keras serialization)."""
        config = super().get_config()
        config.update(method=self.normref_method, axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
                      center=self.center, scale=self.scale, synchronized=self.synchronized,
                      axis_name=self.axis_name, **dict(self.static))
        return config


# --------------------------------------------------------------------------------------------------
# named layers: StatefulNorm with the method fixed (the names of normref's torch layers)
# --------------------------------------------------------------------------------------------------
_NAMED = {**NAMED_LAYERS, "InstanceNorm": "instance_norm"}


def _named_layer(cls_name: str, method: str) -> type:
    def __init__(self, axis: int = -1, **kwargs: Any) -> None:
        given = kwargs.pop("method", method)  # from_config passes the config's method back
        if given != method:
            raise TypeError(f"{cls_name}: computes normref.{method}; got method={given!r}")
        StatefulNorm.__init__(self, method, axis=axis, **kwargs)

    m = get(method)
    doc = (
        f"A Keras layer computing :func:`normref.{method}`: :class:`StatefulNorm` with the method fixed.\n\n"
        f"``{cls_name}(axis=-1, **options)``; the channels on ``axis`` (features last).\n\n"
        "Parameters\n----------\n"
        "axis : int, default -1\n    The channel axis.\n"
        "**kwargs : Any\n    The options of :class:`StatefulNorm` (``momentum``, ``epsilon``, ``center``, "
        "``scale``, ``synchronized``, ``axis_name``), the method's non-array arguments and Keras's.\n"
        + (f"\nNotes\n-----\nSurvey {m.survey}.\n" if m.survey else "")
        + (f"\nReferences\n----------\n{m.paper}.\n" if m.paper else "")
    )
    cls = type(cls_name, (StatefulNorm,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})
    return keras.saving.register_keras_serializable(package=_PACKAGE)(cls)


for _cls, _method in _NAMED.items():
    globals()[_cls] = _named_layer(_cls, _method)
__all__ += list(_NAMED)
del _cls, _method
