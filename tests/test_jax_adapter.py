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


def _rel_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b))) / max(1.0, float(jnp.max(jnp.abs(b))))


def _value_and_grads(fn, n):
    """xs ↦ (fn(xs), ∇ Σ sin(fn(xs))): the forward and every first derivative, one function to trace."""
    loss = lambda *xs: jnp.sum(jnp.sin(fn(*xs)))  # noqa: E731
    grad = jax.grad(loss, argnums=tuple(range(n)))
    return lambda *xs: (fn(*xs), grad(*xs))


@pytest.mark.parametrize("name", [m.name for m in normref.methods()])
def test_jit_and_vmap_equal_eager(name):
    """For every method, on its smallest example and a perturbed copy of it: ``jax.jit(jax.vmap(·))``
    of the forward and of every first derivative (grad under vmap: per-example gradients) over the
    batch of the two equals the eager, unbatched result of each — so jit equals eager and vmap equals a
    loop. (One compilation per method: eager JAX compiles each op on first use, which dominates.)

    Tolerance: 1e-12·max(1, |ref|)·cond. XLA reassociates sums and batches matrix factorizations
    differently (n·ε per reduction, n ≤ a few hundred terms here: ≲ 1e-13), amplified by the
    example's conditioning ``cond`` for the matrix functions."""
    m = normref.get(name)
    ex = _smallest_example(m)
    fn, primals, _ = _setup(m, ex)
    vg = _value_and_grads(fn, len(primals))
    tol = 1e-12 * ex.cond
    # the second example: a small perturbation of the first (stays valid: same shapes, same signs of
    # the quantities a method may require positive)
    rng = np.random.default_rng(11)
    other = tuple(p * (1.0 + 0.05 * jnp.asarray(rng.uniform(-1, 1, p.shape))) for p in primals)
    eager = [vg(*primals), vg(*other)]
    batched = tuple(jnp.stack([p, q]) for p, q in zip(primals, other))
    yv, gv = jax.jit(jax.vmap(vg))(*batched)
    for i, (yi, gi) in enumerate(eager):
        assert yv[i].shape == yi.shape and _rel_err(yv[i], yi) <= tol, f"forward, example {i}"
        for a, b in zip(gv, gi):
            assert a[i].shape == b.shape and _rel_err(a[i], b) <= tol, f"gradient, example {i}"


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


def test_auxiliary_outputs_are_state_not_gradients():
    """The running statistics of a NamedTuple result are state: a gradient through them is refused
    where its value can be seen (eagerly), dropped under tracing (documented in the adapter), and free
    when it is a symbolic zero (state returned through has_aux, the usual case)."""
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

    g0 = jax.grad(loss)(x, 0.0)  # a concrete zero cotangent for the state is accepted
    with pytest.raises(ValueError, match=r"batch_norm: the output's running_mean is state .*stop_gradient"):
        jax.grad(loss)(x, 1.0)
    # under jit the cotangent is a tracer: it cannot be inspected and is dropped (treated as zero)
    gj = jax.jit(jax.grad(loss))(x, 1.0)
    assert _rel_err(gj, g0) <= 1e-13

    # the usual pattern: the new state leaves through has_aux, its cotangent is a symbolic zero
    def loss_aux(x):
        o = nj.batch_norm(x, rm, rv, None, None, True, 0.2)
        return jnp.sum(jnp.sin(o.output)), (o.running_mean, o.running_var)

    (_, state), ga = jax.value_and_grad(loss_aux, has_aux=True)(x)
    assert _rel_err(ga, g0) <= 1e-13 and _rel_err(state[0], out.running_mean) <= 1e-14

    # state carried through lax.scan: scan instantiates zero cotangents for its carry (tracers here),
    # which must not be mistaken for a gradient through the statistics
    def scanned(x):
        def body(c, xi):
            o = nj.batch_norm(xi, c[0], c[1], None, None, True, 0.2)
            return (o.running_mean, o.running_var), jnp.sum(jnp.sin(o.output))

        return jnp.sum(jax.lax.scan(body, (rm, rv), jnp.stack([x, 2 * x]))[1])

    gs = jax.grad(scanned)(x)
    # in training the output does not depend on the running statistics: the same loss without scan
    ref = jax.grad(lambda x: loss(x, 0.0) + loss(2 * x, 0.0))(x)
    assert _rel_err(gs, ref) <= 1e-13
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
        sig = inspect.signature(f)
        if "sync" in m.signature.parameters:  # batch statistics: plus Flax's keyword-only axis_name
            ax = sig.parameters["axis_name"]
            assert ax.kind is inspect.Parameter.KEYWORD_ONLY and ax.default is None
            sig = sig.replace(parameters=[q for q in sig.parameters.values() if q.name != "axis_name"])
        assert f.method is m and sig == m.signature


def test_axis_name_under_vmap():
    """``axis_name=`` is ``sync=JaxReducer(axis_name)``: under ``vmap(axis_name=...)`` over 4
    slices of a batch, batch norm's output, running statistics and gradients (parameter gradients
    psum'd over the mapped axis, as under pmap) equal the whole batch at once. (The multi-device
    engines, shard_map and pmap, are tested in tests/test_jax_sharded.py.) Tolerance 1e-13: the
    same sums grouped per slice then combined (Chan), ~n·ε for n = 32 terms."""
    from normref.backends.distributed.jax import JaxReducer

    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((4, 8, 3)) * 2 + 1)  # 4 slices of 8 samples, 3 channels
    w, b = jnp.asarray(rng.uniform(0.5, 1.5, 3)), jnp.asarray(rng.standard_normal(3))
    rm, rv = jnp.zeros(3), jnp.ones(3)
    c = jnp.asarray(rng.standard_normal((4, 8, 3)))

    def step(x, w, b, c, **kw):
        def loss(x, w, b):
            o = nj.batch_norm(x, rm, rv, w, b, True, 0.1, **kw)
            return jnp.sum(jnp.sin(o.output) * c), o
        (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, b)
        return o, g

    def mapped(x, w, b, c):
        o, (gx, gw, gb) = step(x, w, b, c, axis_name="i")
        return o, (gx, jax.lax.psum(gw, "i"), jax.lax.psum(gb, "i"))

    o, g = jax.jit(jax.vmap(mapped, axis_name="i", in_axes=(0, None, None, 0)))(x, w, b, c)
    o0, g0 = jax.jit(step)(x.reshape(32, 3), w, b, c.reshape(32, 3))
    assert _rel_err(o.output.reshape(32, 3), o0.output) <= 1e-13
    for k in (1, 2):  # running statistics: the same on every slice, those of the whole batch
        assert float(jnp.max(jnp.abs(o[k] - o[k][:1]))) == 0.0 and _rel_err(o[k][0], o0[k]) <= 1e-13
    assert _rel_err(g[0].reshape(32, 3), g0[0]) <= 1e-13
    for a, r in zip(g[1:], g0[1:]):
        assert _rel_err(a[0], r) <= 1e-13
    # the local statistics differ (the test can fail): each slice's own batch norm
    ol, _ = jax.jit(jax.vmap(lambda x, c: step(x, w, b, c), in_axes=(0, 0)))(x, c)
    assert _rel_err(ol.output.reshape(32, 3), o0.output) > 1e-3
    # axis_name= is exactly sync=JaxReducer(axis_name)
    os_, _ = jax.jit(jax.vmap(lambda x, c: step(x, w, b, c, sync=JaxReducer("i")), axis_name="i"))(x, c)
    assert float(jnp.max(jnp.abs(os_.output - o.output))) == 0.0


def test_axis_name_bad_input():
    from normref.backends.distributed.jax import JaxReducer

    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match=r"layer_norm: axis_name is only taken by methods with batch statistics"):
        nj.layer_norm(x, (3,), axis_name="i")
    with pytest.raises(TypeError, match=r"batch_norm: give axis_name or sync, not both"):
        nj.batch_norm(x, None, None, None, None, True, axis_name="i", sync=JaxReducer("i"))
    with pytest.raises(TypeError, match=r"batch_norm: axis_name must be a hashable axis name .* got list"):
        nj.batch_norm(x, None, None, None, None, True, axis_name=["i"])
