"""flax.nnx states through the codec, update streams, the generic RD optimiser, GPTQ and bias
correction.

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
from nncjax.update import UpdateState


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
    state["bn"]["mean"].set_value(0.1 * jnp.arange(8.0))
    state["bn"]["var"].set_value(1.0 + 0.1 * jnp.arange(8.0))

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


def test_optimize_ioq_names_the_alternative(net):
    state, apply, x = net
    with pytest.raises(InputError, match="flax.nnx state goes through nncjax.optimize"):
        nncjax.optimize_ioq(state, apply, x, lam=1e-3)


def test_update_streams_take_nnx_states(net):
    state, _, _ = net
    data, sent = nncjax.encode_update(state, UpdateState(), differential=False, qp=-44)
    base, received = nncjax.decode_update(data, UpdateState(), like=state)
    assert jax.tree.structure(base) == jax.tree.structure(state)
    step = jax.tree.map(lambda a: 0.01 * a, state)
    data, _ = nncjax.encode_update(step, sent, qp=-44)
    got, _ = nncjax.decode_update(data, received, like=state)
    assert jax.tree.structure(got) == jax.tree.structure(state)
    np.testing.assert_allclose(got["conv"]["kernel"].get_value(), 0.01 * state["conv"]["kernel"].get_value(),
                               atol=2 * nncjax.qp_to_step(-44))


def _split(module, x):
    graph, state = nnx.split(module)

    def apply(s, b):
        return nnx.merge(graph, s)(b)

    return state, apply


@pytest.mark.parametrize(("make", "shape"), [
    (lambda r: nnx.Linear(8, 5, use_bias=False, rngs=r), (3, 4, 8)),
    (lambda r: nnx.LinearGeneral(8, (2, 4), axis=-1, use_bias=False, rngs=r), (3, 4, 8)),   # q / k / v
    (lambda r: nnx.LinearGeneral((2, 4), 6, axis=(-2, -1), use_bias=False, rngs=r), (3, 5, 2, 4)),
    (lambda r: nnx.Einsum("btnh,nhf->btf", (2, 4, 3), rngs=r), (3, 5, 2, 4)),
    (lambda r: nnx.Conv(4, 5, (3, 2), strides=(2, 1), use_bias=False, rngs=r), (3, 7, 6, 4)),
    (lambda r: nnx.ConvTranspose(4, 5, (2, 3), strides=(2, 2), use_bias=False, rngs=r), (3, 5, 6, 4)),
])
def test_nnx_input_moments_give_the_output_energy(make, shape):
    """NNX layers have no interceptor: ``input_moments`` swaps their classes' ``__call__`` for the run
    and finds each kernel by the array the state holds. The moments predict each layer's output
    moments ``E[y y^T] = W H W^T`` (kernel laid out as error feedback lays it out), and the classes
    are their own again afterwards."""
    from nncjax.error_feedback import _LinearView
    from nncjax.quantize.gptq import input_moments
    from nncjax.rd_settings import to_rows_first

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    module = make(nnx.Rngs(1))
    if getattr(module, "bias", None) is not None:  # Einsum: a bias of zeros leaves y = W x
        module.bias.set_value(jnp.zeros_like(module.bias.get_value()))
    state, apply = _split(module, x)
    own = type(module).__call__
    (h,) = input_moments(jax.jit(apply), state, [x[:1], x[1:]], progress=False).values()
    assert type(module).__call__ is own
    k = np.asarray(state["kernel"].get_value(), np.float64)
    view = _LinearView(to_rows_first(k, k.ndim - 1), k.shape, k.ndim - 1, h)
    w = view.matrix(to_rows_first(k, k.ndim - 1))
    y = np.asarray(apply(state, x), np.float64).reshape(-1, w.shape[0])
    np.testing.assert_allclose(w @ h @ w.T, y.T @ y / len(y), rtol=1e-4, atol=1e-6)


def test_a_failing_model_gives_the_classes_back():
    from nncjax.quantize.gptq import input_moments

    state, _ = _split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), None)
    own = nnx.Linear.__call__

    def broken(s, b):
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        input_moments(broken, state, jnp.ones((1, 2)), progress=False)
    assert nnx.Linear.__call__ is own


class _Attention(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=rngs)
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.head((x + self.attn(x)).mean(1))


def _tokens(key, n):
    a, b = jax.random.split(key)
    direction = jax.random.normal(jax.random.PRNGKey(9), (1, 1, 32))
    return 1.0 + 2 * jax.random.normal(a, (n, 6, 1)) * direction + jax.random.normal(b, (n, 6, 32))


def test_error_feedback_and_bias_correction_on_nnx_attention():
    """GPTQ and bias correction on an NNX model: fewer bytes for the projections, the stream decodes
    to exactly the GPTQ weights, and every q / k / v / out bias takes its layer's shift."""
    from nncjax.quantize.gptq import input_moments

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    state, apply = _split(_Attention(nnx.Rngs(3)), None)
    fit, check = (input_moments(apply, state, _tokens(k, 256), progress=False) for k in keys[1:3])
    projections = [f"attn/{p}/kernel" for p in ("query", "key", "value", "out")]
    assert set(projections) <= set(fit)
    x = _tokens(keys[0], 64)
    rd = nncjax.optimize(state, apply, x, lam=3e-3, dq=False, init="sensitivity", steps=0, progress=False)
    p_g, rd_g = nncjax.with_error_feedback(state, rd, fit, check_moments=check, progress=False)
    assert any(rd_g.qp_overrides[n] > rd.qp_overrides[n] for n in projections)
    assert nncjax.verify(p_g, rd_g).nbytes < nncjax.verify(state, rd).nbytes
    decoded = flatten_named(nncjax.verify(p_g, rd_g).params)
    for n in projections:
        np.testing.assert_array_equal(np.asarray(decoded[n]), np.asarray(flatten_named(p_g)[n]))
    p_b, rd_b = nncjax.with_bias_correction(p_g, rd_g, apply, x, reference=state)
    changed = {n for n, a in flatten_named(p_b).items() if not np.array_equal(a, flatten_named(p_g)[n])}
    assert {f"attn/{p}/bias" for p in ("query", "key", "value", "out")} <= changed
    assert isinstance(p_b, nnx.State) and jax.tree.structure(p_b) == jax.tree.structure(state)

    def out(s):
        return np.asarray(apply(s, x), np.float64).mean(0)

    want = out(state)
    assert np.abs(out(nncjax.verify(p_b, rd_b).params) - want).max() < np.abs(
        out(nncjax.verify(p_g, rd_g).params) - want).max()


def test_lookup_table_gptq_and_fine_tuning_on_nnx():
    """An ``nnx.Embed`` table: its output-side row moments, GPTQ with them and fine-tuning of the
    levels run on the NNX state, and the result is an NNX state that codes as estimated."""
    from nncjax.sensitivity import row_moments

    class Tokens(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(20, 8, rngs=rngs)
            self.fc = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, t):
            return self.fc(self.emb(t).mean(1))

    state, apply = _split(Tokens(nnx.Rngs(0)), None)
    t = jax.random.randint(jax.random.PRNGKey(0), (32, 5), 0, 20)
    rd = nncjax.optimize(state, apply, t, lam=1e-3, dq=False, init="sensitivity", steps=0, progress=False)
    assert {"emb/embedding", "fc/kernel"} <= set(rd.qp_overrides)
    moments = row_moments(state, apply, t, ["emb/embedding"], row_scales=rd.local_scales)
    assert moments["emb/embedding"].shape == (8, 8)
    p, r = nncjax.with_error_feedback(state, rd, moments, progress=False)
    p, r = nncjax.with_fine_tuning(p, r, apply, t, reference=state, steps=5, progress=False)
    assert isinstance(p, nnx.State) and jax.tree.structure(p) == jax.tree.structure(state)
    out = nncjax.verify(p, r)
    assert out.nbytes == len(nncjax.encode(r.params_for_encoding(p), **r.encode_kwargs()))
