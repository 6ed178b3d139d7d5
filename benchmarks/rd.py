"""Rate-distortion curves of real models: NNCodec vs nncjax (reference, BNF+IOQ+LSA, gradient RD).

Per model, four methods, each point measured for real (bitstream bytes -> decode -> task metric):

* ``nncodec``: NNCodec 2.1.3's ``nncodec.nn.encode`` with its defaults (DQ, qp_density 2,
  nonweight QP -75) over a global QP sweep, via the test oracle, on the model's original (PyTorch)
  tensor names and layouts; decoded with NNCodec.
* ``nncjax-ref``: :func:`nncjax.encode` with the same settings on the same tensors; the bytes must be
  identical to NNCodec's (asserted, column ``bytes_equal``).
* ``nncjax-ioq``: :func:`nncjax.pipeline.optimize_ioq` (BN folding + IOQ + LSA) at a few λ.
* ``nncjax-grad``: :func:`nncjax.optimize.optimize` (gradient RD of QPs and local scales) at the same λ.
* ``nncjax-sens``: :func:`nncjax.optimize.optimize` with ``init="sensitivity", steps=0``: the
  closed-form allocation from Gauss-Newton sensitivities (per-tensor QPs, per-row scales), calibrated
  against the real codec, no training steps; its own λ list (``sens_lams``).
* ``nncjax-sens-bnf``: :func:`nncjax.pipeline.optimize_ioq` with ``allocation="sensitivity"``: IOQ's
  pipeline (BN folding, LSA, same settings) with that allocation in place of IOQ's search
  (``sens_bnf_lams``; on CREPE, whose batch norms follow ReLUs, nothing folds: the allocation, then LSA).
* ``nncjax-sens-gptq``: ``nncjax-sens`` at ``qp_density=3`` (finer QPs, the same steps and
  non-weight precision as the others), followed by :func:`nncjax.with_error_feedback`: each
  ``Dense`` and ``Conv`` kernel switches from DQ to GPTQ (uniform) at the coarsest QP whose
  layer-output error stays within DQ's, checked on inputs GPTQ was not fitted to; for models with such layers
  (``gptq_lams``; the wall time includes collecting the input moments, of every ``patch_stride``-th
  convolution patch). MiniLM's word embedding is
  prepared first (``minilm_lookup``, inside the wall time): the rows its tokenizer can never emit are
  zeroed (exact) and every row's step follows its token's use in the WordNet glosses and lemmas of
  every synset the evaluation does not use (``calibration_texts``), each occurrence weighted by the
  inverse square of its text's length (``optimize(row_usage=)``).
* ``nncjax-sens-gptq-tab``: ``nncjax-sens-gptq`` whose GPTQ step also codes the model's lookup
  tables (``tables``: MiniLM's word embedding), fitted to and checked on their output-side row moments
  (:func:`nncjax.sensitivity.row_moments` at the allocation's row scales, on batches from
  ``table_calib``, inside the wall time); for models with such tables (``gptq_lams``). With
  ``gptq_dq="auto"`` (MiniLM) each of these tensors takes GPTQ on the DQ trellis where the real
  coder codes that in fewer bits.
* ``nncjax-sens-bnf-gptq``: ``nncjax-sens-bnf`` with the same GPTQ step before LSA
  (``optimize_ioq(..., moments=)``; ``bnf_gptq_lams``).
* ``nncjax-sens-gptq-ft``: ``nncjax-sens-gptq-tab`` (``nncjax-sens-gptq`` for models without lookup
  tables; the tables stay on the uniform grid) followed by :func:`nncjax.fine_tuning.with_fine_tuning`:
  the uniform GPTQ levels are moved on their grid (QPs and scales kept) to lower the whole model's output
  distortion to the float model, on data disjoint from the evaluation (``ft_data``: other
  training images; ``calibration_texts``' glosses and single-word lemmas) for ``ft_steps`` steps with
  ``ft_method`` (``ft_lams``).
* ``nncjax-sens-bc``: ``nncjax-sens`` followed by :func:`nncjax.bias_correction.with_bias_correction`
  on the tuning batches: each layer's mean output shift goes into its bias or the running mean of the
  batch norm it feeds (``bc_lams``; for models whose layers see inputs with large means, e.g. after
  ReLUs).

Gradient RD "reaches IOQ's point" when one of its points (any of the variants) has no more bytes and no
worse quality (every metric of the model's transparency test) than the IOQ point; the summary reports
the fastest such point and the wall-time ratio.

λ prices one bit per weight in units of D, the relative output MSE on the tuning set (both methods
minimise the same ``D + λ R_bits / n_weights``). Tuning data never overlaps the evaluation data:
Fashion-MNIST tunes on training images and evaluates on the test set; MiniLM tunes on WordNet *verb*
glosses and evaluates on the noun reverse-dictionary task; CREPE tunes, calibrates and fine-tunes on
harmonic tones of other seeds than the evaluation's 500.

Transparent quality (``QUALITY``; issue 5 for the first two): Fashion-MNIST top-1 drop <= 0.1 points;
MiniLM MRR drop <= 0.005 and mean embedding cosine to the original >= 0.999; CREPE at most one more
frame of 500 off by over 50 cents and decoded pitches within 1 cent of the float model's on average
(on the evaluation subset). CREPE is the held-out model: its optimiser settings are Fashion-MNIST's
(fine-tuning: 100 steps instead of 300, for time) and only its λ ranges were placed around the
threshold.

Outputs: ``benchmarks/results/rd_<model>.csv``, ``rd_<model>.png`` and ``RD.md`` (summary tables).

Usage: python benchmarks/rd.py [--models fashion_cnn minilm crepe] [--quick] [--subset N]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nncjax import models
from nncjax.bias_correction import with_bias_correction
from nncjax.codec import QPAdjustedWarning, decode, encode
from nncjax.error_feedback import with_error_feedback
from nncjax.fine_tuning import with_fine_tuning
from nncjax.optimize import optimize
from nncjax.pipeline import optimize_ioq
from nncjax.quantize.gptq import input_moments
from nncjax.rd_settings import LS_SUFFIX, verify
from nncjax.sensitivity import row_moments

OUT = ROOT / "benchmarks" / "results"
FIELDS = ["model", "method", "setting", "bytes", "top1", "mrr", "mean_cosine", "argmax_agree", "within_50c",
          "cents_to_ref", "transparent", "opt_wall_s", "encode_s", "bytes_equal", "note"]
METRICS = FIELDS[4:10]
# Transparent quality per model: (metric, kind, bound); "drop": at most bound below float32's value,
# "min" / "max": an absolute bound. CREPE's task metric saturates (every frame within 50 cents down
# to a few percent of the float size), so its pitches must also stay within a cent of the float model's.
QUALITY = {"fashion_cnn": (("top1", "drop", 0.001),),
           "minilm": (("mrr", "drop", 0.005), ("mean_cosine", "min", 0.999)),
           "crepe": (("within_50c", "drop", 0.002), ("cents_to_ref", "max", 1.0))}
FORMATS = {"mean_cosine": ".5f", "cents_to_ref": ".3f"}  # summary table columns (default .4f)
LABELS = {"top1": "top-1", "mrr": "mrr", "mean_cosine": "mean cosine", "within_50c": "within 50 cents",
          "cents_to_ref": "pitch difference to float32 [cents]", "argmax_agree": "argmax agreement"}


METHODS = ("nncodec", "ioq", "grad", "sens", "sens-bnf", "sens-gptq", "sens-gptq-tab", "sens-bnf-gptq", "sens-bc",
           "sens-gptq-ft")  # what --methods selects
GRADIENT_METHODS = ("nncjax-grad", "nncjax-sens", "nncjax-sens-bnf", "nncjax-sens-gptq",
                    "nncjax-sens-gptq-tab", "nncjax-sens-bnf-gptq", "nncjax-sens-bc",
                    "nncjax-sens-gptq-ft")  # compared against IOQ's points


@dataclasses.dataclass
class Config:
    name: str
    subset: object  # evaluation subset for every point
    qps: list  # NNCodec global QP sweep
    lams: list  # λ of the optimised methods
    base_qp: int
    tune: object  # tuning batches
    ioq_kwargs: dict
    grad_steps: int
    sens_lams: list  # λ of the sensitivity allocation (steps=0)
    sens_bnf_lams: list  # λ of the pipeline with the sensitivity allocation (models with batch norm)
    gptq_lams: list = dataclasses.field(default_factory=list)  # λ of sens + GPTQ (Dense / Conv kernels)
    bnf_gptq_lams: list = dataclasses.field(default_factory=list)  # λ of the sensitivity pipeline + GPTQ
    bc_lams: list = dataclasses.field(default_factory=list)  # λ of sens + bias correction
    calib: tuple = ()  # (fit batches, check batches, mask) for the kernels' input moments
    patch_stride: int = 1  # input_moments keeps every patch_stride-th conv patch
    tables: tuple = ()  # lookup tables GPTQ also codes, with their output-side row moments (row_moments)
    table_calib: object = None  # () -> (fit batches, check batches) of those row moments
    tab_lams: list = dataclasses.field(default_factory=list)  # λ of sens-gptq-tab (default: gptq_lams)
    gptq_dq: object = False  # with_error_feedback's dq= for sens-gptq-tab and sens-gptq-ft (their tables
    # stay uniform in sens-gptq-ft: fine-tuning moves levels on the uniform grid only)
    lookup: object = None  # params -> (params, optimize kwargs): lookup-table preparation of sens-gptq
    ft_lams: list = dataclasses.field(default_factory=list)  # λ of sens + GPTQ + fine-tuning on the grid
    ft_data: object = None  # () -> list of batches the levels are fine-tuned on
    ft_steps: int = 0  # steps of that fine-tuning
    ft_method: str = "search"  # its method (with_fine_tuning's)


def fashion_config(quick: bool, subset) -> Config:
    from nncjax.models.fashion_cnn import load_fashion_mnist
    x = load_fashion_mnist("train")[0]
    tune = [jnp.asarray(x[i:i + 64]) for i in range(0, 256, 64)]
    pairs = [(("conv1",), ("bn1",)), (("conv2",), ("bn2",)), (("conv3",), ("bn3",)), (("fc1",), ("bn4",))]
    return Config("fashion_cnn", subset or "full",
                  [-30, -24] if quick else [-32, -30, -28, -27, -26, -25, -24, -22, -20],
                  [3e-3] if quick else [3e-3, 1e-2, 3e-2],
                  -28, tune, {"bn_pairs": pairs, "lsa_steps": 20 if quick else 150, "rounds": 1 if quick else 2,
                                  "ls_qp": -44}, 30 if quick else 100,
                  [1e-2] if quick else [1e-3, 2e-3, 3e-3, 1e-2, 3e-2], [3e-2] if quick else [1e-2, 3e-2, 1e-1],
                  gptq_lams=[3e-3] if quick else [1e-3, 2e-3, 3e-3, 1e-2],
                  bnf_gptq_lams=[3e-3] if quick else [1e-3, 3e-3, 1e-2],
                  bc_lams=[3e-3] if quick else [2e-3, 3e-3, 1e-2, 3e-2],
                  # GPTQ's input moments: other training images, one half fitted, the other checked
                  calib=([jnp.asarray(x[1000:3000])], [jnp.asarray(x[3000:5000])], None),
                  patch_stride=8,  # the conv layers see 196 and 49 patches per image
                  ft_lams=[3e-3] if quick else [2e-3, 3e-3, 1e-2],
                  # other training images again, 128 a batch
                  ft_data=lambda: [jnp.asarray(x[i:i + 128]) for i in range(5000, 5000 + 128 * 150, 128)],
                  ft_steps=20 if quick else 300)


def crepe_config(quick: bool, subset) -> Config:
    """CREPE tiny, the held-out model: the optimisers' settings are Fashion-MNIST's (batch norm follows
    the ReLU here, so nothing folds), the λ ranges straddle the transparency threshold, and every
    tone comes from another seed than the evaluation's."""
    from nncjax.models.crepe import SEED, harmonic_tones

    def tones(seed: int, n: int, batch: int) -> list:
        assert seed != SEED, "calibration tones must not be the evaluation's"
        frames = harmonic_tones(n, seed)[0]
        return [jnp.asarray(frames[i:i + batch]) for i in range(0, n, batch)]

    return Config("crepe", subset or "full",
                  [-20, -14] if quick else [-24, -20, -18, -16, -15, -14, -13, -12, -10],
                  [1e-3] if quick else [1e-3, 3e-3, 1e-2],
                  -14, tones(1, 256, 64), {"bn_pairs": None, "lsa_steps": 20 if quick else 150,
                                           "rounds": 1 if quick else 2, "ls_qp": -44}, 30 if quick else 100,
                  [1e-3] if quick else [3e-4, 5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3],
                  [2e-3] if quick else [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],  # sens-bnf: nothing folds, LSA does
                  gptq_lams=[2e-3] if quick else [5e-4, 7e-4, 1e-3, 2e-3],
                  bnf_gptq_lams=[1e-3] if quick else [5e-4, 1e-3, 2e-3],
                  bc_lams=[1e-3] if quick else [5e-4, 7e-4, 1e-3, 1.5e-3],
                  # GPTQ's input moments: tones of two more seeds, one fitted, the other checked
                  calib=(tones(2, 1024, 256), tones(3, 1024, 256), None),
                  patch_stride=8,
                  ft_lams=[2e-3] if quick else [3e-3, 5e-3, 1e-2],
                  ft_data=lambda: tones(4, 128 * 100, 128),
                  ft_steps=20 if quick else 100)  # a third of Fashion-MNIST's: about 1.6 s a step on the CPU


def wordnet_glosses(pos: str) -> list[str]:
    """The glosses of WordNet's ``data.<pos>`` file, in file order."""
    from nncjax.models.wordnet import WORDNET_DIR
    return [line.partition(" | ")[2].strip() for line in (WORDNET_DIR / f"data.{pos}").read_text().splitlines()
            if line and not line.startswith(" ") and " | " in line]


def wordnet_lemmas(pos: str) -> list[str]:
    """The single-word (letters only) lemmas of WordNet's ``index.<pos>`` file, in file order."""
    from nncjax.models.wordnet import WORDNET_DIR
    words = (line.split()[0] for line in (WORDNET_DIR / f"index.{pos}").read_text().splitlines()
             if line and not line.startswith(" "))
    return [w for w in words if w.isalpha() and w.isascii() and w.islower()]


def calibration_texts() -> tuple[list[str], list[str]]:
    """``(glosses, lemmas)`` of every WordNet synset (nouns, verbs, adjectives, adverbs) but the 1000
    noun synsets the reverse-dictionary task evaluates: MiniLM's calibration texts (token usage,
    the word embedding's row moments, fine-tuning), disjoint from the evaluation, as a training
    split is from a test split."""
    from nncjax.models.wordnet import reverse_dictionary_task
    held_glosses, held_lemmas = (set(t) for t in reverse_dictionary_task())
    pos = ("noun", "verb", "adj", "adv")
    return ([g for p in pos for g in wordnet_glosses(p) if g not in held_glosses],
            [w for p in pos for w in wordnet_lemmas(p) if w not in held_lemmas])


def minilm_ft_batches(n: int) -> list[dict]:
    """``n`` batches of :func:`calibration_texts` for fine-tuning on the grid, alternating 32 glosses
    (at most 32 tokens) and 64 single-word lemmas (at most 8 tokens): the two kinds of text the
    evaluation embeds."""
    from nncjax.models.minilm import tokenize
    rng = np.random.default_rng(1)
    glosses, lemmas = ([t[i] for i in rng.permutation(len(t))] for t in calibration_texts())
    out = []
    for i in range(n):
        texts, size, length = (glosses, 32, 32) if i % 2 == 0 else (lemmas, 64, 8)
        start = (i // 2 * size) % (len(texts) - size)
        out.append({k: jnp.asarray(v) for k, v in tokenize(texts[start:start + size], length=length).items()})
    return out


def minilm_lookup(params) -> tuple:
    """The word-embedding preparation of ``nncjax-sens-gptq``: zero the rows the tokenizer never emits
    (exact: no embedding changes) and weigh each token by its use in the glosses and single-word
    lemmas of :func:`calibration_texts` (disjoint from the evaluation, which embeds both kinds of
    text) as the allocation's ``row_usage``. An occurrence in a text of ``L`` tokens counts
    ``1 / L**2``: the model mean-pools its ``L`` token outputs, so an error in one token reaches the
    embedding at ``1 / L`` and its squared error at ``1 / L**2`` (a one-word lemma's tokens weigh
    far more than a long gloss's)."""
    from nncjax.models.minilm import tokenize, unreachable_rows
    from nncjax.pytree_names import flatten_named
    from nncjax.reduce import zero_rows
    rows = unreachable_rows()
    (name, dead), = rows.items()
    texts = [t for part in calibration_texts() for t in part]
    usage = np.zeros(np.shape(flatten_named(params)[name])[0])
    for i in range(0, len(texts), 1024):
        t = tokenize(texts[i:i + 1024], length=128)
        used = t["attention_mask"] > 0
        weight = np.broadcast_to(1.0 / np.square(used.sum(1, keepdims=True)), used.shape)
        usage += np.bincount(t["input_ids"][used], weights=weight[used], minlength=len(usage))
    usage[dead] = 0
    return zero_rows(params, rows), {"row_usage": {name: usage}}


def split_batches(batches: list, fraction: float) -> tuple[list, list]:
    """The first ``fraction`` of ``batches`` (fitted) and the rest (checked)."""
    k = round(len(batches) * fraction)
    return batches[:k], batches[k:]


def length_batches(texts: list[str], n: int, length: int = 32) -> list[dict]:
    """``texts`` tokenized to at most ``length`` tokens as ``n`` batches of similar lengths, each cut
    to its longest text: the same tokens as one padded batch, with little padding to run."""
    from nncjax.models.minilm import tokenize
    t = tokenize(texts, length=length)
    used = t["attention_mask"].sum(1)
    return [{k: jnp.asarray(v[idx, :int(used[idx].max())]) for k, v in t.items()}
            for idx in np.array_split(np.argsort(used, kind="stable"), n)]


def minilm_config(quick: bool, subset) -> Config:
    from nncjax.models.minilm import tokenize
    glosses = wordnet_glosses("verb")
    rng = np.random.default_rng(0)
    texts = [glosses[i] for i in rng.choice(len(glosses), 48, replace=False)]
    tune = {k: jnp.asarray(v) for k, v in tokenize(texts, length=32).items()}  # one batch, truncated
    # GPTQ's input moments: other verb glosses, one half fitted, the other checked
    rest = [glosses[i] for i in rng.choice(len(glosses), 256 if quick else 1024, replace=False)]
    half = len(rest) // 2
    fit, check = (length_batches(part, 2) for part in (rest[:half], rest[half:]))
    return Config("minilm", subset or (200 if quick else "full"),
                  [-40, -34] if quick else [-42, -40, -38, -36],
                  [1e-3] if quick else [1e-3, 2e-3, 4e-3],
                  -38, tune, {"bn_pairs": None, "lsa_steps": 10 if quick else 40, "rounds": 1,
                                  "offsets": (-4, -2, 2, 4), "ls_qp": -44}, 20 if quick else 60,
                  [1e-3] if quick else [5e-4, 7e-4, 8.5e-4, 1e-3], [],
                  gptq_lams=[8e-4] if quick else [6e-4, 7e-4, 8e-4, 9e-4],
                  calib=(fit, check, lambda b: b["attention_mask"] > 0),
                  lookup=minilm_lookup,
                  # the word embedding too, with what its rows' errors cost after LayerNorm and the
                  # layers: calibration texts again, 64 batches fitted, 32 others checked
                  tables=("params/word_embeddings/embedding",),
                  table_calib=lambda: split_batches(minilm_ft_batches(24 if quick else 96), 2 / 3),
                  # GPTQ on the DQ trellis where the real coder finds it cheaper (most kernels)
                  gptq_dq="auto",
                  tab_lams=[8e-4] if quick else [7e-4, 8e-4, 9e-4, 1e-3],
                  ft_lams=[1e-3] if quick else [9e-4, 1e-3, 1.1e-3, 1.2e-3],
                  ft_data=lambda: minilm_ft_batches(16 if quick else 600),
                  ft_steps=10 if quick else 600,
                  # many small noisy batches at fine steps: on held-out non-noun texts, Adam's
                  # straight-through training lowered 1 - cosine by about twice what the search did
                  ft_method="ste")


CONFIGS = {"fashion_cnn": fashion_config, "minilm": minilm_config, "crepe": crepe_config}


def calib_moments(m, cfg: Config, tables_at: tuple | None = None) -> dict:
    """GPTQ's ``moments`` (fitted) and ``check_moments`` (held out) of the model's Dense and Conv
    inputs; with ``tables_at = (params, rd)``, also the row moments of ``cfg.tables`` in ``params``
    at ``rd``'s row scales."""
    fit, check, mask = cfg.calib
    out = {key: input_moments(m.apply, m.params, batches, mask=mask, patch_stride=cfg.patch_stride, progress=False)
           for key, batches in (("moments", fit), ("check_moments", check))}
    if tables_at is not None and cfg.tables:
        params, rd = tables_at
        for key, (seed, batches) in zip(out, enumerate(cfg.table_calib())):
            out[key].update(row_moments(params, m.apply, batches, list(cfg.tables), row_scales=rd.local_scales,
                                        seed=seed, progress=False))
    return out


def metrics_row(m, params, subset) -> dict:
    ev = m.eval(params, subset=subset)
    return {k: ev.get(k, "") for k in METRICS}


def transparent(model: str, met: dict, ref: dict) -> bool:
    """Whether ``met`` meets every bound of ``QUALITY[model]`` (``ref``: the float model's metrics)."""
    return all(met[k] >= ref[k] - bound - 1e-12 if kind == "drop" else
               met[k] >= bound if kind == "min" else met[k] <= bound
               for k, kind, bound in QUALITY[model])


def no_worse(model: str, a: dict, b: dict) -> bool:
    """Whether point ``a``'s quality is at least point ``b``'s on every metric of ``QUALITY[model]``."""
    return all(a[k] <= b[k] if kind == "max" else a[k] >= b[k] for k, kind, _ in QUALITY[model])


def read_csv(path: pathlib.Path) -> list[dict]:
    """Rows of an earlier run (numbers and booleans parsed back)."""
    def parse(k, v):
        if k in ("transparent", "bytes_equal") and v in ("True", "False"):
            return v == "True"
        if k == "bytes":
            return int(v)
        if k in (*METRICS, "opt_wall_s", "encode_s") and v != "":
            return float(v)
        return v
    with open(path, newline="") as f:
        return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def run_model(cfg: Config, oracle, csv_path: pathlib.Path, methods=METHODS,
              previous: list[dict] = ()) -> list[dict]:
    """Measures ``methods`` for ``cfg``; rows of ``previous`` from methods not measured now are kept."""
    m = models.get(cfg.name)
    # rows of the methods measured now are replaced, not merged: their settings may have changed
    remeasured = {x for meth in methods for x in (("nncodec", "nncjax-ref") if meth == "nncodec"
                                                  else (f"nncjax-{meth}",))}
    rows: list[dict] = [r for r in previous if r["method"] != "float" and r["method"] not in remeasured]

    def add(method, setting, nbytes, met, opt_s="", enc_s="", eq="", note=""):
        row = dict(model=cfg.name, method=method, setting=setting, bytes=nbytes, **met,
                   transparent=transparent(cfg.name, met, ref) if method != "float" else True,
                   opt_wall_s=opt_s if opt_s == "" else round(opt_s, 2),
                   encode_s=enc_s if enc_s == "" else round(enc_s, 3), bytes_equal=eq, note=note)
        rows[:] = [r for r in rows if (r["method"], r["setting"]) != (method, setting)]
        rows.append(row)
        write_csv(rows, csv_path)  # after every point: a long run interrupted keeps what it measured
        print({k: v for k, v in row.items() if v != ""}, flush=True)

    ref = metrics_row(m, m.params, cfg.subset)
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(m.params))
    add("float", "float32", 4 * n_params, ref)

    # (a) NNCodec defaults and (b) nncjax reference mode, same tensors and settings
    orig = {k: np.asarray(v, np.float32) for k, v in m.to_original(m.params).items()}
    for qp in cfg.qps if "nncodec" in methods else ():
        t0 = time.perf_counter()
        nnc = oracle.call("nn", "encode", orig, {"qp": qp})
        t_nnc = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = encode(orig, qp=qp)
        t_ours = time.perf_counter() - t0
        dec = oracle.call("nn", "decode", nnc)
        params = m.from_original(dict(zip(dec["names"], dec["arrays"])))
        met = metrics_row(m, params, cfg.subset)
        eq = ours == nnc
        add("nncodec", f"qp={qp}", len(nnc), met, enc_s=t_nnc, note="encode_s includes oracle IPC")
        add("nncjax-ref", f"qp={qp}", len(ours), met, enc_s=t_ours, eq=eq)
        if not eq:
            raise AssertionError(f"{cfg.name} qp={qp}: nncjax reference bytes differ from NNCodec's")

    # (c) BN folding + IOQ + LSA, and the same pipeline with the sensitivity allocation
    pipes = [("nncjax-ioq", lam, "ioq") for lam in cfg.lams if "ioq" in methods]
    pipes += [("nncjax-sens-bnf", lam, "sensitivity") for lam in cfg.sens_bnf_lams if "sens-bnf" in methods]
    pipes += [("nncjax-sens-bnf-gptq", lam, "sensitivity") for lam in cfg.bnf_gptq_lams
              if "sens-bnf-gptq" in methods]
    for method, lam, allocation in pipes:
        t0 = time.perf_counter()
        gptq = calib_moments(m, cfg) if method.endswith("gptq") else {}
        t_moments = time.perf_counter() - t0
        res = optimize_ioq(m.params, m.apply, cfg.tune, lam=lam, allocation=allocation, base_qp=cfg.base_qp,
                           **gptq, **cfg.ioq_kwargs)
        t0 = time.perf_counter()
        data = encode(res.tensors, **res.encode_kwargs())
        t_enc = time.perf_counter() - t0
        met = metrics_row(m, decode(data, like=m.params, bn_pairs=cfg.ioq_kwargs["bn_pairs"]), cfg.subset)
        w = res.wall_s
        add(method, f"lam={lam:g}", len(data), met, t_moments + w["total"], t_enc,
            note=f"base_qp {cfg.base_qp}; moments {t_moments:.1f}s fold {w['fold']:.1f}s {allocation} "
                 f"{w['alloc']:.1f}s lsa {w['lsa']:.1f}s; {len(res.dq_overrides)} kernels GPTQ without DQ; "
                 f"D_tune {allocation} "
                 f"{res.history['d_alloc']:.3g} lsa {res.history['d_lsa']:.3g}; weight QPs "
                 f"{sorted(res.history['weight_qps'].values())}")

    # (d) gradient RD from base_qp and (e) the sensitivity allocation without steps: one measurement each
    runs = ([("nncjax-grad", lam, {"base_qp": cfg.base_qp, "steps": cfg.grad_steps}) for lam in cfg.lams]
            if "grad" in methods else [])
    runs += ([("nncjax-sens", lam, {"init": "sensitivity", "steps": 0}) for lam in cfg.sens_lams]
             if "sens" in methods else [])
    # qp_density 3: twice as many QPs per octave, so that the allocation's rounding costs less
    fine = {"qp_density": 3, "base_qp": 2 * cfg.base_qp, "nonweight_qp": -150, "scale_qp": -48}
    runs += ([("nncjax-sens-gptq", lam, {"init": "sensitivity", "steps": 0, **fine}) for lam in cfg.gptq_lams]
             if "sens-gptq" in methods else [])
    runs += ([("nncjax-sens-gptq-tab", lam, {"init": "sensitivity", "steps": 0, **fine})
              for lam in cfg.tab_lams or cfg.gptq_lams] if "sens-gptq-tab" in methods and cfg.tables else [])
    runs += ([("nncjax-sens-bc", lam, {"init": "sensitivity", "steps": 0}) for lam in cfg.bc_lams]
             if "sens-bc" in methods else [])
    runs += ([("nncjax-sens-gptq-ft", lam, {"init": "sensitivity", "steps": 0, **fine}) for lam in cfg.ft_lams]
             if "sens-gptq-ft" in methods else [])
    for method, lam, kwargs in runs:
        t0 = time.perf_counter()
        params = m.params
        gptq = method.startswith("nncjax-sens-gptq")
        if gptq and cfg.lookup is not None:
            params, extra = cfg.lookup(params)
            kwargs = {**kwargs, **extra}
        rd = optimize(params, m.apply, cfg.tune, lam=lam, progress=False, **kwargs)
        if gptq:
            plain = method == "nncjax-sens-gptq"
            moments = calib_moments(m, cfg, None if plain else (params, rd))
            if method == "nncjax-sens-gptq-ft" and cfg.gptq_dq is not False:
                tables = {k: {n: moments[k].pop(n) for n in cfg.tables if n in moments[k]} for k in moments}
                params, rd = with_error_feedback(params, rd, **tables, progress=False)
            params, rd = with_error_feedback(params, rd, **moments, dq=False if plain else cfg.gptq_dq,
                                             progress=False)
        if method == "nncjax-sens-gptq-ft":
            params, rd = with_fine_tuning(params, rd, m.apply, cfg.ft_data(), reference=m.params,
                                          steps=cfg.ft_steps, method=cfg.ft_method, progress=False)
        if method == "nncjax-sens-bc":
            params, rd = with_bias_correction(params, rd, m.apply, cfg.tune, bn_pairs=cfg.ioq_kwargs["bn_pairs"] or ())
        t_opt = time.perf_counter() - t0
        t0 = time.perf_counter()
        v = verify(params, rd)
        t_enc = time.perf_counter() - t0  # encode + decode
        met = metrics_row(m, v.params, cfg.subset)
        qps = sorted(q for n, q in rd.qp_overrides.items() if not n.endswith(LS_SUFFIX))
        how = (f"base_qp {cfg.base_qp}; steps {cfg.grad_steps} (wall includes jit compile); D_tune final "
               f"{float(rd.history['distortion'][-1]):.3g}" if kwargs["steps"] else
               f"init=sensitivity steps=0 (wall includes jit compile); {len(rd.local_scales)} tensors with row scales")
        gptq_kinds = [sum(v is k for v in rd.dq_overrides.values()) for k in (False, True)]
        if any(gptq_kinds):
            how += f"; {gptq_kinds[0]} tensors GPTQ without DQ, {gptq_kinds[1]} on the DQ trellis"
        if method == "nncjax-sens-bc":
            how += "; biases / batch-norm means corrected"
        if method == "nncjax-sens-gptq-ft":
            how += f"; levels fine-tuned on their grid ({cfg.ft_method}, {cfg.ft_steps} steps)"
        if "row_usage" in kwargs:
            how += "; unreachable vocabulary rows zeroed, embedding rows by token usage"
        add(method, f"lam={lam:g}", v.nbytes, met, t_opt, t_enc,
            note=f"{how}; weight QPs {qps}; encode_s = encode+decode")
    return rows


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], model: str, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k, _, _ in QUALITY[model]] + (["argmax_agree"] if len(QUALITY[model]) == 1 else [])
    bounds = {k: (kind, bound) for k, kind, bound in QUALITY[model]}
    ref = next(r for r in rows if r["method"] == "float")
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    style = {"nncodec": ("o-", "NNCodec 2.1.3 defaults (QP sweep)"),
             "nncjax-ref": ("x", "nncjax reference mode (= NNCodec bytes)"),
             "nncjax-ioq": ("s-", "nncjax BNF + IOQ + LSA (λ sweep)"),
             "nncjax-grad": ("^-", "nncjax gradient RD (λ sweep)"),
             "nncjax-sens": ("v-", "nncjax sensitivity allocation, no steps (λ sweep)"),
             "nncjax-sens-bnf": ("D-", "nncjax BNF + sensitivity allocation + LSA (λ sweep)"),
             "nncjax-sens-gptq": ("P-", "nncjax sensitivity allocation + GPTQ for Dense / Conv kernels (λ sweep)"),
             "nncjax-sens-gptq-tab": ("h-", "nncjax sensitivity allocation + GPTQ (on the DQ trellis where cheaper), tables too (λ sweep)"),
             "nncjax-sens-bnf-gptq": ("X-", "nncjax BNF + sensitivity allocation + GPTQ + LSA (λ sweep)"),
             "nncjax-sens-bc": ("*-", "nncjax sensitivity allocation + bias correction (λ sweep)"),
             "nncjax-sens-gptq-ft": ("p-", "nncjax sensitivity allocation + GPTQ + levels fine-tuned (λ sweep)")}
    for ax, key in zip(axes[0], keys):
        for method, (fmt, label) in style.items():
            pts = sorted((r["bytes"] / 1024, r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), fmt, label=label, ms=7 if method != "nncjax-ref" else 9)
        kind, bound = bounds.get(key, (None, None))
        if kind == "drop":
            ax.axhline(ref[key], color="k", lw=0.8, label=f"float32 ({ref[key]:.4f})")
            ax.axhline(ref[key] - bound, color="gray", ls="--", lw=1, label=f"transparent (drop ≤ {bound:g})")
        elif kind is not None:
            ax.axhline(bound, color="gray", ls="--", lw=1,
                       label=f"transparent ({LABELS[key]} {'≥' if kind == 'min' else '≤'} {bound:g})")
        ax.set_xlabel("bitstream size [KiB]")
        ax.set_ylabel(LABELS[key])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{model}: rate-distortion (bytes vs quality on the evaluation set)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows: list[dict], model: str) -> str:
    """Markdown: per method, the smallest transparent bitstream, its ratio to NNCodec's, wall times;
    then gradient vs IOQ at each λ."""
    ref = next(r for r in rows if r["method"] == "float")
    best = {}
    for r in rows:
        if r["method"] != "float" and r["transparent"] and (
                r["method"] not in best or r["bytes"] < best[r["method"]]["bytes"]):
            best[r["method"]] = r
    nnc = best.get("nncodec")
    quality = [k for k, _, _ in QUALITY[model]]
    key, extra = quality[0], quality[1:]
    bounds = [f"{LABELS[k]} ≥ {ref[k] - bound:.4f}" if kind == "drop" else
              f"{LABELS[k]} {'≥' if kind == 'min' else '≤'} {bound:g}" for k, kind, bound in QUALITY[model]]
    lines = [f"### {model}", "", f"![{model} RD curves](benchmarks/results/rd_{model}.png)", "",
             f"float32: {ref['bytes']} bytes, {key} {ref[key]:.4f}, transparent = " + " and ".join(bounds), "",
             f"| method | smallest transparent bitstream [bytes] | vs NNCodec | setting | {key} |"
             + "".join(f" {LABELS[k]} |" for k in extra) + " optimisation wall [s] |",
             "|---|---|---|---|---|" + "---|" * len(extra) + "---|"]
    for method in ("nncodec", "nncjax-ref", "nncjax-ioq", *GRADIENT_METHODS):
        r = best.get(method)
        if r is None and not any(x["method"] == method for x in rows):
            continue  # a method this model does not run
        if r is None:
            lines.append(f"| {method} | none transparent | | | |" + " |" * len(extra) + " |")
            continue
        ratio = f"{r['bytes'] / nnc['bytes']:.3f} ({100 * (1 - r['bytes'] / nnc['bytes']):.1f} % smaller)" \
            if nnc else "n/a"
        more = "".join(f" {r[k]:{FORMATS.get(k, '.4f')}} |" for k in extra)
        lines.append(f"| {method} | {r['bytes']} | {ratio} | {r['setting']} | {r[key]:.4f} |{more} "
                     f"{r['opt_wall_s']} |")
    lines += ["", "Does gradient RD reach each IOQ point? The fastest gradient point ("
              + ", ".join(f"`{g}`" for g in GRADIENT_METHODS) + ", any λ) with no more bytes and no worse "
              + " and ".join(quality) + ":", "",
              (f"| IOQ λ | IOQ bytes | IOQ {key} | IOQ wall [s] | gradient point | bytes | {key} | wall [s] | "
               "wall ratio |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "nncjax-ioq":
            continue
        dominating = [g for g in rows if g["method"] in GRADIENT_METHODS and g["bytes"] <= r["bytes"]
                      and no_worse(model, g, r)]
        head = f"| {r['setting'][4:]} | {r['bytes']} | {r[key]:.4f} | {r['opt_wall_s']} |"
        if not dominating:
            lines.append(head + " none | | | | |")
            continue
        g = min(dominating, key=lambda x: x["opt_wall_s"])
        lines.append(head + f" {g['method']} {g['setting']} | {g['bytes']} | {g[key]:.4f} | {g['opt_wall_s']} | "
                     f"{r['opt_wall_s'] / g['opt_wall_s']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="few points, few steps (smoke run)")
    ap.add_argument("--subset", type=int, default=None, help="evaluation items (default: the full task)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--lams", type=float, nargs="+", default=None, help="override the model's λ list")
    ap.add_argument("--sens-lams", type=float, nargs="+", default=None, help="override the sensitivity λ list")
    ap.add_argument("--sens-bnf-lams", type=float, nargs="+", default=None,
                    help="override the λ list of the pipeline with the sensitivity allocation")
    ap.add_argument("--gptq-lams", type=float, nargs="+", default=None,
                    help="override the λ list of the sensitivity allocation + GPTQ (-tab too)")
    ap.add_argument("--bnf-gptq-lams", type=float, nargs="+", default=None,
                    help="override the λ list of the sensitivity pipeline + GPTQ")
    ap.add_argument("--bc-lams", type=float, nargs="+", default=None,
                    help="override the λ list of the sensitivity allocation + bias correction")
    ap.add_argument("--ft-lams", type=float, nargs="+", default=None,
                    help="override the λ list of the sensitivity allocation + GPTQ + fine-tuning on the grid")
    ap.add_argument("--qps", type=int, nargs="+", default=None, help="override the model's NNCodec QP list")
    ap.add_argument("--base-qp", type=int, default=None, help="override the model's starting QP")
    ap.add_argument("--append", action="store_true", help="merge with the rows of an existing CSV")
    ap.add_argument("--report-only", action="store_true", help="plot and summarise existing CSVs, measure nothing")
    args = ap.parse_args()
    warnings.simplefilter("ignore", QPAdjustedWarning)
    from tests.oracle.client import Oracle

    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        for name in args.models:
            rows = read_csv(args.out / f"rd_{name}.csv")
            plot(rows, name, args.out / f"rd_{name}.png")
            (args.out / f"RD_{name}.md").write_text(summary(rows, name))
        write_report(args.out)
        return
    oracle = Oracle() if "nncodec" in args.methods else None
    try:
        for name in args.models:
            cfg = CONFIGS[name](args.quick, args.subset)
            cfg.lams = args.lams or cfg.lams
            cfg.sens_lams = args.sens_lams or cfg.sens_lams
            cfg.sens_bnf_lams = args.sens_bnf_lams or cfg.sens_bnf_lams
            if args.gptq_lams:
                cfg.gptq_lams = cfg.tab_lams = args.gptq_lams
            cfg.bnf_gptq_lams = args.bnf_gptq_lams or cfg.bnf_gptq_lams
            cfg.bc_lams = args.bc_lams or cfg.bc_lams
            cfg.ft_lams = args.ft_lams or cfg.ft_lams
            cfg.qps = args.qps or cfg.qps
            cfg.base_qp = cfg.base_qp if args.base_qp is None else args.base_qp
            path = args.out / f"rd_{name}.csv"
            previous = read_csv(path) if args.append and path.exists() else []
            rows = run_model(cfg, oracle, path, args.methods, previous)
            plot(rows, name, args.out / f"rd_{name}.png")
            text = summary(rows, name)
            (args.out / f"RD_{name}.md").write_text(text)
            print(text, flush=True)
    finally:
        if oracle is not None:
            oracle.close()
    write_report(args.out)


def write_report(out: pathlib.Path) -> None:
    parts = [p.read_text() for p in sorted(out.glob("RD_*.md"))]
    (out / "RD.md").write_text(REPORT_HEAD + "\n".join(parts))


REPORT_HEAD = """## Rate-distortion on real models (`benchmarks/rd.py`)

Every point is a real bitstream: encode -> bytes -> decode -> task metric on the evaluation set
(Fashion-MNIST: the 10,000 test images; MiniLM: the 1000-synset WordNet reverse dictionary; CREPE
tiny, the held-out model with Fashion-MNIST's optimiser settings: 500 synthetic harmonic tones).
*nncodec*: NNCodec 2.1.3 `nncodec.nn.encode` defaults (DQ, qp_density 2, non-weight QP -75) over a
global QP sweep; *nncjax-ref*: `nncjax.encode` with the same settings (byte-identical to NNCodec at
every QP, checked); *nncjax-ioq*: `nncjax.pipeline.optimize_ioq` (BN folding + IOQ + LSA);
*nncjax-grad*: `nncjax.optimize` (gradient RD of per-tensor QPs and local scales, 60-100 optax steps
from `base_qp`); *nncjax-sens*: `nncjax.optimize(init="sensitivity", steps=0)` (closed-form
per-tensor QPs and per-row scales from Gauss-Newton sensitivities, calibrated on the real
codec; no training step); *nncjax-sens-bnf*: `optimize_ioq(allocation="sensitivity")` (IOQ's
pipeline, BN folding and LSA included, with that allocation in place of IOQ's search);
*nncjax-sens-gptq*: *nncjax-sens* at `qp_density=3` (finer QPs), then `nncjax.with_error_feedback`:
each Dense and Conv kernel is coded with GPTQ (uniform, no DQ) at the coarsest QP whose layer-output error
stays within DQ's on held-out inputs (WordNet verb glosses; other training images; tones of other seeds); the wall time
includes collecting the input moments (MiniLM: about 10 s on the CPU; Fashion-MNIST: every 8th conv
patch). On MiniLM it first zeroes the
1331 vocabulary rows the tokenizer can never emit (exact) and steps each word-embedding row by its
token's use in the glosses and single-word lemmas of every WordNet synset but the 1000 evaluated
(calibration texts), an occurrence in a text of L tokens counting 1/L² (`row_usage`). *nncjax-sens-gptq-tab*:
*nncjax-sens-gptq* whose GPTQ step also codes MiniLM's word embedding, fitted to and checked on the
Gauss-Newton matrix of a row's error at the model's output (`nncjax.sensitivity.row_moments` at the
allocation's row scales, 64 + 32 batches of calibration texts, about 55 s of the wall time on
the CPU), with `dq="auto"`: each kernel and the table takes GPTQ on the DQ trellis
(`quantize_gptq(dq=True)`) where the real coder codes that in fewer bits than uniform GPTQ (most of
them). *nncjax-sens-bnf-gptq*: the
same GPTQ step inside *nncjax-sens-bnf*, before LSA. *nncjax-sens-bc*: *nncjax-sens*, then
`nncjax.with_bias_correction` on the tuning batches (each layer's mean output shift into its bias or
the running mean of the batch norm it feeds). *nncjax-sens-gptq-ft*: *nncjax-sens-gptq-tab*
(MiniLM, with the word embedding on the uniform grid) or *nncjax-sens-gptq* (Fashion-MNIST), then
`nncjax.with_fine_tuning`: the uniform GPTQ levels move on their grid (QPs, scales and size kept) to lower
the whole model's output distortion, on data the evaluation never sees (Fashion-MNIST: 300 steps of
the gradient-guided search on 128 other training images a step; CREPE: 100 steps of it on 128
tones of another seed; MiniLM: 600 Adam steps of
straight-through training on 32 glosses or 64 single-word lemmas of the calibration texts a step).
λ prices one bit per weight in units of the relative output MSE on a small tuning set
(Fashion-MNIST training images; WordNet verb glosses; 256 tones of another seed), the same objective
for every method. Transparent: top-1 drop ≤ 0.1 points (Fashion-MNIST); MRR drop ≤ 0.005 and mean
embedding cosine ≥ 0.999 (MiniLM); at most one more of the 500 tones decoded over 50 cents off and
decoded pitches within 1 cent of the float model's on average (CREPE, whose task accuracy saturates:
every tone stays within 50 cents down to NNCodec's QP -4, 4 % of the float size). Wall times are
from a 2-core CPU machine, idle, each measured with code whose behaviour for that method is current:
Fashion-MNIST's ioq, sens, sens-bc and sens-gptq rows in one run (2026-11-23, repeated in a later
session on a freshly installed machine, where IOQ ran in 10-11 s instead of 19-20 s and a few points
moved by one or two test images); its sens-bnf and sens-bnf-gptq rows on 2026-12-07 in one run (the
iterated calibration changed the sens-bnf point at λ = 0.1); its sens-gptq-ft rows on 2026-12-06;
MiniLM's ioq, sens, sens-gptq, sens-gptq-tab and sens-gptq-ft rows in one later run on 2026-12-07
(calibration texts from every WordNet synset but the 1000 evaluated; after the sensitivity probes
were batched, which moved a few allocations slightly; IOQ then took 70-81 s a point instead of
97-106 s); the nncjax-grad rows in earlier runs (MiniLM's only at λ = 2e-3: 9 minutes a point on
the CPU); CREPE's rows on 2026-12-07 in one run, its sens-bnf and sens-bnf-gptq rows (no batch norm
folds there: the allocation and LSA) in a second run after it. The first point of each method includes its XLA compilation. GPU timings
(one H100, 2026-11-22 and 2026-11-23, code of those days: no device since) are in `benchmarks/results/gpu_h100.md`.

"""


if __name__ == "__main__":
    main()
