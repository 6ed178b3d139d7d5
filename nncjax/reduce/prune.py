"""Sparsification and pruning: masks and pruned parameters, as pure jit-able functions.

NNR carries nothing specific for sparsity (format digest §10): zeros are cheap for DeepCABAC and
all-zero output rows are skipped by row skipping. These tools are encoder-side preprocessing.

Every function takes a parameter pytree and a ``select(name, leaf) -> bool`` predicate or a list of names
(default: tensors with more than one dimension, NNCodec's "weights"); only non-empty real floating-point
tensors are ever pruned (an integer or bool leaf is a count or an index, not a weight); unselected
leaves get an all-true mask.
Masks are boolean pytrees of the parameters' structure and shapes (``True`` = kept). Pruning by a
ratio removes exactly ``floor(ratio · n)`` entries (ties broken by position), so ratios may be traced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.arguments import check_real, is_concrete
from nncjax.errors import InputError
from nncjax.reduce._tree import (
    as_array,
    check_axis,
    check_mapping,
    default_weight_select,
    named_leaves,
    replace_named,
    select_float_names,
)

__all__ = [
    "apply_masks",
    "sparsity",
    "magnitude_prune",
    "stats_threshold_prune",
    "row_scores",
    "row_prune",
    "row_prune_below_mean",
    "zero_rows",
]

Select = Callable[[str, jax.Array], bool]


def _check_scalar(x: Any, what: str, **bounds: float) -> Any:
    """A concrete ``x`` checked by :func:`~nncjax.arguments.check_real` (as a float); a traced ``x`` must be
    one real number (its shape and dtype are static, its value cannot be read without a host sync)."""
    if is_concrete(x):
        return check_real(x, what, **bounds)
    if jnp.shape(x) != () or not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise InputError(f"{what} must be one real number, got a traced {x.dtype} of shape {jnp.shape(x)}")
    return x


def _check_finite(name: str, v: jax.Array) -> None:
    """InputError if a concrete ``v`` holds NaN or Inf: a statistic of it (mean, std) would then be NaN
    or Inf, and the threshold would silently prune every finite entry. Skipped for tracers."""
    if is_concrete(v) and not bool(jnp.all(jnp.isfinite(v))):
        raise InputError(f"tensor {name!r} holds NaN or Inf: its statistics, and so what is pruned, are undefined")


def _selected(params: Any, select: Any) -> dict[str, jax.Array]:
    """The selected leaves ``{name: leaf}``: non-empty real floats only (:func:`select_float_names`)."""
    named = named_leaves(params)
    return {k: named[k] for k in select_float_names(named, select)}


def _keep_top(scores: jax.Array, ratio: jax.Array | float) -> jax.Array:
    """Mask keeping all but the ``floor(ratio · n)`` smallest entries of 1-D ``scores``."""
    n = scores.shape[0]
    k = jnp.floor(jnp.clip(jnp.asarray(ratio, jnp.float32), 0.0, 1.0) * n).astype(jnp.int32)
    rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    return rank >= k


def apply_masks(params: Any, masks: Any) -> Any:
    """``params`` with masked-out entries set to zero. Same structure and shapes in and out.

    >>> apply_masks({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"].tolist()
    [1.0, 0.0]

    Raises:
      InputError: ``masks`` name other tensors than ``params`` (missing or extra ones), or a mask is not
        a bool array of its tensor's shape (a float mask of 0.5 would keep, a broadcast one repeat).
    """
    p_named, m_named = named_leaves(params), named_leaves(masks)
    if jax.tree.structure(params) != jax.tree.structure(masks):
        missing, extra = sorted(set(p_named) - set(m_named)), sorted(set(m_named) - set(p_named))
        raise InputError(f"masks must have the structure of params: missing {missing}, extra {extra}")
    for k, m in m_named.items():
        if jnp.shape(m) != jnp.shape(p_named[k]) or as_array(m, f"mask {k!r}").dtype != jnp.bool_:
            raise InputError(f"mask {k!r} must be a bool array of shape {jnp.shape(p_named[k])}, "
                             f"got {jnp.asarray(m).dtype} {jnp.shape(m)}")
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity(params: Any, select: Select = default_weight_select) -> jax.Array:
    """Fraction of exact zeros among the selected leaves (scalar float32).

    >>> float(sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 0.0]])}))
    0.75
    """
    named = named_leaves(params)
    if callable(select):
        sel = [v for k, v in named.items() if select(k, v)]
    elif isinstance(select, (list, tuple)) and all(isinstance(k, str) for k in select):
        missing = [k for k in select if k not in named]
        if missing:
            raise InputError(f"select names no tensors of params: {missing}")
        sel = [named[k] for k in select]
    else:
        raise InputError(f"select must be a predicate (name, leaf) -> bool or a list of names, got {select!r}")
    if not sum(jnp.size(v) for v in sel):  # nothing selected, or only empty tensors: not 0 / 0 = NaN
        return jnp.float32(0.0)
    zeros = sum(jnp.sum(v == 0) for v in sel)
    return (zeros / sum(v.size for v in sel)).astype(jnp.float32)


def _masks_from(params: Any, selected: dict[str, jax.Array]) -> Any:
    full = {k: jnp.ones(v.shape, bool) for k, v in named_leaves(params).items()}
    full.update(selected)
    return replace_named(jax.tree.map(lambda v: jnp.ones(jnp.shape(v), bool), params), full)


def magnitude_prune(
    params: Any, ratio: float | jax.Array, *, scope: str = "global", select: Select = default_weight_select
) -> tuple[Any, Any]:
    """Unstructured magnitude pruning: zero the ``ratio`` fraction of smallest ``|w|``.

    ``scope="global"`` ranks all selected entries together; ``"per_tensor"`` prunes each tensor by
    ``ratio``. Returns ``(pruned_params, masks)``. jit-able (``scope``/``select`` static); a concrete
    ``ratio`` must be in [0, 1] (a traced one is clipped to it).

    >>> p, m = magnitude_prune({"w": jnp.array([[3.0, -1.0], [0.5, 2.0]])}, 0.5)
    >>> p["w"].tolist()
    [[3.0, 0.0], [0.0, 2.0]]
    """
    ratio = _check_scalar(ratio, "ratio", lo=0.0, hi=1.0)
    leaves = _selected(params, select)
    if scope == "per_tensor":
        masks = {k: _keep_top(jnp.abs(v).ravel(), ratio).reshape(v.shape) for k, v in leaves.items()}
    elif scope == "global":
        masks = {}
        if leaves:
            flat = jnp.concatenate([jnp.abs(v).ravel().astype(jnp.float32) for v in leaves.values()])
            keep = _keep_top(flat, ratio)
            off = 0
            for k, v in leaves.items():
                masks[k] = keep[off : off + v.size].reshape(v.shape)
                off += v.size
    else:
        raise InputError(f"scope must be 'global' or 'per_tensor', got {scope!r}")
    m = _masks_from(params, masks)
    return apply_masks(params, m), m


def stats_threshold_prune(
    params: Any,
    delta: float | jax.Array = 1.0,
    *,
    step: float | jax.Array | None = None,
    select: Select = default_weight_select,
) -> tuple[Any, Any]:
    """NNCodec's statistics rule: keep ``|w| >= |mean| + delta·std`` per tensor.

    The threshold ``|μ| + δσ`` equals NNCodec's ``max(|μ − δσ|, |μ + δσ|)``. With a quantization
    ``step``, the threshold is at least ``step / 2`` (entries below it would quantize to 0 anyway).
    Returns ``(pruned_params, masks)``. jit-able.

    >>> p, _ = stats_threshold_prune({"w": jnp.array([[0.1, -3.0], [0.2, 3.0]])}, 0.5)
    >>> p["w"].tolist()
    [[0.0, -3.0], [0.0, 3.0]]
    """
    delta = _check_scalar(delta, "delta")  # its sign does not matter: |μ| + |δ|σ
    if step is not None:
        step = _check_scalar(step, "step", above=0.0)
    masks = {}
    for k, v in _selected(params, select).items():
        _check_finite(k, v)
        thr = jnp.abs(jnp.mean(v)) + jnp.abs(jnp.asarray(delta, v.dtype)) * jnp.std(v)
        if step is not None:
            thr = jnp.maximum(thr, jnp.asarray(step, v.dtype) / 2)
        masks[k] = jnp.abs(v) >= thr
    m = _masks_from(params, masks)
    return apply_masks(params, m), m


def row_scores(w: jax.Array, axis: int = -1) -> jax.Array:
    """Mean ``|w|`` per output row (over every axis but ``axis``). ``w``: (..., O) -> (O,).

    >>> row_scores(jnp.array([[1.0, -2.0], [3.0, 0.0]])).tolist()
    [2.0, 1.0]
    """
    w = as_array(w, "w")
    if w.ndim < 1:
        raise InputError(f"row_scores needs a tensor with an output axis, got shape {w.shape}")
    ax = check_axis(axis, w.ndim)
    return jnp.mean(jnp.abs(w), axis=tuple(i for i in range(w.ndim) if i != ax))


def _row_masks(params: Any, keep_rows: Callable[[jax.Array], jax.Array], select: Select, axis: int,
               finite: bool = False) -> Any:
    masks = {}
    for k, v in _selected(params, select).items():
        if finite:
            _check_finite(k, v)
        keep = keep_rows(row_scores(v, axis))
        ax = check_axis(axis, v.ndim)
        masks[k] = jnp.broadcast_to(keep.reshape((-1,) + (1,) * (v.ndim - 1 - ax)), v.shape)
    return _masks_from(params, masks)


def row_prune(
    params: Any, ratio: float | jax.Array, *, axis: int = -1, select: Select = default_weight_select
) -> tuple[Any, Any]:
    """Structured (filter) pruning: zero the ``floor(ratio·O)`` output rows of smallest mean ``|w|``
    in each selected tensor. ``axis`` is the output axis (-1 Flax, 0 NNR layout).
    Returns ``(pruned_params, masks)`` with masks broadcast to the full tensor shapes. jit-able; a
    concrete ``ratio`` must be in [0, 1].

    >>> p, _ = row_prune({"w": jnp.array([[1.0, 0.1], [1.0, 0.1]])}, 0.5)
    >>> p["w"].tolist()
    [[1.0, 0.0], [1.0, 0.0]]
    """
    ratio = _check_scalar(ratio, "ratio", lo=0.0, hi=1.0)
    m = _row_masks(params, lambda s: _keep_top(s, ratio), select, axis)
    return apply_masks(params, m), m


def row_prune_below_mean(
    params: Any, gain: float | jax.Array = 0.9, *, axis: int = -1, select: Select = default_weight_select
) -> tuple[Any, Any]:
    """NNCodec's adaptive structured rule: zero the rows whose mean ``|w|`` is below
    ``gain · mean(row means)``. Returns ``(pruned_params, masks)``. jit-able.

    >>> p, _ = row_prune_below_mean({"w": jnp.array([[1.0, 0.1], [1.0, 0.1]])})
    >>> p["w"].tolist()
    [[1.0, 0.0], [1.0, 0.0]]
    """
    gain = _check_scalar(gain, "gain", lo=0.0)
    m = _row_masks(params, lambda s: s >= jnp.asarray(gain, s.dtype) * jnp.mean(s), select, axis, finite=True)
    return apply_masks(params, m), m


def zero_rows(params: Any, rows: Mapping[str, Any], *, axis: int = 0) -> Any:
    """``params`` with the listed rows (indices along ``axis``) of the named tensors set to zero,
    e.g. the vocabulary rows a tokenizer never emits (:func:`nncjax.reduce.vocab.unreachable_token_ids`).

    Args:
      params: parameter pytree. rows: ``{name: int indices}`` (names as
        :func:`nncjax.pytree_names.flatten_named`). axis: the rows axis (0 for embedding tables).

    Returns:
      params of the same structure, shapes and dtypes.

    Raises:
      InputError: an unknown name, a tensor without ``axis``, or an index outside the tensor.

    >>> zero_rows({"emb": jnp.ones((3, 2))}, {"emb": [0, 2]})["emb"].tolist()
    [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    named = named_leaves(params)
    new = {}
    for name, idx in check_mapping(rows, "rows", "{name: row indices}").items():
        if name not in named:
            raise InputError(f"zero_rows: no tensor named {name!r}")
        w = jnp.asarray(named[name])
        try:
            ax = check_axis(axis, w.ndim)  # not axis=True as 1, nor 0.0 (a TypeError in shape[])
        except InputError as e:
            raise InputError(f"zero_rows: {name!r} of shape {w.shape} has no axis {axis!r} ({e})") from None
        if not is_concrete(idx):
            raise InputError(f"zero_rows: row indices of {name!r} must be concrete (static under jit)")
        ids = np.asarray(idx)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1
                         or ids.min() < 0 or ids.max() >= w.shape[ax]):
            raise InputError(f"zero_rows: row indices of {name!r} must be 1-D integers in [0, {w.shape[ax]})")
        keep = np.ones(w.shape[ax], bool)
        keep[ids.astype(np.int64)] = False
        shape = [1] * w.ndim
        shape[ax] = -1
        new[name] = jnp.where(jnp.asarray(keep).reshape(shape), w, jnp.zeros((), w.dtype))
    return replace_named(params, new)
