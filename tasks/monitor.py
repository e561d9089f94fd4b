"""Monitoring tasks: load what is served, featurise the batch, compare, record, alert."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from dicomops.config import MonitorConfig
from dicomops.layout import WorkLayout
from dicomops.monitoring import alerts, drift, inflow, stage
from dicomops.monitoring.reference import ServingModel, load_serving
from dicomops.tracking import runs
from dicomops.versioning import version_folder


@task(name="load-serving-model", retries=2, retry_delay_seconds=[2, 10])
def load_serving_model(tracking_uri: str, name: str, alias: str) -> ServingModel:
    return load_serving(tracking_uri, name, alias)


@task(name="tag-run", retries=2, retry_delay_seconds=[2, 10])
def tag_run(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    runs.set_tags(tracking_uri, run_id, tags)


@task(name="version-retrain-pool", tags=["io-heavy"])
def version_pool(tracking_uri: str, run_id: str, pool: Path) -> dict[str, str]:
    """The retrain's labelled pool as a DVC version, its pointer logged to the run (``data/``): a later
    ``dvc pull`` of that pointer gives the pool back after its monitored batches are gone. Returns
    the tags the run and the versions it registers carry."""
    version = version_folder(pool)
    if version.note:
        get_run_logger().warning("retrain pool: %s", version.note)
    if version.pointer:
        runs.log_artifacts(tracking_uri, run_id, [version.pointer], "data")
    return version.tags("retrain.pool")


@task(name="reference-quarantine-share", retries=2, retry_delay_seconds=[2, 10])
def reference_quarantine_share(tracking_uri: str, serving: ServingModel) -> float:
    """The quarantined share of the serving version's training ingest (tagged with its reference)."""
    mv = runs.configure_mlflow(tracking_uri).get_model_version(serving.name, serving.version)
    return float(mv.tags.get("monitoring.reference_quarantine_share", "0"))


@task(name="gather-pacs-inflow", tags=["io-heavy"])
def gather_inflow(work: Path, min_series: int) -> inflow.Inflow:
    return inflow.ready(work, min_series)


@task(name="take-pacs-inflow")
def take_inflow(work: Path, judged: inflow.Inflow) -> None:
    inflow.taken(work, judged)


@task(name="record-batch")
def record_batch(work: Path, batch_id: str, src: Path) -> Path:
    return stage.record_batch(work, batch_id, src)


@task(name="batch-features", tags=["cpu-heavy"])
def batch_features(batch_work: Path, tracking_uri: str, serving: ServingModel) -> Any:
    return stage.batch_features(batch_work, tracking_uri, serving.run_id)


@task(name="compare-with-reference")
def compare(serving: ServingModel, current: Any, batch_work: Path, cfg: MonitorConfig,
            reference_quarantine_share: float) -> drift.DriftSummary:
    quarantined, files = stage.quarantine_counts(batch_work)
    check = drift.quarantine_check(reference_quarantine_share, quarantined, files, cfg)
    return drift.compare(serving.reference, current, cfg, WorkLayout(batch_work).drift, check)


@task(name="log-monitoring", retries=2, retry_delay_seconds=[2, 10])
def log_monitoring(tracking_uri: str, run_id: str, summary: drift.DriftSummary, batch_work: Path,
                   cfg: MonitorConfig, model_name: str) -> None:
    metrics = {"drift_share": summary.drift_share, "n_series": float(summary.n_series),
               "drifted_columns": float(len(summary.drifted_columns)),
               "quarantined_share": float(summary.quarantine.get("share", 0.0))}
    metrics.update({f"p.{c.column}": c.score for c in summary.columns if c.kind != "embedding"})
    metrics.update({f"{c.column}_auc": c.score for c in summary.columns if c.kind == "embedding"})
    runs.log_metrics(tracking_uri, run_id, metrics)
    runs.set_tags(tracking_uri, run_id, {"drift.status": summary.status,
                                         "drift.columns": ",".join(summary.drifted_columns)[:4000]})
    folder = WorkLayout(batch_work).drift
    history = stage.drift_history(tracking_uri, cfg.experiment, model_name, folder / "drift_share_history.png",
                                  cfg.drift_share)
    runs.log_artifacts(tracking_uri, run_id, [folder / "report.html", folder / "summary.json",
                                              *([history] if history else [])], "drift")


@task(name="raise-drift-alert", retries=1, retry_delay_seconds=[5])
def raise_alert(work: Path, summary: drift.DriftSummary, serving: ServingModel, monitoring_run_id: str,
                batch_id: str, cfg: MonitorConfig) -> dict[str, Any]:
    """The Prefect event, a line in ``WORK/alerts.jsonl`` and, if configured, a notification."""
    from prefect.events import emit_event

    logger = get_run_logger()
    record = alerts.payload(summary, serving.name, serving.version, monitoring_run_id, batch_id)
    emit_event(event=alerts.EVENT, resource=alerts.resource(serving.name, serving.version), payload=record)
    alerts.append_alert(work, record)
    if cfg.notification_block:
        from prefect.blocks.core import Block

        try:
            block: Any = Block.load(cfg.notification_block)
            block.notify(alerts.message(record), subject=f"dicomops: drift on {serving.name}")
        except ValueError as err:  # Prefect raises ValueError for an unknown block name
            logger.warning("notification block %r not sent: %s; create it in the Prefect UI (Blocks) or fix "
                           "monitor.notification_block", cfg.notification_block, err)
    logger.log(logging.WARNING, alerts.message(record))
    return record
