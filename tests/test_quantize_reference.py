"""nncjax.quantize.reference against NNCodec 2.1.3: identical levels, QPs, codebook choices and
bit-identical reconstruction. Every interop test sends its whole batch in one oracle call."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax import InputError
from nncjax.kernels.trellis import DQ_BRANCHES
from nncjax.quantize import reference as R
from nncjax.steps import qp_to_step

SHAPES = [(1,), (50,), (1, 40), (40, 1), (20, 30), (3, 4, 5, 6), (17, 70), (70, 17), (9, 9, 3, 3)]


def _weights(rng, shape, kind):
    w = rng.standard_normal(shape)
    if kind == 1:
        w = rng.standard_t(2, shape)  # heavy tails: long remainders in the rate estimate
    elif kind == 2:
        w = w * (rng.random(shape) < 0.3)  # mostly zeros
    elif kind == 3:
        w = np.abs(w)
    return (w * rng.choice([0.01, 0.05, 0.3])).astype(np.float32)


def _qp(rng, qpd):
    # QPs -60..0 at qp_density 2, scaled to the same step range for other densities.
    lo = -60 << qpd >> 2 if qpd >= 2 else -60 >> (2 - qpd)
    return int(rng.integers(lo, 1))


def _layer_case(rng, i):
    shape = SHAPES[i % len(SHAPES)]
    qpd = int(rng.integers(0, 8))
    return dict(w=_weights(rng, shape, int(rng.integers(4))), qp=_qp(rng, qpd), qpd=qpd, dq=int(rng.integers(2)),
                lam=float(rng.choice([0.0, 0.0, 0.1, 0.5, 1.0, 2.0])),
                cul_minus1=int(rng.choice([10, 10, 0, 1, 3, 20])), scan_order=int(rng.integers(0, 5)))


def _ours(c):
    return R.quantize_tensor(c["w"], c["qp"], qp_density=c["qpd"], dq=bool(c["dq"]), lambda_scale=c["lam"],
                             unary_length=c["cul_minus1"] + 1, scan_order=c["scan_order"])


def _check_layers(cases, results):
    for c, r in zip(cases, results):
        where = {k: v for k, v in c.items() if k != "w"} | {"shape": c["w"].shape}
        assert "error" not in r, (where, r)
        levels, qp = _ours(c)
        assert qp == r["qp"], where
        np.testing.assert_array_equal(levels, r["levels"], err_msg=str(where))
        rec = R.reconstruct(levels, qp, qp_density=c["qpd"])
        assert rec.dtype == np.float32 and rec.tobytes() == r["rec"].tobytes(), where


def test_quant_layer_matches_nncodec(oracle):
    """Uniform and DQ, λ = 0 and λ > 0, qp_density 0..7, all scan orders, many shapes and N."""
    rng = np.random.default_rng(20261122)
    cases = [_layer_case(rng, i) for i in range(300)]
    _check_layers(cases, oracle.call("quant", "quant_layers", cases))


@settings(max_examples=3)
@given(st.integers(0, 2**32 - 1))
def test_quant_layer_matches_nncodec_hypothesis(oracle, seed):
    rng = np.random.default_rng(seed)
    cases = [_layer_case(rng, i) for i in range(60)]
    _check_layers(cases, oracle.call("quant", "quant_layers", cases))


def test_overflow_guard_matches_nncodec(oracle):
    """Weights near and beyond 2**31 steps: the same raised QP and levels as NNCodec; where NNCodec's
    guard aborts, ours goes on to a QP that fits."""
    rng = np.random.default_rng(7)
    cases = []
    for qp, qpd in [(-32, 2), (-8, 0), (1, 3), (7, 5), (-100, 6)]:
        step = qp_to_step(qp, qpd)
        for t in (2**31 - 200, 2**31 - 64, 2**31 - 2.5, 2**31 - 0.6, 2**31, 2**31 + 300, 1e12):
            for sign in (1, -1):
                w = (rng.standard_normal(12) * 0.01).astype(np.float32)
                w[3] = np.float32(sign * t * step)
                for dq in (0, 1):
                    for lam in (0.0, 0.5):
                        cases.append(dict(w=w, qp=qp, qpd=qpd, dq=dq, lam=lam, cul_minus1=10, scan_order=0))
    raised = aborted = 0
    for c, r in zip(cases, oracle.call("quant", "quant_layers", cases)):
        levels, qp = _ours(c)
        if "error" in r:
            assert "overflow" in r["error"]
            aborted += 1
            assert qp > c["qp"] and not R._overflows(c["w"], np.float32(qp_to_step(qp, c["qpd"])), c["dq"], c["lam"])
            continue
        raised += r["qp"] != c["qp"]
        assert qp == r["qp"], c
        np.testing.assert_array_equal(levels, r["levels"], err_msg=str(c))
    assert raised > 20 and aborted > 0  # both guard outcomes were exercised


def test_safe_qp_raises_only_when_needed():
    w = np.array([0.1, -3e9], np.float32)
    assert R.safe_qp(w, -32) > -32
    assert R.safe_qp(w[:1], -32) == -32
    levels, qp = R.quantize_tensor(w, -32)
    assert qp == R.safe_qp(w, -32) and abs(int(levels[1])) < 2**31 - 2
    with pytest.raises(InputError):
        R.quantize_dq(w, -32)  # the plain quantizers never change the QP silently


def _model_case(rng, settings_):
    model = {
        "conv": _weights(rng, (8, 3, 3, 3), int(rng.integers(3))),
        "fc": _weights(rng, (20, 33), int(rng.integers(4))),
        "bias": _weights(rng, (20,), int(rng.integers(4))),
        "scale": (np.abs(rng.standard_normal(8)) + 0.5).astype(np.float32),
        "zeros": np.zeros((4, 5), np.float32),
        # few distinct, widely spaced values: the codebook beats uniform coding
        "palette": rng.choice(np.array([-0.75, 0.0, 0.0, 0.3, 1.1], np.float32), (16, 12)),
    }
    return {"model": model, "settings": settings_}


def _settings(**kw):
    base = dict(qp=-32, qpd=2, use_dq=True, codebook_mode=0, lam=0.0, cul_minus1=10, nonweight_qp=-75,
                int_quant_bw=False, scan_order=0, param_opt=1, profile=1)
    return base | kw


MODEL_SETTINGS = [
    _settings(),
    _settings(use_dq=False, nonweight_qp=None, qp=-20),
    _settings(qpd=3, qp=-100, lam=0.7, scan_order=1),
    _settings(codebook_mode=1),
    _settings(codebook_mode=1, use_dq=False, qp=-24, qpd=1),
    _settings(codebook_mode=2),
    _settings(codebook_mode=2, use_dq=False, qp=-12),
    _settings(codebook_mode=2, qp=-12, scan_order=2),
    _settings(codebook_mode=2, profile=0, param_opt=0, qp=-44),
    _settings(codebook_mode=2, lam=0.5, scan_order=1, qpd=0, qp=-6),
    _settings(codebook_mode=1, lam=1.5, use_dq=False),
    _settings(int_quant_bw=8),
    _settings(int_quant_bw=4, use_dq=False),
    _settings(int_quant_bw=6, qpd=4),
    _settings(int_quant_bw=3, lam=0.3, use_dq=False),
    _settings(int_quant_bw=4, codebook_mode=1),
    _settings(int_quant_bw=5, codebook_mode=2, use_dq=False),
    _settings(int_quant_bw=3, codebook_mode=2),
]


def _percentile_model(rng):
    # Sizes that hit both interpolation branches of the 99.95th percentile, and a tensor whose
    # percentile is 0 (then NNCodec falls back to the maximum).
    sparse = np.zeros(5000, np.float32)
    sparse[17] = -0.3
    model = {f"v{n}": _weights(rng, (n,), int(rng.integers(4))) for n in (1, 2, 1201, 3001)}
    return model | {"m": _weights(rng, (40, 50), 0), "sparse": sparse}


def test_approximator_matches_nncodec(oracle):
    """NNCodec's whole approximator on small models: per tensor the same QP (weights vs non-weights),
    levels, method, codebook, CbZeroOffset, egk, bit-depth QP and clipping, and reconstruction."""
    rng = np.random.default_rng(3)
    cases = [_model_case(rng, s) for s in MODEL_SETTINGS for _ in range(2)]
    cases += [{"model": _percentile_model(rng), "settings": _settings(int_quant_bw=b, qpd=q)}
              for b, q in ((8, 2), (4, 0), (6, 5))]
    results = oracle.call("quant", "approx_models", cases)
    seen = set()
    for case, res in zip(cases, results):
        s = case["settings"]
        for name, w in case["model"].items():
            r = res[name]
            where = (name, s)
            is_weight = w.ndim > 1
            qp = s["qp"] if is_weight else R.nonweight_qp(s["qp"], qp_density=s["qpd"], nonweight_qp=s["nonweight_qp"])
            common = dict(qp_density=s["qpd"], lambda_scale=s["lam"], unary_length=s["cul_minus1"] + 1,
                          scan_order=s["scan_order"] if is_weight else 0)
            clip = None
            if s["int_quant_bw"]:
                qp, lo, hi = R.bitdepth_qp(w, s["int_quant_bw"], qp_density=s["qpd"], is_weight=is_weight)
                clip = (lo, hi)
            if s["int_quant_bw"] and not s["codebook_mode"]:
                qp, lo, hi = R.bitdepth_qp(w, s["int_quant_bw"], qp_density=s["qpd"], is_weight=is_weight)
                levels, used = R.quantize_bitdepth(w, s["int_quant_bw"], dq=s["use_dq"], is_weight=is_weight, **common)
                assert (r["method"], used) == ("uniform", r["qp"]), where
                np.testing.assert_array_equal(levels, r["levels"], err_msg=str(where))
                rec = R.reconstruct(levels, used, qp_density=s["qpd"])
                seen.add("bitdepth")
            elif s["codebook_mode"] == 0:
                levels, used = R.quantize_tensor(w, qp, dq=s["use_dq"], **common)
                assert (r["method"], r["qp"], r["dq_flag"]) == ("uniform", used, int(s["use_dq"])), where
                np.testing.assert_array_equal(levels, r["levels"], err_msg=str(where))
                rec = R.reconstruct(levels, used, qp_density=s["qpd"])
                seen.add("uniform")
            else:
                if s["codebook_mode"] == 1:
                    cb = R.quantize_codebook(w, qp, dq_requested=s["use_dq"], clip=clip, **common)
                    use_cb = True
                else:
                    choice = R.choose_codebook_or_uniform(w, qp, dq=s["use_dq"], profile=s["profile"],
                                                          param_opt=bool(s["param_opt"]), clip=clip, **common)
                    cb, use_cb = choice.codebook, choice.use_codebook
                    seen.add(("mode2", use_cb))
                if use_cb:
                    assert r["method"] == "codebook" and r["dq_flag"] == 0, where
                    assert (cb.qp, cb.offset, cb.egk) == (r["qp"], r["offset"], r["egk"]), where
                    np.testing.assert_array_equal(cb.codebook, r["codebook"], err_msg=str(where))
                    np.testing.assert_array_equal(cb.levels, r["levels"], err_msg=str(where))
                    rec = R.reconstruct_codebook(cb.levels, cb.codebook, cb.offset, cb.qp, s["qpd"])
                    assert rec.dtype == np.float64
                else:
                    assert (r["method"], r["qp"], r["dq_flag"]) == ("uniform", choice.uniform_qp, int(choice.dq)), where
                    np.testing.assert_array_equal(choice.uniform_levels, r["levels"], err_msg=str(where))
                    rec = R.reconstruct(choice.uniform_levels, choice.uniform_qp, qp_density=s["qpd"])
            assert rec.dtype == r["rec"].dtype and rec.tobytes() == r["rec"].tobytes(), where
    assert {"uniform", "bitdepth", ("mode2", True), ("mode2", False)} <= seen


# ---------------------------------------------------------------------------------------- local checks


def test_trellis_branches_follow_the_state_machine():
    # Every state has three incoming branches: one parity-1, and a parity-0 pair (non-zero, zero).
    for cur in range(8):
        slots = sorted(int(s) for _, s in DQ_BRANCHES[cur])
        assert 4 in slots and len(set(int(p) for p, _ in DQ_BRANCHES[cur])) == 2


@given(st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=40), st.integers(-40, -8), st.booleans())
def test_reconstruction_is_close_and_dq_parity_holds(values, qp, dq):
    w = np.array(values, np.float32)
    k = R.quantize_dq(w, qp) if dq else R.quantize_uniform(w, qp)
    step = qp_to_step(qp)
    rec = R.reconstruct(k, qp)
    assert np.all(np.abs(rec - w) <= (2.0 if dq else 0.5) * step + 1e-6)
    if dq:  # k must be reachable by the state machine: even multiples in even states, odd (or 0) in odd
        state = 0
        for kk in k.tolist():
            assert kk == 0 or (abs(kk) & 1) == (state & 1)
            q = (kk + (1 if kk > 0 else -1 if kk < 0 else 0) * (state & 1)) >> 1
            state = int([[0, 2], [7, 5], [1, 3], [6, 4], [2, 0], [5, 7], [3, 1], [4, 6]][state][q & 1])


def test_scan_positions_are_block_raster():
    p = R.scan_positions((10, 12), 1)
    assert sorted(p.tolist()) == list(range(120))
    assert p[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    assert p[64:68].tolist() == [8, 9, 10, 11]  # the 4-wide border block follows the first block
    np.testing.assert_array_equal(R.scan_positions((1, 50), 3), np.arange(50))
    np.testing.assert_array_equal(R.scan_positions((50, 1), 3), np.arange(50))


@pytest.mark.parametrize("bad", [np.array([np.nan], np.float32), np.array([np.inf], np.float32),
                                 np.array([1.0], np.float64), np.array([1], np.int32)])
def test_bad_weights_are_rejected(bad):
    with pytest.raises(InputError):
        R.quantize_tensor(bad, -32)


@pytest.mark.parametrize("kw", [dict(qp_density=8), dict(lambda_scale=-1.0), dict(lambda_scale=float("nan")),
                                dict(lambda_scale=1e39), dict(lambda_scale="x"),
                                dict(scan_order=5), dict(unary_length=0), dict(qp=1.5), dict(qp=-600)])
def test_bad_arguments_are_rejected(kw):
    args = dict(qp=-32) | kw
    with pytest.raises(InputError):
        R.quantize_tensor(np.ones(3, np.float32), args.pop("qp"), **args)


def test_codebook_reconstruction_checks_bounds():
    with pytest.raises(InputError):
        R.reconstruct_codebook(np.array([2]), np.array([0, 1]), 0, -32)
    with pytest.raises(InputError):
        R.reconstruct_codebook(np.array([-1]), np.array([0, 1]), 0, -32)


def test_scalars_keep_their_shape():
    for dq in (False, True):
        levels, qp = R.quantize_tensor(np.float32(0.3), -32, dq=dq)
        assert levels.shape == () and int(levels) == (76 if dq else 77) and qp == -32  # DQ state 0: even k
    assert R.quantize_codebook(np.float32(0.3), -32).levels.shape == ()


def test_empty_tensors():
    levels, qp = R.quantize_tensor(np.zeros((0, 5), np.float32), -32, lambda_scale=1.0)
    assert levels.shape == (0, 5) and qp == -32


def test_nonweight_qp_and_codebook_offset():
    assert R.nonweight_qp(-32, qp_density=2) == -75
    assert R.nonweight_qp(-32, qp_density=3, nonweight_qp=None) == -48
    assert R.codebook_qp_offset(3) == 8


def test_codebook_syntax_and_bitdepth_arguments_are_checked():
    """Fifth robustness sweep: IndexError / ZeroDivisionError, or bits counted for unsorted codebooks."""
    cb = np.array([-2, 0, 3])
    for bad in (np.array([3, 0, -2]), np.array([0, 0]), np.array([1.5, 2.5]), np.zeros((1, 3), np.int32)):
        with pytest.raises(InputError, match="strictly increasing"):
            R.codebook_syntax_bits(bad, 0, 0)
        with pytest.raises(InputError, match="strictly increasing"):
            R.codebook_best_egk(bad, 0)
    for offset in (-1, 3, 1.0):
        with pytest.raises(InputError, match="offset"):
            R.codebook_syntax_bits(cb, offset, 0)
    for egk in (-1, 16, 1.5):
        with pytest.raises(InputError, match="egk"):
            R.codebook_syntax_bits(cb, 1, egk)
    with pytest.raises(InputError, match="empty codebook"):
        R.codebook_syntax_bits(np.zeros(0, np.int32), 0, 0)
    assert R.codebook_best_egk(np.zeros(0, np.int32), 0) == 0  # an empty tensor's codebook
    assert R.quantize_codebook(np.zeros((0, 3), np.float32), -20).egk == 0
    with pytest.raises(InputError, match="bitdepth 1"):
        R.bitdepth_qp(np.array([-0.5, 0.5], np.float32), 1)
    assert R.bitdepth_qp(np.array([0.0, 0.5], np.float32), 1)[1:] == (0, 1)
