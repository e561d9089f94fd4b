"""Export tasks: resolve the version, export and check it, attach the results to it."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from dicomops.config import ExportConfig
from dicomops.export import stage
from dicomops.export.stage import ExportReport, ModelRef
from dicomops.layout import WorkLayout
from dicomops.training.data import forget_slabs


@task(name="resolve-model-version", retries=2, retry_delay_seconds=[2, 10])
def resolve_version(tracking_uri: str, name: str, version: str | None, alias: str | None) -> ModelRef:
    return stage.resolve_version(tracking_uri, name, version, alias)


@task(name="export-and-check", tags=["cpu-heavy"])
def export_and_check(work: Path, tracking_uri: str, ref: ModelRef, cfg: ExportConfig) -> ExportReport:
    layout = WorkLayout(work)
    calibration, validation = stage.check_data(layout, ref.contract, cfg.check_fold)
    try:
        return stage.export_version(layout.export_dir(ref.version), tracking_uri, ref, cfg, calibration, validation,
                                    layout=layout)
    finally:
        forget_slabs()  # the last reader of the training slabs: the process gives their memory back


@task(name="attach-to-version", retries=2, retry_delay_seconds=[2, 10])
def attach(tracking_uri: str, ref: ModelRef, report: ExportReport) -> None:
    stage.attach(tracking_uri, ref, report)
