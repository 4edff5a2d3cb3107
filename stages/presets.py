"""Presets: the tuning articles' scenario settings (`configs/presets/*.yaml`), as named starting
points that explicit settings override.

A preset gives steps, guidance, frames and fps (and how the video is stored: codec, crf,
interpolate), each a value or a range. A value fills in what
the user did not set. A range is for `framecast sweep`, which expands it into `points` evenly
spaced values (an axis of the grid); `generate` needs such a setting given explicitly. Frame
counts are the articles' (e.g. 24 at 12 fps), taken up to the nearest count the model makes
(25 on CogVideoX), and that is said, not done silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from stages.errors import InvalidRequest
from stages.models import CONFIG_DIR, KIND_NAMES, ModelSpec
from stages.request import frames_at_least
from stages.settings import BY_NAME, PRESET_KEYS

PRESETS_DIR = CONFIG_DIR / "presets"
SETTINGS = PRESET_KEYS  # what a preset may set (stages.settings)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    points: int

    def values(self, integer: bool) -> list[float | int]:
        step = (self.high - self.low) / (self.points - 1) if self.points > 1 else 0.0
        values = [self.low + i * step for i in range(self.points)]
        return [int(v + 0.5) for v in values] if integer else [round(v, 4) for v in values]

    def __str__(self) -> str:
        return f"{self.low:g}-{self.high:g}"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    source: str  # the article it comes from
    kinds: tuple[str, ...]  # the model kinds it was tuned on (t2v, i2v, t2i)
    settings: dict[str, float | int | Range]
    prompt_suffix: str = ""


@dataclass
class Resolved:
    """A preset applied to a model under the user's explicit settings."""

    settings: dict[str, Any]  # steps, guidance, frames, fps: values to use where the user set none
    grid: dict[str, list]  # ranges the user did not override, expanded: axis -> values
    notes: list[str] = field(default_factory=list)  # how preset frames were mapped to the model's
    warnings: dict[str, str] = field(default_factory=dict)


def known_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> Preset:
    path = PRESETS_DIR / f"{name}.yaml"
    if name not in known_presets():
        raise InvalidRequest(f"unknown preset {name!r}; known presets: {', '.join(known_presets())}")
    raw = yaml.safe_load(path.read_text()) or {}
    settings: dict[str, float | int | Range] = {}
    for key, value in (raw.get("settings") or {}).items():
        if key not in SETTINGS:
            raise InvalidRequest(f"{path}: unknown setting {key!r}; a preset sets {', '.join(SETTINGS)}")
        if isinstance(value, dict):
            (low, high), points = value["range"], int(value.get("points", 3))
            settings[key] = Range(float(low), float(high), points)
        else:
            settings[key] = value
    return Preset(
        name=name,
        description=raw.get("description", ""),
        source=raw.get("source", ""),
        kinds=tuple(raw.get("kinds") or ()),
        settings=settings,
        prompt_suffix=raw.get("prompt_suffix", ""),
    )


def resolve_preset(preset: Preset, spec: ModelSpec, taken: frozenset[str], fps: int | None = None) -> Resolved:
    """The preset's settings for `spec`, except those in `taken` (set by the user, swept, or
    derived from a duration: explicit settings win). `fps`: the user's, if given."""
    out = Resolved(settings={}, grid={})
    for key, value in preset.settings.items():
        if key in taken:
            continue
        if isinstance(value, Range):
            out.grid[key] = value.values(integer=BY_NAME[key].kind is int)
        else:
            out.settings[key] = value
    if "frames" in out.settings:
        if fps is None and "fps" not in taken:  # else fps is swept: the frames' seconds vary
            fps = out.settings.get("fps", spec.defaults.fps)
        what = f"preset {preset.name}: {out.settings['frames']} frames"
        out.settings["frames"], note = frames_at_least(spec, int(out.settings["frames"]), what, fps)
        out.notes.append(note)
    if preset.kinds and spec.kind not in preset.kinds:
        tuned = " or ".join(KIND_NAMES.get(k, k) for k in preset.kinds)
        out.warnings["preset_kind"] = (
            f"preset {preset.name} was tuned on {tuned} models ({preset.source}); "
            f"{spec.name} is {KIND_NAMES.get(spec.kind, spec.kind)}"
        )
    return out
