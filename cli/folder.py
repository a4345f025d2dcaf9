"""Run folders: one writer at a time, and what a folder holds.

A writer (``xpnet train``, ``xpnet plot``) holds an exclusive OS lock on ``RUN_DIR/.xpnet.lock``
for as long as it writes there (``flock`` on POSIX, ``msvcrt.locking`` on Windows). The lock
belongs to the open file, so it goes when the process ends, however it ends: a killed run never
leaves a folder locked. A second writer gets one line naming the first one's process id.

Holding the lock, a writer removes the temporary files that a killed writer left behind (the
``.NAME.*.tmp`` files of ``xpnet.io``'s atomic writes): no other writer can own them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import CLIError

LOCK = ".xpnet.lock"
CONFIG, METRICS, CHECKPOINT, RESULTS = "config.json", "metrics.jsonl", "checkpoint.safetensors", "results.json"
WRITTEN = (CONFIG, METRICS, CHECKPOINT, RESULTS)


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def make_folder(path: Path, option: str) -> None:
    """Create ``path`` (and its parents), or say in one line why it cannot be."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a file, read-only, no permission, full disk
        raise CLIError(f"{option} {path}: cannot create the folder ({_os_reason(exc)})") from exc


class FolderLock:
    """The exclusive lock of one run folder, held from ``acquire`` until ``release``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        path = self.folder / LOCK
        # never through a link (it would overwrite what it points to), and only a regular file
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if path.is_symlink():
                raise CLIError(f"{path} is a symbolic link: xpnet's lock file must be a plain file") from exc
            raise CLIError(f"{self.folder}: cannot write to the run folder ({_os_reason(exc)})") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CLIError(f"{path} is not a plain file: it cannot be xpnet's lock file")
        if not _try_lock(fd):
            os.close(fd)
            raise CLIError(
                f"{self.folder} is in use by another xpnet process{_holder(path)}: "
                "one run folder has one writer at a time; wait for it to finish"
            )
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the process id is only for the message of a second writer
        self._fd = fd
        remove_leftovers(self.folder)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in ``folder``; call with the lock held."""
    removed = []
    for name in WRITTEN:
        for path in folder.glob(f".{name}.*.tmp"):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass  # it cannot be deleted: it does no harm, and the next writer tries again
    return removed


def describe(folder: Path) -> str:
    """What a run folder holds:

    * 'empty': nothing of a run (or no folder);
    * 'run': a checkpoint;
    * 'started': the config.json of an xpnet run interrupted before its first checkpoint, and no
      epochs (nothing to lose);
    * 'partial': results or epochs without a checkpoint (files of some run, never overwritten);
    * 'foreign': a config.json that is not an xpnet run's, or a folder where a run's file would be
      (never touched).

    Raises CLIError when the folder cannot be looked into.
    """
    try:
        if not folder.exists():
            return "empty"
        if not folder.is_dir():
            return "foreign"
        kinds = {name: _kind(folder / name) for name in WRITTEN}
    except OSError as exc:
        raise CLIError(f"{folder}: cannot look into the folder ({_os_reason(exc)})") from exc
    if any(kind not in ("file", None) for kind in kinds.values()):
        return "foreign"
    if kinds[CHECKPOINT]:
        return "run"
    has_epochs = kinds[METRICS] and (folder / METRICS).stat().st_size > 0
    if kinds[RESULTS] or has_epochs:
        return "partial"
    if kinds[CONFIG]:
        return "started" if is_xpnet_config(folder / CONFIG) else "foreign"
    return "empty"


def _kind(path: Path) -> str | None:
    """'file' for a regular file, 'other' for anything else (a folder, a link to nothing), None if absent."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "other" if path.is_symlink() else None
    return "file" if stat.S_ISREG(info.st_mode) else "other"


#: The largest config.json xpnet reads (its own are under 1 KB).
MAX_CONFIG_BYTES = 1 << 20


def is_xpnet_config(path: Path) -> bool:
    """Whether ``path`` is a JSON object written by xpnet (it names the xpnet version)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return False
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and isinstance(document.get("xpnet_version"), str)
