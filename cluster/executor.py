"""Executors run stage methods: in this process (`--local`), or in one Ray actor per stage.

The driver calls `executor.call(stage, method, *args)` and gets a StageCall back. In the Ray
executor its value is an ObjectRef: the next stage receives the ref and Ray hands the tensor
straight from actor to actor, so embeddings and latents never pass through the driver.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster.process_group import COLLECTIVE_TIMEOUT_S, ActorGroup
from cluster.runtime import STAGES, ClusterLayout, load_cluster_layout, plan_resources
from stages.context_parallel import ParallelLayout
from stages.decoder import DecoderStage
from stages.denoiser import DenoiserStage, StepCallback
from stages.models import ModelSpec
from stages.text_encoder import TextEncoderStage

STAGE_CLASSES: dict[str, type] = {
    "encode": TextEncoderStage,
    "denoise": DenoiserStage,
    "decode": DecoderStage,
}
ACTOR_START_TIMEOUT_S = float(os.environ.get("FRAMECAST_ACTOR_START_TIMEOUT", 900))


class StageFailed(RuntimeError):
    """A stage raised, or its actor died: the message names the stage and the root cause."""

    def __init__(self, stage: str, error: BaseException):
        cause = getattr(error, "cause", None) or error  # a RayTaskError carries the stage's own exception
        first_line = (str(cause).strip().splitlines() or [""])[0]
        super().__init__(f"{stage} stage failed: {type(cause).__name__}: {first_line}")
        self.stage = stage


@dataclass(frozen=True)
class StageCall:
    value: Any  # the stage's result (local) or an ObjectRef to it (Ray)
    span: Any  # (start, end) wall-clock seconds, or an ObjectRef to it


class LocalExecutor:
    """Every stage in this process: for debugging and tests."""

    name = "local"

    def __init__(self, spec: ModelSpec, weights: Path):
        self.stages = {stage: STAGE_CLASSES[stage](spec, weights) for stage in STAGES}

    def devices(self) -> dict[str, str]:
        return {stage: s.describe() for stage, s in self.stages.items()}

    def call(self, stage: str, method: str, *args: Any, on_step: StepCallback | None = None) -> StageCall:
        kwargs = {"on_step": on_step} if on_step else {}
        start = time.time()
        try:
            value = getattr(self.stages[stage], method)(*args, **kwargs)
        except Exception as e:
            raise StageFailed(stage, e) from e
        return StageCall(value, (start, time.time()))

    def rank_stats(self) -> list[dict[str, float]]:
        return [self.stages["denoise"].last_run_stats()]

    def get(self, value: Any) -> Any:
        return value

    def close(self) -> None:
        self.stages.clear()


class RayExecutor:
    """The encoder and decoder in one actor each; the denoiser as a group of `layout.world_size` ranks.

    The driver calls a stage's method and gets one result, as vLLM's executor does with its
    workers: for the denoiser group the call goes to every rank (they work on the same video
    together) and rank 0's result stands for the group's.
    """

    name = "ray"

    def __init__(
        self,
        spec: ModelSpec,
        weights: Path,
        layout: ParallelLayout | None = None,
        cluster_layout: ClusterLayout | None = None,
    ):
        self.layout = layout or ParallelLayout()
        self.cluster_layout = cluster_layout or load_cluster_layout("single-node")
        plan = plan_resources(workers=self.layout.world_size)
        self.group: ActorGroup | None = None
        self.actors: dict[str, Any] = {}
        try:
            # The group's placement group first, so that the encoder and decoder never take a
            # GPU that a rank needs.
            self.group = ActorGroup(
                DenoiserStage,
                (spec, weights),
                {"layout": self.layout, "collective_timeout_s": COLLECTIVE_TIMEOUT_S},
                self.layout.world_size,
                plan,
                self.cluster_layout.denoiser_placement,
            )
            for stage in ("encode", "decode"):
                self.actors[stage] = self.group.side_actor(plan.stages[stage], STAGE_CLASSES[stage], spec, weights)
            starts = [self.actors["encode"].start.remote(), self.actors["decode"].start.remote(), *self.group.start()]
            encode, decode, *ranks = ray.get(starts, timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(
                f"stage actors did not start within {ACTOR_START_TIMEOUT_S:.0f} s; "
                f"the cluster has {ray.cluster_resources()}"
            ) from None
        except BaseException:
            self.close()
            raise
        self.actors["denoise"] = self.group.actors[0]
        self._devices = {"encode": encode, "denoise": ranks[0], "decode": decode}

    def devices(self) -> dict[str, str]:
        return dict(self._devices)

    def call(self, stage: str, method: str, *args: Any, on_step: StepCallback | None = None) -> StageCall:
        progress_id = uuid.uuid4().hex if on_step is not None else None
        if stage == "denoise":
            calls = [actor.call.remote(method, *args, progress_id=progress_id) for actor in self.group.actors]
            spans = [span for _, span in calls]
            try:
                self._follow(self.group.actors[0], progress_id, spans, on_step)
            except Exception as e:  # the other ranks would wait in a collective until it times out
                self.group.close()
                raise StageFailed(stage, e) from e
            return StageCall(*calls[0])
        actor = self.actors[stage]
        value, span = actor.call.remote(method, *args, progress_id=progress_id)
        if on_step is not None:
            self._follow(actor, progress_id, [value], on_step)
        return StageCall(value, span)

    def rank_stats(self) -> list[dict[str, float]]:
        """Each denoiser rank's figures for the last job (peak memory, video tokens held)."""
        return ray.get([actor.call.remote("last_run_stats")[0] for actor in self.group.actors])

    @staticmethod
    def _follow(
        actor, progress_id: str | None, refs: list[ray.ObjectRef], on_step: StepCallback | None, poll_s: float = 0.2
    ) -> None:
        """Wait until every ref is ready, relaying `actor`'s step progress for this call to `on_step`.

        A ref that fails raises at once, not when the others finish.
        """
        pending, seen = list(refs), 0
        while True:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            ray.get(ready)  # raises a failed call's error
            if on_step is not None:
                call_id, done, total = ray.get(actor.progress.remote())
                if call_id == progress_id and done != seen:
                    on_step(done, total)
                    seen = done
            if not pending:
                return

    def get(self, value: Any) -> Any:
        return ray.get(value)

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
        if self.group is not None:
            self.group.close()
