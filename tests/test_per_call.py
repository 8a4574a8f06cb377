"""Issue 18, per-call overhead: the fast paths that replace generic machinery give exactly what that
machinery gives.

- The NumPy namespace of plain float32/float64 arrays (``normref._xp._fast_numpy``) calls the ufunc
  reductions directly: the same arrays bit for bit as array-api-compat's ``sum``/``mean``/``max``/
  ``min``/``any``/``all``, and the compat functions for everything else (other dtypes, ``dtype=``,
  subclasses, empty reductions).
- The torch namespace fast path returns the namespace the full checks would, and defers to them
  (their errors) for anything else.
- The torch adapter reads the array arguments off the signature's positions instead of binding with
  ``inspect``, and calls the base ``Function.apply`` (no per-call binding): same outputs, gradients,
  node names, and the same error messages for calls that do not fit the signature.
"""

from __future__ import annotations

import array_api_compat.numpy as cnp
import numpy as np
import pytest

import normref
from normref._xp import namespace


def _same(a, b):
    """Bit-for-bit equality, NaNs included, with the same type, dtype and shape."""
    assert type(a) is type(b), (type(a), type(b))
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_numpy_reductions_are_the_compat_ones(dtype, rng):
    x = (rng.standard_normal((5, 4, 3)) * 10.0 ** rng.integers(-3, 4, (5, 4, 3))).astype(dtype)
    x[1, 2, 0] = np.nan  # NaN propagation of max/min and the sums
    xp = namespace("t", input=x)
    assert xp is not cnp and xp.__name__ == cnp.__name__  # is_numpy_namespace still recognises it
    import array_api_compat

    assert array_api_compat.is_numpy_namespace(xp)
    for axis in (None, 0, 2, -1, (0, 2), (1,), (0, 1, 2)):
        for keepdims in (False, True):
            for f in ("sum", "mean", "max", "min"):
                _same(getattr(xp, f)(x, axis=axis, keepdims=keepdims), getattr(cnp, f)(x, axis=axis, keepdims=keepdims))
            m = x > 0
            for f in ("any", "all"):
                _same(getattr(xp, f)(m, axis=axis, keepdims=keepdims), getattr(cnp, f)(m, axis=axis, keepdims=keepdims))


def test_fast_numpy_defers_what_it_does_not_cover(rng):
    x = rng.standard_normal((4, 3))
    xp = namespace("t", input=x)
    ints = np.arange(12, dtype=np.int8).reshape(4, 3)
    _same(xp.sum(ints, axis=0), cnp.sum(ints, axis=0))  # integer promotion: compat's rule
    _same(xp.sum(x, axis=0, dtype=np.float32), cnp.sum(x, axis=0, dtype=np.float32))
    h = x.astype(np.float16)
    _same(xp.mean(h, axis=1), cnp.mean(h, axis=1))  # float16 accumulates in float32 in np.mean
    class Sub(np.ndarray):  # a subclass: its own reduction methods may differ, so compat's call runs
        pass

    _same(xp.sum(x.view(Sub), axis=0), cnp.sum(x.view(Sub), axis=0))
    empty = np.zeros((0, 3))
    with pytest.warns(RuntimeWarning):  # np.mean's warning and NaN for an empty mean, as before
        _same(xp.mean(empty, axis=0), cnp.mean(empty, axis=0))
    for f in ("max", "min"):
        with pytest.raises(ValueError, match="zero-size array"):
            getattr(xp, f)(empty, axis=0)
        with pytest.raises(ValueError, match="zero-size array"):
            getattr(cnp, f)(empty, axis=0)
    _same(xp.sum(empty, axis=0), cnp.sum(empty, axis=0))


def test_numpy_namespace_refusals_unchanged():
    x = np.ones((2, 3))
    with pytest.raises(TypeError, match=r"f: weight must be a plain numpy.ndarray"):
        namespace("f", input=x, weight=np.ma.masked_array(np.ones(3)))
    with pytest.raises(TypeError, match=r"f: input must have a real floating-point dtype"):
        namespace("f", input=np.ones((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match=r"f: expected at least one array argument"):
        namespace("f", input=None)


def test_torch_namespace_fast_path_agrees_with_the_checks():
    torch = pytest.importorskip("torch")
    import array_api_compat

    x, w = torch.ones(2, 3, dtype=torch.float64), torch.nn.Parameter(torch.ones(3))
    xp = namespace("f", input=x, weight=w, bias=None)
    assert array_api_compat.is_torch_namespace(xp)
    with pytest.raises(TypeError, match=r"f: all arrays must come from one library; input is a torch array"):
        namespace("f", input=x, weight=np.ones(3))
    with pytest.raises(TypeError, match=r"f: weight must have a real floating-point dtype"):
        namespace("f", input=x, weight=torch.ones(3, dtype=torch.int64))
    meta = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match=r"f: all arrays must be on one device"):
        namespace("f", input=x, weight=meta)


def test_adapter_fast_binding_and_apply(rng):
    """Positional, keyword and mixed calls give the formula's outputs and gradients; the node is
    still normref's; a call with the arguments given twice, an unknown keyword or too many positional
    arguments gets the signature's error naming the method."""
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x0 = torch.from_numpy(rng.standard_normal((4, 6)))
    w0, b0 = torch.from_numpy(rng.standard_normal(6)), torch.from_numpy(rng.standard_normal(6))
    want = torch.nn.functional.layer_norm(x0, (6,), w0, b0, 1e-3)
    calls = [
        lambda x, w, b: nt.layer_norm(x, (6,), w, b, 1e-3),
        lambda x, w, b: nt.layer_norm(x, (6,), weight=w, bias=b, eps=1e-3),
        lambda x, w, b: nt.layer_norm(input=x, normalized_shape=6, bias=b, weight=w, eps=1e-3),
        lambda x, w, b: nt.layer_norm(x, 6, w, eps=1e-3, bias=b),
    ]
    grads = None
    for call in calls:
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        y = call(x, w, b)
        assert y.grad_fn.name() == "NormrefLayerNormBackward"
        assert torch.allclose(y, want, rtol=0, atol=1e-12)
        g = torch.autograd.grad((y * y.detach()).sum(), (x, w, b))
        if grads is None:
            grads = g
        else:  # every calling style runs the same backward: identical gradients
            assert all(torch.equal(a, c) for a, c in zip(g, grads))
    x = x0.clone().requires_grad_(True)
    with pytest.raises(TypeError, match=r"layer_norm: multiple values for argument 'weight'"):
        nt.layer_norm(x, (6,), w0, weight=w0)
    with pytest.raises(TypeError, match=r"layer_norm: got an unexpected keyword argument 'gamma'"):
        nt.layer_norm(x, (6,), gamma=w0)
    with pytest.raises(TypeError, match=r"layer_norm: too many positional arguments"):
        nt.layer_norm(x, (6,), w0, b0, 1e-5, None)
    with pytest.raises(TypeError, match=r"normref.backends.torch.layer_norm: weight must be a torch.Tensor or None"):
        nt.layer_norm(x, (6,), np.ones(6))


def test_adapter_under_functorch_takes_functions_apply(rng):
    """Under a torch.func transform the adapter calls ``Function.apply`` (its functorch path):
    torch.func.grad and vmap run normref's backward and agree with the eager path."""
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x = torch.from_numpy(rng.standard_normal((3, 5)))
    w = torch.from_numpy(rng.standard_normal(5))

    def loss(x, w):
        return (nt.layer_norm(x, (5,), w) ** 3).sum()

    gx = torch.func.grad(loss)(x, w)
    xe = x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(loss(xe, w), (xe,))
    assert torch.allclose(gx, ge, rtol=0, atol=1e-12)
    per_row = torch.func.vmap(torch.func.grad(lambda r: (nt.layer_norm(r, (5,), w) ** 3).sum()))(x)
    assert torch.allclose(per_row, ge, rtol=0, atol=1e-12)  # rows are independent in layer norm


def test_cached_parts_are_shared_and_immutable():
    from normref import operation as op
    from normref import partition

    assert partition.cached("layer", normalized_ndim=2) is partition.cached("layer", normalized_ndim=2)
    assert partition.cached("layer", normalized_ndim=2) == partition.Partition("layer", normalized_ndim=2)
    s = op.cached(op.Standardizing, 1e-5)
    assert s is op.cached(op.Standardizing, 1e-5) and s == op.Standardizing(1e-5)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        s.eps = 1.0  # type: ignore[misc]


def test_eps_checks_unchanged_with_the_cache():
    x = np.ones((2, 3), np.float32)
    for bad, err, msg in [(float("nan"), ValueError, "eps must be a number, got nan"),
                          (0.0, ValueError, "eps must be a finite number > 0"),
                          (1e-50, ValueError, "rounds to 0 in float32"),
                          ("1e-5", TypeError, "eps must be a real number")]:
        for _ in range(2):  # the second call meets the cached smallest-normal value
            with pytest.raises(err, match=msg):
                normref.layer_norm(x, 3, eps=bad)
    assert np.isfinite(normref.layer_norm(x.astype(np.float64), 3, eps=1e-50)).all()  # fine in float64
