"""numba CPU kernels for NumPy inputs: the hot reductions and fused passes of the standardization family.

Registered with :mod:`normref._kernels` through the ``normref.kernels`` entry point (``numpy``) and
loaded the first time normref sees a NumPy array; ``NORMREF_KERNELS=0`` or
``with normref.use_kernels(False):`` runs the array-API formulas instead (the reference these kernels
are tested against). Primitives (DESIGN.md, "Kernels"):

- ``moments(x, axes) -> (μ, σ²)``: mean and biased variance over the reduce axes, keepdims.
- ``mean_square(x, axes) -> mean(x²)``.
- ``normalize_forward(xv, axes, mode, eps, shift, scale, γ, β, shape, out) -> (y, μ, scale, σ²)``:
  the statistics and y = (x − μ)·scale·γ + β in one kernel (survey Algorithm 1, lines 4-5; the
  primitives *moments* and *normalize-affine* fused), x read once from memory where a statistic's
  elements fit in cache.
- ``normalize_backward(xv, shift, scale, dy, γ, pshape, shape, axes, mode, need) -> (dx, dγ, dβ)``:
  the backward reduction (Σdy and Σdy·x̂ per statistic and per parameter) and the backward apply
  dx = scale·(γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂)) (survey Eqn 21's backward) in one kernel.

Each returns ``None`` for a case it does not handle (dtype other than native float32/float64, mixed
dtypes, byte strides that are not whole elements or unaligned data, a layout that does not fit the
canonical form of :mod:`._layout`, a statistic whose Σ(x − s)² overflowed, a scale so small that the
backward's coefficients would underflow); the formula then runs. Under numba's ``workqueue``
threading layer the parallel builds are launched one at a time (:func:`_guard`).
"""

from __future__ import annotations

import numpy as np

from . import config  # numba's options and size thresholds (does not import numba: jit() does, lazily)

__all__ = ["register", "accepts", "moments", "mean_square", "normalize_forward", "normalize_backward"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _whole_elements(a) -> bool:
    """Every byte stride a multiple of the itemsize and the data aligned. The kernels address operands
    in elements (``_flat``); a field of a packed structured array (byte stride 9 for a
    float64 after an int8) used to be floor-divided into element strides, so the kernels read garbage and,
    through ``out=``, wrote into the neighbouring field. Such arrays are declined (the formula runs,
    and NumPy writes ``out=`` element by element)."""
    f = a.flags
    if not f.aligned:
        return False
    if f.c_contiguous or f.f_contiguous:  # (a size-1 axis may carry any stride: it is never stepped)
        return True
    isz = a.itemsize
    return all(s % isz == 0 for s in a.strides)


def accepts(x) -> bool:
    """Whether the kernels take an input like ``x``: a float32/float64 (native byte order) NumPy array
    of at least ``config.MIN_SIZE`` elements (smaller ones run faster on the formula) whose strides
    are whole elements."""
    return (isinstance(x, np.ndarray) and x.size >= config.MIN_SIZE and x.dtype in _FLOATS
            and _whole_elements(x))


def _same_float(*arrays) -> bool:
    first = arrays[0]
    if not accepts(first):
        return False
    return all(a is None or (isinstance(a, np.ndarray) and a.dtype == first.dtype and _whole_elements(a))
               for a in arrays)


def _stat2(lay, i, a, dtype):
    """A keepdims statistic (broadcast to the view) as a contiguous (K1, K2) array of ``dtype``."""
    return np.ascontiguousarray(lay.view(i, a)[:, 0, :, 0, 0], dtype=dtype)


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def _k(name: str, size: int):
    """The parallel build of kernel ``name``, or its serial build for an input of few elements."""
    from . import _kernels as K
    from . import config

    par, ser = K.KERNELS[name]
    if size < config.SERIAL_BELOW:
        return ser
    return _parallel_when_ready(K.__name__, name, par, ser) if config.BACKGROUND else _guard(par)


# Background compilation of the parallel builds (config.BACKGROUND): (id of the parallel dispatcher,
# the arguments' type key) → "pending" while a child process compiles it into the cache, "ready" after.
_READY: dict = {}
_QUEUE: list = []  # (module, kernel name, pickled signature) waiting for the child process
_WORKER: list = []  # the thread that runs the child processes one after the other, while alive
_WORK_LOCK = __import__("threading").Lock()

# what the child process runs: the parallel build's compile() for one signature, which writes
# numba's cache (the calling process then loads it)
_CHILD = (
    "import importlib, pickle, sys\n"
    "par = importlib.import_module(sys.argv[1]).KERNELS[sys.argv[2]][0]\n"
    "par.compile(pickle.loads(bytes.fromhex(sys.argv[3])))\n"
)


def _parallel_when_ready(module: str, name: str, par, ser):
    """``par``, or — until a child process has compiled it into the cache for the arguments' types —
    ``ser`` (the first such call queues the compilation). Both take the same arguments (the chunking
    is computed for the parallel build; the serial one runs the chunks in order)."""

    def run(*args):
        key = (id(par), _type_key(args))  # (the dispatchers live as long as the process)
        state = _READY.get(key)
        if state == "ready":
            return _guard(par)(*args)
        if state is None:
            import numba

            sig = tuple(numba.typeof(a) for a in args)
            if sig in par.overloads or _no_cache(par) or _in_cache(par, sig):
                # compiled here already, or in the cache (numba loads it), or no cache to hand a child's
                # build over: this process compiles or loads it now, as without BACKGROUND
                _READY[key] = "ready"
                return _guard(par)(*args)
            import pickle

            _READY[key] = "pending"
            _submit(key, module, name, pickle.dumps(sig).hex())
        return ser(*args)

    return run


def _type_key(args) -> tuple:
    """What numba's type of each argument depends on (arrays: dtype, rank, layout, writability,
    alignment; tuples: length and item type; scalars: their Python type), without ``numba.typeof``
    (microseconds per argument): one compiled signature per key."""
    key = []
    for a in args:
        if isinstance(a, np.ndarray):
            f = a.flags
            key.append((a.dtype.char, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned))
        elif isinstance(a, tuple):
            key.append((len(a), type(a[0]) if a else None))
        else:
            key.append(type(a))
    return tuple(key)


def _no_cache(par) -> bool:
    return type(getattr(par, "_cache", None)).__name__ == "NullCache"


def _in_cache(par, sig) -> bool:
    """Whether numba's cache index holds ``par`` for ``sig`` on this machine (then loading it costs
    milliseconds: no child process). Reads numba's cache internals; any surprise answers False."""
    try:
        cache = par._cache
        return cache._index_key(sig, par.targetctx.codegen()) in cache._cache_file._load_index()
    except Exception:
        return False


def _submit(key, module: str, name: str, sig_hex: str) -> None:
    with _WORK_LOCK:
        _QUEUE.append((key, module, name, sig_hex))
        if not (_WORKER and _WORKER[0].is_alive()):
            import threading

            t = threading.Thread(target=_work, daemon=True, name="normref-numba-background")
            _WORKER[:] = [t]
            t.start()


def _work() -> None:
    """Run the queued compilations, one child process at a time (the caller keeps the other core)."""
    import subprocess
    import sys

    while True:
        with _WORK_LOCK:
            if not _QUEUE:
                return
            key, module, name, sig_hex = _QUEUE.pop(0)
        try:
            subprocess.run([sys.executable, "-c", _CHILD, module, name, sig_hex], capture_output=True,
                           timeout=1800, check=False)
        except Exception:  # pragma: no cover - the caller then compiles it itself, as without BACKGROUND
            pass
        _READY[key] = "ready"  # next call: numba loads the cached build (or compiles it, if the child failed)


def wait_compiled(timeout: float = 1800.0) -> bool:
    """Block until the background compilations queued so far have finished (``True``) or ``timeout``
    seconds passed (``False``): for benchmarks and tests that want the parallel builds in place."""
    t = _WORKER[0] if _WORKER else None
    if t is not None:
        t.join(timeout)
    return all(v == "ready" for v in _READY.values())


# numba's ``workqueue`` threading layer (the fallback where neither TBB nor OpenMP is available) is
# not thread-safe: two Python threads launching parallel kernels at once abort the process
# (issue 11). Under that layer the parallel builds run one at a time; TBB and OpenMP launch
# concurrently. The layer is known only after the first parallel launch, so launches are serialized
# until then too (the first one is a compilation or a cache load anyway).
_LAUNCH_LOCK = __import__("threading").Lock()
_LAYER: list = []  # the threading layer's name, once known


def _serialize() -> bool:
    if _LAYER:
        return _LAYER[0] == "workqueue"
    import numba

    try:
        _LAYER.append(numba.threading_layer())
    except ValueError:  # no parallel kernel has run in this process yet
        return True
    return _LAYER[0] == "workqueue"


def _guard(fn):
    """``fn`` (a parallel build), serialized by a process-wide lock where the layer requires it."""
    if not _serialize():
        return fn

    def locked(*args):
        with _LAUNCH_LOCK:
            return fn(*args)

    return locked


def _sums(lay, x5, shifted):
    """(S1, S2) as float64 (K1, K2) arrays: Σ(x − s), Σ(x − s)² (s = a statistic's first element when
    ``shifted``, else 0)."""
    from . import _kernels as K

    K1, R1, K2, R2, R3 = lay.sizes
    size = K1 * R1 * K2 * R2 * R3
    threads = 1 if size < _serial_below() else _threads()
    s1 = np.empty((K1, K2))
    s2 = np.empty((K1, K2))
    if R2 * R3 == 1:
        # the columns kernel reads one element per (k1, r1, k2): valid only when R2 = R3 = 1
        _k("moments_cols", size)(x5, shifted, K._chunks(R1, K1, threads), s1, s2)
    elif K1 * K2 >= 2 * threads:
        _k("moments_rows", size)(x5, shifted, s1, s2)
    else:
        # few statistics over a reduced innermost run (issue 11: these went to the columns kernel,
        # which then read one element per run): each statistic's reduction split over the threads
        nchunk = max(1, min(R1 * R2 * R3 // 64, (4 * threads) // (K1 * K2)))
        _k("moments_split", size)(x5, shifted, nchunk, s1, s2)
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
    s1, s2 = _sums(lay, x5, shifted)
    n = lay.sizes[1] * lay.sizes[3] * lay.sizes[4]
    return lay, x5, s1, s2, n


def moments(x, axes):
    """(μ, σ²) over ``axes`` with keepdims, in x's dtype: shifted one-pass sums in float64."""
    r = _moment_sums(x, axes, True)
    if r is None:
        return None
    lay, x5, s1, s2, n = r
    if np.isinf(s2).any():
        # Σ(x − s)² overflowed (|x| ≳ 1.3e154; issue 11): s2/n − d² would be inf − inf = NaN. Decline: the
        # formula gives σ² = inf there, which the standardizing operations handle (operation._rsqrt)
        return None
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
    """γ or β (broadcastable to the input ``shape``) as a zero-copy view of the partition's view shape
    ``vs``; ``None`` when the reshape would copy (the caller then declines)."""
    if a is None:
        return None
    v = np.broadcast_to(a, shape).reshape(vs)
    return v if np.may_share_memory(v, a) else False


def _out_view(out, vs):
    v = out.reshape(vs)
    return v if np.shares_memory(v, out) else None


def _flat(lay, i, a, write=False):
    """Operand ``i`` as (1-D view of its memory, its five element strides) over the layout ``lay``."""
    from numpy.lib.stride_tricks import as_strided

    st = tuple(int(s) // a.itemsize for s in lay.perm_strides[i])
    span = 1 + sum((n - 1) * s for n, s in zip(lay.sizes, st))
    return as_strided(a, shape=(span,), strides=(a.itemsize,), writeable=write), st


_NONE5 = (0, 0, 0, 0, 0)
_MODES = {"standardizing": 0, "scaling": 1, "population": 2}
# rows order needs its innermost (reduced) run to be at least this long to beat the cols order
_ROWS_MIN_RUN = 16


def _order(lay, ops, full, params=()) -> str | None:
    """The loop order for the layout: "cols" when the innermost block (K2, R3) is contiguous in every
    full-size operand (indices ``full`` into ``ops``), R2 = 1, the reduced run R3 is short and the
    parameters (indices ``params``, ``None`` skipped) are constant along the reduced rows R1;
    "rows" otherwise (contiguous inner loops where R3 has unit stride, scalar loops elsewhere)."""
    K1, R1, K2, R2, R3 = lay.sizes
    block = R2 == 1 and all(i is None or lay.perm_strides[i][1] == 0 for i in params)
    for i in full:
        e = [int(v) // ops[i].itemsize for v in lay.perm_strides[i]]
        block &= (R3 == 1 or e[4] == 1) and (K2 == 1 or e[2] == R3)
    if block and (R3 < _ROWS_MIN_RUN or R2 * R3 == 1):
        return "cols"
    # the rows kernel takes any strides (scalar loops where the innermost run is not contiguous)
    return "rows"


def _chunks(k: int, threads: int) -> int:
    return max(1, min(k, 4 * threads))


def _canon(vs, axes, ops):
    from ._layout import canonical

    return canonical(vs, axes, ops)


def normalize_forward(xv, axes, mode, eps, shift, scale, gamma, beta, shape, out=None):
    """Statistics and y = (x − μ)·(scale·γ) + β in one kernel (survey Algorithm 1, lines 4-5).

    ``xv``: the partition's view of the input (of ``shape``); ``mode``: "standardizing" (μ, σ² of
    the batch), "scaling" (mean(x²), no shift), "population" (``shift`` and ``scale`` given as
    keepdims statistics on the view); γ, β broadcastable to ``shape``; ``out`` (``shape``, x's dtype)
    receives y. Returns (y of ``shape``, μ, scale, σ² as keepdims statistics on the view; μ is
    ``None`` for scaling, μ and σ² are the given ones for population) or ``None`` (declined).
    """
    given = mode == "population"
    if not _same_float(xv, gamma, beta, out, *((shift, scale) if given else ())) or xv.size == 0:
        return None
    vs = tuple(xv.shape)
    g, b = _param_view(gamma, shape, vs), _param_view(beta, shape, vs)
    if g is False or b is False:
        return None
    y = None
    if out is not None:
        y = _out_view(out, vs)
        if y is None:
            return None
        if y.strides != xv.strides:
            # the loop order (and so the rounding of the statistics) follows x's layout alone: an
            # out= buffer laid out otherwise receives a copy
            y = None
    copy_out = out is not None and y is None
    if y is None:
        y = np.empty_like(xv)
    ops = [xv, y] + [a for a in (g, b) if a is not None]
    if given:
        sh_b, sc_b = np.broadcast_to(shift, vs), np.broadcast_to(scale, vs)
        ops += [sh_b, sc_b]
    lay = _canon(vs, axes, ops)
    if lay is None:
        return None
    i = 2
    gi = bi = None
    if g is not None:
        gi, i = i, i + 1
    if b is not None:
        bi, i = i, i + 1
    order = _order(lay, ops, (0, 1), (gi, bi))
    K1, R1, K2, R2, R3 = lay.sizes
    K = K1 * K2
    dt = xv.dtype
    xf, xs = _flat(lay, 0, xv)
    yf, ys = _flat(lay, 1, y, True)
    gf, gs = _flat(lay, gi, g) if g is not None else (xf, _NONE5)
    bf, bs = _flat(lay, bi, b) if b is not None else (xf, _NONE5)
    if given:
        mean = _stat2(lay, i, sh_b, dt).reshape(K).copy()
        sc = _stat2(lay, i + 1, sc_b, dt).reshape(K).copy()
    else:
        mean, sc = np.empty(K, dt), np.empty(K, dt)
    var = np.empty(K, dt)
    size = xv.size
    threads = 1 if size < _serial_below() else _threads()
    code = _MODES[mode]

    if order == "rows":
        _kf("fwd_rows", size)(xf, xs, yf, ys, lay.sizes, code, float(eps), gf, gs, g is not None, bf, bs,
                              b is not None, _chunks(K, threads), mean, sc, var)
    else:
        fused = K1 >= 2 * threads
        _kf("fwd_cols", size)(xf, xs, yf, ys, lay.sizes, code, float(eps), gf, gs, g is not None, bf, bs,
                              b is not None, _chunks(R1, threads) if not fused else 1, fused, mean, sc, var)
    if not given and np.isinf(var).any():
        # Σ(x − s)² overflowed (|x − μ| ≳ 1.8e19 in float32, 1.3e154 in float64; issue 11): scale = 0 and
        # y = β everywhere. Decline: the formula rescales by a power of two (operation._rsqrt). A K-element
        # check, nothing on the common path. (NaN inputs give NaN statistics, not inf, and stay here.)
        return None
    if copy_out:
        np.copyto(out, y.reshape(shape))
    y_out = out if out is not None else y.reshape(shape)
    k2 = (K1, K2)
    if given:
        return y_out, shift, scale, None
    mu = None if mode == "scaling" else lay.stat_to_view(mean.reshape(k2))
    return y_out, mu, lay.stat_to_view(sc.reshape(k2)), lay.stat_to_view(var.reshape(k2))


def _like(a, ref):
    """``a`` with ``ref``'s memory layout (a copy only when the strides differ): a cotangent laid out
    unlike x would not fit the canonical form shared by all operands."""
    if a.strides == ref.strides:
        return a
    c = np.empty_like(ref)
    np.copyto(c, a)
    return c


# partial parameter-gradient buffers above this many elements per chunk are not worth it (a
# generated, per-position γ): the formula runs
_MAX_PARAM = 1 << 20


# scale below which the dx pass's Q = scale²·m2 would leave x's normal range: √(tiny/eps) per dtype
_MIN_SCALE = {np.dtype(t): float(np.sqrt(np.finfo(t).tiny / np.finfo(t).eps)) for t in (np.float32, np.float64)}


def normalize_backward(xv, shift, scale, dy, gamma, pshape, shape, axes, mode, need=(True, True, True)):
    """(dx on the view, dγ, dβ of ``pshape``) of y = (x − shift)·scale·γ + β in one kernel.

    ``xv``: the view of the input; ``shift`` (``None`` for scaling), ``scale``: keepdims statistics;
    ``dy``: ∂L/∂y on the view; ``gamma`` broadcastable to ``shape`` or ``None``; ``pshape``: the shape
    of γ and β (``None`` when neither exists); ``mode``: "standardizing", "scaling" or "population"
    (statistics constant); ``need``: which of (dx, dγ, dβ) to compute (``None`` for the others).
    Returns ``None`` when declined.
    """
    if shift is None:
        shift = np.zeros((), xv.dtype)
    if not _same_float(xv, dy, gamma, shift, scale) or xv.size == 0:
        return None
    if scale.size and float(scale.min()) < _MIN_SCALE.get(xv.dtype, 0.0):
        # the dx pass stores Q = scale²·mean(γ·u·x̂) in x's dtype; at scale ≲ 3e-16 (float32; ≲ 1e-146
        # float64: inputs of σ ≳ 3e15, 1e146) it would underflow and drop the x̂·m2 term (issue 11). The
        # formula's order scale·(γ·u − m1 − x̂·m2) keeps it: decline (a K-element check).
        return None
    vs = tuple(xv.shape)
    dy = _like(dy, xv)
    g = _param_view(gamma, shape, vs)
    if g is False:
        return None
    need_dx, need_g, need_b = need
    need_g = need_g and gamma is not None
    need_b = need_b and pshape is not None and need_b
    need_p = pshape is not None and (need_g or need_b)
    P = 1
    pidx = None
    if need_p:
        for d in pshape:
            P *= int(d)
        if P > _MAX_PARAM:
            return None
        pidx = _param_view(np.empty(tuple(pshape), np.float64), shape, vs)
        if pidx is False:
            return None
    dx = np.empty_like(xv) if need_dx else xv
    sh_b, sc_b = np.broadcast_to(shift, vs), np.broadcast_to(scale, vs)
    ops = [xv, dy, dx, sh_b, sc_b] + [a for a in (g, pidx) if a is not None]
    lay = _canon(vs, axes, ops)
    if lay is None:
        return None
    gi = 5 if g is not None else None
    pi = (6 if g is not None else 5) if pidx is not None else None
    order = _order(lay, ops, (0, 1, 2) if need_dx else (0, 1), (gi, pi))
    K1, R1, K2, R2, R3 = lay.sizes
    K = K1 * K2
    dt = xv.dtype
    xf, xs = _flat(lay, 0, xv)
    uf, us = _flat(lay, 1, dy)
    df, ds = _flat(lay, 2, dx, True) if need_dx else (np.empty(1, xv.dtype), xs)  # writeable dummy: one compiled type
    mean = _stat2(lay, 3, sh_b, dt).reshape(K)
    sc = _stat2(lay, 4, sc_b, dt).reshape(K)
    gf, gs = _flat(lay, gi, g) if g is not None else (xf, _NONE5)
    ps = tuple(int(s) // 8 for s in lay.perm_strides[pi]) if pi is not None else _NONE5
    size = xv.size
    threads = 1 if size < _serial_below() else _threads()
    code = _MODES[mode]
    if order == "rows":
        nchunk = _chunks(K, threads)
        pg, pb = np.zeros((nchunk, P)), np.zeros((nchunk, P))
        _kf("bwd_rows", size)(xf, xs, uf, us, df, ds, lay.sizes, code, mean, sc, gf, gs, g is not None, ps,
                              need_dx, need_p, nchunk, pg, pb, np.empty((K, 2), dt))
    else:
        fused = K1 >= 2 * threads
        pg, pb = np.zeros((1, P)), np.zeros((1, P))
        _kf("bwd_cols", size)(xf, xs, uf, us, df, ds, lay.sizes, code, mean, sc, gf, gs, g is not None, ps,
                              need_dx, need_p, 1 if fused else _chunks(R1, threads), fused, pg, pb)
    dgamma = pg.sum(axis=0).reshape(pshape).astype(dt) if need_g else None
    dbeta = pb.sum(axis=0).reshape(pshape).astype(dt) if need_b else None
    return (dx if need_dx else None), dgamma, dbeta


def _kf(name: str, size: int):
    """The parallel build of fused kernel ``name``, or its serial build for an input of few elements."""
    from . import _fused as F
    from .config import SERIAL_BELOW

    from . import config

    par, ser = F.KERNELS[name]
    if size < SERIAL_BELOW:
        return ser
    return _parallel_when_ready(F.__name__, name, par, ser) if config.BACKGROUND else _guard(par)


def register() -> None:
    """Register the kernels with normref's kernel registry (called lazily on the first NumPy call)."""
    import importlib.util

    # numba is imported only when a kernel first runs (an input of >= config.MIN_SIZE elements): a
    # tiny input never pays for the import. An ImportError here means numba is not installed, and
    # the loader skips this backend (the formulas run).
    if importlib.util.find_spec("numba") is None:
        raise ImportError("normref.backends.numba needs numba, which is not installed")

    from normref._kernels import register_kernel

    for name, fn in [("moments", moments), ("mean_square", mean_square), ("normalize_forward", normalize_forward),
                     ("normalize_backward", normalize_backward)]:
        fn.accepts = accepts
        register_kernel("numpy", name, fn)
