"""nncjax.distortion: the relative output MSE refuses reference outputs it cannot scale by (a constant or
empty leaf has variance 0: its MSE was weighed about 1e12 times, silently)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nncjax.distortion import check_finite_outputs, check_output_scale, output_spread, relative_output_mse
from nncjax.errors import InputError

REF = {"logits": jnp.array([[0.5, 2.0, -1.0], [1.0, 0.0, 3.0]])}


def test_finite_results_are_unchanged():
    y = {"logits": REF["logits"] + 0.1}
    want = jnp.mean((y["logits"] - REF["logits"]) ** 2) / (jnp.var(REF["logits"]) + 1e-12)
    assert float(relative_output_mse(y, REF)) == float(want)
    assert float(jax.jit(relative_output_mse)(y, REF)) == pytest.approx(float(want), rel=1e-6)
    assert float(relative_output_mse(jnp.array([1.0, 3.0]), jnp.array([1.0, 2.0]))) == 2.0


@pytest.mark.parametrize("ref, name", [
    ({**REF, "loss": jnp.float32(0.3)}, "output leaf 'loss' is constant or empty"),  # a scalar output: variance 0
    ({**REF, "mask": jnp.ones((2, 3), bool)}, "output leaf 'mask' is constant or empty"),
    ((REF["logits"], jnp.zeros((2, 0))), "output leaf '1' is constant or empty"),
    (jnp.full((4, 1), 7.0), "the output is constant or empty"),      # one regression output, four equal predictions
])
def test_constant_or_empty_reference_leaves_are_refused_by_name(ref, name):
    y = jax.tree_util.tree_map(lambda r: r + 1, ref)
    with pytest.raises(InputError, match=f"{name} \\(variance 0\\).*distortion=\"kl\""):
        relative_output_mse(y, ref)
    with pytest.raises(InputError, match=f"{name} on batch 1"):
        check_output_scale(output_spread(ref), batch=1)
    with pytest.raises(InputError, match=f"{name} on batch 1"):
        check_finite_outputs([REF, ref], distortion="output")
    # other distortions (KL, a loss) do not divide by the variance: nothing to refuse there
    check_finite_outputs([REF, ref])
    check_finite_outputs([REF, ref], distortion="kl")


def test_jit_path_stays_pure_and_nan_is_still_reported_first():
    ref = jnp.full((4, 1), 7.0)
    # traced references cannot be checked: the value is the documented 1e-12 floor, no host sync, no error
    assert np.isfinite(float(jax.jit(relative_output_mse)(ref + 1, ref)))
    # a concrete reference closed over inside jit is checked while tracing
    with pytest.raises(InputError, match="the output is constant"):
        jax.jit(lambda y: relative_output_mse(y, ref))(ref + 1)
    with pytest.raises(InputError, match="NaN or Inf"):
        check_finite_outputs([jnp.array([jnp.nan, jnp.nan])], distortion="output")
