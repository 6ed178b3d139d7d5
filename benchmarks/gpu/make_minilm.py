"""Rebuilds MiniLM-L6 safetensors on the GPU machine from the bundle's fine NNR stream (see make_bundle.sh)."""
import numpy as np, shutil, pathlib
from safetensors.numpy import save_file
import nncjax
out = pathlib.Path("/tmp/minilm/model"); shutil.copytree(".devdata/model", out, dirs_exist_ok=True)
w = nncjax.decode(open(".devdata/minilm_q64.nnr", "rb").read(), progress=False)
w["embeddings.position_ids"] = np.arange(512, dtype=np.int64)[None]
save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, str(out / "model.safetensors"))
print("minilm rebuilt:", len(w), "tensors")
