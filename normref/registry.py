"""The registry of differentiable methods and ``normref.vjp``.

Every public normalization is a :class:`Method`: calling it computes the forward output; it also
exposes the pair frameworks need,

    ``forward(*args, **kwargs) -> (out, residuals)``   and   ``backward(residuals, cotangent) -> grads``,

where ``grads`` holds one entry per *array parameter* of the method's signature (in signature order;
``None`` for a parameter that received ``None`` or carries no gradient, such as running statistics).

Conventions every method follows
- ``out`` is an array, or a ``NamedTuple`` whose first field is the differentiable output and whose
  other fields are auxiliary state (updated running statistics, power-iteration vectors) that carry
  no gradient. The cotangent given to ``backward`` is the primary output's only.
- ``residuals`` is a :class:`Residuals`: a tuple of arrays (or ``None``) plus hashable static data,
  so that JAX can treat it as a pytree and torch can ``save_for_backward`` the arrays.
- The backward is analytic (hand-derived) and written in array-API operations only, so that it is
  itself differentiable by a framework's autodiff (second order).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable, NamedTuple, Sequence

__all__ = ["Residuals", "Method", "Example", "Invariant", "method", "vjp", "REGISTRY", "get", "methods"]


class Residuals:
    """What a backward needs: ``arrays`` (a tuple of arrays or ``None``) and hashable ``static`` data.

    ``meta`` is filled by :class:`Method` with the dtype of every array argument (or ``None``), so that
    gradients come back in each argument's own dtype.
    """

    __slots__ = ("arrays", "static", "meta")

    def __init__(self, arrays: Sequence[Any] = (), static: Any = (), meta: Any = None):
        self.arrays = tuple(arrays)
        self.static = static
        self.meta = meta

    def __repr__(self) -> str:
        shapes = [None if a is None else tuple(a.shape) for a in self.arrays]
        return f"Residuals(arrays={shapes}, static={self.static!r})"


@dataclasses.dataclass(frozen=True)
class Example:
    """One valid call of a method, with NumPy float64 arrays (converted to each backend by the suite).

    ``args``/``kwargs`` are the call; ``label`` says what is special about it (``"equal eigenvalues"``,
    ``"channels-last"``...); ``cond`` estimates the case's conditioning (a factor on the dtype's epsilon
    when tolerances are derived; 1 for a benign case).
    """

    args: tuple
    kwargs: dict
    label: str = ""
    cond: float = 1.0


@dataclasses.dataclass(frozen=True)
class Invariant:
    """A property of a method's output: ``check(out, args, kwargs, xp) -> float`` returns a residual
    error that must stay under ``scale`` times the dtype's epsilon (times the example's ``cond``)."""

    name: str
    check: Callable[..., float]
    scale: float = 64.0


class Method:
    """A registered normalization: callable for the forward, with ``forward``/``backward``/``vjp``."""

    def __init__(
        self,
        forward: Callable,
        *,
        name: str,
        array_params: Sequence[str],
        nondiff: Sequence[str] = (),
        category: str = "activation",
        survey: str = "",
        paper: str = "",
        examples: Callable[[Any], Iterable[Example]] | None = None,
        invariants: Sequence[Invariant] = (),
        torch_reference: Callable | None = None,
        fd_target: Callable | None = None,
    ):
        self._forward = forward
        # For methods with stop-gradient constants (batch renormalization's r and d): given a call,
        # the function (same signature) whose true derivative the analytic backward computes.
        self.fd_target = fd_target
        self.name = name
        self.signature = inspect.signature(forward)
        for p in array_params:
            if p not in self.signature.parameters:
                raise TypeError(f"register {name}: array parameter {p!r} is not in the signature")
        self.array_params = tuple(array_params)
        self.nondiff = frozenset(nondiff)
        self.diff_params = tuple(p for p in self.array_params if p not in self.nondiff)
        self.category = category
        self.survey = survey
        self.paper = paper
        self.examples = examples
        self.invariants = tuple(invariants)
        self.torch_reference = torch_reference
        self._backward: Callable | None = None
        functools.update_wrapper(self, forward)
        self.__signature__ = self.signature

    # -- registration helpers -------------------------------------------------------------------
    def defbackward(self, backward: Callable) -> Callable:
        """Register ``backward(residuals, cotangent) -> tuple`` (one entry per array parameter)."""
        self._backward = backward
        return backward

    # -- the pair -------------------------------------------------------------------------------
    def bind(self, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}: {e}") from None
        bound.apply_defaults()
        return bound

    def forward(self, *args: Any, **kwargs: Any):
        """``(out, residuals)``; ``out`` is what calling the method returns."""
        bound = self.bind(*args, **kwargs)
        out, res = self._forward(*bound.args, **bound.kwargs)
        res.meta = tuple(
            None if bound.arguments[p] is None else bound.arguments[p].dtype for p in self.array_params
        )
        return out, res

    def backward(self, residuals: Residuals, cotangent: Any) -> tuple:
        """One gradient per array parameter (signature order); ``None`` where there is none."""
        if self._backward is None:
            raise NotImplementedError(f"{self.name} has no registered backward")
        if cotangent is None:
            raise TypeError(f"{self.name}.backward: cotangent must be an array, got None")
        grads = tuple(self._backward(residuals, cotangent))
        if len(grads) != len(self.array_params):
            raise AssertionError(
                f"{self.name}.backward returned {len(grads)} gradients for {len(self.array_params)} array parameters"
            )
        meta = residuals.meta or (None,) * len(grads)
        out = []
        for p, g, dt in zip(self.array_params, grads, meta):
            if dt is None or p in self.nondiff or g is None:
                out.append(None)
            elif g.dtype != dt:
                from array_api_compat import array_namespace

                out.append(array_namespace(g).astype(g, dt))
            else:
                out.append(g)
        return tuple(out)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.forward(*args, **kwargs)[0]

    def primary(self, out: Any) -> Any:
        """The differentiable output of ``out`` (the first field of a tuple result)."""
        return out[0] if isinstance(out, tuple) else out

    def __repr__(self) -> str:
        return f"<normref method {self.name} ({self.category}; {self.survey})>"


REGISTRY: dict[str, Method] = {}


def method(
    *,
    array_params: Sequence[str],
    nondiff: Sequence[str] = (),
    category: str = "activation",
    survey: str = "",
    paper: str = "",
    name: str | None = None,
    examples: Callable | None = None,
    invariants: Sequence[Invariant] = (),
    torch_reference: Callable | None = None,
    fd_target: Callable | None = None,
) -> Callable[[Callable], Method]:
    """Decorator: turn ``forward(*args) -> (out, Residuals)`` into a registered :class:`Method`.

    The decorated function's name, signature and docstring become the public function's.
    """

    def wrap(forward: Callable) -> Method:
        m = Method(
            forward,
            name=name or forward.__name__,
            array_params=array_params,
            nondiff=nondiff,
            category=category,
            survey=survey,
            paper=paper,
            examples=examples,
            invariants=invariants,
            torch_reference=torch_reference,
            fd_target=fd_target,
        )
        if m.name in REGISTRY:
            raise ValueError(f"a method named {m.name!r} is registered already")
        REGISTRY[m.name] = m
        return m

    return wrap


def get(name_or_method: "str | Method") -> Method:
    """The registered method of that name (the error lists the valid names)."""
    if isinstance(name_or_method, Method):
        return name_or_method
    try:
        return REGISTRY[name_or_method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name_or_method!r}; registered methods are: {', '.join(sorted(REGISTRY))}"
        ) from None


def methods(category: str | None = None) -> list[Method]:
    """Every registered method (optionally one category: activation, weight, gradient), by name."""
    return [m for _, m in sorted(REGISTRY.items()) if category is None or m.category == category]


def vjp(fn: "Method | str", *args: Any, **kwargs: Any):
    """``(out, pullback)`` for a registered method: the vector-Jacobian product, analytic (JAX's vjp shape).

    ``pullback(cotangent)`` takes the cotangent of the primary (differentiable) output and returns a
    tuple with one gradient per array parameter of ``fn`` in signature order (``None`` for a parameter
    that was ``None`` or is not differentiable). ``pullback`` may be called several times.

    Example::

        y, pullback = normref.vjp(normref.group_norm, x, 4, w, b)
        dx, dw, db = pullback(dy)
    """
    m = get(fn)
    out, res = m.forward(*args, **kwargs)

    def pullback(cotangent: Any) -> tuple:
        return m.backward(res, cotangent)

    return out, pullback
