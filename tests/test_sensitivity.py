"""nncjax.sensitivity (Gauss-Newton sensitivities, closed-form step allocation) and
``nncjax.optimize(init="sensitivity")``, checked against exact values and real coding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax.codec import decode, encode
from nncjax.error_feedback import with_error_feedback
from nncjax.errors import InputError
from nncjax.optimize import optimize
from nncjax.rd_settings import verify
from nncjax.sensitivity import (
    allocate_steps,
    output_sensitivity,
    row_moments,
    rows_exercised,
    spread_over_rows,
)
from nncjax.steps import qp_to_step_continuous


def _linear(p, x):
    return x @ p["w"] + p["b"]


def test_linear_model_matches_the_exact_gauss_newton_diagonal():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 5)) * np.array([1, 2, 3, 0.5, 0.1]), jnp.float32)
    p = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    y = np.asarray(_linear(p, x))
    # D = mean((x e)^2) / var(y): d2D/de_jk^2 / 2 = sum_b x_bj^2 / (B * 3 * var(y))
    exact = np.repeat((np.asarray(x) ** 2).sum(0)[:, None], 3, 1) / (y.size * y.var())
    sens = output_sensitivity(p, _linear, x, probes=256)
    assert set(sens) == {"w"} and sens["w"].dtype == np.float32
    np.testing.assert_allclose(sens["w"].sum(1), exact.sum(1), rtol=0.1)
    # two batches: D is their mean
    two = output_sensitivity(p, _linear, [x[:32], x[32:]], probes=256)
    np.testing.assert_allclose(two["w"].sum(), exact.sum(), rtol=0.1)


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_sensitivity_predicts_the_distortion_of_small_random_errors(seed):
    rng = np.random.default_rng(seed)
    p = {"w1": jnp.asarray(rng.normal(size=(6, 16)) / 2, jnp.float32),
         "w2": jnp.asarray(rng.normal(size=(16, 4)) / 4, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(128, 6)), jnp.float32)
    sens = output_sensitivity(p, _mlp, x, probes=64, seed=seed)
    ref = np.asarray(_mlp(p, x))
    predicted, measured = [], []
    for _ in range(16):
        e = {k: rng.uniform(-1, 1, size=v.shape).astype(np.float32) * 1e-2 for k, v in p.items()}
        q = {k: p[k] + e[k] for k in p}
        measured.append(np.mean((np.asarray(_mlp(q, x)) - ref) ** 2) / ref.var())
        predicted.append(sum(float(np.sum(sens[k] * e[k] ** 2)) for k in p))
    assert np.mean(predicted) == pytest.approx(np.mean(measured), rel=0.3)


def test_allocate_steps_closed_form():
    g = np.full((4, 8), 2e-4)
    g[1] *= 4.0  # row 1 four times as sensitive: half the step
    g[3] *= 100.0  # far out: clipped to max_ratio
    a = allocate_steps({"w": g}, 1e-3, rows_axes={"w": 0}, max_ratio=4.0)
    s = a.row_scale["w"]
    assert s[1] / s[0] == pytest.approx(0.5)
    assert s[3] == pytest.approx(0.25)  # relative to the median row step
    # one step per tensor: step^2 = 6 lam beta / (n ln2 g)
    b = allocate_steps({"v": np.full((3, 3), 1e-3)}, 2e-3, rate_slope={"v": 0.5})
    step = math.sqrt(6 * 2e-3 * 0.5 / (9 * math.log(2) * 1e-3))
    assert a.row_scale.keys() == {"w"} and not b.row_scale
    assert float(qp_to_step_continuous(b.qp["v"])) == pytest.approx(step, rel=1e-5)
    # more lambda, coarser steps; no sensitivity: the coarsest QP
    assert allocate_steps({"v": np.full((3, 3), 1e-3)}, 2e-2).qp["v"] > b.qp["v"]
    assert allocate_steps({"z": np.zeros((2, 2))}, 1e-3, qp_range=(-60, 10)).qp["z"] == 10


def test_rows_the_data_never_exercise_keep_one_step():
    g = np.ones((5, 4))
    g[2] = 0.0  # e.g. an embedding row of a token absent from the tuning data
    a = allocate_steps({"emb": g}, 1e-3, rows_axes={"emb": 0})
    assert "emb" not in a.row_scale


@pytest.mark.parametrize("kwargs", [{"lam": 0.0}, {"lam": float("inf")}, {"max_ratio": 0.5},
                                    {"rows_axes": {"w": 2}}, {"rate_slope": {"w": -1.0}},
                                    {"sensitivity": {"w": -np.ones((2, 2))}}])
def test_allocate_steps_rejects_bad_input(kwargs):
    args = {"sensitivity": {"w": np.ones((2, 2))}, "lam": 1e-3, **kwargs}
    with pytest.raises(InputError):
        allocate_steps(args.pop("sensitivity"), args.pop("lam"), **args)


@pytest.mark.parametrize("kwargs", [{"probes": 0}, {"data": []}, {"select": ["nope"]}, {"select": lambda n, x: False}])
def test_output_sensitivity_rejects_bad_input(kwargs):
    p = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    data = kwargs.pop("data", jnp.ones((3, 2)))
    with pytest.raises(InputError):
        output_sensitivity(p, _linear, data, **kwargs)


def test_sensitivity_allocation_beats_uniform_qp_at_equal_size(digits):
    """No training step: the calibrated closed form alone lies below the uniform-QP curve (held-out
    distortion) at three λ, and its stream decodes to what it promised."""
    m, calib, test_mse = digits
    uniform = []
    for qp in range(-34, -1, 2):
        data = encode(m.params, qp=qp)
        uniform.append((len(data), test_mse(decode(data, like=m.params))))
    uniform.sort()
    ub, ud = np.array([u[0] for u in uniform], float), np.log([u[1] for u in uniform])
    sizes = []
    for lam in (3e-4, 3e-3, 3e-2):
        rd = optimize(m.params, m.apply, calib, lam=lam, init="sensitivity", steps=0, progress=False)
        assert rd.history["loss"].shape == (0,)
        # fc1 has ReLU units the calibration images never activate: no row scales for it
        assert set(rd.local_scales) == {"params/fc2/kernel"}
        res = verify(m.params, rd)
        assert 0 < res.nbytes * 8 - rd.estimated_bits < 8 * 400
        d = test_mse(res.params)
        assert ub[0] <= res.nbytes <= ub[-1]
        assert d <= math.exp(np.interp(res.nbytes, ub, ud)), (lam, res.nbytes, d)
        sizes.append(res.nbytes)
    assert sizes[0] > sizes[1] > sizes[2]


def test_calibration_keeps_size_falling_with_lam_beyond_the_quadratic_regime():
    """CREPE's distortion outgrows the Gauss-Newton model at coarse steps (kappa about 24 at
    lam = 0.1): one rescaling of lam overshot to a finer allocation than at lam = 0.03. The
    iterated calibration keeps the size falling as lam rises."""
    from nncjax import models
    from nncjax.models.crepe import harmonic_tones

    m = models.get("crepe")
    frames = jnp.asarray(harmonic_tones(256, seed=1)[0])  # not the evaluation's tones (seed 0)
    tune = [frames[i:i + 64] for i in range(0, 256, 64)]
    bits = [optimize(m.params, m.apply, tune, lam=lam, init="sensitivity", steps=0, progress=False).estimated_bits
            for lam in (1e-2, 3e-2, 1e-1)]
    assert bits[0] > bits[1] > bits[2], bits


def test_sensitivity_start_then_training_steps(digits):
    m, calib, _ = digits
    rd = optimize(m.params, m.apply, calib, lam=3e-3, init="sensitivity", steps=3, refine=0, progress=False)
    assert rd.history["loss"].shape == (3,) and np.all(np.isfinite(rd.history["loss"]))
    assert verify(m.params, rd).nbytes > 0


def test_unexercised_rows_get_no_scales():
    p, apply, ids = _lookup_model()
    rd = optimize(p, apply, ids, lam=1e-3, init="sensitivity", steps=0, refine=0, progress=False)
    assert set(rd.local_scales) == {"w"}
    assert set(rd.qp_overrides) == {"emb", "w", "w_scaling"}
    out = decode(encode(rd.params_for_encoding(p), **rd.encode_kwargs()), like=p)
    assert np.abs(np.asarray(out["emb"]) - np.asarray(p["emb"])).max() < 0.5


def _lookup_model(seed=1):
    rng = np.random.default_rng(seed)
    p = {"emb": jnp.asarray(rng.normal(size=(10, 8)), jnp.float32),
         "w": jnp.asarray(rng.normal(size=(8, 6)) / 3, jnp.float32)}
    apply = lambda q, ids: jnp.take(q["emb"], ids, axis=0) @ q["w"]
    return p, apply, jnp.asarray(rng.integers(0, 5, size=(64, 3)))  # tokens 5..9 never occur


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=2, max_size=12), st.floats(0.01, 10.0), st.sampled_from([0, 1]))
def test_spread_over_rows_keeps_the_total_and_follows_usage(usage, prior, axis):
    rng = np.random.default_rng(len(usage))
    shape = (len(usage), 3) if axis == 0 else (3, len(usage))
    g = rng.random(shape)
    out = spread_over_rows(g, usage, axis, prior)
    assert out.shape == g.shape and math.isclose(out.sum(), g.sum(), rel_tol=1e-5)
    rows = np.moveaxis(out, axis, 0)[:, 0]
    u = np.asarray(usage, float)
    assert np.all(np.diff(rows[np.argsort(u, kind="stable")]) >= -1e-6 * rows.max())  # more use, more sensitive
    assert rows.min() > 0  # unused rows keep a share


@pytest.mark.parametrize("kwargs", [{"usage": [1.0, 2.0]}, {"usage": [-1.0] * 4}, {"usage": [np.nan] * 4},
                                    {"usage": [1.0] * 4, "prior": 0.0}, {"usage": [1.0] * 4, "axis": 2}])
def test_spread_over_rows_rejects_bad_input(kwargs):
    with pytest.raises(InputError):
        spread_over_rows(np.ones((4, 2)), **kwargs)


def test_row_usage_gives_every_embedding_row_a_step():
    p, apply, ids = _lookup_model()
    usage = np.array([1000, 1000, 10, 10, 10, 0, 0, 0, 0, 1000], float)
    rd = optimize(p, apply, ids, lam=1e-3, init="sensitivity", steps=0, refine=0, progress=False,
                  row_usage={"emb": usage})
    s = rd.local_scales["emb"]
    assert s[0] < s[2] < s[5] and s[9] < s[5]  # frequent rows finer, unseen ones coarser
    out = decode(encode(rd.params_for_encoding(p), **rd.encode_kwargs()), like=p)
    assert np.abs(np.asarray(out["emb"]) - np.asarray(p["emb"])).max() < 0.5
    with pytest.raises(InputError, match="not optimised"):
        optimize(p, apply, ids, lam=1e-3, init="sensitivity", steps=0, progress=False, row_usage={"x": usage})
    with pytest.raises(InputError, match="init='sensitivity'"):
        optimize(p, apply, ids, lam=1e-3, steps=0, progress=False, row_usage={"emb": usage})
    with pytest.raises(InputError, match="usage must have shape"):
        optimize(p, apply, ids, lam=1e-3, init="sensitivity", steps=0, progress=False, row_usage={"emb": usage[:3]})


@pytest.mark.parametrize("kwargs", [{"init": "random"}, {"init": "sensitivity", "distortion": "kl"},
                                    {"init": "sensitivity", "init_qps": {"params/fc1/kernel": -30}},
                                    {"init": "sensitivity", "lam": 0.0}, {"init": "sensitivity", "probes": 0},
                                    {"init": "sensitivity", "max_scale_ratio": 0.5}])
def test_bad_init_arguments_raise_input_error(digits, kwargs):
    m, calib, _ = digits
    kwargs = {"lam": 1e-3, **kwargs}
    with pytest.raises(InputError):
        optimize(m.params, m.apply, calib, progress=False, **kwargs)


def test_sensitivity_step_compiles_once():
    # the estimator's step is one jit-compiled function: a second call with new values hits the cache
    p = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    x = jnp.arange(32.0).reshape(8, 4)  # outputs that vary: a constant output is refused
    from nncjax.sensitivity import _squared_probes
    output_sensitivity(p, _linear, x)
    before = _squared_probes._cache_size()
    output_sensitivity(jax.tree_util.tree_map(lambda a: a + 1, p), _linear, x * 2)
    assert _squared_probes._cache_size() == before


def _conv(p, x):
    return jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_probes_batched_where_it_pays_and_equal_to_the_loop():
    from nncjax.sensitivity import _BATCHED_PROBE_BYTES, _batch_probes, _squared_probes
    p = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32), "b": jnp.ones(3)}
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4)), jnp.float32)
    pc = {"k": jnp.ones((3, 3, 2, 2))}
    xc = jnp.ones((2, 5, 5, 2))
    assert _batch_probes(_linear, p, x, 15, 4)
    assert not _batch_probes(jax.jit(_conv), pc, xc, 36, 4)  # found inside the nested jit too
    assert not _batch_probes(_linear, p, x, 15, 1)
    assert not _batch_probes(_linear, p, x, _BATCHED_PROBE_BYTES // 16 + 1, 4)  # too much gradient at once
    for f, params, batch in ((_linear, p, x), (_conv, pc, xc)):
        runs = [_squared_probes(params, params, batch, jax.random.PRNGKey(3), apply_fn=f, probes=4, batched=b)[0]
                for b in (False, True)]
        for n in params:
            np.testing.assert_allclose(runs[1][n], runs[0][n], rtol=1e-5)


def _table_model(seed=0, rows=40, cols=12, outs=3):
    """A lookup table whose rows go through LayerNorm's mean removal and a narrow projection: its
    output sees few directions of a row's error, and none of an error shared by the whole row."""
    rng = np.random.default_rng(seed)
    p = {"emb": {"embedding": jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32)},
         "proj": {"kernel": jnp.asarray(rng.normal(size=(cols, outs)), jnp.float32)}}

    def apply(q, ids):
        e = jnp.take(q["emb"]["embedding"], ids, axis=0)
        return jnp.tanh((e - e.mean(-1, keepdims=True)) @ q["proj"]["kernel"])
    return p, apply, rng


def test_row_moments_diagonal_is_the_scaled_sensitivity():
    p, apply, rng = _table_model()
    ids = [jnp.asarray(rng.integers(0, 40, size=(16, 5))) for _ in range(2)]
    names = ["emb/embedding", "proj/kernel"]
    scales = {"emb/embedding": rng.uniform(0.5, 2, 40), "proj/kernel": rng.uniform(0.5, 2, 3)}
    h = row_moments(p, apply, ids, names, row_scales=scales, probes=3, seed=7)
    sens = output_sensitivity(p, apply, ids, probes=3, seed=7)
    assert h["emb/embedding"].shape == (12, 12) and h["proj/kernel"].shape == (12, 12)
    # the same probes: diag(H) sums s_r^2 * sens over the rows; a Flax kernel's rows are its outputs
    np.testing.assert_allclose(np.diag(h["emb/embedding"]),
                               (scales["emb/embedding"][:, None] ** 2 * sens["emb/embedding"]).sum(0), rtol=1e-4)
    np.testing.assert_allclose(np.diag(h["proj/kernel"]),
                               (scales["proj/kernel"][None, :] ** 2 * sens["proj/kernel"]).sum(1), rtol=1e-4)
    for m in h.values():
        np.testing.assert_allclose(m, m.T, rtol=1e-6, atol=1e-12)
        assert np.linalg.eigvalsh(m).min() > -1e-6 * np.trace(m)
    # blind to an error shared by all the elements of a row (the mean removal)
    ones = np.ones(12)
    assert ones @ h["emb/embedding"] @ ones < 1e-5 * np.trace(h["emb/embedding"])


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_row_moments_predict_the_distortion_of_row_errors(seed):
    p, apply, rng = _table_model(seed)
    ids = jnp.asarray(rng.integers(0, 40, size=(64, 5)))
    s = rng.uniform(0.5, 2, 40)
    h = row_moments(p, apply, ids, ["emb/embedding"], row_scales={"emb/embedding": s}, probes=64, seed=seed)
    ref = np.asarray(apply(p, ids))
    a = rng.normal(size=(12, 12)) / 12
    c = a @ a.T * 1e-4  # covariance of every coded row's error
    measured = []
    for _ in range(32):
        d = rng.multivariate_normal(np.zeros(12), c, size=40)
        q = {**p, "emb": {"embedding": p["emb"]["embedding"] + jnp.asarray(s[:, None] * d, jnp.float32)}}
        measured.append(np.mean((np.asarray(apply(q, ids)) - ref) ** 2) / ref.var())
    assert float(np.trace(h["emb/embedding"] @ c)) == pytest.approx(np.mean(measured), rel=0.3)


def test_error_feedback_on_table_rows_saves_bits_at_equal_output_error():
    p, apply, rng = _table_model(rows=400, cols=16)
    fit, check, held_out = ([jnp.asarray(rng.integers(0, 400, size=(64, 6))) for _ in range(4)] for _ in range(3))
    rd = optimize(p, apply, fit, lam=1e-3, init="sensitivity", steps=0, progress=False, qp_density=3,
                  select=["emb/embedding"])
    table = "emb/embedding"
    moments = row_moments(p, apply, fit, [table], row_scales=rd.local_scales)
    check_moments = row_moments(p, apply, check, [table], row_scales=rd.local_scales, seed=1)
    p_g, rd_g = with_error_feedback(p, rd, moments, check_moments=check_moments, progress=False)
    assert rd_g.dq_overrides[table] is False and rd_g.qp_overrides[table] > rd.qp_overrides[table]
    assert rd_g.tensor_bits[table] < 0.9 * rd.tensor_bits[table]
    ref = [np.asarray(apply(p, x)) for x in held_out]

    def d_out(params):
        return np.mean([np.mean((np.asarray(apply(params, x)) - y) ** 2) / y.var() for x, y in zip(held_out, ref)])
    v, v_g = verify(p, rd), verify(p_g, rd_g)
    np.testing.assert_array_equal(np.asarray(v_g.params["emb"]["embedding"]), np.asarray(p_g["emb"]["embedding"]))
    assert v_g.nbytes < v.nbytes and d_out(v_g.params) < 1.2 * d_out(v.params)


@pytest.mark.parametrize("names, kwargs, match", [
    ([], {}, "non-empty"),
    (["nope"], {}, "not a float tensor"),
    (["b"], {}, "rows and columns"),
    (["w"], {"row_scales": {"w": np.ones(4)}}, "row_scales"),
    (["w"], {"row_scales": {"w": np.array([1.0, 1.0, 0.0, 1.0, 1.0])}}, "positive"),
    (["w"], {"row_scales": {"w": np.full(5, np.nan)}}, "positive"),
    (["w"], {"scale_axis": 1}, "scale_axis"),
    ("w", {}, "non-empty list"),
    (["w"], {"probes": 0}, "probes"),
])
def test_row_moments_rejects_bad_input(names, kwargs, match):
    p = {"w": jnp.ones((5, 3)), "b": jnp.zeros(3)}
    with pytest.raises(InputError, match=match):
        row_moments(p, _linear, jnp.ones((4, 5)), names, **kwargs)


def test_allocate_steps_refuses_bad_arguments():
    sens = {"w": np.array([[4.0, 4.0], [1.0, 1.0]]) * 1e-3}
    bad = [dict(qp_range=(127, -128)),  # every QP silently -128
           dict(qp_range=(np.nan, 127)),  # NaN QP
           dict(n_weights=0),  # silently the coarsest QP
           dict(n_weights=-4),
           dict(rate_slope={"w": "a"}),  # raw ValueError
           dict(rows_axes={"w": 1.0}),  # raw TypeError
           dict(rows_axes={"w": True})]  # taken as axis 1
    for kw in bad:
        with pytest.raises(InputError):
            allocate_steps(sens, 1e-2, **kw)
    for lam in (True, "1"):
        with pytest.raises(InputError, match="lam"):
            allocate_steps(sens, lam)
    with pytest.raises(InputError, match="real"):
        allocate_steps({"w": np.ones(2) * 1j}, 1e-2)  # imaginary part dropped: QP 127
    with pytest.raises(InputError, match="mapping"):
        allocate_steps([sens["w"]], 1e-2)
    assert allocate_steps(sens, np.int64(1)).qp == allocate_steps(sens, 1).qp  # NumPy ints were refused


def test_allocate_steps_at_extreme_lam_and_sensitivity_clips_to_the_qp_range():
    # steps beyond float64 raised 'step sizes must be finite and positive'; they are clipped like any other
    tiny = {"w": np.full((2, 2), 1e-320)}
    assert allocate_steps(tiny, 1.0, rows_axes={"w": 0}).qp["w"] == 127.0
    assert allocate_steps({"w": np.full((2, 2), 1e300)}, 1e-300, rows_axes={"w": 0}).qp["w"] == -128.0
    assert allocate_steps({"w": np.ones((0, 3))}, 1e-2).qp["w"] == 127.0  # empty: the coarsest
    qps = [allocate_steps({"w": np.full((3, 2), 1e-3)}, lam).qp["w"] for lam in (1e-6, 1e-4, 1e-2)]
    assert qps == sorted(qps)  # a higher price of bits: coarser steps


def test_spread_over_rows_and_rows_exercised_check_their_inputs():
    g = np.ones((3, 2))
    for kw in [dict(usage=[1, 2], axis=True),  # taken as axis 1
               dict(usage=["a", "b", "c"]),  # raw ValueError
               dict(usage=np.array([1, 2, 3]) + 1j)]:  # imaginary part dropped
        with pytest.raises(InputError):
            spread_over_rows(g, **kw)
    with pytest.raises(InputError, match="sensitivity"):
        spread_over_rows(-g, [1, 2, 3])  # negative shares
    with pytest.raises(InputError, match="overflow"):
        spread_over_rows(g, [1e308] * 3)  # the sum overflowed: NaN shares
    assert spread_over_rows(np.ones((0, 3)), []).shape == (0, 3)  # ZeroDivisionError
    with pytest.raises(InputError, match="axis"):
        rows_exercised(g, 5)  # wrapped around: True
    assert rows_exercised([[1.0, 1.0]], 0)  # a list: AttributeError


def test_sensitivities_refuse_non_finite_and_empty_outputs():
    p = {"w": jnp.ones((3, 2))}
    with pytest.raises(InputError, match="not finite"):
        output_sensitivity(p, _lin, jnp.full((4, 3), jnp.nan))  # NaN sensitivities came back
    with pytest.raises(InputError, match="non-empty"):
        output_sensitivity(p, lambda q, x: _lin(q, x)[:0], jnp.ones((4, 3)))  # ZeroDivisionError
    emb = {"e": jnp.arange(15.0).reshape(5, 3)}
    ids = jnp.array([0, 1, 4])
    with pytest.raises(InputError, match="row_scales"):
        row_moments(emb, lambda q, i: q["e"][i], ids, ["e"], scale_axis=0, row_scales={"e": np.ones(5) * (1 + 1j)})
    with pytest.raises(InputError, match="row_scales"):
        row_moments(emb, lambda q, i: q["e"][i], ids, ["e"], row_scales=[1.0])
    empty = row_moments({"e": jnp.ones((0, 3))}, lambda q, i: q["e"].sum() + i, ids, ["e"])["e"]
    assert empty.shape == (3, 3) and not empty.any()  # a table without rows: a raw reshape error
    with pytest.raises(InputError, match="seed must be an integer"):  # a raw JAX key error
        output_sensitivity(p, _lin, jnp.ones((4, 3)), seed=1.5)
    with pytest.raises(InputError, match="no float leaf"):  # every sensitivity was silently 0
        output_sensitivity(p, lambda q, x: jnp.argmax(_lin(q, x), axis=-1), jnp.ones((4, 3)))


def _lin(p, x):
    return x @ p["w"]


def test_constant_output_leaves_are_refused_by_name():
    """A constant output (a scalar loss among the outputs, or a batch of equal predictions) has variance 0:
    its probes were scaled by 1 / sqrt(1e-12), so its sensitivities came out about 1e12 times too large."""
    p = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)}
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32)

    def with_loss(params, b):
        y = b @ params["w"]
        return {"y": y, "loss": jnp.float32(0.5)}  # constant: does not depend on params

    with pytest.raises(InputError, match="output leaf 'loss' is constant or empty on batch 0"):
        output_sensitivity(p, with_loss, x)
    with pytest.raises(InputError, match="the output is constant or empty on batch 1"):  # equal predictions
        output_sensitivity(p, lambda q, b: b @ q["w"], [x, jnp.zeros_like(x)])
    with pytest.raises(InputError, match="constant or empty"):
        row_moments(p, with_loss, x, ["w"])
    assert np.all(np.isfinite(output_sensitivity(p, lambda q, b: b @ q["w"], x)["w"]))


@pytest.mark.parametrize("kind", ["sensitivity probes", "row moments", "input moments"])
def test_batch_loops_show_a_progress_bar_unless_told_not_to(kind, capsys):
    import flax.linen as nn

    from nncjax.quantize.gptq import input_moments

    model = nn.Dense(3)
    v = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    xs = [jax.random.normal(jax.random.PRNGKey(i), (8, 4)) for i in range(3)]
    run = {"sensitivity probes": lambda **kw: output_sensitivity(v, model.apply, xs, **kw),
           "row moments": lambda **kw: row_moments(v, model.apply, xs, ["params/kernel"], **kw),
           "input moments": lambda **kw: input_moments(model.apply, v, xs, **kw)}[kind]
    quiet = run(progress=False)
    assert capsys.readouterr().err == ""
    shown = run()  # default: a bar over the three batches
    assert kind in capsys.readouterr().err
    assert all(np.array_equal(quiet[k], shown[k]) for k in quiet)
    with pytest.raises(InputError, match="progress must be True or False"):
        run(progress="no")
