"""PACS tasks. A study's UIDs never cross a Prefect boundary: the changes feed is read, and each
study retrieved, gated, scored and answered, inside one task; what comes out are tokens and counts."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task

from dicomops.config import IngestConfig, ServeConfig, load_settings
from dicomops.deid.keys import key_from_settings
from dicomops.pacs import watch


@task(name="load-champion-for-pacs", retries=2, retry_delay_seconds=[2, 10])
def champion_available(tracking_uri: str, model_name: str, alias: str = "champion") -> bool:
    """Whether a version can score the studies: one holds `alias` (``serve.alias``) and has been
    exported (without one they are ingested, not answered)."""
    from dicomops.serving.champion import unexported_champion
    from dicomops.tracking.registry import CHAMPION, alias_version, sync_reviews
    from dicomops.tracking.runs import configure_mlflow

    for change in sync_reviews(tracking_uri, model_name):  # a decision made on the MLflow page counts
        print(f"registry: {change}")
    mv = alias_version(configure_mlflow(tracking_uri), model_name, alias or CHAMPION)
    if mv is not None and (why := unexported_champion(mv)):
        print(f"pacs-watch: {why}")
        return False
    return mv is not None


@task(name="handle-new-studies", tags=["io-heavy"])
def handle_new_studies(orthanc_url: str | None, work: Path, staging: Path, cfg: IngestConfig, model_name: str | None,
                       limit: int, segmenter_name: str | None = None, write_seg: bool = True,
                       serve: ServeConfig | None = None) -> dict[str, object]:
    settings = load_settings()
    outcomes = watch.watch_pacs(orthanc_url, work, staging, cfg, key_from_settings(), settings.mlflow_tracking_uri,
                                model_name, settings.http_budget_s, limit, on_study=emit_study_event,
                                segmenter_name=segmenter_name, write_seg=write_seg,
                                artifact_root=settings.mlflow_artifact_root, serve=serve)
    return {"studies": [asdict(o) for o in outcomes], **watch.summarise(outcomes)}


def emit_study_event(outcome: watch.StudyOutcome) -> None:
    """``dicomops.study.stable`` for a study the gate accepted, named by its token, as soon as it is
    recorded (a pass that fails later has still announced what it finished)."""
    from prefect.events import emit_event

    if outcome.status == "ingested":
        emit_event(event="dicomops.study.stable", resource={"prefect.resource.id": f"dicomops.study.{outcome.token}"},
                   payload={"token": outcome.token, "accepted_series": outcome.accepted_series,
                            "results_stored": outcome.results_stored})
