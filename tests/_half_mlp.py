"""A two-layer MLP with half-precision parameters (bfloat16 by default, computing in float32), shared
by the GPTQ and fine-tuning tests of grid values that the parameters' dtype cannot hold."""

import flax.linen as nn
import jax.numpy as jnp


class HalfMLP(nn.Module):
    dtype: object = jnp.bfloat16

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64, param_dtype=self.dtype, dtype=jnp.float32, name="h")(x))
        return nn.Dense(8, param_dtype=self.dtype, dtype=jnp.float32, name="out")(h)
