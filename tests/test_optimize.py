"""nncjax.optimize: gradient RD optimisation of per-tensor QPs and local scales, checked by real coding.

One optimisation configuration (digits MLP, DQ, local scales, output distortion) is shared by most
tests so that the jit-compiled step is compiled once per session.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nncjax import models
from nncjax.codec import decode, encode, inspect
from nncjax.coded_tensor import levels_bits
from nncjax.errors import InputError
from nncjax.models.digits_mlp import load_digits_split
from nncjax.optimize import optimize
from nncjax.quantize.reference import quantize_tensor, reconstruct
from nncjax.rd_settings import LS_SUFFIX, RDSettings, verify
from nncjax.steps import equivalent_qp
from tests._host_devices import run_on_host_devices

STEPS = 60


@pytest.fixture(scope="module")
def runs(digits):
    m, calib, _ = digits
    # starting near the optimum (QP -24) lets each lambda settle within STEPS (Adam moves <= 0.2 QP a step)
    return {lam: optimize(m.params, m.apply, calib, lam=lam, base_qp=-24, steps=STEPS, progress=False)
            for lam in (3e-4, 3e-3, 3e-2)}


def test_step_is_jitted_and_loss_decreases(runs):
    rd = runs[3e-2]
    h = rd.history
    assert set(h) == {"loss", "distortion", "rate_bits"}
    assert all(v.shape == (STEPS,) and np.all(np.isfinite(v)) for v in h.values())
    assert h["loss"][-5:].mean() < 0.9 * h["loss"][:5].mean()
    assert h["rate_bits"][-1] < h["rate_bits"][0]          # the rate term pulls the QPs up ...
    assert h["distortion"][-1] > h["distortion"][0]        # ... at the price of distortion


def test_larger_lambda_gives_fewer_real_bytes(digits, runs):
    m, _, _ = digits
    sizes = [verify(m.params, runs[lam]).nbytes for lam in sorted(runs)]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    qps = [runs[lam].qp_overrides["params/fc1/kernel"] for lam in sorted(runs)]
    assert qps == sorted(qps)


def test_settings_round_trip_through_the_codec(digits, runs):
    m, _, _ = digits
    rd = runs[3e-3]
    assert isinstance(rd, RDSettings)
    assert set(rd.qp_overrides) == {"params/fc1/kernel", "params/fc2/kernel",
                                    "params/fc1/kernel" + LS_SUFFIX, "params/fc2/kernel" + LS_SUFFIX}
    flat = rd.params_for_encoding(m.params)
    res = verify(m.params, rd, lambda p: m.eval(p)["top1"])
    # the stream carries the chosen QPs
    info = {t.name: t.qp for t in inspect(res.bitstream).tensors}
    for name, qp in rd.qp_overrides.items():
        assert info[name] == qp
    assert info["params/fc1/bias"] == -75
    raw = decode(res.bitstream, raw=True)
    units = {t.name: t for t in inspect(res.bitstream).tensors}
    for name, s in rd.local_scales.items():
        # scales are on the codec's grid: decoded exactly, as the LS member of the weight's block
        np.testing.assert_array_equal(raw[name + LS_SUFFIX], s)
        # the weight is coded as W / s in NNR layout (rows first) and comes back as s * Q(W / s)
        assert flat[name].shape == np.asarray(m.params["params"][name.split("/")[1]]["kernel"]).T.shape
        levels, qp = quantize_tensor(flat[name], rd.qp_overrides[name], dq=True)
        np.testing.assert_array_equal(raw[name], reconstruct(levels, qp))
        got = np.asarray(res.params["params"][name.split("/")[1]]["kernel"])
        np.testing.assert_array_equal(got, (raw[name] * s[:, None]).T)
        assert units[name].name == name
    # the default decode of the stream is the ready model: nothing to restore by hand
    ready = decode(res.bitstream, like=m.params)
    for a, b in zip(jax.tree_util.tree_leaves(ready), jax.tree_util.tree_leaves(res.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored = rd.restore(decode(res.bitstream, raw=True), like=m.params)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(res.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.all(np.concatenate([s for s in rd.local_scales.values()]) == 1.0)
    assert res.metric > 0.9
    assert res.nbytes == len(encode(flat, **rd.encode_kwargs()))
    # the payload estimate is the coder's: the stream adds only unit headers and names
    assert 0 < res.nbytes * 8 - rd.estimated_bits < 8 * 400
    # each optimised weight's share: its coded levels (plus the QP delta's few bits)
    assert set(rd.tensor_bits) == {n for n in rd.qp_overrides if not n.endswith(LS_SUFFIX)}
    for name, b in rd.tensor_bits.items():
        levels, _ = quantize_tensor(flat[name], rd.qp_overrides[name], dq=True)
        assert 0 < b - levels_bits(levels) <= 8


def test_gradient_rd_beats_uniform_qp_at_equal_size(digits, runs, capsys):
    m, _, test_mse = digits
    ours = []
    for lam in sorted(runs):
        res = verify(m.params, runs[lam])
        ours.append((res.nbytes, test_mse(res.params)))
    uniform = []
    for qp in range(-34, -5, 2):
        data = encode(m.params, qp=qp, nonweight_qp=-75, dq=True)
        uniform.append((len(data), test_mse(decode(data, like=m.params))))
    uniform.sort()
    ub, ud = np.array([u[0] for u in uniform], float), np.array([u[1] for u in uniform])
    with capsys.disabled():
        print("\n  gradient RD vs uniform QP (digits MLP, relative output MSE on the test split)")
        for nbytes, d in ours:
            d_uni = float(np.exp(np.interp(nbytes, ub, np.log(ud))))
            print(f"    {nbytes:6d} bytes: gradient RD {d:.3e}   uniform (interpolated) {d_uni:.3e}")
    for nbytes, d in ours:
        assert ub[0] <= nbytes <= ub[-1]
        assert d <= float(np.exp(np.interp(nbytes, ub, np.log(ud))))


def test_task_loss_and_no_scales(digits):
    m, _calib, _ = digits
    x, y = load_digits_split("train")
    batch = (jnp.asarray(x[:128]), jnp.asarray(y[:128]))
    loss = models.digits_mlp.loss
    rd = optimize(m.params, None, [batch, batch], lambda p, b: loss(p, *b), lam=1e-2, dq=False,
                  learn_scales=False, steps=3, refine=0, progress=False)
    assert rd.local_scales == {} and set(rd.qp_overrides) == {"params/fc1/kernel", "params/fc2/kernel"}
    assert rd.history["loss"].shape == (3,)
    assert list(rd.params_for_encoding(m.params)) == ["params/fc1/bias", "params/fc1/kernel",
                                                      "params/fc2/bias", "params/fc2/kernel"]


@pytest.mark.parametrize("kwargs", [{"lam": -1.0}, {"lam": float("nan")}, {"lam": 1.0, "steps": -1},
                                    {"lam": 1.0, "mode": "soft"}, {"lam": 1.0, "distortion": "l1"},
                                    {"lam": 1.0, "select": ["nope"]}, {"lam": 1.0, "base_qp": 1000},
                                    {"lam": 1.0, "init_qps": {"params/fc1/bias": -30}},
                                    {"lam": 1.0, "optimizer": "adam"}, {"lam": 1.0, "scale_axis": 5},
                                    {"lam": 1.0, "data": []}, {"lam": 1.0, "rate_sample": 10},
                                    {"lam": 1.0, "seed": 1.5}])
def test_bad_arguments_raise_input_error(digits, kwargs):
    m, calib, _ = digits
    data = kwargs.pop("data", calib)
    with pytest.raises(InputError):
        optimize(m.params, m.apply, data, progress=False, **kwargs)


@pytest.mark.parametrize("qp_density", [0, 3, 5])
@pytest.mark.parametrize("init, steps", [("base", 2), ("sensitivity", 0)])
def test_default_qps_keep_their_steps_at_every_qp_density(digits, qp_density, init, steps):
    """The defaults of base_qp, nonweight_qp and scale_qp are steps, not numbers: at qp_density 0 the
    number -75 was out of range (InputError), at 5 the scale QP -24 was a step of 0.6, whose scales
    decoded to 0 and divided their rows by zero (NaN)."""
    m, calib, _ = digits
    rd = optimize(m.params, m.apply, calib, lam=3e-3, qp_density=qp_density, init=init, steps=steps, refine=1,
                  progress=False)
    assert (rd.qp, rd.nonweight_qp) == (equivalent_qp(-32, qp_density), equivalent_qp(-75, qp_density))
    assert {q for n, q in rd.qp_overrides.items() if n.endswith(LS_SUFFIX)} == {equivalent_qp(-24, qp_density)}
    assert all(np.all(s > 0.5) for s in rd.local_scales.values())
    out = verify(m.params, rd, lambda p: m.eval(p)["top1"])
    assert out.metric > m.eval(m.params)["top1"] - 0.05


def test_scales_stay_above_zero_and_a_coarse_scale_qp_is_refused(digits):
    m, calib, _ = digits
    with pytest.raises(InputError, match="scale_qp -8 gives scales a step of 0.25"):
        optimize(m.params, m.apply, calib, lam=3e-3, scale_qp=-8, steps=0, progress=False)

    def push_scales_down(updates, state, params=None):  # QPs kept, every scale offset -1e4 steps a step
        return {"qp": jnp.zeros_like(updates["qp"]),
                "ls": jax.tree_util.tree_map(lambda u: jnp.full_like(u, -1e4), updates["ls"])}, state

    rd = optimize(m.params, m.apply, calib, lam=3e-3, base_qp=-30, steps=3, progress=False,
                  optimizer=optax.GradientTransformation(lambda p: optax.EmptyState(), push_scales_down))
    # 4 scale steps (1/64) above 0, not 1 - 3e4 / 64: a scale at or below 0 flips or zeroes its row
    assert rd.local_scales and all(np.all(s == 4 / 64) for s in rd.local_scales.values())
    out = verify(m.params, rd)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(out.params))


def test_non_finite_data_params_and_loss_are_named(digits):
    m, calib, _ = digits
    x = jnp.asarray(calib[0] if isinstance(calib, list) else calib)
    bad = [x, x.at[0, 0].set(jnp.nan)]
    for kwargs in ({"steps": 2}, {"init": "sensitivity", "steps": 0}):
        with pytest.raises(InputError, match="outputs on batch 1 contain NaN or Inf: check the data"):
            optimize(m.params, m.apply, bad, lam=1e-3, progress=False, **kwargs)
    params = jax.tree_util.tree_map(np.array, m.params)
    params["params"]["fc2"]["kernel"][0, 0] = np.inf
    with pytest.raises(InputError, match=r"params hold NaN or Inf in \['params/fc2/kernel'\]"):
        optimize(params, m.apply, calib, lam=1e-3, steps=2, progress=False)
    with pytest.raises(InputError, match="first step's loss is NaN"):
        optimize(m.params, None, calib, lambda p, b: jnp.float32(jnp.nan), lam=1e-3, steps=2, progress=False)


def test_verify_rejects_foreign_settings(digits):
    m, _, _ = digits
    with pytest.raises(InputError):
        verify(m.params, {"qp_overrides": {}})


def test_sharded_equals_unsharded():
    """8 host devices in a subprocess (the flag must be set before jax starts): gradient RD and the
    sensitivity allocation."""
    d = run_on_host_devices("_optimize_sharded.py")
    assert d["devices"] == 8
    assert d["qps"][0] == d["qps"][1]
    for key in d["plain"]:
        np.testing.assert_allclose(d["sharded"][key], d["plain"][key], rtol=1e-4)
    for name in d["scales"][0]:
        np.testing.assert_array_equal(d["scales"][0][name], d["scales"][1][name])
    assert d["plain"]["loss"][-1] < d["plain"]["loss"][0]
    # the sensitivity allocation (probes, calibration on the real codec) on sharded params and data
    assert d["sens_qps"][0] == d["sens_qps"][1] and d["sens_bits"][0] == d["sens_bits"][1]
    assert d["sens_scales"][0] and d["sens_scales"][0].keys() == d["sens_scales"][1].keys()
    for name in d["sens_scales"][0]:
        np.testing.assert_allclose(d["sens_scales"][0][name], d["sens_scales"][1][name], rtol=1e-3)


def test_rate_sample_takes_evenly_spaced_runs():
    from nncjax.optimize import _rate_sample
    x = jnp.arange(10 * 1024, dtype=jnp.float32).reshape(40, 256)
    same, f = _rate_sample(x, 1 << 16)
    assert same is x and f == 1.0
    sample, f = _rate_sample(x, 1024)                      # 4 runs of 256 out of 40
    assert sample.shape == (4, 256) and f == 10.0
    np.testing.assert_array_equal(np.asarray(sample[:, 0]), [0, 10 * 256, 20 * 256, 30 * 256])
    np.testing.assert_array_equal(np.asarray(sample[1]), np.arange(2560, 2816))


def test_hard_evaluator_matches_the_codec_and_samples_the_rate():
    """Reconstructions and whole-tensor bits are the codec's; rate-sample bits track the whole
    tensor's bits and their difference between QPs; a shared cache is reused only for equal scales."""
    from nncjax.coded_tensor import code_tensor
    from nncjax.optimize import _Config, _HardEvaluator
    rng = np.random.default_rng(0)
    w = rng.laplace(0.0, 0.05, (1024, 384)).astype(np.float32)     # 6x the rate sample
    cfg = _Config(("w",), (True,), (0,), 2, True, "ste", -24, -64, 0, 1 << 16)
    cache: dict = {}
    ev = _HardEvaluator(cfg, {"w": w}, {}, None, [], [], {}, cache)
    x_hat, bits = code_tensor(w, -30)
    np.testing.assert_array_equal(np.asarray(ev.rec("w", -30)), x_hat)
    assert ev.bits("w", -30) == bits + 6 + 2
    assert abs(ev.sample_bits("w", -30) / bits - 1) < 0.02
    saved = bits - code_tensor(w, -26)[1]
    assert abs((ev.sample_bits("w", -30) - ev.sample_bits("w", -26)) / saved - 1) < 0.05
    n = len(cache)
    again = _HardEvaluator(cfg, {"w": w}, {}, None, [], [], {}, cache)
    assert again.bits("w", -30) == ev.bits("w", -30) and len(cache) == n
    s = np.linspace(0.5, 2.0, 1024).astype(np.float32)
    scaled = _HardEvaluator(cfg, {"w": w}, {"w": s}, None, [], [], {}, cache)
    np.testing.assert_array_equal(np.asarray(scaled.rec("w", -30)), code_tensor(w / s[:, None], -30)[0] * s[:, None])
    assert len(cache) > n


def test_row_sample_takes_evenly_spaced_whole_rows():
    from nncjax.optimize import _row_sample
    x = np.arange(40 * 8 * 32, dtype=np.float32).reshape(40, 8, 32)
    same, f = _row_sample(x, 1 << 16)
    assert same is x and f == 1.0
    sample, f = _row_sample(x, 1024)                       # 4 rows of 256 out of 40
    assert sample.shape == (4, 8, 32) and f == 10.0
    np.testing.assert_array_equal(sample, x[[0, 10, 20, 30]])
    one, f = _row_sample(x, 16)                            # never less than one row
    assert one.shape == (1, 8, 32) and f == 40.0
