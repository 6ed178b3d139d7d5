"""Test-side client of the NNCodec oracle: one long-lived worker process per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import wire

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


class OracleError(RuntimeError):
    """The oracle could not be started, or NNCodec raised while serving a request."""


def oracle_python() -> Path:
    venv = Path(os.environ.get("NNCJAX_ORACLE_VENV", ROOT / ".oracle-venv"))
    return venv / "bin" / "python"


def build_oracle() -> Path:
    """Runs tools/build_oracle.sh (idempotent) and returns the oracle interpreter."""
    py = oracle_python()
    proc = subprocess.run(["bash", str(ROOT / "tools" / "build_oracle.sh"), str(py.parent.parent)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise OracleError("building the NNCodec oracle failed:\n" + proc.stdout + proc.stderr)
    return py


class Oracle:
    """A running NNCodec worker. ``oracle.call("coder", "encode_layers", cases)`` runs
    ``tests/oracle/ops_coder.py:encode_layers(cases)`` inside the oracle environment."""

    def __init__(self, python: Path | None = None):
        python = python or build_oracle()
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self._proc = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env)

    def call(self, module: str, fn: str, *args, **kwargs):
        try:
            wire.write_frame(self._proc.stdin, wire.pack({"module": module, "fn": fn, "args": list(args),
                                                          "kwargs": kwargs}))
            res = wire.unpack(wire.read_frame(self._proc.stdout))
        except (EOFError, BrokenPipeError) as e:
            raise OracleError(f"oracle worker died: {e}\n{self.log_tail()}") from e
        if "error" in res:
            raise OracleError(res["error"])
        return res["ok"]

    def log_tail(self, n: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()
