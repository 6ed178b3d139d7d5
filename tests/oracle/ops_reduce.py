"""NNCodec's batch-norm folding and its decoder-side unfolding on single blocks, for nncjax.reduce's
interop tests. (NNCodec's DC recomposition is not exercised: its block bookkeeping fails on a
G/H pair built outside its own pipeline.)"""

import numpy as np

_W, _B, _LS = "conv.weight", "conv.bias", "conv.weight_scaling"
_BN = {"bn.beta": "bn.bias", "bn.gamma": "bn.weight", "bn.mean": "bn.running_mean", "bn.var": "bn.running_var"}


class _ApInfo:
    """The two attributes of NNCodec's ApproxInfo that fold_bn touches."""

    def __init__(self, names):
        self.approx_info = {"approx_method": "uniform", "qp": {n: -40 for n in names}, "dq_flag": {n: 0 for n in names}}
        self.qp_other = -75
        self.qp_lsa = -75


def fold_blocks(cases):
    """cases: list of ``{"w", "gamma", "beta", "mean", "var", "bias"?, "ls"?, "tef": bool}`` (float32).
    Returns per case ``{"ls", "bi", "cpt_folded", "unfolded": {beta, gamma, mean, var, bias?}}``:
    NNCodec's fold_bn result and what its decoder's unfold_bn rebuilds from it."""
    from nncodec.nnc_core import approximator, hls
    from nncodec.nnc_core.nnr_model import TopologyStorageFormat

    out = []
    for c in cases:
        params = {_W: np.asarray(c["w"], np.float32)}
        ptype = {_W: "weight"}
        cpt = hls.BlockParameterTypes.NNR_CPT_BN
        if "ls" in c:
            params[_LS] = np.asarray(c["ls"], np.float32)
            ptype[_LS] = "weight.ls"
            cpt += hls.BlockParameterTypes.NNR_CPT_LS
        if "bias" in c:
            params[_B] = np.asarray(c["bias"], np.float32)
            ptype[_B] = "bias"
            cpt += hls.BlockParameterTypes.NNR_CPT_BI
        for kind, name in _BN.items():
            params[name] = np.asarray(c[kind.split(".")[1]], np.float32)
            ptype[name] = kind
        model_info = {
            "parameter_index": {n: i for i, n in enumerate(params)},
            "parameter_type": dict(ptype),
            "parameter_dimensions": {n: list(v.shape) for n, v in params.items()},
            "block_identifier": {n: "b0" for n in params},
            "topology_storage_format": (TopologyStorageFormat.NNR_TPL_TEF if c["tef"]
                                        else TopologyStorageFormat.NNR_TPL_UNREC),
        }
        approx_data = {"parameters": dict(params), "compressed_parameter_types": {"b0": cpt},
                       "approx_method": {}, "scan_order": {}}
        approximator.fold_bn(model_info, approx_data, _ApInfo(list(params)))
        ad = approx_data["parameters"]
        bi_name = _B if "bias" in c else _W + ".bias"  # NNCodec's name for a bias the model lacks
        res = {"ls": ad[_LS], "bi": ad[bi_name], "cpt_folded": int(approx_data["compressed_parameter_types"]["b0"])}
        approximator.unfold_bn(model_info, approx_data)
        res["unfolded"] = {kind.split(".")[1]: ad[name] for kind, name in _BN.items()}
        if _B in ad:
            res["unfolded"]["bias"] = ad[_B]
        out.append(res)
    return out


def fl_sparsify(cases):
    """cases: list of ``{"update": {name: array}, "qp", "qp_density", "target", "gain"}``. Returns per
    case the update after NNCodec's FL client sparsification (``nncodec.fl.encode``'s ``sparsity``
    and ``struct_spars_factor`` steps), in the update's order."""
    from collections import OrderedDict

    from nncodec.framework.applications.utils.sparsification import apply_struct_spars_v2, apply_unstruct_spars_v2

    out = []
    for c in cases:
        upd = OrderedDict((k, np.asarray(v)) for k, v in c["update"].items())
        sparse = apply_unstruct_spars_v2(c["qp"], upd, target_sparsity=c["target"],
                                         qp_density=np.int32(c["qp_density"]))
        if c["gain"] > 0:
            sparse = apply_struct_spars_v2(sparse, gain=c["gain"])
        out.append({k: np.asarray(v) for k, v in sparse.items()})
    return out
