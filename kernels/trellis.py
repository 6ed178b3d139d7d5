"""Encoder-side quantization kernels that reproduce NNCodec 2.1.3's ``quantLayer`` decisions exactly.

* :func:`dq_trellis` -- the 8-state dependent-quantization Viterbi search (nnr-format.md §3.4), with
  distortion only (``use_rate`` False, NNCodec's default ``lambda_scale = 0``) or distortion plus
  estimated DeepCABAC bits.
* :func:`uniform_rate_aware` -- uniform rounding with a rate term (§3.7, ``lambda_scale > 0``).
* :func:`round_scaled` -- plain uniform rounding (``lambda_scale == 0``) and the overflow test.

The first two walk the weights in the order given by ``pos`` (the coder's scan order) and write their
output at ``pos``. Inputs are checked by the Python glue (:mod:`nncjax.quantize.reference`): finite weights,
``pos`` a permutation of ``range(len(out))``, magnitudes below 2**31 steps.

Rate estimation mirrors NNCodec's estimator, quirks included, because the chosen levels depend on it:

* one context store per trellis state, initialised to init index 0, of ``90 + 4*G`` contexts where
  ``G`` is the number of greater-than flags the estimator is given (NNCodec hands it
  ``cabac_unary_length_minus1``, one fewer than the coder uses);
* a bin costs ``EST_BITS[512 + (S01 >> 3)][bin]`` with no adaptation inside one level; bypass bins
  cost 2**15;
* a surviving branch copies the source state's context store and then adapts it by coding the level
  with the *destination* state's significance contexts;
* NNCodec keeps two estimator objects per state and swaps them every step, and the neighbour level is
  not copied with the store: the rate uses the level last decided into the source state, while the
  adaptation uses the level decided into the destination state two steps earlier.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from nncjax.kernels.contexts import ctx_init_all, ctx_update
from nncjax.kernels.tables import DQ_NEXT, EST_BITS
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["dq_trellis", "uniform_rate_aware", "round_scaled", "DQ_BRANCHES"]

# Offsets of the context store (nnr-format.md §6.2).
_SIGN_BASE = 48
_GTX_BASE = 53
_BYPASS = 1 << 15


def _branches() -> np.ndarray:
    """Per destination state, its three incoming branches (source state, candidate slot) in the order
    NNCodec examines them: increasing source state, a parity-0 source giving its non-zero candidate
    first and then the zero candidate (slot 4)."""
    conn = [[] for _ in range(8)]
    for prev in range(8):
        quantizer = prev & 1
        conn[int(DQ_NEXT[prev, 0])] += [(prev, 3 * quantizer), (prev, 4)]
        conn[int(DQ_NEXT[prev, 1])] += [(prev, 2 - quantizer)]
    out = np.array(conn, dtype=np.int32)
    assert out.shape == (8, 3, 2)
    out.setflags(write=False)
    return out


#: (8, 3, 2) int32: for each destination state, its branches ``(source state, candidate slot)``.
DQ_BRANCHES = _branches()


@njit(cache=True, nogil=True)
def _best_state(cost):
    """The state (0..7) of least path cost; ties go to the lowest state, as NNCodec's."""
    state = 0
    for s in range(1, 8):
        if cost[s] < cost[state]:
            state = s
    return state


@njit(cache=True, nogil=True)
def _nb_class(neighbour):
    # 0: neighbour zero, 1: negative, 2: positive (sig and sign context selection).
    if neighbour == 0:
        return 0
    return 1 if neighbour < 0 else 2


@njit(cache=True, nogil=True)
def _bin(ctx, c, b, adapt):
    """Estimated cost of bin ``b`` in context ``c`` (2**15 = one bit), or adapt the context."""
    if adapt:
        ctx_update(ctx, c, b)
        return np.int64(0)
    return np.int64(EST_BITS[512 + (ctx[c, 1] >> 3), b])


@njit(cache=True, nogil=True)
def _code_level(ctx, value, state, neighbour, n_gtx, adapt):
    """Walks the unbounded binarization of ``value`` (§6.4), summing estimated bits or adapting."""
    bits = np.int64(0)
    sig = 1 if value != 0 else 0
    nb = _nb_class(neighbour)
    bits += _bin(ctx, 3 * state + nb, sig, adapt)
    if sig == 0:
        return bits
    bits += _bin(ctx, _SIGN_BASE + nb, 1 if value < 0 else 0, adapt)
    neg = 0 if value > 0 else 1
    rem = abs(np.int64(value)) - 1
    gr = 1 if rem != 0 else 0
    bits += _bin(ctx, _GTX_BASE + neg, gr, adapt)
    n = 1
    while gr == 1 and n < n_gtx:
        rem -= 1
        gr = 1 if rem != 0 else 0
        bits += _bin(ctx, _GTX_BASE + 2 * n + neg, gr, adapt)
        n += 1
    if gr == 1:
        rem -= 1
        # Exp-Golomb remainder: context-coded unary group prefix, bypass suffix.
        c = _GTX_BASE + 4 * n_gtx
        if rem == 0:
            return bits + _bin(ctx, c, 0, adapt)
        bits += _bin(ctx, c, 1, adapt)
        base = np.int64(1)
        log2 = 1
        c += 1
        while rem > base + (np.int64(1) << log2) - 1:
            bits += _bin(ctx, c, 1, adapt)
            base += np.int64(1) << log2
            c += 1
            log2 += 1
        bits += _bin(ctx, c, 0, adapt)
        bits += log2 * _BYPASS
    return bits


@njit(cache=True, nogil=True, inline="always")
def _slot_distortion(org, m, slot, dist_scale):
    """Distortion of candidate ``slot`` 0..3 (reconstruction index m + ((slot - m) & 3), see
    :func:`_distortions`)."""
    d = org - np.float64(m + ((slot - m) & 3))
    return dist_scale * (d * d)


@njit(cache=True, nogil=True)
def _distortions(org, dist_scale, dist):
    """Distortions of the five candidates of one weight: slots 0..3 hold reconstruction indices
    m..m+3 (slot = index & 3, m = max(1, int(org) - 1)), slot 4 the zero level."""
    m = max(np.int64(1), np.int64(org) - 1)
    for slot in range(4):
        dist[slot] = _slot_distortion(org, m, slot, dist_scale)
    dist[4] = dist_scale * (org * org)


@njit(cache=True, nogil=True)
def _level(org, sign, slot):
    """Coded (DQ) level of candidate ``slot`` (see :func:`_distortions`); slot 4 is the zero level.
    Branch-free: the slot is data, and a mispredicted jump costs more than the arithmetic."""
    m = max(np.int64(1), np.int64(org) - 1)
    idx = m + ((slot - m) & 3)
    return sign * ((idx + 1) >> 1) * np.int64(slot != 4)


_F64X8 = ir.VectorType(ir.DoubleType(), 8)
_I8X8 = ir.VectorType(ir.IntType(8), 8)


def _lane_map(values) -> ir.Constant:
    return ir.Constant(ir.VectorType(ir.IntType(32), 8), [int(v) for v in values])


@intrinsic
def _viterbi_step(typingctx, cost, dec, t, d0, d1, d2, d3, dz):
    """One step of the distortion-only Viterbi search as eight-lane vector code (LLVM vector IR; Numba
    would compile the spelled-out states to scalar code with jumps). ``cost`` float64 (8,): path
    costs, updated in place; the distortions ``d0..d3, dz`` of slots 0..4. Destination state s takes
    the cheapest of its DQ_BRANCHES row, ``cost[source] + dist[slot]`` (ties keep the earlier branch,
    as NNCodec does); ``dec[t, s]`` records which: bit 0 = branch 1 beat branch 0, bit 1 = branch 2
    beat both."""
    if not (isinstance(cost, types.Array) and cost.dtype == types.float64 and cost.ndim == 1 and cost.layout == "C"
            and isinstance(dec, types.Array) and dec.dtype == types.uint8 and dec.ndim == 2 and dec.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        cost_arg, dec_arg, row, *dist = args
        cost_ptr = builder.bitcast(context.make_array(sig.args[0])(context, builder, value=cost_arg).data,
                                   _F64X8.as_pointer())
        costs = builder.load(cost_ptr, align=8)
        slots = ir.Constant(_F64X8, ir.Undefined)
        for i, v in enumerate(dist):
            slots = builder.insert_element(slots, context.cast(builder, v, sig.args[3 + i], types.float64),
                                           ir.Constant(ir.IntType(32), i))
        best = code = None
        for k in range(3):
            branch = builder.fadd(builder.shuffle_vector(costs, costs, _lane_map(DQ_BRANCHES[:, k, 0])),
                                  builder.shuffle_vector(slots, slots, _lane_map(DQ_BRANCHES[:, k, 1])))
            if best is None:
                best = branch
                continue
            won = builder.fcmp_ordered("<", branch, best)
            best = builder.select(won, branch, best)
            bit = builder.shl(builder.zext(won, _I8X8), ir.Constant(_I8X8, [k - 1] * 8))
            code = bit if code is None else builder.add(code, bit)
        builder.store(best, cost_ptr, align=8)
        data = context.make_array(sig.args[1])(context, builder, value=dec_arg).data
        at = builder.mul(context.cast(builder, row, sig.args[2], types.intp), ir.Constant(ir.IntType(64), 8))
        builder.store(code, builder.bitcast(builder.gep(data, [at], inbounds=True), _I8X8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(cost, dec, t, d0, d1, d2, d3, dz), codegen


@njit(cache=True, nogil=True)
def _forward_distortion(w, pos, inv_step, dist_scale, dec, cost):
    """The Viterbi forward pass without rate (NNCodec's default), one vector step per weight. Fills
    ``dec`` (n, 8) and uses ``cost`` (8,) float64 as scratch; returns the best final state."""
    cost[:] = 0.5 * np.finfo(np.float64).max
    cost[0] = 0.0
    for t in range(pos.shape[0]):
        x = np.float64(w[pos[t]])
        sign = -1 if x < 0 else 1
        org = inv_step * x * sign
        m = max(np.int64(1), np.int64(org) - 1)
        _viterbi_step(cost, dec, np.int64(t), _slot_distortion(org, m, 0, dist_scale),
                      _slot_distortion(org, m, 1, dist_scale), _slot_distortion(org, m, 2, dist_scale),
                      _slot_distortion(org, m, 3, dist_scale), dist_scale * (org * org))
    return _best_state(cost)


@njit(cache=True, nogil=True)
def _backtrack(w, pos, inv_step, dec, state, out):
    """Follows the decisions back from ``state``; writes reconstruction indices k at ``pos``."""
    for t in range(pos.shape[0] - 1, -1, -1):
        b = min(dec[t, state], 2)
        prev = DQ_BRANCHES[state, b, 0]
        slot = DQ_BRANCHES[state, b, 1]
        x = np.float64(w[pos[t]])
        sign = np.int64(1) - 2 * np.int64(x < 0)
        org = inv_step * x * sign
        q = _level(org, sign, slot)
        # k = 2q - sgn(q) * (prev & 1), without jumps on the sign.
        out[pos[t]] = np.int32(2 * q - sign * (prev & 1) * np.int64(q != 0))
        state = prev


@njit(cache=True, nogil=True)
def _forward_rate(w, pos, inv_step, dist_scale, n_gtx, dec):
    """The Viterbi forward pass with estimated bits (see the module docstring). Fills ``dec``;
    returns the final costs' best state."""
    big = np.finfo(np.float64).max
    cost = np.full(8, 0.5 * big)
    cost[0] = 0.0
    new_cost = np.empty(8)
    dist = np.empty(5)
    n_ctx = 8 * 6 + 5 + 4 * n_gtx + 32 + 5  # NNCodec's store size for n_gtx flags
    # Two estimator objects per state, alternating by step parity (see module docstring).
    ctx = np.empty((2, 8, n_ctx, 5), dtype=np.int32)
    for i in range(2):
        for j in range(8):
            ctx_init_all(ctx[i, j])
    nb = np.zeros((2, 8), dtype=np.int64)
    rate = np.empty((8, 3))  # estimated bits per branch
    for t in range(pos.shape[0]):
        x = np.float64(w[pos[t]])
        sign = -1 if x < 0 else 1
        org = inv_step * x * sign
        _distortions(org, dist_scale, dist)
        src = (t + 1) & 1
        dst = t & 1
        for cur in range(8):
            for b in range(3):
                p = DQ_BRANCHES[cur, b, 0]
                lv = _level(org, sign, DQ_BRANCHES[cur, b, 1])
                rate[cur, b] = np.float64(_code_level(ctx[src, p], lv, p, nb[src, p], n_gtx, False))
        for cur in range(8):
            # NNCodec's cost order: (path cost + distortion) + rate; ties keep the first branch.
            p = DQ_BRANCHES[cur, 0, 0]
            slot = DQ_BRANCHES[cur, 0, 1]
            best = cost[p] + dist[slot] + rate[cur, 0]
            choice = 0
            for b in range(1, 3):
                p = DQ_BRANCHES[cur, b, 0]
                slot = DQ_BRANCHES[cur, b, 1]
                c = cost[p] + dist[slot] + rate[cur, b]
                if c < best:
                    best = c
                    choice = b
            dec[t, cur] = choice
            new_cost[cur] = best
        for cur in range(8):
            p = DQ_BRANCHES[cur, dec[t, cur], 0]
            lv = _level(org, sign, DQ_BRANCHES[cur, dec[t, cur], 1])
            ctx[dst, cur, :, :2] = ctx[src, p, :, :2]  # the states; shifts are the same everywhere
            _code_level(ctx[dst, cur], lv, cur, nb[dst, cur], n_gtx, True)
            nb[dst, cur] = lv
        cost, new_cost = new_cost, cost
    return _best_state(cost)


@njit(cache=True, nogil=True)
def dq_trellis(w, pos, inv_step, dist_scale, use_rate, n_gtx, out):
    """Dependent quantization of ``w[pos[i]]`` for i in scan order; writes reconstruction indices k.

    w: (n,) float32. pos: (n,) int64 permutation. inv_step: float64 ``1/Δ``. dist_scale: float64
    distortion weight (1.0 when ``use_rate`` is False). use_rate: add estimated bits. n_gtx: int,
    greater-than flags of the estimator. out: (n,) int32, written at ``pos``.

    >>> w, out = np.array([0.9, -2.1, 0.2, 3.0], np.float32), np.zeros(4, np.int32)
    >>> dq_trellis(w, np.arange(4, dtype=np.int64), 1.0, 1.0, False, 10, out); out   # step 1
    array([ 0, -2,  0,  3], dtype=int32)
    """
    n = pos.shape[0]
    # Decision per step and destination state: the winning branch of DQ_BRANCHES (see _viterbi_step).
    dec = np.empty((n, 8), dtype=np.uint8)
    if use_rate:
        state = _forward_rate(w, pos, inv_step, dist_scale, n_gtx, dec)
    else:
        state = _forward_distortion(w, pos, inv_step, dist_scale, dec, np.empty(8))
    _backtrack(w, pos, inv_step, dec, state, out)


@njit(cache=True, nogil=True)
def uniform_rate_aware(w, pos, inv_step, dist_scale, n_gtx, out):
    """Uniform quantization with a rate term: per weight (in scan order) the cheapest of 0 and
    ``max(1, R-1)..R`` (R = round(|w|/Δ)), cost ``dist_scale*(|w|/Δ - i)**2 + bits(+i)``; one
    context store adapts along the chosen levels. Shapes as :func:`dq_trellis`; writes levels.

    >>> w, out = np.array([0.9, -2.1, 0.2, 3.0], np.float32), np.zeros(4, np.int32)
    >>> uniform_rate_aware(w, np.arange(4, dtype=np.int64), 1.0, 2.0**15, 10, out); out  # 1 bit ~ 1 step**2
    array([ 0, -2,  0,  3], dtype=int32)
    >>> uniform_rate_aware(w, np.arange(4, dtype=np.int64), 1.0, 1.0, 10, out); out      # rate dominates
    array([0, 0, 0, 0], dtype=int32)
    """
    n = pos.shape[0]
    n_ctx = 8 * 6 + 5 + 4 * n_gtx + 32 + 5
    ctx = np.empty((n_ctx, 5), dtype=np.int32)
    ctx_init_all(ctx)
    neighbour = np.int64(0)
    for t in range(n):
        x = np.float64(w[pos[t]])
        sign = -1 if x < 0 else 1
        a = np.float64(sign) * x * inv_step
        best_i = np.int64(0)
        best = dist_scale * (a * a) + np.float64(_code_level(ctx, 0, 0, neighbour, n_gtx, False))
        top = np.int64(np.floor(a))
        if a - np.float64(top) >= 0.5:  # round half away from zero, exactly (a >= 0)
            top += 1
        if top > 2**31 - 1:
            top = 0  # NNCodec's int32 cast of round(2**31) wraps negative: no candidate, level 0
        for i in range(max(np.int64(1), top - 1), top + 1):
            d = a - np.float64(i)
            c = dist_scale * (d * d) + np.float64(_code_level(ctx, i, 0, neighbour, n_gtx, False))
            if c < best:
                best = c
                best_i = i
        v = best_i * sign
        out[pos[t]] = np.int32(v)
        _code_level(ctx, v, 0, neighbour, n_gtx, True)
        neighbour = v


@njit(cache=True, nogil=True)
def round_scaled(w, scale, lo, hi, out, write):
    """``round_half_away(float32(scale * w))`` per element (float32 product, as NNCodec's plain
    rounding and its overflow test compute it). Returns False, leaving ``out`` partly written, as soon
    as a rounded value falls outside ``[lo, hi]``; writes int32 levels to ``out`` only if ``write``.

    w: (n,) float32; scale: float32; lo, hi: int64 bounds; out: (n,) int32.

    >>> out = np.zeros(3, np.int32)
    >>> round_scaled(np.array([0.5, -1.5, 2.2], np.float32), np.float32(1.0), -2**31, 2**31 - 1, out, True), out
    (True, array([ 1, -2,  2], dtype=int32))
    >>> round_scaled(np.array([5.0], np.float32), np.float32(1.0), -4, 4, out, False)   # 5 > hi
    False
    """
    for i in range(w.shape[0]):
        x = np.float64(scale * w[i])
        # float32 + 0.5 is exact in float64, so this truncation rounds half away from zero exactly.
        r = np.trunc(x + 0.5) if x >= 0 else np.trunc(x - 0.5)
        if r < lo or r > hi:
            return False
        if write:
            out[i] = np.int32(r)
    return True
