"""Folding a normalization at inference into the adjacent linear or convolution layer (survey §5.3.2).

At inference every standardization and every whitening of the batch partition uses constants (the
population statistics μ̂, σ̂², Σ̂ and the learned γ, β, Γ), so it is an affine map of its input,
per channel or per group of d consecutive channels (a block-diagonal matrix):

    y_g = A_g·x_g + c_g,    A (G, d, d),  c (C,),  C = G·d,

    standardization (BN, batch renorm, ghost BN, IN with running statistics; d = 1):
        A = γ/√(σ̂² + ε),  c = β − A·μ̂;   Lp BN: A = γ/(k·σ̂_p + ε);   mean-only BN: A = 1, c = β − μ̂;
        scaling only (power norm, MABN; ψ̂² the running mean square): A = γ/√(ψ̂² + ε), c = β
    whitening (DBN/ZCA, PCA, Cholesky, IterNorm, Newton–Schulz; whitening-coloring):
        A_g = diag(γ_g)·W(Σ̂_g + ε·I)  (coloring: Γ_g·W(Σ̂_g + ε·I)),  c_g = β_g − A_g·μ̂_g

(Ioffe & Szegedy 2015 §3.1: "the normalization is simply a linear transform applied to each
activation"; Huang et al. 2018 for whitening: W is computed once from the population covariance).
An affine map next to a linear map folds into it (Jacob et al., CVPR 2018 §3.2, for BN):

- layer before the norm, z = W ⋆ x + b, y = A·z + c:   W' = A·W (over the output channels),
  b' = A·b + c;
- layer after the norm, z = W ⋆ y + b with y = A·x + c:   W'[o, i, k] = Σ_j W[o, j, k]·A[j, i],
  b'[o] = b[o] + Σ_{j,k} W[o, j, k]·c[j].

:func:`inference_affine` gives (A, c) of one normalization from the arguments of its inference call;
:func:`fold` folds it into a weight and bias. ``normref.backends.torch.fold`` folds a whole torch
model. Pure functions on any array API library; nothing is mutated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ._validate import check_bool, check_choice, check_int, check_nonnegative, check_p, check_positive, concrete_any
from ._results import result_tuple
from ._xp import Array, _device_or_none, compute_dtype, namespace, prod, to_compute

__all__ = ["NormAffine", "FoldedLayer", "inference_affine", "fold", "FOLDABLE"]

# per-channel methods: name -> (batch-statistics flag, centre, spread, rule); at inference
# "std": A = γ/√(spread + ε), c = β − A·μ̂;  "lp": A = γ/(k·spread + ε);  "mean": A = 1, c = β − μ̂;
# "scale": A = γ/√(spread + ε), c = β (scaling only: no centring)
_PER_CHANNEL = {
    "batch_norm": ("training", "running_mean", "running_var", "std"),
    "batch_renorm": ("training", "running_mean", "running_var", "std"),
    "ghost_batch_norm": ("training", "running_mean", "running_var", "std"),
    "batch_group_norm": ("training", "running_mean", "running_var", "std"),
    "blended_batch_norm": ("training", "running_mean", "running_var", "std"),
    "memorized_batch_norm": ("training", "running_mean", "running_var", "std"),
    "cross_iteration_batch_norm": ("training", "running_mean", "running_var", "std"),
    "online_norm": ("training", "running_mean", "running_var", "std"),
    "instance_norm": ("use_input_stats", "running_mean", "running_var", "std"),
    "lp_batch_norm": ("training", "running_mean", "running_scale", "lp"),
    "mean_only_batch_norm": ("training", "running_mean", None, "mean"),
    "power_norm": ("training", None, "running_mean_square", "scale"),
    "moving_average_batch_norm": ("training", None, "running_mean_square", "scale"),
}
_WHITENING = ("batch_whitening", "decorrelated_batch_norm", "iter_norm", "whitening_coloring")

#: The registered methods whose inference call is an affine map that :func:`inference_affine` knows.
FOLDABLE = tuple(sorted(_PER_CHANNEL)) + _WHITENING


@result_tuple
class NormAffine(NamedTuple):
    """A normalization at inference as y_g = A_g·x_g + c_g on groups of d consecutive channels.

    ``matrix``: A, shape (G, d, d) (d = 1 for the per-channel methods: (C, 1, 1)); ``shift``: c, shape
    (C,), C = G·d.
    """

    matrix: Array
    shift: Array


@result_tuple
class FoldedLayer(NamedTuple):
    """The folded layer's ``weight`` (the original layer's shape) and ``bias`` (its output channels)."""

    weight: Array
    bias: Array


def _flag(fn: str, method: str, name: str, value: Any) -> None:
    if check_bool(fn, name, value):
        raise ValueError(
            f"{fn}: {method} with {name}=True normalizes by each call's own statistics, which is not an "
            f"affine map of the input; pass {name}=False (the population statistics) to fold it"
        )


def _vector(fn: str, name: str, a: Any, c: int | None) -> int:
    if a.ndim != 1 or (c is not None and a.shape[0] != c):
        want = "a vector (C,)" if c is None else f"shape ({c},), one value per channel"
        raise ValueError(f"{fn}: {name} must be {want}; got shape {tuple(a.shape)}")
    return int(a.shape[0])


def _per_channel(fn: str, name: str, a: dict) -> NormAffine:
    """A = γ·s, c = β − A·μ̂ with s = 1/√(σ̂² + ε) (Lp: 1/(k·σ̂_p + ε); mean-only: s = 1, γ = 1;
    scaling only: μ̂ = 0), by the rule of :data:`_PER_CHANNEL`."""
    flag, centre, spread, rule = _PER_CHANNEL[name]
    _flag(fn, name, flag, a[flag])
    rm = None if centre is None else a[centre]
    rs = None if spread is None else a[spread]
    given = [k for k in (centre, spread) if k is not None]
    if (centre is not None and rm is None) or (spread is not None and rs is None):
        raise ValueError(f"{fn}: {name} at inference needs {' and '.join(given)} (the population statistics); got None")
    weight = a["weight"] if rule != "mean" else None
    bias = a["bias"]
    stats = {k: a[k] for k in given}
    xp = namespace(fn, **stats, weight=weight, bias=bias)
    c = _vector(fn, given[0], stats[given[0]], None)
    for key, v in (*stats.items(), ("weight", weight), ("bias", bias)):
        if v is not None:
            _vector(fn, key, v, c)
    cd = compute_dtype(xp, stats[given[0]].dtype)
    if rule == "mean":
        scale = xp.ones((c,), dtype=cd, device=_device_or_none(rm))  # on the statistics' device
    else:
        eps = check_positive(fn, "eps", a["eps"])  # as the per-channel methods refuse eps <= 0
        s = to_compute(xp, rs, cd)
        if concrete_any(xp, s < 0):
            raise ValueError(f"{fn}: {spread} must be nonnegative (a population spread); it has negative entries")
        if rule == "lp":
            from .operation import LpStandardizing
            from .standardization import _lp_divisor

            p = check_p(fn, a["p"])
            k = LpStandardizing(p=p, l1_factor=check_bool(fn, "l1_factor", a["l1_factor"])).c
            kind = a.get("running_scale_kind", "deviation")
            if kind == "reciprocal":  # running_scale holds 1/s itself (c and ε included)
                den = 1.0 / s
            elif kind == "deviation":  # s = k·σ̂_p + ε, or ((k·σ̂_p)^p + ε)^{1/p} with ε inside
                den = _lp_divisor(xp, s, p, k, eps, a.get("eps_placement", "outside") == "inside")
            else:
                raise ValueError(f"{fn}: running_scale_kind must be 'deviation' or 'reciprocal'; got {kind!r}")
        elif name == "batch_renorm" and a.get("running_stat", "var") == "std":
            den = s  # Algorithm 1's running σ (ε already inside it)
        else:
            den = xp.sqrt(s + eps)
        if concrete_any(xp, den == 0):
            raise ValueError(f"{fn}: {spread} + eps must be positive; a channel has {spread} = 0 with eps = 0")
        scale = 1.0 / den
    mat = scale if weight is None else to_compute(xp, weight, cd) * scale
    shift = xp.zeros((c,), dtype=cd, device=_device_or_none(rs)) if rm is None else -mat * to_compute(xp, rm, cd)
    if bias is not None:
        shift = to_compute(xp, bias, cd) + shift
    return NormAffine(xp.reshape(mat, (c, 1, 1)), shift)


def _whitening_affine(fn: str, name: str, a: dict) -> NormAffine:
    """A_g = diag(γ_g)·W_g (coloring: Γ_g·W_g), W_g = W(Σ̂_g + ε·I) by the method's operation, c = β − A·μ̂."""
    from . import matfun as _mf
    from . import whitening as _wh

    _flag(fn, name, "training", a["training"])
    if name == "batch_whitening" and a["partition"] != "batch":
        raise ValueError(
            f"{fn}: batch_whitening with partition={a['partition']!r} whitens by each call's own statistics "
            f"(only partition='batch' keeps population statistics), which is not an affine map of the input"
        )
    rm, rc, weight, bias = a["running_mean"], a["running_cov"], a["weight"], a["bias"]
    if rm is None or rc is None:
        raise ValueError(f"{fn}: {name} at inference needs running_mean and running_cov; got None")
    xp = namespace(fn, running_mean=rm, running_cov=rc, weight=weight, bias=bias)
    c = _vector(fn, "running_mean", rm, None)
    gs = c if a["group_size"] is None else check_int(fn, "group_size", a["group_size"])
    if c % gs:
        raise ValueError(f"{fn}: group_size must divide the channel count {c}; got {gs}")
    g = c // gs
    if tuple(rc.shape) != (g, gs, gs):
        raise ValueError(f"{fn}: running_cov must have shape (C/group_size, group_size, group_size) = "
                         f"({g}, {gs}, {gs}); got {tuple(rc.shape)}")
    coloring = name == "whitening_coloring"
    if weight is not None:
        want = (g, gs, gs) if coloring else (c,)
        if tuple(weight.shape) != want:
            raise ValueError(f"{fn}: weight must have shape {want}; got {tuple(weight.shape)}")
    if bias is not None:
        _vector(fn, "bias", bias, c)
    eps = check_nonnegative(fn, "eps", a["eps"])
    meth, iterations = "zca", 5
    if name in ("batch_whitening", "whitening_coloring"):
        meth = _wh._check_method(fn, a["method"])
        iterations = _mf.check_iterations(fn, "iterations", a["iterations"], minimum=1)
    elif name == "iter_norm":  # iter_norm's own choice between the uncoupled and the coupled form
        iterations = _mf.check_iterations(fn, "iterations", a["iterations"], minimum=1)
        coupled = a["coupled"]
        if coupled is not None:
            coupled = check_bool(fn, "coupled", coupled)
        stable = coupled if coupled is not None else iterations > _wh.ITERNORM_STABLE_T
        meth = "newton_schulz" if stable else "iternorm"
    cd = compute_dtype(xp, rm.dtype)
    running = a.get("running", "covariance")
    if running == "whitening_matrix":
        # running="whitening_matrix" (DBN/IterNorm authors' rule): running_cov holds the running
        # whitening matrix Ŵ itself, and the inference call is (x − μ̂)·Ŵ: A = Ŵ, no ε, no iteration
        w = to_compute(xp, rc, cd)
    elif running != "covariance":
        raise ValueError(f"{fn}: running must be one of {_wh.RUNNING_STATES}; got {running!r}")
    else:
        _wh._warn_unstable(fn, meth, iterations)
        cov = to_compute(xp, rc, cd)
        if a.get("shrinkage"):  # whitening_coloring(shrinkage=True) at inference: (1 − ε)·Σ̂ + ε·I
            cov = (1.0 - eps) * cov
        sigma = cov + eps * _mf.eye_like(xp, cov)  # as the inference call forms it: Σ̂ + ε·I
        w, _ = _wh._operator(fn, xp, sigma, meth, iterations, eps, "running_cov")  # the method's checks too
        if meth == "cholesky":  # the operator is the factor L; W = L^-1
            w = _mf.triangular_inverse(xp, w)
    if weight is not None:
        w = xp.matmul(to_compute(xp, weight, cd), w) if coloring else xp.reshape(to_compute(xp, weight, cd), (g, gs, 1)) * w
    shift = -xp.reshape(xp.matmul(w, xp.reshape(to_compute(xp, rm, cd), (g, gs, 1))), (c,))
    if bias is not None:
        shift = to_compute(xp, bias, cd) + shift
    return NormAffine(w, shift)


def inference_affine(method: str, /, *args: Any, **kwargs: Any) -> NormAffine:
    """The affine map y_g = A_g·x_g + c_g of a normalization's inference call.

    ``args``/``kwargs`` are the arguments of ``normref.<method>``'s inference call without the input
    (positional ones from the second on): ``inference_affine("batch_norm", running_mean, running_var,
    weight, bias, eps=1e-5)`` is the map x ↦ ``normref.batch_norm(x, running_mean, running_var,
    weight, bias, eps=1e-5)``. Per channel (d = 1), with s the population spread::

        A = γ/√(σ̂² + ε)   (batch_norm, batch_renorm, ghost_batch_norm, batch_group_norm,
                            blended_batch_norm, memorized_batch_norm, cross_iteration_batch_norm,
                            online_norm; instance_norm with ``use_input_stats=False``),
        A = γ/(k·σ̂_p + ε)  (lp_batch_norm),   c = β − A·μ̂;
        mean_only_batch_norm: A = 1, c = β − μ̂;
        power_norm, moving_average_batch_norm (scaling only): A = γ/√(ψ̂² + ε), c = β
        (ψ̂² = ``running_mean_square``);

    per group of d = ``group_size`` channels (batch_whitening with ``partition="batch"``,
    decorrelated_batch_norm, iter_norm, whitening_coloring)::

        A_g = diag(γ_g)·W(Σ̂_g + ε·I)   (whitening_coloring: Γ_g·W(Σ̂_g + ε·I)),   c_g = β_g − A_g·μ̂_g,

    with W the method's whitening matrix (zca Σ^-1/2, pca Λ^-1/2·Dᵀ, cholesky L^-1, iternorm /
    newton_schulz T Newton steps; iter_norm's choice between them as it makes it), computed by the
    same operation and with the same checks as the inference call.

    Parameters
    ----------
    method : str
        A name in :data:`FOLDABLE`.
    *args, **kwargs
        The method's arguments after ``input``. The batch-statistics flag must select the population
        statistics (``training=False``; instance_norm: ``use_input_stats=False``).

    Returns
    -------
    NormAffine
        ``matrix`` A (G, d, d) and ``shift`` c (C,), in the statistics' compute dtype (float32 for
        float16/bfloat16) and library.

    Raises
    ------
    ValueError
        An unknown or non-affine method (a per-sample or batch-statistics normalization), missing
        population statistics, shapes that do not match, a spread with a zero ``spread + eps``, or a
        covariance the method would refuse.
    TypeError
        Arguments that do not fit the method's signature, non-array statistics, mixed libraries.

    Notes
    -----
    Survey §5.3.2 (inference with population statistics) and §5.1.2 (whitening); the per-channel
    formulas follow each method's own conventions (eps inside the square root as torch does; the
    running variance unbiased, as stored). Exact: the map equals the method's inference output up to
    rounding (tests/test_folding.py).

    References
    ----------
    Ioffe & Szegedy, Batch Normalization, ICML 2015 (§3.1, Algorithm 2); Huang et al., Decorrelated
    Batch Normalization, CVPR 2018; Jacob et al., Quantization and Training of Neural Networks for
    Efficient Integer-Arithmetic-Only Inference, CVPR 2018 (§3.2, folding).
    """
    fn = "inference_affine"
    from .registry import get

    name = get(method).name if not isinstance(method, str) or method in FOLDABLE else None
    if name not in FOLDABLE:
        raise ValueError(
            f"{fn}: method must be one whose inference is an affine map of its input, one of {', '.join(FOLDABLE)}; "
            f"got {method!r}"
        )
    if "input" in kwargs:
        raise TypeError(f"{fn}: pass the method's arguments without input (the map is of the input)")
    a = get(name).bind(None, *args, **kwargs).arguments
    if name in _PER_CHANNEL:
        return _per_channel(fn, name, a)
    return _whitening_affine(fn, name, a)


def _norm_affine(fn: str, norm: Any) -> NormAffine:
    if isinstance(norm, Mapping):
        if "method" not in norm:
            raise TypeError(f"{fn}: a norm given as a mapping needs a 'method' key (and the inference call's "
                            f"arguments); got keys {sorted(norm)}")
        rest = {k: v for k, v in norm.items() if k != "method"}
        return inference_affine(norm["method"], **rest)
    if isinstance(norm, tuple) and len(norm) == 2:
        return NormAffine(*norm)
    raise TypeError(f"{fn}: norm must be a NormAffine (matrix, shift) or a mapping {{'method': ..., **arguments}}; "
                    f"got {type(norm).__name__}")


def fold(norm: Any, weight: Array, bias: Array | None = None, *, layer: str = "before", groups: int = 1) -> FoldedLayer:
    """Fold a normalization at inference, y_g = A_g·x_g + c_g, into the adjacent linear/convolution layer.

    ``layer="before"`` (the layer feeds the norm: z = W ⋆ x + b, then y = A·z + c):

        W'[o] = Σ_{o'} A[o, o']·W[o'],   b' = A·b + c     (o, o' output channels of one group);

    ``layer="after"`` (the norm feeds the layer: z = W ⋆ (A·x + c) + b):

        W'[o, i, k] = Σ_j W[o, j, k]·A[j, i],   b'[o] = b[o] + Σ_{j,k} W[o, j, k]·c[j]

    (j, i input channels of one group, k the kernel positions). The folded layer computes exactly
    what the pair computes (to rounding), with the original layer's shape, stride, dilation and groups.

    Parameters
    ----------
    norm : NormAffine, or a mapping ``{"method": name, **arguments}``
        The normalization's (A, c) from :func:`inference_affine`, or the arguments to get it.
    weight : array
        A convolution weight ``(C_out, C_in/groups, *kernel)`` in torch's layout (NCHW activations), or a
        linear weight (out_features, in_features). ``layer="before"``: C_out (out_features) must be
        the norm's C. ``layer="after"``: the layer's input channels, groups·C_in/groups for a
        convolution, must be C; a linear layer's in_features may be C·P, the features of a
        flattened ``(C, *spatial)`` activation (channel-major, as ``torch.nn.Flatten``).
    bias : array or None, default None
        The layer's bias (its output channels); ``None`` is 0. The folded layer always has one.
    layer : {"before", "after"}, default "before"
        Where the layer sits relative to the norm.
    groups : int, default 1
        The convolution's groups (1 for a linear layer). Each group of d channels of a whitening must
        lie within one convolution group (d divides the channels per group), or the folded weight
        would mix groups: refused (``ValueError``).

    Returns
    -------
    FoldedLayer
        ``weight`` (the given weight's shape) and ``bias`` (C_out,), in the weight's dtype (computed in
        the wider of the weight's and the norm's compute dtypes) and library.

    Notes
    -----
    Survey §5.3.2 (population statistics at inference): every standardization and whitening of the
    batch partition is affine at inference (:func:`inference_affine`), so it folds, whitening
    included (``torch.ao.nn.intrinsic``'s ``fuse_conv_bn_eval`` stops at BN). ``layer="after"`` with a
    convolution is exact only when the convolution does not pad with zeros (``padding=0``, or
    replicate/reflect/circular padding, which commute with an affine map): a zero border of y is the
    border A⁻¹(0 − c) of x, not a zero one. :func:`fold` cannot see the padding; the torch helper
    checks it.

    References
    ----------
    Jacob et al., Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference, CVPR 2018 (§3.2: batch normalization folding); Ioffe & Szegedy, ICML 2015 (§3.1);
    Huang et al., Decorrelated Batch Normalization, CVPR 2018.
    """
    fn = "fold"
    layer = check_choice(fn, "layer", layer, ("before", "after"))
    groups = check_int(fn, "groups", groups)
    mat, shift = _norm_affine(fn, norm)
    xp = namespace(fn, matrix=mat, shift=shift, weight=weight, bias=bias)
    if mat.ndim != 3 or mat.shape[1] != mat.shape[2] or shift.ndim != 1 or mat.shape[0] * mat.shape[1] != shift.shape[0]:
        raise ValueError(f"{fn}: norm must hold matrix (G, d, d) and shift (G·d,); got shapes "
                         f"{tuple(mat.shape)} and {tuple(shift.shape)}")
    c, d = int(shift.shape[0]), int(mat.shape[1])
    g = c // d
    if weight.ndim < 2:
        raise ValueError(f"{fn}: weight must be a linear (out, in) or convolution (C_out, C_in/groups, *kernel) "
                         f"weight; got shape {tuple(weight.shape)}")
    if weight.ndim == 2 and groups != 1:
        raise ValueError(f"{fn}: a linear weight (2-d) takes groups=1; got groups={groups}")
    shape = tuple(int(s) for s in weight.shape)
    c_out = shape[0]
    if c_out % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the output channels weight.shape[0] = {c_out}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{fn}: bias must have shape ({c_out},), one value per output channel; got {tuple(bias.shape)}")
    cd = xp.result_type(compute_dtype(xp, weight.dtype), compute_dtype(xp, mat.dtype))
    w = to_compute(xp, weight, cd)
    a, cv = to_compute(xp, mat, cd), to_compute(xp, shift, cd)
    b = xp.zeros((c_out,), dtype=cd, device=_device_or_none(weight)) if bias is None else to_compute(xp, bias, cd)
    if layer == "before":
        if c_out != c:
            raise ValueError(f"{fn}: layer='before' needs the layer's output channels weight.shape[0] = the norm's "
                             f"channels {c}; got {c_out}")
        if (c // groups) % d:
            raise ValueError(f"{fn}: the norm's groups of {d} channels must lie within the convolution's groups of "
                             f"{c // groups} output channels (d must divide C_out/groups); refused, folding would "
                             f"mix convolution groups")
        # W' = A·W per block of d output channels; b' = A·b + c
        wf = xp.reshape(xp.matmul(a, xp.reshape(w, (g, d, prod(shape[1:])))), shape)
        bf = xp.reshape(xp.matmul(a, xp.reshape(b, (g, d, 1))), (c,)) + cv
    else:
        per = shape[1] if weight.ndim > 2 else c  # input channels per group (linear: the norm's C)
        if weight.ndim > 2 and groups * per != c:
            raise ValueError(f"{fn}: layer='after' needs the convolution's input channels groups·weight.shape[1] = "
                             f"{groups}·{per} = {groups * per} to be the norm's channels {c}")
        if weight.ndim == 2 and shape[1] % c:
            raise ValueError(f"{fn}: layer='after' needs a linear layer's in_features weight.shape[1] = {shape[1]} to be "
                             f"a multiple of the norm's channels {c} (the flattened (C, *spatial) features)")
        if per % d:
            raise ValueError(f"{fn}: the norm's groups of {d} channels must lie within the convolution's groups of "
                             f"{per} input channels (d must divide C_in/groups); refused, folding would mix "
                             f"convolution groups")
        k = prod(shape[2:]) if weight.ndim > 2 else shape[1] // c
        og, nb = c_out // groups, per // d
        w5 = xp.reshape(w, (groups, og, nb, d, k))  # W[q, o, b, j, k]: group q, output o, block b, member j
        a4 = xp.reshape(a, (groups, nb, d, d))
        # W'[q, o, b, i, k] = Σ_j W[q, o, b, j, k]·A[q, b, j, i], one batched matmul over (q, b)
        wt = xp.reshape(xp.permute_dims(w5, (0, 2, 1, 4, 3)), (groups, nb, og * k, d))
        wf = xp.permute_dims(xp.reshape(xp.matmul(wt, a4), (groups, nb, og, k, d)), (0, 2, 1, 4, 3))
        wf = xp.reshape(wf, shape)
        # b'[q, o] = b[q, o] + Σ_{b, j} (Σ_k W[q, o, b, j, k])·c[q, b, j]
        ws = xp.reshape(xp.sum(w5, axis=4), (groups, og, nb * d))
        bf = b + xp.reshape(xp.matmul(ws, xp.reshape(cv, (groups, nb * d, 1))), (c_out,))
    return FoldedLayer(xp.astype(wf, weight.dtype), xp.astype(bf, weight.dtype))
