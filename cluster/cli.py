"""The `framecast` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import mlflow
from tqdm import tqdm

from cluster.tracking import DEFAULT_EXPERIMENT, log_generation
from stages.errors import InvalidRequest

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_TRACKING_FAILED = 3


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text-to-video: one prompt -> one MP4, recorded in MLflow")
    p.add_argument("--model", default="tiny", help="a model from configs/models (default: tiny)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (model default if unset)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale; 1 turns guidance off")
    p.add_argument("--frames", type=int, default=None, help="frames (8k+1 for CogVideoX)")
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="MP4 path (default: outputs/<model>-<time>.mp4)")
    p.add_argument("--weights", default=None, help="local diffusers directory of the model's weights")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's own default store in this directory)",
    )
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
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _run(job, args: argparse.Namespace):
    """Start or join Ray (unless --local), run the stages with a live progress bar, write the video."""
    from cluster.driver import default_output, generate, make_executor

    if not args.local:
        from cluster.runtime import connect

        connect(args.address, quiet=args.json)
    executor = make_executor(job, local=args.local)
    try:
        with tqdm(total=job.request.steps, desc="denoising", unit="step", file=sys.stderr) as bar:

            def on_step(done: int, total: int) -> None:
                bar.update(done - bar.n)
                if done == total:
                    bar.close()  # stop its clock: decoding and writing are not denoising steps

            return generate(job, executor, (args.output or default_output(job)).resolve(), on_step=on_step)
    finally:
        executor.close()


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.json:
        return _generate(args)
    # With --json, stdout carries the JSON object and nothing else: libraries that print while
    # they work (DeepSpeed warns on stdout when it is first imported) are sent to stderr.
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _generate(args, out=real_stdout)


def _generate(args: argparse.Namespace, out=None) -> int:
    from cluster.driver import prepare

    try:
        job = prepare(
            args.model,
            args.prompt,
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
            cluster=args.cluster,
            local=args.local,
        )
    except InvalidRequest as e:
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID

    try:
        result = _run(job, args)
    except InvalidRequest as e:  # what only the running cluster can tell, e.g. too few GPUs for the layout
        print(f"framecast: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # a stage, an actor or Ray itself failed: one line, unless debugging
        if os.environ.get("FRAMECAST_DEBUG"):
            raise
        print(f"framecast: error: {_first_line(e)} (FRAMECAST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED

    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    try:
        result.run_id = log_generation(
            params=result.params,
            metrics=result.metrics,
            artifacts=[result.video, result.contact_sheet],
            config_text=job.resolved_config(),
            experiment=args.experiment,
            tracking_uri=tracking_uri,
            run_name=f"{job.spec.name}-seed{job.request.seed}",
        )
    except Exception as e:  # the video is already written; say so and fail the command
        result.tracking_error = f"{type(e).__name__}: {e}".splitlines()[0]

    if args.json:
        print(json.dumps(result.as_json(), indent=2), file=out)
    else:
        print(f"video: {result.video}")
        print(f"contact sheet: {result.contact_sheet}")
        if result.run_id:
            print(f"mlflow run: {result.run_id} (experiment {args.experiment!r} in {tracking_uri})")
    if result.tracking_error:
        print(
            f"framecast: error: tracking failed, video kept at {result.video}: {result.tracking_error}", file=sys.stderr
        )
        return EXIT_TRACKING_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="framecast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    args = parser.parse_args(argv)
    return {"generate": cmd_generate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
