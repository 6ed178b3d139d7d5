"""On the device: IOQ vs the sensitivity allocation (``optimize(init="sensitivity", steps=0)``, with
GPTQ for MiniLM; for the batch-norm CNN the BNF + sensitivity + LSA pipeline, with and without
GPTQ), same session, same machine, through
``benchmarks/rd.py``'s own measuring code (no NNCodec: not installed there). Writes
``$OUT/rd_<model>_gpu.csv`` and prints the summaries. ``python benchmarks/gpu/rd_sens.py [model ...]``
(default: both models; MiniLM first, it takes most of the time)."""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path.cwd()))
from benchmarks.rd import fashion_config, minilm_config, run_model, summary

out = pathlib.Path(os.environ.get("OUT", "."))
# (model, config, {method: λ list}): the CPU report's points that matter (benchmarks/results/RD.md),
# sized for one device session: MiniLM's IOQ takes about 100 s a point on an H100, so only the IOQ
# points the CPU comparison does not meet yet (λ = 1e-3, 4e-3) and the fast points that reach them.
runs = (("minilm", minilm_config, {"ioq": [1e-3, 4e-3], "sens": [5e-4, 8.5e-4], "sens-gptq": [7e-4]}),
        ("fashion_cnn", fashion_config, {"ioq": [3e-3, 1e-2, 3e-2], "sens": [2e-3], "sens-bc": [1e-2, 3e-2],
                                         "sens-gptq": [2e-3]}))
LAM_FIELDS = {"ioq": "lams", "sens": "sens_lams", "sens-bnf": "sens_bnf_lams", "sens-gptq": "gptq_lams",
              "sens-bnf-gptq": "bnf_gptq_lams", "sens-bc": "bc_lams"}
args = sys.argv[1:]
only = None
if "--methods" in args:  # e.g. ``minilm --methods sens-gptq``: only these methods (CSV gets a suffix)
    i = args.index("--methods")
    args, only = args[:i], tuple(args[i + 1:])
chosen = args or [r[0] for r in runs]
for name, make, lams in runs:
    if name not in chosen:
        continue
    cfg = make(False, None)
    methods = tuple(m for m in lams if only is None or m in only)
    for method, field in LAM_FIELDS.items():
        setattr(cfg, field, lams.get(method, []) if method in methods else [])
    suffix = "" if only is None else "_" + "_".join(methods)
    rows = run_model(cfg, None, out / f"rd_{name}_gpu{suffix}.csv", methods)
    print(summary(rows, name), flush=True)
