"""mertools: turn Mixture-of-Experts models into aligned, checksummed per-expert shards.

>>> from mertools import extract, verify
>>> extract("fixtures/real/mixtral-q4_0.gguf", "out/")   # doctest: +SKIP
>>> verify("out/").ok                                    # doctest: +SKIP
True

The public names are imported on first use (PEP 562), as is any submodule reached as an attribute
(``mertools.commit``): ``import mertools`` alone, and so every ``mertools`` command's start, loads none of numpy,
gguf or the other commands' code.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from mer_runtime.lazy import lazy_dir, lazy_getattr

if TYPE_CHECKING:
    from .errors import MertoolsError
    from .extract import ExtractResult, extract
    from .sources import open_source  # GGUF file or SafeTensors folder
    from .verify import VerifyReport, verify

    __version__: str

__all__ = ["ExtractResult", "MertoolsError", "VerifyReport", "__version__", "extract", "open_source", "verify"]

# public name -> the submodule that defines it; extract and verify: _Package below
_HOME = {"ExtractResult": "extract", "MertoolsError": "errors", "VerifyReport": "verify", "open_source": "sources"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # 15-20 ms to import: only when asked

    try:
        return version("mertools")  # one source of truth: pyproject.toml, as installed
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


_lazy = lazy_getattr(__name__, _HOME)
__dir__ = lazy_dir(__name__, __all__)


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = globals()[name] = _version()
        return value
    return _lazy(name)


def _function_not_submodule(name: str) -> property:
    """``mertools.extract`` and ``mertools.verify`` are the functions, as they always were, though submodules of the
    same names exist: importing a submodule binds it to its package's attribute (``from mertools.extract import
    parse_ranges`` does), which, now that the package imports nothing up front, would leave the module where the
    function was. A property of the module's class wins over its ``__dict__``."""

    def get(pkg: types.ModuleType) -> Any:
        value = pkg.__dict__.get(name)
        if value is None or isinstance(value, types.ModuleType):
            value = pkg.__dict__[name] = getattr(importlib.import_module(f"{__name__}.{name}"), name)
        return value

    def put(pkg: types.ModuleType, value: Any) -> None:
        pkg.__dict__[name] = value

    return property(get, put)


class _Package(types.ModuleType):
    extract = _function_not_submodule("extract")
    verify = _function_not_submodule("verify")


sys.modules[__name__].__class__ = _Package
