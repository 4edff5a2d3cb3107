"""VAE decoding: latents -> frames, as diffusers' CogVideoX pipeline decodes and post-processes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.device import default_device, describe
from stages.models import ModelSpec, load_component


class DecoderStage:
    def __init__(self, spec: ModelSpec, weights: Path, device: torch.device | None = None):
        self.spec = spec
        self.device = device or default_device()
        self.vae = load_component(spec, "vae", weights, self.device)

    def describe(self) -> str:
        return describe(self.device)

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, latent frames, C, h, w) latents -> (frames, H, W, 3) float32 in [0, 1], on the CPU."""
        z = latents.to(self.device, self.vae.dtype).permute(0, 2, 1, 3, 4)  # -> (B, C, F, h, w)
        z = 1 / self.vae.config.scaling_factor * z  # written as diffusers writes it, for bit-equality
        video = self.vae.decode(z).sample  # (B, 3, F, H, W) in [-1, 1]
        video = (video[0] * 0.5 + 0.5).clamp(0, 1)
        return video.permute(1, 2, 3, 0).float().cpu()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(frames, H, W, 3) uint8, rounded as diffusers rounds when it makes PIL frames."""
        return to_uint8(self.decode_float(latents))


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.numpy() * 255).round().astype(np.uint8)
