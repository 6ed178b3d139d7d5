"""IOQ (nncjax.ioq): initial per-tensor QP heuristic and the greedy D + λR QP search."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax.errors import InputError
from nncjax.ioq import estimate_lambda, ioq_cost, ioq_initial_qps, ioq_search, qp_limits, reconstruct_uniform
from nncjax.steps import qp_to_step


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 128, 0.15), (128, 32, 0.1), (32, 10, 0.3)]
    return {f"Dense_{i}": {"kernel": jnp.asarray(rng.normal(size=(a, b)) * s, jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=b) * 0.1, jnp.float32)}
            for i, (a, b, s) in enumerate(sizes)}


def _forward(p, x):
    for i in range(3):
        x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        if i < 2:
            x = jnp.tanh(x)
    return x


@pytest.fixture(scope="module")
def toy():
    params = _mlp()
    x = jnp.asarray(np.random.default_rng(9).normal(size=(256, 64)), jnp.float32)
    y_ref = _forward(params, x)
    mse = jax.jit(lambda p: jnp.mean((_forward(p, x) - y_ref) ** 2))
    return params, (lambda p: float(mse(p)))


def entropy_bits(name, w, qp):
    """Empirical zeroth-order entropy of the uniform levels (a stand-in for the coder's size)."""
    step = np.float32(qp_to_step(qp))
    k = np.sign(w) * np.floor(np.abs(np.asarray(w) * (np.float32(1) / step)) + 0.5)
    _, counts = np.unique(k, return_counts=True)
    p = counts / k.size
    return float(-(counts * np.log2(p)).sum()) + 8.0


def test_qp_limits():
    assert qp_limits(2) == (-128, 127)
    assert qp_limits(0) == (-32, 31)


_reconstruct_jit = jax.jit(reconstruct_uniform)  # one compilation: the QP is traced


@settings(max_examples=100, deadline=None)
@given(w=st.lists(st.floats(-100, 100, width=32), min_size=24, max_size=24), qp=st.integers(-60, 20))
def test_reconstruct_uniform_matches_nncodec_rule(w, qp):
    w = np.asarray(w, np.float32)
    step = np.float32(qp_to_step(qp))
    u = np.float32(np.float32(1) / step) * w
    expect = step * (np.sign(u) * np.floor(np.abs(u) + np.float32(0.5)))
    got = _reconstruct_jit(w, qp)
    np.testing.assert_array_equal(np.asarray(got), expect.astype(np.float32))


def test_reconstruct_uniform_rounds_half_away():
    np.testing.assert_array_equal(reconstruct_uniform(jnp.array([0.125, -0.125, 0.375]), -8), [0.25, -0.25, 0.5])


def test_initial_qps_size_and_spread():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 64)).astype(np.float32)
    z = (z - z.mean()) / z.std()
    params = {"a": z[:16, :16] * 1.0, "b": z[:16, :16] * 4.0, "c": z, "bias": np.ones(3, np.float32)}
    qps = ioq_initial_qps(params, -32, size_weight=0.0)
    # Spread only: std ratio 4 (2 octaves) between a and b, beta 0.5 -> 4 QPs apart; c sits between.
    assert qps["b"] - qps["a"] == 4
    assert qps["bias"] == -40
    qps = ioq_initial_qps(params, -32, spread_weight=0.0)
    # Size only: c has 16x the elements of a (4 octaves), alpha 0.25 -> 1 octave = 4 QPs.
    assert qps["c"] - qps["a"] == 4 and qps["a"] == qps["b"]
    qps = ioq_initial_qps(params, -32, spread_weight=0.0, size_weight=0.0, nonweight_qp=-75)
    assert qps == {"a": -32, "b": -32, "bias": -75, "c": -32}
    assert ioq_initial_qps(params, 127, size_weight=10.0)["c"] == 127  # clipped to the QP range


def test_search_decreases_cost(toy):
    params, dist = toy
    init = {k: q for k, q in ioq_initial_qps(params, -30).items() if k.endswith("kernel")}
    lam = estimate_lambda(params, init, dist, entropy_bits)
    assert lam > 0
    c0 = ioq_cost(params, init, dist, entropy_bits, lam)
    qps = ioq_search(params, dist, entropy_bits, lam, init, rounds=2, progress=False)
    c1 = ioq_cost(params, qps, dist, entropy_bits, lam)
    assert set(qps) == set(init)
    assert c1 < c0
    assert all(abs(qps[k] - init[k]) <= 8 for k in init)
    assert qps != init


def test_search_limits_of_lambda(toy):
    params, dist = toy
    init = {k: -24 for k in ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")}
    fine = ioq_search(params, dist, entropy_bits, 0.0, init, offsets=(-2, 2), rounds=1, progress=False)
    assert all(fine[k] < init[k] for k in init)  # rate is free: finer everywhere
    coarse = ioq_search(params, dist, entropy_bits, 1e3, init, offsets=(-2, 2), rounds=1, progress=False)
    assert all(coarse[k] > init[k] for k in init)  # rate dominates: coarser everywhere
    assert ioq_search(params, dist, entropy_bits, 1.0, init, rounds=0, progress=False) == init


def test_search_caches_rates_and_restricts_names(toy):
    params, dist = toy
    calls = collections.Counter()

    def rate(name, w, qp):
        calls[(name, qp)] += 1
        return entropy_bits(name, w, qp)

    init = {"Dense_0/kernel": -28, "Dense_1/kernel": -28, "Dense_0/bias": -40}
    qps = ioq_search(params, dist, rate, 1e-6, init, rounds=3, progress=True, names=["Dense_1/kernel"])
    assert max(calls.values()) == 1
    assert qps["Dense_0/kernel"] == -28 and qps["Dense_0/bias"] == -40
    with pytest.raises(InputError):
        ioq_search(params, dist, rate, 1.0, {"nope": -30}, progress=False)
    with pytest.raises(InputError):
        ioq_search(params, dist, rate, 1.0, init, names=["Dense_2/kernel"], progress=False)


def test_custom_quantize_fn_is_used(toy):
    params, dist = toy
    zero = lambda w, qp: jnp.zeros_like(w)  # noqa: E731
    c = ioq_cost(params, {"Dense_0/kernel": -30}, dist, lambda *a: 0.0, 0.0, quantize_fn=zero)
    p0 = jax.tree.map(lambda a: a, params)
    p0["Dense_0"]["kernel"] = jnp.zeros_like(p0["Dense_0"]["kernel"])
    assert c == pytest.approx(dist(p0))


def test_search_with_the_deepcabac_coder_size(toy):
    """The rate is the real coder's payload size: what a user passes to tune QPs for the bitstream."""
    from nncjax.kernels.coder import encode_levels

    from nncjax.quantize.uniform import quantize_uniform
    from nncjax.steps import qp_to_step_jax

    def coded_bits(name, w, qp):
        k, _ = quantize_uniform(w, qp_to_step_jax(qp))
        return 8.0 * len(encode_levels(np.asarray(k), dq=False))

    params, dist = toy
    init = {k: q for k, q in ioq_initial_qps(params, -28).items() if k.endswith("kernel")}
    lam = estimate_lambda(params, init, dist, coded_bits)
    c0 = ioq_cost(params, init, dist, coded_bits, lam)
    qps = ioq_search(params, dist, coded_bits, lam, init, offsets=(-2, -1, 1, 2), rounds=1, progress=False)
    assert ioq_cost(params, qps, dist, coded_bits, lam) < c0


@pytest.mark.parametrize("qp", [31.7, -32.5, np.nan, True, 10**6, 2**70])
def test_qp_to_step_refuses_fractional_and_unrepresentable_qps(qp):
    # a float QP was truncated toward zero (-32.5 -> step of -32), 10**6 gave inf, NaN a raw ValueError
    with pytest.raises(InputError, match="QP"):
        qp_to_step(qp)


def test_steps_refuse_bool_density_and_equivalent_qp_takes_arrays():
    from nncjax.steps import equivalent_qp

    with pytest.raises(InputError, match="qp_density"):
        qp_limits(True)  # was (-64, 63), qp_density 1
    assert equivalent_qp([-75, -32], 0).tolist() == [-19, -8]  # was a raw TypeError
    assert equivalent_qp(-75, 3) == -150


def test_ioq_refuses_bad_qps_lam_and_search_arguments():
    p = {"w": jnp.ones((2, 2))}
    zero, eight = (lambda q: 0.0), (lambda n, w, qp: 8.0)
    with pytest.raises(InputError, match="integers"):
        ioq_cost(p, {"w": -7.5}, zero, eight, 0.5)  # quantized silently at QP -7
    with pytest.raises(InputError, match="lam"):
        ioq_cost(p, {"w": -8}, zero, eight, -1.0)  # the search then maximised the rate
    with pytest.raises(InputError, match="eval_distortion"):
        ioq_search(p, lambda q: np.nan, eight, 0.5, {"w": -8}, progress=False)  # returned init_qps unchanged
    with pytest.raises(InputError, match="rate_bits"):
        ioq_cost(p, {"w": -8}, zero, lambda n, w, qp: np.ones(2), 0.5)
    with pytest.raises(InputError, match="offsets"):
        ioq_search(p, zero, eight, 0.5, {"w": -8}, offsets=(1.5,), progress=False)  # moved by 1
    with pytest.raises(InputError, match="rounds"):
        ioq_search(p, zero, eight, 0.5, {"w": -8}, rounds=2.5, progress=False)
    with pytest.raises(InputError, match="no QP"):
        estimate_lambda(p, {"w": -8}, zero, eight, names=["v"])  # raw KeyError
    with pytest.raises(InputError, match="callable"):
        ioq_cost(p, {"w": -8}, zero, eight, 0.5, quantize_fn=3)
    # integer QPs of any integer type still work; a 0-d JAX QP was unhashable
    assert ioq_cost(p, {"w": jnp.asarray(-8)}, zero, eight, np.float32(0.5)) == 4.0


def test_ioq_initial_qps_refuses_bad_arguments_and_nan_weights():
    p = {"a": jnp.ones((4, 4)) * jnp.arange(4.0), "c": jnp.ones((8, 8))}
    with pytest.raises(InputError, match="base_qp"):
        ioq_initial_qps(p, -31.5)  # was truncated to -31
    with pytest.raises(InputError, match="size_weight"):
        ioq_initial_qps(p, -32, size_weight=np.nan)
    with pytest.raises(InputError, match="NaN"):
        ioq_initial_qps({**p, "a": jnp.full((4, 4), jnp.nan)}, -32)  # silently got the mean spread
    assert ioq_initial_qps(p, -32, size_weight=1e308)["c"] == qp_limits(2)[1]  # OverflowError before
