"""Vocabulary rows a tokenizer can never emit (``nncjax.reduce.vocab``).

A token embedding table holds one row per vocabulary entry, but a WordPiece tokenizer with a
normalizer (lowercasing, accent stripping) and a pre-tokenizer (splitting at whitespace,
punctuation and CJK characters) cannot produce every entry: BERT's ``[unused17]`` is split at its
brackets, ``Paris`` is lowercased before it is looked up, ``##!`` would continue a word with a
character that always starts a new one. Those rows never enter any computation, so setting them to
zero (:func:`nncjax.reduce.zero_rows`) leaves the model's function unchanged on every input and
lets row skipping code them in about one bit each.

Only what can be proven is reported: a token counts as unreachable when normalizing or
pre-tokenizing its text changes it, which no input can undo. Tokens that are reachable in principle
but never chosen by WordPiece's greedy longest match are kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nncjax.errors import InputError

__all__ = ["unreachable_token_ids"]

_PLAIN = "a"  # a word start that every BERT-style normalizer and pre-tokenizer keeps as it is


def _survives(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` comes out of the normalizer and pre-tokenizer as the one pre-token ``text``
    (the normalizer may only add whitespace that the pre-tokenizer removes, as around CJK characters)."""
    norm = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer is not None else text
    if tokenizer.pre_tokenizer is None:
        return norm == text
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(norm)
    return len(pieces) == 1 and pieces[0][0] == text


def unreachable_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids of the vocabulary entries a WordPiece ``tokenizers.Tokenizer`` can never emit.

    An entry ``t`` (not an added/special token, nor the unknown-word token) is unreachable when its
    text cannot survive the tokenizer's own preprocessing: a word-initial ``t`` that the normalizer
    changes or the pre-tokenizer splits, or is longer than ``max_input_chars_per_word``; a continuation
    ``prefix + p`` whose ``p`` the normalizer changes or the pre-tokenizer splits off after a plain
    letter. Normalization is applied character by character and splitting happens at characters,
    so no surrounding text can bring such an entry back.

    Args:
      tokenizer: a Hugging Face ``tokenizers.Tokenizer`` whose model is ``WordPiece``.

    Returns:
      int64 ``(k,)`` sorted ids (rows of the token embedding table).

    Raises:
      InputError: ``tokenizer`` is not a ``tokenizers.Tokenizer`` with a WordPiece model, or the
      plain-letter probe does not survive its preprocessing (an unusual normalizer).

    Example:
      >>> from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
      >>> vocab = {"[UNK]": 0, "[unused0]": 1, "cat": 2, "Cat": 3, "##s": 4, "##!": 5}
      >>> tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
      >>> tok.normalizer = normalizers.BertNormalizer(lowercase=True)
      >>> tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
      >>> unreachable_token_ids(tok).tolist()
      [1, 3, 5]
    """
    model = getattr(tokenizer, "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None)
    if not callable(getattr(tokenizer, "get_vocab", None)) or prefix is None:
        raise InputError("unreachable_token_ids needs a tokenizers.Tokenizer with a WordPiece model")
    if not _survives(tokenizer, _PLAIN + _PLAIN):
        raise InputError(f"the tokenizer's normalizer or pre-tokenizer changes the plain text {_PLAIN + _PLAIN!r}: "
                         "cannot reason about its vocabulary")
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    added = set(tokenizer.get_added_tokens_decoder())
    added.add(vocab.get(getattr(model, "unk_token", None)))  # what WordPiece emits for an unknown word
    max_chars = int(getattr(model, "max_input_chars_per_word", 1 << 30))
    out = []
    for text, i in vocab.items():
        if i in added:
            continue
        if prefix and text.startswith(prefix) and len(text) > len(prefix):
            dead = not _survives(tokenizer, _PLAIN + text[len(prefix):])
        else:
            dead = len(text) > max_chars or not _survives(tokenizer, text)
        if dead:
            out.append(i)
    return np.array(sorted(out), np.int64)
