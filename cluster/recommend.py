"""`framecast recommend`: settings for a prompt, from two sources kept apart.

(a) Heuristics: the tuning articles' rules of thumb (motion words -> a guidance band, detail or
    artistic words -> steps and guidance, an image below the trained size -> compensation). They
    are labelled as heuristics: nobody measured them here.
(b) Data: past MLflow runs of the same model, grouped by their settings and ranked by a metric,
    each with how many runs support it. Without runs it says "no data", never a guess.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from mlflow import MlflowClient

from cluster.settings import REQUEST_FIELDS
from cluster.tracking import TIMING_METRICS, search_all_runs, searched_experiments
from stages.clarity import ADHERENCE, CLEARER, metric_sign
from stages.errors import InvalidRequest
from stages.models import ModelSpec
from stages.video_io import CODECS

# The settings runs are grouped by: the request fields of every setting, as run params.
SETTING_PARAMS = tuple(REQUEST_FIELDS.values())
# How a video is stored: these change the saved file's figures (encoded/...), the interpolated
# copy's (interp/...) and the timings, never the frames' own (clarity/..., adherence/...).
STORAGE_PARAMS = {"codec": "encoded/", "crf": "encoded/", "interpolate_fps": "interp/"}
# What a run from before a setting existed had: its default. Before codecs, every video was
# stored with its model's default codec (H.264 at CRF 18, or PNG), without an interpolated copy.
PARAM_DEFAULTS = {"dynamic_guidance": "False", "interpolate_fps": "0", "cache": "none"}

# Word lists behind the heuristics (lower-case word stems; a prompt word matches a stem it starts with).
MOTION_WORDS = ("run", "danc", "jump", "fly", "flie", "race", "racing", "chas", "spin", "explod", "crash", "fight",
                "gallop", "surf", "wave", "storm", "fast", "rush", "swirl", "splash", "sprint")  # fmt: skip
CALM_WORDS = ("still", "calm", "slow", "gentl", "static", "seren", "quiet", "portrait", "drift", "float", "sleep")
DETAIL_WORDS = ("detail", "intricate", "text", "sharp", "textur", "close-up", "closeup", "macro", "product", "logo",
                "typograph", "8k", "4k", "photoreal")  # fmt: skip
ARTISTIC_WORDS = ("painting", "watercolo", "oil", "surreal", "dream", "fantas", "anime", "impressionis", "abstract",
                  "styliz", "stylis", "artistic", "illustration", "sketch")  # fmt: skip


@dataclass
class Heuristic:
    rule: str  # what in the prompt (or image) triggered it
    advice: str  # the settings it suggests


def _matches(prompt: str, stems: tuple[str, ...]) -> list[str]:
    words = re.findall(r"[a-z0-9][a-z0-9-]*", prompt.lower())
    return sorted({w for w in words if w.startswith(stems)})


# (what the words say, their stems, the advice). Of the motion rules the first that matches
# applies (the last has no words: it is the default); every matching prompt rule applies.
MOTION_RULES = (
    ("motion", MOTION_WORDS, "guidance 9-11 and 50-60 steps hold fast motion to the prompt (preset high-motion)"),
    ("calm", CALM_WORDS, "guidance 6.5-7.5 and 30-40 steps are enough for little motion (presets explore, preview)"),
    ("no motion", (), "guidance 7.5-9 and 40-50 steps, the articles' general band"),
)
PROMPT_RULES = (
    ("detail", DETAIL_WORDS, "45-50 steps and guidance 8-8.5 for crisp detail and legible text (preset product)"),
    ("artistic", ARTISTIC_WORDS, "50 steps and guidance 9 for stylised scenes (preset creative)"),
)


def heuristics(spec: ModelSpec, prompt: str, image_size: tuple[int, int] | None = None) -> list[Heuristic]:
    """The articles' rules of thumb for this prompt (and image: (width, height))."""
    found = []
    for kind, stems, advice in MOTION_RULES:
        words = _matches(prompt, stems) if stems else []
        if words or not stems:
            found.append(Heuristic(f"{kind} words ({', '.join(words)})" if words else f"{kind} words", advice))
            break
    for kind, stems, advice in PROMPT_RULES:
        if words := _matches(prompt, stems):
            found.append(Heuristic(f"{kind} words ({', '.join(words)})", advice))
    if image_size is not None:
        found.append(_resolution(spec, image_size))
    return found


def _resolution(spec: ModelSpec, image_size: tuple[int, int]) -> Heuristic:
    (width, height), (trained_h, trained_w) = image_size, spec.trained_size
    scale = max(trained_w / width, trained_h / height)
    rule = f"image {width}x{height}, {spec.name} trained at {trained_w}x{trained_h}"
    if scale > 1.0:
        return Heuristic(rule, f"it is upscaled {scale:.2f}x: add about 10 steps to recover detail, "
                               "or upscale the image beforehand")  # fmt: skip
    if abs(width / height - trained_w / trained_h) > 0.05:
        return Heuristic(rule, f"its aspect ratio differs from {trained_w}x{trained_h}: crop it to that ratio first")
    return Heuristic(rule, "at or above the trained size: no compensation needed")


@dataclass
class MeasuredSetting:
    settings: dict[str, str]  # SETTING_PARAMS -> value
    runs: int
    mean: float
    low: float
    high: float
    same_prompt: int  # of the runs, those with exactly the asked prompt


def metric_direction(metric: str) -> int:
    """+1 if higher is better, -1 if lower; refuses metrics that do not rank settings."""
    sign = metric_sign(metric)
    if sign is not None:
        return sign
    if metric in TIMING_METRICS:
        return -1
    allowed = [f"clarity/{k}" for k in CLEARER] + [f"adherence/{k}" for k in ADHERENCE] + list(TIMING_METRICS)
    raise InvalidRequest(
        f"--metric {metric} does not rank settings; choose one of {', '.join(allowed)}, encoded/psnr_y, "
        f"encoded/ssim_y, or a clarity key as encoded/clarity/<key> (the saved file) or interp/clarity/<key> "
        f"(the interpolated copy)"
    )


def measured(
    spec: ModelSpec,
    metric: str,
    prompt: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[list[MeasuredSetting], int]:
    """Past generation runs of the model that have `metric`, grouped by the settings that can
    change it (`grouping_params`), best first; and how many runs that is. `experiment` None:
    every experiment in the store."""
    sign = metric_direction(metric)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = searched_experiments(client, experiment)
    query = f"params.model = '{spec.name}' and tags.`framecast.kind` = 'generation' and attributes.status = 'FINISHED'"
    runs = search_all_runs(client, experiments, query)
    figures = [(run, _figure(run, metric, spec)) for run in runs]
    figures = [(run, value) for run, value in figures if not math.isnan(value)]
    defaults = {**PARAM_DEFAULTS, "codec": spec.default_codec, "crf": str(CODECS[spec.default_codec].default_crf)}
    # A setting no run has, and none had before it existed, is not the model's (guidance_2 of a
    # model with one denoiser).
    recorded = {name for run, _ in figures for name in run.data.params}
    names = tuple(name for name in grouping_params(metric) if name in defaults or name in recorded)
    groups = defaultdict(list)
    for run, value in figures:
        key = tuple(run.data.params.get(name, defaults.get(name, "")) for name in names)
        groups[key].append((value, run.data.params.get("prompt") == prompt))
    ranked = [
        MeasuredSetting(
            dict(zip(names, key, strict=True)),
            len(values),
            sum(v for v, _ in values) / len(values),
            min(v for v, _ in values),
            max(v for v, _ in values),
            sum(same for _, same in values),
        )
        for key, values in groups.items()
    ]
    ranked.sort(key=lambda m: (-sign * m.mean, -m.runs))
    return ranked, len(figures)


def grouping_params(metric: str) -> tuple[str, ...]:
    """The settings (run params) that can change `metric`: every setting of the generation, and
    of how it is stored only those that touch what the metric measures (timings: all of them)."""
    return tuple(
        name for name in SETTING_PARAMS
        if name not in STORAGE_PARAMS or metric in TIMING_METRICS or metric.startswith(STORAGE_PARAMS[name])
    )  # fmt: skip


def _figure(run, metric: str, spec: ModelSpec) -> float:
    """The run's figure for `metric` (NaN: none). A run from before frames were measured (it has
    no codec param) measured only its saved file, as `clarity/<key>`: with a lossy default codec
    that is its `encoded/clarity/<key>`, and it has no figure of the frames."""
    metrics = run.data.metrics
    if "codec" in run.data.params or CODECS[spec.default_codec].lossless:
        return metrics.get(metric, math.nan)
    if metric.startswith("clarity/"):
        return math.nan
    return metrics.get(metric.removeprefix("encoded/") if metric.startswith("encoded/clarity/") else metric, math.nan)
