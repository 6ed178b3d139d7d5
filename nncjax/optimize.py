"""Gradient-based rate-distortion optimisation of per-tensor QPs and local scales (``nncjax.optimize``).

:func:`optimize` learns, for every selected weight tensor, a continuous QP ``q`` (step
:func:`~nncjax.steps.qp_to_step_continuous`) and optionally a vector of per-output-row *local scales*,
by minimising with optax

    L = D(params_hat) + lam * R_bits / n_weights

where ``params_hat`` is the model quantized with the straight-through (or noise) relaxation of the
codec's quantizer (:mod:`nncjax.quantize`), ``R_bits`` the differentiable DeepCABAC rate model
(:func:`nncjax.rate.estimate_bits`, ``training=True``) summed over the optimised tensors, and
``n_weights`` their number of elements (so ``lam`` prices *bits per weight*). ``D`` is by default the
relative MSE between the original and the quantized model's outputs on ``data`` (no labels needed),
or ``"kl"``, or any ``loss(params, batch)``. One optimisation step is one ``jax.jit``-compiled
function; parameters may be sharded over a mesh (the step follows their shardings). At the end QPs
are rounded to integers and, optionally, refined by a small coordinate search (``qp +- 1`` on the
largest tensors) with the codec's own quantizer and the real DeepCABAC coder.

Local scales. A scaled tensor ``W`` is coded as the standard's local scaling: one NNR_PT_BLOCK
unit holding ``W / s`` in NNR layout (rows first) at the tensor's QP and ``LS = s`` (name
``"<name>_scaling"``, NNCodec's, QP ``scale_qp``). Rows are a Flax kernel's output (last) axis,
coded transposed (:func:`nncjax.reduce.flax_to_nnr`), and axis 0 of every other tensor. The decoder
reconstructs ``W_hat = LS_hat * Q(W / s)``, so a scale is a per-row refinement of the step *and* a
per-row gain. ``s`` is quantized during training with the codec's quantizer at ``scale_qp``, so
what is optimised is exactly what is decoded. :meth:`RDSettings.params_for_encoding` produces the
tensors, ``nncjax.decode(data, like=params)`` gives the ready model back, and :func:`nncjax.verify` runs
the whole encode -> bytes -> decode -> evaluate path.

Example (``steps=0`` with ``init="sensitivity"``: the closed-form start alone; e.g. ``steps=100`` trains on
from it, after compiling the training step):
    >>> import nncjax.models
    >>> m = nncjax.models.get("digits_mlp")
    >>> x = nncjax.models.digits_mlp.load_digits_split("train")[0][:256]
    >>> rd = optimize(m.params, m.apply, x, lam=3e-3, init="sensitivity", steps=0, progress=False)
    >>> data = nncjax.encode(rd.params_for_encoding(m.params), **rd.encode_kwargs())
    >>> params_hat = nncjax.decode(data, like=m.params)
    >>> m.eval(params_hat)["top1"] > 0.95, len(data) < 0.2 * 4 * m.num_params   # under 1/5 of float32
    (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nncjax.arguments import check_flag, check_int, check_real, is_int
from nncjax.coded_tensor import code_tensor, levels_bits, qp_delta_bits
from nncjax.distortion import (
    apply_model,
    batch_distortion,
    check_finite_outputs,
    distortion_fn,
)
from nncjax.error_feedback import with_error_feedback
from nncjax.errors import InputError
from nncjax.ioq import qp_limits
from nncjax.pytree_names import flatten_named
from nncjax.quantize.dq import quantize_dq
from nncjax.quantize.reference import quantize_tensor, reconstruct
from nncjax.quantize.uniform import quantize_uniform
from nncjax.rate import estimate_bits
from nncjax.rd_settings import (
    LS_SUFFIX,
    RDSettings,
    VerifyResult,
    divide_rows,
    from_rows_first,
    multiply_rows,
    row_shape,
    rows_axis,
    to_rows_first,
    verify,
)
from nncjax.reduce._tree import (
    default_weight_select,
    named_leaves,
    replace_named,
    select_float_names,
)
from nncjax.sensitivity import (
    allocate_steps,
    output_sensitivity,
    rows_exercised,
    spread_over_rows,
)
from nncjax.steps import (
    check_qp_density,
    equivalent_qp,
    qp_to_step,
    qp_to_step_continuous,
    qp_to_step_jax,
)

# RDSettings, rows_axis, verify and with_error_feedback were defined here before they got modules of
# their own; importing them from here keeps working.
__all__ = ["LS_SUFFIX", "RDSettings", "VerifyResult", "check_lam", "optimize", "rows_axis", "verify",
           "with_error_feedback"]

_MODES = ("ste", "noise")
_DISTORTIONS = ("output", "kl")
_INITS = ("base", "sensitivity")
#: One instance, so that repeated calls hit the compilation cache of the training step.
_DEFAULT_OPTIMIZER = optax.adam(0.2)


# ------------------------------------------------------------------------------------------------
# the differentiable model of the codec


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of the compiled functions (hashable)."""

    names: tuple[str, ...]          # optimised tensors, largest first
    scaled: tuple[bool, ...]        # which of them carry local scales
    axes: tuple[int, ...]           # their rows axes (:func:`rows_axis`)
    qp_density: int
    dq: bool
    mode: str
    scale_qp: int
    lo: int
    hi: int
    rate_sample: int | None  # elements per tensor the training rate model sees (None: all)


def _quantizer(dq: bool):
    return quantize_dq if dq else quantize_uniform


def _quantize_tensor(cfg: _Config, axis: int, w: jax.Array, qp: jax.Array, v: jax.Array | None,
                     rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """One tensor through the relaxed codec: ``(w_hat (shape of w), estimated bits ())``.

    ``qp``: float32 () (continuous step). ``v``: local scales as offsets from 1 in units of the scale
    step, ``(rows,)`` along ``axis``, or None. ``w_hat = s * Q(w / s)`` with ``s = Q(1 + step_s * v)``
    at ``scale_qp``, the LS tensor the codec writes.
    """
    quant = _quantizer(cfg.dq)
    bits = jnp.float32(0.0)
    s = None
    x = w
    if v is not None:
        step_s = qp_to_step_jax(cfg.scale_qp, cfg.qp_density)
        ls = _scale_of(v, step_s)
        _, ls_hat = quant(ls, step_s, cfg.mode, rng=rng)
        s = ls_hat.reshape(row_shape(w.ndim, axis))
        x = w / s
        bits = bits + estimate_bits(ls, jnp.int32(cfg.scale_qp), dq=cfg.dq, qp_density=cfg.qp_density,
                                    training=True)
    step = qp_to_step_continuous(qp, cfg.qp_density)
    _, x_hat = quant(x, step, cfg.mode, rng=rng)
    sample, factor = _rate_sample(x, cfg.rate_sample)
    bits = bits + factor * estimate_bits(sample, qp, dq=cfg.dq, qp_density=cfg.qp_density, training=True)
    return (x_hat if s is None else x_hat * s), bits


_RUN = 256  # length of the contiguous runs the rate model samples


def _rate_sample(x: jax.Array, limit: int | None) -> tuple[jax.Array, float]:
    """At most ``limit`` elements of ``x`` for the rate model, and the factor to scale its bits by.

    Evenly spaced runs of 256 consecutive elements (scan order), stacked as rows ``(runs, 256)``:
    runs keep the neighbour contexts and the DQ state sequence realistic, and the bits of a
    tensor's elements are additive up to small per-tensor constants, so ``factor * bits(sample)``
    estimates ``bits(x)`` (and its gradient) at a fraction of the cost for big tensors.
    """
    n = int(np.prod(x.shape))
    if limit is None or n <= limit:
        return x, 1.0
    total = n // _RUN
    runs = max(1, min(total, limit // _RUN))
    idx = (np.arange(runs, dtype=np.int64) * total) // runs
    sample = x.reshape(-1)[: total * _RUN].reshape(total, _RUN)[idx]
    return sample, n / (runs * _RUN)


def _row_sample(x: np.ndarray, limit: int | None) -> tuple[np.ndarray, float]:
    """Evenly spaced whole rows (axis 0) of ``x`` with at most ``limit`` elements (at least one row),
    and the factor to scale their bits by. Whole rows keep the coder's row skipping as it is on
    the whole tensor (a run sample would not)."""
    if limit is None or x.size <= limit:
        return x, 1.0
    rows = x.shape[0]
    k = max(1, min(rows, limit // (x.size // rows)))
    return x[(np.arange(k) * rows) // k], rows / k


def _model_hat(cfg: _Config, theta: dict, base: Any, weights: dict, rng: jax.Array | None):
    """``(params_hat, bits (n,))``: ``base`` (fixed tensors already quantized) with the optimised
    weights quantized (relaxed) at ``theta["qp"] (n,)`` with scales ``theta["ls"]``.

    Tensors of one shape (and scaling) go through one ``vmap``-ed quantizer and rate model: a
    transformer's layers share a handful of shapes, so the compiled step holds a few trellis scans
    instead of one per tensor (compile time and kernel launches shrink by the number of layers).
    """
    groups: dict[tuple, list[int]] = {}
    for i, name in enumerate(cfg.names):
        groups.setdefault((jnp.shape(weights[name]), cfg.scaled[i], cfg.axes[i]), []).append(i)
    new, bits = {}, [None] * len(cfg.names)
    for (_, scaled, axis), idx in groups.items():
        members = [cfg.names[i] for i in idx]
        w = jnp.stack([weights[n] for n in members])
        qp = theta["qp"][np.asarray(idx)]
        v = jnp.stack([theta["ls"][n] for n in members]) if scaled else None
        keys = None if rng is None else jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(idx))
        w_hat, b = jax.vmap(functools.partial(_quantize_tensor, cfg, axis),
                            in_axes=(0, 0, 0 if scaled else None, 0 if rng is not None else None))(w, qp, v, keys)
        for j, (i, n) in enumerate(zip(idx, members)):
            new[n], bits[i] = w_hat[j], b[j]
    return replace_named(base, new), jnp.stack(bits)


def check_lam(lam: Any) -> float:
    """``lam`` as a float, after checking that it is a real, finite number >= 0 (a Python, NumPy or
    0-d JAX scalar); raises InputError otherwise.

    >>> check_lam(np.float32(0.5)), check_lam(jnp.asarray(2))
    (0.5, 2.0)
    """
    return check_real(lam, "lam", lo=0)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "apply_fn", "loss", "distortion"))
def _train_step(theta, opt_state, base, weights, batch, ref, rng, lam_n, *, cfg, optimizer, apply_fn, loss,
                distortion):
    """One optimiser step on ``D + lam_n * bits``; returns ``(theta, opt_state, [loss, D, bits])``."""
    dist = distortion_fn(apply_fn, loss, distortion)

    def objective(th):
        p_hat, bits = _model_hat(cfg, th, base, weights, rng if cfg.mode == "noise" else None)
        d = dist(p_hat, batch, ref)
        r = jnp.sum(bits)
        return d + lam_n * r, (d, r)

    (total, (d, r)), g = jax.value_and_grad(objective, has_aux=True)(theta)
    upd, opt_state = optimizer.update(g, opt_state, theta)
    theta = optax.apply_updates(theta, upd)
    theta = {"qp": jnp.clip(theta["qp"], cfg.lo, cfg.hi), "ls": theta["ls"]}
    return theta, opt_state, jnp.stack([total, d, r])


# ------------------------------------------------------------------------------------------------
# public API


def _check_args(lam, steps, mode, distortion, loss, refine, qp_density, scale_axis, init, init_qps, probes,
                max_scale_ratio):
    check_lam(lam)
    check_int(steps, "steps", lo=0)
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    if loss is None and distortion not in _DISTORTIONS:
        raise InputError(f"distortion must be one of {_DISTORTIONS} (or pass loss=), got {distortion!r}")
    if loss is not None and not callable(loss):
        raise InputError("loss must be a callable loss(params, batch) -> scalar")
    check_int(refine, "refine", lo=0)
    check_int(scale_axis, "scale_axis (-1: Flax kernels' output axis, 0: rows first)", lo=-1, hi=0)
    if init not in _INITS:
        raise InputError(f"init must be one of {_INITS}, got {init!r}")
    if init == "sensitivity":
        if loss is not None or distortion != "output":
            raise InputError("init='sensitivity' models the output distortion: use distortion='output' without loss=")
        if init_qps:
            raise InputError("init='sensitivity' chooses the starting QPs itself: pass init_qps only with init='base'")
        if float(lam) <= 0:
            raise InputError("init='sensitivity' needs lam > 0")
        check_int(probes, "probes", lo=1)
        check_real(max_scale_ratio, "max_scale_ratio", lo=1)
    check_qp_density(qp_density)


def _fixed_qp(leaf, qp: int, nonweight_qp: int) -> int:
    return qp if jnp.ndim(leaf) > 1 else nonweight_qp


#: Defaults of base_qp, nonweight_qp and scale_qp at qp_density 2 (NNCodec's density): steps 2**-8,
#: 2**-18.75 and 2**-6. At another density a default is the QP of that step (:func:`equivalent_qp`),
#: not the same number: -24 at qp_density 5 would be a step of 0.6 for scales around 1.
DEFAULT_QPS = {"base_qp": -32, "nonweight_qp": -75, "scale_qp": -24}


def default_qp(what: str, qp_density: int) -> int:
    """The default ``what`` (a key of :data:`DEFAULT_QPS`) at ``qp_density``: the QP of its step there.

    >>> default_qp("nonweight_qp", 3), default_qp("base_qp", 2)
    (-150, -32)
    """
    return int(equivalent_qp(DEFAULT_QPS[what], qp_density))


# A scale is kept at least this many scale steps above 0: one that decoded to 0 would divide its row
# by zero (a coarse scale_qp, or training pushing a scale down).
_MIN_SCALE_STEPS = 4


def _floored(s, step_s):
    """Scales ``s`` (any shape, numpy or JAX) kept at least ``_MIN_SCALE_STEPS`` scale steps above 0."""
    return jnp.maximum(s, _MIN_SCALE_STEPS * step_s)


def _scale_of(v, step_s):
    """The scale ``1 + step_s * v`` of scale offsets ``v`` (any shape), floored (:func:`_floored`)."""
    return _floored(1.0 + step_s * v, step_s)


def _check_decoded_scales(name: str, s: np.ndarray, scale_qp: int, step_s: float) -> None:
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise InputError(f"local scales of {name!r} decode to {float(np.min(s)):.4g} at scale_qp {scale_qp} (step "
                         f"{step_s:.4g}): use a finer scale_qp")


def optimize(
    params: Any,
    apply_fn: Callable[[Any, Any], Any] | None,
    data: Any,
    loss: Callable[[Any, Any], jax.Array] | None = None,
    *,
    lam: float,
    base_qp: int | None = None,
    qp_density: int = 2,
    dq: bool = True,
    nonweight_qp: int | None = None,
    steps: int = 200,
    optimizer: optax.GradientTransformation | None = None,
    learn_scales: bool = True,
    scale_axis: int = -1,
    scale_qp: int | None = None,
    select: Callable[[str, Any], bool] | Any = default_weight_select,
    init_qps: Mapping[str, int] | None = None,
    init: str = "base",
    probes: int = 4,
    max_scale_ratio: float = 4.0,
    row_usage: Mapping[str, Any] | None = None,
    rate_sample: int | None = 1 << 16,
    distortion: str = "output",
    mode: str = "ste",
    refine: int = 3,
    seed: int = 0,
    param_sharding: Any = None,
    data_sharding: Any = None,
    progress: bool = True,
) -> RDSettings:
    """Learns per-tensor QPs (and local scales) minimising ``D + lam * R_bits / n_weights`` by gradient.

    Args:
      params: model parameters, any pytree of arrays (e.g. Flax variables), possibly sharded.
      apply_fn: ``apply_fn(params, batch) -> outputs`` (pytree of arrays); needed for the output
        distortions, may be None with ``loss``.
      data: one batch (a pytree of arrays, passed to ``apply_fn`` / ``loss`` as is) or a ``list`` of
        batches, cycled over the steps.
      loss: optional ``loss(params, batch) -> scalar`` task distortion of the quantized model;
        replaces ``distortion``.
      lam: price of one bit per optimised weight (``R_bits / n_weights``) in units of ``D``.
      base_qp, qp_density, nonweight_qp, dq: the codec settings (as :func:`nncjax.encode`); tensors
        not optimised are quantized (hard) as the codec would with them. ``base_qp`` is also the
        starting QP of the optimised tensors unless ``init_qps`` gives one. Defaults: -32 and -75
        (NNCodec's non-weight QP) at ``qp_density=2``, i.e. steps 2**-8 and 2**-18.75; at another
        density the QPs of those steps (-64 and -150 at 3). ``nonweight_qp=0``: ``base_qp - (2 <<
        qp_density)``, as :func:`nncjax.encode` does when given no non-weight QP.
      steps: optimisation steps. optimizer: any optax transformation (default ``optax.adam(0.2)``:
        QPs and scale deltas are both in quantizer units, so one learning rate fits both).
      learn_scales: learn per-output-row local scales of every optimised tensor with ``ndim >= 2``.
      scale_axis: -1 (Flax): kernels are scaled along their output (last) axis and coded transposed,
        rows first; other tensors (e.g. embeddings) along axis 0. 0: every tensor along axis 0
        (PyTorch / NNR layout). See :func:`rows_axis`.
      scale_qp: QP of the coded scales (default: step 1/64, QP -24 at ``qp_density=2``; at most a
        step of 1/8). A scale stays at least 4 such steps above 0 (one decoded as 0 would divide its
        row by zero).
      select: predicate ``(name, leaf) -> bool`` or a list of names of the tensors to optimise
        (default: float tensors with ``ndim > 1``, NNCodec's "weights"). ``lambda n, x: True`` also
        gives biases and normalisation vectors their own QPs instead of ``nonweight_qp``: worth it
        where they are a visible share of the bytes (a small CNN's batch norms), not before
        :func:`nncjax.with_bias_correction`, whose corrected biases then lose their precision.
      init_qps: optional starting QPs ``{name: qp}`` (e.g. :func:`nncjax.ioq.ioq_initial_qps`).
      init: ``"base"`` (start every tensor at ``base_qp`` or ``init_qps``, scales at 1) or
        ``"sensitivity"``: start from the closed-form allocation of
        :func:`nncjax.sensitivity.allocate_steps` (per-tensor QPs and per-row scales from the
        Gauss-Newton diagonal of the output distortion, :func:`~nncjax.sensitivity.output_sensitivity`
        with ``probes`` probes per batch), calibrated against the real codec (the model's predicted
        D is rescaled to the measured one and the allocation redone, again while the two disagree,
        as far from the quadratic regime; of the calibrated allocations, the lowest measured
        ``D + lam * R`` is kept). Rows the data never
        exercise (e.g. embeddings of unseen tokens) make their tensor keep a single step. With
        ``steps=0`` this allocation (snapped and refined) is the result: no training step is
        compiled. Needs ``distortion="output"`` and ``lam > 0``.
      max_scale_ratio: with ``init="sensitivity"``, per-row steps stay within this factor of their
        tensor's step.
      row_usage: with ``init="sensitivity"``, ``{name: (rows,) counts}`` for lookup tables (token
        embeddings) whose rows ``data`` exercises only in part: how often each row (along the
        tensor's rows axis, :func:`rows_axis`) is used in a larger corpus, e.g. token counts of
        plain text. The tensor's measured sensitivity is spread over its rows in proportion to the
        counts (:func:`nncjax.sensitivity.spread_over_rows`, pseudo-count 0.2x the mean count), so
        every row gets its own step: frequent tokens finer, rare and unseen ones coarser (within
        ``max_scale_ratio``). Counts may be weighted: for a mean-pooled sentence encoder, an
        occurrence in a text of ``L`` tokens reaches the pooled output at ``1 / L``, so counting it
        ``1 / L**2`` (its share of the squared error) ranks short texts' tokens as the distortion does.
      rate_sample: the training rate model of a tensor with more elements sees this many (evenly
        spaced runs of 256, bits scaled up); None: every element. The real-codec comparisons
        (``refine``, the sensitivity start's rate slopes) code as many elements (whole rows) with the
        real coder; ``estimated_bits`` always codes whole tensors.
      distortion: ``"output"`` (MSE between quantized and original outputs, relative to the
        outputs' variance) or ``"kl"`` (softmax KL on the last axis); labels are not needed.
      mode: quantizer relaxation, ``"ste"`` (straight-through) or ``"noise"`` (additive uniform noise).
      refine: after rounding the QPs, try ``qp +- 1`` on this many largest tensors with the codec's
        quantizer and the real coder (rate differences from row samples), keeping what lowers
        ``D + lam * R`` (``D`` over all of ``data``).
      param_sharding / data_sharding: optional ``jax.sharding.Sharding`` (or pytree of them, for the
        params) to place params / every batch leaf with; already sharded inputs are used as they are.
      progress: tqdm progress bar.

    Returns:
      :class:`RDSettings` (``qp_overrides``, ``local_scales``, ``history``, ``estimated_bits``).

    Raises:
      InputError: bad arguments; NaN or Inf in ``params`` (the tensors are named), in the model's
        outputs on a batch (the data), or in the first step's loss or the quantized model's ``D``.

    Example:
      >>> import nncjax.models
      >>> m = nncjax.models.get("digits_mlp"); x_calib = nncjax.models.digits_mlp.load_digits_split("train")[0][:256]
      >>> rd = optimize(m.params, m.apply, x_calib, lam=3e-3, init="sensitivity", steps=0, progress=False)
      >>> rd.qp_overrides                                                        # steps=100 trains on from here
      {'params/fc1/kernel': -..., 'params/fc2/kernel': -..., ...}
    """
    _check_args(lam, steps, mode, distortion, loss, refine, qp_density, scale_axis, init, init_qps, probes,
                max_scale_ratio)
    check_int(seed, "seed")  # before any work: JAX's own error would come from deep inside the probes
    progress = check_flag(progress, "progress")
    row_usage = dict(row_usage or {})
    if row_usage and (init != "sensitivity" or not learn_scales):
        raise InputError("row_usage shapes the sensitivity allocation's row scales: it needs init='sensitivity' "
                         "and learn_scales=True")
    if loss is None and not callable(apply_fn):
        raise InputError("apply_fn must be callable (or pass loss=)")
    qpd = check_qp_density(qp_density)
    lo, hi = qp_limits(qpd)
    base_qp = default_qp("base_qp", qpd) if base_qp is None else base_qp
    scale_qp = default_qp("scale_qp", qpd) if scale_qp is None else scale_qp
    base_qp = check_int(base_qp, "base_qp", lo=lo, hi=hi)
    scale_qp = check_int(scale_qp, "scale_qp", lo=lo, hi=hi)
    if qp_to_step(scale_qp, qpd) > 1 / 8:  # scales around 1 need finer steps (they stay 4 steps above 0)
        raise InputError(f"scale_qp {scale_qp} gives scales a step of {qp_to_step(scale_qp, qpd):.4g}: use a QP "
                         f"with a step of at most 1/8 (<= {equivalent_qp(-12, qpd)} at qp_density {qpd})")
    if nonweight_qp is None:
        nw_qp = default_qp("nonweight_qp", qpd)
    elif is_int(nonweight_qp):
        nw_qp = int(nonweight_qp) if nonweight_qp else base_qp - (2 << qpd)
    else:
        nw_qp = None
    if nw_qp is None or not lo <= nw_qp <= hi:
        raise InputError(f"nonweight_qp must be an integer in [{lo}, {hi}] (or 0, or None), got {nonweight_qp!r}")
    optimizer = _DEFAULT_OPTIMIZER if optimizer is None else optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise InputError("optimizer must be an optax.GradientTransformation")

    if param_sharding is not None:
        params = jax.device_put(params, param_sharding)
    batches = data if isinstance(data, list) else [data]
    if not batches:
        raise InputError("data is an empty list")
    if data_sharding is not None:
        batches = [jax.device_put(b, data_sharding) for b in batches]

    named = named_leaves(params)
    chosen = select_float_names(flatten_named(params), select)
    if not chosen:
        raise InputError("select chose no tensors to optimise")
    chosen.sort(key=lambda n: -int(np.size(named[n])))
    start_qps = dict(init_qps or {})
    unknown = set(start_qps) - set(chosen)
    if unknown:
        raise InputError(f"init_qps names tensors that are not optimised: {sorted(unknown)}")
    start_qps = {n: check_int(q, f"init_qps[{n!r}]", lo=lo, hi=hi) for n, q in start_qps.items()}
    axes = tuple(rows_axis(n, jnp.ndim(named[n]), scale_axis) for n in chosen)
    unknown = set(row_usage) - {n for n in chosen if jnp.ndim(named[n]) >= 2}
    if unknown:
        raise InputError(f"row_usage names tensors that are not optimised with row scales: {sorted(unknown)}")
    bad = [n for n, x in named.items() if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
           and not np.all(np.isfinite(np.asarray(x)))]
    if bad:
        raise InputError(f"params hold NaN or Inf in {bad[:5]}")
    refs = [None if loss is not None else apply_model(params, b, apply_fn=apply_fn) for b in batches]
    check_finite_outputs([r for r in refs if r is not None], distortion=distortion if loss is None else None)
    sens = None
    if init == "sensitivity":
        sens = output_sensitivity(params, apply_fn, batches, probes=probes, select=chosen, seed=seed,
                                  progress=progress)
        for n, ax in zip(chosen, axes):
            if n in row_usage:
                sens[n] = spread_over_rows(sens[n], row_usage[n], ax)
    # with sensitivities, only tensors whose every row the data exercise get scales (see allocate_steps)
    scaled = tuple(check_flag(learn_scales, "learn_scales") and jnp.ndim(named[n]) >= 2
                   and (sens is None or rows_exercised(sens[n], ax))
                   for n, ax in zip(chosen, axes))
    rate_sample = None if rate_sample is None else check_int(rate_sample, "rate_sample (or None)", lo=_RUN)
    cfg = _Config(tuple(chosen), scaled, axes, qpd, check_flag(dq, "dq"), mode, scale_qp, lo, hi, rate_sample)

    # Fixed tensors: quantized once, as the codec will; integer tensors stay as they are.
    fixed = {}
    fixed_bits = 0.0
    for n, x in named.items():
        if n in cfg.names or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            continue
        x_hat, b = _codec_reconstruct(np.asarray(x, np.float32), _fixed_qp(x, int(base_qp), nw_qp), qpd, cfg.dq)
        fixed[n] = jnp.asarray(x_hat, jnp.asarray(x).dtype)
        fixed_bits += b
    base = replace_named(params, fixed)
    weights = {n: jnp.asarray(named[n], jnp.float32) for n in cfg.names}
    n_weights = float(sum(np.size(w) for w in weights.values()))
    statics = {"apply_fn": apply_fn, "loss": loss, "distortion": distortion}

    step_s = float(qp_to_step_jax(cfg.scale_qp, qpd))
    start = None
    if sens is not None:
        start = _sensitivity_start(cfg, sens, named, base, batches, refs, statics, float(lam), n_weights,
                                   float(max_scale_ratio))
        theta = {"qp": jnp.asarray(start[0], jnp.float32),
                 "ls": {n: jnp.asarray((s - 1.0) / step_s, jnp.float32) for n, s in start[1].items()}}
    else:
        theta = {"qp": jnp.asarray([float(start_qps.get(n, base_qp)) for n in cfg.names], jnp.float32),
                 "ls": {n: jnp.zeros((jnp.shape(named[n])[ax],), jnp.float32)
                        for n, sc, ax in zip(cfg.names, scaled, axes) if sc}}
    opt_state = optimizer.init(theta)
    lam_n = jnp.float32(float(lam) / n_weights)

    rng = jax.random.PRNGKey(seed)
    hist = []
    bar = tqdm(range(int(steps)), desc="RD optimise", disable=not progress, leave=False)
    for i in bar:
        j = i % len(batches)
        theta, opt_state, rec = _train_step(theta, opt_state, base, weights, batches[j], refs[j],
                                            jax.random.fold_in(rng, i), lam_n, cfg=cfg, optimizer=optimizer,
                                            **statics)
        hist.append(rec)
        if i == 0 and not np.all(np.isfinite(np.asarray(rec))):  # one sync: NaN data or loss= would train on NaN
            raise InputError("the first step's loss is NaN or Inf: check the data (and loss=)")
        if progress and (i % 10 == 0 or i == steps - 1):
            total, d, r = (float(v) for v in rec)
            bar.set_postfix(loss=f"{total:.4g}", D=f"{d:.3g}", bits=f"{r:.0f}")
    bar.close()
    h = np.asarray(jnp.stack(hist), np.float64) if hist else np.zeros((0, 3))

    # Snap: integer QPs and hard scales, then the optional coordinate refinement on the real codec.
    qps = np.clip(np.round(np.asarray(theta["qp"], np.float64)), lo, hi).astype(np.int64)
    if start is not None and not hist:  # nothing trained: the calibrated start (and its coded tensors)
        coded_ls, ev = start[2], start[3]
    else:
        coded_ls = {n: _codec_reconstruct(np.asarray(_scale_of(np.asarray(v, np.float32), step_s), np.float32),
                                          cfg.scale_qp, qpd, cfg.dq) for n, v in theta["ls"].items()}
        ev = _HardEvaluator(cfg, named, {n: ls for n, (ls, _) in coded_ls.items()}, base, batches, refs, statics)
    scales = {n: ls for n, (ls, _) in coded_ls.items()}
    for n, ls in scales.items():
        _check_decoded_scales(n, ls, cfg.scale_qp, step_s)
    n_refine = min(int(refine), len(cfg.names))
    trials = [(cfg.names[i], np.clip(qps[i] + d, lo, hi)) for i in range(n_refine) for d in (-1, 1)]
    ev.prefetch([*zip(cfg.names, qps), *trials], "rec")
    ev.prefetch([*zip(cfg.names, qps), *trials], "sample")
    best = ev.cost(qps, float(lam), n_weights)
    for i in range(n_refine):
        for delta in (-1, 1):
            trial = qps.copy()
            trial[i] = np.clip(trial[i] + delta, lo, hi)
            if trial[i] != qps[i]:
                c = ev.cost(trial, float(lam), n_weights)
                if c < best:
                    best, qps = c, trial
                    break  # the other direction is the assignment just left

    overrides: dict[str, int] = {}
    tensor_bits: dict[str, float] = {}
    bits = fixed_bits
    ev.prefetch(zip(cfg.names, qps), "bits")
    for i, n in enumerate(cfg.names):
        overrides[n] = int(qps[i])
        tensor_bits[n] = ev.bits(n, int(qps[i]))
        bits += tensor_bits[n]
        if n in scales:
            overrides[n + LS_SUFFIX] = cfg.scale_qp
            bits += coded_ls[n][1]
    history = {"loss": h[:, 0], "distortion": h[:, 1], "rate_bits": h[:, 2]}
    return RDSettings(overrides, scales, int(scale_axis), history, float(bits), int(base_qp), qpd, nw_qp,
                      cfg.dq, tensor_bits=tensor_bits)


def _sensitivity_start(cfg: _Config, sens: dict, named: dict, base: Any, batches: list, refs: list, statics: dict,
                       lam: float, n_weights: float, max_ratio: float):
    """Integer QPs ``(n,)``, decoded scales ``{name: (rows,)}``, their coded form and the evaluator
    of the closed-form allocation, calibrated against the real codec.

    The model's D (``sum sens * err**2``) is off from the D measured on ``batches`` by a factor
    ``kappa``, so the allocation is redone at ``lam / kappa``; each tensor's rate slope comes from
    coding its row sample at the first allocation's QP and one octave coarser. Far beyond the
    quadratic regime ``kappa`` grows with the step, and one rescaling overshoots (a larger ``lam``
    then gave a finer allocation): while the ``kappa`` measured at the new allocation is off by more
    than ``_KAPPA_TOLERANCE``, the effective ``lam`` is solved for ``lam_eff * kappa(lam_eff) = lam``
    by secant steps in log space. Of the calibrated allocations tried, the one with the lowest
    measured ``D + lam * R`` (row-sample bits) is returned."""
    axes = {n: ax for n, sc, ax in zip(cfg.names, cfg.scaled, cfg.axes) if sc}
    slopes, cache, tried, points = None, {}, [], []  # points: (log lam_eff, log(lam_eff * kappa))
    lam_eff = lam
    octave = 1 << cfg.qp_density
    for attempt in range(_MAX_CALIBRATIONS):
        alloc = allocate_steps({n: sens[n] for n in cfg.names}, lam_eff, n_weights=n_weights, rows_axes=axes,
                               rate_slope=slopes, max_ratio=max_ratio, qp_density=cfg.qp_density,
                               qp_range=(cfg.lo, cfg.hi))
        qps = np.clip(np.round([alloc.qp[n] for n in cfg.names]), cfg.lo, cfg.hi).astype(np.int64)
        coded = {}
        for n, q in zip(cfg.names, qps):
            if n in axes:
                # the row steps are kept when the tensor's QP is rounded: the scales absorb the rounding
                rel = qp_to_step_continuous(alloc.qp[n], cfg.qp_density) / qp_to_step(int(q), cfg.qp_density)
                s = alloc.row_scale.get(n, np.ones(np.shape(named[n])[axes[n]]))
                floored = _floored(s * float(rel), float(qp_to_step(cfg.scale_qp, cfg.qp_density)))
                coded[n] = _codec_reconstruct(np.asarray(floored, np.float32), cfg.scale_qp, cfg.qp_density, cfg.dq)
        scales = {n: ls for n, (ls, _) in coded.items()}
        ev = _HardEvaluator(cfg, named, scales, base, batches, refs, statics, cache)
        coarser = np.minimum(qps + octave, cfg.hi)
        ev.prefetch([*zip(cfg.names, qps), *(zip(cfg.names, coarser) if slopes is None else ())], "sample")
        tried.append((ev.cost(qps, lam, n_weights), attempt, qps, scales, coded, ev))
        d_real = ev.distortion(qps)
        d_model = 0.0
        for n, q in zip(cfg.names, qps):  # one tensor's error at a time: no second copy of the model
            err = np.asarray(ev.rec(n, int(q))) - np.asarray(named[n], np.float32)
            d_model += float(np.sum(sens[n] * np.square(err)))
        if not (d_real > 0 and d_model > 0):
            break
        points.append((math.log(lam_eff), math.log(lam_eff * d_real / d_model)))
        if slopes is None:
            slopes = {}
            for n, q, c in zip(cfg.names, qps, coarser):
                saved = (ev.sample_bits(n, int(q)) - ev.sample_bits(n, int(c))) / np.size(named[n]) if c > q else 1.0
                slopes[n] = float(np.clip(saved, 0.05, 1.5))  # bits per weight per octave; bounded against noise
            lam_eff = lam * d_model / d_real
            continue
        (x0, g0), (x1, g1) = points[-2], points[-1]
        if abs(g1 - math.log(lam)) < math.log(_KAPPA_TOLERANCE):
            break
        # g(x) = x + log kappa(e^x) rises with slope >= 1 (kappa grows with the step); bounded against noise
        slope = float(np.clip((g1 - g0) / (x1 - x0), 1.0, 4.0)) if x1 != x0 else 1.0
        lam_eff = math.exp(x1 + (math.log(lam) - g1) / slope)
    calibrated = tried[1:] or tried  # the uncalibrated allocation only when nothing could be measured
    best = min(calibrated, key=lambda t: (t[0], -t[1]))  # ties: the later one
    return best[2].astype(np.float64), best[3], best[4], best[5]


_MAX_CALIBRATIONS = 4  # allocations tried by _sensitivity_start, the uncalibrated first one included
# lam_eff * kappa within this factor of lam counts as calibrated: about what D moves by when one large
# tensor's QP is rounded the other way at qp_density 2 (sqrt 2), noise for the fixed-point iteration
_KAPPA_TOLERANCE = 1.5


def _codec_reconstruct(x: np.ndarray, qp: int, qpd: int, dq: bool) -> tuple[np.ndarray, float]:
    """What the codec makes of tensor ``x`` at ``qp``: ``(reconstruction float32 (shape of x), payload bits)``
    with NNCodec's quantizer and the real DeepCABAC coder (QP delta included, unit header excluded)."""
    x_hat, bits = code_tensor(x, qp, qp_density=qpd, dq=dq)
    return x_hat, bits + qp_delta_bits(qpd)


class _HardEvaluator:
    """``D + lam * R`` of integer QP assignments with the codec's own quantizer and coder.

    ``D`` comes from one jit-compiled forward pass per batch of the decoder's reconstruction.
    Rate *differences* between QPs come from a sample of each tensor (evenly spaced whole rows, about
    ``cfg.rate_sample`` elements, see ``_row_sample``) coded with the real coder and scaled up, so
    comparing QPs never codes a whole tensor; :meth:`bits` codes a whole tensor once its QP is
    final. Everything is cached per tensor, QP and scales; evaluators given the same ``cache``
    share what they agree on."""

    def __init__(self, cfg: _Config, named: dict, scales: dict, base: Any, batches: list, refs: list,
                 statics: dict, cache: dict | None = None):
        self.cfg, self.named, self.scales, self.base = cfg, named, scales, base
        self.batches, self.refs, self.statics = batches, refs, statics
        self._cache: dict[tuple, Any] = {} if cache is None else cache
        self._scale_key = {n: np.asarray(v, np.float32).tobytes() for n, v in scales.items()}

    def rec(self, name: str, qp: int) -> jax.Array:
        """The decoder's reconstruction of tensor ``name`` at ``qp`` (its own layout, float32); a scaled
        tensor is quantized as it is coded, ``W / s`` rows first, then scaled back."""
        return self._get(name, qp, "rec")

    def bits(self, name: str, qp: int) -> float:
        """Payload bits of the whole tensor at ``qp`` (real coder; QP delta included, unit header not)."""
        return self._get(name, qp, "bits")

    def sample_bits(self, name: str, qp: int) -> float:
        """The row sample's payload bits at ``qp``, scaled to the tensor's size: an estimate of
        :meth:`bits` whose differences between QPs are accurate."""
        return self._get(name, qp, "sample")

    def prefetch(self, keys, what: str = "levels", workers: int | None = None) -> None:
        """Computes ``what`` (``"levels"``, ``"rec"``, ``"bits"`` or ``"sample"``) of the ``(name, qp)``
        pairs not cached yet on ``workers`` threads (default: one per CPU; the kernels release the
        GIL)."""
        todo = [k for k in dict.fromkeys((n, int(q), what) for n, q in keys) if self._key(*k) not in self._cache]
        workers = workers or os.cpu_count() or 1
        if len(todo) < 2 or workers == 1:
            return  # computed when asked for
        todo.sort(key=lambda k: -np.size(self.named[k[0]]))  # largest first: no big tensor runs alone at the end
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            for k, value in zip(todo, pool.map(lambda k: self._compute(*k), todo)):
                self._cache[self._key(*k)] = value

    def _key(self, name: str, qp: int, what: str) -> tuple:
        return name, int(qp), what, self._scale_key.get(name, b"")

    def _get(self, name: str, qp: int, what: str):
        key = self._key(name, qp, what)
        if key not in self._cache:
            self._cache[key] = self._compute(name, int(qp), what)
        return self._cache[key]

    def _coded_layout(self, name: str) -> np.ndarray:
        w = np.asarray(self.named[name], np.float32)
        s = self.scales.get(name)
        ax = self.cfg.axes[self.cfg.names.index(name)]
        return w if s is None else to_rows_first(divide_rows(w, s, ax), ax)

    def _compute(self, name: str, qp: int, what: str):
        qpd, dq = self.cfg.qp_density, self.cfg.dq
        if what == "levels":
            return quantize_tensor(self._coded_layout(name), qp, qp_density=qpd, dq=dq)
        if what == "rec":
            levels, used = self._get(name, qp, "levels")
            x_hat = reconstruct(levels, used, qp_density=qpd)
            ax = self.cfg.axes[self.cfg.names.index(name)]
            s = self.scales.get(name)
            return jnp.asarray(x_hat if s is None else multiply_rows(from_rows_first(x_hat, ax), s, ax))
        if what == "bits":
            return levels_bits(self._get(name, qp, "levels")[0], dq=dq) + qp_delta_bits(qpd)
        x, factor = _row_sample(self._coded_layout(name), self.cfg.rate_sample)
        return factor * levels_bits(quantize_tensor(x, qp, qp_density=qpd, dq=dq)[0], dq=dq)

    def distortion(self, qps: np.ndarray) -> float:
        """Mean D over the batches of the decoder's reconstruction at ``qps`` (cached per assignment)."""
        key = ("D", *(self._key(n, q, "D") for n, q in zip(self.cfg.names, qps)))
        if key not in self._cache:
            self.prefetch(zip(self.cfg.names, qps), "rec")
            p_hat = replace_named(self.base, {n: self.rec(n, int(q)) for n, q in zip(self.cfg.names, qps)})
            d = float(np.mean([float(batch_distortion(p_hat, b, r, **self.statics))
                               for b, r in zip(self.batches, self.refs)]))
            if not math.isfinite(d):
                raise InputError("D of the quantized model is NaN or Inf on the tuning data: check the data "
                                 "(and loss=)")
            self._cache[key] = d
        return self._cache[key]

    def cost(self, qps: np.ndarray, lam: float, n_weights: float) -> float:
        """``D + lam * R / n_weights`` with ``R`` from the row samples (for comparing assignments)."""
        self.prefetch(zip(self.cfg.names, qps), "sample")
        bits = sum(self.sample_bits(n, int(q)) for n, q in zip(self.cfg.names, qps))
        return self.distortion(qps) + lam * bits / n_weights
