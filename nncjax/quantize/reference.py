"""Reference quantizers that make exactly NNCodec 2.1.3's encoder choices, and exact reconstruction.

Everything here is numpy glue around :mod:`nncjax.kernels.trellis`; the arithmetic (float32 products,
float64 trellis costs, rounding rules, tie breaks) follows NNCodec's ``quantLayer`` so that the levels,
and therefore the bitstreams, are identical (nnr-format.md §3).

Pipeline position: ``quantize`` (this module) -> ``rate``/``code`` (:mod:`nncjax.kernels.coder`).

Conventions:

* ``w``: float32 array of any shape (float16 is widened exactly; other dtypes raise
  :class:`~nncjax.InputError`). Tensors are seen as ``H x W`` matrices, ``H = shape[0]``,
  ``W = prod(shape[1:])``, as the coder sees them.
* ``qp``: integer quantization parameter; ``qp_density`` 0..7; step ``Δ = qp_to_step(qp, qp_density)``.
* ``unary_length``: N = ``cabac_unary_length_minus1 + 1``, the number of greater-than flags of the
  coder (NNCodec default 11). NNCodec's rate estimator runs with N - 1 of them; this is reproduced.
* Levels are int32 arrays of ``w``'s shape: integer multiples of Δ (``k``), also for DQ.

Example::

    >>> w = np.array([[0.1, -0.26], [0.0, 1.0]], np.float32)
    >>> levels, qp = quantize_tensor(w, -20, dq=False)  # step 1/32
    >>> levels.tolist(), qp
    ([[3, -8], [0, 32]], -20)
    >>> reconstruct(levels, qp).tolist()
    [[0.09375, -0.25], [0.0, 1.0]]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from nncjax.arguments import check_flag, check_int, check_real
from nncjax.errors import InputError
from nncjax.kernels import trellis
from nncjax.kernels.bits import ue_length
from nncjax.steps import check_qp_density, qp_to_step

__all__ = [
    "quantize_uniform",
    "quantize_dq",
    "safe_qp",
    "quantize_tensor",
    "reconstruct",
    "reconstruct_codebook",
    "CodebookResult",
    "quantize_codebook",
    "codebook_offset_search",
    "codebook_best_egk",
    "codebook_syntax_bits",
    "CodebookChoice",
    "choose_codebook_or_uniform",
    "bitdepth_qp",
    "quantize_bitdepth",
    "nonweight_qp",
    "codebook_qp_offset",
    "scan_positions",
]

_INT32_MAX = 2**31 - 1
# NNCodec's per-weight overflow limits, in steps: the trellis is stricter than plain rounding.
_DQ_LIMIT_HI = 2**31 - 3
_DQ_LIMIT_LO = -(2**31 - 2)
_GUARD_DIVISOR = float(2**31 - 3)


# ----------------------------------------------------------------------------------------------------
# argument checks


def _weights(w) -> np.ndarray:
    a = np.asarray(w)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    if a.dtype != np.float32:
        raise InputError(f"weights must be float32, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise InputError("weights contain NaN or Inf")
    return np.asarray(a, order="C")  # keeps 0-d shapes, unlike ascontiguousarray


def _lambda(lambda_scale) -> float:
    """NNCodec passes lambda_scale as float32; the float32 value is what enters the cost."""
    lam = check_real(lambda_scale, "lambda_scale (finite in float32)", lo=0, hi=float(np.finfo(np.float32).max))
    return float(np.float32(lam))


def _step32(qp: int, qp_density: int) -> np.float32:
    step = np.float32(qp_to_step(qp, qp_density))
    if not np.isfinite(step) or step < np.finfo(np.float32).tiny:
        raise InputError(f"qp {qp} (qp_density {qp_density}) gives a step outside float32's normal range")
    return step


def _matrix(shape) -> tuple[int, int]:
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    h = int(shape[0]) if len(shape) else 1
    return h, (n // h if h else 0)


def scan_positions(shape, scan_order: int = 0) -> np.ndarray:
    """Raster positions in the coder's scan order (nnr-format.md §7.1), as NNCodec's quantizer uses it.

    ``shape``: tensor shape; ``scan_order`` 0 (row-major) or 1..4 (blocks of ``4 << scan_order``).
    Block scans fall back to row-major when the tensor has a single row or column. Returns an (n,) int64
    permutation ``p`` such that element ``i`` of the scan is ``w.ravel()[p[i]]``.

    >>> scan_positions((3, 10), 1)[:10].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]
    """
    scan_order = check_int(scan_order, "scan_order", lo=0, hi=4)
    h, width = _matrix(tuple(shape))
    n = h * width
    if scan_order == 0 or width <= 1 or h <= 1:
        return np.arange(n, dtype=np.int64)
    b = 4 << scan_order
    r, c = np.divmod(np.arange(n, dtype=np.int64), width)
    return np.lexsort((c % b, r % b, c // b, r // b)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# quantizers


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``round`` on a float64 array, exact (no ``x + 0.5`` rounding error)."""
    a = np.abs(x)
    r = np.floor(a)
    r += (a - r) >= 0.5
    return np.copysign(r, x)


def _overflows(w: np.ndarray, step: np.float32, dq: bool, lambda_scale: float) -> bool:
    """NNCodec's per-weight int32 overflow test for one quantizer configuration."""
    if w.size == 0:
        return False
    if not dq and lambda_scale > 0:
        # This quantizer tests a float64 product.
        scaled = _round_half_away(w.astype(np.float64) * (1.0 / np.float64(step)))
        return bool(scaled.max() > _INT32_MAX or scaled.min() < -(2**31))
    lo, hi = (_DQ_LIMIT_LO, _DQ_LIMIT_HI) if dq else (-(2**31), _INT32_MAX)
    flat = w.reshape(-1)
    return not trellis.round_scaled(flat, np.float32(1.0) / step, lo, hi, np.empty(0, np.int32), False)


def _quantize(w, qp, qp_density, dq, lambda_scale, unary_length, scan_order) -> np.ndarray:
    step = _step32(qp, qp_density)
    out = np.zeros(w.shape, dtype=np.int32)
    if w.size == 0:
        return out
    if not dq and lambda_scale == 0:
        trellis.round_scaled(w.reshape(-1), np.float32(1.0) / step, -(2**31), _INT32_MAX, out.reshape(-1), True)
        return out
    pos = scan_positions(w.shape, scan_order)
    flat_w = w.reshape(-1)
    flat_out = out.reshape(-1)
    inv_step = 1.0 / np.float64(step)
    n_gtx = unary_length - 1
    if dq:
        if lambda_scale > 0:
            scale = (1 << 15) / (lambda_scale * 4.0 * (math.log(2.0) / 6.0) * 0.7)
        else:
            scale = 1.0
        trellis.dq_trellis(flat_w, pos, inv_step, scale, lambda_scale > 0, n_gtx, flat_out)
    else:
        scale = (1 << 15) / (lambda_scale * (math.log(2.0) / 6.0))
        trellis.uniform_rate_aware(flat_w, pos, inv_step, scale, n_gtx, flat_out)
    return out


def _common(w, qp, qp_density, lambda_scale, unary_length, scan_order):
    return (_weights(w), check_int(qp, "qp", lo=-(2**15), hi=2**15), check_qp_density(qp_density),
            _lambda(lambda_scale), check_int(unary_length, "unary_length", lo=1, hi=256),
            check_int(scan_order, "scan_order", lo=0, hi=4))


def quantize_uniform(w, qp, *, qp_density=2, lambda_scale=0.0, unary_length=11, scan_order=0) -> np.ndarray:
    """Uniform (no DQ) quantization at exactly ``qp`` -> int32 levels of ``w``'s shape.

    ``lambda_scale == 0``: ``k = round_half_away(float32(float32(1/Δ) * w))``. ``lambda_scale > 0``: per
    weight the cheapest of 0 and ``max(1, R-1)..R`` under distortion + estimated bits, walking the
    weights in scan order. Raises :class:`~nncjax.InputError` if a level would overflow int32 (use
    :func:`quantize_tensor` for NNCodec's automatic QP raise).

    >>> quantize_uniform(np.array([0.5, -0.75], np.float32), -20).tolist()
    [16, -24]
    """
    w, qp, qpd, lam, n, so = _common(w, qp, qp_density, lambda_scale, unary_length, scan_order)
    if _overflows(w, _step32(qp, qpd), False, lam):
        raise InputError(f"levels overflow int32 at qp {qp}; use safe_qp/quantize_tensor")
    return _quantize(w, qp, qpd, False, lam, n, so)


def quantize_dq(w, qp, *, qp_density=2, lambda_scale=0.0, unary_length=11, scan_order=0) -> np.ndarray:
    """Dependent quantization (8-state trellis) at exactly ``qp`` -> int32 reconstruction indices k.

    ``w``'s shape is kept. The trellis runs in the coder's scan order (``scan_order``; row-major for
    1-D tensors and single rows/columns), as NNCodec's quantLayer does; it ignores row skipping.
    ``k`` reconstructs as ``Δ * k``; the coder turns k into coded levels with the DQ state.
    Raises :class:`~nncjax.InputError` on int32 overflow (see :func:`quantize_tensor`).

    >>> quantize_dq(np.array([0.3, 0.3, -0.1, 0.0], np.float32), -20).tolist()
    [10, 10, -3, 0]
    """
    w, qp, qpd, lam, n, so = _common(w, qp, qp_density, lambda_scale, unary_length, scan_order)
    if _overflows(w, _step32(qp, qpd), True, lam):
        raise InputError(f"levels overflow int32 at qp {qp}; use safe_qp/quantize_tensor")
    return _quantize(w, qp, qpd, True, lam, n, so)


def safe_qp(w, qp, *, qp_density=2, dq=True, lambda_scale=0.0) -> int:
    """The QP NNCodec actually uses for ``w``: ``qp`` itself, or, if some level would overflow int32,
    the raised QP of NNCodec's guard ``ceil(float32(floor(log2 m)*K + (m*K / 2**floor(log2 m) - K)))``
    with ``m = max|w| / (2**31 - 3)`` and ``K = 2**qp_density``. Callers should warn when it differs.
    Where that QP still overflows (NNCodec then aborts with "Prevention of integer-overflow failed"),
    the next larger QP that fits is returned.

    >>> safe_qp(np.array([1e9], np.float32), -32, dq=True)
    -4
    """
    return _guarded_qp(_weights(w), check_int(qp, "qp", lo=-(2**15), hi=2**15), check_qp_density(qp_density),
                       check_flag(dq, "dq"), _lambda(lambda_scale))


def _guarded_qp(w: np.ndarray, qp: int, qpd: int, dq: bool, lam: float) -> int:
    """:func:`safe_qp` of checked arguments (no second pass over ``w`` to check it)."""
    if not _overflows(w, _step32(qp, qpd), dq, lam):
        return qp
    k = 1 << qpd
    min_step = float(np.abs(w).max()) / _GUARD_DIVISOR
    base = np.float32(math.floor(math.log2(min_step)) * k)
    new_qp = np.float32(float(base) + ((min_step * k) / 2.0 ** float(base / np.float32(k)) - k))
    raised = int(math.ceil(new_qp))
    # The guard aims at the overflow limit itself, so float32 rounding can leave it one step short;
    # NNCodec then aborts. We go on to the next QPs instead (two octaves always suffice).
    for extra in range(2 * k + 1):
        if not _overflows(w, _step32(raised + extra, qpd), dq, lam):
            return raised + extra
    raise InputError(f"no QP near {raised} keeps the levels inside int32")


def quantize_tensor(w, qp, *, qp_density=2, dq=True, lambda_scale=0.0, unary_length=11,
                    scan_order=0) -> tuple[np.ndarray, int]:
    """Exactly what NNCodec's ``quantLayer`` (with its overflow guard) returns for ``w``.

    Returns ``(levels int32 of w's shape, qp_used)``; ``qp_used != qp`` means the guard raised the QP.

    >>> quantize_tensor(np.array([[0.3, -0.3]], np.float32), -20, dq=True)
    (array([[ 10, -10]], dtype=int32), -20)
    """
    w, qp, qpd, lam, n, so = _common(w, qp, qp_density, lambda_scale, unary_length, scan_order)
    dq = check_flag(dq, "dq")
    used = _guarded_qp(w, qp, qpd, dq, lam)
    return _quantize(w, used, qpd, dq, lam, n, so), used


# ----------------------------------------------------------------------------------------------------
# reconstruction


def reconstruct(levels, qp, *, qp_density=2) -> np.ndarray:
    """Decoder reconstruction ``float32(Δ) * float32(k)`` (uniform and DQ alike) -> float32, same shape.

    Bit-identical to NNCodec's ``dequantLayer``.

    >>> reconstruct(np.array([3, -5], np.int32), -32).tolist()
    [0.01171875, -0.01953125]
    """
    k = np.asarray(levels)
    if not np.issubdtype(k.dtype, np.integer):
        raise InputError(f"levels must be integers, got dtype {k.dtype}")
    step = _step32(check_int(qp, "qp", lo=-(2**15), hi=2**15), check_qp_density(qp_density))
    return step * k.astype(np.float32)


def reconstruct_codebook(levels, codebook, offset, qp, qp_density=2) -> np.ndarray:
    """Codebook reconstruction ``codebook[level + offset] * Δ`` in float64, as NNCodec's decoder does.

    levels: int array (any shape); codebook: (C,) int array; offset: CbZeroOffset. Returns float64 of
    ``levels``' shape. Levels outside the codebook raise :class:`~nncjax.InputError`.

    >>> reconstruct_codebook(np.array([-1, 0, 1]), np.array([-3, 0, 7]), 1, -32).tolist()
    [-0.01171875, 0.0, 0.02734375]
    """
    cb = np.asarray(codebook)
    lv = np.asarray(levels)
    if not (np.issubdtype(cb.dtype, np.integer) and np.issubdtype(lv.dtype, np.integer)) or cb.ndim != 1:
        raise InputError("codebook must be a 1-D integer array and levels integers")
    offset = check_int(offset, "offset", lo=0, hi=max(cb.size - 1, 0))
    idx = lv.astype(np.int64) + offset
    if idx.size and (idx.min() < 0 or idx.max() >= cb.size):
        raise InputError("a level falls outside the codebook")
    values = cb.astype(np.float64) * qp_to_step(check_int(qp, "qp", lo=-(2**15), hi=2**15), qp_density)
    return values[idx]


# ----------------------------------------------------------------------------------------------------
# codebook mode


def codebook_qp_offset(qp_density: int = 2) -> int:
    """QP decrease NNCodec applies in codebook mode when DQ was requested: ``2**qp_density`` (one octave).

    >>> codebook_qp_offset(2)
    4
    """
    return 1 << check_qp_density(qp_density)


def nonweight_qp(qp, *, qp_density=2, nonweight_qp=-75) -> int:
    """QP of a non-weight tensor (ndim <= 1): ``nonweight_qp`` if it is truthy, else ``qp - (2 << qpd)``.

    >>> nonweight_qp(-32), nonweight_qp(-32, nonweight_qp=None), nonweight_qp(-32, nonweight_qp=0)
    (-75, -40, -40)
    """
    qpd = check_qp_density(qp_density)
    if nonweight_qp:
        return check_int(nonweight_qp, "nonweight_qp")
    return check_int(qp, "qp") - (2 << qpd)


def codebook_syntax_bits(codebook, offset: int, egk: int) -> int:
    """Bits of the ``codebook()`` syntax (nnr-format.md §2.11) for a sorted int codebook.

    >>> codebook_syntax_bits(np.array([-2, 0, 3]), 1, 0)
    24
    """
    cb, offset = _codebook_list(codebook, offset)
    egk = check_int(egk, "egk", lo=0, hi=15)
    if not cb:
        raise InputError("an empty codebook has no codebook() syntax")
    size = len(cb)
    bits = 4 + ue_length(2, size)
    centre = offset - (size >> 1)
    bits += ue_length(2, _ie_index(centre)) + ue_length(7, _ie_index(cb[offset]))
    return bits + _delta_bits(cb, offset, egk)


def _codebook_list(codebook, offset) -> tuple[list[int], int]:
    """A codebook as the syntax codes it (1-D, strictly increasing integers; empty for an empty tensor) and
    its offset: out-of-order entries would give negative deltas, whose Exp-Golomb lengths are meaningless."""
    cb = np.asarray(codebook)
    if cb.ndim != 1 or (cb.size and cb.dtype.kind not in "iu") or np.any(np.diff(cb.astype(np.int64)) <= 0):
        raise InputError(f"codebook must be a 1-D strictly increasing integer array, got {codebook!r}")
    return [int(v) for v in cb], check_int(offset, "offset", lo=0, hi=max(cb.size - 1, 0))


def _ie_index(x: int) -> int:
    return (x << 1) - 1 if x > 0 else (-x) << 1


def _delta_bits(cb: list[int], offset: int, egk: int) -> int:
    left = sum(ue_length(egk, cb[j + 1] - cb[j] - 1) for j in range(offset))
    right = sum(ue_length(egk, cb[j] - cb[j - 1] - 1) for j in range(offset + 1, len(cb)))
    return left + right


def codebook_best_egk(codebook, offset: int) -> int:
    """Exp-Golomb order 0..15 with the fewest codebook bits; ties go to the smallest (as NNCodec).

    >>> codebook_best_egk(np.arange(-40, 41, 8), 5)
    3
    """
    cb, offset = _codebook_list(codebook, offset)
    costs = [_delta_bits(cb, offset, e) for e in range(16)]
    return int(np.argmin(costs))


def _encode_len(levels: np.ndarray, **kw) -> int:
    from nncjax.kernels.coder import encode_levels  # the coder is optional for the plain quantizers

    return len(encode_levels(np.ascontiguousarray(levels, dtype=np.int32), **kw))


def codebook_offset_search(indices, codebook_size: int, unary_length: int = 11) -> int:
    """CbZeroOffset as NNCodec picks it: the index ``c`` whose levels ``indices - c`` give the shortest
    test encoding (profile 0, no DQ, row-major, param_opt on, N - 1 greater-than flags as NNCodec's
    call passes ``cabac_unary_length_minus1``); ties to the smallest ``c``.

    indices: int32 codebook indices (any shape) -> int in ``[0, codebook_size)``. Needs
    :func:`nncjax.kernels.coder.encode_levels`.

    >>> codebook_offset_search(np.array([2, 2, 0, 2, 3, 2]), 4)          # index 2 becomes level 0
    2
    """
    idx = np.asarray(indices, dtype=np.int32)
    best, best_len = 0, None
    for c in range(int(codebook_size)):
        n = _encode_len(idx - np.int32(c), dq=False, unary_length=unary_length - 1, param_opt=True,
                        scan_order=0, row_skipping=False, profile=0, codebook_size=0, codebook_offset=0)
        if best_len is None or n < best_len:
            best, best_len = c, n
    return best


def _clip(levels: np.ndarray, clip) -> np.ndarray:
    if clip is None:
        return levels
    lo, hi = clip
    return np.clip(levels, check_int(lo, "clip low"), check_int(hi, "clip high")).astype(np.int32)


class CodebookResult(NamedTuple):
    """Codebook-mode choice: coded ``levels`` (int32, w's shape; codebook index = level + offset),
    ``codebook`` (C,) int32 sorted, ``offset`` (CbZeroOffset), ``egk``, and the ``qp`` used."""

    levels: np.ndarray
    codebook: np.ndarray
    offset: int
    egk: int
    qp: int


def quantize_codebook(w, qp, *, qp_density=2, dq_requested=True, lambda_scale=0.0, unary_length=11,
                      scan_order=0, clip=None) -> CodebookResult:
    """NNCodec's codebook approximation (``codebook_mode`` 1) of one tensor.

    Uniform quantization without DQ at ``qp - codebook_qp_offset(qp_density)`` if DQ was requested
    (else at ``qp``), with the overflow guard; codebook = sorted unique levels; CbZeroOffset by
    :func:`codebook_offset_search`; egk by :func:`codebook_best_egk`. The stream then carries
    ``dq_flag = 0`` and the returned ``qp``. ``clip = (lo, hi)`` (bit-depth mode, from
    :func:`bitdepth_qp`) clips the levels before the codebook is derived, as NNCodec does.

    >>> r = quantize_codebook(np.array([0.1, -0.2, 0.1, 0.7], np.float32), -16, dq_requested=False)
    >>> r.codebook.tolist(), r.offset, r.levels.tolist(), r.egk, r.qp
    ([-3, 2, 11], 0, [1, 0, 1, 2], 1, -16)
    """
    w, qp, qpd, lam, n, so = _common(w, qp, qp_density, lambda_scale, unary_length, scan_order)
    enc_qp = qp - (codebook_qp_offset(qpd) if dq_requested else 0)
    levels, used = quantize_tensor(w, enc_qp, qp_density=qpd, dq=False, lambda_scale=lam,
                                   unary_length=n, scan_order=so)
    levels = _clip(levels, clip)
    codebook, inverse = np.unique(levels, return_inverse=True)
    indices = inverse.reshape(levels.shape).astype(np.int32)
    offset = codebook_offset_search(indices, codebook.size, n)
    egk = codebook_best_egk(codebook, offset)
    coded = np.asarray(indices - np.int32(offset), dtype=np.int32).reshape(levels.shape)
    return CodebookResult(coded, codebook.astype(np.int32), offset, egk, used)


class CodebookChoice(NamedTuple):
    """Outcome of NNCodec's ``codebook_mode = 2`` comparison for one tensor.

    ``use_codebook``; ``codebook`` (the :class:`CodebookResult`); the uniform alternative
    ``uniform_levels`` (int32; DQ k values if ``dq``), ``uniform_qp`` and ``dq``; and the two sizes
    compared: ``uniform_bytes`` and ``codebook_cost`` (see :func:`choose_codebook_or_uniform`)."""

    use_codebook: bool
    codebook: CodebookResult
    uniform_levels: np.ndarray
    uniform_qp: int
    dq: bool
    uniform_bytes: int
    codebook_cost: int


def choose_codebook_or_uniform(w, qp, *, qp_density=2, dq=True, lambda_scale=0.0, unary_length=11,
                               scan_order=0, profile=1, param_opt=True, parent_node_id_present=False,
                               clip=None) -> CodebookChoice:
    """NNCodec's ``codebook_mode = 2``: codebook (as :func:`quantize_codebook`) or plain quantization.

    What NNCodec compares (reproduced as is): ``uniform_bytes`` = byte length of a test encoding of the
    uniform/DQ levels (DQ re-quantized at the original ``qp`` if ``dq``) and ``codebook_cost`` = byte
    length of a test encoding of the codebook levels (dq off, **no** codebook bounds) **plus the
    codebook syntax size in bits** (bytes + bits, NNCodec's unit mix-up). Both test encodings: N - 1
    greater-than flags, the given scan order, profile, param_opt and ``parent_node_id_present``, no
    row skipping, no QP delta. The codebook wins only if strictly smaller. ``clip``: as in
    :func:`quantize_codebook`, applied to both alternatives; with DQ, the clipped uniform trial is
    coded as the reachable indices with the same coded levels (NNCodec's init search sees the raw
    indices, so its trial size may differ slightly in this corner).

    >>> c = choose_codebook_or_uniform(np.array([[0.1, -0.2], [0.1, 0.7]], np.float32), -16, dq=True)
    >>> c.use_codebook, c.uniform_levels.tolist(), c.uniform_qp, c.uniform_bytes, c.codebook_cost
    (False, [[2, -4], [1, 11]], -16, 6, 35)
    """
    w, qp, qpd, lam, n, so = _common(w, qp, qp_density, lambda_scale, unary_length, scan_order)
    dq = check_flag(dq, "dq")
    cb = quantize_codebook(w, qp, qp_density=qpd, dq_requested=dq, lambda_scale=lam, unary_length=n,
                           scan_order=so, clip=clip)
    if dq:
        uni, uni_qp = quantize_tensor(w, qp, qp_density=qpd, dq=True, lambda_scale=lam, unary_length=n,
                                      scan_order=so)
        uni = _clip(uni, clip)
    else:
        uni = (cb.levels + np.int32(cb.offset))
        uni = cb.codebook[uni]
        uni_qp = cb.qp
    common = dict(unary_length=n - 1, param_opt=check_flag(param_opt, "param_opt"), scan_order=so, row_skipping=False,
                  profile=int(profile), codebook_size=0, codebook_offset=0,
                  parent_present=check_flag(parent_node_id_present, "parent_node_id_present"))
    # Clipping can leave DQ indices the state machine cannot produce; NNCodec codes them anyway.
    uni_bytes = _encode_len(uni, dq=dq, strict_dq=False, **common)
    cb_cost = _encode_len(cb.levels, dq=False, **common) + codebook_syntax_bits(cb.codebook, cb.offset, cb.egk)
    return CodebookChoice(cb_cost < uni_bytes, cb, uni.astype(np.int32), uni_qp, dq, uni_bytes, cb_cost)


# ----------------------------------------------------------------------------------------------------
# bit-depth mode (int_quant_bw)


def _percentile_9995(a: np.ndarray) -> float:
    """``np.percentile(a, 99.95)`` of a float32 array as numpy 1.x evaluates it (linear method,
    float32 neighbour difference, float64 result)."""
    s = np.sort(a.ravel())
    n = s.size
    v = (n - 1) * (99.95 / 100)
    if v >= n - 1:
        return float(s[-1])
    lo = int(math.floor(v))
    g = v - lo
    lo_v, hi_v = s[lo], s[lo + 1]
    diff = float(np.float32(hi_v - lo_v))
    if g >= 0.5:
        return float(hi_v) - diff * (1 - g)
    return float(lo_v) + diff * g


def bitdepth_qp(w, bitdepth, *, qp_density=2, is_weight=True) -> tuple[int, int, int]:
    """NNCodec's ``int_quant_bw`` QP and level clipping range for one tensor -> ``(qp, lo, hi)``.

    Bit depth: ``bitdepth`` for weights (or if above 7), else 8. Unsigned range ``[0, 2**b - 1]`` if no
    value is negative, else ``[-2**(b-1), 2**(b-1) - 1]``. ``Δ = percentile(|w|, 99.95) / hi`` (or
    ``max|w| / hi`` if that is 0); ``qp = round_half_even(clip(qp_of(Δ), -2**(5+qpd), 2**(5+qpd) - 1))``
    with NNCodec's real-valued ``qp_of``. An all-zero tensor gets qp 0.

    >>> bitdepth_qp(np.linspace(-1, 1, 101, dtype=np.float32), 8)
    (-28, -128, 127)
    """
    w = _weights(w)
    qpd = check_qp_density(qp_density)
    bits = check_int(bitdepth, "bitdepth", lo=1, hi=31)
    if not (bits > 7 or is_weight):
        bits = 8
    if w.size and not np.any(w < 0):
        lo, hi = 0, 2**bits - 1
    else:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if bits == 1:  # hi = 0: no step maps the tensor onto [-1, 0]
            raise InputError("bitdepth 1 leaves a signed tensor no positive level; use bitdepth >= 2")
    if w.size == 0 or not np.any(w != 0):
        return 0, lo, hi
    a = np.abs(w)
    step = _percentile_9995(a) / hi
    if step == 0:
        step = float(a.max()) / hi
    k = 1 << qpd
    base = float(np.floor(np.log2(step))) * k
    qp = base + ((step * k) / 2.0 ** (base / k) - k)
    limit = 2 ** (5 + qpd)
    qp = min(max(qp, -limit), limit - 1)
    return int(np.round(qp)), lo, hi


def quantize_bitdepth(w, bitdepth, *, qp_density=2, dq=True, is_weight=True, lambda_scale=0.0,
                      unary_length=11, scan_order=0) -> tuple[np.ndarray, int]:
    """``int_quant_bw`` mode: quantize at :func:`bitdepth_qp`'s QP, then clip the levels (k values for
    DQ, which can break the DQ parity exactly as in NNCodec) -> ``(levels int32 of w's shape, qp_used)``.

    >>> w = np.r_[np.linspace(-1, 1, 4001), 10.0].astype(np.float32)   # one outlier
    >>> levels, qp = quantize_bitdepth(w, 4, dq=False)                   # bitdepth_qp: (-11, -8, 7)
    >>> qp, int(levels.min()), int(levels[-1])                           # the outlier's 64 clipped to 7
    (-11, -6, 7)
    """
    qp, lo, hi = bitdepth_qp(w, bitdepth, qp_density=qp_density, is_weight=is_weight)
    levels, used = quantize_tensor(w, qp, qp_density=qp_density, dq=dq, lambda_scale=lambda_scale,
                                   unary_length=unary_length, scan_order=scan_order)
    return _clip(levels, (lo, hi)), used
