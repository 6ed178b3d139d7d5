"""NNCodec's low-rank (NNR_CPT_DC) encoder, for nncjax's interop tests.

``nncodec.nnc.compress`` has no way to declare a weight as factors, so these cases go through
``nnc_core`` the way its compress pipeline does: the model info describes the full weight ``W``, the
coded parameters hold ``W_G`` and ``W_H`` instead, and ``init_approx_data`` sets cpt DC for the block.
"""

import contextlib
import io
import traceback

import numpy as np

_TYPES = {"ls": "weight.ls", "bi": "bias", "bn_beta": "bn.beta", "bn_gamma": "bn.gamma", "bn_mean": "bn.mean",
          "bn_var": "bn.var"}


def _encode(case):
    from nncodec.nnc_core import nnr_model
    from ops_syntax import core_encode

    params = {k: np.asarray(v) for k, v in case["params"].items()}
    low_rank = {w: [int(d) for d in dims] for w, dims in case["low_rank"].items()}
    blocks = case.get("blocks") or {}
    # The model as NNCodec's model info sees it: W (of its full dims) where G is, H dropped.
    model = {}
    for name, arr in params.items():
        w = next((w for w in low_rank if name == w + "_G"), None)
        if w is not None:
            model[w] = np.zeros(low_rank[w], np.float32)
        elif not any(name == w + "_H" for w in low_rank):
            model[name] = arr
    mi = nnr_model.NNRModel(model).model_info
    for k, w in enumerate(list(low_rank) + [w for w in blocks if w not in low_rank]):
        # set directly: set_block_id_and_param_type drops single-member blocks (a DC-only block)
        mi["block_identifier"][w] = f"blk{k}"
        mi["parameter_type"][w] = "weight"
        for role, member in blocks.get(w, {}).items():
            mi["block_identifier"][member] = f"blk{k}"
            mi["parameter_type"][member] = _TYPES[role]
    enc_info = {"cabac_unary_length_minus1": 10, "param_opt_flag": True, "partial_data_counter": 0,
                "general_profile_idc": 1, "node_id_present_flag": 1, "device_id": 0,
                "mps_parent_signalling_enabled_flag": 0, "parent_node_id_present_flag": 0,
                "temporal_context_modeling_flag": 0, "row_skip_enabled_flag": int(case.get("row_skipping", True)),
                "pre_signalling": 0}
    return core_encode(params, mi, enc_info, qp=case.get("qp", -32), qp_density=case.get("qp_density", 2),
                       scan_order=case.get("scan_order", 0), dq=case.get("dq", True), unary_length_minus1=10,
                       nonweight_qp=case.get("nonweight_qp", -75), qp_per_tensor=case.get("qp_per_tensor"),
                       codebook_mode=case.get("codebook_mode", 0), opt_qp=bool(case.get("opt_qp", False)))


def encode_low_rank(cases):
    """Per case ``{"params": {name: array} with "<w>_G"/"<w>_H" factors, "low_rank": {w: dims},
    "blocks": {w: {role: member}}, "qp", "nonweight_qp", "dq", "scan_order", "qp_per_tensor",
    "codebook_mode", "opt_qp"}`` ->
    ``{"bitstream": bytes}`` or ``{"error": text}``."""
    out = []
    for case in cases:
        try:
            out.append({"bitstream": _encode(case)})
        except Exception:  # noqa: BLE001 (reported to the test, which decides)
            out.append({"error": traceback.format_exc(limit=-3)})
    return out


def decode_factors(streams):
    """NNCodec's decoding of each stream's tensors *as coded* (``nnc_core.coder.decode`` +
    ``approximator.rec``, as ``nnc.decompress`` runs them). Its last step, ``recompose_params``, fails
    on every DC stream (it looks up ``<w>_G`` in a parameter index that holds ``<w>``), so G and H come
    back as decoded; the test recomposes them. Per stream ``{"names", "arrays"}`` or ``{"error"}``."""
    from nncodec.nnc_core import approximator, coder

    out = []
    for data in streams:
        info = {"parameter_type": {}, "parameter_dimensions": {}, "parameter_index": {}, "block_identifier": {},
                "topology_storage_format": None, "topology_compression_format": None,
                "performance_maps": {"mps": {}, "lps": {}},
                "performance_map_flags": {k: {} for k in (
                    "mps_sparsification_flag", "lps_sparsification_flag", "mps_pruning_flag", "lps_pruning_flag",
                    "mps_unification_flag", "lps_unification_flag", "mps_decomposition_performance_map_flag",
                    "lps_decomposition_performance_map_flag")}}
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                dec = coder.decode(bytearray(data), info, hls_stats={}, oob_dict={})
                approximator.rec(dec)
        except BaseException:  # noqa: BLE001 (reported to the test, which decides)
            out.append({"error": traceback.format_exc(limit=-3)})
            continue
        out.append({"names": list(dec["parameters"]), "arrays": [np.asarray(v) for v in dec["parameters"].values()]})
    return out
