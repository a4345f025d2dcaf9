"""Entry point of the ``xpnet`` console script: every failure ends in one line on stderr."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        import typer

        from .app import app
    except ImportError as exc:  # typer missing: the library works, the command line does not
        print(f"xpnet: the command line needs typer ({exc}): pip install xpnet", file=sys.stderr)
        return 2
    try:
        result = app(args=argv, prog_name="xpnet", standalone_mode=False)
    except typer.Abort:
        print("xpnet: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # usage errors: unknown option, a value of the wrong type
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"xpnet: {message} (see xpnet --help)", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("xpnet: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
