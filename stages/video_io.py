"""Video I/O: MP4 (H.264, yuv420p) through imageio and the ffmpeg that imageio-ffmpeg ships; contact sheets.

Reading goes through the same ffmpeg, so any video it can decode is read the same way, and a
figure measured here can be checked with that ffmpeg binary (`imageio_ffmpeg.get_ffmpeg_exe()`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from stages.errors import InvalidRequest


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


def write_png(frames: np.ndarray, path: str | Path) -> Path:
    """Write a one-frame (1, H, W, 3) uint8 result as a PNG picture (renamed into place whole)."""
    if frames.ndim != 4 or frames.shape[0] != 1 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected one (1, H, W, 3) uint8 frame, got {frames.shape} {frames.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.png")
    try:
        Image.fromarray(frames[0]).save(partial, format="PNG")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video as (frames, H, W, 3) uint8 RGB."""
    return DecodedVideo.read(path, planes=("rgb",)).rgb


# 8-bit YUV and gray pass through untouched (ffmpeg picks the input's format when it is listed);
# anything else (RGB, palettes, 10-bit) is converted to one of them before the Y plane is taken.
LUMA_FILTER = (
    "format=yuv420p|yuvj420p|yuv422p|yuvj422p|yuv444p|yuvj444p|yuv440p|yuvj440p|yuv411p|yuv410p|gray,extractplanes=y"
)
# Every decoded frame once, at its own time: by default ffmpeg's raw output is constant-rate and
# would repeat or drop frames of a variable-frame-rate video.
EACH_FRAME_ONCE = ["-fps_mode", "passthrough"]


@dataclass
class DecodedVideo:
    """A video as ffmpeg decodes it: its luma plane and/or its RGB frames, and its frame rate."""

    path: str
    fps: float
    y: np.ndarray | None = None  # (frames, H, W) uint8: the decoded Y plane, untouched
    rgb: np.ndarray | None = None  # (frames, H, W, 3) uint8: ffmpeg's conversion to RGB

    @property
    def frames(self) -> int:
        return len(self.y if self.y is not None else self.rgb)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return (self.y if self.y is not None else self.rgb).shape[1:3]

    @classmethod
    def read(cls, path: str | Path, planes: tuple[str, ...] = ("y", "rgb")) -> DecodedVideo:
        """Decode every frame; InvalidRequest names the problem if `path` is no readable video
        or has no frames.

        "y" is the decoded Y plane as stored, the plane ffmpeg's own signalstats, psnr and ssim
        filters read. (It is taken with ffmpeg's extractplanes filter: asking ffmpeg for gray
        output instead would stretch limited-range luma, 16-235, to 0-255.) Video stored as RGB
        or with a palette is converted to YUV first, as those filters do.
        """
        video = cls(str(path), fps=0.0)
        for plane in planes:
            pix_fmt, channels, filters = {"y": ("gray", 1, ["-vf", LUMA_FILTER]), "rgb": ("rgb24", 3, [])}[plane]
            fps, frames = _decode(path, pix_fmt, channels, filters)
            video.fps = fps
            setattr(video, plane, frames[..., 0] if channels == 1 else frames)
        return video


def _decode(path: str | Path, pix_fmt: str, channels: int, filters: Sequence[str]) -> tuple[float, np.ndarray]:
    fps, frames = _open(path, pix_fmt, channels, filters)
    decoded = list(frames)
    if not decoded:
        raise InvalidRequest(f"{path}: the video has no frames")
    return fps, np.stack(decoded)


def read_frame(path: str | Path, index: int) -> np.ndarray:
    """Frame `index` (0-based) as (H, W, 3) uint8 RGB, decoding no further than it."""
    if index < 0:
        raise InvalidRequest(f"frame index {index}: frames are numbered from 0")
    _, frames = _open(path, "rgb24", 3)
    count = 0
    try:
        for count, frame in enumerate(frames, 1):  # noqa: B007 (count is the frames seen)
            if count == index + 1:
                return frame
    finally:
        frames.close()
    if count == 0:
        raise InvalidRequest(f"{path}: the video has no frames")
    raise InvalidRequest(f"{path} has {count} frames (0 to {count - 1}); there is no frame {index}")


def _open(
    path: str | Path, pix_fmt: str, channels: int, filters: Sequence[str] = ()
) -> tuple[float, Iterator[np.ndarray]]:
    """The frame rate of `path` and an iterator over its frames as ffmpeg decodes them (closing
    the iterator stops ffmpeg)."""
    if not Path(path).is_file():
        raise InvalidRequest(f"{path}: no such file")
    try:
        reader = imageio_ffmpeg.read_frames(
            str(path), pix_fmt=pix_fmt, bits_per_pixel=8 * channels, output_params=[*EACH_FRAME_ONCE, *filters]
        )
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        raise InvalidRequest(f"{path}: not a video ffmpeg can read ({_ffmpeg_reason(e)})") from None
    width, height = meta["size"]

    def frames() -> Iterator[np.ndarray]:
        try:
            for raw in reader:
                yield np.frombuffer(raw, np.uint8).reshape(height, width, channels)
        except (OSError, RuntimeError) as e:
            raise InvalidRequest(f"{path}: ffmpeg failed while decoding it ({_ffmpeg_reason(e)})") from None
        finally:
            reader.close()

    return float(meta.get("fps") or 0.0), frames()


def _ffmpeg_reason(error: BaseException) -> str:
    """The line of ffmpeg's output that says what is wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any("does not contain any stream" in line for line in lines):
        return "it has no video stream"
    for line in reversed(lines):
        if "Error opening input:" in line:
            return line.split("Error opening input:", 1)[1].strip()
    # ffmpeg's last lines are often generic ("Conversion failed!"); the first error line says why
    informative = [line for line in lines if "rror" in line or "nvalid" in line or "not available" in line]
    return (informative or lines or [type(error).__name__])[0]


# An image larger than this many pixels is refused before it is decoded: 50 megapixels, above
# any camera's usual output and far above any video size (and below PIL's own bomb guard).
MAX_IMAGE_PIXELS = 50_000_000


# EXIF orientations that turn the picture a quarter turn: width and height trade places
QUARTER_TURNS = (5, 6, 7, 8)


@contextlib.contextmanager
def _open_image(path: str | Path, name: str | None) -> Iterator[Image.Image]:
    """The image file opened (not decoded); InvalidRequest, calling it `name` (default: its
    path), when it is missing, over MAX_IMAGE_PIXELS, or no image PIL can read, now or when
    the caller decodes it."""
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise InvalidRequest(f"{name}: no such file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequest(f"{name}: the image is {width}x{height}, more than {MAX_IMAGE_PIXELS} pixels")
            yield image
    except InvalidRequest:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL raises on bad files
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise InvalidRequest(f"{name}: not an image framecast can read ({reason})") from None


def image_size(path: str | Path, name: str | None = None) -> tuple[int, int]:
    """(width, height) of an image as it is shown (its EXIF rotation applied), without decoding it."""
    with _open_image(path, name) as image:
        width, height = image.size
        turned = image.getexif().get(0x0112) in QUARTER_TURNS
        return (height, width) if turned else (width, height)


def load_image(path: str | Path, name: str | None = None) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (transparency dropped, palettes and grey expanded);
    InvalidRequest saying why when it is missing or no image PIL can read. Errors call it `name`
    (default: its path; the Videos API says "input_reference", not where it keeps the upload)."""
    with _open_image(path, name) as image:
        # upright as the camera meant it (a phone's JPEG stores its rotation in EXIF), as
        # diffusers' own load_image does
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def image_digest(image: np.ndarray) -> str:
    """sha256 of an image's shape and pixels: equal pictures, equal digest; never its file name."""
    digest = hashlib.sha256(f"{image.shape}".encode())
    digest.update(np.ascontiguousarray(image))
    return digest.hexdigest()


MARK_COLOURS = {"sharpest": (0, 220, 0), "blurriest": (230, 0, 0)}


def contact_sheet(
    frames: np.ndarray,
    max_frames: int = 16,
    columns: int = 4,
    min_width: int = 160,
    marks: dict[int, str] | None = None,
) -> Image.Image:
    """A grid of evenly spaced frames, each labelled with its 0-based index.

    `marks` (frame index -> word, e.g. {12: "sharpest"}) are always on the sheet, framed in
    colour and labelled with their word; they take the place of evenly spaced frames.
    """
    marks = marks or {}
    n = len(frames)
    even = min(n, max(1, max_frames - len(marks)))
    picks = sorted({round(i * (n - 1) / max(even - 1, 1)) for i in range(even)} | set(marks))
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
        label = f"#{idx}" + (f" {marks[idx]}" if idx in marks else "")
        if idx in marks:
            colour = MARK_COLOURS.get(marks[idx].split(",")[0], (255, 200, 0))
            border = max(2, cell_w // 80)
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], outline=colour, width=border)
        draw.rectangle([x, y, x + 6 * len(label) + 4, y + 13], fill="black")
        draw.text((x + 3, y + 1), label, fill="white")
    return sheet
