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


# MLflow's own tags: the UI shows `mlflow.note.content` as a run's or experiment's description, and
# lays an experiment out for classic machine learning (runs, metrics, models) rather than GenAI
# (traces, evaluations, an assistant) when `mlflow.experimentKind` says so.
DESCRIPTION_TAG = "mlflow.note.content"
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "dicomops: CT series through the ingest gate (Great Expectations, de-identification), preprocessing, "
    "k-fold (four by default) vendor-stratified cross-validation (one nested run per fold), export and drift monitoring. "
    "Each run's description says what it did; the model versions and their cards are under Models.")
RUN_DESCRIPTIONS = {
    "pipeline": "The whole pipeline on one DICOM folder: ingest, preprocess, train, export (nested runs).",
    "ingest": "The ingest gate: header index, expectations, geometry, quarantine with reasons, de-identification. "
              "Artifacts: the quarantine, the validation Data Docs, the summary picture.",
    "preprocess": "HU, 1 mm resampling and windowing of every accepted series; per-series features for drift.",
    "train": "K-fold vendor-stratified cross-validation (nested fold runs), the final model on all series, "
             "registration and the promotion gate. Artifacts under cv/: tables, ROC, confusion matrices, "
             "sample slices, folds.json.",
    "monitor": "Drift of a new batch against the champion's training data (Evidently); an alert starts a retrain.",
    "retrain": "A retraining started by a drift alert or by readers' feedback (tag trigger).",
    "feedback": "Readers' judgements of the model's results: Cohen's kappa and disagreement per vendor over the "
                "rolling window (agreement.png), what was collected and refused; a retrain when they call for one.",
    "pacs-watch": "A pass of the PACS watch over the studies that became stable: how many were answered, refused "
                  "or failed, the results stored back, the version and engine; studies.csv names studies by token.",
    "predict": "A batch of studies scored by a registered model on its exported engine: counts, latency percentiles, "
               "engine and cache figures; results.csv names studies by token and series by pseudonym only.",
}


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None = None) -> str:
    """Return the id of experiment `name`, creating it with artifacts under `artifact_root`; it
    carries the classic ML layout and a description (added to an older experiment that lacks them)."""
    existing = client.get_experiment_by_name(name)
    if existing is None:
        location = (Path(artifact_root) / name).resolve().as_uri() if artifact_root else None
        experiment_id = str(client.create_experiment(name, artifact_location=location,
                                                     tags={KIND_TAG: KIND, DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION}))
        return experiment_id
    for key, value in {KIND_TAG: KIND, DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION}.items():
        if key not in existing.tags:
            client.set_experiment_tag(existing.experiment_id, key, value)
    return str(existing.experiment_id)


def start_run(tracking_uri: str, experiment: str, artifact_root: Path | None, *, run_name: str,
              tags: dict[str, str], params: dict[str, object] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a run and return its id; tasks pass the id, never a live run or client."""
    client = configure_mlflow(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    all_tags = dict(tags)
    if run_name in RUN_DESCRIPTIONS:
        all_tags.setdefault(DESCRIPTION_TAG, RUN_DESCRIPTIONS[run_name])
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
