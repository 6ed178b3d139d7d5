"""Docstring examples: those of every module of nncjax and nncjax.kernels run and print what they
claim, and every public function (in the ``__all__`` of a module of nncjax or nncjax.kernels) and every
public method of a public class has one."""

from __future__ import annotations

import doctest
import functools
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


def _public() -> list[tuple[str, object]]:
    """``(module.attr, object)`` of every name in an ``__all__`` of nncjax and nncjax.kernels, each object once."""
    out, seen = [], set()
    for name in _all_modules():
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if id(obj) not in seen:
                seen.add(id(obj))
                out.append((f"{name}.{attr}", obj))
    return out


def _executed_example(doc: str | None) -> bool:
    return ">>>" in (doc or "")


# every module with examples: one that stops running (or printing what it claims) fails here
MODULES = [n for n in _all_modules() if ">>>" in _source(n)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_function_has_an_example():
    """Project rule: a public function's docstring shows an executed example (``>>>``, which
    :func:`test_docstring_examples` runs; an inline "Example: ``f(x) == y``" does not count); classes are
    exempt (their methods are checked below).

    Jitted functions (jax.jit, numba.njit) count as functions: they are unwrapped before the check.
    """
    missing = [
        name for name, obj in _public()
        if not inspect.isclass(obj) and callable(obj) and inspect.isfunction(inspect.unwrap(obj))
        and not _executed_example(inspect.getdoc(obj))
    ]
    assert not missing, f"public functions without an executed (>>>) docstring example: {missing}"


def _method_function(member: object):
    """The function behind a class attribute (method, static/class method, property, cached_property),
    unwrapped; None for anything else (fields, enum members, nested classes)."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    elif isinstance(member, property):
        member = member.fget
    elif isinstance(member, functools.cached_property):
        member = member.func
    member = inspect.unwrap(member) if callable(member) else member
    return member if inspect.isfunction(member) else None


def _public_methods() -> dict[str, object]:
    """``{module.Class.method: function}`` of the public (no leading "_") methods and properties defined in the
    body of each public class."""
    out = {}
    for name, cls in _public():
        if not inspect.isclass(cls):
            continue
        for attr, member in vars(cls).items():
            func = None if attr.startswith("_") else _method_function(member)
            if func is not None:
                out[f"{name}.{attr}"] = func
    return out


def test_every_public_method_has_an_example():
    """Project rule, for the public methods of public classes (defined in the class body; properties
    included): the docstring shows an executed ``>>>`` example."""
    missing = [n for n, f in _public_methods().items() if not _executed_example(inspect.getdoc(f))]
    assert not missing, f"public methods without an executed (>>>) docstring example: {missing}"
