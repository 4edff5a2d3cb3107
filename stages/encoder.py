"""Encoding: what the denoiser is conditioned on.

- the prompt (and the negative prompt, for guidance): tokenizer + text encoder -> embeddings,
  as each family's diffusers pipeline makes them (CogVideoX: T5, padded to a fixed length;
  Z-Image: Qwen3 over the chat template, the prompt's own tokens; I2VGen-XL: CLIP);
- for image-to-video, the image: resized and normalised by diffusers' video processor, then
  through the VAE's encoder -> the latent distribution of the first frame. The sample from it
  is drawn by the denoiser, with the job's generator, where diffusers draws it (just before the
  initial noise), so that the two stay equal draw for draw. I2VGen-XL also gets the image's
  CLIP embedding.
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
    """The VAE encoder's Gaussian over the image's latents, on the CPU: its `parameters` (mean
    and log-variance stacked along channels, as diffusers' `DiagonalGaussianDistribution` takes
    them) and `scale`, the VAE's scaling factor that diffusers multiplies the sample by."""

    parameters: torch.Tensor
    scale: float

    def sample(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """One draw (unscaled) from diffusers' own distribution: its draw and its arithmetic."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.parameters.to(device)).sample(generator)


@dataclass(frozen=True)
class Conditioning:
    """What the encoder stage hands the denoiser, on the CPU so that it can cross processes:
    prompt embeddings (1, tokens, dim): CogVideoX's padded to the maximum, Z-Image's the prompt's
    own tokens, I2VGen-XL's CLIP's 77; and for image-to-video the image's latent distribution
    (and for I2VGen-XL its CLIP embedding)."""

    prompt: torch.Tensor
    negative: torch.Tensor | None  # None when classifier-free guidance is off
    image_latents: ImageLatents | None = None
    image_embeds: torch.Tensor | None = None  # I2VGen-XL: the image's CLIP embedding, (1, 1, dim)


def load_tokenizer(spec: ModelSpec, weights: Path):
    return load_component(spec, "tokenizer", weights)


def count_tokens(tokenizer, text: str) -> int:
    """The prompt's own tokens (without the end token)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def encoder_text(tokenizer, spec: ModelSpec, text: str) -> str:
    """The text the encoder reads: the prompt itself, or for Z-Image the prompt as a user turn in
    the language model's chat template (as diffusers' ZImagePipeline writes it)."""
    if spec.family != "zimage":
        return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)


def check_prompts(tokenizer, spec: ModelSpec, prompt: str, negative_prompt: str, guidance: bool) -> None:
    """Refuse a prompt the encoder would have to truncate (the negative one too, when guidance uses it)."""
    texts = [("prompt", prompt)] + ([("negative prompt", negative_prompt)] if guidance else [])
    for what, text in texts:
        text = encoder_text(tokenizer, spec, text)
        count = len(tokenizer(text, add_special_tokens=True).input_ids)  # with the end token
        if count > spec.max_sequence_length:
            raise InvalidRequest(
                f"{what} is {count} tokens long; {spec.name}'s text encoder takes at most "
                f"{spec.max_sequence_length} (shorten it by {count - spec.max_sequence_length})"
            )


class EncoderStage:
    """Encodes prompts (and images) exactly as each family's diffusers pipeline does."""

    def __init__(self, spec: ModelSpec, weights: Path, device: torch.device | None = None):
        self.spec = spec
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(spec, weights)
        self.text_encoder = load_component(spec, "text_encoder", weights, self.device)
        self.vae = self.video_processor = self.image_encoder = self.feature_extractor = None
        if spec.takes_image:  # the VAE's encoder turns the image into the first latent frame
            from diffusers.video_processor import VideoProcessor

            self.vae = load_component(spec, "vae", weights, self.device)
            # an image that is cropped to the video's size is not resized again (I2VGen-XL's processor)
            resize = spec.image_fit != "crop"
            self.video_processor = VideoProcessor(vae_scale_factor=spec.vae_scale_spatial, do_resize=resize)
        if "image_encoder" in spec.components:  # I2VGen-XL: CLIP's view of the image too
            self.image_encoder = load_component(spec, "image_encoder", weights, self.device)
            self.feature_extractor = load_component(spec, "feature_extractor", weights)

    def describe(self) -> str:
        return describe(self.device)

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        """(1, tokens, dim): CogVideoX's T5 states for the prompt padded to the maximum; Z-Image's
        language-model states (the second-to-last layer's) for the prompt's own tokens only."""
        inputs = self.tokenizer(
            [encoder_text(self.tokenizer, self.spec, text)],
            padding="max_length",
            max_length=self.spec.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = inputs.input_ids.to(self.device)
        if self.spec.family == "zimage":
            mask = inputs.attention_mask.to(self.device).bool()
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            return hidden[0][mask[0]][None].cpu()
        if self.spec.family == "i2vgen-xl":  # the pipeline's clip_skip=1: the second-to-last layer, normed
            hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            # (transformers 5 keeps the norm on the model itself; earlier versions under .text_model)
            norm = getattr(self.text_encoder, "final_layer_norm", None) or self.text_encoder.text_model.final_layer_norm
            return norm(hidden).to(dtype=self.text_encoder.dtype).cpu()
        hidden = self.text_encoder(ids)[0]
        return hidden.to(dtype=self.text_encoder.dtype).cpu()

    @torch.no_grad()
    def _encode_image(self, image: np.ndarray, size: tuple[int, int]) -> ImageLatents:
        """(H, W, 3) uint8 -> the latent distribution of the image resized to `size` (height,
        width): stretched to it (CogVideoX), or scaled to cover it and centre-cropped (I2VGen-XL)."""
        from PIL import Image

        height, width = size
        if self.spec.image_fit == "crop":  # I2VGen-XL
            from diffusers.pipelines.deprecated.i2vgen_xl.pipeline_i2vgen_xl import _center_crop_wide

            pixels = self.video_processor.preprocess(_center_crop_wide(Image.fromarray(image), (width, height)))
            pixels = pixels.to(self.device, dtype=self.image_encoder.dtype)  # (1, 3, H, W): an image VAE
        else:
            pixels = self.video_processor.preprocess(Image.fromarray(image), height=height, width=width)
            pixels = pixels.to(self.device, dtype=self.text_encoder.dtype).unsqueeze(2)  # (1, 3, 1, H, W)
        parameters = self.vae.encode(pixels).latent_dist.parameters
        return ImageLatents(parameters=parameters.cpu(), scale=self.vae.config.scaling_factor)

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
        if self.spec.takes_image != (image is not None):  # the stage's own guard; requests are checked earlier
            raise InvalidRequest(f"{self.spec.name} takes {'an image' if self.spec.takes_image else 'no image'}")
        return Conditioning(
            prompt=self._embed(prompt),
            negative=self._embed(negative_prompt) if guidance else None,
            image_latents=None if image is None else self._encode_image(image, size),
            image_embeds=None if image is None or self.image_encoder is None else self._clip_image(image, size[1]),
        )

    @torch.no_grad()
    def _clip_image(self, image: np.ndarray, width: int) -> torch.Tensor:
        """I2VGen-XL's image embedding, as its pipeline makes it: the image scaled to cover a
        width x width square and centre-cropped, resized to CLIP's input, normalised, encoded.

        The crop and resize are diffusers' own helpers (private, in the deprecated pipeline's
        module), called rather than rewritten so that the pixels are the same to the bit.
        """
        from diffusers.pipelines.deprecated.i2vgen_xl.pipeline_i2vgen_xl import _center_crop_wide, _resize_bilinear
        from PIL import Image

        crop = self.feature_extractor.crop_size
        square = _resize_bilinear(
            _center_crop_wide(Image.fromarray(image), (width, width)), (crop["width"], crop["height"])
        )
        pixels = self.video_processor.numpy_to_pt(self.video_processor.pil_to_numpy(square))
        pixels = self.feature_extractor(
            images=pixels,
            do_normalize=True,
            do_center_crop=False,
            do_resize=False,
            do_rescale=False,
            return_tensors="pt",
        ).pixel_values
        embeds = self.image_encoder(pixels.to(self.device, dtype=self.image_encoder.dtype)).image_embeds
        return embeds.unsqueeze(1).cpu()
