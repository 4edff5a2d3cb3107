"""How well framecast-shapes follows its prompts: held-out prompts against prompts seen in training.

    python bench/shapes_adherence.py [--seeds 4] [--steps N] [--guidance G] [--scheduler ddim|dpm]
                                     [--weights DIR] [--out DIR]

Every prompt of `stages.shapes.HELD_OUT` (12, never shown in training) and 12 prompts seen in
training (every ninth of the others), at `--seeds` seeds each, at the model's default settings
unless given, through framecast's own stages in this process. Each video is measured by the
clarity panel as any framecast-shapes run is, and its `adherence/*` figures (the shapes
detector on the frames as made) are counted. Prints a markdown report with the colour, shape and
direction rates per group, and writes `adherence.json` and `adherence.png` (first, middle and
last frame of every video; a row per prompt, a column per seed; red text: a term missed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cluster.driver import GenerationResult, make_executor, prepare_variants, run_stream  # noqa: E402
from stages import shapes  # noqa: E402
from stages.video_io import DecodedVideo  # noqa: E402

TERMS = ("color", "shape", "direction")


def prompts() -> dict[str, list[str]]:
    seen = [s for s in shapes.all_scenes() if not s.held_out][::9]
    return {"held out": [shapes.Scene(*t).prompt for t in shapes.HELD_OUT], "seen": [s.prompt for s in seen]}


def picture(rows: list[list[tuple[np.ndarray, dict]]], path: Path) -> None:
    """A row per prompt, a column per seed: frames first, middle, last, and the missed terms."""
    tile, label = 64, 12
    frames_per_cell = 3
    width = len(rows[0]) * (frames_per_cell * tile + 4)
    sheet = Image.new("RGB", (width, len(rows) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, (rgb, adherence) in enumerate(row):
            x0, y0 = j * (frames_per_cell * tile + 4), i * (tile + label)
            for k, f in enumerate((0, len(rgb) // 2, len(rgb) - 1)):
                sheet.paste(Image.fromarray(rgb[f]).resize((tile, tile)), (x0 + k * tile, y0 + label))
            missed = [t for t in TERMS if adherence[t] < 1]
            draw.text((x0 + 2, y0), "ok" if not missed else "no " + ",".join(missed), fill="red" if missed else "green")
    sheet.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", default=None, help="one of the model's schedulers (default: its first)")
    parser.add_argument("--weights", default=None, help="a framecast-shapes directory (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("adherence"))
    args = parser.parse_args()
    settings = {
        k: v
        for k, v in (("steps", args.steps), ("guidance_scale", args.guidance), ("scheduler", args.scheduler))
        if v is not None
    }
    args.out.mkdir(parents=True, exist_ok=True)

    groups = prompts()
    variants = [(p, {**settings, "seed": s}) for group in groups.values() for p in group for s in range(args.seeds)]
    jobs = prepare_variants("framecast-shapes", variants, [None] * len(variants), weights=args.weights)
    executor = make_executor(jobs[0], local=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        outputs = [Path(scratch) / f"{i}.mp4" for i in range(len(jobs))]
        results = []
        for result in run_stream(jobs, executor, outputs):
            if not isinstance(result, GenerationResult):
                raise RuntimeError(f"job {result.index} failed: {result.error}")
            adherence = {k.removeprefix("adherence/"): v for k, v in result.metrics.items() if "adherence/" in k}
            rgb = DecodedVideo.read(result.video, planes=("rgb",)).rgb
            results.append((result.params["prompt"], int(result.params["seed"]), adherence, rgb))
            print(f"\r{len(results)}/{len(jobs)} videos", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    seconds = time.perf_counter() - start

    r = jobs[0].request
    report = {
        "date": date.today().isoformat(),
        "device": f"cpu ({platform.machine()})",
        "settings": {"steps": r.steps, "guidance_scale": r.guidance_scale, "scheduler": r.scheduler,
                     "seeds": args.seeds, "frames": r.num_frames, "size": f"{r.width}x{r.height}"},
        "seconds": round(seconds, 1),
        "groups": {},
        "videos": [{"prompt": p, "seed": s, **a} for p, s, a, _ in results],
    }  # fmt: skip
    print(f"framecast-shapes adherence, {report['date']}, {report['device']}: {r.steps} steps, guidance "
          f"{r.guidance_scale:g}, {r.scheduler}, seeds 0-{args.seeds - 1}\n")  # fmt: skip
    print("| prompts | videos | color | shape | direction | all three |")
    print("|---|---|---|---|---|---|")
    for name, group in groups.items():
        chosen = [a for p, _, a, _ in results if p in group]
        rates = {t: float(np.mean([a[t] for a in chosen])) for t in TERMS}
        rates["all"] = float(np.mean([all(a[t] == 1 for t in TERMS) for a in chosen]))
        report["groups"][name] = {"videos": len(chosen), **rates}
        print(f"| {name} ({len(group)}) | {len(chosen)} | {rates['color']:.0%} | {rates['shape']:.0%} | "
              f"{rates['direction']:.0%} | {rates['all']:.0%} |")  # fmt: skip
    (args.out / "adherence.json").write_text(json.dumps(report, indent=1) + "\n")
    held_out = groups["held out"]
    rows = [[(rgb, a) for p, _, a, rgb in results if p == prompt] for prompt in held_out]
    picture(rows, args.out / "adherence.png")
    print(f"\n{len(results)} videos in {seconds:.0f} s; {args.out / 'adherence.json'}, {args.out / 'adherence.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
