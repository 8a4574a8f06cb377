"""numba CPU kernels for NumPy inputs: the hot reductions and fused passes of the standardization family.

Registered with :mod:`normref._kernels` through the ``normref.kernels`` entry point (``numpy``) and
loaded the first time normref sees a NumPy array; ``NORMREF_KERNELS=0`` or
``with normref.use_kernels(False):`` runs the array-API formulas instead (the reference these kernels
are tested against). Primitives (DESIGN.md, "Kernels"):

- ``moments(x, axes) -> (μ, σ²)``: mean and biased variance over the reduce axes, keepdims.
- ``mean_square(x, axes) -> mean(x²)``.
- ``normalize_affine(xv, axes, shift, scale, γ, β, shape, out) -> (x̂, y)``: x̂ = (x − shift)·scale
  and y = γ·x̂ + β in one pass (survey Algorithm 1, lines 4-5).
- ``backward_reduce(u, v, w, shape, axes) -> (Σ w·u, Σ w·u·v)``: with u = ∂L/∂y, v = x̂, w = γ the two
  sums the standardizing backward needs, in one pass.
- ``backward_apply(x̂, dy, γ, shape, axes, S1, S2, scale, n, centered) -> dx``:
  dx = scale·(γ·dy − S1/n − x̂·S2/n) (survey Eqn 21's backward; S1 term absent for scaling).

Each returns ``None`` for a case it does not handle (dtype other than float32/float64, mixed dtypes,
a layout that does not fit the canonical form of :mod:`._layout`); the formula then runs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["register", "accepts", "standardize_affine", "backward_fused", "moments", "mean_square", "normalize_affine", "backward_reduce", "backward_apply"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def accepts(x) -> bool:
    """Whether the kernels take an input like ``x``: a float32/float64 NumPy array of at least
    ``config.MIN_SIZE`` elements (smaller ones run faster on the formula)."""
    from . import config

    return isinstance(x, np.ndarray) and x.dtype in _FLOATS and x.size >= config.MIN_SIZE


def _same_float(*arrays) -> bool:
    first = arrays[0]
    if not accepts(first):
        return False
    return all(a is None or (isinstance(a, np.ndarray) and a.dtype == first.dtype) for a in arrays)


def _stat2(lay, i, a, dtype):
    """A keepdims statistic (broadcast to the view) as a contiguous (K1, K2) array of ``dtype``."""
    return np.ascontiguousarray(lay.view(i, a)[:, 0, :, 0, 0], dtype=dtype)


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def _k(name: str, size: int):
    """The parallel build of kernel ``name``, or its serial build for an input of few elements."""
    from . import _kernels as K
    from .config import SERIAL_BELOW

    par, ser = K.KERNELS[name]
    return ser if size < SERIAL_BELOW else par


def _sums(lay, mode, ops, flag=False):
    """(S1, S2) as float64 (K1, K2) arrays: mode "moments" (ops = (x5,)) or "dot" (u5, v5, w5)."""
    from . import _kernels as K

    K1, R1, K2, R2, R3 = lay.sizes
    size = K1 * R1 * K2 * R2 * R3
    threads = 1 if size < _serial_below() else _threads()
    s1 = np.empty((K1, K2))
    s2 = np.empty((K1, K2))
    rows = R2 * R3 > 1 and K1 * K2 >= 2 * threads
    if mode == "moments":
        if rows:
            _k("moments_rows", size)(ops[0], flag, s1, s2)
        else:
            _k("moments_cols", size)(ops[0], flag, K._chunks(R1, K1, threads), s1, s2)
    else:
        if rows:
            _k("dot_rows", size)(*ops, flag, s1, s2)
        else:
            _k("dot_cols", size)(*ops, flag, K._chunks(R1, K1, threads), s1, s2)
    return s1, s2


def _serial_below() -> int:
    from .config import SERIAL_BELOW

    return SERIAL_BELOW


def _moment_sums(x, axes, shifted):
    if not _same_float(x) or x.size == 0:
        return None
    from ._layout import canonical

    lay = canonical(x.shape, axes, [x])
    if lay is None:
        return None
    x5 = lay.view(0, x)
    s1, s2 = _sums(lay, "moments", (x5,), shifted)
    n = lay.sizes[1] * lay.sizes[3] * lay.sizes[4]
    return lay, x5, s1, s2, n


def moments(x, axes):
    """(μ, σ²) over ``axes`` with keepdims, in x's dtype: shifted one-pass sums in float64."""
    r = _moment_sums(x, axes, True)
    if r is None:
        return None
    lay, x5, s1, s2, n = r
    shift = x5[:, 0, :, 0, 0].astype(np.float64)
    d = s1 / n
    var = np.maximum(s2 / n - d * d, 0.0)
    return lay.stat_to_view((shift + d).astype(x.dtype)), lay.stat_to_view(var.astype(x.dtype))


def mean_square(x, axes):
    """mean(x²) over ``axes`` with keepdims, in x's dtype (float64 accumulation)."""
    r = _moment_sums(x, axes, False)
    if r is None:
        return None
    lay, _, _, s2, n = r
    return lay.stat_to_view((s2 / n).astype(x.dtype))


def _param_view(a, shape, vs):
    """γ or β (broadcastable to the input ``shape``) as a view of the partition's view shape ``vs``."""
    return None if a is None else np.broadcast_to(a, shape).reshape(vs)


def _out_view(out, vs):
    v = out.reshape(vs)
    return v if np.shares_memory(v, out) else None


def normalize_affine(xv, axes, shift, scale, gamma, beta, shape, out=None):
    """(x̂ on the view, y of ``shape``): x̂ = (x − shift)·scale, y = γ·x̂ + β, one pass over x.

    ``shift`` (``None`` for scaling) and ``scale`` are keepdims statistics on the view; ``gamma`` and
    ``beta`` are broadcastable to the input's ``shape``; ``out`` (of ``shape``, x's dtype) receives y.
    """
    if not _same_float(xv, shift, scale, gamma, beta, out):
        return None
    from . import _kernels as K
    from ._layout import canonical

    vs = tuple(xv.shape)
    g, b = _param_view(gamma, shape, vs), _param_view(beta, shape, vs)
    affine = g is not None or b is not None
    xhat = np.empty_like(xv)
    if out is not None:
        y = _out_view(out, vs)
        if y is None:
            return None
    else:
        y = np.empty_like(xv) if affine else xhat
    sh = np.broadcast_to(np.zeros((), xv.dtype) if shift is None else shift, vs)
    sc = np.broadcast_to(scale, vs)
    ops = [xv, xhat, y, sh, sc] + [a for a in (g, b) if a is not None]
    lay = canonical(vs, axes, ops)
    if lay is None:
        return None
    x5, h5, y5 = lay.view(0, xv), lay.view(1, xhat, True), lay.view(2, y, True)
    sh2, sc2 = _stat2(lay, 3, sh, xv.dtype), _stat2(lay, 4, sc, xv.dtype)
    i = 5
    g5 = b5 = x5
    if g is not None:
        g5, i = lay.view(i, g), i + 1
    if b is not None:
        b5 = lay.view(i, b)
    write_y = y is not xhat
    _k("normalize_affine", xv.size)(x5, sh2, sc2, g5, g is not None, b5, b is not None, h5, y5, write_y)
    if out is not None:
        return xhat, out
    return xhat, y.reshape(shape)


def _like(a, ref):
    """``a`` with ``ref``'s memory layout (a copy only when the strides differ): a cotangent laid out
    unlike x̂ would not fit the canonical form shared by all operands."""
    if a.strides == ref.strides:
        return a
    c = np.empty_like(ref)
    np.copyto(c, a)
    return c


def backward_reduce(u, v, w, shape, axes):
    """(Σ w·u, Σ w·u·v) over ``axes`` of the view (keepdims, u's dtype): u = ∂L/∂y, v = x̂ on the view,
    w = γ broadcastable to the input's ``shape`` (or ``None`` for w = 1)."""
    if not _same_float(u, v, w):
        return None
    from ._layout import canonical

    vs = tuple(u.shape)
    u = _like(u, v)
    wv = _param_view(w, shape, vs)
    lay = canonical(vs, axes, [u, v] + ([wv] if wv is not None else []))
    if lay is None:
        return None
    u5, v5 = lay.view(0, u), lay.view(1, v)
    w5 = lay.view(2, wv) if wv is not None else u5
    s1, s2 = _sums(lay, "dot", (u5, v5, w5), wv is not None)
    return lay.stat_to_view(s1.astype(u.dtype)), lay.stat_to_view(s2.astype(u.dtype))


def backward_apply(xhat, dy, gamma, shape, axes, s1, s2, scale, n, centered):
    """dx on the view: scale·(γ·dy − S1/n − x̂·S2/n) (standardizing) or scale·(γ·dy − x̂·S2/n)."""
    if not _same_float(xhat, dy, gamma, s1, s2, scale):
        return None
    from . import _kernels as K
    from ._layout import canonical

    vs = tuple(xhat.shape)
    dy = _like(dy, xhat)
    g = _param_view(gamma, shape, vs)
    dx = np.empty_like(xhat)
    b = [np.broadcast_to(a, vs) for a in (scale, s1, s2)]
    ops = [xhat, dy, dx] + b + ([g] if g is not None else [])
    lay = canonical(vs, axes, ops)
    if lay is None:
        return None
    dt = xhat.dtype
    sc2 = _stat2(lay, 3, b[0], dt)
    m1 = _stat2(lay, 4, b[1], np.float64) / n if centered else np.zeros_like(sc2, dtype=np.float64)
    m2 = _stat2(lay, 5, b[2], np.float64) / n
    x5, d5, o5 = lay.view(0, xhat), lay.view(1, dy), lay.view(2, dx, True)
    g5 = lay.view(6, g) if g is not None else x5
    _k("backward_apply", xhat.size)(x5, d5, g5, g is not None, sc2, m1.astype(dt), m2.astype(dt), o5)
    return dx


def _rows_order(lay) -> bool:
    K1, R1, K2, R2, R3 = lay.sizes
    return R2 * R3 > 1 and K1 * K2 >= 2 * (1 if K1 * R1 * K2 * R2 * R3 < _serial_below() else _threads())


def standardize_affine(xv, axes, mode, eps, shift, scale, gamma, beta, shape, out=None):
    """Statistics, x̂ and y in one task per statistic (rows order only; ``None`` otherwise).

    ``mode``: "standardizing" → (x̂, y, μ, σ², rstd); "scaling" → (x̂, y, None, mean(x²), r);
    "population" (``shift``, ``scale`` given as keepdims statistics) → (x̂, y, None, None, scale).
    """
    if not _same_float(xv, shift, scale, gamma, beta, out):
        return None
    from ._layout import canonical

    vs = tuple(xv.shape)
    g, b = _param_view(gamma, shape, vs), _param_view(beta, shape, vs)
    affine = g is not None or b is not None
    xhat = np.empty_like(xv)
    if out is not None:
        y = _out_view(out, vs)
        if y is None:
            return None
    else:
        y = np.empty_like(xv) if affine else xhat
    ops = [xv, xhat, y] + [a for a in (g, b) if a is not None]
    given = mode == "population"
    if given:
        sh, sc = np.broadcast_to(shift, vs), np.broadcast_to(scale, vs)
        ops += [sh, sc]
    lay = canonical(vs, axes, ops)
    if lay is None or not _rows_order(lay):
        return None
    K1, _, K2, _, _ = lay.sizes
    x5, h5, y5 = lay.view(0, xv), lay.view(1, xhat, True), lay.view(2, y, True)
    i = 3
    g5 = b5 = x5
    if g is not None:
        g5, i = lay.view(i, g), i + 1
    if b is not None:
        b5, i = lay.view(i, b), i + 1
    if given:
        # copies: the kernel writes scale_in in the other modes, so it takes a writeable array
        sh2, sc2 = _stat2(lay, i, sh, xv.dtype).copy(), _stat2(lay, i + 1, sc, xv.dtype).copy()
    else:
        sh2, sc2 = np.empty((K1, K2), xv.dtype), np.empty((K1, K2), xv.dtype)
    st1, st2 = np.empty((K1, K2), xv.dtype), np.empty((K1, K2), xv.dtype)
    code = {"standardizing": 0, "scaling": 1, "population": 2}[mode]
    _k("standardize_rows", xv.size)(x5, code, float(eps), sh2, sc2, g5, g is not None, b5, b is not None,
                                    h5, y5, y is not xhat, st1, st2)
    y_out = out if out is not None else y.reshape(shape)
    if given:
        return xhat, y_out, None, None, scale
    sc_v = lay.stat_to_view(sc2)
    if mode == "scaling":
        return xhat, y_out, None, lay.stat_to_view(st2), sc_v
    return xhat, y_out, lay.stat_to_view(st1), lay.stat_to_view(st2), sc_v


def backward_fused(xhat, dy, gamma, shape, axes, scale, n, centered):
    """(dx on the view, Σdy, Σdy·x̂ per statistic): both reductions and the apply in one task per
    statistic (rows order only; ``None`` otherwise)."""
    if not _same_float(xhat, dy, gamma, scale):
        return None
    from ._layout import canonical

    vs = tuple(xhat.shape)
    dy = _like(dy, xhat)
    g = _param_view(gamma, shape, vs)
    dx = np.empty_like(xhat)
    sc = np.broadcast_to(scale, vs)
    lay = canonical(vs, axes, [xhat, dy, dx, sc] + ([g] if g is not None else []))
    if lay is None or not _rows_order(lay):
        return None
    K1, _, K2, _, _ = lay.sizes
    dt = xhat.dtype
    x5, d5, o5 = lay.view(0, xhat), lay.view(1, dy), lay.view(2, dx, True)
    g5 = lay.view(4, g) if g is not None else x5
    raw1, raw2 = np.empty((K1, K2)), np.empty((K1, K2))
    mm1, mm2 = np.empty((K1, K2), dt), np.empty((K1, K2), dt)
    _k("backward_rows", xhat.size)(x5, d5, g5, g is not None, _stat2(lay, 3, sc, dt), n, centered, o5,
                                   raw1, raw2, mm1, mm2)
    return dx, lay.stat_to_view(raw1.astype(dt)), lay.stat_to_view(raw2.astype(dt))


def register() -> None:
    """Register the kernels with normref's kernel registry (called lazily on the first NumPy call)."""
    import numba  # noqa: F401  (ImportError here means: numba not installed, the formulas run)

    from normref._kernels import register_kernel

    for fn in (moments, mean_square, normalize_affine, backward_reduce, backward_apply, standardize_affine,
               backward_fused):
        fn.accepts = accepts
    for name, fn in [("standardize_affine", standardize_affine), ("backward_fused", backward_fused), ("moments", moments), ("mean_square", mean_square), ("normalize_affine", normalize_affine),
                     ("backward_reduce", backward_reduce), ("backward_apply", backward_apply)]:
        register_kernel("numpy", name, fn)
