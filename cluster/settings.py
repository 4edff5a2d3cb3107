"""From what the user typed to request settings: explicit flags, a preset under them, and a
duration turned into frames. Shared by `generate` and `sweep` (and any other front end), so a
preset or a duration means the same everywhere.

Precedence: an explicit setting (or a swept axis) > the preset > the model's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.errors import InvalidRequest
from stages.models import ModelSpec
from stages.presets import Preset, load_preset, resolve_preset
from stages.request import frames_for_duration
from stages.settings import AXES

# The settings a command may give, vary or take from a preset, by name -> the GenerationRequest
# field each fills (stages.settings.AXES: the seed names a sample, not a setting to compare).
REQUEST_FIELDS = {name: setting.field for name, setting in AXES.items()}


@dataclass
class Settings:
    """Settings shared by every generation of a command, resolved."""

    values: dict[str, Any]  # REQUEST_FIELDS names -> value (absent: the model's default)
    prompt_suffix: str = ""  # the preset's, appended to every prompt
    preset_grid: dict[str, list] = field(default_factory=dict)  # preset ranges to sweep
    duration: float | None = None  # seconds: frames follow fps (per cell, when fps is swept)
    notes: list[str] = field(default_factory=list)  # how frames were derived, said to the user
    warnings: dict[str, str] = field(default_factory=dict)
    preset: Preset | None = None

    def prompt(self, prompt: str) -> str:
        return f"{prompt.rstrip().rstrip(',')}, {self.prompt_suffix}" if self.prompt_suffix else prompt

    def recorded_params(self) -> dict[str, str]:
        """What a run records of how its settings were chosen (the settings themselves are params)."""
        params = {"preset": self.preset.name} if self.preset else {}
        if self.duration is not None:
            params["duration_s"] = f"{self.duration:g}"
        return params

    def require_single(self) -> None:
        """Refuse preset ranges in a command that makes one video per prompt."""
        if self.preset_grid:
            name = self.preset.name
            ranges = ", ".join(f"{key} {self.preset.settings[key]}" for key in self.preset_grid)
            flags = " and ".join(f"--{key}" for key in self.preset_grid)
            raise InvalidRequest(
                f"preset {name} gives ranges ({ranges}): sweep them with `framecast sweep --preset {name}`, "
                f"or pick values with {flags}"
            )

    def request_kwargs(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """`build_request` keyword arguments, with `overrides` (a grid cell) on top."""
        values = {**self.values, **(overrides or {})}
        return {REQUEST_FIELDS[k]: v for k, v in values.items() if v is not None}

    def frames_for(self, spec: ModelSpec, fps: int | None) -> tuple[int, str] | None:
        """With a duration, the frames at `fps` (None: the settled fps) and the line saying so."""
        if self.duration is None:
            return None
        return frames_for_duration(spec, self.duration, fps or self.values.get("fps") or spec.defaults.fps)


def resolve_settings(
    spec: ModelSpec,
    explicit: dict[str, Any],
    preset: str | None = None,
    duration: float | None = None,
    swept: frozenset[str] = frozenset(),
) -> Settings:
    """`explicit`: setting name (REQUEST_FIELDS) -> the user's value or None; `swept`: grid axes."""
    given = {k: v for k, v in explicit.items() if v is not None}
    unknown = set(given) - set(REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"not settings: {sorted(unknown)}")
    if duration is not None:
        clash = "--frames" if "frames" in given else ("--grid frames" if "frames" in swept else None)
        if clash:
            raise InvalidRequest(f"--duration sets the frames from the fps; drop {clash}, or drop --duration")
    settings = Settings(values=dict(given), duration=duration)
    if preset is not None:
        p = load_preset(preset)
        # What the user set, swept or derived from a duration is not the preset's to fill.
        taken = frozenset(given) | swept | ({"frames"} if duration is not None else set())
        resolved = resolve_preset(p, spec, taken, given.get("fps"))
        settings.values = {**resolved.settings, **given}
        settings.preset = p
        settings.prompt_suffix = p.prompt_suffix
        settings.preset_grid = resolved.grid
        settings.notes += resolved.notes
        settings.warnings.update(resolved.warnings)
    if duration is not None and "fps" not in swept and "fps" not in settings.preset_grid:
        settings.values["frames"], note = settings.frames_for(spec, None)
        settings.notes.append(note)
    return settings
