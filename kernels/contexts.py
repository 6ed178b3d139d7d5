"""DeepCABAC context models: the dual-state log-domain probability estimator and its init search.

Context store ``ctx``: int32 array (n_contexts, 5), one row per context:
``[S0, S01, shift0, shift1, init_idx]`` where S0 is the fast state (1/16 scale), S01 = S1 + 16*S0
the combined state (its sign is the MPS, its magnitude the LPS probability), shift0 = SH0 + 4 and
shift1 = SH1 the adaptation rates of the chosen init set ``INIT[init_idx]``.

Candidate store for the encoder's context-initialisation search (``param_opt``): ``cand`` int16
(n_contexts, CAND_WIDTH = 32), C-contiguous, and ``cand_acc`` int64 (n_contexts, 9): for every
context the nine init sets run side by side over the same bins, each accumulating its estimated
cost. A row of ``cand`` holds S0 in lanes 0..15 and S1 = S01 - 16*S0 in lanes 16..31; lanes 9..15
of each group are padding.

Context index layout for unary length N (``n_contexts = 90 + 4N``): sig 0..23 (3 per DQ state),
TCA sig 24..39, HDSP sig 40..47, sign 48..50, TCA sign 51..52, greater-than flags 53..53+2N-1,
TCA greater-than flags 53+2N..53+4N-1, remainder prefix 53+4N..53+4N+31, CI flag 53+4N+34,
row-skip flag 53+4N+36.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from nncjax.kernels.jit import kernel, kernel_inline
from nncjax.kernels.tables import CURVE, EST_BITS, INIT, INIT_INDEX_PENALTY
from numba import types
from numba.extending import intrinsic

SIG, SIG_TCA, SIG_HDSP, SIGN, SIGN_TCA, GTX = 0, 24, 40, 48, 51, 53

_CURVE = CURVE.astype(np.int32)
_SH0 = (INIT[:, 0].astype(np.int32) + 4)
_SH1 = INIT[:, 1].astype(np.int32)
_S01_INIT = INIT[:, 2].astype(np.int32)
_S0_INIT = INIT[:, 3].astype(np.int32)


def num_contexts(unary_length: int) -> int:
    """Size of the context store for unary length N: 90 + 4N."""
    return 90 + 4 * unary_length


def rem_context(unary_length: int) -> int:
    """First remainder-prefix context, 53 + 4N."""
    return GTX + 4 * unary_length


def ci_context(unary_length: int) -> int:
    """Context of the context-initialisation flags."""
    return rem_context(unary_length) + 34


def rs_context(unary_length: int) -> int:
    """Context of the row-skip flags."""
    return rem_context(unary_length) + 36


def signalled_contexts(unary_length: int, dq: bool, codebook_size: int = 0, codebook_offset: int = 0,
                       tca: bool = False, hdsp: bool = False) -> np.ndarray:
    """The contexts whose init index is signalled (one ci_flag each), in coding order. int32 (n,).

    ``codebook_size``/``codebook_offset`` only count in profile 1 (pass 0 otherwise). Example:
    ``len(signalled_contexts(11, dq=True)) == 80`` and ``len(signalled_contexts(11, dq=False)) == 59``.
    """
    # Built once per distinct setting: a model of many small tensors asks for the same list per tensor.
    return np.array(_signalled(int(unary_length), bool(dq), int(codebook_size), int(codebook_offset), bool(tca),
                               bool(hdsp)), dtype=np.int32)


@functools.lru_cache(maxsize=256)
def _signalled(n: int, dq: bool, cbs: int, off: int, tca: bool, hdsp: bool) -> tuple[int, ...]:
    out: list[int] = []
    if cbs != 1:
        out += range(SIG, 24 if dq else 3)
        if tca:
            out += range(SIG_TCA, 40 if dq else 26)
        if hdsp:
            out += range(SIG_HDSP, 48 if dq else 41)
    if cbs != 1 and not (cbs > 0 and (off == 0 or off == cbs - 1)):
        out += range(SIGN, SIGN + (5 if tca else 3))
    max_abs = max(off, cbs - 1 - off) if cbs > 0 else -1
    out += [GTX + a for a in range(2 * n) if max_abs == -1 or a < 2 * max_abs]
    if tca:
        out += [GTX + a for a in range(2 * n, 4 * n) if max_abs == -1 or a < 2 * (max_abs - 1) + 2 * n]
    level = n - 1
    for a in range(31):
        level += 1 << a
        if max_abs == -1 or level < max_abs:
            out.append(GTX + 4 * n + a)
    return tuple(out)


# ----------------------------------------------------------------------------- the context store

@kernel
def ctx_init(ctx, c, idx):
    """Initialises context ``c`` with init set ``idx`` (0..8), remembered for later resets."""
    ctx[c, 0] = _S0_INIT[idx]
    ctx[c, 1] = _S01_INIT[idx]
    ctx[c, 2] = _SH0[idx]
    ctx[c, 3] = _SH1[idx]
    ctx[c, 4] = idx


@kernel
def ctx_init_all(ctx):
    for c in range(ctx.shape[0]):
        ctx_init(ctx, c, 0)


@kernel
def ctx_reset_all(ctx):
    """Restores every context's states from its remembered init set (shifts are kept)."""
    for c in range(ctx.shape[0]):
        idx = ctx[c, 4]
        ctx[c, 0] = _S0_INIT[idx]
        ctx[c, 1] = _S01_INIT[idx]


@kernel
def ctx_update(ctx, c, b):
    """Adapts context ``c`` to bin ``b``: both states move toward ``b`` by a curve-shaped step."""
    c = np.uint64(c)  # unsigned indices spare Numba's negative-index wraparound
    sgn = np.int32(2 * b - 1)  # branch-free: bins are hard to predict
    s0 = np.int32(ctx[c, 0])
    s1 = np.int32(ctx[c, 1]) - 16 * s0
    s0 += sgn * (_CURVE[np.uint64(16 + ((sgn * s0) >> 3))] >> ctx[c, 2])
    s1 += sgn * (_CURVE[np.uint64(16 + ((sgn * s1) >> 7))] >> ctx[c, 3])
    ctx[c, 0] = s0
    ctx[c, 1] = s1 + 16 * s0


# ------------------------------------------------------------------- the init-index search (encoder)
#
# The search adapts nine candidate estimators per bin, which dominates the encoder unless it runs as
# SIMD. S0 and S1 evolve independently (S0 from S0 and SH0 alone, S1 from S1 and SH1) and stay small
# (|S0| < 124, |S1| < 1924: the step is 0 once 16 + ((sgn*S) >> shift) reaches 31), so all eighteen
# states fit one vector of 32 int16 lanes and one bin is a couple of dozen vector instructions. Numba
# cannot express that (it widens every int16/int32 operation to int64, and LLVM's auto-vectorizer
# then works at a quarter of the width), so the update is written as LLVM vector IR in
# :func:`_cand_update`: generic operations only, which LLVM lowers to AVX-512, AVX2 or SSE. CURVE is
# evaluated arithmetically (a table read per lane would need a slow gather); the cost-table reads
# stay scalar for the same reason.

LANES = 16  # lanes per state group: the nine init sets and padding
CAND_WIDTH = 2 * LANES  # a cand row: S0 lanes, then S1 lanes
_I16 = ir.IntType(16)
_VEC = ir.VectorType(_I16, 2 * LANES)
_HALF = ir.VectorType(_I16, LANES)


def _const(vtype, values):
    return ir.Constant(vtype, [int(v) for v in values])


def _lanes(values, pad) -> list:
    return list(values) + [pad] * (LANES - 9)


_STATE_INIT = np.array(_lanes(_S0_INIT, 0) + _lanes(_S01_INIT - 16 * _S0_INIT, 0), dtype=np.int16)
_EST_BY_BIN = np.ascontiguousarray(EST_BITS.T).astype(np.int64)  # [bin, index]: one row per bin value


@intrinsic
def _cand_update(typingctx, cand, c, b):
    """Adapts row ``c`` of the int16 candidate store (C-contiguous, CAND_WIDTH columns) to bin ``b``;
    returns the nine candidates' cost-table indices ``512 + ((S1 + 16*S0) >> 3)`` from before the
    update. Per lane: x = sgn*S; j = x >> (3 or 7); S += sgn * (CURVE[16 + j] >> shift)."""
    if not (isinstance(cand, types.Array) and cand.dtype == types.int16 and cand.ndim == 2 and cand.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        ary, row, bin_ = args
        data = context.make_array(sig.args[0])(context, builder, value=ary).data
        row = context.cast(builder, row, sig.args[1], types.intp)
        base = builder.mul(row, ir.Constant(row.type, CAND_WIDTH))
        states_ptr = builder.bitcast(builder.gep(data, [base], inbounds=True), _VEC.as_pointer())
        states = builder.load(states_ptr, align=2)
        # m = b - 1: 0 for a 1-bin, all ones for a 0-bin; (v ^ m) - m == sgn * v.
        m = builder.trunc(context.cast(builder, bin_, sig.args[2], types.int64), _I16)
        m = builder.sub(m, ir.Constant(_I16, 1))
        m = builder.insert_element(ir.Constant(_VEC, ir.Undefined), m, ir.Constant(ir.IntType(32), 0))
        m = builder.shuffle_vector(m, m, ir.Constant(ir.VectorType(ir.IntType(32), 2 * LANES), [0] * (2 * LANES)))
        j = builder.ashr(builder.sub(builder.xor(states, m), m), _const(_VEC, [3] * LANES + [7] * LANES))

        def splat(v):
            return _const(_VEC, [v] * (2 * LANES))

        def smax(a, b):
            return builder.select(builder.icmp_signed(">", a, b), a, b)

        # CURVE[16 + j] is the upper envelope of three lines and 64, cut to 0 at j = 15.
        curve = smax(smax(builder.sub(splat(-1072), builder.mul(j, splat(224))),
                          builder.sub(splat(-112), builder.mul(j, splat(96)))),
                     smax(builder.sub(splat(16), builder.mul(j, splat(64))), splat(64)))
        curve = builder.select(builder.icmp_signed("==", j, splat(15)), splat(0), curve)
        step = builder.lshr(curve, _const(_VEC, _lanes(_SH0, 4) + _lanes(_SH1, 4)))
        builder.store(builder.add(states, builder.sub(builder.xor(step, m), m)), states_ptr, align=2)
        first = ir.Constant(ir.VectorType(ir.IntType(32), LANES), list(range(LANES)))
        second = ir.Constant(ir.VectorType(ir.IntType(32), LANES), list(range(LANES, 2 * LANES)))
        s01 = builder.add(builder.shuffle_vector(states, states, second),
                          builder.shl(builder.shuffle_vector(states, states, first), _const(_HALF, [4] * LANES)))
        index = builder.add(builder.ashr(s01, _const(_HALF, [3] * LANES)), _const(_HALF, [512] * LANES))
        # Returned in registers: read back from memory, the indices would wait on store forwarding.
        out = context.get_constant_undef(sig.return_type)
        for i in range(9):
            lane = builder.extract_element(index, ir.Constant(ir.IntType(32), i))
            out = builder.insert_value(out, builder.sext(lane, ir.IntType(64)), i)
        return out

    return types.UniTuple(types.int64, 9)(cand, c, b), codegen


@kernel
def cand_init(cand, cand_acc):
    cand_reset(cand)
    for c in range(cand_acc.shape[0]):
        for i in range(9):
            cand_acc[c, i] = 0


@kernel
def cand_reset(cand):
    """Block-row reset of the candidates' states; their accumulated costs are kept."""
    for c in range(cand.shape[0]):
        for i in range(2 * LANES):
            cand[c, i] = _STATE_INIT[i]


@kernel_inline
def cand_bin(cand, cand_acc, c, b):
    """Charges bin ``b`` of context ``c`` to all nine candidates, then adapts each of them."""
    index = _cand_update(cand, c, np.int64(b))
    est = _EST_BY_BIN[np.uint64(b)]
    c = np.uint64(c)
    for i in range(9):
        cand_acc[c, i] += est[np.uint64(index[i])]


@kernel
def cand_best(cand_acc, c):
    """Cheapest init index of context ``c``; a non-zero index pays its 3-bit signalling, ties go low."""
    best = 0
    best_cost = cand_acc[c, 0]
    for i in range(1, 9):
        cost = cand_acc[c, i] + INIT_INDEX_PENALTY
        if cost < best_cost:
            best = i
            best_cost = cost
    return best
