"""The Ray actor that hosts one stage. The stage owns its device; the actor only runs its methods."""

from __future__ import annotations

import time
from typing import Any

import ray


@ray.remote(concurrency_groups={"progress": 1})
class StageActor:
    """Builds `stage_class(*args)` in its own process and runs its methods on request.

    Calls run one at a time; `progress` has a thread of its own (concurrency group), so that it
    answers while a long call runs.
    """

    def __init__(self, stage_class: type, *args: Any):
        self.stage = stage_class(*args)
        self._progress: tuple[str | None, int, int] = (None, 0, 0)

    def describe(self) -> str:
        return self.stage.describe()

    @ray.method(concurrency_group="progress")
    def progress(self) -> tuple[str | None, int, int]:
        """(id of the call that reported, steps done, total steps)."""
        return self._progress

    @ray.method(num_returns=2)
    def call(self, method: str, *args: Any, progress_id: str | None = None) -> tuple[Any, tuple[float, float]]:
        """Run `stage.method(*args)`; returns its result and its (start, end) wall-clock span.

        With a progress_id, the stage's per-step callback is recorded under that id, so a
        poller never mistakes an earlier call's progress for this one's.
        """
        kwargs = {}
        if progress_id is not None:

            def on_step(done: int, total: int) -> None:
                self._progress = (progress_id, done, total)

            kwargs["on_step"] = on_step
        start = time.time()
        result = getattr(self.stage, method)(*args, **kwargs)
        return result, (start, time.time())
