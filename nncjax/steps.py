"""Quantization parameter (QP) <-> step size, as ISO/IEC 15938-17 defines it.

With ``k = 2**qp_density``: ``step = (k + (qp & (k - 1))) * 2**((qp >> qp_density) - qp_density)``,
i.e. exponential in ``qp`` with a linear mantissa. Every step is exact in float32.
NumPy and JAX forms are provided; the JAX forms are jit/vmap-able, and :func:`qp_to_step_continuous`
is the differentiable interpolation used when QPs are optimised by gradient.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nncjax.arguments import check_array_kind, check_int
from nncjax.errors import InputError

__all__ = ["check_qp_density", "equivalent_qp", "qp_to_step", "qp_to_step_continuous", "qp_to_step_jax", "step_to_qp",
           "step_to_qp_continuous"]


def check_qp_density(qp_density: int) -> int:
    """``qp_density`` as a Python int after checking it is an integer in 0..7 (else InputError).

    >>> check_qp_density(np.int64(2))
    2
    >>> check_qp_density(8)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: qp_density must be an integer in [0, 7], got 8
    """
    return check_int(qp_density, "qp_density", lo=0, hi=7)


def qp_to_step(qp, qp_density: int = 2) -> np.ndarray | float:
    """Step size of integer QP(s). ``qp``: int or int array of any shape -> float64 of the same shape.

    Raises InputError for a QP that is no integer (a float QP was truncated toward zero) or whose step
    is beyond float64 (it was 0 or inf).

    >>> qp_to_step(-32), qp_to_step(-38)
    (0.00390625, 0.00146484375)
    """
    qpd = check_qp_density(qp_density)
    if type(qp) is int:  # the codec's per-tensor call: the array path's checks cost more than the step
        return _scalar_step(qp, qpd)
    # refused: bool, float (truncated toward zero), object (a Python int beyond int64)
    q = np.asarray(check_array_kind(qp, "iu", "QPs must be integers")).astype(np.int64)
    k = 1 << qpd
    with np.errstate(over="ignore"):
        step = (k + (q & (k - 1))).astype(np.float64) * np.exp2((q >> qpd) - qpd)
    if not np.all(np.isfinite(step) & (step > 0)):
        raise InputError(f"QP {q[~(np.isfinite(step) & (step > 0))].flat[0]} at qp_density {qpd} has a step beyond "
                         "float64's range")
    return float(step) if step.ndim == 0 else step


def _scalar_step(q: int, qpd: int) -> float:
    """:func:`qp_to_step` of one Python int, with the array path's float64 results (the mantissa times an
    exact power of two, which is 0 below float64's range and overflows above it)."""
    k = 1 << qpd
    if not -2**63 <= q < 2**63:  # the array path refuses Python ints beyond int64 too
        raise InputError("QPs must be integers within int64")
    try:
        step = (k + (q & (k - 1))) * 2.0 ** ((q >> qpd) - qpd)
    except OverflowError:
        step = float("inf")
    if not 0 < step < float("inf"):
        raise InputError(f"QP {q} at qp_density {qpd} has a step beyond float64's range")
    return step


def _octave_split(step, qp_density: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(2**qp_density, octave e, mantissa fraction in [0, 1))`` of checked step sizes: step = 2**e * (1 + frac)."""
    k = 1 << check_qp_density(qp_density)
    s = np.asarray(step, dtype=np.float64)
    if np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise InputError("step sizes must be finite and positive")
    e = np.floor(np.log2(s))
    return k, e, s / np.exp2(e) - 1.0


def step_to_qp(step, qp_density: int = 2) -> np.ndarray | int:
    """Largest integer QP whose step does not exceed ``step`` (float array of any shape -> int64).

    >>> step_to_qp(2.0 ** -8)
    -32
    """
    k, e, frac = _octave_split(step, qp_density)
    mant = np.floor(frac * k + 1e-9)
    qp = (e.astype(np.int64) * k + np.clip(mant, 0, k - 1).astype(np.int64))
    return int(qp) if qp.ndim == 0 else qp


def equivalent_qp(qp, qp_density: int, *, from_density: int = 2) -> np.ndarray | int:
    """The QP at ``qp_density`` whose step is ``qp``'s at ``from_density`` (or the next finer step):
    a QP given in one density's units, carried to another. ``qp``: int or int array -> int64 of its shape.

    >>> equivalent_qp(-75, 3), equivalent_qp(-75, 0), equivalent_qp(-32, 2)
    (-150, -19, -32)
    """
    return step_to_qp(qp_to_step(qp, from_density), qp_density)


def qp_to_step_jax(qp, qp_density: int = 2):
    """JAX form of :func:`qp_to_step` for integer ``qp`` (any shape) -> float32, exact.

    >>> qp_to_step_jax(jnp.array([-32, -38])).tolist()
    [0.00390625, 0.00146484375]
    """
    qpd = check_qp_density(qp_density)
    # the int32 cast would truncate a float QP toward zero; dtypes are static, so checked under jit too
    q = jnp.asarray(check_array_kind(qp, "iu", "QPs must be integers"), dtype=jnp.int32)
    k = 1 << qpd
    # ldexp is exact; exp2 is not on every backend.
    return jnp.ldexp((k + (q & (k - 1))).astype(jnp.float32), (q >> qpd) - qpd)


def qp_to_step_continuous(qp, qp_density: int = 2):
    """Differentiable step for real-valued ``qp`` (any shape) -> float32.

    Equals :func:`qp_to_step_jax` at integers and interpolates the mantissa linearly between them, so
    ``d step / d qp`` is the true finite difference of neighbouring QPs.

    >>> qp_to_step_continuous(jnp.array([-38.0, -37.5, -37.0])).tolist()
    [0.00146484375, 0.0015869140625, 0.001708984375]
    """
    qpd = check_qp_density(qp_density)
    k = 1 << qpd
    q = jnp.asarray(qp, dtype=jnp.float32)
    e = jnp.floor(q / k)
    return jnp.ldexp(1.0 + (q - e * k) / k, e.astype(jnp.int32))


def step_to_qp_continuous(step, qp_density: int = 2) -> np.ndarray | float:
    """Inverse of :func:`qp_to_step_continuous`: the real-valued QP of ``step`` (float64, any shape).

    >>> step_to_qp_continuous(qp_to_step(-37)), round(step_to_qp_continuous(0.0034), 4)
    (-37.0, -33.0368)
    """
    k, e, frac = _octave_split(step, qp_density)
    qp = k * (e + frac)
    return float(qp) if qp.ndim == 0 else qp
