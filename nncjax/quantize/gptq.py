"""GPTQ: uniform quantization with error feedback across a layer's inputs (``nncjax.quantize.gptq``).

Rounding every weight to its nearest grid point minimises the *weight* error, but a linear layer
``y = W x`` is judged by its *output* error ``e^T H e`` per row, with ``H = E[x x^T]`` the second
moment of its inputs. GPTQ (Frantar et al., ICLR 2023; OBQ before it) quantizes one input column at a
time and moves each row's rounding error onto the columns not quantized yet, weighted by the
Cholesky factor of ``H^-1``, which minimises that output error column by column. Correlated inputs
(the rule in transformers) let later columns cancel most of the error of earlier ones.

The result lies on the same uniform grid as plain rounding (``levels * step`` per row), so the NNR
codec codes it losslessly with ``dq=False`` at the same QP (``nncjax.encode(dq_overrides=...)``):
the gain needs nothing from the bitstream format. Rows are independent (each row's error feeds only
its own later columns), so per-row steps (local scales) work as they are.

Layout: ``w`` is ``(rows, columns)`` = ``(outputs, inputs)``, NNR / PyTorch layout (a Flax ``Dense``
kernel is its transpose).

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[0.13, 0.13], [-0.2, 0.3]])
    >>> h = jnp.array([[1.0, 0.9], [0.9, 1.0]])   # strongly correlated inputs
    >>> levels, w_hat = quantize_gptq(w, h, 0.25)
    >>> levels.tolist()                            # plain rounding: [[1, 1], [-1, 1]]
    [[1, 0], [-1, 1]]
    >>> bool(layer_output_error(w, w_hat, h) < layer_output_error(w, 0.25 * jnp.round(w / 0.25), h))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.errors import InputError
from nncjax.quantize.uniform import round_half_away

__all__ = ["dense_input_moments", "layer_output_error", "quantize_gptq"]


@jax.jit
def _inverse_cholesky(h: jax.Array, damp: jax.Array) -> jax.Array:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (``U^T U = H^-1``); inputs
    that never fire (zero diagonal) get a unit diagonal, which leaves their columns to plain rounding."""
    d = jnp.diag(h)
    h = h + jnp.diag(jnp.where(d > 0, 0.0, 1.0) + damp * jnp.maximum(jnp.mean(d), 1e-30))
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    h_inv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), eye)
    return jnp.linalg.cholesky(h_inv).T


@jax.jit
def _error_feedback(w: jax.Array, u: jax.Array, inv_step: jax.Array, step: jax.Array) -> jax.Array:
    """Levels ``(columns, rows)``: column ``j`` rounded, its error spread over columns ``> j``."""
    cols = jnp.arange(w.shape[1])

    def one(w, j):
        col = w[:, j]
        k = round_half_away(inv_step * col)
        err = (col - k * step) / u[j, j]
        w = w - err[:, None] * jnp.where(cols > j, u[j], 0.0)[None, :]
        return w, k

    _, levels = jax.lax.scan(one, w, cols)
    return levels


def quantize_gptq(w: jax.Array, h: jax.Array, step: float | jax.Array, *, damp: float = 0.01,
                  act_order: bool = True) -> tuple[jax.Array, jax.Array]:
    """GPTQ levels and reconstruction of one linear layer's weights.

    Args:
      w: ``(rows, columns)`` float weights, outputs by inputs (NNR layout).
      h: ``(columns, columns)`` second moment of the layer's inputs, ``E[x x^T]`` (e.g. from
        :func:`dense_input_moments`); only its conditioning matters, not its scale.
      step: quantization step, a scalar or one per row ``(rows,)`` (positive).
      damp: ``H`` is regularised by ``damp * mean(diag H)`` on its diagonal (numerical stability,
        and less over-fitting of ``H`` estimated from few inputs).
      act_order: quantize the columns in order of decreasing input energy ``diag(H)`` (GPTQ's
        "act-order"): the columns that matter most are rounded first, while every later column can
        still absorb their error. The levels keep the tensor's own column order.

    Returns:
      ``(levels int32 (rows, columns), w_hat float32 (rows, columns) = levels * step)``; the levels
      are what ``nncjax.encode(..., dq_overrides={name: False})`` codes for ``w_hat`` at the QP of
      ``step``. With a diagonal ``h`` they equal plain rounding (``dq=False``).

    Raises:
      InputError: shapes that do not fit, a non-positive step, non-finite inputs, or an ``h`` whose
        damped inverse has no Cholesky factor (not positive semi-definite).

    Example:
      >>> levels, w_hat = quantize_gptq(jnp.ones((3, 4)) * 0.3, jnp.eye(4), 0.25)
      >>> levels[0].tolist(), float(w_hat[0, 0])
      ([1, 1, 1, 1], 0.25)
    """
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise InputError(f"w must be (rows, columns) and h (columns, columns); got {w.shape} and {h.shape}")
    if np.shape(step) not in ((), (w.shape[0],)):
        raise InputError(f"step must be a scalar or have shape ({w.shape[0]},), got shape {np.shape(step)}")
    step = jnp.broadcast_to(jnp.asarray(step, jnp.float32), (w.shape[0],))
    if not bool(jnp.all(step > 0)) or not bool(jnp.all(jnp.isfinite(step))):
        raise InputError("step must be positive and finite")
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise InputError(f"damp must be a number >= 0, got {damp!r}")
    if not bool(jnp.all(jnp.isfinite(w))) or not bool(jnp.all(jnp.isfinite(h))):
        raise InputError("w and h must be finite")
    if w.size == 0:
        return jnp.zeros(w.shape, jnp.int32), w
    order = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(w.shape[1])
    u = _inverse_cholesky(h[order][:, order], jnp.float32(damp))
    if not bool(jnp.all(jnp.isfinite(u))):
        raise InputError("h is not positive semi-definite (its damped inverse has no Cholesky factor)")
    levels = jnp.zeros(w.shape, jnp.float32).at[:, order].set(_error_feedback(w[:, order], u, 1.0 / step, step).T)
    return levels.astype(jnp.int32), levels * step[:, None]


def layer_output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
    """``sum_rows e^T H e`` with ``e = w_hat - w``: the layer's summed squared output error per input
    (``E ||(W_hat - W) x||^2``). ``w``, ``w_hat``: ``(rows, columns)``; ``h``: ``(columns, columns)``.

    >>> float(layer_output_error(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.eye(2)))
    2.0
    """
    e = jnp.asarray(w_hat, jnp.float32) - jnp.asarray(w, jnp.float32)
    return jnp.sum((e @ jnp.asarray(h, jnp.float32)) * e)


def dense_input_moments(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    *,
    mask: Callable[[Any], Any] | None = None,
) -> dict[str, np.ndarray]:
    """Second moments ``H = E[x x^T]`` of the inputs of every ``flax.linen.Dense`` layer of a model.

    The model runs eagerly (``jax.disable_jit``: a jitted ``apply_fn`` would hide its layers behind
    a compiled call) under :func:`flax.linen.intercept_methods`, which sees each ``Dense`` call's
    input; a layer called several times pools all its inputs. Eager dispatch costs per operation, so
    a few large batches are much faster than many small ones.

    Args:
      apply_fn: ``apply_fn(params, batch)`` running a Flax linen model (``Dense`` submodules).
      params: its parameters (Flax variables; kernels are found under the module paths).
      data: one batch or a list of batches.
      mask: optional ``mask(batch) -> bool array`` over the leading axes of the ``Dense`` inputs
        (e.g. a text model's attention mask, so that padding positions do not count).

    Returns:
      ``{kernel name: float64 (inputs, inputs)}``, names as :func:`nncjax.pytree_names.flatten_named`
      gives them (``"params/layer_0/output/kernel"``).

    Raises:
      InputError: empty ``data``, or no ``Dense`` layer seen.

    Example:
      >>> import flax.linen as nn
      >>> model = nn.Dense(3)
      >>> v = model.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
      >>> h = dense_input_moments(model.apply, v, jnp.array([[1.0, 0.0], [1.0, 2.0]]))
      >>> {k: a.tolist() for k, a in h.items()}
      {'params/kernel': [[1.0, 1.0], [1.0, 2.0]]}
    """
    import flax.linen as nn

    from nncjax.pytree_names import flatten_named

    batches = data if isinstance(data, list) else [data]
    if not batches:
        raise InputError("data is an empty list")
    names = set(flatten_named(params))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def kernel_name(path: tuple) -> str:
        for prefix in ("params/", ""):
            name = prefix + "/".join((*path, "kernel"))
            if name in names:
                return name
        raise InputError(f"no kernel found for the Dense layer at {'/'.join(path)!r}")

    keep: np.ndarray | None = None

    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            x = jnp.asarray(args[0], jnp.float32)
            if keep is not None:
                x = x[np.broadcast_to(keep, x.shape[:-1])]
            x = x.reshape(-1, x.shape[-1])
            name = kernel_name(tuple(context.module.path))
            # on the device, float32 with full-precision passes (a GPU/TPU default would be bf16);
            # batches are summed on the host in float64
            xx = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
            sums[name] = sums.get(name, 0.0) + np.asarray(xx, np.float64)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return next_fun(*args, **kwargs)

    with jax.disable_jit(), nn.intercept_methods(intercept):
        for batch in batches:
            keep = None if mask is None else np.asarray(mask(batch), bool)
            apply_fn(params, batch)
    if not sums:
        raise InputError("the model called no flax.linen.Dense layer")
    return {n: sums[n] / max(counts[n], 1) for n in sums}

