"""nncjax.models: offline loaders, original-name round trips, and quality metrics on small subsets.

The comparison of the Flax forward passes against the original torch implementations lives in
tests/test_models_reference.py.
"""

from __future__ import annotations

import functools
import io
import pickle
import zipfile

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncjax import InputError, models
from nncjax.models import crepe, digits_mlp, fashion_cnn, minilm, wordnet
from nncjax.models.base import flatten_paths
from nncjax.models.torch_zip import load_state_dict


def _noisy(params, scale, seed=0):
    """Every leaf plus Gaussian noise of ``scale`` times the leaf's own standard deviation."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (a + scale * (np.std(a) + 1e-3) * rng.standard_normal(a.shape)).astype(np.float32), params
    )


def test_registry_names_and_unknown():
    assert set(models.names()) == {"minilm", "crepe", "fashion_cnn", "digits_mlp"}
    with pytest.raises(InputError):
        models.get("resnet")
    assert models.get("crepe") is models.get("crepe")  # cached


@pytest.mark.parametrize("name", ["minilm", "crepe", "fashion_cnn", "digits_mlp"])
def test_original_names_round_trip(name):
    m = models.get(name)
    flat = flatten_paths(m.params)
    assert set(m.name_map) == set(flat)
    assert len(set(m.name_map.values())) == len(m.name_map)  # one original tensor per Flax leaf
    original = m.to_original(m.params)
    assert set(original) == set(m.name_map.values())
    back = flatten_paths(m.from_original(original))
    assert all(np.array_equal(back[p], flat[p]) for p in flat)
    assert all(not a.flags.writeable for a in flat.values())  # the cached weights are read-only


def test_minilm_matches_shipped_file_layout():
    from safetensors.numpy import load_file

    shipped = load_file(str(minilm.model_dir() / "model.safetensors"))
    original = models.get("minilm").to_original(models.get("minilm").params)
    assert set(shipped) - set(original) == set(minilm.UNUSED_ORIGINAL)
    assert all(np.array_equal(original[k], shipped[k]) for k in original)
    assert models.get("minilm").num_params == 22_565_376  # 22.7 M minus the unused pooler


def test_crepe_matches_shipped_file_layout():
    shipped = load_state_dict(crepe.weights_path())
    assert len(shipped) == 44
    original = models.get("crepe").to_original(models.get("crepe").params)
    assert set(shipped) - set(original) == set(crepe.UNUSED_ORIGINAL)
    assert all(np.array_equal(original[k], shipped[k]) for k in original)


@pytest.mark.parametrize("name", ["minilm", "crepe", "fashion_cnn", "digits_mlp"])
def test_from_original_rejects_bad_tensors(name):
    m = models.get(name)
    original = m.to_original(m.params)
    first = min(original)
    with pytest.raises(InputError):
        m.from_original({k: v for k, v in original.items() if k != first})
    with pytest.raises(InputError):
        m.from_original({**original, "extra.weight": np.zeros(3)})
    for tensor_name in original:  # every tensor's shape is checked, whatever its layout conversion
        with pytest.raises(InputError):
            m.from_original({**original, tensor_name: np.zeros((7, 7, 1, 1))})


def test_torch_style_names_of_flax_models():
    original = models.get("fashion_cnn").to_original(models.get("fashion_cnn").params)
    assert original["conv2.weight"].shape == (64, 32, 3, 3)  # torch Conv2d layout (out, in, kh, kw)
    assert original["fc1.weight"].shape == (256, 1152)  # torch Linear layout (out, in)
    assert {"bn4.weight", "bn4.bias", "bn4.running_mean", "bn4.running_var", "fc2.bias"} <= set(original)
    assert set(models.get("digits_mlp").to_original(models.get("digits_mlp").params)) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }


def test_fashion_cnn_rejects_corrupt_weights(tmp_path):
    for payload in (b"\xc1garbage", b"\x01"):
        (tmp_path / "w.msgpack").write_bytes(payload)
        with pytest.raises(InputError):
            fashion_cnn.load(tmp_path / "w.msgpack")
    with pytest.raises(InputError):
        fashion_cnn.load(tmp_path / "missing.msgpack")


def _zip_with_pickle(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
    return buf.getvalue()


def test_torch_zip_reader_refuses_foreign_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(_zip_with_pickle(pickle.dumps(Evil(), protocol=2)))
    with pytest.raises(InputError, match="unsupported pickled object"):
        load_state_dict(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(InputError):
        load_state_dict(path)


@functools.lru_cache(maxsize=1)
def _crepe_zip_entries() -> dict[str, bytes]:
    with zipfile.ZipFile(crepe.weights_path()) as z:
        return {n: z.read(n) for n in z.namelist()}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_torch_zip_reader_on_corrupt_pickles(tmp_path_factory, data):
    """A pickle with flipped, deleted or truncated bytes (re-zipped with valid CRCs) is either read
    or refused with InputError; nothing else escapes."""
    entries = dict(_crepe_zip_entries())
    pkl_name = next(n for n in entries if n.endswith("/data.pkl"))
    pkl = bytearray(entries[pkl_name])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(pkl) - 1))
        kind = data.draw(st.sampled_from(["flip", "delete", "truncate"]))
        if kind == "flip":
            pkl[i] ^= data.draw(st.integers(1, 255))
        elif kind == "delete":
            del pkl[i]
        else:
            del pkl[i:]
        if not pkl:
            break
    entries[pkl_name] = bytes(pkl)
    path = tmp_path_factory.mktemp("fuzz") / "t.pth"
    with zipfile.ZipFile(path, "w") as z:
        for name, payload in entries.items():
            z.writestr(name, payload)
    try:
        state = load_state_dict(path)
    except InputError:
        return
    assert all(isinstance(v, np.ndarray) for v in state.values())


def test_subset_and_eval_argument_errors():
    m = models.get("digits_mlp")
    with pytest.raises(InputError):
        m.eval(subset=0)
    with pytest.raises(InputError):
        m.eval(subset="all")
    with pytest.raises(InputError):
        m.eval("full")  # subset passed where params go


def test_digits_mlp_trains_and_evaluates():
    m = models.get("digits_mlp")
    assert m.eval(subset="full")["top1"] > 0.95
    x, y = digits_mlp.load_digits_split("train")
    assert float(digits_mlp.loss(m.params, x, y)) < 0.1
    assert m.eval(_noisy(m.params, 3.0))["top1"] < 0.9


def test_fashion_cnn_top1():
    m = models.get("fashion_cnn")
    assert 390_000 < m.num_params < 400_000
    metrics = m.eval(subset="ci")
    assert metrics["n"] == 1000 and metrics["top1"] > 0.85
    assert m.eval(_noisy(m.params, 2.0), subset=200)["top1"] < 0.6


def test_fashion_cnn_train_step_fine_tunes():
    import optax

    m = models.get("fashion_cnn")
    x, y = fashion_cnn.load_fashion_mnist("train")
    tx = optax.sgd(0.05)
    step = fashion_cnn.make_train_step(tx)
    variables, opt_state = m.params, tx.init(m.params["params"])
    losses = []
    for _ in range(4):  # the same batch four times: its loss must fall
        variables, opt_state, loss = step(variables, opt_state, x[:64], y[:64])
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    moved = flatten_paths(variables)
    assert not np.array_equal(moved["batch_stats/bn1/mean"], flatten_paths(m.params)["batch_stats/bn1/mean"])


def test_report_command(capsys, monkeypatch):
    from nncjax.models.__main__ import main

    monkeypatch.setattr("sys.argv", ["nncjax.models", "--subset", "20", "crepe"])
    main()
    line = capsys.readouterr().out
    assert line.startswith("crepe") and "within_50c 1" in line and "487,096 params" in line


def test_fashion_mnist_data_shapes():
    x, y = fashion_cnn.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    with pytest.raises(InputError):
        fashion_cnn.load_fashion_mnist("valid")


def test_crepe_pitch_metrics():
    m = models.get("crepe")
    metrics = m.eval(subset="ci")  # compared with itself: exact agreement
    assert metrics["n"] == 50 and metrics["within_50c"] > 0.95 and metrics["median_cents"] < 10
    assert metrics["bins_mae"] == 0.0 and metrics["argmax_agree"] == 1.0 and metrics["cents_to_ref"] == 0.0
    noisy = m.eval(_noisy(m.params, 1.0), subset="ci")
    assert noisy["bins_mae"] > 0.01 and noisy["argmax_agree"] < 0.9 and noisy["within_50c"] < metrics["within_50c"]
    assert noisy["cents_to_ref"] > 50.0
    slight = m.eval(_noisy(m.params, 0.01), subset="ci")  # an argmax flips; the decoded pitch hardly moves
    assert slight["argmax_agree"] < 1.0 and 0.0 < slight["cents_to_ref"] < 1.0
    assert crepe.evaluate(m.params, 10) == crepe.pitch_metrics(crepe.pitch_outputs(m.params, "ci")[:10])


def test_crepe_cents_mapping():
    # Bin 0 is 1997.38 cents above 10 Hz (31.7 Hz); a one-hot activation decodes to its bin's cents.
    assert crepe.bins_to_cents(np.array([0.0]))[0] == pytest.approx(1997.3794084376191)
    act = np.zeros((3, 360), np.float32)
    act[[0, 1, 2], [0, 100, 359]] = 1.0
    np.testing.assert_allclose(crepe.decode_cents(act), crepe.bins_to_cents(np.array([0, 100, 359])))
    frames, f0 = crepe.harmonic_tones(4)
    assert frames.shape == (4, 1024) and np.all((f0 >= 40) & (f0 <= 1500))


def test_wordnet_task_is_fixed_and_unambiguous():
    glosses, lemmas = wordnet.reverse_dictionary_task()
    assert len(glosses) == len(lemmas) == 1000
    assert len(set(lemmas)) == 1000 and all(lemma.isalpha() and lemma.islower() for lemma in lemmas)
    assert wordnet.reverse_dictionary_task(10) == (glosses[:10], lemmas[:10])


def test_minilm_reverse_dictionary():
    m = models.get("minilm")
    emb = minilm.embeddings(m.params, "ci")
    assert emb.shape == (400, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    metrics = minilm.reverse_dictionary_metrics(emb, reference=emb)
    assert metrics["n"] == 200 and metrics["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    # Measured with the shipped weights on this subset: top1 0.58, MRR 0.63 (chance: MRR ~0.03).
    assert metrics["mrr"] > 0.58 and metrics["top1"] > 0.5 and metrics["top10"] > metrics["top1"]
    small = minilm.reverse_dictionary_metrics(emb[np.r_[0:20, 200:220]])
    noisy = m.eval(_noisy(m.params, 1.0), subset=20)  # compared with the shipped weights' embeddings
    assert noisy["mean_cosine"] < 0.9 and noisy["mrr"] < small["mrr"]


def test_reverse_dictionary_metrics_ranks():
    # Gloss i is closest to lemma (i - 1) % 3 and second closest to lemma i: every right answer ranks 2nd.
    lemmas = np.eye(3, dtype=np.float32)
    glosses = np.roll(lemmas, 1, axis=0) * 0.9 + lemmas * 0.1
    metrics = minilm.reverse_dictionary_metrics(np.concatenate([glosses, lemmas]))
    assert metrics["top1"] == 0.0 and metrics["top10"] == 1.0 and metrics["mrr"] == pytest.approx(0.5)


def test_eval_checks_subset_and_params_before_the_cache():
    m = models.get("digits_mlp")
    m.eval(subset=20)
    with pytest.raises(InputError, match="subset"):
        m.eval(subset=20.0)  # == 20: answered from the cache of the shipped outputs
    with pytest.raises(InputError, match="subset"):
        m.eval(subset=[1, 2])  # unhashable
    with pytest.raises(InputError, match="shape"):
        m.eval(jax.tree_util.tree_map(lambda a: a[..., None], m.params), subset=20)  # a raw Flax error
    with pytest.raises(InputError, match="missing"):
        m.eval({}, subset=20)
    with pytest.raises(InputError, match="NaN"):
        m.eval(jax.tree_util.tree_map(lambda a: a * np.nan, m.params), subset=20)  # garbage metrics
    with pytest.raises(InputError, match="unknown model"):
        models.get(["crepe"])  # unhashable


@pytest.mark.parametrize("argv, message", [(["--subset", "²", "digits_mlp"], "subset"),  # raw ValueError
                                           (["--subset", "0", "digits_mlp"], "subset"),
                                           (["nope"], "unknown model")])
def test_report_command_usage_errors(argv, message, monkeypatch, capsys):
    from nncjax.models.__main__ import main

    monkeypatch.setattr("sys.argv", ["nncjax.models", *argv])
    with pytest.raises(SystemExit) as e:  # argparse's usage error, not a traceback
        main()
    assert e.value.code == 2 and message in capsys.readouterr().err
