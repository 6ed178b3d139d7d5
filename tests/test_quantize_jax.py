"""JAX quantizers: transforms (jit/grad/vmap), hard modes equal to the codec, DQ trellis vs NNCodec."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from nncjax.kernels.coder import decode_levels, encode_levels

from nncjax.errors import InputError
from nncjax.quantize import (
    codebook_init,
    dq_states,
    dq_trellis,
    k_to_q,
    q_to_k,
    quantize_codebook,
    quantize_dq,
    quantize_uniform,
    quantizer,
    rate_model,
    reference,
    soft_round,
)
from nncjax.rate import estimate_bits_levels, trellis_rate_fn
from nncjax.steps import qp_to_step_continuous, qp_to_step_jax

RNG = np.random.default_rng(7)
W = jnp.asarray(RNG.normal(0, 0.05, (6, 40)).astype(np.float32))
CB = jnp.asarray([-40.0, -12.0, 0.0, 11.0, 37.0])


def _uniform(mode):
    return lambda w, qp, key: quantize_uniform(w, qp_to_step_continuous(qp), mode, rng=key)[1]


def _dq(mode):
    return lambda w, qp, key: quantize_dq(w, qp_to_step_continuous(qp), mode, rng=key)[1]


def _codebook(mode):
    return lambda w, qp, key: quantize_codebook(w, qp_to_step_continuous(qp), CB, mode)[1]


QUANTIZERS = {f"uniform-{m}": _uniform(m) for m in ("hard", "ste", "noise", "soft")}
QUANTIZERS |= {f"dq-{m}": _dq(m) for m in ("hard", "ste", "noise", "soft")}
QUANTIZERS |= {f"codebook-{m}": _codebook(m) for m in ("hard", "ste", "soft")}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantizer_jit_grad_vmap(name):
    fn = QUANTIZERS[name]
    key = jax.random.PRNGKey(0)
    qp = jnp.float32(-36.0)
    eager = fn(W, qp, key)
    assert eager.shape == W.shape and eager.dtype == jnp.float32
    if name.endswith("hard"):      # bit-exact; training modes may differ by fusion rounding
        np.testing.assert_array_equal(np.asarray(jax.jit(fn)(W, qp, key)), np.asarray(eager))
    else:
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(W, qp, key)), np.asarray(eager), rtol=1e-5, atol=1e-8)
    # vmap over a batch of tensors and QPs equals the per-item results
    ws, qps = jnp.stack([W, 2 * W]), jnp.array([-36.0, -30.0])
    keys = jax.random.split(key, 2)
    batched = jax.vmap(fn)(ws, qps, keys)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(fn(ws[i], qps[i], keys[i])), rtol=1e-6, atol=1e-9)
    # gradients w.r.t. weights and QP: finite; non-zero except in hard mode (which stops them)
    gw, gq = jax.grad(lambda w, q: jnp.sum(fn(w, q, key) ** 2), argnums=(0, 1))(W, qp)
    assert np.all(np.isfinite(gw)) and np.isfinite(gq)
    if name.endswith("hard"):
        assert float(jnp.abs(gq)) == 0.0
    else:
        assert float(jnp.sum(jnp.abs(gw))) > 0 and float(jnp.abs(gq)) > 0


def test_soft_round_gradients_match_finite_differences():
    check_grads(lambda x: soft_round(x, 3.0), (jnp.linspace(-2.2, 2.3, 11),), order=2, modes=("fwd", "rev"))
    f = lambda w, step: quantize_uniform(w, step, "soft", alpha=2.0)[1]
    w = jnp.asarray(np.random.default_rng(0).normal(0, 1.0, 8).astype(np.float32))
    check_grads(f, (w, jnp.float32(0.37)), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_ste_step_gradient_is_lsq():
    step = jnp.float32(0.01)
    w = jnp.array([0.0137, -0.0212, 0.004], jnp.float32)
    g = jax.grad(lambda s: jnp.sum(quantize_uniform(w, s, "ste")[1]))(step)
    u = w / step
    np.testing.assert_allclose(float(g), float(jnp.sum(jnp.round(u) - u)), rtol=1e-5)


@settings(max_examples=25)
@given(qp=st.integers(-60, -10), scale=st.floats(1e-4, 1.0), seed=st.integers(0, 2**31 - 1))
def test_uniform_hard_equals_nncodec_rounding_and_decoder(qp, scale, seed):
    w = (np.random.default_rng(seed).standard_normal(257) * scale).astype(np.float32)
    if np.abs(w).max() / reference.qp_to_step(qp) > 2**30:
        return
    k, w_hat = quantize_uniform(w, qp_to_step_jax(qp))
    np.testing.assert_array_equal(np.asarray(k), reference.quantize_uniform(w, qp))
    np.testing.assert_array_equal(np.asarray(w_hat).view(np.uint32), reference.reconstruct(np.asarray(k), qp).view(np.uint32))


@pytest.mark.parametrize("qp,shape", [(-44, (40, 50)), (-36, (3000,)), (-28, (37, 53)), (-18, (64, 64))])
def test_dq_trellis_matches_nncodec_trellis(qp, shape):
    w = np.random.default_rng(abs(qp)).laplace(0, 0.04, shape).astype(np.float32)
    w.reshape(-1)[::7] = 0.0          # exact zeros: a path may still need their parity (level +1)
    k = np.asarray(dq_trellis(w, qp_to_step_jax(qp)))
    ref = reference.quantize_dq(w, qp)
    agree = float(np.mean(k == ref))
    assert agree >= 0.999, agree          # measured: 1.0 on every case (ties could differ in float32)
    np.testing.assert_array_equal(decode_levels(encode_levels(k, dq=True), k.shape, dq=True), k)


def test_dq_hard_reconstruction_is_the_decoders():
    k, w_hat = quantize_dq(W, qp_to_step_jax(-38))
    data = encode_levels(np.asarray(k), dq=True, row_skipping=True)
    k_dec = decode_levels(data, W.shape, dq=True)
    np.testing.assert_array_equal(np.asarray(w_hat).view(np.uint32), reference.reconstruct(k_dec, -38).view(np.uint32))


@settings(max_examples=30)
@given(st.lists(st.integers(-9, 9), min_size=1, max_size=60))
def test_dq_states_and_level_maps_follow_the_state_machine(qs):
    q = np.array(qs, np.int32)
    s, ks = 0, []
    for v in q:                      # the decoder's loop (nnr-format.md §6.7)
        ks.append(0 if v == 0 else 2 * v - np.sign(v) * (s & 1))
        s = int(reference_next(s, v & 1))
    k = jnp.asarray(ks, jnp.int32)
    states = dq_states(k)
    np.testing.assert_array_equal(np.asarray(k_to_q(k, states)), q)
    np.testing.assert_array_equal(np.asarray(q_to_k(q, states)), np.asarray(ks))


def _x64():
    """``jax_enable_x64`` on for a ``with`` block and restored after it."""
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # jax < 0.5 has it only under experimental
        from jax.experimental import enable_x64 as enable
    return enable(True)


def test_dq_is_dtype_stable_under_x64():
    """With 64-bit types on, the trellis scans keep their int32 carries and give the same levels."""
    step = qp_to_step_jax(-38)
    k32 = dq_trellis(W, step)
    rate = trellis_rate_fn(k32, dq=True)
    want = {"k": k32, "rate": dq_trellis(W, step, lam=2.0, rate=rate), "states": dq_states(k32),
            "hard": quantize_dq(W, step)[1], "ste": quantize_dq(W, step, "ste")[1]}
    with _x64():
        k = dq_trellis(W, step)
        got = {"k": k, "rate": dq_trellis(W, step, lam=2.0, rate=rate), "states": dq_states(k),
               "hard": quantize_dq(W, step)[1], "ste": quantize_dq(W, step, "ste")[1]}
        grad = jax.grad(lambda w: jnp.sum(quantize_dq(w, step, "ste")[1] ** 2))(W)
    assert not jax.config.jax_enable_x64
    for name, want_x in want.items():
        assert got[name].dtype == want_x.dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want_x), err_msg=name)
    assert grad.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grad)))


def test_trellis_rate_table_is_the_same_under_x64():
    # the remainder's prefix length is an integer bit length: float64 log2(8) is 2.9999999999999996
    k = dq_trellis(W, qp_to_step_jax(-38))
    a = jnp.arange(4097)
    want = trellis_rate_fn(k, dq=True)(a, jnp.zeros_like(a))
    with _x64():
        got = trellis_rate_fn(k, dq=True)(a, jnp.zeros_like(a))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def test_optimize_with_dq_runs_under_x64():
    import flax.linen as nn

    import nncjax

    m = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6), jnp.float32)
    v = m.init(jax.random.PRNGKey(1), x)
    with _x64():
        rd = nncjax.optimize(v, m.apply, x, lam=1e-3, steps=2, dq=True, progress=False)
        out = nncjax.verify(v, rd)
    assert rd.history["loss"].shape == (2,) and np.all(np.isfinite(rd.history["loss"]))
    assert out.params["params"]["layers_0"]["kernel"].dtype == jnp.float32


def reference_next(state, parity):
    from nncjax.kernels.tables import DQ_NEXT
    return DQ_NEXT[state, parity]


def test_rate_aware_trellis_trades_bits_for_distortion():
    w = np.random.default_rng(3).normal(0, 0.05, (32, 128)).astype(np.float32)
    step = qp_to_step_jax(-24)
    k0 = dq_trellis(w, step)
    rate = trellis_rate_fn(k0, dq=True)
    k1 = dq_trellis(w, step, lam=2.0, rate=rate)
    d = lambda k: float(jnp.sum((np.abs(w) / step - jnp.abs(k)) ** 2))
    b = lambda k: float(estimate_bits_levels(k, dq=True))
    assert b(k1) < 0.9 * b(k0) and d(k1) > d(k0)
    np.testing.assert_array_equal(decode_levels(encode_levels(np.asarray(k1), dq=True), w.shape, dq=True), np.asarray(k1))


def test_codebook_init_and_hard_mode():
    w = jnp.asarray(np.random.default_rng(1).normal(0, 0.05, 4000).astype(np.float32))
    step = qp_to_step_jax(-30)
    cb = codebook_init(w, step, 8)
    assert cb.shape == (8,) and bool(jnp.all(jnp.diff(cb) > 0))
    lev, w_hat = quantize_codebook(w, step, cb)
    cbi = np.round(np.asarray(cb)).astype(np.int32)
    zero = int(np.argmin(np.abs(cbi)))
    np.testing.assert_array_equal(np.asarray(w_hat), np.float32(step) * cbi[np.asarray(lev) + zero].astype(np.float32))
    # k-means beats a uniform codebook of the same size over the same range
    uni = jnp.linspace(cb[0], cb[-1], 8)
    err = lambda c: float(jnp.sum((quantize_codebook(w, step, c, "ste")[1] - w) ** 2))
    assert err(cb) < err(uni)
    g = jax.grad(lambda c: jnp.sum((quantize_codebook(w, step, c, "ste")[1] - w) ** 2))(cb + 0.3)
    assert float(jnp.sum(jnp.abs(g))) > 0


def test_quantizer_transform_rules_and_hard_equality():
    params = {"dense": {"kernel": W, "bias": jnp.full((40,), 0.01)}, "emb": [W[:2]]}
    rules = [(r".*kernel", {"qp": -38, "dq": True}), (r".*bias", {"qp": -75, "dq": False})]
    q = quantizer(rules, mode="hard")
    state = q.init(params)
    assert set(state) == {"dense/kernel", "dense/bias"}
    out, aux = q.apply(state, params)
    np.testing.assert_array_equal(np.asarray(out["emb"][0]), np.asarray(W[:2]))        # unmatched: untouched
    np.testing.assert_array_equal(np.asarray(out["dense"]["kernel"]), np.asarray(quantize_dq(W, qp_to_step_jax(-38))[1]))
    np.testing.assert_array_equal(np.asarray(aux["dense/bias"]["levels"]), reference.quantize_uniform(np.full(40, 0.01, np.float32), -75))
    # training: gradient of distortion + rate reaches every learnable QP
    qt, r = quantizer(rules, mode="ste"), rate_model(rules, training=True)

    def loss(s):
        out, _ = qt.apply(s, params)
        dist = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(params)))
        return 1e4 * dist + 1e-3 * sum(r.apply(s, params).values())

    g = jax.jit(jax.grad(loss))(state)
    assert all(np.isfinite(float(v["qp"])) and float(v["qp"]) != 0 for v in g.values())
    with pytest.raises(InputError):
        quantizer([(r".*", {"qp": -38, "typo": 1})]).init(params)
    with pytest.raises(InputError):
        quantizer([(r".*", {"dq": True, "codebook": 4})]).init(params)


@pytest.mark.parametrize("dq", [False, True])
def test_hard_quantizers_equal_the_codec_round_trip(dq):
    """Hard mode of the JAX quantizers == nncjax.decode(nncjax.encode(...)) bit for bit, per tensor."""
    import nncjax

    rng = np.random.default_rng(11)
    params = {"a": {"kernel": rng.laplace(0, 0.05, (48, 40)).astype(np.float32)},
              "b": {"kernel": rng.normal(0, 0.02, (4, 3, 3, 8)).astype(np.float32)}}
    back = nncjax.decode(nncjax.encode(params, qp=-36, dq=dq), like=params)
    quantize = quantize_dq if dq else quantize_uniform
    for name in ("a", "b"):
        _, w_hat = quantize(params[name]["kernel"], qp_to_step_jax(-36))
        np.testing.assert_array_equal(np.asarray(w_hat).view(np.uint32), back[name]["kernel"].view(np.uint32))


@pytest.mark.parametrize("rules, match", [
    ([("(", {})], "invalid regular expression"),
    (".*", "sequence of"),
    ([(".*", None)], "settings must be a dict"),
    ([(".*", dict(qp="a"))], "qp"),
    ([(".*", dict(codebook=2.5, dq=False))], "codebook"),
])
def test_malformed_rules_raise_input_error(rules, match):
    p = {"w": jnp.ones((2, 3))}
    with pytest.raises(InputError, match=match):
        quantizer(rules).init(p)
    with pytest.raises(InputError, match=match):
        rate_model(rules).init(p)


def test_apply_with_state_missing_a_tensor_raises_input_error():
    p = {"w": jnp.ones((2, 3))}
    rules = [(".*", dict(qp=-38))]
    with pytest.raises(InputError, match="'w'"):
        quantizer(rules).apply({}, p)
    with pytest.raises(InputError, match="'w'"):
        rate_model(rules).apply({}, p)
    # The check runs while tracing, so a complete state still jits.
    q = quantizer(rules)
    out, _ = jax.jit(q.apply)(q.init(p), p)
    assert out["w"].shape == (2, 3)


def _hard(kind):
    """(levels, w_hat) of a hard quantizer; the codebook is w's own values in steps, so it overflows with w."""
    if kind == "codebook":
        return lambda w, step: quantize_codebook(w, step, jnp.sort(jnp.asarray(w, jnp.float32) / step))
    return {"uniform": quantize_uniform, "dq": quantize_dq,
            "trellis": lambda w, step: (dq_trellis(w, step), None)}[kind]


@pytest.mark.parametrize("kind", ["uniform", "dq", "trellis", "codebook"])
def test_hard_quantizers_refuse_int32_overflow_and_saturate_under_jit(kind):
    w, step = jnp.array([1e8, -1e8, 1.0], jnp.float32), qp_to_step_jax(-38)
    with pytest.raises(InputError, match=r"overflow int32: max \|.*\| .*= 6\.8\d+e\+10 at step 0\.0014648438"):
        _hard(kind)(w, step)
    # Under jit nothing can be raised: the levels saturate (they used to wrap for DQ and
    # mis-centre the codebook, whose zero entry was found by the int32 abs of -2**31).
    k = np.asarray(jax.jit(_hard(kind))(w, step)[0]).astype(np.int64)
    if kind == "codebook":
        assert k.tolist() == [1, -1, 0]
    else:
        assert k[0] >= 2**31 - 128 and -(2**31) <= k[1] <= -(2**31 - 128) and k[2] == 683


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("scale", [-1.0, 1.0])
@pytest.mark.parametrize("ulps", [-1, 0])
def test_hard_quantizers_refuse_exactly_what_encode_codes_at_a_coarser_qp(dq, scale, ulps):
    """At the int32 boundary (|w| / step = 2**31 or the float32 below it) a quantizer raises exactly
    where ``nncjax.encode`` raises the QP (``QPAdjustedWarning``); otherwise its levels are exact."""
    step = qp_to_step_jax(-32)                                             # 2**-8
    big = np.float32(scale) * np.nextafter(np.float32(2**23), np.float32(0), dtype=np.float32) if ulps else \
        np.float32(scale * 2**23)
    w = np.array([big, 0.25], np.float32)
    quantize = quantize_dq if dq else quantize_uniform
    if reference.safe_qp(w, -32, dq=dq) != -32:
        with pytest.raises(InputError, match="overflow int32"):
            quantize(w, step)
    else:
        k, w_hat = quantize(w, step)
        np.testing.assert_array_equal(np.asarray(w_hat), w)
        assert int(k[0]) == int(np.float64(big) * 256)


@pytest.mark.parametrize("kind", ["uniform", "dq", "trellis", "codebook"])
@pytest.mark.parametrize("step", [0.0, -0.0015, np.nan, np.inf])
def test_quantizers_refuse_invalid_steps(kind, step):
    w = jnp.array([0.01, 0.02])
    with pytest.raises(InputError, match="step must be finite and > 0"):
        _hard(kind)(w, step)
    if kind != "trellis":
        with pytest.raises(InputError, match="step must be finite and > 0"):
            {"uniform": quantize_uniform, "dq": quantize_dq,
             "codebook": lambda w, s, m: quantize_codebook(w, s, CB, m)}[kind](w, step, "ste")
    if kind == "codebook":
        with pytest.raises(InputError, match="step must be finite and > 0"):
            codebook_init(w, step, 2)


@pytest.mark.parametrize("mode", ["hard", "ste", "soft"])
def test_codebook_rule_codes_an_empty_tensor_uniformly(mode):
    """An empty tensor has no codebook (as in nncjax.encode): empty in, empty out, also under jit."""
    params = {"e": jnp.zeros((0, 3)), "w": W}
    q = quantizer([(r".*", dict(qp=-38, dq=False, codebook=4))], mode=mode)
    state = q.init(params)
    assert "codebook" not in state["e"] and state["w"]["codebook"].shape == (4,)
    for apply in (q.apply, jax.jit(q.apply)):
        out, aux = apply(state, params)
        assert out["e"].shape == (0, 3) and aux["e"]["levels"].shape == (0, 3)
    with pytest.raises(InputError, match="empty tensor has no codebook"):
        codebook_init(jnp.zeros((0,)), 0.1, 4)


def test_quantizer_rules_name_the_tensor_whose_levels_overflow():
    params = {"big": jnp.array([1e8, 1.0]), "ok": W}
    for rules in ([(r".*", dict(qp=-38, dq=False))], [(r".*", dict(qp=-38))]):
        with pytest.raises(InputError, match=r"tensor 'big': levels overflow int32"):
            quantizer(rules, mode="hard").apply(quantizer(rules).init(params), params)
