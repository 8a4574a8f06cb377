"""``check(my_fn, like="group_norm")``: someone else's implementation against normref.

The function is called with the same arguments as the normref method it claims to implement (normref
follows ``torch.nn.functional``'s signatures), on the registry's examples converted to its array
library, in each dtype asked for. Its outputs are compared with normref's float64 NumPy evaluation of
the same rounded inputs, with the tolerances of the suite (:mod:`normref.conformance.tolerance`);
its gradients too, when it comes with a ``backward`` or its arrays have autograd (PyTorch, JAX).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import numpy as np

from normref.registry import Example, get

from . import tolerance as T
from .backends import Backend, get_backend
from .report import Report
from .suite import (
    _Case,
    _autograd_vjp,
    _convert,
    _f64,
    _first_array,
    _msg,
    _relerr,
    _select,
    _status,
    _versions,
    all_examples,
)

__all__ = ["check"]

_MODULE_BACKENDS = {"torch": "torch", "jax": "jax", "jaxlib": "jax", "cupy": "cupy", "numpy": "numpy",
                    "array_api_strict": "array_api_strict"}


def _name(fn) -> str:
    mod = getattr(fn, "__module__", None)
    qn = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{mod}.{qn}" if mod and mod != "__main__" else qn


def _probe(fn, b: Backend, ex) -> bool:
    try:
        args_b, kwargs_b = b.convert(ex.args, ex.kwargs, "float64")
        out = fn(*args_b, **kwargs_b)
        y = out[0] if isinstance(out, tuple) else out
        return type(y) is type(_first_array(args_b, kwargs_b))
    except Exception:
        return False


def _infer_backend(fn, ex) -> Backend:
    top = (getattr(fn, "__module__", None) or "").split(".")[0]
    if top in _MODULE_BACKENDS:
        b = get_backend(_MODULE_BACKENDS[top])
        if b.available:
            return b
    for name in ("numpy", "torch", "jax", "array_api_strict", "cupy"):
        b = get_backend(name)
        if b.available and _probe(fn, b, ex):
            return b
    raise TypeError(
        f"check: could not tell which array library {_name(fn)} takes (it failed on, or returned another "
        f"library's arrays for, every installed library); pass backend='torch' (or 'numpy', 'jax', ...)"
    )


def _as_examples(examples) -> list:
    out = []
    for e in examples:
        if isinstance(e, Example):
            out.append(e)
        elif isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], dict):
            out.append(Example(tuple(e[0]), dict(e[1]), label="given"))
        else:
            raise TypeError(f"check: examples must be normref.Example or (args, kwargs) pairs; got {type(e).__name__}")
    return out


def _grads_from(m, given, bound) -> tuple:
    """A user's backward result as one entry per array parameter of ``m`` (tuple or dict)."""
    if isinstance(given, dict):
        return tuple(given.get(p) for p in m.array_params)
    given = tuple(given) if isinstance(given, (tuple, list)) else (given,)
    if len(given) == len(m.array_params):
        return given
    present = [p for p in m.diff_params if bound.arguments.get(p) is not None]
    if len(given) == len(present):  # one per differentiable argument given
        d = dict(zip(present, given))
        return tuple(d.get(p) for p in m.array_params)
    raise TypeError(
        f"check: backward returned {len(given)} gradients; expected one per array parameter of "
        f"{m.name} {m.array_params} or one per differentiable argument given {tuple(present)}"
    )


def check(
    fn: Callable,
    like: str,
    *,
    backend: str | None = None,
    dtypes: Sequence[str] = ("float64", "float32"),
    backward: Callable | None = None,
    examples: Iterable | None = None,
    quick: bool = False,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> Report:
    """Check ``fn`` against the registered normref method ``like``; return the :class:`Report`.

    ``fn`` takes ``like``'s arguments (normref uses ``torch.nn.functional``'s signatures) in one array
    library: ``backend`` names it, else it is inferred from ``fn.__module__`` or by calling ``fn`` on
    each installed library. Every example the registry has for ``like`` (``quick``: the one passing
    the most array arguments, as in ``normref conformance --quick``; or ``examples``: your own
    ``Example``/``(args, kwargs)`` list of NumPy float64 arrays) is run in each of ``dtypes``; the
    outputs (the primary output, and auxiliary ones where ``fn`` returns a tuple) are compared with
    normref's float64 NumPy result on the same rounded inputs. Gradients are checked too: by
    ``backward(cotangent, *args, **kwargs)`` (a tuple with one gradient per array parameter of
    ``like``, or per differentiable argument given, or a dict by name), else by autograd when ``fn``'s
    arrays have it (PyTorch, JAX). Tolerances: 32·cond·ε(dtype) for outputs and gradients alike
    (:mod:`normref.conformance.tolerance`): both are one computation in ``dtype`` against the float64
    reference, the suite's ``forward`` and ``backward`` rows; the suite's 2·32·cond·ε pair tolerance is
    for two computations that both round in ``dtype`` (autograd vs analytic on one library).

    Raises :class:`ConformanceError` (an ``AssertionError``, so pytest reports it as a failure) with
    the failing checks when ``raise_on_failure``; otherwise returns the report either way.

    Example::

        import torch.nn.functional as F, normref.conformance as nc
        print(nc.check(F.group_norm, like="group_norm"))
    """
    t0 = time.perf_counter()
    m = get(like)
    if examples is None:
        exs = all_examples(m, seed)
        pairs = [(i, exs[i]) for i in _select(m, exs, quick, invariants=False)]
    else:
        pairs = list(enumerate(_as_examples(examples)))
    if not pairs:
        raise ValueError(f"check: {m.name} has no examples to check against; pass examples=[...]")
    b = get_backend(backend) if backend is not None else _infer_backend(fn, pairs[0][1])
    if not b.available:
        raise ValueError(f"check: backend {b.name} is not available here ({b.reason})")
    for d in dtypes:
        T.eps(d)
        if d not in b.dtypes:
            raise ValueError(f"check: {b.name} has no {d}; its dtypes are {', '.join(b.dtypes)}")
    records: list = []
    for idx, ex in pairs:
        case = _Case(m, idx, ex, seed, records)
        for dtype in dtypes:
            _check_one(case, fn, b, dtype, backward)
    title = f"{_name(fn)} against normref.{m.name}"
    meta = {"seed": seed, "quick": quick, "dtypes": list(dtypes), "versions": _versions(),
            "seconds": time.perf_counter() - t0, "function": _name(fn)}
    report = Report(records, [m.name], [b.name], [], meta, title=title)
    if raise_on_failure:
        report.raise_for_failures()
    return report


def _check_one(case: _Case, fn, b: Backend, dtype: str, backward) -> None:
    m, ex = case.m, case.ex
    try:
        args_b, kwargs_b, args_r, kwargs_r = _convert(b, ex, dtype)
        g_b = b.asarray(case.cotangent(), dtype)
        ref_fields, ref_grads = case.reference(args_r, kwargs_r, _f64(b, g_b))
    except Exception as e:
        case.error_record(b.name, dtype, "forward", e)
        return
    like = _first_array(args_b, kwargs_b)
    cond, desc = case.cond_for("forward")
    tol, formula = T.value_tol(dtype, cond, desc)
    try:
        out = fn(*args_b, **kwargs_b)
    except Exception as e:
        case.error_record(b.name, dtype, "forward", e)
        return
    # the primary output, and auxiliary outputs (running statistics) where fn returns them too
    user = list(out) if isinstance(out, tuple) else [out]
    detail, problems = {}, []
    for (name, ref), y in zip(list(ref_fields.items())[: len(user)], user):
        if type(y) is not type(like) or y.dtype != like.dtype:
            problems.append(f"{name} is {type(y).__name__} {getattr(y, 'dtype', '?')}, expected {type(like).__name__} {like.dtype}")
        try:
            detail[name] = _relerr(_f64(b, y), np.asarray(ref, np.float64))
        except Exception as e:
            problems.append(f"{name}: {_msg(e)}")
    err = max(detail.values(), default=0.0)
    case.record(b.name, dtype, "forward", err, tol, formula, status="fail" if problems else _status(err, tol),
                message="; ".join(problems), detail=detail, cond=cond)
    if isinstance(ref_grads, Exception):
        return
    bound = m.signature.bind(*args_b, **kwargs_b)  # no defaults: fn is called with what was given
    names = [p for p in m.diff_params if bound.arguments.get(p) is not None]
    if not names:
        return
    check = "backward"
    try:
        if backward is not None:
            grads = _grads_from(m, backward(g_b, *args_b, **kwargs_b), bound)
        elif b.has_autograd:
            check = "backward (autograd)"
            auto = _autograd_vjp(b, m, fn, bound, names, g_b)
            grads = tuple(auto.get(p) for p in m.array_params)
        else:
            return
    except Exception as e:
        case.error_record(b.name, dtype, check, e)
        return
    # fn's gradient in dtype against normref's float64 backward of the same rounded inputs and
    # cotangent: one side rounds, as in the suite's ``backward`` row, hence the value tolerance
    cond, desc = case.cond_for("backward")
    tol, formula = T.value_tol(dtype, cond, desc)
    detail, problems = {}, []
    for p, gb, gr in zip(m.array_params, grads, ref_grads):
        if gr is None or p not in names:
            continue
        if gb is None:
            problems.append(f"no gradient for {p}")
            continue
        try:
            detail[p] = _relerr(_f64(b, gb), np.asarray(gr, np.float64))
        except Exception as e:
            problems.append(f"d{p}: {_msg(e)}")
    err = max(detail.values(), default=0.0)
    case.record(b.name, dtype, check, err, tol, formula, status="fail" if problems else _status(err, tol),
                message="; ".join(problems), detail=detail, cond=cond)
