"""Robustness of the rate model (nncjax.rate): every public function given nonsense raises
InputError naming the argument (before: raw JAX / NumPy errors, or silently altered data)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nncjax.errors import InputError
from nncjax.rate import (
    bin_statistics,
    bits_from_statistics,
    estimate_bits,
    estimate_bits_levels,
    estimate_bits_tree,
    trellis_rate_fn,
)

K = jnp.array([[0, 1], [-3, 0]])
W = jnp.linspace(-0.05, 0.05, 64).reshape(8, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"u": jnp.zeros((3,))}, "u must have the shape of k"),           # broadcast error from inside JAX
    ({"u": jnp.zeros((2, 2), jnp.complex64)}, "u must be a real"),    # imaginary part dropped
    ({"u": "x"}, "u must be a real"),
    ({"dq": "no"}, "dq must be True or False"),                        # "no" meant True
    ({"row_skip": "no"}, "row_skip must be True or False"),
    ({"n_gt": True}, "n_gt"), ({"n_gt": 2.0}, "n_gt"), ({"profile": np.float32(1)}, "profile"),
    ({"temperature": float("nan"), "u": jnp.zeros((2, 2))}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
])
def test_bin_statistics_refuses_bad_arguments(kwargs, match):
    kwargs = {"dq": False, **kwargs}
    with pytest.raises(InputError, match=match):
        bin_statistics(K, **kwargs)


@pytest.mark.parametrize("k, match", [
    (jnp.array([0.5, 1.7]), "k must be an integer array"),           # truncated to [0, 1]
    (np.array([True, False]), "k must be an integer array"),         # taken as levels 1, 0
    (np.array([2**40, 0]), "int32 levels"),                          # wrapped to 0
    (np.array([2**32 - 1], np.uint32), "int32 levels"),              # wrapped to -1
    ("abc", "k must be an integer array"), (None, "k must be an integer array"), ([[1], [1, 2]], "k must be"),
])
def test_level_functions_refuse_non_integer_levels(k, match):
    for fn in (lambda k: bin_statistics(k, dq=False), lambda k: estimate_bits_levels(k, dq=False), trellis_rate_fn):
        with pytest.raises(InputError, match=match):
            fn(k)


def test_estimate_bits_levels_checks_options_and_keeps_results():
    assert round(float(estimate_bits_levels(np.array([[0, 1], [-3, 0]], np.int64), dq=False)), 2) == 51.94
    assert float(estimate_bits_levels(K, dq=np.bool_(False))) == float(estimate_bits_levels(K, dq=False))
    for kwargs, match in (({"dq": "no"}, "dq"), ({"dq": False, "param_opt": 1}, "param_opt"),
                          ({"dq": False, "include_qp": None}, "include_qp"),
                          ({"dq": False, "row_skip": "y"}, "row_skip"),
                          ({"dq": False, "qp_density": 9}, "qp_density"), ({"dq": False, "n_gt": 300}, "n_gt")):
        with pytest.raises(InputError, match=match):
            estimate_bits_levels(K, **kwargs)


@pytest.mark.parametrize("x, qp, kwargs, match", [
    (W, -38, {"dq": "no"}, "dq must be True or False"),
    (W, -38, {"training": "no"}, "training must be True or False"),
    (W, -38, {"param_opt": 0}, "param_opt must be True or False"),
    (W, -38, {"row_skip": None}, "row_skip must be True or False"),
    (W, -38, {"include_qp": "yes"}, "include_qp must be True or False"),
    (W, -38, {"n_gt": np.float64(11)}, "n_gt"),
    (W, -38, {"profile": True}, "profile"),
    (W, -38, {"temperature": -1.0}, "temperature"),
    (W, True, {}, "qp must be"),                                       # QP 1 before
    (W, 1 + 2j, {}, "qp must be"),
    (W, "x", {}, "qp must be"),
    (W, None, {}, "qp must be"),
    (W, jnp.array([-38.0, -30.0]), {}, "qp must be one scalar"),
    (W, 10**30, {}, "qp must be an int32"),                            # OverflowError from JAX before
    (W, np.int64(2**40), {}, "qp must be an int32"),                   # wrapped to QP 0
    (W.astype(jnp.complex64), -38, {}, "x must be a real numeric"),   # imaginary part dropped
    (W > 0, -38, {}, "x must be a real numeric"),                     # bools costed as 0 / 1 weights
    ("weights", -38, {}, "x must be a real numeric"),
    (None, -38, {}, "x must be a real numeric"),
])
def test_estimate_bits_refuses_bad_arguments(x, qp, kwargs, match):
    with pytest.raises(InputError, match=match):
        estimate_bits(x, qp, **kwargs)


def test_estimate_bits_checks_survive_transforms_and_keep_results():
    assert round(float(estimate_bits(W, -38)), 1) == 628.5
    assert round(float(estimate_bits(np.asarray(W).tolist(), np.int64(-38))), 1) == 628.5
    assert float(estimate_bits(W, -38, dq=np.bool_(True))) == float(estimate_bits(W, -38))
    # int64 weights beyond int32 were wrapped by jit's argument conversion (2**40 costed as 0)
    assert float(estimate_bits(np.array([2**40]), 20)) != float(estimate_bits(np.array([0]), 20))
    g = jax.jit(jax.grad(lambda w, q: estimate_bits(w, q, training=True), argnums=(0, 1)))(W, -38.0)
    assert np.isfinite(float(g[1]))
    with pytest.raises(InputError, match="training must be True or False"):
        jax.jit(lambda w: estimate_bits(w, -38, training="no"))(W)
    with pytest.raises(InputError, match="qp must be one scalar"):
        jax.jit(lambda w, q: estimate_bits(w, q))(W, jnp.zeros(2))


def test_estimate_bits_tree_names_the_tensor_and_refuses_unknown_options():
    with pytest.raises(InputError, match="unknown options.*trainig"):
        estimate_bits_tree({"w": W}, -38, trainig=True)
    with pytest.raises(InputError, match="^b: x must be a real numeric"):
        estimate_bits_tree({"w": W, "b": jnp.array([True])}, -38)
    with pytest.raises(InputError, match="^w: qp must be"):
        estimate_bits_tree({"w": W}, "x")
    with pytest.raises(InputError, match="dq must be True"):
        estimate_bits_tree({"w": W}, -38, dq="no")


def test_bits_from_statistics_refuses_what_is_no_bin_statistics():
    st = bin_statistics(K, dq=False)
    assert round(float(bits_from_statistics(st)), 2) == 31.94
    assert round(float(bits_from_statistics(dict(st))), 2) == 31.94
    bad = [(None, "BinStats"), ({"sig": st["sig"]}, "BinStats"),
           ({**st, "sig": st["sig"][:3]}, "stats\\['sig'\\] has shape"),
           ({**st, "gt": st["gt"][0]}, "stats\\['gt'\\] has shape"),
           ({**st, "bypass": jnp.float32(jnp.nan)}, "finite counts"),
           ({**st, "sign": -st["sign"]}, "finite counts"),
           ({**st, "rows": np.array(["a", "b"])}, "real numeric")]
    for stats, match in bad:
        with pytest.raises(InputError, match=match):
            bits_from_statistics(stats)
    with pytest.raises(InputError, match="param_opt must be True or False"):
        bits_from_statistics(st, param_opt="no")
    # under jit the values are not read: the shapes still are
    assert np.isfinite(float(jax.jit(bits_from_statistics)(st)))
    with pytest.raises(InputError, match="has shape"):
        jax.jit(bits_from_statistics)({**st, "prefix": st["prefix"][:5]})


def test_trellis_rate_fn_checks_max_level_and_rate_arguments():
    k = jnp.array([0, 2, -2, 0, 1, 0, 0, 4])
    for max_level in (0, -1, 2.0, True, 2**40):
        with pytest.raises(InputError, match="max_level"):
            trellis_rate_fn(k, max_level=max_level)
    with pytest.raises(InputError, match="dq must be True or False"):
        trellis_rate_fn(k, dq="no")
    rate = trellis_rate_fn(k)
    assert rate(jnp.array([0, 1, 3]), jnp.array([0, 0, 0])).shape == (3,)
    for absq, state, match in ((jnp.array([1.5]), jnp.array([0]), "absq must be an integer"),
                               (jnp.array([1]), jnp.array([0.0]), "state must be an integer"),
                               (jnp.array([-1]), jnp.array([0]), "absq must be >= 0"),     # wrapped to the table end
                               (jnp.array([1]), jnp.array([8]), "state must be in 0..7"),
                               (jnp.array([1, 2]), jnp.array([0, 1, 2]), "do not broadcast")):
        with pytest.raises(InputError, match=match):
            rate(absq, state)
    # traced: dtypes and shapes are still checked, values are not read
    out = jax.jit(rate)(jnp.array([0, 5]), jnp.array([0, 7]))
    assert out.shape == (2,) and np.all(np.isfinite(out))


def test_calibration_build_checks_runs():
    from nncjax.rate.calibration import build  # numba is a dependency: no skip
    for runs in (0, -3, 2.5, True, "24"):
        with pytest.raises(InputError, match="runs"):
            build(runs)
