"""The Videos API under a bounded load: requests per minute and latency percentiles.

    python bench/serve.py [--requests 24] [--concurrency 4] [--steps 10] [--port 8765]

The server is `framecast serve` in a process of its own (its own Ray, the tiny model); this
process is the load: `concurrency` clients on loopback, each submitting a video, polling it until
it is completed (every 50 ms), then submitting the next, until `requests` are done. Latency is
submit -> completed as a client sees it; requests per minute are completed videos over the wall
time from the first submission to the last completion. A 429 is counted and retried after its
Retry-After. Then, with the server stopped, stock diffusers makes the same videos one after
another in this process (`CogVideoXPipeline` on the same saved weights, `export_to_video`),
which has no queue, no HTTP and measures nothing. Prints a markdown report.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "a red fox running through fresh snow"


def start_server(port: int, data: Path, runners: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--data-dir", str(data),
               "--max-queue", "64", "--runners", str(runners)]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=data)
    for line in server.stderr:
        if "framecast: serving" in line:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return server
    raise RuntimeError(f"framecast serve exited with {server.wait()}")


def one_request(base: str, body: dict, refused: list[int], stages: list[dict] | None = None) -> float:
    """Submit, wait until completed; the latency in seconds (and the video's stage timings)."""
    start = time.perf_counter()  # waits after a 429 count
    while True:
        response = requests.post(f"{base}/v1/videos", json=body, timeout=60)
        if response.status_code != 429:
            break
        refused.append(1)
        time.sleep(int(response.headers["retry-after"]))
    response.raise_for_status()
    video_id = response.json()["id"]
    while True:
        video = requests.get(f"{base}/v1/videos/{video_id}", timeout=60).json()
        if video["status"] == "completed":
            latency = time.perf_counter() - start
            if stages is not None:
                stages.append(video["timings"])
            return latency
        if video["status"] == "failed":
            raise RuntimeError(f"{video_id} failed: {video['error']}")
        time.sleep(0.05)


def load(base: str, total: int, concurrency: int, steps: int) -> tuple[list[float], float, int, list[dict]]:
    latencies, refused, stages, lock = [], [], [], threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        for n in counter:  # shared: each request number is taken once
            latency = one_request(base, {"prompt": PROMPT, "steps": steps, "seed": n}, refused, stages)
            with lock:
                latencies.append(latency)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start, len(refused), stages


def stock_run(total: int, steps: int, out: Path) -> tuple[list[float], float]:
    import torch
    from diffusers import CogVideoXPipeline
    from diffusers.utils import export_to_video

    from stages.models import load_spec
    from stages.weights import resolve_weights

    spec = load_spec("tiny")
    pipe = CogVideoXPipeline.from_pretrained(resolve_weights(spec), dtype=spec.torch_dtype())
    pipe.set_progress_bar_config(disable=True)
    d = spec.defaults
    latencies, start = [], time.perf_counter()
    for n in range(total):
        begin = time.perf_counter()
        frames = pipe(
            prompt=PROMPT, num_inference_steps=steps, guidance_scale=d.guidance_scale, num_frames=d.num_frames,
            height=d.height, width=d.width, generator=torch.Generator("cpu").manual_seed(n), output_type="np",
        ).frames[0]  # fmt: skip
        export_to_video(list(frames), str(out / f"stock-{n}.mp4"), fps=d.fps)
        latencies.append(time.perf_counter() - begin)
    return latencies, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, latencies: list[float], seconds: float, refused: int | str) -> str:
    per_minute = 60 * len(latencies) / seconds
    p50, p90, p99 = (percentile(latencies, q) for q in (50, 90, 99))
    return f"| {name} | {len(latencies)} | {per_minute:.1f} | {p50:.2f} | {p90:.2f} | {p99:.2f} | {refused} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with tempfile.TemporaryDirectory(prefix="framecast-bench-serve-") as scratch:
        data = Path(scratch)
        began = time.perf_counter()
        server = start_server(args.port, data, args.runners)
        started = time.perf_counter() - began
        base = f"http://127.0.0.1:{args.port}"
        try:
            one_request(base, {"prompt": PROMPT, "steps": args.steps}, [])  # warm: first-call imports
            latencies, seconds, refused, stages = load(base, args.requests, args.concurrency, args.steps)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)
        stock_latencies, stock_s = stock_run(args.requests, args.steps, data)
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, torch CPU; "
          f"server start {started:.1f} s; {args.requests} requests, {args.concurrency} clients, "
          f"{args.steps} steps, tiny defaults (9 frames 64x96), runners {args.runners}\n")  # fmt: skip
    print("| run | videos | requests/min | p50 latency (s) | p90 (s) | p99 (s) | 429s |")
    print("|---|---|---|---|---|---|---|")
    print(row(f"framecast serve, {args.concurrency} clients", latencies, seconds, refused))
    print(row("stock diffusers, one after another", stock_latencies, stock_s, "n/a"))
    keys = ("encode_s", "denoise_s", "decode_s", "write_s", "measure_s", "total_s")
    means = {k: statistics.mean(t[k] for t in stages) for k in keys}
    print("\nframecast, mean seconds per video in each stage (total_s: submitted to the runner -> written):\n")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    print("| " + " | ".join(f"{means[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
