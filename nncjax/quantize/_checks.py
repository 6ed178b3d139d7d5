"""Value checks shared by the JAX quantizers, and their int32 level conversion.

The quantizers are pure and jit-able, so a value can only be checked while it is concrete (a Python
scalar, a numpy array or a JAX array outside tracing). Under ``jit``/``grad``/``vmap`` the checks do
nothing (no host sync while tracing); each quantizer's docstring says what happens then.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.arguments import is_concrete
from nncjax.errors import InputError

#: The float32 levels that fit int32: float32 holds nothing between 2**31 - 128 and 2**31.
LEVEL_MIN = -(2.0**31)
LEVEL_MAX = float(np.nextafter(np.float32(2.0**31), np.float32(0.0)))


def _show(step) -> str:
    """``step`` as float32 prints it: the shortest exact decimal, or an array."""
    return str(np.asarray(step, np.float32)[()])


def check_step(step) -> None:
    """InputError unless a concrete ``step`` (scalar or array) is finite and > 0; no-op on tracers.

    >>> check_step(0.0)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: step must be finite and > 0, got 0.0
    """
    if is_concrete(step):
        s = np.asarray(step, np.float32)
        if not np.all(np.isfinite(s) & (s > 0)):
            raise InputError(f"step must be finite and > 0, got {_show(s)}")


def check_levels(x: jax.Array, step, scale: Callable[[jax.Array], jax.Array], what: str) -> None:
    """InputError if the float32 levels ``scale(x)`` (before rounding) leave int32; no-op on tracers.

    ``scale`` is the quantizer's own elementwise float32 map from ``x`` (any shape) to levels. It must
    reach its extremes at ``x``'s extremes (monotonic, or ``|x| / step``): only ``min(x)`` and ``max(x)``
    are scaled, so two numbers come to the host, not the tensor. NaN is ignored here. ``what`` names
    the largest scaled magnitude in the message; ``step`` is only reported.

    >>> check_levels(jnp.array([-1e8, 1.0]), 0.01, lambda x: jnp.abs(x) / 0.01, "max |w| / step")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: levels overflow int32: max |w| / step = 1e+10 at step 0.01, beyond the int32 limit ...
    """
    if not is_concrete(x) or x.size == 0:
        return
    ext = np.asarray(scale(jnp.stack([jnp.min(x), jnp.max(x)])), np.float64)
    if np.isnan(ext).any():  # NaN propagates through min / max; only then pay for the slower nan-reductions
        ext = np.asarray(scale(jnp.stack([jnp.nanmin(x), jnp.nanmax(x)])), np.float64)
    if ext.min() < LEVEL_MIN or ext.max() > LEVEL_MAX:
        raise InputError(f"levels overflow int32: {what} = {np.abs(ext).max():.6g} at step "
                         f"{_show(step)}, beyond the int32 limit 2**31; use a larger step "
                         "(nncjax.quantize.reference.safe_qp gives the QP nncjax.encode would code this tensor with)")


def saturate_levels(x: jax.Array) -> jax.Array:
    """Integer-valued float32 levels -> int32, saturating at ``[-2**31, 2**31 - 128]`` (defined on every
    backend, unlike an out-of-range cast). Any shape.

    >>> saturate_levels(jnp.array([3.0, 1e10, -1e10])).tolist()
    [3, 2147483520, -2147483648]
    """
    return jnp.clip(x, LEVEL_MIN, LEVEL_MAX).astype(jnp.int32)
