"""The Ray actor that hosts one stage. The stage owns its device; the actor only runs its methods."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist


@ray.remote(concurrency_groups={"progress": 1})
class StageActor:
    """Builds `stage_class(*args, **kwargs)` in its own process (on `start`) and runs its methods.

    The stage is built in `start`, not in the constructor, so that the ranks of a denoiser group
    can first join their process group (`join_process_group`): the stage's constructor then
    finds torch.distributed ready. Calls run one at a time; `progress` has a thread of its own
    (concurrency group), so that it answers while a long call runs.
    """

    def __init__(self, stage_class: type, *args: Any, **kwargs: Any):
        self._build = (stage_class, args, kwargs)
        self.stage = None
        self._progress: tuple[str | None, int, int] = (None, 0, 0)

    def start(self) -> str:
        """Build the stage (loads its model onto its device); returns the device's description."""
        stage_class, args, kwargs = self._build
        self.stage = stage_class(*args, **kwargs)
        return self.stage.describe()

    def describe(self) -> str:
        return self.stage.describe()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port that is free on it, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join_process_group(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> str:
        """Initialise torch.distributed: NCCL between GPUs, gloo between CPU processes."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray makes this rank's GPU the only visible one
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        return backend

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
