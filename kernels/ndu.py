"""The NNR_NDU unit: ``nnr_compressed_data_unit_header()`` with ``codebook()`` and
``entry_point_list()``, plus its payload boundaries (nnr-format.md §2.10–§2.14).

Field order, widths and conditions are those of NNCodec 2.1.3. The parsed unit keeps the
*effective* tensor dimensions, CABAC unary length and parameter types, whether they came in band or
out of band (:class:`OutOfBand`), so a decoder needs nothing else from the header.

Example::

    >>> from nncjax.kernels.ndu import CompressedDataUnit
    >>> u = CompressedDataUnit(payload_type=1, topology_elem_ids=("w",), tensor_dimensions=(3, 3),
    ...                        payload=bytes(10))
    >>> [m.role for m in u.members()]
    ['tensor']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple

import numpy as np
from nncjax.kernels.bits import BitReader, BitWriter, ue_length
from nncjax.kernels.unit_base import (
    CPT_BI,
    CPT_BN,
    CPT_DC,
    CPT_LS,
    DecodeLimits,
    OutOfBand,
    ParentNodeIdType,
    PayloadType,
    SyntaxContext,
    UnitBase,
)

from nncjax.errors import InputError, LimitError, UnsupportedStreamError

__all__ = [
    "Codebook",
    "CompressedDataUnit",
    "EntryPointList",
    "Member",
    "best_codebook_egk",
    "codebook_bits",
    "concat_entry_points",
    "entry_point_count",
    "member_entry_points",
    "read_ndu_body",
    "write_ndu_body",
]

_CODED = (PayloadType.INT, PayloadType.FLOAT, PayloadType.BLOCK)
_MAX_DDF = 9  # TENSOR_FLOAT64, the last nnr_decompressed_data_format value
_MAX_SCAN_ORDER = 4  # block sizes 8..64; NNCodec's C++ rejects larger values
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


# --------------------------------------------------------------------------------------------------
# codebook()


@dataclass
class Codebook:
    """``codebook()``: strictly increasing integer entries (in units of the step size).

    ``zero_offset`` is CbZeroOffset, the index whose entry is coded as ``codebook_zero_value``; the
    arithmetic-coded level of a codebook tensor is ``index - zero_offset``.
    """

    egk: int
    values: tuple
    zero_offset: int

    @property
    def center_offset(self) -> int:
        """``codebook_center_offset`` = CbZeroOffset - (size >> 1).

        >>> Codebook(egk=0, values=(-3, 0, 5, 9), zero_offset=1).center_offset   # 1 - (4 >> 1)
        -1
        """
        return self.zero_offset - (len(self.values) >> 1)


def _codebook_deltas(values, zero_offset: int) -> list[int]:
    left = [values[j + 1] - values[j] - 1 for j in range(zero_offset - 1, -1, -1)]
    right = [values[j] - values[j - 1] - 1 for j in range(zero_offset + 1, len(values))]
    return left + right


def codebook_bits(values, zero_offset: int, egk: int) -> int:
    """Bits ``codebook()`` takes for these entries at this Exp-Golomb order.

    >>> codebook_bits((-3, 0, 5), 1, 0)                                   # 4 + 3 + 3 + 8 + 3 + 5
    26
    >>> w = BitWriter(); _write_codebook(w, Codebook(0, (-3, 0, 5), 1)); w.bit_length   # what is written
    26
    """
    vals = [int(v) for v in values]
    size = len(vals)
    center = zero_offset - (size >> 1)
    bits = 4 + ue_length(2, size) + ue_length(2, (center << 1) - 1 if center > 0 else -center << 1)
    z = vals[zero_offset]
    bits += ue_length(7, (z << 1) - 1 if z > 0 else -z << 1)
    return bits + sum(ue_length(egk, d) for d in _codebook_deltas(vals, zero_offset))


def best_codebook_egk(values, zero_offset: int) -> int:
    """The order 0…15 giving the shortest ``codebook()``, ties to the smallest (NNCodec's choice).

    ``values``: strictly increasing ints; ``zero_offset``: CbZeroOffset.

    >>> best_codebook_egk(range(-100, 101, 10), 10)                       # all deltas are 9: 5 bits at order 2
    2
    >>> [codebook_bits(range(-100, 101, 10), 10, k) for k in range(5)]   # order 4 ties with 2
    [162, 142, 122, 142, 122]
    """
    deltas = _codebook_deltas([int(v) for v in values], zero_offset)
    costs = [sum(ue_length(k, d) for d in deltas) for k in range(16)]
    return costs.index(min(costs))


def _read_codebook(r: BitReader, sfx: str) -> Codebook:
    egk = r.u(4, f"codebook_egk{sfx}")
    size = r.ue(2, f"codebook_size{sfx}")
    if size == 0:
        raise r.fail(f"codebook_size{sfx}", "an empty codebook cannot be indexed")
    # every entry after the zero value costs at least 1 + egk bits
    r.need((size - 1) * (1 + egk), f"codebook{sfx}")
    zo = (size >> 1) + r.ie(2, f"codebook_center_offset{sfx}")
    if not 0 <= zo < size:
        raise r.fail(f"codebook_center_offset{sfx}", f"CbZeroOffset {zo} outside the codebook of size {size}")
    vals = [0] * size
    vals[zo] = r.ie(7, f"codebook_zero_value{sfx}")
    for j in range(zo - 1, -1, -1):
        vals[j] = vals[j + 1] - r.ue(egk, f"codebook_delta_left{sfx}[{j}]") - 1
    for j in range(zo + 1, size):
        vals[j] = vals[j - 1] + r.ue(egk, f"codebook_delta_right{sfx}[{j}]") + 1
    if vals[0] < _INT32_MIN or vals[-1] > _INT32_MAX:
        raise r.fail(f"codebook{sfx}", "codebook entries outside the int32 range")
    return Codebook(egk, tuple(vals), zo)


def _write_codebook(w: BitWriter, cb: Codebook) -> None:
    vals = [int(v) for v in cb.values]
    if not vals or not 0 <= cb.zero_offset < len(vals):
        raise InputError(f"codebook: zero_offset {cb.zero_offset} invalid for {len(vals)} entries")
    if any(b <= a for a, b in pairwise(vals)):
        raise InputError("codebook entries must be strictly increasing")
    w.u(4, cb.egk)
    w.ue(2, len(vals))
    w.ie(2, cb.center_offset)
    w.ie(7, vals[cb.zero_offset])
    for d in _codebook_deltas(vals, cb.zero_offset):
        w.ue(cb.egk, d)


# --------------------------------------------------------------------------------------------------
# entry_point_list()


@dataclass(frozen=True, eq=False)
class EntryPointList:
    """Entry points of one NDU, int64 arrays of equal length n.

    ``value``: top 8 bits of the decoder's value register; ``dq_state``: DQ state (0 without DQ);
    ``offset``: D_j, the decoder bit position of entry point j+1 minus that of entry point j
    (the list codes D_0 with ue(11) and D_j - D_{j-1} with ie(7)). Any object with these three
    attributes (e.g. the coder's ``EntryPoints``) is accepted by the writer.
    """

    value: np.ndarray
    dq_state: np.ndarray
    offset: np.ndarray

    def __eq__(self, other) -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f, None)) for f in ("value", "dq_state", "offset"))

    def __len__(self) -> int:
        return len(self.offset)


def concat_entry_points(*parts) -> EntryPointList:
    """Join per-tensor entry points (e.g. G's then H's of a DC block) into one header list.

    Each part: any object with int arrays ``value``, ``dq_state``, ``offset`` (the coder's
    ``EntryPoints`` or an :class:`EntryPointList`). Example:
    ``len(concat_entry_points(eps_g, eps_h)) == len(eps_g) + len(eps_h)``.
    Returns an :class:`EntryPointList` of int64 arrays of shape ``(sum of the parts' lengths,)``.

    >>> eps_g = EntryPointList(np.array([1, 2]), np.zeros(2, np.int64), np.array([30, 40]))
    >>> eps_h = EntryPointList(np.array([7]), np.array([3]), np.array([55]))
    >>> eps = concat_entry_points(eps_g, eps_h)
    >>> len(eps) == len(eps_g) + len(eps_h), eps.offset.tolist(), eps.dq_state.tolist()
    (True, [30, 40, 55], [0, 0, 3])
    >>> len(concat_entry_points())
    0
    """
    return EntryPointList(*(np.concatenate([np.asarray(getattr(p, f), np.int64).ravel() for p in parts] or
                                           [np.zeros(0, np.int64)]) for f in ("value", "dq_state", "offset")))


def member_entry_points(unit: CompressedDataUnit) -> list:
    """The unit's entry points split per member (aligned with :meth:`CompressedDataUnit.members`).

    Only the weight (or G and H) carries entry points; other members get ``None``, as does every
    member when the header has no entry-point list.

    >>> eps = EntryPointList(np.array([1, 2]), np.zeros(2, np.int64), np.array([30, 40]))
    >>> u = CompressedDataUnit(payload_type=PayloadType.BLOCK, topology_elem_ids=("w", "b"),
    ...                        compressed_parameter_types=CPT_BI, tensor_dimensions=(24, 3), scan_order=1,
    ...                        entry_points=eps)
    >>> [m.role for m in u.members()], [e if e is None else e.offset.tolist() for e in member_entry_points(u)]
    (['bias', 'weight'], [None, [30, 40]])
    """
    members = unit.members()
    eps = unit.entry_points
    if eps is None:
        return [None] * len(members)
    out, start = [], 0
    for m in members:
        if m.role in ("tensor", "weight", "dc_g", "dc_h") and len(m.shape) > 1:
            shift = 2 + unit.scan_order
            n = max(0, ((int(m.shape[0]) + (1 << shift) - 1) >> shift) - 1)
            sl = slice(start, start + n)
            out.append(EntryPointList(*(np.asarray(getattr(eps, f))[sl] for f in ("value", "dq_state", "offset"))))
            start += n
        else:
            out.append(None)
    return out


def _read_entry_points(r: BitReader, n: int, dq_flag: int) -> EntryPointList:
    r.need(n * (9 + 3 * dq_flag), "cabac_entry_point_list")  # u(8) [+u(3)] + >=1 bit each
    value = np.zeros(n, np.int64)
    dq = np.zeros(n, np.int64)
    off = np.zeros(n, np.int64)
    prev = 0
    for j in range(n):
        value[j] = r.u(8, f"cabac_entry_point_value[{j}]")
        if dq_flag:
            dq[j] = r.u(3, f"cabac_entry_point_dq_state[{j}]")
        if j == 0:
            d = r.ue(11, "cabac_entry_point_bit_offset_delta[0]")
        else:
            d = prev + r.ie(7, f"cabac_entry_point_bit_offset_delta[{j}]")
            if d < 0 or d >= 1 << 62:
                raise r.fail(f"cabac_entry_point_bit_offset_delta[{j}]", f"entry-point distance {d} out of range")
        off[j] = prev = d
    return EntryPointList(value, dq, off)


def _write_entry_points(w: BitWriter, eps, n: int, dq_flag: int) -> None:
    value = np.asarray(eps.value, np.int64).ravel()
    dq = np.asarray(eps.dq_state, np.int64).ravel()
    off = np.asarray(eps.offset, np.int64).ravel()
    if not len(value) == len(dq) == len(off) == n:
        raise InputError(f"entry points: expected {n} entries, got {len(value)}/{len(dq)}/{len(off)}")
    if not dq_flag and np.any(dq):
        raise InputError("entry points carry DQ states but dq_flag is 0")
    prev = 0
    for j in range(n):
        w.u(8, int(value[j]))
        if dq_flag:
            w.u(3, int(dq[j]))
        if j == 0:
            w.ue(11, int(off[0]))
        else:
            w.ie(7, int(off[j]) - prev)
        prev = int(off[j])


# --------------------------------------------------------------------------------------------------
# the unit


class Member(NamedTuple):
    """One tensor carried by an NDU, in arithmetic-coded order.

    ``role``: "tensor" (a plain NDU), or for blocks / DC: "ls", "bias", "bn_beta", "bn_gamma",
    "bn_mean", "bn_var", "weight", "dc_g", "dc_h". ``codebook``: the codebook applying to it.
    """

    role: str
    name: object  # str, or int with indexed topology references
    shape: tuple
    codebook: Codebook | None


@dataclass(kw_only=True)
class CompressedDataUnit(UnitBase):
    """An NNR_NDU unit: every field of ``nnr_compressed_data_unit_header()`` plus the payload.

    Flags that only say "a value follows" are implied by the value (``codebook is None`` etc.).
    ``topology_elem_ids`` holds one name for non-block units and the block's names in topology
    order for ``PayloadType.BLOCK`` (ints instead of names with indexed references).
    ``tensor_dimensions``, ``cabac_unary_length_minus1``, ``compressed_parameter_types``,
    ``decomposition_rank`` and ``g_number_of_rows`` are the effective values; their ``*_flag`` /
    ``input_parameters_present_flag`` say whether they are written in band.
    ``payload``: the arithmetic-coded bytes (INT, FLOAT, BLOCK) or a float32 array of shape
    ``tensor_dimensions`` (RAW_FLOAT).
    """

    payload_type: int
    topology_elem_ids: tuple
    decompressed_data_format: int | None = None
    input_parameters_present_flag: int = 1
    node_id_present_flag: int = 1
    device_id: int = 0
    parameter_id: int = 0
    put_node_depth: int = 0
    parent_node_id_present_flag: int = 0
    parent_node_id_type: int = ParentNodeIdType.NDU_ID
    temporal_context_modeling_flag: int = 0
    parent_device_id: int = 0
    parent_node_payload_sha: bytes | None = None  # 32 (SHA-256) or 64 (SHA-512) bytes
    codebook: Codebook | None = None
    codebook_dc: Codebook | None = None
    dq_flag: int = 0
    tensor_dimensions_flag: int = 1
    cabac_unary_length_flag: int = 1
    compressed_parameter_types: int = 0
    decomposition_rank: int | None = None
    g_number_of_rows: int | None = None
    tensor_dimensions: tuple = ()
    cabac_unary_length_minus1: int = 10
    first_tensor_dimension_shift: int = 0
    scan_order: int = 0
    entry_points: object | None = None
    payload: object = field(default=b"", repr=False)

    # -- derived views ----------------------------------------------------------------------------
    @property
    def is_block(self) -> bool:
        """Whether this is an ``NNR_PT_BLOCK`` unit (several tensors under one header).

        >>> CompressedDataUnit(payload_type=PayloadType.BLOCK, topology_elem_ids=("w", "b"),
        ...                    compressed_parameter_types=CPT_BI, tensor_dimensions=(4, 3)).is_block
        True
        >>> CompressedDataUnit(payload_type=PayloadType.INT, topology_elem_ids=("w",)).is_block
        False
        """
        return self.payload_type == PayloadType.BLOCK

    def dc_shapes(self) -> tuple[tuple, tuple]:
        """Shapes of G ``[g_rows, rank]`` and H ``[rank, prod(dims) / g_rows]`` (CPT_DC only).

        >>> u = CompressedDataUnit(payload_type=PayloadType.INT, topology_elem_ids=("w_G",),
        ...                        compressed_parameter_types=CPT_DC, tensor_dimensions=(8, 6),
        ...                        decomposition_rank=2, g_number_of_rows=8)
        >>> u.dc_shapes()                                      # a rank-2 factorisation of the 8 x 6 weight
        ((8, 2), (2, 6))
        """
        rows, rank = self.g_number_of_rows, self.decomposition_rank
        return (rows, rank), (rank, _prod(self.tensor_dimensions) // rows)

    def members(self) -> list[Member]:
        """The tensors of this unit in the order their data appears in the arithmetic-coded stream.

        >>> u = CompressedDataUnit(payload_type=PayloadType.BLOCK, topology_elem_ids=("w", "w_scaling", "b"),
        ...                        compressed_parameter_types=CPT_LS | CPT_BI, tensor_dimensions=(4, 3))
        >>> [(m.role, m.name, m.shape) for m in u.members()]   # topology order W, LS, BI; coded LS, BI, W
        [('ls', 'w_scaling', (4,)), ('bias', 'b', (4,)), ('weight', 'w', (4, 3))]
        """
        cpt, dims, cb = self.compressed_parameter_types, tuple(self.tensor_dimensions), self.codebook
        if not self.is_block:
            name = self.topology_elem_ids[0]
            if cpt & CPT_DC:
                g, h = self.dc_shapes()
                return [Member("dc_g", name, g, cb) if _is_dc_g(name) else Member("dc_h", name, h, cb)]
            return [Member("tensor", name, dims, cb)]
        roles = _block_roles(cpt)
        vec = dims[:1]
        g, h = self.dc_shapes() if cpt & CPT_DC else (None, None)
        shape = {"weight": dims, "dc_g": g, "dc_h": h}
        books = {"weight": cb, "dc_g": cb, "dc_h": self.codebook_dc}
        by_role = {r: Member(r, n, shape.get(r, vec), books.get(r)) for r, n in zip(roles, self.topology_elem_ids)}
        return [by_role[r] for r in _CODED_ORDER if r in by_role]

    def element_count(self) -> int:
        """Total number of elements a decoder materialises: all members, plus the weight that a
        DC unit carrying H recomposes from G and H.

        >>> u = CompressedDataUnit(payload_type=PayloadType.INT, topology_elem_ids=("w_H",),
        ...                        compressed_parameter_types=CPT_DC, tensor_dimensions=(8, 6),
        ...                        decomposition_rank=2, g_number_of_rows=8)
        >>> u.element_count()                                  # H (2, 6) plus the recomposed (8, 6) weight
        60
        """
        members = self.members()
        rebuilt = _prod(self.tensor_dimensions) if any(m.role == "dc_h" for m in members) else 0
        return sum(_prod(m.shape) for m in members) + rebuilt


_CODED_ORDER = ("ls", "bias", "bn_beta", "bn_gamma", "bn_mean", "bn_var", "weight", "dc_g", "dc_h")


def _block_roles(cpt: int) -> list[str]:
    """Member roles of a block in topology-list order (W or G,H; LS; BN x4; BI)."""
    roles = ["dc_g", "dc_h"] if cpt & CPT_DC else ["weight"]
    if cpt & CPT_LS:
        roles.append("ls")
    if cpt & CPT_BN:
        roles += ["bn_beta", "bn_gamma", "bn_mean", "bn_var"]
    if cpt & CPT_BI:
        roles.append("bias")
    return roles


def _is_dc_g(name) -> bool:
    # NNCodec tells G from H of a non-block DC pair by the "_G" name suffix.
    return isinstance(name, str) and name.endswith("_G")


def _prod(dims) -> int:
    p = 1
    for d in dims:
        p *= int(d)
    return p


def entry_point_count(unit: CompressedDataUnit) -> int:
    """Number of entries of ``entry_point_list()`` this header carries (0 if none).

    ``ceil(dims0 / (4 << scan_order)) - 1`` over the scanned tensor's first dimension; for a
    DC block the sum over G and H; for a non-block DC unit G's or H's (by the "_G" suffix).

    >>> u = CompressedDataUnit(payload_type=PayloadType.FLOAT, topology_elem_ids=("w",),
    ...                        tensor_dimensions=(40, 3), scan_order=1)
    >>> entry_point_count(u)                                          # ceil(40 / 8) - 1
    4
    """
    if len(unit.tensor_dimensions) <= 1 or unit.scan_order == 0:
        return 0
    shift = 2 + unit.scan_order
    rows = lambda h: max(0, ((int(h) + (1 << shift) - 1) >> shift) - 1)
    if unit.compressed_parameter_types & CPT_DC:
        g, h = unit.dc_shapes()
        if unit.is_block:
            return rows(g[0]) + rows(h[0])
        return rows(g[0] if _is_dc_g(unit.topology_elem_ids[0]) else h[0])
    return rows(unit.tensor_dimensions[0])


# --------------------------------------------------------------------------------------------------
# reading


def _lookup_oob(oob: Mapping | None, names) -> OutOfBand:
    """The caller's out-of-band values for these names, validated (InputError) like any argument."""
    o = next((oob[n] for n in names if n in oob), None) if oob else None
    if o is None:
        return OutOfBand()
    if not isinstance(o, OutOfBand):
        raise InputError(f"out_of_band values must be OutOfBand, got {type(o).__name__}")
    ranges = {"cabac_unary_length_minus1": 255, "compressed_parameter_types": 15,
              "decomposition_rank": None, "g_number_of_rows": None}
    for name, hi in ranges.items():
        v = getattr(o, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0
                              or (hi is not None and v > hi)):
            raise InputError(f"out_of_band {name} = {v!r} is not an integer in 0..{hi or 'inf'}")
    if o.tensor_dimensions is not None and any(
            isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in o.tensor_dimensions):
        raise InputError(f"out_of_band tensor_dimensions {o.tensor_dimensions!r} must be non-negative integers")
    return o


def read_ndu_body(r: BitReader, ctx: SyntaxContext, limits: DecodeLimits, oob: Mapping | None,
                  base: dict) -> CompressedDataUnit:
    """Parse the NDU header (after the common unit header) and its payload up to ``r.end``.

    ``base``: the common unit-header fields. Raises BitstreamError / LimitError / UnsupportedStreamError.

    >>> u = CompressedDataUnit(payload_type=PayloadType.FLOAT, topology_elem_ids=("w",),
    ...                        tensor_dimensions=(3, 3), payload=b"abc")
    >>> w = BitWriter(); write_ndu_body(w, u, SyntaxContext())
    >>> v = read_ndu_body(BitReader(w.getvalue()), SyntaxContext(), DecodeLimits(), None, {})
    >>> v.topology_elem_ids, v.tensor_dimensions, v.payload, v == u
    (('w',), (3, 3), b'abc', True)
    """
    pt = r.u(5, "nnr_compressed_data_unit_payload_type")
    if pt > PayloadType.BLOCK:
        raise r.fail("nnr_compressed_data_unit_payload_type", f"unknown payload type {pt}")
    pt = PayloadType(pt)
    multiple = r.u(1, "nnr_multiple_topology_elements_present_flag")
    ddf_present = r.u(1, "nnr_decompressed_data_format_present_flag")
    ipp = r.u(1, "input_parameters_present_flag")
    if multiple != (pt == PayloadType.BLOCK):
        if multiple:
            raise r.fail("nnr_multiple_topology_elements_present_flag",
                         "tensor splitting (multiple elements outside NNR_PT_BLOCK) is not supported", UnsupportedStreamError)
        raise r.fail("nnr_multiple_topology_elements_present_flag", "NNR_PT_BLOCK needs multiple topology elements")
    indexed = ctx.topology_indexed_reference_flag
    if multiple:
        n = r.ue(7, "count_topology_elements_minus2") + 2
        r.need(8 * n, "topology_elem_id_list")  # a name or an index costs at least 8 bits
        if indexed:
            ids = tuple(r.ue(7, f"topology_elem_id_index_list[{j}]") for j in range(n))
            r.byte_alignment("topology_elements_ids_list.byte_alignment")
        else:
            r.byte_alignment("topology_elements_ids_list.byte_alignment")
            ids = tuple(r.st(f"topology_elem_id_list[{j}]") for j in range(n))
    else:
        ids = (r.ue(7, "topology_elem_id_index"),) if indexed else (r.st("topology_elem_id"),)
    f = dict(base, payload_type=pt, topology_elem_ids=ids, input_parameters_present_flag=ipp)

    if ctx.general_profile_idc == 1:
        f["node_id_present_flag"] = nid = r.u(1, "node_id_present_flag")
        if nid:
            f["device_id"] = r.ue(1, "device_id")
            f["parameter_id"] = r.ue(5, "parameter_id")
            f["put_node_depth"] = r.ue(4, "put_node_depth")
        if ctx.parent_signalling_enabled_flag:
            f["parent_node_id_present_flag"] = par = r.u(1, "parent_node_id_present_flag")
            if par:
                f["parent_node_id_type"] = ptype = r.u(2, "parent_node_id_type")
                f["temporal_context_modeling_flag"] = r.u(1, "temporal_context_modeling_flag")
                if ptype == ParentNodeIdType.NDU_ID:
                    f["parent_device_id"] = r.ue(1, "parent_device_id")
                    if not nid:
                        f["parameter_id"] = r.ue(5, "parameter_id")
                        f["put_node_depth"] = r.ue(4, "put_node_depth")
                elif ptype == ParentNodeIdType.SHA256:
                    f["parent_node_payload_sha"] = r.u(256, "parent_node_payload_sha256").to_bytes(32, "big")
                elif ptype == ParentNodeIdType.SHA512:
                    f["parent_node_payload_sha"] = r.u(512, "parent_node_payload_sha512").to_bytes(64, "big")
                else:
                    raise r.fail("parent_node_id_type", "invalid value 3")
    else:
        f["node_id_present_flag"] = 0

    if pt in (PayloadType.FLOAT, PayloadType.BLOCK) and r.u(1, "codebook_present_flag"):
        f["codebook"] = _read_codebook(r, "")
    if pt in _CODED:
        f["dq_flag"] = r.u(1, "dq_flag")
    if ddf_present:
        f["decompressed_data_format"] = ddf = r.u(7, "nnr_decompressed_data_format")
        if ddf > _MAX_DDF:
            raise r.fail("nnr_decompressed_data_format", f"unknown format {ddf}")

    o = _lookup_oob(oob, ids)
    dims = o.tensor_dimensions
    cul = o.cabac_unary_length_minus1
    cpt = o.compressed_parameter_types
    rank, grows = o.decomposition_rank, o.g_number_of_rows
    if ipp:
        f["tensor_dimensions_flag"] = dflag = r.u(1, "tensor_dimensions_flag")
        f["cabac_unary_length_flag"] = cflag = r.u(1, "cabac_unary_length_flag")
        cpt = r.u(4, "compressed_parameter_types")
        if cpt & CPT_DC:
            rank = r.ue(3, "decomposition_rank")
            grows = r.ue(3, "g_number_of_rows")
        if dflag:
            count = r.ue(1, "count_tensor_dimensions")
            _check_rank(r, count, limits)
            r.need(8 * count, "tensor_dimensions")
            dims = tuple(r.ue(7, f"tensor_dimensions[{j}]") for j in range(count))
        if cflag:
            cul = r.u(8, "cabac_unary_length_minus1")
    else:
        f["tensor_dimensions_flag"] = f["cabac_unary_length_flag"] = 0
    if dims is None:
        raise r.fail("tensor_dimensions", "not in the bitstream and no out-of-band value was given")
    dims = tuple(int(d) for d in dims)
    _check_rank(r, len(dims), limits)  # out-of-band dimensions obey the same limit
    cpt = 0 if cpt is None else cpt
    f.update(tensor_dimensions=dims, compressed_parameter_types=cpt,
             cabac_unary_length_minus1=9 if cul is None else cul)  # 9: NNCodec's decoder default
    if cpt & CPT_DC:
        if rank is None or grows is None:
            raise r.fail("decomposition_rank", "CPT_DC without decomposition_rank / g_number_of_rows")
        if rank == 0 or grows == 0:
            raise r.fail("g_number_of_rows" if rank else "decomposition_rank", "must be positive")
        if _prod(dims) % grows:
            raise r.fail("g_number_of_rows", f"{grows} does not divide the {_prod(dims)} weight elements")
        f.update(decomposition_rank=rank, g_number_of_rows=grows)

    unit = CompressedDataUnit(**f)
    if pt == PayloadType.BLOCK and len(ids) != len(_block_roles(cpt)):
        raise r.fail("count_topology_elements_minus2",
                     f"{len(ids)} names but compressed_parameter_types {cpt} implies {len(_block_roles(cpt))}")
    _check_limits(r, unit, limits)

    if pt == PayloadType.BLOCK and cpt & CPT_DC and unit.codebook is not None:
        unit.codebook_dc = _read_codebook(r, "_dc")
    if len(dims) > 1:
        if ctx.general_profile_idc == 1:
            unit.first_tensor_dimension_shift = r.ue(1, "first_tensor_dimension_shift")
        unit.scan_order = r.u(4, "scan_order")
        if unit.scan_order > _MAX_SCAN_ORDER:
            raise r.fail("scan_order", f"{unit.scan_order} > {_MAX_SCAN_ORDER}")
        if unit.scan_order:
            unit.entry_points = _read_entry_points(r, entry_point_count(unit), unit.dq_flag)
    r.byte_alignment("nnr_compressed_data_unit_header.byte_alignment")

    if pt == PayloadType.RAW_FLOAT:
        unit.payload = r.float32_array(dims, "raw_float32_parameter")
        if r.bits_left:
            raise r.fail("raw_float32_parameter", f"{r.bits_left // 8} bytes after the raw tensor inside the unit")
    else:
        unit.payload = r.rest("nnr_compressed_data_unit_payload")
    return unit


def _check_rank(r: BitReader, count: int, limits: DecodeLimits) -> None:
    if count > limits.max_tensor_rank:
        raise r.fail("count_tensor_dimensions", f"{count} dimensions exceed the limit {limits.max_tensor_rank}",
                     LimitError)


def _check_limits(r: BitReader, unit: CompressedDataUnit, limits: DecodeLimits) -> None:
    shapes = [(m.role, m.name, m.shape) for m in unit.members()]
    if unit.compressed_parameter_types & CPT_DC:  # the weight recomposed from small factors counts too
        shapes.append(("weight", unit.topology_elem_ids[0], tuple(unit.tensor_dimensions)))
    for role, name, shape in shapes:
        n = _prod(shape)
        if n > limits.max_tensor_elements:
            raise r.fail("tensor_dimensions", f"{role} {name!r} of shape {shape} has {n} elements, "
                         f"more than the limit {limits.max_tensor_elements}", LimitError)


# --------------------------------------------------------------------------------------------------
# writing


def write_ndu_body(w: BitWriter, u: CompressedDataUnit, ctx: SyntaxContext) -> None:
    """Write the NDU header (after the common unit header) and payload. Raises InputError.

    >>> u = CompressedDataUnit(payload_type=PayloadType.FLOAT, topology_elem_ids=("w",),
    ...                        tensor_dimensions=(3, 3), payload=b"abc")
    >>> w = BitWriter(); write_ndu_body(w, u, SyntaxContext()); w.getvalue().hex()   # header, payload
    '097700d040c120e0c2a080616263'
    """
    pt = PayloadType(u.payload_type)
    ids = tuple(u.topology_elem_ids)
    block = pt == PayloadType.BLOCK
    if (len(ids) > 1) != block or not ids:
        raise InputError(f"{pt.name}: {len(ids)} topology elements (blocks need >= 2, others exactly 1)")
    if block and len(ids) != len(_block_roles(u.compressed_parameter_types)):
        raise InputError("block: topology element count does not match compressed_parameter_types")
    kind = int if ctx.topology_indexed_reference_flag else str
    if not all(isinstance(i, kind) and not isinstance(i, bool) for i in ids):
        raise InputError(f"topology_elem_ids must all be {kind.__name__} "
                         f"(mps_topology_indexed_reference_flag = {ctx.topology_indexed_reference_flag})")
    w.u(5, pt)
    w.u(1, int(block))
    w.u(1, int(u.decompressed_data_format is not None))
    w.u(1, u.input_parameters_present_flag)
    indexed = ctx.topology_indexed_reference_flag
    if block:
        w.ue(7, len(ids) - 2)
        if indexed:
            for i in ids:
                w.ue(7, i)
            w.byte_alignment()
        else:
            w.byte_alignment()
            for s in ids:
                w.st(s)
    elif indexed:
        w.ue(7, ids[0])
    else:
        w.st(ids[0])

    if ctx.general_profile_idc == 1:
        w.u(1, u.node_id_present_flag)
        if u.node_id_present_flag:
            w.ue(1, u.device_id); w.ue(5, u.parameter_id); w.ue(4, u.put_node_depth)
        if ctx.parent_signalling_enabled_flag:
            w.u(1, u.parent_node_id_present_flag)
            if u.parent_node_id_present_flag:
                w.u(2, u.parent_node_id_type)
                w.u(1, u.temporal_context_modeling_flag)
                if u.parent_node_id_type == ParentNodeIdType.NDU_ID:
                    w.ue(1, u.parent_device_id)
                    if not u.node_id_present_flag:
                        w.ue(5, u.parameter_id); w.ue(4, u.put_node_depth)
                else:
                    nbytes = 32 if u.parent_node_id_type == ParentNodeIdType.SHA256 else 64
                    sha = u.parent_node_payload_sha
                    if sha is None or len(sha) != nbytes or u.parent_node_id_type > ParentNodeIdType.SHA512:
                        raise InputError(f"parent_node_id_type {u.parent_node_id_type} needs a {nbytes}-byte hash")
                    w.u(8 * nbytes, int.from_bytes(sha, "big"))

    if pt in (PayloadType.FLOAT, PayloadType.BLOCK):
        w.u(1, int(u.codebook is not None))
        if u.codebook is not None:
            _write_codebook(w, u.codebook)
    elif u.codebook is not None:
        raise InputError(f"{pt.name} units cannot carry a codebook")
    if pt in _CODED:
        w.u(1, u.dq_flag)
    if u.decompressed_data_format is not None:
        w.u(7, u.decompressed_data_format)

    cpt = u.compressed_parameter_types
    dims = tuple(u.tensor_dimensions)
    if u.input_parameters_present_flag:
        w.u(1, u.tensor_dimensions_flag)
        w.u(1, u.cabac_unary_length_flag)
        w.u(4, cpt)
        if cpt & CPT_DC:
            w.ue(3, u.decomposition_rank); w.ue(3, u.g_number_of_rows)
        if u.tensor_dimensions_flag:
            w.ue(1, len(dims))
            for d in dims:
                w.ue(7, d)
        if u.cabac_unary_length_flag:
            w.u(8, u.cabac_unary_length_minus1)
    if block and cpt & CPT_DC and u.codebook is not None:
        if u.codebook_dc is None:
            raise InputError("a DC block with a codebook needs codebook_dc for H")
        _write_codebook(w, u.codebook_dc)
    if len(dims) > 1:
        if ctx.general_profile_idc == 1:
            w.ue(1, u.first_tensor_dimension_shift)
        w.u(4, u.scan_order)
        if u.scan_order:
            n = entry_point_count(u)
            if u.entry_points is None and n:
                raise InputError(f"scan_order {u.scan_order} needs {n} entry points")
            if n:
                _write_entry_points(w, u.entry_points, n, u.dq_flag)
    w.byte_alignment()

    if pt == PayloadType.RAW_FLOAT:
        arr = np.asarray(u.payload)
        if arr.shape != dims:
            raise InputError(f"raw float payload shape {arr.shape} != tensor_dimensions {dims}")
        w.float32_array(arr)
    else:
        w.raw_bytes(u.payload)
