"""DeepCABAC coder speed: nncjax (Numba) against NNCodec 2.1.3's C++ coder, on the same levels, in one run.

Levels: Gaussian weights quantized with DQ by NNCodec's own ``quantLayer`` at qp -38, -32 and -24
(qp_density 2), for (a) a ~10 M-parameter model of ~200 tensors of realistic shapes and (b) one
16 M-parameter tensor. Settings as NNCodec's defaults: N = 11, param_opt on, profile 1, row skipping,
raster scan. Each tensor is its own payload (initCtxModels + encodeLayer + finish; decodeLayer).

Reported: Mlevels/s for both coders and the ratio (CPU time of the calling thread's process, best of
``--repeat``: robust on a shared machine), the payloads' identity, the model coded on 2 threads
(wall time, against NNCodec's single-threaded CPU time), and Numba's compile / first-call time.

    python benchmarks/bench_coder.py [--repeat 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nncjax.kernels.coder import decode_levels, decode_many, encode_levels, encode_many

from tests.oracle.client import Oracle

SETTINGS = {"dq": True, "unary_length": 11}
LAYER = {"scan_order": 0, "profile": 1}


def model_shapes(total: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """ResNet/transformer-like tensor shapes (conv OIHW, linear, biases, norms) adding up to ``total``."""
    shapes: list[tuple[int, ...]] = []
    while sum(int(np.prod(s)) for s in shapes) < total:
        c_in, c_out = (int(rng.choice([16, 32, 48, 64, 96, 128, 192, 256])) for _ in range(2))
        kind = rng.choice(["conv3", "conv1", "linear"], p=[0.5, 0.3, 0.2])
        if kind == "conv3":
            shapes.append((c_out, c_in, 3, 3))
        elif kind == "conv1":
            shapes.append((c_out, c_in, 1, 1))
        else:
            shapes.append((c_out * 2, c_in * 2))
        shapes.append((c_out,))
    return shapes


def best_time(fn, repeat, clock=time.process_time):
    """Least ``clock`` seconds of ``repeat`` calls of ``fn`` (CPU time by default), and its result."""
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        out = fn()
        best = min(best, clock() - t)
    return best, out


def first_call_time(cache_dir: str | None) -> float:
    """Seconds for a fresh interpreter to import the coder and encode + decode a small tensor."""
    code = ("import time; t = time.perf_counter(); import numpy as np\n"
            "from nncjax.kernels.coder import encode_levels, decode_levels\n"
            "x = np.arange(-8, 8, dtype=np.int32).reshape(4, 4)\n"
            "for dq in (False, True):\n"
            "    d = encode_levels(4 * x if dq else x, dq=dq, row_skipping=True)  # even q: DQ state stays 0\n"
            "    decode_levels(d, x.shape, dq=dq)\n"
            "print(time.perf_counter() - t)")
    env = dict(os.environ)
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_set(oracle, name, levels, repeat, parallel):
    n = sum(lv.size for lv in levels)
    theirs = oracle.call("coder", "time_coder", levels, True, n=11, param_opt=True, row_skip=True, repeat=repeat)
    t_enc, ours = best_time(lambda: [encode_levels(lv, row_skipping=True, **SETTINGS, **LAYER) for lv in levels],
                           repeat)
    same = ours == theirs["streams"]
    t_dec, dec = best_time(lambda: [decode_levels(d, lv.shape, **SETTINGS, **LAYER) for d, lv in zip(ours, levels)],
                          repeat)
    ok = all(np.array_equal(a, b) for a, b in zip(dec, levels))
    nbytes = sum(len(d) for d in ours)
    e_n, d_n = n / theirs["encode_s"] / 1e6, n / theirs["decode_s"] / 1e6
    e_o, d_o = n / t_enc / 1e6, n / t_dec / 1e6
    print(f"{name:<28} {n / 1e6:6.2f} M  {nbytes / n:5.3f} B/lv  identical={same and ok}\n"
          f"    encode  nncjax {e_o:6.2f}  NNCodec {e_n:6.2f} Mlevels/s  ratio {e_o / e_n:5.2f}\n"
          f"    decode  nncjax {d_o:6.2f}  NNCodec {d_n:6.2f} Mlevels/s  ratio {d_o / d_n:5.2f}")
    if parallel:
        shapes = [lv.shape for lv in levels]
        w_enc, par = best_time(lambda: encode_many(levels, workers=2, row_skipping=True, **SETTINGS, **LAYER),
                            repeat, time.perf_counter)
        w_dec, _ = best_time(lambda: decode_many(par, shapes, workers=2, **SETTINGS, **LAYER),
                            repeat, time.perf_counter)
        w_enc1, _ = best_time(lambda: encode_many(levels, workers=1, row_skipping=True, **SETTINGS, **LAYER),
                            repeat, time.perf_counter)
        w_dec1, _ = best_time(lambda: decode_many(par, shapes, workers=1, **SETTINGS, **LAYER),
                            repeat, time.perf_counter)
        assert par == ours
        s_enc, s_dec = w_enc1 / w_enc, w_dec1 / w_dec
        print(f"    2 threads (wall): encode {n / w_enc / 1e6:6.2f} Mlevels/s, ratio {theirs['encode_s'] / w_enc:5.2f}; "
              f"decode {n / w_dec / 1e6:6.2f} Mlevels/s, ratio {theirs['decode_s'] / w_dec:5.2f}  "
              f"(wall, vs NNCodec's single-threaded CPU time)\n"
              f"    2 threads vs 1 thread (wall, back to back): encode x{s_enc:4.2f}, decode x{s_dec:4.2f}; "
              f"times the CPU ratio: encode {s_enc * e_o / e_n:5.2f}, decode {s_dec * d_o / d_n:5.2f}")
    return same and ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 M-param model and a 4 M-param tensor")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    model_params, big = (1_000_000, (2048, 2048)) if args.quick else (10_000_000, (4096, 4096))

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as d:
        cold = first_call_time(d)
    warm = first_call_time(None)
    print(f"Numba first call (import + encode + decode, DQ on/off): cold cache {cold:.1f} s, warm cache {warm:.2f} s")

    shapes = model_shapes(model_params, rng)
    weights = [(rng.normal(0, 0.02, s)).astype(np.float32) for s in shapes]
    weights_big = [(rng.normal(0, 0.02, big)).astype(np.float32)]
    oracle = Oracle()
    all_ok = True
    try:
        oracle.call("coder", "time_coder", [np.zeros((4, 4), np.int32)], True)  # warm the worker up
        encode_levels(np.zeros((4, 4), np.int32), **SETTINGS)
        for qp in (-38, -32, -24):
            lv_model = oracle.call("coder", "quantize", weights, [qp] * len(weights), dq=True)
            lv_big = oracle.call("coder", "quantize", weights_big, [qp], dq=True)
            print(f"--- qp {qp} (DQ, Gaussian sigma 0.02)")
            all_ok &= bench_set(oracle, f"model, {len(shapes)} tensors", lv_model, args.repeat, parallel=True)
            all_ok &= bench_set(oracle, f"one tensor {big[0]}x{big[1]}", lv_big, args.repeat, parallel=False)
    finally:
        oracle.close()
    print("all payloads byte-identical and decoded exactly:", all_ok)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
