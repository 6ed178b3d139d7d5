"""Federated-learning update streams on a real model: bytes per round with and without TCA / HDSP, the
receiver's model quality, and encode/decode time against NNCodec 2.1.3 on the same updates (same
bytes, asserted).

A client starts from the shipped Fashion-MNIST CNN (the base model, coded once) and runs ``--rounds``
rounds of local training (``--steps`` Adam steps on its own shard of the training images). Each round
it sends the difference to the model the receiver has, top-k sparsified (``--sparsity``: the share of
each weight tensor's smallest differences dropped) with error accumulation (what was dropped or lost
in quantization is added to the next round's difference), as NNCodec's federated-learning client
does. NNCodec codes the same differences with ``nnc.compress(approx_param_base=..., update_base_param
=True, compress_differences=True, tca=..., hdsp_tool=...)`` in its own environment (the test oracle);
its times are measured there around ``compress`` / ``decompress``.

Times are the fastest of ``--repeat`` runs of each stream's encode and decode (the update calls are pure:
every run gives the same result), on both sides.

Usage: ``python benchmarks/bench_update.py [--rounds 5] [--steps 20] [--sparsity 0.9] [--qp -34] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks.bench_model import timed  # noqa: E402
from nncjax import UpdateState, decode_update, encode_update  # noqa: E402
from nncjax.models import fashion_cnn  # noqa: E402
from nncjax.pytree_names import flatten_named, unflatten_like  # noqa: E402
from tests.oracle.client import Oracle  # noqa: E402

SETTINGS = {"tca+hdsp": (True, True), "tca": (True, False), "plain": (False, False)}


def sparsify(delta: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """Keeps the largest (1 - sparsity) share of each weight tensor's entries (ndim > 1); others whole."""
    out = {}
    for name, d in delta.items():
        if d.ndim > 1 and sparsity > 0 and d.size > 1:
            cut = np.quantile(np.abs(d), sparsity)
            d = np.where(np.abs(d) > cut, d, 0).astype(d.dtype)
        out[name] = d
    return out


def client_updates(rounds: int, steps: int, sparsity: float, seed: int = 0):
    """The base model (flat) and, per round, the client's new model (flat) and its training shard's size."""
    model = fashion_cnn.load()
    x, y = fashion_cnn.load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    shard = rng.permutation(len(x))[:steps * 64 * rounds]
    tx = optax.adam(1e-4)
    step = fashion_cnn.make_train_step(tx)
    variables = model.params
    opt_state = tx.init(variables["params"])
    models = []
    for r in range(rounds):
        for s in range(steps):
            idx = shard[(r * steps + s) * 64:(r * steps + s + 1) * 64]
            variables, opt_state, _ = step(variables, opt_state, x[idx], y[idx])
        models.append({k: np.asarray(v) for k, v in flatten_named(jax.device_get(variables)).items()})
    base = {k: np.asarray(v) for k, v in flatten_named(model.params).items()}
    return model, base, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--qp", type=int, default=-34, help="QP of the update's weights (biases etc.: -75)")
    ap.add_argument("--base-qp", type=int, default=-38)
    ap.add_argument("--repeat", type=int, default=3, help="time each stream's encode and decode as the best of N")
    args = ap.parse_args()

    model, base, client = client_updates(args.rounds, args.steps, args.sparsity)
    as_variables = lambda flat: unflatten_like(model.params, flat, lambda n, a, ref: a)  # noqa: E731
    client_top1 = [fashion_cnn.evaluate(as_variables(m))["top1"] for m in client]
    kw = dict(qp=args.qp, nonweight_qp=-75, dq=True, row_skipping=True)
    warm = encode_update(base, UpdateState(), differential=False, qp=args.base_qp, nonweight_qp=-75)
    for tca, hdsp in SETTINGS.values():  # compile the kernels of every path before timing
        decode_update(encode_update(sparsify({k: client[0][k] - base[k] for k in base}, args.sparsity), warm[1],
                                    tca=tca, hdsp=hdsp, **kw)[0], decode_update(warm[0], UpdateState())[1])
    nncodec_kw = dict(qp=args.qp, nonweight_qp=-75, use_dq=True, row_skipping=True)
    oracle = Oracle()
    print(f"Fashion-MNIST CNN, {sum(v.size for v in base.values()):,} parameters; {args.rounds} rounds of "
          f"{args.steps} Adam steps; sparsity {args.sparsity}; update qp {args.qp}, base qp {args.base_qp}")
    print(f"{'setting':<10} {'round':>5} {'bytes':>8} {'top-1 receiver':>15} {'client':>7} {'enc ms':>8} "
          f"{'dec ms':>8} {'NNCodec enc ms':>15} {'dec ms':>8} {'enc ×':>6} {'dec ×':>6}")
    for label, (tca, hdsp) in SETTINGS.items():
        sender, receiver = UpdateState(), UpdateState()
        seconds, (data, sender) = timed(lambda: encode_update(
            base, sender, differential=False, qp=args.base_qp, nonweight_qp=-75), args.repeat)
        enc_times, dec_times, streams = [seconds], [], [data]
        seconds, (got, receiver) = timed(lambda: decode_update(data, receiver), args.repeat)
        dec_times.append(seconds)
        held = dict(got)  # the receiver's model (float32; the step counter is int32)
        residual = {k: np.zeros_like(v) for k, v in base.items()}
        deltas, accuracy = [], []
        for new in client:
            want = {k: (new[k] - held[k]).astype(base[k].dtype) + residual[k] for k in base}
            delta = sparsify(want, args.sparsity)
            deltas.append(delta)
            seconds, (data, sender) = timed(lambda: encode_update(delta, sender, tca=tca, hdsp=hdsp, **kw),
                                            args.repeat)
            enc_times.append(seconds)
            seconds, (got, receiver) = timed(lambda: decode_update(data, receiver), args.repeat)
            dec_times.append(seconds)
            streams.append(data)
            residual = {k: want[k] - got[k].astype(want[k].dtype) for k in base}
            held = {k: (held[k] + got[k]).astype(held[k].dtype) for k in base}
            accuracy.append(fashion_cnn.evaluate(as_variables(held))["top1"])
        assert sender == receiver
        ref = oracle.call("update", "sequence", [{
            "models": [base] + deltas, "kwargs": dict(nncodec_kw, tca=tca), "base_kwargs": {"qp": args.base_qp},
            "hdsp": hdsp, "decode": True, "timed": args.repeat}])[0]
        if "error" in ref:
            raise SystemExit(ref["error"])
        assert ref["streams"] == streams, f"{label}: bytes differ from NNCodec's"
        for r, data in enumerate(streams):
            top1 = f"{accuracy[r - 1]:>15.4f} {client_top1[r - 1]:>7.4f}" if r else " " * 23
            enc, dec = enc_times[r] * 1e3, dec_times[r] * 1e3
            nenc, ndec = ref["encode_s"][r] * 1e3, ref["decode_s"][r] * 1e3
            print(f"{label:<10} {r if r else 'base':>5} {len(data):>8,} {top1} {enc:>8.1f} {dec:>8.1f} "
                  f"{nenc:>15.1f} {ndec:>8.1f} {nenc / enc:>6.1f} {ndec / dec:>6.1f}")
        print(f"{label:<10} {'all':>5} {sum(len(d) for d in streams[1:]):>8,} bytes in the updates")


if __name__ == "__main__":
    main()
