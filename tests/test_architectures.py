"""The public RD pipeline on Flax architectures it was not developed on (tests/_arch_models.py).

ResNet-style Conv + BatchNorm with a residual add, depthwise / ConvTranspose / bias-free Conv +
BatchNorm, a Transformer encoder on int tokens (Embed, attention's 3-D DenseGeneral kernels,
LayerNorm), LSTM and GRU under ``nn.RNN``, DenseGeneral / Einsum kernels of rank 3 and 4, a 0-d
parameter, bfloat16 parameters, an int leaf, a layer called twice, GroupNorm and ``nn.Sequential``:
each goes through ``encode`` / ``decode(like=)``, ``optimize``, ``optimize_ioq`` and the refinements,
and the decoded model must run, keep the variables' structure and dtypes, and be close to the
original. Plus the batch-norm pairs ``optimize_ioq(bn_pairs="auto")`` must and must not fold.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nncjax
from nncjax.quantize.gptq import input_moments
from nncjax.reduce import BNPair, find_bn_pairs
from tests._arch_models import MODELS, UNFOLDABLE, UnpairedConv, _build, _images, _with_stats


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (MODELS | UNFOLDABLE)[name]()
        return cache[name]

    return get


def _rel(model, v_hat, v, x) -> float:
    y, ref = model.apply(v_hat, x), model.apply(v, x)
    return float(jnp.mean((jnp.asarray(y, jnp.float32) - ref) ** 2) / jnp.var(jnp.asarray(ref, jnp.float32)))


def _same_tree(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_encode_and_sensitivity_allocation_decode_like_the_model(built, name):
    model, v, x = built(name)
    back = nncjax.decode(nncjax.encode(v, qp=-44), like=v)
    _same_tree(back, v)  # batch_stats kept, the 0-d temperature 0-d again, bfloat16 stays bfloat16
    assert _rel(model, back, v, x) < 1e-4
    ints = [(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(back)) if jnp.issubdtype(a.dtype, jnp.integer)]
    assert all(np.array_equal(a, b) for a, b in ints)  # the int leaf of "shared" is lossless

    rd = nncjax.optimize(v, model.apply, x, lam=1e-3, init="sensitivity", steps=0, progress=False)
    weights = [n for n, a in nncjax.pytree_names.flatten_named(v).items()
               if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim > 1]
    assert set(weights) <= set(rd.qp_overrides)  # 3-D / 4-D kernels, bfloat16 ones, the embedding
    data = nncjax.encode(rd.params_for_encoding(v), **rd.encode_kwargs())
    back = nncjax.decode(data, like=v)
    _same_tree(back, v)
    d = _rel(model, back, v, x)
    assert np.isfinite(d) and d < 0.05
    assert nncjax.verify(v, rd).nbytes == len(data)


@pytest.mark.parametrize("name", ["depthwise", "general", "resnet", "shared"])
def test_optimize_ioq_decodes_to_what_it_measured(built, name):
    model, v, x = built(name)
    res = nncjax.optimize_ioq(v, model.apply, x, lam=1e-3, allocation="sensitivity", lsa_steps=2)
    back = nncjax.decode(nncjax.encode(res.tensors, **res.encode_kwargs()), like=v)
    _same_tree(back, v)
    assert _rel(model, back, v, x) == pytest.approx(res.history["d_lsa"], rel=1e-3, abs=1e-7)
    if name == "resnet":  # Conv_i feeds BatchNorm_i alone: both fold
        assert res.layout.pairs == (BNPair(("Conv_0",), ("BatchNorm_0",)), BNPair(("Conv_1",), ("BatchNorm_1",)))


# the general linear layers input_moments covers (the depthwise conv is left out)
_GENERAL_LINEAR = {"depthwise": {"up"}, "general": {"dg", "ein"}, "general4d": {"dg4"},
                   "transformer": {"attn/query", "attn/key", "attn/value", "attn/out"}, "gru": set()}


@pytest.mark.parametrize("name", sorted(_GENERAL_LINEAR))
def test_error_feedback_bias_correction_and_fine_tuning(built, name):
    model, v, x = built(name)
    rd = nncjax.optimize(v, model.apply, x, lam=1e-2, dq=False, init="sensitivity", steps=0, progress=False)
    d0 = _rel(model, nncjax.verify(v, rd).params, v, x)
    moments = input_moments(model.apply, v, x, progress=False)
    assert {f"params/{layer}/kernel" for layer in _GENERAL_LINEAR[name]} <= set(moments)
    assert "params/dw/kernel" not in moments
    p, r = nncjax.with_error_feedback(v, rd, moments, progress=False)
    p, r = nncjax.with_bias_correction(p, r, model.apply, x, reference=v)
    p, r = nncjax.with_fine_tuning(p, r, model.apply, x, reference=v, steps=5, progress=False)
    out = nncjax.verify(p, r)
    _same_tree(out.params, p)  # GPTQ's levels need float32 where bfloat16 cannot hold them (documented)
    d = _rel(model, out.params, v, x)
    assert np.isfinite(d) and d < 3 * d0


@pytest.mark.parametrize("name", sorted(UNFOLDABLE))
def test_auto_bn_pairs_leave_out_folds_that_change_the_model(built, name):
    model, v, x = built(name)
    assert find_bn_pairs(v["params"]) == [BNPair(("Conv_0",), ("BatchNorm_0",))]  # by name alone
    res = nncjax.optimize_ioq(v, model.apply, x, lam=1e-4, base_qp=-44, lsa_steps=0)
    assert res.layout.pairs == ()
    back = nncjax.decode(nncjax.encode(res.tensors, **res.encode_kwargs()), like=v)
    assert _rel(model, back, v, x) < 1e-4  # folded, the skip path lost Conv_0's bias: 3e-2


def test_auto_bn_pairs_leave_a_convolution_without_batch_norm_alone():
    model, v, x = _with_stats(*_build(UnpairedConv(), _images((16, 6, 6, 3))))
    with pytest.raises(nncjax.InputError, match="Conv indices"):
        find_bn_pairs(v["params"])
    assert find_bn_pairs(v["params"], strict=False) == [BNPair(("Conv_0",), ("BatchNorm_0",)),
                                                         BNPair(("Conv_1",), ("BatchNorm_1",))]
    res = nncjax.optimize_ioq(v, model.apply, x, lam=1e-4, base_qp=-44, lsa_steps=0)
    assert len(res.layout.pairs) == 2
    back = nncjax.decode(nncjax.encode(res.tensors, **res.encode_kwargs()), like=v)  # pairs found by name again
    assert _rel(model, back, v, x) < 1e-4


def test_auto_bn_pairs_fold_inside_a_nested_jit():
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))

    model = nn.Sequential([Inner(), lambda h: jnp.mean(h, axis=(1, 2)), nn.Dense(2)])
    model, v, x = _with_stats(*_build(model, _images((8, 5, 5, 2))))

    def apply(variables, batch):  # a jitted model inside apply_fn: its pair is still found and folds
        return jax.jit(model.apply)(variables, batch)

    res = nncjax.optimize_ioq(v, apply, x, lam=1e-4, base_qp=-44, lsa_steps=0)
    assert res.layout.pairs == (BNPair(("layers_0", "Conv_0"), ("layers_0", "BatchNorm_0")),)


def test_find_bn_pairs_strict_is_a_flag():
    with pytest.raises(nncjax.InputError, match="strict must be True or False"):
        find_bn_pairs({"Conv_0": {"kernel": 0}}, strict="no")
