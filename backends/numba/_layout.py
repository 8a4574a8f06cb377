"""Canonical layout: any partition of a strided NumPy array as a 5-D view (K1, R1, K2, R2, R3).

A statistic is indexed by (k1, k2) and reduced over (r1, r2, r3). The axes of the partition's view
are put in memory order (largest stride first), neighbours of the same kind (kept K / reduced R) are
merged where every operand allows it, and the blocks are placed into the slot pattern K R K R R.
The blocks are placed right-aligned (innermost block in the last slot of its kind). This covers
every partition of the framework in both layouts, e.g. (N, C, H, W) contiguous:

    batch      (1, N, C, 1, HW)      channels-last batch   (1, NHW, C, 1, 1)
    instance   (N, 1, C, 1, HW)      channels-last         (N, HW, C, 1, 1)
    group      (N, 1, G, C/G, HW)    channels-last         (N, HW, G, 1, C/G)
    layer/RMS  (1, 1, M, 1, K)       position              (N, C, HW, 1, 1)
    batch_group (Gb, N/Gb, G, C/G, HW)

(instance norm without affine parameters merges N and C: (1, 1, NC, 1, HW)).

Nothing is copied: the 5-D arrays are ``as_strided`` views of the operands (broadcast parameters
keep their zero strides). A layout that does not fit (negative strides, interleaved kinds) gives
``None`` and the caller declines, so the array-API formula runs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

SLOTS = ("K", "R", "K", "R", "R")


class Layout:
    """The 5-D canonical form of operands that share the view shape ``shape``."""

    __slots__ = ("shape", "sizes", "k_axes", "perm_strides")

    def __init__(self, shape, sizes, k_axes, perm_strides):
        self.shape = shape  # the view shape
        self.sizes = sizes  # (K1, R1, K2, R2, R3)
        self.k_axes = k_axes  # (axes merged into K1, axes merged into K2), in memory order
        self.perm_strides = perm_strides  # per operand: 5 strides in bytes

    def view(self, i: int, a: np.ndarray, write: bool = False) -> np.ndarray:
        """Operand ``i`` as a 5-D view; read-only unless ``write`` (one numba type per role, so each
        kernel compiles once per dtype and not once per combination of writeable flags)."""
        return as_strided(a, shape=self.sizes, strides=self.perm_strides[i], writeable=write)

    def stat_to_view(self, s2: np.ndarray) -> np.ndarray:
        """A (K1, K2) array of statistics as keepdims on the view shape (no copy)."""
        k1, k2 = self.k_axes
        axes = list(k1) + list(k2)
        t = s2.reshape(tuple(self.shape[a] for a in axes))
        t = t.transpose(np.argsort(axes))
        keep = [self.shape[a] if a in axes else 1 for a in range(len(self.shape))]
        return t.reshape(keep)


def canonical(shape: Sequence[int], axes: Sequence[int], operands: Sequence[np.ndarray]) -> Layout | None:
    """The layout of ``operands`` (arrays of the view ``shape``, the first one sets memory order)."""
    shape = tuple(int(s) for s in shape)
    red = set(int(a) % len(shape) for a in axes) if shape else set()
    for a in operands:
        if tuple(a.shape) != shape or any(s < 0 for s in a.strides):
            return None
    x = operands[0]
    live = [i for i in range(len(shape)) if shape[i] != 1]
    # memory order of the first operand; ties (zero strides) keep the logical order
    live.sort(key=lambda i: -abs(x.strides[i]))
    blocks: list[list] = []  # [kind, size, [axes], [inner stride per operand]]
    for i in live:
        kind = "R" if i in red else "K"
        if blocks:
            b = blocks[-1]
            if b[0] == kind and all(op.strides[b[2][-1]] == op.strides[i] * shape[i] for op in operands):
                b[1] *= shape[i]
                b[2].append(i)
                b[3] = [op.strides[i] for op in operands]
                continue
        blocks.append([kind, shape[i], [i], [op.strides[i] for op in operands]])
    sizes = [1] * 5
    strides = [[0] * 5 for _ in operands]
    k_axes: list[list[int]] = [[], []]
    # right-aligned: the innermost block takes the last slot of its kind, so that a reduced innermost
    # axis lands in R3 (the rows loop order) and a kept innermost axis in K2 (the columns order)
    j = 4
    for kind, size, axs, st in reversed(blocks):
        while j >= 0 and SLOTS[j] != kind:
            j -= 1
        if j < 0:
            return None
        sizes[j] = size
        for o, s in enumerate(st):
            strides[o][j] = s
        if kind == "K":
            k_axes[0 if j == 0 else 1] = axs
        j -= 1
    return Layout(shape, tuple(sizes), (tuple(k_axes[0]), tuple(k_axes[1])), [tuple(s) for s in strides])
