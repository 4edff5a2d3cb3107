"""Executors run stage methods: in this process (`--local`), in Ray actors, or (for the Videos
API) in Serve deployments (`cluster.serving.ServeExecutor`). `Executor` is the one interface
they implement; the driver knows no other.

The driver calls `executor.call(stage, method, *args)` and gets a StageCall back. With Ray the
call returns at once and the work runs in the stage's actors, so the driver can hand the next
job to the encoder while the denoiser and the decoders work on earlier ones. A StageCall given
as an argument to another call hands its result straight from actor to actor (an ObjectRef), so
embeddings and latents never pass through the driver; `get` and `gather` bring results to it.

Every hand-over of a result to another process (an actor, or the driver) is counted on the
StageCall (`deliveries`), so that the bytes each job moves between stages can be reported.
"""

from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import ray

from cluster.actors import run_stage_method
from cluster.process_group import COLLECTIVE_TIMEOUT_S, ActorGroup
from cluster.runtime import ActorResources, ClusterLayout, ResourcePlan, load_cluster_layout, plan_resources
from stages.clarity import ClarityStage
from stages.context_parallel import ParallelLayout
from stages.decoder import DecoderStage
from stages.denoiser import DenoiserStage, StepCallback, lever_problem
from stages.encoder import EncoderStage
from stages.errors import InvalidRequest
from stages.models import ModelSpec


class Stage(StrEnum):
    """The stages an executor hosts (a StrEnum: the plain names work too)."""

    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"
    MEASURE = "measure"


class Method(StrEnum):
    """The stage methods the driver calls: `EncoderStage.encode`, `DenoiserStage.denoise`,
    `DecoderStage.decode` (one decoder, every tile, uint8 frames), `.decode_float` (the same in
    floats) and `.decode_tiles` (each decoder its share), `ClarityStage.measure`."""

    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"
    DECODE_FLOAT = "decode_float"
    DECODE_TILES = "decode_tiles"
    MEASURE = "measure"


MODEL_STAGES: dict[Stage, type] = {  # built from the model's spec and weights
    Stage.ENCODE: EncoderStage,
    Stage.DENOISE: DenoiserStage,
    Stage.DECODE: DecoderStage,
}
ACTOR_START_TIMEOUT_S = float(os.environ.get("FRAMECAST_ACTOR_START_TIMEOUT", 900))
ACTOR_PING_TIMEOUT_S = 30.0  # an actor that does not answer its progress thread this long is taken for dead
PROGRESS_ANSWER_S = 1.0  # how long the driver waits for an actor's progress before it goes on


LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)


class StageFailed(RuntimeError):
    """A stage raised, or its actor died: the message names the stage and the root cause."""

    def __init__(self, stage: str, error: BaseException):
        cause = getattr(error, "cause", None) or error  # a RayTaskError carries the stage's own exception
        first_line = (str(cause).strip().splitlines() or [""])[0]
        super().__init__(f"{stage} stage failed: {type(cause).__name__}: {first_line}")
        self.stage = stage
        # died, not raised: its actor, or a result it had made, lost (with its process or node)
        self.actor_lost = isinstance(cause, LOST)
        self.stage_down = False  # the stage was torn down before the job reached it (it never ran there)


@dataclass
class StageCall:
    """One stage method, called on every actor of the stage (one, or a group)."""

    stage: str
    values: list[Any]  # per actor: its result (local) or an ObjectRef to it; a group's other ranks give None
    reports: list[Any]  # per actor: {"start", "end", "output_bytes", stage figures...} (or an ObjectRef)
    # Times each actor's result was handed to another process (an actor, or the driver). The
    # bytes the call moved are deliveries x the output bytes of its reports.
    deliveries: int = 0
    # Raises to end a wait on the call early (its caller gave up on the job); an executor that waits
    # in steps asks it at each (Serve's), the others wait the call out.
    check: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def value(self) -> Any:
        """The stage's result: the first actor's (a denoiser group's ranks all compute the same)."""
        return self.values[0]

    def shared(self) -> StageCall:
        """The same result for another job to use, its hand-overs counted on their own."""
        return StageCall(self.stage, self.values, self.reports)


def call_arguments(args: tuple, receivers: int) -> tuple:
    """The call's arguments with each StageCall replaced by its result, counted as handed to `receivers`."""
    out = []
    for arg in args:
        if isinstance(arg, StageCall):
            arg.deliveries += receivers
            arg = arg.value
        out.append(arg)
    return tuple(out)


class Executor(ABC):
    """Where the stages of one pipeline run, and how the driver reaches them.

    What the driver may rely on:
    - `call(stage, method, *args, progress=None)` starts `method` on every process of `stage`
      (one encoder; every rank of the denoiser group; every decoder) and returns a StageCall
      without waiting unless the executor is not `concurrent`. A StageCall among `args` is that
      call's result, handed from stage to stage without passing through the driver where the
      executor `crosses_processes`. `progress(done, total)` is called with the stage's steps,
      from the driver's thread, while it waits.
    - `wait(*calls)` returns when every call has finished; a failure raises StageFailed at once,
      blamed on the first of `calls` (in the order given) that failed, and the stage is made
      ready for the next job where the executor can mend it. An executor that waits in steps
      ends the wait early when a call's `check` raises.
    - `get(call)` is the stage's result (the first process's: a denoiser group's ranks agree),
      `gather(call)` every process's (each decoder's tiles), `reports(call)` every process's
      figures (start, end, output bytes, the stage's own); each waits for the call first.
    - `devices()` names the device of each stage; `close()` releases what the executor made.
    - `detach(call)` is the call with its results held where they outlive the stage's processes
      (in-process results already do).
    - `decoders` is how many decoders share a video's tiles.
    """

    name: str
    concurrent: bool  # a call returns at once: stages can work on different jobs at the same time
    crosses_processes: bool  # results are copied between processes (and counted as moved)
    decoders: int

    @abstractmethod
    def call(self, stage: Stage, method: Method, *args: Any, progress: StepCallback | None = None) -> StageCall: ...

    @abstractmethod
    def wait(self, *calls: StageCall) -> None: ...

    @abstractmethod
    def get(self, call: StageCall) -> Any: ...

    @abstractmethod
    def gather(self, call: StageCall) -> list[Any]: ...

    @abstractmethod
    def reports(self, call: StageCall) -> list[dict[str, Any]]: ...

    @abstractmethod
    def devices(self) -> dict[str, str]: ...

    @abstractmethod
    def close(self) -> None: ...

    def detach(self, call: StageCall) -> StageCall:
        return call


class LocalExecutor(Executor):
    """Every stage in this process, one call after another: for debugging and tests."""

    name = "local"
    concurrent = False  # a call returns when its work is done: jobs run one at a time
    crosses_processes = False  # results are passed by reference; nothing is copied between stages
    decoders = 1

    def __init__(self, spec: ModelSpec, weights: Path):
        self.stages = {stage: cls(spec, weights) for stage, cls in MODEL_STAGES.items()}
        self.stages[Stage.MEASURE] = ClarityStage()

    def devices(self) -> dict[str, str]:
        return {stage: s.describe() for stage, s in self.stages.items()}

    def call(self, stage: Stage, method: Method, *args: Any, progress: StepCallback | None = None) -> StageCall:
        stage, method = Stage(stage), Method(method)
        kwargs = {"on_step": progress} if progress else {}
        try:
            value, report = run_stage_method(self.stages[stage], method, call_arguments(args, 0), kwargs)
        except Exception as e:
            raise StageFailed(stage, e) from e
        return StageCall(stage, [value], [report])

    def wait(self, *calls: StageCall) -> None:
        """Nothing to wait for: a local call has finished when `call` returns."""

    def get(self, call: StageCall) -> Any:
        return call.value

    def gather(self, call: StageCall) -> list[Any]:
        return list(call.values)

    def reports(self, call: StageCall) -> list[dict[str, Any]]:
        return list(call.reports)

    def close(self) -> None:
        self.stages.clear()


class ProgressRelay:
    """Step progress of calls running in actors, relayed to callbacks in the driver while it waits."""

    def __init__(self):
        self._followed: dict[str, tuple[Any, StepCallback, list[ray.ObjectRef]]] = {}
        self._seen: dict[str, tuple[int, int]] = {}

    def follow(self, actor, progress_id: str, callback: StepCallback, refs: list[ray.ObjectRef]) -> None:
        """Relay `actor`'s progress for call `progress_id` until `refs` (the call's results) are ready."""
        self._followed[progress_id] = (actor, callback, refs)

    def relay(self) -> None:
        followed = list(self._followed.items())
        if not followed:
            return
        finished = {pid for pid, (_, _, refs) in followed if not ray.wait(refs, num_returns=len(refs), timeout=0)[1]}
        states = [actor.progress.remote(pid) for pid, (actor, _, _) in followed]
        answered, _ = ray.wait(states, num_returns=len(states), timeout=PROGRESS_ANSWER_S)
        for (pid, (_, callback, _)), state_ref in zip(followed, states, strict=True):
            if state_ref not in answered:  # no news this time; never hold the driver up for progress
                continue
            try:
                state = ray.get(state_ref)
            except ray.exceptions.RayError:  # the call failed with its actor; `wait` reports it
                state, finished = None, finished | {pid}
            if state is not None and state != self._seen.get(pid):
                self._seen[pid] = state
                callback(*state)
            if pid in finished:  # its last state was asked after it ended, so it has been relayed
                del self._followed[pid]
                self._seen.pop(pid, None)


def wait_relaying_progress(refs: list[ray.ObjectRef], relay: ProgressRelay, poll_s: float = 0.2) -> None:
    """Block until every ref is ready, relaying progress meanwhile. A failed ref raises at once
    (within `poll_s`), not when the others finish."""
    pending = list(refs)
    while True:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
        ray.get(ready)  # raises a failed call's error
        relay.relay()
        if not pending:
            return


def side_resources(plan: ResourcePlan, stage: str, index: int) -> ActorResources:
    """What side actor `index` of `stage` (encode, decode or measure) asks of Ray under `plan`."""
    return plan.decode[index] if stage == "decode" else getattr(plan, stage)


def side_actor_stays(old: ActorResources | None, new: ActorResources, regroup: bool) -> bool:
    """Whether a side actor that asked for `old` (None: there is none) can host its stage anew
    when a reload gives it `new`: its resources are the same, and it does not live in a bundle
    of the denoiser group's placement group when that group is being replaced (`regroup`)."""
    return old is not None and old == new and not (regroup and old.beside_rank is not None)


class DenoiserGroup(ActorGroup):
    """One denoiser group: `layout.world_size` ranks of `DenoiserStage`, one per bundle of a
    placement group, joined as one process group, called as one. The one host of a group, for
    the Ray executor (which places it in a placement group of its own) and for a Serve replica
    (`within` the replica's placement group).

    As vLLM's executor does with its workers, a call goes to every rank: they work on the same
    video together, and rank 0's result stands for the group's (the others keep none).
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: Path,
        layout: ParallelLayout,
        rank: ActorResources,
        bundle: dict[str, float],
        strategy: str = "STRICT_PACK",
        within: Any = None,
    ):
        self.layout = layout
        kwargs = self._stage_kwargs(layout)
        super().__init__(DenoiserStage, (spec, weights), kwargs, layout.world_size, rank, bundle, strategy, within)

    @staticmethod
    def _stage_kwargs(layout: ParallelLayout) -> dict[str, Any]:
        return {"layout": layout, "collective_timeout_s": COLLECTIVE_TIMEOUT_S}

    def rebuild(self, spec: ModelSpec, weights: Path, layout: ParallelLayout) -> list[ray.ObjectRef]:
        """Every rank builds its stage anew for this model and layout, of the group's world size,
        in its same process and process group (collectively: the stage makes its subgroups)."""
        if layout.world_size != self.size:
            raise ValueError(f"a group of {self.size} ranks cannot take layout {layout} ({layout.world_size} ranks)")
        self.layout = layout
        return [actor.rebuild.remote(spec, weights, **self._stage_kwargs(layout)) for actor in self.actors]

    def call(self, method: str, *args: Any, progress_id: str | None = None) -> list[tuple[Any, Any]]:
        """`method` on every rank: (result ref, report ref) per rank; only rank 0 keeps its result.
        An argument that is not already in the object store is put there once, for every rank."""
        args = tuple(a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args)
        return [
            actor.call.remote(method, *args, progress_id=progress_id, keep_result=rank == 0)
            for rank, actor in enumerate(self.actors)
        ]

    def progress(self, progress_id: str | None = None) -> ray.ObjectRef:
        """Rank 0's steps done in call `progress_id` (with None: whether it answers at all)."""
        return self.actors[0].progress.remote(progress_id)

    def pings(self) -> list[ray.ObjectRef]:
        """One answer per rank: a rank that died fails its ref."""
        return [actor.progress.remote() for actor in self.actors]


def check_levers_on_cluster(spec: ModelSpec, layout: ParallelLayout) -> None:
    """The model's levers against the connected cluster's devices, before any actor loads weights
    (each denoiser stage checks its own GPU's capability again)."""
    device_type = "cuda" if ray.cluster_resources().get("GPU", 0) else "cpu"
    problem = lever_problem(spec, device_type, ranks=layout.world_size)
    if problem:
        raise InvalidRequest(problem)


class RayExecutor(Executor):
    """The encoder in an actor, the decoders in one actor each, the denoiser as a group of
    `layout.world_size` ranks, and the clarity panel in an actor of its own (on CPU cores, so
    that measuring a finished video never holds up a GPU stage).

    As vLLM's executor does with its workers, the driver calls a stage's method and the call
    goes to every actor of the stage: the denoiser ranks work on the same video together (rank
    0's result stands for the group's), the decoders each decode their share of its tiles.
    """

    name = "ray"
    concurrent = True  # a call returns at once: stages can work on different jobs at the same time
    crosses_processes = True

    def __init__(
        self,
        spec: ModelSpec,
        weights: Path,
        layout: ParallelLayout | None = None,
        cluster_layout: ClusterLayout | None = None,
        decoders: int = 1,
        replicas: int = 1,
        encoder: bool = True,
        mend_actors: bool = True,
    ):
        """`mend_actors`: a dead encoder, decoder or panel actor is replaced in place (when this
        executor is the only pipeline); otherwise its death takes the denoiser group down with it,
        so that every later job fails at once as not run, and whoever runs several pipelines
        replaces the whole one (`cluster.replicas`: its node may be lost, and a replacement placed
        on a dead node's bundles would wait for room that never comes)."""
        self.spec, self.weights = spec, weights
        self.mend_actors = mend_actors
        self.layout = layout or ParallelLayout()
        self.cluster_layout = cluster_layout or load_cluster_layout("single-node")
        # One of `replicas` executors sharing the cluster (a sweep's); its actors take its share.
        self.replicas = replicas
        self.plan = plan_resources(workers=self.layout.world_size, decoders=decoders, replicas=replicas)
        self.group: DenoiserGroup | None = None
        self.side: dict[str, list[Any]] = {"encode": [], "decode": [], "measure": []}
        self.decoders = decoders
        self.denoiser_down: StageFailed | None = None  # set when a failure tore the denoiser group down
        self.progress = ProgressRelay()
        try:
            # The group's placement group first, so that the side actors never take a GPU that a rank needs.
            self.group = self._place_group()
            self.side["encode"] = [self._side_actor("encode", 0)] if encoder else []
            self.side["decode"] = [self._side_actor("decode", d) for d in range(decoders)]
            self.side["measure"] = [self._side_actor("measure", 0)]
            starting = {stage: [a.start.remote() for a in actors] for stage, actors in self.side.items()}
            starting["denoise"] = self.group.start()
            ray.get([ref for refs in starting.values() for ref in refs], timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(
                f"stage actors did not start within {ACTOR_START_TIMEOUT_S:.0f} s; "
                f"the cluster has {ray.cluster_resources()}"
            ) from None
        except BaseException:
            self.close()
            raise
        self._devices = {stage: ray.get(refs[0]) for stage, refs in starting.items() if refs}  # first actor of each

    def _side_actor(self, stage: str, index: int):
        stage_class = ClarityStage if stage == Stage.MEASURE else MODEL_STAGES[Stage(stage)]
        args, kwargs = self._side_arguments(stage, index)
        return self.group.side_actor(side_resources(self.plan, stage, index), stage_class, *args, **kwargs)

    def _side_arguments(self, stage: str, index: int) -> tuple[tuple, dict[str, Any]]:
        """What the stage of side actor `index` is built from."""
        if stage == "measure":
            return (), {}  # the clarity panel has no model
        if stage == "encode":
            return (self.spec, self.weights), {}
        return (self.spec, self.weights), {"rank": index, "decoders": len(self.plan.decode)}

    def _place_group(self) -> DenoiserGroup:
        """A denoiser group for this executor's model, layout and plan, in a placement group of
        its own (not started: `start()` builds its stages)."""
        plan, placement = self.plan, self.cluster_layout.denoiser_placement
        return DenoiserGroup(self.spec, self.weights, self.layout, plan.denoise, plan.bundle, placement)

    def reload(
        self,
        spec: ModelSpec,
        weights: Path,
        layout: ParallelLayout | None = None,
        decoders: int | None = None,
        encoder: bool | None = None,
    ) -> None:
        """Another model, another layout, another number of decoders, or the encoder added or
        dropped (None keeps what the executor has), in this executor's actors where they can
        stay: every stage is built anew in the process that hosted the old one. A process starts
        only for an actor that was not there or must move: the denoiser ranks when the world size
        or the ranks' resources change, or when a failure tore their group down (a new group in a
        placement group of its own), and a side actor that the new plan gives other resources or
        that lived in the old group's bundles.
        A driver that goes from model to model or layout to layout (a test suite, a notebook, a
        sweep over workers) saves a process start per actor that stays, which costs more than
        loading a small model. If a stage fails to build, the executor is closed.
        """
        layout = layout or ParallelLayout()
        decoders = self.decoders if decoders is None else decoders
        encoder = bool(self.side["encode"]) if encoder is None else encoder
        plan = plan_resources(workers=layout.world_size, decoders=decoders, replicas=self.replicas)
        regroup = (
            self.denoiser_down is not None  # a failure tore the group down: a new one takes its place
            or not self.group.actors  # closed (a reload that failed)
            or layout.world_size != self.layout.world_size
            or (plan.denoise, plan.bundle) != (self.plan.denoise, self.plan.bundle)
        )
        old_plan, self.plan = self.plan, plan
        self.spec, self.weights, self.layout, self.decoders = spec, weights, layout, decoders
        counts = {"encode": int(encoder), "decode": decoders, "measure": 1}
        try:
            # The side actors that cannot stay go first, as the old group does: their devices may
            # be what the new group needs (as in __init__, the ranks are placed before the side
            # actors). Their replacements come after it: one may live in a bundle of the new group.
            kept: dict[str, list[Any]] = {}  # per stage, per index: the actor that stays, or None
            for stage, count in counts.items():
                actors, kept[stage] = self.side[stage], []
                for index, actor in enumerate(actors):
                    old = side_resources(old_plan, stage, index)
                    if index < count and side_actor_stays(old, side_resources(plan, stage, index), regroup):
                        kept[stage].append(actor)
                        continue
                    ray.kill(actor)
                    if index < count:
                        kept[stage].append(None)
                kept[stage] += [None] * (count - len(kept[stage]))
                actors[:] = [actor for actor in kept[stage] if actor is not None]  # for close() if the rest fails
            if regroup:
                self.group.close()
                self.group = self._place_group()
                self.denoiser_down = None
                building = {"denoise": self.group.start()}
            else:
                building = {"denoise": self.group.rebuild(spec, weights, layout)}
            for stage, slots in kept.items():
                building[stage] = []
                for index, actor in enumerate(slots):
                    if actor is None:
                        slots[index] = actor = self._side_actor(stage, index)
                        self.side[stage].append(actor)
                        building[stage].append(actor.start.remote())
                    else:
                        args, kwargs = self._side_arguments(stage, index)
                        building[stage].append(actor.rebuild.remote(*args, **kwargs))
                self.side[stage][:] = slots  # in index order
            ray.get([ref for refs in building.values() for ref in refs], timeout=ACTOR_START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self._devices = {stage: ray.get(refs[0]) for stage, refs in building.items() if refs}

    def devices(self) -> dict[str, str]:
        return dict(self._devices)

    def detach(self, call: StageCall) -> StageCall:
        """The call's results and reports, copied into objects of the driver's own node: they
        outlive the stage's actors and their node (a sweep's one encoding of its prompt, which
        every replica uses)."""
        self.wait(call)
        call.deliveries += 1

        def copy(refs: list[Any]) -> list[Any]:
            return [ray.put(ray.get(ref)) if isinstance(ref, ray.ObjectRef) else ref for ref in refs]

        return StageCall(call.stage, copy(call.values), copy(call.reports))

    def actors(self, stage: str) -> list[Any]:
        if self.denoiser_down is not None:  # the jobs after it cannot be denoised; say why
            raise self.denoiser_down
        if stage == "encode" and not self.side["encode"]:
            raise ValueError("this executor was built without a text encoder; encode the prompts elsewhere")
        return self.group.actors if stage == "denoise" else self.side[stage]

    def call(self, stage: Stage, method: Method, *args: Any, progress: StepCallback | None = None) -> StageCall:
        stage, method = Stage(stage), Method(method)
        actors = self.actors(stage)
        args = call_arguments(args, len(actors))
        progress_id = uuid.uuid4().hex if progress is not None else None
        if stage == Stage.DENOISE:
            calls = self.group.call(method, *args, progress_id=progress_id)
        else:
            calls = [actor.call.remote(method, *args, progress_id=progress_id) for actor in actors]
        call = StageCall(stage, [value for value, _ in calls], [report for _, report in calls])
        if progress is not None:
            self.progress.follow(actors[0], progress_id, progress, call.values + call.reports)
        return call

    def wait(self, *calls: StageCall) -> None:
        """Block until every call has finished, relaying step progress of followed calls meanwhile.

        A failure raises StageFailed at once, blamed on the first of `calls` (in the order
        given) that failed: a stage whose input failed fails too, and the blame belongs upstream.
        The failed stage is made ready for the next job: dead encoder or decoder actors are
        replaced (calls already queued on a dead actor fail with it). A denoiser group in which
        a rank failed is torn down (its other ranks would wait in a collective until it times
        out), and so are the actors placed in its bundles; every later job fails, saying why, until
        `reload` gives the executor a new group.
        """
        try:
            wait_relaying_progress([ref for c in calls for ref in c.values + c.reports], self.progress)
        except ray.exceptions.RayError:
            if self.denoiser_down is not None:
                raise self.denoiser_down from None
            for call in calls:
                refs = call.values + call.reports
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                try:
                    ray.get(ready)
                except ray.exceptions.RayError as e:
                    failed = StageFailed(call.stage, e)
                    self._recover(failed)
                    raise failed from e
            raise

    def _recover(self, failed: StageFailed) -> None:
        if failed.stage == "denoise" or (failed.actor_lost and not self.mend_actors):
            self.group.close()
            after = "a job failed in it" if failed.stage == "denoise" else f"its {failed.stage} actor was lost"
            self.denoiser_down = StageFailed(
                "denoise", RuntimeError(f"the denoiser group was shut down after {after} ({failed})")
            )
            self.denoiser_down.stage_down = True
            return
        if not self.mend_actors:
            return  # the stage raised: its actors live (one that died is the pool's to replace, with its replica)
        for index, actor in enumerate(self.side[failed.stage]):
            try:
                ray.get(actor.progress.remote(), timeout=ACTOR_PING_TIMEOUT_S)
                continue  # alive: the stage raised, its actor is fine
            except ray.exceptions.RayError:  # died, unreachable, or gone with its placement group
                pass
            ray.kill(actor)
            self.side[failed.stage][index] = replacement = self._side_actor(failed.stage, index)
            try:
                ray.get(replacement.start.remote(), timeout=ACTOR_START_TIMEOUT_S)
            except ray.exceptions.RayError as e:
                why = RuntimeError(f"could not replace its dead actor {index} ({failed}): {e}")
                lost = StageFailed(failed.stage, why)
                lost.actor_lost = True  # the job's actor died: nothing the job did
                raise lost from e

    def get(self, call: StageCall) -> Any:
        """The stage's result, brought to the driver."""
        self.wait(call)
        call.deliveries += 1
        return ray.get(call.value)

    def gather(self, call: StageCall) -> list[Any]:
        """Every actor's result, brought to the driver (e.g. each decoder's tiles)."""
        self.wait(call)
        call.deliveries += 1
        return ray.get(call.values)

    def reports(self, call: StageCall) -> list[dict[str, Any]]:
        self.wait(call)
        return ray.get(call.reports)

    def close(self) -> None:
        for actors in self.side.values():
            for actor in actors:
                ray.kill(actor)
            actors.clear()
        if self.group is not None:
            self.group.close()
