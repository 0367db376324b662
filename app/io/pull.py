"""Pull a study or series from a PACS into a folder: DICOMweb (QIDO-RS + WADO-RS) or DIMSE (C-GET / C-MOVE).

Sources:

* ``dicomweb://HOST:PORT/PATH/studies/UID[/series/UID]`` (``dicomwebs://`` for HTTPS): QIDO-RS
  lists the study's series (and checks that they exist), WADO-RS fetches each image series as the
  server stores it (``transfer-syntax=*``) with ``dicomweb_client``.
* ``dimse://AET@HOST:PORT?StudyInstanceUID=UID[&SeriesInstanceUID=UID]``: C-FIND (Study Root) lists
  the instances and their SOP classes, then C-GET fetches them over the same association
  (pynetdicom, storage as SCP role). Options in the query string: ``calling_aet`` (ours, default
  ``SEGAPP``), ``method=move`` with ``move_port=N`` (C-MOVE to a storage SCP that we open on port N
  for the transfer; the PACS must know our AE title at this host and port), ``timeout`` (s).

Non-image series (SEG, SR, RTSTRUCT...) of a study are not fetched. Files are named by a hash of their
SOP Instance UID (no patient data). Failures (server down, unknown study, refused association,
instances missing at the end) raise :class:`PullError` with one line naming the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pydicom.dataset import Dataset

from app.errors import ConfigError, SegappError
from app.io.dicom_scan import NON_IMAGE_MODALITIES

logger = logging.getLogger(__name__)

CALLING_AET = "SEGAPP"
SCHEMES = ("dicomweb", "dicomwebs", "dimse")
# Study Root Query/Retrieve Information Model FIND / GET / MOVE (pynetdicom makes its names at run time)
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
GET = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


class PullError(SegappError):
    """A study or series could not be fetched from a PACS."""

    exit_code = 3


@dataclass(frozen=True)
class Source:
    """A parsed pull source. ``path`` is the DICOMweb root (e.g. ``/dicom-web``); ``aet`` only for DIMSE."""

    scheme: str
    host: str
    port: int
    study_uid: str
    series_uid: str = ""
    path: str = ""
    aet: str = ""
    calling_aet: str = CALLING_AET
    method: str = "get"
    move_port: int = 0
    timeout_s: float = 60.0

    @property
    def url(self) -> str:
        """The DICOMweb base URL."""
        return f"{'https' if self.scheme == 'dicomwebs' else 'http'}://{self.host}:{self.port}{self.path}"

    def __str__(self) -> str:  # what errors and logs show (UIDs are not patient data, but long: left out)
        if self.scheme == "dimse":
            return f"dimse://{self.aet}@{self.host}:{self.port}"
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


@dataclass
class PullResult:
    """What was fetched: the folder, the instance count, the image series' UIDs, seconds taken."""

    folder: Path
    instances: int = 0
    series_uids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    source: str = ""


def is_remote(text: str) -> bool:
    """True for a ``dicomweb://``, ``dicomwebs://`` or ``dimse://`` source."""
    return urlsplit(str(text)).scheme.lower() in SCHEMES


def _uid(value: str, what: str, source: str) -> str:
    value = value.strip()
    if not value or len(value) > 64 or not all(c.isdigit() or c == "." for c in value):
        raise ConfigError(f"{what} {value!r} is not a DICOM UID", source)
    return value


def parse_source(text: str) -> Source:
    """Parse a ``dicomweb[s]://...`` or ``dimse://...`` source (see the module docstring)."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    where = "--input"
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in {text!r}", where) from exc
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown source scheme {parts.scheme!r}; use dicomweb:// or dimse://", where)
    if not parts.hostname or not port:
        raise ConfigError(f"source {text!r} needs HOST:PORT", where)
    if scheme == "dimse":
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        aet = parts.username or ""
        if not aet or len(aet) > 16:
            raise ConfigError(f"source {text!r} needs the called AE title (1-16 chars): dimse://AET@HOST:PORT", where)
        if "StudyInstanceUID" not in query:
            raise ConfigError("a dimse:// source needs ?StudyInstanceUID=UID[&SeriesInstanceUID=UID]", where)
        unknown = set(query) - {
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "calling_aet",
            "method",
            "move_port",
            "timeout",
        }
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)} in the dimse:// source", where)
        method = query.get("method", "get").lower()
        if method not in ("get", "move"):
            raise ConfigError(f"method={method!r}: use get (C-GET) or move (C-MOVE)", where)
        try:
            move_port = int(query.get("move_port", "0"))
            timeout = float(query.get("timeout", "60"))
        except ValueError as exc:
            raise ConfigError(f"move_port and timeout must be numbers: {exc}", where) from exc
        if method == "move" and not 0 < move_port < 65536:
            raise ConfigError("method=move needs move_port=N: the port our storage SCP listens on", where)
        calling = query.get("calling_aet", CALLING_AET)
        if not 0 < len(calling) <= 16:
            raise ConfigError(f"calling_aet {calling!r} must be 1-16 characters", where)
        return Source(
            "dimse",
            parts.hostname,
            port,
            _uid(query["StudyInstanceUID"], "StudyInstanceUID", where),
            _uid(query["SeriesInstanceUID"], "SeriesInstanceUID", where) if query.get("SeriesInstanceUID") else "",
            aet=aet,
            calling_aet=calling,
            method=method,
            move_port=move_port,
            timeout_s=timeout,
        )
    segments = parts.path.rstrip("/").split("/")
    if "studies" not in segments:
        raise ConfigError("a dicomweb:// source ends with /studies/UID or /studies/UID/series/UID", where)
    at = len(segments) - 1 - segments[::-1].index("studies")
    tail = segments[at + 1 :]
    if len(tail) not in (1, 3) or (len(tail) == 3 and tail[1] != "series"):
        raise ConfigError("a dicomweb:// source ends with /studies/UID or /studies/UID/series/UID", where)
    return Source(
        scheme,
        parts.hostname,
        port,
        _uid(tail[0], "StudyInstanceUID", where),
        _uid(tail[2], "SeriesInstanceUID", where) if len(tail) == 3 else "",
        path="/".join(segments[:at]),
    )


def _file_name(sop_uid: str) -> str:
    return hashlib.sha1(sop_uid.encode()).hexdigest()[:20] + ".dcm"


# -- DICOMweb -------------------------------------------------------------------------------------------------
def _pull_dicomweb(src: Source, folder: Path) -> tuple[int, list[str]]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=src.url, timeout=src.timeout_s)
    client.set_http_retry_params(retry=False)
    filters = {"SeriesInstanceUID": src.series_uid} if src.series_uid else None
    try:
        found = client.search_for_series(study_instance_uid=src.study_uid, search_filters=filters, get_remaining=True)
        series = [Dataset.from_json(s) for s in found]
        images = [s for s in series if str(s.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES]
        if not series:
            what = "series" if src.series_uid else "study"
            raise PullError(f"{src}: no such {what} on the server (QIDO-RS found none)")
        if not images:
            raise PullError(f"{src}: the study holds no image series (only {', '.join(_modalities(series))})")
        n = 0
        for s in images:
            for ds in client.iter_series(
                src.study_uid, str(s.SeriesInstanceUID), media_types=(("application/dicom", "*"),)
            ):
                ds.save_as(folder / _file_name(str(ds.SOPInstanceUID)), enforce_file_format=True)
                n += 1
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        if code == 404:
            raise PullError(f"{src}: study or series not found (HTTP 404)") from exc
        raise PullError(f"{src}: the server answered HTTP {code}") from exc
    except requests.RequestException as exc:
        raise PullError(f"{src}: cannot reach the server ({type(exc).__name__})") from exc
    return n, [str(s.SeriesInstanceUID) for s in images]


def _modalities(series: list[Dataset]) -> list[str]:
    return sorted({str(s.get("Modality", "?")) for s in series})


# -- DIMSE ----------------------------------------------------------------------------------------------------
def _find_instances(assoc, src: Source) -> list[Dataset]:
    """C-FIND the image instances (SOP class, series) of the study or series."""

    def find(level: str, **keys: str) -> list[Dataset]:
        q = Dataset()
        q.QueryRetrieveLevel = level
        q.StudyInstanceUID = src.study_uid
        for k, v in keys.items():
            setattr(q, k, v)
        out = []
        for status, identifier in assoc.send_c_find(q, FIND):
            code = getattr(status, "Status", None)
            if code is None:
                raise PullError(
                    f"{src}: C-FIND got no answer: the PACS dropped the association (does it know our AE title "
                    f"{src.calling_aet}?) or timed out"
                )
            if code in (0xFF00, 0xFF01) and identifier is not None:
                out.append(identifier)
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise PullError(f"{src}: C-FIND failed with status {code:#06x}")
        return out

    series = find("SERIES", SeriesInstanceUID=src.series_uid, Modality="")
    if not series:
        what = "series" if src.series_uid else "study"
        raise PullError(f"{src}: no such {what} on the server (C-FIND found none)")
    images = [s for s in series if str(s.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES]
    if not images:
        raise PullError(f"{src}: the study holds no image series (only {', '.join(_modalities(series))})")
    instances = []
    for s in images:
        instances += find("IMAGE", SeriesInstanceUID=str(s.SeriesInstanceUID), SOPInstanceUID="", SOPClassUID="")
    return instances


class _Spool:
    """A C-STORE handler that writes each received instance (as received) into ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, event) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        path = self.folder / _file_name(sop_uid)
        path.write_bytes(event.encoded_dataset())
        with self.lock:
            self.count += 1
        return 0x0000


def _pull_dimse(src: Source, folder: Path) -> tuple[int, list[str]]:
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt

    ae = AE(ae_title=src.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = src.timeout_s
    ae.add_requested_context(FIND)
    assoc = ae.associate(src.host, src.port, ae_title=src.aet)
    if not assoc.is_established:
        raise PullError(f"{src}: no association as {src.calling_aet} (refused, rejected or unreachable)")
    try:
        instances = _find_instances(assoc, src)
    finally:
        if assoc.is_established:
            assoc.release()
    wanted = {str(i.SOPInstanceUID) for i in instances}
    sop_classes = sorted({str(i.SOPClassUID) for i in instances if i.get("SOPClassUID")})
    spool = _Spool(folder)
    handlers: list = [(evt.EVT_C_STORE, spool)]
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES" if src.series_uid else "STUDY"
    query.StudyInstanceUID = src.study_uid
    if src.series_uid:
        query.SeriesInstanceUID = src.series_uid
    server = None
    ae = AE(ae_title=src.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = src.timeout_s
    if src.method == "get":
        if len(sop_classes) > 127:
            raise PullError(f"{src}: {len(sop_classes)} SOP classes in one study: more than C-GET can negotiate")
        ae.add_requested_context(GET)
        for sop in sop_classes:
            ae.add_requested_context(sop, ALL_TRANSFER_SYNTAXES)
        roles: list = [build_role(sop, scp_role=True) for sop in sop_classes]
        assoc = ae.associate(src.host, src.port, ae_title=src.aet, ext_neg=roles, evt_handlers=handlers)
        model = GET
    else:
        scp = AE(ae_title=src.calling_aet)
        for cx in AllStoragePresentationContexts:
            scp.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        try:
            server = scp.start_server(("0.0.0.0", src.move_port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise PullError(f"cannot listen on port {src.move_port} for the C-MOVE: {exc.strerror}") from exc
        ae.add_requested_context(MOVE)
        assoc = ae.associate(src.host, src.port, ae_title=src.aet)
        model = MOVE
    try:
        if not assoc.is_established:
            raise PullError(f"{src}: no association for C-{src.method.upper()} (refused, rejected or unreachable)")
        if src.method == "get":
            responses = assoc.send_c_get(query, model)
        else:
            responses = assoc.send_c_move(query, src.calling_aet, model)
        final = None
        for status, _ in responses:
            if getattr(status, "Status", None) is None:
                raise PullError(f"{src}: C-{src.method.upper()} got no answer (association lost or timed out)")
            final = status
        code = int(final.Status) if final is not None else -1
        if code not in (0x0000, 0xB000):
            raise PullError(
                f"{src}: C-{src.method.upper()} ended with status {code:#06x}"
                + (f" (the PACS may not know AE {src.calling_aet} at our port)" if src.method == "move" else "")
            )
    finally:
        if assoc.is_established:
            assoc.release()
        if server is not None:
            server.shutdown()
    got = {p.name for p in folder.iterdir()}
    missing = [u for u in wanted if _file_name(u) not in got]
    if missing:
        raise PullError(f"{src}: {len(missing)} of {len(wanted)} instance(s) did not arrive")
    return len(wanted), sorted({str(i.SeriesInstanceUID) for i in instances})


def pull(source: str | Source, folder: str | Path) -> PullResult:
    """Fetch the study or series ``source`` names into ``folder`` (created); see the module docstring.

    Raises:
        ConfigError: a malformed source.
        PullError: the server is down, refuses us, does not hold the study, or the transfer is incomplete.
    """
    src = source if isinstance(source, Source) else parse_source(source)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        n, series = (_pull_dimse if src.scheme == "dimse" else _pull_dicomweb)(src, out)
    except (OSError, RuntimeError, ValueError) as exc:  # sockets, pynetdicom, a bad answer
        if isinstance(exc, SegappError):
            raise
        raise PullError(f"{src}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    result = PullResult(out, n, series, time.perf_counter() - t0, str(src))
    logger.info("pulled %d instance(s) of %d series from %s in %.1f s", n, len(series), src, result.seconds)
    return result


@contextlib.contextmanager
def pulled(source: str | Source) -> Iterator[PullResult]:
    """``pull`` into a temporary folder that is deleted when the block ends."""
    with tempfile.TemporaryDirectory(prefix="segapp-pull-") as tmp:
        yield pull(source, Path(tmp) / "dicom")
