"""nncjax.quantize.gptq (error-feedback quantization of linear layers) and
nncjax.with_error_feedback (GPTQ in place of DQ at equal layer-output error)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nncjax.kernels.tables import DQ_NEXT

import nncjax.quantize.gptq
import nncjax.reduce
from nncjax import InputError, UnsupportedError, decode, encode
from nncjax.coded_tensor import codec_reconstruct
from nncjax.error_feedback import with_error_feedback
from nncjax.optimize import optimize
from nncjax.pytree_names import flatten_named
from nncjax.quantize.dq import dq_states, dq_trellis
from nncjax.quantize.gptq import (
    _error_feedback,
    input_moments,
    layer_output_error,
    quantize_gptq,
)
from nncjax.rd_settings import verify
from nncjax.steps import qp_to_step
from tests._half_mlp import HalfMLP
from tests._lifted_models import Block, Lifted


def _correlated(rng, cols, n=256):
    """Second moment of inputs with a strong common component (as in transformer activations)."""
    x = rng.normal(0, 1, (n, 1)) * rng.normal(1, 0.3, (1, cols)) + 0.4 * rng.normal(0, 1, (n, cols))
    return (x.T @ x / n).astype(np.float32)


def test_diagonal_moments_give_plain_rounding():
    """Uncorrelated inputs leave nothing to feed back: the levels are the codec's uniform ones."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (12, 20)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, 20)).astype(np.float32)
    step = qp_to_step(-30)
    _, w_hat = quantize_gptq(w, h, step)
    np.testing.assert_array_equal(np.asarray(w_hat), codec_reconstruct(w, -30, dq=False))
    rows = np.full(12, step, np.float32)
    rows[::2] *= 2  # per-row steps (local scales): each row on its own grid
    levels, w_rows = quantize_gptq(w, h, rows)
    np.testing.assert_array_equal(np.asarray(levels), np.sign(w) * np.floor(np.abs(w / rows[:, None]) + 0.5))
    np.testing.assert_array_equal(np.asarray(w_rows), np.asarray(levels) * rows[:, None])


def test_error_feedback_lowers_the_layer_output_error():
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(10):
        w = rng.normal(0, 0.05, (16, 32)).astype(np.float32)
        h = _correlated(rng, 32)
        step = qp_to_step(-28)
        rtn = codec_reconstruct(w, -28, dq=False)
        _, w_hat = quantize_gptq(w, h, step)
        ratios.append(float(layer_output_error(w, w_hat, h) / layer_output_error(w, rtn, h)))
    assert np.mean(ratios) < 0.5 and max(ratios) < 1.0


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 24), qp=st.integers(-44, -16), seed=st.integers(0, 2**31 - 1))
def test_gptq_output_is_coded_losslessly_without_dq(rows, cols, qp, seed):
    """The invariant with_error_feedback relies on: GPTQ's reconstruction lies on the codec's grid, so
    encoding it with dq=False at the same QP decodes to exactly it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (rows, cols)).astype(np.float32)
    _, w_hat = quantize_gptq(w, _correlated(rng, cols, n=64), qp_to_step(qp))
    w_hat = np.asarray(w_hat, np.float32)
    np.testing.assert_array_equal(decode(encode({"w": w_hat}, qp=qp, dq=False))["w"], w_hat)


def test_error_feedback_loop_compiles_once_per_shape():
    rng = np.random.default_rng(2)
    h = _correlated(rng, 8)
    quantize_gptq(rng.normal(0, 1, (4, 8)), h, 0.1)
    before = _error_feedback._cache_size()
    quantize_gptq(rng.normal(0, 1, (4, 8)), h, 0.3)
    assert _error_feedback._cache_size() == before


@pytest.mark.parametrize("cols", [5, 64, 100, 200])
def test_blocked_feedback_matches_column_by_column_feedback(cols):
    """The blocked loop (errors passed on a block of columns at a time) is the textbook algorithm:
    round column j, move its error onto every later column through row j of U. Column counts below,
    at and across the block size."""
    rng = np.random.default_rng(cols)
    w = rng.normal(0, 0.05, (7, cols))
    h = _correlated(rng, cols).astype(np.float64)
    h += 0.01 * np.mean(np.diag(h)) * np.eye(cols)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    step = np.full(7, qp_to_step(-30))
    x, want = w.copy(), np.zeros_like(w)
    for j in range(cols):
        want[:, j] = np.sign(x[:, j]) * np.floor(np.abs(x[:, j] / step) + 0.5)
        x[:, j + 1:] -= np.outer((x[:, j] - want[:, j] * step) / u[j, j], u[j, j + 1:])
    got = np.asarray(_error_feedback(jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32),
                                     jnp.asarray(1 / step, jnp.float32), jnp.asarray(step, jnp.float32))).T
    # float32 against float64: a level may flip where a value sits at a rounding boundary
    assert np.mean(got == want) > 0.99
    err = [float(layer_output_error(w, k * step[:, None], h)) for k in (got, want)]
    assert err[0] == pytest.approx(err[1], rel=0.02)


@pytest.mark.parametrize(("w", "h", "step", "match"), [
    (np.ones((2, 3)), np.eye(2), 0.1, "columns"),
    (np.ones(3), np.eye(3), 0.1, "columns"),
    (np.ones((2, 3)), np.eye(3), 0.0, "positive"),
    (np.ones((2, 3)), np.eye(3), np.ones(3), "shape"),
    (np.full((2, 3), np.nan), np.eye(3), 0.1, "finite"),
    (np.ones((2, 3)), -np.eye(3), 0.1, "semi-definite"),
    (np.ones((2, 3)), np.diag([1.0, -1.0, 1.0]), 0.1, "semi-definite"),  # E[x_j^2] < 0 is no input that never fires
])
def test_bad_inputs_raise_input_error(w, h, step, match):
    with pytest.raises(InputError, match=match):
        quantize_gptq(w, h, step)
    with pytest.raises(InputError, match=match):
        quantize_gptq(w, h, step, dq=True)


def test_trellis_needs_the_scan_order():
    with pytest.raises(InputError, match="act_order"):
        quantize_gptq(np.ones((2, 3)), np.eye(3), 0.1, dq=True, act_order=True)


def _row_end_states(k):
    """The DQ state after each row of ``k`` (rows, columns), scanned in C order as the codec does."""
    flat = np.concatenate([np.asarray(k, np.int32).reshape(-1), [0]])
    return np.asarray(dq_states(jnp.asarray(flat)))[k.shape[1]::k.shape[1]]


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 150), qp=st.integers(-44, -16), seed=st.integers(0, 2**31 - 1))
def test_trellis_gptq_output_is_coded_losslessly_with_dq(rows, cols, qp, seed):
    """The trellis's invariant: every row starts and ends in DQ state 0, so the rows coded one after
    another follow the path the levels were chosen on, and encoding the reconstruction with DQ at
    the same QP decodes to exactly it (columns below, at and across the 64-column block)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (rows, cols)).astype(np.float32)
    k, w_hat = quantize_gptq(w, _correlated(rng, cols, n=64), qp_to_step(qp), dq=True)
    k, w_hat = np.asarray(k), np.asarray(w_hat, np.float32)
    assert np.all(_row_end_states(k) == 0)
    np.testing.assert_array_equal(w_hat, k * np.float32(qp_to_step(qp)))
    np.testing.assert_array_equal(decode(encode({"w": w_hat}, qp=qp, dq=True))["w"], w_hat)


def test_trellis_gptq_with_diagonal_moments_is_the_best_dq_path():
    """Uncorrelated inputs feed nothing back, so the trellis is an exact Viterbi search: its weighted
    error equals the minimum over every level sequence that is a DQ path ending in state 0
    (exhaustive search over |k| <= 6)."""
    nxt = np.asarray(DQ_NEXT)
    rng = np.random.default_rng(3)
    cols, step = 5, 0.1
    grid = np.stack(np.meshgrid(*[np.arange(-6, 7)] * cols, indexing="ij"), -1).reshape(-1, cols)
    state, valid = np.zeros(len(grid), np.int64), np.ones(len(grid), bool)
    for j in range(cols):  # k is valid in even states if even, in odd states if odd or zero
        kj, odd = grid[:, j], state & 1
        valid &= np.where(odd == 1, (kj % 2 == 1) | (kj == 0), kj % 2 == 0)
        q = (kj + np.sign(kj) * odd) >> 1
        state = nxt[state, q & 1]
    paths = grid[valid & (state == 0)]
    for _ in range(5):
        w = rng.uniform(-0.25, 0.25, (1, cols)).astype(np.float32)
        d = np.diag(rng.uniform(0.5, 2.0, cols)).astype(np.float32)
        k, _ = quantize_gptq(w, d, step, dq=True, damp=0.0)
        cost = [np.sum(np.diag(d) * (w - kk * np.float32(step)) ** 2, axis=-1) for kk in (np.asarray(k), paths)]
        assert cost[0][0] == pytest.approx(float(np.min(cost[1])), rel=1e-5)


def test_trellis_gptq_lowers_the_layer_output_error_of_dq():
    """Against the codec's own DQ trellis at the same step (same grids, same rate regime), feeding
    the errors back along each surviving path cuts the layer-output error on correlated inputs."""
    rng = np.random.default_rng(4)
    ratios = []
    for _ in range(6):
        w = rng.normal(0, 0.05, (16, 96)).astype(np.float32)
        h = _correlated(rng, 96)
        step = np.float32(qp_to_step(-28))
        ref = np.asarray(dq_trellis(jnp.asarray(w), step)) * step
        _, w_hat = quantize_gptq(w, h, step, dq=True)
        ratios.append(float(layer_output_error(w, w_hat, h) / layer_output_error(w, ref, h)))
    assert np.mean(ratios) < 0.5 and max(ratios) < 1.0


class _TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(5, name="hidden")(x)))


def test_input_moments_are_the_inputs_second_moments():
    model = _TwoDense()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 4))
    v = model.init(jax.random.PRNGKey(1), x)
    apply = jax.jit(model.apply)  # a jitted apply_fn still shows its layers (it is unwrapped)
    h = input_moments(apply, v, [x[:1], x[1:]])
    assert set(h) == {"params/hidden/kernel", "params/out/kernel"}
    flat = np.asarray(x, np.float64).reshape(-1, 4)
    np.testing.assert_allclose(h["params/hidden/kernel"], flat.T @ flat / 14, rtol=1e-6)
    hidden = np.asarray(nn.relu(x @ v["params"]["hidden"]["kernel"] + v["params"]["hidden"]["bias"]),
                        np.float64).reshape(-1, 5)
    np.testing.assert_allclose(h["params/out/kernel"], hidden.T @ hidden / 14, rtol=1e-5, atol=1e-7)
    keep = np.zeros((1, 7), bool)
    keep[0, :3] = True  # e.g. an attention mask: only these positions count
    masked = input_moments(model.apply, v, x[:1], mask=lambda b: keep)
    first = np.asarray(x[0, :3], np.float64)
    np.testing.assert_allclose(masked["params/hidden/kernel"], first.T @ first / 3, rtol=1e-6)
    # a jitted call inside apply_fn (no unwrapping reaches it): its layers run in the inner jit's trace,
    # and their sums reach the host by callback
    nested = input_moments(lambda p, b: jax.jit(model.apply)(p, b), v, x)
    np.testing.assert_allclose(nested["params/hidden/kernel"], flat.T @ flat / 14, rtol=1e-6)

    class Unhashable:  # an apply_fn that cannot be a static jit argument is compiled per call
        __hash__ = None

        def __call__(self, p, b):
            return model.apply(p, b)

    np.testing.assert_allclose(input_moments(Unhashable(), v, x)["params/hidden/kernel"], flat.T @ flat / 14,
                               rtol=1e-6)
    with pytest.raises(InputError):
        input_moments(model.apply, v, [])
    with pytest.raises(InputError, match="no flax.linen.Dense"):
        input_moments(lambda p, b: b * 2, v, x)
    with pytest.raises(InputError, match=r"mask of shape \(3,\) does not fit .* 'hidden'"):
        input_moments(model.apply, v, x, mask=lambda b: np.ones(3, bool))


def test_input_moments_under_remat_and_broadcast_scan_equal_the_plain_model():
    """Layers under nn.remat run in the checkpoint's own trace: their moments reach the host from
    there and equal the plain model's, masked, jitted, over batches (the second one runs the trace
    compiled for the first, and again in a second call). A scan with broadcast parameters pools its
    steps, as one block called three times does."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 7))
    v = Lifted("plain").init(jax.random.PRNGKey(1), x)
    plain, remat = Lifted("plain").apply, jax.jit(Lifted("remat").apply)
    keep = np.arange(5) < 3  # a mask over the leading axes, from outside the checkpoint's trace
    for data in ([x[:2], x[2:]], [x[2:] * 2, x[:2]]):
        for kw in ({}, {"mask": lambda b: keep}):
            want = input_moments(plain, v, data, **kw)
            got = input_moments(remat, v, data, **kw)
            assert set(got) == set(want) == {"params/inp/kernel", "params/blk/dense/kernel", "params/out/kernel"}
            for n in want:
                np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7)
    want = input_moments(Lifted("loop").apply, v, x)
    got = input_moments(Lifted("scan_shared").apply, v, x)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6)


def _stacked_block_apply(kind):
    """``apply(variables, x)`` of ``Lifted(kind)``'s ``blk`` on its own."""
    if kind == "scan":
        blk = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(scan=True)
        return lambda p, b: blk.apply(p, b, None)[0]
    return nn.vmap(Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0)().apply


@pytest.mark.parametrize("kind", ["scan", "vmap"])
def test_input_moments_skip_kernels_stacked_by_scan_and_vmap(kind):
    """A stacked kernel serves several layers with different inputs: it gets no moments, the layers
    around it get theirs; a model with nothing else raises UnsupportedError naming the layer."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 7))
    model = Lifted(kind)
    v = model.init(jax.random.PRNGKey(1), x)
    h = input_moments(jax.jit(model.apply), v, [x, x])
    assert set(h) == {"params/inp/kernel", "params/out/kernel"}
    flat = np.asarray(x, np.float64)
    np.testing.assert_allclose(h["params/inp/kernel"], flat.T @ flat / 4, rtol=1e-6, atol=1e-7)
    apply = _stacked_block_apply(kind)
    y = apply({"params": v["params"]["blk"]}, nn.Dense(6).apply({"params": v["params"]["inp"]}, x))
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(h["params/out/kernel"], y.T @ y / 4, rtol=1e-5, atol=1e-6)
    v_blk = {"params": v["params"]["blk"]}
    with pytest.raises(UnsupportedError, match="'params/dense/kernel'"):
        input_moments(apply, v_blk, x[:, :6])


@pytest.mark.parametrize("kw", [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 2), strides=2, padding="VALID"),
    dict(kernel_size=(5,), padding="CAUSAL"),
    dict(kernel_size=(3, 3), padding="CIRCULAR", kernel_dilation=2),
    dict(kernel_size=(3, 3), padding=((1, 0), (2, 1)), input_dilation=(1, 2)),
    dict(kernel_size=(4,), padding="REFLECT", strides=3),
    dict(kernel_size=(2, 2, 2)),
    dict(kernel_size=(70,), strides=2, padding="SAME", kernel_dilation=1),  # many offsets: an identity conv
    dict(kernel_size=(9, 9), strides=(2, 1), input_dilation=2, kernel_dilation=(1, 2), padding=((4, 4), (2, 7))),
])
def test_conv_input_moments_give_the_output_energy(kw):
    """A convolution is ``y = W x`` per output position over its input patches: the moments of the
    patches predict the layer's own output moments, ``E[y y^T] = W H W^T`` (W in NNR layout, rows
    flattened), whatever the padding, strides, dilations and rank."""
    from nncjax.reduce import flax_to_nnr

    model = nn.Conv(6, use_bias=False, **kw)
    size = 80 if kw["kernel_size"] == (70,) else 9
    x = jax.random.normal(jax.random.PRNGKey(0), (3,) + (size,) * len(kw["kernel_size"]) + (4,))
    v = model.init(jax.random.PRNGKey(1), x)
    (h,) = input_moments(model.apply, v, [x[:1], x[1:]]).values()
    y = np.asarray(model.apply(v, x), np.float64).reshape(-1, 6)
    w = np.asarray(flax_to_nnr(v["params"]["kernel"]), np.float64).reshape(6, -1)
    np.testing.assert_allclose(w @ h @ w.T, y.T @ y / len(y), rtol=1e-4, atol=1e-6)


def _output_energy_check(model, x):
    """``E[y y^T] = W H W^T`` for the layer's kernel ``W`` as error feedback lays it out against its
    moments ``H`` (rows: outputs), with ``y`` the outputs of the bias-free layer flattened to those rows."""
    from nncjax.error_feedback import _LinearView
    from nncjax.rd_settings import to_rows_first

    v = model.init(jax.random.PRNGKey(1), x)
    (h,) = input_moments(model.apply, v, [x[:1], x[1:]]).values()
    k = np.asarray(v["params"]["kernel"], np.float64)
    view = _LinearView(to_rows_first(k, k.ndim - 1), k.shape, k.ndim - 1, h)
    w = view.matrix(to_rows_first(k, k.ndim - 1))
    y = np.asarray(model.apply(v, x), np.float64).reshape(-1, w.shape[0])
    np.testing.assert_allclose(w @ h @ w.T, y.T @ y / len(y), rtol=1e-4, atol=1e-6)
    return h, view


@pytest.mark.parametrize(("model", "shape", "columns", "input_axes"), [
    (nn.DenseGeneral((3, 4), axis=-1), (3, 5, 8), 8, 1),                # attention's q / k / v projection
    (nn.DenseGeneral(6, axis=(-2, -1)), (3, 5, 2, 4), 8, None),         # its output projection
    (nn.DenseGeneral((2, 3), axis=(1, 2)), (3, 2, 4, 5), 8, 2),         # inputs in the middle, 4-D kernel
    (nn.DenseGeneral((2, 3), axis=(2, 1)), (3, 2, 4, 5), 8, 2),         # contracted in another order
    (nn.DenseGeneral((1, 3), axis=(-2, -1)), (3, 5, 2, 4), 8, None),    # a size-1 feature axis
    (nn.DenseGeneral(5, axis=(-3, -1)), (3, 2, 4, 3), 6, None),         # not adjacent
    (nn.Einsum((2, 4, 3), "btnh,nhf->btf"), (3, 5, 2, 4), 8, None),
    (nn.Einsum((4, 2, 3), "btnh,hnf->btf"), (3, 5, 2, 4), 8, None),     # inputs in another order than x's
    (nn.Einsum((2, 4, 3), "...nh,nhf->...f"), (3, 5, 2, 4), 8, None),
    (nn.Einsum((4, 3, 5), "btnh,hfg->btnfg"), (3, 5, 2, 4), 4, 1),
])
def test_dense_general_and_einsum_input_moments_give_the_output_energy(model, shape, columns, input_axes):
    """DenseGeneral and Einsum are ``y = W x`` over their contracted axes: their moments predict
    their output moments with the kernel laid out as error feedback lays it out (NNR rows for one
    output axis; each output of several axes a row of its inputs)."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    h, view = _output_energy_check(model.copy(use_bias=False), x)
    assert h.shape == (columns, columns) and view.input_axes == input_axes


@pytest.mark.parametrize("spec", ["btnh,fh->btnf", "btnh,nhf->bf", "btnh,nhf->btnf", "btnh,nhfn->btf"])
def test_einsums_that_are_not_inputs_then_outputs_are_left_out(spec):
    """An output index first in the kernel, an index summed away, one matrix per head, a repeated
    index: no moments of the kernel's leading axes."""
    shape = {"btnh,fh->btnf": (3, 4), "btnh,nhfn->btf": (2, 4, 3, 2)}.get(spec, (2, 4, 3))
    model = nn.Einsum(shape, spec, use_bias=False)
    x = jnp.ones((3, 5, 2, 4))
    with pytest.raises(InputError, match="no flax.linen.Dense or"):
        input_moments(model.apply, model.init(jax.random.PRNGKey(0), x), x)


def test_dense_general_moments_take_the_mask_and_skip_batch_dims():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 8))
    keep = np.zeros((2, 7), bool)
    keep[:, :3] = True
    model = nn.DenseGeneral((2, 4), use_bias=False)
    v = model.init(jax.random.PRNGKey(1), x)
    (h,) = input_moments(model.apply, v, x, mask=lambda b: keep).values()
    kept = np.asarray(x[:, :3], np.float64).reshape(-1, 8)
    np.testing.assert_allclose(h, kept.T @ kept / 6, rtol=1e-5)
    batched = nn.DenseGeneral((2, 4), batch_dims=(0,))  # one kernel slice per batch index: no H of the kernel
    with pytest.raises(InputError, match="no flax.linen.Dense or"):
        input_moments(batched.apply, batched.init(jax.random.PRNGKey(1), x), x)


@pytest.mark.parametrize("kw", [
    dict(kernel_size=(2, 2), strides=(2, 2)),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(2, 3), strides=(3, 1), padding="VALID", kernel_dilation=(2, 1)),
    dict(kernel_size=(2, 3), strides=(1, 2), padding=((1, 2), (0, 1))),
    dict(kernel_size=(3, 3), strides=2),
    dict(kernel_size=(4,), strides=3),
])
def test_conv_transpose_input_moments_give_the_output_energy(kw):
    """A transposed convolution is the convolution of its input dilated by its strides: the moments
    of those patches predict its output moments, ``E[y y^T] = W H W^T``."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3,) + (6,) * len(kw["kernel_size"]) + (4,))
    h, _ = _output_energy_check(nn.ConvTranspose(5, use_bias=False, **kw), x)
    assert h.shape == (4 * int(np.prod(kw["kernel_size"])),) * 2


@pytest.mark.parametrize("kw", [dict(transpose_kernel=True), dict(padding="CIRCULAR")])
def test_transposed_kernels_and_circular_transposed_convolutions_are_left_out(kw):
    model = nn.ConvTranspose(5, (2, 2), strides=(2, 2), **kw)
    x = jnp.ones((2, 4, 4, 3))
    with pytest.raises(InputError, match="no flax.linen.Dense or"):
        input_moments(model.apply, model.init(jax.random.PRNGKey(0), x), x)


@pytest.mark.parametrize("stride", [1, 3, 7, 1000])
def test_patch_stride_keeps_every_kth_patch(stride):
    """With ``patch_stride=k`` a convolution's moments are those of every k-th output position of the
    batch (batch-major raster order), so ``W H W^T`` is the energy of those outputs; Dense inputs
    are all kept."""
    from nncjax.reduce import flax_to_nnr

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(6, (3, 2), strides=(1, 2), use_bias=False, name="conv")(x)
            return nn.Dense(3, name="dense")(y.reshape(y.shape[0], -1)), y

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 8, 4))
    v = Net().init(jax.random.PRNGKey(1), x)
    h = input_moments(lambda p, b: Net().apply(p, b)[0], v, x, patch_stride=stride)
    y = np.asarray(Net().apply(v, x)[1], np.float64).reshape(-1, 6)[::stride]
    w = np.asarray(flax_to_nnr(v["params"]["conv"]["kernel"]), np.float64).reshape(6, -1)
    np.testing.assert_allclose(w @ h["params/conv/kernel"] @ w.T, y.T @ y / len(y), rtol=1e-4, atol=1e-6)
    flat = np.asarray(Net().apply(v, x)[1], np.float64).reshape(3, -1)
    np.testing.assert_allclose(h["params/dense/kernel"], flat.T @ flat / 3, rtol=1e-4, atol=1e-5)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="patch_stride"):
            input_moments(lambda p, b: Net().apply(p, b)[0], v, x, patch_stride=bad)


def test_grouped_convolutions_are_left_out():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), feature_group_count=4, name="depthwise")(x)
            return nn.Conv(2, (1, 1), name="pointwise")(x)

    x = jnp.ones((2, 5, 5, 4))
    v = Net().init(jax.random.PRNGKey(0), x)
    assert list(input_moments(Net().apply, v, x)) == ["params/pointwise/kernel"]
    with pytest.raises(InputError, match="no flax.linen.Dense or"):
        input_moments(nn.Conv(8, (3, 3), feature_group_count=4).apply,
                      nn.Conv(8, (3, 3), feature_group_count=4).init(jax.random.PRNGKey(0), x), x)


def test_with_error_feedback_codes_conv_kernels():
    """On the Fashion-MNIST CNN (real images): GPTQ takes conv kernels (4-D, Flax layout) to a coarser
    QP at no more held-out layer-output error, fewer bits, and the stream decodes to exactly them."""
    from nncjax.models.fashion_cnn import load, load_fashion_mnist

    m = load()
    x = load_fashion_mnist("train")[0]
    fit, check = (input_moments(m.apply, m.params, jnp.asarray(x[a:a + 500])) for a in (1000, 1500))
    assert {"params/conv2/kernel", "params/fc1/kernel"} <= set(fit) and fit["params/conv2/kernel"].shape == (288, 288)
    rd = optimize(m.params, m.apply, [jnp.asarray(x[:64])], lam=3e-3, init="sensitivity", steps=0, progress=False)
    p_g, rd_g = with_error_feedback(m.params, rd, fit, check_moments=check, progress=False)
    convs = [n for n in fit if "conv" in n and rd_g.dq_overrides.get(n) is False]
    assert convs, "no conv kernel was worth substituting"
    dec_new, dec_ref, orig = (flatten_named(t) for t in (verify(p_g, rd_g).params, verify(m.params, rd).params,
                                                         m.params))
    for n in convs:
        assert rd_g.qp_overrides[n] > rd.qp_overrides[n] and rd_g.tensor_bits[n] < rd.tensor_bits[n]
        np.testing.assert_array_equal(np.asarray(dec_new[n]), np.asarray(flatten_named(p_g)[n]))
        rows = lambda a: np.asarray(nncjax.reduce.flax_to_nnr(a)).reshape(a.shape[-1], -1)
        assert layer_output_error(rows(orig[n]), rows(dec_new[n]), check[n]) <= layer_output_error(
            rows(orig[n]), rows(dec_ref[n]), check[n]) * (1 + 1e-5)


class _Attention(nn.Module):
    """Flax's own multi-head attention: DenseGeneral q / k / v kernels ``(32, 4, 8)``, out ``(4, 8, 32)``."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(h, h)
        return nn.Dense(3, name="head")(x.mean(1))


def _tokens(key, n):
    """``(n, 6, 32)`` activations with a common direction (correlated features, as in transformers)."""
    a, b = jax.random.split(key)
    direction = jax.random.normal(jax.random.PRNGKey(9), (1, 1, 32))
    return 2 * jax.random.normal(a, (n, 6, 1)) * direction + jax.random.normal(b, (n, 6, 32))


@pytest.mark.parametrize("dq", [False, True])
def test_with_error_feedback_codes_attention_projections(dq):
    """GPTQ on flax's attention: each q / k / v output ``(head, d)`` is a row over the ``D`` inputs,
    the output projection a Dense over ``heads * d`` inputs (NNR order). Every projection moves to a
    coarser QP at no more held-out layer-output error and fewer bits, uniform GPTQ even where the
    codec's DQ trellis is the reference (the trellis runs along the codec's rows, not these), and
    the stream decodes to exactly the GPTQ weights."""
    from nncjax.error_feedback import _LinearView
    from nncjax.rd_settings import to_rows_first

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    m = _Attention()
    v = m.init(keys[3], _tokens(keys[0], 2))
    fit, check = (input_moments(m.apply, v, _tokens(k, 256), progress=False) for k in keys[1:3])
    projections = [f"params/attn/{p}/kernel" for p in ("query", "key", "value", "out")]
    assert set(projections) <= set(fit) and all(fit[n].shape == (32, 32) for n in projections)
    rd = optimize(v, m.apply, [_tokens(keys[0], 64)], lam=3e-3, dq=dq, init="sensitivity", steps=0,
                  progress=False)
    p_g, rd_g = with_error_feedback(v, rd, fit, check_moments=check, dq="auto" if dq else False, progress=False)
    dec_new, dec_ref, orig = (flatten_named(t) for t in (verify(p_g, rd_g).params, verify(v, rd).params, v))
    for n in projections:
        assert rd_g.dq_overrides[n] is False
        assert rd_g.qp_overrides[n] > rd.qp_overrides[n] and rd_g.tensor_bits[n] < rd.tensor_bits[n]
        np.testing.assert_array_equal(np.asarray(dec_new[n]), np.asarray(flatten_named(p_g)[n]))
        k = np.asarray(orig[n])
        view = _LinearView(to_rows_first(k, k.ndim - 1), k.shape, k.ndim - 1, fit[n])
        assert view.input_axes == (1 if n.split("/")[2] != "out" else None)
        def mat(a, view=view, k=k):
            return view.matrix(to_rows_first(np.asarray(a, np.float32), k.ndim - 1))

        assert layer_output_error(mat(k), mat(dec_new[n]), check[n]) <= layer_output_error(
            mat(k), mat(dec_ref[n]), check[n]) * (1 + 1e-5)
    assert verify(p_g, rd_g).nbytes < verify(v, rd).nbytes


def test_with_error_feedback_moves_the_rd_point_down(digits):
    """On the digits MLP: the substituted tensors keep their (held-out) layer-output error within the
    DQ reference's at a coarser QP, decode to exactly what with_error_feedback put in the params, and
    the point lies well below the sensitivity allocation's own RD curve (held-out distortion vs bytes)."""
    from nncjax.models.digits_mlp import load_digits_split

    m, calib, test_mse = digits
    train = jnp.asarray(load_digits_split("train")[0])
    half = len(train) // 2
    fit, check = (input_moments(m.apply, m.params, x) for x in (train[:half], train[half:]))
    curve = []
    for lam in (1e-3, 3e-3, 1e-2):
        rd = optimize(m.params, m.apply, calib, lam=lam, init="sensitivity", steps=0, progress=False)
        v = verify(m.params, rd)
        curve.append((v.nbytes, np.log(test_mse(v.params))))
        if lam == 1e-3:
            rd_ref, ref = rd, v
    p_g, rd_g = with_error_feedback(m.params, rd_ref, fit, check_moments=check, progress=False)
    changed = [n for n in fit if rd_g.dq_overrides.get(n) is False]
    assert changed, "no tensor was worth substituting"
    assert all(rd_g.tensor_bits[n] < rd_ref.tensor_bits[n] for n in changed)
    # settings without optimize()'s per-tensor bits: the references are coded again, same decisions
    _, rd_again = with_error_feedback(m.params, dataclasses.replace(rd_ref, tensor_bits={}), fit,
                                      check_moments=check, progress=False)
    assert rd_again.qp_overrides == rd_g.qp_overrides and rd_again.estimated_bits == rd_g.estimated_bits
    new = verify(p_g, rd_g)
    saved = ref.nbytes - new.nbytes  # the estimate tracks it (unit headers differ slightly)
    assert abs((rd_ref.estimated_bits - rd_g.estimated_bits) / 8 - saved) < 0.05 * saved
    dec_new, dec_ref, orig, subst = (flatten_named(t) for t in (new.params, ref.params, m.params, p_g))
    for n in changed:
        assert rd_g.qp_overrides[n] > rd_ref.qp_overrides[n]  # a coarser step, the error fed back
        np.testing.assert_array_equal(np.asarray(dec_new[n]), np.asarray(subst[n]))
        w, h = np.asarray(orig[n]).T, check[n]  # Flax kernels: (inputs, outputs) -> rows first
        assert layer_output_error(w, np.asarray(dec_new[n]).T, h) <= layer_output_error(
            w, np.asarray(dec_ref[n]).T, h) * (1 + 1e-5)
    sizes, log_d = zip(*sorted(curve))
    assert sizes[0] <= new.nbytes <= sizes[-1]
    assert test_mse(new.params) < 0.7 * np.exp(np.interp(new.nbytes, sizes, log_d))


def test_with_error_feedback_on_the_dq_trellis(digits):
    """dq=True: the kernels go to GPTQ on the DQ trellis (dq_flag kept), at a coarser QP within the
    held-out error budget, in fewer bits, and decode to exactly the substituted weights; "auto" keeps,
    per tensor, whichever of the two GPTQ variants (or the reference) the coder codes in fewer bits."""
    from nncjax.models.digits_mlp import load_digits_split

    m, calib, _ = digits
    train = jnp.asarray(load_digits_split("train")[0])
    fit, check = (input_moments(m.apply, m.params, x) for x in (train[:600], train[600:]))
    rd = optimize(m.params, m.apply, calib, lam=1e-3, init="sensitivity", steps=0, progress=False)
    runs = {dq: with_error_feedback(m.params, rd, fit, check_moments=check, dq=dq, progress=False)
            for dq in (False, True, "auto")}
    p_t, rd_t = runs[True]
    # the codec scans a scaled kernel rows first (the trellis can follow it), an unscaled Flax kernel
    # in its own (inputs, outputs) layout: that one gets uniform GPTQ
    trellis = [n for n in fit if n in rd.local_scales]
    assert trellis and all(rd_t.dq_overrides[n] is True for n in trellis)
    assert all(rd_t.dq_overrides.get(n, True) is False for n in fit if n not in trellis)
    dec, orig = flatten_named(verify(p_t, rd_t).params), flatten_named(m.params)
    dec_ref = flatten_named(verify(m.params, rd).params)
    for n in trellis:
        assert rd_t.qp_overrides[n] > rd.qp_overrides[n] and rd_t.tensor_bits[n] < rd.tensor_bits[n]
        np.testing.assert_array_equal(np.asarray(dec[n]), np.asarray(flatten_named(p_t)[n]))
        w, h = np.asarray(orig[n]).T, check[n]
        assert layer_output_error(w, np.asarray(dec[n]).T, h) <= layer_output_error(
            w, np.asarray(dec_ref[n]).T, h) * (1 + 1e-5)
    _, rd_a = runs["auto"]
    for n in fit:
        assert rd_a.tensor_bits[n] == min(runs[False][1].tensor_bits[n], rd_t.tensor_bits[n])
    with pytest.raises(InputError, match="dq"):
        with_error_feedback(m.params, rd, fit, dq="yes")


def test_with_error_feedback_input_errors(digits):
    m, calib, _ = digits
    rd = optimize(m.params, m.apply, calib, lam=3e-3, init="sensitivity", steps=0, progress=False)
    with pytest.raises(InputError, match="RDSettings"):
        with_error_feedback(m.params, {}, {})
    with pytest.raises(InputError, match="does not optimise"):
        with_error_feedback(m.params, rd, {"params/nope/kernel": np.eye(2)})
    with pytest.raises(InputError, match="shape"):
        with_error_feedback(m.params, rd, {"params/fc1/kernel": np.eye(3)}, progress=False)
    with pytest.raises(InputError, match="max_offset"):
        with_error_feedback(m.params, rd, {}, max_offset=-1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_grid_values_that_the_dtype_cannot_hold_stay_float32(dtype):
    """At fine steps GPTQ's grid values (times the row scales) need more mantissa than bfloat16 / float16:
    rounded to the leaf's dtype they left the grid, and the codec coded other levels than GPTQ chose."""
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
    m = HalfMLP(dtype)
    v = m.init(jax.random.PRNGKey(1), x)
    rd = optimize(v, m.apply, x, lam=1e-7, init="sensitivity", steps=0, progress=False)
    p_g, rd_g = with_error_feedback(v, rd, input_moments(m.apply, v, x), progress=False)
    own, dec = flatten_named(p_g), flatten_named(verify(p_g, rd_g).params)
    assert rd_g.dq_overrides
    for n in rd_g.dq_overrides:
        assert own[n].dtype == jnp.float32  # not representable in half precision at these steps
        np.testing.assert_array_equal(np.asarray(dec[n]), np.asarray(own[n]))  # exactly what is coded


def test_with_error_feedback_refuses_bad_moments_and_foreign_settings():
    """Moments are refused with an InputError naming the tensor rather than converted (a string, a
    complex matrix), ignored (check_moments under a name that matches no optimised tensor, or holding
    NaN: the check fell back to the fitted moments, or substituted nothing), or read as inputs that
    never fire (a negative diagonal); settings of another model are an InputError, not a broadcast error."""
    model = _TwoDense()
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
    v = model.init(jax.random.PRNGKey(1), x)
    rd = optimize(v, model.apply, x, lam=3e-3, init="sensitivity", steps=0, progress=False)
    h = input_moments(model.apply, v, x)
    name = "params/hidden/kernel"
    assert name in rd.local_scales  # scaled: a foreign model's scales do not fit its rows

    def ef(moments, **kw):
        return with_error_feedback(v, rd, moments, progress=False, **kw)

    for moments, match in [([h[name]], "must map tensor names"),
                           ({name: "abc"}, r"moments\['params/hidden/kernel'\] must be a real-valued"),
                           ({name: h[name] * (1 + 1j)}, "real-valued"),
                           ({name: np.diag([1.0, -1.0, 1.0, 1.0])}, "negative diagonal")]:
        with pytest.raises(InputError, match=match):
            ef(moments)
    for check, match in [([1], "must map tensor names"),
                         ({"hidden/kernel": h[name]}, "check_moments name tensors"),
                         ({name: np.full((4, 4), np.nan)}, r"check_moments\['params/hidden/kernel'\] holds NaN"),
                         ({name: -h[name]}, "negative diagonal")]:
        with pytest.raises(InputError, match=match):
            ef({name: h[name]}, check_moments=check)
    ef({name: h[name]}, check_moments=h)  # moments of other optimised tensors may come along

    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))

    v6 = Wider().init(jax.random.PRNGKey(1), x)
    with pytest.raises(InputError, match="settings of another model"):
        with_error_feedback(v6, rd, input_moments(Wider().apply, v6, x), progress=False)
