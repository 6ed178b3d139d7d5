"""Hostile and odd input to :mod:`nncjax.update`: hand-built and forged states, streams that do not
continue the receiver's state (replayed, skipped, from another sender, other dimensions or positions),
empty updates, tensors that would share a parameter_id, and the files ``save`` / ``load`` take.

Each case must end in a typed error that names the problem or in equal sender and receiver states;
none may pass silently, raise a raw Python / NumPy exception or lose data.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from nncjax.errors import InputError, UnsupportedStreamError
from nncjax.update import TensorHistory, UpdateState, decode_update, encode_update

RNG = np.random.default_rng(7)
W = RNG.normal(0, 0.05, (8, 6)).astype(np.float32)
B = RNG.normal(0, 0.05, 6).astype(np.float32)


def sparse(shape, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.02, shape) * (rng.random(shape) < 0.3)).astype(np.float32)


def record(shape, *, pid=0, depth=2, hist=True) -> TensorHistory:
    """A tensor's record after ``depth`` coded versions (levels all zero, an empty history)."""
    return TensorHistory(pid, depth, np.zeros(shape, np.int32), np.zeros(shape, np.int8) if hist else None, False)


def forge(meta, **arrays) -> io.BytesIO:
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    buf.seek(0)
    return buf


@pytest.fixture(scope="module")
def plain_sequence():
    """A base and two updates without TCA (sender device 3): the node fields alone tie them together."""
    state = UpdateState(device_id=3)
    streams, states = [], []
    for step, model in enumerate([{"w": W, "b": B}, {"w": sparse((8, 6), 1), "b": B / 10},
                                  {"w": sparse((8, 6), 2), "b": B / 10}]):
        data, state = encode_update(model, state, differential=step > 0, tca=False, hdsp=False, qp=-38)
        streams.append(data)
        states.append(state)
    return streams, states


# ------------------------------------------------------------------------------------------------
# hand-built states


LEVELS = np.arange(48, dtype=np.int32).reshape(8, 6) - 24


@pytest.mark.parametrize("fields, match", [
    (dict(levels=LEVELS + 0.5), "levels must be an integer array"),  # was truncated
    (dict(levels=LEVELS.astype(np.int64) + 2**32), "levels must hold integers"),  # was wrapped
    (dict(levels=np.int32(3)), "at least one dimension"),
    (dict(levels=None), "levels must be an integer array"),  # was a raw TypeError
    (dict(hist=np.zeros((6, 8), np.int8)), "history and levels differ in shape"),  # raw ValueError when coding
    (dict(hist=np.zeros(3, np.int8)), "history and levels differ in shape"),
    (dict(hist=np.full((8, 6), 2)), "hist must hold integers in \\[0, 1\\]"),  # coders read 2 as "never non-zero"
    (dict(hist=np.full((8, 6), 256)), "hist must hold integers in \\[0, 1\\]"),  # was wrapped to 0
    (dict(hist=np.full((8, 6), 0.5)), "hist must be an integer array"),
    (dict(depth=0), "depth"),
    (dict(depth=-5), "depth"),
    (dict(depth=1.5), "depth"),
    (dict(depth=2**64), "depth"),
    (dict(parameter_id=-1), "parameter_id"),
    (dict(parameter_id="0"), "parameter_id"),
    (dict(is_int="no"), "is_int"),
])
def test_tensor_history_refuses_bad_fields(fields, match):
    args = dict(parameter_id=0, depth=1, levels=LEVELS, hist=None, is_int=False) | fields
    with pytest.raises(InputError, match=match):
        TensorHistory(**args)


def test_tensor_history_takes_numpy_scalars_and_integer_arrays():
    """NumPy scalars were kept as they came, and ``save`` then failed in json.dumps (a raw TypeError)."""
    h = TensorHistory(np.int64(2), np.uint8(3), LEVELS.astype(np.int16).tolist(), LEVELS > 0, np.bool_(True))
    assert (h.parameter_id, h.depth, h.is_int) == (2, 3, True)
    assert (type(h.parameter_id), type(h.depth), type(h.is_int)) == (int, int, bool)
    assert h.levels.dtype == np.int32 and h.hist.dtype == np.int8
    np.testing.assert_array_equal(h.levels, LEVELS)
    state, buf = UpdateState(1, {"w": h}), io.BytesIO()
    state.save(buf)
    buf.seek(0)
    assert UpdateState.load(buf) == state


# ------------------------------------------------------------------------------------------------
# save / load

FORMAT = "nncjax.UpdateState/1"
L = np.arange(6, dtype=np.int32).reshape(2, 3)


@pytest.mark.parametrize("entry, arrays, match", [
    (["w", 0, 1, False, False], dict(levels0=L + 0.5), "tensor 'w': levels must be an integer array"),
    (["w", 0, 1, False, False], dict(levels0=L.astype(np.int64) + 2**33), "tensor 'w': levels must hold"),
    (["w", 0, 1, False, False], dict(levels0=np.array([2**63], np.uint64)), "tensor 'w': levels must hold"),
    (["w", 0, 1, False, False], dict(levels0=np.array([1 + 2j])), "tensor 'w': levels must be an integer"),
    (["w", 0, 1, False, False], dict(levels0=np.int32(3)), "tensor 'w': levels must have at least one"),
    (["w", 0, 1, False, True], dict(levels0=L, hist0=L), "tensor 'w': hist must hold integers in"),
    (["w", 0, 1, False, True], dict(levels0=L, hist0=np.full((2, 3), 0.7)), "tensor 'w': hist must be an integer"),
    (["w", 0, 1, False, True], dict(levels0=L, hist0=np.zeros((3, 2), np.int8)), "tensor 'w': history and levels"),
    (["w", 2**70, 1, False, False], dict(levels0=L), "tensor 'w': parameter_id"),
    (["w", 0, 2**70, False, False], dict(levels0=L), "tensor 'w': depth"),
    (["w", 0, 1, "no", False], dict(levels0=L), "tensor 'w': is_int must be True or False"),
    (["w", 0, 1, False, "no"], dict(levels0=L, hist0=L * 0), "tensor 'w': has_hist must be True or False"),
])
def test_load_refuses_forged_records(entry, arrays, match):
    with pytest.raises(InputError, match=match):
        UpdateState.load(forge({"format": FORMAT, "device_id": 0, "tensors": [entry]}, **arrays))


def test_load_refuses_a_name_twice():
    """A dict keeps the last of two records under one name: the first one was lost silently."""
    meta = {"format": FORMAT, "device_id": 0, "tensors": [["w", 0, 1, False, False], ["w", 1, 2, False, False]]}
    with pytest.raises(InputError, match="tensor 'w' occurs twice"):
        UpdateState.load(forge(meta, levels0=L, levels1=L + 1))


def test_save_writes_the_path_it_is_given(tmp_path):
    """np.savez adds ".npz" to a path without it: ``load(path)`` then found no file at ``path``."""
    _, state = encode_update({"w": W}, UpdateState(device_id=4), differential=False)
    path = tmp_path / "sender_state"
    state.save(path)
    assert os.listdir(tmp_path) == ["sender_state"]
    assert UpdateState.load(path) == state
    state.save(str(tmp_path / "again.npz"))
    assert UpdateState.load(tmp_path / "again.npz") == state
    with pytest.raises(InputError, match="cannot write an UpdateState file"):
        state.save(tmp_path)  # a folder: was a raw IsADirectoryError


@pytest.mark.parametrize("bad", [None, 3.5, ["state.npz"], object()])
def test_save_and_load_refuse_what_is_no_file(bad):
    with pytest.raises(InputError, match="file must be a path or a binary file object"):
        UpdateState().save(bad)
    with pytest.raises(InputError, match="file must be a path or a binary file object"):
        UpdateState.load(bad)


def test_save_refuses_text_files(tmp_path):
    with open(tmp_path / "state.npz", "w") as f:  # was a raw TypeError from zipfile
        with pytest.raises(InputError, match="binary file object, got TextIOWrapper"):
            UpdateState().save(f)


def test_load_leaves_file_descriptors_alone(tmp_path):
    """An int reached zipfile.is_zipfile and np.load as a file descriptor, which they closed."""
    path = tmp_path / "f"
    path.write_bytes(b"not a state")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(InputError, match="file must be a path"):
            UpdateState.load(fd)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# streams that do not continue the receiver's state


def test_replayed_or_skipped_update_without_tca_is_refused(plain_sequence):
    """Without TCA only put_node_depth shows that an update was decoded already (the application would
    add the difference twice) or that one is missing."""
    streams, states = plain_sequence
    decode_update(streams[2], states[1])  # in order: fine
    with pytest.raises(InputError, match="put_node_depth 2, the state expects 3.*decoded twice"):
        decode_update(streams[1], states[1])
    with pytest.raises(InputError, match="put_node_depth 3, the state expects 2.*missing"):
        decode_update(streams[2], states[0])
    with pytest.raises(InputError, match="put_node_depth 3 but the state holds no earlier version"):
        decode_update(streams[2], UpdateState(device_id=3))


def test_update_from_another_sender_is_refused_without_tca(plain_sequence):
    streams, states = plain_sequence
    other = UpdateState(5, states[0].tensors)  # device 5's receiver, holding the same tensors
    with pytest.raises(InputError, match="comes from device 3, the state is device 5's"):
        decode_update(streams[1], other)


def _sender_and_receiver(name, sent_shape, held_shape, *, sent_pid=0, held_pid=0, hist=True):
    """A stream that continues ``name``'s depth 2 from a sender holding it at ``sent_shape`` / ``sent_pid``,
    and a receiver holding it at ``held_shape`` / ``held_pid``."""
    sender = UpdateState(0, {name: record(sent_shape, pid=sent_pid, hist=hist)})
    receiver = UpdateState(0, {name: record(held_shape, pid=held_pid, hist=hist)})
    return sender, receiver


def test_unit_with_other_dimensions_is_refused():
    # (6, 8) against (8, 6): a raw ValueError from numpy when the history was updated
    sender, receiver = _sender_and_receiver("w", (6, 8), (8, 6))
    data, _ = encode_update({"w": sparse((6, 8), 3)}, sender, tca=False)
    with pytest.raises(InputError, match=r"'w' has dimensions \(6, 8\), the state's version \(8, 6\)"):
        decode_update(data, receiver)
    # a base with other dimensions: the record kept levels (6, 8) with a history (8, 6)
    base, _ = encode_update({"w": W.reshape(6, 8)}, UpdateState(), differential=False)
    with pytest.raises(InputError, match=r"'w' has dimensions \(6, 8\), the state's version \(8, 6\)"):
        decode_update(base, receiver)
    # (6, 1) against (1, 6): the history broadcast silently to (6, 6)
    sender, receiver = _sender_and_receiver("v", (6, 1), (1, 6))
    data, _ = encode_update({"v": np.full((6, 1), 0.5, np.float32)}, sender, tca=False)
    with pytest.raises(InputError, match=r"'v' has dimensions \(6, 1\), the state's version \(1, 6\)"):
        decode_update(data, receiver)


def test_unit_at_another_position_is_refused():
    """Encoders keep a tensor's parameter_id; a unit that moves it was taken as it came."""
    sender, receiver = _sender_and_receiver("w", (8, 6), (8, 6), sent_pid=1, held_pid=0)
    data, _ = encode_update({"z": np.ones(3, np.float32), "w": sparse((8, 6), 4)}, sender, tca=False)
    with pytest.raises(InputError, match="'w' has parameter_id 1, the state's version 0"):
        decode_update(data, receiver)
    base, _ = encode_update({"z": np.ones(3, np.float32), "w": W}, UpdateState(), differential=False)
    with pytest.raises(InputError, match="'w' has parameter_id 1, the state's version 0"):
        decode_update(base, receiver)


# ------------------------------------------------------------------------------------------------
# encoder side


def test_empty_update_keeps_states_equal():
    """An update without tensors was written as a base stream: the sender gave every tensor an empty
    history, the receiver did not (and returned no zeros for them)."""
    data, sender = encode_update({"w": W, "b": B}, UpdateState(), differential=False)
    _, receiver = decode_update(data, UpdateState())
    for empty in ({}, {"w": None}):
        data, new_sender = encode_update(empty, sender)
        got, new_receiver = decode_update(data, receiver)
        assert new_sender == new_receiver and new_receiver.tensors["w"].hist is not None
        assert set(got) == {"w", "b"} and not any(v.any() for v in got.values())
        tree, _ = decode_update(data, receiver, like={"w": W, "b": B})
        assert tree["w"].shape == W.shape and not tree["w"].any()


def test_new_tensor_cannot_take_a_held_parameter_id():
    """A new tensor in the place of one the update leaves out got that tensor's parameter_id: two
    tensors of the state then shared one, and the full model could not be coded any more."""
    _, state = encode_update({"a": W, "b": W}, UpdateState(), differential=False)
    with pytest.raises(InputError, match="'d' is new at position 1, the parameter_id of the state's 'b'"):
        encode_update({"a": W / 10, "d": W / 10}, state)
    _, after = encode_update({"a": W / 10, "b": W / 10, "d": W / 10}, state)  # after the held ones: fine
    assert {n: h.parameter_id for n, h in after.tensors.items()} == {"a": 0, "b": 1, "d": 2}


def test_constant_difference_with_a_codebook_is_not_left_out(oracle):
    """A one-entry codebook codes a constant non-zero difference with all-zero levels: the stream left it
    out (as NNCodec does) and the receiver added nothing. Now its unit is written, and NNCodec's decoder
    reads it too; an all-zero difference is still left out."""
    base = {"w": W, "temp": np.float32(1.0)}
    update = {"w": np.full((8, 6), 0.01, np.float32), "temp": np.float32(0.25)}
    zero = {"w": np.zeros((8, 6), np.float32), "temp": np.float32(0.0)}
    sender = receiver = UpdateState()
    streams = []
    for step, model in enumerate([base, update, zero]):
        data, sender = encode_update(model, sender, differential=step > 0, codebook="always", qp=-38,
                                     row_skipping=False)
        got, receiver = decode_update(data, receiver, like=model)
        assert receiver == sender
        for name, value in model.items():
            np.testing.assert_allclose(got[name], value, atol=2e-3, err_msg=f"{name!r}, stream {step}")
        streams.append(data)
    assert {n: h.depth for n, h in sender.tensors.items()} == {"w": 2, "temp": 2}  # the zeros are left out
    res = oracle.call("update", "decode_sequence", [{"streams": streams, "differential": [False, True, True],
                                                     "hdsp": True}])[0]
    assert "error" not in res, res.get("error")
    np.testing.assert_allclose(res["decoded"][1]["temp"], [0.25], atol=2e-3)
    np.testing.assert_allclose(res["decoded"][1]["w"], update["w"], atol=2e-3)


def test_a_stream_mixing_differences_and_whole_tensors_is_refused():
    """pre_signalling turns the MPS's parent signalling on in whole models too, so the units tell an update:
    one that mixes differential units and whole tensors has no single meaning for the state."""
    from nncjax.kernels.units import CompressedDataUnit, read_units

    rng = np.random.default_rng(3)
    base = {"w": rng.normal(0, 0.1, (8, 8)).astype(np.float32), "b": rng.normal(0, 0.1, 8).astype(np.float32)}
    whole, state = encode_update(base, UpdateState(), differential=False, pre_signalling=True, qp=-36)
    update, _ = encode_update({k: v * 0.1 for k, v in base.items()}, state, pre_signalling=True, qp=-36, tca=False)

    def ndus(data):
        return [data[u.span.offset:u.span.offset + u.span.size] for u in read_units(data)
                if isinstance(u, CompressedDataUnit)]

    first = min(u.span.offset for u in read_units(update) if isinstance(u, CompressedDataUnit))
    mixed = update[:first] + ndus(update)[0] + ndus(whole)[1]  # a difference of "w", the whole "b"
    with pytest.raises(UnsupportedStreamError, match="mixes differential units and whole tensors"):
        decode_update(mixed, state)
