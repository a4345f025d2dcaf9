"""Entry point of the ``xpnet`` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from .app import app
    except ImportError as exc:  # typer missing: the library works, the command line does not
        print(f"xpnet: the command line needs typer ({exc}): pip install xpnet", file=sys.stderr)
        return 2
    try:
        app(args=argv, prog_name="xpnet")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
