"""The members of one NNR_PT_BLOCK (format digest §2.14): which tensors, named how, in which order.

A block groups a weight with its per-output-row companions. ``compressed_parameter_types`` (cpt) says
which are present: DC (0x01, W as low-rank factors G, H), LS (0x02), BN (0x04: β, γ, mean, var) and
BI (0x08). Two orders matter:

* **topology order** (the NDU's topology element names): ``[W]`` or ``[G, H]``, ``[LS]``,
  ``[β, γ, mean, var]``, ``[BI]``;
* **coded order** (tensors inside the DeepCABAC stream): LS, BI, β, γ, mean, var, then W (or G, H).

``tensor_dimensions`` are always W's NNR dims; LS, BI and BN members have shape ``(dims[0],)``.
With DC, ``decomposition_rank`` = G.shape[1] and ``g_number_of_rows`` = G.shape[0]. NNCodec's decoder
applies LS to G's rows, so LS together with DC requires ``g_number_of_rows == dims[0]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nncjax.arguments import check_int
from nncjax.errors import InputError
from nncjax.reduce._tree import check_float, check_mapping
from nncjax.reduce.bnfold import FoldedBlock, block_names, fold_bn
from nncjax.reduce.lowrank import (
    LowRank,
    check_dims,
    dc_matrix_shape,
    low_rank_recompose,
)

__all__ = ["CPT_DC", "CPT_LS", "CPT_BN", "CPT_BI", "BNVectors", "BlockMembers", "block_members", "block_from_members"]

CPT_DC, CPT_LS, CPT_BN, CPT_BI = 0x01, 0x02, 0x04, 0x08


class BNVectors(NamedTuple):
    """Unfolded batch norm carried in a block (cpt BN): β, γ, mean, var, each (O,), and their names."""

    beta: jax.Array
    gamma: jax.Array
    mean: jax.Array
    var: jax.Array
    names: tuple[str, str, str, str]


class BlockMembers(NamedTuple):
    """Everything a block NDU needs besides quantization settings.

    ``cpt``: compressed_parameter_types; ``dims``: W's NNR dims (tensor_dimensions);
    ``topology``: member names in topology order; ``coded``: ``(name, tensor)`` in coded order;
    ``decomposition_rank`` / ``g_number_of_rows``: DC header fields (None without DC).
    """

    cpt: int
    dims: tuple[int, ...]
    topology: list[str]
    coded: list[tuple[str, jax.Array]]
    decomposition_rank: int | None
    g_number_of_rows: int | None


def _names(weight_name: str, names: Mapping[str, str] | None) -> dict[str, str]:
    """block_names(weight_name) updated by ``names``, whose keys must be block roles and values strings."""
    nm = dict(block_names(weight_name))
    if names is not None:
        bad = [k for k, v in check_mapping(names, "names", "{role: tensor name}").items()
               if k not in nm or not isinstance(v, str)]
        if bad:  # an unknown role was silently ignored
            raise InputError(f"names must map roles {sorted(nm)} to tensor names, got {dict(names)!r}")
        nm.update(names)
    return nm


def _bn_names(names: Any) -> tuple[str, str, str, str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or len(names) != 4 \
            or not all(isinstance(n, str) for n in names):
        raise InputError(f"BN names must be four tensor names (β, γ, mean, var), got {names!r}")
    return tuple(names)


def _row_vector(name: str, v: jax.Array, rows: int) -> jax.Array:
    v = check_float(v, f"block member {name!r}")
    if v.shape != (rows,):
        raise InputError(f"block member {name!r} must have shape ({rows},), got {v.shape}")
    return v


def block_members(
    weight_name: str,
    w: jax.Array | None = None,
    *,
    dims: tuple[int, ...] | None = None,
    lowrank: LowRank | None = None,
    ls: jax.Array | None = None,
    bi: jax.Array | None = None,
    bn: BNVectors | None = None,
    names: Mapping[str, str] | None = None,
) -> BlockMembers:
    """Assemble a block: W (NNR layout) or its DC factors, plus optional LS, BN, BI.

    Give ``w``, or ``lowrank`` with ``dims``. ``names`` overrides the defaults of
    :func:`nncjax.reduce.block_names` (keys ``W``, ``LS``, ``BI``, ``G``, ``H``).

    >>> m = block_members("Conv_0/kernel", jnp.ones((4, 2, 3, 3)), ls=jnp.ones(4), bi=jnp.zeros(4))
    >>> m.cpt, m.topology
    (10, ['Conv_0/kernel', 'Conv_0/kernel_scaling', 'Conv_0/bias'])
    >>> [name for name, _ in m.coded]
    ['Conv_0/kernel_scaling', 'Conv_0/bias', 'Conv_0/kernel']
    """
    nm = _names(weight_name, names)
    if (w is None) == (lowrank is None):
        raise InputError("give exactly one of w and lowrank")
    if w is not None:
        w = check_float(w, "w")  # a block is coded as floats: an integer W would be truncated
        dims = tuple(int(d) for d in w.shape)
        weights = [(nm["W"], w)]
        cpt, rank, grows = 0, None, None
    else:
        if dims is None:
            raise InputError("lowrank needs the weight's dims")
        dims = check_dims(dims)  # not (4, 3.7) as (4, 3)
        if isinstance(lowrank, (str, bytes)) or not isinstance(lowrank, Sequence) or len(lowrank) != 2:
            raise InputError(f"lowrank must be a LowRank (g, h), got {type(lowrank).__name__}")
        g, h = check_float(lowrank[0], "lowrank.g"), check_float(lowrank[1], "lowrank.h")
        rows, cols = dc_matrix_shape(dims, g.shape[0] if g.ndim == 2 else None)
        if g.ndim != 2 or h.ndim != 2 or g.shape[1] != h.shape[0] or h.shape[1] != cols:
            raise InputError(f"G {g.shape} and H {h.shape} do not factor dims {dims}")
        weights = [(nm["G"], g), (nm["H"], h)]
        cpt, rank, grows = CPT_DC, int(g.shape[1]), rows
    if len(dims) < 1 or dims[0] < 1:
        raise InputError(f"a block weight needs at least one output row, dims {dims}")
    rows = dims[0]
    topology = [n for n, _ in weights]
    coded: list[tuple[str, jax.Array]] = []
    if ls is not None:
        if grows is not None and grows != rows:
            # The decoder scales G's rows by LS, which only means "W's output rows" when they coincide.
            raise InputError(f"LS with DC needs g_number_of_rows == dims[0] ({rows}), got {grows}")
        cpt |= CPT_LS
        topology.append(nm["LS"])
        coded.append((nm["LS"], _row_vector(nm["LS"], ls, rows)))
    if bi is not None:
        cpt |= CPT_BI
        coded.append((nm["BI"], _row_vector(nm["BI"], bi, rows)))
    if bn is not None:
        if isinstance(bn, (str, bytes)) or not isinstance(bn, Sequence) or len(bn) != 5:
            raise InputError(f"bn must be BNVectors (beta, gamma, mean, var, names), got {type(bn).__name__}")
        bn_names = _bn_names(bn[4])
        cpt |= CPT_BN
        topology.extend(bn_names)
        coded.extend((n, _row_vector(n, v, rows)) for n, v in zip(bn_names, bn[:4]))
    if bi is not None:
        topology.append(nm["BI"])
    coded.extend(weights)
    seen = [n for n, _ in coded]
    if len(set(seen)) != len(seen):  # two members of one name: the decoder could tell them apart by nothing
        raise InputError(f"block members must have distinct names, got {seen}")
    return BlockMembers(cpt, dims, topology, coded, rank, grows)


def block_from_members(
    weight_name: str,
    cpt: int,
    dims: tuple[int, ...],
    decoded: Mapping[str, jax.Array],
    *,
    eps: float = 1e-5,
    names: Mapping[str, str] | None = None,
    bn_names: tuple[str, str, str, str] | None = None,
) -> FoldedBlock:
    """Decoded block tensors -> :class:`FoldedBlock` (W in NNR layout, LS, BI), ready for
    :func:`nncjax.reduce.unfold_batchnorm`. DC factors are recomposed, a missing LS is 1, a missing
    BI is 0, and a carried (unfolded) BN is folded with ``eps`` (so every block becomes W, LS, BI).

    >>> blk = block_from_members("d/kernel", 0x08, (2, 3), {"d/kernel": jnp.ones((2, 3)), "d/bias": jnp.ones(2)})
    >>> blk.ls.tolist(), blk.bi.tolist()
    ([1.0, 1.0], [1.0, 1.0])
    """
    nm = _names(weight_name, names)
    cpt = check_int(cpt, "compressed_parameter_types", lo=0, hi=0x0F)  # not 8.5, nor True as DC
    dims = check_dims(dims)
    check_mapping(decoded, "decoded", "{tensor name: array}")

    def get(key: str) -> jax.Array:
        if key not in decoded:
            raise InputError(f"decoded block {weight_name!r} lacks member {key!r} (cpt {cpt:#x})")
        return check_float(decoded[key], f"decoded block member {key!r}")

    w = low_rank_recompose(get(nm["G"]), get(nm["H"]), dims) if cpt & CPT_DC else get(nm["W"])
    if tuple(w.shape) != dims:
        raise InputError(f"decoded weight {weight_name!r} has shape {w.shape}, dims say {dims}")
    rows = dims[0]
    ls = _row_vector(nm["LS"], get(nm["LS"]), rows) if cpt & CPT_LS else jnp.ones((rows,), w.dtype)
    bi = _row_vector(nm["BI"], get(nm["BI"]), rows) if cpt & CPT_BI else None
    if cpt & CPT_BN:
        if bn_names is None:
            raise InputError("a block with cpt BN needs bn_names (β, γ, mean, var)")
        beta, gamma, mean, var = (_row_vector(n, get(n), rows) for n in _bn_names(bn_names))
        ls, bi = fold_bn(gamma, beta, mean, var, eps=eps, bias=bi, ls=ls)
    return FoldedBlock(w, ls, jnp.zeros((rows,), w.dtype) if bi is None else bi)
