"""Per-layer statistics of a Flax model over calibration batches, traced once per batch shape.

GPTQ's input moments and bias correction's output shifts both run the model under
:func:`flax.linen.intercept_methods` and sum something per layer. Tracing that under ``jit`` is much
faster than running it eagerly, but a jitted ``apply_fn`` hides its layers (so it is unwrapped), and
a model with jitted calls of its own leaks the interceptor's tracers (so it falls back to eager).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from nncjax.errors import InputError


def unwrap_jit(apply_fn: Callable) -> Callable:
    """The function a ``jax.jit`` wrapper traces (its ``__wrapped__``), else ``apply_fn`` itself."""
    return apply_fn.__wrapped__ if hasattr(apply_fn, "lower") and hasattr(apply_fn, "__wrapped__") else apply_fn


def kernel_name(module_path: tuple, names) -> str | None:
    """The flat name (:func:`nncjax.pytree_names.flatten_named`) of the kernel of the module at
    ``module_path``, with or without the ``"params/"`` collection prefix; None if ``names`` has neither."""
    kernel = "/".join((*module_path, "kernel"))
    return next((p + kernel for p in ("params/", "") if p + kernel in names), None)


@functools.cache
def _jit_with_statics(fn: Callable, n_static: int) -> Callable:
    return jax.jit(fn, static_argnums=tuple(range(n_static)))


def batch_means(fn: Callable[..., dict[str, tuple]], statics: tuple, args: tuple, data: Any) -> dict[str, np.ndarray]:
    """Means over ``data`` of what ``fn(*statics, *args, batch) -> {name: (sum array, count)}`` sums.

    ``fn`` is compiled once per batch shape (across calls too, when ``statics`` hash) and summed on
    the host in float64; if tracing leaks a tracer (a jitted call inside the model), it runs eagerly.

    Raises:
      InputError: ``data`` is an empty list.
    """
    batches = data if isinstance(data, list) else [data]
    if not batches:
        raise InputError("data is an empty list")
    try:
        hash(statics)
        compiled = functools.partial(_jit_with_statics(fn, len(statics)), *statics)
    except TypeError:  # e.g. a method of an unhashable object: compiled for this call only
        compiled = jax.jit(functools.partial(fn, *statics))

    def one(batch):
        try:
            return compiled(*args, batch)
        except jax.errors.UnexpectedTracerError:
            with jax.disable_jit():
                return fn(*statics, *args, batch)

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {}
    for batch in batches:
        for name, (total, count) in one(batch).items():
            sums[name] = sums.get(name, 0.0) + np.asarray(total, np.float64)
            counts[name] = counts.get(name, 0.0) + float(count)
    return {n: sums[n] / max(counts[n], 1.0) for n in sums}
