"""Packages: the library's, found automatically, and the command line's top-level cli/ folder
installed as ``xpnet.cli`` (a top-level package named ``cli`` would collide with other projects').
Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["xpnet", "xpnet.*"]), "xpnet.cli"],
    package_dir={"xpnet.cli": "cli"},
)
