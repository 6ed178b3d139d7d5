"""Inference-optimised quantization (IOQ): choosing one QP per tensor for the task, not for MSE.

Two stages, both independent of the entropy coder (the caller supplies the rate):

1. :func:`ioq_initial_qps` — a closed-form starting point from each tensor's size and spread.
2. :func:`ioq_search` — greedy per-tensor QP-offset search minimising ``D + λ·R`` on a tuning set,
   where ``D`` is any task distortion of the quantized model (loss, 1 − accuracy, output MSE) and
   ``R`` the coded size in bits (the real coder's size, or a rate model). :func:`estimate_lambda`
   derives λ from global QP ±1 shifts, as NNCodec's IOQ does.

The initial heuristic. Quantizing with step Δ adds noise of power Δ²/12 per element, and costs about
``log2(σ/Δ)`` bits per element (high-rate approximation). A tensor whose elements each matter less to
the output — typically the large ones, which average many inputs — tolerates more noise, and a tensor
with a wide spread needs a proportionally wider step to keep the same number of levels. Hence

    log2 Δ_i = log2 Δ_base + β · log2(σ_i / σ̄) + α · log2(n_i / n̄)

with σ̄, n̄ the geometric means of the tensors' standard deviations and element counts, α the size
weight and β the spread weight. One octave of Δ is ``2**qp_density`` QP steps, so

    qp_i = base_qp + round(2**qp_density · (β·log2(σ_i/σ̄) + α·log2(n_i/n̄)))

β = 1 gives every tensor the same relative precision, β = 0 the same absolute step (the MSE optimum);
the defaults (α = 0.25, β = 0.5) sit in between and make a 16× larger tensor one octave coarser.
(NNCodec's ``opt_qp`` uses a different rule: ``qp·(1 − share)`` with share = relative size +
0.1·(1 − relative std).) Non-weight tensors (1-D) get ``base_qp − 2·2**qp_density`` (step / 4), the
NNCodec default for biases and BN vectors, unless ``nonweight_qp`` is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp  # noqa: F401 (used by the docstring examples)
import numpy as np
from tqdm.auto import tqdm

from nncjax.arguments import check_int, check_real, is_int
from nncjax.errors import InputError
from nncjax.quantize.uniform import quantize_uniform
from nncjax.reduce._tree import default_weight_select, named_leaves, replace_named
from nncjax.steps import check_qp_density, qp_to_step_jax

__all__ = ["qp_limits", "reconstruct_uniform", "ioq_initial_qps", "ioq_cost", "estimate_lambda", "ioq_search"]

QuantizeFn = Callable[[jax.Array, int], jax.Array]
DistortionFn = Callable[[Any], float]
RateFn = Callable[[str, jax.Array, int], float]


def qp_limits(qp_density: int = 2) -> tuple[int, int]:
    """The QP range a bitstream can carry with ``qp_density``: ``[-2**(5+qpd), 2**(5+qpd) - 1]``.

    >>> qp_limits(2)
    (-128, 127)
    """
    qpd = check_qp_density(qp_density)
    return -(1 << (5 + qpd)), (1 << (5 + qpd)) - 1


def reconstruct_uniform(w: jax.Array, qp: int | jax.Array, qp_density: int = 2) -> jax.Array:
    """Uniform quantize-and-reconstruct as NNCodec does at λ = 0: ``Δ·round_half_away(float32(1/Δ)·w)``.

    ``w``: any shape -> float32 of the same shape. jit-able (``qp`` may be traced). The QP-keyed form of
    :func:`nncjax.quantize.uniform.quantize_uniform` (hard mode), the default ``quantize_fn`` of IOQ.

    >>> reconstruct_uniform(jnp.array([0.3, -0.19]), -8).tolist()   # step 0.25
    [0.25, -0.25]
    """
    return quantize_uniform(w, qp_to_step_jax(qp, qp_density), "hard")[1]


def ioq_initial_qps(
    params: Any,
    base_qp: int,
    *,
    qp_density: int = 2,
    size_weight: float = 0.25,
    spread_weight: float = 0.5,
    nonweight_qp: int | None = None,
    select: Callable[[str, jax.Array], bool] = default_weight_select,
) -> dict[str, int]:
    """Per-tensor starting QPs from size and spread (module docstring). Returns ``{name: qp}`` for
    every leaf, in flatten order; weights (``select``) by the heuristic, the rest ``nonweight_qp``.
    Not jit-able (returns Python ints).

    >>> qps = ioq_initial_qps({"a": jnp.ones((4, 4)) * jnp.arange(4.0), "b": jnp.ones(3)}, -32)
    >>> qps["a"], qps["b"]
    (-32, -40)
    """
    qpd = check_qp_density(qp_density)
    lo, hi = qp_limits(qpd)
    k = 1 << qpd
    base_qp = check_int(base_qp, "base_qp")
    nonweight_qp = None if nonweight_qp is None else check_int(nonweight_qp, "nonweight_qp (or None)")
    size_weight, spread_weight = check_real(size_weight, "size_weight"), check_real(spread_weight, "spread_weight")
    if not callable(select):
        raise InputError("select must be a predicate (name, leaf) -> bool")
    leaves = named_leaves(params)
    weights = {n: np.asarray(v, np.float64) for n, v in leaves.items() if select(n, v)}
    bad = [n for n, v in weights.items() if not np.all(np.isfinite(v))]
    if bad:  # their spread would be NaN, and they silently got the mean one
        raise InputError(f"weights hold NaN or Inf in {bad[:5]}")
    stds = {n: float(np.std(v)) for n, v in weights.items()}
    log_std = {n: math.log2(s) for n, s in stds.items() if s > 0 and math.isfinite(s)}
    log_n = {n: math.log2(max(v.size, 1)) for n, v in weights.items()}
    mean_ls = float(np.mean(list(log_std.values()))) if log_std else 0.0
    mean_ln = float(np.mean(list(log_n.values()))) if log_n else 0.0
    other = int(base_qp) - 2 * k if nonweight_qp is None else int(nonweight_qp)
    out: dict[str, int] = {}
    for n in leaves:
        if n in weights:
            octaves = spread_weight * (log_std.get(n, mean_ls) - mean_ls) + size_weight * (log_n[n] - mean_ln)
            qp = int(base_qp) + np.round(k * octaves)  # clipped as a float: huge weights give inf
        else:
            qp = other
        out[n] = int(np.clip(qp, lo, hi))
    return out


class _Evaluator:
    """Caches reconstructions and rates per (name, qp) and evaluates D + λR for QP assignments."""

    def __init__(self, params: Any, eval_distortion: DistortionFn, rate_bits: RateFn, lam: float,
                 quantize_fn: QuantizeFn | None, qp_density: int):
        for what, fn in (("eval_distortion", eval_distortion), ("rate_bits", rate_bits), ("quantize_fn", quantize_fn)):
            if fn is not None and not callable(fn):
                raise InputError(f"{what} must be callable")
        self.lam = check_real(lam, "lam", lo=0)
        self.params = params
        self.leaves = named_leaves(params)
        self.eval_distortion = eval_distortion
        self.rate_bits = rate_bits
        qpd = check_qp_density(qp_density)
        self.quantize = quantize_fn or jax.jit(lambda w, qp: reconstruct_uniform(w, qp, qpd))
        self._rec: dict[tuple[str, int], jax.Array] = {}
        self._rate: dict[tuple[str, int], float] = {}

    def rec(self, name: str, qp: int) -> jax.Array:
        key = (name, qp)
        if key not in self._rec:
            self._rec[key] = self.quantize(self.leaves[name], qp)
        return self._rec[key]

    def rate(self, name: str, qp: int) -> float:
        key = (name, qp)
        if key not in self._rate:
            bits = self.rate_bits(name, self.leaves[name], qp)
            # a NaN cost would make every comparison of the search false: it would stop where it started
            self._rate[key] = check_real(bits, f"rate_bits({name!r}, .., {qp})")
        return self._rate[key]

    def distortion(self, qps: Mapping[str, int]) -> float:
        d = self.eval_distortion(replace_named(self.params, {n: self.rec(n, q) for n, q in qps.items()}))
        return check_real(d, "eval_distortion")

    def total_rate(self, qps: Mapping[str, int]) -> float:
        return sum(self.rate(n, q) for n, q in qps.items())

    def cost(self, qps: Mapping[str, int]) -> float:
        return self.distortion(qps) + self.lam * self.total_rate(qps)


def _checked_qps(params: Any, qps: Mapping[str, int]) -> dict[str, int]:
    """``qps`` as ``{name: int}`` after checking it maps tensors of ``params`` to integer QPs."""
    if not isinstance(qps, Mapping):
        raise InputError(f"QPs must be a mapping {{name: qp}}, got {type(qps).__name__}")
    unknown = set(qps) - set(named_leaves(params))
    if unknown:
        raise InputError(f"QPs given for tensors not in params: {sorted(unknown)}")
    bad = [n for n, q in qps.items() if not is_int(q)]
    if bad:  # a float QP was truncated toward zero by the quantizer, a NaN one quantized as QP 0
        raise InputError(f"QPs must be integers: {', '.join(f'{n!r}: {qps[n]!r}' for n in bad[:5])}")
    return {n: int(q) for n, q in qps.items()}


def _names_in(names: Iterable[str] | None, qps: Mapping[str, int]) -> list[str]:
    """``names`` (default: every tensor of ``qps``) as a list without repeats, each with a QP in ``qps``."""
    if names is None:
        return list(qps)
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise InputError(f"names must be a list of tensor names, got {names!r}")
    out = list(dict.fromkeys(names))
    missing = [n for n in out if n not in qps]
    if missing:
        raise InputError(f"tensors named in names have no QP: {sorted(map(str, missing))}")
    return out


def ioq_cost(
    params: Any,
    qps: Mapping[str, int],
    eval_distortion: DistortionFn,
    rate_bits: RateFn,
    lam: float,
    *,
    quantize_fn: QuantizeFn | None = None,
    qp_density: int = 2,
) -> float:
    """``D + λ·R`` of ``params`` with the tensors named in ``qps`` quantized at their QP.

    ``eval_distortion(params_hat) -> float``; ``rate_bits(name, tensor, qp) -> bits``;
    ``quantize_fn(w, qp) -> w_hat`` defaults to :func:`reconstruct_uniform`. Unnamed tensors stay float.

    >>> ioq_cost({"w": jnp.ones((2, 2))}, {"w": -8}, lambda p: 0.0, lambda n, w, qp: 8.0, 0.5)
    4.0
    """
    qps = _checked_qps(params, qps)
    return _Evaluator(params, eval_distortion, rate_bits, lam, quantize_fn, qp_density).cost(qps)


def estimate_lambda(
    params: Any,
    qps: Mapping[str, int],
    eval_distortion: DistortionFn,
    rate_bits: RateFn,
    *,
    names: Iterable[str] | None = None,
    quantize_fn: QuantizeFn | None = None,
    qp_density: int = 2,
) -> float:
    """λ from shifting all ``names``' QPs by −1 and +1: the mean of ``−ΔD/ΔR`` over both, at least 0.

    This is the slope of the operational D(R) curve at ``qps`` (NNCodec's IOQ rule, with D a distortion
    instead of an accuracy). ``names`` default to every tensor in ``qps``.

    >>> w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    >>> params, qps = {"w": w}, {"w": -16}
    >>> distortion = lambda p: float(jnp.mean((p["w"] - w) ** 2))              # quantization MSE
    >>> rate = lambda name, t, qp: t.size * max(0.0, 2.05 - qp / 4)           # high-rate model, std 1
    >>> f"{estimate_lambda(params, qps, distortion, rate):.1e}"              # about 2 ln2 D / n
    '1.3e-07'
    """
    qps = _checked_qps(params, qps)
    ev = _Evaluator(params, eval_distortion, rate_bits, 0.0, quantize_fn, qp_density)
    moved = _names_in(names, qps)
    lo, hi = qp_limits(qp_density)
    d0, r0 = ev.distortion(qps), ev.total_rate(qps)
    slopes = []
    for shift in (-1, 1):
        q = dict(qps)
        q.update({n: int(np.clip(qps[n] + shift, lo, hi)) for n in moved})
        dr = ev.total_rate(q) - r0
        if dr != 0:
            slopes.append(-(ev.distortion(q) - d0) / dr)
    return max(float(np.mean(slopes)), 0.0) if slopes else 0.0


def ioq_search(
    params: Any,
    eval_distortion: DistortionFn,
    rate_bits: RateFn,
    lam: float,
    init_qps: Mapping[str, int],
    offsets: Sequence[int] = (-4, -2, -1, 1, 2, 4),
    rounds: int = 2,
    progress: bool = True,
    *,
    quantize_fn: QuantizeFn | None = None,
    qp_density: int = 2,
    names: Iterable[str] | None = None,
) -> dict[str, int]:
    """Greedy per-tensor QP search minimising ``D + λ·R``. Returns ``{name: qp}`` for ``init_qps``' names.

    Tensors are visited largest first (where QP matters most for the rate). For each, every offset
    from its current QP is tried with all other QPs fixed, and the best strictly improving one is kept
    (coordinate descent, so the cost never increases). A round visits every tensor; the search stops
    after ``rounds`` rounds or a round without a change. Only tensors in ``names`` (default: all of
    ``init_qps``) are searched; QPs stay within :func:`qp_limits`.

    ``eval_distortion(params_hat) -> float`` is evaluated on the model with every ``init_qps`` tensor
    quantized; ``rate_bits(name, tensor, qp) -> float`` gets the *original* tensor. Both are called at
    most once per distinct assignment / (name, qp). ``quantize_fn(w, qp) -> w_hat`` defaults to
    :func:`reconstruct_uniform`.

    >>> rng = np.random.default_rng(0)
    >>> params = {"w1": rng.normal(0, 1 / 8, (64, 64)), "w2": rng.normal(0, 1 / 8, (64, 4))}
    >>> x = rng.normal(size=(256, 64)); y = x @ params["w1"] @ params["w2"]
    >>> def loss_on_tuning_set(p):
    ...     return float(jnp.mean((x @ p["w1"] @ p["w2"] - y) ** 2))
    >>> def coded_bits(name, w, qp):                                          # high-rate model
    ...     return w.size * max(0.0, math.log2(float(jnp.std(w))) - qp / 4 + 2.05)
    >>> qps = ioq_search(params, loss_on_tuning_set, coded_bits, lam=1e-6,
    ...                  init_qps=ioq_initial_qps(params, -38), progress=False)
    >>> cost = lambda q: ioq_cost(params, q, loss_on_tuning_set, coded_bits, 1e-6)
    >>> qps, cost(qps) < cost(ioq_initial_qps(params, -38))                  # bits are dear here: coarser
    ({'w1': -28, 'w2': -32}, True)
    """
    init_qps = _checked_qps(params, init_qps)
    rounds = check_int(rounds, "rounds", lo=0)
    if not isinstance(offsets, Iterable) or not all(map(is_int, offsets)):
        raise InputError(f"offsets must be a sequence of integers, got {offsets!r}")
    offsets = [int(o) for o in offsets]
    lo, hi = qp_limits(qp_density)
    ev = _Evaluator(params, eval_distortion, rate_bits, lam, quantize_fn, qp_density)
    qps = {n: int(np.clip(q, lo, hi)) for n, q in init_qps.items()}
    search = _names_in(names, qps)
    search.sort(key=lambda n: -int(np.size(ev.leaves[n])))  # stable: ties keep the given order
    best_cost = ev.cost(qps)
    bar = tqdm(total=rounds * len(search) * len(offsets), desc="IOQ", disable=not progress, leave=False)
    for _ in range(rounds):
        changed = False
        for name in search:
            base = qps[name]
            choice = base
            for off in offsets:
                bar.update(1)
                cand = int(np.clip(base + off, lo, hi))
                if cand == base:
                    continue
                trial = dict(qps)
                trial[name] = cand
                c = ev.cost(trial)
                if c < best_cost:
                    best_cost, choice = c, cand
            if choice != base:
                qps[name] = choice
                changed = True
            bar.set_postfix(cost=f"{best_cost:.6g}")
        if not changed:
            break
    bar.close()
    return qps
