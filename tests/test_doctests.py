"""The examples in the docstrings run, and say what the code does (`doctest`; those marked +SKIP need a model or
a folder on disk and are read, not run). A wrong example is a wrong doc: two were found this way (a hit count in
`ShadowCache`, a window size in `needed_window`)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import mer_runtime
import mertools


def _modules(pkg) -> list[str]:
    """The package's Python modules (its C extensions have no docstring examples)."""
    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return [pkg.__name__] + [n for n in names if importlib.util.find_spec(n).origin.endswith(".py")]


@pytest.mark.parametrize("name", _modules(mer_runtime) + _modules(mertools))
def test_the_examples_in_the_docstrings_hold(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"
