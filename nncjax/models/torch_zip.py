"""Reads a zip-format PyTorch ``state_dict`` file (``torch.save`` since 1.6) into numpy, without torch.

Only what a state dict of dense CPU tensors needs is accepted: ``OrderedDict``, typed storages and
``torch._utils._rebuild_tensor_v2``. Any other pickled global raises, so a hostile file cannot run
code through the unpickler.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import zipfile
from typing import Any

import numpy as np

from nncjax.errors import InputError

__all__ = ["load_state_dict"]

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype: type) -> None:
        self.dtype = np.dtype(dtype)


def _is_index_tuple(t: Any) -> bool:
    return isinstance(t, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in t)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_unused: Any) -> np.ndarray:
    """A tensor view of ``storage`` (1-D, in elements) copied into a fresh contiguous array.

    Every element must lie inside the storage and the tensor may not hold more elements than the
    storage (no broadcasting strides), so a hostile file cannot make us read out of bounds or
    allocate more than it contains.
    """
    if not (isinstance(storage, np.ndarray) and _is_index_tuple(size) and _is_index_tuple(stride)):
        raise InputError("torch state dict: malformed tensor record")
    if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
        raise InputError("torch state dict: inconsistent tensor offset/size/stride")
    numel = int(np.prod(size, dtype=np.int64)) if size else 1
    if numel > 0:
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if numel > storage.size - offset or last >= storage.size:
            raise InputError("torch state dict: tensor reaches outside its storage")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * itemsize for st in stride), writeable=False
    )
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise InputError(f"torch state dict: unsupported pickled object {module}.{name}")

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise InputError("torch state dict: unsupported persistent id")
        raw = self._archive.read(f"{self._prefix}/data/{pid[2]}")
        dtype = pid[1].dtype.newbyteorder("<")
        if len(raw) % dtype.itemsize:
            raise InputError(f"torch state dict: storage {pid[2]} is not a whole number of {dtype} items")
        return np.frombuffer(raw, dtype)


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` from a zip-format torch ``state_dict`` file.

    Example:
        >>> from nncjax.models import crepe
        >>> sd = load_state_dict(crepe.weights_path()); sd["conv1.weight"].shape
        (128, 1, 512, 1)
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise InputError(f"{path}: not a zip-format torch file (no single data.pkl)")
            prefix = pkl[0][: -len("/data.pkl")]
            with archive.open(pkl[0]) as f:
                state = _Unpickler(f, archive, prefix).load()
    except InputError:
        raise
    except Exception as e:  # a corrupt pickle or zip can fail in many ways; all mean "unreadable"
        raise InputError(f"{path}: unreadable torch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return dict(state)
