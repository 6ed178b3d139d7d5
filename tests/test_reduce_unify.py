"""Weight unification (nncjax.reduce.unify)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax.errors import InputError
from nncjax.reduce import flax_to_nnr, unify_params, unify_tiles

_unify_jit = jax.jit(unify_tiles, static_argnums=1)


# Few distinct shapes: every new shape costs an XLA compilation.
@settings(max_examples=15, deadline=None)
@given(rows=st.sampled_from([1, 4]), cols=st.sampled_from([3, 13]), tile=st.sampled_from([1, 3, 5]),
       threshold=st.sampled_from([0.0, 0.1, 0.3, 10.0]), seed=st.integers(0, 2**16))
def test_unify_tiles_properties(rows, cols, tile, threshold, seed):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(rows, cols)) * rng.uniform(0.5, 1.5, size=(rows, 1))).astype(np.float32)
    wu, ok = _unify_jit(jnp.asarray(w), tile, threshold)
    wu, ok = np.asarray(wu), np.asarray(ok)
    n = cols // tile
    assert ok.shape == (rows, n) and wu.shape == w.shape
    np.testing.assert_array_equal(wu[:, n * tile:], w[:, n * tile:])  # remainder untouched
    for r in range(rows):
        for j in range(n):
            a, b = w[r, j * tile:(j + 1) * tile], wu[r, j * tile:(j + 1) * tile]
            expect = np.abs(a).std() <= threshold * np.abs(a).mean() + 1e-6 * np.abs(a).mean()
            if ok[r, j]:
                np.testing.assert_allclose(np.abs(b), np.abs(a).mean(), rtol=1e-5)
                assert np.all(np.sign(b) == np.sign(a))
            else:
                np.testing.assert_array_equal(b, a)
                assert not expect or np.isclose(np.abs(a).std(), threshold * np.abs(a).mean(), rtol=1e-4)
    if threshold >= 10.0:
        assert ok.all()  # std(|w|) <= mean(|w|)·sqrt(tile - 1) < 10·mean for tiles up to 5


def test_unify_params_flax_conv_under_jit():
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    params = {"Conv_0": {"kernel": k, "bias": jnp.ones(4)}}
    out, masks = jax.jit(functools.partial(unify_params, tile=9))(params, threshold=1e3)
    assert masks["Conv_0/kernel"].shape == (4, 2) and bool(masks["Conv_0/kernel"].all())
    w = np.asarray(flax_to_nnr(out["Conv_0"]["kernel"]))  # (4, 2, 3, 3): each 3x3 kernel one magnitude
    mags = np.abs(w).reshape(4, 2, 9)
    np.testing.assert_allclose(mags, np.broadcast_to(mags.mean(-1, keepdims=True), mags.shape), rtol=1e-5)
    np.testing.assert_array_equal(out["Conv_0"]["bias"], params["Conv_0"]["bias"])
    with pytest.raises(InputError):
        unify_tiles(k, 0, 0.1)
