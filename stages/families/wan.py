"""Wan 2.1 and 2.2: one generation, top to bottom, as diffusers' `WanPipeline` and
`WanImageToVideoPipeline` make it.

- components: a T5-style tokenizer and the UMT5 encoder; `WanTransformer3DModel`, or Wan 2.2
  A14B's two experts (`transformer` for the high-noise steps, `transformer_2` after the
  boundary timestep); the causal `AutoencoderKLWan` (2.1: 8x in space; 2.2: 16x, 2x2 patches
  folded into channels; 4x in time); the flow-matching UniPC scheduler; for Wan 2.1 I2V, a CLIP
  image encoder;
- conditioning: UMT5 states of the prompt's own tokens, zero-padded to the maximum (the
  pipeline's `encode_prompt`, which cleans the prompt with ftfy and unescapes HTML); with an
  image, the VAE's encoding of it followed by blank frames over the whole video (the pipeline's
  `prepare_latents`), and for 2.1 its CLIP states (`encode_image`);
- initial latents: float32 noise, (1, z, (frames - 1) / 4 + 1, h, w);
- one step: the expert for this timestep and its guidance scale; the prompt's and the negative
  prompt's forward passes one after the other, uncond + g (cond - uncond), the scheduler's step.
  Image-to-video joins the image's latents along channels (2.1) or writes them into the first
  latent frame, which keeps timestep 0 while every other token has t (2.2, `expand_timesteps`);
- over a denoiser group: diffusers' own context-parallel plan (`stages.diffusers_parallel`);
- frames: latents un-normalised by the VAE's per-channel mean and std, through the Wan VAE,
  whole or in tiles as its `tiled_decode` makes them (`decode_tile`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from stages.acceleration import DIFFUSERS_BACKENDS
from stages.context_parallel import ContextParallel, ParallelLayout
from stages.diffusers_parallel import enable_context_parallelism
from stages.families.base import Conditioning, Denoising, ModelFamily
from stages.settings import GenerationRequest
from stages.tiny import build_tokenizer


class Wan(ModelFamily):
    name = "wan"
    tiled_decode = True
    # Not PAB: its hooks keep one state for all calls, and WanPipeline calls the two guidance
    # branches apart, so the unconditional call would reuse the conditional one's attention.
    cache_kinds = ("fbc", "taylorseer")
    branches_in_one_call = False  # "cond" and "uncond" calls, each its own cache context
    repeated_blocks = ("WanTransformerBlock",)  # as diffusers' own `_repeated_blocks`
    # diffusers' AutoencoderKLWan.enable_tiling defaults: 256 px tiles every 192 px.
    default_tile_size = (256, 256)
    tile_overlap_fractions = (1 / 4, 1 / 4)

    @property
    def helper_pipeline(self) -> str:
        """The model's own pipeline: `WanPipeline`, or `WanImageToVideoPipeline` for image-to-video."""
        return self.spec.pipeline

    @property
    def helper_components(self) -> tuple[str, ...]:
        image = ("image_encoder", "image_processor") if self.spec.takes_image else ()
        return ("tokenizer", "text_encoder", "vae", "transformer", "scheduler", *image)

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.spec.components["vae"].config.get("scale_factor_spatial", 8))

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.spec.components["vae"].config.get("scale_factor_temporal", 4))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The transformer's (frames, rows, columns) of latent pixels per token."""
        return tuple(self.spec.components["transformer"].config.get("patch_size", [1, 2, 2]))

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_spatial * self.patch_size[1]

    def latent_frames(self, num_frames: int) -> int:
        """The VAE keeps the first frame and compresses the rest `vae_scale_temporal` x in time."""
        return (num_frames - 1) // self.vae_scale_temporal + 1

    @property
    def max_text_tokens(self) -> int:
        return int(self.spec.text_tokens or 512)  # the pipeline's max_sequence_length

    def check_layout(self, r: GenerationRequest, layout: ParallelLayout) -> str | None:
        """diffusers' plan cuts the video's tokens into equal shards (`EquipartitionSharder`)."""
        frames = self.latent_frames(r.num_frames) // self.patch_size[0]
        tokens = frames * (r.height // self.spatial_multiple) * (r.width // self.spatial_multiple)
        if tokens % layout.sequence_degree:
            return (
                f"{self.spec.name} splits a video's tokens into equal shards, and {r.num_frames} frames at "
                f"{r.width}x{r.height} are {tokens} tokens, which {layout.sequence_degree} ranks do not divide; "
                f"change the size or frames, or the Ulysses and ring degrees"
            )
        return None

    def build_tokenizer(self) -> Any:
        return build_tokenizer()

    # -- encoding --------------------------------------------------------------------------------

    def load_encoder(self, weights: Path, device: torch.device) -> Any:
        """The text encoder; for image-to-video also the VAE (the image becomes latents here) and,
        for Wan 2.1 I2V, the CLIP image encoder and its processor."""
        components = {"tokenizer": self.load("tokenizer", weights),
                      "text_encoder": self.load("text_encoder", weights, device)}  # fmt: skip
        if self.spec.takes_image:
            for key in ("vae", "image_encoder", "image_processor"):
                if key in self.spec.components:
                    components[key] = self.load(key, weights, None if key == "image_processor" else device)
        return self._pipeline(**components)

    @torch.no_grad()
    def encode(self, encoder, prompt, negative_prompt, guidance, image, size, frames=None) -> Conditioning:
        conditioning = self._text_conditioning(encoder, prompt, negative_prompt, guidance)
        if image is None:
            return conditioning
        return replace(conditioning, **self._encode_image(encoder, image, size, frames))

    def _encode_image(self, encoder: Any, image: np.ndarray, size: tuple[int, int], frames: int) -> dict:
        """What `WanImageToVideoPipeline` takes from the image: the VAE's encoding of the image
        stretched to `size` followed by blank frames (`prepare_latents`: Wan 2.1, with the frame
        mask in front; Wan 2.2 TI2V, the image alone), and for 2.1 the CLIP image encoder's
        penultimate hidden states (`encode_image`)."""
        from PIL import Image

        if frames is None:  # a caller's mistake, not a request's: requests always have a length
            raise ValueError(f"{self.spec.name} encodes the image over the whole video: give its frame count")
        picture = Image.fromarray(image)
        device = encoder.vae.device
        embeds = encoder.encode_image(picture, device).cpu() if encoder.image_encoder is not None else None
        pixels = encoder.video_processor.preprocess(picture, height=size[0], width=size[1])
        pixels = pixels.to(device, dtype=torch.float32)
        shape = (1, encoder.vae.config.z_dim, self.latent_frames(frames), size[0] // self.vae_scale_spatial,
                 size[1] // self.vae_scale_spatial)  # fmt: skip
        blank = torch.zeros(shape, device=device)  # given, so that prepare_latents draws no noise here
        prepared = encoder.prepare_latents(pixels, 1, shape[1], size[0], size[1], frames, torch.float32, device,
                                           None, blank)  # fmt: skip
        return {"image_condition": prepared[1].cpu(), "image_embeds": embeds}

    # -- denoising -------------------------------------------------------------------------------

    def load_denoiser(self, weights: Path, device: torch.device) -> WanExperts:
        high = self.load("transformer", weights, device)
        return WanExperts(high, self.load("transformer_2", weights, device) if self.spec.two_experts else None)

    def split_over(self, network: WanExperts, context: ContextParallel) -> None:
        """diffusers' own context-parallel plan for the Wan transformer(s), over this group's ranks."""
        enable_context_parallelism(network.experts, context.layout)

    def denoiser_networks(self, network: WanExperts) -> list[torch.nn.Module]:
        return network.experts  # each expert its own cache and levers, as the pipeline's two transformers

    def use_attention(self, network: WanExperts, kernel: str, device: torch.device) -> None:
        """On CUDA, diffusers' dispatcher backend of the same kernel (cuDNN or flash), for both
        experts: its context-parallel ring then takes that kernel's log-sum-exp. The efficient and
        math kernels' backends do not take context parallelism in diffusers 0.42, so with those
        (and on the CPU, with the log-sum-exp of `stages.diffusers_parallel`) the native backend
        stays, steered by the stage's `attention_kernel`."""
        if device.type == "cuda" and kernel in ("cudnn", "flash"):  # diffusers' context-parallel backends
            for expert in network.experts:
                expert.set_attention_backend(DIFFUSERS_BACKENDS[kernel])

    def start(self, network: WanExperts, scheduler, conditioning, r, context, device) -> Denoising:
        return WanDenoising(self, network, scheduler, conditioning, r, context, device)

    # -- decoding --------------------------------------------------------------------------------

    def vae_input(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Latents (1, C, latent frames, h, w) -> the VAE's input: un-normalised per channel,
        written as the pipeline writes it, for bit-equality."""
        z = latents.to(vae.device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        return z / std + mean

    def decode(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z, return_dict=False)[0]

    @property
    def tile_output(self) -> tuple[int, bool]:
        """Wan 2.2's VAE folds 2x2 pixels into channels; both VAEs clamp after blending."""
        return int(self.spec.components["vae"].config.get("patch_size") or 1), True

    @torch.no_grad()
    def decode_tile(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        """One tile as `AutoencoderKLWan.tiled_decode` decodes it: frame by frame through the causal
        decoder with its feature cache, before the clamp and the unfolding of 2.2's patches, which
        diffusers does once, after blending. (`vae.decode` of the tile would do both to each tile,
        and `tiled_decode` decodes every tile in one call: hence this loop, written as diffusers'.)"""
        vae.clear_cache()
        frames = []
        for k in range(z.shape[2]):
            vae._conv_idx = [0]
            tile = vae.post_quant_conv(z[:, :, k : k + 1])
            frames.append(vae.decoder(tile, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=k == 0))
        vae.clear_cache()
        return torch.cat(frames, dim=2)


@dataclass(frozen=True)
class WanExperts:
    """A Wan model's denoiser: one transformer (2.1, 2.2 TI2V-5B), or Wan 2.2 A14B's two experts,
    `high` for the high-noise steps (t at or above the boundary) and `low` for the rest."""

    high: torch.nn.Module
    low: torch.nn.Module | None = None

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.high] if self.low is None else [self.high, self.low]


class WanDenoising(Denoising):
    """One job, step for step as `WanPipeline.__call__`: the same noise, timesteps, the expert for
    each step and its guidance scale, the two branches' forward passes one after the other, the
    guidance arithmetic and the dtype casts."""

    def __init__(self, family: Wan, network: WanExperts, scheduler, conditioning: Conditioning, r, context, device):
        self.experts, self.scheduler, self.r, self.context = network, scheduler, r, context
        dtype = network.high.dtype
        self.guidance = r.do_classifier_free_guidance
        self.prompt = conditioning.prompt.to(device, dtype)
        self.negative = conditioning.negative.to(device, dtype) if self.guidance else None
        if context is not None and context.layout.cfg == 2:  # this rank's branch only
            self.branch_prompt = self.negative if context.branch == 0 else self.prompt
        scheduler.set_timesteps(r.steps, device=device)
        scheduler.set_begin_index(0)
        self.timesteps = scheduler.timesteps
        # float32 noise of the VAE's latent shape, drawn as both pipelines' `prepare_latents` draw it
        scale = family.vae_scale_spatial
        shape = (1, family.spec.components["vae"].config["z_dim"], family.latent_frames(r.num_frames),
                 r.height // scale, r.width // scale)  # fmt: skip
        self.patch_size = family.patch_size
        generator = torch.Generator("cpu").manual_seed(r.seed)
        self.latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        self.dtype = dtype
        ratio = family.spec.pipeline_config.get("boundary_ratio")
        self.boundary = None if ratio is None else ratio * scheduler.config.num_train_timesteps
        # Image-to-video: Wan 2.1 takes the image's latents (behind their frame mask) as more input
        # channels and its CLIP states beside the text; Wan 2.2 TI2V puts them in the first latent
        # frame instead, which `mask` (0 there) keeps at timestep 0.
        self.condition = conditioning.image_condition
        self.condition = None if self.condition is None else self.condition.to(device)
        self.image_embeds = None if conditioning.image_embeds is None else conditioning.image_embeds.to(device, dtype)
        # Wan 2.2: a timestep per token, from the mask (all ones for text-to-video).
        self.expand_timesteps = bool(family.spec.pipeline_config.get("expand_timesteps"))
        self.mask = torch.ones(self.latents.shape, dtype=torch.float32, device=device)
        if self.expand_timesteps and self.condition is not None:
            self.mask = torch.ones((1, 1, *self.latents.shape[2:]), dtype=torch.float32, device=device)
            self.mask[:, :, 0] = 0

    def _forward(self, model_input: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                 branch: str = "cond") -> torch.Tensor:  # fmt: skip
        with self.network.cache_context(branch, **self.cache_step):  # as the pipeline names them
            return self.network(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeddings,
                                encoder_hidden_states_image=self.image_embeds, return_dict=False)[0]  # fmt: skip

    def _predictions(self, model_input: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond): in one process one after the other; CFG-parallel, each rank its branch,
        exchanged over the group."""
        if self.context is None or self.context.layout.cfg == 1:
            cond = self._forward(model_input, timestep, self.prompt)
            return cond, self._forward(model_input, timestep, self.negative, "uncond")
        branch = "uncond" if self.context.branch == 0 else "cond"
        mine = self._forward(model_input, timestep, self.branch_prompt, branch)
        uncond, cond = self.context.gather_branches(mine).chunk(2)  # branch 0: the negative prompt's
        return cond, uncond

    def step(self, index: int, t: torch.Tensor) -> None:
        self.cache_step = {"step_index": index, "sigma": float(self.scheduler.sigmas[index]),
                           "num_inference_steps": len(self.timesteps)}  # fmt: skip
        if self.boundary is None or t >= self.boundary:  # Wan 2.1, or 2.2's high-noise steps
            self.network, guidance_scale = self.experts.high, self.r.guidance_scale
        else:
            self.network, guidance_scale = self.experts.low, self.r.guidance_scale_2
        if self.condition is None:
            model_input = self.latents.to(self.dtype)
        elif self.expand_timesteps:
            model_input = ((1 - self.mask) * self.condition + self.mask * self.latents).to(self.dtype)
        else:
            model_input = torch.cat([self.latents, self.condition], dim=1).to(self.dtype)
        if self.expand_timesteps:
            _, rows, columns = self.patch_size  # one timestep per token: the mask at each patch's corner
            timestep = self.mask[0][0][:, ::rows, ::columns] * t
            timestep = timestep.flatten().unsqueeze(0).expand(self.latents.shape[0], -1)
        else:
            timestep = t.expand(self.latents.shape[0])
        if self.guidance:
            cond, uncond = self._predictions(model_input, timestep)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        else:
            noise_pred = self._forward(model_input, timestep, self.prompt)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, return_dict=False)[0]

    def result(self) -> torch.Tensor:
        if self.expand_timesteps and self.condition is not None:  # the image's own first frame
            return ((1 - self.mask) * self.condition + self.mask * self.latents).cpu()
        return self.latents.cpu()

    def video_tokens(self) -> float:
        """This rank's share: diffusers' plan splits the sequence evenly over the branch's ranks."""
        p = self.patch_size
        _, _, frames, height, width = self.latents.shape
        degree = self.context.layout.sequence_degree if self.context is not None else 1
        return float(frames // p[0] * (height // p[1]) * (width // p[2])) / degree
