"""nncjax: differentiable Neural Network Coding (ISO/IEC 15938-17, NNR bitstreams) in JAX.

Pipeline: reduce -> quantize -> rate -> code -> bitstream.

* :func:`encode` / :func:`decode` / :func:`inspect` -- whole models (any pytree) to NNR bitstreams and
  back, byte-identical to NNCodec 2.1.3 under equal settings.
* :func:`encode_update` / :func:`decode_update` -- a base model and a sequence of differential updates
  (federated learning) sharing an :class:`UpdateState`: node ids, left-out zero updates, TCA, HDSP.
* :mod:`nncjax.quantize` -- JAX quantizers (uniform, dependent/trellis, codebook; hard and
  differentiable) and the NNCodec-identical reference quantizers.
* :mod:`nncjax.rate` -- differentiable DeepCABAC rate models (:func:`estimate_bits`).
* :mod:`nncjax.reduce` -- batch-norm folding, local scaling, pruning, low rank, unification.
* :func:`optimize` -- gradient rate-distortion optimisation of per-tensor QPs and local scales;
  :func:`optimize_ioq` -- BN folding + (IOQ or sensitivity allocation) + LSA encoder pipeline;
  :func:`with_error_feedback` -- GPTQ for linear-layer kernels at equal layer-output error, fewer bits
  (and for lookup tables, on :func:`nncjax.sensitivity.row_moments`);
  :func:`with_bias_correction` -- quantized layers' mean output shifts moved into biases;
  :func:`with_fine_tuning` -- levels of uniformly coded weights moved on their grid for the model's output.
* :mod:`nncjax.kernels` -- the bit-exact Numba DeepCABAC coder and NNR syntax.
* :mod:`nncjax.models` -- real models (MiniLM-L6, CREPE tiny, a Fashion-MNIST CNN) with metrics.
"""

from nncjax.errors import (BitstreamError, InputError, LimitError, NNCError, UnsupportedError,
                           UnsupportedStreamError)
from nncjax.codec import QPAdjustedWarning, StreamInfo, TensorInfo, decode, encode, inspect
from nncjax.update import UpdateState, decode_update, encode_update
from nncjax.error_feedback import with_error_feedback
from nncjax.optimize import optimize
from nncjax.rd_settings import RDSettings, verify
from nncjax.pipeline import optimize_ioq
from nncjax.bias_correction import with_bias_correction
from nncjax.fine_tuning import with_fine_tuning
from nncjax.rate import estimate_bits, estimate_bits_tree
from nncjax.steps import qp_to_step, step_to_qp

__version__ = "0.1.0"

__all__ = [
    "NNCError", "InputError", "BitstreamError", "LimitError", "UnsupportedError", "UnsupportedStreamError",
    "encode", "decode", "inspect", "StreamInfo", "TensorInfo", "QPAdjustedWarning",
    "encode_update", "decode_update", "UpdateState",
    "estimate_bits", "estimate_bits_tree", "optimize", "verify", "RDSettings", "optimize_ioq", "with_error_feedback",
    "with_bias_correction", "with_fine_tuning",
    "qp_to_step", "step_to_qp", "__version__",
]
