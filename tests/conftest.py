"""Shared fixtures: ``backend`` parametrizes a test over every array library normref supports.

A library that is not installed (or has no device here) is skipped with its reason, never dropped
silently. Arrays are made in NumPy float64 and converted, so every backend sees the same numbers.

The suite in two parts: ``python -m pytest`` runs the fast tests; the tests of :data:`SLOW` (marked
``slow`` here, by module and name, so that no test file needs editing) run with ``--full``.
``python -m pytest --full -m slow`` runs the slow part alone: CI runs both, the union is the suite.
"""

from __future__ import annotations

import fnmatch
import os

# The numba kernels' parallel builds compile in the calling process during the tests (a test that
# runs a parallel-sized input tests the parallel build from its first call; no background child
# processes under pytest). tests/test_cold_start.py runs the default, background compilation, in
# subprocesses of its own.
os.environ.setdefault("NORMREF_NUMBA_BACKGROUND", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import normref  # noqa: F401,E402  (every method registered before the tests are collected)
from normref.conformance.backends import all_backends  # noqa: E402


# --------------------------------------------------------------------------------------------------
# fast and full runs

# {test module: test function names (fnmatch patterns, parameters ignored)} marked ``slow``: the
# multi-process engines (gloo, MPI, JAX's simulated devices, dask clusters), subprocesses that import
# a framework, the whole conformance suite and the large drawn layouts (measured with --durations)
SLOW: dict[str, tuple[str, ...]] = {
    "test_jax_sharded.py": ("*",),
    "test_sync.py": ("test_sync_equals_single_process", "test_values_sent_minimum",
                     "test_float32_stability_across_ranks", "test_jax_collectives_shard_map_vmap_pmap",
                     "test_mpi4py"),
    "test_sync_whitening.py": ("test_sync_whitening_equals_single_process",),
    "test_torch_sync.py": ("test_synchronized_layers_equal_the_full_batch",
                           "test_convert_sync_and_torch_converter_interplay", "test_torch_ddp_example_*",
                           "test_bench_sync_quick"),
    "test_dask.py": ("test_local_cluster_*",),
    "test_kernel_layouts.py": ("*",),
    "test_kernels.py": ("test_bench_quick_smoke",),
    "test_cold_start.py": ("*",),  # fresh processes compiling kernels on an empty cache
    "test_bench.py": ("test_first_call_tiny_in_fresh_processes", "test_sync_bench_writes_json_when_asked"),
    "test_embedding.py": ("test_readme_jax_example_*",),
    "test_jax_adapter.py": ("test_check_grads_orders_1_and_2", "test_jit_and_vmap_equal_eager", "test_vmap",
                            "test_second_derivative_against_*", "test_axis_name_under_vmap"),
    "test_conformance.py": ("test_quick_run_of_everything_registered", "test_command_quick_mode_in_a_subprocess"),
    "test_jax_forward_mode.py": ("test_jvp_against_*", "test_jacfwd_equals_jacrev", "test_hessian_*",
                                 "test_under_jit_vmap_and_axis_name", "test_every_method_*", "test_shard_map_*",
                                 "test_state_outputs_have_no_tangent", "test_readme_forward_mode_block_runs"),
    "test_typing.py": ("test_mypy_is_clean_on_normref", "test_types_reach_users"),
    "test_channel_axis.py": ("test_jax_custom_vjp",),  # XLA compilations of grad and jit(grad)
    "test_keras.py": ("*",),  # every test runs Keras in a subprocess (KERAS_BACKEND is read at import)
    "test_flax.py": ("test_dropins_equal_flax_*", "test_batchnorm_running_statistics_*", "test_jit_and_axis_name_*",
                     "test_generic_layer_*", "test_named_layers_*", "test_linen_layers_*", "test_flax_nnx_example_*",
                     "test_readme_section_runs"),
    "test_torch_compile.py": ("test_*_compile_fullgraph", "test_no_graph_breaks_counted_by_explain",  # torch.compile
                              "test_compiled_backward_is_normrefs", "test_value_checks_become_assertions_while_tracing",
                              "test_inductor_*", "test_readme_section_runs",
                              "test_methods_run_eagerly_behind_a_graph_break"),
    "test_torch_export.py": ("test_onnx_*", "test_exporting_flag", "test_jit_trace_*", "test_readme_section_runs"),
    "test_equinox.py": ("test_generic_layer_per_example_equals_batched_call", "test_worked_example_*",
                        "test_example_script_*", "test_readme_section_runs", "test_batch_norm_under_jit_and_sequential",
                        "test_batch_norm_gradients_equal_equinox", "test_batch_norm_variants_equal_equinox",
                        "test_stateless_layer_variants_equal_equinox", "test_named_generic_layers"),
}
# and every test run on the JAX array library through the ``backend`` fixture (JAX compiles each new
# shape: the JAX column is most of the suite's time; test_jax_adapter's other tests stay fast)
SLOW_BACKENDS = ("jax",)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="normref: run the whole suite, the tests marked slow included (python -m pytest "
                     "--full; --full -m slow runs the slow ones alone)")


def _is_slow(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") in SLOW_BACKENDS:
        return True
    patterns = SLOW.get(item.path.name if hasattr(item, "path") else "", ())
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--full"):
        return
    kept, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") else kept).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = kept
        config._normref_slow_deselected = len(slow)


def pytest_report_header(config):
    if config.getoption("--full"):
        return "normref: the full suite (--full)"
    return "normref: the fast tests; the tests marked slow run with --full (python -m pytest --full -m slow)"


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_normref_slow_deselected", 0)
    if n:
        terminalreporter.write_line(f"normref: {n} slow tests not run (python -m pytest --full -m slow runs them)")


def _params():
    out = []
    for b in all_backends():
        marks = [] if b.available else [pytest.mark.skip(reason=f"{b.name}: {b.reason}")]
        if b.name == "dask" and b.available:
            # lazy arrays: checks that need concrete values (a negative running_var, a singular
            # covariance) are deferred by design, as under jax.jit, so the eager tables do not apply;
            # dask is tested by tests/test_dask.py and the conformance suite's dask column
            marks = [pytest.mark.skip(reason="dask: lazy (value checks deferred); see tests/test_dask.py")]
        out.append(pytest.param(b.name, marks=marks, id=b.name))
    return out


@pytest.fixture(params=_params())
def backend(request):
    """A :class:`normref.conformance.backends.Backend`, run on its computation path: for the "numpy"
    backend the numba kernels with their size threshold lowered to 1 element (the registry's and the
    tests' small examples would otherwise never reach them, and "numpy" would silently test the same
    formulas as "numpy-reference"); kernels off for "numpy-reference"."""
    from normref.conformance.backends import get_backend, kernel_path

    b = get_backend(request.param)
    with kernel_path(b):
        yield b


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)


def assert_same_kind(result, like):
    """The result is an array of ``like``'s library, on its device, with its dtype and shape."""
    import array_api_compat

    assert type(result) is type(like), f"expected {type(like).__name__}, got {type(result).__name__}"
    assert array_api_compat.device(result) == array_api_compat.device(like)
    assert result.dtype == like.dtype, f"dtype {result.dtype} != {like.dtype}"


# float64 comparison budget shared by the test modules: 1e3·ε₆₄ on O(1)-conditioned quantities (a
# few hundred roundings of error-free-transformed sums; each test says when it scales it by a cond)
EPS64 = float(np.finfo(np.float64).eps)
TOL64 = 1e3 * EPS64


def rel_err(a, b) -> float:
    """max|a − b| / max(1, max|b|) in float64 (0 for empty arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if a.size else 0.0


def registry_cases(m, seed: int = 0) -> list:
    """The registry's examples of method ``m`` drawn with ``seed``."""
    return list(m.examples(np.random.default_rng(seed)))


class On:
    """Makes a test case's arrays in one backend: ``a(x)`` float64, ``a.f32(x)`` float32, ``a.raw(x)``
    keeping x's dtype, ``a.np(y)`` a result back in NumPy float64 (shared by the bad-input tables)."""

    def __init__(self, backend):
        self.b = backend

    def __call__(self, x):
        return self.b.asarray(np.asarray(x, np.float64), "float64")

    def f32(self, x):
        return self.b.asarray(np.asarray(x, np.float64), "float32")

    def raw(self, x):
        return self.b.xp.asarray(x)

    def np(self, y):
        return np.asarray(self.b.to_numpy(y), np.float64)
