"""Naming, input policy and settings of nncjax.codec (no coding involved)."""

from collections import OrderedDict, namedtuple

import jax.numpy as jnp
import numpy as np
import pytest

from nncjax.codec import _override_table, _qp_plan, _settings
from nncjax.errors import InputError
from nncjax.pytree_names import flatten_named, unflatten_like
from nncjax.tensor_policy import prepare_tensor, restore_dtype


def settings(**kw):
    base = dict(qp=-32, qp_density=2, nonweight_qp=-75, dq=True, codebook=False, bitdepth=None,
                row_skipping=True, param_opt=True, scan_order=0, lambda_scale=0.0, unary_length=11)
    base.update(kw)
    return _settings(**base)


# -- naming ----------------------------------------------------------------------------------------

def test_flat_dict_keeps_keys_and_order():
    d = OrderedDict([("z.weight", np.zeros((2, 2))), ("a/b", np.zeros(2)), ("é名", np.zeros(1))])
    assert list(flatten_named(d)) == ["z.weight", "a/b", "é名"]


def test_nested_names_follow_insertion_order_and_paths():
    P = namedtuple("P", "w b")
    tree = {"enc": {"dense": {"kernel": np.ones((2, 3)), "bias": np.ones(3)}},
            "layers": [np.ones(1), (np.ones(2), None)], "nt": P(np.ones(1), np.ones(1))}
    assert list(flatten_named(tree)) == ["enc/dense/kernel", "enc/dense/bias", "layers/0", "layers/1/0",
                                         "nt/w", "nt/b"]


def test_unflatten_like_rebuilds_structure():
    P = namedtuple("P", "w b")
    tree = {"a": {"k": np.ones((2, 3))}, "l": [np.ones(1), None], "nt": P(np.ones(1), np.ones(2))}
    flat = {k: v * 2 for k, v in flatten_named(tree).items()}
    out = unflatten_like(tree, flat, lambda n, a, ref: a)
    assert isinstance(out["nt"], P) and out["l"][1] is None
    np.testing.assert_array_equal(out["a"]["k"], 2 * np.ones((2, 3)))


def test_flax_params_are_named_by_path():
    import jax
    from flax import linen as nn

    params = nn.Dense(3).init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
    assert list(flatten_named(params)) == ["params/kernel", "params/bias"]


def test_name_collisions_and_bad_names_raise():
    with pytest.raises(InputError, match="same name"):
        flatten_named({"a": {"b": np.ones(1)}, "a/b": {}, "x": [np.ones(1)], "x/0": np.ones(1)})
    with pytest.raises(InputError, match="NUL"):
        flatten_named({"a\x00b": np.ones(1)})
    with pytest.raises(InputError):
        flatten_named(np.ones(3))


# -- dtypes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [np.int8, np.int16, np.uint8, np.uint16, np.bool_, np.int32])
def test_small_ints_become_int32(dt):
    a = np.array([0, 1, 1, 0], dtype=dt)
    t = prepare_tensor("t", a)
    assert t.data.dtype == np.int32 and t.is_int and np.array_equal(t.data, a.astype(np.int32))


@pytest.mark.parametrize("dt, value", [(np.int64, 2**31), (np.uint32, 2**32 - 1), (np.uint64, 2**40),
                                       (np.int64, -2**31 - 1)])
def test_wide_ints_out_of_range_name_the_tensor(dt, value):
    with pytest.raises(InputError, match="'big'"):
        prepare_tensor("big", np.array([0, value], dtype=dt))
    assert prepare_tensor("ok", np.array([0, 2**31 - 1], dtype=dt)).data.dtype == np.int32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dt", [np.float16, np.float32, np.float64])
def test_nonfinite_raises_naming_tensor(bad, dt):
    a = np.array([0.5, bad, 1.0], dtype=dt)
    with pytest.raises(InputError, match="'layer.w'"):
        prepare_tensor("layer.w", a)


def test_float64_beyond_float32_raises_and_fitting_float64_is_rounded():
    with pytest.raises(InputError, match="'f'.*float32 range"):
        prepare_tensor("f", np.array([1e39]))
    t = prepare_tensor("f", np.array([0.1, -3e38]))
    assert t.data.dtype == np.float32 and t.data[0] == np.float32(0.1)


def test_bf16_and_f16_widen_exactly():
    x = jnp.array([0.1, -2.5, 3e4], dtype=jnp.bfloat16)
    t = prepare_tensor("x", x)
    assert t.data.dtype == np.float32 and np.array_equal(t.data, np.asarray(x).astype(np.float32))
    assert t.orig_dtype == x.dtype
    h = np.array([65504.0, -1e-4], np.float16)
    assert np.array_equal(prepare_tensor("h", h).data, h.astype(np.float32))


def test_scalars_and_empties():
    s = prepare_tensor("s", np.float32(1.5))
    assert s.data.shape == (1,) and s.orig_shape == ()
    e = prepare_tensor("e", np.zeros((0, 3), np.float32))
    assert e.data.shape == (0, 3)
    assert prepare_tensor("p", 3).data.dtype == np.int32  # python int leaf


def test_unsupported_dtypes_raise():
    with pytest.raises(InputError, match="'c'"):
        prepare_tensor("c", np.ones(2, np.complex64))
    with pytest.raises(InputError, match="'s'"):
        prepare_tensor("s", np.array(["a"]))


def test_restore_dtype_refuses_lossy_narrowing():
    assert restore_dtype("x", np.array([1, 2], np.int32), np.int8).dtype == np.int8
    with pytest.raises(InputError, match="'x'"):
        restore_dtype("x", np.array([300], np.int32), np.int8)
    assert restore_dtype("s", np.array([2.0], np.float32), np.float64, ()).shape == ()


def test_half_precision_like_refuses_values_beyond_its_range():
    """65504 (float16's largest) coded with a step of 64 decodes to 65536: cast to float16 it became inf."""
    import nncjax

    w = {"w": jnp.asarray(np.array([[65504.0, -65504.0], [1000.0, 2.0]], np.float16))}
    data = nncjax.encode(w, qp=24)
    assert nncjax.decode(data)["w"].max() == 65536.0  # float32: the decoded values themselves
    with pytest.raises(InputError, match=r"tensor 'w': decoded value 65536.0 is beyond the range of float16"):
        nncjax.decode(data, like=w)
    assert nncjax.decode(nncjax.encode(w, qp=16), like=w)["w"].dtype == jnp.float16  # in range: cast as before
    kept = restore_dtype("x", np.array([1.5, np.inf, np.nan], np.float32), jnp.bfloat16)  # non-finite stays
    assert np.isinf(np.asarray(kept, np.float32)[1]) and np.isnan(np.asarray(kept, np.float32)[2])


# -- settings and QP plan ----------------------------------------------------------------------------

def test_settings_validation():
    for bad in (dict(qp=200), dict(qp_density=8), dict(scan_order=5), dict(codebook="maybe"),
                dict(bitdepth=1), dict(lambda_scale=-1), dict(unary_length=0), dict(nonweight_qp=-500),
                dict(unary_length=1, codebook=True), dict(unary_length=1, codebook="always")):
        with pytest.raises(InputError):
            settings(**bad)
    assert settings(unary_length=1).unary_length == 1 and settings(unary_length=2, codebook=True).codebook == "auto"
    assert settings(qp=127).qp == 127 and settings(qp=-128).qp == -128  # iae_v(8) range with qpd 2


def test_qp_plan_weight_nonweight_and_int():
    ts = [prepare_tensor(n, a) for n, a in [("w", np.ones((2, 2), np.float32)), ("b", np.ones(2, np.float32)),
                                           ("i", np.ones((2, 2), np.int32)), ("s", np.float32(1))]]
    assert [p.qp for p in _qp_plan(ts, settings(), None, None)] == [-32, -75, None, -75]
    # falsy nonweight_qp: qp - (2 << qp_density), as NNCodec
    assert [p.qp for p in _qp_plan(ts, settings(nonweight_qp=0, qp=-40, qp_density=3), None, None)] == [
        -40, -56, None, -56]
    # bitdepth: QP from the value range, levels clipped to the (unsigned here) range; non-weights >= 8 bits
    plan = _qp_plan(ts, settings(bitdepth=4), None, None)
    assert plan[0].clip == (0, 15) and plan[1].clip == (0, 255) and plan[2].clip is None
    # per-tensor dq: the global setting unless overridden; integer tensors never use DQ
    assert [p.dq for p in _qp_plan(ts, settings(), None, {"w": False})] == [False, True, False, True]
    with pytest.raises(InputError, match="bitdepth"):
        _qp_plan(ts, settings(bitdepth=8), {"w": -3}, None)


def test_qp_overrides_exact_then_regex():
    s = settings()
    names = ["enc/w", "enc/b", "dec/w", "i"]
    floats = {"enc/w", "enc/b", "dec/w"}
    table = _override_table({"enc/b": -60, r".*/w": -20, "dec/.*": -10}, "qp_overrides", s.check_qp, names, floats)
    assert table == {"enc/b": -60, "enc/w": -20, "dec/w": -20}
    with pytest.raises(InputError, match="matches no float tensor"):
        _override_table({"nope": -3}, "qp_overrides", s.check_qp, names, floats)
    with pytest.raises(InputError, match="matches no float tensor"):
        _override_table({"i": -3}, "qp_overrides", s.check_qp, names, floats)
    # optimize()'s local-scale names exist only in params_for_encoding's output: the error says so
    with pytest.raises(InputError, match="params_for_encoding"):
        _override_table({"enc/w_scaling": -24}, "qp_overrides", s.check_qp, names, floats)
    with pytest.raises(InputError, match=r"qp_overrides\['enc/w'\]"):
        _override_table({"enc/w": 999}, "qp_overrides", s.check_qp, names, floats)
