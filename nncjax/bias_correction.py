"""Bias correction after quantization: each layer's mean output shift moved into a bias (``nncjax.bias_correction``).

Quantization errors of a layer's weights do not average out over its inputs when the inputs have a
large mean (after a ReLU they are all positive): ``E[(W_hat - W) x] = (W_hat - W) E[x]`` shifts every
output channel by a constant, and the next layers see a biased signal. Measuring that shift on a few
calibration batches and subtracting it from a bias the codec already codes at a fine QP (the layer's
own bias, or the mean of the batch norm that follows it) removes it for next to no bits (Nagel et
al., "Data-Free Quantization", ICCV 2019, correct it analytically; here it is measured, so any
layer type and any input statistics work).

The shift of each layer is measured on the float model's own activations (each layer in isolation,
as GPTQ fits them), from the weights the decoder will reconstruct with the given settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from nncjax._layer_stats import (
    LayerSums,
    batch_means,
    einsum_letters,
    has_batch_axes,
    is_linen,
    mapped_kernel,
    run_layers,
    unwrap_jit,
)
from nncjax.coded_tensor import code_tensor, codec_reconstruct
from nncjax.errors import InputError, UnsupportedError
from nncjax.pytree_names import flatten_named, is_kernel_name
from nncjax.rd_settings import LS_SUFFIX, RDSettings
from nncjax.reduce._tree import replace_named
from nncjax.reduce.bnfold import as_bn_pairs

__all__ = ["decoded_params", "output_shifts", "with_bias_correction"]


def decoded_params(params: Any, settings: RDSettings) -> Any:
    """What decoding ``encode(settings.params_for_encoding(params), **settings.encode_kwargs())``
    gives for every optimised weight (codec quantizer, local scales applied; no coding), with the
    other leaves of ``params`` as they are (they are coded at fine QPs). Same structure as ``params``.

    >>> import nncjax, nncjax.models
    >>> from nncjax.models.digits_mlp import load_digits_split
    >>> m = nncjax.models.get("digits_mlp"); params, x = m.params, load_digits_split("train")[0][:256]
    >>> rd = nncjax.optimize(params, m.apply, x, lam=3e-3, init="sensitivity", steps=0, progress=False)
    >>> p_hat = decoded_params(params, rd)
    >>> data = nncjax.encode(rd.params_for_encoding(params), **rd.encode_kwargs())
    >>> decoded = nncjax.decode(data, like=params)
    >>> [bool(np.array_equal(p_hat["params"][k]["kernel"], decoded["params"][k]["kernel"])) for k in ("fc1", "fc2")]
    [True, True]
    """
    if not isinstance(settings, RDSettings):
        raise InputError("settings must be the RDSettings returned by nncjax.optimize")
    flat = settings.params_for_encoding(params)
    for name, qp in settings.qp_overrides.items():
        if not name.endswith(LS_SUFFIX) and name in flat:
            flat[name] = codec_reconstruct(flat[name], qp, qp_density=settings.qp_density,
                                           dq=settings.dq_overrides.get(name, settings.dq))
    return settings.restore(flat, like=params)


def _per_output(module: Any, d: jnp.ndarray, args: tuple, kwargs: dict) -> jnp.ndarray | None:
    """A linear layer's output differences ``d`` as float32 ``(positions, *bias shape)``: the
    trailing feature axes of a dense layer (one, or ``DenseGeneral``'s ``features`` / NNX
    ``LinearGeneral``'s ``out_features``), a convolution's channels; an ``Einsum``'s output axes its
    kernel has, wherever they are. None for a layer with batch axes (its bias is per batch index too)."""
    if hasattr(module, "einsum_str"):
        _, rhs, out = einsum_letters(module, args, kwargs)
        kept = [i for i, c in enumerate(out) if c in rhs]
        d = jnp.moveaxis(d, kept, tuple(range(d.ndim - len(kept), d.ndim)))
        n_out = len(kept)
    elif has_batch_axes(module):
        return None
    else:
        features = getattr(module, "features", getattr(module, "out_features", None))
        n_out = len(features) if isinstance(features, Sequence) else 1
    return d.reshape(-1, *d.shape[d.ndim - n_out:]).astype(jnp.float32)


def _rerun(call: Callable, module: Any, args: tuple, kwargs: dict, name: str, hat: dict) -> Any:
    """The layer's output with its decoded variables ``hat`` (its kernel ``name`` and, where
    ``hat`` has it, its bias): a Linen layer re-applied alone, an NNX layer's variables swapped for
    the call and back."""
    layer = name.rsplit("/", 1)[0]
    own = {k.rsplit("/", 1)[-1]: v for k, v in hat.items() if k.rsplit("/", 1)[0] == layer}
    if is_linen(module):
        return module.clone(parent=None).apply({"params": own}, *args, **kwargs)
    swapped = {k: getattr(module, k) for k in own if hasattr(getattr(module, k, None), "set_value")}
    before = {k: v.get_value() for k, v in swapped.items()}
    try:
        for k, v in swapped.items():
            v.set_value(own[k])
        return call(*args, **kwargs)
    finally:
        for k, v in swapped.items():
            v.set_value(before[k])


def _layer_shifts(apply_fn: Callable, names: frozenset, params: Any, params_hat: Any,
                  batch: Any) -> tuple[dict[str, tuple], dict[str, None]]:
    """``{kernel name: (sum over positions of y - y_hat (channels,), positions)}`` for one batch, and
    the layers skipped (:class:`nncjax._layer_stats.LayerSums`); each linear layer
    (:func:`nncjax._layer_stats.run_layers`) gets the float model's input and runs with its float
    and its decoded kernel."""
    hat = flatten_named(params_hat)
    out = LayerSums()
    busy = []  # the Linen layer re-applied with the decoded kernel must not be intercepted itself

    def on_layer(call, mod, args, kwargs, name):
        if busy or name not in names:
            return call(*args, **kwargs)
        y = call(*args, **kwargs)
        if mapped_kernel(mod, hat[name]):  # a stacked kernel does not fit the layer re-applied alone
            out.skip(name)
            return y
        busy.append(True)
        try:
            y_hat = _rerun(call, mod, args, kwargs, name, hat)
        finally:
            busy.pop()
        d = _per_output(mod, y - y_hat, args, kwargs)
        if d is not None:
            out.add(name, jnp.sum(d, 0), d.shape[0])
        return y

    run_layers(apply_fn, params, batch, on_layer)
    return out.result()


def output_shifts(apply_fn: Callable[[Any, Any], Any], params: Any, params_hat: Any, data: Any) -> dict[str, np.ndarray]:
    """Mean output shift ``E[y - y_hat]`` per bias entry of every Flax ``Dense``, ``DenseGeneral``,
    ``Einsum``, ``Conv`` or ``ConvTranspose`` layer (Linen, or their NNX counterparts) whose kernel
    differs between ``params`` and ``params_hat``, on the float model's activations (layers with batch
    axes, ``batch_dims`` / ``batch_axis``, are left out).

    Layers inside Flax lifted transforms count as they run: under ``nn.remat`` / ``nn.checkpoint``
    exactly as without it, under ``nn.scan`` / ``nn.vmap`` with broadcast parameters pooled over the
    steps or elements. A layer whose kernel the transform maps (``variable_axes={"params": 0}``:
    one stacked ``(L, ...)`` kernel for ``L`` layers) is left out: it cannot be re-applied alone
    with its kernel, and one shift per stacked slice is not measured.

    Args:
      apply_fn: ``apply_fn(params, batch)`` running a Flax model, Linen or NNX (a ``jax.jit``-wrapped
        one is unwrapped, or its Linen layers would hide behind the compiled call).
      params, params_hat: the float parameters and the decoded ones (same structure).
      data: one batch or a list of batches.

    Returns:
      ``{kernel name: float64 array of the layer's bias shape}``: ``(output channels,)``, or e.g.
      ``(heads, d)`` for attention's q / k / v projections.

    Raises:
      InputError: empty ``data``.
      UnsupportedError: every changed kernel the model used is mapped by ``nn.scan`` / ``nn.vmap``
        (the message names them).

    Example:
      >>> import flax.linen as nn
      >>> import jax
      >>> model = nn.Dense(2)
      >>> v = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
      >>> v_hat = jax.tree_util.tree_map(lambda k: k + 0.5, v)    # a biased "quantization" (kernel and bias)
      >>> shift = output_shifts(model.apply, v, v_hat, jnp.ones((4, 3)))
      >>> np.round(shift["params/kernel"], 3).tolist()           # 3 inputs of 1 and the bias, each 0.5 off
      [-2.0, -2.0]
    """
    flat, flat_hat = flatten_named(params), flatten_named(params_hat)
    names = frozenset(n for n, v in flat.items() if is_kernel_name(n) and n in flat_hat
                      and not np.array_equal(np.asarray(v), np.asarray(flat_hat[n])))
    shifts, skipped = batch_means(_layer_shifts, (unwrap_jit(apply_fn), names), (params, params_hat), data)
    if skipped and not shifts:
        raise UnsupportedError(f"every changed layer's kernel is mapped by a lifted transform (nn.scan / nn.vmap "
                               f"over 'params': one stacked kernel for several layers): {skipped}")
    return shifts


def with_bias_correction(params: Any, settings: RDSettings, apply_fn: Callable[[Any, Any], Any], data: Any, *,
                         bn_pairs: Sequence[tuple[tuple[str, ...], tuple[str, ...]]] = (),
                         reference: Any = None) -> tuple[Any, RDSettings]:
    """Moves each quantized layer's mean output shift into a bias the bitstream already carries.

    For every optimised kernel of a linear layer, the shift ``E[y - y_hat]`` (:func:`output_shifts`:
    ``y`` from ``reference``, ``y_hat`` from the weights :func:`decoded_params` gives for ``params``,
    on ``data``) is added to the layer's own
    bias; a layer without one that feeds a batch norm (``bn_pairs``) has it subtracted from that batch
    norm's running mean instead (``BN(y_hat + shift)`` in the batch norm's own parameters). Layers
    with neither are left alone, and so are layers whose kernel a lifted ``nn.scan`` / ``nn.vmap``
    maps (stacked over layers, see :func:`output_shifts`); ``nn.remat`` layers are corrected as
    without it. Biases and batch-norm statistics are coded at the fine non-weight QP, so the
    correction costs a few bits.

    Args:
      params: model variables ``settings`` codes (``{"params", "batch_stats", ...}``), e.g. from
        :func:`nncjax.with_error_feedback`.
      settings: from :func:`nncjax.optimize` (or :func:`nncjax.with_error_feedback`).
      apply_fn: ``apply_fn(params, batch)`` running the Flax model.
      data: calibration batch or list of batches (e.g. ``optimize``'s own).
      bn_pairs: ``[((layer path...), (batch norm path...)), ...]`` as for :func:`nncjax.optimize_ioq`,
        e.g. ``[(("conv1",), ("bn1",))]``: the batch norm each bias-free layer feeds.
      reference: the float model whose layer outputs are the target (default ``params``); pass the
        original model when ``params`` already holds quantized kernels (after
        :func:`nncjax.with_error_feedback` or :func:`nncjax.with_fine_tuning`), whose shifts would
        otherwise be measured against themselves, i.e. as zero.

    Returns:
      ``(params_corrected, settings)``: ``params`` with the corrected biases / running means (encode
      them with ``settings`` as before) and ``settings`` with ``estimated_bits`` updated.

    Raises:
      InputError: ``settings`` not from :func:`nncjax.optimize`, ``bn_pairs`` not a list of
        ``(layer path, batch norm path)`` pairs or an entry naming no batch-norm mean, a shift that
        does not fit its bias, or a shift that is not finite (NaN or Inf in ``data`` or the
        activations).
      UnsupportedError: every optimised kernel the model used is mapped by ``nn.scan`` /
        ``nn.vmap``, so nothing can be corrected.

    Example:
      >>> import nncjax, nncjax.models
      >>> from nncjax.models.digits_mlp import load_digits_split
      >>> m = nncjax.models.get("digits_mlp"); v, x_tune = m.params, load_digits_split("train")[0][:256]
      >>> rd = nncjax.optimize(v, m.apply, x_tune, lam=3e-3, init="sensitivity", steps=0, progress=False)
      >>> v_bc, rd_bc = with_bias_correction(v, rd, m.apply, x_tune)   # a CNN: bn_pairs=[(("conv1",), ("bn1",))]
      >>> v_hat = nncjax.decode(nncjax.encode(rd_bc.params_for_encoding(v_bc), **rd_bc.encode_kwargs()), like=v)
      >>> def shift(p):                                                 # largest mean output shift
      ...     return float(np.abs((m.apply(p, x_tune) - m.apply(v, x_tune)).mean(0)).max())
      >>> shift(v_hat) < 0.5 * shift(nncjax.verify(v, rd).params)      # vs. decoded without the correction
      True
    """
    if not isinstance(settings, RDSettings):
        raise InputError("settings must be the RDSettings returned by nncjax.optimize")
    named = flatten_named(params)
    # explicit pairs only (no optimize_ioq "auto")
    pairs = as_bn_pairs(bn_pairs, "bn_pairs must be [(layer_path, bn_path), ...], e.g. [(('conv1',), ('bn1',))]")
    bn_of = {}
    for layer, bn in pairs:
        mean = next((p + "/".join(bn) + "/mean" for p in ("batch_stats/", "") if p + "/".join(bn) + "/mean" in named),
                    None)
        if mean is None:
            raise InputError(f"bn_pairs: no batch-norm mean at {'/'.join(bn)!r}")
        bn_of["/".join(layer)] = mean
    shifts = output_shifts(apply_fn, params if reference is None else reference, decoded_params(params, settings),
                           data)
    updates = {}
    for kernel, shift in shifts.items():
        if not np.all(np.isfinite(shift)):
            raise InputError(f"{kernel!r}: its output shift on data is not finite (NaN or Inf in the data or "
                             "the activations)")
        layer = kernel.rsplit("/", 1)[0]
        if layer + "/bias" in named:
            target, sign = layer + "/bias", 1.0
        else:
            target = bn_of.get(layer.split("/", 1)[1] if layer.startswith("params/") else layer)
            sign = -1.0  # BN(y_hat + s) = BN with its mean lowered by s
            if target is None:
                continue
        old = np.asarray(named[target])
        if old.shape != shift.shape:
            raise InputError(f"{kernel!r}: output shift of shape {shift.shape} does not fit {target!r} {old.shape}")
        updates[target] = (old + sign * shift).astype(old.dtype)
    bits = settings.estimated_bits
    for target, new in updates.items():  # a non-weight tensor: coded at its override or the non-weight QP
        qp = settings.qp_overrides.get(target, settings.nonweight_qp)
        kw = {"qp_density": settings.qp_density, "dq": settings.dq}
        bits += code_tensor(new, qp, **kw)[1] - code_tensor(np.asarray(named[target]), qp, **kw)[1]
    return (replace_named(params, {n: jnp.asarray(v) for n, v in updates.items()}),
            dataclasses.replace(settings, estimated_bits=float(bits)))
