"""Prints each model's metrics with its shipped weights and the time taken.

Usage: python -m nncjax.models [--subset full|ci|N] [NAME ...]   (default: all models, full task)
"""

from __future__ import annotations

import argparse
import time

from nncjax.errors import InputError
from nncjax.models import get, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(names()), help=f"any of {', '.join(names())}")
    parser.add_argument("--subset", default="full", help="full, ci, or a number of items")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in names()]
    if unknown:  # before any model is loaded and evaluated
        parser.error(f"unknown model {', '.join(unknown)}; known: {', '.join(names())}")
    subset = int(args.subset) if args.subset.isdecimal() else args.subset  # isdigit() passed '²' to int()
    for name in args.names:
        t0 = time.perf_counter()
        model = get(name)
        t1 = time.perf_counter()
        try:
            metrics = model.eval(subset=subset)
        except InputError as e:  # a bad --subset: a usage error, not a traceback
            parser.error(str(e))
        t2 = time.perf_counter()
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{name:12s} {model.num_params:>10,d} params  load {t1 - t0:5.1f} s  eval {t2 - t1:5.1f} s  {shown}")


if __name__ == "__main__":
    main()
