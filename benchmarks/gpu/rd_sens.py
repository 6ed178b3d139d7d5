"""On the device: IOQ vs the sensitivity allocation (``optimize(init="sensitivity", steps=0)``), same
session, same machine, through ``benchmarks/rd.py``'s own measuring code (no NNCodec: not installed
there). Writes ``$OUT/rd_<model>_gpu.csv`` and prints the summaries."""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path.cwd()))
from benchmarks.rd import fashion_config, minilm_config, run_model, summary

out = pathlib.Path(os.environ.get("OUT", "."))
runs = (("minilm", minilm_config, [2e-3], [5e-4, 7e-4, 8.5e-4, 1e-3]),
        ("fashion_cnn", fashion_config, [1e-2, 3e-2], [3e-3, 1e-2]))
for name, make, lams, sens_lams in runs:
    cfg = make(False, None)
    cfg.lams, cfg.sens_lams = lams, sens_lams
    rows = run_model(cfg, None, out / f"rd_{name}_gpu.csv", ("ioq", "sens"))
    print(summary(rows, name), flush=True)
