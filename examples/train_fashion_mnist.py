"""Trains the Fashion-MNIST batch-norm CNN of :mod:`nncjax.models.fashion_cnn` once and stores its weights.

Usage: python examples/train_fashion_mnist.py [--epochs 3] [--out nncjax/models/weights/fashion_cnn.msgpack]

AdamW with a cosine learning-rate schedule, batch 128, float32; about 2 minutes per epoch on 2 CPU
cores. Prints the test top-1 after each epoch. The stored file holds the Flax variables
``{"params", "batch_stats"}`` serialised with ``flax.serialization.to_bytes``.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nncjax.models.fashion_cnn import (
    WEIGHTS_PATH,
    evaluate,
    init_variables,
    load_fashion_mnist,
    make_train_step,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=60000, help="use the first N (for a quick check)")
    parser.add_argument("--out", type=pathlib.Path, default=WEIGHTS_PATH)
    args = parser.parse_args()

    images, labels = load_fashion_mnist("train")
    images, labels = images[: args.train_images], labels[: args.train_images]
    steps_per_epoch = len(labels) // args.batch
    schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    variables = init_variables(args.seed)
    opt_state = tx.init(variables["params"])
    train_step = make_train_step(tx)

    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        order = rng.permutation(len(labels))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * args.batch : (s + 1) * args.batch]
            variables, opt_state, loss = train_step(
                variables, opt_state, jnp.asarray(images[idx]), jnp.asarray(labels[idx])
            )
            losses.append(loss)
        top1 = evaluate(variables, "full")["top1"]
        print(
            f"epoch {epoch + 1}: loss {float(np.mean(losses)):.4f}  test top-1 {top1:.4f}  ({time.time() - t0:.0f} s)",
            flush=True,
        )

    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(flax.serialization.to_bytes(variables))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
