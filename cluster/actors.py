"""The Ray actor that hosts one stage. The stage owns its device; the actor only runs its methods."""

from __future__ import annotations

import dataclasses
import gc
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import ray

PROGRESS_KEPT = 16  # calls whose progress an actor remembers (a poller may ask after the call ended)


@ray.remote(concurrency_groups={"progress": 1})
class StageActor:
    """Builds `stage_class(*args, **kwargs)` in its own process (on `start`) and runs its methods.

    The stage is built in `start`, not in the constructor, so that the ranks of a denoiser group
    can first join their process group (`join_process_group`): the stage's constructor then
    finds torch.distributed ready. Calls run one at a time, in the order one caller submitted
    them, even when their arguments become ready out of order (Ray's ordering for actors that
    run one call at a time): every rank of a denoiser group therefore takes the jobs of a
    stream in the same order. `progress` has a thread of its own (concurrency group), so that
    it answers while a long call runs.
    """

    def __init__(self, stage_class: type, *args: Any, **kwargs: Any):
        self._build = (stage_class, args, kwargs)
        self.stage = None
        self._progress: OrderedDict[str, tuple[int, int]] = OrderedDict()  # call id -> (done, total)

    def start(self) -> str:
        """Build the stage (loads its model onto its device); returns the device's description."""
        stage_class, args, kwargs = self._build
        self.stage = build_without_gc(stage_class, *args, **kwargs)
        return self.stage.describe()

    def rebuild(self, *args: Any, **kwargs: Any) -> str:
        """Build the stage anew from these arguments, in this same process; returns its device.

        Loading another model into a live process is much cheaper than a new process, whose
        start (importing torch and diffusers) costs seconds of CPU (see RayExecutor.reload).
        """
        self.stage = None  # the old model goes before the new one loads
        gc.unfreeze()  # and with it what the last build froze (see build_without_gc)
        gc.collect()
        self._build = (self._build[0], args, kwargs)
        return self.start()

    def describe(self) -> str:
        return self.stage.describe()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port that is free on it, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join_process_group(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> str:
        """Initialise torch.distributed: NCCL between GPUs, gloo between CPU processes.

        A rank already in a process group leaves it first, and its stage goes with it (the
        stage's subgroups belong to that group): the first ranks of a group can form a smaller
        one in the same processes, then `rebuild` their stage for it.
        """
        import torch  # here, not at the top: an actor whose stage needs no torch (the panel) never imports it
        import torch.distributed as dist

        if dist.is_initialized():
            self.stage = None
            dist.destroy_process_group()
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
    def progress(self, progress_id: str | None = None) -> tuple[int, int] | None:
        """(steps done, total steps) of the call with this id, None if it has not reported yet.

        Answers while a long call runs (its own thread), so it doubles as a liveness check.
        """
        return self._progress.get(progress_id)

    @ray.method(num_returns=2)
    def call(
        self, method: str, *args: Any, progress_id: str | None = None, keep_result: bool = True
    ) -> tuple[Any, dict[str, Any]]:
        """Run `stage.method(*args)`; returns its result and its report (see `run_stage_method`).

        With a progress_id, the stage's per-step callback is recorded under that id, so a
        poller never mistakes an earlier call's progress for this one's. Without keep_result the
        result is dropped here (the ranks of a group all compute it; one copy goes on).
        """
        kwargs = {}
        if progress_id is not None:

            def on_step(done: int, total: int) -> None:
                self._progress[progress_id] = (done, total)
                while len(self._progress) > PROGRESS_KEPT:
                    self._progress.popitem(last=False)

            kwargs["on_step"] = on_step
        result, report = run_stage_method(self.stage, method, args, kwargs)
        if not keep_result:
            result, report["output_bytes"] = None, 0
        return result, report


def build_without_gc(build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`build(*args, **kwargs)` with Python's cyclic garbage collector paused, then everything
    built moved out of its sight (`gc.freeze`).

    A stage's build is mostly imports (diffusers, transformers: a process's first build costs
    about 6 s of CPU and makes several hundred thousand objects, none of them garbage), and the
    collector walks the young objects every 700 allocations: paused, the build costs 13 to 31 %
    less CPU (bench/stage_build.py). Frozen, the model and the modules are not walked again by
    every later full collection (about 0.3 s each); `StageActor.rebuild` unfreezes them first.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return build(*args, **kwargs)
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


def run_stage_method(stage: Any, method: str, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`stage.method(*args, **kwargs)` and its report: wall-clock start and end, the bytes of
    tensors and arrays in its result, where it ran (`where_this_runs`, and the stage's device),
    and the stage's own figures for the call (peak memory...)."""
    start = time.time()
    result = getattr(stage, method)(*args, **kwargs)
    report = {"start": start, "end": time.time(), "output_bytes": payload_bytes(result), **where_this_runs()}
    if hasattr(stage, "describe"):
        report["device"] = stage.describe()
    if hasattr(stage, "last_run_stats"):
        report.update(stage.last_run_stats())
    return result, report


def where_this_runs() -> dict[str, str]:
    """This process's host name, and its Ray node's id ("" outside Ray)."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"host": socket.gethostname(), "node": node}


def payload_bytes(value: Any) -> int:
    """Bytes of the tensors and arrays in `value` (through dataclasses, lists, tuples and dicts)."""
    torch = sys.modules.get("torch")  # not imported: then `value` holds no tensor
    if torch is not None and isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(payload_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    return 0
