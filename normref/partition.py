"""Normalization area partitioning (NAP), survey §5.1, Algorithm 1 line 3, Eqn 20.

A partition Π turns the activations into a *view* (a reshape, never a physical transpose) and names
the axes of that view that a statistic is reduced over. For an input laid out (N, C, *S) as in torch:

============  ===========================  =========================  ===========================
partition     view                         reduce axes                survey
============  ===========================  =========================  ===========================
batch         (N, C, *S)                   (0, *S)                    Π_BN ∈ R^{d×mhw}, Eqn 20
layer         (..., *normalized_shape)     the last k axes            Π_LN ∈ R^{m×dhw}
instance      (N, C, *S)                   (*S)                       Π_IN ∈ R^{md×hw}
group         (N, G, C/G, *S)              (2, *S)                    Π_GN ∈ R^{mg×shw}
position      (N, C, *S)                   (1,)                       Π_PN ∈ R^{mhw×d}
batch_group   (Gb, N/Gb, G, C/G, *S)       (1, 3, *S)                 Π_BGN ∈ R^{g_m g×s_m s hw}
============  ===========================  =========================  ===========================

Ghost batch normalization (Hoffer et al. 2017) is the batch-group partition with G = C: statistics per
virtual batch of N/Gb samples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

from ._validate import check_int

__all__ = ["Partition", "batch", "layer", "instance", "group", "position", "batch_group", "KINDS", "layout_params"]

KINDS = ("batch", "layer", "instance", "group", "position", "batch_group")


@dataclasses.dataclass(frozen=True)
class Partition:
    """A NAP: ``kind`` plus its parameters (``num_groups``, ``batch_groups``, ``normalized_ndim``).

    ``view_shape(shape)`` gives the view's shape, ``axes(shape)`` the reduced axes of the view, and
    ``channel_axis`` the axis of the *input* that per-channel parameters (γ, β, running statistics)
    live on (``None`` for the layer partition, whose parameters have ``normalized_shape``).
    """

    kind: str
    num_groups: int = 1
    batch_groups: int = 1
    normalized_ndim: int = 0

    @property
    def channel_axis(self) -> int | None:
        return None if self.kind == "layer" else 1

    def validate(self, fn: str, shape: Sequence[int]) -> None:
        """Raise a ``ValueError`` naming the argument if ``shape`` cannot be partitioned this way."""
        nd = len(shape)
        if self.kind == "layer":
            if self.normalized_ndim < 1 or self.normalized_ndim > nd:
                raise ValueError(
                    f"{fn}: normalized_shape must name 1 to {nd} trailing dimensions of input "
                    f"(shape {tuple(shape)}); got {self.normalized_ndim} dimensions"
                )
            return
        need = {"batch": 2, "instance": 2, "group": 2, "position": 2, "batch_group": 2}[self.kind]
        if nd < need:
            raise ValueError(
                f"{fn}: input must have at least {need} dimensions (N, C, *spatial) for the {self.kind} "
                f"partition; got {nd} dimensions, shape {tuple(shape)}"
            )
        c = shape[1]
        if self.kind in ("group", "batch_group") and c % self.num_groups:
            raise ValueError(
                f"{fn}: num_groups must divide the number of channels input.shape[1] = {c}; "
                f"got num_groups={self.num_groups}"
            )
        if self.kind == "batch_group" and shape[0] % self.batch_groups:
            raise ValueError(
                f"{fn}: batch_groups must divide the batch size input.shape[0] = {shape[0]}; "
                f"got batch_groups={self.batch_groups}"
            )

    def view_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(shape)
        if self.kind == "group":
            n, c = shape[:2]
            return (n, self.num_groups, c // self.num_groups) + shape[2:]
        if self.kind == "batch_group":
            n, c = shape[:2]
            return (self.batch_groups, n // self.batch_groups, self.num_groups, c // self.num_groups) + shape[2:]
        return shape

    def axes(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Reduced axes of the view of an input of ``shape``."""
        nd = len(shape)
        if self.kind == "batch":
            return (0,) + tuple(range(2, nd))
        if self.kind == "layer":
            return tuple(range(nd - self.normalized_ndim, nd))
        if self.kind == "instance":
            return tuple(range(2, nd))
        if self.kind == "group":
            return tuple(range(2, nd + 1))
        if self.kind == "position":
            return (1,)
        if self.kind == "batch_group":
            return (1,) + tuple(range(3, nd + 2))
        raise AssertionError(self.kind)

    def feature_axes(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Axes of the view that whitening couples (the rows of the survey's matrix Π(X), Eqn 20,
        whose covariance it decorrelates; standardization treats each row alone): the channels for
        batch and instance, the channel groups for group and batch_group, the spatial positions for
        position, the last axis before the normalized ones for layer (the samples of an (N, C, H, W)
        input with normalized_ndim = 3, the tokens of (N, T, D) with normalized_ndim = 1). ``()``:
        a single row (only whitening groups of 1 are possible)."""
        nd = len(shape)
        if self.kind in ("batch", "instance", "group"):
            return (1,)
        if self.kind == "batch_group":
            return (2,)
        if self.kind == "position":
            return tuple(range(2, nd))
        if self.kind == "layer":
            return (nd - self.normalized_ndim - 1,) if nd > self.normalized_ndim else ()
        raise AssertionError(self.kind)

    def count(self, shape: Sequence[int]) -> int:
        """n: the number of elements each statistic is taken over."""
        vs = self.view_shape(shape)
        n = 1
        for a in self.axes(shape):
            n *= vs[a]
        return n

    def view(self, xp, x):
        vs = self.view_shape(x.shape)
        return x if tuple(x.shape) == vs else xp.reshape(x, vs)

    def unview(self, xp, xv, shape: Sequence[int]):
        shape = tuple(shape)
        return xv if tuple(xv.shape) == shape else xp.reshape(xv, shape)


@functools.lru_cache(maxsize=1024)
def cached(kind: str, num_groups: int = 1, batch_groups: int = 1, normalized_ndim: int = 0) -> Partition:
    """``Partition(kind, ...)`` built once per parameters (a frozen dataclass costs a microsecond to
    construct; the per-call paths of the presets take it from here). Arguments are not validated: the
    callers have checked them."""
    return Partition(kind, num_groups, batch_groups, normalized_ndim)


def batch() -> Partition:
    """Π_BN: statistics per channel over the batch and every spatial position (survey Eqn 20)."""
    return Partition("batch")


def layer(normalized_ndim: int = 1) -> Partition:
    """Π_LN: statistics per sample over the trailing ``normalized_ndim`` axes (Ba et al. 2016)."""
    return Partition("layer", normalized_ndim=check_int("layer", "normalized_ndim", normalized_ndim))


def instance() -> Partition:
    """Π_IN: statistics per sample and channel over the spatial axes (Ulyanov et al. 2016)."""
    return Partition("instance")


def group(num_groups: int) -> Partition:
    """Π_GN: statistics per sample and group of C/G channels (Wu & He 2018)."""
    return Partition("group", num_groups=check_int("group", "num_groups", num_groups))


def position() -> Partition:
    """Π_PN: statistics per sample and position over the channels (Li et al. 2019; pixel norm)."""
    return Partition("position")


def batch_group(num_groups: int, batch_groups: int) -> Partition:
    """Π_BGN: groups of channels and groups of samples (Zhou et al. ICLR 2020)."""
    return Partition(
        "batch_group",
        num_groups=check_int("batch_group", "num_groups", num_groups),
        batch_groups=check_int("batch_group", "batch_groups", batch_groups),
    )


def layout_params(arg: Callable[[str], Any]) -> tuple[str, ...]:
    """The parameters of a framework call laid out (N, C, *S) like its input (the registry's
    ``channels`` for :func:`normref.normalize`, :func:`normref.batch_normalize`,
    :func:`normref.batch_whitening`): the input, and a generated recovery's γ and β (broadcast against
    the input). ``()`` for the layer partition: it normalizes the trailing axes whatever their order,
    so a ``channel_axis`` other than 1 is refused there.

    Parameters
    ----------
    arg : callable
        ``arg(name)``: the call's value of parameter ``name``.

    Returns
    -------
    names : tuple of str
        The layout parameters (the input first).
    """
    if arg("partition") == "layer":
        return ()
    return ("input", "weight", "bias") if arg("recovery") == "generated" else ("input",)
