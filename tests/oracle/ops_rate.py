"""Rate and quantization ground truth from NNCodec's C++ DeepCABAC (``nncodec.extensions.deepCABAC``).

Used by tests/test_rate.py, tests/test_quantize_jax.py and benchmarks/bench_rate.py: the real coded size
of integer levels, and NNCodec's own encoder-side quantization (``quantLayer``) for comparison.
"""

import numpy as np


def _encoder_bytes(levels, dq, n_gt, param_opt, profile, row_skip, qp_delta, qp_density):
    from nncodec.extensions import deepCABAC
    from nncodec.nnc_core.hdsp.hdsp_tool import HDSP_OPTS_OFF

    lev = np.ascontiguousarray(levels, dtype=np.int32)
    if lev.ndim == 0:
        lev = lev.reshape(1)
    enc = deepCABAC.Encoder()
    if qp_delta is not None:
        enc.iae_v(6 + qp_density, int(qp_delta))
    enc.initCtxModels(int(n_gt), int(param_opt))
    rows = np.zeros(lev.shape[0], dtype=np.int32)
    if profile == 1 and lev.ndim >= 2:
        rows = (~np.any(lev.reshape(lev.shape[0], -1), axis=1)).astype(np.int32)
    enc.encodeLayer(lev, int(dq), 0, int(profile), 0, int(row_skip) if profile == 1 else 0, rows,
                    *HDSP_OPTS_OFF(), 0, 0)
    return len(enc.finish().tobytes())


def coded_bytes(cases):
    """Payload bytes of one NDU holding one tensor of integer levels (k values for DQ), per case.

    case: dict(levels=int32 array, dq=bool, n_gt=N (cabac_unary_length_minus1 + 1), param_opt=bool,
    profile=0|1, row_skip=bool, qp_delta=int or None, qp_density=int). Raster scan.
    """
    out = []
    for c in cases:
        out.append(_encoder_bytes(c["levels"], c.get("dq", False), c.get("n_gt", 11), c.get("param_opt", True),
                                  c.get("profile", 1), c.get("row_skip", True), c.get("qp_delta", None),
                                  c.get("qp_density", 2)))
    return out


def quant_layer(cases):
    """NNCodec's encoder-side quantizer ``Encoder.quantLayer`` (uniform or DQ trellis) per case.

    case: dict(weights=float32 array, dq=bool, qp=int, qp_density=int, lambda_scale=float,
    cul_minus1=int). Returns a list of dict(levels=int32 array (k values), qp=int).
    """
    from nncodec.extensions import deepCABAC

    out = []
    for c in cases:
        w = np.ascontiguousarray(c["weights"], dtype=np.float32)
        k = np.zeros(w.shape, dtype=np.int32)
        enc = deepCABAC.Encoder()
        cul = int(c.get("cul_minus1", 10))
        enc.initCtxModels(cul, 0)
        qp = enc.quantLayer(w, k, int(c.get("dq", True)), int(c.get("qp_density", 2)), int(c["qp"]),
                            float(c.get("lambda_scale", 0.0)), cul, 0, 0)
        out.append({"levels": k, "qp": int(qp)})
    return out
