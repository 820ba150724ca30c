"""The io_uring binding on its own: a real ring, real O_DIRECT reads into registered buffers."""

from __future__ import annotations

import errno
import os

import pytest

from mer_runtime import uring
from mer_runtime.buffers import BufferPool

pytestmark = pytest.mark.skipif(uring.probe() is not None, reason=f"io_uring unavailable: {uring.probe()}")


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "data.bin"
    p.write_bytes(os.urandom(3 * 1024 * 1024))
    return p


@pytest.mark.parametrize("fixed", [True, False])
def test_o_direct_reads_land_in_aligned_buffers(data_file, fixed):
    pool = BufferPool(1 << 20, 3)
    fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
    with uring.Ring(8) as ring:
        if fixed:
            ring.register_buffers(pool.regions())
        for slot in range(3):
            ring.prep_read(fd, pool.address(slot), 1 << 20, slot << 20, 100 + slot, slot if fixed else None)
        got = {}
        while len(got) < 3:
            got.update(ring.wait(3 - len(got)))
    os.close(fd)
    assert got == {100: 1 << 20, 101: 1 << 20, 102: 1 << 20}
    blob = data_file.read_bytes()
    for slot in range(3):
        assert pool.view(slot).tobytes() == blob[slot << 20:(slot + 1) << 20]


def test_more_reads_than_ring_entries_wrap_around(data_file):
    pool = BufferPool(4096, 1)
    fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
    blob = data_file.read_bytes()
    with uring.Ring(2) as ring:
        ring.register_buffers(pool.regions())
        for i in range(50):  # 25 times round a 2-entry ring
            ring.prep_read(fd, pool.address(0), 4096, i * 4096, i, 0)
            ((ud, res),) = ring.wait(1)
            assert (ud, res) == (i, 4096)
            assert pool.view(0).tobytes() == blob[i * 4096:(i + 1) * 4096]
    os.close(fd)


def test_errors_come_back_as_negative_errno(data_file):
    pool = BufferPool(4096, 2)
    with uring.Ring(4) as ring:
        ring.prep_read(12345, pool.address(0), 4096, 0, 7, None)  # not an open fd
        assert ring.wait(1) == [(7, -errno.EBADF)]
        fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
        ring.prep_read(fd, pool.address(0) + 1, 4096, 0, 8, None)  # misaligned for O_DIRECT
        assert ring.wait(1) == [(8, -errno.EINVAL)]
        ring.prep_read(fd, pool.address(0), 4096, 3 << 20, 9, None)  # at end of file: 0 bytes
        assert ring.wait(1) == [(9, 0)]
        os.close(fd)


def test_probe_says_why_when_refused():
    assert uring.probe() is None  # here it works; refusals are exercised in test_loader_conformance
