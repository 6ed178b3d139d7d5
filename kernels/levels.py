"""Per-tensor DeepCABAC coding of integer levels: binarization, context selection, scan, row skipping,
context-initialisation signalling and search, and entry points. Numba kernels; see :mod:`coder` for
the Python API.

A tensor is coded as an H x W matrix (``levels`` is its raster-order int32 vector, length H*W). The
scan is raster (``scan_order`` 0) or square blocks of B = 4 << scan_order; at the end of every block
row but the last, contexts, neighbour and range are reset (an entry point). ``bounded``: for profile-1
codebook tensors the coded level lies in [-off, cbs - 1 - off] and the binarization is truncated.

Kernels return a status: 0 = ok, else one of the ``ERR_*`` codes with the failing raster position in
``info[0]``; the glue turns these into exceptions (or, for ERR_ROOM, grows the buffer and retries).
Kernels do not allocate (see :mod:`jit`): scratch arrays come from the glue.
"""

from __future__ import annotations

import numpy as np
from nncjax.kernels.contexts import (
    GTX,
    SIG,
    SIG_HDSP,
    SIG_TCA,
    SIGN,
    SIGN_TCA,
    cand_best,
    cand_bin,
    cand_init,
    cand_reset,
    ctx_init,
    ctx_init_all,
    ctx_reset_all,
)
from nncjax.kernels.engine import (
    D_BITS,
    D_RANGE,
    D_VALUE,
    E_BITS,
    E_LOW,
    E_NBUF,
    E_POS,
    E_RANGE,
    dbin,
    dbypass,
    dec_position,
    ebin,
    ebypass,
    enc_room,
)
from nncjax.kernels.jit import kernel, kernel_inline
from nncjax.kernels.tables import DQ_NEXT

OK, ERR_DQ_LEVEL, ERR_PREFIX, ERR_OVERFLOW, ERR_ROOM, ERR_NO_HIST = 0, 1, 2, 3, 4, 5
_DQ_NEXT = DQ_NEXT.astype(np.int64)
INT32_MAX = 2**31 - 1


@kernel
def _skip_advance(width, adv):
    """``adv[s]``: DQ state after a skipped row segment, ``width`` parity-0 transitions from state s.
    The parity-0 transitions form cycles of length 1, 2 and 4, so ``width % 4`` steps suffice."""
    for s in range(8):
        t = s
        for _ in range(width % 4):
            t = _DQ_NEXT[t, 0]
        adv[s] = t


@kernel
def _zero_rows(levels, height, width, flags):
    """``flags[r]`` = row_skip_flag: 1 where the whole row is zero."""
    for r in range(height):
        flags[r] = 1
        base = r * width
        for x in range(width):
            if levels[np.uint64(base + x)] != 0:
                flags[r] = 0
                break


@kernel_inline
def _select(state, nb, base_v, hdsp_on, n_gtx):
    """Contexts of one level: (sig, sign, first greater-than context, |base| or -1).

    Default: by DQ state and the neighbour's sign. TCA (co-located ``base_v`` != 0): base-dependent
    sig/sign/greater-than sets. HDSP (``hdsp_on``): sig context 40 + state, before everything else."""
    if base_v != 0:
        babs = base_v if base_v > 0 else -base_v
        csig = SIG_TCA + 2 * state + (1 if babs > 1 else 0)
        csign = SIGN_TCA + (0 if base_v < 0 else 1)
        gbase = GTX + 2 * n_gtx
    else:
        babs = np.int64(-1)
        nbc = 0 if nb == 0 else (1 if nb < 0 else 2)
        csig = SIG + 3 * state + nbc
        csign = SIGN + nbc
        gbase = GTX
    if hdsp_on:
        csig = SIG_HDSP + state
    return csig, csign, gbase, babs


@kernel_inline
def _gtx(gbase, babs, neg, n):
    """Context of greater-than flag n: by the level's sign, or with TCA by |base| >= n."""
    if babs >= 0:
        return gbase + 2 * n + (0 if babs >= n else 1)
    return gbase + 2 * n + neg


@kernel
def _block_dims(height, width, scan_order):
    """(block height, block width, number of block rows, resets at block-row ends?)."""
    if scan_order == 0:
        return height, max(width, 1), 1, False
    b = 4 << scan_order
    n_rows = (height + b - 1) // b
    return b, b, n_rows, n_rows > 1


# ----------------------------------------------------------------------------------- binarization

@kernel_inline
def _enc_level(ctx, es, buf, low, rng, bits, q, csig, csign, gbase, babs, n_gtx, max_pos, max_neg, sign_coded):
    """Codes level ``q`` with the contexts from ``_select``; ``max_pos``/``max_neg`` = largest allowed
    |q| per sign, -1 if unbounded. -> (low, rng, bits)"""
    sig = 1 if q != 0 else 0
    low, rng, bits = ebin(ctx, csig, sig, es, buf, low, rng, bits)
    if sig == 0:
        return low, rng, bits
    neg = 1 if q < 0 else 0
    if sign_coded:
        low, rng, bits = ebin(ctx, csign, neg, es, buf, low, rng, bits)
    max_abs = max_neg if neg else max_pos
    if max_abs == 1:
        return low, rng, bits
    mag = np.int64(-q) if neg else np.int64(q)
    flag = 1 if mag > 1 else 0
    low, rng, bits = ebin(ctx, _gtx(gbase, babs, neg, 0), flag, es, buf, low, rng, bits)
    coded = 1
    while flag and coded < n_gtx and (max_abs == -1 or max_abs > coded + 1):
        flag = 1 if mag > coded + 1 else 0
        low, rng, bits = ebin(ctx, _gtx(gbase, babs, neg, coded), flag, es, buf, low, rng, bits)
        coded += 1
    if flag == 0 or (max_abs != -1 and max_abs == coded + 1):
        return low, rng, bits
    rem = mag - coded - 1
    rem_max = -1 if max_abs == -1 else max_abs - coded - 1
    rctx = GTX + 4 * n_gtx
    if rem == 0:
        return ebin(ctx, rctx, 0, es, buf, low, rng, bits)
    low, rng, bits = ebin(ctx, rctx, 1, es, buf, low, rng, bits)
    done = np.int64(1)
    p = 1
    while rem > done + (np.int64(1) << p) - 1 and (rem_max == -1 or rem_max >= done + (np.int64(1) << p)):
        low, rng, bits = ebin(ctx, rctx + p, 1, es, buf, low, rng, bits)
        done += np.int64(1) << p
        p += 1
    if rem_max == -1 or rem_max >= done + (np.int64(1) << p):
        low, rng, bits = ebin(ctx, rctx + p, 0, es, buf, low, rng, bits)
    low, bits = ebypass(rem - done, p, es, buf, low, rng, bits)
    return low, rng, bits


@kernel_inline
def _pseudo_level(cand, cacc, v, csig, csign, gbase, babs, n_gtx):
    """The init search's cost pass for level ``v``: unbounded, sign always coded, remainder prefix
    always terminated, bypass bins not counted (NNCodec's choices, copied for identical output)."""
    sig = 1 if v != 0 else 0
    cand_bin(cand, cacc, csig, sig)
    if sig == 0:
        return
    neg = 1 if v < 0 else 0
    cand_bin(cand, cacc, csign, neg)
    mag = np.int64(-v) if neg else np.int64(v)
    flag = 1 if mag > 1 else 0
    cand_bin(cand, cacc, _gtx(gbase, babs, neg, 0), flag)
    coded = 1
    while flag and coded < n_gtx:
        flag = 1 if mag > coded + 1 else 0
        cand_bin(cand, cacc, _gtx(gbase, babs, neg, coded), flag)
        coded += 1
    if flag == 0:
        return
    rem = mag - coded - 1
    rctx = GTX + 4 * n_gtx
    p = 0
    done = np.int64(0)
    while rem > done + (np.int64(1) << p) - 1:
        cand_bin(cand, cacc, rctx + p, 1)
        done += np.int64(1) << p
        p += 1
    cand_bin(cand, cacc, rctx + p, 0)


@kernel_inline
def _dec_level(ctx, ds, data, value, rng, bits, csig, csign, gbase, babs, n_gtx, max_pos, max_neg, sign_coded,
               sign_inferred):
    """Decodes one level (mirror of ``_enc_level``). -> (level, status, value, rng, bits)"""
    sig, value, rng, bits = dbin(ctx, csig, ds, data, value, rng, bits)
    if sig == 0:
        return np.int64(0), OK, value, rng, bits
    if sign_coded:
        neg, value, rng, bits = dbin(ctx, csign, ds, data, value, rng, bits)
    else:
        neg = sign_inferred
    max_abs = max_neg if neg else max_pos
    mag = np.int64(1)
    if max_abs > 1 or max_abs == -1:
        j = 0
        while True:
            flag, value, rng, bits = dbin(ctx, _gtx(gbase, babs, neg, j), ds, data, value, rng, bits)
            mag += flag
            if not (flag == 1 and j < n_gtx - 1 and (max_abs > mag or max_abs == -1)):
                break
            j += 1
        if flag == 1 and (max_abs > mag or max_abs == -1):
            rctx = GTX + 4 * n_gtx
            p = 0
            j = 0
            while True:
                flag, value, rng, bits = dbin(ctx, rctx + j, ds, data, value, rng, bits)
                if flag and (max_abs > mag or max_abs == -1):
                    mag += np.int64(1) << p
                    p += 1
                if not (flag == 1 and j < 30 and (max_abs == -1 or max_abs >= mag + (np.int64(1) << p))):
                    break
                j += 1
            if p > 30:
                return np.int64(0), ERR_PREFIX, value, rng, bits
            suffix, value, bits = dbypass(p, ds, data, value, rng, bits)
            mag += suffix
            if mag > INT32_MAX + neg:  # -2**31 fits (NNCodec's int32 arithmetic decodes it exactly)
                return np.int64(0), ERR_OVERFLOW, value, rng, bits
    return (-mag if neg else mag), OK, value, rng, bits


# ---------------------------------------------------------------------------------- tensor kernels

@kernel
def _coded_level(k, state, dq, strict):
    """The transmitted level q of index k (DQ: ``(k + sgn(k)*(state & 1)) >> 1``). -> (q, valid)

    ``valid``: k is what the decoder reconstructs from q. Unless ``strict``, an unreachable k is
    converted all the same (NNCodec does so for indices its bit-depth clipping leaves unreachable)."""
    if not dq or k == 0:
        return k, True
    odd = state & 1
    q = (k + odd) >> 1 if k > 0 else (k - odd) >> 1
    return q, not strict or (q != 0 and 2 * q - (odd if q > 0 else -odd) == k)


@kernel
def _search_pass(cand, cacc, skip, adv, levels, base, tca, hist, hdsp, height, width, n_gtx, dq, strict,
                 scan_order, info):
    """The init search: charges every bin of the tensor to the nine candidates of its context.
    Follows NNCodec's pseudo pass: binarizes k (not q) and uses it as the neighbour, which block-row
    ends do not reset (only the candidates' states are reset)."""
    cand_init(cand, cacc)
    bh, bw, n_brows, resets = _block_dims(height, width, scan_order)
    state = 0
    nb = np.int64(0)
    for br in range(n_brows):
        r0 = br * bh
        r1 = min(height, r0 + bh)
        for c0 in range(0, width, bw):
            c1 = min(width, c0 + bw)
            for r in range(r0, r1):
                if skip[r]:
                    state = adv[state]
                    continue
                row = r * width
                for x in range(c0, c1):
                    pos = np.uint64(row + x)
                    k = np.int64(levels[pos])
                    q, valid = _coded_level(k, state, dq, strict)
                    if not valid:
                        info[0] = row + x
                        return ERR_DQ_LEVEL
                    csig, csign, gbase, babs = _select(state, nb, np.int64(base[pos]) if tca else np.int64(0),
                                                       hdsp and hist[pos] == 1, n_gtx)
                    _pseudo_level(cand, cacc, k, csig, csign, gbase, babs, n_gtx)
                    nb = k
                    if dq:
                        state = _DQ_NEXT[np.uint64(state), np.uint64(q & 1)]
        if resets and br < n_brows - 1:
            cand_reset(cand)
    return OK


@kernel
def _level_pass(es, buf, ctx, skip, adv, levels, base, tca, hist, hdsp, height, width, n_gtx, dq, strict,
                scan_order, max_pos, max_neg, sign_coded, info):
    """Codes the levels in scan order, with block-row resets (contexts, neighbour, range)."""
    bh, bw, n_brows, resets = _block_dims(height, width, scan_order)
    margin = (7 * (n_gtx + 34) + 32) // 8 + 16  # bytes one level can emit, at most
    low, rng, bits = es[E_LOW], es[E_RANGE], es[E_BITS]
    if resets:
        rng = 256
    state = 0
    nb = np.int64(0)
    for br in range(n_brows):
        r0 = br * bh
        r1 = min(height, r0 + bh)
        for c0 in range(0, width, bw):
            c1 = min(width, c0 + bw)
            for r in range(r0, r1):
                if skip[r]:
                    state = adv[state]
                    continue
                row = r * width
                for x in range(c0, c1):
                    if buf.shape[0] - es[E_POS] < es[E_NBUF] + margin:
                        return ERR_ROOM
                    pos = np.uint64(row + x)
                    q, valid = _coded_level(np.int64(levels[pos]), state, dq, strict)
                    if not valid:
                        info[0] = row + x
                        return ERR_DQ_LEVEL
                    csig, csign, gbase, babs = _select(state, nb, np.int64(base[pos]) if tca else np.int64(0),
                                                       hdsp and hist[pos] == 1, n_gtx)
                    low, rng, bits = _enc_level(ctx, es, buf, low, rng, bits, q, csig, csign, gbase, babs, n_gtx,
                                                max_pos, max_neg, sign_coded)
                    nb = q
                    if dq:
                        state = _DQ_NEXT[np.uint64(state), np.uint64(q & 1)]
        if resets and br < n_brows - 1:
            ctx_reset_all(ctx)
            nb = 0
            rng = 256
    es[E_LOW], es[E_RANGE], es[E_BITS] = low, rng, bits
    return OK


@kernel
def encode_tensor(es, buf, ctx, cand, cacc, skip, adv, levels, base, tca, hist, hdsp, height, width, n_gtx, dq,
                  strict, scan_order, row_skip, parent_present, rs_block, bounded, cbs, off, param_opt, ci_list, ci_ctx,
                  rs_ctx, info):
    """Codes one tensor's levels (after its qp_delta) into ``buf``: row-skip block, init search and
    ci_flags, then the levels. ``rs_block``: whether the HDSP/row-skip block is present (profile 1,
    H > 1, W > 1, cbs != 1). ``bounded``: profile-1 codebook binarization. ``tca``: ``base`` (int32,
    raster, like ``levels``) selects contexts. ``hdsp``: code hist_dep_sig_prob_enabled_flag = 1 and
    use ``hist`` (int8, raster) where the flag is present (else it is off). Scratch: ``skip`` int64 (H,),
    ``adv`` int64 (8,), the init search's ``cand`` int16 (n_contexts, CAND_WIDTH) and ``cacc`` int64
    (n_contexts, 9) (see :mod:`contexts`). Returns a status; ERR_ROOM (``buf`` too short, ``es`` is then undefined) asks
    the caller to retry from its saved state with a larger buffer."""
    ctx_init_all(ctx)
    if buf.shape[0] - es[E_POS] < enc_room(es, 8 * ci_list.shape[0] + 8 * height + 64):
        return ERR_ROOM
    skip[:] = 0
    if rs_block and row_skip:
        _zero_rows(levels, height, width, skip)
    _skip_advance(width if dq else 0, adv)
    low, rng, bits = es[E_LOW], es[E_RANGE], es[E_BITS]
    hdsp_flag = rs_block and parent_present and hdsp
    if rs_block:
        if parent_present:
            low, bits = ebypass(1 if hdsp_flag else 0, 1, es, buf, low, rng, bits)
        low, bits = ebypass(1 if row_skip else 0, 1, es, buf, low, rng, bits)
        if row_skip:
            for r in range(height):
                low, rng, bits = ebin(ctx, rs_ctx, skip[r], es, buf, low, rng, bits)
    all_zero = cbs == 1 and bounded
    cand_init(cand, cacc)
    if param_opt and not all_zero:
        status = _search_pass(cand, cacc, skip, adv, levels, base, tca, hist, hdsp_flag, height, width, n_gtx,
                              dq, strict, scan_order, info)
        if status != OK:
            return status
    for i in range(ci_list.shape[0]):
        c = ci_list[i]
        if c >= SIG_HDSP and c < SIGN and not hdsp_flag:
            continue  # HDSP contexts are signalled only when the flag is on
        best = cand_best(cacc, c)
        low, rng, bits = ebin(ctx, ci_ctx, 1 if best else 0, es, buf, low, rng, bits)
        if best:
            low, bits = ebypass(best - 1, 3, es, buf, low, rng, bits)
        ctx_init(ctx, c, best)
    if all_zero:  # nothing is coded, but the range is still reset at entry points
        es[E_LOW], es[E_RANGE], es[E_BITS] = low, 256 if _block_dims(height, width, scan_order)[3] else rng, bits
        return OK
    es[E_LOW], es[E_RANGE], es[E_BITS] = low, rng, bits
    if bounded and cbs > 0:
        return _level_pass(es, buf, ctx, skip, adv, levels, base, tca, hist, hdsp_flag, height, width, n_gtx, dq,
                           strict, scan_order, cbs - 1 - off, off, not (off == 0 or off == cbs - 1), info)
    return _level_pass(es, buf, ctx, skip, adv, levels, base, tca, hist, hdsp_flag, height, width, n_gtx, dq,
                       strict, scan_order, -1, -1, True, info)


@kernel
def decode_tensor(ds, data, ctx, skip, adv, out, base, tca, hist, has_hist, height, width, n_gtx, dq, scan_order,
                  parent_present, rs_block, bounded, cbs, off, ci_list, ci_ctx, rs_ctx, ep_pos, ep_value, ep_state,
                  info):
    """Decodes one tensor's levels (after its qp_delta) into ``out`` (raster order, int32).

    Entry points: ``ep_pos``/``ep_value``/``ep_state`` (int64, length = block rows) receive, for the
    start of each block row, the decoder bit position, the top 8 bits of its value register and the DQ
    state; they are filled only when the scan has more than one block row. ``info[1]`` = hdsp flag
    read; if it is 1 without ``has_hist`` the status is ERR_NO_HIST. Returns a status."""
    ctx_init_all(ctx)
    skip[:] = 0
    value, rng, bits = ds[D_VALUE], ds[D_RANGE], ds[D_BITS]
    if rs_block:
        if parent_present:
            info[1], value, bits = dbypass(1, ds, data, value, rng, bits)
        enabled, value, bits = dbypass(1, ds, data, value, rng, bits)
        if enabled:
            for r in range(height):
                skip[r], value, rng, bits = dbin(ctx, rs_ctx, ds, data, value, rng, bits)
    hdsp = info[1] == 1
    if hdsp and not has_hist:
        return ERR_NO_HIST
    for i in range(ci_list.shape[0]):
        c = ci_list[i]
        if c >= SIG_HDSP and c < SIGN and not hdsp:
            continue
        flag, value, rng, bits = dbin(ctx, ci_ctx, ds, data, value, rng, bits)
        idx = 0
        if flag:
            idx, value, bits = dbypass(3, ds, data, value, rng, bits)
            idx += 1
        ctx_init(ctx, c, idx)
    bh, bw, n_brows, resets = _block_dims(height, width, scan_order)
    _skip_advance(width if dq else 0, adv)
    all_zero = cbs == 1 and bounded
    if bounded and cbs > 0:
        max_pos, max_neg = cbs - 1 - off, off
        sign_coded = not (off == 0 or off == cbs - 1)
    else:
        max_pos, max_neg = -1, -1
        sign_coded = True
    sign_inferred = 1 if off != 0 else 0
    state = 0
    nb = np.int64(0)
    for br in range(n_brows):
        if resets:
            if br > 0:
                ctx_reset_all(ctx)
                nb = 0
            rng = 256
            ep_pos[br] = dec_position(ds, bits)
            ep_value[br] = (value >> 7) & 0xFF
            ep_state[br] = state
        r0 = br * bh
        r1 = min(height, r0 + bh)
        for c0 in range(0, width, bw):
            c1 = min(width, c0 + bw)
            for r in range(r0, r1):
                row = r * width
                if skip[r]:
                    state = adv[state]
                    for x in range(c0, c1):
                        out[np.uint64(row + x)] = 0
                    continue
                for x in range(c0, c1):
                    pos = np.uint64(row + x)
                    if all_zero:
                        q = np.int64(0)
                    else:
                        csig, csign, gbase, babs = _select(state, nb, np.int64(base[pos]) if tca else np.int64(0),
                                                           hdsp and hist[pos] == 1, n_gtx)
                        q, st, value, rng, bits = _dec_level(ctx, ds, data, value, rng, bits, csig, csign, gbase, babs,
                                                             n_gtx, max_pos, max_neg, sign_coded, sign_inferred)
                        if st != OK:
                            info[0] = row + x
                            return st
                    nb = q
                    k = q
                    if dq:
                        if q != 0:
                            k = 2 * q - (state & 1) if q > 0 else 2 * q + (state & 1)
                            if k > INT32_MAX or k < -INT32_MAX - 1:
                                info[0] = row + x
                                return ERR_OVERFLOW
                        state = _DQ_NEXT[np.uint64(state), np.uint64(q & 1)]
                    out[pos] = k
    ds[D_VALUE], ds[D_RANGE], ds[D_BITS] = value, rng, bits
    return OK
