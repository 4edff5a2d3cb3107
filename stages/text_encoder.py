"""Text encoding: tokenizer + T5 encoder -> prompt embeddings (and negative ones for guidance)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stages.device import default_device, describe
from stages.errors import InvalidRequest
from stages.models import ModelSpec, load_component


@dataclass(frozen=True)
class PromptEmbeddings:
    """Encoder hidden states, (1, max_sequence_length, dim), on the CPU so they can cross processes."""

    prompt: torch.Tensor
    negative: torch.Tensor | None  # None when classifier-free guidance is off


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


class TextEncoderStage:
    """Encodes prompts exactly as diffusers' CogVideoX pipeline does (T5, padded to a fixed length)."""

    def __init__(self, spec: ModelSpec, weights: Path, device: torch.device | None = None):
        self.spec = spec
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(spec, weights)
        self.text_encoder = load_component(spec, "text_encoder", weights, self.device)

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

    def encode(self, prompt: str, negative_prompt: str, guidance: bool) -> PromptEmbeddings:
        check_prompts(self.tokenizer, self.spec, prompt, negative_prompt, guidance)
        return PromptEmbeddings(
            prompt=self._embed(prompt),
            negative=self._embed(negative_prompt) if guidance else None,
        )
