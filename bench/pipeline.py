"""Throughput of a stream of jobs, pipelined across the stages vs one job after another.

    python bench/pipeline.py [--jobs 4] [--steps 40] [--repeats 3] [--decoders 1 2]

For each decoder count, one Ray executor runs the same jobs both ways, alternately, `repeats`
times (after one warm-up job); the figures are medians. Stock diffusers' CogVideoXPipeline, on
the same saved weights and settings, runs the same prompts one after another in this process
and writes each video with `diffusers.utils.export_to_video`: the baseline measured in the same
run. It also reports, per job, the bytes each hand-over between stages moved, next to the least
that hand-over could move (each result to each process that needs it, once).

Prints a markdown report (for bench/RESULTS.md) and, with --json, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.driver import GenerationResult, prepare_jobs, run_stream  # noqa: E402
from cluster.executor import RayExecutor  # noqa: E402
from cluster.runtime import connect  # noqa: E402
from stages.families import family_for  # noqa: E402

PROMPTS = [
    "a red fox running through fresh snow",
    "a cat playing the piano in a jazz bar",
    "waves breaking on a beach at dusk",
    "a busy city street at night in the rain",
    "a hot air balloon over a desert canyon",
    "a paper boat drifting down a stream",
    "an astronaut walking on the moon",
    "a hummingbird hovering over a flower",
]


def stream_seconds(jobs, executor, out: Path, pipelined: bool) -> tuple[float, list[GenerationResult]]:
    start = time.perf_counter()
    outputs = [out / f"{'p' if pipelined else 's'}{i}.mp4" for i in range(len(jobs))]
    results = list(run_stream(jobs, executor, outputs, pipelined=pipelined))
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not isinstance(r, GenerationResult)]
    if failed:
        raise RuntimeError(f"a job failed: {failed[0].error}")
    return elapsed, results


def stock_seconds(jobs, out: Path) -> float:
    """Stock diffusers, one prompt after another, each video written to an MP4."""
    from diffusers import CogVideoXPipeline
    from diffusers.utils import export_to_video

    job = jobs[0]
    pipe = CogVideoXPipeline.from_pretrained(job.weights, dtype=job.spec.torch_dtype())
    pipe.set_progress_bar_config(disable=True)
    r = job.request

    def run(prompt: str, path: Path) -> None:
        frames = pipe(
            prompt=prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale, num_frames=r.num_frames, height=r.height, width=r.width,
            generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np",
        ).frames[0]  # fmt: skip
        export_to_video(list(frames), str(path), fps=r.fps)

    run(jobs[0].request.prompt, out / "warm.mp4")
    start = time.perf_counter()
    for i, j in enumerate(jobs):
        run(j.request.prompt, out / f"stock{i}.mp4")
    return time.perf_counter() - start


def least_bytes(job, result: GenerationResult) -> dict[str, float]:
    """What each hand-over must move at the least, from the sizes of the things themselves."""
    r, spec = job.request, job.spec
    dim = spec.components["text_encoder"].config["d_model"]
    branches = 2 if r.do_classifier_free_guidance else 1
    embeddings = branches * family_for(spec).max_text_tokens * dim * 4 * job.layout.world_size  # to every denoiser rank
    latent_frames = (r.num_frames - 1) // family_for(spec).vae_scale_temporal + 1
    channels = spec.components["transformer"].config["in_channels"]
    scale = family_for(spec).vae_scale_spatial
    latents = latent_frames * channels * (r.height // scale) * (r.width // scale) * 4 * job.decoders  # to each
    least = {"moved_bytes/prompt_embeddings": embeddings, "moved_bytes/latents": latents}
    if job.decoders == 1:
        least["moved_bytes/frames"] = r.num_frames * r.height * r.width * 3  # uint8, to the writer once
    else:  # each decoded tile (float32, with its overlap) to the driver once
        least["moved_bytes/tiles"] = sum(
            3 * r.num_frames * t.height * t.width * scale * scale * 4 for t in job.tiles.tiles
        )
    return least


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    connect(quiet=True)
    import ray

    prompts = (PROMPTS * (1 + args.jobs // len(PROMPTS)))[: args.jobs]
    out = Path(tempfile.mkdtemp(prefix="framecast-bench-"))
    cores = ray.cluster_resources().get("CPU", 0)
    device = f"CPU, {cores:.0f} cores ({platform.processor() or platform.machine()})"
    figures: dict = {"device": device, "date": date.today().isoformat(), "jobs": args.jobs, "steps": args.steps}
    figures["runs"] = {}
    for decoders in args.decoders:
        jobs = prepare_jobs("tiny", prompts, steps=args.steps, seed=0, decoders=decoders)
        executor = RayExecutor(jobs[0].spec, jobs[0].weights, decoders=decoders)
        try:
            stream_seconds(jobs[:1], executor, out, pipelined=False)  # warm-up: first calls load kernels
            times: dict[str, list[float]] = {"sequential": [], "pipelined": []}
            for _ in range(args.repeats):
                for mode in times:
                    seconds, results = stream_seconds(jobs, executor, out, pipelined=mode == "pipelined")
                    times[mode].append(seconds)
        finally:
            executor.close()
        median = {mode: statistics.median(t) for mode, t in times.items()}
        last = results[-1]
        figures["runs"][decoders] = {
            "seconds": times,
            "jobs_per_s": {mode: args.jobs / s for mode, s in median.items()},
            "speedup": median["sequential"] / median["pipelined"],
            "stage_s": {k: v for k, v in last.metrics.items() if k.endswith("_s")},
            "moved": {k: v for k, v in last.metrics.items() if k.startswith("moved_bytes/")},
            "least": least_bytes(jobs[-1], last),
        }
    stock = stock_seconds(prepare_jobs("tiny", prompts, steps=args.steps, seed=0), out)
    figures["stock_diffusers"] = {"seconds": stock, "jobs_per_s": args.jobs / stock}

    if args.json:
        print(json.dumps(figures, indent=2))
    print(report(figures))
    return 0


def report(f: dict) -> str:
    lines = [
        f"### Pipelined vs sequential: {f['jobs']} tiny-model jobs, {f['steps']} steps ({f['date']}, {f['device']})",
        "",
        "| decoders | sequential (jobs/s) | pipelined (jobs/s) | pipelined / sequential | stock diffusers, "
        "one by one (jobs/s) |",
        "|---|---|---|---|---|",
    ]
    stock = f["stock_diffusers"]["jobs_per_s"]
    for decoders, run in f["runs"].items():
        seq, pipe = run["jobs_per_s"]["sequential"], run["jobs_per_s"]["pipelined"]
        lines.append(f"| {decoders} | {seq:.2f} | {pipe:.2f} | **{run['speedup']:.2f}x** | {stock:.2f} |")
    lines += ["", "Bytes moved per job between stages (measured; least possible in brackets):", "",
              "| decoders | prompt embeddings | latents | tiles | frames |", "|---|---|---|---|---|"]  # fmt: skip
    for decoders, run in f["runs"].items():
        cells = []
        for what in ("prompt_embeddings", "latents", "tiles", "frames"):
            key = f"moved_bytes/{what}"
            moved, least = run["moved"].get(key), run["least"].get(key)
            cells.append("-" if moved is None else f"{moved:,.0f} ({least:,.0f})")
        lines.append(f"| {decoders} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
