"""nncjax.fine_tuning: levels of the uniformly coded weights fine-tuned on their grid (STE), checked by
real coding and held-out distortion."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from nncjax import InputError, with_fine_tuning
from nncjax.bias_correction import decoded_params
from nncjax.fine_tuning import _tune_step, grid_tensors
from nncjax.optimize import optimize
from nncjax.pytree_names import flatten_named
from nncjax.rd_settings import verify
from tests._half_mlp import HalfMLP

STEPS = 150


@pytest.fixture(scope="module")
def uniform(digits):
    """The digits MLP's sensitivity allocation without DQ (every weight on a uniform grid), coarse
    enough that the rounding errors are worth tuning, and its fine-tuned version."""
    m, calib, _ = digits
    rd = optimize(m.params, m.apply, calib, lam=1e-2, dq=False, init="sensitivity", steps=0, progress=False)
    p_ft, rd_ft = with_fine_tuning(m.params, rd, m.apply, calib, steps=STEPS, progress=False)
    return rd, p_ft, rd_ft


def test_fine_tuning_lowers_held_out_distortion_at_the_same_size(digits, uniform):
    m, _, test_mse = digits
    rd, p_ft, rd_ft = uniform
    before, after = verify(m.params, rd), verify(p_ft, rd_ft)
    assert rd_ft.qp_overrides == rd.qp_overrides and rd_ft.local_scales is rd.local_scales
    assert test_mse(after.params) < 0.8 * test_mse(before.params)  # images the levels were not tuned on
    assert abs(after.nbytes - before.nbytes) < 0.03 * before.nbytes
    # the settings' estimate follows the new levels (unit headers aside)
    assert abs((rd_ft.estimated_bits - rd.estimated_bits) / 8 - (after.nbytes - before.nbytes)) < 16
    trace = rd_ft.history["fine_tuning"]  # one batch: D never rises (a move that would is not made)
    assert trace.shape == (STEPS,) and np.all(np.diff(trace) <= 0) and trace[-1] < 0.5 * trace[0]


def test_tuned_levels_are_what_the_decoder_reconstructs(uniform):
    rd, p_ft, rd_ft = uniform
    decoded, tuned, start = (flatten_named(t) for t in (verify(p_ft, rd_ft).params, p_ft,
                                                        decoded_params(p_ft, rd)))
    moved = 0
    for n in grid_tensors(rd):
        np.testing.assert_array_equal(np.asarray(decoded[n]), np.asarray(tuned[n]))
        np.testing.assert_array_equal(np.asarray(start[n]), np.asarray(tuned[n]))  # already on the grid
        moved += n in rd.local_scales
    assert moved  # scaled tensors (W / s coded rows first) are among them


def test_zero_steps_gives_the_codec_levels(digits, uniform):
    m, calib, _ = digits
    rd, _, _ = uniform
    p0, rd0 = with_fine_tuning(m.params, rd, m.apply, calib, steps=0, progress=False)
    want, got = flatten_named(decoded_params(m.params, rd)), flatten_named(p0)
    for n in grid_tensors(rd):
        np.testing.assert_array_equal(np.asarray(got[n]), np.asarray(want[n]))
    assert rd0.estimated_bits == rd.estimated_bits and rd0.history["fine_tuning"].shape == (0,)


def test_only_grid_tensors_move_and_dq_tensors_stay(digits):
    """With one weight switched to a uniform grid, the DQ weights keep their original values in the
    returned params (the codec quantizes them as before); the step compiles once for every batch."""
    m, calib, _ = digits
    rd = optimize(m.params, m.apply, calib, lam=1e-2, init="sensitivity", steps=0, progress=False)
    rd = dataclasses.replace(rd, dq_overrides={"params/fc2/kernel": False}, tensor_bits={})
    assert grid_tensors(rd) == ["params/fc2/kernel"]
    compiled = _tune_step._cache_size()
    p_ft, _ = with_fine_tuning(m.params, rd, m.apply, [calib[:64], calib[64:]], steps=6, progress=False)
    assert _tune_step._cache_size() == compiled + 1
    orig, got = flatten_named(m.params), flatten_named(p_ft)
    for n in orig:
        if n != "params/fc2/kernel":
            assert got[n] is orig[n] or np.array_equal(np.asarray(got[n]), np.asarray(orig[n])), n


def test_reference_sets_the_target(digits, uniform):
    """Tuning towards another model's outputs moves the levels towards that model."""
    m, calib, _ = digits
    rd, _, _ = uniform
    other = {"params": {**m.params["params"], "fc2": {**m.params["params"]["fc2"],
                                                     "bias": m.params["params"]["fc2"]["bias"] + 0.5}}}
    base = flatten_named(with_fine_tuning(m.params, rd, m.apply, calib, steps=40, progress=False)[0])
    toward = flatten_named(with_fine_tuning(m.params, rd, m.apply, calib, reference=other, steps=40,
                                            progress=False)[0])
    assert any(not np.array_equal(base[n], toward[n]) for n in grid_tensors(rd))


def test_straight_through_training(digits, uniform):
    """method="ste": Adam on a rounded latent. At fine steps it lowers the held-out distortion; at the
    coarse steps of ``uniform`` every latent crosses at once, and the check on the data keeps the
    given levels."""
    m, calib, test_mse = digits
    fine = optimize(m.params, m.apply, calib, lam=1e-3, dq=False, init="sensitivity", steps=0, progress=False)
    p_ft, rd_ft = with_fine_tuning(m.params, fine, m.apply, calib, method="ste", steps=STEPS, progress=False)
    assert test_mse(verify(p_ft, rd_ft).params) < 0.8 * test_mse(verify(m.params, fine).params)
    assert rd_ft.history["fine_tuning"].shape == (STEPS,)
    rd, _, _ = uniform
    p_ste, rd_ste = with_fine_tuning(m.params, rd, m.apply, calib, method="ste", steps=STEPS, progress=False)
    assert rd_ste.history["fine_tuning"].max() > 10 * rd_ste.history["fine_tuning"][0]  # the jump
    want, got = flatten_named(decoded_params(m.params, rd)), flatten_named(p_ste)
    for n in grid_tensors(rd):
        np.testing.assert_array_equal(np.asarray(got[n]), np.asarray(want[n]))


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": -1}, "steps"),
    ({"steps": 1.5}, "steps"),
    ({"probes": 0}, "probes"),
    ({"method": "adam"}, "method"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"data": []}, "empty"),
    ({"apply_fn": None}, "apply_fn"),
    # NaN reference outputs: every D was NaN, the levels silently kept and a NaN history returned
    ({"data": np.full((4, 64), np.nan, np.float32)}, "outputs on batch 0 contain NaN"),
    ({"data": np.full((4, 64), np.nan, np.float32), "method": "ste"}, "outputs on batch 0 contain NaN"),
])
def test_bad_arguments_raise_input_error(digits, uniform, kwargs, match):
    m, calib, _ = digits
    rd, _, _ = uniform
    args = {"apply_fn": m.apply, "data": calib, **kwargs}
    with pytest.raises(InputError, match=match):
        with_fine_tuning(m.params, rd, args.pop("apply_fn"), args.pop("data"), progress=False, **args)


def test_settings_without_a_uniform_grid_raise(digits):
    m, calib, _ = digits
    rd = optimize(m.params, m.apply, calib, lam=1e-2, init="sensitivity", steps=0, progress=False)
    with pytest.raises(InputError, match="DQ"):
        with_fine_tuning(m.params, rd, m.apply, calib, progress=False)
    with pytest.raises(InputError, match="RDSettings"):
        with_fine_tuning(m.params, {}, m.apply, calib, progress=False)
    with pytest.raises(InputError, match="lack"):
        with_fine_tuning({"params": {}}, dataclasses.replace(rd, dq=False), m.apply, calib, progress=False)
    # settings of another model (local scales of other lengths): a broadcast ValueError before
    name = next(iter(rd.local_scales))
    foreign = dataclasses.replace(rd, dq=False, local_scales={**rd.local_scales, name: np.ones(3, np.float32)})
    with pytest.raises(InputError, match=f"{name!r} of shape .* rows: settings of another model"):
        with_fine_tuning(m.params, foreign, m.apply, calib, progress=False)


def test_empty_tensors_are_left_out_and_the_tuning_goes_through():
    """A zero-size weight is coded as a fixed tensor: there is nothing on its grid to tune."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class WithEmpty(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Dense(4)(nn.relu(nn.Dense(16)(x)))
            return y + jnp.sum(self.param("empty", lambda k: jnp.zeros((0, 4))))

    m, x = WithEmpty(), jax.random.normal(jax.random.PRNGKey(0), (16, 6))
    v = m.init(jax.random.PRNGKey(1), x)
    rd = optimize(v, m.apply, x, lam=1e-2, dq=False, init="sensitivity", steps=0, progress=False)
    assert grid_tensors(rd) == ["params/Dense_1/kernel", "params/Dense_0/kernel"]
    for method in ("search", "ste"):
        v_ft, rd_ft = with_fine_tuning(v, rd, m.apply, x, steps=5, method=method, progress=False)
        empty = verify(v_ft, rd_ft).params["params"]["empty"]
        assert empty.shape == (0, 4) and empty.dtype == np.float32
        assert rd_ft.history["fine_tuning"].shape == (5,)


def test_half_precision_levels_that_the_dtype_cannot_hold_stay_float32():
    """At fine steps the tuned grid values need more mantissa than bfloat16: rounded to the leaf's
    dtype they left the grid, and the codec coded other levels than the tuning chose."""
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
    m = HalfMLP()
    v = m.init(jax.random.PRNGKey(1), x)
    rd = optimize(v, m.apply, x, lam=1e-7, dq=False, init="sensitivity", steps=0, progress=False)
    p_ft, rd_ft = with_fine_tuning(v, rd, m.apply, x, steps=5, progress=False)
    own, dec = flatten_named(p_ft), flatten_named(verify(p_ft, rd_ft).params)
    for n in grid_tensors(rd_ft):
        assert own[n].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(dec[n]), np.asarray(own[n]))
