"""Encoding: what the denoiser is conditioned on.

- the prompt (and the negative prompt, for guidance): tokenizer + T5 encoder -> embeddings,
  padded to a fixed length as diffusers' CogVideoX pipelines do;
- for image-to-video, the image: resized and normalised by diffusers' video processor, then
  through the VAE's encoder -> the latent distribution of the first frame. The sample from it
  is drawn by the denoiser, with the job's generator, where diffusers draws it (just before the
  initial noise), so that the two stay equal draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.device import default_device, describe
from stages.errors import InvalidRequest
from stages.models import ModelSpec, load_component


@dataclass(frozen=True)
class ImageLatents:
    """The VAE encoder's Gaussian over the image's latents, (1, C, 1, h, w), on the CPU.

    `scale` is what diffusers multiplies the sample by: the VAE's scaling factor, or its inverse
    for weights whose config says `invert_scale_latents` (CogVideoX 1.5-I2V).
    """

    mean: torch.Tensor
    std: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Conditioning:
    """Encoder hidden states, (1, max_sequence_length, dim), on the CPU so they can cross processes,
    and for image-to-video the image's latent distribution."""

    prompt: torch.Tensor
    negative: torch.Tensor | None  # None when classifier-free guidance is off
    image: ImageLatents | None = None


def load_tokenizer(spec: ModelSpec, weights: Path):
    return load_component(spec, "tokenizer", weights)


def count_tokens(tokenizer, text: str) -> int:
    """The prompt's own tokens (without the end token)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def check_prompts(tokenizer, spec: ModelSpec, prompt: str, negative_prompt: str, guidance: bool) -> None:
    """Refuse a prompt the encoder would have to truncate (the negative one too, when guidance uses it)."""
    texts = [("prompt", prompt)] + ([("negative prompt", negative_prompt)] if guidance else [])
    for what, text in texts:
        count = len(tokenizer(text, add_special_tokens=True).input_ids)  # with the end token
        if count > spec.max_sequence_length:
            raise InvalidRequest(
                f"{what} is {count} tokens long; {spec.name}'s text encoder takes at most "
                f"{spec.max_sequence_length} (shorten it by {count - spec.max_sequence_length})"
            )


class EncoderStage:
    """Encodes prompts (and images) exactly as diffusers' CogVideoX pipelines do."""

    def __init__(self, spec: ModelSpec, weights: Path, device: torch.device | None = None):
        self.spec = spec
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(spec, weights)
        self.text_encoder = load_component(spec, "text_encoder", weights, self.device)
        self.vae = self.video_processor = None
        if spec.takes_image:  # the VAE's encoder turns the image into the first latent frame
            from diffusers.video_processor import VideoProcessor

            self.vae = load_component(spec, "vae", weights, self.device)
            self.video_processor = VideoProcessor(vae_scale_factor=spec.vae_scale_spatial)

    def describe(self) -> str:
        return describe(self.device)

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(
            [text],
            padding="max_length",
            max_length=self.spec.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        hidden = self.text_encoder(ids.to(self.device))[0]
        return hidden.to(dtype=self.text_encoder.dtype).cpu()

    @torch.no_grad()
    def _encode_image(self, image: np.ndarray, size: tuple[int, int]) -> ImageLatents:
        """(H, W, 3) uint8 -> the latent distribution of the image resized to `size` (height, width)."""
        from PIL import Image

        if self.vae is None:
            raise InvalidRequest(f"{self.spec.name} makes video from text alone; it takes no image")
        height, width = size
        pixels = self.video_processor.preprocess(Image.fromarray(image), height=height, width=width)
        pixels = pixels.to(self.device, dtype=self.text_encoder.dtype).unsqueeze(2)  # (1, 3, 1, H, W)
        latent = self.vae.encode(pixels).latent_dist
        factor = self.vae.config.scaling_factor
        scale = 1 / factor if getattr(self.vae.config, "invert_scale_latents", False) else factor
        return ImageLatents(mean=latent.mean.cpu(), std=latent.std.cpu(), scale=scale)

    def encode(
        self,
        prompt: str,
        negative_prompt: str,
        guidance: bool,
        image: np.ndarray | None = None,
        size: tuple[int, int] | None = None,
    ) -> Conditioning:
        """The prompt's embeddings (and the negative prompt's with `guidance`); with an `image`,
        also its latents at the video's `size` (height, width)."""
        check_prompts(self.tokenizer, self.spec, prompt, negative_prompt, guidance)
        if self.spec.takes_image and image is None:
            raise InvalidRequest(f"{self.spec.name} is image-to-video: it needs an image")
        return Conditioning(
            prompt=self._embed(prompt),
            negative=self._embed(negative_prompt) if guidance else None,
            image=None if image is None else self._encode_image(image, size),
        )
