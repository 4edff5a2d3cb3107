"""Step caching on framecast-shapes: denoising speedup against what it costs the frames and the prompt.

    python bench/cache.py [--prompts P ...] [--seeds 2] [--steps N] [--repeats 3] [--threads T]
                          [--grid fbc:0.2,fbc:0.3,...] [--out outputs/bench-cache]

Every prompt (default: four sentences of the shapes grammar, varied in colour, shape, direction and
background) at seeds 0..`--seeds`-1, at the model's default settings (20 steps), through framecast's
own stages in this process on the CPU: encoded once per prompt, then denoised uncached and with each
cache spec of the grid (`stages.cache`), and decoded. Only the `denoise` call is timed
(`time.perf_counter`), after one untimed warm-up run of every spec; each video's timing is the
median of `--repeats` runs, the specs taken in turn within each repeat so that a change in the
machine's speed falls on all of them alike. The baseline is uncached framecast denoising measured in
the same run: a spec's speedup on a video is uncached denoise seconds / its denoise seconds, and the
table gives the median over videos.

Each cached video is compared with the uncached one of the same prompt and seed by
`stages.clarity.fidelity`: PSNR on the luma plane (BT.601, as `stages.video_io.luma`; the PSNR of
the mean squared error over frames, as ffmpeg and the clarity panel compute psnr_y), worst and
mean over videos; SSIM on luma (mean over frames, then over videos); and the shapes detector's
adherence score (`stages.shapes.adherence`), mean over videos and its change against uncached.

Goal: >= 1.5x denoising speedup at >= 30 dB worst PSNR-Y with adherence unchanged (every video's
score equal to its uncached one). Prints a markdown report and the specs meeting it; writes
`table.md`, `cache.json` (every figure, per video too) and, when matplotlib is importable,
`cache.png` (speedup against worst PSNR-Y) under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages import clarity, shapes  # noqa: E402
from stages.cache import skipped_fraction  # noqa: E402
from stages.decoder import DecoderStage  # noqa: E402
from stages.denoiser import DenoiserStage  # noqa: E402
from stages.encoder import EncoderStage  # noqa: E402
from stages.models import load_spec  # noqa: E402
from stages.request import build_request  # noqa: E402
from stages.weights import resolve_weights  # noqa: E402

MODEL = "framecast-shapes"
PROMPTS = (
    "a red circle moving left on a black background",
    "a blue square moving up on a gray background",
    "a green triangle moving right on a black background",
    "a white circle moving down on a gray background",
)
GRID = "fbc:0.2,fbc:0.3,fbc:0.4,fbc:0.5,pab:2,pab:3,taylorseer:2,taylorseer:3,taylorseer:4"
GOAL_SPEEDUP, GOAL_PSNR = 1.5, 30.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def figure(v: float) -> float | str | None:
    return clarity.json_figure(float(v))


def scatter(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cached = [r for r in rows if r["spec"] != "none"]
    finite = [r["psnr_worst"] for r in cached if math.isfinite(r["psnr_worst"])]
    top = max([GOAL_PSNR + 10, *finite]) + 5
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in cached:
        y = r["psnr_worst"] if math.isfinite(r["psnr_worst"]) else top
        colour = "tab:green" if r["meets_goal"] else "tab:red"
        ax.scatter(r["speedup"], y, color=colour)
        label = r["spec"] if math.isfinite(r["psnr_worst"]) else f"{r['spec']} (identical)"
        ax.annotate(label, (r["speedup"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(GOAL_SPEEDUP, color="gray", linestyle="--", linewidth=1)
    ax.axhline(GOAL_PSNR, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("denoising speedup vs uncached (median)")
    ax.set_ylabel("worst PSNR-Y vs uncached (dB)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(left=min(0.9, *(r["speedup"] for r in cached)) - 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), help="sentences of the shapes grammar")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed denoise runs per video and spec (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--grid", default=GRID, help="comma-separated cache specs (uncached is always run)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-cache"))
    args = parser.parse_args()
    for p in args.prompts:
        if shapes.parse_prompt(p) is None:
            parser.error(f"{p!r} is not a sentence of the shapes grammar: {shapes.GRAMMAR}")
    if args.seeds < 1 or args.repeats < 1:
        parser.error("--seeds and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    spec = load_spec(MODEL)
    weights = resolve_weights(spec)
    grid = [s.strip() for s in args.grid.split(",") if s.strip()]
    requests = {  # (prompt, seed) -> {spec text: request}; build_request checks every spec before any run
        (p, s): {c: build_request(spec, p, seed=s, steps=args.steps, cache=c) for c in ["none", *grid]}
        for p in args.prompts
        for s in range(args.seeds)
    }
    specs = list(next(iter(requests.values())))  # normalised spec texts, "none" first
    encoder, denoiser, decoder = EncoderStage(spec, weights), DenoiserStage(spec, weights), DecoderStage(spec, weights)
    first = next(iter(requests.values()))["none"]
    conditioning = {
        p: encoder.encode(p, first.negative_prompt, first.do_classifier_free_guidance, None, None) for p in args.prompts
    }

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    (p0, _), warm = next(iter(requests.items()))
    for c in specs:  # warm-up, untimed: first calls, imports of diffusers' hooks
        denoiser.denoise(conditioning[p0], warm[c])

    videos = []  # one per (prompt, seed)
    for n, ((p, s), by_spec) in enumerate(requests.items(), 1):
        times = {c: [] for c in specs}
        latents, skipped, deterministic = {}, {}, {c: True for c in specs}
        for _ in range(args.repeats):
            for c in specs:
                t0 = time.perf_counter()
                out = denoiser.denoise(conditioning[p], by_spec[c])
                times[c].append(time.perf_counter() - t0)
                if c in latents:
                    deterministic[c] &= bool(torch.equal(out, latents[c]))
                else:
                    latents[c], skipped[c] = out, skipped_fraction([denoiser.last_run_stats()])
        rgb = {c: decoder.decode(latents[c]) for c in specs}
        base = statistics.median(times["none"])
        per_spec = {}
        for c in specs:
            denoise_s = statistics.median(times[c])
            fidelity = clarity.fidelity(rgb[c], rgb["none"])
            per_spec[c] = {
                "denoise_s": denoise_s,
                "denoise_s_runs": times[c],
                "speedup": base / denoise_s,
                "skipped": skipped[c],
                "psnr_y": fidelity["psnr_y"],
                "ssim_y": fidelity["ssim_y"],
                "adherence": shapes.adherence(p, rgb[c]),
                "deterministic": deterministic[c],
            }
        videos.append({"prompt": p, "seed": s, "specs": per_spec})
        print(f"\r{n}/{len(requests)} videos x {len(specs)} specs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]

    rows = []
    for c in specs:
        got = [v["specs"][c] for v in videos]
        base_scores = [v["specs"]["none"]["adherence"]["score"] for v in videos]
        scores = [g["adherence"]["score"] for g in got]
        psnrs = [g["psnr_y"] for g in got]
        row = {
            "spec": c,
            "skipped": float(np.mean([g["skipped"] for g in got])),
            "speedup": statistics.median(g["speedup"] for g in got),
            "denoise_s": statistics.median(g["denoise_s"] for g in got),
            "psnr_worst": min(psnrs),
            "psnr_mean": float(np.mean(psnrs)),  # inf when any video is identical to uncached
            "ssim_mean": float(np.mean([g["ssim_y"] for g in got])),
            "adherence": float(np.mean(scores)),
            "adherence_delta": float(np.mean(scores) - np.mean(base_scores)),
            "adherence_changed": sum(a != b for a, b in zip(scores, base_scores, strict=True)),
            "adherence_lowered": sum(a < b for a, b in zip(scores, base_scores, strict=True)),
            # every run of every video pooled (the same work per video uncached): a check on the median of medians
            "speedup_pooled": statistics.median(t for v in videos for t in v["specs"]["none"]["denoise_s_runs"])
            / statistics.median(t for v in videos for t in v["specs"][c]["denoise_s_runs"]),
            "deterministic": all(g["deterministic"] for g in got),
        }
        row["meets_goal"] = (
            c != "none" and row["speedup"] >= GOAL_SPEEDUP and row["psnr_worst"] >= GOAL_PSNR
            and row["adherence_changed"] == 0
        )  # fmt: skip
        rows.append(row)

    r = first
    today = date.today().isoformat()
    device = f"CPU {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads"
    lines = [
        f"framecast-shapes step caching, {today}, {device}; {r.steps} steps, guidance {r.guidance_scale:g}, "
        f"{r.scheduler}, {r.num_frames} frames of {r.width}x{r.height}; {len(args.prompts)} prompts x "
        f"{args.seeds} seeds = {len(videos)} videos per spec.",
        f"Baseline: uncached framecast denoising measured in the same run (speedup = uncached denoise s / "
        f"cached denoise s, median of {args.repeats} per video, then median over videos; uncached denoise "
        f"{rows[0]['denoise_s']:.2f} s median). Load average (1 min) {load_before:.2f} before, {load_after:.2f} after.",
        f"Goal: >= {GOAL_SPEEDUP}x denoising speedup at >= {GOAL_PSNR:g} dB worst PSNR-Y with adherence unchanged "
        f"(every video's score as uncached).",
        "",
        "| spec | skipped | speedup | PSNR-Y worst (dB) | PSNR-Y mean (dB) | SSIM-Y mean | adherence | Δadherence "
        "| goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = f"{row['adherence_delta']:+.3f}" + (f" ({row['adherence_changed']} changed)" if row["adherence_changed"]
                                                     else "")  # fmt: skip
        goal = "baseline" if row["spec"] == "none" else ("met" if row["meets_goal"] else "no")
        lines.append(
            f"| {row['spec']} | {row['skipped']:.0%} | {row['speedup']:.2f}x | {fmt_db(row['psnr_worst'])} | "
            f"{fmt_db(row['psnr_mean'])} | {row['ssim_mean']:.4f} | {row['adherence']:.3f} | {delta} | {goal} |"
        )
    meeting = [row["spec"] for row in rows if row["meets_goal"]]
    near = [
        row["spec"]
        for row in rows
        if row["spec"] != "none" and not row["meets_goal"] and row["speedup"] >= GOAL_SPEEDUP
        and row["psnr_worst"] >= GOAL_PSNR and not row["adherence_lowered"]
    ]  # fmt: skip
    lines += ["", f"Meeting the goal: {', '.join(meeting) if meeting else 'none'}."]
    if near:
        lines.append(f"Meeting speedup and PSNR, adherence changed but no video's lower: {', '.join(near)}.")
    if not all(row["deterministic"] for row in rows):
        lines.append("Note: some spec gave different latents across repeats: "
                     + ", ".join(row["spec"] for row in rows if not row["deterministic"]))  # fmt: skip
    text = "\n".join(lines)
    print(text)

    (args.out / "table.md").write_text(text + "\n")
    report = {
        "date": today,
        "device": device,
        "model": MODEL,
        "settings": {"steps": r.steps, "guidance_scale": r.guidance_scale, "scheduler": r.scheduler,
                     "frames": r.num_frames, "size": f"{r.width}x{r.height}", "seeds": args.seeds,
                     "repeats": args.repeats, "prompts": args.prompts, "grid": grid},
        "baseline": "uncached framecast denoising, same run",
        "goal": {"speedup": GOAL_SPEEDUP, "psnr_worst_db": GOAL_PSNR, "adherence": "unchanged"},
        "load_average_1min": [load_before, load_after],
        "seconds": round(seconds, 1),
        "specs": [{k: figure(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
        "videos": [
            {"prompt": v["prompt"], "seed": v["seed"],
             "specs": {c: {k: figure(x) if isinstance(x, float) else x for k, x in g.items()}
                       for c, g in v["specs"].items()}}
            for v in videos
        ],
    }  # fmt: skip
    (args.out / "cache.json").write_text(json.dumps(report, indent=1) + "\n")
    wrote = [args.out / "table.md", args.out / "cache.json"]
    if scatter(rows, args.out / "cache.png", f"framecast-shapes step caching, {today}, {cpu_name()}"):
        wrote.append(args.out / "cache.png")
    print(f"\n{len(videos)} videos x {len(specs)} specs in {seconds:.0f} s; " + ", ".join(map(str, wrote)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
