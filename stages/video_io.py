"""Video I/O through the ffmpeg that imageio-ffmpeg ships: writing frames with a codec (`CODECS`:
H.264 as MP4 by default, lossless RGB, ProRes, WebM, GIF), reading any video back, motion-
interpolating a clip to a higher frame rate; and contact sheets.

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
from collections.abc import Callable, Iterator, Sequence
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


@dataclass(frozen=True)
class Codec:
    """How a generation's frames are stored: the file's type, ffmpeg's encoder and its settings."""

    name: str
    suffix: str
    media_type: str
    about: str  # one line: what it is for
    encoder: tuple[str, ...] = ()  # ffmpeg's output options (the frames come in as rgb24)
    lossless: bool = False  # reading the file back gives the frames exactly (checked by digest in the tests)
    crf: tuple[int, int] | None = None  # the encoder's CRF range; None: it takes no CRF
    default_crf: int | None = None
    even_size: bool = False  # 4:2:0 or 4:2:2 chroma: the width (and for 4:2:0 the height) must be even
    picture: bool = False  # one frame, for text-to-image models
    max_fps: int | None = None  # the fastest it can play
    max_colours: int | None = None  # a palette's size: frames of more colours are stored lossily


FASTSTART = ("-movflags", "+faststart")  # MP4/MOV: the index first, so a player can start before the end
# Lossless means RGB stored as RGB: any RGB -> YUV conversion rounds (yuv444p at QP 0 included),
# so the lossless codecs keep the frames' own planes: libx264rgb at QP 0, and FFV1 with planar
# RGB (gbrp) in Matroska.
CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("h264", ".mp4", "video/mp4", "H.264 4:2:0 (CRF 18 by default): plays everywhere",
              ("-vcodec", "libx264", "-pix_fmt", "yuv420p", *FASTSTART), crf=(0, 51), default_crf=18, even_size=True),
        Codec("h264-lossless", ".mp4", "video/mp4", "H.264 RGB at QP 0: lossless; ffmpeg and VLC play it, not browsers",
              ("-vcodec", "libx264rgb", "-qp", "0", "-pix_fmt", "rgb24", *FASTSTART), lossless=True),
        Codec("ffv1", ".mkv", "video/x-matroska", "FFV1 planar RGB in Matroska: lossless, for archives and analysis",
              ("-vcodec", "ffv1", "-level", "3", "-pix_fmt", "gbrp"), lossless=True),
        Codec("prores", ".mov", "video/quicktime", "ProRes 422 HQ, 10-bit: for editing; near-lossless, large",
              ("-vcodec", "prores_ks", "-profile:v", "3", "-pix_fmt", "yuv422p10le", *FASTSTART), even_size=True),
        # cpu-used 4: libvpx's speed; at its default (0) 49 noisy 480x720 frames took 23 s here, at 4, 6 s.
        Codec("webm", ".webm", "video/webm", "VP9 4:2:0 in WebM (CRF 31 by default): for the web, smaller than H.264",
              ("-vcodec", "libvpx-vp9", "-pix_fmt", "yuv420p", "-b:v", "0", "-row-mt", "1", "-cpu-used", "4"),
              crf=(0, 63), default_crf=31, even_size=True),
        # One palette of at most 256 colours for the whole clip (stats_mode=full), none reserved for
        # transparency: a clip of at most 256 colours is kept exactly, one of more is dithered.
        # Frame delays are whole hundredths of a second: 8 fps plays at 8.33, and 2 is the shortest.
        Codec("gif", ".gif", "image/gif", "GIF: at most 256 colours (lossy beyond that), loops",
              ("-filter_complex", "split[a][b];[a]palettegen=stats_mode=full:reserve_transparent=0[p];[b][p]paletteuse",
               "-loop", "0"), max_fps=50, max_colours=256),
        Codec("png", ".png", "image/png", "PNG: a text-to-image model's picture", lossless=True, picture=True),
    )
}  # fmt: skip
VIDEO_CODECS = tuple(name for name, codec in CODECS.items() if not codec.picture)


def write_video(
    frames: np.ndarray,
    path: str | Path,
    fps: float,
    codec: str = "h264",
    crf: int | None = None,
    on_frame: Callable[[], None] | None = None,
) -> Path:
    """Write (frames, H, W, 3) uint8 RGB with `codec` (CODECS) at `crf` (None: the codec's
    default; only codecs with a CRF take one). The file appears under `path` whole or not at all.
    `on_frame` is called in this thread as each frame goes to the encoder (a sign of progress)."""
    spec = CODECS[codec]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (frames, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if spec.even_size and (height % 2 or width % 2):
        raise ValueError(f"{codec} needs an even width and height, got {width}x{height}")
    if crf is not None and spec.crf is None:
        raise ValueError(f"{codec} takes no CRF")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The atomic rename means a crash never leaves a truncated file under the final name.
    partial = path.with_name(f".{path.name}.partial{spec.suffix}")
    try:
        if spec.picture:
            if frames.shape[0] != 1:
                raise ValueError(f"a {codec} picture is one frame, got {frames.shape[0]}")
            Image.fromarray(frames[0]).save(partial, format="PNG")
        else:
            rate = ["-crf", str(spec.default_crf if crf is None else crf)] if spec.crf else []
            _encode(frames, partial, fps, [*spec.encoder, *rate], on_frame)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path


def _raw_input(width: int, height: int, fps: float) -> list[str]:
    """ffmpeg's options for rgb24 frames on stdin at `fps` (a rational: 24000/1001 stays exact)."""
    rate = str(Fraction(fps).limit_denominator())
    return ["-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", rate,
            "-i", "-", "-an"]  # fmt: skip


def _encode(
    frames: np.ndarray, path: Path, fps: float, options: Sequence[str], on_frame: Callable[[], None] | None
) -> None:
    height, width = frames.shape[1:3]
    ffmpeg = FfmpegProcess(["-y", *_raw_input(width, height, fps), "-v", "error", *options, str(path)], feed=True)
    try:
        _feed(ffmpeg, frames, on_frame)
        if ffmpeg.finish() != 0:
            raise OSError(f"ffmpeg could not write {path.name}: {ffmpeg.reason()}")
    finally:
        ffmpeg.stop()


def _feed(ffmpeg: FfmpegProcess, frames: np.ndarray, on_frame: Callable[[], None] | None = None) -> None:
    """Pipe the frames to ffmpeg as raw rgb24 and close its input; each frame restarts its deadline.
    If ffmpeg stops reading (it took what it needed, or failed: its exit status and log say
    which), the rest is not sent."""
    with contextlib.suppress(BrokenPipeError, ValueError):  # ValueError: the pipe was closed by a stop
        for frame in frames:
            ffmpeg.process.stdin.write(np.ascontiguousarray(frame).tobytes())
            ffmpeg.touch()
            if on_frame is not None:
                on_frame()
        ffmpeg.process.stdin.close()


def _filter(
    frames: np.ndarray,
    fps: float,
    options: Sequence[str],
    channels: int,
    on_frame: Callable[[], None] | None = None,
) -> np.ndarray:
    """rgb24 `frames` through ffmpeg's `options` (filters, and e.g. -frames:v), back as raw frames
    of `channels` (3: rgb24, 1: gray) at the input's size. The frames are fed from a thread while
    this one reads, so that neither pipe fills and stalls ffmpeg; `on_frame` is called in this
    thread for each frame that comes back."""
    height, width = frames.shape[1:3]
    pix_fmt = {3: "rgb24", 1: "gray"}[channels]
    ffmpeg = FfmpegProcess(
        [*_raw_input(width, height, fps), "-v", "error", *options, "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"],
        feed=True,
        output=True,
    )

    feeder = threading.Thread(target=_feed, args=(ffmpeg, frames), name="ffmpeg-feed", daemon=True)
    feeder.start()
    size = height * width * channels
    out = []
    try:
        while len(raw := ffmpeg.process.stdout.read(size)) == size:
            ffmpeg.touch()
            out.append(np.frombuffer(raw, np.uint8).reshape(height, width, channels))
            if on_frame is not None:
                on_frame()
        feeder.join()
        if ffmpeg.finish() != 0:
            raise OSError(f"ffmpeg failed: {ffmpeg.reason()}")
    finally:
        ffmpeg.stop()
    if not out:
        raise OSError("ffmpeg gave no frames")
    return np.stack(out)


INTERPOLATED = ".interp"  # <name>.interp.<ext>: a video's motion-interpolated copy, beside it


def interpolated_path(video: Path) -> Path:
    """Where a video's motion-interpolated copy goes."""
    return video.with_suffix(f"{INTERPOLATED}{video.suffix}")


def is_interpolated(path: Path) -> bool:
    """Whether `path` names a motion-interpolated copy."""
    return path.stem.endswith(INTERPOLATED)


# What `interpolate` pads the clip's end with (clones of the last frame): minterpolate makes a
# frame only between frames it has seen past, so without them the clip would end early.
INTERPOLATION_LOOKAHEAD = 3


def interpolated_count(frames: int, fps: float, target_fps: float) -> int:
    """Frames at `target_fps` lasting as long as `frames` at `fps` (to the nearest frame)."""
    return max(1, round(frames * target_fps / fps))


def interpolate(
    frames: np.ndarray, fps: float, target_fps: float, on_frame: Callable[[], None] | None = None
) -> np.ndarray:
    """The clip at `target_fps`, the same duration, made by ffmpeg's motion-compensated
    interpolation (`minterpolate`, mi_mode=mci). minterpolate works in YUV, so even the frames
    that fall on the original's instants come back within a code value or two of them. Output
    frames past the last original instant hold the last frame, as the original does for 1/fps.
    `on_frame` is called as each interpolated frame comes."""
    count = interpolated_count(len(frames), fps, target_fps)
    rate = str(Fraction(target_fps).limit_denominator())
    chain = f"tpad=stop_mode=clone:stop={INTERPOLATION_LOOKAHEAD},minterpolate=fps={rate}:mi_mode=mci"
    return _filter(frames, fps, ["-vf", chain, "-frames:v", str(count)], channels=3, on_frame=on_frame)


def luma(frames: np.ndarray) -> np.ndarray:
    """The Y plane of rgb24 frames as ffmpeg converts them (BT.601, limited range, swscale's
    rounding): what an encoder is given, and what ffmpeg's own filters read from a lossless RGB
    file of the same frames. (frames, H, W) uint8."""
    return _filter(frames, 1, ["-vf", LUMA_FILTER], channels=1)[..., 0]


def colour_count(frames: np.ndarray) -> int:
    """How many distinct RGB colours the frames hold."""
    packed = frames[..., 0].astype(np.uint32) << 16 | frames[..., 1].astype(np.uint32) << 8 | frames[..., 2]
    return int(np.unique(packed).size)


def palette_note(codec: str, frames: np.ndarray) -> str | None:
    """Why `codec`'s palette stores these frames lossily, or None when it has no palette or the
    frames fit it."""
    palette = CODECS[codec].max_colours
    if palette is None or (colours := colour_count(frames)) <= palette:
        return None
    return (
        f"the frames have {colours} colours and a {codec.upper()} holds {palette}: it is lossy (colours mapped "
        f"to one palette, dithered); for exact frames use h264-lossless or ffv1"
    )


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
