"""The reduce tools together: fold BN, quantize, adapt LS/BI by LSA, map back onto Conv+BN exactly."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import optax

from nncjax.ioq import reconstruct_uniform
from nncjax.reduce import (
    FoldedBlock,
    apply_local_scales,
    block_names,
    fit_local_scales,
    fold_batchnorm,
    nnr_to_flax,
    unfold_batchnorm,
)
from tests.test_reduce_bnfold import FoldedCNN, _model_and_vars


def _folded_apply(flat, x):
    """FoldedCNN on a flat NNR-layout dict: conv kernels (O, I, kh, kw) and biases by name."""
    p = {f"Conv_{i}": {"kernel": nnr_to_flax(flat[f"Conv_{i}/kernel"]), "bias": flat[f"Conv_{i}/bias"]}
         for i in range(3)}
    p["Dense_0"] = {"kernel": flat["Dense_0/kernel"], "bias": flat["Dense_0/bias"]}
    return FoldedCNN().apply({"params": p}, x)


def test_fold_quantize_lsa_unfold():
    eps = 1e-5
    model, variables, _ = _model_and_vars(eps, seed=11)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 7, 7, 3)), jnp.float32)
    y_ref = model.apply(variables, x)
    folded = fold_batchnorm(variables, eps=eps)

    # Coarse uniform quantization of the block weights; LS/BI/rest stay float (fine QPs in practice).
    flat = {n: reconstruct_uniform(b.w, -10) for n, b in folded.blocks.items()}
    flat.update({block_names(n)["BI"]: b.bi for n, b in folded.blocks.items()})
    flat.update(folded.rest)
    scales = {n: b.ls for n, b in folded.blocks.items()}  # LSA starts from the folded BN gain

    def loss(p, batch):
        return jnp.mean((_folded_apply(p, batch[0]) - batch[1]) ** 2)

    loss_q = float(loss(apply_local_scales(flat, scales, axis=0), (x, y_ref)))
    res = fit_local_scales(loss, flat, scales, itertools.repeat((x, y_ref)), optimizer=optax.adam(3e-3),
                           steps=40, progress=False, axis=0)
    loss_lsa = float(loss(apply_local_scales(res.params, res.scales, axis=0), (x, y_ref)))
    assert loss_lsa < 0.8 * loss_q

    # The adapted blocks, mapped back onto the model's own Conv + BatchNorm structure, compute the same.
    blocks = {n: FoldedBlock(flat[n], res.scales[n], res.params[block_names(n)["BI"]]) for n in folded.blocks}
    rest = {k: res.params[k] for k in folded.rest}
    unfolded = unfold_batchnorm(variables, blocks, eps=eps, rest=rest)
    y_model = model.apply(unfolded, x)
    y_blocks = _folded_apply(apply_local_scales(res.params, res.scales, axis=0), x)
    np.testing.assert_allclose(y_model, y_blocks, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(float(jnp.mean((y_model - y_ref) ** 2)), loss_lsa, rtol=1e-4)
