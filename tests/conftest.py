"""Shared fixtures. The ``oracle`` fixture starts one NNCodec worker per test session.

An oracle that cannot be built or started is an error, never a skip: interop tests must run.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.oracle.client import Oracle, OracleError

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def oracle():
    try:
        o = Oracle()
        o.call("ping", "versions")
    except OracleError as e:
        pytest.fail(f"NNCodec oracle unavailable (run tools/build_oracle.sh): {e}", pytrace=False)
    yield o
    o.close()


@pytest.fixture(scope="session")
def digits():
    """``(model, calibration images (128, 64), test_mse)`` of the digits MLP; ``test_mse(params)`` is the
    relative output MSE on the held-out split (the distortion an optimiser was not tuned on)."""
    import jax.numpy as jnp
    import numpy as np

    from nncjax import models
    from nncjax.models.digits_mlp import load_digits_split

    m = models.get("digits_mlp")
    calib = jnp.asarray(load_digits_split("train")[0][:128])
    test = jnp.asarray(load_digits_split("test")[0])
    ref = np.asarray(m.apply(m.params, test))

    def test_mse(p):
        return float(np.mean((np.asarray(m.apply(p, test)) - ref) ** 2) / np.var(ref))

    return m, calib, test_mse


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code():
    """Drops JAX's compiled executables after each test module. Each keeps its machine code in memory
    mappings, and one process running the whole suite exceeded the kernel's limit (vm.max_map_count,
    65,530): XLA then crashed while compiling (SIGSEGV / SIGABRT)."""
    yield
    import jax

    jax.clear_caches()
