"""Where framecast-shapes loses a shape: rendered clips noised part of the way, denoised back.

    python bench/shapes_partial_denoise.py [--strengths 0.3 0.15 0.06] [--guidance 1] [--clips 16]

Each clip of the shapes world (prompts seen in training, black background) is encoded by the
model's VAE, noised to `strength` of the schedule and denoised with its own prompt by stock
diffusers' `CogVideoXVideoToVideoPipeline` on the committed weights; the shapes detector reads
the result. A shape that comes back from low noise is one the transformer can draw; one that is
lost even there is lost by the transformer, whatever the sampler or the decoder do. Prints the
shapes kept per strength, by shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from stages import shapes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.15, 0.06])
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--weights", default=str(ROOT / "models" / "framecast-shapes"))
    args = parser.parse_args()

    from diffusers import CogVideoXVideoToVideoPipeline

    torch.set_num_threads(2)
    pipe = CogVideoXVideoToVideoPipeline.from_pretrained(args.weights)
    pipe.set_progress_bar_config(disable=True)
    scenes = [s for s in shapes.all_scenes() if not s.held_out and s.background == "black"][::3][: args.clips]
    print(f"framecast-shapes, {len(scenes)} rendered clips, 20 steps, guidance {args.guidance:g}\n")
    print("| strength | " + " | ".join(f"{name}s kept" for name in shapes.SHAPES) + " |")
    print("|---" * (len(shapes.SHAPES) + 1) + "|")
    for strength in args.strengths:
        kept = {name: [0, 0] for name in shapes.SHAPES}
        for i, scene in enumerate(scenes):
            clip = shapes.render(scene, seed=500 + i)
            frames = pipe(
                video=[Image.fromarray(f) for f in clip], prompt=scene.prompt, strength=strength,
                num_inference_steps=20, guidance_scale=args.guidance, max_sequence_length=16,
                generator=torch.Generator().manual_seed(i), output_type="np",
            ).frames[0]  # fmt: skip
            rgb = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
            kept[scene.shape][0] += int(shapes.adherence(scene.prompt, rgb)["shape"])
            kept[scene.shape][1] += 1
        print(f"| {strength:g} | " + " | ".join(f"{k} of {n}" for k, n in kept.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
