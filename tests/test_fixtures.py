"""The committed generated fixtures are exactly what scripts/make_fixtures.py writes."""

from __future__ import annotations

import subprocess
import sys

from conftest import GEN, ROOT


def test_make_fixtures_reproduces_committed_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fixtures.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    made = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert made == sorted(p.name for p in GEN.glob("*.gguf"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (GEN / name).read_bytes(), name
