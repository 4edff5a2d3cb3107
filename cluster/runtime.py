"""Starting or joining Ray, and what each stage actor asks of it."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

from stages.errors import InvalidRequest
from stages.models import CONFIG_DIR


def connect(address: str | None = None, quiet: bool = False, log_file: Path | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); otherwise start an embedded local Ray
    ("local" asks for one even where a `ray start` cluster runs on this machine).

    `log_file`: Ray's and Serve's own lines go there rather than to the terminal (errors are still
    shown), and an embedded Ray listens on 127.0.0.1 alone: `framecast serve`."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    options = {}
    if log_file is not None:
        _log_ray_to(log_file)
        if address in (None, "local"):
            options["runtime_env"] = _listen_on_loopback()
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=not quiet and log_file is None,
        configure_logging=log_file is not None or not quiet,
        logging_level="INFO" if log_file is not None or not quiet else "ERROR",
        **options,
    )
    if log_file is not None or quiet:
        _route_published_lines(into_log=log_file is not None)


def _log_ray_to(log_file: Path) -> None:
    """The `ray` and `ray.serve` loggers (Ray's banners, Serve's progress) write to `log_file`,
    and only their errors to stderr as well. (`import ray.serve` gives its logger a stderr handler
    of its own; ray.init keeps these, with configure_logging, as it would its own.)"""
    import logging

    from ray import serve  # noqa: F401 (first: importing it resets the ray.serve logger)

    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errors = logging.StreamHandler()
    errors.setLevel(logging.ERROR)
    for name in ("ray", "ray.serve"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [to_file, errors]
        logger.propagate = False


def _route_published_lines(into_log: bool) -> None:
    """What the cluster publishes to the driver (a worker that died: a paragraph on the OOM killer
    after every replica a test or an operator kills; a raylet lost) goes to the `ray` logger, so to
    the log file (`into_log`), or else to stderr, rather than stdout, which `--json` keeps for its
    JSON. Ray has no setting for it: its error thread prints even without log_to_driver, to stdout
    for a raylet's death. (Private; if a Ray release renames it, those lines print as before.)"""
    import logging

    import ray._private.worker as worker

    if not hasattr(worker, "print_to_stdstream"):
        return
    published = logging.getLogger("ray.published")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            published.warning("(%s) %s", data.get("pid", "cluster"), line)

    def to_stderr(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            print(f"({data.get('pid', 'cluster')}) {line}", file=sys.stderr)

    worker.print_to_stdstream = to_log if into_log else to_stderr


def _listen_on_loopback() -> dict:
    """An embedded Ray on 127.0.0.1 alone (GCS, raylet, agents, workers): Ray's own single-machine
    mode, as it runs on macOS and Windows, rather than its default of the machine's address on
    every interface. Serve's replicas bind their gRPC servers to [::] regardless: each worker
    process is set up to bind them to 127.0.0.1 (`loopback_serve_grpc`). Returns the runtime_env
    that does the latter."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # for the processes it starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init picks the node's address
    return {"worker_process_setup_hook": loopback_serve_grpc}


def loopback_serve_grpc() -> None:
    """In a Ray worker process: Serve's inter-deployment gRPC server listens on 127.0.0.1, not
    on every interface (Serve hard-codes "[::]:0" and has no setting for it)."""
    try:
        import ray.serve._private.replica as replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback", False):
        return

    def on_loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1"))

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback


@dataclass(frozen=True)
class ActorResources:
    num_gpus: float
    num_cpus: float
    env: dict[str, str]
    beside_rank: int | None = None  # run in the placement-group bundle of this denoiser rank


@dataclass(frozen=True)
class ResourcePlan:
    """What each stage actor asks of Ray: the encoder, each decoder, each denoiser rank, and the
    clarity panel (`measure`, CPU only)."""

    encode: ActorResources
    decode: tuple[ActorResources, ...]  # one per decoder
    denoise: ActorResources  # each rank of the denoiser group
    bundle: dict[str, float]  # the placement-group bundle of one denoiser rank
    measure: ActorResources


# With as many GPUs as denoiser ranks and none spare, the encoder and decoders live beside the
# ranks on their GPUs: a rank takes 0.8 of its bundle's GPU and leaves 0.2 to the side actors.
RANK_SHARE_WHEN_SHARED = 0.8
SIDE_SHARE = 0.2
# The clarity panel runs on CPU cores beside the GPUs: its budget (bench/clarity.py) is 5 s for a
# 49-frame 480x720 video on 2 cores.
MEASURE_CPUS = 2


def _share(total: float, count: int) -> float:
    """`total` split `count` ways, rounded down to a hundredth (never 0: Ray refuses empty requests)."""
    return max(0.01, math.floor(100 * total / count) / 100)


def replicas_that_fit(cluster: dict[str, float] | None = None, workers: int = 1) -> int:
    """How many pipeline replicas (each its own denoiser group of `workers` ranks, encoder,
    decoders and panel) the cluster has room for: a GPU per rank each, or a CPU core per rank."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    return max(1, (gpus or cpus) // workers)


def plan_resources(
    cluster: dict[str, float] | None = None, workers: int = 1, decoders: int = 1, replicas: int = 1
) -> ResourcePlan:
    """Resources for the encoder, `decoders` decoders and a denoiser group of `workers` ranks:
    one pipeline replica of `replicas` that share the cluster evenly (a sweep runs its cells on
    several), each planned as if its share were the whole cluster.

    With GPUs, every denoiser rank gets a whole GPU of its own (a bundle of the group's placement
    group). The encoder and the decoders (the side actors) get a GPU each when enough are spare,
    share the spare GPUs evenly when fewer are, and otherwise live beside the ranks in their
    bundles (the encoder beside rank 0, decoder d beside rank d+1, wrapping round).
    The clarity panel (`measure`) asks for no GPU: MEASURE_CPUS cores with GPUs.
    Without GPUs the ranks split the cores (a CPU share each, for placement); the side actors
    ask for no CPU, and every stage process gets an equal number of threads. (Single node for
    CPU: the thread count is the cluster's CPU count.)
    `cluster` is Ray's cluster_resources() (read from the running Ray when not given).
    """
    cluster = ray.cluster_resources() if cluster is None else cluster
    gpus, cpus = int(cluster.get("GPU", 0)) // replicas, max(1, int(cluster.get("CPU", 1)) // replicas)
    if gpus == 0 and cluster.get("GPU", 0):
        raise InvalidRequest(f"{replicas} replicas need a GPU each at least; the Ray cluster has {cluster['GPU']:g}")
    if gpus == 0:
        share = min(1.0, _share(cpus, workers))
        # Stages of different jobs run at the same time, so every stage process gets its own
        # slice of the cores, and OpenMP threads sleep rather than spin when they wait: spinning
        # threads of one process take the cores another needs. (Measured on 2 cores, a stream of
        # 4 tiny jobs: 2 threads per process made it 2.4x slower than 1 each.)
        processes = workers + 1 + decoders + 1  # the ranks, the encoder, the decoders, the panel
        threads = {"OMP_NUM_THREADS": str(max(1, cpus // processes)), "OMP_WAIT_POLICY": "PASSIVE"}
        rank = ActorResources(num_gpus=0, num_cpus=share, env=threads)
        # One of several replicas: its side actors (they ask for nothing) live in rank 0's bundle,
        # on its node, so that a replica is one unit of placement and a lost node takes down
        # whole replicas, not parts of several. (Ray's soft node affinity, tried first, put them on
        # other nodes of a cluster whose nodes share an address.)
        side = ActorResources(num_gpus=0, num_cpus=0, env=threads, beside_rank=0 if replicas > 1 else None)
        return ResourcePlan(side, (side,) * decoders, rank, bundle={"CPU": share}, measure=side)
    if gpus < workers:
        raise InvalidRequest(f"--workers {workers} needs {workers} GPUs (one per rank); the Ray cluster has {gpus}")
    count, spare = 1 + decoders, gpus - workers  # the side actors: the encoder and the decoders
    rank = ActorResources(num_gpus=1.0, num_cpus=0, env={})
    if spare >= count:
        side = [ActorResources(num_gpus=1.0, num_cpus=0, env={})] * count
    elif spare >= 1:  # they share the spare GPUs, as many on each
        side = [ActorResources(num_gpus=_share(1.0, math.ceil(count / spare)), num_cpus=0, env={})] * count
    else:  # in the ranks' bundles, as many beside each rank
        each = _share(SIDE_SHARE, math.ceil(count / workers))
        side = [ActorResources(num_gpus=each, num_cpus=0, env={}, beside_rank=i % workers) for i in range(count)]
        rank = ActorResources(num_gpus=RANK_SHARE_WHEN_SHARED, num_cpus=0, env={})
    panel_cpus = min(MEASURE_CPUS, cpus)
    measure = ActorResources(num_gpus=0, num_cpus=panel_cpus, env={"OMP_NUM_THREADS": str(panel_cpus)})
    return ResourcePlan(side[0], tuple(side[1:]), rank, bundle={"GPU": 1.0}, measure=measure)


def has_room(plan: ResourcePlan, workers: int, free: dict[str, float] | None = None) -> bool:
    """Whether the cluster's free resources (`free`: Ray's available_resources(), read when not
    given) hold one more pipeline of `plan` with `workers` denoiser ranks now. The sum over the
    cluster: a group whose ranks must share a node may still find no node with room for all of
    them, and then waits for its placement (PLACEMENT_TIMEOUT_S)."""
    free = ray.available_resources() if free is None else free
    actors = [plan.encode, *plan.decode, plan.measure]
    need = {
        "GPU": workers * plan.bundle.get("GPU", 0) + sum(a.num_gpus for a in actors if a.beside_rank is None),
        "CPU": workers * plan.bundle.get("CPU", 0) + sum(a.num_cpus for a in actors if a.beside_rank is None),
    }
    return all(amount <= free.get(kind, 0) + 1e-6 for kind, amount in need.items())


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
