"""NNCodec operations for the NNR syntax tests: write bitstreams with ``nncodec.nnc.compress`` and
parse their unit headers with NNCodec's own high-level-syntax reader (``nnc_core.hls``).

One call handles a whole list of cases (starting the worker is the slow part).
"""

import contextlib
import copy
import io
import traceback

import numpy as np


def _plain(v):
    """NNCodec's parsed values -> wire-friendly Python values (ints, strs, lists, arrays)."""
    if isinstance(v, np.ndarray):
        if v.dtype == np.float32 and v.ndim > 0:
            return v
        return [_plain(x) for x in v.tolist()] if v.ndim else _plain(v.item())
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.integer, bool)):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if hasattr(v, "value") and isinstance(v.value, int):  # IntEnum
        return int(v)
    return v


def parse_with_nncodec(bitstream, out_of_band_dims=None):
    """Split ``bitstream`` into units and parse each header with NNCodec's hls reader.

    ``out_of_band_dims``: str(name or index) -> tensor dims for NDUs that leave them out.
    Returns a list of dicts: NNCodec's field names and values, plus ``_offset``, ``_size`` and
    ``_touched`` (bytes NNCodec's reader consumed: the header, plus the payload for RAW_FLOAT).
    """
    from nncodec.nnc_core import hls

    oob = out_of_band_dims or {}
    ctx = {"general_profile_idc": 0, "mps_topology_indexed_reference_flag": 0, "mps_parent_signalling_enabled_flag": 0}
    out, offset = [], 0
    data = bytes(bitstream)
    while offset < len(data):
        reader = hls.BitReader(bytearray(data[offset:]))
        d = {}
        gen = hls.decode_nnr_unit_size_and_header(reader, d)
        next(gen)  # stops after nnr_unit_type
        utype = d["nnr_unit_type"]
        injected = {} if utype == hls.NnrUnitType.NNR_STR else \
            {"general_profile_idc": ctx["general_profile_idc"]} if utype == hls.NnrUnitType.NNR_MPS else dict(ctx)
        d.update(injected)
        for _ in gen:
            if d["nnr_unit_type"] == hls.NnrUnitType.NNR_NDU and "input_parameters_present_flag" in d:
                names = d.get("topology_elem_id_list", d.get("topology_elem_id_index_list", [
                    d.get("topology_elem_id", d.get("topology_elem_id_index"))]))
                if "tensor_dimensions" not in d:
                    dims = next(oob[str(n)] for n in names if str(n) in oob)
                    d["tensor_dimensions"] = list(dims)
                    d["count_tensor_dimensions"] = len(dims)
                d.setdefault("compressed_parameter_types", 0)
                d.setdefault("cabac_unary_length_minus1", 9)
        hls.decode_nnr_unit_payload(reader, d)
        if d["nnr_unit_type"] == hls.NnrUnitType.NNR_STR:
            ctx["general_profile_idc"] = d["general_profile_idc"]
        if d["nnr_unit_type"] == hls.NnrUnitType.NNR_MPS:
            ctx["mps_topology_indexed_reference_flag"] = d["mps_topology_indexed_reference_flag"]
            ctx["mps_parent_signalling_enabled_flag"] = d.get("mps_parent_signalling_enabled_flag", 0)
        size = d["nnr_unit_size"]
        touched = reader.getNumBytesTouched()
        res = {k: _plain(v) for k, v in d.items() if k not in injected}
        if "cabac_entry_point_list" in d:
            eps = [int(e) for e in d["cabac_entry_point_list"]]
            res["cabac_entry_point_list"] = [[e >> 11, (e >> 3) & 255, e & 7] for e in eps]
        res.update(_offset=offset, _size=size, _touched=touched)
        out.append(res)
        offset += size
    return out


def _compress(model, kwargs, block=None, base=None):
    from nncodec import nnc
    kw = {"qp": -32, "nonweight_qp": -75, "use_dq": True, "param_opt": True, "row_skipping": False, "codebook_mode": 0}
    kw.update(kwargs)
    if block is not None:
        kw["block_id_and_param_type"] = copy.deepcopy(block)
    if base is not None:
        kw["approx_param_base"] = base
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(nnc.compress(model, bitstream_path=None, return_bitstream=True, verbose=False, **kw))


def core_encode(params, model_info, enc_info, *, qp, qp_density, scan_order, dq, unary_length_minus1,
                nonweight_qp=-75, qp_per_tensor=None, codebook_mode=0, opt_qp=False):
    """NNCodec's uniform (``codebook_mode`` 0) or codebook (1: always, 2: when smaller) approximation
    and encoding through ``nnc_core`` (what ``nnc.compress`` runs, for the cases it cannot express):
    ``params`` coded against ``model_info``."""
    from nncodec.nnc_core import approximator, coder
    ad = approximator.init_approx_data(params, model_info, qp_density, scan_order)
    ai = approximator.ApproxInfo(ad, model_info, "uniform", codebook_mode, qp, opt_qp, not dq, unary_length_minus1,
                                 0.0, nonweight_qp=nonweight_qp, qp_per_tensor=qp_per_tensor)
    with contextlib.redirect_stdout(io.StringIO()):
        ade = approximator.approx(ai.approx_info, model_info, ad, enc_info)
        bs, _ = coder.encode(enc_info, model_info, ade)
    return bytes(bs)


def _compress_profile0(model, kwargs):
    """Profile-0 streams (``nnc.compress`` hard-codes profile 1)."""
    from nncodec.nnc_core import nnr_model
    kw = {"qp": -32, "qp_density": 2, "use_dq": True, "scan_order": 0, "cabac_unary_length_minus1": 10}
    kw.update(kwargs)
    enc_info = {"cabac_unary_length_minus1": kw["cabac_unary_length_minus1"], "param_opt_flag": True,
                "general_profile_idc": 0, "node_id_present_flag": 0, "mps_parent_signalling_enabled_flag": 0,
                "parent_node_id_present_flag": 0}
    return core_encode(model, nnr_model.NNRModel(model).model_info, enc_info, qp=kw["qp"],
                       qp_density=kw["qp_density"], scan_order=kw["scan_order"], dq=kw["use_dq"],
                       unary_length_minus1=kw["cabac_unary_length_minus1"])


def generate(cases):
    """Encode each case and parse it back with NNCodec's reader.

    A case: ``{"model": {name: array}, "kwargs": {...nnc.compress args...}, "block": None or
    block_id_and_param_type, "diff_base": None or a model dict, "profile0": bool}``. With ``diff_base`` the base model
    is encoded first (building NNCodec's ``approx_param_base``) and then ``model`` as a differential
    update with ``compress_differences=True``.
    Returns per case ``{"bitstream": bytes, "units": [...]}`` or ``{"error": text}``.
    """
    results = []
    for case in cases:
        model = {k: np.asarray(v) for k, v in case["model"].items()}
        try:
            base = None
            if case.get("profile0"):
                bs = _compress_profile0(model, case["kwargs"])
            elif case.get("diff_base") is not None:
                base = {"parameters": {}, "put_node_depth": {}, "device_id": 0, "parameter_id": {}}
                bmodel = {k: np.asarray(v) for k, v in case["diff_base"].items()}
                _compress(bmodel, dict(case["kwargs"], update_base_param=True), case.get("block"), base)
                bs = _compress(model, dict(case["kwargs"], compress_differences=True), case.get("block"), base)
            else:
                bs = _compress(model, case["kwargs"], case.get("block"))
            dims = {k: list(v.shape) for k, v in model.items()}
            results.append({"bitstream": bs, "units": parse_with_nncodec(bs, dims)})
        except Exception:  # noqa: BLE001 (reported to the test, which decides)
            results.append({"error": traceback.format_exc(limit=-3)})
    return results


def parse_many(streams, out_of_band_dims):
    """``parse_with_nncodec`` over a batch; an exception becomes ``{"error": text}`` for that stream."""
    out = []
    for bs, dims in zip(streams, out_of_band_dims):
        try:
            out.append({"units": parse_with_nncodec(bs, dims)})
        except Exception:  # noqa: BLE001 (reported to the test)
            out.append({"error": traceback.format_exc(limit=-3)})
    return out
