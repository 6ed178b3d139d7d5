"""NNCodec's sparsification of federated-learning updates, reproduced: ``sparsity`` and
``struct_spars_factor`` of its FL client (``nncodec.fl.encode``), on the host.

Before coding a weight update, NNCodec's client

1. zeroes every entry of a weight (a tensor of rank >= 2 with a non-zero entry) below half the
   quantization step of ``qp`` (it would round to 0 anyway);
2. if fewer than ``target_sparsity`` of all the update's entries are then zero, raises a statistics
   threshold ``max(|mu - delta sigma|, |mu + delta sigma|)`` per weight (at least half a step; mean and
   deviation of the step-1 result) over a fixed schedule of ``delta`` (0.25, then steps of 0.2, 0.1,
   0.05, 0.01 as the gap to the target closes) until the target is reached;
3. zeroes, in each weight, the rows whose mean ``|w|`` lies below ``struct_gain`` times the mean of
   its row means (``struct_gain = 0`` skips this).

:func:`sparsify_update` does exactly that, in NNCodec's float arithmetic (float32 statistics, its
float64 thresholds rounded to float32 for the comparison, as NumPy 1.x compares them), so that the
same update gives the same zeros (tested against NNCodec), and the same bitstream after. Rows run
along ``axis`` (0 for NNR / PyTorch layout, as NNCodec's tensors; -1 for Flax kernels).

The jit-able rules behind steps 2 and 3 are :func:`nncjax.reduce.stats_threshold_prune` and
:func:`nncjax.reduce.row_prune_below_mean`; this module adds NNCodec's search and bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nncjax.arguments import check_int, check_real
from nncjax.errors import InputError
from nncjax.pytree_names import flatten_named, unflatten_like
from nncjax.reduce._tree import check_axis
from nncjax.steps import qp_to_step

__all__ = ["sparsify_update"]

_MAX_SEARCH = 501  # NNCodec's cap on the delta schedule


def _threshold(w: np.ndarray, delta: float, half_step: float) -> np.float32:
    """The statistics threshold of one weight as NNCodec computes it: float32 mean and deviation,
    ``delta`` times the deviation in float64, at least ``half_step``; rounded to float32, as NumPy
    1.x compares a float64 scalar with a float32 array."""
    mu, sigma = np.mean(w), np.std(w)
    t = max(abs(np.float64(mu) - delta * np.float64(sigma)), abs(np.float64(mu) + delta * np.float64(sigma)))
    return np.float32(half_step if t < half_step else t)


def _keep_above(w: np.ndarray, t: np.float32) -> np.ndarray:
    return np.where((w >= t) | (w <= -t), w, np.zeros((), w.dtype))


def _zero_fraction(tensors: dict[str, np.ndarray]) -> float:
    zeros = sum(int(np.count_nonzero(a == 0)) for a in tensors.values())
    return zeros / max(1, sum(a.size for a in tensors.values()))


def _rows_below_mean(w: np.ndarray, gain: float, axis: int) -> np.ndarray:
    """``w`` with NNCodec's structured rule applied along ``axis``: of the rows whose mean ``|w|`` is
    below ``gain`` times the mean of the row means, the ``int(fraction * rows)`` smallest are zeroed
    (the float product can lose one of them, as in NNCodec)."""
    rows_first = np.moveaxis(w, axis, 0)
    means = np.array([np.mean(np.abs(r)) for r in rows_first], np.float32)
    below = int(np.count_nonzero(means < np.float32(np.float64(np.mean(means)) * gain)))
    n = int(below / len(means) * len(means))
    order = np.argsort(means / np.abs(means).max())
    out = rows_first.copy()
    out[np.sort(order[:n])] = 0
    return np.moveaxis(out, 0, axis)


def sparsify_update(
    update: Any,
    *,
    qp: int,
    qp_density: int = 2,
    target_sparsity: float = 0.0,
    struct_gain: float = 0.9,
    axis: int = 0,
    select: Callable[[str, Any], bool] | None = None,
) -> tuple[Any, float]:
    """NNCodec's FL-client sparsification of a weight update (module docstring), on the host.

    Args:
      update: a pytree of arrays (the difference to the base model); float leaves of rank >= 2 with
        a non-zero entry are the weights it may zero, every leaf counts in the sparsity. Its
        structure and order are kept (a flat dict's order is the coding order).
      qp, qp_density: the QP whose half step is the smallest threshold (NNCodec's client takes its
        ``qp`` setting here, not the ``diff_qp`` it codes the update at).
      target_sparsity: fraction of zero entries in the whole update to reach in step 2, in ``[0, 1]``;
        0 (or a target the first step already meets) skips the search. The search stops after
        NNCodec's 501 rounds, below the target if the thresholds cannot reach it.
      struct_gain: step 3's factor (NNCodec's ``struct_spars_factor``, default 0.9); 0 skips it.
      axis: the rows' axis in each weight (0: NNR / PyTorch layout; -1: Flax kernels).
      select: optional ``select(name, leaf) -> bool`` narrowing the weights (names as
        :func:`nncjax.pytree_names.flatten_named`); NNCodec leaves its ``*.weight_scaling`` tensors alone.

    Returns:
      ``(sparse_update, sparsity)``: the update with the zeros (same structure, each leaf a NumPy
      array of its dtype) and its fraction of zero entries.

    Raises:
      InputError: a ``qp`` / ``qp_density`` the codec refuses, a ``target_sparsity`` outside
        ``[0, 1]``, a negative or non-finite ``struct_gain``, an ``axis`` a weight does not have,
        NaN or Inf in a weight.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> upd = {"fc.weight": rng.normal(0, 0.01, (64, 32)).astype(np.float32),
      ...        "fc.bias": rng.normal(0, 0.01, 64).astype(np.float32)}
      >>> sparse, s = sparsify_update(upd, qp=-30, target_sparsity=0.6)
      >>> s >= 0.6, bool(np.all(sparse["fc.bias"] == upd["fc.bias"]))      # vectors are kept
      (True, True)
    """
    qp, qp_density = check_int(qp, "qp"), check_int(qp_density, "qp_density", lo=0, hi=7)
    target = check_real(target_sparsity, "target_sparsity", lo=0.0, hi=1.0)
    gain = check_real(struct_gain, "struct_gain", lo=0.0)
    half_step = float(qp_to_step(qp, qp_density)) / 2
    named = {k: np.asarray(v) for k, v in flatten_named(update).items()}
    weights = [k for k, v in named.items()
               if v.ndim >= 2 and np.issubdtype(v.dtype, np.floating) and np.any(v != 0)
               and (select is None or select(k, v))]
    for k in weights:
        check_axis(axis, named[k].ndim)
        if not np.all(np.isfinite(named[k])):
            raise InputError(f"update tensor {k!r} holds NaN or Inf: its statistics are undefined")
    step1 = dict(named, **{k: _keep_above(named[k], np.float32(half_step)) for k in weights})
    out = step1
    if target > 0 and _zero_fraction(step1) < target:
        # every weight entry zero: later rounds cannot change anything (NNCodec runs them anyway)
        ceiling = _zero_fraction(dict(step1, **{k: np.zeros_like(step1[k]) for k in weights}))
        delta, inc = 0.25, 0.2
        for _ in range(_MAX_SEARCH):
            reached = _zero_fraction(out)
            gap = target - reached
            if gap <= 0 or reached >= ceiling:
                break
            inc = 0.01 if gap < 0.05 else 0.05 if gap < 0.10 else 0.10 if gap < 0.30 else inc
            delta += inc
            out = dict(step1, **{k: _keep_above(step1[k], _threshold(step1[k], delta, half_step)) for k in weights})
    if gain > 0:
        out = dict(out, **{k: _rows_below_mean(out[k], gain, axis) for k in weights if np.any(out[k] != 0)})
    return unflatten_like(update, out, lambda name, a, ref: a), _zero_fraction(out)
