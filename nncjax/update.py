"""Differential model updates (federated learning): NNR streams that build on earlier ones.

A sender codes a base model once and then a sequence of updates (model differences); a receiver
decodes them in the same order. Both sides keep an :class:`UpdateState`, which the standard leaves
outside the bitstream, and each stream moves it on. Three tools use it, as in NNCodec 2.1.3:

* **Node ids.** Every unit carries its device id, parameter id and ``put_node_depth``. The first unit
  of a tensor coded through a state has depth 1, and every later one its parent's depth + 1. An
  update's units are differential (``parent_node_id_present_flag = 1``). A difference that decodes to
  zeros only is left out of the stream: the receiver adds nothing. (NNCodec also leaves out a constant
  non-zero difference coded with a one-entry codebook, whose levels are all zero, and its receiver adds
  nothing; nncjax codes it.)
* **TCA** (temporal context adaptation, ``tca=True``): an update's levels are coded with contexts
  chosen by the co-located levels of the tensor's previous coded version. The base's levels serve
  for the first update.
* **HDSP** (history-dependent significance probability, ``hdsp=True``): significance flags at
  positions that were ever non-zero in an earlier update use their own contexts. Per tensor the
  encoder codes the payload with and without it and keeps the shorter one (the flag in the payload
  says which).

Neither tool predicts values, so a stream is only the difference: the application adds it to its
own copy of the model. The invariant: the state :func:`encode_update` returns equals the state
:func:`decode_update` returns for the same stream, and its bytes equal NNCodec's with equal settings
(``nnc.compress(..., approx_param_base=..., update_base_param=True, compress_differences=True,
tca=..., hdsp_tool=...)``). The HDSP history is taken from update streams only: NNCodec's decoder
does so (an NNCodec encoder whose HDSP tool also saw the base disagrees with its own decoder). Where
DQ indices are coded that decoders rebuild as neighbouring ones (row skipping under block scans,
``bitdepth`` clipping), the state keeps the rebuilt levels; NNCodec's encoder keeps its own and its
decoder then fails on the next TCA update, so from there on the bytes differ from NNCodec's encoder
and NNCodec's decoder reads ours.

Update streams hold single tensors only (no ``blocks``, no ``low_rank``): NNCodec codes a block's
tensor dimensions out of band in an update stream, so such a stream cannot be decoded alone.

Example:
  >>> rng = np.random.default_rng(0)
  >>> base = {"w": rng.normal(0, 0.05, (32, 16)).astype(np.float32)}
  >>> sender, receiver = UpdateState(), UpdateState()
  >>> data, sender = encode_update(base, sender, differential=False)     # the base model
  >>> got, receiver = decode_update(data, receiver)
  >>> delta = {"w": (rng.normal(0, 0.01, (32, 16)) * (rng.random((32, 16)) < 0.2)).astype(np.float32)}
  >>> data, sender = encode_update(delta, sender, qp=-40)                  # an update
  >>> got, receiver = decode_update(data, receiver)
  >>> sender == receiver, np.allclose(got["w"], delta["w"], atol=2 * 2 ** (-40 / 4))  # within 2 steps
  (True, True)
  >>> sender.tensors["w"].depth
  2
"""

from __future__ import annotations

import inspect as _inspect
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from nncjax import codec
from nncjax.arguments import check_array_kind, check_flag, check_int
from nncjax.errors import BitstreamError, InputError, UnsupportedError, UnsupportedStreamError
from nncjax.pytree_names import flatten_named, unflatten_like
from nncjax.ready import cast_leaf

__all__ = ["TensorHistory", "UpdateState", "decode_update", "encode_update"]

_FORMAT = "nncjax.UpdateState/1"
_MAX_ID = 2**62  # parameter_id and put_node_depth: ue(k) fields, bounded as NNR readers bound them


def _int_array(a, what: str, dtype, lo: int, hi: int) -> np.ndarray:
    """``a`` as a read-only ``dtype`` array after checking it holds integers (or bools) in ``[lo, hi]``:
    a cast would truncate floats and wrap large integers silently."""
    a = np.asarray(check_array_kind(a, "iub", f"{what} must be an integer array"))
    # already dtype, and dtype's whole range allowed (levels): nothing to scan
    fits = a.dtype == dtype and (lo, hi) == (np.iinfo(dtype).min, np.iinfo(dtype).max)
    if a.size and not fits and (int(a.min()) < lo or int(a.max()) > hi):
        raise InputError(f"{what} must hold integers in [{lo}, {hi}], got values in [{int(a.min())}, {int(a.max())}]")
    out = a.astype(dtype)  # a copy: a record never shares memory with the caller's array
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class TensorHistory:
    """What both ends keep of one tensor between streams.

    ``parameter_id``: its index in the model; ``depth``: put_node_depth of its last coded unit;
    ``levels``: that unit's integer levels (int32, the tensor's NNR shape; the TCA reference of its
    next update); ``hist``: int8 of the same shape, 1 where a level of an update was ever non-zero
    (None before the first update stream that carried or left out the tensor); ``is_int``: coded
    losslessly as NNR_PT_INT (its omitted differences decode as int32 zeros). Arrays are read-only;
    InputError names a field that cannot be one of a coded tensor.

    >>> h = TensorHistory(0, 1, np.int32([[1, 0], [0, 2]]), None, False)
    >>> h.levels.flags.writeable, h == TensorHistory(0, 1, np.int32([[1, 0], [0, 2]]), None, False)
    (False, True)
    >>> TensorHistory(0, 1, np.int32([[1, 0], [0, 2]]), np.int8([1, 0]), False)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: history and levels differ in shape: (2,) and (2, 2)
    """

    parameter_id: int
    depth: int
    levels: np.ndarray
    hist: np.ndarray | None
    is_int: bool

    def __post_init__(self):
        object.__setattr__(self, "parameter_id", check_int(self.parameter_id, "parameter_id", lo=0, hi=_MAX_ID))
        object.__setattr__(self, "depth", check_int(self.depth, "depth", lo=1, hi=_MAX_ID))
        levels = _int_array(self.levels, "levels", np.int32, -2**31, 2**31 - 1)
        if levels.ndim == 0:  # an NNR shape has at least one dimension (0-d tensors are coded as (1,))
            raise InputError("levels must have at least one dimension, got a 0-d array")
        object.__setattr__(self, "levels", levels)
        if self.hist is not None:
            hist = _int_array(self.hist, "hist", np.int8, 0, 1)
            if hist.shape != levels.shape:
                raise InputError(f"history and levels differ in shape: {hist.shape} and {levels.shape}")
            object.__setattr__(self, "hist", hist)
        object.__setattr__(self, "is_int", check_flag(self.is_int, "is_int"))

    def __eq__(self, other) -> bool:
        if not isinstance(other, TensorHistory):
            return NotImplemented
        same_hist = (self.hist is None and other.hist is None) or (
            self.hist is not None and other.hist is not None and np.array_equal(self.hist, other.hist))
        return (self.parameter_id, self.depth, self.is_int) == (other.parameter_id, other.depth, other.is_int) \
            and self.levels.shape == other.levels.shape and np.array_equal(self.levels, other.levels) and same_hist

    __hash__ = None


@dataclass(frozen=True, eq=False)
class UpdateState:
    """The state a sender and a receiver of update streams keep (immutable; each call returns a new one).

    ``device_id``: the sender's device id, written into every unit (a receiver uses the sender's);
    ``tensors``: ``{name: TensorHistory}`` of every tensor coded so far. Start both ends with
    ``UpdateState(device_id=k)``; keep one state per sender. :meth:`save` / :meth:`load` store it.

    >>> UpdateState(device_id=3)
    UpdateState(device_id=3, tensors=[])
    >>> UpdateState(device_id=-1)
    Traceback (most recent call last):
    ...
    nncjax.errors.InputError: device_id must be an integer in [0, 2147483647], got -1
    """

    device_id: int = 0
    tensors: Mapping[str, TensorHistory] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "device_id", check_int(self.device_id, "device_id", lo=0, hi=2**31 - 1))
        if not isinstance(self.tensors, Mapping) or not all(
                isinstance(k, str) and isinstance(v, TensorHistory) for k, v in self.tensors.items()):
            raise InputError("tensors must map tensor names (str) to TensorHistory")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, UpdateState):
            return NotImplemented
        return self.device_id == other.device_id and list(self.tensors) == list(other.tensors) and all(
            self.tensors[k] == other.tensors[k] for k in self.tensors)

    __hash__ = None

    def __repr__(self) -> str:
        return f"UpdateState(device_id={self.device_id}, tensors={list(self.tensors)})"

    def save(self, file) -> None:
        """Writes the state to ``file`` (a path, written as given, or a binary file object) as an ``.npz``
        without pickles.

        >>> import io
        >>> s = encode_update({"w": np.ones((4, 4), np.float32)}, UpdateState(), differential=False)[1]
        >>> buf = io.BytesIO(); s.save(buf); _ = buf.seek(0)
        >>> UpdateState.load(buf) == s
        True
        """
        _check_file(file, "write")
        if isinstance(file, (str, os.PathLike)):  # np.savez would add ".npz" to the name, and load(file) miss it
            try:
                f = open(file, "wb")
            except OSError as e:
                raise InputError(f"cannot write an UpdateState file at {os.fspath(file)!r}: {e.strerror}") from None
            with f:
                return self.save(f)
        meta = {"format": _FORMAT, "device_id": self.device_id,
                "tensors": [[n, h.parameter_id, h.depth, h.is_int, h.hist is not None]
                            for n, h in self.tensors.items()]}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for i, h in enumerate(self.tensors.values()):
            arrays[f"levels{i}"] = h.levels
            if h.hist is not None:
                arrays[f"hist{i}"] = h.hist
        np.savez(file, **arrays)

    @staticmethod
    def load(file) -> UpdateState:
        """Reads a state written by :meth:`save`; InputError names what is wrong with a damaged file.

        >>> import io
        >>> UpdateState.load(io.BytesIO(b"not a state"))
        Traceback (most recent call last):
        ...
        nncjax.errors.InputError: not an UpdateState file (not an .npz archive)
        """
        _check_file(file, "read")
        if isinstance(file, (str, os.PathLike)) and not os.path.isfile(file):
            raise InputError(f"no UpdateState file at {os.fspath(file)!r}")
        if not zipfile.is_zipfile(file):
            raise InputError("not an UpdateState file (not an .npz archive)")
        try:
            with np.load(file, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != _FORMAT:
                    raise InputError(f"not an UpdateState file (format {meta.get('format')!r})")
                tensors = {}
                for i, (name, pid, depth, is_int, has_hist) in enumerate(meta["tensors"]):
                    if name in tensors:  # a dict would keep the last one only
                        raise InputError(f"tensor {name!r} occurs twice")
                    try:
                        hist = z[f"hist{i}"] if check_flag(has_hist, "has_hist") else None
                        tensors[name] = TensorHistory(pid, depth, z[f"levels{i}"], hist, is_int)
                    except InputError as e:
                        raise InputError(f"tensor {name!r}: {e}") from None
                return UpdateState(meta["device_id"], tensors)
        except InputError:
            raise
        except Exception as e:  # a damaged or foreign file: name it, whatever numpy or json raised
            raise InputError(f"not an UpdateState file: {e}") from None


def _check_file(file, mode: str) -> None:
    # zipfile and numpy take an int for a file descriptor, and close it afterwards
    if not isinstance(file, (str, os.PathLike)) and (not hasattr(file, mode) or isinstance(file, io.TextIOBase)):
        raise InputError(f"file must be a path or a binary file object, got {type(file).__name__}")


def _check_state(state) -> UpdateState:
    if not isinstance(state, UpdateState):
        raise InputError(f"state must be an UpdateState (start with UpdateState()), got {type(state).__name__}")
    return state


def _encode_options(params, kwargs: dict) -> dict:
    """``kwargs`` checked against :func:`nncjax.encode`'s keywords, with its defaults filled in."""
    for name in ("blocks", "low_rank"):
        if kwargs.get(name) is not None:
            raise UnsupportedError(f"update streams hold single tensors: {name} is not supported "
                                   "(NNCodec codes a block's dimensions out of band in update streams)")
    try:
        bound = _inspect.signature(codec.encode).bind(params, **kwargs)
    except TypeError as e:
        raise InputError(f"encode_update: {e} (it takes nncjax.encode's keywords)") from None
    bound.apply_defaults()
    options = dict(bound.arguments)
    del options["params"]
    return options


def _nnr_shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x)) or (1,)  # 0-d tensors are coded as (1,)


def encode_update(params, state: UpdateState, *, differential: bool = True, tca: bool = True, hdsp: bool = True,
                  **kwargs) -> tuple[bytes, UpdateState]:
    """Codes a base model (``differential=False``) or an update (a model difference) against ``state``.

    Args:
      params: pytree of arrays as for :func:`nncjax.encode` (for an update: new minus old values);
        every tensor the state already holds must keep its position (parameter_id) and shape.
      state: the sender's :class:`UpdateState` after the previous stream (``UpdateState()`` at first).
      differential: an update stream (differential units; all-zero differences left out); False: a
        full model, whose levels become the TCA reference of the next update.
      tca: code each update tensor with temporal context adaptation where the state holds an earlier
        version. hdsp: try HDSP for each tensor with an update history (the shorter payload is kept).
      **kwargs: :func:`nncjax.encode`'s settings (qp, nonweight_qp, dq, qp_overrides, codebook,
        scan_order, ...), except ``blocks`` and ``low_rank`` (UnsupportedError).

    Returns:
      ``(bitstream, new state)``; ``state`` itself is unchanged.

    Raises:
      InputError when a tensor's position or shape differs from the state's record, a new tensor
      takes the position (parameter_id) of one the state holds, or for bad settings; the errors of
      :func:`nncjax.encode`.

    Example:
      >>> s0 = UpdateState()
      >>> data, s1 = encode_update({"w": np.ones((8, 8), np.float32)}, s0, differential=False)
      >>> data, s2 = encode_update({"w": np.zeros((8, 8), np.float32)}, s1)   # nothing changed
      >>> len(data) < 20, s2.tensors["w"].depth, s0.tensors == {}               # no unit written
      (True, 1, True)
      >>> encode_update({"w": np.ones((4, 4), np.float32)}, s2)
      Traceback (most recent call last):
      ...
      nncjax.errors.InputError: tensor 'w' has shape (4, 4), the state's version (8, 8)
    """
    state = _check_state(state)
    differential, tca, hdsp = (check_flag(differential, "differential"), check_flag(tca, "tca"),
                               check_flag(hdsp, "hdsp"))
    options = _encode_options(params, kwargs)
    named = flatten_named(params)
    held = {rec.parameter_id: name for name, rec in state.tensors.items()}
    links = {}
    for index, (name, x) in enumerate(named.items()):
        rec = state.tensors.get(name)
        if rec is None and index in held:  # two tensors under one parameter_id: their node ids would collide
            raise InputError(f"tensor {name!r} is new at position {index}, the parameter_id of the state's "
                             f"{held[index]!r}: keep the base model's tensors at their positions, new ones after them")
        if rec is not None:
            if rec.parameter_id != index:
                raise InputError(f"tensor {name!r} is at position {index}, the state's version at "
                                 f"{rec.parameter_id}: keep the tensors in the base model's order "
                                 "(jax.tree_util.tree_map returns dicts with sorted keys)")
            if rec.levels.shape != _nnr_shape(x):
                raise InputError(f"tensor {name!r} has shape {_nnr_shape(x)}, the state's version "
                                 f"{rec.levels.shape}")
        links[name] = codec.UnitLink(
            depth=(rec.depth if rec else 0) + 1, device_id=state.device_id, differential=differential,
            base=rec.levels if differential and tca and rec is not None else None,
            hist=rec.hist if differential and hdsp and rec is not None else None)
    data, coded = codec._encode(named, update=links, differential=differential, **options)
    coded_now = [(c.name, c.index, c.levels, c.is_int) for c in coded
                 if not differential or not codec._zero_difference(c)]
    # as decode_update reads it: a stream without units is an update when its MPS signals parents,
    # which pre_signalling does in a whole model too
    return data, _advance(state, coded_now, differential or (options["pre_signalling"] and not coded_now))


def _advance(state: UpdateState, coded: list, differential: bool) -> UpdateState:
    """The state after a stream that coded ``coded`` (name, parameter_id, levels, is_int), in stream order.

    Coded tensors get depth + 1 and their levels; an update stream adds its levels to each coded
    tensor's history and starts an empty history for every tensor it left out."""
    tensors = dict(state.tensors)
    for name, pid, levels, is_int in coded:
        rec = tensors.get(name)
        hist = None if rec is None else rec.hist
        if differential:
            hist = (np.zeros(levels.shape, np.int8) if hist is None else hist) | (levels != 0)
        tensors[name] = TensorHistory(pid, (rec.depth if rec else 0) + 1, levels, hist, is_int)
    if differential:
        done = {name for name, *_ in coded}
        for name, rec in tensors.items():
            if name not in done and rec.hist is None:
                tensors[name] = TensorHistory(rec.parameter_id, rec.depth, rec.levels,
                                              np.zeros(rec.levels.shape, np.int8), rec.is_int)
    return UpdateState(state.device_id, tensors)


def decode_update(data, state: UpdateState, like=None, *, limits=None, workers: int = 2,
                  progress: bool | None = None) -> tuple[Any, UpdateState]:
    """Decodes a base model or an update stream against the receiver's ``state``.

    Args:
      data: the bitstream, from :func:`encode_update` or NNCodec (its federated-learning streams).
      state: the receiver's :class:`UpdateState` after the previous stream of the same sender.
      like: optional pytree as for ``nncjax.decode(raw=True, like=...)``; in an update stream its
        leaves that the stream leaves out come back as zeros.
      limits, workers, progress: as for :func:`nncjax.decode`.

    Returns:
      ``(tensors, new state)``. ``tensors``: ``{name: array}`` in parameter order (float32, int32 for
      NNR_PT_INT) as coded (an update: the difference to add); in an update stream also zeros for
      every tensor the state holds that the stream leaves out. With ``like``: a pytree shaped like it.

    Raises:
      InputError when the stream does not continue ``state``: a TCA unit for a tensor the state does
      not hold, a TCA or other differential unit whose device, parameter id or depth is not the next
      one (a stream missing, reordered or decoded twice), any unit whose parameter id or dimensions
      differ from the state's version; UnsupportedStreamError for an HDSP payload without a history or a
      stream that mixes differential units and whole tensors;
      UnsupportedError for block units; the errors of :func:`nncjax.decode`.

    Example:
      >>> w = np.arange(12, dtype=np.float32).reshape(3, 4) / 64
      >>> data, _ = encode_update({"w": w, "b": np.zeros(3, np.float32)}, UpdateState(), differential=False)
      >>> got, state = decode_update(data, UpdateState())
      >>> sorted(got), state.tensors["w"].depth, state.tensors["w"].hist is None
      (['b', 'w'], 1, True)
    """
    from nncjax.kernels.units import PayloadType
    state = _check_state(state)
    st = codec._parse(data, limits)
    differential = _is_update(st)
    jobs, checked = [], []
    for u, qpd, base_qp in st.ndus:
        name = str(u.topology_elem_ids[0])
        if u.payload_type in (PayloadType.BLOCK, PayloadType.RAW_FLOAT) or len(u.members()) != 1:
            raise UnsupportedError(f"NNR_NDU {name!r}: decode_update reads single-tensor units "
                                   f"(payload type {int(u.payload_type)}); use nncjax.decode")
        rec = state.tensors.get(name)
        # Checked before decoding where the payload needs the state's version (TCA contexts, a history that
        # must fit), the other units after it: an HDSP payload that lacks a skipped update's history says so.
        first = bool(u.temporal_context_modeling_flag) or (
            rec is not None and tuple(int(d) for d in u.tensor_dimensions) != rec.levels.shape)
        if first:
            _check_node(u, name, rec, state)
        checked.append(first)
        # HDSP can only be signalled in a differential unit (the coder refuses a history elsewhere).
        side = (rec.levels if rec is not None and u.temporal_context_modeling_flag else None,
                rec.hist if rec is not None and u.parent_node_id_present_flag else None)
        jobs.append((u, qpd, base_qp, st.profile, side))
    sizes = [max(u.element_count(), 1) for u, *_ in jobs]
    parts = codec._run_parallel(codec._decode_ndu, jobs, sizes, workers, progress, "decode",
                                serial=codec._small_payload(jobs))
    flat: dict[str, tuple[int, np.ndarray]] = {}
    coded = []
    for (u, *_), part, first in zip(jobs, parts, checked):
        name = str(part.names[0])
        if name in flat:
            raise BitstreamError(f"NNR_NDU {name!r}: topology_elem_id occurs twice in the bitstream")
        if not first:
            _check_node(u, name, state.tensors.get(name), state)
        pid = int(u.parameter_id)
        flat[name] = (pid, part.arrays[0])
        coded.append((name, pid, part.levels[0], u.payload_type == PayloadType.INT))
    if differential:  # left-out tensors: zero differences
        for name, rec in state.tensors.items():
            if name not in flat:
                flat[name] = (rec.parameter_id, np.zeros(rec.levels.shape, np.int32 if rec.is_int else np.float32))
    ordered = codec._float32({k: v for k, (_, v) in sorted(flat.items(), key=lambda kv: kv[1][0])})
    new_state = _advance(state, coded, differential)
    if like is None:
        return ordered, new_state
    if differential:
        for name, leaf in flatten_named(like).items():
            if name not in ordered:
                ordered[name] = np.zeros(_nnr_shape(leaf), np.float32)
    return unflatten_like(like, ordered, cast_leaf), new_state


def _is_update(st) -> bool:
    """Whether parsed stream ``st`` is an update: its units are differences to their parents
    (``parent_node_id_present_flag``). The MPS's ``mps_parent_signalling_enabled_flag`` alone does not
    say so (NNCodec's ``pre_signalling`` sets it in whole models too); it decides only for a stream
    without units (an update that left every tensor out)."""
    flags = {bool(u.parent_node_id_present_flag) for u, *_ in st.ndus}
    if len(flags) > 1:
        raise UnsupportedStreamError("decode_update: the stream mixes differential units and whole tensors")
    return flags.pop() if flags else st.parent_signalling


def _check_node(u, name: str, rec: TensorHistory | None, state: UpdateState) -> None:
    """A unit must continue the state's version of its tensor. A TCA unit (NNCodec asserts the same) and
    every other differential unit with node ids: the sender's device, the tensor's parameter_id and the
    next put_node_depth (an update decoded twice, or after a missing one, is refused, not added again);
    any unit of a tensor the state holds: its parameter_id and dimensions (encoders keep both)."""
    from nncjax.kernels.units import ParentNodeIdType
    where = f"NNR_NDU {name!r}"
    tca, differential = bool(u.temporal_context_modeling_flag), bool(u.parent_node_id_present_flag)
    if tca and rec is None:
        raise InputError(f"{where} uses TCA but the state holds no earlier version of it: decode the base and "
                         "every earlier update of this sender with this state, in order")
    # A differential unit that names its parent by a payload hash carries no node ids.
    ids = bool(u.node_id_present_flag) or (differential and u.parent_node_id_type == ParentNodeIdType.NDU_ID)
    linked = tca or (differential and ids)
    if linked and int(u.device_id) != state.device_id:
        raise InputError(f"{where} comes from device {int(u.device_id)}, the state is device {state.device_id}'s")
    if rec is not None and (tca or ids) and int(u.parameter_id) != rec.parameter_id:
        raise InputError(f"{where} has parameter_id {int(u.parameter_id)}, the state's version "
                         f"{rec.parameter_id}")
    if linked and int(u.put_node_depth) != (rec.depth if rec is not None else 0) + 1:
        if rec is None:
            raise InputError(f"{where} has put_node_depth {int(u.put_node_depth)} but the state holds no earlier "
                             "version of it: decode the base and every earlier update of this sender with this "
                             "state, in order")
        raise InputError(f"{where} has put_node_depth {int(u.put_node_depth)}, the state expects "
                         f"{rec.depth + 1}: a stream is missing, reordered or decoded twice")
    dims = tuple(int(d) for d in u.tensor_dimensions)
    if rec is not None and dims != rec.levels.shape:
        raise InputError(f"{where} has dimensions {dims}, the state's version {rec.levels.shape}")
