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

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import os
from typing import Any, Callable, Generic, Iterable, Iterator, NamedTuple, ParamSpec, Sequence, TypeVar, overload

from numpy import bool_ as _np_bool
from numpy import ndarray as _np_ndarray
from numpy import integer as _np_integer

from ._xp import is_array, library_name

__all__ = ["Residuals", "Meta", "Empty", "ChannelMove", "Method", "Example", "Invariant", "method", "vjp", "REGISTRY", "get", "methods", "use_adapters", "NAMED_LAYERS"]

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
    #: a :class:`ChannelMove` when the call had ``channel_axis`` != 1 (the backward moves the
    #: cotangent and the gradients the same way), else ``None``
    channels: Any = None


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
class ChannelMove:
    """How a call with ``channel_axis`` != 1 was permuted to the (N, C, *S) layout the formulas use
    (kept in :attr:`Meta.channels`: hashable, so JAX keeps it as static data).

    ``axis``: the caller's ``channel_axis``; ``cotangent``: the permutation taking the caller's output
    layout to (N, C, *S) (``permute_dims(g, cotangent)``); ``grads``: for each moved array parameter,
    ``(index among the array parameters, the inverse permutation, the caller's shape)``, which brings
    its gradient back to the caller's layout (and shape, for an array broadcast against the input
    that was given with fewer dimensions)."""

    axis: int
    cotangent: tuple
    grads: tuple


@dataclasses.dataclass(frozen=True)
class _ChannelPlan:
    """One call's permutation: ``values`` the moved arguments (name → permuted view), ``given`` the
    caller's (name → array), ``inverse`` the output's permutation back, ``move`` the backward's."""

    values: dict
    given: dict
    inverse: tuple
    move: ChannelMove


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

    Calling it on a torch tensor that records gradients, or on a JAX tracer, runs the framework
    adapter (``normref.backends.torch.function(m)`` / ``normref.backends.jax.function(m)``), so that
    the gradient is the analytic backward, not the framework's autodiff of the formula; the forward
    is the same. :func:`use_adapters` switches that off; ``forward``/``backward`` are never routed.
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
        channels: "Sequence[str] | Callable[[Callable[[str], Any]], Sequence[str]]" = (),
    ):
        # at run time the registered function returns (out, residuals): see method()
        self._forward: Callable[..., Any] = forward
        self.name = name
        self.signature = inspect.signature(forward)
        # Methods whose partition has a channel axis: the parameters laid out (N, C, *S) like the
        # input (a tuple of names, or a callable ``channels(arg)`` of the call's arguments, ``arg(name)``
        # giving one) and the keyword-only ``channel_axis`` their public signature gains (see
        # _channel_plan). Empty: the method takes no channel_axis.
        self.channels = channels if callable(channels) else tuple(channels)
        if self.channels:
            self.signature = _with_channel_axis(name, self.signature, self.channels)
        # For methods with stop-gradient constants (batch renormalization's r and d): given a call,
        # the function (same signature) whose true derivative the analytic backward computes.
        self.fd_target = fd_target if fd_target is None or not self.channels else _channel_fd_target(self, fd_target)
        self._positions = {
            q.name: i for i, q in enumerate(self.signature.parameters.values())
            if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)
        }
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
        # for binding a call by hand (the torch adapter's per-call path): the names a call may use as
        # keywords, and how many positional arguments the signature takes
        self._names = frozenset(q.name for q in self.signature.parameters.values()
                                if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY))
        self._n_positional = sum(q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)
                                 for q in self.signature.parameters.values())
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
        if self.channels and self.__doc__:
            self.__doc__ = _document_channel_axis(self.__doc__, self.channels)

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
        # _call leaves its ChannelMove in meta when it permuted the call (channel_axis != 1)
        move = res.meta if isinstance(res.meta, ChannelMove) else None
        res.meta = Meta(
            dtypes=tuple(None if a is None else a.dtype for a in arrays),
            shape=tuple(int(d) for d in y.shape),
            dtype=y.dtype,
            library=library_name(y),
            channels=move,
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
        move = residuals.meta.channels if isinstance(residuals.meta, Meta) else None
        if move is not None:
            # the caller's layout → (N, C, *S), as the forward ran (a permuted view: no copy)
            cotangent = _permute(cotangent, move.cotangent)
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
            return _unmove(move, self._empty_backward(residuals, cotangent, needs))
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
        return _unmove(move, tuple(out))

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
        if self.channels and "channel_axis" in kwargs:
            kwargs = dict(kwargs)
            plan = self._channel_plan(kwargs.pop("channel_axis"), args, kwargs)
            if plan is not None:
                return self._call_moved(plan, args, kwargs)
        try:
            return self._forward(*args, **kwargs)
        except TypeError:
            self.bind(*args, **kwargs)  # raises "<name>: ..." when the arguments do not fit
            raise

    # -- channel_axis: features-last inputs on the (N, C, *S) formulas ----------------------------
    def _arg(self, name: str, args, kwargs) -> Any:
        """The call's value of parameter ``name`` (positional, keyword or default)."""
        pos = self._positions.get(name)
        if pos is not None and pos < len(args):
            return args[pos]
        if name in kwargs:
            return kwargs[name]
        q = self.signature.parameters.get(name)  # None for a name the method does not have
        return None if q is None or q.default is inspect.Parameter.empty else q.default

    def _channel_plan(self, axis: Any, args, kwargs) -> "_ChannelPlan | None":
        """Validate ``channel_axis`` and plan the permutation; ``None``: the call needs none (the
        channels are on axis 1 already, or the input is not an array: the method's own error then).

        The layout parameters (``self.channels``) are permuted by p = (0, a, 1, ..., â, ..., nd−1),
        which moves the caller's channel axis a to 1 and keeps every other axis in order: a stride
        view (NumPy, torch), fused by XLA in JAX. An array of fewer dimensions than the input (a
        generated affine's γ, β, broadcast against the input from the right) gets leading 1s first."""
        fn = self.name
        if isinstance(axis, (bool, _np_bool)) or not isinstance(axis, (int, _np_integer)):
            raise TypeError(
                f"{fn}: channel_axis must be an int (the input's axis that holds the channels: 1 for "
                f"(N, C, *S), -1 for features last); got {type(axis).__name__} {axis!r}"
            )
        axis = int(axis)
        if axis == 1:
            return None
        get_arg = functools.partial(self._arg, args=args, kwargs=kwargs)
        names = tuple(self.channels(get_arg)) if callable(self.channels) else self.channels
        if not names:
            raise ValueError(
                f"{fn}: this call has no channel axis (a layer partition normalizes the trailing axes, "
                f"whatever their order), so channel_axis must be 1; got channel_axis={axis}"
            )
        primary = names[0]
        x = get_arg(primary)
        if not is_array(x):
            return None
        nd = x.ndim
        shape = tuple(x.shape)
        if not -nd <= axis < nd:
            raise ValueError(
                f"{fn}: channel_axis must be in [-{nd}, {nd}) for a {nd}-dimensional {primary} "
                f"(shape {shape}); got channel_axis={axis}"
            )
        a = axis % nd
        if a == 0:
            raise ValueError(
                f"{fn}: channel_axis must not be the batch axis 0 of {primary} (shape {shape}): the "
                f"channels are on another axis (1: (N, C, *S), the default; -1: features last); got "
                f"channel_axis={axis}"
            )
        if a == 1:
            return None
        perm = (0, a) + tuple(i for i in range(1, nd) if i != a)
        inverse = tuple(sorted(range(nd), key=perm.__getitem__))
        values: dict = {}
        given: dict = {}
        grads = []
        from array_api_compat import array_namespace

        for name in names:
            v = get_arg(name)
            if not is_array(v) or v.ndim > nd or (v.ndim < nd and name == primary):
                continue  # None, or a shape the method refuses in its own words
            xp = array_namespace(v)
            t = v if v.ndim == nd else xp.reshape(v, (1,) * (nd - v.ndim) + tuple(v.shape))
            values[name] = xp.permute_dims(t, perm)
            given[name] = v
            if name in self.array_params:
                grads.append((self.array_params.index(name), inverse, tuple(int(d) for d in v.shape)))
        return _ChannelPlan(values, given, inverse, ChannelMove(axis, perm, tuple(grads)))

    def _moved_args(self, plan: "_ChannelPlan", args, kwargs) -> tuple[list, dict]:
        args, kwargs = list(args), dict(kwargs)
        for name, v in plan.values.items():
            pos = self._positions.get(name)
            if pos is not None and pos < len(args):
                args[pos] = v
            else:
                kwargs[name] = v
        return args, kwargs

    def _moved_back(self, plan: "_ChannelPlan", out: Any) -> Any:
        """The output with its primary field in the caller's layout (``out=``, when given, is
        returned itself: the formula wrote into its permuted view)."""
        y = self.primary(out)
        if "out" in plan.values and y is plan.values["out"]:
            y = plan.given["out"]
        else:
            if y.ndim != len(plan.inverse):
                raise AssertionError(f"{self.name}: the output has {y.ndim} dimensions, the input {len(plan.inverse)}")
            y = _permute(y, plan.inverse)
        if isinstance(out, tuple):  # a NamedTuple result keeps its type
            rest = tuple(out[1:])
            return type(out)(y, *rest) if hasattr(out, "_fields") else (y,) + rest
        return y

    def _call_moved(self, plan: "_ChannelPlan", args, kwargs):
        """The forward on the permuted arguments; the output back in the caller's layout and the
        :class:`ChannelMove` left in ``residuals.meta`` for :meth:`forward`."""
        margs, mkwargs = self._moved_args(plan, args, kwargs)
        try:
            out, res = self._forward(*margs, **mkwargs)
        except TypeError:
            self.bind(*args, **kwargs)  # raises "<name>: ..." when the arguments do not fit
            raise
        except ValueError as e:
            # the method's own message names axes of the (N, C, *S) view: say which view that was
            name = next(iter(plan.values))
            msg = (
                f"{e} (called with channel_axis={plan.move.axis}: {name} of shape "
                f"{tuple(plan.given[name].shape)} is seen as (N, C, *S) of shape "
                f"{tuple(plan.values[name].shape)}; the message's axes are that view's)"
            )
            try:
                err = type(e)(msg)
            except Exception:  # a subclass with another constructor
                err = ValueError(msg)
            raise err from None
        res.meta = plan.move
        return self._moved_back(plan, out), res

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # A torch tensor that records gradients, or a JAX tracer (jax.grad/jit/vmap): the framework
        # would differentiate the formula itself. The call goes through the framework's adapter
        # instead (normref.backends.torch's autograd.Function, normref.backends.jax's custom_vjp), so
        # the gradient is normref's analytic backward (issue 16). Opt out: use_adapters(False).
        # forward()/backward()/vjp stay raw (the adapters call forward: no recursion).
        adapter = self._adapter(args, kwargs)
        if adapter is not None:
            return adapter(*args, **kwargs)
        # the residuals' metadata (dtypes, output shape) only serve a backward: not computed here
        return self._call(args, kwargs)[0]

    def _adapter(self, args, kwargs) -> "Callable | None":
        """The adapter a plain call is routed to (see ``__call__``), or ``None`` for the formula."""
        for slot in self._array_slots:
            a = self._array_arg(slot, args, kwargs)
            if a is None or type(a) is _np_ndarray:
                continue
            if _is_torch_array(a):
                import torch

                compiling = torch.compiler.is_compiling()
                if torch.is_grad_enabled() and (a.requires_grad or (
                        not compiling and torch._C._functorch.is_functorch_wrapped_tensor(a))):
                    if not (_trace_time_routing() if compiling else _routing()):
                        return None
                    if not compiling and _torch_forward_mode():
                        # torch.func.jvp / jacfwd / hessian: the Function has no forward-mode rule,
                        # so forward mode differentiates the formula (documented in use_adapters)
                        return None
                    from normref.backends.torch import function

                    return function(self)
            elif _is_jax_array(a):
                import jax

                if isinstance(a, jax.core.Tracer):
                    if not _routing():
                        return None
                    from normref.backends.jax import function

                    # the custom_jvp form (its tangent rule is the transpose of normref's VJP): plain
                    # calls then work under jax.jvp / jacfwd / hessian as well as jax.grad, as the
                    # formula did before routing; reverse mode still runs normref's backward
                    return function(self, mode="jvp")
        return None

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


def _permute(a: Any, perm: tuple) -> Any:
    """``permute_dims(a, perm)`` in ``a``'s own library (a view where the library has views)."""
    from array_api_compat import array_namespace

    return array_namespace(a).permute_dims(a, perm)


def _unmove(move: "ChannelMove | None", grads: tuple) -> tuple:
    """Gradients of the permuted arguments back in the caller's layout (and shape)."""
    if move is None:
        return grads
    out = list(grads)
    for i, inverse, shape in move.grads:
        g = out[i]
        if g is None:
            continue
        g = _permute(g, inverse)
        if tuple(g.shape) != shape:  # an array given with fewer dimensions: drop the leading 1s
            from array_api_compat import array_namespace

            g = array_namespace(g).reshape(g, shape)
        out[i] = g
    return tuple(out)


def _with_channel_axis(name: str, sig: inspect.Signature, channels: Any) -> inspect.Signature:
    """``sig`` with the keyword-only ``channel_axis: int = 1`` (before a ``**kwargs``)."""
    if "channel_axis" in sig.parameters:
        raise TypeError(f"register {name}: channels is declared, so channel_axis must not be in the signature")
    if not callable(channels):
        for p in channels:
            if p not in sig.parameters:
                raise TypeError(f"register {name}: channels parameter {p!r} is not in the signature")
    params = list(sig.parameters.values())
    new = inspect.Parameter("channel_axis", inspect.Parameter.KEYWORD_ONLY, default=1, annotation="int")
    at = next((i for i, q in enumerate(params) if q.kind is q.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:at] + [new] + params[at:])


def _document_channel_axis(doc: str, channels: Any) -> str:
    """``doc`` with a ``channel_axis`` entry at the end of its numpydoc ``Parameters`` section."""
    lines = doc.splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and set(lines[i + 1].strip()) == {"-"} and len(lines[i + 1].strip()) >= 3]
    start = next((i for i in heads if lines[i].strip() == "Parameters"), None)
    if start is None:
        return doc
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    end = next((i for i in heads if i > start), len(lines))
    while end > start + 2 and not lines[end - 1].strip():
        end -= 1
    names = ["input"] if callable(channels) else [p for p in channels if p != "out"]
    arrays = " and ".join(f"``{p}``" for p in names)
    text = (
        f"Keyword-only. The axis of {arrays} that holds the channels: ``1``, the default, is torch's "
        "``(N, C, *S)`` layout; ``-1`` is features last ``(N, *S, C)``, as Flax, Keras and TensorFlow lay out "
        "images; any axis but the batch axis 0. The formulas run on a permuted view (no copy in NumPy "
        "and torch; the numba kernels read the channels-last strides as they are) and the output and "
        f"the gradient{'s' if len(names) > 1 else ''} of {arrays} come back in the caller's layout"
        + ("; ``out`` is given in that layout too" if not callable(channels) and "out" in channels else "")
        + (" (an array broadcast against the input, such as a generated γ or β, is given in it too)"
           if callable(channels) else "")
        + ". Per-channel arrays (γ, β, running statistics) keep their shape. Survey §5.1 (the partition "
        "is the same; only the memory layout of the channel axis differs)."
    )
    import textwrap

    entry = [f"{indent}channel_axis : int, default 1"] + textwrap.wrap(
        text, width=100, initial_indent=indent + "    ", subsequent_indent=indent + "    ")
    return "\n".join(lines[:end] + entry + lines[end:])


def _channel_fd_target(m: "Method[..., Any]", raw: Callable) -> Callable:
    """``fd_target`` for a method with channels: a call with ``channel_axis`` != 1 gets the frozen
    function of the permuted call, wrapped to take and return the caller's layout."""

    def fd_target(args: tuple, kwargs: dict) -> Callable | None:
        if "channel_axis" not in kwargs:
            return raw(args, kwargs)
        kwargs = dict(kwargs)
        axis = kwargs.pop("channel_axis")
        plan = m._channel_plan(axis, args, kwargs)
        if plan is None:
            return raw(args, kwargs)
        margs, mkwargs = m._moved_args(plan, args, kwargs)
        inner = raw(tuple(margs), mkwargs)
        if inner is None:
            return None

        def frozen(*a: Any, **k: Any) -> Any:
            k = dict(k)
            p = m._channel_plan(k.pop("channel_axis", 1), a, k)
            if p is None:
                return inner(*a, **k)
            ma, mk = m._moved_args(p, a, k)
            return m._moved_back(p, inner(*ma, **mk))

        return frozen

    return fd_target


# -- routing plain calls to the adapters (issue 16) --------------------------------------------------
# The switch: a context variable (threads and tasks keep their own), as use_kernels; the environment
# variable NORMREF_ADAPTERS=0 (read once, at import) makes "off" the default.
_ROUTING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("normref_adapters", default=None)
_ENV_ROUTING = os.environ.get("NORMREF_ADAPTERS", "1") not in ("0", "false", "False", "off")


def _routing() -> bool:
    v = _ROUTING.get()
    return _ENV_ROUTING if v is None else v


def _trace_time_routing() -> bool:
    """:func:`_routing`, read once at trace time under ``torch.compile`` (TorchDynamo cannot trace a
    context variable; the attribute below is what ``torch.compiler.assume_constant_result`` sets)."""
    return _routing()


_trace_time_routing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _torch_forward_mode() -> bool:
    """Whether a torch.func forward-mode transform (jvp, jacfwd, hessian's outer jacfwd) is active."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


@contextlib.contextmanager
def use_adapters(enabled: bool = True) -> Iterator[None]:
    """Context manager: whether plain calls on differentiable framework arrays use normref's backward.

    By default, calling a method (``normref.batch_norm(x, ...)``) on a torch tensor that records
    gradients (``requires_grad`` with grad mode on, or a ``torch.func`` transform's tensor) runs
    ``normref.backends.torch.function(method)`` — a ``torch.autograd.Function`` whose backward is
    normref's analytic one (autograd node ``Normref<Name>Backward``) — and on a JAX tracer (under
    ``jax.grad``/``jit``/``vmap``/``jvp``) runs ``normref.backends.jax.function(method, mode="jvp")``,
    a ``jax.custom_jvp`` whose tangent rule is the transpose of normref's VJP (so forward mode,
    ``jax.hessian`` and reverse mode all work, reverse mode running normref's backward). The forward
    is the same formula either way; only who differentiates it changes. Inside
    ``with normref.use_adapters(False):`` plain calls run the formula directly, so that torch's
    autograd / JAX's AD differentiate the array-API operations themselves (an independent oracle
    for tests, or a framework feature the adapters lack). ``NORMREF_ADAPTERS=0`` in the environment
    (read at import) makes that the default. ``Method.forward``/``backward`` and :func:`vjp` are
    never routed. Under torch's forward-mode transforms (``torch.func.jvp``, ``jacfwd``, and so
    ``hessian``) plain calls are not routed either: the autograd Function has no forward-mode rule,
    so there torch differentiates the formula (JAX's routed form has one, see above).

    Parameters
    ----------
    enabled : bool, default True
        Route plain calls through the adapters (``True``) or run the formula (``False``).

    Returns
    -------
    context : context manager
        Yields ``None``; the previous setting comes back on exit.

    Notes
    -----
    Under ``torch.compile`` the setting is read when the graph is traced (as :func:`use_kernels`'s):
    ``torch._dynamo.reset()`` re-traces after a change. Infrastructure, not a survey method: it
    applies to every method of survey §5–§7. Plain JAX calls lose one check of the custom_vjp form
    (a nonzero cotangent on running statistics is refused eagerly there; here it is dropped, as
    under ``jax.jit``): call ``normref.backends.jax.function(method)`` for that.

    References
    ----------
    L. Huang, J. Qin, Y. Zhou, F. Zhu, L. Liu and L. Shao, "Normalization Techniques in Training DNNs:
    Methodology, Analysis and Application", TPAMI 2023 (the methods routed); each method's own paper.
    """
    from ._validate import check_bool

    token = _ROUTING.set(check_bool("use_adapters", "enabled", enabled))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def _is_torch_array(a: Any) -> bool:
    from array_api_compat import is_torch_array

    return is_torch_array(a)


def _is_jax_array(a: Any) -> bool:
    from array_api_compat import is_jax_array

    return is_jax_array(a)


REGISTRY: dict[str, Method[..., Any]] = {}

#: The named stateful layers every framework adapter (torch, Flax, Keras, Equinox) generates from the
#: registry: layer class name → registered method. One table; an adapter that cannot offer one (or
#: offers more) says so where it builds its layers.
NAMED_LAYERS: dict[str, str] = {
    "BatchWhitening": "batch_whitening",
    "DecorrelatedBatchNorm": "decorrelated_batch_norm",
    "IterNorm": "iter_norm",
    "WhiteningColoring": "whitening_coloring",
    "BatchRenorm": "batch_renorm",
    "GhostBatchNorm": "ghost_batch_norm",
    "SwitchableNorm": "switchable_norm",
    "LpBatchNorm": "lp_batch_norm",
    "MeanOnlyBatchNorm": "mean_only_batch_norm",
    "BatchGroupNorm": "batch_group_norm",
    "BatchInstanceNorm": "batch_instance_norm",
    "FilterResponseNorm": "filter_response_norm",
}


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
    channels: "Sequence[str] | Callable[[Callable[[str], Any]], Sequence[str]]" = (),
) -> Callable[[Callable[P, R]], Method[P, R]]:
    """Decorator: turn ``forward(*args) -> (out, Residuals)`` into a registered :class:`Method`.

    The decorated function's name, signature and docstring become the public function's. Annotate
    it with the *user-facing* return type, what calling the method returns (``-> Array``, ``->
    Array | NormResult``): type checkers then see the public function as ``Method[P, R]``, whose
    call takes the function's parameters ``P`` and returns ``R`` and whose ``forward`` returns
    ``(R, Residuals)``. (``Array`` is ``Any``, so the function's own ``return out, residuals``
    type-checks; a function annotated with a precise type, e.g. a NamedTuple, marks that return
    with ``# type: ignore[return-value]``.)

    ``channels`` names the parameters laid out (N, C, *S) like the input — ``("input",)``, ``("input",
    "out")``, ``("content", "style")`` — or is a callable ``channels(arg)`` returning them for a call
    (``arg(name)`` gives an argument's value; it raises ``ValueError`` where the call has no channel
    axis). Such a method gains a keyword-only ``channel_axis: int = 1`` in its public signature and
    docstring: a call with the channels on another axis runs the formulas on a permuted view and
    returns the output, and its backward the gradients, in the caller's layout.
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
            channels=channels,
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
