"""The shared scalar-argument checks (nncjax.arguments) and the public entry points that use them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nncjax
import nncjax.arguments
from nncjax.arguments import check_flag, check_int, check_real, is_int
from nncjax.errors import InputError


@pytest.mark.parametrize("x", [3, np.int8(3), np.uint64(3), np.array(3), jnp.asarray(3, jnp.int32), 2**70])
def test_integers_of_every_kind_pass(x):
    assert is_int(x)
    v = check_int(x, "n")
    assert type(v) is int and v == int(x)


@pytest.mark.parametrize("x", [True, np.bool_(False), jnp.asarray(True), 3.0, np.float32(3), np.array([3]),
                               "3", None, 3 + 0j, jnp.zeros((1,), jnp.int32)])
def test_non_integers_are_refused_with_the_name(x):
    assert not is_int(x)
    with pytest.raises(InputError, match=r"^count must be an integer, got"):
        check_int(x, "count")


def test_tracers_are_refused_not_read():
    with pytest.raises(InputError, match="qp must be an integer"):
        jax.jit(lambda q: check_int(q, "qp"))(3)
    with pytest.raises(InputError, match="lam must be a finite real number"):
        jax.jit(lambda x: check_real(x, "lam"))(1.0)


@pytest.mark.parametrize("lo, hi, x, ok", [(0, None, 0, True), (0, None, -1, False), (None, 4, 5, False),
                                           (-1, 0, -1, True), (-1, 0, 1, False), (2, 31, 31, True)])
def test_int_bounds_are_inclusive(lo, hi, x, ok):
    if ok:
        assert check_int(x, "n", lo=lo, hi=hi) == x
    else:
        with pytest.raises(InputError, match="n must be an integer"):
            check_int(x, "n", lo=lo, hi=hi)


@pytest.mark.parametrize("x", [0.5, 2, np.float16(0.5), np.int64(2), np.array(0.5), jnp.asarray(0.5)])
def test_reals_of_every_kind_pass(x):
    v = check_real(x, "lam", lo=0)
    assert type(v) is float and v == float(x)


@pytest.mark.parametrize("x", [float("nan"), float("inf"), -float("inf"), True, 1 + 2j, np.complex64(1), "1",
                               None, np.array([1.0]), 10**400])
def test_non_reals_are_refused(x):
    with pytest.raises(InputError, match="lam must be a finite real number"):
        check_real(x, "lam")


def test_real_bounds():
    assert check_real(0, "x", lo=0) == 0.0
    with pytest.raises(InputError, match=r"x must be a finite real number > 0, got 0"):
        check_real(0, "x", above=0)
    with pytest.raises(InputError, match=r"in \[1, 2\]"):
        check_real(2.5, "x", lo=1, hi=2)


@pytest.mark.parametrize("x", ["no", "False", 0, 1, None, np.array([True])])
def test_flags_must_be_bools(x):
    with pytest.raises(InputError, match="dq must be True or False"):
        check_flag(x, "dq")


# Entry points that used to coerce or accept these silently: bool() made the string "no" True, and
# bools passed as integers (True was scan order 1, unary_length 1, an init QP of 1).
W = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}


@pytest.mark.parametrize("kwargs, what", [
    (dict(dq="no"), "dq"), (dict(row_skipping="no"), "row_skipping"), (dict(param_opt=0), "param_opt"),
    (dict(scan_order=True), "scan_order"), (dict(unary_length=True), "unary_length"),
    (dict(bitdepth=8.0), "bitdepth"), (dict(workers=2.0), "workers"), (dict(lambda_scale=True), "lambda_scale"),
])
def test_encode_refuses_coerced_settings(kwargs, what):
    with pytest.raises(InputError, match=what):
        nncjax.encode(W, **kwargs)


def test_quantizers_refuse_string_flags():
    from nncjax.quantize.gptq import quantize_gptq
    from nncjax.quantize.reference import choose_codebook_or_uniform, quantize_tensor

    with pytest.raises(InputError, match="dq must be True or False"):
        quantize_tensor(W["w"], -20, dq="no")
    with pytest.raises(InputError, match="param_opt must be True or False"):
        choose_codebook_or_uniform(W["w"], -20, dq=False, param_opt="yes")
    with pytest.raises(InputError, match="act_order"):
        quantize_gptq(jnp.asarray(W["w"]), jnp.eye(4), 0.25, act_order="no")


def test_float_qps_are_refused_by_the_jax_step_map():
    from nncjax.ioq import reconstruct_uniform
    from nncjax.steps import qp_to_step_jax

    with pytest.raises(InputError, match="QPs must be integers"):
        qp_to_step_jax(-32.5)  # was truncated to -32
    with pytest.raises(InputError, match="QPs must be integers"):
        jax.jit(qp_to_step_jax)(jnp.float32(-32.5))  # dtypes are static: refused while tracing too
    with pytest.raises(InputError, match="QPs must be integers"):
        reconstruct_uniform(jnp.ones(3), -20.5)
    assert float(jax.jit(qp_to_step_jax)(jnp.int32(-32))) == 2.0**-8


def test_qp_to_step_of_a_python_int_equals_the_array_path():
    """The codec's per-tensor calls take a shortcut for Python ints: same float64 steps, same refusals."""
    from nncjax.steps import qp_to_step

    for qpd in range(8):
        qps = [*range(-600, 600, 7), -(2**14), 2**12, 2**13 - 1, -(2**40), 2**62, -(2**63)]
        for qp in qps:
            try:
                want = float(qp_to_step(np.array([qp], np.int64), qpd)[0])
            except InputError:
                with pytest.raises(InputError, match="beyond float64"):
                    qp_to_step(qp, qpd)
                continue
            got = qp_to_step(qp, qpd)
            assert type(got) is float and got == want, (qp, qpd)
    with pytest.raises(InputError, match="within int64"):
        qp_to_step(2**70)
    assert is_int(7) and not is_int(True) and check_int(7, "x", lo=7, hi=7) == 7


def test_bfloat16_counts_as_a_float_everywhere_a_real_array_is_checked():
    """NumPy gives bfloat16 the kind 'V', not 'f': kind-letter checks refused bfloat16 weights in
    estimate_bits and code_tensor (TPU-style parameters) and bfloat16 batches in the models."""
    from nncjax.arguments import check_array_kind
    from nncjax.coded_tensor import code_tensor
    from nncjax.models.base import check_batch
    from nncjax.rate import estimate_bits

    w = jnp.linspace(-0.05, 0.05, 64).reshape(8, 8).astype(jnp.bfloat16)
    w32 = w.astype(jnp.float32)  # the same values
    assert float(estimate_bits(w, -38)) == float(estimate_bits(w32, -38))
    assert code_tensor(w, -38)[1] == code_tensor(w32, -38)[1]
    assert check_batch(np.zeros((2, 64), jnp.bfloat16), "images", ("B", 64)).dtype == jnp.bfloat16
    with pytest.raises(InputError, match="got dtype bfloat16"):
        check_array_kind(w, "iu", "levels must be integers")


def test_long_running_entry_points_check_progress_and_stay_quiet_without_it(capsys):
    """progress must be a bool, and progress=False silences every bar, the inner batch loops' too
    (optimize used to show output_sensitivity's bar with progress=False)."""
    import flax.linen as nn

    from nncjax import optimize, optimize_ioq, with_error_feedback, with_fine_tuning
    from nncjax.quantize.gptq import input_moments

    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    xs = [jax.random.normal(jax.random.PRNGKey(i), (32, 4)) for i in range(2)]
    v = model.init(jax.random.PRNGKey(9), xs[0])
    capsys.readouterr()
    rd = optimize(v, model.apply, xs, lam=1e-2, init="sensitivity", steps=0, progress=False)
    moments = input_moments(model.apply, v, xs, progress=False)
    p_g, rd_g = with_error_feedback(v, rd, moments, progress=False)
    with_fine_tuning(p_g, rd_g, model.apply, xs, steps=2, progress=False)
    optimize_ioq(v, model.apply, xs, lam=1e-2, allocation="sensitivity", bn_pairs=None, lsa_steps=1, progress=False)
    assert capsys.readouterr().err == ""
    for call in (lambda: optimize(v, model.apply, xs, lam=1e-2, init="sensitivity", steps=0, progress="no"),
                 lambda: with_error_feedback(v, rd, moments, progress=1),
                 lambda: with_fine_tuning(p_g, rd_g, model.apply, xs, steps=2, progress="no"),
                 lambda: optimize_ioq(v, model.apply, xs, lam=1e-2, bn_pairs=None, progress=None)):
        with pytest.raises(InputError, match="progress must be True or False"):
            call()
