"""Only the optional C libraries live here; everything else is in pyproject.toml.

Both are plain shared libraries loaded with ctypes (no Python C-API). optional=True: without a C compiler the
install still succeeds.
- `mer_runtime._kernels`: the block kernels and the one-call MoE step; the GIL is released during each call.
  Without it the runtime falls back to NumPy and gguf's dequantization (slower; `mertools inspect` says which path
  each type takes).
- `mer_runtime._uring_atomics`: acquire/release accesses to the io_uring ring indices. Without it io_uring is used
  on x86-64 only (its memory model makes plain loads and stores acquire and release); elsewhere `--io auto` falls
  back to pread and says why.
- `mer_runtime._sigbus_guard`: turns SIGBUS from a mapped file that shrank while being read into a clear error
  (mer_runtime.guard). Without it that error is still raised when the file shrank between two pieces, but a file
  that shrinks during a piece ends the process.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mer_runtime._kernels",
            sources=["runtime/mer_runtime/_kernels.c"],
            # No -march=native: the shipped library must run on any x86-64 (and elsewhere); the AVX2/FMA/F16C,
            # AVX-VNNI and AVX-512 paths are compiled per function with target attributes and picked at run time.
            # -fno-wrapv undoes the -fwrapv of Python's own CFLAGS (signed overflow wrapping, which the kernels never
            # rely on): with it gcc keeps the loops' index arithmetic as it would in plain C. Q4_0 act="q8" matvec
            # x1.036-1.040 on 14336 x 4096 and moe() Q4_0 q8 x1.017-1.025, exact x1.010-1.045 (docs/runtime.md).
            extra_compile_args=["-O3", "-fno-strict-aliasing", "-fno-wrapv", "-pthread", "-std=gnu11"],
            extra_link_args=["-pthread"],
            libraries=["m"],
            optional=True,
        ),
        Extension(
            "mer_runtime._uring_atomics",
            sources=["runtime/mer_runtime/_uring_atomics.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "mer_runtime._sigbus_guard",
            sources=["runtime/mer_runtime/_sigbus_guard.c"],
            extra_compile_args=["-O2", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ]
)
