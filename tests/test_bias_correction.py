"""nncjax.bias_correction: quantized layers' mean output shifts moved into biases / batch-norm means."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nncjax import InputError, UnsupportedError, decode, encode
from nncjax.bias_correction import decoded_params, output_shifts, with_bias_correction
from nncjax.error_feedback import with_error_feedback
from nncjax.optimize import optimize
from nncjax.pytree_names import flatten_named
from nncjax.quantize.gptq import input_moments
from nncjax.rd_settings import verify
from tests._lifted_models import Lifted


class _ConvBnDense(nn.Module):
    """A bias-free conv feeding a batch norm, then a dense layer with a bias: both places a shift goes."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), use_bias=False, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
        return nn.Dense(4, name="fc")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def setup():
    model = _ConvBnDense()
    x = jax.random.uniform(jax.random.PRNGKey(0), (64, 6, 6, 2))  # positive inputs: a mean to shift
    v = model.init(jax.random.PRNGKey(1), x[:1])
    # running statistics of a trained net, not the init's zeros and ones
    v = {"params": v["params"], "batch_stats": {"bn": {"mean": jnp.full(6, 0.3), "var": jnp.full(6, 0.5)}}}
    batches = [x[:32], x[32:]]
    rd = optimize(v, model.apply, batches, lam=3e-2, base_qp=-20, init="sensitivity", steps=0, progress=False)
    return model, v, batches, rd


def _layer_outputs(model, v, x):
    """The dense output and the batch norm's output on ``x``."""
    _, state = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    return inter["fc"]["__call__"][0], inter["bn"]["__call__"][0]


def test_mean_outputs_match_the_float_model_after_correction(setup):
    model, v, batches, rd = setup
    v_bc, rd_bc = with_bias_correction(v, rd, model.apply, batches, bn_pairs=[(("conv",), ("bn",))])
    x = jnp.concatenate(batches)
    want = [np.asarray(a).reshape(-1, a.shape[-1]).mean(0) for a in _layer_outputs(model, v, x)]
    before = [np.asarray(a).reshape(-1, a.shape[-1]).mean(0) for a in _layer_outputs(model, decoded_params(v, rd), x)]
    # the batch norm's output mean is corrected exactly (its input shift is measured on these inputs)
    bn_after = np.asarray(_layer_outputs(model, decoded_params(v_bc, rd_bc), x)[1]).reshape(-1, 6).mean(0)
    assert np.max(np.abs(before[1] - want[1])) > 1e-3  # there was a shift to remove
    np.testing.assert_allclose(bn_after, want[1], atol=1e-5)
    # the dense layer's shift is measured on the float model's activations, so only its own share
    shift = output_shifts(model.apply, v, decoded_params(v_bc, rd_bc), batches)
    assert set(shift) == {"params/conv/kernel", "params/fc/kernel"}
    assert np.max(np.abs(shift["params/fc/kernel"])) < 1e-5
    # only biases and running means change; the encoded stream decodes to the corrected model
    changed = {n for n, a in flatten_named(v_bc).items() if not np.array_equal(a, flatten_named(v)[n])}
    assert changed == {"params/fc/bias", "batch_stats/bn/mean"}
    # the estimate follows the corrected tensors' bits (the headers around them stay)
    grown = 8 * (verify(v_bc, rd_bc).nbytes - verify(v, rd).nbytes)
    assert abs(grown - (rd_bc.estimated_bits - rd.estimated_bits)) <= 16
    dec = flatten_named(decode(encode(rd_bc.params_for_encoding(v_bc), **rd_bc.encode_kwargs()), like=v))
    for n, a in flatten_named(decoded_params(v_bc, rd_bc)).items():
        if n.endswith("kernel"):
            np.testing.assert_array_equal(np.asarray(dec[n]), np.asarray(a))
        else:
            np.testing.assert_allclose(np.asarray(dec[n]), np.asarray(a), atol=1e-4)


def test_layers_without_a_place_for_the_shift_are_left_alone(setup):
    model, v, batches, rd = setup
    v_bc, _ = with_bias_correction(v, rd, jax.jit(model.apply), batches)  # no bn_pairs: the conv keeps its error
    changed = {n for n, a in flatten_named(v_bc).items() if not np.array_equal(a, flatten_named(v)[n])}
    assert changed == {"params/fc/bias"}


def _lifted(kind):
    return Lifted(kind, width=8, outputs=4, relu=True)


def _changed(v, v_bc):
    return {n for n, a in flatten_named(v_bc).items() if not np.array_equal(a, flatten_named(v)[n])}


def test_remat_layers_are_corrected_as_without_remat():
    """A layer under nn.remat runs in the checkpoint's own trace: its shift reaches the host from
    there, and the correction equals the plain model's (jitted apply_fn, two batches)."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (64, 6))
    batches = [x[:32], x[32:]]
    v = _lifted("plain").init(jax.random.PRNGKey(1), x[:1])
    rd = optimize(v, _lifted("plain").apply, batches, lam=3e-2, base_qp=-20, init="sensitivity", steps=0,
                  progress=False)
    want, rd_want = with_bias_correction(v, rd, _lifted("plain").apply, batches)
    got, rd_got = with_bias_correction(v, rd, jax.jit(_lifted("remat").apply), batches)
    assert _changed(v, got) == _changed(v, want) == {"params/inp/bias", "params/blk/dense/bias", "params/out/bias"}
    for n, a in flatten_named(want).items():
        np.testing.assert_allclose(np.asarray(flatten_named(got)[n]), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert rd_got.estimated_bits == pytest.approx(rd_want.estimated_bits, abs=8)


@pytest.mark.parametrize("kind", ["scan", "vmap"])
def test_kernels_stacked_by_scan_and_vmap_are_left_alone(kind):
    """A stacked kernel cannot be re-applied as one layer: its bias keeps its value, the layers around
    it are corrected; with nothing else to correct, UnsupportedError names the layer."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (32, 6))
    model = _lifted(kind)
    v = model.init(jax.random.PRNGKey(1), x)
    rd = optimize(v, model.apply, x, lam=3e-2, base_qp=-20, init="sensitivity", steps=0, progress=False)
    v_bc, _ = with_bias_correction(v, rd, jax.jit(model.apply), [x, x])
    assert _changed(v, v_bc) == {"params/inp/bias", "params/out/bias"}
    # the first layer's inputs are the data: its shift is (W - W_hat) applied to their mean
    w, w_hat = (np.asarray(t["params"]["inp"]["kernel"], np.float64) for t in (v, decoded_params(v, rd)))
    np.testing.assert_allclose(np.asarray(v_bc["params"]["inp"]["bias"]) - np.asarray(v["params"]["inp"]["bias"]),
                               np.asarray(x, np.float64).mean(0) @ (w - w_hat), rtol=1e-4, atol=1e-6)
    only_blk = jax.tree_util.tree_map_with_path(lambda p, a: a + 0.1 if "blk" in jax.tree_util.keystr(p) else a, v)
    with pytest.raises(UnsupportedError, match="'params/blk/dense/kernel'"):
        output_shifts(model.apply, v, only_blk, x)


@pytest.mark.parametrize(("model", "shape", "move"), [
    (nn.DenseGeneral((2, 3), axis=-1), (4, 5, 6), None),                  # attention's q / k / v: bias (2, 3)
    (nn.DenseGeneral(6, axis=(-2, -1)), (4, 5, 2, 3), None),              # its output projection
    (nn.Einsum((2, 3, 4), "btnh,nhf->btf"), (4, 5, 2, 3), None),
    (nn.Einsum((2, 3, 4), "btnh,nhf->bft"), (4, 5, 2, 3), 1),             # the bias axis is not last
    (nn.Einsum((2, 3, 4), "...nh,nhf->...f"), (4, 5, 2, 3), None),
    (nn.ConvTranspose(4, (2, 2), strides=(2, 2)), (4, 3, 3, 2), None),
])
def test_output_shifts_of_general_linear_layers_fit_their_biases(model, shape, move):
    """DenseGeneral, Einsum and ConvTranspose: the shift is the mean output difference over every
    position, per bias entry, wherever the einsum puts the bias's axes."""
    x = jax.random.uniform(jax.random.PRNGKey(0), shape)
    v = model.init(jax.random.PRNGKey(1), x)
    v_hat = {"params": dict(v["params"], kernel=v["params"]["kernel"] + 0.05)}
    (shift,) = output_shifts(model.apply, v, v_hat, [x[:2], x[2:]]).values()
    d = np.asarray(model.apply(v, x) - model.apply(v_hat, x), np.float64)
    d = d if move is None else np.moveaxis(d, move, -1)
    bias = v["params"]["bias"]
    assert shift.shape == bias.shape
    np.testing.assert_allclose(shift, d.reshape(-1, *bias.shape).mean(0), rtol=1e-5, atol=1e-6)


def test_dense_general_with_batch_dims_is_left_alone():
    model = nn.DenseGeneral((2, 3), batch_dims=(0,))  # its bias is per batch index as well
    x = jnp.ones((2, 5, 4))
    v = model.init(jax.random.PRNGKey(1), x)
    assert output_shifts(model.apply, v, {"params": dict(v["params"], kernel=v["params"]["kernel"] + 1)}, x) == {}


def test_attention_projections_are_corrected():
    """Flax's multi-head attention: the q / k / v biases ``(heads, d)`` and the output bias take their
    layers' shifts, and the decoded model's mean output moves back towards the float model's."""

    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x)

    x = 1.0 + jax.random.uniform(jax.random.PRNGKey(0), (32, 5, 8))  # a mean for the errors to shift
    model = Attention()
    v = model.init(jax.random.PRNGKey(1), x[:1])
    rd = optimize(v, model.apply, x, lam=3e-2, base_qp=-20, init="sensitivity", steps=0, progress=False)
    v_bc, rd_bc = with_bias_correction(v, rd, model.apply, x)
    assert _changed(v, v_bc) == {f"params/attn/{p}/bias" for p in ("query", "key", "value", "out")}

    def out(p):
        return np.asarray(model.apply(p, x), np.float64).mean((0, 1))

    want = out(v)
    assert np.abs(out(verify(v_bc, rd_bc).params) - want).max() < np.abs(out(verify(v, rd).params) - want).max()


def test_reference_corrects_kernels_that_params_holds_quantized(setup):
    """After with_error_feedback the params hold the GPTQ kernels themselves: measured against them,
    their shift is zero and nothing is corrected; against ``reference`` (the float model) the decoded
    dense layer's mean output matches the float model's again, as for params holding float kernels."""
    model, v, batches, rd = setup
    x = jnp.concatenate(batches)
    h = input_moments(model.apply, v, batches)
    p_g, rd_g = with_error_feedback(v, rd, {"params/fc/kernel": h["params/fc/kernel"]}, progress=False)
    assert rd_g.dq_overrides == {"params/fc/kernel": False}  # substituted: p_g holds its decoded values
    same, _ = with_bias_correction(p_g, rd_g, model.apply, batches)
    assert "params/fc/bias" not in _changed(p_g, same)
    p_bc, rd_bc = with_bias_correction(p_g, rd_g, model.apply, batches, reference=v)
    assert _changed(p_g, p_bc) == {"params/fc/bias"}
    # the fc layer alone, on the float model's inputs: its mean output is the float layer's again
    fc = v["params"]["fc"]
    feat = np.asarray(nn.relu(_layer_outputs(model, v, x)[1])).reshape(len(x), -1)
    want = feat @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])
    dec = verify(p_bc, rd_bc).params["params"]["fc"]
    got = feat @ np.asarray(dec["kernel"]) + np.asarray(dec["bias"])
    before = feat @ np.asarray(p_g["params"]["fc"]["kernel"]) + np.asarray(p_g["params"]["fc"]["bias"])
    assert np.max(np.abs(before.mean(0) - want.mean(0))) > 1e-3  # there was a shift to remove
    np.testing.assert_allclose(got.mean(0), want.mean(0), atol=1e-4)


def test_bn_pairs_take_str_module_paths(setup):
    # before: tuple("conv") split the path into letters ("no batch-norm mean at 'b/n'")
    model, v, batches, rd = setup
    by_tuple = with_bias_correction(v, rd, model.apply, batches, bn_pairs=[(("conv",), ("bn",))])
    by_str = with_bias_correction(v, rd, model.apply, batches, bn_pairs=[("conv", "bn")])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, by_str[0], by_tuple[0]))


def test_bad_inputs(setup):
    model, v, batches, rd = setup
    with pytest.raises(InputError, match="RDSettings"):
        with_bias_correction(v, {}, model.apply, batches)
    with pytest.raises(InputError, match="batch-norm mean"):
        with_bias_correction(v, rd, model.apply, batches, bn_pairs=[(("conv",), ("nope",))])
    with pytest.raises(InputError, match="empty"):
        output_shifts(model.apply, v, v, [])
    # optimize_ioq's "auto" is no list of pairs; a raw ValueError before
    with pytest.raises(InputError, match=r"bn_pairs must be \[\(layer_path, bn_path\)"):
        with_bias_correction(v, rd, model.apply, batches, bn_pairs="auto")
    # NaN data: a NaN shift was written into the bias, then refused as "weights contain NaN"
    with pytest.raises(InputError, match="'params/conv/kernel': its output shift on data is not finite"):
        with_bias_correction(v, rd, model.apply, batches[0].at[0, 0, 0, 0].set(jnp.nan))
    with pytest.raises(InputError, match="apply_fn must be callable"):
        with_bias_correction(v, rd, None, batches)
    # settings of a model whose fc layer has other outputs: a broadcast ValueError before
    wider = nn.Dense(5, name="fc")
    other = {"params": {**v["params"], "fc": wider.init(jax.random.PRNGKey(1), jnp.ones((1, 216)))["params"]},
             "batch_stats": v["batch_stats"]}
    rd_other = optimize(other, lambda p, b: wider.apply({"params": p["params"]["fc"]}, b), jnp.ones((8, 216)),
                        lam=3e-2, init="sensitivity", steps=0, progress=False, select=["params/fc/kernel"])
    assert rd_other.local_scales["params/fc/kernel"].shape == (5,)
    with pytest.raises(InputError, match="'params/fc/kernel' of shape \\(216, 4\\) has 4 rows: settings of another"):
        with_bias_correction(v, rd_other, model.apply, batches)
