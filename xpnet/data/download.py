"""Downloads into xpnet's cache with checksums, never leaving a partial file where a complete one
is expected.

Each file is streamed to a temporary file in the destination folder while its MD5 is computed,
checked against the expected length and checksum, and only then renamed into place (an atomic
``os.replace``, over a corrupted earlier copy if there is one: nothing is deleted first). A
failure of any kind removes the temporary file. Only xpnet's own cache is written this way; a
folder the user names (``data_dir``) is read as it is and never written to (see datasets.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DataError, os_reason

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
    try:
        handle = tempfile.NamedTemporaryFile(
            dir=destination.parent, prefix=f".{destination.name}.", suffix=".part", delete=False
        )
    except OSError as exc:
        reason = os_reason(exc, destination.parent)
        raise DataError(f"{destination.parent}: cannot write a temporary file there ({reason})") from exc
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
            cause = getattr(exc, "reason", None) or exc  # URLError wraps the socket's error
            reason = getattr(cause, "strerror", None) or str(cause)
        raise DataError(f"{url}: download failed ({reason})") from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the download folder ({os_reason(exc, folder)})") from exc


def _remove_stale(destination: Path) -> None:
    """Temporary files of ``destination`` left by a killed process (best effort)."""
    for stale in destination.parent.glob(f".{destination.name}.*.part"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _md5_of_cached(destination: Path) -> str | None:
    """The MD5 of the file at ``destination``, None when there is none; DataError when unreadable."""
    if not os.path.lexists(destination):
        return None
    try:
        return md5_of(destination)
    except OSError as exc:
        raise DataError(f"{destination}: cannot read the file ({os_reason(exc, destination)})") from exc


def download(urls: list[str], destination, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch one file into xpnet's cache from the first mirror that delivers it intact; return its path.

    A file already at ``destination`` with the right checksum is kept. One with the wrong
    checksum (a corrupted earlier download) is replaced only by a complete, verified download
    (``os.replace`` over it); if every mirror fails it stays as it was and the message says its
    MD5 mismatched. Temporary files left by a killed process are removed. For the cache only:
    ``load_dataset`` never calls this for a folder the user names.
    """
    destination = Path(destination)
    _make_folder(destination.parent)
    _remove_stale(destination)
    cached = _md5_of_cached(destination)
    if cached == md5:
        return destination
    failures = []
    for url in urls:
        try:
            _fetch(url, destination, md5, timeout)
            return destination
        except DataError as exc:
            failures.append(str(exc))
    kept = ""
    if cached is not None:
        kept = f" The {destination.name} there has MD5 {cached}, not the expected {md5}; it was left as it was."
    raise DataError(
        "could not download "
        + destination.name
        + ": "
        + "; ".join(failures)
        + f". Without network access, put the file (MD5 {md5}) in {destination.parent} by hand, "
        "or point --data-dir (XPNET_DATA_DIR) at a folder that has it." + kept
    )
