"""What a model family adapter is: the one interface the shared stages call.

A family (CogVideoX, Z-Image, I2VGen-XL, ...) is one module in this folder holding everything
specific to it, in the order of a generation: how its components load, how a prompt (and an
image) becomes conditioning, the initial latents, one denoising step (the model's prediction,
guidance, the scheduler step), how its forward pass is split over a denoiser group, and how
latents become frames. The shared stages (`stages.encoder`, `stages.denoiser`,
`stages.decoder`) keep what every family has in common: devices, the one denoising loop with
its per-step callback, peak memory, and tile plans.

A family is named by `family:` in a model's YAML; `stages.families.family_for` maps the name to
its adapter class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from stages.context_parallel import ContextParallel, ParallelLayout
from stages.models import ComponentSpec, ModelSpec, load_component
from stages.settings import GenerationRequest


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
    the prompt's embeddings (1, tokens, dim), the negative prompt's (None when classifier-free
    guidance is off), and for image-to-video the image's latent distribution and, for families
    that also condition on it, the image's embedding (1, 1, dim), or the image as latents over
    the video."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    image_latents: ImageLatents | None = None
    image_embeds: torch.Tensor | None = None
    # The image as latents over the whole video, ready for the denoiser (Wan: the VAE's encoding
    # of the image followed by blank frames, normalised, with Wan 2.1's frame mask in front).
    image_condition: torch.Tensor | None = None


class Denoising(ABC):
    """One job's denoising, in progress: its timesteps, its latents and its scheduler.

    The shared loop (`DenoiserStage.denoise`) calls `step` once per timestep, in order, then
    `result`. A family's subclass holds the job's state; nothing outside it reads or writes that.
    """

    timesteps: torch.Tensor

    @abstractmethod
    def step(self, index: int, timestep: torch.Tensor) -> None:
        """One denoising step: the model's prediction, guidance, the scheduler's step."""

    @abstractmethod
    def result(self) -> torch.Tensor:
        """The denoised latents, on the CPU, in the layout the family's `vae_input` takes."""

    @abstractmethod
    def video_tokens(self) -> float:
        """The tokens (of the video or image) this rank's network held per forward pass."""


class ModelFamily(ABC):
    """A model family's adapter, bound to one model spec. Subclasses fill in the class
    attributes and the abstract methods; the defaults suit a transformer with a video VAE."""

    name: ClassVar[str]
    # The denoising network's component in the weights (a transformer, or a UNet).
    denoiser_key: ClassVar[str] = "transformer"
    # The guidance scale at which the family's pipeline skips the unconditional branch: 1 for
    # uncond + g (cond - uncond), 0 for cond + g (cond - uncond).
    guidance_off: ClassVar[float] = 1.0
    # How the pipeline fits an image to the video: "stretch" (resized to the size as it is) or
    # "crop" (scaled to cover, centre-cropped).
    image_fit: ClassVar[str] = "stretch"
    # Whether the family has diffusers' dynamic (cosine-scheduled) guidance.
    dynamic_guidance: ClassVar[bool] = False
    # Whether the network's token sequence can be split over a denoiser group (else CFG-parallel only).
    splits_sequence: ClassVar[bool] = True
    # Whether its VAE decodes in tiles that may be shared over decoders (`stages.decoder`).
    tiled_decode: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    # -- facts from the spec, before any weights load ------------------------------------------

    @property
    def vae_scale_spatial(self) -> int:
        """Pixels per latent pixel: the VAE halves height and width once per block after the first."""
        return 2 ** (len(self.spec.components["vae"].config["block_out_channels"]) - 1)

    @property
    def vae_scale_temporal(self) -> int:
        """Frames per latent frame (1 for a VAE that encodes frame by frame)."""
        return int(self.spec.components["vae"].config.get("temporal_compression_ratio", 1))

    @property
    def heads(self) -> int:
        """Attention heads of the denoiser (what a Ulysses degree must divide)."""
        config = self.spec.components[self.denoiser_key].config
        return int(config.get("num_attention_heads") or config.get("n_heads") or 1)

    @property
    def spatial_multiple(self) -> int:
        """Height and width must divide by this (VAE downsampling times the network's patching)."""
        patch = int(self.spec.components[self.denoiser_key].config.get("patch_size", 2))
        return self.vae_scale_spatial * patch

    @property
    @abstractmethod
    def max_text_tokens(self) -> int:
        """How many text tokens the denoiser takes at most."""

    def check_request(self, r: GenerationRequest) -> str | None:
        """Why this family cannot run request `r` (one line naming the setting), or None."""
        return None

    def check_layout(self, r: GenerationRequest, layout: ParallelLayout) -> str | None:
        """Why this family cannot split request `r`'s forward pass as `layout` (the heads are
        checked for every family, by `stages.context_parallel.layout_problem`), or None."""
        return None

    @abstractmethod
    def build_tokenizer(self) -> Any:
        """A small offline tokenizer of the family's kind, for test models built here (`stages.tiny`)."""

    # Step caching (stages.cache): the kinds of diffusers' cache hooks this family's denoiser
    # takes, besides none; and whether one forward call holds both guidance branches (a batch of
    # two, so the branches share one cache decision) or each branch is its own call and cache
    # context, as the family's pipeline does it.
    cache_kinds: ClassVar[tuple[str, ...]] = ()
    branches_in_one_call: ClassVar[bool] = True

    # The diffusers pipeline whose helpers (encode_prompt, prepare_latents, ...) the adapter calls.
    helper_pipeline: ClassVar[str | None] = None
    helper_components: ClassVar[tuple[str, ...]] = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")

    def _pipeline(self, **components: Any) -> Any:
        """`helper_pipeline` over the components at hand (the others None), for its helpers. The
        VAE's factors come from the spec, as a stage may not hold the VAE: each pipeline keeps them
        under its own names (one factor for an image pipeline, spatial and temporal for video)."""
        pipeline_class = ComponentSpec(self.helper_pipeline).load_class()
        pipe = pipeline_class(**{k: components.get(k) for k in self.helper_components}, **self.spec.pipeline_config)
        factors = {"vae_scale_factor": self.vae_scale_spatial, "vae_scale_factor_spatial": self.vae_scale_spatial,
                   "vae_scale_factor_temporal": self.vae_scale_temporal}  # fmt: skip
        for name, value in factors.items():
            if hasattr(pipe, name):
                setattr(pipe, name, value)
        return pipe

    def load(self, key: str, weights: Path, device: torch.device | None = None) -> Any:
        """One component of the weights, as the spec names it."""
        return load_component(self.spec, key, weights, device)

    # -- encoding --------------------------------------------------------------------------------

    def encoder_text(self, tokenizer: Any, text: str) -> str:
        """The text the tokenizer reads for a prompt (a template may wrap it)."""
        return text

    @abstractmethod
    def load_encoder(self, weights: Path, device: torch.device) -> Any:
        """The encoder's components (a tokenizer first of all: `.tokenizer`)."""

    @abstractmethod
    def encode(
        self,
        encoder: Any,
        prompt: str,
        negative_prompt: str,
        guidance: bool,
        image: np.ndarray | None,
        size: tuple[int, int] | None,
        frames: int | None = None,
    ) -> Conditioning:
        """The prompt's (and with `guidance` the negative prompt's) embeddings; with an `image`,
        what the family conditions on from it, at the video's `size` (height, width) and its
        number of `frames` (for a family whose condition spans the video, as Wan 2.1 I2V's)."""

    def _text_conditioning(self, encoder: Any, prompt: str, negative_prompt: str, guidance: bool) -> Conditioning:
        """The text half of `encode` for a helper pipeline whose `encode_prompt` pads to
        `max_sequence_length` and returns both prompts' states (CogVideoX's and Wan's)."""
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

    def load_denoiser(self, weights: Path, device: torch.device) -> torch.nn.Module:
        return self.load(self.denoiser_key, weights, device)

    def split_over(self, network: torch.nn.Module, context: ContextParallel) -> None:
        """Make the network one rank of a denoiser group (an attention processor, hooks). The
        default, for a network whose sequence is not split, changes nothing: CFG-parallel only."""
        return None

    def denoiser_networks(self, network: Any) -> list[torch.nn.Module]:
        """The modules of the denoiser `load_denoiser` returns (a family with several says which)."""
        return [network]

    # The denoiser's repeated transformer block classes, for regional compilation where the
    # diffusers model class names none (`_repeated_blocks`; stages.acceleration).
    repeated_blocks: ClassVar[tuple[str, ...]] = ()

    def fuse_projections(self, network: Any) -> None:
        """With `compile`, on one process: fuse the attention's projections into one matrix product
        where diffusers offers it (the default: nothing to fuse)."""
        return None

    def use_attention(self, network: Any, kernel: str, device: torch.device) -> None:
        """Make the denoiser's attention use SDPA kernel `kernel` (stages.acceleration). The
        default does nothing: the stage runs the loop inside `attention_kernel(kernel)`, which
        steers every `scaled_dot_product_attention` call."""
        return None

    @abstractmethod
    def start(
        self,
        network: torch.nn.Module,
        scheduler: Any,
        conditioning: Conditioning,
        r: GenerationRequest,
        context: ContextParallel | None,
        device: torch.device,
    ) -> Denoising:
        """A job's denoising on `device`, ready for its first step: initial latents drawn,
        timesteps set. The stage names the device: an offloaded network's parameters sit in host
        memory until its forward pass brings them (`stages.acceleration.Offload`)."""

    # -- decoding --------------------------------------------------------------------------------

    def load_decoder(self, weights: Path, device: torch.device) -> Any:
        """The VAE that turns the family's latents into frames."""
        return self.load("vae", weights, device)

    @property
    def default_tile_size(self) -> tuple[int, int]:
        """Tiles when tiling is on and no size is given (pixels): half the VAE's sample size, as
        diffusers' CogVideoX VAE tiles (240x360 for 480x720)."""
        vae = self.spec.components["vae"].config
        return int(vae["sample_height"]) // 2, int(vae["sample_width"]) // 2

    # Bytes an untiled decode adds per output pixel of every frame, in a 2-byte dtype, as measured
    # on a GPU (bench/gpu.py): what the decoder weighs against free memory to tile by itself
    # (stages.decoder). None: never tiled for memory.
    untiled_decode_bytes_per_pixel: ClassVar[float | None] = None

    def untiled_decode_bytes(self, z: torch.Tensor) -> float | None:
        """What decoding `vae_input`'s tensor `z` (batch, channels, latent frames, h, w) untiled
        would add to the device's memory, or None where unknown."""
        if self.untiled_decode_bytes_per_pixel is None or z.dim() != 5:
            return None
        frames = (z.shape[2] - 1) * self.vae_scale_temporal + 1
        pixels = frames * z.shape[3] * z.shape[4] * self.vae_scale_spatial**2
        return pixels * self.untiled_decode_bytes_per_pixel * z.element_size() / 2

    # The default tile overlap as fractions of the tile's height and width (diffusers' CogVideoX VAE).
    tile_overlap_fractions: ClassVar[tuple[float, float]] = (1 / 6, 1 / 5)

    @property
    def tile_output(self) -> tuple[int, bool]:
        """(patch, clamp): how `decode_tile`'s output is blended (see `stages.decoder.TilePlan`)."""
        return 1, False

    def decode_tile(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        """A tile of `vae_input`'s tensor -> its decoded pixels as the VAE's own tiled decode
        blends them (the default: as `decode` makes them)."""
        return self.decode(vae, z)

    @abstractmethod
    def vae_input(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> what `vae.decode` takes, on the VAE's device and dtype."""

    def decode(self, vae: Any, z: torch.Tensor) -> torch.Tensor:
        """`vae_input`'s tensor (or a tile of it) -> (1, 3, frames, H, W) in [-1, 1]."""
        return vae.decode(z).sample
