"""Ingest gate tasks: one library call each. The de-identification key is read from Settings inside
the task, so it never becomes a Prefect parameter, result or log line."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from dicomops import ingest
from dicomops.config import IngestConfig
from dicomops.deid.keys import key_from_settings
from dicomops.ingest import GateSummary


@task(name="index-headers", retries=1, retry_delay_seconds=[5], tags=["io-heavy"])
def index_headers(src: Path, work: Path, cfg: IngestConfig) -> Path:
    return ingest.index_headers(src, work, cfg, key_from_settings())


@task(name="validate-headers")
def validate_headers(work: Path, cfg: IngestConfig) -> Path:
    return ingest.validate_headers(work, cfg)


@task(name="assemble-series")
def assemble_series(work: Path, cfg: IngestConfig) -> Path:
    return ingest.assemble(work, cfg)


@task(name="apply-gate")
def apply_gate(work: Path, cfg: IngestConfig) -> GateSummary:
    return ingest.apply_gate(work, cfg)


@task(name="deidentify-corpus", retries=1, retry_delay_seconds=[5], tags=["io-heavy"])
def deidentify_corpus(src: Path, work: Path, cfg: IngestConfig) -> Path:
    return ingest.deidentify_corpus(src, work, cfg, key_from_settings())


@task(name="recount-gate")
def recount_gate(work: Path, cfg: IngestConfig) -> GateSummary:
    return ingest.recount_gate(work, cfg)


@task(name="rekey-labels")
def rekey_labels(src: Path, work: Path, cfg: IngestConfig) -> Path | None:
    key = key_from_settings()
    ingest.write_reid_key(src, work, cfg, key)
    return ingest.rekey_labels(src, work, key)


@task(name="reset-ingest")
def reset_ingest(work: Path, source_dvc_md5: str) -> None:
    ingest.reset(work)
    ingest.record_source(work, source_dvc_md5)


@task(name="release-counts")
def release_counts(work: Path, cfg: IngestConfig) -> list[Path]:
    """The configured tables of counts, under differential privacy; a spent budget releases nothing
    and says so in the log (the batch itself goes on)."""
    from prefect import get_run_logger

    from dicomops.config import load_settings
    from dicomops.feedback import privacy

    ledger = privacy.ledger_for(work, load_settings().privacy_ledger)
    try:
        return privacy.publish_ingest(work, cfg.privacy, ledger)
    except privacy.PrivacyBudgetExceededError as err:
        get_run_logger().warning("no counts released: %s", err)
        return []
