"""Z-Image (Turbo): one picture, top to bottom, as diffusers' `ZImagePipeline` makes it.

- components: a Qwen3 language model as text encoder, the single-stream
  `ZImageTransformer2DModel`, an image VAE (`AutoencoderKL` with a shift), a flow-matching
  Euler scheduler;
- conditioning: the language model's second-to-last hidden states over the prompt written as a
  user turn of its chat template, the prompt's own tokens only (the pipeline's `encode_prompt`);
- initial latents: float32 noise (the pipeline's `prepare_latents`);
- one step: the timestep as (1000 - t) / 1000, guidance as cond + g (cond - uncond) (so 0 turns
  it off), the negated prediction stepped;
- split over a denoiser group: the image tokens (padded to Z-Image's multiple of 32) are split
  evenly, the caption is replicated; the forward is written out for one shard (see
  `sharded_forward`) and its attention done by the group;
- frames: unscaled and unshifted latents through the image VAE: one frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stages.context_parallel import ContextParallel, SequenceShards
from stages.families.base import Conditioning, Denoising, ModelFamily
from stages.tiny import build_qwen_tokenizer

PATCH = "2-1"  # patch size 2, frame patch size 1: Z-Image's only patching


class ZImage(ModelFamily):
    name = "zimage"
    helper_pipeline = "diffusers.ZImagePipeline"
    guidance_off = 0.0
    repeated_blocks = ("ZImageTransformerBlock",)  # as diffusers' own `_repeated_blocks`

    @property
    def max_text_tokens(self) -> int:
        return int(self.spec.text_tokens or 512)  # the pipeline's max_sequence_length

    def build_tokenizer(self) -> Any:
        return build_qwen_tokenizer()

    # -- encoding --------------------------------------------------------------------------------

    def encoder_text(self, tokenizer: Any, text: str) -> str:
        """The prompt as a user turn in the language model's chat template (as the pipeline writes it)."""
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)

    def load_encoder(self, weights: Path, device: torch.device) -> Any:
        return self._pipeline(
            tokenizer=self.load("tokenizer", weights), text_encoder=self.load("text_encoder", weights, device)
        )

    @torch.no_grad()
    def encode(self, encoder, prompt, negative_prompt, guidance, image, size, frames=None) -> Conditioning:
        positive, negative = encoder.encode_prompt(
            prompt,
            device=encoder.text_encoder.device,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt,
            max_sequence_length=self.max_text_tokens,
        )
        return Conditioning(prompt=positive[0][None].cpu(), negative=negative[0][None].cpu() if guidance else None)

    # -- denoising -------------------------------------------------------------------------------

    def split_over(self, network: torch.nn.Module, context: ContextParallel) -> None:
        processor = ZImageContextParallelAttnProcessor(context)
        for module in network.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(processor)

    def start(self, network, scheduler, conditioning, r, context, device) -> Denoising:
        return ZImageDenoising(self, network, scheduler, conditioning, r, context, device)

    # -- decoding --------------------------------------------------------------------------------

    def vae_input(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(vae.device, vae.dtype)
        return (z / vae.config.scaling_factor) + vae.config.shift_factor

    def decode(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z, return_dict=False)[0].unsqueeze(2)  # one picture: one frame


class ZImageDenoising(Denoising):
    """One picture, step for step as `ZImagePipeline.__call__`: float32 latents, the scheduler's
    shift from the image's token count, sigmas from 1 to 1/steps."""

    def __init__(self, family: ZImage, network, scheduler, conditioning: Conditioning, r, context, device):
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, retrieve_timesteps

        self.network, self.scheduler, self.r, self.context = network, scheduler, r, context
        self.guidance = r.do_classifier_free_guidance
        self.captions = [conditioning.prompt[0].to(device)]  # (tokens, dim): the prompt's own tokens
        if self.guidance:
            self.captions.append(conditioning.negative[0].to(device))
        pipe = family._pipeline(transformer=network, scheduler=scheduler)
        generator = torch.Generator("cpu").manual_seed(r.seed)
        self.latents = pipe.prepare_latents(1, network.in_channels, r.height, r.width, torch.float32, device, generator)
        config, shape = scheduler.config, self.latents.shape
        self.tokens = (shape[2] // 2) * (shape[3] // 2)
        mu = calculate_shift(
            self.tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / r.steps, r.steps).tolist()
        self.timesteps, _ = retrieve_timesteps(scheduler, r.steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        if context is not None:  # image tokens (padded to Z-Image's multiple of 32), split evenly
            padded = self.tokens + (-self.tokens) % SEQ_MULTI_OF
            context.shards = SequenceShards.balanced(padded, context.layout.sequence_degree, 1)

    def step(self, index: int, t: torch.Tensor) -> None:
        timestep = (1000 - t.expand(1)) / 1000
        batch = self.latents.to(self.network.dtype)
        if self.guidance:  # the positive prompt first in the batch
            batch, timestep = batch.repeat(2, 1, 1, 1), timestep.repeat(2)
        outputs = self._forward(list(batch.unsqueeze(2).unbind(dim=0)), timestep)
        if self.guidance:
            positive, negative = outputs[0].float(), outputs[1].float()
            prediction = (positive + self.r.guidance_scale * (positive - negative))[None]
        else:
            prediction = torch.stack([out.float() for out in outputs])
        prediction = -prediction.squeeze(2)
        self.latents = self.scheduler.step(prediction.to(torch.float32), t, self.latents, return_dict=False)[0]

    def _forward(self, images: list, timestep: torch.Tensor) -> list[torch.Tensor]:
        """The transformer's prediction for each (C, 1, H, W) latent: diffusers' forward on one
        process, else `sharded_forward` for each guidance item of this rank."""
        network, context = self.network, self.context
        if context is None:
            return network(images, timestep, self.captions, return_dict=False)[0]
        # CFG-parallel: this rank computes its branch and the gather brings both; otherwise each
        # guidance item in turn, each gathered on its own
        items = [context.branch] if context.layout.cfg == 2 else range(len(images))
        shards = [sharded_forward(network, context, images[i], timestep[i : i + 1], self.captions[i]) for i in items]
        gathered = torch.cat([context.gather_slices(shard, dim=1) for shard in shards])
        size = [tuple(images[0].shape[1:])]
        return [network.unpatchify([row], size, 2, 1)[0] for row in gathered]

    def result(self) -> torch.Tensor:
        return self.latents.cpu()

    def video_tokens(self) -> float:
        return float(self.context.shards.padded if self.context is not None else self.tokens)


def sharded_forward(
    model, context: ContextParallel, image: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor
) -> torch.Tensor:
    """`ZImageTransformer2DModel.forward` for one latent on this rank's share of its image
    tokens; returns the final layer's output for those tokens (1, local tokens, patch values).

    Written out, not hooked: the stock forward builds one padded, masked sequence per batch item
    from the whole image (`_prepare_sequence`, `_build_unified_sequence`), with no point between
    its steps where a shard could be taken and put back, so it stays one copy here, held to the
    stock forward by the equality tests (every layout against one process).

    As diffusers: patchify, embed, refine the image tokens (noise refiner) and the caption
    (context refiner) apart, then the main layers over [image, caption]. The image tokens are
    this rank's shard everywhere (their rotary rows too); the caption is replicated. One item at
    a time, so no attention mask is needed (diffusers masks a shorter caption in a batch: the
    same keys either way).
    """
    processor = next(m.processor for m in model.modules() if hasattr(m, "set_processor"))  # the group's, one for all
    adaln = model.t_embedder(timestep * model.t_scale).type_as(image)
    (patches,), (caption,), _, (image_ids,), (caption_ids,), (image_pad,), (caption_pad,) = model.patchify_and_embed(
        [image], [caption], 2, 1
    )
    tokens = torch.where(image_pad.unsqueeze(-1), model.x_pad_token, model.all_x_embedder[PATCH](patches))
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
    return model.all_final_layer[PATCH](unified[:, : local.shape[1]], c=adaln)


class ZImageContextParallelAttnProcessor:
    """Z-Image's attention processor (diffusers' `ZSingleStreamAttnProcessor`: projections, QK
    norms, complex rotary embedding) with the attention itself done by a ContextParallel group.

    Z-Image attends in three places, and the forward pass says which by setting `image_tokens`
    before each: the noise refiner (this rank's image shard alone: `image_tokens` is all of it),
    the context refiner (the caption, replicated on every rank: None, plain attention) and the
    main layers (this rank's image shard, then the replicated caption tokens).
    """

    def __init__(self, context: ContextParallel):
        self.context = context
        self.image_tokens: int | None = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("context-parallel attention runs one unpadded sequence at a time; it takes no mask")
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:  # as diffusers: in float32 complex numbers, back to the input's dtype
            q, k = (_rotate(x, freqs_cis) for x in (q, k))
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (batch, heads, tokens, dim)
        if self.image_tokens is None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            n = self.image_tokens
            text_out, image_out = self.context.attention(
                [x[:, :, n:] for x in (q, k, v)], [x[:, :, :n] for x in (q, k, v)]
            )
            out = torch.cat([image_out, text_out], dim=2)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding: pairs of channels as complex numbers times `freqs_cis`."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)
