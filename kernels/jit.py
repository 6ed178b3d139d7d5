"""The decorator of the DeepCABAC coder's Numba kernels.

``kernel`` = ``njit(cache=True, nogil=True, _nrt=False)``. Without Numba's runtime no reference
counting is emitted: passing the context store and the byte buffers into the small per-bin
functions would otherwise cost two atomic operations per array per call, more than the bin itself
(measured: 45 vs 20 ns per decoded bin). The price is that kernels cannot allocate: every array is
created by the Python glue and passed in.
"""

from numba import njit

kernel = njit(cache=True, nogil=True, _nrt=False)

#: For the few per-bin functions whose call overhead matters (forced inlining; slower to compile).
kernel_inline = njit(cache=True, nogil=True, _nrt=False, inline="always")
