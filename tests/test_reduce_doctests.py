"""Docstring examples: those of every module of nncjax and nncjax.kernels run and print what they
claim, and every public function (in the ``__all__`` of a module of nncjax or nncjax.kernels) has one."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import pathlib
import pkgutil

import pytest


def _all_modules() -> list[str]:
    names = []
    for pkg in map(importlib.import_module, ("nncjax", "nncjax.kernels")):
        names += [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return [n for n in dict.fromkeys(names) if not n.endswith(".__main__")]


def _source(name: str) -> str:
    origin = importlib.util.find_spec(name).origin
    return pathlib.Path(origin).read_text(encoding="utf-8") if origin and origin.endswith(".py") else ""


# every module with examples: one that stops running (or printing what it claims) fails here
MODULES = [n for n in _all_modules() if ">>>" in _source(n)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_function_has_an_example():
    """Project rule: a public function's docstring shows an example (``>>>`` or "Example"); classes are exempt.

    Jitted functions (jax.jit, numba.njit) count as functions: they are unwrapped before the check.
    """
    missing, seen = [], set()
    for name in _all_modules():
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if id(obj) in seen or inspect.isclass(obj) or not callable(obj):
                continue
            seen.add(id(obj))
            if not inspect.isfunction(inspect.unwrap(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            if ">>>" not in doc and "Example" not in doc:
                missing.append(f"{name}.{attr}")
    assert not missing, f"public functions without a docstring example: {missing}"
