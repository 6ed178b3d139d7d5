"""Quantizers: NNCodec-identical reference quantizers (:mod:`nncjax.quantize.reference`) and JAX quantizers."""
