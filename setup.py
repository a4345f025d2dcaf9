"""Packages: the library's, found automatically, and the command line's top-level cli/ folder
installed as ``xpnet.cli`` (a top-level package named ``cli`` would collide with other projects').

The compiled kernels (xpnet/_native/*.c) are an optional extension: built when xpnet is installed
where there is a C compiler, and skipped, with setuptools' warning, where there is none. xpnet then
runs NumPy passes instead, says so in one warning line on first use, and ``xpnet devices`` shows
why. The flags keep to what any machine of the same architecture runs (no -march=native: a wheel
or an installed folder may be copied to another CPU), and keep the arithmetic the reference's:
no contraction into fused multiply-adds, no errno from the math functions.
Everything else is in pyproject.toml.
"""

import runpy
from pathlib import Path

from setuptools import Extension, find_packages, setup

NATIVE = Path(__file__).parent / "xpnet" / "_native"
#: The sources' digest, compiled in: the library is loaded only with the sources it was built from.
SOURCE_HASH = runpy.run_path(str(NATIVE / "sources.py"))["source_hash"](NATIVE)

KERNELS = Extension(
    "xpnet._native.fused",
    sources=["xpnet/_native/fused.c", "xpnet/_native/pool.c"],
    depends=[f"xpnet/_native/{name}" for name in ("fused_typed.h", "images_typed.h", "pool.h", "xpnet_kernels.h")],
    extra_compile_args=["-std=c11", "-O3", "-fno-math-errno", "-ffp-contract=off", "-pthread", "-Wall", "-Wextra"],
    extra_link_args=["-pthread"],
    libraries=["m"],
    define_macros=[("XPNET_SOURCE_HASH", f'"{SOURCE_HASH}"')],
    optional=True,
)

setup(
    packages=[*find_packages(include=["xpnet", "xpnet.*"]), "xpnet.cli"],
    package_dir={"xpnet.cli": "cli"},
    ext_modules=[KERNELS],
)
