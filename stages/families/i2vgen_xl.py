"""I2VGen-XL: image to video, top to bottom, as diffusers' `I2VGenXLPipeline` makes it.

- components: a CLIP tokenizer and text encoder, a CLIP vision encoder and its image
  processor, the 3D `I2VGenXLUNet`, an image VAE (`AutoencoderKL`, frame by frame), DDIM;
- conditioning: CLIP's text states with the pipeline's `clip_skip=1`; the image scaled to cover
  the video's size and centre-cropped, through the VAE's encoder; and the image's CLIP embedding;
- initial latents: noise (channels, frames, h, w); the image's latents then a ramp 1/(F-1) ... 1
  for the later frames, joined along channels by the UNet;
- one step: the UNet's noise prediction, uncond + g (cond - uncond), the scheduler stepping
  frame by frame;
- split over a denoiser group: the UNet's sequence is not split; CFG-parallel runs one guidance
  branch per rank and gathers the predictions;
- frames: the image VAE frame by frame (the pipeline's `decode_chunk_size` 1).

The pipeline is deprecated in diffusers (it warns whenever one is built), so its helpers are
not called on a pipeline object here; the lines that follow them say which.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from stages.families.base import Conditioning, Denoising, ImageLatents, ModelFamily
from stages.tiny import build_clip_tokenizer


class I2VGenXL(ModelFamily):
    name = "i2vgen-xl"
    denoiser_key = "unet"
    image_fit = "crop"
    splits_sequence = False

    @property
    def max_text_tokens(self) -> int:
        return int(self.spec.text_tokens or 77)  # CLIP's

    @property
    def spatial_multiple(self) -> int:
        """The VAE's downsampling times the UNet's."""
        blocks = self.spec.components["unet"].config["block_out_channels"]
        return self.vae_scale_spatial * 2 ** (len(blocks) - 1)

    def build_tokenizer(self) -> Any:
        return build_clip_tokenizer()

    # -- encoding --------------------------------------------------------------------------------

    def load_encoder(self, weights: Path, device: torch.device) -> SimpleNamespace:
        from diffusers.video_processor import VideoProcessor

        keys = ("text_encoder", "vae", "image_encoder")
        parts = {key: self.load(key, weights, device) for key in keys}
        parts["tokenizer"], parts["feature_extractor"] = (
            self.load("tokenizer", weights),
            self.load("feature_extractor", weights),
        )
        # the image is cropped to the video's size, so the processor does not resize it again
        parts["video_processor"] = VideoProcessor(vae_scale_factor=self.vae_scale_spatial, do_resize=False)
        return SimpleNamespace(**parts)

    @torch.no_grad()
    def encode(self, encoder, prompt, negative_prompt, guidance, image, size, frames=None) -> Conditioning:
        return Conditioning(
            prompt=self._embed(encoder, prompt),
            negative=self._embed(encoder, negative_prompt) if guidance else None,
            image_latents=None if image is None else self._encode_image(encoder, image, size),
            image_embeds=None if image is None else self._clip_image(encoder, image, size[1]),
        )

    def _embed(self, encoder: SimpleNamespace, text: str) -> torch.Tensor:
        """The pipeline's encode_prompt with clip_skip=1: the second-to-last layer, normed.
        Written out because the pipeline reads the norm from `text_model`, which transformers 5
        no longer has (the norm is on the model itself)."""
        tokenizer, text_encoder = encoder.tokenizer, encoder.text_encoder
        inputs = tokenizer([text], padding="max_length", max_length=self.max_text_tokens, truncation=True,
                           add_special_tokens=True, return_tensors="pt")  # fmt: skip
        hidden = text_encoder(inputs.input_ids.to(text_encoder.device), output_hidden_states=True).hidden_states[-2]
        norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
        return norm(hidden).to(dtype=text_encoder.dtype).cpu()

    def _encode_image(self, encoder: SimpleNamespace, image: np.ndarray, size: tuple[int, int]) -> ImageLatents:
        """The latent distribution of the image scaled to cover `size` and centre-cropped (the
        pipeline's crop helper, so that the pixels are the same to the bit)."""
        from diffusers.pipelines.deprecated.i2vgen_xl.pipeline_i2vgen_xl import _center_crop_wide
        from PIL import Image

        height, width = size
        vae = encoder.vae
        pixels = encoder.video_processor.preprocess(_center_crop_wide(Image.fromarray(image), (width, height)))
        pixels = pixels.to(vae.device, dtype=encoder.image_encoder.dtype)  # (1, 3, H, W): an image VAE
        parameters = vae.encode(pixels).latent_dist.parameters
        return ImageLatents(parameters=parameters.cpu(), scale=vae.config.scaling_factor)

    def _clip_image(self, encoder: SimpleNamespace, image: np.ndarray, width: int) -> torch.Tensor:
        """The image's CLIP embedding, as the pipeline's `_encode_image`: the image scaled to
        cover a width x width square and centre-cropped, resized to CLIP's input, normalised."""
        from diffusers.pipelines.deprecated.i2vgen_xl.pipeline_i2vgen_xl import _center_crop_wide, _resize_bilinear
        from PIL import Image

        processor, extractor, image_encoder = encoder.video_processor, encoder.feature_extractor, encoder.image_encoder
        crop = extractor.crop_size
        square = _resize_bilinear(
            _center_crop_wide(Image.fromarray(image), (width, width)), (crop["width"], crop["height"])
        )
        pixels = processor.numpy_to_pt(processor.pil_to_numpy(square))
        pixels = extractor(images=pixels, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False,
                           return_tensors="pt").pixel_values  # fmt: skip
        return image_encoder(pixels.to(image_encoder.device, dtype=image_encoder.dtype)).image_embeds.unsqueeze(1).cpu()

    # -- denoising -------------------------------------------------------------------------------

    def start(self, network, scheduler, conditioning, r, context, device) -> Denoising:
        return I2VGenXLDenoising(self, network, scheduler, conditioning, r, context, device)

    # -- decoding --------------------------------------------------------------------------------

    def vae_input(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        return 1 / vae.config.scaling_factor * latents.to(vae.device, vae.dtype)

    def decode(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        """(1, C, frames, h, w) through the image VAE one frame at a time (the pipeline's
        `decode_latents` with decode_chunk_size 1)."""
        batch, channels, count, height, width = z.shape
        z = z.permute(0, 2, 1, 3, 4).reshape(batch * count, channels, height, width)
        decoded = torch.cat([vae.decode(z[i : i + 1]).sample for i in range(len(z))])
        return decoded[None].reshape(batch, count, *decoded.shape[1:]).permute(0, 2, 1, 3, 4).float()


class I2VGenXLDenoising(Denoising):
    """One job, step for step as `I2VGenXLPipeline.__call__`; latents (1, channels, frames, h, w).

    diffusers draws the image's latents from the global random generator; framecast draws them
    from a generator of their own seeded with the job's seed, which is the same draw as
    diffusers' after `torch.manual_seed(seed)` (on the CPU), and never depends on what else the
    process drew before.
    """

    def __init__(self, family: I2VGenXL, unet, scheduler, conditioning: Conditioning, r, context, device):
        from diffusers.utils.torch_utils import randn_tensor

        self.unet, self.scheduler, self.r, self.context = unet, scheduler, r, context
        self.guidance = r.do_classifier_free_guidance
        if conditioning.image_latents is None or conditioning.image_embeds is None:
            raise ValueError(f"{family.spec.name} is image-to-video: it needs the image's latents and embedding")
        prompt = conditioning.prompt.to(device)
        image_embeds = conditioning.image_embeds.to(device)
        if self.guidance:
            prompt = torch.cat([conditioning.negative.to(device), prompt])
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])

        # as the pipeline's prepare_image_latents (its sample drawn from a generator of our own, see above)
        image = conditioning.image_latents
        first = image.sample(torch.Generator("cpu").manual_seed(r.seed), device) * image.scale
        first = first.unsqueeze(2)  # (1, C, 1, h, w); then each later frame's distance from it, 1/(F-1) ... 1
        ramp = [torch.ones_like(first[:, :, :1]) * ((k + 1) / (r.num_frames - 1)) for k in range(r.num_frames - 1)]
        image_latents = (torch.cat([first, *ramp], dim=2) if ramp else first).contiguous()
        if self.guidance:
            image_latents = torch.cat([image_latents] * 2)
        fps = torch.tensor([r.fps] * (2 if self.guidance else 1)).to(device)

        scheduler.set_timesteps(r.steps, device=device)
        self.timesteps = scheduler.timesteps
        generator = torch.Generator("cpu").manual_seed(r.seed)
        scale = family.vae_scale_spatial  # as the pipeline's prepare_latents
        shape = (1, unet.config.in_channels, r.num_frames, r.height // scale, r.width // scale)
        self.latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt.dtype)
        self.latents = self.latents * scheduler.init_noise_sigma
        # as the pipeline's prepare_extra_step_kwargs: eta 0 and the job's generator, where the step takes them
        params = inspect.signature(scheduler.step).parameters
        self.step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in params}

        self.branch = context.branch_of if context is not None else (lambda x: x)  # CFG-parallel: this rank's
        self.conditions = {
            "encoder_hidden_states": self.branch(prompt),
            "fps": self.branch(fps),
            "image_latents": self.branch(image_latents),
            "image_embeddings": self.branch(image_embeds),
        }

    def step(self, index: int, t: torch.Tensor) -> None:
        scheduler, latents = self.scheduler, self.latents
        model_input = torch.cat([latents] * 2) if self.guidance else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = self.unet(self.branch(model_input), t, **self.conditions, return_dict=False)[0]
        if self.context is not None:
            noise_pred = self.context.gather_branches(noise_pred)
        if self.guidance:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.r.guidance_scale * (cond - uncond)
        # the scheduler steps frame by frame: (batch x frames, channels, h, w)
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        noise_pred = noise_pred.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        flat = scheduler.step(noise_pred, t, flat, **self.step_kwargs).prev_sample
        self.latents = flat[None, :].reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    def result(self) -> torch.Tensor:
        return self.latents.cpu()

    def video_tokens(self) -> float:
        _, _, frames, h, w = self.latents.shape
        return float(frames * h * w)
