"""The Videos API's work, apart from HTTP: what a create request may say (checked with the same
rules and messages as `framecast generate`), the video object clients read, and the runners that
take jobs from the durable queue through the pipeline.

    create:  fields -> settings (preset, seconds -> frames) -> validated job -> JobStore (queued)
    runner:  claim -> validate again -> run_stream (encode, denoise, decode, write, measure)
             -> thumbnail -> MLflow run -> completed (or retried, or failed)

The video is written before anything that may fail after it (measuring, tracking): a job whose
tracking fails is completed all the same, and says why.

No job can hang for good. Its lease in the store is renewed only by its progress (a denoising
step, a stage call finished, the video written), never by a thread of its own: a runner that
hangs or dies stops renewing. A watchdog gives the job of a runner that has made no progress for
its stall limit back to the queue, and starts a new runner in its place (a Python thread cannot
be killed: the stuck one is left behind, and whatever it does later is refused by the store).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from PIL import Image

from cluster.driver import Job, JobFailed, prepare_variants, run_stream
from cluster.executor import Executor, Method, Stage, StageCall
from cluster.jobs import JobStore, VideoRecord, is_video_id, new_video_id
from cluster.serving import Served
from cluster.settings import resolve_settings
from cluster.tracking import log_generation
from stages.clarity import json_figure
from stages.errors import InvalidRequest
from stages.models import ModelSpec, load_spec
from stages.request import frames_nearest
from stages.settings import SETTINGS
from stages.video_io import CODECS, interpolated_path, read_frame

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
# The codecs a client may ask for (stages.video_io.CODECS): those browsers play. The lossless and
# editing codecs make files too large to serve, or that browsers cannot show; the CLI writes them.
API_CODECS = ("h264", "webm")
DENOISING_SHARE = 95  # progress while denoising runs 0..95; writing and measuring the rest
CLAIM_POLL_S = 0.2  # how often an idle runner looks for a queued job
WATCH_PERIOD_S = 0.5  # how often the watchdog looks at the running jobs
# A job's stall limit grows with its steps beyond these: its longest silence is often the wait
# for the denoiser group to finish another video, whose steps are unknown here but usually alike.
STALL_REFERENCE_STEPS = 50
MAX_NUMBER = 1e6  # no setting is near this; beyond it a number is a mistake (or an overflow)


class NotFound(Exception):
    """No such video (args[0]: the id asked for), or (args[1], if given) no such file of it."""


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
    codec = settings.values.get("codec")
    if codec is not None and codec not in API_CODECS:
        raise InvalidRequest(
            f"codec must be one of {', '.join(API_CODECS)} over the API (got {codec!r}); "
            f"`framecast generate --codec` also writes the others"
        )
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
        **{name: result.get(name) for name in CLARITY_GROUPS},  # null: not measured (or no such figures)
        "clarity_error": result.get("clarity_error"),
        "interpolation_error": result.get("interpolation_error"),
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
        self._lock = threading.Lock()  # the runners and their attempts, as the watchdog changes them
        self._runners: list[threading.Thread | None] = []  # one per slot: the slot's current runner
        self._watchdog: threading.Thread | None = None
        self._attempts: dict[int, Attempt] = {}  # slot -> the attempt its runner is making
        self.replaced = 0  # runners given up on (stalled) and started anew

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
        settings, result = record.request["settings"], record.result
        if variant == "interpolated" and not settings.get("interpolate_fps"):
            raise NotFound(video_id, f"video {video_id} has no interpolated copy: it was made without interpolate_fps")
        if variant == "interpolated" and result.get("interpolation_error"):
            raise NotFound(video_id, f"video {video_id} has no interpolated copy: {result['interpolation_error']}")
        codec = CODECS[settings.get("codec", self.spec.default_codec)]  # as stored before codecs could be chosen
        video = self.videos / f"{result['files']}{codec.suffix}"  # the attempt that made it
        path, media_type = {
            "video": (video, codec.media_type),
            "interpolated": (interpolated_path(video), codec.media_type),
            "thumbnail": (video.with_suffix(".thumbnail.png"), "image/png"),
            "spritesheet": (video.with_suffix(".sheet.png"), "image/png"),
        }[variant]
        try:
            return path.open("rb"), media_type, video_id + path.name.removeprefix(result["files"])
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
        """Requeue what a dead ingress process on this machine left running, then start the
        runners and their watchdog."""
        self._requeue_orphans()
        with self._lock:
            self._runners = [None] * self.served.runners
            for slot in range(self.served.runners):
                self._start_runner(slot)
        self._watchdog = threading.Thread(target=self._watch, name="runner-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> int:
        """Stop claiming, and give the jobs in progress back to the queue, their attempt not
        counted: they resume on the next start. Does not wait for the runners (a stage call may
        take long); whatever they finish afterwards is refused by the store and removed. Returns
        how many jobs went back."""
        self._stop.set()
        with self._lock:
            attempts = list(self._attempts.values())
            self._attempts.clear()
        returned = 0
        for attempt in attempts:
            attempt.abandoned = True
            try:
                returned += self.store.requeue(attempt.record.id, attempt.worker)
            except Exception:  # its lease runs out, and the next start requeues it all the same
                log.exception("giving back video %s", attempt.record.id)
        return returned

    def runners_alive(self) -> int:
        """Runners that can take a job (a replaced, stuck one no longer counts)."""
        with self._lock:
            return sum(thread is not None and thread.is_alive() for thread in self._runners)

    def check_health(self) -> None:
        self.store.ping()
        if self._stop.is_set():
            return
        if (alive := self.runners_alive()) < self.served.runners:
            raise RuntimeError(f"{self.served.runners - alive} of {self.served.runners} runner threads stopped")
        if self._watchdog is not None and not self._watchdog.is_alive():
            raise RuntimeError("the runners' watchdog stopped")

    def _requeue_orphans(self) -> None:
        """Jobs in progress under a runner of a process of this machine that no longer exists (the
        ingress replica this one replaces): back to the queue now, rather than when their leases
        run out. The attempt counts: the job may be what killed it."""
        host = socket.gethostname()
        for video_id, worker in self.store.running():
            name, _, pid = (worker or "").partition(":")
            pid = pid.partition(":")[0]
            if name == host and pid.isdigit() and not _process_exists(int(pid)):
                self.store.retry(video_id, worker, "its server process ended while it ran")

    def _start_runner(self, slot: int) -> None:
        """A new runner in `slot` (under the lock: the runner's first look at its slot waits for it)."""
        worker = f"{socket.gethostname()}:{os.getpid()}:{slot}:{uuid.uuid4().hex[:8]}"
        thread = threading.Thread(target=self._run_forever, args=(slot, worker), name=f"runner-{slot}", daemon=True)
        self._runners[slot] = thread
        thread.start()

    def _current(self, slot: int) -> bool:
        with self._lock:
            return self._runners[slot] is threading.current_thread()

    def _run_forever(self, slot: int, worker: str) -> None:
        while not self._stop.is_set() and self._current(slot):
            try:
                record = self.store.claim(worker, self.served.stall_timeout_s)
            except Exception:  # e.g. the database is locked for long: try again
                log.exception("claiming a job failed")
                self._stop.wait(1.0)
                continue
            if record is None:
                self._stop.wait(CLAIM_POLL_S)
                continue
            attempt = Attempt(self.store, record, worker, self.stall_limit_s(record))
            with self._lock:
                stopping = self._stop.is_set()
                if not stopping:
                    self._attempts[slot] = attempt
            if stopping:  # claimed while the service stops: it goes back as the others did
                self.store.requeue(record.id, worker)
                return
            try:
                self.run_job(attempt)
            except Exception:  # the store failed while giving the job back: its lease will run out
                log.exception("job %s", record.id)
            finally:
                with self._lock:
                    if self._attempts.get(slot) is attempt:
                        del self._attempts[slot]

    def stall_limit_s(self, record: VideoRecord) -> float:
        """How long a job may go without progress before its attempt is given up."""
        steps = record.request["settings"].get("steps") or STALL_REFERENCE_STEPS
        return self.served.stall_timeout_s * max(1.0, steps / STALL_REFERENCE_STEPS)

    def _watch(self) -> None:
        """Give up on attempts that have stalled: the job back to the queue (the attempt counts),
        and a new runner in the slot."""
        while not self._stop.wait(WATCH_PERIOD_S):
            with self._lock:
                stalled = [(slot, a) for slot, a in self._attempts.items() if a.silent_s() > a.limit_s]
                for slot, attempt in stalled:
                    attempt.abandoned = True
                    del self._attempts[slot]
                    self._start_runner(slot)
                    self.replaced += 1
            for _, attempt in stalled:
                why = f"it made no progress for {attempt.limit_s:g} s (its runner was replaced)"
                log.error("video %s: %s", attempt.record.id, why)
                try:
                    self.store.retry(attempt.record.id, attempt.worker, why)
                except Exception:  # its lease runs out all the same
                    log.exception("giving back video %s", attempt.record.id)

    def run_job(self, attempt: Attempt) -> None:
        """One claimed job, to completed, failed, or back to the queue (a stage's process died)."""
        record, worker = attempt.record, attempt.worker
        try:
            attempt.advance()  # the lease, at the job's own stall limit
            self._run(record, worker, attempt)
        except _Abandoned:  # given back (the watchdog, a stop) or deleted: the job is no longer ours
            deleted = self.store.get(record.id) is None
            self._remove_files(record.id if deleted else attempt.stem)  # deleted: its uploaded image too
        except Exception as e:  # outside the stages (e.g. Serve could not reach a deployment): try again
            log.exception("job %s", record.id)
            self.store.retry(record.id, worker, f"{type(e).__name__}: {e}".splitlines()[0])

    def _run(self, record: VideoRecord, worker: str, attempt: Attempt) -> None:
        try:
            image = record.request.get("image")
            image = str(self.videos / image) if image else None
            job, _, recorded = prepare_video(self.served, self.spec, record.request["fields"], image)
            # Compared on the settings the video was accepted with: one accepted before a setting
            # existed (a codec, say) gets that setting's default, as its fields ask for none.
            now = job.request.as_dict()
            if any(now.get(name) != value for name, value in record.request["settings"].items()):
                raise InvalidRequest("the server's model settings changed since the video was accepted")
        except InvalidRequest as e:  # accepted earlier under other rules (the server was changed)
            self.store.fail(record.id, worker, "invalid_request", str(e))
            return

        def on_step(_index: int, done: int, total: int) -> None:
            attempt.advance(DENOISING_SHARE * done // total)

        # Each attempt writes files of its own: a runner that lost its job to another never
        # touches what the other makes.
        stem = attempt.stem
        output = self.videos / f"{stem}{job.suffix}"
        executor = _AttemptExecutor(self.executor, attempt)
        # every frame written or interpolated is progress: a long interpolation is not a stall
        (result,) = list(run_stream([job], executor, [output], on_step, on_write=lambda _index: attempt.advance()))
        if isinstance(result, JobFailed):
            if result.error.actor_lost:
                self.store.retry(record.id, worker, str(result.error))
            else:
                self.store.fail(record.id, worker, "generation_failed", str(result.error))
            return
        thumbnail = self.videos / f"{stem}.thumbnail.png"
        Image.fromarray(read_frame(result.video, job.request.num_frames // 2)).save(thumbnail)
        attempt.advance()
        summary: dict[str, Any] = {
            **{name: _group(result.metrics, prefix) for name, prefix in CLARITY_GROUPS.items()},
            "clarity_error": result.clarity_error,
            "interpolation_error": result.interpolation_error,
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
        attempt.advance()
        if not self.store.finish(record.id, worker, summary):  # deleted, or taken over by another runner
            deleted = self.store.get(record.id) is None
            self._remove_files(record.id if deleted else stem)  # deleted: its uploaded image too


# The video object's panel figures -> their MLflow prefix. `clarity`: the frames as made;
# `encoded`: the file as saved, with psnr_y and ssim_y against the frames (what the codec cost);
# `interp_clarity`: the interpolated copy; `adherence`: only models whose videos are checked
# against their prompts (framecast-shapes) have it.
CLARITY_GROUPS = {"clarity": "clarity/", "encoded": "encoded/", "interp_clarity": "interp/clarity/",
                  "adherence": "adherence/"}  # fmt: skip


def _group(metrics: dict[str, float], prefix: str) -> dict[str, float] | None:
    """The metrics under `prefix`, without it (None if there are none), as strict JSON has them
    (an infinite PSNR, of a file identical to its frames, is "inf")."""
    return {k.removeprefix(prefix): json_figure(v) for k, v in metrics.items() if k.startswith(prefix)} or None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


class _Abandoned(Exception):
    """The attempt was given up (stalled, or the server stops): its runner stops working on it."""


@dataclass
class Attempt:
    """One runner's attempt at a job: when it last made progress, and its lease in the store,
    renewed by that progress (in the runner's own thread) and by nothing else."""

    store: JobStore
    record: VideoRecord
    worker: str
    limit_s: float  # the longest silence allowed
    abandoned: bool = False  # set by the watchdog or a stop; the runner finds out at its next progress
    progress: int = 0
    _last: float = field(default_factory=time.monotonic)
    _renewed: float = float("-inf")
    _written: int = -1

    @property
    def stem(self) -> str:
        """The name its files start with: the job's id, the attempt's number and its runner's own
        mark (a job given back by a stop is tried again under the same number)."""
        return f"{self.record.id}.a{self.record.attempts}-{self.worker.rsplit(':', 1)[-1]}"

    def silent_s(self) -> float:
        return time.monotonic() - self._last

    def advance(self, progress: int | None = None) -> None:
        """Progress: renew the lease (at most 4 times a second, and at least every quarter of the
        limit); raises _Abandoned if the job is no longer this attempt's. The lease outlasts the
        stall limit by half: the watchdog in this process acts first; the lease is for when the
        process is gone."""
        self.check()
        now = self._last = time.monotonic()
        self.progress = self.progress if progress is None else progress
        if (self.progress != self._written and now - self._renewed >= 0.25) or now - self._renewed > self.limit_s / 4:
            if not self.store.renew(self.record.id, self.worker, 1.5 * self.limit_s, self.progress):
                self.abandoned = True  # deleted, or given back: another runner may hold it now
                raise _Abandoned
            self._renewed, self._written = now, self.progress

    def check(self) -> None:
        """For a runner waiting on a stage: stop waiting once the attempt is given up."""
        if self.abandoned:
            raise _Abandoned


class _AttemptExecutor(Executor):
    """The service's executor as one attempt uses it: a stage call sent (so the step before it,
    e.g. writing the video, is done) and a call finished are progress, and a wait ends once the
    attempt is given up (where the executor waits in steps: Serve's)."""

    def __init__(self, inner: Executor, attempt: Attempt):
        self.inner, self.attempt = inner, attempt
        self.name, self.concurrent = inner.name, inner.concurrent
        self.crosses_processes, self.decoders = inner.crosses_processes, inner.decoders

    def call(self, stage: Stage, method: Method, *args: Any, progress: Any = None) -> StageCall:
        self.attempt.advance()
        call = self.inner.call(stage, method, *args, progress=progress)
        call.check = self.attempt.check
        self.attempt.advance()
        return call

    def wait(self, *calls: StageCall) -> None:
        self.inner.wait(*calls)
        self.attempt.advance()

    def get(self, call: StageCall) -> Any:
        value = self.inner.get(call)
        self.attempt.advance()
        return value

    def gather(self, call: StageCall) -> list[Any]:
        values = self.inner.gather(call)
        self.attempt.advance()
        return values

    def reports(self, call: StageCall) -> list[dict[str, Any]]:
        return self.inner.reports(call)

    def devices(self) -> dict[str, str]:
        return self.inner.devices()

    def close(self) -> None:
        """Nothing: the service's executor outlives its attempts."""
