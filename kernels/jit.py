"""The decorator of the DeepCABAC coder's Numba kernels.

``kernel`` = ``njit(cache=True, nogil=True, _nrt=False)``. Without Numba's runtime no reference
counting is emitted: passing the context store and the byte buffers into the small per-bin
functions would otherwise cost two atomic operations per array per call, more than the bin itself
(measured: 45 vs 20 ns per decoded bin). The price is that kernels cannot allocate: every array is
created by the Python glue and passed in.

Caching caveat (Numba's, documented): a cached kernel is invalidated only when its own source file
changes, not when a kernel it calls or inlines from another module does. After editing engine.py or
contexts.py, delete ``kernels/__pycache__/{engine,contexts,levels}.*.nb[ic]`` (or touch levels.py).
"""

from numba import njit

kernel = njit(cache=True, nogil=True, _nrt=False)

#: For the few per-bin functions whose call overhead matters (forced inlining; slower to compile).
kernel_inline = njit(cache=True, nogil=True, _nrt=False, inline="always")
