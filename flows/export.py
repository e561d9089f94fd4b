"""The export flow: a registered version → ONNX, INT8, TensorRT (where possible), Triton, all checked."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dicomops.config import ExportConfig, load_settings
from dicomops.export.stage import describe, summary_line
from flows.scope import writing
from tasks import export as t
from tasks import stages


@flow(name="dicomops-export", log_prints=True)
def export(work: Path | None = None, config: ExportConfig = ExportConfig(),
           model_name: str = "dicomops-ct-classifier", version: str | None = None,
           alias: str | None = None) -> dict[str, object]:
    """Export `version` (or the version holding `alias`; by default the challenger, else the champion)."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri = settings.mlflow_tracking_uri
    ref = t.resolve_version(uri, model_name, version, alias)
    stage = f"export-{ref.name}-v{ref.version}"
    key = stages.stage_key("export", {"model": ref.name, "version": ref.version, "run": ref.run_id,
                                      "config": config.model_dump(mode="json")})
    with writing(work, "dicomops-export", settings):
        if (cached := stages.completed(work, stage, key)) is not None:
            print(f"export: {ref.name} version {ref.version} already exported and checked with these settings; "
                  "skipped")
            return {**cached, "skipped": True}
        stages.started(work, stage)
        report = t.export_and_check(work, uri, ref, config)
        t.attach(uri, ref, report)
        print(summary_line(report))
        result = describe(report)
        stages.done(work, stage, key, result, [Path(report.folder) / "manifest.json"])
    return {**result, "skipped": False}
