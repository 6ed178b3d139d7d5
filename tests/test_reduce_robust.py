"""Robustness sweep of nncjax.reduce called directly: every public function given nonsense raises
InputError naming what is wrong (before: raw JAX / NumPy / Python errors, a hanging SVD, or silently
altered data), and valid input still gives the same results under jit / grad / vmap."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax.errors import InputError
from nncjax.reduce import (
    BNVectors,
    FoldedBlock,
    LowRank,
    apply_local_scales,
    apply_masks,
    block_from_members,
    block_members,
    block_names,
    block_weight,
    bn_gain,
    dc_matrix_shape,
    fit_local_scales,
    flax_to_nnr,
    fold_batchnorm,
    fold_bn,
    kernel_rows,
    low_rank_decompose,
    low_rank_factors,
    low_rank_recompose,
    lsa_init,
    magnitude_prune,
    nnr_to_flax,
    rank_for_energy,
    row_prune,
    row_prune_below_mean,
    row_scores,
    scale_rows,
    sparsity,
    stats_threshold_prune,
    svd_tail_norm,
    unfold_batchnorm,
    unfold_bn,
    unify_params,
    unify_tiles,
    unit_variance,
    zero_rows,
)

W = jnp.arange(12.0).reshape(3, 4) - 5.0
P = {"d": {"kernel": W, "bias": jnp.ones(4)}}

# --- pruning -------------------------------------------------------------------------------------

BAD_RATIOS = [-0.5, 1.5, float("nan"), True, "0.5", 1j, None, np.array([0.5, 0.5])]


@pytest.mark.parametrize("ratio", BAD_RATIOS)
@pytest.mark.parametrize("prune", [magnitude_prune, functools.partial(magnitude_prune, scope="per_tensor"),
                                   row_prune])
def test_prune_ratio_must_be_a_real_number_in_0_1(prune, ratio):
    # before: -0.5 / 1.5 clipped, NaN pruned an undefined count, True meant 1, "0.5" was parsed
    with pytest.raises(InputError, match="ratio must be a finite real number in"):
        prune(P, ratio)


def test_prune_ratio_may_still_be_traced():
    f = jax.jit(magnitude_prune)
    _, m = f(P, jnp.float32(0.5))
    assert int((~m["d"]["kernel"]).sum()) == 6
    with pytest.raises(InputError, match="one real number"):
        f(P, jnp.array([0.5, 0.5]))  # before: a broadcast error from inside _keep_top


@pytest.mark.parametrize("kwargs, match", [
    ({"delta": float("nan")}, "delta"), ({"delta": "1"}, "delta"), ({"delta": True}, "delta"),
    ({"delta": None}, "delta"), ({"step": -1.0}, "step"), ({"step": 0}, "step"), ({"step": float("nan")}, "step"),
    ({"step": True}, "step"),
])
def test_stats_threshold_prune_checks_delta_and_step(kwargs, match):
    with pytest.raises(InputError, match=f"{match} must be a finite real number"):
        stats_threshold_prune(P, **kwargs)


@pytest.mark.parametrize("gain", [-1, float("nan"), "0.9", True, None])
def test_row_prune_below_mean_checks_gain(gain):
    with pytest.raises(InputError, match="gain must be a finite real number >= 0"):
        row_prune_below_mean(P, gain)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("prune", [stats_threshold_prune, row_prune_below_mean])
def test_statistics_pruners_refuse_non_finite_weights(prune, bad):
    # before: one NaN made the threshold NaN and every finite weight of the tensor was zeroed
    with pytest.raises(InputError, match="'w' holds NaN or Inf"):
        prune({"w": W.at[0, 0].set(bad)})
    jax.jit(prune)({"w": W.at[0, 0].set(bad)})  # traced: not checked, no host sync


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
@pytest.mark.parametrize("prune", [functools.partial(magnitude_prune, ratio=0.5),
                                   functools.partial(row_prune, ratio=0.5), stats_threshold_prune,
                                   row_prune_below_mean])
def test_pruners_leave_non_float_tensors_alone(prune, dtype):
    w = jnp.array([[2**30 + 1, 2**30], [1, 3]]).astype(dtype)
    p, m = prune({"w": w, "f": W})
    np.testing.assert_array_equal(p["w"], w)
    assert p["w"].dtype == w.dtype and bool(m["w"].all())
    assert p["f"].dtype == W.dtype


def test_magnitude_prune_global_no_longer_ranks_integers_through_float32():
    # 2**30 + 1 and 2**30 are one float32: the larger was pruned (ties broken by position)
    w = jnp.array([[2**30 + 1, 2**30]], jnp.int32)
    p, _ = magnitude_prune({"w": w}, 0.5)
    assert p["w"].tolist() == [[2**30 + 1, 2**30]]


@pytest.mark.parametrize("select", ["d/kernel", 3, [3]])
def test_prune_select_must_be_a_predicate_or_names(select):
    with pytest.raises(InputError, match="select"):
        magnitude_prune(P, 0.5, select=select)
    with pytest.raises(InputError, match="select"):
        sparsity(P, select=select)


def test_prune_select_takes_a_list_of_names():
    p, m = magnitude_prune(P, 0.5, select=["d/kernel"])
    assert int((~m["d"]["kernel"]).sum()) == 6
    assert float(sparsity(p, select=["d/kernel"])) == 0.5
    with pytest.raises(InputError, match="no float tensors"):
        magnitude_prune(P, 0.5, select=["d/nope"])


def test_sparsity_of_only_empty_tensors_is_zero_not_nan():
    assert float(sparsity({"e": jnp.zeros((0, 3))}, select=lambda n, x: True)) == 0.0


@pytest.mark.parametrize("masks, match", [
    ({"d": {"kernel": jnp.ones((3, 4), bool)}}, r"missing \['d/bias'\]"),
    ({"d": {"kernel": jnp.ones((3, 4), bool), "bias": jnp.ones(4, bool), "x": jnp.ones(1, bool)}}, r"extra \['d/x'\]"),
    ({"d": {"kernel": jnp.ones((4,), bool), "bias": jnp.ones(4, bool)}}, "'d/kernel' must be a bool array of shape"),
    ({"d": {"kernel": jnp.ones((1, 4), bool), "bias": jnp.ones(4, bool)}}, "'d/kernel' must be a bool array"),
    ({"d": {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.ones(4, bool)}}, "'d/kernel' must be a bool array"),
    ({"d": {"kernel": jnp.full((3, 4), 2), "bias": jnp.ones(4, bool)}}, "'d/kernel' must be a bool array"),
])
def test_apply_masks_refuses_masks_that_do_not_fit(masks, match):
    # before: raw tree-structure errors, or a (4,) / float / int mask silently broadcast or taken as truthy
    with pytest.raises(InputError, match=match):
        apply_masks(P, masks)


@pytest.mark.parametrize("w, match", [("abc", "w must be an array"), (jnp.float32(1), "output axis"),
                                      (None, "w must be an array")])
def test_row_scores_refuses_non_tensors(w, match):
    with pytest.raises(InputError, match=match):
        row_scores(w)


@pytest.mark.parametrize("kwargs, match", [
    ({"rows": [("e", [0])]}, "rows must be a mapping"),
    ({"rows": {"e": [0]}, "axis": 0.0}, "has no axis 0.0"),       # before: TypeError from shape[0.0]
    ({"rows": {"e": [0]}, "axis": True}, "has no axis True"),     # before: axis 1
    ({"rows": {"e": [0]}, "axis": 2}, "has no axis 2"),
])
def test_zero_rows_checks_rows_and_axis(kwargs, match):
    with pytest.raises(InputError, match=match):
        zero_rows({"e": W}, **kwargs)


def test_zero_rows_negative_axis_is_per_tensor():
    # a normalised axis must not leak from one tensor to the next (-1 is 1 for 2-D, 2 for 3-D)
    out = zero_rows({"a": jnp.ones((2, 3)), "b": jnp.ones((2, 2, 3))}, {"a": [0], "b": [0]}, axis=-1)
    assert float(out["a"][:, 0].sum()) == 0 and float(out["b"][:, :, 0].sum()) == 0
    assert float(out["b"].sum()) == 8


def test_zero_rows_refuses_traced_indices():
    with pytest.raises(InputError, match="must be concrete"):
        jax.jit(lambda p, i: zero_rows(p, {"e": i}))({"e": W}, jnp.array([0]))


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(3, 4), (2, 3, 5), (7, 1), (1, 9)]), ratio=st.floats(0, 1),
       seed=st.integers(0, 2**16), per_tensor=st.booleans())
def test_prune_then_apply_masks_keeps_the_exact_nonzero_count(shape, ratio, seed, per_tensor):
    w = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 2.0, shape) * np.sign(np.random.default_rng(seed + 1)
                    .normal(size=shape)), jnp.float32)
    n = math.prod(shape)
    pruned, masks = magnitude_prune({"w": w}, ratio, scope="per_tensor" if per_tensor else "global")
    assert int(jnp.count_nonzero(pruned["w"])) == n - math.floor(np.float32(ratio) * n)
    again = apply_masks({"w": w}, masks)
    np.testing.assert_array_equal(again["w"], pruned["w"])
    assert again["w"].dtype == w.dtype


# --- unification ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [0, -1, 2.5, 2.0, True, "3", None])
def test_unify_tile_must_be_a_positive_integer(tile):
    # before: 2.5 / "3" / None raw TypeErrors, True tiled by 1
    with pytest.raises(InputError, match="tile must be an integer >= 1"):
        unify_tiles(W, tile, 0.1)
    with pytest.raises(InputError, match="tile must be an integer >= 1"):
        unify_params(P, tile, 0.1)


@pytest.mark.parametrize("threshold", [-1, float("nan"), float("inf"), "0.1", True, None])
def test_unify_threshold_must_be_a_finite_number_at_least_0(threshold):
    with pytest.raises(InputError, match="threshold must be a finite real number >= 0"):
        unify_tiles(W, 2, threshold)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_unify_needs_float_tensors(dtype):
    # before: an int tensor came back float32 with averaged values, bool raised a raw TypeError
    with pytest.raises(InputError, match="real floating-point"):
        unify_tiles(jnp.ones((2, 4), dtype), 2, 0.5)
    w = jnp.array([[3, 4], [5, 5]]).astype(dtype)
    p, masks = unify_params({"w": w, "f": W}, 2, 0.5)
    assert p["w"].dtype == dtype and "w" not in masks and "f" in masks
    np.testing.assert_array_equal(p["w"], w)


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_unify_params_flax_layout_is_a_flag(flag):
    with pytest.raises(InputError, match="flax_layout must be True or False"):
        unify_params(P, 2, 0.1, flax_layout=flag)


def test_unify_stays_jit_grad_and_vmap_able():
    ref = unify_tiles(W, 2, 0.1)[0]
    np.testing.assert_array_equal(jax.jit(unify_tiles, static_argnums=1)(W, 2, jnp.float32(0.1))[0], ref)
    assert jax.grad(lambda w: unify_tiles(w, 2, 0.1)[0].sum())(W).shape == W.shape
    assert jax.vmap(lambda w: unify_tiles(w, 2, 0.1)[0])(jnp.stack([W, W])).shape == (2, 3, 4)
    p, _ = unify_params(P, 2, 0.1, select=["d/kernel"])
    np.testing.assert_array_equal(p["d"]["kernel"], unify_params(P, 2, 0.1)[0]["d"]["kernel"])


# --- layout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [flax_to_nnr, nnr_to_flax])
@pytest.mark.parametrize("x", ["abc", None])
def test_layout_refuses_non_arrays(f, x):
    with pytest.raises(InputError, match="must be an array of numbers"):
        f(x)


# --- low rank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -1, 4, 2.5, 2.0, True, "1", None])
def test_low_rank_decompose_rank_is_an_integer_in_range(rank):
    with pytest.raises(InputError, match=r"rank \(for a 3x4 matrix\) must be an integer in \[1, 3\]"):
        low_rank_decompose(W, rank)


@pytest.mark.parametrize("g_rows", [0, 2.0, True, "3"])
def test_low_rank_g_rows_is_a_positive_integer(g_rows):
    # before: 2.0 / True / "3" were taken as 2 / 1 / 3
    with pytest.raises(InputError, match="g_number_of_rows must be an integer >= 1"):
        low_rank_decompose(W, 1, g_rows)


@pytest.mark.parametrize("dims", [(4, 2.7), (4, True, 6), "46", 24, None, (), (4, 0)])
def test_dc_dims_are_positive_integers(dims):
    # before: (4, 2.7) was (4, 2), "46" was (4, 6), True a 1
    with pytest.raises(InputError, match="dims must be"):
        dc_matrix_shape(dims)
    with pytest.raises(InputError, match="dims must be"):
        low_rank_recompose(jnp.ones((4, 1)), jnp.ones((1, 6)), dims)


def test_low_rank_recompose_refuses_non_matrices():
    with pytest.raises(InputError, match="must be matrices"):  # before: IndexError
        low_rank_recompose(jnp.float32(1), jnp.ones((1, 6)), (4, 6))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_low_rank_needs_real_float_tensors(dtype):
    # before: complex factors NNR cannot carry; ints and bools silently widened
    for f in (lambda w: low_rank_decompose(w, 1), lambda w: svd_tail_norm(w, 1), rank_for_energy):
        with pytest.raises(InputError, match="real floating-point"):
            f(jnp.ones((3, 3), dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_low_rank_refuses_non_finite_weights_instead_of_hanging(bad):
    w = W.at[0, 0].set(bad)  # before: Inf sent LAPACK's SVD into an endless loop, NaN gave NaN factors
    for f in (lambda w: low_rank_decompose(w, 1), lambda w: svd_tail_norm(w, 1), rank_for_energy):
        with pytest.raises(InputError, match="NaN or Inf"):
            f(w)
    # traced: no check, but Inf is made NaN so the SVD returns (NaN), and the tail norm is no perfect 0
    f = jax.jit(low_rank_decompose, static_argnums=1)(w, 1)
    assert bool(jnp.isnan(f.g).all())
    assert bool(jnp.isnan(jax.jit(svd_tail_norm, static_argnums=1)(w, 1)))


@pytest.mark.parametrize("rank", [-1, 4, 2.5, True, "1", None])
def test_svd_tail_norm_rank_is_checked(rank):
    # before: -1 measured only the last singular value, None all of them, True was 1
    with pytest.raises(InputError, match=r"rank \(for a 3x4 matrix\) must be an integer in \[0, 3\]"):
        svd_tail_norm(W, rank)


def test_svd_tail_norm_rank_0_and_full_rank():
    assert float(svd_tail_norm(W, 0)) == pytest.approx(float(jnp.linalg.norm(W)), rel=1e-5)
    assert float(svd_tail_norm(W, 3)) == 0.0


@pytest.mark.parametrize("energy", [True, "0.9", None, 0, 1.5])
def test_rank_for_energy_checks_energy(energy):
    with pytest.raises(InputError, match="energy must be a finite real number"):
        rank_for_energy(W, energy)


def test_rank_for_energy_under_jit_is_a_named_error():
    with pytest.raises(InputError, match="not jit-able"):
        jax.jit(rank_for_energy)(W, 0.9)


F = {"fc": {"kernel": np.ones((6, 4), np.float32), "bias": np.ones(4, np.float32)}}


@pytest.mark.parametrize("params, ranks, g_rows, match", [
    (F, {"fc/kernel": 1}, {"fc/bias": 2}, "g_rows names weights without a rank"),   # was ignored
    (F, {"fc/kernel": 1}, {"fc/kernel": 2.0}, r"g_rows\['fc/kernel'\] must be an integer"),  # was 2
    (F, {"fc/kernel": 1}, {"fc/kernel": True}, r"g_rows\['fc/kernel'\] must be an integer"),  # was 1
    (F, {"fc/kernel": 1}, [("fc/kernel", 2)], "g_rows must be a mapping"),
    ({"w": np.ones((2, 2), np.float32), "w_G": np.ones(3, np.float32)}, {"w": 1}, None,
     "would replace the tensor 'w_G'"),                                                 # was overwritten
    ({"w": np.full((2, 2), np.nan, np.float32)}, {"w": 1}, None, "NaN or Inf"),
])
def test_low_rank_factors_refuses_bad_g_rows_and_name_clashes(params, ranks, g_rows, match):
    with pytest.raises(InputError, match=match):
        low_rank_factors(params, ranks, g_rows=g_rows)


@settings(max_examples=20, deadline=None)
@given(dims=st.sampled_from([(4, 6), (8, 2, 3), (3, 1, 2, 2), (5,)]), seed=st.integers(0, 2**16),
       rank=st.integers(1, 4))
def test_low_rank_recompose_gives_the_dims_back(dims, seed, rank):
    w = jnp.asarray(np.random.default_rng(seed).normal(size=dims), jnp.float32)
    rows, cols = dc_matrix_shape(dims)
    rank = min(rank, rows, cols)
    f = low_rank_decompose(w, rank)
    assert f.g.shape == (rows, rank) and f.h.shape == (rank, cols)
    rec = low_rank_recompose(f.g, f.h, list(dims))
    assert rec.shape == dims and rec.dtype == jnp.float32
    if rank == min(rows, cols):
        np.testing.assert_allclose(rec, w, atol=1e-4)


# --- local scaling -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"rows_spec": "d/kernel"}, "rows_spec must be"),              # was split into letters
    ({"rows_spec": 3}, "rows_spec must be"),
    ({"axis": 2}, "axis must be an integer"), ({"axis": -3}, "axis must be an integer"),  # IndexError
    ({"axis": 1.0}, "axis must be an integer"), ({"axis": True}, "axis must be an integer"),
])
def test_lsa_init_checks_rows_spec_and_axis(kwargs, match):
    with pytest.raises(InputError, match=match):
        lsa_init(P, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_lsa_needs_float_weights(dtype):
    # before: integer scales (truncated when trained) and truncated products [[1, 2]] for s = [1.5, 2.5]
    with pytest.raises(InputError, match="real floating-point"):
        lsa_init({"w": jnp.ones((2, 3), dtype)}, ["w"])
    with pytest.raises(InputError, match="real floating-point"):
        scale_rows(jnp.ones((2, 2), dtype), jnp.array([1.5, 2.5]))


def test_scale_rows_refuses_complex_or_string_scales():
    with pytest.raises(InputError, match="real numbers"):  # the imaginary part was dropped
        scale_rows(W, jnp.ones(4, jnp.complex64))
    with pytest.raises(InputError, match="s must be an array"):
        scale_rows(W, "abcd")


@pytest.mark.parametrize("scales", [[("d/kernel", jnp.ones(4))], None])
def test_apply_local_scales_needs_a_mapping(scales):
    with pytest.raises(InputError, match="scales must be a mapping"):
        apply_local_scales(P, scales)


def _loss(p, b):
    return jnp.sum(p["d"]["kernel"] ** 2)


@pytest.mark.parametrize("args, kwargs, match", [
    ((_loss, P, {"d/kernel": jnp.ones(4)}, [0] * 3), {"progress": "no"}, "progress must be True or False"),
    ((_loss, P, {"d/kernel": jnp.ones(4)}, [0] * 3), {"train_biases": "no"}, "train_biases must be True or"),
    ((_loss, P, {"d/kernel": jnp.ones(4)}, "ab"), {}, "data_iter must be an iterable"),
    ((3, P, {"d/kernel": jnp.ones(4)}, [0] * 3), {}, "loss_fn must be a function"),
    ((_loss, P, {"d/kernel": jnp.ones(4)}, [0] * 3), {"optimizer": "adam"}, "optimizer must be an optax"),
    ((_loss, P, [1], [0] * 3), {}, "scales must be a mapping"),
    ((lambda p, b: p["d"]["kernel"], P, {"d/kernel": jnp.ones(4)}, [0] * 3), {}, "must return a float scalar"),
])
def test_fit_local_scales_checks_its_arguments(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        fit_local_scales(*args, **{"steps": 2, "progress": False, **kwargs})


def test_fit_local_scales_skips_integer_biases():
    # before: jax.grad refused the int32 bias leaf with a raw TypeError
    p = {"d": {"kernel": W, "bias": jnp.ones(4, jnp.int32)}}
    res = fit_local_scales(_loss, p, {"d/kernel": jnp.ones(4)}, [0] * 3, steps=2, progress=False)
    assert res.params["d"]["bias"].dtype == jnp.int32 and res.losses.shape == (2,)


def test_kernel_rows_name_must_be_a_string():
    with pytest.raises(InputError, match="name must be a string"):
        kernel_rows(3, W)


# --- batch-norm folding --------------------------------------------------------------------------

ONES = jnp.ones(4)


@pytest.mark.parametrize("eps", [-2.0, float("nan"), "1e-5", True])
def test_bn_eps_must_be_a_finite_number_at_least_0(eps):
    # before: -2 gave NaN gains, "1e-5" was parsed, True was 1
    for f in (lambda: bn_gain(ONES, ONES, eps), lambda: fold_bn(ONES, ONES, ONES, ONES, eps=eps),
              lambda: unit_variance(eps), lambda: unfold_bn(ONES, ONES, eps=eps)):
        with pytest.raises(InputError, match="eps must be a finite real number >= 0"):
            f()


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": jnp.ones(3)}, "beta must be a vector of 4"),         # before: raw broadcast error
    ({"beta": jnp.ones(1)}, "beta must be a vector of 4"),         # before: silently broadcast
    ({"bias": jnp.ones(3)}, "bias must be a vector of 4"),
    ({"ls": jnp.ones(1)}, "ls must be a vector of 4"),
    ({"gamma": jnp.ones((2, 2))}, "gamma must be a vector"),       # before: 2-D LS
    ({"var": jnp.ones(4, jnp.int32)}, "var must be a real floating-point"),  # eps added as int(eps) == 0
])
def test_fold_bn_vectors_must_be_one_row_each(kwargs, match):
    args = {"gamma": ONES, "beta": ONES, "mean": ONES, "var": ONES, **kwargs}
    with pytest.raises(InputError, match=match):
        fold_bn(args.pop("gamma"), args.pop("beta"), args.pop("mean"), args.pop("var"), **args)


def test_fold_bn_stays_jit_grad_and_vmap_able():
    ref = fold_bn(ONES * 2, ONES, ONES, ONES * 3)
    np.testing.assert_array_equal(jax.jit(fold_bn)(ONES * 2, ONES, ONES, ONES * 3)[0], ref[0])
    assert jax.grad(lambda g: fold_bn(g, ONES, ONES, ONES)[0].sum())(ONES).shape == (4,)
    assert jax.vmap(fold_bn)(*(jnp.ones((3, 4)),) * 4)[1].shape == (3, 4)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, "foo"])
def test_unit_variance_needs_a_float_dtype(dtype):
    with pytest.raises(InputError, match="dtype must be a float dtype"):
        unit_variance(1e-5, dtype)
    assert unit_variance(1e-5, jnp.bfloat16).dtype == jnp.bfloat16


def _vars(over=None, rows=4):
    v = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 2, rows)), "bias": jnp.ones(rows)},
                    "BatchNorm_0": {"scale": jnp.ones(rows), "bias": jnp.zeros(rows)}},
         "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(rows), "var": jnp.ones(rows)}}}
    for (col, mod, key), val in (over or {}).items():
        v[col][mod][key] = val
    return v


@pytest.mark.parametrize("over, match", [
    ({("params", "BatchNorm_0", "scale"): jnp.ones(3)}, r"BN 'BatchNorm_0' .*scale must be a vector of 4"),
    ({("batch_stats", "BatchNorm_0", "var"): jnp.ones(3)}, r"var must be a vector of 4"),
    ({("batch_stats", "BatchNorm_0", "var"): jnp.ones((1, 4))}, r"var must be a vector of 4"),  # 2-D LS, BI
    ({("params", "Conv_0", "bias"): jnp.ones(3)}, r"layer_bias must be a vector of 4"),
    ({("params", "Conv_0", "kernel"): jnp.float32(1)}, "has no output rows"),
    ({("params", "Conv_0", "kernel"): jnp.ones((3, 3, 2, 4), jnp.int32)}, "kernel of layer 'Conv_0' must be a real fl"),
    ({("batch_stats", "BatchNorm_0", "var"): jnp.full(4, jnp.nan)}, "variance is NaN or Inf"),  # NaN LS, BI
])
def test_fold_batchnorm_checks_every_vector(over, match):
    with pytest.raises(InputError, match=match):
        fold_batchnorm(_vars(over))


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": "1e-5"}, "eps must be"), ({"eps": -0.5}, "eps must be"),
    ({"pairs": "ab"}, "pairs must be a list"), ({"pairs": [(("Conv_0",), ("BatchNorm_0",), 1)]}, "a pair must be"),
    ({"pairs": [(("Conv_0", "kernel"), ("BatchNorm_0",))]}, "has no 'kernel'"),
    ({"local_scales": [1]}, "local_scales must be a mapping"),
])
def test_fold_batchnorm_checks_its_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        fold_batchnorm(_vars(), **kwargs)


def test_fold_batchnorm_takes_string_module_paths():
    # before: tuple("Conv_0") was a path of letters, 'C/o/n/v/_/0'
    a = fold_batchnorm(_vars(), [("Conv_0", "BatchNorm_0")])
    b = fold_batchnorm(_vars())
    np.testing.assert_array_equal(a.blocks["Conv_0/kernel"].ls, b.blocks["Conv_0/kernel"].ls)


@pytest.mark.parametrize("blocks, kwargs, match", [
    ({"Conv_0/kernel": FoldedBlock(jnp.ones((4, 2, 3, 3)), jnp.ones(3), jnp.zeros(4))}, {}, "ls must be a vector of 4"),
    ({"Conv_0/kernel": FoldedBlock(jnp.ones((4, 2, 3, 3)), jnp.ones(4), jnp.zeros(5))}, {}, "bi must be a vector of 4"),
    ({"Conv_0/kernel": FoldedBlock(jnp.ones((4, 2, 3, 3)), jnp.ones(4), 0.0)}, {}, "bi must be a vector of 4"),
    ({"Conv_0/kernel": FoldedBlock(jnp.ones((4, 2, 3, 3)), jnp.ones(4, jnp.complex64), jnp.zeros(4))}, {},
     "ls must be a real floating-point"),
    ({"Conv_0/kernel": 3}, {}, "must be a FoldedBlock"),
    ([1], {}, "blocks must be a mapping"),
    ({}, {"rest": {"Conv_0/bias": jnp.ones(7)}}, r"rest\['Conv_0/bias'\] has shape \(7,\)"),
    ({}, {"eps": "x"}, "eps must be"),
])
def test_unfold_batchnorm_refuses_blocks_that_do_not_fit(blocks, kwargs, match):
    # before: BN scale / bias of the wrong length (a broken model), raw AttributeErrors, ValueErrors
    with pytest.raises(InputError, match=match):
        unfold_batchnorm(_vars(), blocks, **kwargs)


def test_half_precision_overflow_is_refused_not_made_inf():
    # before: a float32 block written into a float16 model, or a float16 weight times large scales,
    # silently held inf
    half = _vars()
    half["params"]["Conv_0"]["kernel"] = jnp.ones((3, 3, 2, 4), jnp.float16)
    big = {"Conv_0/kernel": FoldedBlock(jnp.full((4, 2, 3, 3), 7e4, jnp.float32), jnp.ones(4), jnp.zeros(4))}
    with pytest.raises(InputError, match="block 'Conv_0/kernel': kernel: a finite value became inf in float16"):
        unfold_batchnorm(half, big, ls_into="kernel")
    w = jnp.asarray([[6e4, 1.0]], jnp.float16)
    with pytest.raises(InputError, match="scale_rows: a finite value became inf in float16"):
        scale_rows(w, jnp.asarray([2.0, 1.0]))
    assert scale_rows(w, jnp.asarray([1.0, 2.0])).tolist() == [[6e4, 2.0]]  # in range: as before


@settings(max_examples=25, deadline=None)
@given(n_out=st.integers(1, 6), n_in=st.integers(1, 5), seed=st.integers(0, 2**16),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_fold_then_unfold_is_the_same_dense_layer(n_out, n_in, seed, eps):
    O, I = n_out, n_in  # noqa: E741
    rng = np.random.default_rng(seed)
    k, b = rng.normal(size=(I, O)).astype(np.float32), rng.normal(size=O).astype(np.float32)
    g, beta = rng.uniform(0.5, 2, O).astype(np.float32), rng.normal(size=O).astype(np.float32)
    mean, var = rng.normal(size=O).astype(np.float32), rng.uniform(0.1, 3, O).astype(np.float32)
    x = rng.normal(size=(5, I)).astype(np.float32)

    def bn_dense(v):
        p, s = v["params"], v["batch_stats"]["BatchNorm_0"]
        y = x @ p["Conv_0"]["kernel"] + p["Conv_0"]["bias"]
        return (y - s["mean"]) * (jax.lax.rsqrt(s["var"] + eps) * p["BatchNorm_0"]["scale"]) \
            + p["BatchNorm_0"]["bias"]

    v = {"params": {"Conv_0": {"kernel": k, "bias": b}, "BatchNorm_0": {"scale": g, "bias": beta}},
         "batch_stats": {"BatchNorm_0": {"mean": mean, "var": var}}}
    folded = fold_batchnorm(v, eps=eps)
    blk = folded.blocks["Conv_0/kernel"]
    np.testing.assert_allclose(x @ nnr_to_flax(block_weight(blk)) + blk.bi, bn_dense(v), rtol=1e-4, atol=1e-4)
    for ls_into in ("bn", "kernel"):
        back = unfold_batchnorm(v, folded.blocks, eps=eps, ls_into=ls_into)
        np.testing.assert_allclose(bn_dense(back), bn_dense(v), rtol=1e-4, atol=1e-4)


def test_block_weight_and_block_names_check_their_input():
    with pytest.raises(InputError, match="bi must be a vector of 3"):  # before: raw broadcast error
        block_weight(FoldedBlock(jnp.ones((3, 2)), jnp.ones(3), jnp.zeros(2)))
    with pytest.raises(InputError, match="must be a FoldedBlock"):
        block_weight(jnp.ones(3))
    with pytest.raises(InputError, match="weight_name must be a non-empty string"):
        block_names(3)


# --- blocks --------------------------------------------------------------------------------------

G1, H1 = jnp.ones((4, 1)), jnp.ones((1, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"w": "abc"}, "w must be an array"),
    ({"lowrank": LowRank(G1, H1), "dims": (4, 3.7)}, "dims must be positive"),       # was (4, 3)
    ({"lowrank": LowRank(G1, H1), "dims": (4, True, 3)}, "dims must be positive"),   # was (4, 1, 3)
    ({"lowrank": 3, "dims": (4, 3)}, "lowrank must be a LowRank"),
    ({"w": jnp.ones((4, 3)), "bn": (jnp.ones(4),) * 4}, "bn must be BNVectors"),
    ({"w": jnp.ones((4, 3)), "bn": BNVectors(*(jnp.ones(4),) * 4, names=("a", "b"))}, "four tensor names"),
    ({"w": jnp.ones((4, 3)), "names": {"X": "y"}}, "names must map roles"),             # was ignored
    ({"w": jnp.ones((4, 3)), "names": ["a"]}, "names must be a mapping"),
    ({"w": jnp.ones((4, 3)), "ls": jnp.ones(4), "names": {"LS": "d/kernel"}}, "distinct names"),
])
def test_block_members_checks_its_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        block_members("d/kernel", **kwargs)


def test_block_members_takes_a_plain_pair_of_factors():
    a = block_members("d/kernel", lowrank=(G1, H1), dims=(4, 3))
    assert a.cpt == 1 and a.decomposition_rank == 1


@pytest.mark.parametrize("cpt, dims, match", [
    (8.5, (2, 3), "compressed_parameter_types must be an integer"),
    (True, (2, 3), "compressed_parameter_types must be an integer"),   # was DC
    ("8", (2, 3), "compressed_parameter_types must be an integer"),
    (0, (2, 3.5), "dims must be positive"),
    (0, (), "dims must be positive"),                                  # was IndexError
])
def test_block_from_members_checks_cpt_and_dims(cpt, dims, match):
    with pytest.raises(InputError, match=match):
        block_from_members("d/kernel", cpt, dims, {"d/kernel": jnp.ones((2, 3)), "d/bias": jnp.ones(2)})


def test_block_from_members_checks_bn_names_and_decoded():
    dec = {"d/kernel": jnp.ones((2, 3)), **{n: jnp.ones(2) for n in "abcd"}}
    with pytest.raises(InputError, match="four tensor names"):
        block_from_members("d/kernel", 4, (2, 3), dec, bn_names=("a", "b", "c"))
    with pytest.raises(InputError, match="decoded must be a mapping"):
        block_from_members("d/kernel", 0, (2, 3), [1])


@pytest.mark.parametrize("build", [
    lambda: block_members("d/kernel", jnp.ones((2, 3), jnp.int32)),
    lambda: block_members("d/kernel", jnp.ones((2, 3)), ls=np.array([1, 2])),
    lambda: block_members("d/kernel", lowrank=(np.ones((2, 1), np.int32), np.ones((1, 3))), dims=(2, 3)),
    lambda: block_from_members("d/kernel", 0x08, (2, 3), {"d/kernel": jnp.ones((2, 3), jnp.int32),
                                                         "d/bias": jnp.ones(2)}),
    lambda: block_from_members("d/kernel", 0x08, (2, 3), {"d/kernel": jnp.ones((2, 3)), "d/bias": np.ones(2, bool)}),
])
def test_block_members_must_be_floats(build):
    # before: an integer W, LS or BI went into the block (unfolding then did integer arithmetic)
    with pytest.raises(InputError, match="floating-point"):
        build()


def test_block_members_keep_half_precision():
    m = block_members("d/kernel", jnp.ones((2, 3), jnp.bfloat16), ls=jnp.ones(2, jnp.bfloat16))
    assert [a.dtype for _, a in m.coded] == [jnp.bfloat16, jnp.bfloat16]
