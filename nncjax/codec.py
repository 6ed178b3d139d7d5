"""Whole models in, whole models out: the public NNR codec API.

:func:`encode` turns any pytree of arrays into an NNR bitstream that is byte-identical to
``nncodec.nn.encode`` (NNCodec 2.1.3) with the same settings; :func:`decode` reads it (or any NNCodec
bitstream of a dict model) back; :func:`inspect` lists what a bitstream contains.

Pipeline per tensor (tensors are independent and are coded in parallel threads; the Numba kernels
release the GIL): input policy (:mod:`nncjax.tensor_policy`) -> QP choice -> quantize
(:mod:`nncjax.quantize.reference`) -> DeepCABAC (:mod:`nncjax.kernels.coder`) -> NDU
(:mod:`nncjax.kernels.units`). The bitstream is STR, MPS, TPL, then one NDU per tensor in input
order, exactly as NNCodec writes a dict model (profile 1, node ids, parameter_id = tensor index).
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from nncjax.arguments import check_flag, check_int, check_real, is_int
from nncjax.coded_tensor import SCALING_SUFFIX
from nncjax.errors import BitstreamError, InputError, UnsupportedStreamError
from nncjax.pytree_names import flatten_named, unflatten_like
from nncjax.ready import block_roles, cast_leaf, map_onto, ready_flat
from nncjax.steps import check_qp_density
from nncjax.tensor_policy import PreparedTensor, prepare_tensor

__all__ = ["QPAdjustedWarning", "StreamInfo", "TensorInfo", "decode", "encode", "inspect"]

PROFILE = 1  # NNCodec 2.1.3 hard-codes general_profile_idc = 1
_PROGRESS_MIN_ELEMENTS = 1 << 23  # auto progress bar from ~8 M parameters on
# Below this much work in all, threads cost more than they save: short kernels hand the GIL back and
# forth. Encoding works on every element; decoding mostly on the coded bits (a 4 KB update of 391 k
# elements decoded in 7.1 ms on 2 threads, 3.9 ms on one; from about 16 KB on, 2 threads gain).
_PARALLEL_MIN_ELEMENTS = 1 << 16
_PARALLEL_MIN_PAYLOAD_BYTES = 1 << 14


class QPAdjustedWarning(UserWarning):
    """A tensor was coded with a coarser QP than requested (its values would overflow int32 levels)."""


# ------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class _Settings:
    qp: int
    qp_density: int
    nonweight_qp: int | None
    dq: bool
    codebook: str  # "off" | "auto" (NNCodec codebook_mode 2) | "always" (codebook_mode 1)
    bitdepth: int | None
    row_skipping: bool
    param_opt: bool
    scan_order: int
    lambda_scale: float
    unary_length: int

    @property
    def qp_bits(self) -> int:
        return 6 + self.qp_density

    def check_qp(self, qp: int, what: str) -> int:
        lo, hi = -(1 << (self.qp_bits - 1)), (1 << (self.qp_bits - 1)) - 1
        if not is_int(qp) or not lo <= int(qp) <= hi:
            raise InputError(f"{what} must be an integer in [{lo}, {hi}] for qp_density {self.qp_density}, "
                             f"got {qp!r}")
        return int(qp)


def _settings(qp, qp_density, nonweight_qp, dq, codebook, bitdepth, row_skipping, param_opt, scan_order,
              lambda_scale, unary_length) -> _Settings:
    qpd = check_qp_density(qp_density)
    cb_modes = {False: "off", None: "off", "off": "off", True: "auto", "auto": "auto", "always": "always"}
    if not isinstance(codebook, (bool, str, type(None))) or codebook not in cb_modes:
        raise InputError(f"codebook must be False, True/'auto' or 'always', got {codebook!r}")
    bitdepth = None if bitdepth is None else check_int(bitdepth, "bitdepth (or None)", lo=2, hi=31)
    scan_order = check_int(scan_order, "scan_order", lo=0, hi=4)
    unary_length = check_int(unary_length, "unary_length", lo=1, hi=256)
    if unary_length == 1 and cb_modes[codebook] != "off":
        # NNCodec picks a codebook's zero offset (and, for "auto", codebook or not) by trial coding
        # with unary_length - 1 = 0 greater-than flags, a coder mode its own decoder cannot read back.
        raise InputError("codebook needs unary_length >= 2 (NNCodec's codebook search codes with "
                         "unary_length - 1 greater-than flags)")
    lam = check_real(lambda_scale, "lambda_scale", lo=0)
    s = _Settings(0, qpd, None, check_flag(dq, "dq"), cb_modes[codebook], bitdepth,
                  check_flag(row_skipping, "row_skipping"), check_flag(param_opt, "param_opt"), scan_order, lam,
                  unary_length)
    qp = s.check_qp(qp, "qp")
    # NNCodec treats a falsy nonweight_qp (None or 0) as "qp - 2 octaves" (step / 4).
    nw = s.check_qp(nonweight_qp, "nonweight_qp") if nonweight_qp else None
    return _Settings(qp, qpd, nw, s.dq, s.codebook, s.bitdepth, s.row_skipping, s.param_opt, s.scan_order,
                     s.lambda_scale, s.unary_length)


def _override_table(overrides, what: str, check, names: list[str], float_names: set[str]) -> dict[str, Any]:
    """``overrides`` (argument ``what``) -> {tensor name: check(value)}. Exact names win; other keys
    are regular expressions (``re.fullmatch``), applied in the order given, the first match winning."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise InputError(f"{what} must be a mapping {{tensor name or regex: value}}")
    table: dict[str, Any] = {}
    patterns = []
    for key, value in overrides.items():
        value = check(value, f"{what}[{key!r}]")
        if isinstance(key, str) and key in float_names:
            table[key] = value
            continue
        try:
            pat = key if isinstance(key, re.Pattern) else re.compile(str(key))
        except re.error as e:
            raise InputError(f"{what} key {key!r} is neither a float tensor's name nor a valid "
                             f"regular expression: {e}") from None
        patterns.append((key, pat, value))
    for key, pat, value in patterns:
        hits = [n for n in names if n in float_names and pat.fullmatch(n)]
        if not hits:
            hint = ""
            if isinstance(key, str) and key.endswith(SCALING_SUFFIX) and key[:-len(SCALING_SUFFIX)] in names:
                # optimize()'s settings name local-scale tensors that only params_for_encoding adds
                hint = (f"; {key!r} is a local-scale tensor: encode settings.params_for_encoding(params), "
                        f"which adds it, not the parameters alone")
            raise InputError(f"{what} key {key!r} matches no float tensor (integer tensors are coded "
                             f"losslessly){hint}")
        for n in hits:
            table.setdefault(n, value)
    return table


# ------------------------------------------------------------------------------------------------
# per-tensor coding


@dataclass(frozen=True)
class UnitLink:
    """Where one NDU of an update stream (:mod:`nncjax.update`) stands in its tensor's history.

    ``depth``: put_node_depth; ``device_id``: the sender; ``differential``: parent_node_id_present_flag
    (the tensor is a difference to its parent); ``base``: the parent's integer levels when the unit uses
    temporal context adaptation (temporal_context_modeling_flag = 1), else None; ``hist``: the tensor's
    HDSP history (int8, 1 where a level of an earlier update was non-zero) when HDSP may be tried.
    """

    depth: int
    device_id: int
    differential: bool
    base: np.ndarray | None = None
    hist: np.ndarray | None = None


@dataclass
class _Coded:
    """One tensor, quantized and arithmetic-coded, before its NDU header is written."""

    name: str
    index: int
    shape: tuple[int, ...]
    is_int: bool
    qp: int | None
    dq: bool
    scan_order: int
    payload: bytes
    codebook: np.ndarray | None = None
    codebook_offset: int = 0
    codebook_egk: int = 0
    entry_points: Any = None
    notes: list[str] = field(default_factory=list)
    cpt: int = 0  # compressed_parameter_types of a block (0: a single tensor)
    topology: tuple = ()  # a block's member names in topology order
    coded_shapes: tuple = ()  # every coded tensor's shape in coded order (per-row members, then W or G, H)
    decomposition: tuple | None = None  # DC: (decomposition_rank, g_number_of_rows)
    codebook_dc: tuple | None = None  # DC with codebooks: H's (codebook, offset, egk)
    link: UnitLink | None = None  # in an update stream (nncjax.update): the unit's node fields and side info
    hdsp: bool = False  # the payload codes with the link's HDSP history
    levels: np.ndarray | None = None  # a single tensor's levels, kept in update streams for the next one

    def codebooks(self) -> tuple:
        """(size, zero offset) of the codebook of each scanned tensor (W, or G then H); size 0: none."""
        size = lambda cb: 0 if cb is None else len(cb)
        books = ((size(self.codebook), self.codebook_offset),)
        if self.decomposition:
            cb_h = self.codebook_dc or (None, 0, 0)
            books += ((size(cb_h[0]), cb_h[1]),)
        return books


def _matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    h = shape[0]
    w = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return h, w


def _effective_scan(shape: tuple[int, ...], scan_order: int) -> int:
    """The scan order a tensor is coded (and signalled) with: block scans need a real matrix.

    NNCodec crashes on tensors with one row or one column under a block scan; nncjax signals
    scan_order 0 for them (the coder scans them in raster order anyway), which every decoder reads.
    """
    if len(shape) < 2:
        return 0
    h, w = _matrix_dims(shape)
    return scan_order if (h > 1 and w > 1) else 0


@dataclass(frozen=True)
class _Plan:
    """A tensor's requested QP (None for integer tensors), in bitdepth mode its level range, and
    whether it uses dependent quantization."""

    qp: int | None
    clip: tuple[int, int] | None = None
    dq: bool = True


def _clip(levels: np.ndarray, clip: tuple[int, int] | None) -> np.ndarray:
    return levels if clip is None else np.clip(levels, clip[0], clip[1]).astype(np.int32)


def _quantize(t: PreparedTensor, qp: int, s: _Settings, dq: bool, scan: int) -> tuple[np.ndarray, int]:
    from nncjax.quantize.reference import quantize_tensor
    return quantize_tensor(t.data, qp, qp_density=s.qp_density, dq=dq, lambda_scale=s.lambda_scale,
                           unary_length=s.unary_length, scan_order=scan)


def _codebook_choice(t: PreparedTensor, plan: _Plan, s: _Settings) -> dict:
    """NNCodec's codebook path for one tensor (``approx_method='codebook'``).

    Uniform quantization without DQ (one octave finer when DQ was asked for), levels clipped in
    bitdepth mode, codebook = sorted distinct levels, zero offset and Exp-Golomb order by trial
    coding. "auto" (codebook_mode 2) keeps the codebook only if NNCodec's size estimate says it beats
    plain (DQ) coding: both trial payloads use unary_length - 1, profile 1 and no row skipping, and
    the codebook side adds codebook() *bits* to payload *bytes*, as NNCodec does.
    """
    from nncjax.kernels.coder import encode_levels
    from nncjax.quantize.reference import (
        codebook_best_egk,
        codebook_offset_search,
        codebook_qp_offset,
    )
    scan = _effective_scan(t.data.shape, s.scan_order)
    qp_cb = plan.qp - (codebook_qp_offset(s.qp_density) if s.dq else 0)
    # NNCodec skips the bitdepth clip for all-zero tensors here (their levels are 0 anyway).
    clip = plan.clip if t.data.any() else None
    uni_levels, qp_used = _quantize(t, qp_cb, s, dq=False, scan=scan)
    uni_levels = _clip(uni_levels, clip)
    cb, inverse = np.unique(uni_levels, return_inverse=True)
    idx = inverse.reshape(uni_levels.shape).astype(np.int32)
    off = codebook_offset_search(idx, cb.size, s.unary_length)
    egk = codebook_best_egk(cb, off)
    chosen = dict(levels=idx - np.int32(off), qp=int(qp_used), requested=qp_cb, dq=False,
                  codebook=cb.astype(np.int32), offset=int(off), egk=int(egk))
    if s.codebook == "always":
        return chosen
    if s.dq:
        uni_levels, qp_uni = _quantize(t, plan.qp, s, dq=True, scan=scan)
        uni_levels, requested = _clip(uni_levels, clip), plan.qp
    else:
        qp_uni, requested = qp_used, qp_cb
    trial = dict(unary_length=s.unary_length - 1, param_opt=s.param_opt, scan_order=scan,
                 row_skipping=False, profile=PROFILE)
    # Clipped DQ indices may be unreachable from their DQ state: coded as NNCodec codes them (_write_member).
    bytes_uni = len(encode_levels(uni_levels, dq=s.dq, strict_dq=clip is None, **trial))
    cost_cb = len(encode_levels(chosen["levels"], dq=False, **trial)) + _codebook_bits(cb, off, egk)
    if cost_cb < bytes_uni:
        return chosen
    return dict(levels=uni_levels, qp=int(qp_uni), requested=requested, dq=s.dq, codebook=None, offset=0, egk=0)


def _codebook_bits(cb: np.ndarray, off: int, egk: int) -> int:
    from nncjax.kernels.ndu import codebook_bits
    return codebook_bits(cb, off, egk)


def _member_levels(t: PreparedTensor, plan: _Plan, s: _Settings, scan: int,
                   choices: Mapping[str, dict]) -> tuple[dict, list[str]]:
    """Quantizes one tensor for scan order ``scan``: its levels, QP, dq and codebook (a dict) and the
    notes to warn about; ``choices``: codebook choices already made (by :func:`_split_blocks`), by name."""
    notes: list[str] = []
    if t.is_int:
        return dict(levels=t.data, qp=None, dq=False, codebook=None, offset=0, egk=0), notes
    if s.codebook != "off" and t.data.size:  # an empty tensor has no codebook (NNCodec crashes)
        c = choices.get(t.name) or _codebook_choice(t, plan, s)
    else:
        levels, qp_used = _quantize(t, plan.qp, s, dq=plan.dq, scan=scan)
        # NNCodec leaves tensors named like BatchNorm step counters unclipped.
        if ".num_batches_tracked" not in t.name:
            levels = _clip(levels, plan.clip)
        c = dict(levels=levels, qp=int(qp_used), requested=plan.qp, dq=plan.dq, codebook=None, offset=0, egk=0)
    if c["qp"] != c["requested"]:
        notes.append(f"tensor {t.name!r}: QP {c['requested']} would overflow int32 levels "
                     f"(max |w| = {float(np.abs(t.data).max()):.6g}); coded with QP {c['qp']} instead")
    _check_coded_qp(t, c, s)
    return c, notes


def _lenient(c: dict, plan: _Plan, s: _Settings, scan: int) -> bool:
    """Whether a tensor's DQ indices may be ones its state machine cannot produce. Bit-depth clipping,
    or NNCodec's row-skip DQ quirk under block scans (its trellis assumes one state transition per
    skipped element), leaves such indices; NNCodec codes them anyway and every decoder reconstructs a
    neighbouring index. nncjax does the same."""
    return c["dq"] and (plan.clip is not None or (scan > 0 and s.row_skipping))


def _write_member(enc, c: dict, plan: _Plan, s: _Settings, scan: int, link: UnitLink | None = None,
                  hist: np.ndarray | None = None) -> None:
    """Appends a quantized tensor (:func:`_member_levels`) to ``enc``'s stream: its QP delta and its
    levels in scan order ``scan``, in an update stream with the ``link``'s TCA reference and the HDSP
    history ``hist``."""
    if c["qp"] is not None:
        enc.iae_v(s.qp_bits, c["qp"])
    cb = c["codebook"]
    enc.encode_layer(c["levels"], dq=c["dq"], scan_order=scan, row_skipping=s.row_skipping, profile=PROFILE,
                     codebook_size=0 if cb is None else len(cb), codebook_offset=c["offset"],
                     strict_dq=not _lenient(c, plan, s, scan),
                     parent_present=link is not None and link.differential,
                     base=None if link is None else link.base, hdsp_hist=hist)


def _check_coded_qp(t: PreparedTensor, c: dict, s: _Settings) -> None:
    """The QP a tensor is coded with must fit the qp_bits-bit field. It can leave the range that
    ``qp`` and ``nonweight_qp`` were checked against: the overflow guard raises it (values too large
    for any step), the codebook path quantizes one octave finer, and a falsy ``nonweight_qp`` means
    ``qp - 2 << qp_density``. NNCodec writes such a QP anyway; the field wraps and the tensor decodes
    to garbage, so refuse it instead."""
    lo, hi = -(1 << (s.qp_bits - 1)), (1 << (s.qp_bits - 1)) - 1
    if lo <= c["qp"] <= hi:
        return
    where = f"tensor {t.name!r} would be coded with QP {c['qp']}, outside [{lo}, {hi}] for qp_density {s.qp_density}"
    if c["qp"] > hi:
        raise InputError(f"{where}: its values (max |w| = {float(np.abs(t.data).max()):.6g}) overflow int32 levels "
                         "even at the coarsest step; NNR cannot code them")
    raise InputError(f"{where} (a codebook quantizes one octave finer than qp with dq, a falsy nonweight_qp "
                     "means qp - 2 << qp_density); choose a larger qp or nonweight_qp")


def _unit_scan(shapes, scan_order: int, dims: tuple | None = None) -> int:
    """The scan order a unit signals: the requested one, or raster where NNCodec cannot write it.

    A plain unit (``shapes`` = W's shape) needs W to be a real matrix. A DC unit (``shapes`` = G's and
    H's, ``dims`` = W's NNR dims) needs W's dims to be one, and its entry points must add up to the
    ceil(rows / B) - 1 per factor that the header declares: a factor that is no real matrix is
    raster-scanned and has none, so it may span one block row only. NNCodec's encoder fails on the
    other DC units (KeyError, IndexError) and signals the requested scan on these, e.g. G (16, 1).
    """
    if dims is None:
        return _effective_scan(tuple(shapes[0]), scan_order)
    if _effective_scan(tuple(dims), scan_order) == 0:
        return 0
    one_block_row = lambda sh: sh[0] <= 4 << scan_order
    return scan_order if all(_effective_scan(tuple(sh), scan_order) or one_block_row(sh) for sh in shapes) else 0


def _code_tensor(weights: tuple, index: int, s: _Settings, block: _Block | None, members: tuple,
                 choices: Mapping[str, dict], link: UnitLink | None = None) -> _Coded:
    """One NDU's payload: ``weights`` (``(PreparedTensor, _Plan)`` pairs: the tensor, or a DC block's
    G and H), after a block's per-row ``members`` (coded order, same pairs). ``link``: the unit's
    place in an update stream (a single tensor); with an HDSP history the payload is coded with and
    without it and the shorter one kept (the first on a tie), as NNCodec does."""
    from nncjax.kernels.coder import CabacEncoder
    shapes = tuple(t.data.shape for t, _ in weights)
    dc = block is not None and bool(block.factors)
    scan = _unit_scan(shapes, s.scan_order, block.dims if dc else None)
    size = sum(t.data.size for t, _ in weights) + sum(m.data.size for m, _ in members)
    quantized = [(_member_levels(m, mplan, s, 0, choices), mplan, 0) for m, mplan in members]
    quantized += [(_member_levels(t, plan, s, scan, choices), plan, scan) for t, plan in weights]
    notes = [n for (_, member_notes), _, _ in quantized for n in member_notes]

    def payload(hist) -> bytes:
        enc = CabacEncoder(unary_length=s.unary_length, param_opt=s.param_opt, capacity=size // 2 + 1024)
        for (c, _), plan, sc in quantized:
            _write_member(enc, c, plan, s, sc, link, hist)
        return enc.finish()

    done = [c for (c, _), _, _ in quantized[len(members):]]
    first, t = done[0], weights[0][0]
    data, hdsp = payload(None), False
    if link is not None and link.hist is not None and _hdsp_coded(shapes[0], first["codebook"]):
        with_hist = payload(link.hist)
        data, hdsp = (with_hist, True) if len(with_hist) < len(data) else (data, False)
    coded = _Coded(block.weight if dc else t.name, index, block.dims if dc else shapes[0], t.is_int, first["qp"],
                   first["dq"], scan, data, first["codebook"], first["offset"], first["egk"], notes=notes,
                   coded_shapes=tuple(m.data.shape for m, _ in members) + shapes, link=link, hdsp=hdsp,
                   levels=first["levels"] if link is not None else None)
    if block is not None:
        coded.cpt, coded.topology = block.cpt, block.topology
    if dc:
        coded.decomposition = (int(shapes[0][1]), int(shapes[0][0]))
        h = done[1]
        if h["codebook"] is not None:
            coded.codebook_dc = (h["codebook"], h["offset"], h["egk"])
    # In an update stream the state keeps the levels every decoder will see: where DQ indices were
    # coded leniently they differ from the quantizer's (NNCodec keeps those and cannot decode its next
    # TCA update).
    lenient = link is not None and _lenient(first, weights[0][1], s, scan)
    if scan > 0 or lenient:
        rebuilt, entry_points = _read_back(coded, len(weights), s)
        if scan > 0:
            coded.entry_points = entry_points
        if lenient:
            coded.levels = rebuilt[0]
    return coded


def _zero_difference(c: _Coded) -> bool:
    """Whether a unit decodes to zeros only (an update stream leaves it out). With a codebook level 0 is
    ``codebook[offset]``: a constant non-zero difference has a one-entry codebook and all-zero levels, and
    NNCodec leaves it out too, so that its receivers miss it; nncjax codes it."""
    return not c.levels.any() and (c.codebook is None or c.codebook[c.codebook_offset] == 0)


def _hdsp_coded(shape: tuple[int, ...], codebook) -> bool:
    """Whether a tensor's payload carries hist_dep_sig_prob_enabled_flag (with the row-skip block:
    a real matrix, not a one-entry codebook); elsewhere HDSP cannot be signalled."""
    h, w = _matrix_dims(shape)
    return h > 1 and w > 1 and (codebook is None or len(codebook) != 1)


def _read_back(c: _Coded, scanned: int, s: _Settings) -> tuple[list[np.ndarray], Any]:
    """Decodes a finished payload as every decoder will: the levels of the last ``scanned`` tensors (W,
    or G then H, coded after a block's per-row members) and their entry points. Entry points can only
    be known this way (as NNCodec does)."""
    from nncjax.kernels.coder import CabacDecoder
    from nncjax.kernels.ndu import concat_entry_points
    dec = CabacDecoder(c.payload, unary_length=s.unary_length)
    first_scanned = len(c.coded_shapes) - scanned
    levels, parts = [], []
    link = c.link
    for j, shape in enumerate(c.coded_shapes):
        if not c.is_int:
            dec.iae_v(s.qp_bits)
        if j < first_scanned:
            dec.decode_layer(shape, dq=c.dq, scan_order=0, profile=PROFILE)
            continue
        size, offset = c.codebooks()[j - first_scanned]
        lv, eps = dec.decode_layer(shape, dq=c.dq, scan_order=c.scan_order, profile=PROFILE,
                                   codebook_size=size, codebook_offset=offset,
                                   parent_present=link is not None and link.differential,
                                   base=None if link is None else link.base,
                                   hdsp_hist=link.hist if c.hdsp else None)
        levels.append(lv)
        parts.append(eps)
    return levels, parts[0] if scanned == 1 else concat_entry_points(*parts)


# ------------------------------------------------------------------------------------------------
# blocks

_BLOCK_ROLES = ("ls", "bn_beta", "bn_gamma", "bn_mean", "bn_var", "bi")  # topology order after W
_BLOCK_CODED = ("ls", "bi", "bn_beta", "bn_gamma", "bn_mean", "bn_var")  # coded order before W
_BN_ROLES = ("bn_beta", "bn_gamma", "bn_mean", "bn_var")


@dataclass(frozen=True)
class _Block:
    """One NNR_PT_BLOCK: its weight, cpt, topology names and member names in coded order. With DC
    (``factors`` = the names of G and H) the weight is not an input tensor: ``dims`` are its NNR dims
    and the unit takes G's place."""

    weight: str
    cpt: int
    topology: tuple
    coded: tuple
    factors: tuple = ()
    dims: tuple = ()

    @property
    def anchor(self) -> str:
        """The input tensor whose place (and parameter_id) the unit takes."""
        return self.factors[0] if self.factors else self.weight

    @property
    def weights(self) -> tuple:
        """The tensors coded last, with the unit's scan order: W, or G then H."""
        return self.factors or (self.weight,)


def _low_rank_table(low_rank, by_name: Mapping[str, PreparedTensor]) -> dict[str, tuple]:
    """Validates ``encode``'s ``low_rank`` argument -> {weight name: (G name, H name, dims)}."""
    from nncjax.reduce.bnfold import block_names
    if low_rank is None:
        return {}
    if not isinstance(low_rank, Mapping):
        raise InputError("low_rank must be a mapping {weight name: NNR dims of the weight}")
    table: dict[str, tuple] = {}
    for wname, dims in low_rank.items():
        where = f"low_rank[{wname!r}]"
        if not isinstance(wname, str):
            raise InputError(f"{where}: weight names must be strings")
        if wname in by_name:
            raise InputError(f"{where}: params hold {wname!r} itself; give only its factors "
                             f"{wname + '_G'!r} and {wname + '_H'!r}")
        try:
            dims = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            raise InputError(f"{where}: dims must be a sequence of positive integers, got {dims!r}") from None
        if not dims or any(d < 1 for d in dims):
            raise InputError(f"{where}: dims must be a non-empty sequence of positive integers, got {dims}")
        nm = block_names(wname)
        factors = []
        for key in ("G", "H"):
            t = by_name.get(nm[key])
            if t is None:
                raise InputError(f"{where}: params lack the factor {nm[key]!r}")
            if t.is_int or t.orig_shape == () or t.data.ndim != 2:
                raise InputError(f"{where}: factor {nm[key]!r} must be a 2-D float tensor, got "
                                 f"{t.data.dtype} {tuple(t.orig_shape)}")
            factors.append(t.data.shape)
        (g_rows, rank), (h_rows, cols) = factors
        if rank != h_rows or g_rows * cols != math.prod(dims):
            raise InputError(f"{where}: G {factors[0]} and H {factors[1]} do not factor dims {dims} "
                             f"(need G (r, k), H (k, prod(dims) / r))")
        table[wname] = (nm["G"], nm["H"], dims)
    return table


def _block_table(blocks, low_rank, prepared: list[PreparedTensor]) -> dict[str, _Block]:
    """Validates ``encode``'s ``blocks`` and ``low_rank`` arguments -> {anchor tensor name: _Block}."""
    from nncjax.reduce.block import CPT_BI, CPT_BN, CPT_DC, CPT_LS
    by_name = {t.name: t for t in prepared}
    low = _low_rank_table(low_rank, by_name)
    if blocks is None:
        blocks = {}
    if not isinstance(blocks, Mapping):
        raise InputError("blocks must be a mapping {weight name: {role: member name}}")
    factor_names = {n for g, h, _ in low.values() for n in (g, h)}
    used: dict[str, str] = {}
    table: dict[str, _Block] = {}
    for wname, roles in blocks.items():
        where = f"blocks[{wname!r}]"
        if not isinstance(wname, str) or (wname not in by_name and wname not in low):
            raise InputError(f"{where}: no tensor named {wname!r} in params (nor in low_rank)")
        if not isinstance(roles, Mapping) or not roles:
            raise InputError(f"{where} must be a non-empty mapping {{role: member name}} with roles {_BLOCK_ROLES}")
        unknown = [r for r in roles if r not in _BLOCK_ROLES]
        if unknown:
            raise InputError(f"{where}: unknown roles {unknown}; allowed: {_BLOCK_ROLES}")
        bn = [r for r in _BN_ROLES if r in roles]
        if bn and len(bn) != 4:
            raise InputError(f"{where}: batch norm needs all of {_BN_ROLES}, got {bn}")
        if wname in low:
            rows = low[wname][2][0]
            if "ls" in roles and by_name[low[wname][0]].data.shape[0] != rows:
                # NNCodec's decoder scales G's rows by LS, which are W's output rows only if they coincide.
                raise InputError(f"{where}: local scales with low rank need g_number_of_rows == dims[0] ({rows})")
        else:
            w = by_name[wname]
            if w.data.ndim < 1 or w.data.shape[0] < 1 or w.orig_shape == ():
                raise InputError(f"{where}: the weight needs at least one output row, shape {w.orig_shape}")
            rows = w.data.shape[0]
        for role, mname in roles.items():
            if not isinstance(mname, str) or mname not in by_name:
                raise InputError(f"{where}[{role!r}]: no tensor named {mname!r} in params")
            if mname == wname or mname in blocks or mname in factor_names:
                raise InputError(f"{where}[{role!r}]: {mname!r} is a block weight or low-rank factor, not a member")
            if mname in used:
                raise InputError(f"{where}[{role!r}]: {mname!r} is already a member of block {used[mname]!r}")
            used[mname] = wname
            m = by_name[mname]
            if m.is_int and wname in low:
                raise InputError(f"{where}[{role!r}]: {mname!r} is an integer tensor: the low-rank block would have "
                                 "to be split into separate units, which NNCodec cannot code")
            if tuple(m.orig_shape) != (rows,):
                raise InputError(f"{where}[{role!r}]: {mname!r} must have shape ({rows},), got {tuple(m.orig_shape)}")
    for wname in list(blocks) + [w for w in low if w not in blocks]:
        roles = blocks.get(wname, {})
        g, h, dims = low.get(wname, ((), (), ()))
        factors = (g, h) if wname in low else ()
        cpt = ((CPT_DC if factors else 0) | (CPT_LS if "ls" in roles else 0) | (CPT_BN if "bn_beta" in roles else 0)
               | (CPT_BI if "bi" in roles else 0))
        blk = _Block(wname, cpt, (factors or (wname,)) + tuple(roles[r] for r in _BLOCK_ROLES if r in roles),
                     tuple(roles[r] for r in _BLOCK_CODED if r in roles), factors, dims)
        table[blk.anchor] = blk
    return table


def _split_blocks(block_of: Mapping[str, _Block], prepared: list[PreparedTensor], plan: list[_Plan],
                  position: Mapping[str, int], s: _Settings, choices: dict[str, dict]) -> set[str]:
    """The blocks NNCodec writes as separate units (members first, where the block would be, each
    signalling the block's cpt): those holding an integer tensor (coded losslessly, NNR_PT_INT) and,
    with codebooks, those where a member takes a codebook, only one of G and H (low rank) takes one,
    or its tensors would not share one dq_flag (a codebook is coded without DQ).

    Raises InputError for a low-rank block that cannot stay one unit: its factors would become
    separate units, which NNCodec can neither write nor read. The codebook choices it makes go into
    ``choices`` (by tensor name), for the coder to reuse."""
    def has_cb(n):
        c = choices[n] = _codebook_choice(prepared[position[n]], plan[position[n]], s)
        return c["codebook"] is not None

    split = set()
    for anchor, b in block_of.items():
        if any(prepared[position[n]].is_int for n in b.weights + b.coded):
            split.add(anchor)  # never a low-rank block: _low_rank_table and _block_table refuse those
            continue
        if s.codebook == "off":
            continue
        weights_cb = [has_cb(w) for w in b.weights]
        member_cb = [m for m in b.coded if has_cb(m)]
        # members keep the weight's dq plan; a weight coded with a codebook signals dq_flag 0
        dq_clash = bool(b.coded) and plan[position[anchor]].dq and weights_cb[0]
        if not (member_cb or len(set(weights_cb)) > 1 or dq_clash):
            continue
        if b.factors:
            why = (f"member {member_cb[0]!r} takes a codebook" if member_cb else
                   "only one of G and H takes a codebook" if len(set(weights_cb)) > 1 else
                   "its factors take codebooks (dq_flag 0) while its members use DQ")
            raise InputError(f"low_rank[{b.weight!r}] with codebook={s.codebook!r}: {why}, so the block "
                             "would have to be split into separate units, which NNCodec cannot code; "
                             "e.g. codebook='always' on a block without members, or no codebook")
        split.add(anchor)
    return split


# ------------------------------------------------------------------------------------------------
# units


def _header_units(s: _Settings, parent_signalling: bool = False, pre: bool = False) -> bytes:
    from nncjax.kernels.units import (
        ModelParameterSet,
        StartUnit,
        TopologyUnit,
        write_stream,
    )
    mps = ModelParameterSet(qp_density=s.qp_density, parent_signalling_enabled_flag=int(parent_signalling or pre),
                            pre_flag=int(pre))
    return write_stream([StartUnit(general_profile_idc=PROFILE), mps, TopologyUnit()])


def _ndu_bytes(c: _Coded, s: _Settings, parent_signalling: bool) -> bytes:
    from nncjax.kernels.unit_base import SyntaxContext
    from nncjax.kernels.units import (
        Codebook,
        CompressedDataUnit,
        PayloadType,
        write_unit,
    )
    book = lambda cb, offset, egk: None if cb is None else Codebook(egk, tuple(int(v) for v in cb), offset)
    cb = book(c.codebook, c.codebook_offset, c.codebook_egk)
    ptype = PayloadType.BLOCK if c.topology else PayloadType.INT if c.is_int else PayloadType.FLOAT
    link = c.link
    # In an update stream: this unit's node ids and NNCodec's parent reference (by NDU id, type 0, on device 0).
    node = {} if link is None else dict(
        device_id=link.device_id, put_node_depth=link.depth, parent_node_id_present_flag=int(link.differential),
        temporal_context_modeling_flag=int(link.differential and link.base is not None))
    ndu = CompressedDataUnit(
        payload_type=ptype, topology_elem_ids=c.topology or (c.name,), compressed_parameter_types=c.cpt,
        decomposition_rank=c.decomposition[0] if c.decomposition else None,
        g_number_of_rows=c.decomposition[1] if c.decomposition else None, parameter_id=c.index, codebook=cb,
        codebook_dc=book(*c.codebook_dc) if c.codebook_dc else None,
        dq_flag=int(c.dq), tensor_dimensions=tuple(c.shape),
        cabac_unary_length_minus1=s.unary_length - 1, scan_order=c.scan_order, entry_points=c.entry_points,
        payload=c.payload, **node)
    return write_unit(ndu, SyntaxContext(PROFILE, 0, int(parent_signalling)))


# ------------------------------------------------------------------------------------------------
# public API


def _progress(total: int, enabled, desc: str):
    if enabled is None:
        enabled = total >= _PROGRESS_MIN_ELEMENTS
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="param", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def _run_parallel(fn, items: list, sizes: list[int], workers: int, progress, desc: str, *, serial: bool) -> list:
    """Applies ``fn`` to every item on a thread pool (largest first, for balance); ordered results.
    ``sizes``: elements per item (progress and order); ``serial``: too little work for threads."""
    check_int(workers, "workers", lo=1)
    bar = _progress(sum(sizes), progress, desc)
    results: list = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: -sizes[i])
    try:
        if workers == 1 or len(items) <= 1 or serial:
            for i in order:
                results[i] = fn(items[i])
                if bar is not None:
                    bar.update(sizes[i])
        else:
            with ThreadPoolExecutor(max_workers=int(workers)) as pool:
                futures = {i: pool.submit(fn, items[i]) for i in order}
                for i in order:
                    results[i] = futures[i].result()
                    if bar is not None:
                        bar.update(sizes[i])
    finally:
        if bar is not None:
            bar.close()
    return results


def _opt_qps(prepared: list[PreparedTensor], qps: dict[str, int], weights: set[str],
             factors: Mapping[str, str]) -> dict[str, int]:
    """NNCodec's ``opt_qp`` rule: each weight's QP ``qp`` becomes ``round(qp · (1 − share))``, where
    share = its share of all weight elements + 0.1 · (1 − its std / the largest weight std), and a
    share above 0.5 counts as 0.15. A tensor's share grows with its size and shrinks with its spread,
    so large and narrow tensors get coarser steps.

    ``qps``: the weights' QPs before the rule (float ones; integer weights only count in the shares);
    ``factors``: {G name: H name} of low-rank factors, which count as one weight of G's rows × H's
    columns with the std of both, and G takes H's QP. Empty tensors are left out (NNCodec fails on
    them: their std is NaN), and where every weight has std 0 each counts as the widest (NNCodec
    divides by 0). The scalar types (float32 stds of float tensors, float64 of integer ones) and the
    order of operations are NNCodec's, so that halves round as they do there."""
    g_of = {h: g for g, h in factors.items()}
    data = {t.name: t.data for t in prepared}
    names, sizes, stds = [], [], []
    for t in prepared:
        if t.name not in weights or t.name in factors or t.data.size == 0:
            continue
        if t.name in g_of:
            g = data[g_of[t.name]]
            names += [g_of[t.name], t.name]
            sizes += [0, int(np.prod(g.shape[:-1])) * t.data.shape[-1]]
            stds += [0, np.std(np.concatenate((g.ravel(), t.data.ravel())))]
        else:
            names.append(t.name)
            sizes.append(t.data.size)
            stds.append(np.std(t.data))
    if not names:
        return {}
    widest = max(stds)
    rel_std = np.array(stds) / widest if widest > 0 else np.ones(len(stds))
    shares = np.array(sizes) / sum(sizes) + (.1 * (1 - rel_std))
    out = {}
    for name, share in zip(names, shares):
        if name in qps:
            out[name] = int(round(qps[name] * (1 - (0.15 if share > .5 else share))))
    for g, h in factors.items():
        if h in out:
            out[g] = out[h]
    return out


def _qp_plan(prepared: list[PreparedTensor], s: _Settings, qp_overrides, dq_overrides, *,
             block_weights=frozenset(), opt_qp: bool = False, factors: Mapping[str, str] | None = None) -> list[_Plan]:
    """Each tensor's QP plan. Weights (``qp``, full ``bitdepth``) are the tensors with ndim > 1 and the
    ``block_weights``: NNCodec goes by parameter type, and a block's weight has type "weight" at any rank.
    ``opt_qp``: NNCodec's size / spread rule (:func:`_opt_qps`) applied to the weights' QPs, overrides
    included; ``factors``: {G name: H name} of the low-rank factors."""
    from nncjax.quantize.reference import bitdepth_qp
    names = [t.name for t in prepared]
    float_names = {t.name for t in prepared if not t.is_int}
    if s.bitdepth is not None and qp_overrides:
        raise InputError("qp_overrides cannot be combined with bitdepth (bitdepth derives each tensor's QP)")
    if s.bitdepth is not None and opt_qp:
        raise InputError("opt_qp cannot be combined with bitdepth (bitdepth derives each tensor's QP)")
    if s.codebook != "off" and dq_overrides:
        raise InputError("dq_overrides cannot be combined with codebook (codebooks are coded without DQ)")
    overrides = _override_table(qp_overrides, "qp_overrides", s.check_qp, names, float_names)
    dqs = _override_table(dq_overrides, "dq_overrides", check_flag, names, float_names)
    nonweight = s.nonweight_qp if s.nonweight_qp is not None else s.qp - (2 << s.qp_density)
    weights = {t.name for t in prepared if t.data.ndim > 1 or t.name in block_weights}
    plan: list[_Plan] = []
    for t in prepared:
        dq = dqs.get(t.name, s.dq)
        is_weight = t.name in weights
        if t.is_int:
            plan.append(_Plan(None, dq=False))
        elif s.bitdepth is not None:
            qp, lo, hi = bitdepth_qp(t.data, s.bitdepth, qp_density=s.qp_density, is_weight=is_weight)
            plan.append(_Plan(int(qp), (int(lo), int(hi)), dq=dq))
        else:
            plan.append(_Plan(overrides.get(t.name, s.qp if is_weight else nonweight), dq=dq))
    if opt_qp:
        qps = {t.name: p.qp for t, p in zip(prepared, plan) if t.name in weights and p.qp is not None}
        tuned = _opt_qps(prepared, qps, weights, factors or {})
        plan = [replace(p, qp=tuned.get(t.name, p.qp)) for t, p in zip(prepared, plan)]
    return plan


def encode(params, *, qp: int = -32, qp_density: int = 2, nonweight_qp: int | None = -75, dq: bool = True,
           codebook: bool | str = False, bitdepth: int | None = None, row_skipping: bool = True,
           param_opt: bool = True, scan_order: int = 0, qp_overrides: Mapping | None = None,
           lambda_scale: float = 0.0, unary_length: int = 11, workers: int = 2,
           progress: bool | None = None, blocks: Mapping | None = None,
           dq_overrides: Mapping | None = None, low_rank: Mapping | None = None, opt_qp: bool = False,
           pre_signalling: bool = False) -> bytes:
    """Encodes a model (any pytree of arrays) into an NNR bitstream, byte-identical to NNCodec.

    Args:
      params: flat dict ``{name: array}`` (names kept verbatim, in order), nested dicts/lists, Flax
        params, ... of jax or numpy arrays. Nested trees are named by key path joined with "/".
        Dtypes: see ``docs/input-policy.md`` (float -> quantized, int/bool -> lossless int32).
      qp: QP of "weight" tensors (ndim > 1, and ``blocks`` weights of any rank, as NNCodec).
        Step = 2**(qp / 2**qp_density) with a linear mantissa.
      qp_density: 0..7, QP resolution (2**qp_density steps per octave).
      nonweight_qp: QP of the other tensors (ndim <= 1: biases, norms); falsy -> ``qp - 2 << qp_density``.
      dq: dependent (trellis) quantization.
      codebook: False; True / "auto" (NNCodec ``approx_method='codebook'``: a codebook per tensor when
        it is estimated smaller); "always" (NNCodec ``codebook_mode=1``).
      bitdepth: if set, each tensor's QP is derived from its value range and levels are clipped to
        this many bits (NNCodec ``bitdepth``); cannot be combined with ``qp_overrides``.
      row_skipping: signal all-zero rows. param_opt: optimise context initialisation.
      scan_order: 0 raster, 1..4 block scans (8..64) with entry points for parallel decoding.
      qp_overrides: ``{name or regex: qp}`` per-tensor QPs (exact names first, then
        ``re.fullmatch`` patterns in order); a key matching no float tensor raises InputError.
      lambda_scale: rate-distortion trade-off of the quantizer (0: nearest / pure distortion).
      unary_length: number of greater-than flags of the level binarization (NNCodec: 11).
      workers: threads coding tensors in parallel. progress: tqdm bar (None: only for big models).
      blocks: ``{weight name: {role: member name}}`` codes each weight together with its per-row
        members (tensors of shape ``(weight.shape[0],)``) in one NNR_PT_BLOCK unit, written where
        the weight is. Roles: "ls" (local scaling, e.g. ``"<w>_scaling"``), "bi" (bias), and all four
        of "bn_beta", "bn_gamma", "bn_mean", "bn_var" (an unfolded batch norm); cpt = LS 0x02 | BN 0x04
        | BI 0x08. Members keep their own QPs (``nonweight_qp`` unless overridden) and come back from
        :func:`decode` under their names. A weight named in ``low_rank`` may have a block. With
        ``codebook``, as NNCodec: a block in which a member takes a codebook, or the weight takes one
        while the members use DQ, is written as separate units (members first, where the block goes);
        so is a block holding an integer tensor (coded losslessly, NNR_PT_INT), with or without.
      dq_overrides: ``{name or regex: bool}`` per-tensor ``dq`` (resolved like ``qp_overrides``); each
        NNR unit signals its own ``dq_flag``, so e.g. tensors already on a uniform grid (GPTQ) can be
        coded without DQ next to DQ tensors. A block's members follow its weight. Not with ``codebook``.
      low_rank: ``{weight name: NNR dims of the weight}`` codes the weight as low-rank factors
        (NNR_CPT_DC 0x01): ``params`` hold ``"<name>_G"`` of shape ``(r, k)`` and ``"<name>_H"`` of shape
        ``(k, prod(dims) // r)`` (NNCodec's names; e.g. from :func:`nncjax.reduce.low_rank_factors`) and not
        the weight itself. Both go into one NNR_PT_BLOCK (with the weight's ``blocks`` members, if any)
        written where G is, each with its own QP (``qp`` unless overridden), H with G's ``dq``;
        :func:`decode` rebuilds ``(G @ H).reshape(dims)`` under ``name``. With ``codebook``, G and H
        each get their own codebook (H's is the unit's second, "dc" codebook); as in NNCodec the unit
        needs both factors or neither to take one, and no member to (else InputError).
      opt_qp: NNCodec's ``opt_qp``: each weight's QP (``qp``, or its ``qp_overrides`` entry) becomes
        ``round(qp · (1 − share))``, share = its fraction of all weight elements + 0.1 · (1 − its std /
        the largest weight std) (0.15 where that exceeds 0.5): large, narrow tensors get coarser steps.
        Low-rank factors count as their weight, G taking H's QP. Not with ``bitdepth``.
      pre_signalling: set the model parameter set's ``nnr_pre_flag`` (predictive residual encoding; with it
        ``mps_parent_signalling_enabled_flag``), as NNCodec's ``pre_signalling``. NNCodec writes and reads
        only the flag: the tensors are coded, and decoded, as they are.

    Returns:
      the bitstream (``bytes``). Warns ``QPAdjustedWarning`` for every tensor whose values forced a
      coarser QP than requested.

    Example:
      >>> data = encode({"w": np.random.randn(64, 32).astype(np.float32) * 0.05,
      ...                "b": np.zeros(64, np.float32)}, qp=-36)
      >>> sorted(decode(data))
      ['b', 'w']
      >>> bn = encode({"conv.weight": np.ones((8, 3, 3, 3), np.float32), "conv.bias": np.zeros(8, np.float32)},
      ...             blocks={"conv.weight": {"bi": "conv.bias"}})
      >>> sorted(decode(bn))
      ['conv.bias', 'conv.weight']
      >>> lr = encode({"fc_G": np.ones((8, 2), np.float32), "fc_H": np.ones((2, 6), np.float32)},
      ...             low_rank={"fc": (8, 6)})
      >>> {k: v.shape for k, v in decode(lr).items()}
      {'fc': (8, 6)}
    """
    data, _ = _encode(params, qp=qp, qp_density=qp_density, nonweight_qp=nonweight_qp, dq=dq, codebook=codebook,
                      bitdepth=bitdepth, row_skipping=row_skipping, param_opt=param_opt, scan_order=scan_order,
                      qp_overrides=qp_overrides, lambda_scale=lambda_scale, unary_length=unary_length,
                      workers=workers, progress=progress, blocks=blocks, dq_overrides=dq_overrides,
                      low_rank=low_rank, opt_qp=opt_qp, pre_signalling=pre_signalling)
    return data


def _encode(params, *, qp, qp_density, nonweight_qp, dq, codebook, bitdepth, row_skipping, param_opt, scan_order,
            qp_overrides, lambda_scale, unary_length, workers, progress, blocks, dq_overrides, low_rank,
            opt_qp=False, pre_signalling=False, update: Mapping[str, UnitLink] | None = None,
            differential: bool = False) -> tuple[bytes, list[_Coded]]:
    """:func:`encode`'s work; ``update`` (:mod:`nncjax.update`): every tensor's :class:`UnitLink` for an
    update stream (single-tensor units only); ``differential``: the stream is an update
    (parent_signalling_enabled_flag = 1), with or without tensors. Returns the bitstream and every
    tensor's coded unit (those of all-zero differences included, which the stream leaves out)."""
    s = _settings(qp, qp_density, nonweight_qp, dq, codebook, bitdepth, row_skipping, param_opt, scan_order,
                  lambda_scale, unary_length)
    pre = check_flag(pre_signalling, "pre_signalling")
    named = flatten_named(params)
    prepared = [prepare_tensor(n, x) for n, x in named.items()]
    block_of = _block_table(blocks, low_rank, prepared)
    plan = _qp_plan(prepared, s, qp_overrides, dq_overrides,
                    block_weights={w for b in block_of.values() for w in b.weights},
                    opt_qp=check_flag(opt_qp, "opt_qp"),
                    factors={b.factors[0]: b.factors[1] for b in block_of.values() if b.factors})
    position = {t.name: i for i, t in enumerate(prepared)}
    for b in block_of.values():  # one dq_flag per unit: the members (and H) follow the weight (or G)
        if prepared[position[b.anchor]].is_int:
            continue  # an integer weight is coded alone (below), its members as the settings say
        for m in b.coded + b.weights[1:]:
            plan[position[m]] = replace(plan[position[m]], dq=plan[position[b.anchor]].dq)
    in_block = {m for b in block_of.values() for m in b.coded + b.weights[1:]}
    # A unit takes its weight's (G's) place; parameter_id counts the model's tensors, a G, H pair once.
    factors_h = {b.weights[1] for b in block_of.values() if b.factors}
    param_id = {n: k for k, n in enumerate(t.name for t in prepared if t.name not in factors_h)}
    choices: dict[str, dict] = {}  # codebook choices made while deciding splits, reused when coding
    split = _split_blocks(block_of, prepared, plan, position, s, choices)
    jobs = []  # (tensor, its block or None, cpt of the block a separate unit belongs to)
    for t in prepared:
        blk = block_of.get(t.name)
        if blk is not None and blk.anchor in split:  # each unit still signals the block's cpt
            jobs += [(prepared[position[m]], None, blk.cpt) for m in blk.coded]
            jobs.append((t, None, blk.cpt))
        elif t.name not in in_block:
            jobs.append((t, blk, 0))

    def work(job):
        t, blk, cpt = job
        pairs = lambda names: tuple((prepared[position[n]], plan[position[n]]) for n in names)
        weights = pairs(blk.weights) if blk else ((t, plan[position[t.name]]),)
        link = None if update is None else update[t.name]
        c = _code_tensor(weights, param_id[t.name], s, blk, pairs(blk.coded) if blk else (), choices, link)
        c.cpt = c.cpt or cpt
        if link is not None and link.differential and _zero_difference(c):
            return c, b""  # an all-zero difference is left out of the stream (NNCodec); receivers add nothing
        return c, _ndu_bytes(c, s, differential or pre)

    sizes = [max(t.data.size, 1) + (sum(prepared[position[n]].data.size for n in b.coded + b.weights[1:]) if b else 0)
             for t, b, _ in jobs]
    results = _run_parallel(work, jobs, sizes, workers, progress, "encode",
                            serial=sum(sizes) < _PARALLEL_MIN_ELEMENTS)
    for c, _ in results:
        for note in c.notes:
            warnings.warn(note, QPAdjustedWarning, stacklevel=3)
    return _header_units(s, differential, pre) + b"".join(ndu for _, ndu in results), [c for c, _ in results]


# ------------------------------------------------------------------------------------------------
# decoding


@dataclass
class _Stream:
    """A parsed bitstream: the unit list plus the values later units depend on."""

    units: list
    profile: int
    qp_density: int
    base_qp: int
    ndus: list  # (unit, qp_density, quantization_parameter in force for it)
    parent_signalling: bool = False  # the MPS's mps_parent_signalling_enabled_flag
    pre: bool = False  # the MPS's nnr_pre_flag


def _parse(data, limits) -> _Stream:
    from nncjax.kernels.units import (
        CompressedDataUnit,
        DecodeLimits,
        LayerParameterSet,
        ModelParameterSet,
        StartUnit,
        read_units,
    )
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"data must be bytes, got {type(data).__name__}")
    if limits is not None and not isinstance(limits, DecodeLimits):
        raise InputError("limits must be a nncjax.kernels.unit_base.DecodeLimits")
    units = read_units(bytes(data), limits=limits or DecodeLimits())
    if not units:
        raise BitstreamError("unit 0 (NNR_STR): field nnr_unit_size: the bitstream is empty")
    profile, qpd, base_qp, ndus, flags = 1, 0, 0, [], (False, False)
    for u in units:
        if isinstance(u, StartUnit):
            profile = int(u.general_profile_idc)
        elif isinstance(u, (ModelParameterSet, LayerParameterSet)):
            # A later LPS replaces the MPS values as the QP reference of the NDUs after it (NNCodec).
            if u.quantization_method_flags & 3:
                qpd, base_qp = int(u.qp_density), int(u.quantization_parameter)
            if isinstance(u, ModelParameterSet):
                flags = (bool(u.parent_signalling_enabled_flag), bool(u.pre_flag))
        elif isinstance(u, CompressedDataUnit):
            ndus.append((u, qpd, base_qp))
    return _Stream(units, profile, qpd, base_qp, ndus, *flags)


def _reconstruct(levels: np.ndarray, qp: int, qpd: int, cb) -> np.ndarray:
    """Uniform/DQ: float32(step) * float32(k), bit-exact with NNCodec. Codebook: the float64 product
    entry * step (NNCodec's own precision; :func:`decode` rounds it to float32 unless ``like`` asks
    for float64)."""
    from nncjax.quantize.reference import reconstruct, reconstruct_codebook
    if cb is None:
        return reconstruct(levels, qp, qp_density=qpd)
    try:
        return reconstruct_codebook(levels, np.asarray(cb.values, np.int64), cb.zero_offset, qp, qpd)
    except InputError as e:
        raise BitstreamError(f"codebook: {e}") from None


@dataclass
class _Decoded:
    names: list
    arrays: list
    roles: list  # each member's role (:class:`nncjax.kernels.ndu.Member`)
    dims: tuple = ()  # the unit's tensor_dimensions (a DC unit's recomposed weight)
    where: str = ""
    levels: list = field(default_factory=list)  # the integer levels, kept for update streams only


def _decode_levels(dec, u, m, profile: int, side: tuple | None = None) -> np.ndarray:
    """Member ``m``'s levels of NDU ``u`` (after its QP delta) from the CABAC decoder ``dec``; ``side``:
    ``(TCA reference levels or None, HDSP history or None)`` of the tensor, from :func:`nncjax.decode_update`."""
    from nncjax.kernels.units import PayloadType
    is_int = u.payload_type == PayloadType.INT
    # Codebook bounds shape the binarization only in profile 1.
    bounded = m.codebook is not None and profile == 1
    base, hist = side or (None, None)
    # A differential NDU (NNCodec's federated-learning updates) codes the tensor's difference to its parent:
    # decodable as it is, unless TCA or HDSP select contexts from earlier updates, which a stream alone lacks.
    if u.temporal_context_modeling_flag and base is None:
        raise UnsupportedStreamError(f"NDU {u.topology_elem_ids[0]!r}: temporal_context_modeling_flag = 1 (TCA): "
                                     "its contexts follow the previous version's levels; decode the streams in "
                                     "order with nncjax.decode_update")
    try:
        # NNCodec decodes NNR_PT_INT without DQ whatever dq_flag says.
        levels, _ = dec.decode_layer(tuple(m.shape), dq=bool(u.dq_flag) and not is_int,
                                     scan_order=u.scan_order if len(m.shape) > 1 else 0, profile=profile,
                                     codebook_size=len(m.codebook.values) if bounded else 0,
                                     codebook_offset=m.codebook.zero_offset if bounded else 0,
                                     parent_present=bool(u.parent_node_id_present_flag),
                                     base=base if u.temporal_context_modeling_flag else None, hdsp_hist=hist)
    except UnsupportedStreamError as e:  # HDSP without a history
        raise UnsupportedStreamError(f"{e}: decode the streams in order with nncjax.decode_update and one "
                                     "UpdateState") from None
    return levels


def _decode_ndu(job) -> _Decoded:
    """One NDU: ``job`` = (unit, qp_density, base QP, profile, side info of its single tensor or None)."""
    from nncjax.errors import UnsupportedError
    from nncjax.kernels.coder import CabacDecoder
    from nncjax.kernels.unit_base import CPT_DC
    from nncjax.kernels.units import PayloadType
    u, qpd, base_qp, profile, side = job
    members = u.members()
    where = f"NNR_NDU {u.topology_elem_ids[0]!r} (unit {u.span.index if u.span else '?'})"
    if u.payload_type == PayloadType.RAW_FLOAT:
        if u.compressed_parameter_types & CPT_DC:  # a raw W has no factors to carry
            raise UnsupportedError(f"{where}: NNR_PT_RAW_FLOAT with low-rank decomposition (CPT_DC)")
        return _Decoded([m.name for m in members], [np.asarray(u.payload, np.float32)], [m.role for m in members])
    is_int = u.payload_type == PayloadType.INT
    dec = CabacDecoder(u.payload, unary_length=u.cabac_unary_length_minus1 + 1)
    out = _Decoded([], [], [m.role for m in members], tuple(int(d) for d in u.tensor_dimensions), where)
    try:
        for m in members:
            qp = None if is_int else dec.iae_v(6 + qpd) + base_qp
            if m.codebook is not None and u.dq_flag:
                raise UnsupportedError(f"{where}: dq_flag = 1 together with a codebook")
            levels = _decode_levels(dec, u, m, profile, side)
            out.names.append(m.name)
            out.arrays.append(levels if is_int else _reconstruct(levels, qp, qpd, m.codebook))
            if side is not None:
                out.levels.append(levels)
        used = dec.finish()
    except BitstreamError as e:  # its type kept: a LimitError or UnsupportedStreamError stays one
        raise type(e)(f"{where}: nnr_compressed_data_unit_payload: {e}") from None
    if used != len(u.payload):
        raise BitstreamError(f"{where}: nnr_compressed_data_unit_payload has {len(u.payload)} bytes but its "
                             f"arithmetic-coded data ends after {used}")
    return out


def _dc_weight_name(g_name) -> str:
    # NNCodec names the factors "<w>_G" / "<w>_H" and returns the recomposed weight as "<w>".
    return str(g_name).removesuffix("_G")


def _recompose(parts: list[_Decoded]) -> list[_Decoded]:
    """Every low-rank (CPT_DC) weight rebuilt as ``(G @ H).reshape(dims)``: a block's G and H members
    become one "weight" member; a non-block G unit and the H unit right after it become one unit.

    The product accumulates in float64 and is rounded once to float32: deterministic on every
    platform (NNCodec's float32 BLAS product can differ from it in the last bits)."""
    from nncjax.ready import recompose_low_rank
    out: list[_Decoded] = []
    pending: _Decoded | None = None  # a non-block G unit waiting for its H unit
    for p in parts:
        if pending is not None:
            if p.roles != ["dc_h"] or p.dims != pending.dims:
                raise BitstreamError(f"{pending.where}: a low-rank G tensor must be followed by its H tensor "
                                     f"(an NNR_NDU with the same tensor_dimensions)")
            p = _Decoded(pending.names + p.names, pending.arrays + p.arrays, ["dc_g", "dc_h"], p.dims, p.where)
            pending = None
        elif p.roles == ["dc_g"]:
            pending = p
            continue
        if "dc_h" in p.roles and "dc_g" not in p.roles:
            raise BitstreamError(f"{p.where}: a low-rank H tensor without its G tensor before it")
        if "dc_g" in p.roles:
            ig, ih = p.roles.index("dc_g"), p.roles.index("dc_h")
            w = recompose_low_rank(p.arrays[ig], p.arrays[ih], p.dims, p.where)
            keep = [j for j in range(len(p.roles)) if j not in (ig, ih)]
            p = _Decoded([p.names[j] for j in keep] + [_dc_weight_name(p.names[ig])],
                         [p.arrays[j] for j in keep] + [w], [p.roles[j] for j in keep] + ["weight"], p.dims, p.where)
        out.append(p)
    if pending is not None:
        raise BitstreamError(f"{pending.where}: a low-rank G tensor without its H tensor after it")
    return out


def _decode_all(data, limits, workers, progress) -> list[_Decoded]:
    st = _parse(data, limits)
    jobs = [(u, qpd, base_qp, st.profile, None) for u, qpd, base_qp in st.ndus]
    sizes = [max(u.element_count(), 1) for u, _, _ in st.ndus]
    return _run_parallel(_decode_ndu, jobs, sizes, workers, progress, "decode", serial=_small_payload(st.ndus))


def _small_payload(ndus) -> bool:
    """Whether units ``(unit, ...)`` hold too few coded bytes to decode on several threads."""
    return sum(len(u.payload) for u, *_ in ndus) < _PARALLEL_MIN_PAYLOAD_BYTES


def decode(data, like=None, *, raw: bool = False, bn_pairs="auto", eps: float = 1e-5, limits=None,
           workers: int = 2, progress: bool | None = None):
    """Decodes an NNR bitstream into weights ready to use (or, with ``raw=True``, the coded tensors).

    Ready (default, :mod:`nncjax.ready`): a low-rank (NNR_CPT_DC) weight comes back recomposed,
    ``(G @ H).reshape(dims)`` (float64 products rounded once to float32), under its factors' name
    without the ``_G`` suffix; a block unit's weight ``W`` (NNR layout, rows first, shape ``(O, ...)``)
    with local scales ``LS`` ``(O,)`` comes back as ``LS[:, None, ...] * W`` (float32) and LS is
    dropped; other members (BI, unfolded BN β/γ/mean/var) and single tensors come back as coded.
    Streams without LS or DC (every plain NNCodec stream) decode exactly as with ``raw=True``.

    Args:
      data: the bitstream (``bytes``), from :func:`encode` or NNCodec.
      like: optional pytree (e.g. the original params or Flax variables). The result has its
        structure; each leaf gets ``like``'s dtype, shape and array type (bf16, int8, 0-d scalars come
        back as such). Every stream tensor must have a leaf of the same name (key paths joined by "/")
        and every leaf a tensor, else InputError naming it. A block weight named ``.../kernel`` is a
        Flax kernel in NNR layout and goes back to Flax layout (other ``.../kernel`` tensors only where
        their shape fits ``like`` that way alone). A folded block (LS/BI, no BN members) whose layer
        is followed by a BatchNorm of ``like`` that the stream does not carry is written onto that
        BatchNorm: scale = LS, bias = BI, mean 0, unit variance, kernel unscaled (as
        :func:`nncjax.reduce.unfold_batchnorm`), so the model's own ``apply`` computes the coded model.
      raw: return the tensors exactly as coded (block members under their own names, LS not applied,
        low-rank factors G and H not multiplied;
        with ``like``, leaves mapped by name only, extra stream tensors ignored).
      bn_pairs: which layer each folded BatchNorm of ``like`` belongs to: ``"auto"`` (Flax's
        ``Conv_i``/``BatchNorm_i``, otherwise the only folded block with the BatchNorm's row count),
        None, or ``[(layer_path, bn_path), ...]`` module paths inside ``params``.
      eps: the model's BatchNorm epsilon (for the exact unit variance).
      limits: a :class:`nncjax.kernels.unit_base.DecodeLimits` capping declared sizes (default: rank
        16, 2**31 - 1 elements per tensor, 2**32 per stream) -> ``LimitError`` beyond them.
      workers: threads decoding tensors in parallel. progress: tqdm bar (None: only for big models).

    Returns:
      without ``like``: ``dict[str, np.ndarray]`` in bitstream order; float tensors float32 (uniform:
      ``float32(step) * float32(k)``, exactly as NNCodec; codebook: the exact float64 product rounded to
      float32), integer tensors int32. With ``like``: a pytree shaped like it.

    Raises:
      BitstreamError (naming unit and field) for any malformed input; LimitError beyond ``limits``;
      UnsupportedError for valid features nncjax does not decode (DQ with a codebook); InputError
      (naming the tensor) when ``like`` does not fit the stream.

    Example:
      >>> data = encode({"w": np.ones((4, 4), np.float32)})
      >>> decode(data)["w"].tolist()[0]
      [1.0, 1.0, 1.0, 1.0]
      >>> blk = encode({"w": np.ones((2, 3), np.float32), "w_scaling": np.float32([2, 4])},
      ...              blocks={"w": {"ls": "w_scaling"}})
      >>> decode(blk)["w"][:, 0].round(3).tolist(), sorted(decode(blk, raw=True))
      ([2.0, 4.0], ['w', 'w_scaling'])
    """
    raw = check_flag(raw, "raw")
    eps = check_real(eps, "eps", lo=0.0)  # checked on every path, not only where a BatchNorm is unfolded
    parts = _decode_all(data, limits, workers, progress)
    if not raw:
        parts = _recompose(parts)
    flat: dict[str, np.ndarray] = {}
    for part in parts:
        for name, arr in zip(part.names, part.arrays):
            key = name if isinstance(name, str) else str(name)
            if key in flat:
                raise BitstreamError(f"NNR_NDU {key!r}: topology_elem_id occurs twice in the bitstream")
            flat[key] = arr
    if raw:
        return _float32(flat) if like is None else unflatten_like(like, flat, cast_leaf)
    blocks = [b for b in (block_roles([str(n) for n in p.names], p.roles) for p in parts) if b is not None]
    if like is None:
        return _float32(ready_flat(flat, blocks))
    return map_onto(like, flat, blocks, bn_pairs=bn_pairs, eps=eps)


def _float32(flat: dict) -> dict:
    return {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in flat.items()}


# ------------------------------------------------------------------------------------------------
# inspection


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a bitstream as :func:`inspect` reports it."""

    name: str
    shape: tuple
    payload_type: str  # "INT", "FLOAT", "RAW_FLOAT", "BLOCK"
    qp: int | None
    dq: bool
    codebook_size: int
    codebook_offset: int | None
    scan_order: int
    entry_points: int
    coded_bytes: int  # the whole NDU carrying the tensor (shared by the members of a block)
    parameter_id: int | None
    put_node_depth: int = 0  # in update streams (nncjax.update): the unit's depth in its tensor's history
    differential: bool = False  # parent_node_id_present_flag: the tensor is a difference to its parent
    tca: bool = False  # temporal_context_modeling_flag: decoding needs the parent's levels


@dataclass(frozen=True)
class UnitInfo:
    type: str
    offset: int
    size: int


@dataclass(frozen=True)
class StreamInfo:
    """What :func:`inspect` found: the units and every tensor. ``str()`` gives a table."""

    profile: int
    qp_density: int
    total_bytes: int
    units: tuple
    tensors: tuple
    parent_signalling: bool = False  # the MPS's mps_parent_signalling_enabled_flag (update streams, PRE)
    pre: bool = False  # the MPS's nnr_pre_flag (NNCodec's pre_signalling)

    def __str__(self) -> str:
        flags = "".join(f", {f}" for f, on in (("parent signalling", self.parent_signalling), ("PRE", self.pre))
                        if on)
        head = (f"NNR bitstream: {self.total_bytes} bytes, {len(self.units)} units, {len(self.tensors)} tensors, "
                f"profile {self.profile}, qp_density {self.qp_density}{flags}")
        cols = ("name", "shape", "type", "qp", "dq", "codebook", "scan", "bytes")
        rows = [(t.name, "x".join(map(str, t.shape)) or "()", t.payload_type, "" if t.qp is None else str(t.qp),
                 "y" if t.dq else "n", f"{t.codebook_size}@{t.codebook_offset}" if t.codebook_size else "",
                 str(t.scan_order), str(t.coded_bytes)) for t in self.tensors]
        if any(t.put_node_depth or t.differential for t in self.tensors):  # an update stream: its node fields
            cols += ("depth", "update")
            rows = [r + (str(t.put_node_depth), ("diff+tca" if t.tca else "diff") if t.differential else "")
                    for r, t in zip(rows, self.tensors)]
        width = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
        fmt = lambda r: "  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                                  for i, (v, w) in enumerate(zip(r, width)))
        lines = [head, fmt(cols), fmt(["-" * w for w in width])] + [fmt(r) for r in rows]
        units = ", ".join(f"{u.type}@{u.offset}({u.size})" for u in self.units if u.type != "NDU")
        return "\n".join(lines + [f"other units: {units}"])


def _unit_type_name(u) -> str:
    from nncjax.kernels.units import (
        CompressedDataUnit,
        LayerParameterSet,
        ModelParameterSet,
        StartUnit,
        TopologyUnit,
    )
    names = {StartUnit: "STR", ModelParameterSet: "MPS", LayerParameterSet: "LPS", TopologyUnit: "TPL",
             CompressedDataUnit: "NDU"}
    return names.get(type(u), type(u).__name__)


def inspect(data, *, limits=None) -> StreamInfo:
    """Lists the units and tensors of a bitstream without decoding the tensors' levels.

    The stream's profile, qp_density and MPS flags (parent signalling, PRE). Per tensor: name, shape,
    payload type, QP (read from its arithmetic-coded data), DQ flag, codebook size and zero offset,
    scan order, entry-point count and NDU size in bytes; in update streams
    (:func:`nncjax.encode_update`) also its put_node_depth and whether it is a difference (with TCA).

    Example:
      >>> print(inspect(encode({"w": np.ones((4, 4), np.float32)})))  # doctest: +ELLIPSIS
      NNR bitstream: ... bytes, 4 units, 1 tensors, profile 1, qp_density 2
      ...
      >>> from nncjax import UpdateState, encode_update
      >>> state = encode_update({"w": np.ones((4, 4), np.float32)}, UpdateState(), differential=False)[1]
      >>> t = inspect(encode_update({"w": np.full((4, 4), 0.1, np.float32)}, state)[0]).tensors[0]
      >>> t.put_node_depth, t.differential, t.tca
      (2, True, True)
      >>> info = inspect(encode({"w": np.ones((4, 4), np.float32)}, pre_signalling=True))
      >>> info.parent_signalling, info.pre
      (True, True)
    """
    from nncjax.kernels.coder import CabacDecoder
    from nncjax.kernels.unit_base import PayloadType
    st = _parse(data, limits)
    units, tensors = [], []
    for u in st.units:
        span = u.span
        units.append(UnitInfo(_unit_type_name(u), span.offset if span else -1, span.size if span else -1))
    for u, qpd, base_qp in st.ndus:
        members = u.members()
        qps: list = [None] * len(members)
        if u.payload_type in (PayloadType.FLOAT, PayloadType.BLOCK):
            # a block's members are coded one after another, each after its own QP delta: reading the
            # weight's (last) QP means decoding the per-row members before it
            dec = CabacDecoder(u.payload, unary_length=u.cabac_unary_length_minus1 + 1)
            try:
                for j, m in enumerate(members):
                    qps[j] = dec.iae_v(6 + qpd) + base_qp
                    if j < len(members) - 1:
                        _decode_levels(dec, u, m, st.profile)
            except BitstreamError as e:
                raise type(e)(f"NNR_NDU {u.topology_elem_ids[0]!r}: nnr_compressed_data_unit_payload: "
                                     f"{e}") from None
        for j, m in enumerate(members):
            cb = m.codebook
            tensors.append(TensorInfo(
                name=str(m.name), shape=tuple(m.shape), payload_type=PayloadType(u.payload_type).name,
                qp=qps[j], dq=bool(u.dq_flag) and u.payload_type != PayloadType.INT,
                codebook_size=len(cb.values) if cb is not None else 0,
                codebook_offset=cb.zero_offset if cb is not None else None,
                scan_order=u.scan_order if len(m.shape) > 1 else 0,
                entry_points=len(u.entry_points) if u.entry_points is not None else 0,
                coded_bytes=u.span.size if u.span else len(u.payload), parameter_id=u.parameter_id,
                put_node_depth=int(u.put_node_depth), differential=bool(u.parent_node_id_present_flag),
                tca=bool(u.temporal_context_modeling_flag)))
    return StreamInfo(st.profile, st.qp_density, len(data), tuple(units), tuple(tensors), st.parent_signalling,
                      st.pre)
