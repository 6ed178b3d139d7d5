"""Real models with real, offline evaluation data, in Flax, each with its quality metric.

``get(name)`` returns an :class:`~nncjax.models.base.EvalModel` (``params``, ``apply``, ``eval``,
``name_map``, ``to_original``, ``from_original``):

=========== ============================================== =================================================
name        model                                          metrics (``eval(subset="full")``, shipped weights)
=========== ============================================== =================================================
minilm      all-MiniLM-L6-v2 sentence encoder, 22.6 M      WordNet reverse dictionary, 1000 synsets:
                                                           top1 0.402, top10 0.596, mrr 0.472
crepe       CREPE tiny pitch estimator, 487 k              500 harmonic tones: within_50c 1.0,
                                                           median_cents 2.65
fashion_cnn batch-norm CNN on Fashion-MNIST, 392 k         10000 test images: top1 0.928
digits_mlp  64-128-10 MLP on sklearn digits, trained on    360 test images: top1 0.986
            load (about a second)
=========== ============================================== =================================================

Every ``eval`` also reports agreement with the shipped weights' outputs on the same items
(``mean_cosine``; ``bins_mae``, ``argmax_agree``, ``cents_to_ref``; ``argmax_agree``), the numbers to watch when
``params`` are a decoded bitstream. ``subset="ci"`` is a small fixed subset for tests.

Models and data install offline with ``tools/fetch_eval_data.sh``. Submodules import lazily, so
``import nncjax.models`` is cheap.

Example:
    >>> import nncjax.models
    >>> m = nncjax.models.get("crepe")
    >>> m.eval(subset="ci")["within_50c"]
    1.0
"""

from __future__ import annotations

import functools
import importlib

from nncjax.errors import InputError
from nncjax.models.base import EvalModel

__all__ = ["EvalModel", "get", "names"]

_MODULES = {"minilm": "minilm", "crepe": "crepe", "fashion_cnn": "fashion_cnn", "digits_mlp": "digits_mlp"}


def names() -> tuple[str, ...]:
    """Registered model names.

    >>> "minilm" in names()
    True
    >>> names()
    ('minilm', 'crepe', 'fashion_cnn', 'digits_mlp')
    """
    return tuple(_MODULES)


def get(name: str) -> EvalModel:
    """The model ``name`` (see :func:`names`) with its shipped weights, loaded offline and cached.

    Example:
        >>> get("fashion_cnn").eval(subset="ci")["top1"] > 0.85
        True
    """
    if not isinstance(name, str) or name not in _MODULES:  # checked outside the cache: a list was unhashable
        raise InputError(f"unknown model {name!r}; known: {', '.join(_MODULES)}")
    return _load(name)


@functools.cache
def _load(name: str) -> EvalModel:
    return importlib.import_module(f"nncjax.models.{_MODULES[name]}").load()
