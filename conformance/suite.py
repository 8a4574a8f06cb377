"""The conformance suite: every registered method × every array library × every dtype.

Driven by the registry only (``normref.methods()``, each method's ``examples(rng)``,
``invariants``, ``array_params``/``nondiff`` and ``fd_target``): a method registered anywhere in
normref is checked without being listed here. For each example (a case) the suite runs

- ``forward``: every output field on library L in dtype d against the float64 NumPy evaluation (pure
  array-API path, kernels off) of the *same rounded inputs* (the inputs converted to d and back), so
  the error measured is the computation's, not the input rounding's;
- ``backward``: the analytic gradients the same way (one random cotangent per case, rounded to d);
- ``invariant: …``: each registry invariant on L's output in dtype d;
- ``cross-library``: L's outputs and gradients against every other library's in the same dtype;
- ``autograd`` (libraries with autograd: PyTorch, JAX): autograd through normref's own forward
  (through ``fd_target`` where the method has stop-gradient constants) against the analytic backward;
- ``second-order`` (autograd libraries, float64): autograd differentiating the analytic backward,
  s(a) = Σ_p ⟨w_p, ∂⟨g, f⟩/∂p⟩ for random w, against central differences of s computed with the
  NumPy backward along random directions (a Hessian-vector product check);
- ``finite-differences`` (float64 NumPy, its own column): the analytic backward against central
  differences of the forward along random directions (:mod:`normref.conformance.fd`).

Tolerances come from :mod:`normref.conformance.tolerance`: dtype epsilon × the case's conditioning
(for values, the larger of the example's ``cond`` and the measured sensitivity κ; for the finite-
difference and second-order checks, the measured κ alone).
Every random number is drawn from ``default_rng([seed, crc32(method), example, stream])``, so a record's
``seed`` and ``example`` rebuild its inputs exactly (:func:`replay`).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import platform
import sys
import time
import zlib
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from normref._kernels import use_kernels
from normref.registry import Example, Method, Residuals, get, methods as registered_methods, use_adapters

from . import tolerance as T
from .backends import KERNEL_DTYPES, Backend, all_backends, claimed_kernels, get_backend, kernel_path
from .fd import H, directional_fd
from .report import FD_COLUMN, Record, Report

__all__ = ["run", "replay", "case_inputs", "QUICK_EXAMPLES", "FD_DIRECTIONS"]

# --quick: this many examples per method (those passing the most array arguments), plus as few as cover
# the method's invariants that do not apply to those (see _select)
QUICK_EXAMPLES = 1
# --quick on the libraries whose every new shape and dtype costs a compilation (JAX: one XLA
# compilation per case, ~0.5 s): only these dtypes, and no autograd (PyTorch checks autograd and the
# second order in --quick; the full run checks JAX in every dtype, with autograd and second order).
QUICK_LIMITS = {"jax": (("float64",),)}
FD_DIRECTIONS = 2  # random directions per argument for the finite-difference checks

H5 = float(np.finfo(np.float64).eps) ** 0.2  # step of the fourth-order stencil (second-order check)

# random streams of a case
_COTANGENT, _WEIGHTS, _DIRECTIONS, _FD, _KAPPA = 1, 2, 3, 4, 5


def _crc(s: str) -> int:
    return zlib.crc32(s.encode("utf-8"))


def _stream(seed: int, name: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _crc(name), index, stream])


def all_examples(m: Method, seed: int) -> list:
    """Every example of ``m`` for ``seed`` (the registry's generator fed one seeded stream)."""
    if m.examples is None:
        return []
    return list(m.examples(np.random.default_rng([seed, _crc(m.name)])))


def suite_examples(m: Method, seed: int) -> list:
    """The suite's examples of ``m``: the registry's (:func:`all_examples`) and, for a method with a
    channel axis (``channels=``, issue 16), one channels-last variant appended (indices of the others
    unchanged): the registry's first example with a ≥ 3-D input, its layout arrays moved to
    (N, *S, C) and ``channel_axis=-1``. Every check runs on it: the float64 reference, finite
    differences, every library, autograd, second order, the invariants (evaluated on the output and
    arguments seen as (N, C, *S) again, see :func:`_invariant_view`) and the cross-library comparison."""
    exs = all_examples(m, seed)
    if not m.channels:
        return exs
    for ex in exs:
        last = _channels_last(m, ex)
        if last is not None:
            return exs + [last]
    return exs


def _channels_last(m: Method, ex) -> "Example | None":
    """``ex`` with its layout arrays (those of the input's rank) channels-last and ``channel_axis=-1``;
    ``None`` for an example without a spatial axis (a 2-D input has its channels last already)."""
    args, kwargs = list(ex.args), dict(ex.kwargs)
    get_arg = lambda n: m._arg(n, args, kwargs)  # noqa: E731
    names = tuple(m.channels(get_arg)) if callable(m.channels) else m.channels
    x = get_arg(names[0]) if names else None
    if not isinstance(x, np.ndarray) or x.ndim < 3 or "channel_axis" in kwargs:
        return None
    for n in names:
        v = get_arg(n)
        if isinstance(v, np.ndarray) and v.ndim == x.ndim:
            v = np.ascontiguousarray(np.moveaxis(v, 1, -1))
            pos = m._positions.get(n)
            if pos is not None and pos < len(args):
                args[pos] = v
            else:
                kwargs[n] = v
    kwargs["channel_axis"] = -1
    return Example(tuple(args), kwargs, label=f"channels-last (channel_axis=-1) of: {ex.label}", cond=ex.cond)


def _invariant_view(m: Method, out, args, kwargs):
    """``(out, args, kwargs)`` of a channels-last call seen as the (N, C, *S) call (the invariants are
    properties of the method's output on that layout); other calls unchanged."""
    if "channel_axis" not in kwargs:
        return out, args, kwargs
    kwargs = dict(kwargs)
    plan = m._channel_plan(kwargs.pop("channel_axis"), args, kwargs)
    if plan is None:
        return out, args, kwargs
    margs, mkwargs = m._moved_args(plan, args, kwargs)
    from normref.registry import _permute

    y = _permute(m.primary(out), plan.move.cotangent)
    if isinstance(out, tuple):
        out = type(out)(y, *out[1:]) if hasattr(out, "_fields") else (y,) + tuple(out[1:])
    else:
        out = y
    return out, tuple(margs), mkwargs


def case_inputs(method: "str | Method", seed: int, example: int):
    """The ``(args, kwargs, Example)`` (NumPy float64) of a record's case: replays its inputs."""
    m = get(method)
    exs = suite_examples(m, seed)
    if not 0 <= example < len(exs):
        raise ValueError(f"case_inputs: {m.name} has {len(exs)} examples for seed {seed}; got example={example}")
    ex = exs[example]
    return ex.args, ex.kwargs, ex


def _n_arrays(ex) -> int:
    return sum(isinstance(a, np.ndarray) for a in list(ex.args) + list(ex.kwargs.values()))


def applicable_invariants(m: Method, ex) -> set:
    """Names of ``m``'s invariants that apply to example ``ex`` (return a residual, not ``None``, on
    its float64 NumPy output). An invariant that raises counts as applicable: the check reports it."""
    if not m.invariants:
        return set()
    try:
        with use_kernels(False), np.errstate(all="ignore"):
            out = m(*ex.args, **ex.kwargs)
    except Exception:  # a failing forward is reported by the forward check of the case
        return set()
    from array_api_compat import array_namespace

    like = _first_array(ex.args, ex.kwargs)
    xp = array_namespace(like) if like is not None else np
    names = set()
    for inv in m.invariants:
        try:
            with use_kernels(False), np.errstate(all="ignore"):
                if inv.check(m, xp, *_invariant_view(m, out, ex.args, ex.kwargs)) is None:
                    continue
        except Exception:
            pass
        names.add(inv.name)
    return names


def _select(m: Method, exs: list, quick: bool, invariants: bool = True) -> list:
    """Indices of the examples to run: all, or (``quick``) the QUICK_EXAMPLES examples exercising the
    most array arguments plus, when ``invariants``, as few more as cover every invariant of ``m`` that
    applies to some example but not to those (an invariant of the plain output, say, does not apply to a
    call with an affine recovery, which is the call passing the most arrays)."""
    n = len(exs)
    if not quick or n <= QUICK_EXAMPLES:
        return list(range(n))
    order = sorted(range(n), key=lambda i: (-_n_arrays(exs[i]), i))
    chosen = order[:QUICK_EXAMPLES]
    if invariants and m.invariants:
        covered: set = set()
        for i in chosen:
            covered |= applicable_invariants(m, exs[i])
        rest = {i: applicable_invariants(m, exs[i]) - covered for i in order[QUICK_EXAMPLES:]}
        while True:  # greedy cover, in the same preference order
            best = max(rest, key=lambda i: (len(rest[i]), -order.index(i)), default=None)
            if best is None or not rest[best]:
                break
            chosen.append(best)
            gained = rest.pop(best)
            rest = {i: s - gained for i, s in rest.items()}
    return sorted(chosen)


# --------------------------------------------------------------------------------------------------
# small helpers


def _fields(out) -> "OrderedDict[str, Any]":
    """Output fields by name: a NamedTuple's fields, or ``output`` for a plain array."""
    if isinstance(out, tuple):
        names = getattr(out, "_fields", None) or [f"output{i}" for i in range(len(out))]
        return OrderedDict(zip(names, out))
    return OrderedDict(output=out)


def _f64(b: Backend, a) -> np.ndarray:
    return np.asarray(b.to_numpy(a), dtype=np.float64)


def _relerr(a: np.ndarray, ref: np.ndarray, scale: float | None = None) -> float:
    """Normwise relative error ‖a − ref‖∞ / ‖ref‖∞ (absolute where ref is all zeros)."""
    if a.shape != ref.shape:
        raise AssertionError(f"shape {a.shape}, expected {ref.shape}")
    if ref.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)) and np.all(np.isfinite(ref)):
        return math.inf
    s = float(np.max(np.abs(ref))) if scale is None else scale
    s = s if s > 0 else 1.0
    return float(np.max(np.abs(a - ref))) / s


def _msg(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 400 else s[:397] + "..."


def _status(err: float, tol: float) -> str:
    return "pass" if err <= tol else "fail"  # NaN compares False: a NaN error fails


def _digest(arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        if isinstance(a, np.ndarray):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(repr(a).encode())
    return h.hexdigest()


def _bound(m: Method, args, kwargs) -> inspect.BoundArguments:
    return m.bind(*args, **kwargs)


def _rebind(m: Method, arguments: dict) -> inspect.BoundArguments:
    return inspect.BoundArguments(m.signature, OrderedDict(arguments))


def _present_diff(m: Method, bound: inspect.BoundArguments) -> list:
    return [p for p in m.diff_params if bound.arguments.get(p) is not None]


def _reference(m: Method, args, kwargs, g):
    """float64 NumPy evaluation on the pure array-API path: (fields, grads or exception)."""
    with use_kernels(False):
        out, res = m.forward(*args, **kwargs)
        try:
            grads = m.backward(res, g)
        except Exception as e:  # reported by the backward check
            grads = e
    return _fields(out), grads


# --------------------------------------------------------------------------------------------------
# one case


class _Case:
    """One example of one method: its inputs, cotangent and the references per rounded input."""

    def __init__(self, m: Method, index: int, ex, seed: int, records: list):
        self.m, self.index, self.ex, self.seed = m, index, ex, seed
        self.cond = float(getattr(ex, "cond", 1.0) or 1.0)
        self.records = records
        self._refs: dict = {}
        self.g64 = None
        self._kappa = None
        self.store: dict = {}  # dtype -> backend -> (fields, grads) in float64 NumPy
        self.kernel_calls: list = []  # [(backend, dtype, KernelCalls)] of the library checks run

    def record(self, backend, dtype, check, error, tol, formula, status=None, message="", detail=None, column="",
               cond=None):
        r = Record(
            method=self.m.name, example=self.index, label=self.ex.label, backend=backend, dtype=dtype,
            check=check, error=float(error), tol=float(tol), formula=formula,
            status=status or _status(error, tol), seed=self.seed, cond=self.cond if cond is None else cond,
            message=message, detail=dict(detail or {}), column=column or backend,
        )
        self.records.append(r)
        return r

    def error_record(self, backend, dtype, check, e, column=""):
        return self.record(backend, dtype, check, math.inf, 0.0, "", status="error", message=_msg(e), column=column)

    def cotangent(self):
        if self.g64 is None:
            with use_kernels(False):
                out = self.m(*self.ex.args, **self.ex.kwargs)
            y = np.asarray(self.m.primary(out))
            self.g64 = _stream(self.seed, self.m.name, self.index, _COTANGENT).standard_normal(y.shape)
        return self.g64

    def kappas(self) -> tuple:
        """Measured sensitivities (forward to the inputs, backward to the residuals and cotangent)."""
        if self._kappa is None:
            m, ex = self.m, self.ex
            rng = _stream(self.seed, m.name, self.index, _KAPPA)
            keys = list(ex.kwargs)
            n = len(ex.args)

            def F(arrs):
                with use_kernels(False):
                    out = m(*arrs[:n], **dict(zip(keys, arrs[n:])))
                return list(_fields(out).values())

            kf = kb = 0.0
            try:
                kf = T.sensitivity(F, list(ex.args) + [ex.kwargs[k] for k in keys], rng)
            except Exception:  # a forward that fails is reported by the forward check itself
                pass
            try:
                with use_kernels(False):
                    _, res = m.forward(*ex.args, **ex.kwargs)

                def B(arrs):
                    with use_kernels(False):
                        return list(m.backward(Residuals(arrs[:-1], res.static, res.meta), arrs[-1]))

                kb = T.sensitivity(B, list(res.arrays) + [self.cotangent()], rng)
            except Exception:  # a failing backward is reported by the backward check itself
                pass
            self._kappa = (kf, kb)
        return self._kappa

    def cond_for(self, kind: str) -> tuple:
        """(cond, description) for ``forward``, ``backward`` or ``both`` value comparisons (the larger
        of the registry's estimate and the measured κ), or for ``derivatives``: the finite-difference
        and Hessian-vector checks, which use the measured κ alone (max(1, κ_f, κ_b)), so that no
        constant written in the registry can loosen them."""
        kf, kb = self.kappas()
        if kind == "derivatives":
            c = max(1.0, kf, kb)
            return c, T.cond_text(c, measured=max(kf, kb))
        k = {"forward": kf, "backward": kb, "both": max(kf, kb)}[kind]
        c = max(self.cond, k)
        return c, T.cond_text(c, self.cond, k)

    def reference(self, args_r, kwargs_r, g_r):
        key = _digest(list(args_r) + sorted(kwargs_r.items(), key=str) + [g_r])
        if key not in self._refs:
            self._refs[key] = _reference(self.m, args_r, kwargs_r, g_r)
        return self._refs[key]


def _convert(b: Backend, ex, dtype):
    """The call on backend ``b`` in ``dtype`` and the same call rounded back to float64 NumPy."""
    args_b, kwargs_b = b.convert(ex.args, ex.kwargs, dtype)

    def rnd(orig, conv):
        return _f64(b, conv) if isinstance(orig, np.ndarray) else orig

    args_r = tuple(rnd(o, c) for o, c in zip(ex.args, args_b))
    kwargs_r = {k: rnd(ex.kwargs[k], v) for k, v in kwargs_b.items()}
    return args_b, kwargs_b, args_r, kwargs_r


def _first_array(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if a is not None and hasattr(a, "dtype") and hasattr(a, "shape"):
            return a
    return None


def _check_forward(case: _Case, b: Backend, dtype, out_b, ref_fields, like) -> None:
    cond, desc = case.cond_for("forward")
    tol, formula = T.value_tol(dtype, cond, desc)
    fields_b = _fields(out_b)
    detail, problems = {}, []
    if list(fields_b) != list(ref_fields):
        problems.append(f"output fields {list(fields_b)}, expected {list(ref_fields)}")
    for name, ref in ref_fields.items():
        if name not in fields_b:
            continue
        yb = fields_b[name]
        if ref is None or yb is None:
            if (ref is None) != (yb is None):
                problems.append(f"{name} is {'None' if yb is None else 'an array'}, the reference's is not")
            continue
        if like is not None and (type(yb) is not type(like) or yb.dtype != like.dtype):
            problems.append(
                f"{name} is {type(yb).__name__} {getattr(yb, 'dtype', '?')}, expected {type(like).__name__} {like.dtype}"
            )
        try:
            detail[name] = _relerr(_f64(b, yb), np.asarray(ref, np.float64))
        except AssertionError as e:
            problems.append(f"{name}: {e}")
    err = max(detail.values(), default=0.0)
    status = "fail" if problems else _status(err, tol)
    case.record(b.name, dtype, "forward", err, tol, formula, status=status, message="; ".join(problems), detail=detail,
                cond=cond)


def _check_grads(case: _Case, b: Backend, dtype, check, grads_b, ref_grads, like, tolf=T.value_tol, ref_scale=None) -> dict:
    """Compare gradients (one per array parameter) with reference ones; returns float64 copies."""
    cond, desc = case.cond_for("backward")
    tol, formula = tolf(dtype, cond, desc)
    m = case.m
    detail, problems, out = {}, [], {}
    for p, gb, gr in zip(m.array_params, grads_b, ref_grads):
        if gr is None:
            if gb is not None and p in m.diff_params:
                problems.append(f"gradient for {p} where the reference has none")
            continue
        if gb is None:
            problems.append(f"no gradient for {p}")
            continue
        if like is not None and (type(gb) is not type(like) or gb.dtype != like.dtype):
            problems.append(f"d{p} is {type(gb).__name__} {gb.dtype}, expected {type(like).__name__} {like.dtype}")
        try:
            g64 = _f64(b, gb)
            out[p] = g64
            gr = np.asarray(gr, np.float64)
            scale = None if ref_scale is None else float(np.max(np.abs(ref_scale[p]))) if ref_scale[p].size else 1.0
            detail[p] = _relerr(g64, gr, scale)
        except AssertionError as e:
            problems.append(f"d{p}: {e}")
    err = max(detail.values(), default=0.0)
    status = "fail" if problems else _status(err, tol)
    case.record(b.name, dtype, check, err, tol, formula, status=status, message="; ".join(problems), detail=detail,
                cond=cond)
    return out


# -- autograd ----------------------------------------------------------------------------------------


def _is_torch(b: Backend) -> bool:
    return b.name.startswith("torch")


def _is_jax(b: Backend) -> bool:
    return b.name == "jax"


def _jax_array(a) -> bool:
    import array_api_compat

    return a is not None and array_api_compat.is_jax_array(a)


def _jit(fn: Callable, *arrays):
    """``fn(*arrays)`` under ``jax.jit`` (one XLA compilation instead of one per eager operation: the
    suite's JAX time is compilation); eagerly when tracing fails (value-dependent Python), so a method
    that cannot be jitted is still checked."""
    import jax

    try:
        return jax.jit(fn)(*arrays)
    except Exception:
        return fn(*arrays)


def _jit_call(f: Callable, args: tuple, kwargs: dict):
    """``f(*args, **kwargs)`` with every JAX array argument a ``jax.jit`` argument, the rest static."""
    pos = [i for i, a in enumerate(args) if _jax_array(a)]
    keys = [k for k, v in kwargs.items() if _jax_array(v)]

    def g(*arrs):
        a = list(args)
        for i, v in zip(pos, arrs):
            a[i] = v
        kw = dict(kwargs)
        kw.update(zip(keys, arrs[len(pos):]))
        return f(*a, **kw)

    return _jit(g, *[args[i] for i in pos], *[kwargs[k] for k in keys])


def _forward_backward(b: Backend, m: Method, args_b, kwargs_b, g_b):
    """(output, a thunk for the analytic gradients) on backend ``b``."""
    if _is_jax(b):
        # one compilation for the output and the gradients together
        def both(g, *a, **k):
            out, res = m.forward(*a, **k)
            return out, m.backward(res, g)

        try:
            out, grads = _jit_call(both, (g_b,) + tuple(args_b), kwargs_b)
            return out, lambda: grads
        except Exception:  # the forward alone, so that a failing backward is reported as such
            out = _jit_call(lambda *a, **k: m(*a, **k), args_b, kwargs_b)
            return out, lambda: m.backward(m.forward(*args_b, **kwargs_b)[1], g_b)
    out, res = m.forward(*args_b, **kwargs_b)
    return out, lambda: m.backward(res, g_b)


def _autograd_vjp(b: Backend, m: Method, fn: Callable, bound, names, g_b):
    """Gradients of ⟨g, primary(fn(bound))⟩ w.r.t. the named arguments, by the library's autograd."""
    if _is_torch(b):
        import torch

        leaves = {p: bound.arguments[p].detach().clone().requires_grad_(True) for p in names}
        args = dict(bound.arguments)
        args.update(leaves)
        bb = _rebind(m, args)
        with torch.enable_grad():
            y = m.primary(fn(*bb.args, **bb.kwargs))
            if not y.requires_grad:
                return {p: torch.zeros_like(t) for p, t in leaves.items()}
            gs = torch.autograd.grad(y, list(leaves.values()), grad_outputs=g_b, allow_unused=True)
        return {p: (torch.zeros_like(leaves[p]) if gg is None else gg) for p, gg in zip(names, gs)}
    import jax

    arr = [p for p, v in bound.arguments.items() if _jax_array(v)]

    def J(g, *vals):
        args = dict(bound.arguments)
        args.update(zip(arr, vals))

        def F(*dv):
            a2 = dict(args)
            a2.update(zip(names, dv))
            bb = _rebind(m, a2)
            return m.primary(fn(*bb.args, **bb.kwargs))

        _, pull = jax.vjp(F, *[args[p] for p in names])
        return pull(g)

    return dict(zip(names, _jit(J, g_b, *[bound.arguments[p] for p in arr])))


def _check_autograd(case: _Case, b: Backend, dtype, args_b, kwargs_b, g_b, grads_b, ref_grads) -> None:
    m = case.m
    bound = _bound(m, args_b, kwargs_b)
    names = _present_diff(m, bound)
    if not names:
        return
    fn = m
    if m.fd_target is not None:
        frozen = m.fd_target(args_b, kwargs_b)
        if frozen is not None:
            fn = frozen
    # the oracle is the library's autograd through the formula: plain calls must not be routed to
    # normref's adapters (their backward is what is being checked)
    with use_adapters(False):
        auto = _autograd_vjp(b, m, fn, bound, names, g_b)
    auto_t = tuple(auto.get(p) for p in m.array_params)
    analytic = {p: np.asarray(_f64(b, gb)) for p, gb in zip(m.array_params, grads_b) if gb is not None}
    scale = {p: np.asarray(gr, np.float64) for p, gr in zip(m.array_params, ref_grads) if gr is not None}
    analytic_t = tuple(analytic.get(p) if p in names else None for p in m.array_params)
    # autograd vs analytic on the same library and dtype, both measured against the reference's scale
    _check_grads(case, b, dtype, "autograd", auto_t, analytic_t, None, tolf=T.pair_tol, ref_scale=scale)


def _s_numpy(m: Method, arguments: dict, g, w: dict) -> float:
    """s = Σ_p ⟨w_p, (analytic backward)_p⟩ in float64 NumPy (the function the HVP differentiates)."""
    bb = _rebind(m, arguments)
    with use_kernels(False):
        out, res = m.forward(*bb.args, **bb.kwargs)
        grads = dict(zip(m.array_params, m.backward(res, g)))
    return float(sum(np.sum(np.asarray(grads[p], np.float64) * w[p]) for p in w if grads.get(p) is not None))


def _hvp_autograd(b: Backend, m: Method, bound, names, g_b, w: dict) -> dict:
    """∂s/∂p by the library's autograd, differentiating normref's analytic backward."""
    if _is_torch(b):
        import torch

        leaves = {p: bound.arguments[p].detach().clone().requires_grad_(True) for p in names}
        args = dict(bound.arguments)
        args.update(leaves)
        bb = _rebind(m, args)
        with torch.enable_grad():
            # the forward is recomputed with grad enabled, so the residuals depend on the inputs
            out, res = m.forward(*bb.args, **bb.kwargs)
            grads = dict(zip(m.array_params, m.backward(res, g_b)))
            terms = [(grads[p] * torch.asarray(w[p], dtype=grads[p].dtype, device=grads[p].device)).sum()
                     for p in w if grads.get(p) is not None]
            s = sum(terms[1:], terms[0])
            if not s.requires_grad:
                return {p: np.zeros(leaves[p].shape) for p in names}
            hv = torch.autograd.grad(s, list(leaves.values()), allow_unused=True)
        return {p: (np.zeros(leaves[p].shape) if h is None else _f64(b, h)) for p, h in zip(names, hv)}
    import jax
    import jax.numpy as jnp

    arr = [p for p, v in bound.arguments.items() if _jax_array(v)]

    def H(g, *vals):
        base = dict(bound.arguments)
        base.update(zip(arr, vals))

        def S(*dv):
            args = dict(base)
            args.update(zip(names, dv))
            bb = _rebind(m, args)
            out, res = m.forward(*bb.args, **bb.kwargs)
            grads = dict(zip(m.array_params, m.backward(res, g)))
            return sum(jnp.sum(grads[p] * jnp.asarray(w[p], dtype=grads[p].dtype)) for p in w if grads.get(p) is not None)

        return jax.grad(S, argnums=tuple(range(len(names))))(*[base[p] for p in names])

    hv = _jit(H, g_b, *[bound.arguments[p] for p in arr])
    return {p: _f64(b, h) for p, h in zip(names, hv)}


def _check_second_order(case: _Case, b: Backend, args_b, kwargs_b, g_b) -> None:
    m = case.m
    bound_b = _bound(m, args_b, kwargs_b)
    names = _present_diff(m, bound_b)
    if not names:
        return
    bound_np = _bound(m, case.ex.args, case.ex.kwargs)
    rng = _stream(case.seed, m.name, case.index, _WEIGHTS)
    w = {p: rng.standard_normal(np.shape(bound_np.arguments[p])) for p in names}
    g = case.cotangent()
    hv = _hvp_autograd(b, m, bound_b, names, g_b, w)
    cond, desc = case.cond_for("derivatives")
    tol, formula = T.fd_tol(cond, desc)
    drng = _stream(case.seed, m.name, case.index, _DIRECTIONS)
    detail = {}
    for p in names:
        a = np.asarray(bound_np.arguments[p], np.float64)
        worst = 0.0
        for _ in range(FD_DIRECTIONS):
            v = drng.standard_normal(a.shape)
            v /= max(np.linalg.norm(v), 1e-300)
            scale = max(1.0, float(np.max(np.abs(a)))) if a.size else 1.0

            def s_at(t):
                args = dict(bound_np.arguments)
                args[p] = a + t * v
                return _s_numpy(m, args, g, w)

            # two independent estimates, each with its own failure mode: the central difference with
            # h = ε^{1/3} (round-off ε·|s|/h where |s| ≫ |s'|: s sums products of gradients) and the
            # fourth-order stencil with h = ε^{1/5} (truncation O(h⁴), but a larger step that can cross
            # a kink of a piecewise-smooth backward: sign, max, clip). The analytic value must agree
            # with one of them; a wrong term disagrees with both.
            h = H * scale
            d2 = (s_at(h) - s_at(-h)) / (2 * h)
            h = H5 * scale
            d4 = (8 * (s_at(h) - s_at(-h)) - (s_at(2 * h) - s_at(-2 * h))) / (12 * h)
            analytic = float(np.sum(hv[p] * v))
            floor = 1e-3 * float(np.linalg.norm(hv[p]))
            errs = [abs(analytic - d) / max(abs(d), abs(analytic), floor, 1e-300) for d in (d2, d4)]
            worst = max(worst, min(errs))
        detail[p] = worst
    err = max(detail.values(), default=0.0)
    case.record(b.name, "float64", "second-order", err, tol, formula, detail=detail, cond=cond)


# -- the per-library checks -----------------------------------------------------------------------


def _run_library(case: _Case, b: Backend, dtype: str, do_autograd: str = "all") -> None:
    """Every check of one case on one library in one dtype (``do_autograd``: all, float64 or none)."""
    m, ex = case.m, case.ex
    try:
        args_b, kwargs_b, args_r, kwargs_r = _convert(b, ex, dtype)
        g64 = case.cotangent()
        g_b = b.asarray(g64, dtype)
        g_r = _f64(b, g_b)
        ref_fields, ref_grads = case.reference(args_r, kwargs_r, g_r)
    except Exception as e:
        case.error_record(b.name, dtype, "forward", e)
        return
    like = _first_array(args_b, kwargs_b)
    # the column's path (kernels on or off, the numpy column's lowered kernel thresholds), with the
    # kernel calls counted: the report says per column how many took a kernel
    with kernel_path(b) as calls:
        case.kernel_calls.append((b.name, dtype, calls))
        try:
            out_b, grads_thunk = _forward_backward(b, m, args_b, kwargs_b, g_b)
        except Exception as e:
            case.error_record(b.name, dtype, "forward", e)
            return
        _check_forward(case, b, dtype, out_b, ref_fields, like)
        grads64 = None
        if isinstance(ref_grads, Exception):
            case.error_record(b.name, dtype, "backward", ref_grads)
            grads_b = None
        else:
            try:
                grads_b = grads_thunk()
                grads64 = _check_grads(case, b, dtype, "backward", grads_b, ref_grads, like)
            except Exception as e:
                case.error_record(b.name, dtype, "backward", e)
                grads_b = None
        case.store.setdefault(dtype, {})[b.name] = (
            {k: _f64(b, v) for k, v in _fields(out_b).items() if v is not None},
            grads64 or {},
            ref_fields,
            {} if isinstance(ref_grads, Exception) else dict(zip(m.array_params, ref_grads)),
        )
        for inv in m.invariants:
            tol, formula = T.invariant_tol(inv.scale, dtype, case.cond)
            check = f"invariant: {inv.name}"
            try:
                from array_api_compat import array_namespace

                xp = array_namespace(like) if like is not None else b.xp
                v = inv.check(m, xp, *_invariant_view(m, out_b, args_b, kwargs_b))
            except Exception as e:
                case.error_record(b.name, dtype, check, e)
                continue
            if v is None:
                continue
            case.record(b.name, dtype, check, float(v), tol, formula)
    autograd = do_autograd == "all" or (do_autograd == "float64" and dtype == "float64")
    if b.has_autograd and autograd and grads_b is not None:
        try:
            _check_autograd(case, b, dtype, args_b, kwargs_b, g_b, grads_b, ref_grads)
        except Exception as e:
            case.error_record(b.name, dtype, "autograd", e)
        if dtype == "float64":
            try:
                _check_second_order(case, b, args_b, kwargs_b, g_b)
            except Exception as e:
                case.error_record(b.name, dtype, "second-order", e)


def _cross(case: _Case) -> None:
    """Every library against every other in the same dtype (outputs and gradients)."""
    for dtype, by_lib in case.store.items():
        libs = list(by_lib)
        if len(libs) < 2:
            continue
        cond, desc = case.cond_for("both")
        tol, formula = T.pair_tol(dtype, cond, desc)
        for a in libs:
            fa, ga, ref_f, ref_g = by_lib[a]
            detail = {}
            for other in libs:
                if other == a:
                    continue
                fb, gb, _, _ = by_lib[other]
                errs = [0.0]
                for k in fa:
                    if k in fb and fa[k].shape == fb[k].shape and ref_f.get(k) is not None:
                        errs.append(_relerr(fa[k], fb[k], float(np.max(np.abs(ref_f[k]))) if np.size(ref_f[k]) else 1.0))
                for k in ga:
                    if k in gb and ga[k].shape == gb[k].shape and ref_g.get(k) is not None:
                        errs.append(_relerr(ga[k], gb[k], float(np.max(np.abs(np.asarray(ref_g[k])))) if np.size(ref_g[k]) else 1.0))
                detail[other] = max(errs)
            case.record(a, dtype, "cross-library", max(detail.values()), tol, formula, detail=detail, cond=cond)


def _run_fd(case: _Case) -> None:
    """The float64 analytic backward against central differences of the forward (random directions).

    As in the second-order check, two estimates per direction: the central difference with
    h = ε^{1/3} (:func:`normref.conformance.fd.directional_fd`) and its Richardson extrapolation
    (4·D(h) − D(2h))/3 with h = ε^{1/5}; the analytic value must agree with one of them.
    """
    m, ex = case.m, case.ex
    cond, desc = case.cond_for("derivatives")
    tol, formula = T.fd_tol(cond, desc)
    rng = _stream(case.seed, m.name, case.index, _FD)
    errors: dict = {}
    try:
        with use_kernels(False):
            out, res = m.forward(*ex.args, **ex.kwargs)
            y = np.asarray(m.primary(out), dtype=np.float64)
            g = rng.standard_normal(y.shape)
            grads = m.backward(res, g)
            bound = m.bind(*ex.args, **ex.kwargs)
            names = list(m.signature.parameters)
            for pname, grad in zip(m.array_params, grads):
                idx = names.index(pname)
                if pname in m.nondiff or bound.arguments.get(pname) is None or idx >= len(ex.args):
                    continue
                a = np.asarray(ex.args[idx], np.float64)
                if grad is None:
                    raise AssertionError(f"no gradient for the differentiable argument {pname}")
                grad = np.asarray(grad, dtype=np.float64)
                if grad.shape != a.shape:
                    raise AssertionError(f"gradient of {pname} has shape {grad.shape}, argument {a.shape}")
                scale = max(1.0, float(np.max(np.abs(a)))) if a.size else 1.0
                floor = 1e-3 * float(np.linalg.norm(grad))
                worst = 0.0
                for _ in range(FD_DIRECTIONS):
                    v = rng.standard_normal(a.shape)
                    v /= max(np.linalg.norm(v), 1e-300)
                    analytic = float(np.sum(grad * v))
                    d2 = directional_fd(m, ex.args, ex.kwargs, idx, v, g)
                    h = H5 * scale
                    d4 = (4 * directional_fd(m, ex.args, ex.kwargs, idx, v, g, h=h)
                          - directional_fd(m, ex.args, ex.kwargs, idx, v, g, h=2 * h)) / 3
                    worst = max(worst, min(abs(analytic - d) / max(abs(d), abs(analytic), floor, 1e-300)
                                           for d in (d2, d4)))
                errors[pname] = worst
    except Exception as e:
        case.error_record("numpy-reference", "float64", "finite-differences", e, column=FD_COLUMN)
        return
    if not errors:
        return
    case.record("numpy-reference", "float64", "finite-differences", max(errors.values()), tol, formula,
                detail=errors, column=FD_COLUMN, cond=cond)


# --------------------------------------------------------------------------------------------------
# the run


def _versions() -> dict:
    v = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__}
    for mod in ("torch", "jax", "array_api_strict", "cupy", "numba"):
        if mod in sys.modules:
            v[mod] = getattr(sys.modules[mod], "__version__", "?")
    try:
        import normref

        v["normref"] = normref.__version__
    except Exception:  # pragma: no cover
        pass
    return v


def resolve(methods=None, backends=None, dtypes=None):
    """Validate the filters: (methods, available backends, skipped [(name, reason)], dtypes)."""
    ms = registered_methods() if methods is None else [get(m) for m in methods]
    if backends is None:
        bs = all_backends()
    else:
        bs = [get_backend(n) for n in backends]
    dts = list(T.EPS) if dtypes is None else list(dtypes)
    for d in dts:
        T.eps(d)
    avail = [b for b in bs if b.available]
    skipped = [(b.name, b.reason) for b in bs if not b.available]
    return ms, avail, skipped, dts


def run(
    methods: "Sequence[str | Method] | None" = None,
    backends: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    *,
    quick: bool = False,
    seed: int = 0,
    examples: Sequence[int] | None = None,
    finite_differences: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the conformance suite and return its :class:`Report`.

    ``methods``/``backends``/``dtypes`` filter (``None``: everything registered / known / all four
    dtypes); a backend that is not installed is listed in ``report.skipped`` with the reason.
    ``quick`` checks one example per method (the one passing the most array arguments) plus the fewest
    more that cover the method's invariants, autograd in float64 only, and JAX in float64 without
    autograd (:data:`QUICK_LIMITS`). ``examples`` restricts to those
    example indices (used by :func:`replay`). ``progress(description)`` is called once per case.
    """
    t0 = time.perf_counter()
    ms, avail, skipped, dts = resolve(methods, backends, dtypes)
    records: list = []
    fd_on = finite_differences and "float64" in dts
    tally: dict = {}
    for m in ms:
        exs = suite_examples(m, seed)
        idxs = _select(m, exs, quick) if examples is None else [i for i in examples if 0 <= i < len(exs)]
        for i in idxs:
            if progress is not None:
                progress(f"{m.name} [{i}] {exs[i].label}")
            case = _Case(m, i, exs[i], seed, records)
            try:
                case.cotangent()
            except Exception as e:  # the float64 reference itself fails on the registry's own example
                case.error_record("numpy-reference", "float64", "forward", e, column=FD_COLUMN)
                continue
            if fd_on:
                _run_fd(case)
            for b in avail:
                for dtype in dts:
                    if dtype not in b.dtypes:
                        continue
                    auto = "all"
                    if quick:
                        limit = QUICK_LIMITS.get(b.name)
                        if limit is not None and dtype not in limit[0]:
                            continue
                        auto = "none" if limit is not None else "float64"
                    # overflow in a low precision shows up as an error in the record, not a warning
                    with np.errstate(all="ignore"):
                        _run_library(case, b, dtype, do_autograd=auto)
            try:
                _cross(case)
            except Exception as e:
                case.error_record("numpy-reference", "float64", "cross-library", e)
            _tally(tally, case)
    columns = ([FD_COLUMN] if fd_on else []) + [b.name for b in avail]
    checked = {r.method for r in records if r.check.startswith("invariant: ")}
    no_invariants = {m.name: "none registered" if not m.invariants else "none applies to the examples run"
                     for m in ms if m.name not in checked and m.examples is not None and avail}
    meta = {
        "seed": seed,
        "quick": quick,
        "dtypes": dts,
        "backend_dtypes": {b.name: [d for d in dts if d in b.dtypes] for b in avail},
        "no_invariants": no_invariants,
        "paths": kernel_paths(avail, tally, fd_on),
        "versions": _versions(),
        "seconds": time.perf_counter() - t0,
    }
    return Report(records, [m.name for m in ms], columns, skipped, meta)


def _tally(tally: dict, case: _Case) -> None:
    """Add a case's kernel counts to ``tally``: {column: {"by_dtype": {dtype: {"asked"/"offered"/
    "taken": {primitive: n}}}, "by_method": {method: calls taken}}}."""
    for col, dtype, calls in case.kernel_calls:
        t = tally.setdefault(col, {"by_dtype": {}, "by_method": {}})
        d = t["by_dtype"].setdefault(dtype, {"asked": {}, "offered": {}, "taken": {}})
        for what in ("asked", "offered", "taken"):
            for k, n in getattr(calls, what).items():
                d[what][k] = d[what].get(k, 0) + n
        t["by_method"][case.m.name] = t["by_method"].get(case.m.name, 0) + calls.total_taken


def kernel_paths(avail: list, tally: dict, fd_on: bool = False) -> dict:
    """``meta["paths"]``: per column, the computation it ran and the kernel calls counted in it.

    ``path``: what the column claims (the numba kernels with the suite's thresholds, or the array-API
    formulas); ``claims``: the kernels it claims to run (``"numpy.moments"``...; empty for a column
    on the formulas or on its library's defaults); ``asked``/``offered``/``taken``: per primitive,
    the kernel lookups, those that found a registered kernel, and the calls that took it (did the
    work); ``by_dtype``: the same per dtype; ``by_method``: calls taken per method. The report turns
    a column that claims kernels but took none of them into a failure (:attr:`Report.path_problems`).
    """
    out: dict = {}
    if fd_on:
        out[FD_COLUMN] = {"path": "array-API formulas (use_kernels(False)), float64 NumPy", "kernels": False,
                          "claims": [], "asked": {}, "offered": {}, "taken": {}, "by_dtype": {}, "by_method": {}}
    for b in avail:
        t = tally.get(b.name, {"by_dtype": {}, "by_method": {}})
        tot: dict = {"asked": {}, "offered": {}, "taken": {}}
        for d in t["by_dtype"].values():
            for what, counts in d.items():
                for k, n in counts.items():
                    tot[what][k] = tot[what].get(k, 0) + n
        path = b.path or ("normref formulas; the library's registered kernels on (defaults)" if b.kernels
                          else "array-API formulas (use_kernels(False))")
        out[b.name] = {"path": path, "kernels": b.kernels, "thresholds": b.kernel_thresholds,
                       "claims": claimed_kernels(b), "kernel_dtypes": list(KERNEL_DTYPES) if b.kernel_thresholds else [],
                       **tot, **t}
    return out


def count_cases(methods=None, quick: bool = False, seed: int = 0) -> int:
    ms = registered_methods() if methods is None else [get(m) for m in methods]
    return sum(len(_select(m, suite_examples(m, seed), quick)) for m in ms)


def replay(record: "Record | dict") -> Record:
    """Re-run the check a record describes (same seed, example, library, dtype): its new :class:`Record`."""
    if isinstance(record, dict):
        record = Record.from_dict(record)
    if record.column == FD_COLUMN:
        backends: list = []
    else:
        backends = [record.backend]
        if record.check == "cross-library":
            backends += [k for k in record.detail if k != record.backend]
    rep = run([record.method], backends, [record.dtype], seed=record.seed, examples=[record.example],
              finite_differences=record.column == FD_COLUMN)
    for r in rep.records:
        if r.check == record.check and r.backend == record.backend and r.dtype == record.dtype:
            return r
    raise LookupError(f"replay: the check {record.check!r} did not run again for {record.line()}")
