"""normref.backends.jax: registry-generated jax.custom_vjp functions under grad, grad-of-grad, jit, vmap.

Every registered method is checked (on the smallest of its own ``examples(rng)``, so methods
registered later are covered without editing this file) with ``jax.test_util.check_grads`` in
reverse mode, orders 1 and 2, in float64, under ``jax.jit``. The finite-difference step is
ε₆₄^(1/3) ≈ 6e-6, which balances truncation (h²·|f'''|) against round-off (ε/h): ~4e-11 relative on
smooth problems, far below check_grads' own float64 tolerance (1e-5), which is not loosened here.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads, check_vjp  # noqa: E402

import normref  # noqa: E402
from normref.backends import jax as nj  # noqa: E402

H = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)


def _smallest_example(m):
    exs = list(m.examples(np.random.default_rng(7)))

    def cost(ex):  # differentiable elements × unrolled iterations (jit compile time grows with both)
        b = m.bind(*ex.args, **ex.kwargs)
        n = sum(int(np.size(b.arguments[p])) for p in m.diff_params if b.arguments.get(p) is not None)
        it = b.arguments.get("iterations")
        return n * (it if isinstance(it, int) else 1)

    return min(exs, key=cost)


def _setup(m, ex):
    """(fn, primals, frozen_fn): fn(*primals) is the wrapped method's primary output."""
    bound = m.bind(*ex.args, **ex.kwargs)
    args = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in bound.arguments.items()}
    diff = [p for p in m.diff_params if args.get(p) is not None]
    f = nj.function(m)

    def call(g, xs):
        a = dict(args)
        a.update(zip(diff, xs))
        b = inspect.BoundArguments(m.signature, a)
        return m.primary(g(*b.args, **b.kwargs))

    fn = lambda *xs: call(f, xs)  # noqa: E731
    frozen = None
    if m.fd_target is not None:
        b0 = inspect.BoundArguments(m.signature, dict(args))
        fz = m.fd_target(b0.args, b0.kwargs)

        def frozen(*xs):
            # value of the frozen function (what the analytic backward differentiates), derivative of
            # the wrapper: stop_gradient(y_f) + (y − stop_gradient(y)); the bracket is exactly 0
            y = fn(*xs)
            return jax.lax.stop_gradient(call(fz, xs)) + (y - jax.lax.stop_gradient(y))

    return fn, tuple(args[p] for p in diff), frozen


@pytest.mark.parametrize("name", [m.name for m in normref.methods()])
def test_check_grads_orders_1_and_2(name):
    m = normref.get(name)
    assert m.examples is not None, f"{name} registers no examples"
    fn, primals, frozen = _setup(m, _smallest_example(m))
    assert primals, f"{name}: the example has no differentiable argument"
    if frozen is None:
        check_grads(jax.jit(fn), primals, order=2, modes=["rev"], eps=H)
        return
    # Stop-gradient constants (batch renormalization's r, d; spectral norm's u, v): first order
    # against the frozen function; second order on the map x ↦ backward(x)·c for a fixed cotangent c
    # (what torch's gradgradcheck checks): its VJP is the derivative of normref's analytic backward.
    check_grads(jax.jit(frozen), primals, order=1, modes=["rev"], eps=H)
    y = fn(*primals)
    c = jnp.asarray(np.random.default_rng(3).standard_normal(y.shape))
    bwd_map = jax.jit(lambda *xs: jax.vjp(fn, *xs)[1](c))
    check_vjp(bwd_map, lambda *xs: jax.vjp(bwd_map, *xs), primals, eps=H)


# Every method already runs under jit in test_check_grads_orders_1_and_2; eager-vs-jit equality is
# checked on one method per kind of machinery (eager JAX is slow on this 2-core machine):
# plain reductions, a NamedTuple output with state, an iterative matrix method, stop-gradient
# constants with state, a weight method, eigendecomposition, a gradient method.
JIT_EAGER = ["group_norm", "batch_norm", "iter_norm", "spectral_norm", "weight_norm", "whitening_matrix", "lars"]


@pytest.mark.parametrize("name", JIT_EAGER)
def test_jit_equals_eager(name):
    """Forward and gradients under jax.jit equal eager ones up to XLA's reassociation of sums:
    ≤ 1e-12·max(1, |g|) (n·ε with n ≤ a few hundred terms per reduction here)."""
    m = normref.get(name)
    fn, primals, _ = _setup(m, _smallest_example(m))
    loss = lambda *xs: jnp.sum(jnp.sin(fn(*xs)))  # noqa: E731
    argnums = tuple(range(len(primals)))
    eager = jax.grad(loss, argnums=argnums)(*primals)
    jitted = jax.jit(jax.grad(loss, argnums=argnums))(*primals)
    for a, b in zip(eager, jitted):
        assert a.shape == b.shape
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12 * max(1.0, float(jnp.max(jnp.abs(a))))
    ye, yj = fn(*primals), jax.jit(fn)(*primals)
    assert float(jnp.max(jnp.abs(ye - yj))) <= 1e-12 * max(1.0, float(jnp.max(jnp.abs(ye))))


def test_grad_matches_numpy_pullback():
    """The JAX gradient is normref's analytic backward (the NumPy pullback), not a trace of the forward."""
    rng = np.random.default_rng(0)
    x, w, b, g = rng.standard_normal((3, 4, 5)), rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal((3, 4, 5))
    _, pullback = normref.vjp(normref.group_norm, x, 2, w, b)
    ref = pullback(g)
    got = jax.grad(lambda x, w, b: jnp.sum(nj.group_norm(x, 2, w, b) * g), argnums=(0, 1, 2))(x, w, b)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), r, rtol=0, atol=1e-13)


def test_vmap():
    """vmap over an extra leading axis equals a Python loop, for values and gradients (1e-13)."""
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((3, 2, 4, 5)))
    w, b = jnp.asarray(rng.standard_normal(4)), jnp.asarray(rng.standard_normal(4))
    f = lambda x: nj.group_norm(x, 2, w, b)  # noqa: E731
    loss = lambda x: jnp.sum(jnp.tanh(f(x)))  # noqa: E731
    yv = jax.vmap(f)(xs)
    gv = jax.jit(jax.vmap(jax.grad(loss)))(xs)
    grad1 = jax.jit(jax.grad(loss))
    for i in range(3):
        assert float(jnp.max(jnp.abs(yv[i] - f(xs[i])))) <= 1e-13
        assert float(jnp.max(jnp.abs(gv[i] - grad1(xs[i])))) <= 1e-13
    # per-example Hessian-vector products: vmap of grad-of-grad
    v = jnp.asarray(rng.standard_normal((3, 2, 4, 5)))
    hvp = jax.jit(lambda x, v: jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) * v))(x))
    hv = jax.jit(jax.vmap(hvp))(xs, v)
    for i in range(3):
        assert float(jnp.max(jnp.abs(hv[i] - hvp(xs[i], v[i])))) <= 1e-12


def test_second_derivative_against_finite_differences_of_the_backward():
    """grad-of-grad equals central differences of the (analytic) gradient, 1e-7 relative
    (h = ε^(1/3) gives ~1e-10 on this smooth problem)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6))
    v = rng.standard_normal((4, 6))
    g = rng.standard_normal((4, 6))
    grad = jax.grad(lambda x: jnp.sum(nj.layer_norm(x, (6,)) * g))
    hv = jax.grad(lambda x: jnp.sum(grad(x) * v))(jnp.asarray(x))
    # Hessian of a scalar loss is symmetric, so ∇⟨∇L, v⟩ = H v = d/dh ∇L(x + h v)
    fd = (np.asarray(grad(jnp.asarray(x + H * v))) - np.asarray(grad(jnp.asarray(x - H * v)))) / (2 * H)
    assert np.max(np.abs(np.asarray(hv) - fd)) <= 1e-7 * max(1.0, np.max(np.abs(fd)))
    assert np.max(np.abs(fd)) > 1e-2  # a real second derivative


def test_auxiliary_outputs_carry_no_gradient():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 3)))
    rm, rv = jnp.zeros(3), jnp.ones(3)
    out = jax.jit(lambda x, rm, rv: nj.batch_norm(x, rm, rv, None, None, True, 0.2))(x, rm, rv)
    assert type(out).__name__ == "NormResult"
    ref = normref.batch_norm(np.asarray(x), np.zeros(3), np.ones(3), None, None, True, 0.2)
    for a, r in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), r, rtol=0, atol=1e-14)

    def loss(x, aux_weight):
        o = nj.batch_norm(x, rm, rv, None, None, True, 0.2)
        return jnp.sum(jnp.sin(o.output)) + aux_weight * jnp.sum(o.running_mean + o.running_var)

    # the cotangents of the running statistics are ignored: the gradient is the output's alone
    g0, g1 = jax.grad(loss)(x, 0.0), jax.grad(loss)(x, 1.0)
    assert float(jnp.max(jnp.abs(g0 - g1))) == 0.0
    # running statistics given to the function get a zero cotangent, not an error
    grm = jax.grad(lambda rm: jnp.sum(nj.batch_norm(x, rm, rv, None, None, True, 0.2).output))(rm)
    assert float(jnp.max(jnp.abs(grm))) == 0.0


def test_static_arguments():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 4)))
    # a list normalized_shape becomes a tuple (hashable, for nondiff_argnums)
    a = nj.layer_norm(x, [3, 4])
    b = nj.layer_norm(x, (3, 4))
    assert float(jnp.max(jnp.abs(a - b))) == 0.0
    with pytest.raises(TypeError, match=r"layer_norm: normalized_shape is a static .* got dict"):
        nj.layer_norm(x, {"a": 1})


def test_residuals_are_a_pytree():
    r = normref.Residuals((jnp.ones(2), None, jnp.zeros(3)), static=("s", 1), meta=(jnp.float64,))
    leaves, tree = jax.tree_util.tree_flatten(r)
    assert len(leaves) == 2
    r2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert r2.static == ("s", 1) and r2.arrays[1] is None


def test_every_registered_method_is_exposed():
    for m in normref.methods():
        f = getattr(nj, m.name)
        assert f.method is m and inspect.signature(f) == m.signature


def test_readme_example_trains():
    """examples/jax_mlp.py (the README's worked example) runs and its loss falls."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "jax_mlp.py"
    spec = importlib.util.spec_from_file_location("normref_example_jax_mlp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses = mod.main(steps=150)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < 0.3 * losses[0]
