"""nncjax.decode returns ready-to-use weights: local scales applied, folded batch norms mapped back
onto the model's own Flax structure (``like=``); ``raw=True`` gives the coded tensors (nncjax.ready)."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax import models
from nncjax.codec import QPAdjustedWarning, decode, encode, inspect
from nncjax.errors import BitstreamError, InputError
from nncjax.pipeline import CodingLayout, IOQResult, optimize_ioq
from nncjax.ready import scale_rows
from nncjax.reduce import nnr_to_flax

FASHION_PAIRS = [(("conv1",), ("bn1",)), (("conv2",), ("bn2",)), (("conv3",), ("bn3",)), (("fc1",), ("bn4",))]


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        assert np.shape(x) == np.shape(y), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------
# flat


@st.composite
def block_models(draw):
    """A flat model with one block (weight rows-first, LS and/or BI and/or BN members) and a plain tensor."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.integers(1, 9))
    tail = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    roles = draw(st.sets(st.sampled_from(["ls", "bi", "bn"]), min_size=1))
    model = {"head": rng.normal(0, 0.1, (3, 2)).astype(np.float32),
             "w": rng.normal(0, 0.1, (rows,) + tail).astype(np.float32)}
    blk = {}
    if "ls" in roles:
        model["w_scaling"] = rng.uniform(0.25, 4.0, rows).astype(np.float32)
        blk["ls"] = "w_scaling"
    if "bi" in roles:
        model["b"] = rng.normal(0, 0.1, rows).astype(np.float32)
        blk["bi"] = "b"
    if "bn" in roles:
        for r in ("bn_beta", "bn_gamma", "bn_mean", "bn_var"):
            model[r] = rng.uniform(0.5, 1.5, rows).astype(np.float32)
            blk[r] = r
    return model, {"w": blk}


@settings(max_examples=25)
@given(block_models(), st.booleans())
def test_flat_ready_is_raw_with_local_scales_applied(mb, dq):
    model, blocks = mb
    data = encode(model, blocks=blocks, qp=-30, dq=dq)
    raw, ready = decode(data, raw=True), decode(data)
    assert set(raw) == set(model)
    ls = blocks["w"].get("ls")
    assert list(ready) == [n for n in raw if n != ls]  # bitstream order, LS dropped
    for name, arr in ready.items():
        expect = scale_rows(raw["w"], raw[ls]) if (name == "w" and ls) else raw[name]
        assert arr.dtype == expect.dtype == np.float32
        np.testing.assert_array_equal(arr, expect, err_msg=name)


@settings(max_examples=15)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.integers(0, 2))
def test_streams_without_blocks_decode_as_before(seed, dq, scan):
    rng = np.random.default_rng(seed)
    model = {"a": rng.normal(0, 0.1, (5, 7)).astype(np.float32), "b": rng.normal(0, 0.1, 5).astype(np.float32),
             "n": np.arange(4, dtype=np.int32)}
    data = encode(model, qp=-32, dq=dq, scan_order=scan)
    raw, ready = decode(data, raw=True), decode(data)
    assert list(raw) == list(ready)
    for k in raw:
        assert raw[k].dtype == ready[k].dtype
        np.testing.assert_array_equal(raw[k], ready[k])
    back = decode(data, like=model)
    for k in model:
        np.testing.assert_array_equal(back[k], raw[k])


# ------------------------------------------------------------------------------------------------
# onto a model


def test_block_kernel_goes_back_to_flax_layout_with_scales_applied():
    rng = np.random.default_rng(3)
    for shape in [(6, 4), (4, 4), (5, 3, 3, 3)]:  # dense, square dense (layout by name), conv (O, I, kh, kw)
        w = rng.normal(0, 0.1, shape).astype(np.float32)
        ls = rng.uniform(0.5, 2.0, shape[0]).astype(np.float32)
        coded = {"params/d/kernel": w, "params/d/kernel_scaling": ls,
                 "params/d/bias": rng.normal(0, 0.1, shape[0]).astype(np.float32)}
        data = encode(coded, blocks={"params/d/kernel": {"ls": "params/d/kernel_scaling", "bi": "params/d/bias"}})
        raw = decode(data, raw=True)
        like = {"params": {"d": {"kernel": jnp.zeros(nnr_to_flax(w).shape, jnp.bfloat16),
                                 "bias": np.zeros(shape[0], np.float32)}}}
        out = decode(data, like=like)
        k = out["params"]["d"]["kernel"]
        assert isinstance(k, jax.Array) and k.dtype == jnp.bfloat16 and k.shape == like["params"]["d"]["kernel"].shape
        expect = np.asarray(nnr_to_flax(scale_rows(raw["params/d/kernel"], raw["params/d/kernel_scaling"])))
        np.testing.assert_array_equal(np.asarray(k), np.asarray(jnp.asarray(expect, jnp.bfloat16)))
        np.testing.assert_array_equal(out["params"]["d"]["bias"], raw["params/d/bias"])


def test_rows_first_weights_keep_their_layout():
    """PyTorch-style names (``conv.weight``): the like leaf is in the coded layout, nothing is transposed."""
    rng = np.random.default_rng(4)
    model = {"fc.weight": rng.normal(0, 0.1, (4, 4)).astype(np.float32),
             "fc.weight_scaling": rng.uniform(0.5, 2.0, 4).astype(np.float32)}
    data = encode(model, blocks={"fc.weight": {"ls": "fc.weight_scaling"}})
    raw = decode(data, raw=True)
    out = decode(data, like={"fc.weight": model["fc.weight"]})
    np.testing.assert_array_equal(out["fc.weight"], scale_rows(raw["fc.weight"], raw["fc.weight_scaling"]))
    # raw=True with like keeps today's behaviour: names only, LS as coded
    both = decode(data, like=model, raw=True)
    np.testing.assert_array_equal(both["fc.weight_scaling"], raw["fc.weight_scaling"])


class _TinyBN(nn.Module):
    """Conv + BN (Flax's names, found by find_bn_pairs), a biasless Dense + BN with custom names, a Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x)))
        x = nn.Dense(5, use_bias=False, name="fc")(x.reshape(x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="norm")(x))
        return nn.Dense(3)(x)


def _randomise(v, seed):
    rng = np.random.default_rng(seed)
    v = jax.tree_util.tree_map(np.asarray, v)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return rng.uniform(0.2, 3.0, x.shape).astype(x.dtype)
        if name.endswith("['scale']"):
            return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
        return (x + rng.normal(0, 0.2, x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(perturb, v)


@pytest.fixture(scope="module")
def tiny():
    model = _TinyBN()
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 5, 5, 2))
    v = _randomise(model.init(jax.random.PRNGKey(0), x), 0)
    return model.apply, v, x


def _block_stream(v, pairs, seed, **kw):
    """The pipeline's coding layout with random local scales on every kernel, coded with blocks."""
    lay = CodingLayout.build(v, pairs)
    lay = lay.with_scalings([n for n, kind, _ in lay.entries if kind == "kernel"])
    rng = np.random.default_rng(seed)
    coded = {}
    for (name, kind, _), arr in zip(lay.entries, lay.to_coded(v).values()):
        arr = np.asarray(arr, np.float32)
        coded[name] = arr * rng.uniform(0.5, 1.5, arr.shape).astype(np.float32) if kind in ("scaling", "block_ls") \
            else arr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QPAdjustedWarning)
        data = encode(coded, blocks=lay.blocks(), nonweight_qp=-60, **kw)
    return lay, data


def _restore(lay, data):
    res = IOQResult(tensors={}, qp_overrides={}, qp=0, qp_density=2, nonweight_qp=0, dq=True, layout=lay, lam=0.0,
                    wall_s={}, history={})
    return res.restore(decode(data, raw=True))


def test_folded_batchnorm_maps_back_exactly_as_the_pipeline(tiny):
    apply, v, x = tiny
    pairs = [(("Conv_0",), ("BatchNorm_0",)), (("fc",), ("norm",))]
    lay, data = _block_stream(v, pairs, seed=1, qp=-36)
    assert set(lay.blocks()) == {"params/Conv_0/kernel", "params/fc/kernel", "params/Dense_0/kernel"}
    # "auto": Conv_0/BatchNorm_0 by Flax's names, fc/norm as the only folded block of 5 rows
    out = decode(data, like=v)
    assert_trees_equal(out, _restore(lay, data))
    assert_trees_equal(out, decode(data, like=v, bn_pairs=pairs[::-1]))
    # the model's own apply computes the coded model: BN scale = LS, shift = BI, mean 0, unit variance
    raw = decode(data, raw=True)
    assert np.all(out["batch_stats"]["norm"]["mean"] == 0)
    np.testing.assert_array_equal(out["params"]["norm"]["scale"], raw["params/fc/kernel_scaling"])
    np.testing.assert_array_equal(out["params"]["norm"]["bias"], raw["params/fc/bias"])
    np.testing.assert_array_equal(out["params"]["fc"]["kernel"], nnr_to_flax(raw["params/fc/kernel"]))
    y = np.asarray(apply(out, x))
    coded = lay.to_variables({k: jnp.asarray(a) for k, a in raw.items()})
    np.testing.assert_array_equal(y, np.asarray(apply(coded, x)))
    # a layout folding only Conv_0/BatchNorm_0: "norm" travels as plain tensors and maps by name
    lay2, data2 = _block_stream(v, "auto", seed=4)
    assert "params/norm/scale" in decode(data2)
    assert_trees_equal(decode(data2, like=v), _restore(lay2, data2))
    with pytest.raises(InputError, match="'norm'"):
        decode(data2, like=v, bn_pairs=pairs)


def test_plain_kernels_keep_flax_layout(tiny):
    """A pipeline layout without folding or scales codes kernels as they are (only a block's weight is
    rows first, which the stream says): ``like`` then fits without guessing from shapes, and a plain
    tensor that does not fit raises rather than being transposed."""
    _, v, _ = tiny
    lay = CodingLayout.build(v, bn_pairs=None)
    data = encode({k: np.asarray(a) for k, a in lay.to_coded(v).items()}, qp=-36)
    assert decode(data)["params/fc/kernel"].shape == (150, 5)
    assert_trees_equal(decode(data, like=v), _restore(lay, data))
    square = {"d": {"kernel": np.arange(16, dtype=np.float32).reshape(4, 4)}}
    out = decode(encode(square, qp=-40), like=square)
    np.testing.assert_allclose(out["d"]["kernel"], square["d"]["kernel"], atol=0.01)
    with pytest.raises(InputError, match="kernel"):
        decode(encode({"d/kernel": np.ones((3, 2), np.float32)}), like={"d": {"kernel": np.ones((2, 3), np.float32)}})


@st.composite
def bn_variables(draw):
    """Flax variables of Conv_0 (+ bias?) -> BatchNorm_0 (scale? bias?) -> Dense_0, random shapes and values."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k, cin, cout, dout = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 5))

    def f32(*shape, lo=None):
        return (rng.uniform(lo, 2.0, shape) if lo else rng.normal(0, 0.3, shape)).astype(np.float32)

    conv = {"kernel": f32(k, k, cin, cout)}
    if draw(st.booleans()):
        conv["bias"] = f32(cout)
    bn = {}
    if draw(st.booleans()):
        bn["scale"] = f32(cout, lo=0.5)
    if draw(st.booleans()) or "bias" not in conv:  # BI needs a BN shift or a layer bias to live in
        bn["bias"] = f32(cout)
    params = {"Conv_0": conv, "BatchNorm_0": bn, "Dense_0": {"kernel": f32(cout, dout), "bias": f32(dout)}}
    return {"params": params, "batch_stats": {"BatchNorm_0": {"mean": f32(cout), "var": f32(cout, lo=0.2)}}}


class _ConvBNDense(nn.Module):
    conv_bias: bool
    bn_scale: bool
    bn_bias: bool
    features: tuple  # (conv, dense)
    k: int
    with_bn: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features[0], (self.k, self.k), use_bias=self.conv_bias or not self.with_bn)(x)
        if self.with_bn:
            x = nn.BatchNorm(use_running_average=True, use_scale=self.bn_scale, use_bias=self.bn_bias)(x)
        return nn.Dense(self.features[1])(x)  # per position


@settings(max_examples=12)
@given(bn_variables(), st.integers(0, 2**16))
def test_random_folded_models_map_back_as_the_pipeline(v, seed):
    lay, data = _block_stream(v, "auto", seed=seed, qp=-34)
    out = decode(data, like=v)
    assert_trees_equal(out, _restore(lay, data))
    assert np.all(out["batch_stats"]["BatchNorm_0"]["mean"] == 0)
    # independently: the model's own apply on `out` computes conv(x, LS * W) + BI, then the dense layer,
    # with the flat ready tensors (LS applied, BN folded) in a model without BatchNorm
    p = v["params"]
    k, _, _, cout = p["Conv_0"]["kernel"].shape
    cfg = {"conv_bias": "bias" in p["Conv_0"], "bn_scale": "scale" in p["BatchNorm_0"],
           "bn_bias": "bias" in p["BatchNorm_0"], "features": (cout, p["Dense_0"]["kernel"].shape[1]), "k": k}
    flat = decode(data)
    folded = {"params": {"Conv_0": {"kernel": nnr_to_flax(flat["params/Conv_0/kernel"]),
                                    "bias": flat["params/Conv_0/bias"]},
                         "Dense_0": {"kernel": nnr_to_flax(flat["params/Dense_0/kernel"]),
                                     "bias": flat["params/Dense_0/bias"]}}}
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 4, 4, p["Conv_0"]["kernel"].shape[2]))
    np.testing.assert_allclose(np.asarray(_ConvBNDense(**cfg).apply(out, x)),
                               np.asarray(_ConvBNDense(**cfg, with_bn=False).apply(folded, x)), rtol=1e-4, atol=1e-4)


def test_fashion_cnn_block_stream():
    m = models.get("fashion_cnn")
    lay, data = _block_stream(m.params, FASHION_PAIRS, seed=2, qp=-28)
    out = decode(data, like=m.params)  # conv1/bn1 ... by row counts 32, 64, 128, 256
    assert_trees_equal(out, _restore(lay, data))
    flat = decode(data)
    assert not any(k.endswith("_scaling") for k in flat)
    assert flat["params/conv1/kernel"].shape == (32, 1, 3, 3)  # no like: NNR layout, BN stays folded


def test_optimize_ioq_stream(tiny):
    apply, v, x = tiny
    res = optimize_ioq(v, apply, x, lam=1e-3, base_qp=-32, lsa_steps=3, rounds=1,
                       bn_pairs=[(("Conv_0",), ("BatchNorm_0",)), (("fc",), ("norm",))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QPAdjustedWarning)
        data = encode(res.tensors, **res.encode_kwargs())
    out = decode(data, like=v)
    assert_trees_equal(out, res.restore(decode(data, raw=True)))
    # restore also takes the ready flat output (LS in the kernels): the same model up to rounding
    np.testing.assert_allclose(np.asarray(apply(res.restore(decode(data)), x)), np.asarray(apply(out, x)),
                               rtol=1e-5, atol=1e-5)


def test_optimize_streams():
    """nncjax.optimize writes each scaled kernel as a block (W / s rows first, LS = s): ``decode(like=)``
    alone gives the ready model, equal to RDSettings.restore of the raw or the flat ready output."""
    from nncjax.models.digits_mlp import load_digits_split
    from nncjax.optimize import optimize

    m = models.get("digits_mlp")
    calib = jnp.asarray(load_digits_split("train")[0][:64])
    rd = optimize(m.params, m.apply, calib, lam=3e-3, base_qp=-24, steps=2, refine=0)
    data = encode(rd.params_for_encoding(m.params), **rd.encode_kwargs())
    ready = decode(data, like=m.params)
    assert_trees_equal(ready, rd.restore(decode(data, raw=True), like=m.params))
    assert_trees_equal(ready, rd.restore(decode(data), like=m.params))
    assert all(t.payload_type == "BLOCK" for t in inspect(data).tensors if t.name.endswith("/kernel"))


# ------------------------------------------------------------------------------------------------
# errors


def test_like_that_does_not_fit_raises_naming_the_tensor(tiny):
    _, v, _ = tiny
    _, data = _block_stream(v, "auto", seed=3)
    missing = jax.tree_util.tree_map(lambda a: a, v)
    missing["params"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(InputError, match="params/extra/kernel"):
        decode(data, like=missing)
    less = jax.tree_util.tree_map(lambda a: a, v)
    del less["params"]["Dense_0"]
    with pytest.raises(InputError, match="params/Dense_0/(bias|kernel).*no place"):
        decode(data, like=less)
    bad = jax.tree_util.tree_map(lambda a: a, v)
    bad["params"]["Dense_0"]["kernel"] = np.zeros((3, 5), np.float32)
    with pytest.raises(InputError, match="params/Dense_0/kernel"):
        decode(data, like=bad)
    with pytest.raises(InputError, match="bn_pairs"):
        decode(data, like=v, bn_pairs=[(("Dense_0",), ("norm",))])
    with pytest.raises(InputError, match="bn_pairs"):
        decode(data, like=v["params"], bn_pairs=[(("fc",), ("norm",))])
    with pytest.raises(InputError, match="bn_pairs"):
        decode(data, like=v, bn_pairs="Conv_0")
    with pytest.raises(InputError, match="more than once"):
        decode(data, like=v, bn_pairs=[(("Conv_0",), ("BatchNorm_0",)), (("Dense_0",), ("BatchNorm_0",))])
    # without pairing, the folded BatchNorms' leaves have no tensor
    with pytest.raises(InputError, match="batch_stats"):
        decode(data, like=v, bn_pairs=None)


def test_ambiguous_batchnorm_pairing_asks_for_pairs():
    rng = np.random.default_rng(5)

    def f32(*s):
        return rng.normal(0, 0.1, s).astype(np.float32)

    v = {"params": {"a": {"kernel": f32(3, 4)}, "b": {"kernel": f32(4, 4)}, "na": {"scale": f32(4), "bias": f32(4)},
                    "nb": {"scale": f32(4), "bias": f32(4)}},
         "batch_stats": {"na": {"mean": f32(4), "var": f32(4) ** 2 + 1}, "nb": {"mean": f32(4), "var": f32(4) ** 2 + 1}}}
    pairs = [(("a",), ("na",)), (("b",), ("nb",))]
    lay, data = _block_stream(v, pairs, seed=6)
    with pytest.raises(InputError, match="bn_pairs"):
        decode(data, like=v)
    assert_trees_equal(decode(data, like=v, bn_pairs=pairs), _restore(lay, data))


def test_applied_scales_are_named_when_like_wants_them():
    model = {"w": np.ones((2, 3), np.float32), "w_scaling": np.float32([2, 3])}
    data = encode(model, blocks={"w": {"ls": "w_scaling"}})
    with pytest.raises(InputError, match="'w_scaling'.*raw=True"):
        decode(data, like=model)


def test_rank0_block_with_local_scales_is_a_bitstream_error():
    """A hostile stream can declare a block whose weight has no dimensions: no rows for LS to scale."""
    import dataclasses

    from nncjax.kernels.coder import CabacEncoder
    from nncjax.kernels.units import read_units, write_stream

    units = read_units(encode({"w": np.ones((2, 3), np.float32), "w_scaling": np.float32([2, 4])},
                              blocks={"w": {"ls": "w_scaling"}}))
    enc = CabacEncoder(unary_length=11, param_opt=True, capacity=1024)
    for _ in range(2):  # LS, then W: one element each, as tensor_dimensions () declares
        enc.iae_v(8, -32)
        enc.encode_layer(np.array(4, np.int32).reshape(()), dq=True, scan_order=0, row_skipping=True, profile=1)
    ndu = dataclasses.replace(units[-1], tensor_dimensions=(), entry_points=None, payload=enc.finish())
    data = write_stream(units[:-1] + [ndu])
    assert sorted(decode(data, raw=True)) == ["w", "w_scaling"]
    with pytest.raises(BitstreamError, match="'w'.*tensor_dimensions"):
        decode(data)
    with pytest.raises(BitstreamError, match="'w'.*tensor_dimensions"):
        decode(data, like={"w": np.float32(0)})


def test_like_keeps_the_sharding_of_its_leaves():
    """8 host devices in a subprocess (the flag must be set before jax starts): ``decode(like=)`` with
    sharded jax arrays, with ``jax.ShapeDtypeStruct`` carrying shardings, and ``decode_update(like=)``
    return every leaf sharded as ``like``'s (they came back on one device)."""
    from tests._host_devices import run_on_host_devices

    d = run_on_host_devices("_decode_sharded.py", timeout=300)
    assert d["devices"] == 8
    assert d["same"] == {k: {"w": True, "b": True, "s": True} for k in ("decode", "abstract", "update")}
    assert d["max_err"] < 2 * 2 ** (-38 / 4)
