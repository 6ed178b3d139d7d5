"""Weight unification: tiles of weights share one magnitude (signs kept).

NNR signals unification only as performance-map metadata (``unification_threshold`` etc.; NNCodec
implements no unification tool, format digest §10), so this is encoder-side preprocessing. Each
output row of the NNR-layout tensor is cut into consecutive tiles of ``tile`` elements (with
``tile = kh·kw`` a tile is one 2-D kernel of a convolution). A tile whose magnitudes vary little,
``std(|w|) <= threshold · mean(|w|)``, is replaced by ``sign(w) · mean(|w|)``: its values become
one magnitude and a sign pattern, which the entropy coder codes cheaply after quantization.
Elements left over at the end of a row (fewer than ``tile``) are never changed. Only real floating-point
tensors are unified (an integer tensor would come back as float).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from nncjax.arguments import check_flag, check_int, check_real, is_concrete
from nncjax.errors import InputError
from nncjax.reduce._tree import check_float, default_weight_select, named_leaves, replace_named, select_float_names
from nncjax.reduce.layout import flax_to_nnr, nnr_to_flax

__all__ = ["unify_tiles", "unify_params"]


def unify_tiles(w: jax.Array, tile: int, threshold: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unify the tiles of one NNR-layout tensor ``w`` (O, ...). ``tile`` static, ``threshold`` may be traced.

    Returns ``(w_unified, unified)`` with ``w_unified`` of ``w``'s shape and ``unified`` a bool
    (O, cols // tile) telling which tiles were replaced (``cols = w.size // O``).

    >>> wu, ok = unify_tiles(jnp.array([[1.0, -1.1, 0.9, 5.0, 0.5, 2.0]]), 3, 0.2)
    >>> wu.tolist(), ok.tolist()
    ([[1.0, -1.0, 1.0, 5.0, 0.5, 2.0]], [[True, False]])
    """
    w = check_float(w, "w")
    if w.ndim < 1 or w.shape[0] < 1:
        raise InputError(f"unification needs a tensor with output rows, got shape {w.shape}")
    tile = check_int(tile, "tile", lo=1)  # int(2.5) would tile by 2, int(True) by 1
    if is_concrete(threshold):  # a traced threshold cannot be read without a host sync
        threshold = check_real(threshold, "threshold", lo=0.0)
    rows = w.shape[0]
    m = w.reshape(rows, -1)
    n_tiles = m.shape[1] // tile
    full = n_tiles * tile
    t = m[:, :full].reshape(rows, n_tiles, tile)
    mag = jnp.abs(t)
    mu = jnp.mean(mag, axis=-1)
    ok = jnp.std(mag, axis=-1) <= jnp.asarray(threshold, mu.dtype) * mu
    t = jnp.where(ok[..., None], jnp.sign(t) * mu[..., None], t)
    out = jnp.concatenate([t.reshape(rows, full), m[:, full:]], axis=1)
    return out.reshape(w.shape), ok


def unify_params(
    params: Any,
    tile: int,
    threshold: float | jax.Array,
    *,
    select: Callable[[str, jax.Array], bool] = default_weight_select,
    flax_layout: bool = True,
) -> tuple[Any, dict[str, jax.Array]]:
    """:func:`unify_tiles` on every selected tensor of a pytree (Flax layout converted to NNR rows and
    back unless ``flax_layout=False``). ``select``: a predicate or a list of names; only non-empty float
    tensors are unified. Returns ``(params, {name: unified tile mask})``. jit-able.

    >>> p, masks = unify_params({"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))}}, tile=9, threshold=0.1)
    >>> masks["Conv_0/kernel"].shape
    (4, 2)
    """
    flax_layout = check_flag(flax_layout, "flax_layout")  # "no" would be True
    tile = check_int(tile, "tile", lo=1)
    updates, masks = {}, {}
    named = named_leaves(params)
    for name in select_float_names(named, select):
        v = named[name]
        w = flax_to_nnr(v) if flax_layout else v
        wu, ok = unify_tiles(w, tile, threshold)
        updates[name] = nnr_to_flax(wu) if flax_layout else wu
        masks[name] = ok
    return replace_named(params, updates), masks
