#!/usr/bin/env bash
# Builds the NNCodec 2.1.3 reference implementation (the test oracle) in its own virtual environment.
# It pins numpy<2 and needs torch, so it cannot share an environment with nncjax.
# Usage: tools/build_oracle.sh [VENV_DIR]   (default: .oracle-venv in the repository root)
# Idempotent: does nothing when the environment already imports nncodec's coder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-${NNCJAX_ORACLE_VENV:-$root/.oracle-venv}}
py="$venv/bin/python"
check() { "$py" -c "import numpy, torch; from nncodec.extensions import deepCABAC; import nncodec.nnc_core" >/dev/null 2>&1; }
if [ -x "$py" ] && check; then
    echo "oracle: ready at $venv"
    exit 0
fi
echo "oracle: building NNCodec 2.1.3 in $venv (2-3 minutes)"
python3 -m venv "$venv"
"$py" -m pip install -q --disable-pip-version-check "numpy<2" pybind11 setuptools wheel tqdm "torch==2.13.0"
"$py" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation "nncodec==2.1.3"
check || { echo "oracle: NNCodec does not import after the build" >&2; exit 1; }
echo "oracle: ready at $venv"
