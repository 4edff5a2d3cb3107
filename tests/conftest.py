import contextlib
import gc
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from stages.models import ComponentSpec, ModelSpec, load_spec
from stages.weights import resolve_weights


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory):
    """Models built by tests go to a fresh cache, and the tests run in a scratch directory: MLflow
    puts artifacts under ./mlruns of the working directory, and nothing may land in the checkout."""
    os.environ["FRAMECAST_CACHE"] = str(tmp_path_factory.mktemp("framecast-cache"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/default.db"
    # Every Ray these tests start (theirs, a CLI's, a `ray start`) starts no idle workers ahead of
    # time: Ray would start one per CPU for tasks, these tests run actors only (each gets a process
    # of its own), and an idle worker costs a process start and polls for the rest of its Ray.
    os.environ["RAY_prestart_worker_first_driver"] = "0"
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return load_spec("tiny")


@pytest.fixture(scope="session")
def tiny_weights(tiny_spec) -> Path:
    return resolve_weights(tiny_spec)


def variant(
    spec: ModelSpec,
    name: str,
    transformer: dict | None = None,
    scheduler: str | None = None,
    scheduler_config: dict | None = None,
    dtype: str | None = None,
) -> ModelSpec:
    """A test model derived from tiny: changed transformer config, scheduler or dtype."""
    components = dict(spec.components)
    t, s = components["transformer"], components["scheduler"]
    components["transformer"] = ComponentSpec(t.class_path, {**t.config, **(transformer or {})})
    components["scheduler"] = ComponentSpec(scheduler or s.class_path, {**s.config, **(scheduler_config or {})})
    return replace(spec, name=name, components=components, dtype=dtype or spec.dtype)


@pytest.fixture(scope="session")
def rope_spec() -> ModelSpec:
    """CogVideoX-5b's distinguishing parts: 3D RoPE instead of sin-cos, and DPM by default."""
    return load_spec("tiny-rope")


@pytest.fixture(scope="session")
def rope_weights(rope_spec) -> Path:
    return resolve_weights(rope_spec)


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, once for the session: making one runs MLflow's
    schema migrations, about 2.5 s of CPU, which a copy of this file skips. Made by a client's
    first call, as a run's tracking makes it (its Default experiment in the same place)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # committed: SQLite's file is whole after it
    return db


@pytest.fixture
def mlflow_uri(tmp_path, empty_mlflow_store) -> str:
    """The tracking URI of a fresh MLflow store of this test's own (a copy of the empty one)."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_mlflow_store, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (CPU only, as on CI)."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    EXECUTORS.discard()
    ray.shutdown()


class Executors:
    """The session's RayExecutor, one alive at a time (an executor takes every core of the test
    cluster). A test asks for one with so many denoiser ranks, decoders and an encoder or not, and
    gets the previous test's executor with every stage built anew for the test's model, layout
    and decoders (`RayExecutor.reload`, which starts processes only for a denoiser group of
    another size and for a side actor it did not have or that must move), or a new one: a
    process start (importing torch, diffusers and DeepSpeed) costs more than most tests' work,
    and no test depends on a fresh process. A rank that failed leaves a torn-down group, which
    the next `get` replaces (the other actors stay). The executor goes after a test that fails,
    and before a test that uses the test Ray without it (it needs the cores), unless that test
    is marked `beside_executor` (its actors ask for no CPU)."""

    def __init__(self):
        self.current = None

    def get(self, spec: ModelSpec, weights: Path, layout=None, decoders: int = 1, encoder: bool = True):
        from cluster.executor import RayExecutor
        from stages.context_parallel import ParallelLayout

        layout = layout or ParallelLayout()
        if self.current is not None:
            self.current.reload(spec, weights, layout, decoders=decoders, encoder=encoder)
        else:
            self.current = RayExecutor(spec, weights, layout, decoders=decoders, encoder=encoder)
        return self.current

    def discard(self) -> None:
        """Close the executor (before a test makes its own, or after one broke it)."""
        if self.current is not None:
            self.current.close()
            self.current = None


EXECUTORS = Executors()


@pytest.fixture(scope="session")
def executors(ray_session) -> Executors:
    return EXECUTORS


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test that uses the test Ray on its own (its actors, a Serve app, a CLI run) needs its
    cores: the session's executor goes before the test's fixtures (a module's Serve app) start.
    A test marked `beside_executor` starts only actors that ask for no CPU, and leaves it."""
    if "ray_session" in item.fixturenames and "executors" not in item.fixturenames:
        if item.get_closest_marker("beside_executor") is None:
            EXECUTORS.discard()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's executor may be stuck in a collective or half built: the next test gets a new one."""
    outcome = yield
    if outcome.get_result().failed and "executors" in getattr(item, "funcargs", {}):
        EXECUTORS.discard()


@pytest.fixture(scope="session")
def serve_base_url(ray_session) -> str:
    """Ray Serve on the test Ray, started once for the session (starting its controller and proxy
    takes a while on 2 cores): each Serve test module runs its application on it at "/" and
    deletes it when done. Its base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()  # nothing to do if the last test that used it shut it down


@contextlib.contextmanager
def served(args, name: str):
    """framecast's Serve application for `args` (a ServeArgs), run as `name` at "/" of the
    session's Serve (`serve_base_url`) and deleted afterwards."""
    from ray import serve

    import serve_app

    serve.run(serve_app.app(args), name=name, route_prefix="/")
    try:
        yield
    finally:
        serve.delete(name)


SERVE_USERS = []  # the session's tests that use its Serve, in the order they run


def pytest_addoption(parser):
    parser.addoption(
        "--ray",
        choices=("only", "none"),
        help="only the tests that use a Ray cluster (the test Ray, or one they start: marked "
        "own_ray) and those that watch the clock (marked on_time), or none of them (`make test` runs "
        "both parts at once, the second at the lowest CPU priority)",
    )


def uses_a_cluster(item: pytest.Item) -> bool:
    return "ray_session" in item.fixturenames or item.get_closest_marker("own_ray") is not None


def in_foreground_part(item: pytest.Item) -> bool:
    """Whether `make test` runs it in its `--ray only` part, at normal CPU priority: a test that
    uses a cluster, or one whose outcome depends on getting the CPU in time (a watchdog's limit)."""
    return uses_a_cluster(item) or item.get_closest_marker("on_time") is not None


def executor_ranks(item: pytest.Item) -> tuple[int, int]:
    """The denoiser ranks a test asks of the session executor first, and those it leaves it with
    (0: a failed group, not replaced): its `ranks` marker, else a ParallelLayout among its
    parameters, else 1."""
    from stages.context_parallel import ParallelLayout

    marker = item.get_closest_marker("ranks")
    if marker is not None:
        return marker.args[0], marker.args[-1]
    params = getattr(item, "callspec", None)
    layouts = [v for v in (params.params.values() if params else ()) if isinstance(v, ParallelLayout)]
    size = layouts[0].world_size if layouts else 1
    return size, size


def cluster_order(item: pytest.Item) -> tuple:
    """Where a test runs: the tests that use no cluster first, then those that start a Ray of
    their own (before the test Ray exists, which would take cores from their Ray's start), then
    those that use the test Ray without the session executor (which would close it: they come
    before it is made), and last those that use it, by the ranks they ask for, fewest first. For
    one number of ranks, those that keep that group come first, then those that leave it failed
    (the next test needs a new group anyway), then those that leave a group of another size.
    Each group of another size, and each executor after one closed, starts new processes
    (importing torch, diffusers and DeepSpeed: about 12 s of CPU each). Measured at a5eeb24: in
    file order the session's tests started 77 stage actors, in this order 63."""
    if "ray_session" not in item.fixturenames:
        return (0,) if item.get_closest_marker("own_ray") is None else (1,)
    if "executors" not in item.fixturenames:
        return (2,)
    first, last = executor_ranks(item)
    return (3, first, 0 if last == first else 1 if last == 0 else 2)


def pytest_collection_modifyitems(config, items):
    part = config.getoption("ray")
    if part is not None:
        chosen, others = [], []
        for item in items:
            (chosen if in_foreground_part(item) == (part == "only") else others).append(item)
        config.hook.pytest_deselected(items=others)
        items[:] = chosen
    items.sort(key=cluster_order)  # stable: collection order among equal keys


def pytest_configure(config):
    """Collection imports torch, diffusers, transformers, Ray and MLflow: several hundred
    thousand objects and no garbage, which Python's cyclic collector would walk again and again
    (as cluster.actors.build_without_gc explains). It is paused until collection ends."""
    gc.disable()


def pytest_collection_finish(session):
    gc.enable()
    gc.freeze()  # what collection imported is not walked by every later full collection
    SERVE_USERS[:] = [item for item in session.items if "serve_base_url" in item.fixturenames]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Serve goes when the last test that uses it is done: its controller and proxy poll (about
    6 % of a core) for as long as they run, and the tests after the Serve modules need the cores."""
    yield
    if SERVE_USERS and item is SERVE_USERS[-1]:
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback for the session (tests/postgres.py), stopped at its end."""
    from postgres import PostgresServer

    server = PostgresServer(free_port())
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """The URL of a new, empty database of the session's PostgreSQL server, for this test alone."""
    import re

    name = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[-50:] + f"_{free_port()}"
    return postgres_server.create_database(name)


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broken_family(message: str):
    """A family adapter for one rank of a denoiser group (set as its stage's `family`) whose first
    denoising step raises RuntimeError(message): that rank fails while the others wait for it in
    a collective. Its classes are local, so Ray ships them to the actor by value."""

    import torch

    class BrokenDenoising:
        timesteps = torch.tensor([0, 1])  # a Denoising's timesteps are a tensor

        def step(self, index, timestep):
            raise RuntimeError(message)

    class BrokenFamily:
        cache_kinds = ()  # the stage checks a request's cache against its family's

        def start(self, *args, **kwargs):
            return BrokenDenoising()

    return BrokenFamily()
