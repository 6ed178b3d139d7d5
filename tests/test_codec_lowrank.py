"""Low-rank weights (NNR_CPT_DC) in :func:`nncjax.encode` (``low_rank=``) and :func:`nncjax.decode`: G and
H in one block unit (with codebooks too), recomposition on decoding, non-block G/H unit pairs, input
validation, limits, and interop with NNCodec 2.1.3 (its encoder writes the same bytes; its decoder reads
our G and H).
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncjax import BitstreamError, InputError, LimitError, UnsupportedError
from nncjax.codec import decode, encode, inspect
from nncjax.kernels.unit_base import CPT_DC, DecodeLimits
from nncjax.kernels.units import CompressedDataUnit, PayloadType, read_units, write_stream
from nncjax.reduce import low_rank_factors
from nncjax.reduce.layout import flax_to_nnr

RNG = np.random.default_rng(20261123)


def gauss(*shape, scale=0.1):
    return RNG.normal(0, scale, shape).astype(np.float32)


# (params, low_rank, blocks, encode kwargs): every cpt combination with DC, block scans, per-factor QPs,
# g_number_of_rows != dims[0], a 4-D conv weight, tensors before and after the unit.
CASES = [
    ({"a": gauss(5, 4), "w_G": gauss(8, 3), "w_H": gauss(3, 6), "t": gauss(7)}, {"w": (8, 6)}, {}, {}),
    ({"w_G": gauss(20, 4), "w_H": gauss(4, 30), "w_scaling": 1 + gauss(20), "b": gauss(20)}, {"w": (20, 3, 10)},
     {"w": {"ls": "w_scaling", "bi": "b"}}, {"scan_order": 1}),
    ({"c_G": gauss(24, 5), "c_H": gauss(5, 27), "be": gauss(24), "ga": 1 + gauss(24), "me": gauss(24),
      "va": 1 + np.abs(gauss(24))}, {"c": (24, 3, 3, 3)},
     {"c": {"bn_beta": "be", "bn_gamma": "ga", "bn_mean": "me", "bn_var": "va"}}, {"scan_order": 2, "dq": False}),
    ({"w_G": gauss(16, 2), "w_H": gauss(2, 3), "x": gauss(3, 3)}, {"w": (8, 6)}, {},
     {"qp_overrides": {"w_G": -28, "w_H": -40}}),
    ({"w_G": gauss(70, 12), "w_H": gauss(12, 33)}, {"w": (70, 33)}, {}, {"scan_order": 1}),
]


def _oracle_case(params, low_rank, blocks, kw):
    return {"params": params, "low_rank": low_rank, "blocks": blocks, "dq": kw.get("dq", True),
            "scan_order": kw.get("scan_order", 0), "qp_per_tensor": kw.get("qp_overrides"), "qp": kw.get("qp", -32),
            "codebook_mode": {"always": 1, True: 2}.get(kw.get("codebook", False), 0)}


def test_nncodec_writes_the_same_low_rank_bytes_and_reads_our_factors(oracle):
    """NNCodec's encoder (nnc_core with W_G / W_H parameters) writes byte-identical DC blocks, entry
    points of G and H included; its decoder reads G and H (and every member) exactly as we do."""
    ours = [encode(p, low_rank=lr, blocks=b, **kw) for p, lr, b, kw in CASES]
    written = oracle.call("lowrank", "encode_low_rank", [_oracle_case(*c) for c in CASES])
    read = oracle.call("lowrank", "decode_factors", ours)
    for (params, low_rank, _, _), data, ref, theirs in zip(CASES, ours, written, read):
        assert "error" not in ref, ref.get("error")
        assert ref["bitstream"] == data
        assert "error" not in theirs, theirs.get("error")
        raw = decode(data, raw=True)
        assert sorted(theirs["names"]) == sorted(raw) == sorted(params)
        for name, arr in zip(theirs["names"], theirs["arrays"]):
            np.testing.assert_array_equal(np.asarray(arr, np.float32), raw[name], err_msg=name)
        ready = decode(ref["bitstream"])  # and we decode NNCodec's stream, recomposed
        for w, dims in low_rank.items():
            assert ready[w].shape == tuple(dims) and f"{w}_G" not in ready


def few_levels(*shape):
    """Values on five widely spaced levels: codebook='auto' takes a codebook for large enough tensors."""
    return RNG.choice(np.array([-0.8, -0.05, 0, 0.05, 0.8], np.float32), shape)


# (params, low_rank, blocks, encode kwargs) with codebooks: G and H each get one ("always"; "auto" when
# both are smaller with one), or neither does ("auto"); with block scans, without DQ, with members.
CODEBOOK_CASES = [
    ({"w_G": gauss(12, 3), "w_H": gauss(3, 10), "t": gauss(5)}, {"w": (12, 10)}, {}, dict(codebook="always", qp=-16)),
    ({"w_G": gauss(30, 4), "w_H": gauss(4, 24)}, {"w": (30, 24)}, {},
     dict(codebook="always", qp=-18, scan_order=1, dq=False)),
    ({"w_G": few_levels(64, 6), "w_H": few_levels(6, 64)}, {"w": (64, 64)}, {}, dict(codebook=True, qp=-28)),
    ({"w_G": few_levels(64, 6), "w_H": few_levels(6, 64)}, {"w": (64, 64)}, {},
     dict(codebook=True, qp=-28, scan_order=2)),
    ({"w_G": gauss(40, 6), "w_H": gauss(6, 36), "b": gauss(40)}, {"w": (40, 36)}, {"w": {"bi": "b"}},
     dict(codebook=True, qp=-36)),
    ({"w_G": few_levels(64, 6), "w_H": few_levels(6, 64), "w_scaling": 1 + gauss(64)}, {"w": (64, 64)},
     {"w": {"ls": "w_scaling"}},
     dict(codebook=True, qp=-28, dq=False)),
]


def test_low_rank_codebooks_match_nncodec(oracle):
    """With codebooks NNCodec's encoder writes the same bytes (H's codebook as the unit's second, "dc"
    codebook) and its decoder reads our G and H exactly."""
    ours = [encode(p, low_rank=lr, blocks=b, **kw) for p, lr, b, kw in CODEBOOK_CASES]
    written = oracle.call("lowrank", "encode_low_rank", [_oracle_case(*c) for c in CODEBOOK_CASES])
    read = oracle.call("lowrank", "decode_factors", ours)
    books = []
    for (params, low_rank, _, kw), data, ref, theirs in zip(CODEBOOK_CASES, ours, written, read):
        assert "error" not in ref, ref.get("error")
        assert ref["bitstream"] == data, kw
        raw = decode(data, raw=True)
        (unit,) = [u for u in read_units(data) if isinstance(u, CompressedDataUnit) and u.compressed_parameter_types & CPT_DC]
        books.append((unit.codebook is not None, unit.codebook_dc is not None))
        if unit.codebook is not None and len(unit.topology_elem_ids) > 2:
            # NNCodec's decoder sets a codebook unit's approx_method for G and H only, then fails on
            # the member (KeyError) -- on its own stream too, which is these bytes.
            assert "KeyError" in theirs.get("error", ""), theirs
            factors = {k: params[k] for k in ("w_G", "w_H")}
            alone = decode(encode(factors, low_rank=low_rank, **kw), raw=True)
            for name in factors:  # the factors are coded as they are without the member
                np.testing.assert_array_equal(raw[name], alone[name], err_msg=name)
            continue
        assert "error" not in theirs, theirs.get("error")
        for name, arr in zip(theirs["names"], theirs["arrays"]):
            np.testing.assert_array_equal(np.asarray(arr, np.float32), raw[name], err_msg=name)
    assert books == [(True, True)] * 4 + [(False, False), (True, True)]


@pytest.mark.parametrize("params, blocks, kw, match", [
    ({"w_G": few_levels(64, 6), "w_H": gauss(6, 64)}, {}, dict(codebook=True, qp=-36), "only one of G and H"),
    ({"w_G": gauss(12, 3), "w_H": gauss(3, 10), "b": gauss(12)}, {"w": {"bi": "b"}}, dict(codebook="always", qp=-16),
     "member 'b' takes a codebook"),
    ({"w_G": few_levels(64, 6), "w_H": few_levels(6, 64), "w_scaling": 1 + gauss(64)}, {"w": {"ls": "w_scaling"}},
     dict(codebook=True, qp=-28), "members use DQ"),
])
def test_low_rank_codebooks_that_would_split_the_block_raise(oracle, params, blocks, kw, match):
    """NNCodec writes such a block as separate G and H units, on which its own encoder fails."""
    low_rank = {"w": (params["w_G"].shape[0], params["w_H"].shape[1])}
    with pytest.raises(InputError, match=match):
        encode(params, low_rank=low_rank, blocks=blocks, **kw)
    (ref,) = oracle.call("lowrank", "encode_low_rank", [_oracle_case(params, low_rank, blocks, kw)])
    assert "error" in ref


def test_degenerate_factors_are_coded_in_raster_order(oracle):
    """Rank 1 makes G a column: NNCodec's encoder crashes on it under a block scan when it spans more
    than one block row (its header declares entry points the raster-scanned column does not have), so
    the unit signals scan_order 0, which NNCodec's decoder reads."""
    params = {"w_G": gauss(40, 1), "w_H": gauss(1, 40)}
    data = encode(params, low_rank={"w": (40, 40)}, scan_order=2)
    assert {t.scan_order for t in inspect(data).tensors} == {0}
    (theirs,) = oracle.call("lowrank", "decode_factors", [data])
    assert "error" not in theirs, theirs.get("error")
    raw = decode(data, raw=True)
    for name, arr in zip(theirs["names"], theirs["arrays"]):
        np.testing.assert_array_equal(np.asarray(arr, np.float32), raw[name])


def test_degenerate_factors_within_one_block_row_keep_the_scan(oracle):
    """A factor that is no real matrix is raster-scanned and has no entry points; where it spans one
    block row (and W's dims are a matrix) the declared entry points still add up, and NNCodec signals
    the requested scan order: the same bytes, and the other factor is quantized in that scan."""
    cases = [({"w_G": gauss(12, 1), "w_H": gauss(1, 40)}, {"w": (12, 40)}, {}, dict(scan_order=2)),  # G a column
             ({"w_G": gauss(16, 1), "w_H": gauss(1, 9), "b": gauss(16)}, {"w": (16, 9)}, {"w": {"bi": "b"}},
              dict(scan_order=2, dq=False)),
             ({"w_G": gauss(1, 3), "w_H": gauss(3, 40)}, {"w": (8, 5)}, {}, dict(scan_order=1))]  # G a row
    ours = [encode(p, low_rank=lr, blocks=b, **kw) for p, lr, b, kw in cases]
    written = oracle.call("lowrank", "encode_low_rank", [_oracle_case(*c) for c in cases])
    for (_, _, _, kw), data, ref in zip(cases, ours, written):
        assert {t.scan_order for t in inspect(data).tensors if t.name.startswith("w_")} == {kw["scan_order"]}
        assert "error" not in ref, ref.get("error")
        assert ref["bitstream"] == data, kw


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), rows=st.integers(2, 40), cols=st.integers(2, 40), rank=st.integers(1, 6),
       conv=st.booleans(), scan=st.integers(0, 2), dq=st.booleans(), bias=st.booleans(), qp=st.integers(-44, -24))
def test_round_trip_recomposes_the_coded_factors(seed, rows, cols, rank, conv, scan, dq, bias, qp):
    """Raw decoding gives G and H exactly as coding them alone would; ready decoding gives their float64
    product rounded to float32 in the weight's dims, within the quantization error of the factors."""
    rng = np.random.default_rng(seed)
    rank = min(rank, rows, cols)
    dims = (rows, cols, 3) if conv else (rows, cols)
    g = rng.normal(0, 0.2, (rows, rank)).astype(np.float32)
    h = rng.normal(0, 0.2, (rank, int(np.prod(dims[1:])))).astype(np.float32)
    params = {"lead": rng.normal(0, 0.1, (3, 4)).astype(np.float32), "w_G": g, "w_H": h}
    blocks = {}
    if bias:
        params["w_bias"] = rng.normal(0, 0.1, rows).astype(np.float32)
        blocks = {"w": {"bi": "w_bias"}}
    kw = dict(qp=qp, dq=dq, scan_order=scan)
    data = encode(params, low_rank={"w": dims}, blocks=blocks, **kw)
    raw = decode(data, raw=True)
    alone = decode(encode({"w_G": g}, **kw)) | decode(encode({"w_H": h}, **kw))
    if min(rows, rank) > 1 and min(rank, h.shape[1]) > 1 or scan == 0:  # else the unit falls back to raster
        for f in ("w_G", "w_H"):
            np.testing.assert_array_equal(raw[f], alone[f], err_msg=f)
    ready = decode(data)
    assert list(ready) == ["lead"] + (["w_bias"] if bias else []) + ["w"]
    expect = (raw["w_G"].astype(np.float64) @ raw["w_H"].astype(np.float64)).astype(np.float32).reshape(dims)
    np.testing.assert_array_equal(ready["w"], expect)
    eg, eh = np.abs(raw["w_G"] - g).max(), np.abs(raw["w_H"] - h).max()
    assert max(eg, eh) <= 2 * 2.0 ** (qp / 4)  # DQ's reconstruction error stays below two steps
    bound = eg * np.abs(h).sum(0, keepdims=True) + eh * np.abs(g).sum(1, keepdims=True) + rank * eg * eh
    assert np.all(np.abs(ready["w"].reshape(rows, -1) - g @ h) <= bound + 1e-6)
    info = {t.name: t for t in inspect(data).tensors}
    assert info["w_G"].shape == (rows, rank) and info["w_H"].shape == (rank, h.shape[1])
    assert info["w_G"].qp == info["w_H"].qp == qp and info["w_G"].payload_type == "BLOCK"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), rows=st.integers(2, 30), cols=st.integers(2, 30), rank=st.integers(1, 4),
       scan=st.sampled_from([0, 1]), dq=st.booleans(), qp=st.integers(-24, -12))
def test_codebook_round_trip_codes_each_factor_as_alone(seed, rows, cols, rank, scan, dq, qp):
    """With codebook='always', G and H come back as each coded alone with its own codebook, and the
    ready weight is their product."""
    rng = np.random.default_rng(seed)
    rank = min(rank, rows, cols)
    g = rng.normal(0, 0.2, (rows, rank)).astype(np.float32)
    h = rng.normal(0, 0.2, (rank, cols)).astype(np.float32)
    kw = dict(qp=qp, dq=dq, scan_order=scan, codebook="always")
    data = encode({"w_G": g, "w_H": h}, low_rank={"w": (rows, cols)}, **kw)
    raw = decode(data, raw=True)
    if min(rows, rank) > 1 and min(rank, cols) > 1 or scan == 0:  # else the unit falls back to raster
        for name, f in (("w_G", g), ("w_H", h)):
            np.testing.assert_array_equal(raw[name], decode(encode({name: f}, **kw))[name], err_msg=name)
    expect = (raw["w_G"].astype(np.float64) @ raw["w_H"].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(decode(data)["w"], expect)


def test_local_scales_apply_to_the_recomposed_weight():
    """Ready decoding of a DC block with LS: ``LS[:, None] * (G @ H)``, LS dropped; with ``like`` a Flax
    kernel (the block weight is in NNR layout) comes back transposed."""
    g, h, s = gauss(6, 2), gauss(2, 4), 1 + gauss(6)
    data = encode({"fc/kernel_G": g, "fc/kernel_H": h, "fc/kernel_scaling": s}, low_rank={"fc/kernel": (6, 4)},
                  blocks={"fc/kernel": {"ls": "fc/kernel_scaling"}}, qp=-48)
    raw, ready = decode(data, raw=True), decode(data)
    w = (raw["fc/kernel_G"].astype(np.float64) @ raw["fc/kernel_H"]).astype(np.float32)
    assert list(ready) == ["fc/kernel"]
    np.testing.assert_array_equal(ready["fc/kernel"], raw["fc/kernel_scaling"][:, None] * w)
    out = decode(data, like={"fc": {"kernel": np.zeros((4, 6), np.float32)}})
    np.testing.assert_array_equal(out["fc"]["kernel"], ready["fc/kernel"].T)


def _pair_stream(g, h, dims, *, swap=False, h_dims=None):
    """A non-block DC pair (two NNR_NDU units, G then H, cpt DC; format digest §2.14): the payloads of a
    plain two-tensor stream with DC headers. NNCodec never writes one (its encoder asserts) and its
    decoder cannot read one (an UnboundLocalError in its non-block DC path), so there is no oracle."""
    units = read_units(encode({"w_G": g, "w_H": h}))
    ndus = [u for u in units if isinstance(u, CompressedDataUnit)]
    dc = dict(compressed_parameter_types=CPT_DC, decomposition_rank=g.shape[1], g_number_of_rows=g.shape[0])
    ndus = [dataclasses.replace(ndus[0], tensor_dimensions=tuple(dims), **dc),
            dataclasses.replace(ndus[1], tensor_dimensions=tuple(h_dims or dims), **dc)]
    return write_stream(units[:3] + (ndus[::-1] if swap else ndus))


def test_non_block_pair_is_recomposed():
    g, h = gauss(12, 2), gauss(2, 10)
    data = _pair_stream(g, h, (12, 5, 2))
    ready, raw = decode(data), decode(data, raw=True)
    assert list(raw) == ["w_G", "w_H"] and list(ready) == ["w"]
    plain = decode(encode({"w_G": g, "w_H": h}))
    for f in ("w_G", "w_H"):
        np.testing.assert_array_equal(raw[f], plain[f])
    np.testing.assert_array_equal(ready["w"], (raw["w_G"].astype(np.float64) @ raw["w_H"]).astype(np.float32)
                                  .reshape(12, 5, 2))


@pytest.mark.parametrize("kw, match", [
    (dict(swap=True), "H tensor without its G"),
    (dict(h_dims=(12, 5, 2)), "followed by its H"),
])
def test_broken_pairs_raise_bitstream_error(kw, match):
    data = _pair_stream(gauss(12, 2), gauss(2, 10), (12, 10), **kw)
    with pytest.raises(BitstreamError, match=match):
        decode(data)
    assert sorted(decode(data, raw=True)) == ["w_G", "w_H"]  # the coded tensors stay readable


def test_lone_g_unit_raises_bitstream_error():
    units = read_units(_pair_stream(gauss(6, 2), gauss(2, 6), (6, 6)))
    with pytest.raises(BitstreamError, match="without its H"):
        decode(write_stream(units[:-1]))


def test_raw_float_unit_with_dc_is_unsupported():
    """A raw float32 unit carries W itself, not factors: a DC header on it is refused by name."""
    units = read_units(encode({"x": gauss(2, 2)}))
    raw_dc = CompressedDataUnit(payload_type=PayloadType.RAW_FLOAT, topology_elem_ids=("w_G",),
                                compressed_parameter_types=CPT_DC, decomposition_rank=1, g_number_of_rows=2,
                                tensor_dimensions=(2, 2), payload=np.ones((2, 2), np.float32))
    with pytest.raises(UnsupportedError, match="RAW_FLOAT with low-rank"):
        decode(write_stream(units[:3] + [raw_dc]))


def test_recomposed_size_is_checked_against_the_limits():
    """Small factors can declare a huge weight: the recomposed size counts against DecodeLimits."""
    data = encode({"w_G": gauss(100, 1), "w_H": gauss(1, 100)}, low_rank={"w": (100, 100)})
    with pytest.raises(LimitError, match="10000 elements"):
        decode(data, limits=DecodeLimits(max_tensor_elements=5000))
    assert decode(data, limits=DecodeLimits(max_tensor_elements=10000))["w"].shape == (100, 100)


def test_low_rank_factors_round_trip_onto_a_flax_model():
    """Flax kernels are factored in NNR layout, so ``decode(like=params)`` puts the recomposed kernel
    back in Flax layout; an exactly rank-2 kernel comes back within the quantization error."""
    kernel = (gauss(30, 2) @ gauss(2, 16)).astype(np.float32)  # Flax (in, out), rank 2
    params = {"Dense_0": {"kernel": kernel, "bias": gauss(16)}, "Dense_1": {"kernel": gauss(16, 4)}}
    flat, dims = low_rank_factors(params, {"Dense_0/kernel": 2})
    assert dims == {"Dense_0/kernel": (16, 30)}
    assert list(flat) == ["Dense_0/kernel_G", "Dense_0/kernel_H", "Dense_0/bias", "Dense_1/kernel"]
    np.testing.assert_allclose(flat["Dense_0/kernel_G"] @ flat["Dense_0/kernel_H"], np.asarray(flax_to_nnr(kernel)),
                               atol=1e-5)
    data = encode(flat, low_rank=dims, qp=-48)
    out = decode(data, like=params)
    assert out["Dense_0"]["kernel"].shape == kernel.shape
    np.testing.assert_allclose(out["Dense_0"]["kernel"], kernel, atol=2e-3)


@pytest.mark.parametrize("params, low_rank, extra, match", [
    ({"w_G": gauss(4, 2)}, {"w": (4, 3)}, {}, "lack the factor 'w_H'"),
    ({"w": gauss(4, 3), "w_G": gauss(4, 2), "w_H": gauss(2, 3)}, {"w": (4, 3)}, {}, "hold 'w' itself"),
    ({"w_G": gauss(4, 2), "w_H": gauss(2, 3)}, {"w": (4, 4)}, {}, "do not factor dims"),
    ({"w_G": gauss(4, 2), "w_H": gauss(3, 3)}, {"w": (4, 3)}, {}, "do not factor dims"),
    ({"w_G": gauss(4), "w_H": gauss(2, 3)}, {"w": (4, 3)}, {}, "2-D float tensor"),
    ({"w_G": np.ones((4, 2), np.int32), "w_H": gauss(2, 3)}, {"w": (4, 3)}, {}, "2-D float tensor"),
    ({"w_G": gauss(4, 2), "w_H": gauss(2, 3)}, {"w": (4, 0)}, {}, "positive integers"),
    ({"w_G": gauss(4, 2), "w_H": gauss(2, 3)}, {"w": "4x3"}, {}, "positive integers"),
    ({"w_G": gauss(4, 2), "w_H": gauss(2, 3)}, [("w", (4, 3))], {}, "must be a mapping"),
    ({"w_G": gauss(8, 2), "w_H": gauss(2, 3), "s": gauss(4)}, {"w": (4, 6)},
     dict(blocks={"w": {"ls": "s"}}), "g_number_of_rows == dims"),
    ({"w_G": gauss(4, 2), "w_H": gauss(2, 3), "v": gauss(4, 3)}, {"w": (4, 3)},
     dict(blocks={"v": {"bi": "w_G"}}), "low-rank factor, not a member"),
    ({"w_G": gauss(4, 2), "w_H": gauss(2, 3)}, {"w": (4, 3)}, dict(blocks={"z": {"bi": "w_G"}}), "no tensor named"),
    ({"w_G": gauss(4, 2), "w_H": gauss(2, 3), "b": np.arange(4, dtype=np.int32)}, {"w": (4, 3)},
     dict(blocks={"w": {"bi": "b"}}), "integer tensor: the low-rank block would have to be split"),
])
def test_bad_low_rank_raises_input_error(params, low_rank, extra, match):
    with pytest.raises(InputError, match=match):
        encode(params, low_rank=low_rank, **extra)


@pytest.mark.parametrize("ranks, kw, match", [
    ({"missing": 1}, {}, "no tensor named 'missing'"),
    ({"w": 5}, {}, r"rank \(for a 3x4 matrix\) must be an integer in \[1, 3\]"),
    ({"w": 1.5}, {}, "must be an integer"),
    ({"ids": 1}, {}, "only float tensors"),
    ({"w": 1}, dict(g_rows={"w": 5}), "does not divide"),
])
def test_bad_low_rank_factors_raise_input_error(ranks, kw, match):
    params = {"w": gauss(3, 4), "ids": np.arange(6, dtype=np.int32).reshape(2, 3)}
    with pytest.raises(InputError, match=match):
        low_rank_factors(params, ranks, **kw)
