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
# (model, config, IOQ λ, sens λ, sens-bnf λ, GPTQ λ): the CPU report's points that matter
runs = (("minilm", minilm_config, [2e-3], [5e-4, 8.5e-4, 1e-3], [], [5.5e-4, 6e-4]),
        ("fashion_cnn", fashion_config, [3e-3, 1e-2, 3e-2], [1e-3, 2e-3, 3e-3, 1e-2, 3e-2], [1e-2, 3e-2],
         [1e-3, 3e-3]))
args = sys.argv[1:]
methods = ("ioq", "sens", "sens-bnf", "sens-gptq", "sens-bnf-gptq", "sens-bc")  # sens-bc: the configs' λ
if "--methods" in args:  # e.g. ``minilm --methods sens-gptq``: only these methods (CSV gets a suffix)
    i = args.index("--methods")
    args, methods = args[:i], tuple(args[i + 1:])
chosen = args or [r[0] for r in runs]
for name, make, lams, sens_lams, sens_bnf_lams, gptq_lams in runs:
    if name not in chosen:
        continue
    cfg = make(False, None)
    cfg.lams, cfg.sens_lams, cfg.sens_bnf_lams = lams, sens_lams, sens_bnf_lams
    cfg.gptq_lams, cfg.bnf_gptq_lams = (gptq_lams, []) if cfg.gptq_lams else ([], gptq_lams)
    suffix = "" if len(methods) == 6 else "_" + "_".join(methods)
    rows = run_model(cfg, None, out / f"rd_{name}_gpu{suffix}.csv", methods)
    print(summary(rows, name), flush=True)
