"""Starting a command loads only what it needs: `import mertools.cli` and `mertools --help` import none of numpy,
gguf, the hub client or any command's implementation (each command imports its own when it runs), while the
packages' public names resolve as they did when the packages imported them up front."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mertools.cli import main

# Whatever a start may load of ours; anything else (mertools.verify, mertools.deep, mer_runtime.manifest, ...) drags
# numpy and gguf in.
LIGHT = {"mertools", "mertools.cli", "mertools.errors", "mertools.units", "mer_runtime", "mer_runtime.errors",
         "mer_runtime.lazy"}
HEAVY = ("numpy", "gguf", "yaml", "huggingface_hub", "safetensors", "tqdm", "zstandard", "xxhash",
         "importlib.metadata")  # importlib.metadata: 15-20 ms, for --version only


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    p = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('MODULES', *sorted(sys.modules))"],
                       capture_output=True, text=True, check=True)
    return set(p.stdout.rpartition("MODULES ")[2].split())


@pytest.mark.parametrize("code", [
    "import mertools.cli",
    "from mertools.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from mertools.cli import main\ntry:\n    main(['verify', '--help'])\nexcept SystemExit:\n    pass",
    "import mertools, mer_runtime",
])
def test_a_start_imports_no_command_and_nothing_heavy(code):
    mods = loaded_after(code)
    ours = {m for m in mods if m.split(".")[0] in ("mertools", "mer_runtime")}
    assert ours <= LIGHT, f"imported at start: {sorted(ours - LIGHT)}"
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY or m in HEAVY)
    assert not heavy, f"imported at start: {heavy}"


def test_public_names_resolve_as_before():
    """mertools.extract and mertools.verify stay the functions even when their submodules were imported first (the
    import system binds a submodule to its package's attribute); every name of __all__ resolves and is in dir();
    a submodule is reached as an attribute, as when the package imported it up front."""
    code = """
import inspect
from mertools.extract import parse_ranges
import mertools.verify
import mertools, mer_runtime
from mertools import *
from mer_runtime import *
assert inspect.isfunction(extract) and extract.__module__ == "mertools.extract", extract
assert inspect.isfunction(verify) and verify.__module__ == "mertools.verify", verify
assert mertools.extract is extract and mertools.verify is verify
for pkg in (mertools, mer_runtime):
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None and name in dir(pkg), name
assert mertools.__version__ and callable(mertools.commit.test_point) and mer_runtime.uring.__name__
assert not hasattr(mertools, "no_such_name") and not hasattr(mer_runtime, "_kernels")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_commands_help(command):
    r = CliRunner().invoke(main, [command, "--help"], prog_name="mertools")
    assert r.exit_code == 0 and r.output.startswith(f"Usage: mertools {command} "), r.output
