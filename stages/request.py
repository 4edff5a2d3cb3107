"""What a user asks for, filled in from the model's defaults and checked against its limits, and
what it may cost in quality (`pitfalls`)."""

from __future__ import annotations

import math

from stages.cache import parse_cache
from stages.clarity import WORLDS
from stages.errors import InvalidRequest
from stages.families import family_for
from stages.models import KIND_NAMES, ModelSpec, image_models
from stages.settings import GenerationRequest
from stages.video_io import CODECS, VIDEO_CODECS

# The motion-interpolated copy's fps: above the video's, at most this and INTERPOLATE_MAX_RATIO
# times the video's (every interpolated frame is held in memory and measured).
INTERPOLATE_MAX_FPS = 120
INTERPOLATE_MAX_RATIO = 8


def build_request(
    spec: ModelSpec,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    num_frames: int | None = None,
    fps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    dynamic_guidance: bool = False,
    image: str | None = None,
    codec: str | None = None,
    crf: int | None = None,
    interpolate_fps: int | None = None,
    cache: str | None = None,
) -> GenerationRequest:
    """Fill unset fields from the model's defaults, then validate (see `validate`)."""
    d = spec.defaults
    if guidance_scale_2 is not None and not spec.two_experts:
        raise InvalidRequest(
            f"guidance_2 is the low-noise expert's guidance scale, for two-expert models (Wan 2.2 A14B); "
            f"{spec.name} has one denoiser: set guidance only"
        )
    guidance_scale = d.guidance_scale if guidance_scale is None else float(guidance_scale)
    off = family_for(spec).guidance_off
    if spec.two_experts and guidance_scale <= off:  # both experts unguided, as WanPipeline does it
        if guidance_scale_2 is not None and guidance_scale_2 != off:
            raise InvalidRequest(
                f"guidance_2 ({guidance_scale_2:g}) does nothing while guidance is off ({guidance_scale:g}): "
                f"both experts are then unguided; set guidance above {off:g}, or leave guidance_2 unset"
            )
        guidance_scale_2 = None
    elif spec.two_experts and guidance_scale_2 is None:  # the pipeline's rule: the model's, else the same
        guidance_scale_2 = d.guidance_scale_2 if d.guidance_scale_2 is not None else guidance_scale
    codec = spec.default_codec if codec is None else codec
    if crf is None and codec in CODECS:
        crf = CODECS[codec].default_crf
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=d.negative_prompt if negative_prompt is None else negative_prompt,
        steps=d.steps if steps is None else steps,
        guidance_scale=guidance_scale,
        num_frames=d.num_frames if num_frames is None else num_frames,
        fps=d.fps if fps is None else fps,
        height=d.height if height is None else height,
        width=d.width if width is None else width,
        seed=seed,
        scheduler=spec.scheduler_name(scheduler),
        dynamic_guidance=bool(dynamic_guidance),
        image=str(image or ""),
        codec=codec,
        crf=crf,
        interpolate_fps=interpolate_fps or 0,
        guidance_scale_2=None if guidance_scale_2 is None else float(guidance_scale_2),
        guidance_off=family_for(spec).guidance_off,
        cache=str(parse_cache(cache, family_for(spec).cache_kinds, spec.name)),  # checked, in one spelling
    )
    validate(spec, request)
    return request


def nearest_valid_frames(num_frames: int, multiple: int) -> list[int]:
    """The valid counts (k*multiple + 1) on either side of num_frames."""
    below = ((num_frames - 1) // multiple) * multiple + 1
    return [n for n in (below, below + multiple) if n >= 1]


def validate(spec: ModelSpec, r: GenerationRequest) -> None:
    """Check a request against the model's rules. Cheap: no model is loaded.

    The prompt's token count is checked separately (`EncoderStage.check_prompt_length`
    needs the tokenizer).
    """
    if not r.prompt or not r.prompt.strip():
        raise InvalidRequest("prompt is empty: give the text to make a video of")
    if r.steps < 1:
        raise InvalidRequest(f"steps must be at least 1 (got {r.steps})")
    if r.steps > spec.limits.max_steps:
        raise InvalidRequest(f"steps must be at most {spec.limits.max_steps} for {spec.name} (got {r.steps})")
    family = family_for(spec)
    if not r.guidance_scale >= family.guidance_off:
        off = f"{family.guidance_off:g}"
        raise InvalidRequest(
            f"guidance scale must be at least {off} for {spec.name} ({off} turns classifier-free guidance off; "
            f"got {r.guidance_scale:g})"
        )
    if r.guidance_scale_2 is not None and not r.guidance_scale_2 >= family.guidance_off:
        raise InvalidRequest(
            f"guidance_2 must be at least {family.guidance_off:g} for {spec.name} (got {r.guidance_scale_2:g})"
        )
    if r.fps < 1:
        raise InvalidRequest(f"fps must be at least 1 (got {r.fps})")
    problem = family.check_request(r)  # refused before any weights load
    if problem:
        raise InvalidRequest(problem)
    if r.dynamic_guidance and not family.dynamic_guidance:
        raise InvalidRequest(
            f"dynamic_guidance (diffusers' use_dynamic_cfg schedule) is not in {spec.name}'s pipeline; it has none"
        )
    if r.seed < 0:
        raise InvalidRequest(f"seed must be a non-negative integer (got {r.seed})")
    if spec.takes_image and not r.image:
        raise InvalidRequest(f"{spec.name} is image-to-video: give image, the picture the video starts from")
    if r.image and not spec.takes_image:
        raise InvalidRequest(
            f"{spec.name} is {KIND_NAMES.get(spec.kind, spec.kind)} and takes no image; "
            f"for image-to-video use one of: {', '.join(image_models()) or 'none configured'}"
        )

    check_output(spec, r)

    step = spec.limits.frame_step
    lo, hi = spec.limits.num_frames
    if r.num_frames < 1 or (r.num_frames - 1) % step != 0:
        clamped = min(max(r.num_frames, lo), hi)
        options = " or ".join(str(n) for n in nearest_valid_frames(clamped, step) if lo <= n <= hi)
        raise InvalidRequest(f"frames must be {step}k+1 for {spec.name} (got {r.num_frames}; nearest valid: {options})")
    if not lo <= r.num_frames <= hi:
        raise InvalidRequest(f"frames must be between {lo} and {hi} for {spec.name} (got {r.num_frames})")

    m = family.spatial_multiple
    for name, value, (lo, hi) in (
        ("height", r.height, spec.limits.height),
        ("width", r.width, spec.limits.width),
    ):
        if value % m != 0:
            clamped = min(max(value, lo), hi)
            candidates = {clamped // m * m, clamped // m * m + m}
            options = " or ".join(str(v) for v in sorted(candidates) if lo <= v <= hi)
            raise InvalidRequest(
                f"{name} must be a multiple of {m} for {spec.name} (got {value}; nearest valid: {options})"
            )
        if not lo <= value <= hi:
            raise InvalidRequest(f"{name} must be between {lo} and {hi} for {spec.name} (got {value})")


def check_output(spec: ModelSpec, r: GenerationRequest) -> None:
    """How the frames are to be stored: a codec the model's output takes, a CRF in the codec's
    range (only codecs with one), and an interpolation fps above the video's."""
    if spec.makes_images:
        if r.codec != spec.default_codec:
            raise InvalidRequest(
                f"{spec.name} makes a picture, written as PNG; codec is for video models (got {r.codec!r})"
            )
        if r.interpolate_fps:
            raise InvalidRequest(f"{spec.name} makes a picture; interpolate is for video models")
        if r.crf is not None:
            raise InvalidRequest(f"{spec.name} makes a picture, written as PNG (lossless); crf is for video models")
        return
    if r.codec not in VIDEO_CODECS:
        raise InvalidRequest(f"codec must be one of {', '.join(VIDEO_CODECS)} (got {r.codec!r})")
    codec = CODECS[r.codec]
    with_crf = {c.name: c.crf for c in CODECS.values() if c.crf}
    if codec.crf is None and r.crf is not None:
        kind = "is lossless" if codec.lossless else "has no CRF"
        ranges = ", ".join(f"{name} ({lo}-{hi})" for name, (lo, hi) in with_crf.items())
        raise InvalidRequest(f"crf is for {ranges}; {r.codec} {kind} (got crf {r.crf})")
    if codec.crf is not None and not codec.crf[0] <= r.crf <= codec.crf[1]:
        lo, hi = codec.crf
        raise InvalidRequest(
            f"crf must be between {lo} and {hi} for {r.codec} (got {r.crf}); lower keeps more, "
            f"{codec.default_crf} is the default"
        )
    fastest = max(r.fps, r.interpolate_fps)
    if codec.max_fps is not None and fastest > codec.max_fps:
        raise InvalidRequest(
            f"{r.codec} plays at most {codec.max_fps} fps (its frame delays are whole hundredths of a second); "
            f"got {fastest} fps: choose another codec, or a lower fps"
        )
    if r.interpolate_fps:
        highest = min(INTERPOLATE_MAX_FPS, INTERPOLATE_MAX_RATIO * r.fps)
        if not r.fps < r.interpolate_fps <= highest:
            raise InvalidRequest(
                f"interpolate must be above the video's {r.fps} fps and at most {highest} "
                f"({INTERPOLATE_MAX_FPS}, and {INTERPOLATE_MAX_RATIO}x the fps) (got {r.interpolate_fps}); "
                f"leave it unset for no interpolated video"
            )


def frames_for_duration(spec: ModelSpec, seconds: float, fps: int) -> tuple[int, str]:
    """The frame count that lasts at least `seconds` at `fps` for this model, and a line saying how
    it was reached: the smallest valid count (frame_step*k + 1) of at least seconds x fps frames,
    e.g. 2 s at 12 fps = 24 frames -> 25 for CogVideoX."""
    if not seconds > 0:
        raise InvalidRequest(f"duration must be positive seconds (got {seconds})")
    if fps < 1:
        raise InvalidRequest(f"fps must be at least 1 (got {fps})")
    wanted = math.ceil(seconds * fps - 1e-9)
    return frames_at_least(spec, wanted, f"{seconds:g} s at {fps} fps = {wanted} frames", fps)


def frames_nearest(spec: ModelSpec, seconds: float, fps: int) -> tuple[int, str]:
    """The frame count the model makes nearest to `seconds` x `fps` (a tie goes to the longer),
    and a line saying how it was reached: the Videos API's `seconds`, e.g. 4 s at 8 fps = 32
    frames -> 33 for CogVideoX. Beyond the model's range it is the shortest or longest it makes."""
    if not seconds > 0:
        raise InvalidRequest(f"seconds must be positive (got {seconds:g})")
    if fps < 1:
        raise InvalidRequest(f"fps must be at least 1 (got {fps})")
    step, (lo, hi) = spec.limits.frame_step, spec.limits.num_frames
    wanted = seconds * fps
    frames = min(max(math.floor((wanted - 1) / step + 0.5) * step + 1, lo), hi)
    what = f"{seconds:g} s at {fps} fps = {wanted:g} frames"
    if frames == wanted:
        return frames, what
    rule = f"{spec.name} makes {step}k+1 frames, {lo} to {hi}" if step > 1 else f"{spec.name} makes {lo} to {hi}"
    return frames, f"{what} -> {frames}, the nearest it makes ({rule}; {frames / fps:g} s)"


def frames_at_least(spec: ModelSpec, wanted: int, what: str, fps: int | None) -> tuple[int, str]:
    """The smallest frame count the model makes that is at least `wanted`, and a line saying so
    (`what` names where `wanted` came from, e.g. "2 s at 12 fps = 24 frames"; `fps`, if known,
    gives the seconds)."""
    step, (lo, hi) = spec.limits.frame_step, spec.limits.num_frames
    frames = max(lo, -(-(wanted - 1) // step) * step + 1)
    if frames > hi:
        longest = f" (at {fps} fps that is {hi / fps:.2f} s)" if fps else ""
        raise InvalidRequest(f"{what}: more than the {hi} frames {spec.name} makes at most{longest}")
    rule = f"{spec.name} makes {step}k+1 frames, {lo} to {hi}" if step > 1 else f"{spec.name} makes {lo} to {hi}"
    if frames == wanted:
        return frames, f"{what}"
    seconds = f"; {frames / fps:.2f} s" if fps else ""
    return frames, f"{what} -> {frames} ({rule}{seconds})"


# The articles' pitfalls, warned about (never refused): see docs/sweeps.md.
GUIDANCE_WARN_ABOVE = 9.5  # over-saturated colours and burnt-out highlights above this
PROMPT_TOKENS_WARN_ABOVE = 60  # the model follows the later part of a longer prompt less closely


def pitfalls(spec: ModelSpec, r: GenerationRequest, prompt_tokens: int) -> dict[str, str]:
    """Settings the tuning articles warn against: name -> a line saying what and why."""
    found = {}
    if r.guidance_scale > GUIDANCE_WARN_ABOVE:
        found["high_guidance"] = (
            f"guidance {r.guidance_scale:g} is above {GUIDANCE_WARN_ABOVE:g}: expect over-saturated colours"
        )
    if prompt_tokens > PROMPT_TOKENS_WARN_ABOVE:
        found["long_prompt"] = (
            f"the prompt is {prompt_tokens} tokens, more than about {PROMPT_TOKENS_WARN_ABOVE}: "
            f"its later details tend to be ignored"
        )
    world = WORLDS.get(spec.adherence) if spec.adherence else None
    if world is not None and world.parse_prompt(r.prompt) is None:
        found["outside_grammar"] = (
            f"{spec.name} knows only prompts of the form '{world.GRAMMAR}': expect a video that follows "
            f"none of this prompt, and no adherence figures"
        )
    trained_h, trained_w = spec.trained_size
    if r.height > trained_h or r.width > trained_w:
        found["above_trained_size"] = (
            f"{r.width}x{r.height} is above {spec.name}'s trained {trained_w}x{trained_h}: "
            f"expect repeated subjects and less coherent motion"
        )
    return found


# How far an image may be from the video's size. A model's pipeline fits the image to the video
# by stretching it (CogVideoX: resized to the height and width as they are) or by cropping it
# (I2VGen-XL: scaled to cover, centre-cropped): either way a different aspect ratio costs the
# picture (distorted, or cut). A little is warned about; more than MAX_ASPECT_CHANGE is refused.
MAX_ASPECT_CHANGE = 2.0
WARN_ASPECT_CHANGE = 1.05
WARN_UPSCALE = 2.0  # enlarging more than this blurs the first frame


def check_image(spec: ModelSpec, r: GenerationRequest, image_size: tuple[int, int]) -> dict[str, str]:
    """Warnings (name -> line) for an image of `image_size` (height, width) fitted to the video's
    size; InvalidRequest, with the allowed range, when its shape is too far from the video's."""
    h, w = image_size
    aspect, target = w / h, r.width / r.height
    change = max(aspect / target, target / aspect)
    crop = family_for(spec).image_fit == "crop"
    if change > MAX_ASPECT_CHANGE:
        lo, hi = target / MAX_ASPECT_CHANGE, target * MAX_ASPECT_CHANGE
        how = "crops the image to the video's shape" if crop else "stretches the image to the video's size"
        raise InvalidRequest(
            f"the image is {w}x{h} (width/height {aspect:.2f}) but the video is {r.width}x{r.height} "
            f"({target:.2f}); {spec.name} {how}, so its width/height must be between {lo:.2f} and {hi:.2f} "
            f"(crop it, or ask for another height and width)"
        )
    warnings = {}
    if change > WARN_ASPECT_CHANGE and crop:
        side = "width" if aspect > target else "height"
        warnings["image_cropped"] = (
            f"the image ({w}x{h}) is cropped to the shape of {r.width}x{r.height}: "
            f"{(1 - 1 / change) * 100:.0f}% of its {side} is cut off"
        )
    elif change > WARN_ASPECT_CHANGE:
        warnings["image_stretched"] = (
            f"the image ({w}x{h}) is stretched to {r.width}x{r.height}: its aspect ratio changes by "
            f"{(change - 1) * 100:.0f}%, so the first frame is distorted"
        )
    upscale = max(r.width / w, r.height / h)  # stretched or scaled to cover: the larger factor
    if upscale > WARN_UPSCALE:
        warnings["image_upscaled"] = (
            f"the image ({w}x{h}) is enlarged {upscale:.1f}x to {r.width}x{r.height}: expect a soft first frame"
        )
    return warnings
