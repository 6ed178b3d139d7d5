"""nncjax.kernels: the bit-exact DeepCABAC coder and NNR syntax, as Numba kernels with thin Python glue."""
