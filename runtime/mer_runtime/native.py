"""The runtime's optional C libraries (built at install when a compiler is there), loaded with ctypes.

Each caller declares its own entry points; this module only finds the file and opens it, so that a missing or
unloadable library means the same everywhere: None, and the caller's pure-Python path.

>>> from mer_runtime.native import load_library
>>> lib = load_library("_kernels")   # None where no compiler built it
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def load_library(stem: str) -> ctypes.CDLL | None:
    """The library `stem` (e.g. "_kernels") built beside this package, or None when absent or unloadable."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"{stem}{suffix}"
        if path.exists():
            try:
                return ctypes.CDLL(str(path))
            except OSError:  # built for another machine, or damaged: as good as none
                return None
    return None
