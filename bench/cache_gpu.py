"""Step caching at real size, timings only: framecast's denoising with each cache against uncached,
and stock diffusers' pipeline with and without the same hook, measured in the same run.

    python bench/cache_gpu.py --model cogvideox-2b cogvideox-5b --device cuda --out $OUT     # a GPU
    python bench/cache_gpu.py --model tiny --device cpu --steps 4 --out /tmp/cache-gpu       # a smoke test

No weights are downloaded: the transformer has random weights at the model's real size (seeded),
saved once under the temp directory with the model's scheduler, and the prompt's states are random
tensors of the text encoder's shape (the denoising's cost does not depend on their values). So the
figures are timings and memory only: with random weights a cache's decisions (FirstBlockCache's
residual test) are not those of trained weights, and nothing here says what a cache costs in
quality. For quality, with real weights (a local diffusers copy; nothing is downloaded):

    framecast tune-cache --model cogvideox-2b --weights ~/models/CogVideoX-2b --min-psnr 30 \\
        --prompt "a red fox running through fresh snow" --prompt "a city street at night in the rain"
    framecast sweep --model cogvideox-5b --weights ~/models/CogVideoX-5b \\
        --prompt "a red fox running through fresh snow" --grid cache=none,fbc:0.05,fbc:0.1,pab:2,taylorseer:3

Per model, at its defaults (CogVideoX: 49 frames of 480x720, 50 steps, guidance 6, CFG batch of
two): one untimed warm-up, then framecast's `DenoiserStage.denoise` uncached and with each spec
of `--grid`, and stock `CogVideoXPipeline` (prompt_embeds given, output_type="latent": the
denoising loop alone) uncached and with the first spec's hook, each `--repeats` times (median),
synchronised. Writes `<model>.json` under `--out` as soon as the model is done, so a run cut
short keeps what it finished, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import gpu  # noqa: E402  # real-size random weights, prompt states and stock's arguments
from stages.cache import diffusers_config, parse_cache, skipped_fraction  # noqa: E402
from stages.denoiser import DenoiserStage  # noqa: E402
from stages.device import describe  # noqa: E402
from stages.families import Conditioning, family_for  # noqa: E402
from stages.models import ComponentSpec, load_spec  # noqa: E402
from stages.request import build_request  # noqa: E402

GRID = "fbc:0.1,taylorseer:2,taylorseer:3"


def timed(run, device: torch.device, repeats: int) -> float:
    """The median of `repeats` synchronised runs."""
    return statistics.median(gpu.timed(run, device)[1] for _ in range(repeats))


def measure(model: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    spec = replace(load_spec(model), dtype=args.dtype)
    weights = gpu.build_weights(spec, device, Path(tempfile.gettempdir()))
    settings = {"steps": args.steps} if args.steps else {}
    r = build_request(spec, "timing only", **settings)
    conditioning = gpu.text_states(spec, r.do_classifier_free_guidance)
    stage = DenoiserStage(spec, weights, device)
    specs = [s.strip() for s in args.grid.split(",") if s.strip()]
    rows = {}
    for cache in ["none", *specs]:
        request = replace(r, cache=str(parse_cache(cache, family_for(spec).cache_kinds, spec.name)))
        if cache == "none":
            stage.denoise(conditioning, request)  # warm-up: kernels chosen, memory pools grown
        seconds = timed(lambda request=request: stage.denoise(conditioning, request), device, args.repeats)
        rows[cache] = {"denoise_s": seconds, "skipped_fraction": skipped_fraction([stage.last_run_stats()]),
                       "peak_mib": stage.last_run_stats()["peak_memory_mib"]}  # fmt: skip
    stock = _stock(spec, stage.network, r, conditioning, specs[0] if specs else None, device, args.repeats)
    base = rows["none"]["denoise_s"]
    for row in rows.values():
        row["speedup"] = base / row["denoise_s"]
    return {"model": model, "device": describe(device), "date": date.today().isoformat(), "dtype": args.dtype,
            "torch": torch.__version__, "steps": r.steps, "frames": r.num_frames, "size": [r.height, r.width],
            "guidance": r.guidance_scale, "repeats": args.repeats, "framecast": rows, "stock": stock}  # fmt: skip


def _stock(spec, transformer, r, conditioning: Conditioning, cache: str | None, device, repeats: int) -> dict:
    """Stock diffusers' pipeline on the same transformer: its denoising loop alone, uncached and
    with `cache`'s hook (the hooks framecast put on it are taken off first)."""
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    pipeline_class = ComponentSpec(spec.pipeline).load_class()
    scheduler = spec.scheduler_class(r.scheduler).from_config(spec.components["scheduler"].config)
    pipe = pipeline_class(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    kwargs = gpu.stock_kwargs(r, conditioning, device, r.steps, "latent")
    pipe.vae_scale_factor_spatial = family_for(spec).vae_scale_spatial
    pipe.vae_scale_factor_temporal = family_for(spec).vae_scale_temporal
    out = {"none": {"denoise_s": timed(lambda: pipe(**kwargs, **gpu.seeded(r.seed)), device,
                                        repeats)}}  # fmt: skip
    if cache is not None:
        parsed = parse_cache(cache, family_for(spec).cache_kinds, spec.name)
        transformer.enable_cache(diffusers_config(parsed, lambda: pipe.current_timestep, transformer.dtype))
        seconds = timed(lambda: pipe(**kwargs, **gpu.seeded(r.seed)), device, repeats)
        out[cache] = {"denoise_s": seconds, "speedup": out["none"]["denoise_s"] / seconds}
        transformer.disable_cache()
    return out


def table(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']}, {result['date']}, torch {result['torch']}, {result['dtype']}; "
             f"{result['frames']} frames of {result['size'][1]}x{result['size'][0]}, {result['steps']} steps, guidance "
             f"{result['guidance']:g}; random weights (timings only); median of {result['repeats']}",
             "", "| | cache | denoise s | speedup | skipped | peak MiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for cache, row in result["framecast"].items():
        lines.append(f"| framecast | {cache} | {row['denoise_s']:.2f} | {row['speedup']:.2f}x | "
                     f"{row['skipped_fraction']:.2f} | {row['peak_mib']:.0f} |")  # fmt: skip
    for cache, row in result["stock"].items():
        lines.append(f"| stock diffusers | {cache} | {row['denoise_s']:.2f} | {row.get('speedup', 1.0):.2f}x | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["cogvideox-2b", "cogvideox-5b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--grid", default=GRID, help="comma-separated cache specs (uncached is always run)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-cache-gpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.model:
        result = measure(model, args)
        (args.out / f"{model}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{model}.md").write_text(table(result))
        print(table(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
