"""The one error type of the data package: each message names the file or URL and the problem."""

from __future__ import annotations

import os
from pathlib import Path

from ..checks import shown  # noqa: F401 - the data package's messages show values through it


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
