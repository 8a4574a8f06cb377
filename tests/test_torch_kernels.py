"""CPU torch tensors run the numba kernels zero-copy, and agree with the array-API formula (issue 18).

``normref.backends.numba._torch`` hands the tensors' NumPy views to the NumPy kernels. Every case
here runs a method through the torch adapter (its Function: the forward and normref's analytic
backward) twice, with the kernels (``count_kernels`` must show both the forward and the backward
kernel *taken*: a wrapper that declined everything would make the comparison vacuous) and with
``use_kernels(False)`` (the formula on the same tensors, the reference), on the layouts users have:
contiguous, channels-last, a transposed view, a stepped slice; float32 and float64; sizes on both
sides of ``config.SERIAL_BELOW`` (the serial and the parallel builds).

Tolerances (:func:`_tol`) come from the dtype's ε and the example's conditioning, as in
``tests/test_kernel_layouts.py`` (whose docstring derives them): both paths compute
y = γ·(x − μ)·r + β in the same dtype and differ in the rounding of the sums, δx̂ ≲ c·ε·X with
X = κ + κ_c·(1 + κ_c²) (κ = max|x|·r_max, κ_c = max|x̂|), K = 64 covering c for blocked sums of
random data. A wrong statistic is an error of the order of y itself.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba", reason="numba is not installed: the kernels cannot run")

import normref  # noqa: E402
from normref._kernels import count_kernels  # noqa: E402
from normref.backends import torch as nt  # noqa: E402

K = 64.0


def _layout(x, layout):
    """``x``'s values laid out in memory as named (the values are the same tensor's)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # the last two axes swapped in memory
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "stepped":  # every other element of a buffer twice as long along the last axis
        buf = torch.full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"), dtype=x.dtype)
        v = buf[..., ::2]
        v.copy_(x)
        return v
    raise AssertionError(layout)


# method -> (call(x, w, b), reduce axes of its statistics on x of shape (N, C, H, W), parameters' shape)
def _bn(x, w, b):
    return nt.batch_norm(x, None, None, w, b, training=True)


def _bn_eval(x, w, b):
    c = x.shape[1]
    rm = torch.linspace(-0.5, 0.5, c, dtype=x.dtype)
    rv = torch.linspace(0.5, 2.0, c, dtype=x.dtype)
    return nt.batch_norm(x, rm, rv, w, b, training=False)


METHODS = {
    "batch_norm": (_bn, "batch", "channel"),
    "batch_norm_eval": (_bn_eval, "population", "channel"),
    "instance_norm": (lambda x, w, b: nt.instance_norm(x, weight=w, bias=b), "instance", "channel"),
    "group_norm": (lambda x, w, b: nt.group_norm(x, 4, w, b), "group", "channel"),
    "layer_norm": (lambda x, w, b: nt.layer_norm(x, x.shape[-2:], w, b), "layer", "last2"),
    "rms_norm": (lambda x, w, b: nt.rms_norm(x, x.shape[-2:], w), "rms", "last2"),
}


def _params(name, x, dtype, gen):
    _, _, pk = METHODS[name]
    shape = (x.shape[1],) if pk == "channel" else tuple(x.shape[-2:])
    w = (1.0 + 0.5 * torch.randn(shape, dtype=dtype, generator=gen)).requires_grad_()
    b = None if name == "rms_norm" else (0.5 * torch.randn(shape, dtype=dtype, generator=gen)).requires_grad_()
    return w, b


def _stats(name, x64):
    """(r_max, κ_c, values per parameter entry) in float64 for the tolerance."""
    _, part, pk = METHODS[name]
    n, c = x64.shape[:2]
    if part == "batch":
        v = x64.transpose(0, 1).reshape(c, -1)
    elif part == "population":
        rm = torch.linspace(-0.5, 0.5, c, dtype=torch.float64)
        rv = torch.linspace(0.5, 2.0, c, dtype=torch.float64)
        v = x64.transpose(0, 1).reshape(c, -1)
        s = (rv + 1e-5).sqrt()[:, None]
        return float((1 / s).max()), float(((v - rm[:, None]).abs() / s).max()), x64.numel() / c
    elif part == "instance":
        v = x64.reshape(n * c, -1)
    elif part == "group":
        v = x64.reshape(n * 4, -1)
    else:  # layer, rms: the last two axes
        v = x64.reshape(-1, x64.shape[-2] * x64.shape[-1])
    if part == "rms":
        s = (v.square().mean(1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
        dev = v.abs()
    else:
        s = (v.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        dev = (v - v.mean(1, keepdim=True)).abs()
    n_p = x64.numel() / (c if pk == "channel" else x64.shape[-2] * x64.shape[-1])
    return float((1 / s).max()), float((dev / s).max()), n_p


def _run(name, x, w, b, dy, kernels):
    x = x.detach().requires_grad_()
    with normref.use_kernels(kernels), count_kernels() as calls:
        y = METHODS[name][0](x, w, b)
        grads = torch.autograd.grad(y, [x, w] + ([b] if b is not None else []), dy)
    return y.detach(), grads, calls


def _assert_close(got, ref, tol, what):
    err = float((got.double() - ref.double()).abs().max())
    assert err <= tol, f"{what}: max |kernel − formula| = {err:.3e} > tolerance {tol:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "stepped"])
@pytest.mark.parametrize("shape", [(4, 8, 16, 16), (8, 16, 24, 24)], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", list(METHODS))
def test_torch_cpu_tensors_take_the_kernels_and_agree_with_the_formula(name, shape, layout, dtype):
    from normref.backends.numba import config

    size = 1
    for s in shape:
        size *= s
    assert size >= config.MIN_SIZE  # the kernels' threshold: a smaller case would test nothing
    assert (size >= config.SERIAL_BELOW) == (shape[0] == 8)  # the ids name the build that runs
    gen = torch.Generator().manual_seed(hash((name, shape, layout)) % 2**31)
    x0 = torch.randn(shape, dtype=torch.float64, generator=gen) * 2.0 + 0.5
    x = _layout(x0.to(dtype), layout)
    assert torch.equal(x, x0.to(dtype))
    w, b = _params(name, x, dtype, gen)
    dy = _layout(torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype), layout)

    y_k, g_k, calls = _run(name, x, w, b, dy, True)
    assert calls.taken.get("torch.normalize_forward", 0) == 1, calls
    assert calls.taken.get("torch.normalize_backward", 0) == 1, calls
    y_f, g_f, calls_f = _run(name, x, w, b, dy, False)
    assert calls_f.total_taken == 0

    eps = float(torch.finfo(dtype).eps)
    r_max, kc, n_p = _stats(name, x0)
    kappa = max(1.0, float(x0.abs().max()) * r_max)
    X = kappa + kc * (1.0 + kc * kc)
    gmax, umax = float(w.detach().abs().max()), float(dy.abs().max())
    _assert_close(y_k, y_f, K * eps * (gmax * X + float(y_f.abs().max())), "y")
    _assert_close(g_k[0], g_f[0], K * eps * (r_max * gmax * umax * X * (1 + kc) + float(g_f[0].abs().max())), "dx")
    _assert_close(g_k[1], g_f[1], K * eps * n_p * umax * X, "dweight")
    if b is not None:
        _assert_close(g_k[2], g_f[2], K * eps * n_p * umax, "dbias")
    # the gradient keeps the input's memory format where the kernel wrote it (torch's own layers do)
    assert g_k[0].shape == x.shape and g_k[0].dtype == dtype


def test_plain_calls_and_layers_take_the_kernels():
    """``normref.layer_norm`` on tensors (routed to the adapter's Function), an ``nt`` layer, and a
    forward under ``torch.no_grad`` (no Function at all) all run the kernels; the results are torch's."""
    x = torch.randn(32, 256, requires_grad=True)
    with count_kernels() as calls:
        y = normref.layer_norm(x, (256,))
        y.sum().backward()
    assert calls.taken == {"torch.normalize_forward": 1, "torch.normalize_backward": 1}
    assert float((y.detach() - torch.nn.functional.layer_norm(x.detach(), (256,))).abs().max()) < 64 * 1.2e-7 * 8
    ln = nt.LayerNorm(256)  # its weight and bias are nn.Parameters
    with count_kernels() as calls:
        ln(x).sum().backward()
    assert calls.taken == {"torch.normalize_forward": 1, "torch.normalize_backward": 1}
    layer = nt.BatchNorm2d(16)
    xb = torch.randn(8, 16, 8, 8)
    with count_kernels() as calls:
        layer(xb)
    assert calls.taken.get("torch.normalize_forward") == 1
    with torch.no_grad(), count_kernels() as calls:
        normref.layer_norm(torch.randn(32, 256), (256,))
    assert calls.taken == {"torch.normalize_forward": 1}


def test_tensors_autograd_records_decline_the_kernels():
    """With the adapters off, ``normref.layer_norm`` runs under torch's autograd: the kernels (which
    leave torch) decline, so the gradient still flows, through the formula."""
    x = torch.randn(32, 256, requires_grad=True)
    with normref.use_adapters(False), count_kernels() as calls:
        y = normref.layer_norm(x, (256,))
    assert calls.total_taken == 0
    assert y.requires_grad
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.isfinite(g).all()


def test_inputs_the_kernels_cannot_take_run_the_formula():
    """float16, a functorch-wrapped tensor (vmap) and a conjugate-bit view: declined, same results."""
    from normref.backends.numba._torch import usable

    assert not usable(torch.randn(4, dtype=torch.float16))
    assert not usable(torch.randn(4, dtype=torch.complex64).conj())
    x = torch.randn(4, 32, 256)
    with count_kernels() as calls:
        y = torch.vmap(lambda t: nt.layer_norm(t, (256,)))(x)
    assert calls.total_taken == 0
    ref = torch.nn.functional.layer_norm(x, (256,))
    assert float((y - ref).abs().max()) < 64 * 1.2e-7 * 8


def test_second_derivatives_at_kernel_sizes():
    """``create_graph=True`` through the Function at a size the kernels serve: the first backward's
    recomputation runs under autograd (the kernels decline there), so the Hessian-vector product is
    the formula's, equal to the one computed with the kernels off (float64; the two differ in the
    rounding of the forward's sums only, tolerance 64·ε·n·max|term| as above)."""
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(64, 128, dtype=torch.float64, generator=gen)
    w = torch.randn(128, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(64, 128, dtype=torch.float64, generator=gen)
    dy = torch.randn(64, 128, dtype=torch.float64, generator=gen)

    def hvp(kernels):
        x = x0.clone().requires_grad_()
        with normref.use_kernels(kernels), count_kernels() as calls:
            y = nt.layer_norm(x, (128,), w)
            (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
            (hx,) = torch.autograd.grad(gx, x, v)
        return hx, calls

    h_k, calls = hvp(True)
    assert calls.taken.get("torch.normalize_forward", 0) == 1  # the first forward ran the kernel
    h_f, _ = hvp(False)
    tol = 64 * float(torch.finfo(torch.float64).eps) * 128 * float(h_f.abs().max())
    _assert_close(h_k, h_f, tol, "Hessian-vector product")


# (method, shape): one statistic, few statistics (K < 2·threads routes to other loop orders), many
FEW = [("layer_norm_1d", (1, 8192)), ("layer_norm_1d", (3, 4096)), ("batch_norm", (64, 1, 16, 16)),
       ("batch_norm", (32, 3, 16, 16)), ("group_norm", (1, 8, 32, 32)), ("instance_norm", (1, 2, 64, 64))]


@pytest.mark.parametrize("param_layout", ["contiguous", "stepped", "flipped_copy_stepped"])
@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
@pytest.mark.parametrize("name, shape", FEW)
def test_few_statistics_and_strided_parameters(name, shape, serial, param_layout):
    """The routings the NumPy kernels take for one and few statistics, on both builds (thresholds
    forced: ``config.thresholds``), with γ, β given as stepped views (``w[::2]`` of a longer tensor;
    torch has no negative strides, so "flipped" is a flipped copy then stepped), through the torch
    route; the same K·ε·X tolerance as above (X from the example's conditioning)."""
    from normref.backends.numba import config

    gen = torch.Generator().manual_seed(hash((name, shape, serial, param_layout)) % 2**31)
    x0 = torch.randn(shape, dtype=torch.float64, generator=gen) * 2.0 + 0.5
    x = x0.to(torch.float32)
    c = shape[-1] if name == "layer_norm_1d" else shape[1]

    def param(scale, shift):
        v = shift + scale * torch.randn(c, dtype=torch.float32, generator=gen)
        if param_layout == "contiguous":
            return v.requires_grad_()
        # every other element of a NaN buffer twice as long (a kernel reading between them shows)
        buf = torch.full((2 * c,), float("nan"))
        buf[::2] = v.flip(0) if param_layout == "flipped_copy_stepped" else v
        p = buf[::2]
        assert p.stride() == (2,)
        return p.requires_grad_()

    w, b = param(0.5, 1.0), param(0.5, 0.0)
    calls_fn = {
        "layer_norm_1d": lambda t: nt.layer_norm(t, (c,), w, b),
        "batch_norm": lambda t: nt.batch_norm(t, None, None, w, b, training=True),
        "group_norm": lambda t: nt.group_norm(t, 4, w, b),
        "instance_norm": lambda t: nt.instance_norm(t, weight=w, bias=b),
    }[name]
    dy = torch.randn(shape, dtype=torch.float32, generator=gen)

    def run(kernels):
        xx = x.clone().requires_grad_()
        with config.thresholds(min_size=1, serial_below=(1 << 62) if serial else 1), \
                normref.use_kernels(kernels), count_kernels() as calls:
            y = calls_fn(xx)
            grads = torch.autograd.grad(y, [xx, w, b], dy)
        return y.detach(), grads, calls

    y_k, g_k, calls = run(True)
    assert calls.taken.get("torch.normalize_forward", 0) == 1, calls
    assert calls.taken.get("torch.normalize_backward", 0) == 1, calls
    y_f, g_f, _ = run(False)
    # conditioning from float64 statistics over each statistic's elements
    if name == "layer_norm_1d":
        v = x0.reshape(shape[0], -1)
    elif name == "batch_norm":
        v = x0.transpose(0, 1).reshape(c, -1)
    elif name == "group_norm":
        v = x0.reshape(shape[0] * 4, -1)
    else:
        v = x0.reshape(shape[0] * c, -1)
    s = (v.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    r_max = float((1 / s).max())
    kc = float(((v - v.mean(1, keepdim=True)).abs() / s).max())
    X = max(1.0, float(x0.abs().max()) * r_max) + kc * (1 + kc * kc)
    eps = float(torch.finfo(torch.float32).eps)
    gmax, umax = float(w.detach().abs().max()), float(dy.abs().max())
    n_p = x.numel() / c
    _assert_close(y_k, y_f, K * eps * (gmax * X + float(y_f.abs().max())), "y")
    _assert_close(g_k[0], g_f[0], K * eps * (r_max * gmax * umax * X * (1 + kc) + float(g_f[0].abs().max())), "dx")
    _assert_close(g_k[1], g_f[1], K * eps * n_p * umax * X, "dweight")
    _assert_close(g_k[2], g_f[2], K * eps * n_p * umax, "dbias")
