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

from nncjax.arguments import check_int
from nncjax.errors import InputError

__all__ = ["LowRank", "dc_matrix_shape", "low_rank_decompose", "low_rank_factors", "low_rank_recompose", "svd_tail_norm",
           "rank_for_energy"]


class LowRank(NamedTuple):
    """NNR DC factors: ``g`` (g_rows, rank) and ``h`` (rank, prod(dims) // g_rows)."""

    g: jax.Array
    h: jax.Array


def dc_matrix_shape(dims: tuple[int, ...], g_rows: int | None = None) -> tuple[int, int]:
    """``(g_rows, prod(dims) // g_rows)``, checking that ``g_rows`` divides the element count.

    >>> dc_matrix_shape((16, 8, 3, 3))
    (16, 72)
    """
    dims = tuple(int(d) for d in dims)
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"dims must be positive, got {dims}")
    n = math.prod(dims)
    rows = dims[0] if g_rows is None else int(g_rows)
    if rows <= 0 or n % rows:
        raise InputError(f"g_number_of_rows {rows} does not divide prod(dims) = {n}")
    return rows, n // rows


def _svd_matrix(w: jax.Array, g_rows: int | None) -> jax.Array:
    """``w`` as its DC matrix, float16 / bfloat16 widened to float32 (the SVD has no half-precision kernel)."""
    w = jnp.asarray(w)
    if jnp.issubdtype(w.dtype, jnp.floating) and jnp.finfo(w.dtype).bits < 32:
        w = w.astype(jnp.float32)
    return w.reshape(dc_matrix_shape(w.shape, g_rows))


def low_rank_decompose(w: jax.Array, rank: int, g_rows: int | None = None) -> LowRank:
    """Truncated SVD of ``w`` (NNR layout, any rank >= 1) into DC factors. ``rank``/``g_rows`` static;
    float16 / bfloat16 ``w`` is decomposed (and returned) in float32.

    >>> f = low_rank_decompose(jnp.ones((4, 6)), rank=1)
    >>> f.g.shape, f.h.shape
    ((4, 1), (1, 6))
    """
    m = _svd_matrix(w, g_rows)
    rows, cols = m.shape
    if not 1 <= rank <= min(rows, cols):
        raise InputError(f"rank must be in 1..{min(rows, cols)} for a {rows}x{cols} matrix, got {rank}")
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return LowRank(u[:, :rank] * root[None, :], root[:, None] * vt[:rank])


def low_rank_recompose(g: jax.Array, h: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    """``(G @ H).reshape(dims)``, as the NNR decoder rebuilds W. (r0, k), (k, c) -> dims.

    >>> low_rank_recompose(jnp.ones((4, 1)), jnp.ones((1, 6)), (4, 2, 3)).shape
    (4, 2, 3)
    """
    g, h = jnp.asarray(g), jnp.asarray(h)
    rows, cols = dc_matrix_shape(dims, g.shape[0])
    if g.ndim != 2 or h.ndim != 2 or g.shape[1] != h.shape[0] or h.shape[1] != cols:
        raise InputError(f"G {g.shape} and H {h.shape} do not recompose to {tuple(dims)}")
    return (g @ h).reshape(dims)


def svd_tail_norm(w: jax.Array, rank: int, g_rows: int | None = None) -> jax.Array:
    """Frobenius error of the best rank-``rank`` approximation: ``sqrt(sum_{i >= rank} s_i²)`` (scalar;
    its gradient is 0, not NaN, where that tail is exactly 0).

    >>> float(svd_tail_norm(jnp.eye(3), 2))
    1.0
    """
    s = jnp.linalg.svd(_svd_matrix(w, g_rows), compute_uv=False)
    tail = jnp.sum(s[rank:] ** 2)
    # sqrt's derivative at 0 is infinite: a rank-deficient w would get a NaN gradient
    return jnp.where(tail > 0, jnp.sqrt(jnp.where(tail > 0, tail, 1.0)), 0.0)


def rank_for_energy(w: jax.Array, energy: float = 0.99, g_rows: int | None = None) -> int:
    """Smallest rank keeping at least ``energy`` of ``sum s_i²`` (Python int; not jit-able).

    >>> rank_for_energy(jnp.diag(jnp.array([3.0, 1.0, 0.1])), 0.85)
    1
    """
    if not 0.0 < energy <= 1.0:
        raise InputError(f"energy must be in (0, 1], got {energy}")
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
    if not isinstance(ranks, Mapping):
        raise InputError("ranks must be a mapping {weight name: rank}")
    g_rows = dict(g_rows or {})
    unknown = [n for n in list(ranks) + list(g_rows) if n not in named]
    if unknown:
        raise InputError(f"no tensor named {unknown[0]!r} in params")
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
        f = low_rank_decompose(w.astype(jnp.float32), check_int(rank, f"ranks[{name!r}]"), g_rows.get(name))
        nm = block_names(name)
        flat[nm["G"]], flat[nm["H"]] = np.asarray(f.g, np.float32), np.asarray(f.h, np.float32)
        dims[name] = tuple(int(d) for d in w.shape)
    return flat, dims
