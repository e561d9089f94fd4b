"""Export tasks: resolve the version, export and check it, attach the results to it."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from dicomops.config import ExportConfig
from dicomops.export import stage
from dicomops.export.stage import ExportReport, ModelRef
from dicomops.layout import WorkLayout


@task(name="resolve-model-version", retries=2, retry_delay_seconds=[2, 10])
def resolve_version(tracking_uri: str, name: str, version: str | None, alias: str | None) -> ModelRef:
    return stage.resolve_version(tracking_uri, name, version, alias)


@task(name="export-and-check", tags=["cpu-heavy"])
def export_and_check(work: Path, tracking_uri: str, ref: ModelRef, cfg: ExportConfig) -> ExportReport:
    return stage.export_from_work(WorkLayout(work), tracking_uri, ref, cfg)


@task(name="attach-to-version", retries=2, retry_delay_seconds=[2, 10])
def attach(tracking_uri: str, ref: ModelRef, report: ExportReport) -> None:
    stage.attach(tracking_uri, ref, report)
