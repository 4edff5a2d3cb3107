"""The Videos API's work, apart from HTTP: what a create request may say (checked with the same
rules and messages as `framecast generate`), the video object clients read, and the runners that
take jobs from the durable queue through the pipeline.

    create:  fields -> settings (preset, seconds -> frames) -> validated job -> JobStore (queued)
    runner:  claim -> validate again -> run_stream (encode, denoise, decode, write, measure)
             -> thumbnail -> MLflow run -> completed (or retried, or failed)

The video is written before anything that may fail after it (measuring, tracking): a job whose
tracking fails is completed all the same, and says why.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Literal

from PIL import Image

from cluster.driver import Job, JobFailed, prepare_variants, run_stream
from cluster.jobs import JobStore, VideoRecord, is_video_id, new_video_id
from cluster.serving import Served
from cluster.settings import resolve_settings
from cluster.tracking import log_generation
from stages.errors import InvalidRequest
from stages.models import ModelSpec, load_spec
from stages.request import frames_nearest
from stages.settings import SETTINGS
from stages.video_io import read_frame

log = logging.getLogger("framecast.serve")

# What POST /v1/videos may carry besides input_reference: OpenAI's fields, then each setting the
# API offers (stages.settings, by its `api` name), then a preset.
API_SETTINGS = {s.api: s for s in SETTINGS if s.api}
CREATE_FIELDS: dict[str, type] = {
    "prompt": str,
    "model": str,
    "seconds": float,
    "size": str,
    **{field: setting.kind for field, setting in API_SETTINGS.items()},
    "preset": str,
}
# variant -> (file suffix after <id>.a<attempt>., media type)
VARIANTS = {"video": ("mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
            "spritesheet": ("sheet.png", "image/png")}  # fmt: skip
DENOISING_SHARE = 95  # progress while denoising runs 0..95; writing and measuring the rest
CLAIM_POLL_S = 0.2  # how often an idle runner looks for a queued job
MAX_NUMBER = 1e6  # no setting is near this; beyond it a number is a mistake (or an overflow)


class NotFound(Exception):
    """No such video (args[0]: the id asked for)."""


class NotReady(Exception):
    """The video has no content yet: it is not completed."""


def read_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The create request's fields, typed (a multipart form gives strings; JSON gives types)."""
    unknown = sorted(set(raw) - set(CREATE_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(CREATE_FIELDS)}")
    fields = {name: _typed(name, value, CREATE_FIELDS[name]) for name, value in raw.items() if value is not None}
    if not isinstance(fields.get("prompt"), str) or not fields["prompt"].strip():
        raise InvalidRequest("prompt is required: the text to make a video of")
    return fields


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"{name} must be a number (got {value!r})")
    if kind is int:
        text = str(value).strip()
        if isinstance(value, float) or not re.fullmatch(r"-?[0-9]{1,12}", text):
            raise InvalidRequest(f"{name} must be an integer of at most 12 digits (got {value!r})")
        return int(text)
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be a number (got {value!r})") from None
    if not math.isfinite(number) or abs(number) > MAX_NUMBER:
        raise InvalidRequest(f"{name} must be a finite number below {MAX_NUMBER:g} (got {value!r})")
    return number


def parse_size(text: str) -> tuple[int, int]:
    """'96x64' (OpenAI's WIDTHxHEIGHT) -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(re.fullmatch(r"[0-9]{1,5}", p) for p in parts):
        raise InvalidRequest(f"size must be WIDTHxHEIGHT in pixels, e.g. 720x480 (got {text!r})")
    return int(parts[0]), int(parts[1])


def prepare_video(
    served: Served, spec: ModelSpec, fields: dict[str, Any], image: str | None = None
) -> tuple[Job, list[str], dict[str, str]]:
    """The validated job for a create request's fields (and its stored `input_reference` image),
    the notes on how its settings were reached, and the params that record them: `framecast
    generate`'s rules and messages."""
    if fields.get("model", served.model) != served.model:
        raise InvalidRequest(f"model {fields['model']!r} is not served here; this server serves {served.model}")
    if "seconds" in fields and "num_frames" in fields:
        raise InvalidRequest("give seconds or num_frames, not both")
    width, height = parse_size(fields["size"]) if "size" in fields else (None, None)
    explicit = {s.name: fields.get(field) for field, s in API_SETTINGS.items() if s.axis}
    explicit |= {"height": height, "width": width}  # OpenAI's `size`
    settings = resolve_settings(spec, explicit, fields.get("preset"))
    notes = []
    if "seconds" in fields:  # at the fps the settings arrived at; the frames count as given
        fps = settings.values.get("fps") or spec.defaults.fps
        explicit["frames"], note = frames_nearest(spec, fields["seconds"], fps)
        settings = resolve_settings(spec, explicit, fields.get("preset"))
        notes.append(note)
    settings.require_single()
    request = {s.field: fields.get(field) for field, s in API_SETTINGS.items() if not s.axis}
    request["seed"] = request["seed"] or 0
    if image is not None:  # the upload, by the field's name: the request records no server path
        request["image"] = "input_reference"
    layout = served.layout
    (job,) = prepare_variants(
        served.model, [(settings.prompt(fields["prompt"]), {**request, **settings.request_kwargs()})], [None],
        weights=served.weights, workers=layout.world_size, ulysses=layout.ulysses, ring=layout.ring,
        decoders=served.decoders, image_files={"input_reference": image} if image is not None else None,
    )  # fmt: skip
    job.warnings = {**settings.warnings, **job.warnings}
    recorded = settings.recorded_params()
    if "seconds" in fields:
        recorded["seconds"] = f"{fields['seconds']:g}"
    return job, settings.notes + notes, recorded


def video_object(record: VideoRecord) -> dict[str, Any]:
    """The OpenAI video object, with framecast's own fields after OpenAI's."""
    r, result = record.request["settings"], record.result or {}
    failed = record.status == "failed"
    return {
        "id": record.id,
        "object": "video",
        "model": record.model,
        "status": record.status,
        "progress": record.progress,
        "created_at": int(record.created_at),
        "completed_at": int(record.completed_at) if record.completed_at else None,
        "expires_at": None,  # kept until deleted
        "error": {"code": record.error_code, "message": record.error_message} if failed else None,
        "prompt": record.request["fields"]["prompt"],
        "seconds": f"{r['num_frames'] / r['fps']:g}",
        "size": f"{r['width']}x{r['height']}",
        "remixed_from_video_id": None,
        "settings": r,  # the request as filled in: steps, guidance_scale, num_frames, fps, seed, ...
        "notes": record.request["notes"],
        "warnings": record.request["warnings"],
        "attempts": record.attempts,
        "mlflow_run_id": result.get("run_id"),
        "frames_sha256": result.get("frames_sha256"),  # of the frames as written: equal frames, equal digest
        "timings": result.get("metrics"),
        "clarity": result.get("clarity"),
        "adherence": result.get("adherence"),  # prompt adherence, for models with a detector; else null
        "clarity_error": result.get("clarity_error"),
        "tracking_error": result.get("tracking_error"),
    }


class VideoService:
    """The API's jobs: accepted into the store, run by `runners` threads through `executor`."""

    def __init__(self, served: Served, executor: Any, store: JobStore | None = None):
        self.served = served
        self.spec = load_spec(served.model)
        self.store = store or JobStore(served.database, served.max_attempts)
        self.videos = Path(served.data_dir) / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self.executor = executor
        self.started_at = int(time.time())
        self._stop = threading.Event()
        self._runners: list[threading.Thread] = []

    # -- the API --------------------------------------------------------------------------------

    def create(self, raw: dict[str, Any], image: bytes | None = None) -> dict[str, Any]:
        """Validate and queue (InvalidRequest, or QueueFull beyond the bound)."""
        fields = read_fields(raw)
        if image is not None and not self.spec.takes_image:
            raise InvalidRequest(
                f"{self.served.model} makes video from text; input_reference needs an image-to-video model"
            )
        if image is None and self.spec.takes_image:
            raise InvalidRequest(f"{self.served.model} is image-to-video: send the first frame as input_reference")
        video_id = new_video_id()
        # The image is kept under the video's id (runners read it, a retry too; delete removes it)
        # and checked by the same code as `framecast generate --image`.
        stored = None if image is None else self.videos / f"{video_id}.input"
        try:
            if stored is not None:
                stored.write_bytes(image)
            job, notes, _ = prepare_video(self.served, self.spec, fields, str(stored) if stored else None)
            request = {
                "fields": fields,
                "image": stored.name if stored else None,
                "settings": job.request.as_dict(),
                "notes": notes,
                "warnings": job.warnings,
            }
            return video_object(self.store.submit(self.served.model, request, self.served.max_queue, video_id))
        except BaseException:
            if stored is not None:
                stored.unlink(missing_ok=True)
            raise

    def retrieve(self, video_id: str) -> dict[str, Any]:
        return video_object(self._record(video_id))

    def page(self, after: str | None, limit: int, order: Literal["asc", "desc"]) -> dict[str, Any]:
        if after is not None and not is_video_id(after):
            raise InvalidRequest(f"after must be a video id (got {after!r})")
        try:
            records, more = self.store.page(after, limit, order)
        except KeyError:
            raise InvalidRequest(f"after: there is no video {after}") from None
        data = [video_object(r) for r in records]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}

    def delete(self, video_id: str) -> dict[str, Any]:
        """A queued video never runs; one in progress is dropped when it finishes; files go."""
        if not is_video_id(video_id) or (record := self.store.delete(video_id)) is None:
            raise NotFound(video_id)
        if record.status != "in_progress":
            self._remove_files(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    def content(self, video_id: str, variant: str) -> tuple[BinaryIO, str, str]:
        """A completed video's file (its MP4, thumbnail or contact sheet), open (a delete meanwhile
        cannot pull it away), its media type and its name."""
        record = self._record(video_id)
        if record.status != "completed":
            raise NotReady(f"video {video_id} is {record.status}; its content is there once it is completed")
        suffix, media_type = VARIANTS[variant]
        name = f"{record.result['files']}.{suffix}"  # the attempt that made it
        try:
            return (self.videos / name).open("rb"), media_type, f"{video_id}.{suffix}"
        except FileNotFoundError:
            raise NotFound(video_id) from None

    def models(self) -> dict[str, Any]:
        model = {"id": self.served.model, "object": "model", "created": self.started_at, "owned_by": "framecast",
                 "kind": self.spec.kind, "description": self.spec.description}  # fmt: skip
        return {"object": "list", "data": [model]}

    def _record(self, video_id: str) -> VideoRecord:
        record = self.store.get(video_id) if is_video_id(video_id) else None
        if record is None:
            raise NotFound(video_id)
        return record

    def _remove_files(self, stem: str) -> None:
        """The files of a video (`stem`: its id, every attempt) or of one attempt (`<id>.a<n>`)."""
        for path in self.videos.glob(f"{stem}.*"):
            path.unlink(missing_ok=True)

    # -- the runners ----------------------------------------------------------------------------

    def start(self) -> None:
        for number in range(self.served.runners):
            thread = threading.Thread(target=self._run_forever, args=(number,), name=f"runner-{number}", daemon=True)
            thread.start()
            self._runners.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._runners:
            thread.join()

    def check_health(self) -> None:
        self.store.ping()
        stopped = [t.name for t in self._runners if not t.is_alive()]
        if stopped and not self._stop.is_set():
            raise RuntimeError(f"runner threads stopped: {', '.join(stopped)}")

    def _run_forever(self, number: int) -> None:
        worker = f"{socket.gethostname()}:{os.getpid()}:{number}:{uuid.uuid4().hex[:8]}"
        while not self._stop.is_set():
            try:
                record = self.store.claim(worker, self.served.lease_s)
            except Exception:  # e.g. the database is locked for long: try again
                log.exception("claiming a job failed")
                self._stop.wait(1.0)
                continue
            if record is None:
                self._stop.wait(CLAIM_POLL_S)
                continue
            try:
                self.run_job(record, worker)
            except Exception:  # the store failed while giving the job back: its lease will run out
                log.exception("job %s", record.id)

    def run_job(self, record: VideoRecord, worker: str) -> None:
        """One claimed job, to completed, failed, or back to the queue (a stage's process died)."""
        lease = _Lease(self.store, record.id, worker, self.served.lease_s)
        try:
            self._run(record, worker, lease)
        except Exception as e:  # outside the stages (e.g. Serve could not reach a deployment): try again
            log.exception("job %s", record.id)
            self.store.retry(record.id, worker, f"{type(e).__name__}: {e}".splitlines()[0])
        finally:
            lease.close()

    def _run(self, record: VideoRecord, worker: str, lease: _Lease) -> None:
        try:
            image = record.request.get("image")
            image = str(self.videos / image) if image else None
            job, _, recorded = prepare_video(self.served, self.spec, record.request["fields"], image)
            if job.request.as_dict() != record.request["settings"]:
                raise InvalidRequest("the server's model settings changed since the video was accepted")
        except InvalidRequest as e:  # accepted earlier under other rules (the server was changed)
            self.store.fail(record.id, worker, "invalid_request", str(e))
            return

        def on_step(_index: int, done: int, total: int) -> None:
            lease.progress = DENOISING_SHARE * done // total

        # Each attempt writes files of its own: a runner that lost its lease (and so its job) to
        # another never touches what the other makes.
        stem = f"{record.id}.a{record.attempts}"
        output = self.videos / f"{stem}.mp4"
        (result,) = list(run_stream([job], self.executor, [output], on_step))
        if isinstance(result, JobFailed):
            if result.error.actor_lost:
                self.store.retry(record.id, worker, str(result.error))
            else:
                self.store.fail(record.id, worker, "generation_failed", str(result.error))
            return
        thumbnail = self.videos / f"{stem}.thumbnail.png"
        Image.fromarray(read_frame(result.video, job.request.num_frames // 2)).save(thumbnail)
        summary: dict[str, Any] = {
            "clarity": {k.removeprefix("clarity/"): v for k, v in result.metrics.items() if k.startswith("clarity/")}
            or None,
            "clarity_error": result.clarity_error,
            # Only models whose videos are checked against their prompts (framecast-shapes) have it.
            "adherence": {
                k.removeprefix("adherence/"): v for k, v in result.metrics.items() if k.startswith("adherence/")
            }
            or None,
            "metrics": {k: v for k, v in result.metrics.items() if k.endswith("_s")},
            "frames_sha256": result.frames_sha256,
            "files": stem,
        }
        try:
            summary["run_id"] = log_generation(
                result, job, run_name=f"{job.spec.name}-{record.id}", experiment=self.served.experiment,
                tracking_uri=self.served.tracking_uri, params={**recorded, "video_id": record.id},
                tags={"framecast.source": "serve", "framecast.video_id": record.id},
            )  # fmt: skip
        except Exception as e:  # the video stands; the job says why it has no run
            summary["tracking_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        if not self.store.finish(record.id, worker, summary):  # deleted, or taken over by another runner
            deleted = self.store.get(record.id) is None
            self._remove_files(record.id if deleted else stem)  # deleted: its uploaded image too


class _Lease:
    """Keeps a running job's lease (and its progress) fresh in the store from a thread of its
    own, so that a long step never lets the lease run out while the runner is alive."""

    def __init__(self, store: JobStore, video_id: str, worker: str, lease_s: float):
        self.store, self.video_id, self.worker, self.lease_s = store, video_id, worker, lease_s
        self.progress = 0
        self._written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"lease-{video_id}", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(0.25):
            progress = self.progress
            if progress != self._written or time.monotonic() - renewed > self.lease_s / 3:
                try:
                    self.store.renew(self.video_id, self.worker, self.lease_s, progress)
                    self._written, renewed = progress, time.monotonic()
                except Exception:  # the next try may get through; the lease has time to spare
                    log.exception("renewing the lease of %s", self.video_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
