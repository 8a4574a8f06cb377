"""normref.backends.flax: NNX (and linen) layers against Flax's own layers.

The oracle is Flax: ``flax.nnx.BatchNorm``/``LayerNorm``/``GroupNorm``/``RMSNorm``/``InstanceNorm``
and ``flax.linen``'s BatchNorm/LayerNorm/GroupNorm, built from the same seed (normref's layers draw the
same RNG keys) and given the same random scale/bias: forward, gradients (``nnx.grad``: input and every
Param), running statistics after several training steps, inference outputs. Inputs are float32 (Flax's
default), NHWC with H = W = C (the layout where normalizing over the wrong axis would go unnoticed
by shapes). Tolerance: both sides sum at most n values per statistic (n = the reduction's size); the
error bound of a float32 sum of n terms is n·ε₃₂ relative to the sum of magnitudes (Higham's γ_n),
so values are compared with |a − b| ≤ n·ε₃₂·(max|b| + 1) — Flax's E[x²] − E[x]² variance (inputs with
|mean|/σ ≈ 0.5 here) stays within it; measured errors are 10-50 times smaller.

The generic layers (every registered channel method) are compared with normref's NumPy path on the
NCHW transpose: forward, the running statistics (Flax's momentum 0.99 = normref's 0.01), inference.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import normref  # noqa: E402
import normref.backends.flax as ntf  # noqa: E402
from normref.backends.flax import linen as ntl  # noqa: E402
from normref.registry import get  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
C = 6


def _close(a, b, n, what=""):
    """|a − b| ≤ n·ε₃₂·(max|b| + 1): float32 sums of n terms on both sides (see the module docstring)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    tol = n * EPS32 * (float(np.max(np.abs(b))) + 1.0)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"
    return err


def _x(shape=(3, C, C, C), seed=0, loc=1.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(loc, scale, size=shape).astype(np.float32))


# (class name, constructor arguments, n = the largest reduction size for the default input)
DROPINS = [
    ("BatchNorm", (C,), {}, 3 * C * C),
    ("BatchNorm", (C,), {"momentum": 0.9, "epsilon": 1e-3, "use_bias": False}, 3 * C * C),
    ("LayerNorm", (C,), {}, C),
    ("LayerNorm", (C,), {"reduction_axes": (1, 2, 3), "epsilon": 1e-5}, C * C * C),
    ("GroupNorm", (C,), {"num_groups": 3}, C * C * 2),
    ("GroupNorm", (C,), {"num_groups": None, "group_size": 3, "use_scale": False}, C * C * 3),
    ("RMSNorm", (C,), {}, C),
    ("InstanceNorm", (C,), {}, C * C),
]


def _pair(name, args, kwargs, seed=1):
    ours = getattr(ntf, name)(*args, rngs=nnx.Rngs(0), **kwargs)
    theirs = getattr(nnx, name)(*args, rngs=nnx.Rngs(0), **kwargs)
    rng = np.random.default_rng(seed)
    for v in ("scale", "bias"):  # the same random affine on both (Flax initializes 1 and 0)
        if getattr(theirs, v, None) is not None:
            val = jnp.asarray(rng.normal(size=getattr(theirs, v)[...].shape).astype(np.float32))
            getattr(ours, v)[...] = val
            getattr(theirs, v)[...] = val
    return ours, theirs


METHOD = {"BatchNorm": "batch_norm", "LayerNorm": "layer_norm", "GroupNorm": "group_norm", "RMSNorm": "rms_norm",
          "InstanceNorm": "instance_norm"}


def _count_backward(monkeypatch, method):
    """A list that grows by one each time the registered method's analytic backward runs."""
    m = get(method)
    calls = []
    original = m.backward

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(m, "backward", counted)
    return calls


@pytest.mark.parametrize("name,args,kwargs,n", DROPINS, ids=lambda v: v if isinstance(v, str) else None)
def test_dropins_equal_flax_forward_and_gradients(name, args, kwargs, n, monkeypatch):
    calls = _count_backward(monkeypatch, METHOD[name])
    ours, theirs = _pair(name, args, kwargs)
    # the same variables: names, types, shapes (so a state can be swapped)
    so, st = nnx.state(ours), nnx.state(theirs)
    assert jax.tree.structure(so) == jax.tree.structure(st)
    assert jax.tree.map(jnp.shape, so) == jax.tree.map(jnp.shape, st)
    x = _x()
    _close(ours(x), theirs(x), n, "forward")

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))  # a nonlinear loss: the cotangent is not constant

    go_m, go_x = nnx.grad(loss, argnums=(0, 1))(ours, x)
    assert calls, f"{name}: nnx.grad did not run normref's backward"
    gt_m, gt_x = nnx.grad(loss, argnums=(0, 1))(theirs, x)
    _close(go_x, gt_x, n, "input gradient")
    po, pt = nnx.state(go_m, nnx.Param), nnx.state(gt_m, nnx.Param)
    assert jax.tree.structure(po) == jax.tree.structure(pt)
    for a, b in zip(jax.tree.leaves(po), jax.tree.leaves(pt)):
        _close(a, b, x.size, "parameter gradient")  # Σ over the whole batch


@pytest.mark.parametrize("axis,shape", [(-1, (4, C, C, C)), (1, (5, C, 7)), (-1, (8, C))])
def test_batchnorm_running_statistics_after_steps(axis, shape):
    """Training steps on different batches, then inference: Flax's EMA with the biased variance."""
    ours = ntf.BatchNorm(C, axis=axis, momentum=0.8, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(C, axis=axis, momentum=0.8, rngs=nnx.Rngs(0))
    n = int(np.prod(shape)) // C
    for step in range(3):
        x = _x(shape, seed=10 + step, loc=0.5 * step)
        _close(ours(x), theirs(x), n, f"step {step}")
        _close(ours.mean[...], theirs.mean[...], n, "running mean")
        _close(ours.var[...], theirs.var[...], n, "running var")
    assert ours.mean[...].dtype == theirs.mean[...].dtype == jnp.float32
    x = _x(shape, seed=20)
    _close(ours(x, use_running_average=True), theirs(x, use_running_average=True), n, "inference")
    # the biased variance, not the unbiased one normref's functional batch_norm keeps: after one step
    # from var = 1, var = 0.8 + 0.2·σ²_biased
    fresh = ntf.BatchNorm(C, axis=axis, momentum=0.8, rngs=nnx.Rngs(0))
    x = _x(shape, seed=30)
    fresh(x)
    moved = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, C)
    _close(fresh.var[...], 0.8 + 0.2 * moved.var(axis=0), n, "biased running variance")


def test_use_running_average_switches_and_state_swap():
    model = nnx.Sequential(ntf.BatchNorm(C, rngs=nnx.Rngs(0)))
    flax_model = nnx.Sequential(nnx.BatchNorm(C, rngs=nnx.Rngs(0)))
    x = _x((4, C))
    flax_model(x)
    flax_model(x * 2)
    nnx.update(model, nnx.state(flax_model))  # Flax's trained state, loaded into normref's layer
    model.eval()
    flax_model.eval()
    assert model.layers[0].use_running_average is True
    _close(model(x), flax_model(x), 4, "eval after state swap")
    before = np.asarray(model.layers[0].mean[...])
    view = nnx.view(model, use_running_average=False)
    view(x)
    assert not np.array_equal(before, np.asarray(model.layers[0].mean[...]))  # trained: stats moved
    bn = ntf.BatchNorm(C, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        bn(x)
    y = bn(x, use_running_average=True)  # the call argument: population statistics 0 and 1
    _close(y, x / np.sqrt(1 + 1e-5), 1, "use_running_average=True at the call")


def test_gradients_come_from_normrefs_backward(monkeypatch):
    """nnx.grad through BatchNorm runs normref.batch_norm's registered backward (a counter on it;
    the slow comparison with Flax counts it for every drop-in)."""
    calls = _count_backward(monkeypatch, "batch_norm")
    layer = ntf.BatchNorm(C, rngs=nnx.Rngs(0))
    nnx.grad(lambda mod: jnp.sum(mod(_x((4, C))) ** 2))(layer)
    assert calls, "normref.batch_norm's backward did not run"


def test_jit_and_axis_name_under_vmap():
    """axis_name: per-device batches under vmap(axis_name=...) give the global batch's statistics,
    as Flax's BatchNorm(axis_name=...) does, and equal the full batch on one device."""
    x = _x((8, 3, 3, C), seed=3)
    xs = x.reshape(2, 4, 3, 3, C)

    def sharded(cls):
        layer = cls(C, axis_name="batch", rngs=nnx.Rngs(0)) if isinstance(cls, type) else cls()
        graphdef, state = nnx.split(layer)

        def f(state, xb):
            m = nnx.merge(graphdef, state)
            y = m(xb)
            return y, nnx.state(m)

        y, new = jax.vmap(f, in_axes=(None, 0), out_axes=(0, 0), axis_name="batch")(state, xs)
        return y.reshape(x.shape), new

    yo, so = sharded(ntf.BatchNorm)
    yt, st = sharded(nnx.BatchNorm)
    n = x.size // C
    _close(yo, yt, n, "synchronized forward")
    for a, b in zip(jax.tree.leaves(so), jax.tree.leaves(st)):
        _close(a, b, n, "synchronized state")
    yg, _ = sharded(lambda: ntf.Norm("batch_norm", C, axis_name="batch"))  # the generic layer's axis_name
    _close(yg, yt, n, "generic layer, synchronized forward")
    full = ntf.BatchNorm(C, rngs=nnx.Rngs(0))
    _close(yo, nnx.jit(lambda m, x: m(x))(full, x), n, "full batch under nnx.jit")
    _close(so["mean"][...][0], full.mean[...], n, "running mean = the full batch's")
    _close(so["var"][...][1], full.var[...], n, "running var = the full batch's")


# --------------------------------------------------------------------------------------------------
# the generic layers: every channel method, features last
# --------------------------------------------------------------------------------------------------
GENERIC = [
    ("batch_norm", {}),
    ("instance_norm", {}),
    ("group_norm", {"num_groups": 3}),
    ("batch_renorm", {}),
    ("ghost_batch_norm", {"virtual_batch_size": 2}),
    ("batch_group_norm", {"num_groups": 3}),
    ("batch_instance_norm", {}),
    ("switchable_norm", {}),
    ("lp_batch_norm", {}),
    ("mean_only_batch_norm", {}),
    ("filter_response_norm", {}),
    ("position_norm", {}),
    ("pixel_norm", {}),
    ("local_response_norm", {"size": 3}),
    ("iter_norm", {"group_size": 3}),
    ("batch_whitening", {"group_size": 3}),
    ("decorrelated_batch_norm", {"group_size": 3}),
    ("whitening_coloring", {"group_size": 3}),
]


@pytest.mark.parametrize("method,static", GENERIC, ids=[g[0] for g in GENERIC])
def test_generic_layer_equals_the_method_on_nchw(method, static):
    layer = ntf.Norm(method, C, **static)
    x = _x((4, C, C, C), seed=5)
    m = get(method)
    arrays = {p: np.asarray(getattr(layer, p)[...]) for p in layer._param_names + layer._state_names
              if getattr(layer, p) is not None}
    kwargs = dict(static, **arrays)
    flag = next((f for f in ("training", "use_input_stats") if f in m.signature.parameters), None)
    if flag:
        kwargs[flag] = True
    if "momentum" in m.signature.parameters:
        kwargs["momentum"] = 1.0 - layer.momentum
    ref = normref.__dict__[method] if method in normref.__dict__ else getattr(normref, method)
    want = ref(np.moveaxis(np.asarray(x, np.float64), -1, 1), **kwargs)  # normref on NumPy, float64
    got = layer(x)
    n = x.size // C
    primary = want[0] if isinstance(want, tuple) else want
    _close(got, np.moveaxis(primary, 1, -1), n * 4, f"{method} forward")  # whitening: ×4 (conditioning)
    for p in layer._state_names:
        _close(getattr(layer, p)[...], getattr(want, p), n * 4, f"{method} {p}")
    if layer._state_names and flag:
        y = layer(x, use_running_average=True)
        assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    g = nnx.grad(lambda mod: jnp.sum(jnp.sin(mod(x))))(layer)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


def test_named_layers_and_linen_generic():
    x = _x((4, 3, 3, C), seed=6)
    it = ntf.IterNorm(C, group_size=3, momentum=0.9)
    assert isinstance(it, ntf.Norm) and it.normref_method == "iter_norm"
    it(x)
    assert "running_cov" in nnx.state(it, nnx.BatchStat) and "weight" in nnx.state(it, nnx.Param)
    lin = ntl.Norm("iter_norm", options=(("group_size", 3),), momentum=0.9)
    v = lin.init(jax.random.key(0), x, use_running_average=False)
    assert jnp.array_equal(v["batch_stats"]["running_cov"], jnp.broadcast_to(jnp.eye(3), (2, 3, 3)))  # untouched
    y, upd = lin.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    fresh = ntf.IterNorm(C, group_size=3, momentum=0.9)
    _close(y, fresh(x), x.size // C, "linen generic = nnx generic")
    _close(upd["batch_stats"]["running_cov"], fresh.running_cov[...], x.size // C, "linen state")


LINEN = [
    ("BatchNorm", {"use_running_average": False}, 3 * C * C),
    ("LayerNorm", {}, C),
    ("GroupNorm", {"num_groups": 3}, C * C * 2),
]


@pytest.mark.parametrize("name,kwargs,n", LINEN, ids=[g[0] for g in LINEN])
def test_linen_layers_equal_flax_linen(name, kwargs, n):
    ours, theirs = getattr(ntl, name)(**kwargs), getattr(nn, name)(**kwargs)
    x = _x()
    vt = theirs.init(jax.random.key(0), x)
    vo = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, vo) == jax.tree.map(jnp.shape, vt)
    rng = np.random.default_rng(2)
    vt = jax.tree.map(lambda a: a, vt)
    vt["params"] = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), vt["params"])
    mutable = ["batch_stats"] if "batch_stats" in vt else []
    for step in range(2):
        x = _x(seed=40 + step)
        yo, uo = ours.apply(vt, x, mutable=mutable)
        yt, ut = theirs.apply(vt, x, mutable=mutable)
        _close(yo, yt, n, f"{name} forward")
        for a, b in zip(jax.tree.leaves(uo), jax.tree.leaves(ut)):
            _close(a, b, n, f"{name} batch_stats")
        vt = {**vt, **ut}

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x, mutable=mutable)[0]))

    go = jax.grad(loss, argnums=(1, 2))(ours, vt, x)
    gt = jax.grad(loss, argnums=(1, 2))(theirs, vt, x)
    _close(go[1], gt[1], n, f"{name} input gradient")
    for a, b in zip(jax.tree.leaves(go[0]["params"]), jax.tree.leaves(gt[0]["params"])):
        _close(a, b, x.size, f"{name} parameter gradient")


def test_bad_input_is_refused_with_the_argument_named():
    x = _x((2, 3, 3, C))
    with pytest.raises(ValueError, match="axis=0 is the batch axis"):
        ntf.BatchNorm(C, axis=0, rngs=nnx.Rngs(0))(x)
    with pytest.raises(TypeError, match="axis must be an int"):
        ntf.BatchNorm(C, axis=1.0, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="momentum"):
        ntf.BatchNorm(C, momentum=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="BatchNorm: momentum must be a float"):
        ntf.BatchNorm(C, momentum=None, rngs=nnx.Rngs(0))
    # a schedule by the batch count is a host read: refused clearly under jit, not deep inside JAX
    cumulative = ntf.Norm("batch_norm", C, momentum=None)
    with pytest.raises(ValueError, match="outside jax.jit"):
        nnx.jit(lambda m, v: m(v))(cumulative, x)
    with pytest.raises(NotImplementedError, match="mask"):
        ntf.LayerNorm(C, rngs=nnx.Rngs(0))(x, mask=jnp.ones(x.shape, bool))
    with pytest.raises(ValueError, match="reduction_axes"):
        ntf.LayerNorm(C, reduction_axes=1, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="num_groups"):
        ntf.GroupNorm(C, num_groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="axis_name"):
        ntf.GroupNorm(C, num_groups=3, axis_name="batch", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="unexpected argument 'group_sise'"):
        ntf.Norm("iter_norm", C, group_sise=3)
    with pytest.raises(TypeError, match="axis_name"):
        ntf.Norm("group_norm", C, num_groups=3, axis_name="batch")
    with pytest.raises(TypeError, match="no momentum"):
        ntf.Norm("group_norm", C, num_groups=3, momentum=0.9)
    with pytest.raises(ValueError, match="num_features"):
        ntf.Norm("batch_norm", 0)
    with pytest.raises(TypeError, match="activation method"):
        ntf.Norm("whitening_matrix", C)


def test_flax_nnx_example_trains_and_equals_flax():
    """examples/flax_nnx_train.py (in a fresh process, float32 as the README runs it): the loss falls,
    and the normref-layered model's losses and running statistics equal Flax's own model's. Over 60
    Adam steps the per-step rounding differences (n·ε₃₂ relative) are carried through the weights;
    the bounds (1e-5 on losses ~1e-2, 1e-4 on statistics ~1) are ~100× the measured 4e-8 and 2e-7."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "examples" / "flax_nnx_train.py")], capture_output=True,
                         text=True, cwd=root, timeout=600, env={**os.environ, "JAX_ENABLE_X64": "0"})
    assert run.returncode == 0, run.stderr
    losses = [float(a) for a, _ in re.findall(r"loss normref ([0-9.]+)\s+flax ([0-9.]+)", run.stdout)]
    assert len(losses) == 6 and losses[-1] < 0.2 * losses[0]  # it trains
    diffs = re.search(r"max \|loss difference\| (\S+), max \|running statistics difference\| (\S+)", run.stdout)
    assert diffs is not None, run.stdout
    assert float(diffs.group(1)) < 1e-5 and float(diffs.group(2)) < 1e-4, run.stdout


def _public_classes():
    import normref.backends.flax.linen as linen_mod

    out = {}
    for mod in (ntf, linen_mod):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, type):
                out[f"{mod.__name__}.{name}"] = obj
    return out


@pytest.mark.parametrize("name", sorted(_public_classes()))
def test_numpydoc_docstrings(name):
    """The layers' docstrings pass the project's numpydoc check (tests/test_docstrings.py)."""
    from tests.test_docstrings import check_backend

    check_backend(name, _public_classes()[name])


def test_readme_section_runs(capsys):
    """The README's Flax block runs as written and prints what its comment says (the bounds there are
    n·ε₃₂-sized for n = 128 values per statistic and outputs of magnitude ≲ 4)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Flax layers (`normref.backends.flax`)", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code) == 1 and "python examples/flax_nnx_train.py" in section
    exec(compile(code[0], "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README
    assert capsys.readouterr().out.split() == ["True", "True"]


def test_axis_fallback_for_methods_without_channel_axis(monkeypatch):
    """A method that does not take channel_axis= (one registered later, say) gets its feature axis
    moved to 1 and back: the same output as the channel_axis= path (to the n·ε₃₂ of a reordered sum)."""
    import inspect

    import normref.backends.flax._nnx as impl

    x = _x((2, 3, 3, C), seed=8)
    layer = ntf.GroupNorm(C, num_groups=3, rngs=nnx.Rngs(0))
    direct = layer(x)
    real = get("group_norm")

    class NoChannelAxis:  # the method's view without the keyword: its signature minus channel_axis
        signature = inspect.Signature([p for n, p in real.signature.parameters.items() if n != "channel_axis"])

    monkeypatch.setattr(impl, "get", lambda name: NoChannelAxis if name == "group_norm" else real)
    moved = layer(x)
    _close(moved, direct, 3 * 3 * 2, "moved axis vs channel_axis=")
