"""Downloads with checksums, never leaving a partial file where a complete one is expected.

Each file is streamed to a temporary file in the destination folder while its MD5 is computed,
checked against the expected length and checksum, and only then renamed into place (an atomic
``os.replace``). A failure of any kind removes the temporary file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DataError

__all__ = ["download", "md5_of", "cache_dir"]

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where downloaded datasets live: $XPNET_DATA_DIR, else the user's cache directory."""
    configured = os.environ.get("XPNET_DATA_DIR")
    if configured:
        return Path(configured).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "xpnet"


def md5_of(path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, destination: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` to ``destination`` through a temporary file; raise DataError on any problem."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part", delete=False
    )
    temporary = Path(handle.name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with handle, urllib.request.urlopen(url, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if declared is not None and received != int(declared):
            raise DataError(f"{url}: download incomplete: {received} of {declared} bytes")
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(temporary, destination)
    except DataError:
        temporary.unlink(missing_ok=True)
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # network errors, short reads, bad URLs
        temporary.unlink(missing_ok=True)
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        raise DataError(f"{url}: download failed ({reason})") from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def download(urls: list[str], destination, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch one file from the first mirror that delivers it intact; return its path.

    A file already at ``destination`` with the right checksum is kept; one with the wrong
    checksum (a corrupted earlier download) is removed and fetched again.
    """
    destination = Path(destination)
    for stale in destination.parent.glob(f".{destination.name}.*.part"):  # left by a killed process
        stale.unlink(missing_ok=True)
    if destination.exists():
        if md5_of(destination) == md5:
            return destination
        destination.unlink()
    failures = []
    for url in urls:
        try:
            _fetch(url, destination, md5, timeout)
            return destination
        except DataError as exc:
            failures.append(str(exc))
    raise DataError(
        "could not download "
        + destination.name
        + ": "
        + "; ".join(failures)
        + f". Without network access, put the file (MD5 {md5}) in {destination.parent} by hand, "
        "or point --data-dir (XPNET_DATA_DIR) at a folder that has it"
    )
