"""NNCodec's encoder settings beyond the quantizer's, with blocks, low-rank factors and update streams:

* ``encode(opt_qp=True)``: NNCodec's per-tensor QP rule (size and spread of each weight), byte-identical to
  ``nnc.compress(opt_qp=True)``, and sensible where NNCodec fails;
* ``encode(pre_signalling=True)``: the MPS's ``nnr_pre_flag``, as NNCodec's ``pre_signalling``.

Random models with either are also in ``tests/test_interop_model.py``'s batches and settings grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from nncjax import InputError, UpdateState, decode_update, encode_update
from nncjax.codec import decode, encode, inspect

RNG = np.random.default_rng(20261207)


def gauss(*shape, scale=0.05):
    return RNG.normal(0, scale, shape).astype(np.float32)


def qps(data: bytes) -> dict:
    return {t.name: t.qp for t in inspect(data).tensors}


def rule(qp: int, sizes: list[int], stds: list[float]) -> list[int]:
    """The rule written out in float64 (the test's models keep the halves away from float32 rounding)."""
    share = np.array(sizes) / sum(sizes) + 0.1 * (1 - np.array(stds) / max(stds))
    return [int(round(qp * (1 - (0.15 if w > 0.5 else w)))) for w in share]


def test_weights_get_the_rule_others_keep_theirs():
    m = {"big": gauss(60, 50, scale=0.02), "small": gauss(10, 20, scale=0.08), "bias": gauss(60),
         "ids": np.arange(12, dtype=np.int32).reshape(3, 4)}
    got = qps(encode(m, qp=-40, opt_qp=True))
    sizes = [3000, 200, 12]  # the integer weight counts in the shares (NNCodec's rule), but keeps no QP
    stds = [float(np.std(m["big"])), float(np.std(m["small"])), float(np.std(m["ids"]))]
    big, small, _ = rule(-40, sizes, stds)
    assert (got["big"], got["small"], got["bias"], got["ids"]) == (big, small, -75, None)
    assert big == round(-40 * 0.85) and small > -40  # big is > half the weights: share 0.15; both coarser
    assert qps(encode(m, qp=-40)) == {"big": -40, "small": -40, "bias": -75, "ids": None}


def test_overrides_are_scaled_too():
    m = {"a": gauss(30, 30), "b": gauss(30, 30, scale=0.1), "c": gauss(30)}
    got = qps(encode(m, qp=-40, opt_qp=True, qp_overrides={"a": -48, "c": -60}))
    share = rule(-48, [900, 900], [float(np.std(m["a"])), float(np.std(m["b"]))])[0]
    assert got["a"] == share and got["c"] == -60  # a non-weight override stays as given
    assert got["b"] == rule(-40, [900, 900], [float(np.std(m["a"])), float(np.std(m["b"]))])[1]


def test_where_nncodec_fails_we_code():
    """NNCodec raises on a model without weights (max of nothing), on an empty weight (std NaN) and when
    every weight has std 0 (0 / 0); we code the first unchanged, leave empties out of the shares and
    count equal-spread weights as equally wide."""
    vectors = {"b": gauss(8), "g": gauss(5)}
    assert encode(vectors, opt_qp=True) == encode(vectors)
    m = {"w": gauss(20, 10), "empty": np.zeros((0, 4), np.float32)}
    got = qps(encode(m, qp=-36, opt_qp=True))
    assert got["w"] == round(-36 * 0.85)  # the only weight: share 1 -> 0.15
    flat = {"u": np.full((10, 10), 0.25, np.float32), "v": np.zeros((30, 10), np.float32)}
    got = qps(encode(flat, qp=-36, opt_qp=True))
    assert (got["u"], got["v"]) == (round(-36 * 0.75), round(-36 * 0.85))  # shares 0.25 and 0.75 -> 0.15
    np.testing.assert_allclose(decode(encode(flat, qp=-36, opt_qp=True))["u"], flat["u"], atol=2 ** (-27 / 4))


@pytest.mark.parametrize("kw, match", [
    (dict(opt_qp=True, bitdepth=8), "opt_qp cannot be combined with bitdepth"),
    (dict(opt_qp="yes"), "opt_qp"),
    (dict(opt_qp=None), "opt_qp"),
])
def test_bad_opt_qp_raises(kw, match):
    with pytest.raises(InputError, match=match):
        encode({"w": gauss(4, 4)}, **kw)


def test_blocks_match_nncodec(oracle):
    """Block weights are weights at any rank (NNCodec's parameter type); members are not."""
    b = gauss(12)
    model = {"head": gauss(7, 5), "conv.weight": gauss(12, 3, 3, 3, scale=0.2), "conv.bias": b,
             "scale": 1 + gauss(12), "scale.bias": gauss(12)}
    blocks = {"conv.weight": {"bi": "conv.bias"}, "scale": {"bi": "scale.bias"}}
    types = {"conv.weight": "weight", "conv.bias": "bias", "scale": "weight", "scale.bias": "bias"}
    ids = {"conv.weight": "b0", "conv.bias": "b0", "scale": "b1", "scale.bias": "b1"}
    cases, ours = [], []
    for kw in (dict(qp=-38), dict(qp=-30, dq=False, qp_overrides={"head": -44}), dict(qp=-20, codebook=True)):
        ours.append(encode(model, blocks=blocks, row_skipping=False, opt_qp=True, **kw))
        cases.append({"model": model, "block": {"block_identifier": ids, "parameter_type": types},
                      "kwargs": {"qp": kw["qp"], "use_dq": kw.get("dq", True), "nonweight_qp": -75, "opt_qp": True,
                                 "qp_per_tensor": kw.get("qp_overrides"),
                                 "codebook_mode": 2 if kw.get("codebook") else 0}})
    assert qps(ours[0])["scale"] != -38  # the 1-D block weight took the rule
    written = oracle.call("syntax", "generate", cases)
    for data, ref in zip(ours, written):
        assert "error" not in ref, ref.get("error")
        assert ref["bitstream"] == data


def test_low_rank_factors_count_as_their_weight(oracle):
    """G and H count as one weight (G's rows × H's columns, the std of both); G takes H's QP."""
    cases = [({"a": gauss(5, 4), "w_G": gauss(8, 3, scale=0.3), "w_H": gauss(3, 6), "t": gauss(7)},
              {"w": (8, 6)}, {}),
             ({"w_G": gauss(20, 4), "w_H": gauss(4, 30), "w_scaling": 1 + gauss(20), "b": gauss(20),
               "x": gauss(9, 9, scale=0.2)}, {"w": (20, 3, 10)}, {"w": {"ls": "w_scaling", "bi": "b"}}),
             ({"w_G": gauss(16, 2), "w_H": gauss(2, 3), "x": gauss(3, 3)}, {"w": (8, 6)}, {})]
    ours = [encode(p, low_rank=lr, blocks=b, qp=-36, opt_qp=True, qp_overrides={"w_G": -20}) for p, lr, b in cases]
    got = qps(ours[0])
    assert got["w_G"] == got["w_H"] != -36
    written = oracle.call("lowrank", "encode_low_rank", [
        {"params": p, "low_rank": lr, "blocks": b, "qp": -36, "qp_per_tensor": {"w_G": -20}, "opt_qp": True}
        for p, lr, b in cases])
    for data, ref in zip(ours, written):
        assert "error" not in ref, ref.get("error")
        assert ref["bitstream"] == data


def test_update_streams_match_nncodec(oracle):
    """An update stream's rule works on the differences, as NNCodec's (``nnc.compress(opt_qp=True, ...)``)."""
    base = {"conv": gauss(8, 3, 3, 3), "fc": gauss(40, 30), "b": gauss(40)}
    deltas = [{k: (v * RNG.random(v.shape) * 0.2).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    state, streams = UpdateState(), []
    for k, m in enumerate([base] + deltas):
        data, state = encode_update(m, state, differential=k > 0, qp=-36, opt_qp=True)
        streams.append(data)
    ref = oracle.call("update", "sequence", [{"models": [base] + deltas, "hdsp": True,
                                              "kwargs": {"qp": -36, "opt_qp": True, "tca": True,
                                                         "row_skipping": True}}])[0]
    assert "error" not in ref, ref.get("error")
    assert ref["streams"] == streams


def test_pre_signalling_sets_the_flag_in_update_streams_too(oracle):
    """NNCodec's ``pre_signalling`` only sets ``nnr_pre_flag`` (and with it the MPS's parent signalling, so
    every unit carries ``parent_node_id_present_flag``): in a base model's stream and in updates alike."""
    from nncjax.kernels.units import ModelParameterSet, read_units
    base = {"w": gauss(16, 8), "b": gauss(16)}
    delta = {k: (v * 0.1).astype(np.float32) for k, v in base.items()}
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    state, receiver, streams = UpdateState(), UpdateState(), []
    for k, m in enumerate([base, delta, zero, delta]):
        data, state = encode_update(m, state, differential=k > 0, qp=-36, pre_signalling=True)
        streams.append(data)
        # the MPS's parent signalling is on in the whole model too: the units say which stream is an update
        _, receiver = decode_update(data, receiver)
        assert receiver == state, k
    assert state.tensors["w"].depth == 3 and state.tensors["w"].hist is not None
    mps = [next(u for u in read_units(d) if isinstance(u, ModelParameterSet)) for d in streams]
    assert [(u.parent_signalling_enabled_flag, u.pre_flag) for u in mps] == [(1, 1)] * 4
    ref = oracle.call("update", "sequence", [{"models": [base, delta, zero, delta], "hdsp": True, "decode": True,
                                              "kwargs": {"qp": -36, "pre_signalling": True, "tca": True,
                                                         "row_skipping": True}}])[0]
    assert "error" not in ref, ref.get("error")
    assert ref["streams"] == streams
    receiver = UpdateState()
    for k, (data, values) in enumerate(zip(ref["streams"], ref["decoded"])):  # NNCodec decodes what we do
        got, receiver = decode_update(data, receiver)
        for name, arr in values.items():
            np.testing.assert_array_equal(got[name], arr, err_msg=f"{name!r}, stream {k}")
        assert all(not got[n].any() for n in set(got) - set(values))  # left out: a zero difference
    plain = encode(base, qp=-36)
    flagged = encode(base, qp=-36, pre_signalling=True)
    assert flagged != plain
    for k, v in decode(plain).items():
        np.testing.assert_array_equal(decode(flagged)[k], v)
    with pytest.raises(InputError, match="pre_signalling"):
        encode(base, pre_signalling=1.0)


def test_pre_signalling_keeps_all_zero_tensors(oracle):
    """With the MPS's parent signalling on, NNCodec leaves out every unit whose levels are all zero, also
    in a whole model: its decoder then lacks a zero bias. We code them (bytes differ there by design);
    NNCodec's decoder reads our stream whole."""
    m = {"w": gauss(4, 4, scale=0.1), "b": np.zeros(4, np.float32), "tiny": np.full((3, 3), 1e-9, np.float32)}
    ref = oracle.call("model", "encode_decode_many", [{"model": m, "args": {"pre_signalling": True}}])[0]
    assert ref["names"] == ["w"]  # NNCodec's data loss
    ours = encode(m, pre_signalling=True)
    assert list(decode(ours)) == list(m)
    back = oracle.call("model", "decode_many", [ours])[0]
    assert back["names"] == list(m) and not back["arrays"][1].any() and not back["arrays"][2].any()
