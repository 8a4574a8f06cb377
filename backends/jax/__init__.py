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

Across devices. Methods with batch statistics (those taking normref's ``sync=``) also take Flax's
keyword-only ``axis_name=``: ``nj.batch_norm(x, ..., axis_name="batch")`` is
``sync=JaxReducer("batch")`` (:mod:`normref.backends.distributed.jax`: ``lax.all_gather`` /
``lax.psum`` over the named axis), so in training the statistics are the global batch's under
``jax.shard_map``, ``jax.pmap`` and ``jax.vmap(..., axis_name=...)``. Every method works under
``shard_map(check_vma=True)``: the backward's cotangents get their primals' varying manual axes
(``psum`` over the axes a cotangent varies over and its primal does not, e.g. a replicated
parameter's gradient; ``pvary`` the other way), which is what JAX's own autodiff does — the gradient
of a replicated parameter is Σ over devices, so no ``psum`` of gradients under shard_map (under pmap
or vmap, where nothing is typed, each device gets its part and the caller sums). Un-jitted shard_map
(evaluated operation by operation) refuses custom_vjp with symbolic zeros; there, where nothing is
differentiated, the forward runs directly.

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

Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``). JAX refuses forward mode on a
``custom_vjp``; ``function(name, mode="jvp")`` gives the same method as a ``jax.custom_jvp``
(:func:`custom_jvp_function`) whose tangent rule is the *transpose of normref's backward*: the
backward ``ḡ ↦ Jᵀḡ`` is linear in the cotangent, ``jax.linear_transpose`` turns it into ``t ↦ J t``,
so the JVP is normref's analytic derivative, not JAX's differentiation of the forward formula.
Reverse mode through it (``jax.grad``, ``jacrev``) transposes that linear rule back, which yields
the backward's own operations again: the gradient is the same number as the ``"vjp"`` mode's (to
rounding; bit for bit on layer norm), at the same cost under ``jit`` (five or six more
reshapes/broadcasts in the jaxpr, the same XLA fusions) but 2.5-3× the time eagerly (the backward is
traced and transposed on every call). Hessians: ``jax.hessian(loss)`` (forward over reverse) with
``mode="jvp"``; with the default mode, reverse over reverse works (``jax.jacrev(jax.grad(loss))``,
or Hessian-vector products ``jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))``). Second and
higher derivatives in either mode are JAX's derivatives of normref's first-order rules (the
forward's residuals and the backward's operations). The default is ``"vjp"`` (:data:`DEFAULT_MODE`;
``NORMREF_JAX_MODE=jvp`` in the environment makes ``"jvp"`` the default for every function, the
attribute access ``nj.<method>`` and the layers built on it): only a ``custom_vjp`` sees the
cotangent of the state outputs and can refuse a concrete nonzero one — in ``"jvp"`` mode the state's
tangent is a symbolic zero and its cotangent is always dropped (as under ``jit`` in the default
mode); and eagerly the ``"vjp"`` mode is the cheaper. A backward that is linear in ``ḡ`` but not
operation by operation (matrix_exp_orthogonal's Fréchet adjoint squares a block matrix holding
``ḡ``) cannot be transposed directly; for it the tangent rule is ``jax.vjp`` of the backward at a
zero ``ḡ`` (the VJP of a linear map is its transpose), which JAX computes by differentiating the
backward, never the forward.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from normref.registry import Method, Residuals, get

__all__ = ["function", "apply", "custom_vjp_function", "custom_jvp_function", "MODES", "DEFAULT_MODE"]

#: The two differentiation modes of :func:`function`: ``"vjp"`` (a ``jax.custom_vjp``: reverse mode,
#: the default) and ``"jvp"`` (a ``jax.custom_jvp`` whose tangent rule is the transpose of normref's
#: backward: forward mode too, ``jax.jvp``/``jacfwd``/``hessian``).
MODES = ("vjp", "jvp")
#: The mode of :func:`function` / :func:`apply` / attribute access when none is given: ``"vjp"``,
#: or the environment variable ``NORMREF_JAX_MODE`` (``"vjp"`` or ``"jvp"``) read at import.
DEFAULT_MODE = os.environ.get("NORMREF_JAX_MODE", "vjp") or "vjp"
if DEFAULT_MODE not in MODES:
    raise ValueError(f"normref.backends.jax: the environment variable NORMREF_JAX_MODE must be one of {MODES}; "
                     f"got {DEFAULT_MODE!r}")


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


def _run_forward(m: Method, static, arrays):
    """``Method.forward`` on the static tuple and the arrays: the (output, residuals) pair."""
    arguments = dict(static)
    # JAX may hand the rules NumPy values (constants folded by its own transforms): make every
    # array a JAX array so that the formula runs in jax.numpy, one library for all arguments
    arguments.update(zip(m.array_params, (_as_jax(a) for a in arrays)))
    ordered = {p: arguments[p] for p in m.signature.parameters}
    b = inspect.BoundArguments(m.signature, ordered)
    return m.forward(*b.args, **b.kwargs)


@functools.lru_cache(maxsize=None)
def custom_vjp_function(name: str) -> Callable:
    """The ``jax.custom_vjp`` core of method ``name``: ``core(static, *arrays)``.

    Parameters
    ----------
    name : str
        The registered method's name.

    Returns
    -------
    core : callable
        ``core(static, *arrays)``: ``static`` is the hashable tuple ``((param, value), ...)`` of the
        non-array arguments and ``arrays`` holds one array (or ``None``) per array parameter, in
        signature order.
    """
    m = get(name)
    names = m.array_params
    run_forward = functools.partial(_run_forward, m)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(static, *arrays):
        return run_forward(static, arrays)[0]

    def fwd(static, *primals):
        # symbolic_zeros=True: each array comes as a CustomVJPPrimal (value, perturbed); None stays None
        arrays = tuple(None if p is None else p.value for p in primals)
        needs = tuple(p is not None and bool(p.perturbed) for p in primals)
        out, res = run_forward(static, arrays)
        # the manual mesh axes each primal varies over (shard_map with check_vma): its cotangent must
        # vary over exactly these (see _match_varying)
        vary = tuple(None if a is None else _varying(a) for a in arrays)
        return out, (res, _Static((needs, vary)))

    def bwd(static, saved, cotangent):
        res, (needs, vary) = saved[0], saved[1].value
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
        return tuple(_match_varying(d, v) for d, v in zip(grads, vary))

    core.defvjp(fwd, bwd, symbolic_zeros=True)
    return core


@functools.lru_cache(maxsize=None)
def custom_jvp_function(name: str) -> Callable:
    """The ``jax.custom_jvp`` core of method ``name`` (forward mode): ``core(static, *arrays)``.

    The tangent rule is the transpose of normref's analytic backward. For residuals ``r`` of the
    forward at ``x``, the backward ``ḡ ↦ (J₁ᵀḡ, …, J_kᵀḡ)`` (one Jacobian-transpose per array
    parameter) is linear in the cotangent ``ḡ``; its transpose ``(t₁, …, t_k) ↦ Σᵢ Jᵢ tᵢ`` is the
    JVP, obtained with ``jax.linear_transpose`` of the backward (traced with ``ḡ`` abstract, so the
    residual-only work is done once). Reverse mode (``jax.grad``/``vjp``/``jacrev``) linearizes this
    rule and transposes the linear part back: transposing the transposed backward gives the backward's
    own operations, so the gradient is again normref's analytic backward (no trace of the forward
    formula is differentiated at first order). Higher orders differentiate these rules in turn.

    Parameters
    ----------
    name : str
        The registered method's name.

    Returns
    -------
    core : callable
        ``core(static, *arrays)``, as :func:`custom_vjp_function`'s, a ``jax.custom_jvp``.

    Notes
    -----
    Only the inputs JAX perturbs (a non-``SymbolicZero`` tangent; ``symbolic_zeros=True``) enter the
    backward's ``needs`` mask, so ``jax.jvp`` in one argument costs the backward of that argument
    alone. Auxiliary outputs (running statistics) are state: their tangent is a symbolic zero, and a
    cotangent for them in reverse mode is dropped (the ``"vjp"`` mode refuses a concrete nonzero one
    eagerly; see the module docstring).
    """
    m = get(name)
    run_forward = functools.partial(_run_forward, m)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def core(static, *arrays):
        return run_forward(static, arrays)[0]

    def jvp(static, primals, tangents):
        arrays = tuple(_as_jax(a) for a in primals)
        out, res = run_forward(static, arrays)
        needs = tuple(
            a is not None and p not in m.nondiff and t is not None and not isinstance(t, SymbolicZero)
            for p, a, t in zip(m.array_params, arrays, tangents)
        )
        dy = _tangent_of_output(m, res, m.primary(out), arrays, tangents, needs)
        if not isinstance(out, tuple):
            return out, dy
        aux = tuple(_zero_tangent(a) for a in out[1:])  # state: no tangent (see the docstring)
        return out, (type(out)(dy, *aux) if hasattr(out, "_fields") else (dy, *aux))

    core.defjvp(jvp, symbolic_zeros=True)
    return core


def _zero_tangent(a: Any) -> Any:
    """The symbolic zero tangent of output ``a`` (``None`` stays ``None``)."""
    return None if a is None else SymbolicZero(jax.typeof(a).to_tangent_aval())


def _tangent_of_output(m: Method, res: Residuals, y: Any, arrays: tuple, tangents: tuple, needs: tuple) -> Any:
    """``Σᵢ Jᵢ tᵢ``: the transpose of ``ḡ ↦ m.backward(res, ḡ, needs)`` applied to the tangents.

    The backward is traced once with an abstract cotangent of ``y``'s type; ``jax.linear_transpose``
    then runs its transposed operations on the tangents of the perturbed inputs. The cotangents are
    given their primals' varying manual axes first (:func:`_match_varying`, as in the ``"vjp"`` mode),
    so that under ``shard_map(check_vma=True)`` each tangent meets a cotangent of its own type and the
    transpose of a ``psum`` (a replicated parameter's gradient) is the ``pvary`` of its tangent."""
    if not any(needs):
        return _zero_tangent(y)
    vary = tuple(None if a is None else _varying(a) for a in arrays)
    kept: list[int] = []

    def pullback(g):
        grads = [_match_varying(d, v) for d, v in zip(m.backward(res, g, needs=needs), vary)]
        kept[:] = [i for i, d in enumerate(grads) if d is not None]
        return tuple(grads[i] for i in kept)

    key = (m.name, res.static)
    try:
        hash(key)
    except TypeError:  # static data that cannot be a key: the method alone
        key = (m.name,)
    if key not in _NOT_STRUCTURALLY_LINEAR:
        try:
            transpose = jax.linear_transpose(pullback, y)  # traces the backward: fills ``kept``
            if not kept:  # the perturbed inputs have no gradient (e.g. an empty input): no tangent
                return _zero_tangent(y)
            (dy,) = transpose(tuple(_as_jax(tangents[i]) for i in kept))
            return dy
        except (AssertionError, NotImplementedError):
            # A backward that is linear in ḡ but not operation by operation (matrix_exp_orthogonal's
            # Fréchet adjoint squares a block matrix holding ḡ; its ḡ² block is structurally zero):
            # JAX cannot transpose it directly. Remembered for this method and static data.
            _NOT_STRUCTURALLY_LINEAR.add(key)
    # The VJP of the linear map ḡ ↦ B ḡ at any point is Bᵀ: at ḡ = 0, jax.vjp transposes the
    # backward's own derivative (JAX differentiates the backward, never the forward formula).
    _, transpose = jax.vjp(pullback, jnp.zeros_like(y))
    if not kept:
        return _zero_tangent(y)
    (dy,) = transpose(tuple(_as_jax(tangents[i]) for i in kept))
    return dy


# (method name, residuals' static data) whose backward JAX cannot transpose operation by operation
_NOT_STRUCTURALLY_LINEAR: set = set()


class _Static:
    """A pytree node with no leaves: hashable Python data carried through the residuals."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


try:  # registered once per process
    jax.tree_util.register_pytree_node(_Static, lambda s: ((), s.value), lambda v, _: _Static(v))
except ValueError:  # pragma: no cover - already registered
    pass


def _varying(a: Any) -> frozenset:
    """The manual mesh axes ``a`` varies over inside ``shard_map(check_vma=True)`` (empty elsewhere).

    JAX ≥ 0.9 keeps them in ``typeof(a).mat.varying``; earlier versions in ``typeof(a).vma``."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _match_varying(d: Any, want: "frozenset | None") -> Any:
    """The cotangent ``d`` with the varying manual axes ``want`` of its primal (JAX's type rule).

    Inside ``shard_map(check_vma=True)`` a replicated (invariant) primal that met a batch-sharded
    (varying) one gets a cotangent that varies over the batch axis: each device holds its shard's
    share ∂L_i/∂w. Plain JAX autodiff transposes the implicit ``pvary`` of the forward into a
    ``psum``, so the cotangent of an invariant primal is Σ_i ∂L_i/∂w = ∂(Σ_i L_i)/∂w, identical on
    every device. The same here: ``psum`` over the axes the cotangent varies over and the primal does
    not; ``pvary`` (``pcast(to="varying")``) over the axes the primal varies over and the cotangent
    does not (a cotangent that happens to be the same on every device). Outside shard_map, or with
    check_vma=False, both sets are empty and ``d`` is returned unchanged."""
    if d is None or want is None or isinstance(d, SymbolicZero):
        return d
    have = _varying(d)
    extra = tuple(sorted(have - want, key=str))
    if extra:
        d = jax.lax.psum(d, extra)
    missing = tuple(sorted(want - have, key=str))
    if missing:
        d = jax.lax.pcast(d, missing, to="varying") if hasattr(jax.lax, "pcast") else jax.lax.pvary(d, missing)
    return d


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


def function(name_or_method: "str | Method", mode: "str | None" = None) -> Callable:
    """``normref.<method>`` for JAX arrays, differentiated through normref's analytic backward.

    Same signature and outputs as the method. Works for every registered method, including those
    registered after this module was imported.

    Parameters
    ----------
    name_or_method : str or Method
        The registered method, or its name.
    mode : {"vjp", "jvp"} or None, default None
        ``"vjp"``: a ``jax.custom_vjp`` (reverse mode: ``grad``, ``vjp``, ``jacrev``, grad-of-grad).
        ``"jvp"``: a ``jax.custom_jvp`` whose tangent rule is the transpose of the backward
        (:func:`custom_jvp_function`): forward mode too (``jvp``, ``jacfwd``, ``hessian``), and reverse
        mode by JAX's transposition of that rule. ``None``: :data:`DEFAULT_MODE` (``"vjp"`` unless the
        environment variable ``NORMREF_JAX_MODE`` said otherwise at import).

    Returns
    -------
    fn : callable
        The method for JAX arrays, a ``jax.custom_vjp`` (or ``custom_jvp``) whose derivatives are the
        method's backward.

    Notes
    -----
    Why ``"vjp"`` is the default: in it a concrete nonzero cotangent for an auxiliary (state) output
    is refused eagerly (module docstring), which a ``custom_jvp`` cannot see — JAX transposes its
    tangent rule without calling back, so the state's cotangent is dropped as under ``jit``.
    The rest of the JAX test set passes in both modes (``NORMREF_JAX_MODE=jvp`` runs it with forward
    mode as the default); eagerly (no ``jit``) the ``"vjp"`` mode is 2.5-3× faster, under ``jit`` the
    two cost the same.

    Examples
    --------
    ::

        from normref.backends import jax as nj
        loss = lambda x, w, b: nj.group_norm(x, 2, w, b).sum()
        dx, dw, db = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
        # forward mode: Jacobian-vector products, forward-over-reverse Hessians
        ln = function("layer_norm", mode="jvp")
        y, t = jax.jvp(lambda x: ln(x, (5,)), (x,), (v,))
        h = jax.hessian(lambda x: jnp.sum(jnp.sin(ln(x, (5,)))))(x)
    """
    if mode is None:
        mode = DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"normref.backends.jax.function: mode must be one of {MODES}; got {mode!r}")
    return _function(get(name_or_method).name, mode)


@functools.lru_cache(maxsize=None)
def _function(name: str, mode: str = "vjp") -> Callable:
    m = get(name)
    core = custom_jvp_function(name) if mode == "jvp" else custom_vjp_function(name)
    array_set = set(m.array_params)
    synced = "sync" in m.signature.parameters  # statistics over the batch: axis_name= is offered

    def fn(*args: Any, axis_name: Any = None, **kwargs: Any):
        if axis_name is not None:
            if not synced:
                raise TypeError(f"normref.backends.jax.{m.name}: axis_name is only taken by methods with batch "
                                f"statistics (those with a sync argument); {m.name} has none")
            kwargs["sync"] = _axis_reducer(m.name, axis_name, kwargs.get("sync"))
        bound = m.bind(*args, **kwargs)
        static = tuple(
            (p, _freeze(m.name, p, v)) for p, v in bound.arguments.items() if p not in array_set
        )
        # NumPy (or Python) arrays become JAX arrays: the forward must run in jax.numpy
        arrays = tuple(_as_jax(bound.arguments[p]) for p in m.array_params)
        try:
            return core(static, *arrays)
        except NotImplementedError as e:
            # Un-jitted shard_map evaluates each operation eagerly on its base trace, which refuses
            # custom_vjp with symbolic_zeros. That trace is reached only when no differentiating
            # transformation sits above it (a JVP/linearize trace would have taken the custom_vjp
            # itself), so the forward alone is the answer there.
            if "symbolic_zeros support with shard_map" not in str(e):
                raise
            return _run_forward(m, static, arrays)[0]

    functools.update_wrapper(fn, m._forward)
    fn.__signature__ = _with_axis_name(m.signature) if synced else m.signature
    fn.__name__ = fn.__qualname__ = m.name
    fn.__module__ = "normref.backends.jax"
    fn.method = m
    fn.mode = mode
    return fn


def _axis_reducer(fn: str, axis_name: Any, sync: Any):
    """``JaxReducer(axis_name)`` for ``axis_name=`` (Flax's convention); refuses both it and ``sync``."""
    if sync is not None:
        raise TypeError(f"normref.backends.jax.{fn}: give axis_name or sync, not both (got axis_name={axis_name!r} "
                        f"and sync={sync!r})")
    try:
        hash(axis_name)
    except TypeError:
        raise TypeError(f"normref.backends.jax.{fn}: axis_name must be a hashable axis name (a str or a tuple of "
                        f"them); got {type(axis_name).__name__}") from None
    from normref.backends.distributed.jax import JaxReducer

    return JaxReducer(axis_name)


def _with_axis_name(sig: inspect.Signature) -> inspect.Signature:
    """The method's signature plus the keyword-only ``axis_name=None``."""
    params = list(sig.parameters.values())
    kw = inspect.Parameter("axis_name", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Hashable | None")
    i = next((j for j, q in enumerate(params) if q.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:i] + [kw] + params[i:])


def apply(name_or_method: "str | Method", *args: Any, **kwargs: Any):
    """``function(name_or_method)(*args, **kwargs)``.

    Parameters
    ----------
    name_or_method : str or Method
        The registered method, or its name.
    *args : Any
        The method's positional arguments.
    **kwargs : Any
        The method's keyword arguments.

    Returns
    -------
    out : array or NamedTuple
        What the method returns.
    """
    return function(name_or_method)(*args, **kwargs)


def __getattr__(name: str):
    # normref.backends.jax.<method> for every registered method (lazy: registered at any time)
    from normref.registry import REGISTRY

    if name in REGISTRY:
        return function(name)
    raise AttributeError(f"module 'normref.backends.jax' has no attribute {name!r}")
