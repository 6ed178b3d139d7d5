"""Interop with NNCodec 2.1.3: parse many real NNCodec bitstreams, re-serialise every unit byte for
byte, and compare every parsed header field with what NNCodec's own reader (``nnc_core.hls``) reads.

All cases go to the oracle in one batch (``ops_syntax.generate``).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nncjax.kernels.units import (
    CompressedDataUnit,
    LayerParameterSet,
    ModelParameterSet,
    OutOfBand,
    PayloadType,
    StartUnit,
    SyntaxContext,
    TopologyUnit,
    context_after,
    member_entry_points,
    read_units,
    write_stream,
    write_unit,
)

from tests.test_units import streams, unique_names

RNG = np.random.default_rng(20261122)


def gauss(*shape, scale=0.05):
    return RNG.normal(0, scale, shape).astype(np.float32)


def with_zero_rows(x, rows):
    x = x.copy()
    x[list(rows)] = 0
    return x


def few_values(*shape, qp_step=2.0**-8):
    return (qp_step * RNG.choice([-37, -5, -1, 0, 0, 0, 2, 9, 120], size=shape)).astype(np.float32)


def block(names_types, block_id="blk"):
    return {"block_identifier": {n: block_id for n in names_types},
            "parameter_type": dict(names_types)}


def bn_block_model(c=40, prefix="conv"):
    w = gauss(c, 3, 3, 3)
    b = gauss(c)
    model = {f"{prefix}.weight": w, f"{prefix}.bn.beta": b, f"{prefix}.bn.gamma": b + 1, f"{prefix}.bn.mean": b * 0.5,
             f"{prefix}.bn.var": np.abs(b) + 1, f"{prefix}.bias": gauss(c)}
    types = {f"{prefix}.weight": "weight", f"{prefix}.bn.beta": "bn.beta", f"{prefix}.bn.gamma": "bn.gamma",
             f"{prefix}.bn.mean": "bn.mean", f"{prefix}.bn.var": "bn.var", f"{prefix}.bias": "bias"}
    return model, block(types)


def cases():
    out = []
    mat = gauss(130, 70)
    for scan in range(5):
        for dq in (False, True):
            out.append({"model": {"fc.weight": mat, "fc.bias": gauss(130), "conv": gauss(70, 4, 3, 3)},
                        "kwargs": {"scan_order": scan, "use_dq": dq}})
    zr = with_zero_rows(gauss(100, 40), range(0, 100, 3))
    for scan in (0, 2, 3):
        out.append({"model": {"sparse": zr}, "kwargs": {"scan_order": scan, "row_skipping": True, "use_dq": True}})
    for dq in (False, True):
        out.append({"model": {"cb": few_values(80, 20), "cb1d": few_values(300), "plain": gauss(9, 9)},
                    "kwargs": {"codebook_mode": 2, "use_dq": dq, "scan_order": 1}})
        out.append({"model": {"cb": few_values(64, 16)}, "kwargs": {"codebook_mode": 1, "use_dq": dq}})
    out.append({"model": {"ints": RNG.integers(-1000, 1000, (20, 30)).astype(np.int32),
                          "ids": np.arange(17, dtype=np.int32), "w": gauss(5, 5)}, "kwargs": {"scan_order": 1}})
    out.append({"model": {"big": gauss(300, 400, scale=1.0)}, "kwargs": {"qp": -40, "scan_order": 4}})
    for qpd in range(8):
        out.append({"model": {"w": gauss(33, 17), "b": gauss(17)},
                    "kwargs": {"qp_density": qpd, "qp": -(8 << qpd), "nonweight_qp": -(12 << qpd)}})
    for cul in (0, 4, 31):
        out.append({"model": {"w": gauss(20, 20)}, "kwargs": {"cabac_unary_length_minus1": cul}})
    for scan, dq in ((0, True), (2, False), (3, True)):
        model, blk = bn_block_model()
        out.append({"model": model, "kwargs": {"scan_order": scan, "use_dq": dq}, "block": blk})
    model, blk = bn_block_model(c=24, prefix="l1")
    ls = {"l1.weight": model["l1.weight"], "l1.weight_scaling": np.ones(24, np.float32) + gauss(24), "l1.bias": model["l1.bias"]}
    out.append({"model": ls, "kwargs": {"scan_order": 1},
                "block": block({"l1.weight": "weight", "l1.weight_scaling": "weight.ls", "l1.bias": "bias"})})
    out.append({"model": {"cbw": few_values(40, 3, 3, 3), "cbw.bias": gauss(40)}, "kwargs": {"codebook_mode": 1, "use_dq": False},
                "block": block({"cbw": "weight", "cbw.bias": "bias"})})
    base = {"w": gauss(64, 32), "b": gauss(32)}
    upd = {"w": base["w"] + gauss(64, 32, scale=0.01), "b": np.zeros(32, np.float32)}
    out.append({"model": upd, "kwargs": {"tca": True, "scan_order": 2}, "diff_base": base})
    out.append({"model": upd, "kwargs": {"tca": False, "use_dq": True}, "diff_base": base})
    bmodel, blk = bn_block_model(c=16, prefix="d")
    bupd = {k: v + gauss(*v.shape, scale=0.01) for k, v in bmodel.items()}
    out.append({"model": bupd, "kwargs": {"tca": False, "scan_order": 1}, "diff_base": bmodel, "block": blk})
    out.append({"model": {"w": gauss(10, 10)}, "kwargs": {"pre_signalling": True}})
    for scan, dq in ((0, False), (2, True)):
        out.append({"model": {"w": gauss(50, 20), "b": gauss(20), "i": np.arange(6, dtype=np.int32).reshape(2, 3)},
                    "kwargs": {"scan_order": scan, "use_dq": dq}, "profile0": True})
    return out


def nncodec_view(unit, ctx: SyntaxContext, raw: bytes) -> dict:
    """Our parsed unit with NNCodec's field names and conventions (what its reader puts in its dict)."""
    d = {"nnr_unit_size_flag": raw[0] >> 7, "nnr_unit_size": len(raw),
         "independently_decodable_flag": unit.independently_decodable_flag,
         "partial_data_counter_present_flag": int(unit.partial_data_counter is not None)}
    if unit.partial_data_counter is not None:
        d["partial_data_counter"] = unit.partial_data_counter
    if isinstance(unit, StartUnit):
        d.update(nnr_unit_type=0, general_profile_idc=unit.general_profile_idc)
    elif isinstance(unit, ModelParameterSet):
        d.update(nnr_unit_type=1, topology_carriage_flag=unit.topology_carriage_flag,
                 mps_sparsification_flag=int(unit.sparsification_map is not None),
                 mps_pruning_flag=int(unit.pruning_map is not None),
                 mps_unification_flag=int(unit.unification_map is not None),
                 mps_decomposition_performance_map_flag=int(unit.decomposition_map is not None),
                 mps_quantization_method_flags=unit.quantization_method_flags,
                 mps_topology_indexed_reference_flag=unit.topology_indexed_reference_flag)
        if ctx.general_profile_idc == 1:
            d.update(base_model_id_present_flag=int(unit.base_model_id is not None),
                     validation_set_performance_present_flag=int(unit.validation_set_performance is not None),
                     metric_type_performance_map_valid_flag=unit.metric_type_performance_map_valid_flag,
                     mps_parent_signalling_enabled_flag=unit.parent_signalling_enabled_flag,
                     nnr_reserved_zero_2bits=0)
            d["nnr_pre_flag" if unit.parent_signalling_enabled_flag else "nnr_reserved_zero_1bit"] = unit.pre_flag
            if unit.base_model_id is not None:
                d["base_model_id"] = unit.base_model_id
            if unit.performance_metric_type is not None:
                d["performance_metric_type"] = unit.performance_metric_type
            if unit.validation_set_performance is not None:
                d["validation_set_performance"] = unit.validation_set_performance.tobytes()
        else:
            d["nnr_reserved_zero_7bits"] = 0
        if unit.quantization_method_flags & 3:
            d.update(mps_qp_density=unit.qp_density, mps_quantization_parameter=unit.quantization_parameter)
    elif isinstance(unit, TopologyUnit):
        d.update(nnr_unit_type=3, topology_storage_format=unit.storage_format,
                 topology_compression_format=unit.compression_format)
        if unit.storage_format == 6:  # REFLIST
            d.update(count_topology_elements_minus2=len(unit.reference_list) - 2,
                     topology_elem_id_list=list(unit.reference_list))
        else:
            d["topology_data"] = unit.topology_data
    elif isinstance(unit, LayerParameterSet):
        d.update(nnr_unit_type=2, lps_self_contained_flag=unit.self_contained_flag, nnr_reserved_zero_7bits=0,
                 nnr_reserved_zero_1_bits=0, lps_sparsification_flag=int(unit.sparsification_map is not None),
                 lps_pruning_flag=int(unit.pruning_map is not None),
                 lps_unification_flag=int(unit.unification_map is not None),
                 lps_quantization_method_flags=unit.quantization_method_flags, nnr_reserved_zero_1bit=0)
        if unit.quantization_method_flags & 3:
            d.update(lps_qp_density=unit.qp_density, lps_quantization_parameter=unit.quantization_parameter)
    elif isinstance(unit, CompressedDataUnit):
        block = unit.payload_type == PayloadType.BLOCK
        d.update(nnr_unit_type=5, nnr_compressed_data_unit_payload_type=int(unit.payload_type),
                 nnr_multiple_topology_elements_present_flag=int(block),
                 nnr_decompressed_data_format_present_flag=int(unit.decompressed_data_format is not None),
                 input_parameters_present_flag=unit.input_parameters_present_flag)
        indexed = ctx.topology_indexed_reference_flag
        if block:
            d.update({"count_topology_elements_minus2": len(unit.topology_elem_ids) - 2,
                      "topology_elem_id_index_list" if indexed else "topology_elem_id_list": list(unit.topology_elem_ids)})
        else:
            d["topology_elem_id_index" if indexed else "topology_elem_id"] = unit.topology_elem_ids[0]
        if ctx.general_profile_idc == 1:
            d["node_id_present_flag"] = unit.node_id_present_flag
            if unit.node_id_present_flag:
                d.update(device_id=unit.device_id, parameter_id=unit.parameter_id, put_node_depth=unit.put_node_depth)
            if ctx.parent_signalling_enabled_flag:
                d["parent_node_id_present_flag"] = unit.parent_node_id_present_flag
                if unit.parent_node_id_present_flag:
                    d.update(parent_node_id_type=int(unit.parent_node_id_type),
                             temporal_context_modeling_flag=unit.temporal_context_modeling_flag)
                    if unit.parent_node_id_type == 0:
                        d["parent_device_id"] = unit.parent_device_id
                        if not unit.node_id_present_flag:
                            d.update(parameter_id=unit.parameter_id, put_node_depth=unit.put_node_depth)
                    else:
                        key = "parent_node_payload_sha256" if unit.parent_node_id_type == 1 else "parent_node_payload_sha512"
                        d[key] = int.from_bytes(unit.parent_node_payload_sha, "big")
        if unit.payload_type in (PayloadType.FLOAT, PayloadType.BLOCK):
            d["codebook_present_flag"] = int(unit.codebook is not None)
        for cb, sfx in ((unit.codebook, ""), (unit.codebook_dc, "dc")):
            if cb is not None:
                d.update({f"codebook_egk__{sfx}": cb.egk, f"codebook_size__{sfx}": len(cb.values),
                          f"CbZeroOffset__{sfx}": cb.zero_offset, f"codebook__{sfx}": list(cb.values)})
        if unit.payload_type != PayloadType.RAW_FLOAT:
            d["dq_flag"] = unit.dq_flag
        if unit.decompressed_data_format is not None:
            d["nnr_decompressed_data_format"] = unit.decompressed_data_format
        d.update(tensor_dimensions_flag=unit.tensor_dimensions_flag, cabac_unary_length_flag=unit.cabac_unary_length_flag,
                 compressed_parameter_types=unit.compressed_parameter_types,
                 count_tensor_dimensions=len(unit.tensor_dimensions), tensor_dimensions=list(unit.tensor_dimensions),
                 cabac_unary_length_minus1=unit.cabac_unary_length_minus1 if unit.cabac_unary_length_flag else 9)
        if unit.decomposition_rank is not None:
            d.update(decomposition_rank=unit.decomposition_rank, g_number_of_rows=unit.g_number_of_rows)
        if len(unit.tensor_dimensions) > 1:
            if ctx.general_profile_idc == 1:
                d["first_tensor_dimension_shift"] = unit.first_tensor_dimension_shift
            d["scan_order"] = unit.scan_order
            if unit.entry_points is not None:
                ep = unit.entry_points
                d["cabac_entry_point_list"] = [[int(o), int(v), int(s)] for o, v, s in zip(ep.offset, ep.value, ep.dq_state)]
    else:
        raise TypeError(f"unexpected unit {unit!r}")
    return d


def theirs_view(ref: dict) -> dict:
    """NNCodec's parsed dict without our bookkeeping keys and with floats as raw bytes."""
    d = {k: v for k, v in ref.items() if not k.startswith("_") and k != "raw_float32_parameter"}
    if "validation_set_performance" in d:
        d["validation_set_performance"] = np.asarray(d["validation_set_performance"], "<f4").tobytes()
    return d


@pytest.fixture(scope="module")
def generated(oracle):
    cs = cases()
    return cs, oracle.call("syntax", "generate", cs)


def test_nncodec_streams_parse_and_rewrite_byte_exact(generated):
    cs, results = generated
    seen = set()
    for case, res in zip(cs, results):
        assert "error" not in res, (case["kwargs"], res.get("error"))
        bs = res["bitstream"]
        oob = {k: OutOfBand(tensor_dimensions=tuple(np.shape(v))) for k, v in case["model"].items()}
        units = read_units(bs, out_of_band=oob)
        assert len(units) == len(res["units"])
        ctx = SyntaxContext(general_profile_idc=0)
        for unit, ref in zip(units, res["units"]):
            raw = bs[ref["_offset"]:ref["_offset"] + ref["_size"]]
            assert unit.span.offset == ref["_offset"] and unit.span.size == ref["_size"]
            assert write_unit(unit, ctx) == raw, (case["kwargs"], type(unit).__name__)
            assert nncodec_view(unit, ctx, raw) == theirs_view(ref), case["kwargs"]
            if isinstance(unit, CompressedDataUnit):
                if unit.payload_type == PayloadType.RAW_FLOAT:
                    assert ref["_touched"] == ref["_size"]
                    assert np.asarray(ref["raw_float32_parameter"]).tobytes() == unit.payload.tobytes()
                else:
                    assert unit.span.payload_offset == ref["_touched"]  # NNCodec's header end
                if unit.entry_points is not None:  # per-member split covers the whole list
                    split = [e for e in member_entry_points(unit) if e is not None]
                    assert sum(len(e) for e in split) == len(unit.entry_points)
                seen.add(("pt", int(unit.payload_type)))
                seen.add(("dq", unit.dq_flag))
                seen.add(("scan", unit.scan_order, unit.entry_points is not None and len(unit.entry_points) > 0))
                seen.add(("codebook", unit.codebook is not None))
                seen.add(("dims_in_band", unit.tensor_dimensions_flag))
                seen.add(("parent", unit.parent_node_id_present_flag, unit.temporal_context_modeling_flag))
                seen.add(("cul", unit.cabac_unary_length_minus1))
                seen.add(("long", bool(raw[0] & 0x80)))
            if isinstance(unit, StartUnit):
                seen.add(("profile", unit.general_profile_idc))
            if isinstance(unit, ModelParameterSet):
                seen.add(("qpd", unit.qp_density))
                seen.add(("pre", unit.pre_flag))
            assert not isinstance(unit, LayerParameterSet)
            ctx = context_after(unit, ctx)
    # the batch really exercised what it claims to
    for feature in [("pt", 0), ("pt", 1), ("pt", 3), ("dq", 0), ("dq", 1), ("codebook", True), ("long", True),
                    ("dims_in_band", 0), ("parent", 1, 1), ("parent", 1, 0), ("pre", 1), ("cul", 0), ("cul", 31),
                    ("profile", 0), ("profile", 1)]:
        assert feature in seen, feature
    for scan in range(1, 5):
        assert ("scan", scan, True) in seen, scan
    assert {("qpd", q) for q in range(8)} <= seen


@settings(max_examples=10, deadline=None)
@given(st.lists(streams(nncodec_readable=True), min_size=16, max_size=16))
def test_nncodec_reads_what_we_write(oracle, batch):
    """The other direction: NNCodec's own reader parses our streams (every unit type it knows,
    RAW_FLOAT, indexed references, SHA parents, DC blocks, entry points) to the same fields."""
    batch = [b for b in batch if unique_names(b)]
    data = [write_stream(units) for units in batch]
    dims = [{str(n): list(u.tensor_dimensions) for u in units if isinstance(u, CompressedDataUnit)
             for n in u.topology_elem_ids} for units in batch]
    results = oracle.call("syntax", "parse_many", data, dims)
    for units, bs, res in zip(batch, data, results):
        assert "error" not in res, res.get("error", "")[-600:]
        ctx = SyntaxContext(general_profile_idc=0)
        for unit, ref in zip(units, res["units"], strict=True):
            raw = bs[ref["_offset"]:ref["_offset"] + ref["_size"]]
            assert nncodec_view(unit, ctx, raw) == theirs_view(ref)
            if isinstance(unit, CompressedDataUnit) and unit.payload_type == PayloadType.RAW_FLOAT:
                assert np.asarray(ref["raw_float32_parameter"], "<f4").tobytes() == unit.payload.tobytes()
            ctx = context_after(unit, ctx)


def test_nncodec_differential_updates_decode_as_nncodec_decodes_them(generated, oracle):
    """NNCodec's differential NDUs (parent_node_id_present_flag = 1, its federated-learning updates)
    decode to NNCodec's own values; one with TCA, whose contexts follow the previous update's levels
    (kept outside the stream), is refused by name. Before, both failed as corrupt payloads."""
    import nncjax
    from nncjax import UnsupportedStreamError

    cs, results = generated
    # (the block case needs its tensor dimensions out of band: not a stream decode() takes alone)
    diff = [(c, r["bitstream"]) for c, r in zip(cs, results) if c.get("diff_base") is not None and "block" not in c]
    assert {c["kwargs"]["tca"] for c, _ in diff} == {True, False}
    for case, bs in diff:
        if case["kwargs"]["tca"]:
            with pytest.raises(UnsupportedStreamError, match="temporal_context_modeling_flag = 1"):
                nncjax.decode(bs, raw=True)
            continue
        ours = nncjax.decode(bs, raw=True)
        theirs = oracle.call("nn", "decode", bs)
        assert sorted(ours) == sorted(theirs["names"])
        for name, arr in zip(theirs["names"], theirs["arrays"]):
            np.testing.assert_array_equal(ours[name], arr)
