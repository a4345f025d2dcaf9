"""Entry point of the ``xpnet`` console script: every failure ends in one line on stderr.

That includes Ctrl-C at any moment after Python has started (during the imports too: exit 130)
and a reader that closes the output early (``xpnet evaluate RUN | head -1``: exit 2).
"""

from __future__ import annotations

import signal  # imported with the module: a Ctrl-C inside main() finds it ready
import sys


def main(argv: list[str] | None = None) -> int:
    previous = None
    try:
        previous = signal.getsignal(signal.SIGINT)
        _streams_present()
        from .errors import forget_reports

        forget_reports()
        return _run(argv)
    except KeyboardInterrupt:
        _ignore_interrupts(signal)  # a second Ctrl-C now cannot cut the report short
        _say("interrupted")
        return 130
    except BrokenPipeError:
        from .errors import BROKEN_PIPE, stdout_closed

        stdout_closed()
        _say(BROKEN_PIPE)
        return 2
    finally:
        if previous is not None:
            _restore_interrupts(signal, previous)


def _ignore_interrupts(signal) -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        pass


def _defer_interrupts(interrupted: list):
    """SIGINT only noted (in ``interrupted``) from now on; returns the handler to put back, or
    None where handlers cannot be set (not the main thread) or SIGINT is ignored: a process
    started with SIGINT ignored (``nohup``, a background job of a script) keeps ignoring it, as
    Python itself does, during the imports too."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return None
        return signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    except (ValueError, OSError):
        return None


def _restore_interrupts(signal, handler) -> None:
    try:
        signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError, TypeError):
        pass


def _stdout_was_closed() -> bool:
    """Whether click (which wraps stdout) or rich (which points it at /dev/null) has just seen
    stdout's reader go away."""
    import os

    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):
        return False


def _streams_present() -> None:
    """A closed stdout or stderr (``xpnet evaluate RUN >&-``) is None in Python: write to /dev/null."""
    import os

    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - for the life of the process


def _run(argv: list[str] | None) -> int:
    # A Ctrl-C during the imports (typer, rich, NumPy, xpnet and what they import) waits until
    # they are done: raised inside a third-party import, it could meet a bare ``except:`` there and
    # be lost, and the command would go on as if never interrupted.
    interrupted: list = []
    previous = _defer_interrupts(interrupted)
    try:
        import typer

        from .app import app
    except ImportError as exc:  # typer missing: the library works, the command line does not
        _say(f"the command line needs typer ({exc}): pip install xpnet")
        return 2
    finally:
        if previous is not None:
            _restore_interrupts(signal, previous)
    if interrupted:
        raise KeyboardInterrupt
    try:
        result = app(args=argv, prog_name="xpnet", standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, not as an ignored exception at exit
    except typer.Abort:
        _say("interrupted")
        return 130
    except SystemExit as exc:  # how click and rich end a write to a closed pipe (`xpnet --help | head -1`)
        if exc.code == 1 and _stdout_was_closed():
            from .errors import BROKEN_PIPE

            _say(BROKEN_PIPE)
            return 2
        raise exc
    except typer.TyperException as exc:  # usage errors: unknown option, a value of the wrong type
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _say(f"{message} (see xpnet --help)")
        return getattr(exc, "exit_code", 2)
    if result == 130:  # a Ctrl-C: typer turns one outside a command's body into exit 130, silently
        _ignore_interrupts(signal)
        _say("interrupted")
    return result if isinstance(result, int) else 0


def _say(line: str) -> None:
    """One line on stderr, unless the command has printed its own already."""
    from .errors import report, reported

    if not reported():
        report(line)


if __name__ == "__main__":
    sys.exit(main())
