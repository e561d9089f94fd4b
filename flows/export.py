"""The export flow: a registered version → ONNX, INT8, TensorRT (where possible), Triton, all checked."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dicomops.config import ExportConfig, load_settings
from dicomops.export.stage import describe, registered_problem, summary_line
from flows.scope import writing
from tasks import export as t
from tasks import stages


@flow(name="dicomops-export", log_prints=True)
def export(work: Path | None = None, config: ExportConfig = ExportConfig(),
           model_name: str = "dicomops-ct-classifier", version: str | None = None,
           alias: str | None = None, force: bool = False) -> dict[str, object]:
    """Export `version` (or the version holding `alias`; by default the challenger, else the champion).
    An export recorded with these settings is skipped only while the files registered for the version
    still pass serving's checks; `force` exports it again regardless."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri = settings.mlflow_tracking_uri
    ref = t.resolve_version(uri, model_name, version, alias)
    stage = f"export-{ref.name}-v{ref.version}"
    key = stages.stage_key("export", {"model": ref.name, "version": ref.version, "run": ref.run_id,
                                      "config": config.model_dump(mode="json")})
    with writing(work, "dicomops-export", settings):
        cached = None if force else stages.completed(work, stage, key)
        problem = None if cached is None else registered_problem(uri, ref)
        if cached is not None and problem is None:
            print(f"export: {ref.name} version {ref.version} already exported and checked with these settings, and "
                  "its registered files match their sha256; skipped (--force exports it again)")
            return {**cached, "skipped": True}
        if problem is not None:
            print(f"export: {ref.name} version {ref.version} was exported with these settings, but its registered "
                  f"files would not be served ({problem}); exporting it again")
        stages.started(work, stage)
        report = t.export_and_check(work, uri, ref, config)
        t.attach(uri, ref, report)
        print(summary_line(report))
        result = describe(report)
        stages.done(work, stage, key, result, [Path(report.folder) / "manifest.json"])
    return {**result, "skipped": False}
