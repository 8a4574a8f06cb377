"""Result NamedTuples that say what they are when used as an array.

A training-mode call with running statistics returns a ``NamedTuple`` such as
``NormResult(output, running_mean, running_var)``. As a plain tuple it fails silently or without a
hint: ``y * 2`` repeats the tuple into a 6-tuple, ``y + 1`` and ``y.sum()`` fail naming only
``tuple``/the class. :func:`result_tuple` (a class decorator applied to every result type in
normref) keeps everything a tuple does — unpacking, indexing, ``len``, iteration, ``==`` with
another tuple, hashing, ``_replace``/``_asdict``, pickling, JAX pytree flattening, torch autograd
outputs — and makes the array-like uses raise with the fix in the message:

- arithmetic (``+ - * / // % ** @``, reflected too, unary ``- + abs ~``) and ordering comparisons,
  ``==``/``!=`` with an array or a number, NumPy ufuncs (``np.exp(y)``, ``array * y``) and
  ``np.asarray(y)``: ``TypeError``;
- an unknown attribute (``y.sum()``, ``y.shape``, ``y.backward``, ``y.dtype``): ``AttributeError``
  (so ``hasattr`` and ``getattr(y, name, default)`` keep working),

each saying e.g. ``NormResult is (output, running_mean, running_var); use result.output``.
Type checkers see the class unchanged (a NamedTuple), and flag ``y.sum()`` themselves.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._xp import is_array

__all__ = ["result_tuple"]

T = TypeVar("T", bound=type)

_BINARY = ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "divmod", "pow", "and", "or", "xor",
           "lshift", "rshift")
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "matmul": "@", "truediv": "/", "floordiv": "//", "mod": "%",
           "divmod": "divmod", "pow": "**", "and": "&", "or": "|", "xor": "^", "lshift": "<<", "rshift": ">>",
           "neg": "unary -", "pos": "unary +", "abs": "abs()", "invert": "~",
           "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def hint(cls: type) -> str:
    """``"NormResult is (output, running_mean, running_var); use result.output for the array, ..."``."""
    fields = tuple(getattr(cls, "_fields", ()))
    first = fields[0] if fields else "output"
    return (
        f"{cls.__name__} is ({', '.join(fields)}); use result.{first} for the array, or unpack it: "
        f"{', '.join(fields)} = result"
    )


def _refuse(op: str):
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"unsupported operand for {_SYMBOL[op]}: {hint(type(self))}")

    method.__name__ = f"__{op}__"
    return method


def _compare(op: str):
    tuple_cmp = getattr(tuple, f"__{op}__")

    def method(self: Any, other: Any) -> Any:
        if op in ("eq", "ne"):
            if isinstance(other, tuple):
                return tuple_cmp(self, other)  # tuple equality, as before
            if not (is_array(other) or isinstance(other, (int, float, complex))):
                return NotImplemented  # e.g. None, a string: Python's default (unequal)
        raise TypeError(f"unsupported comparison {_SYMBOL[op]}: {hint(type(self))}")

    method.__name__ = f"__{op}__"
    return method


def _getattr(self: Any, name: str) -> Any:
    # called only when normal lookup fails (a field, a tuple method, ``_replace`` ... are found first)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}: {hint(type(self))}")


def _array_ufunc(self: Any, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
    raise TypeError(f"unsupported operand for numpy.{getattr(ufunc, '__name__', ufunc)}: {hint(type(self))}")


def _array(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise TypeError(f"cannot convert a {type(self).__name__} to an array: {hint(type(self))}")


def result_tuple(cls: T) -> T:
    """Class decorator for a result ``NamedTuple``: array-like uses raise with a hint naming its
    fields (see the module docstring). Returns the class itself (pickling, ``isinstance`` and JAX's
    NamedTuple pytree handling are unchanged)."""
    if not (issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise TypeError(f"result_tuple: expected a NamedTuple class; got {cls!r}")
    for op in _BINARY:
        setattr(cls, f"__{op}__", _refuse(op))
        setattr(cls, f"__r{op}__", _refuse(op))
    for op in ("neg", "pos", "abs", "invert"):
        setattr(cls, f"__{op}__", _refuse(op))
    for op in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(cls, f"__{op}__", _compare(op))
    setattr(cls, "__hash__", tuple.__hash__)  # defining __eq__ would unset it
    setattr(cls, "__getattr__", _getattr)
    # NumPy: ``array * result`` and ``np.exp(result)`` defer to this (not a silent object array);
    # ``np.asarray(result)`` calls __array__ (not a ragged-array error)
    setattr(cls, "__array_ufunc__", _array_ufunc)
    setattr(cls, "__array__", _array)
    return cls
