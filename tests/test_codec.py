"""nncjax.codec on its own: round trips, pytrees, dtype policy end to end, warnings, inspect, and
robustness of the decoder against arbitrary bytes."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nncjax.kernels.unit_base import DecodeLimits

from nncjax.codec import QPAdjustedWarning, decode, encode, inspect
from nncjax.errors import BitstreamError, InputError, LimitError, NNCError
from nncjax.quantize.reference import quantize_tensor, reconstruct
from nncjax.steps import qp_to_step


def small_model(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv/w": (rng.standard_normal((6, 3, 3, 3)) * 0.1).astype(np.float32),
            "conv/b": (rng.standard_normal(6) * 0.01).astype(np.float32),
            "fc/w": (rng.standard_normal((10, 24)) * 0.2).astype(np.float32),
            "count": np.array([7, -3, 2**30], np.int32)}


# -- round trips ------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), qp=st.integers(-50, -10), dq=st.booleans(), scan=st.integers(0, 3),
       rows=st.integers(1, 40), cols=st.integers(1, 40), codebook=st.sampled_from([False, True, "always"]))
def test_reconstruction_is_the_quantizer_output(seed, qp, dq, scan, rows, cols, codebook):
    """decode(encode(w)) equals step * quantizer levels exactly (uniform/DQ), for any scan order."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    w[rng.random(rows) < 0.2] = 0
    m = {"w": w, "b": w[:, 0].copy(), "i": rng.integers(-9, 9, (rows, cols)).astype(np.int32)}
    out = decode(encode(m, qp=qp, dq=dq, scan_order=scan, codebook=codebook))
    assert list(out) == ["w", "b", "i"]
    np.testing.assert_array_equal(out["i"], m["i"])
    if not codebook:
        eff_scan = scan if (rows > 1 and cols > 1) else 0
        levels, used = quantize_tensor(w, qp, dq=dq, scan_order=eff_scan)
        if not (dq and eff_scan and (~w.any(axis=1)).any()):  # §12.1: block scan + row skip + DQ
            np.testing.assert_array_equal(out["w"], reconstruct(levels, used))
    if codebook == "always":  # codebook levels come from uniform rounding (one octave finer with DQ)
        assert np.abs(out["w"] - w).max() <= qp_to_step(qp - (4 if dq else 0)) * 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("big", [False, True])  # below and above the size where threads start
def test_workers_and_progress_do_not_change_bytes(big):
    from nncjax import codec
    m = small_model()
    if big:
        rng = np.random.default_rng(5)
        m |= {f"big{i}": (rng.standard_normal((128, 200)) * 0.05).astype(np.float32) for i in range(4)}
    assert (sum(v.size for v in m.values()) >= codec._PARALLEL_MIN_ELEMENTS) == big
    ref = encode(m)
    assert (len(ref) >= codec._PARALLEL_MIN_PAYLOAD_BYTES) == big  # decoding goes by the coded bytes
    assert encode(m, workers=1, progress=False) == ref == encode(m, workers=3, progress=True)
    a, b = decode(ref, workers=1), decode(ref, workers=2, progress=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_nested_pytree_and_like_restore_structure_and_dtypes():
    rng = np.random.default_rng(1)
    params = {"params": {"dense": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
                                   "bias": jnp.zeros(4, jnp.float16)},
                         "embed": np.asarray(rng.standard_normal((5, 3)) * 0.1, np.float64)},
              "step": np.int64(12), "mask": np.array([True, False, True]), "ids": np.arange(4, dtype=np.uint8),
              "lr": 0.5, "unused": None}
    data = encode(params, qp=-40)
    flat = decode(data)
    assert list(flat) == ["params/dense/kernel", "params/dense/bias", "params/embed", "step", "mask", "ids", "lr"]
    assert flat["step"].dtype == np.int32 and flat["step"].shape == (1,)
    out = decode(data, like=params)
    assert out["unused"] is None
    assert out["params"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert out["params"]["dense"]["bias"].dtype == jnp.float16
    assert out["params"]["embed"].dtype == np.float64
    assert out["step"].shape == () and out["step"].dtype == np.int64 and out["step"] == 12
    np.testing.assert_array_equal(out["mask"], params["mask"])
    assert out["ids"].dtype == np.uint8 and np.array_equal(out["ids"], params["ids"])
    assert np.abs(np.asarray(out["params"]["embed"]) - params["params"]["embed"]).max() < 2.0 ** -9  # DQ: within ~2 steps


@pytest.mark.parametrize("raw", [False, True])
def test_like_leaves_of_another_shape_or_no_number_dtype_raise(raw):
    """With ``like`` (``raw=True`` too) a leaf of another shape is refused, not reshaped (a rows-first kernel
    under a Flax-layout leaf of the same size would come back scrambled), and so is a leaf whose dtype
    cannot hold the decoded numbers (a string leaf silently truncated them)."""
    m = {"w": np.arange(12, dtype=np.float32).reshape(4, 3) / 8, "n": np.int32(5)}
    data = encode(m, qp=-40)
    with pytest.raises(InputError, match=r"'w'.*\(4, 3\).*\(3, 4\)"):
        decode(data, like={"w": np.zeros((3, 4), np.float32), "n": m["n"]}, raw=raw)
    for leaf in ("x", np.complex64(1)):
        with pytest.raises(InputError, match="'n'.*dtype"):
            decode(data, like={"w": m["w"], "n": leaf}, raw=raw)
    out = decode(data, like={"w": m["w"], "n": np.uint8(0)}, raw=raw)
    assert out["n"].shape == () and out["n"].dtype == np.uint8 and out["n"] == 5


def test_flax_params_round_trip():
    import jax
    from flax import linen as nn

    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))
    out = decode(encode(params, qp=-44), like=params)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    err = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), out, params)
    assert max(jax.tree_util.tree_leaves(err)) < 2.0 ** -10


def test_scalars_empties_and_empty_models():
    m = {"s": np.float32(0.25), "i": np.int32(-5), "e": np.zeros((0, 4), np.float32), "e1": np.zeros(0, np.int32)}
    out = decode(encode(m), like=m)
    assert out["s"].shape == () and abs(out["s"] - 0.25) < 1e-5 and out["i"] == -5 and out["i"].dtype == np.int32
    assert out["e"].shape == (0, 4) and out["e1"].shape == (0,)
    assert decode(encode({})) == {}
    assert list(decode(encode({"e": np.zeros((0, 2), np.float32)}))) == ["e"]
    assert decode(encode({"e": np.zeros((3, 0), np.float32)}, codebook=True))["e"].shape == (3, 0)


def test_overflow_guard_warns_with_names_and_qps():
    m = {"big": np.array([[1e9, -2.0], [0.5, 3.0]], np.float32)}
    with pytest.warns(QPAdjustedWarning, match=r"'big'.*QP -32.*QP -?\d+"):
        data = encode(m)
    qp = inspect(data).tensors[0].qp
    assert qp > -32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode({"fine": np.ones((2, 2), np.float32)})


@pytest.mark.parametrize("model, kw, match", [
    ({"huge": np.array([[9.2e19, 1.0]], np.float32)}, dict(qp_density=7),
     r"'huge'.*QP 45\d\d, outside \[-4096, 4095\].*overflow int32 levels even at the coarsest step"),
    ({"w": np.full((2, 2), 0.01, np.float32)}, dict(qp=-128, codebook="always"), r"'w'.*QP -132, outside \[-128, 127\]"),
    ({"w": np.ones((2, 2), np.float32), "b": np.full(3, 0.01, np.float32)}, dict(qp=-125, nonweight_qp=None),
     r"'b'.*QP -133, outside"),
])
def test_coded_qp_outside_its_field_raises_input_error(model, kw, match):
    """The overflow guard, a codebook (one octave finer) or a falsy nonweight_qp (qp - 2 << qp_density)
    can ask for a QP the iae_v(6 + qp_density) field cannot hold. NNCodec writes it anyway: the field
    wraps and its own decoder returns garbage for the tensor (e.g. 1e17 for 0.01). We refuse, by name."""
    with pytest.raises(InputError, match=match):
        encode(model, **kw)


@pytest.mark.parametrize("bad, match", [
    ({"w": np.array([1.0, np.nan], np.float32)}, "'w'.*NaN"),
    ({"w": np.array([[np.inf]], np.float32)}, "'w'.*Inf"),
    ({"w": np.array([1e300])}, "'w'.*float32 range"),
    ({"n": np.array([2**40], np.int64)}, "'n'.*int32"),
    ({"c": np.ones(2, np.complex64)}, "'c'"),
])
def test_bad_inputs_raise_input_error_naming_the_tensor(bad, match):
    with pytest.raises(InputError, match=match):
        encode(bad)


def test_bad_settings_raise_input_error():
    m = small_model()
    for kw in (dict(qp=1000), dict(scan_order=9), dict(workers=0), dict(qp_overrides={"nope": -3}),
               dict(codebook="sometimes"), dict(bitdepth=8, qp_overrides={"fc/w": -3}), dict(qp_density=1)):
        with pytest.raises(InputError):
            encode(m, **kw)  # qp_density 1 makes the default nonweight_qp -75 unrepresentable


def test_qp_overrides_change_only_their_tensors():
    m = small_model()
    info = inspect(encode(m, qp_overrides={"fc/w": -20, r"conv/.*": -60}))
    qps = {t.name: t.qp for t in info.tensors}
    assert qps == {"conv/w": -60, "conv/b": -60, "fc/w": -20, "count": None}


def test_inspect_reports_every_tensor():
    m = small_model()
    data = encode(m, scan_order=1, codebook=True, qp=-24)
    info = inspect(data)
    assert [t.name for t in info.tensors] == list(m)
    assert sum(t.coded_bytes for t in info.tensors) + 18 == len(data) == info.total_bytes
    t = {t.name: t for t in info.tensors}
    assert t["count"].payload_type == "INT" and t["count"].qp is None
    assert t["conv/w"].shape == (6, 3, 3, 3) and t["conv/w"].scan_order == 1
    text = str(info)
    assert "conv/w" in text and "INT" in text and "profile 1" in text


# -- hostile input ----------------------------------------------------------------------------------

def _decodes_or_raises(data: bytes, limits=None) -> None:
    try:
        decode(data, limits=limits)
    except NNCError as e:
        assert isinstance(e, (BitstreamError, LimitError)) or type(e).__name__ == "UnsupportedError", e


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    _decodes_or_raises(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_streams_never_crash(data):
    stream = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    _decodes_or_raises(bytes(stream[:cut]), limits=DecodeLimits(max_total_elements=10**6))


VALID = encode(small_model(3), scan_order=1)


def test_truncations_name_a_unit():
    for cut in range(1, len(VALID), 7):
        with pytest.raises(BitstreamError, match="unit"):
            decode(VALID[:cut])


def test_limits_stop_oversized_declarations():
    with pytest.raises(LimitError):
        decode(VALID, limits=DecodeLimits(max_total_elements=100))
    big_zero = encode({"z": np.zeros((4000, 4000), np.float32)})  # a few bytes declare 16 M elements
    assert len(big_zero) < 200
    with pytest.raises(LimitError):
        decode(big_zero, limits=DecodeLimits(max_tensor_elements=10**6))
    with pytest.raises(InputError):
        decode("not bytes")
