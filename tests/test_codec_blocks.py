"""NNR_PT_BLOCK writing in :func:`nncjax.encode` (``blocks=``): a weight and its per-row members
(LS, BN β/γ/mean/var, BI) in one NDU, round trip, :func:`nncjax.inspect`, input validation, and
interop with NNCodec 2.1.3 (its decoder reads our blocks; its encoder writes the same bytes).
"""

import numpy as np
import pytest

from nncjax import InputError
from nncjax.codec import decode, encode, inspect

RNG = np.random.default_rng(20261122)
BN_TYPES = {"bn_beta": "bn.beta", "bn_gamma": "bn.gamma", "bn_mean": "bn.mean", "bn_var": "bn.var"}


def gauss(*shape, scale=0.05):
    return RNG.normal(0, scale, shape).astype(np.float32)


def bn_model(c=24, prefix="conv"):
    """A conv weight with an unfolded batch norm and a bias, plus an unrelated tensor before it."""
    b = gauss(c)
    model = {"head": gauss(7, 5), f"{prefix}.weight": gauss(c, 3, 3, 3), f"{prefix}.bn.beta": b,
             f"{prefix}.bn.gamma": b + 1, f"{prefix}.bn.mean": b * 0.5, f"{prefix}.bn.var": np.abs(b) + 1,
             f"{prefix}.bias": gauss(c)}
    roles = {r: f"{prefix}.{t}" for r, t in BN_TYPES.items()} | {"bi": f"{prefix}.bias"}
    return model, {f"{prefix}.weight": roles}


def ls_model(c=20, prefix="fc"):
    """A folded layer (LSA/BNF style): weight, its ``_scaling`` and bias, the members before the weight."""
    model = {f"{prefix}.weight_scaling": 1 + gauss(c), f"{prefix}.bias": gauss(c), f"{prefix}.weight": gauss(c, 40),
             "tail": gauss(9)}
    return model, {f"{prefix}.weight": {"ls": f"{prefix}.weight_scaling", "bi": f"{prefix}.bias"}}


def sparse_levels_model(c=20):
    """A weight on three far-apart grid levels (a codebook codes it best) with uniform members."""
    model, blocks = ls_model(c)
    model["fc.weight"] = (RNG.choice([-40, 0, 40], (c, 40)) * 2.0 ** -8).astype(np.float32)
    return model, blocks


def int_member_model(c=12):
    """A block holding an integer bias: NNCodec writes its tensors as separate units (members first)."""
    model, blocks = ls_model(c)
    model["fc.bias"] = np.arange(c, dtype=np.int32) - c // 2
    return model, blocks


def int_weight_model(c=10):
    """An integer conv weight with a float batch norm and bias: separate units too."""
    model, blocks = bn_model(c)
    model["conv.weight"] = RNG.integers(-50, 50, (c, 3, 3, 3)).astype(np.int32)
    return model, blocks


def vector_weight_model(c=12):
    """A 1-D block weight (a per-channel scale) with its bias: a "weight" to NNCodec, coded with ``qp``."""
    return {"scale": 1 + gauss(c), "scale.bias": gauss(c)}, {"scale": {"bi": "scale.bias"}}


CASES = [  # (model builder, encode kwargs)
    (bn_model, {"scan_order": 0, "dq": True}),
    (bn_model, {"scan_order": 2, "dq": False}),
    (ls_model, {"scan_order": 1, "dq": True}),
    (ls_model, {"scan_order": 0, "dq": True, "nonweight_qp": -60}),
    # with codebooks a block stays one unit only where its members stay uniform and share its dq_flag
    (bn_model, {"scan_order": 0, "dq": True, "codebook": "always"}),
    (bn_model, {"scan_order": 1, "dq": False, "codebook": True}),
    (ls_model, {"scan_order": 0, "dq": True, "codebook": True}),
    (ls_model, {"scan_order": 0, "dq": False, "codebook": True, "qp": -20}),
    (sparse_levels_model, {"scan_order": 1, "dq": False, "codebook": True}),  # one unit, W with a codebook
    (sparse_levels_model, {"scan_order": 0, "dq": True, "codebook": True}),  # W's codebook vs DQ members: split
    (int_member_model, {"scan_order": 1, "dq": True}),  # an integer tensor: split, each unit with the block's cpt
    (int_weight_model, {"scan_order": 0, "dq": True}),  # (the members keep dq: only float units carry it)
    (int_weight_model, {"scan_order": 2, "dq": False, "codebook": True}),
]
# A block weight is a weight at any rank: qp (not nonweight_qp) and its full bit depth, unlike the
# same tensor alone (so not in CASES, whose round trip compares with the tensors coded alone).
VECTOR_CASES = [
    (vector_weight_model, {"scan_order": 0, "dq": True}),
    (vector_weight_model, {"scan_order": 0, "dq": False, "bitdepth": 6}),
    (vector_weight_model, {"scan_order": 1, "dq": False, "codebook": "always", "qp": -20}),
]
CODEBOOK_MODE = {None: 0, True: 2, "always": 1}


def test_round_trip_equals_the_quantizer():
    """Every member decodes (``raw=True``: as coded) to exactly what the same tensor decodes to when
    coded on its own NDU."""
    for build, kw in CASES:
        model, blocks = build()
        got = decode(encode(model, blocks=blocks, **kw), raw=True)
        ref = decode(encode(model, **kw))
        assert set(got) == set(model)
        for k in model:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # overrides reach members: a coarser member QP changes that member only
    model, blocks = ls_model()
    got = decode(encode(model, blocks=blocks, qp_overrides={"fc.bias": -40}), raw=True)
    ref = decode(encode(model, qp_overrides={"fc.bias": -40}))
    assert all(np.array_equal(got[k], ref[k]) for k in model)


def test_inspect_shows_one_block_unit():
    model, blocks = bn_model()
    info = inspect(encode(model, blocks=blocks, scan_order=2, qp=-30, qp_overrides={"conv.bn.gamma": -50}))
    assert [u.type for u in info.units] == ["STR", "MPS", "TPL", "NDU", "NDU"]
    blk = [t for t in info.tensors if t.payload_type == "BLOCK"]
    # coded order: BI, β, γ, mean, var, then W; scan 2 = 16-row blocks -> ceil(24 / 16) - 1 entry points
    assert [t.name for t in blk] == ["conv.bias", "conv.bn.beta", "conv.bn.gamma", "conv.bn.mean", "conv.bn.var",
                                     "conv.weight"]
    # every member's own QP, the weight's after decoding the members before it
    assert [t.qp for t in blk] == [-75, -75, -50, -75, -75, -30]
    assert blk[-1].shape == (24, 3, 3, 3) and blk[-1].scan_order == 2
    assert blk[-1].entry_points == 1 and all(t.shape == (24,) for t in blk[:-1])
    assert len({t.coded_bytes for t in blk}) == 1 and blk[0].parameter_id == 1  # W's input index

    from nncjax.kernels.units import CompressedDataUnit, PayloadType, read_units
    ndu = [u for u in read_units(encode(model, blocks=blocks)) if isinstance(u, CompressedDataUnit)][1]
    assert ndu.payload_type == PayloadType.BLOCK and ndu.compressed_parameter_types == 0x0C
    assert list(ndu.topology_elem_ids) == ["conv.weight", "conv.bn.beta", "conv.bn.gamma", "conv.bn.mean",
                                           "conv.bn.var", "conv.bias"]
    model, blocks = ls_model()
    ndu = next(u for u in read_units(encode(model, blocks=blocks)) if isinstance(u, CompressedDataUnit))
    assert ndu.compressed_parameter_types == 0x0A and ndu.parameter_id == 2
    assert list(ndu.topology_elem_ids) == ["fc.weight", "fc.weight_scaling", "fc.bias"]


def test_a_block_weight_of_any_rank_gets_the_weight_qp():
    model, blocks = vector_weight_model()
    data = encode(model, blocks=blocks, qp=-30, nonweight_qp=-60)
    assert {t.name: t.qp for t in inspect(data).tensors} == {"scale": -30, "scale.bias": -60}


@pytest.mark.parametrize("blocks, codebook, match", [
    ({"nope": {"bi": "fc.bias"}}, False, "no tensor named 'nope'"),
    ({"fc.weight": {"bias": "fc.bias"}}, False, "unknown roles"),
    ({"fc.weight": {"bi": "missing"}}, False, "no tensor named 'missing'"),
    ({"fc.weight": {"bi": ["fc.bias"]}}, False, "no tensor named"),
    ({"fc.weight": {"bi": "tail"}}, False, r"must have shape \(20,\)"),
    ({"fc.weight": {"bn_beta": "fc.bias"}}, False, "batch norm needs all"),
    ({"fc.weight": {"bi": "fc.bias", "ls": "fc.bias"}}, False, "already a member"),
    ({"fc.weight": {}}, False, "non-empty mapping"),
    ({"fc.weight": {"bi": "fc.weight"}}, False, "is a block weight"),
    ([("fc.weight", {})], False, "blocks must be a mapping"),
])
def test_bad_blocks_raise_input_error(blocks, codebook, match):
    model, _ = ls_model()
    model["ids"] = np.arange(20, dtype=np.int32)
    with pytest.raises(InputError, match=match):
        encode(model, blocks=blocks, codebook=codebook)


def test_nncodec_decodes_our_blocks_and_writes_the_same_bytes(oracle):
    """NNCodec's decoder reads our BLOCK streams to exactly our decoding, and ``nnc.compress`` with
    the same block ids and settings writes byte-identical streams."""
    ours, cases = [], []
    for build, kw in CASES + VECTOR_CASES:
        model, blocks = build()
        ours.append(encode(model, blocks=blocks, row_skipping=False, **kw))
        wname, roles = next(iter(blocks.items()))
        types = {wname: "weight"} | {n: {"ls": "weight.ls", "bi": "bias"}.get(r, BN_TYPES.get(r)) for r, n in roles.items()}
        cases.append({"model": model, "block": {"block_identifier": {n: "blk" for n in types}, "parameter_type": types},
                      "kwargs": {"scan_order": kw["scan_order"], "use_dq": kw["dq"], "qp": kw.get("qp", -32),
                                 "nonweight_qp": kw.get("nonweight_qp", -75), "int_quant_bw": kw.get("bitdepth"),
                                 "codebook_mode": CODEBOOK_MODE[kw.get("codebook")]}})
    decoded = oracle.call("model", "decode_many", ours)
    written = oracle.call("syntax", "generate", cases)
    for data, theirs, ref in zip(ours, decoded, written):
        assert "error" not in theirs, theirs.get("error")
        mine = decode(data, raw=True)  # NNCodec's decoder returns LS as coded, not applied
        assert sorted(theirs["names"]) == sorted(mine)
        for name, arr in zip(theirs["names"], theirs["arrays"]):
            np.testing.assert_array_equal(np.asarray(arr, np.float32), mine[name], err_msg=name)
        assert "error" not in ref, ref.get("error")
        assert ref["bitstream"] == data


@pytest.mark.parametrize("build, kw, block, weight_codebook", [
    (bn_model, {"codebook": "always"}, False, True),  # every member takes a codebook: separate units
    (sparse_levels_model, {"codebook": True, "dq": False}, True, True),  # W's codebook in the block header
    (sparse_levels_model, {"codebook": True, "dq": True}, False, True),  # W without DQ, members with: split
    (ls_model, {"codebook": True}, True, False),  # nothing takes a codebook: one block unit
])
def test_codebooks_decide_whether_a_block_stays_one_unit(build, kw, block, weight_codebook):
    """As NNCodec: a block is one unit only if its members stay uniform and share the weight's dq_flag;
    otherwise its tensors become separate units (members first) that still signal the block's cpt."""
    from nncjax.kernels.units import CompressedDataUnit, read_units

    model, blocks = build()
    (wname, roles), = blocks.items()
    data = encode(model, blocks=blocks, **kw)
    info = {t.name: t for t in inspect(data).tensors}
    assert all((info[n].payload_type == "BLOCK") == block for n in [wname, *roles.values()])
    assert (info[wname].codebook_size > 0) == weight_codebook
    ndus = [u for u in read_units(data) if isinstance(u, CompressedDataUnit)]
    unit_of = {name: u for u in ndus for name in u.topology_elem_ids}
    assert len({id(unit_of[n]) for n in [wname, *roles.values()]}) == (1 if block else 1 + len(roles))
    assert len({unit_of[n].compressed_parameter_types for n in [wname, *roles.values()]}) == 1
    if not block:  # members first, where the block would be
        order = [u.topology_elem_ids[0] for u in ndus]
        assert order.index(wname) == max(order.index(n) for n in roles.values()) + 1
    # in a unit or not, every tensor decodes to what coding it alone gives (its own codebook choice)
    alone = decode(encode(model, **kw))
    for name, arr in decode(data, raw=True).items():
        np.testing.assert_array_equal(arr, alone[name], err_msg=name)


def test_dq_overrides_mix_dq_and_uniform_units(oracle):
    """Each NNR unit carries its own dq_flag: tensors coded without DQ next to DQ tensors decode to the
    codec's reconstruction of each, in ours and in NNCodec's decoder; a block's members follow its weight."""
    model, blocks = ls_model()
    model["other"] = gauss(16, 12)
    data = encode(model, qp=-30, blocks=blocks, dq_overrides={"fc.weight": False})
    info = {t.name: t.dq for t in inspect(data).tensors}
    assert info == {"fc.weight_scaling": False, "fc.bias": False, "fc.weight": False, "tail": True, "other": True}
    mine = decode(data, raw=True)
    from nncjax.coded_tensor import codec_reconstruct
    np.testing.assert_array_equal(mine["fc.weight"], codec_reconstruct(model["fc.weight"], -30, dq=False))
    np.testing.assert_array_equal(mine["other"], codec_reconstruct(model["other"], -30, dq=True))
    # a regex key; True where the global setting is False
    flipped = encode(model, qp=-30, dq=False, dq_overrides={r"oth.*": True})
    assert {t.name: t.dq for t in inspect(flipped).tensors}["other"] is True
    theirs = oracle.call("model", "decode_many", [data, flipped])
    for stream, out in zip((data, flipped), theirs):
        assert "error" not in out, out.get("error")
        ref = decode(stream, raw=True)
        for name, arr in zip(out["names"], out["arrays"]):
            np.testing.assert_array_equal(np.asarray(arr, np.float32), ref[name], err_msg=name)


@pytest.mark.parametrize(("kw", "match"), [
    ({"dq_overrides": {"fc.weight": 1}}, "True or False"),
    ({"dq_overrides": {"nothing.*": False}}, "matches no float tensor"),
    ({"dq_overrides": ["fc.weight"]}, "must be a mapping"),
    ({"dq_overrides": {"fc.weight": False}, "codebook": True}, "codebook"),
])
def test_bad_dq_overrides_raise_input_error(kw, match):
    model, _ = ls_model()
    with pytest.raises(InputError, match=match):
        encode(model, **kw)
