"""Worker for tests/test_keras.py: normref's Keras layers against Keras's own, on one Keras backend.

Run as a script in a fresh process (Keras reads ``KERAS_BACKEND`` once, at its first import)::

    KERAS_BACKEND=jax python tests/keras_worker.py        # or torch; prints one JSON object, last line

For float64 and float32, for BatchNormalization (NHWC with H = C, so a wrong channel axis shows, and
(N, C)), LayerNormalization (axis -1 and the non-trailing [1, 3]), GroupNormalization (NHWC, 2
groups) and RMSNormalization: normref's layer and Keras's, built alike (same initial weights), get
the same three training batches; each step compares the output, the gradients of Σ y·g with respect
to the input and every trainable weight (torch: ``torch.autograd.grad``; jax: ``jax.grad`` of
``stateless_call``, Keras's own training path) and, for BN, the moving statistics after the step;
then the inference output. Each error is max|a − b| / max(1, max|b|) over all of these, per layer
and dtype. ``normref_backward`` says whether normref's backward is what the backend differentiates:
torch, a node of normref's autograd Function in the output's graph; jax, a custom_vjp/custom_jvp call
in the traced program (Keras's own layer has none).
"""

from __future__ import annotations

import inspect
import json
import os

import numpy as np

BACKEND = os.environ["KERAS_BACKEND"]
if BACKEND == "jax":
    # two simulated devices for the keras.distribution check (set before jax is imported)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    import jax

    jax.config.update("jax_enable_x64", True)  # the float64 comparisons

import keras  # noqa: E402

from normref.backends import keras as nk  # noqa: E402


def _np(a) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(a), dtype=np.float64)


def _err(a, b) -> float:
    a, b = _np(a), _np(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _training(layer, training: bool) -> dict:
    # stateless_call passes keywords to call as they are: only layers whose call takes training get it
    return {"training": training} if "training" in inspect.signature(layer.call).parameters else {}


_JITTED: dict = {}


def step(layer, x: np.ndarray, g: np.ndarray, training: bool):
    """(y, [dL/dx, dL/dw for w in trainable_variables]) of L = Σ y·g, the layer's state updated."""
    if BACKEND == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, **_training(layer, training))
        loss = (y * torch.tensor(g, dtype=y.dtype)).sum()
        grads = torch.autograd.grad(loss, [xt] + [v.value for v in layer.trainable_variables])
        return y.detach(), list(grads)
    key = (id(layer), training)
    if key not in _JITTED:  # one compiled step per layer, as Keras's JAX trainer does

        def loss(tv, ntv, x, g):
            y, new_ntv = layer.stateless_call(tv, ntv, x, **_training(layer, training))
            return (y * g).sum(), (y, new_ntv)

        _JITTED[key] = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    (_, (y, new_ntv)), (gtv, gx) = _JITTED[key](tv, ntv, jax.numpy.asarray(x), jax.numpy.asarray(g))
    for v, value in zip(layer.non_trainable_variables, new_ntv):
        v.assign(value)
    return y, [gx, *gtv]


def normref_backward(layer, x: np.ndarray) -> bool:
    """Whether differentiating the layer's training call runs normref's backward (see the docstring)."""
    method = {"BatchNormalization": "batch_norm", "LayerNormalization": "layer_norm",
              "GroupNormalization": "group_norm", "RMSNormalization": "rms_norm"}.get(type(layer).__name__)
    if BACKEND == "torch":
        import torch

        from normref.backends import torch as nt

        want = nt.autograd_function(method)
        y = layer(torch.tensor(x, requires_grad=True), **_training(layer, True))
        seen, todo = set(), [y.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if getattr(type(node), "_forward_cls", None) is want:
                return True
            todo.extend(n for n, _ in node.next_functions)
        return False
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    program = str(jax.make_jaxpr(lambda tv, x: layer.stateless_call(tv, ntv, x, **_training(layer, True))[0])(tv, x))
    return "custom_vjp_call" in program or "custom_jvp_call" in program


def compare(make_ours, make_theirs, shape: tuple, dtype: str, steps: int = 3) -> dict:
    rng = np.random.default_rng(sum(shape))
    ours, theirs = make_ours(dtype), make_theirs(dtype)
    ours.build(shape)
    theirs.build(shape)
    # the same, non-trivial initial weights (γ ≠ 1, β ≠ 0, moving statistics ≠ (0, 1))
    weights = [w + rng.uniform(0.1, 0.5, w.shape) for w in theirs.get_weights()]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    assert [v.path.split("/")[-1] for v in ours.weights] == [v.path.split("/")[-1] for v in theirs.weights]
    fwd = grad = state = 0.0
    for _ in range(steps):
        x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        ya, ga = step(ours, x, g, True)
        yb, gb = step(theirs, x, g, True)
        fwd = max(fwd, _err(ya, yb))
        grad = max(grad, *(_err(a, b) for a, b in zip(ga, gb)))
        state = max([state] + [_err(a, b) for a, b in zip(ours.non_trainable_variables, theirs.non_trainable_variables)])
    moved = max([0.0] + [_err(v, w) for v, w in zip(theirs.non_trainable_variables, weights[-2:])])
    x = rng.standard_normal(shape).astype(dtype)
    infer = _err(ours(x, training=False), theirs(x, training=False))
    return {"forward": fwd, "grad": grad, "state": state, "inference": infer, "state_moved": moved,
            "normref_backward": normref_backward(ours, x), "dtype_out": keras.backend.standardize_dtype(ours(x).dtype)}


# --------------------------------------------------------------------------------------------------
# float64 references: Keras's layers (same constructor, weights, config) whose call is the textbook
# formula in keras.ops, differentiated by the backend's autodiff (an oracle independent of normref).
# Needed because Keras's own layers compute float64 inputs in float32 (see backends/keras/layers.py);
# keras.ops.mean/var do the same, so the reductions here are the backend's own (torch / jax.numpy).
# --------------------------------------------------------------------------------------------------
ops = keras.ops


def _mean(x, axes, keepdims=False):
    if BACKEND == "torch":
        import torch

        return torch.mean(x, dim=tuple(axes), keepdim=keepdims)
    return jax.numpy.mean(x, axis=tuple(axes), keepdims=keepdims)


class FormulaBN(keras.layers.BatchNormalization):
    def call(self, x, training=None):  # channels last (axis -1), as the cases
        axes = list(range(len(x.shape) - 1))
        if training:
            mean = _mean(x, axes)
            var = _mean(ops.square(x - mean), axes)  # σ² biased, Keras's moving variance
            # the variables' raw values: Keras's Variable arithmetic on torch also rounds float64 to float32
            self.moving_mean.assign(self.moving_mean.value * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance.value * self.momentum + var * (1.0 - self.momentum))
        else:
            mean, var = self.moving_mean.value, self.moving_variance.value
        return (x - mean) / ops.sqrt(var + self.epsilon) * self.gamma.value + self.beta.value


class FormulaLN(keras.layers.LayerNormalization):
    def call(self, x):
        ndim = len(x.shape)
        axes = sorted(a % ndim for a in self.axis)
        shape = [x.shape[a] if a in axes else 1 for a in range(ndim)]
        mean = _mean(x, axes, keepdims=True)
        var = _mean(ops.square(x - mean), axes, keepdims=True)
        return (x - mean) / ops.sqrt(var + self.epsilon) * ops.reshape(self.gamma, shape) + ops.reshape(self.beta, shape)


class FormulaGN(keras.layers.GroupNormalization):
    def call(self, x):  # (N, *S, C), channels split into groups of consecutive channels
        n, c = x.shape[0], x.shape[-1]
        h = ops.reshape(x, (n, -1, self.groups, c // self.groups))
        mean = _mean(h, (1, 3), keepdims=True)
        var = _mean(ops.square(h - mean), (1, 3), keepdims=True)
        return ops.reshape((h - mean) / ops.sqrt(var + self.epsilon), x.shape) * self.gamma + self.beta


class FormulaRMS(keras.layers.RMSNormalization):
    def call(self, x):
        return x / ops.sqrt(_mean(ops.square(x), (-1,), keepdims=True) + self.epsilon) * self.scale


def cases():
    L = keras.layers
    # name: (normref's layer, Keras's layer, the float64 formula, keyword arguments, input shape)
    return {
        "batch_norm_nhwc": (nk.BatchNormalization, L.BatchNormalization, FormulaBN, {}, (6, 4, 3, 4)),
        "batch_norm_nc": (nk.BatchNormalization, L.BatchNormalization, FormulaBN,
                          {"momentum": 0.9, "epsilon": 1e-5}, (16, 5)),
        "layer_norm_last": (nk.LayerNormalization, L.LayerNormalization, FormulaLN, {}, (4, 3, 6)),
        "layer_norm_1_3": (nk.LayerNormalization, L.LayerNormalization, FormulaLN, {"axis": [1, 3]}, (4, 3, 5, 2)),
        "group_norm_nhwc": (nk.GroupNormalization, L.GroupNormalization, FormulaGN, {"groups": 2}, (3, 4, 5, 4)),
        "rms_norm": (nk.RMSNormalization, L.RMSNormalization, FormulaRMS, {}, (4, 3, 6)),
    }


def generic(move_axis: bool) -> dict:
    """StatefulNorm (and the named drop-ins' channel handling) against normref on NumPy, float64.

    ``move_axis``: the layer's fallback path (channels moved to axis 1 and back) instead of the
    adapters' ``channel_axis=``. NHWC input with H = C; two training calls, then inference. The
    reference is normref's NumPy function on the NCHW transpose with torch's momentum 1 − 0.9."""
    import normref
    from normref.backends.keras import layers as kl

    saved = kl._takes_channel_axis
    if move_axis:
        kl._takes_channel_axis = lambda backend, method: False
    try:
        rng = np.random.default_rng(1)
        errs = {}
        for method, kw, state0 in (
            ("batch_norm", {}, {"running_mean": np.zeros(4), "running_var": np.ones(4)}),
            ("iter_norm", {"group_size": 2, "iterations": 3},
             {"running_mean": np.zeros(4), "running_cov": np.stack([np.eye(2)] * 2)}),
        ):
            layer = nk.StatefulNorm(method, momentum=0.9, dtype="float64", **kw)
            state = dict(state0)
            e = 0.0
            for _ in range(2):
                x = rng.standard_normal((5, 4, 3, 4)) * 1.5 + 0.3
                y = layer(x, training=True)
                ref = normref.get(method)(np.moveaxis(x, -1, 1), weight=np.ones(4), bias=np.zeros(4), training=True,
                                          momentum=0.1, **state, **kw)
                e = max(e, _err(y, np.moveaxis(ref[0], 1, -1)))
                state = {k: getattr(ref, k) for k in state}
                e = max([e] + [_err(getattr(layer, k), v) for k, v in state.items()])
            x = rng.standard_normal((5, 4, 3, 4))
            ref = normref.get(method)(np.moveaxis(x, -1, 1), weight=np.ones(4), bias=np.zeros(4), training=False,
                                      **state, **kw)
            errs[method] = max(e, _err(layer(x, training=False), np.moveaxis(ref, 1, -1)))
        # the named drop-in on the same path: GroupNormalization's channel handling, float64 formula
        x = rng.standard_normal((3, 4, 5, 4))
        gn = nk.GroupNormalization(groups=2, dtype="float64")
        errs["group_norm"] = _err(gn(x), np.moveaxis(normref.group_norm(np.moveaxis(x, -1, 1), 2, None, None, 1e-3), 1, -1))
        return errs
    finally:
        kl._takes_channel_axis = saved


NAMED_OPTIONS = {"IterNorm": {"group_size": 2}, "BatchWhitening": {"group_size": 2},
                 "DecorrelatedBatchNorm": {"group_size": 2}, "WhiteningColoring": {"group_size": 2},
                 "GhostBatchNorm": {"virtual_batch_size": 4}, "BatchGroupNorm": {"num_groups": 2}}


def named() -> dict:
    """Every named StatefulNorm layer (float64, NHWC with H = C) against normref's NumPy function on the
    NCHW transpose with the layer's own initial weights: a training call (output, updated state with
    torch's momentum 1 − 0.99), then an inference call."""
    import normref
    from normref.backends.keras import layers as kl

    rng = np.random.default_rng(3)
    out = {}
    for cls in kl._NAMED:
        kw = NAMED_OPTIONS.get(cls, {})
        layer = getattr(nk, cls)(dtype="float64", **kw)
        x = rng.standard_normal((8, 4, 3, 4)) * 1.5 + 0.3
        layer.build(x.shape)
        arrays = {v.name: _np(v) for v in layer.weights}
        m = normref.get(layer.normref_method)
        params = m.signature.parameters

        def flag(value: bool) -> dict:
            return {} if layer._flag is None else {layer._flag: value}

        ref = m(np.moveaxis(x, -1, 1), **flag(True), **({"momentum": 0.01} if "momentum" in params else {}),
                **arrays, **kw)
        e = _err(layer(x, training=True), np.moveaxis(ref[0] if isinstance(ref, tuple) else ref, 1, -1))
        state = {k: getattr(ref, k) for k in layer._state_names}
        e = max([e] + [_err(getattr(layer, k), v) for k, v in state.items()])
        x = rng.standard_normal((8, 4, 3, 4))
        ref = m(np.moveaxis(x, -1, 1), **flag(False), **{**arrays, **state}, **kw)
        out[cls] = max(e, _err(layer(x, training=False), np.moveaxis(ref, 1, -1)))
    return out


def errors() -> dict:
    """Bad arguments: the exception's type and message, per case."""
    import numpy as np

    cases = {
        "synchronized_not_bool": lambda: nk.BatchNormalization(synchronized=1),
        "renorm": lambda: nk.BatchNormalization(renorm=True),
        "rms_scaling": lambda: nk.LayerNormalization(rms_scaling=True),
        "batch_axis": lambda: nk.BatchNormalization(axis=0)(np.ones((4, 3), "float32"), training=True),
        "unknown_option": lambda: nk.StatefulNorm("iter_norm", group_sizes=2),
        "not_activation": lambda: nk.StatefulNorm("weight_norm"),
        "bad_group_size": lambda: nk.StatefulNorm("iter_norm", group_size=3)(np.ones((4, 4), "float32")),
        "bad_momentum": lambda: nk.StatefulNorm("batch_norm", momentum=1.5),
        # a mask (e.g. after Embedding(mask_zero=True)) is refused, not silently ignored
        "mask": lambda: nk.BatchNormalization()(np.ones((4, 5, 3), "float32"), training=True,
                                                 mask=np.ones((4, 5), bool)),
        "axis_name_off_jax": (lambda: nk.BatchNormalization(axis_name="batch")(np.ones((4, 3), "float32"), training=True))
        if BACKEND != "jax" else None,
    }
    out = {}
    for name, fn in cases.items():
        if fn is None:
            continue
        try:
            fn()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            out[name] = [type(e).__name__, str(e)]
    return out


def serialization() -> bool:
    """get_config / from_config round trip through Keras's registry, for every layer."""
    layers = [nk.BatchNormalization(momentum=0.9, synchronized=True), nk.LayerNormalization(axis=[1, 2]),
              nk.GroupNormalization(groups=4), nk.RMSNormalization(epsilon=1e-5),
              nk.StatefulNorm("iter_norm", group_size=2, iterations=3)]
    for layer in layers:
        back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        if type(back) is not type(layer) or back.get_config() != layer.get_config():
            return False
    return True


def axis_name() -> dict:
    """jax: BatchNormalization(axis_name="b") under ``jax.vmap(axis_name="b")`` over 2 shards equals the
    layer on the whole batch (output, moving statistics), float64."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 3)) * 2.0 + 1.0
    whole = nk.BatchNormalization(dtype="float64")
    sharded = nk.BatchNormalization(dtype="float64", axis_name="b")
    whole.build((16, 3))
    sharded.build((8, 3))
    tv = [v.value for v in whole.trainable_variables]
    ntv = [v.value for v in whole.non_trainable_variables]
    y, new = whole.stateless_call(tv, ntv, x.reshape(16, 3), training=True)
    ys, news = jax.vmap(lambda xs: sharded.stateless_call(tv, ntv, xs, training=True), axis_name="b")(x)
    return {"output": _err(ys.reshape(16, 3), y), "state": max(_err(a[i], b) for a, b in zip(news, new) for i in range(2))}


def distribution() -> dict:
    """jax: model.fit under keras.distribution.DataParallel over 2 devices, float32. normref's
    BatchNormalization must equal Keras's own there (whose statistics are the global batch's: GSPMD
    reduces over the sharded batch axis) and the same training on one device (local per-device
    statistics over half the batch would differ by ~1e-2)."""

    def build(layers):
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6), layers.BatchNormalization(),
                                 keras.layers.Dense(1)])

    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 5)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    weights = {}
    try:
        for dist in (False, True):
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()) if dist else None)
            keras.utils.set_random_seed(0)
            ours, theirs = build(nk), build(keras.layers)
            theirs.set_weights(ours.get_weights())
            for model in (ours, theirs):
                model.compile(keras.optimizers.SGD(0.1), "mse")
                model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
            weights[dist] = (ours.get_weights(), theirs.get_weights())
    finally:
        keras.distribution.set_distribution(None)
    return {"devices": len(jax.devices()),
            "normref_vs_keras": max(_err(a, b) for a, b in zip(*weights[True])),
            "distributed_vs_single": max(_err(a, b) for a, b in zip(weights[True][0], weights[False][0]))}


def main() -> None:
    out = {"backend": keras.backend.backend()}
    if BACKEND == "jax":
        out["axis_name"] = axis_name()
        out["distribution"] = distribution()
    out["generic/channel_axis"] = generic(move_axis=False)
    if BACKEND == "torch":  # the fallback is keras.ops code, the same on every backend: run it once (fast)
        out["generic/move_axis"] = generic(move_axis=True)
    out["named"] = named()
    out["errors"] = errors()
    out["serialization"] = serialization()
    for name, (ours, theirs, formula, kw, shape) in cases().items():
        # float32 against Keras's own layer; float64 against the float64 formula
        for dtype, ref, tag in (("float32", theirs, "keras"), ("float64", formula, "formula")):
            out[f"{name}/{dtype}/{tag}"] = compare(lambda d: ours(dtype=d, **kw), lambda d: ref(dtype=d, **kw),
                                                   shape, dtype)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
