"""MLflow tracking: one run per generation, with its params, timings, clarity metrics and files.

The store is MLflow's own default (so `mlflow ui` in the same directory shows the runs) unless
MLFLOW_TRACKING_URI or an explicit URI says otherwise. Runs are logged after the video is written:
a tracking failure never costs a finished video.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.time import get_current_time_millis

DEFAULT_EXPERIMENT = "framecast"


def log_generation(
    *,
    params: dict[str, str],
    metrics: dict[str, float],
    artifacts: list[Path],
    config_text: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    run_name: str | None = None,
) -> str:
    """Record one finished generation; returns the MLflow run id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={"framecast.kind": "generation"})
    run_id = run.info.run_id
    try:
        now = get_current_time_millis()
        client.log_batch(
            run_id,
            params=[Param(k, str(v)) for k, v in params.items()],
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        )
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.log_text(run_id, config_text, "config.yaml")
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id)
    return run_id
