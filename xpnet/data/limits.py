"""How much memory one array read from a file may take, checked before it is allocated.

Readers compute the size a file's header declares and call ``check_fits`` before allocating, so
a header that lies (or a file far larger than memory) is refused with a message instead of
taking the machine's memory. ``memory_limit`` is the one place the limit comes from; tests
monkeypatch it.
"""

from __future__ import annotations

import os

from .errors import DataError

__all__ = ["memory_limit", "format_bytes", "check_fits"]


def _physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say (Windows)."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _address_space_limit() -> int | None:
    """The soft RLIMIT_AS in bytes, or None when it is unlimited or unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (AttributeError, ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft <= 0 else soft


def memory_limit() -> int | None:
    """The most bytes one array may take: the smaller of physical memory and the soft
    RLIMIT_AS (when set); None when neither is known."""
    known = [n for n in (_physical_memory(), _address_space_limit()) if n is not None]
    return min(known) if known else None


def format_bytes(n: int) -> str:
    """A size in human units: '512 bytes', '1.5 KiB', '7.3 GiB'."""
    if n < 1024:
        return f"{n} bytes" if n != 1 else "1 byte"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def check_fits(path, nbytes: int, what: str) -> None:
    """Raise DataError naming ``path`` when ``what`` (e.g. "shape (60000, 28, 28)") needs more
    than ``memory_limit()`` bytes."""
    limit = memory_limit()
    if limit is not None and nbytes > limit:
        raise DataError(
            f"{path}: {what} needs {format_bytes(nbytes)}, more than the {format_bytes(limit)} of memory available"
        )
