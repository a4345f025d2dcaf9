"""The command line's one error type."""

from __future__ import annotations


class CLIError(Exception):
    """A problem to report in one line; ``code`` is the exit status (2 bad input, 1 runtime, 130 Ctrl-C)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


BROKEN_PIPE = "the standard output was closed before everything was written (broken pipe)"


def stdout_closed() -> None:
    """After a broken pipe: point stdout at /dev/null, so that the interpreter's final flush does
    not fail again (and print an ignored exception)."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


_reported: list[str] = []


def report(message: str) -> None:
    """Print the command's one error line on stderr (and remember that it was printed)."""
    import sys

    _reported.append(message)
    try:
        print(f"xpnet: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr is gone too: the exit status still tells


def reported() -> bool:
    return bool(_reported)


def forget_reports() -> None:
    """A new command starts with nothing reported (tests run several in one process)."""
    _reported.clear()
