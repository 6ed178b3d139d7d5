"""A small batch-norm CNN for Fashion-MNIST (about 0.39 M parameters), trained once in Flax.

Data: Debian ``dataset-fashion-mnist`` (idx files, gzip). The weights were produced by
``examples/train_fashion_mnist.py`` and ship as ``weights/fashion_cnn.msgpack``. The model is native
Flax; its "original" tensor names and layouts are PyTorch's (``conv1.weight (out, in, 3, 3)``,
``bn1.running_mean``, ...), see :func:`nncjax.models.base.torch_style_names`.
"""

from __future__ import annotations

import gzip
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nncjax.arguments import check_int, is_concrete
from nncjax.errors import InputError
from nncjax.models.base import (
    EvalModel,
    check_batch,
    checked_apply,
    checked_tree,
    classification_metrics,
    compare_with_shipped,
    flatten_paths,
    frozen_float32,
    param_shapes,
    resolve_subset,
    torch_style_names,
)

__all__ = [
    "DATA_DIR",
    "WEIGHTS_PATH",
    "FashionCNN",
    "apply",
    "evaluate",
    "init_variables",
    "load",
    "load_fashion_mnist",
    "logits",
    "make_train_step",
    "metrics",
]

DATA_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_PATH = pathlib.Path(__file__).parent / "weights" / "fashion_cnn.msgpack"
# Training-set pixel mean and standard deviation (of x / 255).
_MEAN, _STD = 0.2860, 0.3530
CI_SIZE = 1000


_CLASSES = 10  # Fashion-MNIST's classes: fc2's outputs, valid labels 0..9

class FashionCNN(nn.Module):
    """Three conv(3x3)+BN+ReLU+maxpool blocks (32, 64, 128 channels), dense 256 + BN + ReLU, dense 10.

    Input: uint8 or float images ``(N, 28, 28)`` with pixel values 0..255. Output: logits ``(N, 10)``.
    """

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = (jnp.asarray(images, jnp.float32)[..., None] / 255.0 - _MEAN) / _STD
        for i, features in enumerate((32, 64, 128)):
            x = nn.Conv(features, (3, 3), padding="SAME", use_bias=False, name=f"conv{i + 1}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i + 1}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))  # 28 -> 14 -> 7 -> 3
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(256, use_bias=False, name="fc1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn4")(x))
        return nn.Dense(_CLASSES, name="fc2")(x)


def init_variables(seed: int = 0) -> dict[str, Any]:
    """Fresh random variables ``{"params", "batch_stats"}`` of :class:`FashionCNN`.

    Example:
        >>> v = init_variables(0); sorted(v)
        ['batch_stats', 'params']
    """
    return _init(jax.random.PRNGKey(check_int(seed, "seed")))


# compiled once: op by op, Flax's init of this CNN takes about 3x as long on the CPU (same values)
_init = jax.jit(lambda key: FashionCNN().init(key, jnp.zeros((1, 28, 28), jnp.uint8)))


def make_train_step(tx: optax.GradientTransformation) -> Callable[..., tuple[Any, Any, jax.Array]]:
    """A training step ``step(variables, opt_state, images, labels) -> (variables, opt_state, loss)``
    (jit-compiled behind argument checks).

    ``variables`` is ``{"params", "batch_stats"}``; ``opt_state = tx.init(variables["params"])``;
    ``images (B, 28, 28)`` uint8 or float, ``labels (B,)`` int in ``[0, 10)``; batch norm uses batch
    statistics and updates its running averages. Used by ``examples/train_fashion_mnist.py`` and for
    fine-tuning (e.g. federated rounds) from the shipped weights. Raises InputError for variables
    without ``"params"`` / ``"batch_stats"``, images or labels of another shape or dtype, and concrete
    labels outside ``[0, 10)`` (their loss would be NaN and the next step's weights too).

    Example:
        >>> x, y = load_fashion_mnist("train")                                         # doctest: +SKIP
        >>> tx = optax.adam(1e-3); v = load().params; step = make_train_step(tx)    # doctest: +SKIP
        >>> v, s, loss = step(v, tx.init(v["params"]), x[:64], y[:64])               # doctest: +SKIP
    """
    model = FashionCNN()

    @jax.jit
    def step(variables: Any, opt_state: Any, images: jax.Array, labels: jax.Array) -> tuple[Any, Any, jax.Array]:
        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            logits, updates = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats}, opt_state, loss

    def checked_step(variables: Any, opt_state: Any, images: Any, labels: Any) -> tuple[Any, Any, jax.Array]:
        if not isinstance(variables, Mapping) or not {"params", "batch_stats"} <= set(variables):
            raise InputError('variables must be {"params": ..., "batch_stats": ...} (the model\'s Flax variables)')
        images = check_batch(images, "images", ("B", 28, 28))
        labels = check_batch(labels, "labels", (images.shape[0],), kinds="iu")
        if is_concrete(labels):
            lab = np.asarray(labels)
            if lab.min() < 0 or lab.max() >= _CLASSES:
                raise InputError(f"labels must be class indices in [0, {_CLASSES}), got {lab.min()}..{lab.max()}")
        return step(variables, opt_state, images, labels)

    return checked_step


def load_fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(N, 28, 28) uint8`` and labels ``(N,) int32``; split ``"train"``/``"test"``.

    Example:
        >>> x, y = load_fashion_mnist("test"); x.shape, y.shape
        ((10000, 28, 28), (10000,))
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    img_file = DATA_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lbl_file = DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_file.exists():
        raise InputError(f"{img_file} is missing: run tools/fetch_eval_data.sh")
    with gzip.open(img_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lbl_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)
    return images, labels


@checked_apply(lambda images: check_batch(images, "images", ("B", 28, 28)))
def apply(params: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """Logits ``(B, 10)`` of images ``(B, 28, 28)`` (uint8 or float, 0..255), batch norm in inference mode.
    Raises InputError for another shape (28 x 27 images were silently classified) or dtype.

    Example:
        >>> apply(load().params, load_fashion_mnist("test")[0][:4]).shape
        (4, 10)
    """
    return FashionCNN().apply(params, images, train=False)


def logits(params: Mapping[str, Any], subset: str | int = "ci") -> np.ndarray:
    """Logits ``(n, 10)`` on the first n test images (``"ci"``: 1000, ``"full"``: 10000).

    Example:
        >>> logits(load().params, 4).shape
        (4, 10)
    """
    images = load_fashion_mnist("test")[0]
    n = resolve_subset(subset, CI_SIZE, len(images))
    params = jax.device_put(params)  # once, not once per batch
    return np.concatenate([np.asarray(apply(params, images[s : min(s + 500, n)])) for s in range(0, n, 500)])


def metrics(out: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """``top1``, ``n`` (and ``argmax_agree`` with ``reference``, logits of the same shape) of
    :func:`logits` output ``(n, 10)`` on the first n test images.

    Example:
        >>> y = load_fashion_mnist("test")[1][:100]
        >>> metrics(np.eye(10, dtype=np.float32)[y])                     # perfect logits (100, 10)
        {'top1': 1.0, 'n': 100.0}
        >>> metrics(np.eye(10)[(y + 1) % 10], reference=np.eye(10)[y])  # all wrong
        {'top1': 0.0, 'n': 100.0, 'argmax_agree': 0.0}
    """
    return classification_metrics(out, load_fashion_mnist("test")[1], reference)


def evaluate(params: Mapping[str, Any], subset: str | int = "ci") -> dict[str, float]:
    """Test-set ``top1`` and ``n`` of ``params`` on the first n test images (``"ci"``: 1000, ``"full"``: 10000).

    Example:
        >>> evaluate(load().params)["top1"] > 0.85                      # "ci": the first 1000
        True
    """
    return metrics(logits(params, subset))


def load(weights: str | pathlib.Path = WEIGHTS_PATH) -> EvalModel:
    """The trained Fashion-MNIST CNN as an :class:`EvalModel` (metric: ``top1`` on the test set).

    Example:
        >>> m = load(); m.eval(subset="ci")["top1"] > 0.85
        True
    """
    path = pathlib.Path(weights)
    if not path.exists():
        raise InputError(f"{path} is missing: train it with examples/train_fashion_mnist.py")
    shapes = param_shapes(FashionCNN(), np.zeros((1, 28, 28), np.uint8))  # abstract: nothing runs
    try:
        restored = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise InputError(f"{path}: not a flax msgpack file ({e})") from e
    if not isinstance(restored, dict):
        raise InputError(f"{path}: not a variables dict")
    params = frozen_float32(checked_tree(flatten_paths(restored), shapes, str(path)))
    name_map, to_original, from_original = torch_style_names(params)
    return EvalModel(
        name="fashion_cnn",
        params=params,
        apply=apply,
        evaluate=compare_with_shipped(logits, metrics, params),
        name_map=name_map,
        to_original=to_original,
        from_original=from_original,
    )
