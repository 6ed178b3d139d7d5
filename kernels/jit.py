"""The decorator of the DeepCABAC coder's Numba kernels.

``kernel`` = ``njit(cache=True, nogil=True, _nrt=False)``. Without Numba's runtime no reference
counting is emitted: passing the context store and the byte buffers into the small per-bin
functions would otherwise cost two atomic operations per array per call, more than the bin itself
(measured: 45 vs 20 ns per decoded bin). The price is that kernels cannot allocate: every array is
created by the Python glue and passed in.

Caching: Numba invalidates a cached kernel only when its own source file changes, not when a kernel
it inlines from another module does; a stale kernel compiled against an older context-store layout
would read and write out of bounds. So on import this module compares a digest of every source file
of the package with the one stored beside the cache and, when they differ (an edit, an upgrade),
drops the package's cached kernels before any is loaded.
"""

import hashlib
import pathlib

from numba import njit


def drop_stale_cache(here: pathlib.Path) -> bool:
    """Deletes the Numba cache files in ``here/__pycache__`` unless the sources of ``here`` (``*.py``,
    ``*.txt``) are those the cache was made from; returns whether it deleted (or started) the cache."""
    digest = hashlib.sha256()
    for src in sorted(here.glob("*.py")) + sorted(here.glob("*.txt")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    cache = here / "__pycache__"
    stamp = cache / "kernels-source.sha256"
    try:
        if stamp.is_file() and stamp.read_text() == digest.hexdigest():
            return False
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only install: Numba then caches elsewhere or not at all
        return False
    return True


drop_stale_cache(pathlib.Path(__file__).resolve().parent)

kernel = njit(cache=True, nogil=True, _nrt=False)

#: For the few per-bin functions whose call overhead matters (forced inlining; slower to compile).
kernel_inline = njit(cache=True, nogil=True, _nrt=False, inline="always")
