"""On the device: IOQ vs the sensitivity allocation (``optimize(init="sensitivity", steps=0)``, with
GPTQ for MiniLM; for the batch-norm CNN the BNF + sensitivity + LSA pipeline, with and without
GPTQ), same session, same machine, through
``benchmarks/rd.py``'s own measuring code (no NNCodec: not installed there). Writes
``$OUT/rd_<model>_gpu.csv`` and prints the summaries. ``python benchmarks/gpu/rd_sens.py [model ...]``
(default: both models)."""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path.cwd()))
from benchmarks.rd import fashion_config, minilm_config, run_model, summary

out = pathlib.Path(os.environ.get("OUT", "."))
runs = (("minilm", minilm_config, [2e-3], [5e-4, 7e-4, 8.5e-4, 1e-3], []),
        ("fashion_cnn", fashion_config, [1e-2, 3e-2], [3e-3, 1e-2], [1e-2, 3e-2, 1e-1]))
chosen = sys.argv[1:] or [r[0] for r in runs]
for name, make, lams, sens_lams, sens_bnf_lams in runs:
    if name not in chosen:
        continue
    cfg = make(False, None)
    cfg.lams, cfg.sens_lams, cfg.sens_bnf_lams = lams, sens_lams, sens_bnf_lams
    # the GPTQ variants use the configs' own λ lists (MiniLM: sens-gptq, Fashion-MNIST: sens-bnf-gptq)
    rows = run_model(cfg, None, out / f"rd_{name}_gpu.csv", ("ioq", "sens", "sens-bnf", "sens-gptq", "sens-bnf-gptq"))
    print(summary(rows, name), flush=True)
