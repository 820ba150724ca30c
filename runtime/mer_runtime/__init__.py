"""mer_runtime: a minimal consumer of mertools' expert-shard folders.

    from mer_runtime import open_shards
    with open_shards("out/", io="auto", cache_slots=16) as s:
        y = s.ffn(layer, expert, x)

Importable on its own: it depends on numpy, xxhash and gguf (the type table and, for uncommon types,
dequantization), plus an optional C kernel built at install, and never imports ``mertools``.

The public names are imported on first use (PEP 562), as is any submodule reached as an attribute: importing
``mer_runtime.errors`` alone (as every ``mertools`` command does) loads neither numpy nor gguf.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import ManifestError, MerError, ShardIOError
    from .manifest import FORMAT_VERSION, ExpertEntry, Manifest, TensorEntry, load_manifest
    from .shards import ExpertView, ShardSet, open_shards

__all__ = [
    "FORMAT_VERSION",
    "ExpertEntry",
    "ExpertView",
    "ManifestError",
    "Manifest",
    "MerError",
    "ShardIOError",
    "ShardSet",
    "TensorEntry",
    "load_manifest",
    "open_shards",
]

_HOME = {"ManifestError": "errors", "MerError": "errors", "ShardIOError": "errors", "FORMAT_VERSION": "manifest",
         "ExpertEntry": "manifest", "Manifest": "manifest", "TensorEntry": "manifest", "load_manifest": "manifest",
         "ExpertView": "shards", "ShardSet": "shards", "open_shards": "shards"}  # public name -> its submodule


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        return value
    if not name.startswith("_"):  # a submodule, as when the package imported them all up front: mer_runtime.shards
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
