"""Communication model of context-parallel denoising: bytes per step per rank and predicted scaling.

    python bench/context_parallel_model.py            # markdown tables for docs/context-parallel.md

A model, not a measurement: it takes the single-H100 step time and per-layer attention time of
stock diffusers from ../shared/reference/stock_diffusers_h100.json and README (bf16, 49 frames,
480x720, CFG batch 2) and adds what each layout must move over NVLink, counted from the code in
stages/context_parallel.py. Its assumptions are the constants below; docs/context-parallel.md
explains them. Re-measure on GPUs before trusting a prediction.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from stages.context_parallel import ParallelLayout, valid_layouts

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "stock_diffusers_h100.json"

BYTES = 2  # bf16 activations
LINK_GB_S = 450.0  # NVLink 4 on H100: 18 links x 25 GB/s, per direction
LINK_EFFICIENCY = 0.75  # what NCCL all-to-all / send-recv reach of that at tens of MB per message
HBM_GB_S = 3350 * 0.8  # H100 SXM memory bandwidth, at a typical 80% for elementwise kernels
TEXT_TOKENS = 226
LATENT_FRAMES = 13  # 49 frames
TOKENS_PER_FRAME = (480 // 16) * (720 // 16)  # 8x VAE, 2x2 patches: 1350


@dataclass(frozen=True)
class Model:
    name: str
    heads: int
    layers: int
    step_s: float  # one denoising step on one H100, CFG batch 2 (stock diffusers, default SDPA)
    attention_layer_s: float  # attention of one layer, CFG batch 2 (cuDNN SDPA: Ulysses and single GPU)
    flash_layer_s: float  # the same with the flash kernel, which ring blocks use (it returns the lse)

    @property
    def hidden(self) -> int:
        return self.heads * 64


def models(reference: dict) -> list[Model]:
    # Per-layer attention times are from shared/reference/README.md ("Where the time goes").
    return [
        Model("CogVideoX-2b", 30, 30, reference["2b"]["step_s_default"], 0.0113, flash_layer_s=0.0148),
        Model("CogVideoX-5b", 48, 42, reference["5b"]["step_s_default"], 0.0179, flash_layer_s=0.0236),
    ]


@dataclass(frozen=True)
class Prediction:
    layout: ParallelLayout
    bytes_per_step: float  # sent by one rank
    step_s: float


def predict(model: Model, layout: ParallelLayout) -> Prediction:
    """Bytes one rank sends per step, and the predicted step time, for one layout."""
    u, r, c = layout.ulysses, layout.ring, layout.cfg
    p = u * r
    batch = 2 // c  # each rank's share of the CFG batch of two
    frames_per_shard = math.ceil(LATENT_FRAMES / p)  # shards are whole frames, padded to the largest
    n = frames_per_shard * TOKENS_PER_FRAME  # video tokens a rank holds
    padding = n * p / (LATENT_FRAMES * TOKENS_PER_FRAME)  # work done on padding, as a factor
    d, bw = model.hidden, LINK_GB_S * 1e9 * LINK_EFFICIENCY

    # Per layer. Ulysses: q, k, v out and the output back: 4 all-to-alls of the rank's
    # (batch, n, d) shard, of which (u-1)/u leaves the rank; plus the text output's heads.
    ulysses_bytes = 4 * batch * n * d * BYTES * (u - 1) / u + batch * TEXT_TOKENS * d * BYTES * (u - 1) / u
    # Ring: the (k, v) block of a Ulysses group, (batch, u*n tokens, d/u channels) each, passed on r-1 times.
    ring_bytes_per_hop = 2 * batch * n * d * BYTES
    ring_bytes = ring_bytes_per_hop * (r - 1)

    per_rank_work = padding / (p * c)
    attention_s = model.attention_layer_s * per_rank_work
    other_s = (model.step_s / model.layers - model.attention_layer_s) * per_rank_work
    ulysses_s = ulysses_bytes / bw  # on the critical path: attention waits for it
    # Ring passes overlap the attention of the block in hand: a hop costs the slower of the two,
    # plus merging its partial output (read and write the fp32 output and lse) by log-sum-exp.
    if r > 1:
        flash_s = model.flash_layer_s * per_rank_work
        merge_s = 3 * batch * (n * u + TEXT_TOKENS) * (d // u) * 4 / (HBM_GB_S * 1e9)
        ring_s = r * max(flash_s / r, ring_bytes_per_hop / bw) + (r - 1) * merge_s
    else:
        ring_s = attention_s
    layer_s = other_s + ulysses_s + ring_s

    # Once per step: every rank gathers the noise prediction (latents, 16 channels of 60x90).
    gather_bytes = (layout.world_size - 1) * batch * frames_per_shard * 16 * 60 * 90 * BYTES
    step_s = model.layers * layer_s + gather_bytes / bw
    return Prediction(layout, model.layers * (ulysses_bytes + ring_bytes) + gather_bytes, step_s)


def table(model: Model, gpus: int) -> list[str]:
    rows = []
    for layout in valid_layouts(gpus, model.heads, guidance=True):
        pred = predict(model, layout)
        speedup = model.step_s / pred.step_s
        rows.append(
            f"| {gpus} | {layout} | {pred.bytes_per_step / 1e9:.2f} | {pred.step_s:.3f} | "
            f"{speedup:.2f}x | {speedup / gpus:.0%} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    args = parser.parse_args()
    reference = json.loads(args.reference.read_text())
    for model in models(reference):
        shape = f"{model.heads} heads, {model.layers} layers; one H100: {model.step_s:.3f} s/step"
        print(f"\n#### {model.name} ({shape})\n")
        print("| GPUs | layout | GB sent per rank per step | predicted s/step | speedup | efficiency |")
        print("|---|---|---|---|---|---|")
        for gpus in (2, 4, 8):
            print("\n".join(table(model, gpus)))


if __name__ == "__main__":
    main()
