"""Feedback tasks. A reader's report and its UIDs never cross a Prefect boundary: the PACS is read
and each report parsed inside one task; what comes out are counts, tokens and agreement figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from dicomops.config import FeedbackConfig, load_settings
from dicomops.deid.keys import key_from_settings
from dicomops.feedback import stage
from dicomops.tracking import runs


def reviewers(cfg: FeedbackConfig) -> Any:
    from dicomops.feedback.store import Reviewers

    tokens = load_settings().reviewer_tokens
    return Reviewers.from_config(cfg, tokens.get_secret_value() if tokens else None)


@task(name="serving-version", retries=2, retry_delay_seconds=[2, 10])
def serving_version(tracking_uri: str, name: str, alias: str) -> str | None:
    """The version holding `alias`, or None before there is one."""
    from dicomops.tracking.registry import alias_version

    mv = alias_version(runs.configure_mlflow(tracking_uri), name, alias)
    return None if mv is None else str(mv.version)


@task(name="collect-pacs-feedback", tags=["io-heavy"])
def collect_from_pacs(orthanc_url: str | None, work: Path, cfg: FeedbackConfig, limit: int) -> dict[str, int]:
    """Readers' verified revisions of dicomops reports since the feedback cursor. A PACS that does not
    answer is a warning, not a failure: the cursor stays, the next pass reads what this one missed,
    and the endpoint's judgements are measured meanwhile."""
    from dicomops.errors import ServerUnreachableError
    from dicomops.feedback.pacs import collect_pacs
    from dicomops.pacs.client import PacsError

    settings = load_settings()
    try:
        rows = collect_pacs(orthanc_url, work, key_from_settings(), reviewers(cfg), settings.http_budget_s, limit)
    except (PacsError, ServerUnreachableError, OSError, ValueError) as err:  # ValueError: no PACS credentials
        get_run_logger().warning("readers' reports not collected this pass: %s", err)
        return {"pacs_unreachable": 1}
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("stored", "refused", "ours")}
    refused = [r["reason"] for r in rows if r["outcome"] == "refused"]
    if refused:
        get_run_logger().warning("%d reports refused as feedback: %s (feedback/pacs_seen.csv)", len(refused),
                                 ", ".join(sorted(set(refused))))
    return counts


@task(name="resolve-reader-labels")
def write_labels(work: Path, cfg: FeedbackConfig) -> dict[str, int]:
    resolved = stage.write_labels(work, cfg)
    return {"series": len(resolved), "conflicts": int(resolved.conflict.sum()) if len(resolved) else 0,
            "unresolved": int((resolved.label < 0).sum()) if len(resolved) else 0}


@task(name="log-agreement", retries=2, retry_delay_seconds=[2, 10])
def log_agreement(tracking_uri: str, artifact_root: Path | None, experiment: str, name: str, version: str,
                  work: Path, cfg: FeedbackConfig, counts: dict[str, int],
                  tags: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    return stage.record_agreement(tracking_uri, artifact_root, experiment, name, version, work, cfg, counts, tags)


@task(name="retrain-reason")
def retrain_reason(work: Path, cfg: FeedbackConfig, name: str, version: str) -> str | None:
    from dicomops.monitoring import guard

    return stage.due(work, cfg, name, version, guard.last_start(work, name))


@task(name="raise-feedback-event")
def raise_event(name: str, version: str, reason: str, run_id: str) -> None:
    """``dicomops.feedback.threshold``: the retrain deployment's second trigger."""
    from prefect.events import emit_event

    from dicomops.monitoring import alerts

    emit_event(event=stage.EVENT, resource=alerts.resource(name, version),
               payload=stage.payload(name, version, reason, run_id))
    get_run_logger().warning("feedback on %s v%s calls for a retrain: %s", name, version, reason)


@task(name="readers-source")
def readers_source(work: Path, cfg: FeedbackConfig, sources: list[Path],
                   snapshot: Path | None = None) -> tuple[dict[str, str], Path, Path | None]:
    """The readers' labels, masks and reviewed clinical series as the next version of their DVC source
    (DICOMOPS_READER_LABELS); returns its run tags, the folder holding it (`snapshot` when given) and
    the clinical corpus in it (None without one)."""
    from dicomops.feedback.clinical import CLINICAL

    version = stage.readers_source(work, cfg, load_settings().reader_labels, sources, key_from_settings(), snapshot)
    if version.note:
        get_run_logger().warning("readers' labels: %s", version.note)
    clinical = version.folder / CLINICAL
    return version.tags("feedback"), version.folder, clinical if clinical.is_dir() else None


@task(name="apply-reader-labels")
def apply_reader_labels(source: Path, pool_work: Path) -> dict[str, str]:
    return {"retrain.reader_labels": str(stage.apply_to_retrain(source, pool_work, key_from_settings()))}
