"""The runtime is importable on its own and never imports the converter."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT


def test_runtime_sources_never_import_mertools():
    for py in (ROOT / "runtime" / "mer_runtime").rglob("*.py"):
        tree = ast.parse(py.read_text(), str(py))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n == "mertools" or n.startswith("mertools.") for n in names), f"{py}: imports {names}"


def test_importing_the_runtime_loads_no_converter_module():
    code = (
        "import sys, pkgutil, importlib, mer_runtime\n"
        "for m in pkgutil.iter_modules(mer_runtime.__path__):\n"
        "    if m.name not in ('_kernels', '_uring_atomics', '_sigbus_guard'):  # ctypes libraries, not Python modules\n"
        "        importlib.import_module('mer_runtime.' + m.name)\n"
        "bad = [m for m in sys.modules if m == 'mertools' or m.startswith('mertools.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
