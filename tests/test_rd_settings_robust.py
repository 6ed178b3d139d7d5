"""Robustness of nncjax.rd_settings (RDSettings, rows_axis, verify) and nncjax.ready: hostile or unusual
input raises a typed InputError naming what is wrong, never a raw Python / NumPy error, a silently
scrambled tensor or an infinity; valid input gives the results it gave before.

Realistic settings come from ``nncjax.optimize(..., init="sensitivity", steps=0)`` on a tiny Flax model
(Conv, BatchNorm with batch_stats, Embed, Dense); hand-built settings probe inconsistent fields.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st

import nncjax
from nncjax.codec import decode, encode
from nncjax.errors import BitstreamError, InputError
from nncjax.rd_settings import LS_SUFFIX, RDSettings, rows_axis, verify
from nncjax.ready import BlockRoles, block_roles, cast_leaf, map_onto, ready_flat, recompose_low_rank, scale_rows
from nncjax.steps import qp_to_step

K = "params/fc1/kernel"


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, tok):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = nn.BatchNorm(use_running_average=True, name="bn")(h)
        h = h.reshape(h.shape[0], -1)
        e = nn.Embed(6, 5, name="emb")(tok).mean(1)
        h = nn.Dense(7, name="fc1")(jnp.concatenate([h, e], -1))
        return nn.Dense(3, name="fc2")(nn.relu(h))


@pytest.fixture(scope="module")
def tiny():
    """``(numpy variables, apply, batch, settings)``: settings with local scales on the conv and both
    Dense kernels (along their output axis) and on the embedding (along its rows)."""
    m = Tiny()
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 4, 4, 2))
    tok = jnp.tile(jnp.arange(6), (8, 1))
    v = m.init(jax.random.PRNGKey(0), x, tok)
    v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(lambda a: a + 0.3, v["batch_stats"])}
    v = jax.tree_util.tree_map(np.asarray, v)
    apply = lambda p, b: m.apply(p, *b)  # noqa: E731
    rd = nncjax.optimize(v, apply, (x, tok), lam=3e-3, init="sensitivity", steps=0, progress=False)
    assert set(rd.local_scales) == {K, "params/fc2/kernel", "params/conv/kernel", "params/emb/embedding"}
    return v, apply, (x, tok), rd


def _with_scales(rd, name, s):
    return dataclasses.replace(rd, local_scales={**rd.local_scales, name: s})


def _leaves_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------
# valid input: unchanged results (regression guards)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.float64])
@pytest.mark.parametrize("frozen", [False, True])
def test_restore_raw_and_ready_equal_decode_like_for_every_float_dtype(tiny, dtype, frozen):
    v, _, _, rd = tiny
    p = jax.tree_util.tree_map(lambda a: a.astype(dtype), v)
    p = FrozenDict(p) if frozen else p
    res = verify(p, rd)
    assert type(res.params) is type(p)
    for got in (rd.restore(decode(res.bitstream, raw=True), like=p), rd.restore(decode(res.bitstream), like=p),
                decode(res.bitstream, like=p, bn_pairs=None)):
        _leaves_equal(got, res.params)
    flat = rd.params_for_encoding(p)
    assert flat[K].dtype == np.float32 and flat[K].shape == (7, 69)          # W / s, rows first
    assert flat["params/fc1/bias"].dtype == np.dtype(dtype)                   # unscaled leaves as given


def test_restore_keeps_jax_leaves_and_verify_takes_jax_params(tiny):
    v, apply, batch, rd = tiny
    pj = jax.tree_util.tree_map(jnp.asarray, v)
    res = verify(pj, rd, lambda p: float(jnp.mean(apply(p, batch))))
    assert np.isfinite(res.metric)
    out = rd.restore(decode(res.bitstream, raw=True), like=pj)
    assert isinstance(out["params"]["fc1"]["kernel"], jax.Array)
    _leaves_equal(out, res.params)


def test_0d_empty_and_integer_leaves_next_to_scaled_ones(tiny):
    v, _, _, rd = tiny
    p = {"params": {**v["params"], "temp": np.float32(0.7), "empty": np.zeros((0, 3), np.float32),
                    "step": np.int64(5)}, "batch_stats": v["batch_stats"]}
    res = verify(p, rd)
    out = rd.restore(decode(res.bitstream, raw=True), like=p)
    _leaves_equal(out, res.params)
    assert np.shape(out["params"]["temp"]) == () and abs(float(out["params"]["temp"]) - 0.7) < 1e-4
    assert out["params"]["empty"].shape == (0, 3) and out["params"]["step"] == 5


def test_negative_scales_are_valid_and_round_trip(tiny):
    # acceptable: a negative local scale codes and decodes exactly like its positive twin (sign in LS)
    v, _, _, rd = tiny
    neg = _with_scales(rd, K, -np.asarray(rd.local_scales[K]))
    a, b = verify(v, rd).params, verify(v, neg).params
    np.testing.assert_allclose(a["params"]["fc1"]["kernel"], b["params"]["fc1"]["kernel"], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# local scales


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0])
def test_non_finite_or_zero_scales_are_named(tiny, bad):
    v, _, _, rd = tiny
    s = np.array(rd.local_scales[K])
    s[2] = bad
    settings_ = _with_scales(rd, K, s)
    # old: NaN / inf rows went to the codec, whose error blamed the weight tensor (or silently none)
    with pytest.raises(InputError, match=r"local_scales\['params/fc1/kernel'\] holds NaN, infinite or zero"):
        settings_.params_for_encoding(v)
    with pytest.raises(InputError, match="holds NaN, infinite or zero"):
        settings_.row_scales(K, (69, 7))


@pytest.mark.parametrize("kind", ["bool", "complex", "str"])
def test_non_real_scales_are_refused(tiny, kind):
    v, _, _, rd = tiny
    s = {"bool": np.ones(7, bool), "complex": np.ones(7) * (1 + 1j), "str": np.array(["1"] * 7)}[kind]
    # old: bool read as 1.0, complex silently lost its imaginary part, str raised a raw ValueError
    with pytest.raises(InputError, match=r"local_scales\['params/fc1/kernel'\] must be real numbers"):
        _with_scales(rd, K, s).params_for_encoding(v)


def test_integer_scales_are_read_as_floats(tiny):
    v, _, _, rd = tiny
    flat = _with_scales(rd, K, np.full(7, 2, np.int64)).params_for_encoding(v)
    np.testing.assert_array_equal(flat[K + LS_SUFFIX], np.full(7, 2.0, np.float32))
    np.testing.assert_array_equal(flat[K], (v["params"]["fc1"]["kernel"] / 2).T)


def test_tiny_scales_overflowing_float32_are_named(tiny):
    v, _, _, rd = tiny
    # old: W / 1e-40 became inf (RuntimeWarning) and the codec blamed the weight for holding Inf
    with pytest.raises(InputError, match=r"'params/fc1/kernel' divided by its local scales .* overflows float32"):
        _with_scales(rd, K, np.full(7, 1e-40)).params_for_encoding(v)


def test_scales_of_another_model_are_named(tiny):
    v, _, _, rd = tiny
    with pytest.raises(InputError, match="has 7 rows: settings of another model"):
        _with_scales(rd, K, np.ones(8, np.float32)).params_for_encoding(v)
    p = {"params": {**v["params"], "fc1": {"kernel": np.ones((69, 8), np.float32), "bias": np.ones(8, np.float32)}},
         "batch_stats": v["batch_stats"]}
    with pytest.raises(InputError, match="has 8 rows"):
        rd.params_for_encoding(p)
    with pytest.raises(InputError, match=r"params lack the scaled tensors \['params/fc1/kernel'\]"):
        rd.params_for_encoding({"params": {k: x for k, x in v["params"].items() if k != "fc1"}})


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_scaling_an_integer_tensor_is_refused_up_front(tiny, dtype):
    v, _, _, rd = tiny
    p = {"params": {**v["params"], "fc1": {"kernel": np.ones((69, 7), dtype), "bias": v["params"]["fc1"]["bias"]}},
         "batch_stats": v["batch_stats"]}
    # old: coded as floats W / s, and only decoding found "decoded values are not integers"
    with pytest.raises(InputError, match=f"settings scale 'params/fc1/kernel', a tensor of dtype {np.dtype(dtype)}"):
        rd.params_for_encoding(p)


def test_scaling_a_0d_tensor_is_refused(tiny):
    v, _, _, rd = tiny
    p = {"params": {**v["params"], "fc1": {"kernel": np.float32(1.0), "bias": v["params"]["fc1"]["bias"]}}}
    # old: ZeroDivisionError (integer modulo by zero) in row_shape
    with pytest.raises(InputError, match="a 0-d tensor: local scales need a tensor with rows"):
        _with_scales(rd, K, np.ones(1, np.float32)).params_for_encoding(p)


def test_a_tensor_named_like_the_scales_is_not_overwritten(tiny):
    v, _, _, rd = tiny
    p = {"params": {**v["params"], "fc1": {**v["params"]["fc1"], "kernel_scaling": np.ones(7, np.float32)}}}
    # old: the model's own tensor and the local scales silently overwrote one another
    with pytest.raises(InputError, match="params already hold a tensor 'params/fc1/kernel_scaling'"):
        rd.params_for_encoding(p)
    # params_for_encoding's output passed again (scales applied twice)
    with pytest.raises(InputError, match="already hold a tensor"):
        rd.params_for_encoding(rd.params_for_encoding(v))


# ------------------------------------------------------------------------------------------------
# scale_axis, rows_axis, row_scales


@pytest.mark.parametrize("axis", [1, -2, 2, True, 0.0, None, "0"])
def test_scale_axis_must_be_minus_one_or_zero(tiny, axis):
    v, _, _, rd = tiny
    # old: every other value silently acted as 0 (and skipped the Flax-kernel check for 1, 2, ...)
    with pytest.raises(InputError, match=r"scale_axis \(-1: Flax, 0: NNR layout\) must be an integer in \[-1, 0\]"):
        rows_axis(K, 2, axis)
    with pytest.raises(InputError, match="scale_axis"):
        dataclasses.replace(rd, scale_axis=axis).params_for_encoding(v)


@pytest.mark.parametrize("name, ndim, match", [(3, 2, "name must be a tensor name"), (None, 2, "name must be"),
                                               (K, -1, "ndim must be an integer >= 0"), (K, 2.0, "ndim must"),
                                               (K, True, "ndim must")])
def test_rows_axis_checks_its_arguments(name, ndim, match):
    # old: AttributeError for a non-str name; ndim 2.0 returned the float axis 1.0
    with pytest.raises(InputError, match=match):
        rows_axis(name, ndim)


@pytest.mark.parametrize("shape", [7, (-3,), (3.5,), ("a", 2), None])
def test_row_scales_checks_the_shape(tiny, shape):
    _, _, _, rd = tiny
    # old: TypeError / ValueError from len() or np.ones
    with pytest.raises(InputError, match="shape"):
        rd.row_scales("params/fc1/bias", shape)


def test_row_scales_takes_any_integer_sequence(tiny):
    _, _, _, rd = tiny
    np.testing.assert_array_equal(rd.row_scales(K, np.array([69, 7])), rd.local_scales[K])
    assert rd.row_scales("x", ()).tolist() == [1.0]


@pytest.mark.parametrize("field, value, match", [
    ("qp_overrides", None, "RDSettings.qp_overrides must be a mapping"),
    ("local_scales", None, "RDSettings.local_scales must be a mapping"),
    ("local_scales", [K], "RDSettings.local_scales must be a mapping"),
    ("dq_overrides", [K], "RDSettings.dq_overrides must be a mapping"),
    ("local_scales", {3: np.ones(2)}, r"local_scales keys must be tensor names \(str\)"),
])
def test_hand_built_settings_with_fields_of_the_wrong_type(tiny, field, value, match):
    v, _, _, rd = tiny
    bad = dataclasses.replace(rd, **{field: value})
    # old: TypeError from dict() / iteration, or a str + int concatenation
    for call in (bad.encode_kwargs, lambda: bad.params_for_encoding(v), lambda: bad.restore({})):
        with pytest.raises(InputError, match=match):
            call()


def test_inconsistent_hand_built_settings_are_named_by_the_codec(tiny):
    # qp_overrides / dq_overrides naming unknown tensors: nncjax.encode names them (no change needed)
    v, _, _, rd = tiny
    with pytest.raises(InputError, match="dq_overrides key 'nope' matches no float tensor"):
        verify(v, dataclasses.replace(rd, dq_overrides={"nope": False}))
    with pytest.raises(InputError, match="is a local-scale tensor"):
        verify(v, dataclasses.replace(rd, qp_overrides={**rd.qp_overrides, "params/fc1/bias_scaling": -24}))
    for q in (True, -25.0, 1000):
        with pytest.raises(InputError, match=r"qp_overrides\['params/fc1/kernel'\] must be an integer"):
            verify(v, dataclasses.replace(rd, qp_overrides={**rd.qp_overrides, K: q}))
    # scales without a QP of their own are coded at nonweight_qp: valid
    qps = {n: q for n, q in rd.qp_overrides.items() if n != K + LS_SUFFIX}
    assert verify(v, dataclasses.replace(rd, qp_overrides=qps)).nbytes > 0


# ------------------------------------------------------------------------------------------------
# restore


@pytest.fixture(scope="module")
def coded(tiny):
    v, _, _, rd = tiny
    data = encode(rd.params_for_encoding(v), **rd.encode_kwargs())
    return data, decode(data, raw=True), decode(data)


@pytest.mark.parametrize("decoded", [None, [1, 2], "abc"])
def test_restore_needs_a_mapping(tiny, decoded):
    _, _, _, rd = tiny
    with pytest.raises(InputError, match="decoded must be nncjax.decode's flat"):
        rd.restore(decoded)


def test_restore_of_decode_like_output_says_it_is_ready(tiny, coded):
    v, _, _, rd = tiny
    with pytest.raises(InputError, match=r"lack the scaled tensor .*decode\(data, like=...\) already gives"):
        rd.restore(decode(coded[0], like=v, bn_pairs=None), like=v)


def test_restore_with_scales_of_another_length(tiny, coded):
    _, _, _, rd = tiny
    raw = {**coded[1], K + LS_SUFFIX: np.ones(3, np.float32)}
    # old: ValueError "operands could not be broadcast together"
    with pytest.raises(InputError, match=r"'params/fc1/kernel' of shape \(7, 69\) .* does not fit its \(3,\) local"):
        rd.restore(raw)
    with pytest.raises(InputError, match=r"of shape \(\) .* does not fit"):  # old: ZeroDivisionError
        rd.restore({**coded[1], K: np.float32(1.0)})


def test_restore_refuses_non_real_tensors(tiny, coded):
    _, _, _, rd = tiny
    with pytest.raises(InputError, match="decoded tensor 'params/fc1/kernel' must be real"):
        rd.restore({**coded[1], K: np.array(["a"])})
    with pytest.raises(InputError, match="must be real"):
        rd.restore({**coded[1], K + LS_SUFFIX: np.ones(7) * 1j})


@pytest.mark.parametrize("which", ["same size", "twice", "bias"])
def test_restore_never_reshapes_a_tensor_of_another_shape(tiny, coded, which):
    v, _, _, rd = tiny
    if which == "same size":
        dec = {**coded[1], K: coded[1][K].reshape(7, 3, 23)}
    elif which == "twice":  # restored (Flax layout) and restored again: transposed twice
        dec = rd.restore(coded[2])
    else:
        dec = {**coded[1], "params/fc1/bias": coded[1]["params/fc1/bias"].reshape(7, 1)}
    # old: a same-size reshape into `like`'s shape, silently scrambling the values
    with pytest.raises(InputError, match="does not fit `like`'s"):
        rd.restore(dec, like=v)
    with pytest.raises(InputError, match=r"tensor 'params/fc1/bias': decoded shape \(8,\)"):  # old: ValueError
        rd.restore({**coded[1], "params/fc1/bias": np.ones(8, np.float32)}, like=v)


def test_restore_refuses_lossy_casts_like_decode(tiny, coded):
    v, _, _, rd = tiny
    ints = jax.tree_util.tree_map(lambda a: a.astype(np.int8), v)
    # old: float weights truncated into int8 silently
    with pytest.raises(InputError, match="decoded values are not integers; cannot restore int8"):
        rd.restore(coded[1], like=ints)
    cplx = jax.tree_util.tree_map(lambda a: a.astype(np.complex64), v)
    with pytest.raises(InputError, match="`like`'s leaf has dtype complex64"):
        rd.restore(coded[1], like=cplx)


def test_half_precision_overflow_is_refused_by_restore_as_by_decode(tiny):
    v, _, _, rd = tiny
    p = {"params": {**v["params"], "fc1": {"kernel": np.full((69, 7), 65504, np.float16),
                                           "bias": v["params"]["fc1"]["bias"]}}, "batch_stats": v["batch_stats"]}
    coarse = dataclasses.replace(rd, local_scales={**rd.local_scales, K: np.ones(7, np.float32)},
                                 qp_overrides={**rd.qp_overrides, K: 24})   # step 64: 65504 decodes as 65536
    data = encode(coarse.params_for_encoding(p), **coarse.encode_kwargs())
    match = "decoded value 65536.0 is beyond the range of float16"
    with pytest.raises(InputError, match=match):
        decode(data, like=p)
    # old: restore cast 65536 to float16 inf silently
    for dec in (decode(data, raw=True), decode(data)):
        with pytest.raises(InputError, match=match):
            coarse.restore(dec, like=p)
    with pytest.raises(InputError, match=match):
        verify(p, coarse)
    assert decode(data)[K].max() == 65536.0  # float32 output keeps it


def test_restore_missing_and_extra_names(tiny, coded):
    v, _, _, rd = tiny
    with pytest.raises(InputError, match="decoded tensors lack the scaled tensor 'params/fc1/kernel'"):
        rd.restore({k: a for k, a in coded[1].items() if k != K})
    with pytest.raises(InputError, match="no tensor named 'params/fc1/bias'"):
        rd.restore({k: a for k, a in coded[1].items() if k != "params/fc1/bias"}, like=v)
    extra = rd.restore({**coded[1], "extra": np.ones(2, np.float32)}, like=v)   # ignored with like=, as decode(raw)
    _leaves_equal(extra, rd.restore(coded[1], like=v))
    assert "extra" in rd.restore({**coded[1], "extra": np.ones(2, np.float32)})


# ------------------------------------------------------------------------------------------------
# verify


def test_verify_names_unknown_encode_arguments(tiny):
    v, _, _, rd = tiny
    # old: TypeError "encode() got an unexpected keyword argument 'foo'"
    with pytest.raises(InputError, match=r"takes no \['foo'\]"):
        verify(v, rd, foo=1)
    assert verify(v, rd, workers=1, scan_order=0).nbytes == verify(v, rd).nbytes


def test_verify_refuses_blocks_that_drop_the_local_scales():
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 16 - 0.5   # a square kernel: no shape error to catch it
    params = {"d": {"kernel": w}}
    rd = RDSettings({"d/kernel": -30, "d/kernel" + LS_SUFFIX: -24}, {"d/kernel": np.array([0.5, 1, 2, 4], np.float32)},
                    -1, {}, 0.0, -30, 2, -75, True)
    good = verify(params, rd).params["d"]["kernel"]
    assert np.abs(good - w).max() < 0.05
    # old: without the block unit W / s (NNR layout) was decoded as the kernel: silently wrong weights
    for blocks in (None, {}, {"d/kernel": {"bi": "d/bias"}}):
        with pytest.raises(InputError, match=r"blocks must keep each scaled tensor's local scales: 'd/kernel'"):
            verify(params, rd, blocks=blocks)
    np.testing.assert_array_equal(verify(params, rd, blocks=rd.encode_kwargs()["blocks"]).params["d"]["kernel"], good)


def test_verify_passes_eval_fn_results_and_errors_through(tiny):
    # acceptable: eval_fn is the caller's code; its result (NaN, arrays) is the metric, its errors propagate
    v, _, _, rd = tiny
    assert np.isnan(verify(v, rd, lambda p: float("nan")).metric)
    assert verify(v, rd, lambda p: np.ones(3)).metric.shape == (3,)

    def boom(p):
        raise RuntimeError("eval failed")

    with pytest.raises(RuntimeError, match="eval failed"):
        verify(v, rd, boom)
    with pytest.raises(InputError, match="eval_fn must be callable"):
        verify(v, rd, 3)


# ------------------------------------------------------------------------------------------------
# nncjax.ready


def test_block_roles_refuses_names_and_roles_of_different_lengths():
    with pytest.raises(InputError, match="2 names but 1 roles"):  # old: zip dropped the member
        block_roles(["w", "w_scaling"], ["weight"])


@pytest.mark.parametrize("dims", [(2.5, 3), "23", (-2, -3), 6, (True, 6)])
def test_recompose_low_rank_checks_dims(dims):
    # old: (2.5, 3) and "23" silently read as (2, 3); negative dims raised a raw ValueError
    with pytest.raises(BitstreamError, match="tensor_dimensions .* are not non-negative integers"):
        recompose_low_rank(np.ones((2, 1)), np.ones((1, 3)), dims)


@pytest.mark.parametrize("bad", [np.array([["a"]]), np.ones((2, 1)) * 1j])
def test_recompose_low_rank_refuses_non_real_factors(bad):
    with pytest.raises(InputError, match="G must be real"):   # old: ValueError / imaginary part dropped
        recompose_low_rank(bad, np.ones((1, 3)), (bad.shape[0], 3))


@pytest.mark.parametrize("ls", [np.array(["a", "b"]), np.ones(2) * 1j, np.ones(2, bool)])
def test_scale_rows_refuses_non_real_scales(ls):
    with pytest.raises(InputError, match="scale_rows: the local scales must be real"):
        scale_rows(np.ones((2, 2), np.float32), ls)


def test_ready_weights_overflowing_float32_are_refused():
    # A stream cannot get here (a quantized value is below 2**63, a product of two below 2**126), but the
    # public helpers take any arrays. Old: LS * W came back as inf silently.
    coded = {"w": np.full((2, 3), 3e38, np.float32), "s": np.float32([4.0, 1.0])}
    with pytest.raises(InputError, match="a block weight: its local scales times its decoded values overflow"):
        scale_rows(coded["w"], coded["s"])
    with pytest.raises(InputError, match="tensor 'w': its local scales times its decoded values overflow float32"):
        ready_flat(coded, [BlockRoles("w", ls="s")])
    with pytest.raises(InputError, match="tensor 'w': .* overflow float32"):
        map_onto({"w": np.zeros((2, 3), np.float32)}, coded, [BlockRoles("w", ls="s")])
    assert np.isnan(scale_rows(np.float32([[np.nan]]), np.float32([2]))).all()   # NaN in, NaN out: no overflow
    assert np.isinf(scale_rows(np.float32([[np.inf]]), np.float32([2]))).all()


def test_ready_flat_and_map_onto_name_missing_block_members():
    coded = {"w": np.ones((2, 1), np.float32)}
    with pytest.raises(InputError, match="block 'w': its member 's' is not among the decoded tensors"):
        ready_flat(coded, [BlockRoles("w", ls="s")])   # old: KeyError 's'
    with pytest.raises(InputError, match="its member 'b' is not among"):
        map_onto({"w": np.zeros((2, 1))}, coded, [BlockRoles("w", bi="b")])   # old: ignored silently


@pytest.mark.parametrize("eps", ["x", -1.0, float("nan"), True])
def test_map_onto_checks_eps(eps):
    # old: accepted silently where no batch norm is unfolded
    with pytest.raises(InputError, match="eps must be a finite real number >= 0"):
        map_onto({"b": np.zeros(2)}, {"b": np.ones(2, np.float32)}, [], eps=eps)


def test_map_onto_names_a_like_leaf_of_no_numeric_dtype():
    # old: "decoded shape (2,) does not fit `like`'s ()" for a str leaf
    with pytest.raises(InputError, match="`like`'s leaf has dtype <U1"):
        map_onto({"b": "x"}, {"b": np.ones(2, np.float32)}, [])


def test_cast_leaf_refuses_non_numeric_decoded_values():
    with pytest.raises(InputError, match="decoded values must be bool, integer or float"):   # old: ValueError
        cast_leaf("b", np.array(["a"]), np.zeros(1, np.float32))


# ------------------------------------------------------------------------------------------------
# properties


@st.composite
def scaled_models(draw):
    """A Flax-like params dict (Dense kernel, bias, embedding), its scaled names, random row scales."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    i, o, r, c = (draw(st.integers(1, 6)) for _ in range(4))
    params = {"d": {"kernel": rng.normal(0, 0.5, (i, o)).astype(np.float32),
                    "bias": rng.normal(0, 0.1, o).astype(np.float32)},
              "e": {"embedding": rng.normal(0, 0.5, (r, c)).astype(np.float32)}}
    scaled = draw(st.sets(st.sampled_from(["d/kernel", "e/embedding"]), min_size=1))
    rows = {"d/kernel": o, "e/embedding": r}
    scales = {n: (rng.uniform(0.25, 4.0, rows[n]) * rng.choice([-1, 1], rows[n])).astype(np.float32) for n in scaled}
    return params, scales


@settings(max_examples=25, deadline=None)
@given(scaled_models(), st.integers(-36, -20), st.booleans())
def test_round_trip_stays_within_the_quantization_error(model, qp, dq):
    params, scales = model
    qps = {n: qp for n in scales} | {n + LS_SUFFIX: -24 for n in scales}
    rd = RDSettings(qps, scales, -1, {}, 0.0, qp, 2, -75, dq)
    data = encode(rd.params_for_encoding(params), **rd.encode_kwargs())
    raw = decode(data, raw=True)
    restored = rd.restore(raw, like=params)
    _leaves_equal(restored, decode(data, like=params))
    _leaves_equal(restored, rd.restore(decode(data), like=params))
    # a uniform quantizer (lambda_scale 0) rounds to nearest; DQ's trellis may take the other
    # neighbour of the quantizer its state allows (points 2 steps apart)
    err = qp_to_step(qp, 2) * (2.0 if dq else 0.5)
    for name, s in scales.items():
        mod, leaf = name.split("/")
        w, got = params[mod][leaf], np.asarray(restored[mod][leaf])
        s_hat = raw[name + LS_SUFFIX]
        axis = rows_axis(name, 2)
        shape = (1, -1) if axis else (-1, 1)
        # |s_hat * Q(w / s) - w| <= |s_hat| * |Q(w / s) - w / s| + |s_hat - s| * |w / s|, |Q(x) - x| <= err
        bound = (np.abs(s_hat).reshape(shape) * err * 1.001
                 + np.abs(s_hat - s).reshape(shape) * np.abs(w / s.reshape(shape)) + 1e-6)
        assert np.all(np.abs(got - w) <= bound), name


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["p/kernel", "kernel", "p/embedding", "fc.weight", "p/my_kernel"]),
       st.lists(st.integers(0, 5), max_size=4), st.sampled_from([-1, 0]), st.booleans())
def test_row_scales_shape_rules(name, shape, scale_axis, scaled):
    shape = tuple(shape)
    ndim = len(shape)
    axis = rows_axis(name, ndim, scale_axis)
    is_kernel = name.rsplit("/", 1)[-1] == "kernel"
    assert axis == (ndim - 1 if scale_axis == -1 and ndim >= 2 and is_kernel else 0)
    rows = shape[axis] if shape else 1
    s = np.arange(1, rows + 1, dtype=np.float32)
    rd = RDSettings({}, {name: s} if scaled else {}, scale_axis, {}, 0.0, -30, 2, -75, True)
    got = rd.row_scales(name, shape)
    assert got.dtype == np.float32 and got.shape == (rows,)
    np.testing.assert_array_equal(got, s if scaled else np.ones(rows, np.float32))
    if scaled:
        wrong = shape[:axis] + (rows + 1,) + shape[axis + 1:] if shape else (2,)
        with pytest.raises(InputError, match="settings of another model"):
            rd.row_scales(name, wrong)


def test_bn_pairs_take_str_module_paths():
    rng = np.random.default_rng(0)
    like = {"params": {"conv": {"kernel": np.zeros((3, 3, 2, 4), np.float32), "bias": np.zeros(4, np.float32)},
                       "bn": {"scale": np.zeros(4, np.float32), "bias": np.zeros(4, np.float32)}},
            "batch_stats": {"bn": {"mean": np.zeros(4, np.float32), "var": np.zeros(4, np.float32)}}}
    coded = {"params/conv/kernel": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
             "params/conv/kernel_scaling": rng.uniform(0.5, 2, 4).astype(np.float32),
             "params/conv/bias": rng.normal(size=4).astype(np.float32)}
    blocks = [BlockRoles("params/conv/kernel", ls="params/conv/kernel_scaling", bi="params/conv/bias")]
    want = map_onto(like, coded, blocks, bn_pairs=[(("conv",), ("bn",))])
    np.testing.assert_array_equal(want["params"]["bn"]["scale"], coded["params/conv/kernel_scaling"])
    # old: tuple("conv") read the path as ('c', 'o', 'n', 'v'): "no folded block for 'params/c/o/n/v/kernel'"
    _leaves_equal(map_onto(like, coded, blocks, bn_pairs=[("conv", "bn")]), want)
    with pytest.raises(InputError, match="no folded block for 'params/fc/kernel'"):
        map_onto(like, coded, blocks, bn_pairs=[("fc", "bn")])


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": "x"}, "eps"), ({"eps": float("nan")}, "eps"), ({"eps": -1.0}, "eps"),
    ({"raw": True, "eps": float("nan")}, "eps"), ({"raw": "no"}, "raw must be True or False"),
])
def test_decode_checks_eps_and_raw_on_every_path(kwargs, match):
    # before: eps was only checked where a BatchNorm was unfolded, and raw="no" meant raw output
    data = nncjax.encode({"w": np.ones(2, np.float32)})
    with pytest.raises(InputError, match=match):
        nncjax.decode(data, **kwargs)
