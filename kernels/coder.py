"""Bit-exact DeepCABAC coding of integer tensors (NNCodec 2.1.3's C++ ``deepCABAC`` coder): public API.

One arithmetic-coded payload (an NDU's) holds, per tensor, optional bypass fields (the qp_delta
``iae_v``) and the tensor's levels; it ends with the terminating bin and flush::

    enc = CabacEncoder(unary_length=11, param_opt=True)
    enc.iae_v(8, -32)                                   # qp_delta, 6 + qp_density bits
    enc.encode_layer(levels, dq=False)                  # contexts are re-initialised per tensor
    payload = enc.finish()

    dec = CabacDecoder(payload, unary_length=11)
    qp_delta = dec.iae_v(8)
    levels, eps = dec.decode_layer(levels.shape, dq=False)
    assert dec.finish() == len(payload)

Tensors of any rank are coded as an H x W matrix, H = shape[0] and W = prod(shape[1:]) (W = 1 for
1-D and 0-d tensors). Tensors with H == 1 or W == 1 are always raster-scanned, as in NNCodec. For
DQ tensors the levels are NNCodec's reconstruction indices k; the coder transmits the DQ-coded
levels and checks that every k is reachable from its DQ state. Codebook settings only count in
profile 1 (as in NNCodec, profile 0 codes codebook levels unbounded) and never go with DQ.
Differential updates (profile 1) may use temporal context adaptation (``base``: the previous
version's levels) and HDSP (``hdsp_hist``: where levels were ever non-zero); both only select
contexts. Entry points (:class:`EntryPoints`) come out of the decoder, which is also how an encoder
learns what ``entry_point_list()`` must carry: decode the finished payload.

Everything here is thread-safe per object and the kernels release the GIL, so the tensors of a
model can be coded in parallel: see :func:`encode_many` / :func:`decode_many`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from nncjax.kernels import contexts as _ctx
from nncjax.kernels import engine as _eng
from nncjax.kernels import levels as _lv
from nncjax.kernels.bits import as_bytes

from nncjax.errors import BitstreamError, InputError, LimitError, UnsupportedStreamError

__all__ = [
    "LEVEL_MAX",
    "CabacDecoder",
    "CabacEncoder",
    "EntryPoints",
    "decode_levels",
    "decode_many",
    "encode_levels",
    "encode_many",
]

#: Largest |k| accepted with DQ: NNCodec's int32 k -> q conversion (k +- 1) overflows beyond it. Without
#: DQ every int32 level codes (NNCodec's encoder and decoder round-trip -2**31 and 2**31 - 1 exactly).
LEVEL_MAX = 2**31 - 2
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
#: Most elements a decoded tensor may have (NNCodec's C++ coder indexes with int32, as DecodeLimits).
_MAX_ELEMENTS = 2**31 - 1
#: Initial encoder buffer beyond which a ``capacity`` hint is not taken up front (the buffer grows anyway).
_MAX_INITIAL_CAPACITY = 2**30


@dataclass(frozen=True)
class EntryPoints:
    """Entry points of one tensor, as ``entry_point_list()`` signals them (one per block row but the
    first; empty unless scan_order > 0 and the tensor has more than one block row).

    * ``value``    int64 (n,): ``cabac_entry_point_value`` (u8), top 8 bits of the decoder's value register.
    * ``dq_state`` int64 (n,): ``cabac_entry_point_dq_state`` (u3, written only if dq_flag).
    * ``offset``   int64 (n,): D_j, the decoder bit position of entry point j+1 minus that of entry
      point j (entry point 0 = the first weight of the tensor). The writer codes D_0 as ue(11) and
      then D_j - D_{j-1} as ie(7).
    * ``start``    int: absolute decoder bit position of entry point 0 within the payload (-1 if none).
    """

    value: np.ndarray
    dq_state: np.ndarray
    offset: np.ndarray
    start: int = -1

    def __len__(self) -> int:
        return int(self.value.shape[0])


# ------------------------------------------------------------------------------------ validation

def _check_int(name, v, lo, hi):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise InputError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
    return int(v)


def _matrix_dims(shape):
    try:
        shape = tuple(int(_check_int("shape entry", d, 0, 2**62)) for d in shape)
    except TypeError:
        raise InputError(f"shape must be a sequence of non-negative integers, got {shape!r}") from None
    height = shape[0] if len(shape) >= 1 else 1
    width = math.prod(shape[1:])  # Python ints: an int64 product could wrap past the element-count check
    return shape, height, width


def _side_info(name, a, shape, n, dtype):
    """A TCA base or HDSP history array: same shape as the tensor, integers -> flat ``dtype``."""
    a = np.asarray(a)
    if a.shape != tuple(shape) and a.size != n:
        raise InputError(f"{name} must have the tensor's shape {tuple(shape)}, got {a.shape}")
    if a.dtype.kind not in "iub":
        raise InputError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.size and (int(a.min()) < np.iinfo(dtype).min or int(a.max()) > np.iinfo(dtype).max):
        raise InputError(f"{name} values do not fit {np.dtype(dtype).name}")
    return np.ascontiguousarray(a.reshape(-1), dtype=dtype)


class _Layer:
    """Validated per-tensor settings, shared by encoder and decoder."""

    def __init__(self, shape, unary_length, dq, scan_order, profile, codebook_size, codebook_offset,
                 parent_present, base, hdsp_hist):
        self.shape, self.height, self.width = _matrix_dims(shape)
        self.n_gtx = _check_int("unary_length", unary_length, 1, 256)
        self.dq = bool(dq)
        self.scan_order = _check_int("scan_order", scan_order, 0, 4)
        if self.width == 1 or self.height * self.width == self.width:
            self.scan_order = 0  # NNCodec's coder raster-scans single rows and columns
        self.profile = _check_int("profile", profile, 0, 1)
        cbs = _check_int("codebook_size", codebook_size, 0, 2**31 - 1)
        off = _check_int("codebook_offset", codebook_offset, 0, max(cbs - 1, 0))
        if self.profile == 0:
            cbs = off = 0  # NNCodec passes no codebook to the coder in profile 0
        if cbs > 0 and self.dq:
            raise InputError("dependent quantization cannot be combined with a codebook")
        self.cbs, self.off = cbs, off
        self.bounded = self.profile == 1 and cbs > 0
        self.parent_present = bool(parent_present)
        self.rs_block = self.profile == 1 and self.width > 1 and self.height > 1 and cbs != 1
        n = self.height * self.width
        self.tca = base is not None
        self.base = _side_info("base", base, self.shape, n, np.int32) if self.tca else np.zeros(1, np.int32)
        self.hdsp = hdsp_hist is not None
        self.hist = _side_info("hdsp_hist", hdsp_hist, self.shape, n, np.int8) if self.hdsp else np.zeros(1, np.int8)
        if (self.tca or self.hdsp) and self.profile != 1:
            raise InputError("TCA (base) and HDSP (hdsp_hist) exist only in profile 1")
        if self.hdsp and not self.parent_present:
            raise InputError("HDSP (hdsp_hist) needs parent_present (a differential NDU)")
        hdsp_possible = self.rs_block and self.parent_present  # where hist_dep_sig_prob_enabled_flag is coded
        self.ci_list = _ctx.signalled_contexts(self.n_gtx, self.dq, cbs, off, tca=self.tca, hdsp=hdsp_possible)
        self.ci_ctx = _ctx.ci_context(self.n_gtx)
        self.rs_ctx = _ctx.rs_context(self.n_gtx)
        self.n_ctx = _ctx.num_contexts(self.n_gtx)

    def check_levels(self, levels):
        a = np.asarray(levels)
        if a.dtype.kind not in "iu":
            raise InputError(f"levels must be an integer array, got dtype {a.dtype}")
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            if self.bounded:
                if lo < -self.off or hi > self.cbs - 1 - self.off:
                    raise InputError(f"codebook levels must lie in [{-self.off}, {self.cbs - 1 - self.off}], "
                                     f"got [{lo}, {hi}]")
            elif self.dq and (lo < -LEVEL_MAX or hi > LEVEL_MAX):
                raise InputError(f"DQ levels must lie in [-{LEVEL_MAX}, {LEVEL_MAX}], got [{lo}, {hi}]")
            elif lo < _INT32_MIN or hi > _INT32_MAX:
                raise InputError(f"levels must lie in the int32 range, got [{lo}, {hi}]")
        return np.ascontiguousarray(a.reshape(-1), dtype=np.int32)


# --------------------------------------------------------------------------------------- encoder

class CabacEncoder:
    """DeepCABAC encoder of one arithmetic-coded payload (NNCodec ``deepCABAC.Encoder``).

    ``unary_length`` N = cabac_unary_length_minus1 + 1 (1..256, NNCodec's default 11);
    ``param_opt``: run NNCodec's context-initialisation search per tensor (changes the bytes, not
    decodability). Not shareable between threads; use one encoder per payload.

    >>> enc = CabacEncoder(unary_length=11, param_opt=True)
    >>> enc.iae_v(8, -32)
    >>> enc.encode_layer(np.array([[3, -6, 0], [64, 0, -1], [0, 0, 0]], np.int32), dq=False)
    >>> enc.finish().hex(' ')
    'df 66 80 0a a1 85 78 3b ba 87'
    """

    def __init__(self, unary_length: int = 11, param_opt: bool = True, capacity: int = 4096):
        self.unary_length = _check_int("unary_length", unary_length, 1, 256)
        self.param_opt = bool(param_opt)
        capacity = _check_int("capacity", capacity, 0, 2**62)
        self._es = np.zeros(_eng.ENC_STATE_SIZE, np.int64)
        _eng.enc_init(self._es)
        self._buf = np.empty(min(max(capacity, 64), _MAX_INITIAL_CAPACITY), np.uint8)
        self._done = False

    def _room(self, need):
        """Grows the buffer (by doubling) so that ``need`` bytes are free after the write position."""
        self._check_open()
        pos = int(self._es[_eng.E_POS])
        if self._buf.shape[0] - pos < need:
            grown = np.empty(max(2 * self._buf.shape[0], pos + need + 1024), np.uint8)
            grown[:pos] = self._buf[:pos]
            self._buf = grown

    def _check_open(self):
        if self._done:
            raise InputError("the encoder is finished; start a new CabacEncoder")

    def uae_v(self, nbits: int, value: int) -> None:
        """Writes ``value`` (0 <= value < 2**nbits) as ``nbits`` bypass bins, MSB first (nbits 0..32).

        >>> enc = CabacEncoder(); enc.uae_v(5, 21); payload = enc.finish()
        >>> dec = CabacDecoder(payload); dec.uae_v(5), dec.finish() == len(payload)
        (21, True)
        """
        nbits = _check_int("nbits", nbits, 0, 32)
        value = _check_int("value", value, 0, (1 << nbits) - 1)
        self._room(_eng.enc_room(self._es, nbits))
        _eng.enc_bypass(self._es, self._buf, value, nbits)

    def iae_v(self, nbits: int, value: int) -> None:
        """Writes signed ``value`` as ``nbits`` bypass bins in two's complement (nbits 1..32).

        >>> enc = CabacEncoder(); enc.iae_v(8, -32); enc.iae_v(3, 3); payload = enc.finish()
        >>> dec = CabacDecoder(payload); dec.iae_v(8), dec.iae_v(3)
        (-32, 3)
        >>> CabacEncoder().iae_v(8, 128)
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: value must be an integer in -128..127, got 128
        """
        nbits = _check_int("nbits", nbits, 1, 32)
        value = _check_int("value", value, -(1 << (nbits - 1)), (1 << (nbits - 1)) - 1)
        self._room(_eng.enc_room(self._es, nbits))
        _eng.enc_bypass(self._es, self._buf, value & ((1 << nbits) - 1), nbits)

    def encode_layer(self, levels, *, dq: bool, scan_order: int = 0, row_skipping: bool = False,
                     profile: int = 1, codebook_size: int = 0, codebook_offset: int = 0,
                     parent_present: bool = False, base=None, hdsp_hist=None, unary_length: int | None = None,
                     strict_dq: bool = True):
        """Codes one tensor's integer levels (any shape, integer dtype; int32 values, |k| <= LEVEL_MAX with DQ).

        Same bytes as NNCodec's ``initCtxModels(N, param_opt)`` + ``encodeLayer(...)``:
        row-skip block (profile 1, H > 1, W > 1; rows that are all zero are skipped when
        ``row_skipping``), ci_flags (with the init search if ``param_opt``), then the levels in scan
        order (``scan_order`` 0..4: raster or 8/16/32/64 blocks; ignored if H == 1 or W == 1).
        ``codebook_size``/``codebook_offset`` (profile 1): levels lie in [-offset, size-1-offset].
        ``parent_present``: the NDU has parent_node_id_present_flag (then hist_dep_sig_prob_enabled_flag
        is coded where the row-skip block is: 1 iff ``hdsp_hist`` is given).
        ``base`` (profile 1, temporal context adaptation): the co-located integer levels of the
        previous version of this tensor (k for DQ), same shape; selects contexts only.
        ``hdsp_hist`` (profile 1, needs ``parent_present``): int array of the tensor's shape, 1 where a
        level was ever non-zero in earlier updates; used where the flag is coded.
        ``strict_dq``: a DQ index k that its DQ state cannot produce raises InputError. With
        ``strict_dq=False`` it is coded as NNCodec codes it, ``q = (k + sgn(k)*(state & 1)) >> 1``,
        and decodes to the neighbouring reachable index (needed for NNCodec's bit-depth clipping).
        Raises InputError for bad levels.

        ``levels``: integer array of any shape (coded as ``shape[0] x prod(shape[1:])``).

        >>> levels = (np.arange(64, dtype=np.int32).reshape(16, 4) % 7) - 3       # H = 16, W = 4
        >>> enc = CabacEncoder(); enc.encode_layer(levels, dq=False, scan_order=1); payload = enc.finish()
        >>> dec = CabacDecoder(payload); out, eps = dec.decode_layer((16, 4), dq=False, scan_order=1)
        >>> np.array_equal(out, levels), out.dtype, len(eps)   # 2 block rows of 8: one entry point
        (True, dtype('int32'), 1)
        >>> CabacEncoder().encode_layer(np.array([1.5]), dq=False)
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: levels must be an integer array, got dtype float64
        """
        self._check_open()
        a = np.asarray(levels)
        lay = _Layer(a.shape, self.unary_length if unary_length is None else unary_length, dq, scan_order,
                     profile, codebook_size, codebook_offset, parent_present, base, hdsp_hist)
        flat = lay.check_levels(a)
        ctx = np.empty((lay.n_ctx, 5), np.int32)
        cand = np.empty((lay.n_ctx, _ctx.CAND_WIDTH), np.int16)
        cacc = np.empty((lay.n_ctx, 9), np.int64)
        skip, adv, info = np.empty(lay.height, np.int64), np.empty(8, np.int64), np.zeros(2, np.int64)
        saved = self._es.copy()
        need = 2 * flat.size + 8 * lay.height + 4096  # enough for all but extreme levels
        while True:
            self._room(need)
            status = _lv.encode_tensor(
                self._es, self._buf, ctx, cand, cacc, skip, adv, flat, lay.base, lay.tca, lay.hist, lay.hdsp,
                lay.height, lay.width, lay.n_gtx, lay.dq, bool(strict_dq), lay.scan_order, bool(row_skipping) and lay.profile == 1, lay.parent_present, lay.rs_block,
                lay.bounded, lay.cbs, lay.off, self.param_opt, lay.ci_list, lay.ci_ctx, lay.rs_ctx, info)
            if status != _lv.ERR_ROOM:
                break
            self._es[:] = saved
            need = 2 * (self._buf.shape[0] - int(saved[_eng.E_POS]))
        if status == _lv.ERR_DQ_LEVEL:
            self._done = True  # the payload is now inconsistent
            pos = np.unravel_index(int(info[0]), a.shape) if a.ndim else ()
            raise InputError(f"DQ level {int(flat[info[0]])} at index {tuple(int(i) for i in pos)} is not "
                             f"reachable from its dependent-quantization state")

    def finish(self) -> bytes:
        """Codes the terminating bin, flushes, and returns the payload bytes. Ends this encoder.

        >>> enc = CabacEncoder(); enc.uae_v(5, 21); enc.finish().hex()
        'af4c'
        >>> enc.uae_v(5, 21)
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: the encoder is finished; start a new CabacEncoder
        """
        self._room(_eng.enc_room(self._es, 40))
        _eng.enc_terminate_and_finish(self._es, self._buf)
        self._done = True
        return self._buf[: self._es[_eng.E_POS]].tobytes()


# --------------------------------------------------------------------------------------- decoder

class CabacDecoder:
    """DeepCABAC decoder of one arithmetic-coded payload (NNCodec ``deepCABAC.Decoder``).

    ``data``: bytes, bytearray, memoryview or uint8 array holding the payload (trailing bytes are
    allowed; :meth:`finish` reports how many were consumed). Never reads out of bounds; malformed or
    truncated payloads raise :class:`~nncjax.BitstreamError`.

    >>> dec = CabacDecoder(bytes.fromhex('df66800aa185783bba87'), unary_length=11)
    >>> dec.iae_v(8)
    -32
    >>> dec.decode_layer((3, 3), dq=False)[0].tolist()
    [[3, -6, 0], [64, 0, -1], [0, 0, 0]]
    >>> dec.finish()
    10
    """

    def __init__(self, data, unary_length: int = 11):
        self._data = np.frombuffer(as_bytes(data, "data"), np.uint8)
        self.unary_length = _check_int("unary_length", unary_length, 1, 256)
        self._ds = np.zeros(_eng.DEC_STATE_SIZE, np.int64)
        _eng.dec_init(self._ds, self._data)
        self._done = False

    @property
    def bytes_read(self) -> int:
        """Bytes the decoder has read so far (including its 2-byte look-ahead).

        >>> enc = CabacEncoder(); enc.uae_v(5, 21); enc.iae_v(8, -32); payload = enc.finish()
        >>> dec = CabacDecoder(payload); dec.bytes_read
        2
        >>> dec.uae_v(5), dec.iae_v(8), dec.finish(), dec.bytes_read, len(payload)
        (21, -32, 3, 3, 3)
        """
        return int(self._ds[_eng.D_POS])

    def _check(self, field):
        if self._done:
            raise InputError("the decoder is finished")
        if self._ds[_eng.D_POS] > self._data.shape[0]:
            raise BitstreamError(f"DeepCABAC payload: data ran out while decoding {field}")

    def uae_v(self, nbits: int) -> int:
        """Reads ``nbits`` bypass bins as an unsigned integer (nbits 0..32).

        >>> enc = CabacEncoder(); enc.uae_v(32, 2**32 - 1); enc.uae_v(0, 0); enc.uae_v(3, 5)
        >>> dec = CabacDecoder(enc.finish()); dec.uae_v(32), dec.uae_v(0), dec.uae_v(3)
        (4294967295, 0, 5)
        """
        nbits = _check_int("nbits", nbits, 0, 32)
        self._check("uae_v")
        v = int(_eng.dec_bypass(self._ds, self._data, nbits))
        self._check("uae_v")
        return v

    def iae_v(self, nbits: int) -> int:
        """Reads ``nbits`` bypass bins as a two's-complement signed integer (nbits 1..32).

        >>> dec = CabacDecoder(bytes.fromhex('df66800aa185783bba87'))   # the class example's payload
        >>> dec.iae_v(8)                                                 # its qp_delta
        -32
        """
        nbits = _check_int("nbits", nbits, 1, 32)
        v = self.uae_v(nbits)
        return v - (1 << nbits) if v >> (nbits - 1) else v

    def decode_layer(self, shape, *, dq: bool, scan_order: int = 0, profile: int = 1, codebook_size: int = 0,
                     codebook_offset: int = 0, parent_present: bool = False, base=None, hdsp_hist=None,
                     unary_length: int | None = None):
        """Decodes one tensor of ``shape``; returns ``(levels int32 of shape, EntryPoints)``.

        Settings as in :meth:`CabacEncoder.encode_layer` (they come from the NDU header; ``base`` for
        TCA, ``hdsp_hist`` when the payload may enable HDSP, else BitstreamError if it does). Block-row
        resets are applied while decoding sequentially, so the signalled entry points are not needed;
        the returned ones are what ``entry_point_list()`` must carry. For DQ tensors the levels are the
        reconstruction indices k. Time is bounded by the number of elements.

        >>> k = np.array([[0, 2], [-2, 1]], np.int32)                         # DQ: reconstruction indices
        >>> enc = CabacEncoder(); enc.encode_layer(k, dq=True); payload = enc.finish()
        >>> levels, eps = CabacDecoder(payload).decode_layer((2, 2), dq=True)
        >>> levels.tolist(), levels.dtype, len(eps), eps.start                 # scan_order 0: no entry points
        ([[0, 2], [-2, 1]], dtype('int32'), 0, -1)
        """
        self._check("decode_layer")
        lay = _Layer(shape, self.unary_length if unary_length is None else unary_length, dq, scan_order, profile,
                     codebook_size, codebook_offset, parent_present, base, hdsp_hist)
        if lay.height * lay.width > _MAX_ELEMENTS:  # checked before allocating: the shape may not be the payload's
            raise LimitError(f"shape {lay.shape} has {lay.height * lay.width} elements, more than the coder's "
                             f"{_MAX_ELEMENTS}")
        out = np.empty(lay.height * lay.width, np.int32)
        ctx = np.empty((lay.n_ctx, 5), np.int32)
        skip, adv = np.empty(lay.height, np.int64), np.empty(8, np.int64)
        n_brows = max(-(-lay.height // (4 << lay.scan_order)), 1) if lay.scan_order else 1
        ep = np.zeros((3, n_brows), np.int64)
        info = np.zeros(2, np.int64)
        status = _lv.decode_tensor(self._ds, self._data, ctx, skip, adv, out, lay.base, lay.tca, lay.hist, lay.hdsp,
                                   lay.height, lay.width, lay.n_gtx, lay.dq,
                                   lay.scan_order, lay.parent_present, lay.rs_block, lay.bounded, lay.cbs, lay.off,
                                   lay.ci_list, lay.ci_ctx, lay.rs_ctx, ep[0], ep[1], ep[2], info)
        if status == _lv.ERR_NO_HIST:
            self._done = True
            raise UnsupportedStreamError("DeepCABAC payload: hist_dep_sig_prob_enabled_flag = 1 (HDSP) but no "
                                         "hdsp_hist was given for this tensor (the history of earlier updates)")
        if status != _lv.OK:
            what = {_lv.ERR_PREFIX: "remainder prefix longer than 30 bins",
                    _lv.ERR_OVERFLOW: "level exceeds the int32 range"}[status]
            self._done = True
            raise BitstreamError(f"DeepCABAC payload, level {int(info[0])}: {what}")
        self._check("the levels")
        has_eps = lay.scan_order != 0 and n_brows > 1
        pos = ep[0]
        eps = EntryPoints(value=ep[1, 1:].copy() if has_eps else np.zeros(0, np.int64),
                          dq_state=ep[2, 1:].copy() if has_eps else np.zeros(0, np.int64),
                          offset=np.diff(pos) if has_eps else np.zeros(0, np.int64),
                          start=int(pos[0]) if has_eps else -1)
        return out.reshape(lay.shape), eps

    def finish(self) -> int:
        """Decodes the terminating bin; returns the payload bytes consumed. Ends this decoder.

        Raises BitstreamError if the bin is not 1 or the data ran out before it.

        >>> enc = CabacEncoder(); enc.uae_v(5, 21); payload = enc.finish()
        >>> dec = CabacDecoder(payload + bytes(3)); dec.uae_v(5)             # trailing bytes are allowed
        21
        >>> dec.finish(), len(payload)                                        # ... and not consumed
        (2, 2)
        """
        self._check("the terminating bin")
        self._done = True
        if not _eng.dec_terminate(self._ds, self._data):
            raise BitstreamError("DeepCABAC payload: terminating bin not found where the payload should end")
        if self._ds[_eng.D_POS] > self._data.shape[0]:
            raise BitstreamError("DeepCABAC payload: data ran out before the terminating bin")
        return int(self._ds[_eng.D_POS])


# ----------------------------------------------------------------------------- one-tensor helpers

def encode_levels(levels, *, dq: bool, unary_length: int = 11, param_opt: bool = True, **layer_kwargs) -> bytes:
    """One tensor as a complete, terminated payload (no qp_delta). ``layer_kwargs``: see
    :meth:`CabacEncoder.encode_layer`.

    >>> decode_levels(encode_levels(np.arange(6, dtype=np.int32).reshape(2, 3), dq=False), (2, 3), dq=False)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=int32)
    """
    enc = CabacEncoder(unary_length, param_opt, capacity=np.asarray(levels).size // 2 + 1024)
    enc.encode_layer(levels, dq=dq, **layer_kwargs)
    return enc.finish()


def decode_levels(data, shape, *, dq: bool, unary_length: int = 11, **layer_kwargs) -> np.ndarray:
    """Inverse of :func:`encode_levels`: int32 levels of ``shape``. Raises BitstreamError if ``data``
    is malformed or has bytes left over after the terminating bin.

    >>> data = encode_levels(np.array([[0, 2], [-2, 1]], np.int32), dq=True)   # DQ: k values
    >>> decode_levels(data, (2, 2), dq=True)
    array([[ 0,  2],
           [-2,  1]], dtype=int32)
    """
    layer_kwargs.pop("row_skipping", None)  # an encoder-side choice; the decoder reads it
    dec = CabacDecoder(data, unary_length)
    levels, _ = dec.decode_layer(shape, dq=dq, **layer_kwargs)
    used = dec.finish()
    if used != len(dec._data):
        raise BitstreamError(f"DeepCABAC payload: {len(dec._data) - used} bytes left after the terminating bin")
    return levels


def _pool_map(fn, jobs, workers):
    """``[fn(j) for j in jobs]`` on ``workers`` threads (a positive integer; 1: in this thread)."""
    workers = _check_int("workers", workers, 1, 2**31 - 1)
    if workers == 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(fn, jobs))


def encode_many(tensors, *, workers: int = 2, **common) -> list[bytes]:
    """:func:`encode_levels` over many tensors on ``workers`` threads (the kernels release the GIL).

    ``tensors``: a list whose items are level arrays or dicts of :func:`encode_levels` keyword
    arguments (with ``levels``); ``common`` supplies the rest (e.g. ``dq=True, unary_length=11``).

    >>> [len(b) for b in encode_many([np.zeros(4, np.int32), np.ones(4, np.int32)], dq=False)]
    [4, 5]
    """
    jobs = [dict(common, **(t if isinstance(t, dict) else {"levels": t})) for t in tensors]

    def run(kw):
        kw = dict(kw)
        if "levels" not in kw:
            raise InputError("a tensor given as a dict of settings needs the key 'levels'")
        return encode_levels(kw.pop("levels"), **kw)

    return _pool_map(run, jobs, workers)


def decode_many(streams, shapes, *, workers: int = 2, **common) -> list[np.ndarray]:
    """:func:`decode_levels` over many payloads on ``workers`` threads; ``common`` as in
    :func:`encode_many` (a per-item dict of settings may be given in place of a shape, with key ``shape``).
    Returns one int32 array per payload, of its shape.

    >>> streams = encode_many([np.arange(4, dtype=np.int32), np.zeros((2, 2), np.int32)], dq=False)
    >>> [a.tolist() for a in decode_many(streams, [(4,), {"shape": (2, 2)}], dq=False)]
    [[0, 1, 2, 3], [[0, 0], [0, 0]]]
    """
    streams, shapes = list(streams), list(shapes)
    if len(streams) != len(shapes):  # zip would silently drop the extra ones
        raise InputError(f"{len(streams)} streams but {len(shapes)} shapes")
    jobs = [(s, dict(common, **(sh if isinstance(sh, dict) else {"shape": sh}))) for s, sh in zip(streams, shapes)]

    def run(job):
        data, kw = job
        kw = dict(kw)
        if "shape" not in kw:
            raise InputError("a payload's dict of settings needs the key 'shape'")
        return decode_levels(data, kw.pop("shape"), **kw)

    return _pool_map(run, jobs, workers)
