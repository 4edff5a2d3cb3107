"""Video I/O: MP4 (H.264, yuv420p) through the ffmpeg that imageio-ffmpeg ships; contact sheets.

Reading goes through the same ffmpeg, so any video it can decode is read the same way, and a
figure measured here can be checked with that ffmpeg binary (`imageio_ffmpeg.get_ffmpeg_exe()`).

ffmpeg runs in a process of its own, piped raw frames, through `FfmpegProcess` here rather than
imageio-ffmpeg's read_frames/write_frames: those start it with `preexec_fn=os.setpgrp`, which
runs Python in the forked child before it execs. In a process with many threads (the Videos
API's ingress and its runners) such a child can deadlock before it execs (seen: a job stuck in
`PyOS_AfterFork_Child`). `start_new_session` keeps ffmpeg out of the terminal's Ctrl-C the same
way, done in C between fork and exec. Every run also has a deadline, after which it is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from stages.errors import InvalidRequest

# The longest an ffmpeg run may go without taking or giving a frame before it is killed: far above
# any frame's time (a 720x480 frame takes milliseconds; opening a file, less than a second), yet
# finite, so that a stuck ffmpeg can never hold a job (or a Videos API runner) for good. A long
# video is not cut short: the clock starts again at every frame.
FFMPEG_DEADLINE_S = 120.0


class FfmpegTimeout(TimeoutError):
    """ffmpeg went past its deadline without a frame and was killed."""


class FfmpegProcess:
    """One run of the ffmpeg binary with `args`, in a session of its own, killed once it has gone
    FFMPEG_DEADLINE_S without a frame (`touch` says one went through).

    stdout is a pipe (raw frames out) or nothing; stdin a pipe when `feed` (raw frames in);
    stderr is collected by a thread (a full pipe would stall ffmpeg), and `header` is set once
    ffmpeg has said what its output will be (or has ended)."""

    def __init__(self, args: Sequence[str], *, feed: bool = False, output: bool = False):
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", *([] if feed else ["-nostdin"]), *args]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
            stdout=subprocess.PIPE if output else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # not preexec_fn: see the module's docstring
        )
        self.deadline_s, self.expired = FFMPEG_DEADLINE_S, False
        self.log: list[str] = []
        self.header = threading.Event()
        self._last = time.monotonic()
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read_log, name="ffmpeg-log", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch, name="ffmpeg-deadline", daemon=True).start()

    def touch(self) -> None:
        """A frame went through: the deadline starts again."""
        self._last = time.monotonic()

    def _read_log(self) -> None:
        output = False
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            output = output or line.startswith("Output #0")
            if output and "Stream #0:" in line:
                self.header.set()
        self.header.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.deadline_s / 4)):
            if time.monotonic() - self._last > self.deadline_s:
                self.expired = True
                self.process.kill()
                return

    def finish(self) -> int:
        """Wait for ffmpeg to exit (within its deadline) and its log; its exit status."""
        try:
            code = self.process.wait()  # the watch kills it at the deadline
            self._reader.join()
        finally:
            self.stop()
        if self.expired:
            raise FfmpegTimeout(f"ffmpeg went {self.deadline_s:g} s without a frame and was stopped")
        return code

    def stop(self) -> None:
        """Kill ffmpeg if it still runs, and release its pipes."""
        self._done.set()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def reason(self) -> str:
        return _ffmpeg_reason("\n".join(self.log))


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, crf: int = 18) -> Path:
    """Write (frames, H, W, 3) uint8 as H.264/yuv420p. H and W must be even (yuv420p halves chroma)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (frames, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264/yuv420p needs an even width and height, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The atomic rename means a crash never leaves a truncated file under the final name.
    partial = path.with_name(f".{path.name}.partial.mp4")
    rate = str(Fraction(fps).limit_denominator())  # a rational: 24000/1001 stays exact
    ffmpeg = FfmpegProcess(
        ["-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", rate,
         "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error", "-crf", str(crf),
         "-movflags", "+faststart", str(partial)],
        feed=True,
    )  # fmt: skip
    try:
        try:
            for frame in frames:
                ffmpeg.process.stdin.write(np.ascontiguousarray(frame).tobytes())
                ffmpeg.touch()
            ffmpeg.process.stdin.close()
        except BrokenPipeError:  # ffmpeg ended early: its exit status and log say why
            pass
        if ffmpeg.finish() != 0:
            raise OSError(f"ffmpeg could not write {path}: {ffmpeg.reason()}")
    except BaseException:
        ffmpeg.stop()
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
    ffmpeg = FfmpegProcess(
        ["-i", str(path), "-pix_fmt", pix_fmt, "-vcodec", "rawvideo", "-f", "rawvideo", *EACH_FRAME_ONCE, *filters,
         "-"],
        output=True,
    )  # fmt: skip
    try:
        ffmpeg.header.wait()  # set once ffmpeg has said what it will write, or has ended (or was killed)
        source, written = _video_streams(ffmpeg.log)
        if (size := _output_size(written)) is None:
            if ffmpeg.process.poll() is not None:
                ffmpeg.finish()  # raises FfmpegTimeout if that is why it ended
            raise InvalidRequest(f"{path}: not a video ffmpeg can read ({ffmpeg.reason()})")
    except BaseException:
        ffmpeg.stop()
        raise
    width, height = size
    frame_bytes = width * height * channels

    def frames() -> Iterator[np.ndarray]:
        try:
            while len(raw := ffmpeg.process.stdout.read(frame_bytes)) == frame_bytes:
                ffmpeg.touch()
                yield np.frombuffer(raw, np.uint8).reshape(height, width, channels)
            if ffmpeg.finish() != 0:
                raise InvalidRequest(f"{path}: ffmpeg failed while decoding it ({ffmpeg.reason()})")
        finally:
            ffmpeg.stop()

    return _fps(source), frames()


def _video_streams(log: list[str]) -> tuple[str, str]:
    """ffmpeg's lines on the input's video stream and on the raw frames it writes ("" if none)."""
    split = next((i for i, line in enumerate(log) if line.startswith("Output #0")), len(log))

    def stream(lines: list[str]) -> str:
        return next((line for line in lines if "Stream #0:" in line and " Video: " in line), "")

    return stream(log[:split]), stream(log[split:])


def _output_size(line: str) -> tuple[int, int] | None:
    """(width, height) a stream line gives (on the output's line: after any filter)."""
    found = re.search(r" ([0-9]+)x([0-9]+)[, ]", line)
    return (int(found[1]), int(found[2])) if found else None


def _fps(line: str) -> float:
    """The frame rate a stream line gives (0.0 when it gives none)."""
    found = re.search(r" ([0-9.]+)(k?) fps", line) or re.search(r" ([0-9.]+)(k?) tbr", line)
    return float(found[1]) * (1000 if found[2] else 1) if found else 0.0


def _ffmpeg_reason(log: str) -> str:
    """The line of ffmpeg's output (`log`) that says what is wrong."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    if any("does not contain any stream" in line for line in lines):
        return "it has no video stream"
    for line in reversed(lines):
        if "Error opening input:" in line:
            return line.split("Error opening input:", 1)[1].strip()
    # ffmpeg's last lines are often generic ("Conversion failed!"); the first error line says why
    informative = [line for line in lines if "rror" in line or "nvalid" in line or "not available" in line]
    return (informative or lines or ["ffmpeg said nothing"])[0]


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
