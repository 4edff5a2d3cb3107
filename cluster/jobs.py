"""The durable queue of the Videos API: every accepted video job, in SQLite or PostgreSQL.

    submit (queued) -> claim (in_progress, leased to a runner) -> finish (completed) | fail (failed)

A runner holds a job under a lease that each step of progress renews (cluster.videos). If its
process dies (an ingress replica restarted) or it stops making progress, the lease runs out and
the next claim takes the job again: nothing accepted is lost, and a job is tried at most
`max_attempts` times. A clean stop gives its jobs back at once, their attempt not counted. The
queue is bounded: `submit` refuses beyond `max_active` queued or running jobs (the API answers 429).

A database rather than a queue service: it survives restarts and is what MLflow's tracking
store already uses. The store goes through SQLAlchemy, as MLflow's does, so that one dependency
and one kind of URL serve both. SQLite (a file path: the embedded default) lets the ingress
replicas of one node share the file (WAL mode lets readers and one writer work at once);
PostgreSQL (`postgresql://...`) lets ingress replicas on several nodes share one queue.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

Status = Literal["queued", "in_progress", "completed", "failed"]
ID_PREFIX = "video_"
ID_HEX_CHARS = 32  # 128 random bits: unguessable
# Every store operation has a deadline: a thread waits this long for a connection of the pool,
# and the database as long for another process's write lock (then raises).
STORE_TIMEOUT_S = 30.0
# The key of the PostgreSQL advisory lock that write transactions take (see `_transaction`).
WRITE_LOCK_KEY = 0x6672616D65  # "frame"


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


METADATA = sa.MetaData()
VIDEOS = sa.Table(
    "videos",
    METADATA,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # submission order (ids are random)
    sa.Column("id", sa.Text, nullable=False, unique=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("progress", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("worker", sa.Text),
    sa.Column("lease_until", sa.Double),
    sa.Column("started_at", sa.Double),
    sa.Column("completed_at", sa.Double),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    sa.Column("result", sa.Text),
    sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),  # deleted while in progress
    sa.Index("videos_status", "status", "seq"),
    sqlite_autoincrement=True,  # a deleted last job's seq is never handed out again
)
_COLUMNS = (
    "id, model, status, progress, created_at, request, attempts, started_at, completed_at, "
    "error_code, error_message, result, worker"
)
RECENT_JOBS = 20  # finished jobs whose durations estimate Retry-After


class JobStore:
    """The jobs of one database: an SQLite file (a path) or a database URL (postgresql://...).
    Thread-safe; several processes (and, with PostgreSQL, several nodes) may share it."""

    def __init__(self, database: str | Path, max_attempts: int = 3):
        self.url = database_url(database)
        self.max_attempts = max_attempts
        self._sqlite = self.url.get_backend_name() == "sqlite"
        if self._sqlite:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            # The driver's own transactions off: `_transaction` says BEGIN IMMEDIATE itself.
            connect_args = {"timeout": STORE_TIMEOUT_S, "isolation_level": None, "check_same_thread": False}
            options = {}
        else:
            connect_args = {"connect_timeout": int(STORE_TIMEOUT_S)}
            # Each statement sees what the writer before it committed: a claim that waited for the
            # advisory lock then reads the queue as that writer left it (a snapshot taken before
            # the wait, as REPEATABLE READ would, would fail the claim).
            options = {"isolation_level": "READ COMMITTED"}
        self._engine = sa.create_engine(self.url, connect_args=connect_args, pool_timeout=STORE_TIMEOUT_S,
                                        pool_pre_ping=True, **options)  # fmt: skip
        if self._sqlite:
            sa.event.listen(self._engine, "connect", _sqlite_wal)
            sa.event.listen(self._engine, "begin", _sqlite_begin)
        self.where = shown(self.url)
        with self._transaction() as db:
            METADATA.create_all(db)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One writer at a time across threads and processes: SQLite's BEGIN IMMEDIATE, or in
        PostgreSQL a transaction-wide advisory lock. (A queue this small gains nothing from
        finer locks, and a claim then reads and updates its job with no other writer between.)"""
        try:
            with self._engine.connect().execution_options(framecast_write=True) as db, db.begin():
                if not self._sqlite:
                    db.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(STORE_TIMEOUT_S * 1000)}ms'")
                    db.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
                yield db
        except sa.exc.TimeoutError:
            raise TimeoutError(f"the job database {self.where} was busy for {STORE_TIMEOUT_S:g} s") from None

    def _read(self, sql: str, args: dict | None = None) -> list[tuple]:
        try:
            with self._engine.connect() as db:
                return [tuple(row) for row in db.execute(sa.text(sql), args or {})]
        except sa.exc.TimeoutError:
            raise TimeoutError(f"the job database {self.where} was busy for {STORE_TIMEOUT_S:g} s") from None

    def close(self) -> None:
        self._engine.dispose()

    def ping(self) -> None:
        """Raises if the database cannot be read (for health checks)."""
        self._read("SELECT 1 FROM videos LIMIT 1")

    # -- submitting and reading ---------------------------------------------------------------

    def submit(self, model: str, request: dict[str, Any], max_active: int, video_id: str | None = None) -> VideoRecord:
        """Queue a new job (under `video_id`, made here if not given: a caller that stores files
        for the job first names it), or raise QueueFull when `max_active` jobs are queued or in progress."""
        video_id, now = video_id or new_video_id(), time.time()
        with self._transaction() as db:
            active = _one(db, "SELECT COUNT(*) FROM videos WHERE status IN ('queued', 'in_progress')")[0]
            if active >= max_active:
                raise QueueFull(active, self._retry_after(db))
            _run(db, "INSERT INTO videos (id, model, status, created_at, request) VALUES (:id, :model, 'queued', :now, "
                     ":request)", id=video_id, model=model, now=now, request=json.dumps(request))  # fmt: skip
            # read in the same transaction: the job as queued, even if a runner claims it at once
            row = _one(db, f"SELECT {_COLUMNS} FROM videos WHERE id = :id", id=video_id)
        return _record(row)

    def _retry_after(self, db: Connection) -> int:
        """Seconds until a place is likely to free up: a running job ends within one job's
        time, estimated from the recent jobs' durations (10 s before any has finished)."""
        rows = _all(db, "SELECT completed_at - started_at FROM videos WHERE status = 'completed' ORDER BY seq DESC "
                        "LIMIT :n", n=RECENT_JOBS)  # fmt: skip
        typical = sum(r[0] for r in rows) / len(rows) if rows else 10.0
        return max(1, math.ceil(typical))

    def get(self, video_id: str) -> VideoRecord | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM videos WHERE id = :id AND deleted = 0", {"id": video_id})
        return _record(rows[0]) if rows else None

    def page(self, after: str | None, limit: int, order: Literal["asc", "desc"]) -> tuple[list[VideoRecord], bool]:
        """Up to `limit` videos in submission order (`asc`) or newest first, after the video
        `after` (None: from the start); and whether more follow. KeyError if `after` is unknown."""
        compare, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "deleted = 0", {}
        if after is not None:
            found = self._read("SELECT seq FROM videos WHERE id = :id AND deleted = 0", {"id": after})
            if not found:
                raise KeyError(after)
            where, args = f"deleted = 0 AND seq {compare} :seq", {"seq": found[0][0]}
        query = f"SELECT {_COLUMNS} FROM videos WHERE {where} ORDER BY seq {direction} LIMIT :n"
        rows = self._read(query, {**args, "n": limit + 1})
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, video_id: str) -> VideoRecord | None:
        """Remove a job (a queued one never runs); one in progress is marked, and its runner
        drops what it makes. Returns the job as it was, None if there is none."""
        with self._transaction() as db:
            rows = _all(db, f"SELECT {_COLUMNS} FROM videos WHERE id = :id AND deleted = 0", id=video_id)
            if not rows:
                return None
            record = _record(rows[0])
            if record.status == "in_progress":
                _run(db, "UPDATE videos SET deleted = 1 WHERE id = :id", id=video_id)
            else:
                _run(db, "DELETE FROM videos WHERE id = :id", id=video_id)
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
            _run(db, "DELETE FROM videos WHERE status = 'in_progress' AND deleted = 1 AND lease_until < :now", now=now)
            expired = _all(db, "SELECT id, attempts FROM videos WHERE status = 'in_progress' AND lease_until < :now",
                           now=now)  # fmt: skip
            for video_id, attempts in expired:
                self._release(db, video_id, attempts, "its runner made no progress before its lease expired")
            row = _first(db, "SELECT id FROM videos WHERE status = 'queued' AND deleted = 0 ORDER BY seq LIMIT 1")
            if row is None:
                return None
            _run(db, "UPDATE videos SET status = 'in_progress', attempts = attempts + 1, worker = :worker, "
                     "lease_until = :until, started_at = :now, progress = 0 WHERE id = :id",
                 worker=worker, until=now + lease_s, now=now, id=row[0])  # fmt: skip
            return _record(_one(db, f"SELECT {_COLUMNS} FROM videos WHERE id = :id", id=row[0]))

    def _release(self, db: Connection, video_id: str, attempts: int, why: str) -> None:
        if attempts >= self.max_attempts:
            message = f"tried {attempts} times; the last try ended because {why}"
            _run(db, "UPDATE videos SET status = 'failed', completed_at = :now, error_code = 'retries_exhausted', "
                     "error_message = :why, worker = NULL, lease_until = NULL WHERE id = :id",
                 now=time.time(), why=message, id=video_id)  # fmt: skip
        else:
            _run(db, "UPDATE videos SET status = 'queued', progress = 0, worker = NULL, lease_until = NULL "
                     "WHERE id = :id", id=video_id)  # fmt: skip

    def renew(self, video_id: str, worker: str, lease_s: float, progress: int | None = None) -> bool:
        """Extend `worker`'s lease (and set the progress); False if the job is no longer its own.
        A job deleted while `worker` ran it goes now (the worker stops, and removes its files)."""
        sets, args = "lease_until = :until", {"until": time.time() + lease_s}
        if progress is not None:
            sets, args = sets + ", progress = :progress", {**args, "progress": progress}
        with self._transaction() as db:
            changed = _run(db, f"UPDATE videos SET {sets} WHERE id = :id AND worker = :worker AND "
                               "status = 'in_progress' AND deleted = 0",
                           id=video_id, worker=worker, **args)  # fmt: skip
            if changed == 0:
                _drop_if_deleted(db, video_id)
        return changed == 1

    def finish(self, video_id: str, worker: str, result: dict[str, Any]) -> bool:
        """Mark `worker`'s job completed with its result; False if it was deleted or taken away
        meanwhile (the caller removes what it made)."""
        with self._transaction() as db:
            changed = _run(db, "UPDATE videos SET status = 'completed', progress = 100, completed_at = :now, "
                               "result = :result, worker = NULL, lease_until = NULL WHERE id = :id AND "
                               "worker = :worker AND status = 'in_progress' AND deleted = 0",
                           now=time.time(), result=json.dumps(result), id=video_id, worker=worker)  # fmt: skip
            _drop_if_deleted(db, video_id)
        return changed == 1

    def fail(self, video_id: str, worker: str, code: str, message: str) -> None:
        with self._transaction() as db:
            _run(db, "UPDATE videos SET status = 'failed', completed_at = :now, error_code = :code, "
                     "error_message = :message, worker = NULL, lease_until = NULL WHERE id = :id AND "
                     "worker = :worker AND status = 'in_progress'",
                 now=time.time(), code=code, message=message, id=video_id, worker=worker)  # fmt: skip
            _drop_if_deleted(db, video_id)

    def running(self) -> list[tuple[str, str]]:
        """(video id, worker) of every job in progress."""
        return self._read("SELECT id, worker FROM videos WHERE status = 'in_progress'")

    def requeue(self, video_id: str, worker: str) -> bool:
        """Give `worker`'s job back to the queue as if it had not been tried (the server stops
        cleanly); False if it was no longer its own."""
        with self._transaction() as db:
            changed = _run(db, "UPDATE videos SET status = 'queued', progress = 0, attempts = CASE WHEN attempts > 0 "
                               "THEN attempts - 1 ELSE 0 END, worker = NULL, lease_until = NULL WHERE id = :id AND "
                               "worker = :worker AND status = 'in_progress' AND deleted = 0",
                           id=video_id, worker=worker)  # fmt: skip
            _drop_if_deleted(db, video_id)
        return changed == 1

    def retry(self, video_id: str, worker: str, why: str) -> None:
        """Give the job back to the queue (a stage's process died under it), or fail it if it
        has had all its attempts."""
        with self._transaction() as db:
            row = _first(db, "SELECT attempts FROM videos WHERE id = :id AND worker = :worker AND "
                             "status = 'in_progress'", id=video_id, worker=worker)  # fmt: skip
            if row is not None:
                self._release(db, video_id, row[0], why)
            _drop_if_deleted(db, video_id)


def database_url(database: str | Path) -> sa.URL:
    """A database URL as given (postgresql://user@host/db, sqlite:///path), or an SQLite file's path."""
    text = str(database)
    url = sa.make_url(text) if "://" in text else sa.URL.create("sqlite", database=text)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        # absolute: Serve's replicas run in Ray workers whose working directories differ
        url = url.set(database=str(Path(url.database).expanduser().resolve()))
    return url


def shown(database: str | Path | sa.URL) -> str:
    """A job database as said to people: an SQLite file's path, or a URL without its password."""
    url = database if isinstance(database, sa.URL) else database_url(database)
    return url.database if url.get_backend_name() == "sqlite" else url.render_as_string(hide_password=True)


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA journal_mode=WAL")


def _sqlite_begin(db: Connection) -> None:
    """SQLite: a write transaction takes the write lock at once (no other writer between its
    reads and its writes); a read needs no transaction in WAL mode."""
    if db.get_execution_options().get("framecast_write"):
        db.exec_driver_sql("BEGIN IMMEDIATE")


def _run(db: Connection, sql: str, **args: Any) -> int:
    """Execute; the rows it changed."""
    return db.execute(sa.text(sql), args).rowcount


def _all(db: Connection, sql: str, **args: Any) -> list[tuple]:
    return [tuple(row) for row in db.execute(sa.text(sql), args)]


def _first(db: Connection, sql: str, **args: Any) -> tuple | None:
    row = db.execute(sa.text(sql), args).first()
    return None if row is None else tuple(row)


def _one(db: Connection, sql: str, **args: Any) -> tuple:
    return tuple(db.execute(sa.text(sql), args).one())


def _drop_if_deleted(db: Connection, video_id: str) -> None:
    """A job deleted while it ran goes once its runner has finished with it, or given it up."""
    _run(db, "DELETE FROM videos WHERE id = :id AND deleted = 1", id=video_id)


def _record(row: tuple) -> VideoRecord:
    (video_id, model, status, progress, created, request, attempts, started, completed, code, message, result,
     worker) = row  # fmt: skip
    return VideoRecord(
        video_id, model, status, progress, created, json.loads(request), attempts, started, completed, code, message,
        json.loads(result) if result else None, worker,
    )  # fmt: skip
