"""`framecast tune-cache`: the fastest step cache that keeps a video close to uncached, measured.

For each prompt and seed it runs one sweep over the cache specs a model's family takes and none
(`cluster.sweep`: each cached cell records what it cost against its uncached twin). Then, per
spec, over every prompt and seed:

    worst vs_uncached/psnr_y     the bound applies to the worst video, not the mean
    mean vs_uncached/ssim_y
    mean vs_uncached/denoise_speedup
    mean cache/skipped_fraction
    change of adherence/score: mean, and how many videos' score fell (models whose videos are
    checked against their prompts)

The answer is the spec with the highest mean speedup whose worst PSNR is at least `min_psnr`
and under which no video's adherence drops; or none, said so, when no spec meets both. The
sweeps run a cached cell before its uncached twin of the same cost, so that a fresh process's
first, slower job (kernels chosen, memory pools grown) understates a cache's speedup rather than
overstating it. It is recorded
as a parent MLflow run (tag framecast.kind=tune-cache, the table as tune.md and tune.csv, the
answer as tag framecast.tuned_cache), which `framecast recommend` shows for the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from cluster.settings import Settings
from cluster.sweep import SweepResult, plan_sweep, run_sweep
from cluster.tracking import log_run, search_all_runs, searched_experiments
from stages.cache import cache_kinds, parse_cache, tuning_specs
from stages.errors import InvalidRequest
from stages.models import ModelSpec

KIND_TAG, TUNED_TAG = "framecast.kind", "framecast.tuned_cache"


def candidate_specs(spec: ModelSpec, asked: Sequence[str] | None = None) -> list[str]:
    """The specs to try: `asked` (checked, in their one spelling, none refused: it is always the
    reference), or every kind the model takes over `stages.cache.TUNING_GRID`."""
    if asked is None:
        return tuning_specs(spec)
    specs = [str(parse_cache(text, cache_kinds(spec), spec.name)) for text in asked]
    if not specs:
        raise InvalidRequest("--specs names no cache spec; give e.g. --specs fbc:0.1,taylorseer:2")
    if "none" in specs:
        raise InvalidRequest("tune-cache compares every spec with none itself: leave none out of --specs")
    return list(dict.fromkeys(specs))


@dataclass(frozen=True)
class SpecFigures:
    """One spec's figures over every prompt and seed tried."""

    cache: str
    videos: int
    worst_psnr_y: float
    mean_ssim_y: float
    speedup: float
    skipped_fraction: float
    adherence_change: float | None  # mean; None: the model's videos are not checked against prompts
    adherence_lowered: int  # videos whose adherence score is lower than uncached

    def meets(self, min_psnr: float) -> bool:
        """Every video at `min_psnr` dB or more, and no video's adherence lower."""
        return self.worst_psnr_y >= min_psnr and not self.adherence_lowered


def figures_by_spec(metrics_by_cell: Sequence[tuple[str, dict[str, float]]]) -> list[SpecFigures]:
    """(cache spec, a cached cell's metrics) over every sweep -> one SpecFigures per spec, in
    first-seen order. A cell without its vs_uncached figures counts as failing the bound."""
    grouped: dict[str, list[dict[str, float]]] = {}
    for cache, metrics in metrics_by_cell:
        grouped.setdefault(cache, []).append(metrics)
    out = []
    for cache, cells in grouped.items():
        psnrs = [m.get("vs_uncached/psnr_y", -math.inf) for m in cells]
        adherence = [m["vs_uncached/delta/adherence/score"] for m in cells if "vs_uncached/delta/adherence/score" in m]
        out.append(SpecFigures(
            cache=cache,
            videos=len(cells),
            worst_psnr_y=min(psnrs),
            mean_ssim_y=_mean([m.get("vs_uncached/ssim_y", math.nan) for m in cells]),
            speedup=_mean([m.get("vs_uncached/denoise_speedup", math.nan) for m in cells]),
            skipped_fraction=_mean([m.get("cache/skipped_fraction", math.nan) for m in cells]),
            adherence_change=_mean(adherence) if adherence else None,
            adherence_lowered=sum(change < -1e-9 for change in adherence),
        ))  # fmt: skip
    return out


def choose(figures: Sequence[SpecFigures], min_psnr: float) -> SpecFigures | None:
    """The fastest spec that meets the bound (see `SpecFigures.meets`), or None."""
    meeting = [f for f in figures if f.meets(min_psnr) and not math.isnan(f.speedup)]
    return max(meeting, key=lambda f: f.speedup, default=None)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass
class TuneResult:
    figures: list[SpecFigures]
    chosen: SpecFigures | None
    min_psnr: float
    run_id: str
    sweeps: list[str]  # the sweeps' parent runs

    def table(self) -> str:
        """The figures as a markdown table, the chosen spec marked."""
        lines = ["| cache | videos | worst PSNR-Y dB | mean SSIM-Y | speedup | skipped | adherence change "
                 "(videos lower) | meets |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for f in sorted(self.figures, key=lambda f: -f.speedup if not math.isnan(f.speedup) else math.inf):
            mark = "chosen" if f is self.chosen else "yes" if f.meets(self.min_psnr) else "no"
            change = "n/a" if f.adherence_change is None else f"{f.adherence_change:+.3f} ({f.adherence_lowered})"
            lines.append(f"| {f.cache} | {f.videos} | {f.worst_psnr_y:.2f} | {f.mean_ssim_y:.4f} | {f.speedup:.2f}x | "
                         f"{f.skipped_fraction:.2f} | {change} | {mark} |")  # fmt: skip
        return "\n".join(lines) + "\n"

    def answer(self) -> str:
        if self.chosen is None:
            best = max(self.figures, key=lambda f: f.worst_psnr_y, default=None)
            closest = f"; the closest, {best.cache}, reached {best.worst_psnr_y:.2f} dB" if best else ""
            return f"no cache keeps every video at {self.min_psnr:g} dB or more with adherence kept{closest}: use none"
        c = self.chosen
        return (f"{c.cache}: {c.speedup:.2f}x faster denoising, worst PSNR-Y {c.worst_psnr_y:.2f} dB against "
                f"uncached (bound {self.min_psnr:g} dB), mean SSIM-Y {c.mean_ssim_y:.4f}")  # fmt: skip


def tune_cache(
    spec: ModelSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    min_psnr: float,
    settings: Settings,
    *,
    specs: Sequence[str] | None = None,
    output_dir: Path,
    experiment: str,
    tracking_uri: str | None = None,
    replicas: int | Callable[[int], int] = 1,
    on_sweep: Callable[[int, int, SweepResult], None] | None = None,
    negative_prompt: str | None = None,
    image: str | None = None,
    **placement: Any,
) -> TuneResult:
    """Every sweep planned (and so every spec checked) before any runs; then run, summarized and
    recorded. `replicas`: how many pipelines, or a function of the planned denoiser group's ranks
    that says (the CLI's, which fits them to the cluster). `negative_prompt`, `image` and
    `placement` as for `plan_sweep` (with `local`); `on_sweep(done, total, result)` after each sweep."""
    specs = candidate_specs(spec, specs)
    if not specs:
        raise InvalidRequest(f"{spec.name} takes no step cache (its family's denoiser has none in diffusers)")
    grid = {"cache": ["none", *specs]}
    plans = [plan_sweep(spec.name, prompt, grid, settings, seed=seed, negative_prompt=negative_prompt, image=image,
                        **placement)
             for prompt in prompts for seed in seeds]  # fmt: skip
    if callable(replicas):
        replicas = replicas(plans[0].jobs[0].layout.world_size)
    cells, sweeps = [], []
    for done, plan in enumerate(plans, 1):
        result = run_sweep(plan, output_dir=output_dir, replicas=replicas, local=bool(placement.get("local")),
                           experiment=experiment,
                           tracking_uri=tracking_uri)  # fmt: skip
        sweeps.append(result.parent_run_id)
        for job, outcome in zip(plan.jobs, result.outcomes, strict=True):
            if job.request.cache != "none":
                cells.append((job.request.cache, outcome.metrics))
        if on_sweep is not None:
            on_sweep(done, len(plans), result)
    figures = figures_by_spec(cells)
    chosen = choose(figures, min_psnr)
    result = TuneResult(figures, chosen, min_psnr, "", sweeps)
    result.run_id = _record(result, spec, prompts, seeds, plans[0].jobs[0].request.steps, experiment, tracking_uri)
    return result


def _record(result: TuneResult, spec: ModelSpec, prompts, seeds, steps: int, experiment: str, uri) -> str:
    params = {"model": spec.name, "min_psnr_y": f"{result.min_psnr:g}", "prompts": " | ".join(prompts)[:6000],
              "seeds": ",".join(map(str, seeds)), "steps": str(steps),
              "specs": ",".join(f.cache for f in result.figures), "sweeps": ",".join(result.sweeps)}  # fmt: skip
    chosen = asdict(result.chosen) if result.chosen is not None else {}
    metrics = {f"tuned/{key}": value for key, value in chosen.items() if isinstance(value, float)}
    rows = [",".join(map(str, asdict(f).values())) for f in result.figures]
    texts = {"tune.md": f"{result.answer()}\n\n{result.table()}",
             "tune.csv": ",".join(SpecFigures.__dataclass_fields__) + "\n" + "\n".join(rows) + "\n"}  # fmt: skip
    run_id = log_run(params=params, metrics=metrics, artifacts=[], texts=texts, kind="tune-cache",
                     tags={TUNED_TAG: result.chosen.cache if result.chosen else "none"}, experiment=experiment,
                     tracking_uri=uri, run_name=f"tune-cache-{spec.name}")  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    for sweep in result.sweeps:  # nested under this run in MLflow (a rerun's tune run takes them over)
        client.set_tag(sweep, MLFLOW_PARENT_RUN_ID, run_id)
    return run_id


def tuned_cache(spec: ModelSpec, experiment: str | None, tracking_uri: str | None) -> dict[str, Any] | None:
    """The latest finished tune-cache run of the model: its answer and figures, or None."""
    client = MlflowClient(tracking_uri=tracking_uri)
    ids = searched_experiments(client, experiment)
    query = f"tags.`{KIND_TAG}` = 'tune-cache' and params.model = '{spec.name}' and attributes.status = 'FINISHED'"
    runs = sorted(search_all_runs(client, ids, query), key=lambda r: r.info.start_time, reverse=True)
    if not runs:
        return None
    run = runs[0]
    figures = {k.removeprefix("tuned/"): v for k, v in run.data.metrics.items() if k.startswith("tuned/")}
    return {"cache": run.data.tags.get(TUNED_TAG, "none"), "run_id": run.info.run_id,
            "min_psnr_y": float(run.data.params["min_psnr_y"]), **figures}  # fmt: skip
