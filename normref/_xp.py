"""Array-namespace plumbing shared by every formula: one namespace per call, one device, float dtypes.

Frameworks are recognised through array-api-compat, which looks at ``sys.modules`` and never imports
a framework just to ask whether an object belongs to it.
"""

from __future__ import annotations

import numpy as _np

import math
from typing import Any, Sequence

import array_api_compat
from array_api_compat import array_namespace

#: An array of any array-API library (NumPy, PyTorch, JAX, CuPy, array-api-strict): the type of
#: inputs and outputs in the public signatures (a dependency-free alias, so that annotating does
#: not import a framework).
Array = Any

__all__ = [
    "Array",
    "namespace",
    "compute_dtype",
    "to_compute",
    "sum_to_shape",
    "is_array",
    "device_of",
    "library_name",
    "finfo_eps",
    "to_numpy",
    "is_lazy",
    "is_compiling",
]


def is_array(x: Any) -> bool:
    """True for any array that array-api-compat recognises (numpy, torch, jax, cupy, strict, ...)."""
    return x is not None and array_api_compat.is_array_api_obj(x)


def library_name(x: Any) -> str:
    """A short human name for the library an array belongs to, for error messages."""
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_dask_array(x):
        return "dask"
    return type(x).__module__.split(".")[0]


def is_lazy(x: Any) -> bool:
    """True for a lazy array whose values exist only once its graph is computed (``dask.array``).

    normref never computes one: a check that needs concrete values (a negative running variance, a
    zero weight norm, a covariance's definiteness) treats it as it treats a traced JAX value — the
    check is skipped, and the formula is built into the graph; ``.compute()`` gives what NumPy gives
    on the same values (for an invalid input: what the formula yields, e.g. NaN, not the ValueError).
    """
    return x is not None and array_api_compat.is_dask_array(x)


def is_compiling(x: Any) -> bool:
    """True for a torch tensor while ``torch.compile`` (TorchDynamo) traces the code holding it.

    Its values exist only once the compiled graph runs, so it is treated as a traced JAX value or a
    lazy dask array is: a check that needs concrete values (``bool(any(...))``, a NumPy copy) is
    skipped and the formula is built into the graph (``xp.where`` for both branches); reading a value
    would break the graph (``Tensor.item()``). Eager calls check as usual. ``torch`` is imported only
    when ``x`` is a torch tensor (then it is loaded already)."""
    if x is None or not array_api_compat.is_torch_array(x):
        return False
    import torch

    return torch.compiler.is_compiling()


def device_of(x: Any) -> Any:
    return array_api_compat.device(x)


def _device_or_none(x: Any) -> Any:
    try:
        return device_of(x)
    except Exception:  # a tracer or lazy array with no concrete device
        return None


_NP_FLOATS = (_np.dtype(_np.float32), _np.dtype(_np.float64))
_NP_XP: list = []


def _numpy_namespace() -> Any:
    """The NumPy namespace of the fast path (plain float32/float64 ndarrays): array-api-compat's, with
    its reductions called as ufunc reductions (:func:`_fast_numpy`)."""
    if not _NP_XP:
        _NP_XP.append(_fast_numpy(array_namespace(_np.empty(0))))
    return _NP_XP[0]


def _fast_numpy(compat: Any) -> Any:
    """array-api-compat's NumPy namespace, whose ``sum``/``mean``/``max``/``min``/``any``/``all`` on a
    plain float32/float64 (or bool, for any/all) ndarray call the ufunc reduction directly.

    ``np.sum(x, axis, keepdims=k)`` *is* ``np.add.reduce(x, axis, keepdims=k)`` behind a Python
    wrapper (``_wrapreduction``, the ``__array_function__`` dispatch) that costs 1–2 µs a call —
    more than the reduction itself on the small arrays of a per-call budget (issue 18: an 8×16 layer
    norm takes two sums and an ``any``). The results are the same arrays bit for bit: ``np.mean`` is
    that sum divided by the count (float32/float64 accumulate in their own dtype), ``np.max``/``np.min``
    are ``maximum``/``minimum.reduce`` (NaN propagates, an empty reduction raises the same
    ``ValueError``). Anything else (another dtype, a ``dtype=`` argument, an ndarray subclass) goes to
    array-api-compat's function unchanged. The module keeps array-api-compat's ``__name__``, so
    ``array_api_compat.is_numpy_namespace`` recognises it.
    """
    import types

    ns = types.ModuleType(compat.__name__, compat.__doc__)
    ns.__dict__.update({k: v for k, v in vars(compat).items() if k not in ("__name__", "__doc__")})
    nd, floats = _np.ndarray, _NP_FLOATS
    add, maximum, minimum = _np.add.reduce, _np.maximum.reduce, _np.minimum.reduce
    lor, land, booldt = _np.logical_or.reduce, _np.logical_and.reduce, _np.dtype(bool)
    c_sum, c_mean, c_max, c_min, c_any, c_all = (compat.sum, compat.mean, compat.max, compat.min,
                                                 compat.any, compat.all)

    def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001 (the array API's name)
        if dtype is None and type(x) is nd and x.dtype in floats:
            return add(x, axis=axis, keepdims=keepdims)
        return c_sum(x, axis=axis, dtype=dtype, keepdims=keepdims)

    def mean(x, /, *, axis=None, keepdims=False):
        if type(x) is nd and x.dtype in floats:
            n = x.size if axis is None else math.prod(
                x.shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
            if n:  # an empty mean warns and gives NaN in np.mean: left to it
                return add(x, axis=axis, keepdims=keepdims) / n
        return c_mean(x, axis=axis, keepdims=keepdims)

    def max(x, /, *, axis=None, keepdims=False):  # noqa: A001
        if type(x) is nd and x.dtype in floats:
            return maximum(x, axis=axis, keepdims=keepdims)
        return c_max(x, axis=axis, keepdims=keepdims)

    def min(x, /, *, axis=None, keepdims=False):  # noqa: A001
        if type(x) is nd and x.dtype in floats:
            return minimum(x, axis=axis, keepdims=keepdims)
        return c_min(x, axis=axis, keepdims=keepdims)

    def any(x, /, *, axis=None, keepdims=False):  # noqa: A001
        if type(x) is nd and x.dtype == booldt:
            return lor(x, axis=axis, keepdims=keepdims)
        return c_any(x, axis=axis, keepdims=keepdims)

    def all(x, /, *, axis=None, keepdims=False):  # noqa: A001
        if type(x) is nd and x.dtype == booldt:
            return land(x, axis=axis, keepdims=keepdims)
        return c_all(x, axis=axis, keepdims=keepdims)

    for f in (sum, mean, max, min, any, all):
        f.__doc__ = getattr(compat, f.__name__).__doc__
        setattr(ns, f.__name__, f)
    return ns


_TORCH_FAST: list = []  # (torch.Tensor, its float dtypes, array-api-compat's torch namespace)


def _torch_fast(arrays: dict) -> Any:
    """The torch namespace when every array is a real-floating torch tensor on one device (what the
    checks of :func:`namespace` would conclude, without probing each array's library), else ``None``
    (then the full checks run and raise where something is wrong). torch is only looked up in
    ``sys.modules``: an array can only be a tensor once torch is loaded."""
    if not _TORCH_FAST:
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "Tensor"):
            return None
        _TORCH_FAST.append((torch.Tensor, (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                            array_namespace(torch.empty(0))))
    tensor, floats, xp = _TORCH_FAST[0]
    device = None
    for a in arrays.values():
        if a is None:
            continue
        if not isinstance(a, tensor) or a.dtype not in floats:
            return None
        if device is None:
            device = a.device
        elif a.device != device:
            return None
    return xp if device is not None else None


def namespace(fn: str, **arrays: Any) -> Any:
    """The single array namespace shared by the named arrays (``None`` entries are skipped).

    Raises ``TypeError`` naming the argument when an argument is not an array, when arrays of
    different libraries are mixed, or when an array is not real floating point; ``ValueError`` when
    arrays live on different devices.

    NumPy subclasses: ``np.memmap`` is an ndarray with file-backed memory (same semantics: accepted);
    any other subclass of ``np.ndarray`` — ``np.ma.MaskedArray`` (whose mask normref would ignore:
    statistics neither masked nor plain), ``np.matrix`` (2-D only, ``*`` is a matrix product) or a
    user subclass — is refused with a ``TypeError``: pass ``np.asarray(a)`` (or ``a.filled(...)``) to
    say which values are meant. Other libraries' subclasses follow their library (a
    ``torch.nn.Parameter`` is a Tensor; JAX tracers are JAX arrays).
    """
    # fast path: only NumPy float32/float64 arrays (the common case; the checks below would all pass)
    seen = False
    for a in arrays.values():
        if a is None:
            continue
        if type(a) is not _np.ndarray or a.dtype not in _NP_FLOATS:
            break
        seen = True
    else:
        if seen:
            return _NP_XP[0] if _NP_XP else _numpy_namespace()
    xp = _torch_fast(arrays)
    if xp is not None:
        return xp
    first_name, first = None, None
    for name, a in arrays.items():
        if a is None:
            continue
        if isinstance(a, _np.ndarray) and type(a) is not _np.ndarray and not isinstance(a, _np.memmap):
            raise TypeError(
                f"{fn}: {name} must be a plain numpy.ndarray (or np.memmap); got {type(a).__name__}, a "
                f"subclass whose semantics normref does not implement (pass np.asarray({name}), or "
                f"{name}.filled(...) for a masked array)"
            )
        if not is_array(a):
            raise TypeError(
                f"{fn}: {name} must be an array (numpy, torch, jax, cupy or any array API array); "
                f"got {type(a).__name__}"
            )
        if first is None:
            first_name, first = name, a
            continue
        # compare libraries, not types: a torch Parameter is a Tensor, a JAX tracer is a jax array
        if library_name(a) != library_name(first):
            raise TypeError(
                f"{fn}: all arrays must come from one library; {first_name} is a "
                f"{library_name(first)} array ({type(first).__name__}) but {name} is a "
                f"{library_name(a)} array ({type(a).__name__})"
            )
        da, df = _device_or_none(a), _device_or_none(first)
        # a traced JAX value has no device until it runs: only known devices are compared
        if da is not None and df is not None and da != df:
            raise ValueError(
                f"{fn}: all arrays must be on one device; {first_name} is on {df!r} but {name} is on {da!r}"
            )
    if first is None:
        raise TypeError(f"{fn}: expected at least one array argument, got none")
    xp = array_namespace(first)
    for name, a in arrays.items():
        if a is None:
            continue
        if not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(
                f"{fn}: {name} must have a real floating-point dtype "
                f"(float16, bfloat16, float32 or float64); got {a.dtype}"
            )
    return xp


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype statistics are accumulated in: float32 for float16/bfloat16, else the dtype itself.

    NumPy dtypes are read by kind and size, not by identity (an earlier version computed
    every dtype that was not exactly ``float32``/``float64`` in float32):

    - non-native byte order (``'>f8'``, ``'>f4'`` on a little-endian machine) computes in the native
      dtype of the same size, native float64 / float32 precision; the result is cast back, so the
      caller gets the input's own dtype (byte order included) — the values are the native ones;
    - ``longdouble`` (float128 / float96) and any other float wider than 8 bytes computes in float64:
      normref's formulas and kernels are float64 at most, so a long-double input gets float64
      precision (about 1e-16 relative), not its own; the result is cast back to the input's dtype.
    """
    if dtype == xp.float32 or dtype == xp.float64:
        return dtype
    if isinstance(dtype, _np.dtype) and dtype.kind == "f":
        # NumPy: by size (byte order and long double handled here)
        return xp.float32 if dtype.itemsize <= 4 else xp.float64
    return xp.float32


def to_compute(xp: Any, a: Array | None, dtype: Any) -> Array:
    """``a`` cast to the compute dtype (no copy when it already has it); ``None`` passes through.

    (Annotated ``-> Array``, which is ``Any``: the callers pass an optional parameter through and
    test it for ``None`` themselves.)"""
    if a is None or a.dtype == dtype:
        return a
    return xp.astype(a, dtype)


def sum_to_shape(xp: Any, t: Array, shape: Sequence[int]) -> Array:
    """Sum ``t`` over the axes along which an array of ``shape`` was broadcast to ``t.shape``.

    This is the adjoint of broadcasting: the gradient of a broadcast parameter is the cotangent summed
    over every axis the parameter was repeated along.
    """
    shape = tuple(shape)
    lead = t.ndim - len(shape)
    axes = list(range(lead))
    for i, s in enumerate(shape):
        if s == 1 and t.shape[lead + i] != 1:
            axes.append(lead + i)
    if axes:
        t = xp.sum(t, axis=tuple(axes), keepdims=True)
    return xp.reshape(t, shape)


def finfo_eps(xp: Any, dtype: Any) -> float:
    return float(xp.finfo(dtype).eps)


def prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def to_numpy(a: Array | None) -> Any:
    """A NumPy copy of any array (torch detached and on the CPU, JAX, CuPy, array-api-strict)."""
    import numpy as np

    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return a
    if array_api_compat.is_torch_array(a):
        if is_compiling(a):  # no values while torch.compile traces: as for a jax tracer (callers catch it)
            raise TypeError("to_numpy: a torch tensor has no concrete values while torch.compile traces")
        a = a.detach().cpu()
        if a.dtype not in (a.new_zeros(()).double().dtype, a.new_zeros(()).float().dtype, a.new_zeros(()).half().dtype):
            a = a.float()  # bfloat16 has no NumPy dtype: widen (exactly) to float32
        return a.numpy()
    if array_api_compat.is_cupy_array(a):
        return a.get()
    try:
        return np.asarray(a)
    except Exception:
        return np.from_dlpack(a)
