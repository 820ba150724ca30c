"""mer_runtime: a minimal consumer of mertools' expert-shard folders.

Importable on its own: it depends on numpy, xxhash and gguf (for the type table and, for uncommon types,
dequantization) and never imports ``mertools``.
"""

from .errors import ManifestError, MerError, ShardIOError
from .manifest import FORMAT_VERSION, ExpertEntry, Manifest, TensorEntry, load_manifest

__all__ = [
    "FORMAT_VERSION",
    "ExpertEntry",
    "ManifestError",
    "Manifest",
    "MerError",
    "ShardIOError",
    "TensorEntry",
    "load_manifest",
]
