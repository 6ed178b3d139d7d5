"""Clipped dependent-quantization levels -> the levels a decoder will actually reconstruct.

In bitdepth mode NNCodec clips DQ reconstruction indices k *after* the trellis, so a clipped k can
have the wrong parity for its DQ state. NNCodec's coder still codes ``q = (k + sgn(k)·(state & 1)) >> 1``
and every decoder then reconstructs ``k' = 2q - sgn(q)·(state & 1)``: a neighbouring value.
nncjax's coder only accepts reachable k, so the clipped levels are mapped to those k' first, with the
DQ state followed in coding order (scan order and skipped rows included). The coded q, and therefore
the decoded model, are the same as NNCodec's.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from nncjax.kernels.tables import DQ_NEXT

__all__ = ["reachable_dq_levels"]

_NEXT = DQ_NEXT.astype(np.int64)


@njit(cache=True, nogil=True)
def _walk(k, height, width, block, skip, nxt):  # pragma: no cover - numba
    out = k.copy()
    state = np.int64(0)
    for r0 in range(0, height, block):
        r1 = min(r0 + block, height)
        for c0 in range(0, width, block):
            c1 = min(c0 + block, width)
            for r in range(r0, r1):
                if skip[r]:
                    # A skipped row segment is zero and advances the state by the full row width (NNCodec).
                    for c in range(c0, c1):
                        out[r * width + c] = 0
                    for _ in range(width):
                        state = nxt[state, 0]
                    continue
                for c in range(c0, c1):
                    i = r * width + c
                    v = np.int64(out[i])
                    odd = state & 1
                    if v == 0:
                        q = np.int64(0)
                    elif v > 0:
                        q = (v + odd) >> 1
                    else:
                        q = (v - odd) >> 1
                    if q == 0:
                        out[i] = 0
                    elif q > 0:
                        out[i] = 2 * q - odd
                    else:
                        out[i] = 2 * q + odd
                    state = nxt[state, q & 1]
    return out


def reachable_dq_levels(levels: np.ndarray, *, scan_order: int, row_skipping: bool) -> np.ndarray:
    """``levels``: int32 DQ indices k of any shape (H = shape[0], W = the rest) -> int32 k', same shape.

    ``scan_order``: 0 raster, 1..4 blocks of 4 << scan_order; ``row_skipping``: rows whose coded
    levels are all zero are skipped (the coder decides on the levels it is given, so a row that only
    becomes zero here is skipped too: iterated until no new row becomes zero). Reachable levels come back unchanged.

    Under block scans with row skipping a skipped segment advances the DQ state by W, not by its
    length, so a row that becomes zero only here can change later states: the result is then a valid
    stream whose values may differ slightly from NNCodec's own choice.

    >>> reachable_dq_levels(np.array([[1, 3]], np.int32), scan_order=0, row_skipping=False).tolist()
    [[0, 2]]
    """
    k = np.ascontiguousarray(levels, dtype=np.int32)
    if k.size == 0:
        return k
    h = k.shape[0] if k.ndim else 1
    w = k.size // h
    flat = k.reshape(h, w).ravel()
    blocky = scan_order > 0 and h > 1 and w > 1
    # Raster order is one "block" as tall as the tensor and as wide as a row.
    block = (4 << scan_order) if blocky else max(h, w)
    skipping = row_skipping and h > 1 and w > 1
    skip = ~flat.reshape(h, w).any(axis=1) if skipping else np.zeros(h, np.bool_)
    while True:  # the skipped set only grows, so this ends after at most H rounds
        out = _walk(flat, h, w, block, skip, _NEXT)
        new_skip = skip | ~out.reshape(h, w).any(axis=1) if skipping else skip
        if np.array_equal(new_skip, skip):
            return out.reshape(k.shape)
        skip = new_skip
