"""The tolerances of the conformance suite: one formula per kind of check, the same for every method.

Every tolerance is a multiple of the dtype's unit roundoff ε (``finfo(dtype).eps``) times the case's
conditioning ``cond``. Nothing here is tuned per method; the constants are per *kind* of comparison
and explained below. ``cond`` is the larger of

- the registry's estimate ``Example.cond`` (1 for a benign case, larger where the example's author
  knows the problem amplifies rounding, e.g. nearly equal eigenvalues in whitening), and
- the measured sensitivity κ of the float64 result to what a lower precision rounds: random relative
  perturbations of size δ = 2^-26 of the inputs (forward), or of the residual arrays and the cotangent
  (backward), κ = max ‖f(a·(1 + δu)) − f(a)‖∞ / (δ·‖f(a)‖∞) over two draws of u ∈ [−1, 1]. This is
  what makes a gradient that is small because its terms cancel (group normalization with two values per
  group: dx = s·(g − mean g − x̂·mean(g·x̂)) ≈ 0 while each term is ≈ s·g) get the tolerance the
  cancellation forces on every implementation, without a per-method constant.

The finite-difference and Hessian-vector checks use the measured κ alone, ``max(1, κ_f, κ_b)``,
never the registry's estimate: a constant written next to an example cannot loosen the checks that
certify the backward itself. Invariants use the registry's ``cond``.

- values (forward outputs, analytic gradients against the float64 NumPy evaluation of the same
  rounded inputs): the normwise relative error ‖a − ref‖∞ / ‖ref‖∞ must be below
  ``K_VALUE · cond · ε``. Rounding the output to the dtype costs ε/2; the reductions of normalization
  (means, variances, Σg, Σg·x̂ over n ≤ a few hundred elements) cost a few ε more, and the
  standardization backward's subtraction g − mean(g) − x̂·mean(g·x̂) loses at most a few bits to
  cancellation. K_VALUE = 32 (five bits) covers these with room, while any wrong term (a sign, a
  missing mean, a misplaced ε) is orders of magnitude larger in float64.
- two computations that both carry that error (autograd vs analytic backward on the same library and
  dtype; one library against another): the sum of their tolerances, 2 · K_VALUE · cond · ε.
- invariants: ``Invariant.scale · cond · ε`` with the scale the registry gives the invariant.
- finite differences (float64): central differences with h = ε^{1/3} have truncation plus round-off
  error ≈ ε^{2/3}·(|f'''|/|f'| + |f|/|f'|) ≈ 4e-11 for a unit-scaled smooth problem; the relative
  error must stay below ``K_FD · cond · ε^{2/3}`` with K_FD = 2^12, room for third derivatives up to
  ~10^3 times the first (normalizations divide by σ, and 1/σ³ terms appear in f''') while a wrong term
  (relative error ≳ 10^-3) still fails by orders of magnitude. The second-order (Hessian-vector)
  check differentiates s(a) = Σ⟨w, backward⟩, whose value can be much larger than its derivative;
  besides the central difference it computes the fourth-order stencil
  (8(s(h) − s(−h)) − (s(2h) − s(−2h)))/12h with h = ε^{1/5} (error ≈ ε^{4/5}·|s|/|s'|), and the
  autograd value must agree with either estimate within the same bound.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EPS", "K_VALUE", "K_FD", "DELTA", "eps", "sensitivity", "cond_text", "value_tol", "pair_tol", "invariant_tol", "fd_tol", "legend"]

EPS = {
    "float64": float(np.finfo(np.float64).eps),  # 2^-52
    "float32": float(np.finfo(np.float32).eps),  # 2^-23
    "float16": float(np.finfo(np.float16).eps),  # 2^-10
    "bfloat16": 2.0**-7,  # 8 significand bits
}
K_VALUE = 32.0
K_FD = 2.0**12


def eps(dtype: str) -> float:
    """The unit roundoff of a dtype named by string."""
    try:
        return EPS[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(EPS)}") from None


def _g(x: float) -> str:
    return f"{x:.3g}"


DELTA = 2.0**-26


def sensitivity(fn, arrays: list, rng, samples: int = 2) -> float:
    """Measured κ: the largest ‖fn(a·(1 + δu)) − fn(a)‖∞ / (δ·‖fn(a)‖∞) over outputs and draws.

    ``arrays`` are NumPy float64 arrays (other entries pass through unperturbed); ``fn`` maps such a
    list to a list of NumPy arrays (``None`` entries ignored).
    """
    base = fn(arrays)
    worst = 0.0
    for _ in range(samples):
        pert = [
            a * (1.0 + DELTA * rng.uniform(-1.0, 1.0, a.shape))
            if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
            for a in arrays
        ]
        for b, o in zip(base, fn(pert)):
            if b is None or o is None or np.size(b) == 0:
                continue
            b, o = np.asarray(b, np.float64), np.asarray(o, np.float64)
            s = float(np.max(np.abs(b)))
            if s > 0 and np.all(np.isfinite(o)):
                worst = max(worst, float(np.max(np.abs(o - b))) / (DELTA * s))
    return worst


def cond_text(cond: float, registry: float | None = None, measured: float | None = None) -> str:
    if measured is None:
        return _g(cond)
    if registry is None:
        return f"{_g(cond)} [max(1, measured {_g(measured)})]"
    return f"{_g(cond)} [max(registry {_g(registry)}, measured {_g(measured)})]"


def value_tol(dtype: str, cond: float = 1.0, cond_desc: str | None = None) -> tuple[float, str]:
    """(tolerance, formula) for a value compared with the float64 reference."""
    t = K_VALUE * cond * eps(dtype)
    return t, f"{K_VALUE:g}·cond·ε({dtype}) = {K_VALUE:g}·{cond_desc or _g(cond)}·{_g(eps(dtype))} = {_g(t)}"


def pair_tol(dtype: str, cond: float = 1.0, cond_desc: str | None = None) -> tuple[float, str]:
    """(tolerance, formula) for two computations that each carry the value error."""
    t = 2 * K_VALUE * cond * eps(dtype)
    return t, f"2·{K_VALUE:g}·cond·ε({dtype}) = 2·{K_VALUE:g}·{cond_desc or _g(cond)}·{_g(eps(dtype))} = {_g(t)}"


def invariant_tol(scale: float, dtype: str, cond: float = 1.0) -> tuple[float, str]:
    """(tolerance, formula) for an invariant's residual."""
    t = scale * cond * eps(dtype)
    return t, f"scale·cond·ε({dtype}) = {scale:g}·{_g(cond)}·{_g(eps(dtype))} = {_g(t)}"


def fd_tol(cond: float = 1.0, cond_desc: str | None = None) -> tuple[float, str]:
    """(tolerance, formula) for a float64 central-difference comparison (relative error)."""
    e23 = EPS["float64"] ** (2.0 / 3.0)
    t = K_FD * cond * e23
    return t, f"2^12·cond·ε(float64)^(2/3) = {K_FD:g}·{cond_desc or _g(cond)}·{_g(e23)} = {_g(t)}"


def legend(dtypes) -> list[str]:
    """Lines explaining every tolerance, with its value at cond = 1 for the dtypes in use."""
    lines = [
        "values vs float64 NumPy (same rounded inputs):  ‖a − ref‖∞/‖ref‖∞ ≤ 32·cond·ε   "
        + ", ".join(f"{d} {value_tol(d)[0]:.2g}" for d in dtypes),
        "autograd vs analytic, library vs library:       ≤ 2·32·cond·ε   "
        + ", ".join(f"{d} {pair_tol(d)[0]:.2g}" for d in dtypes),
        "invariants:                                     residual ≤ scale·cond·ε (scale from the registry)",
        f"finite differences, Hessian-vector (float64):   relative error ≤ 2^12·κ·ε^(2/3) = {fd_tol()[0]:.2g}",
        "cond: max(the example's estimate in the registry, the measured sensitivity κ of the float64 result "
        "to relative perturbations of its inputs (forward) or residuals and cotangent (backward)); the "
        "derivative checks use max(1, κ) alone. Cells show the largest error / tolerance (pass < 1).",
    ]
    return lines
