"""NNR units and their framing: split a bitstream into units, parse and write each (nnr-format.md §2).

Unit classes: :class:`StartUnit` (NNR_STR), :class:`ModelParameterSet` (NNR_MPS),
:class:`LayerParameterSet` (NNR_LPS), :class:`TopologyUnit` (NNR_TPL) and
:class:`~nncjax.kernels.ndu.CompressedDataUnit` (NNR_NDU). NNR_QNT and NNR_AGG are recognised and
rejected with :class:`nncjax.UnsupportedStreamError` (NNCodec implements neither).

Reading is strict: reserved bits must be 0, byte-alignment bits must be ``1 0…0``, every declared
size is checked against the bytes present before anything is allocated, and each unit must be
consumed exactly. Consequently any unit that parses is re-written to the same bytes (with the size
field in NNCodec's canonical short/long form).

Example::

    >>> data = write_stream([StartUnit(general_profile_idc=1), ModelParameterSet(), TopologyUnit()])
    >>> data.hex()
    '00040201000806810040008000060e000000'
    >>> [type(u).__name__ for u in read_units(data)]
    ['StartUnit', 'ModelParameterSet', 'TopologyUnit']
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from nncjax.kernels import perfmaps as pm
from nncjax.kernels.bits import BitReader, BitWriter, as_bytes
from nncjax.kernels.ndu import (
    Codebook,
    CompressedDataUnit,
    EntryPointList,
    Member,
    best_codebook_egk,
    codebook_bits,
    concat_entry_points,
    entry_point_count,
    member_entry_points,
    read_ndu_body,
    write_ndu_body,
)
from nncjax.kernels.unit_base import (
    CPT_BI,
    CPT_BN,
    CPT_DC,
    CPT_LS,
    QCB,
    QSU,
    DecodeLimits,
    OutOfBand,
    ParentNodeIdType,
    PayloadType,
    SyntaxContext,
    TopologyStorageFormat,
    UnitBase,
    UnitSpan,
    UnitType,
)

from nncjax.errors import BitstreamError, InputError, LimitError, UnsupportedStreamError

__all__ = [
    "CPT_BI",
    "CPT_BN",
    "CPT_DC",
    "CPT_LS",
    "QCB",
    "QSU",
    "SHORT_SIZE_LIMIT",
    "Codebook",
    "CompressedDataUnit",
    "DecodeLimits",
    "EntryPointList",
    "LayerParameterSet",
    "Member",
    "ModelParameterSet",
    "OutOfBand",
    "ParentNodeIdType",
    "PayloadType",
    "StartUnit",
    "SyntaxContext",
    "TopologyStorageFormat",
    "TopologyUnit",
    "UnitSpan",
    "UnitType",
    "best_codebook_egk",
    "codebook_bits",
    "concat_entry_points",
    "context_after",
    "entry_point_count",
    "frame_unit",
    "iter_units",
    "member_entry_points",
    "read_unit",
    "read_units",
    "write_stream",
    "write_unit",
]

# NNCodec's rule: the short (15-bit) size form is used when the unit without its size field plus
# 2 bytes is below 32768 bytes, i.e. for whole units of at most 32767 bytes.
SHORT_SIZE_LIMIT = 32768

_DEFAULT_CONTEXT = SyntaxContext()
_DEFAULT_LIMITS = DecodeLimits()


@dataclass(kw_only=True)
class StartUnit(UnitBase):
    """NNR_STR: ``general_profile_idc`` u(8). NNCodec 2.1.3 always writes profile 1."""

    general_profile_idc: int = 1


@dataclass(kw_only=True)
class ModelParameterSet(UnitBase):
    """NNR_MPS payload (§2.6). Presence flags are implied by the optional values.

    Profile-1-only fields (``base_model_id`` … ``pre_flag``) must keep their defaults in profile 0.
    ``qp_density`` / ``quantization_parameter`` are present iff ``quantization_method_flags & 3``.
    """

    topology_carriage_flag: int = 1
    quantization_method_flags: int = QSU
    topology_indexed_reference_flag: int = 0
    base_model_id: str | None = None
    validation_set_performance: np.float32 | None = None
    metric_type_performance_map_valid_flag: int = 0
    parent_signalling_enabled_flag: int = 0
    pre_flag: int = 0
    performance_metric_type: str | None = None
    qp_density: int = 2
    quantization_parameter: int = 0
    sparsification_map: pm.SparsificationMap | None = None
    pruning_map: pm.PruningMap | None = None
    unification_map: pm.UnificationMap | None = None
    decomposition_map: pm.DecompositionMap | None = None


@dataclass(kw_only=True)
class LayerParameterSet(UnitBase):
    """NNR_LPS (§2.7): parsed and written, never produced by NNCodec."""

    self_contained_flag: int = 0
    quantization_method_flags: int = QSU
    qp_density: int = 2
    quantization_parameter: int = 0
    sparsification_map: pm.SparsificationMap | None = None
    pruning_map: pm.PruningMap | None = None
    unification_map: pm.UnificationMap | None = None


@dataclass(kw_only=True)
class TopologyUnit(UnitBase):
    """NNR_TPL (§2.8). ``topology_data`` (st(v)) for every format but REFLIST, which carries
    ``reference_list`` (names) instead. PRUN is unsupported."""

    storage_format: int = TopologyStorageFormat.UNREC
    compression_format: int = 0
    topology_data: str = ""
    reference_list: tuple = ()


_UNIT_TYPES = {StartUnit: UnitType.STR, ModelParameterSet: UnitType.MPS, LayerParameterSet: UnitType.LPS,
               TopologyUnit: UnitType.TPL, CompressedDataUnit: UnitType.NDU}


def _reserved(r: BitReader, n: int, field: str) -> None:
    if r.u(n, field):
        raise r.fail(field, "reserved bits are not 0")


# -- MPS / LPS --------------------------------------------------------------------------------------


def _read_mps(r: BitReader, ctx: SyntaxContext, base: dict) -> ModelParameterSet:
    f = dict(base)
    f["topology_carriage_flag"] = r.u(1, "topology_carriage_flag")
    spm, ppm, upm, dpm = (r.u(1, n) for n in ("mps_sparsification_flag", "mps_pruning_flag",
                                               "mps_unification_flag", "mps_decomposition_performance_map_flag"))
    f["quantization_method_flags"] = qmf = r.u(3, "mps_quantization_method_flags")
    f["topology_indexed_reference_flag"] = r.u(1, "mps_topology_indexed_reference_flag")
    validation = False
    if ctx.general_profile_idc == 1:
        base_id = r.u(1, "base_model_id_present_flag")
        validation = r.u(1, "validation_set_performance_present_flag")
        f["metric_type_performance_map_valid_flag"] = metric = r.u(1, "metric_type_performance_map_valid_flag")
        f["parent_signalling_enabled_flag"] = parent = r.u(1, "mps_parent_signalling_enabled_flag")
        if parent:
            f["pre_flag"] = r.u(1, "nnr_pre_flag")
        else:
            _reserved(r, 1, "nnr_reserved_zero_1bit")
        _reserved(r, 2, "nnr_reserved_zero_2bits")
        if base_id:
            f["base_model_id"] = r.st("base_model_id")
        if validation or metric:
            f["performance_metric_type"] = r.st("performance_metric_type")
    else:
        _reserved(r, 7, "nnr_reserved_zero_7bits")
    if qmf & (QSU | QCB):
        f["qp_density"] = r.u(3, "mps_qp_density")
        f["quantization_parameter"] = r.i(13, "mps_quantization_parameter")
    if spm:
        f["sparsification_map"] = pm.read_sparsification_map(r)
    if ppm:
        f["pruning_map"] = pm.read_pruning_map(r)
    if upm:
        f["unification_map"] = pm.read_unification_map(r)
    if dpm:
        f["decomposition_map"] = pm.read_decomposition_map(r)
    if validation:
        f["validation_set_performance"] = r.flt("validation_set_performance")
    r.byte_alignment("nnr_model_parameter_set_unit_payload.byte_alignment")
    return ModelParameterSet(**f)


def _write_mps(w: BitWriter, u: ModelParameterSet, ctx: SyntaxContext) -> None:
    w.u(1, u.topology_carriage_flag)
    for m in (u.sparsification_map, u.pruning_map, u.unification_map, u.decomposition_map):
        w.u(1, int(m is not None))
    w.u(3, u.quantization_method_flags)
    w.u(1, u.topology_indexed_reference_flag)
    validation = u.validation_set_performance is not None
    if ctx.general_profile_idc == 1:
        w.u(1, int(u.base_model_id is not None))
        w.u(1, int(validation))
        w.u(1, u.metric_type_performance_map_valid_flag)
        w.u(1, u.parent_signalling_enabled_flag)
        if not u.parent_signalling_enabled_flag and u.pre_flag:
            raise InputError("MPS: nnr_pre_flag needs parent_signalling_enabled_flag")
        w.u(1, u.pre_flag)
        w.u(2, 0)
        if u.base_model_id is not None:
            w.st(u.base_model_id)
        if (validation or u.metric_type_performance_map_valid_flag) != (u.performance_metric_type is not None):
            raise InputError("MPS: performance_metric_type is present exactly when validation or metric flag is set")
        if u.performance_metric_type is not None:
            w.st(u.performance_metric_type)
    else:
        if (u.base_model_id, u.performance_metric_type) != (None, None) or validation or u.pre_flag \
                or u.parent_signalling_enabled_flag or u.metric_type_performance_map_valid_flag:
            raise InputError("MPS: profile-1 fields set in a profile-0 stream")
        w.u(7, 0)
    if u.quantization_method_flags & (QSU | QCB):
        w.u(3, u.qp_density)
        w.i(13, u.quantization_parameter)
    if u.sparsification_map is not None:
        pm.write_sparsification_map(w, u.sparsification_map)
    if u.pruning_map is not None:
        pm.write_pruning_map(w, u.pruning_map)
    if u.unification_map is not None:
        pm.write_unification_map(w, u.unification_map)
    if u.decomposition_map is not None:
        pm.write_decomposition_map(w, u.decomposition_map)
    if validation:
        if ctx.general_profile_idc != 1:
            raise InputError("MPS: validation_set_performance needs profile 1")
        w.flt(u.validation_set_performance)
    w.byte_alignment()


def _read_lps(r: BitReader, base: dict) -> LayerParameterSet:
    f = dict(base)
    f["self_contained_flag"] = r.u(1, "lps_self_contained_flag")
    _reserved(r, 7, "nnr_reserved_zero_7bits")
    _reserved(r, 1, "nnr_reserved_zero_1_bits")
    spm, ppm, upm = (r.u(1, n) for n in ("lps_sparsification_flag", "lps_pruning_flag", "lps_unification_flag"))
    f["quantization_method_flags"] = qmf = r.u(3, "lps_quantization_method_flags")
    _reserved(r, 1, "nnr_reserved_zero_1bit")
    if qmf & (QSU | QCB):
        f["qp_density"] = r.u(3, "lps_qp_density")
        f["quantization_parameter"] = r.i(13, "lps_quantization_parameter")
    if spm:
        f["sparsification_map"] = pm.read_sparsification_map(r)
    if ppm:
        f["pruning_map"] = pm.read_pruning_map(r)
    if upm:
        f["unification_map"] = pm.read_unification_map(r)
    r.byte_alignment("nnr_layer_parameter_set_unit_payload.byte_alignment")
    return LayerParameterSet(**f)


def _write_lps(w: BitWriter, u: LayerParameterSet) -> None:
    w.u(1, u.self_contained_flag)
    w.u(7, 0)
    w.u(1, 0)
    for m in (u.sparsification_map, u.pruning_map, u.unification_map):
        w.u(1, int(m is not None))
    w.u(3, u.quantization_method_flags)
    w.u(1, 0)
    if u.quantization_method_flags & (QSU | QCB):
        w.u(3, u.qp_density)
        w.i(13, u.quantization_parameter)
    if u.sparsification_map is not None:
        pm.write_sparsification_map(w, u.sparsification_map)
    if u.pruning_map is not None:
        pm.write_pruning_map(w, u.pruning_map)
    if u.unification_map is not None:
        pm.write_unification_map(w, u.unification_map)
    w.byte_alignment()


# -- TPL --------------------------------------------------------------------------------------------


def _read_tpl(r: BitReader, base: dict) -> TopologyUnit:
    f = dict(base)
    f["storage_format"] = fmt = r.u(8, "topology_storage_format")
    f["compression_format"] = r.u(8, "topology_compression_format")
    if fmt == TopologyStorageFormat.PRUN:
        raise r.fail("topology_storage_format", "pruning topology container (NNR_TPL_PRUN) is not supported",
                     UnsupportedStreamError)
    if fmt == TopologyStorageFormat.REFLIST:
        n = r.ue(7, "count_topology_elements_minus2") + 2
        r.byte_alignment("topology_elements_ids_list.byte_alignment")
        r.need(8 * n, "topology_elem_id_list")
        f["reference_list"] = tuple(r.st(f"topology_elem_id_list[{j}]") for j in range(n))
    else:
        f["topology_data"] = r.st("topology_data")
    return TopologyUnit(**f)


def _write_tpl(w: BitWriter, u: TopologyUnit) -> None:
    w.u(8, u.storage_format)
    w.u(8, u.compression_format)
    if u.storage_format == TopologyStorageFormat.PRUN:
        raise UnsupportedStreamError("NNR_TPL_PRUN topology is not supported")
    if u.storage_format == TopologyStorageFormat.REFLIST:
        if len(u.reference_list) < 2:
            raise InputError("a REFLIST topology needs at least 2 names")
        w.ue(7, len(u.reference_list) - 2)
        w.byte_alignment()
        for s in u.reference_list:
            w.st(s)
    else:
        w.st(u.topology_data)


# -- framing ----------------------------------------------------------------------------------------


def frame_unit(offset: int, data, index: int = 0) -> tuple[int, int]:
    """Read ``nnr_unit_size()`` at ``offset``: returns ``(unit size in bytes, size-field bytes)``.

    Raises BitstreamError when the declared size is smaller than the size field or larger than the
    bytes present.

    >>> frame_unit(0, bytes.fromhex("80016fef") + bytes(94187))      # long form (top bit set)
    (94191, 4)
    >>> frame_unit(4, bytes.fromhex("00040201" "0008068100400080"))  # the short-form MPS after an STR
    (8, 2)
    >>> frame_unit(0, bytes.fromhex("0009020100"))
    Traceback (most recent call last):
    ...
    nncjax.errors.BitstreamError: unit 0 at byte 0: field nnr_unit_size: declares 9 bytes, only 5 present (truncated)
    """
    pos = None if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) else int(offset)
    if pos is None or not 0 <= pos <= len(data):
        raise InputError(f"offset {offset!r} is not a position in the {len(data)}-byte stream")
    offset = pos
    where = f"unit {index} at byte {offset}"
    left = len(data) - offset
    if left < 2:
        raise BitstreamError(f"{where}: field nnr_unit_size: {left} byte(s) left, a unit needs at least 2")
    long_form = data[offset] >> 7
    if long_form:
        if left < 4:
            raise BitstreamError(f"{where}: field nnr_unit_size: long form needs 4 bytes, {left} left")
        size = int.from_bytes(data[offset:offset + 4], "big") & 0x7FFFFFFF
    else:
        size = int.from_bytes(data[offset:offset + 2], "big") & 0x7FFF
    head = 4 if long_form else 2
    if size < head + 1:
        raise BitstreamError(f"{where}: field nnr_unit_size: size {size} cannot hold the size field and unit type")
    if size > left:
        raise BitstreamError(f"{where}: field nnr_unit_size: declares {size} bytes, only {left} present (truncated)")
    return size, head


def read_unit(data, offset: int = 0, ctx: SyntaxContext = _DEFAULT_CONTEXT, *, index: int = 0,
              limits: DecodeLimits = _DEFAULT_LIMITS, out_of_band: Mapping[str, OutOfBand] | None = None):
    """Parse the unit starting at byte ``offset``. Returns ``(unit, size in bytes)``.

    ``ctx`` supplies profile and MPS flags (see :func:`context_after`). Raises BitstreamError
    (LimitError, UnsupportedStreamError for QNT/AGG/PRUN/tensor splitting); never reads past the unit.

    Example::

        >>> data = bytes.fromhex("00040201" "0008068100400080")       # STR, MPS
        >>> unit, size = read_unit(data); type(unit).__name__, size
        ('StartUnit', 4)
        >>> unit, size = read_unit(data, 4, context_after(unit, SyntaxContext()))
        >>> type(unit).__name__, unit.qp_density, size
        ('ModelParameterSet', 2, 8)
    """
    data = as_bytes(data, "data")
    size, head = frame_unit(offset, data, index)
    r = BitReader(data, offset + head, offset + size, where=f"unit {index} at byte {offset}")
    utype = r.u(6, "nnr_unit_type")
    name = UnitType(utype).name if utype <= UnitType.AGG else f"type {utype}"
    r.where = f"unit {index} (NNR_{name}) at byte {offset}"
    if utype > UnitType.AGG:
        raise r.fail("nnr_unit_type", f"unknown unit type {utype}")
    if utype in (UnitType.QNT, UnitType.AGG):
        raise r.fail("nnr_unit_type", f"NNR_{name} units are not supported", UnsupportedStreamError)
    base = {"independently_decodable_flag": r.u(1, "independently_decodable_flag")}
    if r.u(1, "partial_data_counter_present_flag"):
        base["partial_data_counter"] = r.u(8, "partial_data_counter")
    if utype == UnitType.STR:
        unit = StartUnit(general_profile_idc=r.u(8, "general_profile_idc"), **base)
        if unit.general_profile_idc > 1:
            raise r.fail("general_profile_idc", f"unknown profile {unit.general_profile_idc}", UnsupportedStreamError)
    elif utype == UnitType.MPS:
        unit = _read_mps(r, ctx, base)
    elif utype == UnitType.LPS:
        unit = _read_lps(r, base)
    elif utype == UnitType.TPL:
        unit = _read_tpl(r, base)
    else:
        unit = read_ndu_body(r, ctx, limits, out_of_band, base)
    if r.pos != r.end:
        raise r.fail("nnr_unit_size", f"declares {size} bytes but the unit syntax ends after {r.byte_pos - offset}")
    hdr = r.pos // 8 - offset
    if isinstance(unit, CompressedDataUnit):
        hdr -= len(unit.payload) if isinstance(unit.payload, bytes) else unit.payload.nbytes
    unit.span = UnitSpan(index, offset, size, hdr)
    return unit, size


def context_after(unit, ctx: SyntaxContext) -> SyntaxContext:
    """The parse context for the units following ``unit`` (STR sets the profile, MPS its flags).

    Example::

        >>> ctx = context_after(StartUnit(general_profile_idc=0), SyntaxContext())
        >>> context_after(ModelParameterSet(topology_indexed_reference_flag=1), ctx)
        SyntaxContext(general_profile_idc=0, topology_indexed_reference_flag=1, parent_signalling_enabled_flag=0)
    """
    if isinstance(unit, StartUnit):
        return SyntaxContext(unit.general_profile_idc, ctx.topology_indexed_reference_flag,
                             ctx.parent_signalling_enabled_flag)
    if isinstance(unit, ModelParameterSet):
        return SyntaxContext(ctx.general_profile_idc, unit.topology_indexed_reference_flag,
                             unit.parent_signalling_enabled_flag)
    return ctx


def iter_units(data, *, limits: DecodeLimits = _DEFAULT_LIMITS, max_units: int | None = None,
               out_of_band: Mapping[str, OutOfBand] | None = None) -> Iterator:
    """Parse a whole NNR bitstream unit by unit (a generator), enforcing NNCodec's stream rules.

    Rules: the first unit is NNR_STR and it occurs once; at most one NNR_MPS, before any TPL, LPS or
    NDU; the units exactly cover ``data``. The summed element count of all NDUs is checked against
    ``limits.max_total_elements`` and the number of units against ``max_units`` (default
    ``limits.max_units``). ``out_of_band`` maps tensor names to values an NDU leaves out. Errors are
    raised when the offending unit is reached, so a consumer may already have used earlier units.

    Example::

        >>> [type(u).__name__ for u in iter_units(bytes.fromhex("00040201" "0008068100400080"))]
        ['StartUnit', 'ModelParameterSet']
    """
    data = as_bytes(data, "data")
    max_units = limits.max_units if max_units is None else max_units
    ctx, idx, offset, total = SyntaxContext(general_profile_idc=0), 0, 0, 0
    seen_mps = False
    while offset < len(data):
        if idx >= max_units:
            raise LimitError(f"unit {idx} at byte {offset}: more than {max_units} units")
        unit, size = read_unit(data, offset, ctx, index=idx, limits=limits, out_of_band=out_of_band)
        where = f"unit {idx} (NNR_{_UNIT_TYPES[type(unit)].name}) at byte {offset}: field nnr_unit_type"
        if (idx == 0) != isinstance(unit, StartUnit):
            raise BitstreamError(f"{where}: the first unit, and only it, must be NNR_STR")
        if isinstance(unit, ModelParameterSet):
            if seen_mps:
                raise BitstreamError(f"{where}: a second NNR_MPS")
            seen_mps = True
        elif not isinstance(unit, StartUnit) and not seen_mps:
            raise BitstreamError(f"{where}: NNR_MPS must precede this unit")
        if isinstance(unit, CompressedDataUnit):
            total += unit.element_count()
            if total > limits.max_total_elements:
                raise LimitError(f"unit {idx} (NNR_NDU) at byte {offset}: field tensor_dimensions: the bitstream "
                                 f"declares more than {limits.max_total_elements} elements in total")
        ctx = context_after(unit, ctx)
        yield unit
        idx += 1
        offset += size


def read_units(data, *, limits: DecodeLimits = _DEFAULT_LIMITS, max_units: int | None = None,
               out_of_band: Mapping[str, OutOfBand] | None = None) -> list:
    """All units of a bitstream as a list: :func:`iter_units` run to the end (same rules and errors).

    Example::

        >>> us = read_units(bytes.fromhex("00040201" "0008068100400080"))
        >>> us[1].qp_density
        2
    """
    return list(iter_units(data, limits=limits, max_units=max_units, out_of_band=out_of_band))


# -- writing ----------------------------------------------------------------------------------------


def write_unit(unit, ctx: SyntaxContext = _DEFAULT_CONTEXT) -> bytes:
    """Serialise one unit, size field included (short form when the unit is < 32768 bytes).

    ``ctx``: profile and MPS flags governing the unit's syntax. Raises InputError on inconsistent
    fields.

    >>> write_unit(StartUnit(general_profile_idc=1)).hex()
    '00040201'
    >>> u = TopologyUnit(topology_data="conv1.weight")
    >>> data = write_unit(u, SyntaxContext(general_profile_idc=1))
    >>> read_unit(data, 0, SyntaxContext(general_profile_idc=1)) == (u, len(data))   # round trip
    True
    """
    try:
        utype = _UNIT_TYPES[type(unit)]
    except KeyError:
        raise InputError(f"not an NNR unit: {type(unit).__name__}") from None
    w = BitWriter()
    w.u(6, utype)
    w.u(1, unit.independently_decodable_flag)
    w.u(1, int(unit.partial_data_counter is not None))
    if unit.partial_data_counter is not None:
        w.u(8, unit.partial_data_counter)
    if utype == UnitType.STR:
        w.u(8, unit.general_profile_idc)
    elif utype == UnitType.MPS:
        _write_mps(w, unit, ctx)
    elif utype == UnitType.LPS:
        _write_lps(w, unit)
    elif utype == UnitType.TPL:
        _write_tpl(w, unit)
    else:
        write_ndu_body(w, unit, ctx)
    if not w.aligned:
        raise InputError(f"{utype.name}: unit syntax does not end byte-aligned")
    body = w.getvalue()
    if len(body) + 2 < SHORT_SIZE_LIMIT:
        return (len(body) + 2).to_bytes(2, "big") + body
    size = len(body) + 4
    if size >= 1 << 31:
        raise InputError(f"unit of {size} bytes exceeds the 31-bit nnr_unit_size")
    return (size | 1 << 31).to_bytes(4, "big") + body


def write_stream(units: Iterable) -> bytes:
    """Serialise a sequence of units, deriving each unit's context from the STR and MPS before it.

    >>> write_stream([StartUnit(), ModelParameterSet()]).hex()
    '000402010008068100400080'
    >>> units = [StartUnit(), ModelParameterSet(qp_density=3), TopologyUnit(topology_data="w")]
    >>> read_units(write_stream(units)) == units                       # round trip
    True
    """
    ctx = SyntaxContext(general_profile_idc=0)
    out = bytearray()
    for u in units:
        out += write_unit(u, ctx)
        ctx = context_after(u, ctx)
    return bytes(out)
