"""The node's persistent state: received series and their jobs in one SQLite database (WAL journal).

Tables:

* ``series``: one row per SeriesInstanceUID received (its spool folder, first and last C-STORE times,
  ``receiving`` until the idle timeout, then ``complete``); ``instances`` lists the SOP Instance UIDs.
* ``jobs``: at most one per series (``UNIQUE``), so a series is queued once however often it arrives.
  States: ``pending`` -> ``running`` (a worker holds a lease: owner + expiry, renewed while it works)
  -> ``done`` | ``failed`` (after ``max_attempts``; the error kept) | ``skipped`` (no route, not an
  image). A running job whose outputs were recorded (``outputs``) is only sent again when it resumes,
  never computed again, so a SEG already stored somewhere keeps its UIDs.

Every change is one transaction; the claim is ``BEGIN IMMEDIATE`` so two workers never take one job.
A process killed at any point leaves either the state before or after a change: on restart the node
releases the leases of its dead workers and the jobs run (or send) again. Times are Unix seconds.
Rows name series by a hash key (``series_<hash>``); UIDs are kept for the workers, never logged.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    key TEXT NOT NULL,
    study_key TEXT NOT NULL,
    folder TEXT NOT NULL,
    calling_aet TEXT,
    first_store REAL NOT NULL,
    last_store REAL NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series (state, last_store);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL UNIQUE,
    key TEXT NOT NULL,
    study_key TEXT NOT NULL,
    bundle TEXT,
    route TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    outputs TEXT,
    sent TEXT,
    error TEXT,
    instances INTEGER,
    last_store REAL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, not_before);
"""

STATES = ("pending", "running", "done", "failed", "skipped")


@dataclass
class Job:
    """A claimed job: what a worker needs to run and report it."""

    id: int
    series_uid: str
    key: str
    study_key: str
    bundle: str
    folder: str
    attempts: int
    max_attempts: int
    outputs: dict[str, str] = field(default_factory=dict)


class JobQueue:
    """The queue database at ``path`` (created). Thread-safe within a process; any number of processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._db.execute("PRAGMA busy_timeout=60000")
        with self._lock:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- receiving ---------------------------------------------------------------------------------------
    def series_queued(self, series_uid: str) -> bool:
        """True once a job exists for the series (later instances are not part of it)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE series_uid = ?", (series_uid,)).fetchone() is not None

    def record_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        *,
        key: str,
        study_key: str,
        folder: str,
        calling_aet: str,
        now: float | None = None,
    ) -> str:
        """Note one stored instance; returns ``new``, ``again`` (the SOP instance was here already) or
        ``late`` (its series is queued already)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            late = db.execute("SELECT 1 FROM jobs WHERE series_uid = ?", (series_uid,)).fetchone() is not None
            fresh = db.execute(
                "INSERT OR IGNORE INTO instances (sop_uid, series_uid) VALUES (?, ?)", (sop_uid, series_uid)
            ).rowcount
            db.execute(
                "INSERT INTO series (series_uid, study_uid, key, study_key, folder, calling_aet, first_store, "
                "last_store, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'receiving') "
                "ON CONFLICT (series_uid) DO UPDATE SET last_store = excluded.last_store",
                (series_uid, study_uid, key, study_key, folder, calling_aet, now, now),
            )
        return "late" if late else ("new" if fresh else "again")

    def idle_series(self, idle_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Series still ``receiving`` whose last instance came more than ``idle_s`` ago."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS instances "
                "FROM series s WHERE s.state = 'receiving' AND s.last_store < ? ORDER BY s.last_store",
                (now - idle_s,),
            ).fetchall()
        return [dict(r) for r in rows]

    def enqueue(
        self,
        series_uid: str,
        *,
        bundle: str | None,
        route: str,
        max_attempts: int,
        state: str = "pending",
        error: str = "",
        now: float | None = None,
    ) -> bool:
        """Mark the series complete and add its job (``pending``, or ``skipped``/``failed`` with ``error``)
        in one transaction. Returns False when the series had a job already (nothing changes)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            s = db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if s is None:
                raise KeyError("unknown series")
            n = db.execute("SELECT COUNT(*) FROM instances WHERE series_uid = ?", (series_uid,)).fetchone()[0]
            db.execute("UPDATE series SET state = 'complete' WHERE series_uid = ?", (series_uid,))
            added = db.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, key, study_key, bundle, route, state, max_attempts, "
                "error, instances, last_store, queued_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    series_uid,
                    s["key"],
                    s["study_key"],
                    bundle,
                    route,
                    state,
                    max_attempts,
                    error or None,
                    n,
                    s["last_store"],
                    now,
                    None if state == "pending" else now,
                ),
            ).rowcount
        return bool(added)

    # -- working -----------------------------------------------------------------------------------------
    def claim(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        """Take the oldest runnable pending job (state ``running``, one more attempt, a lease for ``owner``)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            while True:
                row = db.execute(
                    "SELECT j.*, s.folder FROM jobs j JOIN series s USING (series_uid) "
                    "WHERE j.state = 'pending' AND j.not_before <= ? ORDER BY j.queued_at, j.id LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                if row["attempts"] < row["max_attempts"] or row["outputs"]:
                    break
                # its worker died during every attempt (crash, out of memory): report it, take the next one
                error = row["error"] or f"the worker died during each of {row['attempts']} attempt(s)"
                db.execute(
                    "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ?", (now, error, row["id"])
                )
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, lease_until = ?, "
                "started_at = ? WHERE id = ?",
                (owner, now + lease_s, now, row["id"]),
            )
        return Job(
            id=row["id"],
            series_uid=row["series_uid"],
            key=row["key"],
            study_key=row["study_key"],
            bundle=row["bundle"],
            folder=row["folder"],
            attempts=row["attempts"] + 1,
            max_attempts=row["max_attempts"],
            outputs=json.loads(row["outputs"]) if row["outputs"] else {},
        )

    def _update(self, sql: str, args: tuple) -> bool:
        with self._tx() as db:
            return db.execute(sql, args).rowcount > 0

    def renew(self, job_id: int, owner: str, lease_s: float, now: float | None = None) -> bool:
        """Extend the lease; False when ``owner`` no longer holds the job."""
        now = time.time() if now is None else now
        return self._update(
            "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (now + lease_s, job_id, owner),
        )

    def set_outputs(self, job_id: int, owner: str, outputs: dict[str, str]) -> bool:
        """Record the written outputs: from now on the job is only sent, never computed again."""
        return self._update(
            "UPDATE jobs SET outputs = ? WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (json.dumps(outputs), job_id, owner),
        )

    def finish(self, job_id: int, owner: str, sent: list[dict], now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self._update(
            "UPDATE jobs SET state = 'done', sent = ?, error = NULL, finished_at = ?, lease_owner = NULL, "
            "lease_until = NULL WHERE id = ? AND lease_owner = ? AND state = 'running'",
            (json.dumps(sent), now, job_id, owner),
        )

    def fail(self, job_id: int, owner: str, error: str, retry_delay_s: float, now: float | None = None) -> str:
        """Record a failed attempt: back to ``pending`` after a backoff while attempts remain, else ``failed``.
        Returns the new state ('' when ``owner`` had lost the job)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (job_id, owner),
            ).fetchone()
            if row is None:
                return ""
            if row["attempts"] < row["max_attempts"]:
                delay = retry_delay_s * 2 ** (row["attempts"] - 1)
                db.execute(
                    "UPDATE jobs SET state = 'pending', error = ?, not_before = ?, lease_owner = NULL, "
                    "lease_until = NULL WHERE id = ?",
                    (error, now + delay, job_id),
                )
                return "pending"
            db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, lease_owner = NULL, "
                "lease_until = NULL WHERE id = ?",
                (error, now, job_id),
            )
            return "failed"

    def release(self, owner: str | None = None, *, refund: bool = False, now: float | None = None) -> int:
        """Put the running jobs of ``owner`` (every running job when None) back to ``pending``. A dead worker's
        attempt stays counted (a job that kills its worker every time ends ``failed``); ``refund`` gives it
        back (the whole node was stopped or killed, not the job's doing). Returns how many."""
        now = time.time() if now is None else now
        where, args = ("lease_owner = ?", (owner,)) if owner is not None else ("1 = 1", ())
        back = "MAX(attempts - 1, 0)" if refund else "attempts"
        return self._update_count(
            f"UPDATE jobs SET state = 'pending', attempts = {back}, not_before = ?, lease_owner = NULL, "
            f"lease_until = NULL WHERE state = 'running' AND {where}",
            (now, *args),
        )

    def release_expired(self, now: float | None = None) -> int:
        """``pending`` again for running jobs whose lease ran out (a hung or vanished worker)."""
        now = time.time() if now is None else now
        return self._update_count(
            "UPDATE jobs SET state = 'pending', not_before = ?, lease_owner = NULL, lease_until = NULL "
            "WHERE state = 'running' AND lease_until < ?",
            (now, now),
        )

    def _update_count(self, sql: str, args: tuple) -> int:
        with self._tx() as db:
            return db.execute(sql, args).rowcount

    # -- reporting ---------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {s: 0 for s in ("receiving", *STATES)}
            out["receiving"] = self._db.execute("SELECT COUNT(*) FROM series WHERE state = 'receiving'").fetchone()[0]
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                out[state] = n
        return out

    def jobs(self, states: tuple[str, ...] = STATES, limit: int = 1000) -> list[dict[str, Any]]:
        """Job rows (no UIDs) in queue order, newest finished last."""
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, key, study_key, bundle, route, state, attempts, max_attempts, not_before, error, "
                f"instances, last_store, queued_at, started_at, finished_at, outputs, sent FROM jobs "
                f"WHERE state IN ({marks}) ORDER BY queued_at, id LIMIT ?",
                (*states, limit),
            ).fetchall()
        return [dict(r) for r in rows]

    def receiving(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.key, s.study_key, s.calling_aet, s.first_store, s.last_store, "
                "(SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS instances "
                "FROM series s WHERE s.state = 'receiving' ORDER BY s.first_store LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(r) for r in rows]
