"""Errors that the CLI reports as one clear line (and a non-zero exit code) instead of a traceback.

Raise these only at the boundary with the user: their input files, their options and configs, and
their machine or servers. A wrong argument from segapp's own code is a bug: ``ValueError`` /
``TypeError``, which the CLI prints with a traceback and a request for a report.

Exit codes: 2 input or config (``SegappError``), 3 a PACS send (``app.io.pacs.SendError``),
4 the environment (``EnvError``: folder not writable, disk full, memory, a server that does not answer).
"""

from __future__ import annotations

import errno
import os


class SegappError(Exception):
    """Base class: a problem with the user's input or environment, worded for the user.

    ``path`` names the offending file or option when there is one.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(SegappError):
    """Bad input data (missing, corrupt, inconsistent)."""


class DicomError(InputError):
    """A DICOM file or series that cannot be used as it is."""


class ManifestError(InputError):
    """A manifest that does not match its data; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None, path: str | os.PathLike | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n  " + "\n  ".join(self.problems)
        super().__init__(message, path)


class ConfigError(SegappError):
    """A bundle, option or config value that is wrong or missing."""


class EnvError(SegappError):
    """The machine or a server cannot do the job: an output folder that cannot be written, a full disk,
    too little memory, a tracking server that does not answer."""

    exit_code = 4


# errno -> what to tell the user (the OS's own words are often cryptic: "File too large").
_OS_WORDS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or the process's file-size limit (ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (failing disk or network file system?)",
    errno.ENOMEM: "out of memory",
    errno.EMFILE: "too many open files (ulimit -n)",
    errno.ENAMETOOLONG: "file name too long",
}
# errnos that are the machine's state, not segapp's doing: reported as EnvError, never as a bug
ENV_ERRNOS = frozenset(_OS_WORDS) - {errno.ENOENT, errno.EISDIR}


def root_os_error(exc: BaseException) -> OSError | None:
    """The OSError with an errno behind ``exc`` (libraries such as pydicom re-raise one without it)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return exc if isinstance(exc, OSError) else None


def os_error_words(exc: OSError) -> str:
    """A short phrase for an OSError (``no space left on the device``)."""
    root = root_os_error(exc) or exc
    if root.errno in _OS_WORDS:
        return _OS_WORDS[root.errno]
    if root.strerror:
        return root.strerror.lower()
    lines = str(root).strip().splitlines()
    return lines[0] if lines else type(root).__name__


def env_error(exc: OSError, action: str, path: str | os.PathLike | None = None) -> EnvError:
    """``EnvError`` for an OSError met while ``action`` (e.g. ``cannot write the outputs``), naming the file."""
    where = path if path is not None else (root_os_error(exc) or exc).filename
    return EnvError(f"{action}: {os_error_words(exc)}", where)
