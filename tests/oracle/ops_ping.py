"""Smoke operations: is the oracle alive and which versions does it run."""

import numpy as np


def versions():
    import nncodec
    import torch
    return {"numpy": np.__version__, "torch": torch.__version__, "nncodec": getattr(nncodec, "__version__", "2.1.3")}


def echo(x):
    return x
