"""The node's HTTP endpoint (standard library ``http.server``, one thread per request).

* ``GET /status``: JSON ``{"node", "counts", "receiving", "queue", "running", "done", "failed", "skipped"}``;
  series appear by hash key only (``series_<hash>``, ``study_<hash>``), times as ISO 8601 UTC and
  seconds (``wait_s`` from the last instance to the start, ``run_s``, ``latency_s`` from the last
  instance to the results sent).
* ``GET /health``: ``{"ok": true}``.
* ``POST /dicom-web/studies`` (or ``/studies``) when STOW-RS is on: a ``multipart/related;
  type="application/dicom"`` body, each part kept like a C-STORE; the answer is DICOM JSON with the
  Referenced (and Failed) SOP Sequence: 200 when all were stored, 202 when some, 409 when none.

There is no authentication: bind it to loopback or put it behind the hospital's reverse proxy.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from app.node.queue import JobQueue
from app.node.receiver import STATUS_OK, Spool, Stored, parse_multipart_related

log = logging.getLogger(__name__)

MAX_STOW_BYTES = 2 * 1024**3


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _job_view(row: dict[str, Any]) -> dict[str, Any]:
    started, finished, last = row.get("started_at"), row.get("finished_at"), row.get("last_store")
    view = {
        "series": row["key"],
        "study": row["study_key"],
        "bundle": row["bundle"],
        "route": row["route"],
        "state": row["state"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "instances": row["instances"],
        "last_instance_at": _iso(last),
        "queued_at": _iso(row["queued_at"]),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
    }
    if row["state"] == "pending" and row["attempts"]:
        view["retry_at"] = _iso(row["not_before"])
    if started and last:
        view["wait_s"] = round(started - last, 3)
    if row["state"] == "done" and finished and started:
        view["run_s"] = round(finished - started, 3)
    if row["state"] == "done" and finished and last:
        view["latency_s"] = round(finished - last, 3)
    if row.get("error"):
        view["error"] = row["error"]
    if row["state"] == "done":
        view["sent"] = json.loads(row["sent"]) if row.get("sent") else []
    return view


def snapshot(queue: JobQueue, node: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of ``GET /status``."""
    jobs = [_job_view(r) for r in queue.jobs()]
    return {
        "node": node,
        "counts": queue.counts(),
        "receiving": [
            {
                "series": r["key"],
                "study": r["study_key"],
                "from_ae": r["calling_aet"],
                "instances": r["instances"],
                "first_instance_at": _iso(r["first_store"]),
                "last_instance_at": _iso(r["last_store"]),
            }
            for r in queue.receiving()
        ],
        "queue": [j for j in jobs if j["state"] == "pending"],
        "running": [j for j in jobs if j["state"] == "running"],
        "done": [j for j in jobs if j["state"] == "done"],
        "failed": [j for j in jobs if j["state"] == "failed"],
        "skipped": [j for j in jobs if j["state"] == "skipped"],
    }


def _stow_answer(results: list[Stored]) -> tuple[int, dict]:
    ok = [r for r in results if r.status == STATUS_OK]
    bad = [r for r in results if r.status != STATUS_OK]

    def item(r: Stored, failed: bool) -> dict:
        d: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [r.sop_class_uid]} if r.sop_class_uid else {"vr": "UI"},
            "00081155": {"vr": "UI", "Value": [r.sop_instance_uid]} if r.sop_instance_uid else {"vr": "UI"},
        }
        if failed:
            d["00081197"] = {"vr": "US", "Value": [r.status]}
        return d

    doc: dict[str, Any] = {}
    if ok:
        doc["00081199"] = {"vr": "SQ", "Value": [item(r, False) for r in ok]}
    if bad:
        doc["00081198"] = {"vr": "SQ", "Value": [item(r, True) for r in bad]}
    return (200 if not bad else 202 if ok else 409), doc


class StatusServer:
    """``ThreadingHTTPServer`` on ``host:port`` (0: a free port) in a daemon thread."""

    def __init__(self, host: str, port: int, status: Callable[[], dict], spool: Spool | None = None):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                log.debug("http %s", format % args)

            def _send(self, code: int, doc: Any, content_type: str = "application/json") -> None:
                body = json.dumps(doc, indent=1).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0].rstrip("/")
                if path == "/status":
                    self._send(200, status())
                elif path == "/health":
                    self._send(200, {"ok": True})
                else:
                    self._send(404, {"error": "not found; try /status"})

            def do_POST(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0].rstrip("/")
                if owner.spool is None or path not in ("/dicom-web/studies", "/studies"):
                    self._send(404, {"error": "not found (STOW-RS is off)" if owner.spool is None else "not found"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_STOW_BYTES:
                    self._send(413 if length else 411, {"error": "a STOW-RS body needs a Content-Length up to 2 GiB"})
                    return
                body = self.rfile.read(length)
                try:
                    parts = parse_multipart_related(body, self.headers.get("Content-Type", ""))
                except ValueError as exc:
                    self._send(415, {"error": f"expected multipart/related; type=application/dicom: {exc}"})
                    return
                calling = f"STOW-RS {self.client_address[0]}"
                results = [owner.spool.store_part10(p, calling) for p in parts]
                code, doc = _stow_answer(results)
                stored = sum(r.status == STATUS_OK for r in results)
                log.info(
                    "STOW-RS from %s: %d stored, %d refused", self.client_address[0], stored, len(results) - stored
                )
                self._send(code, doc, "application/dicom+json")

        self.spool = spool
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="segapp-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
