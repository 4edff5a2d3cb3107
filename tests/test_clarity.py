"""The clarity panel against independent implementations, on videos made here with ffmpeg.

ffmpeg (the binary imageio-ffmpeg ships) is the reference for flicker (signalstats YDIF), PSNR
and SSIM; scikit-image for blur_effect, noise_sigma and SSIM; SciPy for the Laplacian and Sobel
filters; OpenCV's own video decoder for VBench's flicker score. Properties: a sharp clip beats
its blurred copy, a static clip is static, a known shift moves as far as it was shifted, and a
flash at frame k shows at frame k.
"""

import json
import math
import re
import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from scipy import ndimage
from skimage.measure import blur_effect as skimage_blur_effect
from skimage.metrics import structural_similarity
from skimage.restoration import estimate_sigma

from cluster.cli import EXIT_INVALID, main
from stages.clarity import METRICS, ClarityStage, measure_file, measure_frames, metric_sign
from stages.errors import InvalidRequest
from stages.video_io import CODECS, MARK_COLOURS, DecodedVideo, contact_sheet, write_video

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SIZE = (128, 192)  # height, width of the test clips


def ffmpeg(*args: str, stdin: bytes | None = None) -> str:
    """Run the ffmpeg binary; its stdout and stderr together."""
    command = [FFMPEG, "-hide_banner", "-y", *(["-nostdin"] if stdin is None else []), *args]
    proc = subprocess.run(command, input=stdin, capture_output=True, check=True)
    return (proc.stdout + proc.stderr).decode()


def source_clip(
    path: Path, source: str, frames: int = 9, filters: str | None = None, crf: int = 18, size: tuple = SIZE
) -> Path:
    """An H.264 clip of an ffmpeg test source (testsrc2, mandelbrot...), optionally filtered."""
    h, w = size
    vf = ["-vf", filters] if filters else []
    ffmpeg("-f", "lavfi", "-i", f"{source}=size={w}x{h}:rate=8", "-frames:v", str(frames), *vf,
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), str(path))  # fmt: skip
    return path


def array_clip(path: Path, frames: np.ndarray, lossless: bool = False) -> Path:
    """An H.264 clip of (frames, H, W, 3) uint8 RGB; lossless keeps equal frames equal."""
    t, h, w, _ = frames.shape
    quality = ["-qp", "0"] if lossless else ["-crf", "18"]
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "8", "-i", "-",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", *quality, str(path), stdin=frames.tobytes())  # fmt: skip
    return path


def texture(seed: int = 0, shape: tuple[int, int] = (300, 400), sigma: float = 2.0) -> np.ndarray:
    """Smoothed noise: texture everywhere, so optical flow is well defined everywhere."""
    rng = np.random.default_rng(seed)
    tex = cv2.GaussianBlur(rng.uniform(0, 255, shape).astype(np.float32), (0, 0), sigma)
    tex = cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return np.repeat(tex[..., None], 3, axis=2)


def ffmpeg_ydif(path: Path) -> list[float]:
    out = ffmpeg("-v", "error", "-i", str(path), "-vf",
                 "signalstats,metadata=mode=print:key=lavfi.signalstats.YDIF:file=-", "-f", "null", "-")  # fmt: skip
    return [float(v) for v in re.findall(r"lavfi\.signalstats\.YDIF=([0-9.]+)", out)]


def ffmpeg_fidelity(video: Path, reference: Path, which: str, to_yuv: bool = False) -> float:
    """ffmpeg's psnr ('PSNR y:') or ssim ('SSIM Y:') summary for the Y plane. `to_yuv`: both
    converted to YUV first (by ffmpeg), for files stored as RGB (on RGB the filters compare R, G, B)."""
    graph = f"[0:v]format=yuv444p[a];[1:v]format=yuv444p[b];[a][b]{which}" if to_yuv else f"[0:v][1:v]{which}"
    out = ffmpeg("-i", str(video), "-i", str(reference), "-lavfi", graph, "-f", "null", "-")
    label = {"psnr": "PSNR y", "ssim": "SSIM Y"}[which]
    return float(re.search(rf"{label}:([0-9.]+|inf)", out).group(1))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "sharp": source_clip(d / "sharp.mp4", "testsrc2"),
        "blurred": source_clip(d / "blurred.mp4", "testsrc2", filters="gblur=sigma=2"),
        "noised": source_clip(d / "noised.mp4", "testsrc2", filters="noise=alls=12:allf=t"),
        "compressed": source_clip(d / "compressed.mp4", "testsrc2", crf=38),
        "mandelbrot": source_clip(d / "mandelbrot.mp4", "mandelbrot"),
        "bars": source_clip(d / "bars.mp4", "smptehdbars"),
    }


@pytest.fixture(scope="module")
def reports(clips) -> dict:
    return {name: measure_file(path) for name, path in clips.items()}


def test_the_luma_read_is_the_stored_y_plane(clips):
    """Not ffmpeg's gray conversion (which stretches 16-235 to 0-255): the Y plane as decoded."""
    h, w = SIZE
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(clips["sharp"]), "-f", "rawvideo", "-pix_fmt", "yuv420p",
                          "-"], capture_output=True, check=True).stdout  # fmt: skip
    planes = np.frombuffer(raw, np.uint8).reshape(9, h * w * 3 // 2)
    video = DecodedVideo.read(clips["sharp"])
    assert np.array_equal(video.y, planes[:, : h * w].reshape(9, h, w))
    assert video.rgb.shape == (9, h, w, 3) and video.fps == 8.0


@pytest.mark.parametrize("name", ["sharp", "noised", "mandelbrot"])
def test_flicker_equals_ffmpeg_signalstats(clips, reports, name):
    ydif = ffmpeg_ydif(clips[name])
    report = reports[name]
    assert len(ydif) == report.frames == 9
    assert report.summary["flicker_mae"] == pytest.approx(np.mean(ydif[1:]), rel=1e-3)  # frames 2..N
    assert report.per_frame["flicker_mae"][1:] == pytest.approx(ydif[1:], rel=1e-3)
    assert np.isnan(report.per_frame["flicker_mae"][0])  # frame 0 has no predecessor


@pytest.mark.parametrize("name", ["sharp", "mandelbrot"])
def test_flicker_score_equals_vbench_on_opencvs_decoder(clips, reports, name):
    """VBench's temporal-flickering form, computed on frames OpenCV's own ffmpeg decodes (BGR)."""
    capture = cv2.VideoCapture(str(clips[name]))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    mae = np.mean([np.mean(cv2.absdiff(a, b)) for a, b in zip(frames, frames[1:], strict=False)])
    assert reports[name].summary["flicker_score"] == pytest.approx((255 - mae) / 255, abs=1e-6)


@pytest.mark.parametrize("distorted", ["compressed", "blurred", "noised"])
def test_psnr_equals_ffmpeg_and_ssim_equals_scikit_image(clips, distorted):
    report = measure_file(clips[distorted], clips["sharp"])
    ffmpeg_psnr = ffmpeg_fidelity(clips[distorted], clips["sharp"], "psnr")
    assert report.summary["psnr_y"] == pytest.approx(ffmpeg_psnr, abs=0.01)
    # Per frame, SSIM is exactly scikit-image's with Wang et al.'s parameters.
    ours, ref = DecodedVideo.read(clips[distorted], ("y",)).y, DecodedVideo.read(clips["sharp"], ("y",)).y
    expected = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255) for a, b in zip(ours, ref, strict=True)]  # fmt: skip
    assert report.per_frame["ssim_y"] == pytest.approx(expected, abs=1e-9)
    assert report.summary["ssim_y"] == pytest.approx(np.mean(expected), abs=1e-9)


@pytest.mark.parametrize("source", ["testsrc2", "mandelbrot", "smptehdbars", "perlin"])
def test_ssim_within_0_01_of_ffmpeg_on_compressed_480x720(tmp_path, source):
    """ffmpeg's SSIM uses 8x8 windows, Wang et al.'s a Gaussian: at framecast's 480x720, on
    compression, they agree within 0.01. (On strong blur of synthetic bars they differ by up
    to 0.04: docs/clarity.md has the measured table.)"""
    reference = source_clip(tmp_path / "reference.mp4", source, size=(480, 720))
    compressed = source_clip(tmp_path / "compressed.mp4", source, crf=38, size=(480, 720))
    report = measure_file(compressed, reference)
    assert report.summary["ssim_y"] == pytest.approx(ffmpeg_fidelity(compressed, reference, "ssim"), abs=0.01)
    assert report.summary["psnr_y"] == pytest.approx(ffmpeg_fidelity(compressed, reference, "psnr"), abs=0.01)


def test_psnr_of_identical_videos_is_infinite_as_ffmpegs(clips, capsys):
    report = measure_file(clips["sharp"], clips["sharp"])
    assert report.summary["psnr_y"] == float("inf") and report.summary["ssim_y"] == pytest.approx(1.0)
    assert ffmpeg_fidelity(clips["sharp"], clips["sharp"], "psnr") == float("inf")
    # --json stays valid JSON (no bare Infinity): "inf", as ffmpeg prints it
    assert main(["clarity", str(clips["sharp"]), "--reference", str(clips["sharp"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert result["clarity"]["psnr_y"] == "inf" and set(result["per_frame"]["psnr_y"]) == {"inf"}


@pytest.mark.parametrize("name", ["sharp", "blurred", "noised", "mandelbrot", "bars"])
def test_blur_effect_and_noise_sigma_equal_scikit_image(clips, reports, name):
    y = DecodedVideo.read(clips[name], ("y",)).y
    report = reports[name]
    blur = [skimage_blur_effect(frame) for frame in y]
    sigma = [estimate_sigma(frame.astype(np.float64)) for frame in y]  # Y code values, as ours
    assert report.per_frame["blur_effect"] == pytest.approx(blur, rel=1e-9)
    assert report.per_frame["noise_sigma"] == pytest.approx(sigma, rel=1e-9, abs=1e-12)
    assert report.summary["blur_effect"] == pytest.approx(np.mean(blur), rel=1e-9)
    assert report.summary["noise_sigma"] == pytest.approx(np.mean(sigma), rel=1e-9, abs=1e-12)


def test_sharpness_and_tenengrad_equal_scipy_filters(clips, reports):
    """OpenCV's Laplacian (mirrored border) and Sobel against SciPy's, on every frame."""
    y = DecodedVideo.read(clips["mandelbrot"], ("y",)).y.astype(np.float64)
    laplacian = [ndimage.laplace(frame, mode="mirror").var() for frame in y]
    tenengrad = [np.mean(ndimage.sobel(f, axis=1) ** 2 + ndimage.sobel(f, axis=0) ** 2) for f in y]
    report = reports["mandelbrot"]
    assert report.per_frame["sharpness_laplacian_var"] == pytest.approx(laplacian, rel=1e-9)
    assert report.summary["sharpness_laplacian_var_min"] == pytest.approx(min(laplacian), rel=1e-9)
    assert report.per_frame["tenengrad"] == pytest.approx(tenengrad, rel=1e-9)


def test_a_sharp_clip_beats_its_blurred_copy_and_noise_shows(reports):
    sharp, blurred, noised = reports["sharp"].summary, reports["blurred"].summary, reports["noised"].summary
    assert sharp["sharpness_laplacian_var"] > 3 * blurred["sharpness_laplacian_var"]
    assert sharp["tenengrad"] > blurred["tenengrad"]
    assert sharp["blur_effect"] < blurred["blur_effect"] - 0.1
    assert noised["noise_sigma"] > 5 * sharp["noise_sigma"] and noised["noise_sigma"] > 3
    assert noised["flicker_mae"] > sharp["flicker_mae"]  # temporal noise flickers


def test_noise_sigma_finds_the_noise_added(tmp_path):
    """Gaussian noise of sigma 8 on a smooth clip, stored losslessly: the estimate is within 10%."""
    rng = np.random.default_rng(1)
    smooth = texture(sigma=8.0)[:128, :192]
    frames = np.stack([np.clip(smooth + rng.normal(0, 8, smooth.shape[:2])[..., None], 0, 255) for _ in range(3)])
    video = array_clip(tmp_path / "noise.mp4", frames.astype(np.uint8), lossless=True)
    sigma_y = 8 * 219 / 255  # the same noise on R, G and B is noise of 0.859 sigma on limited-range Y
    assert measure_file(video).summary["noise_sigma"] == pytest.approx(sigma_y, rel=0.1)


def test_a_static_clip_has_no_flicker_and_no_motion(tmp_path):
    frames = np.repeat(texture()[None, :128, :192], 9, axis=0)
    report = measure_file(array_clip(tmp_path / "static.mp4", frames, lossless=True))
    assert report.summary["flicker_mae"] == 0.0 and report.summary["flicker_score"] == 1.0
    assert report.summary["motion_magnitude"] < 0.05
    assert report.summary["warp_error"] == 0.0


@pytest.mark.parametrize("dx, dy", [(3, 2), (0, 5), (6, 4)])
def test_a_known_shift_gives_the_expected_motion(tmp_path, dx, dy):
    """A window sliding over a still texture by (dx, dy) pixels a frame moves by their length;
    warping along the flow undoes the motion (warp error far below the plain frame change)."""
    big = texture()
    frames = np.stack([big[20 + t * dy : 20 + t * dy + 128, 20 + t * dx : 20 + t * dx + 192] for t in range(9)])
    report = measure_file(array_clip(tmp_path / "shift.mp4", frames))
    assert report.summary["motion_magnitude"] == pytest.approx(np.hypot(dx, dy), rel=0.08)
    plain_change = (report.summary["flicker_mae"] / 255) ** 2
    assert report.summary["warp_error"] < plain_change / 20


def test_a_flash_at_frame_k_shows_at_k_in_the_series(tmp_path):
    k = 5
    frames = np.repeat(texture()[None, :128, :192], 9, axis=0).astype(np.int16)
    frames[k] += 40
    video = array_clip(tmp_path / "flash.mp4", np.clip(frames, 0, 255).astype(np.uint8), lossless=True)
    report = measure_file(video)
    flicker = np.array(report.per_frame["flicker_mae"])
    assert np.nanargmax(flicker) == k  # the first frame that differs from its predecessor
    assert flicker[k] > 20 and flicker[k + 1] > 20  # into the flash and out of it
    assert np.all(flicker[[1, 2, 3, 4, 7, 8]] == 0)
    warp = np.array(report.per_frame["warp_error"])
    assert np.all(warp[[1, 2, 3, 4, 7, 8]] == 0)  # equal frames: nothing to warp
    assert warp[k] > 0.01 and warp[k + 1] > 0.01  # (40/255)^2 = 0.025 where the flash is not clipped
    rows = report.csv_text().splitlines()
    assert rows[0].split(",")[:3] == ["frame", "time_s", "sharpness_laplacian_var"]
    row = dict(zip(rows[0].split(","), rows[1 + k].split(","), strict=True))
    assert row["frame"] == str(k) and float(row["flicker_mae"]) == pytest.approx(flicker[k], rel=1e-5)
    assert rows[1].split(",")[rows[0].split(",").index("flicker_mae")] == ""  # frame 0: none


def test_one_frame_has_no_pairwise_figures(tmp_path):
    report = measure_file(array_clip(tmp_path / "one.mp4", texture()[None, :128, :192]))
    assert set(report.summary) == set(METRICS) - {"flicker_mae", "flicker_score", "motion_magnitude", "warp_error",
                                                  "psnr_y", "ssim_y"}  # fmt: skip
    assert report.sharpest == report.blurriest == 0


def test_a_variable_frame_rate_video_is_read_frame_by_frame(tmp_path):
    """Each stored frame once, as ffmpeg's filters see them, not resampled to a constant rate."""
    vfr = tmp_path / "vfr.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=192x128:rate=8", "-frames:v", "8",
           "-vf", r"setpts=PTS+if(gte(N\,4)\,16\,0)", "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(vfr))  # fmt: skip
    ydif = ffmpeg_ydif(vfr)
    report = measure_file(vfr)
    assert report.frames == len(ydif) == 8
    assert report.per_frame["flicker_mae"][1:] == pytest.approx(ydif[1:], rel=1e-3)


@pytest.mark.parametrize("stored", ["rgb", "gif"])
def test_a_video_stored_without_a_y_plane_is_measured_on_ffmpegs_luma(tmp_path, stored):
    """RGB (libx264rgb) and palette (GIF) video: converted to YUV first, as signalstats does."""
    path = tmp_path / ("v.mp4" if stored == "rgb" else "v.gif")
    codec = ["-c:v", "libx264rgb"] if stored == "rgb" else []
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=192x128:rate=8", "-frames:v", "5", *codec, str(path))
    report = measure_file(path)
    assert report.frames == 5
    assert report.per_frame["flicker_mae"][1:] == pytest.approx(ffmpeg_ydif(path)[1:], rel=1e-3)


def test_frames_too_small_to_measure_are_refused(tmp_path):
    small = array_clip(tmp_path / "small.mp4", np.zeros((3, 8, 64, 3), np.uint8))
    with pytest.raises(InvalidRequest, match=r"frames of 64x8 are too small to measure; at least 16x16"):
        measure_file(small)


@pytest.fixture(scope="module")
def made(clips) -> dict[str, np.ndarray]:
    """Frames "as a model made them": the test clips' RGB frames, held in memory."""
    return {name: DecodedVideo.read(clips[name], planes=("rgb",)).rgb for name in ("sharp", "blurred", "mandelbrot")}


@pytest.mark.parametrize("codec", ["ffv1", "h264-lossless"])
def test_frames_are_measured_as_ffmpeg_measures_a_lossless_file_of_them(made, tmp_path, codec):
    """Item 4 of the cross-checks: the panel on frames equals the panel, and ffmpeg's signalstats
    and psnr, on the frames written losslessly (their Y is ffmpeg's conversion of the RGB)."""
    suffix = CODECS[codec].suffix
    sharp = write_video(made["sharp"], tmp_path / f"sharp{suffix}", fps=8, codec=codec)
    blurred = write_video(made["blurred"], tmp_path / f"blurred{suffix}", fps=8, codec=codec)
    on_frames = measure_frames(made["sharp"], 8)
    assert on_frames.summary == measure_file(sharp).summary
    assert on_frames.per_frame["flicker_mae"][1:] == pytest.approx(ffmpeg_ydif(sharp)[1:], rel=1e-3)
    fidelity = measure_frames(made["blurred"], 8, reference=made["sharp"])
    assert fidelity.summary["psnr_y"] == pytest.approx(ffmpeg_fidelity(blurred, sharp, "psnr", to_yuv=True), abs=0.01)
    assert fidelity.summary == measure_file(blurred, sharp).summary


def test_the_stage_measures_the_frames_and_the_file_against_them(made, tmp_path):
    """`clarity/...` are the frames' figures, `encoded/clarity/...` the saved file's, and
    `encoded/psnr_y` is ffmpeg's psnr of the file against the frames (written losslessly): what
    the codec cost. At CRF 18 the two differ; written losslessly they are the same."""
    frames = made["mandelbrot"]
    lossless = write_video(frames, tmp_path / "frames.mkv", fps=8, codec="ffv1")
    for crf in (18, 32):
        saved = write_video(frames, tmp_path / f"crf{crf}.mp4", fps=8, crf=crf)
        metrics = ClarityStage(threads=1).measure(frames, 8, saved.read_bytes(), ".mp4").metrics()
        assert {k: v for k, v in metrics.items() if k.startswith("clarity/")} == measure_frames(frames, 8).metrics()
        file_figures = measure_file(saved, lossless)
        assert {k: v for k, v in metrics.items() if k.startswith("encoded/")} == {
            **{f"encoded/clarity/{k}": v for k, v in file_figures.summary.items() if k not in ("psnr_y", "ssim_y")},
            "encoded/psnr_y": file_figures.summary["psnr_y"], "encoded/ssim_y": file_figures.summary["ssim_y"],
        }  # fmt: skip
        expected = ffmpeg_fidelity(saved, lossless, "psnr", to_yuv=True)
        assert metrics["encoded/psnr_y"] == pytest.approx(expected, abs=0.01)
        assert metrics["encoded/clarity/noise_sigma"] != metrics["clarity/noise_sigma"]  # the codec's part
        assert metrics["encoded/ssim_y"] < 1
    # x264 at CRF 0 is lossless on the Y plane it is given, and that plane is the frames' (luma):
    zero = write_video(frames, tmp_path / "crf0.mp4", fps=8, crf=0)
    assert ClarityStage(threads=1).measure(frames, 8, zero.read_bytes(), ".mp4").encoded.summary["psnr_y"] == math.inf
    kept = ClarityStage(threads=1).measure(frames, 8, lossless.read_bytes(), ".mkv")
    assert kept.encoded.summary["psnr_y"] == math.inf and kept.encoded.summary["ssim_y"] == 1.0
    assert {k: v for k, v in kept.encoded.summary.items() if k not in ("psnr_y", "ssim_y")} == kept.summary
    assert metric_sign("encoded/psnr_y") == 1 and metric_sign("encoded/clarity/blur_effect") == -1
    assert metric_sign("interp/clarity/sharpness_laplacian_var") == 1 and metric_sign("interp/psnr_y") is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: (d / "text.mp4").write_text("not a video") and d / "text.mp4", "not a video ffmpeg can read"),
        (lambda d: (d / "empty.mp4").write_bytes(b"") is not None and d / "empty.mp4", "not a video ffmpeg can read"),
        # a valid stream header and no frames
        (lambda d: (d / "none.y4m").write_text("YUV4MPEG2 W64 H48 F8:1 Ip A1:1 C420jpeg\n") and d / "none.y4m",
         "the video has no frames"),
    ],
)  # fmt: skip
def test_bad_videos_are_named_with_the_problem(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InvalidRequest, match=message):
        measure_file(path)


def test_a_truncated_video_is_refused(clips, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clips["sharp"].read_bytes()[: clips["sharp"].stat().st_size // 2])  # its index is at the end
    with pytest.raises(InvalidRequest, match=r"cut\.mp4: not a video ffmpeg can read \(.+\)"):
        measure_file(cut)


def test_a_reference_of_another_size_or_length_is_refused(clips, tmp_path):
    short = source_clip(tmp_path / "short.mp4", "testsrc2", frames=5)
    small = tmp_path / "small.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=8", "-frames:v", "9", "-pix_fmt", "yuv420p", str(small))
    with pytest.raises(InvalidRequest, match="the reference has 5 frames but the video has 9"):
        measure_file(clips["sharp"], short)
    with pytest.raises(InvalidRequest, match="the reference is 96x64 but the video is 192x128"):
        measure_file(clips["sharp"], small)


def test_contact_sheet_marks_the_sharpest_and_blurriest_frames(clips):
    """Both marked frames are on the sheet even when evenly spaced picks would miss them."""
    video = DecodedVideo.read(clips["sharp"])
    frames = np.repeat(video.rgb, 4, axis=0)  # 36 frames
    marks = {13: "sharpest", 22: "blurriest"}
    sheet = np.asarray(contact_sheet(frames, max_frames=8, marks=marks))
    h, w = frames.shape[1:3]
    picks = [0, 7, 14, 21, 28, 35]  # 6 evenly spaced, and the 2 marked
    order = sorted(picks + list(marks))
    for idx, colour in ((13, MARK_COLOURS["sharpest"]), (22, MARK_COLOURS["blurriest"])):
        k = order.index(idx)
        y, x = (k // 4) * h, (k % 4) * w
        assert tuple(sheet[y + h - 1, x + w // 2]) == colour  # the frame's bottom edge is its colour


def test_clarity_cli_prints_a_table_and_json(clips, capsys):
    assert main(["clarity", str(clips["blurred"]), "--reference", str(clips["sharp"])]) == 0
    out = capsys.readouterr().out
    assert f"{clips['blurred']}: 9 frames, 192x128, 8 fps" in out
    for key in METRICS:
        assert re.search(rf"^  {key} +[0-9.e+-]+ ", out, re.M), key
    assert "sharpest frame #" in out

    assert main(["clarity", str(clips["noised"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = measure_file(clips["noised"])
    assert result["clarity"] == pytest.approx(expected.summary) and result["frames"] == 9
    assert result["per_frame"]["flicker_mae"][0] is None and len(result["per_frame"]["blur_effect"]) == 9
    assert result["sharpest_frame"] == expected.sharpest


def test_clarity_cli_logs_to_mlflow(clips, capsys, tmp_path, mlflow_uri):
    csv_path = tmp_path / "series.csv"
    args = ["clarity", str(clips["compressed"]), "--reference", str(clips["sharp"]), "--log-to-mlflow",
            "--tracking-uri", mlflow_uri, "--experiment", "clarity-test", "--csv", str(csv_path)]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    run_id = re.search(r"mlflow run: (\w+)", err).group(1)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    expected = measure_file(clips["compressed"], clips["sharp"])
    assert run.data.tags["framecast.kind"] == "clarity" and run.info.status == "FINISHED"
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("clarity/")} == pytest.approx(expected.metrics())
    assert run.data.params["frames"] == "9" and run.data.params["reference"] == str(clips["sharp"].resolve())
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"series.csv", "compressed.sheet.png"}
    assert csv_path.read_text() == expected.csv_text()


def test_clarity_cli_bad_input_exits_2_with_one_line(tmp_path, clips, capsys):
    (tmp_path / "x.mp4").write_text("hello")
    assert main(["clarity", str(tmp_path / "x.mp4")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith(f"framecast: error: {tmp_path / 'x.mp4'}: not a video") and "Traceback" not in err
    assert main(["clarity", str(clips["sharp"]), "--sheet", str(tmp_path / "s.txt")]) == EXIT_INVALID
    assert "cannot write images of type '.txt'" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["clarity", str(clips["sharp"]), "--csv", str(blocker / "x.csv")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert f"--csv {blocker / 'x.csv'}: cannot create its directory" in err and "Traceback" not in err


def test_clarity_cli_writes_csv_and_sheet_into_new_directories(clips, tmp_path, capsys):
    csv_path, sheet = tmp_path / "new" / "series.csv", tmp_path / "other" / "sheet.png"
    assert main(["clarity", str(clips["sharp"]), "--csv", str(csv_path), "--sheet", str(sheet)]) == 0
    assert csv_path.read_text() == measure_file(clips["sharp"]).csv_text()
    assert Image.open(sheet).size[0] > 0


def test_frames_extracts_one_frame(clips, tmp_path, capsys):
    out = tmp_path / "frame8.png"
    assert main(["frames", str(clips["mandelbrot"]), "--index", "7", "-o", str(out)]) == 0
    expected = DecodedVideo.read(clips["mandelbrot"], ("rgb",)).rgb[7]
    assert np.array_equal(np.asarray(Image.open(out)), expected)
    assert main(["frames", str(clips["mandelbrot"]), "--index", "9", "-o", str(out)]) == EXIT_INVALID
    assert "has 9 frames (0 to 8); there is no frame 9" in capsys.readouterr().err
    assert main(["frames", str(clips["mandelbrot"]), "--index", "-1", "-o", str(out)]) == EXIT_INVALID
    assert "frames are numbered from 0" in capsys.readouterr().err
