"""DeepCABAC rate model: accuracy against the real coder, transforms (jit/grad/vmap), training mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nncjax.kernels.coder import encode_levels

from nncjax.quantize import dq_trellis, quantize_uniform
from nncjax.rate import (
    bin_statistics,
    bits_from_statistics,
    estimate_bits,
    estimate_bits_levels,
    estimate_bits_tree,
)
from nncjax.steps import qp_to_step_jax

RNG = np.random.default_rng(11)
# A handful of tensors >= 4096 elements with different shapes/statistics (Gaussian, Laplacian with
# row-wise scales, heavy-tailed 1-D, some all-zero rows for row skipping).
_rows = RNG.uniform(0.2, 2.0, (64, 1))
TENSORS = {
    "gauss": RNG.normal(0, 0.05, (64, 96)).astype(np.float32),
    "laplace_rows": (RNG.laplace(0, 0.03, (64, 96)) * _rows).astype(np.float32),
    "student_1d": (0.01 * RNG.standard_t(3, 6144)).astype(np.float32),
    "zero_rows": (RNG.random((64, 1)) < 0.7) * RNG.normal(0, 0.05, (64, 96)).astype(np.float32),
}


def _levels(w, qp, dq):
    step = qp_to_step_jax(qp)
    return np.asarray(dq_trellis(w, step)) if dq else np.asarray(quantize_uniform(w, step)[0])


def test_hard_estimate_within_3_percent_of_real_coder(oracle):
    cases, ests = [], []
    for w in TENSORS.values():
        for qp in (-40, -30, -20):
            for dq in (False, True):
                k = _levels(w, qp, dq)
                cases.append({"levels": k, "dq": dq, "qp_delta": qp})
                ests.append(float(estimate_bits_levels(k, dq=dq)))
    # the real size: our bit-exact coder, with NNCodec's C++ coder as the oracle on the same streams
    real = [8 * len(encode_levels(c["levels"], dq=c["dq"], row_skipping=True)) for c in cases]
    real_with_qp = [8 * b for b in oracle.call("rate", "coded_bytes", cases)]
    for r, rq in zip(real, real_with_qp):
        assert abs(rq - (r + 8)) <= 16            # + 8 qp_delta bits inside the same arithmetic stream
    err = np.array([(e - r) / r for e, r in zip(ests, real_with_qp)])
    assert np.median(np.abs(err)) <= 0.03 and np.max(np.abs(err)) <= 0.08, err


def _rate_fn(dq, training):
    return lambda w, qp: estimate_bits(w, qp, dq=dq, training=training)


RATES = {f"dq={dq}-training={t}": _rate_fn(dq, t) for dq in (False, True) for t in (False, True)}


@pytest.mark.parametrize("name", sorted(RATES))
def test_rate_jit_grad_vmap(name):
    fn = RATES[name]
    w = jnp.asarray(TENSORS["gauss"][:16])
    qp = jnp.float32(-34.0)
    eager = float(fn(w, qp))
    assert eager > 0
    np.testing.assert_allclose(float(jax.jit(fn)(w, qp)), eager, rtol=1e-5)
    batched = jax.vmap(fn)(jnp.stack([w, 0.5 * w]), jnp.array([-34.0, -30.0]))
    np.testing.assert_allclose(np.asarray(batched), [eager, float(fn(0.5 * w, jnp.float32(-30.0)))], rtol=1e-5)
    gw, gq = jax.grad(fn, argnums=(0, 1))(w, qp)
    assert np.all(np.isfinite(gw)) and np.isfinite(gq)
    if "training=True" in name:
        assert float(gq) < 0                 # a coarser step costs fewer bits
        assert float(jnp.sum(jnp.abs(gw))) > 0


def test_training_estimate_is_close_to_hard_and_tracks_finite_differences():
    w = jnp.asarray(TENSORS["laplace_rows"])
    for dq in (False, True):
        hard = float(estimate_bits(w, -32, dq=dq))
        soft = float(estimate_bits(w, jnp.float32(-32.0), dq=dq, training=True))
        assert 0.9 * hard < soft < 1.15 * hard, (dq, hard, soft)
    # d bits / d qp from autodiff agrees in sign and magnitude with the hard estimate's QP slope
    g = float(jax.grad(lambda q: estimate_bits(w, q, dq=False, training=True))(jnp.float32(-32.0)))
    fd = (float(estimate_bits(w, -31, dq=False)) - float(estimate_bits(w, -33, dq=False))) / 2
    assert 0.5 * fd > g > 2.0 * fd, (g, fd)


def test_statistics_count_every_bin():
    k = np.array([[0, 1, -2, 13], [0, 0, 0, 0], [3, -1, 0, 40]], np.int32)
    st = bin_statistics(jnp.asarray(k), dq=False, n_gt=11)
    coded = k[[0, 2]].reshape(-1)                    # row 1 is skipped
    assert float(st["sig"][:, 0].sum()) == coded.size
    assert float(st["sig"][:, 1].sum()) == np.count_nonzero(coded)
    assert float(st["sign"][:, 1].sum()) == np.sum(coded < 0)
    assert float(st["gt"][:, :, 0].sum()) == np.minimum(np.abs(coded), 11).sum()
    # remainders: 13 -> r=1 (prefix 1 0, 1 suffix bit); 40 -> r=28 (prefix 1111 0, 4 suffix bits)
    assert float(st["prefix"][:, 0].sum()) == 2 + 5 and float(st["bypass"]) == 1 + 4
    np.testing.assert_array_equal(np.asarray(st["rows"]), [3, 1])
    assert float(bits_from_statistics(st)) > 0


def test_tree_form():
    params = {"a": jnp.asarray(TENSORS["gauss"][:8]), "b": [jnp.asarray(TENSORS["student_1d"][:100])]}
    bits = estimate_bits_tree(params, {"a": -36, "b": [-40]}, dq=False)
    assert jax.tree_util.tree_structure(bits) == jax.tree_util.tree_structure(params)
    assert float(bits["a"]) == pytest.approx(float(estimate_bits(params["a"], -36, dq=False)))
    one = estimate_bits_tree(params, -36, dq=False)
    assert float(one["b"][0]) > 0


def test_accelerator_counting_equals_cpu_scatter():
    """The one-hot reduction used off-CPU counts exactly what the CPU's segment_sum counts, values and
    gradients alike, so the rate model is the same function on every backend."""
    from nncjax.rate.deepcabac import _count_onehot
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, 26, 5000), jnp.int32)
    v = jnp.asarray(rng.random(5000), jnp.float32)
    np.testing.assert_allclose(_count_onehot(v, ids, 26), jax.ops.segment_sum(v, ids, 26), rtol=1e-5)
    w = jnp.asarray(rng.normal(size=26), jnp.float32)
    g1 = jax.grad(lambda v: jnp.dot(_count_onehot(v, ids, 26), w))(v)
    g2 = jax.grad(lambda v: jnp.dot(jax.ops.segment_sum(v, ids, 26), w))(v)
    np.testing.assert_array_equal(g1, g2)


def test_neighbours_skip_zero_rows_and_empty_tensors_cost_only_fixed_bits():
    """A row's first element takes its neighbour from the nearest coded row above (skipped all-zero rows
    in between leave it untouched): counted here by brute force over the raster scan."""
    from nncjax.rate.deepcabac import bin_statistics
    rng = np.random.default_rng(6)
    k = rng.integers(-2, 3, (9, 4)) * (rng.random((9, 4)) < 0.6)
    k[[0, 3, 4, 7]] = 0
    stats = bin_statistics(jnp.asarray(k), dq=False)
    sign = np.zeros((3, 2))
    prev = 0
    for r in range(9):
        if not k[r].any():
            continue
        for x in range(4):
            nb = 0 if prev == 0 else (1 if prev < 0 else 2)
            if k[r, x]:
                sign[nb] += (1, k[r, x] < 0)
            prev = k[r, x]
    np.testing.assert_array_equal(np.asarray(stats["sign"]), sign)
    for dq in (False, True):
        empty = float(estimate_bits_levels(jnp.zeros((0,), jnp.int32), dq=dq))
        assert np.isfinite(empty) and empty < 64


def test_bad_statics_and_qp_trees_are_input_errors():
    from nncjax.errors import InputError
    x = jnp.linspace(-0.05, 0.05, 64).reshape(8, 8)
    for kwargs in ({"n_gt": -1}, {"n_gt": 0}, {"n_gt": 1.5}, {"profile": 5}, {"n_gt": -1, "training": True}):
        with pytest.raises(InputError, match="n_gt|profile"):
            estimate_bits(x, -38, **kwargs)
    with pytest.raises(InputError, match="structure of params"):
        estimate_bits_tree({"a": x}, {"b": -38})
    with pytest.raises(InputError, match="structure of params"):
        estimate_bits_tree({"a": x, "b": x}, {"a": -38, "b": None})


def test_non_finite_inputs_give_nan_and_temperature_is_checked():
    """Fifth robustness sweep: NaN weights or an infinite / zero step gave a plausible finite count."""
    from nncjax.errors import InputError

    w = jnp.linspace(-0.05, 0.05, 64).reshape(8, 8)
    for x, qp in ((w.at[0, 0].set(jnp.nan), -38), (w.at[0, 0].set(jnp.inf), -38), (w, jnp.nan), (w, 10**6),
                  (w, -(10**6))):
        assert np.isnan(float(estimate_bits(x, qp))), qp
    assert np.isfinite(float(estimate_bits(w, -38)))
    assert np.isfinite(float(jax.grad(lambda q: estimate_bits(w, q, training=True))(-38.0)))
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="temperature"):
            estimate_bits(w, -38.0, training=True, temperature=t)


def test_coded_tensor_refuses_float_qps_and_casts_nothing():
    """Fifth robustness sweep: ``int(qp)`` truncated -20.5, int32 casts wrapped levels of 2**40 to 0."""
    from nncjax.coded_tensor import code_tensor, codec_reconstruct, levels_bits, qp_delta_bits
    from nncjax.errors import InputError

    x = np.array([0.3, -0.3], np.float32)
    assert code_tensor(x, np.int64(-20))[0].tolist() == [0.3125, -0.3125]
    assert codec_reconstruct(x, jnp.int32(-20)).tolist() == [0.3125, -0.3125]
    for qp in (-20.5, -20.0, True, "x", None):
        with pytest.raises(InputError, match="qp must be an integer"):
            code_tensor(x, qp)
        with pytest.raises(InputError, match="qp must be an integer"):
            codec_reconstruct(x, qp)
    for bad in (x.astype(np.complex64), np.array([True]), np.array(["a"])):
        with pytest.raises(InputError, match="real numeric"):
            code_tensor(bad, -20)
    for levels in (np.array([2**40]), np.array([2**31])):
        with pytest.raises(InputError, match="int32 range"):
            levels_bits(levels, dq=False)
    with pytest.raises(InputError, match="integer array"):
        levels_bits(np.array([1.5]), dq=False)
    for qpd in (2.5, -1, 8, True):
        with pytest.raises(InputError, match="qp_density"):
            qp_delta_bits(qpd)
