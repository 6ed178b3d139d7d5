"""A 64-128-10 MLP on scikit-learn's 8x8 digits, trained on the fly in about a second.

Meant for fast tests of training-in-the-loop code (quantisation-aware training, federated rounds):
:func:`load` trains it deterministically; :func:`train` continues training any params.
Data: ``sklearn.datasets.load_digits`` (1797 images, shipped with scikit-learn), split by a fixed
permutation into 1437 train / 360 test images. Pixels are scaled from 0..16 to 0..1.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nncjax.errors import InputError
from nncjax.models.base import (
    EvalModel,
    check_batch,
    checked_apply,
    classification_metrics,
    compare_with_shipped,
    frozen_float32,
    resolve_subset,
    torch_style_names,
)

__all__ = ["DigitsMLP", "apply", "evaluate", "load", "load_digits_split", "logits", "loss", "metrics", "train"]

N_TEST = 360


class DigitsMLP(nn.Module):
    """``images (B, 64) float32 in [0, 1] -> logits (B, 10)``: dense 128 + ReLU, dense 10."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(10, name="fc2")(nn.relu(nn.Dense(128, name="fc1")(x)))


@functools.lru_cache(maxsize=1)
def _data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    return (d.data[order] / 16.0).astype(np.float32), d.target[order].astype(np.int32)


def load_digits_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 64) float32, labels (N,) int32)``; ``"train"``: 1437 images, ``"test"``: 360.

    Example:
        >>> x, y = load_digits_split("test"); x.shape
        (360, 64)
    """
    x, y = _data()
    if split == "train":
        return x[:-N_TEST], y[:-N_TEST]
    if split == "test":
        return x[-N_TEST:], y[-N_TEST:]
    raise InputError(f"split must be 'train' or 'test', got {split!r}")


def _images(images: Any) -> Any:
    return check_batch(images, "images", ("B", 64))


@checked_apply(_images)
def apply(params: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """Logits ``(B, 10)`` of ``images (B, 64)`` (InputError for another shape or dtype).

    >>> params = DigitsMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))   # untrained, for the shapes
    >>> x = np.zeros((3, 64), np.float32)
    >>> out = apply(params, x); out.shape, bool(np.allclose(out, DigitsMLP().apply(params, x)))
    ((3, 10), True)
    >>> apply(params, np.zeros((3, 63), np.float32))
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: images must be a real numeric array of shape (B, 64) with B >= 1, got shape (3, 63)
    """
    return DigitsMLP().apply(params, images)


def loss(params: Mapping[str, Any], images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy, a scalar; differentiable in ``params``. ``images (B, 64)``, integer
    ``labels (B,)``; InputError for other shapes or dtypes.

    Example:
        >>> p = DigitsMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))   # untrained: about ln 10
        >>> value, g = jax.jit(jax.value_and_grad(loss))(p, *load_digits_split("train"))
        >>> round(float(value), 1), g["params"]["fc1"]["kernel"].shape
        (2.4, (64, 128))
    """
    images = _images(images)
    labels = check_batch(labels, "labels", (np.shape(images)[0],), "iu")
    logits = DigitsMLP().apply(params, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames=("steps",))
def train(params: Mapping[str, Any], steps: int = 300, learning_rate: float = 1e-2) -> Any:
    """``params`` after ``steps`` full-batch Adam steps on the training split (deterministic).

    Example:
        >>> p = train(DigitsMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 64))), steps=300)
        >>> bool(jax.jit(loss)(p, *load_digits_split("train")) < 0.01)       # from about ln 10
        True
    """
    x, y = load_digits_split("train")
    tx = optax.adam(learning_rate)

    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params


def logits(params: Mapping[str, Any], subset: str | int = "ci") -> np.ndarray:
    """Logits ``(n, 10)`` float32 on the first n test images (``"ci"`` and ``"full"``: all 360).

    Example:
        >>> p = DigitsMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))   # untrained, for the shape
        >>> out = logits(p, 8); out.shape, out.dtype
        ((8, 10), dtype('float32'))
    """
    x = load_digits_split("test")[0]
    return np.asarray(apply(params, x[: resolve_subset(subset, N_TEST, N_TEST)]))


def metrics(out: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """``top1``, ``n`` (and ``argmax_agree`` with ``reference``, logits of the same shape) of
    :func:`logits` output ``(n, 10)`` on the first n test images.

    Example:
        >>> y = load_digits_split("test")[1]
        >>> metrics(np.eye(10, dtype=np.float32)[y])                     # perfect logits (360, 10)
        {'top1': 1.0, 'n': 360.0}
        >>> metrics(np.eye(10)[y[:4]], reference=np.eye(10)[(y[:4] + 1) % 10])
        {'top1': 1.0, 'n': 4.0, 'argmax_agree': 0.0}
    """
    return classification_metrics(out, load_digits_split("test")[1], reference)


def evaluate(params: Mapping[str, Any], subset: str | int = "ci") -> dict[str, float]:
    """Test ``top1`` and ``n`` of ``params`` (``"ci"`` and ``"full"``: all 360 test images).

    Example:
        >>> p0 = DigitsMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))   # untrained
        >>> evaluate(p0)["top1"] < 0.3, evaluate(train(p0))["top1"] > 0.95      # train(p0): load()'s params
        (True, True)
    """
    return metrics(logits(params, subset))


def load(seed: int = 0, steps: int = 300) -> EvalModel:
    """A freshly trained digits MLP (about 1 s on CPU) as an :class:`EvalModel`; original names are PyTorch-style (``fc1.weight (128, 64)``).

    Example:
        >>> m = load(); m.eval()["top1"] > 0.95
        True
    """
    init = jax.jit(DigitsMLP().init)(
        jax.random.PRNGKey(seed), jnp.zeros((1, 64), jnp.float32)
    )  # one compile, not one per op
    params = frozen_float32(train(init, steps=steps))
    name_map, to_original, from_original = torch_style_names(params)
    return EvalModel(
        name="digits_mlp",
        params=params,
        apply=apply,
        evaluate=compare_with_shipped(logits, metrics, params),
        name_map=name_map,
        to_original=to_original,
        from_original=from_original,
    )
