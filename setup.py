"""Only the optional C libraries live here; everything else is in pyproject.toml.

Both are plain shared libraries loaded with ctypes (no Python C-API). optional=True: without a C compiler the
install still succeeds.
- `mer_runtime._kernels`: the Q4_0/Q8_0 kernels; the GIL is released during each call. Without it the runtime
  falls back to NumPy (slower; `mertools inspect` says which path each type takes).
- `mer_runtime._uring_atomics`: acquire/release accesses to the io_uring ring indices. Without it io_uring is used
  on x86-64 only (its memory model makes plain loads and stores acquire and release); elsewhere `--io auto` falls
  back to pread and says why.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mer_runtime._kernels",
            sources=["runtime/mer_runtime/_kernels.c"],
            extra_compile_args=["-O3", "-fno-strict-aliasing"],
            optional=True,
        ),
        Extension(
            "mer_runtime._uring_atomics",
            sources=["runtime/mer_runtime/_uring_atomics.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
