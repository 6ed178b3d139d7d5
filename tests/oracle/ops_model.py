"""Whole-model NNCodec operations for nncjax's codec tests, batched: one call runs many cases.

``nncodec.nn.encode`` does not forward ``qp_density``, ``scan_order``, ``lambda_scale`` or the unary
length to the codec, so cases that set those call ``nncodec.nnc.compress`` with the same defaults the
``nn`` wrapper uses (row skipping on, qp -32, profile 1).
"""

import contextlib
import io
import sys
import tempfile

import numpy as np

# Settings only nnc.compress understands (nn.encode drops them).
_COMPRESS_ONLY = ("qp_density", "scan_order", "lambda_scale", "cabac_unary_length_minus1", "codebook_mode")


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def encode_one(model, args):
    """One model dict + settings -> bytes, via nn.encode or (for compress-only settings) nnc.compress."""
    model = {k: np.asarray(v) for k, v in model.items()}
    with _quiet(), tempfile.TemporaryDirectory() as d:
        if any(k in args for k in _COMPRESS_ONLY):
            from nncodec import nnc
            kw = dict(qp=-32, nonweight_qp=-75, use_dq=True, param_opt=True, row_skipping=True,
                      int_quant_bw=None, codebook_mode=0)
            translate = {"bitdepth": "int_quant_bw", "use_dq": "use_dq", "qp_per_tensor": "qp_per_tensor"}
            for k, v in args.items():
                if k == "approx_method":
                    kw["codebook_mode"] = 2 if v == "codebook" else kw["codebook_mode"]
                else:
                    kw[translate.get(k, k)] = v
            bs = nnc.compress(model, bitstream_path=None, return_bitstream=True, verbose=False, **kw)
        else:
            from nncodec import nn
            bs = nn.encode(model, args=dict(args, results=d, verbose=False))
    return bytes(bs)


def decode_one(data):
    """bytes -> {"names": [...], "arrays": [...]} via nncodec.nn.decode, or {"error": message}."""
    from nncodec import nn
    try:
        with _quiet():
            out = nn.decode(bytearray(data))
    except BaseException as e:  # noqa: BLE001  NNCodec raises SystemExit/AssertionError on some streams
        return {"error": f"{type(e).__name__}: {e}"}
    return {"names": list(out.keys()), "arrays": [np.asarray(v) for v in out.values()]}


def encode_decode_many(cases):
    """cases: list of {"model": dict, "args": dict} -> list of {"bytes", "names", "arrays"} (NNCodec's
    own bitstream and its own decoding of it), or {"error": message} where NNCodec fails."""
    out = []
    for c in cases:
        try:
            bs = encode_one(c["model"], c["args"])
        except BaseException as e:  # noqa: BLE001  NNCodec's known crashes (e.g. codebooks of empty tensors)
            out.append({"error": f"{type(e).__name__}: {e}"})
            continue
        dec = decode_one(bs)
        out.append(dict(dec, bytes=bs))
    return out


def decode_many(streams):
    return [decode_one(s) for s in streams]


def versions():
    import nncodec
    return {"python": sys.version, "nncodec": getattr(nncodec, "__version__", "?")}


def time_nn(model, args, repeat=1):
    """Best-of-``repeat`` wall time of ``nn.encode`` and ``nn.decode`` (measured here, in NNCodec's
    process), with the bitstream and NNCodec's decoding of it."""
    import time

    from nncodec import nn
    model = {k: np.asarray(v) for k, v in model.items()}
    enc_s = dec_s = float("inf")
    for _ in range(repeat):
        with _quiet(), tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            bs = nn.encode(model, args=dict(args, results=d, verbose=False))
            enc_s = min(enc_s, time.perf_counter() - t)
        with _quiet():
            t = time.perf_counter()
            out = nn.decode(bytearray(bs))
            dec_s = min(dec_s, time.perf_counter() - t)
    return {"bytes": bytes(bs), "encode_s": enc_s, "decode_s": dec_s,
            "names": list(out.keys()), "arrays": [np.asarray(v) for v in out.values()]}
