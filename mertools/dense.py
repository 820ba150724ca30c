"""dense.gguf: every metadata key and every tensor that is not a routed expert, as a GGUF any tool can read.

Written with the gguf package's writer; values are copied from the reader's raw parts (strings as bytes, so a
tokenizer with invalid UTF-8 survives unchanged) and tensors are streamed from the source's memory map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import gguf
from gguf.constants import GGUFValueType

from mer_runtime.checksum import hash_file

from .errors import SourceError
from .gguf_header import show
from .gguf_source import GGUFSource, field_value

# Keys the writer produces itself, or that describe the source's split and no longer hold.
_SKIP_PREFIXES = ("GGUF.", "split.")
_SKIP_KEYS = {"general.architecture", "general.alignment"}


def _raw_value(src: GGUFSource, f: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    main = f.types[0]
    if main == GGUFValueType.ARRAY and GGUFValueType.ARRAY in f.types[1:]:
        raise SourceError(
            f"{src.files[0]}: metadata {show(f.name)} is an array of arrays, which the gguf package cannot write "
            "(and llama.cpp cannot read); remove the key from the model or convert it again"
        )
    return field_value(f, raw_strings=True), main, f.types[-1] if main == GGUFValueType.ARRAY else None


def write_dense(src: GGUFSource, path: Path, *, fsync: bool, tick: Callable[[int], None]) -> dict[str, Any]:
    w = gguf.GGUFWriter(path, src.arch)
    if "general.alignment" in src.fields:
        w.add_custom_alignment(src.alignment)
    dropped = []
    for name, f in src.fields.items():
        if name in _SKIP_KEYS or name.startswith(_SKIP_PREFIXES):
            continue
        val, vtype, sub = _raw_value(src, f)
        if vtype == GGUFValueType.ARRAY and not val:
            dropped.append(name)  # the gguf writer refuses empty arrays; recorded in the manifest
            continue
        w.add_key_value(name, val, vtype, sub)
    w.add_string("mertools.experts_removed_from", src.files[0].name)
    tensors = src.dense_tensors()
    for t in tensors:
        rt = t.reader_tensor
        w.add_tensor_info(t.name, rt.data.shape, rt.data.dtype, t.nbytes, raw_dtype=rt.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        w.write_tensor_data(t.reader_tensor.data)
        tick(t.nbytes)
    assert w.fout is not None
    for fout in w.fout:
        fout.flush()
        if fsync:
            os.fsync(fout.fileno())
    w.close()
    digest, _, _ = hash_file(path)
    out: dict[str, Any] = {
        "path": path.name,
        "format": "gguf",
        "size": path.stat().st_size,
        "xxh3_64": digest,
        "n_tensors": len(tensors),
        "n_kv": len(src.fields) - sum(1 for n in src.fields if n.startswith("GGUF.")),
    }
    if dropped:
        out["dropped_empty_array_keys"] = dropped
    return out
