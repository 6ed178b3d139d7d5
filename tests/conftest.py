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
