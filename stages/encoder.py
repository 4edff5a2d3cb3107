"""Encoding: what the denoiser is conditioned on, made by the model's family adapter
(`stages.families`): the prompt's (and the negative prompt's, for guidance) embeddings, and for
image-to-video what the family takes from the image. Drawing from the image's latent
distribution is left to the denoiser, with the job's generator, where diffusers draws it (just
before the initial noise), so that the two stay equal draw for draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.device import default_device, describe
from stages.errors import InvalidRequest
from stages.families import Conditioning, ImageLatents, family_for
from stages.models import ModelSpec, load_component

__all__ = ["Conditioning", "EncoderStage", "ImageLatents", "check_prompts", "count_tokens", "load_tokenizer"]


def load_tokenizer(spec: ModelSpec, weights: Path):
    return load_component(spec, "tokenizer", weights)


def count_tokens(tokenizer, text: str) -> int:
    """The prompt's own tokens (without the end token)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def check_prompts(tokenizer, spec: ModelSpec, prompt: str, negative_prompt: str, guidance: bool) -> None:
    """Refuse a prompt the encoder would have to truncate (the negative one too, when guidance uses it)."""
    family = family_for(spec)
    limit = family.max_text_tokens
    texts = [("prompt", prompt)] + ([("negative prompt", negative_prompt)] if guidance else [])
    for what, text in texts:
        count = len(
            tokenizer(family.encoder_text(tokenizer, text), add_special_tokens=True).input_ids
        )  # with the end token
        if count > limit:
            raise InvalidRequest(
                f"{what} is {count} tokens long; {spec.name}'s text encoder takes at most {limit} "
                f"(shorten it by {count - limit})"
            )


class EncoderStage:
    """Encodes prompts (and images) exactly as the family's diffusers pipeline does."""

    def __init__(self, spec: ModelSpec, weights: Path, device: torch.device | None = None):
        self.spec = spec
        self.device = device or default_device()
        self.family = family_for(spec)
        # With offload, the weights live in host memory and come to the GPU for each job's
        # encoding only, leaving the GPU to the denoiser between (docs/performance.md).
        self.offload = spec.acceleration.offload is not None and self.device.type == "cuda"
        self.components = self.family.load_encoder(weights, torch.device("cpu") if self.offload else self.device)
        self._modules = [m for m in vars(self.components).values() if isinstance(m, torch.nn.Module)]

    def describe(self) -> str:
        return describe(self.device)

    @property
    def tokenizer(self):
        return self.components.tokenizer

    def encode(
        self,
        prompt: str,
        negative_prompt: str,
        guidance: bool,
        image: np.ndarray | None = None,
        size: tuple[int, int] | None = None,
        frames: int | None = None,
    ) -> Conditioning:
        """The prompt's embeddings (and the negative prompt's with `guidance`); with an `image`,
        also what the family takes from it at the video's `size` (height, width) and length."""
        check_prompts(self.tokenizer, self.spec, prompt, negative_prompt, guidance)
        if self.spec.takes_image != (image is not None):  # the stage's own guard; requests are checked earlier
            raise InvalidRequest(f"{self.spec.name} takes {'an image' if self.spec.takes_image else 'no image'}")
        if not self.offload:
            return self.family.encode(self.components, prompt, negative_prompt, guidance, image, size, frames)
        # Model offload by hand: the encoder's modules are called through more than `forward`
        # (a VAE's `encode`), which accelerate's hooks do not wrap; one move each way per job.
        for module in self._modules:
            module.to(self.device)
        try:
            return self.family.encode(self.components, prompt, negative_prompt, guidance, image, size, frames)
        finally:
            for module in self._modules:
                module.to("cpu")
