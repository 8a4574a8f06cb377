"""Local normalization: statistics over a sliding window of neighbouring channels (survey Table 1,
Π_PN with local channels: local response normalization).

Local response normalization (Krizhevsky, Sutskever & Hinton, NeurIPS 2012), with torch's window:

    s_i = k + (α/n)·Σ_{j = i − ⌊n/2⌋}^{i + ⌊(n−1)/2⌋} x_j²        (zero outside the channels)
    y_i = x_i·s_i^{−β}

Backward: with W(i) the window of channel i, j ∈ W(i) ⟺ i ∈ Wᵀ(j) = [j − ⌊(n−1)/2⌋, j + ⌊n/2⌋], so

    dx_j = g_j·s_j^{−β} − (2αβ/n)·x_j·Σ_{i ∈ Wᵀ(j)} g_i·x_i·s_i^{−β−1}.

With ``alpha_scaling="none"`` (AlexNet's paper, TensorFlow) α replaces α/n in both.
"""

from __future__ import annotations

from typing import Any

from ._validate import check_choice, check_int, check_ndim, check_nonnegative, check_positive
from ._xp import Array, compute_dtype, namespace, to_compute
from .registry import Example, Residuals, method

__all__ = ["local_response_norm"]

#: how α is scaled: "size" α/n (torch, Caffe), "none" α (AlexNet's paper, TensorFlow)
ALPHA_SCALINGS = ("size", "none")


def _shift(xp, t, d: int):
    """out[:, i] = t[:, i + d] along the channel axis, zero where i + d falls outside."""
    c = t.shape[1]
    if d == 0:
        return t
    if abs(d) >= c:
        return xp.zeros_like(t)
    pad = xp.zeros_like(t[:, : abs(d), ...])
    if d > 0:
        return xp.concat([t[:, d:, ...], pad], axis=1)
    return xp.concat([pad, t[:, : c + d, ...]], axis=1)


def _window_sum(xp, t, lo: int, hi: int):
    """Σ_{d=−lo}^{hi} t[:, i + d]: the channel-window sum (n small: a few shifted adds)."""
    acc = t
    for d in range(-lo, hi + 1):
        if d != 0:
            acc = acc + _shift(xp, t, d)
    return acc


def _ex_lrn(rng):
    yield Example((rng.standard_normal((2, 7, 3)), 3), {}, label="size 3, 1-D spatial")
    yield Example((rng.standard_normal((2, 6, 3, 2)), 4), dict(alpha=0.5, beta=0.75, k=1.0), label="even size 4, strong alpha")
    yield Example((rng.standard_normal((1, 5, 2, 2, 2)), 5), dict(alpha=1.0, beta=0.5, k=2.0), label="3-D spatial")
    yield Example((rng.standard_normal((2, 3, 4)), 9), dict(alpha=2.0), label="window wider than the channels")
    yield Example((rng.standard_normal((2, 6, 3)), 5), dict(alpha=0.1, beta=0.75, k=2.0, alpha_scaling="none"),
                  label="AlexNet's alpha (not divided by n)")


@method(
    channels=("input",),
    array_params=("input",),
    survey="Table 1 (local response normalization: Π_PN over local channels, scaling)",
    paper="Krizhevsky, Sutskever & Hinton, ImageNet Classification with Deep CNNs, NeurIPS 2012",
    examples=_ex_lrn,
)
def local_response_norm(input: Any, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
                        alpha_scaling: str = "size") -> Array:
    """Local response normalization, with ``torch.nn.functional.local_response_norm``'s arguments.

    y_i = x_i·(k + (α/n)·Σ_{j∈W(i)} x_j²)^{−β}, W(i) the ``size`` = n channels around i (⌊n/2⌋ before,
    ⌊(n−1)/2⌋ after, zero-padded; torch's window).

    A window wider than the channels is clipped to them (at most C − 1 channels on each side): every
    channel past the edge is zero padding, so the sum, and the result, are unchanged, while the
    work is bounded by C whatever ``size`` (α/n keeps the given n).

    Parameters
    ----------
    input : array, shape ``(N, C, *spatial)``
        The input.
    size : int
        n, the channels in the window.
    alpha : float, default 1e-4
        α.
    beta : float, default 0.75
        β.
    k : float, default 1.0
        k.
    alpha_scaling : str, default "size"
        ``"size"``: α/n multiplies the window sum, as ``torch.nn.functional.local_response_norm`` (an
        average over the window) and Caffe's ``LRN`` layer do; ``"none"``: α itself, as in the
        AlexNet paper's formula (Krizhevsky et al. 2012, §3.3: k = 2, n = 5, α = 1e-4, β = 0.75) and
        TensorFlow's ``tf.nn.local_response_normalization`` (whose window is 2·depth_radius + 1).
        The two agree with α_none = α_size/n. The window is torch's either way: for odd n it is the
        paper's j = i − n/2 … i + n/2 (n/2 rounded down); for even n the paper's bounds would span
        n + 1 channels, torch's (and normref's) n.

    Returns
    -------
    out : array
        The output, input's shape and dtype.

    Notes
    -----
    Survey §5.1.1 (local response normalization). Conventions: normref follows torch (the window and
    α/n; checked against ``torch.nn.functional.local_response_norm`` in the tests); the paper's
    unscaled α by ``alpha_scaling="none"``.

    References
    ----------
    .. [1] A. Krizhevsky, I. Sutskever and G. E. Hinton, "ImageNet Classification with Deep
       Convolutional Neural Networks", NeurIPS 2012, §3.3.
    """
    fn = "local_response_norm"
    xp = namespace(fn, input=input)
    check_ndim(fn, "input", input, min_ndim=3, what="(N, C, *spatial) with at least one spatial axis")
    size = check_int(fn, "size", size)
    alpha = check_nonnegative(fn, "alpha", alpha)
    beta = check_nonnegative(fn, "beta", beta)
    k = check_positive(fn, "k", k)
    alpha_scaling = check_choice(fn, "alpha_scaling", alpha_scaling, ALPHA_SCALINGS)
    a = alpha / size if alpha_scaling == "size" else alpha  # the coefficient a of the window sum
    cd = compute_dtype(xp, input.dtype)
    x = to_compute(xp, input, cd)
    lo, hi = _window(size, input.shape[1])
    s = k + a * _window_sum(xp, x * x, lo, hi)
    y = x * s ** (-beta)
    if y.dtype != input.dtype:
        y = xp.astype(y, input.dtype)
    return y, Residuals((x, s), (size, a, beta))


def _window(size: int, c: int) -> tuple[int, int]:
    """(channels before, channels after) of torch's window of ``size``, clipped to C − 1 each: the
    shifts past the channel edge add zeros only (``_shift`` returns zeros for |d| ≥ C)."""
    cap = max(int(c) - 1, 0)
    return min(size // 2, cap), min((size - 1) // 2, cap)


@local_response_norm.defbackward
def _lrn_backward(res: Residuals, g):
    x, s = res.arrays
    size, a, beta = res.static
    xp = namespace("local_response_norm.backward", cotangent=g)
    g = to_compute(xp, g, x.dtype)
    lo, hi = _window(size, x.shape[1])
    q = g * x * s ** (-beta - 1.0)
    # the adjoint of the window sum is the sum over the transposed window [−hi, lo]; a = α/n or α
    dx = g * s ** (-beta) - (2.0 * a * beta) * x * _window_sum(xp, q, hi, lo)
    return (dx,)

