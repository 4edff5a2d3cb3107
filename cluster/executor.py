"""Executors run stage methods: in this process (`--local`), or in one Ray actor per stage.

The driver calls `executor.call(stage, method, *args)` and gets a StageCall back. In the Ray
executor its value is an ObjectRef: the next stage receives the ref and Ray hands the tensor
straight from actor to actor, so embeddings and latents never pass through the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from cluster.actors import StageActor
from cluster.runtime import STAGES, stage_resources
from stages.decoder import DecoderStage
from stages.denoiser import DenoiserStage
from stages.models import ModelSpec
from stages.text_encoder import TextEncoderStage

STAGE_CLASSES: dict[str, type] = {
    "encode": TextEncoderStage,
    "denoise": DenoiserStage,
    "decode": DecoderStage,
}
ProgressCallback = Callable[[int, int], None]


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

    def call(self, stage: str, method: str, *args: Any, on_step: ProgressCallback | None = None) -> StageCall:
        kwargs = {"on_step": on_step} if on_step else {}
        start = time.time()
        value = getattr(self.stages[stage], method)(*args, **kwargs)
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
                max_concurrency=2,
                runtime_env={"env_vars": resources[stage].env} if resources[stage].env else None,
            ).remote(STAGE_CLASSES[stage], spec, weights)
            for stage in STAGES
        }
        self._devices = dict(zip(STAGES, ray.get([a.describe.remote() for a in self.actors.values()]), strict=True))

    def devices(self) -> dict[str, str]:
        return dict(self._devices)

    def call(self, stage: str, method: str, *args: Any, on_step: ProgressCallback | None = None) -> StageCall:
        actor = self.actors[stage]
        value, span = actor.call.remote(method, *args, track_progress=on_step is not None)
        if on_step is not None:
            self._follow(actor, value, on_step)
        return StageCall(value, span)

    @staticmethod
    def _follow(actor, value: ray.ObjectRef, on_step: ProgressCallback, poll_s: float = 0.2) -> None:
        """Relay the actor's step progress to `on_step` until the call finishes."""
        seen = (0, 0)
        while True:
            ready, _ = ray.wait([value], timeout=poll_s)
            progress = tuple(ray.get(actor.progress.remote()))
            if progress != seen and progress[1]:
                on_step(*progress)
                seen = progress
            if ready:
                return

    def get(self, value: Any) -> Any:
        return ray.get(value)

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
