"""Gradient RD optimisation (nncjax.optimize) vs IOQ's greedy QP search (nncjax.ioq) on the Fashion-MNIST CNN.

Both minimise the same objective, ``D + lam * R_bits / n_weights`` with ``D`` the relative output MSE
(logits) on the same calibration images, over the per-tensor QPs of the five weight tensors; both
use DQ, and the fixed tensors (1-D) are coded at QP -75. IOQ evaluates candidates with the codec's
own quantizer and the real DeepCABAC payload size; the gradient method uses the differentiable
models and snaps at the end. Every RD point is then measured for real: ``nncjax.encode`` ->
bytes -> ``nncjax.decode`` -> test top-1 (first 1000 test images) and D on held-out test images.
A global-QP sweep gives the plain uniform baseline.

Both start from nncjax.ioq.ioq_initial_qps. Timings include JIT compilation ("cold") or not ("warm").

Usage: python benchmarks/bench_optimize.py [--lam 3e-3 ...] [--steps 40] [--calib 128]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nncjax import models
from nncjax.codec import decode, encode
from nncjax.ioq import ioq_initial_qps, ioq_search
from nncjax.models.fashion_cnn import load_fashion_mnist
from nncjax.optimize import _codec_reconstruct, optimize
from nncjax.rd_settings import RDSettings, verify
from nncjax.reduce._tree import named_leaves, replace_named


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lam", type=float, nargs="+", default=[3e-3])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128, help="minibatch of the gradient method's steps")
    ap.add_argument("--base-qp", type=int, default=-32)
    args = ap.parse_args()

    m = models.get("fashion_cnn")
    calib = jnp.asarray(load_fashion_mnist("train")[0][: args.calib])
    test_x = jnp.asarray(load_fashion_mnist("test")[0][:1000])
    apply = jax.jit(m.apply)
    # the gradient method cycles over minibatches of the calibration set; IOQ and the final
    # snapping of the gradient method evaluate D on all of it
    batches = [calib[i: i + args.batch] for i in range(0, args.calib, args.batch)]
    ref_c, ref_t = apply(m.params, calib), apply(m.params, test_x)

    def rel_mse(y, ref):
        return jnp.mean((y - ref) ** 2) / jnp.var(ref)

    d_calib = jax.jit(lambda p: rel_mse(m.apply(p, calib), ref_c))

    def measure(p):
        return {"top1": m.eval(p, subset="ci")["top1"], "d_test": float(rel_mse(apply(p, test_x), ref_t))}

    named = named_leaves(m.params)
    weights = [n for n, x in named.items() if np.ndim(x) > 1]
    n_weights = sum(np.size(named[n]) for n in weights)
    # IOQ sees the model with the fixed tensors already quantized, as the codec (and optimize) do
    base = replace_named(m.params, {n: jnp.asarray(_codec_reconstruct(np.asarray(x), -75, 2, True)[0])
                                    for n, x in named.items() if n not in weights})

    def codec_bits(name, w, qp):
        return _codec_reconstruct(np.asarray(w), int(qp), 2, True)[1]

    def codec_quant(w, qp):
        return jnp.asarray(_codec_reconstruct(np.asarray(w), int(qp), 2, True)[0])

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rows = []
    print(f"fashion_cnn: {len(weights)} weight tensors, {n_weights} weights; calibration {args.calib} images; "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    float_metrics = measure(m.params)
    rows.append(("float", 4 * sum(np.size(x) for x in named.values()), float_metrics, 0.0, ""))
    for qp in (-30, -26, -22, -18):
        data = encode(m.params, qp=qp, nonweight_qp=-75, dq=True)
        rows.append((f"uniform qp={qp}", len(data), measure(decode(data, like=m.params)), 0.0, ""))

    for lam in args.lam:
        # IOQ: closed-form start, then greedy per-tensor search on the same objective with the real coder
        t0 = time.perf_counter()
        init = {n: q for n, q in ioq_initial_qps(m.params, args.base_qp).items() if n in weights}
        qps = ioq_search(base, lambda p: float(d_calib(p)), codec_bits, lam / n_weights, init, progress=False,
                         quantize_fn=codec_quant)
        t_ioq = time.perf_counter() - t0
        log(f"IOQ done in {t_ioq:.1f} s")
        ioq_settings = RDSettings(qps, {}, -1, {}, 0.0, args.base_qp, 2, -75, True)
        res = verify(m.params, ioq_settings)
        rows.append((f"IOQ lam={lam:g}", res.nbytes, measure(res.params), t_ioq, str(sorted(qps.values()))))

        # gradient RD: first call includes compilation, second hits the compilation cache
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            rd = optimize(m.params, m.apply, batches, lam=lam, base_qp=args.base_qp, steps=args.steps,
                          init_qps=init, progress=False)
            times.append(time.perf_counter() - t0)
            log(f"optimize done in {times[-1]:.1f} s")
        res = verify(m.params, rd)
        qps = sorted(q for n, q in rd.qp_overrides.items() if n in weights)
        rows.append((f"gradient lam={lam:g} (cold)", res.nbytes, measure(res.params), times[0], str(qps)))
        rows.append((f"gradient lam={lam:g} (warm)", res.nbytes, measure(res.params), times[1], ""))
        rd_ns = optimize(m.params, m.apply, batches, lam=lam, base_qp=args.base_qp, steps=args.steps,
                         init_qps=init, learn_scales=False, progress=False)
        res = verify(m.params, rd_ns)
        qps = sorted(q for n, q in rd_ns.qp_overrides.items() if n in weights)
        rows.append((f"gradient lam={lam:g} no LS", res.nbytes, measure(res.params), float("nan"), str(qps)))

    print(f"{'method':30s} {'bytes':>8s} {'top1':>7s} {'D_test':>10s} {'wall s':>8s}  weight QPs")
    for name, nbytes, met, t, extra in rows:
        print(f"{name:30s} {nbytes:8d} {met['top1']:7.4f} {met['d_test']:10.3e} {t:8.1f}  {extra}")


if __name__ == "__main__":
    main()
