"""The durable queue of the Videos API: every accepted video job, in SQLite.

    submit (queued) -> claim (in_progress, leased to a runner) -> finish (completed) | fail (failed)

A runner holds a job under a lease that each step of progress renews (cluster.videos). If its
process dies (an ingress replica restarted) or it stops making progress, the lease runs out and
the next claim takes the job again: nothing accepted is lost, and a job is tried at most
`max_attempts` times. A clean stop gives its jobs back at once, their attempt not counted. The
queue is bounded: `submit` refuses beyond `max_active` queued or running jobs (the API answers 429).

SQLite rather than a queue service: it is in the standard library, survives restarts, and the
ingress replicas of one node share the file (WAL mode lets readers and one writer work at
once). Replicas on several nodes need the file on storage they all reach, or another store.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["queued", "in_progress", "completed", "failed"]
ID_PREFIX = "video_"
ID_HEX_CHARS = 32  # 128 random bits: unguessable
# Every store operation has a deadline: a thread waits this long for another thread's turn, then
# SQLite as long for another process's write lock (then raises "database is locked").
STORE_TIMEOUT_S = 30.0


def new_video_id() -> str:
    return ID_PREFIX + secrets.token_hex(ID_HEX_CHARS // 2)


def is_video_id(text: str) -> bool:
    """Whether `text` has the shape of an id this store hands out (checked before any lookup)."""
    body = text[len(ID_PREFIX) :]
    return text.startswith(ID_PREFIX) and len(body) == ID_HEX_CHARS and all(c in "0123456789abcdef" for c in body)


class QueueFull(Exception):
    """The queue holds `active` jobs, its bound; `retry_after_s` estimates when one frees up."""

    def __init__(self, active: int, retry_after_s: int):
        super().__init__(f"the queue is full ({active} videos queued or in progress); retry in {retry_after_s} s")
        self.active, self.retry_after_s = active, retry_after_s


@dataclass(frozen=True)
class VideoRecord:
    id: str
    model: str
    status: Status
    progress: int  # 0-100
    created_at: float
    request: dict[str, Any]  # what the job was asked (as validated when accepted)
    attempts: int  # claims so far
    started_at: float | None = None
    completed_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None  # what the run produced (files, metrics, run id)
    worker: str | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order (ids are random)
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    request TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until REAL,
    started_at REAL,
    completed_at REAL,
    error_code TEXT,
    error_message TEXT,
    result TEXT,
    deleted INTEGER NOT NULL DEFAULT 0  -- deleted while in progress: its runner drops the result
);
CREATE INDEX IF NOT EXISTS videos_status ON videos (status, seq);
"""
_COLUMNS = (
    "id, model, status, progress, created_at, request, attempts, started_at, completed_at, "
    "error_code, error_message, result, worker"
)
ACTIVE = ("queued", "in_progress")
RECENT_JOBS = 20  # finished jobs whose durations estimate Retry-After


class JobStore:
    """The jobs of one SQLite file. Thread-safe; several processes may share the file."""

    def __init__(self, path: str | Path, max_attempts: int = 3):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=STORE_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, one thread at a time, waiting at most STORE_TIMEOUT_S for it."""
        if not self._lock.acquire(timeout=STORE_TIMEOUT_S):
            raise TimeoutError(f"the job database {self.path} was busy for {STORE_TIMEOUT_S:g} s")
        try:
            yield self._db
        finally:
            self._lock.release()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time across threads (the lock) and processes (BEGIN IMMEDIATE)."""
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._locked() as db:
            return db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._locked() as db:
            db.close()

    def ping(self) -> None:
        """Raises if the file cannot be read (for health checks)."""
        self._read("SELECT 1 FROM videos LIMIT 1")

    # -- submitting and reading ---------------------------------------------------------------

    def submit(self, model: str, request: dict[str, Any], max_active: int, video_id: str | None = None) -> VideoRecord:
        """Queue a new job (under `video_id`, made here if not given: a caller that stores files
        for the job first names it), or raise QueueFull when `max_active` jobs are queued or in progress."""
        video_id, now = video_id or new_video_id(), time.time()
        with self._transaction() as db:
            active = db.execute("SELECT COUNT(*) FROM videos WHERE status IN (?, ?)", ACTIVE).fetchone()[0]
            if active >= max_active:
                raise QueueFull(active, self._retry_after(db))
            db.execute(
                "INSERT INTO videos (id, model, status, created_at, request) VALUES (?, ?, 'queued', ?, ?)",
                (video_id, model, now, json.dumps(request)),
            )
            # read in the same transaction: the job as queued, even if a runner claims it at once
            row = db.execute(f"SELECT {_COLUMNS} FROM videos WHERE id = ?", (video_id,)).fetchone()
        return _record(row)

    def _retry_after(self, db: sqlite3.Connection) -> int:
        """Seconds until a place is likely to free up: a running job ends within one job's
        time, estimated from the recent jobs' durations (10 s before any has finished)."""
        rows = db.execute(
            "SELECT completed_at - started_at FROM videos WHERE status = 'completed' ORDER BY seq DESC LIMIT ?",
            (RECENT_JOBS,),
        ).fetchall()
        typical = sum(r[0] for r in rows) / len(rows) if rows else 10.0
        return max(1, math.ceil(typical))

    def get(self, video_id: str) -> VideoRecord | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM videos WHERE id = ? AND deleted = 0", (video_id,))
        return _record(rows[0]) if rows else None

    def page(self, after: str | None, limit: int, order: Literal["asc", "desc"]) -> tuple[list[VideoRecord], bool]:
        """Up to `limit` videos in submission order (`asc`) or newest first, after the video
        `after` (None: from the start); and whether more follow. KeyError if `after` is unknown."""
        compare, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "deleted = 0", ()
        if after is not None:
            found = self._read("SELECT seq FROM videos WHERE id = ? AND deleted = 0", (after,))
            if not found:
                raise KeyError(after)
            where, args = f"deleted = 0 AND seq {compare} ?", (found[0][0],)
        query = f"SELECT {_COLUMNS} FROM videos WHERE {where} ORDER BY seq {direction} LIMIT ?"
        rows = self._read(query, (*args, limit + 1))
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, video_id: str) -> VideoRecord | None:
        """Remove a job (a queued one never runs); one in progress is marked, and its runner
        drops what it makes. Returns the job as it was, None if there is none."""
        with self._transaction() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM videos WHERE id = ? AND deleted = 0", (video_id,)).fetchall()
            if not rows:
                return None
            record = _record(rows[0])
            if record.status == "in_progress":
                db.execute("UPDATE videos SET deleted = 1 WHERE id = ?", (video_id,))
            else:
                db.execute("DELETE FROM videos WHERE id = ?", (video_id,))
        return record

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT status, COUNT(*) FROM videos WHERE deleted = 0 GROUP BY status")
        return {status: 0 for status in ("queued", "in_progress", "completed", "failed")} | dict(rows)

    # -- running ------------------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> VideoRecord | None:
        """The oldest queued job, leased to `worker`; first, jobs whose runner's lease ran out
        (it died) are queued again, or failed if they have had all their attempts."""
        now = time.time()
        with self._transaction() as db:
            # deleted while running, and its runner died: nothing is left to finish
            db.execute("DELETE FROM videos WHERE status = 'in_progress' AND deleted = 1 AND lease_until < ?", (now,))
            expired = db.execute(
                "SELECT id, attempts FROM videos WHERE status = 'in_progress' AND lease_until < ?", (now,)
            ).fetchall()
            for video_id, attempts in expired:
                self._release(db, video_id, attempts, "its runner made no progress before its lease expired")
            row = db.execute(
                "SELECT id FROM videos WHERE status = 'queued' AND deleted = 0 ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE videos SET status = 'in_progress', attempts = attempts + 1, worker = ?, lease_until = ?, "
                "started_at = ?, progress = 0 WHERE id = ?",
                (worker, now + lease_s, now, row[0]),
            )
            return _record(db.execute(f"SELECT {_COLUMNS} FROM videos WHERE id = ?", (row[0],)).fetchone())

    def _release(self, db: sqlite3.Connection, video_id: str, attempts: int, why: str) -> None:
        if attempts >= self.max_attempts:
            db.execute(
                "UPDATE videos SET status = 'failed', completed_at = ?, error_code = 'retries_exhausted', "
                "error_message = ?, worker = NULL, lease_until = NULL WHERE id = ?",
                (time.time(), f"tried {attempts} times; the last try ended because {why}", video_id),
            )
        else:
            db.execute(
                "UPDATE videos SET status = 'queued', progress = 0, worker = NULL, lease_until = NULL WHERE id = ?",
                (video_id,),
            )

    def renew(self, video_id: str, worker: str, lease_s: float, progress: int | None = None) -> bool:
        """Extend `worker`'s lease (and set the progress); False if the job is no longer its own.
        A job deleted while `worker` ran it goes now (the worker stops, and removes its files)."""
        sets, args = "lease_until = ?", [time.time() + lease_s]
        if progress is not None:
            sets, args = sets + ", progress = ?", [*args, progress]
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE videos SET {sets} WHERE id = ? AND worker = ? AND status = 'in_progress' AND deleted = 0",
                (*args, video_id, worker),
            )
            if cursor.rowcount == 0:
                _drop_if_deleted(db, video_id)
        return cursor.rowcount == 1

    def finish(self, video_id: str, worker: str, result: dict[str, Any]) -> bool:
        """Mark `worker`'s job completed with its result; False if it was deleted or taken away
        meanwhile (the caller removes what it made)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE videos SET status = 'completed', progress = 100, completed_at = ?, result = ?, "
                "worker = NULL, lease_until = NULL WHERE id = ? AND worker = ? AND status = 'in_progress' "
                "AND deleted = 0",
                (time.time(), json.dumps(result), video_id, worker),
            )
            _drop_if_deleted(db, video_id)
        return cursor.rowcount == 1

    def fail(self, video_id: str, worker: str, code: str, message: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE videos SET status = 'failed', completed_at = ?, error_code = ?, error_message = ?, "
                "worker = NULL, lease_until = NULL WHERE id = ? AND worker = ? AND status = 'in_progress'",
                (time.time(), code, message, video_id, worker),
            )
            _drop_if_deleted(db, video_id)

    def running(self) -> list[tuple[str, str]]:
        """(video id, worker) of every job in progress."""
        return self._read("SELECT id, worker FROM videos WHERE status = 'in_progress'")

    def requeue(self, video_id: str, worker: str) -> bool:
        """Give `worker`'s job back to the queue as if it had not been tried (the server stops
        cleanly); False if it was no longer its own."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE videos SET status = 'queued', progress = 0, attempts = MAX(attempts - 1, 0), worker = NULL, "
                "lease_until = NULL WHERE id = ? AND worker = ? AND status = 'in_progress' AND deleted = 0",
                (video_id, worker),
            )
            _drop_if_deleted(db, video_id)
        return cursor.rowcount == 1

    def retry(self, video_id: str, worker: str, why: str) -> None:
        """Give the job back to the queue (a stage's process died under it), or fail it if it
        has had all its attempts."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT attempts FROM videos WHERE id = ? AND worker = ? AND status = 'in_progress'",
                (video_id, worker),
            ).fetchone()
            if row is not None:
                self._release(db, video_id, row[0], why)
            _drop_if_deleted(db, video_id)


def _drop_if_deleted(db: sqlite3.Connection, video_id: str) -> None:
    """A job deleted while it ran goes once its runner has finished with it, or given it up."""
    db.execute("DELETE FROM videos WHERE id = ? AND deleted = 1", (video_id,))


def _record(row: tuple) -> VideoRecord:
    (video_id, model, status, progress, created, request, attempts, started, completed, code, message, result,
     worker) = row  # fmt: skip
    return VideoRecord(
        video_id, model, status, progress, created, json.loads(request), attempts, started, completed, code, message,
        json.loads(result) if result else None, worker,
    )  # fmt: skip
