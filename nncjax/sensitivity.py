"""Weight sensitivities of the output distortion and the step sizes they imply (``nncjax.sensitivity``).

For the relative output MSE ``D(w) = mean_k (y_k(w) - y_k(w0))**2 / var(y(w0))`` a small weight
error ``e`` costs ``D ~ e^T G e`` with ``G = J^T J / (N var(y))`` (Gauss-Newton, exact to second
order at ``w0`` because the residual is zero there). :func:`output_sensitivity` estimates the
diagonal of ``G`` with random-sign probes: for ``v`` uniform on ``{-1, 1}`` over the outputs,
``E[(J^T v)_j**2] = (J^T J)_jj``, one vector-Jacobian product per probe.

Quantizing with step ``delta`` adds error of variance ``~ delta**2 / 12`` at ``~ -log2 delta`` bits
per weight, so minimising ``D + lam * R_bits / n`` over the step of a group of weights (a tensor or
one of its rows) with mean sensitivity ``g`` gives ``delta**2 = 6 lam / (n ln2 g)``:
:func:`allocate_steps` turns sensitivities into per-tensor QPs and per-row step ratios (the local
scales of the codec) in closed form, with no search. ``nncjax.optimize(..., init="sensitivity")``
starts from this allocation and calibrates it against the real codec.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"d": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.zeros(2)}}
    >>> apply = lambda p, x: x @ p["d"]["kernel"] + p["d"]["bias"]
    >>> sens = output_sensitivity(params, apply, jnp.eye(3), probes=2)
    >>> sorted(sens), sens["d/kernel"].shape
    (['d/kernel'], (3, 2))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import subjaxprs

from nncjax._layer_stats import batch_bar
from nncjax.arguments import check_int, check_real
from nncjax.distortion import check_output_scale, output_spread
from nncjax.errors import InputError
from nncjax.pytree_names import flatten_named
from nncjax.rd_settings import rows_axis, to_rows_first
from nncjax.reduce._tree import check_axis, default_weight_select, replace_named, select_float_names
from nncjax.steps import check_qp_density, step_to_qp_continuous

__all__ = ["StepAllocation", "allocate_steps", "output_sensitivity", "row_moments", "rows_exercised",
           "spread_over_rows"]


def _random_cotangent(ys: Any, key: jax.Array) -> Any:
    """One random-sign cotangent ``v`` for the outputs ``ys``, each leaf weighted by
    ``1 / sqrt(leaves * size * var)``: ``E[(J^T v)(J^T v)^T]`` is then ``G`` of this batch's D."""
    leaves, treedef = jax.tree_util.tree_flatten(ys)
    if not leaves or any(y.size == 0 for y in leaves):  # D, a mean over every output, would be undefined
        raise InputError(f"apply_fn's outputs must be non-empty arrays, got shapes {[y.shape for y in leaves]}")
    if not any(jnp.issubdtype(y.dtype, jnp.inexact) for y in leaves):  # no gradient: every sensitivity 0
        raise InputError(f"apply_fn's outputs have no float leaf (dtypes {[str(y.dtype) for y in leaves]}): "
                         "they carry no gradient to measure sensitivities with")
    ks = jax.random.split(key, len(leaves))
    scale = [1.0 / math.sqrt(len(leaves) * y.size) / jnp.sqrt(jnp.var(y.astype(jnp.float32)) + 1e-12)
             for y in leaves]
    v = [(jax.random.rademacher(k, y.shape, jnp.float32) * c).astype(y.dtype) for k, y, c in zip(ks, leaves, scale)]
    return jax.tree_util.tree_unflatten(treedef, v)


@functools.partial(jax.jit, static_argnames=("apply_fn", "probes", "batched"))
def _squared_probes(weights: dict, params: Any, batch: Any, key: jax.Array, *, apply_fn, probes: int,
                    batched: bool) -> tuple[dict, Any]:
    """``({name: float32 (shape)}, output spreads)``: the sum over ``probes`` random-sign probes of
    ``(J^T v)**2``, i.e. this batch's D, times ``probes``; and :func:`output_spread` of the outputs,
    for :func:`check_output_scale`. ``batched``: all probes in one VJP with a leading probe axis
    (:func:`_batch_probes` says when that pays)."""
    ys, vjp = jax.vjp(lambda w: apply_fn(replace_named(params, w), batch), weights)
    keys = jax.random.split(key, probes)
    if batched:
        (g,) = jax.vmap(vjp)(jax.vmap(lambda k: _random_cotangent(ys, k))(keys))
        # summed probe by probe, in the loop's order
        acc = jax.tree_util.tree_map(lambda x: functools.reduce(jnp.add, jnp.square(x.astype(jnp.float32))), g)
        return acc, output_spread(ys)
    # a Python loop, not lax.scan: XLA:CPU runs convolutions inside a loop body about 10x slower
    acc = jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, jnp.float32), weights)
    for k in keys:
        (g,) = vjp(_random_cotangent(ys, k))
        acc = jax.tree_util.tree_map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g)
    return acc, output_spread(ys)


_BATCHED_PROBE_BYTES = 1 << 31  # at most this much float32 gradient for all probes at once


def _batch_probes(apply_fn: Callable, params: Any, batch: Any, n_weights: int, probes: int) -> bool:
    """Whether :func:`_squared_probes` should run its probes as one batched VJP: larger matmuls run
    faster and the trace compiles once, not ``probes`` times (MiniLM-L6 on the CPU: 2.1 s instead of
    2.7 s a batch, compiled in 1.4 s less). Not for models with convolutions, whose VJP with a
    batched cotangent XLA:CPU runs about 1.7x slower (the Fashion-MNIST CNN), nor where the
    gradients of all probes together would take more than ``_BATCHED_PROBE_BYTES``."""
    if probes < 2 or 4 * probes * n_weights > _BATCHED_PROBE_BYTES:
        return False
    jaxprs = [jax.make_jaxpr(apply_fn)(params, batch).jaxpr]
    while jaxprs:
        j = jaxprs.pop()
        if any(e.primitive.name == "conv_general_dilated" for e in j.eqns):
            return False
        jaxprs.extend(subjaxprs(j))
    return True


@functools.partial(jax.jit, static_argnames=("apply_fn", "probes"))
def _probe_gradients(weights: dict, params: Any, batch: Any, key: jax.Array, *, apply_fn,
                     probes: int) -> tuple[dict, Any]:
    """``({name: (probes, *shape)}, output spreads)``: ``J^T v`` of ``probes`` random-sign probes, and
    :func:`output_spread` of the outputs."""
    ys, vjp = jax.vjp(lambda w: apply_fn(replace_named(params, w), batch), weights)
    grads = [vjp(_random_cotangent(ys, k))[0] for k in jax.random.split(key, probes)]
    return jax.tree_util.tree_map(lambda *g: jnp.stack(g).astype(jnp.float32), *grads), output_spread(ys)


def output_sensitivity(
    params: Any,
    apply_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    probes: int = 4,
    select: Callable[[str, Any], bool] | Any = default_weight_select,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Diagonal Gauss-Newton sensitivities of the relative output MSE, per weight.

    Args:
      params: model parameters (any pytree; sharded arrays keep their sharding).
      apply_fn: ``apply_fn(params, batch) -> outputs`` (a pytree of arrays; each leaf's MSE is taken
        relative to its variance, leaves averaged, as ``nncjax.optimize``'s ``distortion="output"``).
      data: one batch or a ``list`` of batches (D averaged over them).
      probes: random-sign probes per batch (one VJP each); the estimate's relative noise falls as
        ``1 / sqrt(probes * outputs)``, and summing it over a row or tensor averages it further.
      select: predicate ``(name, leaf) -> bool`` or list of names (default: float tensors with
        ``ndim > 1``).
      seed: PRNG seed of the probes.
      progress: tqdm bar over the batches (when there are several).

    Returns:
      ``{name: float32 array of the leaf's shape}`` with ``D(w0 + e) ~ sum_j sens_j * e_j**2`` for
      small independent errors ``e`` (names as :func:`nncjax.pytree_names.flatten_named`).

    Raises:
      InputError: bad ``probes``, empty ``data``, or no float tensor selected.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(32.0).reshape(8, 4)         # outputs must vary (a constant one has no relative MSE)
      >>> sens = output_sensitivity({"w": jnp.ones((4, 2))}, lambda p, x: x @ p["w"], x)
      >>> sens["w"].shape
      (4, 2)
    """
    batches = checked_batches(apply_fn, data, probes)
    named = flatten_named(params)
    chosen = select_float_names(named, select)
    if not chosen:
        raise InputError("select chose no float tensors")
    weights = {n: named[n] for n in chosen}
    key = jax.random.PRNGKey(check_int(seed, "seed"))
    total = None
    batched = _batch_probes(apply_fn, params, batches[0], sum(int(np.size(w)) for w in weights.values()),
                            int(probes))
    for i, batch in enumerate(batch_bar(batches, progress, "sensitivity probes")):
        acc, spread = _squared_probes(weights, params, batch, jax.random.fold_in(key, i), apply_fn=apply_fn,
                                      probes=int(probes), batched=batched)
        # a constant output leaf's cotangent is scaled by 1 / sqrt(1e-12): its sensitivities would be 1e12 too large
        check_output_scale(spread, i)
        total = acc if total is None else jax.tree_util.tree_map(jnp.add, total, acc)
    scale = 1.0 / (int(probes) * len(batches))
    return _finite({n: np.asarray(total[n], np.float32) * np.float32(scale) for n in chosen})


def _finite(sens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``sens`` after checking it is finite (NaN or Inf in params, data or outputs made it NaN)."""
    bad = [n for n, g in sens.items() if not np.all(np.isfinite(g))]
    if bad:
        raise InputError(f"the sensitivities of {bad[:5]} are not finite: params, data or the model's outputs "
                         "hold NaN or Inf")
    return sens


def row_moments(
    params: Any,
    apply_fn: Callable[[Any, Any], Any],
    data: Any,
    names: list[str] | tuple[str, ...],
    *,
    row_scales: Mapping[str, Any] | None = None,
    scale_axis: int = -1,
    probes: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Gauss-Newton matrix of the output distortion over one row of a tensor, pooled over its rows.

    :func:`output_sensitivity` keeps the diagonal of ``G``; this keeps, for each row ``r`` of a
    tensor, the whole ``(columns, columns)`` block ``G_r`` that couples the row's own elements, and
    returns ``H = sum_r s_r**2 G_r`` (``s``: the row's local scale). If the coded rows ``x_r = w_r / s_r``
    take errors ``d_r`` with the same covariance ``C``, then ``D ~ trace(H C)``: ``H`` is to a row's
    coding error what the input moments ``E[x x^T]`` are to a linear layer's
    (:func:`nncjax.quantize.gptq.input_moments`), and :func:`nncjax.with_error_feedback` takes it as
    a tensor's ``moments``. It serves tensors that do not multiply a layer's inputs, above all
    lookup tables: a token embedding's rows go through LayerNorm, which
    ignores an error shared by all the row's elements, and the layers after it see a few directions
    far more than others; GPTQ moves the error into what ``H`` hardly sees.

    Rows are along :func:`nncjax.rd_settings.rows_axis` (``scale_axis`` as there: an embedding's first
    axis; a Flax kernel's outputs), columns are the rest flattened in the coded (NNR) layout. Only
    rows with a non-zero probe gradient are multiplied out (a batch touches few rows of a table).

    Args:
      params: model parameters (any pytree).
      apply_fn: ``apply_fn(params, batch) -> outputs`` (D as :func:`output_sensitivity`'s).
      data: one batch or a list of batches (``H`` averaged over them).
      names: tensors to measure (names as :func:`nncjax.pytree_names.flatten_named`), ``ndim >= 2``.
      row_scales: ``{name: (rows,)}`` local scales ``s`` (e.g. ``settings.local_scales`` of
        :func:`nncjax.optimize`); default 1 for every row.
      scale_axis: ``-1`` for Flax params, ``0`` for rows-first (PyTorch / NNR) layout.
      probes: random-sign probes per batch; ``H``'s rank is at most ``probes * len(data)`` times the
        rows a batch touches. seed: PRNG seed of the probes.
      progress: tqdm bar over the batches (when there are several).

    Returns:
      ``{name: float64 (columns, columns)}``, symmetric positive semi-definite.

    Raises:
      InputError: bad ``probes``, empty ``data``, an unknown or non-float name, a tensor with fewer
        than 2 dimensions, row scales of the wrong shape or not positive and finite, or a
        ``scale_axis`` other than -1 and 0.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"emb": {"embedding": jnp.arange(15.0).reshape(5, 3) ** 2}}
      >>> def apply(p, ids):                    # rows looked up, then their mean removed (as LayerNorm)
      ...     e = p["emb"]["embedding"][ids]
      ...     return e - e.mean(-1, keepdims=True)
      >>> h = row_moments(p, apply, jnp.array([0, 1, 1, 4]), ["emb/embedding"])["emb/embedding"]
      >>> h.shape, bool(abs(h.sum()) < 1e-6 * np.trace(h))   # blind to an error shared by a row
      ((3, 3), True)
    """
    batches = checked_batches(apply_fn, data, probes)
    named = flatten_named(params)
    names = list(names) if isinstance(names, (list, tuple)) else names
    if not isinstance(names, list) or not names:
        raise InputError("names must be a non-empty list of tensor names")
    check_int(scale_axis, "scale_axis (-1: Flax, 0: rows first)", lo=-1, hi=0)
    if row_scales is not None and not isinstance(row_scales, Mapping):
        raise InputError(f"row_scales must be a mapping {{name: (rows,)}}, got {type(row_scales).__name__}")
    row_scales = dict(row_scales or {})
    axes = {}
    for n in names:
        leaf = named.get(n) if isinstance(n, str) else None
        if leaf is None or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise InputError(f"{n!r} is not a float tensor of params")
        if jnp.ndim(leaf) < 2:
            raise InputError(f"{n!r} has shape {jnp.shape(leaf)}: row moments need rows and columns")
        axes[n] = rows_axis(n, jnp.ndim(leaf), scale_axis)
        rows = jnp.shape(leaf)[axes[n]]
        if n in row_scales:
            s = _real_array(row_scales[n], f"row_scales[{n!r}]")
            if s.shape != (rows,):
                raise InputError(f"row_scales[{n!r}] must have shape ({rows},), got {s.shape}")
            if not np.all(np.isfinite(s) & (s > 0)):
                raise InputError(f"row_scales[{n!r}] must be positive and finite")
    weights = {n: named[n] for n in names}
    key = jax.random.PRNGKey(check_int(seed, "seed"))
    total = {n: 0.0 for n in names}
    for i, batch in enumerate(batch_bar(batches, progress, "row moments")):
        grads, spread = _probe_gradients(weights, params, batch, jax.random.fold_in(key, i), apply_fn=apply_fn,
                                         probes=int(probes))
        check_output_scale(spread, i)
        for n, g in grads.items():
            s = np.asarray(row_scales.get(n, np.ones(g.shape[1 + axes[n]])), np.float32)
            for gp in np.asarray(g):
                gx = to_rows_first(gp, axes[n])
                gx = gx.reshape(gx.shape[0], math.prod(gx.shape[1:]))  # not -1: a table may have no rows
                touched = np.flatnonzero(np.any(gx != 0, axis=1))
                # d D / d x_r = s_r d D / d w_r for the coded row x_r = w_r / s_r
                gx = gx[touched] * s[touched, None]
                total[n] = total[n] + (gx.T @ gx).astype(np.float64)
    scale = 1.0 / (int(probes) * len(batches))
    return _finite({n: np.asarray(total[n], np.float64) * scale for n in names})


@dataclasses.dataclass(frozen=True)
class StepAllocation:
    """What :func:`allocate_steps` chose.

    Attributes:
      qp: ``{name: float}`` real-valued QP of each tensor's step (round it for the codec).
      row_scale: ``{name: float64 (rows,)}`` per-row step factors (the codec's local scales: row
        ``r`` is quantized with step ``row_scale[r] * step(qp)``), for tensors given a rows axis whose
        every row the data exercised.
    """

    qp: dict[str, float]
    row_scale: dict[str, np.ndarray]


def checked_batches(apply_fn: Any, data: Any, probes: Any) -> list:
    """``data`` as a non-empty list of batches, after checking ``apply_fn`` and ``probes``; raises
    InputError otherwise.

    >>> len(checked_batches(abs, [1, 2], 4)), checked_batches(abs, 3, 1)
    (2, [3])
    """
    check_int(probes, "probes", lo=1)
    if not callable(apply_fn):
        raise InputError("apply_fn must be callable")
    batches = data if isinstance(data, list) else [data]
    if not batches:
        raise InputError("data is an empty list")
    return batches


def _real_array(x: Any, what: str) -> np.ndarray:
    """``x`` as a float64 array after checking it holds real numbers (bool, integer, float); raises
    InputError naming ``what`` otherwise (complex values lost their imaginary part, strings raised).

    >>> _real_array([1, 2], "usage")
    array([1., 2.])
    """
    a = np.asarray(x)
    if not (a.dtype == bool or jnp.issubdtype(a.dtype, jnp.integer) or jnp.issubdtype(a.dtype, jnp.floating)):
        raise InputError(f"{what} must hold real numbers, got dtype {a.dtype}")
    return a.astype(np.float64)


def _sensitivity_array(g: Any, what: str) -> np.ndarray:
    """``g`` as a float64 array after checking it holds finite real numbers >= 0; else InputError."""
    a = _real_array(g, what)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise InputError(f"{what} must be finite and >= 0")
    return a


def _row_means(g: np.ndarray, axis: int) -> np.ndarray:
    return g.mean(axis=_other_axes(g.ndim, axis))


def rows_exercised(sensitivity: np.ndarray, axis: int) -> bool:
    """Whether every row along ``axis`` has positive sensitivity: the data exercised it, so its
    step may be set from its own sensitivity (otherwise the tensor keeps one step).

    Raises InputError for an axis outside ``sensitivity`` (it was wrapped around) or a sensitivity that
    is not finite and >= 0.

    >>> rows_exercised(np.array([[1.0, 0.0], [0.0, 2.0]]), 0), rows_exercised(np.array([[1.0, 0.0]]), 1)
    (True, False)
    """
    g = _sensitivity_array(sensitivity, "sensitivity")
    return bool(np.all(_row_means(g, check_axis(axis, g.ndim)) > 0))


def spread_over_rows(sensitivity: np.ndarray, usage: Any, axis: int = 0, prior: float = 0.2) -> np.ndarray:
    """Redistributes a tensor's total sensitivity over its rows in proportion to ``usage + prior * mean(usage)``.

    For lookup tables (token embeddings) a small tuning batch exercises few rows, yet a row's
    sensitivity is, to first order, how often it is looked up times a cost per lookup that is about
    the same for every row. Counts from a larger corpus (e.g. token counts of plain text, which need
    no forward pass) then give every row its own sensitivity. ``prior`` (a pseudo-count, as a
    fraction of the mean count) smooths them: rows never counted keep a small share, so the
    allocation coarsens them by a bounded factor instead of treating them as free.

    Args:
      sensitivity: ``(..., rows along axis, ...)`` float array from :func:`output_sensitivity`.
      usage: ``(rows,)`` non-negative finite counts, one per row along ``axis`` (all zero: uniform).
      axis: the rows axis of ``sensitivity``.
      prior: pseudo-count added to every row, as a fraction of the mean count; ``> 0``.

    Returns:
      float32 array of ``sensitivity``'s shape and total; constant along each row, row ``r`` holding
      ``total * w[r] / sum(w) / row_size`` with ``w = usage + prior * mean(usage)``.

    Raises:
      InputError: ``usage`` of the wrong shape, negative or non-finite, a bad ``prior`` or ``axis``, a
      sensitivity that is not finite and >= 0.

    Example:
      >>> spread_over_rows(np.array([[3.0, 3.0], [0.0, 0.0], [0.0, 0.0]]), [3, 0, 0], prior=1.0)
      array([[2. , 2. ],
             [0.5, 0.5],
             [0.5, 0.5]], dtype=float32)
    """
    g = _sensitivity_array(sensitivity, "sensitivity")
    axis = check_axis(axis, g.ndim)
    u = _real_array(usage, "usage")
    if u.shape != (g.shape[axis],):
        raise InputError(f"usage must have shape ({g.shape[axis]},) (rows along axis {axis} of {g.shape}), "
                         f"got {u.shape}")
    if not np.all(np.isfinite(u)) or np.any(u < 0):
        raise InputError("usage counts must be finite and >= 0")
    prior = check_real(prior, "prior", above=0)
    if g.size == 0:  # no rows or no columns: nothing to spread
        return g.astype(np.float32)
    with np.errstate(over="ignore"):  # checked below
        w = u + prior * u.mean() if u.any() else np.ones_like(u)
        total = w.sum()
    if not np.isfinite(total):  # the shares would be NaN
        raise InputError("usage counts overflow float64 when summed: scale them down")
    per_row = g.sum() * w / total / math.prod(g.shape[:axis] + g.shape[axis + 1:])
    return np.broadcast_to(np.expand_dims(per_row, _other_axes(g.ndim, axis)), g.shape).astype(np.float32)


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis % ndim)


def allocate_steps(
    sensitivity: Mapping[str, np.ndarray],
    lam: float,
    *,
    n_weights: float | None = None,
    rows_axes: Mapping[str, int] | None = None,
    rate_slope: Mapping[str, float] | None = None,
    max_ratio: float = 4.0,
    qp_density: int = 2,
    qp_range: tuple[float, float] = (-128.0, 127.0),
) -> StepAllocation:
    """Closed-form steps minimising ``sum sens * step**2 / 12 + lam * R_bits / n_weights`` with the
    rate model ``R = -beta log2 step`` bits per weight: ``step**2 = 6 lam beta / (n_weights ln2 g)``
    for a group of weights of mean sensitivity ``g`` (``beta = 1`` at high rate).

    Args:
      sensitivity: ``{name: array}`` from :func:`output_sensitivity`.
      lam: price of one bit per weight in units of D (``nncjax.optimize``'s ``lam``); > 0.
      n_weights: the ``n`` of ``lam * R / n`` (default: all elements of ``sensitivity``).
      rows_axes: ``{name: axis}`` of tensors that get per-row steps (local scales); a tensor with a
        row that has zero sensitivity (not exercised by the data, e.g. an embedding row of a token
        never seen) keeps one step: the data say nothing about such rows.
      rate_slope: ``{name: beta}`` bits per weight saved by doubling the tensor's step (default 1, the
        high-rate value; at low rates it is smaller, e.g. measured with the real coder at two QPs).
      max_ratio: per-row steps stay within ``[1 / max_ratio, max_ratio]`` of the tensor's step.
      qp_density: QP resolution of the returned QPs. qp_range: ``(lo, hi)``, QPs are clipped to it.

    Returns:
      :class:`StepAllocation`.

    Raises:
      InputError: ``lam``, ``n_weights`` or a rate slope not a finite number > 0, ``max_ratio < 1``, a
      negative or non-finite sensitivity, a rows axis outside a tensor, or ``qp_range`` not two finite
      numbers ``lo <= hi``.

    Example:
      >>> sens = {"w": np.array([[4.0, 4.0], [1.0, 1.0]]) * 1e-3}
      >>> a = allocate_steps(sens, 1e-2, rows_axes={"w": 0})
      >>> np.round(a.row_scale["w"], 3)                       # rows 4x more sensitive: half the step
      array([0.707, 1.414])
    """
    lam = check_real(lam, "lam", above=0)
    check_real(max_ratio, "max_ratio", lo=1)
    qpd = check_qp_density(qp_density)
    for what, m in (("sensitivity", sensitivity), ("rows_axes", rows_axes), ("rate_slope", rate_slope)):
        if m is not None and not isinstance(m, Mapping):
            raise InputError(f"{what} must be a mapping {{name: ...}}, got {type(m).__name__}")
    sens = {n: _sensitivity_array(g, f"sensitivity of {n!r}") for n, g in sensitivity.items()}
    size = max(sum(g.size for g in sens.values()), 1)  # all tensors empty: any n, their steps are the coarsest
    n = check_real(n_weights, "n_weights", above=0) if n_weights is not None else float(size)
    rows_axes = dict(rows_axes or {})
    slopes = {name: check_real(beta, f"rate_slope of {name!r}", above=0) for name, beta in (rate_slope or {}).items()}
    if not (isinstance(qp_range, (tuple, list)) and len(qp_range) == 2):
        raise InputError(f"qp_range must be two finite numbers (lo, hi) with lo <= hi, got {qp_range!r}")
    lo = check_real(qp_range[0], "qp_range[0]")
    hi = check_real(qp_range[1], "qp_range[1]", lo=lo)

    def log_step_of(mean, beta):  # ln step of a mean sensitivity (array); zero -> +inf, the coarsest step
        with np.errstate(divide="ignore"):  # in logs: the step itself overflows or underflows at extreme lam / sens
            return 0.5 * (math.log(6.0 * beta / math.log(2.0)) + math.log(lam) - math.log(n) - np.log(mean))

    def qp_of(log_step):  # steps beyond float64 (e**+-700) are beyond every QP range anyway
        return float(np.clip(step_to_qp_continuous(math.exp(np.clip(log_step, -700.0, 700.0)), qpd), lo, hi))

    qps, scales = {}, {}
    for name, g in sens.items():
        beta = slopes.get(name, 1.0)
        axis = rows_axes.get(name)
        if axis is not None:
            axis = check_int(axis, f"rows axis of {name!r} (shape {g.shape})", lo=-g.ndim, hi=g.ndim - 1)
        if axis is not None and g.shape[axis] > 1 and rows_exercised(g, axis):
            log_step = log_step_of(_row_means(g, axis), beta)
            centre = float(np.median(log_step))
            log_step = np.clip(log_step, centre - math.log(max_ratio), centre + math.log(max_ratio))
            qp = qp_of(centre)
            scales[name] = np.exp(log_step - centre)
        else:
            qp = qp_of(log_step_of(g.mean() if g.size else 0.0, beta))
        qps[name] = qp
    return StepAllocation(qps, scales)
