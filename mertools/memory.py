"""How much memory this process may still take, so that a request too large for it is refused before allocating."""

from __future__ import annotations

import os
from pathlib import Path

from mer_runtime import load_manifest

from .errors import MertoolsError
from .units import human_bytes


def available_memory() -> int | None:
    """Bytes the kernel says it can hand out without swapping (MemAvailable), capped by this cgroup's limit.

    None where neither can be read (the caller then relies on catching MemoryError).

    >>> (available_memory() or 1) > 0
    True
    """
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            pass
    try:  # a container's limit is lower than the machine's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = max(0, int(limit) - used)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_cache_memory(folder: str | os.PathLike[str], slots: int) -> None:
    """Refuse ``--cache-slots`` whose buffers (one slot = the largest expert file) would not fit in memory.

    >>> check_cache_memory("out/", 100_000_000)   # doctest: +SKIP
    Traceback (most recent call last):
    MertoolsError: --cache-slots 100000000: needs 1.1 TiB of memory ...
    """
    m = load_manifest(folder)
    slot = m.max_expert_size
    need = slot * max(2, slots)
    avail = available_memory()
    if avail is not None and need > avail:
        raise MertoolsError(
            f"--cache-slots {slots}: {folder} needs {human_bytes(need)} of memory for that many slots "
            f"({human_bytes(slot)} each) but {human_bytes(avail)} is available; use fewer slots "
            f"({len(m.experts)} hold every expert of this folder)"
        )
