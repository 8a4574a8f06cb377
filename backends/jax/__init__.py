"""normref for JAX: every registered method as a ``jax.custom_vjp`` function, generated from the registry.

    from normref.backends import jax as nj
    y = nj.group_norm(x, 4, w, b)                 # any registered method name works as an attribute
    f = nj.function("iter_norm")                  # the same, looked up by name (or by Method)
    jax.grad(lambda x: nj.layer_norm(x, (5,)).sum())(x)

The forward rule is ``Method.forward`` (its ``Residuals`` are a registered pytree: the arrays are
leaves, ``static`` and ``meta`` are auxiliary data); the backward rule is ``Method.backward``,
normref's analytic backward. Because that backward is written in array-API operations (jax.numpy
here), JAX differentiates it in turn: grad-of-grad works, and so do ``jax.jit`` and ``jax.vmap``.

Arguments: the method's array parameters are primal inputs of the custom_vjp function (``None`` is an
empty pytree); arrays that carry no gradient (running statistics) get a zero cotangent. Every other
argument (ints, floats, strings, tuples, ``None``) is static: it goes to ``nondiff_argnums`` as one
hashable tuple, lists are turned into tuples (``normalized_shape=[3, 4]``), and an unhashable value
raises ``TypeError`` naming the argument. Under ``jax.jit`` static arguments must be Python values
(close over them or mark them ``static_argnums``), as for any JAX function.

Which gradients are computed: the custom_vjp is defined with ``symbolic_zeros=True``, so the forward
rule learns which primal inputs JAX differentiates (``perturbed``); that mask is passed to
``Method.backward(..., needs=mask)`` like torch's ``needs_input_grad`` (a registered backward that
declares ``needs`` skips the rest), and a primary cotangent that is a symbolic zero costs no backward.

Auxiliary outputs (the updated running statistics of a NamedTuple result) are state, not
differentiable outputs, as in torch (where they are marked non-differentiable): normref's backward
has no term for them. Their cotangent is normally a symbolic zero (state returned through
``has_aux``, or unused) and is then free. A cotangent that is not zero means the loss was
differentiated through the running statistics, which normref does not support; what happens then
depends on whether the value can be seen:

- eagerly (no ``jit``), the cotangent is a concrete array: a nonzero one raises ``ValueError`` naming
  the field (a concrete zero is accepted);
- under ``jax.jit``, ``lax.scan``/``while_loop``/``cond`` bodies (which instantiate zero
  cotangents for their carries) or other tracing, the value cannot be inspected and raising on a
  structurally nonzero cotangent would break legitimate scans that carry the state: the cotangent is
  **dropped**, i.e. treated as zero. Use ``jax.lax.stop_gradient`` on running statistics you feed
  into a loss to make that explicit.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from normref.registry import Method, Residuals, get

__all__ = ["function", "apply", "custom_vjp_function"]


def _flatten_residuals(r: Residuals):
    return tuple(r.arrays), (r.static, r.meta)


def _unflatten_residuals(aux, children) -> Residuals:
    static, meta = aux
    return Residuals(tuple(children), static, meta)


try:  # registered once per process; a second import of this module must not fail
    jax.tree_util.register_pytree_node(Residuals, _flatten_residuals, _unflatten_residuals)
except ValueError:  # pragma: no cover - already registered
    pass


def _freeze(fn: str, name: str, v: Any) -> Any:
    """A hashable version of a static argument (lists → tuples), or TypeError naming it."""
    if isinstance(v, list):
        v = tuple(v)
    if isinstance(v, tuple):
        return tuple(_freeze(fn, name, e) for e in v)
    try:
        hash(v)
    except TypeError:
        raise TypeError(
            f"normref.backends.jax.{fn}: {name} is a static (non-array) argument and must be hashable "
            f"(an int, float, str, tuple or None); got {type(v).__name__}"
        ) from None
    return v


@functools.lru_cache(maxsize=None)
def custom_vjp_function(name: str) -> Callable:
    """The ``jax.custom_vjp`` core of method ``name``: ``core(static, *arrays)``.

    ``static`` is the hashable tuple ``((param, value), ...)`` of the non-array arguments and
    ``arrays`` holds one array (or ``None``) per array parameter, in signature order.
    """
    m = get(name)
    names = m.array_params

    def run_forward(static, arrays):
        arguments = dict(static)
        # JAX may hand the rules NumPy values (constants folded by its own transforms): make every
        # array a JAX array so that the formula runs in jax.numpy, one library for all arguments
        arguments.update(zip(names, (_as_jax(a) for a in arrays)))
        ordered = {p: arguments[p] for p in m.signature.parameters}
        b = inspect.BoundArguments(m.signature, ordered)
        return m.forward(*b.args, **b.kwargs)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(static, *arrays):
        return run_forward(static, arrays)[0]

    def fwd(static, *primals):
        # symbolic_zeros=True: each array comes as a CustomVJPPrimal (value, perturbed); None stays None
        arrays = tuple(None if p is None else p.value for p in primals)
        needs = tuple(p is not None and bool(p.perturbed) for p in primals)
        out, res = run_forward(static, arrays)
        return out, (res, _Static(needs))

    def bwd(static, saved, cotangent):
        res, needs = saved[0], saved[1].value
        if isinstance(cotangent, tuple):  # a NamedTuple result: output + auxiliary state
            g = cotangent[0]
            _check_aux_cotangents(m.name, type(cotangent)._fields if hasattr(cotangent, "_fields") else None,
                                  cotangent[1:])
        else:
            g = cotangent
        if isinstance(g, SymbolicZero):  # the output is not used by the loss: every gradient is zero
            return (None,) * len(names)
        g = _as_jax(g)  # callers (jax.test_util among them) may pass a NumPy cotangent
        grads = m.backward(res, g, needs=needs)
        # None is JAX's zero cotangent for a given array (running statistics, or no gradient), and
        # the only valid cotangent for an argument that was None: Method.backward returns exactly that
        return tuple(grads)

    core.defvjp(fwd, bwd, symbolic_zeros=True)
    return core


class _Static:
    """A pytree node with no leaves: hashable Python data carried through the residuals."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


try:  # registered once per process
    jax.tree_util.register_pytree_node(_Static, lambda s: ((), s.value), lambda v, _: _Static(v))
except ValueError:  # pragma: no cover - already registered
    pass


def _check_aux_cotangents(fn: str, fields, cts) -> None:
    """Refuse a concrete nonzero cotangent for an auxiliary (state) output; see the module docstring.

    Symbolic zeros are the normal case. A traced cotangent (jit, scan) cannot be inspected: dropped."""
    for j, ct in enumerate(cts, start=1):
        if ct is None or isinstance(ct, SymbolicZero):
            continue
        try:
            nonzero = bool(jnp.any(ct != 0))
        except jax.errors.ConcretizationTypeError:  # a tracer: the value is not known here
            continue
        if nonzero:
            name = fields[j] if fields else f"field {j}"
            raise ValueError(
                f"normref.backends.jax.{fn}: the output's {name} is state (updated running statistics), not a "
                f"differentiable output, but a nonzero cotangent arrived for it; apply jax.lax.stop_gradient "
                f"to it before using it in a loss (under jit such a cotangent cannot be seen and is dropped)"
            )


def _as_jax(a: Any) -> Any:
    if a is None or isinstance(a, jax.Array):  # tracers are jax.Array instances too
        return a
    return jnp.asarray(a)


def function(name_or_method: "str | Method") -> Callable:
    """``normref.<method>`` for JAX arrays, differentiated through normref's analytic backward.

    Same signature and outputs as the method. Works for every registered method, including those
    registered after this module was imported.

    Example::

        from normref.backends import jax as nj
        loss = lambda x, w, b: nj.group_norm(x, 2, w, b).sum()
        dx, dw, db = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    """
    return _function(get(name_or_method).name)


@functools.lru_cache(maxsize=None)
def _function(name: str) -> Callable:
    m = get(name)
    core = custom_vjp_function(name)
    array_set = set(m.array_params)

    def fn(*args: Any, **kwargs: Any):
        bound = m.bind(*args, **kwargs)
        static = tuple(
            (p, _freeze(m.name, p, v)) for p, v in bound.arguments.items() if p not in array_set
        )
        # NumPy (or Python) arrays become JAX arrays: the forward must run in jax.numpy
        arrays = tuple(_as_jax(bound.arguments[p]) for p in m.array_params)
        return core(static, *arrays)

    functools.update_wrapper(fn, m._forward)
    fn.__signature__ = m.signature
    fn.__name__ = fn.__qualname__ = m.name
    fn.__module__ = "normref.backends.jax"
    fn.method = m
    return fn


def apply(name_or_method: "str | Method", *args: Any, **kwargs: Any):
    """``function(name_or_method)(*args, **kwargs)``."""
    return function(name_or_method)(*args, **kwargs)


def __getattr__(name: str):
    # normref.backends.jax.<method> for every registered method (lazy: registered at any time)
    from normref.registry import REGISTRY

    if name in REGISTRY:
        return function(name)
    raise AttributeError(f"module 'normref.backends.jax' has no attribute {name!r}")
