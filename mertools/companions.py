"""Companion files of a SafeTensors checkpoint: the tokenizer, generation config, chat template, remote code and other
small files beside the weights, kept byte for byte in ``OUT/hf/`` so that OUT is a complete model.

The rule (one rule for a local folder and for a hub listing; README "What it reads", docs/format.md):

- only regular files at the top level of the checkpoint (a subfolder is not looked into);
- not the weights or their indexes (``WEIGHT_SUFFIXES``, ``*.<weight suffix>.index.json``, and
  ``model.safetensors.index.json``, which the reassembly record keeps), not hidden (``.gitattributes``): these are
  left out without a word; ``config.json`` is kept (first in line);
- README, LICENSE and other text are kept (a pushed folder should carry the licence, and a reassembled checkpoint is
  then the source folder file for file);
- skipped with a note (never a failure): a name that is not a plain file name (``mer_runtime.manifest.plain_name``:
  control characters, a backslash, over 255 bytes), a file over ``MAX_COMPANION_BYTES`` (64 MiB), anything that is
  not a regular file once links are followed (a FIFO, a device, a folder, a dangling link), a name that differs only
  in case or Unicode normalization (``same_file_key``: "é" as U+00E9 or as "e" + U+0301) from the index,
  ``model.safetensors`` or another kept file (the all-lowercase one is kept, of those the NFC one), and the files past
  ``MAX_COMPANIONS`` (128) or past ``MAX_COMPANION_TOTAL`` (256 MiB) in all, counted with the tokenizer, generation
  config, chat template, remote code and licence (``FIRST``) first, then the rest, each in name order.

Links are followed as the SafeTensors reader follows them for the shards (Hugging Face's cache links every file of a
snapshot to its blob elsewhere); files are opened with ``read_regular`` (non-blocking open, fstat on the descriptor),
so a FIFO swapped in cannot hang the copy and a device cannot stream without end. OUT gets plain files, never links.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import unicodedata
from pathlib import Path
from typing import Any, Iterable

import xxhash
from mer_runtime.manifest import (COMPANION_DIR, MAX_COMPANION_BYTES, MAX_COMPANION_TOTAL, MAX_COMPANIONS,
                                  SAME_FILE, plain_name, same_file_key)
from mer_runtime.safeopen import kind_of, read_regular

from .errors import SourceError

# weights in any framework's format, and archives: never companions (the checkpoint's own weights are the shards)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".hdf5", ".msgpack",
                   ".onnx", ".onnx_data", ".tflite", ".pb", ".ot", ".npy", ".npz", ".pkl", ".pickle", ".joblib",
                   ".nemo", ".mlmodel", ".keras", ".distcp", ".tar", ".zip", ".gz", ".tgz", ".zst", ".xz", ".bz2",
                   ".7z")
HANDLED = ("model.safetensors.index.json",)  # the source's shard map: read by the converter, in the reassembly record
# (config.json is a companion: an engine or transformers reads it beside the tokenizer, and a --dtype folder keeps no
# record of it; reassemble writes it once, from the record when the folder has one)
RESERVED = (*HANDLED, "model.safetensors")  # the checkpoint's own names: no companion may be one file with them
CASE_TWIN = ("its name differs from another file's only in case or Unicode normalization (one would overwrite the "
             "other on some disks)")
# what an inference engine or transformers reads beside the weights: first in line when the count or total bound
# leaves some files out (a folder of 200 notes must not cost the tokenizer its place)
FIRST = ("config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
         "*.tiktoken", "tekken.json", "generation_config.json", "chat_template*", "preprocessor_config.json",
         "processor_config.json", "*.py", "LICENSE*")

def wanted(name: str) -> bool:
    """Whether a top-level file of this name is a companion candidate (before its name, size and kind are checked).

    >>> [wanted(n) for n in ("tokenizer.json", "model-00001-of-00002.safetensors", "pytorch_model.bin.index.json",
    ...                      "model.safetensors.index.json", ".gitattributes", "modeling_deepseek.py", "config.json")]
    [True, False, False, False, False, True, True]
    """
    low = name.lower()
    if name.startswith(".") or name in HANDLED or low.endswith(WEIGHT_SUFFIXES):
        return False
    return not (low.endswith(".index.json") and low[:-len(".index.json")].endswith(WEIGHT_SUFFIXES))


def case_order(name: str) -> tuple[str, bool, bool, str]:
    """Sort key: by ``same_file_key``, and of names that are one file on some disks the lowercase one first, then
    the one in NFC (the form most tools write; macOS's older HFS+ stored NFD)."""
    return same_file_key(name), name != name.lower(), name != unicodedata.normalize("NFC", name), name


def select(files: Iterable[tuple[str, int]]) -> tuple[list[str], list[dict[str, str]]]:
    """(names kept, [{name, why}] skipped) of the candidates ``(name, size)`` (already passed by ``wanted``), with
    the bounds on size, count and total; of names that are one file on some disks (``same_file_key``; or one with a
    ``RESERVED`` name) the one first in ``case_order``, the others skipped; the files named in ``FIRST`` are taken
    first, then the rest, each in name order, and the names kept are returned in name order. One rule for a local
    folder and for a hub listing."""
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    folded, distinct = {same_file_key(n) for n in RESERVED}, []
    for name, size in sorted(files, key=lambda f: case_order(f[0])):
        if same_file_key(name) in folded:
            skipped.append({"name": name, "why": CASE_TWIN})
        else:
            folded.add(same_file_key(name))
            distinct.append((name, size))
    total = 0
    for name, size in sorted(distinct, key=lambda f: (not any(fnmatch.fnmatchcase(f[0], g) for g in FIRST), f)):
        why = None
        if not plain_name(name):
            why = "its name is not a plain file name (a control character, a backslash, or over 255 bytes)"
        elif size > MAX_COMPANION_BYTES:
            why = f"{size} bytes, more than the {MAX_COMPANION_BYTES >> 20} MiB kept per companion file"
        elif len(kept) >= MAX_COMPANIONS:
            why = f"more than {MAX_COMPANIONS} companion files"
        elif total + size > MAX_COMPANION_TOTAL:
            why = f"the companion files would pass {MAX_COMPANION_TOTAL >> 20} MiB in all"
        if why is None:
            kept.append(name)
            total += size
        else:
            skipped.append({"name": name, "why": why})
    return sorted(kept), skipped


def local(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """(paths kept, skipped) among the files at the top level of a checkpoint folder."""
    cands, skipped = [], []
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise SourceError(f"{folder}: cannot be listed ({exc.strerror or exc})") from None
    for name in names:
        if not wanted(name):
            continue
        p = folder / name
        try:
            st = os.stat(p)  # links followed, as for the shards
        except OSError as exc:
            skipped.append({"name": name, "why": "a link to nothing" if os.path.islink(p) else
                            f"cannot be read ({exc.strerror or exc})"})
            continue
        if stat.S_ISDIR(st.st_mode) and not os.path.islink(p):
            continue  # a subfolder: only the top level is kept
        if not stat.S_ISREG(st.st_mode):
            skipped.append({"name": name, "why": f"{kind_of(st.st_mode)}, not a regular file"})
            continue
        cands.append((name, st.st_size))
    kept, more = select(cands)
    return [folder / n for n in kept], skipped + more


def total_size(paths: Iterable[Path]) -> int:
    """Their bytes, for the free-space check (a file gone meanwhile counts 0: ``write`` names it)."""
    n = 0
    for p in paths:
        try:
            n += os.stat(p).st_size
        except OSError:
            pass
    return n


def check_given(paths: list[Path]) -> None:
    """Refuse, before any work, a list of companion files given by the caller (``extract(companions=...)``) that
    the manifest could not hold: a name that is not a plain file name, two that are one file in ``OUT/hf/`` (the
    same name, or names that differ only in case or Unicode normalization), a checkpoint's own name, or more than
    ``MAX_COMPANIONS``. (The rule's skips are for files found in a folder; files given by name are the caller's
    choice, so a conflict is an error naming both.)"""
    if len(paths) > MAX_COMPANIONS:
        raise SourceError(f"{len(paths)} companion files given; at most {MAX_COMPANIONS} fit in a manifest")
    seen = {same_file_key(n): Path(n) for n in RESERVED}
    for p in paths:
        if not plain_name(p.name):
            raise SourceError(f"{p}: its name is not a plain file name (control characters, a backslash or over 255 "
                              "bytes), so it cannot be a companion file; rename it or leave it out")
        other = seen.setdefault(same_file_key(p.name), p)
        if other is not p:
            raise SourceError(f"{other} and {p}: both would be written as hf/{p.name} (the same name, or names that "
                              f"{SAME_FILE}); give one of them")


def write(paths: Iterable[Path], staging: Path) -> list[dict[str, Any]]:
    """Copy each file (its own name) into ``staging/hf/``; the manifest's ``companions`` entries. A file that is no
    longer a regular file of at most the bound (it changed since it was chosen) is an error naming it."""
    entries, total = [], 0
    for p in paths:
        data = read_regular(p, MAX_COMPANION_BYTES, error=SourceError,
                            hint="a companion file of the checkpoint changed while being copied: run the command again")
        total += len(data)
        if total > MAX_COMPANION_TOTAL:  # files given by name (the rule's own choice stays within it)
            raise SourceError(f"{p}: the companion files come to more than {MAX_COMPANION_TOTAL} bytes, which a "
                              "manifest cannot hold; give fewer")
        rel = f"{COMPANION_DIR}/{p.name}"
        (staging / COMPANION_DIR).mkdir(exist_ok=True)
        with open(staging / rel, "xb") as fh:
            fh.write(data)
        entries.append({"path": rel, "size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)})
    return entries
