"""Runs a test script in a subprocess with several CPU host devices (``XLA_FLAGS`` must be set before jax
starts, so it cannot be set inside the test process)."""

import json
import os
import pathlib
import subprocess
import sys


def run_on_host_devices(script: str, devices: int = 8, timeout: int = 600) -> dict:
    """Runs ``tests/<script>`` on ``devices`` host devices and returns the JSON of its last output line;
    fails the test (assert) with the script's stderr if it exits non-zero."""
    path = pathlib.Path(__file__).with_name(script)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
