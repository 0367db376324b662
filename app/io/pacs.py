"""Send DICOM files to a PACS: DICOMweb STOW-RS or DIMSE C-STORE, with retries.

Destinations:

* ``dicomweb://HOST:PORT/PATH`` (``dicomwebs://`` for HTTPS): STOW-RS to ``http://HOST:PORT/PATH``
  (the DICOMweb root, e.g. ``/dicom-web``) with ``dicomweb_client``.
* ``dimse://AET@HOST:PORT``: C-STORE with pynetdicom as calling AE ``SEGAPP``, proposing for each
  file its own SOP Class and Transfer Syntax (plus the uncompressed syntaxes when the file is
  uncompressed, which pynetdicom can re-encode to).

Only files not yet stored are retried, with exponential backoff. Logs name the host, never patient
data; on final failure a :class:`SendError` says which files failed and that they remain on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from app.errors import ConfigError, SegappError

logger = logging.getLogger(__name__)

CALLING_AET = "SEGAPP"
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# C-STORE statuses that mean "stored" (0x0000 success; B000/B006/B007 stored with warnings).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(SegappError):
    """Sending to a PACS failed after all retries; the files are still on disk."""

    exit_code = 3


@dataclass(frozen=True)
class Destination:
    """A parsed destination. ``scheme`` is "dicomweb" or "dimse"; ``aet`` only for DIMSE."""

    scheme: str
    host: str
    port: int
    path: str = ""
    aet: str = ""
    https: bool = False

    @property
    def url(self) -> str:
        """The DICOMweb base URL (http[s]://HOST:PORT/PATH)."""
        return f"{'https' if self.https else 'http'}://{self.host}:{self.port}{self.path}"

    def __str__(self) -> str:  # what logs and errors show
        if self.scheme == "dimse":
            return f"dimse://{self.aet}@{self.host}:{self.port}"
        return f"{'dicomwebs' if self.https else 'dicomweb'}://{self.host}:{self.port}{self.path}"


@dataclass
class SendResult:
    """What ``send`` did: ``sent`` files in order, attempts used, stored SOP Instance UIDs."""

    destination: str
    sent: list[Path] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    attempts: int = 0


def parse_destination(destination: str) -> Destination:
    """Parse ``dicomweb[s]://HOST:PORT/PATH`` or ``dimse://AET@HOST:PORT``."""
    parts = urlsplit(destination)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in destination {destination!r}") from exc
    if not parts.hostname or not port:
        raise ConfigError(f"destination {destination!r} needs HOST:PORT")
    if scheme in ("dicomweb", "dicomwebs", "http", "https"):
        return Destination(
            "dicomweb", parts.hostname, port, parts.path.rstrip("/"), https=scheme in ("dicomwebs", "https")
        )
    if scheme == "dimse":
        aet = parts.username or ""
        if not aet or len(aet) > 16:
            raise ConfigError(
                f"destination {destination!r} needs the called AE title (1-16 chars): dimse://AET@HOST:PORT"
            )
        return Destination("dimse", parts.hostname, port, aet=aet)
    raise ConfigError(
        f"unknown destination scheme {parts.scheme!r}; use dicomweb://HOST:PORT/PATH or dimse://AET@HOST:PORT"
    )


def _store_dimse(
    dest: Destination, files: list[Path], timeout_s: float, calling_aet: str = CALLING_AET
) -> tuple[list[Path], list[str]]:
    """C-STORE ``files`` over one association; return (stored, problems)."""
    from pynetdicom import AE

    metas = {}
    for f in files:
        m = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        metas[f] = (UID(m.file_meta.MediaStorageSOPClassUID), UID(m.file_meta.TransferSyntaxUID))
    contexts: dict[UID, list[UID]] = {}
    for sop_class, ts in metas.values():
        wanted = contexts.setdefault(sop_class, [])
        for t in (ts, *(_UNCOMPRESSED if ts in _UNCOMPRESSED else ())):
            if t not in wanted:
                wanted.append(t)
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet)
    if not assoc.is_established:
        return [], [f"no association with {dest} (refused, rejected or unreachable)"]
    stored, problems = [], []
    try:
        for f in files:
            status = assoc.send_c_store(f)
            code = getattr(status, "Status", None)
            if code in _STORED:
                stored.append(f)
            else:
                problems.append(f"{f.name}: C-STORE status {'none (connection lost)' if code is None else hex(code)}")
                if not assoc.is_established:
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    return stored, problems


def _store_dicomweb(
    dest: Destination, files: list[Path], timeout_s: float, calling_aet: str = CALLING_AET
) -> tuple[list[Path], list[str]]:
    """STOW-RS ``files`` in one request; return (stored, problems)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(f) for f in files]
    client = DICOMwebClient(url=dest.url, timeout=timeout_s)
    client.set_http_retry_params(retry=False)  # our loop retries (and logs) instead
    try:
        response = client.store_instances(datasets=datasets)
    except requests.RequestException as exc:
        return [], [f"STOW-RS to {dest} failed: {type(exc).__name__}: {_short(exc)}"]
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): item.get("FailureReason")
        for item in (response.get("FailedSOPSequence", []) if response is not None else [])
    }
    stored, problems = [], []
    for f, ds in zip(files, datasets):
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            problems.append(f"{f.name}: STOW-RS failure reason {failed[uid]}")
        else:
            stored.append(f)
    return stored, problems


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


def send(
    files: Sequence[str | Path],
    destination: str,
    *,
    retries: int = 3,
    backoff_s: float = 0.5,
    timeout_s: float = 30.0,
    calling_aet: str = CALLING_AET,
) -> SendResult:
    """Send DICOM ``files`` to ``destination`` (see module docstring for the URL forms).

    Args:
        files: DICOM Part 10 files (e.g. a SEG written by ``write_seg``).
        destination: ``dicomweb://HOST:PORT/PATH`` or ``dimse://AET@HOST:PORT``.
        retries: extra attempts after the first for files not yet stored.
        backoff_s: wait before retry ``n`` is ``backoff_s * 2**(n-1)`` seconds.
        timeout_s: network timeout per operation, seconds.
        calling_aet: our AE title in a C-STORE association (DICOMweb has none).

    Returns:
        SendResult listing the stored files and their SOP Instance UIDs.

    Raises:
        SendError: some files could not be stored after all attempts (they stay on disk).
        ConfigError: malformed destination.
    """
    dest = parse_destination(destination)
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SendError(f"cannot send missing files: {missing}")
    store = _store_dimse if dest.scheme == "dimse" else _store_dicomweb
    result = SendResult(destination=str(dest))
    pending = list(paths)
    problems: list[str] = []
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            logger.warning(
                "retrying %d file(s) to %s in %.1f s (attempt %d of %d)",
                len(pending),
                dest,
                delay,
                attempt + 1,
                retries + 1,
            )
            time.sleep(delay)
        result.attempts = attempt + 1
        try:
            stored, problems = store(dest, pending, timeout_s, calling_aet)
        except (OSError, RuntimeError, ValueError) as exc:  # socket errors, pynetdicom/dicomweb issues
            stored, problems = [], [f"{type(exc).__name__}: {_short(exc)}"]
        result.sent.extend(stored)
        pending = [p for p in pending if p not in stored]
        if not pending:
            break
    else:
        kept = ", ".join(str(p.resolve()) for p in pending)
        raise SendError(
            f"could not send {len(pending)} of {len(paths)} file(s) to {dest} after {retries + 1} attempt(s) "
            f"({'; '.join(problems[:3])}); the files are kept on disk at: {kept}"
        )
    for p in result.sent:
        result.sop_instance_uids.append(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
    logger.info("sent %d file(s) to %s in %d attempt(s)", len(result.sent), dest, result.attempts)
    return result
