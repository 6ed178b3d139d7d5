"""Codebook quantization (codebook_present_flag = 1) with learnable centroids.

NNR reconstructs ``w = codebook[l + CbZeroOffset] * step`` with an *integer* codebook (nnr-format.md
§3.5). Here the centroids are learned in units of the step (float), initialised by k-means, and
rounded to integers in hard mode; the coded level of a weight is ``index - zero_offset`` where
``zero_offset`` is the index of the entry nearest to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nncjax.errors import InputError
from nncjax.quantize._checks import check_levels, check_step, saturate_levels

__all__ = ["codebook_init", "quantize_codebook"]


def codebook_init(w: jax.Array, step: jax.Array, size: int, *, iters: int = 20) -> jax.Array:
    """K-means (Lloyd) centroids of ``w / step``: ``size`` float32 values, sorted, quantile-initialised.

    Example:
      >>> w = jnp.array([-0.30, -0.28, 0.0, 0.01, 0.29, 0.31])
      >>> [round(float(c), 2) for c in codebook_init(w, 0.1, 3)]     # (3,) float32, in units of the step 0.1
      [-2.9, 0.05, 3.0]

    Raises:
        InputError: ``size`` < 1, ``w`` is empty (an empty tensor has no codebook; the quantizer rules
            and ``nncjax.encode`` code it uniformly), or a concrete ``step`` is not finite and > 0.
    """
    if size < 1:
        raise InputError(f"codebook size must be >= 1, got {size}")
    if jnp.size(w) == 0:
        raise InputError("an empty tensor has no codebook (quantize it uniformly)")
    check_step(step)
    u = (jnp.asarray(w, jnp.float32) / step).reshape(-1)
    cb = jnp.quantile(u, (jnp.arange(size, dtype=jnp.float32) + 0.5) / size)

    def lloyd(cb, _):
        idx = jnp.argmin(jnp.abs(u[:, None] - cb[None, :]), axis=1)
        s = jax.ops.segment_sum(u, idx, size)
        c = jax.ops.segment_sum(jnp.ones_like(u), idx, size)
        return jnp.where(c > 0, s / jnp.maximum(c, 1.0), cb), None

    cb, _ = jax.lax.scan(lloyd, cb, None, length=iters)
    return jnp.sort(cb)


def quantize_codebook(w: jax.Array, step: jax.Array, codebook: jax.Array, mode: str = "hard", *,
                      temperature: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """Nearest-entry codebook quantization of ``w`` (any shape) with ``codebook`` (C,) in step units.

    * ``hard``: returns ``(levels int32, w_hat)``: the codebook is rounded to integers (as NNR carries
      it), ``levels = index - zero_offset`` and ``w_hat = float32(step) * float32(cb_int[index])``.
    * ``ste``: forward = nearest (float) centroid, gradient to ``w`` straight through, to the centroids
      and the step through the selected entry (k-means-like updates by gradient descent).
    * ``soft``: softmax assignment over entries with ``temperature`` (in step units squared).

    Example:
      >>> w = jnp.array([-0.30, -0.28, 0.0, 0.01, 0.29, 0.31])
      >>> lev, w_hat = quantize_codebook(w, 0.1, jnp.round(codebook_init(w, 0.1, 3)))
      >>> lev.tolist(), [round(float(x), 2) for x in w_hat]    # codebook [-3, 0, 3]: levels are index - 1
      ([-1, -1, 0, 0, 1, 1], [-0.3, -0.3, 0.0, 0.0, 0.3, 0.3])

    Raises:
        InputError: a concrete ``step`` is not finite and > 0; in hard mode, a concrete codebook has
            an entry beyond int32 once rounded (>= 2**31 steps in magnitude).

    Under tracing values cannot be checked: hard-mode entries then saturate at the int32 range
    (``[-2**31, 2**31 - 128]``; ``zero_offset`` is still the entry nearest to zero), and a step <= 0
    gives meaningless levels.
    """
    check_step(step)
    w = jnp.asarray(w, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    cb = jnp.asarray(codebook, jnp.float32)
    u = w / step
    d = (u[..., None] - cb) ** 2
    idx = jnp.argmin(jax.lax.stop_gradient(d), axis=-1)
    if mode == "hard":
        cbr = jnp.round(jax.lax.stop_gradient(cb))
        check_levels(cbr, step, lambda c: c, "max |codebook entry| (in steps)")
        cbi = saturate_levels(cbr)
        idx = jnp.argmin(jnp.abs(jax.lax.stop_gradient(u)[..., None] - cbi.astype(jnp.float32)), axis=-1)
        # in float: the int32 abs of a saturated -2**31 entry would be negative and look like the zero
        zero = jnp.argmin(jnp.abs(cbr)).astype(jnp.int32)
        return (idx - zero).astype(jnp.int32), jax.lax.stop_gradient(step) * cbi[idx].astype(jnp.float32)
    if mode == "ste":
        c = cb[idx]
        k = u + jax.lax.stop_gradient(c - u) + (c - jax.lax.stop_gradient(c))
        return k, step * k
    if mode == "soft":
        p = jax.nn.softmax(-d / temperature, axis=-1)
        k = jnp.sum(p * cb, axis=-1)
        return k, step * k
    raise InputError(f"unknown codebook mode {mode!r}; expected hard, ste or soft")
