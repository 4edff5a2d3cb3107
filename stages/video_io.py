"""Video I/O: MP4 (H.264, yuv420p) through imageio and the ffmpeg that imageio-ffmpeg ships; contact sheets."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageDraw


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, crf: int = 18) -> Path:
    """Write (frames, H, W, 3) uint8 as H.264/yuv420p. H and W must be even (yuv420p halves chroma)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (frames, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The atomic rename means a crash never leaves a truncated file under the final name.
    partial = path.with_name(f".{path.name}.partial.mp4")
    writer = imageio.get_writer(
        partial,
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        quality=None,  # no imageio default CRF; ours below
        output_params=["-crf", str(crf), "-movflags", "+faststart"],
        macro_block_size=2,
        ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            writer.append_data(frame)
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video as (frames, H, W, 3) uint8."""
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()


def contact_sheet(frames: np.ndarray, max_frames: int = 16, columns: int = 4, min_width: int = 160) -> Image.Image:
    """A grid of evenly spaced frames, each labelled with its 0-based index."""
    n = len(frames)
    picks = sorted({round(i * (n - 1) / max(min(n, max_frames) - 1, 1)) for i in range(min(n, max_frames))})
    h, w = frames.shape[1:3]
    scale = max(1, math.ceil(min_width / w))  # tiny test videos are scaled up to stay readable
    cell_w, cell_h = w * scale, h * scale
    cols = min(columns, len(picks))
    rows = math.ceil(len(picks) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "black")
    draw = ImageDraw.Draw(sheet)
    for k, idx in enumerate(picks):
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        tile = Image.fromarray(frames[idx]).resize((cell_w, cell_h), Image.NEAREST)
        sheet.paste(tile, (x, y))
        draw.rectangle([x, y, x + 38, y + 13], fill="black")
        draw.text((x + 3, y + 1), f"#{idx}", fill="white")
    return sheet
