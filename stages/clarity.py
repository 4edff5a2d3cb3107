"""The clarity panel: how sharp, noisy, steady and consistent a video is, measured offline.

A generation is measured twice: its frames as the model made them (`clarity/...`), before any
encoder, and the file as saved (`encoded/clarity/...`, with `encoded/psnr_y` and `encoded/ssim_y`
of the file against the frames: what the codec cost). A motion-interpolated copy is measured as
made too (`interp/clarity/...`). The metrics read the luma (Y) plane: of a file, as stored and
decoded by ffmpeg (the binary imageio-ffmpeg ships); of frames, as that ffmpeg converts RGB to Y
(`video_io.luma`), which is what it reads from a lossless RGB file of the same frames. So any
figure can be checked with that ffmpeg. Per frame t (pairwise metrics: the pair t-1, t, as ffmpeg's signalstats YDIF):

    sharpness_laplacian_var  variance of the 4-neighbour Laplacian of Y (cv2.Laplacian)
    tenengrad                mean of Gx^2 + Gy^2, Sobel 3x3
    blur_effect              Crete et al. 2007: 0 sharp ... 1 blurry (as skimage.measure.blur_effect)
    noise_sigma              median |HH| / 0.6745 of the db2 wavelet (as skimage.restoration.estimate_sigma)
    flicker_mae              mean |Y_t - Y_t-1|            (ffmpeg signalstats YDIF)
    flicker_score            (255 - mean |RGB_t - RGB_t-1|) / 255   (VBench temporal flickering)
    motion_magnitude         mean of the top 5% of DIS optical-flow magnitudes, pixels
    warp_error               frame t warped back onto t-1 along the flow, squared error in [0, 1]
                             units over the pixels the forward-backward check keeps
    psnr_y, ssim_y           against a reference video, when one is given

For a model trained on a world with a detector (framecast-shapes), the panel also checks the
video against its prompt: `adherence/color`, `/shape`, `/direction` (0 or 1) and `/score`.

The video's figure is the mean over frames (over pairs), except psnr_y, the PSNR of the mean
squared error (as ffmpeg's psnr filter), and sharpness_laplacian_var_min, the blurriest frame's.
Y values are 8-bit code values (0-255): sharpness, tenengrad and noise_sigma are in those units.

Three of these (blur_effect, noise_sigma, SSIM) have scikit-image implementations, which the
tests compare against digit for digit. The panel does not call them: Crete's measure is computed
here from the Sobel gradients that tenengrad already needs, in about half scikit-image's time
(bench/clarity.py), and scikit-image stays out of the stage processes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pywt

from stages import shapes
from stages.errors import InvalidRequest
from stages.video_io import DecodedVideo, luma

# (key, what it says) in the order tables and CSV columns show them
METRICS: dict[str, str] = {
    "sharpness_laplacian_var": "focus / fine detail (higher: sharper)",
    "sharpness_laplacian_var_min": "the blurriest frame's sharpness",
    "tenengrad": "gradient energy (higher: sharper)",
    "blur_effect": "perceptual blur, 0 sharp ... 1 blurry",
    "noise_sigma": "residual noise, Y code values",
    "flicker_mae": "frame-to-frame change of Y (0: static)",
    "flicker_score": "1 - RGB frame change / 255 (1: no flicker)",
    "motion_magnitude": "how much moves, pixels per frame",
    "warp_error": "motion-compensated change, [0,1] units (lower: more consistent)",
    "psnr_y": "fidelity to the reference, dB",
    "ssim_y": "structural similarity to the reference, 0 ... 1",
}
# Which way is clearer, for ranking settings: +1 higher, -1 lower. motion_magnitude says how
# much moves, which is neither clearer nor less clear, so settings are not ranked by it.
CLEARER: dict[str, int] = {
    "sharpness_laplacian_var": 1,
    "sharpness_laplacian_var_min": 1,
    "tenengrad": 1,
    "blur_effect": -1,
    "noise_sigma": -1,
    "flicker_mae": -1,
    "flicker_score": 1,
    "warp_error": -1,
    "psnr_y": 1,
    "ssim_y": 1,
}
# Prompt adherence, for models trained on a world with a detector (a spec's `adherence`, e.g.
# framecast-shapes): 0 or 1 per video for each term of the prompt, and their mean. Recorded as
# `adherence/<key>`, higher is better; absent for every other model.
ADHERENCE: dict[str, str] = {
    "color": "the object's colour is the prompt's (0 or 1)",
    "shape": "the object's shape is the prompt's (0 or 1)",
    "direction": "the object moves as the prompt says (0 or 1)",
    "score": "mean of colour, shape and direction",
}
# The worlds whose detector checks a video against its prompt: a spec's `adherence` -> the world's
# module (its `GRAMMAR`, `parse_prompt(prompt)` and `adherence(prompt, rgb)`).
WORLDS: dict[str, ModuleType] = {"shapes": shapes}
PAIRWISE = ("flicker_mae", "flicker_score", "motion_magnitude", "warp_error")
REFERENCED = ("psnr_y", "ssim_y")

CRETE_REBLUR = 11  # Crete et al.'s re-blurring filter length (skimage's default h_size)
MAD_TO_SIGMA = 0.6744897501960817  # the 75th percentile of the standard normal: MAD = 0.6745 sigma
MOTION_TOP = 0.05  # motion_magnitude: the mean of the largest 5% of flow magnitudes
# Sundaram et al. 2010: a pixel is occluded when its forward flow and the backward flow where it
# lands do not cancel: |f + b|^2 > ALPHA (|f|^2 + |b|^2) + BETA.
OCCLUSION_ALPHA, OCCLUSION_BETA = 0.01, 0.5
SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # Wang et al.: Gaussian sigma 1.5, 11x11 (skimage: truncate 3.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0
# The smallest frame side measured: DIS flow needs 12 pixels, the SSIM window 11 clear of its border.
MIN_SIDE = 16


@dataclass
class ClarityReport:
    """The panel's figures for one video: per frame, and for the video as a whole."""

    frames: int
    height: int
    width: int
    fps: float
    summary: dict[str, float]  # key -> the video's figure (pairwise keys absent for one frame)
    per_frame: dict[str, list[float]] = field(default_factory=dict)  # key -> one value per frame (NaN: none)
    seconds: float = 0.0  # how long the panel took
    adherence: dict[str, float] = field(default_factory=dict)  # ADHERENCE key -> figure; empty: not checked
    # A generation's: its file as saved, measured against these frames (psnr_y, ssim_y: what the
    # codec cost), and its motion-interpolated copy as made.
    encoded: ClarityReport | None = None
    interpolated: ClarityReport | None = None

    @property
    def sharpest(self) -> int:
        return int(np.argmax(self.per_frame["sharpness_laplacian_var"]))

    @property
    def blurriest(self) -> int:
        return int(np.argmin(self.per_frame["sharpness_laplacian_var"]))

    def marks(self) -> dict[int, str]:
        """Contact-sheet marks: the sharpest and the blurriest frame (by Laplacian variance)."""
        if self.sharpest == self.blurriest:
            return {self.sharpest: "sharpest, blurriest"}
        return {self.sharpest: "sharpest", self.blurriest: "blurriest"}

    def metrics(self) -> dict[str, float]:
        """The summary as MLflow metrics: `clarity/<key>`, and `adherence/<key>` where the prompt
        was checked; with the file's figures `encoded/clarity/<key>`, `encoded/psnr_y` and
        `encoded/ssim_y`, and the interpolated copy's `interp/clarity/<key>`. Undefined figures
        (NaN) are left out."""
        out = {f"clarity/{k}": v for k, v in self.summary.items() if not math.isnan(v)}
        if self.encoded is not None:
            for k, v in self.encoded.summary.items():
                if not math.isnan(v):
                    out[f"encoded/{k}" if k in REFERENCED else f"encoded/clarity/{k}"] = v
        if self.interpolated is not None:
            out |= {f"interp/clarity/{k}": v for k, v in self.interpolated.summary.items() if not math.isnan(v)}
        return {**out, **{f"adherence/{k}": v for k, v in self.adherence.items()}}

    def csv_text(self) -> str:
        """The per-frame series as CSV: one row per frame, empty where a figure is undefined; with
        the file's psnr_y and ssim_y against each frame (`encoded_psnr_y`, `encoded_ssim_y`)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        series = dict(self.per_frame)
        if self.encoded is not None:
            series |= {f"encoded_{k}": self.encoded.per_frame[k] for k in REFERENCED if k in self.encoded.per_frame}
        keys = list(series)
        writer.writerow(["frame", "time_s", *keys])
        for t in range(self.frames):
            values = [series[k][t] for k in keys]
            time_s = f"{t / self.fps:.4f}" if self.fps else ""
            writer.writerow([t, time_s, *("" if math.isnan(v) else f"{v:.6g}" for v in values)])
        return out.getvalue()

    def as_json(self) -> dict:
        """JSON-ready: undefined figures are null; an infinite PSNR (identical frames) is "inf"."""

        return {
            "frames": self.frames,
            "height": self.height,
            "width": self.width,
            "fps": self.fps,
            "clarity": {k: json_figure(v) for k, v in self.summary.items()},
            "sharpest_frame": self.sharpest,
            "blurriest_frame": self.blurriest,
            **({"adherence": dict(self.adherence)} if self.adherence else {}),
            "per_frame": {k: [json_figure(v) for v in series] for k, series in self.per_frame.items()},
        }


def measure_file(path: str | Path, reference: str | Path | None = None) -> ClarityReport:
    """The panel for a video file (any video ffmpeg decodes), against an optional reference."""
    return read_and_measure(path, reference)[1]


def read_and_measure(path: str | Path, reference: str | Path | None = None) -> tuple[DecodedVideo, ClarityReport]:
    """`measure_file`, also returning the decoded video (e.g. for a contact sheet); the report's
    `seconds` count decoding too."""
    start = time.perf_counter()
    video = DecodedVideo.read(path)
    ref = DecodedVideo.read(reference, planes=("y",)) if reference is not None else None
    report = measure(video, ref)
    report.seconds = time.perf_counter() - start
    return video, report


def measure_frames(
    rgb: np.ndarray, fps: float, reference: np.ndarray | None = None, name: str = "the frames"
) -> ClarityReport:
    """The panel for uint8 RGB frames as made (frames, H, W, 3), before any encoder, against
    optional `reference` frames; `name` says what they are in errors."""
    start = time.perf_counter()
    ref = None if reference is None else _frames_video(reference, fps, "the reference frames")
    report = measure(_frames_video(rgb, fps, name), ref)
    report.seconds = time.perf_counter() - start
    return report


def _frames_video(rgb: np.ndarray, fps: float, name: str) -> DecodedVideo:
    return DecodedVideo(name, float(fps), y=luma(rgb), rgb=rgb)


def measure(video: DecodedVideo, reference: DecodedVideo | None = None) -> ClarityReport:
    """The panel for decoded frames: `video` needs its Y plane and RGB frames, `reference` its Y plane."""
    y, rgb = video.y, video.rgb
    if min(video.size) < MIN_SIDE:
        h, w = video.size
        raise InvalidRequest(
            f"{video.path}: frames of {w}x{h} are too small to measure; at least {MIN_SIDE}x{MIN_SIDE}"
        )
    if reference is not None:
        _check_reference(video, reference)
    keys = [k for k in METRICS if k != "sharpness_laplacian_var_min" and (reference is not None or k not in REFERENCED)]
    series = {key: np.full(len(y), np.nan) for key in keys}  # per frame; NaN where a figure is undefined
    for t, frame in enumerate(y):
        series["sharpness_laplacian_var"][t] = cv2.Laplacian(frame, cv2.CV_64F).var()
        gx, gy = sobel(frame)
        series["tenengrad"][t] = np.mean(gx * gx + gy * gy)
        series["blur_effect"][t] = blur_effect(frame, gx, gy)
        series["noise_sigma"][t] = noise_sigma(frame)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    for t in range(1, len(y)):
        series["flicker_mae"][t] = np.abs(y[t].astype(np.int16) - y[t - 1]).mean()
        series["flicker_score"][t] = (PEAK - np.abs(rgb[t].astype(np.int16) - rgb[t - 1]).mean()) / PEAK
        forward, backward = dis.calc(y[t - 1], y[t], None), dis.calc(y[t], y[t - 1], None)
        series["motion_magnitude"][t] = top_mean(cv2.magnitude(*cv2.split(forward)), MOTION_TOP)
        series["warp_error"][t] = warp_error(y[t - 1], y[t], forward, backward)
    if reference is not None:
        mse, series["ssim_y"][:] = _fidelity(y, reference.y)
        with np.errstate(divide="ignore"):
            series["psnr_y"][:] = 10 * np.log10(PEAK**2 / mse)

    # The video's figures: means over frames (pairs), except two; none for pairs a video lacks.
    summary = {key: _mean(values) for key, values in series.items() if not (key in PAIRWISE and len(y) < 2)}
    summary["sharpness_laplacian_var_min"] = float(series["sharpness_laplacian_var"].min())
    if reference is not None:
        with np.errstate(divide="ignore"):
            summary["psnr_y"] = float(10 * np.log10(PEAK**2 / mse.mean()))  # of the mean MSE, as ffmpeg
    summary = {key: summary[key] for key in METRICS if key in summary}  # in the table's order
    height, width = video.size
    per_frame = {key: [float(v) for v in values] for key, values in series.items()}
    return ClarityReport(len(y), height, width, video.fps, summary, per_frame)


def _fidelity(y: np.ndarray, reference_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the mean squared error and SSIM of luma planes against a reference's."""
    mse = np.array([np.mean((a.astype(np.float64) - b) ** 2) for a, b in zip(y, reference_y, strict=True)])
    return mse, np.array([ssim(a, b) for a, b in zip(y, reference_y, strict=True)])


def fidelity(rgb: np.ndarray, reference_rgb: np.ndarray) -> dict[str, float]:
    """psnr_y (of the mean MSE, as the panel's) and ssim_y (mean over frames) of uint8 RGB frames
    against reference frames of the same shape, without the rest of the panel."""
    if rgb.shape != reference_rgb.shape:
        raise InvalidRequest(f"frames of shape {rgb.shape} cannot be compared with {reference_rgb.shape}")
    mse, ssims = _fidelity(luma(rgb), luma(reference_rgb))
    with np.errstate(divide="ignore"):
        return {"psnr_y": float(10 * np.log10(PEAK**2 / mse.mean())), "ssim_y": float(ssims.mean())}


def json_figure(v: float) -> float | str | None:
    """A figure as strict JSON has it: NaN (undefined) is null, an infinity (the PSNR of identical
    frames) "inf" or "-inf"."""
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _mean(values: np.ndarray) -> float:
    """The mean of the defined values (NaN if none is)."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def _check_reference(video: DecodedVideo, reference: DecodedVideo) -> None:
    if reference.size != video.size:
        (h, w), (rh, rw) = video.size, reference.size
        raise InvalidRequest(f"the reference is {rw}x{rh} but the video is {w}x{h}; they must be the same size")
    if reference.frames != video.frames:
        raise InvalidRequest(
            f"the reference has {reference.frames} frames but the video has {video.frames}; they must be as long"
        )


def sobel(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel 3x3 gradients (x, y) of one frame in float64, mirrored borders (as scipy's 'reflect')."""
    gx = cv2.Sobel(y, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    gy = cv2.Sobel(y, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    return gx, gy


def blur_effect(y: np.ndarray, gx: np.ndarray | None = None, gy: np.ndarray | None = None) -> float:
    """Crete et al. 2007 on one frame, as skimage.measure.blur_effect (h_size 11, max over axes).

    Along each axis: how much of the frame's gradient a re-blur with an 11-tap box removes. A
    sharp frame loses much (0), a blurry one little (1). The measure is a ratio of gradient
    sums, so the Sobel scale (skimage divides by 4) and the Y scale do not matter. `gx`, `gy`:
    this frame's `sobel`, if already computed.
    """
    if gx is None or gy is None:
        gx, gy = sobel(y)
    frame = y.astype(np.float64)
    inner = (slice(2, -1), slice(2, -1))  # skimage's: borders excluded
    blur = []
    for gradient, box, dx, dy in ((gy, (1, CRETE_REBLUR), 0, 1), (gx, (CRETE_REBLUR, 1), 1, 0)):
        reblurred = cv2.blur(frame, box, borderType=cv2.BORDER_REFLECT)
        sharp_g = np.abs(gradient)[inner]
        blur_g = np.abs(cv2.Sobel(reblurred, cv2.CV_64F, dx, dy, ksize=3, borderType=cv2.BORDER_REFLECT))[inner]
        total = sharp_g.sum()
        if total == 0:  # no edges at all: as blurry as can be (skimage's answer too)
            blur.append(1.0)
            continue
        blur.append(abs(total - np.maximum(0.0, sharp_g - blur_g).sum()) / total)
    return float(max(blur))


def noise_sigma(y: np.ndarray) -> float:
    """Donoho-Johnstone noise estimate of one frame, as skimage.restoration.estimate_sigma: the
    median absolute diagonal detail coefficient of a one-level db2 wavelet transform over
    0.6745; coefficients exactly 0 (flat regions) are left out. 0 for a frame without detail."""
    detail = pywt.dwtn(y.astype(np.float64), "db2")["dd"]
    detail = np.abs(detail[detail != 0])
    return float(np.median(detail) / MAD_TO_SIGMA) if detail.size else 0.0


def top_mean(values: np.ndarray, fraction: float) -> float:
    """The mean of the largest `fraction` of `values` (at least one)."""
    flat = values.ravel()
    k = max(1, math.ceil(fraction * flat.size))
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())


def warp_error(first: np.ndarray, second: np.ndarray, forward: np.ndarray, backward: np.ndarray) -> float:
    """Mean squared difference, in [0, 1] units, between `first` and `second` warped back onto
    it along the `forward` flow (first -> second), over the pixels that are not occluded:
    those whose forward flow the `backward` flow (second -> first) undoes, and which land
    inside the frame. NaN if every pixel is occluded."""
    h, w = first.shape
    fx, fy = cv2.split(forward)
    map_x = fx + np.arange(w, dtype=np.float32)[None, :]
    map_y = fy + np.arange(h, dtype=np.float32)[:, None]
    warped = cv2.remap(second.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR)
    bx, by = cv2.split(cv2.remap(backward, map_x, map_y, cv2.INTER_LINEAR))
    round_trip = (fx + bx) ** 2 + (fy + by) ** 2
    scale = fx * fx + fy * fy + bx * bx + by * by
    visible = round_trip <= OCCLUSION_ALPHA * scale + OCCLUSION_BETA
    visible &= (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    if not visible.any():
        return math.nan
    diff = (first.astype(np.float32) - warped)[visible] / PEAK
    return float(np.mean(diff * diff))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two frames with Wang et al.'s parameters: an 11x11 Gaussian window of sigma
    1.5, K1 0.01, K2 0.03, 8-bit range; population (co)variances; the 5-pixel border, which the
    window does not cover, left out. As skimage's structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=255)."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    size = 2 * SSIM_RADIUS + 1

    def window_mean(v: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(v, (size, size), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mx, my = window_mean(x), window_mean(y)
    vx, vy, cxy = window_mean(x * x) - mx * mx, window_mean(y * y) - my * my, window_mean(x * y) - mx * my
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    r = SSIM_RADIUS
    return float(s[r:-r, r:-r].mean())


class ClarityStage:
    """The panel as a stage. A generation's frames come as arrays and its file as bytes, so that
    the process measuring them needs no view of the disk the video was written to."""

    def __init__(self, threads: int | None = None):
        threads = threads or _threads_from_env()  # a stage actor's share of the cores
        if threads:
            cv2.setNumThreads(threads)
        self._threads = cv2.getNumThreads()

    def describe(self) -> str:
        return f"cpu ({self._threads} OpenCV thread{'s' if self._threads != 1 else ''})"

    def measure(
        self,
        frames: np.ndarray,
        fps: float,
        media: bytes,
        suffix: str = ".mp4",
        prompt: str | None = None,
        adherence: str | None = None,
        interpolated: np.ndarray | None = None,
        interpolated_fps: float = 0.0,
    ) -> ClarityReport:
        """The panel for a generation: its uint8 RGB `frames` as made (the report's own figures),
        its file's bytes `media` (`suffix` its type: ".png" is a one-frame picture) measured
        against them (`encoded`), and its `interpolated` frames, if any. With `adherence` (a
        world's name, see WORLDS) the frames are also checked against their `prompt`."""
        start = time.perf_counter()
        made = _frames_video(frames, fps, "the generated frames")
        report = measure(made)
        if suffix != ".png":  # a PNG holds its one frame exactly: its figures would be the frame's
            with tempfile.TemporaryDirectory(prefix="framecast-clarity-") as scratch:
                path = Path(scratch) / f"video{suffix}"
                path.write_bytes(media)
                report.encoded = measure(DecodedVideo.read(path), reference=made)
        if interpolated is not None:
            report.interpolated = measure(_frames_video(interpolated, interpolated_fps, "the interpolated frames"))
        if adherence is not None and prompt is not None:
            report.adherence = check_adherence(adherence, prompt, frames) or {}
        report.seconds = time.perf_counter() - start
        return report


def check_adherence(world: str, prompt: str, rgb: np.ndarray) -> dict[str, float] | None:
    """`world`'s detector on decoded RGB frames: ADHERENCE's keys, or None when the prompt is not
    one the world's detector can check."""
    return WORLDS[world].adherence(prompt, rgb)


def metric_sign(metric: str) -> int | None:
    """+1 if a higher figure of an MLflow metric (`clarity/...`, `encoded/clarity/...`,
    `interp/clarity/...`, `encoded/psnr_y`, `adherence/...`, `vs_uncached/...`) is better, -1 if
    lower, None if it has no direction (e.g. how much moves, how much a cache skipped)."""
    if metric.startswith("vs_uncached/delta/"):  # the change of a figure runs its way
        return metric_sign(metric.removeprefix("vs_uncached/delta/"))
    if metric in ("vs_uncached/psnr_y", "vs_uncached/ssim_y", "vs_uncached/denoise_speedup"):
        return 1  # closer to the uncached video, and faster
    group, _, key = metric.removeprefix("encoded/").removeprefix("interp/").rpartition("/")
    if group == "clarity" or (group == "" and metric.startswith("encoded/") and key in REFERENCED):
        return CLEARER.get(key)
    if group == "adherence" and key in ADHERENCE and metric.startswith("adherence/"):
        return 1
    return None


def _threads_from_env() -> int | None:
    """The thread count this process was given (OMP_NUM_THREADS), if any."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else None
