"""``segapp infer-batch``: segment every series under a folder (or every image of a manifest) in N processes.

Work items:

* DICOM: every image series that ``app.io.dicom_scan.scan_folder`` finds under the root, named
  ``series_<hash of its key>`` (no patient data in names); series that do not match the bundle's
  ``series_rules`` are listed as ``skipped``.
* NIfTI: every ``.nii``/``.nii.gz`` under the root, named ``nifti_<hash of its relative path>``.
* A manifest JSON: its cases' images (NIfTI files or DICOM series folders).

Each item's outputs go to ``OUTPUT/<key>/`` (all or nothing, see ``app.inference.pipeline``) and end
with ``OUTPUT/<key>/done.json`` (its row of the results table plus a fingerprint of the input files,
checkpoint and formats, and the id of the run that wrote it); each marker written is also appended as
one line to ``OUTPUT/done.log``. A later run skips items whose marker matches; an item that failed on
the same input is reported as failed again, with its old error, unless ``retry_failed`` runs it again.
Worker processes build the predictor once and take items one at a time from a shared queue; one
failing series is recorded with its error and never stops the others. A worker that dies (killed, out
of memory) fails the series it held, without a marker (a re-run does it again); the pool restarts
for the rest, and items whose marker a worker wrote before the pool broke are not redone.
``OUTPUT/results.csv`` and ``OUTPUT/results.json`` (written atomically, ``results.json`` last) list
every item with its status (``ok`` | ``failed`` | ``skipped``), seconds, output files and error message.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bundle.model import run_bundle
from app.bundle.store import find_bundle
from app.errors import ConfigError, DicomError, InputError, SegappError
from app.inference.jobs import NIFTI_FORMATS, find_nifti_inputs, parse_formats, series_key, summary_name
from app.inference.pipeline import Segmenter
from app.io.atomic import atomic_write_text, remove_stale_temps
from app.io.dicom_scan import scan_files
from app.runtime.preflight import check_device, check_output_dir

log = logging.getLogger(__name__)

DONE = "done.json"
DONE_LOG = "done.log"
STARTED = ".started"
DIED = "a worker process died while segmenting this series (killed, or out of memory?); a re-run does it again"
COLUMNS = ("key", "kind", "input", "status", "seconds", "outputs", "error")


@dataclass
class WorkItem:
    """One series or image to segment.

    Attributes:
        key: output folder name (``series_<hash>`` / ``nifti_<hash>``), free of patient data.
        kind: ``dicom`` or ``nifti``.
        input: the NIfTI file, or the folder holding the DICOM series' files.
        series: the series' ``SeriesInfo.key`` to read from that folder ('' = pick by the bundle's rules).
        files: the input files (for the fingerprint).
        skip_reason: set when the item is listed but not processed (e.g. it does not match the rules).
    """

    key: str
    kind: str
    input: str
    series: str = ""
    files: list[str] = field(default_factory=list)
    skip_reason: str = ""


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _dicom_items(root: Path, rules: dict | None) -> list[WorkItem]:
    from app.io.dicom_scan import scan_folder, select_series

    try:
        series = scan_folder(root)
    except DicomError:
        return []
    items = []
    for s in series:
        if not s.is_image:  # SEG/RTSTRUCT/SR...: nothing to segment
            continue
        folder = Path(os.path.commonpath([str(Path(f).parent) for f in s.files]))
        item = WorkItem(series_key(s.key), "dicom", str(folder), s.key, sorted(s.files))
        try:
            select_series([s], None, rules)
        except SegappError as exc:
            why = str(exc).splitlines()[0].split("; available series")[0]
            item.skip_reason = (
                f"{s.modality or '?'} series of {s.n_slices} slice(s) does not match the bundle's series rules: {why}"
            )
        items.append(item)
    return items


def find_work(
    source: str | os.PathLike, rules: dict | None = None, exclude: str | os.PathLike | None = None
) -> list[WorkItem]:
    """Every series/image under a folder, or every image of a manifest, sorted by key.

    Args:
        source: a folder (searched recursively for DICOM series and NIfTI files) or a manifest ``.json``.
        rules: the bundle's ``series_rules``; DICOM series that do not match are marked skipped.
        exclude: a folder whose files are ignored (the output folder, when it lies inside ``source``).

    Raises:
        InputError: the source does not exist or holds nothing to segment.
    """
    src = Path(source)
    if not src.exists():
        raise InputError("input not found", str(src))
    items: list[WorkItem] = []
    if src.is_file() and src.suffix.lower() == ".json":
        from app.data.manifest import load_manifest

        m = load_manifest(src)
        for case in m.cases:
            image = Path(case.image)
            if image.is_dir() or image.suffix.lower() in (".dcm", ".dicom"):  # a series folder: rules pick the series
                files = sorted(str(f) for f in image.rglob("*") if f.is_file()) if image.is_dir() else [str(image)]
                items.append(
                    WorkItem(f"series_{_hash(os.path.relpath(image, m.data_root))}", "dicom", str(image), files=files)
                )
            else:
                rel = os.path.relpath(image, m.data_root)
                items.append(WorkItem(f"nifti_{_hash(rel)}", "nifti", str(image), files=[str(image)]))
    else:
        excluded = Path(exclude).resolve() if exclude else None

        def keep(f: Path) -> bool:
            return excluded is None or excluded not in f.resolve().parents

        root = src if src.is_dir() else src.parent
        for f in find_nifti_inputs(src) if src.is_dir() or src.name.endswith((".nii", ".nii.gz")) else []:
            if keep(f):
                items.append(WorkItem(f"nifti_{_hash(os.path.relpath(f, root))}", "nifti", str(f), files=[str(f)]))
        if not (src.is_file() and src.name.endswith((".nii", ".nii.gz"))):
            items.extend(i for i in _dicom_items(src, rules) if all(keep(Path(f)) for f in i.files))
    if not items:
        raise InputError("nothing to segment: no DICOM image series, NIfTI files or manifest cases found", str(src))
    dup = {k for k, n in Counter(i.key for i in items).items() if n > 1}
    if dup:  # the same series listed twice (e.g. a manifest naming one folder twice)
        raise InputError(f"the same series/image appears more than once: {sorted(dup)}", str(src))
    return sorted(items, key=lambda i: i.key)


def fingerprint(item: WorkItem, checkpoint: str, formats: Sequence[str]) -> str:
    """Changes when an input file, the checkpoint or the formats change (size and mtime, not content)."""
    h = hashlib.sha256()
    for f in [*item.files, checkpoint]:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    h.update((item.series + "|" + ",".join(formats)).encode())
    return h.hexdigest()


# -- worker side -------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(spec: dict, slots) -> None:
    """Build the predictor once per process; on several GPUs each worker takes its own."""
    import torch

    from app.bundle.model import load_model

    _WORKER.clear()
    _WORKER["spec"] = spec
    slot = slots.get() if slots is not None else 0
    device = spec["device"]
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{slot % torch.cuda.device_count()}"
    if spec["nproc"] > 1 and not str(device).startswith("cuda"):  # share the cores, don't oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec["nproc"]))
    try:
        model = load_model(
            spec["bundle"],
            spec["checkpoint"],
            run=spec["run"],
            overrides=spec["overrides"],
            device=device,
            configs=spec["extra_configs"],
            trust=spec["trust"],
        )
        _WORKER["segmenter"] = Segmenter(model)
    except Exception as exc:  # in a pool, re-raised by the first task so the parent sees the real error
        if slots is None:
            raise
        _WORKER["init_error"] = exc


def _process(item: WorkItem, fp: str) -> dict:
    """Segment one item in this worker; never raises for a bad series (the row says what went wrong)."""
    if "init_error" in _WORKER:
        raise _WORKER["init_error"]
    spec = _WORKER["spec"]
    out = Path(spec["output"]) / item.key
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # this worker alone has this item's folder: a killed attempt's temp files go
    atomic_write_text(out / STARTED, str(os.getpid()))
    t0 = time.perf_counter()
    row: dict[str, Any] = {"key": item.key, "kind": item.kind, "input": item.input, "status": "ok", "outputs": []}
    row["error"] = ""
    try:
        segmenter: Segmenter = _WORKER["segmenter"]
        if item.kind == "dicom":
            res = segmenter.dicom(
                item.input,
                out,
                spec["formats"],
                item.series or None,
                spec["send"],
                spec["allow_generated_uids"],
                overwrite=True,  # no marker: whatever an earlier, interrupted attempt left is replaced
                # only this item's files are read (the series' folder may hold many others)
                scan=scan_files(item.files, root=item.input) if item.series and item.files else None,
            )
        else:
            nifti_formats = [f for f in spec["formats"] if f in NIFTI_FORMATS]  # the DICOM ones do not apply
            res = segmenter.nifti(item.input, out, overwrite=True, formats=nifti_formats)
        paths = [*res.outputs.values(), str(out / summary_name(res.key))]
        row["outputs"] = sorted(os.path.relpath(p, spec["output"]) for p in paths)
    except Exception as exc:  # a series we could not foresee must not stop the batch
        if not isinstance(exc, SegappError):
            log.debug("series %s failed", item.key, exc_info=True)
        row.update(status="failed", error=_error_line(exc), outputs=_kept_outputs(out, spec["output"]))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["worker"] = os.getpid()
    atomic_write_text(out / DONE, json.dumps({**row, "fingerprint": fp, "run": spec["run_id"]}, indent=2))
    _append_line(Path(spec["output"]) / DONE_LOG, {"key": item.key, "status": row["status"], **_stamp(spec)})
    (out / STARTED).unlink(missing_ok=True)
    log.info(
        "%s: %s in %.1f s%s", item.key, row["status"], row["seconds"], f" ({row['error']})" if row["error"] else ""
    )
    return row


def _kept_outputs(folder: Path, root: str) -> list[str]:
    """Outputs a failed item still has (a failed send keeps them), from its summary."""
    files: list[str] = []
    for summary in folder.glob("*_summary.json"):
        try:
            outputs = json.loads(summary.read_text()).get("outputs") or {}
        except (OSError, ValueError):
            continue
        files += [str(summary), *(str(p) for p in outputs.values() if Path(p).is_file())] if outputs else []
    return sorted(os.path.relpath(p, root) for p in files)


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, SegappError):
        return str(exc).splitlines()[0]
    return f"{type(exc).__name__}: {exc}"


def _stamp(spec: dict) -> dict:
    return {"run": spec["run_id"], "worker": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _append_line(path: Path, record: dict) -> None:
    """One JSON line appended in one write (O_APPEND: lines of concurrent workers never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


# -- driver ------------------------------------------------------------------------------------------------
def _previous(out: Path, item: WorkItem, fp: str) -> dict | None:
    """The item's done marker when it matches the current input (fingerprint), else None."""
    marker = out / item.key / DONE
    if not marker.is_file():
        return None
    try:
        prev = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return prev if prev.get("fingerprint") == fp else None


def write_results(output: str | os.PathLike, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """``results.csv`` and ``results.json`` (the latter last: its presence means the table is complete)."""
    out = Path(output)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "outputs": ";".join(r.get("outputs", [])), "seconds": f"{r.get('seconds', 0.0):.3f}"})
    csv_path = atomic_write_text(out / "results.csv", buf.getvalue())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    json_path = atomic_write_text(
        out / "results.json", json.dumps({**meta, "counts": counts, "series": rows}, indent=2)
    )
    return csv_path, json_path


def infer_batch(
    bundle: str | None,
    source: str,
    output: str,
    nproc: int = 1,
    checkpoint: str | None = None,
    device: str = "auto",
    formats: str | None = None,
    extra_configs: Sequence[str] = (),
    overrides: dict[str, Any] | None = None,
    send_to: Sequence[str] = (),
    allow_generated_uids: bool = False,
    retry_failed: bool = False,
    run: str | None = None,
    trust: bool = False,
) -> dict:
    """Segment every series/image of ``source`` into ``output/<key>/`` with ``nproc`` worker processes.

    Args:
        bundle: bundle name or folder (or None with ``run``).
        source: folder (DICOM series and/or NIfTI files, searched recursively) or manifest JSON.
        output: output folder (per-item subfolders, ``results.csv``, ``results.json``).
        nproc: worker processes (each loads the model once; on GPUs one GPU per worker, round robin).
        checkpoint: weights (default: the bundle's ``models/model.pt``).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (``cuda:N`` pins every worker to that GPU).
        formats: comma list of ``nifti,seg,rtstruct,stats,sr,overlay`` (NIfTI inputs give NIfTI and the overlay).
        send_to: PACS destinations for the DICOM outputs (see ``app.io.pacs.send``).
        retry_failed: run again items that failed last time on the same input.
        run: a segapp training-run folder (its configs and weights), see ``app.bundle.model``.
        trust: run an untrusted bundle's code (``--trust-bundle``).

    Returns:
        ``results.json``'s content: ``counts`` by status and one row per item.
    """
    if int(nproc) < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}", "--nproc")
    fmt = parse_formats(formats, dicom=True)
    check_device(device)  # fail early, naming --device
    out = check_output_dir(output)  # writable, before any model is built
    ref = run_bundle(run) if run is not None else find_bundle(bundle)  # type: ignore[arg-type]
    ckpt_path = Path(checkpoint) if checkpoint else ref.root / "models" / "model.pt"
    if not ckpt_path.is_file():
        raise ConfigError("checkpoint not found (train the bundle first, or pass --run / --checkpoint)", str(ckpt_path))
    ckpt = str(ckpt_path.resolve())
    items = find_work(source, ref.metadata.get("series_rules"), exclude=out)
    t_start = time.time()

    rows: dict[str, dict] = {}
    todo: list[tuple[WorkItem, str]] = []
    for item in items:
        fp = fingerprint(item, ckpt, fmt)
        prev = _previous(out, item, fp)
        if item.skip_reason:
            rows[item.key] = _row(item, "skipped", error=item.skip_reason)
        elif prev is not None and prev.get("status") == "ok":
            rows[item.key] = _row(item, "skipped", outputs=prev.get("outputs", []), error="already done")
        elif prev is not None and not retry_failed:  # still failed: say so, and count it
            why = f"failed before (use --retry-failed to run it again): {prev.get('error', '')}"
            rows[item.key] = _row(item, "failed", outputs=prev.get("outputs", []), error=why)
        else:
            todo.append((item, fp))
            (out / item.key / STARTED).unlink(missing_ok=True)
    log.info(
        "%d item(s): %d to do, %d done or skipped before, %d failed before, %d process(es)",
        len(items),
        len(todo),
        sum(r["status"] == "skipped" for r in rows.values()),
        sum(r["status"] == "failed" for r in rows.values()),
        nproc,
    )

    spec = {
        "bundle": bundle,
        "run": run,
        "trust": bool(trust),
        "checkpoint": ckpt,
        "device": device,
        "overrides": overrides or {},
        "extra_configs": list(extra_configs),
        "output": str(out),
        "formats": fmt,
        "send": list(send_to),
        "allow_generated_uids": bool(allow_generated_uids),
        "nproc": int(min(nproc, max(1, len(todo)))),
        "run_id": uuid.uuid4().hex[:12],
    }
    meta = {
        "bundle": ref.metadata.get("name", ref.name),
        "checkpoint": ckpt,
        "input": str(Path(source).resolve()),
        "formats": fmt,
        "nproc": spec["nproc"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "run": spec["run_id"],
    }
    try:
        if todo and spec["nproc"] == 1:
            _init_worker(spec, None)
            for item, fp in todo:
                rows[item.key] = _process(item, fp)
        elif todo:
            _run_pool(todo, spec, out, rows)
    except KeyboardInterrupt:  # keep the table of what was done; a rerun continues from there
        for item in items:
            rows.setdefault(item.key, _row(item, "skipped", error="interrupted before this series was run"))
        write_results(out, [rows[i.key] for i in items], {**meta, "seconds": round(time.time() - t_start, 3)})
        raise
    finally:
        _WORKER.clear()
    meta["seconds"] = round(time.time() - t_start, 3)
    write_results(out, [rows[i.key] for i in items], meta)
    return json.loads((out / "results.json").read_text())


def _row(item: WorkItem, status: str, outputs: list[str] | None = None, error: str = "", seconds: float = 0.0) -> dict:
    return {
        "key": item.key,
        "kind": item.kind,
        "input": item.input,
        "status": status,
        "outputs": list(outputs or []),
        "error": error,
        "seconds": seconds,
    }


def _run_pool(todo: list[tuple[WorkItem, str]], spec: dict, out: Path, rows: dict[str, dict]) -> None:
    """Process pool with a fresh start when a worker dies: the series it held is failed, the rest re-queued."""
    ctx = mp.get_context("spawn")  # no forked CUDA/OpenMP state
    pending = list(todo)
    while pending:
        slots = ctx.Queue()
        for i in range(spec["nproc"]):
            slots.put(i)
        broken = False
        with cf.ProcessPoolExecutor(
            max_workers=spec["nproc"], mp_context=ctx, initializer=_init_worker, initargs=(spec, slots)
        ) as pool:
            futures = {pool.submit(_process, item, fp): (item, fp) for item, fp in pending}
            for fut in cf.as_completed(futures):
                item, _ = futures[fut]
                try:
                    rows[item.key] = fut.result()
                except cf.process.BrokenProcessPool:
                    broken = True
                except SegappError:  # the predictor could not be built (bad checkpoint, config): stop, say why
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
                except Exception as exc:
                    rows[item.key] = _row(item, "failed", error=f"{type(exc).__name__}: {exc}")
        if not broken:
            return
        before = len(pending)
        for item, fp in pending:  # finished (marker written) but its result was lost with the pool
            prev = _previous(out, item, fp) if item.key not in rows else None
            if prev is not None and prev.get("run") == spec["run_id"]:
                rows[item.key] = {k: v for k, v in prev.items() if k not in ("fingerprint", "run")}
                (out / item.key / STARTED).unlink(missing_ok=True)
        for item, _ in pending:  # held by a worker when the pool broke: no marker, so a re-run does it again
            if item.key not in rows and (out / item.key / STARTED).is_file():
                rows[item.key] = _row(item, "failed", error=DIED)
                (out / item.key / STARTED).unlink(missing_ok=True)
        pending = [(i, fp) for i, fp in pending if i.key not in rows]
        if len(pending) == before:  # the pool broke before any series started: it will not get better
            raise RuntimeError("infer-batch worker processes died before segmenting anything")
        log.warning("a worker process died; restarting the pool for %d remaining item(s)", len(pending))
