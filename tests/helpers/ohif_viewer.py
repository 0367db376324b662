"""Run the real OHIF viewer (npm ``@ohif/app``'s prebuilt ``dist/``) over a real Orthanc, in headless Chromium.

Pieces (used by ``tests/integration/test_ohif_viewer.py``):

* :func:`run_setup` runs ``ohif/setup.sh`` (Debian's chromium, ``@ohif/app``, ``puppeteer-core``
  into a cache folder) and returns the :class:`OhifTools` paths it reports.
* :class:`OhifServer` serves OHIF's ``dist/`` and a generated ``app-config.js`` on one loopback
  origin and proxies ``/dicom-web/*`` to Orthanc's DICOMweb root there, so the browser never makes a
  cross-origin request (Orthanc builds its BulkDataURIs from the Host header, which the proxy keeps).
* :func:`run_check` runs ``ohif/check_seg.mjs`` (node + puppeteer-core): open a study, load a SEG
  series as a labelmap, dump OHIF's own labelmap voxels with their geometry plus the console log.
* :func:`labelmap_on_grid` maps that dump back onto a source grid through LPS world coordinates.

By hand (keeps serving until Ctrl-C)::

    python tests/helpers/ohif_viewer.py --dist DIST --orthanc http://127.0.0.1:8042/dicom-web
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import numpy as np

HERE = Path(__file__).resolve().parent / "ohif"
SETUP_SH = HERE / "setup.sh"
CHECK_MJS = HERE / "check_seg.mjs"

# Browser-visible headers a proxy must not pass on (RFC 9110 7.6.1 hop-by-hop, plus lengths we recompute).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
_TYPES = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".map": "application/json",
    ".txt": "text/plain",
}


class SetupError(RuntimeError):
    """setup.sh could not install something (its one-line reason is the message).

    ``chromium_unavailable`` is True when Chromium itself cannot be installed or started on this
    machine (setup.sh's exit status 3), the one case a test may skip for.
    """

    def __init__(self, message: str, chromium_unavailable: bool = False):
        super().__init__(message)
        self.chromium_unavailable = chromium_unavailable


@dataclass(frozen=True)
class OhifTools:
    chromium: str  # the Chromium binary
    ohif_dist: Path  # OHIF's prebuilt dist/ folder
    node_modules: Path  # holds puppeteer-core


def run_setup(cache: str | Path | None = None, timeout_s: float = 900.0) -> tuple[OhifTools, str]:
    """Run ``setup.sh`` (idempotent); return the tools and its output. Raises SetupError on failure."""
    cmd = ["bash", str(SETUP_SH)] + ([str(cache)] if cache else [])
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ohif setup:")]
        reason = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["setup.sh failed"])[-1]
        raise SetupError(reason, chromium_unavailable=proc.returncode == 3)
    values = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln and not ln.startswith("ohif setup:"))
    tools = OhifTools(values["chromium"], Path(values["ohif_dist"]), Path(values["node_modules"]))
    return tools, proc.stdout


def app_config_js(datasource_overrides: dict | None = None) -> str:
    """OHIF's ``window.config``: one DICOMweb data source at ``/dicom-web`` on the page's own origin.

    No confirmation prompts (a SEG put into a viewport is hydrated at once), no investigational-use
    dialog, no onboarding tour, no CPU-rendering modal (headless Chromium may have no GPU).
    ``datasource_overrides`` are merged into the data source's configuration (e.g.
    ``{"loadMultiframeAsPart10": False}``).
    """
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "disableConfirmationPrompts": True,
        "investigationalUseDialog": {"option": "never"},
        "customizationService": {"global": {"ohif.tours": {"$set": []}}},
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (test)",
                    "name": "orthanc",
                    "qidoRoot": "/dicom-web",
                    "wadoRoot": "/dicom-web",
                    "wadoUriRoot": "/wado",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "singlepart": "bulkdata,video",
                    "bulkDataURI": {"enabled": True},
                    "omitQuotationForMultipartRequest": True,
                    **(datasource_overrides or {}),
                },
            }
        ],
    }
    # Relative roots: OHIF resolves them against the page, which keeps every request same-origin.
    return "window.config = " + json.dumps(config, indent=1) + ";\n"


class OhifServer:
    """OHIF's dist/ + ``app-config.js`` + a ``/dicom-web`` proxy on ``http://127.0.0.1:PORT`` (threaded).

    Use as a context manager; ``url`` is the origin. ``dicomweb_url`` is Orthanc's DICOMweb root,
    e.g. ``http://127.0.0.1:8042/dicom-web``; the request path after ``/dicom-web`` is appended to it.
    """

    def __init__(self, dist: str | Path, dicomweb_url: str, port: int = 0, datasource_overrides: dict | None = None):
        self.dist = Path(dist).resolve()
        if not (self.dist / "index.html").is_file():
            raise FileNotFoundError(f"{self.dist}: no index.html (not an OHIF dist/ folder)")
        target = urllib.parse.urlsplit(dicomweb_url.rstrip("/"))
        self._upstream = (target.hostname or "127.0.0.1", target.port or 80, target.path)
        self._config = app_config_js(datasource_overrides).encode()
        self.proxy_log: list[tuple[str, str, int]] = []  # (method, path, status) of proxied requests
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the proxy keeps its own log
                pass

            def do_GET(self) -> None:
                self._route()

            do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_GET

            def _route(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path == "/dicom-web" or path.startswith("/dicom-web/"):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, "application/javascript", server._config)
                else:
                    self._static(path)

            def _send(self, status: int, ctype: str, body: bytes, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                # Cross-origin isolation lets cornerstone use SharedArrayBuffer (OHIF's deploy docs ask for it).
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                self.send_header("Cache-Control", "no-store")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _static(self, path: str) -> None:
                rel = urllib.parse.unquote(path).lstrip("/")
                file = (server.dist / rel).resolve() if rel else server.dist / "index.html"
                if server.dist not in file.parents and file != server.dist / "index.html":
                    self._send(404, "text/plain", b"not found")
                    return
                if not file.is_file():
                    # SPA: client-side routes (/viewer, /segmentation, ...) are index.html; a missing
                    # asset with an extension is a real 404 so mistakes show in the console.
                    if Path(rel).suffix in _TYPES and not rel.endswith(".html"):
                        self._send(404, "text/plain", b"not found")
                        return
                    file = server.dist / "index.html"
                ctype = _TYPES.get(file.suffix, "application/octet-stream")
                self._send(200, ctype, file.read_bytes())

            def _proxy(self) -> None:
                host, port, root = server._upstream
                split = urllib.parse.urlsplit(self.path)
                upstream_path = root + split.path[len("/dicom-web") :] + (f"?{split.query}" if split.query else "")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                # Host stays the browser's: Orthanc writes BulkDataURIs with it, so they point back here.
                conn = http.client.HTTPConnection(host, port, timeout=120)
                try:
                    conn.request(self.command, upstream_path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()  # de-chunked; re-sent with a Content-Length
                    status, ctype = resp.status, resp.getheader("Content-Type", "application/octet-stream")
                    extra = {
                        k: v
                        for k, v in resp.getheaders()
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-type"
                    }
                except OSError as exc:
                    status, ctype, data, extra = 502, "text/plain", f"proxy error: {exc}".encode(), {}
                finally:
                    conn.close()
                server.proxy_log.append((self.command, split.path, status))
                self._send(status, ctype, data, extra)

        return Handler


@dataclass
class CheckResult:
    """What ``check_seg.mjs`` reported (see that file for the JSON layout)."""

    report: dict
    stdout: str
    stderr: str
    returncode: int


def run_check(
    tools: OhifTools,
    viewer_url: str,
    study_uid: str,
    seg_series_uid: str,
    out_json: str | Path,
    timeout_s: float = 240.0,
) -> CheckResult:
    """Run ``check_seg.mjs`` for one study and SEG series; its own hard timeout is ``timeout_s``."""
    node = shutil.which("node")
    if node is None:
        raise SetupError("ohif setup: node is missing")
    env = {**os.environ, "NODE_PATH": str(tools.node_modules)}
    cmd = [
        node,
        str(CHECK_MJS),
        "--chromium",
        tools.chromium,
        "--url",
        viewer_url,
        "--study",
        study_uid,
        "--seg-series",
        seg_series_uid,
        "--out",
        str(out_json),
        "--timeout-ms",
        str(int(timeout_s * 1000)),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout_s + 60)
    report = json.loads(Path(out_json).read_text()) if Path(out_json).is_file() else {}
    return CheckResult(report, proc.stdout, proc.stderr, proc.returncode)


def _labelmap_planes(labelmap: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values[rows, cols], world_lps[rows, cols, 3]) per 2D plane of OHIF's labelmap, from its own geometry.

    A volume labelmap (``kind == "volume"``): cornerstone3D's ``dimensions`` (x, y, z voxels),
    ``origin`` (LPS mm), ``direction`` (row-major 3x3 whose rows are the x, y, z axis directions) and
    ``spacing`` (mm); scalars are x-fastest. A stack labelmap (``kind == "stack"``): one image per
    plane with cornerstone's ``imagePlaneModule`` (``imagePositionPatient``, ``rowCosines`` = direction
    of increasing column, ``columnCosines``, ``rowPixelSpacing`` = spacing between rows in mm,
    ``columnPixelSpacing``), pixels row-major.
    """
    planes = []
    if labelmap["kind"] == "volume":
        nx, ny, nz = labelmap["dimensions"]
        data = _decode(labelmap["data"]).reshape(nz, ny, nx)
        d = np.asarray(labelmap["direction"], dtype=np.float64).reshape(3, 3)
        sp = np.asarray(labelmap["spacing"], dtype=np.float64)
        o = np.asarray(labelmap["origin"], dtype=np.float64)
        y, x = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        for z in range(nz):
            world = o + x[..., None] * sp[0] * d[0] + y[..., None] * sp[1] * d[1] + z * sp[2] * d[2]
            planes.append((data[z], world))
        return planes
    for img in labelmap["images"]:
        rows, cols = img["rows"], img["columns"]
        values = _decode(img["data"]).reshape(rows, cols)
        ipp = np.asarray(img["imagePositionPatient"], dtype=np.float64)
        rc = np.asarray(img["rowCosines"], dtype=np.float64)
        cc = np.asarray(img["columnCosines"], dtype=np.float64)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        world = ipp + c[..., None] * img["columnPixelSpacing"] * rc + r[..., None] * img["rowPixelSpacing"] * cc
        planes.append((values, world))
    return planes


def _decode(blob: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(blob["base64"]), dtype=np.dtype(blob["dtype"])).copy()


def labelmap_on_grid(
    labelmap: dict, affine_lps: np.ndarray, shape: tuple[int, int, int], tol_voxels: float = 0.01
) -> np.ndarray:
    """OHIF's labelmap resampled (by exact voxel-centre match, no interpolation) onto a source grid ``[i, j, k]``.

    Every labelmap voxel centre is taken to LPS (mm) with OHIF's geometry, then to the source grid's
    continuous voxel index with ``inv(affine_lps)``. Raises AssertionError when a centre is more
    than ``tol_voxels`` from a source voxel centre or outside the grid while labelled, or when a
    source voxel is hit twice or never: OHIF's grid must be the source grid, not just overlap it.
    """
    out = np.zeros(shape, dtype=np.int64)
    hits = np.zeros(shape, dtype=np.int64)
    inv = np.linalg.inv(np.asarray(affine_lps, dtype=np.float64))
    for values, world in _labelmap_planes(labelmap):
        idx = world.reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]
        near = np.rint(idx)
        off = np.abs(idx - near).max()
        assert off <= tol_voxels, f"OHIF's labelmap voxel centres miss the source grid by {off:.4f} voxel"
        near = near.astype(np.int64)
        inside = np.all((near >= 0) & (near < np.asarray(shape)), axis=1)
        vals = values.reshape(-1)
        assert not np.any(vals[~inside]), "OHIF's labelmap has labelled voxels outside the source grid"
        i, j, k = near[inside].T
        out[i, j, k] = vals[inside]
        np.add.at(hits, (i, j, k), 1)
    assert hits.max() <= 1, "OHIF's labelmap covers some source voxels more than once"
    assert hits.min() == 1, f"OHIF's labelmap leaves {int((hits == 0).sum())} source voxels uncovered"
    return out


def _main() -> None:
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Serve OHIF's dist/ with a /dicom-web proxy (Ctrl-C stops).")
    ap.add_argument("--dist", required=True)
    ap.add_argument("--orthanc", required=True, help="Orthanc's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    with OhifServer(args.dist, args.orthanc, args.port) as srv:
        print(srv.url, flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    _main()
