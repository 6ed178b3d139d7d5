"""Cross-implementation properties of the DeepCABAC coder against NNCodec 2.1.3's C++ coder.

Thousands of random level tensors (shapes from 1 element to ~10^5, 1-D to 4-D, 1xN and Nx1, all-zero,
sparse, zero rows, Gaussian, heavy-tailed and huge levels; every DQ / unary length / scan order /
row skipping / profile / codebook / param_opt / TCA / HDSP combination) are batched into a few oracle calls:
nncjax must produce NNCodec's bytes, decode NNCodec's bytes to the same levels and the same entry
points, and NNCodec must decode them through our entry points (its seek path).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from nncjax.kernels.coder import CabacDecoder, CabacEncoder
from nncjax.kernels.tables import DQ_NEXT

CASES_PER_BATCH = 300
BATCHES = 8


def _matrix(shape):
    h = shape[0] if len(shape) else 1
    return h, int(np.prod(shape[1:], dtype=np.int64)) if len(shape) >= 2 else 1


def q_to_k(q, scan, rs_active):
    """DQ reconstruction indices k for coded levels q (any shape), following the coder's scan order,
    row skipping and its DQ-state advance of W per skipped row segment. Independent of nncjax."""
    shape = q.shape
    h, w = _matrix(shape)
    q2 = q.reshape(h, w).astype(np.int64)
    k = np.zeros_like(q2)
    b = 4 << scan
    bh, bw = (h, w) if scan == 0 or h == 1 or w == 1 else (b, b)
    zero_row = ~np.any(q2 != 0, axis=1)
    nxt = DQ_NEXT.tolist()
    state = 0
    for r0 in range(0, h, max(bh, 1)):
        for c0 in range(0, w, max(bw, 1)):
            for r in range(r0, min(h, r0 + bh)):
                if rs_active and zero_row[r]:
                    for _ in range(w):
                        state = nxt[state][0]
                    continue
                for x in range(c0, min(w, c0 + bw)):
                    v = int(q2[r, x])
                    if v:
                        k[r, x] = 2 * v - (state & 1) if v > 0 else 2 * v + (state & 1)
                    state = nxt[state][v & 1]
    return k.reshape(shape).astype(np.int32)


def _shape(rng):
    kind = rng.choice(["1d", "row", "col", "2d", "3d", "4d"], p=[0.15, 0.1, 0.1, 0.35, 0.1, 0.2])
    big = rng.random() < 0.03
    n = int(rng.integers(20_000, 120_000)) if big else int(np.exp(rng.uniform(0, np.log(4000))))
    if kind == "1d":
        return (n,)
    if kind == "row":
        return (1, n)
    if kind == "col":
        return (n, 1)
    h = int(np.clip(np.exp(rng.uniform(np.log(2), np.log(max(2, n)))), 2, n))
    w = max(1, n // h)
    if kind == "2d":
        return (h, w)
    if kind == "3d":
        a = int(rng.integers(1, 6))
        return (h, a, max(1, w // a))
    kk = int(rng.choice([1, 3, 5]))
    return (h, max(1, w // (kk * kk)), kk, kk)


def _magnitudes(rng, n, limit):
    dist = rng.choice(["zero", "sparse", "small", "gauss", "heavy", "huge"], p=[0.05, 0.2, 0.25, 0.25, 0.17, 0.08])
    if dist == "zero":
        return np.zeros(n, np.int64)
    if dist == "huge":
        v = rng.integers(-limit, limit + 1, n)
        v[rng.random(n) < 0.5] = 0
        return v
    if dist == "heavy":
        v = np.round(rng.standard_cauchy(n) * rng.uniform(0.5, 20)).clip(-limit, limit).astype(np.int64)
        return v
    sigma = {"sparse": 0.4, "small": 1.2, "gauss": float(np.exp(rng.uniform(0, np.log(300))))}[dist]
    return np.round(rng.normal(0, sigma, n)).astype(np.int64).clip(-limit, limit)


def make_case(rng):
    """One random coder configuration with valid levels, as an ops_coder case dict."""
    shape = _shape(rng)
    n = int(np.prod(shape))
    h, w = _matrix(shape)
    profile = int(rng.random() < 0.85)
    dq = bool(rng.random() < 0.5)
    cbs = off = 0
    if profile == 1 and not dq and rng.random() < 0.2:
        cbs = int(rng.choice([1, 2, 3, int(rng.integers(4, 40)), int(rng.integers(40, 3000))]))
        off = int(rng.choice([0, cbs - 1, int(rng.integers(0, cbs))]))
    row_skip = bool(rng.random() < 0.5)
    scan = int(rng.integers(0, 5))
    if cbs:
        lv = rng.integers(-off, cbs - off, n)
        lv[rng.random(n) < rng.random()] = 0
    else:
        lv = _magnitudes(rng, n, 2**30 - 2 if dq else 2**31 - 2)
        if not dq and n and rng.random() < 0.05:  # the int32 extremes (an NNR_PT_INT tensor holds any int32)
            lv[rng.integers(0, n, 2)] = rng.choice([-2**31, 2**31 - 1], 2)
    lv = lv.reshape(shape)
    if h > 1 and w > 1 and rng.random() < 0.3:  # some all-zero rows
        lv.reshape(h, w)[rng.random(h) < 0.4] = 0
    if cbs == 1:
        lv[...] = 0
    if dq:
        rs_active = profile == 1 and row_skip and w > 1 and h > 1
        lv = q_to_k(lv, scan, rs_active)
    base = hist = None
    parent = bool(rng.random() < 0.1)
    if profile == 1 and rng.random() < 0.25:  # TCA: the previous version's levels select contexts
        base = (lv if rng.random() < 0.5 else _magnitudes(rng, n, 2**31 - 2).reshape(shape)).astype(np.int64)
        base = (base + rng.integers(-2, 3, shape) * (rng.random(shape) < 0.3)).clip(-2**31 + 1, 2**31 - 1)
        base = base.astype(np.int32)
        parent = True  # NNCodec's TCA path keys the HDSP flag on the profile; valid streams have a parent
    if profile == 1 and rng.random() < 0.2:
        hist = (rng.random(shape) < rng.random()).astype(np.int8)
        parent = True
    unary = int(rng.choice([int(rng.integers(1, 13)), int(rng.integers(13, 40)), 256], p=[0.85, 0.12, 0.03]))
    prefix = [[8, int(rng.integers(-128, 128))]] if rng.random() < 0.5 else []
    return {"levels": np.ascontiguousarray(lv, dtype=np.int32), "dq": dq, "n": unary,
            "param_opt": bool(rng.random() < 0.7), "scan": scan, "profile": profile, "row_skip": row_skip,
            "cbs": cbs, "off": off, "parent": parent, "prefix": prefix, "base": base, "hist": hist}


def layer_kwargs(case):
    return {"dq": case["dq"], "scan_order": case["scan"], "profile": case["profile"], "codebook_size": case["cbs"],
            "codebook_offset": case["off"], "parent_present": case["parent"], "base": case["base"],
            "hdsp_hist": case["hist"]}


def encode_case(case):
    enc = CabacEncoder(case["n"], case["param_opt"])
    for nbits, v in case["prefix"]:
        enc.iae_v(nbits, v)
    enc.encode_layer(case["levels"], row_skipping=case["row_skip"], **layer_kwargs(case))
    return enc.finish()


def decode_case(case, data):
    dec = CabacDecoder(data, case["n"])
    prefix = [dec.iae_v(nbits) for nbits, _ in case["prefix"]]
    levels, eps = dec.decode_layer(case["levels"].shape, **layer_kwargs(case))
    return prefix, levels, eps, dec.finish()


def pack_eps(eps):
    return ((eps.offset.astype(np.uint64) << np.uint64(11)) | (eps.value.astype(np.uint64) << np.uint64(3))
            | eps.dq_state.astype(np.uint64))


def _describe(case):
    return {k: v for k, v in case.items() if k != "levels"} | {"shape": case["levels"].shape}


@settings(max_examples=BATCHES, deadline=None, database=None)
@given(seed=st.integers(0, 2**63 - 1))
def test_bytes_levels_and_entry_points_match_nncodec(oracle, seed):
    rng = np.random.default_rng(seed)
    cases = [make_case(rng) for _ in range(CASES_PER_BATCH)]
    theirs = oracle.call("coder", "encode", cases)
    ours = [encode_case(c) for c in cases]
    for c, a, b in zip(cases, ours, theirs):
        assert a == b, f"encoder differs from NNCodec for {_describe(c)}"

    decoded = [decode_case(c, b) for c, b in zip(cases, theirs)]
    dec_cases = []
    for c, b, (prefix, lv, eps, used) in zip(cases, theirs, decoded):
        assert [v for _, v in c["prefix"]] == prefix
        np.testing.assert_array_equal(lv, c["levels"], err_msg=str(_describe(c)))
        assert used == len(b)
        dec_cases.append({k: v for k, v in c.items() if k != "levels"}
                         | {"data": b, "shape": list(c["levels"].shape), "eps": pack_eps(eps) if len(eps) else None})
    their_dec = oracle.call("coder", "decode", dec_cases)
    for c, (_, lv, eps, used), t in zip(cases, decoded, their_dec):
        np.testing.assert_array_equal(t["levels"], lv)
        assert t["nbytes"] == used
        np.testing.assert_array_equal(t["eps"], pack_eps(eps), err_msg=str(_describe(c)))
        if "levels_seek" in t:
            np.testing.assert_array_equal(t["levels_seek"], lv)


def test_golden_vectors_decode_in_nncodec(oracle):
    """The worked example of nnr-format §2.16 through NNCodec's decoder (sanity of the oracle ops)."""
    base = {"n": 11, "scan": 0, "profile": 1, "cbs": 0, "off": 0, "parent": False, "prefix": [[8, -32]],
            "shape": [3, 3]}
    res = oracle.call("coder", "decode", [
        base | {"dq": False, "data": bytes.fromhex("df66800aa185783bba87")},
        base | {"dq": True, "data": bytes.fromhex("df668005 5eae04abcfc0".replace(" ", ""))}])
    assert res[0]["levels"].tolist() == [[3, -6, 0], [64, 0, -1], [0, 0, 0]]
    assert res[1]["levels"].tolist() == [[2, -6, 0], [64, 0, -2], [0, 0, 0]]
    assert res[0]["prefix"] == [-32] and res[0]["nbytes"] == 10
