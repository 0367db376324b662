"""Errors that the CLI reports as one clear line (and a non-zero exit code) instead of a traceback."""

from __future__ import annotations


class SegappError(Exception):
    """Base class: a problem with the user's input or environment, worded for the user.

    ``path`` names the offending file or option when there is one.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(SegappError):
    """Bad input data (missing, corrupt, inconsistent)."""


class DicomError(InputError):
    """A DICOM file or series that cannot be used as it is."""


class ManifestError(InputError):
    """A manifest that does not match its data; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None, path: str | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n  " + "\n  ".join(self.problems)
        super().__init__(message, path)


class ConfigError(SegappError):
    """A bundle, option or config value that is wrong or missing."""
