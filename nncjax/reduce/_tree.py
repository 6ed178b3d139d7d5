"""Naming of pytree leaves by slash-joined paths ("Conv_0/kernel"), shared by the reduce tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nncjax.arguments import check_int, is_concrete
from nncjax.errors import InputError
from nncjax.pytree_names import key_path_name

__all__ = ["as_array", "check_axis", "check_float", "check_in_range", "check_mapping", "default_weight_select",
           "named_leaves", "path_name", "replace_named", "resolve", "select_float_names"]

Path = tuple[str, ...]


def path_name(path: Path | str) -> str:
    """``("Conv_0", "kernel")`` -> ``"Conv_0/kernel"``; strings pass through unchanged.

    >>> path_name(("Conv_0", "kernel")), path_name("Conv_0/kernel")
    ('Conv_0/kernel', 'Conv_0/kernel')
    """
    return path if isinstance(path, str) else "/".join(str(p) for p in path)


def check_axis(axis: Any, ndim: int) -> int:
    """``axis`` of an ``ndim``-D tensor as an index in ``0..ndim-1``; InputError if it is no integer in
    ``[-ndim, ndim)`` (it is not wrapped around).

    >>> check_axis(-1, 3)
    2
    """
    return check_int(axis, "axis", lo=-ndim, hi=ndim - 1) % ndim


def as_array(x: Any, what: str) -> jax.Array:
    """``jnp.asarray(x)``; InputError naming ``what`` for what JAX cannot hold (strings, None, ragged lists).

    >>> as_array([1.0, 2.0], "w").shape
    (2,)
    """
    if isinstance(x, (str, bytes)):  # np.asarray("0.5") is a string array, jnp.asarray("0.5") a TypeError
        raise InputError(f"{what} must be an array of numbers, got {x!r}")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be an array of numbers, got {type(x).__name__}: {e}") from None


def check_float(x: Any, what: str) -> jax.Array:
    """``x`` as a real floating-point array; InputError naming ``what`` for ints, bools, complex numbers
    (the reduce tools would truncate, wrap or drop an imaginary part) and non-arrays.

    >>> check_float(jnp.ones(2, jnp.bfloat16), "w").dtype
    dtype(bfloat16)
    """
    a = as_array(x, what)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise InputError(f"{what} must be a real floating-point tensor, got dtype {a.dtype}")
    return a


def check_in_range(x: jax.Array, source: jax.Array, what: str) -> jax.Array:
    """``x`` (a cast or product of ``source``, same shape) after checking that no finite entry of
    ``source`` became infinite in it: beyond a half-precision dtype's range (float16 ends at 65504) a
    value silently turns into inf. InputError naming ``what``; tracers are not checked.

    >>> check_in_range(jnp.array([7e4]).astype(jnp.float16), jnp.array([7e4]), "kernel")
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: kernel: a finite value became inf in float16 (beyond its range)
    """
    if is_concrete(x) and is_concrete(source) and jnp.issubdtype(x.dtype, jnp.inexact) \
            and bool(jnp.any(jnp.isinf(x) & jnp.isfinite(source))):
        raise InputError(f"{what}: a finite value became inf in {x.dtype} (beyond its range)")
    return x


def check_mapping(x: Any, what: str, of: str = "{name: value}") -> Mapping:
    """``x`` if it is a Mapping, else InputError naming ``what`` (a list of pairs or None is a mistake).

    >>> check_mapping({"w": 1}, "ranks")
    {'w': 1}
    """
    if not isinstance(x, Mapping):
        raise InputError(f"{what} must be a mapping {of}, got {type(x).__name__}")
    return x


def named_leaves(tree: Any) -> dict[str, jax.Array]:
    """Leaves of ``tree`` keyed by their slash-joined path, in ``jax.tree`` flatten order; the names are
    the codec's (:func:`nncjax.pytree_names.key_path_name`: namedtuple items by field).

    >>> named_leaves({"Dense_0": {"kernel": 1.0, "bias": 2.0}})
    {'Dense_0/bias': 2.0, 'Dense_0/kernel': 1.0}
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {key_path_name(path): leaf for path, leaf in flat}


def replace_named(tree: Any, updates: Mapping[str, Any]) -> Any:
    """Copy of ``tree`` whose leaves named in ``updates`` are replaced (shapes are the caller's affair).

    Unknown names raise :class:`InputError` rather than being silently dropped.

    >>> replace_named({"Dense_0": {"kernel": 1.0, "bias": 2.0}}, {"Dense_0/bias": 0.0})
    {'Dense_0': {'bias': 0.0, 'kernel': 1.0}}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [key_path_name(path) for path, _ in flat]
    unknown = set(updates) - set(names)
    if unknown:
        raise InputError(f"no such leaves in the pytree: {sorted(unknown)}")
    leaves = [updates.get(n, leaf) for n, (_, leaf) in zip(names, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def default_weight_select(name: str, leaf: jax.Array) -> bool:
    """NNCodec's notion of a "weight": any tensor with more than one dimension (``name`` is unused),
    unless it is empty: there is nothing to optimise in it, and it is coded as a fixed tensor.

    >>> default_weight_select("w", jnp.zeros((2, 2))), default_weight_select("b", jnp.zeros(2))
    (True, False)
    >>> default_weight_select("e", jnp.zeros((0, 4)))
    False
    """
    return getattr(leaf, "ndim", 0) > 1 and getattr(leaf, "size", 1) > 0


def select_float_names(named: Mapping[str, Any], select: Any) -> list[str]:
    """Names of the non-empty floating-point leaves of ``named`` (``{name: leaf}``) that ``select``
    picks: a predicate ``(name, leaf) -> bool`` or a list of names (each must be a float leaf). Empty
    tensors are left out either way: they hold nothing to optimise or measure.

    >>> named = {"w": jnp.ones((2, 2)), "n": jnp.ones(2, jnp.int32), "e": jnp.ones((0, 2))}
    >>> select_float_names(named, lambda n, x: True), select_float_names(named, ["w", "e"])
    (['w'], ['w'])
    """
    floats = [n for n, x in named.items()
              if jnp.issubdtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype, jnp.floating)]
    if callable(select):
        chosen = [n for n in floats if select(n, named[n])]
    elif isinstance(select, (str, bytes)):  # list("w") would be the names "w" only by accident
        raise InputError(f"select must be a predicate (name, leaf) -> bool or a list of names, got {select!r}")
    else:
        try:
            chosen = list(select)
        except TypeError:
            raise InputError("select must be a predicate (name, leaf) -> bool or a list of names") from None
        bad = [n for n in chosen if n not in floats]
        if bad:
            raise InputError(f"select names no float tensors of params: {bad}")
    return [n for n in chosen if jnp.size(named[n]) > 0]


def resolve(tree: Mapping[str, Any], path: Path | str) -> Any:
    """The subtree at ``path`` (tuple or slash-joined string) of a nested mapping; InputError if absent.

    >>> tree = {"a": {"b": {"c": 1}}}
    >>> resolve(tree, "a/b"), resolve(tree, ("a", "b", "c"))
    ({'c': 1}, 1)
    """
    node: Any = tree
    for key in (path.split("/") if isinstance(path, str) else path):
        if not isinstance(node, Mapping) or key not in node:
            raise InputError(f"path {path_name(path)!r} not found")
        node = node[key]
    return node
