"""What nncjax codes for each input dtype, and how decoded tensors get their dtype back.

The NNR format codes float tensors (quantized, NNR_PT_FLOAT) and int32 tensors (lossless,
NNR_PT_INT); it does not signal the original dtype. The full policy is in ``docs/input-policy.md``:

* float32: coded as is; float16 / bfloat16: widened to float32 exactly; float64: rounded to float32,
  with values beyond float32's range rejected. NaN or Inf anywhere -> :class:`InputError`.
* bool and integer dtypes: coded losslessly as int32 when every value fits, else :class:`InputError`.
* 0-d scalars are coded as 1-element 1-D tensors; empty tensors are coded with their shape.
* Anything else (complex, strings, objects) -> :class:`InputError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nncjax.errors import InputError

__all__ = ["PreparedTensor", "is_float_like", "prepare_tensor", "restore_dtype"]

_F32_MAX = float(np.finfo(np.float32).max)
_I32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class PreparedTensor:
    """A tensor ready for coding. ``data``: float32 or int32, C-contiguous, ndim >= 1."""

    name: str
    data: np.ndarray
    orig_dtype: np.dtype
    orig_shape: tuple[int, ...]

    @property
    def is_int(self) -> bool:
        """Whether the tensor is coded as integers (int32, lossless) rather than as floats.

        >>> prepare_tensor("step", np.int8(7)).is_int, prepare_tensor("w", np.ones(2, np.float16)).is_int
        (True, False)
        """
        return self.data.dtype == np.int32


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "__array__") and not isinstance(x, np.ndarray):
        x = np.asarray(x)  # jax.Array, torch CPU tensors, ...
    return np.asarray(x)


def is_float_like(dt: np.dtype) -> bool:
    """Whether ``dt`` is a float dtype the codec quantizes: numpy floats and ml_dtypes' bfloat16 / float8.

    >>> is_float_like(np.dtype(np.float16)), is_float_like(np.dtype(np.int8))
    (True, False)
    """
    # bfloat16 (ml_dtypes) is not a numpy float subtype but reports kind 'V' with a float name.
    return np.issubdtype(dt, np.floating) or dt.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def prepare_tensor(name: str, x) -> PreparedTensor:
    """Applies the input policy to one tensor. ``x``: array-like of any shape -> PreparedTensor.

    >>> prepare_tensor("b", np.int8([1, -2])).data
    array([ 1, -2], dtype=int32)
    >>> prepare_tensor("s", np.float32(0.5)).data.shape   # 0-d -> (1,)
    (1,)
    """
    a = _as_numpy(x)
    dt = a.dtype
    shape = tuple(int(s) for s in a.shape)
    if dt == np.bool_ or np.issubdtype(dt, np.integer):
        if a.size and dt != np.bool_ and dt.itemsize >= 4 and dt != np.int32:
            lo, hi = int(a.min()), int(a.max())
            if lo < _I32.min or hi > _I32.max:
                raise InputError(f"tensor {name!r}: {dt} values in [{lo}, {hi}] do not fit int32, which is "
                                 "the only integer type NNR codes losslessly")
        data = a.astype(np.int32)
    elif is_float_like(dt):
        wide = a.astype(np.float64) if dt.itemsize > 4 else a.astype(np.float32)
        if a.size:
            finite = np.isfinite(wide)
            if not finite.all():
                bad = wide[~finite][0]
                raise InputError(f"tensor {name!r} contains {'NaN' if np.isnan(bad) else 'Inf'} "
                                 f"({int((~finite).sum())} non-finite values); NNR codes finite values only")
            if dt.itemsize > 4:
                peak = float(np.abs(wide).max())
                if peak > _F32_MAX:
                    raise InputError(f"tensor {name!r}: |value| {peak:.6g} exceeds the float32 range that "
                                     "NNR float tensors are coded in")
        data = wide.astype(np.float32)
    else:
        raise InputError(f"tensor {name!r}: dtype {dt} cannot be coded (float and integer dtypes only)")
    if data.ndim == 0:
        data = data.reshape(1)
    return PreparedTensor(name, np.ascontiguousarray(data), dt, shape)


def restore_dtype(name: str, decoded: np.ndarray, dtype, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Casts a decoded tensor to ``dtype`` (and ``shape``), refusing lossy integer narrowing.

    Float targets take the decoded values rounded to nearest, but a finite value beyond the target's
    range is refused rather than made infinite (a float16 weight of 65504 coded with a coarse step can
    decode to 65536); integer targets require the decoded values to be integers in range. ``shape``
    may turn a decoded ``(1,)`` back into a 0-d scalar.
    ``decoded``: numpy array of any shape -> numpy array of ``dtype`` and ``shape``.

    >>> restore_dtype("n", np.array([3.0, -1.0], np.float32), np.int16)
    array([ 3, -1], dtype=int16)
    >>> restore_dtype("s", np.array([0.25], np.float32), np.float64, ())
    array(0.25)
    >>> restore_dtype("n", np.array([0.5], np.float32), np.int32)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: tensor 'n': decoded values are not integers; cannot restore int32
    """
    dt = np.dtype(dtype)
    out = decoded
    if shape is not None and tuple(out.shape) != tuple(shape):
        if int(np.prod(shape, dtype=np.int64)) != out.size:
            raise InputError(f"tensor {name!r}: decoded shape {out.shape} does not match `like` shape {shape}")
        out = out.reshape(shape)
    if dt == out.dtype:
        return out
    if dt == np.bool_ or np.issubdtype(dt, np.integer):
        if np.issubdtype(out.dtype, np.floating) and out.size and not np.array_equal(out, np.round(out)):
            raise InputError(f"tensor {name!r}: decoded values are not integers; cannot restore {dt}")
        if out.size:
            lo, hi = out.min(), out.max()
            info = (0, 1) if dt == np.bool_ else (np.iinfo(dt).min, np.iinfo(dt).max)
            if lo < info[0] or hi > info[1]:
                raise InputError(f"tensor {name!r}: decoded values [{lo}, {hi}] do not fit {dt}")
        return out.astype(dt)
    with np.errstate(over="ignore"):  # checked: a finite value that became inf
        cast = out.astype(dt)
    over = np.isinf(cast) & np.isfinite(out)
    if over.any():
        raise InputError(f"tensor {name!r}: decoded value {out[over].flat[0]} is beyond the range of {dt} (it "
                         "would become inf); decode into a float32 `like` leaf or with raw=True, or code it with a "
                         "finer QP")
    return cast
