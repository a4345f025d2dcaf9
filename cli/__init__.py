"""The ``xpnet`` command line (the full typer application is built in a later issue)."""
