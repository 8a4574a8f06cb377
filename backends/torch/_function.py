"""``torch.autograd.Function`` wrappers generated from the registry (one per :class:`normref.Method`).

Each wrapper runs ``Method.forward`` in the forward and ``Method.backward`` (normref's analytic
backward) in the backward; torch's autograd never traces the forward formula for first derivatives.

Design (why it looks the way it does)
- ``forward`` + ``setup_context`` style (the one ``torch.func`` supports). ``forward`` cannot reach
  ``ctx``, so the residual arrays travel out of ``forward`` as extra outputs, marked
  non-differentiable in ``setup_context`` and dropped by the public wrapper. A residual that *is* an
  input or the primary output is not returned again (returning an input as an output of a custom
  Function makes autograd treat it as a view of that input); it is recorded by position instead.
  A residual that shares storage with an input (a reshape of x, say) or with the output (x̂ = y
  without affine) is cloned; the output itself is never saved, so in-place ops on it stay legal.
- First derivatives (``torch.is_grad_enabled()`` is False inside ``backward``): the saved residuals
  are handed to ``Method.backward``; nothing is recomputed.
- Second derivatives (``create_graph=True``, so grad mode is on inside ``backward``): the saved
  residuals are detached non-differentiable outputs, so differentiating the backward through them would
  drop every term that flows through the residuals (the silent-zero bug of the prototype). Instead the
  forward is recomputed from the saved *inputs* under ``torch.enable_grad()`` and the analytic
  backward runs on those fresh residuals: since it is written in array-API operations on torch tensors,
  torch's autograd differentiates it exactly (the derivative of the analytic first derivative).
- ``ctx.needs_input_grad`` is honoured: no backward at all when no differentiable input needs a
  gradient, and ``None`` for every input that does not need one. The mask goes down to
  ``Method.backward(..., needs=mask)``, which hands it to a registered backward that declares
  ``needs`` (that backward then skips the unwanted gradients' work) and discards the unwanted
  gradients of one that does not.
- Names: the Function of method ``batch_norm`` is the class ``NormrefBatchNorm``, so its autograd node
  (``y.grad_fn``, profiler traces, ``torchviz``/graph dumps) is ``NormrefBatchNormBackward`` — the
  method's name, prefixed so that it never reads as torch's own ``NativeBatchNormBackward0``.
- ``torch.compile(fullgraph=True)``: TorchDynamo traces ``Fn.apply`` (forward and backward become
  the compiled graph: normref's analytic backward is what the compiled backward computes) as long as
  nothing on the way needs a Python value of a tensor or a context variable. So: the Functions live
  in a plain dict, created for every registered method when this module is imported (a class created
  on the first call inside a compiled region would break the graph; a method registered later gets
  its Function on its first eager call, or ``function(name)`` outside the compiled region); the
  kernel switch is read at trace time (``normref._kernels``); value checks that need concrete values
  are skipped while tracing, as under ``jax.jit`` (``normref._xp.is_compiling``: call eagerly once
  to have them); and the storage-aliasing tests below, which read data pointers, are replaced under
  tracing by their conservative answer (copy an output that is an input; save residual views as
  they are).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from normref.registry import REGISTRY, Method, Residuals, get

__all__ = ["function", "autograd_function", "apply", "node_name"]

# Recompute the residuals from the inputs when the backward itself is differentiated (create_graph).
# Switching it off reproduces the prototype's silent-zero second derivatives; only the test that
# proves gradgradcheck catches that bug does so.
_RECOMPUTE_FOR_SECOND_ORDER = True


class _Call:
    """Per-call non-tensor data shared by forward, setup_context and backward (no tensors inside:
    the call's array arguments are replaced by the Function's own inputs when the forward runs)."""

    __slots__ = ("args", "kwargs", "slots", "out_type", "n_fields", "layout", "static", "meta")

    # (no Method inside: TorchDynamo rebuilds the context's attributes when it traces the backward,
    # and cannot rebuild a Method object; the Function's code holds its method in a closure)
    def __init__(self, args, kwargs, slots):
        self.args = args  # the call's positional arguments, as given
        self.kwargs = kwargs  # its keyword arguments, as given
        self.slots = slots  # Method._array_slots: (name, position or None, default) per array parameter
        self.out_type = None
        self.n_fields = 1
        self.layout: tuple = ()
        self.static = ()
        self.meta = None

    def run_forward(self, method: Method, arrays):
        """``method.forward`` on ``arrays`` (one per array parameter) and the call's other arguments."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for (name, pos, _), a in zip(self.slots, arrays):
            if pos is not None and pos < len(args):
                args[pos] = a
            elif a is not None or name in kwargs:
                kwargs[name] = a
        return method.forward(*args, **kwargs)


def _arrays_of(m: Method, args: tuple, kwargs: dict) -> "list | None":
    """The call's array arguments (one per array parameter, ``None`` where not given), read off the
    positions and names without ``inspect`` binding (a few microseconds a call); ``None`` when the
    call does not plainly fit the signature (too many positional arguments, an unknown keyword, an
    argument given twice): then :meth:`Method.bind` runs and raises its error."""
    if len(args) > m._n_positional or not m._names.issuperset(kwargs):
        return None
    arrays = []
    for name, pos, default in m._array_slots:
        if pos is not None and pos < len(args):
            if name in kwargs:
                return None
            arrays.append(args[pos])
        else:
            arrays.append(kwargs.get(name, default))
    return arrays


def _shares_storage(a: torch.Tensor, others) -> bool:
    if torch.compiler.is_compiling():  # fake tensors have no data pointer: only identity is known
        return any(a is o for o in others)
    try:
        p = a.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (functorch wrappers, meta): treat as not shared
        return False
    for o in others:
        if isinstance(o, torch.Tensor):
            try:
                if o.untyped_storage().data_ptr() == p and p != 0:
                    return True
            except Exception:
                pass
    return False


def _view_of(r: torch.Tensor, arrays) -> int | None:
    """The position of the input whose memory ``r`` is a view of (same storage and dtype), or ``None``."""
    # (under torch.compile a residual view is saved as it is, first: fake tensors have no storage)
    if torch.compiler.is_compiling() or not isinstance(r, torch.Tensor) or not r._is_view():
        return None
    for i, a in enumerate(arrays):
        if isinstance(a, torch.Tensor) and a.dtype == r.dtype and a.device == r.device:
            try:
                if a.untyped_storage().data_ptr() == r.untyped_storage().data_ptr() != 0:
                    return i
            except Exception:  # tensors without storage (functorch wrappers): not a plain view
                return None
    return None


# The Functions and public wrappers by method name: plain dicts (TorchDynamo traces a dict lookup;
# it traces *through* an lru_cache wrapper, and would meet the class creation on every call).
_FUNCTIONS: dict[str, type] = {}
_WRAPPERS: dict[str, Callable] = {}


def autograd_function(name: str) -> type:
    """The ``torch.autograd.Function`` subclass for the registered method ``name``.

    Its class name is ``Normref<CamelName>`` (``NormrefBatchNorm`` for ``batch_norm``), so its autograd
    node is ``Normref<CamelName>Backward`` (see :func:`node_name`).

    Parameters
    ----------
    name : str
        The registered method's name.

    Returns
    -------
    cls : type
        The ``torch.autograd.Function``: ``apply(call, *arrays)`` takes a :class:`_Call` and one tensor
        (or ``None``) per array parameter and returns ``(*output_fields, *residual_arrays)``; use
        :func:`function` for the public form.
    """
    fn = _FUNCTIONS.get(name)
    if fn is None:
        fn = _FUNCTIONS[name] = _make_autograd_function(get(name).name)
    return fn


def node_name(name_or_method: "str | Method") -> str:
    """The autograd node name of a method's outputs: ``y.grad_fn.name()``.

    Parameters
    ----------
    name_or_method : str or Method
        The registered method, or its name.

    Returns
    -------
    name : str
        ``"Normref<CamelName>Backward"``, e.g. ``"NormrefBatchNormBackward"`` for ``batch_norm``
        (torch's own batch norm node is ``NativeBatchNormBackward0``: no clash).
    """
    return f"Normref{_camel(get(name_or_method).name)}Backward"


def _make_autograd_function(name: str) -> type:
    m = get(name)
    n_arrays = len(m.array_params)
    diff_pos = tuple(i for i, p in enumerate(m.array_params) if p not in m.nondiff)
    nondiff_pos = frozenset(i for i, p in enumerate(m.array_params) if p in m.nondiff)

    # The methods below look their Method up in REGISTRY (a global: TorchDynamo can rebuild it when it
    # traces the backward) rather than closing over it (a closure cell holding a Method cannot be).
    class Fn:  # the namespace of the Function's methods; the class itself is made below with its name
        @staticmethod
        def forward(call: _Call, *arrays):
            out, res = call.run_forward(REGISTRY[name], arrays)
            if isinstance(out, tuple):
                call.out_type = type(out)
                fields = list(out)
            else:
                call.out_type = None
                fields = [out]
            call.n_fields = len(fields)
            # under torch.compile views and storages cannot be inspected (fake tensors): every output
            # is copied, the conservative answer (the compiler removes a copy of an intermediate)
            compiling = torch.compiler.is_compiling()
            # An auxiliary output (updated running statistics) that aliases an input is cloned, so
            # that no output of the Function is an input or a view of one.
            for j in range(1, len(fields)):
                f = fields[j]
                if isinstance(f, torch.Tensor) and (
                    compiling or f._is_view() or any(f is a for a in arrays) or _shares_storage(f, arrays)
                ):
                    fields[j] = f.clone()
            primary = fields[0]
            # The output must not be an input, share an input's storage, or be a view (a reshape of
            # the partitioned result): torch forbids in-place ops on view outputs of a custom
            # Function, and layers are followed by ReLU(inplace=True) in the wild. One copy then.
            if isinstance(primary, torch.Tensor) and (
                compiling or primary._is_view() or any(primary is a for a in arrays)
                or _shares_storage(primary, arrays)
            ):
                primary = fields[0] = primary.clone()
            layout = []
            extras = []
            for r in res.arrays:
                if r is None:
                    layout.append(("none",))
                    continue
                hit = next((i for i, a in enumerate(arrays) if r is a), None)
                again = None if hit is not None else next((j for j, e in enumerate(extras) if r is e), None)
                view_of = None if hit is not None or again is not None else _view_of(r, arrays)
                if hit is not None:
                    layout.append(("in", hit))
                elif again is not None:
                    # the same tensor twice in the residuals: saved once (TorchDynamo cannot wire a
                    # tensor saved twice: "Placeholder node not found in env")
                    layout.append(("extra", again))
                elif view_of is not None:
                    # a reshape of an input (the partition's view of x): saved as the input itself
                    # and rebuilt with the same geometry, instead of a full-size copy
                    layout.append(("view", view_of, tuple(r.shape), tuple(r.stride()), r.storage_offset()))
                else:
                    # a residual that is (or shares storage with) the output is copied: the output is
                    # not saved, so an in-place op on it (ReLU(inplace=True) after a norm layer, as
                    # with torch's own layers) cannot invalidate the backward
                    if _shares_storage(r, list(arrays) + fields):
                        r = r.clone()
                    layout.append(("extra", len(extras)))
                    extras.append(r)
            call.layout = tuple(layout)
            call.static = res.static
            call.meta = res.meta
            return (*fields, *extras)

        @staticmethod
        def setup_context(ctx, inputs, output):
            call = inputs[0]
            arrays = inputs[1:]
            nf = call.n_fields
            nondiff_out = [t for t in output[1:] if isinstance(t, torch.Tensor)]
            if nondiff_out:
                ctx.mark_non_differentiable(*nondiff_out)
            ctx.call = call
            # Non-differentiable array inputs (running statistics) are saved as copies: layers update
            # them in place after the forward (as torch's own layers do), which would otherwise trip
            # autograd's version check; their values at forward time are what the backward needs.
            kept = [
                a.detach().clone() if (i in nondiff_pos and isinstance(a, torch.Tensor)) else a
                for i, a in enumerate(arrays)
            ]
            y = output[0]
            ctx.out_like = (tuple(y.shape), y.dtype, y.device)
            ctx.save_for_backward(*kept, *output[nf:])

        @staticmethod
        def backward(ctx, *grad_outputs):
            call: _Call = ctx.call
            needs = ctx.needs_input_grad[1:]
            wanted = [i for i in diff_pos if needs[i]]
            mask = tuple(i in wanted for i in range(n_arrays))
            if not wanted:
                return (None,) * (1 + n_arrays)
            g = grad_outputs[0]
            saved = ctx.saved_tensors
            arrays = saved[:n_arrays]
            if g is None:  # materialize_grads off and the output unused: its gradient is zero
                shape, dtype, device = ctx.out_like
                g = torch.zeros(shape, dtype=dtype, device=device)
            if torch.is_grad_enabled() and _RECOMPUTE_FOR_SECOND_ORDER:
                # create_graph=True: recompute the residuals from the inputs with autograd recording,
                # so the analytic backward is differentiated through them too (second order).
                with torch.enable_grad():
                    _, res = call.run_forward(REGISTRY[name], arrays)
                    grads = REGISTRY[name].backward(res, g, needs=mask)
            else:
                extras = saved[n_arrays:]
                res_arrays = []
                for entry in call.layout:
                    kind = entry[0]
                    if kind == "none":
                        res_arrays.append(None)
                    elif kind == "in":
                        res_arrays.append(arrays[entry[1]])
                    elif kind == "view":
                        _, i, shape, stride, offset = entry
                        res_arrays.append(arrays[i].as_strided(shape, stride, offset))
                    else:
                        res_arrays.append(extras[entry[1]])
                grads = REGISTRY[name].backward(Residuals(res_arrays, call.static, call.meta), g, needs=mask)
            result = [None] * n_arrays
            for i in wanted:
                result[i] = grads[i]
            return (None, *result)

    # Created by name (torch names the autograd node after the class at class creation: renaming later
    # would leave every node "FnBackward")
    cls_name = f"Normref{_camel(name)}"
    return type(torch.autograd.Function)(cls_name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": Fn.__dict__["forward"],
        "setup_context": Fn.__dict__["setup_context"],
        "backward": Fn.__dict__["backward"],
        "__module__": __name__,
        "__qualname__": cls_name,
        "__doc__": f"torch.autograd.Function for normref.{name} (analytic backward from the registry).",
    })


def _camel(name: str) -> str:
    return "".join(w.capitalize() for w in name.split("_"))


def _check_arrays(m: Method, arrays: list) -> None:
    for p, a in zip(m.array_params, arrays):
        if a is not None and not isinstance(a, torch.Tensor):
            raise TypeError(
                f"normref.backends.torch.{m.name}: {p} must be a torch.Tensor or None; got {type(a).__name__}"
            )


# torch.autograd.Function.apply without its per-call inspect binding (see _function); the functorch
# clean-up it does first (dead wrappers of finished transforms) is kept
_BASE_APPLY = torch._C._FunctionBase.__dict__["apply"]
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead  # noqa: E402


def function(name_or_method: "str | Method") -> Callable:
    """``normref.<method>`` for torch tensors, differentiable through normref's analytic backward.

    The returned function has the method's signature and returns what the method returns (an array,
    or a NamedTuple whose auxiliary fields are non-differentiable). Works for every registered method,
    including those registered after this module was imported.

    Parameters
    ----------
    name_or_method : str or Method
        The registered method, or its name.

    Returns
    -------
    fn : callable
        The method for torch tensors (its docstring and signature are the method's).

    Examples
    --------
    ::

        from normref.backends import torch as nt
        y = nt.function("group_norm")(x, 4, w, b)     # or nt.group_norm(x, 4, w, b)
        y.sum().backward()                             # normref's analytic backward
    """
    name = get(name_or_method).name
    fn = _WRAPPERS.get(name)
    if fn is None:
        fn = _WRAPPERS[name] = _function(name)
    return fn


# Methods whose Function TorchDynamo 2.13 cannot trace (it fails wiring their saved tensors:
# "Placeholder node not found in env"): under torch.compile they run eagerly behind a graph break, as
# every method did before (fullgraph=True refuses them; tests/test_torch_compile.py checks both).
_EAGER_UNDER_COMPILE = frozenset({"whitening_coloring", "moving_average_batch_norm"})


def _apply_eagerly(name: str, args: tuple, kwargs: dict):
    return _WRAPPERS[name](*args, **kwargs)


def _function(name: str) -> Callable:
    m = get(name)
    Fn = autograd_function(name)

    def fn(*args: Any, **kwargs: Any):
        if name in _EAGER_UNDER_COMPILE and torch.compiler.is_compiling():
            return torch.compiler.disable(_apply_eagerly)(name, args, kwargs)
        arrays = _arrays_of(m, args, kwargs)
        if arrays is None:
            bound = m.bind(*args, **kwargs)  # raises "<name>: ..." for a call that does not fit
            args, kwargs = bound.args, bound.kwargs  # (every positional-or-keyword one in args)
            arrays = [bound.arguments.get(p) for p in m.array_params]
        _check_arrays(m, arrays)
        compiling = torch.compiler.is_compiling()
        if compiling and not (
            torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arrays)
        ):
            # nothing to differentiate in a compiled region: the formula itself goes into the graph
            # (TorchDynamo traces a Function without a grad-requiring input in another calling style)
            return m.forward(*args, **kwargs)[0]
        call = _Call(args, kwargs, m._array_slots)
        if compiling or torch._C._are_functorch_transforms_active():
            outs = Fn.apply(call, *arrays)  # TorchDynamo / torch.func see the Function as usual
        else:
            # torch's Function.apply binds its arguments to forward's signature with inspect on every
            # call (``bind_default_args``, ~20 µs); forward(call, *arrays) has no defaults to apply, so
            # that binding is the identity: call what Function.apply then calls
            outs = _BASE_APPLY.__get__(None, Fn)(call, *_unwrap_dead(tuple(arrays)))
        fields = outs[: call.n_fields]
        return call.out_type(*fields) if call.out_type is not None else fields[0]

    functools.update_wrapper(fn, m._forward)
    fn.__signature__ = m.signature
    fn.__name__ = fn.__qualname__ = m.name
    fn.__module__ = "normref.backends.torch"
    fn.method = m
    return fn


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
    out : tensor or NamedTuple
        What the method returns.
    """
    return function(name_or_method)(*args, **kwargs)


# Every method registered by now (all of normref's) gets its Function and wrapper at import, so that
# no class is created inside a compiled region (a few ms in all).
for _name in list(REGISTRY):
    function(_name)
del _name
