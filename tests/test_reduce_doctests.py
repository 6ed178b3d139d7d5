"""The docstring examples of nncjax.reduce, nncjax.ioq, nncjax.sensitivity, nncjax.steps and nncjax.pytree_names run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["nncjax.reduce._tree", "nncjax.reduce.layout", "nncjax.reduce.bnfold", "nncjax.reduce.block",
           "nncjax.reduce.lsa", "nncjax.reduce.prune", "nncjax.reduce.lowrank", "nncjax.reduce.unify", "nncjax.reduce.vocab",
           "nncjax.ioq", "nncjax.sensitivity", "nncjax.steps", "nncjax.pytree_names"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
