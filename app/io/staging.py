"""All-or-nothing output files: every output of one series is written into a hidden staging folder
beside the outputs and moved into place together at the end, so a failure in any writer (a full disk
while writing the SEG, a refused series) leaves none of them.

Usage::

    outs = OutputSet(out_dir, overwrite=False)
    with outs:                                    # leaving by an exception removes everything staged
        with outs.writing("nifti", "case_seg.nii.gz") as path:
            save_labels_nifti(labels, affine, path)
        with outs.writing("seg", "case_seg.dcm") as path:
            write_seg(..., path)
    outs.final  # {"nifti": out_dir/case_seg.nii.gz, "seg": out_dir/case_seg.dcm}, all in place

Adding an output format is one more ``writing`` block. The staging folder is
``.segapp-partial-<host>-<pid>-<random>`` in the output folder (same file system, so the final moves
are renames); one left by a killed process is removed by the next :class:`OutputSet` there
(:func:`remove_stale_staging`). The renames happen one after the other: a process killed during
those microseconds can leave some outputs of the set; ``infer-batch`` redoes such a series (its done
marker is written after the set).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from app.errors import ENV_ERRNOS, ConfigError, env_error, root_os_error

STAGING_PREFIX = ".segapp-partial-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove staging folders in ``folder`` left by dead processes of this host; return them."""
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    pattern = re.compile(re.escape(STAGING_PREFIX) + re.escape(_host()) + r"-(\d+)-")
    for entry in root.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def refuse_existing(folder: str | os.PathLike, names: Iterable[str], overwrite: bool = False) -> None:
    """ConfigError naming the first of ``names`` (relative to ``folder``) that exists, unless ``overwrite``."""
    if overwrite:
        return
    for name in names:
        path = Path(folder) / name
        if path.exists() or path.is_symlink():
            raise ConfigError("output exists (use --overwrite to replace it)", path)


class OutputSet:
    """The outputs of one series, written into a staging folder and moved into place together.

    Args:
        folder: the output folder (created when missing).
        overwrite: replace existing outputs; otherwise an existing one is a ``ConfigError`` naming it.
    """

    def __init__(self, folder: str | os.PathLike, overwrite: bool = False):
        self.folder = Path(folder)
        self.overwrite = bool(overwrite)
        self.final: dict[str, Path] = {}
        self._staged: dict[str, tuple[Path, Path]] = {}  # kind -> (staged path, final path)
        self._staging: Path | None = None

    # -- staging -------------------------------------------------------------------------------------
    def _staging_dir(self) -> Path:
        if self._staging is None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                remove_stale_staging(self.folder)
                name = f"{STAGING_PREFIX}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
                self._staging = self.folder / name
                self._staging.mkdir()
            except OSError as exc:
                raise env_error(exc, "cannot write in the output folder", self.folder) from exc
        return self._staging

    def path(self, kind: str, name: str) -> Path:
        """The staged path to write output ``kind`` to; it becomes ``folder/name`` on commit.

        ``name`` may hold subfolders (``a/case_seg.nii.gz``); its final file must not exist unless
        ``overwrite``.
        """
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"output name must be a relative path inside the output folder: {name!r}")
        if kind in self._staged:
            raise ValueError(f"output {kind!r} staged twice")
        final = self.folder / rel
        refuse_existing(self.folder, [name], self.overwrite)
        staged = self._staging_dir() / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        self._staged[kind] = (staged, final)
        return staged

    def staged(self, kind: str) -> Path:
        """Where output ``kind`` (already written in this set) lies until the set is committed."""
        if kind not in self._staged:
            raise ValueError(f"output {kind!r} is not staged")
        return self._staged[kind][0]

    @contextlib.contextmanager
    def writing(self, kind: str, name: str) -> Iterator[Path]:
        """``with outs.writing(kind, name) as path:`` write the file at ``path``; an OSError of the
        machine (disk full, permissions, I/O) becomes an ``EnvError`` naming the final output file."""
        staged = self.path(kind, name)
        try:
            yield staged
        except OSError as exc:
            root = root_os_error(exc) or exc
            inside = root.filename is None or str(self._staging or "") in str(root.filename)
            if inside or (root.errno in ENV_ERRNOS):
                where = self.folder / name if inside else root.filename
                raise env_error(exc, "cannot write this output", where) from exc
            raise
        if not staged.is_file():
            raise ValueError(f"the {kind} writer did not write {staged}")

    # -- commit / abort ------------------------------------------------------------------------------
    def commit(self) -> dict[str, Path]:
        """fsync every staged file and rename it over its final path; return ``{kind: final path}``."""
        moved: list[tuple[Path, bool]] = []
        try:
            for staged, final in self._staged.values():
                refuse_existing(self.folder, [str(final.relative_to(self.folder))], self.overwrite)
                with open(staged, "rb") as fh:
                    os.fsync(fh.fileno())
            for kind, (staged, final) in self._staged.items():
                final.parent.mkdir(parents=True, exist_ok=True)
                existed = final.exists()
                os.replace(staged, final)
                moved.append((final, existed))
                self.final[kind] = final
            _fsync_dir(self.folder)
        except (OSError, ConfigError) as exc:
            for final, existed in moved:  # undo what this set added (replaced files cannot come back)
                if not existed:
                    with contextlib.suppress(OSError):
                        final.unlink()
            self.final = {}
            if isinstance(exc, OSError):
                raise env_error(exc, "cannot move the outputs into place", exc.filename or self.folder) from exc
            raise
        finally:
            self.abort()
        return dict(self.final)

    def abort(self) -> None:
        """Remove the staging folder and everything in it (the final paths are untouched)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
