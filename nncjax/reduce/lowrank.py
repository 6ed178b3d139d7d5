"""Low-rank decomposition into NNR's DC form (compressed parameter type NNR_CPT_DC, format §2.14).

A weight with NNR dims ``(d0, d1, ...)`` is viewed as the matrix ``M = W.reshape(g_rows, n // g_rows)``
(``n = prod(dims)``; ``g_rows`` is ``g_number_of_rows``, default ``d0``) and factored as
``M ≈ G @ H`` with ``G: (g_rows, rank)`` and ``H: (rank, n // g_rows)``. The decoder rebuilds
``W = (G @ H).reshape(dims)``. By Eckart–Young the truncated SVD is the best rank-``rank`` factorisation
in Frobenius norm, and its error is the root-sum-square of the discarded singular values.

The singular values are split evenly, ``G = U·√S`` and ``H = √S·Vᵀ``, so both factors have similar
dynamic range and quantize well with one QP each.

:func:`low_rank_factors` prepares a whole model for ``nncjax.encode(..., low_rank=...)``: chosen weights
are replaced by their factors, and decoding rebuilds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.arguments import check_int, check_real, is_concrete
from nncjax.errors import InputError
from nncjax.reduce._tree import as_array, check_float, check_mapping

__all__ = ["LowRank", "check_dims", "dc_matrix_shape", "low_rank_decompose", "low_rank_factors", "low_rank_recompose",
           "svd_tail_norm", "rank_for_energy"]


class LowRank(NamedTuple):
    """NNR DC factors: ``g`` (g_rows, rank) and ``h`` (rank, prod(dims) // g_rows)."""

    g: jax.Array
    h: jax.Array


def dc_matrix_shape(dims: tuple[int, ...], g_rows: int | None = None) -> tuple[int, int]:
    """``(g_rows, prod(dims) // g_rows)``, checking that ``g_rows`` divides the element count.

    >>> dc_matrix_shape((16, 8, 3, 3))
    (16, 72)
    """
    dims = check_dims(dims)
    n = math.prod(dims)
    rows = dims[0] if g_rows is None else check_int(g_rows, "g_number_of_rows", lo=1)  # not int(2.5) == 2
    if n % rows:
        raise InputError(f"g_number_of_rows {rows} does not divide prod(dims) = {n}")
    return rows, n // rows


def check_dims(dims: Any, what: str = "dims") -> tuple[int, ...]:
    """``dims`` as a tuple of positive Python ints; InputError naming ``what`` otherwise (a float dim was
    truncated, ``True`` taken as 1, a string split into digits).

    >>> check_dims([4, np.int64(3)])
    (4, 3)
    """
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise InputError(f"{what} must be a sequence of positive integers, got {dims!r}")
    dims = tuple(dims)
    if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d > 0
                           for d in dims):
        raise InputError(f"{what} must be positive, got {dims}")
    return tuple(int(d) for d in dims)


def _svd_matrix(w: jax.Array, g_rows: int | None) -> jax.Array:
    """``w`` as its DC matrix, float16 / bfloat16 widened to float32 (the SVD has no half-precision kernel).

    Only real floats: an SVD of a complex tensor gives complex factors NNR cannot carry. A concrete ``w``
    with NaN or Inf is refused (LAPACK's SVD never returns on an Inf); a traced one has them made NaN,
    which the SVD passes through as NaN factors."""
    w = check_float(w, "w")
    if jnp.finfo(w.dtype).bits < 32:
        w = w.astype(jnp.float32)
    m = w.reshape(dc_matrix_shape(w.shape, g_rows))
    if is_concrete(m):
        if not bool(jnp.all(jnp.isfinite(m))):
            raise InputError(f"w of shape {w.shape} holds NaN or Inf: its SVD is undefined")
        return m
    return jnp.where(jnp.isfinite(m), m, jnp.nan)


def low_rank_decompose(w: jax.Array, rank: int, g_rows: int | None = None) -> LowRank:
    """Truncated SVD of ``w`` (NNR layout, any rank >= 1) into DC factors. ``rank``/``g_rows`` static;
    float16 / bfloat16 ``w`` is decomposed (and returned) in float32.

    >>> f = low_rank_decompose(jnp.ones((4, 6)), rank=1)
    >>> f.g.shape, f.h.shape
    ((4, 1), (1, 6))
    """
    m = _svd_matrix(w, g_rows)
    rows, cols = m.shape
    rank = check_int(rank, f"rank (for a {rows}x{cols} matrix)", lo=1, hi=min(rows, cols))
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return LowRank(u[:, :rank] * root[None, :], root[:, None] * vt[:rank])


def low_rank_recompose(g: jax.Array, h: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    """``(G @ H).reshape(dims)``, as the NNR decoder rebuilds W. (r0, k), (k, c) -> dims.

    >>> low_rank_recompose(jnp.ones((4, 1)), jnp.ones((1, 6)), (4, 2, 3)).shape
    (4, 2, 3)
    """
    g, h = as_array(g, "G"), as_array(h, "H")
    if g.ndim != 2 or h.ndim != 2:
        raise InputError(f"G {g.shape} and H {h.shape} must be matrices")
    dims = check_dims(dims)
    rows, cols = dc_matrix_shape(dims, g.shape[0])
    if g.shape[1] != h.shape[0] or h.shape[1] != cols:
        raise InputError(f"G {g.shape} and H {h.shape} do not recompose to {tuple(dims)}")
    return (g @ h).reshape(dims)


def svd_tail_norm(w: jax.Array, rank: int, g_rows: int | None = None) -> jax.Array:
    """Frobenius error of the best rank-``rank`` approximation: ``sqrt(sum_{i >= rank} s_i²)`` (scalar;
    its gradient is 0, not NaN, where that tail is exactly 0).

    >>> float(svd_tail_norm(jnp.eye(3), 2))
    1.0
    """
    m = _svd_matrix(w, g_rows)
    # rank -1 would measure only the last singular value, None all of them; rank 0 is the whole norm
    rank = check_int(rank, f"rank (for a {m.shape[0]}x{m.shape[1]} matrix)", lo=0, hi=min(m.shape))
    s = jnp.linalg.svd(m, compute_uv=False)
    tail = jnp.sum(s[rank:] ** 2)
    # sqrt's derivative at 0 is infinite: a rank-deficient w would get a NaN gradient
    # (a NaN tail, from a traced w with NaN or Inf, stays NaN rather than reading as a perfect fit)
    return jnp.where(tail > 0, jnp.sqrt(jnp.where(tail > 0, tail, 1.0)), jnp.where(jnp.isnan(tail), jnp.nan, 0.0))


def rank_for_energy(w: jax.Array, energy: float = 0.99, g_rows: int | None = None) -> int:
    """Smallest rank keeping at least ``energy`` of ``sum s_i²`` (Python int; not jit-able).

    >>> rank_for_energy(jnp.diag(jnp.array([3.0, 1.0, 0.1])), 0.85)
    1
    """
    if not (is_concrete(w) and is_concrete(energy)):
        raise InputError("rank_for_energy is not jit-able: w and energy must be concrete")
    energy = check_real(energy, "energy", above=0.0, hi=1.0)
    s2 = np.asarray(jnp.linalg.svd(_svd_matrix(w, g_rows), compute_uv=False), np.float64) ** 2
    total = s2.sum()
    if total == 0:
        return 1
    cum = np.cumsum(s2) / total
    return int(min(np.searchsorted(cum, energy - 1e-12) + 1, len(s2)))


def low_rank_factors(params: Any, ranks: Mapping[str, int], *, g_rows: Mapping[str, int] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """Replaces chosen weights of a model by their rank-``k`` DC factors, ready for
    ``nncjax.encode(flat, low_rank=dims)``.

    Args:
      params: any pytree of arrays, named by key path joined with "/".
      ranks: ``{weight name: rank}``. A Flax kernel (a leaf named ``.../kernel``, ndim >= 2) is factored
        in NNR layout (output rows first, :func:`nncjax.reduce.flax_to_nnr`), like every block weight,
        so that ``nncjax.decode(data, like=params)`` puts it back in Flax layout.
      g_rows: optional ``{weight name: g_number_of_rows}`` (default: the NNR dims' first entry).

    Returns:
      ``(flat, dims)``: the flat model (``{name: array}``, other leaves unchanged) with float32
      ``"<name>_G"`` (g_rows, rank) and ``"<name>_H"`` (rank, n // g_rows) in each chosen weight's
      place, and ``{name: NNR dims}``.

    Example:
      >>> flat, dims = low_rank_factors({"fc": {"kernel": np.ones((6, 4), np.float32)}}, {"fc/kernel": 1})
      >>> {k: v.shape for k, v in flat.items()}, dims
      ({'fc/kernel_G': (4, 1), 'fc/kernel_H': (1, 6)}, {'fc/kernel': (4, 6)})
    """
    from nncjax.pytree_names import flatten_named
    from nncjax.reduce.bnfold import block_names
    from nncjax.reduce.layout import flax_to_nnr
    from nncjax.reduce.lsa import kernel_rows

    named = flatten_named(params)
    check_mapping(ranks, "ranks", "{weight name: rank}")
    g_rows = dict(check_mapping({} if g_rows is None else g_rows, "g_rows", "{weight name: g_number_of_rows}"))
    unknown = [n for n in list(ranks) + list(g_rows) if n not in named]
    if unknown:
        raise InputError(f"no tensor named {unknown[0]!r} in params")
    unranked = [n for n in g_rows if n not in ranks]
    if unranked:  # it would be silently ignored
        raise InputError(f"g_rows names weights without a rank in ranks: {unranked}")
    for name in ranks:  # the factors must not overwrite a tensor of params (nor another weight's factors)
        clash = [n for k, n in block_names(name).items() if k in ("G", "H") and n in named]
        if clash:
            raise InputError(f"the factors of {name!r} would replace the tensor {clash[0]!r} of params")
    flat: dict[str, np.ndarray] = {}
    dims: dict[str, tuple[int, ...]] = {}
    for name, leaf in named.items():
        if name not in ranks:
            flat[name] = leaf
            continue
        w = jnp.asarray(leaf)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise InputError(f"{name!r}: only float tensors can be factored, got {w.dtype}")
        if kernel_rows(name, w):
            w = flax_to_nnr(w)
        rank = ranks[name]
        grows = g_rows.get(name)
        if grows is not None:
            grows = check_int(grows, f"g_rows[{name!r}]", lo=1)
        f = low_rank_decompose(w.astype(jnp.float32), check_int(rank, f"ranks[{name!r}]"), grows)
        nm = block_names(name)
        flat[nm["G"]], flat[nm["H"]] = np.asarray(f.g, np.float32), np.asarray(f.h, np.float32)
        dims[name] = tuple(int(d) for d in w.shape)
    return flat, dims
