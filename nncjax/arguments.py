"""Checks of scalar arguments (integers, real numbers, flags) and of whether a value is concrete.

Every public function that takes a count, a QP, a weight or a flag checks it here, so the rules are
the same everywhere: a bool is never an integer or a number (``True`` as a QP is a mistake, not 1), a
float is never an integer (``int(-20.5)`` would silently code at -20), complex numbers, strings and
arrays of more than one element are refused, and a 0-d NumPy or JAX array counts as its scalar. A
failed check raises :class:`~nncjax.errors.InputError` naming the argument.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import numpy as np

from nncjax.errors import InputError
from nncjax.tensor_policy import is_float_like

__all__ = ["check_array_kind", "check_flag", "check_int", "check_real", "is_concrete", "is_int"]


def is_concrete(x: Any) -> bool:
    """Whether ``x``'s value can be read now: it is not a tracer of ``jit`` / ``grad`` / ``vmap``.

    >>> seen = []
    >>> _ = jax.jit(lambda x: seen.append(is_concrete(x)) or x)(1.0)
    >>> is_concrete(1.0), seen
    (True, [False])
    """
    return not isinstance(x, jax.core.Tracer)


def _dtype(x: Any) -> np.dtype | None:
    """The dtype of a scalar ``x`` (Python, NumPy or 0-d array), or None if it is no concrete scalar."""
    if isinstance(x, (bool, np.bool_)) or not is_concrete(x):
        return None
    if isinstance(x, (int, float, np.integer, np.floating)):
        return np.asarray(x).dtype if not isinstance(x, int) else np.dtype(np.int64)
    if hasattr(x, "dtype") and hasattr(x, "shape") and tuple(x.shape) == ():
        return np.dtype(x.dtype)
    return None


def is_int(x: Any) -> bool:
    """Whether ``x`` is one concrete integer: a Python int, a NumPy integer or a 0-d integer array;
    never a bool or a float with an integral value.

    >>> is_int(3), is_int(np.int8(3)), is_int(np.array(3)), is_int(True), is_int(3.0)
    (True, True, True, False, False)
    """
    if type(x) is int:  # the common case, checked per tensor in the codec: skip the dtype machinery
        return True
    dt = _dtype(x)
    return dt is not None and np.issubdtype(dt, np.integer)


def _bounds(lo: Any, hi: Any, above: Any = None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    return "".join(f" {op} {v}" for op, v in ((">=", lo), (">", above), ("<=", hi)) if v is not None)


def check_int(x: Any, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """``x`` as a Python int after checking it is an integer (:func:`is_int`) in ``[lo, hi]`` (either
    bound may be None); raises InputError naming ``what`` otherwise.

    >>> check_int(np.int16(4), "steps", lo=0)
    4
    >>> check_int(2.0, "steps", lo=0)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: steps must be an integer >= 0, got 2.0
    """
    if is_int(x):
        v = operator.index(x.item() if hasattr(x, "item") else x)
        if (lo is None or v >= lo) and (hi is None or v <= hi):
            return v
    raise InputError(f"{what} must be an integer{_bounds(lo, hi)}, got {x!r}")


def check_real(x: Any, what: str, *, lo: float | None = None, above: float | None = None,
               hi: float | None = None) -> float:
    """``x`` as a Python float after checking it is one finite real number (an int, a float or a 0-d
    real array; not a bool) with ``x >= lo``, ``x > above`` and ``x <= hi`` for the bounds given;
    raises InputError naming ``what`` otherwise. NaN and infinities are refused (a NaN cost makes
    every comparison of a search false).

    >>> check_real(np.float32(0.5), "lam", lo=0), check_real(2, "prior", above=0)
    (0.5, 2.0)
    >>> check_real(float("nan"), "lam", lo=0)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: lam must be a finite real number >= 0, got nan
    """
    dt = _dtype(x)
    if dt is not None and (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        try:
            v = float(x)
        except OverflowError:  # a Python int beyond float's range
            v = math.inf
        if math.isfinite(v) and (lo is None or v >= lo) and (above is None or v > above) \
                and (hi is None or v <= hi):
            return v
    raise InputError(f"{what} must be a finite real number{_bounds(lo, hi, above)}, got {x!r}")


def check_array_kind(x: Any, kinds: str, want: str) -> Any:
    """``x`` after checking that its dtype is of one of ``kinds``: NumPy kind letters (``"b"`` bool,
    ``"i"`` / ``"u"`` integers, ``"f"`` floats, where bfloat16 and the other ml_dtypes floats count as
    ``"f"``, though NumPy calls them ``"V"``). Arrays and tracers come back unchanged (only the dtype
    is read, so this runs under ``jit``); other values are converted with ``np.asarray``. Otherwise
    InputError ``"<want>, got dtype ..."`` (or ``"..., got <type>"`` for what is no array).

    >>> import ml_dtypes
    >>> check_array_kind(np.ones(2, ml_dtypes.bfloat16), "iuf", "w must be real").dtype
    dtype(bfloat16)
    >>> check_array_kind([1 + 2j], "iuf", "w must be real")
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: w must be real, got dtype complex128
    """
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError):  # ragged nesting, tracers in a list
            raise InputError(f"{want}, got {type(x).__name__}") from None
    dt = np.dtype(x.dtype)
    if ("f" if is_float_like(dt) else dt.kind) not in kinds:
        raise InputError(f"{want}, got dtype {dt}")
    return x


def check_flag(x: Any, what: str) -> bool:
    """``x`` as a Python bool after checking it is one (``bool`` or ``np.bool_``); raises InputError
    naming ``what`` otherwise (``bool("no")`` would be True).

    >>> check_flag(np.bool_(True), "dq")
    True
    >>> check_flag("no", "dq")
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: dq must be True or False, got 'no'
    """
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise InputError(f"{what} must be True or False, got {x!r}")
