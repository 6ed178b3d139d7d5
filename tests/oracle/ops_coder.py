"""NNCodec's C++ DeepCABAC coder (``nncodec.extensions.deepCABAC``) driven case by case, in batches.

A *case* is a dict: ``levels`` (int32 array), ``dq``, ``n`` (unary length), ``param_opt``, ``scan``,
``profile``, ``row_skip``, ``cbs``, ``off``, ``parent``, optional ``base`` (TCA levels: encodeLayer2),
``hist`` (HDSP history, int8: HdspMode.TensorOn), optional ``prefix`` (list of ``[nbits, value]``
iae_v fields written before the tensor). Decoding cases carry ``data`` and ``shape`` instead of
``levels`` (and optional ``eps``: packed uint64 entry points to decode through NNCodec's seek path).
"""

import time

import numpy as np


def _hdsp_off():
    from nncodec.extensions.deepCABAC import HdspMode
    return HdspMode.AlwaysOff, np.zeros(2, dtype=np.int8)


def _hdsp(case):
    from nncodec.extensions.deepCABAC import HdspMode
    if case.get("hist") is None:
        return _hdsp_off()
    return HdspMode.TensorOn, np.ascontiguousarray(case["hist"], dtype=np.int8)


def _base(case):
    b = case.get("base")
    return () if b is None else (np.ascontiguousarray(b, dtype=np.int32),)


def _chan_zero(levels, profile):
    chan = np.zeros(levels.shape[0] if levels.ndim else 1, dtype=np.int32)
    if profile == 1 and levels.ndim >= 2:
        chan[:] = ~np.any(levels.reshape(levels.shape[0], -1) != 0, axis=1)
    return chan


def _encode(case):
    from nncodec.extensions import deepCABAC
    lv = np.ascontiguousarray(case["levels"], dtype=np.int32)
    enc = deepCABAC.Encoder()
    for nbits, v in case.get("prefix", []):
        enc.iae_v(int(nbits), int(v))
    enc.initCtxModels(int(case["n"]), int(case["param_opt"]))
    layer = enc.encodeLayer2 if _base(case) else enc.encodeLayer
    layer(lv, *_base(case), int(case["dq"]), int(case["scan"]), int(case["profile"]), int(case["parent"]),
          int(case["row_skip"]) if case["profile"] == 1 else 0, _chan_zero(lv, case["profile"]), *_hdsp(case),
          int(case["cbs"]), int(case["off"]))
    return bytes(enc.finish())


def encode(cases):
    """NNCodec's payload bytes for each case."""
    return [_encode(c) for c in cases]


def _block_rows(shape, scan):
    h = shape[0] if len(shape) else 1
    w = int(np.prod(shape[1:])) if len(shape) >= 2 else 1
    if scan == 0 or w == 1 or h == 1:
        return 0
    return -(-h // (4 << scan))


def _decode(case):
    from nncodec.extensions import deepCABAC
    shape = tuple(int(s) for s in case["shape"])
    data = np.frombuffer(bytes(case["data"]), dtype=np.uint8).copy()
    out = {}
    for mode in ("plain", "seek"):
        if mode == "seek" and case.get("eps") is None:
            continue
        dec = deepCABAC.Decoder()
        dec.setStream(data)
        prefix = [dec.iae_v(int(nbits)) for nbits, _ in case.get("prefix", [])]
        dec.initCtxModels(int(case["n"]))
        lv = np.zeros(shape, dtype=np.int32)
        args = (*_base(case), int(case["dq"]), int(case["scan"]), int(case["profile"]), int(case["parent"]),
                *_hdsp(case), int(case["cbs"]), int(case["off"]))
        tca = bool(_base(case))
        if mode == "seek":
            dec.setEntryPoints(np.ascontiguousarray(case["eps"], dtype=np.uint64))
            (dec.decodeLayer2 if tca else dec.decodeLayer)(lv, *args)
            out["levels_seek"] = lv
            continue
        if _block_rows(shape, int(case["scan"])) > 1:
            create = dec.decodeLayerAndCreateEPs2 if tca else dec.decodeLayerAndCreateEPs
            out["eps"] = np.asarray(create(lv, *args), dtype=np.uint64)
        else:
            (dec.decodeLayer2 if tca else dec.decodeLayer)(lv, *args)
            out["eps"] = np.zeros(0, dtype=np.uint64)
        out["levels"] = lv
        out["prefix"] = prefix
        out["nbytes"] = int(dec.finish())
    return out


def decode(cases):
    """NNCodec's decoding of each case's ``data``: levels, packed entry points, bytes consumed."""
    return [_decode(c) for c in cases]


def quantize(weights, qps, dq=True, qp_density=2, n=11, scan=0, profile=1):
    """``Encoder.quantLayer`` (lambda 0) of each float32 tensor at its qp: the integer levels."""
    from nncodec.extensions import deepCABAC
    out = []
    for w, qp in zip(weights, qps):
        w = np.ascontiguousarray(w, dtype=np.float32)
        q = np.zeros(w.shape, dtype=np.int32)
        enc = deepCABAC.Encoder()
        enc.initCtxModels(n - 1, 0)
        got = enc.quantLayer(w, q, int(dq), int(qp_density), int(qp), 0.0, n - 1, int(scan), int(profile))
        assert got == qp, "QP was clipped"
        out.append(q)
    return out


def time_coder(tensors, dq, n=11, param_opt=True, scan=0, profile=1, row_skip=True, repeat=1):
    """Times (CPU time) NNCodec's C++ coder on whole tensors (best of ``repeat``): encode (initCtxModels +
    encodeLayer + finish, one payload per tensor) and decode (setStream + decodeLayer + finish).
    Returns seconds and the payloads."""
    from nncodec.extensions import deepCABAC
    tensors = [np.ascontiguousarray(t, dtype=np.int32) for t in tensors]
    chans = [_chan_zero(t, profile) for t in tensors]
    hd = _hdsp_off()
    best_enc = best_dec = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        streams = []
        for t, ch in zip(tensors, chans):
            enc = deepCABAC.Encoder()
            enc.initCtxModels(n, int(param_opt))
            enc.encodeLayer(t, int(dq), scan, profile, 0, int(row_skip), ch, *hd, 0, 0)
            streams.append(enc.finish())
        best_enc = min(best_enc, time.process_time() - t0)
        outs = [np.zeros(t.shape, dtype=np.int32) for t in tensors]
        t0 = time.process_time()
        for s, o in zip(streams, outs):
            dec = deepCABAC.Decoder()
            dec.setStream(s)
            dec.initCtxModels(n)
            dec.decodeLayer(o, int(dq), scan, profile, 0, *hd, 0, 0)
            dec.finish()
        best_dec = min(best_dec, time.process_time() - t0)
        for t, o in zip(tensors, outs):
            assert np.array_equal(t, o)
    return {"encode_s": best_enc, "decode_s": best_dec, "streams": [bytes(s) for s in streams]}
