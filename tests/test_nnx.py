"""flax.nnx states through the codec and the generic RD optimiser.

An NNX variable keeps its array in its ``value`` attribute; names leave that out
(:func:`nncjax.pytree_names.key_path_name`), so an NNX kernel is laid out and named as a Linen one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nncjax
from nncjax import InputError
from nncjax.pytree_names import flatten_named


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


@pytest.fixture(scope="module")
def net():
    model = _Net(nnx.Rngs(0))
    model.eval()
    graph, state = nnx.split(model)
    # running statistics away from their init, as a trained model has them
    state["bn"]["mean"].value = 0.1 * jnp.arange(8.0)
    state["bn"]["var"].value = 1.0 + 0.1 * jnp.arange(8.0)

    def apply(s, x):
        return nnx.merge(graph, s)(x)

    return state, apply, jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 3))


def test_nnx_names_and_bytes_are_those_of_the_plain_arrays(net):
    state, _, _ = net
    names = list(flatten_named(state))
    assert set(names) == {"conv/kernel", "bn/scale", "bn/bias", "bn/mean", "bn/var", "head/kernel", "head/bias"}
    plain = flatten_named(nnx.to_pure_dict(state))
    assert list(plain) == names
    # kernels named ".../kernel" are coded transposed (NNR layout) either way: the bytes agree
    assert nncjax.encode(state, qp=-36) == nncjax.encode(plain, qp=-36)


def test_decode_like_an_nnx_state_gives_the_state_back(net):
    state, apply, x = net
    back = nncjax.decode(nncjax.encode(state, qp=-44), like=state)
    assert isinstance(back, nnx.State)
    assert jax.tree.structure(back) == jax.tree.structure(state)  # Param / BatchStat nodes, nested dicts
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-3)
    np.testing.assert_allclose(apply(back, x), apply(state, x), atol=5e-3)


def test_optimize_and_verify_take_an_nnx_state(net):
    state, apply, x = net
    rd = nncjax.optimize(state, apply, x, lam=1e-3, steps=3, progress=False)
    assert {"conv/kernel", "head/kernel"} <= set(rd.qp_overrides)
    assert rd.local_scales["conv/kernel"].shape == (8,)  # one scale per output channel: a Flax kernel
    data = nncjax.encode(rd.params_for_encoding(state), **rd.encode_kwargs())
    back = nncjax.decode(data, like=state)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert nncjax.verify(state, rd).nbytes == len(data)
    np.testing.assert_allclose(apply(back, x), apply(nncjax.verify(state, rd).params, x), atol=1e-5)


def test_linen_only_tools_name_the_alternative(net):
    state, apply, x = net
    with pytest.raises(InputError, match="flax.nnx state goes through nncjax.optimize"):
        nncjax.optimize_ioq(state, apply, x, lam=1e-3)
    with pytest.raises(InputError, match="Linen modules only"):
        nncjax.quantize.gptq.input_moments(apply, state, x, progress=False)
