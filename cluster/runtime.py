"""Starting or joining Ray, and what each stage actor asks of it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ray

STAGES = ("encode", "denoise", "decode")


def connect(address: str | None = None, quiet: bool = False) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); otherwise start an embedded local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=not quiet,
        configure_logging=not quiet,
        logging_level="ERROR" if quiet else "INFO",
    )


@dataclass(frozen=True)
class ActorResources:
    num_gpus: float
    num_cpus: float
    env: dict[str, str]


def stage_resources(cluster: dict[str, float] | None = None) -> dict[str, ActorResources]:
    """One actor per stage, each with its own GPU when there are enough; a share of one otherwise.

    Without GPUs the actors share the CPU cores: they ask for no CPU (so three stages fit on a
    two-core machine) and each may use every core, since one job's stages run one after another.
    (Single node for now: the thread count is the cluster's CPU count.)
    `cluster` is Ray's cluster_resources() (read from the running Ray when not given).
    """
    cluster = ray.cluster_resources() if cluster is None else cluster
    gpus = int(cluster.get("GPU", 0))
    if gpus >= len(STAGES):
        share = 1.0
    elif gpus > 0:
        # A fractional request must fit on one GPU, so pack ceil(stages/gpus) actors per GPU:
        # 2 GPUs -> 0.5 each (two actors on one GPU, one on the other); 1 GPU -> 0.33 each.
        share = math.floor(100 / math.ceil(len(STAGES) / gpus)) / 100
    else:
        share = 0.0
    env = {} if share else {"OMP_NUM_THREADS": str(max(1, int(cluster.get("CPU", 1))))}
    return {stage: ActorResources(num_gpus=share, num_cpus=0, env=env) for stage in STAGES}
