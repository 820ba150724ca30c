"""Only the optional C kernel lives here; everything else is in pyproject.toml.

The extension is a plain shared library loaded with ctypes (mer_runtime.kernels): no Python C-API, and the GIL
is released during each call. optional=True: without a C compiler the install still succeeds and the runtime
falls back to NumPy for Q4_0/Q8_0 (slower; `mertools inspect` says which path each type takes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mer_runtime._kernels",
            sources=["runtime/mer_runtime/_kernels.c"],
            extra_compile_args=["-O3", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
