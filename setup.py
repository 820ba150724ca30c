"""Only the optional C kernel lives here; everything else is in pyproject.toml.

The extension is a plain shared library loaded with ctypes (mer_runtime.kernels): no Python C-API, and the GIL
is released during each call. optional=True: without a C compiler the install still succeeds and the runtime
falls back to NumPy and gguf's dequantization (slower; `mertools inspect` says which path each type takes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mer_runtime._kernels",
            sources=["runtime/mer_runtime/_kernels.c"],
            # No -march=native: the shipped library must run on any x86-64 (and elsewhere); the AVX2/FMA/F16C and
            # AVX-VNNI paths are compiled per function with target attributes and picked at run time.
            extra_compile_args=["-O3", "-fno-strict-aliasing", "-pthread", "-std=gnu11"],
            extra_link_args=["-pthread"],
            libraries=["m"],
            optional=True,
        )
    ]
)
