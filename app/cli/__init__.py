"""The ``segapp`` command: argument parsing and all printing. Nothing outside this package imports it."""

from app.cli.main import main

__all__ = ["main"]
