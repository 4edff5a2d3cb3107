"""The `framecast` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
from tqdm import tqdm

from cluster.tracking import DEFAULT_EXPERIMENT, log_generation, log_run
from cluster.uncached import paired_with_uncached
from stages.acceleration import ATTENTION_BACKENDS, OFFLOAD_KINDS
from stages.errors import InvalidRequest
from stages.models import DEFAULT_MODEL
from stages.settings import AXES, SETTINGS

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INCOMPLETE = 3  # the video is written, but measuring or tracking it failed
STOP_DRAIN_S = 5.0  # how long `framecast serve` waits for its runners to give their jobs back when it stops


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="each prompt (and --image) -> one video, recorded in MLflow")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model from configs/models (default: {DEFAULT_MODEL})")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt; repeat it for several videos")
    prompts.add_argument("--prompts", type=Path, help="a text file with one prompt per line (blank lines skipped)")
    _settings_options(p)
    p.add_argument(
        "--output", type=Path, default=None, help="path of a single prompt's video (the codec's type: .mp4 for h264)"
    )
    p.add_argument(
        "--output-dir", type=Path, default=Path("outputs"), help="where videos go without --output (default: outputs)"
    )
    _tracking_options(p)
    _placement_options(p)
    p.add_argument(
        "--sequential", action="store_true", help="run several prompts one after another instead of pipelined"
    )
    p.add_argument(
        "--cache-reference",
        action="store_true",
        help="with --cache: also make each video uncached (<name>.uncached.<ext>, its own run) and record what the "
        "cache cost against it (vs_uncached/psnr_y, /ssim_y, /denoise_speedup, /delta/<figure>)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def _settings_options(p: argparse.ArgumentParser) -> None:
    """What a generation is asked to be, a flag per setting (stages.settings): explicit settings win
    over --preset, which wins over the model's defaults."""
    for setting in SETTINGS:
        flag = "--" + setting.name.replace("_", "-")
        if setting.kind is bool:
            p.add_argument(flag, action="store_true", help=setting.help)
        elif setting.name == "seed":
            p.add_argument(flag, type=int, default=0, help=setting.help)
        else:
            metavar = "PATH" if setting.name == "image" else None
            p.add_argument(flag, type=setting.kind, default=None, metavar=metavar, help=setting.help)
    p.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help="frames for this many seconds at the fps, taken up to a count the model makes (2 s at 12 fps -> 25)",
    )  # fmt: skip
    p.add_argument("--preset", default=None, help="named settings from configs/presets (explicit flags win)")


def _explicit(args: argparse.Namespace) -> dict:
    """The settings given on the command line (None: not given), by name."""
    given = {name: getattr(args, name) for name in AXES}
    return {name: (True if value else None) if AXES[name].kind is bool else value for name, value in given.items()}


def _placement_options(p: argparse.ArgumentParser) -> None:
    """Where the stages run: weights, Ray, the denoiser layout and the decoders."""
    p.add_argument("--weights", default=None, help="local diffusers directory of the model's weights")
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
    acc = p.add_argument_group("speed and memory (defaults: the model YAML's acceleration section)")
    acc.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="regional torch.compile of the denoiser's blocks (paid once per stage)")  # fmt: skip
    acc.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                     help="SDPA kernel (auto: by the GPU's capability; default: PyTorch's own choice)")  # fmt: skip
    acc.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                     help="torchao float8 linear layers in the denoiser (Ada/Hopper GPUs; needs torchao)")  # fmt: skip
    acc.add_argument("--offload", choices=("none", *OFFLOAD_KINDS), default=None,
                     help="keep weights in host memory: model (per job) or group (per block); CUDA only")  # fmt: skip
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


def _placement(args: argparse.Namespace) -> dict:
    return {
        "weights": args.weights,
        "workers": args.workers,
        "ulysses": args.ulysses,
        "ring": args.ring,
        "cfg_parallel": args.cfg_parallel,
        "decoders": args.decoders,
        "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap,
        "cluster": args.cluster,
        "local": args.local,
        "acceleration": _levers(args),
    }


def _levers(args: argparse.Namespace) -> dict:
    """The speed and memory flags given (None: the model YAML's)."""
    return {"compile": args.compile, "attention": args.attention, "fp8": args.fp8, "offload": args.offload}


def _say(notes: list[str], warnings: list[str]) -> None:
    """Notes (how settings were derived) and warnings (the articles' pitfalls), each once, on stderr."""
    for line in dict.fromkeys(notes):
        print(f"framecast: note: {line}", file=sys.stderr)
    for line in dict.fromkeys(warnings):
        print(f"framecast: warning: {line}", file=sys.stderr)


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


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="one prompt and seed over a grid of settings: which give the clearest video (MLflow parent run)"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model from configs/models (default: {DEFAULT_MODEL})")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--grid", action="append", default=[], metavar="AXIS=V1,V2,...",
        help=f"an axis of the grid (repeatable): {', '.join(AXES)}; e.g. --grid steps=30,40,50 --grid guidance=6,7.5,9",
    )  # fmt: skip
    _settings_options(p)
    p.add_argument(
        "--replicas", type=int, default=None,
        help="pipeline replicas running cells at the same time (default: as many as the cluster has room for)",
    )  # fmt: skip
    p.add_argument(
        "--sheet-frame", type=int, default=None,
        help="the frame shown from every cell on the side-by-side sheet (default: the middle of the shortest)",
    )  # fmt: skip
    p.add_argument(
        "--output-dir", type=Path, default=Path("outputs"),
        help="videos and summary go to <dir>/sweep-<model>-<id>/ (default: outputs)",
    )  # fmt: skip
    _tracking_options(p)
    _placement_options(p)
    p.add_argument("--sequential", action="store_true", help="each replica runs its cells one after another")
    p.add_argument("--json", action="store_true", help="print one JSON object with the sweep's result")


def _tune_cache_parser(sub) -> None:
    p = sub.add_parser(
        "tune-cache",
        help="the fastest step cache whose worst PSNR against uncached stays above a bound, measured at your prompts",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model from configs/models (default: {DEFAULT_MODEL})")
    p.add_argument("--prompt", action="append", required=True, help="a prompt to tune at; repeat it for several")
    p.add_argument("--min-psnr", type=float, required=True, metavar="DB",
                   help="the bound: every video's PSNR-Y against the same uncached, in dB (e.g. 30)")  # fmt: skip
    p.add_argument("--seeds", default=None, metavar="S1,S2,...", help="seeds to tune at (default: --seed)")
    p.add_argument("--specs", default=None, metavar="SPEC,...",
                   help="cache specs to try (default: every kind the model takes over a small grid)")  # fmt: skip
    _settings_options(p)
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where the sweeps go (default: outputs)")
    _tracking_options(p)
    _placement_options(p)
    p.add_argument("--replicas", type=int, default=None, help="pipeline replicas (default: as many as fit)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and the table")


def _batch_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="a JSON Lines file of requests -> a video each, a manifest, one MLflow run per job (resumable)"
    )
    p.add_argument(
        "requests", type=Path,
        help='one JSON object per line: "prompt", and optionally "id" and any setting by name (steps, guidance, '
        'frames, seed, image, codec, ...); an image path is relative to the file',
    )  # fmt: skip
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model from configs/models (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--output-dir", type=Path, required=True,
        help="videos, contact sheets and manifest.jsonl; the same command again runs only what it lacks",
    )  # fmt: skip
    _tracking_options(p)
    _placement_options(p)
    p.add_argument(
        "--replicas", type=int, default=None,
        help="pipeline replicas, each with its own denoiser group of --workers ranks and its decoders "
        "(default: as many as the cluster has room for)",
    )  # fmt: skip
    p.add_argument(
        "--max-attempts", type=int, default=3,
        help="tries for a job whose stage's actor or node was lost (default 3); a job that fails on its own is not "
        "tried again",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print each job's manifest line as it finishes, then the counts")


def _recommend_parser(sub) -> None:
    p = sub.add_parser(
        "recommend", help="settings for a prompt: the articles' heuristics, and what past MLflow runs measured"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model from configs/models (default: {DEFAULT_MODEL})")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, default=None, help="the input image (image-to-video): resolution advice")
    p.add_argument(
        "--metric", default="clarity/sharpness_laplacian_var",
        help="what past runs are ranked by (default: clarity/sharpness_laplacian_var)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=3, help="how many measured settings to show (default 3)")
    p.add_argument("--experiment", default=None, help="MLflow experiment to search (default: all)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="the models framecast knows: kind, defaults, limits, license, local weights")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


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


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible Videos API on Ray Serve (POST /v1/videos ...); Ctrl-C stops it"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model from configs/models (default: {DEFAULT_MODEL})")
    p.add_argument("--weights", default=None, help="local diffusers directory of the model's weights")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--workers", type=int, default=1, help="denoiser ranks (GPUs) of the context-parallel group")
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: the largest that fits)")
    p.add_argument("--ring", type=int, default=None, help="ring-attention degree")
    p.add_argument("--decoders", type=int, default=1, help="decoder replicas sharing each video's tiles (default 1)")
    p.add_argument(
        "--api-key-env", default=None, metavar="VAR",
        help="require Authorization: Bearer <the value of $VAR> on every route (default: no key)",
    )  # fmt: skip
    p.add_argument(
        "--data-dir", default="framecast-serve",
        help="videos and the job database (SQLite) go here (default: framecast-serve)",
    )  # fmt: skip
    p.add_argument(
        "--database", default=None, metavar="PATH_OR_URL",
        help="the job queue: an SQLite file, or a database URL (postgresql://user@host/db) that ingress replicas on "
        "several nodes share (default: <data-dir>/jobs.sqlite3)",
    )  # fmt: skip
    p.add_argument("--max-queue", type=int, default=16, help="videos queued or running; beyond it, 429 (default 16)")
    p.add_argument("--runners", type=int, default=2, help="videos in the pipeline at once (default 2)")
    p.add_argument(
        "--stall-timeout", type=float, default=180.0, metavar="SECONDS",
        help="a video with no progress this long (longer in proportion beyond 50 steps) is given up, queued "
        "again and its runner replaced (default 180)",
    )  # fmt: skip
    p.add_argument(
        "--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)"
    )
    _tracking_options(p)


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
    from cluster.driver import default_output

    twins = [job.keep_frames and job.request.cache == "none" for job in jobs]  # --cache-reference's
    cached = [job for job, twin in zip(jobs, twins, strict=True) if not twin]
    if args.output is not None:
        named = [args.output.resolve()]
    else:
        numbered = len(cached) > 1
        directory = args.output_dir
        named = [default_output(job, i if numbered else None, directory).resolve() for i, job in enumerate(cached)]
    paths, mine = [], iter(named)
    for twin in twins:  # a twin goes just after its cached job, and is named after it
        paths.append(_uncached_name(paths[-1]) if twin else next(mine))
    return paths


def _uncached_name(cached: Path) -> Path:
    return cached.with_name(f"{cached.stem}.uncached{cached.suffix}")


def _with_uncached_twins(jobs: list) -> tuple[list, dict[int, int]]:
    """--cache-reference: after each cached job, the same job uncached; both keep their frames
    for the comparison. Returns the jobs and {cached job's index: its twin's index}. The cached
    job goes first: a fresh pipeline's first job is slower (kernels chosen, memory pools grown),
    which then understates the cache's speedup rather than overstating it."""
    if all(job.request.cache == "none" for job in jobs):
        raise InvalidRequest("--cache-reference compares a cached video with the same made uncached: set --cache too")
    out, twins = [], {}
    for job in jobs:
        job.keep_frames = True
        twins[len(out)] = len(out) + 1
        out += [job, replace(job, request=replace(job.request, cache="none"))]
    return out, twins


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
    from cluster.settings import resolve_settings
    from stages.models import load_spec

    try:
        spec = load_spec(args.model)
        settings = resolve_settings(spec, _explicit(args), args.preset, args.duration)
        settings.require_single()
        prompts = [settings.prompt(prompt) for prompt in _read_prompts(args)]
        if args.output is not None and len(prompts) > 1:
            raise InvalidRequest(f"--output names one video but there are {len(prompts)} prompts; use --output-dir")
        jobs = prepare_jobs(
            args.model,
            prompts,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            image=args.image,
            **settings.request_kwargs(),
            **_placement(args),
        )
        _check_output_suffix(args.output, jobs[0])
        twins = {}
        if args.cache_reference:
            jobs, twins = _with_uncached_twins(jobs)
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    for job in jobs:
        job.warnings = {**settings.warnings, **job.warnings}
    _say(settings.notes, [line for job in jobs for line in job.warnings.values()])
    recorded = settings.recorded_params()

    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    failures, incomplete = [], False
    try:
        for result in paired_with_uncached(_stream(jobs, args), twins, lambda r: r.index, lambda r: r):
            if isinstance(result, JobFailed):
                failures.append(result)
                if len(jobs) > 1:  # now, above the progress bar; all failures are listed again at the end
                    tqdm.write(f"job {result.index} failed: {_first_line(result.error)}", file=sys.stderr)
            else:
                for key, line in result.warnings.items():  # what writing found, e.g. a GIF's lost colours
                    if key not in jobs[result.index].warnings:
                        tqdm.write(f"framecast: warning: {line}", file=sys.stderr)
                if result.clarity_error:
                    tqdm.write(
                        f"framecast: error: clarity failed, video kept at {result.video}: {result.clarity_error}",
                        file=sys.stderr,
                    )
                _track(result, jobs[result.index], len(jobs), args, tracking_uri, recorded)
                if result.interpolation_error:
                    tqdm.write(
                        f"framecast: error: interpolation failed, video kept at {result.video}: "
                        f"{result.interpolation_error}",
                        file=sys.stderr,
                    )
                incomplete |= any(e is not None for e in (result.tracking_error, result.clarity_error,
                                                          result.interpolation_error))  # fmt: skip
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


def _check_output_suffix(output: Path | None, job) -> None:
    """--output must name the file type the job writes (its codec's)."""
    if output is None or output.suffix.lower() == job.suffix:
        return
    codec = job.request.codec
    made = f"{job.spec.name} makes a PNG picture" if codec == "png" else f"codec {codec} writes {job.suffix} files"
    raise InvalidRequest(f"{made}: --output must end in {job.suffix} (got {output})")


def _track(result, job, jobs: int, args: argparse.Namespace, tracking_uri: str, recorded: dict[str, str]) -> None:
    """Record a written video's run in MLflow. A failure is kept on the result and said at once:
    the video is already written."""
    name = f"{job.spec.name}-seed{job.request.seed}" + (f"-job{result.index}" if jobs > 1 else "")
    try:
        result.run_id = log_generation(
            result, job, run_name=name, experiment=args.experiment, tracking_uri=tracking_uri, params=recorded
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
        print(f"{'picture' if result.video.suffix == '.png' else 'video'}: {result.video}")
        if result.interpolated:
            print(f"interpolated: {result.interpolated}")
        print(f"contact sheet: {result.contact_sheet}")
        if result.clarity_csv:
            print(f"clarity per frame: {result.clarity_csv}")
        adherence = {k.removeprefix("adherence/"): v for k, v in result.metrics.items() if k.startswith("adherence/")}
        if adherence:  # a model whose videos are checked against their prompts (framecast-shapes)
            score = adherence.pop("score")
            terms = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in adherence.items())
            print(f"prompt adherence: {terms} (score {score:.2f})")
        if result.run_id:
            print(f"mlflow run: {result.run_id} (experiment {args.experiment!r} in {tracking_uri})")


def cmd_sweep(args: argparse.Namespace) -> int:
    if not args.json:
        return _sweep(args)
    real_stdout = sys.stdout  # as in `generate`: stdout carries the JSON and nothing else
    with contextlib.redirect_stdout(sys.stderr):
        return _sweep(args, out=real_stdout)


def _sweep(args: argparse.Namespace, out=None) -> int:
    from cluster.settings import resolve_settings
    from cluster.sweep import parse_grid, plan_sweep, run_sweep, sheet_frame_index
    from cluster.sweep_report import INCOMPLETE
    from stages.models import load_spec

    try:
        _check_replicas(args)
        grid = parse_grid(args.grid)
        spec = load_spec(args.model)
        settings = resolve_settings(spec, _explicit(args), args.preset, args.duration, swept=frozenset(grid))
        swept = [f"--{axis}" for axis, value in _explicit(args).items() if axis in grid and value is not None]
        if swept:
            raise InvalidRequest(f"{', '.join(swept)} is also a --grid axis; give it in one place")
        plan = plan_sweep(
            args.model, args.prompt, grid, settings, seed=args.seed, negative_prompt=args.negative_prompt,
            image=args.image, **_placement(args),
        )  # fmt: skip
        sheet_frame_index(plan, args.sheet_frame)
        replicas = 1 if args.local else _replicas(args, plan.jobs[0].layout.world_size)
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # Ray could not be started or joined
        print(f"framecast: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    _say(plan.notes, [line for job in plan.jobs for line in job.warnings.values()])
    print(f"sweep of {len(plan.cells)} cells over {', '.join(plan.axes)}; seed {plan.seed}", file=sys.stderr)

    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    bar = tqdm(total=1, desc="sweep", unit="step", file=sys.stderr)

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    def on_cell(outcome) -> None:
        line = f"cell {outcome.cell.label}: {outcome.status}"
        tqdm.write(line + (f" ({outcome.error})" if outcome.error else ""), file=sys.stderr)

    try:
        result = run_sweep(
            plan, output_dir=args.output_dir, replicas=replicas, local=args.local, pipelined=not args.sequential,
            experiment=args.experiment, tracking_uri=tracking_uri, sheet_frame=args.sheet_frame,
            on_progress=on_progress, on_cell=on_cell,
        )  # fmt: skip
    except KeyboardInterrupt:
        bar.close()
        print("framecast: interrupted; the cells finished so far are kept: run the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    except InvalidRequest as e:  # what only the running cluster can tell
        bar.close()
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:
        bar.close()
        if os.environ.get("FRAMECAST_DEBUG"):
            raise
        print(f"framecast: error: {_first_line(e)} (FRAMECAST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    bar.close()
    if args.json:
        print(json.dumps(result.as_json(), allow_nan=False), file=out, flush=True)
    else:
        _print_sweep(result, tracking_uri, args.experiment)
    if result.count("failed"):
        return EXIT_FAILED
    return EXIT_INCOMPLETE if any(result.count(status) for status in INCOMPLETE) else 0


def cmd_tune_cache(args: argparse.Namespace) -> int:
    from cluster.settings import resolve_settings
    from cluster.tune_cache import candidate_specs, tune_cache
    from stages.models import load_spec

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the answer alone on stdout
        try:
            _check_replicas(args)
            if args.cache is not None:
                raise InvalidRequest("tune-cache tries the caches itself: leave --cache out (--specs picks them)")
            if args.min_psnr <= 0:
                raise InvalidRequest(f"--min-psnr must be positive dB (got {args.min_psnr:g})")
            spec = load_spec(args.model)
            seeds = [args.seed] if args.seeds is None else [_seed(text) for text in args.seeds.split(",")]
            asked = None if args.specs is None else [s for s in args.specs.split(",") if s.strip()]
            specs = candidate_specs(spec, asked)
            settings = resolve_settings(spec, _explicit(args), args.preset, args.duration, swept=frozenset({"cache"}))
            print(f"tune-cache: {len(specs)} cache spec(s) and none, at {len(args.prompt)} prompt(s) x "
                  f"{len(seeds)} seed(s): {', '.join(specs)}")  # fmt: skip
            tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()

            def on_sweep(done: int, total: int, result) -> None:
                print(f"tune-cache: sweep {done}/{total} done (mlflow parent run {result.parent_run_id})")

            replicas = 1 if args.local else functools.partial(_replicas, args)  # sized to the planned group
            result = tune_cache(
                spec, args.prompt, seeds, args.min_psnr, settings, specs=specs, output_dir=args.output_dir,
                experiment=args.experiment, tracking_uri=tracking_uri, replicas=replicas, on_sweep=on_sweep,
                negative_prompt=args.negative_prompt, image=args.image, **_placement(args),
            )  # fmt: skip
        except InvalidRequest as e:
            print(f"framecast: error: {e}", file=sys.stderr)
            return EXIT_INVALID
        except Exception as e:
            if os.environ.get("FRAMECAST_DEBUG"):
                raise
            print(f"framecast: error: {_first_line(e)} (FRAMECAST_DEBUG=1 shows the traceback)", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        from dataclasses import asdict

        from stages.clarity import json_figure

        rows = [{k: json_figure(v) if isinstance(v, float) else v for k, v in asdict(f).items()}
                for f in result.figures]  # fmt: skip
        chosen = result.chosen.cache if result.chosen else "none"
        print(json.dumps({"cache": chosen, "answer": result.answer(), "run_id": result.run_id, "specs": rows}),
              file=real_stdout)  # fmt: skip
    else:
        print(result.table(), file=real_stdout)
        print(f"answer: {result.answer()}", file=real_stdout)
        print(f"mlflow run: {result.run_id} (experiment {args.experiment!r})", file=real_stdout)
    return 0


def _seed(text: str) -> int:
    if not text.strip().isdigit():
        raise InvalidRequest(f"--seeds takes non-negative integers separated by commas (got {text!r})")
    return int(text)


def _check_replicas(args: argparse.Namespace) -> None:
    if args.replicas is not None and args.replicas < 1:
        raise InvalidRequest(f"--replicas must be at least 1 (got {args.replicas})")
    if args.local and (args.replicas or 1) > 1:
        raise InvalidRequest(f"--local runs in one process; --replicas {args.replicas} needs Ray")


def _replicas(args: argparse.Namespace, world_size: int) -> int:
    """The replicas asked for, or as many as the Ray cluster has room for (starting Ray if needed)."""
    from cluster.runtime import connect, plan_resources, replicas_that_fit

    connect(args.address, quiet=args.json)
    fit = replicas_that_fit(workers=world_size)
    if args.replicas is not None and args.replicas > fit:
        raise InvalidRequest(
            f"--replicas {args.replicas} needs {args.replicas * world_size} GPUs (or CPU cores without GPUs) for "
            f"{world_size} denoiser rank(s) each; the Ray cluster has room for {fit}"
        )
    replicas = args.replicas or fit
    plan_resources(workers=world_size, decoders=args.decoders, replicas=replicas)  # e.g. too few GPUs: refused here
    return replicas


def _print_sweep(result, tracking_uri: str, experiment: str) -> None:
    from cluster.sweep_report import table_markdown

    print(table_markdown(*result.table), end="")
    counts = result.as_json()
    print(
        f"\ncells: {counts['cells']} ({counts['ran']} ran, {counts['reused']} reused, {counts['failed']} failed); "
        f"prompt encoded {result.encodings} time(s)"
    )
    if result.best:
        print("best cell per metric:")
    for key, (outcome, value) in result.best.items():
        print(f"  {key:<36} {outcome.cell.label:<32} {value:.6g}")
    print(f"summary: {result.summary['table.md'].parent}")
    print(f"mlflow parent run: {result.parent_run_id} (experiment {experiment!r} in {tracking_uri})")


def cmd_serve(args: argparse.Namespace) -> int:
    """Start Ray Serve with the framecast application and keep it up until Ctrl-C (or SIGTERM)."""
    import signal
    import time

    import pydantic

    from cluster.jobs import shown
    from cluster.runtime import connect
    from cluster.serving import ServeArgs, resolve_served

    try:
        if not 0 < args.port < 65536:
            raise InvalidRequest(f"--port must be 1 to 65535 (got {args.port})")
        serve_args = ServeArgs(
            model=args.model, weights=args.weights, workers=args.workers, ulysses=args.ulysses, ring=args.ring,
            decoders=args.decoders, data_dir=args.data_dir, max_queue=args.max_queue, runners=args.runners,
            api_key_env=args.api_key_env, experiment=args.experiment, tracking_uri=args.tracking_uri,
            stall_timeout_s=args.stall_timeout, database=args.database,
        )  # fmt: skip
        served = resolve_served(serve_args)  # every check that needs no cluster, before Ray starts
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        flag = str(first["loc"][0]).removesuffix("_s").replace("_", "-")  # stall_timeout_s: --stall-timeout
        print(f"framecast: error: --{flag}: {first['msg']}", file=sys.stderr)
        return EXIT_INVALID
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    from ray import serve

    from cluster.serving import serve_application

    _stop_on(signal.SIGINT, signal.SIGTERM)  # while starting, a stop stops the start
    # "local": Ray's word for a Ray of our own, even where a `ray start` cluster runs on this machine
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    shared = address != "local"
    log_file = Path(served.data_dir) / "serve.log"  # Ray's and Serve's own lines
    try:
        connect(address, quiet=True, log_file=log_file)
        _stop_on(signal.SIGINT, signal.SIGTERM)  # again: ray.init installs a SIGTERM handler of its own
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(serve_application(serve_args), name="framecast", route_prefix="/", blocking=False)
    except KeyboardInterrupt:
        print("framecast: interrupted while starting", file=sys.stderr)
        _stop_serving(shared)
        return 130
    except InvalidRequest as e:  # what only the cluster can tell, e.g. too few GPUs for --workers
        print(f"framecast: error: {e}", file=sys.stderr)
        _stop_serving(shared)
        return EXIT_INVALID
    except Exception as e:
        print(f"framecast: error: could not start serving: {_first_line(e)}", file=sys.stderr)
        _stop_serving(shared)
        return EXIT_FAILED
    auth = f"API key from ${args.api_key_env}" if args.api_key_env else "no API key (anyone who reaches it may use it)"
    print(f"framecast: serving {args.model} at http://{args.host}:{args.port}/v1 (OpenAI Videos API; docs at "
          f"http://{args.host}:{args.port}/docs)\n"
          f"framecast: jobs in {shown(served.database)}, videos in {served.data_dir}/videos; {auth}; "
          f"Ray's own log in {log_file}; Ctrl-C or SIGTERM stops it",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    returned = _stop_serving(shared)
    print(f"framecast: stopped; {returned} video(s) in progress went back to the queue, and queued ones stay "
          f"there: they resume on the next start", file=sys.stderr)  # fmt: skip
    return 0


def _stop_on(*signals: int) -> None:
    """Each of `signals` raises KeyboardInterrupt in the main thread, as SIGINT does by default:
    also where the shell that started us ignores SIGINT (a background job), and for SIGTERM, which
    systemd and Kubernetes stop with."""
    import signal

    for number in signals:
        signal.signal(number, _interrupt)


def _interrupt(*_: object) -> None:
    """The first SIGINT or SIGTERM stops; the next ones are ignored (`_stop_serving`)."""
    _ignore_stops()
    raise KeyboardInterrupt


def _ignore_stops() -> None:
    """SIGINT and SIGTERM ignored: a stop runs to its end (a few seconds), not broken off by the next."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop_serving(shared: bool) -> int:
    """Stop the Videos API: its runners give their jobs back to the queue (how many is returned),
    then the application goes; on a Ray started here, Ray goes with it (and every process of it)."""
    import ray
    from ray import serve

    _ignore_stops()
    returned = 0
    if not ray.is_initialized():
        return returned
    try:
        returned = serve.get_app_handle("framecast").drain.remote().result(timeout_s=STOP_DRAIN_S)
    except Exception:  # not started, or not answering: a new ingress requeues what this one ran
        pass
    if shared:
        try:
            serve.delete("framecast")  # a shared cluster: its other applications stay up
        except Exception as e:  # e.g. Serve never started there
            print(f"framecast: could not delete the application: {_first_line(e)}", file=sys.stderr)
    # The drain's answer is taken from a stream whose next item Ray's callback thread fetches when
    # it is ready; if that lands after the shutdown, Serve's handle logs a traceback for a stream
    # nobody reads any more. Nothing is lost then, so this process's Serve client says nothing more.
    logging.getLogger("ray.serve").setLevel(logging.CRITICAL)
    ray.shutdown()  # a Ray this process started stops with it, every process of it
    return returned


def cmd_batch(args: argparse.Namespace) -> int:
    real_stdout = sys.stdout  # as in `generate`: with --json, stdout carries the JSON and nothing else
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        return _batch(args, real_stdout)


def _batch(args: argparse.Namespace, out) -> int:
    from cluster.batch import Manifest, prepare_batch, read_requests, run_batch
    from cluster.replicas import pipeline_replicas

    try:
        _check_replicas(args)
        if args.max_attempts < 1:
            raise InvalidRequest(f"--max-attempts must be at least 1 (got {args.max_attempts})")
        requests = read_requests(args.requests)
        jobs = prepare_batch(args.model, requests, args.requests.resolve().parent, **_placement(args))
        manifest = Manifest(args.output_dir)
        todo = manifest.pending(requests)
        replicas = 1 if args.local or not todo else min(_replicas(args, jobs[0].layout.world_size), len(todo))
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # Ray could not be started or joined
        print(f"framecast: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    _say([], [f"{r.id}: {line}" for r, job in zip(requests, jobs, strict=True) for line in job.warnings.values()])
    if todo:
        print(f"{len(todo)} of {len(requests)} jobs to run on {replicas} pipeline replica(s)", file=sys.stderr)
    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    bar = tqdm(total=len(todo), desc="jobs", unit="job", file=sys.stderr)
    failures = 0

    def on_entry(entry: dict) -> None:
        nonlocal failures
        failures += bool(entry.get("error"))
        bar.update(1)
        per_minute = 60 * bar.n / elapsed if (elapsed := bar.format_dict["elapsed"]) else 0.0
        bar.set_postfix_str(f"{failures} failed, {per_minute:.1f} jobs/min")
        if args.json:
            print(json.dumps(entry), file=out, flush=True)

    pool = None
    try:
        if todo:
            pool = pipeline_replicas(jobs[0], replicas, args.local, args.max_attempts)
        counts, parent = run_batch(
            requests, jobs, todo, pool, args.output_dir, manifest, model=args.model, experiment=args.experiment,
            tracking_uri=tracking_uri, on_entry=on_entry,
        )  # fmt: skip
    except Exception as e:  # an actor or Ray itself failed: one line, unless debugging
        if os.environ.get("FRAMECAST_DEBUG"):
            raise
        print(f"framecast: error: {_first_line(e)} (FRAMECAST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
        if pool is not None:
            for event in pool.events:  # replicas lost, replaced or retired
                print(f"framecast: {event}", file=sys.stderr)
            pool.close()
    summary = {**counts.as_json(), "manifest": str(manifest.path), "parent_run_id": parent}
    if args.json:
        print(json.dumps(summary), file=out, flush=True)
    else:
        print(f"ran {counts.ran}, reused {counts.reused}, failed {len(counts.failed)}; manifest: {manifest.path}")
    for failed in counts.failed:  # after the progress bar, so that the errors are the last thing printed
        print(f"framecast: error: job {failed}: {manifest.entries[failed]['error']}", file=sys.stderr)
    return EXIT_FAILED if counts.failed else 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from cluster.recommend import heuristics, measured, metric_direction
    from cluster.tune_cache import tuned_cache
    from stages.models import load_spec
    from stages.video_io import image_size

    try:
        spec = load_spec(args.model)
        way = "higher" if metric_direction(args.metric) > 0 else "lower"
        size = image_size(args.image, name=f"--image {args.image}") if args.image else None
        if args.top < 1:
            raise InvalidRequest(f"--top must be at least 1 (got {args.top})")
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    rules = heuristics(spec, args.prompt, size)
    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    try:
        ranked, runs = measured(spec, args.metric, args.prompt, args.experiment, tracking_uri)
        tuned = tuned_cache(spec, args.experiment, tracking_uri)
    except Exception as e:
        print(f"framecast: error: cannot read past runs from {tracking_uri}: {_first_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    where = f"experiment {args.experiment!r}" if args.experiment else "all experiments"
    if args.json:
        print(json.dumps({
            "model": args.model, "metric": args.metric, "better": way,
            "heuristics": [{"rule": h.rule, "advice": h.advice} for h in rules],
            "data": {"runs": runs, "where": f"{where} in {tracking_uri}",
                     "settings": [_json_measured(m) for m in ranked[: args.top]]},
            "tuned_cache": tuned,
        }))  # fmt: skip
        return 0
    print(f"heuristics (rules of thumb from the tuning articles, not measured here) for {spec.name}:")
    for h in rules:
        print(f"  - {h.rule}: {h.advice}")
    if tuned is not None:
        print(f"\nstep cache, tuned here (framecast tune-cache, mlflow run {tuned['run_id']}): ", end="")
        if tuned["cache"] == "none":
            print(f"none; no cache kept every video at {tuned['min_psnr_y']:g} dB or more against uncached")
        else:
            print(f"--cache {tuned['cache']}: {tuned['speedup']:.2f}x faster denoising, worst PSNR-Y "
                  f"{tuned['worst_psnr_y']:.2f} dB against uncached (bound {tuned['min_psnr_y']:g} dB)")  # fmt: skip
    print(f"\nwhat the data says ({args.metric}, {way} is better; runs of {args.model} in {where} in {tracking_uri}):")
    if not ranked:
        print(f"  no data: no finished runs of {args.model} with {args.metric}; run `framecast sweep` to measure")
        return 0
    print(f"  {runs} run(s) in {len(ranked)} distinct setting(s); best first:")
    for number, m in enumerate(ranked[: args.top], 1):
        shown = ", ".join(f"{k}={v}" for k, v in m.settings.items())
        spread = f", {m.low:.4g}..{m.high:.4g}" if m.runs > 1 else ""
        prompt = f"; {m.same_prompt} with this prompt" if m.same_prompt else ""
        print(f"  {number}. {shown}: mean {m.mean:.6g} over {m.runs} run(s){spread}{prompt}")
    return 0


def _json_measured(setting) -> dict:
    """A recommend line as strict JSON: an infinite mean PSNR (lossless files) is "inf"."""
    from stages.clarity import json_figure

    figures = {k: json_figure(v) for k, v in vars(setting).items() if isinstance(v, float)}
    return {**vars(setting), **figures}


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


def cmd_models(args: argparse.Namespace) -> int:
    from stages.cache import allowed, cache_kinds
    from stages.models import KIND_NAMES, known_models, load_spec
    from stages.weights import weights_status

    models = []
    for name in known_models():
        spec = load_spec(name)
        described = spec.as_dict()
        models.append({
            "name": name, "kind": spec.kind, "family": spec.family, "description": spec.description,
            "license": spec.license, "dtype": spec.dtype, "defaults": described["defaults"],
            "limits": described["limits"], "caches": allowed(cache_kinds(spec)).split(", "),
            "weights": weights_status(spec),
        })  # fmt: skip
    if args.json:
        print(json.dumps({"models": models}, indent=2))
        return 0

    def span(lo_hi: list[int]) -> str:
        return f"{lo_hi[0]}" if lo_hi[0] == lo_hi[1] else f"{lo_hi[0]}-{lo_hi[1]}"

    rows = [("MODEL", "KIND", "DEFAULTS", "LIMITS", "CACHES", "LICENSE", "WEIGHTS")]
    for m in models:
        d, lim, w = m["defaults"], m["limits"], m["weights"]
        frames = f"{d['num_frames']}f@{d['fps']}fps " if m["kind"] != "t2i" else ""
        guidance = f"g{d['guidance_scale']:g}" + (f"/{d['guidance_scale_2']:g}" if d.get("guidance_scale_2") else "")
        defaults = f"{d['width']}x{d['height']} {frames}{d['steps']} steps {guidance}"
        step = f" by {lim['frame_step']}" if lim["frame_step"] > 1 else ""
        frame_limits = f" {span(lim['num_frames'])}f{step}" if m["kind"] != "t2i" else ""
        limit = f"w{span(lim['width'])} h{span(lim['height'])}{frame_limits}"
        state = "present" if w["present"] else "built on first use" if w["source"] == "built offline" else "missing"
        weights = f"{state} ({w['source']}: {w['location']})"
        caches = ",".join(kind.partition(":")[0] for kind in m["caches"][1:]) or "-"
        rows.append((m["name"], KIND_NAMES.get(m["kind"], m["kind"]), defaults, limit, caches, m["license"], weights))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="framecast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _sweep_parser(sub)
    _tune_cache_parser(sub)
    _batch_parser(sub)
    _recommend_parser(sub)
    _clarity_parser(sub)
    _frames_parser(sub)
    _serve_parser(sub)
    _models_parser(sub)
    args = parser.parse_args(argv)
    commands = {
        "generate": cmd_generate,
        "sweep": cmd_sweep,
        "tune-cache": cmd_tune_cache,
        "batch": cmd_batch,
        "recommend": cmd_recommend,
        "clarity": cmd_clarity,
        "frames": cmd_frames,
        "serve": cmd_serve,
        "models": cmd_models,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
