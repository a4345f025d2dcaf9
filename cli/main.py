"""Entry point of the ``xpnet`` console script: every failure ends in one line on stderr.

That includes Ctrl-C at any moment after Python has started (during the imports too: exit 130)
and a reader that closes the output early (``xpnet evaluate RUN | head -1``: exit 2).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from .errors import forget_reports

        forget_reports()
        return _run(argv)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:
        from .errors import BROKEN_PIPE, stdout_closed

        stdout_closed()
        _say(BROKEN_PIPE)
        return 2


def _run(argv: list[str] | None) -> int:
    try:
        import typer

        from .app import app
    except ImportError as exc:  # typer missing: the library works, the command line does not
        _say(f"the command line needs typer ({exc}): pip install xpnet")
        return 2
    try:
        result = app(args=argv, prog_name="xpnet", standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, not as an ignored exception at exit
    except typer.Abort:
        _say("interrupted")
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, a value of the wrong type
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _say(f"{message} (see xpnet --help)")
        return getattr(exc, "exit_code", 2)
    if result == 130:  # typer turns a Ctrl-C outside a command's body into exit 130, silently
        _say("interrupted")
    return result if isinstance(result, int) else 0


def _say(line: str) -> None:
    """One line on stderr, unless the command has printed its own already."""
    from .errors import report, reported

    if not reported():
        report(line)


if __name__ == "__main__":
    sys.exit(main())
