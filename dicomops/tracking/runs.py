"""Point MLflow at the configured store and make sure experiments keep artifacts where we say."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

import mlflow


def configure_mlflow(tracking_uri: str) -> MlflowClient:
    """Use `tracking_uri` for this process and return a client for it.

    For the embedded SQLite default, the folder holding the database is created first.
    """
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None = None) -> str:
    """Return the id of experiment `name`, creating it with artifacts under `artifact_root`."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return str(existing.experiment_id)
    location = (Path(artifact_root) / name).resolve().as_uri() if artifact_root else None
    return str(client.create_experiment(name, artifact_location=location))


def start_run(tracking_uri: str, experiment: str, artifact_root: Path | None, *, run_name: str,
              tags: dict[str, str], params: dict[str, object] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a run and return its id; tasks pass the id, never a live run or client."""
    client = configure_mlflow(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    if params:
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return str(run.info.run_id)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close a run as FINISHED or FAILED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    configure_mlflow(tracking_uri).set_terminated(run_id, status=status)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log several metrics in one batch (one round trip instead of one per metric)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    configure_mlflow(tracking_uri).log_batch(run_id, metrics=batch)


def flatten_params(config: dict[str, object], prefix: str = "") -> dict[str, object]:
    """``{"synth": {"seed": 1}}`` → ``{"synth.seed": 1}``, for MLflow params."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_artifacts(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Attach files or folders to a run (folders keep their layout)."""
    client = configure_mlflow(tracking_uri)
    for path in paths:
        path = Path(path)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), f"{artifact_path}/{path.name}" if artifact_path else path.name)
        elif path.exists():
            client.log_artifact(run_id, str(path), artifact_path)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = configure_mlflow(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
