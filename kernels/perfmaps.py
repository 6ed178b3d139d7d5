"""Performance-map syntax of MPS and LPS units (nnr-format.md §2.15). Parsed and written; NNCodec
never writes them.

Loop bounds follow NNCodec 2.1.3: a map with ``count`` thresholds carries ``count - 1`` entries (so a
count of 0 is rejected), and the unification map's per-class accuracy loop runs ``class_bitmask``
times (NNCodec's bound; it looks like a bug there, but it is what its reader accepts). Float fields
are kept as ``np.float32`` so their bit patterns survive a round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nncjax.kernels.bits import BitReader, BitWriter

from nncjax.errors import InputError

__all__ = [
    "DecompositionEntry",
    "DecompositionMap",
    "PruningEntry",
    "PruningMap",
    "SparsificationEntry",
    "SparsificationMap",
    "UnificationEntry",
    "UnificationMap",
]

_FLT_BITS = 32


@dataclass
class SparsificationEntry:
    threshold: np.float32
    non_zero_ratio: np.float32
    nn_accuracy: np.float32
    class_bitmask: int
    class_accuracies: tuple = ()  # spm_count_classes (u(8)) float32 values


@dataclass
class SparsificationMap:
    entries: tuple = ()  # spm_count_thresholds - 1 SparsificationEntry


@dataclass
class PruningEntry:
    pruning_ratio: np.float32
    nn_accuracy: np.float32
    class_bitmask: int
    class_accuracies: tuple = ()


@dataclass
class PruningMap:
    entries: tuple = ()  # ppm_count_pruning_ratios - 1 PruningEntry


@dataclass
class UnificationEntry:
    reshaped_tensor_dimensions: tuple  # count_reshaped_tensor_dimension - 1 values, ue(7)
    super_block_dimensions: tuple  # count_super_block_dimension - 1 values, u(8)
    block_dimensions: tuple  # count_block_dimension - 1 values, u(8)
    threshold: np.float32
    nn_accuracy: np.float32
    count_classes: int
    class_bitmask: int
    class_accuracies: tuple  # class_bitmask float32 values (NNCodec's loop bound)


@dataclass
class UnificationMap:
    entries: tuple = ()


@dataclass
class DecompositionEntry:
    mse_threshold: np.float32
    nn_accuracy: np.float32
    nn_reduction_ratio: np.float32
    class_accuracies: tuple = ()  # dpm_count_classes (u(16)) float32 values


@dataclass
class DecompositionMap:
    entries: tuple = ()


def _read_count_minus1(r: BitReader, nbits: int, field: str) -> int:
    count = r.u(nbits, field)
    if count == 0:
        raise r.fail(field, "count 0 is invalid (the map carries count - 1 entries)")
    return count - 1


def _read_floats(r: BitReader, n: int, field: str) -> tuple:
    r.need(_FLT_BITS * n, field)
    return tuple(r.flt(f"{field}[{j}]") for j in range(n))


def _write_count_minus1(w: BitWriter, nbits: int, n: int, field: str) -> None:
    if n + 1 >= (1 << nbits):
        raise InputError(f"{field}: {n} entries do not fit u({nbits}) - 1")
    w.u(nbits, n + 1)


def read_sparsification_map(r: BitReader) -> SparsificationMap:
    entries = []
    for i in range(_read_count_minus1(r, 8, "spm_count_thresholds")):
        thr = r.flt(f"sparsification_threshold[{i}]")
        nzr = r.flt(f"non_zero_ratio[{i}]")
        acc = r.flt(f"spm_nn_accuracy[{i}]")
        ncls = r.u(8, f"spm_count_classes[{i}]")
        mask = r.ue(7, f"spm_class_bitmask[{i}]")
        entries.append(SparsificationEntry(thr, nzr, acc, mask, _read_floats(r, ncls, f"spm_nn_class_accuracy[{i}]")))
    return SparsificationMap(tuple(entries))


def write_sparsification_map(w: BitWriter, m: SparsificationMap) -> None:
    _write_count_minus1(w, 8, len(m.entries), "spm_count_thresholds")
    for e in m.entries:
        w.flt(e.threshold); w.flt(e.non_zero_ratio); w.flt(e.nn_accuracy)
        w.u(8, len(e.class_accuracies))
        w.ue(7, e.class_bitmask)
        for a in e.class_accuracies:
            w.flt(a)


def read_pruning_map(r: BitReader) -> PruningMap:
    entries = []
    for i in range(_read_count_minus1(r, 8, "ppm_count_pruning_ratios")):
        ratio = r.flt(f"pruning_ratio[{i}]")
        acc = r.flt(f"ppm_nn_accuracy[{i}]")
        ncls = r.u(8, f"ppm_count_classes[{i}]")
        mask = r.ue(7, f"ppm_class_bitmask[{i}]")
        entries.append(PruningEntry(ratio, acc, mask, _read_floats(r, ncls, f"ppm_nn_class_accuracy[{i}]")))
    return PruningMap(tuple(entries))


def write_pruning_map(w: BitWriter, m: PruningMap) -> None:
    _write_count_minus1(w, 8, len(m.entries), "ppm_count_pruning_ratios")
    for e in m.entries:
        w.flt(e.pruning_ratio); w.flt(e.nn_accuracy)
        w.u(8, len(e.class_accuracies))
        w.ue(7, e.class_bitmask)
        for a in e.class_accuracies:
            w.flt(a)


def read_unification_map(r: BitReader) -> UnificationMap:
    entries = []
    for i in range(_read_count_minus1(r, 8, "upm_count_thresholds")):
        n = r.ue(1, f"count_reshaped_tensor_dimension[{i}]")
        if n == 0:
            raise r.fail(f"count_reshaped_tensor_dimension[{i}]", "count 0 is invalid (count - 1 values follow)")
        r.need(8 * (n - 1), f"reshaped_tensor_dimensions[{i}]")  # each ue(7) is at least 8 bits
        reshaped = tuple(r.ue(7, f"reshaped_tensor_dimensions[{i}][{j}]") for j in range(n - 1))
        r.byte_alignment()
        n = _read_count_minus1(r, 8, f"count_super_block_dimension[{i}]")
        sb = tuple(r.u(8, f"super_block_dimensions[{i}][{j}]") for j in range(n))
        n = _read_count_minus1(r, 8, f"count_block_dimension[{i}]")
        bd = tuple(r.u(8, f"block_dimensions[{i}][{j}]") for j in range(n))
        thr = r.flt(f"unification_threshold[{i}]")
        acc = r.flt(f"upm_nn_accuracy[{i}]")
        ncls = r.u(8, f"upm_count_classes[{i}]")
        mask = r.ue(7, f"upm_class_bitmask[{i}]")
        entries.append(UnificationEntry(reshaped, sb, bd, thr, acc, ncls, mask,
                                        _read_floats(r, mask, f"upm_nn_class_accuracy[{i}]")))
    return UnificationMap(tuple(entries))


def write_unification_map(w: BitWriter, m: UnificationMap) -> None:
    _write_count_minus1(w, 8, len(m.entries), "upm_count_thresholds")
    for e in m.entries:
        if len(e.class_accuracies) != e.class_bitmask:
            raise InputError("unification map: len(class_accuracies) must equal class_bitmask (NNCodec's loop bound)")
        w.ue(1, len(e.reshaped_tensor_dimensions) + 1)
        for d in e.reshaped_tensor_dimensions:
            w.ue(7, d)
        w.byte_alignment()
        _write_count_minus1(w, 8, len(e.super_block_dimensions), "count_super_block_dimension")
        for d in e.super_block_dimensions:
            w.u(8, d)
        _write_count_minus1(w, 8, len(e.block_dimensions), "count_block_dimension")
        for d in e.block_dimensions:
            w.u(8, d)
        w.flt(e.threshold); w.flt(e.nn_accuracy)
        w.u(8, e.count_classes)
        w.ue(7, e.class_bitmask)
        for a in e.class_accuracies:
            w.flt(a)


def read_decomposition_map(r: BitReader) -> DecompositionMap:
    entries = []
    for i in range(_read_count_minus1(r, 8, "dpm_count_thresholds")):
        mse = r.flt(f"mse_threshold[{i}]")
        acc = r.flt(f"dpm_nn_accuracy[{i}]")
        red = r.flt(f"nn_reduction_ratio[{i}]")
        ncls = r.u(16, f"dpm_count_classes[{i}]")
        entries.append(DecompositionEntry(mse, acc, red, _read_floats(r, ncls, f"dpm_nn_class_accuracy[{i}]")))
    return DecompositionMap(tuple(entries))


def write_decomposition_map(w: BitWriter, m: DecompositionMap) -> None:
    _write_count_minus1(w, 8, len(m.entries), "dpm_count_thresholds")
    for e in m.entries:
        w.flt(e.mse_threshold); w.flt(e.nn_accuracy); w.flt(e.nn_reduction_ratio)
        w.u(16, len(e.class_accuracies))
        for a in e.class_accuracies:
            w.flt(a)
