"""``channel_axis``: features-last inputs on every channel partition, kernels included (issue 16 §1).

A method registered with ``channels=`` (``@method(..., channels=("input",))``) takes a keyword-only
``channel_axis`` (default 1, torch's (N, C, *S)); ``channel_axis=-1`` is Flax's and Keras's
(N, *S, C). The registry runs the (N, C, *S) formulas on a permuted view of the input and returns the
output, and the backward the gradients, in the caller's layout.

What is checked
- every registered activation method with a channel axis declares ``channels`` (the rest are named,
  with the reason they have none);
- on every library of the ``backend`` fixture (numpy with the kernels, numpy-reference, torch,
  array_api_strict; jax in the full run): for each registry example with a ≥ 3-D input, the call
  on the channels-last array equals ``moveaxis`` of the call on the (N, C, *S) array, every returned
  field, and every gradient of ``normref.vjp`` (the layout parameters' gradients moved the same way);
- H == C shapes (the bug the issue names: an NHWC input with H = C was accepted and normalized over
  H): with ``channel_axis=-1`` the result is the channels' normalization, which the plain call is not;
- bad ``channel_axis`` values refused with a TypeError/ValueError naming the function and the
  argument, before any work (no kernel is even looked up);
- the numba kernels take the channels-last layout as it is: at sizes above their threshold both the
  forward and the backward kernel run (``count_kernels``), the values equal the formula path and an
  explicit transpose, the outputs come back C-contiguous in the caller's layout, and the memory a call
  allocates (``tracemalloc``) is that of the (N, C, *S) call (a copy of the input would add its size);
- the torch adapter (``normref.backends.torch``, the layers) and the JAX ``custom_vjp``
  (``normref.backends.jax``, under ``jit`` too) with ``channel_axis=-1`` against their (N, C, *S) path.

Tolerances: the channels-last and the (N, C, *S) calls evaluate the same formula on the same values;
only the order of the reduction sums differs (another memory order), so the difference is a few
roundings per reduced element: ``TOL64 = 1e3·ε₆₄`` (conftest) relative, times the example's ``cond``
(its conditioning estimate: whitening examples with close eigenvalues amplify rounding differences).
The kernels against the formula: both accumulate the statistics in float64 (shifted one-pass sums
against two-pass sums), again ``TOL64`` relative for these O(1)-conditioned inputs.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import normref
from normref._kernels import count_kernels
from tests.conftest import TOL64, rel_err

CHANNEL_METHODS = [m for m in normref.methods("activation") if m.channels]
IDS = [m.name for m in CHANNEL_METHODS]

# every activation method whose partition has a channel axis (issue 16: "on every partition")
EXPECTED = {
    "adain", "adaptive_layer_instance_norm", "batch_group_norm", "batch_instance_norm", "batch_norm",
    "batch_normalize", "batch_renorm", "batch_whitening", "blended_batch_norm", "cross_iteration_batch_norm",
    "decorrelated_batch_norm", "eval_norm", "filter_response_norm", "ghost_batch_norm", "group_norm",
    "instance_norm", "iter_norm", "local_response_norm", "lp_batch_norm", "mean_only_batch_norm",
    "memorized_batch_norm", "moving_average_batch_norm", "normalize", "online_norm", "pixel_norm",
    "population_norm", "position_norm", "power_norm", "prong_whitening", "switchable_norm", "wct",
    "whitening_coloring",
}
# activation methods without one, and why
NO_CHANNEL = {
    "layer_norm": "normalizes the trailing normalized_shape axes, whatever they hold",
    "rms_norm": "normalizes the trailing normalized_shape axes, whatever they hold",
    "whitening_matrix": "takes a covariance matrix, not activations",
    "decov_penalty": "a scalar penalty of (M, d) activations",
}


def _names(m, args, kwargs) -> tuple:
    """The call's layout parameters (what the registry permutes)."""
    if callable(m.channels):
        return tuple(m.channels(lambda n: m._arg(n, args, kwargs)))
    return m.channels


def _put(m, args, kwargs, name, value):
    pos = m._positions.get(name)
    if pos is not None and pos < len(args):
        args[pos] = value
    else:
        kwargs[name] = value


def _channels_last(m, args, kwargs, to_last):
    """The call with every layout array of the input's rank moved channels-last (``to_last``: a real
    copy in that memory order, as a features-last library holds it) and ``channel_axis=-1``."""
    names = _names(m, args, kwargs)
    nd = m._arg(names[0], args, kwargs).ndim
    args, kwargs, moved = list(args), dict(kwargs), set()
    for n in names:
        v = m._arg(n, args, kwargs)
        if v is not None and getattr(v, "ndim", 0) == nd:
            _put(m, args, kwargs, n, to_last(v))
            moved.add(n)
    kwargs["channel_axis"] = -1
    return tuple(args), kwargs, moved


def _cases(m, limit: int = 2) -> list:
    """Up to ``limit`` registry examples of ``m`` whose input has a spatial axis (≥ 3-D: on a 2-D
    (N, C) input channel_axis=-1 is axis 1 already)."""
    out = []
    for ex in m.examples(np.random.default_rng(16)):
        names = _names(m, ex.args, ex.kwargs)
        if names and m._arg(names[0], ex.args, ex.kwargs).ndim >= 3:
            out.append(ex)
    return out[:limit]


def _fields(out) -> list:
    return list(out) if isinstance(out, tuple) else [out]


# --------------------------------------------------------------------------------------------------
# which methods


def test_every_channel_method_declares_channels():
    have = {m.name for m in CHANNEL_METHODS}
    assert EXPECTED <= have, f"without channel_axis: {sorted(EXPECTED - have)}"
    for m in normref.methods("activation"):
        if m.name not in have:
            assert m.name in NO_CHANNEL, f"{m.name}: declare channels=, or say in NO_CHANNEL why it has no channel axis"
    for m in CHANNEL_METHODS:
        p = m.signature.parameters["channel_axis"]
        assert p.kind is p.KEYWORD_ONLY and p.default == 1, m.name
        assert "channel_axis : int, default 1" in m.__doc__, m.name
        assert _cases(m), f"{m.name}: no example with a spatial axis to test channel_axis on"
    for name in ("layer_norm", "rms_norm"):
        assert "channel_axis" not in normref.get(name).signature.parameters


# --------------------------------------------------------------------------------------------------
# channels-last equals moveaxis of (N, C, *S), on every library


@pytest.mark.parametrize("m", CHANNEL_METHODS, ids=IDS)
def test_channels_last_equals_moveaxis(backend, m):
    xp = backend.xp
    for ex in _cases(m):
        args, kwargs = backend.convert(ex.args, ex.kwargs)
        out, pull = normref.vjp(m, *args, **kwargs)
        last = lambda a: xp.asarray(backend.asarray(np.moveaxis(backend.to_numpy(a), 1, -1)))  # noqa: E731
        args_l, kwargs_l, moved = _channels_last(m, args, kwargs, last)
        out_l, pull_l = normref.vjp(m, *args_l, **kwargs_l)
        tol = TOL64 * ex.cond
        f, f_l = _fields(out), _fields(out_l)
        assert len(f) == len(f_l) and type(out_l) is type(out), (m.name, ex.label)
        y, y_l = backend.to_numpy(f[0]), backend.to_numpy(f_l[0])
        assert y_l.shape == np.moveaxis(y, 1, -1).shape, (m.name, ex.label)
        assert rel_err(y_l, np.moveaxis(y, 1, -1)) <= tol, (m.name, ex.label, "output")
        for k, (a, b) in enumerate(zip(f[1:], f_l[1:]), start=1):  # running statistics: per channel
            if a is None:
                assert b is None
            else:
                assert rel_err(backend.to_numpy(b), backend.to_numpy(a)) <= tol, (m.name, ex.label, k)
        g = np.random.default_rng(3).standard_normal(y.shape)
        grads = pull(backend.asarray(g))
        grads_l = pull_l(backend.asarray(np.moveaxis(g, 1, -1)))
        for p, a, b in zip(m.array_params, grads, grads_l):
            if a is None:
                assert b is None, (m.name, p)
                continue
            a = backend.to_numpy(a)
            a = np.moveaxis(a, 1, -1) if p in moved else a
            b = backend.to_numpy(b)
            assert b.shape == a.shape, (m.name, ex.label, p, b.shape, a.shape)
            assert rel_err(b, a) <= tol, (m.name, ex.label, "d" + p)


# methods on each partition, called on an NHWC input with H == C (N=4, H=3, W=5, C=3)
H_EQ_C = {
    "batch_norm": lambda x, C, **k: normref.batch_norm(x, np.zeros(C), np.ones(C), None, None, True, **k),
    "instance_norm": lambda x, C, **k: normref.instance_norm(x, **k),
    "group_norm": lambda x, C, **k: normref.group_norm(x, 3, **k),
    "position_norm": lambda x, C, **k: normref.position_norm(x, **k),
    "batch_group_norm": lambda x, C, **k: normref.batch_group_norm(x, 3, batch_groups=2, **k),
    "iter_norm": lambda x, C, **k: normref.iter_norm(x, training=True, **k),
    "switchable_norm": lambda x, C, **k: normref.switchable_norm(x, np.ones(3), np.ones(3), training=True, **k),
}


@pytest.mark.parametrize("name", sorted(H_EQ_C))
def test_h_equal_c_is_normalized_over_the_channels(name):
    f = H_EQ_C[name]
    x = np.random.default_rng(5).standard_normal((4, 3, 5, 3)) * np.array([1.0, 4.0, 9.0]) + np.array([0.0, 2.0, -3.0])
    nchw = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    want = np.moveaxis(_fields(f(nchw, 3))[0], 1, -1)
    got = _fields(f(x, 3, channel_axis=-1))[0]
    assert rel_err(got, want) <= TOL64
    # the plain call accepts the (4, 3, 5, 3) array and normalizes axis 1 (H) as channels: not the same
    wrong = _fields(f(x, 3))[0]
    assert rel_err(wrong, want) > 1e-3


def test_other_axes_and_the_default():
    x = np.random.default_rng(6).standard_normal((2, 4, 5, 3))
    w, b = np.arange(1.0, 5.0), np.arange(4.0)
    y = normref.group_norm(x, 2, w, b)
    # channel_axis=1 and its negative spelling are the plain call: the same path, bit for bit
    assert np.array_equal(normref.group_norm(x, 2, w, b, channel_axis=1), y)
    assert np.array_equal(normref.group_norm(x, 2, w, b, channel_axis=-3), y)
    # a middle axis: (N, H, C, W) with channel_axis=2
    xm = np.ascontiguousarray(np.moveaxis(x, 1, 2))
    assert rel_err(normref.group_norm(xm, 2, w, b, channel_axis=2), np.moveaxis(y, 1, 2)) <= TOL64
    # a generated affine (γ, β broadcast against the input) is given in the caller's layout too
    x4 = np.random.default_rng(7).standard_normal((2, 3, 4, 5))
    gam = np.random.default_rng(8).standard_normal((2, 3, 1, 1))
    y4, pull = normref.vjp(normref.normalize, x4, gam, gam * 0.5, partition="instance", recovery="generated")
    last = lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))  # noqa: E731
    y4l, pull_l = normref.vjp(normref.normalize, last(x4), last(gam), last(gam) * 0.5, partition="instance",
                              recovery="generated", channel_axis=-1)
    assert rel_err(y4l, last(y4)) <= TOL64
    g = np.random.default_rng(9).standard_normal(y4.shape)
    for a, c in zip(pull(g), pull_l(last(g))):
        assert rel_err(c, last(a)) <= TOL64
    # a per-channel γ of a generated affine given as (C,): broadcast against the channels-last input
    yv = normref.normalize(last(x4), gam[0, :, 0, 0], None, partition="instance", recovery="generated",
                           channel_axis=-1)
    assert rel_err(yv, last(normref.normalize(x4, gam[:1], None, partition="instance", recovery="generated"))) <= TOL64
    # out= in the caller's layout receives the output and is returned
    xl = last(x4)
    buf = np.empty_like(xl)
    r = normref.batch_norm(xl, np.zeros(3), np.ones(3), None, None, False, out=buf, channel_axis=-1)
    assert r is buf and rel_err(buf, last(normref.batch_norm(x4, np.zeros(3), np.ones(3)))) <= TOL64


# --------------------------------------------------------------------------------------------------
# bad values


@pytest.mark.parametrize("m", CHANNEL_METHODS, ids=IDS)
def test_bad_channel_axis_refused_before_any_work(m):
    ex = _cases(m, 1)[0]
    nd = m._arg(_names(m, ex.args, ex.kwargs)[0], ex.args, ex.kwargs).ndim
    for bad, kind, words in [
        (True, TypeError, "must be an int"), (np.True_, TypeError, "must be an int"),
        (-1.0, TypeError, "must be an int"), ("-1", TypeError, "must be an int"), (None, TypeError, "must be an int"),
        (nd, ValueError, f"in [-{nd}, {nd})"), (-nd - 1, ValueError, f"in [-{nd}, {nd})"),
        (0, ValueError, "batch axis"), (-nd, ValueError, "batch axis"),
    ]:
        with count_kernels() as calls, pytest.raises(kind) as e:
            m(*ex.args, **{**ex.kwargs, "channel_axis": bad})
        msg = str(e.value)
        assert msg.startswith(f"{m.name}: channel_axis ") and words in msg and repr(bad) in msg, msg
        assert calls.asked == {}, (m.name, bad, calls)  # refused before any kernel was looked up


def test_no_channel_axis_on_the_layer_partition():
    x = np.random.default_rng(1).standard_normal((2, 3, 4))
    for fn, kw in [(normref.normalize, dict(partition="layer", normalized_ndim=2)),
                   (normref.batch_whitening, dict(partition="layer", training=True))]:
        with pytest.raises(ValueError, match=rf"^{fn.__name__}: this call has no channel axis .* got channel_axis=-1"):
            fn(x, **kw, channel_axis=-1)
        fn(x, **kw, channel_axis=1)  # the default is the plain call
    with pytest.raises(TypeError, match="channel_axis"):
        normref.layer_norm(x, (4,), channel_axis=-1)


def test_errors_name_the_view():
    x = np.zeros((2, 4, 4, 6))
    with pytest.raises(ValueError, match="^group_norm: num_groups must divide") as e:
        normref.group_norm(x, 4, channel_axis=-1)
    msg = str(e.value)
    assert "channel_axis=-1" in msg and "(2, 4, 4, 6)" in msg and "(2, 6, 4, 4)" in msg


# --------------------------------------------------------------------------------------------------
# the numba kernels on the channels-last layout, zero-copy

KERNEL_CASES = {
    "batch_norm": lambda x, w, b, **k: normref.vjp(normref.batch_norm, x, 0 * w, 1 + 0 * w, w, b, True, **k),
    "batch_norm eval": lambda x, w, b, **k: normref.vjp(normref.batch_norm, x, 0 * w, 1 + 0 * w, w, b, **k),
    "instance_norm": lambda x, w, b, **k: normref.vjp(normref.instance_norm, x, None, None, w, b, **k),
    "group_norm": lambda x, w, b, **k: normref.vjp(normref.group_norm, x, 4, w, b, **k),
    "batch_group_norm": lambda x, w, b, **k: normref.vjp(normref.batch_group_norm, x, 4, w, b, batch_groups=2, **k),
    "position_norm": lambda x, w, b, **k: normref.vjp(normref.position_norm, x, **k),
    "pixel_norm": lambda x, w, b, **k: normref.vjp(normref.pixel_norm, x, **k),
    "normalize instance scaling": lambda x, w, b, **k: normref.vjp(
        normref.normalize, x, w, b, partition="instance", operation="scaling", **k),
}


def _peaks(f, x, g, w, b, **kw):
    """Peak bytes traced during the forward and during the backward (the output held)."""
    tracemalloc.start()
    try:
        out, pull = f(x, w, b, **kw)
        _, peak_f = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        grads = pull(g)
        _, peak_b = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, grads, peak_f, peak_b


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernels_take_channels_last_without_a_copy(name):
    pytest.importorskip("numba", reason="numba is not installed: no kernels")
    from normref.backends.numba import config

    f = KERNEL_CASES[name]
    rng = np.random.default_rng(11)
    C = 16
    xl = rng.standard_normal((8, 16, 16, C)) * 2.0 + 1.0  # NHWC, C-contiguous: a Flax user's array
    assert xl.size >= 2 * config.MIN_SIZE  # above the kernels' size threshold
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    g = rng.standard_normal(xl.shape)
    xn, gn = np.ascontiguousarray(np.moveaxis(xl, -1, 1)), np.ascontiguousarray(np.moveaxis(g, -1, 1))
    for warm in (dict(channel_axis=-1), {}):  # compile / load every build first (not counted below)
        out, pull = f(xl if warm else xn, w, b, **warm)
        pull(g if warm else gn)
    with count_kernels() as calls:
        out, grads, peak_f, peak_b = _peaks(f, xl, g, w, b, channel_axis=-1)
    assert calls.taken.get("numpy.normalize_forward", 0) >= 1, calls
    assert calls.taken.get("numpy.normalize_backward", 0) >= 1, calls
    y = _fields(out)[0]
    assert y.shape == xl.shape and y.flags.c_contiguous and grads[0].flags.c_contiguous
    # the (N, C, *S) call on the explicitly transposed array: what the caller would otherwise run
    out_n, grads_n, peak_fn, peak_bn = _peaks(f, xn, gn, w, b)
    assert rel_err(y, np.moveaxis(_fields(out_n)[0], 1, -1)) <= TOL64
    for a, c in zip(grads, grads_n):
        if c is not None:
            assert rel_err(a, np.moveaxis(c, 1, -1) if c.shape == xn.shape else c) <= TOL64
    # zero-copy: the channels-last call allocates what the contiguous (N, C, *S) call does (a copy of
    # the input or of the cotangent would add x.nbytes; a quarter of it as slack for the per-statistic
    # buffers and Python objects, whose size differs between the two layouts' loop orders)
    slack = 0.25 * xl.nbytes
    assert peak_f <= peak_fn + slack and peak_b <= peak_bn + slack, (peak_f, peak_fn, peak_b, peak_bn, xl.nbytes)
    # the formula path (kernels off) gives the same values
    with normref.use_kernels(False), count_kernels() as none:
        out_r, pull_r = f(xl, w, b, channel_axis=-1)
        grads_r = pull_r(g)
    assert none.total_taken == 0
    assert rel_err(y, _fields(out_r)[0]) <= TOL64
    for a, c in zip(grads, grads_r):
        if c is not None:
            assert rel_err(a, c) <= TOL64


# --------------------------------------------------------------------------------------------------
# the adapters


def test_torch_adapter_and_layers():
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    rng = np.random.default_rng(12)
    xl = rng.standard_normal((4, 5, 6, 3))
    g = rng.standard_normal(xl.shape)
    w, b = rng.standard_normal(3), rng.standard_normal(3)

    def run(x, g, **kw):
        t = torch.tensor(x, requires_grad=True)
        tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        out = nt.batch_norm(t, rm, rv, tw, tb, True, **kw)
        (out.output * torch.tensor(g)).sum().backward()
        # normref's Function, not the formula's graph (torch's nodes are named too: check the name)
        assert out.output.grad_fn.name() == nt.node_name("batch_norm"), out.output.grad_fn.name()
        return out, t.grad, tw.grad, tb.grad

    got = run(xl, g, channel_axis=-1)
    want = run(np.ascontiguousarray(np.moveaxis(xl, -1, 1)), np.ascontiguousarray(np.moveaxis(g, -1, 1)))
    assert rel_err(got[0].output.detach(), want[0].output.detach().permute(0, 2, 3, 1)) <= TOL64
    assert rel_err(got[0].running_var, want[0].running_var) <= TOL64
    assert rel_err(got[1], want[1].permute(0, 2, 3, 1)) <= TOL64
    assert rel_err(got[2], want[2]) <= TOL64 and rel_err(got[3], want[3]) <= TOL64
    # a generated layer with the features-last layout, trained one step: the same running statistics
    x = torch.tensor(xl)
    layer_l = nt.StatefulNorm("batch_norm", 3, channel_axis=-1, dtype=torch.float64)
    layer_n = nt.StatefulNorm("batch_norm", 3, dtype=torch.float64)
    y_l, y_n = layer_l(x), layer_n(x.permute(0, 3, 1, 2))
    assert rel_err(y_l.detach(), y_n.detach().permute(0, 2, 3, 1)) <= TOL64
    assert rel_err(layer_l.running_mean, layer_n.running_mean) <= TOL64


def test_jax_custom_vjp():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from normref.backends import jax as nj

    rng = np.random.default_rng(13)
    xl = jnp.asarray(rng.standard_normal((4, 5, 6, 4)), jnp.float32)
    g = jnp.asarray(rng.standard_normal(xl.shape), jnp.float32)
    w, b = jnp.asarray(rng.standard_normal(4), jnp.float32), jnp.asarray(rng.standard_normal(4), jnp.float32)

    def loss_l(x, w, b):
        return jnp.sum(nj.group_norm(x, 2, w, b, channel_axis=-1) * g)

    def loss_n(x, w, b):  # the (N, C, *S) path on the transposed array
        return jnp.sum(nj.group_norm(jnp.moveaxis(x, -1, 1), 2, w, b) * jnp.moveaxis(g, -1, 1))

    want = jax.grad(loss_n, argnums=(0, 1, 2))(xl, w, b)
    # float32: the same formula on the same values, reductions in another order: 64·ε₃₂ relative
    tol = 64 * float(np.finfo(np.float32).eps)
    for got in (jax.grad(loss_l, argnums=(0, 1, 2))(xl, w, b), jax.jit(jax.grad(loss_l, argnums=(0, 1, 2)))(xl, w, b)):
        for a, c in zip(got, want):
            assert a.shape == c.shape and rel_err(a, c) <= tol


# --------------------------------------------------------------------------------------------------
# the conformance suite's channels-last variant


def test_conformance_suite_runs_a_channels_last_variant():
    from normref.conformance.suite import all_examples, run, suite_examples

    for m in CHANNEL_METHODS:
        exs = suite_examples(m, 0)
        assert len(exs) == len(all_examples(m, 0)) + 1 and exs[-1].kwargs["channel_axis"] == -1, m.name
    # no channel axis, no variant
    assert [e.label for e in suite_examples(normref.layer_norm, 0)] == [e.label for e in all_examples(normref.layer_norm, 0)]
    # every check of the suite (float64 reference, finite differences, each library, autograd, second
    # order, invariants, cross-library) on the variant of two methods; the whole set runs with
    # `normref conformance` (the full run; --quick keeps one example per method)
    for name in ("group_norm", "iter_norm"):
        i = len(suite_examples(normref.get(name), 0)) - 1
        rep = run([name], ["numpy", "numpy-reference", "torch"], ["float64"], examples=[i])
        assert rep.ok, rep.failures[:5]
        assert len(rep.records) >= 10 and {r.example for r in rep.records} == {i}


def test_readme_section_runs():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("### Channels last: `channel_axis`", 1)[1].split("\n#", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile("import numpy as np, normref\n" + code, "README.md", "exec"), ns)
    x = ns["x"]
    assert ns["dx"].shape == x.shape and ns["dw"].shape == (32,)
    want = np.moveaxis(normref.group_norm(np.ascontiguousarray(np.moveaxis(x, -1, 1)), 8, ns["w"], ns["b"]), 1, -1)
    assert rel_err(normref.group_norm(x, 8, ns["w"], ns["b"], channel_axis=-1), want) <= TOL64
