"""Starting or joining Ray, and what each stage actor asks of it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

from stages.errors import InvalidRequest
from stages.models import CONFIG_DIR

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
    beside_rank: int | None = None  # run in the placement-group bundle of this denoiser rank


@dataclass(frozen=True)
class ResourcePlan:
    """What each stage actor asks of Ray; "denoise" is what each rank of the denoiser group asks."""

    stages: dict[str, ActorResources]
    bundle: dict[str, float]  # the placement-group bundle of one denoiser rank


# With as many GPUs as denoiser ranks and none spare, the encoder and decoder live beside the
# first ranks on their GPUs: a rank takes 0.8 of its bundle's GPU and leaves 0.1 to each.
RANK_SHARE_WHEN_SHARED = 0.8
SIDE_SHARE = 0.1


def plan_resources(cluster: dict[str, float] | None = None, workers: int = 1) -> ResourcePlan:
    """Resources for the encoder, the decoder and a denoiser group of `workers` ranks.

    With GPUs, every denoiser rank gets a whole GPU of its own (a bundle of the group's
    placement group); the encoder and decoder get a GPU each when two are spare, share one when
    one is, and otherwise take a small share of the first ranks' GPUs. Without GPUs the ranks
    split the cores (threads and a CPU share each), and the encoder and decoder ask for no CPU
    and may use every core, since a job's stages run one after another. (Single node for CPU:
    the thread count is the cluster's CPU count.)
    `cluster` is Ray's cluster_resources() (read from the running Ray when not given).
    """
    cluster = ray.cluster_resources() if cluster is None else cluster
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if gpus == 0:
        share = min(1.0, max(0.01, math.floor(100 * cpus / workers) / 100))  # Ray refuses empty bundles
        every_core = {"OMP_NUM_THREADS": str(cpus)}
        side = ActorResources(num_gpus=0, num_cpus=0, env=every_core)
        rank = ActorResources(num_gpus=0, num_cpus=share, env={"OMP_NUM_THREADS": str(max(1, cpus // workers))})
        return ResourcePlan({"encode": side, "denoise": rank, "decode": side}, bundle={"CPU": share})
    if gpus < workers:
        raise InvalidRequest(f"--workers {workers} needs {workers} GPUs (one per rank); the Ray cluster has {gpus}")
    spare = gpus - workers
    if spare >= 2:
        encode = decode = ActorResources(num_gpus=1.0, num_cpus=0, env={})
        rank = 1.0
    elif spare == 1:  # both on the spare GPU
        encode = decode = ActorResources(num_gpus=0.5, num_cpus=0, env={})
        rank = 1.0
    else:
        encode = ActorResources(num_gpus=SIDE_SHARE, num_cpus=0, env={}, beside_rank=0)
        decode = ActorResources(num_gpus=SIDE_SHARE, num_cpus=0, env={}, beside_rank=min(1, workers - 1))
        rank = RANK_SHARE_WHEN_SHARED
    denoise = ActorResources(num_gpus=rank, num_cpus=0, env={})
    return ResourcePlan({"encode": encode, "denoise": denoise, "decode": decode}, bundle={"GPU": 1.0})


PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclass(frozen=True)
class ClusterLayout:
    """A `configs/cluster/*.yaml`: how a denoiser group's ranks are placed on the cluster's nodes."""

    name: str
    description: str = ""
    # Ray placement strategy of the group's bundles. STRICT_PACK keeps every rank on one node
    # (NVLink); PACK fills one node and spills onto the next, so consecutive ranks (a Ulysses
    # group) stay together and the ring crosses nodes.
    denoiser_placement: str = "STRICT_PACK"


def cluster_layouts_dir() -> Path:
    return CONFIG_DIR / "cluster"


def load_cluster_layout(name: str) -> ClusterLayout:
    path = cluster_layouts_dir() / f"{name}.yaml"
    known = sorted(p.stem for p in cluster_layouts_dir().glob("*.yaml"))
    if not path.is_file():
        raise InvalidRequest(f"unknown cluster layout {name!r}; known: {', '.join(known)}")
    raw = yaml.safe_load(path.read_text()) or {}
    layout = ClusterLayout(name=name, **{k: v for k, v in raw.items() if k != "name"})
    if layout.denoiser_placement not in PLACEMENT_STRATEGIES:
        raise InvalidRequest(
            f"{path}: denoiser_placement {layout.denoiser_placement!r} is not one of {', '.join(PLACEMENT_STRATEGIES)}"
        )
    return layout
