"""DeepCABAC binary arithmetic engine (ISO/IEC 15938-17 as NNCodec 2.1.3 implements it), as Numba kernels.

A 9-bit-range binary arithmetic coder. Between kernel calls its registers live in small int64 arrays:

* encoder state ``es`` (int64, ``ENC_STATE_SIZE``): low, range, bits left, buffered 0xFF run length,
  buffered byte, write position in the output buffer ``buf`` (uint8).
* decoder state ``ds`` (int64, ``DEC_STATE_SIZE``): value, range, bits needed, read position in
  ``data`` (uint8). Reads past the end of ``data`` yield zero bytes but still advance the position,
  so a caller detects truncation by ``ds[D_POS] > len(data)`` and a kernel never reads out of bounds.

Inside a kernel the registers on the serial path (low/value, range, bits) are passed and returned
as scalars (``ebin``, ``dbin``, ...), which keeps them in machine registers; the array forms
(``enc_bin``, ``dec_bin``, ...) load and store them around one call, for glue and tests.
Array indices are cast to unsigned, which spares Numba's negative-index wraparound in hot loops.

Context models are rows of the int32 array ``ctx`` (see :mod:`contexts`); the regular-bin kernels
look up the LPS range there and update the model after each bin.

The encoder's output buffer never grows inside these kernels: callers guarantee room with
:func:`enc_room` (a regular bin emits at most 7 bits, a bypass bin 1, plus the pending 0xFF run).
"""

from __future__ import annotations

import numpy as np
from nncjax.kernels.contexts import ctx_update
from nncjax.kernels.jit import kernel, kernel_inline
from nncjax.kernels.tables import RPS
from numba.cpython.unsafe.numbers import leading_zeros

E_LOW, E_RANGE, E_BITS, E_NBUF, E_BBYTE, E_POS = 0, 1, 2, 3, 4, 5
ENC_STATE_SIZE = 6
D_VALUE, D_RANGE, D_BITS, D_POS = 0, 1, 2, 3
DEC_STATE_SIZE = 4

# Left shifts that bring a range in 2..511 back to 256..511 (clz32(r) - 23).
RENORM = np.array([0] + [8 - int(r).bit_length() + 1 for r in range(1, 512)], dtype=np.int64)
RENORM[256:] = 0
_RPS = RPS.astype(np.int64)


# ---------------------------------------------------------------------------------------- encoder

@kernel
def enc_init(es):
    es[E_LOW] = 0
    es[E_RANGE] = 510
    es[E_BITS] = 23
    es[E_NBUF] = 0
    es[E_BBYTE] = 0
    es[E_POS] = 0


@kernel
def enc_room(es, nbits):
    """Bytes the buffer must have free after the write position before coding ``nbits`` more bits."""
    return es[E_NBUF] + (nbits >> 3) + 8


@kernel
def write_out(es, buf, low, bits):
    """Moves the top byte of ``low`` out (held back while it may still receive a carry). -> (low, bits)"""
    lead = low >> (24 - bits)
    bits += 8
    low &= 0xFFFFFFFF >> bits
    if lead == 0xFF:
        es[E_NBUF] += 1
    elif es[E_NBUF] > 0:
        carry = lead >> 8
        pos = es[E_POS]
        buf[np.uint64(pos)] = (es[E_BBYTE] + carry) & 0xFF
        pos += 1
        es[E_BBYTE] = lead & 0xFF
        fill = (0xFF + carry) & 0xFF
        for _ in range(es[E_NBUF] - 1):
            buf[np.uint64(pos)] = fill
            pos += 1
        es[E_NBUF] = 1
        es[E_POS] = pos
    else:
        es[E_NBUF] = 1
        es[E_BBYTE] = lead
    return low, bits


@kernel_inline
def ebin(ctx, c, b, es, buf, low, rng, bits):
    """Codes regular bin ``b`` (0/1) with context row ``c`` and updates that context. -> (low, rng, bits)"""
    s01 = np.int64(ctx[np.uint64(c), 1])
    a = s01 >> 7
    if a < 0:
        a = -a
    rlps = _RPS[np.uint64(a + (rng & 0xE0))]
    rmps = rng - rlps  # >= 128: an MPS renormalises by at most one bit
    mask = -np.int64(b ^ (1 if s01 >= 0 else 0))  # all ones for an LPS; branch-free like dbin
    low += rmps & mask
    rng = rmps ^ ((rmps ^ rlps) & mask)
    # The range is the serial path from bin to bin: a leading-zero count beats a RENORM read.
    n = np.int64(leading_zeros(np.uint32(rng))) - 23
    low <<= n
    rng <<= n
    bits -= n
    if bits < 12:
        low, bits = write_out(es, buf, low, bits)
    ctx_update(ctx, c, b)
    return low, rng, bits


@kernel
def ebypass(value, n, es, buf, low, rng, bits):
    """Codes the ``n`` low bits of ``value`` as bypass bins, MSB first (n <= 32). -> (low, bits)"""
    while n > 8:
        n -= 8
        low = (low << 8) + rng * ((value >> n) & 0xFF)
        bits -= 8
        if bits < 12:
            low, bits = write_out(es, buf, low, bits)
    if n > 0:
        low = (low << n) + rng * (value & ((1 << n) - 1))
        bits -= n
        if bits < 12:
            low, bits = write_out(es, buf, low, bits)
    return low, bits


@kernel
def enc_bin(es, buf, ctx, c, b):
    """Array-state form of :func:`ebin`."""
    es[E_LOW], es[E_RANGE], es[E_BITS] = ebin(ctx, c, b, es, buf, es[E_LOW], es[E_RANGE], es[E_BITS])


@kernel
def enc_bypass(es, buf, value, n):
    """Array-state form of :func:`ebypass`."""
    es[E_LOW], es[E_BITS] = ebypass(value, n, es, buf, es[E_LOW], es[E_RANGE], es[E_BITS])


@kernel
def enc_terminate_and_finish(es, buf):
    """Codes the terminating bin 1 and flushes (stop bit and zero padding). Needs ``enc_room(es, 40)``."""
    low = (es[E_LOW] + es[E_RANGE] - 2) << 7
    es[E_RANGE] = 256
    bits = es[E_BITS] - 7
    if bits < 12:
        low, bits = write_out(es, buf, low, bits)
    pos = es[E_POS]
    if (low >> (32 - bits)) != 0:
        buf[np.uint64(pos)] = (es[E_BBYTE] + 1) & 0xFF
        pos += 1
        for _ in range(es[E_NBUF] - 1):
            buf[np.uint64(pos)] = 0
            pos += 1
        low -= np.int64(1) << (32 - bits)
    else:
        if es[E_NBUF] > 0:
            buf[np.uint64(pos)] = es[E_BBYTE]
            pos += 1
        for _ in range(es[E_NBUF] - 1):
            buf[np.uint64(pos)] = 0xFF
            pos += 1
    es[E_NBUF] = 0
    low = ((low >> 8) << 1) + 1
    bits -= 1
    low = (low << (32 - (24 - bits))) & 0xFFFFFFFF
    i = 0
    while i < 24 - bits:
        buf[np.uint64(pos)] = (low >> (24 - i)) & 0xFF
        pos += 1
        i += 8
    es[E_LOW] = low
    es[E_BITS] = bits
    es[E_POS] = pos


# ---------------------------------------------------------------------------------------- decoder

@kernel
def next_byte(ds, data):
    """The next payload byte, or 0 past the end (the read position still advances)."""
    pos = ds[D_POS]
    ds[D_POS] = pos + 1
    if pos < data.shape[0]:
        return np.int64(data[np.uint64(pos)])
    return np.int64(0)


@kernel
def dec_init(ds, data):
    ds[D_POS] = 0
    hi = next_byte(ds, data)
    ds[D_VALUE] = (hi << 8) + next_byte(ds, data)
    ds[D_RANGE] = 510
    ds[D_BITS] = -8


@kernel_inline
def dbin(ctx, c, ds, data, value, rng, bits):
    """Decodes one regular bin with context row ``c`` and updates that context. -> (bin, value, rng, bits)"""
    s01 = np.int64(ctx[np.uint64(c), 1])
    a = s01 >> 7
    if a < 0:
        a = -a
    rlps = _RPS[np.uint64(a + (rng & 0xE0))]
    rmps = rng - rlps
    lps = np.int64((value >> 7) >= rmps)  # branch-free selection: bins are hard to predict
    mask = -lps
    value -= (rmps << 7) & mask
    rng = rmps ^ ((rmps ^ rlps) & mask)
    b = (1 if s01 >= 0 else 0) ^ lps
    n = RENORM[np.uint64(rng)]
    rng <<= n
    value <<= n
    bits += n
    if bits >= 0:
        value += next_byte(ds, data) << bits
        bits -= 8
    ctx_update(ctx, c, b)
    return b, value, rng, bits


@kernel
def dbypass(n, ds, data, value, rng, bits):
    """Decodes ``n`` bypass bins (MSB first) as an unsigned integer. -> (v, value, bits)"""
    v = np.int64(0)
    sr = rng << 7
    for _ in range(n):
        value <<= 1
        bits += 1
        if bits >= 0:
            value += next_byte(ds, data)
            bits = -8
        v <<= 1
        if value >= sr:
            value -= sr
            v += 1
    return v, value, bits


@kernel
def dec_bin(ds, data, ctx, c):
    """Array-state form of :func:`dbin`."""
    b, ds[D_VALUE], ds[D_RANGE], ds[D_BITS] = dbin(ctx, c, ds, data, ds[D_VALUE], ds[D_RANGE], ds[D_BITS])
    return b


@kernel
def dec_bypass(ds, data, n):
    """Array-state form of :func:`dbypass`."""
    v, ds[D_VALUE], ds[D_BITS] = dbypass(n, ds, data, ds[D_VALUE], ds[D_RANGE], ds[D_BITS])
    return v


@kernel
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
            ds[D_VALUE] += next_byte(ds, data)
            ds[D_BITS] = -8
    return 0


@kernel
def dec_position(ds, bits):
    """Bit position of the decoder as entry points count it: 8 * bytes read - 8 + bits needed."""
    return 8 * ds[D_POS] - 8 + bits
