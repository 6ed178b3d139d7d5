"""Quantizers: NNCodec-identical reference quantizers (:mod:`nncjax.quantize.reference`) and JAX quantizers.

JAX quantizers (jit/grad/vmap-able; hard modes equal the codec bit for bit):

* :func:`quantize_uniform` -- uniform (``hard``, ``ste``, ``noise``, ``soft``);
* :func:`quantize_dq`, :func:`dq_trellis`, :func:`dq_states` -- dependent quantization;
* :func:`quantize_codebook`, :func:`codebook_init` -- learnable integer codebooks;
* :func:`quantize_gptq`, :func:`input_moments`, :func:`layer_output_error` -- GPTQ, quantization
  with error feedback across a linear layer's inputs, uniform (coded with ``dq=False``) or on the
  DQ trellis (``dq=True``);
* :func:`quantizer` / :func:`rate_model` -- optax-style ``init``/``apply`` pairs over pytrees.
"""

from nncjax.quantize.codebook import codebook_init, quantize_codebook
from nncjax.quantize.dq import (
           dq_states,
           dq_trellis,
           k_to_q,
           nncodec_lambda,
           q_to_k,
           quantize_dq,
)
from nncjax.quantize.gptq import input_moments, layer_output_error, quantize_gptq
from nncjax.quantize.transform import (
           QuantizerTransform,
           RateTransform,
           match_rules,
           path_name,
           quantizer,
           rate_model,
)
from nncjax.quantize.uniform import quantize_uniform, round_half_away, soft_round

__all__ = [
           "QuantizerTransform",
           "RateTransform",
           "codebook_init",
           "input_moments",
           "dq_states",
           "dq_trellis",
           "k_to_q",
           "layer_output_error",
           "match_rules",
           "nncodec_lambda",
           "path_name",
           "q_to_k",
           "quantize_codebook",
           "quantize_dq",
           "quantize_gptq",
           "quantize_uniform",
           "quantizer",
           "rate_model",
           "round_half_away",
           "soft_round",
]
