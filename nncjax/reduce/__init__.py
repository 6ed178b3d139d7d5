"""Parameter reduction before quantization: BN folding, local scaling, pruning, low rank.

All transforms are pure JAX functions on parameter pytrees (jit-able; configuration arguments static)
and produce the tensors an NNR block carries (format digest §2.14, §10):

* :mod:`~nncjax.reduce.bnfold` — BN folding into LS/BI and the exact inverse onto a Flax model;
* :mod:`~nncjax.reduce.lsa` — local scaling adaptation (trained per-row scales, the LS tensor);
* :mod:`~nncjax.reduce.prune` — magnitude / statistics / structured-row sparsification, zeroing rows;
* :mod:`~nncjax.reduce.update_sparsify` — NNCodec's federated-learning sparsification of updates (host);
* :mod:`~nncjax.reduce.vocab` — the vocabulary rows a WordPiece tokenizer can never emit;
* :mod:`~nncjax.reduce.lowrank` — truncated SVD into the DC factors G, H;
* :mod:`~nncjax.reduce.unify` — weight unification (tiles sharing one magnitude);
* :mod:`~nncjax.reduce.block` — the members of an NNR_PT_BLOCK, their names and orders;
* :mod:`~nncjax.reduce.layout` — Flax <-> NNR (output rows first) tensor layouts.

Tensor names are slash-joined pytree paths (``"Conv_0/kernel"``); see :func:`named_leaves`.
"""

from nncjax.reduce._tree import named_leaves, replace_named
from nncjax.reduce.block import (
    CPT_BI,
    CPT_BN,
    CPT_DC,
    CPT_LS,
    BlockMembers,
    BNVectors,
    block_from_members,
    block_members,
)
from nncjax.reduce.bnfold import (
    BNPair,
    FoldedBlock,
    FoldedModel,
    block_names,
    block_weight,
    bn_gain,
    find_bn_pairs,
    fold_batchnorm,
    fold_bn,
    unfold_batchnorm,
    unfold_bn,
    unit_variance,
)
from nncjax.reduce.layout import flax_to_nnr, nnr_to_flax
from nncjax.reduce.lowrank import (
    LowRank,
    dc_matrix_shape,
    low_rank_decompose,
    low_rank_factors,
    low_rank_recompose,
    rank_for_energy,
    svd_tail_norm,
)
from nncjax.reduce.lsa import LSAResult, apply_local_scales, fit_local_scales, kernel_rows, lsa_init, scale_rows
from nncjax.reduce.prune import (
    apply_masks,
    magnitude_prune,
    row_prune,
    row_prune_below_mean,
    row_scores,
    sparsity,
    stats_threshold_prune,
    zero_rows,
)
from nncjax.reduce.unify import unify_params, unify_tiles
from nncjax.reduce.update_sparsify import sparsify_update
from nncjax.reduce.vocab import unreachable_token_ids

__all__ = [
    "CPT_BI",
    "CPT_BN",
    "CPT_DC",
    "CPT_LS",
    "BlockMembers",
    "BNVectors",
    "block_from_members",
    "block_members",
    "named_leaves",
    "replace_named",
    "BNPair",
    "FoldedBlock",
    "FoldedModel",
    "block_names",
    "block_weight",
    "bn_gain",
    "find_bn_pairs",
    "fold_batchnorm",
    "fold_bn",
    "unfold_batchnorm",
    "unfold_bn",
    "unit_variance",
    "flax_to_nnr",
    "nnr_to_flax",
    "LowRank",
    "dc_matrix_shape",
    "low_rank_decompose",
    "low_rank_factors",
    "low_rank_recompose",
    "rank_for_energy",
    "svd_tail_norm",
    "LSAResult",
    "apply_local_scales",
    "fit_local_scales",
    "kernel_rows",
    "lsa_init",
    "scale_rows",
    "apply_masks",
    "magnitude_prune",
    "row_prune",
    "row_prune_below_mean",
    "row_scores",
    "sparsify_update",
    "sparsity",
    "stats_threshold_prune",
    "unify_params",
    "unify_tiles",
    "unreachable_token_ids",
    "zero_rows",
]
