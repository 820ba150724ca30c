"""reassemble on folders that are not an unconverted GGUF source: a SafeTensors-sourced folder, or one whose experts
were converted with --dtype, is refused through the real CLI with one line (exit 2), nothing written, no temp left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIX, run_cli

ST = FIX / "safetensors"
GEN_ALL = sorted(p.name for p in (ST / "gen").iterdir() if p.is_dir())
FP8 = "deepseek_v3_fp8"
REAL = ["real/mixtral-bf16-sharded", "real/gptoss-bf16"]


def _src(name: str) -> Path:
    return ST / name if name.startswith("real/") else ST / "gen" / name


@pytest.fixture(scope="module")
def st_extracted(tmp_path_factory):
    from mertools import extract

    cache: dict[tuple[str, str | None], Path] = {}

    def get(name: str, dtype: str | None = None) -> Path:
        if (name, dtype) not in cache:
            out = tmp_path_factory.mktemp("st") / name.replace("/", "_")
            extract(_src(name), out, fsync=False, dtype=dtype)
            cache[(name, dtype)] = out
        return cache[(name, dtype)]

    return get


def _refused(folder: Path, tmp_path: Path, *extra: str) -> str:
    dest = tmp_path / "dest"
    dest.mkdir()
    p = run_cli("reassemble", folder, dest / "back.gguf", *extra)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and not p.stdout
    assert list(dest.iterdir()) == []  # no output, no hidden temporary file
    return lines[0]


@pytest.mark.parametrize("name", [n for n in GEN_ALL if n != FP8] + REAL)
def test_safetensors_folder_is_refused_in_one_line(name, st_extracted, tmp_path):
    folder = st_extracted(name)
    line = _refused(folder, tmp_path)
    assert str(folder) in line and "SafeTensors checkpoint" in line
    first = json.loads((folder / "manifest.json").read_text())["source"]["files"][0]["name"]
    assert first in line  # the source the manifest records
    assert "original checkpoint" in line
    assert "older mertools" not in line and "gguf's reader" not in line


@pytest.mark.parametrize("name,dtype", [(FP8, "q8_0"), ("mixtral", "q4_0"), ("qwen3_5_moe", "bf16"),
                                        ("gpt_oss_mxfp4", "q8_0")])
def test_converted_safetensors_folder_can_never_give_the_source_back(name, dtype, st_extracted, tmp_path):
    folder = st_extracted(name, dtype)
    line = _refused(folder, tmp_path, "--overwrite")
    assert str(folder) in line and "SafeTensors checkpoint" in line
    assert dtype.upper() in line and "lossy" in line and "never give the source back" in line


def test_converted_gguf_folder_is_refused(tmp_path):
    from mertools import extract

    out = tmp_path / "conv"
    extract(FIX / "generated" / "moe-merged-f16.gguf", out, fsync=False, dtype="q8_0")
    line = _refused(out, tmp_path)
    assert "GGUF source, moe-merged-f16.gguf" in line and "Q8_0" in line and "lossy" in line


def test_json_mode_refuses_too(st_extracted, tmp_path):
    line = _refused(st_extracted("mixtral"), tmp_path, "--json")
    assert "SafeTensors" in line
