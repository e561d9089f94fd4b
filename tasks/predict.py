"""Prediction tasks. A study's UIDs never cross a Prefect boundary, nor does the loaded engine: the
version is loaded, and the folder or the PACS query scored, inside one task; out come counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dicomops.config import IngestConfig, ServeConfig, load_settings
from dicomops.deid.keys import key_from_settings
from dicomops.serving import batch


@task(name="predict-batch", tags=["cpu-heavy"])
def predict_batch(src: Path | None, query: dict[str, str] | None, work: Path, ingest_cfg: IngestConfig,
                  serve_cfg: ServeConfig, model_name: str, version: str | None,
                  orthanc_url: str | None, segmenter_name: str | None = None) -> dict[str, Any]:
    settings = load_settings()
    return batch.run_batch(src=src, query=query, work=work, ingest_cfg=ingest_cfg, serve_cfg=serve_cfg,
                           model_name=model_name, version=version, key=key_from_settings(),
                           tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
                           staging=settings.pacs_staging, orthanc_url=orthanc_url,
                           http_budget_s=settings.http_budget_s, segmenter_name=segmenter_name)
