"""Tiny, structurally diverse Flax linen models for the architecture sweep (tests/test_architectures.py).

Each entry of :data:`MODELS` builds ``(model, variables, x)``: a model, its variables (float32
unless the model says otherwise) and a small calibration batch. All have well under 100k
parameters and run in milliseconds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ResNetBlock(nn.Module):
    """Conv + BatchNorm (running averages) + residual add + global average pool + Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
        y = nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3), use_bias=False)(x))
        x = nn.relu(x + y)
        return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class Depthwise(nn.Module):
    """Depthwise conv (``feature_group_count``), bias-free conv + BatchNorm, ConvTranspose."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
        x = nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(8, (1, 1), use_bias=False,
                                                                              name="pw")(x)))
        x = nn.ConvTranspose(4, (2, 2), strides=(2, 2), name="up")(x)
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class TinyTransformer(nn.Module):
    """Embed + MultiHeadDotProductAttention (DenseGeneral 3-D kernels) + LayerNorm + MLP on int tokens."""

    vocab: int = 32
    width: int = 16

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (tokens.shape[-1], self.width))
        x = x + pos
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(self.width, name="mlp_out")(nn.gelu(nn.Dense(32, name="mlp_in")(h)))
        return nn.Dense(5, name="cls")(jnp.mean(x, axis=1))


class Recurrent(nn.Module):
    """``nn.RNN`` over an LSTM or GRU cell, then a Dense head on the last step."""

    cell: str = "lstm"

    @nn.compact
    def __call__(self, x):
        cell = nn.OptimizedLSTMCell(12) if self.cell == "lstm" else nn.GRUCell(12)
        y = nn.RNN(cell, name="rnn")(x)
        return nn.Dense(3, name="head")(y[:, -1])


class GeneralScalarHalf(nn.Module):
    """DenseGeneral with a 3-D kernel, Einsum with a 3-D kernel, a 0-d temperature, a bfloat16 Dense."""

    @nn.compact
    def __call__(self, x):  # x: (batch, 6, 4)
        h = nn.DenseGeneral((2, 5), axis=-1, name="dg")(x)                       # kernel (4, 2, 5)
        h = nn.Einsum((2, 5, 3), "btnh,nhf->btf", name="ein")(h)                 # kernel (2, 5, 3)
        h = nn.Dense(8, param_dtype=jnp.bfloat16, dtype=jnp.float32, name="half")(nn.tanh(h))
        t = self.param("temperature", lambda k: jnp.float32(1.5))
        return nn.Dense(4, name="head")(jnp.mean(h, axis=1)) / t


class SharedIntSeq(nn.Module):
    """One Dense applied twice (shared parameters), GroupNorm, nn.Sequential; an int leaf in params."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(10, name="shared")
        step = self.param("step", lambda k: jnp.int32(3))
        x = nn.relu(shared(nn.Dense(10, name="inp")(x)))
        x = nn.GroupNorm(num_groups=2, name="gn")(shared(x))
        x = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(3)], name="seq")(x)
        return x + 0 * step


class DenseGeneral4D(nn.Module):
    """DenseGeneral over two input axes (4-D kernel (3, 4, 2, 6)) and nn.Sequential of Dense."""

    @nn.compact
    def __call__(self, x):  # x: (batch, 5, 3, 4)
        h = nn.DenseGeneral((2, 6), axis=(-2, -1), name="dg4")(x)
        h = nn.relu(h.reshape(h.shape[0], -1))
        return nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)], name="seq")(h)


def _build(model: nn.Module, x):
    return model, model.init(jax.random.PRNGKey(1), x), x


def _images(shape):
    return jax.random.normal(jax.random.PRNGKey(0), shape)


def _with_stats(model, variables, x):
    """Running statistics and biases away from their init (0 and 1), as a trained model has them:
    folding a batch norm then moves values that matter."""
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 64))

    def perturb(path, leaf):
        if path[-1].key == "var":
            return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=2.0)
        if path[-1].key in ("mean", "bias"):
            return 0.3 * jax.random.normal(next(keys), leaf.shape)
        return leaf

    return model, jax.tree_util.tree_map_with_path(perturb, variables), x


class SkipFromConv(nn.Module):
    """``Conv_0``'s output feeds ``BatchNorm_0`` and, unnormalised, a skip connection too."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(8, (3, 3))(x)
        y = nn.relu(nn.BatchNorm(use_running_average=True)(h)) + h
        return nn.Dense(3)(jnp.mean(y, axis=(1, 2)))


class SharedBatchNorm(nn.Module):
    """One BatchNorm applied to the input, then (last) to ``Conv_0``'s output."""

    @nn.compact
    def __call__(self, x):
        bn = nn.BatchNorm(use_running_average=True)
        a = bn(x)
        h = bn(nn.Conv(3, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(nn.relu(h) + a, axis=(1, 2)))


class UnpairedConv(nn.Module):
    """Two Conv + BatchNorm blocks of equal width, then a convolution without a batch norm."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.BatchNorm(use_running_average=True, use_scale=False)(nn.Conv(8, (3, 3))(x)))
        x = nn.Conv(4, (3, 3))(x)
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


#: The architecture sweep.
MODELS = {
    "resnet": lambda: _with_stats(*_build(ResNetBlock(), _images((16, 8, 8, 3)))),
    "depthwise": lambda: _with_stats(*_build(Depthwise(), _images((16, 8, 8, 3)))),
    "transformer": lambda: _build(TinyTransformer(), jax.random.randint(jax.random.PRNGKey(0), (16, 7), 0, 32)),
    "lstm": lambda: _build(Recurrent("lstm"), _images((16, 5, 4))),
    "gru": lambda: _build(Recurrent("gru"), _images((16, 5, 4))),
    "general": lambda: _build(GeneralScalarHalf(), _images((16, 6, 4))),
    "shared": lambda: _build(SharedIntSeq(), _images((16, 6))),
    "general4d": lambda: _build(DenseGeneral4D(), _images((16, 5, 3, 4))),
}

#: Models on which ``optimize_ioq(bn_pairs="auto")`` must fold no pair: by name alone it would fold
#: ``Conv_0`` into ``BatchNorm_0``, and that would change the model.
UNFOLDABLE = {
    "skip_from_conv": lambda: _with_stats(*_build(SkipFromConv(), _images((16, 6, 6, 3)))),
    "shared_batch_norm": lambda: _with_stats(*_build(SharedBatchNorm(), _images((16, 6, 6, 3)))),
}
