"""Unusual pytrees end to end: one naming of leaves for the codec and the optimisers (namedtuples and
custom nodes included), and empty float tensors, which are coded but never optimised."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

import nncjax
from nncjax.errors import InputError
from nncjax.pytree_names import flatten_named, unflatten_like
from nncjax.quantize.gptq import input_moments
from nncjax.rd_settings import LS_SUFFIX
from nncjax.reduce import named_leaves, replace_named
from nncjax.reduce._tree import default_weight_select, select_float_names

L = collections.namedtuple("L", "w b")


@flax.struct.dataclass
class Struct:
    w: Any
    b: Any


@dataclasses.dataclass
class Registered:
    w: Any
    b: Any


jax.tree_util.register_dataclass(Registered, data_fields=["w", "b"], meta_fields=[])


class Pair:
    """A custom node registered without keys (its children get FlattenedIndexKey entries)."""

    def __init__(self, x, y):
        self.x, self.y = x, y


jax.tree_util.register_pytree_node(Pair, lambda p: ((p.x, p.y), None), lambda _, c: Pair(*c))


def _a(*shape):
    return np.ones(shape, np.float32)


# (tree, its tensor names); the dict, list, tuple and Flax names are those of existing bitstreams
TREES = {
    "dict": ({"b": {"k": _a(2, 3), "j": _a(3)}, "a": _a(1)}, {"b/k", "b/j", "a"}),
    "list": ([_a(2), [_a(1), _a(3)]], {"0", "1/0", "1/1"}),
    "tuple": ((_a(2), (_a(1),)), {"0", "1/0"}),
    "namedtuple": ({"l1": L(_a(2, 3), _a(3))}, {"l1/w", "l1/b"}),
    "flax.struct": ({"s": Struct(_a(2, 3), _a(3))}, {"s/w", "s/b"}),
    "register_dataclass": ({"r": Registered(_a(2, 3), _a(3))}, {"r/w", "r/b"}),
    "FrozenDict": (FrozenDict({"params": {"dense": {"kernel": _a(2, 3)}}}), {"params/dense/kernel"}),
    "custom node": ({"p": Pair(_a(2), _a(3))}, {"p/0", "p/1"}),
    "nested": ([Struct(L(_a(2), _a(1)), {"x": (_a(3),)})], {"0/w/w", "0/w/b", "0/b/x/0"}),
}


def test_codec_and_optimiser_names_agree_for_every_kind_of_pytree():
    for kind, (tree, names) in TREES.items():
        coded, optimised = flatten_named(tree), named_leaves(tree)
        assert set(coded) == names and set(optimised) == names, kind
        # either side's names address the other side's leaves
        doubled = replace_named(tree, {n: 2 * x for n, x in coded.items()})
        assert all(np.all(x == 2) for x in jax.tree_util.tree_leaves(doubled)), kind
        back = unflatten_like(tree, {n: 3 * x for n, x in optimised.items()}, lambda n, a, ref: a)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree), kind
        assert all(np.all(x == 3) for x in jax.tree_util.tree_leaves(back)), kind


def test_leaves_that_are_no_arrays_raise_input_error():
    for tree in ({"a": {"b": "text", "c": _a(2)}}, {"a": [_a(2), 1 + 2j]}):
        assert list(flatten_named(tree))[0] in ("a/b", "a/0")  # named, not walked into
        with pytest.raises(InputError, match="cannot be coded"):
            nncjax.encode(tree)


def _namedtuple_model():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {"l1": L(jax.random.normal(k[0], (10, 24)) * 0.3, jnp.zeros(24)),
         "l2": L(jax.random.normal(k[1], (24, 4)) * 0.3, jnp.zeros(4))}

    def f(p, x):
        return jax.nn.relu(x @ p["l1"].w + p["l1"].b) @ p["l2"].w + p["l2"].b

    return p, f, jax.random.normal(k[2], (16, 10))


@pytest.mark.parametrize("init", ["base", "sensitivity"])
def test_optimize_and_verify_namedtuple_params(init):
    p, f, x = _namedtuple_model()
    rd = nncjax.optimize(p, f, x, lam=1e-3, init=init, steps=0, progress=False)
    assert {n for n in rd.qp_overrides if not n.endswith(LS_SUFFIX)} == {"l1/w", "l2/w"}
    out = nncjax.verify(p, rd)
    assert isinstance(out.params["l1"], L) and out.params["l1"].w.shape == (10, 24)
    assert set(nncjax.decode(out.bitstream)) >= {"l1/w", "l1/b", "l2/w", "l2/b"}  # field names in the stream
    step = nncjax.qp_to_step(rd.qp_overrides["l1/w"], rd.qp_density)
    scale = np.max(rd.local_scales.get("l1/w", np.ones(1)))
    assert np.max(np.abs(np.asarray(out.params["l1"].w - p["l1"].w))) <= 2 * step * scale


# ---------------------------------------------------------------------------------------------------
# empty float tensors

EMPTY_SHAPES = [(0, 4), (4, 0), (0, 0), (2, 0, 3)]


class _WithEmpty(nn.Module):
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4)(nn.relu(nn.Dense(16)(x)))
        return y + jnp.sum(self.param("empty", lambda k: jnp.zeros(self.shape)))


def _empty_model(shape):
    m = _WithEmpty(shape)
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
    return m, x, m.init(jax.random.PRNGKey(1), x)


def _check_empty(variables, shape):
    e = variables["params"]["empty"]
    assert e.shape == shape and e.dtype == jnp.float32


def test_empty_tensors_are_never_selected():
    named = {"w": jnp.ones((2, 2)), "e": jnp.ones((0, 2)), "e1": jnp.ones(0), "n": jnp.ones(2, jnp.int32)}
    assert select_float_names(named, lambda n, x: True) == ["w"]
    assert select_float_names(named, ["e", "w"]) == ["w"]
    assert select_float_names(named, default_weight_select) == ["w"]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_optimize_leaves_empty_tensors_fixed(shape):
    m, x, v = _empty_model(shape)
    for kw in (dict(init="sensitivity", steps=0), dict(steps=3, dq=True), dict(steps=3, dq=False)):
        rd = nncjax.optimize(v, m.apply, x, lam=1e-3, progress=False, **kw)
        assert not any(n.startswith("params/empty") for n in [*rd.qp_overrides, *rd.local_scales]), kw
        out = nncjax.verify(v, rd)
        _check_empty(out.params, shape)
        _check_empty(nncjax.decode(out.bitstream, like=v), shape)


def test_optimize_with_an_explicit_selection_of_empty_tensors():
    m, x, v = _empty_model((0, 4))
    rd = nncjax.optimize(v, m.apply, x, lam=1e-3, select=["params/empty", "params/Dense_0/kernel"], steps=2,
                         progress=False)
    assert [n for n in rd.qp_overrides if not n.endswith(LS_SUFFIX)] == ["params/Dense_0/kernel"]
    _check_empty(nncjax.verify(v, rd).params, (0, 4))


def test_the_refinements_and_ioq_go_through_empty_tensors():
    shape = (0, 4)
    m, x, v = _empty_model(shape)
    rd = nncjax.optimize(v, m.apply, x, lam=1e-3, dq=False, init="sensitivity", steps=0, progress=False)
    v_ef, rd_ef = nncjax.with_error_feedback(v, rd, input_moments(m.apply, v, x), progress=False)
    _check_empty(nncjax.verify(v_ef, rd_ef).params, shape)
    v_bc, rd_bc = nncjax.with_bias_correction(v, rd, m.apply, x)
    _check_empty(nncjax.verify(v_bc, rd_bc).params, shape)
    res = nncjax.optimize_ioq(v, m.apply, x, lam=1e-3, lsa_steps=3)
    _check_empty(res.restore(nncjax.decode(nncjax.encode(res.tensors, **res.encode_kwargs()), raw=True)), shape)
