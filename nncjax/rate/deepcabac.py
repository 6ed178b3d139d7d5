"""Differentiable model of what DeepCABAC spends on one tensor (nnr-format.md §4–§6, §8).

The model follows the real binarization bin by bin, in closed form (no sequential scan over elements):

* every element codes ``sig_flag`` in context ``(DQ state, neighbour class)``; coded elements then a
  ``sign_flag`` (context: neighbour class), ``min(|q|, N)`` greater-than flags (context: flag index and
  sign), and for ``|q| > N`` an Exp-Golomb-0 remainder (context-coded prefix, bypass suffix);
* the DQ states come from an associative scan of the 8-state machine (:func:`nncjax.quantize.dq_states`),
  neighbours from the previous coded level (row skipping respected);
* per context, the bins cost their empirical entropy ``n h(n1/n)`` plus the *excess* of the adaptive
  estimator: the learning transient from the init state and the steady-state estimation noise, read
  from a table simulated once with the exact estimator and engine (:mod:`nncjax.rate.calibration`);
* ``param_opt``: the init index of each context is the cheapest of the 9 (plus 3 bypass bits for a
  non-zero index), and the 59-80 context-initialisation flags are costed in their own context;
* fixed costs: QP delta (``6 + qp_density`` bypass bits), row-skip flags (profile 1), termination.

``training=False`` evaluates the model on hard integer levels. ``training=True`` replaces every
indicator ``1[|q| >= t]`` by a logistic in ``|w| / step`` centred on the decision threshold of the
quantizer the element's state selects, so gradients reach weights and steps. Following
tensorflow-compression's convention, ``training=True`` is the differentiable, looser estimate: the
smoothing spreads bins over neighbouring levels, which by concavity of the entropy tends to raise
the estimate (measured in ``benchmarks/bench_rate.py``); ``training=False`` is the tight estimate.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.arguments import check_array_kind, check_flag, check_int, check_real, is_concrete, is_int
from nncjax.errors import InputError
from nncjax.pytree_names import key_path_name
from nncjax.quantize.dq import dq_states, dq_trellis, k_to_q
from nncjax.quantize.uniform import quantize_uniform
from nncjax.steps import check_qp_density, qp_to_step_continuous, qp_to_step_jax

__all__ = [
    "BinStats",
    "bin_statistics",
    "bits_from_statistics",
    "estimate_bits",
    "estimate_bits_levels",
    "estimate_bits_tree",
    "trellis_rate_fn",
]

_TABLE = np.load(os.path.join(os.path.dirname(__file__), "adaptive_cost.npz"))
_EXCESS = jnp.asarray(_TABLE["excess"])          # (9, 17, P) bits above empirical entropy, by init idx, log2 n, p
_SLOPE = jnp.asarray(_TABLE["slope"])            # (9, P) steady-state excess per bin
_LOGIT_MAX = float(np.log(2.0**14))
_N_LOG2N = _TABLE["log2n_grid"].size
_N_P = _TABLE["p_grid"].size
#: Prefix contexts of the Exp-Golomb remainder that are signalled (nnr-format.md §6.3 row 7).
N_PREFIX = 31
#: Termination bin, flush, stop bit and byte alignment (fitted against NNCodec's coder).
TERMINATION_BITS = 12.0
_INIT_IDX_BITS = 3.0                              # uae_v(3) of a non-zero init index


class BinStats(dict):
    """Per-context bin counts of one tensor (a pytree of float32 arrays).

    ``sig`` (24, 2), ``sign`` (3, 2), ``gt`` (N, 2, 2), ``prefix`` (31, 2): last axis (bins, ones);
    ``bypass`` (): suffix bins; ``rows`` (2,): row-skip flags (bins, ones); ``sig_used`` (): number of
    signalled sig contexts (3 without DQ, 24 with).
    """


jax.tree_util.register_pytree_node(BinStats, lambda d: (tuple(d[k] for k in sorted(d)), tuple(sorted(d))),
                                   lambda keys, vals: BinStats(zip(keys, vals)))


def _excess(n: jax.Array, n1: jax.Array) -> jax.Array:
    """Excess bits over empirical entropy, for all 9 init indices: (...,) -> (..., 9)."""
    p = jnp.clip(n1 / jnp.maximum(n, 1e-12), 2.0**-14, 1.0 - 2.0**-14)
    x = (jnp.log(p) - jnp.log1p(-p) + _LOGIT_MAX) / (2.0 * _LOGIT_MAX) * (_N_P - 1)
    x = jnp.clip(x, 0.0, _N_P - 1.000001)
    xi = jnp.floor(x).astype(jnp.int32)
    fx = x - xi
    ln = jnp.clip(jnp.log2(jnp.maximum(n, 1.0)), 0.0, _N_LOG2N - 1.000001)
    li = jnp.floor(ln).astype(jnp.int32)
    fl = ln - li

    def at(i, j):
        return jnp.moveaxis(_EXCESS[:, i, j], 0, -1)

    e = ((1 - fl) * (1 - fx))[..., None] * at(li, xi) + ((1 - fl) * fx)[..., None] * at(li, xi + 1) \
        + (fl * (1 - fx))[..., None] * at(li + 1, xi) + (fl * fx)[..., None] * at(li + 1, xi + 1)
    slope = (1 - fx)[..., None] * jnp.moveaxis(_SLOPE[:, xi], 0, -1) + fx[..., None] * jnp.moveaxis(_SLOPE[:, xi + 1], 0, -1)
    big = jnp.maximum(n - 2.0 ** (_N_LOG2N - 1), 0.0)[..., None]
    return (e + big * slope) * jnp.minimum(n, 1.0)[..., None]


def _entropy_bits(n: jax.Array, n1: jax.Array) -> jax.Array:
    """``n h(n1/n)`` in bits, safe (and differentiable) at 0 and n."""
    n1 = jnp.clip(n1, 0.0, n)
    n0 = n - n1

    def xlog(a):
        return jnp.where(a > 0, a * jnp.log2(jnp.maximum(a, 1e-30)), 0.0)

    return xlog(n) - xlog(n0) - xlog(n1)


def _context_bits(counts: jax.Array, param_opt: bool):
    """Cost of contexts with (bins, ones) counts (..., 2): returns (bits (...), nonzero init idx count (...))."""
    n, n1 = counts[..., 0], counts[..., 1]
    base = _entropy_bits(n, n1)
    ex = _excess(n, n1)
    if not param_opt:
        return base + ex[..., 0], jnp.zeros_like(n)
    pen = jnp.where(jnp.arange(9) > 0, _INIT_IDX_BITS, 0.0)
    tot = ex + pen
    best = jnp.argmin(jax.lax.stop_gradient(tot), axis=-1)
    return base + jnp.take_along_axis(tot, best[..., None], axis=-1)[..., 0], (best > 0).astype(jnp.float32)


_INT32 = np.iinfo(np.int32)
#: Largest ``max_level`` of :func:`trellis_rate_fn`: its tables hold ``32 * (max_level + 1)`` floats.
MAX_TABLE_LEVEL = 2**20


def _array(x: Any, what: str, kinds: str, kind_name: str) -> Any:
    """``x`` (an array, a tracer, or an array-like that is converted) after checking its dtype kind is
    one of ``kinds`` (:func:`~nncjax.arguments.check_array_kind`); InputError naming ``what`` otherwise."""
    return check_array_kind(x, kinds, f"{what} must be {kind_name}")


def _levels(k: Any, what: str = "k") -> Any:
    """``k`` checked as integer levels: an integer dtype (a float or bool array would be truncated or
    taken as 0/1), values in int32 when concrete (they are cast to int32 and would wrap)."""
    k = _array(k, what, "iu", "an integer array")
    if is_concrete(k) and not np.can_cast(k.dtype, np.int32) and np.size(k):
        a = np.asarray(k)
        if a.min() < _INT32.min or a.max() > _INT32.max:
            raise InputError(f"{what} must hold int32 levels, got values in [{a.min()}, {a.max()}]")
    return k


def _options(**flags: Any) -> dict[str, bool]:
    """Flag options as Python bools (``check_flag``: the string ``"no"`` must not mean True)."""
    return {name: check_flag(v, name) for name, v in flags.items()}


def _qp_arg(qp: Any) -> Any:
    """``qp`` checked as one real number (int: exact step, float: continuous); its value may be anything
    (NaN gives NaN bits), but a bool, a complex number, an array of several QPs or a Python int that
    int32 cannot hold are refused."""
    if is_int(qp) and not _INT32.min <= int(qp) <= _INT32.max:  # JAX would wrap np.int64(2**40) to QP 0
        raise InputError(f"qp must be an int32 or a float QP, got {qp!r}")
    a = _array(qp, "qp", "iuf", "an int or float QP")
    if np.ndim(a) != 0:
        raise InputError(f"qp must be one scalar QP, got shape {np.shape(a)}")
    return qp


def _shape_hw(shape) -> tuple[int, int]:
    n = int(np.prod(shape)) if len(shape) else 1
    h = int(shape[0]) if len(shape) else 1
    return h, (n // h if h else 0)


def _count_onehot(values: jax.Array, ids: jax.Array, n_bins: int) -> jax.Array:
    """``segment_sum`` as a reduction over one-hot masks: no atomics, which on a GPU serialise when
    millions of elements land in a few dozen bins."""
    return jnp.sum(jnp.where(ids[:, None] == jnp.arange(n_bins), values[:, None], 0.0), axis=0)


def _count(values: jax.Array, ids: jax.Array, n_bins: int) -> jax.Array:
    """Sum of ``values`` (n,) per bin ``ids`` (n,) int in ``[0, n_bins)`` -> (n_bins,) float32. The CPU
    scatters (one pass); accelerators reduce one-hot masks (see :func:`_count_onehot`)."""
    values = jnp.asarray(values, jnp.float32)
    return jax.lax.platform_dependent(
        values, ids, cpu=lambda v, i: jax.ops.segment_sum(v, i, n_bins),
        default=lambda v, i: _count_onehot(v, i, n_bins))


def bin_statistics(k: jax.Array, *, dq: bool, n_gt: int = 11, profile: int = 1, row_skip: bool = True,
                   u: jax.Array | None = None, temperature: float = 0.25) -> BinStats:
    """Counts of the bins DeepCABAC codes for integer levels ``k`` (any shape; k values for DQ).

    With ``u`` (= ``w / step``, shape of ``k``), indicators are the training relaxation around the
    hard levels ``k``; contexts (states, neighbours, signs, skipped rows) always follow ``k``.
    Returns a :class:`BinStats` (float32 counts, shapes listed there). Raises InputError for ``k`` that
    is not an integer array (or, when concrete, leaves int32), ``u`` of another shape or not real, or a
    bad ``dq``, ``n_gt``, ``profile``, ``row_skip`` or ``temperature``.

    >>> st = bin_statistics(jnp.array([[0, 1], [-3, 0]]), dq=False)
    >>> st["sig"].shape, st["gt"].shape, st["prefix"].shape
    ((24, 2), (11, 2, 2), (31, 2))
    >>> st["sig"].sum(0).tolist(), st["sign"].sum(0).tolist()   # (bins, ones): 4 sig flags, 2 signs
    ([4.0, 2.0], [2.0, 1.0])
    """
    n_gt, profile = check_int(n_gt, "n_gt", lo=1, hi=256), check_int(profile, "profile", lo=0, hi=1)
    dq, row_skip = check_flag(dq, "dq"), check_flag(row_skip, "row_skip")
    # 0 divides by zero, a negative one flips every indicator
    temperature = check_real(temperature, "temperature", above=0)
    k = _levels(k)
    if u is not None:
        u = _array(u, "u", "iuf", "a real numeric array")
        if jnp.shape(u) != jnp.shape(k):  # shapes are static: checked under jit too
            raise InputError(f"u must have the shape of k {jnp.shape(k)}, got {jnp.shape(u)}")
    shape = jnp.shape(k)
    h, w = _shape_hw(shape)
    k = jnp.asarray(k, jnp.int32).reshape(-1)
    n = k.shape[0]
    if dq and n:  # (an empty tensor has no states to scan)
        state = dq_states(k)
        q = k_to_q(k, state)
    else:
        state = jnp.zeros_like(k)
        q = k
    q = jax.lax.stop_gradient(q)
    skip_rows = profile == 1 and row_skip and h > 1 and w > 1
    # neighbour: previous *coded* element in raster order, 0 at the tensor start. Skipped rows leave
    # it untouched, so a row's first element sees the last element of the nearest coded row above;
    # only that needs a scan, over rows (a scan over all n elements is slow to compile and run).
    flat_prev = jnp.concatenate([jnp.zeros((min(n, 1),), q.dtype), q[:-1]])
    if skip_rows:
        row_zero = jnp.all(k.reshape(h, w) == 0, axis=1)
        active = jnp.broadcast_to(~row_zero[:, None], (h, w)).reshape(-1)
        rows = jnp.arange(h, dtype=jnp.int32)
        last_row = jax.lax.cummax(jnp.where(row_zero, -1, rows), axis=0)
        above = jnp.concatenate([jnp.full((1,), -1, jnp.int32), last_row[:-1]])
        first = jnp.where(above >= 0, q.reshape(h, w)[jnp.maximum(above, 0), w - 1], 0)
        qprev = jnp.concatenate([first[:, None], flat_prev.reshape(h, w)[:, 1:]], axis=1).reshape(-1)
    else:
        row_zero = jnp.zeros((0,), bool)
        active = jnp.ones((n,), bool)
        qprev = flat_prev
    nb = jnp.where(qprev == 0, 0, jnp.where(qprev < 0, 1, 2))
    act = active.astype(jnp.float32)
    absq = jnp.abs(q)

    sig_ctx = 3 * state + nb
    n_pf = N_PREFIX + 1                                            # prefix thresholds N + 2**j, j = 0..31
    if u is None:
        # hard levels: histograms, then "at least" counts by reverse cumulative sums
        sig = (absq > 0).astype(jnp.float32) * act
        neg = (q < 0).astype(jnp.float32)
        cap = jnp.minimum(absq, n_gt + 1)                          # |q| >= t for t = 1..N+1 read off cap
        hist = _count(act, cap + (n_gt + 2) * (q < 0), 2 * (n_gt + 2)).reshape(2, n_gt + 2)
        at_least = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]          # (2, N+1): sign, t = 1..N+1
        gp, gn = at_least[0], at_least[1]
        rem = jnp.maximum(absq - n_gt, 1)                          # r + 1 for coded remainders
        plen = 31 - jax.lax.clz(rem)                               # prefix length P = floor(log2(r + 1))
        ph = _count(act * (absq > n_gt), plen, n_pf)
        e = jnp.cumsum(ph[::-1])[::-1]                             # (J+1,): remainders with P >= j
    else:
        au = jnp.abs(jnp.asarray(u, jnp.float32).reshape(-1))
        odd = (state & 1)[:, None].astype(jnp.float32)
        neg = (jnp.asarray(u).reshape(-1) < 0).astype(jnp.float32)

        def ind(t):
            tf = jnp.asarray(t, jnp.float32)[None, :]
            if dq:
                theta = jnp.where(odd > 0, jnp.where(tf == 1, 0.5, 2 * tf - 2), 2 * tf - 1)
                width = jnp.where((odd > 0) & (tf == 1), 1.0, 2.0)
            else:
                theta, width = tf - 0.5, 1.0
            return jax.nn.sigmoid((au[:, None] - theta) / (temperature * width)) * act[:, None]

        g = ind(np.arange(1, n_gt + 2))                            # (n, N+1): soft 1[|q| >= t]
        sig = g[:, 0]
        gn = jnp.sum(g * neg[:, None], axis=0)
        gp = jnp.sum(g, axis=0) - gn
        e = jnp.sum(ind(np.minimum(n_gt + 2.0 ** np.arange(n_pf), 2.0**31)), axis=0)
    sig_bins = _count(act, sig_ctx, 24)
    sig_ones = _count(sig, sig_ctx, 24)
    sign_bins = _count(sig, nb, 3)
    sign_ones = _count(sig * neg, nb, 3)
    # gt flag n (0-based) is coded when |q| >= n+1 and is 1 when |q| >= n+2; axis 1: q > 0, q < 0
    gt = jnp.stack([jnp.stack([gp[:-1], gp[1:]], -1), jnp.stack([gn[:-1], gn[1:]], -1)], axis=1)
    prefix = jnp.stack([e[:-1], e[1:]], -1)
    rows = jnp.stack([jnp.float32(row_zero.size), jnp.sum(row_zero.astype(jnp.float32))])
    return BinStats(sig=jnp.stack([sig_bins, sig_ones], -1), sign=jnp.stack([sign_bins, sign_ones], -1),
                    gt=gt, prefix=prefix, bypass=jnp.sum(e[1:]), rows=rows,
                    sig_used=jnp.float32(24 if dq else 3))


_STATS_SHAPES = {"sig": (24, 2), "sign": (3, 2), "gt": None, "prefix": (N_PREFIX, 2), "bypass": (), "rows": (2,),
                 "sig_used": ()}


def _check_stats(stats: Any) -> dict[str, Any]:
    """``stats`` as a dict of arrays after checking it has the keys and shapes of a :class:`BinStats`
    and real counts that, when concrete, are finite and >= 0 (a negative count has no entropy; the
    arrays are small); InputError naming the key otherwise."""
    if not isinstance(stats, Mapping) or set(stats) != set(_STATS_SHAPES):
        got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
        raise InputError(f"stats must be a BinStats from bin_statistics (keys {sorted(_STATS_SHAPES)}), got {got}")
    out = {}
    for key, want in _STATS_SHAPES.items():
        v = out[key] = _array(stats[key], f"stats[{key!r}]", "iuf", "a real numeric array")
        shape = np.shape(v)
        if shape != want if want is not None else (len(shape) != 3 or shape[0] < 1 or shape[1:] != (2, 2)):
            raise InputError(f"stats[{key!r}] has shape {shape}, expected {want or '(n_gt, 2, 2)'}")
        if is_concrete(v):
            a = np.asarray(v, np.float64)
            bad = a[~(np.isfinite(a) & (a >= 0))]
            if bad.size:
                raise InputError(f"stats[{key!r}] must hold finite counts >= 0, got {bad[0]}")
    return out


def bits_from_statistics(stats: BinStats, *, param_opt: bool = True) -> jax.Array:
    """Estimated arithmetic-coded bits of one tensor's levels from its :class:`BinStats` (float32 scalar),
    including context-initialisation signalling and row-skip flags (not the QP delta or termination).
    Raises InputError for ``stats`` that are not a :class:`BinStats` (keys, shapes; negative or non-finite
    counts when concrete) or a ``param_opt`` that is not a bool.

    >>> k = jnp.array([[0, 1], [-3, 0]])
    >>> round(float(bits_from_statistics(bin_statistics(k, dq=False))), 2)   # + 12 + 8 = estimate_bits_levels
    31.94
    """
    stats = _check_stats(stats)
    ctx = jnp.concatenate([stats["sig"], stats["sign"], stats["gt"].reshape(-1, 2), stats["prefix"]])
    bits, nz = _context_bits(ctx, check_flag(param_opt, "param_opt"))
    total = jnp.sum(bits) + stats["bypass"]
    n_flags = stats["sig_used"] + 3 + stats["gt"].shape[0] * 2 + N_PREFIX
    n_nz = jnp.sum(nz)
    ci_bits, _ = _context_bits(jnp.stack([n_flags, n_nz]), False)
    total = total + ci_bits + _INIT_IDX_BITS * n_nz
    rows_bits, _ = _context_bits(stats["rows"], False)
    return total + jnp.where(stats["rows"][0] > 0, rows_bits + 1.0, 0.0)


def estimate_bits_levels(k: jax.Array, *, dq: bool, qp_density: int = 2, n_gt: int = 11, param_opt: bool = True,
                         profile: int = 1, row_skip: bool = True, include_qp: bool = True) -> jax.Array:
    """Estimated DeepCABAC payload bits (float32 scalar) of one tensor of integer levels ``k`` (any shape,
    int; reconstruction indices ``k`` when ``dq``), as coded in its own NDU with raster scan.

    Raises InputError for ``k`` that is not an integer array (or, when concrete, leaves int32) and for
    bad options (flags must be bools, ``n_gt`` in [1, 256], ``profile`` 0 or 1, ``qp_density`` 0..7).

    >>> round(float(estimate_bits_levels(jnp.array([[0, 1], [-3, 0]]), dq=False)), 2)
    51.94
    """
    opts = _options(dq=dq, param_opt=param_opt, row_skip=row_skip, include_qp=include_qp)
    return _estimate_bits_levels(_levels(k), qp_density=check_qp_density(qp_density),
                                 n_gt=check_int(n_gt, "n_gt", lo=1, hi=256),
                                 profile=check_int(profile, "profile", lo=0, hi=1), **opts)


@functools.partial(jax.jit, static_argnames=("dq", "qp_density", "n_gt", "param_opt", "profile", "row_skip",
                                             "include_qp"))
def _estimate_bits_levels(k, *, dq, qp_density, n_gt, param_opt, profile, row_skip, include_qp):
    stats = bin_statistics(k, dq=dq, n_gt=n_gt, profile=profile, row_skip=row_skip)
    fixed = TERMINATION_BITS + (6 + qp_density if include_qp else 0)
    return bits_from_statistics(stats, param_opt=param_opt) + fixed


def _step(qp, qp_density):
    qp = jnp.asarray(qp)
    if jnp.issubdtype(qp.dtype, jnp.integer):
        return qp_to_step_jax(qp, qp_density)
    return qp_to_step_continuous(qp, qp_density)


def estimate_bits(x: jax.Array, qp, *, dq: bool = True, qp_density: int = 2, training: bool = False,
                  n_gt: int = 11, param_opt: bool = True, profile: int = 1, row_skip: bool = True,
                  temperature: float = 0.25, include_qp: bool = True) -> jax.Array:
    """Estimated coded bits (float32 scalar) of tensor ``x`` (float, any shape) quantized at ``qp``.

    ``qp``: int (exact step) or float (continuous step, differentiable). The levels are NNCodec's
    (uniform rounding, or the DQ trellis at lambda 0). NaN or Inf in ``x``, or a ``qp`` whose step is 0
    or not finite in float32, give NaN. ``training=True`` gives the differentiable
    relaxation (gradients w.r.t. ``x`` and ``qp``); ``training=False`` the accurate hard estimate.

    Raises InputError for ``x`` that is not a real numeric array, a ``qp`` that is not one int or float
    (bools, complex numbers, several QPs, Python ints beyond int32), and bad options (flags must be
    bools, ``n_gt`` in [1, 256], ``profile`` 0 or 1, ``qp_density`` 0..7, ``temperature`` finite > 0).

    >>> w = jnp.linspace(-0.05, 0.05, 64).reshape(8, 8)
    >>> round(float(estimate_bits(w, -38)), 1)                          # hard, DQ
    628.5
    >>> g = jax.grad(lambda q: estimate_bits(w, q, training=True))(-38.0)
    >>> bool(g < 0)                                                      # a coarser step costs fewer bits
    True
    """
    opts = _options(dq=dq, training=training, param_opt=param_opt, row_skip=row_skip, include_qp=include_qp)
    x = _array(x, "x", "iuf", "a real numeric array")
    if not isinstance(x, jax.Array) and np.dtype(x.dtype).kind in "iu":  # jit would wrap int64 weights to int32
        x = np.asarray(x, np.float32)
    return _estimate_bits(x, _qp_arg(qp),
                          qp_density=check_qp_density(qp_density), n_gt=check_int(n_gt, "n_gt", lo=1, hi=256),
                          profile=check_int(profile, "profile", lo=0, hi=1),
                          temperature=check_real(temperature, "temperature", above=0), **opts)


@functools.partial(jax.jit, static_argnames=("dq", "qp_density", "training", "n_gt", "param_opt", "profile",
                                             "row_skip", "temperature", "include_qp"))
def _estimate_bits(x, qp, *, dq, qp_density, training, n_gt, param_opt, profile, row_skip, temperature, include_qp):
    x = jnp.asarray(x, jnp.float32)
    step = _step(qp, qp_density)
    if dq:
        k = dq_trellis(jax.lax.stop_gradient(x), jax.lax.stop_gradient(step))
    else:
        k, _ = quantize_uniform(jax.lax.stop_gradient(x), jax.lax.stop_gradient(step))
    stats = bin_statistics(k, dq=dq, n_gt=n_gt, profile=profile, row_skip=row_skip,
                           u=(x / step) if training else None, temperature=temperature)
    fixed = TERMINATION_BITS + (6 + qp_density if include_qp else 0)
    bits = bits_from_statistics(stats, param_opt=param_opt) + fixed
    # NaN/Inf weights or a step that is not a positive float32 have no levels: NaN, not a plausible count
    # (traced values cannot raise; the hard estimate would otherwise quantize them to something)
    valid = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(step) & (step > 0))
    return jnp.where(valid, bits, jnp.nan)


def estimate_bits_tree(params: Any, qps: Any, **kwargs) -> Any:
    """:func:`estimate_bits` over a pytree: ``qps`` has the structure of ``params`` (or is one scalar);
    returns a pytree of float32 scalars (bits per tensor). ``kwargs`` as for :func:`estimate_bits`.
    Raises InputError for unknown options, ``qps`` of another structure, or a tensor or QP that
    :func:`estimate_bits` refuses (the message starts with the tensor's name).

    >>> w, b = jnp.linspace(-0.05, 0.05, 64).reshape(8, 8), jnp.zeros(8)
    >>> bits = estimate_bits_tree({"w": w, "b": b}, {"w": -38, "b": -75})
    >>> {name: round(float(v), 1) for name, v in bits.items()}
    {'b': 52.1, 'w': 628.5}
    >>> total = sum(jax.tree_util.tree_leaves(bits))
    """
    unknown = sorted(set(kwargs) - _ESTIMATE_OPTIONS)
    if unknown:  # a misspelt option would otherwise be a TypeError from deep inside
        raise InputError(f"unknown options {unknown}; estimate_bits takes {sorted(_ESTIMATE_OPTIONS)}")
    if not isinstance(qps, (dict, list, tuple)) and np.ndim(qps) == 0:
        qps = jax.tree_util.tree_map(lambda _: qps, params)
    want, got = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(qps)
    if want != got:
        raise InputError(f"qps must be one scalar or have the structure of params: {want} != {got}")

    def one(path, x, q):
        try:
            return estimate_bits(x, q, **kwargs)
        except InputError as e:  # which tensor: the message alone names only the argument
            raise InputError(f"{key_path_name(path)}: {e}") from None

    return jax.tree_util.tree_map_with_path(one, params, qps)


_ESTIMATE_OPTIONS = {name for name, p in inspect.signature(estimate_bits).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY}


def trellis_rate_fn(k: jax.Array, *, dq: bool = True, n_gt: int = 11, max_level: int = 4096):
    """A static rate table for :func:`nncjax.quantize.dq_trellis`: ``rate(absq, state) -> bits``.

    Bin probabilities are taken from levels ``k`` (any shape, int; e.g. a lambda-0 pass) and averaged
    over neighbour classes; |q| above ``max_level`` is costed as ``max_level``. ``rate`` takes int
    arrays ``absq`` and ``state`` (0..7) of broadcastable shapes and returns float32 bits of that shape.
    ``max_level`` is at most :data:`MAX_TABLE_LEVEL`. Bad arguments (here or, when concrete, to ``rate``)
    raise InputError.

    >>> rate = trellis_rate_fn(jnp.array([0, 2, -2, 0, 1, 0, 0, 4]))
    >>> bits = rate(jnp.array([0, 1, 3]), jnp.array([0, 0, 0]))
    >>> bits.shape, bool(bits[0] < bits[1] < bits[2])
    ((3,), True)
    """
    max_level = check_int(max_level, "max_level", lo=1, hi=MAX_TABLE_LEVEL)
    st = bin_statistics(k, dq=dq, n_gt=n_gt, profile=0)
    sig = st["sig"].reshape(8, 3, 2).sum(1)
    p_sig = (sig[:, 1] + 0.5) / (sig[:, 0] + 1.0)
    gt = st["gt"].sum(1)
    p_gt = (gt[:, 1] + 0.5) / (gt[:, 0] + 1.0)
    pf = st["prefix"]
    p_pf = (pf[:, 1] + 0.5) / (pf[:, 0] + 1.0)
    a = jnp.arange(max_level + 1)
    # greater-than flags: flag t-1 (t = 1..N) coded if |q| >= t, value |q| > t
    t = jnp.arange(1, n_gt + 1)
    flag_bits = jnp.where(a[:, None] > t[None, :], -jnp.log2(p_gt)[None, :], -jnp.log2(1 - p_gt)[None, :])
    gt_bits = jnp.sum(jnp.where(a[:, None] >= t[None, :], flag_bits, 0.0), axis=1)
    r = jnp.maximum(a - n_gt - 1, 0)
    P = 31 - jax.lax.clz((r + 1).astype(jnp.int32))               # floor(log2(r + 1)), exact (float log2 is not)
    j = jnp.arange(N_PREFIX)
    pf_bits = jnp.sum(jnp.where(j[None, :] < P[:, None], -jnp.log2(p_pf)[None, :],
                                jnp.where(j[None, :] == P[:, None], -jnp.log2(1 - p_pf)[None, :], 0.0)), axis=1)
    rem = jnp.where(a > n_gt, pf_bits + P, 0.0)
    nz_bits = 1.0 + gt_bits + rem                                  # sign + flags + remainder
    table = jnp.where(a > 0, nz_bits, 0.0)                          # (A,)

    def rate(absq, state):
        # float indices raise deep inside JAX and negative ones wrap to the table's end: refused here
        absq, state = _array(absq, "absq", "iu", "an integer array"), _array(state, "state", "iu", "an integer array")
        try:
            jnp.broadcast_shapes(jnp.shape(absq), jnp.shape(state))
        except ValueError:
            raise InputError(f"absq {jnp.shape(absq)} and state {jnp.shape(state)} do not broadcast") from None
        if is_concrete(absq) and np.size(absq) and np.min(absq) < 0:
            raise InputError(f"absq must be >= 0, got {np.min(absq)}")
        if is_concrete(state) and np.size(state) and not 0 <= np.min(state) <= np.max(state) <= 7:
            raise InputError(f"state must be in 0..7, got values in [{np.min(state)}, {np.max(state)}]")
        absq = jnp.minimum(absq, max_level)
        ps = p_sig[state]
        return jnp.where(absq > 0, -jnp.log2(ps) + table[absq], -jnp.log2(1 - ps))

    return rate
