import os
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
def ray_session():
    """One local Ray for the whole test session (CPU only, as on CI)."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broken_family(message: str):
    """A family adapter for one rank of a denoiser group (set as its stage's `family`) whose first
    denoising step raises RuntimeError(message): that rank fails while the others wait for it in
    a collective. Its classes are local, so Ray ships them to the actor by value."""

    class BrokenDenoising:
        timesteps = [0, 1]

        def step(self, index, timestep):
            raise RuntimeError(message)

    class BrokenFamily:
        def start(self, *args, **kwargs):
            return BrokenDenoising()

    return BrokenFamily()
