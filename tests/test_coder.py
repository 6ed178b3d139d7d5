"""DeepCABAC coder on its own: golden vectors, round trips, hostile input, argument checks, threads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nncjax.kernels.coder import (
    LEVEL_MAX,
    CabacDecoder,
    CabacEncoder,
    decode_levels,
    decode_many,
    encode_levels,
    encode_many,
)
from nncjax.kernels.contexts import (
    GTX,
    SIGN,
    ci_context,
    ctx_init_all,
    num_contexts,
    rem_context,
    signalled_contexts,
)
from nncjax.kernels.engine import (
    E_POS,
    ENC_STATE_SIZE,
    enc_bin,
    enc_bypass,
    enc_init,
    enc_terminate_and_finish,
)

from nncjax import BitstreamError, InputError, LimitError, NNCError
from tests.test_coder_oracle import (
    decode_case,
    encode_case,
    layer_kwargs,
    make_case,
    q_to_k,
)

EXAMPLE = np.array([[0.011, -0.023, 0], [0.25, 0, -0.004], [0, 0, 0]], np.float32)


# ------------------------------------------------------------------------------ golden vectors

def test_worked_example_dq_off_param_opt_on():
    enc = CabacEncoder(unary_length=11, param_opt=True)
    enc.iae_v(8, -32)
    enc.encode_layer(np.array([[3, -6, 0], [64, 0, -1], [0, 0, 0]], np.int32), dq=False)
    assert enc.finish() == bytes.fromhex("df 66 80 0a a1 85 78 3b ba 87")


def test_worked_example_dq_on_param_opt_off():
    enc = CabacEncoder(unary_length=11, param_opt=False)
    enc.iae_v(8, -32)
    enc.encode_layer(np.array([[2, -6, 0], [64, 0, -2], [0, 0, 0]], np.int32), dq=True)
    data = enc.finish()
    assert data == bytes.fromhex("df 66 80 05 5e ae 04 ab cf c0")
    dec = CabacDecoder(data, unary_length=11)
    assert dec.iae_v(8) == -32
    levels, eps = dec.decode_layer((3, 3), dq=True)
    assert levels.tolist() == [[2, -6, 0], [64, 0, -2], [0, 0, 0]] and len(eps) == 0
    assert dec.finish() == 10


def test_signalled_context_counts():
    assert len(signalled_contexts(11, dq=True)) == 80
    assert len(signalled_contexts(11, dq=False)) == 59
    assert len(signalled_contexts(11, dq=False, codebook_size=1)) == 0
    # codebook [-1, 0, 1]: sign coded, greater-than flags for |q| = 1 are not needed.
    assert signalled_contexts(11, dq=False, codebook_size=3, codebook_offset=1).tolist() == [0, 1, 2, 48, 49, 50, 53, 54]


# ----------------------------------------------------------------------------------- round trips

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63 - 1))
def test_round_trip_random_configurations(seed):
    """Own round trip over the cross-test generator, including configurations NNCodec cannot encode."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        case = make_case(rng)
        prefix, levels, _, used = decode_case(case, data := encode_case(case))
        assert prefix == [v for _, v in case["prefix"]] and used == len(data)
        np.testing.assert_array_equal(levels, case["levels"])


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (40, 1), (1, 40), (0,), (0, 5), (3, 0), (2, 3, 0, 4)])
@pytest.mark.parametrize("scan", [0, 3])
def test_degenerate_shapes_round_trip(shape, scan):
    rng = np.random.default_rng(len(shape) + scan)
    levels = rng.integers(-3, 4, shape).astype(np.int32)
    for dq in (False, True):
        lv = q_to_k(levels, scan, False) if dq and levels.ndim else (levels * 2 if dq else levels)
        data = encode_levels(lv, dq=dq, scan_order=scan, row_skipping=True)
        np.testing.assert_array_equal(decode_levels(data, shape, dq=dq, scan_order=scan), lv)


def test_extreme_levels_round_trip():
    for unary in (1, 11, 256):
        lv = np.array([[LEVEL_MAX, -LEVEL_MAX, 0, 1], [-1, 2**30, -(2**30) - 5, 7]], np.int32)
        data = encode_levels(lv, dq=False, unary_length=unary)
        np.testing.assert_array_equal(decode_levels(data, lv.shape, dq=False, unary_length=unary), lv)
        # without DQ the whole int32 range codes, as in NNCodec (NNR_PT_INT tensors hold any int32)
        lv = np.array([[2**31 - 1, -(2**31), 0], [-(2**31) + 1, 5, -(2**31)]], np.int32)
        data = encode_levels(lv, dq=False, unary_length=unary)
        np.testing.assert_array_equal(decode_levels(data, lv.shape, dq=False, unary_length=unary), lv)


def test_entry_points_count_and_offsets():
    rng = np.random.default_rng(5)
    lv = rng.integers(-5, 6, (70, 20)).astype(np.int32)
    enc = CabacEncoder()
    enc.encode_layer(lv, dq=False, scan_order=1)
    dec = CabacDecoder(enc.finish())
    out, eps = dec.decode_layer(lv.shape, dq=False, scan_order=1)
    np.testing.assert_array_equal(out, lv)
    assert len(eps) == 8 and eps.start > 0  # ceil(70 / 8) - 1 entry points
    assert np.all(eps.offset > 0) and np.all((eps.value >= 0) & (eps.value < 256))


def test_many_tensors_in_one_payload_and_in_threads():
    rng = np.random.default_rng(7)
    tensors = [rng.integers(-9, 10, (int(rng.integers(1, 60)), int(rng.integers(1, 60)))).astype(np.int32)
               for _ in range(12)]
    enc = CabacEncoder(unary_length=5)
    for i, t in enumerate(tensors):
        enc.iae_v(8, i - 6)
        enc.encode_layer(t, dq=False, scan_order=i % 5, row_skipping=bool(i % 2))
    dec = CabacDecoder(data := enc.finish(), unary_length=5)
    for i, t in enumerate(tensors):
        assert dec.iae_v(8) == i - 6
        np.testing.assert_array_equal(dec.decode_layer(t.shape, dq=False, scan_order=i % 5)[0], t)
    assert dec.finish() == len(data)

    streams = encode_many(tensors, dq=False, workers=2, scan_order=2)
    assert streams == [encode_levels(t, dq=False, scan_order=2) for t in tensors]
    for t, d in zip(tensors, decode_many(streams, [t.shape for t in tensors], dq=False, scan_order=2, workers=2)):
        np.testing.assert_array_equal(d, t)


def test_tca_and_hdsp_round_trip_and_hdsp_needs_its_history():
    rng = np.random.default_rng(11)
    lv = rng.integers(-4, 5, (30, 20)).astype(np.int32)
    base = rng.integers(-4, 5, lv.shape).astype(np.int32)
    hist = (rng.random(lv.shape) < 0.5).astype(np.int8)
    kw = {"dq": False, "parent_present": True, "base": base}
    data = encode_levels(lv, hdsp_hist=hist, **kw)
    assert data != encode_levels(lv, **kw)  # the flag and the contexts differ
    np.testing.assert_array_equal(decode_levels(data, lv.shape, hdsp_hist=hist, **kw), lv)
    np.testing.assert_array_equal(decode_levels(encode_levels(lv, **kw), lv.shape, **kw), lv)
    with pytest.raises(BitstreamError, match="hdsp_hist"):
        decode_levels(data, lv.shape, **kw)


# ---------------------------------------------------------------------------------- hostile input

def _hostile_decode(data, case):
    try:
        decode_case(case, data)
    except BitstreamError:  # the only error a stream may cause (e.g. a flipped bit switching HDSP on)
        pass


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**63 - 1))
def test_truncated_and_bit_flipped_payloads_never_crash(seed):
    rng = np.random.default_rng(seed)
    case = make_case(rng)
    data = encode_case(case)
    for cut in sorted(set(rng.integers(0, len(data), 8).tolist()) | {0, len(data) - 1}):
        with pytest.raises(BitstreamError):  # a valid payload is consumed exactly, so any cut shows
            dec = CabacDecoder(data[:cut], case["n"])
            [dec.iae_v(nbits) for nbits, _ in case["prefix"]]
            dec.decode_layer(case["levels"].shape, **layer_kwargs(case))
            dec.finish()
    for _ in range(8):
        bad = bytearray(data)
        bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        _hostile_decode(bytes(bad), case)
    _hostile_decode(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes(), case)


def test_remainder_prefix_of_31_ones_is_rejected():
    """A hand-made payload whose level has 31 remainder-prefix ones (no int32 level needs more than 30)."""
    es, buf = np.zeros(ENC_STATE_SIZE, np.int64), np.zeros(256, np.uint8)
    enc_init(es)
    ctx = np.zeros((num_contexts(1), 5), np.int32)
    ctx_init_all(ctx)
    for _ in signalled_contexts(1, dq=False):
        enc_bin(es, buf, ctx, ci_context(1), 0)
    for c in [0, SIGN, GTX] + [rem_context(1) + j for j in range(31)]:  # sig, sign +, greater-than, prefix
        enc_bin(es, buf, ctx, c, 1 if c != SIGN else 0)
    enc_bypass(es, buf, 0, 31)
    enc_terminate_and_finish(es, buf)
    with pytest.raises(BitstreamError, match="prefix"):
        decode_levels(buf[: es[E_POS]].tobytes(), (1,), dq=False, unary_length=1)


def test_trailing_bytes_are_reported():
    data = encode_levels(np.arange(10, dtype=np.int32), dq=False)
    with pytest.raises(BitstreamError):
        decode_levels(data + b"\x00", (10,), dq=False)


# ----------------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("levels, kwargs", [
    (np.zeros(4, np.float32), {}),
    (np.array([2**31], np.int64), {}),
    (np.array([-(2**31) - 1], np.int64), {}),
    (np.array([[0, 2**31 - 1]], np.int32), {"dq": True}),  # k -> q would overflow NNCodec's int32 arithmetic
    (np.array([[1, 2]], np.int32), {"dq": True}),  # k = 1 is not reachable from DQ state 0
    (np.array([[0, 3]], np.int32), {"codebook_size": 3, "codebook_offset": 1}),
    (np.zeros((2, 2), np.int32), {"codebook_size": 3, "codebook_offset": 3}),
    (np.zeros((2, 2), np.int32), {"codebook_size": 3, "dq": True}),
    (np.zeros((2, 2), np.int32), {"scan_order": 5}),
    (np.zeros((2, 2), np.int32), {"profile": 2}),
])
def test_bad_levels_and_settings_raise_input_error(levels, kwargs):
    with pytest.raises(InputError):
        encode_levels(levels, **({"dq": False} | kwargs))


def test_bad_encoder_fields_and_side_information():
    enc = CabacEncoder()
    with pytest.raises(InputError):
        enc.iae_v(8, 128)
    with pytest.raises(InputError):
        enc.uae_v(3, -1)
    with pytest.raises(InputError):
        CabacEncoder(unary_length=0)
    with pytest.raises(InputError):  # TCA is a profile-1 tool
        enc.encode_layer(np.zeros((2, 2), np.int32), dq=False, profile=0, base=np.zeros((2, 2), np.int32))
    with pytest.raises(InputError):  # HDSP needs a parent
        enc.encode_layer(np.zeros((2, 2), np.int32), dq=False, hdsp_hist=np.zeros((2, 2), np.int8))
    with pytest.raises(InputError):
        enc.encode_layer(np.zeros((2, 2), np.int32), dq=False, base=np.zeros((3, 2), np.int32))
    enc.finish()
    with pytest.raises(NNCError):
        enc.encode_layer(np.zeros(2, np.int32), dq=False)


def test_lenient_dq_codes_unreachable_indices_as_nncodec_does():
    """strict_dq=False codes q = (k + sgn(k)*(state & 1)) >> 1; the decoder returns the reachable index."""
    k = np.array([[1, 2, 3, -3, 0, 5]], np.int32)  # 1 is unreachable from state 0 (it codes as q = 0)
    with pytest.raises(InputError):
        encode_levels(k, dq=True)
    data = encode_levels(k, dq=True, strict_dq=False)
    back = decode_levels(data, k.shape, dq=True)
    assert back[0, 0] == 0 and back.shape == k.shape
    assert np.all(np.abs(back - k) <= 1)


def test_stale_numba_caches_are_dropped_when_any_kernel_source_changes(tmp_path):
    """Numba re-checks only a kernel's own file; a change to a module it inlines must drop the cache."""
    from nncjax.kernels.jit import drop_stale_cache
    (tmp_path / "engine.py").write_text("x = 1\n")
    (tmp_path / "levels.py").write_text("y = 2\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "levels.k-1.py311.nbi").write_bytes(b"old")
    (cache / "levels.cpython-311.pyc").write_bytes(b"bytecode")
    assert drop_stale_cache(tmp_path) and not (cache / "levels.k-1.py311.nbi").exists()
    (cache / "levels.k-1.py311.nbi").write_bytes(b"new")
    assert not drop_stale_cache(tmp_path) and (cache / "levels.k-1.py311.nbi").exists()
    (tmp_path / "engine.py").write_text("x = 2\n")  # only the inlined module changes
    assert drop_stale_cache(tmp_path) and not (cache / "levels.k-1.py311.nbi").exists()
    assert (cache / "levels.cpython-311.pyc").exists()  # only Numba's files go


def test_payload_types_workers_and_declared_shapes_are_checked():
    """Fifth robustness sweep: what used to be cast, truncated or allocated silently."""
    levels = np.arange(6, dtype=np.int32).reshape(2, 3)
    data = encode_levels(levels, dq=False)
    # a wider array was cast to uint8 (256 wrapped to 0, floats truncated)
    for arr in (np.frombuffer(data, np.uint8).astype(np.int32), np.frombuffer(data, np.uint8).astype(np.float64)):
        with pytest.raises(InputError, match="uint8"):
            decode_levels(arr, (2, 3), dq=False)
    assert decode_levels(memoryview(data), (2, 3), dq=False).tolist() == levels.tolist()
    # a shape the payload cannot hold was allocated first (MemoryError / ValueError)
    for shape in [(2**31,), (2**40, 2**40)]:
        with pytest.raises(LimitError, match="elements"):
            decode_levels(data, shape, dq=False)
    # zip dropped the extra streams
    with pytest.raises(InputError, match="2 streams but 1 shapes"):
        decode_many([data, data], [(2, 3)], dq=False)
    with pytest.raises(InputError, match="'levels'"):
        encode_many([{"dq": False}])
    with pytest.raises(InputError, match="'shape'"):
        decode_many([data], [{"dq": False}])
    for workers in (0, -1, 1.5, None, "2", True):
        with pytest.raises(InputError, match="workers"):
            encode_many([levels, levels], dq=False, workers=workers)
        with pytest.raises(InputError, match="workers"):
            decode_many([data, data], [(2, 3)] * 2, dq=False, workers=workers)
    assert [len(b) for b in encode_many([levels] * 3, dq=False, workers=10**6)] == [len(data)] * 3
    for capacity in (-1, 1.5, None, "x"):
        with pytest.raises(InputError, match="capacity"):
            CabacEncoder(capacity=capacity)
    enc = CabacEncoder(capacity=2**62)  # a hint: the buffer is not taken up front
    enc.encode_layer(levels, dq=False)
    assert enc.finish() == data
