"""GPU micro-benchmark of the rate model's parts (100 M params as 16 tensors)."""
import time, jax, jax.numpy as jnp, numpy as np
from nncjax.rate import deepcabac as dc
from nncjax.quantize.uniform import quantize_uniform
from nncjax.steps import qp_to_step_jax

def bench(name, f, *a):
    t = time.perf_counter(); jax.block_until_ready(f(*a)); c = time.perf_counter() - t
    ts = []
    for _ in range(5):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    print(f"{name:45s} {1e3*min(ts):9.2f} ms  (compile {c:.1f} s)", flush=True)

n_t, per = 16, 6_250_000
key = jax.random.PRNGKey(0)
ws = [0.05 * jax.random.normal(jax.random.fold_in(key, i), (per // 1024, 1024)) for i in range(n_t)]
step = qp_to_step_jax(-38)
ks = [quantize_uniform(w, step)[0] for w in ws]
ids = [jnp.clip(jnp.abs(k), 0, 25) for k in ks]
ones = jnp.ones((per // 1024 * 1024,), jnp.float32)
bench("read all (sum |w|)", jax.jit(lambda ws: [jnp.sum(jnp.abs(w)) for w in ws]), ws)
bench("quantize_uniform", jax.jit(lambda ws: [quantize_uniform(w, step)[0] for w in ws]), ws)
bench("segment_sum 26 bins", jax.jit(lambda ids: [jax.ops.segment_sum(ones, i.reshape(-1), 26) for i in ids]), ids)
bench("one-hot sum 26 bins", jax.jit(lambda ids: [jnp.sum((i.reshape(-1)[:, None] == jnp.arange(26)).astype(jnp.float32), 0) for i in ids]), ids)
bench("bin_statistics hard", jax.jit(lambda ks: [dc.bin_statistics(k, dq=False) for k in ks]), ks)
bench("bin_statistics hard, no row skip", jax.jit(lambda ks: [dc.bin_statistics(k, dq=False, row_skip=False) for k in ks]), ks)
bench("estimate_bits hard uniform", jax.jit(lambda ws: [dc.estimate_bits(w, -38, dq=False) for w in ws]), ws)
bench("estimate_bits hard DQ", jax.jit(lambda ws: [dc.estimate_bits(w, -38, dq=True) for w in ws]), ws)
bench("bin_statistics training (u)", jax.jit(lambda ks, ws: [dc.bin_statistics(k, dq=False, u=w / step) for k, w in zip(ks, ws)]), ks, ws)
from nncjax.steps import qp_to_step_continuous
qps = [jnp.float32(-38.0)] * n_t
def loss(qps, ws):
    tot = 0.0
    for q, w in zip(qps, ws):
        _, wq = quantize_uniform(w, qp_to_step_continuous(q), "ste")
        tot = tot + dc.estimate_bits(w, q, dq=False, training=True) + 1e6 * jnp.sum((wq - w) ** 2)
    return tot
bench("grad rate+distortion wrt QPs (uniform)", jax.jit(jax.grad(loss)), qps, ws)
