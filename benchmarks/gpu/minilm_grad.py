"""MiniLM gradient RD on the device: wall time split into first steps (compile) and the rest."""
import sys, time, pathlib
sys.path.insert(0, str(pathlib.Path.cwd()))
import jax
from benchmarks.rd import minilm_config
from nncjax import models
from nncjax.optimize import optimize
from nncjax.rd_settings import verify
cfg = minilm_config(False, None)
m = models.get("minilm")
for steps in (2, 60):
    t = time.perf_counter()
    rd = optimize(m.params, m.apply, cfg.tune, lam=1e-3, base_qp=cfg.base_qp, steps=steps, progress=True)
    print(f"optimize steps={steps}: {time.perf_counter() - t:.1f} s", flush=True)
t = time.perf_counter(); v = verify(m.params, rd); print(f"verify {time.perf_counter() - t:.1f} s, bytes {v.nbytes}")
ev = m.eval(v.params, subset="full"); print({k: ev[k] for k in ("mrr", "mean_cosine")})
