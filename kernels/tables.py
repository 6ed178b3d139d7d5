"""Constant tables of the DeepCABAC probability estimator (ISO/IEC 15938-17, as NNCodec 2.1.3 uses them).

All tables are read-only numpy arrays with explicit integer widths, ready to be passed into Numba kernels.

* ``RPS``   (256,) uint8   -- LPS sub-range, indexed by ``|S01 >> 7| + (range & 0xE0)``.
* ``CURVE`` (32,)  int16   -- state-update step, indexed by ``16 + ((s * S) >> shift)``.
* ``INIT``  (9, 4) int16   -- per init index: SH0, SH1, S01 start, S0 start.
* ``EST_BITS`` (1024, 2) int32 -- encoder-only estimated cost (2**15 = one bit) of a 0 / 1 bin,
  indexed by ``512 + (S01 >> 3)``; loaded from ``est_bits.txt``.
* ``DQ_NEXT`` (8, 2) int8  -- dependent-quantization state transition by level parity.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["RPS", "CURVE", "INIT", "EST_BITS", "DQ_NEXT", "BYPASS_COST", "INIT_INDEX_PENALTY"]

RPS = np.array(
    [
        128, 112, 97, 84, 74, 65, 57, 50, 45, 39, 34, 30, 27, 23, 20, 18, 15, 14, 12, 11, 10, 9, 7, 7, 5, 5, 4, 4, 3, 3, 2, 2,
        142, 125, 108, 93, 82, 72, 63, 56, 50, 43, 38, 33, 30, 26, 22, 20, 17, 16, 13, 12, 11, 10, 8, 8, 6, 6, 5, 5, 3, 3, 2, 2,
        156, 137, 119, 103, 90, 79, 70, 61, 55, 48, 42, 37, 33, 28, 24, 22, 19, 17, 15, 13, 12, 11, 9, 9, 6, 6, 5, 5, 4, 4, 2, 2,
        171, 150, 130, 112, 99, 87, 76, 67, 60, 52, 46, 40, 36, 31, 27, 24, 21, 19, 16, 15, 13, 12, 10, 10, 7, 7, 6, 6, 4, 4, 3, 3,
        185, 162, 141, 121, 107, 94, 82, 73, 65, 56, 50, 43, 39, 34, 29, 26, 22, 21, 17, 16, 14, 13, 11, 11, 8, 8, 6, 6, 4, 4, 3, 3,
        199, 175, 152, 131, 115, 101, 89, 78, 70, 61, 54, 47, 42, 36, 31, 28, 24, 22, 19, 17, 15, 14, 12, 12, 8, 8, 7, 7, 5, 5, 3, 3,
        213, 187, 163, 140, 123, 108, 95, 84, 75, 65, 58, 50, 45, 39, 33, 30, 26, 24, 20, 18, 16, 15, 13, 13, 9, 9, 7, 7, 5, 5, 3, 3,
        228, 200, 174, 150, 132, 116, 102, 90, 80, 70, 62, 54, 48, 42, 36, 32, 28, 26, 22, 20, 18, 16, 14, 14, 10, 10, 8, 8, 6, 6, 4, 4,
    ],
    dtype=np.uint8,
)

CURVE = np.array(
    [2512, 2288, 2064, 1840, 1616, 1392, 1168, 944, 720, 560, 464, 368, 272, 208, 144, 80,
     64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 0],
    dtype=np.int16,
)

INIT = np.array(
    [
        [1, 4, 0, 0],
        [1, 4, -1310, -41],
        [1, 4, 3039, 95],
        [0, 5, 0, 0],
        [2, 6, 962, 30],
        [2, 6, 3039, 95],
        [2, 6, -673, -21],
        [3, 5, 0, 0],
        [3, 5, 962, 30],
    ],
    dtype=np.int16,
)

DQ_NEXT = np.array([[0, 2], [7, 5], [1, 3], [6, 4], [2, 0], [5, 7], [3, 1], [4, 6]], dtype=np.int8)

#: A bypass bin costs exactly one bit in the 2**15 fixed-point scale of ``EST_BITS``.
BYPASS_COST = 1 << 15
#: Encoder-side penalty (2**15 scale) for choosing a non-zero context init index.
INIT_INDEX_PENALTY = 3 * (1 << 15)

EST_BITS = np.loadtxt(os.path.join(os.path.dirname(__file__), "est_bits.txt"), dtype=np.int32, comments="#")
assert EST_BITS.shape == (1024, 2)

for _t in (RPS, CURVE, INIT, DQ_NEXT, EST_BITS):
    _t.setflags(write=False)
