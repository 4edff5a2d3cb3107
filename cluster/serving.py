"""Serving the pipeline with Ray Serve: what each deployment hosts, what it asks of the cluster,
and the executor through which the driver reaches them.

    VideosAPI (ingress) --DeploymentHandle--> Encoder -> DenoiserGroup -> Decoder (x M)

`serve_app.py` wraps the hosts below in deployments. A stage's result goes from deployment to
deployment (a DeploymentResponse given as an argument), never through the ingress, except the
frames, which the ingress writes. `ServeExecutor` gives the driver (`cluster.driver.run_stream`)
the same calls as the Ray and local executors, so a served video is made by the same code, in
the same order, as one made by `framecast generate`.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from ray.util import get_current_placement_group

from cluster.actors import build_without_gc, run_stage_method
from cluster.executor import (
    ACTOR_PING_TIMEOUT_S,
    ACTOR_START_TIMEOUT_S,
    PROGRESS_ANSWER_S,
    DenoiserGroup,
    Executor,
    Method,
    Stage,
    StageCall,
    StageFailed,
    call_arguments,
)
from cluster.jobs import database_url
from cluster.runtime import ActorResources, plan_resources
from cluster.tracking import DEFAULT_EXPERIMENT
from stages.clarity import ClarityStage
from stages.context_parallel import ParallelLayout
from stages.decoder import DecoderStage
from stages.denoiser import StepCallback, lever_problem, plan_serving_layout
from stages.encoder import EncoderStage
from stages.errors import InvalidRequest
from stages.models import CONFIG_DIR, DEFAULT_MODEL, load_spec
from stages.weights import resolve_weights

if TYPE_CHECKING:
    from ray.serve import Application

log = logging.getLogger("framecast.serve")
SERVE_CONFIG = CONFIG_DIR / "serve" / "framecast.yaml"  # the Videos API as `serve run` starts it
WAIT_POLL_S = 0.25  # how often the executor relays denoising progress while it waits


def _env(name: str, default: str | None = None) -> Any:
    return Field(default_factory=lambda: os.environ.get(name, default))


class ServeArgs(BaseModel):
    """The application's arguments: `serve run serve_app:app model=framecast-shapes ...`, a Serve config
    file's `args`, or `framecast serve`'s flags. Unset, the model, weights and data directory
    come from $FRAMECAST_MODEL, $FRAMECAST_WEIGHTS and $FRAMECAST_SERVE_DIR."""

    model_config = ConfigDict(extra="forbid")

    model: str = _env("FRAMECAST_MODEL", DEFAULT_MODEL)
    weights: str | None = _env("FRAMECAST_WEIGHTS")  # a local diffusers directory; None: the model's own
    workers: int = Field(1, ge=1, description="denoiser ranks (GPUs) of the one context-parallel group")
    ulysses: int | None = Field(None, ge=1)
    ring: int | None = Field(None, ge=1)
    decoders: int = Field(1, ge=1, description="decoder replicas; a video's tiles are spread over them")
    data_dir: str = _env("FRAMECAST_SERVE_DIR", "framecast-serve")  # videos, and the job database
    # The job queue: an SQLite file (default: <data_dir>/jobs.sqlite3), or a database URL
    # (postgresql://user@host/db) that ingress replicas on several nodes share.
    database: str | None = None
    max_queue: int = Field(16, ge=1, description="videos queued or in progress; beyond it, 429")
    runners: int = Field(2, ge=1, description="videos in the pipeline at once (one per stage overlaps them)")
    max_attempts: int = Field(3, ge=1, description="tries of a video whose stage died under it")
    stall_timeout_s: float = Field(
        180.0, gt=0,
        description="a video that makes no progress this long (more, in proportion, beyond 50 steps) is given up "
        "and queued again, and its runner replaced",
    )  # fmt: skip
    api_key_env: str | None = None  # the environment variable holding the API key (unset: no key)
    max_image_mb: float = Field(10.0, gt=0, description="largest input_reference upload")
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else MLflow's own default
    # Custom Ray resources the ingress asks for, to pin it (its job database and videos) to the
    # node that holds data_dir, e.g. {"framecast_ingress": 1} given to the head node only.
    ingress_resources: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class Served:
    """What the deployments are built with, resolved once by the application builder."""

    model: str
    weights: str
    layout: ParallelLayout
    decoders: int
    data_dir: str
    database: str
    max_queue: int
    runners: int
    max_attempts: int
    stall_timeout_s: float
    max_image_bytes: int
    experiment: str
    tracking_uri: str | None
    # sha256 of the API key, not the key: the deployments' arguments are visible to whoever can
    # read the Serve config; the key stays in the environment it was given in.
    api_key_sha256: str | None = None
    ingress_resources: tuple[tuple[str, float], ...] = ()


def resolve_served(args: ServeArgs) -> Served:
    """Check the arguments and find everything the deployments need, before any is started."""
    spec = load_spec(args.model)
    if spec.makes_images:
        raise InvalidRequest(
            f"{args.model} is text-to-image; framecast serve runs the Videos API, for video models "
            f"(make pictures with framecast generate or sweep)"
        )
    weights = resolve_weights(spec, args.weights)
    layout = plan_serving_layout(spec, args.workers, args.ulysses, args.ring)
    problem = lever_problem(spec, None, ranks=layout.world_size)  # the YAML's levers; the stages check their GPUs
    if problem:
        raise InvalidRequest(f"{spec.name}'s acceleration: {problem}")
    digest = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "")
        if not key.strip():
            raise InvalidRequest(f"the API key variable ${args.api_key_env} is not set or empty")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
    data_dir = Path(args.data_dir).expanduser().resolve()
    try:  # a path becomes sqlite:///path
        database = database_url(args.database or data_dir / "jobs.sqlite3").render_as_string(hide_password=False)
    except Exception as e:  # not a URL SQLAlchemy can read
        raise InvalidRequest(
            f"database must be an SQLite file or a database URL such as postgresql://user@host/db (got "
            f"{args.database!r}: {e})"
        ) from None
    return Served(
        args.model, str(weights), layout, args.decoders, str(data_dir), str(database), args.max_queue,
        args.runners, args.max_attempts, args.stall_timeout_s, int(args.max_image_mb * 2**20), args.experiment,
        args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), digest, tuple(args.ingress_resources.items()),
    )  # fmt: skip


@dataclass(frozen=True)
class DeploymentResources:
    """What the encoder, denoiser and decoder deployments ask of Ray, per replica."""

    encoder: dict[str, Any]  # ray_actor_options
    decoder: dict[str, Any]
    denoiser: dict[str, Any]  # the replica actor itself (in the first bundle)
    denoiser_bundles: list[dict[str, float]]  # one per rank: placement_group_bundles
    rank: ActorResources  # each rank actor, in its bundle


def plan_deployments(served: Served, cluster: dict[str, float] | None = None) -> DeploymentResources:
    """The ranks' GPUs (or CPU shares) as the denoiser replica's placement-group bundles,
    STRICT_PACK on one node; the encoder and decoders as `cluster.runtime.plan_resources` places
    side actors, except that they cannot share a rank's bundle (it belongs to the denoiser
    replica): a rank then takes only its share of the GPU, leaving the rest to them."""
    plan = plan_resources(cluster, workers=served.layout.world_size, decoders=served.decoders)
    side = [plan.encode, *plan.decode]
    gpu = plan.bundle.get("GPU", 0)
    bundle = {"GPU": plan.denoise.num_gpus} if gpu and any(a.beside_rank is not None for a in side) else plan.bundle
    return DeploymentResources(
        encoder=_actor_options(plan.encode.num_gpus, plan.encode.num_cpus, plan.encode.env),
        decoder=_actor_options(plan.decode[0].num_gpus, plan.decode[0].num_cpus, plan.decode[0].env),
        denoiser=_actor_options(0, 0, {}),  # the replica only coordinates; its ranks hold the devices
        denoiser_bundles=[dict(bundle)] * served.layout.world_size,
        rank=ActorResources(bundle.get("GPU", 0), bundle.get("CPU", 0), dict(plan.denoise.env)),
    )


def _actor_options(gpus: float, cpus: float, env: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {"num_gpus": gpus, "num_cpus": cpus}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return options


@dataclass
class Delivered:
    """A stage's result as a deployment returns it: the value, and each process's report
    (start, end, output bytes, the stage's figures)."""

    value: Any
    reports: list[dict[str, Any]]


def _unwrap(args: tuple) -> tuple:
    """A Delivered argument (another deployment's result, handed over by Serve) -> its value."""
    return tuple(arg.value if isinstance(arg, Delivered) else arg for arg in args)


SERVED_STAGES: dict[Stage, type] = {Stage.ENCODE: EncoderStage, Stage.DECODE: DecoderStage}


class StageHost:
    """One stage in this process: a replica of the encoder or the decoder deployment."""

    def __init__(self, stage: str, model: str, weights: str):
        self.stage = build_without_gc(SERVED_STAGES[Stage(stage)], load_spec(model), Path(weights))
        self.broken: str | None = None

    def describe(self) -> str:
        return self.stage.describe()

    def call(self, method: str, *args: Any) -> Delivered:
        try:
            value, report = run_stage_method(self.stage, method, _unwrap(args), {})
        except Exception as e:
            if isinstance(e, torch.AcceleratorError):  # the device context is lost: only a new process recovers
                self.broken = f"the device failed: {e}"
            raise
        report["pid"] = os.getpid()  # which replica did it
        return Delivered(value, [report])

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError(self.broken)


class DenoiserGroupHost:
    """A denoiser group of `layout.world_size` ranks in this replica's placement group (one
    bundle per rank, from the deployment's `placement_group_bundles`): the replica hands each
    call to every rank, as the Ray executor does, and answers for the group."""

    def __init__(self, model: str, weights: str, layout: ParallelLayout, rank: ActorResources):
        within = get_current_placement_group()
        if within is None:
            raise RuntimeError("the denoiser group must run in a replica with placement_group_bundles")
        self.group = DenoiserGroup(load_spec(model), Path(weights), layout, rank, {}, within=within)
        self.layout = layout
        self.devices = ray.get(self.group.start(), timeout=ACTOR_START_TIMEOUT_S)

    def describe(self) -> str:
        return self.devices[0]

    async def call(self, method: str, *args: Any, progress_id: str | None = None) -> Delivered:
        """Every rank runs the method; rank 0's result stands for the group's.

        A rank that dies, or any failure in a group of several ranks (the others may wait in a
        collective), leaves a group this process cannot mend: the replica ends itself, so that
        Serve replaces it (and its ranks) at once, and every call on it fails as a lost actor,
        which the ingress gives back to the queue rather than failing the videos.
        """
        calls = self.group.call(method, *_unwrap(args), progress_id=progress_id)
        try:
            value = await calls[0][0]
            reports = await asyncio.gather(*(report for _, report in calls))
        except Exception as e:
            if self.layout.world_size > 1 or isinstance(e, ray.exceptions.RayActorError):
                log.error("the denoiser group failed (%s: %s); this replica ends for Serve to replace it",
                          type(e).__name__, e)  # fmt: skip
                os._exit(1)
            raise
        return Delivered(value, list(reports))

    async def progress(self, progress_id: str) -> tuple[int, int] | None:
        return await self.group.progress(progress_id)

    async def check_health(self) -> None:
        """Every rank answers (a rank that died while idle fails this, and Serve replaces the replica)."""
        await asyncio.wait_for(asyncio.gather(*self.group.pings()), timeout=ACTOR_PING_TIMEOUT_S)


class _Finished:
    """A result made in the ingress's own process, answering as a DeploymentResponse does."""

    def __init__(self, delivered: Delivered):
        self.delivered = delivered

    def result(self, timeout_s: float | None = None) -> Delivered:
        return self.delivered

    def cancel(self) -> None:
        """Nothing to cancel: it is made."""


@dataclass
class ServeCall(StageCall):
    progress: StepCallback | None = None
    progress_id: str | None = None
    seen: tuple[int, int] | None = field(default=None, repr=False)


class ServeExecutor(Executor):
    """The driver's executor over Serve deployments: the encoder, the denoiser group and the
    decoders through their handles, and the clarity panel in this process (the ingress's CPU).
    Used from runner threads (DeploymentResponse.result blocks), never from the event loop."""

    name = "serve"
    concurrent = True
    crosses_processes = True

    def __init__(self, encoder: Any, denoiser: Any, decoder: Any, decoders: int):
        self.handles = {Stage.ENCODE: encoder, Stage.DENOISE: denoiser, Stage.DECODE: decoder}
        self.decoders = decoders
        self.panel = ClarityStage()
        self._devices: dict[str, str] | None = None

    def devices(self) -> dict[str, str]:
        if self._devices is None:
            # a replica being replaced answers once its stand-in has started: within a start's deadline
            found = {stage: handle.describe.remote().result(timeout_s=ACTOR_START_TIMEOUT_S)
                     for stage, handle in self.handles.items()}  # fmt: skip
            self._devices = {**found, "measure": self.panel.describe()}
        return dict(self._devices)

    def call(self, stage: Stage, method: Method, *args: Any, progress: StepCallback | None = None) -> ServeCall:
        stage, method = Stage(stage), Method(method)
        if stage == Stage.MEASURE:
            try:
                value, report = run_stage_method(self.panel, method, call_arguments(args, 0), {})
            except Exception as e:
                raise StageFailed(stage, e) from e
            return ServeCall(stage, [_Finished(Delivered(value, [report]))], [])
        handle = self.handles[stage]
        if stage == Stage.DECODE and method == Method.DECODE_TILES:  # one share of the tiles per decoder
            args = call_arguments(args, self.decoders)
            shares = [handle.call.remote("decode_share", *args, k, self.decoders) for k in range(self.decoders)]
            return ServeCall(stage, shares, [])
        args = call_arguments(args, 1)
        progress_id = uuid.uuid4().hex if progress is not None else None
        kwargs = {"progress_id": progress_id} if progress_id else {}
        call = handle.call.remote(method, *args, **kwargs)
        return ServeCall(stage, [call], [], progress=progress, progress_id=progress_id)

    def wait(self, *calls: ServeCall) -> None:
        """Block until every call has finished, relaying denoising progress meanwhile. A failure
        raises StageFailed, blamed on the first of `calls` (in the order given) that failed; a
        call's `check` that raises ends the wait with its exception."""
        for call in calls:
            for response in call.values:
                while True:
                    if call.check is not None:
                        try:
                            call.check()
                        except BaseException:  # given up: what is still queued or running is not wanted
                            self._cancel(calls)
                            raise
                    try:
                        response.result(timeout_s=WAIT_POLL_S)
                        break
                    except TimeoutError:
                        self._relay(calls)
                    except Exception as e:
                        raise StageFailed(call.stage, e) from e
        self._relay(calls)

    @staticmethod
    def _cancel(calls: tuple[ServeCall, ...]) -> None:
        """Cancel the calls' requests: Serve drops one still queued and cancels one running in an
        async replica method (the denoiser group's); a stage method already running finishes."""
        for call in calls:
            for response in call.values:
                response.cancel()

    def _relay(self, calls: tuple[ServeCall, ...]) -> None:
        for call in calls:
            if call.progress is None:
                continue
            try:
                asked = self.handles[Stage.DENOISE].progress.remote(call.progress_id)
                state = asked.result(timeout_s=PROGRESS_ANSWER_S)
            except Exception:  # no news this time; the call's own result says if it failed
                continue
            if state is not None and tuple(state) != call.seen:
                call.seen = tuple(state)
                call.progress(*state)

    def get(self, call: ServeCall) -> Any:
        self.wait(call)
        call.deliveries += 1
        return call.values[0].result().value

    def gather(self, call: ServeCall) -> list[Any]:
        self.wait(call)
        call.deliveries += 1
        return [response.result().value for response in call.values]

    def reports(self, call: ServeCall) -> list[dict[str, Any]]:
        self.wait(call)
        return [report for response in call.values for report in response.result().reports]

    def close(self) -> None:
        """Nothing to release: the deployments belong to Serve."""


def serve_application(args: ServeArgs) -> Application:
    """The Videos API application built from `args`, by the builder that the Serve config names
    (`import_path`, e.g. `serve_app:app`), as `serve run configs/serve/framecast.yaml` builds it.
    The HTTP app sits above cluster/, so `framecast serve` reaches it as Serve does, by its import
    path in configs, and cluster/ imports no top-level module."""
    application = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    module, _, builder = application["import_path"].partition(":")
    return getattr(importlib.import_module(module), builder)(args)
