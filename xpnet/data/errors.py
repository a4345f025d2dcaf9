"""The one error type of the data package: each message names the file or URL and the problem."""

from __future__ import annotations

import os
from pathlib import Path


class DataError(ValueError):
    """A dataset that cannot be read, found or downloaded."""


def os_reason(exc: OSError, path) -> str:
    """Why ``exc`` happened at ``path``, in words: a path that runs into a file names that file
    ("it is a file", "/a/b is a file"); otherwise the system's own reason."""
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        path = Path(path)
        for candidate in (path, *path.parents):
            if os.path.lexists(candidate):
                if not candidate.is_dir():
                    return "it is a file" if candidate == path else f"{candidate} is a file"
                break
    return exc.strerror or str(exc)


def shown(value) -> str:
    """``value`` for an error message: a number, None or a short string as written, anything else
    by its type."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
