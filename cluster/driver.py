"""The driver: one generation, top to bottom.

    request -> encode -> denoise -> decode -> write MP4 -> measure -> (caller) track

Validation happens first, before any model is loaded. The driver knows which stage runs which
step and nothing of devices or model internals; the executor decides where stages run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import yaml

from cluster.executor import LocalExecutor, RayExecutor, StageFailed
from cluster.runtime import STAGES, ClusterLayout, load_cluster_layout
from stages.clarity import clarity_summary
from stages.context_parallel import ParallelLayout
from stages.denoiser import StepCallback, plan_layout
from stages.errors import InvalidRequest
from stages.models import ModelSpec, load_spec, resolve_weights
from stages.request import GenerationRequest, build_request
from stages.text_encoder import check_prompts, load_tokenizer
from stages.video_io import contact_sheet, write_mp4


@dataclass
class Job:
    """A validated generation: the model, its weights, the filled-in request and where it runs."""

    spec: ModelSpec
    weights: Path
    request: GenerationRequest
    layout: ParallelLayout = ParallelLayout()
    cluster: ClusterLayout = ClusterLayout("single-node")

    def resolved_config(self) -> str:
        """YAML of what this run used: the model spec as loaded, the weights found, the filled-in request."""
        resolved = {
            "model": self.spec.as_dict(),
            "weights": str(self.weights),
            "request": self.request.as_dict(),
            "parallel": self.layout.as_params(),
            "cluster": asdict(self.cluster),
        }
        return yaml.safe_dump(resolved, sort_keys=False)


@dataclass
class GenerationResult:
    video: Path
    contact_sheet: Path
    params: dict[str, str]
    metrics: dict[str, float]
    stages: dict[str, list[float]]  # stage -> [start, end], wall-clock seconds since the epoch
    run_id: str | None = None
    tracking_error: str | None = None

    def as_json(self) -> dict:
        return {
            "video": str(self.video),
            "contact_sheet": str(self.contact_sheet),
            "run_id": self.run_id,
            "tracking_error": self.tracking_error,
            "params": self.params,
            "metrics": self.metrics,
            "stages": self.stages,
        }


def prepare(
    model: str,
    prompt: str,
    weights: str | None = None,
    workers: int | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    cfg_parallel: bool = False,
    cluster: str = "single-node",
    local: bool = False,
    **settings,
) -> Job:
    """Everything that can be checked before heavy work: model, settings, layout, weights, prompt length."""
    spec = load_spec(model)
    request = build_request(spec, prompt, **settings)
    layout = plan_layout(spec, request, workers, ulysses, ring, cfg_parallel)
    if local and layout.world_size > 1:
        raise InvalidRequest(f"--local runs in one process; the layout {layout} needs {layout.world_size} Ray actors")
    cluster_layout = load_cluster_layout(cluster)
    weights_dir = resolve_weights(spec, weights)
    tokenizer = load_tokenizer(spec, weights_dir)
    check_prompts(tokenizer, spec, request.prompt, request.negative_prompt, request.do_classifier_free_guidance)
    return Job(spec, weights_dir, request, layout, cluster_layout)


def make_executor(job: Job, local: bool) -> LocalExecutor | RayExecutor:
    if local:
        return LocalExecutor(job.spec, job.weights)
    return RayExecutor(job.spec, job.weights, job.layout, job.cluster)


def default_output(job: Job) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / f"{job.spec.name}-{stamp}-seed{job.request.seed}.mp4"


def generate(
    job: Job,
    executor: LocalExecutor | RayExecutor,
    output: Path,
    on_step: StepCallback | None = None,
) -> GenerationResult:
    r = job.request
    start = time.time()
    encoded = executor.call("encode", "encode", r.prompt, r.negative_prompt, r.do_classifier_free_guidance)
    denoised = executor.call("denoise", "denoise", encoded.value, r, on_step=on_step)
    decoded = executor.call("decode", "decode", denoised.value)
    spans = {}
    for stage, call in zip(STAGES, (encoded, denoised, decoded), strict=True):
        try:  # in stage order, so that a failure is blamed on the stage where it began
            spans[stage] = list(executor.get(call.span))
        except Exception as e:
            raise StageFailed(stage, e) from e
    frames = executor.get(decoded.value)

    video = write_mp4(frames, output, fps=r.fps)  # first: nothing after this may lose the video
    sheet = video.with_suffix(".sheet.png")
    contact_sheet(frames).save(sheet)
    total_s = time.time() - start
    ranks = executor.rank_stats()

    seconds = {f"{stage}_s": end - begin for stage, (begin, end) in spans.items()}  # encode_s, denoise_s, ...
    metrics = {
        **seconds,
        "total_s": total_s,
        "s_per_step": seconds["denoise_s"] / r.steps,
        "denoise_peak_mib": max(rank["peak_memory_mib"] for rank in ranks),
        **{f"denoise_rank{i}_peak_mib": rank["peak_memory_mib"] for i, rank in enumerate(ranks)},
        **{f"denoise_rank{i}_video_tokens": rank["video_tokens"] for i, rank in enumerate(ranks)},
        **clarity_summary(frames),
    }
    params = {
        "model": job.spec.name,
        **{k: str(v) for k, v in r.as_dict().items()},
        "scheduler": job.spec.components["scheduler"].class_path.rsplit(".", 1)[-1],
        "dtype": job.spec.dtype,
        "executor": executor.name,
        **job.layout.as_params(),
        "cluster_layout": job.cluster.name,
        **{f"device_{stage}": device for stage, device in executor.devices().items()},
        "weights": str(job.weights),
    }
    return GenerationResult(video=video, contact_sheet=sheet, params=params, metrics=metrics, stages=spans)
