"""A sweep's cells per second: one pipeline replica vs several, against stock diffusers.

    python bench/sweep.py [--grid steps=20,40 --grid guidance=6,9] [--replicas 1 2] [--repeats 3]

framecast: each replica count runs the whole grid through `run_cells` (the prompt encoded
once, the cells spread over the replicas, every video measured by the clarity panel), after the
replicas' actors have started; the start is timed apart. Stock diffusers: `CogVideoXPipeline` on
the same saved weights runs the cells one after another in this process (encoding the prompt
each time, as a plain loop over settings does) and writes each with `export_to_video`; it
measures nothing. Medians of `repeats` runs, alternating. Prints a markdown report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.driver import GenerationResult  # noqa: E402
from cluster.replicas import ReplicaPool  # noqa: E402
from cluster.runtime import connect, replicas_that_fit  # noqa: E402
from cluster.settings import resolve_settings  # noqa: E402
from cluster.sweep import parse_grid, plan_sweep, run_cells, sweep_replicas  # noqa: E402
from stages.models import load_spec  # noqa: E402

PROMPT = "a red fox running through fresh snow"


def framecast_seconds(plan, replicas: ReplicaPool, out: Path) -> float:
    start = time.perf_counter()
    results = [done.result for done in run_cells(plan, list(range(len(plan.cells))), out, replicas)]
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not isinstance(r, GenerationResult)]
    if failed:
        raise RuntimeError(f"a cell failed: {failed[0].error}")
    return elapsed


def stock_seconds(plan, out: Path) -> float:
    from diffusers import CogVideoXPipeline
    from diffusers.utils import export_to_video

    job = plan.jobs[0]
    pipe = CogVideoXPipeline.from_pretrained(job.weights, dtype=job.spec.torch_dtype())
    pipe.set_progress_bar_config(disable=True)

    def run(r, path: Path) -> None:
        frames = pipe(
            prompt=r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale, num_frames=r.num_frames, height=r.height, width=r.width,
            generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np",
        ).frames[0]  # fmt: skip
        export_to_video(list(frames), str(path), fps=r.fps)

    run(plan.jobs[0].request, out / "warm.mp4")
    start = time.perf_counter()
    for i, j in enumerate(plan.jobs):
        run(j.request, out / f"stock{i}.mp4")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--grid", action="append", default=None)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    grid = parse_grid(args.grid or ["steps=20,40", "guidance=6,9"])
    settings = resolve_settings(load_spec(args.model), {"frames": args.frames}, swept=frozenset(grid))
    plan = plan_sweep(args.model, PROMPT, grid, settings, seed=42)
    connect(quiet=True)
    fit = replicas_that_fit(workers=1)
    counts = [n for n in args.replicas if n <= fit]

    seconds: dict[str, list[float]] = {f"framecast, {n} replica(s)": [] for n in counts}
    seconds["stock diffusers, one by one"] = []
    starts = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        pools = {}
        for n in counts:
            begin = time.perf_counter()
            pools[n] = sweep_replicas(plan, n, local=False)
            starts[n] = time.perf_counter() - begin
            framecast_seconds(plan, pools[n], out)  # warm-up: first calls load kernels
            pools[n].close()
        for _ in range(args.repeats):
            for n in counts:
                pools[n] = sweep_replicas(plan, n, local=False)
                seconds[f"framecast, {n} replica(s)"].append(framecast_seconds(plan, pools[n], out))
                pools[n].close()
            seconds["stock diffusers, one by one"].append(stock_seconds(plan, out))

    cells = len(plan.cells)
    print(f"## Sweeps: cells per second (`bench/sweep.py`)\n\n{date.today()}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, CUDA: {torch.cuda.is_available()}. Model {args.model}, "
          f"grid {', '.join(f'{k}={v}' for k, v in plan.axes.items())} ({cells} cells), {args.frames} frames, "
          f"seed 42; medians of {args.repeats}.\n")  # fmt: skip
    print("| run | seconds for the grid | cells/s | replicas' start (s) |\n|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        start = next((f"{starts[n]:.1f}" for n in counts if name == f"framecast, {n} replica(s)"), "")
        print(f"| {name} | {median:.2f} | {cells / median:.2f} | {start} |")


if __name__ == "__main__":
    main()
