"""Speed of the clarity panel on a 49-frame 480x720 clip (the budget: 5 s on 2 CPU cores).

    python bench/clarity.py [--threads 2] [--repeats 3] [--sources mandelbrot testsrc2 perlin]

For each ffmpeg test source, a 49-frame 480x720 H.264 clip (CRF 18, 8 fps) is made, and the whole
panel is timed from the file: decoding (Y plane and RGB), the per-frame figures, the optical flow
and everything after it, as `framecast clarity` and the panel's actor run it. With a reference
(the same clip), PSNR and SSIM are timed too. Alongside, the same figures computed the plain
library way, scikit-image's blur_effect and estimate_sigma one frame at a time, for comparison.
Medians of `repeats` runs. Prints a markdown report for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import imageio_ffmpeg  # noqa: E402
import numpy as np  # noqa: E402

from stages.clarity import blur_effect, measure, noise_sigma, sobel  # noqa: E402
from stages.video_io import DecodedVideo  # noqa: E402

FRAMES, HEIGHT, WIDTH = 49, 480, 720


def make_clip(path: Path, source: str) -> Path:
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
         f"{source}=size={WIDTH}x{HEIGHT}:rate=8", "-frames:v", str(FRAMES), "-c:v", "libx264",
         "-pix_fmt", "yuv420p", "-crf", "18", str(path)],
        check=True,
    )  # fmt: skip
    return path


def timed(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="OpenCV threads (the panel actor's share)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sources", nargs="+", default=["mandelbrot", "testsrc2", "perlin"])
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for source in args.sources:
            clip = make_clip(Path(scratch) / f"{source}.mp4", source)
            decode_s, video = timed(lambda clip=clip: DecodedVideo.read(clip), args.repeats)
            panel_s, _ = timed(lambda video=video: measure(video), args.repeats)
            reference_s, reference = timed(lambda clip=clip: DecodedVideo.read(clip, planes=("y",)), args.repeats)
            with_ref_s, _ = timed(lambda video=video, reference=reference: measure(video, reference), args.repeats)
            dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
            flow_s, _ = timed(
                lambda y=video.y, dis=dis: [
                    dis.calc(*pair, None) for a, b in zip(y, y[1:], strict=False) for pair in ((a, b), (b, a))
                ],
                args.repeats,
            )
            ours_s, _ = timed(lambda y=video.y: [(blur_effect(f, *sobel(f)), noise_sigma(f)) for f in y], args.repeats)
            skimage_s = float("nan")
            try:
                from skimage.measure import blur_effect as sk_blur
                from skimage.restoration import estimate_sigma

                skimage_s, _ = timed(
                    lambda y=video.y: [(sk_blur(f), estimate_sigma(f.astype(np.float64))) for f in y], args.repeats
                )
            except ImportError:  # scikit-image is a test dependency only
                pass
            total_with_reference = decode_s + reference_s + with_ref_s
            rows.append(
                (source, decode_s, panel_s, decode_s + panel_s, total_with_reference, flow_s, ours_s, skimage_s)
            )

    cpu = platform.processor() or platform.machine()
    print(f"{date.today().isoformat()}, {cpu}, {args.threads} OpenCV threads, {FRAMES} frames at {HEIGHT}x{WIDTH}, "
          f"medians of {args.repeats} runs.\n")  # fmt: skip
    print(
        "| source | decode (s) | panel (s) | **total (s)** | total with a reference (s) | of which DIS flow, "
        "96 fields (s) | blur_effect + noise_sigma, ours (s) | the same with scikit-image, per frame (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for source, decode_s, panel_s, total, with_ref, flow_s, ours_s, skimage_s in rows:
        print(f"| {source} | {decode_s:.2f} | {panel_s:.2f} | **{total:.2f}** | {with_ref:.2f} | {flow_s:.2f} | "
              f"{ours_s:.2f} | {skimage_s:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
