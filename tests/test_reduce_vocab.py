"""Vocabulary rows a tokenizer never emits, and zeroing rows (``nncjax.reduce.vocab``, ``zero_rows``)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from nncjax.errors import InputError
from nncjax.models import minilm
from nncjax.reduce import unreachable_token_ids, zero_rows

_TOY = ["[PAD]", "[UNK]", "[CLS]", "[unused0]", "a", "b", "ab", "##b", "##a", "Ab", "é", "e", "##é", "!", "##!",
        "##.", "中", "##中", "a!", "##ab"]


def toy_tokenizer():
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(_TOY)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # strips accents too
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(["[PAD]", "[CLS]"])
    return tok


def test_toy_vocabulary_reachability():
    got = {_TOY[i] for i in unreachable_token_ids(toy_tokenizer())}
    assert got == {"[unused0]", "Ab", "é", "##é", "##!", "##.", "##中", "a!"}


_ALPHABET = "abAB éÉ!.,-中文\t'ç1"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=24))
def test_toy_tokenizer_never_emits_an_unreachable_id(text):
    tok = toy_tokenizer()
    dead = set(unreachable_token_ids(tok).tolist())
    assert not dead & set(tok.encode(text).ids)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40) | st.text(alphabet=_ALPHABET + "xyzQ[]#0123456789", max_size=40))
def test_minilm_tokenizer_never_emits_an_unreachable_row(text):
    dead = set(minilm.unreachable_rows()["params/word_embeddings/embedding"].tolist())
    assert len(dead) > 994  # at least BERT's [unused*] rows
    assert not dead & set(minilm.tokenize([text])["input_ids"][0].tolist())


def test_zeroing_unreachable_rows_keeps_minilm_embeddings_exactly():
    m = minilm.load()
    rows = minilm.unreachable_rows()
    pruned = zero_rows(m.params, rows)
    w = np.asarray(pruned["params"]["word_embeddings"]["embedding"])
    assert not w[rows["params/word_embeddings/embedding"]].any() and w.any(axis=1).sum() == w.shape[0] - len(
        rows["params/word_embeddings/embedding"])
    texts = ["A Café in Zürich!", "[unused3] 中文 text, with punctuation: (yes)", "x"]
    np.testing.assert_array_equal(minilm.encode(pruned, texts), minilm.encode(m.params, texts))


def test_zero_rows_values_and_errors():
    p = {"e": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
    out = zero_rows(p, {"e": np.array([1])})
    assert out["e"].tolist() == [[0.0, 1.0], [0.0, 0.0], [4.0, 5.0]] and out["b"].tolist() == [1.0, 1.0]
    assert zero_rows(p, {"e": [0]}, axis=1)["e"].tolist() == [[0.0, 1.0], [0.0, 3.0], [0.0, 5.0]]
    with pytest.raises(InputError, match="no tensor"):
        zero_rows(p, {"x": [0]})
    with pytest.raises(InputError, match="indices"):
        zero_rows(p, {"e": [3]})
    with pytest.raises(InputError, match="indices"):
        zero_rows(p, {"e": [0.5]})
    with pytest.raises(InputError, match="axis"):
        zero_rows(p, {"b": [0]}, axis=1)


def test_unreachable_token_ids_rejects_other_tokenizers():
    with pytest.raises(InputError, match="WordPiece"):
        unreachable_token_ids(object())
    bpe = Tokenizer(models.BPE({"a": 0}, []))
    with pytest.raises(InputError, match="WordPiece"):
        unreachable_token_ids(bpe)
