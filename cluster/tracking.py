"""MLflow tracking: one run per generation (params, timings, clarity metrics and files), and one
per video measured on its own (`framecast clarity --log-to-mlflow`).

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


def log_run(
    *,
    params: dict[str, str],
    metrics: dict[str, float],
    artifacts: list[Path],
    texts: dict[str, str] | None = None,
    kind: str = "generation",
    tags: dict[str, str] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    run_name: str | None = None,
) -> str:
    """Record one finished run (tag `framecast.kind`: `kind`); `texts` are artifact name -> text
    (e.g. config.yaml). Returns the MLflow run id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={"framecast.kind": kind, **(tags or {})})
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
        for name, text in (texts or {}).items():
            client.log_text(run_id, text, name)
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id)
    return run_id
