"""Where MiniLM-L6's sens-gptq time goes (``benchmarks/rd.py``'s settings, λ = 6e-4): the vocabulary
preparation, the sensitivity allocation, the Dense input moments, and GPTQ's substitution (uniform, and
``dq="auto"``: uniform or on the DQ trellis, whichever codes smaller), twice (the first pass compiles).
``python benchmarks/gpu/gptq_parts.py``"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path.cwd()))
from benchmarks.rd import calib_moments, minilm_config, models
from nncjax.error_feedback import with_error_feedback
from nncjax.optimize import optimize

cfg = minilm_config(False, None)
m = models.get("minilm")
fine = {"qp_density": 3, "base_qp": 2 * cfg.base_qp, "nonweight_qp": -150, "scale_qp": -48}
for rep in range(2):
    wall = {}
    t = time.perf_counter()
    params, extra = cfg.lookup(m.params)
    wall["lookup"] = time.perf_counter() - t
    t = time.perf_counter()
    rd = optimize(params, m.apply, cfg.tune, lam=6e-4, progress=False, init="sensitivity", steps=0, **fine, **extra)
    wall["optimize"] = time.perf_counter() - t
    t = time.perf_counter()
    moments = calib_moments(m, cfg)
    wall["moments"] = time.perf_counter() - t
    estimated = {}
    for dq in (False, "auto"):
        t = time.perf_counter()
        _, rd_g = with_error_feedback(params, rd, **moments, dq=dq, progress=False)
        wall[f"gptq dq={dq}"] = time.perf_counter() - t
        estimated[dq] = rd_g.estimated_bits / 8
    print(f"pass {rep}: " + ", ".join(f"{k} {v:.2f} s" for k, v in wall.items()) + "; estimated bytes " +
          ", ".join(f"dq={k}: {v:.0f}" for k, v in estimated.items()), flush=True)
