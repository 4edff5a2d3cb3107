"""What each codec costs, measured: the panel on the frames as made against the same frames saved.

    python bench/codecs.py [--prompts 4] [--interpolate 24]

Part 1, framecast-shapes (its committed weights, in this process): `--prompts` videos of its
grammar (seed 0), each saved with every codec (and H.264 at CRF 18, 23, 28). For each, the mean
over videos of what the codec changed: encoded/psnr_y and encoded/ssim_y (the file against the
frames), and the file's sharpness, noise and flicker as a ratio to the frames' own.

Part 2, a 49-frame 480x720 clip of ffmpeg's `mandelbrot` source (CogVideoX's size and length),
each codec's write time and file size, and the time to motion-interpolate it from 8 fps to
`--interpolate` fps. Prints a markdown report for bench/RESULTS.md and docs/clarity.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import imageio_ffmpeg  # noqa: E402
import numpy as np  # noqa: E402

from cluster.driver import generate, prepare  # noqa: E402
from cluster.executor import LocalExecutor  # noqa: E402
from stages.clarity import ClarityStage, measure_file  # noqa: E402
from stages.shapes import COLORS, DIRECTIONS, SHAPES  # noqa: E402
from stages.video_io import CODECS, VIDEO_CODECS, interpolate, read_frames, write_video  # noqa: E402

# (codec, crf) pairs measured: every codec at its default, and H.264 at two higher CRFs.
STORAGES = [(name, None) for name in VIDEO_CODECS] + [("h264", 23), ("h264", 28)]
SHIFTS = ("sharpness_laplacian_var", "tenengrad", "noise_sigma", "flicker_mae", "warp_error")


def shapes_frames(count: int, scratch: Path) -> list[tuple[np.ndarray, int]]:
    """`count` framecast-shapes videos' frames (as made: saved losslessly and read back) and fps."""
    terms = zip(COLORS, SHAPES * 2, list(DIRECTIONS) * 2, strict=False)
    prompts = [f"a {colour} {shape} moving {direction} on a black background" for colour, shape, direction in terms]
    made = []
    for i, prompt in enumerate(prompts[:count]):
        job = prepare("framecast-shapes", prompt, local=True, codec="ffv1")
        executor = LocalExecutor(job.spec, job.weights)
        try:
            result = generate(job, executor, scratch / f"shapes{i}.mkv")
        finally:
            executor.close()
        made.append((read_frames(result.video), job.request.fps))
    return made


def codec_cost(videos: list[tuple[np.ndarray, int]], scratch: Path) -> list[str]:
    panel = ClarityStage(threads=2)
    lines = ["| codec | CRF | KiB per video | encoded/psnr_y (dB) | encoded/ssim_y | "
             + " | ".join(f"{key} file/frames" for key in SHIFTS) + " |",
             "|---|---|---|---|---|" + "---|" * len(SHIFTS)]  # fmt: skip
    for name, crf in STORAGES:
        sizes, psnr, ssim, ratios = [], [], [], {key: [] for key in SHIFTS}
        for i, (frames, fps) in enumerate(videos):
            path = write_video(frames, scratch / f"v{i}-{name}-{crf}{CODECS[name].suffix}", fps, name, crf)
            sizes.append(path.stat().st_size / 1024)
            report = panel.measure(frames, fps, path.read_bytes(), path.suffix)
            psnr.append(report.encoded.summary["psnr_y"])
            ssim.append(report.encoded.summary["ssim_y"])
            for key in SHIFTS:
                ratios[key].append(report.encoded.summary[key] / report.summary[key])
        shown_crf = crf if crf is not None else (CODECS[name].default_crf or "-")
        mean_psnr = "inf (lossless)" if np.isinf(psnr).all() else f"{np.mean(psnr):.2f}"
        lines.append(f"| {name} | {shown_crf} | {np.mean(sizes):.1f} | {mean_psnr} | {np.mean(ssim):.4f} | "
                     + " | ".join(f"{np.mean(ratios[key]):.3f}" for key in SHIFTS) + " |")  # fmt: skip
    return lines


def real_size(target_fps: int, scratch: Path) -> list[str]:
    clip = scratch / "mandelbrot.mkv"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    "mandelbrot=size=720x480:rate=8", "-frames:v", "49", "-c:v", "ffv1", "-pix_fmt", "gbrp", str(clip)],
                   check=True)  # fmt: skip
    frames = read_frames(clip)
    lines = ["| codec | write s | MiB |", "|---|---|---|"]
    for name in VIDEO_CODECS:
        start = time.perf_counter()
        path = write_video(frames, scratch / f"real-{name}{CODECS[name].suffix}", 8, name)
        lines.append(f"| {name} | {time.perf_counter() - start:.2f} | {path.stat().st_size / 2**20:.2f} |")
    start = time.perf_counter()
    made = interpolate(frames, 8, target_fps)
    seconds = time.perf_counter() - start
    lines.append("")
    lines.append(f"Interpolating the 49 frames from 8 to {target_fps} fps (minterpolate, mi_mode=mci): "
                 f"{len(made)} frames in {seconds:.1f} s.")  # fmt: skip
    # The panel as a generation runs it (2 OpenCV threads, the panel actor's share): the frames,
    # then the H.264 file against them; and with the interpolated copy's frames too.
    panel, media = ClarityStage(threads=2), (scratch / "real-h264.mp4").read_bytes()
    both = panel.measure(frames, 8, media, ".mp4").seconds
    file_only = measure_file(scratch / "real-h264.mp4").seconds
    with_copy = panel.measure(frames, 8, media, ".mp4", interpolated=made, interpolated_fps=target_fps).seconds
    lines.append(f"The panel on them: the file alone (as before issue 20) {file_only:.1f} s; the frames and the "
                 f"file against them {both:.1f} s; with the interpolated copy too {with_copy:.1f} s.")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="framecast-shapes videos to average over")
    parser.add_argument("--interpolate", type=int, default=24, help="the fps part 2 interpolates to")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="framecast-codecs-") as scratch:
        scratch = Path(scratch)
        videos = shapes_frames(args.prompts, scratch)
        frames, fps = videos[0]
        print(f"## Codecs: what each costs ({date.today()}, {platform.processor() or platform.machine()}, "
              f"ffmpeg {imageio_ffmpeg.get_ffmpeg_version()})\n")  # fmt: skip
        print(f"framecast-shapes, {len(videos)} videos of {len(frames)} frames at "
              f"{frames.shape[2]}x{frames.shape[1]}, {fps} fps, seed 0; means over the videos:\n")  # fmt: skip
        print("\n".join(codec_cost(videos, scratch)))
        print("\n49 frames of ffmpeg's mandelbrot at 720x480 (CogVideoX's size), 8 fps:\n")
        print("\n".join(real_size(args.interpolate, scratch)))


if __name__ == "__main__":
    main()
