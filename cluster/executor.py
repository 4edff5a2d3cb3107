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

from cluster.actors import StageActor
from cluster.runtime import STAGES, stage_resources
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

    def get(self, value: Any) -> Any:
        return value

    def close(self) -> None:
        self.stages.clear()


class RayExecutor:
    """One actor per stage (encoder, denoiser, decoder), each asking for its own GPU share."""

    name = "ray"

    def __init__(self, spec: ModelSpec, weights: Path):
        resources = stage_resources()
        self.actors = {
            stage: StageActor.options(
                num_gpus=resources[stage].num_gpus,
                num_cpus=resources[stage].num_cpus,
                runtime_env={"env_vars": resources[stage].env} if resources[stage].env else None,
            ).remote(STAGE_CLASSES[stage], spec, weights)
            for stage in STAGES
        }
        ready = [a.describe.remote() for a in self.actors.values()]
        try:
            described = ray.get(ready, timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(
                f"stage actors did not start within {ACTOR_START_TIMEOUT_S:.0f} s: each asks for "
                f"{resources['encode'].num_gpus} GPU; the cluster has {ray.cluster_resources()}"
            ) from None
        self._devices = dict(zip(STAGES, described, strict=True))

    def devices(self) -> dict[str, str]:
        return dict(self._devices)

    def call(self, stage: str, method: str, *args: Any, on_step: StepCallback | None = None) -> StageCall:
        actor = self.actors[stage]
        progress_id = uuid.uuid4().hex if on_step is not None else None
        value, span = actor.call.remote(method, *args, progress_id=progress_id)
        if on_step is not None:
            self._follow(actor, progress_id, value, on_step)
        return StageCall(value, span)

    @staticmethod
    def _follow(actor, progress_id: str, value: ray.ObjectRef, on_step: StepCallback, poll_s: float = 0.2) -> None:
        """Relay the actor's step progress for this call to `on_step` until the call finishes."""
        seen = 0
        while True:
            ready, _ = ray.wait([value], timeout=poll_s)
            call_id, done, total = ray.get(actor.progress.remote())
            if call_id == progress_id and done != seen:
                on_step(done, total)
                seen = done
            if ready:
                return

    def get(self, value: Any) -> Any:
        return ray.get(value)

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
