"""The `framecast` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import mlflow
from tqdm import tqdm

from cluster.tracking import DEFAULT_EXPERIMENT, log_run
from stages.errors import InvalidRequest

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INCOMPLETE = 3  # the video is written, but measuring or tracking it failed


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text-to-video: each prompt -> one MP4, recorded in MLflow")
    p.add_argument("--model", default="tiny", help="a model from configs/models (default: tiny)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt; repeat it for several videos")
    prompts.add_argument("--prompts", type=Path, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (model default if unset)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale; 1 turns guidance off")
    p.add_argument("--frames", type=int, default=None, help="frames (8k+1 for CogVideoX)")
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="MP4 path of a single prompt's video")
    p.add_argument(
        "--output-dir", type=Path, default=Path("outputs"), help="where videos go without --output (default: outputs)"
    )
    p.add_argument("--weights", default=None, help="local diffusers directory of the model's weights")
    _tracking_options(p)
    p.add_argument(
        "--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)"
    )
    p.add_argument("--local", action="store_true", help="run every stage in this process, without Ray")
    par = p.add_argument_group("context parallelism (one video denoised by a group of GPUs)")
    par.add_argument("--workers", type=int, default=None, help="denoiser ranks; a valid layout is chosen (default 1)")
    par.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (must divide the attention heads)")
    par.add_argument("--ring", type=int, default=None, help="ring-attention degree")
    par.add_argument(
        "--cfg-parallel", action="store_true", help="run the two guidance branches on two halves of the group"
    )
    par.add_argument(
        "--cluster", default="single-node", help="cluster layout from configs/cluster (default: single-node)"
    )
    dec = p.add_argument_group("decoding (one video's VAE decode spread over decoder actors)")
    dec.add_argument("--decoders", type=int, default=1, help="decoder actors sharing each video's tiles (default 1)")
    dec.add_argument(
        "--tile-size", type=_pixels, default=None, metavar="HxW",
        help="decode in tiles of HxW pixels (default with --decoders > 1: half the VAE's sample size)",
    )  # fmt: skip
    dec.add_argument(
        "--tile-overlap", type=_pixels, default=None, metavar="HxW",
        help="pixels neighbouring tiles overlap and are blended over (default: 1/6 x 1/5 of the tile)",
    )  # fmt: skip
    p.add_argument(
        "--sequential", action="store_true", help="run several prompts one after another instead of pipelined"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def _tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's own default store in this directory)",
    )


def _clarity_parser(sub) -> None:
    p = sub.add_parser(
        "clarity", help="the clarity panel of any video: sharpness, blur, noise, flicker, motion, warping error"
    )
    p.add_argument("video", type=Path, help="a video file ffmpeg can read (MP4 or other)")
    p.add_argument("--reference", type=Path, default=None, help="a video of the same size and length: PSNR, SSIM")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--csv", type=Path, default=None, help="write the per-frame series to this CSV file")
    p.add_argument(
        "--sheet", type=Path, default=None, help="write a contact sheet marking the sharpest and blurriest frames"
    )
    p.add_argument(
        "--log-to-mlflow", action="store_true", help="record the figures, the series and a contact sheet as a run"
    )
    _tracking_options(p)


def _frames_parser(sub) -> None:
    p = sub.add_parser("frames", help="extract one frame of a video as an image")
    p.add_argument("video", type=Path)
    p.add_argument("--index", type=int, required=True, help="the frame, counted from 0")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="image path, e.g. frame8.png (default: <video name>.frame<index>.png in this directory)",
    )


def _pixels(text: str) -> tuple[int, int]:
    """'240x360' -> (240, 360); '64' -> (64, 64)."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 240x360 (got {text!r})")
    return int(parts[0]), int(parts[-1])


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts is None:
        return args.prompt
    try:
        lines = args.prompts.read_text().splitlines()
    except OSError as e:
        raise InvalidRequest(f"cannot read --prompts {args.prompts}: {e.strerror}") from None
    return [line.strip() for line in lines if line.strip()]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _outputs(jobs, args: argparse.Namespace) -> list[Path]:
    if args.output is not None:
        return [args.output.resolve()]
    from cluster.driver import default_output

    numbered = len(jobs) > 1
    return [default_output(job, i if numbered else None, args.output_dir).resolve() for i, job in enumerate(jobs)]


def _stream(jobs, args: argparse.Namespace):
    """Start or join Ray (unless --local) and yield each job's result as it is written, with a
    live progress bar over every job's denoising steps."""
    from cluster.driver import make_executor, run_stream

    if not args.local:
        from cluster.runtime import connect

        connect(args.address, quiet=args.json)
    executor = make_executor(jobs[0], local=args.local)
    steps = jobs[0].request.steps
    try:
        with tqdm(total=steps * len(jobs), desc="denoising", unit="step", file=sys.stderr) as bar:

            def on_step(index: int, done: int, total: int) -> None:
                bar.set_postfix_str(f"job {index + 1}/{len(jobs)}", refresh=False)
                bar.update(index * steps + done - bar.n)
                if bar.n == bar.total:
                    bar.close()  # stop its clock: decoding and writing are not denoising steps

            yield from run_stream(jobs, executor, _outputs(jobs, args), on_step, pipelined=not args.sequential)
    finally:
        executor.close()


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.json:
        return _generate(args)
    # With --json, stdout carries the JSON records and nothing else: libraries that print while
    # they work (DeepSpeed warns on stdout when it is first imported) are sent to stderr.
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _generate(args, out=real_stdout)


def _generate(args: argparse.Namespace, out=None) -> int:
    from cluster.driver import JobFailed, prepare_jobs

    try:
        prompts = _read_prompts(args)
        if args.output is not None and len(prompts) > 1:
            raise InvalidRequest(f"--output names one video but there are {len(prompts)} prompts; use --output-dir")
        jobs = prepare_jobs(
            args.model,
            prompts,
            weights=args.weights,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance_scale=args.guidance,
            num_frames=args.frames,
            fps=args.fps,
            height=args.height,
            width=args.width,
            seed=args.seed,
            workers=args.workers,
            ulysses=args.ulysses,
            ring=args.ring,
            cfg_parallel=args.cfg_parallel,
            decoders=args.decoders,
            tile_size=args.tile_size,
            tile_overlap=args.tile_overlap,
            cluster=args.cluster,
            local=args.local,
        )
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID

    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    failures, incomplete = [], False
    try:
        for result in _stream(jobs, args):
            if isinstance(result, JobFailed):
                failures.append(result)
                if len(jobs) > 1:  # now, above the progress bar; all failures are listed again at the end
                    tqdm.write(f"job {result.index} failed: {_first_line(result.error)}", file=sys.stderr)
            else:
                if result.clarity_error:
                    tqdm.write(
                        f"framecast: error: clarity failed, video kept at {result.video}: {result.clarity_error}",
                        file=sys.stderr,
                    )
                _track(result, jobs[result.index], len(jobs), args, tracking_uri)
                incomplete |= result.tracking_error is not None or result.clarity_error is not None
            _print_result(result, args, tracking_uri, out)
    except InvalidRequest as e:  # what only the running cluster can tell, e.g. too few GPUs for the layout
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # an actor or Ray itself failed: one line, unless debugging
        if os.environ.get("FRAMECAST_DEBUG"):
            raise
        print(f"framecast: error: {_first_line(e)} (FRAMECAST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    for failure in failures:  # after the progress bar, so that an error is the last thing printed
        job = f"job {failure.index}: " if len(jobs) > 1 else ""
        print(f"framecast: error: {job}{_first_line(failure.error)}", file=sys.stderr)
    if failures:
        return EXIT_FAILED
    return EXIT_INCOMPLETE if incomplete else 0


def _track(result, job, jobs: int, args: argparse.Namespace, tracking_uri: str) -> None:
    """Record a written video's run in MLflow. A failure is kept on the result and said at once:
    the video is already written."""
    name = f"{job.spec.name}-seed{job.request.seed}" + (f"-job{result.index}" if jobs > 1 else "")
    try:
        result.run_id = log_run(
            params=result.params,
            metrics=result.metrics,
            artifacts=result.artifacts(),
            texts={"config.yaml": job.resolved_config()},
            tags={"framecast.clarity_error": result.clarity_error} if result.clarity_error else None,
            experiment=args.experiment,
            tracking_uri=tracking_uri,
            run_name=name,
        )
    except Exception as e:
        result.tracking_error = f"{type(e).__name__}: {e}".splitlines()[0]
        print(
            f"framecast: error: tracking failed, video kept at {result.video}: {result.tracking_error}", file=sys.stderr
        )


def _print_result(result, args: argparse.Namespace, tracking_uri: str, out) -> None:
    from cluster.driver import GenerationResult

    if args.json:  # one line per job, as each is done; a failed job's line says why
        print(json.dumps(result.as_json()), file=out, flush=True)
    elif isinstance(result, GenerationResult):  # failures are listed on stderr at the end
        print(f"video: {result.video}")
        print(f"contact sheet: {result.contact_sheet}")
        if result.clarity_csv:
            print(f"clarity per frame: {result.clarity_csv}")
        if result.run_id:
            print(f"mlflow run: {result.run_id} (experiment {args.experiment!r} in {tracking_uri})")


def cmd_clarity(args: argparse.Namespace) -> int:
    """Measure a video (in this process), print the table or JSON, write and log what was asked."""
    from stages.clarity import read_and_measure
    from stages.video_io import contact_sheet

    try:
        _check_image_path(args.sheet, "--sheet")
        for path, option in ((args.csv, "--csv"), (args.sheet, "--sheet")):
            _make_parent(path, option)
        video, report = read_and_measure(args.video, args.reference)
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        reference = str(args.reference) if args.reference else None
        print(json.dumps({"video": str(args.video), "reference": reference, **report.as_json()}, allow_nan=False))
    else:
        _print_clarity_table(args.video, report)
    with tempfile.TemporaryDirectory(prefix="framecast-clarity-") as scratch:
        csv_path = args.csv or (Path(scratch) / f"{args.video.stem}.clarity.csv" if args.log_to_mlflow else None)
        sheet_path = args.sheet or (Path(scratch) / f"{args.video.stem}.sheet.png" if args.log_to_mlflow else None)
        try:
            if csv_path:
                csv_path.write_text(report.csv_text())
            if sheet_path:
                contact_sheet(video.rgb, marks=report.marks()).save(sheet_path)
        except OSError as e:
            print(f"framecast: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
            return EXIT_FAILED
        if not args.log_to_mlflow:
            return 0
        tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
        try:
            run_id = log_run(
                kind="clarity",
                params={
                    "video": str(args.video.resolve()),
                    "reference": str(args.reference.resolve()) if args.reference else "",
                    "frames": str(report.frames),
                    "height": str(report.height),
                    "width": str(report.width),
                    "fps": f"{report.fps:g}",
                },
                metrics={**report.metrics(), "measure_s": report.seconds},
                artifacts=[csv_path, sheet_path],
                experiment=args.experiment,
                tracking_uri=tracking_uri,
                run_name=f"clarity-{args.video.stem}",
            )
        except Exception as e:
            print(f"framecast: error: tracking failed: {_first_line(e)}", file=sys.stderr)
            return EXIT_INCOMPLETE
    print(f"mlflow run: {run_id} (experiment {args.experiment!r} in {tracking_uri})", file=sys.stderr)
    return 0


def _print_clarity_table(video: Path, report) -> None:
    from stages.clarity import METRICS

    size = f"{report.width}x{report.height}"
    print(f"{video}: {report.frames} frames, {size}, {report.fps:g} fps (measured in {report.seconds:.2f} s)")
    for key, value in report.summary.items():
        print(f"  {key:<28} {value:>12.6g}   {METRICS[key]}")
    print(f"  sharpest frame #{report.sharpest}, blurriest frame #{report.blurriest} (by sharpness_laplacian_var)")


def _make_parent(path: Path | None, option: str) -> None:
    """Create the directory an output goes to, or refuse the path before any work."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequest(f"{option} {path}: cannot create its directory: {e.strerror}") from None


def _check_image_path(path: Path | None, option: str) -> None:
    """Refuse an image path PIL cannot write, before any work."""
    from PIL import Image

    if path is None:
        return
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if path.suffix.lower() not in writable:
        allowed = ", ".join(sorted(e for e in writable if e in {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff"}))
        raise InvalidRequest(f"{option} {path}: cannot write images of type {path.suffix or '(none)'!r}; use {allowed}")


def cmd_frames(args: argparse.Namespace) -> int:
    from PIL import Image

    from stages.video_io import read_frame

    output = args.output or Path(f"{args.video.stem}.frame{args.index}.png")
    try:
        _check_image_path(output, "-o")
        _make_parent(output, "-o")
        frame = read_frame(args.video, args.index)
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        Image.fromarray(frame).save(output)
    except OSError as e:
        print(f"framecast: error: cannot write {output}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    print(output)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="framecast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _clarity_parser(sub)
    _frames_parser(sub)
    args = parser.parse_args(argv)
    return {"generate": cmd_generate, "clarity": cmd_clarity, "frames": cmd_frames}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
