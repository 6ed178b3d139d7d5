"""Rate models: differentiable estimates of what DeepCABAC spends (:mod:`nncjax.rate.deepcabac`)."""

from nncjax.rate.deepcabac import (
                                   BinStats,
                                   bin_statistics,
                                   bits_from_statistics,
                                   estimate_bits,
                                   estimate_bits_levels,
                                   estimate_bits_tree,
                                   trellis_rate_fn,
)

__all__ = ["BinStats", "bin_statistics", "bits_from_statistics", "estimate_bits", "estimate_bits_levels",
           "estimate_bits_tree", "trellis_rate_fn"]
