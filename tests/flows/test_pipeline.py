"""The pipeline flow runs for real under a Prefect test harness, with MLflow in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlflow
from dicomops.config import PipelineConfig
from dicomops.tracking import dvc_directory_hash
from flows.pipeline import pipeline


@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_logs_lineage_to_mlflow(clean_corpus: Path, mlflow_env: str, tmp_path: Path) -> None:
    result = pipeline(src=clean_corpus, config=PipelineConfig(experiment="pipeline-test"))
    client = mlflow.tracking.MlflowClient(mlflow_env)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_dvc_md5"] == dvc_directory_hash(clean_corpus) == result["data_dvc_md5"]
    assert run.data.tags["version.pydicom"].startswith("3.")
    assert run.data.params["synth.seed"] == str(PipelineConfig().synth.seed)
    n_files = sum(1 for p in clean_corpus.rglob("*") if p.is_file())
    assert run.data.metrics["input_files"] == n_files
    assert Path(result["work"]) == tmp_path / "work"
