"""Seeded structural mutations of a real manifest: every value replaced by hostile ones, one at a time.

The reader either accepts the manifest or raises ManifestError; nothing else escapes, and what it accepts
`verify` can check without raising (a problem list at worst).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from mer_runtime import ManifestError, load_manifest
from mer_runtime.manifest import manifest_bytes
from mertools import verify

from conftest import REAL

HOSTILE = [None, True, -1, 0, 1, 2**31, 2**63, 2**64 + 1, 10**20, 1.5, -0.0, 1e308, "", "x", "../x", "/etc/passwd",
           "Q4_0", "F32", "swiglu_oai", [], [0], [2**40, 2**40], {}, {"kind": "swiglu"}, {"a": {"b": {"c": []}}}]


def paths(value, prefix=()):
    """Every (path to a value) in a decoded JSON document."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def replace(doc, path, value):
    if not path:
        return value
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return doc


@pytest.fixture(scope="module")
def base(tmp_path_factory, extracted):
    out = tmp_path_factory.mktemp("mut") / "o"
    shutil.copytree(extracted(REAL / "gptoss-mxfp4_moe.gguf"), out)
    return out, json.loads((out / "manifest.json").read_bytes())


@pytest.mark.parametrize("seed", range(6))
def test_hostile_values_anywhere(base, seed):
    out, raw = base
    rng = random.Random(seed)
    all_paths = list(paths(raw))
    accepted = refused = 0
    try:
        for _ in range(60):
            doc = replace(json.loads(json.dumps(raw)), rng.choice(all_paths), rng.choice(HOSTILE))
            if not isinstance(doc, dict):
                continue
            (out / "manifest.json").write_bytes(manifest_bytes(doc))
            try:
                load_manifest(out)
                accepted += 1
            except ManifestError:
                refused += 1
            r = verify(out)  # never raises on a damaged folder
            assert r.ok or r.problems
    finally:
        (out / "manifest.json").write_bytes(manifest_bytes(raw))
    assert refused > 0 and accepted + refused > 50
