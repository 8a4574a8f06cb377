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
  so that JAX can treat it as a pytree and torch can ``save_for_backward`` the arrays. Its ``meta``
  (a :class:`Meta`, filled by :meth:`Method.forward`) records the argument dtypes and the primary
  output's shape, dtype and library, so that ``backward`` refuses a wrong cotangent before any work.
- ``backward(residuals, cotangent, needs=mask)`` computes only the gradients whose entry in ``mask``
  (one bool per array parameter, e.g. torch's ``ctx.needs_input_grad``) is true; the others come
  back ``None``. A registered backward that declares a ``needs`` parameter receives the mask and can
  skip the work; one that does not is called as usual and its unwanted gradients are discarded.
- The backward is analytic (hand-derived) and written in array-API operations only, so that it is
  itself differentiable by a framework's autodiff (second order).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Generic, Iterable, NamedTuple, ParamSpec, Sequence, TypeVar, overload

from numpy import bool_ as _np_bool

from ._xp import is_array, library_name

__all__ = ["Residuals", "Meta", "Empty", "Method", "Example", "Invariant", "method", "vjp", "REGISTRY", "get", "methods"]

#: The parameters of a registered method's function (its signature, for type checkers).
P = ParamSpec("P")
#: What calling the method returns: the function's (user-facing) return annotation.
R = TypeVar("R")


class Meta(NamedTuple):
    """What :meth:`Method.forward` records about a call for its backward (hashable: JAX keeps it as
    static pytree data, so the shapes are those seen under ``jit``/``vmap`` tracing too).

    ``dtypes``: the dtype of each array argument (``None`` for an argument that was ``None``), so that
    gradients come back in each argument's own dtype; ``shape``/``dtype``/``library``: the primary
    output's, which the cotangent must match (shape and library; any real floating dtype is accepted).
    """

    dtypes: tuple
    shape: tuple
    dtype: Any
    library: str


class Residuals:
    """What a backward needs: ``arrays`` (a tuple of arrays or ``None``) and hashable ``static`` data.

    ``meta`` is filled by :class:`Method` with a :class:`Meta` (argument dtypes, primary output shape,
    dtype and library); a plain tuple of dtypes (older callers) is accepted and skips the cotangent
    checks.
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
class Empty:
    """The ``static`` of the residuals of a call on an *empty* input (a dimension of size 0): there
    is nothing to differentiate, and :meth:`Method.backward` returns, without calling the registered
    backward, an empty gradient for the input and zeros of each given parameter's shape (the sum
    over no elements), as torch does for its norms. ``shapes``: one per array parameter (``None``
    where the argument was ``None``)."""

    shapes: tuple


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
    """A property of a method's output, checked by the conformance suite within a tolerance.

    ``check(out, args, kwargs, xp) -> float`` returns a residual error that must stay under ``scale``
    times the dtype's epsilon (times the example's ``cond``).

    Attributes
    ----------
    name : str
        What the property is.
    check : callable
        ``check(out, args, kwargs, xp) -> float``, the residual error.
    scale : float
        The tolerance, in units of the dtype's epsilon (default 64).
    """

    name: str
    check: Callable[..., float]
    scale: float = 64.0


class Method(Generic[P, R]):
    """A registered normalization: callable for the forward, with ``forward``/``backward``/``vjp``.

    It carries its function's identity: ``__name__``, ``__qualname__``, ``__module__``, ``__doc__``,
    ``__wrapped__`` (the function) and ``__signature__``, so that ``inspect.signature``, ``help()``,
    IDEs and documentation tools show the function's own signature and docstring. For type checkers
    it is a ``Method[P, R]``: ``P`` the function's parameters, ``R`` its return annotation (what a
    call returns); ``forward`` returns ``(R, Residuals)``.
    """

    def __init__(
        self,
        forward: Callable[P, R],
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
        nullable: Sequence[str] = (),
    ):
        # at run time the registered function returns (out, residuals): see method()
        self._forward: Callable[..., Any] = forward
        # For methods with stop-gradient constants (batch renormalization's r and d): given a call,
        # the function (same signature) whose true derivative the analytic backward computes.
        self.fd_target = fd_target
        self.name = name
        self.signature = inspect.signature(forward)
        for p in array_params:
            if p not in self.signature.parameters:
                raise TypeError(f"register {name}: array parameter {p!r} is not in the signature")
        self.array_params = tuple(array_params)
        # (name, position or None, default) of each array parameter: the per-call dtypes are read off
        # the call's arguments directly, without inspect's bind (tens of µs on a tiny input)
        params = list(self.signature.parameters.values())
        self._array_slots = tuple(
            (p, next((i for i, q in enumerate(params) if q.name == p and q.kind in (
                q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)), None),
             None if self.signature.parameters[p].default is inspect.Parameter.empty
             else self.signature.parameters[p].default)
            for p in self.array_params
        )
        # The array parameters a call must give as arrays: those without a default, except the ones
        # declared ``nullable`` (None means something there: "no running statistics", an optional
        # weight; or the method has its own error for it). None for a required one is a TypeError
        # naming it, before any work, for every method (not an AttributeError deep inside).
        for p in nullable:
            if p not in self.array_params:
                raise TypeError(f"register {name}: nullable parameter {p!r} is not an array parameter")
        self.required = tuple(
            p for p, _, default in self._array_slots
            if self.signature.parameters[p].default is inspect.Parameter.empty
            and p not in nullable
        )
        self._required_slots = tuple(s for s in self._array_slots if s[0] in self.required)
        self.nondiff = frozenset(nondiff)
        self.diff_params = tuple(p for p in self.array_params if p not in self.nondiff)
        self.category = category
        self.survey = survey
        self.paper = paper
        self.examples = examples
        self.invariants = tuple(invariants)
        self.torch_reference = torch_reference
        self._backward: Callable | None = None
        self._backward_takes_needs = False
        self._inspected: Callable | None = None
        # __module__, __name__, __qualname__, __doc__, __wrapped__ (and the function's __dict__)
        functools.update_wrapper(self, forward)
        self.__signature__ = self.signature

    def __get__(self, obj: object, objtype: type | None = None) -> "Method[P, R]":
        # A method stays itself when read off a class or an instance (a stored function would bind
        # as a method instead). Defining ``__get__`` also makes ``inspect.isroutine`` true, so that
        # ``help()``/pydoc and documentation tools render it as a function: name, signature, docstring.
        return self

    # -- registration helpers -------------------------------------------------------------------
    def defbackward(self, backward: Callable) -> Callable:
        """Register ``backward(residuals, cotangent) -> tuple`` (one entry per array parameter).

        If ``backward`` declares a ``needs`` parameter it is called as ``backward(residuals,
        cotangent, needs=mask)`` with one bool per array parameter, and may skip (return ``None`` for)
        the gradients whose entry is false.

        Parameters
        ----------
        backward : callable
            The analytic backward.

        Returns
        -------
        backward : callable
            ``backward`` itself (usable as a decorator).
        """
        self._backward = backward
        self._inspected = backward
        self._backward_takes_needs = _declares_needs(backward)
        return backward

    # -- the pair -------------------------------------------------------------------------------
    def bind(self, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}: {e}") from None
        bound.apply_defaults()
        return bound

    def _array_arg(self, slot, args, kwargs):
        name, pos, default = slot
        if pos is not None and pos < len(args):
            return args[pos]
        return kwargs.get(name, default)

    def forward(self, *args: P.args, **kwargs: P.kwargs) -> tuple[R, Residuals]:
        """``(out, residuals)``; ``out`` is what calling the method returns.

        Parameters
        ----------
        *args : Any
            The method's positional arguments.
        **kwargs : Any
            The method's keyword arguments.

        Returns
        -------
        out : array or NamedTuple
            What calling the method returns.
        residuals : Residuals
            What :meth:`backward` needs (with its :class:`Meta`).
        """
        out, res = self._call(args, kwargs)
        y = self.primary(out)
        arrays = [self._array_arg(slot, args, kwargs) for slot in self._array_slots]
        res.meta = Meta(
            dtypes=tuple(None if a is None else a.dtype for a in arrays),
            shape=tuple(int(d) for d in y.shape),
            dtype=y.dtype,
            library=library_name(y),
        )
        return out, res

    def backward(
        self, residuals: Residuals, cotangent: Any, needs: "Sequence[bool] | None" = None
    ) -> tuple[Any, ...]:
        """One gradient per array parameter (signature order); ``None`` where there is none.

        Parameters
        ----------
        residuals : Residuals
            The residuals of :meth:`forward`.
        cotangent : array
            The cotangent of the primary output: an array of its shape and library (``ValueError``/
            ``TypeError`` otherwise, before any work).
        needs : sequence of bool or None, default None
            One bool per array parameter: the gradients wanted; the others come back ``None`` and, where
            the registered backward supports it, are not computed. No gradient wanted: no work at all.

        Returns
        -------
        grads : tuple
            One gradient (or ``None``) per array parameter, in signature order.
        """
        if self._backward is None:
            raise NotImplementedError(f"{self.name} has no registered backward")
        self._check_cotangent(residuals, cotangent)
        n = len(self.array_params)
        if needs is not None:
            needs = tuple(needs)
            if len(needs) != n or not all(isinstance(b, (bool, _np_bool)) for b in needs):
                raise ValueError(
                    f"{self.name}.backward: needs must hold one bool per array parameter "
                    f"{self.array_params}; got {needs!r}"
                )
            needs = tuple(bool(b) and p not in self.nondiff for b, p in zip(needs, self.array_params))
            if not any(needs):
                return (None,) * n
        if isinstance(residuals.static, Empty):
            return self._empty_backward(residuals, cotangent, needs)
        fn = self._backward
        # inspected once at registration; a backward swapped in later (tests) is inspected here
        takes_needs = self._backward_takes_needs if fn is self._inspected else _declares_needs(fn)
        if takes_needs:
            full = tuple(p not in self.nondiff for p in self.array_params)
            grads = tuple(fn(residuals, cotangent, needs=full if needs is None else needs))
        else:
            grads = tuple(fn(residuals, cotangent))
        if len(grads) != n:
            raise AssertionError(
                f"{self.name}.backward returned {len(grads)} gradients for {n} array parameters"
            )
        meta = residuals.meta
        dtypes = meta.dtypes if isinstance(meta, Meta) else (meta or (None,) * n)
        if needs is None:
            needs = (True,) * n
        out: list[Any] = []
        for p, g, dt, want in zip(self.array_params, grads, dtypes, needs):
            if dt is None or p in self.nondiff or g is None or not want:
                out.append(None)
            elif g.dtype != dt:
                from array_api_compat import array_namespace

                out.append(array_namespace(g).astype(g, dt))
            else:
                out.append(g)
        return tuple(out)

    def _empty_backward(self, residuals: Residuals, cotangent: Any, needs) -> tuple:
        """Gradients of a call on an empty input: zeros of each given differentiable argument's
        shape, in its dtype (empty for the input itself)."""
        from array_api_compat import array_namespace, device

        xp = array_namespace(cotangent)
        meta = residuals.meta
        dtypes = meta.dtypes if isinstance(meta, Meta) else (None,) * len(self.array_params)
        if needs is None:
            needs = (True,) * len(self.array_params)
        out: list[Any] = []
        try:
            dev = {"device": device(cotangent)}
        except Exception:  # a traced value without a concrete device: the library's default
            dev = {}
        for p, shape, dt, want in zip(self.array_params, residuals.static.shapes, dtypes, needs):
            if shape is None or p in self.nondiff or not want:
                out.append(None)
            else:
                out.append(xp.zeros(shape, dtype=dt if dt is not None else cotangent.dtype, **dev))
        return tuple(out)

    def _check_cotangent(self, residuals: Residuals, cotangent: Any) -> None:
        """The cotangent must look like the primary output recorded at forward time: same library,
        same shape (no silent broadcasting), real floating point."""
        fn = f"{self.name}.backward"
        if cotangent is None:
            raise TypeError(f"{fn}: cotangent must be an array, got None")
        if not is_array(cotangent):
            raise TypeError(f"{fn}: cotangent must be an array like the primary output; got {type(cotangent).__name__}")
        meta = residuals.meta
        if not isinstance(meta, Meta):
            return
        lib = library_name(cotangent)
        if lib != meta.library:
            raise TypeError(
                f"{fn}: cotangent must be a {meta.library} array, like the primary output; "
                f"got a {lib} array ({type(cotangent).__name__})"
            )
        shape = tuple(cotangent.shape)
        if shape != meta.shape:
            raise ValueError(
                f"{fn}: cotangent must have the primary output's shape {meta.shape}; got shape {shape}"
            )
        from array_api_compat import array_namespace

        if not array_namespace(cotangent).isdtype(cotangent.dtype, "real floating"):
            raise TypeError(
                f"{fn}: cotangent must be real floating point (the output is {meta.dtype}); got dtype {cotangent.dtype}"
            )

    def _call(self, args, kwargs):
        """The forward on the call's arguments as given (Python binds them: no per-call inspect);
        a call that does not fit the signature gets the same error as :meth:`bind`, and ``None`` for
        a required array parameter a ``TypeError`` naming it."""
        for name, pos, _ in self._required_slots:
            if pos is not None and pos < len(args):
                a = args[pos]
            elif name in kwargs:
                a = kwargs[name]
            else:
                continue  # missing altogether: the signature's own error below
            if a is None:
                raise TypeError(
                    f"{self.name}: {name} must be an array (numpy, torch, jax, cupy or any array API array); got None"
                )
        try:
            return self._forward(*args, **kwargs)
        except TypeError:
            self.bind(*args, **kwargs)  # raises "<name>: ..." when the arguments do not fit
            raise

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # the residuals' metadata (dtypes, output shape) only serve a backward: not computed here
        return self._call(args, kwargs)[0]

    def primary(self, out: Any) -> Any:
        """The differentiable output of ``out`` (the first field of a tuple result).

        Parameters
        ----------
        out : array or NamedTuple
            What a call returned.

        Returns
        -------
        y : array
            The primary output.
        """
        return out[0] if isinstance(out, tuple) else out

    def __repr__(self) -> str:
        return f"<normref method {self.name} ({self.category}; {self.survey})>"


def _declares_needs(backward: Callable) -> bool:
    """Whether a registered backward takes the ``needs`` mask (a parameter of that name)."""
    try:
        return "needs" in inspect.signature(backward).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


REGISTRY: dict[str, Method[..., Any]] = {}


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
    nullable: Sequence[str] = (),
) -> Callable[[Callable[P, R]], Method[P, R]]:
    """Decorator: turn ``forward(*args) -> (out, Residuals)`` into a registered :class:`Method`.

    The decorated function's name, signature and docstring become the public function's. Annotate
    it with the *user-facing* return type, what calling the method returns (``-> Array``, ``->
    Array | NormResult``): type checkers then see the public function as ``Method[P, R]``, whose
    call takes the function's parameters ``P`` and returns ``R`` and whose ``forward`` returns
    ``(R, Residuals)``. (``Array`` is ``Any``, so the function's own ``return out, residuals``
    type-checks; a function annotated with a precise type, e.g. a NamedTuple, marks that return
    with ``# type: ignore[return-value]``.)
    """

    def wrap(forward: Callable[P, R]) -> Method[P, R]:
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
            nullable=nullable,
        )
        if m.name in REGISTRY:
            raise ValueError(f"a method named {m.name!r} is registered already")
        REGISTRY[m.name] = m
        return m

    return wrap


@overload
def get(name_or_method: Method[P, R]) -> Method[P, R]: ...
@overload
def get(name_or_method: str) -> Method[..., Any]: ...
def get(name_or_method: "str | Method[..., Any]") -> Method[..., Any]:
    """The registered method of that name (the error lists the valid names).

    Parameters
    ----------
    name_or_method : str or Method
        A registered name, or a :class:`Method` (returned as it is).

    Returns
    -------
    method : Method
        The registered method.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the registered ones).
    """
    if isinstance(name_or_method, Method):
        return name_or_method
    try:
        return REGISTRY[name_or_method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name_or_method!r}; registered methods are: {', '.join(sorted(REGISTRY))}"
        ) from None


def methods(category: str | None = None) -> list[Method[..., Any]]:
    """Every registered method (optionally one category: activation, weight, gradient), by name.

    Parameters
    ----------
    category : str or None, default None
        ``"activation"``, ``"weight"`` or ``"gradient"``; ``None``: all.

    Returns
    -------
    methods : list of Method
        The methods, sorted by name.
    """
    return [m for _, m in sorted(REGISTRY.items()) if category is None or m.category == category]


@overload
def vjp(fn: Method[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[R, Callable[[Any], tuple[Any, ...]]]: ...
@overload
def vjp(fn: str, *args: Any, **kwargs: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]: ...
def vjp(fn: "Method[..., Any] | str", *args: Any, **kwargs: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
    """``(out, pullback)`` for a registered method: the vector-Jacobian product, analytic (JAX's vjp shape).

    ``pullback(cotangent)`` takes the cotangent of the primary (differentiable) output and returns a
    tuple with one gradient per array parameter of ``fn`` in signature order (``None`` for a parameter
    that was ``None`` or is not differentiable). ``pullback`` may be called several times.

    Aliasing contract: the pullback keeps references to the caller's arrays (the input itself, or
    views of it, are among the residuals: no defensive copy is made). Modifying ``x`` (or a weight)
    in place between the forward and a ``pullback`` call silently changes the gradients, as with
    any saved-for-backward value: do not mutate the arguments until the last ``pullback`` call, or
    pass copies. Through the torch adapter (:mod:`normref.backends.torch`) the inputs are saved with
    ``ctx.save_for_backward``, so torch's version counter catches it: ``backward`` raises
    ``RuntimeError: ... modified by an inplace operation``. JAX arrays are immutable.

    Parameters
    ----------
    fn : Method or str
        The registered method, or its name.
    *args : Any
        The method's positional arguments.
    **kwargs : Any
        The method's keyword arguments.

    Returns
    -------
    out : array or NamedTuple
        What calling ``fn(*args, **kwargs)`` returns.
    pullback : callable
        ``pullback(cotangent) -> tuple``: one gradient per array parameter of ``fn``.

    Examples
    --------
    ::

        y, pullback = normref.vjp(normref.group_norm, x, 4, w, b)
        dx, dw, db = pullback(dy)
    """
    m = get(fn)
    out, res = m.forward(*args, **kwargs)

    def pullback(cotangent: Any) -> tuple[Any, ...]:
        return m.backward(res, cotangent)

    return out, pullback
