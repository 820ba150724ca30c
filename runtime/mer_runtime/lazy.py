"""Packages that import their public names on first use (PEP 562): mer_runtime's and mertools' ``__init__``."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, home: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for `package`: a public name of `home` (name -> the submodule that defines it) is
    imported from there on first use and kept in the package; any other public name is tried as a submodule, as
    when the package imported them all up front (``mer_runtime.shards``, ``mertools.commit``).

    >>> get = lazy_getattr("mer_runtime", {"MerError": "errors"})
    >>> get("MerError").__name__, get("errors").__name__
    ('MerError', 'mer_runtime.errors')
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in home:
            value = namespace[name] = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
            return value
        if not name.startswith("_"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def lazy_dir(package: str, public: list[str]) -> Callable[[], list[str]]:
    """A module ``__dir__`` for `package`: what it holds now and its public names, imported or not."""
    namespace = sys.modules[package].__dict__
    return lambda: sorted(set(namespace) | set(public))
