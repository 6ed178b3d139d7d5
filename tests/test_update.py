"""Differential update streams (:mod:`nncjax.update`): a base model and a sequence of model differences
coded against an :class:`UpdateState` (node ids, put_node_depth, TCA, HDSP).

* Cross-implementation: random sequences (1-3 tensors of 1-D, 2-D and conv-like shapes, int32 tensors,
  all-zero differences, sequences without a base; random QP, DQ, TCA, HDSP, scan order, row skipping,
  codebooks) are batched into one NNCodec call per Hypothesis example (``ops_update.sequence``):
  every stream must equal NNCodec's bytes, ours must decode NNCodec's streams to NNCodec's values,
  and the sender's state must equal the receiver's after every stream.
* Round trips without NNCodec: an update decodes to what ``decode(encode(delta))`` gives, the
  units' node fields count the coded versions, left-out tensors come back as zeros.
* Errors, immutability, ``save``/``load``, one golden vector (checked against NNCodec too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nncjax.kernels.units import CompressedDataUnit, PayloadType, read_units

import nncjax
from nncjax import codec
from nncjax.errors import InputError, UnsupportedError, UnsupportedStreamError
from nncjax.pytree_names import flatten_named
from nncjax.update import TensorHistory, UpdateState, decode_update, encode_update
from tests.test_interop_model import opt_qp_codable

CASES_PER_BATCH = 30
BATCHES = 3


# ------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def hdsp_choices():
    """Records ``(name, whether its payload was coded with HDSP)`` of every tensor coded inside the block."""
    chosen: list[tuple[str, bool]] = []
    original = codec._code_tensor

    def spy(*args, **kwargs):
        coded = original(*args, **kwargs)
        chosen.append((coded.name, bool(coded.hdsp)))
        return coded

    codec._code_tensor = spy
    try:
        yield chosen
    finally:
        codec._code_tensor = original


def ndus(data: bytes) -> list[CompressedDataUnit]:
    return [u for u in read_units(data) if isinstance(u, CompressedDataUnit)]


def snapshot(state: UpdateState) -> UpdateState:
    """An independent copy of ``state`` (through save / load)."""
    buf = io.BytesIO()
    state.save(buf)
    buf.seek(0)
    return UpdateState.load(buf)


def nncodec_diverges_at(case: dict, states: list[UpdateState]) -> int | None:
    """The first of our streams whose bytes differ from NNCodec's encoder by design, or None: the second
    after a leniently coded DQ stream (:func:`rs_dq_quirk`: NNCodec's encoder keeps DQ indices its decoder
    never sees), or one that codes a constant non-zero difference NNCodec leaves out (a one-entry codebook,
    all-zero levels: its receivers miss it), or, with pre_signalling, a base holding a tensor of all-zero
    levels (NNCodec leaves it out of a whole model too). NNCodec's decoder is checked on our streams instead."""
    kw = case["kwargs"]
    at = 1 if rs_dq_quirk(kw.get("use_dq", True), kw.get("row_skipping", False), kw.get("scan_order", 0)) else None
    differential = [k > 0 for k, m in enumerate(case["models"]) if m is not None]
    if kw.get("pre_signalling") and not differential[0] and not all(r.levels.any() for r in states[0].tensors.values()):
        return 0
    depth: dict[str, int] = {}
    for k, state in enumerate(states):
        if differential[k] and any(rec.depth != depth.get(n, 0) and not rec.levels.any()
                                   for n, rec in state.tensors.items()):
            return k if at is None else min(at, k)
        depth = {n: rec.depth for n, rec in state.tensors.items()}
    return at


def rs_dq_quirk(dq: bool, row_skipping: bool, scan_order: int) -> bool:
    """NNCodec's row-skip DQ quirk under block scans: DQ indices coded that decoders rebuild as neighbouring
    ones (see ``test_lenient_dq_keeps_states_equal``)."""
    return dq and row_skipping and scan_order > 0


def _shape(rng) -> tuple[int, ...]:
    kind = rng.choice(["1d", "2d", "4d"], p=[0.3, 0.45, 0.25])
    if kind == "1d":
        return (int(rng.integers(1, 200)),)
    if kind == "2d":  # block scans of NNCodec need a real matrix (it fails on 1xN and Nx1)
        return (int(rng.integers(2, 48)), int(rng.integers(2, 48)))
    return (int(rng.integers(2, 16)), int(rng.integers(1, 8)), int(rng.choice([1, 3])), 3)


def make_case(rng) -> dict:
    """One random base + update sequence as an ``ops_update.sequence`` case."""
    specs = []
    for i in range(int(rng.integers(1, 4))):
        is_int = bool(rng.random() < 0.15)
        specs.append((f"t{i}.ids" if is_int else f"t{i}.weight", _shape(rng), is_int))
    n_up, sparse = int(rng.integers(1, 5)), bool(rng.random() < 0.5)
    masks = {n: rng.random(s) < (rng.uniform(0.03, 0.15) if sparse else rng.uniform(0.05, 0.5)) for n, s, _ in specs}
    base = {n: rng.integers(-50, 50, s).astype(np.int32) if is_int else rng.normal(0, 0.05, s).astype(np.float32)
            for n, s, is_int in specs}
    models = [None if rng.random() < 0.2 else base]
    for _ in range(n_up):
        update = {}
        for n, s, is_int in specs:
            kind = rng.choice(["mask", "dense", "zero", "new_mask"],
                              p=[0.85, 0.05, 0.05, 0.05] if sparse else [0.4, 0.3, 0.15, 0.15])
            mask = {"mask": masks[n], "new_mask": rng.random(s) < 0.3, "dense": np.ones(s, bool),
                    "zero": np.zeros(s, bool)}[kind]
            update[n] = ((rng.integers(-5, 6, s) * mask).astype(np.int32) if is_int
                         else (rng.normal(0, 0.02, s) * mask).astype(np.float32))
        models.append(update)
    kw = {"qp": int(rng.integers(-48, -24)), "use_dq": bool(rng.random() < 0.6), "tca": bool(rng.random() < 0.7),
          "scan_order": int(rng.integers(0, 3)), "row_skipping": bool(rng.random() < 0.5)}
    if rng.random() < 0.2:
        kw["codebook_mode"] = int(rng.choice([1, 2]))
    if rng.random() < 0.2 and all(m is None or opt_qp_codable(m) for m in models):
        kw["opt_qp"] = True
    if rng.random() < 0.15:
        kw["pre_signalling"] = True
    quirk = rs_dq_quirk(kw["use_dq"], kw["row_skipping"], kw["scan_order"])
    return {"models": models, "kwargs": kw, "hdsp": bool(rng.random() < 0.7), "device_id": int(rng.integers(0, 6)),
            "decode": not quirk}


def hdsp_case(rng, tca: bool) -> dict:
    """A sequence in which HDSP is chosen (see :func:`sparse_sequence`), random QP, DQ and scan order."""
    models = sparse_sequence(seed=int(rng.integers(2**32)), n_up=4, alternate=tca)
    kw = {"qp": int(rng.integers(-42, -34)), "use_dq": bool(rng.random() < 0.5), "tca": tca,
          "scan_order": int(rng.integers(0, 3)), "row_skipping": False}
    return {"models": models, "kwargs": kw, "hdsp": True, "device_id": int(rng.integers(0, 6)), "decode": True}


def our_kwargs(kw: dict) -> dict:
    """``ops_update`` (NNCodec) keywords -> encode_update's (the op's defaults filled in)."""
    return {"qp": kw.get("qp", -32), "dq": kw.get("use_dq", True), "scan_order": kw.get("scan_order", 0),
            "row_skipping": kw.get("row_skipping", False), "nonweight_qp": -75,
            "codebook": {0: False, 1: "always", 2: True}[kw.get("codebook_mode", 0)],
            "opt_qp": kw.get("opt_qp", False), "pre_signalling": kw.get("pre_signalling", False)}


def encode_sequence(case: dict) -> tuple[list[bytes], list[UpdateState]]:
    state = UpdateState(device_id=case["device_id"])
    streams, states = [], []
    for step, model in enumerate(case["models"]):
        if model is None:
            continue
        data, state = encode_update(model, state, differential=step > 0, tca=case["kwargs"].get("tca", True),
                                    hdsp=case["hdsp"], **our_kwargs(case["kwargs"]))
        streams.append(data)
        states.append(state)
    return streams, states


def describe(case: dict) -> dict:
    shapes = [None if m is None else {k: (v.shape, v.dtype.name, bool(v.any())) for k, v in m.items()}
              for m in case["models"]]
    return {k: v for k, v in case.items() if k != "models"} | {"models": shapes}


def sparse_sequence(seed: int = 0, n_up: int = 3, shape=(32, 32), alternate: bool = True) -> list[dict]:
    """A base and ``n_up`` sparse updates of ``w`` through two masks taken in turn (``alternate``: with TCA
    HDSP then pays off from update 3 on, where the history knows both masks and the TCA reference one) or
    one fixed mask (without TCA HDSP pays off from update 2 on); ``b`` changes densely."""
    rng = np.random.default_rng(seed)
    masks = [rng.random(shape) < 0.08 for _ in range(2)]
    models = [{"w": rng.normal(0, 0.05, shape).astype(np.float32),
               "b": rng.normal(0, 0.05, shape[0]).astype(np.float32)}]
    for k in range(n_up):
        models.append({"w": (rng.normal(0, 0.02, shape) * masks[k % 2 if alternate else 0]).astype(np.float32),
                       "b": rng.normal(0, 0.01, shape[0]).astype(np.float32)})
    return models


def encode_models(models, *, device_id=0, **kw) -> tuple[list[bytes], list[UpdateState], list[dict]]:
    state = UpdateState(device_id=device_id)
    streams, states, hdsp = [], [], []
    for step, m in enumerate(models):
        with hdsp_choices() as chosen:
            data, state = encode_update(m, state, differential=step > 0, **kw)
        streams.append(data)
        states.append(state)
        hdsp.append(dict(chosen))
    return streams, states, hdsp


# ------------------------------------------------------------------------------------------------
# 1. cross-implementation


@settings(max_examples=BATCHES, deadline=None, database=None)
@given(seed=st.integers(0, 2**63 - 1))
def test_streams_decoded_values_and_states_match_nncodec(oracle, seed):
    rng = np.random.default_rng(seed)
    cases = [hdsp_case(rng, tca=False), hdsp_case(rng, tca=True)]
    cases += [make_case(rng) for _ in range(CASES_PER_BATCH - 2)]
    theirs = oracle.call("update", "sequence", cases)
    hdsp_on = tca_units = int_units = decoded_cases = 0
    diverged = []
    for case, res in zip(cases, theirs):
        assert "error" not in res, f"NNCodec failed on {describe(case)}:\n{res.get('error', '')[-1500:]}"
        with hdsp_choices() as chosen:
            streams, states = encode_sequence(case)
        assert len(streams) == len(res["streams"])
        diverges_at = nncodec_diverges_at(case, states)
        for k, (ours, nnc) in enumerate(zip(streams, res["streams"])):
            if diverges_at is not None and k >= diverges_at:
                break  # checked against NNCodec's decoder below
            assert ours == nnc, f"stream {k} differs from NNCodec's for {describe(case)}"
        hdsp_on += sum(on for _, on in chosen)
        for data in streams:
            units = ndus(data)
            tca_units += sum(u.temporal_context_modeling_flag for u in units)
            int_units += sum(u.payload_type == PayloadType.INT for u in units)
            assert all(u.device_id == case["device_id"] for u in units)
        if diverges_at is not None:
            diverged.append((case, streams, states))
            continue
        decoded_cases += 1
        receiver = UpdateState(device_id=case["device_id"])
        for k, (data, sender, nnc) in enumerate(zip(res["streams"], states, res["decoded"])):
            got, receiver = decode_update(data, receiver)
            assert receiver == sender, f"states differ after stream {k} of {describe(case)}"
            assert set(got) == set(receiver.tensors)
            assert list(got) == sorted(got, key=lambda n: receiver.tensors[n].parameter_id)
            for name, arr in nnc.items():
                np.testing.assert_array_equal(got[name], arr, err_msg=f"{name!r}, stream {k} of {describe(case)}")
            for name in set(got) - set(nnc):  # left out of the stream: a zero difference
                assert not got[name].any()
            for name, arr in got.items():
                assert arr.dtype == (np.int32 if receiver.tensors[name].is_int else np.float32)
    assert hdsp_on > 0, "no payload chose HDSP"
    assert tca_units > 0 and int_units > 0 and decoded_cases > CASES_PER_BATCH // 2
    # Sequences where our bytes leave NNCodec's encoder by design: NNCodec's decoder reads our whole sequence
    # (after leniently coded DQ not its own: its encoder's TCA reference differs from what its decoder
    # rebuilds), and so does ours, with equal states.
    requests = [{"streams": streams, "hdsp": case["hdsp"],
                 "differential": [k > 0 for k, m in enumerate(case["models"]) if m is not None]}
                for case, streams, _ in diverged]
    for (case, streams, states), res in zip(diverged, oracle.call("update", "decode_sequence", requests)):
        assert "error" not in res, f"NNCodec cannot decode our {describe(case)}:\n{res.get('error', '')[-1500:]}"
        receiver = UpdateState(device_id=case["device_id"])
        for k, (data, sender, nnc) in enumerate(zip(streams, states, res["decoded"])):
            got, receiver = decode_update(data, receiver)
            assert receiver == sender, f"states differ after stream {k} of {describe(case)}"
            for name, arr in nnc.items():
                np.testing.assert_array_equal(got[name], arr, err_msg=f"{name!r}, stream {k} of {describe(case)}")


def test_new_and_left_out_tensors_match_nncodec(oracle):
    """A tensor that first appears in the second update, one that an update leaves all-zero and one
    that an update omits from its dict (the last one): same bytes and values as NNCodec, states equal."""
    rng = np.random.default_rng(11)
    g = lambda *s, sd=0.05: rng.normal(0, sd, s).astype(np.float32)  # noqa: E731
    base = {"a": g(12, 10), "b": g(10), "c": g(6, 4)}
    u1 = {"a": g(12, 10, sd=0.01), "b": g(10, sd=0.01), "c": g(6, 4, sd=0.01)}
    u3 = {"a": g(12, 10, sd=0.01), "b": g(10, sd=0.01), "c": g(6, 4, sd=0.01), "d": g(8, 8, sd=0.01)}
    seqs = {
        "new": [base, u1, {"a": g(12, 10, sd=0.01), "b": g(10, sd=0.01), "c": g(6, 4, sd=0.01), "d": g(8, 8)}, u3],
        "zero": [base, u1, {"a": g(12, 10, sd=0.01), "b": np.zeros(10, np.float32), "c": g(6, 4, sd=0.01)}, u3],
        "omitted": [base, u1, {"a": g(12, 10, sd=0.01), "b": g(10, sd=0.01)}, u3],
        "no base": [None, u1, {"a": g(12, 10, sd=0.01), "b": g(10, sd=0.01), "c": g(6, 4, sd=0.01), "d": g(8, 8)}, u3],
    }
    cases = [{"models": m, "kwargs": {"qp": -38, "tca": True, "scan_order": 1}, "hdsp": True, "decode": True,
              "device_id": 2} for m in seqs.values()]
    theirs = oracle.call("update", "sequence", cases)
    for (label, models), case, res in zip(seqs.items(), cases, theirs):
        assert "error" not in res, res.get("error")
        streams, states = encode_sequence(case)
        assert streams == res["streams"], label
        receiver = UpdateState(device_id=2)
        for k, (data, sender, nnc) in enumerate(zip(streams, states, res["decoded"])):
            got, receiver = decode_update(data, receiver)
            assert receiver == sender, (label, k)
            for name, arr in nnc.items():
                np.testing.assert_array_equal(got[name], arr)
            for name in set(got) - set(nnc):
                assert not got[name].any(), (label, k, name)
        last = receiver.tensors
        assert list(last) == ["a", "b", "c", "d"]
        carrying = [k for k, data in enumerate(streams) if "d" in {u.topology_elem_ids[0] for u in ndus(data)}]
        assert len(carrying) == {"new": 2, "zero": 1, "omitted": 1, "no base": 2}[label]
        assert last["d"].depth == len(carrying) and last["d"].parameter_id == 3, label
        first_d = [u for u in ndus(streams[carrying[0]]) if u.topology_elem_ids[0] == "d"]
        assert [(u.temporal_context_modeling_flag, u.put_node_depth) for u in first_d] == [(0, 1)]  # no reference
        if label in ("zero", "omitted"):  # one stream fewer for the left-out tensor
            left = "b" if label == "zero" else "c"
            assert last[left].depth == 3 and left not in {u.topology_elem_ids[0] for u in ndus(streams[2])}
            got, _ = decode_update(streams[2], states[1])
            assert not got[left].any() and got[left].shape == base[left].shape


# ------------------------------------------------------------------------------------------------
# 2. round trips


def _nested_model(rng, shapes, with_int):
    model = {"enc": {"conv": rng.normal(0, 0.05, shapes[0]).astype(np.float32)},
             "head": {"w": rng.normal(0, 0.05, shapes[1]).astype(np.float32),
                      "b": rng.normal(0, 0.05, shapes[1][0]).astype(np.float32)}}
    if with_int:
        model["enc"]["ids"] = rng.integers(-100, 100, shapes[2]).astype(np.int32)
    return model


def _delta(rng, like, masks):
    out = {}
    for group, leaves in like.items():
        out[group] = {}
        for name, leaf in leaves.items():
            kind = rng.choice(["mask", "dense", "zero"], p=[0.6, 0.2, 0.2])
            m = {"mask": masks[group, name], "dense": np.ones(leaf.shape, bool),
                 "zero": np.zeros(leaf.shape, bool)}[kind]
            if leaf.dtype == np.int32:
                out[group][name] = (rng.integers(-4, 5, leaf.shape) * m).astype(np.int32)
            else:
                out[group][name] = (rng.normal(0, 0.02, leaf.shape) * m).astype(np.float32)
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_up=st.integers(1, 4), dq=st.booleans(), tca=st.booleans(),
       hdsp=st.booleans(), scan_order=st.integers(0, 2), row_skipping=st.booleans(), qp=st.integers(-46, -26),
       codebook=st.sampled_from([False, False, True, "always"]), with_int=st.booleans(), device_id=st.integers(0, 9))
def test_round_trip_decodes_the_quantized_differences(seed, n_up, dq, tca, hdsp, scan_order, row_skipping, qp,
                                                      codebook, with_int, device_id):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(2, 12)), int(rng.integers(1, 5)), 3, 3),
              (int(rng.integers(2, 40)), int(rng.integers(2, 40))), (int(rng.integers(1, 30)),)]
    model = _nested_model(rng, shapes, with_int)
    names = list(flatten_named(model))
    masks = {(g, n): rng.random(leaf.shape) < 0.1 for g, leaves in model.items() for n, leaf in leaves.items()}
    zeros_like = {g: {n: np.zeros_like(v) for n, v in leaves.items()} for g, leaves in model.items()}
    kw = dict(qp=qp, dq=dq, scan_order=scan_order, row_skipping=row_skipping, codebook=codebook)
    sender = receiver = UpdateState(device_id=device_id)
    coded_versions = dict.fromkeys(names, 0)
    history: dict[str, np.ndarray] = {}
    for step in range(n_up + 1):
        params = model if step == 0 else _delta(rng, model, masks)
        before_s, before_r = snapshot(sender), snapshot(receiver)
        data, new_sender = encode_update(params, sender, differential=step > 0, tca=tca, hdsp=hdsp, **kw)
        got, new_receiver = decode_update(data, receiver)
        assert new_receiver == new_sender
        assert sender == before_s and receiver == before_r  # the inputs are unchanged
        expected = nncjax.decode(nncjax.encode(params, **kw), raw=True)
        assert list(got) == names
        units = {u.topology_elem_ids[0]: u for u in ndus(data)}
        for index, name in enumerate(names):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name!r} at step {step}")
            is_int = expected[name].dtype == np.int32
            assert got[name].dtype == expected[name].dtype
            if name not in units:  # left out: only an all-zero difference may be
                assert step > 0 and not expected[name].any() and not got[name].any()
                continue
            u = units[name]
            assert (u.put_node_depth, u.device_id, u.parameter_id) == (coded_versions[name] + 1, device_id, index)
            assert u.parent_node_id_present_flag == (step > 0)
            assert u.temporal_context_modeling_flag == (tca and step > 0 and name in sender.tensors)
            assert new_sender.tensors[name].is_int == is_int
            coded_versions[name] += 1
            levels = new_sender.tensors[name].levels
            if not codebook:  # a level is non-zero where the value is
                np.testing.assert_array_equal(levels != 0, got[name].reshape(levels.shape) != 0)
            if step > 0:
                history[name] = history.get(name, 0) | (levels != 0)
        assert {n: h.depth for n, h in new_sender.tensors.items()} == {n: c for n, c in coded_versions.items() if c}
        for name, rec in new_sender.tensors.items():  # HDSP history: levels of update streams only
            if step == 0:
                assert rec.hist is None
            else:  # a tensor an update leaves out gets an empty history
                expected_hist = history.setdefault(name, np.zeros(rec.levels.shape, bool))
                np.testing.assert_array_equal(rec.hist, expected_hist.astype(np.int8))
        # like=: the pytree back, left-out leaves as zeros of the leaf's dtype
        tree, again = decode_update(data, receiver, like=zeros_like)
        assert again == new_sender
        for group, leaves in zeros_like.items():
            assert set(tree[group]) == set(leaves)
            for name, leaf in leaves.items():
                np.testing.assert_array_equal(tree[group][name], got[f"{group}/{name}"])
                assert tree[group][name].dtype == leaf.dtype and tree[group][name].shape == leaf.shape
        sender, receiver = new_sender, new_receiver


def test_like_returns_zeros_for_leaves_no_stream_carried():
    """``like`` may name tensors the state has never seen (a new all-zero tensor): zeros, in its dtype."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 64
    _, sender = encode_update({"w": w}, UpdateState(), differential=False)
    receiver = sender
    update = {"w": np.zeros((3, 4), np.float32), "extra": {"ids": np.zeros(5, np.int32)}}
    data, sender = encode_update(update, sender)
    assert ndus(data) == []
    flat, r1 = decode_update(data, receiver)
    assert set(flat) == {"w"} and not flat["w"].any() and r1 == sender
    tree, r2 = decode_update(data, receiver, like=update)
    assert r2 == sender and not tree["w"].any() and tree["extra"]["ids"].dtype == np.int32
    np.testing.assert_array_equal(tree["extra"]["ids"], np.zeros(5, np.int32))


# ------------------------------------------------------------------------------------------------
# 3. errors, immutability, save / load


@pytest.fixture(scope="module")
def tca_sequence():
    """A base and three TCA + HDSP updates from device 3 (HDSP chosen for ``w`` in update 3)."""
    models = sparse_sequence(seed=5)
    streams, states, hdsp = encode_models(models, device_id=3, tca=True, hdsp=True, qp=-38, row_skipping=False)
    assert hdsp[3]["w"]
    return models, streams, states


def test_out_of_order_decode_names_put_node_depth(tca_sequence):
    _, streams, states = tca_sequence
    _, after_base = decode_update(streams[0], UpdateState(device_id=3))
    with pytest.raises(InputError, match="put_node_depth 3, the state expects 2"):
        decode_update(streams[2], after_base)  # update 1 skipped
    with pytest.raises(InputError, match="put_node_depth"):
        decode_update(streams[1], states[1])  # decoded twice
    with pytest.raises(InputError, match="holds no earlier version"):
        decode_update(streams[1], UpdateState(device_id=3))  # no base


def test_decode_with_another_device_state(tca_sequence):
    _, streams, _ = tca_sequence
    _, other = decode_update(streams[0], UpdateState(device_id=1))
    with pytest.raises(InputError, match="device 3, the state is device 1"):
        decode_update(streams[1], other)


def test_plain_decode_refuses_tca_updates(tca_sequence):
    _, streams, _ = tca_sequence
    with pytest.raises(UnsupportedStreamError, match="decode_update"):
        nncjax.decode(streams[1], raw=True)
    assert set(nncjax.decode(streams[0], raw=True)) == {"w", "b"}  # the base is a plain stream


def test_hdsp_payload_without_history_is_refused(tca_sequence):
    models = sparse_sequence(seed=6, alternate=False)
    streams, states, hdsp = encode_models(models, tca=False, hdsp=True, qp=-38, row_skipping=False)
    assert hdsp[2]["w"], "update 2 should choose HDSP for w"
    _, after_base = decode_update(streams[0], UpdateState())
    # Without TCA, skipping update 1 passes the node checks, but update 2's HDSP needs update 1's history.
    assert after_base.tensors["w"].hist is None
    with pytest.raises(UnsupportedStreamError, match="HDSP"):
        decode_update(streams[2], after_base)
    with pytest.raises(UnsupportedStreamError, match="HDSP.*nncjax.decode_update"):  # no state at all
        nncjax.decode(streams[2])
    # With TCA: a state whose record lost its history (depth and levels right)
    _, tca_streams, tca_states = tca_sequence
    rec = tca_states[2].tensors["w"]
    stripped = UpdateState(3, dict(tca_states[2].tensors) | {"w": TensorHistory(rec.parameter_id, rec.depth,
                                                                               rec.levels, None, rec.is_int)})
    with pytest.raises((UnsupportedStreamError, InputError), match="HDSP|hist"):
        decode_update(tca_streams[3], stripped)
    decode_update(tca_streams[3], tca_states[2])  # the right state decodes it


def test_encode_update_refuses_bad_input():
    w, b = np.ones((4, 6), np.float32), np.zeros(6, np.float32)
    _, state = encode_update({"w": w, "b": b}, UpdateState(), differential=False)
    with pytest.raises(InputError, match="'b' is at position 0, the state's version at 1"):
        encode_update({"b": b, "w": w}, state)
    with pytest.raises(InputError, match=r"'w' has shape \(6, 4\), the state's version \(4, 6\)"):
        encode_update({"w": w.T.copy(), "b": b}, state)
    with pytest.raises(UnsupportedError, match="blocks"):
        encode_update({"w": w, "b": b}, state, blocks={"w": {"bi": "b"}})
    with pytest.raises(UnsupportedError, match="low_rank"):
        encode_update({"w_G": w[:, :2], "w_H": w[:2]}, state, low_rank={"w": (4, 6)})
    with pytest.raises(InputError, match="quality"):
        encode_update({"w": w, "b": b}, state, quality=3)
    for bad in (None, {}, "state", UpdateState):
        with pytest.raises(InputError, match="state must be an UpdateState"):
            encode_update({"w": w, "b": b}, bad)
        with pytest.raises(InputError, match="state must be an UpdateState"):
            decode_update(b"", bad)
    for flag in ("differential", "tca", "hdsp"):
        for bad in (1, "yes", None, np.array([True])):
            with pytest.raises(InputError, match=flag):
                encode_update({"w": w, "b": b}, state, **{flag: bad})
    data, _ = encode_update({"w": w, "b": b}, state, tca=np.bool_(True))  # numpy bools are bools
    assert isinstance(data, bytes)


@pytest.mark.parametrize("device_id", [-1, 2.5, True, "3", None, 2**31])
def test_update_state_refuses_bad_device_ids(device_id):
    with pytest.raises(InputError, match="device_id"):
        UpdateState(device_id=device_id)


def test_update_state_refuses_bad_tensors():
    h = TensorHistory(0, 1, np.zeros((2, 2), np.int32), None, False)
    for bad in ({"w": "levels"}, {0: h}, [("w", h)]):
        with pytest.raises(InputError, match="tensors must map"):
            UpdateState(0, bad)
    assert UpdateState(np.int64(7), {"w": h}).device_id == 7


def test_load_refuses_damaged_files(tmp_path):
    with pytest.raises(InputError, match="not an .npz archive"):
        UpdateState.load(io.BytesIO(b"garbage bytes, not a state"))
    with pytest.raises(InputError, match="no UpdateState file"):
        UpdateState.load(tmp_path / "missing.npz")
    with pytest.raises(InputError, match="no UpdateState file"):
        UpdateState.load(str(tmp_path))  # a folder
    buf = io.BytesIO()
    np.savez(buf, levels0=np.zeros(3, np.int32))
    buf.seek(0)
    with pytest.raises(InputError, match="not an UpdateState file"):
        UpdateState.load(buf)  # no meta
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(b'{"format": "other/1"}', np.uint8))
    buf.seek(0)
    with pytest.raises(InputError, match="format 'other/1'"):
        UpdateState.load(buf)
    _, state = encode_update({"w": np.ones((4, 4), np.float32)}, UpdateState(), differential=False)
    path = tmp_path / "state.npz"
    state.save(path)
    assert UpdateState.load(path) == state and UpdateState.load(str(path)) == state
    raw = path.read_bytes()
    with pytest.raises(InputError, match="not an UpdateState file"):
        UpdateState.load(io.BytesIO(raw[: len(raw) // 2]))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(0, 3), device_id=st.integers(0, 2**31 - 1),
       with_int=st.booleans(), tca=st.booleans())
def test_save_load_round_trip(seed, steps, device_id, with_int, tca):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(2, 6)), 2, 3, 3), (int(rng.integers(2, 20)), int(rng.integers(2, 20))),
              (int(rng.integers(1, 9)),)]
    model = _nested_model(rng, shapes, with_int)
    masks = {(g, n): rng.random(leaf.shape) < 0.3 for g, leaves in model.items() for n, leaf in leaves.items()}
    state = UpdateState(device_id=device_id)
    for step in range(steps + 1):
        params = model if step == 0 else _delta(rng, model, masks)
        _, state = encode_update(params, state, differential=step > 0, tca=tca, qp=-36)
    buf = io.BytesIO()
    state.save(buf)
    buf.seek(0)
    loaded = UpdateState.load(buf)
    assert loaded == state and repr(loaded) == repr(state) and list(loaded.tensors) == list(state.tensors)
    for name, h in loaded.tensors.items():
        assert h.levels.dtype == np.int32 and not h.levels.flags.writeable
        assert (h.hist is None) == (state.tensors[name].hist is None)
        assert h.hist is None or (h.hist.dtype == np.int8 and not h.hist.flags.writeable)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.npz")
        state.save(path)
        assert UpdateState.load(path) == state
    # the loaded state codes the next update exactly as the original does
    nxt = _delta(rng, model, masks)
    assert encode_update(nxt, loaded, tca=tca, qp=-36)[0] == encode_update(nxt, state, tca=tca, qp=-36)[0]
    if state.tensors:  # equality looks at the arrays
        name, h = next(iter(state.tensors.items()))
        changed = TensorHistory(h.parameter_id, h.depth, h.levels + 1, h.hist, h.is_int)
        assert UpdateState(device_id, dict(state.tensors) | {name: changed}) != state


def test_states_are_immutable(tca_sequence):
    models, streams, states = tca_sequence
    state = states[1]
    before = snapshot(state)
    encode_update(models[2], state, tca=True, hdsp=True, qp=-38, row_skipping=False)
    decode_update(streams[2], state)
    assert snapshot(states[2]) == states[2]
    assert state == before
    h = state.tensors["w"]
    with pytest.raises(ValueError):
        h.levels[0, 0] = 5
    with pytest.raises(ValueError):
        h.hist[0, 0] = 1
    with pytest.raises(TypeError):
        state.tensors["w"] = h
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.device_id = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.depth = 9
    levels = np.ones((2, 2), np.int32)
    rec = TensorHistory(0, 1, levels, None, False)
    levels[0, 0] = 7  # the record keeps its own copy
    assert rec.levels[0, 0] == 1 and levels.flags.writeable


# ------------------------------------------------------------------------------------------------
# 4. golden vector

GOLDEN_SHA256 = [  # of sparse_sequence(seed=2024, n_up=3, shape=(24, 40)) as below; NNCodec's bytes
    "1b1d7ee17037d30d068779fc245e8acd1b82919f1f2a0a2ba82f6ba7ff11502f",
    "690cad732f202ef3b7259b882ab642b815d710158442d1e4646a3463a85b5f1a",
    "4a4a4e7b32eefa8c7faad8aeee3e9c77a29db1ebfaffdda04a3f676a86f87e29",
    "acffe543f1ed9f2ea06a23c4ca94cff30bd9be566387a0430478511cca79efd9",
]


def test_golden_vector_equals_nncodec(oracle):
    """A fixed base and three TCA + HDSP updates (HDSP chosen in the third): the streams' SHA-256 are fixed,
    and they are NNCodec's bytes, which our decoder reads as NNCodec's does."""
    models = sparse_sequence(seed=2024, n_up=3, shape=(24, 40))
    streams, states, hdsp = encode_models(models, device_id=1, tca=True, hdsp=True, qp=-38, dq=True, scan_order=1,
                                          row_skipping=False, nonweight_qp=-75)
    assert [hashlib.sha256(s).hexdigest() for s in streams] == GOLDEN_SHA256
    assert hdsp[3] == {"w": True, "b": False}  # b is 1-D: no HDSP flag
    assert [u.temporal_context_modeling_flag for u in ndus(streams[3])] == [1, 1]
    res = oracle.call("update", "sequence", [{"models": models, "kwargs": {"qp": -38, "tca": True, "scan_order": 1},
                                              "hdsp": True, "device_id": 1, "decode": True}])[0]
    assert "error" not in res, res.get("error")
    assert res["streams"] == streams
    receiver = UpdateState(device_id=1)
    for data, sender, nnc in zip(streams, states, res["decoded"]):
        got, receiver = decode_update(data, receiver)
        assert receiver == sender and set(got) == set(nnc)
        for name, arr in nnc.items():
            np.testing.assert_array_equal(got[name], arr)


# ------------------------------------------------------------------------------------------------
# DQ indices that decoders rebuild


@pytest.mark.parametrize("variant", ["row_skip_block_scan", "bitdepth"])
def test_lenient_dq_keeps_states_equal(variant):
    """With row skipping under block scans (or bit-depth clipping) DQ indices are coded that the state
    machine cannot produce and every decoder rebuilds neighbouring ones: the sender's state must keep
    the rebuilt levels, or the next TCA update cannot be decoded (NNCodec's encoder keeps the others and
    its decoder fails on its next stream)."""
    rng = np.random.default_rng(3)
    if variant == "row_skip_block_scan":
        kw = dict(qp=-40, dq=True, scan_order=1, row_skipping=True)
        make = lambda sd: (rng.normal(0, sd, (11, 21)) * (rng.random((11, 1)) < 0.7)).astype(np.float32)  # noqa: E731
    else:
        kw = dict(bitdepth=4, dq=True, row_skipping=False)
        make = lambda sd: (rng.standard_cauchy((20, 24)) * sd).astype(np.float32)  # noqa: E731
    models = [{"w": make(0.05)}] + [{"w": make(0.01)} for _ in range(2)]
    sender = receiver = UpdateState()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # QPAdjustedWarning of the clipped tensors
        for step, m in enumerate(models):
            data, sender = encode_update(m, sender, differential=step > 0, tca=True, **kw)
            _, receiver = decode_update(data, receiver)
            assert receiver == sender, f"states differ after stream {step}"


def test_full_model_re_sent_mid_sequence():
    """A full model (differential=False) after updates: its units are no differences, so the receiver's
    HDSP history must not reach the coder (it refused one); later updates continue from it."""
    models = sparse_sequence(seed=4, n_up=4, alternate=False)
    full = {k: v * 0.5 for k, v in models[0].items()}
    sender = receiver = UpdateState()
    sequence = zip(models[:3] + [full] + models[3:], [False, True, True, False, True, True])
    for step, (m, differential) in enumerate(sequence):
        data, sender = encode_update(m, sender, differential=differential, qp=-38)
        got, receiver = decode_update(data, receiver)
        assert receiver == sender, f"states differ after stream {step}"
        if not differential:
            np.testing.assert_allclose(got["w"], m["w"], atol=2 * nncjax.qp_to_step(-38))
    assert sender.tensors["w"].depth == 6 and sender.tensors["w"].hist is not None
