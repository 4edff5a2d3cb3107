"""Communication model of context-parallel denoising: bytes per step per rank and predicted scaling.

    python bench/context_parallel_model.py               # tables for docs/context-parallel.md (H200, measured)
    python bench/context_parallel_model.py --reference   # the same from ../shared/reference's H100 figures

A model, not a measurement: it takes one GPU's step time and per-layer attention time (bf16, 49
frames, 480x720, CFG batch 2) and adds what each layout must move over NVLink, counted from the
code in stages/context_parallel.py. By default the inputs are framecast's own figures measured by
bench/gpu.py on one H200 (bench/results/gpu-h200-2026-12-04.json): CogVideoX-2b's step and its
attention per layer with cuDNN, the kernel framecast chooses on Hopper for one GPU and for the
ring's blocks alike; CogVideoX-5b's step, its attention scaled from 2b's by the heads (the same
tokens and head size: the FLOPs go as the heads). Its assumptions are the constants below;
docs/context-parallel.md explains them. Re-measure on GPUs before trusting a prediction.

Wan has no measured figure yet: its step and attention times are estimated from its FLOPs at
the rates CogVideoX-5b's step and CogVideoX-2b's attention reached (`wan_models`), and its split
is diffusers' (equal token shards, no padding; cross-attention to the text, so no text in the
split sequence; the ring all-gathers every key/value block before attending, not overlapped).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from stages.context_parallel import ParallelLayout, valid_layouts

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "stock_diffusers_h100.json"
MEASURED = Path(__file__).resolve().parent / "results" / "gpu-h200-2026-12-04.json"

BYTES = 2  # bf16 activations
WAN_TEXT_TOKENS = 512
LINK_GB_S = 450.0  # NVLink 4 on H100: 18 links x 25 GB/s, per direction
LINK_EFFICIENCY = 0.75  # what NCCL all-to-all / send-recv reach of that at tens of MB per message
HBM_EFFICIENCY = 0.8  # of the memory bandwidth, typical for elementwise kernels
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
    ring_layer_s: float  # the same with the kernel ring blocks use (one that returns the lse)
    head_dim: int = 64
    latent_frames: int = LATENT_FRAMES
    tokens_per_frame: int = TOKENS_PER_FRAME
    joint_text: int = TEXT_TOKENS  # text tokens inside the attended sequence (CogVideoX); 0: cross-attention
    latent_elements: int = 16 * 60 * 90  # of one latent frame: what the final gather moves per frame
    whole_frames: bool = True  # shards are whole latent frames (framecast's split), else equal token shards
    ring_overlaps: bool = True  # ring hops overlap attention (framecast's ring) or are gathered first (diffusers')
    estimated: bool = False  # step and attention times estimated from FLOPs, not measured

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class Inputs:
    """One GPU's figures the predictions rest on."""

    device: str
    hbm_gb_s: float  # memory bandwidth (the ring's merge is memory-bound)
    cog2b: tuple[float, float, float]  # s per step, attention per layer, the ring's kernel per layer
    cog5b: tuple[float, float, float]
    source: str


COG_TOKENS = TEXT_TOKENS + LATENT_FRAMES * TOKENS_PER_FRAME  # 17776
COG5B_STEP_FLOP = 664.353254670336e12  # counted in ../shared/reference (CFG batch 2)


def measured_h200(path: Path = MEASURED) -> Inputs:
    """framecast's figures on one H200 (bench/gpu.py): eager bf16 steps, cuDNN attention, which
    framecast also uses for the ring's blocks on Hopper (its log-sum-exp kernel)."""
    results = json.loads(path.read_text())["results"]
    attention_2b = results["cogvideox-2b"]["attention (fp16 inputs, run 1)"]["cudnn"]["ms"] / 1e3
    attention_5b = attention_2b * 48 / 30  # same tokens and head size: FLOPs go as the heads
    step_2b = results["cogvideox-2b"]["denoise"]["framecast_s_per_step"]
    step_5b = results["cogvideox-5b"]["denoise"]["framecast_s_per_step"]
    return Inputs("H200", 4800, (step_2b, attention_2b, attention_2b), (step_5b, attention_5b, attention_5b),
                  f"measured by bench/gpu.py ({path.name})")  # fmt: skip


def reference_h100(path: Path = REFERENCE) -> Inputs:
    """Stock diffusers on one H100 (../shared/reference; per-layer attention from its README's
    "Where the time goes"), with the flash kernel for the ring's blocks, as framecast had then."""
    reference = json.loads(path.read_text())
    return Inputs("H100", 3350, (reference["2b"]["step_s_default"], 0.0113, 0.0148),
                  (reference["5b"]["step_s_default"], 0.0179, 0.0236),
                  "../shared/reference (stock diffusers)")  # fmt: skip


def models(inputs: Inputs) -> list[Model]:
    return [
        Model("CogVideoX-2b", 30, 30, *inputs.cog2b),
        Model("CogVideoX-5b", 48, 42, *inputs.cog5b),
        *wan_models(inputs),
    ]


def wan_models(inputs: Inputs) -> list[Model]:
    """Wan's transformers at their default sizes, timed by FLOPs at CogVideoX-5b's rates: its
    whole step's TFLOP/s and its attention per layer (the single GPU's kernel and the ring's)."""
    rate = COG5B_STEP_FLOP / inputs.cog5b[0]
    cog_attention_flop = 4 * COG_TOKENS**2 * 48 * 64 * 2  # QK^T and PV, CFG batch 2
    cudnn_rate, flash_rate = cog_attention_flop / inputs.cog5b[1], cog_attention_flop / inputs.cog5b[2]
    # Wan: 81 frames (21 latent frames) at 832x480 and at 1280x720; Wan 2.2 TI2V 121 frames (31) at 1280x704.
    shapes = [  # name, params, heads, layers, latent frames, tokens per frame, one latent frame's channels x h x w
        ("Wan 2.1 1.3B, 832x480", 1.42e9, 12, 30, 21, 30 * 52, 16 * 60 * 104),
        ("Wan 2.2 TI2V 5B, 1280x704", 5.0e9, 24, 30, 31, 22 * 40, 48 * 44 * 80),
        ("Wan 2.1 14B, 1280x720", 14.3e9, 40, 40, 21, 45 * 80, 16 * 90 * 160),
    ]
    out = []
    for name, params, heads, layers, frames, per_frame, latent in shapes:
        n, d = frames * per_frame, heads * 128
        attention_flop = 4 * n**2 * d * 2
        step_flop = layers * attention_flop + 2 * params * n * 2 + layers * 4 * n * WAN_TEXT_TOKENS * d * 2
        times = step_flop / rate, attention_flop / cudnn_rate, attention_flop / flash_rate
        out.append(Model(name, heads, layers, *times, head_dim=128, latent_frames=frames, tokens_per_frame=per_frame,
                         joint_text=0, latent_elements=latent, whole_frames=False, ring_overlaps=False,
                         estimated=True))  # fmt: skip
    return out


@dataclass(frozen=True)
class Prediction:
    layout: ParallelLayout
    bytes_per_step: float  # sent by one rank
    step_s: float


def predict(model: Model, layout: ParallelLayout, hbm_gb_s: float = 3350) -> Prediction:
    """Bytes one rank sends per step, and the predicted step time, for one layout."""
    u, r, c = layout.ulysses, layout.ring, layout.cfg
    p = u * r
    batch = 2 // c  # each rank's share of the CFG batch of two
    tokens = model.latent_frames * model.tokens_per_frame
    if model.whole_frames:  # shards are whole frames, padded to the largest
        frames_per_shard = math.ceil(model.latent_frames / p)
        n = frames_per_shard * model.tokens_per_frame  # video tokens a rank holds
    else:  # equal token shards (the layout is refused where they are not equal)
        frames_per_shard, n = model.latent_frames / p, tokens / p
    padding = n * p / tokens  # work done on padding, as a factor
    d, bw = model.hidden, LINK_GB_S * 1e9 * LINK_EFFICIENCY
    text = model.joint_text

    # Per layer. Ulysses: q, k, v out and the output back: 4 all-to-alls of the rank's
    # (batch, n, d) shard, of which (u-1)/u leaves the rank; plus the text output's heads.
    ulysses_bytes = 4 * batch * n * d * BYTES * (u - 1) / u + batch * text * d * BYTES * (u - 1) / u
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
        flash_s = model.ring_layer_s * per_rank_work
        merge_s = 3 * batch * (n * u + text) * (d // u) * 4 / (hbm_gb_s * HBM_EFFICIENCY * 1e9)
        if model.ring_overlaps:
            ring_s = r * max(flash_s / r, ring_bytes_per_hop / bw) + (r - 1) * merge_s
        else:  # every block gathered first, then attended
            ring_s = ring_bytes / bw + flash_s + (r - 1) * merge_s
    else:
        ring_s = attention_s
    layer_s = other_s + ulysses_s + ring_s

    # Once per step: every rank gathers the noise prediction (a latent shard).
    gather_bytes = (layout.world_size - 1) * batch * frames_per_shard * model.latent_elements * BYTES
    step_s = model.layers * layer_s + gather_bytes / bw
    return Prediction(layout, model.layers * (ulysses_bytes + ring_bytes) + gather_bytes, step_s)


def table(model: Model, gpus: int, hbm_gb_s: float = 3350) -> list[str]:
    rows = []
    for layout in valid_layouts(gpus, model.heads, guidance=True):
        pred = predict(model, layout, hbm_gb_s)
        speedup = model.step_s / pred.step_s
        rows.append(
            f"| {gpus} | {layout} | {pred.bytes_per_step / 1e9:.2f} | {pred.step_s:.3f} | "
            f"{speedup:.2f}x | {speedup / gpus:.0%} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="from ../shared/reference's H100 figures")
    args = parser.parse_args()
    inputs = reference_h100() if args.reference else measured_h200()
    print(f"Inputs: {inputs.source}")
    for model in models(inputs):
        how = "estimated from FLOPs" if model.estimated else "measured"
        shape = f"{model.heads} heads, {model.layers} layers; one {inputs.device}: {model.step_s:.3f} s/step, {how}"
        print(f"\n#### {model.name} ({shape})\n")
        print("| GPUs | layout | GB sent per rank per step | predicted s/step | speedup | efficiency |")
        print("|---|---|---|---|---|---|")
        for gpus in (2, 4, 8):
            print("\n".join(table(model, gpus, inputs.hbm_gb_s)))


if __name__ == "__main__":
    main()
