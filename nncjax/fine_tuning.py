"""Fine-tuning of coded levels on the codec's own grid (``nncjax.fine_tuning``).

A weight coded without DQ is decoded as ``W_hat = s * step * k``: integer levels ``k``, the step of
its QP, its local scales ``s`` (one per NNR row). With QP and scales fixed, every choice of ``k`` is
a valid bitstream, and rounding each weight to its nearest level (or GPTQ's layer-wise choice) is
only one of them. :func:`with_fine_tuning` moves levels, one level at a time, to lower the *model's*
output distortion across layers and nonlinearities, by a search that proposes moves from gradients
and keeps only those that a batch they were not chosen on confirms:

* ``W_hat`` is linear in ``k``, so ``g = dD/dk`` (one backward pass, as for the straight-through
  estimator of quantization-aware training) is the first-order change of ``D`` when a level moves
  by one, and ``c = G * (s * step)**2``, with ``G`` the Gauss-Newton diagonal of ``D``
  (:func:`nncjax.sensitivity.output_sensitivity`), its second-order cost. A move pays for itself
  where ``|g| > c``.
* ``g`` differs from batch to batch, and with millions of weights the largest differences are
  noise. Its running mean and spread over batches (``beta = 0.99``, about 200 batches) give each
  level a score: the gain ``|mean| - c`` over the spread of the mean, where the gain exceeds that
  spread. A proposal moves the best-scoring levels, against their mean gradient.
* Each step first tries the last proposal on a new batch: it is kept if that batch's ``D`` falls,
  and the number of moves proposed grows by a quarter; otherwise it is dropped and the number halves.
  Many moves at once overshoot, because neighbouring weights fix the same output error; the count
  settles where moves still help. (A straight-through latent trained with Adam, the usual way, has
  no such brake: with a steady gradient, every latent reaches its rounding boundary after the same
  number of steps and the distortion jumps.)
* At the end the levels with the lower ``D`` on (up to 16 of) the batches are kept, the tuned or
  the given ones.

``method="ste"`` is the usual quantization-aware training instead: a latent rounded in the forward
pass, trained with Adam. Its sign-like steps filter batch noise well when there are many batches,
and have the flaw named above on one batch or at coarse steps (the final check still applies).

The tensors coded with DQ, and everything else, stay at what the decoder reconstructs, so the tuned
levels also compensate their errors. QPs and scales do not change, so the bitstream's size barely
changes (levels move by one step, either way); the distortion at that size does.

Example:
    >>> import nncjax, nncjax.models
    >>> from nncjax import verify, with_error_feedback
    >>> from nncjax.models.digits_mlp import load_digits_split
    >>> m = nncjax.models.get("digits_mlp"); batches = [load_digits_split("train")[0][:256]]   # here one batch
    >>> rd = nncjax.optimize(m.params, m.apply, batches, lam=3e-3, init="sensitivity", steps=0, progress=False)
    >>> moments = nncjax.quantize.gptq.input_moments(m.apply, m.params, batches, progress=False)
    >>> p_g, rd_g = with_error_feedback(m.params, rd, moments, progress=False)
    >>> p_ft, rd_ft = with_fine_tuning(p_g, rd_g, m.apply, batches, reference=m.params, steps=20, progress=False)
    >>> r_g, r_ft = verify(p_g, rd_g), verify(p_ft, rd_ft)
    >>> def d(p):                                                      # output MSE on the batches
    ...     return float(np.mean([np.mean((m.apply(p, b) - m.apply(m.params, b)) ** 2) for b in batches]))
    >>> abs(r_ft.nbytes - r_g.nbytes) < 0.05 * r_g.nbytes, d(r_ft.params) < d(r_g.params)
    (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nncjax.arguments import check_flag, check_int, check_real
from nncjax.bias_correction import decoded_params
from nncjax.coded_tensor import code_tensor, qp_delta_bits
from nncjax.distortion import apply_model, check_finite_outputs, distortion_fn
from nncjax.errors import InputError
from nncjax.pytree_names import flatten_named
from nncjax.rd_settings import (
    LS_SUFFIX,
    RDSettings,
    exact_cast,
    row_shape,
    rows_axis,
    to_rows_first,
)
from nncjax.reduce._tree import replace_named
from nncjax.reduce.layout import nnr_to_flax_perm
from nncjax.sensitivity import checked_batches, output_sensitivity
from nncjax.steps import qp_to_step

__all__ = ["grid_tensors", "with_fine_tuning"]

_SOME_BATCHES = 16  # the curvature, and the final check against the start, use this many batches at most
_BETA = 0.99  # running mean and square of dD/dk over batches
_NOISE = (1 - _BETA) / (1 + _BETA)  # the running mean's variance over one batch gradient's variance
_FIRST_MOVES = 1e-3  # the first proposal's size, as a fraction of the tuned levels


def _spread(n: int) -> np.ndarray:
    """Indices of at most ``_SOME_BATCHES`` of ``n`` batches, evenly spaced."""
    return np.unique(np.linspace(0, n - 1, min(n, _SOME_BATCHES)).astype(int))


def grid_tensors(settings: RDSettings) -> list[str]:
    """The optimised weights of ``settings`` coded without DQ (uniform levels), in its order: the
    tensors :func:`with_fine_tuning` can move on their grid.

    >>> rd = RDSettings({"a": -30, "b": -30, "b_scaling": -24}, {}, -1, {}, 0.0, -30, 2, -75, True,
    ...                 dq_overrides={"b": False})
    >>> grid_tensors(rd)
    ['b']
    """
    if not isinstance(settings, RDSettings):
        raise InputError("settings must be the RDSettings returned by nncjax.optimize")
    return [n for n in settings.qp_overrides
            if not n.endswith(LS_SUFFIX) and not settings.dq_overrides.get(n, settings.dq)]


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Static description of the tuned tensors (hashable, a jit argument)."""

    names: tuple[str, ...]
    axes: tuple[int, ...]  # rows axis of each (rows_axis)


def _rows(v, ndim: int):
    """``(rows,)`` -> broadcastable against a rows-first array of ``ndim`` dims."""
    return v.reshape(row_shape(ndim, 0))


def _on_grid(grid: _Grid, levels: dict, unit: dict) -> dict:
    """``{name: W_hat}`` in the tensors' own layout: ``levels`` (float32, integer valued, rows first)
    times the step, times the row scales (``unit[name]``: float32 ``(step (), s (rows,))``), in the
    decoder's order of float32 products. Linear in the levels: its gradient is ``dD/dk``."""
    out = {}
    for name, axis in zip(grid.names, grid.axes):
        k = levels[name]
        step, s = unit[name]
        w = (step * k) * _rows(s, k.ndim)  # rows first: NNR layout
        out[name] = jnp.transpose(w, nnr_to_flax_perm(k.ndim)) if axis else w
    return out


def _distortion_at(grid: _Grid, apply_fn, levels: dict, unit: dict, base, batch, ref):
    """``D`` on ``batch`` of ``base`` with the tuned tensors at ``levels``."""
    return distortion_fn(apply_fn, None, "output")(replace_named(base, _on_grid(grid, levels, unit)), batch, ref)


def _count_threshold(scores: list, k):
    """The smallest ``t > 0`` (to 2**-16 of the largest score, by bisection in log scale) that at
    most ``k`` of ``scores`` exceed."""
    top = jnp.max(jnp.stack([jnp.max(x) for x in scores]))

    def count(t):
        return sum(jnp.sum(x > t) for x in scores)

    def halve(_, lohi):  # invariant: count(hi) <= k < count(lo)
        lo, hi = lohi
        mid = jnp.sqrt(lo * hi)
        over = count(mid) > k
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 12, halve, (top * 2.0 ** -16, top))
    return jnp.where(count(lo) <= k, lo, hi)


@functools.partial(jax.jit, static_argnames=("grid", "apply_fn"))
def _tune_step(levels, proposal, moments, budget, unit, cost, base, batch, ref, *, grid, apply_fn):
    """One step of the search on ``batch``: ``(levels, proposal, moments, budget, D after the step)``.

    The ``proposal`` (level moves in {-1, 0, 1}, chosen before this batch was seen) is kept if it
    lowers this batch's D; ``budget`` (how many moves to propose) grows by a quarter if so, else
    halves. The running moments of ``dD/dk`` take in this batch's gradient (taken with the proposal
    applied, kept or not: it differs from the levels kept in ``budget`` places at most), and the next
    proposal moves the ``budget`` best-scoring levels (module docstring). The zero start of the
    running moments makes the first steps propose little."""
    dist = functools.partial(_distortion_at, grid, apply_fn)
    d_cur = dist(levels, unit, base, batch, ref)
    moved = {n: levels[n] + proposal[n] for n in grid.names}
    d_new, g = jax.value_and_grad(dist)(moved, unit, base, batch, ref)
    accept = d_new < d_cur
    new_levels, mom, score = {}, {}, []
    for n in grid.names:
        new_levels[n] = jnp.where(accept, moved[n], levels[n])
        reset = accept & (proposal[n] != 0)  # their gradient now belongs to another level
        mean, sq = (jnp.where(reset, 0.0, _BETA * x + (1 - _BETA) * y)
                    for x, y in zip(moments[n], (g[n], jnp.square(g[n]))))
        mom[n] = (mean, sq)
        noise = jnp.sqrt(jnp.maximum(sq - jnp.square(mean), 0.0) * _NOISE)
        gain = jnp.abs(mean) - cost[n]
        # the floor under the spread: with one batch (no spread) the largest gains score best
        score.append(jnp.where(gain > noise, gain / (noise + 1e-3 * jnp.mean(jnp.abs(mean)) + 1e-30), 0.0))
    budget = jnp.clip(jnp.where(accept, budget * 1.25, budget * 0.5), 1.0, 1e9)
    t = _count_threshold(score, budget)
    new_prop = {n: jnp.where(sc > t, -jnp.sign(mom[n][0]), 0.0) for n, sc in zip(grid.names, score)}
    return new_levels, new_prop, mom, budget, jnp.where(accept, d_new, d_cur)


_ADAM = optax.scale_by_adam()  # one instance: the learning rate is an argument, so one compile serves all


@functools.partial(jax.jit, static_argnames=("grid", "apply_fn"))
def _ste_step(latent, opt_state, lr, unit, base, batch, ref, *, grid, apply_fn):
    """One Adam step of straight-through training: ``(latent, opt_state, D at round(latent))``."""
    def objective(z):
        return _distortion_at(grid, apply_fn, {n: z[n] + jax.lax.stop_gradient(jnp.round(z[n]) - z[n])
                                               for n in grid.names}, unit, base, batch, ref)

    d, g = jax.value_and_grad(objective)(latent)
    upd, opt_state = _ADAM.update(g, opt_state, latent)
    return jax.tree_util.tree_map(lambda z, u: z - lr * u, latent, upd), opt_state, d


_distortion_jit = jax.jit(_distortion_at, static_argnums=(0, 1))
_METHODS = ("search", "ste")


def with_fine_tuning(
    params: Any,
    settings: RDSettings,
    apply_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    reference: Any = None,
    steps: int = 500,
    method: str = "search",
    learning_rate: float = 0.015,
    probes: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Any, RDSettings]:
    """Fine-tunes the levels of every weight coded without DQ, on its grid, for the output distortion.

    Every tensor of :func:`grid_tensors` (``settings``' weights coded uniformly, e.g. after
    :func:`nncjax.with_error_feedback`) starts at the levels the codec would write for it; the search
    of the module docstring moves single levels where the gradient of the distortion
    outweighs their curvature. All other tensors are held at what the decoder reconstructs (DQ
    weights at their DQ levels). ``D`` is :func:`nncjax.optimize`'s: the MSE between the outputs of
    the tuned model and of ``reference``, relative to their variance, on ``data`` (batches cycled).
    QPs and local scales do not change.

    Args:
      params: the parameters ``settings`` codes (same names), e.g. from
        :func:`nncjax.with_error_feedback`.
      settings: :func:`nncjax.optimize`'s result with at least one weight coded without DQ.
      apply_fn: ``apply_fn(params, batch) -> outputs`` (pytree of arrays).
      data: one batch or a ``list`` of batches (cycled over the steps). Use data the evaluation
        never sees: the levels fit what they are tuned on.
      reference: parameters whose outputs are the target (default ``params``); pass the original
        model when ``params`` already holds quantized tensors.
      steps: optimisation steps (0: the levels ``settings`` codes). A search step costs two forward
        passes and one backward pass, a ``"ste"`` step one of each.
      method: ``"search"`` (the module docstring's) or ``"ste"``: quantization-aware training of a
        latent ``z`` (units of the step, starting at the levels) rounded in the forward pass and
        passed straight through in the backward pass, with Adam (``learning_rate`` in grid steps
        per step, cosine decay to 0). Adam moves every latent with a steady gradient sign at the
        same speed, so on one batch, or with coarse steps, many levels cross at once and the
        distortion jumps (the final check then keeps the given levels); with many noisy batches
        that same normalisation filters noise well.
      learning_rate: the ``"ste"`` method's peak learning rate.
      probes: random-sign probes per batch for the search's curvature
        (:func:`nncjax.sensitivity.output_sensitivity` at ``reference``).
      seed: PRNG seed of the probes.
      progress: tqdm bar with the running distortion.

    Returns:
      ``(params_ft, settings_ft)``: ``params`` with the tuned tensors replaced by their new grid
      values (exactly what the decoder reconstructs, in their own layout and dtype, or float32 where
      that dtype, e.g. bfloat16, cannot hold them exactly), and
      ``settings`` with the real coder's ``tensor_bits`` / ``estimated_bits`` of those levels and
      ``history["fine_tuning"]`` (float64 ``(steps,)``: ``D`` of each step's batch, after the
        step's decision for the search, at the step's rounded latent for ``"ste"``).

    Raises:
      InputError: no weight coded without DQ, bad ``steps``, ``method``, ``learning_rate``,
        ``probes`` or ``data`` (NaN or Inf in the reference outputs on it), ``apply_fn`` not callable,
        or ``params`` lacking a tensor of ``settings`` (or settings of another model).

    Example:
      >>> import flax.linen as nn
      >>> from nncjax.optimize import optimize, verify
      >>> model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (128, 16))
      >>> v = model.init(jax.random.PRNGKey(1), x)
      >>> rd = optimize(v, model.apply, x, lam=1e-2, dq=False, init="sensitivity", steps=0, progress=False)
      >>> v_ft, rd_ft = with_fine_tuning(v, rd, model.apply, x, steps=50, progress=False)
      >>> out = verify(v_ft, rd_ft)          # encode -> bytes -> decode: the tuned levels, exactly
      >>> bool(jnp.all(out.params["params"]["layers_0"]["kernel"] == v_ft["params"]["layers_0"]["kernel"]))
      True
    """
    names = grid_tensors(settings)
    if not names:
        raise InputError("settings codes every weight with DQ: nothing to tune on a uniform grid "
                         "(run nncjax.with_error_feedback, or nncjax.optimize(..., dq=False), first)")
    steps = check_int(steps, "steps", lo=0)
    progress = check_flag(progress, "progress")
    if method not in _METHODS:
        raise InputError(f"method must be one of {_METHODS}, got {method!r}")
    learning_rate = check_real(learning_rate, "learning_rate", above=0)
    batches = checked_batches(apply_fn, data, probes)
    named = flatten_named(params)
    missing = [n for n in names if n not in named]
    if missing:
        raise InputError(f"params lack tensors that settings codes: {missing[:5]}")
    target = params if reference is None else reference

    refs = [apply_model(target, b, apply_fn=apply_fn) for b in batches]
    check_finite_outputs(refs, distortion="output")  # NaN targets: every D NaN, and the tuning silently given up
    base = decoded_params(params, settings)  # every weight as decoded; the tuned ones start there
    decoded = flatten_named(base)
    search = steps > 0 and method == "search"
    curvature = output_sensitivity(target, apply_fn, [batches[i] for i in _spread(len(batches))], probes=probes,
                                   select=names, seed=seed, progress=progress) if search else {}
    axes, start, unit, cost = [], {}, {}, {}
    for n in names:
        w = np.asarray(decoded[n], np.float32)
        axis = rows_axis(n, w.ndim, settings.scale_axis)
        s = settings.row_scales(n, w.shape)
        step = np.float32(qp_to_step(settings.qp_overrides[n], settings.qp_density))
        axes.append(axis)
        unit[n] = (step, s)
        start[n] = jnp.asarray(np.round(to_rows_first(w, axis) / _rows(s, w.ndim) / step), jnp.float32)
        if search:
            cost[n] = jnp.asarray(to_rows_first(curvature[n], axis) * _rows(s * step, w.ndim) ** 2)
    grid = _Grid(tuple(names), tuple(axes))

    trace = []
    bar = tqdm(range(int(steps)), desc=f"fine-tune on grid ({method})", disable=not progress, leave=False)
    if search:
        levels = start
        proposal = {n: jnp.zeros_like(k) for n, k in start.items()}
        moments = {n: (jnp.zeros_like(k), jnp.zeros_like(k)) for n, k in start.items()}
        budget = jnp.float32(max(1.0, _FIRST_MOVES * sum(int(k.size) for k in start.values())))
    else:
        latent, opt_state = start, _ADAM.init(start)
    for i in bar:
        j = i % len(batches)
        if search:
            levels, proposal, moments, budget, d = _tune_step(levels, proposal, moments, budget, unit, cost, base,
                                                              batches[j], refs[j], grid=grid, apply_fn=apply_fn)
        else:
            lr = 0.5 * float(learning_rate) * (1 + math.cos(math.pi * i / steps))  # cosine decay to 0
            latent, opt_state, d = _ste_step(latent, opt_state, jnp.float32(lr), unit, base, batches[j], refs[j],
                                             grid=grid, apply_fn=apply_fn)
        trace.append(d)
        if progress and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(D=f"{float(d):.4g}")
    bar.close()
    if not search:
        levels = {n: jnp.round(z) for n, z in latent.items()} if steps else start
    if steps:
        def total(lv):
            return sum(float(_distortion_jit(grid, apply_fn, lv, unit, base, batches[i], refs[i]))
                       for i in _spread(len(batches)))
        if not total(levels) < total(start):
            levels = start

    updates = {n: jnp.asarray(exact_cast(np.asarray(w, np.float32), named[n]))
               for n, w in _on_grid(grid, levels, unit).items()}
    params_ft = replace_named(params, updates)
    # bits of exactly what encode will code (rows first over the scales where scaled)
    qpd, overhead = settings.qp_density, qp_delta_bits(settings.qp_density)
    coded = settings.params_for_encoding(params_ft)
    tensor_bits, bits = dict(settings.tensor_bits), settings.estimated_bits
    # settings not from optimize's coder pass lack some tensors' bits: code their old levels too
    given = settings.params_for_encoding(params) if any(n not in tensor_bits for n in names) else {}
    for n in names:
        new = code_tensor(coded[n], settings.qp_overrides[n], qp_density=qpd, dq=False)[1] + overhead
        if n not in tensor_bits:
            tensor_bits[n] = code_tensor(given[n], settings.qp_overrides[n], qp_density=qpd, dq=False)[1] + overhead
        bits += new - tensor_bits[n]
        tensor_bits[n] = new
    history = dict(settings.history)
    history["fine_tuning"] = np.asarray(jnp.stack(trace), np.float64) if trace else np.zeros(0)
    return params_ft, dataclasses.replace(settings, tensor_bits=tensor_bits, estimated_bits=float(bits),
                                          history=history)
