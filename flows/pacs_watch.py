"""The PACS watch: new stable studies from Orthanc's changes feed → retrieved whole → the ingest
gate → scored by the champion → DICOM SR (and, with a promoted segmenter, the nodules' SR and SEG)
stored back under the original study → an event per study."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dicomops.config import PipelineConfig, load_settings
from dicomops.layout import WorkLayout
from dicomops.pacs.watch import describe
from flows.scope import writing
from tasks import pacs as t


@flow(name="dicomops-pacs-watch", log_prints=True)
def pacs_watch(orthanc_url: str | None = None, work: Path | None = None, staging: Path | None = None,
               config: PipelineConfig = PipelineConfig(), limit: int = 100) -> dict[str, object]:
    """Handle every study that became stable in the PACS since the last pass (cursor in
    ``WORK/pacs/cursor.json``). `orthanc_url` is Orthanc's root (default ``DICOMOPS_PACS_URL``);
    credentials come from ``DICOMOPS_PACS_USER`` / ``DICOMOPS_PACS_PASSWORD``."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    staging = Path(staging or settings.pacs_staging)
    model = config.train.model_name
    # It holds WORK/pacs only, the one part of the work directory it writes: studies keep flowing
    # while a training or a monitor run holds the rest.
    with writing(WorkLayout(work).pacs.root, "dicomops-pacs-watch", settings):
        scoring = t.champion_available(settings.mlflow_tracking_uri, model, config.serve.alias)
        if not scoring:
            print(f"pacs-watch: no exported version of {model} holds '{config.serve.alias}' yet; studies are "
                  "ingested and not answered")
        segmenter = config.segment.model_name if config.serve.localise else None
        result = t.handle_new_studies(orthanc_url, work, staging, config.ingest, model if scoring else None, limit,
                                      segmenter, config.serve.write_seg, config.serve)
    print(f"pacs-watch: {describe(result)}")
    return {**result, "work": str(work)}
