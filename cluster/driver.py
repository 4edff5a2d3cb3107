"""The driver: generations, top to bottom.

    request -> encode -> denoise -> decode -> write (and interpolate) -> measure clarity -> (caller) track

Validation happens first, for every job, before any model is loaded. Then the jobs run as a
stream: with Ray each stage works on a different job at the same time (`run_stream`). The driver
knows which stage runs which step and nothing of devices or model internals; the executor
decides where stages run.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from cluster.executor import (
    Executor,
    LocalExecutor,
    Method,
    RayExecutor,
    Stage,
    StageCall,
    StageFailed,
    check_levers_on_cluster,
)
from cluster.runtime import ClusterLayout, load_cluster_layout
from stages.cache import skipped_fraction
from stages.clarity import ClarityReport, json_figure
from stages.context_parallel import ParallelLayout
from stages.decoder import TilePlan, assemble_frames, plan_decode, to_uint8
from stages.denoiser import lever_problem, plan_layout
from stages.encoder import check_prompts, count_tokens, load_tokenizer
from stages.errors import InvalidRequest
from stages.models import ModelSpec, load_spec
from stages.request import GenerationRequest, build_request, check_image, pitfalls
from stages.video_io import (
    CODECS,
    contact_sheet,
    image_digest,
    interpolate,
    interpolated_path,
    load_image,
    palette_note,
    write_video,
)
from stages.weights import resolve_weights

# (job index, steps done, total steps) of the job being denoised
JobProgress = Callable[[int, int, int], None]
# (job index): a frame of the job's video (or of its interpolated copy) was written or made
WriteProgress = Callable[[int], None]
# Encodings already asked for, by (prompt, negative prompt, (image digest, height, width, frames)
# or None): see `encode_once`. The frame count is in every image's key, though only some families
# encode the image over the whole video (Wan 2.1 I2V): the driver knows no family's internals, so
# a sweep over frames re-encodes the image of any image-to-video model.
EncodingKey = tuple[str, str, tuple[str, int, int, int] | None]
Encodings = dict[EncodingKey, StageCall]


@dataclass
class Job:
    """A validated generation: the model, its weights, the filled-in request and where it runs."""

    spec: ModelSpec
    weights: Path
    request: GenerationRequest
    layout: ParallelLayout = ParallelLayout()
    cluster: ClusterLayout = ClusterLayout("single-node")
    decoders: int = 1
    tiles: TilePlan | None = None  # None: untiled
    warnings: dict[str, str] = field(default_factory=dict)  # settings the articles warn against (pitfalls)
    image: np.ndarray | None = None  # image-to-video: the image's pixels, (H, W, 3) uint8, read once here
    image_sha256: str = ""  # ... and their digest (`image_digest`), taken once
    keep_frames: bool = False  # the result holds the frames as made (to compare a cached job with its uncached twin)

    def resolved_config(self) -> str:
        """YAML of what this run used: the model spec as loaded, the weights found, the filled-in request."""
        resolved = {
            "model": self.spec.as_dict(),
            "weights": str(self.weights),
            "request": self.request.as_dict(),
            "parallel": self.layout.as_params(),
            "decode": self.decode_params(),
            "cluster": asdict(self.cluster),
        }
        return yaml.safe_dump(resolved, sort_keys=False)

    @property
    def suffix(self) -> str:
        """The file type its codec writes: .mp4, .mkv, ..., .png for a picture."""
        return CODECS[self.request.codec].suffix

    def decode_params(self) -> dict[str, str]:
        tiling = self.tiles.as_params() if self.tiles is not None else {"tiling": "off"}
        return {"decoders": str(self.decoders), **tiling}


@dataclass
class GenerationResult:
    video: Path
    contact_sheet: Path
    params: dict[str, str]
    metrics: dict[str, float]  # timings, memory, bytes moved, and the clarity summary (clarity/...)
    stages: dict[str, list[float]]  # stage -> [start, end], wall-clock seconds since the epoch
    frames_sha256: str = ""  # of the uint8 frames as written: equal frames, equal digest
    index: int = 0  # the job's place in its stream
    clarity_csv: Path | None = None  # the per-frame clarity series
    clarity_error: str | None = None  # why the video has no clarity figures (it is written all the same)
    warnings: dict[str, str] = field(default_factory=dict)  # the job's pitfalls (see stages.request)
    run_id: str | None = None
    tracking_error: str | None = None
    input_image: Path | None = None  # image-to-video: the image it was made from (as read), beside the video
    # stage -> where each of its actors ran the job: {"host", "node" (Ray's id, "" without Ray), "device"}
    placement: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    interpolated: Path | None = None  # the motion-interpolated copy (<name>.interp.<ext>), if asked for
    interpolation_error: str | None = None  # why there is no interpolated copy (the video stands without it)
    frames: np.ndarray | None = field(default=None, repr=False)  # as made, only if the job kept them

    def artifacts(self) -> list[Path]:
        extra = [path for path in (self.interpolated, self.clarity_csv, self.input_image) if path is not None]
        return [self.video, self.contact_sheet, *extra]

    def as_json(self) -> dict:
        return {
            "job": self.index,
            "prompt": self.params["prompt"],
            "video": str(self.video),
            "interpolated": str(self.interpolated) if self.interpolated else None,
            "contact_sheet": str(self.contact_sheet),
            "clarity_csv": str(self.clarity_csv) if self.clarity_csv else None,
            "input_image": str(self.input_image) if self.input_image else None,
            "clarity_error": self.clarity_error,
            "interpolation_error": self.interpolation_error,
            "warnings": self.warnings,
            "run_id": self.run_id,
            "tracking_error": self.tracking_error,
            "params": self.params,
            "metrics": {k: json_figure(v) for k, v in self.metrics.items()},
            "stages": self.stages,
            "frames_sha256": self.frames_sha256,
            "placement": self.placement,
        }


@dataclass
class JobFailed:
    """A job of a stream that failed; the stream goes on with the next one."""

    index: int
    prompt: str
    error: StageFailed

    def as_json(self) -> dict:
        return {"job": self.index, "prompt": self.prompt, "error": str(self.error), "stage": self.error.stage}


def prepare(model: str, prompt: str, **options) -> Job:
    """One job: see `prepare_jobs`."""
    return prepare_jobs(model, [prompt], **options)[0]


def prepare_jobs(model: str, prompts: list[str], **options: Any) -> list[Job]:
    """One job per prompt, with the same settings. `options`: `prepare_variants`' placement
    arguments (weights, workers, decoders, ...) and `build_request`'s settings."""
    if not prompts:
        raise InvalidRequest("no prompts; pass --prompt TEXT (repeatable) or --prompts FILE")
    placement = {k: options.pop(k) for k in list(options) if k in _PLACEMENT}
    labels = [None] if len(prompts) == 1 else [f"prompt {n} of {len(prompts)}" for n in range(1, len(prompts) + 1)]
    return prepare_variants(model, [(prompt, options) for prompt in prompts], labels, **placement)


def prepare_variants(
    model: str,
    variants: list[tuple[str, dict]],
    labels: list[str | None],
    weights: str | None = None,
    workers: int | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    cfg_parallel: bool = False,
    decoders: int = 1,
    tile_size: tuple[int, int] | None = None,
    tile_overlap: tuple[int, int] | None = None,
    cluster: str = "single-node",
    local: bool = False,
    acceleration: dict[str, Any] | None = None,
    image_files: dict[str, str] | None = None,
) -> list[Job]:
    """Everything that can be checked before heavy work, for every job: model, settings, layout,
    tiles, weights, prompt lengths, and the settings the articles warn against. `variants` are
    (prompt, `build_request` settings) pairs, one per job, all run by one executor; an error
    names the job's label (e.g. "prompt 3 of 3") when it has one. A request's `image` is the
    file it names, or the file `image_files` gives for that name (the Videos API names its upload
    "input_reference", so that neither the request nor an error shows the server's paths).
    `acceleration`: levers that override the model YAML's (`stages.acceleration`; None: kept)."""
    spec = load_spec(model)
    if acceleration:
        spec = replace(spec, acceleration=spec.acceleration.with_overrides(**acceleration))
    requests, layouts, tiles, image_warnings = [], [], [], []
    images: dict[str, tuple[np.ndarray, str]] = {}  # pixels and digest, once per file
    for (prompt, settings), label in zip(variants, labels, strict=True):
        try:
            r = build_request(spec, prompt, **settings)
            requests.append(r)
            layouts.append(plan_layout(spec, r, workers, ulysses, ring, cfg_parallel))
            tiles.append(plan_decode(spec, r.height, r.width, decoders, tile_size, tile_overlap))
            if r.image and r.image not in images:
                pixels = load_image((image_files or {}).get(r.image, r.image), name=r.image)
                images[r.image] = pixels, image_digest(pixels)
            image_warnings.append(check_image(spec, r, images[r.image][0].shape[:2]) if r.image else {})
        except InvalidRequest as e:
            raise _labelled(e, label) from None
    layout = layouts[0]
    if any(other != layout for other in layouts):
        found = ", ".join(sorted({str(other) for other in layouts}))
        raise InvalidRequest(f"the jobs need different denoiser layouts ({found}); one executor runs one layout")
    check_levers(spec, local, layout)
    if local and layout.world_size > 1:
        raise InvalidRequest(f"--local runs in one process; the layout {layout} needs {layout.world_size} Ray actors")
    if local and decoders > 1:
        raise InvalidRequest(f"--local runs in one process; --decoders {decoders} needs {decoders} Ray actors")
    cluster_layout = load_cluster_layout(cluster)
    weights_dir = resolve_weights(spec, weights)
    tokenizer = load_tokenizer(spec, weights_dir)
    jobs = []
    for q, plan, image_warning, label in zip(requests, tiles, image_warnings, labels, strict=True):
        try:
            check_prompts(tokenizer, spec, q.prompt, q.negative_prompt, q.do_classifier_free_guidance)
        except InvalidRequest as e:
            raise _labelled(e, label) from None
        warnings = {**pitfalls(spec, q, count_tokens(tokenizer, q.prompt)), **image_warning}
        image, digest = images.get(q.image, (None, ""))
        jobs.append(Job(spec, weights_dir, q, layout, cluster_layout, decoders, plan, warnings, image, digest))
    return jobs


_PLACEMENT = tuple(inspect.signature(prepare_variants).parameters)[3:]  # weights, workers, ..., local


def check_levers(spec: ModelSpec, local: bool, layout: ParallelLayout) -> None:
    """Refuse levers this run cannot take, before any weights load: in one process, for this
    machine's device; through Ray, what does not depend on the actors' devices (the executor
    checks the cluster's, and each stage its own device before it loads anything)."""
    if local:
        from stages.acceleration import available_kernels
        from stages.device import cuda_capability, default_device

        device = default_device()
        problem = lever_problem(spec, device.type, cuda_capability(device), available_kernels(device),
                                layout.world_size)  # fmt: skip
    else:
        problem = lever_problem(spec, None, ranks=layout.world_size)
    if problem:
        raise InvalidRequest(problem)


def _labelled(error: InvalidRequest, label: str | None) -> InvalidRequest:
    return error if label is None else InvalidRequest(f"{label}: {error}")


def make_executor(job: Job, local: bool, replicas: int = 1, encoder: bool = True, mend: bool = True) -> Executor:
    """The stages for `job` (and jobs like it): in this process, or in Ray actors, one of
    `replicas` executors that share the cluster; without an `encoder`, its jobs' prompts must be
    encoded elsewhere (`encode_once`). `mend`: see RayExecutor's `mend_actors`."""
    if local:
        return LocalExecutor(job.spec, job.weights)
    check_levers_on_cluster(job.spec, job.layout)
    return RayExecutor(job.spec, job.weights, job.layout, job.cluster, decoders=job.decoders, replicas=replicas,
                       encoder=encoder, mend_actors=mend)  # fmt: skip


def default_output(job: Job, index: int | None = None, directory: Path = Path("outputs")) -> Path:
    """<directory>/<model>-<time>[-<job index>]-seed<seed>.mp4 (the codec's type: .png for a
    text-to-image model's picture)"""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    number = "" if index is None else f"-{index}"
    return directory / f"{job.spec.name}-{stamp}{number}-seed{job.request.seed}{job.suffix}"


# Jobs in flight when pipelined: one per stage. The encoder works on job k+1 while the denoiser
# group runs job k and the decoders run job k-1; the driver meanwhile writes job k-2.
PIPELINE_DEPTH = 3


@dataclass
class _InFlight:
    index: int
    job: Job
    output: Path
    submitted: float
    encoded: StageCall | None = None
    denoised: StageCall | None = None
    decoded: StageCall | None = None
    gathered: tuple[float, float] = (0.0, 0.0)  # when the driver took the frames (and blended tiles)
    failed: StageFailed | None = None
    frames: np.ndarray | None = None  # kept for the contact sheet until the job is finished
    video: Path | None = None
    written_at: float = 0.0
    video_bytes: int = 0
    interpolated: np.ndarray | None = None  # the interpolated frames, until measured
    interpolated_video: Path | None = None
    interpolated_s: float = 0.0  # interpolating and writing the copy
    interpolation_error: str | None = None
    write_warnings: dict[str, str] = field(default_factory=dict)  # what writing cost, e.g. a lossy GIF
    measured: StageCall | None = None
    clarity_error: str | None = None


def run_stream(
    jobs: Iterable[Job],
    executor: Executor,
    outputs: Iterable[Path],
    on_step: JobProgress | None = None,
    pipelined: bool = True,
    encodings: Encodings | None = None,
    on_write: WriteProgress | None = None,
) -> Iterator[GenerationResult | JobFailed]:
    """Run jobs through the stages, yielding each job's result (or failure) in job order.

    Pipelined, up to PIPELINE_DEPTH jobs are in flight: a job's encode and denoise calls go to
    the actors as soon as it enters, and each actor works through its calls in order. A job's
    decode call is sent once the job before it is decoded (so that a decoder that fails takes
    down one job, never the next), before that job is written (so that the decoders do not wait
    on the writer). Once written, a job's video goes to the clarity panel, and the job is
    finished (its figures taken, its contact sheet drawn) after the next job's frames are taken:
    the panel measures while the driver waits for those. The local executor runs every call
    when it is made, so there a stream runs one job at a time, each finished before the next starts.
    A job whose prompt is in `encodings` (see `encode_once`) is not encoded again. `on_write` hears
    of every frame written or interpolated: a long write is progress too. `jobs` and `outputs` are
    taken one at a time, as jobs enter: they may be iterators that hand out jobs from a queue
    (`cluster.replicas`).
    """
    pipelined = pipelined and executor.concurrent
    depth = PIPELINE_DEPTH if pipelined else 1
    entering = iter(enumerate(zip(jobs, outputs, strict=True)))
    in_flight: deque[_InFlight] = deque()

    def admit() -> None:
        """Let jobs in up to the depth, and send the oldest job's decode call."""
        while len(in_flight) < depth and (entry := next(entering, None)) is not None:
            index, (job, output) = entry
            if job.decoders != executor.decoders:
                raise ValueError(f"a job for {job.decoders} decoder(s) given to an executor with {executor.decoders}")
            in_flight.append(_submit(executor, _InFlight(index, job, output, time.time()), on_step, encodings))
        if in_flight and in_flight[0].decoded is None:
            _submit_decode(executor, in_flight[0])

    measuring: deque[_InFlight] = deque()  # written (or failed), not yet finished
    admit()
    while in_flight:
        flight = in_flight.popleft()
        flight.frames = _collect(executor, flight)
        if pipelined:
            admit()  # the next job decodes while this one is written
        if flight.failed is None:
            _write(executor, flight, on_write)
        measuring.append(flight)
        # Pipelined, the job just written stays with the panel until the next job's frames are
        # taken; the ones before it (at the end: all) are finished, in order.
        while len(measuring) > (1 if pipelined and in_flight else 0):
            yield _finish(executor, measuring.popleft())
        if not pipelined:
            admit()


def generate(job: Job, executor: Executor, output: Path, on_step: JobProgress | None = None) -> GenerationResult:
    """One job; raises StageFailed if a stage fails."""
    result = next(run_stream([job], executor, [output], on_step))
    if isinstance(result, JobFailed):
        raise result.error
    return result


def encode_once(executor: Executor, jobs: list[Job]) -> Encodings:
    """Ask for each distinct prompt's embeddings once, for jobs that differ only in other settings
    (a sweep's cells). With the negative prompt's if any job guides: a job without guidance uses
    the prompt's alone. The results stay where they are made; any executor's stages can use them."""
    first: dict[EncodingKey, Job] = {}
    guided: dict[EncodingKey, bool] = {}
    for job in jobs:
        key = encoding_key(job)
        first.setdefault(key, job)
        guided[key] = guided.get(key, False) or job.request.do_classifier_free_guidance
    return {key: _encode(executor, job, guided[key]) for key, job in first.items()}


def encoding_key(job: Job) -> EncodingKey:
    """What a job's encoding depends on: its prompts, and its image at its size and length (if any)."""
    r = job.request
    if job.image is None:
        return r.prompt, r.negative_prompt, None
    return r.prompt, r.negative_prompt, (job.image_sha256, r.height, r.width, r.num_frames)


def _encode(executor: Executor, job: Job, guidance: bool) -> StageCall:
    r = job.request
    if job.image is None:
        return executor.call(Stage.ENCODE, Method.ENCODE, r.prompt, r.negative_prompt, guidance)
    size = (r.height, r.width)
    return executor.call(
        Stage.ENCODE, Method.ENCODE, r.prompt, r.negative_prompt, guidance, job.image, size, r.num_frames
    )


def _submit(
    executor: Executor, flight: _InFlight, on_step: JobProgress | None, encodings: Encodings | None = None
) -> _InFlight:
    r = flight.job.request
    progress = None if on_step is None else (lambda done, total: on_step(flight.index, done, total))
    try:
        known = encodings.get(encoding_key(flight.job)) if encodings else None
        encoded = known.shared() if known else _encode(executor, flight.job, r.do_classifier_free_guidance)
        flight.encoded = encoded
        flight.denoised = executor.call(Stage.DENOISE, Method.DENOISE, flight.encoded, r, progress=progress)
    except StageFailed as e:  # in-process, or a denoiser group already shut down
        flight.failed = e
    return flight


def _submit_decode(executor: Executor, flight: _InFlight) -> None:
    """One decoder blends its own tiles (if any) and sends the frames; several decoders each
    decode a share of the tiles, which are blended in the driver, where the video is written."""
    if flight.failed is not None:
        return
    method = Method.DECODE if flight.job.decoders == 1 else Method.DECODE_TILES
    try:
        flight.decoded = executor.call(Stage.DECODE, method, flight.denoised, flight.job.tiles)
    except StageFailed as e:
        flight.failed = e


def _collect(executor: Executor, flight: _InFlight) -> np.ndarray | None:
    """Wait for the job's stages; its frames, or None (and `flight.failed`) if a stage failed."""
    if flight.failed is not None:
        return None
    try:
        executor.wait(flight.encoded, flight.denoised, flight.decoded)  # blames the first stage that failed
        start = time.time()
        if flight.job.decoders == 1:
            frames = executor.get(flight.decoded)
        else:
            tiles = [tile for share in executor.gather(flight.decoded) for tile in share]
            try:
                frames = to_uint8(assemble_frames(flight.job.tiles, tiles))
            except Exception as e:  # e.g. out of memory in the driver: this job fails, the stream goes on
                raise StageFailed("decode", e) from e
        flight.gathered = (start, time.time())
        return frames
    except StageFailed as e:
        flight.failed = e
        return None


def _write(executor: Executor, flight: _InFlight, on_write: WriteProgress | None = None) -> None:
    """Write the video, or a text-to-image model's picture (first: nothing after it may lose it),
    then its interpolated copy if asked for, and send them to the clarity panel."""
    r = flight.job.request
    on_frame = None if on_write is None else (lambda: on_write(flight.index))
    flight.video = write_video(flight.frames, flight.output, fps=r.fps, codec=r.codec, crf=r.crf, on_frame=on_frame)
    flight.written_at = time.time()
    if note := palette_note(r.codec, flight.frames):
        flight.write_warnings[f"lossy_{r.codec}"] = note
    if r.interpolate_fps:
        try:
            flight.interpolated = interpolate(flight.frames, r.fps, r.interpolate_fps, on_frame)
            flight.interpolated_video = write_video(flight.interpolated, interpolated_path(flight.video),
                                                    r.interpolate_fps, r.codec, r.crf, on_frame)  # fmt: skip
        except OSError as e:  # ffmpeg failed or timed out: the video is measured and tracked without its copy
            flight.interpolated, flight.interpolation_error = None, f"{type(e).__name__}: {e}".splitlines()[0]
        flight.interpolated_s = time.time() - flight.written_at
    _send_to_panel(executor, flight)


def _send_to_panel(executor: Executor, flight: _InFlight) -> None:
    media = flight.video.read_bytes()
    flight.video_bytes = len(media)
    try:
        r, spec = flight.job.request, flight.job.spec
        call = executor.call(Stage.MEASURE, Method.MEASURE, flight.frames, r.fps, media, flight.video.suffix, r.prompt,
                             spec.adherence, flight.interpolated, r.interpolate_fps)  # fmt: skip
        flight.measured, flight.clarity_error = call, None
    except StageFailed as e:  # in-process: the panel has already failed
        flight.clarity_error = str(e)


def _take_clarity(executor: Executor, flight: _InFlight) -> ClarityReport | None:
    """The panel's figures for the job, or None (and `flight.clarity_error`): the video stands
    without them. A call whose actor died is sent once more, to the actor that replaced it: it
    may have been queued behind the job that killed the actor."""
    for attempt in (1, 2):
        if flight.measured is None:
            return None
        try:
            return executor.get(flight.measured)
        except StageFailed as e:
            flight.clarity_error, flight.measured = str(e), None
            if attempt == 1 and e.actor_lost:
                _send_to_panel(executor, flight)
    return None


def _finish(executor: Executor, flight: _InFlight) -> GenerationResult | JobFailed:
    """The job's result: its clarity figures (a failure to measure keeps the video, saying why),
    its contact sheet marking the sharpest and blurriest frames, the per-frame series beside it,
    and the job's timings, memory and bytes moved."""
    if flight.failed is not None:
        return JobFailed(flight.index, flight.job.request.prompt, flight.failed)
    job, r, video, frames = flight.job, flight.job.request, flight.video, flight.frames
    clarity = _take_clarity(executor, flight)
    sheet = video.with_suffix(".sheet.png")
    contact_sheet(frames, marks=clarity.marks() if clarity else None).save(sheet)
    series = None
    if clarity is not None:
        series = video.with_suffix(".clarity.csv")
        series.write_text(clarity.csv_text())
    input_image = None
    if job.image is not None:  # kept with the video: what it was made from
        input_image = video.with_suffix(".input.png")
        Image.fromarray(job.image).save(input_image)

    calls = {"encode": flight.encoded, "denoise": flight.denoised, "decode": flight.decoded}
    reports = {stage: executor.reports(call) for stage, call in calls.items()}
    spans = {stage: [min(x["start"] for x in rep), max(x["end"] for x in rep)] for stage, rep in reports.items()}
    # The driver's part: taking the frames (or the tiles, and blending them), then writing.
    spans["write"] = [flight.gathered[0], flight.written_at]
    placement = _placement(reports)
    if clarity is not None:
        (report,) = executor.reports(flight.measured)
        spans["measure"] = [report["start"], report["end"]]
        placement |= _placement({"measure": [report]})
    seconds = {f"{stage}_s": end - begin for stage, (begin, end) in spans.items()}  # encode_s, ..., measure_s
    seconds["gather_s"] = flight.gathered[1] - flight.gathered[0]
    if flight.interpolated_video is not None:
        seconds["interpolate_s"] = flight.interpolated_s
    ranks, decoders = reports["denoise"], reports["decode"]
    moved = {
        what: call.deliveries * sum(x["output_bytes"] for x in reports[stage]) if executor.crosses_processes else 0
        for what, stage, call in (
            ("prompt_embeddings", "encode", flight.encoded),
            ("latents", "denoise", flight.denoised),
            ("tiles" if job.decoders > 1 else "frames", "decode", flight.decoded),
        )
    }
    to_panel = executor.crosses_processes and clarity is not None
    moved["video"] = flight.video_bytes if to_panel else 0  # to the panel, with the frames
    moved["panel_frames"] = sum(a.nbytes for a in (frames, flight.interpolated) if a is not None) if to_panel else 0
    metrics = {
        **seconds,
        "total_s": flight.written_at - flight.submitted,  # until the video is written
        "s_per_step": seconds["denoise_s"] / r.steps,
        "denoise_peak_mib": max(rank["peak_memory_mib"] for rank in ranks),
        **{f"denoise_rank{i}_peak_mib": rank["peak_memory_mib"] for i, rank in enumerate(ranks)},
        **{f"denoise_rank{i}_video_tokens": rank["video_tokens"] for i, rank in enumerate(ranks)},
        "decode_peak_mib": max(d["peak_memory_mib"] for d in decoders),
        **{f"decode_rank{i}_peak_mib": d["peak_memory_mib"] for i, d in enumerate(decoders)},
        **{f"decode_rank{i}_work_mib": d["work_memory_mib"] for i, d in enumerate(decoders)},
        **{f"decode_rank{i}_tiles": d["tiles"] for i, d in enumerate(decoders)},
        "decode_tiled_for_memory": max(d.get("tiled_for_memory", 0.0) for d in decoders),
        # The first step apart (on a compiled stage's first job of a shape it holds the compile).
        "denoise_first_step_s": max(rank.get("first_step_s", 0.0) for rank in ranks),
        "denoise_step_s": max(rank.get("step_s", 0.0) for rank in ranks),
        **{f"moved_bytes/{what}": float(n) for what, n in moved.items()},
        **({"cache/skipped_fraction": skipped_fraction(ranks)} if r.cache != "none" else {}),
        **(clarity.metrics() if clarity else {}),
    }
    params = {
        "model": job.spec.name,
        **{k: str(v) for k, v in r.as_dict().items()},
        "dtype": job.spec.dtype,
        **{f"acceleration/{k}": v for k, v in job.spec.acceleration.as_params().items()},
        "executor": executor.name,
        **job.layout.as_params(),
        **job.decode_params(),
        "cluster_layout": job.cluster.name,
        **{f"device_{stage}": device for stage, device in executor.devices().items()},
        "weights": str(job.weights),
        **({"image_sha256": job.image_sha256} if job.image is not None else {}),
    }
    digest = hashlib.sha256(np.ascontiguousarray(frames)).hexdigest()
    flight.frames = flight.interpolated = None  # the stream holds no finished job's frames (unless asked)
    return GenerationResult(
        video, sheet, params, metrics, spans, digest, flight.index, clarity_csv=series,
        clarity_error=flight.clarity_error, warnings={**job.warnings, **flight.write_warnings},
        input_image=input_image, interpolated=flight.interpolated_video,
        interpolation_error=flight.interpolation_error, placement=placement,
        frames=frames if job.keep_frames else None,
    )  # fmt: skip


def _placement(reports: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, str]]]:
    return {
        stage: [{key: str(report.get(key, "")) for key in ("host", "node", "device")} for report in stage_reports]
        for stage, stage_reports in reports.items()
    }
