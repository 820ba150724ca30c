"""A pool of 4096-aligned slots in one anonymous memory map, each large enough for the largest expert."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

ALIGN = 4096
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python names it from 3.13 on


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class BufferPool:
    """n_slots slots of slot_size bytes; mmap gives page (4096) alignment, so every slot is O_DIRECT-ready."""

    def __init__(self, slot_size: int, n_slots: int):
        if n_slots < 1 or slot_size < 1:
            raise ValueError("a buffer pool needs at least one slot of at least one byte")
        self.slot_size = align_up(slot_size)
        self.n_slots = n_slots
        self._mem = mmap.mmap(-1, self.slot_size * n_slots, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self._mem)
        self.base = ctypes.addressof(self._anchor)
        self.array = np.frombuffer(self._mem, dtype=np.uint8)
        assert self.base % ALIGN == 0

    def address(self, slot: int) -> int:
        return self.base + slot * self.slot_size

    def view(self, slot: int, nbytes: int | None = None) -> np.ndarray:
        start = slot * self.slot_size
        return self.array[start:start + (self.slot_size if nbytes is None else nbytes)]

    def prefault(self) -> bool:
        """Fault every page in now (MADV_POPULATE_WRITE: contents unchanged, so safe while reads land), so that the
        first read into a slot does not pay for it; False where the kernel cannot (before 5.14): they fault as
        reads land, as without this call."""
        try:
            self._mem.madvise(MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            return False
        return True

    def regions(self) -> list[tuple[int, int]]:
        return [(self.address(i), self.slot_size) for i in range(self.n_slots)]

    def close(self) -> None:
        if self._mem.closed:
            return
        del self.array, self._anchor
        try:
            self._mem.close()
        except BufferError:
            pass  # numpy views handed out still refer to it; the memory goes when the last of them does
