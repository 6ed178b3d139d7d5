"""Naming of pytree leaves by slash-joined paths ("Conv_0/kernel"), shared by the reduce tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from nncjax.errors import InputError

__all__ = ["named_leaves", "replace_named", "path_name", "default_weight_select", "resolve"]

Path = tuple[str, ...]


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_name(path: Path | str) -> str:
    """``("Conv_0", "kernel")`` -> ``"Conv_0/kernel"``; strings pass through unchanged."""
    return path if isinstance(path, str) else "/".join(str(p) for p in path)


def named_leaves(tree: Any) -> dict[str, jax.Array]:
    """Leaves of ``tree`` keyed by their slash-joined path, in ``jax.tree`` flatten order.

    >>> named_leaves({"Dense_0": {"kernel": 1.0, "bias": 2.0}})
    {'Dense_0/bias': 2.0, 'Dense_0/kernel': 1.0}
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in flat}


def replace_named(tree: Any, updates: Mapping[str, Any]) -> Any:
    """Copy of ``tree`` whose leaves named in ``updates`` are replaced (shapes are the caller's affair).

    Unknown names raise :class:`InputError` rather than being silently dropped.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = ["/".join(_key_str(k) for k in path) for path, _ in flat]
    unknown = set(updates) - set(names)
    if unknown:
        raise InputError(f"no such leaves in the pytree: {sorted(unknown)}")
    leaves = [updates.get(n, leaf) for n, (_, leaf) in zip(names, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def default_weight_select(name: str, leaf: jax.Array) -> bool:
    """NNCodec's notion of a "weight": any tensor with more than one dimension."""
    return getattr(leaf, "ndim", 0) > 1


def resolve(tree: Mapping[str, Any], path: Path | str) -> Any:
    """The subtree at ``path`` (tuple or slash-joined string) of a nested mapping."""
    node: Any = tree
    for key in (path.split("/") if isinstance(path, str) else path):
        if not isinstance(node, Mapping) or key not in node:
            raise InputError(f"path {path_name(path)!r} not found")
        node = node[key]
    return node
