"""What starting a stage costs in CPU: each stage of a model built in a fresh process, as a stage
actor builds it (`StageActor.start`), plainly and with Python's cyclic collector paused
(`cluster.actors.build_without_gc`), alternately, several times each.

    python bench/stage_build.py --model tiny --repeats 5

A build is mostly imports (diffusers, transformers): a process's first build is what a stage
actor's start costs beyond importing torch and Ray, which every process pays before it. The
figure is the build's CPU time (user + system) in that process; medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import json, resource, sys
import numpy, ray, torch  # what an actor has imported before its stage's build
import cluster.actors
from stages.decoder import DecoderStage
from stages.denoiser import DenoiserStage
from stages.encoder import EncoderStage
from stages.models import load_spec
from stages.weights import resolve_weights

model, stage, paused = sys.argv[1], sys.argv[2], sys.argv[3] == "paused"
stage_class = {"encode": EncoderStage, "denoise": DenoiserStage, "decode": DecoderStage}[stage]
spec = load_spec(model)
weights = resolve_weights(spec)

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

start = cpu()
if paused:
    cluster.actors.build_without_gc(stage_class, spec, weights)
else:
    stage_class(spec, weights)
print(json.dumps({"cpu_s": cpu() - start}))
"""


def build_cpu(model: str, stage: str, mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", BUILD, model, stage, mode], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["cpu_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    build_cpu(args.model, "denoise", "plain")  # builds the model's weights if it has none yet
    rows = []
    for stage in ("encode", "denoise", "decode"):
        figures: dict[str, list[float]] = {"plain": [], "paused": []}
        for _ in range(args.repeats):
            for mode in figures:  # alternately, so that a slow moment of the machine hits both
                figures[mode].append(build_cpu(args.model, stage, mode))
                print(f"{stage} {mode}: {figures[mode][-1]:.2f} s", file=sys.stderr)
        plain, paused = (statistics.median(figures[m]) for m in ("plain", "paused"))
        rows.append(f"| {stage} | {plain:.2f} | {paused:.2f} | {plain - paused:.2f} ({1 - paused / plain:.0%}) |")

    print(f"{date.today()}, {platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
          f"model {args.model}; medians of {args.repeats}, CPU seconds of one build in a fresh process.\n")  # fmt: skip
    print("| stage | plain | collector paused | saved |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
