"""Denoising: the CogVideoX transformer and its scheduler loop with classifier-free guidance
(and, for image-to-video, the image's latents joined to the video's along channels).

The loop follows diffusers' `CogVideoXPipeline.__call__` step for step (same noise, same
timesteps, same guidance arithmetic and dtype casts), so that for the same weights, seed and
settings the latents are equal; `tests/test_diffusers_equality.py` holds it to that. It is written
out here rather than calling the pipeline because framecast needs the loop itself: a progress
callback per step, and the forward pass sharded over a context-parallel group.

With a `ParallelLayout` of more than one rank, this stage is one rank of a denoiser group: every
rank runs this same loop on the whole (small) latent tensor, so the scheduler steps and their
random draws are identical everywhere, while the transformer forward pass, where the memory and
the time go, is split by `_sharded_forward` and gathered back after the last block.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from diffusers.utils.torch_utils import randn_tensor

from stages.context_parallel import (
    ContextParallel,
    ContextParallelAttnProcessor,
    ParallelLayout,
    SequenceShards,
    choose_layout,
)
from stages.device import PeakMemory, default_device, describe
from stages.encoder import Conditioning
from stages.models import ModelSpec, load_component
from stages.request import GenerationRequest

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


class DenoiserStage:
    def __init__(
        self,
        spec: ModelSpec,
        weights: Path,
        device: torch.device | None = None,
        layout: ParallelLayout | None = None,
        collective_timeout_s: float | None = None,
    ):
        self.spec = spec
        self.device = device or default_device()
        self.transformer = load_component(spec, "transformer", weights, self.device)
        if self.transformer.ofs_embedding is not None:  # CogVideoX 1.5-I2V: conditioned on an image offset
            raise ValueError(f"{spec.name}: CogVideoX 1.5 image-to-video (an ofs embedding) is not supported")
        # The weights' scheduler config; a request may name another scheduler class built from it.
        self.scheduler_config = spec.components["scheduler"].load_class().load_config(weights, subfolder="scheduler")
        self.context = None
        if layout is not None and layout.world_size > 1:
            timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
            self.context = ContextParallel(layout, timeout)
            self.transformer.set_attn_processor(ContextParallelAttnProcessor(self.context))
        self._peak_memory = PeakMemory(self.device)
        self._last_run: dict[str, float] = {}

    def describe(self) -> str:
        return describe(self.device)

    def last_run_stats(self) -> dict[str, float]:
        """This rank's figures for its last `denoise`: peak memory (MiB) and video tokens it held."""
        return dict(self._last_run)

    def latent_shape(self, r: GenerationRequest) -> tuple[tuple[int, int, int, int, int], int]:
        """The initial noise's shape (batch, latent frames, channels, h, w) and its padding frames.

        CogVideoX 1.5 patches pairs of latent frames, so an odd count gets padding frames at the
        front, which are dropped after denoising (as diffusers does).
        """
        frames = (r.num_frames - 1) // self.spec.vae_scale_temporal + 1
        p_t = self.transformer.config.patch_size_t
        padding = 0 if p_t is None or frames % p_t == 0 else p_t - frames % p_t
        channels = self.transformer.config.in_channels
        shape = (
            1,
            frames + padding,
            channels // 2 if self.spec.takes_image else channels,  # image-to-video: half are the image's
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

    def _positional_embedding(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """CogVideoX 2b's sin-cos (or I2V's learned) embedding for text + all video tokens, or None.

        The same tensor `CogVideoXPatchEmbed` adds; computed once per job here so that each rank
        can take its own rows of it.
        """
        embed = self.transformer.patch_embed
        if not (embed.use_positional_embeddings or embed.use_learned_positional_embeddings):
            return None
        _, frames, _, height, width = shape
        pre_compression_frames = (frames - 1) * embed.temporal_compression_ratio + 1
        if (embed.sample_height, embed.sample_width, embed.sample_frames) == (height, width, pre_compression_frames):
            return embed.pos_embedding
        if embed.use_learned_positional_embeddings and (embed.sample_height, embed.sample_width) != (height, width):
            scale = self.spec.vae_scale_spatial  # as diffusers refuses it: the learned table fits one size
            size = f"{embed.sample_height * scale}x{embed.sample_width * scale}"
            raise ValueError(f"{self.spec.name} has learned positional embeddings for {size} only")
        return embed._get_positional_embeddings(height, width, pre_compression_frames, device=self.device)

    def _shard_job(self, shape: tuple[int, ...], rotary, dtype: torch.dtype):
        """Once per job: this rank's share of the tokens, and its rows of the position tables.

        Returns the local rotary (cos, sin) rows and the (text, local video) positional rows, so
        that the per-step forward pass only adds them.
        """
        context, p = self.context, self.transformer.config.patch_size
        p_t = self.transformer.config.patch_size_t or 1
        tokens = (shape[3] // p) * (shape[4] // p)  # per latent frame (CogVideoX 1.0) or frame pair (1.5)
        context.shards = SequenceShards.balanced(shape[1] // p_t, context.layout.sequence_degree, tokens)
        if rotary is not None:
            rotary = tuple(context.local_slices(r, dim=0, slice_size=tokens) for r in rotary)
        positions = self._positional_embedding(shape)
        if positions is not None:
            positions = positions.to(dtype=dtype)
            text_len = self.transformer.patch_embed.max_text_seq_length
            positions = (positions[:, :text_len], context.local_slices(positions[:, text_len:], 1, tokens))
        return rotary, positions

    def _predict_noise(self, latents, prompt_embeds, timestep, rotary, positions) -> torch.Tensor:
        if self.context is None:
            return self.transformer(
                hidden_states=latents,
                encoder_hidden_states=prompt_embeds,
                timestep=timestep,
                image_rotary_emb=rotary,
                return_dict=False,
            )[0]
        return self._sharded_forward(latents, prompt_embeds, timestep, rotary, positions)

    def _sharded_forward(self, latents, prompt_embeds, timestep, rotary, positions) -> torch.Tensor:
        """`CogVideoXTransformer3DModel.forward` on this rank's frames; returns every rank's output.

        Step for step as diffusers' forward (time embedding, patch embedding, blocks, output
        norm and projection, unpatchify), except that the video tokens are only this rank's
        shard: its frames, its rows of the positional and rotary embeddings (`rotary` and
        `positions` are those rows, from `_shard_job`). The blocks are diffusers' own; their
        attention processor is the context-parallel one.
        """
        context, model = self.context, self.transformer
        embed, p, p_t = model.patch_embed, model.config.patch_size, model.config.patch_size_t or 1
        latents, prompt_embeds, timestep = (context.branch_of(x) for x in (latents, prompt_embeds, timestep))
        batch, _, channels, height, width = latents.shape

        t_emb = model.time_proj(timestep).to(dtype=latents.dtype)
        emb = model.time_embedding(t_emb, None)

        text = embed.text_proj(prompt_embeds)
        local = context.local_slices(latents, dim=1, slice_size=p_t)
        if embed.patch_size_t is None:
            video = embed.proj(local.reshape(-1, channels, height, width))
            video = video.view(batch, local.shape[1], *video.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)
        else:
            video = local.permute(0, 1, 3, 4, 2).reshape(batch, -1, p_t, height // p, p, width // p, p, channels)
            video = embed.proj(video.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4, 7).flatten(1, 3))
        if positions is not None:  # this rank's rows, from _shard_job
            text_positions, video_positions = positions
            # The table's text part is max_text_seq_length long, as diffusers assumes the prompt is.
            assert text.shape[1] == text_positions.shape[1], "prompt embeddings must be padded to the maximum"
            text, video = text + text_positions, video + video_positions
        text, video = model.embedding_dropout(text), model.embedding_dropout(video)

        for block in model.transformer_blocks:
            video, text = block(hidden_states=video, encoder_hidden_states=text, temb=emb, image_rotary_emb=rotary)

        video = model.proj_out(model.norm_out(model.norm_final(video), temb=emb))
        slices = local.shape[1] // p_t
        if model.config.patch_size_t is None:
            out = video.reshape(batch, slices, height // p, width // p, -1, p, p)
            out = out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        else:
            out = video.reshape(batch, slices, height // p, width // p, -1, p_t, p, p)
            out = out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
        return context.gather_slices(out, dim=1, slice_size=p_t)

    @torch.no_grad()
    def denoise(
        self, embeddings: Conditioning, r: GenerationRequest, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        """Returns the denoised latents (1, latent frames, channels, h, w) on the CPU."""
        guidance = r.do_classifier_free_guidance
        prompt_embeds = embeddings.prompt.to(self.device)
        if guidance:
            prompt_embeds = torch.cat([embeddings.negative.to(self.device), prompt_embeds])

        scheduler_class = self.spec.scheduler_class(r.scheduler or self.spec.scheduler_name(None))
        scheduler = scheduler_class.from_config(self.scheduler_config)  # fresh state per job
        scheduler.set_timesteps(r.steps, device=self.device)
        timesteps = scheduler.timesteps

        generator = torch.Generator("cpu").manual_seed(r.seed)
        shape, padding = self.latent_shape(r)
        # Image-to-video: the image's latents are drawn first, as diffusers draws them.
        image_latents = self._image_latents(embeddings, shape, generator, prompt_embeds.dtype)
        if image_latents is not None and guidance:
            image_latents = torch.cat([image_latents] * 2)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator)
        rotary = self._rotary_embedding(r, shape[1])
        positions = None  # the single-process forward adds them itself
        if self.context is not None:
            rotary, positions = self._shard_job(shape, rotary, prompt_embeds.dtype)
        dpm = "old_pred_original_sample" in inspect.signature(scheduler.step).parameters

        self._peak_memory.reset()
        old_pred_original_sample = None
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if image_latents is not None:  # joined along channels
                model_input = torch.cat([model_input, image_latents], dim=2)
            timestep = t.expand(model_input.shape[0])
            noise_pred = self._predict_noise(model_input, prompt_embeds, timestep, rotary, positions).float()
            if guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_at(r, t.item()) * (cond - uncond)
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

        self._last_run = {"peak_memory_mib": self._peak_memory.peak_mib(), "video_tokens": self._video_tokens(shape)}
        return latents[:, padding:].cpu()

    def _image_latents(
        self, conditioning: Conditioning, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The first frame's latents drawn from the encoder's distribution, scaled, then zeros for
        the other latent frames: (1, latent frames, C, h, w), or None for text-to-video."""
        image = conditioning.image
        if not self.spec.takes_image:
            if image is not None:
                raise ValueError(f"{self.spec.name} makes video from text alone; it takes no image")
            return None
        if image is None:
            raise ValueError(f"{self.spec.name} is image-to-video: it needs the image's latents")
        mean, std = image.mean.to(self.device), image.std.to(self.device)
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
        first = image.scale * sample.to(dtype).permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w)
        return torch.cat([first, first.new_zeros((1, shape[1] - 1, *first.shape[2:]))], dim=1)

    def _video_tokens(self, shape: tuple[int, ...]) -> float:
        """Video tokens this rank's transformer holds: all of them, or its padded shard."""
        if self.context is not None:
            return float(self.context.shards.padded * self.context.shards.tokens_per_slice)
        p, p_t = self.transformer.config.patch_size, self.transformer.config.patch_size_t or 1
        return float(shape[1] // p_t * (shape[3] // p) * (shape[4] // p))


def guidance_at(r: GenerationRequest, timestep: float) -> float:
    """The guidance scale at a step: `r.guidance_scale`, or with `r.dynamic_guidance` diffusers'
    CogVideoX cosine schedule, 1 + g (1 - cos(pi ((steps - t) / steps)^5)) / 2.

    As in diffusers, t is the step's timestep value (999 ... 0), not the step's index, so the
    base of the power is negative and large and the scale swings between 1 and 1 + g from step
    to step (docs/sweeps.md). It is reproduced as is: the point is to equal diffusers' output.
    """
    if not r.dynamic_guidance:
        return r.guidance_scale
    progress = (r.steps - timestep) / r.steps
    return 1 + r.guidance_scale * ((1 - math.cos(math.pi * progress**5.0)) / 2)


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


def plan_layout(
    spec: ModelSpec,
    r: GenerationRequest,
    workers: int | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    cfg_parallel: bool = False,
) -> ParallelLayout:
    """The denoiser group's layout for this model and request (see `choose_layout`)."""
    heads = spec.components["transformer"].config["num_attention_heads"]
    return choose_layout(heads, r.do_classifier_free_guidance, workers, ulysses, ring, cfg_parallel)


def plan_serving_layout(
    spec: ModelSpec, workers: int, ulysses: int | None = None, ring: int | None = None
) -> ParallelLayout:
    """A layout that runs every request, guided or not, for a denoiser group built once and kept
    (a Serve replica's): without CFG-parallel, which needs two guidance branches."""
    heads = spec.components["transformer"].config["num_attention_heads"]
    return choose_layout(heads, False, workers, ulysses, ring, cfg_parallel=False)
