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

from typing import TYPE_CHECKING

from .lazy import lazy_dir, lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _HOME)
__dir__ = lazy_dir(__name__, __all__)
