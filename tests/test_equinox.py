"""normref.backends.equinox: per-example layers under jax.vmap(axis_name=...), against equinox's own.

Tolerances (float64 throughout): both sides compute the same statistics in a different order
(Equinox: two-pass ``pmean`` per channel; normref: its reducer over the named axis), so outputs agree
to a few ulps of each reduction over n ≤ 150 values (√n·ε worst-case growth ≈ 12 ε), times the
conditioning |x − μ|/σ ≲ 10 of these inputs, and the whitening methods of the generic test add the
conditioning of their covariance square roots (≲ 10 here): 1e3·ε₆₄ ≈ 2e-13. Gradients pass one more
reduction (Σg, Σg·x̂) and the loss's weights: 1e4·ε₆₄ ≈ 2e-12. Running statistics: a convex combination
of batch statistics, same bound as outputs. Measured: ≤ 3 ε₆₄ against equinox's layers (outputs,
state, gradients), ≤ 8 ε₆₄ per example vs the batched call.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import normref  # noqa: E402
from normref.backends import equinox as ne  # noqa: E402
from normref.backends import jax as nj  # noqa: E402

EPS = float(np.finfo(np.float64).eps)
TOL_OUT = 1e3 * EPS   # outputs and running statistics (see the module docstring)
TOL_GRAD = 1e4 * EPS  # gradients: one more reduction
F64 = jnp.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _x(shape, seed=0, loc=0.7, scale=1.8):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + loc)


def _close(a, b, tol, what=""):
    a, b = jnp.asarray(a), jnp.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    err = float(jnp.max(jnp.abs(a - b)) / max(1.0, float(jnp.max(jnp.abs(b)))))
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e}"
    return err


def _batched(layer, stateful=True):
    if stateful:
        return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return jax.vmap(layer, axis_name="batch")


def _perturb(model, seed):
    """The model with its inexact arrays moved off their initial values (so γ ≠ 1, β ≠ 0 are tested)."""
    leaves, tree = jax.tree_util.tree_flatten(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(seed)
    new = [leaf + jnp.asarray(rng.standard_normal(leaf.shape) * 0.3, leaf.dtype) for leaf in leaves]
    return eqx.combine(jax.tree_util.tree_unflatten(tree, new), model)


def _same_params(ours, theirs):
    """``theirs`` (eqx's layer) with ``ours``'s weight and bias."""
    names = [n for n in ("weight", "bias") if getattr(theirs, n) is not None]
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], theirs, [getattr(ours, n) for n in names])


# --------------------------------------------------------------------------------------------------
# BatchNorm against eqx.nn.BatchNorm(mode="batch")
# --------------------------------------------------------------------------------------------------
def test_batch_norm_equals_equinox():
    _check_batch_norm((6, 3, 4, 5), 0.99, True)


@pytest.mark.parametrize("shape, momentum, affine", [((5, 3), 0.9, True), ((4, 2, 7), 0.5, False)])
def test_batch_norm_variants_equal_equinox(shape, momentum, affine):
    _check_batch_norm(shape, momentum, affine)


def _check_batch_norm(shape, momentum, affine):
    c = shape[1]
    ours, s_ours = eqx.nn.make_with_state(ne.BatchNorm)(c, "batch", momentum=momentum, channelwise_affine=affine,
                                                        dtype=F64)
    theirs, s_theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, "batch", momentum=momentum,
                                                                channelwise_affine=affine, dtype=F64, mode="batch")
    if affine:
        ours = _perturb(ours, 1)
        theirs = _same_params(ours, theirs)
    step_fn = eqx.filter_jit(lambda model, x, state: _batched(model)(x, state))  # one program per layer
    for step in range(3):  # training steps: outputs and the state after each
        x = _x(shape, seed=step)
        y1, s_ours = step_fn(ours, x, s_ours)
        y2, s_theirs = step_fn(theirs, x, s_theirs)
        _close(y1, y2, TOL_OUT, f"output, step {step}")
        assert int(s_ours.get(ours.batch_counter)) == int(s_theirs.get(theirs.batch_counter)) == step + 1
        for a, b, what in zip(s_ours.get(ours.batch_state_index), s_theirs.get(theirs.batch_state_index),
                              ("hidden mean", "hidden var")):
            _close(a, b, TOL_OUT, f"{what}, step {step}")
    # inference: the zero-debiased hidden statistics, by the field (inference_mode) and by the argument
    x = _x(shape, seed=9)
    y1, _ = step_fn(eqx.nn.inference_mode(ours), x, s_ours)
    y2, _ = step_fn(eqx.nn.inference_mode(theirs), x, s_theirs)
    _close(y1, y2, TOL_OUT, "inference output")
    y3, s3 = jax.vmap(lambda xi, s: ours(xi, s, inference=True), axis_name="batch", in_axes=(0, None),
                      out_axes=(0, None))(x, s_ours)
    _close(y3, y2, TOL_OUT, "inference= argument")
    assert int(s3.get(ours.batch_counter)) == 3  # inference leaves the state alone


def _loss(model, state, x):
    y, state = _batched(model)(x, state)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size), state


@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (5, 3)])
def test_batch_norm_gradients_equal_equinox(shape):
    c = shape[1]
    ours, s_ours = eqx.nn.make_with_state(ne.BatchNorm)(c, "batch", dtype=F64)
    theirs, s_theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, "batch", dtype=F64, mode="batch")
    ours = _perturb(ours, 2)
    theirs = _same_params(ours, theirs)
    x = _x(shape, seed=3)
    grad = eqx.filter_grad(_loss, has_aux=True)
    (g1, _), (g2, _) = grad(ours, s_ours, x), grad(theirs, s_theirs, x)
    _close(g1.weight, g2.weight, TOL_GRAD, "dγ")
    _close(g1.bias, g2.bias, TOL_GRAD, "dβ")
    dx1 = jax.grad(lambda x: _loss(ours, s_ours, x)[0])(x)
    dx2 = jax.grad(lambda x: _loss(theirs, s_theirs, x)[0])(x)
    _close(dx1, dx2, TOL_GRAD, "dx")


def test_gradients_run_normrefs_backward(monkeypatch):
    """jax.grad of the layer calls normref's analytic backward (Method.backward), not JAX's AD of the formula."""
    m = normref.registry.get("batch_norm")
    calls = []
    original = m.backward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(m, "backward", counting)
    layer, state = eqx.nn.make_with_state(ne.BatchNorm)(3, "batch", dtype=F64)
    g, _ = eqx.filter_grad(_loss, has_aux=True)(layer, state, _x((4, 3, 2)))
    assert calls, "normref's backward did not run"
    assert g.weight.shape == (3,)


def test_batch_norm_under_jit_and_sequential():
    """eqx.nn.Sequential passes the state to normref's stateful layer; filter_jit equals eager."""
    key = jax.random.PRNGKey(0)
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv1d(2, 3, 3, padding=1, key=key, dtype=F64),
        ne.BatchNorm(3, "batch", dtype=F64),
        eqx.nn.Lambda(jax.nn.relu),
        ne.GroupNorm(3, 3, dtype=F64),
    ])
    x = _x((5, 2, 6))

    def run(model, x, state):
        return _batched(model)(x, state)

    y1, s1 = run(seq, x, state)
    y2, s2 = eqx.filter_jit(run)(seq, x, state)
    _close(y1, y2, TOL_OUT, "jit")
    assert int(s2.get(seq.layers[1].batch_counter)) == 1


# --------------------------------------------------------------------------------------------------
# stateless drop-ins against eqx.nn.LayerNorm / GroupNorm / RMSNorm
# --------------------------------------------------------------------------------------------------
CASES = [
    ("LayerNorm", lambda mod: mod.LayerNorm((3, 4, 5), dtype=F64), (6, 3, 4, 5)),
    ("LayerNorm no bias", lambda mod: mod.LayerNorm(7, use_bias=False, dtype=F64), (4, 7)),
    ("GroupNorm", lambda mod: mod.GroupNorm(2, 4, dtype=F64), (5, 4, 3, 3)),
    ("GroupNorm no affine", lambda mod: mod.GroupNorm(3, 6, channelwise_affine=False, dtype=F64), (3, 6, 5)),
    ("RMSNorm", lambda mod: mod.RMSNorm((3, 4), dtype=F64), (5, 3, 4)),
    ("RMSNorm no bias", lambda mod: mod.RMSNorm(6, use_bias=False, eps=1e-3, dtype=F64), (4, 6)),
]


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm"])
def test_constructors_are_equinoxs(name):
    """Same parameter names, kinds and defaults as eqx.nn's (BatchNorm's mode: 'batch', see its docstring)."""
    import inspect

    ours = inspect.signature(getattr(ne, name).__init__).parameters
    theirs = inspect.signature(getattr(eqx.nn, name).__init__).parameters
    assert list(ours) == list(theirs)
    for p in theirs:
        assert ours[p].kind == theirs[p].kind, p
        if not (name == "BatchNorm" and p == "mode"):
            assert ours[p].default == theirs[p].default, p
    assert ours["mode" if name == "BatchNorm" else "self"].default in ("batch", inspect.Parameter.empty)


def _check_stateless(name, make, shape):
    ours = _perturb(make(ne), 4)
    theirs = _same_params(ours, make(eqx.nn))
    x = _x(shape, seed=5)
    # the state is passed through, as in Equinox
    state = eqx.nn.State(eqx.nn.StateIndex(jnp.zeros(2)))
    y, s = ours(x[0], state)
    assert s is state and y.shape == x.shape[1:]

    def loss(model, x):
        y = _batched(model, False)(x)
        return jnp.sum(jnp.cos(y) * jnp.linspace(-1.0, 2.0, y.size).reshape(y.shape)), y

    @eqx.filter_jit  # one compiled program per side: output, parameter and input gradients
    def run(model, x):
        (g, dx), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return y, g, dx

    (y1, g1, dx1), (y2, g2, dx2) = run(ours, x), run(theirs, x)
    _close(y1, y2, TOL_OUT, f"{name} output")
    for field in ("weight", "bias"):
        if getattr(theirs, field) is not None:
            _close(getattr(g1, field), getattr(g2, field), TOL_GRAD, f"{name} d{field}")
    _close(dx1, dx2, TOL_GRAD, f"{name} dx")


@pytest.mark.parametrize("name, make, shape", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_stateless_layers_equal_equinox(name, make, shape):
    _check_stateless(name, make, shape)


@pytest.mark.parametrize("name, make, shape", CASES[1::2], ids=[c[0] for c in CASES[1::2]])
def test_stateless_layer_variants_equal_equinox(name, make, shape):
    _check_stateless(name, make, shape)


# --------------------------------------------------------------------------------------------------
# the generic layer: every supported method, per example under vmap == the batched call
# --------------------------------------------------------------------------------------------------
_OPTIONS = {  # options a method needs (or that make its case non-trivial)
    "layer_norm": dict(normalized_shape=(4, 3, 2)),
    "rms_norm": dict(normalized_shape=(4, 3, 2)),
    "group_norm": dict(num_groups=2),
    "batch_group_norm": dict(num_groups=2),
    "batch_whitening": dict(group_size=2),
    "decorrelated_batch_norm": dict(group_size=2),
    "iter_norm": dict(group_size=2),
    "whitening_coloring": dict(group_size=2),
    "local_response_norm": dict(size=2),
}


def test_supported_methods():
    names = ne.supported_methods()
    for must in ("batch_norm", "instance_norm", "layer_norm", "group_norm", "iter_norm", "batch_renorm",
                 "switchable_norm", "filter_response_norm", "batch_whitening"):
        assert must in names
    for refused in ("ghost_batch_norm", "blended_batch_norm", "adain", "decov_penalty", "weight_norm"):
        assert refused not in names


def _reference_kwargs(layer, state, training):
    m = normref.registry.get(layer.method)
    kw = dict(layer.options)
    kw.update(layer.params)
    if layer.state_index is not None:
        kw.update(state.get(layer.state_index))
    flag = next((f for f in ("training", "use_input_stats") if f in m.signature.parameters), None)
    if flag:
        kw[flag] = training
    if layer.momentum is not None:
        kw["momentum"] = 1.0 - layer.momentum
    return kw


@pytest.mark.parametrize("method", ne.supported_methods())
def test_generic_layer_per_example_equals_batched_call(method):
    """``Norm(method)`` per example under vmap(axis_name) == ``normref.backends.jax.<method>`` on the batch:
    output, running statistics, inference output, and gradients for the input and every learnable array."""
    n, c = 6, 4
    x = _x((n, c, 3, 2), seed=11)
    sig = normref.registry.get(method).signature.parameters
    axis = "batch" if ("sync" in sig or method == "instance_norm") else None
    layer, state = eqx.nn.make_with_state(ne.Norm)(method, c, axis_name=axis, dtype=F64, **_OPTIONS.get(method, {}))
    layer = _perturb(layer, 6)
    fn = nj.function(method)
    stateful = layer.is_stateful()

    def ours(model, x):
        if stateful:
            return _batched(model)(x, state)
        return _batched(model, False)(x), None

    def ref(model, x, training=True):
        out = fn(x, **_reference_kwargs(model, state, training))
        return (out[0], out) if isinstance(out, tuple) else (out, None)

    y1, s1 = ours(layer, x)
    y2, full = ref(layer, x)
    _close(y1, y2, TOL_OUT, f"{method} output")
    if stateful:
        for p, v in s1.get(layer.state_index).items():
            _close(v, getattr(full, p), TOL_OUT, f"{method} {p}")
        y3, s3 = _batched(eqx.nn.inference_mode(layer))(x, s1)
        y4, _ = ref(layer, x, training=False)
        # at inference, the reference uses the initial state: compare against the state after the step
        kw = _reference_kwargs(layer, s1, False)
        y4 = fn(x, **kw)
        y4 = y4[0] if isinstance(y4, tuple) else y4
        _close(y3, y4, TOL_OUT, f"{method} inference output")

    weights = jnp.linspace(-1.0, 1.5, y2.size).reshape(y2.shape)
    g1 = eqx.filter_grad(lambda mdl, x: jnp.sum(jnp.tanh(ours(mdl, x)[0]) * weights))(layer, x)
    g2 = eqx.filter_grad(lambda mdl, x: jnp.sum(jnp.tanh(ref(mdl, x)[0]) * weights))(layer, x)
    for p, g in g1.params.items():
        if g is not None:
            _close(g, g2.params[p], TOL_GRAD, f"{method} d{p}")
    dx1 = jax.grad(lambda x: jnp.sum(jnp.tanh(ours(layer, x)[0]) * weights))(x)
    dx2 = jax.grad(lambda x: jnp.sum(jnp.tanh(ref(layer, x)[0]) * weights))(x)
    _close(dx1, dx2, TOL_GRAD, f"{method} dx")


def test_named_generic_layers():
    layer, state = eqx.nn.make_with_state(ne.IterNorm)(4, axis_name="batch", group_size=2, dtype=F64)
    assert layer.method == "iter_norm" and isinstance(layer, ne.Norm)
    y, state = _batched(layer)(_x((5, 4, 3)), state)
    assert y.shape == (5, 4, 3)
    frn = ne.FilterResponseNorm(4, dtype=F64)
    assert not frn.is_stateful() and frn(_x((4, 3, 3))).shape == (4, 3, 3)
    inst, s = eqx.nn.make_with_state(ne.InstanceNorm)(4, axis_name="batch", dtype=F64)
    y, s = _batched(inst)(_x((5, 4, 6)), s)
    assert y.shape == (5, 4, 6)


# --------------------------------------------------------------------------------------------------
# bad input, refused before any work
# --------------------------------------------------------------------------------------------------
def test_bad_input():
    bn, state = eqx.nn.make_with_state(ne.BatchNorm)(3, "batch")
    with pytest.raises(ValueError, match="BatchNorm: x must be one example .*C = 3"):
        _batched(bn)(jnp.ones((2, 4, 3, 5)), state)  # a batched input given per example
    with pytest.raises(TypeError, match="BatchNorm: x must be a JAX array"):
        bn(np.ones((3, 2)), state)
    with pytest.raises(ValueError, match="mode must be 'batch'"):
        ne.BatchNorm(3, "batch", mode="ema")
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\]"):
        ne.BatchNorm(3, "batch", momentum=1.5)
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        ne.BatchNorm(0, "batch")
    with pytest.raises(ValueError, match="LayerNorm: x must have the layer's shape \\(4,\\)"):
        ne.LayerNorm(4)(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="channels must be a positive multiple of groups"):
        ne.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="channels must be given"):
        ne.GroupNorm(2)
    with pytest.raises(TypeError, match="Norm\\('ghost_batch_norm'\\): no per-example layer.*ghost"):
        ne.Norm("ghost_batch_norm", 4, axis_name="batch")
    with pytest.raises(TypeError, match="no sync= reducer"):
        ne.Norm("blended_batch_norm", 4)
    with pytest.raises(ValueError, match="axis_name is required"):
        ne.Norm("batch_norm", 4)
    with pytest.raises(TypeError, match="has no batch statistics to take an axis_name"):
        ne.Norm("layer_norm", 4, axis_name="batch", normalized_shape=(4,))
    with pytest.raises(TypeError, match="unexpected argument 'groups'"):
        ne.Norm("group_norm", 4, groups=2)
    with pytest.raises(ValueError, match="batch_groups must be 1"):
        ne.Norm("batch_group_norm", 4, axis_name="batch", num_groups=2, batch_groups=2)
    with pytest.raises(TypeError, match="has no running statistics to take a momentum"):
        ne.Norm("group_norm", 4, num_groups=2, momentum=0.9)
    layer, _ = eqx.nn.make_with_state(ne.Norm)("batch_norm", 4, axis_name="batch")
    with pytest.raises(TypeError, match="call it as layer\\(x, state\\)"):
        layer(jnp.ones((4, 3)))


# --------------------------------------------------------------------------------------------------
# the worked example
# --------------------------------------------------------------------------------------------------
def _example():
    pytest.importorskip("optax")  # the example's optimizer (not a dependency of normref)
    spec = importlib.util.spec_from_file_location("equinox_train", ROOT / "examples" / "equinox_train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses (eqx.Module) look the module up while building classes
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def test_worked_example_trains_and_equals_equinox():
    """examples/equinox_train.py: the loss decreases, and normref's net equals Equinox's step by step.

    In float64, 15 SGD-with-momentum steps: each step's parameters differ by O(ε₆₄) between the two
    nets (the per-layer errors above), amplified at most by (1 + lr·L) per step for this smooth loss;
    1e-10 relative on the losses is ~10⁵ ε₆₄, well above what the amplification reaches in 15 steps
    (measured 2e-15)."""
    mod = _example()
    ours = mod.train(normref=True, steps=15, dtype=F64)
    theirs = mod.train(normref=False, steps=15, dtype=F64)
    assert ours["losses"][-1] < 0.5 * ours["losses"][0]
    np.testing.assert_allclose(ours["losses"], theirs["losses"], rtol=1e-10, atol=0)
    np.testing.assert_allclose(ours["eval_loss"], theirs["eval_loss"], rtol=1e-10, atol=0)
    assert "python examples/equinox_train.py" in (ROOT / "README.md").read_text()


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Equinox layers")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_readme_section_runs(capsys):
    """The README's Equinox block runs as written and prints what its comment says."""
    import re

    code = re.findall(r"```python\n(.*?)```", _readme_section(), flags=re.S)
    assert len(code) == 1
    exec(compile(code[0], "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README
    assert capsys.readouterr().out.strip() == "(16, 64, 8, 8) 1"


def test_example_script_prints_the_readme_table():
    """``python examples/equinox_train.py`` in a fresh process (float32, as the README runs it) prints
    the README's table. The printed values have 5 decimals; another CPU's float32 reduction order can
    move them by a few ε₃₂·(steps) ≈ 1e-5 relative, so they are compared to 1e-3 absolute: the claim
    is the curve and the agreement of the two columns, not the fifth digit."""
    import re
    import subprocess

    pytest.importorskip("optax")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "equinox_train.py")], capture_output=True,
                         text=True, timeout=600, cwd=str(ROOT))
    assert run.returncode == 0, run.stderr[-2000:]
    shown = re.findall(r"```\n(step  0.*?)```", _readme_section(), flags=re.S)[0]
    numbers = lambda s: [float(v) for v in re.findall(r"\d+\.\d+", s)]  # noqa: E731
    got, want = numbers(run.stdout), numbers(shown)
    assert len(got) == len(want) == 12
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    pairs = np.asarray(got).reshape(6, 2)
    # normref == equinox in float32, up to the printed rounding (one unit of the 5th decimal)
    np.testing.assert_allclose(pairs[:, 0], pairs[:, 1], atol=1.5e-5, rtol=0)
    assert pairs[-2, 0] < 0.1 * pairs[0, 0]  # the loss falls
