"""Bad input: a clear ValueError/TypeError naming the argument, the expected and the received value,
raised before any work (so nothing is computed, nothing is half-returned, no NaN).

Every case runs on every installed array library (the ``backend`` fixture): the checks read shapes,
dtypes and Python arguments only, so each library must be refused the same way."""

from __future__ import annotations

import re

import numpy as np
import pytest

import normref
from tests.conftest import On

X = np.random.default_rng(0).standard_normal((4, 6, 3, 2))
C = np.ones(6)


def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kwargs)
    return str(info.value)


_On = On  # tests/conftest.py


# each case: (call taking the converter `a`, exception, pattern of the message)
CASES = [
    # wrong number of dimensions
    (lambda a: normref.batch_norm(a(np.ones(5)), None, None, training=True), ValueError, r"input must have at least 2 dimensions.*got 1"),
    (lambda a: normref.instance_norm(a(np.ones((4, 6)))), ValueError, r"input must have at least 3 dimensions.*got 2"),
    (lambda a: normref.group_norm(a(np.ones(6)), 2), ValueError, r"input must have at least 2 dimensions.*got 1"),
    (lambda a: normref.pixel_norm(a(np.ones(6))), ValueError, r"input must have at least 2 dimensions"),
    (lambda a: normref.filter_response_norm(a(np.ones((2, 3)))), ValueError, r"input must have at least 3 dimensions"),
    (lambda a: normref.normalize(a(np.ones(6))), ValueError, r"input must have at least 2 dimensions .*batch partition"),
    # num_groups / batch_groups / virtual batches not dividing
    (lambda a: normref.group_norm(a(X), 4), ValueError, r"num_groups must divide .* = 6; got num_groups=4"),
    (lambda a: normref.group_norm(a(X), 0), ValueError, r"num_groups must be an integer >= 1; got 0"),
    (lambda a: normref.group_norm(a(X), 2.0), TypeError, r"num_groups must be an integer"),
    (lambda a: normref.batch_group_norm(a(X), 2, batch_groups=3), ValueError, r"batch_groups must divide the batch size .* = 4; got batch_groups=3"),
    (lambda a: normref.normalize(a(X), partition="batch_group", num_groups=3, batch_groups=3), ValueError, r"batch_groups must divide .* = 4; got batch_groups=3"),
    (lambda a: normref.ghost_batch_norm(a(X), None, None, training=True, virtual_batch_size=3), ValueError, r"virtual_batch_size must divide .* = 4; got 3"),
    # normalized_shape not matching the trailing dimensions
    (lambda a: normref.layer_norm(a(X), (3, 3)), ValueError, r"normalized_shape must equal the trailing dimensions.*\(4, 6, 3, 2\).*\(3, 3\)"),
    (lambda a: normref.rms_norm(a(X), 5), ValueError, r"normalized_shape must equal the trailing dimensions"),
    (lambda a: normref.layer_norm(a(X), "2"), TypeError, r"normalized_shape must be an int or a tuple/list of ints; got str"),
    (lambda a: normref.normalize(a(X), partition="layer", normalized_ndim=5), ValueError, r"normalized_shape must name 1 to 4 trailing dimensions"),
    # parameter and running-statistic shapes
    (lambda a: normref.batch_norm(a(X), a(np.zeros(5)), a(np.ones(5))), ValueError, r"running_mean must have shape \(6,\).*got shape \(5,\)"),
    (lambda a: normref.batch_norm(a(X), None, None, a(np.ones(3)), training=True), ValueError, r"weight must have shape \(6,\).*got shape \(3,\)"),
    (lambda a: normref.group_norm(a(X), 2, a(C), a(np.ones((6, 1)))), ValueError, r"bias must have shape \(6,\).*got shape \(6, 1\)"),
    (lambda a: normref.layer_norm(a(X), (3, 2), a(np.ones(2))), ValueError, r"weight must have shape \(3, 2\).*got shape \(2,\)"),
    (lambda a: normref.batch_norm(a(X), a(np.zeros(6)), None, training=True), ValueError, r"running_mean and running_var go together"),
    (lambda a: normref.batch_norm(a(X), None, None), ValueError, r"running_mean and running_var are required when training=False"),
    (lambda a: normref.lp_batch_norm(a(X), None, a(C), training=True), ValueError, r"running_scale and running_mean go together"),
    (lambda a: normref.normalize(a(X), a(np.ones((4, 6, 2, 1))), recovery="generated"), ValueError, r"weight must be broadcastable"),
    (lambda a: normref.normalize(a(X), a(np.ones(5))), ValueError, r"weight must have shape \(6,\)"),
    (lambda a: normref.filter_response_norm(a(X), tau=a(np.ones(5))), ValueError, r"tau must have shape \(6,\)"),
    # integer and boolean inputs
    (lambda a: normref.batch_norm(a.raw(np.ones((4, 3), dtype=np.int64)), None, None, training=True), TypeError, r"input must have a real floating-point dtype.*got .*int64"),
    (lambda a: normref.layer_norm(a.raw(np.ones((4, 3), dtype=bool)), 3), TypeError, r"input must have a real floating-point dtype.*got .*bool"),
    (lambda a: normref.group_norm(a(X), 2, a.raw(np.ones(6, dtype=np.int32))), TypeError, r"weight must have a real floating-point dtype.*got .*int32"),
    (lambda a: normref.normalize(a.raw(np.ones((4, 3), dtype=np.int32))), TypeError, r"input must have a real floating-point dtype"),
    # a training batch with one value per statistic (torch's batch and instance norm raise too)
    (lambda a: normref.batch_norm(a(np.ones((1, 3))), None, None, training=True), ValueError, r"more than 1 value per channel when training.*\(1, 3\)"),
    (lambda a: normref.instance_norm(a(np.ones((2, 3, 1)))), ValueError, r"more than 1 value per channel when training"),
    (lambda a: normref.batch_group_norm(a(np.ones((2, 3))), 3, batch_groups=2), ValueError, r"more than 1 value per statistic .*got input of shape \(2, 3\)"),
    (lambda a: normref.ghost_batch_norm(a(np.ones((4, 3))), None, None, training=True, virtual_batch_size=1), ValueError, r"more than 1 value per channel when training"),
    (lambda a: normref.lp_batch_norm(a(np.ones((1, 3))), training=True), ValueError, r"more than 1 value per channel when training"),
    (lambda a: normref.mean_only_batch_norm(a(np.ones((1, 3))), training=True), ValueError, r"more than 1 value per channel when training"),
    (lambda a: normref.normalize(a(np.ones((1, 3)))), ValueError, r"batch partition .* leaves 1 value per statistic"),
    (lambda a: normref.normalize(a(np.ones((2, 3))), partition="batch_group", num_groups=3, batch_groups=2), ValueError, r"batch_group partition .* leaves 1 value per statistic"),
    (lambda a: normref.normalize(a(np.ones((2, 3, 1))), partition="instance", operation="lp"), ValueError, r"instance partition .* leaves 1 value per statistic"),
    # eps, momentum, p and the other scalars
    (lambda a: normref.batch_norm(a(X), None, None, training=True, eps=0.0), ValueError, r"eps must be a finite number > 0; got 0.0"),
    (lambda a: normref.layer_norm(a(X), 2, eps=-1e-5), ValueError, r"eps must be a finite number > 0; got -1e-05"),
    (lambda a: normref.rms_norm(a(X), 2, eps=float("nan")), ValueError, r"eps must be a number, got nan"),
    (lambda a: normref.group_norm(a(X), 2, eps="1e-5"), TypeError, r"eps must be a real number; got str"),
    (lambda a: normref.normalize(a(X), eps=0.0), ValueError, r"eps must be a finite number > 0"),
    (lambda a: normref.batch_norm(a(X), a(C * 0), a(C), training=True, momentum=1.5), ValueError, r"momentum must lie in \[0, 1\].*got 1.5"),
    (lambda a: normref.instance_norm(a(X), a(C * 0), a(C), momentum=-0.1), ValueError, r"momentum must lie in \[0, 1\]"),
    (lambda a: normref.ghost_batch_norm(a(X), a(C * 0), a(C), training=True, momentum=2.0, virtual_batch_size=2), ValueError, r"momentum must lie in \[0, 1\]"),
    (lambda a: normref.batch_norm(a(X), a(C * 0), a(C), training=True, momentum=None), ValueError, r"momentum=None .* needs num_batches_tracked"),
    (lambda a: normref.ghost_batch_norm(a(X), a(C * 0), a(C), training=True, momentum=None, virtual_batch_size=2), ValueError, r"momentum=None .* needs num_batches_tracked"),
    (lambda a: normref.ghost_batch_norm(a(X), a(C * 0), a(C), training=True, momentum=None, virtual_batch_size=2, num_batches_tracked=-1), ValueError, r"num_batches_tracked must be an integer >= 0; got -1"),
    (lambda a: normref.lp_batch_norm(a(X), training=True, p=0.5), ValueError, r"p must be >= 1.*got 0.5"),
    (lambda a: normref.normalize(a(X), operation="lp", p=0.0), ValueError, r"p must be >= 1"),
    (lambda a: normref.batch_renorm(a(X), a(C * 0), a(C), training=True, rmax=0.5), ValueError, r"rmax must be >= 1"),
    (lambda a: normref.batch_renorm(a(X), None, None, training=True), ValueError, r"running_mean and running_var are required"),
    # choices of the framework
    (lambda a: normref.normalize(a(X), partition="channel"), ValueError, r"partition must be one of 'batch', 'layer'.*got 'channel'"),
    (lambda a: normref.normalize(a(X), operation="whiten"), ValueError, r"operation must be one of"),
    (lambda a: normref.normalize(a(X), a(C), recovery="none"), ValueError, r"recovery='none' takes no weight or bias"),
    (lambda a: normref.group_norm(a(X)), TypeError, r"group_norm: missing a required argument: 'num_groups'"),
]


def _check_message(msg):
    assert re.match(r"^[a-z_.]+: ", msg), f"message does not name the function: {msg}"


@pytest.mark.parametrize("i", range(len(CASES)))
def test_bad_input(backend, i):
    call, exc, pattern = CASES[i]
    _check_message(_raises(exc, pattern, call, _On(backend)))


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: normref.layer_norm([[1.0, 2.0]], 2), TypeError, r"layer_norm: input must be an array.*got list"),
    (lambda: normref.get("batchnorm"), ValueError, r"unknown method 'batchnorm'; registered methods are: .*batch_norm"),
    (lambda: normref.partition.position(1), TypeError, r"takes 0 positional arguments"),
    (lambda: normref.partition.batch_group(2, 0), ValueError, r"batch_group: batch_groups must be an integer >= 1; got 0"),
])
def test_bad_input_without_arrays(call, exc, pattern):
    _raises(exc, pattern, call)


def test_errors_name_the_function():
    msg = _raises(ValueError, "num_groups", normref.group_norm, X, 4)
    assert msg.startswith("group_norm: ")


def test_mixed_libraries(backend):
    """An array of this backend beside a NumPy array, either way round, is refused naming both."""
    if backend.xp is np:
        pytest.skip("NumPy with NumPy is one library")
    lib = {"torch": "torch", "jax": "jax", "array_api_strict": "array_api_strict"}.get(backend.name, backend.name)
    a = _On(backend)
    with pytest.raises(TypeError, match=rf"all arrays must come from one library; input is a numpy array .* weight is a {lib} array"):
        normref.group_norm(X, 2, a(C))
    with pytest.raises(TypeError, match=rf"one library; input is a {lib} array .* running_mean is a numpy array"):
        normref.batch_norm(a(X), np.zeros(6), np.ones(6))


def test_mixed_devices():
    import array_api_strict as xs

    dev = xs.Device("device1")
    a = xs.asarray(X, device=dev)
    b = xs.ones(6, dtype=xs.float64)
    with pytest.raises(ValueError, match=r"all arrays must be on one device; input is on .*device1.* but weight is on"):
        normref.group_norm(a, 2, b)


def test_errors_before_any_work(backend, monkeypatch):
    """Validation precedes arithmetic: a failing call never reaches a statistic. With kernels off
    every statistic goes through the operations' forward, which is patched to record calls."""
    from normref import operation

    called = []
    for cls in (operation.Standardizing, operation.Scaling, operation.LpStandardizing):
        orig = cls.forward
        monkeypatch.setattr(cls, "forward", lambda *a, _o=orig, **k: called.append(1) or _o(*a, **k))
    a = _On(backend)
    with normref.use_kernels(False):
        normref.group_norm(a(X), 2)  # the patch sees a valid call: the check below can fail
        assert called
        called.clear()
        with pytest.raises(ValueError):
            normref.batch_norm(a(X), a(np.zeros(5)), a(np.ones(5)), training=True)
        with pytest.raises(ValueError):
            normref.group_norm(a(X), 2, eps=0.0)
        with pytest.raises(ValueError):
            normref.lp_batch_norm(a(X), training=True, p=0.5)
        with pytest.raises(ValueError):
            normref.rms_norm(a(X), 3)
    assert not called


def test_backward_refuses_missing_cotangent():
    _, pb = normref.vjp(normref.layer_norm, X, 2)
    with pytest.raises(TypeError, match="cotangent must be an array"):
        pb(None)
