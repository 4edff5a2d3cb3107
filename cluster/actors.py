"""The Ray actor that hosts one stage. The stage owns its device; the actor only runs its methods."""

from __future__ import annotations

import time
from typing import Any

import ray


@ray.remote
class StageActor:
    """Builds `stage_class(*args)` in its own process and runs its methods on request.

    Created with max_concurrency=2 so that `progress` answers while a long call runs.
    """

    def __init__(self, stage_class: type, *args: Any):
        self.stage = stage_class(*args)
        self._progress: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        return self.stage.describe()

    def progress(self) -> tuple[int, int]:
        return self._progress

    def _on_step(self, done: int, total: int) -> None:
        self._progress = (done, total)

    @ray.method(num_returns=2)
    def call(self, method: str, *args: Any, track_progress: bool = False) -> tuple[Any, tuple[float, float]]:
        """Run `stage.method(*args)`; returns its result and its (start, end) wall-clock span."""
        kwargs = {}
        if track_progress:
            self._progress = (0, 0)
            kwargs["on_step"] = self._on_step
        start = time.time()
        result = getattr(self.stage, method)(*args, **kwargs)
        return result, (start, time.time())
