"""Placeholder entry point for the ``xpnet`` console script.

The typer application (train, evaluate, predict, gradcheck, devices, plot) is a separate issue;
until it lands this entry point reports the version and the devices available here.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import xpnet

    args = sys.argv[1:] if argv is None else argv
    if args in ([], ["--version"], ["devices"]):
        print(f"xpnet {xpnet.__version__}")
        print("devices: " + ", ".join(xpnet.available_devices()))
        return 0
    print(
        f"xpnet: the command line is not built yet (got {' '.join(args)!r}); use the library: import xpnet",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
