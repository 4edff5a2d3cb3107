"""A sweep's summary, for people comparing settings: a table of clarity (and prompt adherence,
where the model has it) and timings per cell (CSV and Markdown), a heatmap per panel metric over
the grid's first two axes, the same frame of every cell side by side, and the best cell per metric.
Also what the report reads: a cell of the grid and its outcome (`cluster.sweep` makes them)."""

from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from cluster.tracking import TIMING_METRICS
from stages.clarity import ADHERENCE, METRICS, REFERENCED, json_figure, metric_sign
from stages.video_io import read_frame

# Frames on the side-by-side sheet are scaled to this width (pixels): small ones up, so that their
# labels fit, large ones down, so that a big grid stays a readable picture.
SHEET_TILE_WIDTH = 192
LINE_HEIGHT = 12  # a label line: one per axis


@dataclass(frozen=True)
class Cell:
    """One point of the grid: ((axis, value), ...) in the grid's axis order."""

    values: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        return ",".join(f"{axis}={value}" for axis, value in self.values)

    @property
    def file_stem(self) -> str:
        return "_".join(f"{axis}{value}" for axis, value in self.values)

    def value(self, axis: str) -> Any:
        return dict(self.values)[axis]


# What became of a cell: "ran", "reused", "failed" (no video); and, with a video but something
# missing: "unmeasured" (no clarity figures), "uninterpolated" (no interpolated copy, though one
# was asked for) or "untracked" (its run could not be recorded).
INCOMPLETE = ("unmeasured", "uninterpolated", "untracked")
STATUSES = ("ran", "reused", "failed", *INCOMPLETE)


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # one of STATUSES
    metrics: dict[str, float] = field(default_factory=dict)
    video: Path | None = None
    run_id: str | None = None
    error: str | None = None
    warnings: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "cell": dict(self.cell.values),
            "label": self.cell.label,
            "status": self.status,
            "video": str(self.video) if self.video else None,
            "run_id": self.run_id,
            "error": self.error,
            "metrics": {k: json_figure(v) for k, v in self.metrics.items()},
            "warnings": self.warnings,
        }


def panel_keys(outcomes: list[CellOutcome]) -> list[str]:
    """The panel's metrics any cell has, in the panel's order: `clarity/<key>` (the frames as
    made), what the codec cost (`encoded/psnr_y`, `encoded/ssim_y`), the interpolated copy's
    `interp/clarity/<key>`, `adherence/<key>` (models whose videos are checked against their
    prompts), then what a step cache did and cost (`cache/skipped_fraction`; against the cell's
    uncached twin `vs_uncached/psnr_y`, `/ssim_y`, `/denoise_speedup`, and the change of
    adherence). The file's own figures (`encoded/clarity/...`) and the change of each clarity
    figure (`vs_uncached/delta/clarity/...`) stay in MLflow."""
    present = {key for o in outcomes for key in o.metrics}
    ordered = [
        *(f"clarity/{key}" for key in METRICS),
        *(f"encoded/{key}" for key in REFERENCED),
        *(f"interp/clarity/{key}" for key in METRICS),
        *(f"adherence/{key}" for key in ADHERENCE),
        "cache/skipped_fraction",
        *(f"vs_uncached/{key}" for key in (*REFERENCED, "denoise_speedup", "delta/adherence/score")),
    ]
    return [key for key in ordered if key in present]


def file_name(key: str) -> str:
    """A panel metric's name in files and tags: clarity's bare (`tenengrad`), adherence's
    prefixed (`adherence_score`)."""
    return key.removeprefix("clarity/").replace("/", "_")


def table(axes: dict[str, list], outcomes: list[CellOutcome]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the cell's axis values, its status, its clarity figures and timings."""
    keys = panel_keys(outcomes) + [t for t in TIMING_METRICS if any(t in o.metrics for o in outcomes)]
    header = [*axes, "status", *keys]
    rows = []
    for o in outcomes:
        figures = [_format(o.metrics.get(key)) for key in keys]
        rows.append([str(o.cell.value(axis)) for axis in axes] + [o.status] + figures)
    return header, rows


def _format(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:.6g}"


def table_csv(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def table_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def best_cells(outcomes: list[CellOutcome]) -> dict[str, tuple[CellOutcome, float]]:
    """Per panel metric with a direction (stages.clarity.metric_sign), the best cell and its
    figure; the first in grid order on a tie."""
    best = {}
    for key in panel_keys(outcomes):
        sign = metric_sign(key)
        scored = [(o, o.metrics[key]) for o in outcomes if not math.isnan(o.metrics.get(key, math.nan))]
        if sign is None or not scored:
            continue
        best[key] = max(scored, key=lambda pair: sign * pair[1])
    return best


def _panels(axes: dict[str, list]) -> tuple[list, list, list[tuple]]:
    """Rows (first axis), columns (second axis, or one) and one panel per combination of the rest."""
    names = list(axes)
    rows = axes[names[0]]
    columns = axes[names[1]] if len(names) > 1 else [None]
    rest = [axes[name] for name in names[2:]]
    return rows, columns, list(itertools.product(*rest))


def panel_values(axes: dict[str, list], outcomes: list[CellOutcome], key: str) -> list[tuple[tuple, np.ndarray]]:
    """The metric over the first two axes: (values of the other axes, rows x columns array, NaN
    where a cell has no figure), one per combination of the other axes."""
    names = list(axes)
    rows, columns, panels = _panels(axes)
    by_values = {o.cell.values: o for o in outcomes}
    out = []
    for rest in panels:
        grid = np.full((len(rows), len(columns)), np.nan)
        for (i, row), (j, column) in itertools.product(enumerate(rows), enumerate(columns)):
            values = (row,) + ((column,) if column is not None else ()) + rest
            outcome = by_values.get(tuple(zip(names, values, strict=True)))
            if outcome is not None:
                grid[i, j] = outcome.metrics.get(key, np.nan)
        out.append((rest, grid))
    return out


def heatmap(axes: dict[str, list], outcomes: list[CellOutcome], key: str, path: Path) -> Path:
    """One metric over the first two axes (a panel per combination of the others) on one colour
    scale, clearer cells brighter whichever way the metric runs, the clearest outlined."""
    names = list(axes)
    rows, columns, _ = _panels(axes)
    sign = metric_sign(key)
    best = best_cells(outcomes).get(key)
    best_at = None if best is None else best[0].cell.values
    panels = panel_values(axes, outcomes, key)
    fig = Figure(figsize=(1.2 + 1.1 * len(columns) * len(panels), 1.4 + 0.6 * len(rows)), layout="constrained")
    figures = np.concatenate([grid.ravel() for _, grid in panels])
    finite = figures[np.isfinite(figures)]  # an infinite PSNR (a lossless file) is shown, not scaled
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for p, (rest, grid) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r" if sign == -1 else "viridis", vmin=low, vmax=high,
                  aspect="auto")  # fmt: skip
        for (i, row), (j, column) in itertools.product(enumerate(rows), enumerate(columns)):
            text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=_ink(grid[i, j], low, high, sign))
            values = (row,) + ((column,) if column is not None else ()) + rest
            if best_at == tuple(zip(names, values, strict=True)):
                ax.add_patch(_outline(i, j))
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_ylabel(names[0])
        ax.set_xticks(range(len(columns)), [str(c) if c is not None else "" for c in columns])
        if len(names) > 1:
            ax.set_xlabel(names[1])
        if rest:
            ax.set_title(", ".join(f"{n}={v}" for n, v in zip(names[2:], rest, strict=True)), fontsize=8)
    way = {1: "higher is clearer", -1: "lower is clearer", None: "not ranked"}[sign]
    fig.suptitle(f"{key} ({way})", fontsize=9)
    fig.savefig(path, dpi=100)
    return path


def _ink(value: float, low: float, high: float, sign: int | None) -> str:
    """Black on the bright end of viridis (the clearer end), white elsewhere."""
    if np.isnan(value):
        return "white"
    fraction = (value - low) / ((high - low) or 1.0)
    return "black" if (1 - fraction if sign == -1 else fraction) > 0.6 else "white"


def _outline(i: int, j: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5)


def frame_sheet(axes: dict[str, list], outcomes: list[CellOutcome], index: int, path: Path) -> Path:
    """Frame `index` of every cell, labelled: a row per value of the first axis, a column per
    combination of the others, in grid order. A cell without a video is a grey tile."""
    names = list(axes)
    rows = axes[names[0]]
    columns = list(itertools.product(*(axes[name] for name in names[1:])))
    by_values = {o.cell.values: o for o in outcomes}
    frames = {}
    for o in outcomes:
        if o.video is not None:
            frame = Image.fromarray(read_frame(o.video, index))
            size = (SHEET_TILE_WIDTH, round(frame.height * SHEET_TILE_WIDTH / frame.width))
            frames[o.cell.values] = frame.resize(size, Image.Resampling.LANCZOS)
    label_height = LINE_HEIGHT * len(names) + 4
    width = SHEET_TILE_WIDTH + 4
    height = max((f.height for f in frames.values()), default=SHEET_TILE_WIDTH * 9 // 16) + label_height + 4
    sheet = Image.new("RGB", (width * len(columns), height * len(rows)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for (i, row), (j, column) in itertools.product(enumerate(rows), enumerate(columns)):
        values = tuple(zip(names, (row, *column), strict=True))
        x, y = j * width + 2, i * height + 2
        frame = frames.get(values)
        if frame is not None:
            sheet.paste(frame, (x, y + label_height))
        elif values in by_values:
            draw.text((x + 4, y + label_height + 4), by_values[values].status, fill=(200, 200, 200))
        for line, (name, value) in enumerate(values):
            draw.text((x + 2, y + 2 + line * LINE_HEIGHT), f"{name}={value}", fill=(255, 255, 255))
    sheet.save(path)
    return path
