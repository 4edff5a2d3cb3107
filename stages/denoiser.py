"""Denoising: each family's scheduler loop around its denoising network, with classifier-free
guidance: CogVideoX's transformer (for image-to-video, the image's latents joined to the video's
along channels), Z-Image's single-stream transformer, I2VGen-XL's UNet.

Each loop follows its diffusers pipeline's `__call__` step for step (same noise, same timesteps,
same guidance arithmetic and dtype casts), so that for the same weights, seed and settings the
latents are equal; the equality tests hold it to that (docs/models.md). It is written out here
rather than calling the pipeline because framecast needs the loop itself: a progress callback
per step, and the forward pass split over a denoiser group.

With a `ParallelLayout` of more than one rank, this stage is one rank of a denoiser group: every
rank runs this same loop on the whole (small) latent tensor, so the scheduler steps and their
random draws are identical everywhere, while the forward pass, where the memory and the time go,
is split (CogVideoX: `_sharded_forward`; Z-Image: `_zimage_sharded`; I2VGen-XL's UNet: one
guidance branch per rank) and gathered back.
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
    ZImageContextParallelAttnProcessor,
    choose_layout,
)
from stages.device import PeakMemory, default_device, describe
from stages.encoder import Conditioning
from stages.errors import InvalidRequest
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
        self.transformer = load_component(spec, spec.denoiser_key, weights, self.device)
        if getattr(self.transformer, "ofs_embedding", None) is not None:  # CogVideoX 1.5-I2V: an image offset
            raise ValueError(f"{spec.name}: CogVideoX 1.5 image-to-video (an ofs embedding) is not supported")
        # The weights' scheduler config; a request may name another scheduler class built from it.
        self.scheduler_config = spec.components["scheduler"].load_class().load_config(weights, subfolder="scheduler")
        self.context = self._processor = None
        if layout is not None and layout.world_size > 1:
            timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
            self.context = ContextParallel(layout, timeout)
            processors = {"cogvideox": ContextParallelAttnProcessor, "zimage": ZImageContextParallelAttnProcessor}
            if spec.family in processors:  # (a UNet runs CFG-parallel only: its attention stays as it is)
                self._processor = processors[spec.family](self.context)  # one, shared by every attention layer
                for module in self.transformer.modules():
                    if hasattr(module, "set_processor"):
                        module.set_processor(self._processor)
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
            channels // 2 if self.spec.takes_image else channels,  # CogVideoX-I2V: half are the image's
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
        self, conditioning: Conditioning, r: GenerationRequest, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        """Returns the denoised latents on the CPU: (1, latent frames, channels, h, w) for
        CogVideoX, (1, channels, frames, h, w) for I2VGen-XL, (1, channels, h, w) for Z-Image's picture."""
        if self.spec.family == "zimage":
            return self._denoise_zimage(conditioning, r, on_step)
        if self.spec.family == "i2vgen-xl":
            return self._denoise_i2vgen(conditioning, r, on_step)
        guidance = r.do_classifier_free_guidance
        prompt_embeds = conditioning.prompt.to(self.device)
        if guidance:
            prompt_embeds = torch.cat([conditioning.negative.to(self.device), prompt_embeds])

        scheduler_class = self.spec.scheduler_class(r.scheduler or self.spec.scheduler_name(None))
        scheduler = scheduler_class.from_config(self.scheduler_config)  # fresh state per job
        scheduler.set_timesteps(r.steps, device=self.device)
        timesteps = scheduler.timesteps

        generator = torch.Generator("cpu").manual_seed(r.seed)
        shape, padding = self.latent_shape(r)
        # Image-to-video: the image's latents are drawn first, as diffusers draws them.
        image_latents = self._image_latents(conditioning, shape, generator, prompt_embeds.dtype)
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

    # -- Z-Image ------------------------------------------------------------------------------

    def _denoise_zimage(
        self, conditioning: Conditioning, r: GenerationRequest, on_step: StepCallback | None
    ) -> torch.Tensor:
        """Z-Image's flow-matching loop, step for step as diffusers' `ZImagePipeline.__call__`:
        float32 latents, the scheduler's shift from the image's token count, sigmas from 1 to
        1/steps, the timestep as (1000 - t) / 1000, guidance as cond + g (cond - uncond) (the
        positive prompt first in the batch) and the negated prediction stepped."""
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, retrieve_timesteps

        model, guidance = self.transformer, r.do_classifier_free_guidance
        captions = [conditioning.prompt[0].to(self.device)]  # (tokens, dim): the prompt's own tokens
        if guidance:
            captions.append(conditioning.negative[0].to(self.device))
        scheduler = self.spec.scheduler_class(r.scheduler).from_config(self.scheduler_config)
        generator = torch.Generator("cpu").manual_seed(r.seed)
        per_token = self.spec.vae_scale_spatial * 2  # latent pixels come in 2x2 patches
        shape = (1, model.in_channels, 2 * (r.height // per_token), 2 * (r.width // per_token))
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        config, tokens = scheduler.config, (shape[2] // 2) * (shape[3] // 2)
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / r.steps, r.steps).tolist()
        timesteps, _ = retrieve_timesteps(scheduler, r.steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        if self.context is not None:  # image tokens (padded to Z-Image's multiple of 32), split evenly
            padded = tokens + (-tokens) % SEQ_MULTI_OF
            self.context.shards = SequenceShards.balanced(padded, self.context.layout.sequence_degree, 1)

        self._peak_memory.reset()
        for i, t in enumerate(timesteps):
            timestep = (1000 - t.expand(1)) / 1000
            batch = latents.to(model.dtype)
            if guidance:
                batch, timestep = batch.repeat(2, 1, 1, 1), timestep.repeat(2)
            outputs = self._zimage_forward(list(batch.unsqueeze(2).unbind(dim=0)), timestep, captions)
            if guidance:
                positive, negative = outputs[0].float(), outputs[1].float()
                prediction = (positive + r.guidance_scale * (positive - negative))[None]
            else:
                prediction = torch.stack([out.float() for out in outputs])
            prediction = -prediction.squeeze(2)
            latents = scheduler.step(prediction.to(torch.float32), t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(timesteps))

        shards = self.context.shards if self.context is not None else None
        self._last_run = {
            "peak_memory_mib": self._peak_memory.peak_mib(),
            "video_tokens": float(shards.padded if shards else tokens),
        }
        return latents.cpu()

    def _zimage_forward(self, images: list, timestep: torch.Tensor, captions: list) -> list[torch.Tensor]:
        """The transformer's prediction for each (C, 1, H, W) latent: diffusers' forward on one
        process, else `_zimage_sharded` for each guidance item of this rank."""
        if self.context is None:
            return self.transformer(images, timestep, captions, return_dict=False)[0]
        # CFG-parallel: this rank computes its branch and the gather brings both; otherwise each
        # guidance item in turn, each gathered on its own
        items = [self.context.branch] if self.context.layout.cfg == 2 else range(len(images))
        gathered = torch.cat([
            self.context.gather_slices(self._zimage_sharded(images[i], timestep[i : i + 1], captions[i]), dim=1)
            for i in items
        ])  # fmt: skip
        size = [tuple(images[0].shape[1:])]
        return [self.transformer.unpatchify([row], size, 2, 1)[0] for row in gathered]

    def _zimage_sharded(self, image: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """`ZImageTransformer2DModel.forward` for one latent on this rank's share of its image
        tokens; returns the final layer's output for those tokens (1, local tokens, patch values).

        As diffusers: patchify, embed, refine the image tokens (noise refiner) and the caption
        (context refiner) apart, then the main layers over [image, caption]. The image tokens
        are this rank's shard everywhere (their rotary rows too); the caption is replicated.
        One item at a time, so no attention mask is needed (diffusers masks a shorter caption
        in a batch: the same keys either way).
        """
        model, context, processor = self.transformer, self.context, self._processor
        key = "2-1"  # patch size 2, frame patch size 1: Z-Image's only patching
        adaln = model.t_embedder(timestep * model.t_scale).type_as(image)
        (patches,), (caption,), _, (image_ids,), (caption_ids,), (image_pad,), (caption_pad,) = (
            model.patchify_and_embed([image], [caption], 2, 1)
        )
        tokens = torch.where(image_pad.unsqueeze(-1), model.x_pad_token, model.all_x_embedder[key](patches))
        local = context.local_slices(tokens[None], dim=1)
        # (diffusers makes a caption's position ids longer than its tokens and cuts the rotary rows to them)
        local_freqs = context.local_slices(model.rope_embedder(image_ids)[None, : len(tokens)], dim=1)
        processor.image_tokens = local.shape[1]
        for layer in model.noise_refiner:
            local = layer(local, None, local_freqs, adaln)

        text = torch.where(caption_pad.unsqueeze(-1), model.cap_pad_token, model.cap_embedder(caption))[None]
        text_freqs = model.rope_embedder(caption_ids)[None, : text.shape[1]]
        processor.image_tokens = None  # the caption alone: every rank has all of it
        for layer in model.context_refiner:
            text = layer(text, None, text_freqs)

        unified, freqs = torch.cat([local, text], dim=1), torch.cat([local_freqs, text_freqs], dim=1)
        processor.image_tokens = local.shape[1]
        for layer in model.layers:
            unified = layer(unified, None, freqs, adaln)
        return model.all_final_layer[key](unified[:, : local.shape[1]], c=adaln)

    # -- I2VGen-XL -----------------------------------------------------------------------------

    def _denoise_i2vgen(
        self, conditioning: Conditioning, r: GenerationRequest, on_step: StepCallback | None
    ) -> torch.Tensor:
        """I2VGen-XL's loop, step for step as diffusers' `I2VGenXLPipeline.__call__`; returns
        latents (1, channels, frames, h, w). With CFG-parallel each rank runs the UNet on its
        guidance branch and the predictions are gathered (the UNet's sequence is not split).

        diffusers draws the image's latents from the global random generator; framecast draws
        them from a generator of their own seeded with the job's seed, which is the same draw as
        diffusers' after `torch.manual_seed(seed)` (on the CPU), and never depends on what else
        the process drew before.
        """
        unet, guidance = self.transformer, r.do_classifier_free_guidance
        if conditioning.image_latents is None or conditioning.image_embeds is None:
            raise ValueError(f"{self.spec.name} is image-to-video: it needs the image's latents and embedding")
        prompt = conditioning.prompt.to(self.device)
        image_embeds = conditioning.image_embeds.to(self.device)
        if guidance:
            prompt = torch.cat([conditioning.negative.to(self.device), prompt])
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])

        # diffusers draws this sample from the global generator; here one of its own (see above)
        image = conditioning.image_latents
        first = image.sample(torch.Generator("cpu").manual_seed(r.seed), self.device) * image.scale
        first = first.unsqueeze(2)  # (1, C, 1, h, w); then each later frame's distance from it, 1/(F-1) ... 1
        ramp = [torch.ones_like(first[:, :, :1]) * ((k + 1) / (r.num_frames - 1)) for k in range(r.num_frames - 1)]
        image_latents = (torch.cat([first, *ramp], dim=2) if ramp else first).contiguous()
        if guidance:
            image_latents = torch.cat([image_latents] * 2)
        fps = torch.tensor([r.fps] * (2 if guidance else 1)).to(self.device)

        scheduler = self.spec.scheduler_class(r.scheduler).from_config(self.scheduler_config)
        scheduler.set_timesteps(r.steps, device=self.device)
        generator = torch.Generator("cpu").manual_seed(r.seed)
        scale = self.spec.vae_scale_spatial
        shape = (1, unet.config.in_channels, r.num_frames, r.height // scale, r.width // scale)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=prompt.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator)

        branch = self.context.branch_of if self.context is not None else (lambda x: x)  # CFG-parallel: this rank's
        conditions = dict(encoder_hidden_states=branch(prompt), fps=branch(fps), image_latents=branch(image_latents),
                          image_embeddings=branch(image_embeds))  # fmt: skip

        self._peak_memory.reset()
        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = unet(branch(model_input), t, **conditions, return_dict=False)[0]
            if self.context is not None:
                noise_pred = self.context.gather_branches(noise_pred)
            if guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + r.guidance_scale * (cond - uncond)
            # the scheduler steps frame by frame: (batch x frames, channels, h, w)
            b, c, f, h, w = latents.shape
            flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            noise_pred = noise_pred.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            flat = scheduler.step(noise_pred, t, flat, **step_kwargs).prev_sample
            latents = flat[None, :].reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
            if on_step is not None:
                on_step(i + 1, len(scheduler.timesteps))

        self._last_run = {"peak_memory_mib": self._peak_memory.peak_mib(), "video_tokens": float(r.num_frames * h * w)}
        return latents.cpu()

    # -- image-to-video ------------------------------------------------------------------------

    def _image_latents(
        self, conditioning: Conditioning, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The first frame's latents drawn from the encoder's distribution, scaled, then zeros for
        the other latent frames: (1, latent frames, C, h, w), or None for text-to-video."""
        if conditioning.image_latents is None:
            return None
        image = conditioning.image_latents
        sample = image.sample(generator, self.device)  # (1, C, 1, h, w): the image is one frame
        first = image.scale * sample.to(dtype).permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w), as diffusers
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
    return choose_layout(
        spec.heads, r.do_classifier_free_guidance, workers, ulysses, ring, cfg_parallel, spec.sequence_parallel
    )


def plan_serving_layout(
    spec: ModelSpec, workers: int, ulysses: int | None = None, ring: int | None = None
) -> ParallelLayout:
    """A layout that runs every request, guided or not, for a denoiser group built once and kept
    (a Serve replica's): without CFG-parallel, which needs two guidance branches."""
    if not spec.sequence_parallel and workers > 1:
        raise InvalidRequest(
            f"{spec.name}'s UNet cannot split its sequence over workers, and a served denoiser group runs "
            f"no CFG-parallel (a request may turn guidance off): serve it with --workers 1"
        )
    return choose_layout(spec.heads, False, workers, ulysses, ring, cfg_parallel=False)
