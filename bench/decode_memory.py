"""VAE decode: time and memory per decoder, untiled and tiled over M decoders, beside stock diffusers.

    python bench/decode_memory.py                                   # tiny VAE on the CPU
    python bench/decode_memory.py --model cogvideox-2b --device cuda --size 480x720 --frames 49 --dtype bfloat16

Each measurement runs in a fresh process, so that every figure starts from the same state. The
memory is what decoding added to the process: the rise of the CUDA peak allocation on a GPU, of
the resident set (VmHWM) on the CPU (model weights excluded: they are loaded before the reset).
On the CPU, glibc is told to return freed blocks of 64 KiB or more at once
(MALLOC_MMAP_THRESHOLD_), so that the resident set is the memory in use rather than what the
allocator kept; that slows the CPU down, so the CPU times here are not the best it can do.
For M decoders, each decoder's share of the tiles is decoded by itself, as each decoder actor
does on its own device; the tile-parallel decode time is the slowest share plus the blending.
Models other than tiny use random weights at the model's real VAE size (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stages.decoder import DecoderStage, assemble_frames, plan_decode  # noqa: E402
from stages.device import PeakMemory  # noqa: E402
from stages.families import family_for  # noqa: E402
from stages.models import load_spec  # noqa: E402
from stages.weights import resolve_weights  # noqa: E402


def weights_for(model: str, dtype: str) -> tuple:
    spec = load_spec(model)
    spec = replace(spec, dtype=dtype)
    if spec.weights.build_seed is not None:
        return spec, resolve_weights(spec)
    from diffusers import AutoencoderKLCogVideoX

    directory = Path(tempfile.gettempdir()) / f"framecast-bench-{model}-vae"
    if not (directory / "vae" / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKLCogVideoX.from_config(spec.components["vae"].config).save_pretrained(directory / "vae")
    return spec, directory


def measure(config: dict) -> dict:
    """One measurement, in this process."""
    spec, weights = weights_for(config["model"], config["dtype"])
    device = torch.device(config["device"])
    height, width = config["size"]
    latent_frames = (config["frames"] - 1) // family_for(spec).vae_scale_temporal + 1
    channels = spec.components["vae"].config["latent_channels"]
    scale = family_for(spec).vae_scale_spatial
    latents = torch.randn(
        1, latent_frames, channels, height // scale, width // scale, generator=torch.Generator().manual_seed(0)
    )
    memory = PeakMemory(device)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        memory.reset()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, memory.growth_mib()

    if config["kind"] == "stock":
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(weights, subfolder="vae", dtype=spec.torch_dtype()).to(device)
        if config["tile"]:
            th, tw = config["tile"]
            oh, ow = config["overlap"]
            vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw,
                              tile_overlap_factor_height=oh / th, tile_overlap_factor_width=ow / tw)  # fmt: skip
        z = 1 / vae.config.scaling_factor * latents.to(device, vae.dtype).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            _, seconds, mib = timed(lambda: vae.decode(z).sample)
        return {"seconds": seconds, "work_mib": mib}

    m = config["decoders"]
    plan = plan_decode(spec, height, width, m, config["tile"], config["overlap"]) if config["tile"] else None
    stage = DecoderStage(spec, weights, device, rank=config["rank"], decoders=m)
    if plan is None:
        _, seconds, mib = timed(lambda: stage.decode_float(latents))
        return {"seconds": seconds, "work_mib": mib}
    tiles, seconds, mib = timed(lambda: stage.decode_tiles(latents, plan))
    result = {"seconds": seconds, "work_mib": mib, "tiles": len(tiles)}
    if m == 1:  # the blend, timed once (it runs where the tiles are gathered)
        start = time.perf_counter()
        assemble_frames(plan, tiles)
        result["blend_seconds"] = time.perf_counter() - start
    return result


def in_fresh_process(config: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if config["device"] == "cpu" else None
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pixels(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=pixels, default=(256, 256), help="video HxW (default 256x256)")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--tile", type=pixels, default=(64, 64), help="tile HxW (default 64x64)")
    parser.add_argument("--overlap", type=pixels, default=(16, 16))
    parser.add_argument("--decoders", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0

    base = {"model": args.model, "device": args.device, "dtype": args.dtype, "size": args.size, "frames": args.frames,
            "tile": list(args.tile), "overlap": list(args.overlap)}  # fmt: skip
    rows = [
        ("stock diffusers, untiled", [in_fresh_process({**base, "kind": "stock", "tile": None})]),
        ("stock diffusers, enable_tiling", [in_fresh_process({**base, "kind": "stock"})]),
        (
            "framecast, untiled (1 decoder)",
            [in_fresh_process({**base, "kind": "ours", "tile": None, "decoders": 1, "rank": 0})],
        ),  # fmt: skip
    ]
    for m in args.decoders:
        shares = [in_fresh_process({**base, "kind": "ours", "decoders": m, "rank": r}) for r in range(m)]
        rows.append((f"framecast, tiled, {m} decoder(s)", shares))
    blend = rows[3][1][0].get("blend_seconds", 0.0) if len(rows) > 3 else 0.0

    h, w = args.size
    device = f"{args.device} ({torch.cuda.get_device_name()})" if args.device == "cuda" else args.device
    print(
        f"### VAE decode of {args.frames} frames at {h}x{w}, {args.model} VAE ({args.dtype}), tiles "
        f"{args.tile[0]}x{args.tile[1]} overlapping {args.overlap[0]}x{args.overlap[1]} ({date.today()}, {device})"
    )
    print()
    print(
        "| decode | tiles per decoder | time per decoder (s) | video decoded in (s) | memory added per decoder (MiB) |"
    )
    print("|---|---|---|---|---|")
    for name, shares in rows:
        wall = max(s["seconds"] for s in shares) + (blend if "framecast, tiled" in name else 0.0)
        tiles = " / ".join(str(s.get("tiles", 1)) for s in shares)
        seconds = " / ".join(f"{s['seconds']:.2f}" for s in shares)
        memory = " / ".join(f"{s['work_mib']:.0f}" for s in shares)
        print(f"| {name} | {tiles} | {seconds} | {wall:.2f} | {memory} |")
    print()
    print(f"Blending the tiles where they are gathered: {blend:.3f} s (included in 'video decoded in').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
