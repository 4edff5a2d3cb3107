"""Wan (2.1 text-to-video): one generation, top to bottom, as diffusers' `WanPipeline` makes it.

- components: a T5-style tokenizer and the UMT5 encoder, `WanTransformer3DModel`, the causal
  `AutoencoderKLWan` (8x in space, 4x in time), the flow-matching UniPC scheduler;
- conditioning: UMT5 states of the prompt's own tokens, zero-padded to the maximum (the
  pipeline's `encode_prompt`, which also cleans the prompt's whitespace and HTML escapes);
- initial latents: float32 noise, (1, C, (frames - 1) / 4 + 1, h, w) (`prepare_latents`);
- one step: two forward passes, the prompt's and the negative prompt's (not one batch of two, as
  the pipeline runs them), uncond + g (cond - uncond), the scheduler's step;
- frames: latents un-normalised by the VAE's per-channel mean and std, through the Wan VAE.

Not yet here (issue 22): image-to-video, Wan 2.2's two experts and `expand_timesteps`, the
sequence split over a denoiser group (diffusers' context-parallel plans), tiled decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.context_parallel import ContextParallel, ParallelLayout
from stages.diffusers_parallel import enable_context_parallelism
from stages.families.base import Conditioning, Denoising, ModelFamily
from stages.settings import GenerationRequest
from stages.tiny import build_tokenizer


class Wan(ModelFamily):
    name = "wan"
    helper_pipeline = "diffusers.WanPipeline"
    tiled_decode = True
    # diffusers' AutoencoderKLWan.enable_tiling defaults: 256 px tiles every 192 px.
    default_tile_size = (256, 256)
    tile_overlap_fractions = (1 / 4, 1 / 4)

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.spec.components["vae"].config.get("scale_factor_spatial", 8))

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.spec.components["vae"].config.get("scale_factor_temporal", 4))

    @property
    def spatial_multiple(self) -> int:
        patch = self.spec.components["transformer"].config.get("patch_size", [1, 2, 2])
        return self.vae_scale_spatial * int(patch[1])

    @property
    def max_text_tokens(self) -> int:
        return int(self.spec.text_tokens or 512)  # the pipeline's max_sequence_length

    def check_layout(self, r: GenerationRequest, layout: ParallelLayout) -> str | None:
        """diffusers' plan cuts the video's tokens into equal shards (`EquipartitionSharder`)."""
        patch = self.spec.components["transformer"].config.get("patch_size", [1, 2, 2])
        frames = (r.num_frames - 1) // self.vae_scale_temporal + 1
        tokens = frames // patch[0] * (r.height // self.spatial_multiple) * (r.width // self.spatial_multiple)
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
        return self._pipeline(
            tokenizer=self.load("tokenizer", weights), text_encoder=self.load("text_encoder", weights, device)
        )

    @torch.no_grad()
    def encode(self, encoder, prompt, negative_prompt, guidance, image, size) -> Conditioning:
        positive, negative = encoder.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=guidance,
            max_sequence_length=self.max_text_tokens,
            device=encoder.text_encoder.device,
            dtype=encoder.text_encoder.dtype,
        )
        return Conditioning(prompt=positive.cpu(), negative=negative.cpu() if guidance else None)

    # -- denoising -------------------------------------------------------------------------------

    def load_denoiser(self, weights: Path, device: torch.device) -> WanExperts:
        high = self.load("transformer", weights, device)
        return WanExperts(high, self.load("transformer_2", weights, device) if self.spec.two_experts else None)

    def split_over(self, network: WanExperts, context: ContextParallel) -> None:
        """diffusers' own context-parallel plan for the Wan transformer(s), over this group's ranks."""
        for expert in network.experts:
            enable_context_parallelism(expert, context.layout)

    def start(self, network: WanExperts, scheduler, conditioning, r, context) -> Denoising:
        return WanDenoising(self, network, scheduler, conditioning, r, context)

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

    @property
    def device(self) -> torch.device:
        return self.high.device


class WanDenoising(Denoising):
    """One job, step for step as `WanPipeline.__call__`: the same noise, timesteps, the expert for
    each step and its guidance scale, the two branches' forward passes one after the other, the
    guidance arithmetic and the dtype casts."""

    def __init__(self, family: Wan, network: WanExperts, scheduler, conditioning: Conditioning, r, context):
        self.experts, self.scheduler, self.r, self.context = network, scheduler, r, context
        device, dtype = network.device, network.high.dtype
        self.guidance = r.do_classifier_free_guidance
        self.prompt = conditioning.prompt.to(device, dtype)
        self.negative = conditioning.negative.to(device, dtype) if self.guidance else None
        if context is not None and context.layout.cfg == 2:  # this rank's branch only
            self.branch_prompt = self.negative if context.branch == 0 else self.prompt
        pipe = family._pipeline(transformer=network.high, scheduler=scheduler)
        scheduler.set_timesteps(r.steps, device=device)
        scheduler.set_begin_index(0)
        self.timesteps = scheduler.timesteps
        generator = torch.Generator("cpu").manual_seed(r.seed)
        channels = network.high.config.in_channels
        self.latents = pipe.prepare_latents(1, channels, r.height, r.width, r.num_frames, torch.float32, device,
                                            generator)  # fmt: skip
        self.dtype = dtype
        ratio = family.spec.pipeline_config.get("boundary_ratio")
        self.boundary = None if ratio is None else ratio * scheduler.config.num_train_timesteps
        # Wan 2.2 TI2V: a timestep per token (all equal for text-to-video), from a mask of ones.
        self.expand_timesteps = bool(family.spec.pipeline_config.get("expand_timesteps"))
        self.mask = torch.ones(self.latents.shape, dtype=torch.float32, device=device)

    def _forward(self, model_input: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.network(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeddings,
                            return_dict=False)[0]  # fmt: skip

    def _predictions(self, model_input: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond): in one process one after the other; CFG-parallel, each rank its branch,
        exchanged over the group."""
        if self.context is None or self.context.layout.cfg == 1:
            cond = self._forward(model_input, timestep, self.prompt)
            return cond, self._forward(model_input, timestep, self.negative)
        mine = self._forward(model_input, timestep, self.branch_prompt)
        uncond, cond = self.context.gather_branches(mine).chunk(2)  # branch 0: the negative prompt's
        return cond, uncond

    def step(self, index: int, t: torch.Tensor) -> None:
        if self.boundary is None or t >= self.boundary:  # Wan 2.1, or 2.2's high-noise steps
            self.network, guidance_scale = self.experts.high, self.r.guidance_scale
        else:
            self.network, guidance_scale = self.experts.low, self.r.guidance_scale_2
        model_input = self.latents.to(self.dtype)
        if self.expand_timesteps:
            timestep = (self.mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(self.latents.shape[0], -1)
        else:
            timestep = t.expand(self.latents.shape[0])
        if self.guidance:
            cond, uncond = self._predictions(model_input, timestep)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        else:
            noise_pred = self._forward(model_input, timestep, self.prompt)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, return_dict=False)[0]

    def result(self) -> torch.Tensor:
        return self.latents.cpu()

    def video_tokens(self) -> float:
        """This rank's share: diffusers' plan splits the sequence evenly over the branch's ranks."""
        p = self.experts.high.config.patch_size
        _, _, frames, height, width = self.latents.shape
        degree = self.context.layout.sequence_degree if self.context is not None else 1
        return float(frames // p[0] * (height // p[1]) * (width // p[2])) / degree
