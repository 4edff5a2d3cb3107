"""A batch's jobs per minute over 1 and 2 pipeline replicas, against stock diffusers one by one.

    python bench/batch.py [--jobs 16] [--model framecast-shapes] [--replicas 1 2]

framecast: `run_batch` (the batch command's own function) over a fresh output directory and
MLflow store for each replica count, after the replicas' actors have started (their start is
timed apart): every job written (H.264), measured by the clarity panel, given a manifest line and
an MLflow child run. The driver's own work per job (taking the frames and writing the video, then
tracking the run) is timed as well, since it is what one driver does for every replica. Stock
diffusers: the model's diffusers pipeline on the same weights makes the same jobs one after
another in this process and writes each with `export_to_video`; it measures and tracks nothing.
One run each (after a warm-up job). Prints a markdown report, with the throughput model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

import cluster.tracking as tracking  # noqa: E402
from cluster.batch import Manifest, prepare_batch, read_requests, run_batch  # noqa: E402
from cluster.replicas import pipeline_replicas  # noqa: E402
from cluster.runtime import connect, replicas_that_fit  # noqa: E402
from stages import shapes  # noqa: E402
from stages.families import family_for  # noqa: E402


def write_requests(path: Path, count: int) -> Path:
    scenes = shapes.all_scenes()
    lines = [json.dumps({"id": f"job{i}", "prompt": scenes[(7 * i) % len(scenes)].prompt, "seed": i})
             for i in range(count)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def framecast_run(model: str, requests_file: Path, replicas: int, scratch: Path) -> dict[str, float]:
    requests = read_requests(requests_file)
    jobs = prepare_batch(model, requests, requests_file.parent)
    begin = time.perf_counter()
    pool = pipeline_replicas(jobs[0], replicas, local=False)
    start_s = time.perf_counter() - begin
    tracked: list[float] = []
    real_log = tracking.log_generation

    def timed_log(*args, **kwargs):  # the driver's tracking of each job, timed
        t = time.perf_counter()
        try:
            return real_log(*args, **kwargs)
        finally:
            tracked.append(time.perf_counter() - t)

    out = scratch / f"out-{replicas}"
    uri = f"sqlite:///{scratch / f'mlflow-{replicas}.db'}"
    tracking.log_generation = timed_log
    try:
        warm = scratch / f"warm-{replicas}"  # first calls load kernels
        run_batch(requests[:replicas], jobs[:replicas], list(range(replicas)), pool, warm, Manifest(warm),
                  model=model, experiment="bench-batch-warm", tracking_uri=uri)  # fmt: skip
        tracked.clear()
        entries: list[dict] = []
        begin = time.perf_counter()
        counts, _ = run_batch(requests, jobs, list(range(len(jobs))), pool, out, Manifest(out), model=model,
                              experiment="bench-batch", tracking_uri=uri, on_entry=entries.append)  # fmt: skip
        seconds = time.perf_counter() - begin
    finally:
        tracking.log_generation = real_log
        pool.close()
    if counts.failed:
        raise RuntimeError(f"jobs failed: {counts.failed}")
    results = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    replicas_used = len({e["replica"] for e in results})
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("bench-batch").experiment_id],
                                         "tags.`framecast.batch` != ''")  # fmt: skip
    written = [r.data.metrics["write_s"] for r in runs if "write_s" in r.data.metrics]  # frames taken, video written
    return {"seconds": seconds, "start_s": start_s, "track_s": sum(tracked) / len(tracked),
            "write_s": sum(written) / len(written), "replicas_used": replicas_used}  # fmt: skip


def stock_run(model: str, requests_file: Path, scratch: Path) -> float:
    from diffusers.utils import export_to_video

    requests = read_requests(requests_file)
    jobs = prepare_batch(model, requests, requests_file.parent)
    module, name = jobs[0].spec.pipeline.rsplit(".", 1)
    pipeline_class = getattr(importlib.import_module(module), name)
    pipe = pipeline_class.from_pretrained(jobs[0].weights, dtype=jobs[0].spec.torch_dtype())
    pipe.set_progress_bar_config(disable=True)
    tokens = family_for(jobs[0].spec).max_text_tokens  # the prompt's length as the model was trained

    def run(r, path: Path) -> None:
        frames = pipe(
            prompt=r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale, num_frames=r.num_frames, height=r.height, width=r.width,
            generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np", max_sequence_length=tokens,
        ).frames[0]  # fmt: skip
        export_to_video(list(frames), str(path), fps=r.fps)

    run(jobs[0].request, scratch / "stock-warm.mp4")
    begin = time.perf_counter()
    for i, job in enumerate(jobs):
        run(job.request, scratch / f"stock{i}.mp4")
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="framecast-shapes")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    connect(quiet=True)
    fit = replicas_that_fit(workers=1)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        requests_file = write_requests(scratch / "requests.jsonl", args.jobs)
        runs = {n: framecast_run(args.model, requests_file, n, scratch) for n in args.replicas if n <= fit}
        stock = stock_run(args.model, requests_file, scratch)
        r = read_requests(requests_file)[0]
        job = prepare_batch(args.model, [r], requests_file.parent)[0].request

    n = args.jobs
    print(f"## Batches: jobs per minute over pipeline replicas (`bench/batch.py`)\n\n{date.today()}, "
          f"{platform.machine()}, {torch.get_num_threads()} torch threads, CUDA: {torch.cuda.is_available()}. "
          f"Model {args.model}, {n} jobs ({job.num_frames} frames at {job.height}x{job.width}, {job.steps} steps, "
          f"guidance {job.guidance_scale:g}), one run each after a warm-up job.\n")  # fmt: skip
    print("| run | seconds for the batch | jobs/min | s per job | overhead per job vs stock (s) | "
          "replicas' start (s) | driver: write per job (s) | driver: track per job (s) |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    for count, f in runs.items():
        per_job = f["seconds"] / n
        print(f"| framecast, {count} replica(s) ({f['replicas_used']} used) | {f['seconds']:.1f} | "
              f"{60 * n / f['seconds']:.1f} | {per_job:.2f} | {per_job - stock / n:+.2f} | {f['start_s']:.1f} | "
              f"{f['write_s']:.3f} | {f['track_s']:.3f} |")  # fmt: skip
    print(f"| stock diffusers, one by one | {stock:.1f} | {60 * n / stock:.1f} | {stock / n:.2f} | | | | |")


if __name__ == "__main__":
    main()
