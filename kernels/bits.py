"""Bit-level writer and reader for the NNR high-level syntax descriptors (nnr-format.md §1).

Descriptors: ``u(n)``, ``i(n)``, ``ue(k)``, ``ie(k)``, ``flt(32)`` (little-endian bytes, as NNCodec
writes them), ``st(v)`` (UTF-8 + 0x00, byte-aligned), ``byte_alignment()`` (always at least one bit)
and raw float32 tensors. Bits are MSB-first.

The reader is meant for hostile input: it never reads past the end it was given, every failure is a
:class:`nncjax.BitstreamError` whose message names the unit (``where``) and the field, and nothing is
allocated before the bytes it would be filled from are known to be present.

Example::

    >>> w = BitWriter()
    >>> w.u(3, 5); w.ue(0, 4); w.byte_alignment()
    >>> data = w.getvalue()
    >>> r = BitReader(data)
    >>> r.u(3, "a"), r.ue(0, "b")
    (5, 4)
"""

from __future__ import annotations

import operator

import numpy as np

from nncjax.errors import BitstreamError, InputError

__all__ = ["MAX_EXP_GOLOMB_BITS", "BitReader", "BitWriter", "ie_to_ue", "ue_length", "ue_to_ie"]

# An Exp-Golomb code word of k + j leading-zero-adjusted bits yields a value below 2**(k+j+1); this
# bound keeps every decoded value inside int64 and stops absurd prefixes early.
MAX_EXP_GOLOMB_BITS = 62


def ie_to_ue(x: int) -> int:
    """Map a signed value onto the unsigned Exp-Golomb index: x > 0 -> 2x-1, x <= 0 -> -2x.

    Example:

    >>> ie_to_ue(-2), ie_to_ue(3)
    (4, 5)
    >>> [ie_to_ue(x) for x in (0, 1, -1, 2, -2)]
    [0, 1, 2, 3, 4]
    """
    return (x << 1) - 1 if x > 0 else (-x) << 1


def ue_to_ie(m: int) -> int:
    """Inverse of :func:`ie_to_ue`: odd m -> (m+1)/2, even m -> -m/2. Example:

    >>> ue_to_ie(5)
    3
    >>> all(ue_to_ie(ie_to_ue(x)) == x for x in range(-1000, 1001))
    True
    """
    return (m + 1) >> 1 if m & 1 else -(m >> 1)


def _int(x, what: str) -> int:
    """An exact integer (int, bool, numpy integer); floats, None and strings are refused."""
    try:
        return operator.index(x)
    except TypeError:
        raise InputError(f"{what} needs an integer, got {type(x).__name__} {x!r}") from None


def as_bytes(data, what: str) -> bytes:
    """``data`` as bytes: bytes, bytearray, memoryview or a uint8 array. Anything else is refused, as
    ``bytes()`` would turn an int n into n zero bytes and reinterpret wider arrays."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.ndarray) and data.dtype != np.uint8:
        raise InputError(f"{what} must be bytes-like or a uint8 array, got a {data.dtype} array")
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise InputError(f"{what} must be bytes-like or a uint8 array, got {type(data).__name__}") from None


def ue_length(k: int, x: int) -> int:
    """Number of bits of ``ue(k)`` coding ``x >= 0``. Example:

    >>> ue_length(0, 4)
    5
    >>> w = BitWriter(); w.ue(0, 4); w.bit_length          # what the writer spends on it
    5
    """
    k, x = _int(k, "ue_length order k"), _int(x, "ue_length value x")
    if k < 0 or x < 0:  # a negative x would silently count as one bit
        raise InputError(f"ue_length needs k >= 0 and x >= 0, got k={k}, x={x}")
    n = 0
    while x >= (1 << k):
        x -= 1 << k
        k += 1
        n += 1
    return n + 1 + k


class BitWriter:
    """Appends descriptors MSB-first to a growing byte buffer.

    Values out of range for their descriptor raise :class:`nncjax.InputError` (a writer bug or a bad
    argument, never silently truncated).
    """

    __slots__ = ("_acc", "_buf", "_nacc")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._acc = 0  # pending bits not yet forming a whole byte
        self._nacc = 0

    @property
    def bit_length(self) -> int:
        """Number of bits written so far.

        >>> w = BitWriter(); w.u(3, 5); w.bit_length
        3
        >>> w.byte_alignment(); w.bit_length
        8
        """
        return 8 * len(self._buf) + self._nacc

    @property
    def aligned(self) -> bool:
        """Whether the bits written so far end on a byte boundary.

        >>> w = BitWriter(); w.aligned
        True
        >>> w.u(3, 5); w.aligned
        False
        """
        return self._nacc == 0

    def getvalue(self) -> bytes:
        """The written bytes; a trailing partial byte is zero-padded (use byte_alignment() first).

        >>> w = BitWriter(); w.u(3, 5); w.getvalue()          # 101 + 00000 padding
        b'\\xa0'
        """
        if self._nacc:
            return bytes(self._buf) + bytes([(self._acc << (8 - self._nacc)) & 0xFF])
        return bytes(self._buf)

    def u(self, n: int, x: int) -> None:
        """Unsigned ``x`` in ``n`` bits, 0 <= x < 2**n.

        >>> w = BitWriter(); w.u(4, 0xA); w.u(12, 0x3F1); w.getvalue().hex()
        'a3f1'
        >>> w.u(2, 4)
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: u(2) cannot hold 4
        """
        x = _int(x, f"u({n})")
        if n <= 0 or x < 0 or x >> n:
            raise InputError(f"u({n}) cannot hold {x}")
        acc = (self._acc << n) | x
        nacc = self._nacc + n
        if nacc >= 8:
            nbytes = nacc >> 3
            rest = nacc & 7
            self._buf += (acc >> rest).to_bytes(nbytes, "big")
            acc &= (1 << rest) - 1
            nacc = rest
        self._acc, self._nacc = acc, nacc

    def i(self, n: int, x: int) -> None:
        """Two's-complement signed ``x`` in ``n`` bits.

        >>> w = BitWriter(); w.i(4, -3); w.i(4, 7); w.getvalue().hex()   # 1101 0111
        'd7'
        """
        x = _int(x, f"i({n})")
        if n <= 0 or not -(1 << (n - 1)) <= x < (1 << (n - 1)):
            raise InputError(f"i({n}) cannot hold {x}")
        self.u(n, x & ((1 << n) - 1))

    def ue(self, k: int, x: int) -> None:
        """k-th order unsigned Exp-Golomb of ``x >= 0``.

        >>> w = BitWriter(); w.ue(0, 4); w.byte_alignment(); w.getvalue().hex()   # 00101, then 100
        '2c'
        """
        x = _int(x, f"ue({k})")
        if x < 0:
            raise InputError(f"ue({k}) cannot hold negative {x}")
        j = 0
        while x >= (1 << k):
            x -= 1 << k
            k += 1
            j += 1
        if k > MAX_EXP_GOLOMB_BITS:  # k has grown by j: same bound as the reader's k0 + j
            raise InputError(f"ue value too large for the reader's bound (2**{MAX_EXP_GOLOMB_BITS})")
        # j zeros, a one, then x in k bits, as one field of j + 1 + k bits
        self.u(j + 1 + k, (1 << k) | x)

    def ie(self, k: int, x: int) -> None:
        """k-th order signed Exp-Golomb.

        >>> w = BitWriter(); w.ie(1, -2); w.bit_length        # ue(1) of ie_to_ue(-2) = 4
        4
        >>> BitReader(w.getvalue()).ie(1, "x")
        -2
        """
        self.ue(k, ie_to_ue(_int(x, f"ie({k})")))

    def flt(self, x) -> None:
        """float32 as 4 bytes, least significant byte first (NNCodec's order); no alignment needed.

        >>> w = BitWriter(); w.flt(1.0); w.getvalue().hex()   # 1.0f is 0x3f800000
        '0000803f'
        """
        a = np.asarray(x)
        if a.size != 1 or a.dtype.kind not in "fiu":  # None would become NaN, "1.5" would parse
            raise InputError(f"flt(32) needs one real number, got {x!r}")
        b = a.astype(np.float32).reshape(()).astype("<f4").tobytes()
        self.u(32, int.from_bytes(b, "big"))

    def st(self, v: str) -> None:
        """UTF-8 string plus a 0x00 terminator; must be byte-aligned.

        >>> w = BitWriter(); w.st("conv1.weight"); w.getvalue()
        b'conv1.weight\\x00'
        """
        if not isinstance(v, str):
            raise InputError(f"st(v) needs a str, got {type(v).__name__}")
        if "\x00" in v:
            raise InputError("st(v) string must not contain NUL")
        self._require_aligned("st(v)")
        try:
            self._buf += v.encode("utf-8", "strict") + b"\x00"
        except UnicodeEncodeError as e:  # lone surrogates
            raise InputError(f"st(v) string is not valid UTF-8 ({e.reason} at {e.start})") from None

    def byte_alignment(self) -> None:
        """One ``1`` bit then ``0`` bits up to the byte boundary (a whole 0x80 byte if aligned).

        >>> w = BitWriter(); w.u(3, 0); w.byte_alignment(); w.byte_alignment(); w.getvalue().hex()
        '1080'
        """
        self.u(1, 1)
        if self._nacc:
            self.u(8 - self._nacc, 0)

    def raw_bytes(self, data) -> None:
        """Append bytes at a byte boundary (e.g. an arithmetic-coded payload).

        >>> w = BitWriter(); w.u(8, 7); w.raw_bytes(b"\\x01\\x02"); w.getvalue().hex()
        '070102'
        """
        data = as_bytes(data, "raw bytes")
        self._require_aligned("raw bytes")
        self._buf += data

    def float32_array(self, x: np.ndarray) -> None:
        """Raw float32 tensor, C order, little-endian, byte-aligned (NNR_PT_RAW_FLOAT payload).

        ``x``: float32 array of any shape; 4 bytes per element are written.

        >>> w = BitWriter(); w.float32_array(np.arange(6, dtype=np.float32).reshape(2, 3)); w.bit_length
        192
        """
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise InputError(f"raw float tensor must be float32, got {x.dtype}")
        self._require_aligned("raw float tensor")
        self._buf += np.ascontiguousarray(x, dtype="<f4").tobytes()

    def _require_aligned(self, what: str) -> None:
        if self._nacc:
            raise InputError(f"{what} must start byte-aligned")


class BitReader:
    """Reads descriptors from ``data[start:end]`` (byte offsets), never past ``end``.

    Every method takes the field name used in error messages; ``where`` (e.g. ``"unit 3 (NNR_NDU)"``)
    prefixes them. Position and end are in bits.
    """

    __slots__ = ("_data", "end", "pos", "where")

    def __init__(self, data, start: int = 0, end: int | None = None, where: str = "bitstream") -> None:
        self._data = as_bytes(data, "data")
        n = len(self._data)
        start = _int(start, "reader window start")
        end = n if end is None else _int(end, "reader window end")
        if not 0 <= start <= end <= n:
            raise InputError(f"invalid reader window [{start}, {end}) for {n} bytes")
        self.pos = 8 * start
        self.end = 8 * end
        self.where = where

    # -- position helpers -------------------------------------------------------------------------
    @property
    def bits_left(self) -> int:
        """Bits between the current position and the end of the window.

        >>> r = BitReader(bytes(4), start=1); r.bits_left
        24
        >>> r.u(5, "x"), r.bits_left
        (0, 19)
        """
        return self.end - self.pos

    @property
    def aligned(self) -> bool:
        """Whether the position is on a byte boundary.

        >>> r = BitReader(bytes(2)); r.aligned
        True
        >>> r.u(1, "flag"), r.aligned
        (0, False)
        """
        return self.pos & 7 == 0

    @property
    def byte_pos(self) -> int:
        """Current position in bytes (rounded up to the next byte boundary).

        >>> r = BitReader(bytes(4)); r.u(9, "x"), r.pos, r.byte_pos
        (0, 9, 2)
        """
        return (self.pos + 7) >> 3

    def fail(self, field: str, msg: str, cls=BitstreamError):
        """Build (not raise) an error naming unit and field.

        >>> print(BitReader(b"", where="unit 3 (NNR_NDU)").fail("scan_order", "5 > 4"))
        unit 3 (NNR_NDU): field scan_order: 5 > 4
        """
        return cls(f"{self.where}: field {field}: {msg}")

    def need(self, nbits: int, field: str) -> None:
        """Raise unless ``nbits`` more bits are present (use before allocating for a count).

        >>> r = BitReader(b"\\x00"); r.need(8, "count")          # fine: 8 bits are there
        >>> r.need(9, "count")
        Traceback (most recent call last):
        ...
        nncjax.errors.BitstreamError: bitstream: field count: needs 9 bits but only 8 remain (truncated)
        """
        if nbits > self.end - self.pos:
            raise self.fail(field, f"needs {nbits} bits but only {self.end - self.pos} remain (truncated)")

    # -- descriptors ------------------------------------------------------------------------------
    def u(self, n: int, field: str) -> int:
        """Unsigned n-bit value.

        >>> r = BitReader(bytes.fromhex("a3f1")); r.u(4, "a"), r.u(12, "b")
        (10, 1009)
        """
        pos = self.pos
        if n > self.end - pos:
            raise self.fail(field, f"u({n}) needs {n} bits but only {self.end - pos} remain (truncated)")
        if n < 0:  # would move the position backwards and read garbage
            raise InputError(f"u({n}) for {field}: a field has 0 bits or more")
        first = pos >> 3
        last = (pos + n - 1) >> 3
        chunk = int.from_bytes(self._data[first:last + 1], "big")
        self.pos = pos + n
        return (chunk >> (((last + 1) << 3) - pos - n)) & ((1 << n) - 1)

    def i(self, n: int, field: str) -> int:
        """Two's-complement n-bit value.

        >>> r = BitReader(bytes.fromhex("d7")); r.i(4, "a"), r.i(4, "b")
        (-3, 7)
        """
        if n < 1:  # no sign bit to read
            raise InputError(f"i({n}) for {field}: a signed field has 1 bit or more")
        v = self.u(n, field)
        return v - (1 << n) if v >> (n - 1) else v

    def ue(self, k: int, field: str) -> int:
        """k-th order Exp-Golomb; prefixes making the value exceed 2**62 are rejected.

        >>> w = BitWriter(); w.ue(0, 4); w.ue(3, 100); w.byte_alignment()
        >>> r = BitReader(w.getvalue()); r.ue(0, "a"), r.ue(3, "b")
        (4, 100)
        >>> BitReader(bytes(8)).ue(0, "c")                     # 64 zero bits: no valid code word
        Traceback (most recent call last):
        ...
        nncjax.errors.BitstreamError: bitstream: field c: ue(0) prefix of more than 62 zeros
        """
        data, pos, end = self._data, self.pos, self.end
        j = 0
        while True:
            if pos >= end:
                raise self.fail(field, f"ue({k}) runs past the end (truncated)")
            if (data[pos >> 3] >> (7 - (pos & 7))) & 1:
                break
            pos += 1
            j += 1
            if k + j > MAX_EXP_GOLOMB_BITS:
                raise self.fail(field, f"ue({k}) prefix of more than {MAX_EXP_GOLOMB_BITS - k} zeros")
        self.pos = pos + 1
        # j leading zeros contributed 2**k + ... + 2**(k+j-1) = 2**k * (2**j - 1)
        value = ((1 << j) - 1) << k
        if k + j:
            value += self.u(k + j, field)
        return value

    def ie(self, k: int, field: str) -> int:
        """k-th order signed Exp-Golomb.

        >>> w = BitWriter(); w.ie(7, -300); w.ie(2, 5); w.byte_alignment()
        >>> r = BitReader(w.getvalue()); r.ie(7, "a"), r.ie(2, "b")
        (-300, 5)
        """
        return ue_to_ie(self.ue(k, field))

    def flt(self, field: str) -> np.float32:
        """float32 from 4 little-endian bytes (need not be aligned). Bit pattern is kept (NaN payloads).

        >>> v = BitReader(bytes.fromhex("0000803f")).flt("scale"); print(v, v.dtype)
        1.0 float32
        >>> w = BitWriter(); w.u(1, 1); w.flt(-2.5); w.byte_alignment()
        >>> r = BitReader(w.getvalue()); r.u(1, "flag"), float(r.flt("value"))
        (1, -2.5)
        """
        v = self.u(32, field)
        return np.frombuffer(v.to_bytes(4, "big"), dtype="<f4")[0]

    def st(self, field: str) -> str:
        """Byte-aligned UTF-8 string terminated by 0x00, not crossing the reader's end.

        >>> r = BitReader(b"conv1.weight\\x00bias\\x00"); r.st("a"), r.st("b"), r.bits_left
        ('conv1.weight', 'bias', 0)
        """
        if self.pos & 7:
            raise self.fail(field, "st(v) does not start byte-aligned")
        start, stop = self.pos >> 3, self.end >> 3
        nul = self._data.find(b"\x00", start, stop)
        if nul < 0:
            raise self.fail(field, "string has no 0x00 terminator before the end of the unit")
        try:
            s = self._data[start:nul].decode("utf-8", "strict")
        except UnicodeDecodeError as e:
            raise self.fail(field, f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
        self.pos = (nul + 1) << 3
        return s

    def byte_alignment(self, field: str = "byte_alignment") -> None:
        """Read the ``1`` bit and the ``0`` padding; anything else is an error.

        >>> r = BitReader(bytes.fromhex("1080")); r.u(3, "x")
        0
        >>> r.byte_alignment(); r.byte_pos
        1
        >>> r.byte_alignment(); r.bits_left                   # a whole 0x80 byte when aligned
        0
        >>> BitReader(bytes.fromhex("00")).byte_alignment()
        Traceback (most recent call last):
        ...
        nncjax.errors.BitstreamError: bitstream: field byte_alignment: alignment bit is not 1
        """
        if self.u(1, field) != 1:
            raise self.fail(field, "alignment bit is not 1")
        pad = (-self.pos) & 7
        if pad and self.u(pad, field) != 0:
            raise self.fail(field, "alignment padding bits are not 0")

    def raw_bytes(self, nbytes: int, field: str) -> bytes:
        """``nbytes`` bytes from a byte boundary.

        >>> r = BitReader(bytes.fromhex("070102")); r.u(8, "x"), r.raw_bytes(2, "payload")
        (7, b'\\x01\\x02')
        """
        if self.pos & 7:
            raise self.fail(field, "raw bytes do not start byte-aligned")
        nbytes = _int(nbytes, f"raw bytes count of {field}")
        if nbytes < 0:  # would move the position backwards
            raise self.fail(field, f"negative byte count {nbytes}", InputError)
        self.need(8 * nbytes, field)
        start = self.pos >> 3
        self.pos += 8 * nbytes
        return self._data[start:start + nbytes]

    def rest(self, field: str) -> bytes:
        """Everything from the (aligned) position to the end.

        >>> r = BitReader(bytes.fromhex("0701020304"), end=4)   # the window ends at byte 4
        >>> r.u(8, "x"), r.rest("payload")
        (7, b'\\x01\\x02\\x03')
        """
        return self.raw_bytes((self.end - self.pos) >> 3, field)

    def float32_array(self, shape: tuple[int, ...], field: str) -> np.ndarray:
        """Raw float32 tensor (C order, little-endian); the size is checked before allocating.

        Returns a float32 array of ``shape`` (4 bytes per element read).

        >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> w = BitWriter(); w.float32_array(x)
        >>> y = BitReader(w.getvalue()).float32_array((2, 3), "raw"); y.dtype, np.array_equal(x, y)
        (dtype('float32'), True)
        >>> BitReader(w.getvalue()).float32_array((1 << 40,), "raw")
        Traceback (most recent call last):
        ...
        nncjax.errors.BitstreamError: bitstream: field raw: needs 35184372088832 bits but only 192 remain (truncated)
        """
        count = 1
        for d in shape:
            d = _int(d, f"dimension of {field}")
            if d < 0:
                raise self.fail(field, f"negative dimension in shape {tuple(shape)}", InputError)
            count *= d
        raw = self.raw_bytes(4 * count, field)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
