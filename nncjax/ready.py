"""Ready-to-use weights from decoded NNR tensors: what :func:`nncjax.decode` returns by default.

A block unit (NNR_PT_BLOCK) carries a weight ``W`` in NNR layout (output rows first) together with
per-row members: local scales ``LS`` (cpt 0x02), an unfolded batch norm β, γ, mean, var (0x04) and a
bias ``BI`` (0x08). The coded model computes ``(LS[:, None, ...] * W) ⊛ x + BI`` per block.

* :func:`recompose_low_rank` -- a low-rank unit's (cpt 0x01) factors G, H multiplied back into W.
* :func:`ready_flat` -- the flat view: LS multiplied into W's rows (float32) and dropped; every other
  tensor as coded. A folded batch norm stays folded (W·LS and BI): there is no BN to map it to.
* :func:`map_onto` -- the view of a model (``like``): names map to ``like``'s leaves; a block weight
  named like a Flax kernel (``.../kernel``) goes back to Flax layout
  (:func:`nncjax.reduce.nnr_to_flax`); a folded block whose layer is followed by a BatchNorm in
  ``like`` is written onto that BatchNorm exactly as :meth:`nncjax.pipeline.CodingLayout.to_variables`
  does (:func:`nncjax.reduce.unfold_batchnorm`: BN scale = LS, bias = BI, mean 0, unit variance, the
  kernel unscaled), so the model's own ``apply`` computes the coded model.

Every stream tensor must find its place in ``like`` and every leaf of ``like`` must get a value;
anything else raises :class:`~nncjax.errors.InputError` naming the tensor.

Example:
    >>> import nncjax
    >>> w, s = np.ones((2, 3), np.float32), np.array([2.0, 0.5], np.float32)
    >>> data = nncjax.encode({"d/kernel": w, "d/kernel_scaling": s}, blocks={"d/kernel": {"ls": "d/kernel_scaling"}})
    >>> out = nncjax.decode(data)            # LS applied to W's rows and dropped
    >>> list(out), out["d/kernel"][:, 0].round(3).tolist()
    (['d/kernel'], [2.0, 0.5])
    >>> nncjax.decode(data, like={"d": {"kernel": np.zeros((3, 2), np.float32)}})["d"]["kernel"].shape
    (3, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nncjax.arguments import check_array_kind, check_real, is_int
from nncjax.errors import BitstreamError, InputError
from nncjax.pytree_names import flatten_named, is_kernel_name, unflatten_like
from nncjax.tensor_policy import is_float_like, restore_dtype

__all__ = ["BlockRoles", "block_roles", "cast_leaf", "map_onto", "ready_flat", "recompose_low_rank", "scale_rows"]

_BN_ROLES = ("bn_beta", "bn_gamma", "bn_mean", "bn_var")


@dataclass(frozen=True)
class BlockRoles:
    """Member names of one decoded block unit.

    ``weight``: W's name; ``ls`` / ``bi``: the LS / BI member names or None; ``bn``: the names of an
    unfolded batch norm's β, γ, mean, var (cpt BN), or ``()``.
    """

    weight: str
    ls: str | None = None
    bi: str | None = None
    bn: tuple[str, ...] = ()


def block_roles(names: Sequence[str], roles: Sequence[str]) -> BlockRoles | None:
    """The :class:`BlockRoles` of one unit from its members' names and roles (those of
    :meth:`nncjax.kernels.ndu.CompressedDataUnit.members`); None for a single-tensor unit.

    >>> block_roles(["c/k_scaling", "c/bias", "c/k"], ["ls", "bias", "weight"])
    BlockRoles(weight='c/k', ls='c/k_scaling', bi='c/bias', bn=())
    """
    names, roles = list(names), list(roles)
    if len(names) != len(roles):  # zip would drop members silently
        raise InputError(f"block_roles: {len(names)} names but {len(roles)} roles")
    by_role = dict(zip(roles, names))
    if "weight" not in by_role:
        return None
    bn = tuple(by_role[r] for r in _BN_ROLES if r in by_role)
    return BlockRoles(by_role["weight"], by_role.get("ls"), by_role.get("bias"), bn)


def recompose_low_rank(g: np.ndarray, h: np.ndarray, dims: Sequence[int], where: str = "low-rank unit"
                       ) -> np.ndarray:
    """A low-rank (NNR_CPT_DC) weight: ``(G @ H).reshape(dims)`` with G ``(r, k)``, H ``(k, c)`` and
    ``r * c == prod(dims)``; accumulated in float64, rounded once to float32 (deterministic).

    >>> recompose_low_rank(np.ones((2, 1)), np.full((1, 3), 2.0), (2, 3)).tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    g = np.asarray(check_array_kind(g, "iuf", f"{where}: G must be real"), np.float64)
    h = np.asarray(check_array_kind(h, "iuf", f"{where}: H must be real"), np.float64)
    try:
        ok = not isinstance(dims, (str, bytes)) and all(is_int(d) and int(d) >= 0 for d in dims)
    except TypeError:  # not iterable
        ok = False
    if not ok:  # int() would truncate 2.5 and read "23" as (2, 3)
        raise BitstreamError(f"{where}: tensor_dimensions {dims!r} are not non-negative integers")
    dims = tuple(int(d) for d in dims)
    if g.ndim != 2 or h.ndim != 2 or g.shape[1] != h.shape[0] or g.shape[0] * h.shape[1] != math.prod(dims):
        raise BitstreamError(f"{where}: tensor_dimensions: G {g.shape} and H {h.shape} do not recompose "
                             f"to {dims}")
    out = np.empty((g.shape[0], h.shape[1]), np.float32)
    step = max(1, (1 << 22) // max(h.shape[1], 1))  # row chunks: float64 scratch stays small
    for i in range(0, g.shape[0], step):
        out[i:i + step] = g[i:i + step] @ h
    return out.reshape(dims)


def scale_rows(w: np.ndarray, ls: np.ndarray, *, name: str = "a block weight") -> np.ndarray:
    """``LS[:, None, ...] * W`` in float32: ``w`` (O, ...), ``ls`` (O,) -> (O, ...). A finite product
    beyond float32's range raises InputError (naming the tensor ``name``) rather than becoming inf.

    >>> scale_rows(np.ones((2, 2), np.float32), np.array([3.0, 0.5], np.float32)).tolist()
    [[3.0, 3.0], [0.5, 0.5]]
    """
    w = np.asarray(check_array_kind(w, "iuf", "scale_rows: the weight must be real"), np.float32)
    ls = np.asarray(check_array_kind(ls, "iuf", "scale_rows: the local scales must be real"), np.float32)
    if w.ndim < 1 or ls.shape != w.shape[:1]:
        raise InputError(f"local scales of shape {ls.shape} do not fit a weight of shape {w.shape}")
    with np.errstate(over="ignore"):  # checked: a finite product that became inf
        out = w * ls.reshape((-1,) + (1,) * (w.ndim - 1))
    if not np.all(np.isfinite(out)) and np.all(np.isfinite(w)) and np.all(np.isfinite(ls)):
        raise InputError(f"{name}: its local scales times its decoded values overflow float32 (they would become "
                         "inf); decode with raw=True to get the two as coded")
    return out


def _scaled(coded: Mapping[str, np.ndarray], b: BlockRoles) -> np.ndarray:
    w = coded[b.weight]
    if b.ls is None:
        return w
    if np.ndim(w) < 1:  # a stream can declare a rank-0 block; its LS then has no rows to scale
        raise BitstreamError(f"NNR_NDU {b.weight!r}: tensor_dimensions: a block with local scales needs a "
                             f"weight with rows, got shape {np.shape(w)}")
    return scale_rows(w, coded[b.ls], name=f"tensor {b.weight!r}")


def _check_members(coded: Mapping[str, Any], blocks: Sequence[BlockRoles]) -> None:
    """InputError naming a block member that ``coded`` lacks (it would be a KeyError or be ignored)."""
    for b in blocks:
        for m in (b.weight, b.ls, b.bi, *b.bn):
            if m is not None and m not in coded:
                raise InputError(f"block {b.weight!r}: its member {m!r} is not among the decoded tensors")


def ready_flat(coded: Mapping[str, np.ndarray], blocks: Sequence[BlockRoles]) -> dict[str, np.ndarray]:
    """Flat ready weights: every block weight with LS becomes ``LS[:, None, ...] * W`` (float32) and its
    LS tensor is dropped; everything else as coded, in the order of ``coded``.

    >>> b = BlockRoles("w", ls="s")
    >>> ready_flat({"s": np.float32([2, 3]), "w": np.ones((2, 1), np.float32)}, [b])["w"].ravel().tolist()
    [2.0, 3.0]
    """
    _check_members(coded, blocks)
    ls_names = {b.ls for b in blocks if b.ls is not None}
    by_weight = {b.weight: b for b in blocks}
    return {name: (_scaled(coded, by_weight[name]) if name in by_weight else arr)
            for name, arr in coded.items() if name not in ls_names}


# ------------------------------------------------------------------------------------------------
# onto a model


def _fit(name: str, arr: np.ndarray, ref: Any, *, nnr_layout: bool) -> np.ndarray:
    """``arr`` in the shape of ``like``'s leaf ``ref``: as coded (a 1-element vector also fits a 0-d
    leaf), except a block weight (``nnr_layout``: rows first) named like a Flax kernel (``.../kernel``,
    ndim >= 2), which is transposed back to Flax layout. Shapes are never guessed from: a square
    kernel would fit either way."""
    from nncjax.reduce.layout import nnr_to_flax_perm

    shape = tuple(np.shape(ref))
    arr = np.asarray(arr)
    perm = nnr_to_flax_perm(arr.ndim) if nnr_layout and arr.ndim >= 2 and is_kernel_name(name) else None
    if perm is not None and tuple(arr.shape[i] for i in perm) == shape:
        return np.transpose(arr, perm)
    if arr.shape == shape and perm is None:
        return arr
    if shape == () and arr.shape == (1,):
        return arr.reshape(())
    raise InputError(f"tensor {name!r}: decoded shape {arr.shape}" + (" (NNR layout)" if perm is not None else "")
                     + f" does not fit `like`'s {shape}")


def cast_leaf(name: str, arr: Any, ref: Any) -> Any:
    """``arr`` with the dtype, shape (0-d from ``(1,)``) and array type (numpy / jax) of ``like``'s leaf
    ``ref``, and a jax leaf's sharding (or a ``jax.ShapeDtypeStruct``'s, if it has one): a model sharded
    over devices comes back sharded the same way. Lossy integer narrowing raises
    (:func:`nncjax.tensor_policy.restore_dtype`), and so do another shape (InputError: a same-size reshape
    would scramble the values, e.g. of a kernel coded rows first) and a dtype that is not bool, integer
    or float.

    >>> cast_leaf("b", np.array([1.0, 2.0], np.float32), np.zeros(2, np.int8))
    array([1, 2], dtype=int8)
    >>> import jax.numpy as jnp
    >>> cast_leaf("s", np.array([0.5], np.float32), jnp.float32(0))        # (1,) -> 0-d jax array
    Array(0.5, dtype=float32)
    """
    ref_arr, dt = _like_leaf(name, ref)
    arr = check_array_kind(arr, "biuf", f"tensor {name!r}: decoded values must be bool, integer or float")
    out = restore_dtype(name, _fit(name, arr, ref_arr, nnr_layout=False), dt)
    if type(ref).__module__.startswith(("jax", "jaxlib")):
        import jax
        sharding = getattr(ref, "sharding", None)
        # straight onto the like's devices: a large model need not fit on the default one
        return jax.numpy.asarray(out) if sharding is None else jax.device_put(out, sharding)
    return out


def _like_leaf(name: str, ref: Any) -> tuple[Any, np.dtype]:
    """``like``'s leaf as an array and its dtype, which must be bool, integer or float."""
    ref_arr = ref if hasattr(ref, "dtype") else np.asarray(ref)
    dt = np.dtype(ref_arr.dtype)
    if not (dt == np.bool_ or np.issubdtype(dt, np.integer) or is_float_like(dt)):
        raise InputError(f"tensor {name!r}: `like`'s leaf has dtype {dt}; decoded tensors take bool, integer "
                         "or float dtypes only")
    return ref_arr, dt


def _bn_modules(stats: Mapping[str, Any], prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Module paths of ``batch_stats`` holding ``mean`` and ``var``, depth first in key order."""
    out = []
    if "mean" in stats and "var" in stats and not isinstance(stats["mean"], Mapping):
        out.append(prefix)
    for k, v in stats.items():
        if isinstance(v, Mapping):
            out += _bn_modules(v, prefix + (str(k),))
    return out


def _path(p: Sequence[str]) -> str:
    return "/".join(str(k) for k in p)


_BN_PAIRS = "bn_pairs must be 'auto', None or [(layer_path, bn_path), ...]"  # what decode(like=) takes


def _fold_pairs(like: Any, coded: Mapping[str, np.ndarray], blocks: Sequence[BlockRoles], bn_pairs) -> list:
    """The (BNPair, BlockRoles) whose folded block is written onto the pair's BatchNorm.

    A block is folded onto a BatchNorm when its layer's kernel is ``params/<layer>/kernel``, it
    carries no BN members, and none of the BatchNorm's tensors is in the stream. ``"auto"``: Flax's
    ``Conv_i``/``BatchNorm_i`` pairs (:func:`nncjax.reduce.find_bn_pairs`, indices without a partner
    left out), then every other such BatchNorm with the one folded block (LS/BI) of its row count;
    ambiguity raises.
    """
    from nncjax.reduce.bnfold import BNPair, as_bn_pairs, find_bn_pairs

    if bn_pairs is None:
        return []
    auto = isinstance(bn_pairs, str)
    if auto and bn_pairs != "auto":
        raise InputError(f"{_BN_PAIRS}, got {bn_pairs!r}")
    is_vars = (isinstance(like, Mapping) and isinstance(like.get("params"), Mapping)
               and isinstance(like.get("batch_stats"), Mapping))
    if not is_vars:
        if auto:
            return []
        raise InputError("bn_pairs needs `like` to be a Flax variable dict with 'params' and 'batch_stats'")
    params, stats = like["params"], like["batch_stats"]
    foldable = {b.weight[len("params/"):-len("/kernel")]: b for b in blocks
                if not b.bn and b.weight.startswith("params/") and b.weight.endswith("/kernel")
                and np.ndim(coded[b.weight]) >= 1}
    in_stream = {n.split("/", 1)[1].rsplit("/", 1)[0] for n in coded
                 if n.startswith(("params/", "batch_stats/")) and n.count("/") >= 2}
    if not foldable and auto:
        return []
    free = [m for m in _bn_modules(stats) if _path(m) not in in_stream and np.ndim(_resolve(stats, m)["mean"]) == 1]
    rows = {_path(m): int(np.shape(_resolve(stats, m)["mean"])[0]) for m in free}

    if auto:
        # the indices both names have, as optimize_ioq's "auto" pairs them; the rest by row counts
        named = find_bn_pairs(params, strict=False)
        pairs = [p for p in named if _path(p.layer) in foldable and _path(p.bn) in rows]
        taken_l = {_path(p.layer) for p in pairs}
        taken_b = {_path(p.bn) for p in pairs}
        left_b = [m for m in free if _path(m) not in taken_b]
        left_l = [lay for lay, b in foldable.items() if lay not in taken_l and b.bi is not None]
        for m in left_b:
            n = rows[_path(m)]
            hits = [lay for lay in left_l if np.shape(coded[foldable[lay].weight])[0] == n]
            rivals = [o for o in left_b if rows[_path(o)] == n]
            if len(hits) == 1 and len(rivals) == 1:
                pairs.append(BNPair(tuple(hits[0].split("/")), m))
            elif hits:
                raise InputError(f"cannot tell which of the folded layers {hits} BatchNorm {_path(m)!r} "
                                 f"({n} rows) belongs to; pass bn_pairs=[(layer_path, bn_path), ...]")
    else:
        pairs = as_bn_pairs(bn_pairs, _BN_PAIRS)
        for what, paths in (("layer", [_path(p.layer) for p in pairs]), ("BatchNorm", [_path(p.bn) for p in pairs])):
            twice = sorted({x for x in paths if paths.count(x) > 1})
            if twice:
                raise InputError(f"bn_pairs names the {what} {twice} more than once")
        for p in pairs:
            if _path(p.layer) not in foldable:
                raise InputError(f"bn_pairs: the bitstream has no folded block for 'params/{_path(p.layer)}/kernel'")
            if _path(p.bn) not in rows:
                raise InputError(f"bn_pairs: {_path(p.bn)!r} is no BatchNorm of `like` absent from the bitstream")
    out = []
    for p in pairs:
        b = foldable[_path(p.layer)]
        n = int(np.shape(coded[b.weight])[0])
        if rows[_path(p.bn)] != n:
            raise InputError(f"block {b.weight!r} has {n} rows but BatchNorm {_path(p.bn)!r} has {rows[_path(p.bn)]}")
        out.append((p, b))
    return out


def _resolve(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def map_onto(like: Any, coded: Mapping[str, np.ndarray], blocks: Sequence[BlockRoles], *,
             bn_pairs: Sequence | str | None = "auto", eps: float = 1e-5) -> Any:
    """Decoded tensors ``coded`` (``{name: array}``, block members under their names) as a pytree
    shaped like ``like``, ready to use (module docstring): leaves get ``like``'s shapes, dtypes and
    array types.

    Args:
      like: the model's pytree; a Flax variable dict ``{"params", "batch_stats", ...}`` for folded
        batch norms. Names are key paths joined by "/" (:func:`nncjax.pytree_names.flatten_named`).
      coded: the decoded tensors by name. blocks: the stream's block units.
      bn_pairs: ``"auto"``, None (no folded BatchNorm) or ``[(layer_path, bn_path), ...]`` module
        paths inside ``params`` (as :class:`nncjax.pipeline.CodingLayout`): tuples of module names or
        ``"/"``-joined strings (``("block", "conv")`` or ``"block/conv"``).
      eps: the model's BatchNorm epsilon, a real number >= 0 (the unit variance is exact for it).

    Raises:
      InputError naming the tensor if a stream tensor has no place in ``like``, a leaf of ``like``
      gets no value, or shapes do not fit.

    Example:
      >>> map_onto({"b": np.zeros(2)}, {"b": np.float32([1, 2])}, [])["b"].tolist()
      [1.0, 2.0]
    """
    from nncjax.reduce.bnfold import FoldedBlock, unfold_batchnorm

    eps = check_real(eps, "eps", lo=0.0)
    _check_members(coded, blocks)
    like_named = flatten_named(like)
    pairs = _fold_pairs(like, coded, blocks, bn_pairs)
    by_weight = {b.weight: b for b in blocks}
    ls_of = {b.ls: b.weight for b in blocks if b.ls is not None}
    consumed: set[str] = set()
    by_unfold: set[str] = set()
    folded: dict[str, FoldedBlock] = {}
    for p, b in pairs:
        w = np.asarray(coded[b.weight], np.float32)
        n = w.shape[0]
        ls = np.ones(n, np.float32) if b.ls is None else np.asarray(coded[b.ls], np.float32)
        bi = np.zeros(n, np.float32) if b.bi is None else np.asarray(coded[b.bi], np.float32)
        folded[_path(p.layer) + "/kernel"] = FoldedBlock(w, ls, bi)
        consumed |= {x for x in (b.weight, b.ls, b.bi) if x is not None}
        layer, bn = "params/" + _path(p.layer), _path(p.bn)
        by_unfold |= {x for x in (layer + "/kernel", layer + "/bias", f"params/{bn}/scale", f"params/{bn}/bias",
                                  f"batch_stats/{bn}/mean", f"batch_stats/{bn}/var") if x in like_named}
    values: dict[str, Any] = {}
    for name, arr in coded.items():
        if name in consumed or name in ls_of:
            continue
        if name in by_unfold:
            raise InputError(f"tensor {name!r} is in the bitstream but also set by unfolding a folded batch norm")
        if name not in like_named:
            raise InputError(f"the bitstream's tensor {name!r} has no place in `like`")
        blk = by_weight.get(name)
        _like_leaf(name, like_named[name])  # before _fit: a str leaf is no shape mismatch
        x = _scaled(coded, blk) if blk is not None else arr
        values[name] = cast_leaf(name, _fit(name, x, like_named[name], nnr_layout=blk is not None), like_named[name])
    missing = [n for n in like_named if n not in values and n not in by_unfold]
    if missing:
        hint = [f"{n!r} (its local scales are applied to {ls_of[n]!r}; pass raw=True to get them as coded)"
                if n in ls_of else repr(n) for n in missing[:5]]
        raise InputError(f"`like` has leaves the bitstream does not carry: {', '.join(hint)}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if folded:
        from nncjax.reduce._tree import named_leaves, replace_named
        rest = {k[len("params/"):]: v for k, v in values.items() if k.startswith("params/")}
        variables = unfold_batchnorm(like, folded, [p for p, _ in pairs], eps=eps, rest=rest)
        variables = replace_named(variables, {k: v for k, v in values.items() if not k.startswith("params/")})
        values = named_leaves(variables)
    return unflatten_like(like, values, cast_leaf)
