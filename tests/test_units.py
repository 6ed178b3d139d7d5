"""Unit-level tests of the NNR syntax: golden bytes (nnr-format.md §2.16), hypothesis round trips of
every unit type and header field, and the checks a hostile stream must hit."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nncjax.kernels import perfmaps as pm
from nncjax.kernels.units import (
    CPT_BI,
    CPT_BN,
    CPT_DC,
    CPT_LS,
    Codebook,
    CompressedDataUnit,
    DecodeLimits,
    EntryPointList,
    LayerParameterSet,
    ModelParameterSet,
    OutOfBand,
    PayloadType,
    StartUnit,
    SyntaxContext,
    TopologyUnit,
    best_codebook_egk,
    codebook_bits,
    concat_entry_points,
    entry_point_count,
    frame_unit,
    iter_units,
    member_entry_points,
    read_unit,
    read_units,
    write_stream,
    write_unit,
)

from nncjax import BitstreamError, InputError, LimitError, UnsupportedStreamError

STR = bytes.fromhex("00040201")
MPS = bytes.fromhex("0008068100400080")
TPL = bytes.fromhex("00060e000000")
NDU_HEADER = bytes.fromhex("0018160977 00d040c120e0c2a080".replace(" ", ""))
PAYLOAD_NO_DQ = bytes.fromhex("df66800aa185783bba87")
PAYLOAD_DQ = bytes.fromhex("df6680055eae04abcfc0")
EXAMPLE = STR + MPS + TPL + NDU_HEADER + PAYLOAD_NO_DQ


def example_ndu(dq_flag=0, payload=PAYLOAD_NO_DQ):
    return CompressedDataUnit(payload_type=PayloadType.FLOAT, topology_elem_ids=("w",), dq_flag=dq_flag,
                              tensor_dimensions=(3, 3), cabac_unary_length_minus1=10, payload=payload)


def strip(u):
    """A unit without its payload, for == comparisons (RAW_FLOAT payloads are arrays)."""
    return dataclasses.replace(u, payload=None) if isinstance(u, CompressedDataUnit) else u


def same_units(a, b):
    assert [strip(x) for x in a] == [strip(y) for y in b]
    for x, y in zip(a, b):
        if isinstance(x, CompressedDataUnit):
            if isinstance(x.payload, np.ndarray):
                assert x.payload.tobytes() == y.payload.tobytes() and x.payload.shape == y.payload.shape
            else:
                assert bytes(x.payload) == bytes(y.payload)


# ------------------------------------------------------------------------------------------ golden


def test_worked_example_writes_byte_exact():
    ctx = SyntaxContext(general_profile_idc=1)
    assert write_unit(StartUnit(general_profile_idc=1)) == STR
    assert write_unit(ModelParameterSet(), ctx) == MPS
    assert write_unit(TopologyUnit(), ctx) == TPL
    assert write_unit(example_ndu(), ctx) == NDU_HEADER + PAYLOAD_NO_DQ
    dq = write_unit(example_ndu(1, PAYLOAD_DQ), ctx)
    assert dq[:7] == NDU_HEADER[:7] and dq[7] == 0x41 and dq[8:14] == NDU_HEADER[8:] and dq[14:] == PAYLOAD_DQ
    assert write_stream([StartUnit(), ModelParameterSet(), TopologyUnit(), example_ndu()]) == EXAMPLE


def test_worked_example_parses():
    s, m, t, n = read_units(EXAMPLE)
    assert s == StartUnit(general_profile_idc=1)
    assert m == ModelParameterSet()
    assert m.qp_density == 2 and m.quantization_parameter == 0 and m.topology_carriage_flag == 1
    assert t == TopologyUnit()
    assert strip(n) == strip(example_ndu())
    assert n.payload == PAYLOAD_NO_DQ
    assert n.span.offset == 18 and n.span.size == 24 and n.span.payload_offset == 14
    assert n.members()[0].shape == (3, 3) and n.element_count() == 9
    assert n.node_id_present_flag == 1 and n.scan_order == 0 and n.first_tensor_dimension_shift == 0


def test_long_unit_size_form():
    payload = bytes(range(256)) * 200  # 51 200 bytes: past the short form
    u = dataclasses.replace(example_ndu(), payload=payload)
    data = write_unit(u, SyntaxContext())
    assert data[0] & 0x80 and int.from_bytes(data[:4], "big") & 0x7FFFFFFF == len(data)
    assert frame_unit(0, data) == (len(data), 4)
    assert read_unit(data)[0].payload == payload
    assert frame_unit(0, bytes.fromhex("80016fef") + bytes(94187)) == (94191, 4)
    # NNCodec's boundary: short form while the whole unit is below 32768 bytes; one byte more and
    # the long form (2 bytes longer) is used
    empty = len(write_unit(dataclasses.replace(u, payload=b""), SyntaxContext()))
    short = write_unit(dataclasses.replace(u, payload=bytes(32767 - empty)), SyntaxContext())
    assert len(short) == 32767 and not short[0] & 0x80 and int.from_bytes(short[:2], "big") == 32767
    long_ = write_unit(dataclasses.replace(u, payload=bytes(32768 - empty)), SyntaxContext())
    assert len(long_) == 32770 and long_[0] & 0x80 and int.from_bytes(long_[:4], "big") & 0x7FFFFFFF == 32770
    assert read_unit(long_)[0].payload == bytes(32768 - empty)



@pytest.mark.parametrize("offset", [4, np.int64(4), np.uint16(4)])
def test_frame_unit_takes_numpy_integer_offsets(offset):
    # NumPy integers were refused (an offset read from an array of unit positions)
    assert frame_unit(offset, bytes.fromhex("00040201" "0008068100400080")) == (8, 2)


@pytest.mark.parametrize("offset", [True, 4.0, -1, 9, None])
def test_frame_unit_refuses_what_is_not_a_position(offset):
    with pytest.raises(InputError, match="is not a position in the 8-byte stream"):
        frame_unit(offset, bytes(8))

# ------------------------------------------------------------------------------------- codebooks


def test_codebook_helpers():
    vals = (-3, 0, 5)
    assert codebook_bits(vals, 1, 0) == 4 + 3 + 3 + 8 + 3 + 5  # egk, size, centre, zero value, deltas 2 and 4
    assert best_codebook_egk(range(-100, 101, 10), 10) == 2  # delta 9: 7, 6, 5, 6 bits at orders 0..3
    assert best_codebook_egk((0, 1, 2), 1) == 0  # all deltas 0: ties go to the smallest order
    big = tuple(range(0, 1 << 20, 1 << 15))
    k = best_codebook_egk(big, 0)
    assert all(codebook_bits(big, 0, k) <= codebook_bits(big, 0, j) for j in range(16))


def test_codebook_in_header_round_trips():
    cb = Codebook(egk=2, values=(-7, -2, 0, 3, 40), zero_offset=2)
    u = dataclasses.replace(example_ndu(), codebook=cb)
    got = read_unit(write_unit(u))[0]
    assert got.codebook == cb and got.codebook.center_offset == 0


# -------------------------------------------------------------------------------- hypothesis units

names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
f32 = st.floats(width=32, allow_nan=False).map(np.float32)
small = st.integers(0, 300)


@st.composite
def codebooks(draw):
    n = draw(st.integers(1, 12))
    deltas = draw(st.lists(st.integers(0, 5000), min_size=n - 1, max_size=n - 1))
    start = draw(st.integers(-10**6, 10**6))
    vals = [start]
    for d in deltas:
        vals.append(vals[-1] + d + 1)
    return Codebook(egk=draw(st.integers(0, 15)), values=tuple(vals), zero_offset=draw(st.integers(0, n - 1)))


@st.composite
def ndus(draw, ctx: SyntaxContext, nncodec_readable=False):
    """Valid NDUs. ``nncodec_readable``: only what NNCodec's hls reader can parse (input parameters
    in band, CPT_DC only in blocks)."""
    pt = draw(st.sampled_from(list(PayloadType)))
    cpt = draw(st.integers(0, 15))
    if nncodec_readable and pt != PayloadType.BLOCK:
        cpt &= ~CPT_DC
    if pt == PayloadType.BLOCK:
        cpt |= draw(st.sampled_from([CPT_LS, CPT_BN, CPT_BI]))  # a block has >= 2 members
    nmem = (2 if cpt & CPT_DC else 1) + bool(cpt & CPT_LS) + 4 * bool(cpt & CPT_BN) + bool(cpt & CPT_BI)
    count = nmem if pt == PayloadType.BLOCK else 1
    if ctx.topology_indexed_reference_flag:
        ids = tuple(draw(st.lists(st.integers(0, 10**6), min_size=count, max_size=count)))
    else:
        ids = tuple(draw(st.lists(names, min_size=count, max_size=count)))
    # NNCodec's reader cannot size a 0-d raw tensor (np.prod(()) is a float there)
    min_rank = 1 if nncodec_readable and pt == PayloadType.RAW_FLOAT else 0
    dims = tuple(draw(st.lists(st.integers(1, 60), min_size=min_rank, max_size=4)))
    if pt == PayloadType.RAW_FLOAT:
        dims = tuple(d % 5 + 1 for d in dims)
    f = {"payload_type": pt, "topology_elem_ids": ids, "compressed_parameter_types": cpt, "tensor_dimensions": dims}
    if cpt & CPT_DC:
        total = int(np.prod(dims)) if dims else 1
        divisors = [d for d in range(1, min(total, 64) + 1) if total % d == 0]
        f.update(g_number_of_rows=draw(st.sampled_from(divisors)), decomposition_rank=draw(st.integers(1, 70)))
    f["decompressed_data_format"] = draw(st.none() | st.integers(0, 9))
    f["partial_data_counter"] = draw(st.none() | st.integers(0, 255))
    f["independently_decodable_flag"] = draw(st.integers(0, 1))
    ipp = 1 if nncodec_readable else draw(st.integers(0, 1))
    f["input_parameters_present_flag"] = ipp
    if ipp:
        f["tensor_dimensions_flag"] = draw(st.integers(0, 1))
        f["cabac_unary_length_flag"] = draw(st.integers(0, 1))
    else:
        f["tensor_dimensions_flag"] = f["cabac_unary_length_flag"] = 0
    f["cabac_unary_length_minus1"] = draw(st.integers(0, 255)) if f["cabac_unary_length_flag"] else 7
    if ctx.general_profile_idc == 1:
        nid = draw(st.integers(0, 1))
        f["node_id_present_flag"] = nid
        f.update(device_id=draw(small), parameter_id=draw(small), put_node_depth=draw(small))
        if ctx.parent_signalling_enabled_flag and draw(st.booleans()):
            ptype = draw(st.integers(0, 2))
            f.update(parent_node_id_present_flag=1, parent_node_id_type=ptype,
                     temporal_context_modeling_flag=draw(st.integers(0, 1)))
            if ptype == 0:
                f["parent_device_id"] = draw(small)
            else:
                f["parent_node_payload_sha"] = draw(st.binary(min_size=32 * ptype, max_size=32 * ptype))
        if not nid:  # device_id is only coded with the node id; the other two also with an NDU_ID parent
            f["device_id"] = 0
            if not f.get("parent_node_id_present_flag", 0) or f["parent_node_id_type"]:
                f.update(parameter_id=0, put_node_depth=0)
    else:
        f["node_id_present_flag"] = 0
    if pt in (PayloadType.FLOAT, PayloadType.BLOCK) and draw(st.booleans()):
        f["codebook"] = draw(codebooks())
        if pt == PayloadType.BLOCK and cpt & CPT_DC:
            f["codebook_dc"] = draw(codebooks())
    if pt != PayloadType.RAW_FLOAT:
        f["dq_flag"] = draw(st.integers(0, 1))
    u = CompressedDataUnit(**f)
    if len(dims) > 1:
        if ctx.general_profile_idc == 1:
            u.first_tensor_dimension_shift = draw(st.integers(0, 3))
        # NNCodec's reader needs a dq_flag for entry points, and RAW_FLOAT units have none
        u.scan_order = 0 if nncodec_readable and pt == PayloadType.RAW_FLOAT else draw(st.integers(0, 4))
        n = entry_point_count(u)
        if u.scan_order:
            vals = np.array(draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)), np.int64)
            dq = np.array(draw(st.lists(st.integers(0, 7 if u.dq_flag else 0), min_size=n, max_size=n)), np.int64)
            off = np.array(draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n)), np.int64)
            u.entry_points = EntryPointList(vals, dq, off)
    if pt == PayloadType.RAW_FLOAT:
        u.payload = np.array(draw(st.lists(f32, min_size=int(np.prod(dims)), max_size=int(np.prod(dims)))),
                             np.float32).reshape(dims)
    else:
        u.payload = draw(st.binary(max_size=40))
    return u


spm = st.builds(pm.SparsificationMap, st.lists(st.builds(
    pm.SparsificationEntry, f32, f32, f32, small, st.lists(f32, max_size=3).map(tuple)), max_size=3).map(tuple))
ppm = st.builds(pm.PruningMap, st.lists(st.builds(
    pm.PruningEntry, f32, f32, small, st.lists(f32, max_size=3).map(tuple)), max_size=3).map(tuple))


@st.composite
def upm(draw):
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        mask = draw(st.integers(0, 3))
        entries.append(pm.UnificationEntry(
            tuple(draw(st.lists(small, max_size=3))), tuple(draw(st.lists(st.integers(0, 255), max_size=3))),
            tuple(draw(st.lists(st.integers(0, 255), max_size=3))), draw(f32), draw(f32), draw(st.integers(0, 255)),
            mask, tuple(draw(st.lists(f32, min_size=mask, max_size=mask)))))
    return pm.UnificationMap(tuple(entries))


dpm = st.builds(pm.DecompositionMap, st.lists(st.builds(
    pm.DecompositionEntry, f32, f32, f32, st.lists(f32, max_size=3).map(tuple)), max_size=3).map(tuple))


@st.composite
def mpss(draw, profile, with_maps=True):
    qmf = draw(st.integers(0, 7))
    f = {"topology_carriage_flag": draw(st.integers(0, 1)), "quantization_method_flags": qmf,
             "topology_indexed_reference_flag": draw(st.integers(0, 1))}
    if with_maps:
        f.update(sparsification_map=draw(st.none() | spm), pruning_map=draw(st.none() | ppm),
                 unification_map=draw(st.none() | upm()), decomposition_map=draw(st.none() | dpm))
    if qmf & 3:
        f.update(qp_density=draw(st.integers(0, 7)), quantization_parameter=draw(st.integers(-4096, 4095)))
    if profile == 1:
        f["base_model_id"] = draw(st.none() | names)
        f["validation_set_performance"] = draw(st.none() | f32)
        f["metric_type_performance_map_valid_flag"] = draw(st.integers(0, 1))
        if f["validation_set_performance"] is not None or f["metric_type_performance_map_valid_flag"]:
            f["performance_metric_type"] = draw(names)
        f["parent_signalling_enabled_flag"] = draw(st.integers(0, 1))
        f["pre_flag"] = draw(st.integers(0, 1)) if f["parent_signalling_enabled_flag"] else 0
    return ModelParameterSet(**f)


lpss = st.builds(LayerParameterSet, self_contained_flag=st.integers(0, 1), quantization_method_flags=st.just(1),
                 qp_density=st.integers(0, 7), quantization_parameter=st.integers(-4096, 4095),
                 sparsification_map=st.none() | spm, pruning_map=st.none() | ppm, unification_map=st.none() | upm())
lpss_no_maps = st.builds(LayerParameterSet, self_contained_flag=st.integers(0, 1), quantization_method_flags=st.integers(0, 7),
                         qp_density=st.integers(0, 7), quantization_parameter=st.integers(-4096, 4095))
tpls = st.one_of(
    st.builds(TopologyUnit, storage_format=st.sampled_from([0, 1, 2, 3, 4, 7, 255]), compression_format=st.integers(0, 255),
              topology_data=names),
    st.builds(TopologyUnit, storage_format=st.just(6), reference_list=st.lists(names, min_size=2, max_size=5).map(tuple)))


@st.composite
def streams(draw, nncodec_readable=False):
    """Valid unit sequences; ``nncodec_readable`` limits them to what NNCodec's hls reader parses
    (no performance maps, see :func:`ndus`)."""
    profile = draw(st.integers(0, 1))
    mps = draw(mpss(profile, with_maps=not nncodec_readable))
    ctx = SyntaxContext(profile, mps.topology_indexed_reference_flag, mps.parent_signalling_enabled_flag)
    lps = lpss_no_maps if nncodec_readable else lpss
    body = draw(st.lists(st.one_of(ndus(ctx, nncodec_readable), lps, tpls), max_size=4))
    return [StartUnit(general_profile_idc=profile), mps] + body


def oob_for(units):
    """Out-of-band values for every NDU that leaves them out (keyed by its names)."""
    out = {}
    for u in units:
        if isinstance(u, CompressedDataUnit):
            for n in u.topology_elem_ids:
                out.setdefault(n, OutOfBand(tuple(u.tensor_dimensions), u.cabac_unary_length_minus1,
                                            u.compressed_parameter_types, u.decomposition_rank, u.g_number_of_rows))
    return out


def unique_names(units):
    seen = [n for u in units if isinstance(u, CompressedDataUnit) for n in u.topology_elem_ids]
    return len(seen) == len(set(seen))


@settings(max_examples=300)
@given(streams())
def test_stream_round_trip(units):
    data = write_stream(units)
    oob = oob_for(units) if unique_names(units) else None
    needs_oob = any(isinstance(u, CompressedDataUnit) and not (u.input_parameters_present_flag and u.tensor_dimensions_flag
                    and u.cabac_unary_length_flag) for u in units)
    if needs_oob and oob is None:
        return  # ambiguous out-of-band keys: covered by other examples
    got = read_units(data, out_of_band=oob)
    if not needs_oob:
        same_units(got, units)
    else:  # out-of-band values may differ in what the reader fills in (cpt/cul defaults)
        assert len(got) == len(units)
    assert write_stream(got) == data
    offsets = [u.span.offset for u in got]
    assert offsets == sorted(offsets) and got[-1].span.offset + got[-1].span.size == len(data)


# ------------------------------------------------------------------------------ hostile streams


def ndu_bytes(**kw):
    return STR + MPS + write_unit(dataclasses.replace(example_ndu(), **kw), SyntaxContext())


def test_declared_huge_tensor_is_refused_before_allocating():
    data = ndu_bytes(tensor_dimensions=(2**20, 2**20), payload=b"\x00")
    assert len(data) < 40
    with pytest.raises(LimitError, match=r"unit 2 \(NNR_NDU\).*tensor_dimensions"):
        read_units(data)
    raw = ndu_bytes(payload_type=PayloadType.RAW_FLOAT, tensor_dimensions=(4,), payload=np.zeros(4, np.float32))
    assert read_units(raw)[2].payload.shape == (4,)
    big_raw = STR + MPS + write_unit(CompressedDataUnit(payload_type=PayloadType.RAW_FLOAT, topology_elem_ids=("r",),
                                                        tensor_dimensions=(1000, 1000), payload=np.zeros((1000, 1000), np.float32)))
    cut = big_raw[:40]
    with pytest.raises(BitstreamError):
        read_units(cut)
    with pytest.raises(LimitError, match="total"):
        read_units(ndu_bytes(tensor_dimensions=(60, 60)), limits=DecodeLimits(max_total_elements=3000))
    with pytest.raises(LimitError, match="count_tensor_dimensions"):
        read_units(ndu_bytes(tensor_dimensions=(1,) * 17))


def test_unit_size_checks():
    with pytest.raises(BitstreamError, match="truncated"):
        read_units(EXAMPLE[:-1])
    bad = bytearray(EXAMPLE)
    bad[19] = 23  # NDU declares 23 bytes: one payload byte becomes a bogus next unit
    with pytest.raises(BitstreamError):
        read_units(bytes(bad))
    with pytest.raises(BitstreamError, match="nnr_unit_size"):
        read_units(bytes.fromhex("0001"))
    with pytest.raises(BitstreamError, match="mps_.*truncated"):
        read_units(STR + bytes.fromhex("0005068100") + MPS[5:])  # MPS cut short by its declared size
    with pytest.raises(InputError, match="offset"):
        read_unit(EXAMPLE, -4)
    with pytest.raises(BitstreamError, match="ends after"):
        read_units(bytes.fromhex("0005020100"))  # STR with a trailing byte


def test_iter_units_yields_until_the_bad_unit():
    it = iter_units(EXAMPLE + EXAMPLE[:4])  # a second STR after a valid stream
    assert [type(next(it)).__name__ for _ in range(4)] == ["StartUnit", "ModelParameterSet", "TopologyUnit",
                                                           "CompressedDataUnit"]
    with pytest.raises(BitstreamError, match="unit 4 .*first unit"):
        next(it)


def test_stream_order_rules():
    with pytest.raises(BitstreamError, match="first unit"):
        read_units(MPS)
    with pytest.raises(BitstreamError, match="first unit"):
        read_units(STR + STR)
    with pytest.raises(BitstreamError, match="second NNR_MPS"):
        read_units(STR + MPS + MPS)
    with pytest.raises(BitstreamError, match="MPS must precede"):
        read_units(STR + TPL)
    with pytest.raises(LimitError, match="units"):
        read_units(EXAMPLE, max_units=3)


def test_unsupported_units_are_named():
    qnt = bytes([0x00, 0x06, 4 << 2 | 2, 0, 0, 0])
    with pytest.raises(UnsupportedStreamError, match="NNR_QNT"):
        read_units(STR + MPS + qnt)
    agg = bytes([0x00, 0x03, 6 << 2 | 2])
    with pytest.raises(UnsupportedStreamError, match="NNR_AGG"):
        read_units(STR + MPS + agg)
    with pytest.raises(BitstreamError, match="unknown unit type"):
        read_units(STR + MPS + bytes([0x00, 0x03, 9 << 2]))
    with pytest.raises(UnsupportedStreamError, match="PRUN"):
        read_units(STR + MPS + bytes.fromhex("00060e050000"))


def test_invalid_field_values_are_named():
    hdr = bytearray(NDU_HEADER)
    hdr[3] = 0x29  # payload type 5
    with pytest.raises(BitstreamError, match="nnr_compressed_data_unit_payload_type"):
        read_units(STR + MPS + bytes(hdr) + PAYLOAD_NO_DQ)
    hdr = bytearray(NDU_HEADER)
    hdr[13] = 0x81  # alignment padding not zero
    with pytest.raises(BitstreamError, match="byte_alignment"):
        read_units(STR + MPS + bytes(hdr) + PAYLOAD_NO_DQ)
    mps = bytearray(MPS)
    mps[4] = 0x07  # profile-1 reserved bits set
    with pytest.raises(BitstreamError, match="reserved"):
        read_units(STR + bytes(mps))
    with pytest.raises(BitstreamError, match="scan_order"):
        read_units(ndu_bytes(scan_order=5))
    bad_name = ndu_bytes(topology_elem_ids=("\u00e9",)).replace("\u00e9".encode(), b"\xc3\x28")
    with pytest.raises(BitstreamError, match="UTF-8"):
        read_units(bad_name)


def test_ndu_without_dimensions_needs_out_of_band():
    data = ndu_bytes(tensor_dimensions_flag=0)
    with pytest.raises(BitstreamError, match="out-of-band"):
        read_units(data)
    u = read_units(data, out_of_band={"w": OutOfBand(tensor_dimensions=(3, 3))})[2]
    assert u.tensor_dimensions == (3, 3) and u.tensor_dimensions_flag == 0


def test_block_members_and_entry_point_counts():
    ids = ("conv.weight", "bn.beta", "bn.gamma", "bn.mean", "bn.var", "conv.bias")
    u = CompressedDataUnit(payload_type=PayloadType.BLOCK, topology_elem_ids=ids,
                           compressed_parameter_types=CPT_BN | CPT_BI, tensor_dimensions=(40, 3, 3, 3), scan_order=2)
    assert [m.name for m in u.members()] == ["conv.bias", "bn.beta", "bn.gamma", "bn.mean", "bn.var", "conv.weight"]
    assert u.members()[0].shape == (40,) and entry_point_count(u) == 2
    dc = CompressedDataUnit(payload_type=PayloadType.BLOCK, topology_elem_ids=("w_G", "w_H", "w.ls"),
                            compressed_parameter_types=CPT_DC | CPT_LS, tensor_dimensions=(64, 32),
                            decomposition_rank=20, g_number_of_rows=64, scan_order=1)
    assert [(m.role, m.shape) for m in dc.members()] == [("ls", (64,)), ("dc_g", (64, 20)), ("dc_h", (20, 32))]
    assert entry_point_count(dc) == (8 - 1) + (3 - 1)
    with pytest.raises(InputError, match="entry points"):
        write_unit(dc)
    ar = lambda *v: np.array(v, np.int64)
    g = EntryPointList(ar(*range(7)), ar(*[1] * 7), ar(*range(100, 107)))
    h = EntryPointList(ar(9, 8), ar(0, 3), ar(50, 60))
    dc.entry_points = concat_entry_points(g, h)
    dc.dq_flag = 1
    assert len(dc.entry_points) == 9
    assert member_entry_points(dc) == [None, g, h]
    got = read_unit(write_unit(dc))[0]
    assert got.entry_points == dc.entry_points and member_entry_points(got)[2] == h
    assert member_entry_points(u) == [None] * 6


def test_writer_rejects_inconsistent_units():
    with pytest.raises(InputError):
        write_unit(dataclasses.replace(example_ndu(), payload_type=PayloadType.INT, codebook=Codebook(0, (1,), 0)))
    with pytest.raises(InputError):
        write_unit(dataclasses.replace(example_ndu(), codebook=Codebook(0, (3, 1), 0)))
    with pytest.raises(InputError):
        write_unit(dataclasses.replace(example_ndu(), topology_elem_ids=("a", "b")))
    with pytest.raises(InputError):
        write_unit(object())
    with pytest.raises(InputError, match="integer"):
        write_unit(dataclasses.replace(example_ndu(), device_id=1.5), SyntaxContext())
    with pytest.raises(InputError, match="topology_elem_ids"):
        write_unit(example_ndu(), SyntaxContext(topology_indexed_reference_flag=1))
    with pytest.raises(InputError, match="out_of_band"):
        read_units(ndu_bytes(tensor_dimensions_flag=0), out_of_band={"w": OutOfBand(tensor_dimensions=(-3, 3))})
