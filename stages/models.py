"""Model specs: what `configs/models/*.yaml` says about a model, and where its weights are.

A spec names the diffusers/transformers class of every component, its architecture config,
the dtype, the generation defaults and limits, and where the weights live:

1. an explicit local diffusers directory (`--weights DIR`, or `weights.path` in the YAML);
2. a hub id, resolved from the local Hugging Face cache only (nothing is ever downloaded);
3. for test models, `weights.build`: built offline from the architecture config with seeded
   random weights and saved with `save_pretrained` (see `stages.tiny`).

Whichever way they are found (`stages.weights`), weights are loaded by the same
`from_pretrained` code (`load_component`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.acceleration import Acceleration, parse_acceleration
from stages.errors import InvalidRequest

CONFIG_DIR = Path(os.environ.get("FRAMECAST_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))
MODELS_DIR = CONFIG_DIR / "models"
# The model `generate`, `sweep`, `recommend` and `serve` use when none is named: framecast's own
# demo model, trained on the shapes world, whose weights ship in the repository.
DEFAULT_MODEL = "framecast-shapes"


@dataclass(frozen=True)
class ComponentSpec:
    """One pipeline component: its class (dotted path) and its architecture config."""

    class_path: str
    config: dict[str, Any] = field(default_factory=dict)

    def load_class(self) -> type:
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance_scale: float
    num_frames: int
    fps: int
    height: int
    width: int
    negative_prompt: str = ""
    # The scheduler a request gets when it names none (a short name of `schedulers`, built from
    # the weights' config); unset: the weights' own. CogVideoX-5b's card recommends DPM.
    scheduler: str | None = None
    # Two-expert models (Wan 2.2 A14B): the low-noise expert's guidance scale; unset: guidance_scale.
    guidance_scale_2: float | None = None


@dataclass(frozen=True)
class Limits:
    height: tuple[int, int]
    width: tuple[int, int]
    num_frames: tuple[int, int]
    max_steps: int = 1000
    # Valid frame counts are frame_step*k + 1. For CogVideoX that is 8, not the VAE's 4x temporal
    # compression: its decoder works on latent frames in pairs, so an even number of latent frames
    # (e.g. 13 frames -> 4 latents) decodes to 4 more frames than asked (16), in diffusers too.
    frame_step: int = 1
    # The resolution the model was trained at (height, width): larger sizes are allowed up to the
    # limits, but are warned about (see `stages.request.pitfalls`).
    trained_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class WeightsSpec:
    path: str | None = None
    hub_id: str | None = None
    build_seed: int | None = None  # set only for models built offline from their config


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    kind: str
    description: str
    license: str
    dtype: str
    components: dict[str, ComponentSpec]
    defaults: Defaults
    limits: Limits
    weights: WeightsSpec
    source: Path
    # The stock diffusers pipeline of these weights (what `model_index.json` names): the
    # reference framecast's output is tested equal to, and the class the offline builder saves.
    pipeline: str
    # Text tokens the denoiser takes at most; unset: the family's default (`max_text_tokens`).
    text_tokens: int | None = None
    # Schedulers a request may pick instead of the weights' own: short name -> class path. They
    # are built from the weights' scheduler config (`from_config`), as diffusers' docs swap them.
    schedulers: dict[str, str] = field(default_factory=dict)
    # The world whose detector checks this model's videos against their prompts (a key of
    # stages.clarity.WORLDS, e.g. "shapes"): the panel then records adherence/*.
    adherence: str | None = None
    # The pipeline's own config (model_index.json beside the components), e.g. Wan 2.2's
    # `boundary_ratio` (where its two experts hand over) and `expand_timesteps`.
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    # The stages' speed and memory levers (stages.acceleration): the YAML's defaults, which the
    # flags of a run override.
    acceleration: Acceleration = field(default_factory=Acceleration)

    @property
    def two_experts(self) -> bool:
        """A high-noise `transformer` and a low-noise `transformer_2`, switched at the boundary
        timestep `pipeline_config.boundary_ratio` (`load_spec` refuses one without the other)."""
        return "transformer_2" in self.components

    @property
    def makes_images(self) -> bool:
        """Text-to-image: one frame, written as a PNG."""
        return self.kind == "t2i"

    @property
    def default_codec(self) -> str:
        """How a generation is stored unless asked otherwise (stages.video_io.CODECS): a PNG
        picture, or an H.264 MP4 video."""
        return "png" if self.makes_images else "h264"

    @property
    def takes_image(self) -> bool:
        """Image-to-video: every request must bring the first frame's image."""
        return self.kind == "i2v"

    @property
    def trained_size(self) -> tuple[int, int]:
        return self.limits.trained_size or (self.defaults.height, self.defaults.width)

    def scheduler_choices(self) -> dict[str, str]:
        """Every scheduler a request may name, by short name and by class name -> class path;
        the weights' own scheduler always among them."""
        own = self.components["scheduler"].class_path
        paths = {**self.schedulers, own.rsplit(".", 1)[-1]: own}
        return {**paths, **{path.rsplit(".", 1)[-1]: path for path in paths.values()}}

    def scheduler_name(self, name: str | None) -> str:
        """The class name of the scheduler `name` (a short name or class name; None: the weights' own)."""
        choices = self.scheduler_choices()
        name = name or self.defaults.scheduler
        if name is None:
            return self.components["scheduler"].class_path.rsplit(".", 1)[-1]
        if name not in choices:
            raise InvalidRequest(f"unknown scheduler {name!r} for {self.name}; choose one of {', '.join(choices)}")
        return choices[name].rsplit(".", 1)[-1]

    def scheduler_class(self, class_name: str) -> type:
        return ComponentSpec(self.scheduler_choices()[class_name]).load_class()

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        """The spec as loaded (for the run record), with component classes and configs."""
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.kind,
            "license": self.license,
            "dtype": self.dtype,
            "pipeline": self.pipeline,
            "components": {k: {"class": c.class_path, "config": c.config} for k, c in self.components.items()},
            "defaults": asdict(self.defaults),
            "limits": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.limits).items()},
            "source": str(self.source),
            "schedulers": dict(self.schedulers),
            "adherence": self.adherence,
            "acceleration": self.acceleration.as_params(),
        }


KIND_NAMES = {"t2v": "text-to-video", "i2v": "image-to-video", "t2i": "text-to-image"}


def known_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def image_models() -> list[str]:
    """The configured image-to-video models."""
    return [name for name in known_models() if load_spec(name).takes_image]


def load_spec(name: str) -> ModelSpec:
    if not MODELS_DIR.is_dir():
        raise InvalidRequest(f"no model configs at {MODELS_DIR}; set FRAMECAST_CONFIG_DIR to framecast's configs/")
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InvalidRequest(f"unknown model {name!r}; known models: {', '.join(known_models())}")
    raw = yaml.safe_load(path.read_text())
    weights = raw.get("weights") or {}
    limits = raw["limits"]
    spec = ModelSpec(
        name=raw["name"],
        family=raw["family"],
        kind=raw["kind"],
        description=raw.get("description", ""),
        license=raw.get("license", "unknown"),
        dtype=raw.get("dtype", "float32"),
        components={
            key: ComponentSpec(class_path=c["class"], config=dict(c.get("config") or {}))
            for key, c in raw["components"].items()
        },
        defaults=Defaults(**raw["defaults"]),
        limits=Limits(
            height=tuple(limits["height"]),
            width=tuple(limits["width"]),
            num_frames=tuple(limits["num_frames"]),
            **{k: int(limits[k]) for k in ("max_steps", "frame_step") if k in limits},
            trained_size=tuple(limits["trained_size"]) if "trained_size" in limits else None,
        ),
        weights=WeightsSpec(
            path=_weights_path(weights.get("path"), path.parent),
            hub_id=weights.get("hub_id"),
            build_seed=weights.get("build_seed"),
        ),
        source=path,
        pipeline=raw["pipeline"],
        text_tokens=raw.get("text_tokens"),
        schedulers=dict(raw.get("schedulers") or {}),
        adherence=raw.get("adherence"),
        pipeline_config=dict(raw.get("pipeline_config") or {}),
        acceleration=parse_acceleration(raw.get("acceleration"), where=f"{path}: acceleration"),
    )
    if spec.two_experts != (spec.pipeline_config.get("boundary_ratio") is not None):
        raise ValueError(f"{path}: a second expert (component transformer_2) and where it takes over "
                         f"(pipeline_config.boundary_ratio) go together; it has only one of them")  # fmt: skip
    return spec


def _weights_path(raw: str | None, config_dir: Path) -> str | None:
    """A YAML's `weights.path`, with ~ and $VARS expanded; a relative path is relative to the YAML
    (as a model shipped in the repository names its committed weights)."""
    if not raw:
        return None
    return os.path.normpath(config_dir / Path(os.path.expandvars(raw)).expanduser())


def load_component(spec: ModelSpec, key: str, weights: Path, device: Any = None) -> Any:
    """`from_pretrained` of one component (its class from the spec), in the spec's dtype, in eval mode."""
    cls = spec.components[key].load_class()
    if key in ("tokenizer", "scheduler", "feature_extractor", "image_processor"):  # no weights
        # Only the class's own library is imported: the driver loads the tokenizer to check
        # prompts, and importing diffusers there too would cost it seconds of CPU for nothing.
        return cls.from_pretrained(weights, subfolder=key)
    import diffusers
    import transformers

    # Per-file loading bars would drown the one bar that matters (denoising steps).
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    model = cls.from_pretrained(weights, subfolder=key, dtype=spec.torch_dtype())
    return model.to(device).eval()
