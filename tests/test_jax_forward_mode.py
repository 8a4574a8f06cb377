"""normref.backends.jax in forward mode (``mode="jvp"``): a ``jax.custom_jvp`` whose tangent rule is the
transpose of normref's analytic backward, so that ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` work,
and reverse mode (JAX transposing that rule back) is still normref's backward.

Checked, in float64, on layer norm, batch norm (training, with running statistics), group norm,
two whitening methods (ZCA decorrelated batch norm, IterNorm) and two weight methods (weight norm,
weight standardization):

- ``jax.jvp`` against central differences of the forward, ``h = ε^(1/3)`` (truncation ``h²·|f'''|/6``
  balanced against round-off ``ε·|f|/h``: ~ε^(2/3) ≈ 4e-11 relative on these smooth maps; the bound
  1e-8·cond leaves ≥ 100× margin over what is measured and still fails on any wrong term, which is
  of order 1);
- ``jax.jacfwd`` (forward mode) against ``jax.jacrev`` of the ``"vjp"`` mode (the custom_vjp, tested
  in tests/test_jax_adapter.py): the same backward, transposed or not, so equal to rounding: the
  two differ only in how XLA orders the sums, n·ε per entry for n ≤ a few dozen terms → 1e-13·cond;
- ``jax.hessian`` against central differences of ``jax.grad`` (the analytic gradient), 1e-7 relative
  as in tests/test_jax_adapter.py (truncation ~ε^(2/3)·|∇L'''| plus round-off of the gradient
  difference ~ε/h ≈ 4e-11);
- that the derivatives are normref's backward and nothing else: with the registered backward
  replaced by twice itself, forward *and* reverse mode double (autodiff of the forward formula would
  not change);
- every registered method: ``⟨J t, c⟩`` by ``jax.jvp`` equals ``⟨t, Jᵀ c⟩`` by the custom_vjp
  (the dot-product test of a transpose), 1e-12·cond relative (slow: one compilation per method);
- ``jax.jvp`` and ``jax.grad`` under ``jax.shard_map(check_vma=True)`` on 4 simulated devices (a
  subprocess: the device count is set before jax is imported), batch norm with ``axis_name=`` and
  layer norm with replicated parameters, against one device on the whole batch (slow).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import normref  # noqa: E402
from normref.backends import jax as nj  # noqa: E402
from normref.registry import _declares_needs  # noqa: E402

EPS = float(np.finfo(np.float64).eps)
H = EPS ** (1.0 / 3.0)


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


def _cases():
    """(method name, f(mode) -> callable of the differentiable arrays, primals, cond)."""
    rng = np.random.default_rng(16)
    n = rng.standard_normal
    cases = []

    x = n((3, 6))
    w, b = rng.uniform(0.5, 1.5, 6), n(6)
    cases.append(("layer_norm", lambda mode: (lambda x, w, b: nj.function("layer_norm", mode)(x, (6,), w, b)),
                  (x, w, b), 1.0))

    xb = n((6, 3, 2)) * 2 + 1
    wb, bb = rng.uniform(0.5, 1.5, 3), n(3)
    rm, rv = np.zeros(3), np.ones(3)
    cases.append(("batch_norm", lambda mode: (
        lambda x, w, b: nj.function("batch_norm", mode)(x, rm, rv, w, b, True, 0.1).output), (xb, wb, bb), 1.0))

    xg = n((2, 4, 3))
    wg, bg = rng.uniform(0.5, 1.5, 4), n(4)
    cases.append(("group_norm", lambda mode: (lambda x, w, b: nj.function("group_norm", mode)(x, 2, w, b)),
                  (xg, wg, bg), 1.0))

    xw = n((10, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0]])
    ww, bw = rng.uniform(0.5, 1.5, 3), n(3)
    for name in ("decorrelated_batch_norm", "iter_norm"):
        cases.append((name, lambda mode, name=name: (
            lambda x, w, b: nj.function(name, mode)(x, None, None, w, b, True)), (xw, ww, bw), 10.0))

    v, g = n((4, 3)), rng.uniform(0.5, 1.5, (4, 1))
    cases.append(("weight_norm", lambda mode: (lambda v, g: nj.function("weight_norm", mode)(v, g, 0)), (v, g), 1.0))
    vs = n((3, 2, 2))
    cases.append(("weight_standardization", lambda mode: (
        lambda v: nj.function("weight_standardization", mode)(v)), (vs,), 1.0))
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp_against_central_differences(case):
    _, make, primals, cond = case
    f = make("jvp")
    rng = np.random.default_rng(1)
    tangents = tuple(rng.standard_normal(np.shape(p)) for p in primals)
    y, t = jax.jvp(f, tuple(map(jnp.asarray, primals)), tuple(map(jnp.asarray, tangents)))
    plus = f(*(jnp.asarray(p + H * d) for p, d in zip(primals, tangents)))
    minus = f(*(jnp.asarray(p - H * d) for p, d in zip(primals, tangents)))
    fd = (np.asarray(plus) - np.asarray(minus)) / (2 * H)
    assert float(np.max(np.abs(fd))) > 1e-3  # a real derivative: the test can fail
    assert _rel(y, f(*map(jnp.asarray, primals))) == 0.0
    assert _rel(t, fd) <= 1e-8 * cond


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jacfwd_equals_jacrev(case):
    _, make, primals, cond = case
    argnums = tuple(range(len(primals)))
    xs = tuple(map(jnp.asarray, primals))
    fwd = jax.jacfwd(make("jvp"), argnums=argnums)(*xs)
    rev = jax.jacrev(make("vjp"), argnums=argnums)(*xs)
    rev_jvp_mode = jax.jacrev(make("jvp"), argnums=argnums)(*xs)  # reverse mode through the custom_jvp
    for a, r, q in zip(fwd, rev, rev_jvp_mode):
        assert a.shape == r.shape and _rel(a, r) <= 1e-13 * cond
        assert _rel(q, r) <= 1e-13 * cond


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("layer_norm", "batch_norm", "group_norm",
                                                               "decorrelated_batch_norm", "weight_norm")],
                         ids=["layer_norm", "batch_norm", "group_norm", "decorrelated_batch_norm", "weight_norm"])
def test_hessian_against_finite_differences_of_the_gradient(case):
    """``jax.hessian`` (forward over reverse) of L = Σ c·sin(f(x)) in the first argument, against
    central differences of the analytic gradient along each coordinate; symmetric as a Hessian is."""
    _, make, primals, cond = case
    x0, rest = np.asarray(primals[0]), tuple(map(jnp.asarray, primals[1:]))
    c = jnp.asarray(np.random.default_rng(2).standard_normal(np.shape(make("vjp")(*map(jnp.asarray, primals)))))

    def loss(mode):
        f = make(mode)
        return lambda x: jnp.sum(c * jnp.sin(f(x, *rest)))

    hess = np.asarray(jax.hessian(loss("jvp"))(jnp.asarray(x0))).reshape(x0.size, x0.size)
    grad = jax.jit(jax.grad(loss("vjp")))
    fd = np.empty_like(hess)
    for i in range(x0.size):
        e = np.zeros(x0.size)
        e[i] = H
        e = e.reshape(x0.shape)
        fd[:, i] = (np.asarray(grad(jnp.asarray(x0 + e))) - np.asarray(grad(jnp.asarray(x0 - e)))).ravel() / (2 * H)
    assert np.max(np.abs(fd)) > 1e-2  # a real second derivative
    assert _rel(hess, fd) <= 1e-7 * cond
    assert _rel(hess, hess.T) <= 1e-13 * cond


def test_derivatives_are_normrefs_backward(monkeypatch):
    """Replace layer norm's registered backward by twice itself: the JVP, the gradient through the
    custom_jvp and the gradient through the custom_vjp all double. Had JAX differentiated the forward
    formula anywhere, they would not change."""
    m = normref.get("layer_norm")
    rng = np.random.default_rng(3)
    x, w, b, t, c = (jnp.asarray(rng.standard_normal(s)) for s in ((3, 5), 5, 5, (3, 5), (3, 5)))

    def derivatives():
        fj, fv = nj.function(m, "jvp"), nj.function(m, "vjp")
        _, jv = jax.jvp(lambda x: fj(x, (5,), w, b), (x,), (t,))
        gj = jax.grad(lambda x, w: jnp.sum(c * fj(x, (5,), w, b)), argnums=(0, 1))(x, w)
        gv = jax.grad(lambda x, w: jnp.sum(c * fv(x, (5,), w, b)), argnums=(0, 1))(x, w)
        return (jv, *gj, *gv)

    before = derivatives()
    original = m._backward
    takes_needs = _declares_needs(original)
    calls = []

    def doubled(res, g, needs=None):
        calls.append(needs)
        grads = original(res, g, needs=needs) if takes_needs else original(res, g)
        return tuple(None if d is None else 2 * d for d in grads)

    monkeypatch.setattr(m, "_backward", doubled)
    after = derivatives()
    assert len(calls) == 3  # traced once per derivative: the JVP, the two gradients
    # jax.jvp in x alone: the backward is asked for the input's gradient only
    assert calls[0] == (True, False, False)
    for a, r in zip(after, before):
        assert _rel(a, 2 * r) <= 4 * EPS  # exactly 2× up to rounding of the doubled sums
        assert _rel(a, r) > 0.1


def test_state_outputs_have_no_tangent():
    """Batch norm's running statistics are state: their tangent is zero (a symbolic zero), the
    output's is the JVP; in reverse mode through the custom_jvp a cotangent on them is dropped (the
    custom_vjp refuses a concrete one eagerly: tests/test_jax_adapter.py)."""
    rng = np.random.default_rng(4)
    x, t = jnp.asarray(rng.standard_normal((8, 3))), jnp.asarray(rng.standard_normal((8, 3)))
    rm, rv = jnp.zeros(3), jnp.ones(3)
    bn = nj.function("batch_norm", mode="jvp")
    out, tan = jax.jvp(lambda x: bn(x, rm, rv, None, None, True, 0.2), (x,), (t,))
    assert type(tan).__name__ == "NormResult"
    assert float(jnp.max(jnp.abs(tan.running_mean))) == 0.0 and float(jnp.max(jnp.abs(tan.running_var))) == 0.0
    _, ty = jax.jvp(lambda x: bn(x, rm, rv, None, None, True, 0.2).output, (x,), (t,))
    assert _rel(tan.output, ty) == 0.0 and float(jnp.max(jnp.abs(ty))) > 0.1
    # running statistics carried through lax.scan in forward mode: the loop's tangent stays the output's
    def scanned(x):
        def body(s, xi):
            o = bn(xi, s[0], s[1], None, None, True, 0.2)
            return (o.running_mean, o.running_var), o.output
        return jax.lax.scan(body, (rm, rv), jnp.stack([x, 2 * x]))[1]

    _, ts = jax.jvp(scanned, (x,), (t,))
    _, t2 = jax.jvp(lambda x: bn(2 * x, rm, rv, None, None, True, 0.2).output, (x,), (t,))
    assert _rel(ts[0], ty) <= 1e-14 and _rel(ts[1], t2) <= 1e-14

    def loss(x, aux_weight):
        o = bn(x, rm, rv, None, None, True, 0.2)
        return jnp.sum(jnp.sin(o.output)) + aux_weight * jnp.sum(o.running_mean + o.running_var)

    assert _rel(jax.grad(loss)(x, 1.0), jax.grad(loss)(x, 0.0)) == 0.0


def test_under_jit_vmap_and_axis_name():
    """Forward mode under ``jax.jit(jax.vmap(...))`` equals a loop over examples, and with
    ``axis_name=`` under ``vmap`` (batch statistics over 4 slices) equals the whole batch at once.
    Tolerance 1e-13: the same sums grouped per slice then combined, ~n·ε for n = 32 terms."""
    rng = np.random.default_rng(5)
    x, t = jnp.asarray(rng.standard_normal((4, 8, 3)) * 2 + 1), jnp.asarray(rng.standard_normal((4, 8, 3)))
    w, b = jnp.asarray(rng.uniform(0.5, 1.5, 3)), jnp.asarray(rng.standard_normal(3))
    bn = nj.function("batch_norm", mode="jvp")

    def jvp(x, t, **kw):
        return jax.jvp(lambda x: bn(x, None, None, w, b, True, **kw), (x,), (t,))[1]

    batched = jax.jit(jax.vmap(jvp))(x, t)
    for i in range(4):
        assert _rel(batched[i], jvp(x[i], t[i])) <= 1e-13
    synced = jax.jit(jax.vmap(lambda x, t: jvp(x, t, axis_name="i"), axis_name="i"))(x, t)
    whole = jvp(x.reshape(32, 3), t.reshape(32, 3))
    assert _rel(synced.reshape(32, 3), whole) <= 1e-13
    assert _rel(batched.reshape(32, 3), whole) > 1e-3  # per-slice statistics differ: the test can fail


def test_mode_argument():
    f = nj.function("group_norm", mode="jvp")
    assert f.mode == "jvp" and nj.function("group_norm").mode == nj.DEFAULT_MODE
    assert f.method is normref.get("group_norm") and inspect.signature(f) == normref.get("group_norm").signature
    with pytest.raises(ValueError, match=r"normref.backends.jax.function: mode must be one of \('vjp', 'jvp'\); "
                                         r"got 'fwd'"):
        nj.function("group_norm", mode="fwd")


def _smallest_example(m):
    """The cheapest example (differentiable elements × unrolled iterations), single-element inputs
    last: a 1×1 orthogonal matrix is ±1, whose derivative is zero (nothing to compare)."""
    exs = list(m.examples(np.random.default_rng(7)))

    def cost(ex):
        b = m.bind(*ex.args, **ex.kwargs)
        sizes = [int(np.size(b.arguments[p])) for p in m.diff_params if b.arguments.get(p) is not None]
        it = b.arguments.get("iterations")
        return (min(sizes, default=0) <= 1, sum(sizes) * (it if isinstance(it, int) else 1))

    return min(exs, key=cost)


@pytest.mark.parametrize("name", [m.name for m in normref.methods()])
def test_every_method_jvp_is_the_transpose_of_its_vjp(name):
    """⟨J t, c⟩ (``jax.jvp`` through the custom_jvp) equals ⟨t, Jᵀ c⟩ (``jax.vjp`` through the
    custom_vjp, i.e. normref's backward) for random t, c on each method's smallest example. Both
    are the same backward's arithmetic, summed in other orders: ~n·ε relative, n the number of terms
    (≤ a few hundred) → 1e-12·cond of the larger of the two sides of the products' magnitudes."""
    m = normref.get(name)
    ex = _smallest_example(m)
    bound = m.bind(*ex.args, **ex.kwargs)
    args = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in bound.arguments.items()}
    diff = [p for p in m.diff_params if args.get(p) is not None]

    def make(mode):
        fn = nj.function(m, mode)

        def f(*xs):
            a = dict(args)
            a.update(zip(diff, xs))
            b = inspect.BoundArguments(m.signature, a)
            return m.primary(fn(*b.args, **b.kwargs))

        return f

    primals = tuple(args[p] for p in diff)
    rng = np.random.default_rng(9)
    tangents = tuple(jnp.asarray(rng.standard_normal(p.shape)) for p in primals)

    @jax.jit
    def both(primals, tangents, c):
        _, jt = jax.jvp(make("jvp"), primals, tangents)
        _, pull = jax.vjp(make("vjp"), *primals)
        jtc = pull(c)
        lhs = jnp.sum(jt * c)
        rhs = sum(jnp.sum(t * g) for t, g in zip(tangents, jtc))
        scale = jnp.sum(jnp.abs(jt * c)) + sum(jnp.sum(jnp.abs(t * g)) for t, g in zip(tangents, jtc))
        return lhs, rhs, scale

    y = make("vjp")(*primals)
    c = jnp.asarray(rng.standard_normal(y.shape))
    lhs, rhs, scale = (float(v) for v in both(primals, tangents, c))
    assert scale > 0.0
    assert abs(lhs - rhs) <= 1e-12 * ex.cond * scale, (lhs, rhs)


_SHARD_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from normref.backends import jax as nj

kw = {"axis_types": (jax.sharding.AxisType.Explicit,)} if hasattr(jax.sharding, "AxisType") else {}
mesh = jax.make_mesh((4,), ("batch",), **kw)
rng = np.random.default_rng(0)
x, tx = (jnp.asarray(rng.standard_normal((16, 3)) * 2 + 1) for _ in range(2))
w, b, tw, tb = (jnp.asarray(rng.standard_normal(3)) for _ in range(4))
bn, ln = nj.function("batch_norm", mode="jvp"), nj.function("layer_norm", mode="jvp")


def f_bn(x, w, b, **k):
    return bn(x, None, None, w, b, True, **k)


def f_ln(x, w, b):
    return ln(x, (3,), w, b)


def rel(a, c):
    a, c = np.asarray(a), np.asarray(c)
    return float(np.max(np.abs(a - c)) / max(1.0, np.max(np.abs(c))))


out = {}
for name, f, k in (("batch_norm", f_bn, {"axis_name": "batch"}), ("layer_norm", f_ln, {})):
    def local(x, w, b, tx, tw, tb):
        y, t = jax.jvp(lambda x, w, b: f(x, w, b, **k), (x, w, b), (tx, tw, tb))
        # and reverse mode through the custom_jvp: the replicated parameters' gradients (invariant)
        g = jax.grad(lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b, **k))), argnums=(0, 1, 2))(x, w, b)
        return y, t, g
    specs = (P("batch"), P(), P(), P("batch"), P(), P())
    sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs,
                               out_specs=(P("batch"), P("batch"), (P("batch"), P(), P())), check_vma=True))
    from jax.sharding import NamedSharding
    put = [jax.device_put(a, NamedSharding(mesh, sp)) for a, sp in zip((x, w, b, tx, tw, tb), specs)]
    y, t, g = sm(*put)
    y0, t0 = jax.jvp(lambda x, w, b: f(x, w, b), (x, w, b), (tx, tw, tb))
    g0 = jax.grad(lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b))), argnums=(0, 1, 2))(x, w, b)
    out[name] = {"y": rel(y, y0), "t": rel(t, t0), "g": max(rel(a, c) for a, c in zip(g, g0)),
                 "t_norm": float(jnp.max(jnp.abs(t0)))}
print(json.dumps(out))
"""


def test_shard_map_forward_mode():
    """Forward mode under shard_map(check_vma=True): the tangent of a replicated (invariant) parameter
    meets the transpose of its gradient's psum, a pvary, so each device's output tangent is the whole
    batch's J t restricted to its shard. Tolerance 1e-13: the same sums grouped per device, then
    combined (n·ε for n = 16 terms; measured ≤ 8e-16)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the script sets the device count itself
    p = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for name in ("batch_norm", "layer_norm"):
        r = res[name]
        assert r["t_norm"] > 0.1, name  # a real tangent
        assert max(r["y"], r["t"], r["g"]) <= 1e-13, (name, r)


def test_readme_forward_mode_block_runs():
    """The README's forward-mode block runs as written, and what its comments claim holds: jacfwd
    equals jacrev, the forward-over-reverse Hessian equals the reverse-over-reverse one, and hv = H v
    (float64 here; 1e-13 relative, the same sums in other orders, n ≤ 20 terms)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("\n### Forward mode: `jax.jvp`")
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own README
    jax_, jnp_ = ns["jax"], ns["jnp"]
    rev = jax_.jacrev(lambda x: ns["nj"].layer_norm(x, (5,)))(ns["x"])
    assert ns["J"].shape == (4, 5, 4, 5) and _rel(ns["J"], rev) <= 1e-13
    assert _rel(ns["H"], ns["H_rev"]) <= 1e-13 and float(jnp_.max(jnp_.abs(ns["H"]))) > 0.1
    hv = jnp_.einsum("ijkl,kl->ij", ns["H"], ns["v"])
    assert _rel(ns["hv"], hv) <= 1e-13
    assert _rel(ns["ydot"], jnp_.einsum("ijkl,kl->ij", ns["J"], ns["v"])) <= 1e-13
