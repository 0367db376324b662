"""Node latency: from the last C-STORE of a study to its SEG stored back in the PACS, with 1, 5 and 20 studies
pushed at once.

Starts a real Orthanc (``tests/helpers/orthanc_server.py``) and ``segapp serve`` as a subprocess
(``tests/helpers/node_process.py``) with a small bundle on the CPU: the hippocampus pipeline with a tiny
random-weight 3D U-Net (``runs.tiny_run``, features 4-8; ``--net threshold`` for the threshold network).
For each batch size N, N phantom MR studies are uploaded to Orthanc and Orthanc pushes them all at once
(one store job per study, Orthanc running its default two jobs at a time); the node sends each SEG back by
C-STORE. The time of a study's last C-STORE is the node's own record (``last_instance_at`` in
``/status``); the time its SEG is stored in Orthanc is when this script sees the new SEG series in
Orthanc's change feed (polled every 50 ms, so up to ~0.05 s late). Per batch it prints the latency's
median / 90th percentile / max, and the median of its parts: waiting (the idle timeout, then the queue)
and running (pipeline + send).

    python bench/node_latency.py                      # 1, 5, 20 studies; about 3 minutes on 2 CPU cores
    python bench/node_latency.py --workers 2 --idle-timeout 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "helpers"))

from dicom_phantoms import write_phantom_series  # noqa: E402
from node_process import NodeProcess, threshold_checkpoint, write_node_config  # noqa: E402
from orthanc_rest import call, put_modality, store_async, upload  # noqa: E402
from orthanc_server import OrthancServer, free_port  # noqa: E402

from app.node.receiver import study_key  # noqa: E402


def _seconds(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _watch_segs(orthanc, since: int, wanted: set[str], timeout_s: float) -> dict[str, float]:
    """``{StudyInstanceUID: time this script saw its first SEG}`` for the ``wanted`` studies."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while set(seen) < wanted and time.monotonic() < deadline:
        page = call(orthanc, "GET", f"/changes?since={since}&limit=1000")
        now = time.time()
        for change in page["Changes"]:
            if change["ChangeType"] != "NewSeries":
                continue
            series = call(orthanc, "GET", f"/series/{change['ID']}")
            if series["MainDicomTags"].get("Modality") != "SEG":
                continue
            uid = call(orthanc, "GET", f"/studies/{series['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
            seen.setdefault(uid, now)
        since = page["Last"]
        if page["Done"]:
            time.sleep(0.05)
    missing = wanted - set(seen)
    if missing:
        raise TimeoutError(f"{len(missing)} SEG(s) did not arrive within {timeout_s} s")
    return seen


def run_batch(orthanc, node: NodeProcess, root: Path, n: int, shape: tuple[int, int, int]) -> dict:
    studies = [
        write_phantom_series(root / f"s{i}", modality="MR", orientation=("sagittal", "oblique")[i % 2], shape=shape)
        for i in range(n)
    ]
    ids = [upload(orthanc, s.files)[0] for s in studies]
    since = call(orthanc, "GET", "/changes?last")["Last"]
    t0 = time.time()
    for i in ids:  # all at once (Orthanc keeps only its last 10 jobs: the SEGs arriving is what counts)
        store_async(orthanc, "segapp-node", i)
    seen = _watch_segs(orthanc, since, {s.study_uid for s in studies}, timeout_s=120 + 20 * n)
    keys = {study_key(s.study_uid) for s in studies}  # the node records "done" just after its send returns
    status = node.wait_for(lambda st: keys <= {j["study"] for j in st["done"]}, timeout_s=60)
    by_study = {j["study"]: j for j in status["done"]}
    rows = []
    for s in studies:
        job = by_study[study_key(s.study_uid)]
        last = _seconds(job["last_instance_at"])
        rows.append({"latency": seen[s.study_uid] - last, "wait": job["wait_s"], "run": job["run_s"]})
    return {"n": n, "rows": rows, "push_to_last_seg_s": max(seen.values()) - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 5, 20], help="studies pushed at once, per batch")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--idle-timeout", type=float, default=2.0, help="seconds without instances: series complete")
    ap.add_argument("--net", choices=["tiny", "threshold"], default="tiny")
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 48, 24], help="phantom series I J K")
    args = ap.parse_args()
    os.environ.setdefault("SEGAPP_HOME", tempfile.mkdtemp(prefix="segapp-bench-home-"))
    work = Path(tempfile.mkdtemp(prefix="segapp-node-bench-"))
    try:
        with OrthancServer(work / "orthanc") as orthanc:
            port, http_port = free_port(), free_port()
            put_modality(orthanc, "segapp-node", "SEGAPP", port)
            node_dir = work / "node"
            node_dir.mkdir()
            if args.net == "tiny":
                from runs import tiny_run

                model = {"run": tiny_run(node_dir / "tiny_run")}
            else:
                model = {"checkpoint": threshold_checkpoint(node_dir / "threshold.pt")}
            config = write_node_config(
                node_dir / "node.toml",
                port=port,
                http_port=http_port,
                allowed=[orthanc.aet],
                destinations=[orthanc.dimse_destination],
                workers=args.workers,
                idle_timeout_s=args.idle_timeout,
                formats=("seg",),
                **model,
            )
            node = NodeProcess(config, http_port, node_dir / "serve.log").start()
            try:
                results = [run_batch(orthanc, node, work / f"batch{n}", n, tuple(args.shape)) for n in args.counts]
            finally:
                node.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"segapp node latency: last C-STORE of a study -> its SEG stored in Orthanc "
        f"({platform.machine()}, {os.cpu_count()} CPU(s), CPU only; net {args.net}, series {args.shape}, "
        f"{args.workers} worker(s), idle timeout {args.idle_timeout} s)"
    )
    print(f"{'studies':>8} {'median s':>9} {'p90 s':>7} {'max s':>7} {'wait s':>7} {'run s':>7} {'all done s':>11}")
    for r in results:
        lat = sorted(x["latency"] for x in r["rows"])
        p90 = lat[min(len(lat) - 1, int(round(0.9 * (len(lat) - 1))))]
        print(
            f"{r['n']:>8} {statistics.median(lat):>9.2f} {p90:>7.2f} {lat[-1]:>7.2f} "
            f"{statistics.median(x['wait'] for x in r['rows']):>7.2f} "
            f"{statistics.median(x['run'] for x in r['rows']):>7.2f} {r['push_to_last_seg_s']:>11.2f}"
        )
    print("wait = idle timeout + time in the queue; run = pipeline + C-STORE back; all done = push start to last SEG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
