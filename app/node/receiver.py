"""Receiving: a DICOM C-STORE SCP (pynetdicom) and STOW-RS bodies, both into the spool folder and the queue.

Each instance is written as received (no re-encoding) to ``SPOOL/<study key>/<series key>/<hash>.dcm``
(hashes of the UIDs: no patient data in paths), then noted in the queue; the C-STORE is answered
only after both, so an instance the sender saw acknowledged is never lost by a crash. A series that an
open association has sent instances of is busy: the idle timeout starts when the sender lets go. Instances of
a series that is already queued are acknowledged and not kept (logged): a series counts as complete
after the idle timeout. Only the AE titles of ``allowed_calling_aets`` may associate (``*``: any).
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import io
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from app.inference.jobs import series_key
from app.node.queue import JobQueue

log = logging.getLogger(__name__)

STATUS_OK = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
VERIFICATION = "1.2.840.10008.1.1"


def study_key(study_uid: str) -> str:
    """A folder name for a study that carries no patient data (a hash of the UID)."""
    return "study_" + hashlib.sha1(study_uid.encode()).hexdigest()[:12]


@dataclass
class Stored:
    """What became of one received instance: ``status`` (C-STORE code), ``outcome`` (new/again/late)."""

    status: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    outcome: str = ""
    reason: str = ""


class Spool:
    """Writes received instances into ``root`` and notes them in ``queue``."""

    def __init__(self, root: Path, queue: JobQueue):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.queue = queue

    def folder_of(self, study_uid: str, series_uid: str) -> Path:
        return self.root / study_key(study_uid) / series_key(series_uid)

    def store(self, encoded: bytes, study_uid: str, series_uid: str, sop_uid: str, calling: str) -> str:
        """Keep one instance (a DICOM Part 10 byte string); returns the queue's outcome (new/again/late)."""
        if self.queue.series_queued(series_uid):
            return "late"
        folder = self.folder_of(study_uid, series_uid)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / (hashlib.sha1(sop_uid.encode()).hexdigest()[:20] + ".dcm")
        # temp file + rename: a crash never leaves half a file; no fsync (a killed process loses nothing
        # the kernel holds, and the sender resends what was not acknowledged)
        fd, tmp = tempfile.mkstemp(prefix=".in.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(encoded)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.queue.record_instance(
            study_uid,
            series_uid,
            sop_uid,
            key=series_key(series_uid),
            study_key=study_key(study_uid),
            folder=str(folder),
            calling_aet=calling,
        )

    def store_part10(self, data: bytes, calling: str) -> Stored:
        """Keep one DICOM Part 10 file given as bytes (a STOW-RS part)."""
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - InvalidDicomError or any damage: "cannot understand"
            return Stored(STATUS_CANNOT_UNDERSTAND, reason=f"not a DICOM file ({type(exc).__name__})")
        return self.keep(ds, data, calling)

    def keep(self, ds: Any, encoded: bytes, calling: str) -> Stored:
        """Keep one decoded (or lazily decoded) data set given with its Part 10 bytes."""
        uids = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if not all(uids):
            return Stored(STATUS_CANNOT_UNDERSTAND, sop_class, uids[2], reason="missing Study/Series/SOP Instance UID")
        try:
            outcome = self.store(encoded, uids[0], uids[1], uids[2], calling)
        except OSError as exc:
            log.error("cannot keep an instance in the spool: %s", exc.strerror)
            return Stored(STATUS_OUT_OF_RESOURCES, sop_class, uids[2], reason="spool not writable")
        if outcome == "late":
            log.warning(
                "an instance of %s arrived after its series was queued: acknowledged, not used", series_key(uids[1])
            )
        return Stored(STATUS_OK, sop_class, uids[2], outcome)


class StoreSCP:
    """The C-STORE SCP: pynetdicom AE ``ae_title`` on ``host:port`` writing into a :class:`Spool`."""

    def __init__(self, spool: Spool, ae_title: str, host: str, port: int, allowed: tuple[str, ...]):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.spool = spool
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(VERIFICATION)
        if "*" not in allowed:
            self.ae.require_calling_aet = list(allowed)
        self.ae.maximum_associations = 32
        self.address = (host, port)
        self.handlers: list = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self.server: Any = None
        # series that an association still open has sent instances of: not complete, however idle
        self._open: dict[int, set[str]] = {}
        self._open_lock = threading.Lock()

    def busy_series(self) -> set[str]:
        """SeriesInstanceUIDs that an open association has delivered to (the sender may not be done)."""
        with self._open_lock:
            return set().union(*self._open.values()) if self._open else set()

    def start(self) -> None:
        self.server = self.ae.start_server(self.address, block=False, evt_handlers=self.handlers)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else self.address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        log.warning("refused an association from AE %r at %s", str(requestor.ae_title), requestor.address)

    def _on_close(self, event) -> None:
        with self._open_lock:
            self._open.pop(id(event.assoc), None)

    def _on_store(self, event) -> int:
        try:
            ds = event.dataset  # decoded lazily: only the UIDs are read here
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        except Exception as exc:  # noqa: BLE001 - a data set pydicom cannot decode
            log.warning("C-STORE of an undecodable data set refused: %s", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        try:
            with self._open_lock:
                self._open.setdefault(id(event.assoc), set()).add(series_uid)
            result = self.spool.keep(ds, event.encoded_dataset(include_meta=True), str(event.assoc.requestor.ae_title))
        except Exception as exc:  # noqa: BLE001 - answer the sender instead of dropping the association
            log.error("C-STORE failed: %s: %s", type(exc).__name__, str(exc)[:200])
            return STATUS_OUT_OF_RESOURCES
        return result.status


def parse_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The ``application/dicom`` parts of a ``multipart/related`` STOW-RS body (standard library parser)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ValueError("not a multipart/related body")
    parts = []
    for part in msg.iter_parts():
        if part.get_content_type() == "application/dicom":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                parts.append(payload)
    return parts
