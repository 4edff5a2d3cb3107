"""Parameter sweeps: one prompt and one seed over a grid of settings, measured, to answer which
settings give the clearest video.

    grid -> cells (a validated job each) -> the parent MLflow run (found again on a rerun)
         -> cells already finished are reused -> the prompt is encoded once
         -> the other cells run on the pipeline replicas the cluster has room for
         -> each cell's video, clarity figures and child run -> the summary on the parent run

A sweep is known by what decides its videos: model, weights (their files, not only their
directory), prompt, seed and every cell's settings. How it runs (replicas, denoiser layout,
decoders) changes no video (the parallel paths equal the single-process one), so a sweep
interrupted on one layout resumes on another.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.utils.time import get_current_time_millis

from cluster import sweep_report
from cluster.driver import Job, JobFailed, encode_once, encoding_key, prepare_variants
from cluster.replicas import Finished, ReplicaPool, Work, pipeline_replicas
from cluster.settings import REQUEST_FIELDS, Settings
from cluster.sweep_report import INCOMPLETE, STATUSES, Cell, CellOutcome
from cluster.tracking import WARNING_TAG, child_runs, log_generation, open_parent_run
from cluster.uncached import Earlier, paired_with_uncached
from stages.clarity import json_figure
from stages.errors import InvalidRequest
from stages.models import load_spec
from stages.settings import AXES as SETTING_AXES
from stages.video_io import CODECS, is_interpolated

# Grid axes: every setting a sweep may vary (stages.settings.AXES), read as its type. A sweep holds the seed fixed.
AXES: dict[str, type] = {name: setting.kind for name, setting in SETTING_AXES.items()}
TRUE, FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")
SWEEP_TAG, CELL_TAG, CELL_ID_TAG = "framecast.sweep_id", "framecast.sweep_cell", "framecast.cell_id"
VIDEO_TAG = "framecast.video"  # where the cell's video was written


def parse_grid(texts: list[str]) -> dict[str, list]:
    """`["steps=30,40,50", "guidance=6,7.5"]` -> {"steps": [30, 40, 50], "guidance": [6.0, 7.5]}."""
    grid: dict[str, list] = {}
    for text in texts:
        axis, sep, listed = text.partition("=")
        axis = axis.strip().replace("-", "_")
        if not sep or not listed.strip():
            raise InvalidRequest(f"--grid {text!r}: expected AXIS=V1,V2,... e.g. steps=30,40,50")
        if axis not in AXES:
            raise InvalidRequest(f"--grid {text!r}: unknown axis {axis!r}; axes: {', '.join(AXES)}")
        if axis in grid:
            raise InvalidRequest(f"--grid {axis} is given twice; list all its values in one --grid")
        values = [_read_value(axis, v.strip(), text) for v in listed.split(",")]
        if len(set(values)) != len(values):
            raise InvalidRequest(f"--grid {text!r}: a value is repeated")
        grid[axis] = values
    return grid


def _read_value(axis: str, text: str, whole: str) -> Any:
    kind = AXES[axis]
    if kind is bool:
        if text.lower() not in TRUE + FALSE:
            raise InvalidRequest(f"--grid {whole!r}: {axis} values are true or false (got {text!r})")
        return text.lower() in TRUE
    try:
        return kind(text)
    except ValueError:
        raise InvalidRequest(f"--grid {whole!r}: {axis} values are {kind.__name__}s (got {text!r})") from None


@dataclass
class SweepPlan:
    """A validated sweep: its cells, their jobs (same order) and what was said about them."""

    model: str
    axes: dict[str, list]
    cells: list[Cell]
    jobs: list[Job]
    settings: Settings
    notes: list[str]  # e.g. how a duration became frames at each fps

    @property
    def seed(self) -> int:
        return self.jobs[0].request.seed  # every cell's

    @functools.cached_property
    def cell_ids(self) -> list[str]:
        """Per cell, what decides its video: model, weights, dtype and speed levers (compile and fp8
        change the rounding), request (and image), and the decode tiles (tiling changes the frames;
        how many decoders share the tiles does not)."""
        weights = weights_fingerprint(self.jobs[0].weights)  # one model, so one weights directory, per sweep
        ids = []
        for job in self.jobs:
            tiling = {k: v for k, v in job.decode_params().items() if k != "decoders"}
            request = job.request.as_dict()
            if job.image is not None:  # the picture itself, however its path was written
                request["image"] = job.image_sha256
            levers = {"dtype": job.spec.dtype, **job.spec.acceleration.as_params()}
            ids.append(_digest([self.model, weights, request, tiling, levers]))
        return ids

    @functools.cached_property
    def sweep_id(self) -> str:
        return _digest([self.model, str(self.jobs[0].weights), list(self.axes), self.cell_ids])

    def params(self) -> dict[str, str]:
        """The parent run's params: what every cell has alike, each axis's values, and the values
        of other fields that differ between cells (`derived.num_frames`: frames from a duration)."""
        swept = {REQUEST_FIELDS[a] for a in self.axes}
        seen: dict[str, list[str]] = {}
        for job in self.jobs:
            for key, value in job.request.as_dict().items():
                if key not in swept and str(value) not in seen.setdefault(key, []):
                    seen[key].append(str(value))
        fixed = {k: v[0] for k, v in seen.items() if len(v) == 1}
        fixed |= {f"derived.{k}": ",".join(v) for k, v in seen.items() if len(v) > 1}
        axes = {f"grid.{axis}": ",".join(str(v) for v in values) for axis, values in self.axes.items()}
        return {
            "model": self.model, **fixed, **axes, "cells": str(len(self.cells)),
            **self.settings.recorded_params(), "weights": str(self.jobs[0].weights),
        }  # fmt: skip


SAMPLED_BYTES = 1 << 20  # read from each end of every weights file


def weights_fingerprint(weights: Path) -> str:
    """What identifies a weights directory's contents: its path, and per file its name, size and a
    digest of its first and last MiB. The path alone is not enough: retraining a model
    (`make train-demo`) rewrites the same directory, and a sweep must not reuse videos of the old
    weights. Whole-file hashes would read tens of GB for a real model; the sampled ends differ
    whenever the tensors do (a safetensors file's first MiB holds its header and first tensors)."""
    weights = Path(weights)
    if not weights.is_dir():
        return str(weights)
    files = []
    for path in sorted(p for p in weights.rglob("*") if p.is_file() and ".cache" not in p.parts):
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            digest.update(handle.read(SAMPLED_BYTES))
            if size > 2 * SAMPLED_BYTES:
                handle.seek(-SAMPLED_BYTES, 2)
                digest.update(handle.read())
        files.append([path.relative_to(weights).as_posix(), size, digest.hexdigest()])
    return _digest([str(weights), files])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_sweep(
    model: str,
    prompt: str,
    grid: dict[str, list],
    settings: Settings,
    seed: int = 0,
    negative_prompt: str | None = None,
    image: str | None = None,
    **placement: Any,
) -> SweepPlan:
    """Every cell validated (before any model is loaded): `grid` on top of `settings` (the preset's
    ranges become axes unless the grid names them); `placement` as for `prepare_variants`."""
    spec = load_spec(model)
    axes = {**grid, **{k: v for k, v in settings.preset_grid.items() if k not in grid}}
    if not axes:
        raise InvalidRequest("nothing to sweep; give at least one --grid AXIS=V1,V2,... (or a preset with ranges)")
    cells = [Cell(tuple(zip(axes, values, strict=True))) for values in itertools.product(*axes.values())]
    notes = list(settings.notes)
    variants = []
    for cell in cells:
        overrides = dict(cell.values)
        if settings.duration is not None and "fps" in overrides:  # frames follow each cell's fps
            overrides["frames"], note = settings.frames_for(spec, overrides["fps"])
            notes += [note] if note not in notes else []
        kwargs = settings.request_kwargs(overrides)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        variants.append((settings.prompt(prompt), {**kwargs, "seed": seed, "image": image}))
    labels = [f"cell {cell.label}" for cell in cells]
    jobs = prepare_variants(model, variants, labels, **placement)
    for job in jobs:
        job.warnings = {**settings.warnings, **job.warnings}
    plan = SweepPlan(model, axes, cells, jobs, settings, notes)
    first: dict[str, Cell] = {}
    for index, cell in enumerate(cells):  # e.g. scheduler=ddim,CogVideoXDDIMScheduler
        same = first.setdefault(plan.cell_ids[index], cell)
        if same is not cell:
            raise InvalidRequest(f"cells {same.label} and {cell.label} are the same generation; list each value once")
    return plan


@dataclass
class SweepResult:
    sweep_id: str
    parent_run_id: str
    outcomes: list[CellOutcome]  # in grid order
    encodings: int  # prompt encodings made this time (one per distinct prompt and negative prompt)
    resumed: bool  # an earlier try of the same sweep was found and continued
    summary: dict[str, Path]  # name -> file, also on the parent run under summary/
    table: tuple[list[str], list[list[str]]]
    best: dict[str, tuple[CellOutcome, float]]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def as_json(self) -> dict:
        return {
            "sweep_id": self.sweep_id,
            "parent_run_id": self.parent_run_id,
            "resumed": self.resumed,
            "cells": len(self.outcomes),
            "ran": self.count("ran") + sum(self.count(status) for status in INCOMPLETE),
            "reused": self.count("reused"),
            "failed": self.count("failed"),
            "prompt_encodings": self.encodings,
            "summary": {name: str(path) for name, path in self.summary.items()},
            "best": {key: {"cell": o.cell.label, "value": json_figure(value)} for key, (o, value) in self.best.items()},
            "outcomes": [o.as_json() for o in self.outcomes],
        }


# (steps done, steps in all) over the cells being run
SweepProgress = Callable[[int, int], None]


def run_sweep(
    plan: SweepPlan,
    *,
    output_dir: Path,
    replicas: int | None = None,
    local: bool = False,
    pipelined: bool = True,
    experiment: str,
    tracking_uri: str | None = None,
    sheet_frame: int | None = None,
    on_progress: SweepProgress | None = None,
    on_cell: Callable[[CellOutcome], None] | None = None,
) -> SweepResult:
    """Run the cells not finished before, track each as a child run, and write the summary.

    The parent run is FINISHED when every cell has its video and figures, FAILED otherwise (a
    cell or the sweep failed: a rerun does the rest), KILLED if interrupted. A cell's video is
    written before its run is tracked; a cell whose run is not FINISHED is done again on a rerun.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    directory = output_dir.resolve() / f"sweep-{plan.model}-{plan.sweep_id}"
    directory.mkdir(parents=True, exist_ok=True)
    parent, resumed = open_parent_run(
        client, experiment, {SWEEP_TAG: plan.sweep_id, "framecast.kind": "sweep"}, plan.params(),
        run_name=f"sweep-{plan.model}-seed{plan.seed}",
    )  # fmt: skip
    encodings = 0
    try:
        paired = uncached_twins(plan)
        outcomes: dict[int, CellOutcome] = _finished_cells(client, parent, plan, directory, paired)
        todo = [i for i in range(len(plan.cells)) if i not in outcomes]
        if todo:
            twins = {cell: twin for cell, twin in paired.items() if cell in todo}
            earlier = _earlier_twins(twins, outcomes)
            for twin in set(twins.values()) - set(earlier) - set(todo):  # finished, but its frames are gone
                del outcomes[twin]
                todo.append(twin)
            for i in {*twins, *twins.values()} & set(todo):
                plan.jobs[i].keep_frames = True
            pool = sweep_replicas(plan, min(replicas or 1, len(todo)), local)
            try:
                cells = run_cells(plan, todo, directory, pool, pipelined, on_progress, later=set(twins.values()))
                finished = _keeping_twin_frames(cells, twins)
                for done in paired_with_uncached(finished, twins, lambda d: d.index, lambda d: d.result, earlier):
                    index = done.index
                    outcomes[index] = _track_cell(plan, index, done.result, done.replica, parent, experiment,
                                                  tracking_uri)  # fmt: skip
                    if on_cell is not None:
                        on_cell(outcomes[index])
            finally:
                pool.close()
            encodings = len({encoding_key(plan.jobs[i]) for i in todo})
        ordered = [outcomes[i] for i in range(len(plan.cells))]
        summary = _summarize(plan, ordered, directory, sheet_frame)
        best = sweep_report.best_cells(ordered)
        _record_summary(client, parent, ordered, summary, best)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        client.set_terminated(parent, RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
        raise
    complete = all(o.status in ("ran", "reused") for o in ordered)
    if complete:  # every cached cell compared: the twins' raw frames (50 MB a 480x720 video) are done with
        for twin in set(paired.values()):
            if ordered[twin].video:
                _twin_frames_file(ordered[twin].video).unlink(missing_ok=True)
    client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED if complete else RunStatus.FAILED))
    header_rows = sweep_report.table(plan.axes, ordered)
    return SweepResult(plan.sweep_id, parent, ordered, encodings, resumed, summary, header_rows, best)


def uncached_twins(plan: SweepPlan) -> dict[int, int]:
    """{cached cell: its uncached twin} where the grid has a cache axis with none: the twin is
    the cell with the same values but cache=none, the reference of what the cache cost."""
    nones = [value for value in plan.axes.get("cache", []) if str(value).strip().lower() == "none"]
    if not nones:
        return {}
    by_values = {cell.values: i for i, cell in enumerate(plan.cells)}
    twins = {}
    for i, cell in enumerate(plan.cells):
        if plan.jobs[i].request.cache != "none":
            twin = tuple((axis, nones[0] if axis == "cache" else value) for axis, value in cell.values)
            twins[i] = by_values[twin]
    return twins


def _twin_frames_file(video: Path) -> Path:
    """Where an uncached twin's frames as made are kept, for cached cells a later try runs."""
    return video.with_name(f"{video.stem}.frames.npy")


def _keeping_twin_frames(finished: Iterator[Finished], twins: dict[int, int]) -> Iterator[Finished]:
    for done in finished:
        frames = getattr(done.result, "frames", None)
        if done.index in twins.values() and frames is not None:
            np.save(_twin_frames_file(done.result.video), frames)
        yield done


def _earlier_twins(twins: dict[int, int], outcomes: dict[int, CellOutcome]) -> dict[int, Earlier]:
    """Twins an earlier try finished, with their kept frames (a twin without them leaves its
    cached cells without vs_uncached figures)."""
    earlier = {}
    for twin in set(twins.values()) & set(outcomes):
        path = outcomes[twin].video and _twin_frames_file(outcomes[twin].video)
        if path is not None and path.is_file():  # read as its cached cells need it, not all at once
            earlier[twin] = (np.load(path, mmap_mode="r"), outcomes[twin].metrics)
    return earlier


def _finished_cells(
    client: MlflowClient, parent: str, plan: SweepPlan, directory: Path, paired: dict[int, int]
) -> dict[int, CellOutcome]:
    """Cells an earlier try finished: a FINISHED child run with the video and clarity figures (and
    the interpolated copy's, when the cell asks for one; and what its cache cost, for a cell
    `paired` with an uncached twin, `uncached_twins`)."""
    by_id = {cell_id: i for i, cell_id in enumerate(plan.cell_ids)}
    found = {}
    for run in child_runs(client, parent):
        index = by_id.get(run.data.tags.get(CELL_ID_TAG))
        metrics = dict(run.data.metrics)
        if index is None or index in found or not any(k.startswith("clarity/") for k in metrics):
            continue
        if plan.jobs[index].request.interpolate_fps and not any(k.startswith("interp/") for k in metrics):
            continue
        if index in paired and "vs_uncached/psnr_y" not in metrics:
            continue
        video = _local_video(client, run, directory)
        if video is None:
            continue
        found[index] = CellOutcome(plan.cells[index], "reused", metrics, video, run.info.run_id,
                                   warnings=_warnings_of(run.data.tags))  # fmt: skip
    return found


def _local_video(client: MlflowClient, run, directory: Path) -> Path | None:
    """The cell's video on this machine: where it was written, else downloaded from the run."""
    written = run.data.tags.get(VIDEO_TAG)
    if written and Path(written).is_file():
        return Path(written)
    suffixes = tuple({codec.suffix for codec in CODECS.values()})
    results = [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(suffixes)]
    # the result: not pictures of it, nor its interpolated copy
    results = [p for p in results if not p.endswith((".sheet.png", ".input.png")) and not is_interpolated(Path(p))]
    if not results:
        return None
    return Path(client.download_artifacts(run.info.run_id, results[0], str(directory)))


def _warnings_of(tags: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix(WARNING_TAG): v for k, v in tags.items() if k.startswith(WARNING_TAG)}


def sweep_replicas(plan: SweepPlan, count: int, local: bool) -> ReplicaPool:
    """`count` pipeline replicas for the sweep's cells (`cluster.replicas`); only the first loads a
    text encoder, which encodes the prompt once for all of them (`run_cells`). A cell whose actor
    died goes back to the queue, up to 3 tries, as a batch's jobs do."""
    return pipeline_replicas(plan.jobs[0], count, local, encoder=lambda i: i == 0)


def run_cells(
    plan: SweepPlan,
    todo: list[int],
    directory: Path,
    pool: ReplicaPool,
    pipelined: bool = True,
    on_progress: SweepProgress | None = None,
    later: set[int] = frozenset(),
) -> Iterator[Finished]:
    """Run cells `todo` over `pool` (`sweep_replicas`), yielding each as it finishes. The prompt is
    encoded once for all of them. The longest cells (steps x frames x pixels x guidance branches)
    are queued first, so that the replicas finish together; of equal ones, those in `later` (the
    uncached twins, whose time is a cache's reference) after the others, so that a fresh
    replica's slower first job is not the reference's."""
    total, done, lock = sum(plan.jobs[i].request.steps for i in todo), {}, threading.Lock()

    def on_step(index: int, steps: int, _total: int) -> None:
        with lock:
            done[index] = steps
            if on_progress is not None:
                on_progress(sum(done.values()), total)

    first = pool.executors[0]
    # held by the driver's node: a lost first replica (and its node) takes no other cell's prompt with it
    encodings = {key: first.detach(call) for key, call in encode_once(first, [plan.jobs[i] for i in todo]).items()}
    longest_first = sorted(todo, key=lambda i: (-_cost(plan.jobs[i]), i in later))
    work = [Work(i, plan.jobs[i], directory / f"{plan.cells[i].file_stem}{plan.jobs[i].suffix}")
            for i in longest_first]  # fmt: skip
    yield from pool.run(work, on_step, pipelined, encodings)


def _cost(job: Job) -> float:
    r = job.request
    return r.steps * r.num_frames * r.height * r.width * (2 if r.do_classifier_free_guidance else 1)


def _track_cell(
    plan: SweepPlan, index: int, result, replica: int, parent: str, experiment: str, tracking_uri: str | None
) -> CellOutcome:
    """A cell's child run (after its video is written: a tracking failure loses no video)."""
    cell = plan.cells[index]
    if isinstance(result, JobFailed):
        return CellOutcome(cell, "failed", error=str(result.error))
    job = plan.jobs[index]
    tags = {
        SWEEP_TAG: plan.sweep_id,
        CELL_TAG: cell.label,
        CELL_ID_TAG: plan.cell_ids[index],
        VIDEO_TAG: str(result.video),
        "framecast.replica": str(replica),  # which of the sweep's pipeline replicas made it
        "framecast.frames_sha256": result.frames_sha256,
    }
    status = "unmeasured" if result.clarity_error else "uninterpolated" if result.interpolation_error else "ran"
    outcome = CellOutcome(cell, status, dict(result.metrics), result.video, warnings=result.warnings,
                          error=result.clarity_error or result.interpolation_error)  # fmt: skip
    try:
        outcome.run_id = log_generation(
            result, job, run_name=cell.label, experiment=experiment, tracking_uri=tracking_uri,
            params=plan.settings.recorded_params(), tags=tags, parent_run_id=parent,
        )  # fmt: skip
    except Exception as e:
        outcome.status, outcome.error = "untracked", f"tracking failed: {type(e).__name__}: {e}".splitlines()[0]
    return outcome


def _summarize(plan: SweepPlan, outcomes: list[CellOutcome], directory: Path, frame: int | None) -> dict[str, Path]:
    """The summary files, in `directory`/summary: table.csv, table.md, a heatmap per panel metric
    (clarity, and adherence where the model has it), and the side-by-side sheet of one frame of
    every cell."""
    out = directory / "summary"
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    header, rows = sweep_report.table(plan.axes, outcomes)
    files = {"table.csv": out / "table.csv", "table.md": out / "table.md"}
    files["table.csv"].write_text(sweep_report.table_csv(header, rows))
    files["table.md"].write_text(sweep_report.table_markdown(header, rows))
    for key in sweep_report.panel_keys(outcomes):
        name = sweep_report.file_name(key)
        files[f"heatmaps/{name}.png"] = sweep_report.heatmap(plan.axes, outcomes, key, out / "heatmaps" / f"{name}.png")
    index = sheet_frame_index(plan, frame)
    files["frames.png"] = sweep_report.frame_sheet(plan.axes, outcomes, index, out / "frames.png")
    return files


def sheet_frame_index(plan: SweepPlan, frame: int | None) -> int:
    """The frame shown for every cell: `frame`, or the middle of the shortest cell's video."""
    shortest = min(job.request.num_frames for job in plan.jobs)
    if frame is None:
        return shortest // 2
    if not 0 <= frame < shortest:
        raise InvalidRequest(
            f"--sheet-frame {frame} is out of range; the shortest cell has {shortest} frames (0..{shortest - 1})"
        )
    return frame


def _record_summary(client: MlflowClient, parent: str, outcomes, summary: dict[str, Path], best) -> None:
    """The summary files, the cell counts and the best cell per metric, on the parent run."""
    now = get_current_time_millis()
    counts = {status: sum(o.status == status for o in outcomes) for status in STATUSES}
    metrics = [Metric(f"cells_{status}", float(n), now, 0) for status, n in counts.items()]
    metrics += [Metric(f"best/{key}", float(value), now, 0) for key, (_, value) in best.items()]
    tags = [RunTag(f"framecast.best.{sweep_report.file_name(key)}", o.cell.label) for key, (o, _) in best.items()]
    warned = sorted({k for o in outcomes for k in o.warnings})
    tags += [RunTag(WARNING_TAG + k, _warning_line(k, outcomes)) for k in warned]
    client.log_batch(parent, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory() as scratch:  # log_artifacts keeps the summary/ layout
        for name, path in summary.items():
            target = Path(scratch) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
        client.log_artifacts(parent, scratch, "summary")


def _warning_line(key: str, outcomes: list[CellOutcome]) -> str:
    cells = [o for o in outcomes if key in o.warnings]
    return f"{len(cells)} of {len(outcomes)} cells: " + "; ".join(sorted({o.warnings[key] for o in cells}))
