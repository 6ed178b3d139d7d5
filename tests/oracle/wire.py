"""Message framing shared by the test client (numpy 2) and the oracle worker (numpy 1).

A message is any nesting of dict / list / tuple / str / int / float / bool / None / bytes / numpy
arrays. It travels as one ``.npz`` archive (a format both numpy majors read): arrays and bytes become
archive members, the rest is JSON. Frames are prefixed with their length as 8 little-endian bytes.
"""

import io
import json
import struct

import numpy as np

_LEN = struct.Struct("<Q")


def pack(obj) -> bytes:
    arrays = {}

    def enc(x):
        if isinstance(x, np.ndarray):
            key = "a%d" % len(arrays)
            arrays[key] = x
            return {"__nd__": key}
        if isinstance(x, (bytes, bytearray, memoryview)):
            key = "a%d" % len(arrays)
            arrays[key] = np.frombuffer(bytes(x), dtype=np.uint8)
            return {"__bytes__": key}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            return {"__dict__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        return x

    tree = enc(obj)
    buf = io.BytesIO()
    np.savez(buf, __json__=np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8), **arrays)
    return buf.getvalue()


def unpack(data: bytes):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    tree = json.loads(arrays.pop("__json__").tobytes().decode())

    def dec(x):
        if isinstance(x, dict):
            if "__nd__" in x:
                return arrays[x["__nd__"]]
            if "__bytes__" in x:
                return arrays[x["__bytes__"]].tobytes()
            return {dec(k): dec(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(tree)


def write_frame(stream, payload: bytes) -> None:
    stream.write(_LEN.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def read_frame(stream) -> bytes:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("oracle stream closed")
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("oracle stream truncated")
    return data
