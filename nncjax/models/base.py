"""The uniform interface of the evaluation models: :class:`EvalModel` and pytree path helpers.

Every model in :mod:`nncjax.models` is an :class:`EvalModel`: a Flax variables pytree (``params``),
a pure ``apply``, an ``eval`` returning a dict of quality metrics, and a ``name_map`` between the
slash-joined Flax paths and the tensor names of the original (shipped) weights, so a bitstream of
original-named tensors can be loaded back into Flax and vice versa.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from nncjax.arguments import check_array_kind
from nncjax.errors import InputError

__all__ = [
    "EvalModel",
    "check_batch",
    "checked_apply",
    "checked_tree",
    "classification_metrics",
    "compare_with_shipped",
    "flatten_paths",
    "frozen_float32",
    "param_shapes",
    "resolve_subset",
    "torch_style_names",
    "unflatten_paths",
]

Params = Any  # a Flax variables dict, e.g. {"params": {...}, "batch_stats": {...}}


def flatten_paths(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flattens a nested dict of arrays into ``{"a/b/c": array}``.

    Example:
        >>> flatten_paths({"params": {"dense": {"kernel": np.zeros((2, 3))}}})["params/dense/kernel"].shape
        (2, 3)
    """
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(k.key) for k in path)] = np.asarray(leaf)
    return out


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_paths`: ``{"a/b": x}`` -> ``{"a": {"b": x}}``.

    Example:
        >>> unflatten_paths({"params/w": 1})
        {'params': {'w': 1}}
    """
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


def frozen_float32(tree: Any) -> Any:
    """``tree`` with every leaf a read-only float32 numpy array (the registry caches models, so
    shipped weights must not be changed in place).

    Example:
        >>> frozen_float32({"w": np.ones(2)})["w"].flags.writeable
        False
    """

    def freeze(leaf: Any) -> np.ndarray:
        a = np.array(leaf, np.float32)
        a.setflags(write=False)
        return a

    return jax.tree_util.tree_map(freeze, tree)


def param_shapes(module: Any, *example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """``{flax_path: shape}`` of ``module.init``'s variables, computed abstractly (nothing runs).

    Example:
        >>> import flax.linen as nn
        >>> param_shapes(nn.Dense(3), np.zeros((1, 2), np.float32))
        {'params/bias': (3,), 'params/kernel': (2, 3)}
    """
    tree = jax.eval_shape(module.init, jax.random.PRNGKey(0), *example_inputs)
    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def checked_tree(flat: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], what: str = "tensors") -> Params:
    """``flat`` (``{"a/b": array}``) as a float32 nested dict after checking it has exactly the paths
    and shapes of ``shapes``; otherwise :class:`~nncjax.errors.InputError` naming the culprit.

    Example:
        >>> checked_tree({"params/w": [3, 4]}, {"params/w": (2,)})["params"]["w"]
        array([3., 4.], dtype=float32)
    """
    missing, surplus = set(shapes) - set(flat), set(flat) - set(shapes)
    if missing or surplus:
        raise InputError(f"{what}: missing {sorted(missing)[:5]}, unexpected {sorted(surplus)[:5]}")
    arrays = {p: np.asarray(flat[p], np.float32) for p in shapes}
    for p, a in arrays.items():
        if a.shape != tuple(shapes[p]):
            raise InputError(f"{what}: {p} has shape {a.shape}, expected {tuple(shapes[p])}")
    return unflatten_paths(arrays)


_KIND_NAMES = {"iuf": "real numeric", "iu": "integer", "iub": "integer or bool"}


def check_batch(x: Any, what: str, shape: tuple[int | str, ...], kinds: str = "iuf") -> Any:
    """``x`` after checking it is an array of ``shape`` whose dtype kind (NumPy's letter) is one of
    ``kinds``; otherwise :class:`~nncjax.errors.InputError` naming the expected shape. In ``shape`` an
    int is a fixed size and a string names a free size >= 1. Only shapes and dtypes are read, which are
    static, so the check also runs on tracers under ``jit``. An array-like (a list) comes back as a
    NumPy array; arrays and tracers come back unchanged.

    Example:
        >>> check_batch(np.zeros((2, 64)), "images", ("B", 64)).shape
        (2, 64)
        >>> check_batch(np.zeros((2, 63)), "images", ("B", 64))
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: images must be a real numeric array of shape (B, 64) with B >= 1, got shape (2, 63)
    """
    spec = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    free = [d for d in shape if isinstance(d, str)]
    want = f"{what} must be a{'n' if _KIND_NAMES[kinds][0] in 'aeiou' else ''} {_KIND_NAMES[kinds]} array of shape " \
        f"{spec}" + (f" with {', '.join(free)} >= 1" if free else "")
    x = check_array_kind(x, kinds, want)  # bool and complex were cast silently, strings failed in JAX
    got = tuple(x.shape)
    if len(got) != len(shape) or any(g != d if isinstance(d, int) else g < 1 for g, d in zip(got, shape)):
        raise InputError(f"{want}, got shape {got}")
    return x


ApplyFn = Callable[[Params, Any], Any]


def checked_apply(check: Callable[[Any], Any]) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator of a model's ``apply(params, batch)``: compiles it with ``jax.jit`` behind
    ``check(batch) -> batch`` (e.g. :func:`check_batch`), which runs in Python before the compiled call,
    so a string or ragged batch never reaches ``jit`` and value checks can run while values are
    concrete. Under a user's ``jit`` it checks tracers (shapes and dtypes only) and stays pure. The
    result keeps the function's name and docstring and looks like a ``jax.jit`` wrapper: ``lower`` is
    the compiled function's, and ``__wrapped__`` the checked Python function, which layer statistics
    (GPTQ moments, bias correction) trace afresh to intercept the layers, where the compiled function's
    cached trace would run none of them.

    Example:
        >>> @checked_apply(lambda x: check_batch(x, "x", ("B",)))
        ... def scale(p, x):
        ...     return p * x
        >>> scale(2.0, np.ones(3)).tolist()
        [2.0, 2.0, 2.0]
    """

    def decorate(fn: ApplyFn) -> ApplyFn:
        @functools.wraps(fn)
        def traceable(params: Params, batch: Any) -> Any:
            return fn(params, check(batch))

        compiled = jax.jit(traceable)

        @functools.wraps(fn)
        def apply(params: Params, batch: Any) -> Any:
            return compiled(params, check(batch))

        apply.__wrapped__, apply.lower = traceable, compiled.lower
        return apply

    return decorate


# Flax leaf name -> torch parameter/buffer suffix.
_TORCH_SUFFIX = {
    "kernel": "weight",
    "embedding": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# Flax kernel layout -> torch layout, by rank: Dense (in, out) -> (out, in); Conv (k.., in, out) -> (out, in, k..).
_TORCH_PERM = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}


def torch_style_names(
    params: Params,
) -> tuple[dict[str, str], Callable[[Params], dict[str, np.ndarray]], Callable[[Mapping[str, Any]], Params]]:
    """``(name_map, to_original, from_original)`` for a model born in Flax, with PyTorch's naming and
    layout as its "original": ``params/conv1/kernel (3, 3, in, out)`` <-> ``conv1.weight (out, in, 3, 3)``,
    ``params/bn1/scale`` <-> ``bn1.weight``, ``batch_stats/bn1/mean`` <-> ``bn1.running_mean``. NNCodec
    recognises parameter types (weight, bias, batch-norm statistics) and tensor rows by these names
    and layouts, so its bitstreams of these models are comparable with those of torch models.

    Example:
        >>> names, to_orig, from_orig = torch_style_names({"params": {"fc": {"kernel": np.ones((2, 3))}}})
        >>> names, to_orig({"params": {"fc": {"kernel": np.ones((2, 3))}}})["fc.weight"].shape
        ({'params/fc/kernel': 'fc.weight'}, (3, 2))
    """
    flat = flatten_paths(params)
    shapes = {p: a.shape for p, a in flat.items()}
    rules: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for path, shape in shapes.items():
        _, *modules, leaf = path.split("/")
        if leaf not in _TORCH_SUFFIX or not modules:
            raise InputError(f"no PyTorch-style name for the Flax path {path!r}")
        perm = _TORCH_PERM.get(len(shape)) if leaf == "kernel" else None
        rules[path] = (".".join([*modules, _TORCH_SUFFIX[leaf]]), perm)
    name_map = {p: name for p, (name, _) in rules.items()}
    if len(set(name_map.values())) != len(name_map):
        raise InputError("two Flax paths map to the same PyTorch-style name")

    def to_original(tree: Params) -> dict[str, np.ndarray]:
        leaves = flatten_paths(tree)
        return {
            name: np.ascontiguousarray(leaves[p] if perm is None else leaves[p].transpose(perm))
            for p, (name, perm) in rules.items()
        }

    def from_original(tensors: Mapping[str, Any]) -> Params:
        by_name = {name: (p, perm) for p, (name, perm) in rules.items()}
        if set(tensors) != set(by_name):
            missing, surplus = set(by_name) - set(tensors), set(tensors) - set(by_name)
            raise InputError(f"tensors: missing {sorted(missing)[:5]}, unexpected {sorted(surplus)[:5]}")
        out = {}
        for name, (p, perm) in by_name.items():
            a = np.asarray(tensors[name], np.float32)
            if perm is not None and a.ndim == len(perm):
                a = a.transpose(np.argsort(perm))
            out[p] = a
        return checked_tree(out, shapes)

    return name_map, to_original, from_original


def resolve_subset(subset: str | int, ci_size: int, full_size: int) -> int:
    """Number of evaluation items for ``subset``: ``"full"``, ``"ci"`` (small, for tests) or an int.

    Example:
        >>> resolve_subset("ci", 200, 1000), resolve_subset(50, 200, 1000)
        (200, 50)
    """
    if subset == "full":
        return full_size
    if subset == "ci":
        return ci_size
    if isinstance(subset, (int, np.integer)) and not isinstance(subset, bool) and 0 < subset <= full_size:
        return int(subset)
    raise InputError(f"subset must be 'full', 'ci' or an int in [1, {full_size}], got {subset!r}")


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None
) -> dict[str, float]:
    """``top1`` and ``n`` of ``logits (n, classes)`` against ``labels (n,)``; with ``reference`` (the
    shipped weights' logits) also ``argmax_agree``, the fraction of identical predictions.

    Example:
        >>> classification_metrics(np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([1, 1]))
        {'top1': 0.5, 'n': 2.0}
    """
    pred = np.asarray(logits).argmax(axis=1)
    metrics = {"top1": float(np.mean(pred == labels[: len(pred)])), "n": float(len(pred))}
    if reference is not None:
        if reference.shape != np.shape(logits):
            raise InputError(f"reference logits have shape {reference.shape}, expected {np.shape(logits)}")
        metrics["argmax_agree"] = float(np.mean(pred == reference.argmax(axis=1)))
    return metrics


def compare_with_shipped(
    outputs: Callable[[Params, Any], np.ndarray],
    metrics: Callable[[np.ndarray, np.ndarray | None], dict[str, float]],
    shipped: Params,
) -> Callable[[Params, Any], dict[str, float]]:
    """An ``evaluate(params, subset)`` that scores ``outputs(params, subset)`` with ``metrics`` against
    the shipped weights' outputs on the same subset (computed once per subset, then cached).

    This is how a compressed model's agreement with the original (e.g. MiniLM's ``mean_cosine``)
    joins its task metrics. ``params is shipped`` reuses the cached outputs.

    Example:
        >>> ev = compare_with_shipped(lambda p, s: p * np.ones(3), lambda o, r: {"d": float(abs(o - r).max())}, 1.0)
        >>> ev(2.0, "ci")
        {'d': 1.0}
    """
    cache: dict[Any, np.ndarray] = {}

    def evaluate(params: Params, subset: Any = "ci") -> dict[str, float]:
        if subset not in cache:
            cache[subset] = outputs(shipped, subset)
        out = cache[subset] if params is shipped else outputs(params, subset)
        return metrics(out, cache[subset])

    return evaluate


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """A real model with its data and quality metric.

    Attributes:
        name: registry name (``nncjax.models.get(name)``).
        params: Flax variables pytree of float32 arrays (``{"params": ..., "batch_stats": ...}``).
        apply: ``apply(params, batch) -> outputs``, pure and jit-able.
        evaluate: ``evaluate(params, subset) -> dict[str, float]``; see :meth:`eval`. For the models
            the dict also measures agreement with the shipped weights' outputs (minilm:
            ``mean_cosine``; crepe: ``bins_mae``, ``argmax_agree``, ``cents_to_ref``; classifiers: ``argmax_agree``).
        name_map: ``{flax_path: original_name}`` for every leaf of ``params`` (paths ``"/"``-joined).
        to_original: ``params -> {original_name: np.ndarray}`` in the original layout and names.
        from_original: ``{original_name: array} -> params`` (inverse of ``to_original``).

    Example:
        >>> import nncjax.models
        >>> m = nncjax.models.get("digits_mlp")
        >>> m.eval(subset="ci")["top1"] > 0.9
        True
    """

    name: str
    params: Params
    apply: Callable[[Params, Any], Any]
    evaluate: Callable[[Params, Any], dict[str, float]]
    name_map: dict[str, str]
    to_original: Callable[[Params], dict[str, np.ndarray]]
    from_original: Callable[[Mapping[str, Any]], Params]

    def eval(self, params: Params | None = None, *, subset: str | int = "ci") -> dict[str, float]:
        """Quality metrics of ``params`` (default: the shipped weights) on ``subset``.

        ``subset`` is ``"ci"`` (a small fixed subset for tests), ``"full"`` (the reported task) or an
        int (the first n items of the full task's fixed order). Raises InputError for another subset,
        or ``params`` whose paths or shapes are not the model's or that hold NaN or Inf (their metrics
        were garbage: MiniLM scored top1 1.0).

        A toy model (the real ones come from :func:`nncjax.models.get`):

        >>> m = EvalModel(name="toy", params={"params": {"w": np.ones(3, np.float32)}}, apply=None,
        ...               evaluate=lambda p, subset: {"w_sum": float(p["params"]["w"].sum()), "n": subset},
        ...               name_map={"params/w": "w"}, to_original=None, from_original=None)
        >>> m.eval(), m.eval({"params": {"w": np.zeros(3, np.float32)}}, subset=10)
        ({'w_sum': 3.0, 'n': 'ci'}, {'w_sum': 0.0, 'n': 10})
        >>> m.eval({"params": {"w": np.zeros(2, np.float32)}})
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: params: params/w has shape (2,), expected (3,)
        >>> m.eval({"params": {"w": np.array([1.0, np.nan, 0.0], np.float32)}})
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: params hold NaN or Inf in ['params/w']
        """
        if isinstance(params, (str, int)):
            raise InputError(f"eval's first argument is params; pass subset={params!r} by keyword")
        # checked before the cache of the shipped outputs is asked: 20.0 (== 20) was taken from it
        if not (subset in ("full", "ci") if isinstance(subset, str)
                else isinstance(subset, (int, np.integer)) and not isinstance(subset, bool)):
            raise InputError(f"subset must be 'full', 'ci' or an int, got {subset!r}")
        if params is not None:
            flat = flatten_paths(params)
            checked_tree(flat, {p: np.shape(a) for p, a in flatten_paths(self.params).items()}, "params")
            bad = [p for p, a in flat.items() if not np.all(np.isfinite(a))]
            if bad:
                raise InputError(f"params hold NaN or Inf in {bad[:5]}")
        return self.evaluate(self.params if params is None else params, subset)

    @property
    def num_params(self) -> int:
        """Total number of scalars in ``params`` (batch-norm statistics included).

        >>> params = {"params": {"conv": {"kernel": np.ones((3, 3, 1, 8)), "bias": np.ones(8)}},
        ...           "batch_stats": {"bn": {"mean": np.zeros(8), "var": np.ones(8)}}}
        >>> EvalModel("toy", params, None, None, {}, None, None).num_params   # 72 + 8 + 8 + 8
        96
        """
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.params)))
