"""Tasks that open, fill and close MLflow runs; they pass run ids, never clients."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from dicomops import corpus_stats, tracking
from dicomops.deid.profile import PROFILE_NAME, PROFILE_TAG
from dicomops.layout import WorkLayout


@task(name="hash-corpus")
def hash_corpus(src: Path) -> str:
    return tracking.dvc_directory_hash(src)


@task(name="open-run", retries=2, retry_delay_seconds=[2, 10])
def open_run(tracking_uri: str, experiment: str, artifact_root: Path | None, run_name: str,
             data_hash: str, params: dict[str, object], parent_run_id: str | None = None) -> str:
    return tracking.start_run(tracking_uri, experiment, artifact_root, run_name=run_name,
                              tags=tracking.lineage_tags(data_hash), params=params,
                              parent_run_id=parent_run_id)


@task(name="log-input-counts", retries=2, retry_delay_seconds=[2, 10])
def log_input_counts(tracking_uri: str, run_id: str, src: Path) -> dict[str, float]:
    counts = corpus_stats.count_files(src)
    tracking.log_metrics(tracking_uri, run_id, counts)
    return counts


@task(name="close-run", retries=2, retry_delay_seconds=[2, 10])
def close_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    tracking.end_run(tracking_uri, run_id, status)


@task(name="log-ingest", retries=2, retry_delay_seconds=[2, 10])
def log_ingest(tracking_uri: str, run_id: str, work: Path, released: list[Path] | None = None) -> dict[str, float]:
    """The gate's figures and files; `released` are the counts released under differential privacy."""
    from dicomops import ingest
    from dicomops.deid.keys import key_from_settings

    metrics = ingest.ingest_metrics(work)
    tracking.log_metrics(tracking_uri, run_id, metrics)
    paths = WorkLayout(work).ingest
    shared = ingest.shared_quarantine(work, key_from_settings())  # files by token: a path may name a patient
    tracking.log_artifacts(tracking_uri, run_id, [shared, paths.expectations, paths.summary,
                                                  paths.validation, ingest.plot_ingest(work)], "ingest")
    tracking.log_artifacts(tracking_uri, run_id, [paths.docs], "ingest")
    if released:
        tracking.log_artifacts(tracking_uri, run_id, released, "ingest/released")
    tracking.set_tags(tracking_uri, run_id, {PROFILE_TAG: PROFILE_NAME})
    return metrics


@task(name="log-preprocess", retries=2, retry_delay_seconds=[2, 10])
def log_preprocess(tracking_uri: str, run_id: str, work: Path, summary: dict[str, int]) -> None:
    from dicomops.preprocessing import stage

    tracking.log_metrics(tracking_uri, run_id, {f"preprocess.{k}": float(v) for k, v in summary.items()})
    pre = WorkLayout(work).preprocessed
    tracking.log_artifacts(tracking_uri, run_id, [pre.features, pre.failures,
                                                  stage.plot_samples(work)], "preprocess")
