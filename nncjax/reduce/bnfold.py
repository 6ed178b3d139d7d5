"""Batch-norm folding into NNR block members (LS, BI) and the exact inverse onto a Flax model.

NNR carries a convolution/dense layer followed by batch norm as one block (§2.14, §10 of the format
digest). Folding replaces the four BN vectors by two per-output-row vectors:

    g  = γ / sqrt(var + ε)            # (O,)
    LS = LS₀ · g                      # local scale; LS₀ = 1, or the LSA scales
    BI = (b − mean) · g + β           # bias; b = the layer's own bias, or 0

and the block then computes ``y = (W · LS[:, None]) ⊛ x + BI``. ε must be the epsilon the model's BN
uses at inference (Flax and PyTorch default 1e-5, Keras 1e-3; NNCodec assumes 1e-5 / 1e-3 by framework).

**Mapping back** (:func:`unfold_bn`, :func:`unfold_batchnorm`). A decoder that only has W, LS and BI
must give the model back a parameter set of its *own* structure (Conv + BatchNorm) that computes the
same function. Flax's inference BN is ``(x − mean) · (rsqrt(var + ε) · scale) + bias``; we set

    kernel = W (Flax layout),  conv bias = 0,  scale = LS,  bias = BI,  mean = 0,  var = v(ε)

where ``v(ε)`` is the float closest to ``1 − ε`` with ``v + ε == 1`` exactly in the parameter dtype, so
``rsqrt(var + ε) == 1`` and the BN multiplies by exactly LS. (Setting var = 1 and γ = 1, as NNCodec's
``reconstruct_bnf`` does, leaves a spurious factor 1/sqrt(1 + ε) per layer.) If the BN has no
``scale`` or no ``bias`` (``use_scale``/``use_bias=False``), or ``ls_into="kernel"``, LS is multiplied
into the kernel's output rows instead and the BN scale (if any) is 1; without a BN bias, BI goes
into the layer's own bias.

Pytrees: ``variables`` is a Flax variable dict ``{"params": ..., "batch_stats": ...}``; a
:class:`BNPair` names the layer module path (holding ``kernel`` and optionally ``bias``) and the
BatchNorm module path (``scale``/``bias`` in params, ``mean``/``var`` in batch_stats).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.arguments import check_flag, check_real, is_concrete
from nncjax.errors import InputError
from nncjax.reduce._tree import (
    check_float,
    check_in_range,
    check_mapping,
    named_leaves,
    path_name,
    replace_named,
    resolve,
)
from nncjax.reduce.layout import flax_to_nnr, nnr_to_flax

__all__ = [
    "BNPair",
    "FoldedBlock",
    "FoldedModel",
    "bn_gain",
    "fold_bn",
    "unit_variance",
    "unfold_bn",
    "find_bn_pairs",
    "fold_batchnorm",
    "unfold_batchnorm",
    "block_names",
    "block_weight",
]

Path = tuple[str, ...]


class BNPair(NamedTuple):
    """A layer and the BatchNorm applied to its output: module paths, e.g. ``(("Conv_0",), ("BatchNorm_0",))``."""

    layer: Path
    bn: Path


class FoldedBlock(NamedTuple):
    """One NNR block after folding. ``w``: (O, ...) in NNR layout (unscaled); ``ls``, ``bi``: (O,)."""

    w: jax.Array
    ls: jax.Array
    bi: jax.Array


class FoldedModel(NamedTuple):
    """Result of :func:`fold_batchnorm`.

    ``blocks``: weight name (``"Conv_0/kernel"``) -> :class:`FoldedBlock`, in pair order.
    ``rest``: every other ``params`` leaf by name (Flax layout, untouched), in ``jax.tree`` flatten
    order (sorted keys); the BN parameters and the folded layers' biases are absent (they live in BI).
    Names are those :func:`nncjax.pytree_names.flatten_named` gives; take the coding order from it.
    """

    blocks: dict[str, FoldedBlock]
    rest: dict[str, jax.Array]


def block_names(weight_name: str) -> dict[str, str]:
    """Tensor names of a folded block's members, for the NNR topology list.

    LS follows NNCodec's ``<weight>_scaling``; BI is the layer's ``bias`` leaf; G/H (low rank) are
    ``<weight>_G`` / ``<weight>_H``.

    >>> block_names("Conv_0/kernel")["LS"]
    'Conv_0/kernel_scaling'
    """
    if not isinstance(weight_name, str) or not weight_name:
        raise InputError(f"weight_name must be a non-empty string, got {weight_name!r}")
    layer = weight_name.rsplit("/", 1)[0] if "/" in weight_name else ""
    return {
        "W": weight_name,
        "LS": weight_name + "_scaling",
        "BI": (layer + "/bias") if layer else "bias",
        "G": weight_name + "_G",
        "H": weight_name + "_H",
    }


def bn_gain(gamma: jax.Array, var: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Per-row BN gain ``g = γ / sqrt(var + ε)``. ``gamma``, ``var``: (O,) -> (O,).

    >>> bn_gain(jnp.array([2.0, 1.0]), jnp.array([3.0, 0.0]), eps=1.0).tolist()
    [1.0, 1.0]
    """
    gamma, var = _row_vectors(gamma=gamma, var=var)
    return gamma * jax.lax.rsqrt(_var_plus_eps(var, _check_eps(eps)))


def _check_eps(eps: Any) -> Any:
    """A concrete ``eps`` as a float >= 0 (a negative or NaN epsilon gives NaN gains, a string was parsed
    by NumPy); a traced one is left alone."""
    return check_real(eps, "eps", lo=0.0) if is_concrete(eps) else eps


def _row_vectors(rows: int | None = None, **vectors: Any) -> list[jax.Array]:
    """The given per-row vectors as float arrays, checked to be (O,) with one O (``rows`` if given):
    InputError naming the one that is not (broadcasting would silently give 2-D or repeated LS / BI).
    None stays None."""
    out = []
    for what, v in vectors.items():
        if v is None:
            out.append(None)
            continue
        a = check_float(v, what)  # an integer var would add eps as int(eps) == 0
        if a.ndim != 1 or (rows is not None and a.shape[0] != rows):
            raise InputError(f"{what} must be a vector of {'one entry per output row' if rows is None else rows} "
                             f"(shape (O,)), got shape {a.shape}")
        rows = a.shape[0]
        out.append(a)
    return out


def _var_plus_eps(var: jax.Array, eps: float) -> jax.Array:
    """``var + eps`` in ``var``'s dtype, exactly as :func:`bn_gain` takes its square root. Any shape."""
    return jnp.asarray(var) + jnp.asarray(eps, jnp.result_type(var))


def _check_variance(bn: Path, var: jax.Array, eps: float) -> None:
    """InputError naming the BN if ``var + eps <= 0`` anywhere; skipped for traced ``var`` (no host sync)."""
    if not is_concrete(var):
        return
    vpe = np.asarray(_var_plus_eps(var, eps))
    if not np.all(np.isfinite(vpe)):  # NaN passes the "<= 0" test below and gives NaN LS and BI
        raise InputError(f"BN {path_name(bn)!r}: running variance is NaN or Inf in {int((~np.isfinite(vpe)).sum())} "
                         f"of {vpe.size} channels")
    bad = vpe <= 0
    if bad.any():
        raise InputError(f"BN {path_name(bn)!r}: running variance + eps <= 0 in {int(bad.sum())} of {bad.size} "
                         f"channels (min variance {float(np.min(np.asarray(var, np.float64))):.6g}, eps {eps}); "
                         "its gain 1 / sqrt(var + eps) is undefined")


def fold_bn(
    gamma: jax.Array,
    beta: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    eps: float = 1e-5,
    bias: jax.Array | None = None,
    ls: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fold one BN into NNR ``(LS, BI)``. All inputs (O,); ``bias``/``ls`` default to 0/1.

    >>> ls, bi = fold_bn(jnp.array([2.0]), jnp.array([1.0]), jnp.array([3.0]), jnp.array([3.0]), eps=1.0)
    >>> ls.tolist(), bi.tolist()
    ([1.0], [-2.0])
    """
    gamma, beta, mean, var, bias, ls = _row_vectors(gamma=gamma, beta=beta, mean=mean, var=var, bias=bias, ls=ls)
    g = bn_gain(gamma, var, eps)
    ls_out = g if ls is None else ls * g
    b = jnp.zeros_like(g) if bias is None else bias
    return ls_out, (b - mean) * g + beta


def unit_variance(eps: float, dtype: Any = jnp.float32) -> np.ndarray:
    """A variance ``v`` (scalar of ``dtype``) with ``v + eps == 1`` exactly in ``dtype``, closest to 1 − ε.

    >>> float(unit_variance(1e-5) + np.float32(1e-5))
    1.0
    """
    eps = check_real(eps, "eps", lo=0.0)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise InputError(f"dtype must be a float dtype, got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):  # an integer "variance" would take eps as int(eps) == 0
        raise InputError(f"dtype must be a float dtype, got {dt}")
    one, e = dt.type(1), dt.type(eps)
    v = dt.type(one - e)
    # At most a few ulps away; walk towards the side that fixes the sum.
    for _ in range(8):
        s = dt.type(v + e)
        if s == one:
            return np.asarray(v, dt)
        v = np.nextafter(v, dt.type(-np.inf) if s > one else dt.type(np.inf))
    raise InputError(f"no variance v with v + {eps} == 1 exactly in {dt}")


def unfold_bn(
    ls: jax.Array, bi: jax.Array, *, eps: float = 1e-5
) -> dict[str, jax.Array]:
    """BN parameters that multiply by exactly ``ls`` and add ``bi`` at inference. (O,), (O,) -> dict of (O,).

    Returns ``{"scale": ls, "bias": bi, "mean": 0, "var": unit_variance(eps)}``.

    >>> unfold_bn(jnp.ones(2), jnp.zeros(2))["mean"].tolist()
    [0.0, 0.0]
    """
    ls, bi = _row_vectors(ls=ls, bi=bi)
    v = unit_variance(eps, ls.dtype)
    return {"scale": ls, "bias": bi, "mean": jnp.zeros_like(ls), "var": jnp.full_like(ls, v)}


def block_weight(block: FoldedBlock) -> jax.Array:
    """The effective NNR weight ``W · LS[:, None, ...]`` (what ``reconstruct_lsa`` gives). (O, ...) -> (O, ...).

    >>> block_weight(FoldedBlock(w=jnp.ones((2, 3)), ls=jnp.array([2.0, 0.5]), bi=jnp.zeros(2))).tolist()
    [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]]
    """
    blk = _as_block(block, "block")
    return blk.w * blk.ls.reshape((-1,) + (1,) * (blk.w.ndim - 1))


def _as_block(block: Any, what: str) -> FoldedBlock:
    """``block`` (a FoldedBlock or any ``(w, ls, bi)`` triple) as a FoldedBlock of arrays, checked: ``w``
    has output rows and ``ls`` / ``bi`` are real vectors of one entry per row; InputError otherwise."""
    if not isinstance(block, Sequence) or isinstance(block, (str, bytes)) or len(block) != 3:
        raise InputError(f"{what} must be a FoldedBlock (w, ls, bi), got {type(block).__name__}")
    w = check_float(block[0], f"{what}.w")
    if w.ndim < 1:
        raise InputError(f"{what}.w must have output rows, got shape {w.shape}")
    ls, bi = _row_vectors(w.shape[0], **{f"{what}.ls": block[1], f"{what}.bi": block[2]})
    return FoldedBlock(w, ls, bi)


_NUMBERED = re.compile(r"^(Conv|BatchNorm)_(\d+)$")


def find_bn_pairs(params: Mapping[str, Any], *, strict: bool = True) -> list[BNPair]:
    """Pairs ``Conv_i`` with ``BatchNorm_i`` (Flax's automatic names) at every level of ``params``.

    The convention assumes every ``BatchNorm_i`` normalises the output of ``Conv_i`` of the same parent
    module. If a module has ``BatchNorm_i`` children but not the same indices of ``Conv_j`` children,
    the pairing is ambiguous and :class:`InputError` asks for explicit pairs; ``strict=False`` pairs
    the indices both have instead and leaves the others alone (a last convolution without a batch
    norm is common), for callers that check each pair against the model. Order: depth first, in the
    mapping's key order, then by index.

    >>> find_bn_pairs({"Conv_0": {"kernel": 0}, "BatchNorm_0": {"scale": 0, "bias": 0}})
    [BNPair(layer=('Conv_0',), bn=('BatchNorm_0',))]
    >>> find_bn_pairs({"Conv_0": {"kernel": 0}, "Conv_1": {"kernel": 0}, "BatchNorm_0": {"scale": 0}}, strict=False)
    [BNPair(layer=('Conv_0',), bn=('BatchNorm_0',))]
    """
    strict = check_flag(strict, "strict")
    if not isinstance(params, Mapping):
        raise InputError(f"params must be a mapping of Flax module names, got {type(params).__name__}")
    pairs: list[BNPair] = []

    def walk(node: Mapping[str, Any], prefix: Path) -> None:
        convs: dict[int, str] = {}
        bns: dict[int, str] = {}
        for key in node:
            m = _NUMBERED.match(str(key))
            if m:
                (convs if m.group(1) == "Conv" else bns)[int(m.group(2))] = key
        if bns:
            if strict and sorted(bns) != sorted(convs):
                raise InputError(
                    f"cannot pair BatchNorm with Conv layers under {path_name(prefix) or '<root>'!r}: "
                    f"Conv indices {sorted(convs)}, BatchNorm indices {sorted(bns)}; pass pairs explicitly"
                )
            pairs.extend(BNPair(prefix + (convs[i],), prefix + (bns[i],)) for i in sorted(bns) if i in convs)
        for key, child in node.items():
            if isinstance(child, Mapping) and not _NUMBERED.match(str(key)):
                walk(child, prefix + (key,))

    walk(params, ())
    return pairs


def _check_pairs(variables: Mapping[str, Any], pairs: Sequence[BNPair] | None) -> list[BNPair]:
    if not isinstance(variables, Mapping) or "params" not in variables or "batch_stats" not in variables:
        raise InputError("variables must hold 'params' and 'batch_stats' (a Flax variable dict)")
    pairs = find_bn_pairs(variables["params"]) if pairs is None else as_bn_pairs(pairs)
    for p in pairs:
        layer = resolve(variables["params"], p.layer)
        if not isinstance(layer, Mapping) or "kernel" not in layer:
            raise InputError(f"layer {path_name(p.layer)!r} has no 'kernel'")
        stats = resolve(variables["batch_stats"], p.bn)
        if not isinstance(stats, Mapping) or "mean" not in stats or "var" not in stats:
            raise InputError(f"batch_stats of {path_name(p.bn)!r} lack 'mean'/'var'")
    return pairs


def as_bn_pairs(pairs: Any, expected: str = "pairs must be a list of (layer path, BN path) pairs") -> list[BNPair]:
    """Explicit ``[(layer path, BN path), ...]`` as BNPairs of tuple paths; a path may be a slash-joined
    string (``tuple("Conv_0")`` would be its letters). InputError ``"{expected}, got ..."`` for a string
    or anything not iterable, and naming the pair or path that is not one.

    >>> as_bn_pairs([("block/conv", ("block", "bn"))])
    [BNPair(layer=('block', 'conv'), bn=('block', 'bn'))]
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise InputError(f"{expected}, got {pairs!r}")
    return [_bn_pair(p) for p in pairs]


def _bn_pair(p: Any) -> BNPair:
    if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2:
        raise InputError(f"a pair must be (layer path, BN path), got {p!r}")
    paths = []
    for path in p:
        path = tuple(path.split("/")) if isinstance(path, str) else path
        if not isinstance(path, Sequence) or not path or not all(isinstance(k, str) for k in path):
            raise InputError(f"a module path must be a string or a tuple of strings, got {path!r} in {p!r}")
        paths.append(tuple(path))
    return BNPair(*paths)


def fold_batchnorm(
    variables: Mapping[str, Any],
    pairs: Sequence[BNPair] | None = None,
    *,
    eps: float = 1e-5,
    local_scales: Mapping[str, jax.Array] | None = None,
) -> FoldedModel:
    """Fold every (layer, BN) pair of a Flax model into NNR blocks. Pure and jit-able (pairs, eps static).

    ``local_scales``: optional LSA scales by weight name (``"Conv_0/kernel"`` -> (O,)), merged into LS;
    InputError for a name that is no folded layer's weight or a scale of the wrong shape.

    InputError naming the BN if its running variance + ``eps`` is <= 0 in some channel. That check
    needs concrete values: under ``jit`` such a channel silently gets NaN (or inf) LS and BI.

    >>> variables = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))},           # no conv bias
    ...                         "BatchNorm_0": {"scale": jnp.full(4, 2.0), "bias": jnp.ones(4)}},
    ...              "batch_stats": {"BatchNorm_0": {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 4.0)}}}
    >>> folded = fold_batchnorm(variables, eps=1e-5)
    >>> blk = folded.blocks["Conv_0/kernel"]  # blk.w: (O, I, kh, kw), blk.ls / blk.bi: (O,)
    >>> blk.w.shape, np.round(blk.ls, 4).tolist(), np.round(blk.bi, 4).tolist()   # LS = 2 / 2, BI = -0.5 LS + 1
    ((4, 2, 3, 3), [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5])
    >>> folded.rest                                                  # every params leaf went into the block
    {}
    """
    eps = _check_eps(eps)
    pairs = _check_pairs(variables, pairs)
    if local_scales is not None:
        check_mapping(local_scales, "local_scales", "{weight name: (O,) scales}")
    params = variables["params"]
    stats = variables["batch_stats"]
    blocks: dict[str, FoldedBlock] = {}
    consumed: set[str] = set()
    for p in pairs:
        layer = resolve(params, p.layer)
        bn = resolve(params, p.bn) if _has(params, p.bn) else {}
        st = resolve(stats, p.bn)
        # an integer kernel would come back integer beside float LS / BI, scaled and truncated on unfolding
        w = flax_to_nnr(check_float(layer["kernel"], f"kernel of layer {path_name(p.layer)!r}"))
        if w.ndim < 1:
            raise InputError(f"layer {path_name(p.layer)!r}: a kernel of shape {w.shape} has no output rows")
        rows = w.shape[0]
        if jnp.shape(st["mean"]) != (rows,):
            raise InputError(f"BN {path_name(p.bn)!r} has {st['mean'].shape} stats for {rows} output rows")
        wname = path_name(p.layer + ("kernel",))
        gamma = bn.get("scale", jnp.ones((rows,), w.dtype))
        beta = bn.get("bias", jnp.zeros((rows,), w.dtype))
        ls0 = None if local_scales is None else local_scales.get(wname)
        if ls0 is not None and jnp.shape(ls0) != (rows,):
            raise InputError(f"local_scales[{wname!r}] has shape {jnp.shape(ls0)}, the layer {rows} output rows")
        try:  # shapes and dtypes of every vector, named with the BN they belong to
            gamma, beta, mean, var, bias = _row_vectors(rows, scale=gamma, bias=beta, mean=st["mean"], var=st["var"],
                                                        layer_bias=layer.get("bias"))
        except InputError as e:
            raise InputError(f"BN {path_name(p.bn)!r} of layer {path_name(p.layer)!r} ({rows} output rows): {e}") \
                from None
        _check_variance(p.bn, var, eps)
        ls, bi = fold_bn(gamma, beta, mean, var, eps=eps, bias=bias, ls=ls0)
        blocks[wname] = FoldedBlock(w, ls, bi)
        consumed.update(path_name(p.layer + (k,)) for k in ("kernel", "bias"))
        consumed.update(path_name(p.bn + (k,)) for k in bn)
    unknown = set(local_scales or ()) - set(blocks)
    if unknown:
        raise InputError(f"local_scales names no folded layer's weight: {sorted(unknown)} (folded: {sorted(blocks)})")
    rest = {k: v for k, v in named_leaves(params).items() if k not in consumed}
    return FoldedModel(blocks, rest)


def _has(tree: Mapping[str, Any], path: Path) -> bool:
    try:
        resolve(tree, path)
    except InputError:
        return False
    return True


def _set(tree: Any, path: Path, key: str, value: Any) -> Any:
    """Copy of a nested dict with ``tree[path...][key] = value`` (copies only along the path)."""
    if not path:
        out = dict(tree)
        out[key] = value
        return out
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], key, value)
    return out


def unfold_batchnorm(
    variables: Mapping[str, Any],
    blocks: Mapping[str, FoldedBlock],
    pairs: Sequence[BNPair] | None = None,
    *,
    eps: float = 1e-5,
    rest: Mapping[str, jax.Array] | None = None,
    ls_into: str = "bn",
) -> dict[str, Any]:
    """Write decoded blocks back into a Flax variable dict of the model's own structure.

    ``variables`` is the template (any values of the right structure, e.g. ``model.init`` output);
    ``blocks`` maps weight names to decoded :class:`FoldedBlock` (NNR layout); ``rest`` optionally
    replaces other params leaves by name. ``eps`` must be the model BN's epsilon. ``ls_into``: ``"bn"``
    (LS -> BN scale; falls back to the kernel when the BN lacks a scale or a bias) or ``"kernel"``.
    The returned network computes ``(W · LS) ⊛ x + BI`` for every block (see module docstring).
    Pure and jit-able.

    >>> import flax.linen as nn
    >>> class ConvBN(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))
    >>> model_vars = {"params": {"Conv_0": {"kernel": jnp.linspace(-1, 1, 72).reshape(3, 3, 2, 4), "bias": jnp.ones(4)},
    ...                          "BatchNorm_0": {"scale": jnp.full(4, 2.0), "bias": jnp.ones(4)}},
    ...               "batch_stats": {"BatchNorm_0": {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 4.0)}}}
    >>> folded = fold_batchnorm(model_vars, eps=1e-5)
    >>> new_vars = unfold_batchnorm(model_vars, folded.blocks, eps=1e-5, rest=folded.rest)
    >>> x = jnp.linspace(0, 1, 50).reshape(1, 5, 5, 2)
    >>> bool(jnp.allclose(ConvBN().apply(new_vars, x), ConvBN().apply(model_vars, x), atol=1e-5))   # same function
    True
    >>> new_vars["batch_stats"]["BatchNorm_0"]["mean"].tolist(), new_vars["params"]["Conv_0"]["bias"].tolist()
    ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    """
    if ls_into not in ("bn", "kernel"):
        raise InputError(f"ls_into must be 'bn' or 'kernel', got {ls_into!r}")
    eps = _check_eps(eps)
    pairs = _check_pairs(variables, pairs)
    check_mapping(blocks, "blocks", "{weight name: FoldedBlock}")
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    by_name = {path_name(p.layer + ("kernel",)): p for p in pairs}
    unknown = set(blocks) - set(by_name)
    if unknown:
        raise InputError(f"blocks without a (layer, BN) pair: {sorted(unknown)}")
    if rest:
        template = named_leaves(params)
        for k, v in check_mapping(rest, "rest", "{name: tensor}").items():
            if k in template and jnp.shape(v) != jnp.shape(template[k]):  # replace_named would take any shape
                raise InputError(f"rest[{k!r}] has shape {jnp.shape(v)}, the model's tensor {jnp.shape(template[k])}")
        params = replace_named(params, rest)
    for wname, blk in blocks.items():
        p = by_name[wname]
        blk = _as_block(blk, f"block {wname!r}")
        layer = resolve(params, p.layer)
        bn = resolve(params, p.bn) if _has(params, p.bn) else {}
        kernel_shape = layer["kernel"].shape
        ls, bi = jnp.asarray(blk.ls), jnp.asarray(blk.bi)
        dtype = layer["kernel"].dtype
        # Without a BN shift, BI must enter through the layer bias, *before* the BN scale: then LS has
        # to live in the kernel for the sum to stay (W·LS)x + BI.
        put_ls_in_kernel = ls_into == "kernel" or "scale" not in bn or "bias" not in bn
        w = block_weight(blk) if put_ls_in_kernel else blk.w
        kernel = nnr_to_flax(w)
        kernel = check_in_range(kernel.astype(dtype), kernel, f"block {wname!r}: kernel")
        if kernel.shape != kernel_shape:
            raise InputError(f"block {wname!r}: kernel {kernel.shape} does not fit the model's {kernel_shape}")
        params = _set(params, p.layer, "kernel", kernel)
        bn_vals = unfold_bn(jnp.ones_like(ls) if put_ls_in_kernel else ls, bi, eps=eps)
        if "bias" in bn:
            params = _set(params, p.bn, "bias", bn_vals["bias"].astype(bn["bias"].dtype))
            if "bias" in layer:
                params = _set(params, p.layer, "bias", jnp.zeros_like(layer["bias"]))
        elif "bias" in layer:
            # No BN shift: BI enters through the layer bias, which mean = 0 passes through unchanged.
            params = _set(params, p.layer, "bias", bi.astype(layer["bias"].dtype))
        else:
            raise InputError(f"block {wname!r}: neither the BN nor the layer has a bias to hold BI")
        if "scale" in bn:
            params = _set(params, p.bn, "scale", bn_vals["scale"].astype(bn["scale"].dtype))
        st = resolve(stats, p.bn)
        stats = _set(stats, p.bn, "mean", jnp.zeros_like(st["mean"]))
        stats = _set(stats, p.bn, "var", jnp.full_like(st["var"], unit_variance(eps, st["var"].dtype)))
    out = dict(variables)
    out["params"] = params
    out["batch_stats"] = stats
    return out
