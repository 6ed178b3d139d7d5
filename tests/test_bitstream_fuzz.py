"""Robustness of the NNR unit reader against hostile input (CI budget: well under a minute).

Properties, for truncations, bit flips, splices, size-field tampering, random bytes and absurd
declared values:
* only ``BitstreamError`` (incl. ``LimitError`` and ``UnsupportedStreamError``) escapes ``read_units``;
* whatever parses re-serialises to exactly the input bytes (no silent alteration);
* memory stays bounded by the input size: a stream declaring 2**40 elements, codebook entries,
  names or entry points in a few bytes is refused before anything that size is allocated.

``tools/fuzz_campaign.py`` runs the same properties for longer.
"""

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nncjax.kernels.bits import BitWriter
from nncjax.kernels.units import (
    CompressedDataUnit,
    DecodeLimits,
    OutOfBand,
    PayloadType,
    read_units,
    write_stream,
)

from nncjax import BitstreamError, LimitError
from tests.test_units import EXAMPLE, streams

ALLOWED = (BitstreamError,)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(data: bytes, **kw) -> None:
    """The fuzz oracle: parse; either a named stream error or an exact round trip."""
    try:
        units = read_units(data, **kw)
    except ALLOWED as e:
        assert "field" in str(e) or "unit" in str(e), str(e)  # errors name where they happened
        return
    rewritten = write_stream(units)
    if rewritten != data:  # only legitimate difference: a long-form size field NNCodec would write short
        assert len(rewritten) < len(data) and any(u.span.size < 32768 and data[u.span.offset] & 0x80 for u in units)


def size_fields(data: bytes) -> list[int]:
    """Offsets of the unit size fields of a well-formed stream."""
    out, off = [], 0
    while off + 2 <= len(data):
        out.append(off)
        size = (int.from_bytes(data[off:off + 4], "big") & 0x7FFFFFFF) if data[off] & 0x80 else \
            int.from_bytes(data[off:off + 2], "big")
        if size < 3:
            break
        off += size
    return out


seeds = st.one_of(st.just(EXAMPLE), streams().map(write_stream))


@st.composite
def mutated(draw):
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set", "size", "splice"]))
        n = max(len(data), 1)
        pos = draw(st.integers(0, n - 1))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x80, 0x7F, 0x01]))
        elif op == "size":
            offs = size_fields(bytes(data))
            if offs:
                off = draw(st.sampled_from(offs))
                new = draw(st.sampled_from([0, 1, 2, 3, 0x7FFF, 0x7FFFFFFF, len(data) - off, len(data) - off + 1]))
                if new > 0x7FFF or draw(st.booleans()):
                    data[off:off + 2] = (new | 1 << 31).to_bytes(4, "big")[:4]
                else:
                    data[off:off + 2] = new.to_bytes(2, "big")
        elif op == "splice":
            other = draw(seeds)
            a = draw(st.integers(0, len(other)))
            data[pos:pos] = other[a:a + draw(st.integers(1, 64))]
    return bytes(data)


@settings(FUZZ, max_examples=600)
@given(mutated())
def test_mutated_streams(data):
    check(data)


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    check(data)
    check(EXAMPLE[:18] + data)  # valid STR + MPS + TPL prefix, random units after


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=60))
def test_random_unit_bodies(body):
    """Random bytes behind a correct size field and unit type: the unit parsers themselves get hit."""
    for utype in (1, 2, 3, 5):
        unit = bytes([utype << 2 | 2]) + body
        check(EXAMPLE[:18] + (len(unit) + 2).to_bytes(2, "big") + unit)


def ndu_header_bits(fields) -> bytes:
    """A hand-made NDU (profile 1, no MPS flags) from (descriptor, value) pairs after the name."""
    w = BitWriter()
    w.u(6, 5); w.u(1, 1); w.u(1, 0)
    for kind, v in fields:
        if kind == "st":
            w.st(v)
        elif kind == "align":
            w.byte_alignment()
        else:
            getattr(w, kind[0])(kind[1], v)
    w.byte_alignment()
    body = w.getvalue() + b"\x00" * 4
    return EXAMPLE[:18] + (len(body) + 2).to_bytes(2, "big") + body


def pre(pt=1, multiple=0):
    """Fields up to and including the name: FLOAT, ipp 1, name "w", node ids 0."""
    return [(("u", 5), pt), (("u", 1), multiple), (("u", 1), 0), (("u", 1), 1), ("st", "w"),
            (("u", 1), 1), (("ue", 1), 0), (("ue", 5), 0), (("ue", 4), 0)]


def dims_fields(dims, cpt=0):
    return [(("u", 1), 1), (("u", 1), 1), (("u", 4), cpt), (("ue", 1), len(dims))] + [(("ue", 7), d) for d in dims]


ABSURD = {
    "huge tensor": pre() + [(("u", 1), 0), (("u", 1), 0)] + dims_fields([2**40, 2**20]),
    "huge rank": pre() + [(("u", 1), 0), (("u", 1), 0)] + dims_fields([1] * 3000),
    "huge codebook": pre() + [(("u", 1), 1), (("u", 4), 0), (("ue", 2), 2**50)],
    "huge name list": [(("u", 5), 3), (("u", 1), 1), (("u", 1), 0), (("u", 1), 1), (("ue", 7), 2**55)],
    "huge dc rank": pre() + [(("u", 1), 0), (("u", 1), 0), (("u", 1), 1), (("u", 1), 1), (("u", 4), 1),
                             (("ue", 3), 2**45), (("ue", 3), 1), (("ue", 1), 2), (("ue", 7), 4), (("ue", 7), 4)],
    "huge prefix": pre() + [(("u", 1), 0), (("u", 1), 0), (("u", 1), 1), (("u", 1), 1), (("u", 4), 0),
                            (("u", 64), 0), (("u", 64), 0)],
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_declarations_refused_with_bounded_memory(case):
    data = ndu_header_bits(ABSURD[case])
    assert len(data) < 4000
    tracemalloc.start()
    try:
        with pytest.raises(BitstreamError) as ei:
            read_units(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, (case, peak)
    assert "NNR_NDU" in str(ei.value) and "field" in str(ei.value)
    if case in ("huge tensor", "huge rank", "huge dc rank"):
        assert ei.type is LimitError


def test_entry_points_bounded_by_bytes_even_with_limits_lifted():
    """With the element limit lifted, a 2**40-row tensor's 2**37 entry points still need real bytes."""
    data = ndu_header_bits(pre() + [(("u", 1), 0), (("u", 1), 0)] + dims_fields([2**40, 1]) +
                           [(("u", 8), 10), (("ue", 1), 0), (("u", 4), 1)])
    tracemalloc.start()
    try:
        with pytest.raises(BitstreamError, match="cabac_entry_point_list.*truncated"):
            read_units(data, limits=DecodeLimits(max_tensor_elements=2**62, max_total_elements=2**62))
        assert tracemalloc.get_traced_memory()[1] < 2_000_000
    finally:
        tracemalloc.stop()


def test_raw_float_payload_size_is_checked_before_allocation():
    unit = CompressedDataUnit(payload_type=PayloadType.RAW_FLOAT, topology_elem_ids=("r",), tensor_dimensions=(3000, 3000),
                              payload=np.zeros((3000, 3000), np.float32))
    data = write_stream([*read_units(EXAMPLE)[:3], unit])
    tracemalloc.start()
    try:
        with pytest.raises(BitstreamError):
            read_units(data[:100] + (b"\x00" * 10))
        assert tracemalloc.get_traced_memory()[1] < 2_000_000
    finally:
        tracemalloc.stop()


@settings(FUZZ, max_examples=200)
@given(mutated(), st.dictionaries(st.text(max_size=3), st.builds(
    OutOfBand, st.none() | st.lists(st.integers(0, 2**40), max_size=5).map(tuple), st.none() | st.integers(0, 255),
    st.none() | st.integers(0, 15), st.none() | st.integers(0, 2**33), st.none() | st.integers(0, 2**33)), max_size=3))
def test_hostile_out_of_band_values(data, oob):
    """Out-of-band values are as untrusted as the stream."""
    check(data, out_of_band=oob)
