import os
from dataclasses import replace
from pathlib import Path

import pytest

from stages.models import ComponentSpec, ModelSpec, load_spec, resolve_weights


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(tmp_path_factory):
    """Models built by tests go to a fresh cache; MLflow never writes into the checkout."""
    cache = tmp_path_factory.mktemp("framecast-cache")
    os.environ["FRAMECAST_CACHE"] = str(cache)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/default.db"
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    yield


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return load_spec("tiny")


@pytest.fixture(scope="session")
def tiny_weights(tiny_spec) -> Path:
    return resolve_weights(tiny_spec)


def rope_dpm_variant(spec: ModelSpec) -> ModelSpec:
    """tiny with CogVideoX-5b's distinguishing parts: 3D RoPE instead of sin-cos, and the DPM scheduler."""
    transformer = spec.components["transformer"]
    scheduler = spec.components["scheduler"]
    components = dict(spec.components)
    components["transformer"] = ComponentSpec(
        transformer.class_path, {**transformer.config, "use_rotary_positional_embeddings": True}
    )
    components["scheduler"] = ComponentSpec(
        "diffusers.CogVideoXDPMScheduler", {**scheduler.config, "snr_shift_scale": 1.0}
    )
    return replace(spec, name="tiny-rope-dpm", components=components)


@pytest.fixture(scope="session")
def rope_spec(tiny_spec) -> ModelSpec:
    return rope_dpm_variant(tiny_spec)


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
