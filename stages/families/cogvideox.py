"""CogVideoX (1.0: 2b, 5b; 1.5; 5b-I2V): one generation, top to bottom, as diffusers'
`CogVideoXPipeline` / `CogVideoXImageToVideoPipeline` makes it.

- components: a T5 tokenizer and encoder, `CogVideoXTransformer3DModel`, the 3D
  `AutoencoderKLCogVideoX` (4x in time), a DDIM or DPM scheduler;
- conditioning: T5 states of the prompt padded to the maximum (the pipeline's `encode_prompt`);
  for image-to-video, the VAE encoder's distribution over the image stretched to the video's size;
- initial latents: the pipeline's `prepare_latents` (CogVideoX 1.5 pads an odd number of latent
  frames at the front); image-to-video draws the image's sample first, as diffusers does;
- one step: the transformer's v-prediction, uncond + g (cond - uncond) with the optional cosine
  schedule (`use_dynamic_cfg`), the scheduler's step (DPM takes its previous prediction too);
- split over a denoiser group: the stock forward on this rank's latent frames, with the
  context-parallel attention processor and a hook that gives the patch embedding this rank's
  rows of the position table;
- frames: unscaled latents through the VAE, whole or in tiles (`stages.decoder`).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.context_parallel import ContextParallel, SequenceShards
from stages.families.base import Conditioning, Denoising, ImageLatents, ModelFamily
from stages.settings import GenerationRequest
from stages.tiny import build_tokenizer


class CogVideoX(ModelFamily):
    name = "cogvideox"
    helper_pipeline = "diffusers.CogVideoXPipeline"  # text-to-video's helpers serve image-to-video too
    dynamic_guidance = True
    tiled_decode = True
    cache_kinds = ("fbc", "pab", "taylorseer")
    repeated_blocks = ("CogVideoXBlock",)  # diffusers' CogVideoX transformer names none
    # 49 frames of 480x720 (16.9 M output pixels) decoded untiled added 14.74 GiB in bf16 on one
    # H200 (bench/gpu.py, bench/RESULTS.md "GPU"; about 15 GiB on the reference H100).
    untiled_decode_bytes_per_pixel = 935.0

    @property
    def max_text_tokens(self) -> int:
        """The prompt is padded to exactly this (the transformer's max_text_seq_length)."""
        return self.spec.text_tokens or int(self.spec.components["transformer"].config["max_text_seq_length"])

    @property
    def unsupported(self) -> str | None:
        """Why framecast cannot run this model at all, or None."""
        if self.spec.components["transformer"].config.get("ofs_embed_dim"):
            return f"{self.spec.name}: CogVideoX 1.5 image-to-video (an ofs embedding) is not supported"
        return None

    def check_request(self, r: GenerationRequest) -> str | None:
        return self.unsupported

    def build_tokenizer(self) -> Any:
        return build_tokenizer()

    # -- encoding --------------------------------------------------------------------------------

    def load_encoder(self, weights: Path, device: torch.device) -> Any:
        parts = {
            "tokenizer": self.load("tokenizer", weights),
            "text_encoder": self.load("text_encoder", weights, device),
        }
        if self.spec.takes_image:  # the VAE's encoder turns the image into the first latent frame
            parts["vae"] = self.load("vae", weights, device)
        return self._pipeline(**parts)

    @torch.no_grad()
    def encode(self, encoder, prompt, negative_prompt, guidance, image, size, frames=None) -> Conditioning:
        conditioning = self._text_conditioning(encoder, prompt, negative_prompt, guidance)
        if image is None:
            return conditioning
        return replace(conditioning, image_latents=self._encode_image(encoder, image, size))

    def _encode_image(self, encoder, image: np.ndarray, size: tuple[int, int]) -> ImageLatents:
        """The latent distribution of the image stretched to `size` (height, width). Drawn from
        later, by the denoiser with the job's generator, where diffusers draws it."""
        from PIL import Image

        height, width = size
        pixels = encoder.video_processor.preprocess(Image.fromarray(image), height=height, width=width)
        pixels = pixels.to(encoder.text_encoder.device, dtype=encoder.text_encoder.dtype).unsqueeze(2)
        parameters = encoder.vae.encode(pixels).latent_dist.parameters  # (1, 2C, 1, h, w)
        return ImageLatents(parameters=parameters.cpu(), scale=encoder.vae.config.scaling_factor)

    # -- denoising -------------------------------------------------------------------------------

    def load_denoiser(self, weights: Path, device: torch.device) -> torch.nn.Module:
        if self.unsupported:  # the stage's own guard; requests are refused earlier
            raise ValueError(self.unsupported)
        return self.load("transformer", weights, device)

    def split_over(self, network: torch.nn.Module, context: ContextParallel) -> None:
        processor = ContextParallelAttnProcessor(context)  # one, shared by every attention layer
        for module in network.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(processor)
        _patch_embed_hooks(network).register_hook(shard_positions_hook_class()(), SHARD_POSITIONS)

    def fuse_projections(self, network: torch.nn.Module) -> None:
        """diffusers' fused QKV: one (d, 3d) matrix product per attention instead of three (d, d)
        ones, with its fused processor. Not in a denoiser group, whose processor projects itself.
        diffusers keeps the three separate projections too (to unfuse); nothing here unfuses, so
        they are dropped: 0.66 GB of bf16 weights for 2b, 2.4 GB for 5b."""
        network.fuse_qkv_projections()
        for module in network.modules():
            if getattr(module, "fused_projections", False):
                module.to_q = module.to_k = module.to_v = None

    def start(self, network, scheduler, conditioning, r, context, device) -> Denoising:
        return CogVideoXDenoising(self, network, scheduler, conditioning, r, context, device)

    # -- decoding --------------------------------------------------------------------------------

    def vae_input(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """(1, latent frames, C, h, w) -> (1, C, latent frames, h, w), unscaled for the VAE."""
        z = latents.to(vae.device, vae.dtype).permute(0, 2, 1, 3, 4)
        return 1 / vae.config.scaling_factor * z  # written as diffusers writes it, for bit-equality


class CogVideoXDenoising(Denoising):
    """One job, step for step as the pipelines' `__call__` (same noise, timesteps, guidance
    arithmetic and dtype casts), so that the latents are equal for the same weights and seed."""

    def __init__(self, family: CogVideoX, network, scheduler, conditioning: Conditioning, r, context, device):
        self.network, self.scheduler, self.r, self.context = network, scheduler, r, context
        config = network.config
        self.guidance = r.do_classifier_free_guidance
        prompt = conditioning.prompt.to(device)
        if self.guidance:
            prompt = torch.cat([conditioning.negative.to(device), prompt])
        self.prompt, self.dtype = prompt, prompt.dtype
        pipe = family._pipeline(transformer=network, scheduler=scheduler)

        scheduler.set_timesteps(r.steps, device=device)
        self.timesteps = scheduler.timesteps
        generator = torch.Generator("cpu").manual_seed(r.seed)
        # CogVideoX 1.5 patches pairs of latent frames: an odd count gets padding frames at the
        # front, dropped after denoising (as the pipeline's __call__ pads them).
        frames = (r.num_frames - 1) // family.vae_scale_temporal + 1
        p_t = config.patch_size_t
        self.padding = 0 if p_t is None or frames % p_t == 0 else p_t - frames % p_t
        channels = config.in_channels // 2 if conditioning.image_latents is not None else config.in_channels
        # Image-to-video: the image's latents are drawn first, as diffusers draws them. Written
        # here, not the I2V pipeline's prepare_latents: that one encodes the image itself, and
        # here the encoder stage (maybe on another device) already did.
        self.image_latents = None
        if conditioning.image_latents is not None:
            image = conditioning.image_latents
            sample = image.sample(generator, device)  # (1, C, 1, h, w): the image is one frame
            first = image.scale * sample.to(self.dtype).permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w), as diffusers
            rest = first.new_zeros((1, frames + self.padding - 1, *first.shape[2:]))
            self.image_latents = torch.cat([first, rest], dim=1)
            if self.guidance:
                self.image_latents = torch.cat([self.image_latents] * 2)
        frames_asked = r.num_frames + self.padding * family.vae_scale_temporal
        self.latents = pipe.prepare_latents(1, channels, frames_asked, r.height, r.width, self.dtype, device, generator)
        self.step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)
        self.rotary = None
        if config.use_rotary_positional_embeddings:
            self.rotary = pipe._prepare_rotary_positional_embeddings(r.height, r.width, self.latents.size(1), device)
        self.dpm = "old_pred_original_sample" in inspect.signature(scheduler.step).parameters
        self.old_pred_original_sample = None
        if context is not None:
            self._shard(family)

    def _shard(self, family: CogVideoX) -> None:
        """Once per job: this rank's share of the latent frames, and its rows of the rotary
        table and of the position table (handed to the patch embedding's hook)."""
        context, network, shape = self.context, self.network, self.latents.shape
        p, p_t = network.config.patch_size, network.config.patch_size_t or 1
        tokens = (shape[3] // p) * (shape[4] // p)  # per latent frame (1.0) or frame pair (1.5)
        context.shards = SequenceShards.balanced(shape[1] // p_t, context.layout.sequence_degree, tokens)
        if self.rotary is not None:
            self.rotary = tuple(context.local_slices(x, dim=0, slice_size=tokens) for x in self.rotary)
        positions = _position_table(family, network.patch_embed, shape)
        if positions is not None:
            text_len = network.patch_embed.max_text_seq_length
            video = context.local_slices(positions[:, text_len:], 1, tokens)
            positions = torch.cat([positions[:, :text_len], video], dim=1).to(self.dtype)
        _patch_embed_hooks(network).get_hook(SHARD_POSITIONS).rows = positions

    def _predict(self, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The transformer's prediction for the whole batch: diffusers' forward on one process;
        in a group, the same forward on this rank's frames, gathered from every rank."""
        if self.context is None:
            with self.network.cache_context("cond_uncond"):  # the pipeline's one cache context
                return self.network(
                    hidden_states=model_input,
                    encoder_hidden_states=self.prompt,
                    timestep=timestep,
                    image_rotary_emb=self.rotary,
                    return_dict=False,
                )[0]
        context, p_t = self.context, self.network.config.patch_size_t or 1
        local = context.local_slices(context.branch_of(model_input), dim=1, slice_size=p_t)
        with self.network.cache_context("cond_uncond"):
            out = self.network(
                hidden_states=local,
                encoder_hidden_states=context.branch_of(self.prompt),
                timestep=context.branch_of(timestep),
                image_rotary_emb=self.rotary,  # this rank's rows
                return_dict=False,
            )[0]
        return context.gather_slices(out, dim=1, slice_size=p_t)

    def step(self, index: int, t: torch.Tensor) -> None:
        model_input = torch.cat([self.latents] * 2) if self.guidance else self.latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        if self.image_latents is not None:  # joined along channels
            model_input = torch.cat([model_input, self.image_latents], dim=2)
        noise_pred = self._predict(model_input, t.expand(model_input.shape[0])).float()
        if self.guidance:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_at(self.r, t.item()) * (cond - uncond)
        if self.dpm:
            t_back = self.timesteps[index - 1] if index > 0 else None
            self.latents, self.old_pred_original_sample = self.scheduler.step(
                noise_pred,
                self.old_pred_original_sample,
                t,
                t_back,
                self.latents,
                **self.step_kwargs,
                return_dict=False,
            )
        else:
            self.latents = self.scheduler.step(noise_pred, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        self.latents = self.latents.to(self.dtype)

    def result(self) -> torch.Tensor:
        return self.latents[:, self.padding :].cpu()

    def video_tokens(self) -> float:
        if self.context is not None:
            return float(self.context.shards.padded * self.context.shards.tokens_per_slice)
        p, p_t = self.network.config.patch_size, self.network.config.patch_size_t or 1
        shape = self.latents.shape
        return float(shape[1] // p_t * (shape[3] // p) * (shape[4] // p))


def guidance_at(r: GenerationRequest, timestep: float) -> float:
    """The guidance scale at a step: `r.guidance_scale`, or with `r.dynamic_guidance` diffusers'
    cosine schedule, 1 + g (1 - cos(pi ((steps - t) / steps)^5)) / 2.

    As in diffusers, t is the step's timestep value (999 ... 0), not the step's index, so the
    base of the power is negative and large and the scale swings between 1 and 1 + g from step
    to step (docs/sweeps.md). It is reproduced as is: the point is to equal diffusers' output.
    """
    if not r.dynamic_guidance:
        return r.guidance_scale
    progress = (r.steps - timestep) / r.steps
    return 1 + r.guidance_scale * ((1 - math.cos(math.pi * progress**5.0)) / 2)


# -- the forward pass over a denoiser group ------------------------------------------------------

SHARD_POSITIONS = "framecast_shard_positions"


def _position_table(family: CogVideoX, embed, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The sin-cos (or I2V's learned) table for text + all video tokens that `CogVideoXPatchEmbed`
    adds for latents of `shape`, chosen as it chooses, or None: computed once per job so that
    each rank can take its rows."""
    if not (embed.use_positional_embeddings or embed.use_learned_positional_embeddings):
        return None
    _, frames, _, height, width = shape
    pre_compression_frames = (frames - 1) * embed.temporal_compression_ratio + 1
    if (embed.sample_height, embed.sample_width, embed.sample_frames) == (height, width, pre_compression_frames):
        return embed.pos_embedding
    if embed.use_learned_positional_embeddings and (embed.sample_height, embed.sample_width) != (height, width):
        scale = family.vae_scale_spatial  # as diffusers refuses it: the learned table fits one size
        size = f"{embed.sample_height * scale}x{embed.sample_width * scale}"
        raise ValueError(f"{family.spec.name} has learned positional embeddings for {size} only")
    return embed._get_positional_embeddings(height, width, pre_compression_frames, device=embed.proj.weight.device)


def _patch_embed_hooks(network: torch.nn.Module):
    """The diffusers HookRegistry of the transformer's patch embedding (imported here, as below)."""
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(network.patch_embed)


@functools.cache
def shard_positions_hook_class() -> type:
    """`ShardPositions`, a diffusers `ModelHook`, defined on first use rather than at import:
    the driver, a CLI and a Serve ingress import this module to check requests and load no model,
    and importing diffusers costs each such process seconds of CPU."""
    from diffusers.hooks import ModelHook

    class ShardPositions(ModelHook):
        """A diffusers hook on `CogVideoXPatchEmbed`: the stock embedding of this rank's frames
        without its own position table (which would number the shard's frames from 0), plus this
        rank's rows of the whole video's table (`rows`, set per job).

        The stock forward picks and adds its table inside; switching that off for the call and
        adding the right rows after is the same sum, element by element.
        """

        def __init__(self):
            super().__init__()
            self.rows: torch.Tensor | None = None

        def new_forward(self, module, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
            flags = module.use_positional_embeddings, module.use_learned_positional_embeddings
            module.use_positional_embeddings = module.use_learned_positional_embeddings = False
            try:
                embeds = self.fn_ref.original_forward(text_embeds, image_embeds)
            finally:
                module.use_positional_embeddings, module.use_learned_positional_embeddings = flags
            return embeds if self.rows is None else embeds + self.rows

    return ShardPositions


class ContextParallelAttnProcessor:
    """CogVideoX's attention processor with the attention itself done by a ContextParallel group.

    The projections, QK norms and rotary embedding are those of diffusers'
    `CogVideoXAttnProcessor2_0`, applied to this rank's tokens; `image_rotary_emb` holds the
    rotary rows of this rank's shard. (diffusers' processor calls the attention kernel inline,
    so the part around it is written out here.)
    """

    def __init__(self, context: ContextParallel):
        self.context = context

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("context-parallel attention takes no attention mask (CogVideoX passes none)")
        text_len = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = tokens.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(tokens)), heads(attn.to_k(tokens)), heads(attn.to_v(tokens))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, text_len:] = apply_rotary_emb(q[:, :, text_len:], image_rotary_emb)
            k[:, :, text_len:] = apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)

        split = [(x[:, :, :text_len], x[:, :, text_len:]) for x in (q, k, v)]
        text_out, video_out = self.context.attention([s[0] for s in split], [s[1] for s in split])
        out = torch.cat([text_out, video_out], dim=2).transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        return out[:, text_len:], out[:, :text_len]
