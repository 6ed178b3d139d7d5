"""Pruning masks (nncjax.reduce.prune) and low-rank DC factors (nncjax.reduce.lowrank)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax.errors import InputError
from nncjax.reduce import (
    apply_masks,
    dc_matrix_shape,
    low_rank_decompose,
    low_rank_recompose,
    magnitude_prune,
    rank_for_energy,
    row_prune,
    row_prune_below_mean,
    row_scores,
    sparsity,
    stats_threshold_prune,
    svd_tail_norm,
)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32), "bias": jnp.ones(8)},
        "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(32, 10)) * 3, jnp.float32), "bias": jnp.ones(10)},
    }


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_prune_per_tensor_is_exact(ratio):
    p = _params()
    pruned, masks = jax.jit(functools.partial(magnitude_prune, scope="per_tensor"))(p, ratio)
    for layer in ("Conv_0", "Dense_0"):
        w, m = np.asarray(p[layer]["kernel"]), np.asarray(masks[layer]["kernel"])
        assert (~m).sum() == int(np.floor(ratio * w.size))
        if 0 < (~m).sum() < w.size:
            assert np.abs(w[~m]).max() <= np.abs(w[m]).min()
        np.testing.assert_array_equal(pruned[layer]["kernel"], np.where(m, w, 0))
        assert np.all(np.asarray(masks[layer]["bias"]))  # 1-D leaves are not selected
        np.testing.assert_array_equal(pruned[layer]["bias"], p[layer]["bias"])


def test_magnitude_prune_global_ranks_across_tensors():
    p = _params()
    pruned, masks = jax.jit(magnitude_prune)(p, jnp.float32(0.5))
    allw = np.concatenate([np.abs(np.asarray(p[k]["kernel"])).ravel() for k in ("Conv_0", "Dense_0")])
    allm = np.concatenate([np.asarray(masks[k]["kernel"]).ravel() for k in ("Conv_0", "Dense_0")])
    assert (~allm).sum() == allw.size // 2
    assert allw[~allm].max() <= allw[allm].min()
    # The Dense weights are 3x larger, so the global rule prunes the conv much more.
    assert np.mean(~np.asarray(masks["Conv_0"]["kernel"])) > np.mean(~np.asarray(masks["Dense_0"]["kernel"]))
    assert float(sparsity(pruned)) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(InputError):
        magnitude_prune(p, 0.5, scope="rows")


@pytest.mark.parametrize("delta,step", [(0.5, None), (1.0, None), (0.1, 4.0)])
def test_stats_threshold_rule(delta, step):
    p = _params(1)
    pruned, masks = jax.jit(functools.partial(stats_threshold_prune, step=step))(p, delta)
    for layer in ("Conv_0", "Dense_0"):
        w = np.asarray(p[layer]["kernel"], np.float64)
        thr = max(abs(w.mean() - delta * w.std()), abs(w.mean() + delta * w.std()))
        if step is not None:
            thr = max(thr, step / 2)
        expect = np.abs(w) >= thr
        got = np.asarray(masks[layer]["kernel"])
        # Only entries within float32 rounding of the threshold may differ.
        assert np.all((got == expect) | np.isclose(np.abs(w), thr, rtol=1e-5))
        assert 0 < got.sum() < got.size
        np.testing.assert_array_equal(pruned[layer]["kernel"], np.where(got, p[layer]["kernel"], 0))


def test_row_prune_zeroes_whole_output_rows():
    p = _params(2)
    pruned, masks = jax.jit(row_prune)(p, 0.25)
    w = np.asarray(p["Conv_0"]["kernel"])
    scores = np.abs(w).mean(axis=(0, 1, 2))
    m = np.asarray(masks["Conv_0"]["kernel"])
    rows_kept = m.reshape(-1, 8).all(axis=0)
    assert np.all(m.reshape(-1, 8).any(axis=0) == rows_kept)  # whole rows only
    assert (~rows_kept).sum() == 2
    assert set(np.flatnonzero(~rows_kept)) == set(np.argsort(scores)[:2])
    assert np.all(np.asarray(pruned["Conv_0"]["kernel"])[..., ~rows_kept] == 0)
    # NNR layout (rows first) via axis=0.
    w_nnr = {"w": jnp.asarray(w.reshape(-1, 8).T)}
    _, m0 = row_prune(w_nnr, 0.25, axis=0)
    np.testing.assert_array_equal(np.asarray(m0["w"]).all(axis=1), rows_kept)


def test_row_prune_below_mean_rule():
    w = jnp.asarray(np.array([[1.0, 0.2, 2.0, 0.9]] * 3), jnp.float32)  # row means 1, .2, 2, .9; mean 1.025
    _, m = jax.jit(row_prune_below_mean)({"w": w}, 0.9)  # threshold 0.9225
    np.testing.assert_array_equal(np.asarray(m["w"])[0], [True, False, True, False])


def test_apply_masks_keeps_structure():
    p = _params()
    masks = jax.tree.map(lambda a: jnp.zeros(a.shape, bool), p)
    out = apply_masks(p, masks)
    assert jax.tree.structure(out) == jax.tree.structure(p)
    assert all(float(jnp.abs(v).sum()) == 0 for v in jax.tree.leaves(out))


_decompose = jax.jit(low_rank_decompose, static_argnums=(1, 2))
_tail = jax.jit(svd_tail_norm, static_argnums=(1, 2))


@settings(max_examples=15, deadline=None)
@given(dims=st.sampled_from([(8, 4, 3, 3), (12, 20), (6, 2, 5), (16, 3, 1, 1)]),
       rank=st.integers(1, 6), seed=st.integers(0, 2**16), split_rows=st.booleans())
def test_low_rank_error_is_svd_tail(dims, rank, seed, split_rows):
    w = np.random.default_rng(seed).normal(size=dims).astype(np.float32)
    g_rows = int(np.prod(dims[:2])) if split_rows and len(dims) > 2 else dims[0]
    rows, cols = dc_matrix_shape(dims, g_rows)
    rank = min(rank, rows, cols)
    f = _decompose(jnp.asarray(w), rank, g_rows)
    assert f.g.shape == (g_rows, rank) and f.h.shape == (rank, int(np.prod(dims)) // g_rows)
    rec = low_rank_recompose(f.g, f.h, dims)
    assert rec.shape == dims
    s = np.linalg.svd(w.astype(np.float64).reshape(rows, cols), compute_uv=False)
    err = np.linalg.norm(np.asarray(rec, np.float64) - w)
    tail = np.sqrt(np.sum(s[rank:] ** 2))
    np.testing.assert_allclose(err, tail, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_tail(jnp.asarray(w), rank, g_rows), tail, rtol=1e-4, atol=1e-4)
    # Balanced split: G and H carry the same singular-value energy.
    np.testing.assert_allclose(np.linalg.norm(f.g, axis=0), np.linalg.norm(f.h, axis=1), rtol=1e-4)


def test_low_rank_jit_full_rank_and_errors():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 2)), jnp.float32)
    f = jax.jit(low_rank_decompose, static_argnums=(1, 2))(w, 6, None)
    np.testing.assert_allclose(low_rank_recompose(f.g, f.h, w.shape), w, atol=1e-5)
    assert rank_for_energy(w, 1.0) == 6
    with pytest.raises(InputError):
        low_rank_decompose(w, 7)
    with pytest.raises(InputError):
        low_rank_decompose(w, 1, g_rows=5)
    with pytest.raises(InputError):
        low_rank_recompose(f.g, f.h, (6, 4, 3))


def test_low_rank_takes_half_precision_and_its_tail_gradient_is_finite():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.bfloat16)
    for dt in (jnp.bfloat16, jnp.float16):  # the SVD has no half-precision kernel: widened to float32
        f = low_rank_decompose(w.astype(dt), 2)
        assert f.g.dtype == jnp.float32
        assert rank_for_energy(w.astype(dt), 0.5) >= 1
        assert float(svd_tail_norm(w.astype(dt), 2)) > 0
    for m in (jnp.zeros((3, 3)), jnp.outer(jnp.arange(3.0), jnp.ones(4))):  # a zero tail: sqrt'(0)
        g = jax.grad(lambda x: svd_tail_norm(x, 1))(m)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_row_axis_out_of_range_is_an_input_error():
    w = jnp.ones((2, 3))
    for axis in (2, -3, 5, 1.0):
        with pytest.raises(InputError, match="axis must be an integer"):
            row_scores(w, axis=axis)
        with pytest.raises(InputError, match="axis must be an integer"):
            row_prune({"w": w}, 0.5, axis=axis)
