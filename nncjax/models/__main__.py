"""Prints each model's metrics with its shipped weights and the time taken.

Usage: python -m nncjax.models [--subset full|ci|N] [NAME ...]   (default: all models, full task)
"""

from __future__ import annotations

import argparse
import time

from nncjax.models import get, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(names()), help=f"any of {', '.join(names())}")
    parser.add_argument("--subset", default="full", help="full, ci, or a number of items")
    args = parser.parse_args()
    subset = int(args.subset) if args.subset.isdigit() else args.subset
    for name in args.names:
        t0 = time.perf_counter()
        model = get(name)
        t1 = time.perf_counter()
        metrics = model.eval(subset=subset)
        t2 = time.perf_counter()
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{name:12s} {model.num_params:>10,d} params  load {t1 - t0:5.1f} s  eval {t2 - t1:5.1f} s  {shown}")


if __name__ == "__main__":
    main()
