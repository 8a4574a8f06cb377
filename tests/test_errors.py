"""Bad input: a clear ValueError/TypeError naming the argument, the expected and the received value,
raised before any work (so nothing is computed, nothing is half-returned, no NaN)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import normref

X = np.random.default_rng(0).standard_normal((4, 6, 3, 2))
C = np.ones(6)


def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("call,exc,pattern", [
    # wrong number of dimensions
    (lambda: normref.batch_norm(np.ones(5), None, None, training=True), ValueError, r"input must have at least 2 dimensions.*got 1"),
    (lambda: normref.instance_norm(np.ones((4, 6))), ValueError, r"input must have at least 3 dimensions.*got 2"),
    (lambda: normref.group_norm(np.ones(6), 2), ValueError, r"input must have at least 2 dimensions.*got 1"),
    (lambda: normref.pixel_norm(np.ones(6)), ValueError, r"input must have at least 2 dimensions"),
    # num_groups not dividing the channels
    (lambda: normref.group_norm(X, 4), ValueError, r"num_groups must divide .* = 6; got num_groups=4"),
    (lambda: normref.group_norm(X, 0), ValueError, r"num_groups must be an integer >= 1; got 0"),
    (lambda: normref.group_norm(X, 2.0), TypeError, r"num_groups must be an integer"),
    (lambda: normref.batch_group_norm(X, 2, batch_groups=3), ValueError, r"batch groups must divide the batch size .* = 4; got 3"),
    (lambda: normref.ghost_batch_norm(X, None, None, training=True, virtual_batch_size=3), ValueError, r"virtual_batch_size must divide .* = 4; got 3"),
    # normalized_shape not matching the trailing dimensions
    (lambda: normref.layer_norm(X, (3, 3)), ValueError, r"normalized_shape must equal the trailing dimensions.*\(4, 6, 3, 2\).*\(3, 3\)"),
    (lambda: normref.rms_norm(X, 5), ValueError, r"normalized_shape must equal the trailing dimensions"),
    (lambda: normref.layer_norm(X, "2"), TypeError, r"normalized_shape must be an int or a tuple/list of ints; got str"),
    # parameter and running-statistic shapes
    (lambda: normref.batch_norm(X, np.zeros(5), np.ones(5)), ValueError, r"running_mean must have shape \(6,\).*got shape \(5,\)"),
    (lambda: normref.batch_norm(X, None, None, np.ones(3), training=True), ValueError, r"weight must have shape \(6,\).*got shape \(3,\)"),
    (lambda: normref.group_norm(X, 2, C, np.ones((6, 1))), ValueError, r"bias must have shape \(6,\).*got shape \(6, 1\)"),
    (lambda: normref.layer_norm(X, (3, 2), np.ones(2)), ValueError, r"weight must have shape \(3, 2\).*got shape \(2,\)"),
    (lambda: normref.batch_norm(X, np.zeros(6), None, training=True), ValueError, r"running_mean and running_var go together"),
    (lambda: normref.batch_norm(X, None, None), ValueError, r"running_mean and running_var are required when training=False"),
    (lambda: normref.normalize(X, np.ones((4, 6, 2, 1)), recovery="generated"), ValueError, r"weight must be broadcastable"),
    (lambda: normref.filter_response_norm(X, tau=np.ones(5)), ValueError, r"tau must have shape \(6,\)"),
    # integer and boolean inputs
    (lambda: normref.batch_norm(np.ones((4, 3), dtype=np.int64), None, None, training=True), TypeError, r"input must have a real floating-point dtype.*got int64"),
    (lambda: normref.layer_norm(np.ones((4, 3), dtype=bool), 3), TypeError, r"input must have a real floating-point dtype.*got bool"),
    (lambda: normref.group_norm(X, 2, np.ones(6, dtype=np.int32)), TypeError, r"weight must have a real floating-point dtype.*got int32"),
    (lambda: normref.layer_norm([[1.0, 2.0]], 2), TypeError, r"input must be an array.*got list"),
    # a training batch with one value per channel
    (lambda: normref.batch_norm(np.ones((1, 3)), None, None, training=True), ValueError, r"more than 1 value per channel when training.*\(1, 3\)"),
    (lambda: normref.instance_norm(np.ones((2, 3, 1))), ValueError, r"more than 1 value per channel when training"),
    # eps and momentum and p
    (lambda: normref.batch_norm(X, None, None, training=True, eps=0.0), ValueError, r"eps must be a finite number > 0; got 0.0"),
    (lambda: normref.layer_norm(X, 2, eps=-1e-5), ValueError, r"eps must be a finite number > 0; got -1e-05"),
    (lambda: normref.rms_norm(X, 2, eps=float("nan")), ValueError, r"eps must be a number, got nan"),
    (lambda: normref.group_norm(X, 2, eps="1e-5"), TypeError, r"eps must be a real number; got str"),
    (lambda: normref.batch_norm(X, C * 0, C, training=True, momentum=1.5), ValueError, r"momentum must lie in \[0, 1\].*got 1.5"),
    (lambda: normref.instance_norm(X, C * 0, C, momentum=-0.1), ValueError, r"momentum must lie in \[0, 1\]"),
    (lambda: normref.batch_norm(X, C * 0, C, training=True, momentum=None), ValueError, r"momentum=None .* needs num_batches_tracked"),
    (lambda: normref.lp_batch_norm(X, training=True, p=0.5), ValueError, r"p must be >= 1.*got 0.5"),
    (lambda: normref.normalize(X, operation="lp", p=0.0), ValueError, r"p must be >= 1"),
    (lambda: normref.batch_renorm(X, C * 0, C, training=True, rmax=0.5), ValueError, r"rmax must be >= 1"),
    (lambda: normref.batch_renorm(X, None, None, training=True), ValueError, r"running_mean and running_var are required"),
    # choices of the framework
    (lambda: normref.normalize(X, partition="channel"), ValueError, r"partition must be one of 'batch', 'layer'.*got 'channel'"),
    (lambda: normref.normalize(X, operation="whiten"), ValueError, r"operation must be one of"),
    (lambda: normref.normalize(X, C, recovery="none"), ValueError, r"recovery='none' takes no weight or bias"),
    (lambda: normref.get("batchnorm"), ValueError, r"unknown method 'batchnorm'; registered methods are: .*batch_norm"),
    (lambda: normref.group_norm(X), TypeError, r"group_norm: missing a required argument: 'num_groups'"),
])
def test_bad_input(call, exc, pattern):
    msg = _raises(exc, pattern, call)
    assert re.match(r"^[a-z_.]+: ", msg) or "unknown method" in msg, f"message does not name the function: {msg}"


def test_errors_name_the_function():
    msg = _raises(ValueError, "num_groups", normref.group_norm, X, 4)
    assert msg.startswith("group_norm: ")


def test_mixed_libraries_and_devices():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"all arrays must come from one library; input is a numpy array .* weight is a torch array"):
        normref.group_norm(X, 2, torch.ones(6))
    with pytest.raises(TypeError, match=r"one library"):
        normref.batch_norm(torch.tensor(X), np.zeros(6), np.ones(6))
    import array_api_strict as xs

    dev = xs.Device("device1")
    a = xs.asarray(X, device=dev)
    b = xs.ones(6, dtype=xs.float64)
    with pytest.raises(ValueError, match=r"all arrays must be on one device; input is on .*device1.* but weight is on"):
        normref.group_norm(a, 2, b)


def test_errors_before_any_work(monkeypatch):
    """Validation precedes arithmetic: a failing call never reaches the operation's forward."""
    from normref import operation

    called = []
    orig = operation.Standardizing.forward
    monkeypatch.setattr(operation.Standardizing, "forward", lambda *a, **k: called.append(1) or orig(*a, **k))
    with pytest.raises(ValueError):
        normref.batch_norm(X, np.zeros(5), np.ones(5), training=True)
    with pytest.raises(ValueError):
        normref.group_norm(X, 2, eps=0.0)
    assert not called


def test_backward_refuses_missing_cotangent():
    _, pb = normref.vjp(normref.layer_norm, X, 2)
    with pytest.raises(TypeError, match="cotangent must be an array"):
        pb(None)
