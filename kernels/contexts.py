"""DeepCABAC context models: the dual-state log-domain probability estimator and its init search.

Context store ``ctx``: int32 array (n_contexts, 5), one row per context:
``[S0, S01, shift0, shift1, init_idx]`` where S0 is the fast state (1/16 scale), S01 = S1 + 16*S0
the combined state (its sign is the MPS, its magnitude the LPS probability), shift0 = SH0 + 4 and
shift1 = SH1 the adaptation rates of the chosen init set ``INIT[init_idx]``.

Candidate store for the encoder's context-initialisation search (``param_opt``): ``cand`` float32
(n_contexts, 3 * LANES) and ``cand_acc`` int64 (n_contexts, 9): for every context the nine init sets
run side by side over the same bins, each accumulating its estimated cost. A row of ``cand`` holds
S0 in lanes 0..15, S1 = S01 - 16*S0 in lanes 16..31 and the cost-table index of the latest bin in
lanes 32..47; lanes 9..15 of each group are padding that keeps the update a whole SIMD loop.

Context index layout for unary length N (``n_contexts = 90 + 4N``): sig 0..23 (3 per DQ state),
TCA sig 24..39, HDSP sig 40..47, sign 48..50, TCA sign 51..52, greater-than flags 53..53+2N-1,
TCA greater-than flags 53+2N..53+4N-1, remainder prefix 53+4N..53+4N+31, CI flag 53+4N+34,
row-skip flag 53+4N+36.
"""

from __future__ import annotations

import numpy as np
from nncjax.kernels.jit import kernel, kernel_inline
from nncjax.kernels.tables import CURVE, EST_BITS, INIT, INIT_INDEX_PENALTY

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
    n, cbs, off = int(unary_length), int(codebook_size), int(codebook_offset)
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
    return np.asarray(out, dtype=np.int32)


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
# The search adapts nine candidate estimators per bin, so its update must vectorize. S0 and S1 evolve
# independently (S0 from S0 and SH0 alone, S1 from S1 and SH1) and are small integers, |S0| <= 128
# and |S1| <= 2048, so they are held exactly in float32: every step (scaling by a power of two,
# floor, a product with a small integer, a sum) is exact there. Integer lanes would do, but Numba
# widens int32 arithmetic to int64 and LLVM then vectorizes at half the width; float32 stays
# float32. CURVE is evaluated arithmetically (a table read would become a slow gather). The cost
# table read stays scalar for the same reason: nine loads beside the vector work are cheaper.

LANES = 16
_F32 = np.float32


def _lanes(values, pad) -> np.ndarray:
    return np.array(list(values) + [pad] * (LANES - 9), dtype=np.float32)


_S0_LANES = _lanes(_S0_INIT, 0)
_S1_LANES = _lanes(_S01_INIT - 16 * _S0_INIT, 0)
_SCALE0 = _lanes(2.0 ** -_SH0.astype(np.float64), 1.0)  # x >> SH0 == floor(x * 2**-SH0)
_SCALE1 = _lanes(2.0 ** -_SH1.astype(np.float64), 1.0)
_EST_BY_BIN = np.ascontiguousarray(EST_BITS.T).astype(np.int64)  # [bin, index]: one row per bin value


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
        for i in range(LANES):
            cand[c, i] = _S0_LANES[i]
            cand[c, LANES + i] = _S1_LANES[i]


@kernel_inline
def _curve(j):
    """``CURVE[16 + j]`` for an integral float32 ``j`` in -16..15: the table is the upper envelope of
    three lines and 64, cut to 0 at j = 15 (where ``2512 * (15 - j)`` is the only term <= 0)."""
    v = max(max(_F32(-1072.0) - _F32(224.0) * j, _F32(-112.0) - _F32(96.0) * j),
            max(_F32(16.0) - _F32(64.0) * j, _F32(64.0)))
    return min(v, _F32(2512.0) * (_F32(15.0) - j))


@kernel_inline
def cand_bin(cand, cand_acc, c, b):
    """Charges bin ``b`` of context ``c`` to all nine candidates, then adapts each of them."""
    c = np.uint64(c)
    sgn = _F32(2 * b - 1)
    k0 = sgn * _F32(0.125)  # sgn*S0 >> 3 == floor(S0 * k0)
    k1 = sgn * _F32(0.0078125)  # sgn*S1 >> 7
    for ii in range(LANES):
        i = np.uint64(ii)
        s0 = cand[c, i]
        s1 = cand[c, i + LANES]
        cand[c, i + 2 * LANES] = np.floor((s1 + _F32(16.0) * s0) * _F32(0.125))  # S01 >> 3
        cand[c, i] = s0 + sgn * np.floor(_curve(np.floor(s0 * k0)) * _SCALE0[i])
        cand[c, i + LANES] = s1 + sgn * np.floor(_curve(np.floor(s1 * k1)) * _SCALE1[i])
    est = _EST_BY_BIN[np.uint64(b)]
    for i in range(9):
        cand_acc[c, i] += est[np.uint64(512 + np.int64(cand[c, i + 2 * LANES]))]


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
