"""BN folding (nncjax.reduce.bnfold): NNR LS/BI from Conv+BN and the exact inverse onto a Flax model."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax.errors import InputError
from nncjax.reduce import (
    BNPair,
    FoldedBlock,
    block_names,
    block_weight,
    find_bn_pairs,
    flax_to_nnr,
    fold_batchnorm,
    fold_bn,
    nnr_to_flax,
    unfold_batchnorm,
    unit_variance,
)


class CNN(nn.Module):
    """Three Conv+BN layers covering: no conv bias, BN without scale, BN without bias."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        bn = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=self.eps)
        x = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        x = nn.relu(bn(use_scale=False)(nn.Conv(6, (3, 3))(x)))
        x = nn.relu(bn(use_bias=False)(nn.Conv(5, (1, 1))(x)))
        return nn.Dense(4)(x.mean((1, 2)))


class FoldedCNN(nn.Module):
    """The function NNR's block defines: conv with (W·LS) and bias BI, no BN."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.relu(nn.Conv(5, (1, 1))(x))
        return nn.Dense(4)(x.mean((1, 2)))


def _model_and_vars(eps: float, seed: int = 0):
    model = CNN(eps=eps)
    x = jnp.asarray(np.random.default_rng(seed + 100).normal(size=(2, 7, 7, 3)), jnp.float32)
    # Only the structure comes from Flax (eval_shape compiles nothing); the values are random, BN
    # statistics included, so that folding is non-trivial.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, a.dtype), shapes["params"])
    stats = {name: {"mean": jnp.asarray(rng.normal(size=s["mean"].shape), jnp.float32),
                    "var": jnp.asarray(rng.uniform(0.05, 3.0, size=s["var"].shape), jnp.float32)}
             for name, s in shapes["batch_stats"].items()}
    return model, {"params": params, "batch_stats": stats}, x


def _folded_network_params(blocks, rest):
    """FoldedCNN params realising ``(W·LS) ⊛ x + BI`` per block."""
    p = {f"Conv_{i}": {"kernel": nnr_to_flax(block_weight(blocks[f"Conv_{i}/kernel"])),
                       "bias": blocks[f"Conv_{i}/kernel"].bi} for i in range(3)}
    p["Dense_0"] = {"kernel": rest["Dense_0/kernel"], "bias": rest["Dense_0/bias"]}
    return {"params": p}


def test_find_bn_pairs_by_flax_names():
    _, variables, _ = _model_and_vars(1e-5)
    assert find_bn_pairs(variables["params"]) == [BNPair((f"Conv_{i}",), (f"BatchNorm_{i}",)) for i in range(3)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(5)(x)))
        return nn.Dense(3)(x)


def test_dense_bn_pairs_given_explicitly():
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.2, 1.5, size=a.shape), a.dtype), shapes)
    with pytest.raises(InputError):  # BatchNorm_0 without a Conv_0: auto-detection refuses to guess
        fold_batchnorm(variables)
    pairs = [BNPair(("Dense_0",), ("BatchNorm_0",))]
    folded = fold_batchnorm(variables, pairs)
    blk = folded.blocks["Dense_0/kernel"]
    assert blk.w.shape == (5, 6)  # NNR layout: (out, in)
    decoded = {"Dense_0/kernel": FoldedBlock(*(jnp.round(t * 8) / 8 for t in blk))}
    unfolded = unfold_batchnorm(variables, decoded, pairs)
    d = decoded["Dense_0/kernel"]
    h = jax.nn.relu(x @ (d.w * d.ls[:, None]).T + d.bi)
    expect = h @ variables["params"]["Dense_1"]["kernel"] + variables["params"]["Dense_1"]["bias"]
    np.testing.assert_allclose(model.apply(unfolded, x), expect, rtol=2e-6, atol=2e-6)


def test_find_bn_pairs_ambiguous_raises():
    with pytest.raises(InputError):
        find_bn_pairs({"Conv_0": {"kernel": 0}, "BatchNorm_1": {"scale": 0}})


def test_fold_bn_formula_against_numpy():
    rng = np.random.default_rng(3)
    g, b, m, v, bias, ls0 = (rng.normal(size=5) for _ in range(6))
    v = np.abs(v) + 0.1
    ls, bi = fold_bn(g, b, m, v, eps=1e-3, bias=bias, ls=ls0)
    gain = g / np.sqrt(v + 1e-3)
    np.testing.assert_allclose(ls, ls0 * gain, rtol=1e-6)
    np.testing.assert_allclose(bi, (bias - m) * gain + b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_folded_blocks_compute_the_model_function(eps):
    model, variables, x = _model_and_vars(eps)
    folded = fold_batchnorm(variables, eps=eps)
    assert list(folded.blocks) == [f"Conv_{i}/kernel" for i in range(3)]
    assert sorted(folded.rest) == ["Dense_0/bias", "Dense_0/kernel"]
    blk = folded.blocks["Conv_0/kernel"]
    assert blk.w.shape == (8, 3, 3, 3) and blk.ls.shape == (8,) and blk.bi.shape == (8,)
    y_ref = model.apply(variables, x)
    y_fold = FoldedCNN().apply(_folded_network_params(folded.blocks, folded.rest), x)
    np.testing.assert_allclose(y_fold, y_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ls_into", ["bn", "kernel"])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_unfold_gives_the_decoded_network_exactly(eps, ls_into):
    """Decoded (perturbed, as after quantization) blocks mapped back onto Conv+BN compute exactly the
    NNR block function; NNCodec's var = 1 mapping would be off by 1/sqrt(1 + eps) per layer."""
    model, variables, x = _model_and_vars(eps, seed=5)
    folded = fold_batchnorm(variables, eps=eps)
    decoded = {k: FoldedBlock(*(jnp.round(t * 16) / 16 for t in b)) for k, b in folded.blocks.items()}
    unfolded = unfold_batchnorm(variables, decoded, eps=eps, rest=folded.rest, ls_into=ls_into)
    y_nnr = FoldedCNN().apply(_folded_network_params(decoded, folded.rest), x)
    y_unf = model.apply(unfolded, x)
    np.testing.assert_allclose(y_unf, y_nnr, rtol=2e-6, atol=2e-6)
    assert float(jnp.max(jnp.abs(y_nnr))) > 0.1
    # The BN statistics really are neutral and the structure is the model's own.
    assert jax.tree.structure(unfolded) == jax.tree.structure(variables)
    st0 = unfolded["batch_stats"]["BatchNorm_0"]
    assert np.all(np.asarray(st0["mean"]) == 0)
    assert np.all(np.asarray(st0["var"] + np.float32(eps)) == 1)
    if ls_into == "kernel":
        assert np.all(np.asarray(unfolded["params"]["BatchNorm_0"]["scale"]) == 1)


def test_naive_unit_variance_is_not_exact():
    """Why unit_variance exists: with var = 1 (NNCodec's reconstruct_bnf) outputs drift by ~eps/2."""
    eps = 1e-3
    model, variables, x = _model_and_vars(eps, seed=7)
    folded = fold_batchnorm(variables, eps=eps)
    good = unfold_batchnorm(variables, folded.blocks, eps=eps, rest=folded.rest)
    naive = jax.tree.map(lambda a: a, good)
    for name in naive["batch_stats"]:
        naive["batch_stats"][name]["var"] = jnp.ones_like(naive["batch_stats"][name]["var"])
    y_ref = model.apply(variables, x)
    err_good = float(jnp.max(jnp.abs(model.apply(good, x) - y_ref)))
    err_naive = float(jnp.max(jnp.abs(model.apply(naive, x) - y_ref)))
    assert err_naive > 20 * err_good


def test_fold_and_unfold_under_jit():
    model, variables, x = _model_and_vars(1e-5, seed=2)
    pairs = tuple(find_bn_pairs(variables["params"]))
    fold = jax.jit(functools.partial(fold_batchnorm, pairs=pairs, eps=1e-5))
    eager = fold_batchnorm(variables, pairs, eps=1e-5)
    jitted = fold(variables)
    for k in eager.blocks:
        for a, b in zip(eager.blocks[k], jitted.blocks[k]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    unfold = jax.jit(functools.partial(unfold_batchnorm, pairs=pairs, eps=1e-5))
    back = unfold(variables, jitted.blocks, rest=jitted.rest)
    np.testing.assert_allclose(model.apply(back, x), model.apply(variables, x), rtol=1e-4, atol=1e-5)


def test_local_scales_merge_into_ls():
    _, variables, _ = _model_and_vars(1e-5)
    s = {"Conv_1/kernel": jnp.arange(1.0, 7.0)}
    plain = fold_batchnorm(variables, eps=1e-5)
    merged = fold_batchnorm(variables, eps=1e-5, local_scales=s)
    np.testing.assert_allclose(merged.blocks["Conv_1/kernel"].ls, plain.blocks["Conv_1/kernel"].ls * s["Conv_1/kernel"])
    np.testing.assert_array_equal(merged.blocks["Conv_1/kernel"].bi, plain.blocks["Conv_1/kernel"].bi)


def test_unfold_rejects_unknown_block_and_bad_shape():
    _, variables, _ = _model_and_vars(1e-5)
    folded = fold_batchnorm(variables)
    with pytest.raises(InputError):
        unfold_batchnorm(variables, {"Nope/kernel": folded.blocks["Conv_0/kernel"]})
    bad = folded.blocks["Conv_0/kernel"]._replace(w=jnp.zeros((8, 3, 3, 2)))
    with pytest.raises(InputError):
        unfold_batchnorm(variables, {"Conv_0/kernel": bad})
    with pytest.raises(InputError):
        fold_batchnorm({"params": variables["params"]})


def test_block_names_follow_nncodec():
    names = block_names("layer1/Conv_0/kernel")
    assert names == {"W": "layer1/Conv_0/kernel", "LS": "layer1/Conv_0/kernel_scaling", "BI": "layer1/Conv_0/bias",
                     "G": "layer1/Conv_0/kernel_G", "H": "layer1/Conv_0/kernel_H"}


@pytest.mark.parametrize("shape", [(5,), (3, 4), (3, 3, 2, 4), (2, 3, 3, 2, 4)])
def test_layout_round_trip(shape):
    a = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    w = flax_to_nnr(a)
    if len(shape) >= 2:
        assert w.shape[0] == shape[-1]
    if len(shape) >= 3:
        assert w.shape[1] == shape[-2] and w.shape[2:] == shape[:-2]
    np.testing.assert_array_equal(nnr_to_flax(w), a)


@settings(max_examples=200, deadline=None)
@given(eps=st.floats(1e-8, 0.1), dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_unit_variance_sums_to_one(eps, dtype):
    v = unit_variance(eps, dtype)
    assert v.dtype == dtype
    assert dtype(v + dtype(eps)) == 1
    assert abs(float(v) - (1 - eps)) <= 4 * np.finfo(dtype).eps


def test_bad_pairs_input_and_local_scales_are_input_errors():
    _, variables, _ = _model_and_vars(1e-5)
    with pytest.raises(InputError, match="must be a mapping"):
        find_bn_pairs([1, 2])
    with pytest.raises(InputError, match="has shape"):
        fold_batchnorm(variables, eps=1e-5, local_scales={"Conv_1/kernel": jnp.ones(3)})
    with pytest.raises(InputError, match="names no folded layer"):  # was silently ignored
        fold_batchnorm(variables, eps=1e-5, local_scales={"Conv_9/kernel": jnp.ones(6)})


@pytest.mark.parametrize("var", [-0.5, -1e-5])            # -1e-5: var + eps == 0 exactly
def test_fold_batchnorm_refuses_a_variance_plus_eps_not_above_zero(var):
    _, variables, _ = _model_and_vars(1e-5)
    stats = variables["batch_stats"]["BatchNorm_1"]
    bad = dict(variables, batch_stats=dict(variables["batch_stats"],
                                           BatchNorm_1=dict(stats, var=stats["var"].at[2].set(var))))
    with pytest.raises(InputError, match=r"BN 'BatchNorm_1': running variance \+ eps <= 0 in 1 of 6 channels"):
        fold_batchnorm(bad, eps=1e-5)
    # Traced values cannot be checked: as documented, that channel's LS is not finite under jit.
    folded = jax.jit(functools.partial(fold_batchnorm, eps=1e-5))(bad)
    assert not np.isfinite(folded.blocks["Conv_1/kernel"].ls[2])
