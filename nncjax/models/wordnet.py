"""WordNet 3.0 reverse-dictionary task (Debian ``wordnet-base``) for sentence encoders.

From ``data.noun``/``index.noun``: noun synsets with exactly one lemma that is a single word (letters
only) and monosemous (the word names no other noun synset), so every query has one right answer.
1000 of them are drawn with a fixed seed; query = the synset's whole gloss (definition and quoted
usage examples, as WordNet writes it), candidates = the 1000 lemmas.
"""

from __future__ import annotations

import functools
import pathlib
import re

import numpy as np

from nncjax.errors import InputError

__all__ = ["FULL_SIZE", "SEED", "WORDNET_DIR", "reverse_dictionary_task"]

WORDNET_DIR = pathlib.Path("/usr/share/wordnet")
FULL_SIZE = 1000
SEED = 0
_WORD = re.compile(r"[a-z]+")


@functools.lru_cache(maxsize=1)
def _task() -> tuple[tuple[str, ...], tuple[str, ...]]:
    data, index = WORDNET_DIR / "data.noun", WORDNET_DIR / "index.noun"
    if not data.exists():
        raise InputError(f"{data} is missing: run tools/fetch_eval_data.sh")
    synset_count = {}
    for line in index.read_text().splitlines():
        if line and not line.startswith(" "):
            fields = line.split()
            synset_count[fields[0]] = int(fields[2])
    pool = []
    for line in data.read_text().splitlines():
        if not line or line.startswith(" "):  # licence header lines start with two spaces
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        if int(fields[3], 16) != 1:
            continue
        lemma = fields[4]
        if not _WORD.fullmatch(lemma) or synset_count.get(lemma) != 1:
            continue
        if gloss.strip():
            pool.append((lemma, gloss.strip()))
    if len(pool) < FULL_SIZE:
        raise InputError(f"only {len(pool)} eligible synsets in {data}")
    pick = np.random.default_rng(SEED).choice(len(pool), FULL_SIZE, replace=False)
    return tuple(pool[i][1] for i in pick), tuple(pool[i][0] for i in pick)


def reverse_dictionary_task(n: int = FULL_SIZE) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The first ``n`` items of the fixed task: ``(glosses, lemmas)``, each of length ``n``.

    Example:
        >>> q, c = reverse_dictionary_task(3); len(q), len(c)
        (3, 3)
    """
    if not 0 < n <= FULL_SIZE:
        raise InputError(f"n must be in [1, {FULL_SIZE}], got {n}")
    glosses, lemmas = _task()
    return glosses[:n], lemmas[:n]
