"""What `verify` (and `verify --deep`) found: one module both import, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Problem:
    """One finding, named by the path inside the folder it concerns (``manifest.json``, ``experts/L001/E0003.bin``).

    >>> str(Problem("dense.gguf", "missing"))
    'dense.gguf: missing'
    """

    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass
class VerifyReport:
    """Every problem (the folder is damaged: `ok` is False, the CLI exits 1) and warning of one verify run."""

    folder: Path
    experts_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    checksum_seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    deep: dict[str, Any] | None = None

    @property
    def gb_per_s(self) -> float:
        """Checksum throughput: bytes read over the time of the checksum pass alone."""
        return self.bytes_read / self.checksum_seconds / 1e9 if self.checksum_seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        d = {
            "folder": str(self.folder),
            "ok": self.ok,
            "experts_checked": self.experts_checked,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 4),
            "gb_per_s": round(self.gb_per_s, 4),
            "problems": [{"path": p.path, "problem": p.what} for p in self.problems],
            "warnings": [{"path": p.path, "problem": p.what} for p in self.warnings],
        }
        if self.deep is not None:
            d["deep"] = self.deep
        return d
