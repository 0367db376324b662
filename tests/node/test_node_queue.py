"""The node's SQLite job queue: one job per series, exclusive claims across processes, leases, retries with
backoff then ``failed``, recorded outputs survive a restart, and a process killed mid-transaction leaves it sound."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from app.node.queue import JobQueue


def _received(q: JobQueue, n: int, now: float = 1000.0) -> list[str]:
    uids = []
    for i in range(n):
        uid = f"1.2.3.{i}"
        for k in range(3):
            q.record_instance(
                "9.9", uid, f"{uid}.{k}", key=f"series_{i}", study_key="study_x", folder=f"/spool/{i}",
                calling_aet="PACS", now=now + i,
            )  # fmt: skip
        uids.append(uid)
    return uids


def test_a_series_is_queued_once(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    (uid,) = _received(q, 1)
    again = q.record_instance("9.9", uid, f"{uid}.0", key="k", study_key="s", folder="/f", calling_aet="P", now=1000)
    assert again == "again"
    assert q.idle_series(5, now=1002) == [] and len(q.idle_series(5, now=1010)) == 1
    assert q.idle_series(5, now=1010)[0]["instances"] == 3
    assert q.enqueue(uid, bundle="b", route="r", max_attempts=2, now=1010) is True
    assert q.enqueue(uid, bundle="b", route="r", max_attempts=2, now=1011) is False  # never twice
    assert q.idle_series(5, now=2000) == []  # complete now
    assert q.series_queued(uid)
    assert q.record_instance("9.9", uid, "1.2.3.0.9", key="series_0", study_key="s", folder="/f", calling_aet="P") == (
        "late"
    )
    assert q.counts()["pending"] == 1


def _claimer(path: str, owner: str, out) -> None:
    q = JobQueue(path)
    got = []
    while True:
        job = q.claim(owner, 60)
        if job is None:
            break
        got.append(job.key)
        q.finish(job.id, owner, [])
    out.put(got)


def test_claims_are_exclusive_across_processes(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    for uid in _received(q, 40):
        q.enqueue(uid, bundle="b", route="r", max_attempts=1, now=0)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path / "q.db"), f"w{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    claimed = [k for _ in procs for k in out.get(timeout=120)]
    for p in procs:
        p.join(30)
    assert sorted(claimed) == sorted(f"series_{i}" for i in range(40))  # every job once, none twice
    assert q.counts()["done"] == 40


def test_retries_with_backoff_then_failed(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    (uid,) = _received(q, 1)
    q.enqueue(uid, bundle="b", route="r", max_attempts=3, now=0)
    job = q.claim("w", 60, now=100)
    assert job.attempts == 1
    assert q.fail(job.id, "w", "boom", retry_delay_s=10, now=100) == "pending"
    assert q.claim("w", 60, now=105) is None  # backing off for 10 s
    job = q.claim("w", 60, now=111)
    assert job.attempts == 2
    assert q.fail(job.id, "someone else", "x", 10, now=111) == ""  # only the lease holder reports
    assert q.fail(job.id, "w", "boom again", retry_delay_s=10, now=111) == "pending"
    assert q.claim("w", 60, now=125) is None  # 20 s the second time
    job = q.claim("w", 60, now=132)
    assert q.fail(job.id, "w", "third time", 10, now=132) == "failed"
    (row,) = q.jobs(("failed",))
    assert (row["attempts"], row["error"], row["finished_at"]) == (3, "third time", 132)


def test_leases_release_and_outputs(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    a, b = _received(q, 2)
    for uid in (a, b):
        q.enqueue(uid, bundle="b", route="r", max_attempts=2, now=0)
    ja = q.claim("node1-w0", 30, now=100)
    jb = q.claim("node1-w1", 30, now=100)
    assert q.set_outputs(ja.id, "node1-w0", {"seg": "/out/a_seg.dcm"})
    assert q.renew(jb.id, "node1-w1", 30, now=120)
    assert q.release_expired(now=140) == 1  # a's lease ran out at 130, b's runs to 150
    assert not q.renew(ja.id, "node1-w0", 30, now=141)  # the old holder lost it
    again = q.claim("node1-w2", 30, now=141)
    assert again.id == ja.id and again.outputs == {"seg": "/out/a_seg.dcm"} and again.attempts == 2
    # the node restarts: its running jobs come back without losing an attempt
    assert q.release(None, refund=True, now=150) == 2
    rows = {r["key"]: r for r in q.jobs()}
    assert rows["series_0"]["attempts"] == 1 and rows["series_1"]["attempts"] == 0
    again = q.claim("w", 30, now=151)
    assert again.id == ja.id and again.outputs  # outputs recorded: it resumes by sending, not computing


def test_a_job_that_kills_its_worker_every_time_ends_failed(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    a, b = _received(q, 2)
    for uid in (a, b):
        q.enqueue(uid, bundle="b", route="r", max_attempts=2, now=0)
    for t in (10, 20):
        job = q.claim("w", 30, now=t)
        assert job.key == "series_0"
        assert q.release("w", now=t + 1) == 1  # the supervisor found the worker dead
    nxt = q.claim("w", 30, now=30)  # series_0 had its two attempts: reported, and the next job runs
    assert nxt is not None and nxt.key == "series_1"
    (failed,) = q.jobs(("failed",))
    assert failed["key"] == "series_0" and "died" in failed["error"]


KILLER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE jobs SET state = 'done'")
print("holding", flush=True)
time.sleep(60)
"""


def test_a_process_killed_inside_a_transaction_changes_nothing(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    for uid in _received(q, 3):
        q.enqueue(uid, bundle="b", route="r", max_attempts=1, now=0)
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path / "q.db")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    t0 = time.monotonic()
    job = q.claim("w", 30)
    assert job is not None and time.monotonic() - t0 < 5
    assert q.counts()["done"] == 0 and q.counts()["running"] == 1
    q2 = JobQueue(Path(tmp_path / "q.db"))  # and a fresh connection sees the same
    assert q2.counts() == q.counts()
    assert sqlite3.connect(tmp_path / "q.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert sqlite3.connect(tmp_path / "q.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
