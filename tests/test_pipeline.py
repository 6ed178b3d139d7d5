"""nncjax.pipeline: BN folding + IOQ + LSA as one encoder pipeline, measured through real bitstreams."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nncjax import models
from nncjax.codec import QPAdjustedWarning, decode, encode, inspect
from nncjax.errors import InputError
from nncjax.models.digits_mlp import load_digits_split
from nncjax.pipeline import (
    CodingLayout,
    codec_reconstruct,
    coded_tensor_bits,
    optimize_ioq,
)
from nncjax.steps import equivalent_qp


class _TinyBN(nn.Module):
    """Conv + BatchNorm + ReLU, then Dense: Flax's automatic names, so pairs are found by find_bn_pairs."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=True)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def tiny_bn():
    model = _TinyBN()
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 6, 6, 2))
    v = model.init(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(0)
    # non-trivial BN statistics and affine parameters, so folding has something to fold
    v = jax.tree_util.tree_map(np.asarray, v)
    v["batch_stats"]["BatchNorm_0"]["mean"] = rng.normal(0, 0.3, 8).astype(np.float32)
    v["batch_stats"]["BatchNorm_0"]["var"] = rng.uniform(0.2, 3.0, 8).astype(np.float32)
    v["params"]["BatchNorm_0"]["scale"] = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    v["params"]["BatchNorm_0"]["bias"] = rng.normal(0, 0.3, 8).astype(np.float32)
    return model.apply, v, x


def test_layout_round_trip_folds_bn_exactly(tiny_bn):
    apply, v, x = tiny_bn
    lay = CodingLayout.build(v)  # "auto" pairs Conv_0 with BatchNorm_0
    coded = lay.to_coded(v)
    assert list(coded) == ["params/Conv_0/kernel", "params/Conv_0/kernel_scaling", "params/Conv_0/bias",
                           "params/Dense_0/bias", "params/Dense_0/kernel"]
    assert coded["params/Conv_0/kernel"].shape == (8, 2, 3, 3)  # NNR layout: output rows first
    assert coded["params/Dense_0/kernel"].shape == (288, 4)  # unscaled kernels stay in Flax layout
    back = lay.to_variables(coded)
    np.testing.assert_allclose(apply(back, x), apply(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pairs", [[("Conv_0", "BatchNorm_0")], [(("Conv_0",), ("BatchNorm_0",))],
                                   [["Conv_0", "BatchNorm_0"]]])
def test_layout_takes_bn_pairs_as_str_or_tuple_paths(tiny_bn, pairs):
    # a str path was split into letters: ('C', 'o', 'n', 'v', '_', '0')
    _, v, _ = tiny_bn
    assert CodingLayout.build(v, bn_pairs=pairs).entries == CodingLayout.build(v).entries


@pytest.mark.parametrize("pairs", ["Conv_0/BatchNorm_0", [("Conv_0",)], 5])
def test_layout_refuses_bn_pairs_that_are_not_pairs(tiny_bn, pairs):
    _, v, _ = tiny_bn
    with pytest.raises(InputError, match="pair"):
        CodingLayout.build(v, bn_pairs=pairs)


def test_layout_without_folding_is_the_identity(tiny_bn):
    apply, v, x = tiny_bn
    lay = CodingLayout.build(v, bn_pairs=None)
    assert {kind for _, kind, _ in lay.entries} == {"kernel", "leaf"}
    np.testing.assert_array_equal(apply(lay.to_variables(lay.to_coded(v)), x), apply(v, x))
    with pytest.raises(InputError):
        lay.to_variables({})


def test_codec_view_matches_real_round_trip():
    w = np.random.default_rng(0).normal(0, 0.05, (16, 24)).astype(np.float32)
    data = encode({"w": w}, qp=-28)
    np.testing.assert_array_equal(codec_reconstruct(w, -28), decode(data)["w"])
    bits = coded_tensor_bits(w, -28)
    assert bits // 8 <= len(data) <= bits // 8 + 64  # payload plus a few header bytes


@pytest.mark.parametrize("allocation", ["ioq", "sensitivity"])
def test_bn_pipeline_end_to_end(tiny_bn, allocation):
    apply, v, x = tiny_bn
    res = optimize_ioq(v, apply, x, lam=1e-3, allocation=allocation, base_qp=-32, lsa_steps=10, rounds=1)
    assert "batch_stats/BatchNorm_0/mean" not in res.tensors  # folded away
    assert set(res.qp_overrides) == set(res.tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QPAdjustedWarning)
        data = encode(res.tensors, **res.encode_kwargs())
    # The folded layer travels as one NNR_PT_BLOCK unit (weight, local scales LS, bias BI); a
    # scaled kernel without batch norm as a block of weight and LS.
    blocks = res.encode_kwargs()["blocks"]
    assert {w: set(m) for w, m in blocks.items()} == {"params/Conv_0/kernel": {"ls", "bi"},
                                                      "params/Dense_0/kernel": {"ls"}}
    kinds = {t.name: t.payload_type for t in inspect(data).tensors}
    assert {kinds[n] for w, m in blocks.items() for n in [w, *m.values()]} == {"BLOCK"}
    v_hat = res.restore(decode(data, raw=True))
    np.testing.assert_array_equal(np.asarray(apply(decode(data, like=v), x)), np.asarray(apply(v_hat, x)))
    y, y_hat = np.asarray(apply(v, x)), np.asarray(apply(v_hat, x))
    rel = float(np.mean((y - y_hat) ** 2) / np.var(y))
    assert rel < 0.05
    assert res.wall_s["total"] >= res.wall_s["alloc"] > 0


@pytest.mark.parametrize("qp_density", [0, 5])
def test_default_qps_keep_their_steps_at_every_qp_density(tiny_bn, qp_density):
    """base_qp / nonweight_qp default to steps (2**-8, 2**-18.75), not numbers: -75 at qp_density 0 was
    out of range, at 5 a step of 0.2 for every bias."""
    apply, v, x = tiny_bn
    res = optimize_ioq(v, apply, x, lam=1e-3, qp_density=qp_density, lsa_steps=5, rounds=1)
    assert (res.qp, res.nonweight_qp) == (equivalent_qp(-32, qp_density), equivalent_qp(-75, qp_density))
    data = encode(res.tensors, **res.encode_kwargs())
    y, y_hat = np.asarray(apply(v, x)), np.asarray(apply(decode(data, like=v), x))
    assert float(np.mean((y - y_hat) ** 2) / np.var(y)) < 0.05


@pytest.mark.parametrize("allocation", ["ioq", "sensitivity"])
def test_digits_pipeline_beats_uniform_at_equal_accuracy(allocation):
    m = models.get("digits_mlp")
    x = jnp.asarray(load_digits_split("train")[0][:256])
    uniform = encode(m.params, qp=-20)
    acc_uniform = m.eval(decode(uniform, like=m.params))["top1"]
    res = optimize_ioq(m.params, m.apply, x, lam=1e-2, allocation=allocation, base_qp=-20, ls_qp=-40,
                       lsa_steps=100)
    data = encode(res.tensors, **res.encode_kwargs())
    acc = m.eval(decode(data, like=m.params))["top1"]  # LS applied, no encoder-side object needed
    assert len(data) < 0.8 * len(uniform)
    assert acc >= acc_uniform - 2 / 360  # within two of the 360 test images
    assert acc >= 0.97


def _table_model():
    """A 2-D leaf that is not a kernel (rows on axis 0, all exercised by dense inputs) and a kernel."""
    rng = np.random.default_rng(3)
    v = {"params": {"table": (rng.normal(0, 1, (6, 12)) * np.linspace(0.2, 3, 6)[:, None]).astype(np.float32),
                    "out": {"kernel": rng.normal(0, 0.3, (12, 5)).astype(np.float32)}}}

    def apply(variables, x):
        p = variables["params"]
        return jnp.tanh(x @ p["table"]) @ p["out"]["kernel"]

    return apply, v, jnp.asarray(rng.normal(0, 1, (64, 6)), jnp.float32)


def test_layout_scales_a_leaf_along_axis_0():
    _, v, _ = _table_model()
    lay = CodingLayout.build(v, bn_pairs=None).with_scalings(["params/table", "params/out/kernel"])
    coded = lay.to_coded(v)
    assert coded["params/table"].shape == (6, 12) and coded["params/table_scaling"].shape == (6,)
    assert coded["params/out/kernel"].shape == (5, 12) and coded["params/out/kernel_scaling"].shape == (5,)
    s = jnp.arange(1.0, 7.0)
    coded["params/table"] = coded["params/table"] / s[:, None]
    coded["params/table_scaling"] = s
    np.testing.assert_allclose(lay.to_variables(coded)["params"]["table"], v["params"]["table"], rtol=1e-6)


@pytest.mark.parametrize("names, match", [
    ("params/out/kernel", "list of tensor names"),  # was matched by substring: "params/out/kernel" in the string
    (["params/out/kernal"], "not tensors of this layout"),
    (None, "list of tensor names"),
])
def test_layout_with_scalings_checks_names(names, match):
    _, v, _ = _table_model()
    with pytest.raises(InputError, match=match):
        CodingLayout.build(v, bn_pairs=None).with_scalings(names)


def test_sensitivity_allocation_codes_what_it_evaluated():
    """With no LSA, the D the pipeline reports is the D of the real decoded model: the per-row
    scales of a scaled leaf travel as its own LS tensor and decode(like=) applies them."""
    apply, v, x = _table_model()
    res = optimize_ioq(v, apply, x, lam=3e-3, allocation="sensitivity", bn_pairs=None, base_qp=-30, ls_qp=-44,
                       lsa_steps=0)
    assert {"params/table_scaling", "params/out/kernel_scaling"} <= set(res.tensors)
    s = res.tensors["params/table_scaling"]
    assert np.ptp(s) > 0  # rows of different magnitude got different steps
    data = encode(res.tensors, **res.encode_kwargs())
    y, y_hat = apply(v, x), apply(decode(data, like=v), x)
    d_real = float(jnp.mean((y_hat - y) ** 2) / jnp.var(y))
    np.testing.assert_allclose(d_real, res.history["d_alloc"], rtol=1e-4)
    assert res.history["weight_qps"].keys() == {"params/table", "params/out/kernel"}


def test_sensitivity_pipeline_with_gptq_codes_what_it_evaluated():
    """With input moments the kernel switches to GPTQ without DQ (its LS member follows it in the
    same unit), and the reported D is still the real decoded model's."""
    apply, v, x = _table_model()
    hidden = np.asarray(jnp.tanh(x @ v["params"]["table"]), np.float64)
    h = {"params/out/kernel": hidden[:32].T @ hidden[:32] / 32}
    check = {"params/out/kernel": hidden[32:].T @ hidden[32:] / 32}
    res = optimize_ioq(v, apply, x, lam=3e-3, allocation="sensitivity", bn_pairs=None, base_qp=-30, ls_qp=-44,
                       lsa_steps=0, moments=h, check_moments=check)
    assert res.dq_overrides == {"params/out/kernel": False}
    data = encode(res.tensors, **res.encode_kwargs())
    units = {t.name: t.dq for t in inspect(data).tensors}
    assert units["params/out/kernel"] is False and units["params/out/kernel_scaling"] is False
    assert units["params/table"] is True
    y, y_hat = apply(v, x), apply(decode(data, like=v), x)
    d_real = float(jnp.mean((y_hat - y) ** 2) / jnp.var(y))
    np.testing.assert_allclose(d_real, res.history["d_alloc"], rtol=1e-4)
    with pytest.raises(InputError, match="allocation='sensitivity'"):
        optimize_ioq(v, apply, x, lam=3e-3, bn_pairs=None, moments=h)


def test_sensitivity_pipeline_refuses_bad_moments():
    """Moments that are no mapping were a raw TypeError (or a NumPy truth-value error); check moments
    under a name no weight has were ignored, the error checked on the fitted moments instead."""
    apply, v, x = _table_model()
    hidden = np.asarray(jnp.tanh(x @ v["params"]["table"]), np.float64)
    h = hidden.T @ hidden / len(hidden)
    kw = {"lam": 3e-3, "allocation": "sensitivity", "bn_pairs": None, "lsa_steps": 0}
    for bad in ([h], h):
        with pytest.raises(InputError, match="must map tensor names"):
            optimize_ioq(v, apply, x, moments=bad, **kw)
    with pytest.raises(InputError, match=r"check_moments name tensors that settings does not optimise: \['out/k"):
        optimize_ioq(v, apply, x, moments={"params/out/kernel": h}, check_moments={"out/kernel": h}, **kw)
    with pytest.raises(InputError, match="check_moments without moments"):  # GPTQ was silently left out
        optimize_ioq(v, apply, x, check_moments={"params/out/kernel": h}, **kw)


def test_input_errors(tiny_bn):
    apply, v, x = tiny_bn
    with pytest.raises(InputError, match="allocation"):
        optimize_ioq(v, apply, x, lam=1e-3, allocation="greedy")
    with pytest.raises(InputError, match="lam > 0"):
        optimize_ioq(v, apply, x, lam=0.0, allocation="sensitivity")
    with pytest.raises(InputError):
        optimize_ioq(v, apply, x, lam=-1.0)
    with pytest.raises(InputError):
        optimize_ioq(v, apply, x, lam=1e-3, base_qp=1000)
    with pytest.raises(InputError):
        optimize_ioq(v, apply, [], lam=1e-3)
    with pytest.raises(InputError):
        CodingLayout.build({"w": np.ones((2, 2))})


class _MLPWithIndex(nn.Module):
    """An MLP whose output columns are permuted by an integer parameter, beside a 2-D integer table and
    a bool mask: leaves the codec codes losslessly."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4)(nn.relu(nn.Dense(16)(x)))
        idx = self.param("idx", lambda k: jnp.array([3, 2, 1, 0], jnp.int32))
        table = self.param("table", lambda k: jnp.arange(6, dtype=jnp.int32).reshape(2, 3))
        mask = self.param("mask", lambda k: jnp.array([True, False, True, True]))
        return jnp.where(mask, y[:, idx], 0.0) + jnp.sum(table)


@pytest.mark.parametrize("allocation", ["ioq", "sensitivity"])
def test_integer_and_bool_leaves_pass_through_exactly(allocation):
    m = _MLPWithIndex()
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
    v = m.init(jax.random.PRNGKey(1), x)
    # the model also returns a bool output: D counts it as 0 / 1 (it used to raise a raw TypeError);
    # outputs are y + sum(table) = y + 15, so "> 15" varies (a constant leaf has no relative MSE)
    res = optimize_ioq(v, lambda p, b: (m.apply(p, b), m.apply(p, b) > 15), x, lam=1e-3, allocation=allocation,
                       lsa_steps=5)
    for n in ("params/idx", "params/table", "params/mask"):
        assert res.tensors[n].dtype == np.asarray(v["params"][n[7:]]).dtype and n not in res.qp_overrides
    data = encode(res.tensors, **res.encode_kwargs())
    for v_hat in (decode(data, like=v), res.restore(decode(data, raw=True))):
        for k in ("idx", "table", "mask"):
            assert np.asarray(v_hat["params"][k]).dtype == np.asarray(v["params"][k]).dtype
            np.testing.assert_array_equal(v_hat["params"][k], v["params"][k])


def test_lsa_is_dropped_where_it_raises_d():
    # weights and outputs 100x smaller than usual and biases of 1e-3: five steps of Adam at 1e-3
    # move the biases by their own size, and D after LSA was 2,500x D before it
    m = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
    v = jax.tree_util.tree_map(lambda a: a * 1e-2, m.init(jax.random.PRNGKey(1), x))
    v["params"]["layers_0"]["bias"] = jnp.full((16,), 1e-3)
    res = optimize_ioq(v, m.apply, x, lam=1e-3, lsa_steps=5)
    assert not res.history["lsa_kept"] and res.history["d_lsa"] == res.history["d_alloc"]
    v_hat = decode(encode(res.tensors, **res.encode_kwargs()), like=v)
    y, y_hat = m.apply(v, x), m.apply(v_hat, x)
    d = float(jnp.mean((y - y_hat) ** 2) / jnp.var(y))
    assert d == pytest.approx(res.history["d_alloc"], rel=1e-3)
    assert optimize_ioq(v, m.apply, x, lam=1e-3, lsa_steps=200).history["lsa_kept"]  # enough steps help


class _PreActivation(nn.Module):
    """BatchNorm before the convolution (a pre-activation block): Flax's names still pair Conv_0 with
    BatchNorm_0, and the channel counts agree."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(nn.relu(nn.BatchNorm(use_running_average=True)(x)))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_auto_pairs_only_batch_norms_that_take_their_layers_output(tiny_bn):
    m = _PreActivation()
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6, 6, 8))
    v = m.init(jax.random.PRNGKey(1), x)
    assert CodingLayout.build(v).pairs  # by name alone it would fold the BatchNorm into the wrong side
    apply, v_post, x_post = tiny_bn
    for f in (m.apply, jax.jit(m.apply)):
        res = optimize_ioq(v, f, x, lam=1e-3, lsa_steps=0)
        assert res.layout.pairs == ()
        v_hat = decode(encode(res.tensors, **res.encode_kwargs()), like=v)
        np.testing.assert_allclose(m.apply(v_hat, x), m.apply(v, x), atol=0.2)
    for f in (apply, jax.jit(apply)):  # Conv -> BatchNorm still folds
        assert len(optimize_ioq(v_post, f, x_post, lam=1e-3, lsa_steps=0).layout.pairs) == 1


def test_lam_scalar_types_and_non_finite_data(tiny_bn):
    apply, v, x = tiny_bn
    for lam in (np.float32(1e-3), np.float64(1e-3), jnp.float32(1e-3), np.int64(0)):
        assert optimize_ioq(v, apply, x, lam=lam, lsa_steps=0).lam == pytest.approx(float(lam))
    for lam in (True, np.array([1e-3]), 1e-3 + 0j, float("nan"), "0.001"):
        with pytest.raises(InputError, match="lam must be a finite real number"):
            optimize_ioq(v, apply, x, lam=lam)
    with pytest.raises(InputError, match="outputs on batch 1 contain NaN"):
        optimize_ioq(v, apply, [x, x.at[0, 0, 0, 0].set(jnp.nan)], lam=1e-3)
