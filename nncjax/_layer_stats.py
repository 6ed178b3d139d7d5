"""Per-layer statistics of a Flax model over calibration batches, traced once per batch shape.

GPTQ's input moments and bias correction's output shifts both run the model with its linear layers
intercepted (:func:`run_layers`: Linen by :func:`flax.linen.intercept_methods`, NNX by swapping its
layer classes' ``__call__`` for the run) and sum something per layer (:class:`LayerSums`). Tracing that
under ``jit`` is much faster than running it eagerly, but a jitted ``apply_fn`` hides its layers (so
it is unwrapped), and a model whose tracing leaks a tracer anyway falls back to eager.

A layer inside a Flax lifted transform (``nn.remat``, ``nn.scan``, ``nn.vmap``) or a nested
``jax.jit`` runs in a trace of its own, and a sum computed there cannot leave it through a Python
dict: it goes to the host through an ``io_callback`` instead, once per execution (per scan step,
per vmapped element), which pools exactly what the layer saw. Layers whose kernel the transform maps
(``nn.scan`` / ``nn.vmap`` over ``"params"``: one stacked kernel for several layers) have no
statistic of the kernel's shape and are skipped.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from tqdm.auto import tqdm

from nncjax.arguments import check_flag
from nncjax.errors import InputError


def unwrap_jit(apply_fn: Callable) -> Callable:
    """The function a ``jax.jit`` wrapper traces (its ``__wrapped__``), else ``apply_fn`` itself;
    InputError if ``apply_fn`` is not callable (it would fail inside the traced model run)."""
    if not callable(apply_fn):
        raise InputError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    return apply_fn.__wrapped__ if hasattr(apply_fn, "lower") and hasattr(apply_fn, "__wrapped__") else apply_fn


def kernel_name(module_path: tuple, names) -> str | None:
    """The flat name (:func:`nncjax.pytree_names.flatten_named`) of the kernel of the module at
    ``module_path``, with or without the ``"params/"`` collection prefix; None if ``names`` has neither."""
    kernel = "/".join((*module_path, "kernel"))
    return next((p + kernel for p in ("params/", "") if p + kernel in names), None)


def mapped_kernel(module: Any, kernel: Any) -> bool:
    """Whether the bound Flax Linen ``module`` runs with a slice of ``kernel`` (the array stored under
    its kernel's name) rather than all of it: a lifted ``nn.scan`` / ``nn.vmap`` maps its parameters.
    False for an NNX module (:func:`run_layers` finds its kernel by the array itself)."""
    scope = getattr(module, "scope", None)
    return scope is not None and np.shape(scope.get_variable("params", "kernel")) != np.shape(kernel)


def _nnx_linear() -> tuple[type, ...]:
    try:
        from flax import nnx
    except ImportError:  # a flax without NNX
        return ()
    return nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose


def linear_kind(module: Any) -> str | None:
    """``"dense"`` for a Flax ``Dense`` / ``DenseGeneral`` / ``Einsum`` (Linen) or ``Linear`` /
    ``LinearGeneral`` / ``Einsum`` (NNX), ``"conv"`` for a ``Conv`` / ``ConvTranspose`` of either; else None."""
    import flax.linen as nn

    if isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum)):
        return "dense"
    if isinstance(module, (nn.Conv, nn.ConvTranspose)):
        return "conv"
    nnx_classes = _nnx_linear()
    if isinstance(module, nnx_classes[:3]):
        return "dense"
    return "conv" if isinstance(module, nnx_classes[3:]) else None


def is_linen(module: Any) -> bool:
    """Whether ``module`` is a Flax Linen module (else an NNX one)."""
    import flax.linen as nn

    return isinstance(module, nn.Module)


def has_batch_axes(module: Any) -> bool:
    """Whether a dense layer has batch axes (Linen ``DenseGeneral(batch_dims=...)``, NNX
    ``LinearGeneral(batch_axis=...)``): one kernel slice, and bias, per batch index."""
    return bool(getattr(module, "batch_dims", ()) or getattr(module, "batch_axis", None))


def kernel_shape(module: Any) -> tuple[int, ...]:
    """An ``Einsum``'s kernel shape: Linen's ``shape``, NNX's ``kernel_shape``."""
    return tuple(module.shape if is_linen(module) else module.kernel_shape)


_nnx_patch_lock = threading.RLock()


def run_layers(apply_fn: Callable, params: Any, batch: Any,
               on_layer: Callable[[Callable, Any, tuple, dict, str | None], Any]) -> Any:
    """``apply_fn(params, batch)`` with every call of a linear layer (:func:`linear_kind`) going
    through ``on_layer(call, module, args, kwargs, name)``, which returns the layer's output;
    ``call(*args, **kwargs)`` runs the layer itself and ``name`` is its kernel's flat name in
    ``params`` (:func:`nncjax.pytree_names.flatten_named`), or None where it is not found.

    Linen layers are intercepted by :func:`flax.linen.intercept_methods` and named by module path
    (:func:`kernel_name`). NNX layers have no such hook: their classes' ``__call__`` is replaced for
    the run (under a lock; the originals come back after it), and a layer's kernel is named by
    identity, the very array ``params`` holds, as ``nnx.merge`` hands it to the module."""
    import flax.linen as nn

    from nncjax.pytree_names import flatten_named

    flat = flatten_named(params)
    by_id = {id(v): k for k, v in flat.items()}

    def linen(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or linear_kind(context.module) is None:
            return next_fun(*args, **kwargs)
        return on_layer(next_fun, context.module, args, kwargs, kernel_name(tuple(context.module.path), flat))

    def patched(orig):
        @functools.wraps(orig)
        def call(self, *args, **kwargs):
            kernel = getattr(self, "kernel", None)
            name = by_id.get(id(kernel.get_value())) if hasattr(kernel, "get_value") else None
            return on_layer(functools.partial(orig, self), self, args, kwargs, name)
        return call

    originals = {c: c.__dict__["__call__"] for c in _nnx_linear()}
    with _nnx_patch_lock:
        try:
            for c, f in originals.items():
                c.__call__ = patched(f)
            with nn.intercept_methods(linen):
                return apply_fn(params, batch)
        finally:
            for c, f in originals.items():
                c.__call__ = f


def einsum_letters(module: Any, args: tuple, kwargs: dict) -> tuple[str, str, str]:
    """The ``(input, kernel, output)`` index letters of a ``flax.linen.Einsum`` call with ``args`` /
    ``kwargs``, ellipses expanded as Einsum expands them (its equation may come with the call)."""
    import opt_einsum  # flax's own dependency, and Einsum's parser

    spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 and args[1] else module.einsum_str)
    operands, out, _ = opt_einsum.parser.parse_einsum_input(
        (spec.replace(" ", ""), args[0], jax.ShapeDtypeStruct(kernel_shape(module), jnp.float32)))
    lhs, rhs = operands.split(",")
    return lhs, rhs, out


# io_callback sums of the one batch_means call running (the lock), per name: [float64 sum, count]
_host_lock, _host_add_lock = threading.Lock(), threading.Lock()
_host_sums: dict[str, list] = {}


def _to_host(name: str, total: np.ndarray, count: np.ndarray) -> None:
    with _host_add_lock:  # callbacks may run on several runtime threads
        entry = _host_sums.setdefault(name, [0.0, 0.0])
        entry[0] = entry[0] + np.asarray(total, np.float64)
        entry[1] += float(count)


def _current_trace() -> Any:
    from flax.core import tracers  # flax only where a Flax model is run

    return tracers.current_trace()


class LayerSums:
    """Per-layer ``(sum array, count)`` of one traced model run, what a ``batch_means`` ``fn`` returns.

    Make it where ``fn`` starts (that trace is the one its sums may stay in) and :meth:`add` from
    the interceptor; a sum added in another trace (a lifted transform's) goes to the host.
    """

    def __init__(self) -> None:
        self._outer = _current_trace()
        self.sums: dict[str, tuple] = {}
        self.skipped: dict[str, None] = {}  # names as dict keys: a jitted fn returns them as its output's structure

    def add(self, name: str, total: jax.Array, count: Any) -> None:
        """Adds ``total`` (an array) and ``count`` (a scalar) to layer ``name``'s sums."""
        if _current_trace() == self._outer:
            old_total, old_count = self.sums.get(name, (0.0, 0.0))
            self.sums[name] = (old_total + total, old_count + count)
        else:
            io_callback(functools.partial(_to_host, name), None, total, jnp.asarray(count, jnp.float32))

    def skip(self, name: str) -> None:
        """Marks layer ``name`` as skipped: its kernel is mapped by a lifted transform (:func:`mapped_kernel`)."""
        self.skipped[name] = None

    def result(self) -> tuple[dict[str, tuple], dict[str, None]]:
        """``(sums, skipped)``, what ``fn`` returns."""
        return self.sums, self.skipped


@functools.cache
def _jit_with_statics(fn: Callable, n_static: int) -> Callable:
    return jax.jit(fn, static_argnums=tuple(range(n_static)))


def batch_bar(batches: list, progress: Any, desc: str):
    """``batches`` behind a tqdm bar ``desc`` when ``progress`` (checked to be a bool) and there are several."""
    return tqdm(batches, desc=desc, disable=not check_flag(progress, "progress") or len(batches) < 2, leave=False)


def batch_means(fn: Callable[..., tuple[dict, dict]], statics: tuple, args: tuple,
                data: Any, progress: bool = False, desc: str = "") -> tuple[dict[str, np.ndarray], list[str]]:
    """Means over ``data`` of what ``fn(*statics, *args, batch) -> LayerSums.result()`` sums, and the
    names of the layers it skipped (sorted). ``progress``: a tqdm bar ``desc`` over the batches (from 2 on).

    ``fn`` is compiled once per batch shape (across calls too, when ``statics`` hash) and summed on
    the host in float64; if tracing leaks a tracer, it runs eagerly.

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
    skipped: set[str] = set()
    with _host_lock:
        _host_sums.clear()
        for batch in batch_bar(batches, progress, desc):
            traced, skip = one(batch)
            skipped.update(skip)
            for name, (total, count) in traced.items():
                sums[name] = sums.get(name, 0.0) + np.asarray(total, np.float64)
                counts[name] = counts.get(name, 0.0) + float(count)
        jax.effects_barrier()  # every io_callback has run
        for name, (total, count) in _host_sums.items():
            sums[name] = sums.get(name, 0.0) + total
            counts[name] = counts.get(name, 0.0) + count
        _host_sums.clear()
    return {n: sums[n] / max(counts[n], 1.0) for n in sums}, sorted(skipped)
