"""Make the kernel refuse io_uring or O_DIRECT for this process, as a locked-down container or a filesystem would.

A seccomp filter (x86-64 only) answers io_uring_setup with EPERM (Docker's default profile does the same) and any
open/openat with O_DIRECT with EINVAL (what filesystems without O_DIRECT support return), and, with
`refuse_sparse_buffers`, io_uring_register(IORING_REGISTER_BUFFERS2) with EINVAL (a kernel before 5.19, which has no
sparse buffer table, answers so). Used by the fallback
tests in a child process: the refusal is real, from the kernel, not a stub.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
O_DIRECT_X86 = 0o40000
NR_OPEN, NR_OPENAT, NR_IO_URING_SETUP, NR_IO_URING_REGISTER = 2, 257, 425, 427
IORING_REGISTER_BUFFERS2 = 15
RET_ALLOW = 0x7FFF0000


def _ret_errno(e: int) -> int:
    return 0x00050000 | e


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def install(refuse_io_uring: bool = False, refuse_o_direct: bool = False, refuse_sparse_buffers: bool = False) -> None:
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    prog: list[tuple[int, int, int, int]] = []

    def ins(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        prog.append((code, jt, jf, k))

    ins(LD, 4)  # arch
    ins(JEQ, AUDIT_ARCH_X86_64, 1, 0)
    ins(RET, RET_ALLOW)
    ins(LD, 0)  # syscall number
    if refuse_io_uring:
        ins(JEQ, NR_IO_URING_SETUP, 0, 1)
        ins(RET, _ret_errno(errno.EPERM))
    if refuse_o_direct:
        for nr, arg in ((NR_OPENAT, 2), (NR_OPEN, 1)):
            ins(JEQ, nr, 0, 4)
            ins(LD, 16 + 8 * arg)  # low 32 bits of the flags argument
            ins(JSET, O_DIRECT_X86, 0, 1)
            ins(RET, _ret_errno(errno.EINVAL))
            ins(LD, 0)  # reload the number for the next test
    if refuse_sparse_buffers:
        ins(JEQ, NR_IO_URING_REGISTER, 0, 4)
        ins(LD, 16 + 8 * 1)  # low 32 bits of the opcode argument
        ins(JEQ, IORING_REGISTER_BUFFERS2, 0, 1)
        ins(RET, _ret_errno(errno.EINVAL))
        ins(LD, 0)
    ins(RET, RET_ALLOW)
    raw = b"".join(struct.pack("<HBBI", *i) for i in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(SECCOMP)")
