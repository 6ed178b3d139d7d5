"""Names for the tensors of a pytree, and the way back from a flat ``{name: array}`` dict.

NNR bitstreams carry each tensor's name as a string (``topology_elem_id``). nncjax names tensors so
that a flat dict round-trips verbatim and a nested pytree gets readable, stable names:

* a flat mapping of ``str -> array`` keeps its keys and their insertion order (what NNCodec does);
* nested mappings, lists and tuples are walked in insertion order and named by their key path joined
  with ``"/"`` (``{"dense": {"kernel": w}}`` -> ``"dense/kernel"``; list items by index, namedtuple
  items by field);
* any other pytree node (Flax structs, custom nodes) is flattened by ``jax.tree_util`` below that
  point, its keys named the same way.

Every name is the one :func:`key_path_name` gives the leaf's ``jax.tree_util`` key path, so the
codec's names and those of :func:`nncjax.reduce.named_leaves` (which the optimisers use) agree for
every pytree; only the order differs (insertion order here, jax's sorted dict keys there).

``None`` leaves are kept in the structure and carry no tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from nncjax.errors import InputError

__all__ = ["check_name", "flatten_named", "is_kernel_name", "key_path_name", "unflatten_like"]

_SEP = "/"


def is_kernel_name(name: str) -> bool:
    """Whether ``name`` names a Flax kernel (last path component ``"kernel"``): a weight stored
    inputs-first, ``(..., inputs, outputs)``, which NNR codes outputs-first.

    >>> is_kernel_name("params/fc1/kernel"), is_kernel_name("params/my_kernel"), is_kernel_name("kernel")
    (True, False, True)
    """
    return name.rsplit(_SEP, 1)[-1] == "kernel"


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic, int, float, bool)) or _is_jax_array(x)


def _is_jax_array(x: Any) -> bool:
    return type(x).__module__.startswith(("jax", "jaxlib")) and hasattr(x, "shape") and hasattr(x, "dtype")


def _key_str(entry: Any) -> str:
    """One jax key-path entry as a name component (DictKey, GetAttrKey, SequenceKey, ...)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def key_path_name(path: tuple) -> str:
    """A ``jax.tree_util`` key path as a tensor name: its dict keys, attribute and namedtuple field
    names and sequence indices joined with ``"/"``. The one naming of pytree leaves in nncjax.

    A last attribute ``value`` is left out: it is where a ``flax.nnx`` variable (``nnx.Param``,
    ``nnx.BatchStat``) keeps its array, so an NNX state's kernel is ``"linear/kernel"`` as in Linen,
    and names ending in ``"kernel"`` are laid out as Flax kernels (:func:`is_kernel_name`).

    >>> import collections, jax
    >>> P = collections.namedtuple("P", "w b")
    >>> [key_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({"l": [P(1, 2)]})[0]]
    ['l/0/w', 'l/0/b']
    >>> key_path_name((jax.tree_util.DictKey("linear"), jax.tree_util.DictKey("kernel"),
    ...                jax.tree_util.GetAttrKey("value")))
    'linear/kernel'
    """
    if path and getattr(path[-1], "name", None) == "value" and type(path[-1]).__name__ == "GetAttrKey":
        path = path[:-1]
    return _SEP.join(_key_str(e) for e in path)


def check_name(name: str) -> str:
    """Validates a tensor name: a non-empty str without NUL (the NNR string terminator); returns it
    unchanged, else raises InputError.

    >>> check_name("dense/kernel")
    'dense/kernel'
    >>> check_name("")
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: tensor name '' is empty or contains a NUL character
    """
    if not isinstance(name, str):
        raise InputError(f"tensor names must be str, got {type(name).__name__} {name!r}")
    if name == "" or "\x00" in name:
        raise InputError(f"tensor name {name!r} is empty or contains a NUL character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"tensor name {name!r} is not encodable as UTF-8: {e}") from None
    return name


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _join(prefix: str, key: Any) -> str:
    """``prefix/key``; ``prefix`` alone for the empty key an NNX variable's array gets (:func:`key_path_name`)."""
    key = str(key)
    return f"{prefix}{_SEP}{key}" if prefix and key else prefix or key


def _walk(node: Any, prefix: str, out: list[tuple[str, Any]]) -> None:
    if node is None:
        return
    if _is_leaf(node):
        out.append((prefix, node))
        return
    if isinstance(node, Mapping):
        items = [(str(k), v) for k, v in node.items()]
    elif _is_namedtuple(node):  # by field, as jax's key path names it
        items = list(zip(node._fields, node))
    elif isinstance(node, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        import jax

        leaves, _ = jax.tree_util.tree_flatten_with_path(node)
        if len(leaves) == 1 and leaves[0][0] == ():  # a leaf to jax (not an array): the codec rejects it
            out.append((prefix, node))
            return
        items = [(key_path_name(path), leaf) for path, leaf in leaves]
    for key, child in items:
        _walk(child, _join(prefix, key), out)


def flatten_named(params: Any) -> dict[str, Any]:
    """``params`` (any pytree of arrays) -> ``{name: leaf}`` in coding order.

    >>> list(flatten_named({"dense": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}}))
    ['dense/kernel', 'dense/bias']
    >>> list(flatten_named({"layer.0/weight": np.zeros((2, 3))}))  # flat dict: keys verbatim
    ['layer.0/weight']
    """
    if isinstance(params, Mapping) and all(_is_leaf(v) for v in params.values()):
        pairs = [(k if isinstance(k, str) else str(k), v) for k, v in params.items()]
    elif _is_leaf(params):
        raise InputError("params must be a pytree (e.g. a dict) of arrays, not a single array")
    else:
        pairs = []
        _walk(params, "", pairs)
    out: dict[str, Any] = {}
    for name, leaf in pairs:
        check_name(name)
        if name in out:
            raise InputError(f"two tensors get the same name {name!r}; use a flat dict with unique keys")
        out[name] = leaf
    return out


def unflatten_like(like: Any, values: Mapping[str, Any], cast) -> Any:
    """Rebuilds a pytree shaped like ``like`` from ``{name: array}`` (names as :func:`flatten_named`).

    ``cast(name, array, like_leaf)`` converts each decoded array to the leaf's type/dtype/shape.
    Raises InputError if ``values`` lacks a name of ``like``; names ``like`` does not have are ignored.

    >>> like = {"dense": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    >>> values = {"dense/kernel": np.ones(6), "dense/bias": np.arange(3.0)}
    >>> out = unflatten_like(like, values, lambda name, a, ref: a.reshape(ref.shape).astype(ref.dtype))
    >>> out["dense"]["kernel"].shape, out["dense"]["bias"]
    ((2, 3), array([0., 1., 2.], dtype=float32))
    """
    def leaf(name: str, ref: Any) -> Any:
        if name not in values:
            raise InputError(f"the bitstream has no tensor named {name!r} (required by `like`)")
        return cast(name, values[name], ref)

    if isinstance(like, Mapping) and all(_is_leaf(v) for v in like.values()):
        return _rebuild_mapping(like, lambda k, v: leaf(k if isinstance(k, str) else str(k), v))

    def build(node: Any, prefix: str) -> Any:
        if node is None:
            return None
        if _is_leaf(node):
            return leaf(prefix, node)
        if isinstance(node, Mapping):
            return _rebuild_mapping(node, lambda k, v: build(v, _join(prefix, k)))
        if _is_namedtuple(node):
            return type(node)(*(build(v, _join(prefix, f)) for f, v in zip(node._fields, node)))
        if isinstance(node, (list, tuple)):
            return type(node)([build(v, _join(prefix, i)) for i, v in enumerate(node)])
        import jax

        paths, treedef = jax.tree_util.tree_flatten_with_path(node)
        if len(paths) == 1 and paths[0][0] == ():  # a leaf to jax: as _walk names it
            return leaf(prefix, node)
        new = [build(x, _join(prefix, key_path_name(p))) for p, x in paths]
        return jax.tree_util.tree_unflatten(treedef, new)

    return build(like, "")


def _rebuild_mapping(ref: Mapping, child: Callable[[Any, Any], Any]) -> Mapping:
    """A mapping like ``ref`` with each value ``v`` under key ``k`` replaced by ``child(k, v)``.

    A mapping jax flattens by key is rebuilt from its own pytree structure and stored values: its
    constructor or item access may wrap values (``nnx.State`` hands out nested dicts as ``State``
    views); others by their type's constructor (a plain dict where that fails)."""
    if type(ref) is not dict:
        import jax

        children, treedef = jax.tree_util.tree_flatten_with_path(ref, is_leaf=lambda x: x is not ref)
        if children and all(len(p) == 1 and hasattr(p[0], "key") for p, _ in children):
            return jax.tree_util.tree_unflatten(treedef, [child(p[0].key, v) for p, v in children])
    items = {k: child(k, v) for k, v in ref.items()}
    if type(ref) is dict:
        return items
    try:
        return type(ref)(items)
    except TypeError:
        return items
