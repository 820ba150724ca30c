"""demo never deletes or overwrites a folder it did not create; its default output lives in one reused place."""

from __future__ import annotations

import json

from conftest import run_cli


def tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_non_empty_out_is_refused_and_nothing_deleted(tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "manifest.json").write_text("{}")
    (out / "manifest.json").write_text("{}")  # even a folder that looks like an output: the demo did not write it
    before = tree(out)
    p = run_cli("demo", "--out", out, "--tokens", "5")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and "not written by the demo" in line and "Nothing was changed" in line
    assert tree(out) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mine"]


def test_default_output_is_reused_in_the_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    first = json.loads(run_cli("demo", "--tokens", "5", "--json", env=env, check=True).stdout)
    home = cache / "mertools" / "demo"
    assert first["out"] == str(home) and first["verify"]["ok"]
    assert (home / ".mertools-demo").is_file() and (home / "manifest.json").is_file()
    second = json.loads(run_cli("demo", "--tokens", "5", "--json", env=env, check=True).stdout)
    assert second["out"] == str(home) and second["verify"]["ok"]  # its own earlier output is replaced
    assert sorted(x.name for x in home.parent.iterdir()) == ["demo"]  # no staging, lock or old copy left


def test_default_folder_with_foreign_content_is_refused(tmp_path):
    home = tmp_path / "cache" / "mertools" / "demo"
    home.mkdir(parents=True)
    (home / "precious").write_text("x")
    p = run_cli("demo", "--tokens", "5", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert p.returncode == 2 and "not written by the demo" in p.stderr and "Traceback" not in p.stderr
    assert [x.name for x in home.iterdir()] == ["precious"]


def test_generated_model_leaves_no_temp_folder(tmp_path):
    """Run from a folder without the bundled fixture: the generated model's temp folder is removed afterwards."""
    import os
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run([sys.executable, "-m", "mertools.cli", "demo", "--out", str(tmp_path / "o"), "--tokens", "5",
                        "--json"], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp)})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["model"].endswith("demo-mixtral-q4_0.gguf")
    assert list(tmp.iterdir()) == []
