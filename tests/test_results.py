"""Result NamedTuples (issue 17 §2, ``NormResult`` traps): array-like uses raise with a hint that
names the fields and ``result.<first field>``; every tuple behaviour is kept."""

from __future__ import annotations

import copy
import operator
import pickle
import re

import numpy as np
import pytest

import normref
from normref._results import result_tuple


def _result_types():
    """Every public result NamedTuple of normref (found, not listed: a new one must be decorated)."""
    seen = {}
    for name in normref.__all__:
        obj = getattr(normref, name)
        if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
            seen[obj.__name__] = obj
    return [seen[k] for k in sorted(seen)]


RESULTS = _result_types()


def _bn_result():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2))
    return x, normref.batch_norm(x, np.zeros(3), np.ones(3), training=True)


HINT = re.escape("NormResult is (output, running_mean, running_var); use result.output")


def test_the_known_result_types_are_found():
    names = {c.__name__ for c in RESULTS}
    assert {"NormResult", "MeanOnlyResult", "LpNormResult", "WhiteningResult", "SpectralNormResult",
            "PopulationStatistics"} <= names


@pytest.mark.parametrize("cls", RESULTS, ids=lambda c: c.__name__)
def test_every_result_type_is_trapped(cls):
    r = cls(*range(len(cls._fields)))
    with pytest.raises(TypeError, match=rf"{cls.__name__} is \({', '.join(cls._fields)}\); use result\.{cls._fields[0]}"):
        r * 2
    with pytest.raises(AttributeError, match=rf"use result\.{cls._fields[0]}"):
        r.sum()
    assert cls.__doc__ and cls._fields[0] in cls.__doc__  # documented, first field named


@pytest.mark.parametrize("op", [operator.mul, operator.add, operator.sub, operator.truediv, operator.floordiv,
                                operator.matmul, operator.pow, operator.mod, operator.lt, operator.ge,
                                operator.eq, operator.ne])
def test_arithmetic_and_comparisons_raise_with_the_hint(op):
    x, r = _bn_result()
    for a, b in ((r, x), (x, r), (r, 2), (2, r), (r, 2.0)):
        with pytest.raises(TypeError, match=HINT):
            op(a, b)


def test_unary_numpy_and_conversion_raise_with_the_hint():
    x, r = _bn_result()
    for f in (operator.neg, operator.pos, abs, np.exp, np.sum, np.asarray, lambda r: x + r, lambda r: r + (1,)):
        with pytest.raises(TypeError, match=HINT):
            f(r)


@pytest.mark.parametrize("attr", ["sum", "shape", "mean", "backward", "dtype", "ndim", "numpy", "T"])
def test_unknown_attributes_raise_attribute_error_with_the_hint(attr):
    _, r = _bn_result()
    with pytest.raises(AttributeError, match=rf"'NormResult' object has no attribute '{attr}': {HINT}"):
        getattr(r, attr)
    assert not hasattr(r, attr) and getattr(r, attr, None) is None  # probing still works


def test_tuple_behaviour_is_kept():
    x, r = _bn_result()
    y, rm, rv = r  # unpacking
    assert r[0] is y and r.output is y and r[-1] is rv and r[1:] == (rm, rv) and len(r) == 3
    assert list(r) == [y, rm, rv] and r._fields == ("output", "running_mean", "running_var")
    r2 = r._replace(running_var=None)
    assert type(r2) is normref.NormResult and r2.running_var is None and r2.output is y
    assert r2._asdict()["output"] is y
    back = pickle.loads(pickle.dumps(r))
    assert type(back) is normref.NormResult and all(np.array_equal(a, b) for a, b in zip(back, r))
    assert type(copy.deepcopy(r)) is normref.NormResult and type(copy.copy(r)) is normref.NormResult
    # equality and hashing between tuples are a tuple's
    s = normref.NormResult(1, 2, 3)
    assert s == (1, 2, 3) and s != (1, 2, 4) and hash(s) == hash((1, 2, 3)) and {s: 0}[(1, 2, 3)] == 0
    assert (s == None) is False and s != "abc"  # noqa: E711 (not an array: plain inequality)
    assert tuple(r) + (1,) == (y, rm, rv, 1)  # a plain tuple concatenates as before
    assert isinstance(r, tuple) and bool(r)


def test_result_tuple_refuses_a_non_namedtuple():
    with pytest.raises(TypeError, match="NamedTuple"):
        result_tuple(dict)


def test_jax_pytree_flattening_is_kept():
    jax = pytest.importorskip("jax")
    r = normref.NormResult(np.ones(2), np.zeros(3), np.ones(3))
    leaves, tree = jax.tree_util.tree_flatten(r)
    assert len(leaves) == 3
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert type(back) is normref.NormResult
    mapped = jax.tree_util.tree_map(lambda a: a * 2, r)  # maps the leaves, not the tuple
    assert type(mapped) is normref.NormResult and np.array_equal(mapped.output, 2 * np.ones(2))


def test_torch_adapter_returns_the_result():
    torch = pytest.importorskip("torch")
    from normref.backends import torch as nt

    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    r = nt.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), training=True)
    assert type(r) is normref.NormResult and len(r) == 3  # autograd.Function returns the NamedTuple
    y, rm, rv = r
    (y * y).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with pytest.raises(TypeError, match=HINT):
        r * 2
