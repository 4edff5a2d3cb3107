"""Denoising: the CogVideoX transformer and its scheduler loop with classifier-free guidance.

The loop follows diffusers' `CogVideoXPipeline.__call__` step for step (same noise, same
timesteps, same guidance arithmetic and dtype casts), so that for the same weights, seed and
settings the latents are equal; `tests/test_diffusers_equality.py` holds it to that. It is written
out here rather than calling the pipeline because framecast needs the loop itself: a progress
callback per step now, and later sharded attention and split guidance branches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from diffusers.utils.torch_utils import randn_tensor

from stages.device import default_device, describe
from stages.models import ModelSpec, load_component
from stages.request import GenerationRequest
from stages.text_encoder import PromptEmbeddings

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


class DenoiserStage:
    def __init__(self, spec: ModelSpec, weights: Path, device: torch.device | None = None):
        self.spec = spec
        self.device = device or default_device()
        self.transformer = load_component(spec, "transformer", weights, self.device)
        self.scheduler_class = spec.components["scheduler"].load_class()
        self.scheduler_config = self.scheduler_class.load_config(weights, subfolder="scheduler")

    def describe(self) -> str:
        return describe(self.device)

    def latent_shape(self, r: GenerationRequest) -> tuple[tuple[int, int, int, int, int], int]:
        """The initial noise's shape (batch, latent frames, channels, h, w) and its padding frames.

        CogVideoX 1.5 patches pairs of latent frames, so an odd count gets padding frames at the
        front, which are dropped after denoising (as diffusers does).
        """
        frames = (r.num_frames - 1) // self.spec.vae_scale_temporal + 1
        p_t = self.transformer.config.patch_size_t
        padding = 0 if p_t is None or frames % p_t == 0 else p_t - frames % p_t
        shape = (
            1,
            frames + padding,
            self.transformer.config.in_channels,
            r.height // self.spec.vae_scale_spatial,
            r.width // self.spec.vae_scale_spatial,
        )
        return shape, padding

    def _rotary_embedding(self, r: GenerationRequest, latent_frames: int):
        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p, p_t = cfg.patch_size, cfg.patch_size_t
        grid_h = r.height // (self.spec.vae_scale_spatial * p)
        grid_w = r.width // (self.spec.vae_scale_spatial * p)
        base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
        if p_t is None:  # CogVideoX 1.0: crop the grid from the trained base size
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h),
                grid_size=(grid_h, grid_w),
                temporal_size=latent_frames,
                device=self.device,
            )
        return get_3d_rotary_pos_embed(  # CogVideoX 1.5: slice from the maximal grid
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=(grid_h, grid_w),
            temporal_size=(latent_frames + p_t - 1) // p_t,
            grid_type="slice",
            max_size=(base_h, base_w),
            device=self.device,
        )

    @torch.no_grad()
    def denoise(
        self, embeddings: PromptEmbeddings, r: GenerationRequest, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        """Returns the denoised latents (1, latent frames, channels, h, w) on the CPU."""
        guidance = r.do_classifier_free_guidance
        prompt_embeds = embeddings.prompt.to(self.device)
        if guidance:
            prompt_embeds = torch.cat([embeddings.negative.to(self.device), prompt_embeds])

        scheduler = self.scheduler_class.from_config(self.scheduler_config)  # fresh state per job
        scheduler.set_timesteps(r.steps, device=self.device)
        timesteps = scheduler.timesteps

        generator = torch.Generator("cpu").manual_seed(r.seed)
        shape, padding = self.latent_shape(r)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator)
        rotary = self._rotary_embedding(r, shape[1])
        dpm = "old_pred_original_sample" in inspect.signature(scheduler.step).parameters

        old_pred_original_sample = None
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self.transformer(
                hidden_states=model_input,
                encoder_hidden_states=prompt_embeds,
                timestep=t.expand(model_input.shape[0]),
                image_rotary_emb=rotary,
                return_dict=False,
            )[0].float()
            if guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + r.guidance_scale * (cond - uncond)
            if dpm:
                t_back = timesteps[i - 1] if i > 0 else None
                latents, old_pred_original_sample = scheduler.step(
                    noise_pred, old_pred_original_sample, t, t_back, latents, **step_kwargs, return_dict=False
                )
            else:
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            latents = latents.to(prompt_embeds.dtype)
            if on_step is not None:
                on_step(i + 1, len(timesteps))

        return latents[:, padding:].cpu()


def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
    # As diffusers' prepare_extra_step_kwargs: eta 0 (deterministic DDIM) and the job's generator,
    # for the schedulers whose step takes them.
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs
