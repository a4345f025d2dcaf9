"""How much memory one load from a file may take, checked before it is allocated.

Readers compute the size a file's header declares (with the copies the loader will make of it)
and call ``check_fits`` before allocating, so a header that lies (or a file far larger than
memory) is refused with a message instead of taking the machine's memory. ``memory_limit`` is
the one place the limit comes from; tests monkeypatch it (or its terms, ``_physical_memory``,
``_available_memory`` and ``_address_space_left``, or ``_MEMINFO``).
"""

from __future__ import annotations

import os

from .errors import DataError

__all__ = ["memory_limit", "format_bytes", "check_fits"]

#: Where Linux says how much memory is available now (``MemAvailable``); a module constant so
#: tests can point it at a file of their own.
_MEMINFO = "/proc/meminfo"
_STATM = "/proc/self/statm"


def _page_size() -> int | None:
    try:
        size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return size if size > 0 else None


def _physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say (Windows)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    page_size = _page_size()
    return pages * page_size if pages > 0 and page_size else None


def _available_memory() -> int | None:
    """Bytes of memory available now without swapping (Linux: ``MemAvailable`` in /proc/meminfo,
    free memory plus the page cache that can be reclaimed), or None where it is not known (other
    systems, kernels before 3.14)."""
    try:
        with open(_MEMINFO, "rb") as handle:
            for line in handle:
                if line.startswith(b"MemAvailable:"):
                    value, unit = line.split()[1:3]
                    return int(value) * 1024 if unit == b"kB" else None
    except (OSError, ValueError):
        return None
    return None


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


def _address_space_used() -> int | None:
    """Bytes of address space this process has mapped (Linux: /proc/self/statm), or None."""
    page_size = _page_size()
    try:
        with open(_STATM, "rb") as handle:
            pages = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * page_size if page_size else None


def _address_space_left() -> int | None:
    """What the soft RLIMIT_AS (when set) leaves to map: the limit less the address space already
    mapped where that is known (the interpreter and its libraries hold some); None without a limit."""
    limit = _address_space_limit()
    if limit is None:
        return None
    return max(limit - (_address_space_used() or 0), 0)


def memory_limit() -> int | None:
    """The most bytes one load may take now: the smallest of physical memory, the memory
    available now (Linux's MemAvailable: what other processes and this one have taken is not
    there to take) and what the soft RLIMIT_AS leaves of the address space; None when none is
    known. Read anew on each call (it changes as memory is taken); tests monkeypatch it."""
    known = [n for n in (_physical_memory(), _available_memory(), _address_space_left()) if n is not None]
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


def check_fits(path, nbytes: int, what: str, *, copies=()) -> None:
    """Raise DataError naming ``path`` when ``what`` (e.g. "shape (60000, 28, 28)", ``nbytes``
    bytes) and the ``copies`` made of it (pairs (description, bytes), e.g. ("float32 copy",
    188160000)) need more than ``memory_limit()`` bytes in all."""
    total = nbytes + sum(size for _, size in copies)
    limit = memory_limit()
    if limit is None or total <= limit:
        return
    if copies:
        made = " and ".join(f"its {name} ({format_bytes(size)})" for name, size in copies)
        what = f"{what} ({format_bytes(nbytes)}) and {made} need"
    else:
        what = f"{what} needs"
    raise DataError(f"{path}: {what} {format_bytes(total)}, more than the {format_bytes(limit)} of memory available")
