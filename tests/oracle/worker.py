"""Oracle worker: runs inside the NNCodec virtual environment (numpy<2, torch) and serves requests.

Each request is ``{"module": M, "fn": F, "args": [...], "kwargs": {...}}``; the worker imports
``ops_<M>`` from this folder and returns ``{"ok": result}`` or ``{"error": traceback}``. The protocol
uses the real stdout; everything NNCodec prints goes to stderr.
"""

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# nncodec.nn imports these at module level only for its demo datasets; PyPI's torchvision does not
# even import beside torch 2.13.0. Stand-ins that answer every attribute keep the import working.
_STUBBED = ("torchvision", "cv2", "pandas", "sklearn", "h5py")


class _StubClass:
    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name)


class _Anything(types.ModuleType):
    __path__ = []  # behaves as a package, so submodule imports resolve through the finder too

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():  # classes get subclassed or instantiated at import time
            return type(name, (_StubClass,), {})
        return _Anything(f"{self.__name__}.{name}")

    def __call__(self, *a, **k):
        return _Anything(self.__name__ + "()")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in _STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Anything(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubFinder())

import wire  # noqa: E402  (after sys.path set-up)


def main() -> None:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # C++ and Python prints now land on stderr
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    while True:
        try:
            req = wire.unpack(wire.read_frame(proto_in))
        except EOFError:
            return
        try:
            mod = importlib.import_module("ops_" + req["module"])
            res = {"ok": getattr(mod, req["fn"])(*req.get("args", []), **req.get("kwargs", {}))}
        except BaseException:  # report everything, SystemExit from NNCodec included
            res = {"error": traceback.format_exc()}
        wire.write_frame(proto_out, wire.pack(res))


if __name__ == "__main__":
    main()
