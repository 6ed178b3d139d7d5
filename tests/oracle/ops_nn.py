"""Whole-model operations through NNCodec's public wrapper ``nncodec.nn``."""

import tempfile

import numpy as np


def encode(model, args):
    """``nncodec.nn.encode(model, args)`` with results in a throwaway folder. Returns bytes."""
    from nncodec import nn
    with tempfile.TemporaryDirectory() as d:
        bs = nn.encode({k: np.asarray(v) for k, v in model.items()}, args=dict(args, results=d))
    return bytes(bs)


def decode(data):
    """``nncodec.nn.decode``: returns ``(names in order, arrays)``."""
    from nncodec import nn
    out = nn.decode(bytearray(data))
    return {"names": list(out.keys()), "arrays": [np.asarray(v) for v in out.values()]}


def encode_many(models, args_list):
    return [encode(m, a) for m, a in zip(models, args_list)]


def decode_many(streams):
    return [decode(s) for s in streams]
