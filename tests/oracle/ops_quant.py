"""NNCodec's quantizers and reconstruction, for nncjax.quantize.reference's interop tests.

``quant_layers``: the C++ ``Encoder.quantLayer`` (with its overflow guard) and ``Decoder.dequantLayer``.
``approx_models``: NNCodec's whole approximator (QP assignment, uniform/DQ, codebook modes 1 and 2,
``int_quant_bw``) followed by its reconstruction, on small models given as name -> array dicts.
"""

import copy

import numpy as np


def quant_layers(cases):
    """cases: list of dicts ``w, qp, qpd, dq, lam, cul_minus1, scan_order``.
    Returns per case ``{"levels", "qp", "rec"}`` or ``{"error"}`` if NNCodec raised."""
    from nncodec.extensions import deepCABAC

    out = []
    for c in cases:
        w = np.ascontiguousarray(c["w"], dtype=np.float32)
        levels = np.zeros(w.shape, dtype=np.int32)
        enc = deepCABAC.Encoder()
        enc.initCtxModels(int(c["cul_minus1"]), 0)
        try:
            qp = enc.quantLayer(w, levels, int(c["dq"]), int(c["qpd"]), int(c["qp"]), float(c["lam"]),
                                int(c["cul_minus1"]), int(c["scan_order"]), 0)
        except Exception as e:  # NNCodec's CHECK failures surface as RuntimeError
            out.append({"error": str(e)})
            continue
        rec = np.zeros(w.shape, dtype=np.float32)
        deepCABAC.Decoder().dequantLayer(rec, levels, int(c["qpd"]), int(qp), int(c["scan_order"]))
        out.append({"levels": levels, "qp": int(qp), "rec": rec})
    return out


def approx_models(cases):
    """cases: list of ``{"model": {name: float32 array}, "settings": {...}}`` with settings keys
    ``qp, qpd, use_dq, codebook_mode, lam, cul_minus1, nonweight_qp, int_quant_bw, scan_order,
    param_opt, profile``. Returns per case ``{name: {"levels", "qp", "method", "dq_flag", "codebook",
    "offset", "egk", "rec"}}``."""
    from nncodec.nnc_core import approximator, nnr_model

    results = []
    for c in cases:
        s = c["settings"]
        model = {k: np.asarray(v) for k, v in c["model"].items()}
        nm = nnr_model.NNRModel(model)
        mi = nm.model_info
        params = {k: model[k] for k in model}
        ad = approximator.init_approx_data(params, mi, qp_density=int(s["qpd"]), scan_order=int(s["scan_order"]))
        cbm = int(s["codebook_mode"])
        ai = approximator.ApproxInfo(ad, mi, "uniform" if cbm == 0 else "codebook", cbm, int(s["qp"]), False,
                                     not s["use_dq"], int(s["cul_minus1"]), float(s["lam"]),
                                     nonweight_qp=s["nonweight_qp"], int_quant_bw=s["int_quant_bw"])
        enc_info = {"cabac_unary_length_minus1": int(s["cul_minus1"]), "param_opt_flag": int(s["param_opt"]),
                    "general_profile_idc": int(s["profile"]), "parent_node_id_present_flag": 0}
        out = approximator.approx(ai.approx_info, mi, ad, enc_info)
        rec = copy.deepcopy(out)
        approximator.rec(rec)
        res = {}
        for k in model:
            method = out["approx_method"].get(k)
            res[k] = {
                "levels": np.asarray(out["parameters"][k]),
                "qp": int(out["qp"][k]) if k in out["qp"] else None,
                "method": method,
                "dq_flag": int(out["dq_flag"].get(k, 0)),
                "codebook": np.asarray(out["codebooks"][k], dtype=np.int32) if method == "codebook" else None,
                "offset": int(out["codebook_zero_offsets"][k]) if method == "codebook" else None,
                "egk": int(out["codebooks_egk"][k]) if method == "codebook" else None,
                "rec": np.asarray(rec["parameters"][k]),
            }
        results.append(res)
    return results
