"""Descriptor-level tests of kernels/bits.py: exact bit patterns (nnr-format.md §1) and round trips."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nncjax.kernels.bits import MAX_EXP_GOLOMB_BITS, BitReader, BitWriter, ie_to_ue, ue_length, ue_to_ie

from nncjax import BitstreamError, InputError


def bits_of(w: BitWriter) -> str:
    s = "".join(f"{b:08b}" for b in w.getvalue())
    return s[: w.bit_length]


@pytest.mark.parametrize("k,x,pattern", [
    (0, 0, "1"), (0, 1, "010"), (0, 2, "011"), (0, 3, "00100"), (0, 4, "00101"), (0, 6, "00111"),
    (1, 0, "10"), (1, 1, "11"), (1, 2, "0100"), (1, 5, "0111"), (1, 6, "001000"),
    (2, 2, "110"), (7, 3, "10000011"), (7, 0, "10000000"), (11, 5, "100000000101"),
])
def test_ue_bit_patterns(k, x, pattern):
    w = BitWriter()
    w.ue(k, x)
    assert bits_of(w) == pattern
    assert ue_length(k, x) == len(pattern)
    w.byte_alignment()
    assert BitReader(w.getvalue()).ue(k, "x") == x


@pytest.mark.parametrize("k,x,pattern", [
    (0, 0, "1"), (0, 1, "010"), (0, -1, "011"), (0, 2, "00100"), (0, -2, "00101"), (2, 0, "100"),
    (7, -32, "11000000"), (7, -64, "0100000000"),
])
def test_ie_bit_patterns(k, x, pattern):
    w = BitWriter()
    w.ie(k, x)
    assert bits_of(w) == pattern
    w.byte_alignment()
    assert BitReader(w.getvalue()).ie(k, "x") == x


def test_ie_mapping():
    assert [ie_to_ue(x) for x in (0, 1, -1, 2, -2, 3)] == [0, 1, 2, 3, 4, 5]
    assert [ue_to_ie(m) for m in range(6)] == [0, 1, -1, 2, -2, 3]


def test_fixed_width_and_float_patterns():
    w = BitWriter()
    w.u(1, 1); w.u(31, 94191)
    assert w.getvalue() == bytes.fromhex("80016fef")  # long-form unit size, digest §2.1
    w = BitWriter()
    w.i(13, -1); w.i(3, -4)
    assert bits_of(w) == "1" * 13 + "100"
    w = BitWriter()
    w.u(3, 0)
    w.flt(np.float32(1.0))  # 0x3f800000 little-endian: 00 00 80 3f, not aligned
    assert bits_of(w) == "000" + "00000000" * 2 + "10000000" + "00111111"
    w = BitWriter()
    w.st("w")
    w.byte_alignment()
    assert w.getvalue() == bytes.fromhex("770080")  # aligned: alignment is a whole 0x80 byte


def test_byte_alignment_always_writes_a_bit():
    for pre in range(9):
        w = BitWriter()
        if pre:
            w.u(pre, 0)
        w.byte_alignment()
        assert w.aligned and w.bit_length == 8 * ((pre + 8) // 8)


@settings(max_examples=500)
@given(st.lists(st.one_of(
    st.tuples(st.just("u"), st.integers(1, 70)).flatmap(lambda t: st.tuples(st.just("u"), st.just(t[1]), st.integers(0, 2**t[1] - 1))),
    st.tuples(st.just("i"), st.integers(1, 64)).flatmap(
        lambda t: st.tuples(st.just("i"), st.just(t[1]), st.integers(-(2**(t[1] - 1)), 2**(t[1] - 1) - 1))),
    st.tuples(st.just("ue"), st.integers(0, 15), st.integers(0, 2**40)),
    st.tuples(st.just("ie"), st.integers(0, 15), st.integers(-2**40, 2**40)),
    st.tuples(st.just("flt"), st.just(32), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("st"), st.just(0), st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8)),
    st.tuples(st.just("align"), st.just(0), st.just(0)),
), max_size=30))
def test_descriptor_round_trip(ops):
    w = BitWriter()
    for op, n, x in ops:
        if op == "st":
            w.byte_alignment()
            w.st(x)
        elif op == "align":
            w.byte_alignment()
        elif op == "flt":
            w.flt(np.frombuffer(x.to_bytes(4, "little"), "<f4")[0])
        else:
            getattr(w, op)(n, x)
    w.byte_alignment()
    r = BitReader(w.getvalue())
    for op, n, x in ops:
        if op == "st":
            r.byte_alignment()
            assert r.st("s") == x
        elif op == "align":
            r.byte_alignment()
        elif op == "flt":
            assert r.flt("f").tobytes() == x.to_bytes(4, "little")  # bit pattern kept, NaNs included
        else:
            assert getattr(r, op)(n, "v") == x
    r.byte_alignment()
    assert r.bits_left == 0


def test_float32_array_round_trip():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    w = BitWriter()
    w.u(8, 7)
    w.float32_array(x)
    r = BitReader(w.getvalue())
    r.u(8, "a")
    y = r.float32_array((3, 4), "t")
    assert y.dtype == np.float32 and np.array_equal(x, y)


def test_reader_errors_name_field_and_never_over_read():
    data = bytes([0b00000000, 0b00000001])
    r = BitReader(data, where="unit 7 (NNR_NDU)")
    with pytest.raises(BitstreamError, match=r"unit 7 \(NNR_NDU\): field dims\[0\]: .*truncated"):
        r.ue(7, "dims[0]")  # 15 zeros then a 1: needs 22 more bits
    r = BitReader(bytes(40))
    with pytest.raises(BitstreamError, match="prefix"):
        r.ue(0, "x")  # 320 zeros: absurd prefix rejected at the bound, not after scanning everything
    assert r.pos <= MAX_EXP_GOLOMB_BITS + 1
    r = BitReader(b"abc", 0, 2)
    with pytest.raises(BitstreamError, match="terminator"):
        r.st("name")  # the 0x00 is outside the window
    with pytest.raises(BitstreamError, match="UTF-8"):
        BitReader(b"\xff\xfe\x00").st("name")
    r = BitReader(b"\x00\x00")
    r.u(1, "b")
    with pytest.raises(BitstreamError, match="byte-aligned"):
        r.st("name")
    with pytest.raises(BitstreamError, match="alignment bit"):
        BitReader(b"\x00").byte_alignment()
    with pytest.raises(BitstreamError, match="padding"):
        BitReader(b"\x81").byte_alignment()
    r = BitReader(bytes(16))
    with pytest.raises(BitstreamError, match="truncated"):
        r.float32_array((2**20, 2**20), "raw")  # 4 TiB declared: refused before allocation
    with pytest.raises(BitstreamError):
        BitReader(b"\x12").u(9, "x")


def test_ue_largest_values_round_trip_and_bound():
    for k in (0, 7, 11):
        big = (1 << (MAX_EXP_GOLOMB_BITS + 1)) - (1 << k) - 1  # largest value within the bound
        w = BitWriter()
        w.ue(k, big)
        w.byte_alignment()
        assert BitReader(w.getvalue()).ue(k, "x") == big
        with pytest.raises(InputError):
            BitWriter().ue(k, big + 1)


def test_writer_rejects_out_of_range():
    w = BitWriter()
    for bad in (lambda: w.u(3, 8), lambda: w.u(3, -1), lambda: w.i(4, 8), lambda: w.ue(0, -1),
                lambda: w.st("a\x00b"), lambda: w.float32_array(np.zeros(2, np.float64))):
        with pytest.raises(InputError):
            bad()
    w.u(1, 0)
    with pytest.raises(InputError):
        w.st("x")


def test_non_bytes_data_negative_counts_and_bad_values_are_refused():
    """Fifth robustness sweep: ``bytes(5)`` is five zero bytes, a negative count moved the reader back."""
    for data in (5, "ab", [1, 2], None, np.zeros(2, np.int32)):
        with pytest.raises(InputError, match="bytes-like"):
            BitReader(data)
        with pytest.raises(InputError, match="bytes-like"):
            BitWriter().raw_bytes(data)
    assert BitReader(np.frombuffer(b"\x80", np.uint8)).u(1, "f") == 1
    with pytest.raises(InputError, match="window start"):
        BitReader(b"abcd", 1.5)
    r = BitReader(b"abcd")
    with pytest.raises(InputError, match="negative byte count"):
        r.raw_bytes(-1, "f")
    with pytest.raises(InputError, match="negative dimension"):
        r.float32_array((-1,), "f")
    assert r.pos == 0
    with pytest.raises(InputError, match="UTF-8"):
        BitWriter().st("\ud800")
    for x in (None, "1.0", [1.0, 2.0]):
        with pytest.raises(InputError, match="flt"):
            BitWriter().flt(x)
    for k, x in ((0, -1), (-1, 3), (0, 1.5)):
        with pytest.raises(InputError, match="ue_length"):
            ue_length(k, x)


def test_reader_refuses_widths_below_its_field_minimum():
    # before: i(0) raised a raw "negative shift count" ValueError, u(-3) moved the
    # position backwards and returned garbage
    r = BitReader(bytes.fromhex("d7"))
    assert r.u(0, "empty") == 0 and r.pos == 0
    for read, n in ((r.u, -3), (r.i, 0), (r.i, -1)):
        with pytest.raises(InputError, match="for f"):
            read(n, "f")
    assert r.pos == 0 and r.i(4, "a") == -3
