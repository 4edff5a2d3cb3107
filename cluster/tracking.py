"""MLflow tracking: one run per generation (params, timings, clarity metrics and files), one per
video measured on its own (`framecast clarity --log-to-mlflow`), and for a sweep a parent run
whose children are its cells' generations (`framecast sweep`).

The store is MLflow's own default (so `mlflow ui` in the same directory shows the runs) unless
MLFLOW_TRACKING_URI or an explicit URI says otherwise. Runs are logged after the video is written:
a tracking failure never costs a finished video.

MLflow is imported where a run is recorded, not with this module: every Serve replica imports
this module (through the Videos API's), and only the ingress records runs (importing MLflow
costs about 1 s of CPU).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_EXPERIMENT = "framecast"
# A generation's timings, as recorded (seconds; lower is better).
TIMING_METRICS = ("total_s", "denoise_s", "s_per_step", "decode_s", "measure_s")
WARNING_TAG = "framecast.warning."  # + the pitfall's name (stages.request.pitfalls)


def warning_tags(warnings: dict[str, str]) -> dict[str, str]:
    return {WARNING_TAG + name: line for name, line in warnings.items()}


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
    parent_run_id: str | None = None,
) -> str:
    """Record one finished run (tag `framecast.kind`: `kind`), nested under `parent_run_id` if
    given; `texts` are artifact name -> text (e.g. config.yaml). Returns the MLflow run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
    from mlflow.utils.time import get_current_time_millis

    client = MlflowClient(tracking_uri=tracking_uri)
    tags = {"framecast.kind": kind, **(tags or {})}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags)
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


def log_generation(
    result: Any,
    job: Any,
    *,
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Record a generation (a driver GenerationResult and its Job): its params (and `params`),
    metrics, files and resolved config; its pitfalls and any clarity error as tags (with `tags`)."""
    tags = {**warning_tags(result.warnings), **(tags or {})}
    if result.clarity_error:
        tags["framecast.clarity_error"] = result.clarity_error
    if result.interpolation_error:
        tags["framecast.interpolation_error"] = result.interpolation_error
    return log_run(
        params={**result.params, **(params or {})},
        metrics=result.metrics,
        artifacts=result.artifacts(),
        texts={"config.yaml": job.resolved_config()},
        tags=tags,
        experiment=experiment,
        tracking_uri=tracking_uri,
        run_name=run_name,
        parent_run_id=parent_run_id,
    )


def searched_experiments(client: MlflowClient, experiment: str | None) -> list[str]:
    """The ids of the experiments a search reads: `experiment` (none if it does not exist), or
    every experiment of the store when None."""
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    return [found.experiment_id] if found else []


def experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(experiment)


def open_parent_run(
    client: MlflowClient, experiment: str, tags: dict[str, str], params: dict[str, str], run_name: str
) -> tuple[str, bool]:
    """The latest run with all of `tags`, set running again if there is one (an earlier try of
    the same work), else a new one with these tags and params. Returns (run id, whether it existed)."""
    from mlflow.entities import Param, RunStatus

    exp = experiment_id(client, experiment)
    if any("'" in v for v in tags.values()):  # MLflow's filter language has no escape for it
        raise ValueError(f"tag values to search by must not contain a single quote: {tags}")
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([exp], query, order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id, True
    run = client.create_run(exp, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id, False


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    """The FINISHED runs nested under `parent_run_id`."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent = client.get_run(parent_run_id)
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and attributes.status = 'FINISHED'"
    return search_all_runs(client, [parent.info.experiment_id], query)


def search_all_runs(client: MlflowClient, experiment_ids: list[str], query: str) -> list:
    """Every run of the experiments that matches `query`, page after page."""
    runs, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs
