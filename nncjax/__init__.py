"""nncjax: differentiable Neural Network Coding (ISO/IEC 15938-17, NNR bitstreams) in JAX.

Pipeline: reduce -> quantize -> rate -> code -> bitstream. The bit-exact DeepCABAC coder and the NNR
syntax live in :mod:`nncjax.kernels` (Numba); everything differentiable lives in JAX modules here.
"""

from nncjax.errors import BitstreamError, InputError, LimitError, NNCError, UnsupportedError, UnsupportedStreamError

__version__ = "0.1.0"

__all__ = ["NNCError", "InputError", "BitstreamError", "LimitError", "UnsupportedError", "UnsupportedStreamError", "__version__"]
