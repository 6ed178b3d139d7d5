# Device-side setup: eval data in the Debian paths, nncjax installed, MiniLM rebuilt from a fine NNR stream.
set -e
mkdir -p /usr/share/datasets/fashion-mnist && cp .devdata/fashion/* /usr/share/datasets/fashion-mnist/
tar -C /usr/share -xJf .devdata/wordnet.tar.xz
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps --no-build-isolation -e . | tail -3
mkdir -p /tmp/shim && cp -r .devdata/shim/* /tmp/shim/
export PYTHONPATH=/tmp/shim
python3 .devdata/make_minilm.py  # MiniLM safetensors from the NNR stream
python3 -c "import jax, flax, optax, numba; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'numba', numba.__version__)"
nproc
