"""Local scaling adaptation (nncjax.reduce.lsa) on a small digits MLP."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from nncjax.errors import InputError
from nncjax.reduce import apply_local_scales, fit_local_scales, lsa_init, named_leaves, replace_named, scale_rows
from nncjax.steps import qp_to_step


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def _loss(model, params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.fixture(scope="module")
def trained():
    d = load_digits()
    x = jnp.asarray(d.data / 16.0, jnp.float32)
    y = jnp.asarray(d.target, jnp.int32)
    model = MLP()
    params = model.init(jax.random.key(0), x[:1])["params"]
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda q: _loss(model, q, (x, y)))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = opt.init(params)
    for _ in range(150):
        params, state, _ = step(params, state)
    return model, params, (x, y)


def _quantize(params, qp):
    step = np.float32(qp_to_step(qp))
    w = named_leaves(params)
    return replace_named(params, {k: jnp.round(v / step) * step for k, v in w.items() if v.ndim > 1})


def test_lsa_init_and_apply_shapes():
    p = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "Conv_0": {"kernel": jnp.ones((3, 3, 2, 5))}}
    s = lsa_init(p)
    assert {k: v.shape for k, v in s.items()} == {"Conv_0/kernel": (5,), "Dense_0/kernel": (3,)}
    assert all(np.all(np.asarray(v) == 1) for v in s.values())
    s["Conv_0/kernel"] = jnp.arange(5.0)
    out = jax.jit(apply_local_scales)(p, s)
    np.testing.assert_array_equal(out["Conv_0"]["kernel"][1, 2, 1], np.arange(5.0))
    np.testing.assert_array_equal(out["Dense_0"]["bias"], p["Dense_0"]["bias"])
    # NNR layout: rows first.
    np.testing.assert_array_equal(scale_rows(jnp.ones((3, 2)), jnp.array([1.0, 2.0, 3.0]), axis=0)[:, 1], [1, 2, 3])
    assert list(lsa_init(p, ["Dense_0/kernel"])) == ["Dense_0/kernel"]
    with pytest.raises(InputError):
        lsa_init(p, ["Dense_9/kernel"])


def test_lsa_reduces_task_loss_of_quantized_mlp(trained):
    model, params, data = trained
    params_q = _quantize(params, qp=-8)  # step 0.25: a visible loss increase
    loss_fp = float(_loss(model, params, data))
    loss_q = float(_loss(model, params_q, data))
    assert loss_q > loss_fp
    scales = lsa_init(params_q)
    res = fit_local_scales(lambda p, b: _loss(model, p, b), params_q, scales, itertools.repeat(data),
                           optimizer=optax.adam(5e-3), steps=120, progress=False)
    assert res.losses.shape == (120,)
    loss_lsa = float(_loss(model, apply_local_scales(res.params, res.scales), data))
    assert loss_lsa < loss_q - 0.1 * (loss_q - loss_fp)
    # Quantized weights stay frozen; the scales and biases moved.
    for k in ("Dense_0/kernel", "Dense_1/kernel"):
        np.testing.assert_array_equal(named_leaves(res.params)[k], named_leaves(params_q)[k])
        assert float(jnp.max(jnp.abs(res.scales[k] - 1))) > 0
    assert float(jnp.max(jnp.abs(res.params["Dense_1"]["bias"] - params_q["Dense_1"]["bias"]))) > 0


def test_lsa_scales_only_and_short_iterator(trained):
    model, params, data = trained
    params_q = _quantize(params, qp=-8)
    res = fit_local_scales(lambda p, b: _loss(model, p, b), params_q, lsa_init(params_q), [data] * 5,
                           steps=20, progress=True, train_biases=False)
    assert res.losses.shape == (5,)  # stopped when the data ran out
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), res.params, params_q))


def test_local_scales_reject_unknown_names_and_wrong_shapes():
    p = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    with pytest.raises(InputError, match="zz"):
        apply_local_scales(p, {"zz": jnp.ones(2)})
    with pytest.raises(InputError, match="Dense_0/kernel"):
        jax.jit(apply_local_scales)(p, {"Dense_0/kernel": jnp.ones(5)})
    with pytest.raises(InputError, match="shape"):
        scale_rows(jnp.ones((2, 3)), jnp.ones(2))


def test_fit_local_scales_rejects_bad_arguments():
    p = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}

    def loss(pp, b):
        return jnp.mean((b @ pp["Dense_0"]["kernel"] + pp["Dense_0"]["bias"]) ** 2)

    data = [jnp.ones((4, 3))] * 3
    with pytest.raises(InputError, match="zz"):
        fit_local_scales(loss, p, {"zz": jnp.ones(2)}, data, steps=2, progress=False)
    with pytest.raises(InputError, match="steps"):
        fit_local_scales(loss, p, lsa_init(p), data, steps=2.5, progress=False)
    with pytest.raises(InputError, match="data_iter"):
        fit_local_scales(loss, p, lsa_init(p), None, steps=2, progress=False)


def test_a_non_finite_loss_skips_its_step_instead_of_poisoning_the_scales():
    """One batch with a NaN loss used to make every scale and bias NaN for the rest of the training."""
    p = {"Dense_0": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
                     "bias": jnp.zeros(3)}}
    x = jnp.ones((5, 4))

    def loss(q, b):
        y = b @ q["Dense_0"]["kernel"] + q["Dense_0"]["bias"]
        return jnp.mean(y**2) * jnp.where(b[0, 0] > 1, jnp.nan, 1.0)  # NaN on the batch x * 2

    res = fit_local_scales(loss, p, lsa_init(p), [x, x * 2, x, x], steps=4, progress=False)
    assert np.isnan(res.losses[1]) and np.all(np.isfinite(np.delete(np.asarray(res.losses), 1)))
    assert np.all(np.isfinite(res.scales["Dense_0/kernel"])) and np.all(np.isfinite(res.params["Dense_0"]["bias"]))
    skipped = fit_local_scales(loss, p, lsa_init(p), [x, x, x], steps=3, progress=False)  # the same good steps
    np.testing.assert_array_equal(res.scales["Dense_0/kernel"], skipped.scales["Dense_0/kernel"])
