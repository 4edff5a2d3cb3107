"""Batches: a file of requests (JSON Lines) -> one video per request, a manifest, an MLflow parent run.

    REQUESTS.jsonl -> checked, every line, before any work -> the jobs the manifest lacks
        -> pipeline replicas (cluster.replicas) -> each job: its video, a manifest line, a child run

A line is one request: `prompt`, and optionally `id` and any setting by its name
(stages.settings: steps, guidance, frames, fps, ..., seed, image, negative_prompt). Without an id,
a request's id is the digest of its content, so the same request keeps its id when lines move.

The manifest (`<dir>/manifest.jsonl`) is the batch's record and what makes it resumable: one line
appended per finished job (written in one call, and flushed to disk), its id, request, video,
digests, run id and clarity summary, or its error. Running the batch again skips every job whose
last line names a video that is still there with its digest, and runs the rest. A line cut short
by a kill is ignored: its job runs again.

The jobs run over pipeline replicas, each taking the next job when it has room; a job whose
actor died goes to another replica, up to `max_attempts` tries (`cluster.replicas`). Every video
is written by this process (the frames come back to it), into one directory: the manifest, the
videos and the MLflow runs are in one place however many nodes made them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import InvalidRequest
from stages.settings import BY_NAME, SETTINGS

MANIFEST = "manifest.jsonl"
ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_ID = 100


@dataclass(frozen=True)
class BatchRequest:
    """One line of a requests file: where it was, its id, its prompt and its settings by name."""

    line: int
    id: str
    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, **self.settings}


def read_requests(path: Path) -> list[BatchRequest]:
    """Every request of a JSON Lines file (blank lines skipped); InvalidRequest naming the line of
    the first that is not a JSON object, lacks a prompt, has a key that is not a setting, a value
    of the wrong type, or an id already taken."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InvalidRequest(f"cannot read {path}: {e.strerror}") from None
    requests: list[BatchRequest] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        request = _parse_line(text, number)
        if request.id in seen:
            raise InvalidRequest(f"line {number}: id {request.id!r} is also line {seen[request.id]}'s; ids are unique")
        seen[request.id] = number
        requests.append(request)
    if not requests:
        raise InvalidRequest(f'{path} has no requests: one JSON object per line, e.g. {{"prompt": "a red fox"}}')
    return requests


def _parse_line(text: str, number: int) -> BatchRequest:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        reason = getattr(e, "msg", "nested too deep")
        raise InvalidRequest(f"line {number}: not JSON ({reason})") from None
    if not isinstance(raw, dict):
        raise InvalidRequest(f'line {number}: a request is a JSON object, e.g. {{"prompt": "a red fox"}}')
    prompt = raw.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest(f"line {number}: prompt is required: the text to make a video of")
    given_id = raw.pop("id", None)
    settings = {}
    for key, value in raw.items():
        setting = BY_NAME.get(key)
        if setting is None:
            known = ", ".join(s.name for s in SETTINGS)
            raise InvalidRequest(f"line {number}: unknown key {key!r}; a request has id, prompt and settings: {known}")
        settings[key] = _typed(value, setting.kind, key, number)
    content = json.dumps({"prompt": prompt, **settings}, sort_keys=True)
    request_id = (
        _check_id(given_id, number) if given_id is not None else hashlib.sha256(content.encode()).hexdigest()[:16]
    )
    return BatchRequest(number, request_id, prompt, settings)


def _typed(value: Any, kind: type, key: str, number: int) -> Any:
    if value is None:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise InvalidRequest(f"line {number}: {key} must be {names[kind]} (got {json.dumps(value)})")


def _check_id(value: Any, number: int) -> str:
    """An id names files: letters, digits, '-', '_' and '.', not starting with '.'."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID or value[0] == "." or set(value) - ID_CHARS:
        raise InvalidRequest(
            f"line {number}: id must be 1 to {MAX_ID} letters, digits, '-', '_' or '.', not starting with '.' "
            f"(got {json.dumps(value)})"
        )
    return value


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Manifest:
    """`<dir>/manifest.jsonl`: one line per finished job, the last line of an id winning."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / MANIFEST
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for text in self.path.read_text().splitlines():
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError:  # a line cut short by a kill: its job runs again
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    self.entries[entry["id"]] = entry

    def pending(self, requests: list[BatchRequest]) -> list[int]:
        """The indices of the requests whose jobs are not done (each video's digest read once)."""
        return [i for i, r in enumerate(requests) if not self.done(r.id)]

    def done(self, request_id: str) -> bool:
        """Whether the job is done: its last line has no error, its video was measured and its
        interpolated copy (if asked for) made (as with a sweep's cells, a job that lacks either is
        made again), and it names a video still there with the digest it was written with."""
        entry = self.entries.get(request_id)
        if entry is None or entry.get("error") or entry.get("clarity_error") or not entry.get("video"):
            return False
        video = Path(entry["video"])
        return video.is_file() and file_digest(video) == entry.get("video_sha256")

    def append(self, entry: dict[str, Any]) -> None:
        """One line, written in one call and flushed to disk before the next job is recorded."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, allow_nan=False) + "\n"
        with open(self.path, "a") as f:
            if f.tell() and not self._ends_with_newline():
                f.write("\n")  # after a line cut short by a kill
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.entries[entry["id"]] = entry

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def prepare_batch(model: str, requests: list[BatchRequest], base: Path, **placement: Any) -> list:
    """A validated job per request (`cluster.driver.prepare_variants`: errors name the line). An
    image path is taken relative to `base`, the requests file's directory."""
    from cluster.driver import prepare_variants

    variants = []
    for r in requests:
        kwargs = {BY_NAME[k].field: v for k, v in r.settings.items() if v is not None}
        if "image" in kwargs:
            kwargs["image"] = str(base / kwargs["image"])
        variants.append((r.prompt, kwargs))
    return prepare_variants(model, variants, [f"line {r.line}" for r in requests], **placement)


def batch_id(model: str, directory: Path) -> str:
    """A batch is its model and its output directory: the same command again is the same batch."""
    return hashlib.sha256(f"{model}\n{Path(directory).resolve()}".encode()).hexdigest()[:12]


@dataclass
class BatchCounts:
    ran: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)  # the ids of the jobs that failed

    def as_json(self) -> dict[str, Any]:
        return {"ran": self.ran, "reused": self.reused, "failed": len(self.failed), "failed_ids": self.failed}


def run_batch(
    requests: list[BatchRequest],
    jobs: list,
    todo: list[int],
    replicas: Any,
    directory: Path,
    manifest: Manifest,
    *,
    model: str,
    experiment: str,
    tracking_uri: str | None,
    on_entry: Any = None,
) -> tuple[BatchCounts, str]:
    """Run the jobs `todo` (indices: those the manifest lacks, `Manifest.pending`) over
    `replicas` (a `cluster.replicas.ReplicaPool`), appending each one's manifest line and child
    run as it finishes (`on_entry(entry)` hears of each); the counts and the parent run's id."""
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    from cluster.driver import JobFailed
    from cluster.replicas import Work
    from cluster.tracking import log_generation, open_parent_run

    counts = BatchCounts(reused=len(requests) - len(todo))
    client = MlflowClient(tracking_uri=tracking_uri)
    ident = batch_id(model, directory)
    tags = {"framecast.kind": "batch", "framecast.batch": ident}
    params = {"model": model, "output_dir": str(Path(directory).resolve()), "jobs": str(len(requests))}
    parent, _ = open_parent_run(client, experiment, tags, params, f"batch-{model}-{ident}")
    work = [Work(i, jobs[i], Path(directory).resolve() / f"{requests[i].id}{jobs[i].suffix}") for i in todo]
    finished = False
    try:
        for done in replicas.run(work) if todo else ():
            request, result = requests[done.index], done.result
            entry: dict[str, Any] = {"id": request.id, "line": request.line, "request": request.as_dict(),
                                     "replica": done.replica, "attempts": done.attempts}  # fmt: skip
            if isinstance(result, JobFailed):
                counts.failed.append(request.id)
                entry |= {"error": str(result.error), "stage": result.error.stage}
            else:
                counts.ran += 1
                entry |= _finished_entry(result)
                try:
                    entry["run_id"] = log_generation(
                        result, jobs[done.index], run_name=request.id, experiment=experiment,
                        tracking_uri=tracking_uri, params={"batch_id": request.id}, parent_run_id=parent,
                        tags={"framecast.batch": ident},
                    )  # fmt: skip
                except Exception as e:  # the video stands; its line says why it has no run
                    entry["tracking_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            manifest.append(entry)
            if on_entry is not None:
                on_entry(entry)
        finished = True
    finally:
        status = RunStatus.FINISHED if finished and not counts.failed else RunStatus.FAILED
        client.log_batch(parent, metrics=_count_metrics(counts))
        client.set_terminated(parent, RunStatus.to_string(status))
    return counts, parent


def _finished_entry(result: Any) -> dict[str, Any]:
    from stages.clarity import json_figure

    clarity = {
        k.removeprefix("clarity/"): json_figure(v) for k, v in result.metrics.items() if k.startswith("clarity/")
    }
    return {
        "video": str(result.video),
        "video_sha256": file_digest(result.video),
        "frames_sha256": result.frames_sha256,
        "interpolated": str(result.interpolated) if result.interpolated else None,
        "contact_sheet": str(result.contact_sheet),
        "clarity": clarity or None,
        "clarity_error": result.clarity_error,
        "interpolation_error": result.interpolation_error,
        "placement": result.placement,  # stage -> each actor's host, Ray node and device
        "error": None,
    }


def _count_metrics(counts: BatchCounts) -> list:
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    figures = {"jobs_ran": counts.ran, "jobs_reused": counts.reused, "jobs_failed": len(counts.failed)}
    return [Metric(name, float(n), now, 0) for name, n in figures.items()]
