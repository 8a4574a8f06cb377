"""Native triangular solves, registered as the ``solve_triangular`` kernel of each array library.

:func:`normref.matfun.solve_triangular` computes X with op(L)·X = B (op(L) = L or Lᵀ, L triangular,
batch axes broadcast). The array API has no triangular solve, so its formula is the general
``xp.linalg.solve`` (an LU factorization of L, ~d³ more work and no use of the structure); these
kernels are the libraries' own forward/back substitutions (d²·k flops), the same X:

- torch: ``torch.linalg.solve_triangular``;
- JAX: ``jax.scipy.linalg.solve_triangular``;
- NumPy: ``scipy.linalg.solve_triangular`` (batched and broadcasting since SciPy 1.15; with an older
  SciPy the kernel declines, without SciPy nothing is registered, and the formula runs).

Loaded through the ``normref.kernels`` entry points on the first use of the library's arrays, like
the numba kernels; ``use_kernels(False)`` runs the array-API formula instead.
"""

from __future__ import annotations

from normref._kernels import register_kernel

__all__ = ["register_torch", "register_jax", "register_numpy"]


def register_torch() -> None:
    import torch

    def solve(chol, b, lower, transpose):
        # op(L)·X = B solved as Xᵀ·op(L)ᵀ = Bᵀ (left=False): the same substitution, but torch's CPU
        # kernel runs it 2-4× faster on the (d × m) sample blocks of whitening (measured)
        if transpose:  # Lᵀ·X = G  ⇔  Xᵀ·L = Gᵀ
            return torch.linalg.solve_triangular(chol, b.mT, upper=not lower, left=False).mT
        return torch.linalg.solve_triangular(chol.mT, b.mT, upper=lower, left=False).mT

    register_kernel("torch", "solve_triangular", solve)


def register_jax() -> None:
    import jax.scipy.linalg as jsl

    def solve(chol, b, lower, transpose):
        return jsl.solve_triangular(chol, b, trans=1 if transpose else 0, lower=lower)

    register_kernel("jax", "solve_triangular", solve)


def register_numpy() -> None:
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        return
    state: list = []

    def solve(chol, b, lower, transpose):
        # SciPy is imported on the first solve, not when NumPy arrays are first seen (it would cost
        # every normref user a fraction of a second); an older SciPy solves one matrix at a time, so
        # the kernel declines (None) and the formula runs
        if not state:
            import scipy
            import scipy.linalg as sl

            major, minor = (int(v) for v in scipy.__version__.split(".")[:2])
            state.append(sl if (major, minor) >= (1, 15) else None)
        sl = state[0]
        if sl is None:
            return None
        return sl.solve_triangular(chol, b, trans=1 if transpose else 0, lower=lower, check_finite=False)

    register_kernel("numpy", "solve_triangular", solve)
