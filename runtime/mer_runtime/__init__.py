"""mer_runtime: a minimal consumer of mertools' expert-shard folders.

    from mer_runtime import open_shards
    with open_shards("out/", io="auto", cache_slots=16) as s:
        y = s.ffn(layer, expert, x)

Importable on its own: it depends on numpy, xxhash and gguf (the type table and, for uncommon types,
dequantization), plus an optional C kernel built at install, and never imports ``mertools``.
"""

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
