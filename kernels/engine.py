"""DeepCABAC binary arithmetic engine (ISO/IEC 15938-17 as NNCodec 2.1.3 implements it), as Numba kernels.

A 9-bit-range binary arithmetic coder. The registers live in small int64 arrays so that the kernels
can be called one after another from Python and from the per-tensor kernels in :mod:`levels`:

* encoder state ``es`` (int64, ``ENC_STATE_SIZE``): low, range, bits left, buffered 0xFF run length,
  buffered byte, write position in the output buffer ``buf`` (uint8).
* decoder state ``ds`` (int64, ``DEC_STATE_SIZE``): value, range, bits needed, read position in
  ``data`` (uint8). Reads past the end of ``data`` yield zero bytes but still advance the position,
  so a caller detects truncation by ``ds[D_POS] > len(data)`` and a kernel never reads out of bounds.

Context models are rows of the int32 array ``ctx`` (see :mod:`contexts`); the regular-bin kernels
look up the LPS range there and update the model after each bin.

The encoder's output buffer never grows inside these kernels: callers guarantee room with
:func:`enc_room` (a regular bin emits at most 7 bits, a bypass bin 1, plus the pending 0xFF run).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from nncjax.kernels.contexts import ctx_update
from nncjax.kernels.tables import RPS

E_LOW, E_RANGE, E_BITS, E_NBUF, E_BBYTE, E_POS = 0, 1, 2, 3, 4, 5
ENC_STATE_SIZE = 6
D_VALUE, D_RANGE, D_BITS, D_POS = 0, 1, 2, 3
DEC_STATE_SIZE = 4

# Left shifts that bring a range in 2..511 back to 256..511 (clz32(r) - 23).
RENORM = np.array([0] + [8 - int(r).bit_length() + 1 for r in range(1, 512)], dtype=np.int64)
RENORM[256:] = 0
_RPS = RPS.astype(np.int64)


# ---------------------------------------------------------------------------------------- encoder

@njit(cache=True, nogil=True)
def enc_init(es):
    es[E_LOW] = 0
    es[E_RANGE] = 510
    es[E_BITS] = 23
    es[E_NBUF] = 0
    es[E_BBYTE] = 0
    es[E_POS] = 0


@njit(cache=True, nogil=True)
def enc_room(es, nbits):
    """Bytes the buffer must have free after the write position before coding ``nbits`` more bits."""
    return es[E_NBUF] + (nbits >> 3) + 8


@njit(cache=True, nogil=True)
def _write_out(es, buf):
    bits = es[E_BITS]
    low = es[E_LOW]
    lead = low >> (24 - bits)
    bits += 8
    es[E_BITS] = bits
    es[E_LOW] = low & (0xFFFFFFFF >> bits)
    if lead == 0xFF:
        es[E_NBUF] += 1
    elif es[E_NBUF] > 0:
        carry = lead >> 8
        pos = es[E_POS]
        buf[pos] = (es[E_BBYTE] + carry) & 0xFF
        pos += 1
        es[E_BBYTE] = lead & 0xFF
        fill = (0xFF + carry) & 0xFF
        for _ in range(es[E_NBUF] - 1):
            buf[pos] = fill
            pos += 1
        es[E_NBUF] = 1
        es[E_POS] = pos
    else:
        es[E_NBUF] = 1
        es[E_BBYTE] = lead


@njit(cache=True, nogil=True)
def enc_bin(es, buf, ctx, c, b):
    """Codes regular bin ``b`` (0/1) with context row ``c`` of ``ctx`` and updates that context."""
    s01 = np.int64(ctx[c, 1])
    a = s01 >> 7
    if a < 0:
        a = -a
    rng = es[E_RANGE]
    rlps = _RPS[a + (rng & 0xE0)]
    rng -= rlps
    mps = 1 if s01 >= 0 else 0
    if b == mps:
        if rng < 256:
            es[E_RANGE] = rng << 1
            es[E_LOW] <<= 1
            es[E_BITS] -= 1
            if es[E_BITS] < 12:
                _write_out(es, buf)
        else:
            es[E_RANGE] = rng
    else:
        n = RENORM[rlps]
        es[E_LOW] = (es[E_LOW] + rng) << n
        es[E_RANGE] = rlps << n
        es[E_BITS] -= n
        if es[E_BITS] < 12:
            _write_out(es, buf)
    ctx_update(ctx, c, b)


@njit(cache=True, nogil=True)
def enc_bypass(es, buf, value, n):
    """Codes the ``n`` low bits of ``value`` as bypass bins, MSB first (n <= 32)."""
    while n > 8:
        n -= 8
        chunk = (value >> n) & 0xFF
        es[E_LOW] = (es[E_LOW] << 8) + es[E_RANGE] * chunk
        es[E_BITS] -= 8
        if es[E_BITS] < 12:
            _write_out(es, buf)
    if n > 0:
        chunk = value & ((1 << n) - 1)
        es[E_LOW] = (es[E_LOW] << n) + es[E_RANGE] * chunk
        es[E_BITS] -= n
        if es[E_BITS] < 12:
            _write_out(es, buf)


@njit(cache=True, nogil=True)
def enc_terminate_and_finish(es, buf):
    """Codes the terminating bin 1 and flushes (stop bit and zero padding). Needs ``enc_room(es, 40)``."""
    rng = es[E_RANGE] - 2
    es[E_LOW] = (es[E_LOW] + rng) << 7
    es[E_RANGE] = 256
    es[E_BITS] -= 7
    if es[E_BITS] < 12:
        _write_out(es, buf)
    bits = es[E_BITS]
    low = es[E_LOW]
    pos = es[E_POS]
    if (low >> (32 - bits)) != 0:
        buf[pos] = (es[E_BBYTE] + 1) & 0xFF
        pos += 1
        for _ in range(es[E_NBUF] - 1):
            buf[pos] = 0
            pos += 1
        low -= np.int64(1) << (32 - bits)
    else:
        if es[E_NBUF] > 0:
            buf[pos] = es[E_BBYTE]
            pos += 1
        for _ in range(es[E_NBUF] - 1):
            buf[pos] = 0xFF
            pos += 1
    es[E_NBUF] = 0
    low = ((low >> 8) << 1) + 1
    bits -= 1
    low = (low << (32 - (24 - bits))) & 0xFFFFFFFF
    i = 0
    while i < 24 - bits:
        buf[pos] = (low >> (24 - i)) & 0xFF
        pos += 1
        i += 8
    es[E_LOW] = low
    es[E_BITS] = bits
    es[E_POS] = pos


# ---------------------------------------------------------------------------------------- decoder

@njit(cache=True, nogil=True)
def _next_byte(ds, data):
    pos = ds[D_POS]
    ds[D_POS] = pos + 1
    if pos < data.shape[0]:
        return np.int64(data[pos])
    return np.int64(0)


@njit(cache=True, nogil=True)
def dec_init(ds, data):
    ds[D_POS] = 0
    hi = _next_byte(ds, data)
    ds[D_VALUE] = (hi << 8) + _next_byte(ds, data)
    ds[D_RANGE] = 510
    ds[D_BITS] = -8


@njit(cache=True, nogil=True)
def dec_bin(ds, data, ctx, c):
    """Decodes one regular bin with context row ``c`` and updates that context. Returns 0/1."""
    s01 = np.int64(ctx[c, 1])
    a = s01 >> 7
    if a < 0:
        a = -a
    rng = ds[D_RANGE]
    rlps = _RPS[a + (rng & 0xE0)]
    rmps = rng - rlps
    value = ds[D_VALUE]
    mps = 1 if s01 >= 0 else 0
    if (value >> 7) >= rmps:
        value -= rmps << 7
        rng = rlps
        b = 1 - mps
    else:
        rng = rmps
        b = mps
    n = RENORM[rng]
    rng <<= n
    value <<= n
    bits = ds[D_BITS] + n
    if bits >= 0:
        value += _next_byte(ds, data) << bits
        bits -= 8
    ds[D_RANGE] = rng
    ds[D_VALUE] = value
    ds[D_BITS] = bits
    ctx_update(ctx, c, b)
    return b


@njit(cache=True, nogil=True)
def dec_bypass(ds, data, n):
    """Decodes ``n`` bypass bins (MSB first) and returns them as an unsigned integer."""
    v = np.int64(0)
    sr = ds[D_RANGE] << 7
    for _ in range(n):
        value = ds[D_VALUE] << 1
        ds[D_BITS] += 1
        if ds[D_BITS] >= 0:
            value += _next_byte(ds, data)
            ds[D_BITS] = -8
        v <<= 1
        if value >= sr:
            value -= sr
            v += 1
        ds[D_VALUE] = value
    return v


@njit(cache=True, nogil=True)
def dec_terminate(ds, data):
    """Decodes the terminating bin. Returns 1 at the end of a payload, else 0."""
    rng = ds[D_RANGE] - 2
    ds[D_RANGE] = rng
    if ds[D_VALUE] >= (rng << 7):
        return 1
    if rng < 256:
        ds[D_RANGE] = rng << 1
        ds[D_VALUE] <<= 1
        ds[D_BITS] += 1
        if ds[D_BITS] == 0:
            ds[D_VALUE] += _next_byte(ds, data)
            ds[D_BITS] = -8
    return 0


@njit(cache=True, nogil=True)
def dec_position(ds):
    """Bit position of the decoder as entry points count it: 8 * bytes read - 8 + bits needed."""
    return 8 * ds[D_POS] - 8 + ds[D_BITS]
