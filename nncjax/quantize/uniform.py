"""Uniform scalar quantization (dq_flag = 0): hard NNCodec-identical levels and differentiable relaxations.

Hard mode is what the bitstream carries: ``k = round_half_away(float32(float32(1/step) * w))``
(nnr-format.md §3.7) and the decoder's reconstruction ``float32(step) * float32(k)`` (§3.3).
Training modes replace rounding by a differentiable surrogate of ``round(w / step)``; every mode gives
gradients w.r.t. the weights *and* the step (LSQ: ``d w_hat / d step = round(u) - u`` for STE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nncjax.quantize._checks import check_levels, check_step, saturate_levels

__all__ = ["MODES", "quantize_uniform", "relax_round", "round_half_away", "soft_round"]

#: Rounding surrogates for training: straight-through, additive uniform noise, soft rounding.
MODES = ("hard", "ste", "noise", "soft")


def round_half_away(x: jax.Array) -> jax.Array:
    """Round to nearest, ties away from zero (C ``std::round``), elementwise; float in, float out.

    >>> round_half_away(jnp.array([0.5, -0.5, 1.49]))
    Array([ 1., -1.,  1.], dtype=float32)
    """
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def soft_round(x: jax.Array, alpha: float) -> jax.Array:
    """Differentiable rounding (Agustsson & Theis 2020; tensorflow-compression ``soft_round``).

    ``alpha -> 0`` gives the identity, ``alpha -> inf`` gives ``round``. ``x``: float array of any
    shape -> float of the same shape; ``alpha``: scalar (clamped to at least 1e-3).

    >>> x = jnp.array([0.2, 0.5, 1.4])
    >>> soft_round(x, 1e3).tolist(), [round(v, 3) for v in soft_round(x, 1e-3).tolist()]
    ([0.0, 0.5, 1.0], [0.2, 0.5, 1.4])
    """
    m = jnp.floor(x) + 0.5
    r = x - m
    alpha = jnp.maximum(alpha, 1e-3)
    return m + jnp.tanh(alpha * r) / (2.0 * jnp.tanh(alpha / 2.0))


def relax_round(u: jax.Array, mode: str, *, rng: jax.Array | None = None, alpha: float = 4.0) -> jax.Array:
    """Training surrogate of ``round_half_away(u)`` for ``mode`` in ``("ste", "noise", "soft")``.

    * ``ste``: forward value is the exact hard rounding, gradient 1 (straight-through).
    * ``noise``: ``u + U(-1/2, 1/2)`` (needs ``rng``); the forward value is a noisy proxy.
    * ``soft``: :func:`soft_round` with sharpness ``alpha``.

    ``u``: float array of any shape -> float of the same shape.

    >>> u = jnp.array([0.4, 1.6, -2.5])
    >>> relax_round(u, "ste").tolist(), jax.grad(lambda u: relax_round(u, "ste").sum())(u).tolist()
    ([0.0, 2.0, -3.0], [1.0, 1.0, 1.0])
    """
    if mode == "ste":
        return u + jax.lax.stop_gradient(round_half_away(u) - u)
    if mode == "noise":
        if rng is None:
            from nncjax.errors import InputError
            raise InputError("mode='noise' needs an rng key")
        return u + jax.random.uniform(rng, u.shape, u.dtype, -0.5, 0.5)
    if mode == "soft":
        return soft_round(u, alpha)
    from nncjax.errors import InputError
    raise InputError(f"unknown quantization mode {mode!r}; expected one of {MODES}")


def quantize_uniform(w: jax.Array, step: jax.Array, mode: str = "hard", *, rng: jax.Array | None = None,
                     alpha: float = 4.0) -> tuple[jax.Array, jax.Array]:
    """Uniform quantization of ``w`` (any shape, float32) with scalar ``step``.

    Returns ``(k, w_hat)``: for ``mode="hard"``, ``k`` int32 levels and ``w_hat = float32(step) * float32(k)``
    bit-identical to the decoder; for training modes, ``k`` is the float surrogate level and ``w_hat``
    its differentiable reconstruction (gradients reach ``w`` and ``step``).

    >>> from nncjax.steps import qp_to_step_jax
    >>> k, w_hat = quantize_uniform(jnp.array([0.1, -0.2]), qp_to_step_jax(-32))
    >>> k.tolist(), w_hat.tolist()
    ([26, -51], [0.1015625, -0.19921875])

    Raises:
        InputError: a concrete ``step`` is not finite and > 0; in hard mode, a concrete ``w`` has a
            level beyond int32 (``max |w| / step`` >= 2**31; ``nncjax.encode`` would code such a tensor
            at a coarser QP, :func:`nncjax.quantize.reference.safe_qp`).

    Under tracing (``jit``, ``grad``, ``vmap``) values cannot be checked: hard levels then saturate at
    the int32 range (``[-2**31, 2**31 - 128]``, so ``w_hat`` is wrong for those weights), and a step
    <= 0 gives meaningless levels.
    """
    check_step(step)
    w = jnp.asarray(w, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    if mode == "hard":
        inv = jax.lax.stop_gradient(jnp.float32(1.0) / step)
        check_levels(w, step, lambda x: inv * x, "max |w| / step")
        k = saturate_levels(round_half_away(inv * w))
        return k, jax.lax.stop_gradient(step) * k.astype(jnp.float32)
    u = w / step
    k = relax_round(u, mode, rng=rng, alpha=alpha)
    return k, step * k
