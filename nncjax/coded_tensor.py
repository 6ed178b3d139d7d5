"""The codec's view of one tensor: what :func:`nncjax.decode` returns for it and how many bits it costs.

Both come from the codec's own quantizer (:func:`nncjax.quantize.reference.quantize_tensor`, DQ
trellis and overflow guard included) and the real DeepCABAC coder, so encoder-side searches (IOQ,
``nncjax.optimize``) see exactly what a real round trip gives.
"""

from __future__ import annotations

import numpy as np

from nncjax.arguments import check_array_kind, check_int
from nncjax.steps import check_qp_density

__all__ = ["SCALING_SUFFIX", "code_tensor", "codec_reconstruct", "coded_tensor_bits", "levels_bits", "qp_delta_bits"]

SCALING_SUFFIX = "_scaling"  # NNCodec's name of a weight's LS tensor


def _tensor_and_qp(x, qp) -> tuple[np.ndarray, int]:
    """``x`` as float32 and ``qp`` as an int. Refuses what a cast would silently change: complex, bool or
    non-numeric tensors, and float or bool QPs (``int(-20.5)`` would code at -20)."""
    a = np.asarray(check_array_kind(x, "iuf", "x must be a real numeric array"))
    return a.astype(np.float32, copy=False), check_int(qp, "qp")


def codec_reconstruct(x: np.ndarray, qp: int, *, qp_density: int = 2, dq: bool = True) -> np.ndarray:
    """What :func:`nncjax.decode` returns for tensor ``x`` coded at ``qp``: float32, shape of ``x``.

    Uses the codec's quantizer (:func:`nncjax.quantize.reference.quantize_tensor`, DQ trellis included,
    overflow guard included), so the result is bit-identical to a real round trip.

    >>> codec_reconstruct(np.array([0.3, -0.3], np.float32), -20).tolist()
    [0.3125, -0.3125]
    """
    from nncjax.quantize.reference import quantize_tensor, reconstruct

    x, qp = _tensor_and_qp(x, qp)
    levels, used = quantize_tensor(x, qp, qp_density=qp_density, dq=dq)
    return reconstruct(levels, used, qp_density=qp_density).reshape(x.shape)


def coded_tensor_bits(x: np.ndarray, qp: int, *, qp_density: int = 2, dq: bool = True) -> int:
    """DeepCABAC payload bits of tensor ``x`` at ``qp`` (real coder, row skipping; unit headers excluded).

    >>> coded_tensor_bits(np.zeros((4, 4), np.float32), -32) < 64
    True
    """
    return code_tensor(x, qp, qp_density=qp_density, dq=dq)[1]


def code_tensor(x: np.ndarray, qp: int, *, qp_density: int = 2, dq: bool = True) -> tuple[np.ndarray, int]:
    """``(codec_reconstruct(x, qp), coded_tensor_bits(x, qp))`` with one quantization of ``x``.

    >>> x_hat, bits = code_tensor(np.array([[0.3, -0.3]], np.float32), -20)
    >>> x_hat.tolist(), bits > 0
    ([[0.3125, -0.3125]], True)
    """
    from nncjax.quantize.reference import quantize_tensor, reconstruct

    x, qp = _tensor_and_qp(x, qp)
    levels, used = quantize_tensor(x, qp, qp_density=qp_density, dq=dq)
    return reconstruct(levels, used, qp_density=qp_density).reshape(x.shape), levels_bits(levels, dq=dq)


def levels_bits(levels: np.ndarray, *, dq: bool = True) -> int:
    """DeepCABAC payload bits of integer ``levels`` (any shape; real coder, row skipping, as
    :func:`code_tensor` counts them).

    >>> levels_bits(np.zeros((4, 4), np.int32)) < 64
    True
    """
    from nncjax.kernels.coder import encode_levels

    # no int32 cast here: the coder refuses non-integer and out-of-range levels, a cast would wrap them
    return 8 * len(encode_levels(levels, dq=dq, row_skipping=True, profile=1))


def qp_delta_bits(qp_density: int) -> float:
    """Bits a tensor's QP delta adds to its unit in NNCodec's streams (an estimate: 6 plus the
    ``qp_density`` bits), the per-tensor overhead the optimisers add to :func:`code_tensor`'s payload.

    >>> qp_delta_bits(2)
    8.0
    """
    return 6.0 + check_qp_density(qp_density)
