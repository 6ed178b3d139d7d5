"""The distortion ``D`` the optimisers minimise: by default the relative MSE between the outputs
of the original and the quantized model (no labels needed), or their KL divergence, or any
``loss(params, batch)``; and the jit-compiled forward passes that measure it.

Example:
    >>> float(relative_output_mse(jnp.array([1.0, 3.0]), jnp.array([1.0, 2.0])))
    2.0
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.arguments import is_concrete
from nncjax.errors import InputError
from nncjax.pytree_names import key_path_name

__all__ = ["check_finite_outputs", "check_output_scale", "output_spread", "relative_output_mse"]


def _tree_mean(fn, a, b):
    vals = jax.tree_util.tree_leaves(jax.tree_util.tree_map(fn, a, b))
    return sum(vals) / len(vals)


def _output_mse(y, ref):
    y, ref = jnp.asarray(y, jnp.float32), jnp.asarray(ref, jnp.float32)
    return jnp.mean((y - ref) ** 2) / (jnp.var(ref) + 1e-12)


def relative_output_mse(y: Any, ref: Any) -> jax.Array:
    """``D`` of outputs ``y`` against reference outputs ``ref`` (pytrees of the same structure): per
    leaf the mean squared error over the reference's variance, both cast to float32 (so bool and
    integer outputs count too), averaged over the leaves. Returns a float32 scalar, differentiable in ``y``.

    A reference leaf that is constant (variance 0, e.g. a scalar output) or empty has no relative MSE:
    when ``ref`` is concrete that raises InputError naming the leaf (:func:`check_output_scale`). Under
    ``jit`` it cannot be checked, and such a leaf's MSE is divided by 1e-12.

    >>> float(relative_output_mse({"a": jnp.array([1.0, 3.0])}, {"a": jnp.array([1.0, 2.0])}))
    2.0
    """
    if all(is_concrete(r) for r in jax.tree_util.tree_leaves(ref)):
        with jax.ensure_compile_time_eval():  # a concrete ref closed over by a jitted caller: spreads computed now
            check_output_scale(output_spread(ref))
    return _tree_mean(_output_mse, y, ref)


def _leaf_name(path: tuple) -> str:
    name = key_path_name(path)
    return f"output leaf {name!r}" if name else "the output"


def output_spread(ref: Any) -> Any:
    """``max - min`` of each leaf of ``ref`` cast to float32, as :func:`relative_output_mse` casts it (0
    for an empty leaf): a pytree of float32 scalars with ``ref``'s structure. Jit-able; only these
    scalars need to reach the host for :func:`check_output_scale`.

    >>> output_spread({"logits": jnp.array([0.5, 2.0]), "loss": jnp.float32(0.3)})
    {'logits': Array(1.5, dtype=float32), 'loss': Array(0., dtype=float32)}
    """
    def spread(y):
        y = jnp.asarray(y, jnp.float32)
        return jnp.float32(0) if y.size == 0 else jnp.max(y) - jnp.min(y)

    return jax.tree_util.tree_map(spread, ref)


def check_output_scale(spread: Any, batch: int | None = None) -> None:
    """Raises InputError naming the leaf if a leaf of the reference outputs is constant or empty, from
    their concrete :func:`output_spread` ``spread``: its variance is 0, so the relative MSE would weigh
    that leaf's error about 1e12 times (NaN if empty). ``batch`` only numbers the batch in the message.

    >>> check_output_scale(output_spread({"logits": jnp.array([0.5, 2.0])}))        # varies: returns None
    >>> check_output_scale(output_spread({"logits": jnp.array([0.5, 2.0]), "loss": jnp.float32(0.3)}), batch=0)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: output leaf 'loss' is constant or empty on batch 0 (variance 0): the relative output \
MSE divides by its variance. Leave it out of apply_fn's outputs, use larger batches, or pick another distortion \
(distortion="kl", or loss=)
    """
    on = "" if batch is None else f" on batch {batch}"
    for path, s in jax.tree_util.tree_flatten_with_path(spread)[0]:
        if float(s) == 0:  # exactly constant; a NaN spread fails this test (NaN is reported elsewhere)
            raise InputError(f"{_leaf_name(path)} is constant or empty{on} (variance 0): the relative output MSE "
                             "divides by its variance. Leave it out of apply_fn's outputs, use larger batches, or "
                             'pick another distortion (distortion="kl", or loss=)')


def check_finite_outputs(refs: list, distortion: str | None = None) -> None:
    """Raises InputError if the model's outputs on any batch (``refs``, one pytree per batch) hold
    NaN or Inf: every ``D`` would then be NaN, and the error would surface far away, as NaN QPs.
    With ``distortion="output"`` (the relative output MSE) also if a leaf is constant or empty on a
    batch (:func:`check_output_scale`).

    >>> check_finite_outputs([{"logits": jnp.ones((2, 3))}])    # finite: returns None
    >>> check_finite_outputs([jnp.array([0.0, jnp.nan])])
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: the model's outputs on batch 0 contain NaN or Inf: check the data
    """
    for i, ref in enumerate(refs):
        for leaf in jax.tree_util.tree_leaves(ref):
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and not np.all(np.isfinite(np.asarray(leaf))):
                raise InputError(f"the model's outputs on batch {i} contain NaN or Inf: check the data")
        if distortion == "output":
            check_output_scale(output_spread(ref), i)


def _output_kl(y, ref):
    logp_ref = jax.nn.log_softmax(jnp.asarray(ref, jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(jnp.asarray(y, jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp), axis=-1))


def distortion_fn(apply_fn, loss, distortion):
    """``D(params_hat, batch, ref) -> ()`` (float32): ``loss(params_hat, batch)`` if ``loss`` is given,
    else ``distortion`` (``"output"``: :func:`relative_output_mse`; ``"kl"``: KL divergence of the
    softmax over the last axis) between ``apply_fn(params_hat, batch)`` and the reference outputs ``ref``."""
    if loss is not None:
        return lambda p, batch, ref: jnp.asarray(loss(p, batch), jnp.float32)
    per_leaf = _output_mse if distortion == "output" else _output_kl
    return lambda p, batch, ref: _tree_mean(per_leaf, apply_fn(p, batch), ref)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def apply_model(params, batch, *, apply_fn):
    """``apply_fn(params, batch)``, compiled once per ``apply_fn`` and shapes (the reference outputs)."""
    return apply_fn(params, batch)


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss", "distortion"))
def batch_distortion(params_hat, batch, ref, *, apply_fn, loss, distortion):
    """:func:`distortion_fn` on one batch, compiled."""
    return distortion_fn(apply_fn, loss, distortion)(params_hat, batch, ref)
