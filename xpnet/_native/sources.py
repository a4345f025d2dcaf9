"""The digest of the native sources, computed the same way by setup.py (which compiles it into
the library as ``xpnet_source_hash()``) and by ``_fast_numpy`` (which loads the library only if
its digest is that of the sources beside it: a library built from other sources, such as a stale
build in a source checkout, could have other functions or arguments and crash the process).

This module imports nothing of xpnet's: setup.py runs it from its path, before xpnet is installed."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Every file the library is built from.
SOURCES = ("fused.c", "fused_typed.h", "images_typed.h", "pool.c", "pool.h", "xpnet_kernels.h")


def source_hash(folder=None) -> str:
    """SHA-256 (hex, the first 32 digits) over each source's name and bytes, in this order."""
    folder = Path(__file__).parent if folder is None else Path(folder)
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()[:32]
