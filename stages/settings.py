"""The settings of one generation, defined once: their names, types and meaning (`SETTINGS`),
and the request they fill (`GenerationRequest`, filled in and checked by `stages.request`,
read by every stage).

Every front end derives its spelling from `SETTINGS`: the CLI's flags (`--name`, `_` as `-`),
a sweep's grid axes and a preset's keys (the names), the Videos API's fields (`api`). Errors
name a setting by its name, so no front end answers with another's spelling. A front end may
add how its user says something more (the CLI's --duration, the API's `seconds` and `size`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stages.video_io import CODECS, VIDEO_CODECS


@dataclass(frozen=True)
class Setting:
    """One setting of a generation."""

    name: str  # what errors, grid axes and presets call it; the CLI flag is --name (with - for _)
    field: str  # the GenerationRequest field it fills
    kind: type
    help: str
    api: str | None = None  # the Videos API's field for it; None: not offered over the API
    axis: bool = True  # a sweep may vary it (and runs are compared by it); the seed names a sample instead
    preset: bool = False  # a preset may set it


# In the order the CLI lists them and run tables show them: the settings a sweep varies first.
SETTINGS: tuple[Setting, ...] = (
    Setting("steps", "steps", int, "denoising steps (model default if unset)", api="steps", preset=True),
    Setting(
        "guidance",
        "guidance_scale",
        float,
        "guidance scale; the model's off value (1, or 0 for some: see framecast models) turns guidance off",
        api="guidance_scale",
        preset=True,
    ),
    Setting(
        "guidance_2",
        "guidance_scale_2",
        float,
        "two-expert models (Wan 2.2 A14B): the low-noise expert's guidance scale (default: the model's, or guidance)",
        api="guidance_scale_2",
        preset=True,
    ),
    Setting(
        "frames",
        "num_frames",
        int,
        "frames, a count the model makes (see framecast models)",
        api="num_frames",
        preset=True,
    ),
    Setting("fps", "fps", int, "frames per second of the video (model default if unset)", api="fps", preset=True),
    Setting("height", "height", int, "height in pixels (model default if unset)"),
    Setting("width", "width", int, "width in pixels (model default if unset)"),
    Setting("scheduler", "scheduler", str, "a scheduler the model allows (e.g. ddim, dpm; default: its own)"),
    Setting(
        "dynamic_guidance",
        "dynamic_guidance",
        bool,
        "diffusers' cosine guidance schedule over the steps (use_dynamic_cfg), for models whose pipeline has it",
    ),
    Setting(
        "codec",
        "codec",
        str,
        f"how the video is stored: {', '.join(VIDEO_CODECS)} (default h264; see docs/clarity.md)",
        api="codec",
        preset=True,
    ),
    Setting(
        "crf",
        "crf",
        int,
        "the codec's constant rate factor, lower keeps more: "
        + "; ".join(f"{c.name} {c.crf[0]}-{c.crf[1]}, default {c.default_crf}" for c in CODECS.values() if c.crf),
        api="crf",
        preset=True,
    ),
    Setting(
        "interpolate",
        "interpolate_fps",
        int,
        "also write <name>.interp.<ext>: the video motion-interpolated to this fps (ffmpeg minterpolate), "
        "as long as the original",
        api="interpolate_fps",
        preset=True,
    ),
    Setting(
        "cache",
        "cache",
        str,
        "step caching through diffusers' hooks: none, fbc:THRESHOLD, pab:N, taylorseer:N, those the model's "
        "family takes (see framecast models; docs/caching.md)",
        api="cache",
        preset=True,
    ),
    Setting("seed", "seed", int, "the random seed of the noise (default 0)", api="seed", axis=False),
    Setting(
        "negative_prompt",
        "negative_prompt",
        str,
        "what guidance steers away from (model default if unset)",
        api="negative_prompt",
        axis=False,
    ),
    Setting(
        "image",
        "image",
        str,
        "image-to-video models: the picture the video starts from (fitted to the video's size)",
        axis=False,
    ),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
AXES: dict[str, Setting] = {s.name: s for s in SETTINGS if s.axis}  # what a sweep varies and runs are compared by
PRESET_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.preset)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    num_frames: int
    fps: int
    height: int
    width: int
    seed: int
    scheduler: str = ""  # the scheduler's class name (build_request fills in the weights' own)
    # diffusers' `use_dynamic_cfg`: the guidance scale follows a cosine schedule over the steps
    # instead of staying at guidance_scale (for the families that have it).
    dynamic_guidance: bool = False
    # Image-to-video: the image file given (the path as the user wrote it; its pixels travel with
    # the job, see cluster.driver.Job.image). Empty for text-to-video.
    image: str = ""
    # How the frames are stored (stages.video_io.CODECS; "png" for a text-to-image model's picture),
    # at which CRF (None: the codec takes none), and the fps of the motion-interpolated copy (0: none).
    codec: str = "h264"
    crf: int | None = None
    interpolate_fps: int = 0
    # Two-expert models: the guidance scale of the low-noise expert (None for a model with one).
    guidance_scale_2: float | None = None
    # Step caching (stages.cache): "none" or a spec such as "fbc:0.05", in its canonical spelling.
    cache: str = "none"
    # The model's guidance scale that means "no guidance" (its family's `guidance_off`: 1 for
    # uncond + g (cond - uncond), 0 for cond + g (cond - uncond)). A property of the model, not
    # a setting: not in `as_dict`.
    guidance_off: float = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        # at guidance_off the prediction is the conditional one alone: the unconditional branch is skipped.
        return self.guidance_scale > self.guidance_off

    def as_dict(self) -> dict:
        """The settings as run params and manifests record them; a model with one denoiser has no
        guidance_scale_2."""
        settings = asdict(self)
        del settings["guidance_off"]
        if settings["guidance_scale_2"] is None:
            del settings["guidance_scale_2"]
        return settings
