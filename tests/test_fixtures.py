"""The committed generated fixtures are exactly what scripts/make_fixtures.py writes."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import gguf

from conftest import GEN, ROOT


def test_make_fixtures_reproduces_committed_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fixtures.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    made = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert made == sorted(p.name for p in GEN.glob("*.gguf"))
    same_writer = (GEN / "WRITTEN_WITH").read_text().split() == ["gguf", version("gguf")]
    for name in made:
        if same_writer:
            assert (tmp_path / name).read_bytes() == (GEN / name).read_bytes(), name
        else:  # another gguf release may lay out the header differently; the tensors must still be the same
            a, b = gguf.GGUFReader(tmp_path / name), gguf.GGUFReader(GEN / name)
            assert [(t.name, t.data.tobytes()) for t in a.tensors] == [(t.name, t.data.tobytes()) for t in b.tensors]
