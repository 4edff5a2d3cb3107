"""Which settings give the clearest video, measured on framecast-shapes: one sweep per seed, then
the mean over seeds.

    python bench/shapes_sweep.py [--prompt P] [--seeds 4] [--grid steps=5,10,20,40 --grid guidance=1,3,6,9,12]
                                 [--out DIR] [--local]

Each seed is an ordinary `framecast sweep` (its parent and child runs in MLflow, experiment
`framecast-shapes-sweeps`, its own summary and heatmaps under DIR/sweep-*/summary). A sweep
holds its seed fixed, so this script runs one per seed and then averages each cell's figures
over the seeds: DIR/mean/heatmaps/<metric>.png (same colour rules as a sweep's, the best cell
outlined) and DIR/mean/table.md. Prints both tables (seed 0, and the mean) as markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cluster import sweep_report  # noqa: E402
from cluster.sweep import Cell, CellOutcome, parse_grid  # noqa: E402

SHOWN = ("clarity/sharpness_laplacian_var", "clarity/flicker_score", "clarity/warp_error", "adherence/score",
         "adherence/color", "adherence/shape", "adherence/direction")  # fmt: skip


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    command = [sys.executable, "-m", "cluster.cli", "sweep", "--model", "framecast-shapes", "--prompt", args.prompt,
               "--seed", str(seed), "--output-dir", str(args.out), "--experiment", "framecast-shapes-sweeps", "--json"]
    command += [flag for axis in args.grid for flag in ("--grid", axis)] + (["--local"] if args.local else [])
    print(" ".join(command[3:]), file=sys.stderr)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="a yellow triangle moving right on a black background")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--grid", action="append", default=None)
    parser.add_argument("--out", type=Path, default=Path("shapes-sweep"))
    parser.add_argument("--local", action="store_true", help="run every sweep in this process's stages, without Ray")
    args = parser.parse_args()
    args.grid = args.grid or ["steps=5,10,20,40", "guidance=1,3,6,9,12"]
    axes = parse_grid(args.grid)
    start = time.perf_counter()
    sweeps = [run_seed(args, seed) for seed in range(args.seeds)]
    seconds = time.perf_counter() - start

    by_cell: dict[tuple, list[dict]] = {}
    for sweep in sweeps:
        for o in sweep["outcomes"]:
            by_cell.setdefault(tuple(o["cell"].items()), []).append(o["metrics"])
    keys = [k for k in SHOWN if any(k in m for ms in by_cell.values() for m in ms)]
    mean = [
        CellOutcome(Cell(values), "ran", {k: float(np.mean([m[k] for m in ms if k in m])) for k in keys})
        for values, ms in by_cell.items()
    ]
    out = args.out / "mean"
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    for key in keys:
        sweep_report.heatmap(axes, mean, key, out / "heatmaps" / f"{sweep_report.file_name(key)}.png")
    header, rows = sweep_report.table(axes, mean)
    (out / "table.md").write_text(sweep_report.table_markdown(header, rows))

    print(f"framecast-shapes sweeps, {date.today()}: prompt {args.prompt!r}, grid {' x '.join(args.grid)}, "
          f"seeds 0-{args.seeds - 1}; {seconds:.0f} s for {sum(len(s['outcomes']) for s in sweeps)} videos\n")
    first = [CellOutcome(Cell(tuple(o["cell"].items())), o["status"], o["metrics"]) for o in sweeps[0]["outcomes"]]
    for title, outcomes in (("seed 0", first), (f"mean over {args.seeds} seeds", mean)):
        header, rows = sweep_report.table(axes, outcomes)
        shown = [i for i, h in enumerate(header) if h in axes or h in keys]
        print(f"### {title}\n")
        print(sweep_report.table_markdown([header[i] for i in shown], [[row[i] for i in shown] for row in rows]))
    print(f"seed 0's summary: {sweeps[0]['summary']['table.md']}; the mean: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
