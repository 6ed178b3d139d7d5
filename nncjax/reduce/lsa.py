"""Local scaling adaptation (LSA): per-output-row scales trained on top of quantized weights.

After quantization the weights ``W_q`` are frozen; a scale vector ``s`` (one value per output row,
initialised to 1) and, optionally, the biases are fine-tuned on the task loss. The effective weight
is ``W_q · s`` along the output axis. The scales become the NNR LS tensor (``<weight>_scaling``,
shape ``(dims[0],)``); with BN folding they are merged as ``LS = s · g`` (pass them to
:func:`nncjax.reduce.fold_batchnorm` as ``local_scales``).

Scales live in a flat dict ``{weight name: (O,)}`` (names as in :func:`nncjax.reduce.named_leaves`),
which is itself a pytree, so any optax optimizer applies directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from nncjax.arguments import check_flag, check_int
from nncjax.errors import InputError
from nncjax.pytree_names import is_kernel_name
from nncjax.reduce._tree import (
    as_array,
    check_axis,
    check_float,
    check_in_range,
    check_mapping,
    named_leaves,
    replace_named,
)

__all__ = ["RowsSpec", "LSAResult", "lsa_init", "scale_rows", "apply_local_scales", "fit_local_scales", "kernel_rows"]

RowsSpec = Callable[[str, jax.Array], bool] | Sequence[str] | None


def kernel_rows(name: str, leaf: jax.Array) -> bool:
    """Default LSA selection: Flax ``kernel`` leaves with at least two dimensions; ``(name, leaf) -> bool``.

    >>> kernel_rows("Dense_0/kernel", jnp.zeros((4, 3))), kernel_rows("Dense_0/bias", jnp.zeros(3))
    (True, False)
    """
    if not isinstance(name, str):
        raise InputError(f"name must be a string, got {name!r}")
    return is_kernel_name(name) and getattr(leaf, "ndim", 0) >= 2


def _selected(params: Any, rows_spec: RowsSpec) -> dict[str, jax.Array]:
    leaves = named_leaves(params)
    if rows_spec is None:
        rows_spec = kernel_rows
    if callable(rows_spec):
        chosen = {k: v for k, v in leaves.items() if rows_spec(k, v)}
    else:
        # a string would be taken letter by letter, a number is no list
        if isinstance(rows_spec, (str, bytes)) or not isinstance(rows_spec, Iterable):
            raise InputError(f"rows_spec must be a predicate (name, leaf) -> bool, a list of names or None, "
                             f"got {rows_spec!r}")
        rows_spec = list(rows_spec)
        missing = [n for n in rows_spec if n not in leaves]
        if missing:
            raise InputError(f"no such leaves for local scaling: {missing}")
        chosen = {n: leaves[n] for n in rows_spec}
    for k, v in chosen.items():  # scales of an integer weight would be integers, truncated when trained
        check_float(v, f"weight {k!r} to scale")
    return chosen


def lsa_init(params: Any, rows_spec: RowsSpec = None, *, axis: int = -1) -> dict[str, jax.Array]:
    """Unit scales for every selected weight. Returns ``{name: ones((W.shape[axis],), W.dtype)}``.

    ``rows_spec``: predicate ``(name, leaf) -> bool``, a list of names, or None (Flax kernels,
    :func:`kernel_rows`). ``axis``: the output axis (-1 for Flax layout, 0 for NNR layout).

    >>> lsa_init({"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}})
    {'Dense_0/kernel': Array([1., 1., 1.], dtype=float32)}
    """
    out = {}
    for k, v in _selected(params, rows_spec).items():
        try:  # a wrapped or float axis would give scales of another axis' length (or an IndexError)
            ax = check_axis(axis, jnp.ndim(v))
        except InputError as e:
            raise InputError(f"weight {k!r} of shape {jnp.shape(v)}: {e}") from None
        out[k] = jnp.ones((v.shape[ax],), v.dtype)
    return out


def scale_rows(w: jax.Array, s: jax.Array, axis: int = -1) -> jax.Array:
    """``w`` scaled by ``s`` along ``axis``. ``w``: any shape with ``w.shape[axis] == s.shape[0]``.

    >>> scale_rows(jnp.ones((2, 3)), jnp.array([1.0, 2.0, 3.0])).tolist()
    [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]

    Raises:
        InputError: ``axis`` is out of range for ``w``, ``s`` is not of shape ``(w.shape[axis],)``, ``w``
        is not a float tensor (an integer ``w`` would truncate the product) or ``s`` not real numbers
        (a complex ``s`` would lose its imaginary part).
    """
    w, s = check_float(w, "w"), as_array(s, "s")
    if not (jnp.issubdtype(s.dtype, jnp.floating) or jnp.issubdtype(s.dtype, jnp.integer)):
        raise InputError(f"scales s must be real numbers, got dtype {s.dtype}")
    ax = _scaled_axis(w.shape, s.shape, axis)
    return check_in_range(w * s.astype(w.dtype).reshape((-1,) + (1,) * (w.ndim - 1 - ax)), w, "scale_rows")


def _scaled_axis(w_shape: tuple, s_shape: tuple, axis: int) -> int:
    """The index of the axis a scale vector of ``s_shape`` scales in a weight of ``w_shape``; InputError
    unless it is a vector of that axis' length. Shapes are static under jit: the check costs nothing there."""
    ax = check_axis(axis, len(w_shape))
    if tuple(s_shape) != (w_shape[ax],):
        raise InputError(f"scale vector of shape {tuple(s_shape)} does not match axis {axis} of a weight of shape "
                         f"{tuple(w_shape)}; expected ({w_shape[ax]},)")
    return ax


def _check_scales(leaves: Mapping[str, Any], scales: Mapping[str, Any], axis: int) -> None:
    """InputError if ``scales`` name a leaf not in ``leaves`` or do not fit the leaf they name."""
    missing = sorted(k for k in scales if k not in leaves)
    if missing:
        raise InputError(f"local scales name no leaf of params: {missing}")
    for k, s in scales.items():
        try:
            _scaled_axis(jnp.shape(leaves[k]), jnp.shape(s), axis)
        except InputError as e:
            raise InputError(f"local scale {k!r}: {e}") from e


def apply_local_scales(params: Any, scales: Mapping[str, jax.Array], *, axis: int = -1) -> Any:
    """Copy of ``params`` whose named weights are multiplied by their scales along ``axis``. jit-able.

    >>> p = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
    >>> apply_local_scales(p, {"Dense_0/kernel": jnp.array([2.0, 3.0])})["Dense_0"]["kernel"].tolist()
    [[2.0, 3.0], [2.0, 3.0]]

    Raises:
        InputError: a scale names no leaf of ``params``, or its shape does not match that leaf's ``axis``.
    """
    leaves = named_leaves(params)
    _check_scales(leaves, check_mapping(scales, "scales", "{weight name: (O,) scales}"), axis)
    return replace_named(params, {k: scale_rows(leaves[k], s, axis) for k, s in scales.items()})


@jax.jit
def _finite_or_previous(new: Any, old: Any, loss: jax.Array) -> Any:
    """``new`` if ``loss`` and every float leaf of ``new`` are finite, else ``old`` (same structure)."""
    ok = jnp.isfinite(loss)
    for x in jax.tree.leaves(new):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            ok &= jnp.all(jnp.isfinite(x))
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _bias_names(params: Any) -> list[str]:
    # float biases only: an integer leaf has no gradient (jax.grad refuses it)
    return [k for k, v in named_leaves(params).items() if k.rsplit("/", 1)[-1] == "bias" and jnp.ndim(v) == 1
            and jnp.issubdtype(jnp.result_type(v), jnp.floating)]


class LSAResult(NamedTuple):
    """Output of :func:`fit_local_scales`: trained ``scales``, ``params`` (quantized weights, tuned
    biases, scales *not* applied) and the per-step training ``losses`` (steps,)."""

    scales: dict[str, jax.Array]
    params: Any
    losses: jax.Array


def fit_local_scales(
    loss_fn: Callable[[Any, Any], jax.Array],
    params_q: Any,
    scales: Mapping[str, jax.Array],
    data_iter: Iterable[Any],
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 100,
    progress: bool = True,
    *,
    train_biases: bool = True,
    axis: int = -1,
) -> LSAResult:
    """Fine-tune local scales (and biases) on a task loss, weights frozen at their quantized values.

    ``loss_fn(params, batch) -> scalar`` evaluates the model with ``params`` (scales already applied);
    ``data_iter`` yields at least ``steps`` batches (training stops early if it runs out).
    ``optimizer`` defaults to ``optax.adam(1e-3)``. Biases are the 1-D leaves named ``bias``.
    One jitted step per batch; a tqdm bar shows the loss when ``progress``. A step whose gradient is
    not finite (a NaN or Inf loss on that batch) is skipped, so the scales and biases stay finite;
    ``losses`` shows such steps as NaN / Inf.

    >>> import itertools
    >>> w = jnp.linspace(-1, 1, 32).reshape(8, 4)                               # a Dense kernel (in 8, out 4)
    >>> params_q = {"Dense_0": {"kernel": jnp.round(w * 8) / 8 * 0.9, "bias": jnp.zeros(4)}}   # quantized, 10% low
    >>> x = jnp.sin(jnp.arange(512.0)).reshape(64, 8)                          # any inputs
    >>> def loss(p, batch):
    ...     return jnp.mean((batch @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] - batch @ w) ** 2)
    >>> batches = itertools.repeat(x)
    >>> scales = lsa_init(params_q)
    >>> res = fit_local_scales(loss, params_q, scales, batches, steps=200, progress=False)
    >>> params_eval = apply_local_scales(res.params, res.scales)
    >>> bool(loss(params_eval, x) < 0.5 * loss(params_q, x)), bool(jnp.all(res.scales["Dense_0/kernel"] > 1.1))
    (True, True)

    Raises:
        InputError: ``steps`` is not a non-negative int, ``data_iter`` is not iterable, or ``scales``
            do not fit ``params_q`` (:func:`apply_local_scales`).
    """
    steps = check_int(steps, "steps", lo=0)
    progress = check_flag(progress, "progress")
    train_biases = check_flag(train_biases, "train_biases")  # "no" would be True
    if not callable(loss_fn):
        raise InputError(f"loss_fn must be a function (params, batch) -> scalar, got {type(loss_fn).__name__}")
    if optimizer is not None and not (callable(getattr(optimizer, "init", None))
                                      and callable(getattr(optimizer, "update", None))):
        raise InputError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if not isinstance(data_iter, Iterable) or isinstance(data_iter, (str, bytes)):
        raise InputError(f"data_iter must be an iterable of batches, got {type(data_iter).__name__}")
    leaves = named_leaves(params_q)
    # a named error here, not one inside the first traced step
    _check_scales(leaves, check_mapping(scales, "scales", "{weight name: (O,) scales}"), axis)
    opt = optax.adam(1e-3) if optimizer is None else optimizer
    biases = {k: leaves[k] for k in _bias_names(params_q)} if train_biases else {}
    trainable = {"scales": dict(scales), "biases": biases}

    def loss_of(tr: dict[str, Any], batch: Any) -> jax.Array:
        p = replace_named(params_q, tr["biases"]) if tr["biases"] else params_q
        return loss_fn(apply_local_scales(p, tr["scales"], axis=axis), batch)

    @jax.jit
    def step(tr: dict[str, Any], state: Any, batch: Any) -> tuple[dict[str, Any], Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_of)(tr, batch)
        updates, state = opt.update(grads, state, tr)
        return optax.apply_updates(tr, updates), state, loss

    state = opt.init(trainable)
    losses = []
    it = iter(data_iter)
    bar = tqdm(range(steps), desc="LSA", disable=not progress, leave=False)
    for _ in bar:
        try:
            batch = next(it)
        except StopIteration:
            break
        if not losses:  # a named error, not jax.grad's "only defined for scalar-output functions"
            out = jax.eval_shape(loss_of, trainable, batch)
            if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
                raise InputError(f"loss_fn must return a float scalar, got {out}")
        new_trainable, new_state, loss = step(trainable, state, batch)
        # one non-finite step would make every scale NaN for good: it is skipped instead. A separate
        # function, so that the step's own compiled arithmetic (and so every finite result) is unchanged.
        trainable, state = _finite_or_previous((new_trainable, new_state), (trainable, state), loss)
        losses.append(loss)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4g}")
    params_out = replace_named(params_q, trainable["biases"]) if trainable["biases"] else params_q
    return LSAResult(trainable["scales"], params_out, jnp.stack(losses) if losses else jnp.zeros((0,)))
