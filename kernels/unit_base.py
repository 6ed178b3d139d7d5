"""Shared vocabulary of the NNR unit syntax: enums, decoding limits, parse context, the unit base class.

See nnr-format.md §2. Everything here is plain data; the syntax itself lives in :mod:`units`,
:mod:`ndu` and :mod:`perfmaps`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "CPT_BI",
    "CPT_BN",
    "CPT_DC",
    "CPT_LS",
    "QCB",
    "QSU",
    "DecodeLimits",
    "OutOfBand",
    "ParentNodeIdType",
    "PayloadType",
    "SyntaxContext",
    "TopologyStorageFormat",
    "UnitBase",
    "UnitSpan",
    "UnitType",
]


class UnitType(enum.IntEnum):
    """``nnr_unit_type`` (u(6))."""
    STR = 0
    MPS = 1
    LPS = 2
    TPL = 3
    QNT = 4
    NDU = 5
    AGG = 6


class PayloadType(enum.IntEnum):
    """``nnr_compressed_data_unit_payload_type`` (u(5))."""
    INT = 0
    FLOAT = 1
    RAW_FLOAT = 2
    BLOCK = 3


# compressed_parameter_types bit flags
CPT_DC = 0x01  # low-rank decomposition (tensors G and H)
CPT_LS = 0x02  # local scaling
CPT_BN = 0x04  # batch-norm (beta, gamma, mean, var)
CPT_BI = 0x08  # bias

# quantization_method_flags bits
QSU = 1  # scalar uniform
QCB = 2  # codebook


class ParentNodeIdType(enum.IntEnum):
    """``parent_node_id_type`` (u(2)); 3 is invalid."""
    NDU_ID = 0
    SHA256 = 1
    SHA512 = 2


class TopologyStorageFormat(enum.IntEnum):
    """``topology_storage_format`` (u(8)) values NNCodec knows."""
    UNREC = 0
    NNEF = 1
    ONNX = 2
    PYT = 3
    TEF = 4
    PRUN = 5
    REFLIST = 6


@dataclass(frozen=True)
class DecodeLimits:
    """Caps checked against *declared* sizes before anything is allocated (else ``LimitError``).

    Defaults: rank <= 16 (far above any framework's practical rank), 2**31 - 1 elements per tensor
    (int32 indexing, as in NNCodec's C++ coder), 2**32 elements per bitstream (16 GiB of float32
    output), 2**20 units. Counts whose items each cost bits in the stream (names, codebook entries,
    entry points, performance-map entries) are bounded by the bytes actually present instead.

    Example::

        >>> small = DecodeLimits(max_total_elements=10**6)
    """

    max_tensor_rank: int = 16
    max_tensor_elements: int = 2**31 - 1
    max_total_elements: int = 2**32
    max_units: int = 2**20


@dataclass(frozen=True)
class SyntaxContext:
    """Values from earlier units that steer the parsing of later ones.

    ``general_profile_idc`` comes from the STR unit, the two flags from the MPS.
    """

    general_profile_idc: int = 1
    topology_indexed_reference_flag: int = 0
    parent_signalling_enabled_flag: int = 0


@dataclass(frozen=True)
class OutOfBand:
    """Per-tensor values an NDU may leave out of the bitstream (NNCodec's ``oob_dict``).

    Looked up by the NDU's topology element names (first match wins). ``None`` means "not given".
    """

    tensor_dimensions: tuple[int, ...] | None = None
    cabac_unary_length_minus1: int | None = None
    compressed_parameter_types: int | None = None
    decomposition_rank: int | None = None
    g_number_of_rows: int | None = None


@dataclass(frozen=True)
class UnitSpan:
    """Where a parsed unit sits in its bitstream (bytes). ``payload_offset`` is relative to ``offset``."""

    index: int
    offset: int
    size: int
    payload_offset: int


@dataclass(kw_only=True)
class UnitBase:
    """Fields of ``nnr_unit_header()`` common to every unit type (the type itself is the class).

    ``partial_data_counter`` is ``None`` when ``partial_data_counter_present_flag`` is 0.
    ``span`` is filled in by the reader and ignored by comparisons and the writer.
    """

    independently_decodable_flag: int = 1
    partial_data_counter: int | None = None
    span: UnitSpan | None = field(default=None, compare=False, repr=False)
